"""The token usage ledger: settled tokens per tenant and period, written behind the request path.

One UPDATE per request on one row per tenant would serialise all of a tenant's requests on
that row's lock, each holding a pooled connection while it waits: at a few hundred requests a
second the pool runs dry and latency follows (the spend-log bottleneck other gateways have).
So each worker sums settled tokens in memory and adds them with one upsert per tenant and period
about once a second (USAGE_LEDGER_FLUSH_INTERVAL), and on shutdown.

What this costs: a worker killed without a graceful stop loses at most that second of ledger
increments. Redis still counts them, so quotas hold; the ledger is only read to rebuild a counter
Redis lost, and every request's tokens are also in its audit record, which is never dropped.
A flush that fails (database down) keeps its sums and tries again on the next pass.

A batch worker needs more than that: a line's usage must be written in the transaction that
records the line's result, or a line the queue delivers again after a kill is billed twice (or,
lost with the unflushed second, not at all). `capture()` collects the tokens settled inside it
instead of queueing them, and `write(conn, captured)` adds them in the caller's transaction.
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import structlog
from flask import Flask
from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from app.extensions import db
from app.identity.models import TokenUsage, utcnow

log = structlog.get_logger(__name__)

Key = tuple[str, str]  # (tenant_id, period)
_ledgers: weakref.WeakSet[UsageLedger] = weakref.WeakSet()
_captured: ContextVar[Counter[Key] | None] = ContextVar("usage_captured", default=None)


@contextmanager
def capture() -> Iterator[Counter[Key]]:
    """Tokens settled inside the block, by tenant and period, kept out of the periodic flush."""
    captured: Counter[Key] = Counter()
    token = _captured.set(captured)
    try:
        yield captured
    finally:
        _captured.reset(token)


def write(conn: Connection, captured: Counter[Key]) -> None:
    """Add captured tokens to the ledger inside the caller's transaction on `conn`."""
    if captured:
        _upsert(conn, captured)


class UsageLedger:
    def __init__(self, app: Flask, interval_s: float) -> None:
        self._app = app
        self.interval_s = interval_s
        self._pending: Counter[Key] = Counter()
        self._lock = threading.Lock()  # guards _pending; held for microseconds
        self._io = threading.Lock()  # one flush at a time, so sums are never written twice
        self._stop = threading.Event()
        self._started = False
        _ledgers.add(self)

    def add(self, tenant_id: str, period: str, tokens: int) -> None:
        """Count settled tokens; they reach the database on the next flush (or, inside `capture()`,
        with the caller's own transaction)."""
        captured = _captured.get()
        if captured is not None:
            captured[(tenant_id, period)] += tokens
            return
        with self._lock:
            self._pending[(tenant_id, period)] += tokens
            start = not self._started
            self._started = True
        if start:
            # A greenlet under gunicorn's gevent worker, a daemon thread elsewhere; it holds the
            # ledger weakly, so a discarded app (tests) lets it end.
            threading.Thread(target=_flusher, args=(weakref.ref(self), self._stop), daemon=True).start()

    def flush(self) -> None:
        """Write what is pending in one transaction; on failure keep it for the next pass."""
        with self._io:
            with self._lock:
                pending, self._pending = self._pending, Counter()
            if not pending:
                return
            try:
                with self._app.app_context(), db.engine.begin() as conn:
                    _upsert(conn, pending)
            except SQLAlchemyError as exc:
                with self._lock:
                    self._pending.update(pending)
                log.error("usage_ledger_flush_failed", error=str(exc).splitlines()[0], tenants=len(pending))

    def close(self) -> None:
        self._stop.set()
        self.flush()


def _upsert(conn: Connection, pending: Counter[Key]) -> None:
    """INSERT ... ON CONFLICT DO UPDATE (both engines have it): atomic across workers, no race on
    a period's first row. Sorted, so two workers lock the same rows in the same order."""
    table = TokenUsage.__table__
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    now = utcnow()
    rows = [
        {"tenant_id": tenant, "period": period, "tokens": tokens, "updated_at": now}
        for (tenant, period), tokens in sorted(pending.items())
    ]
    stmt = dialect.insert(table).values(rows)
    stmt = stmt.on_conflict_do_update(
        index_elements=[table.c.tenant_id, table.c.period],
        set_={"tokens": table.c.tokens + stmt.excluded.tokens, "updated_at": stmt.excluded.updated_at},
    )
    conn.execute(stmt)


def _flusher(ref: weakref.ref[UsageLedger], stop: threading.Event) -> None:
    while True:
        ledger = ref()
        if ledger is None:
            return
        interval = ledger.interval_s
        del ledger
        if stop.wait(interval):
            return
        ledger = ref()
        if ledger is None:
            return
        try:
            ledger.flush()
        except Exception:  # the loop must outlive one bad pass; the traceback goes to the log
            log.exception("usage_ledger_flush_error")
        del ledger


@atexit.register
def _close_all() -> None:
    # gunicorn workers exit through sys.exit, so this runs on a graceful stop or restart.
    for ledger in list(_ledgers):
        ledger.close()
