"""A small region for the interoperability tests, against the real database:

region R > hospital A (code ``ha-<run>``) > ICU department; hospital B (``hb-<run>``).
Hospital A has two bedside monitors fixed at ICU/01/07 and ICU/01/08, a
transport monitor without a bed, a monitor that requires HMAC, and a CT with
an AE title; hospital B a monitor. ``mllp:<A's code>`` holds his_interface
on A (the HIS and the monitor gateway speak as A's sending facility).
People: a clinician and the head of A's ICU, A's administrator, a clinician
of B, a commission analyst and an auditor at the region, with tokens.

``platform`` starts the security services, an IngestService, the HL7 listener
and the FHIR API on free ports, as ``rmiot.platform`` wires them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from rmiot.config import Config
from rmiot.ingest.hl7.listener import Hl7Listener
from rmiot.ingest.hl7.mllp import END, START
from rmiot.ingest.service import IngestService
from rmiot.interop import Interop
from rmiot.query.fhir.api import FhirApi
from rmiot.registry import store
from rmiot.security import identity
from rmiot.security.service import SecurityServices
from rmiot.security.sm4 import Keyring
from rmiot.tenants import store as tenants

PASSWORD = "Interop-Test-9"
_run = itertools.count()
ROLES = {  # user -> (role, tenant attribute)
    "clinician_a": ("clinician", "icu"),
    "head_a": ("department_head", "icu"),
    "admin_a": ("hospital_admin", "hospital_a"),
    "clinician_b": ("clinician", "hospital_b"),
    "analyst": ("commission_analyst", "region"),
    "auditor": ("auditor", "region"),
}


@dataclass
class Region:
    dsn: str
    cfg: Config
    run: str
    region: int = 0
    hospital_a: int = 0
    icu: int = 0
    hospital_b: int = 0
    code_a: str = ""
    code_b: str = ""
    bed7: int = 0           # monitor fixed at ICU/01/07
    bed8: int = 0           # monitor fixed at ICU/01/08
    portable: int = 0       # transport monitor, follows its patient
    keyed: int = 0          # requires HMAC
    ct: int = 0             # imaging, with an AE title
    monitor_b: int = 0
    tokens: dict[str, str] = field(default_factory=dict)
    users: dict[str, str] = field(default_factory=dict)

    def conn(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True)


def _device(conn: psycopg.Connection[Any], tenant: int, serial: str, *,
            department: int | None = None, location: str | None = None,
            auth_required: bool | None = None) -> int:
    device = store.register_device(conn, tenant, serial_no=serial, auth_required=auth_required)
    conn.execute("UPDATE devices SET department_id = %s, location = %s WHERE id = %s",
                 (department, location, device))
    return device


def _build(dsn: str, cfg: Config) -> Region:
    run = f"{next(_run)}{time.time_ns() % 10**9}"
    r = Region(dsn, cfg, run, code_a=f"ha-{run}", code_b=f"hb-{run}")
    with r.conn() as conn:
        r.region = tenants.create_tenant(conn, f"ir-{run}", "Region", "region")
        r.hospital_a = tenants.create_tenant(conn, r.code_a, "Hospital A", "hospital", r.region)
        r.icu = tenants.create_tenant(conn, f"icu-{run}", "ICU", "department", r.hospital_a)
        r.hospital_b = tenants.create_tenant(conn, r.code_b, "Hospital B", "hospital", r.region)
        row = conn.execute("INSERT INTO vendors (code, name) VALUES (%s, 'Vendor') RETURNING id",
                           (f"iv-{run}",)).fetchone()
        assert row is not None
        model = conn.execute(
            "INSERT INTO device_models (vendor_id, name, kind, metrics) VALUES "
            "(%s, 'Monitor M1', 'monitor', '[{\"id\": 1, \"name\": \"heart_rate\", "
            "\"unit\": \"/min\"}, {\"id\": 2, \"name\": \"spo2\", \"unit\": \"%%\"}]') "
            "RETURNING id", (row[0],)).fetchone()
        assert model is not None
        r.bed7 = _device(conn, r.hospital_a, "bed7", department=r.icu, location="ICU/01/07")
        r.bed8 = _device(conn, r.hospital_a, "bed8", department=r.icu, location="ICU/01/08")
        r.portable = _device(conn, r.hospital_a, "portable", department=r.icu)
        r.keyed = _device(conn, r.hospital_a, "keyed", auth_required=True)
        r.ct = _device(conn, r.hospital_a, "ct")
        r.monitor_b = _device(conn, r.hospital_b, "monitor-b")
        conn.execute("UPDATE devices SET model_id = %s WHERE id = ANY(%s)",
                     (model[0], [r.bed7, r.bed8, r.portable, r.monitor_b]))
        conn.execute("INSERT INTO authz_grants (subject, role, tenant_id) VALUES "
                     "(%s, 'his_interface', %s)", (f"mllp:{r.code_a}", r.hospital_a))
        for user, (role, where) in ROLES.items():
            r.users[user] = f"{user}-{run}"
            conn.execute("INSERT INTO authz_grants (subject, role, tenant_id) "
                         "VALUES (%s, %s, %s)", (f"user:{user}-{run}", role, getattr(r, where)))
    r.tokens = asyncio.run(_logins(r))
    return r


async def _logins(r: Region) -> dict[str, str]:
    keyring = Keyring.load(r.cfg.keyring_dir)
    tokens = {}
    async with await psycopg.AsyncConnection.connect(r.dsn, autocommit=True) as conn:
        for user, name in r.users.items():
            home = getattr(r, ROLES[user][1])
            await identity.create_user(conn, name, PASSWORD, home, must_change=False)
            result = await identity.login(conn, r.cfg.security, keyring, name, PASSWORD, "",
                                          "test", lambda _: False)
            tokens[user] = result.token
    return tokens


@pytest.fixture(scope="module")
def interop_cfg(dev_certs: Config, tmp_path_factory: pytest.TempPathFactory) -> Config:
    keys: Path = tmp_path_factory.mktemp("keys")
    cfg = dev_certs
    return dataclasses.replace(
        cfg,
        ingest=dataclasses.replace(cfg.ingest, tcp_port=0, batch_max_ms=5,
                                   device_rate_per_s=1e6),
        grpc=dataclasses.replace(cfg.grpc, port=0, mtls_port=0),
        security=dataclasses.replace(cfg.security, keyring_dir=str(keys),
                                     caller_rate_per_s=1e5, tenant_rate_per_s=1e5,
                                     audit_checkpoints=str(keys / "checkpoints.jsonl")),
        hl7=dataclasses.replace(cfg.hl7, enabled=True, port=0, answer_timeout_s=5.0),
        fhir=dataclasses.replace(cfg.fhir, enabled=True, port=0),
        # The DICOM test runs its own poller (one running here would race it).
        dicom=dataclasses.replace(cfg.dicom, enabled=False, timeout_s=2.0))


@pytest.fixture(scope="module")
def region(interop_cfg: Config, database: str) -> Iterator[Region]:
    yield _build(database, interop_cfg)


@dataclass
class Running:
    region: Region
    security: SecurityServices
    ingest: IngestService
    hl7: Hl7Listener
    fhir: FhirApi


@pytest.fixture
async def platform(region: Region) -> AsyncIterator[Running]:
    cfg = region.cfg
    security = SecurityServices(cfg)
    await security.start()
    ingest = IngestService(cfg)
    await ingest.start()
    interop = Interop(cfg, security, ingest)  # as rmiot.platform starts it
    endpoints = await interop.start()
    assert [e[0] for e in endpoints] == ["hl7 v2", "fhir r4"]
    assert interop.hl7 is not None and interop.fhir is not None
    try:
        yield Running(region, security, ingest, interop.hl7, interop.fhir)
    finally:
        await interop.stop()
        await ingest.stop(drain_timeout=5)
        await security.stop()


class MllpClient:
    """A sender: messages out framed, ACKs back in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, **kwargs: Any) -> MllpClient:
        return cls(*await asyncio.open_connection("127.0.0.1", port, **kwargs))

    async def send(self, *messages: str | bytes) -> None:
        for m in messages:
            data = m.encode() if isinstance(m, str) else m
            self.writer.write(START + data + END)
        await self.writer.drain()

    async def ack(self, timeout: float = 10.0) -> list[list[str]]:
        """The next ACK, as segments split into fields."""
        data = await asyncio.wait_for(self.reader.readuntil(END), timeout)
        text = data[data.index(START) + 1:-2].decode()
        return [seg.split("|") for seg in text.strip("\r").split("\r")]

    async def call(self, message: str | bytes) -> list[list[str]]:
        await self.send(message)
        return await self.ack()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def msa(ack: list[list[str]]) -> tuple[str, str]:
    """(MSA-1, MSA-2)."""
    seg = next(s for s in ack if s[0] == "MSA")
    return seg[1], seg[2]


