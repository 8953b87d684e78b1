"""Restore drills and point-in-time restore from the backups of ``backup``.

The drill (``run_drill``): a backup counts only once a restore from it has
succeeded. It checks the copy against its manifest (pg_verifybackup),
restores it into a scratch cluster (``pg-drill``, a free port) up to its
consistent point, counts the rows of every table, checks that the
append-only tables (``telemetry``, ``audit_log``) hold no fewer rows than when
the backup started and no more than when it ended, verifies the audit chain
(and the checkpoint file's marks up to the restored head), records the
outcome in the backup's catalogue entry, and removes the scratch cluster.

Point-in-time restore (``point_in_time``, ``rmiot backup restore --to TIME``)
copies the newest backup that finished at or before TIME (a verified one when
there is one) into a NEW cluster (``pg-restore-<time>``, its own port),
replays the WAL archive up to TIME — every transaction committed at or before
it, none after — and promotes it. It never archives: its timeline must not
mix into the live archive. The live primary, when it answers, is first made
to switch WAL segments and wait until the current one is archived, so the
archive reaches TIME; when it is gone, the restore reaches as far as the
archive does (or fails, saying recovery ended before TIME). The live cluster
is untouched: copy what is needed from the restored one, or point the
platform at it; ``discard`` stops and deletes it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from rmiot.config import Config
from rmiot.deploy import cluster, localstate, pgnode, topology
from rmiot.deploy.backup import (
    APPEND_ONLY,
    BackupError,
    BackupInfo,
    Drill,
    backup_dir,
    count_rows,
    current_primary,
    find,
    free_port,
    iso,
    list_backups,
    restore_command,
    save,
)
from rmiot.security import audit_verify

DRILL = "pg-drill"


@dataclass(frozen=True)
class Restored:
    """A cluster restored to a point in time, running on ``port``."""

    name: str
    port: int
    backup: str
    target: str
    server: cluster.Cluster


# -- the restore drill --------------------------------------------------

def run_drill(cfg: Config, label: str | None = None) -> BackupInfo:
    """Run the restore drill of a backup and record its outcome (see the module docstring)."""
    info = find(cfg, label)
    began = time.monotonic()
    scratch = pgnode.Node(pgnode.with_port(cfg, free_port()), DRILL)
    if scratch.root.exists():
        pgnode.remove(scratch)
    try:
        problem = _check_manifest(cfg, info, scratch.user)
        counts: dict[str, int] = {}
        records = 0
        if not problem:
            _materialise(cfg, info, scratch, {"recovery_target": "immediate"})
            _start_and_promote(scratch, 600)
            counts, records, problem = _inspect(cfg, info, scratch)
    except (cluster.ClusterError, BackupError, psycopg.Error) as exc:
        counts, records, problem = {}, 0, str(exc).strip()
    finally:
        pgnode.remove(scratch)
    info.drill = Drill(at=iso(datetime.now(UTC)), ok=not problem,
                       restore_s=round(time.monotonic() - began, 3), counts=counts,
                       audit_records=records, problem=problem)
    save(cfg, info)
    return info


def _check_manifest(cfg: Config, info: BackupInfo, user: str | None) -> str:
    out = localstate.run_as(user, [str(cluster.PG_BIN / "pg_verifybackup"), "-q",
                                   str(backup_dir(cfg) / "base" / info.label)])
    return "" if out.returncode == 0 else f"pg_verifybackup: {out.stderr.strip()}"


def _inspect(cfg: Config, info: BackupInfo, server: cluster.Cluster) -> tuple[
        dict[str, int], int, str]:
    dsn = pgnode.dsn(server, cfg.database.name)
    with psycopg.connect(dsn) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') ORDER BY 1").fetchall()]
    counts = count_rows(dsn, tables)
    for table in APPEND_ONLY:
        low, high = info.counts_start.get(table), info.counts_end.get(table)
        if low is not None and high is not None and not low <= counts.get(table, -1) <= high:
            return counts, 0, (f"{table} holds {counts.get(table)} rows; the backup saw "
                               f"{low} at its start and {high} at its end")
    if "audit_head" not in counts:
        return counts, 0, ""
    with psycopg.connect(dsn) as conn:
        head = conn.execute("SELECT last_id FROM audit_head").fetchone()
    marks = _checkpoints_up_to(cfg, int(head[0]) if head else 0)
    try:
        report = audit_verify.verify(dsn, marks)
    finally:
        if marks is not None:
            marks.unlink()
    if report.problem is not None:
        p = report.problem
        return counts, report.records, f"audit chain: record {p.id}: {p.kind}: {p.message}"
    return counts, report.records, ""


def _checkpoints_up_to(cfg: Config, last_id: int) -> Path | None:
    """A copy of the checkpoint file's lines for records up to ``last_id``
    (later ones are beyond the restored point), or None without a file."""
    source = cfg.audit_checkpoints
    if not source.is_file():
        return None
    keep = [line for line in source.read_text().splitlines()
            if line.strip() and json.loads(line)["id"] <= last_id]
    fd, name = tempfile.mkstemp(prefix="rmiot-drill-", suffix=".jsonl")
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(line + "\n" for line in keep))
    return Path(name)


# -- restore -------------------------------------------------------------------

def point_in_time(cfg: Config, to: datetime, name: str | None = None,
                  port: int | None = None) -> Restored:
    """Restore the state at ``to`` into a new cluster (see the module docstring)."""
    if to.tzinfo is None:
        raise BackupError("give the restore time with its zone, e.g. 2026-01-22T09:30:00+08:00")
    if to > datetime.now(UTC):
        raise BackupError(f"{iso(to)} is in the future")
    candidates = [b for b in list_backups(cfg) if datetime.fromisoformat(b.finished) <= to]
    if not candidates:
        raise BackupError(f"no backup finished before {iso(to)}: the archive cannot reach back "
                          "that far (see 'rmiot backup list')")
    verified = [b for b in candidates if b.verified]
    info = (verified or candidates)[-1]
    _archive_current_segment(cfg)
    stamp = to.astimezone(UTC).strftime("%Y%m%dT%H%M%S.%f").rstrip("0").rstrip(".")
    name = name or f"pg-restore-{stamp}Z"
    server = pgnode.Node(pgnode.with_port(cfg, port or free_port()), name)
    _materialise(cfg, info, server, {"recovery_target_time": iso(to),
                                     "recovery_target_inclusive": True,
                                     "recovery_target_timeline": "latest"})
    try:
        _start_and_promote(server, 3600)
    except (cluster.ClusterError, BackupError) as exc:
        log = server.logfile.read_text(errors="replace") if server.logfile.exists() else ""
        pgnode.remove(server)
        if "before configured recovery target was reached" in log:
            raise BackupError(f"the WAL archive ends before {iso(to)} (nothing archived was "
                              "committed after it): restore to an earlier time") from None
        raise BackupError(str(exc)) from None
    return Restored(name, server.cfg.database.port, info.label, iso(to), server)


def _archive_current_segment(cfg: Config, timeout_s: float = 60) -> None:
    """Make the live primary (if it answers) archive the WAL written so far,
    ending with a commit: recovery to a time stops at the first commit after
    it, and fails when the WAL ends before one."""
    server = current_primary(cfg)
    try:
        with psycopg.connect(pgnode.dsn(server), autocommit=True) as conn:
            conn.execute("SELECT txid_current()")  # a commit record, stamped after the target
            row = conn.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()
            assert row is not None
            segment = str(row[0])

            def archived() -> bool:
                got = conn.execute("SELECT last_archived_wal FROM pg_stat_archiver").fetchone()
                return bool(got and got[0] and str(got[0])[8:] >= segment[8:])

            pgnode.wait_until(archived, timeout_s, f"WAL segment {segment} to be archived")
    except psycopg.OperationalError:
        return  # the primary is gone: restore from what the archive has


def _materialise(cfg: Config, info: BackupInfo, server: pgnode.Node,
                 recovery: dict[str, pgnode.Setting]) -> None:
    """Copy the base backup into the node and set it up to recover."""
    root = server.prepare()
    out = localstate.run_as(server.user, ["cp", "-a", str(backup_dir(cfg) / "base" / info.label),
                                          str(root / "data")])
    if out.returncode != 0:
        raise BackupError(f"copying backup {info.label} failed: {out.stderr.strip()}")
    auto = server.data / "postgresql.auto.conf"
    if auto.exists():  # a backup of a promoted standby still names its old primary
        auto.write_text("".join(line for line in auto.read_text().splitlines(keepends=True)
                                if not line.startswith(("primary_conninfo", "primary_slot_name"))))
    for stale in ("standby.signal", "backup_manifest"):
        (server.data / stale).unlink(missing_ok=True)
    wal = backup_dir(cfg) / "wal"
    pgnode.update_settings(server, {
        "archive_mode": "off", "archive_command": None, "archive_timeout": None,
        "synchronous_standby_names": None, "restore_command": restore_command(wal),
        "recovery_target_action": "promote", **recovery})
    signal_file = server.data / "recovery.signal"
    signal_file.touch()
    localstate.chown(server.user, signal_file)


def _start_and_promote(server: cluster.Cluster, timeout_s: float) -> None:
    """Start a recovering node and wait until it reached its target and promoted."""
    server.start()

    def promoted() -> bool:
        if not server.running():
            tail = server.logfile.read_text(errors="replace").strip().splitlines()[-4:]
            raise BackupError("the restored cluster stopped during recovery:\n  "
                              + "\n  ".join(tail))
        return pgnode.in_recovery(server) is False

    pgnode.wait_until(promoted, timeout_s, "recovery to reach its target", 0.2)


def discard(cfg: Config, name: str) -> None:
    """Stop and delete a restored cluster (never a node of the live topology)."""
    if name in {n.name for n in topology.load(cfg).nodes} or not name.startswith("pg-"):
        raise BackupError(f"{name} is not a restored cluster")
    server = pgnode.Node(cfg, name)
    if not server.initialised():
        raise BackupError(f"there is no restored cluster {name}")
    pgnode.remove(server)
