"""The audit chain's figures: how fast records go through ``AuditLog.append``
+ ``flush`` into the hash chain, and how fast ``verify`` walks it back.

1. hashing alone: encode + SM3 for every record, no database (the CPU floor);
2. append: 100k records through one AuditLog as an RPC server would produce
   them (append from the event loop, yielding every 500 records), timed from
   the first append until ``flush`` returns; the time spent inside ``append``
   itself (the RPC hot path) is reported per call;
3. two AuditLogs (two appenders, one chain) with 50k records each;
4. verify of the whole chain (streamed through a server-side cursor);
5. the database's ceiling, same run: one binary COPY of the same rows into an
   empty copy of the table with the same indexes.

Runs in its own database (rmiot_bench_audit), created afresh. Prints figures,
then as its last line one JSON object with ``audit_append_per_s`` and
``audit_verify_records_per_s`` among others.
Run: ``python benches/bench_audit.py [--records N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from common import fresh_database  # benches/common.py

from rmiot import db
from rmiot.deploy import cluster
from rmiot.security.audit import GENESIS, AuditLog, AuditRecord, record_hash
from rmiot.security.audit_verify import verify

DATABASE = "rmiot_bench_audit"
YIELD_EVERY = 500


def say(msg: str) -> None:
    print(msg, flush=True)


def prepare_database() -> tuple[Any, str, bool]:
    return fresh_database(DATABASE)


def records(count: int, actor: str) -> list[AuditRecord]:
    """What the interceptor records for a query RPC: every field set."""
    start = datetime.now(UTC) - timedelta(hours=1)
    return [AuditRecord(
        ts=start + timedelta(microseconds=25 * i), actor=f"{actor}-{i % 200}", role="doctor",
        tenant_id=1000 + i % 40, method="/rmiot.query.v1.QueryService/Latest",
        object=f"device:{100_000 + i % 5000}", outcome="ok" if i % 50 else "denied",
        source=f"ipv4:10.12.{i % 250}.{i % 200}", request_id=f"{actor}-{i:08d}",
        detail={"rows": i % 500, "window_s": 3600, "tier": "raw"},
        patient=f"PSN{i % 30_000:06d}" if i % 3 == 0 else None) for i in range(count)]


def bench_hash(batch: list[AuditRecord]) -> float:
    t0 = time.perf_counter()
    prev = GENESIS
    for ident, rec in enumerate(batch, 1):
        prev = record_hash(rec, ident, prev)
    return len(batch) / (time.perf_counter() - t0)


async def append_all(logs: list[AuditLog], batches: list[list[AuditRecord]]) -> tuple[float, float]:
    """Append every batch (one per log, interleaved); seconds until all flushed,
    and seconds spent inside append()."""
    in_append = 0.0
    t0 = time.perf_counter()
    for i in range(len(batches[0])):
        for log, batch in zip(logs, batches, strict=True):
            a = time.perf_counter()
            log.append(batch[i])
            in_append += time.perf_counter() - a
        if i % YIELD_EVERY == 0:
            await asyncio.sleep(0)
    await asyncio.gather(*(log.flush() for log in logs))
    return time.perf_counter() - t0, in_append


async def run_appends(dsn: str, count: int) -> dict[str, float]:
    out: dict[str, float] = {}
    one = AuditLog(dsn, queue_max=max(50_000, count))
    await one.start()
    warm = records(1000, "warm")
    await append_all([one], [warm])
    batch = records(count, "one")
    seconds, in_append = await append_all([one], [batch])
    await one.stop()
    out["audit_append_per_s"] = count / seconds
    out["audit_append_call_us"] = in_append / count * 1e6
    say(f"append+flush, one AuditLog: {count} records in {seconds:.2f} s "
        f"({out['audit_append_per_s']:.0f}/s); append() itself "
        f"{out['audit_append_call_us']:.2f} us a call")

    half = count // 2
    logs = [AuditLog(dsn, queue_max=max(50_000, half)) for _ in range(2)]
    for log in logs:
        await log.start()
    seconds, _ = await append_all(logs, [records(half, "a"), records(half, "b")])
    for log in logs:
        await log.stop()
    out["audit_append_two_logs_per_s"] = 2 * half / seconds
    say(f"append+flush, two AuditLogs on one chain: {2 * half} records in {seconds:.2f} s "
        f"({out['audit_append_two_logs_per_s']:.0f}/s)")
    return out


def copy_ceiling(admin: str) -> float:
    """One binary COPY of the chain's rows into an empty twin table; rows/s."""
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS audit_copy_ceiling")
        conn.execute("CREATE TABLE audit_copy_ceiling (LIKE audit_log INCLUDING ALL)")
        conn.execute("SELECT create_hypertable('audit_copy_ceiling', by_range('ts', "
                     "INTERVAL '7 days'), create_default_indexes => false)")
        data = bytearray()
        with conn.cursor().copy("COPY (SELECT * FROM audit_log) TO STDOUT (FORMAT BINARY)") as copy:
            for chunk in copy:
                data += chunk
        rows = conn.execute("SELECT count(*) FROM audit_log").fetchone()  # what COPY read
        assert rows is not None
        t0 = time.perf_counter()
        with conn.transaction(), conn.cursor().copy(
                "COPY audit_copy_ceiling FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(bytes(data))
        seconds = time.perf_counter() - t0
        conn.execute("DROP TABLE audit_copy_ceiling")
    return int(rows[0]) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--records", type=int, default=100_000)
    count = parser.parse_args().records
    result: dict[str, float] = {}
    result["audit_hash_per_s"] = bench_hash(records(min(count, 50_000), "hash"))
    say(f"encode + SM3 alone: {result['audit_hash_per_s']:.0f} records/s")
    cfg, dsn, started = prepare_database()
    try:
        result.update(asyncio.run(run_appends(dsn, count)))
        t0 = time.perf_counter()
        report = verify(dsn)
        seconds = time.perf_counter() - t0
        if not report.ok:
            raise SystemExit(f"the bench chain does not verify: {report.problem}")
        result["audit_verify_records_per_s"] = report.records / seconds
        say(f"verify: {report.records} records in {seconds:.2f} s "
            f"({result['audit_verify_records_per_s']:.0f}/s)")
        result["copy_ceiling_rows_per_s"] = copy_ceiling(db.admin_dsn(cfg))
        say(f"database ceiling, one binary COPY of the same rows: "
            f"{result['copy_ceiling_rows_per_s']:.0f} rows/s")
    finally:
        if started:
            cluster.Cluster(cfg).stop()
    result["append_over_copy_ceiling"] = (result["audit_append_per_s"]
                                          / result["copy_ceiling_rows_per_s"])
    print(json.dumps({k: round(v, 3) for k, v in result.items()}), flush=True)


if __name__ == "__main__":
    main()
