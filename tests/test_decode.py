"""Decoding untrusted image bytes: clear permanent errors, upright pixels."""

from __future__ import annotations

import io

import pytest
import ultralytics  # noqa: F401 - it patches PIL.Image.open; decoding must not care
from PIL import Image

from gannet.errors import ErrorCode, PermanentError
from gannet.pipeline import decode_image


def jpeg(width: int, height: int, orientation: int | None = None) -> bytes:
    image = Image.new("RGB", (width, height), (200, 30, 30))
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(out, "JPEG", exif=exif.tobytes())
    return out.getvalue()


@pytest.mark.parametrize("data", [b"not an image at all", b"\xff\xd8\xff\xe0broken", b""])
def test_non_images_are_undecodable_and_nothing_gets_installed(data):
    with pytest.raises(PermanentError) as err:
        decode_image(data, 10**8)
    assert err.value.code is ErrorCode.IMAGE_UNDECODABLE


def test_too_many_pixels_is_refused_before_decoding():
    with pytest.raises(PermanentError) as err:
        decode_image(jpeg(400, 300), max_pixels=400 * 300 - 1)
    assert err.value.code is ErrorCode.IMAGE_TOO_LARGE and "400x300" in err.value.message


def test_pixels_are_bgr_and_upright_per_exif():
    plain = decode_image(jpeg(64, 32), 10**8)
    assert plain.shape == (32, 64, 3)
    blue, _green, red = plain[16, 32]
    assert red > 150 and blue < 80  # BGR order, as ultralytics expects
    rotated = decode_image(jpeg(64, 32, orientation=6), 10**8)  # phone held upright
    assert rotated.shape == (64, 32, 3)
