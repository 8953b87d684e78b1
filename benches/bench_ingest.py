"""make bench-ingest: the ingestion figures of issue 3, all in one run.

1. decode figures: benches/bench_decode.py (compiled and pure twins);
2. e2e: the ingest service (``rmiot.ingest.worker``, one process per core on
   one port, as the platform runs it) against
   a load generator (benches/loadgen.py, another process) over loopback TCP,
   many device connections, ACK_REQ on; points counted once acked OK, i.e.
   committed. The server's own user+sys CPU and peak RSS come from /proc;
3. the database's own ceilings, same run, same machine: raw binary COPY of the
   same rows into the same (emptied) table, and raw binary COPY of the same
   points into a naive narrow table (ts, device_id, metric, value) with an
   index on (device_id, metric, ts DESC) — the layout most platforms use.
   Both use as many connections as all the ingest processes' writers together,
   and batches of the pipeline's size.

Runs in its own database (rmiot_bench), created afresh. Last line: one JSON
object with every figure.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from common import cpu_s, fresh_database, postgres_cpu_s  # benches/common.py

from rmiot import db
from rmiot.core_ext import (
    FLAG_ACK_REQ,
    IMPL,
    Frame,
    FrameDecoder,
    copy_header,
    copy_trailer,
    encode_frame,
)
from rmiot.deploy import cluster
from rmiot.registry import store
from rmiot.tenants import store as tenants_store

HERE = Path(__file__).resolve().parent
SECONDS = int(os.environ.get("BENCH_SECONDS", "15"))
DEVICES = int(os.environ.get("BENCH_DEVICES", "200"))
SERVERS = int(os.environ.get("BENCH_SERVERS", str(os.cpu_count() or 1)))
FIELDS = 8
NAIVE_SQL = """
DROP TABLE IF EXISTS naive_telemetry;
CREATE TABLE naive_telemetry (ts timestamptz NOT NULL, device_id bigint NOT NULL,
                              metric integer NOT NULL, value float8 NOT NULL);
