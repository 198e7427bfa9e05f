"""Registry operations. Every change bumps `RegistryState.revision` in the same transaction, which
is how every worker of every instance learns of it (app/inference/catalogue.py polls it)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import marshmallow as ma
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import APIError, flatten_messages
from app.extensions import db
from app.governance.registry.models import ModelAlias, ModelVersion, RegisteredModel, RegistryState
from app.inference.backends import backend_class


@dataclass(frozen=True)
class VersionRecord:
    """A servable version, detached from the session so workers can keep it across requests."""

    model: str
    version: str
    backend: str
    params: dict[str, Any]
    limits: dict[str, Any]
    artifact_uri: str | None
    artifact_sha256: str | None
    aliases: tuple[str, ...]
    description: str
    required: bool


@dataclass(frozen=True)
class Traffic:
    """How one model name's requests split between versions."""

    model: str
    active: str | None
    canary: str | None
    canary_weight: float
    disabled: bool

    def pick(self, sticky_key: str) -> str | None:
        """The version for this caller; the same key always lands on the same version.

        SHA-256 rather than hash(): Python's string hash differs between processes, and a
        conversation must not flip versions when its requests land on different workers.
        """
        if self.canary and self.canary_weight > 0:
            digest = hashlib.sha256(f"{self.model}\x00{sticky_key}".encode()).digest()
            if int.from_bytes(digest[:8], "big") % 10_000 < self.canary_weight * 100:
                return self.canary
        return self.active


def revision(session: Session | None = None) -> int:
    state = (session or db.session).get(RegistryState, 1)
    return state.revision if state else 0


def _bump(session: Session | None = None) -> None:
    session = session or db.session
    state = session.get(RegistryState, 1)
    if state is None:
        session.add(RegistryState(id=1, revision=1))
    else:
        state.revision = RegistryState.revision + 1


def snapshot(session: Session) -> tuple[int, list[VersionRecord], list[Traffic], dict[str, str]]:
    """Everything a worker serves, read in one transaction: (revision, versions, traffic, names)."""
    rev = revision(session)
    models = session.scalars(select(RegisteredModel)).all()
    versions: list[VersionRecord] = []
    traffic: list[Traffic] = []
    names: dict[str, str] = {}
    for model in models:
        by_id = {v.id: v for v in model.versions}
        aliases = tuple(a.alias for a in model.aliases)
        names[model.name] = model.name
        names.update({alias: model.name for alias in aliases})
        serving = {model.active_version_id, model.canary_version_id, model.previous_version_id} - {None}
        for version_id in serving:
            v = by_id[version_id]  # type: ignore[index]
            versions.append(
                VersionRecord(
                    model.name,
                    v.version,
                    v.backend,
                    dict(v.params or {}),
                    dict(v.limits or {}),
                    v.artifact_uri,
                    v.artifact_sha256,
                    aliases,
                    model.description,
                    model.required,
                )
            )
        active = by_id.get(model.active_version_id) if model.active_version_id else None
        canary = by_id.get(model.canary_version_id) if model.canary_version_id else None
        traffic.append(
            Traffic(
                model.name,
                active.version if active else None,
                canary.version if canary else None,
                model.canary_weight,
                model.disabled,
            )
        )
    return rev, versions, traffic, names


def is_empty(session: Session) -> bool:
    return session.scalar(select(RegisteredModel.id).limit(1)) is None


def seed(session: Session, entries: list[dict[str, Any]], actor: str = "seed") -> int:
    """Load catalogue entries into an empty registry, each as the active version of its model.

    The catalogue's models are `required` unless an entry says otherwise: they are what the
    operator deploys the gateway to serve, so an instance that can't serve them is not ready.

    Two workers may start at once on a fresh database: the loser's insert violates the unique
    model name, and it simply serves what the winner wrote.
    """
    if not is_empty(session):
        return 0
    try:
        for entry in entries:
            model = RegisteredModel(
                name=entry["name"],
                description=entry.get("description", ""),
                required=bool(entry.get("required", True)),
            )
            session.add(model)
            session.flush()
            version = _new_version(model, entry, actor, status="active", session=session)
            model.active_version_id = version.id
            for alias in entry.get("aliases") or ():
                session.add(ModelAlias(alias=alias, model_id=model.id))
        _bump(session)
        session.commit()
    except IntegrityError:
        session.rollback()
        return 0
    return len(entries)


