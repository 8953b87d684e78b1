"""A small district with two days of data, its rollups built, users with roles,
and a real QueryService behind the security interceptor over TLS.

District D under region R: hospital A with departments A1 (12 monitors, a
meter) and A2 (3 monitors, a meter), hospital B with department B1 (4
monitors). Monitors send metrics 1-4 every 10 minutes (metric 4 is around zero,
negative included; one value is NaN); meters send metric 1 (kWh) every hour,
also a month and a year earlier. A patient is bound to A2's first monitor by a
binding made in A1, from the middle of the data on.

Tokens come from ``identity.login`` directly (the second factor is
AuthService's business, tested in tests/security).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from grpc import aio

from rmiot.config import Config
from rmiot.grpc_server import GrpcServer, channel
from rmiot.proto import query_pb2_grpc
from rmiot.query import calendar, rollups
from rmiot.query.service import RULES, QueryService
from rmiot.query.tiers import QueryOptions
from rmiot.security import identity
from rmiot.security.patient_keys import PatientKeys, register_patient
from rmiot.security.patients import PatientIdentity, pseudonym_key
from rmiot.security.service import SecurityServices
from rmiot.security.sm4 import Keyring
from rmiot.tenants import store as tenants

PASSWORD = "Query-Test-9"
_run = itertools.count()
ROLES = {  # user -> (role, tenant attribute)
    "admin_d": ("hospital_admin", "district"),
    "admin_a": ("hospital_admin", "hospital_a"),
    "admin_b": ("hospital_admin", "hospital_b"),
    "analyst": ("commission_analyst", "region"),
    "clinician_a1": ("clinician", "a1"),
}


@dataclass
class District:
    dsn: str
    admin_dsn: str
    cfg: Config
    region: int = 0
    district: int = 0
    hospital_a: int = 0
    hospital_b: int = 0
    a1: int = 0
    a2: int = 0
    b1: int = 0
    monitor_model: int = 0
    meter_model: int = 0
    monitors: dict[int, list[int]] = field(default_factory=dict)  # department -> devices
    meters: list[int] = field(default_factory=list)
    patient: int = 0
    bound_device: int = 0
    bound_at: dt.datetime = calendar.EPOCH
    base: dt.datetime = calendar.EPOCH   # the data: [base, end)
    end: dt.datetime = calendar.EPOCH
    tokens: dict[str, str] = field(default_factory=dict)

    def conn(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True)

    @property
    def devices(self) -> list[int]:
        return [d for ds in self.monitors.values() for d in ds] + self.meters


def _build(database: str, admin_dsn: str, cfg: Config, keys_dir: Path) -> District:
    run = f"{next(_run)}{time.time_ns() % 10**9}"
    today = calendar.floor(dt.datetime.now(dt.UTC), calendar.DAY)
    d = District(database, admin_dsn, cfg, base=today - 2 * calendar.DAY, end=today)
    with d.conn() as conn:
        d.region = tenants.create_tenant(conn, f"qr-{run}", "Region", "region")
        d.district = tenants.create_tenant(conn, f"qd-{run}", "District", "district", d.region)
        d.hospital_a = tenants.create_tenant(conn, f"qa-{run}", "Hospital A", "hospital",
                                             d.district)
        d.hospital_b = tenants.create_tenant(conn, f"qb-{run}", "Hospital B", "hospital",
                                             d.district)
        d.a1 = tenants.create_tenant(conn, f"qa1-{run}", "ICU", "department", d.hospital_a)
        d.a2 = tenants.create_tenant(conn, f"qa2-{run}", "Ward", "department", d.hospital_a)
        d.b1 = tenants.create_tenant(conn, f"qb1-{run}", "Cardiology", "department",
                                     d.hospital_b)
        row = conn.execute("INSERT INTO vendors (code, name) VALUES (%s, 'Vendor') "
                           "RETURNING id", (f"qv-{run}",)).fetchone()
        assert row is not None
        models = conn.execute(
            "INSERT INTO device_models (vendor_id, name, kind) VALUES "
            "(%(v)s, 'Monitor M1', 'monitor'), (%(v)s, 'Meter E1', 'meter') RETURNING id",
            {"v": row[0]}).fetchall()
        d.monitor_model, d.meter_model = models[0][0], models[1][0]
        for dept, hospital, count in ((d.a1, d.hospital_a, 12), (d.a2, d.hospital_a, 3),
                                      (d.b1, d.hospital_b, 4)):
            d.monitors[dept] = _devices(conn, hospital, dept, d.monitor_model, count)
            if hospital == d.hospital_a:
                d.meters += _devices(conn, hospital, dept, d.meter_model, 1)
        _telemetry(conn, d)
        # A keyring of this module's own: patients' key files are named by id,
        # and other databases' patients share ids with ours.
        keyring = Keyring.load(keys_dir)
        d.patient, _ = register_patient(conn, PatientKeys(keyring), pseudonym_key(keys_dir),
                                        d.a1, PatientIdentity("张三", f"1101011990{run[-8:]:0>8}"))
        d.bound_device = d.monitors[d.a2][0]
        d.bound_at = d.base + dt.timedelta(hours=30)
        conn.execute("INSERT INTO device_bindings (device_id, tenant_id, patient_id, bed, "
                     "bound_at, bound_by) VALUES (%s, %s, %s, 'A1-07', %s, 'test')",
                     (d.bound_device, d.a1, d.patient, d.bound_at))
        for user, (role, where) in ROLES.items():
            conn.execute("INSERT INTO authz_grants (subject, role, tenant_id) "
                         "VALUES (%s, %s, %s)", (f"user:{user}-{run}", role, getattr(d, where)))
        conn.execute("ANALYZE")
    d.tokens = asyncio.run(_logins(d, run, keyring))
    days = [calendar.local_date(t) for t in (d.base, d.end)]
    for back in (0, 1, 12):  # the data, and the meters' month and year before
        lo = calendar.local_date(calendar.add_months(d.base, -back))
        asyncio.run(rollups.rebuild(database, lo, lo + (days[1] - days[0])))
    asyncio.run(rollups.RollupJob(database).run_once())
    return d


def _devices(conn: psycopg.Connection[Any], hospital: int, department: int, model: int,
             count: int) -> list[int]:
    # Ids far above the sequence's: other suites' tests name small ids outright
    # (and registered devices get small ids from the sequence).
    rows = conn.execute(
        "INSERT INTO devices (id, tenant_id, department_id, model_id, state, serial_no) "
        "SELECT 5000000000 + nextval('device_id_seq'), %s, %s, %s, 'active', "
        "'SN-' || %s || '-' || g "
        "FROM generate_series(1, %s) g RETURNING id",
        (hospital, department, model, department, count))
    return sorted(r[0] for r in rows.fetchall())


def _telemetry(conn: psycopg.Connection[Any], d: District) -> None:
    monitors = [x for xs in d.monitors.values() for x in xs]
    conn.execute("""
        INSERT INTO telemetry (ts, device_id, tenant_id, seq, kind, metrics, vals)
        SELECT %(base)s + i * interval '10 minutes' + (dev %% 10) * interval '7 seconds',
               dev, dv.tenant_id, i, 1, '{1,2,3,4}',
               ARRAY[60 + (dev %% 7) * 3 + ((i * 37 + dev * 11) %% 41) * 0.5,
                     95 + ((i * 13 + dev) %% 9) * 0.5,
                     CASE WHEN i = 100 AND dev = %(nan_device)s THEN 'NaN'::float8
                          ELSE 36 + ((i * 7 + dev * 3) %% 23) * 0.1 END,
                     ((i + dev) %% 5) - 2]
          FROM unnest(%(monitors)s::bigint[]) dev JOIN devices dv ON dv.id = dev,
               generate_series(0, 287) i""",
                 {"base": d.base, "monitors": monitors, "nan_device": monitors[0]})
    for back in (0, 1, 12):
        conn.execute("""
            INSERT INTO telemetry (ts, device_id, tenant_id, seq, kind, metrics, vals)
            SELECT %(base)s + i * interval '1 hour', dev, dv.tenant_id, %(seq)s + i, 1, '{1}',
                   ARRAY[5 + (i %% 24) * 0.5 + (dev %% 3) + %(back)s * 0.25]
              FROM unnest(%(meters)s::bigint[]) dev JOIN devices dv ON dv.id = dev,
                   generate_series(0, 47) i""",
                     {"base": calendar.add_months(d.base, -back), "meters": d.meters,
                      "seq": back * 1000, "back": back})


async def _logins(d: District, run: str, keyring: Keyring) -> dict[str, str]:
    tokens = {}
    async with await psycopg.AsyncConnection.connect(d.dsn, autocommit=True) as conn:
        for user, (_, where) in ROLES.items():
            name = f"{user}-{run}"
            await identity.create_user(conn, name, PASSWORD, getattr(d, where),
                                       must_change=False)
            result = await identity.login(conn, d.cfg.security, keyring, name, PASSWORD, "",
                                          "test", lambda _: False)
            tokens[user] = result.token
    return tokens


@pytest.fixture(scope="module")
def district(dev_certs: Config, database: str, admin_dsn: str,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[District]:
    cfg = dataclasses.replace(
        dev_certs, grpc=dataclasses.replace(dev_certs.grpc, port=0, mtls_port=0),
        security=dataclasses.replace(dev_certs.security, caller_rate_per_s=1e5,
                                     tenant_rate_per_s=1e5))
    yield _build(database, admin_dsn, cfg, tmp_path_factory.mktemp("keys"))


@dataclass
class Client:
    """The query API as one user sees it."""

    stub: query_pb2_grpc.QueryServiceAsyncStub
    token: str

    def __call__(self, method: str, request: Any, timeout: float = 10) -> Any:
        rpc = getattr(self.stub, method)
        return rpc(request, metadata=(("authorization", f"Bearer {self.token}"),),
                   timeout=timeout)


@dataclass
class Server:
    district: District
    security: SecurityServices
    query: QueryService
    grpc: GrpcServer
    channel: aio.Channel

    def client(self, user: str) -> Client:
        return Client(query_pb2_grpc.QueryServiceStub(self.channel),
                      self.district.tokens[user])


@contextlib.asynccontextmanager
async def serving(district: District, options: QueryOptions | None = None
                  ) -> AsyncIterator[Server]:
    security = SecurityServices(district.cfg)
    security.add_rules(RULES)
    await security.start()
    query = QueryService(district.cfg, security.authorizer, options)
    await query.start()
    server = GrpcServer(district.cfg, services=query.services(),
                        interceptors=[security.interceptor])
    await server.start()
    cfg = dataclasses.replace(district.cfg,
                              grpc=dataclasses.replace(district.cfg.grpc, port=server.port))
    chan = channel(cfg)
    try:
        yield Server(district, security, query, server, chan)
    finally:
        await chan.close(None)
        await server.stop(0)
        await query.stop()
        await security.stop()


@pytest.fixture
async def server(district: District) -> AsyncIterator[Server]:
    async with serving(district) as running:
        yield running


async def refused(call: Any) -> grpc.StatusCode:
    """The status code a call ends with (OK when it succeeds)."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK
