"""Policy routes: read the effective policy, append a version, list the history.

A tenant's governance principals see and change only their own tenant's policy; the platform
admin may name any tenant, or "default" for the platform default every tenant without a policy
of its own inherits.
"""

from __future__ import annotations

from typing import Any

import marshmallow as ma

from app.extensions import db
from app.governance import blp
from app.governance.pagination import PageArgsSchema, PageSchema, paginate
from app.governance.policies import store
from app.governance.policies.models import Policy
from app.governance.policies.rules import DEFAULT_SCOPE, RulesSchema
from app.identity import scopes as sc
from app.identity.principal import current_principal, require_scopes
from app.identity.scoping import scoped_select, target_tenant, tenant_scope

TENANT_HELP = 'Default: the caller\'s tenant. A platform admin may name any tenant, or "default".'


class PolicySchema(ma.Schema):
    scope = ma.fields.String(
        allow_none=True, metadata={"description": 'Tenant id, "default", or null for the built-in policy.'}
    )
    tenant_id = ma.fields.String(allow_none=True)
    version = ma.fields.Integer(allow_none=True, metadata={"description": "null: the built-in policy."})
    source = ma.fields.String(
        metadata={"description": "tenant, default or builtin: where the rules come from."}
    )
    rules = ma.fields.Nested(RulesSchema)
    created_by = ma.fields.String(allow_none=True)
    created_at = ma.fields.DateTime(allow_none=True)


class PolicyWriteSchema(ma.Schema):
    tenant_id = ma.fields.String(metadata={"description": TENANT_HELP})
    rules = ma.fields.Nested(RulesSchema, required=True)


class PolicyQuerySchema(ma.Schema):
    tenant_id = ma.fields.String(metadata={"description": TENANT_HELP})


class PolicyVersionArgsSchema(PageArgsSchema):
    tenant_id = ma.fields.String(metadata={"description": TENANT_HELP})


class PolicyPageSchema(PageSchema):
    data = ma.fields.List(ma.fields.Nested(PolicySchema))


def _scope(requested: str | None) -> str:
    """The scope a call acts on. "default" is not a tenant of anyone's, so `tenant_scope` lets
    only the platform admin name it, as it does any other tenant."""
    if requested == DEFAULT_SCOPE:
        tenant_scope(requested)
        return DEFAULT_SCOPE
    return target_tenant(requested).id


def _view(row: Policy | None) -> dict[str, Any]:
    if row is None:
        return {
            "scope": None,
            "tenant_id": None,
            "version": None,
            "source": "builtin",
            "rules": RulesSchema().load({}),
        }
    return {
        "scope": row.scope,
        "tenant_id": row.tenant_id,
        "version": row.version,
        "source": "default" if row.scope == DEFAULT_SCOPE else "tenant",
        "rules": RulesSchema().load(row.rules),
        "created_by": row.created_by,
        "created_at": row.created_at,
    }


@blp.route("/v1/governance/policies", methods=["GET"])
@require_scopes(sc.GOVERNANCE_READ)
@blp.arguments(PolicyQuerySchema, location="query")
@blp.response(200, PolicySchema)
def get_policy(args: dict[str, Any]) -> dict[str, Any]:
    """Get a tenant's effective policy

    The tenant's latest version, else the platform default's latest, else the built-in
    permissive policy (version null).
    """
    return effective_policy(args.get("tenant_id"))


def effective_policy(tenant_id: str | None) -> dict[str, Any]:
    """The policy in force for the caller's tenant (admin: the one named); API and console."""
    return _view(store.effective_row(db.session, _scope(tenant_id)))


@blp.route("/v1/governance/policies", methods=["PUT"])
@require_scopes(sc.GOVERNANCE_WRITE)
@blp.arguments(PolicyWriteSchema)
@blp.response(201, PolicySchema)
def put_policy(data: dict[str, Any]) -> dict[str, Any]:
    """Set a tenant's policy (a new version)

    The rules are a complete document: omitted fields take the built-in defaults (all models,
    no caps, every detector "allow"). Applies on every worker from its next request.
    """
    return set_policy(data)


def set_policy(data: dict[str, Any]) -> dict[str, Any]:
    """Append a policy version for loaded `PolicyWriteSchema` data (the API and the console)."""
    scope = _scope(data.get("tenant_id"))
    return _view(store.create_version(scope, data["rules"], current_principal().subject))


@blp.route("/v1/governance/policies/versions", methods=["GET"])
@require_scopes(sc.GOVERNANCE_READ)
@blp.arguments(PolicyVersionArgsSchema, location="query")
@blp.response(200, PolicyPageSchema)
def list_versions(args: dict[str, Any]) -> dict[str, Any]:
    """List a tenant's policy versions, oldest first"""
    scope = _scope(args.get("tenant_id"))
    stmt = scoped_select(Policy).where(Policy.scope == scope)
    page = paginate(stmt, Policy, args["limit"], args.get("cursor"))
    return {**page, "data": [_view(row) for row in page["data"]]}
