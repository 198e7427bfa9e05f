"""Users of a tenant: created by its governance:write principals (an admin: in any tenant)."""

from __future__ import annotations

from typing import Any

import marshmallow as ma

from app.errors import APIError
from app.governance import blp
from app.governance.pagination import PageArgsSchema, PageSchema, paginate
from app.identity import accounts
from app.identity import scopes as sc
from app.identity.models import User
from app.identity.principal import current_principal, require_scopes
from app.identity.scoping import get_scoped_or_404, scoped_select, target_tenant


class ScopeList(ma.fields.List):
    """Scopes as a JSON list of known scope names (an enum in the document); the models store
    them space-separated."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(ma.fields.String(validate=ma.validate.OneOf(sc.SCOPES)), **kwargs)

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> list[str] | None:
        return None if value is None else sorted(value.split() if isinstance(value, str) else value)


class UserSchema(ma.Schema):
    id = ma.fields.String(dump_only=True)
    tenant_id = ma.fields.String(metadata={"description": "Default: the caller's tenant (admin: any)."})
    username = ma.fields.String(
        required=True,
        validate=ma.validate.Regexp(r"^[A-Za-z0-9_.@-]{3,64}$", error="3-64 of A-Z a-z 0-9 _ . @ -"),
    )
    password = ma.fields.String(required=True, load_only=True, validate=ma.validate.Length(min=12, max=256))
    scopes = ScopeList(load_default=list)
    active = ma.fields.Boolean(dump_only=True)
    created_at = ma.fields.DateTime(dump_only=True)


class UserPageSchema(PageSchema):
    data = ma.fields.List(ma.fields.Nested(UserSchema))


class TenantFilterArgsSchema(PageArgsSchema):
    tenant_id = ma.fields.String(metadata={"description": "Admin only: one tenant's rows."})


def check_grantable(requested: list[str]) -> None:
    """A principal cannot create a credential holding scopes it does not hold itself."""
    principal = current_principal()
    if not sc.grantable(principal.scopes, requested):
        missing = sorted(set(requested) - principal.scopes)
        raise APIError(
            403, f"You cannot grant scope(s) you do not hold: {' '.join(missing)}.", code="scope_escalation"
        )


@blp.route("/v1/governance/users", methods=["POST"])
@require_scopes(sc.GOVERNANCE_WRITE)
@blp.arguments(UserSchema)
@blp.response(201, UserSchema)
def create_user(data: dict[str, Any]) -> User:
    """Create a user"""
    tenant = target_tenant(data.get("tenant_id"))
    check_grantable(data["scopes"])
    return accounts.create_user(tenant, data["username"], data["password"], data["scopes"])


@blp.route("/v1/governance/users", methods=["GET"])
@require_scopes(sc.GOVERNANCE_READ)
@blp.arguments(TenantFilterArgsSchema, location="query")
@blp.response(200, UserPageSchema)
def list_users(args: dict[str, Any]) -> dict[str, Any]:
    """List users"""
    stmt = scoped_select(User, tenant_id=args.get("tenant_id"))
    return paginate(stmt, User, args["limit"], args.get("cursor"))


@blp.route("/v1/governance/users/<user_id>", methods=["GET"])
@require_scopes(sc.GOVERNANCE_READ)
@blp.response(200, UserSchema)
def get_user(user_id: str) -> User:
    """Get a user"""
    return get_scoped_or_404(User, user_id)
