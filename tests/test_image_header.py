"""An image's header read without PIL for a JPEG: the same format, size and EXIF
orientation PIL gives, or PIL's own answer where the quick reading cannot be sure."""

from __future__ import annotations

import io
import struct
import zlib

import pytest
import simplejpeg
import ultralytics  # noqa: F401 - it patches PIL.Image.open; headers must not care
from conftest import progressive_jpeg
from PIL import Image

from gannet import image_header
from gannet.errors import ErrorCode, PermanentError
from gannet.image_header import (
    FORMATS,
    MAX_EXIF_ENTRIES,
    MAX_EXIF_VALUES,
    MAX_GIF_STEPS,
    MAX_JUNK,
    MAX_PNG_TEXTS,
    MAX_SCANS,
    MAX_SEGMENTS,
    MAX_TIFF_ENTRIES,
    Header,
    _jpeg_header,
    _other_header,
    _pil_header,
    read_header,
)
from gannet.pipeline import decode_image


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


@pytest.mark.parametrize("data", [QUICK["plain"], _encoded("PNG")])
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
    MAX_SCANS it is refused from its header, also where PIL is to read that; up to it, read."""
    many = progressive_jpeg(1024, 768, coefficients=63)
    assert simplejpeg.decode_jpeg(many, colorspace="GRAY").shape == (768, 1024, 1)  # valid
    by_pil = _with(many, _segment(0xE1, XMP))  # an XMP orientation: PIL reads the header
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


def _tiff_big_endian(width: int, height: int) -> bytes:
    """A grey TIFF written big-endian (PIL writes little-endian only): width a SHORT,
    height a LONG, one strip."""
    entries = [(256, 3, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1)]
    entries += [(273, 4, 8), (277, 3, 1), (278, 4, height), (279, 4, width * height)]
    pixels = bytes([90]) * (width * height)
    ifd = struct.pack(">H", len(entries))
    for tag, kind, value in entries:
        ifd += struct.pack(">HHI", tag, kind, 1)
        ifd += struct.pack(">HH", value, 0) if kind == 3 else struct.pack(">I", value)
    return b"MM\0*" + struct.pack(">I", 8 + len(pixels)) + pixels + ifd + b"\0\0\0\0"


OTHERS = {
    "png": _encoded("PNG"),
    "png grey 16-bit": _encoded("PNG", "I;16"),
    "png with exif": _encoded("PNG", exif=Image.Exif().tobytes()),
    "gif": _encoded("GIF", "P"),
    "tiff": _encoded("TIFF"),
    "tiff lzw": _encoded("TIFF", compression="tiff_lzw"),
    "tiff cmyk": _encoded("TIFF", "CMYK"),
    "bigtiff": _encoded("TIFF", big_tiff=True),
    "tiff big-endian": _tiff_big_endian(97, 61),
    "webp": _encoded("WEBP"),
    "webp lossless": _encoded("WEBP", lossless=True),
    "webp with alpha": _encoded("WEBP", "RGBA"),
    "webp with exif": _encoded("WEBP", exif=Image.Exif().tobytes()),
    "webp animated": _encoded("WEBP", save_all=True, append_images=[Image.new("RGB", (97, 61))]),
}


def _pil_reading(data: bytes) -> Header:
    """PIL's own header of any format, for comparison."""
    image = Image.open(io.BytesIO(data))
    return Header(image.format or "", image.size, 1, image.mode == "CMYK")


@pytest.mark.parametrize("name", list(OTHERS))
def test_png_gif_tiff_and_webp_headers_are_read_without_pil_as_pil_reads_them(name, monkeypatch):
    data = OTHERS[name]
    expected = _pil_reading(data)
    assert expected.size == (97, 61)
    monkeypatch.setattr(image_header, "pil_open", lambda: pytest.fail("PIL read it"))
    assert _other_header(data) == expected
    assert read_header(data, 10**8) == expected


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_a_png_of_many_chunks_is_read_from_its_first_and_decoded_in_c():
    """PIL walks a PNG's chunks in Python up to its pixels: a 24 MB PNG of two million
    empty chunks before them held the GIL 5.6 s in PIL's open, a task's header taking as
    long as 250 photos' whole work; OpenCV decodes the same file in 0.15 s. Here the size
    comes from the first chunk (IHDR, first by PNG's spec), and PIL never sees it."""
    plain = OTHERS["png"]
    ihdr_end = 8 + 25  # signature, then IHDR: length, type, 13 bytes, CRC
    many = plain[:ihdr_end] + _png_chunk(b"zzZz", b"") * 100_000 + plain[ihdr_end:]
    assert read_header(many, 10**8) == Header("PNG", (97, 61), 1)
    assert decode_image(many, 10**8).shape == (61, 97, 3)
    no_ihdr = plain[:8] + _png_chunk(b"zzZz", b"") + plain[8:]
    with pytest.raises(PermanentError, match="a PNG without its IHDR chunk"):
        read_header(no_ihdr, 10**8)


