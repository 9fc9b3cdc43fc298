"""Cloud Storage reads and writes, with the tenant checks in front of every image read.

An image URL is attacker-controlled input: it must name an allowed bucket and an object
under the tenant's own prefix, with no dot segments or encoded separators that could
walk out of it. Storage raises typed errors; it never decides what happens to a message.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import tempfile
import time
import urllib.parse
import zlib
from pathlib import Path
from typing import Any

import google.auth
import google.cloud.storage as storage
import google_crc32c
from google.auth.credentials import AnonymousCredentials, Credentials
from google.auth.exceptions import RefreshError
from google.auth.exceptions import TransportError as AuthTransportError
from google.auth.transport.requests import AuthorizedSession
from requests.adapters import HTTPAdapter

from gannet.errors import BadModelFile, ErrorCode, PermanentError, TransientError
from gannet.gcs_http import Endpoint, HTTPError, Reply
from gannet.task import BUCKET_NAME, MAX_OBJECT_NAME_BYTES, MAX_URL_LENGTH, GsUrl

# The requests for an object's metadata, a config's bytes and a tenant's model listing
# (a config check or reload, a model's version, a tenant's models: on gannet-config-
# watch's thread, or on a task's): each ends within METADATA_DEADLINE_S however GCS
# answers, not at all or a byte at a time. Through the client library they had 10 s a
# read, retried for 20 s: a GCS that never answered cost 30 s, one that dripped its
# answer held the thread for good (with the library's defaults a check took 121 s
# against a GCS that never answered, and the checks after it waited on the one watch
# thread, config_sources.ConfigWatch). GCS answers these in milliseconds.
METADATA_DEADLINE_S = 20.0
_RETRIED = frozenset({408, 429, 500, 502, 503, 504})  # as the client library's retry

# A model's weights (tens to hundreds of MB), downloaded on the thread that loads the
# model: start-up's, gannet-config-watch's for a changed config, or a runner's for a
# tenant's model or one evicted since, where every task that needs the model waits on the
# load. Through the client library that download had 60 s a read, retried for 120 s, and
# nothing bounding the whole: a GCS (or a middlebox) that dripped its answer held the
# thread for good. Now it is one request over gcs_http, ending at a deadline that grows
# with the object: DOWNLOAD_DEADLINE_S for the token and the connection, plus its size at
# DOWNLOAD_MIN_BYTES_PER_S, far below what one stream from GCS in the node's region
# carries (tens of MB/s and more): 33 s for a 6 MB model, 95 s for a 130 MB YOLO11x. Not
# one deadline of minutes for every model: a stalled 6 MB detector would hold its runner
# as long as a 500 MB model may take.
DOWNLOAD_DEADLINE_S = 30.0
DOWNLOAD_MIN_BYTES_PER_S = 2_000_000

# The most a config stored gzip-compressed may inflate to: a config is a few kB, and a
# small gzip may hold gigabytes (64 MiB of zeros are 64 KiB of gzip).
CONFIG_MAX_BYTES = 16 << 20


def make_client(project: str, emulator_host: str | None, connections: int = 10) -> storage.Client:
    """`connections`: HTTP connections kept open for reuse, one per thread that uses the
    client at once. Past requests' default of 10, every runner beyond the tenth opened
    (on GCS: TLS-handshook) a new connection per request and logged "Connection pool is
    full" (googleapis/python-storage#253)."""
    credentials: Credentials
    if emulator_host:
        credentials = AnonymousCredentials()  # type: ignore[no-untyped-call]
        options: dict[str, str] | None = {"api_endpoint": emulator_host}
    else:
        credentials, _ = google.auth.default(scopes=storage.Client.SCOPE)
        options = None
    session = AuthorizedSession(credentials)  # type: ignore[no-untyped-call]
    pool = HTTPAdapter(pool_connections=connections, pool_maxsize=connections)
    session.mount("https://", pool)
    session.mount("http://", pool)
    return storage.Client(
        project=project, credentials=credentials, client_options=options, _http=session
    )


def encode_json(data: dict[str, Any]) -> bytes:
    """Compact JSON, as result objects are stored."""
    return json.dumps(data, separators=(",", ":"), default=str).encode()


