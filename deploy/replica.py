"""A streaming replica of the private cluster, and failover to it:
``rmiot db replica create|status|drop|mode`` and ``rmiot db failover``.

Synchronous or asynchronous (``database.replica_sync``, or ``mode``):

- **sync** (default): the primary names the standby in
  ``synchronous_standby_names`` and keeps ``synchronous_commit = on``, so a
  COMMIT returns — and the platform acks a device — only once the standby has
  flushed the WAL too: an ack means "on two machines' disks", and a failover
  loses nothing acknowledged. The price: each commit waits one round trip and
  the standby's fsync, and while the standby is away commits on the primary
  *wait* (ingest stops reading from devices — backpressure — and loses
  nothing) until it is back, the replica is dropped, or the mode is switched
  to async. Availability is traded for zero RPO.
- **async**: a COMMIT returns after the primary's own flush; the standby
  follows within its lag (``async_rpo_ms`` of ``make bench-durability``). A
  failover loses what the standby had not received — which devices may hold
  acks for — and a standby outage never stops writes.

``create``: a replication role (``rmiot_replication``) and a physical slot on
the primary (it keeps the WAL the standby has not received, at most
``max_slot_wal_keep_size`` so a standby gone for good cannot fill the disk),
``pg_basebackup -R`` over the primary's unix socket into
``<data_dir>/pg-replica``, the standby's own settings (no synchronous standby
of its own; it archives too when archiving is on; ``hot_standby_feedback``
so long read queries on it are not cancelled), start it, wait until it
streams — and only then, when sync, name it in ``synchronous_standby_names``,
so writes never wait for a standby that is not there yet.

``failover``: fence the old primary, promote the standby, record the new
topology (``topology``). Fencing: a running old primary is stopped (fast, so
its standby receives all WAL it wrote, when that finishes within 10 s; at
once otherwise), and its data directory gets ``standby.signal``, so a restart
brings it back read-only, never as a second primary; it is recorded
``fenced`` and leaves every DSN. It holds nothing acknowledged that the new
primary lacks (with sync), and ``create --rebuild`` turns it into the new
standby. Until then the new primary runs without a standby: writes go on,
unprotected. The DSNs list every node with ``target_session_attrs=read-write``
(see ``topology``), so the platform's writers, views and pools reconnect to
the promoted node on their own; devices keep their TCP connections (ingest
holds their frames and acks after the commit on the new primary) or, if
their process died, reconnect and retransmit.

``watch``: the single-machine watchdog (``failover --watch``): probes the
primary every ``interval_s``; when it has not answered for ``grace_s`` and the
standby does, it fails over — unless the primary was shut down cleanly
(``rmiot db stop`` for maintenance leaves no ``postmaster.pid``; a crash,
a kill or a hang does). Across machines use Patroni or an equivalent:
fencing a remote primary needs consensus a lone watchdog does not have.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from rmiot import db
from rmiot.config import Config
from rmiot.deploy import backup, cluster, localstate, pgnode, topology
from rmiot.deploy.durability import settings
from rmiot.deploy.topology import FENCED, PRIMARY, STANDBY, NodeRecord

REPLICATION_ROLE = "rmiot_replication"
REPLICA_NAME = "pg-replica"
MAX_SLOT_WAL_KEEP = "20GB"


class ReplicaError(Exception):
    """A replica task could not be done; the message says why."""


@dataclass(frozen=True)
class FailoverResult:
    old_primary: str
    new_primary: str
    seconds: float


@dataclass
class NodeStatus:
    name: str
    port: int
    role: str
    running: bool
    in_recovery: bool | None
    detail: dict[str, Any] = field(default_factory=dict)


def standby_name(node: str) -> str:
    """The standby's application_name and slot name: ``rmiot_pg_replica``."""
    return "rmiot_" + node.replace("-", "_")


def server_of(cfg: Config, rec: NodeRecord) -> cluster.Cluster:
    return pgnode.node_for(cfg, rec.name, rec.port)


# -- create --------------------------------------------------------------------

