"""JPEGs decoded on the model's device, in batches: nvJPEG through torchvision on a GPU.

Why: on the CPU, decoding is the largest cost the daemon has around the model for a
phone or drone photo (a 4032x3024 JPEG: about 100 ms at full size, 28 ms at 1/4 scale;
docs/benchmark.md), and its pixels then go to the GPU anyway. nvJPEG decodes straight
into device memory, where the letterbox runs too (split_predictor.py), so the runner's
CPU only reads the header. Runners' photos are decoded together: like a model, the
decoder has one batcher thread per device, and a batch of JPEGs is one
`torchvision.io.decode_jpeg(list, device=...)` call.

What nvJPEG does not take (CMYK, some progressive or corrupt files) comes back as None,
and the caller decodes it on the CPU as before: a bad file still fails as undecodable,
with the same error. EXIF orientation is applied here (nvJPEG ignores it), the same
turns OpenCV applies on the host.

torchvision 0.29 (the version torch 2.14 pins) deprecates its image decoders for
TorchCodec's and warns on every call; the warning is silenced here, and moving to
TorchCodec's nvJPEG decoder is for when torchvision drops them.

The same code runs with a CPU device (libjpeg-turbo through torchvision); the daemon
only builds a decoder for CUDA devices, the tests build one on the CPU to check the path.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from gannet.batcher import Batcher
from gannet.frames import upright
from gannet.metrics import Metrics

log = logging.getLogger(__name__)
warnings.filterwarnings(
    "ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning
)

Decoded = torch.Tensor | RuntimeError  # a 3xHxW RGB frame, or why the device refused it


class DeviceDecoder:
    def __init__(
        self,
        device: str,
        max_batch: int = 8,
        window_s: float = 0.0,
        metrics: Metrics | None = None,
    ) -> None:
        """`metrics`: each call's wall time goes to gannet_device_decode_seconds, whose
        rate is how busy this one thread is. On a GPU without a JPEG engine (a T4)
        torchvision decodes a batch one JPEG at a time, nvJPEG's Huffman stage on this
        thread's CPU, so with large photos the thread can be what binds (runbook.md)."""
        self.device = device
        self._busy = metrics.device_decode_seconds.labels(device) if metrics else None
        self._batcher = Batcher(
            f"jpeg@{device}", self._decode_batch, max_batch, window_s, on_batch=self._observe
        )

    def decode(self, data: bytes, orientation: int = 1) -> torch.Tensor | None:
        """The JPEG as a 3xHxW RGB uint8 frame on the device, upright; None when the
        device's decoder refuses it (decode it on the CPU then)."""
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        (future,) = self._batcher.submit([encoded])
        decoded = future.result()
        if isinstance(decoded, RuntimeError):
            log.debug("device decode refused a JPEG (%s); decoding on the CPU", decoded)
            return None
        turned: torch.Tensor = upright(decoded, orientation)
        return turned

    def close(self) -> None:
        self._batcher.close()
        self._batcher.join(timeout=10.0)

    def _observe(self, size: int, seconds: float) -> None:
        """After each call, on the batcher thread."""
        if self._busy is not None:
            self._busy.observe(seconds)

    def _decode_batch(self, batch: list[torch.Tensor]) -> list[Decoded]:
        """Batcher thread: one call for the batch; one file that fails fails the call, so
        then each is decoded alone and only the bad one is refused."""
        try:
            return list(decode_jpeg(batch, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError as exc:
            if len(batch) == 1:
                return [exc]
            return [self._decode_batch([one])[0] for one in batch]
