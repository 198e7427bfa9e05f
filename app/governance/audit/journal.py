"""The audit journal: what a worker killed with SIGKILL would otherwise take with it.

Records reach the database in batches (every AUDIT_FLUSH_INTERVAL_MS), and a record is submitted
only when its response has been sent. So a worker killed with SIGKILL loses two things: the records
still in its buffer, and every request it was serving, which never gets a record at all (a stream
cut by the kill, a chat waiting on its upstream). Either is a gap in the trail.

So each worker also appends short lines to a journal of its own, next to the spool:

- `open` when an audited request starts: record id, time, kind, endpoint, method, request id;
- `start` when a streamed response begins, now that the caller is known: tenant, principal, model;
- `close` when the record is submitted: status, latency, tenant, principal, model, tokens.

Lines are written without fsync: a process killed by a signal loses nothing the kernel has
accepted (only a machine crash would, and then the buffer is gone in any case). The journal is a
series of segments; a segment is sealed after SEGMENT_S and deleted once every record opened in it
is in the database or the fsynced spool, so a live worker's journal stays a few seconds long.

Recovery: every JOURNAL_SCAN_S (writer.py) each worker's writer claims the segments of dead
processes (renamed to itself, as the spool does, so two workers cannot both take one; a process
is named by its pid and start time, so a reused pid is not taken for the dead one) and
writes a record for every journalled request the database does not have: with its close line's
status and figures if the response was sent (the record died in the buffer), else with status
0 and `details.recovered = "worker_died_mid_request"`. A request cut before it was identified has
no tenant and lands in the platform chain. Through the writer's replay path, so a record that did
reach the database is never written twice. What the journal can't bring back: input and output
hashes (bodies are not journalled, for size and content).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from app.governance.audit.records import Pending

log = structlog.get_logger(__name__)

SEGMENT_S = 5.0


def _start_time(pid: int) -> str:
    """When the process began (Linux: /proc/<pid>/stat field 22), so a reused pid is told apart
    from the process that wrote a journal; "0" where /proc can't say, and then the pid alone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "0"


