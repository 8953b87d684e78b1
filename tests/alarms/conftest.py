"""Fixtures for rules and alarms: the ingest fixtures (a small hospital, a
started IngestService with its rule engine, a connected RmfClient), and
helpers to write rules and read alarms back from the real database."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import psycopg

from rmiot.core_ext import FLAG_ACK_REQ, KIND_TELEMETRY, encode_frame
from rmiot.ingest import alarm_admin
from rmiot.ingest.alarm_admin import RuleSpec
from rmiot.ingest.alarm_rules import Rule
from rmiot.ingest.client import RmfClient
from rmiot.ingest.service import IngestService
from tests.ingest import conftest as ingest_fixtures
from tests.ingest.conftest import Hospital, now_us

keyring = ingest_fixtures.keyring
hospital = ingest_fixtures.hospital
ingest_cfg = ingest_fixtures.ingest_cfg
ingest = ingest_fixtures.ingest
client = ingest_fixtures.client

_codes = itertools.count(1)
SEC = 1_000_000


async def put_rule(dsn: str, tenant: int, kind: str, params: dict[str, Any], *,
                   code: str | None = None, severity: str = "major",
                   escalation: dict[str, Any] | None = None, enabled: bool = True,
                   **scope: int) -> Rule:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return await alarm_admin.put_rule(
            conn, tenant, 0, RuleSpec(tenant, code or f"{kind}-{next(_codes)}", "", kind,
                                      severity, enabled, params, escalation or {}, **scope),
            "user:test")


def _loaded(service: IngestService) -> set[int]:
    book = service.rules
    return {r.id for group in (book.by_tenant, book.by_device, book.by_patient)
            for rules in group.values() for r in rules}


async def rules_loaded(service: IngestService, *rules: Rule) -> None:
    """Wait until the engine's rule book holds these rules (it follows NOTIFY)."""
    async with asyncio.timeout(5):
        while not {r.id for r in rules} <= _loaded(service):  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def frame(tenant: int, device: int, seq: int, ts_us: int, fields: list[tuple[int, int, object]],
          kind: int = KIND_TELEMETRY) -> bytes:
    return encode_frame(kind, tenant, device, seq, ts_us, fields, flags=FLAG_ACK_REQ)


class Sender:
    """Frames of one device, measured at base + offset seconds, acked before returning."""

    def __init__(self, client: RmfClient, hospital: Hospital, device: int,
                 base_us: int | None = None) -> None:
        self.client = client
        self.hospital = hospital
        self.device = device
        self.base = base_us if base_us is not None else now_us() - 600 * SEC
        self.seq = 0

    async def send(self, at_s: float, fields: list[tuple[int, int, object]],
                   kind: int = KIND_TELEMETRY) -> None:
        self.seq += 1
        self.client.send(frame(self.hospital.tenant, self.device, self.seq,
                               self.base + int(at_s * SEC), fields, kind), self.device, self.seq)
        await self.client.drain()
        assert await self.client.wait_acked(5)


async def alarm_events(dsn: str, device: int) -> list[tuple[str, str, str]]:
    """(rule code, event kind, state) of the device's alarms, in order."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT a.rule_code, e.kind, e.state FROM alarm_events e JOIN alarms a "
            "ON a.id = e.alarm_id WHERE a.device_id = %s ORDER BY e.id", (device,))
        return [(r[0], r[1], r[2]) for r in await cur.fetchall()]


async def wait_events(dsn: str, device: int, count: int,
                      timeout: float = 5.0) -> list[tuple[str, str, str]]:
    """The device's alarm events once there are at least ``count``."""
    got: list[tuple[str, str, str]] = []
    try:
        async with asyncio.timeout(timeout):
            while len(got := await alarm_events(dsn, device)) < count:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"{len(got)} alarm events, not {count}: {got}") from None
    return got
