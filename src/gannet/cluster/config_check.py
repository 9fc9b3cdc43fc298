"""`gannet config check`: the daemon's verdict on a config (and tenants' own models)
before it is pushed.

Why: a config is checked when a pod loads it. A push that fails the check is rejected by
the running pods (they serve the previous one, GannetConfigRejected) and stops new pods
from starting at all, so the first sign of a typo used to be a rejected push in
production. This runs the same code on the operator's machine: open_configs as the
daemon opens a config (a local file or gs://, an industry's or a deployment's), and,
unless --no-models, each enabled model loaded on the CPU with its class filters checked
(pipeline.load_models, the daemon's own check before a config serves).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gannet import clients
from gannet.config_schema import ConfigError, ModelSpec
from gannet.config_sources import Configs, DeploymentSource, LoadedConfig
from gannet.daemon import model_file, model_version, open_config
from gannet.errors import CommandError, GannetError, PermanentError, TransientError
from gannet.metrics import Metrics
from gannet.model_cache import ModelCache, yolo_loader
from gannet.model_resolver import ModelResolver, tenant_model_lister
from gannet.pipeline import load_models, load_tenant_models
from gannet.settings import Settings
from gannet.storage import Storage


def run_check(args: argparse.Namespace) -> int:
    settings = Settings()
    uri = args.uri or settings.config_location()
    industry = args.industry if args.industry is not None else settings.industry
    # Only a gs:// config or model needs Google credentials (or the GCS emulator).
    storage = Storage(clients.storage_client(settings)) if uri.startswith("gs://") else None
    try:
        configs = open_config(uri, storage, industry)
    except (ConfigError, OSError, GannetError) as exc:
        why = exc.message if isinstance(exc, GannetError) else exc
        raise CommandError(f"{uri} would be rejected: {why}") from exc
    served = configs.served()
    if args.tenant and not settings.models_bucket:
        raise CommandError(
            "--tenant: GANNET_MODELS_BUCKET is not set, so no tenant has models of its own "
            "(they are served the industry's)"
        )
    if not args.no_models or args.tenant:
        models = [loaded.model_uri(spec) for loaded in served for spec in _enabled(loaded)]
        if storage is None and (args.tenant or any(m.startswith("gs://") for m in models)):
            storage = Storage(clients.storage_client(settings))
    if not args.no_models:
        _load_models(served, storage, settings)
    _describe(uri, configs, served, checked_models=not args.no_models)
    if args.tenant:
        assert storage is not None
        return _check_tenants(configs, args.tenant, storage, settings)
    return 0


def _enabled(loaded: LoadedConfig) -> list[ModelSpec]:
    return list(loaded.config.enabled_models().values())


def _load_models(served: list[LoadedConfig], storage: Storage | None, settings: Settings) -> None:
    """Every enabled model of every served industry, on the CPU, as the daemon loads
    them before a config serves; weights from gs:// are downloaded to a scratch folder."""
    with _scratch_cache(storage, settings) as cache:
        resolver = ModelResolver(model_version(storage), ttl_s=0.0)
        try:
            for loaded in served:
                print(f"loading the models of {loaded.config.industry} ({loaded.uri}) ...")
                load_models(loaded, cache, resolver, ["cpu"])
        except ConfigError as exc:
            raise CommandError(f"{loaded.uri} would be rejected: {exc}") from exc


@contextmanager
def _scratch_cache(storage: Storage | None, settings: Settings) -> Iterator[ModelCache]:
    """A model cache loading on the CPU as the daemon does (no trace: the check only
    needs the model to load), gs:// weights downloaded to a scratch folder; closed, and
    the folder gone, after."""
    with tempfile.TemporaryDirectory(prefix="gannet-config-check-") as scratch:
        loader = yolo_loader(
            model_file(storage, Path(scratch), settings.max_model_mb * 2**20),
            trace=False,
            cuda_graphs=False,
            safe=settings.safe_model_load,
        )
        cache = ModelCache(loader, Metrics())
        try:
            yield cache
        finally:
            cache.close()


def _check_tenants(
    configs: Configs, tenants: list[str], storage: Storage, settings: Settings
) -> int:
    """Each tenant's own models loaded and checked as its first task would; 2 when one
    would refuse its tasks (or the tenant is not served), else 0."""
    worst = 0
    with _scratch_cache(storage, settings) as cache:
        resolver = ModelResolver(
            model_version(storage),
            ttl_s=0.0,
            list_tenant_models=tenant_model_lister(storage, settings.models_bucket or ""),
        )
        for tenant in tenants:
            worst = max(worst, _check_tenant(configs, tenant, cache, resolver))
    return worst


def _check_tenant(configs: Configs, tenant: str, cache: ModelCache, resolver: ModelResolver) -> int:
    try:
        loaded = configs.for_tenant(tenant)
        print(f"loading tenant {tenant}'s own models ({loaded.config.industry}) ...")
        keys = load_tenant_models(loaded, cache, resolver, tenant, "cpu")
    except (PermanentError, TransientError) as exc:
        print(f"tenant {tenant}: {exc.code.value}: {exc.message}")
        return 2
    if not keys:
        print(f"tenant {tenant}: no models of its own; served {loaded.config.industry}'s")
    for key in keys:
        print(f"tenant {tenant}: ok: {key.uri} (generation {key.version}) would serve")
    return 0


def _describe(uri: str, configs: Configs, served: list[LoadedConfig], checked_models: bool) -> None:
    if isinstance(configs, DeploymentSource):
        mapping = configs.current().config
        print(f"ok: {uri} (deployment {mapping.deployment!r})")
        for tenant, industry in sorted(mapping.tenants.items()):
            print(f"  tenant {tenant} -> {industry}")
        if mapping.default_industry:
            print(f"  any other tenant -> {mapping.default_industry}")
        else:
            print("  any other tenant: refused (unknown_tenant)")
    for loaded in served:
        config = loaded.config
        print(f"ok: {loaded.uri}: industry {config.industry!r}, version {config.version}")
        print(f"  pipelines: {', '.join(sorted(loaded.plans))}")
        tenants = "any" if config.tenants is None else ", ".join(config.tenants)
        print(f"  tenants: {tenants}")
        for kind, spec in config.enabled_models().items():
            print(f"  models.{kind}: {loaded.model_uri(spec)} (imgsz {spec.imgsz})")
    if not isinstance(configs, DeploymentSource):
        print(
            "tenant routing not checked: a pod serving a deployment config rejects an "
            "industry config whose tenants: leaves out a tenant the mapping sends to it; "
            "check the deployment's config (it reads this file as stored) for that"
        )
    if not checked_models:
        print("models not loaded (--no-models): a model that cannot load still rejects it")
