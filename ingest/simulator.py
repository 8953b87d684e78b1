"""``rmiot simulate``: a city's hospitals and their devices sending to the
platform over RMF TCP, with realistic rates (``rmiot.ingest.city``) and live
progress on the terminal.

Each bedside monitor and infusion pump has a connection of its own; wearables,
RFID tags, environment sensors and meters speak through a gateway connection
per hospital and kind of gateway (ward, RTLS, building), as in a hospital.
Every frame asks for an ack and is kept until it has OK or DUPLICATE, like a
device with a send buffer (``MAX_UNACKED`` frames per connection: past it the
oldest is dropped and counted); after a lost connection the link reconnects
(every second) and resends what was not acknowledged. COMMAND frames are
answered with a COMMAND_RESULT (success), as a device would.

For ``make run``: ``await start_simulation(cfg, "small")`` in the platform's
event loop returns a running ``Simulation`` (``await sim.stop()`` ends it);
``sim.summary()`` is one line of figures. ``add_parser``/``main`` are the
``rmiot simulate`` command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import itertools
import logging
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, TextIO, cast

from rmiot import db
from rmiot.config import Config
from rmiot.core_ext import (
    ACK_DUPLICATE,
    ACK_OK,
    FLAG_ACK_REQ,
    KIND_ACK,
    KIND_COMMAND,
    Frame,
    FrameDecoder,
    encode_frame,
)
from rmiot.ingest import city
from rmiot.ingest.client import command_result

log = logging.getLogger("rmiot.ingest.simulator")

MAX_UNACKED = 10_000
TICK_S = 0.05
RECONNECT_S = 1.0
ABNORMAL_PER_HOUR = 2.0


class Link(asyncio.Protocol):
    """One RMF TCP connection: a device's own, or a gateway's for several."""

    def __init__(self, devices: dict[int, city.Device], stats: Counter[str]) -> None:
        self.devices = devices
        self.stats = stats
        self.unacked: dict[tuple[int, int], bytes] = {}
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder()
        self.connecting = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.decoder = FrameDecoder()
        self.stats["connects"] += 1
        if self.unacked:
            self.stats["resent"] += len(self.unacked)
            self.transport.write(b"".join(self.unacked.values()))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.stats["disconnects"] += 1

    def send(self, device: int, seq: int, frame: bytes) -> None:
        if len(self.unacked) >= MAX_UNACKED:
            del self.unacked[next(iter(self.unacked))]
            self.stats["dropped_by_device"] += 1
        self.unacked[(device, seq)] = frame
        if self.transport is not None:
            self.transport.write(frame)

    def data_received(self, data: bytes) -> None:
        for ev in self.decoder.feed(data):
            if type(ev) is not Frame:
                continue
            if ev.kind == KIND_ACK:
                status = int(ev.fields()[0][2])  # type: ignore[call-overload]
                if status in (ACK_OK, ACK_DUPLICATE):
                    self.unacked.pop((ev.device, ev.seq), None)
                    self.stats["ok" if status == ACK_OK else "duplicate"] += 1
                else:
                    self.stats[f"refused_{status}"] += 1
            elif ev.kind == KIND_COMMAND and ev.device in self.devices:
                device = self.devices[ev.device]
                command_id = int(ev.fields()[0][2])  # type: ignore[call-overload]
                seq = device.next_seq()
                self.send(device.id, seq, command_result(
                    device.tenant, device.id, seq, time.time_ns() // 1000, command_id, 0))
                self.stats["commands"] += 1


@dataclass
class Simulation:
    """A running simulation (see the module docstring)."""

    hospitals: list[city.Hospital]
    host: str
    port: int
    speed: float = 1.0
    abnormal_per_hour: float = ABNORMAL_PER_HOUR
    stats: Counter[str] = field(default_factory=Counter)
    links: list[Link] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    _route: dict[int, Link] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def devices(self) -> int:
        return sum(len(h.devices) for h in self.hospitals)

    async def start(self) -> None:
        for hospital in self.hospitals:
            gateways: dict[str, Link] = {}
            for device in hospital.devices:
                gateway = device.kind.gateway
                if gateway:
                    link = gateways.get(gateway)
                    if link is None:
                        link = gateways[gateway] = Link({}, self.stats)
                        self.links.append(link)
                else:
                    link = Link({}, self.stats)
                    self.links.append(link)
                link.devices[device.id] = device
                self._route[device.id] = link
        await self._connect_all()
        self._tasks = [asyncio.create_task(self._send(), name="simulator-send"),
                       asyncio.create_task(self._reconnect(), name="simulator-reconnect")]

    async def stop_sending(self) -> None:
        """No more readings (acks still come in)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def finish(self, wait_s: float = 3.0) -> None:
        """Stop sending, give the last acks up to ``wait_s``, then stop."""
        await self.stop_sending()
        for _ in range(int(wait_s / 0.05)):
            if not any(link.unacked and link.transport for link in self.links):
                break
            await asyncio.sleep(0.05)
        await self.stop()

    async def stop(self) -> None:
        await self.stop_sending()
        for link in self.links:
            if link.transport is not None:
                link.transport.close()

    def summary(self) -> str:
        """One line: what was sent, acknowledged and refused so far."""
        s = self.stats
        refused = sum(v for k, v in s.items() if k.startswith("refused_"))
        up = sum(1 for link in self.links if link.transport is not None)
        unacked = sum(len(link.unacked) for link in self.links)
        return (f"{len(self.hospitals)} hospitals, {self.devices} devices, {up}/{len(self.links)}"
                f" connections | sent {s['sent']:,} ok {s['ok']:,} dup {s['duplicate']:,} "
                f"refused {refused:,} unacked {unacked:,} | abnormal {s['abnormal']:,} frames "
                f"in {s['episodes']:,} episodes")

    async def _connect_all(self) -> None:
        loop = asyncio.get_running_loop()
        limit = asyncio.Semaphore(200)

        async def connect(link: Link) -> None:
            async with limit:
                link.connecting = True
                try:
                    await loop.create_connection(lambda: link, self.host, self.port)
                except OSError:
                    self.stats["connect_failures"] += 1
                finally:
                    link.connecting = False

        await asyncio.gather(*(connect(link) for link in self.links
                               if link.transport is None and not link.connecting))

    async def _reconnect(self) -> None:
        while True:
            await asyncio.sleep(RECONNECT_S)
            await self._connect_all()

    async def _send(self) -> None:
        """Each device reports when due; the first report of each is spread
        over its interval so the load is even."""
        now = time.monotonic()
        order = itertools.count()
        due: list[tuple[float, int, city.Device]] = []
        for hospital in self.hospitals:
            for device in hospital.devices:
                interval = device.kind.interval_s / self.speed
                heapq.heappush(due, (now + device.rng.uniform(0, interval), next(order), device))
        while True:
            now = time.monotonic()
            ts_us = time.time_ns() // 1000
            while due and due[0][0] <= now:
                at, _, device = heapq.heappop(due)
                self._report(device, ts_us)
                heapq.heappush(due, (at + device.kind.interval_s / self.speed, next(order),
                                     device))
            await asyncio.sleep(TICK_S)

    def _report(self, device: city.Device, ts_us: int) -> None:
        was = device.episode
        fields, abnormal = device.reading(self.abnormal_per_hour)
        if abnormal:
            self.stats["abnormal"] += 1
            if not was:
                self.stats["episodes"] += 1
        seq = device.next_seq()
        frame = encode_frame(device.kind.frame_kind, device.tenant, device.id, seq, ts_us,
                             fields, flags=FLAG_ACK_REQ)
        self._route[device.id].send(device.id, seq, frame)
        self.stats["sent"] += 1
        self.stats["points"] += len(fields)