def _alive(pid: int, started: str) -> bool:
    """Whether the process that wrote as (`pid`, `started`) is still running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return started == "0" or _start_time(pid) == started


class Journal:
    """One process's journal for one database (`fingerprint`), in `directory`."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = directory
        self.fingerprint = fingerprint
        self._pattern = re.compile(rf"^journal-{fingerprint}-(\d+)-(\d+)-[0-9a-z.-]+\.journal$")
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._fd: int | None = None
        self._path: Path | None = None
        self._sealed_at = 0.0
        # segment path -> ids opened in it and not yet durable
        self._outstanding: dict[Path, set[str]] = {}
        self._segment_of: dict[str, Path] = {}

    # the request path --------------------------------------------------------------------------
    def opened(
        self, record_id: str, kind: str, ts: datetime, request_id: str | None, endpoint: str, method: str
    ) -> None:
        self._append(
            record_id,
            {"e": "open", "id": record_id, "kind": kind, "ts": ts.isoformat(), "rid": request_id,
             "endpoint": endpoint, "method": method},
        )  # fmt: skip

    def started(self, record_id: str, tenant: str | None, principal: str | None, model: str | None) -> None:
        self._write({"e": "start", "id": record_id, "tenant": tenant, "principal": principal, "model": model})

    def closed(self, record: Pending) -> None:
        noted = record.noted
        line = {"e": "close", "id": record.record_id, "status": record.status, "tenant": record.tenant_id}
        line.update(
            latency_ms=round(record.latency_ms, 3),
            principal=record.principal,
            action=record.action,
            model=noted.get("model") or record.served_model,
            tokens_in=noted.get("tokens_in"),
            tokens_out=noted.get("tokens_out"),
            noted_status=noted.get("status"),
        )
        self._write(line)

    def durable(self, record_ids: Iterable[str]) -> None:
        """The records are in the database (or the spool): their lines are no longer needed."""
        with self._lock:
            emptied = []
            for record_id in record_ids:
                segment = self._segment_of.pop(record_id, None)
                if segment is not None:
                    pending = self._outstanding.get(segment)
                    if pending is not None:
                        pending.discard(record_id)
                        if not pending and segment != self._path:
                            emptied.append(segment)
            for segment in emptied:
                self._outstanding.pop(segment, None)
                with contextlib.suppress(FileNotFoundError):
                    segment.unlink()

    def close(self) -> None:
        """On shutdown, after the writer has made everything durable: the last segment goes too."""
        with self._lock:
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
                self._fd = None
                if self._path is not None and not self._outstanding.get(self._path):
                    self._outstanding.pop(self._path, None)
                    with contextlib.suppress(FileNotFoundError):
                        self._path.unlink()

    def _append(self, record_id: str, line: dict[str, Any]) -> None:
        with self._lock:
            self._rotate_if_due()
            assert self._path is not None
            self._outstanding[self._path].add(record_id)
            self._segment_of[record_id] = self._path
            self._write_locked(line)

    def _write(self, line: dict[str, Any]) -> None:
        with self._lock:
            if line["id"] not in self._segment_of:
                return  # already durable (or never opened here)
            self._write_locked(line)

    def _write_locked(self, line: dict[str, Any]) -> None:
        assert self._fd is not None
        try:
            os.write(self._fd, (json.dumps(line, separators=(",", ":"), default=str) + "\n").encode())
        except OSError as exc:
            log.warning("audit_journal_write_failed", error=str(exc))

    def _rotate_if_due(self) -> None:
        now = time.monotonic()
        if self._fd is not None and self._pid == os.getpid() and now < self._sealed_at:
            return
        if self._pid != os.getpid():  # first use, or a fork: start afresh, inherit nothing
            self._outstanding.clear()
            self._segment_of.clear()
            self._fd = None
        elif self._fd is not None:
            os.close(self._fd)
            assert self._path is not None
            if not self._outstanding.get(self._path):
                self._outstanding.pop(self._path, None)
                with contextlib.suppress(FileNotFoundError):
                    self._path.unlink()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._pid = os.getpid()
        self._path = self.directory / f"journal-{self._owner()}-{uuid.uuid4().hex[:12]}.journal"
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._outstanding[self._path] = set()
        self._sealed_at = now + SEGMENT_S

    # recovery ----------------------------------------------------------------------------------
    def _owner(self) -> str:
        pid = os.getpid()
        return f"{self.fingerprint}-{pid}-{_start_time(pid)}"

    def claim_orphans(self) -> list[Path]:
        """Segments of dead processes (this database only), renamed to this one. A live process's
        segments, this one's included, are never taken: only their writer knows what is durable."""
        claimed: list[Path] = []
        if not self.directory.is_dir():
            return claimed
        me = self._owner()
        for path in sorted(self.directory.iterdir()):
            match = self._pattern.match(path.name)
            if match is None:
                continue
            owner, started = int(match.group(1)), match.group(2)
            if _alive(owner, started):
                continue
            target = self.directory / f"journal-{me}-from-{owner}.{uuid.uuid4().hex[:12]}.journal"
            try:
                path.rename(target)
            except FileNotFoundError:
                continue  # another worker claimed it first
            claimed.append(target)
        return claimed

    @staticmethod
    def lost_records(path: Path) -> list[Pending]:
        """A record for each journalled request in the segment (the writer skips those it has)."""
        entries: dict[str, dict[str, Any]] = {}
        for raw in path.read_text(errors="replace").splitlines():
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # a line cut by the kill
            entries.setdefault(line.get("id", ""), {}).setdefault(line.get("e"), line)
        return [record for entry in entries.values() if (record := _record(entry)) is not None]


def _record(entry: dict[str, dict[str, Any]]) -> Pending | None:
    opened = entry.get("open")
    if opened is None:
        return None
    start, close = entry.get("start", {}), entry.get("close")
    known = {**start, **(close or {})}
    noted: dict[str, Any] = {
        k: known[k] for k in ("model", "tokens_in", "tokens_out") if known.get(k) is not None
    }
    if close is None:
        status, details = 0, {"recovered": "worker_died_mid_request"}
    else:
        status = close.get("noted_status") or close.get("status") or 0
        details = {"recovered": "worker_died_before_record_was_written"}
    return Pending(
        kind=opened["kind"],
        ts=datetime.fromisoformat(opened["ts"]),
        request_id=opened.get("rid"),
        tenant_id=known.get("tenant"),
        principal=known.get("principal"),
        endpoint=opened["endpoint"],
        method=opened["method"],
        action=known.get("action"),
        status=int(status),
        latency_ms=float(close.get("latency_ms") or 0.0) if close else 0.0,
        noted=noted,
        details=details,
        view_args={},
        record_id=opened["id"],
    )
