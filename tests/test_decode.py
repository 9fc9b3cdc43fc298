"""Decoding untrusted image bytes: clear permanent errors, upright pixels."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import ultralytics  # noqa: F401 - it patches PIL.Image.open; decoding must not care
from conftest import _bits, _jpeg_segment, box_distance, local_pipeline
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


def _saved(image: Image.Image, kind: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, kind, **options)
    return out.getvalue()


def _dds_of_unknown_pixel_format() -> bytes:
    """A DDS header whose pixel format flags PIL does not know: NotImplementedError."""
    header = bytearray(128)
    header[:4] = b"DDS "
    struct.pack_into("<7I", header, 4, 124, 0x1007, 16, 16, 0, 0, 0)
    struct.pack_into("<2I", header, 76, 32, 0x80)
    return bytes(header) + bytes(16 * 16 * 4)


@pytest.mark.parametrize(
    "make",
    [
        lambda: b"not an image at all",
        lambda: b"\xff\xd8\xff\xe0broken",
        lambda: b"",
        _dds_of_unknown_pixel_format,
        # A side over OpenCV's 2**20 (a few pixels, 16 KB): its check raises cv2.error.
        lambda: _saved(Image.new("RGB", (2**20 + 1, 2)), "TIFF", compression="tiff_lzw"),
    ],
    ids=["text", "broken-jpeg", "empty", "dds", "wide-tiff"],
)
def test_non_images_are_undecodable_and_nothing_gets_installed(make):
    """Whatever the parser's complaint, the task is quarantined as undecodable, never
    left to fail the same way on every redelivery."""
    with pytest.raises(PermanentError) as err:
        decode_image(make(), 10**8)
    assert err.value.code is ErrorCode.IMAGE_UNDECODABLE


def test_too_many_pixels_is_refused_before_decoding():
    with pytest.raises(PermanentError) as err:
        decode_image(jpeg(400, 300), max_pixels=400 * 300 - 1)
    assert err.value.code is ErrorCode.IMAGE_TOO_LARGE and "400x300" in err.value.message


@pytest.mark.parametrize("kind", ["PNG", "WEBP", "TIFF", "AVIF"])
@pytest.mark.parametrize("orientation", [3, 5, 6, 8])
def test_other_formats_come_out_upright_as_pil_turns_them(kind, orientation):
    """A photo in another format, stored turned: its pixels come out as PIL turns it
    upright (exif_transpose). OpenCV turns most by their EXIF itself, but not an AVIF
    (its irot and imir boxes), whose boxes would otherwise be on the photo turned."""
    from PIL import ImageOps

    ramp = np.add.outer(np.arange(90), np.arange(120)).astype(np.uint8)
    image = Image.fromarray(np.dstack([ramp, ramp[::-1], 255 - ramp]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _saved(image, kind, exif=exif if kind == "TIFF" else exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    decoded = decode_image(data, 10**8)[..., ::-1]  # BGR -> RGB
    assert decoded.shape == expected.shape
    assert np.abs(decoded.astype(int) - expected).mean() < 8  # WebP and AVIF are lossy


def test_pixels_are_bgr_and_upright_per_exif():
    plain = decode_image(jpeg(64, 32), 10**8)
    assert plain.shape == (32, 64, 3)
    blue, _green, red = plain[16, 32]
    assert red > 150 and blue < 80  # BGR order, as ultralytics expects
    rotated = decode_image(jpeg(64, 32, orientation=6), 10**8)  # phone held upright
    assert rotated.shape == (64, 32, 3)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the bench's large photos are drawn (bench_plumbing.images_for), once for
    the module: two tests read the 4032x3024 set."""
    return tmp_path_factory.mktemp("photos")


