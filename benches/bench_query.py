"""make bench-query: the query tiers of issue 7 on a district's worth of data.

1. the dataset (``rmiot dataset generate``: 50 hospitals, 10,000 devices, 30
   days, 121 million points) in its own database, ``rmiot_dataset``, built the
   first time and reused after (its ``dataset_info`` marker);
2. the platform's gRPC server — SecurityServices' interceptor (session,
   rate limits, authorisation, audit) in front of QueryService, over TLS — in a
   process of its own (``--serve``), as the platform runs it;
3. ``CONCURRENCY`` clients, each on its own TLS channel and logged in, call
   per tier: first back to back for ``BENCH_SECONDS / 2`` (the tier's capacity
   on this machine, and its saturated latencies), then for ``BENCH_SECONDS``
   with calls arriving at random times at ``BENCH_LOAD`` (0.5) of that
   capacity — the latencies reported as the tier's: simple (Latest, Raw over an hour, Binding of
   random devices), complex (aggregates of a district, a hospital, a
   department, at day, hour, minute and raw resolution, with percentiles and
   with commission-role suppression; fleet status; energy), and batches of 20
   mixed queries. Every call must succeed;
4. service overhead: one client, one Latest at a time through gRPC (auth and
   audit included) against the same statement on a direct connection.

Last line: one JSON object with every figure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import psycopg
import uvloop
from common import cpu_s, postgres_cpu_s  # benches/common.py

from rmiot import db
from rmiot.config import Config, load
from rmiot.deploy import cluster
from rmiot.grpc_server import GrpcServer, channel
from rmiot.proto import query_pb2 as pb
from rmiot.proto import query_pb2_grpc
from rmiot.query import calendar, dataset, simple
from rmiot.query.service import RULES, QueryService
from rmiot.security import identity
from rmiot.security.service import SecurityServices
from rmiot.security.sm4 import Keyring

SECONDS = float(os.environ.get("BENCH_SECONDS", "20"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "8"))
# The tiers' latencies are taken with the clients' calls arriving at this share
# of the capacity measured just before (closed loop, back to back); both are
# reported. At saturation a latency is only the queue the clients make.
LOAD = float(os.environ.get("BENCH_LOAD", "0.5"))
OVERHEAD_CALLS = 400
PASSWORD = "Bench-Query-9"
USERS = {"bench-admin": ("hospital_admin", "district"),
         "bench-analyst": ("commission_analyst", "region")}

Call = Callable[[random.Random], Awaitable[Any]]


def say(msg: str) -> None:
    print(msg, flush=True)


def bench_config() -> Config:
    cfg = dataset.configured(load(), dataset.DEFAULT_DATABASE)
    return dataclasses.replace(
        cfg, grpc=dataclasses.replace(cfg.grpc, port=0, mtls_port=0),
        security=dataclasses.replace(cfg.security, caller_rate_per_s=1e6, tenant_rate_per_s=1e6))


# -- the server process -------------------------------------------------------------

async def serve() -> None:
    cfg = bench_config()
    security = SecurityServices(cfg)
    security.add_rules(RULES)
    await security.start()
    query = QueryService(cfg, security.authorizer)
    await query.start()
    server = GrpcServer(cfg, services=query.services(), interceptors=[security.interceptor])
    port = await server.start()
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)
    await query.stop()
    await security.stop()


# -- set-up ---------------------------------------------------------------------------

@dataclasses.dataclass
class Fixture:
    info: dataset.DatasetInfo
    region: int
    district: int
    hospitals: list[int]
    departments: list[int]
    devices: list[int]
    monitors: list[int]
    tokens: dict[str, str]
    minute_horizon: dt.datetime | None


def prepare(cfg: Config) -> tuple[Fixture, float | None]:
    built = None
    info = dataset.existing(cfg)
    if info is None or info.spec != dataset.DatasetSpec():
        say("building the dataset (first run only)...")
        t0 = time.perf_counter()
        info = dataset.generate(cfg, dataset.DatasetSpec(), progress=dataset.ProgressBar())
        built = time.perf_counter() - t0
    dsn = db.app_dsn(cfg)
    with psycopg.connect(db.admin_dsn(cfg), autocommit=True) as conn:
        tops: dict[str, int] = dict(conn.execute("SELECT level, min(id) FROM tenants "
                                 "WHERE level IN ('region', 'district') GROUP BY 1").fetchall())
        region, district = tops["region"], tops["district"]
        hospitals = [r[0] for r in conn.execute(
            "SELECT id FROM tenants WHERE level = 'hospital' ORDER BY id")]
        departments = [r[0] for r in conn.execute(
            "SELECT id FROM tenants WHERE level = 'department' AND name = ANY (%s) ORDER BY id",
            (list(dataset.DEPARTMENTS),))]
        devices = [r[0] for r in conn.execute(
            "SELECT id FROM devices WHERE state = 'active' ORDER BY id")]
        monitors = [r[0] for r in conn.execute(
            "SELECT device_id FROM device_bindings WHERE unbound_at IS NULL ORDER BY 1")]
        horizon = conn.execute(
            "SELECT value FROM rollup_state WHERE key = 'minute.horizon'").fetchone()
        for user, (role, where) in USERS.items():
            conn.execute("INSERT INTO authz_grants (subject, role, tenant_id) VALUES "
                         "(%s, %s, %s) ON CONFLICT DO NOTHING",
                         (f"user:{user}", role, region if where == "region" else district))
    tokens = asyncio.run(_logins(cfg, dsn, district))
    return Fixture(info, region, district, hospitals, departments, devices, monitors, tokens,
                   horizon[0] + dt.timedelta(minutes=10) if horizon else None), built


async def _logins(cfg: Config, dsn: str, home: int) -> dict[str, str]:
    tokens = {}
    keyring = Keyring.load(cfg.keyring_dir)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for user in USERS:
            cur = await conn.execute("SELECT 1 FROM users WHERE username = %s", (user,))
            if await cur.fetchone() is None:
                await identity.create_user(conn, user, PASSWORD, home, must_change=False)
            result = await identity.login(conn, cfg.security, keyring, user, PASSWORD, "",
                                          "bench", lambda _: False)
            tokens[user] = result.token
    return tokens


# -- the workloads ----------------------------------------------------------------------

class Workload:
    """Random requests of each tier, against the dataset's own time range."""

    def __init__(self, fx: Fixture) -> None:
        self.fx = fx
        self.hi = fx.info.hi

    def us(self, ts: dt.datetime) -> int:
        return calendar.to_us(ts)

    def simple(self, rng: random.Random) -> tuple[str, Any]:
        pick = rng.random()
        if pick < 0.5:
            return "Latest", pb.LatestRequest(device_id=rng.choice(self.fx.devices))
        if pick < 0.85:
            start = self.hi - dt.timedelta(minutes=rng.randrange(60, 7 * 24 * 60))
            return "Raw", pb.RawRequest(device_id=rng.choice(self.fx.devices),
                                        from_us=self.us(start),
                                        to_us=self.us(start + calendar.HOUR))
        return "Binding", pb.BindingRequest(device_id=rng.choice(self.fx.monitors))

    def complex(self, rng: random.Random) -> tuple[str, Any, str]:
        fx, hi = self.fx, self.hi
        day_ago, week_ago = self.us(hi - calendar.DAY), self.us(hi - 7 * calendar.DAY)
        metric = rng.randrange(1, 9)
        choices: list[tuple[str, Any, str]] = [
            ("Aggregate", pb.AggregateRequest(
                tenant_id=fx.district, metrics=[metric], kinds=["monitor"],
                from_us=self.us(hi - 30 * calendar.DAY), to_us=self.us(hi), bucket_s=86400,
                group_by=pb.GROUP_HOSPITAL), "bench-admin"),
            ("Aggregate", pb.AggregateRequest(
                tenant_id=rng.choice(fx.hospitals), metrics=[metric], from_us=day_ago,
                to_us=self.us(hi), bucket_s=3600, group_by=pb.GROUP_DEPARTMENT,
                percentiles=[0.5, 0.95]), "bench-admin"),
            ("Aggregate", pb.AggregateRequest(
                tenant_id=fx.district, metrics=[metric], from_us=week_ago, to_us=self.us(hi),
                bucket_s=86400, group_by=pb.GROUP_KIND), "bench-admin"),
            ("Aggregate", pb.AggregateRequest(
                tenant_id=rng.choice(fx.departments), metrics=[1, 2], from_us=day_ago,
                to_us=self.us(hi), bucket_s=3600, group_by=pb.GROUP_DEVICE,
                percentiles=[0.5]), "bench-admin"),
            ("Aggregate", pb.AggregateRequest(
                tenant_id=fx.region, metrics=[metric], kinds=["monitor"], from_us=week_ago,
                to_us=self.us(hi), bucket_s=86400, group_by=pb.GROUP_HOSPITAL,
                percentiles=[0.5, 0.9]), "bench-analyst"),
            ("FleetStatus", pb.FleetRequest(tenant_id=fx.district,
                                            group_by=pb.GROUP_HOSPITAL), "bench-admin"),
            ("Energy", pb.EnergyRequest(
                tenant_id=fx.district, by_hospital=True,
                from_date=calendar.local_date(hi - 30 * calendar.DAY).isoformat(),
                to_date=calendar.local_date(hi).isoformat()), "bench-analyst"),
        ]
        lo = hi - dt.timedelta(hours=6)
        if fx.minute_horizon is not None and lo >= fx.minute_horizon:
            choices.append(("Aggregate", pb.AggregateRequest(
                tenant_id=fx.district, metrics=[metric], from_us=self.us(lo),
                to_us=self.us(hi), bucket_s=900, group_by=pb.GROUP_HOSPITAL), "bench-admin"))
        return rng.choice(choices)

    def batch(self, rng: random.Random) -> pb.BatchRequest:
        items = []
        for i in range(20):
            if i % 2:
                method, request = self.simple(rng)
            else:
                method, request, _ = self.complex(rng)
                while method == "Aggregate" and request.tenant_id == self.fx.region:
                    method, request, _ = self.complex(rng)  # the admin's batch: its own reach
            field = {"Latest": "latest", "Raw": "raw", "Binding": "binding",
                     "Aggregate": "aggregate", "FleetStatus": "fleet", "Energy": "energy"}[method]
            item = pb.BatchItem(id=str(i))
            getattr(item, field).CopyFrom(request)
            items.append(item)
        return pb.BatchRequest(items=items)


