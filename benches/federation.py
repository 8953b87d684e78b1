"""The hospital-platform loads of ``make bench-transports`` (issue 4), each run
by benches/bench_transports.py in a process of its own:

- ``push``: a hospital platform pushing into the region — ``PUSH_STREAMS``
  streams, each on its own gRPC channel (so the kernel spreads them over the
  region's processes), sending ``BENCH_PUSH_FRAMES``-frame batches with the
  hospital's client certificate and waiting for each reply (sent after
  commit); points count once answered OK;
- ``live``: a steady, paced device load of ``--fps`` frames a second over RMF
  TCP into the hospital, until its stdin closes;

and ``catchup``, run in the bench's own process: a hospital
(``rmiot.ingest.worker`` in the hospital role, its own database) takes the
live load all along; for ``BENCH_OUTAGE_S`` seconds no uplink runs (the link
is cut) and the outbox fills; then ``rmiot.ingest.uplink`` starts, and the
time until the outbox is empty again gives ``uplink_catchup_points_per_s``
(everything forwarded in that time — the backlog plus the live frames that
kept coming — over the time); ``uplink_live_points_per_s`` is the live rate
measured during the outage, ``uplink_catchup_over_live`` their ratio.

    python benches/federation.py push ...   # the push client
    python benches/federation.py live ...   # the paced live load
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, cast

import grpc
import psycopg
import uvloop
from common import ACK_LEN, STATUS_AT, say, telemetry_frame  # benches/common.py

from rmiot.config import Config
from rmiot.deploy import certs
from rmiot.proto import ingest_pb2, ingest_pb2_grpc
from rmiot.registry import store
from rmiot.tenants import store as tenants_store

PUSH_STREAMS = int(os.environ.get("BENCH_PUSH_STREAMS", "8"))
PUSH_FRAMES = int(os.environ.get("BENCH_PUSH_FRAMES", "4000"))
POOL_FRAMES = int(os.environ.get("BENCH_POOL_FRAMES",
                                 str(600_000 * int(os.environ.get("BENCH_SECONDS", "8")))))
LIVE_FPS = int(os.environ.get("BENCH_LIVE_FPS", "5000"))
OUTAGE_S = int(os.environ.get("BENCH_OUTAGE_S", "20"))
CERT_NAME = "bench-transports-hospital"


# -- set-up ------------------------------------------------------------------------

def mirror(dsn: str, region: int, hospital: int, devices: list[int]) -> None:
    """The region's tenants and these devices, same ids, in the hospital's database."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        tenants_store.create_tenant(conn, "bench-region", "Bench region", "region",
                                    tenant_id=region)
        tenants_store.create_tenant(conn, "bench-hospital", "Bench hospital", "hospital",
                                    region, tenant_id=hospital)
        for i, device in enumerate(devices):
            store.register_device(conn, hospital, serial_no=f"live-{i}", device_id=device)


def platform_cert(cfg: Config, region_dsn: str, hospital: int) -> Path:
    """The hospital platform's client certificate, granted hospital_platform."""
    directory = cfg.data_dir / "certs"
    certs.ensure_dev_ca(directory)
    path = certs.issue_client(directory, CERT_NAME, "platform", tenant=hospital)
    with psycopg.connect(region_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO authz_grants (subject, role, tenant_id) VALUES (%s, %s, %s)",
                     (f"cert:{CERT_NAME}", "hospital_platform", hospital))
    return path


def remove_cert(cfg: Config) -> None:
    for suffix in (".crt", ".key"):
        (cfg.data_dir / "certs" / f"{CERT_NAME}{suffix}").unlink(missing_ok=True)


def spawn(module: str, env: dict[str, str], ready: str) -> subprocess.Popen[str]:
    """``python -m module``, once it printed a line starting with ``ready``."""
    proc = subprocess.Popen([sys.executable, "-m", module], env=env, text=True,
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(ready):
            return proc
    raise RuntimeError(f"{module} did not start")


def stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def count(dsn: str, devices: list[int]) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM telemetry WHERE device_id = ANY(%s)",
                           (devices,)).fetchone()
    return int(row[0]) if row else 0


