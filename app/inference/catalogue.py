"""The model catalogue: the registry's served versions as loaded runtimes, and request routing.

`config/models.yaml` seeds an empty registry. Models load in the background once a worker
starts serving (each in a real thread), so a worker answers `/healthz` at once and `/readyz`
reports each version as loading, loaded or failed. One model failing to load never takes the
others down, and takes the instance out of service only if the model is `required` (the
catalogue's models are; registry additions only when registered so). `MODELS_LOAD=eager` loads
inside `create_app` instead (the tests use it).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path
from typing import Any

import structlog
import yaml
from flask import Flask, current_app
from sqlalchemy.exc import SQLAlchemyError

from app import heap
from app.errors import APIError
from app.governance.registry import service as registry
from app.governance.registry.service import Traffic, VersionRecord
from app.health import register_check
from app.identity.accounts import lookup_session
from app.inference.backends import ModelSpec
from app.inference.offload import ensure_threads
from app.inference.runtime import ModelRuntime

log = structlog.get_logger(__name__)
_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::-([^}]*))?\}")


def _expand(value: Any) -> Any:
    """`${VAR}` and `${VAR:-default}` in strings, so one catalogue serves every environment."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: os.environ.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [_expand(v) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v) for k, v in value.items()}
    return value


def load_entries(path: str | Path) -> list[dict[str, Any]]:
    """The YAML catalogue's entries, expanded; those with `enabled` false or empty are skipped."""
    raw = yaml.safe_load(Path(path).read_text()) or {}
    return [
        entry
        for entry in _expand(raw.get("models", []))
        if str(entry.get("enabled", True)).lower() not in {"false", "0", "no", ""}
    ]


def spec_for(record: VersionRecord, models_dir: Path) -> ModelSpec:
    params = dict(record.params)
    if record.artifact_uri:
        artifact = Path(record.artifact_uri)
        artifact = artifact if artifact.is_absolute() else models_dir / artifact
        params["artifact"] = str(artifact)
        metadata = artifact.parent / "metadata.json"
        # The digest recorded at build time makes the backend refuse a file changed since.
        sha256 = record.artifact_sha256 or (
            json.loads(metadata.read_text())["sha256"] if metadata.exists() else None
        )
        if sha256:
            params["sha256"] = sha256
    return ModelSpec(
        name=record.model,
        version=record.version,
        backend=record.backend,
        params=params,
        limits=dict(record.limits),
        aliases=record.aliases,
        description=record.description,
    )


