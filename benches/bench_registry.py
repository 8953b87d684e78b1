"""The registry's figures (issue 5), in one run on this machine:

1. bulk import: a CSV file of BENCH_REGISTRY_DEVICES (100,000) devices, each with
   a serial number, a UDI, an RFID and a barcode and asset data, through the
   same code as ``rmiot devices import`` (parse, check every row against the
   database, COPY into staging, one INSERT) — devices per second, file to commit;
2. lookup: ``DeviceView.get`` on a view holding all of them, mean over a
   million lookups of random ids (the ingest path's per-frame cost; on this
   machine mostly CPU cache misses) and, for comparison, of 1,000 busy ids;
3. change visible: a key revocation's commit until the ingest path refuses
   the device's HMAC frame — a real IngestService on loopback TCP, an
   RmfClient sending a signed frame every half millisecond, the time the first
   AUTH_FAILED ack arrives; over BENCH_REGISTRY_ROUNDS revocations (median and
   worst). Also the time until the view itself dropped the key.

Runs in its own database (rmiot_bench_registry), created afresh. Last line: one
JSON object with every figure. Goals: 100,000 devices in < 60 s, lookup < 1 µs,
change visible < 1 s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
from common import fresh_database  # benches/common.py

from rmiot.config import Config
from rmiot.core_ext import ACK_AUTH_FAILED, ACK_OK, FLAG_ACK_REQ, KIND_TELEMETRY, encode_frame
from rmiot.deploy import cluster
from rmiot.ingest.client import RmfClient
from rmiot.ingest.service import IngestService
from rmiot.registry import approvals, importer, models, store
from rmiot.registry.devices import EVERYTHING
from rmiot.registry.view import DeviceView
from rmiot.security.sm4 import Keyring
from rmiot.tenants import store as tenants

DEVICES = int(os.environ.get("BENCH_REGISTRY_DEVICES", "100000"))
LOOKUPS = 1_000_000
ROUNDS = int(os.environ.get("BENCH_REGISTRY_ROUNDS", "10"))
COLUMNS = ("model,serial,udi,rfid,barcode,location,asset_class,asset_grade,purchase_date,"
           "purchase_cost,depreciation_method,useful_life_years,calibration_due")


def say(msg: str) -> None:
    print(msg, flush=True)


def setup(dsn: str) -> tuple[int, str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        region = tenants.create_tenant(conn, "bench-region", "Bench region", "region")
        hospital = tenants.create_tenant(conn, "bench-hospital", "Bench hospital", "hospital",
                                         region)
        vendor = models.create_vendor(conn, "bench-vendor", "Bench vendor")
        models.create_model(conn, vendor.id, "BM-8", "monitor", [{"id": i} for i in range(1, 9)])
        approvals.approve(conn, hospital, vendor.id, "bench")
    return hospital, "bench-vendor/BM-8"


def write_csv(path: Path, model: str) -> None:
    with path.open("w", encoding="utf-8") as out:
        out.write(COLUMNS + "\n")
        for i in range(DEVICES):
            out.write(f"{model},SN{i:08d},(01)0690123456789(21)SN{i:08d},E200{i:020X},"
                      f"69{i:011d},B{i % 9}-F{i % 20}-R{i % 400},{('I', 'II', 'III')[i % 3]},"
                      f"{'ABC'[i % 3]},2024-0{1 + i % 9}-15,{1000 + i % 50000}.50,"
                      f"straight_line,{5 + i % 6},2026-{1 + i % 12:02d}-01\n")


def bulk_import(dsn: str, hospital: int, model: str) -> float:
    """Seconds from the file to committed devices."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "devices.csv"
        write_csv(path, model)
        size_mb = path.stat().st_size / 1e6
        with psycopg.connect(dsn, autocommit=True) as conn:
            started = time.perf_counter()
            with path.open(encoding="utf-8", newline="") as text:
                parsed = importer.read_csv(text, str(hospital))
            parsed_at = time.perf_counter()
            result = importer.import_specs(conn, parsed, "bench", EVERYTHING, source="bench")
            elapsed = time.perf_counter() - started
            stored = conn.execute("SELECT count(*), (SELECT count(*) FROM device_codes) "
                                  "FROM devices").fetchone()
    assert result.imported == DEVICES and not result.errors, result.errors[:5]
    assert stored == (DEVICES, 2 * DEVICES), stored
    say(f"bulk import: {DEVICES:,} devices ({size_mb:.1f} MB CSV, {2 * DEVICES:,} codes) in "
        f"{elapsed:.2f} s = {DEVICES / elapsed:,.0f} devices/s "
        f"(parsing {parsed_at - started:.2f} s, checks and load "
        f"{elapsed - (parsed_at - started):.2f} s)")
    return elapsed


def mean_get_ns(view: DeviceView, sample: list[int]) -> float:
    get = view.get
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter_ns()
        for device in sample:
            get(device)
        best = min(best, (time.perf_counter_ns() - t0) / len(sample))
    return best


