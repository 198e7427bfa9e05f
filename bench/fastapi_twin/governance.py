"""The governance the feature-equal twin adds (``TWIN_FEATURES=full``), as a FastAPI author would.

The gateway's fully governed path runs a PII policy, a token quota, a hash-chained audit trail and
Prometheus metrics on every chat call. The light twin runs none of them, so comparing it with the
gateway compares different work. With ``TWIN_FEATURES=full`` the twin does the same work, in the
async style:

- **PII**: the messages are scanned and redacted before the upstream call, with the gateway's own
  detectors (``app.governance.policies.detectors``: regular expressions, python-stdnum,
  phonenumbers). Reusing them is deliberate: both sides then pay for exactly the same detection,
  and the comparison measures the frameworks and their plumbing, not two sets of regexes.
- **Token quota**: one Lua script on ``redis.asyncio`` reserves ``max_tokens`` against the tenant's
  daily budget before the call (429 ``insufficient_quota`` past it) and one settles the actual usage
  after it (a failed call gives the whole reservation back).
- **Audit**: rows go on an ``asyncio.Queue``; one writer task per worker drains it every 200 ms, and
  in one transaction locks the chain head (``SELECT ... FOR UPDATE``), links each row to the previous
  one by SHA-256 over its canonical JSON, inserts them and moves the head, so several workers
  append to one chain.
- **Metrics**: ``prometheus_client`` counters and a latency histogram from a pure ASGI middleware
  (``BaseHTTPMiddleware`` would add a task per request), plus tokens per tenant, on ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import redis.asyncio as aioredis
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from app.governance.policies.detectors import find_pii, redact

AUDIT_FLUSH_S = 0.2
AUDIT_BATCH = 500
QUOTA_TTL_S = 2 * 86_400

# KEYS[1] the tenant's counter for the day; ARGV: tokens, limit, ttl. 1 admitted, 0 over quota.
RESERVE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used + tonumber(ARGV[1]) > tonumber(ARGV[2]) then return 0 end
redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
# KEYS[1]; ARGV: reserved, actual (the difference goes back).
SETTLE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('INCRBY', KEYS[1], tonumber(ARGV[2]) - tonumber(ARGV[1]))
end
return 1
"""

CHAIN_SCHEMA = """
CREATE TABLE IF NOT EXISTS twin_audit_chain (
    id bigserial PRIMARY KEY,
    created_at timestamptz NOT NULL,
    record jsonb NOT NULL,
    prev_hash text NOT NULL,
    hash text NOT NULL
);
CREATE TABLE IF NOT EXISTS twin_audit_head (
    id integer PRIMARY KEY CHECK (id = 1),
    hash text NOT NULL
);
INSERT INTO twin_audit_head (id, hash) VALUES (1, repeat('0', 64)) ON CONFLICT DO NOTHING;
"""

REQUESTS = Counter("twin_http_requests_total", "Requests answered.", ["method", "route", "status"])
LATENCY = Histogram("twin_http_request_duration_seconds", "Time to the response's start.", ["route"])
IN_FLIGHT = Gauge("twin_http_requests_in_flight", "Requests being served.")
TOKENS = Counter("twin_tokens_total", "Tokens per tenant.", ["tenant", "kind"])
REDACTIONS = Counter("twin_pii_redactions_total", "PII entities redacted from inputs.", ["detector"])


def redact_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with every PII entity replaced by its placeholder (the bench policy: redact all)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            spans = find_pii(content)
            if spans:
                for span in spans:
                    REDACTIONS.labels(span.detector).inc()
                message = {**message, "content": redact(content, spans)}
        elif isinstance(content, list):
            parts = []
            for part in content:
                spans = find_pii(part.get("text", ""))
                parts.append({**part, "text": redact(part["text"], spans)} if spans else part)
            message = {**message, "content": parts}
        out.append(message)
    return out


class Quota:
    """Per-tenant daily token budgets in Redis: reserve before the call, settle after it."""

    def __init__(self, redis: aioredis.Redis, limit: int) -> None:
        self.limit = limit
        self._reserve = redis.register_script(RESERVE)
        self._settle = redis.register_script(SETTLE)

    @staticmethod
    def key(tenant: str) -> str:
        return f"twin:quota:{tenant}:{datetime.now(UTC):%Y-%m-%d}"

    async def reserve(self, tenant: str, tokens: int) -> str | None:
        """The counter's key if admitted, None if the tenant is over its budget."""
        key = self.key(tenant)
        admitted = await self._reserve(keys=[key], args=[tokens, self.limit, QUOTA_TTL_S])
        return key if admitted else None

    async def settle(self, key: str, tenant: str, reserved: int, prompt: int, completion: int) -> None:
        await self._settle(keys=[key], args=[reserved, prompt + completion])
        TOKENS.labels(tenant, "prompt").inc(prompt)
        TOKENS.labels(tenant, "completion").inc(completion)


class AuditChain:
    """One writer task per worker, appending batches to the one hash chain in PostgreSQL."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(CHAIN_SCHEMA)
        self._task = asyncio.create_task(self._run())

    def record(self, row: dict[str, Any]) -> None:
        self.queue.put_nowait({**row, "at": time.time()})

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(AUDIT_FLUSH_S)
            await self.flush()

    async def flush(self) -> None:
        while not self.queue.empty():
            batch = [self.queue.get_nowait() for _ in range(min(AUDIT_BATCH, self.queue.qsize()))]
            async with self.pool.acquire() as conn, conn.transaction():
                previous = await conn.fetchval("SELECT hash FROM twin_audit_head WHERE id = 1 FOR UPDATE")
                rows = []
                for record in batch:
                    canonical = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
                    digest = hashlib.sha256(previous.encode() + canonical).hexdigest()
                    at = datetime.fromtimestamp(record["at"], UTC)
                    rows.append((at, canonical.decode(), previous, digest))
                    previous = digest
                await conn.executemany(
                    "INSERT INTO twin_audit_chain (created_at, record, prev_hash, hash) "
                    "VALUES ($1, $2::jsonb, $3, $4)",
                    rows,
                )
                await conn.execute("UPDATE twin_audit_head SET hash = $1 WHERE id = 1", previous)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()


ASGIApp = Callable[
    [MutableMapping[str, Any], Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]], Any
]


class MetricsMiddleware:
    """Requests, status and latency per route, and ``GET /metrics``, in plain ASGI."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/metrics":
            body = generate_latest()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", CONTENT_TYPE_LATEST.encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        started = time.perf_counter()
        route = scope["path"]
        status = 500

        async def sending(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                LATENCY.labels(route).observe(time.perf_counter() - started)
            await send(message)

        IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, sending)
        finally:
            IN_FLIGHT.dec()
            REQUESTS.labels(scope["method"], route, str(status)).inc()
