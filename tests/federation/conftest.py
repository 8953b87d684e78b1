"""Fixtures for federation: two databases on the shared cluster — the suite's
test database plays the region, ``<it>_hospital`` the hospital — the same
tenants and devices registered in both (same ids, as a registry sync would
leave them), a hospital platform's client certificate granted at the region,
and an in-process region (security services, ingest service, IngestService
on the mutual-TLS port)."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from rmiot import db
from rmiot.config import Config
from rmiot.core_ext import FLAG_ACK_REQ, KIND_TELEMETRY, encode_frame
from rmiot.deploy import certs, cluster, migrate
from rmiot.grpc_server import GrpcServer, channel
from rmiot.ingest import push
from rmiot.ingest.service import IngestService
from rmiot.proto import ingest_pb2_grpc
from rmiot.registry import store
from rmiot.security.service import SecurityServices
from rmiot.security.sm4 import Keyring
from rmiot.tenants import store as tenants_store

_runs = itertools.count(1)


@pytest.fixture(scope="session")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> Keyring:
    return Keyring.load(tmp_path_factory.mktemp("keys") / "ring")


@pytest.fixture(scope="session")
def hospital_cfg(base_cfg: Config, database: str) -> Config:
    """The hospital's database, created and migrated afresh for the session."""
    name = f"{base_cfg.database.name}_hospital"
    cfg = dataclasses.replace(base_cfg, database=dataclasses.replace(base_cfg.database,
                                                                     name=name))
    cluster.recreate_database(cfg)
    migrate.migrate(db.admin_dsn(cfg))
    return cfg


@dataclass
class Site:
    """One hospital (with a department) under a region, and a hospital of
    another region branch, registered alike at the region and the hospital."""

    region_dsn: str
    hospital_dsn: str
    keyring: Keyring
    region: int
    hospital: int
    department: int
    other: int
    devices: list[int]            # plain devices of the hospital (the last: the department's)
    keyed: int                    # HMAC-SHA256 required
    key: bytes
    foreign: int                  # the other hospital's device
    name: str = ""
    cert: tuple[bytes, bytes] = (b"", b"")   # the hospital platform's (key, certificate)
    cert_path: Path = field(default_factory=Path)

    def rows(self, dsn: str, devices: list[int]) -> list[tuple[int, int, int, int]]:
        """(device, seq, ts_us, insert transaction) of the stored rows."""
        with psycopg.connect(dsn, autocommit=True) as conn:
            return [(int(d), int(s), int(t), int(x)) for d, s, t, x in conn.execute(
                "SELECT device_id, seq, (extract(epoch FROM ts) * 1000000)::bigint, "
                "xmin::text::bigint FROM telemetry WHERE device_id = ANY(%s)",
                (devices,)).fetchall()]

    def count(self, dsn: str, devices: list[int]) -> int:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM telemetry WHERE device_id = ANY(%s)",
                               (devices,)).fetchone()
        return int(row[0]) if row else 0

    def outbox(self, devices: list[int]) -> int:
        with psycopg.connect(self.hospital_dsn, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM outbox WHERE device_id = ANY(%s)",
                               (devices,)).fetchone()
        return int(row[0]) if row else 0


def _register(conn: psycopg.Connection[Any], keyring: Keyring, tag: str,
              ids: dict[str, int] | None, key: bytes | None) -> tuple[dict[str, int], bytes]:
    """The same tree and devices, and the keyed device's key; with ``ids``
    None they are new, else they take these ids (and ``key``)."""
    got = ids or {}
    out: dict[str, int] = {}
    out["region"] = tenants_store.create_tenant(conn, f"fr-{tag}", "Region", "region",
                                                tenant_id=got.get("region"))
    out["hospital"] = tenants_store.create_tenant(conn, f"fh-{tag}", "Hospital", "hospital",
                                                  out["region"], tenant_id=got.get("hospital"))
    out["department"] = tenants_store.create_tenant(
        conn, f"fd-{tag}", "Ward", "department", out["hospital"], tenant_id=got.get("department"))
    out["other"] = tenants_store.create_tenant(conn, f"fo-{tag}", "Other", "hospital",
                                               out["region"], tenant_id=got.get("other"))
    for i in range(4):
        out[f"d{i}"] = store.register_device(conn, out["hospital"], serial_no=f"d{i}",
                                             device_id=got.get(f"d{i}"))
    out["d4"] = store.register_device(conn, out["department"], serial_no="d4",
                                      device_id=got.get("d4"))
    out["keyed"] = store.register_device(conn, out["hospital"], serial_no="keyed",
                                         auth_required=True, device_id=got.get("keyed"))
    _, key = store.add_key(conn, keyring, out["keyed"], "hmac-sha256", key=key)
    out["foreign"] = store.register_device(conn, out["other"], serial_no="foreign",
                                           device_id=got.get("foreign"))
    return out, key


