"""`flask tenants|users|keys ...` and `flask bootstrap`: operator commands, same services as the API."""

from __future__ import annotations

import re
from datetime import timedelta

import click
import marshmallow as ma
from flask import Flask, current_app
from flask.cli import AppGroup, with_appcontext
from sqlalchemy import func, or_, select

from app.errors import APIError
from app.extensions import db
from app.identity import accounts, apikeys
from app.identity import scopes as sc
from app.identity.models import ApiKey, Tenant, User, utcnow

tenants_cli = AppGroup("tenants", help="Create and list tenants.")
users_cli = AppGroup("users", help="Create users.")
keys_cli = AppGroup("keys", help="Issue, list and revoke API keys.")
quota_cli = AppGroup("quota", help="Token quota counters.")

DEMO_TENANT = "demo"
ADMIN_USERNAME = "admin"


def _scopes(value: str) -> list[str]:
    scopes = [s for s in re.split(r"[\s,]+", value) if s]
    bad = sc.unknown(scopes)
    if bad:
        raise click.BadParameter(f"unknown scope(s) {', '.join(bad)}; known: {', '.join(sc.SCOPES)}")
    return scopes


def _tenant(name_or_id: str) -> Tenant:
    tenant = db.session.scalar(select(Tenant).where(or_(Tenant.name == name_or_id, Tenant.id == name_or_id)))
    if tenant is None:
        raise click.ClickException(f"no tenant named or with id {name_or_id!r}")
    return tenant


def _fail(exc: APIError | ma.ValidationError) -> click.ClickException:
    return click.ClickException(exc.message if isinstance(exc, APIError) else str(exc.messages))


def _print_key(full: str, key: ApiKey) -> None:
    click.echo(f"API key {key.prefix} ({key.name}) for tenant {key.tenant_id}, scopes: {key.scopes}")
    click.echo("Store it now; it is shown only once:")
    click.echo(full)


@tenants_cli.command("create")
@click.argument("name")
@click.option("--rate-limit", help="e.g. 600/minute (default: RATE_LIMIT_DEFAULT).")
@click.option("--key-rate-limit", help="Per API key/user, e.g. 100/minute.")
@click.option("--token-quota", type=click.IntRange(min=0), help="Tokens per period (default: unlimited).")
@click.option("--quota-period", type=click.Choice(accounts.QUOTA_PERIODS), default="day", show_default=True)
def create_tenant(
    name: str, rate_limit: str | None, key_rate_limit: str | None, token_quota: int | None, quota_period: str
) -> None:
    try:
        tenant = accounts.create_tenant(
            name,
            rate_limit=rate_limit,
            key_rate_limit=key_rate_limit,
            token_quota=token_quota,
            quota_period=quota_period,
        )
    except (APIError, ma.ValidationError) as exc:
        raise _fail(exc) from None
    click.echo(f"tenant {tenant.name} id={tenant.id}")


@tenants_cli.command("list")
def list_tenants() -> None:
    for tenant in db.session.scalars(select(Tenant).order_by(Tenant.created_at)):
        quota = (
            f"{tenant.token_quota}/{tenant.quota_period}" if tenant.token_quota is not None else "unlimited"
        )
        state = "active" if tenant.active else "disabled"
        click.echo(
            f"{tenant.id}  {tenant.name:<24} rate={tenant.rate_limit or 'default'} quota={quota} {state}"
        )


@users_cli.command("create")
@click.argument("tenant")
@click.argument("username")
@click.option("--scopes", default=" ".join(sc.DEFAULT_KEY_SCOPES), show_default=True)
@click.password_option(help="Prompted (hidden, twice) when not given.")
def create_user(tenant: str, username: str, scopes: str, password: str) -> None:
    try:
        user = accounts.create_user(_tenant(tenant), username, password, _scopes(scopes))
    except (APIError, ma.ValidationError) as exc:
        raise _fail(exc) from None
    click.echo(f"user {user.username} id={user.id} tenant={user.tenant_id} scopes={user.scopes}")