async def lookups(dsn: str, keyring: Keyring) -> tuple[float, float, float]:
    """(mean ns per DeviceView.get of random devices, the same for 1,000 hot
    devices, seconds to load the view)."""
    view = DeviceView(dsn, keyring)
    started = time.perf_counter()
    await view.start()
    loaded = time.perf_counter() - started
    try:
        ids = list(view.devices)
        assert len(ids) >= DEVICES
        # Fresh int objects, as the frame decoder hands them over, in random order:
        # most lookups miss the CPU caches, as a city's traffic would.
        cold = [int(str(random.choice(ids))) for _ in range(LOOKUPS)]
        hot_ids = random.sample(ids, 1000)
        hot = [int(str(hot_ids[i % 1000])) for i in range(LOOKUPS)]
        cold_ns, hot_ns = mean_get_ns(view, cold), mean_get_ns(view, hot)
        assert all(view.get(d) is not None for d in cold[:1000])
    finally:
        await view.stop()
    say(f"lookup: DeviceView.get over {len(ids):,} devices: {cold_ns:.0f} ns for random "
        f"devices (cache misses), {hot_ns:.0f} ns for 1,000 busy ones (mean of {LOOKUPS:,}, "
        f"best of 3 runs); view loaded in {loaded:.2f} s")
    return cold_ns, hot_ns, loaded


def frame(tenant: int, device: int, seq: int, key: bytes) -> bytes:
    fields = [(m, 1, 70.0 + m) for m in range(1, 9)]
    return encode_frame(KIND_TELEMETRY, tenant, device, seq, time.time_ns() // 1000, fields,
                        flags=FLAG_ACK_REQ, auth=1, key=key)


async def change_visible(cfg: Config, dsn: str, keyring: Keyring,
                         hospital: int) -> tuple[list[float], list[float]]:
    """Per round: ms from the revocation's commit to the first AUTH_FAILED ack,
    and to the ingest process's view dropping the key."""
    ingest_cfg = dataclasses.replace(
        cfg, ingest=dataclasses.replace(cfg.ingest, tcp_port=0, device_rate_per_s=1e6,
                                        batch_max_ms=2),
        security=dataclasses.replace(cfg.security, keyring_dir=str(keyring.directory)))
    with psycopg.connect(dsn, autocommit=True) as conn:
        devices = [store.register_device(conn, hospital, serial_no=f"keyed-{i}",
                                         auth_required=True) for i in range(ROUNDS)]
        keys = [store.add_key(conn, keyring, d)[1] for d in devices]
    service = IngestService(ingest_cfg)
    await service.start()
    client = RmfClient("127.0.0.1", service.tcp.port)
    await client.connect()
    refused_ms: list[float] = []
    dropped_ms: list[float] = []
    try:
        for device, key in zip(devices, keys, strict=True):
            seq = 0
            client.send(frame(hospital, device, seq, key), device, seq)
            await client.drain()
            assert await client.wait_acked(5) and client.acks[-1][2] == ACK_OK
            with psycopg.connect(dsn, autocommit=True) as conn:
                store.revoke_keys(conn, device)
                committed = time.perf_counter()   # autocommit: returned = committed
            dropped = None
            while True:
                seq += 1
                client.send_raw(frame(hospital, device, seq, key))
                await client.drain()
                await asyncio.sleep(0.0005)
                now = time.perf_counter()
                if dropped is None and service.view.key(device) is None:
                    dropped = now
                if any(d == device and s == ACK_AUTH_FAILED for d, _, s in client.acks[-8:]):
                    refused_ms.append((now - committed) * 1000)
                    dropped_ms.append(((dropped or now) - committed) * 1000)
                    break
                if now - committed > 10:
                    raise RuntimeError("the revocation never reached the ingest path")
    finally:
        await client.close()
        await service.stop(drain_timeout=5)
    say(f"change visible: revocation commit -> AUTH_FAILED ack: median "
        f"{statistics.median(refused_ms):.1f} ms, worst {max(refused_ms):.1f} ms over "
        f"{ROUNDS} rounds; -> view dropped the key: median {statistics.median(dropped_ms):.1f} ms")
    return refused_ms, dropped_ms


async def measure(cfg: Config, dsn: str) -> dict[str, Any]:
    hospital, model = setup(dsn)
    elapsed = bulk_import(dsn, hospital, model)
    with tempfile.TemporaryDirectory() as tmp:
        keyring = Keyring.load(Path(tmp) / "keys")
        lookup_ns, lookup_hot_ns, view_load_s = await lookups(dsn, keyring)
        refused, dropped = await change_visible(cfg, dsn, keyring, hospital)
    return {
        "devices": DEVICES,
        "bulk_import_s": round(elapsed, 2),
        "bulk_import_devices_per_s": round(DEVICES / elapsed),
        "lookup_ns": round(lookup_ns, 1),
        "lookup_hot_ns": round(lookup_hot_ns, 1),
        "view_load_s": round(view_load_s, 2),
        "change_visible_ms": round(statistics.median(refused), 1),
        "change_visible_ms_max": round(max(refused), 1),
        "view_drop_ms": round(statistics.median(dropped), 1),
    }


def main() -> None:
    cfg, dsn, started = fresh_database("rmiot_bench_registry")
    try:
        figures = asyncio.run(measure(cfg, dsn))
    finally:
        if started:
            cluster.Cluster(cfg).stop()
    say(json.dumps(figures))


if __name__ == "__main__":
    main()