def test_a_webp_of_many_frames_is_read_from_its_first_chunk(monkeypatch):
    """PIL's open hands a WebP to libwebp's animation decoder, which indexes every frame
    holding the GIL: 80-105 ms for 23 MB of 480,000 frames. Its size is in its first
    chunk; OpenCV decodes the first frame, releasing the GIL."""
    frames = [Image.new("RGB", (16, 16), (i, 0, 0)) for i in range(200)]
    out = io.BytesIO()
    frames[0].save(out, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    many = out.getvalue()
    monkeypatch.setattr(image_header, "pil_open", lambda: pytest.fail("PIL read it"))
    assert read_header(many, 10**8) == Header("WEBP", (16, 16), 1)
    assert decode_image(many, 10**8).shape == (16, 16, 3)
    for cut in (b"RIFF\0\0\0\0WEBP", many[:24]):
        with pytest.raises(PermanentError, match="a WebP without its image header"):
            read_header(cut, 10**8)


def test_a_png_of_many_compressed_texts_is_refused_before_libpng_inflates_them():
    """libpng inflates every zTXt and iTXt chunk OpenCV's decode meets, up to 8 MB each
    and a thousand of them: a 16x16 PNG of 2000 chunks of 4 kB, each 4 MB of text, took
    19.7 s of CPU. Past MAX_PNG_TEXTS the PNG is refused from its header, wherever the
    chunks are; within it, read and decoded as before."""
    plain = OTHERS["png"]
    ihdr_end = 8 + 25
    text = _png_chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * 100_000))
    itxt = _png_chunk(b"iTXt", b"k\0\1\0\0\0" + zlib.compress(b"a" * 100_000))
    within = plain[:ihdr_end] + text * (MAX_PNG_TEXTS - 1) + plain[ihdr_end:-12] + itxt
    within += plain[-12:]
    assert read_header(within, 10**8) == Header("PNG", (97, 61), 1)
    assert decode_image(within, 10**8).shape == (61, 97, 3)
    after = within[:-12] + itxt + within[-12:]  # one more, after the pixels
    with pytest.raises(PermanentError, match=f"{MAX_PNG_TEXTS + 1} compressed text chunks"):
        read_header(after, 10**8)
    # Past the chunks walked one by one, the rest is searched for them.
    empty = _png_chunk(b"zzZz", b"") * 5000
    behind = plain[:ihdr_end] + empty + text * (MAX_PNG_TEXTS + 1) + plain[ihdr_end:]
    with pytest.raises(PermanentError, match=f"{MAX_PNG_TEXTS + 1} compressed text chunks"):
        read_header(behind, 10**8)


def _tiff_entries(count: int, big: bool) -> bytes:
    """A 16x16 grey TIFF (BigTIFF with `big`) whose first directory holds `count`
    entries: the nine it needs, then private tags."""
    pixels = bytes(256)
    offset = (16 if big else 8) + len(pixels)  # the directory, after the pixels
    needed = [(256, 16), (257, 16), (258, 8), (259, 1), (262, 1), (273, 16 if big else 8)]
    needed += [(277, 1), (278, 16), (279, 256)]
    entries = needed + [(50000 + i % 10000, 0) for i in range(count - len(needed))]
    if big:
        head = b"II+\0" + struct.pack("<HHQ", 8, 0, offset)
        ifd = struct.pack("<Q", count) + b"".join(
            struct.pack("<HHQQ", t, 4, 1, v) for t, v in entries
        )
        return head + pixels + ifd + struct.pack("<Q", 0)
    head = b"II*\0" + struct.pack("<I", offset)
    ifd = struct.pack("<H", count) + b"".join(struct.pack("<HHII", t, 4, 1, v) for t, v in entries)
    return head + pixels + ifd + struct.pack("<I", 0)


