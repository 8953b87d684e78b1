"""AlarmService through the real TLS gRPC server and the security
interceptor; escalation with an injectable clock; webhooks against a real
local HTTP server; MQTT channels through the real broker."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import hmac
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiomqtt
import grpc
import orjson
import psycopg
import pytest
from aiohttp import web

from rmiot.config import Config
from rmiot.grpc_server import GrpcServer, channel
from rmiot.ingest import alarm_admin, alarm_store
from rmiot.ingest.alarm_admin import Channel
from rmiot.ingest.alarm_escalation import EscalationRunner
from rmiot.ingest.alarm_eval import Transition
from rmiot.ingest.alarm_mqtt import AlarmPublisher
from rmiot.ingest.alarm_rules import Rule
from rmiot.ingest.alarm_service import RULES, AlarmServices
from rmiot.ingest.broker_login import client_options
from rmiot.proto import alarm_pb2, alarm_pb2_grpc, auth_pb2, auth_pb2_grpc
from rmiot.registry import store
from rmiot.security import identity
from rmiot.security.service import SecurityServices
from rmiot.tenants import store as tenants
from tests.alarms.conftest import put_rule
from tests.conftest import free_port

PASSWORD = "Alarm-Test-9x"
_run = itertools.count()


@dataclass
class Wards:
    cfg: Config
    dsn: str
    alarms: AlarmServices
    security: SecurityServices
    hospital_a: int
    hospital_b: int
    device_a: int
    device_b: int
    tokens: dict[str, str]

    def stub(self) -> tuple[grpc.aio.Channel, alarm_pb2_grpc.AlarmServiceStub]:
        chan = channel(self.cfg)
        return chan, alarm_pb2_grpc.AlarmServiceStub(chan)

    def auth(self, who: str) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.tokens[who]}"),)

    async def call(self, who: str, method: str, request: Any) -> Any:
        chan, stub = self.stub()
        async with chan:
            return await getattr(stub, method)(request, metadata=self.auth(who), timeout=10)

    async def code(self, who: str, method: str, request: Any) -> str:
        try:
            await self.call(who, method, request)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return "OK"


@pytest.fixture
async def wards(dev_certs: Config, database: str, mqtt: tuple[str, int]
                ) -> AsyncIterator[Wards]:
    run = f"{next(_run)}{time.time_ns() % 10**9}"
    cfg = dataclasses.replace(
        dev_certs, grpc=dataclasses.replace(dev_certs.grpc, port=0, mtls_port=0),
        security=dataclasses.replace(dev_certs.security, caller_rate_per_s=1e5,
                                     tenant_rate_per_s=1e5))
    with psycopg.connect(database, autocommit=True) as conn:
        region = tenants.create_tenant(conn, f"ar-{run}", "Region", "region")
        hospital_a = tenants.create_tenant(conn, f"aa-{run}", "Hospital A", "hospital", region)
        hospital_b = tenants.create_tenant(conn, f"ab-{run}", "Hospital B", "hospital", region)
        device_a = store.register_device(conn, hospital_a, serial_no="mon-a")
        device_b = store.register_device(conn, hospital_b, serial_no="mon-b")
    security = SecurityServices(cfg)
    security.add_rules(RULES)
    await security.start()
    assert security.pool is not None
    alarms = AlarmServices(security.dsn, security.pool, security.authorizer, security.keyring,
                           security.audit, mqtt=AlarmPublisher(cfg))
    await alarms.start()
    server = GrpcServer(cfg, services=[*security.services(), alarms.service()],
                        interceptors=[security.interceptor])
    await server.start()
    served = dataclasses.replace(cfg, grpc=dataclasses.replace(cfg.grpc, port=server.port))
    tokens = {}
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        for who, role, tenant in (("clinician_a", "clinician", hospital_a),
                                  ("clinician_b", "clinician", hospital_b),
                                  ("admin_a", "department_head", hospital_a),
                                  ("vendor_a", "vendor", hospital_a)):
            name = f"{who.replace('_', '-')}-{run}"
            await identity.create_user(conn, name, PASSWORD, tenant, must_change=False)
            await security.authorizer.grant(f"user:{name}", role, tenant)
            async with channel(served) as chan:
                reply = await auth_pb2_grpc.AuthServiceStub(chan).Login(
                    auth_pb2.LoginRequest(username=name, password=PASSWORD))
            tokens[who] = reply.token
    yield Wards(served, database, alarms, security, hospital_a, hospital_b, device_a, device_b,
                tokens)
    await server.stop(0)
    await alarms.stop()
    await security.stop()


async def raise_alarm(dsn: str, rule: Rule, tenant: int, device: int,
                      at: dt.datetime | None = None) -> int:
    """An alarm raised the way the ingest writer raises it."""
    t = Transition("raise", rule, device, tenant, None, time.time_ns() // 1000, 85.0,
                   "spo2: metric 2 = 85 (< 90)")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn, \
            alarm_store.locked(conn):
        event = await alarm_store.raise_alarm(
            conn, t, at or dt.datetime.now(dt.UTC), rule.escalation.next_deadline_s(0, 0.0))
    assert event is not None
    return event.alarm_id


SPO2 = {"metric": 2, "op": "<", "value": 90}


async def test_lifecycle_and_reach(wards: Wards) -> None:
    rule_a = await put_rule(wards.dsn, wards.hospital_a, "threshold", {**SPO2, "latching": True})
    rule_b = await put_rule(wards.dsn, wards.hospital_b, "threshold", SPO2)
    ours = await raise_alarm(wards.dsn, rule_a, wards.hospital_a, wards.device_a)
    theirs = await raise_alarm(wards.dsn, rule_b, wards.hospital_b, wards.device_b)
    a, b = wards.hospital_a, wards.hospital_b
    listed = await wards.call("clinician_a", "List", alarm_pb2.ListAlarmsRequest(tenant_id=a))
    assert [x.id for x in listed.alarms] == [ours]
    mine = await wards.call("clinician_a", "List", alarm_pb2.ListAlarmsRequest(state="open"))
    assert theirs not in {x.id for x in mine.alarms}
    cases = [
        ("clinician_a", "Get", alarm_pb2.AlarmRequest(tenant_id=b, alarm_id=theirs),
         "PERMISSION_DENIED"),
        ("clinician_a", "Get", alarm_pb2.AlarmRequest(tenant_id=a, alarm_id=theirs),
         "NOT_FOUND"),
        ("clinician_a", "Acknowledge", alarm_pb2.AlarmActionRequest(tenant_id=a,
                                                                    alarm_id=theirs),
         "NOT_FOUND"),
        ("vendor_a", "List", alarm_pb2.ListAlarmsRequest(tenant_id=a), "PERMISSION_DENIED"),
        ("clinician_a", "PutRule", alarm_pb2.Rule(tenant_id=a, code="x", kind="battery"),
         "PERMISSION_DENIED"),
        ("admin_a", "DeleteRule", alarm_pb2.RuleRequest(tenant_id=a, rule_id=rule_b.id),
         "NOT_FOUND"),
    ]
    for who, method, request, expected in cases:
        assert await wards.code(who, method, request) == expected, (who, method)
    # Latching: the condition ends, the alarm stays until acknowledged.
    t = Transition("normal", rule_a, wards.device_a, a, None, time.time_ns() // 1000, 95.0, "")
    async with await psycopg.AsyncConnection.connect(wards.dsn, autocommit=True) as conn, \
            alarm_store.locked(conn):
        ended = await alarm_store.condition_ended(conn, t, dt.datetime.now(dt.UTC))
    assert ended is not None and ended.kind == "normal" and ended.state == "active"
    await wards.call("clinician_a", "MarkRead", alarm_pb2.AlarmRequest(alarm_id=ours))
    await wards.call("clinician_a", "Comment", alarm_pb2.AlarmActionRequest(
        alarm_id=ours, comment="probe repositioned"))
    acked = await wards.call("clinician_a", "Acknowledge", alarm_pb2.AlarmActionRequest(
        tenant_id=a, alarm_id=ours, comment="seen"))
    assert acked.state == "cleared" and acked.acked_by.startswith("user:clinician-a-")
    got = await wards.call("clinician_a", "Get", alarm_pb2.AlarmRequest(alarm_id=ours))
    assert [(e.kind, e.state) for e in got.history] == [
        ("raised", "active"), ("normal", "active"), ("read", "active"), ("comment", "active"),
        ("acknowledged", "acknowledged"), ("cleared", "cleared")]
    assert await wards.code("clinician_a", "Clear", alarm_pb2.AlarmActionRequest(
        alarm_id=ours)) == "FAILED_PRECONDITION"
    # Rule CRUD by the hospital's administrator.
    made = await wards.call("admin_a", "PutRule", alarm_pb2.Rule(
        tenant_id=a, code="battery-low", kind="battery", severity="minor", enabled=True,
        params_json='{"below": 15}'))
    assert orjson.loads(made.params_json)["clear_above"] == 20
    rules = await wards.call("admin_a", "ListRules", alarm_pb2.ListRulesRequest(tenant_id=a))
    assert {r.code for r in rules.rules} >= {"battery-low", rule_a.code}
    assert await wards.code("admin_a", "PutRule", alarm_pb2.Rule(
        tenant_id=a, code="bad", kind="threshold", params_json='{"metric": 2}')) \
        == "INVALID_ARGUMENT"


async def test_watch_resumes_from_its_cursor_without_loss_and_only_within_reach(
        wards: Wards) -> None:
    rule_a = await put_rule(wards.dsn, wards.hospital_a, "threshold", SPO2)
    rule_b = await put_rule(wards.dsn, wards.hospital_b, "threshold", SPO2)
    seen: list[alarm_pb2.AlarmEvent] = []
    chan, stub = wards.stub()
    async with chan:
        stream = stub.Watch(alarm_pb2.WatchRequest(tenant_id=wards.hospital_a),
                            metadata=wards.auth("clinician_a"))
        first = await raise_alarm(wards.dsn, rule_a, wards.hospital_a, wards.device_a)
        await raise_alarm(wards.dsn, rule_b, wards.hospital_b, wards.device_b)
        seen.append(await asyncio.wait_for(stream.read(), 5))
        stream.cancel()
    assert seen[0].alarm_id == first and seen[0].kind == "raised"
    # While away: two alarms of ours, one of the other hospital.
    missed = [await raise_alarm(wards.dsn, rule_a, wards.hospital_a, d)
              for d in (await _devices(wards.dsn, wards.hospital_a, 2))]
    await raise_alarm(wards.dsn, rule_b, wards.hospital_b,
                      (await _devices(wards.dsn, wards.hospital_b, 1))[0])
    chan, stub = wards.stub()
    async with chan:
        stream = stub.Watch(alarm_pb2.WatchRequest(tenant_id=wards.hospital_a,
                                                   cursor=seen[0].id),
                            metadata=wards.auth("clinician_a"))
        replayed = [await asyncio.wait_for(stream.read(), 5) for _ in missed]
        live = await raise_alarm(wards.dsn, rule_a, wards.hospital_a,
                                 (await _devices(wards.dsn, wards.hospital_a, 1))[0])
        nxt = await asyncio.wait_for(stream.read(), 5)
        stream.cancel()
    assert [e.alarm_id for e in replayed] == missed
    assert all(e.tenant_id == wards.hospital_a for e in [*replayed, nxt])
    assert nxt.alarm_id == live and nxt.kind == "raised"
    assert [e.id for e in replayed] == sorted(e.id for e in replayed)
    # Watching another hospital: refused.
    chan, stub = wards.stub()
    async with chan:
        stream = stub.Watch(alarm_pb2.WatchRequest(tenant_id=wards.hospital_b),
                            metadata=wards.auth("clinician_a"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(stream.read(), 5)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def _devices(dsn: str, tenant: int, count: int) -> list[int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [store.register_device(conn, tenant, serial_no=f"extra-{time.time_ns()}-{i}")
                for i in range(count)]


async def test_escalation_walks_its_deadlines_by_the_injected_clock(wards: Wards) -> None:
    rule = await put_rule(wards.dsn, wards.hospital_a, "threshold", SPO2, escalation={
        "steps": [{"after_s": 60, "notify": "department_head", "severity": "critical"},
                  {"after_s": 300, "notify": "emergency_contact"}],
        "renotify_s": 120})
    t0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    alarm = await raise_alarm(wards.dsn, rule, wards.hospital_a, wards.device_a, at=t0)
    runner = EscalationRunner(wards.dsn, wards.security.audit)
    base = t0.timestamp()

    async def at(seconds: float) -> list[tuple[str, str, Any]]:
        events = [e for e in await runner.tick(base + seconds) if e.alarm_id == alarm]
        return [(e.kind, e.severity, (e.detail or {}).get("notify")) for e in events]

    assert await at(59) == []
    assert await at(61) == [("escalated", "critical", "department_head")]
    assert await at(119) == []
    assert await at(121) == [("renotified", "critical", None)]
    assert await at(241) == [("renotified", "critical", None)]
    assert await at(301) == [("escalated", "critical", "emergency_contact")]
    assert await at(359) == []
    assert await at(361) == [("renotified", "critical", None)]
    await wards.call("clinician_a", "Acknowledge", alarm_pb2.AlarmActionRequest(alarm_id=alarm))
    assert await at(10_000) == []
    got = await wards.call("clinician_a", "Get", alarm_pb2.AlarmRequest(alarm_id=alarm))
    assert got.escalation_step == 2 and got.next_escalation_us == 0
    await wards.security.audit.flush()
    with psycopg.connect(wards.dsn, autocommit=True) as conn:
        audited = conn.execute("SELECT method FROM audit_log WHERE object = %s ORDER BY id",
                               (f"alarm:{alarm}",)).fetchall()
    assert [m for (m,) in audited if m.startswith("alarm.")] == [
        "alarm.escalated", "alarm.renotified", "alarm.renotified", "alarm.escalated",
        "alarm.renotified"]
    await runner.stop()  # closes its connection


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[tuple[dict[str, str], bytes]], list[int]]]:
    """A real local HTTP server: answers with the statuses queued in ``plan``
    (then 200), records each request."""
    got: list[tuple[dict[str, str], bytes]] = []
    plan: list[int] = []

    async def hook(request: web.Request) -> web.Response:
        got.append((dict(request.headers), await request.read()))
        return web.Response(status=plan.pop(0) if plan else 200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/hook", got, plan
    await runner.cleanup()


async def deliveries(dsn: str, channel_id: int) -> list[tuple[str, int]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return [(s, n) for s, n in conn.execute(
            "SELECT state, attempts FROM alarm_deliveries WHERE channel_id = %s ORDER BY id",
            (channel_id,)).fetchall()]


async def until(condition: Any, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not await condition():  # noqa: ASYNC110 - the state is in the database
            await asyncio.sleep(0.05)


async def test_webhook_is_signed_retried_with_backoff_and_dead_lettered(
        wards: Wards, receiver: tuple[str, list[tuple[dict[str, str], bytes]], list[int]]
) -> None:
    url, got, plan = receiver
    secret = b"0123456789abcdef-hook"
    async with await psycopg.AsyncConnection.connect(wards.dsn, autocommit=True) as conn:
        hook = await alarm_admin.put_channel(
            conn, wards.hospital_a, 0, wards.security.keyring,
            Channel(0, wards.hospital_a, "webhook", url, "major", ["raised"], 3, 0.05, True),
            secret, "user:test")
    rule = await put_rule(wards.dsn, wards.hospital_a, "threshold", SPO2)
    plan += [500, 503]  # two failures, then delivered
    first = await raise_alarm(wards.dsn, rule, wards.hospital_a, wards.device_a)
    await until(lambda: _state_is(wards.dsn, hook.id, [("delivered", 3)]))
    assert len(got) == 3
    headers, body = got[-1]
    stamp = headers["X-Rmiot-Timestamp"]
    expected = hmac.new(secret, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    assert headers["X-Rmiot-Signature"] == f"sha256={expected}"
    assert orjson.loads(body)["alarm_id"] == first
    plan += [500, 500, 500, 500]
    device = (await _devices(wards.dsn, wards.hospital_a, 1))[0]
    await raise_alarm(wards.dsn, rule, wards.hospital_a, device)
    await until(lambda: _state_is(wards.dsn, hook.id, [("delivered", 3), ("dead", 3)]))
    assert len(got) == 6


async def _state_is(dsn: str, channel_id: int, want: list[tuple[str, int]]) -> bool:
    return await deliveries(dsn, channel_id) == want


async def test_mqtt_channel_reaches_a_subscribed_client(wards: Wards) -> None:
    topic = f"hospital-{wards.hospital_a}/alarms/{time.time_ns()}"
    async with await psycopg.AsyncConnection.connect(wards.dsn, autocommit=True) as conn:
        mqtt_channel = await alarm_admin.put_channel(
            conn, wards.hospital_a, 0, wards.security.keyring,
            Channel(0, wards.hospital_a, "mqtt", topic, "major", ["raised"], 3, 0.05, True),
            b"", "user:test")
    assert wards.alarms.mqtt is not None
    async with asyncio.timeout(10):
        await wards.alarms.mqtt.connected.wait()
    rule = await put_rule(wards.dsn, wards.hospital_a, "threshold", SPO2)
    async with aiomqtt.Client(**client_options(wards.cfg),
                              identifier=f"alarm-test-{time.time_ns()}") as hospital_system:
        await hospital_system.subscribe(topic, qos=1)
        alarm = await raise_alarm(wards.dsn, rule, wards.hospital_a, wards.device_a)
        async with asyncio.timeout(10):
            message = await anext(aiter(hospital_system.messages))
    assert isinstance(message.payload, bytes)
    body = orjson.loads(message.payload)
    assert (body["alarm_id"], body["kind"], body["device_id"]) == (
        alarm, "raised", wards.device_a)
    await until(lambda: _state_is(wards.dsn, mqtt_channel.id, [("delivered", 1)]))
