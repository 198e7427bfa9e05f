"""Liveness and readiness.

`/healthz` touches nothing, so a slow database never gets a healthy worker restarted;
`/readyz` runs every registered check so a load balancer stops sending traffic to an
instance that cannot serve it. Subsystems add their own checks with `register_check`.
"""

from __future__ import annotations

from collections.abc import Callable

import marshmallow as ma
from flask import Flask, current_app
from sqlalchemy import text

from app.admission import unbounded
from app.api import GatewayBlueprint
from app.extensions import db, redis_store

Check = Callable[[], tuple[bool, str]]
blp = GatewayBlueprint("health", __name__, description="Liveness and readiness probes.")


def register_check(app: Flask, name: str, check: Check) -> None:
    """A check returns (ready, detail); an exception counts as not ready."""
    app.extensions.setdefault("readiness_checks", {})[name] = check


def _database() -> tuple[bool, str]:
    db.session.execute(text("SELECT 1"))
    return True, "ok"


def _redis() -> tuple[bool, str]:
    client = redis_store.client
    if client is None:
        return True, "not configured: single-process fallbacks in use"
    client.ping()
    return True, "ok"


class LivenessSchema(ma.Schema):
    status = ma.fields.String()


class CheckSchema(ma.Schema):
    name = ma.fields.String()
    ready = ma.fields.Boolean()
    detail = ma.fields.String()


class ReadinessSchema(ma.Schema):
    status = ma.fields.String(metadata={"description": "ready or not_ready"})
    checks = ma.fields.List(ma.fields.Nested(CheckSchema))
    not_ready = ma.fields.List(ma.fields.String(), metadata={"description": "Names of failing checks."})


@blp.route("/healthz")
@blp.response(200, LivenessSchema)
@unbounded
def healthz() -> dict[str, str]:
    """Liveness: the worker answers. Touches no dependency."""
    return {"status": "ok"}


@blp.route("/readyz")
@blp.response(200, ReadinessSchema)
@blp.alt_response(503, schema=ReadinessSchema, description="Something the service needs is not ready.")
@unbounded
def readyz() -> tuple[dict[str, object], int]:
    """Readiness: database, Redis when configured, and every model."""
    results = []
    for name, check in current_app.extensions.get("readiness_checks", {}).items():
        try:
            ok, detail = check()
        except Exception as exc:  # a failing dependency is a result here, not an error
            ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            if name == "database":
                db.session.rollback()
        results.append({"name": name, "ready": ok, "detail": detail})
    failing = [r["name"] for r in results if not r["ready"]]
    body = {"status": "not_ready" if failing else "ready", "checks": results, "not_ready": failing}
    return body, 503 if failing else 200


def init_app(app: Flask) -> None:
    register_check(app, "database", _database)
    register_check(app, "redis", _redis)
