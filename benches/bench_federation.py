"""Federation figures (issue 4), all in one run on this machine.

1. Into the region, the same server processes (``rmiot.ingest.push_worker``,
   one per core, sharing the RMF TCP and the mTLS gRPC ports), one path after
   the other:
   - ``tcp_points_per_s``: benches/loadgen.py, many device connections, ACK_REQ,
     points counted once acked OK (committed);
   - ``grpc_push_points_per_s``: a push client process with several streams,
     each sending batches of ``BENCH_PUSH_FRAMES`` frames with a hospital
     platform's client certificate and waiting for the reply (sent after
     commit); points counted once answered OK.
2. The uplink after an outage: a hospital (``rmiot.ingest.worker`` in the
   hospital role, its own database) takes a steady live load of
   ``BENCH_LIVE_FPS`` frames a second (a paced device generator) all along.
   For ``BENCH_OUTAGE_S`` seconds no uplink runs (the link is cut): the outbox
   fills. Then ``rmiot.ingest.uplink`` starts, and the time until the outbox is
   empty again gives ``uplink_catchup_points_per_s`` (everything forwarded in
   that time — the backlog plus the live frames that kept coming — over the
   time); ``uplink_live_points_per_s`` is the live rate measured during the
   outage, and ``uplink_catchup_over_live`` their ratio.

Databases ``rmiot_bench_fed_region`` and ``rmiot_bench_fed_hospital``, created
afresh. Last line: one JSON object with every figure.

    python benches/bench_federation.py            # the whole run
    python benches/bench_federation.py push ...   # the push client (used by the run)
    python benches/bench_federation.py live ...   # the paced live load (used by the run)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import grpc
import psycopg
import uvloop
from common import fresh_database  # benches/common.py

from rmiot.config import Config
from rmiot.core_ext import ACK_OK, FLAG_ACK_REQ, IMPL, encode_ack, encode_frame
from rmiot.deploy import certs, cluster
from rmiot.proto import ingest_pb2, ingest_pb2_grpc
from rmiot.registry import store
from rmiot.tenants import store as tenants_store

HERE = Path(__file__).resolve().parent
SECONDS = int(os.environ.get("BENCH_SECONDS", "12"))
DEVICES = int(os.environ.get("BENCH_DEVICES", "200"))
SERVERS = int(os.environ.get("BENCH_SERVERS", str(os.cpu_count() or 1)))
PUSH_STREAMS = int(os.environ.get("BENCH_PUSH_STREAMS", "8"))
PUSH_FRAMES = int(os.environ.get("BENCH_PUSH_FRAMES", "4000"))
LIVE_FPS = int(os.environ.get("BENCH_LIVE_FPS", "5000"))
OUTAGE_S = int(os.environ.get("BENCH_OUTAGE_S", "20"))
FIELDS = 8
VALUES = (72.0, 98.0, 16.0, 36.7, 120.0, 80.0, 93.3, 71.0)
ACK_LEN = len(encode_ack(1, 1, 1, 0, ACK_OK))
STATUS_AT = ACK_LEN - 4 - 1
REGION_DB, HOSPITAL_DB = "rmiot_bench_fed_region", "rmiot_bench_fed_hospital"


def say(msg: str) -> None:
    print(msg, flush=True)


def frame(tenant: int, device: int, seq: int, ts_us: int) -> bytes:
    return encode_frame(1, tenant, device, seq, ts_us,
                        [(m + 1, 1, VALUES[m]) for m in range(FIELDS)], flags=FLAG_ACK_REQ)


# -- set-up ------------------------------------------------------------------------

def register(dsns: list[str], devices: int) -> tuple[int, int, list[int]]:
    """The same region, hospital and devices (same ids) in every database;
    returns (region, hospital, device ids)."""
    ids: dict[str, int] = {}
    found: list[int] = []
    for dsn in dsns:
        with psycopg.connect(dsn, autocommit=True) as conn:
            region = tenants_store.create_tenant(conn, "bench-fed-region", "Bench region",
                                                 "region", tenant_id=ids.get("region"))
            hospital = tenants_store.create_tenant(conn, "bench-fed-hospital", "Bench hospital",
                                                   "hospital", region,
                                                   tenant_id=ids.get("hospital"))
            ids.update(region=region, hospital=hospital)
            made = [store.register_device(conn, hospital, serial_no=f"bench-{i}",
                                          device_id=found[i] if found else None)
                    for i in range(devices)]
            found = found or made
    return ids["region"], ids["hospital"], found


def platform_cert(cfg: Config, region_dsn: str, hospital: int) -> Path:
    directory = cfg.data_dir / "certs"
    certs.ensure_dev_ca(directory)
    path = certs.issue_client(directory, "bench-fed-hospital", "platform", tenant=hospital)
    with psycopg.connect(region_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO authz_grants (subject, role, tenant_id) VALUES (%s, %s, %s)",
                     ("cert:bench-fed-hospital", "hospital_platform", hospital))
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(module: str, env: dict[str, str], ready: str) -> subprocess.Popen[str]:
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


def cpu_s(procs: list[subprocess.Popen[str]]) -> float:
    """user+sys CPU seconds of these processes so far."""
    total = 0.0
    for proc in procs:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def count(dsn: str, devices: list[int]) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM telemetry WHERE device_id = ANY(%s)",
                           (devices,)).fetchone()
    return int(row[0]) if row else 0


def outbox(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM outbox").fetchone()
    return int(row[0]) if row else 0


# -- part 1: TCP and gRPC push into the region ----------------------------------------

def run_region_paths(env: dict[str, str], tcp: int, mtls: int, hospital: int,
                     tcp_devices: list[int], push_devices: list[int], cert: Path,
                     servers: list[subprocess.Popen[str]]) -> dict[str, float]:
    cpu0 = cpu_s(servers)
    out = subprocess.run(
        [sys.executable, str(HERE / "loadgen.py"), "--port", str(tcp), "--tenant", str(hospital),
         "--first-device", str(tcp_devices[0]), "--devices", str(len(tcp_devices)),
         "--seconds", str(SECONDS), "--fields", str(FIELDS),
         "--frames-per-device", str(max(1000, 3_000_000 // len(tcp_devices)))],
        capture_output=True, text=True, check=True, env=env)
    tcp_run = json.loads(out.stdout.strip().splitlines()[-1])
    cpu1 = cpu_s(servers)
    say(f"tcp: {tcp_run}")
    out = subprocess.run(
        [sys.executable, __file__, "push", "--port", str(mtls), "--tenant", str(hospital),
         "--first-device", str(push_devices[0]), "--devices", str(len(push_devices)),
         "--cert", str(cert), "--ca", env["BENCH_CA"]],
        capture_output=True, text=True, check=True, env=env)
    push_run = json.loads(out.stdout.strip().splitlines()[-1])
    cpu2 = cpu_s(servers)
    say(f"grpc push: {push_run}")
    # The region's CPU per million points (decoding the push client's batches
    # is part of it; so is TLS, which the TCP path does not have).
    return {"tcp_points_per_s": tcp_run["points_ok"] / tcp_run["seconds"],
            "grpc_push_points_per_s": push_run["points_ok"] / push_run["seconds"],
            "tcp_server_cpu_s_per_mpoints": (cpu1 - cpu0) / (tcp_run["points_ok"] / 1e6),
            "grpc_push_server_cpu_s_per_mpoints": (cpu2 - cpu1) / (push_run["points_ok"] / 1e6),
            "grpc_push_frames_per_request": PUSH_FRAMES,
            "grpc_push_streams": PUSH_STREAMS}


async def push_load(args: argparse.Namespace, pems: tuple[bytes, bytes, bytes]
                    ) -> dict[str, Any]:
    """PUSH_STREAMS streams, each on its own channel (so the kernel spreads
    them over the server processes), each pushing PUSH_FRAMES-frame batches
    of its own devices back to back for SECONDS. ``pems``: CA, key, cert."""
    creds = grpc.ssl_channel_credentials(*pems)
    per_stream = args.devices // PUSH_STREAMS
    start_us = time.time_ns() // 1000 - 3_600_000_000
    ok = other = 0
    deadline = time.monotonic() + SECONDS

    def batches(first: int) -> list[bytes]:
        """This stream's share of 3 million frames (as loadgen.py has), built
        before the clock starts; a stream that runs out stops early."""
        out, seq = [], 0
        for _ in range(max(8, 3_000_000 // PUSH_STREAMS // PUSH_FRAMES)):
            out.append(b"".join(frame(args.tenant, first + i % per_stream, seq + i // per_stream,
                                      start_us + (seq + i // per_stream) * 1000)
                                for i in range(PUSH_FRAMES)))
            seq += PUSH_FRAMES // per_stream + 1
        return out

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

    work = [batches(args.first_device + s * per_stream) for s in range(PUSH_STREAMS)]
    t0, cpu0 = time.monotonic(), time.process_time()
    deadline = t0 + SECONDS
    await asyncio.gather(*(stream(i, w) for i, w in enumerate(work)))
    return {"frames_ok": ok, "points_ok": ok * FIELDS, "other_statuses": other,
            "seconds": round(time.monotonic() - t0, 3),
            "cpu_s": round(time.process_time() - cpu0, 3)}


# -- part 2: uplink catch-up --------------------------------------------------------

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
                transport.write(frame(args.tenant, args.first_device + i, seq,
                                      ts0 + seq * 1000))
            sent += 1
        await asyncio.sleep(tick)
    await asyncio.sleep(1.0)
    return {"sent": sent, "ok": sum(c.ok for c in conns),
            "seconds": round(time.monotonic() - t0, 3)}


def run_catchup(base_env: dict[str, str], mtls: int, hospital: int, live_devices: list[int],
                cert: Path, hospital_dsn: str, region_dsn: str) -> dict[str, float]:
    tcp = free_port()
    env = {**base_env, "RMIOT_DATABASE_NAME": HOSPITAL_DB, "RMIOT_PLATFORM_ROLE": "hospital",
           "RMIOT_INGEST_TCP_PORT": str(tcp), "RMIOT_UPLINK_TARGET": f"127.0.0.1:{mtls}",
           "RMIOT_UPLINK_CLIENT_CERT": str(cert),
           "RMIOT_UPLINK_CLIENT_KEY": str(cert.with_suffix(".key"))}
    procs = [spawn("rmiot.ingest.worker", env, "PORT ")]
    live = subprocess.Popen(
        [sys.executable, __file__, "live", "--port", str(tcp), "--tenant", str(hospital),
         "--first-device", str(live_devices[0]), "--devices", str(len(live_devices)),
         "--fps", str(LIVE_FPS)],
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
    return {"uplink_catchup_points_per_s": catchup_fps * FIELDS,
            "uplink_live_points_per_s": live_fps * FIELDS,
            "uplink_catchup_over_live": catchup_fps / live_fps if live_fps else 0.0,
            "uplink_backlog_frames": backlog,
            "uplink_drain_s": t3 - t2}


# -- the run --------------------------------------------------------------------------

def run() -> None:
    if IMPL != "c":
        raise SystemExit("bench-federation measures the compiled decoder: build it (make) "
                         "and unset RMIOT_PURE")
    cfg, region_dsn, started = fresh_database(REGION_DB)
    _, hospital_dsn, _ = fresh_database(HOSPITAL_DB)
    result: dict[str, float] = {}
    procs: list[subprocess.Popen[str]] = []
    try:
        # Devices of their own for each load: TCP, push, the hospital's live load.
        _, hospital, devices = register([region_dsn, hospital_dsn], DEVICES * 2 + 100)
        cert = platform_cert(cfg, region_dsn, hospital)
        keys = tempfile.mkdtemp(prefix="rmiot-bench-keys-")
        tcp, mtls = free_port(), free_port()
        env = {**os.environ, "RMIOT_SECURITY_KEYRING_DIR": keys, "RMIOT_LOG_LEVEL": "warning",
               "RMIOT_INGEST_DEVICE_RATE_PER_S": "1000000",
               "RMIOT_INGEST_TENANT_POINTS_PER_S": "100000000",
               "RMIOT_SECURITY_CALLER_RATE_PER_S": "100000",
               "RMIOT_SECURITY_TENANT_RATE_PER_S": "100000",
               "BENCH_CA": str(cfg.tls_path("ca_file"))}
        region_env = {**env, "RMIOT_DATABASE_NAME": REGION_DB,
                      "RMIOT_INGEST_TCP_PORT": str(tcp), "RMIOT_GRPC_PORT": str(free_port()),
                      "RMIOT_GRPC_MTLS_PORT": str(mtls)}
        procs = [spawn("rmiot.ingest.push_worker", region_env, "MTLS ")
                 for _ in range(SERVERS)]
        say(f"region: {SERVERS} processes; {DEVICES} device connections and "
            f"{PUSH_STREAMS} push streams of {PUSH_FRAMES}-frame batches, {SECONDS} s each")
        result.update(run_region_paths(env, tcp, mtls, hospital, devices[:DEVICES],
                                       devices[DEVICES:2 * DEVICES], cert, procs))
        say(f"hospital: live load {LIVE_FPS} frames/s, uplink cut for {OUTAGE_S} s")
        result.update(run_catchup(env, mtls, hospital, devices[2 * DEVICES:], cert,
                                  hospital_dsn, region_dsn))
    finally:
        stop(procs)
        for suffix in (".crt", ".key"):
            (cfg.data_dir / "certs" / f"bench-fed-hospital{suffix}").unlink(missing_ok=True)
        if started:
            cluster.Cluster(cfg).stop()
    result["grpc_push_over_tcp"] = result["grpc_push_points_per_s"] / result["tcp_points_per_s"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}),
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part")
    for name in ("push", "live"):
        p = sub.add_parser(name)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--tenant", type=int, required=True)
        p.add_argument("--first-device", type=int, required=True)
        p.add_argument("--devices", type=int, required=True)
        if name == "push":
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
    elif args.part == "live":
        print(json.dumps(uvloop.run(live_load(args))), flush=True)
    else:
        run()


if __name__ == "__main__":
    main()
