"""make bench-transports: issue 4's figures, one run, same machine, same
ingest processes.

The region runs as the platform runs it — BENCH_SERVERS processes (default:
one per core) of ``rmiot.ingest.push_worker`` sharing the RMF TCP, HTTP,
CoAP and mutual-TLS gRPC ports (SO_REUSEPORT) and one MQTT shared
subscription — with every transport enabled, against the private Mosquitto
(real logins and ACLs generated from the registry) and the private
TimescaleDB. Then, one after the other for BENCH_SECONDS each, a load
generator (another process) plays BENCH_DEVICES devices on one path, each
keeping up to BENCH_WINDOW (256) frames unacknowledged, like a device with a
send buffer:

- tcp: benches/loadgen.py (one connection per device, frames back to back);
- mqtt: one MQTT v5 connection per device with its own login (a minimal
  hand-written client, so the generator's CPU stays small, as loadgen.py's
  does), BENCH_MQTT_FRAMES (128) frames per message (QoS 1) to
  ``<root>/up/<id>``, acks from ``<root>/down/<id>``;
- http: ``POST /v1/devices/<id>/frames`` of BENCH_HTTP_FRAMES (128) frames
  with ``Accept: application/octet-stream``, as many requests at a time as
  the window holds, over keep-alive connections;
- coap: ``POST /rmf/<id>`` of BENCH_COAP_FRAMES (10) frames — one datagram, no
  blockwise — confirmable, one at a time (CoAP's NSTART = 1), so its window is
  one request: a protocol for constrained devices, not for bulk;
- grpc_push: a hospital platform (benches/federation.py push) with its client
  certificate, BENCH_PUSH_STREAMS (8) streams of BENCH_PUSH_FRAMES (4000)-frame
  batches, each waiting for its reply.

8-field telemetry frames with ACK_REQ; a point counts once acknowledged OK,
i.e. committed. Each path has its own devices, so nothing is a duplicate. The
machine's load drifts (the database, other work), so the paths take turns for
BENCH_ROUNDS (3) rounds: each figure is the median of its rounds, and each
ratio (``mqtt_over_tcp``, ``grpc_push_over_tcp``) the median of that round's
figure over the same round's TCP. Ingest (and broker) CPU seconds per million
points come with them: those do not depend on what else the machine does.

Last, the uplink (benches/federation.py catchup): a hospital in the hospital
role with its own database takes a steady live load over TCP, its link to
the region (the same processes) cut for BENCH_OUTAGE_S (20) s; then the
uplink starts and drains the outbox while the live load goes on:
``uplink_catchup_points_per_s`` over the live rate is
``uplink_catchup_over_live``.

Goals: grpc_push >= 0.8x tcp; mqtt >= 0.5x tcp (frames batched per message);
uplink catch-up >= 3x the live rate. Databases rmiot_bench_transports (the
region) and rmiot_bench_transports_hospital, created afresh; its own topic
root on the broker (removed at the end). Last line: one JSON object with
every figure, the ratios and ``goals_met``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import federation  # benches/federation.py
import psycopg
from common import (  # benches/common.py
    acked_ok,
    cpu_s,
    free_port,
    fresh_database,
    say,
    telemetry_frame,
)

from rmiot.config import Config
from rmiot.core_ext import IMPL
from rmiot.deploy import broker, broker_auth, cluster
from rmiot.registry import store
from rmiot.registry import transport_credentials as creds
from rmiot.tenants import store as tenants_store

HERE = Path(__file__).resolve().parent
FIELDS = 8
SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
DEVICES = int(os.environ.get("BENCH_DEVICES", "50"))
LIVE_DEVICES = 100
SERVERS = int(os.environ.get("BENCH_SERVERS", str(os.cpu_count() or 1)))
# Unacknowledged frames a device may have out: the TCP load generator's default.
WINDOW = int(os.environ.get("BENCH_WINDOW", "256"))
# Frames built before the clock starts, per path: more than the fastest sends
# in SECONDS, so no path is capped by running out.
POOL_FRAMES = int(os.environ.get("BENCH_POOL_FRAMES", str(600_000 * SECONDS)))
MQTT_FRAMES = int(os.environ.get("BENCH_MQTT_FRAMES", "128"))
HTTP_FRAMES = int(os.environ.get("BENCH_HTTP_FRAMES", "128"))
COAP_FRAMES = int(os.environ.get("BENCH_COAP_FRAMES", "10"))  # ~0.9 kB: one datagram
TOPIC_ROOT = "rmiot-bench"
REGION_DB, HOSPITAL_DB = "rmiot_bench_transports", "rmiot_bench_transports_hospital"
ALL_TRANSPORTS = ("tcp", "mqtt", "http", "coap", "grpc_push")
WITH_LOGINS = ("mqtt", "http", "coap")
# BENCH_TRANSPORTS=tcp,mqtt measures only those (tcp, mqtt and grpc_push are always kept).
TRANSPORTS = tuple(t for t in ALL_TRANSPORTS if t in {"tcp", "mqtt", "grpc_push", *os.environ.get(
    "BENCH_TRANSPORTS", ",".join(ALL_TRANSPORTS)).split(",")})
GOALS = {"grpc_push_over_tcp": 0.8, "mqtt_over_tcp": 0.5, "uplink_catchup_over_live": 3.0}


# -- set-up ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Fleet:
    region: int
    hospital: int
    logins: dict[str, list[tuple[int, str, str]]]  # per path: (device, user, password)
    live: list[int]                                  # the hospital's live load


def register(dsn: str) -> Fleet:
    """A hospital with DEVICES devices per path (a login each where the
    transport carries one) and LIVE_DEVICES for the hospital's live load."""
    per: dict[str, list[tuple[int, str, str]]] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        region = tenants_store.create_tenant(conn, "bench-region", "Bench region", "region")
        hospital = tenants_store.create_tenant(conn, "bench-hospital", "Bench hospital",
                                               "hospital", region)
        for transport in TRANSPORTS:
            devices = [store.register_device(conn, hospital, serial_no=f"{transport}-{i}")
                       for i in range(DEVICES)]
            per[transport] = [(d, *creds.issue(conn, d)) if transport in WITH_LOGINS
                              else (d, "", "") for d in devices]
        live = [store.register_device(conn, hospital, serial_no=f"live-{i}")
                for i in range(LIVE_DEVICES)]
    return Fleet(region, hospital, per, live)


