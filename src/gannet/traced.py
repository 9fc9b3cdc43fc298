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

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
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


@contextlib.contextmanager
def jit_quietly() -> Iterator[None]:
    """torch.jit's trace, save and load without the warning that they are deprecated
    for torch.export, which is not a trace (one line per model loaded, in every log)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated")
        yield


def verified_trace(
    net: torch.nn.Module, example: torch.Tensor, check: torch.Tensor, atol: float
) -> torch.jit.ScriptModule | None:
    """`net` traced on `example`, or None unless the trace matches `net` on `check`."""
    with torch.inference_mode(), jit_quietly():
        # TracerWarnings flag Python-side branches; the check below is what decides.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # type: ignore[attr-defined]
        traced: torch.jit.ScriptModule = torch.jit.trace(  # type: ignore[no-untyped-call]
            net, example, check_trace=False
        )
        expected, got = tensors(net(check)), tensors(traced(check))
    return traced if _same(expected, got, atol) else None


def _same(expected: list[torch.Tensor], got: list[torch.Tensor], atol: float) -> bool:
    return len(expected) == len(got) and all(
        want.shape == have.shape and torch.allclose(want, have, atol=atol, rtol=1e-3)
        for want, have in zip(expected, got, strict=True)
    )


def _atol(half: bool) -> float:
    """How far a trace's answer may stray from the eager network's (FP16 on GPUs)."""
    return 1e-2 if half else 1e-4


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


@contextlib.contextmanager
def _dynamic_heads(net: torch.nn.Module) -> Iterator[None]:
    """Detection heads cache anchors for the last input shape; dynamic makes them part of
    the traced graph instead of constants of the example's shape, and lets the eager
    network answer another shape for the comparison. Restored after: the eager network
    caches its anchors again (CUDA graphs record it with each shape's built beforehand)."""
    heads = [m for m in net.modules() if hasattr(m, "dynamic")]
    was_dynamic = [bool(m.dynamic) for m in heads]
    for head in heads:
        setattr(head, "dynamic", True)  # noqa: B010 - a torch Module attribute
    try:
        yield
    finally:
        for head, was in zip(heads, was_dynamic, strict=True):
            setattr(head, "dynamic", was)  # noqa: B010


def _inputs(
    backend: Any, imgsz: int, device: str, half: bool
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The trace's example (one square image), the check it must pass (two images of
    another aspect ratio) and the tolerance of that check."""
    dtype = torch.float16 if half else torch.float32
    stride = int(getattr(backend, "stride", 32))
    short = max(stride, (imgsz * 3 // 4) // stride * stride)
    example = torch.rand(1, 3, imgsz, imgsz, device=device, dtype=dtype)
    check = torch.rand(2, 3, short, imgsz, device=device, dtype=dtype)
    return example, check, _atol(half)


def _network(model: Any) -> tuple[Any, torch.nn.Module] | None:
    """(ultralytics' backend, its eager network), or None when there is no network to
    trace: exported formats (.onnx) already run outside Python."""
    backend = _backend(model)
    net = getattr(backend, "model", None)
    if not isinstance(net, torch.nn.Module) or not getattr(backend, "base_model", False):
        return None
    return backend, net


def trace_network(model: Any, imgsz: int, device: str, half: bool) -> torch.jit.ScriptModule | None:
    """`model`'s network traced and verified (None: it cannot be, or disagrees). In this
    process: torch keeps each trace's module types in its global compilation unit for
    good (about 18 MB for a small YOLO), so a long-running daemon traces here only what
    it loads at start-up, and any later load in a process of its own (`trace_apart`)."""
    found = _network(model)
    if found is None:
        return None
    backend, net = found
    example, check, atol = _inputs(backend, imgsz, device, half)
    with _dynamic_heads(net):
        try:
            traced = verified_trace(_InferenceOutputs(net).eval(), example, check, atol=atol)
        except Exception as exc:  # noqa: BLE001 - any failure means: stay eager, and say so
            log.warning(
                "cannot trace the model; it runs eager", extra={"fields": {"error": repr(exc)}}
            )
            return None
    if traced is None:
        log.warning("the traced model disagrees with the eager one; it runs eager")
    return traced


def _agrees(
    backend: Any,
    net: torch.nn.Module,
    traced: torch.jit.ScriptModule,
    imgsz: int,
    device: str,
    half: bool,
) -> bool:
    """A trace made elsewhere (trace_apart) answers as this process's eager network."""
    _, check, atol = _inputs(backend, imgsz, device, half)
    with _dynamic_heads(net), torch.inference_mode():
        expected, got = tensors(_InferenceOutputs(net).eval()(check)), tensors(traced(check))
    return _same(expected, got, atol)


def _share_weights(net: torch.nn.Module, traced: torch.jit.ScriptModule) -> None:
    """The eager network's parameters and buffers made the loaded trace's own tensors.
    A trace made here shares them; one loaded from a file has copies, and the eager
    network stays alive behind it (ultralytics' model, CUDA graphs' recording): every
    model loaded after start-up held its weights twice, on the GPU against the budget."""
    own: dict[str, torch.Tensor] = dict(traced.named_parameters())
    own.update(traced.named_buffers())
    for name, tensor in [*net.named_parameters(), *net.named_buffers()]:
        theirs = own.get(f"net.{name}")
        if theirs is not None and theirs.shape == tensor.shape and theirs.dtype == tensor.dtype:
            tensor.data = theirs.data


def install(
    model: Any,
    traced: torch.jit.ScriptModule,
    device: str,
    half: bool,
    cuda_graphs: bool = False,
) -> None:
    """Swap the eager network behind `model.predict` for `traced`; on a CUDA device with
    `cuda_graphs`, one replayed as CUDA graphs (cuda_graphs.py)."""
    found = _network(model)
    assert found is not None, "install after trace_network found a network"
    backend, net = found
    forward: torch.nn.Module = traced
    if cuda_graphs and device.startswith("cuda"):
        forward = GraphedForward(_InferenceOutputs(net).eval(), traced, _atol(half))
    setattr(backend, "model", forward)  # noqa: B010 - backend is ultralytics' (untyped)
    # Ultralytics then calls it as model(im), without the eager-only augment/embed.
    setattr(backend, "base_model", False)  # noqa: B010


def trace_forward(
    model: Any, imgsz: int, device: str, half: bool, cuda_graphs: bool = False
) -> bool:
    """Swap the eager network behind `model.predict` for a verified trace made in this
    process (see trace_network); on a CUDA device with `cuda_graphs`, one replayed as
    CUDA graphs (cuda_graphs.py).

    `model` is an ultralytics YOLO that has predicted once, so its predictor exists.
    False when the model stays eager: exported formats (.onnx) already run outside
    Python, and a trace that disagrees with the eager model is never used.
    """
    traced = trace_network(model, imgsz, device, half)  # None too without a network
    if traced is None:
        return False
    install(model, traced, device, half, cuda_graphs)
    return True


def trace_apart(
    model: Any,
    command: list[str],
    device: str,
    imgsz: int,
    half: bool,
    cuda_graphs: bool = False,
) -> bool:
    """As trace_forward, the trace made by `command` (gannet.trace_child, which writes
    it to the path its last argument names) and loaded here: torch.jit.load leaves
    nothing behind in this process, where a trace leaves its types for good. The trace
    is checked against this process's eager network before it is used. A child that
    fails is said, and the trace is made here instead: a model left eager would be many
    times slower while runners hold the GIL (docs/benchmark.md)."""
    found = _network(model)
    if found is None:
        return False
    backend, net = found
    _sweep_scratch()
    # One child at a time: each holds a model (hundreds of MB of memory, a CUDA context
    # on a GPU) beside the daemon's, and loads run on as many threads as runners.
    with _ONE_CHILD, tempfile.TemporaryDirectory(prefix=f"{_SCRATCH}{os.getpid()}-") as scratch:
        out = Path(scratch) / "traced.pt"
        try:
            done = subprocess.run(
                [*command, str(out)], capture_output=True, text=True, timeout=TRACE_CHILD_S
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            why = repr(exc)
        else:
            why = (done.stderr or done.stdout).strip()[-500:]
            if done.returncode == NO_TRACE:  # the child said why
                log.warning(
                    "the model cannot be traced; it runs eager", extra={"fields": {"why": why}}
                )
                return False
            if done.returncode == 0:
                with jit_quietly():
                    traced = torch.jit.load(str(out), map_location=device)  # type: ignore[no-untyped-call]
                if _agrees(backend, net, traced, imgsz, device, half):
                    _share_weights(net, traced)
                    install(model, traced, device, half, cuda_graphs)
                    return True
                why = "its trace disagrees with this process's eager model"
    log.warning(
        "tracing in a process of its own failed; traced here (about 18 MB kept for good)",
        extra={"fields": {"error": why}},
    )
    return trace_forward(model, imgsz, device, half, cuda_graphs)


def _sweep_scratch() -> None:
    """Scratch folders of daemons gone (killed while their child traced: a trace each,
    in the pod's /tmp, which has a size limit); those of live ones (GANNET_PROCESSES)
    stay."""
    for folder in Path(tempfile.gettempdir()).glob(f"{_SCRATCH}*"):
        pid = folder.name[len(_SCRATCH) :].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


# How long a child may take to load and trace a model (a load thread waits for it), and
# its exit status when the model cannot be traced (it then runs eager, as a failed
# trace_forward leaves it).
TRACE_CHILD_S = 180.0
NO_TRACE = 3
_SCRATCH = "gannet-trace-"
_ONE_CHILD = threading.Lock()