CREATE INDEX naive_device_metric_ts ON naive_telemetry (device_id, metric, ts DESC);
"""
PG_EPOCH_US = 946_684_800_000_000


def say(msg: str) -> None:
    print(msg, flush=True)


def prepare_database() -> tuple[Any, str, bool]:
    """A fresh rmiot_bench database; True when the private cluster was started here."""
    return fresh_database("rmiot_bench")


def register(dsn: str) -> tuple[int, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        region = tenants_store.create_tenant(conn, "bench-region", "Bench region", "region")
        hospital = tenants_store.create_tenant(conn, "bench-hospital", "Bench hospital",
                                               "hospital", region)
        first = store.register_device(conn, hospital, serial_no="bench-0")
        for i in range(1, DEVICES):
            store.register_device(conn, hospital, serial_no=f"bench-{i}")
    return hospital, first


def proc_peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_e2e(cfg: Any, tenant: int, first_device: int) -> dict[str, float]:
    """SERVERS ingest processes share one port (SO_REUSEPORT: the kernel spreads
    the connections), as the platform runs one per core; their CPU and memory
    are summed."""
    keys = tempfile.mkdtemp(prefix="rmiot-bench-keys-")
    port = free_port()
    env = {
        **os.environ,
        "RMIOT_DATABASE_NAME": "rmiot_bench",
        "RMIOT_INGEST_TCP_PORT": str(port),
        "RMIOT_SECURITY_KEYRING_DIR": keys,
        "RMIOT_LOG_LEVEL": "warning",
        # A few hundred synthetic devices stand in for thousands: lift the per-device limit.
        "RMIOT_INGEST_DEVICE_RATE_PER_S": "1000000",
    }
    servers = [subprocess.Popen([sys.executable, "-m", "rmiot.ingest.worker"], env=env,
                                stdout=subprocess.PIPE, text=True) for _ in range(SERVERS)]
    try:
        for server in servers:
            assert server.stdout is not None
            line = server.stdout.readline()
            if not line.startswith("PORT "):
                raise RuntimeError(f"ingest server did not start: {line!r}")
        cpu0 = sum(cpu_s(s.pid) for s in servers)
        pg0 = postgres_cpu_s()
        out = subprocess.run(
            [sys.executable, str(HERE / "loadgen.py"), "--port", str(port),
             "--tenant", str(tenant), "--first-device", str(first_device),
             "--devices", str(DEVICES), "--seconds", str(SECONDS), "--fields", str(FIELDS),
             "--frames-per-device", str(max(1000, 3_000_000 // DEVICES))],
            capture_output=True, text=True, check=True, env=env)
        cpu = sum(cpu_s(s.pid) for s in servers) - cpu0
        pg_cpu = postgres_cpu_s() - pg0
        rss = sum(proc_peak_rss_mb(s.pid) for s in servers)
        gen = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        for server in servers:
            server.terminate()
            server.wait(30)
            if server.stdout:
                server.stdout.close()
    say(f"e2e: {gen}")
    points = gen["points_ok"]
    return {
        "e2e_points_per_s": points / gen["seconds"],
        "server_cpu_s_per_mpoints": cpu / (points / 1e6) if points else float("inf"),
        "server_peak_rss_mb": rss,
        "server_processes": SERVERS,
        "e2e_unacked_at_end": gen["unacked"],
        # Where the two cores went during the e2e run (CPU seconds per wall second).
        "e2e_cores_server": cpu / gen["seconds"],
        "e2e_cores_loadgen": gen["cpu_s"] / gen["seconds"],
        "e2e_cores_postgres": pg_cpu / gen["seconds"],
    }


def sample_frames(tenant: int, device: int, count: int) -> list[Frame]:
    """The rows the pipeline writes, encoded by the compiled decoder."""
    start = time.time_ns() // 1000 - 3_600_000_000
    values = [
        (m + 1, 1, v) for m, v in enumerate((72.0, 98.0, 16.0, 36.7, 120.0, 80.0, 93.3, 71.0))
    ]
    dec = FrameDecoder()
    out: list[Frame] = []
    per_device = 1000
    for i in range(count):
        dev = device + i // per_device
        raw = encode_frame(1, tenant, dev, i % per_device, start + i, values, flags=FLAG_ACK_REQ)
        out.extend(ev for ev in dec.feed(raw) if isinstance(ev, Frame))
    return out


def parallel_copy(dsn: str, sql: str, chunks: list[bytes], writers: int) -> float:
    """COPY each chunk in its own transaction over ``writers`` connections; seconds."""
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(writers)]
    errors: list[BaseException] = []

    def work(conn: psycopg.Connection[Any], part: list[bytes]) -> None:
        try:
            for chunk in part:
                with conn.transaction(), conn.cursor().copy(sql) as copy:
                    copy.write(chunk)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=work, args=(c, chunks[i::writers])) for i, c in enumerate(conns)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for c in conns:
        c.close()
    if errors:
        raise errors[0]
    return elapsed


def run_copy_ceilings(cfg: Any, tenant: int, rows: int) -> dict[str, float]:
    admin = db.admin_dsn(cfg)
    batch = cfg.ingest.batch_max_rows
    writers = cfg.ingest.writers * SERVERS  # the same connections the pipeline had
    frames = sample_frames(tenant, 10_000_000, rows)
    wide = [
        b"".join([copy_header(), *(f.copy_row for f in frames[i : i + batch]), copy_trailer()])
        for i in range(0, len(frames), batch)
    ]
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("TRUNCATE telemetry")
        conn.execute(NAIVE_SQL)
        conn.execute("CHECKPOINT")
    wide_s = parallel_copy(admin, "COPY telemetry FROM STDIN (FORMAT BINARY)", wide, writers)
    say(f"copy same table: {len(frames)} rows in {wide_s:.2f} s")

    narrow_rows = struct.Struct("!hiqiqiiid")  # 4 fields: ts, device_id, metric, value
    naive: list[bytes] = []
    per_chunk = batch * FIELDS  # the same points per COPY as the pipeline's batch
    buf = bytearray()
    n = 0
    for f in frames:
        ts = f.ts_us - PG_EPOCH_US
        for metric, _vt, value in f.fields():
            buf += narrow_rows.pack(4, 8, ts, 8, f.device, 4, metric, 8, float(value))  # type: ignore[arg-type]
            n += 1
            if n == per_chunk:
                naive.append(copy_header() + bytes(buf) + copy_trailer())
                buf.clear()
                n = 0
    if buf:
        naive.append(copy_header() + bytes(buf) + copy_trailer())
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("CHECKPOINT")
    naive_s = parallel_copy(
        admin, "COPY naive_telemetry FROM STDIN (FORMAT BINARY)", naive, writers
    )
    say(f"copy naive table: {len(frames) * FIELDS} rows in {naive_s:.2f} s")
    return {
        "copy_same_table_points_per_s": len(frames) * FIELDS / wide_s,
        "copy_naive_rows_per_s": len(frames) * FIELDS / naive_s,
    }


def run_decode() -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, str(HERE / "bench_decode.py")], capture_output=True, text=True, check=True
    )
    sys.stdout.write(out.stdout)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    return {k: figures[k] for k in ("decode_c_fps", "decode_py_fps", "decode_hmac_c_fps")}


def main() -> None:
    if IMPL != "c":
        raise SystemExit(
            "bench-ingest measures the compiled decoder: build it (make) and unset RMIOT_PURE"
        )
    result: dict[str, float] = {}
    result.update(run_decode())
    cfg, dsn, started = prepare_database()
    try:
        tenant, first = register(dsn)
        say(f"e2e: {DEVICES} device connections, {SECONDS} s, {FIELDS}-field frames, ACK_REQ")
        result.update(run_e2e(cfg, tenant, first))
        result.update(run_copy_ceilings(cfg, tenant, rows=600_000))
    finally:
        if started:
            cluster.Cluster(cfg).stop()
    result["e2e_over_copy_naive"] = result["e2e_points_per_s"] / result["copy_naive_rows_per_s"]
    result["e2e_over_copy_same_table"] = (
        result["e2e_points_per_s"] / result["copy_same_table_points_per_s"]
    )
    print(
        json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}),
        flush=True,
    )


if __name__ == "__main__":
    main()
