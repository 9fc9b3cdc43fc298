"""Photos decoded on the model's device (device_decode.py) and letterboxed there.

The daemon builds a DeviceDecoder only for CUDA devices (nvJPEG). This machine has no
GPU, so most tests here run the same code on a CPU device: torchvision's libjpeg-turbo
instead of nvJPEG, torch's resize on the CPU. On a GPU only where the tensors live
differs; the last test checks that there and skips without one.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from conftest import box_distance, local_pipeline
from PIL import Image
from pydantic import ValidationError

from gannet.dev.publish import make_task
from gannet.device_decode import DeviceDecoder, device_decoders, has_jpeg_engine
from gannet.errors import ErrorCode, PermanentError
from gannet.frames import to_host
from gannet.pipeline import Pipeline, decode_scaled
from gannet.settings import REPO_ROOT, Settings
from gannet.stages import Timer

SAMPLES = REPO_ROOT / "samples"


def jpeg(image_bgr: np.ndarray, orientation: int | None = None) -> bytes:
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.fromarray(image_bgr[..., ::-1]).save(out, "JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


@pytest.fixture
def decoder() -> Iterator[DeviceDecoder]:
    dec = DeviceDecoder("cpu")
    yield dec
    dec.close()


NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvJPEG)")


@pytest.fixture(params=["cpu", pytest.param("cuda:0", marks=NEEDS_GPU)])
def any_decoder(request: pytest.FixtureRequest) -> Iterator[DeviceDecoder]:
    """The decoder on the CPU (libjpeg-turbo) and, where there is a GPU, nvJPEG."""
    dec = DeviceDecoder(request.param)
    yield dec
    dec.close()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_device_frame_is_upright_as_opencv_turns_it(
    any_decoder: DeviceDecoder, orientation: int
) -> None:
    """nvJPEG ignores EXIF orientation, so the decoder turns frames itself; a phone
    photo must come out as OpenCV's host decode gives it, for each of the 8 tags."""
    ys, xs = np.mgrid[0:48, 0:80]
    image = np.dstack([xs * 3, ys * 5, (xs + ys) * 2]).astype(np.uint8)  # no symmetry
    data = jpeg(image, orientation)
    frame = any_decoder.decode(data, orientation)
    assert frame is not None
    expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    got = to_host(frame)
    assert got.shape == expected.shape
    # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a level or two
    # (a mean of 1.04 on an H200); a wrong turn differs by 56 or more.
    assert np.abs(got.astype(int) - expected.astype(int)).mean() < 2.0


def test_one_bad_jpeg_in_a_batch_is_refused_alone(any_decoder: DeviceDecoder) -> None:
    """One call decodes a batch, and one bad file fails the call: the others must still
    come back decoded, and only the bad one go to the CPU fallback."""
    good = torch.frombuffer(bytearray(jpeg(np.full((16, 24, 3), 90, np.uint8))), dtype=torch.uint8)
    bad = torch.frombuffer(bytearray(b"\xff\xd8\xff\xe0 not really a jpeg"), dtype=torch.uint8)
    first, refused, last = any_decoder._decode_batch([good, bad, good])
    assert isinstance(refused, RuntimeError)
    assert isinstance(first, torch.Tensor) and first.shape == (3, 16, 24)
    assert isinstance(last, torch.Tensor) and last.shape == (3, 16, 24)


