"""Verifying the audit chain, and retention.

``verify`` walks the chain in id order (a server-side cursor: constant memory)
and names the FIRST problem: a record altered (its hash does not match),
deleted (an id gap, or a prev_hash that is not the previous record's hash),
reordered or duplicated, a head row that disagrees, or a chain shorter or
different than a checkpoint says (``audit_checkpoints``). ``drop_older_than``
applies retention (never under 180 days), anchoring the new first record with
a checkpoint first so the shortened chain still verifies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from rmiot.security.audit import GENESIS, MIN_RETENTION_DAYS, stored_row_hash
from rmiot.security.audit_checkpoints import (
    AuditIntegrityError,
    Checkpoint,
    append_line,
    checkpoint_line,
    read_checkpoints,
)

log = logging.getLogger("rmiot.audit")


@dataclass(frozen=True)
class Problem:
    """The first thing wrong with the chain: at record ``id``, of ``kind``."""

    id: int
    kind: str
    message: str


@dataclass(frozen=True)
class VerifyReport:
    records: int
    first_id: int | None
    last_id: int | None
    head_hash: bytes
    anchor: str
    checkpoints_checked: int
    problem: Problem | None

    @property
    def ok(self) -> bool:
        return self.problem is None


# ts as exact microseconds since the Unix epoch (NULL when not finite: a
# datetime could not hold 'infinity', and no appender writes it).
_VERIFY_SQL = """SELECT id,
                        CASE WHEN isfinite(ts)
                             THEN (extract(epoch FROM ts) * 1000000)::int8 END,
                        actor, role, tenant_id, method, object, outcome, source,
                        request_id, detail::text, patient, prev_hash, hash
                 FROM audit_log ORDER BY id, ts"""


def verify(dsn: str, checkpoints: Path | None = None) -> VerifyReport:
    """Walk the chain in id order and report the first problem (module docstring)."""
    marks: dict[int, list[Checkpoint]] = {}
    for cp in read_checkpoints(checkpoints) if checkpoints is not None else []:
        marks.setdefault(cp.id, []).append(cp)
    latest = max((cp for cps in marks.values() for cp in cps), key=lambda c: c.id, default=None)
    checked = 0
    records = 0
    first_id: int | None = None
    prev_id: int | None = None
    prev_hash = GENESIS
    anchor = "genesis"
    last_ok_checkpoint: Checkpoint | None = None

    def report(problem: Problem | None) -> VerifyReport:
        return VerifyReport(records, first_id, prev_id, prev_hash, anchor, checked, problem)

    with psycopg.connect(dsn) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            head = conn.execute("SELECT last_id, last_hash, count FROM audit_head").fetchone()
            if head is None:
                return report(Problem(0, "head", "audit_head has no row"))
            with conn.cursor(name="rmiot_audit_verify") as cur:
                cur.itersize = 5000
                cur.execute(_VERIFY_SQL)
                for row in cur:
                    ident, row_prev, stored = row[0], bytes(row[12]), bytes(row[13])
                    computed = stored_row_hash(row)
                    if prev_id is None:
                        problem = _check_start(ident, row_prev, stored, computed, marks)
                        if problem is not None:
                            return report(problem)
                        first_id = ident
                        if ident != 1:
                            anchor = f"checkpoint of record {ident} ({marks[ident][0].ts})"
                    else:
                        problem = _check_link(prev_id, prev_hash, ident, row_prev, stored,
                                              computed)
                        if problem is not None:
                            return report(problem)
                    for cp in marks.get(ident, ()):
                        checked += 1
                        if cp.hash != stored:
                            after = (f" (after the checkpoint of record {last_ok_checkpoint.id},"
                                     " which matched)") if last_ok_checkpoint else ""
                            return report(Problem(ident, "checkpoint", (
                                f"differs from the checkpoint of {cp.ts} (line {cp.line}): "
                                f"the chain was rewritten at or before this record{after}")))
                        last_ok_checkpoint = cp
                    prev_id, prev_hash = ident, stored
                    records += 1
    last_id, last_hash, count = head[0], bytes(head[1]), head[2]
    if prev_id is None:
        named = max(last_id, latest.id if latest else 0)
        if named > 0:
            # The first record that should be there: id 1, or the start the
            # last retention anchored.
            starts = [cp.id for cps in marks.values() for cp in cps if cp.reason == "retention"]
            start = max(starts, default=1)
            return report(Problem(start, "truncated",
                                  f"the chain is empty, but the head row or a checkpoint "
                                  f"names record {named} (records {start}..{named} deleted)"))
        return report(None)
    if last_id > prev_id:
        return report(Problem(prev_id + 1, "truncated",
                              f"records {prev_id + 1}..{last_id} are missing: the chain ends at "
                              f"{prev_id}, the head row names {last_id} (tail deleted)"))
    if last_id < prev_id:
        return report(Problem(last_id + 1, "head",
                              f"records after {last_id}, where the head row ends, exist: "
                              "inserted behind the appenders, or the head was moved back"))
    if last_hash != prev_hash or count != last_id:
        return report(Problem(prev_id, "head", "the head row's hash or count disagrees with "
                                               "the last record"))
    if latest is not None and latest.id > prev_id:
        return report(Problem(prev_id + 1, "truncated",
                              f"records {prev_id + 1}..{latest.id} are missing: the chain ends "
                              f"at {prev_id}, the checkpoint of {latest.ts} (line {latest.line}) "
                              f"names {latest.id} (tail deleted)"))
    return report(None)


def _check_start(ident: int, row_prev: bytes, stored: bytes, computed: bytes | None,
                 marks: dict[int, list[Checkpoint]]) -> Problem | None:
    if ident == 1:
        if row_prev != GENESIS:
            return Problem(1, "altered", "the first record does not start from the genesis hash")
        if computed != stored:
            return Problem(1, "altered", "the record does not hash to its stored hash "
                                         "(its content was changed)")
        return None
    if computed != stored:
        return Problem(ident, "altered", "the record does not hash to its stored hash "
                                         "(its content was changed)")
    if not any(cp.hash == stored for cp in marks.get(ident, ())):
        return Problem(ident, "unanchored",
                       f"the chain starts after retention at id {ident} and no checkpoint "
                       "names that record: records before it may have been deleted")
    return None


def _check_link(prev_id: int, prev_hash: bytes, ident: int, row_prev: bytes, stored: bytes,
                computed: bytes | None) -> Problem | None:
    if ident == prev_id:
        return Problem(ident, "duplicate", f"a second record with id {ident} (inserted)")
    if ident > prev_id + 1:
        missing = f"{prev_id + 1}" if ident == prev_id + 2 else f"{prev_id + 1}..{ident - 1}"
        return Problem(prev_id + 1, "missing", f"record {missing} is missing (deleted)")
    if row_prev != prev_hash:
        if computed == stored:
            return Problem(prev_id, "rewritten",
                           f"record {ident} links to a different hash than this record's: "
                           "this record was replaced with a recomputed hash (or records "
                           "deleted after it and the rest renumbered)")
        return Problem(ident, "reordered",
                       f"the record does not link to record {prev_id} and does not hash at "
                       "this position: moved from another id (reordered) or forged")
    if computed != stored:
        return Problem(ident, "altered", "the record does not hash to its stored hash "
                                         "(its content was changed)")
    return None


# -- retention ----------------------------------------------------------------

@dataclass(frozen=True)
class RetentionResult:
    first_id: int | None   # the chain's first record afterwards
    removed: int


def drop_older_than(dsn: str, days: int, *, checkpoints: Path) -> RetentionResult:
    """Remove records older than ``days`` (at least 180) with the
    administrator's DSN; see the module docstring. The newest record is kept
    whatever its age, so the chain always has an anchored start."""
    if days < MIN_RETENTION_DAYS:
        raise ValueError(f"audit records are kept at least {MIN_RETENTION_DAYS} days "
                         f"(GB/T 22239-2019; Cybersecurity Law art. 21), not {days}")
    problem = verify(dsn, checkpoints if checkpoints.exists() else None).problem
    if problem is not None:
        raise AuditIntegrityError(f"refusing retention: record {problem.id}: "
                                  f"{problem.kind}: {problem.message}")
    cutoff = datetime.now(UTC) - timedelta(days=days)
    with psycopg.connect(dsn) as conn, conn.transaction():
        row = conn.execute("SELECT min(id) FROM audit_log WHERE ts >= %s", (cutoff,)).fetchone()
        keep_from = row[0] if row else None
        if keep_from is None:
            row = conn.execute("SELECT max(id) FROM audit_log").fetchone()
            keep_from = row[0] if row else None
        if keep_from is None:
            return RetentionResult(None, 0)
        row = conn.execute("SELECT min(id) FROM audit_log").fetchone()
        assert row is not None
        if row[0] >= keep_from:
            return RetentionResult(row[0], 0)
        removed = keep_from - row[0]  # ids are dense: the chain verified above
        first = conn.execute("SELECT hash, (SELECT min(ts) FROM audit_log WHERE id >= %s) "
                             "FROM audit_log WHERE id = %s", (keep_from, keep_from)).fetchone()
        assert first is not None
        # Anchor the new start outside the database before anything is gone.
        append_line(checkpoints, checkpoint_line(keep_from, bytes(first[0]), keep_from,
                                                   "retention"))
        # Whole chunks older than every kept record hold only records to drop;
        # the rest (ts and id order differ slightly across processes) by id.
        conn.execute("SELECT drop_chunks('audit_log', older_than => %s::timestamptz)",
                     (first[1],))
        conn.execute("DELETE FROM audit_log WHERE id < %s", (keep_from,))
    log.info("audit retention", extra={"days": days, "first_id": keep_from, "removed": removed})
    return RetentionResult(keep_from, removed)
