"""The console's pages. Each calls the function its governance API route calls, with the same
scopes (`page(...)` mirrors the route's `require_scopes(...)`), so tenant isolation, grant rules
and admin-only operations hold here exactly as they do in the API."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import marshmallow as ma
from flask import Response, flash, redirect, render_template, request, url_for

from app.console import bp, console_principal, end_session, page, start_session
from app.errors import APIError, flatten_messages
from app.governance.audit.routes import AuditPageArgsSchema, audit_page, verify_for
from app.governance.auth import client_credentials_grant, password_grant
from app.governance.keys import ApiKeySchema, issue_for_caller
from app.governance.pagination import paginate
from app.governance.policies.routes import PolicyWriteSchema, effective_policy, set_policy
from app.governance.registry import service as registry
from app.governance.registry.routes import TrafficSchema, all_models
from app.governance.usage.routes import UsageArgsSchema, usage_for
from app.identity import limits
from app.identity import scopes as sc
from app.identity.apikeys import revoke_key, split_key
from app.identity.models import ApiKey
from app.identity.scoping import get_scoped_or_404, scoped_select

KEYS_PER_PAGE = 100


def load(schema: ma.Schema, data: dict[str, Any]) -> dict[str, Any]:
    """Validate form or query fields with the API's schema; an empty input counts as absent."""
    try:
        return schema.load({k: v for k, v in data.items() if v not in ("", [])})
    except ma.ValidationError as exc:
        first = flatten_messages(exc.messages)[0]
        text = f"{first['param']}: {first['message']}" if first["param"] else first["message"]
        raise APIError(400, text, param=first["param"], code="validation_error") from None


@bp.get("/")
def index() -> Response:
    return redirect(url_for("console.usage"))


@bp.route("/login", methods=["GET", "POST"])
def login() -> Response | str | tuple[str, int]:
    """The token endpoint's grants: a username and password, or an API key (client_credentials,
    whose client_id is the key's visible prefix). Its per-address rate limit applies too."""
    if request.method == "GET":
        return render_template("console/login.html")
    form = request.form
    try:
        limits.check_token_endpoint()
        if form.get("api_key"):
            key = form["api_key"].strip()
            parts = split_key(key)
            if parts is None:
                raise APIError(401, "That is not an API key (gw-...).", code="invalid_client")
            pair = client_credentials_grant({"client_id": parts[0], "client_secret": key})
        else:
            pair = password_grant({"username": form.get("username"), "password": form.get("password")})
        start_session(pair)
    except APIError as exc:
        status = 401 if exc.status in (400, 401) else exc.status  # 429, 503 keep theirs
        return render_template("console/login.html", error=exc.message, username=form.get("username")), status
    return redirect(url_for("console.usage"))


@bp.post("/logout")
def logout() -> Response:
    end_session()
    flash("Logged out.")
    return redirect(url_for("console.login"))


@bp.get("/usage")
@page(sc.GOVERNANCE_READ)
def usage() -> str:
    args = load(UsageArgsSchema(), request.args.to_dict())
    report = usage_for(args)
    rows = report["data"]
    days = sorted({r["day"] for r in rows})
    per_model: dict[str, dict[str, int]] = defaultdict(dict)
    for row in rows:
        label = row["model"] or "(none)"
        per_model[label][row["day"]] = per_model[label].get(row["day"], 0) + row["requests"]
    chart = {
        "labels": days,
        "datasets": [
            {"label": model, "data": [counts.get(day, 0) for day in days]}
            for model, counts in sorted(per_model.items())
        ],
    }
    return render_template("console/usage.html", report=report, rows=rows, chart=chart, args=request.args)


@bp.get("/audit")
@page(sc.GOVERNANCE_READ)
def audit() -> str:
    args = load(AuditPageArgsSchema(), request.args.to_dict())
    result = audit_page(args)
    following = {**request.args.to_dict(), "cursor": result["next_cursor"]} if result["next_cursor"] else None
    return render_template(
        "console/audit.html", records=result["data"], following=following, args=request.args
    )


