"""RegistryService through the real TLS gRPC server and the security
interceptor: vendors (client certificates on the mTLS port) onboard models
and devices only where approved and see nothing of other vendors; people
manage, bind and retire devices; an issued key reaches the ingest path's
device view within a second."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import psycopg
import pyotp
import pytest

from rmiot.config import Config
from rmiot.deploy import certs
from rmiot.grpc_server import GrpcServer, channel
from rmiot.proto import auth_pb2, auth_pb2_grpc, registry_pb2, registry_pb2_grpc
from rmiot.registry.service import RULES, SERVICE, RegistryServicer
from rmiot.registry.view import DeviceView
from rmiot.security import identity
from rmiot.security.service import SecurityServices
from rmiot.security.sm4 import Keyring
from tests.conftest import eventually
from tests.registry.conftest import World

PASSWORD = "Registry-Test-7"
if TYPE_CHECKING:  # the async stub's type exists in the generated .pyi only
    Stub = registry_pb2_grpc.RegistryServiceAsyncStub


@dataclass
class Platform:
    cfg: Config
    security: SecurityServices
    server: GrpcServer
    world: World
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def _cfg(self) -> Config:
        return dataclasses.replace(self.cfg, grpc=dataclasses.replace(
            self.cfg.grpc, port=self.server.port, mtls_port=self.server.mtls_port))

    async def person(self, role: str, tenant: int | None = None) -> Any:
        """A stub for a new user holding ``role`` on ``tenant`` (default: the hospital)."""
        tenant = tenant or self.world.hospital
        name = f"{role.replace('_', '-')}-{time.time_ns() % 10**10}"
        async with await psycopg.AsyncConnection.connect(self.world.dsn,
                                                         autocommit=True) as conn:
            user_id = await identity.create_user(conn, name, PASSWORD, tenant,
                                                 must_change=False)
            totp = ""
            if role in identity.ADMIN_ROLES:
                totp = pyotp.TOTP(await identity.enroll_totp(
                    conn, self.security.keyring, user_id)).now()
        await self.security.authorizer.grant(f"user:{name}", role, tenant)
        chan = channel(self._cfg())
        self.channels.append(chan)
        login = await auth_pb2_grpc.AuthServiceStub(chan).Login(auth_pb2.LoginRequest(
            username=name, password=PASSWORD, totp=totp))
        return Authorised(registry_pb2_grpc.RegistryServiceStub(chan), login.token)

    async def vendor(self, name: str, *tenants: int) -> Stub:
        """A stub for vendor ``name`` (client certificate, vendor role on ``tenants``)."""
        path = certs.issue_client(self.cfg.data_dir / "certs", name, "vendor")
        for tenant in tenants:
            await self.security.authorizer.grant(f"cert:{name}", "vendor", tenant)
        chan = channel(self._cfg(), client_cert=(path.with_suffix(".key").read_bytes(),
                                                 path.read_bytes()))
        self.channels.append(chan)
        return registry_pb2_grpc.RegistryServiceStub(chan)


class Authorised:
    """A stub whose calls carry a session token."""

    def __init__(self, stub: Stub, token: str) -> None:
        self.stub, self.metadata = stub, (("authorization", f"Bearer {token}"),)

    def __getattr__(self, method: str) -> Any:
        rpc = getattr(self.stub, method)
        return lambda request: rpc(request, metadata=self.metadata, timeout=10)


async def code_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture
async def platform(dev_certs: Config, world: World, keyring: Keyring
                   ) -> AsyncIterator[Platform]:
    cfg = dataclasses.replace(
        dev_certs, grpc=dataclasses.replace(dev_certs.grpc, port=0, mtls_port=0),
        security=dataclasses.replace(dev_certs.security, keyring_dir=str(keyring.directory),
                                     caller_rate_per_s=1e5, tenant_rate_per_s=1e5))
    security = SecurityServices(cfg)
    security.add_rules(RULES)
    await security.start()
    registry = RegistryServicer(security.dsn, security.keyring, security.authorizer)
    await registry.start()
    server = GrpcServer(cfg, services=[*security.services(), registry.service()],
                        interceptors=[security.interceptor])
    await server.start()
    platform = Platform(cfg, security, server, world)
    yield platform
    for chan in platform.channels:
        await chan.close(None)
    await server.stop(0)
    await registry.stop()
    await security.stop()


def new_device(model: int, serial: str, **fields: Any) -> registry_pb2.NewDevice:
    return registry_pb2.NewDevice(model_id=model, serial_no=serial, **fields)


def test_every_method_has_a_tenant_scoped_rule() -> None:
    methods = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].methods
    assert {f"/{SERVICE}/{m.name}" for m in methods} == set(RULES)
    for m in methods:
        rule = RULES[f"/{SERVICE}/{m.name}"]
        assert rule.tenant_field == "tenant_id" and not (rule.public or rule.any_caller)
        assert "tenant_id" in m.input_type.fields_by_name, m.name
        if rule.object_field:
            assert rule.object_field in m.input_type.fields_by_name, m.name


async def test_a_vendor_onboards_only_where_approved(platform: Platform) -> None:
    w = platform.world
    code = f"vendor-a-{w.stamp}"
    a = await platform.vendor(code, w.hospital)
    admin = await platform.person("hospital_admin")
    vendor = await a.CreateVendor(registry_pb2.CreateVendorRequest(
        tenant_id=w.hospital, code=code, name="Vendor A"))
    assert vendor.code == code
    assert await code_of(a.CreateVendor(registry_pb2.CreateVendorRequest(
        tenant_id=w.hospital, code=f"{code}-x", name="not me"))) == \
        grpc.StatusCode.PERMISSION_DENIED
    model = await a.CreateModel(registry_pb2.CreateModelRequest(
        tenant_id=w.hospital, name="A-Mon", kind="monitor",
        metrics=[registry_pb2.MetricSpec(id=1), registry_pb2.MetricSpec(
            id=1200, name="perfusion_index", unit="%", min=0, max=20)]))
    assert [(m.id, m.name) for m in model.metrics] == [(1, "heart_rate"),
                                                      (1200, "perfusion_index")]
    request = registry_pb2.RegisterDeviceRequest(tenant_id=w.hospital, device=new_device(
        model.id, "A-1", rfid=f"A-TAG-{w.stamp}"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await a.RegisterDevice(request)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has not approved vendor" in (info.value.details() or "")
    # A vendor cannot approve itself; the hospital's administrator can.
    approve = registry_pb2.ApproveVendorRequest(tenant_id=w.hospital, vendor_code=code)
    assert await code_of(a.ApproveVendor(approve)) == grpc.StatusCode.PERMISSION_DENIED
    await admin.ApproveVendor(approve)
    device = await a.RegisterDevice(request)
    assert (device.state, device.vendor_code, device.tenant_id, device.rfid) == (
        "registered", code, w.hospital, f"A-TAG-{w.stamp}")
    assert device.registered_by == f"cert:{code}"
    # A vendor registers; the hospital commissions (activates) what it accepts.
    active = registry_pb2.RegisterDeviceRequest(tenant_id=w.hospital, device=new_device(
        model.id, "A-2", activate=True))
    assert await code_of(a.RegisterDevice(active)) == grpc.StatusCode.PERMISSION_DENIED
    # A vendor may require HMAC, never waive it.
    waive = registry_pb2.RegisterDeviceRequest(tenant_id=w.hospital, device=new_device(
        model.id, "A-2", auth_required=False))
    assert await code_of(a.RegisterDevice(waive)) == grpc.StatusCode.INVALID_ARGUMENT
    # Not in a hospital where it holds no role, approved or not.
    elsewhere = registry_pb2.RegisterDeviceRequest(tenant_id=w.other_hospital,
                                                   device=new_device(model.id, "A-3"))
    assert await code_of(a.RegisterDevice(elsewhere)) == grpc.StatusCode.PERMISSION_DENIED
    # What the hospital sees of its approvals, and what the vendor sees of them.
    listed = await admin.ListVendorApprovals(registry_pb2.ListVendorApprovalsRequest(
        tenant_id=w.hospital))
    assert {a.vendor_code for a in listed.approvals} == {w.vendor, code}
    own = await a.ListVendorApprovals(registry_pb2.ListVendorApprovalsRequest(
        tenant_id=w.hospital))
    assert [x.vendor_code for x in own.approvals] == [code]


async def test_a_vendor_never_sees_another_vendors_devices_or_patients(
        platform: Platform) -> None:
    w = platform.world
    a = await platform.vendor(w.vendor, w.hospital)  # the world's approved vendor
    b_code = f"vendor-b-{w.stamp}"
    b = await platform.vendor(b_code, w.hospital)
    await b.CreateVendor(registry_pb2.CreateVendorRequest(tenant_id=w.hospital, code=b_code,
                                                          name="Vendor B"))
    mine = await a.RegisterDevice(registry_pb2.RegisterDeviceRequest(
        tenant_id=w.hospital, device=new_device(w.monitor, "ISO-1", udi=f"U-{w.stamp}")))
    with w.conn() as conn:
        foreign = w.device(conn, "ISO-2").id  # same vendor, another hospital below
        conn.execute("UPDATE devices SET tenant_id = %s WHERE id = %s",
                     (w.other_hospital, foreign))
    get = registry_pb2.GetDeviceRequest(tenant_id=w.hospital, device_id=mine.id)
    assert (await a.GetDevice(get)).serial_no == "ISO-1"
    for call in (b.GetDevice(get),
                 b.GetModel(registry_pb2.GetModelRequest(tenant_id=w.hospital,
                                                         model_id=w.monitor)),
                 b.UpdateDevice(registry_pb2.UpdateDeviceRequest(
                     tenant_id=w.hospital, device_id=mine.id, location="x")),
                 b.IssueKey(registry_pb2.IssueKeyRequest(tenant_id=w.hospital,
                                                         device_id=mine.id)),
                 b.RevokeKeys(registry_pb2.RevokeKeysRequest(tenant_id=w.hospital,
                                                             device_id=mine.id)),
                 b.RegisterDevice(registry_pb2.RegisterDeviceRequest(
                     tenant_id=w.hospital, device=new_device(w.monitor, "B-1"))),
                 # An id from another tenant: not found, not "forbidden".
                 a.GetDevice(registry_pb2.GetDeviceRequest(tenant_id=w.hospital,
                                                           device_id=foreign))):
        assert await code_of(call) == grpc.StatusCode.NOT_FOUND
    listed = await b.ListDevices(registry_pb2.ListDevicesRequest(tenant_id=w.hospital))
    found = await b.FindDevices(registry_pb2.FindDevicesRequest(tenant_id=w.hospital,
                                                                udi=f"U-{w.stamp}"))
    models = await b.ListModels(registry_pb2.ListModelsRequest(tenant_id=w.hospital))
    assert list(listed.devices) == list(found.devices) == list(models.models) == []
    assert [d.id for d in (await a.ListDevices(registry_pb2.ListDevicesRequest(
        tenant_id=w.hospital))).devices] == [mine.id]
    # Never bindings or patients, and not the lifecycle either.
    denied_calls = (
        a.BindingHistory(registry_pb2.BindingHistoryRequest(tenant_id=w.hospital,
                                                            device_id=mine.id)),
        a.BindingHistory(registry_pb2.BindingHistoryRequest(tenant_id=w.hospital,
                                                            patient_id=w.patient)),
        a.Bind(registry_pb2.BindRequest(tenant_id=w.hospital, device_id=mine.id,
                                        patient_id=w.patient)),
        a.Unbind(registry_pb2.UnbindRequest(tenant_id=w.hospital, device_id=mine.id)),
        a.Transition(registry_pb2.TransitionRequest(tenant_id=w.hospital, device_id=mine.id,
                                                    to_state="active", reason="mine")))
    for denied_call in denied_calls:
        assert await code_of(denied_call) == grpc.StatusCode.PERMISSION_DENIED
    await platform.security.audit.flush()
    with psycopg.connect(w.dsn) as conn:
        denied = conn.execute("SELECT method FROM audit_log WHERE actor = %s AND outcome = "
                              "'denied' ORDER BY id", (f"cert:{w.vendor}",)).fetchall()
    assert sorted(m.rsplit("/", 1)[1] for (m,) in denied) == [
        "Bind", "BindingHistory", "BindingHistory", "Transition", "Unbind"]


async def test_an_issued_key_reaches_the_ingest_view(platform: Platform,
                                                     keyring: Keyring) -> None:
    w = platform.world
    admin = await platform.person("hospital_admin")
    view = DeviceView(platform.security.dsn, keyring)
    await view.start()
    try:
        device = await admin.RegisterDevice(registry_pb2.RegisterDeviceRequest(
            tenant_id=w.hospital, device=new_device(w.monitor, "KEY-1", activate=True,
                                                    auth_required=True)))
        await eventually(lambda: view.get(device.id) is not None, 1.0)
        entry = view.get(device.id)
        assert entry is not None and entry.may_send and entry.auth_required
        assert view.key(device.id) is None
        issued = await admin.IssueKey(registry_pb2.IssueKeyRequest(
            tenant_id=w.hospital, device_id=device.id))
        assert len(issued.key) == 32 and issued.version == 1
        assert issued.algorithm == "hmac-sha256"
        started = time.monotonic()
        await eventually(lambda: view.key(device.id) == issued.key, 1.0)
        assert time.monotonic() - started < 1.0
        # A new key replaces it (no overlap asked); a revocation ends them all.
        again = await admin.IssueKey(registry_pb2.IssueKeyRequest(
            tenant_id=w.hospital, device_id=device.id, algorithm="hmac-sm3"))
        assert again.version == 2 and again.key != issued.key
        await eventually(lambda: view.key(device.id) == again.key, 1.0)
        revoked = await admin.RevokeKeys(registry_pb2.RevokeKeysRequest(
            tenant_id=w.hospital, device_id=device.id))
        assert revoked.revoked == 2  # the ended key is marked revoked too
        await eventually(lambda: view.key(device.id) is None, 1.0)
        # Suspension reaches it too.
        await admin.Transition(registry_pb2.TransitionRequest(
            tenant_id=w.hospital, device_id=device.id, to_state="suspended",
            reason="lost"))
        await eventually(lambda: not view.get(device.id).may_send, 1.0)  # type: ignore[union-attr]
    finally:
        await view.stop()
    with psycopg.connect(w.dsn) as conn:
        stored = conn.execute("SELECT key_enc FROM device_keys WHERE device_id = %s",
                              (device.id,)).fetchall()
    assert all(issued.key not in bytes(k) and again.key not in bytes(k) for (k,) in stored)


async def test_refusals_carry_the_right_status(platform: Platform) -> None:
    w = platform.world
    admin = await platform.person("hospital_admin")
    register = registry_pb2.RegisterDeviceRequest(tenant_id=w.hospital, device=new_device(
        w.monitor, "ST-1", udi=f"ST-{w.stamp}"))
    device = await admin.RegisterDevice(register)
    cases = [
        (admin.RegisterDevice(register), grpc.StatusCode.ALREADY_EXISTS),
        (admin.RegisterDevice(registry_pb2.RegisterDeviceRequest(
            tenant_id=w.hospital, device=new_device(w.monitor, "ST-2", asset=registry_pb2.
                                                    AssetData(purchase_date="yesterday")))),
         grpc.StatusCode.INVALID_ARGUMENT),
        (admin.Transition(registry_pb2.TransitionRequest(
            tenant_id=w.hospital, device_id=device.id, to_state="scrapped", reason="x")),
         grpc.StatusCode.FAILED_PRECONDITION),
        (admin.Transition(registry_pb2.TransitionRequest(
            tenant_id=w.hospital, device_id=device.id, to_state="active")),
         grpc.StatusCode.INVALID_ARGUMENT),
        (admin.GetDevice(registry_pb2.GetDeviceRequest(tenant_id=w.hospital,
                                                       device_id=987654321987)),
         grpc.StatusCode.NOT_FOUND),
        (admin.GetDevice(registry_pb2.GetDeviceRequest(tenant_id=w.other_hospital,
                                                       device_id=device.id)),
         grpc.StatusCode.PERMISSION_DENIED),
        (admin.CreateModel(registry_pb2.CreateModelRequest(
            tenant_id=w.hospital, vendor_code=w.vendor, name="X", kind="monitor")),
         grpc.StatusCode.PERMISSION_DENIED),   # a hospital reads models, never writes them
    ]
    for call, expected in cases:
        assert await code_of(call) == expected
    moved = await admin.Transition(registry_pb2.TransitionRequest(
        tenant_id=w.hospital, device_id=device.id, to_state="active", reason="commissioned"))
    assert moved.state == "active"
    history = await admin.StateHistory(registry_pb2.StateHistoryRequest(
        tenant_id=w.hospital, device_id=device.id))
    assert [(c.from_state, c.to_state, c.reason) for c in history.changes] == [
        ("", "registered", "registered"), ("registered", "active", "commissioned")]
    assert history.changes[1].actor.startswith("user:hospital-admin-")
    updated = await admin.UpdateDevice(registry_pb2.UpdateDeviceRequest(
        tenant_id=w.hospital, device_id=device.id, department_id=w.department, rfid="ST-TAG",
        purchase_cost="1000", purchase_date="2024-01-01",
        depreciation_method="straight_line", useful_life_years=5))
    assert (updated.department_id, updated.rfid, updated.asset.purchase_cost) == (
        w.department, "ST-TAG", "1000.00")
    assert updated.asset.book_value and float(updated.asset.book_value) < 1000
    found = await admin.FindDevices(registry_pb2.FindDevicesRequest(tenant_id=w.department,
                                                                    code="ST-TAG"))
    assert [d.id for d in found.devices] == [device.id]


async def test_bindings_are_for_clinical_roles(platform: Platform) -> None:
    w = platform.world
    admin = await platform.person("hospital_admin")
    nurse = await platform.person("clinician", w.department)
    device = await admin.RegisterDevice(registry_pb2.RegisterDeviceRequest(
        tenant_id=w.hospital, device=new_device(w.monitor, "BD-1", activate=True,
                                                department_id=w.department)))
    bind = registry_pb2.BindRequest(tenant_id=w.department, device_id=device.id,
                                    patient_id=w.patient, bed="ICU-1", reason="admitted")
    assert await code_of(admin.Bind(bind)) == grpc.StatusCode.PERMISSION_DENIED
    first = await nurse.Bind(bind)
    assert (first.patient_id, first.bed, first.unbound_us) == (w.patient, "ICU-1", 0)
    second = await nurse.Transfer(registry_pb2.BindRequest(
        tenant_id=w.department, device_id=device.id, patient_id=w.patient, bed="ICU-2"))
    closed = await nurse.Unbind(registry_pb2.UnbindRequest(
        tenant_id=w.department, device_id=device.id, reason="discharged"))
    assert closed.id == second.id and closed.end_kind == "unbind" and closed.unbound_us
    history = await nurse.BindingHistory(registry_pb2.BindingHistoryRequest(
        tenant_id=w.department, device_id=device.id))
    assert [(b.bed, b.end_kind) for b in history.bindings] == [("ICU-2", "unbind"),
                                                               ("ICU-1", "transfer")]
    foreign = registry_pb2.BindRequest(tenant_id=w.department, device_id=device.id,
                                       patient_id=w.foreign_patient)
    assert await code_of(nurse.Bind(foreign)) == grpc.StatusCode.NOT_FOUND


async def test_a_batch_import_reports_each_bad_device(platform: Platform) -> None:
    w = platform.world
    admin = await platform.person("hospital_admin")
    reply = await admin.ImportDevices(registry_pb2.ImportDevicesRequest(
        tenant_id=w.hospital, devices=[
            new_device(w.monitor, "BT-1", rfid=f"BT-{w.stamp}"),
            new_device(w.monitor, "BT-2", department_id=w.department),
            new_device(w.monitor, "BT-3", rfid=f"BT-{w.stamp}"),
            new_device(w.pump, "BT-4"),
            new_device(w.monitor, "BT-5", department_id=w.other_hospital),
        ]))
    assert reply.imported == 2 and len(reply.device_ids) == 2
    assert {(e.index, e.field) for e in reply.errors} == {(3, "rfid"), (4, "model"),
                                                          (5, "department")}
    assert "also given for device 1" in next(e.reason for e in reply.errors if e.index == 3)
    listed = await admin.ListDevices(registry_pb2.ListDevicesRequest(tenant_id=w.hospital))
    assert [d.serial_no for d in listed.devices] == ["BT-1", "BT-2"]
