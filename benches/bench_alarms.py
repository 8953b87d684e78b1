"""make bench-alarms: the alarm figures of issue 8, in one run.

1. ingest_cost_ratio: the ingest service (``rmiot.ingest.worker``, one process
   per core on one port, as the platform runs it) driven at full speed by
   benches/loadgen.py (ACK_REQ, points counted once committed), alternately
   with no rule enabled and with 1,000 rules enabled (hospital-wide,
   per-department and per-device thresholds on the frames' metrics, so every
   frame is evaluated against ~40 rules that stay quiet), four times each in
   an ABBA BAAB order after a warm-up run; the ratio of the means. On a
   machine shared with other work the throughput swings with their load, so
   ``ingest_cpu_ratio`` says the same from the ingest processes' own CPU
   time per frame (without ÷ with rules), which the neighbours barely move;
2. alarm latency: ingest at half the throughput measured with the rules,
   by paced device connections (a process of their own), while a probe device
   sends a frame with SpO2 80 % (rule: < 90 %, critical): from the moment its
   bytes are written to the TCP port to the moment its "raised" event reaches
   an AlarmService.Watch client over gRPC (TLS, logged in as a clinician) —
   then a normal frame clears it, and again. The Watch server runs in a
   process of its own (as in the platform), apart from the probe, its client
   and the load. ``alarm_raised_*``: the part until the rule fired (the
   alarm's ``raised_us``); ``load_avg_1m_during_latency``: the machine's
   load meanwhile (``cpus`` cores).

Runs in its own database (rmiot_bench_alarms), created afresh. Last line:
one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import statistics
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
from loadgen import build_frames  # benches/loadgen.py

from rmiot.config import Config, load
from rmiot.core_ext import FLAG_ACK_REQ, encode_frame
from rmiot.deploy import certs, cluster
from rmiot.grpc_server import GrpcServer, channel
from rmiot.ingest.alarm_service import RULES, AlarmServices
from rmiot.ingest.client import RmfClient
from rmiot.proto import alarm_pb2, alarm_pb2_grpc, auth_pb2, auth_pb2_grpc
from rmiot.registry import store
from rmiot.security import identity
from rmiot.security.service import SecurityServices
from rmiot.tenants import store as tenants

HERE = Path(__file__).resolve().parent
SECONDS = int(os.environ.get("BENCH_SECONDS", "6"))
# Without and with rules in an ABBA BAAB order: a load that drifts while the
# bench runs (other work on the machine) weighs on both alike.
ROUNDS = (False, True, True, False, True, False, False, True)
DEVICES = int(os.environ.get("BENCH_DEVICES", "200"))
SERVERS = int(os.environ.get("BENCH_SERVERS", str(os.cpu_count() or 1)))
PROBES = int(os.environ.get("BENCH_PROBES", "150"))
DEPARTMENTS = 10
RULES_TOTAL = 1000
PASSWORD = "Bench-Alarms-9"
SPO2 = 2


def say(msg: str) -> None:
    print(msg, flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def register(dsn: str) -> tuple[int, list[int], list[int], int]:
    """Hospital, its departments, the load devices (spread over them), the probe."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        region = tenants.create_tenant(conn, "ba-region", "Bench region", "region")
        hospital = tenants.create_tenant(conn, "ba-hospital", "Bench hospital", "hospital",
                                         region)
        depts = [tenants.create_tenant(conn, f"ba-dept-{i}", f"Dept {i}", "department",
                                       hospital) for i in range(DEPARTMENTS)]
        devices = [store.register_device(conn, hospital, serial_no=f"ba-{i}")
                   for i in range(DEVICES)]
        probe = store.register_device(conn, hospital, serial_no="ba-probe")
        for i, device in enumerate([*devices, probe]):
            conn.execute("UPDATE devices SET state = 'active', department_id = %s "
                         "WHERE id = %s", (depts[i % DEPARTMENTS], device))
    return hospital, depts, devices, probe