def test_the_decoder_threads_busy_time_and_batches_are_exported_by_device() -> None:
    """The one decoder thread per process can be what binds with large photos
    (runbook.md; on an H100, 97-98 % of the time with phone photos): /metrics must show
    how much of the time it spent decoding, and how many JPEGs each call carried, by
    device. Four decodes one after another are four calls of one; then eight runners at
    once share calls, and the JPEGs still add up."""
    from concurrent.futures import ThreadPoolExecutor

    from gannet.metrics import Metrics

    metrics = Metrics()
    dec = DeviceDecoder("cpu", metrics=metrics, window_s=0.05)
    noise = np.random.default_rng(5).integers(0, 255, (768, 1024, 3), dtype=np.uint8)
    data = jpeg(noise)

    def exported() -> dict[str, float]:
        """This device's series as /metrics shows them (the registry it is made from)."""
        names = ("seconds_count", "seconds_sum", "batch_size_count", "batch_size_sum")
        value = metrics.registry.get_sample_value
        return {n: value(f"gannet_device_decode_{n}", {"device": "cpu"}) for n in names}

    try:
        started = time.perf_counter()
        frames = [dec.decode(data) for _ in range(4)]
        elapsed = time.perf_counter() - started
        alone = exported()
        with ThreadPoolExecutor(8) as runners:
            frames += list(runners.map(lambda _: dec.decode(data), range(8)))
    finally:
        dec.close()
    assert all(f is not None and f.shape == (3, 768, 1024) for f in frames)
    assert alone["seconds_count"] == 4  # one call each
    assert alone["batch_size_sum"] == 4
    busy = alone["seconds_sum"]
    assert 0 < busy <= elapsed
    together = exported()
    calls = together["seconds_count"]
    assert together["batch_size_count"] == calls
    assert together["batch_size_sum"] == 12
    assert calls < 12  # some of the eight shared a call


def _pipeline(config: str, decoder: DeviceDecoder | None, device: str = "cpu") -> Pipeline:
    return local_pipeline(config, decoders={device: decoder} if decoder is not None else None)


def test_formats_the_device_does_not_take_are_decoded_on_the_cpu(
    decoder: DeviceDecoder,
) -> None:
    pipeline = _pipeline(str(REPO_ROOT / "configs" / "demo.yaml"), decoder)
    route = pipeline.check(make_task("t-a", "gs://gannet-images/t-a/x.jpg", "DETECTION", "t"))
    try:
        photo = cv2.imread(str(SAMPLES / "scene_01.jpg"))
        png = cv2.imencode(".png", photo)[1].tobytes()
        frame, _ = pipeline.decode(png, route, "cpu")
        assert isinstance(frame, np.ndarray) and frame.shape == photo.shape
        on_device, _ = pipeline.decode(jpeg(photo), route, "cpu")
        assert isinstance(on_device, torch.Tensor) and on_device.shape == (3, 480, 640)
        with pytest.raises(PermanentError) as err:
            pipeline.decode(b"\xff\xd8\xff\xe0 not really a jpeg", route, "cpu")
        assert err.value.code is ErrorCode.IMAGE_UNDECODABLE
    finally:
        pipeline.cache.close()


def cmyk_jpeg() -> tuple[bytes, np.ndarray]:
    """A CMYK JPEG (PIL writes Adobe's inverted CMYK, as print workflows do) and its
    pixels as OpenCV decodes them on the host (BGR)."""
    ys, xs = np.mgrid[0:48, 0:80]
    rgb = np.dstack([xs * 3, ys * 5, (xs + ys) * 2]).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(out, "JPEG", quality=95)
    data = out.getvalue()
    return data, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def test_a_cmyk_jpeg_is_decoded_on_the_cpu(decoder: DeviceDecoder) -> None:
    """nvJPEG converts a four-channel JPEG's colours only when asked
    (nvjpegDecodeParamsSetAllowCMYK, "disabled by default" in NVIDIA's nvJPEG docs),
    which torchvision never does (its image_stable.so does not even import it): it
    decodes the file without an error, so the fallback on a refusal never came, and the
    frame's colours were not the photo's. A CMYK JPEG must not reach the device's
    decoder; here the device's decoder is the CPU's, which would convert it well, so
    where the frame was decoded is what the test reads."""
    pipeline = _pipeline(str(REPO_ROOT / "configs" / "demo.yaml"), decoder)
    route = pipeline.check(make_task("t-a", "gs://gannet-images/t-a/x.jpg", "DETECTION", "t"))
    data, expected = cmyk_jpeg()
    try:
        frame, _ = pipeline.decode(data, route, "cpu")
    finally:
        pipeline.cache.close()
    assert isinstance(frame, np.ndarray)
    assert np.abs(frame.astype(int) - expected.astype(int)).mean() < 2.0


