"""Drift per served model version: live windows against reference profiles, the report, the gauges.

Windows are kept per tenant, and once more for all tenants together: a tenant's report is computed
over its own traffic only, so neither its sample size nor its statistics move when another tenant
calls the model (they would reveal that tenant's traffic volume and what its inputs look like). The
platform admin reads the all-tenants window, or one tenant's. Each observation is appended to both
windows, which doubles a small cost (a deque append; one pipelined Redis round trip a second) rather
than merging every tenant's window on each report. The gauges show the all-tenants verdict only:
a tenant label would multiply the series by the number of tenants.

Verdict per version: with fewer than DRIFT_MIN_SAMPLES live inputs it is `insufficient_data` and
never drifted. Otherwise a feature (a tabular column, or a text model's input length) is drifted
when its PSI exceeds DRIFT_PSI_THRESHOLD *and* its test (chi-squared on binned references, KS on
raw ones) gives p < DRIFT_P_VALUE (see stats.py for why both); a text model that embeds is also
drifted when its live embedding centroid is further than DRIFT_CENTROID_THRESHOLD (cosine
distance) from the reference centroid. The version is drifted if anything is.

Gauges are refreshed whenever drift is computed: on every GET of the report, and every
DRIFT_INTERVAL_S by one background greenlet per worker. The periodic pass is what makes the
gauges usable for alerting: computed only on GET, they would show whatever was true the last
time someone looked. Its cost is small (decoding a 1,000-row window and 30 chi-squared tests take
a few milliseconds per model), and the gauges use multiprocess_mode="mostrecent", so /metrics
shows the latest computation of any worker; all of them read the same Redis window.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from flask import Flask, current_app
from prometheus_client import Gauge
from redis import Redis
from redis.exceptions import RedisError

from app.errors import APIError
from app.governance.drift.reference import References, TabularReference, TextReference
from app.governance.drift.stats import FeatureDrift, binned_drift, centroid_distance, continuous_drift
from app.governance.drift.window import ALL_TENANTS, Window
from app.inference.catalogue import catalogue
from app.inference.runtime import ModelRuntime
from config import ROOT

log = structlog.get_logger(__name__)

ROWS, LENGTHS, EMBEDDINGS = "rows", "lengths", "embeddings"

PSI = Gauge(
    "gateway_model_drift_psi",
    "Population stability index of live inputs against the version's reference, per feature.",
    ("model", "version", "feature"),
    multiprocess_mode="mostrecent",
)
CENTROID_DISTANCE = Gauge(
    "gateway_model_drift_centroid_distance",
    "Cosine distance between the live and the reference embedding centroids.",
    ("model", "version"),
    multiprocess_mode="mostrecent",
)
DRIFTED = Gauge(
    "gateway_model_drifted",
    "1 when the version's live inputs are judged drifted (thresholds and tests as in the drift report).",
    ("model", "version"),
    multiprocess_mode="mostrecent",
)


@dataclass(frozen=True)
class DriftSettings:
    window: int = 1000
    min_samples: int = 100
    psi_threshold: float = 0.2
    p_value: float = 0.01
    # Measured with all-MiniLM-L6-v2: 100 English sentences resampled from half of the reference file
    # sit 0.15 (median; p99 0.19) from the other half's centroid; code and non-English inputs ~0.89.
    centroid_threshold: float = 0.3
    interval_s: float = 60.0
    reference_texts: Path = field(default=ROOT / "config" / "drift_reference_texts.txt")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DriftSettings:
        return cls(
            window=int(config["DRIFT_WINDOW"]),
            min_samples=int(config["DRIFT_MIN_SAMPLES"]),
            psi_threshold=float(config["DRIFT_PSI_THRESHOLD"]),
            p_value=float(config["DRIFT_P_VALUE"]),
            centroid_threshold=float(config["DRIFT_CENTROID_THRESHOLD"]),
            interval_s=float(config["DRIFT_INTERVAL_S"]),
            reference_texts=Path(config["DRIFT_REFERENCE_TEXTS"]),
        )


def served_runtimes(name: str) -> list[ModelRuntime]:
    """The versions taking traffic under `name` (or an alias): the active one, then any canary.

    The previous version the catalogue keeps loaded for a rollback takes no traffic, so its window
    would only hold stale inputs; it is judged again once a rollback makes it active.
    """
    models = catalogue()
    active = models.get(name, param="name")
    canary = models.traffic[active.spec.name].canary
    return [active] + ([models.get_version(name, canary, param="name")] if canary else [])


def _takes_text(runtime: ModelRuntime) -> bool:
    backend = runtime.backend
    return bool(backend.capabilities & {"chat", "embeddings"}) or any(
        t.datatype == "BYTES" for t in backend.inputs()
    )


class DriftMonitor:
    def __init__(
        self, settings: DriftSettings, redis: Redis | None, references: References | None = None
    ) -> None:
        self.settings = settings
        self.window = Window(settings.window, redis)
        self.references = references or References(settings.reference_texts, redis)
        self._start_lock = threading.Lock()
        self._started = False
        self._stopped = threading.Event()

    # request path ------------------------------------------------------------------------
    def _append(self, tenant_id: str, model: str, version: str, series: str, vectors: np.ndarray) -> None:
        """Into the tenant's window and the all-tenants one."""
        for scope in (tenant_id, ALL_TENANTS):
            self.window.append((scope, model, version, series), vectors)

    def observe_rows(self, tenant_id: str, model: str, version: str, rows: np.ndarray) -> None:
        rows = np.atleast_2d(np.asarray(rows, dtype=np.float32))
        self._append(tenant_id, model, version, ROWS, rows.reshape(rows.shape[0], -1))

    def observe_texts(
        self,
        tenant_id: str,
        model: str,
        version: str,
        texts: Sequence[str],
        embeddings: np.ndarray | None,
    ) -> None:
        if texts:
            lengths = np.array([[len(t)] for t in texts], dtype=np.float32)
            self._append(tenant_id, model, version, LENGTHS, lengths)
        if embeddings is not None and len(embeddings):
            self._append(tenant_id, model, version, EMBEDDINGS, np.asarray(embeddings, dtype=np.float32))

    # the report --------------------------------------------------------------------------
    def report(self, name: str, tenant_id: str | None = None) -> dict[str, Any]:
        """Over one tenant's traffic, or every tenant's when `tenant_id` is None."""
        s = self.settings
        runtimes = served_runtimes(name)
        scope = tenant_id or ALL_TENANTS
        try:
            versions = [self.version_report(runtime, scope) for runtime in runtimes]
        except RedisError:
            raise APIError(
                503, "Drift windows are unavailable: Redis did not answer.", code="drift_unavailable"
            ) from None
        return {
            "model": runtimes[0].spec.name,
            "tenant_id": tenant_id,
            "drifted": any(v["drifted"] for v in versions),
            "computed_at": datetime.now(UTC),
            "window": s.window,
            "min_samples": s.min_samples,
            "thresholds": {
                "psi": s.psi_threshold,
                "p_value": s.p_value,
                "centroid_distance": s.centroid_threshold,
            },
            "versions": versions,
        }

    def version_report(self, runtime: ModelRuntime, scope: str = ALL_TENANTS) -> dict[str, Any]:
        spec = runtime.spec
        tabular = self.references.tabular(spec.params)
        if tabular is not None:
            result = self._tabular(scope, spec.name, spec.version, tabular)
        elif _takes_text(runtime):
            result = self._text(scope, spec.name, spec.version, self.references.text(runtime))
        else:
            sample_size = len(self.window.read((scope, spec.name, spec.version, ROWS)))
            result = self._verdict(spec.version, "tabular", sample_size, [], None, status="no_reference")
        if scope == ALL_TENANTS:
            self._publish(spec.name, spec.version, result)
        return result

    def _tabular(self, scope: str, model: str, version: str, reference: TabularReference) -> dict[str, Any]:
        width = len(reference.features)
        rows = [row for row in self.window.read((scope, model, version, ROWS)) if len(row) == width]
        features: list[FeatureDrift] = []
        if len(rows) >= self.settings.min_samples:
            matrix = np.vstack(rows)
            features = [binned_drift(feature, matrix[:, j]) for j, feature in enumerate(reference.features)]
        return self._verdict(version, "tabular", len(rows), features, None)

    def _text(self, scope: str, model: str, version: str, reference: TextReference) -> dict[str, Any]:
        s = self.settings
        lengths = np.concatenate(self.window.read((scope, model, version, LENGTHS)) or [np.zeros(0)])
        features: list[FeatureDrift] = []
        if len(lengths) >= s.min_samples:
            features = [continuous_drift(reference.length, reference.lengths, lengths)]
        embedding = None
        if reference.embeds:
            embedding = {
                "status": "reference_unavailable",
                "sample_size": 0,
                "centroid_distance": None,
                "threshold": s.centroid_threshold,
                "drifted": False,
            }
            if reference.centroid is not None:
                dims = len(reference.centroid)
                # Inputs embedded with fewer `dimensions` are not comparable with the reference.
                vectors = [v for v in self.window.read((scope, model, version, EMBEDDINGS)) if len(v) == dims]
                embedding["sample_size"] = len(vectors)
                if len(vectors) < s.min_samples:
                    embedding["status"] = "insufficient_data"
                else:
                    distance = centroid_distance(reference.centroid, np.vstack(vectors))
                    embedding.update(
                        status="ok", centroid_distance=distance, drifted=distance > s.centroid_threshold
                    )
        return self._verdict(version, "text", len(lengths), features, embedding)

    def _verdict(
        self,
        version: str,
        kind: str,
        sample_size: int,
        features: list[FeatureDrift],
        embedding: dict[str, Any] | None,
        status: str | None = None,
    ) -> dict[str, Any]:
        s = self.settings
        status = status or ("ok" if sample_size >= s.min_samples else "insufficient_data")
        rows = [
            {
                "name": f.name,
                "psi": f.psi,
                "p_value": f.p_value,
                "test": f.test,
                "drifted": f.drifted(s.psi_threshold, s.p_value),
            }
            for f in features
        ]
        drifted_features = [row["name"] for row in rows if row["drifted"]]
        embedding_drifted = bool(embedding and embedding["drifted"])
        return {
            "version": version,
            "kind": kind,
            "status": status,
            "sample_size": sample_size,
            "drifted": status == "ok" and (bool(drifted_features) or embedding_drifted),
            "drifted_features": drifted_features + (["embedding_centroid"] if embedding_drifted else []),
            "features": rows,
            "embedding": embedding,
        }

    @staticmethod
    def _publish(model: str, version: str, result: dict[str, Any]) -> None:
        """Gauges only for a judged version: a PSI from a handful of inputs would be noise on a dashboard."""
        if result["status"] != "ok":
            return
        for feature in result["features"]:
            PSI.labels(model=model, version=version, feature=feature["name"]).set(feature["psi"])
        embedding = result["embedding"]
        if embedding is not None and embedding["status"] == "ok":
            CENTROID_DISTANCE.labels(model=model, version=version).set(embedding["centroid_distance"])
        DRIFTED.labels(model=model, version=version).set(1 if result["drifted"] else 0)

    # periodic refresh --------------------------------------------------------------------
    def start(self, app: Flask) -> None:
        """Once per worker (on its first request, as model loading starts): the periodic refresh."""
        if self.settings.interval_s <= 0:
            return
        with self._start_lock:
            if self._started:
                return
            self._started = True
        # A greenlet under gevent's patched threading; a daemon thread in a plain process.
        threading.Thread(target=self._run, args=(app,), name="drift-monitor", daemon=True).start()

    def stop(self) -> None:
        """End the periodic refresh (an app torn down in-process must not keep writing to Redis)."""
        self._stopped.set()

    def _run(self, app: Flask) -> None:
        while not self._stopped.wait(self.settings.interval_s):
            with app.app_context():
                self.refresh()

    def refresh(self) -> None:
        """Recompute every observed model that is still served, which updates its gauges."""
        try:
            names = sorted({model for model, _ in self.window.observed()})
        except RedisError as exc:
            log.warning("drift_refresh_failed", error=str(exc))
            return
        for name in names:
            try:
                self.report(name)
            except APIError:
                continue  # no longer served, or its window is unreachable: nothing to publish
            except Exception:
                # The loop must outlive one model's bad day; the traceback goes to the log.
                log.exception("drift_refresh_failed", model=name)


def monitor() -> DriftMonitor:
    """This app's monitor, created on first use if `init_app` has not run (commands, some tests)."""
    extensions = current_app.extensions
    existing = extensions.get("drift")
    if existing is None:
        created = DriftMonitor(DriftSettings.from_config(current_app.config), extensions.get("redis_client"))
        existing = extensions.setdefault("drift", created)
    return existing