def errors(ack: list[list[str]]) -> list[list[str]]:
    return [s for s in ack if s[0] == "ERR"]


def hl7_now(offset_s: float = 0.0) -> str:
    return time.strftime("%Y%m%d%H%M%S+0000", time.gmtime(time.time() + offset_s))


def oru(sender: str, control: str, obx: list[str], when: str | None = None) -> str:
    when = when or hl7_now()
    return "\r".join([
        f"MSH|^~\\&|GATEWAY|{sender}|RMIOT|REGION|{when}||ORU^R01^ORU_R01|{control}|P|2.6",
        "PID|||P001^^^HOSP^MR||Test^Patient",
        f"OBR|1|||182777000^monitoring of patient^SCT|||{when}",
        *obx]) + "\r"


def obx(n: int, code: str, value: str, unit: str, device: int, when: str = "",
        value_type: str = "NM") -> str:
    return f"OBX|{n}|{value_type}|{code}||{value}|{unit}|||||F|||{when}||||{device}"


def adt(sender: str, control: str, event: str, id_card: str, name: str = "Zhang^San",
        bed: str = "", prior: str = "", visit: str = "V1") -> str:
    return "\r".join([
        f"MSH|^~\\&|HIS|{sender}|RMIOT|REGION|{hl7_now()}||ADT^{event}^ADT_A01|{control}|P|2.5",
        f"EVN|{event}|{hl7_now()}",
        f"PID|||{id_card}^^^CHN^NNCHN||{name}||19800101|M|||||13812345678",
        f"PV1||I|{bed}|||{prior}|||||||||||||{visit}"]) + "\r"
