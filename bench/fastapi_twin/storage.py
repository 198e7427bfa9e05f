"""The twin's PostgreSQL side (asyncpg): API keys stored as argon2 hashes, and one audit row per call."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

import asyncpg
from argon2 import PasswordHasher

SCHEMA = """
CREATE TABLE IF NOT EXISTS twin_api_keys (
    prefix text PRIMARY KEY,
    secret_hash text NOT NULL,
    tenant text NOT NULL,
    rate_limit integer NOT NULL,
    key_rate_limit integer NOT NULL,
    window_s integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS twin_audit (
    id bigserial PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now(),
    request_id text NOT NULL,
    tenant text NOT NULL,
    key_prefix text NOT NULL,
    route text NOT NULL,
    model text NOT NULL,
    status integer NOT NULL,
    prompt_tokens integer,
    completion_tokens integer,
    latency_ms real NOT NULL
);
"""
INSERT_AUDIT = """
INSERT INTO twin_audit
    (request_id, tenant, key_prefix, route, model, status, prompt_tokens, completion_tokens, latency_ms)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
"""
AuditRow = tuple[str, str, str, str, str, int, int | None, int | None, float]
AUDIT_FIELDS = (
    "request_id",
    "tenant",
    "key_prefix",
    "route",
    "model",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
)


async def ensure_schema(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        await conn.execute(SCHEMA)


async def find_key(pool: asyncpg.Pool, prefix: str) -> asyncpg.Record | None:
    return await pool.fetchrow(
        "SELECT secret_hash, tenant, rate_limit, key_rate_limit, window_s FROM twin_api_keys "
        "WHERE prefix = $1",
        prefix,
    )


async def write_audit(pool: asyncpg.Pool, rows: Sequence[AuditRow]) -> None:
    await pool.executemany(INSERT_AUDIT, rows)


async def issue_key(dsn: str, tenant: str, rate_limit: int, key_rate_limit: int, window_s: int) -> str:
    """Create a key ``tw-<prefix>.<secret>``; only the secret's argon2 hash is stored."""
    prefix, secret = secrets.token_hex(6), secrets.token_urlsafe(24)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA)
        await conn.execute(
            "INSERT INTO twin_api_keys (prefix, secret_hash, tenant, rate_limit, key_rate_limit, window_s) "
            "VALUES ($1, $2, $3, $4, $5, $6)",
            prefix,
            PasswordHasher().hash(secret),
            tenant,
            rate_limit,
            key_rate_limit,
            window_s,
        )
    finally:
        await conn.close()
    return f"tw-{prefix}.{secret}"
