"""OpsService through the real TLS gRPC server and the security interceptor:
reach (another hospital's ids are NOT_FOUND), audit, a fault reported by a
scanned code, energy per zone, and the monthly report rendered to a file and
read back."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pyotp
import pytest

from rmiot.config import Config
from rmiot.grpc_server import GrpcServer, channel
from rmiot.proto import auth_pb2, auth_pb2_grpc, ops_pb2, ops_pb2_grpc
from rmiot.query.ops_energy import OpsEnergy
from rmiot.registry.ops_service import RULES, OpsServicer
from rmiot.security import identity
from rmiot.security.service import SecurityServices
from tests.ops.conftest import District, PageText, write_frames

PASSWORD = "Ops-Test-9x!"
_run = itertools.count()
UTC = dt.UTC


@dataclass
class Desk:
    cfg: Config
    d: District
    tokens: dict[str, str]

    async def call(self, who: str, method: str, request: Any) -> Any:
        async with channel(self.cfg) as chan:
            stub = ops_pb2_grpc.OpsServiceStub(chan)
            return await getattr(stub, method)(
                request, metadata=(("authorization", f"Bearer {self.tokens[who]}"),),
                timeout=20)

    async def code(self, who: str, method: str, request: Any) -> str:
        try:
            await self.call(who, method, request)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        return "OK"


@pytest.fixture
async def desk(dev_certs: Config, district: District) -> AsyncIterator[Desk]:
    run = f"{next(_run)}{time.time_ns() % 10**9}"
    cfg = dataclasses.replace(
        dev_certs, grpc=dataclasses.replace(dev_certs.grpc, port=0, mtls_port=0),
        security=dataclasses.replace(dev_certs.security, caller_rate_per_s=1e5,
                                     tenant_rate_per_s=1e5))
    security = SecurityServices(cfg)
    security.add_rules(RULES)
    await security.start()
    ops = OpsServicer(security.dsn, OpsEnergy(security.dsn))
    server = GrpcServer(cfg, services=[*security.services(), ops.service()],
                        interceptors=[security.interceptor])
    await server.start()
    served = dataclasses.replace(cfg, grpc=dataclasses.replace(cfg.grpc, port=server.port))
    tokens = {}
    async with await psycopg.AsyncConnection.connect(district.dsn, autocommit=True) as conn:
        for who, role, tenant in (("admin_a", "hospital_admin", district.hospital_a),
                                  ("admin_b", "hospital_admin", district.hospital_b),
                                  ("nurse_a", "clinician", district.hospital_a),
                                  ("commission", "commission_admin", district.region)):
            name = f"{who.replace('_', '-')}-{run}"
            user_id = await identity.create_user(conn, name, PASSWORD, tenant,
                                                 must_change=False)
            totp = ""
            if role in identity.ADMIN_ROLES:
                totp = pyotp.TOTP(await identity.enroll_totp(
                    conn, security.keyring, user_id)).now()
            await security.authorizer.grant(f"user:{name}", role, tenant)
            async with channel(served) as chan:
                reply = await auth_pb2_grpc.AuthServiceStub(chan).Login(
                    auth_pb2.LoginRequest(username=name, password=PASSWORD, totp=totp))
            tokens[who] = reply.token
    yield Desk(served, district, tokens)
    await server.stop(0)
    await ops.stop()
    await security.stop()


async def test_reach_audit_and_work_orders(desk: Desk) -> None:
    d = desk.d
    mine = d.device(d.ventilator_model, d.icu_a, d.hospital_a)
    theirs = d.device(d.ventilator_model, d.icu_b, d.hospital_b)
    with d.conn() as conn:
        conn.execute("INSERT INTO device_codes (code, tenant_id, kind, device_id) "
                     "VALUES (%s, %s, 'qr', %s)", (f"QR-{d.tag}", d.hospital_a, mine))
    event = await desk.call("admin_a", "RecordAssetEvent", ops_pb2.AssetEventRequest(
        device_id=mine, kind="acceptance", cost="0", document_ref="ACC-1"))
    assert event.actor.startswith("user:admin-a") and event.document_ref == "ACC-1"
    for method, request in (
            ("RecordAssetEvent", ops_pb2.AssetEventRequest(device_id=theirs, kind="maintenance")),
            ("GetLedger", ops_pb2.LedgerRequest(device_id=theirs)),
            ("ReportFault", ops_pb2.ReportFaultRequest(device_id=theirs, fault="broken")),
            ("Locate", ops_pb2.LocateRequest(device_id=theirs))):
        got = await desk.code("admin_a", method, request)
        assert got in ("NOT_FOUND", "OK"), (method, got)
        if method == "Locate":
            assert not (await desk.call("admin_a", method, request)).positions
        else:
            assert got == "NOT_FOUND", method
    # A nurse scans the QR code to report a fault; the engineer takes and closes it.
    order = await desk.call("nurse_a", "ReportFault", ops_pb2.ReportFaultRequest(
        code=f"QR-{d.tag}", fault="flow sensor error"))
    assert order.device_id == mine and order.state == "open"
    assert await desk.code("admin_b", "UpdateWorkOrder", ops_pb2.WorkOrderStep(
        tenant_id=d.hospital_b, work_order_id=order.id, action="assign",
        assignee="user:x")) == "NOT_FOUND"
    assert await desk.code("nurse_a", "UpdateWorkOrder", ops_pb2.WorkOrderStep(
        work_order_id=order.id, action="assign", assignee="user:eng")) == "PERMISSION_DENIED"
    await desk.call("admin_a", "UpdateWorkOrder", ops_pb2.WorkOrderStep(
        work_order_id=order.id, action="assign", assignee="user:eng"))
    closed = await desk.call("admin_a", "UpdateWorkOrder", ops_pb2.WorkOrderStep(
        work_order_id=order.id, action="close", note="sensor replaced", cost="320.00",
        document_ref="INV-5"))
    assert closed.state == "closed" and [e.kind for e in closed.events] == [
        "reported", "assign", "close"]
    book = await desk.call("admin_a", "GetLedger", ops_pb2.LedgerRequest(device_id=mine))
    assert [e.kind for e in book.events] == ["acceptance", "repair"]
    assert book.events[1].cost == "320.00" and book.events[1].work_order_id == order.id
    # Another hospital's tenant named outright: refused by the interceptor.
    assert await desk.code("admin_a", "Available", ops_pb2.AvailableRequest(
        tenant_id=d.hospital_b)) == "PERMISSION_DENIED"
    with d.conn() as conn:
        rows = conn.execute("SELECT method, object FROM audit_log WHERE actor LIKE %s "
                            "ORDER BY id", ("user:nurse-a%",)).fetchall()
    assert [r[0] for r in rows] == ["/rmiot.v1.AuthService/Login",
                                    "/rmiot.v1.OpsService/ReportFault",
                                    "/rmiot.v1.OpsService/UpdateWorkOrder"]


async def test_monthly_report_renders_with_energy(desk: Desk, tmp_path: Path) -> None:
    d = desk.d
    meter = d.device(d.meter_model, d.building_a, d.hospital_a)
    vent = d.device(d.ventilator_model, d.icu_a, d.hospital_a,
                    calibration_due=dt.date(2025, 3, 10))
    # A meter counting 10 kWh an hour through February and March 2025.
    start = dt.datetime(2025, 1, 31, tzinfo=UTC)
    hours = int((dt.datetime(2025, 4, 2, tzinfo=UTC) - start).total_seconds() // 3600)
    write_frames(d.dsn, meter, d.hospital_a,
                 [(start + dt.timedelta(hours=h), [(201, 1000.0 + 10 * h)]) for h in range(hours)])
    write_frames(d.dsn, vent, d.hospital_a,
                 [(dt.datetime(2025, 3, 1, tzinfo=UTC) + dt.timedelta(minutes=30 * i),
                   [(304, i % 3 == 0)]) for i in range(48 * 31)])
    energy = await desk.call("admin_a", "Energy", ops_pb2.ZoneEnergyRequest(
        from_date="2025-03-01", to_date="2025-04-01", metric=201))
    [zone] = [z for z in energy.zones if z.zone_id == d.building_a]
    # Local days (the platform's time zone) shift the bounds, not the hourly rate.
    assert zone.used == pytest.approx(31 * 24 * 10) and zone.previous_month == pytest.approx(
        28 * 24 * 10)
    for regional, who, tenant in ((False, "admin_a", d.hospital_a),
                                  (True, "commission", d.region)):
        report = await desk.call(who, "MonthlyReport", ops_pb2.ReportRequest(
            tenant_id=tenant, month="2025-03", format="html", regional=regional))
        path = tmp_path / report.filename
        path.write_bytes(report.content)
        page = PageText()
        page.feed(path.read_text(encoding="utf-8"))
        text = " ".join(page.text)
        assert "operations report 2025-03" in text and "svg" in page.tags
        assert "Energy by" in text and "7440.0" in text and "Alarms raised" in text
        if regional:
            assert "de-identified" in text and "ICU A" not in text and "Hospital A" in text
        else:
            assert "ventilator" in text and "ICU A" in text and "Building A1" in text
        csv_report = await desk.call(who, "MonthlyReport", ops_pb2.ReportRequest(
            tenant_id=tenant, month="2025-03", format="csv", regional=regional))
        rows = list(csv.reader(io.StringIO(csv_report.content.decode())))
        assert rows[0][0].startswith("# ") and ["# Energy by hospital" if regional
                                                 else "# Energy by zone"] in rows
        energy_rows = rows[rows.index(["# Energy by hospital" if regional
                                       else "# Energy by zone"]) + 2:]
        assert any(r and r[1] == "7440.0" for r in energy_rows)
    assert await desk.code("nurse_a", "MonthlyReport", ops_pb2.ReportRequest(
        month="2025-03")) == "PERMISSION_DENIED"
