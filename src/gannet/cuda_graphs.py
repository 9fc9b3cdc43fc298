"""A model's forward pass replayed as CUDA graphs, on a GPU.

Why: measured on an H200 (docs/benchmark.md, "On a GPU again"), one traced forward pass of
the demo detector at imgsz 640 kept the model's batcher thread busy for 2.6-3.1 ms of CPU
whatever the batch size, and the GPU waited on it: the TorchScript interpreter launches
the network's kernels one at a time. The batcher thread is the one way to the GPU, so
with four runners (batches of two) the daemon reached 0.63 of the bare model in batches
of eight. A CUDA graph launches the whole recorded sequence of kernels in one call.

What is recorded is the eager network, not the trace: the trace rebuilds the detection
head's anchor grid on every call from a CPU `arange` copied to the GPU (ultralytics'
make_anchors, kept off-device so traces stay portable), and a copy from pageable host
memory cannot be recorded ("Cannot copy between CPU and CUDA tensors during CUDA graph
capture", on an H200). The eager head caches its grid per input shape instead, so a
warm-up pass of the shape builds the grid on the GPU and the recorded pass only reads it.
Each graph keeps that grid alive, since the head replaces it for the next shape.

A graph is recorded per input shape (batch size, letterboxed height and width), the
first time a batch of that shape comes, in the batcher thread that owns the model. Its
input and output tensors are fixed: each call copies the batch into the input, replays
and hands back copies of the outputs, so an answer a runner has not read yet is never
overwritten by the next batch. All graphs of a model share one memory pool: they run one
at a time, on one stream, and each one's outputs are copied out before the next replays.
Each new graph's answer is compared with the trace's on the same batch; a graph that
differs or fails to record is not used, and nor is one past MAX_GRAPHS shapes: those
batches take the traced pass (a warning names the first shape past the cap).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

MAX_GRAPHS = 32  # shapes per model; each keeps an input tensor of its batch's size
WARM_UP_PASSES = 2  # eager passes on a side stream before recording (cuBLAS, allocator)
# How far a graph's answer may stray from the trace's. A graph runs the eager network's
# kernels as recorded, and on an H200 its FP16 answers differed from the trace's in 0.1 %
# of the outputs, by at most 0.5 (a box side; scores moved less). A wrong graph (a grid of
# another shape, memory overwritten) moves most boxes by a stride (8 px or more).
RTOL = 1e-2
MAX_DIFFERENCE = 1.0  # anywhere
MAX_OUTLIERS = 0.005  # share of outputs allowed outside atol + RTOL * |answer|

_recording = threading.Lock()  # one capture in the process at a time (several models)


def difference(expected: Any, got: Any, atol: float) -> tuple[float, float]:
    """(share of outputs outside atol + RTOL * |expected|, largest difference) between
    two outputs of the network; (1, inf) when their structures differ."""
    want, have = tensors(expected), tensors(got)
    if len(want) != len(have) or any(w.shape != h.shape for w, h in zip(want, have, strict=True)):
        return 1.0, float("inf")
    outside, total, worst = 0, 0, 0.0
    for w, h in zip(want, have, strict=True):
        gap = (w.float() - h.float()).abs()
        outside += int((gap > atol + RTOL * w.float().abs()).sum().item())
        total += gap.numel()
        worst = max(worst, float(gap.max().item()) if gap.numel() else 0.0)
    return outside / max(total, 1), worst


def within_tolerance(share: float, worst: float) -> bool:
    """Whether a graph whose answer is `difference` apart can stand for the trace (RTOL)."""
    return share <= MAX_OUTLIERS and worst <= MAX_DIFFERENCE


def agrees(expected: Any, got: Any, atol: float) -> bool:
    """Whether a graph's answer can stand for the trace's (see RTOL)."""
    return within_tolerance(*difference(expected, got, atol))


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    input: torch.Tensor
    output: Any  # the network's output structure, of tensors the graph writes
    kept: list[torch.Tensor]  # tensors the graph reads that the network may drop (anchors)


def _map(out: Any, fn: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return type(out)(_map(item, fn) for item in out)
    return out


def tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a network's output (a tensor, or tuples and lists of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in tensors(item)]
    return []


def _cached_tensors(net: torch.nn.Module) -> list[torch.Tensor]:
    """Tensors modules hold as plain attributes (a head's anchor grid and strides), not
    parameters or buffers: a graph reads them by address, so it must keep them."""
    return [v for m in net.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)]


class GraphedForward(torch.nn.Module):
    """`eager` recorded as CUDA graphs where it can, `plain` (its verified trace) where not.

    `eager` must cache shape-dependent tensors rather than rebuild them from the host on
    each call (ultralytics heads with `dynamic` off do)."""

    def __init__(self, eager: torch.nn.Module, plain: torch.nn.Module, atol: float) -> None:
        super().__init__()
        self.eager = eager
        self.plain = plain
        self._atol = atol
        self._graphs: dict[tuple[Any, ...], _Graph | None] = {}  # None: the plain pass
        self._pool: Any = None

    def held_bytes(self) -> int:
        """GPU memory the recorded graphs keep: the segments of their shared pool (every
        graph's outputs and work space, reserved while the graphs live) and each graph's
        input. The ModelCache counts it against its budget when a model loads, and
        `gannet bench --in-process` reports it (docs/benchmark.md)."""
        if self._pool is None:
            return 0
        pool = tuple(self._pool)
        segments: list[dict[str, Any]] = torch.cuda.memory_snapshot()  # type: ignore[no-untyped-call]
        in_pool = sum(
            int(segment["total_size"])
            for segment in segments
            if tuple(segment["segment_pool_id"]) == pool
        )
        # A list first: the batcher thread may add a graph meanwhile (the cache asks from
        # the thread that loads another model).
        graphs = list(self._graphs.values())
        return in_pool + sum(g.input.nbytes for g in graphs if g is not None)

    def recorded(self) -> int:
        """How many input shapes replay a graph (the others run the trace)."""
        return sum(g is not None for g in self._graphs.values())

    def forward(self, x: torch.Tensor) -> Any:
        if not x.is_cuda:
            return self.plain(x)
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._graphs:
            if len(self._graphs) == MAX_GRAPHS:  # said once: the first shape past the cap
                log.warning(
                    "a model has %d input shapes with CUDA graphs or without; shape %s and any "
                    "later new shape run the traced pass",
                    MAX_GRAPHS,
                    list(x.shape),
                )
            self._graphs[key] = self._record(x) if len(self._graphs) < MAX_GRAPHS else None
        entry = self._graphs[key]
        if entry is None:
            return self.plain(x)
        entry.input.copy_(x)
        entry.graph.replay()
        return _map(entry.output, torch.clone)

    def _record(self, x: torch.Tensor) -> _Graph | None:
        """A graph for batches shaped like `x`, checked against the trace on `x`."""
        with _recording:
            return self._record_alone(x)

    def _record_alone(self, x: torch.Tensor) -> _Graph | None:
        shape = list(x.shape)
        try:
            static = x.clone()
            stream = torch.cuda.current_stream(x.device)
            side = torch.cuda.Stream(x.device)  # type: ignore[no-untyped-call]
            side.wait_stream(stream)
            with torch.cuda.stream(side):  # warm-up off the capture; builds the head's grid
                for _ in range(WARM_UP_PASSES):
                    self.eager(static)
            stream.wait_stream(side)
            kept = _cached_tensors(self.eager)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            # On x's device, on a stream of its own: torch captures the current device's
            # current stream, and its default capture stream is one per process, made on
            # whichever device was current (cuda:0 in a batcher thread, whatever its
            # model's). A model on cuda:1 captured there recorded nothing (torch only
            # warns "The CUDA Graph is empty") and each replay gave back the recording
            # batch's answer. thread_local: runners letterbox and decode meanwhile.
            capture = torch.cuda.Stream(x.device)  # type: ignore[no-untyped-call]
            with (
                torch.cuda.device(x.device),
                torch.cuda.graph(
                    graph, pool=self._pool, stream=capture, capture_error_mode="thread_local"
                ),
            ):
                output = self.eager(static)
            graph.replay()
            expected = self.plain(x)
        except RuntimeError as exc:
            log.warning(
                "cannot record a CUDA graph for shape %s; it runs the traced pass: %r",
                shape,
                exc,
            )
            return None
        share, worst = difference(expected, output, self._atol)
        if not within_tolerance(share, worst):
            log.warning(
                "a CUDA graph for shape %s disagrees with the traced pass (%.2g %% of outputs "
                "apart, by up to %.4g); it runs the trace",
                shape,
                share * 100,
                worst,
            )
            return None
        log.info("CUDA graph recorded", extra={"fields": {"shape": shape}})
        return _Graph(graph, static, output, kept)
