"""Base backups, continuous WAL archiving and retention of the private
cluster: ``rmiot backup enable|create|list|prune`` (drills and point-in-time
restore: ``restore``).

Layout of the backup directory (``backup.dir``, default ``<data_dir>/backup``,
owned by the server's user — put it on another disk, or sync it off the
machine; the keyring is backed up apart from it, see ``patient_keys``)::

    wal/               archived WAL segments and timeline history files
    base/<label>/      a base backup: a plain copy of the data directory
                       (pg_basebackup -Fp -X stream) with its backup_manifest
    base/<label>.json  its catalogue entry: times, WAL range, size, row counts
                       at start and end, the restore drill's outcome

Archiving: the primary's ``archive_command`` copies every completed WAL
segment into ``wal/`` — written beside, fsynced, renamed into place, so a
segment is there whole or not at all; one already there with the same bytes
counts as archived, with other bytes is an error the server keeps logging and
retrying. ``archive_timeout`` (``backup.archive_timeout_s``) sends a segment
out at least that often while anything is written: that bounds what a restore
from the archive can miss (the backups' RPO; the synchronous replica's is 0).
A standby archives as well (``archive_mode = always``) into the same
directory, so segments the primary had not archived when it died still
arrive. Turning archiving on needs one restart of the primary (``rmiot backup
enable --restart``; the platform reconnects on its own).

A backup counts only once a restore drill from it succeeded
(``restore.run_drill``). ``prune`` keeps the newest ``backup.keep`` verified
backups and any newer one whose drill has not run yet, deletes the others
(failed drills included), then the archived WAL older than the oldest kept
backup — which is how far back a point-in-time restore reaches.

Trade-offs: plain copies are as large as the data (no compression: the
fastest restore, measured as ``restore_s_per_gb`` by ``make
bench-durability``); the row counts at start and end scan the append-only
tables twice per backup — the price of a drill that checks more than "it
started"; under a steady trickle of writes ``archive_timeout`` archives up to
one 16 MB segment a minute.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psycopg
from psycopg import sql

from rmiot.config import Config
from rmiot.deploy import cluster, localstate, pgnode, topology
from rmiot.deploy.durability import settings

APPEND_ONLY = ("telemetry", "audit_log")


class BackupError(Exception):
    """A backup task failed; the message says why."""


@dataclass
class Drill:
    """The outcome of a restore drill."""

    at: str
    ok: bool
    restore_s: float
    counts: dict[str, int] = field(default_factory=dict)
    audit_records: int = 0
    problem: str = ""


@dataclass
class BackupInfo:
    label: str
    started: str
    finished: str
    timeline: int
    start_lsn: str
    end_lsn: str
    start_wal: str
    bytes: int
    counts_start: dict[str, int]
    counts_end: dict[str, int]
    drill: Drill | None = None

    @property
    def verified(self) -> bool:
        return self.drill is not None and self.drill.ok


# -- where things are ----------------------------------------------------------

def backup_dir(cfg: Config) -> Path:
    """The backup directory, created and owned by the server's user."""
    user = localstate.service_user("postgres")
    configured = settings(cfg).backup_dir
    if configured is None:
        root = localstate.state_dir(cfg, "backup", user)
    else:
        root = localstate.own(configured, user)
    for sub in ("wal", "base"):
        localstate.own(root / sub, user)
    return root


def archive_command(wal: Path) -> str:
    target = shlex.quote(str(wal)) + "/%f"
    return (f"if [ -f {target} ]; then cmp -s %p {target}; "
            f"else cp %p {target}.part && sync {target}.part && mv {target}.part {target} "
            f"&& sync {shlex.quote(str(wal))}; fi")


def restore_command(wal: Path) -> str:
    source = shlex.quote(str(wal)) + "/%f"
    return f"test -f {source} && cp {source} %p"


def current_primary(cfg: Config) -> cluster.Cluster:
    node = topology.load(cfg).primary
    return pgnode.node_for(cfg, node.name, node.port)


def archive_settings(cfg: Config, standby: bool = False) -> dict[str, pgnode.Setting | None]:
    wal = backup_dir(cfg) / "wal"
    return {"archive_mode": "always" if standby else "on",
            "archive_command": archive_command(wal),
            "archive_timeout": settings(cfg).archive_timeout_s,
            "restore_command": restore_command(wal) if standby else None}


def archiving(server: cluster.Cluster) -> bool:
    """True when the node's written settings archive (whatever runs now)."""
    return pgnode.read_settings(server).get("archive_mode") in ("on", "always")


# -- enable, create ------------------------------------------------------------

def enable(cfg: Config, restart: bool = False) -> list[str]:
    """Turn WAL archiving on for the primary and every standby; returns what
    was done. A running server whose archive_mode must change is restarted
    when ``restart``, else BackupError says to."""
    topo = topology.load(cfg)
    done = []
    for rec in [topo.primary, *topo.standbys]:
        server = pgnode.node_for(cfg, rec.name, rec.port)
        wanted = archive_settings(cfg, standby=rec.role == topology.STANDBY)
        pgnode.update_settings(server, wanted)
        if not server.running():
            done.append(f"{rec.name}: archiving from its next start")
            continue
        if show(server, "archive_mode") == wanted["archive_mode"]:
            pgnode.reload(server)
            done.append(f"{rec.name}: archiving")
        elif restart:
            pgnode.restart(server)
            done.append(f"{rec.name}: restarted, archiving")
        else:
            raise BackupError(f"{rec.name} must restart once to archive WAL: run "
                              "'rmiot backup enable --restart' (the platform reconnects)")
    return done


