"""`gannet run` with the network's answers recorded once per input and replayed.

`gannet bench --plumbing` runs the daemon this way to measure everything around the
model: on a GPU the forward pass costs a few milliseconds, on this project's CPU machine
it costs tens, and it would hide what the daemon itself spends per image. Everything
else is the real thing: the config's imgsz, ultralytics' pre-processing, NMS and Results
on the model's own outputs, GCS, PostgreSQL and Pub/Sub.

The first time an input is seen (its letterboxed tensor, fingerprinted) the real network
runs and its answer is kept; later the same input gets the kept answer. The bench sends
every distinct image once before it starts measuring. With `--answers DIR` answers are
also written to DIR and looked up there, so that several daemons on one subscription
(the bench's one-daemon-per-core run) share what any of them recorded.

Run as `python -m gannet.dev.replay [--answers DIR]`, with the same environment as
`gannet run`.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gannet import daemon
from gannet.model_cache import Loader, ModelKey
from gannet.settings import Settings
from gannet.split_predictor import output_row
from gannet.supervisor import supervise

log = logging.getLogger(__name__)


def fingerprint(row: torch.Tensor) -> bytes:
    """One image's input tensor, identified from every 32nd pixel of every channel: the
    bench's images differ everywhere, and hashing all of a 640x640 input would cost
    more than the rest of replaying it."""
    sample = row[:, ::32, ::32].contiguous().cpu().numpy()
    digest = hashlib.blake2b(sample.tobytes(), digest_size=16)
    digest.update(str(tuple(row.shape)).encode())
    return digest.digest()


def concat(rows: list[Any]) -> Any:
    """The batched output that `output_row` would split into `rows`."""
    first = rows[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(rows) if len(rows) > 1 else first
    if isinstance(first, (tuple, list)):
        return type(first)(concat([r[i] for r in rows]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: concat([r[k] for r in rows]) for k in first}
    return first


class Replay:
    """Stands in for the predictor's `inference` (the batcher thread's only call)."""

    def __init__(self, real: Callable[..., Any], store: Path | None = None) -> None:
        self._real = real
        self._answers: dict[bytes, Any] = {}
        self._store = store
        self.recorded = 0
        self.replayed = 0

    def _known(self, key: bytes) -> Any:
        answer = self._answers.get(key)
        if answer is None and self._store is not None:
            path = self._store / f"{key.hex()}.pt"
            if path.exists():
                answer = self._answers[key] = torch.load(path)
        return answer

    def _keep(self, key: bytes, answer: Any) -> None:
        self._answers[key] = answer
        if self._store is not None:
            self._store.mkdir(parents=True, exist_ok=True)
            path = self._store / f"{key.hex()}.pt"
            partial = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save(answer, partial)
            partial.replace(path)  # another daemon never reads half a file

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        keys = [fingerprint(x[i]) for i in range(len(x))]
        known = [self._known(k) for k in keys]
        if all(answer is not None for answer in known):
            self.replayed += len(keys)
            return concat(known)
        out = self._real(x, *args, **kwargs)
        for i, key in enumerate(keys):
            self._keep(key, output_row(out, i))
        self.recorded += len(keys)
        return out


def replaying(load: Loader, store: Path | None = None) -> Loader:
    """A loader whose models replay recorded answers (see the module docstring)."""

    def load_replaying(key: ModelKey) -> tuple[Any, int]:
        model, nbytes = load(key)
        model.predictor.inference = Replay(model.predictor.inference, store)
        log.warning(
            "plumbing mode: this model's network runs once per distinct input, then its "
            "answers are replayed (gannet bench --plumbing)",
            extra={"model": key.label()},
        )
        return model, nbytes

    return load_replaying


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gannet.dev.replay", description=__doc__)
    parser.add_argument("--answers", type=Path, help="share recorded answers through DIR")
    args = parser.parse_args(argv)
    settings = Settings()
    if settings.supervises:  # each process it starts is this same command
        command = [sys.executable, "-m", "gannet.dev.replay", *(argv or sys.argv[1:])]
        return supervise(settings, command)
    return daemon.run(settings, wrap_loader=lambda load: replaying(load, args.answers))


if __name__ == "__main__":
    sys.exit(main())