@pytest.mark.parametrize("image_set", ["4032x3024", "phone"])
def test_reduced_scale_decode_finds_the_same_objects_within_two_pixels(tmp_path, photos, image_set):
    """A 4032x3024 photo for a 640-pixel detector is decoded at 1/4 scale (about 4x less
    CPU); the answer must be the one full-size decoding gives: the same detections, each
    box within 2 px in the photo's own pixels, and the photo's size reported. "phone":
    the same scenes with a sensor's grain, 3-4 MB files as a 12 MP phone writes them."""
    from gannet.dev.bench_plumbing import DISTINCT, images_for, write_config
    from gannet.dev.publish import make_task
    from gannet.pipeline import decode_scaled
    from gannet.stages import Timer

    config = str(write_config(tmp_path))  # the demo detector at imgsz 640, DETECTION
    pipeline = local_pipeline(config, max_batch=1)
    task = make_task("tenant-a", "gs://gannet-images/tenant-a/x.jpg", "DETECTION", "t")
    route = pipeline.check(task)
    assert route.decode_floor == 960  # 1.5 times the model's input: 1/4 scale, 1008x756
    compared = 0
    try:
        # Four are compared; drawing a phone photo's grain is the slow part, so only
        # those four are drawn (the 4032x3024 set is drawn whole: the next test reads it).
        count = 4 if image_set == "phone" else DISTINCT
        for photo in images_for(image_set, photos, count)[:4]:
            data = photo.read_bytes()
            assert (len(data) > 3_000_000) == (image_set == "phone"), (photo.name, len(data))
            answers = []
            for floor in (None, route.decode_floor):
                image, scale = decode_scaled(data, 10**8, floor)
                result = pipeline.run_image(
                    task, route, image, "cpu", Timer(lambda s, v: None), scale=scale
                )
                answers.append(result["detection"])
            full, reduced = answers
            assert reduced["image_size"] == full["image_size"] == [4032, 3024]
            assert len(reduced["detections"]) == len(full["detections"])
            for a in full["detections"]:  # confidences differ in the third digit: pair by box
                b = min(reduced["detections"], key=lambda d: box_distance(a["box"], d["box"]))
                assert b["class"] == a["class"], (photo.name, a, b)
                assert box_distance(a["box"], b["box"]) <= 2.0, (photo.name, a, b)
                compared += 1
    finally:
        pipeline.cache.close()
    assert compared >= 8  # the photos do contain objects to compare


def test_only_plans_that_report_in_photo_pixels_decode_reduced():
    from gannet.config_sources import open_configs
    from gannet.settings import REPO_ROOT
    from gannet.storage import local_version, read_local

    floors = {}
    for name in ("demo.yaml", "agro.yaml", "vending.yaml"):
        loaded = open_configs(str(REPO_ROOT / "configs" / name), read_local, local_version)
        config = loaded.current()
        for pipeline in config.config.pipelines:
            floors[f"{name}:{pipeline}"] = config.decode_floors[pipeline]
    # Detection and segmentation report in the photo's pixels: decoded reduced, to 1.5
    # times the largest model input (416). Sliced detection's tiles and classification's
    # crops need every pixel: full size.
    scalable = {
        "demo.yaml:DETECTION",
        "agro.yaml:DETECTION",
        "vending.yaml:DETECTION",
        "agro.yaml:FULL_PIPELINE",
    }
    assert {k: v for k, v in floors.items() if v is not None} == dict.fromkeys(scalable, 624)
    assert {"agro.yaml:FIELD_ANALYSIS", "vending.yaml:SHELF_AUDIT"} <= floors.keys()


def test_segments_of_a_reduced_decode_keep_the_photos_pixels(photos):
    """agro's FULL_PIPELINE (segmentation, detection, estimation) on 4032x3024 photos is
    decoded at 1/4 scale; its masks are still made at the photo's size, so each segment's
    area, box and the photo's coverage are what full-size decoding gives, within what
    the model's slightly different input moves them (areas 1 %, boxes 4 px)."""
    from gannet.dev.bench_plumbing import images_for
    from gannet.dev.publish import make_task
    from gannet.pipeline import decode_scaled
    from gannet.settings import REPO_ROOT
    from gannet.stages import Timer

    pipeline = local_pipeline(str(REPO_ROOT / "configs" / "agro.yaml"), max_batch=1)
    task = make_task("tenant-a", "gs://gannet-images/tenant-a/x.jpg", "FULL_PIPELINE", "t")
    route = pipeline.check(task)
    compared = 0
    try:
        for photo in images_for("4032x3024", photos):
            data = photo.read_bytes()
            answers = []
            for floor in (None, route.decode_floor):
                image, scale = decode_scaled(data, 10**8, floor)
                answers.append(
                    pipeline.run_image(
                        task, route, image, "cpu", Timer(lambda s, v: None), scale=scale
                    )
                )
            assert image.shape[:2] == (756, 1008)
            full, reduced = answers
            for key in ("segmentation", "detection"):
                assert reduced[key]["image_size"] == full[key]["image_size"] == [4032, 3024]
            theirs, ours = full["segmentation"]["segments"], reduced["segmentation"]["segments"]
            assert [s["class"] for s in ours] == [s["class"] for s in theirs], photo.name
            for a, b in zip(theirs, ours, strict=True):
                assert b["area_px"] == pytest.approx(a["area_px"], rel=0.01), (photo.name, a, b)
                assert box_distance(a["box"], b["box"]) <= 4, (photo.name, a["box"], b["box"])
                compared += 1
            coverage = [answer["estimation"]["coverage_percent"] for answer in answers]
            assert coverage[1] == pytest.approx(coverage[0], abs=0.05)
    finally:
        pipeline.cache.close()
    assert compared >= 5  # the photos do contain segments to compare


