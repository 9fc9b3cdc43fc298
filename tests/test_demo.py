"""`make demo` is the README's first promise: it must run and its counts must be right.
And whatever ends a dev command (its end, Ctrl-C, a closed terminal) stops every service
it started, so that the next `make demo` finds its ports free."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gannet.dev.demo import DaemonProcess
from gannet.dev.local_services import Ports, port_in_use


def _service_args(ports: Ports, state_dir: object) -> list[str]:
    return [
        "--state-dir",
        str(state_dir),
        "--pubsub-port",
        str(ports.pubsub),
        "--gcs-port",
        str(ports.gcs),
        "--postgres-port",
        str(ports.postgres),
    ]


def _left_running(ports: Ports, state_dir: Path) -> list[str]:
    """Services still up: their ports, and the Pub/Sub emulator's own (a JVM that
    listens behind the relay's port and outlives the gcloud wrapper if only that is
    stopped), read from the emulator's log in the state directory."""
    emulator_ports = [
        int(port)
        for log in state_dir.rglob("pubsub.log")
        for port in re.findall(r"--port=(\d+)", log.read_text(errors="replace"))
    ]
    assert emulator_ports, f"no Pub/Sub emulator log under {state_dir}"
    watched = (ports.pubsub, ports.gcs, ports.postgres, *emulator_ports)
    return [f"port {p}" for p in watched if port_in_use(p)]


def test_gannet_demo_runs_the_whole_path_and_the_counts_match(tmp_path):
    ports = Ports.free()
    out = subprocess.run(
        [sys.executable, "-m", "gannet", "demo", *_service_args(ports, tmp_path)],
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
    assert _left_running(ports, tmp_path) == []


def test_a_closed_terminal_stops_the_services_too(tmp_path):
    """`gannet services` runs until Ctrl-C; a terminal closed instead sends SIGHUP, which
    does not reach the services (each runs in a session of its own)."""
    ports = Ports.free()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gannet", "services", *_service_args(ports, tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the environment is printed once every service is up
            if "Ctrl-C stops everything" in line:
                break
        else:
            raise AssertionError("gannet services ended before it was ready")
        proc.send_signal(signal.SIGHUP)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
        assert proc.stdout is not None
        proc.stdout.close()
    assert _left_running(ports, tmp_path) == []


def test_a_daemon_that_ignores_sigterm_is_killed_not_left_running(tmp_path):
    """The demo and the benches stop their daemon with SIGTERM; one that does not exit
    in time (a hung shutdown) is killed before the error is raised, instead of running
    on after the command has ended. A stand-in process plays the hung daemon."""
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    daemon = DaemonProcess({}, tmp_path / "d.log", command=[sys.executable, "-c", stubborn])
    time.sleep(0.5)  # its handler is set
    with pytest.raises(subprocess.TimeoutExpired):
        daemon.stop(timeout_s=0.5)
    assert daemon.proc.poll() is not None
