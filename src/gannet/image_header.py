"""An image's header: its format, size and EXIF orientation, read before any pixel is
decoded, so that an oversized image is refused first and a JPEG's reduced scale chosen.

Why a JPEG's header is not read with PIL: `Image.open` parses every marker segment in
Python and builds an image object, and `getexif` a TIFF directory: 21 µs for a plain
4032x3024 JPEG and 42 µs with EXIF on this machine, in the daemon about 5 % of all the
time a thread held the GIL (docs/benchmark.md, "The image header without PIL"). Here
libjpeg-turbo reads the size (simplejpeg, about 1 µs) and a walk over the segments
before the scan finds the EXIF orientation.

That walk answers only where its answer is PIL's, and hands the photo to PIL otherwise:
no EXIF or one EXIF block whose first directory holds the orientation as one SHORT, no
second EXIF block (PIL joins them), no XMP orientation to fall back on, no MPO (PIL
calls those MPO, and they decode as before), nothing past PIL's decompression-bomb
limit. tests/test_image_header.py holds both readers to the same answers.

Either way, a progressive JPEG's scans are counted before any pixel is decoded (MAX_SCANS).
"""

from __future__ import annotations

import io
import logging
import re
import struct
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image

from gannet.errors import ErrorCode, PermanentError

log = logging.getLogger(__name__)

ORIENTATION = 0x0112  # the EXIF tag


@dataclass(frozen=True, slots=True)
class Header:
    format: str  # PIL's name for it: "JPEG", "PNG", "MPO", ...
    size: tuple[int, int]  # width, height as stored, before any EXIF turn
    # The EXIF orientation of a JPEG (1, upright, when it has none); None when its EXIF
    # cannot be read, so that OpenCV decodes it and reads the EXIF its own way. An AVIF's
    # turn (its irot and imir boxes, which PIL reads as an orientation): OpenCV does not
    # apply it. Other formats: 1, since OpenCV turns them per their EXIF itself.
    orientation: int | None
    # A JPEG of four colour channels (CMYK or YCCK), whose colours nvJPEG does not
    # convert as torchvision calls it: it is decoded on the CPU (Pipeline.decode).
    cmyk: bool = False


def read_header(data: bytes, max_pixels: int) -> Header:
    """The image's header, or PermanentError when it is no image or has more than
    `max_pixels` pixels: refused before any pixel is decoded."""
    header = _jpeg_header(data) or _pil_header(data)
    width, height = header.size
    if width * height > max_pixels:
        raise PermanentError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"image is {width}x{height} pixels; the limit is {max_pixels} pixels",
        )
    return header


