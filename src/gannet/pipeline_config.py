"""Industry config: which models exist and which steps each pipeline runs.

Pipelines are configuration, not code: a YAML names models (path, threshold, classes) and
pipelines (NAME -> steps). The file is validated up front so that a typo is an error
naming the field and the file, never a task failing at 3 a.m.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from gannet.errors import ErrorCode, PermanentError
from gannet.task import TENANT_ID_PATTERN

log = logging.getLogger(__name__)

ModelKind = Literal["detection", "segmentation", "classification"]
MODEL_KINDS: tuple[ModelKind, ...] = ("detection", "segmentation", "classification")


class ConfigError(ValueError):
    """An industry config that must not be served; the text names the file and field."""


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="Weights (.pt or .onnx): a path relative to the config, or gs://")
    confidence_threshold: float = Field(0.25, ge=0.0, le=1.0)
    classes: list[str] = Field(default_factory=list, description="Keep only these; empty = all.")
    enabled: bool = True
    imgsz: int = Field(640, ge=32, le=4096)


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    # The params validated by the step's own model (set when the config is validated),
    # so a step reads typed values and a typo in a param is a config error, not a task's.
    _parsed: Any = PrivateAttr(default=None)

    @property
    def parsed(self) -> Any:
        return self._parsed


class IndustryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    industry: str = Field(pattern=r"^[a-z0-9_-]{1,63}$")
    version: str | int
    px_per_cm: float | None = Field(None, gt=0)
    models: dict[ModelKind, ModelSpec]
    pipelines: dict[str, list[StepSpec]]
    tenants: list[str] | None = Field(
        None, description="Tenants allowed to use this industry; omitted = any tenant."
    )

    @field_validator("pipelines", mode="before")
    @classmethod
    def _step_shorthand(cls, value: object) -> object:
        """Accept `- detection` as well as `- sliced_detection: {slice_size: 640}`."""
        if not isinstance(value, dict):
            return value
        out: dict[str, list[dict[str, Any]]] = {}
        for name, steps in value.items():
            if not isinstance(steps, list):
                raise ValueError(f"pipeline {name!r} must be a list of steps")
            normalised = []
            for step in steps:
                if isinstance(step, str):
                    normalised.append({"name": step})
                elif isinstance(step, dict) and len(step) == 1 and "name" not in step:
                    ((step_name, params),) = step.items()
                    normalised.append({"name": step_name, "params": params or {}})
                else:
                    normalised.append(step)
            out[name] = normalised
        return out

    @model_validator(mode="after")
    def _steps_exist(self) -> IndustryConfig:
        from gannet.steps import STEPS  # the registry; imported late to avoid a cycle

        for pipeline, steps in self.pipelines.items():
            if not steps:
                raise ValueError(f"pipeline {pipeline!r} has no steps")
            before: list[str] = []
            for i, step in enumerate(steps):
                if step.name not in STEPS:
                    known = ", ".join(sorted(STEPS))
                    raise ValueError(
                        f"pipeline {pipeline!r}: unknown step {step.name!r} (known: {known})"
                    )
                registered = STEPS[step.name]
                for kind in registered.needs:
                    spec = self.models.get(kind)
                    if spec is None or not spec.enabled:
                        raise ValueError(
                            f"pipeline {pipeline!r}: step {step.name!r} needs an enabled "
                            f"models.{kind}"
                        )
                if registered.after and not any(name in before for name in registered.after):
                    raise ValueError(
                        f"pipeline {pipeline!r}: step {step.name!r} must come after one of "
                        f"{', '.join(registered.after)}"
                    )
                try:
                    step._parsed = registered.params.model_validate(step.params)
                except ValidationError as exc:
                    problems = "; ".join(
                        f"pipelines.{pipeline}.{i}.params."
                        f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                        for err in exc.errors()
                    )
                    raise ValueError(problems) from None
                before.append(step.name)
        return self

    def steps_for(self, pipeline: str) -> list[StepSpec]:
        try:
            return self.pipelines[pipeline]
        except KeyError:
            known = ", ".join(sorted(self.pipelines))
            raise PermanentError(
                ErrorCode.UNKNOWN_PIPELINE,
                f"pipeline {pipeline!r} is not in industry {self.industry!r} (known: {known})",
            ) from None

    def check_tenant(self, tenant_id: str) -> None:
        if self.tenants is not None and tenant_id not in self.tenants:
            raise PermanentError(
                ErrorCode.UNKNOWN_TENANT,
                f"tenant {tenant_id!r} is not configured for industry {self.industry!r}",
            )

    def enabled_models(self) -> dict[ModelKind, ModelSpec]:
        return {kind: spec for kind, spec in self.models.items() if spec.enabled}


def _yaml_mapping(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    return data


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
    )


def parse_config(text: str, source: str) -> IndustryConfig:
    """Validate YAML text; `source` names the file in every error message."""
    data = _yaml_mapping(text, source)
    try:
        return IndustryConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_problems(exc)}") from exc


@dataclass(frozen=True)
class LoadedConfig:
    config: IndustryConfig
    uri: str
    version: str  # mtime/size for files, object generation for gs://

    def model_uri(self, spec: ModelSpec) -> str:
        """Model paths are relative to the config's own location, so a config and its
        weights can be moved together (repo folder or bucket prefix)."""
        return _relative(self.uri, spec.path)


Reader = Callable[[str], tuple[bytes, str]]  # uri -> (content, version)
VersionOf = Callable[[str], str]
_Loaded = TypeVar("_Loaded", bound="LoadedConfig | LoadedDeployment")


class _Watched(Generic[_Loaded]):
    """Serves the last good object and picks up a changed one without a restart.

    A changed but invalid config is rejected, logged and counted, and the old one keeps
    serving: a bad push must never take the fleet down. A read that fails for another
    reason (GCS briefly down) is retried at the next check instead of being rejected.
    """

    kind = "config"

    def __init__(
        self,
        uri: str,
        read: Reader,
        version_of: VersionOf,
        check_every_s: float = 30.0,
        on_reload: Callable[[str], None] | None = None,
    ) -> None:
        self.uri = uri
        self._read = read
        self._version_of = version_of
        self._check_every_s = check_every_s
        self._on_reload = on_reload or (lambda result: None)
        self._lock = threading.Lock()
        self._checked_at = time.monotonic()
        self._rejected_version: str | None = None
        self._current = self._load()

    def _load(self) -> _Loaded:
        raise NotImplementedError

    def current(self) -> _Loaded:
        now = time.monotonic()
        if now - self._checked_at >= self._check_every_s and self._lock.acquire(blocking=False):
            try:
                self._checked_at = now
                self._maybe_reload()
            finally:
                self._lock.release()
        return self._current

    def _maybe_reload(self) -> None:
        try:
            version = self._version_of(self.uri)
        except Exception as exc:  # noqa: BLE001 - a failed check keeps the old config
            log.warning(
                f"{self.kind} check failed; keeping the current one",
                extra={"fields": {"uri": self.uri, "error": str(exc)}},
            )
            return
        if version in (self._current.version, self._rejected_version):
            return
        try:
            loaded = self._load()
        except ConfigError as exc:
            self._rejected_version = version
            self._on_reload("rejected")
            log.error(
                f"new {self.kind} rejected; still serving the previous one",
                extra={
                    "fields": {
                        "uri": self.uri,
                        "error": str(exc),
                        "serving_version": self._current.version,
                    }
                },
            )
            return
        except Exception as exc:  # noqa: BLE001 - unreadable now; try again next check
            self._on_reload("failed")
            log.warning(
                f"new {self.kind} could not be read; will retry",
                extra={"fields": {"uri": self.uri, "error": repr(exc)}},
            )
            return
        self._current = loaded
        self._on_reload("loaded")
        log.info(
            f"{self.kind} reloaded",
            extra={"fields": {"uri": self.uri, "version": loaded.version}},
        )


class ConfigSource(_Watched[LoadedConfig]):
    """One industry config (a local file or gs:// object), reloaded when it changes."""

    def __init__(
        self,
        uri: str,
        read: Reader,
        version_of: VersionOf,
        check_every_s: float = 30.0,
        on_reload: Callable[[str], None] | None = None,
        expect_industry: str | None = None,
    ) -> None:
        self._expect_industry = expect_industry
        super().__init__(uri, read, version_of, check_every_s, on_reload)

    def _load(self) -> LoadedConfig:
        try:
            content, version = self._read(self.uri)
        except FileNotFoundError as exc:
            raise ConfigError(f"{self.uri}: does not exist") from exc
        config = parse_config(content.decode("utf-8", errors="replace"), self.uri)
        if self._expect_industry and config.industry != self._expect_industry:
            raise ConfigError(
                f"{self.uri}: industry: is {config.industry!r}, but this deployment serves "
                f"{self._expect_industry!r} here"
            )
        return LoadedConfig(config=config, uri=self.uri, version=version)

    def for_tenant(self, tenant_id: str) -> LoadedConfig:
        """The config that serves this tenant, or PermanentError(unknown_tenant)."""
        loaded = self.current()
        loaded.config.check_tenant(tenant_id)
        return loaded

    def served(self) -> list[LoadedConfig]:
        return [self.current()]


class DeploymentConfig(BaseModel):
    """One deployment serving several industries: which config serves which tenant."""

    model_config = ConfigDict(extra="forbid")

    deployment: str = Field(pattern=r"^[a-z0-9_-]{1,63}$")
    industries: dict[str, str] = Field(
        min_length=1,
        description="industry -> its config (a path relative to this file, or gs://).",
    )
    tenants: dict[str, str] = Field(default_factory=dict, description="tenant -> industry")
    default_industry: str | None = Field(
        None, description="Industry of tenants not listed; omitted = unlisted tenants are refused."
    )

    @field_validator("tenants", mode="before")
    @classmethod
    def _empty_tenants(cls, value: object) -> object:
        return {} if value is None else value  # `tenants:` with nothing under it

    @model_validator(mode="after")
    def _industries_exist(self) -> DeploymentConfig:
        for tenant, industry in self.tenants.items():
            if not re.match(TENANT_ID_PATTERN, tenant):
                raise ValueError(f"tenants.{tenant}: not a valid tenant id")
            if industry not in self.industries:
                raise ValueError(f"tenants.{tenant}: industry {industry!r} is not in industries")
        if self.default_industry is not None and self.default_industry not in self.industries:
            raise ValueError(f"default_industry: {self.default_industry!r} is not in industries")
        return self


@dataclass(frozen=True)
class LoadedDeployment:
    config: DeploymentConfig
    uri: str
    version: str
    sources: dict[str, ConfigSource]  # only the industries this process serves


def _relative(base_uri: str, path: str) -> str:
    if path.startswith("gs://") or Path(path).is_absolute():
        return path
    if base_uri.startswith("gs://"):
        return f"{base_uri.rsplit('/', 1)[0]}/{path}"
    return str((Path(base_uri).parent / path).resolve())


class DeploymentSource(_Watched[LoadedDeployment]):
    """Several industries in one process; each industry config reloads on its own.

    The deployment file itself is watched too: a new tenant mapping is picked up without
    a restart, and a mapping that names a missing or invalid industry config is rejected
    as a whole (the previous mapping keeps serving).
    """

    kind = "deployment config"

    def __init__(
        self,
        uri: str,
        read: Reader,
        version_of: VersionOf,
        check_every_s: float = 30.0,
        on_reload: Callable[[str], None] | None = None,
        industry: str | None = None,
    ) -> None:
        self.industry = industry
        self._sources: dict[str, ConfigSource] = {}
        super().__init__(uri, read, version_of, check_every_s, on_reload)

    def _load(self) -> LoadedDeployment:
        try:
            content, version = self._read(self.uri)
        except FileNotFoundError as exc:
            raise ConfigError(f"{self.uri}: does not exist") from exc
        data = _yaml_mapping(content.decode("utf-8", errors="replace"), self.uri)
        try:
            config = DeploymentConfig.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{self.uri}: {_problems(exc)}") from exc
        served = {
            name: path
            for name, path in config.industries.items()
            if self.industry is None or name == self.industry
        }
        if not served:
            raise ConfigError(f"{self.uri}: industries: has no {self.industry!r} (GANNET_INDUSTRY)")
        sources: dict[str, ConfigSource] = {}
        for name, path in served.items():
            uri = _relative(self.uri, path)
            previous = self._sources.get(name)
            if previous is not None and previous.uri == uri:
                sources[name] = previous
                continue
            sources[name] = ConfigSource(
                uri,
                self._read,
                self._version_of,
                self._check_every_s,
                self._on_reload,
                expect_industry=name,
            )
        self._sources = sources
        return LoadedDeployment(config=config, uri=self.uri, version=version, sources=sources)

    def for_tenant(self, tenant_id: str) -> LoadedConfig:
        deployment = self.current()
        industry = deployment.config.tenants.get(tenant_id, deployment.config.default_industry)
        if industry is None:
            raise PermanentError(
                ErrorCode.UNKNOWN_TENANT,
                f"tenant {tenant_id!r} is not mapped to an industry in {self.uri}",
            )
        source = deployment.sources.get(industry)
        if source is None:
            raise PermanentError(
                ErrorCode.UNKNOWN_TENANT,
                f"tenant {tenant_id!r} belongs to industry {industry!r}, which this "
                f"deployment does not serve (GANNET_INDUSTRY={self.industry})",
            )
        loaded = source.current()
        loaded.config.check_tenant(tenant_id)
        return loaded

    def served(self) -> list[LoadedConfig]:
        return [source.current() for source in self.current().sources.values()]


Configs = ConfigSource | DeploymentSource


def open_configs(
    uri: str,
    read: Reader,
    version_of: VersionOf,
    industry: str | None = None,
    check_every_s: float = 30.0,
    on_reload: Callable[[str], None] | None = None,
) -> Configs:
    """An industry config, or a deployment config (it has `industries:`) naming several.

    With `industry` (GANNET_INDUSTRY) set, a deployment serves only that industry, and a
    single industry config must be that industry: a pod never serves what it was not
    deployed for.
    """
    try:
        content, _ = read(uri)
    except FileNotFoundError as exc:
        raise ConfigError(f"{uri}: does not exist") from exc
    data = _yaml_mapping(content.decode("utf-8", errors="replace"), uri)
    if "industries" in data:
        return DeploymentSource(uri, read, version_of, check_every_s, on_reload, industry)
    return ConfigSource(uri, read, version_of, check_every_s, on_reload, industry)