@NEEDS_GPU
def test_on_a_gpu_a_cmyk_jpeg_has_its_colours() -> None:
    dec = DeviceDecoder("cuda:0")
    pipeline = _pipeline(str(REPO_ROOT / "configs" / "demo.yaml"), dec, "cuda:0")
    route = pipeline.check(make_task("t-a", "gs://gannet-images/t-a/x.jpg", "DETECTION", "t"))
    data, expected = cmyk_jpeg()
    try:
        frame, _ = pipeline.decode(data, route, "cuda:0")
    finally:
        pipeline.cache.close()
        dec.close()
    assert np.abs(to_host(frame).astype(int) - expected.astype(int)).mean() < 2.0


@pytest.mark.parametrize(
    ("engine", "pipeline_name", "photo", "on_device", "scale"),
    [
        # A GPU with a JPEG engine (an H200) decodes every JPEG.
        (True, "FULL_PIPELINE", "large_01.jpg", True, 1.0),
        # Without one (a T4): a photo the runner decodes at 1/2 scale stays on the CPU...
        (False, "FULL_PIPELINE", "large_01.jpg", False, 2.0),
        # ... but not one at full size, nor any photo sliced detection needs whole.
        (False, "FULL_PIPELINE", "scene_01.jpg", True, 1.0),
        (False, "FIELD_ANALYSIS", "large_01.jpg", True, 1.0),
    ],
)
def test_without_a_jpeg_engine_the_cpu_decodes_what_it_can_reduce(
    engine: bool, pipeline_name: str, photo: str, on_device: bool, scale: float
) -> None:
    """Where nvJPEG would run the Huffman stage on one CPU thread anyway (a T4), the
    runners decode a large photo at reduced scale on every core instead. On a CPU
    device `engine` is only what the daemon was told: nvJPEG's answer needs a GPU."""
    dec = DeviceDecoder("cpu", engine=engine)
    pipeline = _pipeline(str(REPO_ROOT / "configs" / "agro.yaml"), dec)
    route = pipeline.check(make_task("t-a", f"gs://gannet-images/t-a/{photo}", pipeline_name, "t"))
    try:
        frame, factors = pipeline.decode((SAMPLES / photo).read_bytes(), route, "cpu")
    finally:
        pipeline.cache.close()
        dec.close()
    assert isinstance(frame, torch.Tensor) is on_device
    assert factors == pytest.approx((scale, scale), rel=0.01)


@pytest.mark.parametrize(
    ("value", "mode"),
    [("auto", "auto"), ("all", "all"), ("off", "off"), ("true", "auto"), ("0", "off")],
)
def test_gpu_decode_takes_its_modes_and_the_old_switch(
    monkeypatch: pytest.MonkeyPatch, value: str, mode: str
) -> None:
    monkeypatch.setenv("GANNET_GPU_DECODE", value)
    assert Settings().gpu_decode == mode