def broker_logins(cfg: Config, dsn: str) -> bool:
    """The bench's logins and ACLs on the private broker; True if started here."""
    started = broker.Broker(cfg).start()
    with psycopg.connect(dsn) as conn:
        broker_auth.write_realm(cfg, creds.live(conn))
    broker.Broker(cfg).reload()
    time.sleep(0.5)  # the broker rereads its files when it handles the signal
    return started


def start_servers(env: dict[str, str]) -> list[subprocess.Popen[str]]:
    servers = [federation.spawn("rmiot.ingest.push_worker", env, "MTLS ")
               for _ in range(SERVERS)]
    time.sleep(1.0)  # MQTT subscriptions are made in the background
    return servers


@dataclasses.dataclass(frozen=True)
class Run:
    """One load generator run: points acknowledged OK, and the CPU it cost."""

    points: int
    seconds: float
    server_cpu: float
    broker_cpu: float

    @property
    def rate(self) -> float:
        return self.points / self.seconds


def run_load(transport: str, env: dict[str, str], args: list[str]) -> dict[str, Any]:
    if transport == "tcp":
        cmd = [sys.executable, str(HERE / "loadgen.py"), *args]
    elif transport == "grpc_push":
        cmd = [sys.executable, str(HERE / "federation.py"), "push", *args]
    else:
        cmd = [sys.executable, __file__, "--load", transport, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{transport} load generator failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    say(f"{transport}: {result}")
    return result


def main() -> None:
    if IMPL != "c":
        raise SystemExit("bench-transports measures the compiled decoder: build it (make) "
                         "and unset RMIOT_PURE")
    cfg, dsn, started_db = fresh_database(REGION_DB)
    _, hospital_dsn, _ = fresh_database(HOSPITAL_DB)
    cfg = dataclasses.replace(cfg, mqtt=dataclasses.replace(
        cfg.mqtt, enabled=True, topic_root=TOPIC_ROOT, share_group=TOPIC_ROOT))
    fleet = register(dsn)
    federation.mirror(hospital_dsn, fleet.region, fleet.hospital, fleet.live)
    cert = federation.platform_cert(cfg, dsn, fleet.hospital)
    started_broker = broker_logins(cfg, dsn)
    ports = {"tcp": free_port(), "http": free_port(), "coap": free_port(socket.SOCK_DGRAM),
             "grpc_push": free_port()}
    keys = tempfile.mkdtemp(prefix="rmiot-bench-keys-")
    logins = Path(keys) / "logins.json"
    logins.write_text(json.dumps(fleet.logins))
    base_env = {
        **os.environ,
        "RMIOT_SECURITY_KEYRING_DIR": keys,
        "RMIOT_LOG_LEVEL": "warning",
        "RMIOT_INGEST_DEVICE_RATE_PER_S": "1000000",
        "RMIOT_INGEST_TENANT_POINTS_PER_S": "100000000",
        "RMIOT_SECURITY_CALLER_RATE_PER_S": "100000",
        "RMIOT_SECURITY_TENANT_RATE_PER_S": "100000",
    }
    env = {
        **base_env,
        "RMIOT_DATABASE_NAME": REGION_DB,
        "RMIOT_INGEST_TCP_PORT": str(ports["tcp"]),
        "RMIOT_GRPC_PORT": str(free_port()), "RMIOT_GRPC_MTLS_PORT": str(ports["grpc_push"]),
        "RMIOT_MQTT_ENABLED": "true", "RMIOT_MQTT_TOPIC_ROOT": TOPIC_ROOT,
        "RMIOT_MQTT_SHARE_GROUP": TOPIC_ROOT,
        "RMIOT_HTTP_ENABLED": "true", "RMIOT_HTTP_PORT": str(ports["http"]),
        "RMIOT_COAP_ENABLED": "true", "RMIOT_COAP_PORT": str(ports["coap"]),
        "BENCH_CA": str(cfg.tls_path("ca_file")), "BENCH_CERT": str(cert),
    }
    result: dict[str, Any] = {"servers": SERVERS, "devices_per_transport": DEVICES,
                              "seconds_per_transport": SECONDS, "fields_per_frame": FIELDS,
                              "window_frames": WINDOW,
                              "mqtt_frames_per_message": MQTT_FRAMES,
                              "http_frames_per_request": HTTP_FRAMES,
                              "coap_frames_per_request": COAP_FRAMES,
                              "grpc_push_frames_per_request": federation.PUSH_FRAMES,
                              "grpc_push_streams": federation.PUSH_STREAMS}
    servers = start_servers(env)
    try:
        say(f"{SERVERS} ingest processes; {DEVICES} devices per path, {SECONDS} s each, "
            f"{FIELDS}-field frames with ACK_REQ")
        runs: dict[str, list[Run]] = {t: [] for t in TRANSPORTS}
        for round_no in range(ROUNDS):
            say(f"round {round_no + 1}/{ROUNDS}")
            for transport in TRANSPORTS:
                runs[transport].append(measure(transport, cfg, env, servers, ports, fleet,
                                               logins))
        say(f"uplink: live load {federation.LIVE_FPS} frames/s into the hospital, link cut "
            f"for {federation.OUTAGE_S} s")
        result.update(federation.catchup(base_env, ports["grpc_push"], free_port(),
                                         fleet.hospital, fleet.live, cert, HOSPITAL_DB,
                                         hospital_dsn, dsn, FIELDS))
    finally:
        federation.stop(servers)
        shutil.rmtree(keys, ignore_errors=True)
        federation.remove_cert(cfg)
        broker_auth.remove_realm(cfg)
        if started_broker:
            broker.Broker(cfg).stop()
        if started_db:
            cluster.Cluster(cfg).stop()
    for transport, done in runs.items():
        result[f"{transport}_points_per_s"] = statistics.median(r.rate for r in done)
        result[f"{transport}_points_per_s_rounds"] = [round(r.rate) for r in done]
        # Ingest processes' CPU per million points (and the broker's, for MQTT).
        per_m = 1e6 / max(1, sum(r.points for r in done))
        result[f"{transport}_server_cpu_s_per_mpoints"] = sum(r.server_cpu for r in done) * per_m
        if transport == "mqtt":
            result["mqtt_broker_cpu_s_per_mpoints"] = sum(r.broker_cpu for r in done) * per_m
    # Each round's figure over the TCP run of the same round (the machine's
    # load drifts; neighbours in time compare best), then the median of the rounds.
    for transport in ("mqtt", "grpc_push"):
        result[f"{transport}_over_tcp"] = statistics.median(
            m.rate / t.rate if t.rate else 0.0
            for t, m in zip(runs["tcp"], runs[transport], strict=True))
    say("goals: " + ", ".join(f"{k} {result[k]:.2f} (>= {v})" for k, v in GOALS.items()))
    result["goals_met"] = all(result[k] >= v for k, v in GOALS.items())
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                      for k, v in result.items()}), flush=True)


