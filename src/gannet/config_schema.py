"""What an industry config and a deployment config may say: the schema alone.

Pipelines are configuration, not code: a YAML names models (path, threshold, classes) and
pipelines (NAME -> steps). This module only knows the shape of those files; whether a
step exists and what params it takes is the step registry's business (step_registry.py),
and reading, versioning and reloading the files is config_sources.py's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gannet.errors import ErrorCode, PermanentError
from gannet.task import MIN_CONFIDENCE, TENANT_ID_PATTERN

ModelKind = Literal["detection", "segmentation", "classification"]


class ConfigError(ValueError):
    """An industry config that must not be served; the text names the file and field."""


# ultralytics' own max_det: the most boxes (or segments) NMS keeps per image.
MAX_DETECTIONS = 300


def _quoted_tenants(tenants: object) -> None:
    """A tenant id written unquoted may not be text to YAML: `0123` is the number 83,
    `no` is false. pydantic refused it as not "a valid string" without saying why."""
    for tenant in tenants if isinstance(tenants, (list, dict)) else ():
        if not isinstance(tenant, str):
            raise ValueError(
                f"tenant {tenant!r} is not text to YAML: quote tenant ids such as '0123' "
                "or 'no' (unquoted, YAML reads 0123 as the number 83 and no as false)"
            )


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="Weights (.pt or .onnx): a path relative to the config, or gs://")
    confidence_threshold: float = Field(0.25, ge=MIN_CONFIDENCE, le=1.0)
    classes: list[str] = Field(default_factory=list, description="Keep only these; empty = all.")
    enabled: bool = True
    imgsz: int = Field(640, ge=32, le=4096)
    max_detections: int = Field(
        MAX_DETECTIONS,
        ge=1,
        le=30000,
        description="The most boxes (or segments) kept per image (per tile, sliced), the "
        "most confident first: a result that reached it says so (max_detections_reached).",
    )


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

    @field_validator("tenants", mode="before")
    @classmethod
    def _tenants_quoted(cls, value: object) -> object:
        _quoted_tenants(value)
        return value

    @field_validator("pipelines", mode="before")
    @classmethod
    def _step_shorthand(cls, value: object) -> object:
        """Accept `- detection` as well as `- sliced_detection: {slice_size: 640}`."""
        if not isinstance(value, dict):
            return value
        out: dict[str, list[Any]] = {}
        for name, steps in value.items():
            if not isinstance(steps, list):
                raise ValueError(f"pipeline {name!r} must be a list of steps")
            normalised: list[Any] = []
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

    def allows(self, tenant_id: str) -> bool:
        return self.tenants is None or tenant_id in self.tenants

    def refuses(self, tenants: Iterable[str]) -> list[str]:
        """Those of `tenants` this industry does not serve, sorted."""
        return sorted(t for t in tenants if not self.allows(t))

    def check_tenant(self, tenant_id: str) -> None:
        if not self.allows(tenant_id):
            raise PermanentError(
                ErrorCode.UNKNOWN_TENANT,
                f"tenant {tenant_id!r} is not configured for industry {self.industry!r}",
            )

    def enabled_models(self) -> dict[ModelKind, ModelSpec]:
        return {kind: spec for kind, spec in self.models.items() if spec.enabled}


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
        _quoted_tenants(value)
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