def test_an_unknown_gpu_decode_mode_says_which_there_are(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GANNET_GPU_DECODE", "sometimes")
    with pytest.raises(ValidationError, match="'auto', 'all' or 'off'"):
        Settings()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the answer without a GPU")
def test_without_a_gpu_nvjpeg_is_found_but_cannot_say(caplog: pytest.LogCaptureFixture) -> None:
    """torchvision's libnvjpeg loads and answers (6, EXECUTION_FAILED: no GPU), so on a
    GPU the same call gets the real answer; unknown means every JPEG on the device."""
    has_jpeg_engine.cache_clear()
    assert has_jpeg_engine() is None
    assert "hardware backend failed with status 6" in caplog.text


@NEEDS_GPU
def test_on_a_gpu_nvjpeg_says_whether_it_has_a_jpeg_engine() -> None:
    """What GANNET_GPU_DECODE=auto routes by: an A100, H100 or H200 has an engine, a T4
    has none."""
    has_jpeg_engine.cache_clear()
    found = has_jpeg_engine()
    assert found is not None
    name = torch.cuda.get_device_name(0)
    if any(model in name for model in ("A100", "H100", "H200")):
        assert found
    if "T4" in name:
        assert not found


def test_no_decoder_is_built_without_a_cuda_device_or_when_off() -> None:
    assert device_decoders("auto", ["cpu"], 8, None) == {}
    assert device_decoders("off", ["cuda:0"], 8, None) == {}


def test_a_process_with_several_gpus_decodes_on_one_of_them() -> None:
    """torchvision keeps one nvJPEG decoder per process, for one device: a call for
    another device replaces it and leaks the old one (its destructor frees nothing). A
    decoder per GPU, taking turns, made and leaked a decoder with its buffers at nearly
    every call. So every GPU's runners share the first GPU's decoder. (Building one
    touches no GPU: its thread calls nvJPEG at the first decode.)"""
    decoders = device_decoders("all", ["cuda:0", "cuda:1"], 8, None)
    try:
        assert decoders.keys() == {"cuda:0", "cuda:1"}
        assert decoders["cuda:0"] is decoders["cuda:1"]
        assert decoders["cuda:0"].device == "cuda:0"
    finally:
        for decoder in set(decoders.values()):
            decoder.close()


def test_a_frame_for_a_runner_of_another_device_is_moved_there(decoder: DeviceDecoder) -> None:
    """What a runner of the second GPU gets from the first GPU's decoder; here the CPU
    decodes and torch's meta device stands for the other GPU (no GPU on this machine)."""
    data = jpeg(np.full((16, 24, 3), 90, np.uint8), 6)
    moved = decoder.decode(data, 6, to="meta")
    assert moved is not None and moved.device.type == "meta" and moved.shape == (3, 24, 16)
    here = decoder.decode(data, 6, to="cpu")
    assert here is not None and here.device.type == "cpu"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_on_two_gpus_each_runner_gets_its_frame_on_its_own_gpu() -> None:
    decoders = device_decoders("all", ["cuda:0", "cuda:1"], 8, None)
    data = (SAMPLES / "scene_01.jpg").read_bytes()
    try:
        frames = {d: decoder.decode(data, 1, d) for d, decoder in decoders.items()}
    finally:
        for decoder in set(decoders.values()):
            decoder.close()
    first, second = frames["cuda:0"], frames["cuda:1"]
    assert first is not None and second is not None
    assert first.device == torch.device("cuda:0") and second.device == torch.device("cuda:1")
    assert torch.equal(first.cpu(), second.cpu())


def _close(a: Any, b: Any, where: str) -> None:
    """Two answers agree: the same keys, lists and strings, numbers within 2 units or
    3 % (boxes in pixels, areas, confidences), polygons by their point count only
    loosely (a contour of a mask a grey level apart can gain or lose a vertex)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            if key in ("duration_ms", "processed_at"):
                continue
            if key == "polygon":
                assert abs(len(a[key]) - len(b[key])) <= max(2, len(a[key]) // 5), where
                continue
            _close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, x in enumerate(a):
            y = b[i]
            if isinstance(x, dict) and "box" in x:  # confidences a hair apart reorder them
                y = min(b, key=lambda d, box=x["box"]: box_distance(box, d["box"]))
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float | int) and not isinstance(a, bool):
        assert abs(a - b) <= max(2.0, 0.03 * abs(a)), (where, a, b)
    else:
        assert a == b, (where, a, b)


@pytest.mark.parametrize(
    ("config", "pipeline_name", "photo"),
    [
        ("demo.yaml", "DETECTION", "scene_02.jpg"),
        ("agro.yaml", "FULL_PIPELINE", "scene_01.jpg"),
        ("agro.yaml", "FIELD_ANALYSIS", "large_01.jpg"),
        ("vending.yaml", "SHELF_AUDIT", "scene_03.jpg"),
    ],
)
def test_every_step_answers_on_a_device_frame_as_on_the_host(
    decoder: DeviceDecoder, config: str, pipeline_name: str, photo: str
) -> None:
    """Detection, segmentation (masks, areas), sliced detection (crops of the frame),
    classification (crops brought to the host) and estimation: the same answer from a
    frame decoded and letterboxed on the device as from OpenCV's decode on the host."""
    pipeline = _pipeline(str(REPO_ROOT / "configs" / config), decoder)
    task = make_task("t-a", f"gs://gannet-images/t-a/{photo}", pipeline_name, "t")
    route = pipeline.check(task)
    data = (SAMPLES / photo).read_bytes()
    try:
        host, _ = decode_scaled(data, 10**8, None)
        frame, _ = pipeline.decode(data, route, "cpu")
        assert isinstance(frame, torch.Tensor)
        answers = [
            pipeline.run_image(task, route, f, "cpu", Timer(lambda s, v: None))
            for f in (host, frame)
        ]
    finally:
        pipeline.cache.close()
    found = sum(len(v.get("detections", ())) for v in answers[0].values() if isinstance(v, dict))
    assert found > 0, "the photo must hold objects for the comparison to mean anything"
    _close(answers[0], answers[1], pipeline_name)


def test_the_letterbox_on_the_device_matches_opencvs(decoder: DeviceDecoder) -> None:
    """The model's input from a device frame against ultralytics' own letterbox on the
    host: same shape and padding, pixels within OpenCV's fixed-point rounding."""
    config = str(REPO_ROOT / "configs" / "demo.yaml")
    pipeline = _pipeline(config, decoder)
    try:
        key = pipeline.resolver.key(pipeline.configs.current(), "detection", None, "cpu")
        predictor = pipeline.cache.get(key).predictor
        for photo in ("scene_01.jpg", "large_01.jpg"):
            data = (SAMPLES / photo).read_bytes()
            host = predictor.preprocess(decode_scaled(data, 10**8, None)[0])
            frame = decoder.decode(data)
            assert frame is not None
            device = predictor.preprocess(frame)
            assert device.shape == host.shape and device.dtype == host.dtype == torch.uint8
            diff = (device.int() - host.int()).abs()
            assert diff.float().mean() < 1.0 and diff.max() <= 8, photo
    finally:
        pipeline.cache.close()


@NEEDS_GPU
def test_on_a_gpu_nvjpeg_frames_give_the_host_answer() -> None:
    decoder = DeviceDecoder("cuda:0")
    pipeline = _pipeline(str(REPO_ROOT / "configs" / "agro.yaml"), decoder, "cuda:0")
    task = make_task("t-a", "gs://gannet-images/t-a/x.jpg", "FULL_PIPELINE", "t")
    route = pipeline.check(task)
    try:
        pipeline.warm(["cuda:0"])  # the models, and nvJPEG's first call
        for photo in ("scene_01.jpg", "scene_04.jpg"):
            data = (SAMPLES / photo).read_bytes()
            frame, _ = pipeline.decode(data, route, "cuda:0")
            assert isinstance(frame, torch.Tensor) and frame.is_cuda
            host, _ = decode_scaled(data, 10**8, None)
            answers = [
                pipeline.run_image(task, route, f, "cuda:0", Timer(lambda s, v: None))
                for f in (host, frame)
            ]
            _close(answers[0], answers[1], photo)
    finally:
        pipeline.cache.close()
        decoder.close()
