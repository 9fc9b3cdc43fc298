"""The local services themselves, where the repo changes how one of them runs."""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import sys
import urllib.request

import pytest
from conftest import SAMPLES
from google.auth.credentials import AnonymousCredentials

from gannet.dev.local_services import (
    LocalServices,
    Ports,
    ServiceError,
    _stop_left,
    port_in_use,
)
from gannet.gcs_http import Endpoint, HTTPError
from gannet.storage import Storage, make_client
from gannet.task import GsUrl


def test_the_gcs_emulator_queues_many_connections_at_once(services: LocalServices):
    """gcp-storage-emulator serves one connection at a time. With Python's default listen
    queue of 5, the kernel drops further connection attempts and clients retry a second
    later, which stalled runners; local_services runs it with a queue of 128.

    The first connection sends nothing, so the emulator waits on it and every other
    connection can only be queued by the kernel: each must still connect at once."""
    port = services.ports.gcs
    with contextlib.ExitStack() as stack:
        for _ in range(20):
            conn = stack.enter_context(socket.socket())
            conn.settimeout(0.5)  # a dropped SYN is retried after 1 s: this then raises
            conn.connect(("127.0.0.1", port))
    with urllib.request.urlopen(f"{services.gcs_endpoint}/storage/v1/b", timeout=10) as resp:
        assert resp.status == 200, "the emulator serves again once the idle connections close"


def test_the_gcs_emulator_speaks_https_with_a_certificate_only_gannet_is_told_to_trust(
    tmp_path, monkeypatch
):
    """`gannet bench --plumbing --gcs-tls`: Cloud Storage is HTTPS, where a large photo is
    read one TLS record at a time; the emulator then serves HTTPS too, and gannet's own
    code runs unchanged, trusting its certificate through the variables OpenSSL and
    requests read (tls_env). Only the GCS emulator is started here: the others take
    20 s and are not what this tests."""
    services = LocalServices(tmp_path, Ports.free(), gcs_tls=True)
    try:
        services._start_gcs()
        services._wait("gcs", services._gcs_ready, 30)
        assert services.gcs_endpoint.startswith("https://")
        for name, value in services.tls_env().items():
            monkeypatch.setenv(name, value)
        client = make_client(services.project, services.gcs_endpoint)
        client.create_bucket("images")
        photo = (SAMPLES / "large_01.jpg").read_bytes()
        storage = Storage(client)
        storage.write("images", "t/photo.jpg", photo, "image/jpeg")
        assert storage.read(GsUrl.parse("gs://images/t/photo.jpg"), len(photo)) == photo
        assert client.bucket("images").blob("t/photo.jpg").download_as_bytes() == photo
        # A model's download, on a session and connections of its own, trusts it too.
        generation = storage.generation("gs://images/t/photo.jpg")
        cached = storage.download_to("gs://images/t/photo.jpg", generation, tmp_path / "models")
        assert cached.read_bytes() == photo

        monkeypatch.delenv("SSL_CERT_FILE")  # not trusted: refused, not read in clear
        untrusted = Endpoint(services.gcs_endpoint, AnonymousCredentials())
        with pytest.raises(ssl.SSLCertVerificationError):
            untrusted.request("GET", "/storage/v1/b")
        plain = Endpoint(services.gcs_endpoint.replace("https:", "http:"), AnonymousCredentials())
        with pytest.raises(HTTPError):  # and no plain HTTP beside it
            plain.request("GET", "/storage/v1/b")
    finally:
        services.stop()


_HOLDER = """
import sys, time
from pathlib import Path
from gannet.dev.local_services import LocalServices, Ports
services = LocalServices(Path(sys.argv[1]), Ports(*map(int, sys.argv[2:5])))
services.start()
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_services_a_killed_run_left_are_stopped_by_the_next_run(tmp_path, caplog):
    """A `gannet demo`, `services` or bench killed with -9 (or by the OOM killer) left
    its emulators and PostgreSQL running, holding the default ports: the next `make
    demo` failed on them until someone found the processes. The next run with that
    --state-dir stops them, whichever command's folder of it they were recorded in
    (only the processes recorded, by pid and start time), and says so; a run still
    alive keeps its services."""
    ports = Ports.free()
    killed_demo = tmp_path / "demo"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(killed_demo), *map(str, vars(ports).values())],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(ServiceError, match=f"belong to a running process \\(pid {holder.pid}"):
            LocalServices(killed_demo, ports).start()
        with LocalServices(tmp_path / "bench", Ports.free()):  # beside a live run: kept
            assert all(port_in_use(port) for port in vars(ports).values())
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert all(port_in_use(port) for port in vars(ports).values())  # left running

    caplog.set_level("WARNING", logger="gannet.dev.local_services")
    with LocalServices(tmp_path / "services", ports) as services:  # another command's
        assert set(services.pids()) >= {"pubsub", "gcs", "postgres"}
    assert [r.message for r in caplog.records] == [
        "stopped the local services a killed run left running"
    ]
    assert not any(port_in_use(port) for port in vars(ports).values())
    assert not list(tmp_path.glob("*/services.json"))


def test_a_recorded_pid_now_anothers_is_not_signalled_and_a_torn_record_is_dropped(tmp_path):
    """A killed run's record names processes by pid and start time: a pid reused since
    (here a live process recorded with another start time) is someone else's and is not
    signalled; a record torn or foreign is dropped without stopping anything."""
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True
    )
    try:
        record = tmp_path / "services.json"
        gone = subprocess.run(
            [sys.executable, "-c", "import os; print(os.getpid())"],
            capture_output=True,
            text=True,
            check=True,
        )
        dead_owner = int(gone.stdout)
        record.write_text(
            json.dumps(
                {"owner": [dead_owner, 1], "groups": {"gcs": [bystander.pid, 1]}, "cleanup": []}
            )
        )
        _stop_left(record, mine=True)
        assert bystander.poll() is None, "a reused pid was signalled"
        assert not record.exists()
        for torn in ('{"owner": [1', '{"groups": {}}', "[]"):
            record.write_text(torn)
            _stop_left(record, mine=True)
            assert not record.exists() and bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
