"""Industry config: which models exist and which steps each pipeline runs.

Pipelines are configuration, not code: a YAML names models (path, threshold, classes) and
pipelines (NAME -> steps). The file is validated up front so that a typo is an error
naming the field and the file, never a task failing at 3 a.m.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gannet.errors import ErrorCode, PermanentError

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
            for step in steps:
                if step.name not in STEPS:
                    known = ", ".join(sorted(STEPS))
                    raise ValueError(
                        f"pipeline {pipeline!r}: unknown step {step.name!r} (known: {known})"
                    )
                needs = STEPS[step.name].needs
                for kind in needs:
                    spec = self.models.get(kind)
                    if spec is None or not spec.enabled:
                        raise ValueError(
                            f"pipeline {pipeline!r}: step {step.name!r} needs an enabled "
                            f"models.{kind}"
                        )
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


def parse_config(text: str, source: str) -> IndustryConfig:
    """Validate YAML text; `source` names the file in every error message."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    try:
        return IndustryConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from exc


@dataclass(frozen=True)
class LoadedConfig:
    config: IndustryConfig
    uri: str
    version: str  # mtime/size for files, object generation for gs://

    def model_uri(self, spec: ModelSpec) -> str:
        """Model paths are relative to the config's own location, so a config and its
        weights can be moved together (repo folder or bucket prefix)."""
        if spec.path.startswith("gs://") or Path(spec.path).is_absolute():
            return spec.path
        base = self.uri.rsplit("/", 1)[0]
        if self.uri.startswith("gs://"):
            return f"{base}/{spec.path}"
        return str((Path(self.uri).parent / spec.path).resolve())


Reader = Callable[[str], tuple[bytes, str]]  # uri -> (content, version)
VersionOf = Callable[[str], str]


class ConfigSource:
    """Serves the last good config and picks up a changed object without a restart.

    A changed but invalid config is rejected and logged, the old one keeps serving:
    a bad push must never take the fleet down.
    """

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
        self._checked_at = 0.0
        self._rejected_version: str | None = None
        self._current = self._load()

    def _load(self) -> LoadedConfig:
        content, version = self._read(self.uri)
        config = parse_config(content.decode("utf-8", errors="replace"), self.uri)
        return LoadedConfig(config=config, uri=self.uri, version=version)

    def current(self) -> LoadedConfig:
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
                "config check failed; keeping the current config",
                extra={"fields": {"uri": self.uri, "error": str(exc)}},
            )
            return
        if version in (self._current.version, self._rejected_version):
            return
        try:
            loaded = self._load()
        except (ConfigError, OSError) as exc:
            self._rejected_version = version
            self._on_reload("rejected")
            log.error(
                "new config rejected; still serving the previous one",
                extra={
                    "fields": {
                        "uri": self.uri,
                        "error": str(exc),
                        "serving_version": self._current.version,
                    }
                },
            )
            return
        self._current = loaded
        self._on_reload("loaded")
        log.info(
            "config reloaded",
            extra={
                "fields": {
                    "uri": self.uri,
                    "version": loaded.version,
                    "industry": loaded.config.industry,
                }
            },
        )
