"""API keys: issued by a tenant's governance:write principals (an admin: in any tenant), revocable."""

from __future__ import annotations

from datetime import UTC
from typing import Any

import marshmallow as ma

from app.errors import APIError
from app.extensions import db
from app.governance import blp
from app.governance.pagination import PageSchema, paginate
from app.governance.users import ScopeList, TenantFilterArgsSchema, check_grantable
from app.identity import scopes as sc
from app.identity.apikeys import issue_key, revoke_key
from app.identity.models import ApiKey, User, utcnow
from app.identity.principal import current_principal, require_scopes
from app.identity.scoping import get_scoped_or_404, scoped_select, target_tenant


class ApiKeySchema(ma.Schema):
    id = ma.fields.String(dump_only=True)
    tenant_id = ma.fields.String(metadata={"description": "Default: the caller's tenant (admin: any)."})
    user_id = ma.fields.String(dump_only=True, allow_none=True)
    name = ma.fields.String(required=True, validate=ma.validate.Length(min=1, max=64))
    prefix = ma.fields.String(dump_only=True, metadata={"description": "Visible part; the client_id."})
    scopes = ScopeList(
        metadata={"description": "Default: inference:invoke and models:read, those the caller holds."}
    )
    expires_at = ma.fields.AwareDateTime(
        default_timezone=UTC, allow_none=True, metadata={"description": "ISO 8601; null = never."}
    )
    last_used_at = ma.fields.DateTime(dump_only=True, allow_none=True)
    revoked_at = ma.fields.DateTime(dump_only=True, allow_none=True)
    created_at = ma.fields.DateTime(dump_only=True)


class CreatedApiKeySchema(ApiKeySchema):
    key = ma.fields.String(
        dump_only=True, metadata={"description": "The full key. Shown only now: store it."}
    )


class ApiKeyPageSchema(PageSchema):
    data = ma.fields.List(ma.fields.Nested(ApiKeySchema))


@blp.route("/v1/governance/keys", methods=["POST"])
@require_scopes(sc.GOVERNANCE_WRITE)
@blp.arguments(ApiKeySchema)
@blp.response(201, CreatedApiKeySchema)
def create_key(data: dict[str, Any]) -> dict[str, Any]:
    """Issue an API key

    The response is the only time the full key is shown. In the caller's own tenant the key
    belongs to the calling user (or to the user owning the calling key).
    """
    return issue_for_caller(data)


def issue_for_caller(data: dict[str, Any]) -> dict[str, Any]:
    """Issue a key as the caller may (scopes it can grant, its tenant unless admin), for loaded
    `ApiKeySchema` data; the result holds the full key (the API and the console)."""
    principal = current_principal()
    tenant = target_tenant(data.get("tenant_id"))
    scopes = data.get("scopes")
    if scopes is None:
        scopes = [s for s in sc.DEFAULT_KEY_SCOPES if principal.has_scopes(s)]
    check_grantable(scopes)
    expires_at = data.get("expires_at")
    if expires_at is not None and expires_at <= utcnow():
        raise APIError(422, "expires_at: must be in the future.", param="expires_at")
    owner = db.session.get(User, principal.user_id) if principal.user_id else None
    key, full = issue_key(
        tenant,
        data["name"],
        scopes,
        user=owner if owner is not None and owner.tenant_id == tenant.id else None,
        expires_at=expires_at,
    )
    return {**{column.name: getattr(key, column.name) for column in ApiKey.__table__.columns}, "key": full}


@blp.route("/v1/governance/keys", methods=["GET"])
@require_scopes(sc.GOVERNANCE_READ)
@blp.arguments(TenantFilterArgsSchema, location="query")
@blp.response(200, ApiKeyPageSchema)
def list_keys(args: dict[str, Any]) -> dict[str, Any]:
    """List API keys (prefixes and metadata; never secrets)"""
    stmt = scoped_select(ApiKey, tenant_id=args.get("tenant_id"))
    return paginate(stmt, ApiKey, args["limit"], args.get("cursor"))


@blp.route("/v1/governance/keys/<key_id>", methods=["GET"])
@require_scopes(sc.GOVERNANCE_READ)
@blp.response(200, ApiKeySchema)
def get_key(key_id: str) -> ApiKey:
    """Get an API key's metadata"""
    return get_scoped_or_404(ApiKey, key_id)


@blp.route("/v1/governance/keys/<key_id>/revoke", methods=["POST"])
@require_scopes(sc.GOVERNANCE_WRITE)
@blp.response(200, ApiKeySchema)
def revoke(key_id: str) -> ApiKey:
    """Revoke an API key

    Idempotent. Every worker refuses the key, and JWTs issued to it, from its next request.
    """
    return revoke_key(get_scoped_or_404(ApiKey, key_id))