class Clients:
    def __init__(self, cfg: Config, port: int, tokens: dict[str, str]) -> None:
        c = dataclasses.replace(cfg, grpc=dataclasses.replace(cfg.grpc, port=port))
        self.channels = [channel(c) for _ in range(CONCURRENCY)]
        self.stubs = [query_pb2_grpc.QueryServiceStub(ch) for ch in self.channels]
        self.tokens = tokens
        self.errors: list[str] = []

    async def call(self, i: int, method: str, request: Any, user: str = "bench-admin") -> Any:
        rpc = getattr(self.stubs[i % len(self.stubs)], method)
        try:
            return await rpc(request, metadata=(("authorization",
                                                 f"Bearer {self.tokens[user]}"),), timeout=30)
        except grpc.aio.AioRpcError as exc:
            self.errors.append(f"{method}: {exc.code().name} {exc.details()}")
            return None

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close(None)


async def phase(clients: Clients, seconds: float,
                one: Callable[[int, random.Random], Awaitable[Any]],
                rate: float | None = None) -> list[float]:
    """``CONCURRENCY`` clients calling for ``seconds``; latencies in ms.

    Without ``rate``, back to back (closed loop: the machine saturated, and the
    latency is the queue the clients themselves make). With ``rate`` (calls a
    second, all clients together), each client starts its calls at random
    (Poisson) times averaging ``rate / CONCURRENCY`` a second, as dashboards
    and hospital systems do; a call still running delays the client's next."""
    latencies: list[float] = []
    end = time.monotonic() + seconds

    async def client(i: int) -> None:
        rng = random.Random(1000 + i)
        due = time.monotonic()
        while time.monotonic() < end:
            if rate is not None:
                due += rng.expovariate(rate / CONCURRENCY)
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            t0 = time.perf_counter()
            await one(i, rng)
            latencies.append((time.perf_counter() - t0) * 1000)

    await asyncio.gather(*(client(i) for i in range(CONCURRENCY)))
    return latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(cfg: Config, fx: Fixture, port: int, server_pid: int) -> dict[str, Any]:
    work = Workload(fx)
    clients = Clients(cfg, port, fx.tokens)
    resolutions: dict[str, int] = {}

    async def simple_one(i: int, rng: random.Random) -> None:
        method, request = work.simple(rng)
        await clients.call(i, method, request)

    async def complex_one(i: int, rng: random.Random) -> None:
        method, request, user = work.complex(rng)
        reply = await clients.call(i, method, request, user)
        if method == "Aggregate" and reply is not None:
            resolutions[reply.resolution] = resolutions.get(reply.resolution, 0) + 1

    async def batch_one(i: int, rng: random.Random) -> None:
        reply = await clients.call(i, "Batch", work.batch(rng))
        if reply is not None:
            clients.errors += [f"batch item {r.id}: {r.code} {r.message}"
                               for r in reply.results if r.code]

    try:
        for one in (simple_one, complex_one, batch_one):  # warm pools, caches, plans
            await phase(clients, 2.0, one)
        clients.errors.clear()
        figures: dict[str, Any] = {}
        for name, one in (("simple", simple_one), ("complex", complex_one),
                          ("batch20", batch_one)):
            # Capacity first (closed loop), then the latency at LOAD of it.
            saturated = await phase(clients, SECONDS / 2, one)
            capacity = len(saturated) / (SECONDS / 2)
            figures[f"{name}_capacity_per_s"] = capacity
            figures[f"{name}_saturated_p50_ms"] = pct(saturated, 0.50)
            figures[f"{name}_saturated_p99_ms"] = pct(saturated, 0.99)
            cpu0 = (cpu_s(server_pid), postgres_cpu_s(), cpu_s(os.getpid()))
            lat = await phase(clients, SECONDS, one, rate=LOAD * capacity)
            used = [b - a for a, b in zip(cpu0, (cpu_s(server_pid), postgres_cpu_s(),
                                                  cpu_s(os.getpid())), strict=True)]
            figures[f"{name}_calls"] = len(lat)
            figures[f"{name}_p50_ms"] = pct(lat, 0.50)
            figures[f"{name}_p99_ms"] = pct(lat, 0.99)
            # Where the machine's cores went, per call (ms of CPU).
            for part, spent in zip(("server", "postgres", "clients"), used, strict=True):
                figures[f"{name}_cpu_ms_{part}"] = spent * 1000 / max(1, len(lat))
            say(f"{name}: capacity {capacity:.0f} calls/s with {CONCURRENCY} clients back to back "
                f"(p50 {pct(saturated, 0.5):.1f} ms, p99 {pct(saturated, 0.99):.1f} ms); "
                f"at {LOAD:.0%} of it: {len(lat)} calls in {SECONDS:g} s, "
                f"p50 {pct(lat, 0.5):.1f} ms, p99 {pct(lat, 0.99):.1f} ms; CPU per call: "
                + ", ".join(f"{part} {spent * 1000 / max(1, len(lat)):.2f} ms" for part, spent
                            in zip(("server", "postgres", "clients"), used, strict=True)))
        figures.update(await overhead(cfg, fx, clients))
        figures["aggregate_resolutions"] = resolutions
        figures["errors"] = len(clients.errors)
        if clients.errors:
            say(f"ERRORS ({len(clients.errors)}), first: {clients.errors[:3]}")
        return figures
    finally:
        await clients.close()


