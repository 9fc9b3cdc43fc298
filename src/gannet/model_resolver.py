"""Which weights serve a (model kind, tenant) on a device: the cache key of a task's model.

Kept apart from the cache, which only knows keys: the resolver is where configs, per-tenant
uploads and object versions meet.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from gannet.config_schema import ModelKind
from gannet.config_sources import LoadedConfig
from gannet.errors import ErrorCode, TransientError
from gannet.model_cache import ModelKey
from gannet.storage import Storage

ULTRALYTICS_TASK: dict[ModelKind, str] = {
    "detection": "detect",
    "segmentation": "segment",
    "classification": "classify",
}


MODEL_FILE_STEM: dict[ModelKind, str] = {
    "detection": "detect",
    "segmentation": "segment",
    "classification": "classify",
}
MODEL_SUFFIXES = (".pt", ".onnx")  # when both exist, .pt wins

ListTenantModels = Callable[[str], dict[str, str]]  # tenant -> {gs:// uri: generation}


def tenant_model_lister(storage: Storage, bucket: str) -> ListTenantModels:
    """Lists gs://BUCKET/models/TENANT/ (one call per tenant, not one per model kind);
    the prefix ends with '/' so tenant 'acme' never sees 'acme-2/' objects. On a task's
    thread, every ttl_s per tenant: within storage.METADATA_DEADLINE_S, while GCS does
    not answer, as a retryable model_unavailable."""

    def list_models(tenant: str) -> dict[str, str]:
        prefix = f"models/{tenant}/"
        try:
            return storage.list_objects(bucket, prefix)
        except OSError as exc:
            raise TransientError(
                ErrorCode.MODEL_UNAVAILABLE, f"cannot list gs://{bucket}/{prefix}: {exc}"
            ) from exc

    return list_models


class ModelResolver:
    """Which weights serve (model kind, tenant) on a device, as a cache key.

    A tenant's own model (gs://MODELS_BUCKET/models/TENANT/{detect,segment,classify}
    .{pt,onnx}) wins over the industry's, and the key then carries the tenant, so that
    copy is never handed to another tenant. Versions and listings are looked up at most
    every `ttl_s`, so a new upload is noticed within that time without a metadata call
    per task, and its new generation is a new key: no restart.
    """

    def __init__(
        self,
        version_of: Callable[[str], str],
        ttl_s: float = 30.0,
        list_tenant_models: ListTenantModels | None = None,
    ) -> None:
        self._version_of = version_of
        self._ttl_s = ttl_s
        self._list_tenant_models = list_tenant_models
        self._lock = threading.Lock()
        self._versions: dict[str, tuple[float, str]] = {}
        self._listings: dict[str, tuple[float, dict[str, str]]] = {}
        self._swept_at = time.monotonic()

    def version(self, uri: str) -> str:
        now = time.monotonic()
        with self._lock:
            cached = self._versions.get(uri)
            if cached and now - cached[0] < self._ttl_s:
                return cached[1]
        try:
            version = self._version_of(uri)
        except FileNotFoundError as exc:
            raise TransientError(ErrorCode.MODEL_UNAVAILABLE, f"model {uri} is missing") from exc
        except OSError as exc:  # GCS failing or not answering: the task is retried
            raise TransientError(
                ErrorCode.MODEL_UNAVAILABLE, f"cannot read model {uri}'s version: {exc}"
            ) from exc
        with self._lock:
            self._versions[uri] = (now, version)
        return version

    def tenant_models(self, tenant: str) -> dict[str, str]:
        if self._list_tenant_models is None:
            return {}
        now = time.monotonic()
        with self._lock:
            cached = self._listings.get(tenant)
            if cached and now - cached[0] < self._ttl_s:
                return cached[1]
        listing = self._list_tenant_models(tenant)
        with self._lock:
            self._listings[tenant] = (now, listing)
            if now - self._swept_at >= self._ttl_s:
                # Every tenant that ever had a task kept its entry for the life of the pod
                # (a review: about 230 bytes each); one expired is looked up afresh anyway.
                self._swept_at = now
                self._listings = {
                    t: entry for t, entry in self._listings.items() if now - entry[0] < self._ttl_s
                }
        return listing

    def tenant_override(self, kind: ModelKind, tenant: str) -> tuple[str, str] | None:
        """(uri, generation) of the tenant's own model of this kind, if it has one.

        Only the exact object name models/TENANT/STEM.SUFFIX counts: a tenant may upload
        any name under its prefix, and one ending the same way deeper down, or walking
        back out with `../`, would otherwise be taken (and downloaded to where its name
        points)."""
        listing = self.tenant_models(tenant)
        stem = MODEL_FILE_STEM[kind]
        for suffix in MODEL_SUFFIXES:
            wanted = f"models/{tenant}/{stem}{suffix}"
            for uri, generation in listing.items():
                if uri.removeprefix("gs://").partition("/")[2] == wanted:
                    return uri, generation
        return None

    def key(
        self, loaded: LoadedConfig, kind: ModelKind, tenant: str | None, device: str
    ) -> ModelKey:
        spec = loaded.config.models[kind]
        task = ULTRALYTICS_TASK[kind]
        if tenant is not None:
            override = self.tenant_override(kind, tenant)
            if override is not None:
                uri, generation = override
                return ModelKey(uri, generation, device, spec.imgsz, task, tenant)
        uri = loaded.model_uri(spec)
        return ModelKey(uri, self.version(uri), device, spec.imgsz, task)