def split_gs_url(url: str) -> tuple[str, str]:
    """(bucket, object name) of a config's or model's gs:// URL."""
    try:
        parsed = GsUrl.parse(url)
    except ValueError:
        raise PermanentError(ErrorCode.SCHEMA_ERROR, _why_not_gs(url)) from None
    return parsed.bucket, parsed.name


def _why_not_gs(url: str) -> str:
    """What is wrong with a config's or model's gs:// URL, for the one who wrote it."""
    shape = "expected gs://BUCKET/path/to/object"
    bucket, _, name = url.removeprefix("gs://").partition("/")
    if not url.startswith("gs://"):
        why = f"not a gs:// URL ({shape})"
    elif not name:
        why = f"it names no object ({shape})"
    elif not re.fullmatch(BUCKET_NAME, bucket):
        why = (
            f"{bucket!r} is not a bucket's name (3 or more lowercase letters, digits, "
            "'-', '_' or '.', starting and ending with a letter or digit)"
        )
    elif len(url) > MAX_URL_LENGTH or len(name.encode()) > MAX_OBJECT_NAME_BYTES:
        why = (
            f"too long: at most {MAX_URL_LENGTH} characters, the object's name at most "
            f"{MAX_OBJECT_NAME_BYTES} bytes"
        )
    else:
        why = "the object's name has a line break"
    shown = url if len(url) <= 100 else f"{url[:100]}..."
    return f"{shown!r}: {why}"


_BAD_NAME = re.compile(r"%2f|%5c|\\|[\x00-\x1f\x7f]", re.IGNORECASE)


def check_image_url(url: GsUrl, tenant_id: str, allowed_buckets: list[str]) -> None:
    """PermanentError unless the tenant may read this image."""
    bucket, name = url.bucket, url.name
    if bucket not in allowed_buckets:
        raise PermanentError(
            ErrorCode.BUCKET_NOT_ALLOWED,
            f"bucket {bucket!r} is not an allowed image bucket ({', '.join(allowed_buckets)})",
        )
    if _BAD_NAME.search(name):
        raise PermanentError(
            ErrorCode.IMAGE_OUTSIDE_TENANT,
            "image path has an encoded separator, backslash or control character",
        )
    segments = urllib.parse.unquote(name).split("/")
    if any(s in ("", ".", "..") for s in segments):
        raise PermanentError(
            ErrorCode.IMAGE_OUTSIDE_TENANT, "image path has an empty, '.' or '..' segment"
        )
    if segments[0] != tenant_id or len(segments) < 2:
        raise PermanentError(
            ErrorCode.IMAGE_OUTSIDE_TENANT,
            f"image must be under gs://{bucket}/{tenant_id}/ (the tenant's own prefix)",
        )


def _drop_other_generations(target: Path, stem: str, suffix: str) -> None:
    """Deletes the other generations' files of the object `target` is one generation of.

    Why: each generation is a file of its own (`STEM.gGENERATION.SUFFIX`), and a pod that
    lives through many uploads kept every one it ever loaded until its disk (an emptyDir
    with a size limit) filled and the kubelet evicted it. A loaded model no longer needs
    its file; one that is asked for again after its eviction is downloaded again.
    """
    for other in target.parent.glob(f"{stem}.g*{suffix}"):
        generation = other.name[len(stem) + 2 : len(other.name) - len(suffix)]
        if other != target and generation.isdigit():
            other.unlink(missing_ok=True)


def local_copy(url: str, generation: str, cache_dir: Path) -> Path:
    """Where download_to puts a generation of a gs:// object under `cache_dir`. The
    suffix stays last: ultralytics picks the format (.pt, .onnx) from it."""
    bucket, name = split_gs_url(url)
    path = Path(name)
    target = cache_dir / bucket / path.parent / f"{path.stem}.g{generation}{path.suffix}"
    if not target.resolve().is_relative_to((cache_dir / bucket).resolve()):
        # An object name with `../` (GCS allows them) could overwrite any file, another
        # bucket's cached weights too; the loader makes this a failed load.
        raise ValueError(f"{url}: its local copy would be outside the model cache's {bucket}/")
    return target


