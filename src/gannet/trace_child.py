"""`python -m gannet.trace_child WEIGHTS TASK IMGSZ DEVICE safe|unsafe OUT`: a model's
verified trace, saved to OUT for the daemon to load (traced.trace_apart).

Why a process of its own: torch keeps each trace's module types in its global
compilation unit for the life of the process (about 18 MB for a small YOLO), and a
daemon loads models for as long as it runs; torch.jit.load of the saved trace leaves
nothing behind. The model is loaded and warmed as the daemon loads it (warm_model), so
the trace is of the network the daemon runs. Exit status 0: saved; NO_TRACE (3): the
model cannot be traced or its trace disagrees (it runs eager, as in the daemon); other:
an error, on stderr.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path


def _die_with_parent() -> None:
    """Ended by the kernel when the daemon that started it dies (a kill -9, the
    supervisor's restart): an orphan would go on loading a model beside its successor.
    The kernel ties it to the thread that started the child, a model cache's load
    thread, which lives as long as the daemon. Linux only; elsewhere the child ends on
    its own once done."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(1)


PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    weights, task, imgsz, device, safe, out = argv
    _die_with_parent()
    import torch

    from gannet.model_cache import ModelKey, warm_model
    from gannet.traced import NO_TRACE, jit_quietly, trace_network

    torch.set_num_threads(1)  # one core: the daemon's runners go on serving meanwhile
    key = ModelKey(weights, "", device, int(imgsz), task)
    model = warm_model(Path(weights), key, safe == "safe")
    traced = trace_network(model, key.imgsz, device, half=device.startswith("cuda"))
    if traced is None:
        return NO_TRACE
    with jit_quietly():
        torch.jit.save(traced, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
