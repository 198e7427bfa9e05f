"""`flask audit verify` and `flask audit replay`: the operator's side of the audit trail."""

from __future__ import annotations

import json

import click
from flask import current_app
from flask.cli import AppGroup

from app.extensions import db
from app.governance.audit.verify import all_chains, verify

audit_cli = AppGroup("audit", help="Verify the audit hash chains; replay spooled records.")


@audit_cli.command("verify")
@click.option("--chain", "chains", multiple=True, help="A chain (tenant id, or `platform`); default: all.")
def verify_command(chains: tuple[str, ...]) -> None:
    """Check every chain (or the named ones); exit status 1 if any link is broken."""
    with db.engine.connect() as conn:
        report = verify(conn, chains or all_chains(conn))
    click.echo(json.dumps(report, indent=2))
    if not report["ok"]:
        raise SystemExit(1)


@audit_cli.command("replay")
def replay_command() -> None:
    """Write the spool files of dead processes to the database now (idempotent).

    Running workers replay their own spool by themselves, and a starting worker takes over the
    files of dead ones; this is for a host whose gateway is not coming back.
    """
    writer = current_app.extensions["audit"]
    written = writer.replay_orphans()
    click.echo(f"replayed {written} record(s) from {writer.spool.directory}")
