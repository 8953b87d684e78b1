"""make bench-ingest: the ingestion figures of issue 3, all in one run.

1. decode figures: benches/bench_decode.py (compiled and pure twins);
2. e2e: the ingest server (benches/ingest_server.py, its own process) against
   a load generator (benches/loadgen.py, another process) over loopback TCP,
   many device connections, ACK_REQ on; points counted once acked OK, i.e.
   committed. The server's own user+sys CPU and peak RSS come from /proc;
3. the database's own ceilings, same run, same machine: raw binary COPY of the
   same rows into the same (emptied) table, and raw binary COPY of the same
   points into a naive narrow table (ts, device_id, metric, value) with an
   index on (device_id, metric, ts DESC) — the layout most platforms use.
   Both use as many connections as the server has writers, and batches of its
   size.

Runs in its own database (rmiot_bench), created afresh. Last line: one JSON
object with every figure.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from rmiot import db
from rmiot.config import load
from rmiot.core_ext import (
    FLAG_ACK_REQ,
    IMPL,
    Frame,
    FrameDecoder,
    copy_header,
    copy_trailer,
    encode_frame,
)
from rmiot.deploy import cluster, migrate
from rmiot.registry import store

HERE = Path(__file__).resolve().parent
SECONDS = int(os.environ.get("BENCH_SECONDS", "15"))
DEVICES = int(os.environ.get("BENCH_DEVICES", "200"))
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
    cfg = load()
    cfg = dataclasses.replace(cfg, database=dataclasses.replace(cfg.database, name="rmiot_bench"))
    started = False
    if cfg.database.private:
        pg = cluster.Cluster(cfg)
        started = pg.start()
        pg.drop_database("rmiot_bench")
        pg.ensure_database()
    migrate.migrate(db.admin_dsn(cfg))
    return cfg, db.app_dsn(cfg), started


def register(dsn: str) -> tuple[int, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        region = store.create_tenant(conn, "bench-region", "Bench region", "region")
        hospital = store.create_tenant(conn, "bench-hospital", "Bench hospital", "hospital", region)
        first = store.register_device(conn, hospital, serial_no="bench-0")
        for i in range(1, DEVICES):
            store.register_device(conn, hospital, serial_no=f"bench-{i}")
    return hospital, first


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_e2e(cfg: Any, tenant: int, first_device: int) -> dict[str, float]:
    keys = tempfile.mkdtemp(prefix="rmiot-bench-keys-")
    env = {
        **os.environ,
        "RMIOT_DATABASE_NAME": "rmiot_bench",
        "RMIOT_INGEST_TCP_PORT": "0",
        "RMIOT_SECURITY_KEYRING_DIR": keys,
        "RMIOT_LOG_LEVEL": "warning",
    }
    server = subprocess.Popen(
        [sys.executable, str(HERE / "ingest_server.py")], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"ingest server did not start: {line!r}")
        port = int(line.split()[1])
        cpu0 = proc_cpu_s(server.pid)
        out = subprocess.run(
            [
                sys.executable,
                str(HERE / "loadgen.py"),
                "--port",
                str(port),
                "--tenant",
                str(tenant),
                "--first-device",
                str(first_device),
                "--devices",
                str(DEVICES),
                "--seconds",
                str(SECONDS),
                "--fields",
                str(FIELDS),
            ],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        cpu = proc_cpu_s(server.pid) - cpu0
        rss = proc_peak_rss_mb(server.pid)
        gen = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
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
        "e2e_unacked_at_end": gen["unacked"],
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
    writers = cfg.ingest.writers
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
