"""Tenants: created and tuned by the platform admin; a tenant's own principals may read it."""

from __future__ import annotations

from typing import Any

import marshmallow as ma

from app.fields import StrictBoolean, StrictInteger
from app.governance import blp
from app.governance.pagination import PageArgsSchema, PageSchema, paginate
from app.identity import accounts
from app.identity.models import Tenant
from app.identity.principal import require_scopes
from app.identity.scopes import ADMIN, GOVERNANCE_READ
from app.identity.scoping import get_scoped_or_404, scoped_select

RATE_LIMIT_HELP = "flask-limiter syntax, e.g. `600/minute`; null = the gateway default."
# flask-limiter's grammar (limits.util.EXPR) with its granularities spelled out, so the document's
# `pattern` admits exactly the strings the limiter parses, not merely any string.
_ONE_LIMIT = r" *[0-9]+ *(?:/| *per *) *(?:[0-9]+)? *(?:second|minute|hour|day|month|year)s? *"
RATE_LIMIT = ma.validate.Regexp(
    rf"^{_ONE_LIMIT}(?:[,;|]{_ONE_LIMIT})*$", error="not a rate limit like '600/minute'"
)


class TenantSchema(ma.Schema):
    id = ma.fields.String(dump_only=True)
    name = ma.fields.String(
        required=True, validate=ma.validate.Regexp(r"^[a-z0-9][a-z0-9_.-]{0,63}$", error="lowercase slug")
    )
    rate_limit = ma.fields.String(
        allow_none=True, validate=RATE_LIMIT, metadata={"description": RATE_LIMIT_HELP}
    )
    key_rate_limit = ma.fields.String(
        allow_none=True,
        validate=RATE_LIMIT,
        metadata={"description": "Per API key or user within the tenant; null = none."},
    )
    token_quota = StrictInteger(
        allow_none=True,
        validate=ma.validate.Range(min=0),
        metadata={"description": "Tokens per quota_period; null = unlimited."},
    )
    quota_period = ma.fields.String(load_default="day", validate=ma.validate.OneOf(accounts.QUOTA_PERIODS))
    active = ma.fields.Boolean(dump_only=True)
    created_at = ma.fields.DateTime(dump_only=True)


class TenantUpdateSchema(ma.Schema):
    rate_limit = ma.fields.String(allow_none=True, validate=RATE_LIMIT)
    key_rate_limit = ma.fields.String(allow_none=True, validate=RATE_LIMIT)
    token_quota = StrictInteger(allow_none=True, validate=ma.validate.Range(min=0))
    quota_period = ma.fields.String(validate=ma.validate.OneOf(accounts.QUOTA_PERIODS))
    active = StrictBoolean()


class TenantPageSchema(PageSchema):
    data = ma.fields.List(ma.fields.Nested(TenantSchema))


@blp.route("/v1/governance/tenants", methods=["POST"])
@require_scopes(ADMIN)
@blp.arguments(TenantSchema)
@blp.response(201, TenantSchema)
def create_tenant(data: dict[str, Any]) -> Tenant:
    """Create a tenant"""
    return accounts.create_tenant(data.pop("name"), **data)


@blp.route("/v1/governance/tenants", methods=["GET"])
@require_scopes(GOVERNANCE_READ)
@blp.arguments(PageArgsSchema, location="query")
@blp.response(200, TenantPageSchema)
def list_tenants(args: dict[str, Any]) -> dict[str, Any]:
    """List tenants (an admin sees all, others their own)"""
    return paginate(scoped_select(Tenant), Tenant, args["limit"], args.get("cursor"))


@blp.route("/v1/governance/tenants/<tenant_id>", methods=["GET"])
@require_scopes(GOVERNANCE_READ)
@blp.response(200, TenantSchema)
def get_tenant(tenant_id: str) -> Tenant:
    """Get a tenant"""
    return get_scoped_or_404(Tenant, tenant_id)


@blp.route("/v1/governance/tenants/<tenant_id>", methods=["PATCH"])
@require_scopes(ADMIN)
@blp.arguments(TenantUpdateSchema)
@blp.response(200, TenantSchema)
def update_tenant(changes: dict[str, Any], tenant_id: str) -> Tenant:
    """Set a tenant's rate limits, token quota or active flag

    Takes effect on every worker from the next request.
    """
    return accounts.update_tenant(get_scoped_or_404(Tenant, tenant_id), changes)