@pytest.fixture
def site(database: str, hospital_cfg: Config, dev_certs: Config,
         keyring: Keyring) -> Iterator[Site]:
    tag = f"{time.time_ns()}-{next(_runs)}"
    hospital_dsn = db.app_dsn(hospital_cfg)
    with psycopg.connect(database, autocommit=True) as conn:
        ids, key = _register(conn, keyring, tag, None, None)
    with psycopg.connect(hospital_dsn, autocommit=True) as conn:
        _register(conn, keyring, tag, ids, key)
    name = f"fed-{tag.replace('-', '_')}"
    path = certs.issue_client(dev_certs.data_dir / "certs", name, "platform",
                              tenant=ids["hospital"])
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("INSERT INTO authz_grants (subject, role, tenant_id) VALUES (%s, %s, %s)",
                     (f"cert:{name}", "hospital_platform", ids["hospital"]))
    yield Site(database, hospital_dsn, keyring, ids["region"], ids["hospital"],
               ids["department"], ids["other"], [ids[f"d{i}"] for i in range(5)],
               ids["keyed"], key, ids["foreign"], name,
               (path.with_suffix(".key").read_bytes(), path.read_bytes()), path)
    for suffix in (".crt", ".key"):
        path.with_suffix(suffix).unlink(missing_ok=True)


def region_cfg(dev_certs: Config, keyring: Keyring, **ingest: Any) -> Config:
    return dataclasses.replace(
        dev_certs,
        grpc=dataclasses.replace(dev_certs.grpc, port=0, mtls_port=0),
        ingest=dataclasses.replace(dev_certs.ingest, tcp_port=0, batch_max_ms=5,
                                   **{"device_rate_per_s": 1e6, **ingest}),
        security=dataclasses.replace(dev_certs.security, keyring_dir=str(keyring.directory),
                                     caller_rate_per_s=1e5, tenant_rate_per_s=1e5))


@dataclass
class Region:
    cfg: Config
    security: SecurityServices
    ingest: IngestService
    server: GrpcServer

    def stub(self, cert: tuple[bytes, bytes] | None
             ) -> ingest_pb2_grpc.IngestServiceAsyncStub:
        chan = channel(self.cfg, port=self.server.mtls_port, client_cert=cert)
        return ingest_pb2_grpc.IngestServiceStub(chan)

    async def close(self) -> None:
        await self.server.stop(0)
        await self.ingest.stop(drain_timeout=5)
        await self.security.stop()


async def open_region(cfg: Config) -> Region:
    """A region in this process: security services, ingest, IngestService."""
    security = SecurityServices(cfg)
    await security.start()
    ingest = IngestService(cfg)
    await ingest.start()
    security.add_rules(push.RULES)
    server = GrpcServer(cfg, services=[push.service(ingest.pipeline, security.authorizer)],
                        interceptors=[security.interceptor])
    await server.start()
    return Region(cfg, security, ingest, server)


@pytest.fixture
async def region(dev_certs: Config, keyring: Keyring, site: Site) -> AsyncIterator[Region]:
    opened = await open_region(region_cfg(dev_certs, keyring))
    yield opened
    await opened.close()


def now_us() -> int:
    return time.time_ns() // 1000


def vitals(tenant: int, device: int, seq: int, ts_us: int, *, ack: bool = True,
           key: bytes | None = None, auth: int = 1) -> bytes:
    """An 8-vital telemetry frame."""
    fields = [(m, 1, v) for m, v in enumerate((72.0, 98.0, 16.0, 36.7, 120.0, 80.0, 93.3, 71.0),
                                              start=1)]
    return encode_frame(KIND_TELEMETRY, tenant, device, seq, ts_us, fields,
                        flags=FLAG_ACK_REQ if ack else 0, auth=auth if key else 0, key=key)
