"""make bench-transports: the device transports' figures (issue 4), one run,
same machine, same ingest processes.

The ingest service runs as the platform runs it — ``rmiot.ingest.worker``,
BENCH_SERVERS processes (default: one per core) sharing the TCP, HTTP and
CoAP ports (SO_REUSEPORT) and one MQTT shared subscription — with every
transport enabled, against the private Mosquitto (real logins and ACLs
generated from the registry) and the private TimescaleDB. Then, one after
the other for BENCH_SECONDS each, a load generator (this file with ``--load``,
another process) plays BENCH_DEVICES devices on one transport, each keeping up
to BENCH_WINDOW (256) frames unacknowledged, like a device with a send buffer:

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
  one request: a protocol for constrained devices, not for bulk.

8-field telemetry frames with ACK_REQ; a point counts once acknowledged OK,
i.e. committed. Each transport has its own devices, so nothing is a
duplicate. Runs in its own database (rmiot_bench_transports), created afresh,
and its own topic root on the broker (removed at the end). Last line: one
JSON object with every figure; the goal is MQTT >= 0.5x TCP.

The machine's load drifts (the database, other work), so the transports take
turns for BENCH_ROUNDS (3) rounds: each figure is the median of its rounds,
and ``mqtt_over_tcp`` the median of each round's MQTT over that round's TCP.
Ingest (and broker) CPU seconds per million points come with them: those do
not depend on what else the machine does.
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

import psycopg
from common import fresh_database  # benches/common.py

from rmiot.config import Config
from rmiot.core_ext import ACK_OK, FLAG_ACK_REQ, IMPL, encode_ack, encode_frame
from rmiot.deploy import broker, broker_auth, cluster
from rmiot.registry import store
from rmiot.registry import transport_credentials as creds
from rmiot.tenants import store as tenants_store

HERE = Path(__file__).resolve().parent
SECONDS = int(os.environ.get("BENCH_SECONDS", "8"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
DEVICES = int(os.environ.get("BENCH_DEVICES", "50"))
SERVERS = int(os.environ.get("BENCH_SERVERS", str(os.cpu_count() or 1)))
# Unacknowledged frames a device may have out: the TCP load generator's default.
WINDOW = int(os.environ.get("BENCH_WINDOW", "256"))
MQTT_FRAMES = int(os.environ.get("BENCH_MQTT_FRAMES", "128"))
HTTP_FRAMES = int(os.environ.get("BENCH_HTTP_FRAMES", "128"))
COAP_FRAMES = int(os.environ.get("BENCH_COAP_FRAMES", "10"))  # ~0.9 kB: one datagram
FIELDS = 8
TOPIC_ROOT = "rmiot-bench"
ALL_TRANSPORTS = ("tcp", "mqtt", "http", "coap")
# BENCH_TRANSPORTS=tcp,mqtt measures only those (tcp and mqtt are always kept).
TRANSPORTS = tuple(t for t in ALL_TRANSPORTS if t in {"tcp", "mqtt", *os.environ.get(
    "BENCH_TRANSPORTS", ",".join(ALL_TRANSPORTS)).split(",")})
ACK_LEN = len(encode_ack(1, 1, 1, 0, ACK_OK))
STATUS_AT = ACK_LEN - 4 - 1  # the low byte of an ack's int32 status
VITALS = (72.0, 98.0, 16.0, 36.7, 120.0, 80.0, 93.3, 71.0)


def say(msg: str) -> None:
    print(msg, flush=True)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def acked_ok(data: bytes) -> tuple[int, int]:
    """(OK acks, all acks) in a run of ACK frames, by slicing: the status's
    low byte is at a fixed offset of each (statuses are 0..9)."""
    whole = len(data) - len(data) % ACK_LEN
    return data[STATUS_AT:whole:ACK_LEN].count(0), whole // ACK_LEN


# -- set-up ------------------------------------------------------------------------

def register(dsn: str) -> tuple[int, dict[str, list[tuple[int, str, str]]]]:
    """A hospital with DEVICES devices per transport, each with a login."""
    per: dict[str, list[tuple[int, str, str]]] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        region = tenants_store.create_tenant(conn, "bench-region", "Bench region", "region")
        hospital = tenants_store.create_tenant(conn, "bench-hospital", "Bench hospital",
                                               "hospital", region)
        for transport in TRANSPORTS:
            devices = [store.register_device(conn, hospital, serial_no=f"{transport}-{i}")
                       for i in range(DEVICES)]
            per[transport] = [(d, *creds.issue(conn, d)) for d in devices]
    return hospital, per


def broker_logins(cfg: Config, dsn: str) -> bool:
    """The bench's logins and ACLs on the private broker; True if started here."""
    started = broker.Broker(cfg).start()
    with psycopg.connect(dsn) as conn:
        broker_auth.write_realm(cfg, creds.live(conn))
    broker.Broker(cfg).reload()
    time.sleep(0.5)  # the broker rereads its files when it handles the signal
    return started


