"""Reference profiles: what each model version's inputs looked like when it was judged fit to serve.

Tabular models: the training data's per-feature profile that `flask models build-defaults` writes
into the `metadata.json` next to the artifact (app/inference/training.py), or a profile of the same
shape given as `params.reference_profile`.

Text models: a reference sample of inputs (DRIFT_REFERENCE_TEXTS, one per line). Its character
lengths are kept raw (for KS) and binned (for PSI); for a model that embeds, the sample is embedded
once with the model itself and its centroid kept. Embedding ~250 sentences takes seconds of CPU, so
the centroid is computed lazily, cached in this process and shared through Redis, so one worker
pays for it per model version rather than every worker.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import structlog
from redis import Redis
from redis.exceptions import RedisError

from app.errors import APIError
from app.governance.drift.stats import BinnedReference, centroid
from app.inference.runtime import ModelRuntime

log = structlog.get_logger(__name__)

CENTROID_KEY = "drift:reference:centroid"
CENTROID_TTL_S = 30 * 86400
EMBED_CHUNK = 32  # reference sentences per forward pass, so live requests interleave with the work


@dataclass(frozen=True)
class TabularReference:
    features: list[BinnedReference]


@dataclass(frozen=True)
class TextReference:
    length: BinnedReference
    lengths: np.ndarray
    centroid: np.ndarray | None  # None: the model does not embed, or its reference is not computed yet
    embeds: bool


def tabular_from_profile(profile: Mapping[str, Any]) -> TabularReference:
    """A profile as app/inference/training.py writes it: `n` rows, per feature `edges` and `proportions`.

    Proportions times `n` gives back the exact training counts the chi-squared test needs.
    """
    n = int(profile["n"])
    return TabularReference(
        [
            BinnedReference(
                str(f["name"]),
                np.asarray(f["edges"], dtype=np.float64),
                np.rint(np.asarray(f["proportions"], dtype=np.float64) * n),
            )
            for f in profile["features"]
        ]
    )


def read_texts(path: Path) -> list[str]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


class References:
    """Reference profiles, loaded on first use and kept for the life of the process."""

    def __init__(self, reference_texts: Path, redis: Redis | None) -> None:
        self.reference_texts = reference_texts
        self._redis = redis
        self._lock = threading.Lock()
        self._tabular: dict[str, TabularReference] = {}
        self._texts: list[str] | None = None
        self._text_digest = ""
        self._lengths = np.zeros(0)
        self._length: BinnedReference | None = None
        self._centroids: dict[tuple[str, str], np.ndarray] = {}

    # tabular -----------------------------------------------------------------------------
    def tabular(self, params: Mapping[str, Any]) -> TabularReference | None:
        """The version's training profile, or None when it has none (then it is judged as text)."""
        if params.get("reference_profile"):
            return tabular_from_profile(params["reference_profile"])
        if not params.get("artifact"):
            return None
        metadata = Path(params["artifact"]).parent / "metadata.json"
        cached = self._tabular.get(str(metadata))
        if cached is not None:
            return cached
        if not metadata.is_file():
            return None
        profile = json.loads(metadata.read_text()).get("reference_profile")
        if not profile:
            return None
        reference = self._tabular[str(metadata)] = tabular_from_profile(profile)
        return reference

    # text --------------------------------------------------------------------------------
    def text(self, runtime: ModelRuntime) -> TextReference:
        texts = self._load_texts()
        assert self._length is not None
        embeds = "embeddings" in runtime.backend.capabilities
        return TextReference(
            self._length, self._lengths, self._centroid(runtime, texts) if embeds else None, embeds
        )

    def _load_texts(self) -> list[str]:
        if self._texts is None:
            texts = read_texts(self.reference_texts)
            self._lengths = np.array([len(t) for t in texts], dtype=np.float64)
            self._length = BinnedReference.from_values("length", self._lengths)
            self._text_digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
            self._texts = texts
        return self._texts

    def _centroid(self, runtime: ModelRuntime, texts: list[str]) -> np.ndarray | None:
        key = (runtime.spec.name, runtime.spec.version)
        if key in self._centroids:
            return self._centroids[key]
        # One computation per process at a time; the GET and the periodic refresh may both ask.
        with self._lock:
            if key in self._centroids:
                return self._centroids[key]
            redis_key = ":".join((CENTROID_KEY, *key, self._text_digest))
            vector = self._shared_centroid(redis_key)
            if vector is None:
                try:
                    vector = self._embed_centroid(runtime, texts)
                except APIError as exc:  # still loading, failed, or at capacity: try again next time
                    log.info("drift_reference_unavailable", model=key[0], version=key[1], reason=exc.message)
                    return None
                self._share_centroid(redis_key, vector)
            self._centroids[key] = vector
            return vector

    @staticmethod
    def _embed_centroid(runtime: ModelRuntime, texts: list[str]) -> np.ndarray:
        """Embedded with the served model, through its runtime, so admission limits still apply."""
        runtime.check_ready()
        vectors = [
            runtime.embed(texts[start : start + EMBED_CHUNK], None).vectors
            for start in range(0, len(texts), EMBED_CHUNK)
        ]
        return centroid(np.concatenate(vectors))

    def _shared_centroid(self, redis_key: str) -> np.ndarray | None:
        if self._redis is None:
            return None
        try:
            value = self._redis.get(redis_key)
        except RedisError:
            return None
        return np.frombuffer(base64.b64decode(value), dtype="<f8") if value else None

    def _share_centroid(self, redis_key: str, vector: np.ndarray) -> None:
        if self._redis is None:
            return
        try:
            encoded = base64.b64encode(vector.astype("<f8").tobytes()).decode("ascii")
            self._redis.set(redis_key, encoded, ex=CENTROID_TTL_S)
        except RedisError as exc:
            log.warning("drift_reference_share_failed", error=str(exc))
