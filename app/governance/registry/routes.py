"""Registry administration: versions, canary traffic, promote, rollback, disable.

Models are platform-wide, so changing them takes `admin`; reading takes `governance:read`.
Each change is recorded by the audit trail's admin hook with the acting principal.
"""

from __future__ import annotations

from typing import Any

import marshmallow as ma
from sqlalchemy import select

from app.extensions import db
from app.fields import StrictBoolean
from app.governance import blp
from app.governance.registry import service as registry
from app.governance.registry.models import VERSION_STATUSES, RegisteredModel
from app.identity import scopes as sc
from app.identity.principal import current_principal, require_scopes
from app.inference.backends import backend_class, families


def _known_backend(family: str) -> None:
    try:
        backend_class(family)
    except ValueError as exc:
        raise ma.ValidationError(str(exc)) from None


class VersionSchema(ma.Schema):
    id = ma.fields.String(dump_only=True)
    version = ma.fields.String(required=True, validate=ma.validate.Length(min=1, max=64))
    # The document lists the families installed when it is built (entry points); one registered
    # later in-process is still accepted, by the validator, which asks at load time.
    backend = ma.fields.String(
        required=True,
        validate=_known_backend,
        metadata={"example": "openai_compatible", "enum": families()},
    )
    params = ma.fields.Dict(load_default=dict)
    limits = ma.fields.Dict(load_default=dict)
    artifact_uri = ma.fields.String(allow_none=True)
    artifact_sha256 = ma.fields.String(allow_none=True, validate=ma.validate.Regexp(r"^[0-9a-f]{64}$"))
    status = ma.fields.String(dump_only=True, metadata={"description": ", ".join(VERSION_STATUSES)})
    created_by = ma.fields.String(dump_only=True)
    created_at = ma.fields.DateTime(dump_only=True)


NAME = ma.validate.Regexp(
    r"^[A-Za-z0-9._:-]{1,128}$", error="1 to 128 of A-Z a-z 0-9 . _ : - (got {input!r})."
)


def _distinct(aliases: list[str]) -> None:
    if len(set(aliases)) != len(aliases):
        raise ma.ValidationError("Aliases must be distinct.")


class RegisteredModelSchema(ma.Schema):
    name = ma.fields.String(required=True, validate=NAME)
    description = ma.fields.String(load_default="")
    aliases = ma.fields.List(
        ma.fields.String(validate=NAME),
        load_default=list,
        validate=_distinct,
        metadata={"description": "Other names for the model; like names, unique across models."},
    )
    required = StrictBoolean(
        load_default=False,
        metadata={
            "description": "The instance is ready (/readyz) only once this model is loaded. "
            "Default false: a registry addition that fails to load is reported, not fatal."
        },
    )
    disabled = ma.fields.Boolean(dump_only=True)
    active_version = ma.fields.String(dump_only=True, allow_none=True)
    previous_version = ma.fields.String(dump_only=True, allow_none=True)
    canary_version = ma.fields.String(dump_only=True, allow_none=True)
    canary_weight = ma.fields.Float(dump_only=True)
    versions = ma.fields.List(ma.fields.Nested(VersionSchema), dump_only=True)


class RegisteredModelListSchema(ma.Schema):
    data = ma.fields.List(ma.fields.Nested(RegisteredModelSchema))


class TrafficSchema(ma.Schema):
    canary_version = ma.fields.String(
        allow_none=True, required=True, metadata={"description": "null: no canary"}
    )
    canary_weight = ma.fields.Float(
        required=True,
        validate=ma.validate.Range(min=0, max=100),
        metadata={"description": "percent of callers"},
    )


def dump_model(model: RegisteredModel) -> dict[str, Any]:
    by_id = {v.id: v.version for v in model.versions}
    return {
        "name": model.name,
        "description": model.description,
        "aliases": [a.alias for a in model.aliases],
        "required": model.required,
        "disabled": model.disabled,
        "active_version": by_id.get(model.active_version_id or ""),
        "previous_version": by_id.get(model.previous_version_id or ""),
        "canary_version": by_id.get(model.canary_version_id or ""),
        "canary_weight": model.canary_weight,
        "versions": model.versions,
    }


