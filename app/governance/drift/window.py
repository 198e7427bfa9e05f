"""Rolling windows of recent live inputs, per scope, model, version and series ("rows", "lengths",
"embeddings"). A scope is a tenant id, or ALL_TENANTS for the platform-wide window (see monitor.py).

With Redis every worker of every instance feeds one window: a list per key, newest first, capped
with LPUSH + LTRIM. Observations are not sent one request at a time: each worker buffers them and
sends everything in one pipelined round trip at most once a second (FLUSH_INTERVAL_S), from
whichever request comes due, so the request path costs a deque append and, once a second, about
0.2 ms. A worker that dies loses at most a second of samples, which no distribution statistic
notices. Without Redis (one process) the window is an in-process deque.

Vectors travel as base64 of little-endian float32: a tenth of the size of JSON numbers and
exactly decodable; float32 is far finer than any bin edge or cosine we compute.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections import deque
from collections.abc import Iterable

import numpy as np
import structlog
from redis import Redis
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)

Key = tuple[str, str, str, str]  # (scope, model, version, series)

# The platform-wide scope. Tenant ids are hex, so no tenant can be named "*".
ALL_TENANTS = "*"

FLUSH_INTERVAL_S = 1.0
KEY_PREFIX = "drift:window"
OBSERVED_KEY = "drift:observed"
# A retired version's window is not worth keeping forever; every flush renews the TTL of a live one.
KEY_TTL_S = 7 * 86400
WARN_EVERY_S = 60.0


def _encode(vector: np.ndarray) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


def _decode(value: str | bytes) -> np.ndarray:
    return np.frombuffer(base64.b64decode(value), dtype="<f4")


class Window:
    def __init__(self, size: int, redis: Redis | None) -> None:
        self.size = size
        self._redis = redis
        self._lock = threading.Lock()
        # Redis: what this worker has not sent yet; in-process: the window itself.
        self._buffers: dict[Key, deque[np.ndarray]] = {}
        self._last_flush = time.monotonic()
        self._last_warning = float("-inf")

    @property
    def shared(self) -> bool:
        return self._redis is not None

    def append(self, key: Key, vectors: np.ndarray) -> None:
        """Add rows (a 2-D array); only the newest `size` can matter, so only those are kept."""
        vectors = np.array(vectors[-self.size :], dtype=np.float32)
        with self._lock:
            buffer = self._buffers.get(key)
            if buffer is None:
                buffer = self._buffers[key] = deque(maxlen=self.size)
            buffer.extend(vectors)
        if self._redis is not None and time.monotonic() - self._last_flush >= FLUSH_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        """Send buffered observations to Redis in one pipelined round trip; a no-op without Redis."""
        if self._redis is None:
            return
        with self._lock:
            pending, self._buffers = self._buffers, {}
            self._last_flush = time.monotonic()
        if not pending:
            return
        pipe = self._redis.pipeline(transaction=False)
        for (scope, model, version, series), vectors in pending.items():
            name = self._redis_key((scope, model, version, series))
            pipe.lpush(name, *(_encode(v) for v in vectors))
            pipe.ltrim(name, 0, self.size - 1)
            pipe.expire(name, KEY_TTL_S)
            if scope == ALL_TENANTS:
                pipe.sadd(OBSERVED_KEY, json.dumps([model, version]))
        try:
            pipe.execute()
        except RedisError as exc:
            # Drift samples are statistics, not records: dropping a second of them is harmless, and
            # failing or slowing the inference that produced them is not.
            self._warn("drift_window_flush_failed", error=str(exc), dropped=sum(map(len, pending.values())))

    def read(self, key: Key) -> list[np.ndarray]:
        """The window's vectors (this worker's unsent ones included), newest first."""
        if self._redis is None:
            with self._lock:
                return list(reversed(self._buffers.get(key, ())))
        self.flush()
        try:
            return [_decode(v) for v in self._redis.lrange(self._redis_key(key), 0, self.size - 1)]
        except RedisError as exc:
            self._warn("drift_window_read_failed", error=str(exc))
            raise

    def observed(self) -> set[tuple[str, str]]:
        """Every (model, version) with live samples, from any worker when the window is shared."""
        if self._redis is None:
            with self._lock:
                return {
                    (model, version) for scope, model, version, _ in self._buffers if scope == ALL_TENANTS
                }
        self.flush()
        members: Iterable[str] = self._redis.smembers(OBSERVED_KEY)  # type: ignore[assignment]
        return {tuple(json.loads(m)) for m in members}  # type: ignore[misc]

    @staticmethod
    def _redis_key(key: Key) -> str:
        return ":".join((KEY_PREFIX, *key))

    def _warn(self, event: str, **fields: object) -> None:
        """At most one warning a minute: with Redis down, a line per request would drown the log."""
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY_S:
            self._last_warning = now
            log.warning(event, **fields)
