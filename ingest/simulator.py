"""``rmiot simulate``: a city's hospitals and their devices sending to the
platform, with realistic rates (``rmiot.ingest.city``) and live progress on
the terminal.

Each bedside monitor and infusion pump has an RMF TCP connection of its own;
wearables, RFID tags, environment sensors and meters speak through a gateway
per hospital and kind of gateway (ward, RTLS, building), as in a hospital.
Over a mix of transports: with the platform's MQTT adapter enabled the
building gateways publish over MQTT, with its HTTP adapter the ward gateways
post over HTTP (each a registered gateway device with a fresh transport login
at every start); the rest is RMF TCP (``rmiot.ingest.sim_links``). Every frame
asks for an ack and is kept until it has OK or DUPLICATE, like a device with a
send buffer; after a lost connection a link reconnects (every second) and
resends what was not acknowledged. COMMAND frames are answered with a
COMMAND_RESULT (success), as a device would.

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
from typing import Any, TextIO

from rmiot import db
from rmiot.config import Config
from rmiot.core_ext import FLAG_ACK_REQ, encode_frame
from rmiot.ingest import city
from rmiot.ingest.sim_links import HttpLink, Link, MqttLink
from rmiot.registry import transport_credentials

log = logging.getLogger("rmiot.ingest.simulator")

TICK_S = 0.05
RECONNECT_S = 1.0
ABNORMAL_PER_HOUR = 2.0


@dataclass
class Simulation:
    """A running simulation (see the module docstring)."""

    hospitals: list[city.Hospital]
    host: str
    port: int
    speed: float = 1.0
    abnormal_per_hour: float = ABNORMAL_PER_HOUR
    # gateway name -> (transport, {gateway device id: its login}) for the
    # gateways that do not speak RMF TCP
    gateway_links: dict[str, tuple[str, dict[int, tuple[str, str]]]] = field(
        default_factory=dict)
    cfg: Config | None = None
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
                        link = gateways[gateway] = self._gateway_link(hospital, gateway)
                        self.links.append(link)
                else:
                    link = Link({}, self.stats, self.host, self.port)
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
            for link in self.links:
                link.tick()
            if not any(link.unacked and link.up for link in self.links):
                break
            await asyncio.sleep(0.05)
        await self.stop()

    async def stop(self) -> None:
        await self.stop_sending()
        for link in self.links:
            await link.close()

    def summary(self) -> str:
        """One line: what was sent, acknowledged and refused so far."""
        s = self.stats
        refused = sum(v for k, v in s.items() if k.startswith("refused_"))
        up = sum(1 for link in self.links if link.up)
        unacked = sum(len(link.unacked) for link in self.links)
        mix = " ".join(f"{name} {n}" for name, n in sorted(self.transports().items()))
        return (f"{len(self.hospitals)} hospitals, {self.devices} devices, {up}/{len(self.links)}"
                f" links ({mix}) | sent {s['sent']:,} ok {s['ok']:,} dup {s['duplicate']:,} "
                f"refused {refused:,} unacked {unacked:,} | abnormal {s['abnormal']:,} frames "
                f"in {s['episodes']:,} episodes")

    def _gateway_link(self, hospital: city.Hospital, gateway: str) -> Link:
        transport, logins = self.gateway_links.get(gateway, ("tcp", {}))
        device = hospital.gateways.get(gateway, 0)
        if self.cfg is not None and device in logins:
            if transport == "mqtt":
                return MqttLink({}, self.stats, self.cfg, device, logins[device])
            if transport == "http":
                return HttpLink({}, self.stats, self.cfg, device, logins[device])
        return Link({}, self.stats, self.host, self.port)

    def transports(self) -> Counter[str]:
        """Links per transport."""
        names: dict[type[Link], str] = {MqttLink: "mqtt", HttpLink: "http"}
        return Counter(names.get(type(link), "tcp") for link in self.links)

    async def _connect_all(self) -> None:
        limit = asyncio.Semaphore(200)

        async def connect(link: Link) -> None:
            async with limit:
                link.connecting = True
                try:
                    await link.open()
                finally:
                    link.connecting = False

        await asyncio.gather(*(connect(link) for link in self.links
                               if not link.up and not link.connecting))

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
            for link in self.links:
                link.tick()
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


# Gateways that do not speak RMF TCP when the platform's adapter is enabled.
GATEWAY_TRANSPORTS = {"building": "mqtt", "ward": "http"}


async def start_simulation(cfg: Config, city_name: str = "small", *, hospitals: int = 0,
                           host: str = "", port: int = 0, speed: float = 1.0,
                           abnormal_per_hour: float = ABNORMAL_PER_HOUR) -> Simulation:
    """Register the city (idempotent) and start it sending to the platform:
    RMF TCP to ``ingest.tcp_host``/``tcp_port`` unless given, and MQTT and
    HTTP gateways where those adapters are enabled."""
    shape = city.CITIES[city_name]
    if hospitals:
        shape = city.City(hospitals, shape.scale)
    enabled = {"mqtt": cfg.mqtt.enabled, "http": cfg.http.enabled}
    wanted = {g: t for g, t in GATEWAY_TRANSPORTS.items() if enabled[t]}

    def register() -> tuple[list[city.Hospital], int, dict[str, dict[int, tuple[str, str]]]]:
        with db.connect(db.app_dsn(cfg), autocommit=True) as conn:
            made, created = city.register(conn, shape)
            logins: dict[str, dict[int, tuple[str, str]]] = {g: {} for g in wanted}
            for hospital in made:
                for gateway in wanted:
                    device = hospital.gateways[gateway]
                    # A fresh login each start: the password is only known when issued.
                    transport_credentials.revoke(conn, device_id=device)
                    logins[gateway][device] = transport_credentials.issue(conn, device)
            return made, created, logins

    made, created, logins = await asyncio.to_thread(register)
    if created or logins:
        log.info("simulator registered devices", extra={"devices": created})
        # The ingest processes' device views and the broker's logins follow
        # within moments; links that connect too early retry every second.
        await asyncio.sleep(1.0)
    sim = Simulation(made, host or cfg.ingest.tcp_host, port or cfg.ingest.tcp_port, speed,
                     abnormal_per_hour,
                     gateway_links={g: (wanted[g], logins[g]) for g in wanted}, cfg=cfg)
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
            "(monitors, wearables, infusion pumps, ventilators, RFID tags, environment "
            "sensors, energy meters and air handling units)")
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
    if not any(link.up for link in sim.links):
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
