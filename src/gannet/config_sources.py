"""Where configs come from: a local file or gs:// object, read, compiled and reloaded.

A config source serves the last good config and picks up a changed one without a
restart, checked by the daemon's one ConfigWatch thread; the schema of the files is
config_schema.py's, the step checks the registry's (step_registry.py). Loading compiles
every pipeline once, so a task looks its pipeline up in one dict and finds its steps
bound to typed params.
"""

from __future__ import annotations

import logging
import posixpath
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml
from pydantic import ValidationError

from gannet.config_schema import ConfigError, DeploymentConfig, IndustryConfig, ModelSpec
from gannet.errors import ErrorCode, PermanentError
from gannet.step_registry import Plan, decode_floor
from gannet.steps import STEPS

log = logging.getLogger(__name__)

# A stored version that stays rejected is logged again this often (it is counted once).
REJECTION_REPEAT_S = 600.0

Reader = Callable[[str], tuple[bytes, str]]  # uri -> (content, version)


def _read_text(read: Reader, uri: str) -> tuple[str, str]:
    """(text, version) of a config; a missing one, or one whose stored bytes cannot be
    read as they were stored (a corrupt gzip: Storage.read_url's ValueError, which names
    it), is a ConfigError naming it."""
    try:
        content, version = read(uri)
    except FileNotFoundError as exc:
        raise ConfigError(f"{uri}: does not exist") from exc
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return content.decode("utf-8", errors="replace"), version


def _duplicate_key(
    node: yaml.Node | None, seen_nodes: set[int] | None = None
) -> yaml.constructor.ConstructorError | None:
    """The first key written twice in one mapping of the composed document, as YAML's
    own error would say it (where, and which key). YAML's loader keeps the last in
    silence, so a second `detection:` model or `SHELF_AUDIT:` pipeline pasted below the
    first replaced it (a threshold of 0.5 served as 0.05). Checked on the document as
    written, before merge keys (`<<:`, whose keys may be overridden) are applied; a
    node an alias repeats is looked at once."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if node is None or id(node) in seen_nodes:
        return None
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[tuple[str, str]] = set()
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, key.value) in seen:
                    return yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"found {key.value!r} a second time: give each key once (YAML "
                        "keeps the last)",
                        key.start_mark,
                    )
                seen.add((key.tag, key.value))
            found = _duplicate_key(key, seen_nodes) or _duplicate_key(value, seen_nodes)
            if found is not None:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found = _duplicate_key(item, seen_nodes)
            if found is not None:
                return found
    return None


def _yaml_mapping(text: str, source: str) -> dict[str, Any]:
    try:
        duplicate = _duplicate_key(yaml.compose(text, Loader=yaml.SafeLoader))
        if duplicate is not None:
            raise duplicate
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


def parse_config(text: str, source: str, version: str = "") -> LoadedConfig:
    """Validate YAML text and compile its pipelines; `source` names the file in every
    error message."""
    data = _yaml_mapping(text, source)
    try:
        config = IndustryConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_problems(exc)}") from exc
    try:
        plans = STEPS.compile(config)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    floors = {name: decode_floor(config, plan) for name, plan in plans.items()}
    for spec in config.models.values():
        _relative(source, spec.path)  # a path that leaves its bucket fails here, not per task
    return LoadedConfig(
        config=config, plans=plans, uri=source, version=version, decode_floors=floors
    )


@dataclass(frozen=True)
class LoadedConfig:
    """One validated industry config, its pipelines compiled, at one version."""

    config: IndustryConfig
    plans: Mapping[str, Plan]
    uri: str
    version: str  # mtime/size for files, object generation for gs://
    # Per pipeline, once per load rather than per message: see step_registry.decode_floor.
    decode_floors: Mapping[str, int | None]

    def plan(self, pipeline: str) -> Plan:
        """The pipeline's bound steps, or PermanentError(unknown_pipeline)."""
        try:
            return self.plans[pipeline]
        except KeyError:
            known = ", ".join(sorted(self.plans))
            raise PermanentError(
                ErrorCode.UNKNOWN_PIPELINE,
                f"pipeline {pipeline!r} is not in industry {self.config.industry!r} "
                f"(known: {known})",
            ) from None

    def model_uri(self, spec: ModelSpec) -> str:
        """Model paths are relative to the config's own location, so a config and its
        weights can be moved together (repo folder or bucket prefix)."""
        return _relative(self.uri, spec.path)


