"""Tenant scoping: a non-admin principal only ever sees or acts in its own tenant.

Views build their queries with `scoped_select` and fetch by id with `get_scoped_or_404`, so the
tenant filter is part of the query itself rather than a check each view must remember. A row of
another tenant is reported as not found, which does not even confirm that it exists.

A `tenant_id` a caller names (query or body, on any governance route) goes through one rule,
`tenant_scope`: naming another tenant without being the platform admin is 403 `cross_tenant`,
never a silently narrowed answer, so a caller cannot mistake its own rows for another tenant's.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

from sqlalchemy import Select, select
from sqlalchemy.orm import InstrumentedAttribute

from app.errors import APIError
from app.extensions import db
from app.identity.models import Tenant
from app.identity.principal import Principal, current_principal

M = TypeVar("M")


def tenant_column(model: type[Any]) -> InstrumentedAttribute:
    return model.id if model is Tenant else model.tenant_id


def tenant_scope(requested: str | None, principal: Principal | None = None) -> str | None:
    """The tenant a call is narrowed to, given the `tenant_id` it names (None: names none).

    The platform admin gets the tenant it names, or None for every tenant. Anyone else gets
    its own tenant; naming its own is allowed, naming another is refused with 403.
    """
    principal = principal or current_principal()
    if principal.is_admin:
        return requested or None
    if requested and requested != principal.tenant_id:
        raise APIError(
            403, "Only a platform admin may name another tenant.", code="cross_tenant", param="tenant_id"
        )
    return principal.tenant_id


def scoped_select(model: type[M], principal: Principal | None = None, tenant_id: str | None = None) -> Select:
    """SELECT model rows the principal may see, narrowed by `tenant_scope(tenant_id)`."""
    scope = tenant_scope(tenant_id, principal)
    stmt = select(model)
    return stmt if scope is None else stmt.where(tenant_column(model) == scope)


def get_scoped_or_404(model: type[M], object_id: str, principal: Principal | None = None) -> M:
    stmt = scoped_select(model, principal).where(model.id == object_id)  # type: ignore[attr-defined]
    found = db.session.scalar(stmt)
    if found is None:
        noun = re.sub(r"(?<!^)(?=[A-Z])", " ", model.__name__).lower()
        raise APIError(404, f"No {noun} with id {object_id!r}.")
    return found


def target_tenant(requested: str | None, principal: Principal | None = None) -> Tenant:
    """The tenant a create acts in: the caller's own, or for an admin any tenant it names."""
    principal = principal or current_principal()
    tenant_id = tenant_scope(requested, principal) or principal.tenant_id
    tenant = db.session.get(Tenant, tenant_id)
    if tenant is None:
        raise APIError(404, f"No tenant with id {tenant_id!r}.", param="tenant_id")
    return tenant