def make_rules(dsn: str, hospital: int, depts: list[int], devices: list[int]) -> int:
    """1,000 rules, all disabled for now. Limits sit above the load's values
    (loadgen.VITALS) so they stay quiet; the probe's rule is spo2-low."""
    rows: list[tuple[Any, ...]] = []

    def rule(tenant: int, code: str, params: dict[str, Any], device: int | None = None,
             severity: str = "major") -> None:
        rows.append((tenant, code, "threshold", device, severity,
                     json.dumps({"for_s": 0, "clear_value": params["value"],
                                 "clear_for_s": 0, **params})))

    rule(hospital, "spo2-low", {"metric": SPO2, "op": "<", "value": 90.0}, severity="critical")
    for k in range(9):
        rule(hospital, f"h-{k}", {"metric": k % 8 + 1, "op": ">", "value": 1000.0 + k})
    for d, dept in enumerate(depts):
        for k in range(20):
            rule(dept, f"d-{k}", {"metric": (k + d) % 8 + 1, "op": ">", "value": 2000.0 + k})
    i = 0
    while len(rows) < RULES_TOTAL:
        device = devices[i % len(devices)]
        k = i // len(devices)
        rule(hospital, f"dev-{k}", {"metric": (k + i) % 8 + 1, "op": "<", "value": -100.0 - k},
             device=device)
        i += 1
    with psycopg.connect(dsn, autocommit=True) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO alarm_rules (tenant_id, code, kind, device_id, severity, params, "
            "enabled, created_by, updated_by) VALUES (%s, %s, %s, %s, %s, %s, false, "
            "'bench', 'bench')", rows)
    return len(rows)


