"""JWTs (flask-jwt-extended): issuing pairs, verifying, refreshing with rotation, revoking.

The identity is the principal's subject string; tenant, scopes, kind and credential ids ride in
additional claims, so a request authenticated by JWT needs no database read. An access token
issued with a refresh token carries that refresh token's id and expiry (`rjti`, `rexp`): revoking
either token ends both, since an access token counts as revoked when its own id or its refresh
token's id is blocklisted. Revoked token ids go to a Redis blocklist with a TTL equal to the
token's remaining life, checked by `token_in_blocklist_loader` on every worker. If Redis is
unreachable the check fails closed (503): a revoked token must never be accepted again.

A refresh token is single-use: rotation claims it with one SET NX, so of two concurrent refreshes
on any workers exactly one wins. The winner then revokes the old refresh token's id, and with it
(through `rjti`) the access token issued beside it: a refresh means "replace my pair", so the old
access token must not stay usable for the rest of its lifetime next to the new one (a leaked
access token would otherwise outlive the rotation meant to contain it).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import structlog
from flask import Flask, current_app
from flask_jwt_extended import (
    create_access_token,
    create_refresh_token,
    decode_token,
    get_jwt,
    get_unverified_jwt_headers,
    verify_jwt_in_request,
)
from flask_jwt_extended.exceptions import JWTExtendedException, NoAuthorizationError, RevokedTokenError
from flask_jwt_extended.internal_utils import verify_token_not_blocklisted, verify_token_type
from jwt.exceptions import ExpiredSignatureError, InvalidTokenError
from redis import Redis
from redis.exceptions import RedisError

from app.errors import APIError
from app.extensions import jwt
from app.identity import scopes as sc
from app.identity.accounts import lookup_session, tenant_settings
from app.identity.models import ApiKey, User, utcnow

log = structlog.get_logger(__name__)

BLOCKLIST_PREFIX = "jwt:revoked:"
USED_PREFIX = "jwt:used:"
REQUIRED_CLAIMS = ("sub", "tenant", "scopes", "kind", "jti", "exp")
MISSING_MESSAGE = "Authentication required: send 'Authorization: Bearer <API key or access token>'."


class Blocklist:
    """Revoked token ids, and used refresh-token ids, until the token would have expired anyway.

    Without Redis, a dict in the process under a lock, so the claim stays atomic across threads.
    """

    def __init__(self, redis: Redis | None) -> None:
        self._redis = redis
        self._local: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, jti: str, expires_at: float) -> None:
        """Revoke `jti`."""
        self._set(BLOCKLIST_PREFIX + jti, expires_at, only_if_new=False)

    def claim(self, jti: str, expires_at: float) -> bool:
        """Mark a refresh token used; True for the first claim only, whichever worker makes it."""
        return self._set(USED_PREFIX + jti, expires_at, only_if_new=True)

    def any_revoked(self, jtis: Iterable[str | None]) -> bool:
        """Whether any of `jtis` is revoked, in one round trip (EXISTS counts every key it is given)."""
        keys = [BLOCKLIST_PREFIX + jti for jti in jtis if jti]
        if not keys:
            return False
        if self._redis is None:
            now = time.time()
            with self._lock:
                return any(self._local.get(key, 0.0) > now for key in keys)
        try:
            return bool(self._redis.exists(*keys))
        except RedisError as exc:
            raise _unavailable(exc) from exc

    def _set(self, key: str, expires_at: float, *, only_if_new: bool) -> bool:
        ttl = max(1, int(expires_at - time.time()) + 1)
        if self._redis is None:
            now = time.time()
            with self._lock:
                if only_if_new and self._local.get(key, 0.0) > now:
                    return False
                self._local[key] = now + ttl
                return True
        try:
            return bool(self._redis.set(key, "1", ex=ttl, nx=only_if_new))
        except RedisError as exc:
            raise _unavailable(exc) from exc


def _unavailable(exc: RedisError) -> APIError:
    log.error("jwt_blocklist_unavailable", error=str(exc))
    return APIError(
        503,
        "Token revocation is unavailable right now; retry shortly, or use an API key.",
        code="revocation_unavailable",
        headers={"Retry-After": "1"},
    )


def blocklist() -> Blocklist:
    return current_app.extensions["jwt_blocklist"]


def _is_revoked(_header: dict, payload: dict) -> bool:
    """An access token dies with the refresh token it was issued with (`rjti`), so check both."""
    return blocklist().any_revoked((payload.get("jti"), payload.get("rjti")))


def unauthorized(message: str, code: str, rfc_error: str = "invalid_token") -> APIError:
    """RFC 6750 section 3: a bare challenge when no credential was sent, else its error value."""
    challenge = "Bearer" if code == "missing_token" else f'Bearer error="{rfc_error}"'
    return APIError(401, message, code=code, headers={"WWW-Authenticate": challenge})


def verified_claims(*, refresh: bool | None = False, token: str | None = None) -> dict[str, Any]:
    """Verify the request's bearer JWT (signature, expiry, type, blocklist) and return its claims.

    `refresh=None` accepts either type. `token` verifies that JWT instead of the request's header
    (the console's session holds its tokens), by the same steps flask-jwt-extended takes for a
    header. Every failure is an APIError 401 in our shape, so callers outside a view (the
    inference service) get one exception type.
    """
    try:
        if token is None:
            verify_jwt_in_request(refresh=bool(refresh), verify_type=refresh is not None)
            claims = get_jwt()
        else:
            claims = decode_token(token)
            if refresh is not None:
                verify_token_type(claims, bool(refresh))
            verify_token_not_blocklisted(get_unverified_jwt_headers(token), claims)
    except NoAuthorizationError:
        raise unauthorized(MISSING_MESSAGE, "missing_token") from None
    except ExpiredSignatureError:
        raise unauthorized("The token has expired.", "token_expired") from None
    except RevokedTokenError:
        raise unauthorized("The token has been revoked.", "token_revoked") from None
    except (InvalidTokenError, JWTExtendedException) as exc:
        raise unauthorized(f"Invalid token: {exc}", "invalid_token") from None
    if any(name not in claims for name in REQUIRED_CLAIMS) or not isinstance(claims["scopes"], list):
        raise unauthorized("Invalid token: it lacks the gateway's claims.", "invalid_token")
    return claims


def issue(
    *,
    subject: str,
    tenant_id: str,
    kind: str,
    scopes: Iterable[str],
    key_id: str | None = None,
    user_id: str | None = None,
    with_refresh: bool = True,
) -> dict[str, Any]:
    """An RFC 6749 section 5.1 token response."""
    granted = sorted(set(scopes))
    claims: dict[str, Any] = {
        "tenant": tenant_id,
        "scopes": granted,
        "kind": kind,
        "key_id": key_id,
        "user_id": user_id,
    }
    body: dict[str, Any] = {"token_type": "Bearer", "scope": sc.join(granted)}
    access_claims = dict(claims)
    if with_refresh:
        refresh_token = create_refresh_token(identity=subject, additional_claims=claims)
        decoded = decode_token(refresh_token)
        access_claims.update(rjti=decoded["jti"], rexp=decoded["exp"])
        body["refresh_token"] = refresh_token
    body["access_token"] = create_access_token(identity=subject, additional_claims=access_claims)
    expires: timedelta = current_app.config["JWT_ACCESS_TOKEN_EXPIRES"]
    body["expires_in"] = int(expires.total_seconds())
    return body


def revoke(claims: dict[str, Any]) -> list[str]:
    """Blocklist this token; either token of a pair takes the other with it.

    Revoking an access token also revokes its `rjti`; revoking a refresh token needs nothing more,
    as `_is_revoked` refuses every access token whose `rjti` is blocklisted.
    """
    blocklist().add(claims["jti"], claims["exp"])
    if claims["type"] == "refresh":
        return ["refresh", "access"]
    if claims.get("rjti"):
        blocklist().add(claims["rjti"], claims.get("rexp") or claims["exp"])
        return ["access", "refresh"]
    return ["access"]


def refresh(claims: dict[str, Any]) -> dict[str, Any]:
    """Rotate: the presented refresh token is used up, the old pair revoked and a new pair issued,
    with scopes narrowed to what the credential holds now (a scope removed since login is not
    refreshed back)."""
    current = _current_scopes(claims["kind"], claims.get("user_id"), claims.get("key_id"))
    settings = tenant_settings(claims["tenant"])
    if current is None or settings is None or not settings.active:
        raise unauthorized("The credential this token was issued to is no longer valid.", "invalid_token")
    if not blocklist().claim(claims["jti"], claims["exp"]):
        raise unauthorized("This refresh token has already been used; sign in again.", "token_revoked")
    # Revoking the old refresh id ends every access token carrying it as `rjti` (see `_is_revoked`).
    blocklist().add(claims["jti"], claims["exp"])
    return issue(
        subject=claims["sub"],
        tenant_id=claims["tenant"],
        kind=claims["kind"],
        scopes=set(claims["scopes"]) & current,
        key_id=claims.get("key_id"),
        user_id=claims.get("user_id"),
    )


def _current_scopes(kind: str, user_id: str | None, key_id: str | None) -> frozenset[str] | None:
    with lookup_session() as session:
        user = session.get(User, user_id) if kind == "user" and user_id else None
        key = session.get(ApiKey, key_id) if kind == "api_key" and key_id else None
    if user is not None and user.active:
        return user.scope_set
    if key is not None and key.revoked_at is None and (key.expires_at is None or key.expires_at > utcnow()):
        return key.scope_set
    return None


def init_app(app: Flask) -> None:
    """flask-jwt-extended wants timedeltas; the settings are seconds so they read from the environment."""
    app.config["JWT_ACCESS_TOKEN_EXPIRES"] = timedelta(seconds=int(app.config["JWT_ACCESS_TOKEN_EXPIRES_S"]))
    app.config["JWT_REFRESH_TOKEN_EXPIRES"] = timedelta(
        seconds=int(app.config["JWT_REFRESH_TOKEN_EXPIRES_S"])
    )
    app.extensions["jwt_blocklist"] = Blocklist(app.extensions.get("redis_client"))
    jwt.token_in_blocklist_loader(_is_revoked)