@pytest.mark.parametrize("big", [False, True], ids=["tiff", "bigtiff"])
def test_a_tiff_of_too_many_entries_is_refused_from_its_count(big):
    """PIL reads a TIFF's first directory entry by entry in Python, and a BigTIFF's
    holds as many as fit in the file (24 MB: 1.2 million, 0.84 s of GIL in PIL's open).
    A photo's has a few dozen: past MAX_TIFF_ENTRIES it is refused from its count."""
    at_the_limit = _tiff_entries(MAX_TIFF_ENTRIES, big)
    assert read_header(at_the_limit, 10**8) == _pil_reading(at_the_limit)
    with pytest.raises(PermanentError) as err:
        read_header(_tiff_entries(MAX_TIFF_ENTRIES + 1, big), 10**8)
    assert err.value.code is ErrorCode.IMAGE_UNDECODABLE
    assert f"{MAX_TIFF_ENTRIES + 1} entries; the limit is {MAX_TIFF_ENTRIES}" in err.value.message


def test_a_tiff_of_a_million_strips_is_read_without_pil(monkeypatch):
    """PIL makes one tile per strip when it opens a TIFF, in Python: a 24 MB TIFF of
    three million one-row strips held the GIL 5.6 s. Its size is in two entries."""
    rows = 1_000_000
    strips = 8 + 12 * 9 + 6  # the directory first, then the strips' offsets and sizes
    entries = [(256, 3, 1, 16), (257, 4, 1, rows), (258, 3, 1, 8), (259, 3, 1, 1)]
    entries += [(262, 3, 1, 1), (273, 4, rows, strips), (277, 3, 1, 1), (278, 4, 1, 1)]
    entries += [(279, 4, rows, strips + 4 * rows)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries)
    data = b"II*\0" + struct.pack("<I", 8) + ifd + bytes(4)
    data += struct.pack(f"<{rows}I", *([0] * rows)) + struct.pack(f"<{rows}I", *([16] * rows))
    monkeypatch.setattr(image_header, "pil_open", lambda: pytest.fail("PIL read it"))
    assert read_header(data, 10**8) == Header("TIFF", (16, rows), 1)