class Storage:
    def __init__(self, client: storage.Client) -> None:
        """`client` gives the endpoint and the credentials (and the dev tools' uploads,
        through `.client`); the daemon's requests all go over gcs_http, each under a
        deadline. Image reads and result writes, once per task, were the first: the client
        library spent 2.9 ms of CPU per read and per write (about 9 ms of the daemon's 27 ms
        per image in `gannet bench --plumbing`), urllib3 0.8 ms, http.client less again."""
        self.client = client
        self.endpoint = Endpoint(client.api_endpoint, client._credentials)

    def read(self, url: GsUrl, max_bytes: int) -> bytes:
        """Object bytes, in one request: asking for one byte more than the limit tells us
        an object is too large without downloading all of it, and where the server sends
        all of it anyway (an object stored gzip-compressed: GCS ignores the Range), no
        more than that byte is read. An object stored gzip-compressed that GCS serves as
        stored (Content-Encoding: gzip; it does when the object's Cache-Control says
        no-transform) is decompressed, under the same limit (_gunzip)."""
        bucket, name = url.bucket, url.name
        where = f"gs://{bucket}/{name}"
        media = self._media(bucket, name)
        response = self._request(
            "GET", media, where, headers={"Range": f"bytes=0-{max_bytes}"}, max_body=max_bytes
        )
        if response.status == 404:
            self._check_bucket(bucket)  # GCS answers 404 for a missing bucket too
            raise PermanentError(ErrorCode.IMAGE_NOT_FOUND, f"{where} does not exist")
        if response.status == 416:  # GCS: there is no byte 0 to send
            raise PermanentError(ErrorCode.IMAGE_UNDECODABLE, f"{where} is empty")
        _check(response, where)
        try:
            data = _unzipped(response, max_bytes, where)
        except GzipError as exc:
            code = ErrorCode.IMAGE_TOO_LARGE if exc.too_large else ErrorCode.IMAGE_UNDECODABLE
            raise PermanentError(code, str(exc)) from exc
        if not data:
            raise PermanentError(ErrorCode.IMAGE_UNDECODABLE, f"{where} is empty")
        if len(data) > max_bytes:
            raise PermanentError(
                ErrorCode.IMAGE_TOO_LARGE, f"{where} is larger than the {max_bytes}-byte limit"
            )
        return data

    def write(self, bucket: str, name: str, body: bytes, content_type: str) -> str:
        """One multipart upload (metadata and content in one request, as the client
        library sends it), with the content's CRC32C for the server to check."""
        where = f"gs://{bucket}/{name}"
        meta = json.dumps({"name": name, "contentType": content_type, "crc32c": _crc32c(body)})
        # Not uuid4: os.urandom is a syscall that lets go of the GIL, a wait to get it
        # back on a busy daemon; a boundary only has to be unlikely in the body.
        boundary = f"gannet-{random.getrandbits(128):032x}"
        payload = b"".join(
            [
                f"--{boundary}\r\ncontent-type: application/json; charset=UTF-8\r\n\r\n"
                f"{meta}\r\n--{boundary}\r\ncontent-type: {content_type}\r\n\r\n".encode(),
                body,
                f"\r\n--{boundary}--".encode(),
            ]
        )
        upload = f"{self._objects('upload', bucket)}?uploadType=multipart"
        headers = {"Content-Type": f'multipart/related; boundary="{boundary}"'}
        response = self._request("POST", upload, where, body=payload, headers=headers)
        if response.status == 404:  # an upload's only 404: the operator's to fix, retried
            raise TransientError(
                ErrorCode.DEPENDENCY_UNAVAILABLE,
                f"{where}: bucket {bucket} does not exist: create it, or correct "
                "GANNET_RESULTS_BUCKET",
            )
        _check(response, where)
        return where

    def _check_bucket(self, bucket: str) -> None:
        """TransientError when the bucket itself does not exist: an allowed bucket not
        created yet, or misnamed, is the deployment's to fix, and its tasks are to wait
        for that (nacked, then dead-lettered by Pub/Sub) rather than be quarantined as
        missing images. Asked only after a 404, so a poison message's cost."""
        if self.bucket_missing(bucket):
            raise TransientError(
                ErrorCode.DEPENDENCY_UNAVAILABLE,
                f"bucket {bucket} does not exist: create it, or correct GANNET_ALLOWED_BUCKETS",
            )

    def bucket_missing(self, bucket: str, deadline_s: float | None = None) -> bool:
        """Whether GCS says the bucket does not exist; TransientError if it cannot be
        asked. Only a 404 says so: any other answer is taken as its existing. The
        worker's roles/storage.objectViewer, for one, has no storage.buckets.get, and
        its 403 must not turn every missing image into a retry."""
        path = f"{_bucket_path(bucket)}?fields=name"
        response = self._request("GET", path, f"gs://{bucket}", deadline_s=deadline_s)
        return response.status == 404

    def _objects(self, api: str, bucket: str) -> str:
        """The JSON API's object collection of `bucket`, for media downloads or uploads."""
        return f"/{api}{_bucket_path(bucket)}/o"

    def _media(self, bucket: str, name: str) -> str:
        """The download of the object's bytes (the latest generation's, unless the caller
        adds one)."""
        return f"{self._objects('download', bucket)}/{urllib.parse.quote(name, safe='')}?alt=media"

    def _request(self, method: str, path: str, where: str, **kwargs: Any) -> Reply:
        try:
            return self.endpoint.request(method, path, **kwargs)
        except HTTPError as exc:
            raise TransientError(
                ErrorCode.DEPENDENCY_UNAVAILABLE, f"{method} {where}: {exc!r}"
            ) from exc
        except (RefreshError, AuthTransportError) as exc:
            # Workload Identity's tokens come from the metadata server, which has blips:
            # a task is retried, as for GCS itself, not ended as an unexpected error.
            raise TransientError(
                ErrorCode.DEPENDENCY_UNAVAILABLE,
                f"{method} {where}: no access token (credentials could not be refreshed: {exc})",
            ) from exc

    def generation(self, url: str) -> str:
        """Object generation: changes on every overwrite, so it versions configs and models."""
        bucket, name = split_gs_url(url)
        return str(self._metadata(bucket, name)["generation"])

    def read_url(self, url: str) -> tuple[bytes, str]:
        """(content, generation) of one and the same generation: downloading "the latest"
        after reading its metadata could pair new bytes with an old generation. An
        object stored gzip-compressed that GCS serves as stored (as `read`) is
        decompressed, to CONFIG_MAX_BYTES; GzipError (a ValueError) if it cannot be."""
        bucket, name = split_gs_url(url)
        generation = str(self._metadata(bucket, name)["generation"])
        media = f"{self._media(bucket, name)}&generation={generation}"
        response = self._get(media, f"{url} (generation {generation})")
        return _unzipped(response, CONFIG_MAX_BYTES, url), generation

    def list_objects(self, bucket: str, prefix: str) -> dict[str, str]:
        """{gs:// URL: generation} of the objects named `prefix`..., every page; {} when
        the bucket does not exist."""
        found: dict[str, str] = {}
        query = {"prefix": prefix, "fields": "items(name,generation),nextPageToken"}
        while True:
            path = f"{_bucket_path(bucket)}/o?{urllib.parse.urlencode(query)}"
            try:
                page = self._json(path, f"gs://{bucket}/{prefix}")
            except FileNotFoundError:
                return {}
            for item in page.get("items", []):
                found[f"gs://{bucket}/{item['name']}"] = str(item["generation"])
            if not page.get("nextPageToken"):
                return found
            query["pageToken"] = page["nextPageToken"]

    def _metadata(self, bucket: str, name: str, generation: str | None = None) -> dict[str, Any]:
        """The object's (or that generation's) generation, size, CRC32C and encoding;
        FileNotFoundError if there is none."""
        path = f"{_bucket_path(bucket)}/o/{urllib.parse.quote(name, safe='')}"
        query = "?fields=generation,size,crc32c,contentEncoding"
        if generation is not None:
            query += f"&generation={generation}"
        return self._json(path + query, f"gs://{bucket}/{name}")

    def _get(self, path: str, where: str) -> Reply:
        """A 200 within METADATA_DEADLINE_S, or an OSError saying why (FileNotFoundError
        for a 404): what the config's and the model resolver's callers take for GCS
        failing them. A 408, 429 or 5xx is asked again after a backoff (0.25 s, doubling)
        while the deadline allows, as the client library's retry did: one 503 must not
        fail a start-up's config read."""
        deadline = time.monotonic() + METADATA_DEADLINE_S
        backoff = 0.25
        while True:
            try:
                response = self.endpoint.request(
                    "GET", path, deadline_s=max(0.1, deadline - time.monotonic())
                )
            except HTTPError as exc:
                raise OSError(f"GET {where}: {exc!r}") from exc
            except (RefreshError, AuthTransportError) as exc:
                raise OSError(f"GET {where}: no access token: {exc}") from exc
            if response.status == 200:
                return response
            if response.status == 404:
                raise FileNotFoundError(where)
            if response.status in _RETRIED and time.monotonic() + backoff < deadline:
                time.sleep(backoff)
                backoff *= 2
                continue
            detail = response.data[:200].decode(errors="replace")
            raise OSError(f"GET {where}: HTTP {response.status} {detail}")

    def _json(self, path: str, where: str) -> dict[str, Any]:
        """_get's answer as a JSON object; a 200 that is not one (a proxy's page) is an
        OSError like any other failure to answer."""
        try:
            found = json.loads(self._get(path, where).data)
        except ValueError as exc:
            raise OSError(f"GET {where}: not a JSON answer ({exc})") from exc
        if not isinstance(found, dict):
            raise OSError(f"GET {where}: not a JSON object")
        return found

    def download_to(
        self, url: str, generation: str, cache_dir: Path, max_bytes: int | None = None
    ) -> Path:
        """Weights land at a generation-specific path, so a new upload never races a load.

        The download asks for that generation (not "the latest", which after an upload
        would put new bytes under the old generation's name, for good), whole and checked
        (_download: in memory, as the loader then reads them), written to a temporary
        file of its own (runners loading the same model at once each download; the last
        rename wins, with the same bytes) that is renamed into place only when complete.
        An object over `max_bytes` (GANNET_MAX_MODEL_MB) is refused before any of it is
        read: a tenant's upload of gigabytes would be held in memory whole.
        """
        bucket, name = split_gs_url(url)
        path = Path(name)
        target = local_copy(url, generation, cache_dir)
        if target.exists():
            return target
        data = self._download(bucket, name, generation, max_bytes)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as part:
                part.write(data)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)  # a failed write's part; none after a rename
        _drop_other_generations(target, path.stem, path.suffix)
        return target

    def _download(
        self, bucket: str, name: str, generation: str, max_bytes: int | None = None
    ) -> bytes:
        """The generation's bytes, whole and as stored (their size and CRC32C checked
        against its metadata, as the client library's download checked them), within
        its deadline (DOWNLOAD_DEADLINE_S and the size at DOWNLOAD_MIN_BYTES_PER_S; the
        metadata request is bounded as the others are), or an error."""
        where = f"gs://{bucket}/{name} (generation {generation})"
        found = self._metadata(bucket, name, generation)
        if encoding := found.get("contentEncoding"):  # GCS would send it decompressed, or not
            raise ValueError(
                f"{where} is stored with Content-Encoding {encoding}: upload the weights as "
                "they are (no gsutil cp -z/-Z)"
            )
        size = int(found.get("size", 0))
        if max_bytes is not None and size > max_bytes:
            raise BadModelFile(
                f"{where} is {size / 2**20:.0f} MB, over the {max_bytes / 2**20:.0f} MB "
                "limit (GANNET_MAX_MODEL_MB)"
            )
        media = f"{self._media(bucket, name)}&generation={generation}"
        deadline_s = DOWNLOAD_DEADLINE_S + size / DOWNLOAD_MIN_BYTES_PER_S
        # Its errors as they are: the model cache makes them model_unavailable, naming
        # the model (transient: the tasks waiting on the load are nacked).
        response = self.endpoint.request("GET", media, max_body=size, deadline_s=deadline_s)
        if response.status != 200:
            detail = response.data[:200].decode(errors="replace")
            raise OSError(f"{where}: HTTP {response.status} {detail}")
        data = response.data
        crc = _crc32c(data)
        if len(data) != size or crc != found.get("crc32c"):
            raise ValueError(  # a torn answer, or a proxy's: never the model's cached file
                f"{where}: {len(data)} bytes of CRC32C {crc} received, {size} of "
                f"{found.get('crc32c')} stored"
            )
        return data