def _jpeg_header(data: bytes) -> Header | None:
    """A JPEG's header as PIL would read it, or None where only PIL can tell."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # PIL says what is wrong with it, as before
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        return None  # PIL's own refusal, in its words
    orientation, sof = _orientation_in_segments(data)
    if orientation is None:
        return None
    if sof in _PROGRESSIVE:
        _check_scans(data)
    return Header("JPEG", (width, height), orientation, colorspace in ("CMYK", "YCCK"))


# Start-of-frame markers of a progressive JPEG: Huffman or arithmetic coded, and their
# differential forms.
_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# Each scan of a progressive JPEG is a pass over every block of its components however
# few bytes it takes (a run of empty blocks is coded in a few bits), and a valid file may
# hold some two thousand (libjpeg-turbo's report "Two Issues with the JPEG Standard",
# LJT-01-003). Measured here: a 207 kB 8000x6000 JPEG of 694 scans took 8.3 s of CPU to
# decode at the reduced scale a 640 model input takes (a baseline 12 MP photo: 0.04 s),
# a 25 kB 1024x768 one 0.15 s. Encoders write about ten (libjpeg's and PIL's progression:
# 10, mozjpeg's about as many); NVIDIA's nvImageCodec refuses more than 256 by default,
# DALI more than 500. Here 100: about 1.2 s at 48 MP, by the figure above.
MAX_SCANS = 100


def _check_scans(data: bytes) -> None:
    """Refuse a progressive JPEG of more than MAX_SCANS scans, before its decode.

    Every start-of-scan marker counts, an embedded thumbnail's too (a few at most): in
    the coded data a 0xFF byte is always followed by 0x00 or a restart marker, so the
    bytes FF DA there are a scan's start. Counted in NumPy: 1.3 ms for a 3.4 MB file
    (bytes.count took 4.5), 1 % of its decode, paid by progressive JPEGs alone (phones
    and cameras write baseline ones)."""
    codes = np.frombuffer(data, np.uint8)
    after_ff = np.flatnonzero(codes[:-1] == 0xFF) + 1
    scans = int(np.count_nonzero(codes[after_ff] == 0xDA))
    if scans > MAX_SCANS:
        raise PermanentError(
            ErrorCode.IMAGE_UNDECODABLE,
            f"a progressive JPEG of {scans} scans; the limit is {MAX_SCANS} (each scan is "
            "a pass over the whole image: so many could take seconds of CPU to decode; "
            "encoders write about 10; re-encode it, e.g. as a baseline JPEG)",
        )


_ABSENT = -1  # no orientation tag
_FILL = re.compile(rb"\xff+")  # fill bytes, which may precede any marker
# Real photos have a few dozen segments before the scan (a depth map in extended XMP,
# some 30 more). A crafted file can hold millions within the size limit: walking them
# held the GIL for a second (PIL took 5), so past this many the file is refused.
MAX_SEGMENTS = 4096


def _orientation_in_segments(data: bytes) -> tuple[int | None, int | None]:
    """The orientation in the segments before the scan, None where PIL must decide; and
    the start-of-frame marker met on the way (None before one)."""
    exif: memoryview | None = None
    xmp = False
    sof: int | None = None
    at, end, segments = 2, len(data), 0
    while at + 4 <= end:
        if data[at] != 0xFF:
            return None, sof  # junk where a marker should be
        marker = data[at + 1]
        if marker == 0xFF:  # fill bytes: to the last of them, in one step
            at = _FILL.match(data, at).end() - 1  # type: ignore[union-attr]
            continue
        segments += 1
        if segments > MAX_SEGMENTS:
            raise PermanentError(
                ErrorCode.IMAGE_UNDECODABLE,
                f"the JPEG has more than {MAX_SEGMENTS} segments before its image data",
            )
        if marker < 0xC0:
            return None, sof  # PIL finds no marker here
        if marker == 0xDA:  # start of scan: the header's segments are behind
            break
        if 0xD0 <= marker <= 0xD8:  # restart markers and SOI: no length
            at += 2
            continue
        length = (data[at + 2] << 8) | data[at + 3]
        if length < 2:
            return None, sof
        stop, body = at + 2 + length, at + 4
        sof = marker if marker in _SOF else sof
        if marker == 0xE1 and data.startswith(b"Exif\0\0", body, stop):
            if exif is not None:
                return None, sof  # a second EXIF block, which PIL appends to the first
            exif = memoryview(data)[body + 6 : stop]
        elif marker == 0xE1 and data.startswith(b"http://ns.adobe.com/xap/1.0/\0", body, stop):
            xmp = True
        elif marker == 0xE2 and data.startswith(b"MPF\0", body, stop):
            return None, sof  # PIL opens it as an MPO
        elif marker in _SOF and not (stop <= end and length >= 8 and _pil_takes(data, body)):
            return None, marker  # PIL refuses all but 8-bit samples in 1, 3 or 4 channels
        at = stop
    else:
        return None, sof  # the header ends before the scan
    found = _ABSENT if exif is None else _ifd0_orientation(exif)
    if found is None or (found == _ABSENT and xmp):
        return None, sof  # unreadable, or PIL would look for it in the XMP
    return (1 if found == _ABSENT else found), sof


def _pil_takes(data: bytes, sof: int) -> bool:
    return data[sof] == 8 and data[sof + 5] in (1, 3, 4)


# Start-of-frame markers: baseline, extended, progressive, lossless, arithmetic.
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _ifd0_orientation(tiff: memoryview) -> int | None:
    """The orientation SHORT in a TIFF block's first directory (_ABSENT without one);
    None for anything else, which PIL may read otherwise or not at all."""
    order = {b"II*\0": "<", b"MM\0*": ">"}.get(tiff[:4].tobytes())
    if order is None:
        return None
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
        for entry in range(ifd + 2, ifd + 2 + 12 * count, 12):
            tag, kind, n, value = struct.unpack_from(order + "HHIH", tiff, entry)
            if tag == ORIENTATION:
                return value if kind == 3 and n == 1 else None
    except struct.error:
        return None  # a directory cut short: PIL keeps what it read before the cut
    return _ABSENT


def _pil_open() -> Callable[..., Image.Image]:
    """PIL's own Image.open. Importing ultralytics replaces it with a version that, on
    bytes PIL cannot identify, tries to install and import pi-heif: decoding untrusted
    uploads must fail as undecodable instead, and must never install anything."""
    patches = sys.modules.get("ultralytics.utils.patches")
    return getattr(patches, "_image_open", Image.open)


def _pil_header(data: bytes) -> Header:
    """Any image PIL opens (lazily: no pixels decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _pil_open()(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PermanentError(ErrorCode.IMAGE_TOO_LARGE, str(exc)) from exc
    except Exception as exc:
        # PIL's format plugins raise what they like on crafted files: UnidentifiedImageError,
        # OSError, SyntaxError, ValueError, and NotImplementedError or AttributeError from
        # some. None of it is worth a retry.
        raise PermanentError(
            ErrorCode.IMAGE_UNDECODABLE, f"not a decodable image ({exc.__class__.__name__})"
        ) from exc
    if image.format in ("JPEG", "MPO") and image.info.get("progressive"):
        _check_scans(data)
    orientation: int | None = 1
    if image.format in ("JPEG", "AVIF"):
        try:
            orientation = int(image.getexif().get(ORIENTATION, 1))
        except (SyntaxError, ValueError, TypeError, OSError) as exc:
            log.debug("unreadable EXIF (%s); decoding with OpenCV", exc)
            orientation = None
    return Header(image.format or "", image.size, orientation, image.mode == "CMYK")