class NamedConfigError(ConfigError):
    """A deployment mapping that is itself valid names an industry config that is missing
    or invalid now, or sends a tenant to one whose `tenants:` does not list it. Not
    remembered as rejected, unlike an error in the mapping's own text: a rollout may
    push the mapping before the config it names, and the mapping must serve once that
    config is there, not wait for its own file to change again."""


VersionOf = Callable[[str], str]
# Loads a config's models (Pipeline.load_models); ConfigError naming the one that fails.
ModelCheck = Callable[[LoadedConfig], None]
_Loaded = TypeVar("_Loaded", bound="LoadedConfig | LoadedDeployment")


class _Watched(Generic[_Loaded]):
    """Serves the last good object and picks up a changed one without a restart.

    A changed but invalid config is rejected, logged and counted, and the old one keeps
    serving: a bad push must never take the fleet down. A check or read that fails for
    another reason (GCS down, or not answering: each request gives up within
    storage.METADATA_DEADLINE_S, 20 s; the config gone) is logged, counted as failed and
    retried at the next check instead of being rejected.
    So is a valid config whose models do not load (see ConfigSource.check_models_with):
    its weights may be uploaded after it.

    Checks run only when check_now is called, in the daemon on ConfigWatch's thread, one
    at a time; a task's thread only reads the current object, which a good new version
    replaces in one assignment.
    """

    kind = "config"

    def __init__(
        self,
        uri: str,
        read: Reader,
        version_of: VersionOf,
        on_reload: Callable[[str], None] | None = None,
    ) -> None:
        self.uri = uri
        self._read = read
        self._version_of = version_of
        self._on_reload = on_reload or (lambda result: None)
        self._rejected_version: str | None = None
        # The stored version is one that was rejected (and the previous one serves):
        # until a good one is served, or the store goes back to the served one.
        self._rejected_now = False
        self._told: tuple[str, float] | None = None  # (version, when) of the last rejection logged
        self._current = self._load()

    def _load(self) -> _Loaded:
        raise NotImplementedError

    def _accept(self, loaded: _Loaded) -> None:
        """ConfigError if a valid new object still must not serve (its models)."""

    def current(self) -> _Loaded:
        return self._current

    def check_now(self) -> None:
        """Serve a changed version if it is good. Never raises: an unexpected error (a
        bug, a model load failing in a way it should not) is logged and counted as a
        failed reload, the current object serves on, and the next check tries again, so
        that the watch thread lives on and a deployment's other configs are checked."""
        try:
            self._maybe_reload()
        except Exception:  # see the docstring
            self._on_reload("failed")
            log.exception(
                f"{self.kind} check failed unexpectedly; keeping the current one",
                extra={"fields": {"uri": self.uri}},
            )

    def _maybe_reload(self) -> None:
        try:
            version = self._version_of(self.uri)
        except FileNotFoundError:  # its text is the bare address: say what happened
            self._on_reload("failed")
            log.warning(
                f"{self.kind} no longer exists; keeping the current one (restore it, or "
                "point GANNET_CONFIG_URI elsewhere: a pod started now would not start)",
                extra={"fields": {"uri": self.uri}},
            )
            return
        except Exception as exc:  # noqa: BLE001 - a failed check keeps the old config
            # GCS down or not answering: given up within storage.METADATA_DEADLINE_S (20 s)
            self._on_reload("failed")
            log.warning(
                f"{self.kind} check failed; keeping the current one",
                extra={"fields": {"uri": self.uri, "error": str(exc)}},
            )
            return
        if version == self._current.version:
            self._rejected_now = False
            return
        if version == self._rejected_version:
            return
        try:
            loaded = self._load()
        except NamedConfigError as exc:  # not remembered: that file may come next
            self._reject(exc, " (checked again later)", version)
            return
        except ConfigError as exc:
            self._rejected_version = version
            self._reject(exc, "", version)
            return
        except Exception as exc:  # noqa: BLE001 - unreadable now; try again next check
            self._on_reload("failed")
            log.warning(
                f"new {self.kind} could not be read; will retry",
                extra={"fields": {"uri": self.uri, "error": repr(exc)}},
            )
            return
        try:
            self._accept(loaded)
        except ConfigError as exc:  # not remembered: checked again at the next check
            self._reject(exc, " (checked again later)", version)
            return
        self._current = loaded
        self._rejected_now = False
        self._on_reload("loaded")
        log.info(
            f"{self.kind} reloaded",
            extra={"fields": {"uri": self.uri, "version": loaded.version}},
        )

    def rejected(self) -> list[str]:
        """The configs whose stored version was rejected: they serve a previous one."""
        return [self.uri] if self._rejected_now else []

    def _reject(self, exc: ConfigError, why: str, version: str) -> None:
        """Counted and logged once per stored version, and logged again every
        REJECTION_REPEAT_S while it stays rejected: a version checked again later (its
        model not loading yet) was logged and counted at every check, 12 errors a minute
        at the default 5 s, drowning the pod's other lines (gannet_configs_rejected
        says it is still rejected)."""
        self._rejected_now = True
        now = time.monotonic()
        if self._told is not None and self._told[0] == version:
            if now - self._told[1] < REJECTION_REPEAT_S:
                return
        else:
            self._on_reload("rejected")
        self._told = (version, now)
        log.error(
            f"new {self.kind} rejected{why}; still serving the previous one",
            extra={
                "fields": {
                    "uri": self.uri,
                    "error": str(exc),
                    "serving_version": self._current.version,
                }
            },
        )


