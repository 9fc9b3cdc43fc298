"""JPEGs decoded on the model's device, in batches: nvJPEG through torchvision on a GPU.

Why: on the CPU, decoding is the largest cost the daemon has around the model for a
phone or drone photo (a 4032x3024 JPEG: about 100 ms at full size, 28 ms at 1/4 scale;
docs/benchmark.md), and its pixels then go to the GPU anyway. nvJPEG decodes straight
into device memory, where the letterbox runs too (split_predictor.py), so the runner's
CPU only reads the header. Runners' photos are decoded together: like a model, the
decoder has one batcher thread (one per process: below), and a batch of JPEGs is one
`torchvision.io.decode_jpeg(list, device=...)` call.

What nvJPEG does not take (corrupt files, a chroma subsampling it does not know) comes
back as None, and the caller decodes it on the CPU as before: a bad file still fails as
undecodable, with the same error. CMYK and YCCK JPEGs never come here: nvJPEG takes
them, but converts their colours only when asked (nvjpegDecodeParamsSetAllowCMYK,
"disabled by default"), which torchvision never does (Pipeline.decode). EXIF orientation
is applied here (nvJPEG ignores it), the same turns OpenCV applies on the host.

torchvision 0.29 (the version torch 2.14 pins) deprecates its image decoders for
TorchCodec's and warns on every call; the warning is silenced here, and moving to
TorchCodec's nvJPEG decoder is for when torchvision drops them.

A process has one decoder, on its first GPU, whatever its number of GPUs: torchvision
keeps one nvJPEG decoder per process, for one device, and a call for another device
replaces it, leaking the one it replaces (decode_jpegs_cuda.cpp: `cudaJpegDecoder.reset`,
and a destructor that frees nothing, its nvjpeg*Destroy calls commented out). A
decoder per GPU, alternating, made a new nvJPEG handle with its pinned and device
buffers at nearly every call and leaked the last. Runners of another GPU get their
frames copied there (`decode`'s `to`).

Which JPEGs come here depends on the GPU (`engine`, Pipeline.decode). One with a JPEG
engine (A100, H100, H200) decodes a batch of them in hardware, so all do. On one without
(a T4) torchvision decodes one photo at a time and nvJPEG runs the Huffman stage on this
thread's CPU, under a process-wide lock. For a photo the runner would decode at reduced
scale, that stage is nearly all its CPU decode costs (docs/benchmark.md, "Phone
photos"), so there the runners decode such photos themselves, on every core, rather
than queue on one; smaller ones still come here. `has_jpeg_engine` asks nvJPEG, as
torchvision does.

The same code runs with a CPU device (libjpeg-turbo through torchvision); the daemon
only builds a decoder for CUDA devices, the tests build one on the CPU to check the path.
torchvision is imported only where a decoder decodes or asks nvJPEG: a daemon without
one (on a CPU) does not load it (1.3 s of a start; model_cache._skip_warmup).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch

from gannet.batcher import Batcher
from gannet.frames import upright
from gannet.metrics import Metrics
from gannet.settings import GpuDecode

log = logging.getLogger(__name__)
warnings.filterwarnings(
    "ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning
)

Decoded = torch.Tensor | RuntimeError  # a 3xHxW RGB frame, or why the device refused it

# nvjpeg.h: nvjpegBackend_t NVJPEG_BACKEND_HARDWARE, nvjpegStatus_t values.
_BACKEND_HARDWARE = 3
_STATUS_SUCCESS = 0
_STATUS_ARCH_MISMATCH = 7


class DeviceDecoder:
    def __init__(
        self,
        device: str,
        max_batch: int = 8,
        window_s: float = 0.0,
        metrics: Metrics | None = None,
        engine: bool = True,
    ) -> None:
        """`metrics`: each call's wall time goes to gannet_device_decode_seconds, whose
        rate is how busy this one thread is (runbook.md), and its JPEGs to
        gannet_device_decode_batch_size. `engine`: whether the device
        decodes JPEGs in hardware; without, only the JPEGs the runners cannot decode at
        reduced scale are sent here (Pipeline.decode)."""
        self.device = device
        self.engine = engine
        # (seconds per call, JPEGs per call): the two histograms' children for this device
        self._observed = (
            (
                metrics.device_decode_seconds.labels(device),
                metrics.device_decode_batch_size.labels(device),
            )
            if metrics
            else None
        )
        self._batcher = Batcher(
            f"jpeg@{device}", self._decode_batch, max_batch, window_s, on_batch=self._observe
        )

    def decode(
        self, data: bytes, orientation: int = 1, to: str | None = None
    ) -> torch.Tensor | None:
        """The JPEG as a 3xHxW RGB uint8 frame on the device (or on `to`, a runner's
        other GPU), upright; None when the device's decoder refuses it (decode it on
        the CPU then)."""
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        (future,) = self._batcher.submit([encoded])
        decoded = future.result()
        if isinstance(decoded, RuntimeError):
            log.debug("device decode refused a JPEG (%s); decoding on the CPU", decoded)
            return None
        turned: torch.Tensor = upright(decoded, orientation)
        return turned if to is None or to == self.device else turned.to(to)

    def close(self) -> None:
        self._batcher.close()
        self._batcher.join(timeout=10.0)

    def _observe(self, size: int, seconds: float) -> None:
        """After each call, on the batcher thread."""
        if self._observed is not None:
            busy, sizes = self._observed
            busy.observe(seconds)
            sizes.observe(size)

    def _decode_batch(self, batch: list[torch.Tensor]) -> list[Decoded]:
        """Batcher thread: one call for the batch; one file that fails fails the call, so
        then each is decoded alone and only the bad one is refused."""
        from torchvision.io import ImageReadMode, decode_jpeg  # only here: see the module's doc

        try:
            return list(decode_jpeg(batch, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError as exc:
            if len(batch) == 1:
                return [exc]
            return [self._decode_batch([one])[0] for one in batch]


@functools.cache
def has_jpeg_engine() -> bool | None:
    """Whether the GPU decodes JPEGs in hardware: nvJPEG's hardware backend can be
    created (torchvision's own test before it decodes; NVJPEG_STATUS_ARCH_MISMATCH where
    there is none). None when nvJPEG cannot say: no libnvjpeg, or no usable GPU. Asked
    once per process: a pod has one model of GPU."""
    import torchvision  # only here: see the module's doc

    bundled = Path(torchvision.__file__).parent.parent / "torchvision.libs"  # the wheel's
    libs = sorted(bundled.glob("libnvjpeg*"))
    try:
        nvjpeg = ctypes.CDLL(str(libs[0]) if libs else "libnvjpeg.so")
    except OSError as exc:
        log.warning("cannot load nvJPEG to ask for a JPEG engine: %s", exc)
        return None
    handle = ctypes.c_void_p()
    status = nvjpeg.nvjpegCreateEx(_BACKEND_HARDWARE, None, None, 0, ctypes.byref(handle))
    if status == _STATUS_SUCCESS:
        nvjpeg.nvjpegDestroy(handle)
        return True
    if status == _STATUS_ARCH_MISMATCH:
        return False
    log.warning("nvJPEG's hardware backend failed with status %d: no answer", status)
    return None


def device_decoders(
    mode: GpuDecode,
    devices: Iterable[str],
    max_batch: int,
    metrics: Metrics | None,
) -> dict[str, DeviceDecoder]:
    """Unless `mode` is off, the decoder of every CUDA device: one, on the first (see
    the module's doc); says in the log which JPEGs go to it."""
    cuda = [d for d in devices if d.startswith("cuda")]
    if mode == "off" or not cuda:
        return {}
    if mode == "all":
        engine = True
        log.info("GANNET_GPU_DECODE=all: every JPEG is decoded on %s (nvJPEG)", ", ".join(cuda))
    else:
        found = has_jpeg_engine()
        engine = found is not False  # unknown: as if it had one, every JPEG on the device
        name = torch.cuda.get_device_name(cuda[0]) if torch.cuda.is_available() else cuda[0]
        if found is False:
            log.info(
                "%s has no JPEG engine: JPEGs the runners can decode at reduced scale "
                "(a longer side of 3x the model input's or more, in pipelines that allow "
                "it) are decoded on the CPU, on every core; others on the GPU (nvJPEG). "
                "GANNET_GPU_DECODE=all sends every JPEG to the GPU",
                name,
            )
        else:
            log.info(
                "%s: every JPEG is decoded on the GPU (nvJPEG%s)",
                name,
                ", its JPEG engine" if found else "; whether it has a JPEG engine is unknown",
            )
    decoder = DeviceDecoder(cuda[0], max_batch=max_batch, metrics=metrics, engine=engine)
    return dict.fromkeys(cuda, decoder)