def outbox(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM outbox").fetchone()
    return int(row[0]) if row else 0


# -- push: a hospital platform into the region ------------------------------------------

async def push_load(args: argparse.Namespace, pems: tuple[bytes, bytes, bytes]
                    ) -> dict[str, Any]:
    """PUSH_STREAMS streams, each on its own channel (so the kernel spreads
    them over the server processes), each pushing PUSH_FRAMES-frame batches
    of its own devices back to back for ``args.seconds``. ``pems``: CA, key,
    cert."""
    creds = grpc.ssl_channel_credentials(*pems)
    streams = min(PUSH_STREAMS, args.devices)
    per_stream = args.devices // streams
    ok = other = 0
    count = max(8, POOL_FRAMES // streams // PUSH_FRAMES)

    def batches(first: int, start_us: int, count: int = count) -> list[bytes]:
        """This stream's share of POOL_FRAMES frames (as many as the TCP load
        has), built before the clock starts; a stream that runs out stops early."""
        out, seq = [], 0
        for _ in range(count):
            out.append(b"".join(telemetry_frame(
                args.tenant, first + i % per_stream, seq + i // per_stream,
                start_us + (seq + i // per_stream) * 1000, args.fields)
                for i in range(PUSH_FRAMES)))
            seq += PUSH_FRAMES // per_stream + 1
        return out

    # Live data, as a hospital platform pushes it and as the TCP load sends
    # it: measured from 10 s before the clock starts on (building the frames
    # takes a while: timed on a sample first), not an hour ago — frames over a
    # minute late cost the writer a rollup mark, as they should.
    t_build = time.monotonic()
    batches(args.first_device, 0, 1)
    building_s = (time.monotonic() - t_build) * count * streams
    start_us = time.time_ns() // 1000 + int((building_s - 10) * 1_000_000)

    async def stream(index: int, work: list[bytes]) -> None:
        nonlocal ok, other
        async with grpc.aio.secure_channel(f"127.0.0.1:{args.port}", creds, options=[
                ("grpc.max_send_message_length", 64 << 20)]) as channel:
            stub = ingest_pb2_grpc.IngestServiceStub(channel)
            for n, data in enumerate(work):
                if time.monotonic() > deadline:
                    return
                reply = await stub.Push(ingest_pb2.PushRequest(batch_id=f"{index}-{n}",
                                                               frames=data), timeout=60)
                ok += reply.statuses.get("OK", 0)
                other += sum(v for k, v in reply.statuses.items() if k != "OK")

    work = [batches(args.first_device + s * per_stream, start_us) for s in range(streams)]
    t0, cpu0 = time.monotonic(), time.process_time()
    deadline = t0 + args.seconds
    await asyncio.gather(*(stream(i, w) for i, w in enumerate(work)))
    return {"frames_ok": ok, "points_ok": ok * args.fields, "other_statuses": other,
            "unacked": 0, "seconds": round(time.monotonic() - t0, 3),
            "cpu_s": round(time.process_time() - cpu0, 3)}


# -- live: the hospital's steady device load --------------------------------------------

class Paced(asyncio.Protocol):
    """One device connection of the live load; counts OK acks."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.ok = 0
        self.pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buf = self.pending + data if self.pending else data
        whole = len(buf) - len(buf) % ACK_LEN
        self.pending = buf[whole:]
        self.ok += buf[STATUS_AT:whole:ACK_LEN].count(0)


async def live_load(args: argparse.Namespace) -> dict[str, Any]:
    """args.fps frames a second, round robin over the devices' connections,
    until stdin closes (the run ends it)."""
    loop = asyncio.get_running_loop()
    conns = []
    for _ in range(args.devices):
        _, proto = await loop.create_connection(Paced, "127.0.0.1", args.port)
        conns.append(proto)
    ts0 = time.time_ns() // 1000 - 3_600_000_000
    seqs = [0] * args.devices
    sent = 0
    t0 = time.monotonic()
    done: asyncio.Future[None] = loop.create_future()

    def ended() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(sys.stdin.fileno(), ended)
    tick = 0.01
    while not done.done():
        due = int((time.monotonic() - t0) * args.fps) - sent
        for _ in range(max(due, 0)):
            i = sent % args.devices
            seq = seqs[i]
            seqs[i] += 1
            transport = conns[i].transport
            if transport is not None:
                transport.write(telemetry_frame(args.tenant, args.first_device + i, seq,
                                                ts0 + seq * 1000, args.fields))
            sent += 1
        await asyncio.sleep(tick)
    await asyncio.sleep(1.0)
    return {"sent": sent, "ok": sum(c.ok for c in conns),
            "seconds": round(time.monotonic() - t0, 3)}


# -- catch-up: the uplink after an outage ----------------------------------------------

def catchup(base_env: dict[str, str], mtls: int, tcp: int, hospital: int,
            live_devices: list[int], cert: Path, hospital_db: str, hospital_dsn: str,
            region_dsn: str, fields: int) -> dict[str, float]:
    """The hospital (its own database, RMF TCP on ``tcp``) under the live load:
    an outage of OUTAGE_S seconds, then the uplink to the region's ``mtls``
    port, timed until the outbox is (nearly) empty."""
    env = {**base_env, "RMIOT_DATABASE_NAME": hospital_db, "RMIOT_PLATFORM_ROLE": "hospital",
           "RMIOT_INGEST_TCP_PORT": str(tcp), "RMIOT_UPLINK_TARGET": f"127.0.0.1:{mtls}",
           "RMIOT_UPLINK_CLIENT_CERT": str(cert),
           "RMIOT_UPLINK_CLIENT_KEY": str(cert.with_suffix(".key"))}
    procs = [spawn("rmiot.ingest.worker", env, "PORT ")]
    live = subprocess.Popen(
        [sys.executable, __file__, "live", "--port", str(tcp), "--tenant", str(hospital),
         "--first-device", str(live_devices[0]), "--devices", str(len(live_devices)),
         "--fps", str(LIVE_FPS), "--fields", str(fields)],
        env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        time.sleep(2.0)  # the live load settles
        stored0, t0 = count(hospital_dsn, live_devices), time.monotonic()
        time.sleep(OUTAGE_S)
        stored1, t1 = count(hospital_dsn, live_devices), time.monotonic()
        live_fps = (stored1 - stored0) / (t1 - t0)
        backlog = outbox(hospital_dsn)
        say(f"outage: {OUTAGE_S} s at {live_fps:,.0f} live frames/s; outbox {backlog:,} frames")
        region0 = count(region_dsn, live_devices)
        t2 = time.monotonic()
        procs.append(spawn("rmiot.ingest.uplink", env, "UPLINK "))
        # Caught up: the outbox is down to what a moment of live load holds.
        while outbox(hospital_dsn) > max(LIVE_FPS // 2, 500):
            if time.monotonic() - t2 > 600:
                raise RuntimeError("the uplink did not catch up in 10 minutes")
            time.sleep(0.2)
        t3 = time.monotonic()
        forwarded = count(region_dsn, live_devices) - region0
    finally:
        assert live.stdin is not None and live.stdout is not None
        live.stdin.close()
        out = live.stdout.read()
        live.wait(30)
        stop(procs)
    say(f"live load: {out.strip().splitlines()[-1] if out.strip() else '?'}")
    catchup_fps = forwarded / (t3 - t2)
    say(f"catch-up: {forwarded:,} frames forwarded in {t3 - t2:.1f} s")
    return {"uplink_catchup_points_per_s": catchup_fps * fields,
            "uplink_live_points_per_s": live_fps * fields,
            "uplink_catchup_over_live": catchup_fps / live_fps if live_fps else 0.0,
            "uplink_backlog_frames": backlog,
            "uplink_drain_s": t3 - t2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    for name in ("push", "live"):
        p = sub.add_parser(name)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--tenant", type=int, required=True)
        p.add_argument("--first-device", type=int, required=True)
        p.add_argument("--devices", type=int, required=True)
        p.add_argument("--fields", type=int, default=8)
        if name == "push":
            p.add_argument("--seconds", type=float, required=True)
            p.add_argument("--cert", required=True)
            p.add_argument("--ca", required=True)
        else:
            p.add_argument("--fps", type=int, required=True)
    args = parser.parse_args()
    if args.part == "push":
        cert = Path(args.cert)
        pems = (Path(args.ca).read_bytes(), cert.with_suffix(".key").read_bytes(),
                cert.read_bytes())
        print(json.dumps(uvloop.run(push_load(args, pems))), flush=True)
    else:
        print(json.dumps(uvloop.run(live_load(args))), flush=True)


if __name__ == "__main__":
    main()