def test_reduced_decode_scales_back_to_the_upright_photo():
    """A phone photo stored landscape with an EXIF quarter turn: decoded reduced and
    upright, its factors map the image back onto the upright photo's own pixels."""
    from gannet.pipeline import decode_scaled

    image, (sx, sy) = decode_scaled(jpeg(2000, 1000, orientation=8), 10**8, floor=400)
    assert image.shape[:2] == (500, 250)  # upright: 1000 wide, 2000 high, at 1/4
    assert (sx, sy) == (4.0, 4.0)
    full, scale = decode_scaled(jpeg(2001, 1001), 10**8, floor=None)
    assert full.shape[:2] == (1001, 2001) and scale == (1.0, 1.0)


@pytest.mark.parametrize(("width", "factor"), [(2401, 1), (2402, 2), (2404, 4), (2400, 8)])
def test_a_reduced_decode_puts_the_photos_pixels_back_where_they_are(width, factor):
    """Each pixel of a decode at 1/f is f x f of the photo's, the last ones too, reaching
    past a side f does not divide: a 2401 px wide photo at 1/8 came back 301 wide, and
    its factor back, 2401 / 301, put an edge at x = 2000 at 1994.2 (boxes near that
    side up to f - 1 px short). Only a factor that divides both sides is taken."""
    from gannet.pipeline import decode_scaled

    photo = np.zeros((1600, width, 3), np.uint8)
    photo[:, 2000:] = 255  # an edge at x = 2000
    data = cv2.imencode(".jpg", photo, [cv2.IMWRITE_JPEG_QUALITY, 100])[1].tobytes()
    image, (sx, _sy) = decode_scaled(data, 10**8, floor=300)
    white = image[image.shape[0] // 2, :, 1].sum() / 255  # decoded pixels right of the edge
    assert (image.shape[1] - white) * sx == pytest.approx(2000, abs=0.5)
    assert image.shape[1] == width // factor and sx == factor


def _noise_jpeg(width: int, height: int, orientation: int = 1, **save: object) -> bytes:
    """A JPEG with no symmetry (a gradient and noise), so any wrong turn shows."""
    rng = np.random.default_rng(orientation)
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.dstack([xs * 255 // width, ys * 255 // height, rng.integers(0, 255, (height, width))])
    image = Image.fromarray(rgb.astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, "JPEG", exif=exif.tobytes(), **save)
    return out.getvalue()


def _opencv(data: bytes, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), flags)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpegs_decode_to_opencvs_pixels_bit_for_bit_in_every_orientation(orientation):
    """JPEGs are decoded by libjpeg-turbo through simplejpeg (half OpenCV's CPU), which
    ignores EXIF: the pixels must still be exactly OpenCV's, upright, at full size and
    at reduced scale, for each of the 8 tags, so every answer stays the same."""
    from gannet.image_header import read_header
    from gannet.pipeline import _decode_jpeg, decode_scaled

    small = _noise_jpeg(97, 61, orientation)
    assert _decode_jpeg(small, read_header(small, 10**8), 1) is not None  # not OpenCV's
    image, scale = decode_scaled(small, 10**8, floor=None)
    assert np.array_equal(image, _opencv(small)) and scale == (1.0, 1.0)

    large = _noise_jpeg(1300, 700, orientation)  # decoded at 1/4 for a floor of 300
    reduced, (sx, sy) = decode_scaled(large, 10**8, floor=300)
    assert np.array_equal(reduced, _opencv(large, cv2.IMREAD_REDUCED_COLOR_4))
    upright_w, upright_h = (700, 1300) if orientation >= 5 else (1300, 700)
    assert (sx * reduced.shape[1], sy * reduced.shape[0]) == pytest.approx((upright_w, upright_h))


@pytest.mark.parametrize("orientation", [1, 6, 8])
def test_a_jpeg_libjpeg_turbo_refuses_still_scales_back_to_the_upright_photo(orientation):
    """A JPEG that simplejpeg refuses (strict: here 100 stray bytes before its end
    marker, which libjpeg only warns about) is decoded by OpenCV at the reduced scale
    instead, and turned upright by OpenCV itself. Its factors must still map the image
    back onto the upright photo's own pixels, a phone photo's quarter turn included:
    they scale every box of the answer."""
    from gannet.image_header import read_header
    from gannet.pipeline import _decode_jpeg, decode_scaled

    good = _noise_jpeg(1300, 700, orientation)
    data = good[:-2] + b"\x55" * 100 + good[-2:]
    assert _decode_jpeg(data, read_header(data, 10**8), 4) is None  # OpenCV's to decode
    reduced, (sx, sy) = decode_scaled(data, 10**8, floor=300)
    assert np.array_equal(reduced, _opencv(data, cv2.IMREAD_REDUCED_COLOR_4))
    upright_w, upright_h = (700, 1300) if orientation >= 5 else (1300, 700)
    assert (sx * reduced.shape[1], sy * reduced.shape[0]) == pytest.approx((upright_w, upright_h))


@pytest.mark.parametrize("kind", ["progressive", "grayscale", "cmyk", "truncated"])
def test_unusual_jpegs_decode_as_opencv_decodes_them(kind):
    """Progressive, grayscale and CMYK JPEGs come out as OpenCV's pixels; what simplejpeg
    refuses (a truncated file: strict, it refuses what libjpeg only warns about) goes to
    OpenCV, so the permanent error is the one it was before simplejpeg."""
    from gannet.pipeline import decode_scaled

    data = {
        "progressive": lambda: _noise_jpeg(120, 80, progressive=True),
        "grayscale": lambda: _jpeg_of(Image.new("L", (120, 80), 77)),
        "cmyk": lambda: _jpeg_of(Image.new("CMYK", (120, 80), (10, 200, 30, 40))),
        "truncated": lambda: _noise_jpeg(120, 80)[:-400],
    }[kind]()
    expected = _opencv(data)
    if expected is None:
        with pytest.raises(PermanentError) as err:
            decode_scaled(data, 10**8, floor=None)
        assert err.value.code is ErrorCode.IMAGE_UNDECODABLE
    else:
        image, _scale = decode_scaled(data, 10**8, floor=None)
        assert np.array_equal(image, expected)


def _jpeg_of(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG")
    return out.getvalue()


def _lossless_jpeg(width: int, height: int, xmp: bool = False) -> bytes:
    """A valid lossless (SOF3) RGB JPEG of one flat grey: predictor 1, every difference 0
    (category 0, one symbol of a one-bit code). With an XMP segment, PIL reads its
    header (the walk leaves it PIL's orientation to look for)."""
    out = b"\xff\xd8"
    if xmp:
        out += _jpeg_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta/>")
    components = b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    out += _jpeg_segment(0xC3, struct.pack(">BHHB", 8, height, width, 3) + components)
    out += _jpeg_segment(0xC4, b"\x00" + b"\x01" + b"\x00" * 15 + b"\x00")
    sos = b"\x03\x01\x00\x02\x00\x03\x00" + b"\x01\x00\x00"  # predictor 1
    return out + _jpeg_segment(0xDA, sos) + _bits("0" * (width * height * 3)) + b"\xff\xd9"


@pytest.mark.parametrize("xmp", [False, True])
def test_a_lossless_jpeg_is_decoded_at_full_size_never_scaled(xmp):
    """libjpeg-turbo has no DCT to scale in a lossless JPEG and decodes it at full size:
    asked through simplejpeg for a quarter of a 640x480 one, it wrote the full-size rows
    into the 160x120 buffer simplejpeg had sized, and the process died ("double free or
    corruption"). Such a JPEG is decoded at full size, whichever reader took its header."""
    from gannet.image_header import read_header
    from gannet.pipeline import decode_scaled, reduced_factor

    data = _lossless_jpeg(640, 480, xmp)
    header = read_header(data, 10**8)
    assert header.lossless
    assert reduced_factor(header, 100) == 1
    image, scale = decode_scaled(data, 10**8, floor=100)
    assert image.shape == (480, 640, 3) and scale == (1.0, 1.0)
    assert np.array_equal(image, _opencv(data))
    baseline = read_header(_noise_jpeg(640, 480), 10**8)
    assert not baseline.lossless and reduced_factor(baseline, 100) == 4


def _gif(image: Image.Image, **save: object) -> bytes:
    out = io.BytesIO()
    image.save(out, "GIF", **save)
    return out.getvalue()


def _palette_image() -> Image.Image:
    noise = np.random.default_rng(0).integers(0, 256, (61, 97, 3), np.uint8)
    return Image.fromarray(noise).convert("P", palette=Image.Palette.ADAPTIVE, colors=200)


GIFS = {
    "plain": lambda: _gif(_palette_image()),
    "transparent": lambda: _gif(_palette_image(), transparency=5),
    "transparent, background 7": lambda: _gif(_palette_image(), transparency=5, background=7),
    "interlaced": lambda: _gif(_palette_image(), interlace=True),
    "grey": lambda: _gif(
        Image.fromarray(np.add.outer(np.arange(61), np.arange(97)).astype(np.uint8))
    ),
    "animated": lambda: _gif(
        _palette_image(), save_all=True, append_images=[Image.new("P", (97, 61), 3)] * 2
    ),
}


@pytest.mark.parametrize("kind", list(GIFS))
def test_gifs_decode_to_opencvs_pixels(kind):
    """GIFs are decoded by PIL (below), to the pixels OpenCV gave: the first frame,
    BGR, a transparent pixel in the background's colour."""
    data = GIFS[kind]()
    assert np.array_equal(decode_image(data, 10**8), _opencv(data))


def _gif_of_clear_codes(width: int, height: int) -> bytes:
    """A valid black-and-white GIF whose LZW data clears its table after every second
    pixel: 3-bit codes clear (4), then 0, 0, clear, ..., end (5)."""
    pairs = width * height // 2
    codes = np.concatenate([[4], np.tile(np.array([0, 0, 4], np.uint8), pairs), [5]])
    bits = np.unpackbits(codes.astype(np.uint8)[:, None], axis=1, bitorder="little")[:, :3]
    lzw = np.packbits(bits.reshape(-1), bitorder="little").tobytes()
    blocks = b"".join(
        bytes([len(lzw[i : i + 255])]) + lzw[i : i + 255] for i in range(0, len(lzw), 255)
    )
    screen = struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    image = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02" + blocks + b"\0"
    return b"GIF89a" + screen + image + b";"


def test_a_gif_of_clear_codes_is_decoded_without_opencv(monkeypatch):
    """OpenCV's GIF decoder resets its whole string table at each LZW clear code, about
    5 us each: a 14 MB 5000x5000 GIF that clears after every second pixel took 70.8 s
    of CPU (PIL: 0.21 s). GIFs go to PIL's decoder; OpenCV never sees this one."""
    from gannet import pipeline

    data = _gif_of_clear_codes(256, 256)  # 32,768 clear codes
    monkeypatch.setattr(pipeline.cv2, "imdecode", lambda *a: pytest.fail("OpenCV decoded it"))
    image = decode_image(data, 10**8)
    assert image.shape == (256, 256, 3) and not image.any()  # colour 0: black
    with pytest.raises(PermanentError) as err:
        decode_image(data[: len(data) // 2], 10**8)  # cut short
    assert err.value.code is ErrorCode.IMAGE_UNDECODABLE