def start_servers(env: dict[str, str]) -> list[subprocess.Popen[str]]:
    servers = [subprocess.Popen([sys.executable, "-m", "rmiot.ingest.worker"], env=env,
                                stdout=subprocess.PIPE, text=True) for _ in range(SERVERS)]
    for server in servers:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"ingest server did not start: {line!r}")
    time.sleep(1.0)  # MQTT subscriptions are made in the background
    return servers


def stop_servers(servers: list[subprocess.Popen[str]]) -> None:
    for server in servers:
        server.terminate()
    for server in servers:
        server.wait(30)
        if server.stdout:
            server.stdout.close()


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


def cpu_s(pid: int) -> float:
    """user+sys CPU seconds of a process (0 if it is gone or not ours to read)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_load(transport: str, env: dict[str, str], args: list[str]) -> dict[str, Any]:
    if transport == "tcp":
        cmd = [sys.executable, str(HERE / "loadgen.py"), *args]
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
    cfg, dsn, started_db = fresh_database("rmiot_bench_transports")
    cfg = dataclasses.replace(cfg, mqtt=dataclasses.replace(
        cfg.mqtt, enabled=True, topic_root=TOPIC_ROOT, share_group=TOPIC_ROOT))
    tenant, devices = register(dsn)
    started_broker = broker_logins(cfg, dsn)
    ports = {"tcp": free_port(), "http": free_port(), "coap": free_port(socket.SOCK_DGRAM)}
    keys = tempfile.mkdtemp(prefix="rmiot-bench-keys-")
    logins = Path(keys) / "logins.json"
    logins.write_text(json.dumps(devices))
    env = {
        **os.environ,
        "RMIOT_DATABASE_NAME": "rmiot_bench_transports",
        "RMIOT_SECURITY_KEYRING_DIR": keys,
        "RMIOT_LOG_LEVEL": "warning",
        "RMIOT_INGEST_TCP_PORT": str(ports["tcp"]),
        "RMIOT_INGEST_DEVICE_RATE_PER_S": "1000000",
        "RMIOT_MQTT_ENABLED": "true", "RMIOT_MQTT_TOPIC_ROOT": TOPIC_ROOT,
        "RMIOT_MQTT_SHARE_GROUP": TOPIC_ROOT,
        "RMIOT_HTTP_ENABLED": "true", "RMIOT_HTTP_PORT": str(ports["http"]),
        "RMIOT_COAP_ENABLED": "true", "RMIOT_COAP_PORT": str(ports["coap"]),
    }
    result: dict[str, Any] = {"servers": SERVERS, "devices_per_transport": DEVICES,
                              "seconds_per_transport": SECONDS, "fields_per_frame": FIELDS,
                              "window_frames": WINDOW,
                              "mqtt_frames_per_message": MQTT_FRAMES,
                              "http_frames_per_request": HTTP_FRAMES,
                              "coap_frames_per_request": COAP_FRAMES}
    servers = start_servers(env)
    try:
        say(f"{SERVERS} ingest processes; {DEVICES} devices per transport, {SECONDS} s each, "
            f"{FIELDS}-field frames with ACK_REQ")
        runs: dict[str, list[Run]] = {t: [] for t in TRANSPORTS}
        for round_no in range(ROUNDS):
            for transport in TRANSPORTS:
                say(f"round {round_no + 1}/{ROUNDS}")
                runs[transport].append(measure(transport, cfg, env, servers, ports, tenant,
                                               devices, logins))
    finally:
        stop_servers(servers)
        shutil.rmtree(keys, ignore_errors=True)
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
    # Each round's MQTT over the TCP run just before it (the machine's load
    # drifts; neighbours in time compare best), then the median of the rounds.
    result["mqtt_over_tcp"] = statistics.median(
        m.rate / t.rate if t.rate else 0.0 for t, m in zip(runs["tcp"], runs["mqtt"], strict=True))
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                      for k, v in result.items()}), flush=True)


def measure(transport: str, cfg: Config, env: dict[str, str],
            servers: list[subprocess.Popen[str]], ports: dict[str, int], tenant: int,
            devices: dict[str, list[tuple[int, str, str]]],
            logins: Path) -> Run:
    """One load run of one transport."""
    first = devices[transport][0][0]
    if transport == "tcp":
        args = ["--port", str(ports["tcp"]), "--tenant", str(tenant),
                "--first-device", str(first), "--devices", str(DEVICES),
                "--seconds", str(SECONDS), "--fields", str(FIELDS),
                "--frames-per-device", str(max(1000, 3_000_000 // DEVICES)),
                "--window", str(WINDOW)]
    else:
        args = ["--port", str(ports.get(transport, broker.endpoint(cfg)[1])),
                "--tenant", str(tenant), "--logins", str(logins)]
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
        values = [(m + 1, 1, VITALS[m % len(VITALS)]) for m in range(FIELDS)]
        count = max(2000, 2_000_000 // DEVICES)
        frames = [encode_frame(1, tenant, device, seq, start_us + seq * 1000, values,
                               flags=FLAG_ACK_REQ) for seq in range(count)]
        self.chunks = [b"".join(frames[i:i + chunk]) for i in range(0, count, chunk)]
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
        self.next += 1
        self.inflight += self.chunk
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
    start_us = time.time_ns() // 1000 - 10_000_000 - 3_000_000_000
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
