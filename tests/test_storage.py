"""The storage client the daemon builds, against the GCS emulator."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from gannet import clients
from gannet.dev import demo
from gannet.dev.local_services import LocalServices
from gannet.storage import Storage, encode_json
from gannet.task import GsUrl


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
    blob = blobs.get_blob(f"{prefix}/r.json")
    assert blob is not None and blob.content_type == "application/json"
    assert blob.download_as_bytes() == b'{"a":1}'
