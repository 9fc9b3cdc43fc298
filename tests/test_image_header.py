"""An image's header read without PIL for a JPEG: the same format, size and EXIF
orientation PIL gives, or PIL's own answer where the quick reading cannot be sure."""

from __future__ import annotations

import io
import struct

import pytest
import simplejpeg
import ultralytics  # noqa: F401 - it patches PIL.Image.open; headers must not care
from conftest import progressive_jpeg
from PIL import Image

from gannet.errors import ErrorCode, PermanentError
from gannet.image_header import MAX_SCANS, MAX_SEGMENTS, _jpeg_header, _pil_header, read_header


def _encoded(kind: str, mode: str = "RGB", **save: object) -> bytes:
    """A 97x61 image of one grey, as PIL saves it in `kind` ("JPEG", "MPO", "PNG")."""
    out = io.BytesIO()
    Image.new(mode, (97, 61), 90).save(out, kind, **save)
    return out.getvalue()


def _jpeg(mode: str = "RGB", **save: object) -> bytes:
    return _encoded("JPEG", mode, **save)


def _segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body


def _with(data: bytes, *segments: bytes) -> bytes:
    """The JPEG with these segments right after its start-of-image marker."""
    return data[:2] + b"".join(segments) + data[2:]


def _exif(order: str, *entries: tuple[int, int, int, bytes], cut: int = 0) -> bytes:
    """An EXIF APP1 body: a TIFF block whose first directory holds `entries` (tag, type,
    count, 4-byte value), with its last `cut` bytes cut off."""
    fmt = "<" if order == "II" else ">"
    tiff = order.encode() + struct.pack(fmt + "HI", 42, 8) + struct.pack(fmt + "H", len(entries))
    tiff += b"".join(struct.pack(fmt + "HHI", t, k, n) + v for t, k, n, v in entries)
    tiff += struct.pack(fmt + "I", 0)
    return b"Exif\0\0" + (tiff[:-cut] if cut else tiff)


def _short(order: str, value: int) -> bytes:
    return struct.pack(("<" if order == "II" else ">") + "HH", value, 0)


def _orientation(order: str, value: int) -> tuple[int, int, int, bytes]:
    return (0x0112, 3, 1, _short(order, value))


MAKE = (0x010F, 2, 4, b"Cam\0")
XMP = b'http://ns.adobe.com/xap/1.0/\0<x:xmpmeta><rdf:Description tiff:Orientation="6"/>'


def _pil_exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _jpeg(exif=exif.tobytes())


# Read without PIL: what photos are, so the quick reading must answer for them.
QUICK = {
    "plain": _jpeg(),
    "grayscale": _jpeg("L"),
    "cmyk": _jpeg("CMYK"),
    "progressive": _jpeg(progressive=True),
    "exif without orientation": _with(_jpeg(), _segment(0xE1, _exif("II", MAKE))),
    "xmp beside exif orientation": _with(
        _jpeg(), _segment(0xE1, _exif("MM", _orientation("MM", 3))), _segment(0xE1, XMP)
    ),
    **{f"PIL's exif, orientation {o}": _pil_exif(o) for o in range(1, 9)},
    "fill bytes before markers": _pil_exif(6)[:2] + b"\xff" * 1000 + _pil_exif(6)[2:],
    **{
        f"{order} orientation {o}": _with(
            _jpeg(), _segment(0xE1, _exif(order, MAKE, _orientation(order, o)))
        )
        for order in ("II", "MM")
        for o in (1, 6, 8)
    },
}
# Left to PIL: what it reads its own way, or refuses.
TO_PIL = {
    "xmp orientation alone": _with(_jpeg(), _segment(0xE1, XMP)),
    "xmp beside exif without one": _with(
        _jpeg(), _segment(0xE1, _exif("II", MAKE)), _segment(0xE1, XMP)
    ),
    "two exif blocks": _with(
        _jpeg(),
        _segment(0xE1, _exif("II", MAKE)),
        _segment(0xE1, _exif("II", _orientation("II", 6))),
    ),
    "orientation as a LONG": _with(
        _jpeg(), _segment(0xE1, _exif("II", (0x0112, 4, 1, struct.pack("<I", 6))))
    ),
    "directory cut short": _with(
        _jpeg(), _segment(0xE1, _exif("II", MAKE, _orientation("II", 6), cut=10))
    ),
    "not a TIFF block": _with(_jpeg(), _segment(0xE1, b"Exif\0\0" + b"XX" + b"\0" * 20)),
    "mpo": _encoded("MPO", save_all=True, append_images=[Image.new("RGB", (97, 61), 20)]),
    "junk between segments": _with(_jpeg(), _segment(0xFE, b"a comment") + b"\x00\x17"),
    "png": _encoded("PNG"),
}