def _split_params(entry: dict[str, Any]) -> tuple[dict[str, Any], str | None, str | None]:
    """(params, artifact_uri, artifact_sha256): an artifact may come in params or in its own fields."""
    params = dict(entry.get("params") or {})
    artifact = params.pop("artifact", None) or entry.get("artifact_uri")
    sha256 = params.pop("sha256", None) or entry.get("artifact_sha256")
    return params, artifact, sha256


def check_backend_params(entry: dict[str, Any]) -> None:
    """400 naming the first bad field unless the backend's own schema accepts the params.

    They are checked as the backend will receive them at load (the artifact fields folded back in,
    as app/inference/catalogue.py `spec_for` does), so a version stored here can be loaded.
    """
    params, artifact, sha256 = _split_params(entry)
    params.update({k: v for k, v in (("artifact", artifact), ("sha256", sha256)) if v})
    try:
        backend_class(entry["backend"]).check_params(params)
    except ma.ValidationError as exc:
        details = [{**d, "param": f"params.{d['param']}"} for d in flatten_messages(exc.messages)]
        first = details[0]
        raise APIError(
            400,
            f"{first['param']}: {first['message']}",
            code="invalid_backend_params",
            param=first["param"],
            details=details,
        ) from None


def _new_version(
    model: RegisteredModel, entry: dict[str, Any], actor: str, status: str, session: Session | None = None
) -> ModelVersion:
    session = session or db.session
    params, artifact, sha256 = _split_params(entry)
    version = ModelVersion(
        model_id=model.id,
        version=str(entry.get("version", "1")),
        backend=entry["backend"],
        params=params,
        limits=dict(entry.get("limits") or {}),
        artifact_uri=artifact,
        artifact_sha256=sha256,
        status=status,
        created_by=actor,
    )
    session.add(version)
    session.flush()
    return version


# administration ------------------------------------------------------------------------------
def get_model(name: str) -> RegisteredModel:
    model = db.session.scalar(select(RegisteredModel).where(RegisteredModel.name == name))
    if model is None:
        alias = db.session.get(ModelAlias, name)
        model = alias.model if alias else None
    if model is None:
        raise APIError(404, f"The model '{name}' does not exist.", code="model_not_found", param="name")
    return model


def _version(model: RegisteredModel, version: str, param: str = "version") -> ModelVersion:
    for candidate in model.versions:
        if candidate.version == version:
            return candidate
    raise APIError(
        404, f"Model '{model.name}' has no version '{version}'.", code="version_not_found", param=param
    )


def _taken(name: str) -> bool:
    """Names and aliases share one namespace: a request names either, and must find one model."""
    return db.session.get(ModelAlias, name) is not None or (
        db.session.scalar(select(RegisteredModel.id).where(RegisteredModel.name == name)) is not None
    )


def create_model(data: dict[str, Any], actor: str) -> RegisteredModel:
    """409 conflict when the name or an alias is already a model's name or alias (the schema has
    checked that they are well-formed and distinct from each other)."""
    if db.session.get(ModelAlias, data["name"]) is not None:
        raise APIError(409, f"The name {data['name']!r} is taken.", code="conflict", param="name")
    model = RegisteredModel(
        name=data["name"], description=data.get("description", ""), required=data.get("required", False)
    )
    db.session.add(model)
    try:
        db.session.flush()
    except IntegrityError:
        db.session.rollback()
        raise APIError(
            409, f"A model named {data['name']!r} already exists.", code="conflict", param="name"
        ) from None
    for alias in data.get("aliases") or ():
        if _taken(alias):
            db.session.rollback()
            raise APIError(409, f"The name {alias!r} is taken.", code="conflict", param="aliases")
        db.session.add(ModelAlias(alias=alias, model_id=model.id))
    _bump()
    db.session.commit()
    return model


