"""A loaded model's forward pass as a TorchScript trace, which runs without the GIL.

Why: in eager mode each of the ~200 operators of a YOLO forward pass takes the GIL back
before it runs, and runner threads doing Python work (GCS, PostgreSQL, JSON) hold it for
up to the interpreter's switch interval each time, so the batcher's forward pass queues
for the GIL hundreds of times per batch. A traced module runs the whole graph in C++ with
the GIL released, and the runners' work overlaps it. Side by side in `gannet bench` the
daemon gets faster (see docs/benchmark.md).

Only the network inside ultralytics' predictor is swapped: letterboxing, NMS, masks and
Results stay ultralytics' own. A trace records the control flow of one input, so every
trace is compared with the eager model on another batch size and aspect ratio before it
is used; when they differ, or tracing fails, the model stays eager and a warning says so.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from gannet.cuda_graphs import GraphedForward, tensors

log = logging.getLogger(__name__)


class _InferenceOutputs(torch.nn.Module):
    """The network's inference outputs without its raw training dict, which a trace
    cannot return; this is the shape ultralytics' own TorchScript exports have."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> Any:
        out = self.net(x)
        if isinstance(out, tuple) and isinstance(out[-1], dict):
            return out[0]
        return out


def verified_trace(
    net: torch.nn.Module, example: torch.Tensor, check: torch.Tensor, atol: float
) -> torch.jit.ScriptModule | None:
    """`net` traced on `example`, or None unless the trace matches `net` on `check`."""
    with torch.inference_mode(), warnings.catch_warnings():
        # TracerWarnings flag Python-side branches; the check below is what decides.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # type: ignore[attr-defined]
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated")
        traced: torch.jit.ScriptModule = torch.jit.trace(  # type: ignore[no-untyped-call]
            net, example, check_trace=False
        )
        expected, got = tensors(net(check)), tensors(traced(check))
    if len(expected) != len(got):
        return None
    for want, have in zip(expected, got, strict=True):
        if want.shape != have.shape or not torch.allclose(want, have, atol=atol, rtol=1e-3):
            return None
    return traced


def _backend(model: Any) -> Any:
    """ultralytics' backend behind `model.predict` (its `model` is the network that runs),
    or None before the model has predicted."""
    return getattr(getattr(getattr(model, "predictor", None), "model", None), "backend", None)


def graphs_of(model: Any) -> GraphedForward | None:
    """The CUDA graphs trace_forward put behind `model.predict` (on a CUDA device), if any."""
    network = getattr(_backend(model), "model", None)
    return network if isinstance(network, GraphedForward) else None


def graph_bytes(model: Any) -> int:
    """GPU memory `model`'s CUDA graphs hold beside its weights (0 without graphs)."""
    graphs = graphs_of(model)
    return graphs.held_bytes() if graphs is not None else 0


def trace_forward(
    model: Any, imgsz: int, device: str, half: bool, cuda_graphs: bool = False
) -> bool:
    """Swap the eager network behind `model.predict` for a verified trace; on a CUDA
    device with `cuda_graphs`, one replayed as CUDA graphs (cuda_graphs.py).

    `model` is an ultralytics YOLO that has predicted once, so its predictor exists.
    False when the model stays eager: exported formats (.onnx) already run outside
    Python, and a trace that disagrees with the eager model is never used.
    """
    backend = _backend(model)
    net = getattr(backend, "model", None)
    if not isinstance(net, torch.nn.Module) or not getattr(backend, "base_model", False):
        return False
    heads = [m for m in net.modules() if hasattr(m, "dynamic")]
    was_dynamic = [bool(m.dynamic) for m in heads]
    for head in heads:
        # Detection heads cache anchors for the last input shape; dynamic makes them
        # part of the traced graph instead of constants of the example's shape.
        setattr(head, "dynamic", True)  # noqa: B010 - a torch Module attribute
    dtype = torch.float16 if half else torch.float32
    stride = int(getattr(backend, "stride", 32))
    short = max(stride, (imgsz * 3 // 4) // stride * stride)
    example = torch.rand(1, 3, imgsz, imgsz, device=device, dtype=dtype)
    check = torch.rand(2, 3, short, imgsz, device=device, dtype=dtype)
    atol = 1e-2 if half else 1e-4
    eager = _InferenceOutputs(net).eval()
    try:
        traced = verified_trace(eager, example, check, atol=atol)
    except Exception as exc:  # noqa: BLE001 - any failure means: stay eager, and say so
        log.warning("cannot trace the model; it runs eager", extra={"fields": {"error": repr(exc)}})
        return False
    finally:
        # The eager network caches its anchors again: the trace no longer depends on it,
        # and CUDA graphs record it with the anchors of each shape built beforehand.
        for head, was in zip(heads, was_dynamic, strict=True):
            setattr(head, "dynamic", was)  # noqa: B010
    if traced is None:
        log.warning("the traced model disagrees with the eager one; it runs eager")
        return False
    forward: torch.nn.Module = traced
    if cuda_graphs and device.startswith("cuda"):
        forward = GraphedForward(eager, traced, atol)
    setattr(backend, "model", forward)  # noqa: B010 - backend is ultralytics' (untyped)
    # Ultralytics then calls it as model(im), without the eager-only augment/embed.
    setattr(backend, "base_model", False)  # noqa: B010
    return True
