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
limit. tests/test_image_header.py holds both readers to the same answers. The walk
goes on to the scan where PIL is to decide, so that what PIL then walks in Python is
bounded too (MAX_SEGMENTS, MAX_JUNK); either way, a progressive JPEG's scans are counted
before any pixel is decoded (MAX_SCANS).

Why PNG, GIF, TIFF and WebP headers are not read with PIL either: PIL walks their
chunks, blocks or strips in Python when it opens them, seconds of GIL for a crafted file
within the size limit (_other_header), and a WebP's frames in C holding the GIL. Their
size is a few bytes in. PIL reads the rest of the
formats taken here (FORMATS), and no other: a task's image is never handed to the
forty-odd other plugins PIL has.

Where PIL is to read an EXIF block (a JPEG's the walk leaves to it, any AVIF's), the
block's first directory is checked first (check_exif): PIL reads it in Python, a
RATIONAL array an item at a time.
"""

from __future__ import annotations

import io
import logging
import re
import struct
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import simplejpeg
from PIL import AvifImagePlugin, Image, UnidentifiedImageError

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
    # A lossless JPEG (process 14: SOF3, 7, 11 or 15), which libjpeg-turbo decodes at
    # full size only: asked through simplejpeg for a reduced scale, it wrote the
    # full-size rows into the smaller buffer simplejpeg had sized (a heap overflow: the
    # process died, "double free or corruption"). Decoded at full size (reduced_factor).
    lossless: bool = False


def read_header(data: bytes, max_pixels: int) -> Header:
    """The image's header, or PermanentError when it is no image or has more than
    `max_pixels` pixels: refused before any pixel is decoded."""
    header = _jpeg_header(data) or _other_header(data) or _pil_header(data)
    width, height = header.size
    if width * height > max_pixels:
        raise PermanentError(
            ErrorCode.IMAGE_TOO_LARGE,
            f"image is {width}x{height} pixels; the limit is {max_pixels} pixels",
        )
    return header


def _jpeg_header(data: bytes) -> Header | None:
    """A JPEG's header as PIL would read it, or None where only PIL can tell. The walk
    over its segments comes first, whoever reads the rest: it bounds what PIL walks."""
    if not data.startswith(b"\xff\xd8\xff"):
        return None
    orientation, sof = _orientation_in_segments(data)
    if sof in _PROGRESSIVE:
        _check_scans(data)
    if sof in _LOSSLESS:  # rare: whoever reads it, the header says so
        return replace(_quick_jpeg(data, orientation) or _pil_header(data), lossless=True)
    return _quick_jpeg(data, orientation)


def _quick_jpeg(data: bytes, orientation: int | None) -> Header | None:
    """The JPEG's size by libjpeg-turbo and the orientation the walk found, or None
    where only PIL can tell."""
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None  # PIL says what is wrong with it, as before
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        return None  # PIL's own refusal, in its words
    if orientation is None:
        return None
    return Header("JPEG", (width, height), orientation, colorspace in ("CMYK", "YCCK"))


# Start-of-frame markers of a progressive JPEG: Huffman or arithmetic coded, and their
# differential forms.
_PROGRESSIVE = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
# Start-of-frame markers of a lossless JPEG: Huffman or arithmetic coded, and their
# differential forms.
_LOSSLESS = frozenset({0xC3, 0xC7, 0xCB, 0xCF})
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
# held the GIL for a second (PIL took 5), so past this many the file is refused, also
# where PIL is to read the header (an MPF segment first: PIL walked two million empty
# segments after it in 2.8 s).
MAX_SEGMENTS = 4096
# Bytes that are no marker between segments, which PIL skips one at a time in Python
# (0.06 s a MB, 0.14 s a MB of FF 00 pairs): past this many, refused.
MAX_JUNK = 65536


def _orientation_in_segments(data: bytes) -> tuple[int | None, int | None]:
    """The orientation in the segments before the scan, None where PIL must decide; and
    the start-of-frame marker met on the way (None before one).

    The walk goes on to the scan where PIL decides, so that what PIL then walks (in
    Python) is bounded: MAX_SEGMENTS segments, MAX_JUNK bytes of junk."""
    exif: list[memoryview] = []  # PIL appends a second block to the first
    xmp = to_pil = False
    sof: int | None = None
    at, end, segments, junk = 2, len(data), 0, 0
    while at + 4 <= end:
        marker = data[at + 1]
        if data[at] != 0xFF or marker < 0xC0:  # junk (FF 00 too) where a marker should be
            skip_to = data.find(b"\xff", at + 1)
            skip_to = end if skip_to < 0 else skip_to
            junk, at, to_pil = junk + skip_to - at, skip_to, True
            if junk > MAX_JUNK:
                raise PermanentError(
                    ErrorCode.IMAGE_UNDECODABLE,
                    f"the JPEG has more than {MAX_JUNK} bytes of junk between its segments",
                )
            continue
        if marker == 0xFF:  # fill bytes: to the last of them, in one step
            at = _FILL.match(data, at).end() - 1  # type: ignore[union-attr]
            continue
        segments += 1
        if segments > MAX_SEGMENTS:
            raise PermanentError(
                ErrorCode.IMAGE_UNDECODABLE,
                f"the JPEG has more than {MAX_SEGMENTS} segments before its image data",
            )
        if marker == 0xDA:  # start of scan: the header's segments are behind
            break
        if 0xD0 <= marker <= 0xD8:  # restart markers and SOI: no length
            at += 2
            continue
        length = (data[at + 2] << 8) | data[at + 3]
        if length < 2:
            return None, sof  # PIL refuses it at once
        stop, body = at + 2 + length, at + 4
        sof = marker if marker in _SOF else sof
        if marker == 0xE1 and data.startswith(b"Exif\0\0", body, stop):
            exif.append(memoryview(data)[body + 6 : stop])
        elif marker == 0xE1 and data.startswith(b"http://ns.adobe.com/xap/1.0/\0", body, stop):
            xmp = True
        elif marker == 0xE2 and data.startswith(b"MPF\0", body, stop):
            to_pil = True  # PIL opens it as an MPO
        elif marker in _SOF and not (stop <= end and length >= 8 and _pil_takes(data, body)):
            return None, marker  # PIL refuses all but 8-bit samples in 1, 3 or 4 channels
        at = stop
    else:
        return None, sof  # the header ends before the scan
    return _orientation_of(exif, to_pil, xmp), sof


def _orientation_of(exif: list[memoryview], to_pil: bool, xmp: bool) -> int | None:
    """The orientation in the EXIF blocks the walk found, or None where PIL must decide
    (and then reads them: check_exif first)."""
    found = _ABSENT if not exif else _ifd0_orientation(exif[0])
    if to_pil or len(exif) > 1 or found is None or (found == _ABSENT and xmp):
        if exif:
            check_exif(b"".join(exif) if len(exif) > 1 else exif[0], "JPEG")
        return None  # unreadable, or PIL would look for it in the XMP
    return 1 if found == _ABSENT else found


# PIL reads an EXIF block's first directory in Python, entry by entry, and a value of
# RATIONAL or SRATIONAL type item by item (an IFDRational each, 3.7 us): a JPEG of
# 2.5 million XResolution rationals in 20 MB of EXIF held the GIL 9.2 s in PIL's open
# (which reads the resolution where JFIF gives none), an AVIF's orientation as many
# 7.0 s; 65,535 entries, 0.14 s. PIL reads the EXIF of a JPEG it opens and of every
# AVIF, and an AVIF's whole directory again, every value, where its irot box turns it.
# A photo's first directory holds a dozen entries and a few dozen values (a transfer
# function, the largest standard one, 768 SHORTs); past these bounds it is refused.
MAX_EXIF_ENTRIES = 256
MAX_EXIF_VALUES = 1024  # items of the numeric types, all entries together
# What PIL reads as bytes in C: BYTE, ASCII, UNDEFINED. Unknown types it skips.
_EXIF_NUMERIC = frozenset({3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 16})


def check_exif(tiff: bytes | memoryview, image: str) -> None:
    """Refuse an EXIF block whose first directory PIL would read for long (more than
    MAX_EXIF_ENTRIES entries or MAX_EXIF_VALUES numeric items); one PIL reads nothing
    from passes. `tiff`: the block as PIL reads it, its "Exif" prefixes and all."""
    while tiff[:6] == b"Exif\0\0":  # PIL strips as many as there are
        tiff = tiff[6:]
    order = {b"II": "<", b"MM": ">"}.get(bytes(tiff[:2]))
    if order is None or bytes(tiff[2:4]) not in (b"*\0", b"\0*"):
        return  # no directory PIL reads (a BigTIFF header fails its EXIF reader)
    try:
        (ifd,) = struct.unpack_from(order + "I", tiff, 4)
        (count,) = struct.unpack_from(order + "H", tiff, ifd)
    except struct.error:
        return
    if count > MAX_EXIF_ENTRIES:
        raise PermanentError(
            ErrorCode.IMAGE_UNDECODABLE,
            f"the {image}'s EXIF has {count} entries in its first directory; the limit is "
            f"{MAX_EXIF_ENTRIES} (a photo's has a dozen; re-save it without that EXIF)",
        )
    values = 0
    for entry in range(ifd + 2, min(ifd + 2 + 12 * count, len(tiff) - 7), 12):
        _tag, kind, n = struct.unpack_from(order + "HHI", tiff, entry)
        values += n if kind in _EXIF_NUMERIC else 0
    if values > MAX_EXIF_VALUES:
        raise PermanentError(
            ErrorCode.IMAGE_UNDECODABLE,
            f"the {image}'s EXIF holds {values} numeric values in its first directory; the "
            f"limit is {MAX_EXIF_VALUES} (a photo's has a few dozen; re-save it without "
            "that EXIF)",
        )


def _other_header(data: bytes) -> Header | None:
    """A PNG's, GIF's, TIFF's or WebP's header, read here in full: PIL walks their
    chunks, blocks or strips in Python when it opens them, and a crafted file within the
    size limit held the GIL for seconds (24 MB: a PNG of two million empty chunks before
    its pixels 5.6 s, a TIFF of three million strips 5.6 s; a GIF of four million empty
    blocks in 12 MB 0.9 s; a WebP: _webp_header). Where these need only the size
    (OpenCV turns them per their EXIF itself), the size is a few bytes in. None for
    other formats."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        # The first chunk is IHDR (PNG's spec): its width and height, big-endian.
        if data[12:16] != b"IHDR" or len(data) < 24:
            raise PermanentError(ErrorCode.IMAGE_UNDECODABLE, "a PNG without its IHDR chunk")
        width, height = struct.unpack_from(">II", data, 16)
        _check_png_texts(data)
        return Header("PNG", (width, height), 1)
    if data.startswith((b"GIF87a", b"GIF89a")) and len(data) >= 13:
        return _gif_header(data)
    if data.startswith((b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")):
        return _tiff_header(data)
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return _webp_header(data)
    return None


def _webp_header(data: bytes) -> Header:
    """A WebP's size from its first chunk, as libwebp takes it: the canvas of an
    extended file (VP8X), else the lossless (VP8L) or lossy (VP8) bitstream's frame.

    Not PIL's: its open hands the whole file to libwebp's animation decoder, which
    indexes every frame holding the GIL: 80-105 ms for a 23 MB file of 480,000 frames
    (0.14 ms for a photo's). libwebp decodes a still image only at that size, and
    OpenCV an animation's first frame on that canvas."""
    kind = data[12:16]
    if kind == b"VP8X" and len(data) >= 30:  # flags, reserved, then 24-bit sides - 1
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
    elif kind == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:  # 14 bits each, - 1
        bits = int.from_bytes(data[21:25], "little")
        width, height = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    elif kind == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width = int.from_bytes(data[26:28], "little") & 0x3FFF  # a 2-bit scale above
        height = int.from_bytes(data[28:30], "little") & 0x3FFF
    else:
        raise PermanentError(ErrorCode.IMAGE_UNDECODABLE, "a WebP without its image header")
    return Header("WEBP", (width, height), 1)


# Compressed text chunks (zTXt, iTXt) in a PNG. libpng, as OpenCV calls it, inflates
# each one it meets, before or after the pixels, up to 8 MB, and up to a thousand of
# them: about 20 ms a chunk of 4 kB. A 16x16 PNG of 2000 such chunks in 8 MB took 19.7 s
# of CPU to decode. A photo's PNG has a few (XMP, EXIF as "Raw profile" text, a comment).
MAX_PNG_TEXTS = 16
# Chunks walked by their lengths (a 25 MB PNG of libpng's 8 kB IDATs has some 3000);
# past these many, the rest is searched for text chunks' types at C speed instead.
_PNG_WALK = 4096


def _check_png_texts(data: bytes) -> None:
    """Refuse a PNG of more than MAX_PNG_TEXTS compressed text chunks before libpng
    inflates them. The chunks are walked by their lengths, a few thousand at most; in a
    file of more, the rest is searched for the two types (a chance match in compressed
    data, about one file in a hundred at 25 MB, counts one more)."""
    at, end, texts = 8, len(data), 0
    for _ in range(_PNG_WALK):
        if at + 8 > end or data[at + 4 : at + 8] == b"IEND":
            break
        texts += data[at + 4 : at + 8] in (b"zTXt", b"iTXt")
        at += 12 + int.from_bytes(data[at : at + 4], "big")
    else:
        texts += data.count(b"zTXt", at) + data.count(b"iTXt", at)
    if texts > MAX_PNG_TEXTS:
        raise PermanentError(
            ErrorCode.IMAGE_UNDECODABLE,
            f"a PNG of {texts} compressed text chunks (zTXt, iTXt); the limit is "
            f"{MAX_PNG_TEXTS} (each may inflate to 8 MB when it is decoded; re-save it "
            "without them)",
        )


# Blocks and stray bytes before a GIF's first image, which PIL's open walks one at a
# time in Python (a GIF of four million empty blocks in 12 MB: 0.9 s). A photo's GIF
# has a few extensions; an XMP packet in one reads as some hundred blocks.
MAX_GIF_STEPS = 4096


def _gif_header(data: bytes) -> Header:
    """A GIF's size as PIL takes it: its logical screen, grown to its first image's
    extent where that reaches further (PIL decodes it so). The walk to that image is
    PIL's, and bounded (MAX_GIF_STEPS), since PIL decodes GIFs (pipeline._decode_gif)."""
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    at = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # past the global palette
    end, steps = len(data), 0
    while at < end and data[at] != 0x3B:  # the trailer: no image
        steps += 1
        if steps > MAX_GIF_STEPS:
            raise PermanentError(
                ErrorCode.IMAGE_UNDECODABLE,
                f"the GIF has more than {MAX_GIF_STEPS} blocks before its first image",
            )
        if data[at] == 0x2C and at + 9 < end:  # an image: its left, top, width, height
            x0, y0, w, h = struct.unpack_from("<HHHH", data, at + 1)
            return Header("GIF", (max(width, x0 + w), max(height, y0 + h)), 1)
        if data[at] == 0x21:  # an extension: its label, then blocks up to an empty one
            at += 2
            while at < end and data[at]:
                steps += 1
                at += 1 + data[at]
        at += 1  # the empty block, or a stray byte (PIL skips it)
    raise PermanentError(ErrorCode.IMAGE_UNDECODABLE, "a GIF without an image")


# Entries in a TIFF's first directory: a photo's has a few dozen (a GeoTIFF's, some 30).
MAX_TIFF_ENTRIES = 1024


def _tiff_header(data: bytes) -> Header:
    """A TIFF's (or BigTIFF's) size from its first directory, where PIL takes it, and
    whether it is CMYK (photometric interpretation 5)."""
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\0", b"\0+")
    # Classic: a 4-byte offset, 2-byte count, 12-byte entries, values in 4 bytes.
    # BigTIFF: an 8-byte offset at 8, 8-byte count, 20-byte entries, values in 8 bytes.
    pointer, count_fmt, entry_fmt, size = (8, "Q", "HHQ", 20) if big else (4, "H", "HHI", 12)
    try:
        (first,) = struct.unpack_from(order + ("Q" if big else "I"), data, pointer)
        (count,) = struct.unpack_from(order + count_fmt, data, first)
        if count > MAX_TIFF_ENTRIES:
            raise PermanentError(
                ErrorCode.IMAGE_UNDECODABLE,
                f"the TIFF's first directory has {count} entries; the limit is {MAX_TIFF_ENTRIES}",
            )
        tags: dict[int, int] = {}
        at = first + struct.calcsize(order + count_fmt)
        for _ in range(count):
            tag, kind, n = struct.unpack_from(order + entry_fmt, data, at)
            if tag in (256, 257, 262) and n == 1 and kind in _TIFF_INTS:
                (tags[tag],) = struct.unpack_from(
                    order + _TIFF_INTS[kind], data, at + size - (8 if big else 4)
                )
            at += size
    except struct.error:
        raise PermanentError(ErrorCode.IMAGE_UNDECODABLE, "a TIFF cut short") from None
    if 256 not in tags or 257 not in tags:
        raise PermanentError(ErrorCode.IMAGE_UNDECODABLE, "a TIFF without its width and height")
    return Header("TIFF", (tags[256], tags[257]), 1, tags.get(262) == 5)


# TIFF's integer types, as a value of one is stored in an entry: SHORT, LONG, LONG8.
_TIFF_INTS = {3: "H", 4: "I", 16: "Q"}


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


# What PIL reads headers of: the formats OpenCV decodes but PNG, GIF, TIFF and WebP
# (read here, _other_header), and JPEGs the quick reading leaves to PIL. Not the forty-odd
# others PIL knows: OpenCV decodes none of them, or (JPEG 2000, PPM) PIL walks their
# boxes or comments in Python.
_PIL_FORMATS = ("JPEG", "AVIF", "BMP")  # PIL's JPEG opens an MPO as one
FORMATS = "JPEG, PNG, WebP, AVIF, TIFF, BMP, GIF"  # what a task's image may be


def pil_open() -> Callable[..., Image.Image]:
    """PIL's own Image.open. Importing ultralytics replaces it with a version that, on
    bytes PIL cannot identify, tries to install and import pi-heif: decoding untrusted
    uploads must fail as undecodable instead, and must never install anything."""
    patches = sys.modules.get("ultralytics.utils.patches")
    return getattr(patches, "_image_open", Image.open)


def _pil_header(data: bytes) -> Header:
    """Any image PIL opens (lazily: no pixels decoded)."""
    if data[4:8] == b"ftyp":  # an AVIF, maybe: PIL's open parses its EXIF
        _check_avif_exif(data)
    elif data.startswith(b"BM"):
        _check_bmp_palette(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = pil_open()(io.BytesIO(data), formats=_PIL_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PermanentError(ErrorCode.IMAGE_TOO_LARGE, str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise PermanentError(
            ErrorCode.IMAGE_UNDECODABLE, f"not an image of a format taken here ({FORMATS})"
        ) from exc
    except Exception as exc:
        # PIL's format plugins raise what they like on crafted files: UnidentifiedImageError,
        # OSError, SyntaxError, ValueError, and NotImplementedError or AttributeError from
        # some. None of it is worth a retry.
        raise PermanentError(
            ErrorCode.IMAGE_UNDECODABLE, f"not a decodable image ({exc.__class__.__name__})"
        ) from exc
    orientation: int | None = 1
    if image.format in ("JPEG", "AVIF"):
        try:
            orientation = int(image.getexif().get(ORIENTATION, 1))
        except (SyntaxError, ValueError, TypeError, OSError, struct.error) as exc:
            # struct.error: a block too short for its TIFF header (four bytes, or a
            # BigTIFF's eight), which PIL's EXIF reader unpacks unchecked. PIL's JPEG
            # open meets it first and keeps quiet, except where JFIF gives the dpi.
            log.debug("unreadable EXIF (%s); decoding with OpenCV", exc)
            orientation = None
    return Header(image.format or "", image.size, orientation, image.mode == "CMYK")


def _check_bmp_palette(data: bytes) -> None:
    """Refuse a BMP whose palette holds more colours than its pixels can index (at
    most 256): PIL's open compares each entry with a grey in Python, and takes up to
    65,536 of them: 23 ms of GIL for a 262 kB 16x16 file (a 256-colour one: 0.13 ms)."""
    if len(data) < 50 or struct.unpack_from("<I", data, 14)[0] not in (40, 52, 56, 64, 108, 124):
        return  # no palette size in this header (or not one PIL reads)
    bits, colors = struct.unpack_from("<H", data, 28)[0], struct.unpack_from("<I", data, 46)[0]
    if bits <= 8 and colors > 1 << bits:
        raise PermanentError(
            ErrorCode.IMAGE_UNDECODABLE,
            f"a BMP of {bits}-bit pixels with a palette of {colors} colours; at most "
            f"{1 << bits} can be used (re-save it)",
        )


def _check_avif_exif(data: bytes) -> None:
    """An AVIF's EXIF checked (check_exif) before PIL's open reads it: taken from the
    file by libavif, as PIL's plugin takes it (its C module: 5 us for a 12 MP photo's
    boxes, no pixel decoded). Whatever libavif refuses, PIL is left to refuse."""
    avif = getattr(AvifImagePlugin, "_avif", None)
    if avif is None:
        return  # no AVIF support: PIL refuses the file
    try:
        exif = avif.AvifDecoder(data, AvifImagePlugin.DECODE_CODEC_CHOICE, 1).get_info()[4]
    except Exception:  # noqa: BLE001 - libavif's refusals (SyntaxError, RuntimeError...):
        return  # PIL's open refuses the file in its own words
    if exif:
        check_exif(exif, "AVIF")