class ConfigSource(_Watched[LoadedConfig]):
    """One industry config (a local file or gs:// object), reloaded when it changes."""

    def __init__(
        self,
        uri: str,
        read: Reader,
        version_of: VersionOf,
        on_reload: Callable[[str], None] | None = None,
        expect_industry: str | None = None,
        check_models: ModelCheck | None = None,
    ) -> None:
        """`check_models`: see check_models_with; given here (a deployment's new
        industry), it checks the first load too."""
        self._expect_industry = expect_industry
        self._check_models = check_models
        # Tenants a deployment's mapping sends here (DeploymentSource sets them): a new
        # version whose `tenants:` leaves one out is not served, or each of its tasks
        # would be refused (unknown_tenant) and dead-lettered.
        self.routed: frozenset[str] = frozenset()
        super().__init__(uri, read, version_of, on_reload)
        self._accept(self._current)

    def check_models_with(self, check: ModelCheck) -> None:
        """Before a changed config is served, `check` loads its models on the devices in
        use (the daemon: Pipeline.load_models, as start-up warms them). A config naming a
        model that is missing, corrupt or of another kind is rejected, and the previous
        one, whose models are loaded, keeps serving: switching would fail every task of
        the industry until they were dead-lettered. Set once the cache exists, after the
        first load (which start-up warms)."""
        self._check_models = check

    def _accept(self, loaded: LoadedConfig) -> None:
        left_out = loaded.config.refuses(self.routed)
        if left_out:
            raise ConfigError(
                f"{self.uri}: tenants: leaves out {', '.join(left_out)}, which the "
                "deployment config sends to this industry: add them, or change the "
                "mapping first"
            )
        if self._check_models is not None:
            self._check_models(loaded)

    def _load(self) -> LoadedConfig:
        text, version = _read_text(self._read, self.uri)
        loaded = parse_config(text, self.uri, version)
        industry = loaded.config.industry
        if self._expect_industry and industry != self._expect_industry:
            raise ConfigError(
                f"{self.uri}: industry: is {industry!r}, but this deployment serves "
                f"{self._expect_industry!r} here"
            )
        return loaded

    def for_tenant(self, tenant_id: str) -> LoadedConfig:
        """The config that serves this tenant, or PermanentError(unknown_tenant)."""
        loaded = self.current()
        loaded.config.check_tenant(tenant_id)
        return loaded

    def served(self) -> list[LoadedConfig]:
        return [self.current()]


@dataclass(frozen=True)
class LoadedDeployment:
    config: DeploymentConfig
    uri: str
    version: str
    sources: dict[str, ConfigSource]  # only the industries this process serves