def _bucket_path(bucket: str) -> str:
    """The JSON API's path of `bucket` (its metadata; its objects under /o)."""
    return f"/storage/v1/b/{urllib.parse.quote(bucket, safe='')}"


def _crc32c(data: bytes) -> str:
    """The CRC32C as GCS's JSON API writes it (base64 of its four bytes, big-endian)."""
    checksum = google_crc32c.Checksum(data)  # type: ignore[no-untyped-call]
    return base64.b64encode(checksum.digest()).decode()  # type: ignore[no-untyped-call]


class GzipError(ValueError):
    """An object served gzip-compressed whose gzip data is corrupt or cut short, or
    (`too_large`) more than the reader's limit once decompressed."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def _unzipped(response: Reply, max_bytes: int, where: str) -> bytes:
    """The object's bytes, decompressed where GCS sent them as stored, gzip-compressed:
    it does for one stored with Content-Encoding: gzip and Cache-Control: no-transform,
    whatever was asked (cloud.google.com/storage/docs/transcoding); without no-transform
    it decompresses them itself."""
    data: bytes = response.data
    if response.encoding is None or response.encoding.lower() not in ("gzip", "x-gzip"):
        return data
    return _gunzip(data, max_bytes, where)


def _gunzip(data: bytes, max_bytes: int, where: str) -> bytes:
    """An object's bytes served gzip-compressed, decompressed no further than
    max_bytes + 1: a small gzip of a huge body (64 MiB of zeros are 64 KiB of gzip) is
    refused as too large, as a plain one is, without being inflated whole.

    `data` is at most max_bytes + 1 bytes of the gzip (Storage.read's Range, or its read
    limit where the Range is ignored), or all of it: a gzip that does not end within
    max_bytes + 1 bytes is more than the limit compressed, and so, within gzip's few
    bytes of framing, decompressed too. Several gzip members (concatenated gzips) are
    one body, as gzip(1) reads them. GzipError says what is wrong with `where`."""
    body = bytearray()
    rest = data
    try:
        while rest:
            inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip's framing only
            body += inflate.decompress(rest, max_bytes + 1 - len(body))
            if len(body) > max_bytes or (not inflate.eof and len(data) > max_bytes):
                raise GzipError(
                    f"{where} is stored gzip-compressed (Content-Encoding: gzip, served "
                    f"compressed) and is larger than the {max_bytes}-byte limit once "
                    "decompressed",
                    too_large=True,
                )
            if not inflate.eof:
                raise GzipError(
                    f"{where} is stored gzip-compressed (Content-Encoding: gzip), and its "
                    f"gzip data ends before its stream does ({len(data)} bytes)"
                )
            rest = inflate.unused_data
    except zlib.error as exc:
        raise GzipError(
            f"{where} is stored gzip-compressed (Content-Encoding: gzip), and its gzip "
            f"data is corrupt: {exc}"
        ) from exc
    return bytes(body)


def _check(response: Reply, where: str) -> None:
    """Any other failure is transient: throttling, server errors, IAM and missing
    buckets are all fixable without republishing, and the retry policy retries."""
    if response.status not in (200, 206):
        detail = response.data[:200].decode(errors="replace")
        raise TransientError(
            ErrorCode.DEPENDENCY_UNAVAILABLE, f"{where}: HTTP {response.status} {detail}"
        )


def local_version(path: str) -> str:
    stat = Path(path).stat()
    return f"{stat.st_mtime_ns}-{stat.st_size}"


def read_local(path: str) -> tuple[bytes, str]:
    """The file's bytes and its version taken before they were read: a write landing
    during the read (an edit in place, a ConfigMap's swap) then shows as a newer version
    at the next check, which reads it again. Taken after, it named the new file while
    the bytes were the old (or half written) ones, and every later check saw no change."""
    version = local_version(path)
    return Path(path).read_bytes(), version
