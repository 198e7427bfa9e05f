"""The per-worker audit writer: a bounded buffer, a background flusher, batches, the spool.

Request path: `submit()` appends to an in-memory deque (no I/O, no hashing) and `admit()` refuses new work
with 503 once the deque holds AUDIT_BUFFER_MAX records, so records are never dropped silently.
The flusher (a `threading.Thread`, which is a greenlet under gunicorn's gevent worker; psycopg
>= 3.1.14 yields to the hub on I/O) writes up to AUDIT_BATCH_SIZE records per transaction every
AUDIT_FLUSH_INTERVAL_MS, or sooner when a batch is full.

Appending to a chain: the heads of the batch's chains are locked (PostgreSQL: SELECT ... FOR
UPDATE in chain order, so two writers never deadlock; SQLite: a no-op UPDATE first takes the
database's write lock), then the rows get seq = head + 1... and their hashes, the heads move and
the days' usage totals (usage/rollup.py) grow by the batch, all in one transaction. Any number of
workers and instances can append concurrently.

When a write fails the batch goes to the spool, and from then on every batch goes behind it
(records stay in order) until a replay drains it; replays retry with a backoff capped at
RETRY_MAX_S. Replay is idempotent: `record_id` is unique and checked under the head lock, so a
batch whose commit succeeded but whose acknowledgement was lost is not written twice.
A process killed with SIGKILL loses what was in memory, at most one flush interval of records, and
the requests it was serving never get a record: the journal (journal.py) brings both back, as
records marked `details.recovered`, when the next worker's writer starts.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import Counter, Gauge
from sqlalchemy import Engine, TextClause, bindparam, insert, select, text, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from app.errors import APIError
from app.governance.audit.journal import Journal
from app.governance.audit.models import AuditChainHead, AuditRecord
from app.governance.audit.records import GENESIS_HASH, Pending, json_default, record_hash
from app.governance.audit.spool import Spool, database_fingerprint
from app.governance.usage import rollup

log = structlog.get_logger(__name__)

RETRY_MAX_S = 2.0
JOURNAL_SCAN_S = 5.0
# An optimistic append (`_append`) relinked this often before it locks the heads instead.
APPEND_ATTEMPTS = 3
# Rows per append statement: the rows travel as one JSON parameter, so this only bounds the size of
# that document and of the transaction (a batch is AUDIT_BATCH_SIZE, 500 by default, below it).
APPEND_MAX_ROWS = 1000
# Bodies up to this size wait in the buffer for the flusher to hash them (a chat is a few KiB).
HASH_LATER_MAX_BYTES = 64 * 1024

BUFFER_DEPTH = Gauge(
    "gateway_audit_buffer_depth",
    "Audit records in memory waiting for the flusher, summed over live workers.",
    multiprocess_mode="livesum",
)
WRITTEN = Counter("gateway_audit_written_total", "Audit records inserted into the database (replays too).")
SPOOLED = Counter("gateway_audit_spooled_total", "Audit records written to the local spool.")
REPLAYED = Counter("gateway_audit_replayed_total", "Spooled audit records inserted into the database.")
CHAIN_CONFLICTS = Counter(
    "gateway_audit_chain_conflicts_total",
    "Appends relinked because another writer had moved one of their chains' heads.",
)
RECOVERED = Counter(
    "gateway_audit_recovered_total",
    "Records written from dead workers' journals (cut requests, lost buffers).",
)

_records = AuditRecord.__table__
_heads = AuditChainHead.__table__


class AuditWriter:
    def __init__(
        self,
        engine: Engine,
        *,
        spool_dir: Path,
        buffer_max: int,
        batch_size: int,
        flush_interval_s: float,
        journal: bool = True,
    ) -> None:
        self.engine = engine
        self.buffer_max = buffer_max
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.spool = Spool(spool_dir, database_fingerprint(engine.url))
        self.journal = Journal(spool_dir, database_fingerprint(engine.url)) if journal else None
        self._journal_files: list[Path] = []
        self._journal_scan_at = 0.0
        self._buffer: deque[Pending] = deque()
        self._wakeup = threading.Condition()
        self._io = threading.Lock()
        self._pid: int | None = None
        self._closed = False
        self._known_heads: set[str] = set()
        # (seq, hash) of chain heads as this writer last wrote or read them (see `_append`).
        self._heads_seen: dict[str, tuple[int, str]] = {}
        self._spool_files: list[Path] = []
        self._scan_spool = False
        self._backoff_s = 0.0
        self._retry_at = 0.0

    # request path ----------------------------------------------------------------------------
    def admit(self) -> None:
        """Fail closed: refuse new audited work rather than drop its record later."""
        if len(self._buffer) >= self.buffer_max:
            log.error("audit_buffer_full", depth=len(self._buffer), limit=self.buffer_max)
            raise APIError(
                503,
                "The audit trail cannot keep up; retry shortly.",
                code="audit_unavailable",
                headers={"Retry-After": "1"},
            )

    def submit(self, record: Pending) -> None:
        """Called once the response is sent. The record is built and hashed by the flusher, in its
        batch, off the request's greenlet (which, on a kept-alive connection, goes on to the next
        request), unless its bodies are large: those are hashed now, so that a buffer that grows
        while the database is slow holds hashes, not bodies (an embeddings answer is megabytes)."""
        if len(record.request_body) + len(record.response_body) > HASH_LATER_MAX_BYTES:
            record.row()
        if self.journal is not None:
            self.journal.closed(record)
        self._buffer.append(record)
        BUFFER_DEPTH.inc()
        self.start()
        if len(self._buffer) >= self.batch_size:
            with self._wakeup:
                self._wakeup.notify()

    # the flusher -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start this process's flusher once (again after a fork); cheap to call on every request."""
        if self._pid == os.getpid() or self._closed:
            return
        self._pid = os.getpid()
        self._spool_files = []
        self._scan_spool = True
        # The thread holds the writer weakly: an app that is discarded (tests) lets it stop.
        thread = threading.Thread(
            target=_flusher, args=(weakref.ref(self), self._wakeup), name="audit-flusher", daemon=True
        )
        thread.start()

    def flush(self) -> None:
        """One pass: replay the spool if there is one, else write the buffer in batches."""
        with self._io:
            if self._scan_spool:
                # Worker start: what this pid left before (pids are reused), then dead workers' files.
                self._scan_spool = False
                self._spool_files = self.spool.owned() + self.spool.claim_orphans()
            if self.journal is not None and time.monotonic() >= self._journal_scan_at:
                # Again every JOURNAL_SCAN_S: a worker that dies is replaced, but the requests
                # that follow may all go to the survivors, which must then recover its journal.
                self._journal_scan_at = time.monotonic() + JOURNAL_SCAN_S
                self._journal_files += self.journal.claim_orphans()
            if self._spool_files:
                self._spool_rows(self._take(len(self._buffer)))  # behind the backlog, in order
                if time.monotonic() >= self._retry_at:
                    self._replay()
                return
            while batch := self._take(self.batch_size):
                try:
                    self.write(batch, replay=False)
                except Exception as exc:
                    log.error("audit_write_failed", error=str(exc).splitlines()[0], records=len(batch))
                    self._failed()
                    self._spool_rows(batch + self._take(len(self._buffer)))
                    return
            if self._journal_files and time.monotonic() >= self._retry_at:
                self._recover()

    def _recover(self) -> None:
        """Records for what dead workers' journals hold and the database lacks (after the spool,
        which may hold some of them)."""
        assert self.journal is not None
        for path in list(self._journal_files):
            try:
                lost = self.journal.lost_records(path) if path.exists() else []
                written = sum(
                    self.write(lost[i : i + self.batch_size], replay=True)
                    for i in range(0, len(lost), self.batch_size)
                )
            except Exception as exc:
                log.warning(
                    "audit_recovery_failed", error=str(exc).splitlines()[0], retry_in_s=self._backoff_s
                )
                self._failed()
                return
            if written:
                RECOVERED.inc(written)
                log.warning("audit_records_recovered", records=written, journal=path.name)
            path.unlink(missing_ok=True)
            self._journal_files.remove(path)

    def close(self) -> None:
        """On shutdown: stop the flusher and leave nothing in memory (database, else spool)."""
        self._closed = True
        with self._wakeup:
            self._wakeup.notify_all()
        self._retry_at = 0.0
        for _ in range(1000):
            if not self._buffer:
                break
            self.flush()
        if self.journal is not None and not self._buffer:
            self.journal.close()

    def _take(self, count: int) -> list[Pending]:
        taken: list[Pending] = []
        while len(taken) < count:
            try:
                taken.append(self._buffer.popleft())
            except IndexError:
                break
        if taken:
            BUFFER_DEPTH.dec(len(taken))
        return [record for record in taken if _built(record)]

    def _spool_rows(self, records: list[Pending]) -> None:
        if not records:
            return
        try:
            self.spool.append([r.row() for r in records])
        except OSError as exc:
            # Nowhere safe to put them: keep them in memory, where admit() turns a full buffer into 503s.
            log.error("audit_spool_failed", error=str(exc), records=len(records))
            self._buffer.extendleft(reversed(records))
            BUFFER_DEPTH.inc(len(records))
            return
        SPOOLED.inc(len(records))
        if self.journal is not None:
            self.journal.durable(r.record_id for r in records)
        log.warning("audit_spooled", records=len(records), file=self.spool.own_file.name)
        if self.spool.own_file not in self._spool_files:
            self._spool_files.append(self.spool.own_file)

    def _replay(self) -> None:
        try:
            replayed = self.replay(self._spool_files)
        except Exception as exc:
            log.warning("audit_replay_failed", error=str(exc).splitlines()[0], retry_in_s=self._backoff_s)
            self._failed()
            return
        self._spool_files = []
        self._backoff_s = 0.0
        log.info("audit_replayed", records=replayed)

    def replay(self, files: Iterable[Path]) -> int:
        """Write the files' rows in order, deleting each once all its rows are in the database."""
        total = 0
        for path in list(files):
            if path.exists():
                for rows in self.spool.batches(path, self.batch_size):
                    written = self.write(rows, replay=True)
                    REPLAYED.inc(written)
                    total += written
            self.spool.remove(path)
        return total

    def replay_orphans(self) -> int:
        """`flask audit replay`: the spool files of dead processes, now."""
        with self._io:
            return self.replay(self.spool.claim_orphans())

    def _failed(self) -> None:
        self._backoff_s = min(RETRY_MAX_S, max(self.flush_interval_s, self._backoff_s * 2))
        self._retry_at = time.monotonic() + self._backoff_s

    # the database ----------------------------------------------------------------------------
    def write(self, records: Sequence[Pending] | Sequence[dict[str, Any]], *, replay: bool) -> int:
        """Append rows to their chains atomically; returns how many were inserted."""
        rows = [r.row() if isinstance(r, Pending) else r for r in records]
        if replay:
            unique: dict[str, dict[str, Any]] = {}
            for row in rows:
                unique.setdefault(row["record_id"], row)
            rows = list(unique.values())
        if not rows:
            return 0
        chains = sorted({row["chain"] for row in rows})
        self._ensure_heads(chains)
        if replay or self.engine.dialect.name != "postgresql":
            written = self._write_locked(rows, chains, replay=replay)
        else:
            written = sum(
                self._append(rows[i : i + APPEND_MAX_ROWS], chains)
                for i in range(0, len(rows), APPEND_MAX_ROWS)
            )
        WRITTEN.inc(written)
        return written

    def _append(self, rows: list[dict[str, Any]], chains: list[str]) -> int:
        """PostgreSQL: the batch as one autocommitted statement, linked to the heads last seen.

        The locked transaction (`_write_locked`) holds the heads' row locks from its SELECT ...
        FOR UPDATE to its COMMIT: five round trips, and under gevent each is a wait for the hub,
        which on a busy worker takes a while. Another worker appending to the same tenant's chain
        waited all that time; in bench/soak.py (2 workers, 200 req/s) a flusher's INSERT sat 6.9 s
        in ClientRead while the other writer waited 6.5 s, and both buffers filled. So the usual
        append takes no lock from Python at all: the rows are linked to the heads this writer last
        saw, and one statement inserts them, adds the usage totals and moves the heads, as a single
        transaction whose locks live only while PostgreSQL runs it. If another writer appended to
        one of the chains meanwhile, the statement's first row takes a seq that exists: the
        unique (chain, seq) constraint refuses the whole statement, the heads are read again and
        the batch is relinked. After APPEND_ATTEMPTS such conflicts it takes the locked path.
        """
        for _ in range(APPEND_ATTEMPTS):
            missing = [c for c in chains if c not in self._heads_seen]
            if missing:
                with self.engine.connect() as conn:
                    stmt = select(_heads.c.chain, _heads.c.seq, _heads.c.hash).where(
                        _heads.c.chain.in_(missing)
                    )
                    self._heads_seen.update(
                        {chain: (seq, digest) for chain, seq, digest in conn.execute(stmt)}
                    )
                    conn.rollback()
            before = {c: self._heads_seen[c] for c in chains}
            chained, after = _link(rows, before)
            try:
                with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                    conn.execute(_append_statement(), _append_params(chained, before, after))
            except IntegrityError as exc:
                if "uq_audit_chain_seq" not in str(exc.orig):
                    raise
                for chain in chains:
                    self._heads_seen.pop(chain, None)
                CHAIN_CONFLICTS.inc()
                continue
            self._heads_seen.update(after)
            self._durable(chained)
            return len(chained)
        return self._write_locked(rows, chains, replay=False)

    def _write_locked(self, rows: list[dict[str, Any]], chains: list[str], *, replay: bool) -> int:
        """Lock the heads, link, insert, add the totals, move the heads, commit. Replays come this
        way (they check, under the lock, which of their records are already in), as does SQLite,
        whose writes take the database's write lock and never wait on a hub."""
        with self.engine.begin() as conn:
            heads = self._lock_heads(conn, chains)
            if replay:
                ids = [row["record_id"] for row in rows]
                done = set(conn.scalars(select(_records.c.record_id).where(_records.c.record_id.in_(ids))))
                rows = [row for row in rows if row["record_id"] not in done]
                if not rows:
                    return 0
            chained, after = _link(rows, heads)
            conn.execute(insert(_records), chained)
            rollup.add(conn, chained)
            conn.execute(
                update(_heads)
                .where(_heads.c.chain == bindparam("b_chain"))
                .values(seq=bindparam("b_seq"), hash=bindparam("b_hash")),
                [{"b_chain": c, "b_seq": s, "b_hash": h} for c, (s, h) in after.items()],
            )
        self._heads_seen.update(after)
        if not replay:
            self._durable(chained)
        return len(chained)

    def _durable(self, chained: list[dict[str, Any]]) -> None:
        if self.journal is not None:
            self.journal.durable(row["record_id"] for row in chained)

    def _ensure_heads(self, chains: list[str]) -> None:
        """Create missing heads in a transaction of their own, so a batch never holds a new row's lock."""
        missing = [c for c in chains if c not in self._known_heads]
        if not missing:
            return
        dialect_insert = pg_insert if self.engine.dialect.name == "postgresql" else sqlite_insert
        stmt = dialect_insert(_heads).on_conflict_do_nothing(index_elements=["chain"])
        with self.engine.begin() as conn:
            conn.execute(stmt, [{"chain": c, "seq": 0, "hash": GENESIS_HASH} for c in missing])
        self._known_heads.update(missing)

    def _lock_heads(self, conn: Any, chains: list[str]) -> dict[str, tuple[int, str]]:
        if self.engine.dialect.name == "sqlite":
            # pysqlite begins lazily; a write first takes SQLite's write lock for the whole transaction.
            conn.execute(update(_heads).where(_heads.c.chain.in_(chains)).values(seq=_heads.c.seq))
        stmt = select(_heads.c.chain, _heads.c.seq, _heads.c.hash).where(_heads.c.chain.in_(chains))
        stmt = stmt.order_by(_heads.c.chain)
        if self.engine.dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        return {chain: (seq, digest) for chain, seq, digest in conn.execute(stmt)}