def _actor() -> str:
    return current_principal().subject


@blp.route("/v1/governance/models")
@require_scopes(sc.GOVERNANCE_READ)
@blp.response(200, RegisteredModelListSchema)
def list_registered_models() -> dict[str, Any]:
    """List registered models with their versions and traffic"""
    return {"data": all_models()}


def all_models() -> list[dict[str, Any]]:
    """Every registered model as the API shows it (the API and the console)."""
    models = db.session.scalars(select(RegisteredModel).order_by(RegisteredModel.name)).all()
    return [dump_model(m) for m in models]


@blp.route("/v1/governance/models", methods=["POST"])
@require_scopes(sc.ADMIN)
@blp.arguments(RegisteredModelSchema)
@blp.response(201, RegisteredModelSchema)
def register_model(data: dict[str, Any]) -> dict[str, Any]:
    """Register a model name (and aliases); add versions next"""
    return dump_model(registry.create_model(data, _actor()))


@blp.route("/v1/governance/models/<name>")
@require_scopes(sc.GOVERNANCE_READ)
@blp.response(200, RegisteredModelSchema)
def get_registered_model(name: str) -> dict[str, Any]:
    """One model: versions, traffic, status"""
    return dump_model(registry.get_model(name))


@blp.route("/v1/governance/models/<name>/versions", methods=["POST"])
@require_scopes(sc.ADMIN)
@blp.arguments(VersionSchema)
@blp.response(201, VersionSchema)
def add_model_version(data: dict[str, Any], name: str) -> Any:
    """Add a version (staged; the first version of a model becomes active)

    `params` are checked with the backend's own schema before anything is stored: a version that
    could not load is 400 `invalid_backend_params`, naming the field (e.g. `params.base_url`).
    """
    return registry.add_version(name, data, _actor())


@blp.route("/v1/governance/models/<name>/traffic", methods=["PUT"])
@require_scopes(sc.ADMIN)
@blp.arguments(TrafficSchema)
@blp.response(200, RegisteredModelSchema)
def set_model_traffic(data: dict[str, Any], name: str) -> dict[str, Any]:
    """Send a share of callers to a canary version (sticky per tenant and user)"""
    return dump_model(registry.set_canary(name, data["canary_version"], data["canary_weight"]))


@blp.route("/v1/governance/models/<name>/promote", methods=["POST"])
@require_scopes(sc.ADMIN)
@blp.response(200, RegisteredModelSchema)
def promote_model_canary(name: str) -> dict[str, Any]:
    """Make the canary the active version; the old one stays loaded for rollback"""
    return dump_model(registry.promote(name))


@blp.route("/v1/governance/models/<name>/rollback", methods=["POST"])
@require_scopes(sc.ADMIN)
@blp.response(200, RegisteredModelSchema)
def rollback_model(name: str) -> dict[str, Any]:
    """Undo the latest step toward a new version, once

    With a canary taking traffic, the canary stops and is retired. Otherwise, after a promote,
    the previous version is active again and the promoted one is retired. Each rollback undoes
    one step and clears its target: rolling back again after a promote is 409 `no_previous`,
    never a return to the version just retired (the rollback target is kept loaded on every
    worker so the switch is instant, and a retired version comes back only as a new version).
    """
    return dump_model(registry.rollback(name))


@blp.route("/v1/governance/models/<name>/disable", methods=["POST"])
@require_scopes(sc.ADMIN)
@blp.response(200, RegisteredModelSchema)
def disable_model(name: str) -> dict[str, Any]:
    """Refuse requests for this model (403 model_disabled) until enabled"""
    return dump_model(registry.set_disabled(name, True))


@blp.route("/v1/governance/models/<name>/enable", methods=["POST"])
@require_scopes(sc.ADMIN)
@blp.response(200, RegisteredModelSchema)
def enable_model(name: str) -> dict[str, Any]:
    """Serve this model again"""
    return dump_model(registry.set_disabled(name, False))
