"""Policy versions in the database, and the per-worker cache the request path reads them through.

Caching reuses the identity cache (app/identity/cache.py) rather than a cache of its own. The
request path already reads that cache's Redis revision once per request, while authenticating or
in the rate-limit step (both before the view), so a policy lookup adds no round trip; a new
version bumps the revision after its commit, and every worker drops its cached policies (and
credentials) on its next request, which is well inside the 2 s budget. Dropping the credential
entries too costs each worker one database read and HMAC check per key after a policy change.
If Redis is unreachable, entries live out their TTL (AUTH_KEY_CACHE_TTL_S) and a change is late
by at most that.

If the database is unreachable, a worker keeps enforcing the last policy it read for the tenant:
no new version can be written while it is down, so that is still the policy in force. A worker
that never read one answers 503 rather than serve without knowing the rules.
"""

from __future__ import annotations

from typing import Any

import structlog
from flask import current_app
from sqlalchemy import case, func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from app.errors import APIError
from app.extensions import db
from app.governance.policies.models import Policy
from app.governance.policies.rules import BUILTIN, DEFAULT_SCOPE, EffectivePolicy, PolicyRules
from app.identity.accounts import lookup_session
from app.identity.cache import cache

log = structlog.get_logger(__name__)

WRITE_ATTEMPTS = 3


def effective_row(session: Session, scope: str) -> Policy | None:
    """The latest version of `scope`, or for a tenant without one the latest platform default."""
    scopes = [scope] if scope == DEFAULT_SCOPE else [scope, DEFAULT_SCOPE]
    stmt = (
        select(Policy)
        .where(Policy.scope.in_(scopes))
        .order_by(case((Policy.scope == scope, 0), else_=1), Policy.version.desc())
        .limit(1)
    )
    return session.scalar(stmt)


def to_effective(row: Policy | None) -> EffectivePolicy:
    if row is None:
        return BUILTIN
    return EffectivePolicy(scope=row.scope, version=row.version, rules=PolicyRules.from_document(row.rules))


def effective_policy(tenant_id: str) -> EffectivePolicy:
    """The tenant's policy for the request path: cached per worker, fresh within one request."""
    return cache().get_or_load(("policy", tenant_id), lambda: _load(tenant_id))


def _load(tenant_id: str) -> EffectivePolicy:
    last_known: dict[str, EffectivePolicy] = current_app.extensions.setdefault("policies_last_known", {})
    try:
        with lookup_session() as session:
            policy = to_effective(effective_row(session, tenant_id))
    except SQLAlchemyError as exc:
        if tenant_id in last_known:
            log.warning("policy_database_unavailable", tenant=tenant_id, error=str(exc), serving="last_known")
            return last_known[tenant_id]
        log.error("policy_unavailable", tenant=tenant_id, error=str(exc))
        raise APIError(
            503,
            "The tenant's policy cannot be read right now; retry shortly.",
            code="policy_unavailable",
            headers={"Retry-After": "1"},
        ) from None
    last_known[tenant_id] = policy
    return policy


def create_version(scope: str, rules: dict[str, Any], created_by: str) -> Policy:
    """Append the next version of `scope`; applies on every worker from its next request.

    Two writers racing for the same version number meet the unique constraint; the loser
    retries with the next number.
    """
    for _ in range(WRITE_ATTEMPTS):
        current = db.session.scalar(select(func.max(Policy.version)).where(Policy.scope == scope))
        row = Policy(
            scope=scope,
            tenant_id=None if scope == DEFAULT_SCOPE else scope,
            version=(current or 0) + 1,
            rules=rules,
            created_by=created_by,
        )
        db.session.add(row)
        try:
            db.session.commit()
        except IntegrityError:
            db.session.rollback()
            continue
        cache().invalidate()
        return row
    raise APIError(409, "The policy is being changed concurrently; retry.", code="conflict")
