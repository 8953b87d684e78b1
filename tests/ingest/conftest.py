"""Fixtures for the ingest path: a registry with a small hospital, and a
started IngestService on a free port against the real test database."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from rmiot.config import Config
from rmiot.core_ext import FLAG_ACK_REQ, KIND_TELEMETRY, encode_frame
from rmiot.ingest.client import RmfClient
from rmiot.ingest.service import IngestService
from rmiot.registry import store
from rmiot.security.sm4 import Keyring
from rmiot.tenants import store as tenants_store

_codes = itertools.count(1)


@dataclass
class Hospital:
    """Tenants and devices made for one test."""

    dsn: str
    keyring: Keyring
    tenant: int
    other_tenant: int
    plain: int          # no key, HMAC not required
    keyed: int          # HMAC-SHA256 key, HMAC required
    key: bytes
    foreign: int        # a device of the other tenant

    def conn(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True)

    def stored(self, device: int) -> int:
        with self.conn() as conn:
            row = conn.execute("SELECT count(*) FROM telemetry WHERE device_id = %s",
                               (device,)).fetchone()
        return int(row[0]) if row else 0


@pytest.fixture(autouse=True)
async def loop_errors_fail_the_test() -> AsyncIterator[None]:
    """uvloop does not go through asyncio's exception handler hook: record here."""
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    loop.set_exception_handler(lambda _loop, ctx: errors.append(
        f"{ctx.get('message')}: {ctx.get('exception')!r}"))
    yield
    loop.set_exception_handler(None)
    assert not errors, errors


@pytest.fixture(scope="session")
def keyring(tmp_path_factory: pytest.TempPathFactory) -> Keyring:
    return Keyring.load(tmp_path_factory.mktemp("keys") / "ring")


@pytest.fixture
def hospital(database: str, keyring: Keyring) -> Iterator[Hospital]:
    n = next(_codes)
    stamp = time.time_ns()
    with psycopg.connect(database, autocommit=True) as conn:
        region = tenants_store.create_tenant(conn, f"region-{stamp}-{n}", "Test region", "region")
        tenant = tenants_store.create_tenant(conn, f"h-{stamp}-{n}", "Hospital", "hospital", region)
        other = tenants_store.create_tenant(conn, f"o-{stamp}-{n}", "Other", "hospital", region)
        plain = store.register_device(conn, tenant, serial_no="plain")
        keyed = store.register_device(conn, tenant, serial_no="keyed", auth_required=True)
        _, key = store.add_key(conn, keyring, keyed, "hmac-sha256")
        foreign = store.register_device(conn, other, serial_no="foreign")
    yield Hospital(database, keyring, tenant, other, plain, keyed, key, foreign)


@pytest.fixture
def ingest_cfg(base_cfg: Config, keyring: Keyring) -> Config:
    ingest = dataclasses.replace(base_cfg.ingest, tcp_port=0, writers=2, batch_max_rows=500,
                                 batch_max_ms=5, idle_timeout_s=30.0,
                                 partial_frame_timeout_s=0.5,
                                 device_rate_per_s=1e6)  # tests of limits set their own
    security = dataclasses.replace(base_cfg.security, keyring_dir=str(keyring.directory))
    return dataclasses.replace(base_cfg, ingest=ingest, security=security)


@pytest.fixture
async def ingest(ingest_cfg: Config, hospital: Hospital) -> AsyncIterator[IngestService]:
    service = IngestService(ingest_cfg)
    await service.start()
    yield service
    await service.stop(drain_timeout=5)


@pytest.fixture
async def client(ingest: IngestService) -> AsyncIterator[RmfClient]:
    c = RmfClient("127.0.0.1", ingest.tcp.port)
    await c.connect()
    yield c
    await c.close()


def now_us() -> int:
    return time.time_ns() // 1000


def vitals(tenant: int, device: int, seq: int, ts_us: int | None = None, *,
           ack: bool = True, key: bytes | None = None, kind: int = KIND_TELEMETRY) -> bytes:
    """An 8-vital telemetry frame."""
    fields = [(m, 1, v) for m, v in enumerate((72.0, 98.0, 16.0, 36.7, 120.0, 80.0, 93.3, 71.0),
                                              start=1)]
    return encode_frame(kind, tenant, device, seq, ts_us if ts_us is not None else now_us(),
                        fields, flags=FLAG_ACK_REQ if ack else 0, auth=1 if key else 0, key=key)