async def overhead(cfg: Config, fx: Fixture, clients: Clients) -> dict[str, float]:
    """One Latest at a time: through gRPC, and the same statement directly on a
    connection set up as the simple tier's (prepared, generic plan)."""
    rng = random.Random(7)
    picks = [rng.choice(fx.devices) for _ in range(OVERHEAD_CALLS)]
    via_grpc, direct = [], []
    async with await psycopg.AsyncConnection.connect(
            db.app_dsn(cfg), autocommit=True, prepare_threshold=0,
            options="-c plan_cache_mode=force_generic_plan -c statement_timeout=1000") as conn:
        for round_ in range(2):  # the first round warms both paths
            for device in picks:
                t0 = time.perf_counter()
                await clients.call(0, "Latest", pb.LatestRequest(device_id=device))
                grpc_ms = (time.perf_counter() - t0) * 1000
                t0 = time.perf_counter()
                cur = await conn.execute(simple.LATEST_SQL,
                                         {"device": device, "depth": simple.LATEST_DEPTH})
                await cur.fetchall()
                direct_ms = (time.perf_counter() - t0) * 1000
                if round_:
                    via_grpc.append(grpc_ms)
                    direct.append(direct_ms)
    g, s = statistics.median(via_grpc), statistics.median(direct)
    say(f"overhead: Latest through gRPC p50 {g:.2f} ms, the same SQL directly p50 {s:.2f} ms")
    return {"grpc_latest_p50_ms": g, "direct_sql_p50_ms": s, "service_overhead_p50_ms": g - s}


