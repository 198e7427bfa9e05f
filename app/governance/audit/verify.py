"""Walk a chain and report its first broken link.

A chain is read in seq order up to the head's seq, read first: writers move the head in the
same transaction as they insert, so every record up to it is committed, and records appended
while we read are simply not checked this time. What each failure means:

- a record's own hash does not match its fields: that record was edited;
- a seq is missing: records were deleted (the report names the first missing seq and the
  record after the gap);
- a record's prev_hash is not the previous record's hash: the previous record was edited and
  its hash recomputed, or records were reordered;
- the head is ahead of the last record: records were deleted from the end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Connection, select, union

from app.governance.audit.models import AuditChainHead, AuditRecord
from app.governance.audit.records import GENESIS_HASH, HASHED_COLUMNS, record_hash

PAGE = 2000
_records = AuditRecord.__table__
_heads = AuditChainHead.__table__
_columns = [_records.c[name] for name in (*HASHED_COLUMNS, "hash")]


@dataclass(frozen=True)
class BrokenLink:
    chain: str
    seq: int
    record_id: str | None
    reason: str


@dataclass(frozen=True)
class ChainReport:
    chain: str
    records: int
    broken: BrokenLink | None


def verify_chain(conn: Connection, chain: str) -> ChainReport:
    head = conn.execute(select(_heads.c.seq, _heads.c.hash).where(_heads.c.chain == chain)).first()
    last_seq, last_hash = 0, GENESIS_HASH
    checked = 0
    limit = head.seq if head is not None else None
    while True:
        stmt = select(*_columns).where(_records.c.chain == chain, _records.c.seq > last_seq)
        if limit is not None:
            stmt = stmt.where(_records.c.seq <= limit)
        rows = conn.execute(stmt.order_by(_records.c.seq).limit(PAGE)).mappings().all()
        for row in rows:
            broken = _check(chain, row, last_seq, last_hash)
            if broken is not None:
                return ChainReport(chain, checked, broken)
            last_seq, last_hash = row["seq"], row["hash"]
            checked += 1
        if len(rows) < PAGE:
            break
    if head is None:
        reason = "the chain has records but no head"
        return ChainReport(chain, checked, BrokenLink(chain, last_seq, None, reason) if checked else None)
    if head.seq != last_seq:
        reason = f"records {last_seq + 1}..{head.seq} are missing at the end of the chain"
        return ChainReport(chain, checked, BrokenLink(chain, last_seq + 1, None, reason))
    if head.hash != last_hash:
        reason = "the chain head's hash does not match the last record"
        return ChainReport(chain, checked, BrokenLink(chain, last_seq, None, reason))
    return ChainReport(chain, checked, None)


def _check(chain: str, row: Any, last_seq: int, last_hash: str) -> BrokenLink | None:
    record_id = row["record_id"]
    if row["seq"] != last_seq + 1:
        reason = f"records {last_seq + 1}..{row['seq'] - 1} are missing before this record"
        return BrokenLink(chain, last_seq + 1, record_id, reason)
    if record_hash(row) != row["hash"]:
        return BrokenLink(chain, row["seq"], record_id, "the record was altered: its hash does not match")
    if row["prev_hash"] != last_hash:
        reason = "prev_hash does not match the previous record's hash"
        return BrokenLink(chain, row["seq"], record_id, reason)
    return None


def all_chains(conn: Connection) -> list[str]:
    """Every chain with a head or a record: a deleted head must not hide its chain."""
    stmt = union(select(_heads.c.chain), select(_records.c.chain).distinct())
    return sorted(conn.scalars(stmt))


def verify(conn: Connection, chains: Iterable[str]) -> dict[str, Any]:
    reports = [verify_chain(conn, chain) for chain in chains]
    broken = [asdict(r.broken) for r in reports if r.broken is not None]
    return {
        "ok": not broken,
        "chains": len(reports),
        "records": sum(r.records for r in reports),
        "broken": broken,
    }