@bp.get("/audit/verify")
@page(sc.GOVERNANCE_READ)
def audit_verify() -> str:
    result = verify_for(request.args.get("tenant_id") or None)
    return render_template("console/verify.html", result=result)


def _keys_page(created: dict[str, Any] | None = None) -> str:
    stmt = scoped_select(ApiKey)
    keys = paginate(stmt, ApiKey, KEYS_PER_PAGE, request.args.get("cursor") or None)
    holder = console_principal()
    grantable = [
        s for s in sc.SCOPES if sc.grantable(holder.scopes, [s]) and (s != sc.ADMIN or holder.is_admin)
    ]
    return render_template(
        "console/keys.html",
        keys=keys["data"],
        next_cursor=keys["next_cursor"],
        created=created,
        grantable=grantable,
        defaults=sc.DEFAULT_KEY_SCOPES,
    )


@bp.get("/keys")
@page(sc.GOVERNANCE_READ)
def keys() -> str:
    return _keys_page()


@bp.post("/keys")
@page(sc.GOVERNANCE_WRITE)
def issue_key() -> str:
    """The new key's secret is in this one response only (no-store), never in a redirect."""
    form = {"name": request.form.get("name", ""), "expires_at": request.form.get("expires_at", "")}
    if request.form.getlist("scopes"):
        form["scopes"] = request.form.getlist("scopes")
    created = issue_for_caller(load(ApiKeySchema(), form))
    return _keys_page(created)


@bp.post("/keys/<key_id>/revoke")
@page(sc.GOVERNANCE_WRITE)
def revoke(key_id: str) -> Response:
    key = revoke_key(get_scoped_or_404(ApiKey, key_id))
    flash(f"Key {key.prefix} ({key.name}) is revoked.")
    return redirect(url_for("console.keys"))


@bp.get("/models")
@page(sc.GOVERNANCE_READ)
def models() -> str:
    return render_template("console/models.html", models=all_models())


@bp.post("/models/<name>/traffic")
@page(sc.ADMIN)
def model_traffic(name: str) -> Response:
    fields = {
        "canary_version": request.form.get("canary_version") or None,
        "canary_weight": request.form.get("canary_weight", ""),
    }
    data = load(TrafficSchema(), fields)
    model = registry.set_canary(name, data["canary_version"], data["canary_weight"])
    flash(f"{model.name}: canary weight is {model.canary_weight:g}%.")
    return redirect(url_for("console.models"))


@bp.post("/models/<name>/promote")
@page(sc.ADMIN)
def model_promote(name: str) -> Response:
    model = registry.promote(name)
    flash(f"{model.name}: the canary is now the active version.")
    return redirect(url_for("console.models"))


@bp.post("/models/<name>/rollback")
@page(sc.ADMIN)
def model_rollback(name: str) -> Response:
    model = registry.rollback(name)
    flash(f"{model.name}: rolled back one step.")
    return redirect(url_for("console.models"))


@bp.get("/policies")
@page(sc.GOVERNANCE_READ)
def policies() -> str:
    policy = effective_policy(None)
    return render_template(
        "console/policies.html",
        policy=policy,
        rules_json=json.dumps(policy["rules"], indent=2, sort_keys=True, default=str),
    )


@bp.post("/policies")
@page(sc.GOVERNANCE_WRITE)
def policies_update() -> Response:
    try:
        rules = json.loads(request.form.get("rules", ""))
    except json.JSONDecodeError as exc:
        raise APIError(400, f"rules: not valid JSON ({exc.msg}, line {exc.lineno}).", param="rules") from None
    policy = set_policy(load(PolicyWriteSchema(), {"rules": rules}))
    flash(f"Policy version {policy['version']} is in force.")
    return redirect(url_for("console.policies"))