def main() -> None:
    if "--serve" in sys.argv:
        uvloop.run(serve())
        return
    cfg = bench_config()
    started = cluster.Cluster(cfg).start() if cfg.database.private else False
    try:
        fx, built = prepare(cfg)
        say(f"dataset: {fx.info.frames:,} frames, {fx.info.points:,} points, "
            f"{len(fx.hospitals)} hospitals, {len(fx.devices):,} active devices, "
            f"{fx.info.lo:%Y-%m-%d} to {fx.info.hi:%Y-%m-%d}"
            + (f" (built now in {built:.0f} s)" if built else " (reused)"))
        server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE,
                                  text=True, env={**os.environ, "RMIOT_LOG_LEVEL": "warning"})
        try:
            assert server.stdout is not None
            line = server.stdout.readline()
            if not line.startswith("PORT "):
                raise RuntimeError(f"the query server did not start: {line!r}")
            figures = uvloop.run(measure(cfg, fx, int(line.split()[1]), server.pid))
        finally:
            server.terminate()
            server.wait(30)
    finally:
        if started:
            cluster.Cluster(cfg).stop()
    result = {"points": fx.info.points, "frames": fx.info.frames, **figures,
              "concurrency": CONCURRENCY, "load_of_capacity": LOAD,
              "load_average_1m": os.getloadavg()[0], "dataset_build_s": built}
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                      for k, v in result.items()}), flush=True)


if __name__ == "__main__":
    main()