def create(cfg: Config) -> BackupInfo:
    """Take a base backup of the current primary (archiving must be on)."""
    server = current_primary(cfg)
    if show(server, "archive_mode") not in ("on", "always"):
        raise BackupError("WAL archiving is off: run 'rmiot backup enable --restart' first "
                          "(a base backup without the WAL after it restores to one moment only)")
    base = backup_dir(cfg) / "base"
    label = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    target = base / label
    dsn = pgnode.dsn(server, cfg.database.name)
    started = _server_now(dsn)
    counts_start = count_rows(dsn, APPEND_ONLY)
    out = localstate.run_as(server.user, [
        str(cluster.PG_BIN / "pg_basebackup"), "-D", str(target), "-Fp", "-X", "stream",
        "-c", "fast", "-l", f"rmiot {label}", "-w", "-d", pgnode.dsn(server)])
    if out.returncode != 0:
        shutil.rmtree(target, ignore_errors=True)
        raise BackupError(f"pg_basebackup failed: {out.stderr.strip()}")
    counts_end = count_rows(dsn, APPEND_ONLY)
    finished = _server_now(dsn)
    label_text = (target / "backup_label").read_text()
    fields = dict(line.split(": ", 1) for line in label_text.splitlines() if ": " in line)
    start_lsn, start_wal = fields["START WAL LOCATION"].split(" (file ")
    manifest = json.loads((target / "backup_manifest").read_text())
    info = BackupInfo(
        label=label, started=iso(started), finished=iso(finished),
        timeline=int(fields["START TIMELINE"]), start_lsn=start_lsn,
        end_lsn=manifest["WAL-Ranges"][-1]["End-LSN"], start_wal=start_wal.rstrip(")"),
        bytes=sum(f["Size"] for f in manifest["Files"]),
        counts_start=counts_start, counts_end=counts_end)
    save(cfg, info)
    return info


# -- catalogue -----------------------------------------------------------------

def list_backups(cfg: Config) -> list[BackupInfo]:
    """Every catalogued backup, oldest first."""
    found = []
    for path in sorted((backup_dir(cfg) / "base").glob("*.json")):
        raw = json.loads(path.read_text())
        drill = raw.pop("drill", None)
        found.append(BackupInfo(**raw, drill=Drill(**drill) if drill else None))
    return found


def find(cfg: Config, label: str | None) -> BackupInfo:
    """The backup ``label``, or the newest one."""
    backups = list_backups(cfg)
    if not backups:
        raise BackupError("there is no backup: run 'rmiot backup create'")
    if label is None:
        return backups[-1]
    for info in backups:
        if info.label == label:
            return info
    raise BackupError(f"no backup {label!r} (see 'rmiot backup list')")


def save(cfg: Config, info: BackupInfo) -> None:
    path = backup_dir(cfg) / "base" / f"{info.label}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(info), indent=2) + "\n")
    os.replace(tmp, path)


# -- retention -----------------------------------------------------------------

def prune(cfg: Config, keep: int | None = None) -> list[str]:
    """Apply retention (see the module docstring); returns the labels removed."""
    keep = settings(cfg).keep if keep is None else keep
    if keep < 1:
        raise BackupError("keep at least one verified backup")
    backups = list_backups(cfg)
    verified = [b for b in backups if b.verified]
    if not verified:
        return []  # nothing is known to restore: remove nothing
    kept = verified[-keep:]
    removed = []
    base = backup_dir(cfg) / "base"
    for info in backups:
        pending = info.drill is None and info.label > verified[-1].label  # drill to come
        if info in kept or pending:
            continue
        shutil.rmtree(base / info.label, ignore_errors=True)
        (base / f"{info.label}.json").unlink(missing_ok=True)
        removed.append(info.label)
    out = localstate.run_as(localstate.service_user("postgres"), [
        str(cluster.PG_BIN / "pg_archivecleanup"), str(backup_dir(cfg) / "wal"),
        kept[0].start_wal])
    if out.returncode != 0:
        raise BackupError(f"pg_archivecleanup failed: {out.stderr.strip()}")
    return removed


# -- helpers -------------------------------------------------------------------

def show(server: cluster.Cluster, setting: str) -> str | None:
    """A running server's setting, or None when it does not answer."""
    try:
        with psycopg.connect(pgnode.dsn(server), autocommit=True) as conn:
            row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(setting))).fetchone()
    except psycopg.OperationalError:
        return None
    return str(row[0]) if row else None


def count_rows(dsn: str, tables: Iterable[str]) -> dict[str, int]:
    """Exact row counts of those of ``tables`` that exist."""
    counts = {}
    with psycopg.connect(dsn) as conn:
        for table in tables:
            if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() == (None,):
                continue
            row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                sql.Identifier(table))).fetchone()
            counts[table] = int(row[0]) if row else 0
    return counts


def _server_now(dsn: str) -> datetime:
    """The server's clock: the one commit times (and so restore targets) use."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT clock_timestamp()").fetchone()
    assert row is not None and isinstance(row[0], datetime)
    return row[0]


def iso(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
