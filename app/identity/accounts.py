"""Tenants and users: creation and changes (shared by the API and the CLI) and cached lookups."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import marshmallow as ma
from flask import g, has_request_context
from limits import parse_many
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import APIError
from app.extensions import db
from app.identity import scopes as sc
from app.identity.cache import cache
from app.identity.hashing import hash_secret, needs_rehash, verify_secret
from app.identity.models import ApiKey, Tenant, User, utcnow

QUOTA_PERIODS = ("day", "month")
# The operator's tenant, made by `flask bootstrap`: `admin` makes a platform admin only here.
PLATFORM_TENANT = "platform"


@dataclass(frozen=True)
class TenantSettings:
    """What the request path needs to know about a tenant, cacheable across requests."""

    id: str
    name: str
    active: bool
    rate_limit: str | None
    key_rate_limit: str | None
    token_quota: int | None
    quota_period: str


def validate_rate_limit(value: str | None) -> None:
    """flask-limiter syntax, e.g. "600/minute" or "10/second;600/minute"."""
    if value is None:
        return
    try:
        if not parse_many(value):
            raise ValueError(value)
    except ValueError:
        raise ma.ValidationError(f"not a rate limit like '600/minute': {value!r}") from None


def validate_scopes(values: Iterable[str]) -> None:
    bad = sc.unknown(values)
    if bad:
        raise ma.ValidationError(f"unknown scope(s) {', '.join(bad)}; known: {', '.join(sc.SCOPES)}")


def check_admin_grant(tenant: Tenant, scopes: Iterable[str]) -> None:
    """`admin` crosses tenants, so only the platform tenant's users and keys may hold it: granted in
    another tenant it would either make a second operator or silently mean nothing."""
    if sc.ADMIN in set(scopes) and tenant.name != PLATFORM_TENANT:
        raise APIError(
            400,
            f"The admin scope can only be granted in the {PLATFORM_TENANT!r} tenant, not in "
            f"{tenant.name!r}; grant governance:read/governance:write to administer one tenant.",
            code="admin_outside_platform",
            param="scopes",
        )


def tenant_settings(tenant_id: str) -> TenantSettings | None:
    """Memoised per request and cached per process; None if the tenant does not exist."""
    memo: dict[str, TenantSettings | None] = (
        g.setdefault("_tenant_settings", {}) if has_request_context() else {}
    )
    if tenant_id not in memo:
        memo[tenant_id] = cache().get_or_load(("tenant", tenant_id), lambda: _load_settings(tenant_id))
    return memo[tenant_id]


def lookup_session() -> Session:
    """A session of its own for request-path lookups: it returns its connection to the pool as soon
    as the lookup is done, where `db.session` would hold it idle in a transaction until teardown,
    through a long inference call or stream."""
    return Session(db.engine)


def _load_settings(tenant_id: str) -> TenantSettings | None:
    with lookup_session() as session:
        tenant = session.get(Tenant, tenant_id)
        if tenant is None:
            return None
        return TenantSettings(
            id=tenant.id,
            name=tenant.name,
            active=tenant.active,
            rate_limit=tenant.rate_limit,
            key_rate_limit=tenant.key_rate_limit,
            token_quota=tenant.token_quota,
            quota_period=tenant.quota_period,
        )


def credential_active(kind: str, credential_id: str) -> bool:
    """Whether the user or key a JWT was issued to still may act: revoking a key ends its tokens too."""

    def load() -> bool:
        with lookup_session() as session:
            if kind == "user":
                user = session.get(User, credential_id)
                return bool(user and user.active)
            key = session.get(ApiKey, credential_id)
            return bool(
                key and key.revoked_at is None and (key.expires_at is None or key.expires_at > utcnow())
            )

    return bool(cache().get_or_load(("credential", kind, credential_id), load))


def _commit_or_conflict(message: str) -> None:
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        raise APIError(409, message, code="conflict") from None


def create_tenant(
    name: str,
    *,
    rate_limit: str | None = None,
    key_rate_limit: str | None = None,
    token_quota: int | None = None,
    quota_period: str = "day",
) -> Tenant:
    validate_rate_limit(rate_limit)
    validate_rate_limit(key_rate_limit)
    if quota_period not in QUOTA_PERIODS:
        raise ma.ValidationError(f"quota_period must be one of {', '.join(QUOTA_PERIODS)}")
    tenant = Tenant(
        name=name,
        rate_limit=rate_limit,
        key_rate_limit=key_rate_limit,
        token_quota=token_quota,
        quota_period=quota_period,
    )
    db.session.add(tenant)
    _commit_or_conflict(f"A tenant named {name!r} already exists.")
    return tenant


def update_tenant(tenant: Tenant, changes: dict[str, object]) -> Tenant:
    """Limits, quota and `active` apply on every worker from the next request (cache revision)."""
    validate_rate_limit(changes.get("rate_limit"))  # type: ignore[arg-type]
    validate_rate_limit(changes.get("key_rate_limit"))  # type: ignore[arg-type]
    for field, value in changes.items():
        setattr(tenant, field, value)
    _commit_or_conflict("Conflicting tenant change.")
    cache().invalidate()
    return tenant


def create_user(tenant: Tenant, username: str, password: str, scopes: Iterable[str]) -> User:
    scopes = list(scopes)
    validate_scopes(scopes)
    check_admin_grant(tenant, scopes)
    user = User(
        tenant_id=tenant.id, username=username, password_hash=hash_secret(password), scopes=sc.join(scopes)
    )
    db.session.add(user)
    _commit_or_conflict(f"The username {username!r} is taken.")
    return user


def authenticate_user(username: str, password: str) -> User | None:
    """The password grant's check; an unknown username costs as much time as a wrong password."""
    user = db.session.scalar(select(User).where(User.username == username))
    if not verify_secret(user.password_hash if user else None, password) or user is None:
        return None
    tenant = db.session.get(Tenant, user.tenant_id)
    if not user.active or tenant is None or not tenant.active:
        return None
    if needs_rehash(user.password_hash):
        user.password_hash = hash_secret(password)
        db.session.commit()
    return user