def test_a_jpeg_left_to_pil_is_walked_first_for_its_segments_and_junk():
    """The quick reading leaves an MPO (its MPF segment) to PIL, and it stopped walking
    there: PIL then walked two million empty segments after the MPF in 2.8 s. It walks
    on now, and past MAX_SEGMENTS the file is refused; junk between segments, which PIL
    skips a byte at a time in Python, past MAX_JUNK bytes."""
    mpf = _segment(0xE2, b"MPF\0")
    with pytest.raises(PermanentError, match=f"more than {MAX_SEGMENTS} segments"):
        read_header(_with(_jpeg(), mpf, _segment(0xE5, b"") * (MAX_SEGMENTS + 1)), 10**8)
    junk = _segment(0xFE, b"a comment") + b"\x00" * (MAX_JUNK + 1)
    with pytest.raises(PermanentError, match=f"more than {MAX_JUNK} bytes of junk"):
        read_header(_with(_jpeg(), junk), 10**8)
    escaped = _segment(0xFE, b"a comment") + b"\xff\x00" * (MAX_JUNK // 2 + 1)
    with pytest.raises(PermanentError, match="bytes of junk"):
        read_header(_with(_jpeg(), escaped), 10**8)
    some_junk = _with(_jpeg(), _segment(0xFE, b"a comment") + b"\x00" * 1000)
    assert _jpeg_header(some_junk) is None  # PIL reads it, as it did
    assert read_header(some_junk, 10**8) == _pil_header(some_junk)


def _long_exif(values: int, tag: int = 0x011A, entries: int = 0) -> bytes:
    """A little-endian TIFF block: `values` RATIONALs of `tag` (72/1 each) after its
    directory, and `entries` more SHORT entries before it (ResolutionUnit, ...)."""
    shorts = [(0x0128 + i, 3, 1, _short("II", 2)) for i in range(entries)]
    listed = sorted([(tag, 5, values, b""), *shorts])
    data = 8 + 2 + 12 * len(listed) + 4
    table = b"".join(
        struct.pack("<HHI", t, k, n) + (struct.pack("<I", data) if k == 5 else v)
        for t, k, n, v in listed
    )
    return (
        b"II*\0"
        + struct.pack("<IH", 8, len(listed))
        + table
        + bytes(4)
        + (struct.pack("<II", 72, 1) * values)
    )


def _exif_blocks(tiff: bytes) -> list[bytes]:
    """A TIFF block as APP1 segments of 64 KB, which PIL joins into one EXIF."""
    step = 65533 - 6
    return [_segment(0xE1, b"Exif\0\0" + tiff[i : i + step]) for i in range(0, len(tiff), step)]


@pytest.mark.parametrize("tag", [0x011A, 0x0112], ids=["xresolution", "orientation"])
def test_a_jpeg_whose_exif_pil_would_read_for_seconds_is_refused_before_pil(tag, monkeypatch):
    """PIL reads a JPEG's EXIF in Python when it opens it (its resolution, where JFIF
    gives none) and a RATIONAL value item by item: 2.5 million of them in 20 MB of EXIF
    blocks (PIL joins them) held the GIL 9.2 s. The walk checks what PIL would read."""
    data = _with(_jpeg(), *_exif_blocks(_long_exif(30_000, tag)))  # 240 kB, 4 blocks
    monkeypatch.setattr(image_header, "pil_open", lambda: pytest.fail("PIL read it"))
    with pytest.raises(PermanentError) as err:
        read_header(data, 10**8)
    assert err.value.code is ErrorCode.IMAGE_UNDECODABLE
    assert f"30000 numeric values in its first directory; the limit is {MAX_EXIF_VALUES}" in (
        err.value.message
    )
    # One block PIL need not read (the orientation is the walk's) is not refused.
    blocks = _exif_blocks(_long_exif(1, entries=MAX_EXIF_ENTRIES))
    assert _jpeg_header(_with(_jpeg(), *blocks)) == Header("JPEG", (97, 61), 1)
    many = _with(_jpeg(), *blocks, _segment(0xE1, _exif("II", MAKE)))  # PIL's to read
    with pytest.raises(PermanentError, match=f"{MAX_EXIF_ENTRIES + 1} entries"):
        read_header(many, 10**8)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's, on a count it finds odd
def test_an_exif_within_the_bounds_is_read_as_pil_reads_it():
    """At the bounds, the JPEG left to PIL (two EXIF blocks) is PIL's answer."""
    at_the_limit = _long_exif(MAX_EXIF_VALUES - MAX_EXIF_ENTRIES + 1, entries=MAX_EXIF_ENTRIES - 1)
    data = _with(_jpeg(), *_exif_blocks(at_the_limit), _segment(0xE1, _exif("II", MAKE)))
    assert _jpeg_header(data) is None
    assert read_header(data, 10**8) == _pil_reading(data) == Header("JPEG", (97, 61), 1)


def test_an_avif_whose_exif_pil_would_read_for_seconds_is_refused_before_pil(monkeypatch):
    """PIL's open parses an AVIF's EXIF for its orientation, the same way: 2.5 million
    RATIONALs as the orientation held the GIL 7.0 s. libavif hands the EXIF over (C)."""
    data = _encoded("AVIF", exif=_long_exif(30_000))
    monkeypatch.setattr(image_header, "pil_open", lambda: pytest.fail("PIL read it"))
    with pytest.raises(PermanentError, match="AVIF's EXIF holds 30000 numeric values"):
        read_header(data, 10**8)
    monkeypatch.undo()
    plain = _encoded("AVIF", exif=_long_exif(6))
    assert read_header(plain, 10**8) == _pil_reading(plain) == Header("AVIF", (97, 61), 1)
    no_item = plain.replace(b"pitm", b"pitx")  # libavif: RuntimeError, no primary item
    with pytest.raises(PermanentError, match="not a decodable image"):
        read_header(no_item, 10**8)


def test_a_gifs_size_is_pils_and_its_walk_to_the_first_image_bounded(monkeypatch):
    """PIL decodes GIFs (pipeline._decode_gif), so their header is PIL's: the logical
    screen grown to the first image's extent, found by PIL's walk, which goes a block or
    a stray byte at a time in Python: past MAX_GIF_STEPS of them the file is refused."""
    plain = OTHERS["gif"]
    descriptor = plain.index(b",\0\0\0\0")  # the first image, at 0, 0
    wider = bytearray(plain)
    wider[descriptor + 1 : descriptor + 3] = struct.pack("<H", 50)  # its left: 50
    assert _other_header(bytes(wider)) == _pil_reading(bytes(wider)) == Header("GIF", (147, 61), 1)
    monkeypatch.setattr(image_header, "pil_open", lambda: pytest.fail("PIL read it"))
    comment = b"!\xfe" + b"\x01x" * MAX_GIF_STEPS + b"\0"  # a comment of single bytes
    with pytest.raises(PermanentError, match=f"more than {MAX_GIF_STEPS} blocks"):
        read_header(plain[:descriptor] + comment + plain[descriptor:], 10**8)
    with pytest.raises(PermanentError, match=f"more than {MAX_GIF_STEPS} blocks"):
        read_header(plain[:descriptor] + b"\x07" * (MAX_GIF_STEPS + 1) + plain[descriptor:], 10**8)
    with pytest.raises(PermanentError, match="a GIF without an image"):
        read_header(plain[:descriptor] + b";", 10**8)


@pytest.mark.parametrize("tiff", [b"II*\0", b"II+\0" + bytes(12)], ids=["cut", "bigtiff"])
def test_an_exif_too_short_for_pil_is_decoded_by_opencv_not_retried(tiff):
    """An EXIF block of a bare TIFF signature (or a BigTIFF's 8-byte header): PIL's
    EXIF reader raised struct.error, which left read_header as no PermanentError: the
    task was nacked and retried until the dead-letter policy took it, without a reason.
    PIL's own JPEG open swallows it, except where JFIF gives the resolution. Now the
    EXIF is unreadable, as any other, and OpenCV decodes the image."""
    data = _with(_jpeg(dpi=(300, 300)), _segment(0xE1, b"Exif\0\0" + tiff))
    assert read_header(data, 10**8) == Header("JPEG", (97, 61), None)
    assert decode_image(data, 10**8).shape == (61, 97, 3)


def _bmp(bits: int, colors: int) -> bytes:
    """A 16x16 BMP of `bits`-bit pixels (1, 4 or 8) whose header says `colors` colours,
    all of them in its palette."""
    palette = b"\x01\x02\x03\x00" * (colors or 1 << bits)
    pixels = bytes(((16 * bits // 8 + 3) & ~3) * 16)
    info = struct.pack("<IiiHHIIiiII", 40, 16, 16, 1, bits, 0, len(pixels), 0, 0, colors, 0)
    start = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", start + len(pixels), 0, 0, start) + info + palette + pixels


def test_a_bmp_of_a_palette_larger_than_its_pixels_index_is_refused_before_pil(monkeypatch):
    """PIL's open walks a BMP's palette in Python, up to 65,536 entries however few its
    pixels can index: 23 ms of GIL for a 16x16 file. Past 2**bits colours it is refused."""
    for bits, colors in ((8, 0), (8, 256), (4, 16), (1, 2)):
        data = _bmp(bits, colors)
        assert read_header(data, 10**8) == _pil_reading(data) == Header("BMP", (16, 16), 1)
    monkeypatch.setattr(image_header, "pil_open", lambda: pytest.fail("PIL read it"))
    with pytest.raises(PermanentError, match="8-bit pixels with a palette of 65536 colours"):
        read_header(_bmp(8, 65536), 10**8)
    with pytest.raises(PermanentError, match="4-bit pixels with a palette of 17 colours"):
        read_header(_bmp(4, 17), 10**8)


@pytest.mark.parametrize("kind", ["PPM", "JPEG2000", "ICO", "TGA", "PSD"])
def test_formats_not_taken_are_refused_by_name_before_any_plugin_reads_them(kind):
    """OpenCV decodes none of PIL's other formats but JPEG 2000 and PPM, whose headers
    PIL walks in Python (boxes, comments): a task's image is never handed to them."""
    data = _pil_saved(kind) if kind != "PSD" else b"8BPS\0\1" + bytes(40)
    with pytest.raises(PermanentError) as err:
        read_header(data, 10**8)
    assert err.value.code is ErrorCode.IMAGE_UNDECODABLE
    assert f"not an image of a format taken here ({FORMATS})" in err.value.message


def _pil_saved(kind: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (97, 61), 90).save(out, kind)
    return out.getvalue()
