"""Outbound to hospital systems: alarms and observations of their patients as
HL7 v2 ORU^R01 to real MLLP servers started here (one ACKs AA, one AE) and as
FHIR resources to a real aiohttp server, validated with fhir.resources (R4B).
The hospital's identifier goes only to a system of the patient's own
hospital; the region's system gets the pseudonym."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
import pytest
from aiohttp import web
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.communication import Communication

from rmiot.ingest import alarm_admin
from rmiot.ingest.alarm_admin import Channel, Subscription
from rmiot.ingest.alarm_notify import Notifier
from rmiot.ingest.alarm_service import RULES, SERVICE
from rmiot.ingest.alarm_store import from_us
from rmiot.ingest.hl7.mllp import END, START
from rmiot.outbound import Outbound
from rmiot.security.sm4 import Keyring
from tests.interop.conftest import Running
from tests.interop.test_fhir import admit


@dataclass
class MllpServer:
    code: str
    messages: list[str] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.readuntil(END)
                text = data[data.index(START) + 1:-2].decode()
                self.messages.append(text)
                control = text.split("\r")[0].split("|")[9]
                writer.write(START + f"MSH|^~\\&|HIS|H|RMIOT|RMIOT|20240101||ACK^R01^ACK|A1|P|"
                             f"2.6\rMSA|{self.code}|{control}\rERR||||E|||||not today\r"
                             .encode() + END)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@pytest.fixture
async def receivers() -> AsyncIterator[tuple[MllpServer, MllpServer, list[tuple[str, Any]]]]:
    good, bad = MllpServer("AA"), MllpServer("AE")
    servers = [await asyncio.start_server(s.handle, "127.0.0.1", 0) for s in (good, bad)]
    good.port, bad.port = (s.sockets[0].getsockname()[1] for s in servers)
    posted: list[tuple[str, Any]] = []

    async def post(request: web.Request) -> web.Response:
        posted.append((request.path, orjson.loads(await request.read())))
        return web.json_response({}, status=201)

    app = web.Application()
    app.router.add_post("/{tail:.*}", post)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    posted.append(("port", site._server.sockets[0].getsockname()[1]))  # type: ignore[union-attr]
    try:
        yield good, bad, posted
    finally:
        await runner.cleanup()
        for s in servers:
            s.close()


async def _channel(dsn: str, keyring: Keyring, tenant: int, kind: str, target: str,
                   attempts: int = 8) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return (await alarm_admin.put_channel(
            conn, tenant, 0, keyring, Channel(0, tenant, kind, target, "warning", [], attempts,
                                              0.01, True), b"", "user:test")).id


async def _deliver_all(notifier: Notifier, dsn: str, channels: list[int]) -> None:
    async with asyncio.timeout(20):
        while True:
            await notifier.deliver_due()
            with psycopg.connect(dsn) as conn:
                row = conn.execute("SELECT count(*) FROM alarm_deliveries WHERE state = "
                                   "'pending' AND channel_id = ANY(%s)", (channels,)).fetchone()
            if row is not None and row[0] == 0:
                return
            await asyncio.sleep(0.05)


def test_rpcs_are_ruled() -> None:
    for name in ("ListSubscriptions", "PutSubscription", "DeleteSubscription"):
        assert RULES[f"/{SERVICE}/{name}"].act == "manage"


async def test_alarms_and_observations_out(platform: Running, receivers: Any) -> None:
    good, bad, posted = receivers
    fhir_port = posted.pop(0)[1]
    r = platform.region
    keyring = platform.security.keyring
    hl7_a = await _channel(r.dsn, keyring, r.hospital_a, "hl7", f"mllp://127.0.0.1:{good.port}")
    hl7_ae = await _channel(r.dsn, keyring, r.hospital_a, "hl7",
                            f"mllp://127.0.0.1:{bad.port}", attempts=2)
    fhir_region = await _channel(r.dsn, keyring, r.region, "fhir",
                                 f"http://127.0.0.1:{fhir_port}/fhir")
    id_card = f"11010119800101{int(time.time() * 1000) % 10000:04d}"
    a = await admit(platform, id_card, "ICU^01^07", r.bed7)

    # Observations: hospital A's HIS (heart rate only) and the region (all).
    past = from_us(int((time.time() - 60) * 1e6))
    async with await psycopg.AsyncConnection.connect(r.dsn, autocommit=True) as conn:
        await alarm_admin.put_subscription(conn, r.hospital_a, Subscription(
            0, r.hospital_a, hl7_a, [1], 2, past, True), "user:test")
        await alarm_admin.put_subscription(conn, r.region, Subscription(
            0, r.region, fhir_region, [], 100, past, True), "user:test")
        # An alarm on the bound monitor (its patient found through the binding).
        rule = await (await conn.execute(
            "INSERT INTO alarm_rules (tenant_id, code, kind, params, created_by, updated_by) "
            "VALUES (%s, %s, 'threshold', '{\"metric\": 1, \"high\": 120}', 't', 't') "
            "RETURNING id", (r.hospital_a, f"hr-high-{a.patient}"))).fetchone()
        assert rule is not None
        async with conn.transaction():
            await conn.execute("SELECT rmiot_alarm_lock()")
            alarm = await (await conn.execute(
                "INSERT INTO alarms (rule_id, rule_code, kind, tenant_id, device_id, subject, "
                "severity, message, value, onset_at, raised_at) VALUES (%s, %s, 'threshold', "
                "%s, %s, %s, 'critical', 'HR 150 > 120', 150, now(), now()) RETURNING id",
                (rule[0], f"hr-high-{a.patient}", r.icu, r.bed7, f"device:{r.bed7}"))).fetchone()
            assert alarm is not None
            await conn.execute("INSERT INTO alarm_events (alarm_id, tenant_id, kind, actor, "
                               "severity, state) VALUES (%s, %s, 'raised', 'system:alarms', "
                               "'critical', 'active')", (alarm[0], r.icu))

    outbound = Outbound(r.dsn, keyring, platform.security.audit, settle_s=0)
    await outbound.start()
    await outbound.forwarder.stop()  # passes run here, at chosen times
    notifier = Notifier(r.dsn, keyring, outbound=outbound.send)
    try:
        assert await outbound.forwarder.run(now=time.time() + 120) == 3
        assert await outbound.forwarder.run(now=time.time() + 120) == 0  # nothing twice
        with psycopg.connect(r.dsn) as conn:
            row = conn.execute("SELECT count(*) FROM alarm_deliveries WHERE subscription_id "
                               "IS NOT NULL").fetchone()
        assert row == (3,)  # hospital A: 2 + 1 frames; the region: 1 batch of 3
        await _deliver_all(notifier, r.dsn, [hl7_a, hl7_ae, fhir_region])
    finally:
        await outbound.stop()
        await notifier.stop()
    restarted = Outbound(r.dsn, keyring, None, settle_s=0)
    assert await restarted.forwarder.run(now=time.time() + 120) == 0

    # HL7 to hospital A: its own identifier in PID-3, ORU^R01 with the alarm's OBX.
    assert all(f"PID|1||{id_card}^^^CHN^NNCHN" in m for m in good.messages)
    assert all(a.pseudonym not in m for m in good.messages)
    [alarm_msg] = [m for m in good.messages if "ALARM_STATE" in m]
    assert "ORU^R01^ORU_R01" in alarm_msg and "|critical|" in alarm_msg
    assert "OBX|5|NM|147842^MDC_ECG_HEART_RATE^MDC^8867-4" in alarm_msg
    obs = [m for m in good.messages if "ALARM_STATE" not in m]
    assert len(obs) == 2 and sum(m.count("\rOBR|") for m in obs) == 3
    assert all("150456" not in m for m in obs)  # spo2 not subscribed
    # The region's FHIR server: pseudonym only; resources valid R4B.
    body = orjson.dumps([p for _, p in posted]).decode()
    assert id_card not in body and a.pseudonym in body
    [comm] = [p for path, p in posted if path == "/fhir/Communication"]
    Communication.model_validate(comm) if hasattr(Communication, "model_validate") \
        else Communication.parse_obj(comm)
    assert comm["priority"] == "stat" and comm["subject"]["identifier"]["value"] == a.pseudonym
    [bundle] = [p for path, p in posted if path == "/fhir"]
    Bundle.model_validate(bundle) if hasattr(Bundle, "model_validate") \
        else Bundle.parse_obj(bundle)
    assert len(bundle["entry"]) == 6
    # The AE system: retried, then dead-lettered.
    with psycopg.connect(r.dsn) as conn:
        rows = conn.execute("SELECT state, attempts, last_error FROM alarm_deliveries "
                            "WHERE channel_id = %s", (hl7_ae,)).fetchall()
        assert rows and all(s == "dead" and n == 2 and "AE" in e for s, n, e in rows)
        assert len(bad.messages) == 2
        await platform.security.audit.flush()
        audited = conn.execute("SELECT method, outcome FROM audit_log WHERE patient = %s "
                               "AND method LIKE 'outbound.%%'", (a.pseudonym,)).fetchall()
    assert ("outbound.hl7", "ok") in audited and ("outbound.fhir", "ok") in audited
    assert ("outbound.hl7", "failed") in audited