async def start_simulation(cfg: Config, city_name: str = "small", *, hospitals: int = 0,
                           host: str = "", port: int = 0, speed: float = 1.0,
                           abnormal_per_hour: float = ABNORMAL_PER_HOUR) -> Simulation:
    """Register the city (idempotent) and start it sending to the platform's
    RMF TCP port (``ingest.tcp_host``/``tcp_port`` unless given)."""
    shape = city.CITIES[city_name]
    if hospitals:
        shape = city.City(hospitals, shape.scale)

    def register() -> tuple[list[city.Hospital], int]:
        with db.connect(db.app_dsn(cfg), autocommit=True) as conn:
            return city.register(conn, shape)

    made, created = await asyncio.to_thread(register)
    if created:
        log.info("simulator registered devices", extra={"devices": created})
        await asyncio.sleep(1.0)  # the ingest processes' device views follow within ms
    sim = Simulation(made, host or cfg.ingest.tcp_host, port or cfg.ingest.tcp_port, speed,
                     abnormal_per_hour)
    await sim.start()
    return sim


async def report(sim: Simulation, out: TextIO, every_s: float) -> None:
    """Live progress: one line rewritten in place on a terminal, else a line
    every ``every_s`` seconds."""
    tty = out.isatty()
    last_sent, last_points, last_at = 0, 0, time.monotonic()
    while True:
        await asyncio.sleep(1.0 if tty else every_s)
        now = time.monotonic()
        span = max(now - last_at, 1e-6)
        sent, points = sim.stats["sent"], sim.stats["points"]
        rate = f"{(sent - last_sent) / span:,.0f} frames/s ({(points - last_points) / span:,.0f}"\
               f" points/s)"
        last_sent, last_points, last_at = sent, points, now
        line = f"[{now - sim.started:6.0f} s] {rate} | {sim.summary()}"
        out.write(f"\r{line}\x1b[K" if tty else f"{line}\n")
        out.flush()


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    text = ("simulate a city's hospitals and devices sending to the platform "
            "(monitors, wearables, infusion pumps, RFID tags, environment and energy meters)")
    parser: argparse.ArgumentParser = subparsers.add_parser("simulate", help=text,
                                                            description=text)
    parser.add_argument("--city", choices=sorted(city.CITIES), default="small",
                        help="small: 3 hospitals (~50 frames/s); medium: 10 (~340/s); "
                             "large: 40 (~2,700/s)")
    parser.add_argument("--hospitals", type=int, default=0, help="override the hospital count")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long "
                        "(default: until Ctrl-C)")
    parser.add_argument("--host", default="", help="RMF TCP host (default: ingest.tcp_host)")
    parser.add_argument("--port", type=int, default=0, help="RMF TCP port (default: "
                        "ingest.tcp_port)")
    parser.add_argument("--speed", type=float, default=1.0,
                        help="multiply every device's rate (load tests)")
    parser.add_argument("--abnormal-per-hour", type=float, default=ABNORMAL_PER_HOUR,
                        help="abnormal-vitals episodes per monitor an hour")
    return parser