def _relative(base_uri: str, path: str) -> str:
    """`path` as seen from the file `base_uri`. In a bucket, dot segments are folded
    (GCS would take `agro/../models/x.pt` as one literal object name, which does not
    exist), and a path that climbs above the bucket is a ConfigError."""
    if path.startswith("gs://") or Path(path).is_absolute():
        return path
    if base_uri.startswith("gs://"):
        bucket, _, name = base_uri.removeprefix("gs://").partition("/")
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(name), path))
        if joined in (".", "..") or joined.startswith("../"):
            raise ConfigError(f"{base_uri}: {path!r} climbs above gs://{bucket}/")
        return f"gs://{bucket}/{joined}"
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
        on_reload: Callable[[str], None] | None = None,
        industry: str | None = None,
    ) -> None:
        self.industry = industry
        self._sources: dict[str, ConfigSource] = {}
        self._check_models: ModelCheck | None = None
        super().__init__(uri, read, version_of, on_reload)

    def check_now(self) -> None:
        """The mapping first, then each industry config it serves (a task's thread
        reads them all without checking any)."""
        super().check_now()
        for source in self.current().sources.values():
            source.check_now()

    def check_models_with(self, check: ModelCheck) -> None:
        """ConfigSource.check_models_with for each industry; an industry a new mapping
        adds is checked before the mapping serves (its models failing reject it)."""
        self._check_models = check
        for source in self.current().sources.values():
            source.check_models_with(check)

    def _load(self) -> LoadedDeployment:
        text, version = _read_text(self._read, self.uri)
        data = _yaml_mapping(text, self.uri)
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
        routed = {
            name: frozenset(t for t, to in config.tenants.items() if to == name) for name in served
        }
        sources: dict[str, ConfigSource] = {}
        for name, path in served.items():
            uri = _relative(self.uri, path)
            previous = self._sources.get(name)
            # A served industry is kept, unless it refuses a tenant the mapping sends
            # there: then its file is read as stored now, as a pod starting now reads it.
            # Moving tenants between industries changes both files and the mapping, and
            # each, checked against the others' served versions, waited for the others
            # for good (a running pod never rolled out).
            if (
                previous is not None
                and previous.uri == uri
                and not previous.current().config.refuses(routed[name])
            ):
                sources[name] = previous
                continue
            try:
                sources[name] = ConfigSource(
                    uri,
                    self._read,
                    self._version_of,
                    self._on_reload,
                    expect_industry=name,
                    check_models=self._check_models,
                )
            except ConfigError as exc:
                raise NamedConfigError(f"{self.uri}: industries.{name}: {exc}") from exc
        for name, source in sources.items():
            refused = source.current().config.refuses(routed[name])
            if refused:  # its config may come next: checked again later
                raise NamedConfigError(
                    f"{self.uri}: tenants: sends {', '.join(refused)} to {name!r}, whose "
                    f"config ({source.uri}) does not list them in its tenants:"
                )
        for name, source in sources.items():
            source.routed = routed[name]
        self._sources = sources
        return LoadedDeployment(config=config, uri=self.uri, version=version, sources=sources)

    def for_tenant(self, tenant_id: str) -> LoadedConfig:
        deployment = self.current()
        industry = deployment.config.tenants.get(tenant_id, deployment.config.default_industry)
        if industry is None:
            raise PermanentError(
                ErrorCode.UNKNOWN_TENANT,
                # Not the config's address: this is the publisher's dead letter and row.
                f"tenant {tenant_id!r} is not mapped to an industry in this deployment's "
                "config: ask its operators to add it",
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

    def rejected(self) -> list[str]:
        return super().rejected() + [
            uri for source in self.current().sources.values() for uri in source.rejected()
        ]


Configs = ConfigSource | DeploymentSource


def open_configs(
    uri: str,
    read: Reader,
    version_of: VersionOf,
    industry: str | None = None,
    on_reload: Callable[[str], None] | None = None,
) -> Configs:
    """An industry config, or a deployment config (it has `industries:`) naming several.

    With `industry` (GANNET_INDUSTRY) set, a deployment serves only that industry, and a
    single industry config must be that industry: a pod never serves what it was not
    deployed for.
    """
    text, _ = _read_text(read, uri)
    data = _yaml_mapping(text, uri)
    if "industries" in data:
        return DeploymentSource(uri, read, version_of, on_reload, industry)
    return ConfigSource(uri, read, version_of, on_reload, industry)


class ConfigWatch:
    """The thread (`gannet-config-watch`) that checks the configs for a change, every
    `every_s`: the one place that decides when checks happen.

    Why a thread of its own: a check is a GCS metadata request, and a changed config a
    load and its models loaded on every device (seconds). Run inline by whichever thread
    asked for the config when it was due, a runner or a stream's callback thread waited
    for that, and for the GCS client's timeouts and retries while GCS was slow or down.
    A daemon thread: stop() does not wait for a check in flight (one hanging on GCS
    would hold up the shutdown); the process's exit ends it.
    """

    def __init__(self, configs: Configs, every_s: float) -> None:
        self._configs = configs
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gannet-config-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 0.0) -> None:
        """No check starts after this; waits up to `timeout_s` for one in flight."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            self._configs.check_now()  # never raises (_Watched.check_now)
