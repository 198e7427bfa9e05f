"""The local spool: where audit rows wait, durably, while the database cannot take them.

One append-only JSON-lines file per process and database, `audit-<db>-<pid>.jsonl`, written with
fsync before the rows leave memory. `<db>` is a fingerprint of the database URL, so a spool is
only ever replayed into the database it was meant for (a host running staging and production,
or the test suite's throwaway databases, cannot cross). A file whose process is dead is an
orphan: a live process claims it by renaming it to its own pid (the rename is atomic, so two
workers starting at once cannot both replay it) and replays it before its own file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import structlog

from app.governance.audit.records import canonical_json, row_from_json

log = structlog.get_logger(__name__)


def database_fingerprint(url: Any) -> str:
    """Short, stable and password-free: the rendered URL with the password hidden, hashed."""
    text = url.render_as_string(hide_password=True) if hasattr(url, "render_as_string") else str(url)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Spool:
    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = directory
        self.fingerprint = fingerprint
        self._pattern = re.compile(rf"^audit-{fingerprint}-(\d+)(?:\.[0-9a-z-]+)?\.jsonl$")

    @property
    def own_file(self) -> Path:
        return self.directory / f"audit-{self.fingerprint}-{os.getpid()}.jsonl"

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append and fsync; raises OSError if the rows are not safely on disk."""
        if not rows:
            return
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.own_file
        created = not path.exists()
        data = "".join(canonical_json(row) + "\n" for row in rows).encode()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            self._sync_directory()

    def _sync_directory(self) -> None:
        """A new file's directory entry must survive a crash too."""
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def claim_orphans(self) -> list[Path]:
        """Take over the files of dead processes (this database only); returns them oldest first."""
        claimed: list[Path] = []
        if not self.directory.is_dir():
            return claimed
        me = os.getpid()
        for path in sorted(self.directory.iterdir(), key=_mtime):
            match = self._pattern.match(path.name)
            if match is None:
                continue
            owner = int(match.group(1))
            if owner == me or _alive(owner):
                continue
            claim = f"from-{owner}-{uuid.uuid4().hex[:8]}"
            target = self.directory / f"audit-{self.fingerprint}-{me}.{claim}.jsonl"
            try:
                path.rename(target)
            except FileNotFoundError:
                continue  # another process claimed it first
            log.info("audit_spool_claimed", file=path.name, dead_pid=owner)
            claimed.append(target)
        return claimed

    def owned(self) -> list[Path]:
        """This process's files to replay, in order: claimed orphans (oldest first), then its own."""
        if not self.directory.is_dir():
            return []
        me = os.getpid()
        own = self.own_file
        claimed = [
            p
            for p in self.directory.iterdir()
            if p != own and (m := self._pattern.match(p.name)) is not None and int(m.group(1)) == me
        ]
        return sorted(claimed, key=_mtime) + ([own] if own.exists() else [])

    def batches(self, path: Path, size: int) -> Iterator[list[dict[str, Any]]]:
        """The file's rows in order, `size` at a time. A torn last line (a crash mid-write) is skipped."""
        batch: list[dict[str, Any]] = []
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.endswith("\n"):
                    log.warning("audit_spool_torn_line", file=path.name, line=number)
                    break
                try:
                    batch.append(row_from_json(_loads(line)))
                except (ValueError, KeyError, TypeError) as exc:
                    log.error("audit_spool_bad_line", file=path.name, line=number, error=str(exc))
                    continue
                if len(batch) >= size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    @staticmethod
    def remove(path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _loads(line: str) -> dict[str, Any]:
    value = json.loads(line)
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value