def main(cfg: Config, args: argparse.Namespace) -> int:
    import uvloop

    if args.speed <= 0 or args.hospitals < 0:
        print("rmiot: --speed must be > 0 and --hospitals >= 0", file=sys.stderr)
        return 2
    return int(uvloop.run(_run(cfg, args)))


async def _run(cfg: Config, args: argparse.Namespace) -> int:
    sim = await start_simulation(cfg, args.city, hospitals=args.hospitals, host=args.host,
                                 port=args.port, speed=args.speed,
                                 abnormal_per_hour=args.abnormal_per_hour)
    shape = city.CITIES[args.city]
    expected = city.frames_per_second(city.City(args.hospitals or shape.hospitals, shape.scale))
    print(f"simulating {len(sim.hospitals)} hospitals, {sim.devices} devices "
          f"(~{expected * args.speed:,.0f} frames/s) -> {sim.host}:{sim.port}; Ctrl-C stops",
          flush=True)
    if not any(link.transport for link in sim.links):
        print(f"rmiot: nothing listens on {sim.host}:{sim.port} yet; retrying every second",
              file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    progress = asyncio.create_task(report(sim, sys.stdout, 10.0))
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(args.seconds or None):
            await stop.wait()
    progress.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await progress
    await sim.finish()
    print(f"\n{sim.summary()}", flush=True)
    return 0