class ModelCatalogue:
    """What this worker serves: one runtime per served version, and the traffic between them.

    The registry in the database is the source of truth. `sync` compares the registry revision
    with the one served, at most every REGISTRY_POLL_S per worker (one indexed read), and
    applies a change by building runtimes for new versions and swapping the routing tables.
    Runtimes of versions no longer served are dropped, not closed: a stream still using one
    keeps it alive until it ends.
    """

    def __init__(self, app: Flask, seed_entries: list[dict[str, Any]], eager: bool) -> None:
        self.app = app
        self.models_dir = Path(app.config["MODELS_DIR"])
        self.poll_s = float(app.config["REGISTRY_POLL_S"])
        self.seed_entries = seed_entries
        self.eager = eager
        self.runtimes: dict[tuple[str, str], ModelRuntime] = {}
        self.traffic: dict[str, Traffic] = {}
        self.names: dict[str, str] = {}
        self.required: frozenset[str] = frozenset()
        self.revision = -1
        self.error = ""
        self._last_check = 0.0
        self._sync_lock = threading.Lock()
        self._loading_lock = threading.Lock()
        self._loading_started = eager

    # keeping up with the registry ------------------------------------------------------------
    def sync(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_check < self.poll_s:
            return
        if not self._sync_lock.acquire(blocking=force):
            return  # another greenlet is syncing; serve the current tables meanwhile
        try:
            self._last_check = now
            self._sync()
        except SQLAlchemyError as exc:
            self.error = f"registry unavailable: {type(exc).__name__}"
            log.warning("registry_sync_failed", error=str(exc).splitlines()[0])
        finally:
            self._sync_lock.release()

    def _sync(self) -> None:
        # A session of its own: db.session would hold a pooled connection in an open
        # transaction for the rest of the request, through a whole inference call or stream.
        with lookup_session() as session:
            if self.seed_entries and registry.is_empty(session):
                seeded = registry.seed(session, self.seed_entries)
                if seeded:
                    log.info("registry_seeded", models=seeded)
            if registry.revision(session) == self.revision:
                self.error = ""
                return
            revision, records, traffic, names = registry.snapshot(session)
        runtimes: dict[tuple[str, str], ModelRuntime] = {}
        new: list[ModelRuntime] = []
        for record in records:
            spec = spec_for(record, self.models_dir)
            current = self.runtimes.get((record.model, record.version))
            if current is not None and current.spec == spec:
                runtimes[(record.model, record.version)] = current
            else:
                try:
                    runtime = ModelRuntime(spec)
                except ValueError as exc:  # e.g. a backend family this build doesn't have
                    log.error(
                        "model_version_unusable", model=record.model, version=record.version, error=str(exc)
                    )
                    continue
                runtimes[(record.model, record.version)] = runtime
                new.append(runtime)
        self.runtimes, self.traffic, self.names = runtimes, {t.model: t for t in traffic}, names
        self.required = frozenset(r.model for r in records if r.required)
        self.revision, self.error = revision, ""
        ensure_threads(sum(r.max_concurrency for r in runtimes.values() if r.cpu_bound) + 4)
        log.info(
            "registry_applied", revision=revision, new_versions=[f"{r.name}/{r.spec.version}" for r in new]
        )
        if self.eager:
            for runtime in new:
                runtime.load()
            heap.settle()
        elif self._loading_started:
            self._load_in_background(new)

    def _load_in_background(self, runtimes: list[ModelRuntime]) -> None:
        def load() -> None:
            for runtime in runtimes:
                runtime.load()
            heap.settle()

        threading.Thread(target=load, name="model-loader", daemon=True).start()

    def start_loading(self) -> None:
        """Read the registry and load what it serves, once, in the background."""
        with self._loading_lock:
            if self._loading_started:
                return
            self._loading_started = True

        def run() -> None:
            with self.app.app_context():
                self.sync(force=True)
            for runtime in list(self.runtimes.values()):
                if runtime.state == "loading":
                    runtime.load()
            heap.settle()

        threading.Thread(target=run, name="model-loader", daemon=True).start()

    # routing ------------------------------------------------------------------------------
    def canonical(self, name: str) -> str:
        """The registered name behind `name` (itself or an alias); an unknown name as given."""
        return self.names.get(name, name)

    def _traffic(self, name: str, param: str) -> Traffic:
        self.sync()
        canonical = self.names.get(name)
        if canonical is None:
            raise APIError(
                404,
                f"The model '{name}' does not exist.",
                code="model_not_found",
                param=param,
                type="invalid_request_error",
            )
        traffic = self.traffic[canonical]
        if traffic.disabled:
            raise APIError(403, f"The model '{canonical}' is disabled.", code="model_disabled", param=param)
        return traffic

    def route(self, name: str, sticky_key: str, param: str = "model") -> ModelRuntime:
        """The runtime serving this caller: the canary for its share of callers, else the active."""
        traffic = self._traffic(name, param)
        return self._runtime(traffic, traffic.pick(sticky_key))

    def get(self, name: str, param: str = "model") -> ModelRuntime:
        """The active version (metadata, and calls that name no caller)."""
        traffic = self._traffic(name, param)
        return self._runtime(traffic, traffic.active)

    def _runtime(self, traffic: Traffic, version: str | None) -> ModelRuntime:
        """A model with no version yet is 409 (nothing to serve until one is registered: waiting
        won't help, so not a 503); a version that is there but did not load is 503."""
        if version is None:
            raise APIError(
                409,
                f"Model '{traffic.model}' has no active version yet: register one first.",
                code="no_active_version",
                param="model",
            )
        runtime = self.runtimes.get((traffic.model, version))
        if runtime is None:
            raise APIError(
                503, f"Model '{traffic.model}' has no usable version to serve.", code="model_not_ready"
            )
        return runtime

    def get_version(self, name: str, version: str, param: str = "model_version") -> ModelRuntime:
        """An explicitly named version: the active one or the canary. The previous version is
        loaded only as the rollback target; it is retired, so asking for it (or for any version
        not taking traffic) is 404 model_not_found, as KServe answers for a version it does not
        serve, rather than 409: nothing the caller can change makes it servable."""
        traffic = self._traffic(name, "model_name")
        runtime = self.runtimes.get((traffic.model, version))
        if runtime is None or version not in (traffic.active, traffic.canary):
            raise APIError(
                404,
                f"Model '{traffic.model}' serves no version '{version}'.",
                code="model_not_found",
                param=param,
            )
        return runtime

    def served(self) -> list[ModelRuntime]:
        """The active version of every enabled model."""
        self.sync()
        return [
            self.runtimes[(t.model, t.active)]
            for t in self.traffic.values()
            if t.active is not None and not t.disabled and (t.model, t.active) in self.runtimes
        ]

    def is_required(self, name: str) -> bool:
        return name in self.required

    def readiness(self) -> tuple[bool, str]:
        """Ready when every required model is loaded; every model's state is in the detail.

        A model added through the registry is not required unless registered so: one bad
        registration must not take the whole gateway out of the load balancer.
        """
        self.sync()
        if self.error:
            return False, self.error
        runtimes = list(self.runtimes.values())
        details = [
            f"{r.name}/{r.spec.version}: {r.state}"
            + (f" ({r.reason})" if r.reason else "")
            + ("" if self.is_required(r.name) else " [not required]")
            for r in runtimes
        ]
        ready = all(r.ready for r in runtimes if self.is_required(r.name))
        return ready, "; ".join(details) or "no models configured"


def init_app(app: Flask) -> None:
    path = app.config.get("MODELS_CONFIG")
    eager = app.config.get("MODELS_LOAD") == "eager"
    catalogue = ModelCatalogue(app, load_entries(path) if path else [], eager)
    app.extensions["models"] = catalogue
    register_check(app, "models", catalogue.readiness)
    if eager:
        with app.app_context():
            catalogue.sync(force=True)
    else:
        # Not at import: `flask db upgrade` and other commands must not load models. gunicorn's
        # post_worker_init starts the load; the first request starts it under any other server.
        app.before_request(catalogue.start_loading)


def catalogue() -> ModelCatalogue:
    return current_app.extensions["models"]