def set_rules(dsn: str, enabled: bool) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE alarm_rules SET enabled = %s", (enabled,))
        row = conn.execute("SELECT count(*) FROM alarm_rules WHERE enabled").fetchone()
    time.sleep(2.0)  # every ingest process reloads on NOTIFY
    return int(row[0]) if row else 0


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU the processes used so far (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def loadgen(port: int, tenant: int, first: int, env: dict[str, str],
            servers: list[int]) -> tuple[float, float]:
    """Full-speed frames/s over DEVICES connections (devices first .. first+N-1),
    and the ingest processes' CPU seconds per million frames meanwhile."""
    cpu = cpu_seconds(servers)
    out = subprocess.run(
        [sys.executable, str(HERE / "loadgen.py"), "--port", str(port), "--tenant", str(tenant),
         "--first-device", str(first), "--devices", str(DEVICES), "--seconds", str(SECONDS),
         "--fields", "8", "--frames-per-device", str(max(1000, 3_000_000 // DEVICES))],
        capture_output=True, text=True, check=True, env=env)
    gen = json.loads(out.stdout.strip().splitlines()[-1])
    cpu = cpu_seconds(servers) - cpu
    return float(gen["frames_ok"]) / float(gen["seconds"]), cpu * 1e6 / int(gen["frames_ok"])


# -- paced load (a process of its own: --paced) ---------------------------------------

async def paced(args: argparse.Namespace) -> None:
    """N device connections sending ``rate`` frames/s in all, in 10 ms ticks."""
    loop = asyncio.get_running_loop()
    start_us = time.time_ns() // 1000 - 60_000_000
    per_conn = args.rate / args.devices
    conns = []
    for i in range(args.devices):
        frames = build_frames(args.tenant, args.first + i, int(per_conn * args.seconds) + 100,
                              8, start_us)
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", args.port)
        conns.append((cast(asyncio.Transport, transport), frames))
    t0 = time.monotonic()
    sent = [0] * len(conns)
    while (elapsed := time.monotonic() - t0) < args.seconds:
        due = int(elapsed * per_conn)
        for i, (transport, frames) in enumerate(conns):
            if due > sent[i]:
                transport.write(b"".join(frames[sent[i]:due]))
                sent[i] = due
        await asyncio.sleep(0.01)
    for transport, _ in conns:
        transport.close()
    print(json.dumps({"sent": sum(sent)}), flush=True)


# -- the Watch server (a process of its own: --watch) ---------------------------------

async def watch_server(hospital: int) -> None:
    """What a platform process runs for alarms (security, the AlarmService with
    its feed, escalation and notifier) behind gRPC with TLS, and a clinician of
    the hospital to log in as. Prints ``PORT <n>``; stops on SIGTERM."""
    cfg = load()
    certs.ensure_dev_ca(cfg.data_dir / "certs")
    cfg = dataclasses.replace(
        cfg, grpc=dataclasses.replace(cfg.grpc, port=0, mtls_port=0),
        security=dataclasses.replace(cfg.security, caller_rate_per_s=1e5,
                                     tenant_rate_per_s=1e5))
    security = SecurityServices(cfg)
    security.add_rules(RULES)
    await security.start()
    assert security.pool is not None
    alarms = AlarmServices(security.dsn, security.pool, security.authorizer, security.keyring,
                           security.audit)
    await alarms.start()
    server = GrpcServer(cfg, services=[*security.services(), alarms.service()],
                        interceptors=[security.interceptor])
    await server.start()
    async with await psycopg.AsyncConnection.connect(security.dsn, autocommit=True) as conn:
        await identity.create_user(conn, "bench-nurse", PASSWORD, hospital, must_change=False)
    await security.authorizer.grant("user:bench-nurse", "clinician", hospital)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"PORT {server.port}", flush=True)
    await stop.wait()
    await server.stop(0)
    await alarms.stop()
    await security.stop()


# -- latency ------------------------------------------------------------------------

@dataclasses.dataclass
class Probes:
    total_ms: list[float] = dataclasses.field(default_factory=list)   # frame -> Watch client
    raised_ms: list[float] = dataclasses.field(default_factory=list)  # frame -> rule fired
    load: list[float] = dataclasses.field(default_factory=list)       # 1-min load averages


async def latency(cfg: Config, hospital: int, probe: int, port: int, watch_port: int,
                  paced_cmd: list[str], env: dict[str, str]) -> Probes:
    """Probe frames on the TCP port, their alarms read from a Watch stream of
    the server process, while the paced load runs. ``raised_ms``: from the
    frame's sending to the moment its rule fired (the alarm's ``raised_us``,
    stamped by the ingest process as it starts writing the alarm); the rest of
    ``total_ms`` is the alarm's write, NOTIFY, the feed and gRPC."""
    served = dataclasses.replace(cfg, grpc=dataclasses.replace(cfg.grpc, port=watch_port))
    async with channel(served) as chan:
        token = (await auth_pb2_grpc.AuthServiceStub(chan).Login(
            auth_pb2.LoginRequest(username="bench-nurse", password=PASSWORD))).token
    load = await asyncio.create_subprocess_exec(*paced_cmd, env=env,
                                                stdout=asyncio.subprocess.PIPE)
    got = Probes()
    device = RmfClient("127.0.0.1", port)
    await device.connect()
    try:
        async with channel(served) as chan:
            stream = alarm_pb2_grpc.AlarmServiceStub(chan).Watch(
                alarm_pb2.WatchRequest(tenant_id=hospital),
                metadata=(("authorization", f"Bearer {token}"),))
            await asyncio.sleep(1.0)  # the load is running
            seq = 0
            for _ in range(PROBES):
                for value, wanted in ((80.0, "raised"), (98.0, "cleared")):
                    seq += 1
                    sent_us = time.time_ns() // 1000
                    raw = encode_frame(1, hospital, probe, seq, sent_us,
                                       [(SPO2, 1, value)], flags=FLAG_ACK_REQ)
                    t0 = time.perf_counter()
                    device.send(raw, probe, seq)
                    while True:
                        event = await asyncio.wait_for(stream.read(), 10)
                        if event is grpc.aio.EOF:
                            raise RuntimeError("the Watch stream ended")
                        if event.device_id == probe and event.kind == wanted:
                            break
                    if wanted == "raised":
                        got.total_ms.append((time.perf_counter() - t0) * 1000)
                        got.raised_ms.append((event.raised_us - sent_us) / 1000)
                        got.load.append(os.getloadavg()[0])
                await asyncio.sleep(0.02)
            stream.cancel()
    finally:
        await device.close()
        await load.wait()
    return got


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> None:
    cfg, dsn, started = fresh_database("rmiot_bench_alarms")
    result: dict[str, Any] = {}
    keys = tempfile.mkdtemp(prefix="rmiot-bench-keys-")
    port = free_port()
    env = {**os.environ, "RMIOT_DATABASE_NAME": "rmiot_bench_alarms",
           "RMIOT_INGEST_TCP_PORT": str(port), "RMIOT_SECURITY_KEYRING_DIR": keys,
           "RMIOT_LOG_LEVEL": "warning", "RMIOT_INGEST_DEVICE_RATE_PER_S": "1000000"}
    servers: list[subprocess.Popen[str]] = []
    try:
        hospital, depts, devices, probe = register(dsn)
        result["rules_active"] = make_rules(dsn, hospital, depts, devices)
        servers = [subprocess.Popen([sys.executable, "-m", "rmiot.ingest.worker"], env=env,
                                    stdout=subprocess.PIPE, text=True) for _ in range(SERVERS)]
        for server in servers:
            assert server.stdout is not None
            line = server.stdout.readline()
            if not line.startswith("PORT "):
                raise RuntimeError(f"ingest server did not start: {line!r}")
        rates: dict[bool, list[float]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        pids = [server.pid for server in servers]
        rate, _ = loadgen(port, hospital, devices[0], env, pids)  # warm-up, not counted
        say(f"warm-up: {rate:,.0f} frames/s")
        for enabled in ROUNDS:
            active = set_rules(dsn, enabled)
            rate, per_million = loadgen(port, hospital, devices[0], env, pids)
            rates[enabled].append(rate)
            cpu[enabled].append(per_million)
            say(f"ingest with {active} rules enabled: {rate:,.0f} frames/s, "
                f"{per_million:.2f} CPU s per million frames (load {os.getloadavg()[0]:.1f})")
        without, with_rules = statistics.mean(rates[False]), statistics.mean(rates[True])
        result["ingest_cpu_ratio"] = statistics.mean(cpu[False]) / statistics.mean(cpu[True])
        result["rules_active"] = set_rules(dsn, True)
        half = with_rules / 2
        paced_cmd = [sys.executable, str(HERE / "bench_alarms.py"), "--paced",
                     "--port", str(port), "--tenant", str(hospital), "--first", str(devices[0]),
                     "--devices", str(DEVICES), "--rate", str(half),
                     "--seconds", str(int(PROBES * 0.15) + 20)]
        say(f"latency: {PROBES} probes while ingesting {half:,.0f} frames/s (half of max)")
        watch = subprocess.Popen([sys.executable, str(HERE / "bench_alarms.py"), "--watch",
                                  "--hospital", str(hospital)], env=env,
                                 stdout=subprocess.PIPE, text=True)
        servers.append(watch)
        assert watch.stdout is not None
        line = watch.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"the Watch server did not start: {line!r}")
        got = uvloop.run(latency(cfg, hospital, probe, port, int(line.split()[1]), paced_cmd,
                                 env))
        result.update({
            "alarm_latency_p50_ms": percentile(got.total_ms, 0.5),
            "alarm_latency_p99_ms": percentile(got.total_ms, 0.99),
            "alarm_latency_max_ms": max(got.total_ms),
            "alarm_raised_p50_ms": percentile(got.raised_ms, 0.5),
            "alarm_raised_p99_ms": percentile(got.raised_ms, 0.99),
            "load_avg_1m_during_latency": statistics.mean(got.load),
            "cpus": os.cpu_count(),
            "ingest_frames_per_s_without_rules": without,
            "ingest_frames_per_s_with_rules": with_rules,
            "ingest_cost_ratio": with_rules / without,
            "load_frames_per_s_during_latency": half,
            "latency_probes": len(got.total_ms),
        })
    finally:
        for server in servers:
            server.terminate()
            server.wait(30)
            if server.stdout:
                server.stdout.close()
        if started:
            cluster.Cluster(cfg).stop()
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                      for k, v in result.items()}), flush=True)


if __name__ == "__main__":
    if "--watch" in sys.argv:
        uvloop.run(watch_server(int(sys.argv[sys.argv.index("--hospital") + 1])))
    elif "--paced" in sys.argv:
        p = argparse.ArgumentParser()
        p.add_argument("--paced", action="store_true")
        for name in ("port", "tenant", "first", "devices", "seconds"):
            p.add_argument(f"--{name}", type=int, required=True)
        p.add_argument("--rate", type=float, required=True)
        uvloop.run(paced(p.parse_args()))
    else:
        main()