def _link(
    rows: list[dict[str, Any]], heads: dict[str, tuple[int, str]]
) -> tuple[list[dict[str, Any]], dict[str, tuple[int, str]]]:
    """The rows with seq, prev_hash and hash, each after the one before in its chain; new heads."""
    heads = dict(heads)
    chained = []
    for row in rows:
        seq, prev = heads[row["chain"]]
        linked = {**row, "seq": seq + 1, "prev_hash": prev}
        linked["hash"] = record_hash(linked)
        heads[row["chain"]] = (seq + 1, linked["hash"])
        chained.append(linked)
    return chained, heads


@functools.cache
def _append_statement() -> TextClause:
    """PostgreSQL: insert the records and add the usage totals (CTEs), then move the heads that
    are still where the rows were linked, in one statement. Every row comes in one JSON parameter,
    so the text is the same for every batch: nothing to compile, and PostgreSQL prepares it once
    per connection. (The same statement built with SQLAlchemy's multi-row VALUES had a bind
    parameter per value, about 13,000 for a batch of 500, and compiling it every flush was 12% of
    a worker's CPU in bench/soak.py.)"""
    dialect = postgresql.dialect()
    columns = [c for c in _records.columns if c.name != "id"]
    names = ", ".join(c.name for c in columns)
    types = ", ".join(f"{c.name} {c.type.compile(dialect=dialect)}" for c in columns)
    return text(
        f"""WITH appended AS (
  INSERT INTO audit_records ({names})
  SELECT {names} FROM json_to_recordset(CAST(:records AS json)) AS r({types})
),
{rollup.POSTGRES_CTES}
UPDATE audit_chain_heads AS h SET seq = m.seq, hash = m.hash
FROM json_to_recordset(CAST(:moves AS json)) AS m(chain varchar, old_seq bigint, seq bigint, hash varchar)
WHERE h.chain = m.chain AND h.seq = m.old_seq"""
    )


