"""Tamper-evident audit trail: hash-chained records written off the request path, never lost.

Request-path API (what other code imports):
- `note(**fields)`: add model, version, policy decision, tokens, input/output... to the current
  request's record (see `hooks.note` for the names).
- `admit()`: 503 `audit_unavailable` when the buffer is full; the hooks call it for every
  audited request already.
- `init_app(app)`: the hooks, the writer, `flask audit ...`; called by `create_app`.
"""

from __future__ import annotations

import atexit
import weakref
from pathlib import Path

from flask import Flask

from app.extensions import db
from app.governance import usage  # noqa: F401  (usage reports read the audit records; registers its route)
from app.governance.audit import models, routes  # noqa: F401  (tables for Alembic; routes on blp)
from app.governance.audit.cli import audit_cli
from app.governance.audit.hooks import admit, note
from app.governance.audit.hooks import init_app as init_hooks
from app.governance.audit.writer import AuditWriter

__all__ = ["admit", "init_app", "note", "shutdown"]

_writers: weakref.WeakSet[AuditWriter] = weakref.WeakSet()


def init_app(app: Flask) -> None:
    """The writer (started lazily, per process), the request hooks and the CLI; idempotent."""
    if "audit" in app.extensions:
        return
    with app.app_context():
        engine = db.engine
    spool_dir = app.config["AUDIT_SPOOL_DIR"]
    writer = AuditWriter(
        engine,
        spool_dir=Path(spool_dir),
        buffer_max=int(app.config["AUDIT_BUFFER_MAX"]),
        batch_size=int(app.config["AUDIT_BATCH_SIZE"]),
        flush_interval_s=float(app.config["AUDIT_FLUSH_INTERVAL_MS"]) / 1000,
        journal=bool(app.config["AUDIT_JOURNAL"]),
    )
    app.extensions["audit"] = writer
    _writers.add(writer)
    init_hooks(app)
    app.cli.add_command(audit_cli)


def shutdown(app: Flask) -> None:
    """Flush what is buffered (to the database, else the spool) and stop the flusher."""
    writer = app.extensions.get("audit")
    if writer is not None:
        writer.close()


@atexit.register
def _close_all() -> None:
    # gunicorn workers exit through sys.exit, so this runs on a graceful stop or restart.
    for writer in list(_writers):
        writer.close()
