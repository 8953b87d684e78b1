"""CommandService through the real TLS gRPC server and the security
interceptor: a clinician sends a command and follows it to the device and
back; another hospital's callers and ids get PERMISSION_DENIED / NOT_FOUND."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import psycopg
import pytest

from rmiot.config import Config
from rmiot.grpc_server import GrpcServer, channel
from rmiot.ingest.client import RmfClient, command_result
from rmiot.ingest.service import IngestService
from rmiot.proto import auth_pb2, auth_pb2_grpc, commands_pb2, commands_pb2_grpc
from rmiot.registry import command_service, store
from rmiot.security import identity
from rmiot.security.service import SecurityServices
from rmiot.tenants import store as tenants
from tests.ingest.conftest import now_us, vitals

PASSWORD = "Command-Test-9"
_run = itertools.count()
Q = commands_pb2.CommandState


@dataclass
class Wards:
    cfg: Config
    server: GrpcServer
    hospital_a: int
    hospital_b: int
    device_a: int
    device_b: int
    tokens: dict[str, str]  # "clinician_a", "clinician_b", "vendor_a"

    def stub(self) -> tuple[grpc.aio.Channel, commands_pb2_grpc.CommandServiceStub]:
        chan = channel(dataclasses.replace(
            self.cfg, grpc=dataclasses.replace(self.cfg.grpc, port=self.server.port)))
        return chan, commands_pb2_grpc.CommandServiceStub(chan)

    async def call(self, who: str, method: str, request: Any) -> Any:
        chan, stub = self.stub()
        async with chan:
            return await getattr(stub, method)(
                request, metadata=(("authorization", f"Bearer {self.tokens[who]}"),),
                timeout=10)

    async def code(self, who: str, method: str, request: Any) -> grpc.StatusCode:
        try:
            await self.call(who, method, request)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


@pytest.fixture
async def wards(dev_certs: Config, database: str) -> AsyncIterator[Wards]:
    run = f"{next(_run)}{time.time_ns() % 10**9}"
    cfg = dataclasses.replace(
        dev_certs, grpc=dataclasses.replace(dev_certs.grpc, port=0, mtls_port=0),
        ingest=dataclasses.replace(dev_certs.ingest, tcp_port=0, writers=1, batch_max_ms=5),
        security=dataclasses.replace(dev_certs.security, caller_rate_per_s=1e5,
                                     tenant_rate_per_s=1e5))
    with psycopg.connect(database, autocommit=True) as conn:
        region = tenants.create_tenant(conn, f"cr-{run}", "Region", "region")
        hospital_a = tenants.create_tenant(conn, f"ca-{run}", "Hospital A", "hospital", region)
        hospital_b = tenants.create_tenant(conn, f"cb-{run}", "Hospital B", "hospital", region)
        device_a = store.register_device(conn, hospital_a, serial_no="pump-a")
        device_b = store.register_device(conn, hospital_b, serial_no="pump-b")
    security = SecurityServices(cfg)
    security.add_rules(command_service.RULES)
    await security.start()
    assert security.pool is not None
    server = GrpcServer(cfg, services=[*security.services(),
                                       command_service.service(security.pool)],
                        interceptors=[security.interceptor])
    await server.start()
    served = dataclasses.replace(cfg, grpc=dataclasses.replace(cfg.grpc, port=server.port))
    tokens = {}
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
        for who, role, tenant in (("clinician_a", "clinician", hospital_a),
                                  ("clinician_b", "clinician", hospital_b),
                                  ("vendor_a", "vendor", hospital_a)):
            name = f"{who.replace('_', '-')}-{run}"
            await identity.create_user(conn, name, PASSWORD, tenant, must_change=False)
            await security.authorizer.grant(f"user:{name}", role, tenant)
            async with channel(served) as chan:
                reply = await auth_pb2_grpc.AuthServiceStub(chan).Login(
                    auth_pb2.LoginRequest(username=name, password=PASSWORD))
            tokens[who] = reply.token
    yield Wards(cfg, server, hospital_a, hospital_b, device_a, device_b, tokens)
    await server.stop(0)
    await security.stop()


def send_request(tenant: int, device: int, **extra: Any) -> commands_pb2.SendCommandRequest:
    return commands_pb2.SendCommandRequest(
        tenant_id=tenant, device_id=device, name=extra.pop("name", "set_rate"),
        params=extra.pop("params", [commands_pb2.Param(metric=10, f32=12.5),
                                    commands_pb2.Param(metric=12, blob=b"\x00\x01")]),
        **extra)


async def test_send_reaches_the_device_and_get_shows_its_history(wards: Wards) -> None:
    ingest = IngestService(wards.cfg)
    await ingest.start()
    device = RmfClient("127.0.0.1", ingest.tcp.port)
    try:
        await device.connect()
        device.send(vitals(wards.hospital_a, wards.device_a, 1), wards.device_a, 1)
        await device.drain()
        assert await device.wait_acked(5)
        start = time.monotonic()
        sent = await wards.call("clinician_a", "Send",
                                send_request(wards.hospital_a, wards.device_a, ttl_s=120))
        assert await device.wait_commands(1, 1.0)
        assert time.monotonic() - start < 1.0
        assert device.commands[0].fields() == [(0, 4, sent.command_id), (10, 1, 12.5),
                                               (12, 7, b"\x00\x01")]
        device.send(command_result(wards.hospital_a, wards.device_a, 2, now_us(),
                                   sent.command_id, 0), wards.device_a, 2)
        await device.drain()
        assert await device.wait_acked(5)
        get = commands_pb2.GetCommandRequest(tenant_id=wards.hospital_a,
                                             command_id=sent.command_id)
        for _ in range(100):
            got = await wards.call("clinician_a", "Get", get)
            if got.state == Q.COMMAND_SUCCEEDED:
                break
    finally:
        await device.close()
        await ingest.stop(drain_timeout=5)
    assert got.state == Q.COMMAND_SUCCEEDED and got.result_code == 0
    assert [e.state for e in got.history] == [Q.COMMAND_QUEUED, Q.COMMAND_SENT,
                                              Q.COMMAND_DELIVERED, Q.COMMAND_SUCCEEDED]
    assert got.created_by.startswith("user:clinician-a-")
    assert got.expires_us - got.created_us == 120 * 10**6
    assert [(p.metric, p.WhichOneof("value")) for p in got.params] == [(10, "f32"),
                                                                      (12, "blob")]


async def test_list_pages_by_device_and_state(wards: Wards) -> None:
    ids = [(await wards.call("clinician_a", "Send", send_request(
        wards.hospital_a, wards.device_a))).command_id for _ in range(3)]
    page = await wards.call("clinician_a", "List", commands_pb2.ListCommandsRequest(
        tenant_id=wards.hospital_a, device_id=wards.device_a, page_size=2))
    assert [c.id for c in page.commands] == ids[:0:-1] and page.next_before_id == ids[1]
    rest = await wards.call("clinician_a", "List", commands_pb2.ListCommandsRequest(
        tenant_id=wards.hospital_a, device_id=wards.device_a, page_size=2,
        before_id=page.next_before_id))
    assert [c.id for c in rest.commands] == [ids[0]] and rest.next_before_id == 0
    queued = await wards.call("clinician_a", "List", commands_pb2.ListCommandsRequest(
        state=Q.COMMAND_QUEUED))  # tenant 0: the caller's home tenant
    assert {c.id for c in queued.commands} == set(ids)
    none = await wards.call("clinician_a", "List", commands_pb2.ListCommandsRequest(
        tenant_id=wards.hospital_a, state=Q.COMMAND_SUCCEEDED))
    assert not none.commands


async def test_another_hospital_is_denied_or_not_found(wards: Wards) -> None:
    theirs = await wards.call("clinician_b", "Send",
                              send_request(wards.hospital_b, wards.device_b))
    ours = await wards.call("clinician_a", "Send",
                            send_request(wards.hospital_a, wards.device_a))
    a, b = wards.hospital_a, wards.hospital_b
    cases = [
        # Asking about another hospital: the interceptor refuses.
        ("clinician_a", "Send", send_request(b, wards.device_b), "PERMISSION_DENIED"),
        ("clinician_a", "Get", commands_pb2.GetCommandRequest(
            tenant_id=b, command_id=theirs.command_id), "PERMISSION_DENIED"),
        ("clinician_a", "List", commands_pb2.ListCommandsRequest(tenant_id=b),
         "PERMISSION_DENIED"),
        # Another hospital's ids through one's own tenant: not found.
        ("clinician_a", "Send", send_request(a, wards.device_b), "NOT_FOUND"),
        ("clinician_a", "Get", commands_pb2.GetCommandRequest(
            tenant_id=a, command_id=theirs.command_id), "NOT_FOUND"),
        ("clinician_b", "Get", commands_pb2.GetCommandRequest(
            tenant_id=b, command_id=ours.command_id), "NOT_FOUND"),
        # A vendor holds no command right, even in its own tenant.
        ("vendor_a", "Send", send_request(a, wards.device_a), "PERMISSION_DENIED"),
        ("vendor_a", "List", commands_pb2.ListCommandsRequest(tenant_id=a),
         "PERMISSION_DENIED"),
    ]
    for who, method, request, expected in cases:
        assert (await wards.code(who, method, request)).name == expected, (who, method)
    listed = await wards.call("clinician_a", "List",
                              commands_pb2.ListCommandsRequest(tenant_id=a))
    assert theirs.command_id not in {c.id for c in listed.commands}


async def test_a_bad_command_is_an_invalid_argument(wards: Wards) -> None:
    a, device = wards.hospital_a, wards.device_a
    for request in (send_request(a, device, name="Set Rate"),
                    send_request(a, device, params=[commands_pb2.Param(metric=0, i64=1)]),
                    send_request(a, device, params=[commands_pb2.Param(metric=3)]),
                    send_request(a, device, ttl_s=30 * 86400)):
        assert await wards.code("clinician_a", "Send", request) \
            == grpc.StatusCode.INVALID_ARGUMENT
