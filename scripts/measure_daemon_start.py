#!/usr/bin/env python3
"""How long a daemon takes to start: from `gannet run`'s process start to its /readyz,
the demo config on a CPU, against local services started once. The test suite pays it
at every daemon it starts, a CPU bench at every measurement.

With a baseline, its daemon (`git archive REV src`, run from PYTHONPATH) and this
tree's start in turns, a few starts each per round, since this VM drifts from minute to
minute; it prints each round's median per daemon.

    YOLO_OFFLINE=1 .venv/bin/python scripts/measure_daemon_start.py [--baseline REV]
        [--rounds 3] [--starts 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from gannet.dev.bench_plumbing import baseline_src
from gannet.dev.stack import make_stack, prepared_services
from gannet.settings import REPO_ROOT

# Named for both: a baseline's tree outside the repo would look for its own configs/.
CONFIG = {"GANNET_CONFIG_URI": str(REPO_ROOT / "configs" / "demo.yaml")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="a commit whose daemon starts in turns with this tree's")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--starts", type=int, default=3, help="starts per daemon per round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        daemons = {"this tree": CONFIG}
        if args.baseline:
            src = baseline_src(args.baseline, state / "baseline")
            daemons = {f"baseline {args.baseline}": {**CONFIG, "PYTHONPATH": str(src)}, **daemons}
        with prepared_services(state / "services") as services:
            (state / "logs").mkdir()
            stack = make_stack(services, state / "logs")
            for n in range(1, args.rounds + 1):
                for name, env in daemons.items():
                    seconds = []
                    for _ in range(args.starts):
                        started = time.monotonic()
                        daemon = stack.start_daemon(**env)
                        seconds.append(time.monotonic() - started)
                        daemon.stop()
                    each = ", ".join(f"{s:.2f}" for s in seconds)
                    print(
                        f"round {n}, {name}: median {statistics.median(seconds):.2f} s ({each})",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
