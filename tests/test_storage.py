"""The storage client the daemon builds, against the GCS emulator."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from conftest import StubHandler, gated_storage

from gannet import clients
from gannet import storage as storage_module
from gannet.daemon import model_file
from gannet.dev import demo
from gannet.dev.local_services import LocalServices
from gannet.errors import ErrorCode, PermanentError, TransientError
from gannet.metrics import Metrics
from gannet.model_cache import ModelCache, ModelKey, yolo_loader
from gannet.settings import REPO_ROOT
from gannet.storage import Storage, encode_json
from gannet.task import GsUrl

DETECT = REPO_ROOT / "models" / "demo" / "detect.pt"


def test_sixteen_runners_at_once_keep_their_connections(services: LocalServices):
    """Each task reads its image and writes its result: sixteen runners doing that at
    once need sixteen kept-alive connections, not one per request (on GCS each new one
    is a TLS handshake)."""
    settings = demo.local_settings(services, runners=16)
    storage = Storage(clients.storage_client(settings))
    bucket = settings.results_bucket
    prefix = f"pool-{uuid.uuid4().hex[:8]}"
    names = [f"{prefix}/{i}.json" for i in range(64)]

    def write(name: str) -> str:
        return storage.write(bucket, name, encode_json({"n": name}), "application/json")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(write, names))
        read = list(
            pool.map(lambda n: storage.read(GsUrl.parse(f"gs://{bucket}/{n}"), 1000), names)
        )
    assert read == [f'{{"n":"{n}"}}'.encode() for n in names]
    assert 1 <= storage.endpoint.connections_opened <= 16


def test_image_reads_say_what_is_wrong_with_the_object(services: LocalServices):
    """Missing, empty and oversized images are permanent (quarantined with their code),
    a missing bucket transient; a result written by the daemon is what the client
    library reads back."""
    from gannet.errors import ErrorCode, PermanentError, TransientError

    settings = demo.local_settings(services)
    storage = Storage(clients.storage_client(settings))
    bucket = settings.results_bucket
    prefix = f"reads-{uuid.uuid4().hex[:8]}"
    blobs = storage.client.bucket(bucket)
    blobs.blob(f"{prefix}/empty.jpg").upload_from_string(b"")
    blobs.blob(f"{prefix}/big.jpg").upload_from_string(b"x" * 101)
    blobs.blob(f"{prefix}/fits.jpg").upload_from_string(b"y" * 100)
    cases = {"missing.jpg": ErrorCode.IMAGE_NOT_FOUND, "empty.jpg": ErrorCode.IMAGE_UNDECODABLE}
    cases["big.jpg"] = ErrorCode.IMAGE_TOO_LARGE
    for name, code in cases.items():
        with pytest.raises(PermanentError) as err:
            storage.read(GsUrl.parse(f"gs://{bucket}/{prefix}/{name}"), 100)
        assert err.value.code == code and name in err.value.message
    assert storage.read(GsUrl.parse(f"gs://{bucket}/{prefix}/fits.jpg"), 100) == b"y" * 100
    # A bucket that does not exist is the deployment's to fix: retried, not quarantined.
    with pytest.raises(TransientError) as missing:
        storage.read(GsUrl.parse(f"gs://no-such-bucket-{prefix}/{prefix}/a.jpg"), 100)
    assert "does not exist" in missing.value.message

    storage.write(bucket, f"{prefix}/r.json", b'{"a":1}', "application/json")
    with pytest.raises(TransientError) as missing:  # the results bucket: retried, named
        storage.write(f"no-such-bucket-{prefix}", "t/r.json", b"{}", "application/json")
    assert f"no-such-bucket-{prefix} does not exist" in missing.value.message
    assert "GANNET_RESULTS_BUCKET" in missing.value.message
    blob = blobs.get_blob(f"{prefix}/r.json")
    assert blob is not None and blob.content_type == "application/json"
    assert blob.download_as_bytes() == b'{"a":1}'


def test_download_to_stores_the_generation_asked_for_and_concurrent_downloads_agree(
    services: LocalServices, tmp_path, monkeypatch
):
    """A model's file name carries its generation, so the download must ask for that
    generation, not "the latest" (after a newer upload: new bytes under the old name, for
    good); and runners that load the same new model at once each download to their own
    temporary file, one of which becomes the model's file; and then the older
    generation's file is deleted.

    The emulator serves the latest bytes whatever generation a download asks for (its
    download handler ignores the parameter), so the first part records the requests the
    client sends it, rather than comparing bytes; real GCS answers that generation, or
    404 once it is overwritten in a bucket without versioning (the load then fails and
    the next one resolves the new generation)."""
    import threading

    storage = Storage(clients.storage_client(demo.local_settings(services)))
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    storage.client.create_bucket(bucket)
    blob = storage.client.bucket(bucket).blob("retail/detect.pt")
    blob.upload_from_string(b"old weights")
    old = storage.generation(f"gs://{bucket}/retail/detect.pt")
    new_weights = bytes(range(256)) * 40_000  # 10 MB: long enough for downloads to overlap
    blob.upload_from_string(new_weights)
    new = storage.generation(f"gs://{bucket}/retail/detect.pt")

    urls: list[str] = []
    send = storage.endpoint.request

    def recorded(method, path, *args, **kwargs):
        urls.append(path)
        return send(method, path, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(storage.endpoint, "request", recorded)
        path = storage.download_to(f"gs://{bucket}/retail/detect.pt", old, tmp_path)
    assert path.name == f"detect.g{old}.pt"
    assert [u for u in urls if "alt=media" in u], "the download went through gcs_http"
    assert all(f"generation={old}" in u for u in urls if "alt=media" in u), urls

    start = threading.Barrier(8)

    def download(_: int):
        start.wait()
        return storage.download_to(f"gs://{bucket}/retail/detect.pt", new, tmp_path)

    with ThreadPoolExecutor(8) as pool:
        paths = set(pool.map(download, range(8)))
    assert len(paths) == 1
    assert paths.pop().read_bytes() == new_weights
    # No temporary file is left behind, nor the older generation's file: a pod that
    # lived through many uploads kept them all, until its disk filled.
    assert sorted(p.name for p in path.parent.iterdir()) == [f"detect.g{new}.pt"]


@pytest.mark.parametrize("stall", ["drips", "hangs"])
def test_a_model_download_that_stalls_fails_the_load_in_bounded_time_and_caches_nothing(
    services: LocalServices, tmp_path, monkeypatch, stall
):
    """Weights behind a GCS (or a middlebox) that takes the connection and then drips
    its answer a byte at a time, or sends nothing: the download ran on the client
    library's defaults, 60 s a read, and a drip never waited that long for a byte, so
    the load, on whichever thread asked for the model (a runner, for a tenant's model or
    one evicted since), never ended, and every runner whose task needed the model waited
    on it. Now the download has a deadline (scaled down here: 3 s plus the size at 2 MB/s,
    about 4 s for this file; the test's bound, 8 s, is under one read's 60 s before):
    both runners asking for the model get model_unavailable, a transient error (their
    tasks are nacked, and retried), no file is left in the model cache, not even a part,
    and the load, once GCS answers again, reads the whole file."""
    monkeypatch.setattr(storage_module, "DOWNLOAD_DEADLINE_S", 3.0)
    settings = demo.local_settings(services)
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    clients.storage_client(settings).create_bucket(bucket).blob(
        "retail/detect.pt"
    ).upload_from_filename(DETECT)
    with gated_storage(services, settings) as (gate, client):
        storage = Storage(client)
        uri = f"gs://{bucket}/retail/detect.pt"
        key = ModelKey(uri, storage.generation(uri), "cpu", 416, "detect")
        cache_dir = tmp_path / "cache"
        load = yolo_loader(model_file(storage, cache_dir), trace=False)
        # A failed load not answered from memory: the one after GCS answers again loads.
        cache = ModelCache(load, Metrics(), retry_failed_after_s=0.0)
        errors: list[TransientError] = []

        def runner() -> None:
            try:
                cache.get(key)
            except TransientError as exc:  # what the runner's task is settled with: a nack
                errors.append(exc)

        try:
            gate.slow_media(0.05 if stall == "drips" else None)
            runners = [threading.Thread(target=runner, daemon=True) for _ in range(2)]
            started = time.monotonic()
            for thread in runners:
                thread.start()
            for thread in runners:
                thread.join(timeout=max(0.0, started + 20 - time.monotonic()))
            took = time.monotonic() - started
            assert not any(t.is_alive() for t in runners), "the load still waited after 20 s"
            assert took < 8, f"the load took {took:.1f} s"
            assert len(errors) == 2
            for error in errors:
                assert error.code is ErrorCode.MODEL_UNAVAILABLE
                assert uri in error.message
            assert "deadline" in errors[0].message, errors[0].message
            assert [p for p in cache_dir.rglob("*") if p.is_file()] == []

            gate.answer()
            assert cache.get(key).task == "detect"
            [cached] = [p for p in cache_dir.rglob("*") if p.is_file()]
            assert cached.read_bytes() == DETECT.read_bytes()
        finally:
            cache.close()


def _answers(serve: Any, answers: list[tuple[int, bytes]]) -> tuple[Storage, list[str]]:
    """Storage against a stand-in for Cloud Storage's JSON API that answers from a
    script: the emulator cannot be made to answer 503 or a proxy's page. Each request
    takes the next (status, body); the last one repeats. Also the paths asked for."""
    paths: list[str] = []

    class Scripted(StubHandler):
        def do_GET(self) -> None:
            paths.append(self.path)
            self.reply(*(answers.pop(0) if len(answers) > 1 else answers[0]))

    url, _ = serve(Scripted)
    return Storage(storage_module.make_client("p", url)), paths


def test_a_config_read_outlives_a_503_and_says_why_when_gcs_keeps_failing(monkeypatch, serve):
    """A start-up's config read met one 503 and the daemon did not start: the client
    library had retried 408, 429 and 5xx, the request of gcs_http did not. It is asked
    again after a backoff while its deadline allows; a GCS that keeps answering 503, or
    a 200 that is no JSON (a proxy's page), is an OSError that says so."""
    monkeypatch.setattr(storage_module, "METADATA_DEADLINE_S", 2.0)
    once, paths = _answers(serve, [(503, b"busy"), (200, b'{"generation": "7"}')])
    try:
        assert once.generation("gs://bkt/configs/a b.yaml") == "7"
        assert len(paths) == 2 and "/o/configs%2Fa%20b.yaml?" in paths[0]
    finally:
        once.endpoint.close()
    for answers, said in (([(503, b"busy")], "HTTP 503 busy"), ([(200, b"<html>")], "not a JSON")):
        failing, _ = _answers(serve, answers)
        try:
            started = time.monotonic()
            with pytest.raises(OSError, match=said):
                failing.generation("gs://bkt/configs/a.yaml")
            assert time.monotonic() - started < 4  # within its deadline, not the library's
        finally:
            failing.endpoint.close()


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://models/demo/config.yaml", "not a gs:// URL"),
        ("gs://gannet-models", "it names no object"),
        ("gs://ab/config.yaml", "'ab' is not a bucket's name"),
        ("gs://Models/config.yaml", "'Models' is not a bucket's name"),
        ("gs://gannet-models/" + "x" * 1100, "too long: at most 2048 characters"),
        ("gs://gannet-models/demo\nconfig.yaml", "the object's name has a line break"),
    ],
)
def test_a_config_or_model_address_that_cannot_be_read_says_why(url: str, why: str) -> None:
    """Each said "not a gs:// URL", which most of them are: the one who wrote it is told
    what to change. A long one is cut short in the message."""
    with pytest.raises(PermanentError) as err:
        storage_module.split_gs_url(url)
    assert err.value.code is ErrorCode.SCHEMA_ERROR
    assert why in err.value.message
    assert len(err.value.message) < 300