def measure(transport: str, cfg: Config, env: dict[str, str],
            servers: list[subprocess.Popen[str]], ports: dict[str, int], fleet: Fleet,
            logins: Path) -> Run:
    """One load run of one path."""
    first = fleet.logins[transport][0][0]
    if transport == "tcp":
        args = ["--port", str(ports["tcp"]), "--tenant", str(fleet.hospital),
                "--first-device", str(first), "--devices", str(DEVICES),
                "--seconds", str(SECONDS), "--fields", str(FIELDS),
                "--frames-per-device", str(max(1000, POOL_FRAMES // DEVICES)),
                "--window", str(WINDOW)]
    elif transport == "grpc_push":
        args = ["--port", str(ports["grpc_push"]), "--tenant", str(fleet.hospital),
                "--first-device", str(first), "--devices", str(DEVICES),
                "--seconds", str(SECONDS), "--fields", str(FIELDS),
                "--cert", env["BENCH_CERT"], "--ca", env["BENCH_CA"]]
    else:
        args = ["--port", str(ports.get(transport, broker.endpoint(cfg)[1])),
                "--tenant", str(fleet.hospital), "--logins", str(logins)]
    broker_pid = broker.Broker(cfg).pid() or 0
    cpu0 = sum(cpu_s(s.pid) for s in servers), cpu_s(broker_pid)
    load = run_load(transport, env, args)
    if load["other_statuses"] or load["unacked"]:
        raise RuntimeError(f"{transport}: frames not acknowledged OK: {load}")
    return Run(load["points_ok"], load["seconds"],
               sum(cpu_s(s.pid) for s in servers) - cpu0[0], cpu_s(broker_pid) - cpu0[1])


# -- the load generators (``--load mqtt|http|coap``, run in their own process) ----------

class Device:
    """One device's frames, sent in chunks, with a window of unacked frames."""

    def __init__(self, tenant: int, device: int, chunk: int, start_us: int) -> None:
        count = max(2000, POOL_FRAMES // DEVICES)  # as many as the TCP load's
        frames = [telemetry_frame(tenant, device, seq, start_us + seq * 1000, FIELDS)
                  for seq in range(count)]
        self.chunks = [b"".join(frames[i:i + chunk]) for i in range(0, count, chunk)]
        # Frames in each chunk: the last one may be short.
        self.sizes = [len(frames[i:i + chunk]) for i in range(0, count, chunk)]
        self.chunk = chunk
        self.next = 0
        self.inflight = 0
        self.ok = 0
        self.other = 0
        self.changed = asyncio.Event()

    def take_acks(self, data: bytes) -> None:
        ok, acks = acked_ok(data)
        self.ok += ok
        self.other += acks - ok
        self.inflight -= acks
        self.changed.set()

    def pop(self) -> bytes | None:
        if self.next >= len(self.chunks):
            return None
        chunk = self.chunks[self.next]
        self.inflight += self.sizes[self.next]
        self.next += 1
        return chunk


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _text(value: str) -> bytes:
    raw = value.encode()
    return len(raw).to_bytes(2, "big") + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


class MqttDevice(asyncio.Protocol):
    """A device's MQTT v5 client, just enough of one: CONNECT with its login,
    SUBSCRIBE to its down topic, PUBLISH QoS 1 (several at a time, as the
    broker's receive maximum allows), PUBACK what comes down. Packets are
    built and read by hand, so the generator's CPU goes to the sockets, not
    to a Python MQTT client (the acks are counted by slicing, as in loadgen.py)."""

    def __init__(self, dev: Device, device: int, user: str, password: str) -> None:
        self.dev = dev
        self.up = _text(f"{TOPIC_ROOT}/up/{device}")
        self.connect = _packet(0x10, _text("MQTT") + bytes((5, 0xC2)) + (60).to_bytes(2, "big")
                               + b"\x00" + _text(f"bench-{os.getpid()}-{device}") + _text(user)
                               + _text(password))
        self.subscribe = _packet(0x82, b"\x00\x01\x00" + _text(f"{TOPIC_ROOT}/down/{device}")
                                 + b"\x01")
        self.ready = asyncio.get_running_loop().create_future()
        self.buffer = b""
        self.next_id = 1
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.write(self.connect + self.subscribe)  # type: ignore[attr-defined]

    def publish(self, payload: bytes) -> None:
        assert self.transport is not None
        self.next_id = self.next_id % 65535 + 1
        self.transport.write(_packet(0x32, self.up + self.next_id.to_bytes(2, "big") + b"\x00"
                                     + payload))

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data if self.buffer else data
        at = 0
        while at + 2 <= len(buf):
            first = buf[at]
            length, shift, i = 0, 0, at + 1
            while i < len(buf):
                length |= (buf[i] & 0x7F) << shift
                shift += 7
                i += 1
                if not buf[i - 1] & 0x80:
                    break
            else:
                break
            if i + length > len(buf):
                break
            body = buf[i:i + length]
            at = i + length
            kind = first >> 4
            if kind == 3:  # PUBLISH: acks coming down; QoS 1 needs our PUBACK
                topic_end = 2 + int.from_bytes(body[:2], "big")
                qos = (first >> 1) & 3
                packet_id = body[topic_end:topic_end + 2] if qos else b""
                props, j = 0, topic_end + len(packet_id)
                shift = 0
                while True:
                    props |= (body[j] & 0x7F) << shift
                    shift += 7
                    j += 1
                    if not body[j - 1] & 0x80:
                        break
                self.dev.take_acks(body[j + props:])
                if packet_id:
                    assert self.transport is not None
                    self.transport.write(b"\x40\x02" + packet_id)
            elif kind == 2 and len(body) > 1 and body[1] and not self.ready.done():
                self.ready.set_exception(ConnectionError(f"CONNACK reason {body[1]}"))
            elif kind == 9 and not self.ready.done():  # SUBACK: ready to publish
                self.ready.set_result(None)
        self.buffer = buf[at:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("the broker closed the connection"))
        self.dev.changed.set()


async def mqtt_device(dev: Device, device: int, user: str, password: str, port: int,
                      deadline: float, window: int) -> None:
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_connection(
        lambda: MqttDevice(dev, device, user, password), "127.0.0.1", port)
    try:
        await asyncio.wait_for(client.ready, 10)
        while time.monotonic() < deadline:
            if dev.inflight + dev.chunk > window:
                dev.changed.clear()
                await dev.changed.wait()
                continue
            chunk = dev.pop()
            if chunk is None:
                break
            client.publish(chunk)
        async with asyncio.timeout(30):
            while dev.inflight > 0 and not transport.is_closing():
                dev.changed.clear()
                await dev.changed.wait()
    finally:
        transport.close()


async def http_device(dev: Device, session: Any, url: str, auth: str,
                      deadline: float) -> None:
    headers = {"Authorization": auth, "Content-Type": "application/octet-stream",
               "Accept": "application/octet-stream"}
    while time.monotonic() < deadline and (chunk := dev.pop()) is not None:
        async with session.post(url, data=chunk, headers=headers) as response:
            dev.take_acks(await response.read())


async def coap_device(dev: Device, uri: str, deadline: float) -> None:
    """A device of its own (own UDP socket): CoAP lets a client have one
    request outstanding per server (NSTART = 1), so devices sharing one
    client endpoint would queue behind each other."""
    import aiocoap

    context = await aiocoap.Context.create_client_context()
    try:
        while time.monotonic() < deadline and (chunk := dev.pop()) is not None:
            request = aiocoap.Message(code=aiocoap.POST, uri=uri, payload=chunk)
            request.opt.content_format = 42
            response = await context.request(request).response
            dev.take_acks(response.payload)
    finally:
        await context.shutdown()


async def load(transport: str, port: int, tenant: int,
               logins: list[tuple[int, str, str]]) -> dict[str, Any]:
    chunk = {"mqtt": MQTT_FRAMES, "http": HTTP_FRAMES, "coap": COAP_FRAMES}[transport]
    # Live data, like the TCP load's (benches/loadgen.py): frames over a
    # minute late would cost the writer a rollup mark the TCP path does not pay.
    start_us = time.time_ns() // 1000 - 10_000_000 - SECONDS * 1_000_000
    devices = [Device(tenant, d, chunk, start_us) for d, _, _ in logins]
    t0 = time.monotonic()
    cpu0 = time.process_time()
    deadline = t0 + SECONDS
    if transport == "mqtt":
        await asyncio.gather(*(mqtt_device(dev, d, user, pw, port, deadline, WINDOW)
                               for dev, (d, user, pw) in zip(devices, logins, strict=True)))
    elif transport == "http":
        import aiohttp

        at_once = max(1, WINDOW // chunk)  # requests in flight per device
        connector = aiohttp.TCPConnector(limit=len(devices) * at_once)
        async with aiohttp.ClientSession(connector=connector) as session:
            await asyncio.gather(*(
                http_device(dev, session, f"http://127.0.0.1:{port}/v1/devices/{d}/frames",
                            aiohttp.encode_basic_auth(user, pw), deadline)
                for dev, (d, user, pw) in zip(devices, logins, strict=True)
                for _ in range(at_once)))
    else:
        await asyncio.gather(*(
            coap_device(dev, f"coap://127.0.0.1:{port}/rmf/{d}?u={user}&p={pw}", deadline)
            for dev, (d, user, pw) in zip(devices, logins, strict=True)))
    elapsed = time.monotonic() - t0
    ok = sum(d.ok for d in devices)
    return {"frames_ok": ok, "points_ok": ok * FIELDS, "seconds": round(elapsed, 3),
            "other_statuses": sum(d.other for d in devices),
            "unacked": sum(max(d.inflight, 0) for d in devices),
            "cpu_s": round(time.process_time() - cpu0, 3)}


def load_main(argv: list[str]) -> None:
    import uvloop

    p = argparse.ArgumentParser()
    p.add_argument("--load", choices=("mqtt", "http", "coap"), required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tenant", type=int, required=True)
    p.add_argument("--logins", type=Path, required=True)
    args = p.parse_args(argv)
    logins = json.loads(args.logins.read_text())[args.load]
    print(json.dumps(uvloop.run(load(args.load, args.port, args.tenant, logins))), flush=True)


if __name__ == "__main__":
    if "--load" in sys.argv:
        load_main(sys.argv[1:])
    else:
        main()