def _append_params(
    chained: list[dict[str, Any]], before: dict[str, tuple[int, str]], after: dict[str, tuple[int, str]]
) -> dict[str, str]:
    moves = [
        {"chain": chain, "old_seq": before[chain][0], "seq": seq, "hash": digest}
        for chain, (seq, digest) in sorted(after.items())
    ]
    # Timestamps as the naive UTC the column holds, to the microsecond: what the hash covered.
    return {
        "records": json.dumps(chained, default=json_default),
        "moves": json.dumps(moves),
        **rollup.postgres_params(chained),
    }


def _built(record: Pending) -> bool:
    """Build (and hash) a record taken from the buffer. One that cannot be built is a bug in what
    the request noted: it is logged and left out, so that it cannot fail its whole batch and the
    spool after it, which is all it could cost when records were built in `submit`."""
    try:
        record.row()
    except Exception:
        log.exception("audit_record_unbuildable", request_id=record.request_id, endpoint=record.endpoint)
        return False
    return True


def _flusher(ref: weakref.ref[AuditWriter], wakeup: threading.Condition) -> None:
    while True:
        writer = ref()
        if writer is None or writer._closed or writer._pid != os.getpid():
            return
        try:
            writer.flush()
        except Exception:
            log.exception("audit_flush_error")
        interval = writer.flush_interval_s
        behind = len(writer._buffer) >= writer.batch_size and not writer._spool_files
        del writer
        if not behind:
            with wakeup:
                wakeup.wait(interval)