@keys_cli.command("issue")
@click.argument("tenant")
@click.option("--name", required=True, help="What the key is for.")
@click.option("--scopes", default=" ".join(sc.DEFAULT_KEY_SCOPES), show_default=True)
@click.option("--expires-days", type=click.IntRange(min=1), help="Default: never expires.")
@click.option("--user", "username", help="Owning user (same tenant).")
def issue_key(tenant: str, name: str, scopes: str, expires_days: int | None, username: str | None) -> None:
    owner_tenant = _tenant(tenant)
    user = None
    if username:
        user = db.session.scalar(
            select(User).where(User.username == username, User.tenant_id == owner_tenant.id)
        )
        if user is None:
            raise click.ClickException(f"no user {username!r} in tenant {owner_tenant.name}")
    expires_at = utcnow() + timedelta(days=expires_days) if expires_days else None
    try:
        key, full = apikeys.issue_key(owner_tenant, name, _scopes(scopes), user=user, expires_at=expires_at)
    except (APIError, ma.ValidationError) as exc:
        raise _fail(exc) from None
    _print_key(full, key)


@keys_cli.command("list")
@click.option("--tenant", help="Only this tenant (name or id).")
def list_keys(tenant: str | None) -> None:
    stmt = select(ApiKey).order_by(ApiKey.created_at)
    if tenant:
        stmt = stmt.where(ApiKey.tenant_id == _tenant(tenant).id)
    for key in db.session.scalars(stmt):
        state = "revoked" if key.revoked_at else "active"
        click.echo(
            f"{key.id}  {key.prefix}  tenant={key.tenant_id} name={key.name!r} scopes={key.scopes!r} "
            f"expires={key.expires_at or 'never'} last_used={key.last_used_at or 'never'} {state}"
        )


@keys_cli.command("revoke")
@click.argument("key")
def revoke_key(key: str) -> None:
    """KEY is a key id or its prefix (gw-...)."""
    found = db.session.scalar(select(ApiKey).where(or_(ApiKey.id == key, ApiKey.prefix == key)))
    if found is None:
        raise click.ClickException(f"no API key with id or prefix {key!r}")
    apikeys.revoke_key(found)
    click.echo(f"revoked {found.prefix} ({found.name})")


@click.command("bootstrap")
@with_appcontext
@click.option("--force", is_flag=True, help="Run even when BOOTSTRAP is false (as it is in production).")
def bootstrap(force: bool) -> None:
    """First start only: a platform tenant with an admin, a demo tenant, and one admin API key.

    Does nothing when the database already has a tenant, so `make run` can call it every time.
    """
    if not (force or current_app.config.get("BOOTSTRAP")):
        click.echo("bootstrap: skipped (BOOTSTRAP is false; pass --force to run it anyway)")
        return
    if db.session.scalar(select(func.count()).select_from(Tenant)):
        click.echo("bootstrap: skipped (the database already has tenants)")
        return
    try:
        platform = accounts.create_tenant(accounts.PLATFORM_TENANT)
        accounts.create_tenant(DEMO_TENANT)
    except APIError:  # another process bootstrapped at the same moment
        click.echo("bootstrap: skipped (already bootstrapped)")
        return
    admin = accounts.create_user(platform, ADMIN_USERNAME, apikeys.generate_key()[2], [sc.ADMIN])
    key, full = apikeys.issue_key(platform, "bootstrap admin", [sc.ADMIN], user=admin)
    rule = "=" * 78
    click.echo(
        f"{rule}\n"
        f"  flask-ai-gateway bootstrapped: tenants '{accounts.PLATFORM_TENANT}' and '{DEMO_TENANT}',\n"
        f"  admin user '{ADMIN_USERNAME}' (no usable password; it owns the key below).\n"
        f"  Platform admin API key (shown ONCE, never again; store it in a secret manager now):\n\n"
        f"    {full}\n\n"
        f"  Try it:\n"
        f"    curl -s http://127.0.0.1:8000/v1/auth/me -H 'Authorization: Bearer {full}'\n"
        f"  Revoke it once you have issued your own keys: flask keys revoke {key.prefix}\n"
        f"{rule}"
    )


@quota_cli.command("reconcile")
@click.argument("tenants", nargs=-1)
def reconcile_quota(tenants: tuple[str, ...]) -> None:
    """Rebuild quota counters from the usage ledger (after restoring Redis from an old snapshot).

    With no TENANTS, every tenant that has a token quota.
    """
    from app.identity import quota

    rows = (
        [_tenant(t) for t in tenants]
        if tenants
        else db.session.scalars(select(Tenant).where(Tenant.token_quota.is_not(None))).all()
    )
    for tenant in rows:
        click.echo(f"{tenant.name}: {quota.reconcile(tenant.id)} tokens settled this period")


def init_app(app: Flask) -> None:
    for command in (tenants_cli, users_cli, keys_cli, quota_cli, bootstrap):
        app.cli.add_command(command)
