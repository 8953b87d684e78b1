"""A whole platform (security, ingest, API, dashboard) on free ports against
the test database, with two hospitals, their users and an alarm rule; and
headless Chromium (Debian's package, driven by Playwright) to look at it.
Screenshots go to ``.var/test-artifacts/dashboard/``."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pyotp
import pytest
import pytest_asyncio
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from playwright.async_api import Browser, async_playwright

from rmiot.config import Config, OtelConfig
from rmiot.observability import Observability
from rmiot.platform import Platform
from rmiot.registry import store
from rmiot.security import identity
from rmiot.tenants import store as tenants_store
from tests.alarms.conftest import put_rule

CHROMIUM = os.environ.get("RMIOT_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parents[2] / ".var" / "test-artifacts" / "dashboard"
PASSWORD = "Dashb0ard-test!"
HR, SPO2 = 1, 2


@dataclass
class City:
    platform: Platform
    url: str
    dsn: str
    region: int
    hospital_a: int
    department_a: int
    hospital_b: int
    device_a: int
    device_b: int
    totp: dict[str, str]  # user -> TOTP secret
    stamp: int
    spans: InMemorySpanExporter  # every span the platform made

    def user(self, name: str) -> str:
        return f"{name}-{self.stamp}"

    def conn(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True)

    def code(self, user: str) -> str:
        return pyotp.TOTP(self.totp[user]).now()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def city(dev_certs: Config, database: str,
               tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[City]:
    cfg = dataclasses.replace(
        dev_certs,
        grpc=dataclasses.replace(dev_certs.grpc, port=0, mtls_port=0),
        ingest=dataclasses.replace(dev_certs.ingest, tcp_port=0, processes=1, batch_max_ms=5),
        dashboard=dataclasses.replace(dev_certs.dashboard, port=0, refresh_s=0.5),
        security=dataclasses.replace(dev_certs.security, keyring_dir=str(
            tmp_path_factory.mktemp("dashboard-keys"))))
    stamp = time.time_ns()
    with psycopg.connect(database, autocommit=True) as conn:
        region = tenants_store.create_tenant(conn, f"dr-{stamp}", "Dashboard region", "region")
        hospital_a = tenants_store.create_tenant(conn, f"da-{stamp}", "Hospital A", "hospital",
                                                 region)
        department_a = tenants_store.create_tenant(conn, f"da1-{stamp}", "A Emergency",
                                                   "department", hospital_a)
        hospital_b = tenants_store.create_tenant(conn, f"db-{stamp}", "Hospital B", "hospital",
                                                 region)
        device_a = store.register_device(conn, hospital_a, serial_no=f"mon-a-{stamp}")
        conn.execute("UPDATE devices SET department_id = %s WHERE id = %s",
                     (department_a, device_a))
        device_b = store.register_device(conn, hospital_b, serial_no=f"mon-b-{stamp}")
    spans = InMemorySpanExporter()
    observability = Observability(OtelConfig(), span_processors=[SimpleSpanProcessor(spans)])
    await observability.start()
    platform = Platform(cfg)
    await platform.start()
    assert platform.security is not None and platform.dashboard is not None
    security = platform.security
    totp: dict[str, str] = {}
    users = {"ops-a": ("hospital_admin", hospital_a), "nurse-b": ("department_head", hospital_b),
             "analyst": ("commission_analyst", region)}
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        for name, (role, tenant) in users.items():
            user = f"{name}-{stamp}"
            user_id = await identity.create_user(conn, user, PASSWORD, tenant, must_change=False)
            if role in identity.ADMIN_ROLES:
                totp[name] = await identity.enroll_totp(conn, security.keyring, user_id)
            await security.authorizer.grant(f"user:{user}", role, tenant)
    await put_rule(database, hospital_a, "threshold", {"metric": HR, "op": ">", "value": 150},
                   code="hr-high", severity="critical")
    try:
        yield City(platform, platform.dashboard.url, database, region, hospital_a, department_a,
                   hospital_b, device_a, device_b, totp, stamp, spans)
    finally:
        await platform.stop()
        await observability.stop()


@pytest.fixture(scope="module")
def artifacts() -> Path:
    assert Path(CHROMIUM).exists(), (
        f"{CHROMIUM} is missing: 'make setup' (deploy/setup-system.sh) installs Debian's chromium")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def browser(artifacts: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        await browser.close()