@pytest.mark.parametrize("name", list(QUICK))
def test_photos_headers_are_read_without_pil_as_pil_reads_them(name):
    data = QUICK[name]
    quick = _jpeg_header(data)
    assert quick is not None, "read by PIL: the quick reading gave up on an ordinary photo"
    assert quick == _pil_header(data)
    assert read_header(data, 10**8) == quick


def test_a_four_channel_jpeg_is_marked_whichever_reads_it():
    """Pipeline.decode keeps CMYK JPEGs off nvJPEG, which does not convert their colours."""
    cmyk = QUICK["cmyk"]
    quick = _jpeg_header(cmyk)
    assert quick is not None and quick.cmyk and _pil_header(cmyk).cmyk
    assert not any(read_header(QUICK[n], 10**8).cmyk for n in ("plain", "grayscale", "progressive"))


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # PIL's, on the cut directory
@pytest.mark.parametrize("name", list(TO_PIL))
def test_headers_the_quick_reading_cannot_be_sure_of_are_left_to_pil(name):
    data = TO_PIL[name]
    assert _jpeg_header(data) is None
    assert read_header(data, 10**8) == _pil_header(data)


def test_xmp_orientation_is_read_as_pil_reads_it():
    """PIL takes the orientation from the XMP when EXIF has none; so does the daemon."""
    assert read_header(TO_PIL["xmp orientation alone"], 10**8).orientation == 6


@pytest.mark.parametrize("data", [QUICK["plain"], TO_PIL["png"]])
def test_too_many_pixels_is_refused_whichever_reads_the_header(data):
    """GANNET_MAX_IMAGE_PIXELS is the largest width x height accepted: an image of
    exactly that many pixels is read, one with a pixel more than the limit refused."""
    width, height = read_header(data, 10**8).size
    assert read_header(data, width * height).size == (width, height)
    with pytest.raises(PermanentError) as err:
        read_header(data, width * height - 1)
    assert err.value.code is ErrorCode.IMAGE_TOO_LARGE
    assert f"{width}x{height}" in err.value.message


def test_a_jpeg_with_thousands_of_segments_is_refused_without_walking_them_all():
    """A crafted JPEG can pack millions of empty segments within the size limit; walking
    them held the GIL for a second, PIL for five. Past MAX_SEGMENTS it is refused."""
    data = _with(_jpeg(), _segment(0xE5, b"") * (MAX_SEGMENTS + 1))
    with pytest.raises(PermanentError) as err:
        read_header(data, 10**8)
    assert err.value.code is ErrorCode.IMAGE_UNDECODABLE
    assert read_header(_with(_jpeg(), _segment(0xE5, b"") * 100), 10**8).size == (97, 61)


def test_a_progressive_jpeg_of_too_many_scans_is_refused_before_its_decode():
    """Each scan of a progressive JPEG is a pass over the whole image, however few bytes
    it takes: this valid 25 kB file of 694 scans took 0.15 s of CPU to decode here, some
    40 times a 1024x768 photo (one of 48 MP: 8.3 s, image_header.py). Past
    MAX_SCANS it is refused from its header, whichever reader reads it; up to it, read."""
    many = progressive_jpeg(1024, 768, coefficients=63)
    assert simplejpeg.decode_jpeg(many, colorspace="GRAY").shape == (768, 1024, 1)  # valid
    by_pil = _with(many, _segment(0xE1, XMP))  # an XMP orientation: PIL reads the header
    assert _jpeg_header(by_pil) is None  # left to PIL, which reads the header
    for data in (many, by_pil):
        with pytest.raises(PermanentError) as err:
            read_header(data, 10**8)
        assert err.value.code is ErrorCode.IMAGE_UNDECODABLE
        assert "progressive JPEG of 694 scans; the limit is 100" in err.value.message
    assert MAX_SCANS == 100
    at_the_limit = progressive_jpeg(97, 61, coefficients=9)  # 1 + 9 * 11 scans
    assert read_header(at_the_limit, 10**8).size == (97, 61)
    with pytest.raises(PermanentError):
        read_header(progressive_jpeg(97, 61, coefficients=10), 10**8)  # 111 scans