def add_version(name: str, data: dict[str, Any], actor: str) -> ModelVersion:
    """A new version starts `staged`; it takes traffic only as a canary or once promoted.

    Its backend params are checked first: a version that cannot load must not be stored, where
    every worker would try to load it."""
    model = get_model(name)
    check_backend_params(data)
    if any(v.version == str(data["version"]) for v in model.versions):
        raise APIError(
            409, f"Version {data['version']!r} of '{model.name}' exists.", code="conflict", param="version"
        )
    version = _new_version(model, data, actor, status="staged")
    if model.active_version_id is None:
        model.active_version_id, version.status = version.id, "active"
    _bump()
    db.session.commit()
    return version


def set_canary(name: str, version: str | None, weight: float) -> RegisteredModel:
    model = get_model(name)
    if version is None or weight <= 0:
        model.canary_version_id, model.canary_weight = None, 0.0
    else:
        candidate = _version(model, version)
        if candidate.id == model.active_version_id:
            raise APIError(400, "The canary must differ from the active version.", param="version")
        if candidate.status == "retired":
            raise APIError(400, f"Version {version!r} is retired.", param="version", code="version_retired")
        model.canary_version_id, model.canary_weight = candidate.id, weight
    _bump()
    db.session.commit()
    return model


def promote(name: str) -> RegisteredModel:
    """The canary becomes the active version; the old active stays loaded as the rollback target."""
    model = get_model(name)
    if model.canary_version_id is None:
        raise APIError(409, f"Model '{model.name}' has no canary to promote.", code="no_canary")
    by_id = {v.id: v for v in model.versions}
    if model.active_version_id:
        by_id[model.active_version_id].status = "retired"
    by_id[model.canary_version_id].status = "active"
    model.previous_version_id = model.active_version_id
    model.active_version_id, model.canary_version_id, model.canary_weight = model.canary_version_id, None, 0.0
    _bump()
    db.session.commit()
    return model


def rollback(name: str) -> RegisteredModel:
    """Undo the latest traffic change toward a newer version, one step, once.

    - A canary takes traffic: stop it and retire it; the active version keeps all traffic. The
      canary is always the latest such change, since promote clears it.
    - Else, after a promote: the previous version is active again, the current one is retired,
      and there is no previous version any more.
    - Else there is nothing to undo: 409 no_previous. So a second rollback after a promote is a
      409, never a return to the version the first one retired.

    Why not step further back, to the version before the previous one: a rollback must be instant,
    so its target is kept loaded on every worker (`snapshot` serves the previous version), and
    keeping a whole history loaded costs a model's memory per step. And why not swap back and
    forth: the version a rollback retires was judged bad; bringing it back must be a deliberate
    new version (staged, canaried, promoted), not a repeated emergency button.
    """
    model = get_model(name)
    by_id = {v.id: v for v in model.versions}
    if model.canary_version_id is not None:
        by_id[model.canary_version_id].status = "retired"
        model.canary_version_id, model.canary_weight = None, 0.0
    elif model.previous_version_id is not None:
        by_id[model.previous_version_id].status = "active"
        if model.active_version_id:
            by_id[model.active_version_id].status = "retired"
        model.active_version_id, model.previous_version_id = model.previous_version_id, None
    else:
        raise APIError(
            409,
            f"Model '{model.name}' has no canary to stop and no previous version to roll back to.",
            code="no_previous",
        )
    _bump()
    db.session.commit()
    return model


def set_disabled(name: str, disabled: bool) -> RegisteredModel:
    model = get_model(name)
    model.disabled = disabled
    _bump()
    db.session.commit()
    return model
