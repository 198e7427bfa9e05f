"""Who is calling: the request path's authentication step and the one scope decorator.

`authenticate()` reads `Authorization: Bearer <credential>` and tells the two credential kinds
apart by shape: API keys start with `gw-` (the OpenAI SDKs send their api_key this way), JWT access
tokens are three dot-separated base64url parts. Every failure is an APIError 401 with a
WWW-Authenticate challenge, in the gateway's error shape, never flask-jwt-extended's 422.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import wraps
from typing import Any, TypeVar

import structlog
from flask import g, request
from flask_smorest import Blueprint

from app import tracing
from app.errors import APIError
from app.identity import limits, tokens
from app.identity import scopes as sc
from app.identity.accounts import PLATFORM_TENANT, credential_active, tenant_settings
from app.identity.apikeys import looks_like_key, verify_key
from app.identity.cache import cache
from app.identity.tokens import MISSING_MESSAGE, unauthorized

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Principal:
    """`platform`: the tenant is the platform tenant, the only one where `admin` means anything."""

    tenant_id: str
    subject: str
    kind: str  # "user" | "api_key"
    scopes: frozenset[str]
    key_id: str | None
    user_id: str | None
    platform: bool = False

    @property
    def is_admin(self) -> bool:
        """A platform admin holds every scope and may act across tenants. `authenticate` already
        drops `admin` outside the platform tenant; this checks again for Principals built elsewhere."""
        return self.platform and sc.ADMIN in self.scopes

    def has_scopes(self, *required: str) -> bool:
        return sc.satisfies(self.scopes, required)


@tracing.step("auth")
def authenticate(credential: str | None = None, *, defer_sync: bool = False) -> Principal:
    """The caller's Principal, once per request; also sets `g.principal` and `g.tenant`.

    `credential` is for callers that hold the bearer credential elsewhere than in the
    Authorization header (the console keeps it in its session); it goes through the same checks.
    `defer_sync` is for `require_scopes` only, whose rate-limit step reads the identity revision
    (see identity/cache.py) and calls `reauthenticate` if it changed.
    """
    principal = g.get("principal")
    if principal is not None:
        return principal
    token = credential if credential is not None else _bearer_token()
    if looks_like_key(token):
        principal = _from_api_key(token, defer_sync)  # syncs the cache itself, after the throttle's check
    elif token.count(".") == 2:
        cache().sync()
        principal = _from_jwt(token if credential is not None else None)
    else:
        raise unauthorized("The bearer token is neither an API key (gw-...) nor a JWT.", "invalid_token")
    settings = tenant_settings(principal.tenant_id)
    if settings is None or not settings.active:
        raise APIError(403, "This tenant is disabled.", code="tenant_disabled")
    principal = _in_tenant(principal, platform=settings.name == PLATFORM_TENANT)
    g.principal = principal
    g.tenant = principal.tenant_id
    structlog.contextvars.bind_contextvars(tenant=principal.tenant_id, subject=principal.subject)
    return principal


def reauthenticate() -> Principal:
    """The identity data changed under a Principal served from the cache: authenticate again,
    with the tenant settings this request had memoised forgotten too."""
    g.pop("principal", None)
    g.pop("_tenant_settings", None)
    return authenticate()


def current_principal() -> Principal:
    """The request's Principal, authenticating first if nothing has yet."""
    return g.get("principal") or authenticate()


def require_scopes(*scopes: str) -> Callable[[F], F]:
    """Authenticate, check every scope in `scopes` (admin has all), then rate-limit, in that order.

    Place it above `@blp.arguments` so an unauthenticated caller learns nothing from validation
    errors. It also documents the operation: oauth2 security with its scopes (or bearerAuth),
    401/403/429 responses, and the scopes in `x-required-scopes` and the description.
    """
    bad = sc.unknown(scopes)
    if bad:
        raise ValueError(f"unknown scopes {bad}")
    needed = " ".join(scopes)

    def decorator(fn: F) -> F:
        @wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            principal = authenticate(defer_sync=True)
            check_scopes(principal, scopes)
            limits.check()
            if g.principal is not principal:  # re-authenticated: identity data had changed
                check_scopes(g.principal, scopes)
            return fn(*args, **kwargs)

        requirement = f"Requires scope(s): `{needed}` (or `admin`)." if scopes else "Any valid credential."
        wrapper.__doc__ = f"{inspect.cleandoc(fn.__doc__ or '')}\n\n{requirement}"
        documented = Blueprint.doc(
            # Either scheme: OAuth2 names the scopes; a bare bearer is how API keys are sent.
            security=[{"oauth2": list(scopes)}, {"bearerAuth": []}],
            responses={401: "UNAUTHORIZED", 403: "FORBIDDEN", 429: "TOO_MANY_REQUESTS"},
            **{"x-required-scopes": list(scopes)},
        )
        return documented(wrapper)  # type: ignore[return-value]

    return decorator


def check_scopes(principal: Principal, scopes: tuple[str, ...]) -> None:
    """403 `insufficient_scope` unless the principal holds every scope (admin holds all)."""
    if not principal.has_scopes(*scopes):
        needed = " ".join(scopes)
        raise APIError(
            403,
            f"This operation requires the scope(s) {needed}; the credential has "
            f"{' '.join(sorted(principal.scopes)) or 'none'}.",
            code="insufficient_scope",
            headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{needed}"'},
        )


def _in_tenant(principal: Principal, *, platform: bool) -> Principal:
    """Outside the platform tenant `admin` is dropped: it grants neither every scope nor other
    tenants, even on a credential that holds it from before grants were checked."""
    scopes = principal.scopes if platform else principal.scopes - {sc.ADMIN}
    return replace(principal, scopes=scopes, platform=platform)


def _bearer_token() -> str:
    header = request.headers.get("Authorization", "").strip()
    if not header:
        raise unauthorized(MISSING_MESSAGE, "missing_token")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise unauthorized(
            "Malformed Authorization header: expected 'Bearer <API key or access token>'.",
            "invalid_request",
            rfc_error="invalid_request",
        )
    return token


def _from_api_key(token: str, defer_sync: bool = False) -> Principal:
    verified = verify_key(token, defer_sync=defer_sync)
    if verified is None:
        raise unauthorized("The API key is invalid, expired or revoked.", "invalid_api_key")
    return Principal(
        tenant_id=verified.tenant_id,
        subject=f"key:{verified.key_id}",
        kind="api_key",
        scopes=verified.scopes,
        key_id=verified.key_id,
        user_id=verified.user_id,
    )


def _from_jwt(token: str | None = None) -> Principal:
    claims = tokens.verified_claims(token=token)
    kind = claims["kind"]
    credential_id = claims.get("key_id") if kind == "api_key" else claims.get("user_id")
    if kind not in ("user", "api_key") or not credential_id:
        raise unauthorized("Invalid token: unknown credential kind.", "invalid_token")
    if not credential_active(kind, credential_id):
        raise unauthorized(
            "The credential this token was issued to has been revoked or disabled.", "token_revoked"
        )
    return Principal(
        tenant_id=claims["tenant"],
        subject=claims["sub"],
        kind=kind,
        scopes=frozenset(claims["scopes"]),
        key_id=claims.get("key_id"),
        user_id=claims.get("user_id"),
    )
