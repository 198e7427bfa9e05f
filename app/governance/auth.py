"""OAuth2 token endpoint (RFC 6749), refresh, revocation, and "who am I".

Grants at POST /v1/auth/token (application/x-www-form-urlencoded, as RFC 6749 section 4 requires):
- `password`: username + password of a user; returns an access and a refresh token.
- `client_credentials`: the client is an API key. `client_id` is the key's visible prefix
  (`gw-` + 12 hex) and `client_secret` the full key, sent as form fields or with HTTP Basic
  (RFC 6749 section 2.3.1). Returns an access token only: section 4.4.3 says a refresh token
  SHOULD NOT be issued, as the client can always authenticate again.
`scope` (space-separated) may narrow the credential's scopes, never widen them.
Errors use RFC 6749 section 5.2 codes as `error.code` in the gateway's error shape.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import marshmallow as ma
from flask import request

from app.errors import APIError, flatten_messages
from app.governance import blp
from app.identity import limits, tokens
from app.identity import scopes as sc
from app.identity.accounts import authenticate_user, tenant_settings
from app.identity.apikeys import find_key, looks_like_key
from app.identity.principal import current_principal, require_scopes

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
GRANT_TYPES = ("password", "client_credentials")


def _one_of(names: tuple[str, ...]) -> str:
    return "|".join(re.escape(name) for name in names)


# Space-separated known scopes, or empty (= every scope the credential holds).
SCOPE_PATTERN = rf"^(?:(?:{_one_of(sc.SCOPES)})(?: (?:{_one_of(sc.SCOPES)}))*)?$"


class TokenRequestSchema(ma.Schema):
    """The form RFC 6749 defines, exactly as strict as the document says.

    A refusal is 400 with RFC 6749's code (`invalid_request`, `unsupported_grant_type`,
    `invalid_scope`) rather than a 422: OAuth2 clients read the code. Which fields a grant needs
    is checked by the grant (400 `invalid_request`, or 401 `invalid_client` for missing client
    authentication, which may also come as HTTP Basic).
    """

    class Meta:
        unknown = ma.EXCLUDE

    grant_type = ma.fields.String(required=True, validate=ma.validate.OneOf(GRANT_TYPES))
    username = ma.fields.String(
        validate=ma.validate.Length(min=1), metadata={"description": "password grant."}
    )
    password = ma.fields.String(
        validate=ma.validate.Length(min=1), metadata={"description": "password grant."}
    )
    client_id = ma.fields.String(metadata={"description": "client_credentials: the API key prefix."})
    client_secret = ma.fields.String(metadata={"description": "client_credentials: the full API key."})
    scope = ma.fields.String(
        validate=ma.validate.Regexp(SCOPE_PATTERN, error="space-separated known scopes"),
        metadata={"description": "Space-separated subset of the credential's scopes."},
    )

    def handle_error(self, error: ma.ValidationError, data: Any, *, many: bool, **kwargs: Any) -> None:
        messages = error.messages if isinstance(error.messages, dict) else {}
        param = next(iter(messages), None)
        if param == "grant_type" and isinstance(data, Mapping) and data.get("grant_type"):
            raise oauth_error(
                "unsupported_grant_type", f"Supported grant types: {', '.join(GRANT_TYPES)}.", param=param
            )
        if param == "grant_type":
            raise oauth_error("invalid_request", "grant_type is required (form-encoded body).", param=param)
        if param == "scope":
            raise oauth_error("invalid_scope", f"scope: {messages[param][0]}.", param=param)
        raise oauth_error(
            "invalid_request", f"{param}: {flatten_messages(messages)[0]['message']}", param=param
        )


class TokenResponseSchema(ma.Schema):
    access_token = ma.fields.String(required=True)
    token_type = ma.fields.String(required=True, metadata={"description": "Always `Bearer`."})
    expires_in = ma.fields.Integer(required=True, metadata={"description": "Access token lifetime, s."})
    refresh_token = ma.fields.String(metadata={"description": "password grant and refresh only."})
    scope = ma.fields.String(required=True)


class RevokedSchema(ma.Schema):
    revoked = ma.fields.List(ma.fields.String(), metadata={"description": "Token types revoked."})


class MeSchema(ma.Schema):
    tenant_id = ma.fields.String()
    tenant_name = ma.fields.String()
    subject = ma.fields.String()
    kind = ma.fields.String(metadata={"description": "`user` or `api_key`."})
    scopes = ma.fields.List(ma.fields.String())
    key_id = ma.fields.String(allow_none=True)
    user_id = ma.fields.String(allow_none=True)
    is_admin = ma.fields.Boolean()


def oauth_error(code: str, message: str, *, param: str | None = None) -> APIError:
    status = 401 if code == "invalid_client" else 400
    headers = {"WWW-Authenticate": 'Basic realm="flask-ai-gateway"'} if status == 401 else None
    return APIError(status, message, code=code, param=param, headers=headers)


def _requested_scopes(form: dict[str, Any], held: frozenset[str]) -> frozenset[str]:
    if not form.get("scope"):
        return held
    requested = frozenset(form["scope"].split())
    if not sc.grantable(held, requested):
        raise oauth_error(
            "invalid_scope", f"The credential cannot be granted {form['scope']!r}.", param="scope"
        )
    return requested


def password_grant(form: dict[str, Any]) -> dict[str, Any]:
    if not form.get("username") or not form.get("password"):
        raise oauth_error("invalid_request", "The password grant needs username and password.")
    user = authenticate_user(form["username"], form["password"])
    if user is None:
        raise oauth_error("invalid_grant", "Invalid username or password.")
    return tokens.issue(
        subject=f"user:{user.id}",
        tenant_id=user.tenant_id,
        kind="user",
        scopes=_requested_scopes(form, user.scope_set),
        user_id=user.id,
    )


def client_credentials_grant(form: dict[str, Any]) -> dict[str, Any]:
    basic = request.authorization if request.authorization and request.authorization.type == "basic" else None
    if basic and (form.get("client_id") or form.get("client_secret")):
        raise oauth_error(
            "invalid_request", "Authenticate the client with HTTP Basic or form fields, not both."
        )
    client_id = basic.username if basic else form.get("client_id")
    client_secret = basic.password if basic else form.get("client_secret")
    if not client_id or not client_secret:
        raise oauth_error("invalid_client", "Client authentication is required: client_id and client_secret.")
    verified = find_key(client_id, client_secret)
    settings = tenant_settings(verified.tenant_id) if verified else None
    if verified is None or settings is None or not settings.active:
        raise oauth_error("invalid_client", "Client authentication failed.")
    return tokens.issue(
        subject=f"key:{verified.key_id}",
        tenant_id=verified.tenant_id,
        kind="api_key",
        scopes=_requested_scopes(form, verified.scopes),
        key_id=verified.key_id,
        user_id=verified.user_id,
        with_refresh=False,
    )


@blp.route("/v1/auth/token", methods=["POST"])
@blp.arguments(TokenRequestSchema, location="form", content_type="application/x-www-form-urlencoded")
@blp.response(200, TokenResponseSchema)
@blp.alt_response(400, response="BAD_REQUEST")
@blp.alt_response(401, response="UNAUTHORIZED")
@blp.alt_response(429, response="TOO_MANY_REQUESTS")
def issue_token(form: dict[str, Any]) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Issue tokens (OAuth2 password or client_credentials grant)

    Form-encoded per RFC 6749. For client_credentials, client_id is the API key prefix and
    client_secret the full key. Errors carry the RFC 6749 code in `error.code`.
    """
    limits.check_token_endpoint()
    body = password_grant(form) if form["grant_type"] == "password" else client_credentials_grant(form)
    return body, 200, NO_STORE


