"""API keys: `gw-<12 hex>_<43 url-safe chars>`.

The part before `_` is the visible prefix, stored and unique, which finds the row without a scan;
the secret after it (256 random bits) is stored only as its HMAC-SHA256 under the server's pepper
(see hashing.py for why not argon2; keys stored as argon2 hashes before are upgraded on their
first successful use). The full key is returned
once, at creation. Keys start with `gw-` so `authenticate()` tells them from JWTs (`eyJ...`) at a
glance, and so secret scanners can recognise a leaked one.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import structlog
from flask import Flask, current_app
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from app.extensions import db
from app.identity import auth_throttle
from app.identity import scopes as sc
from app.identity.accounts import check_admin_grant, lookup_session, validate_scopes
from app.identity.cache import cache
from app.identity.hashing import KeyHasher, verify_secret
from app.identity.models import ApiKey, Tenant, User, utcnow

log = structlog.get_logger(__name__)

KEY_PREFIX = "gw-"
_KEY_FORMAT = re.compile(r"^(gw-[0-9a-f]{12})_([A-Za-z0-9_\-]{43})$")
# last_used_at is written at most this often per key and process: a write per request would cost
# more than the request, and "used in the last minute" is all an operator needs from it.
LAST_USED_RESOLUTION_S = 60.0


@dataclass(frozen=True)
class VerifiedKey:
    """What a valid key proves; `principal.py` turns it into a Principal."""

    key_id: str
    tenant_id: str
    user_id: str | None
    scopes: frozenset[str]
    expires_at: datetime | None


def looks_like_key(token: str) -> bool:
    return token.startswith(KEY_PREFIX)


def split_key(key: str) -> tuple[str, str] | None:
    """(prefix, secret), or None when the string is not shaped like one of our keys."""
    match = _KEY_FORMAT.match(key)
    return (match.group(1), match.group(2)) if match else None


def generate_key() -> tuple[str, str, str]:
    """(full key, prefix, secret)."""
    prefix = KEY_PREFIX + secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return f"{prefix}_{secret}", prefix, secret


def issue_key(
    tenant: Tenant,
    name: str,
    scopes: Iterable[str],
    *,
    user: User | None = None,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; the full key is in the return value and nowhere else, ever."""
    scopes = list(scopes)
    validate_scopes(scopes)
    check_admin_grant(tenant, scopes)
    full, prefix, secret = generate_key()
    key = ApiKey(
        tenant_id=tenant.id,
        user_id=user.id if user else None,
        name=name,
        prefix=prefix,
        secret_hash=hasher().hash(secret),
        scopes=sc.join(scopes),
        expires_at=expires_at,
    )
    db.session.add(key)
    db.session.commit()
    return key, full


def revoke_key(key: ApiKey) -> ApiKey:
    """Idempotent; the cache revision makes every worker forget the key on its next request."""
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        db.session.commit()
    cache().invalidate()
    return key


def hasher() -> KeyHasher:
    return current_app.extensions["api_key_hasher"]


def init_app(app: Flask) -> None:
    app.extensions["api_key_hasher"] = KeyHasher(
        str(app.config["API_KEY_PEPPER"]), app.config.get("API_KEY_PEPPERS_PREVIOUS") or ()
    )


def verify_key(presented: str, *, defer_sync: bool = False) -> VerifiedKey | None:
    """The key's principal if it is valid now: cached by SHA-256 of the key, else HMAC + database.

    `defer_sync`: a cached key is served without reading the identity revision first; the caller
    promises to read it in the same request and re-authenticate if it changed (limits.check)."""
    digest = hashlib.sha256(presented.encode()).digest()
    store = cache()
    cached = store.get(("key", digest))
    if cached is None:
        parts = split_key(presented)
        auth_throttle.refuse_if_blocked(parts[0] if parts else None)
    if cached is not None and defer_sync and store.defer_sync():
        verified = cached
    else:
        store.sync()
        verified = store.get_or_load(("key", digest), lambda: _load(presented))
    if verified is None or (verified.expires_at is not None and verified.expires_at <= utcnow()):
        return None
    _touch(verified.key_id)
    return verified


def find_key(client_id: str, presented: str) -> VerifiedKey | None:
    """client_credentials: the key must also match the client_id (its visible prefix)."""
    parts = split_key(presented)
    if parts is None or parts[0] != client_id:
        return None
    return verify_key(presented)


def _load(presented: str) -> VerifiedKey | None:
    """A cache miss: throttled by past failures first (429, no lookup), then one indexed read and
    the hash check. A legacy argon2 hash is checked in a real OS thread, so the worker's hub keeps
    serving other requests meanwhile, and is replaced by an HMAC one once it has verified."""
    parts = split_key(presented)
    prefix, secret = parts if parts is not None else (None, "")
    with auth_throttle.attempt(prefix) as failed:
        key = None
        if prefix is not None:
            with lookup_session() as session:
                key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
        if key is None or key.revoked_at is not None:
            return None  # no hash spent, nothing to guess: counts nowhere
        if not check_secret(key.secret_hash, secret):
            failed()
            return None
    keys = hasher()
    if not keys.is_current(key.secret_hash):
        _rehash(key.id, key.secret_hash, keys.hash(secret))
    return VerifiedKey(
        key_id=key.id,
        tenant_id=key.tenant_id,
        user_id=key.user_id,
        scopes=key.scope_set,
        expires_at=key.expires_at,
    )


def check_secret(stored_hash: str, secret: str) -> bool:
    """The one hash check of a presented secret: HMAC inline (a microsecond), legacy argon2 in a
    real OS thread."""
    from app.inference.offload import run_in_thread  # here: importing app.inference imports this module

    keys = hasher()
    if keys.is_hmac(stored_hash):
        return keys.verify(stored_hash, secret)
    return bool(run_in_thread(verify_secret, stored_hash, secret))


def _rehash(key_id: str, old_hash: str, new_hash: str) -> None:
    """Replace an argon2 hash, or one under a retired pepper, with one under the current pepper.

    Only if the row still holds the hash that just verified, so a concurrent upgrade on another
    worker is not undone; in its own transaction, and a failure only means the next use tries again.
    """
    try:
        with db.engine.begin() as conn:
            conn.execute(
                update(ApiKey)
                .where(ApiKey.id == key_id, ApiKey.secret_hash == old_hash)
                .values(secret_hash=new_hash)
            )
    except SQLAlchemyError as exc:
        log.warning("api_key_rehash_failed", key_id=key_id, error=str(exc))
        return
    log.info("api_key_rehashed", key_id=key_id, scheme="hmac-sha256")


def _touch(key_id: str) -> None:
    """Record last use, throttled, in its own short transaction so it never commits a caller's work."""
    touched: dict[str, float] = current_app.extensions.setdefault("identity_key_touched", {})
    now = time.monotonic()
    if now - touched.get(key_id, float("-inf")) < LAST_USED_RESOLUTION_S:
        return
    touched[key_id] = now
    try:
        with db.engine.begin() as conn:
            conn.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=utcnow()))
    except SQLAlchemyError as exc:
        log.warning("api_key_last_used_not_recorded", key_id=key_id, error=str(exc))
