"""A traced model's forward pass replayed as CUDA graphs, on a GPU.

Why: measured on an H200 with `gannet bench --in-process` (docs/benchmark.md, "On a
GPU"), a forward pass of the demo detector at imgsz 640 kept the model's batcher thread
busy for about 8-10 ms whatever the batch size: the TorchScript interpreter launching
the network's kernels one at a time, while the GPU ran them in a fraction of that. The
batcher thread is the one way to the GPU, so with four runners (batches of two) the
daemon reached only 0.63 of the bare model in batches of eight. A CUDA graph launches
the whole recorded sequence of kernels in one call.

A graph is recorded per input shape (batch size, letterboxed height and width), the
first time a batch of that shape comes, in the batcher thread that owns the model. Its
input and output tensors are fixed: each call copies the batch into the input, replays
and hands back copies of the outputs, so an answer a runner has not read yet is never
overwritten by the next batch. All graphs of a model share one memory pool: they run one
at a time, on one stream. Each new graph's answer is compared with the plain forward
pass on the same batch; a graph that differs or fails to record is not used, and nor
is one past MAX_GRAPHS shapes: those batches take the plain forward pass.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

MAX_GRAPHS = 32  # shapes per model; each keeps an input tensor of its batch's size


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    input: torch.Tensor
    output: Any  # the network's output structure, of tensors the graph writes


def _map(out: Any, fn: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        return type(out)(_map(item, fn) for item in out)
    return out


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


class GraphedForward(torch.nn.Module):
    """`net` (a verified trace on a CUDA device) run through CUDA graphs where it can."""

    def __init__(self, net: torch.nn.Module, atol: float) -> None:
        super().__init__()
        self.net = net
        self._atol = atol
        self._graphs: dict[tuple[Any, ...], _Graph | None] = {}  # None: plain pass
        self._pool: Any = None

    def forward(self, x: torch.Tensor) -> Any:
        if not x.is_cuda:
            return self.net(x)
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._graphs:
            self._graphs[key] = self._record(x) if len(self._graphs) < MAX_GRAPHS else None
        entry = self._graphs[key]
        if entry is None:
            return self.net(x)
        entry.input.copy_(x)
        entry.graph.replay()
        return _map(entry.output, torch.clone)

    def _record(self, x: torch.Tensor) -> _Graph | None:
        """A graph for batches shaped like `x`, checked against the plain pass on `x`."""
        shape = list(x.shape)
        try:
            static = x.clone()
            side = torch.cuda.Stream(x.device)  # type: ignore[no-untyped-call]
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):  # warm-up off the capture: cuDNN picks, allocations
                self.net(static)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            # thread_local: runners letterbox on this GPU meanwhile, on other streams.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                output = self.net(static)
            graph.replay()
            expected, got = _tensors(self.net(x)), _tensors(output)
        except RuntimeError as exc:
            log.warning(
                "cannot record a CUDA graph; this shape runs without one",
                extra={"fields": {"shape": shape, "error": repr(exc)}},
            )
            return None
        agree = len(expected) == len(got) and all(
            want.shape == have.shape and torch.allclose(want, have, atol=self._atol, rtol=1e-3)
            for want, have in zip(expected, got, strict=True)
        )
        if not agree:
            log.warning(
                "a CUDA graph disagrees with the plain forward pass; this shape runs without one",
                extra={"fields": {"shape": shape}},
            )
            return None
        log.info("CUDA graph recorded", extra={"fields": {"shape": shape}})
        return _Graph(graph, static, output)