def create(cfg: Config, sync: bool | None = None, port: int | None = None,
           rebuild: bool = False, timeout_s: float = 120) -> NodeRecord:
    """Create the standby and start it streaming (see the module docstring)."""
    sync = settings(cfg).replica_sync if sync is None else sync
    topo = topology.load(cfg)
    if topo.standbys:
        raise ReplicaError(f"{topo.standbys[0].name} is the replica already "
                           "('rmiot db replica drop' first)")
    source = server_of(cfg, topo.primary)
    if not source.running():
        raise ReplicaError(f"the primary {topo.primary.name} is not running")
    fenced = [n for n in topo.nodes if n.role == FENCED]
    if fenced and not rebuild:
        raise ReplicaError(f"{fenced[0].name} is a former primary: rebuild it as the replica "
                           "with --rebuild (whatever it holds beyond the new primary is "
                           "discarded)")
    rec = NodeRecord(fenced[0].name, fenced[0].port, STANDBY, sync) if fenced else \
        NodeRecord(REPLICA_NAME, port or settings(cfg).replica_port, STANDBY, sync)
    node = server_of(cfg, rec)
    if fenced:
        pgnode.stop_now(node)
        localstate.run_as(node.user, ["rm", "-rf", str(node.data)])
    slot = standby_name(rec.name)
    with psycopg.connect(pgnode.dsn(source), autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s",
                            (REPLICATION_ROLE,)).fetchone():
            conn.execute(sql.SQL("CREATE ROLE {} REPLICATION LOGIN").format(
                sql.Identifier(REPLICATION_ROLE)))
        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                     "WHERE slot_name = %s AND NOT active", (slot,))
    root = localstate.state_dir(cfg, rec.name, node.user)
    if (root / "data").exists():
        raise ReplicaError(f"{root / 'data'} exists: not overwriting it")
    try:
        _copy_and_start(cfg, source, node, slot, timeout_s)
    except (ReplicaError, cluster.ClusterError, psycopg.Error):
        # Leave nothing half made: a slot nobody reads would keep WAL forever.
        pgnode.stop_now(node)
        localstate.run_as(node.user, ["rm", "-rf", str(node.data)])
        with psycopg.connect(pgnode.dsn(source), autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE slot_name = %s AND NOT active", (slot,))
        raise
    pgnode.update_settings(source, {"max_slot_wal_keep_size": MAX_SLOT_WAL_KEEP})
    topo.nodes = [n for n in topo.nodes if n.name != rec.name] + [rec]
    topology.save(cfg, topo)
    set_mode(cfg, sync, timeout_s)
    return rec


def _copy_and_start(cfg: Config, source: cluster.Cluster, node: cluster.Cluster, slot: str,
                    timeout_s: float) -> None:
    out = localstate.run_as(node.user, [
        str(cluster.PG_BIN / "pg_basebackup"), "-D", str(node.data), "-Fp", "-X", "stream",
        "-c", "fast", "-C", "-S", slot, "-R", "-w",
        "-d", pgnode.dsn(source, user=REPLICATION_ROLE, application_name=slot)])
    if out.returncode != 0:
        raise ReplicaError(f"pg_basebackup failed: {out.stderr.strip()}")
    changes: dict[str, pgnode.Setting | None] = {
        "synchronous_standby_names": None, "hot_standby": True, "hot_standby_feedback": True}
    if backup.archiving(source):
        changes.update(backup.archive_settings(cfg, standby=True))
    pgnode.update_settings(node, changes)
    node.start()
    _wait_state(source, slot, "streaming", timeout_s)


def set_mode(cfg: Config, sync: bool, timeout_s: float = 60) -> None:
    """Make the replica synchronous or asynchronous now (see the module docstring)."""
    topo = topology.load(cfg)
    if not topo.standbys:
        raise ReplicaError("there is no replica")
    source = server_of(cfg, topo.primary)
    names = ", ".join(standby_name(n.name) for n in topo.standbys)
    pgnode.update_settings(source, {"synchronous_standby_names": f"FIRST 1 ({names})"
                                    if sync else None})
    pgnode.reload(source)
    for rec in topo.standbys:
        rec.sync = sync
        _wait_state(source, standby_name(rec.name), "sync" if sync else "async", timeout_s,
                    column="sync_state")
    topology.save(cfg, topo)


def _wait_state(source: cluster.Cluster, name: str, state: str, timeout_s: float,
                column: str = "state") -> None:
    query = sql.SQL("SELECT {} FROM pg_stat_replication WHERE application_name = %s").format(
        sql.Identifier(column))

    def reached() -> bool:
        with psycopg.connect(pgnode.dsn(source), autocommit=True) as conn:
            row = conn.execute(query, (name,)).fetchone()
        return bool(row and row[0] == state)

    pgnode.wait_until(reached, timeout_s, f"standby {name} to be {state}", 0.1)


# -- status, drop, start -------------------------------------------------------

def status(cfg: Config) -> list[NodeStatus]:
    """What each recorded node is doing, with replication figures."""
    found = []
    for rec in topology.load(cfg).nodes:
        server = server_of(cfg, rec)
        running = server.running()
        recovery = pgnode.in_recovery(server) if running else None
        item = NodeStatus(rec.name, rec.port, rec.role, running, recovery)
        if recovery is False:
            item.detail["standbys"] = _replication_rows(server)
        elif recovery is True:
            with psycopg.connect(pgnode.dsn(server), autocommit=True) as conn:
                item.detail["staleness_s"] = staleness_s(conn)
        found.append(item)
    return found


def _replication_rows(server: cluster.Cluster) -> list[dict[str, Any]]:
    with psycopg.connect(pgnode.dsn(server), autocommit=True) as conn:
        cur = conn.execute(
            "SELECT application_name, state, sync_state, "
            "pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)::bigint AS lag_bytes, "
            "extract(epoch FROM flush_lag)::float8 AS flush_lag_s, "
            "extract(epoch FROM replay_lag)::float8 AS replay_lag_s "
            "FROM pg_stat_replication ORDER BY 1")
        names = [c.name for c in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def staleness_s(conn: psycopg.Connection[Any]) -> float:
    """How far behind its primary the server at ``conn`` may be, in seconds:
    0 for a primary or a standby streaming with everything received replayed;
    else the age of the last transaction it replayed (for read routing with
    bounded staleness)."""
    row = conn.execute(db.STALENESS_SQL).fetchone()
    return float(row[0]) if row else float("inf")


def drop(cfg: Config) -> list[str]:
    """Remove the replica: the primary stops waiting for it first, then it is
    stopped, its slot dropped and its directory deleted. Returns the names."""
    topo = topology.load(cfg)
    if not topo.standbys:
        return []
    source = server_of(cfg, topo.primary)
    pgnode.update_settings(source, {"synchronous_standby_names": None})
    if source.running():
        pgnode.reload(source)
    dropped = []
    for rec in topo.standbys:
        server = server_of(cfg, rec)
        pgnode.stop_now(server)
        if rec.name == "pg":  # its root keeps the application role's password file
            localstate.run_as(server.user, ["rm", "-rf", str(server.data)])
        else:
            pgnode.remove(server)
        if source.running():
            with psycopg.connect(pgnode.dsn(source), autocommit=True) as conn:
                conn.execute("SELECT pg_drop_replication_slot(slot_name) "
                             "FROM pg_replication_slots WHERE slot_name = %s",
                             (standby_name(rec.name),))
        dropped.append(rec.name)
    topo.nodes = [n for n in topo.nodes if n.role != STANDBY]
    topology.save(cfg, topo)
    return dropped


def start_nodes(cfg: Config) -> list[str]:
    """Start every recorded node but ``pg`` (``rmiot db start`` starts that one)
    and the fenced ones; returns the names started."""
    started = []
    for rec in topology.load(cfg).nodes:
        if rec.name != "pg" and rec.role != FENCED and server_of(cfg, rec).start():
            started.append(rec.name)
    return started


# -- failover ------------------------------------------------------------------

def failover(cfg: Config, timeout_s: float = 30) -> FailoverResult:
    """Fence the primary and promote the replica (see the module docstring)."""
    began = time.monotonic()
    topo = topology.load(cfg)
    if not topo.standbys:
        raise ReplicaError("there is no replica to fail over to")
    old, new = topo.primary, topo.standbys[0]
    target = server_of(cfg, new)
    if pgnode.in_recovery(target) is not True:
        raise ReplicaError(f"the replica {new.name} is not answering as a standby: "
                           "nothing to promote")
    fence(server_of(cfg, old))
    pgnode.promote(target, int(timeout_s))
    pgnode.wait_until(lambda: pgnode.in_recovery(target) is False, timeout_s,
                      f"{new.name} to accept writes", 0.05)
    old.role, old.sync = FENCED, False
    new.role, new.sync = PRIMARY, False
    topology.save(cfg, topo)
    return FailoverResult(old.name, new.name, time.monotonic() - began)


def fence(server: cluster.Cluster) -> None:
    """Make sure ``server`` takes no more writes, now or after a restart."""
    pgnode.fence_stop(server)
    if server.data.is_dir():
        marker = server.data / "standby.signal"
        marker.touch()
        localstate.chown(server.user, marker)


def stopped_on_purpose(server: cluster.Cluster) -> bool:
    """True when the server was shut down cleanly (``rmiot db stop``): its data
    directory is there without a postmaster.pid, which a crash leaves behind."""
    return server.data.is_dir() and not (server.data / "postmaster.pid").exists()


def watch(cfg: Config, grace_s: float = 3.0, interval_s: float = 0.2,
          stop: threading.Event | None = None) -> FailoverResult | None:
    """Fail over once the primary has not answered for ``grace_s`` (see the
    module docstring); returns its result, or None when ``stop`` was set.
    A primary stopped on purpose is waited for, not failed over."""
    stop = stop or threading.Event()
    last_ok = time.monotonic()
    while not stop.is_set():
        topo = topology.load(cfg)
        if not topo.standbys:
            raise ReplicaError("there is no replica to fail over to")
        server = server_of(cfg, topo.primary)
        if pgnode.in_recovery(server) is False or stopped_on_purpose(server):
            last_ok = time.monotonic()
        elif time.monotonic() - last_ok >= grace_s:
            return failover(cfg)
        stop.wait(interval_s)
    return None
