"""`make demo` is the README's first promise: it must run and its counts must be right."""

from __future__ import annotations

import os
import subprocess
import sys

from gannet.dev.local_services import Ports


def test_gannet_demo_runs_the_whole_path_and_the_counts_match(tmp_path):
    ports = Ports.free()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gannet",
            "demo",
            "--state-dir",
            str(tmp_path),
            "--pubsub-port",
            str(ports.pubsub),
            "--gcs-port",
            str(ports.gcs),
            "--postgres-port",
            str(ports.postgres),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "YOLO_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "image" in out.stdout and "expected" in out.stdout and "result" in out.stdout
    assert "MISMATCH" not in out.stdout and "MISSING" not in out.stdout
    assert "results match the known contents" in out.stdout
    assert "gs://gannet-results/" in out.stdout
    # Services are stopped afterwards: the ports are free again.
    from gannet.dev.local_services import port_in_use

    assert not any(port_in_use(p) for p in (ports.pubsub, ports.gcs, ports.postgres))
