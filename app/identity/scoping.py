"""Tenant-scoped queries: a non-admin principal only ever sees its own tenant's rows.

Views build their queries with `scoped_select` and fetch by id with `get_scoped_or_404`, so the
tenant filter is part of the query itself rather than a check each view must remember. A row of
another tenant is reported as not found, which does not even confirm that it exists.
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


def scoped_select(model: type[M], principal: Principal | None = None, tenant_id: str | None = None) -> Select:
    """SELECT model rows the principal may see; an admin may narrow to `tenant_id`, others are pinned."""
    principal = principal or current_principal()
    stmt = select(model)
    if not principal.is_admin:
        return stmt.where(tenant_column(model) == principal.tenant_id)
    if tenant_id:
        return stmt.where(tenant_column(model) == tenant_id)
    return stmt


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
    tenant_id = requested or principal.tenant_id
    if tenant_id != principal.tenant_id and not principal.is_admin:
        raise APIError(403, "Only a platform admin may act in another tenant.", code="cross_tenant")
    tenant = db.session.get(Tenant, tenant_id)
    if tenant is None:
        raise APIError(404, f"No tenant with id {tenant_id!r}.", param="tenant_id")
    return tenant
