"""make bench-durability: the durability figures of issue 12, in one run, on
clusters of its own (a temporary data_dir and free ports; the platform's
cluster is never touched).

1. ``rpo_acked_points_lost``, ``rto_s``: BENCH_DEVICES devices stream 8-vital
   frames with ACK_REQ through a real ingest process (``rmiot.ingest.worker``)
   whose DSN lists the primary and its synchronous replica. After
   BENCH_SECONDS the primary's postmaster is killed with SIGKILL; the
   single-machine watchdog (``rmiot db failover --watch``, its default 3 s
   grace) notices and promotes the replica; the ingest process reconnects on
   its own. Lost = points whose frames a device holds an OK/DUPLICATE ack for
   but the new primary does not have. RTO = from the kill to the first commit
   on the new primary (detection, promotion and the platform's reconnect
   included).
2. ``async_rpo_ms``: the old primary rebuilt as an asynchronous standby of the
   new one; under the same load for BENCH_SECONDS, the standby's flush lag
   (``pg_stat_replication.flush_lag``: how much acknowledged data a failover
   at that instant would lose) sampled every 50 ms; p99.
3. ``restore_s_per_gb``: the database grown to BENCH_RESTORE_MB with
   telemetry, a base backup, then a point-in-time restore to "now" into a new
   cluster (copy, WAL replay, promotion): seconds per GB (10^9 bytes) of backup.

Last line: one JSON object with every figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from rmiot import db
from rmiot.config import Config, load
from rmiot.core_ext import FLAG_ACK_REQ, encode_frame
from rmiot.deploy import backup, cluster, migrate, pgnode, replica, restore, topology
from rmiot.ingest.client import RmfClient
from rmiot.registry import store
from rmiot.tenants import store as tenants_store

DEVICES = int(os.environ.get("BENCH_DEVICES", "20"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "8"))
RESTORE_MB = int(os.environ.get("BENCH_RESTORE_MB", "512"))
POINTS = 8
VITALS = [(m, 1, v) for m, v in enumerate((72.0, 98.0, 16.0, 36.7, 120.0, 80.0, 93.3, 71.0), 1)]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- the clusters -----------------------------------------------------------------

def new_site() -> Config:
    home = Path(tempfile.mkdtemp(prefix="rmiot-bench-durability-"))
    home.chmod(0o755)
    cfg = load()
    cfg = dataclasses.replace(
        cfg, platform=dataclasses.replace(cfg.platform, data_dir=str(home)),
        database=dataclasses.replace(cfg.database, port=backup.free_port(),
                                     name="rmiot_bench_durability", shared_buffers="512MB"),
        security=dataclasses.replace(cfg.security, keyring_dir=str(home / "keys"),
                                     audit_checkpoints=str(home / "audit.jsonl")))
    primary = cluster.Cluster(cfg)
    primary.init()
    backup.enable(cfg)
    primary.start()
    migrate.migrate(db.admin_dsn(cfg))
    return cfg


def remove_site(cfg: Config) -> None:
    for data in cfg.data_dir.glob("*/data"):
        pgnode.stop_now(pgnode.Node(cfg, data.parent.name))
    shutil.rmtree(cfg.data_dir, ignore_errors=True)


def platform_dsn(cfg: Config, user: str = db.APP_ROLE) -> str:
    return make_conninfo(**topology.endpoints(cfg), dbname=cfg.database.name, user=user,
                         connect_timeout=2)


def worker(cfg: Config, port: int) -> subprocess.Popen[str]:
    env = {**os.environ, "RMIOT_DSN": platform_dsn(cfg),
           "RMIOT_PLATFORM_DATA_DIR": str(cfg.data_dir),
           "RMIOT_SECURITY_KEYRING_DIR": str(cfg.keyring_dir),
           "RMIOT_INGEST_TCP_PORT": str(port), "RMIOT_INGEST_DEVICE_RATE_PER_S": "1000000",
           "RMIOT_LOG_LEVEL": "error"}
    proc = subprocess.Popen([sys.executable, "-m", "rmiot.ingest.worker"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None and proc.stdout.readline().startswith("PORT ")
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout:
        proc.stdout.close()


# -- devices -----------------------------------------------------------------------

class Fleet:
    """Devices streaming frames with ACK_REQ until told to stop."""

    def __init__(self, port: int, tenant: int, devices: list[int]) -> None:
        self.tenant = tenant
        self.devices = devices
        self.clients = [RmfClient("127.0.0.1", port, keep_acks=False) for _ in devices]
        self.next_seq = dict.fromkeys(devices, 0)
        self.sending = True
        self.tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for c in self.clients:
            await c.connect()
        self.tasks = [asyncio.create_task(self._send(c, d))
                      for c, d in zip(self.clients, self.devices, strict=True)]

    async def _send(self, client: RmfClient, device: int) -> None:
        while self.sending:
            for _ in range(20):
                seq = self.next_seq[device]
                self.next_seq[device] = seq + 1
                frame = encode_frame(1, self.tenant, device, seq, time.time_ns() // 1000,
                                     VITALS, flags=FLAG_ACK_REQ)
                client.send(frame, device, seq)
            with contextlib.suppress(OSError):
                await client.drain()
            await asyncio.sleep(0.02)

    def acked(self) -> set[tuple[int, int]]:
        return set().union(*(c.acked for c in self.clients))

    async def finish(self, timeout: float = 120) -> bool:
        self.sending = False
        await asyncio.gather(*self.tasks)
        ok = True
        for c in self.clients:
            await c.resend_unacked()
            ok = await c.wait_acked(timeout) and ok
        for c in self.clients:
            await c.close()
        return ok


def stored(cfg: Config) -> dict[tuple[int, int], int]:
    with psycopg.connect(platform_dsn(cfg)) as conn:
        rows = conn.execute("SELECT device_id, seq, count(*) FROM telemetry GROUP BY 1, 2")
        return {(d, s): n for d, s, n in rows}


# -- 1. sync: kill, watchdog failover, count -------------------------------------------

async def sync_failover(cfg: Config, tenant: int, devices: list[int]) -> dict[str, Any]:
    replica.create(cfg, sync=True)
    port = backup.free_port()
    proc = worker(cfg, port)
    fleet = Fleet(port, tenant, devices)
    halt = threading.Event()
    outcome: list[replica.FailoverResult | None] = []
    watchdog = threading.Thread(target=lambda: outcome.append(replica.watch(cfg, stop=halt)))
    try:
        await fleet.start()
        watchdog.start()
        await asyncio.sleep(SECONDS)
        primary = replica.server_of(cfg, topology.load(cfg).primary)
        pid = pgnode.postmaster_pid(primary)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        acked_at_kill = len(fleet.acked())
        standby = replica.server_of(cfg, topology.load(cfg).standbys[0])
        rto = await asyncio.to_thread(first_commit_after_promotion, standby, cfg, killed)
        await asyncio.sleep(2)
        drained = await fleet.finish()
    finally:
        halt.set()
        watchdog.join(60)
        stop(proc)
    acked = fleet.acked()
    rows = stored(cfg)
    lost = acked - set(rows)
    say(f"sync: {acked_at_kill} frames acked before the kill, {len(acked)} in all; "
        f"failover {outcome[0].seconds if outcome and outcome[0] else float('nan'):.2f} s; "
        f"first commit on the new primary {rto:.2f} s after the kill; lost {len(lost)}")
    return {"rpo_acked_points_lost": len(lost) * POINTS, "rto_s": round(rto, 3),
            "sync_frames_acked": len(acked), "sync_all_acked": drained,
            "sync_duplicates": sum(1 for n in rows.values() if n > 1),
            "failover_s": round(outcome[0].seconds, 3) if outcome and outcome[0] else None}


def first_commit_after_promotion(standby: cluster.Cluster, cfg: Config, since: float) -> float:
    """Seconds from ``since`` to the first row committed on ``standby`` once promoted."""
    dsn = pgnode.dsn(standby, cfg.database.name)
    baseline: int | None = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(psycopg.OperationalError), \
                psycopg.connect(dsn, autocommit=True) as conn:
            while time.monotonic() < deadline:
                row = conn.execute("SELECT pg_is_in_recovery(), count(*) FROM telemetry"
                                   ).fetchone()
                assert row is not None
                if not row[0]:
                    if baseline is None:
                        baseline = int(row[1])
                    elif int(row[1]) > baseline:
                        return time.monotonic() - since
                time.sleep(0.02)
    raise RuntimeError("no commit on the new primary within 120 s")


# -- 2. async lag ------------------------------------------------------------------------

async def async_lag(cfg: Config, tenant: int, devices: list[int]) -> dict[str, Any]:
    replica.create(cfg, sync=False, rebuild=True)
    primary = replica.server_of(cfg, topology.load(cfg).primary)
    port = backup.free_port()
    proc = worker(cfg, port)
    fleet = Fleet(port, tenant, devices)
    for d in devices:  # continue after what phase 1 stored
        fleet.next_seq[d] = 10_000_000
    samples: list[float] = []
    halt = threading.Event()

    def sample() -> None:
        with psycopg.connect(pgnode.dsn(primary), autocommit=True) as conn:
            while not halt.is_set():
                row = conn.execute("SELECT coalesce(extract(epoch FROM flush_lag), 0) * 1000 "
                                   "FROM pg_stat_replication").fetchone()
                if row is not None:
                    samples.append(float(row[0]))
                halt.wait(0.05)

    sampler = threading.Thread(target=sample)
    try:
        await fleet.start()
        await asyncio.sleep(1)
        sampler.start()
        await asyncio.sleep(SECONDS)
        halt.set()
        sampler.join()
        await fleet.finish()
    finally:
        halt.set()
        stop(proc)
    samples.sort()
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))] if samples else float("nan")
    say(f"async: flush lag over {len(samples)} samples: median "
        f"{statistics.median(samples):.1f} ms, p99 {p99:.1f} ms, max {samples[-1]:.1f} ms")
    return {"async_rpo_ms": round(p99, 2), "async_lag_max_ms": round(samples[-1], 2),
            "async_frames_acked": len(fleet.acked())}


# -- 3. restore speed --------------------------------------------------------------------

def restore_speed(cfg: Config, tenant: int, device: int) -> dict[str, Any]:
    with psycopg.connect(platform_dsn(cfg, db.SUPERUSER), autocommit=True) as conn:
        first = 100_000_000
        while True:
            size = conn.execute("SELECT pg_database_size(current_database())").fetchone()
            if size is None or size[0] >= RESTORE_MB * 1_000_000:
                break
            conn.execute(
                "INSERT INTO telemetry (ts, device_id, tenant_id, seq, kind, metrics, vals) "
                "SELECT now() - make_interval(secs => s / 100.0), %s, %s, s, 1, "
                "'{1,2,3,4,5,6,7,8}', '{72,98,16,36.7,120,80,93.3,71}' "
                "FROM generate_series(%s::bigint, %s::bigint) s",
                (device, tenant, first, first + 499_999))
            first += 500_000
    info = backup.create(cfg)
    began = time.monotonic()
    done = restore.point_in_time(cfg, datetime.now(UTC))
    seconds = time.monotonic() - began
    pgnode.remove(done.server)
    gb = info.bytes / 1e9
    say(f"restore: {gb:.2f} GB backup restored to a point in time in {seconds:.1f} s")
    return {"restore_s_per_gb": round(seconds / gb, 2), "restore_gb": round(gb, 3),
            "restore_s": round(seconds, 2)}


async def main() -> dict[str, Any]:
    cfg = new_site()
    try:
        with psycopg.connect(platform_dsn(cfg), autocommit=True) as conn:
            region = tenants_store.create_tenant(conn, "bench-r", "Region", "region")
            tenant = tenants_store.create_tenant(conn, "bench-h", "Hospital", "hospital", region)
            devices = [store.register_device(conn, tenant) for _ in range(DEVICES)]
        figures: dict[str, Any] = {"devices": DEVICES, "load_s": SECONDS}
        figures |= await sync_failover(cfg, tenant, devices)
        figures |= await async_lag(cfg, tenant, devices)
        figures |= await asyncio.to_thread(restore_speed, cfg, tenant, devices[0])
        return figures
    finally:
        remove_site(cfg)


if __name__ == "__main__":
    result = asyncio.run(main())
    print(json.dumps(result))