@blp.route("/v1/auth/refresh", methods=["POST"])
@blp.doc(security=[{"bearerAuth": []}], responses={401: "UNAUTHORIZED"})
@blp.response(200, TokenResponseSchema)
def refresh_tokens() -> tuple[dict[str, Any], int, dict[str, str]]:
    """Exchange a refresh token for a new pair

    Send the refresh token as the bearer. It is revoked (rotation) together with the access
    token issued beside it, and the new pair carries the scopes the credential still holds.
    """
    return tokens.refresh(tokens.verified_claims(refresh=True)), 200, NO_STORE


@blp.route("/v1/auth/revoke", methods=["POST"])
@blp.doc(security=[{"bearerAuth": []}], responses={400: "BAD_REQUEST", 401: "UNAUTHORIZED"})
@blp.response(200, RevokedSchema)
def revoke_tokens() -> dict[str, list[str]]:
    """Revoke the bearer JWT

    An access token is revoked together with the refresh token issued with it, and a refresh
    token together with every access token issued with it. Revocation holds on every worker
    at once. API keys are revoked at
    POST /v1/governance/keys/{key_id}/revoke.
    """
    header = request.headers.get("Authorization", "")
    if looks_like_key(header.partition(" ")[2].strip()):
        raise APIError(400, "This revokes JWTs; revoke an API key at /v1/governance/keys/{key_id}/revoke.")
    return {"revoked": tokens.revoke(tokens.verified_claims(refresh=None))}


@blp.route("/v1/auth/me", methods=["GET"])
@require_scopes()
@blp.response(200, MeSchema)
def me() -> dict[str, Any]:
    """The calling principal"""
    principal = current_principal()
    settings = tenant_settings(principal.tenant_id)
    return {
        "tenant_id": principal.tenant_id,
        "tenant_name": settings.name if settings else None,
        "subject": principal.subject,
        "kind": principal.kind,
        "scopes": sorted(principal.scopes),
        "key_id": principal.key_id,
        "user_id": principal.user_id,
        "is_admin": principal.is_admin,
    }
