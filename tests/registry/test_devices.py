"""Devices and models through the registry's functions: every field checked,
unique UDIs, serial numbers and codes, searches, updates, approvals, scope."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import psycopg
import pytest

from rmiot.registry import approvals, devices, lifecycle, models
from rmiot.registry.assets import AssetData, book_value
from rmiot.registry.devices import Scope
from rmiot.registry.fields import parse_device
from rmiot.registry.store import EXISTS, INVALID, NOT_FOUND, PRECONDITION, RegistryError
from tests.registry.conftest import World


def test_a_device_keeps_every_field(world: World) -> None:
    with world.conn() as conn:
        device = world.device(
            conn, "SN-1", udi="(01)06901234567892(21)SN-1", rfid="E2000017221101441890",
            barcode="6901234567892", qr="https://udi.example/SN-1", location="B2-3F-R301",
            department=f"rd-{world.stamp}", state="active", auth_required="yes",
            asset_class="ii", asset_grade="A", purchase_date="2024-01-15",
            purchase_cost="128,000.50", depreciation_method="straight_line",
            useful_life_years="8", calibration_due="2026-06-30", inspection_due="2026-01-31")
        again = devices.get(conn, device.id, Scope(world.department))
    assert again == device
    assert (device.tenant_id, device.department_id, device.home) == (
        world.hospital, world.department, world.department)
    assert device.codes == {"rfid": "E2000017221101441890", "barcode": "6901234567892",
                            "qr": "https://udi.example/SN-1"}
    assert (device.state, device.auth_required, device.vendor_code) == ("active", True,
                                                                        world.vendor)
    assert device.asset == AssetData("II", "A", dt.date(2024, 1, 15), Decimal("128000.50"),
                                     "straight_line", 8, dt.date(2026, 6, 30),
                                     dt.date(2026, 1, 31))
    assert device.registered_by == "user:test" and device.udi and device.location


def test_every_field_error_is_named(world: World) -> None:
    _, errors = parse_device({
        "tenant": str(world.hospital), "model": str(world.monitor), "serial": "has space",
        "purchase_date": "2024-13-01", "purchase_cost": "-3", "asset_class": "IV",
        "depreciation_method": "declining_balance", "calibration_due": "soon",
        "useful_life_years": "0", "state": "retired", "gateway": "x", "colour": "red"})
    assert {e.column for e in errors} == {"serial", "purchase_date", "purchase_cost",
                                          "asset_class", "calibration_due",
                                          "useful_life_years", "state", "gateway", "colour"}
    _, errors = parse_device({"tenant": "1", "model": "1", "serial": "a",
                              "depreciation_method": "straight_line"})
    assert [(e.column, e.reason) for e in errors] == [
        ("useful_life_years", "needed with a depreciation method")]
    _, errors = parse_device({"model": "1"})
    assert {e.column for e in errors} == {"tenant", "serial"}
    tomorrow = (dt.date.today() + dt.timedelta(days=1)).isoformat()
    _, errors = parse_device({"tenant": "1", "model": "1", "udi": "u", "purchase_cost": "1.234",
                              "purchase_date": tomorrow})
    assert {(e.column, e.reason) for e in errors} == {
        ("purchase_cost", "at most 2 decimals"),
        ("purchase_date", "a purchase date cannot be in the future")}


def test_duplicate_udi_serial_and_codes_are_refused(world: World) -> None:
    with world.conn() as conn:
        world.device(conn, "D-1", udi="UDI-1", rfid="RF-1", barcode="BC-1")
        for columns, what in (({"udi": "UDI-1"}, "UDI UDI-1"),
                              ({"rfid": "RF-1"}, "rfid code RF-1"),
                              ({"barcode": "BC-1"}, "barcode code BC-1")):
            with pytest.raises(RegistryError, match=f"{what} is already registered") as info:
                world.device(conn, "D-2", **columns)
            assert info.value.code == EXISTS
        with pytest.raises(RegistryError, match="serial number D-1 of this model") as info:
            world.device(conn, "D-1")
        assert info.value.code == EXISTS
        # Nothing of the refused devices was stored.
        assert conn.execute("SELECT count(*) FROM devices WHERE serial_no = 'D-2' AND "
                            "tenant_id = %s", (world.hospital,)).fetchone() == (0,)
        # The same serial of another model, the same code as another kind, and
        # the same UDI and RFID in another hospital are all fine.
        spec, _ = parse_device({"tenant": str(world.hospital), "serial": "D-1",
                                "model": f"{world.vendor}/G1", "qr": "RF-1"})
        devices.register(conn, spec, "user:test")
        spec, _ = parse_device({"tenant": str(world.other_hospital), "serial": "D-1",
                                "model": str(world.monitor), "udi": "UDI-1", "rfid": "RF-1"})
        devices.register(conn, spec, "user:test")
        # The database holds the line too, whatever path the insert takes.
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO devices (id, tenant_id, udi) VALUES "
                         "(nextval('device_id_seq'), %s, 'UDI-1')", (world.hospital,))


def test_searches_by_code_udi_and_serial(world: World) -> None:
    with world.conn() as conn:
        a = world.device(conn, "S-1", udi="U-1", rfid="TAG-1", department=str(world.department))
        b = world.device(conn, "S-2", barcode="TAG-1")
        for scope in (Scope(world.hospital), Scope(world.region)):
            assert [d.id for d in devices.find(conn, scope, udi="U-1")] == [a.id]
            assert [d.id for d in devices.find(conn, scope, serial="S-2")] == [b.id]
        assert devices.find_by_code(conn, world.hospital, "TAG-1", "rfid") == a
        assert devices.find_by_code(conn, world.department, "TAG-1") == a  # b is not in ICU
        with pytest.raises(RegistryError, match=f"device {a.id} \\(rfid\\), device {b.id}"):
            devices.find_by_code(conn, world.hospital, "TAG-1")
        assert devices.find_by_code(conn, world.other_hospital, "TAG-1", "rfid") is None
        assert devices.find_by_code(conn, world.hospital, "TAG-1", "rfid",
                                    vendor_id=-1) is None
        assert devices.find(conn, Scope(world.other_hospital), serial="S-1") == []


def test_lists_page_by_id_and_filter(world: World) -> None:
    with world.conn() as conn:
        made = [world.device(conn, f"L-{i}", calibration_due=f"2026-0{1 + i % 3}-01").id
                for i in range(7)]
        lifecycle.transition(conn, made[0], "active", "user:a", "commissioned")
        scope = Scope(world.hospital)
        first = devices.list_devices(conn, scope, limit=4)
        rest = devices.list_devices(conn, scope, after_id=first[-1].id, limit=4)
        assert [d.id for d in first + rest] == made
        assert [d.id for d in devices.list_devices(conn, scope, state="active")] == made[:1]
        due = devices.list_devices(conn, scope, due_before=dt.date(2026, 2, 1))
        assert [d.id for d in due] == made[::3]
        assert devices.list_devices(conn, Scope(world.other_hospital)) == []
        assert devices.list_devices(conn, Scope(world.department)) == []


def test_out_of_scope_is_not_found(world: World) -> None:
    with world.conn() as conn:
        device = world.device(conn, "X-1")
        for scope in (Scope(world.other_hospital), Scope(world.department), Scope(vendor_id=-1)):
            with pytest.raises(RegistryError) as info:
                devices.get(conn, device.id, scope)
            assert info.value.code == NOT_FOUND
            assert str(info.value) == f"device {device.id} does not exist"


def test_registration_needs_the_hospitals_approval_of_the_vendor(world: World) -> None:
    with world.conn() as conn:
        spec, _ = parse_device({"tenant": str(world.department), "serial": "PUMP-1",
                                "model": f"{world.other_vendor}/P1"})
        with pytest.raises(RegistryError, match=f"has not approved vendor {world.other_vendor}"
                           ) as info:
            devices.register(conn, spec, "user:test")
        assert info.value.code == PRECONDITION
        vendor = models.vendor_by_code(conn, world.other_vendor)
        with pytest.raises(RegistryError, match="is a department: its hospital"):
            approvals.approve(conn, world.department, vendor.id, "user:admin")
        approvals.approve(conn, world.hospital, vendor.id, "user:admin", "tender 2025-17")
        pump = devices.register(conn, spec, "user:test")  # a department of it is covered
        assert (pump.tenant_id, pump.department_id) == (world.hospital, world.department)
        assert approvals.revoke(conn, world.hospital, vendor.id, "user:admin")
        assert not approvals.revoke(conn, world.hospital, vendor.id, "user:admin")
        spec.serial_no = "PUMP-2"
        with pytest.raises(RegistryError, match="has not approved"):
            devices.register(conn, spec, "user:test")
        devices.get(conn, pump.id, Scope(world.hospital))  # what is there stays
        kept = conn.execute("SELECT approved_by, note, revoked_by FROM vendor_approvals "
                            "WHERE tenant_id = %s AND vendor_id = %s",
                            (world.hospital, vendor.id)).fetchall()
        assert kept == [("user:admin", "tender 2025-17", "user:admin")]


def test_references_are_checked(world: World) -> None:
    with world.conn() as conn:
        def errors_of(**columns: str) -> set[tuple[str, str]]:
            spec, errors = parse_device({"tenant": str(world.hospital), "serial": "R-1",
                                         "model": str(world.monitor), **columns})
            assert not errors
            with pytest.raises(RegistryError) as info:
                devices.register(conn, spec, "user:test")
            return {(part.split(": ")[0], info.value.code)
                    for part in str(info.value).split("; ")}

        assert errors_of(tenant=str(world.region)) == {("tenant", INVALID)}
        assert errors_of(tenant="no-such-tenant") == {("tenant", NOT_FOUND)}
        assert errors_of(model="999999999") == {("model", NOT_FOUND)}
        assert errors_of(model=f"{world.vendor}/nope") == {("model", NOT_FOUND)}
        assert errors_of(department=str(world.other_hospital)) == {("department", INVALID)}
        plain = world.device(conn, "not-a-gateway")
        assert errors_of(gateway=str(plain.id)) == {("gateway", INVALID)}
        assert errors_of(gateway="987654321987") == {("gateway", NOT_FOUND)}
        spec, _ = parse_device({"tenant": str(world.hospital), "serial": "GW-1",
                                "model": str(world.gateway_model)})
        gateway = devices.register(conn, spec, "user:test")
        child = world.device(conn, "behind", gateway=str(gateway.id))
        assert child.gateway_id == gateway.id
        # A vendor's scope: another vendor's models do not exist for it.
        spec, _ = parse_device({"tenant": str(world.hospital), "serial": "V-1",
                                "model": str(world.monitor)})
        pump_vendor = models.vendor_by_code(conn, world.other_vendor).id
        with pytest.raises(RegistryError, match="no device model") as info:
            devices.register(conn, spec, "cert:x", Scope(world.hospital, pump_vendor))
        assert info.value.code == NOT_FOUND


def test_updates_change_what_may_change(world: World) -> None:
    with world.conn() as conn:
        device = world.device(conn, "U-1", rfid="OLD-TAG", barcode="BAR-1")
        other = world.device(conn, "U-2", rfid="TAKEN")
        spec, _ = parse_device({"tenant": str(world.hospital), "serial": "GW-U",
                                "model": str(world.gateway_model)})
        gateway = devices.register(conn, spec, "user:test")
        spec, _ = parse_device({"tenant": str(world.hospital), "serial": "GW-V",
                                "model": str(world.gateway_model), "gateway": str(gateway.id)})
        downstream = devices.register(conn, spec, "user:test")
        changed = devices.update(conn, device.id, {
            "department": f"rd-{world.stamp}", "location": "ICU bed 4", "rfid": "NEW-TAG",
            "barcode": "", "gateway": str(gateway.id), "asset_grade": "b",
            "purchase_cost": "5000", "purchase_date": "2023-01-01",
            "depreciation_method": "declining_balance", "useful_life_years": "5"},
            "user:admin")
        assert (changed.department_id, changed.location, changed.gateway_id) == (
            world.department, "ICU bed 4", gateway.id)
        assert changed.codes == {"rfid": "NEW-TAG"}
        assert changed.asset.asset_grade == "B" and changed.updated_at_us > device.updated_at_us
        assert devices.find_by_code(conn, world.hospital, "OLD-TAG") is None
        for changes, match in (({"rfid": "TAKEN"}, "already registered"),
                               ({"serial": "S"}, "serial: cannot be changed"),
                               ({"useful_life_years": ""}, "needed with a depreciation"),
                               ({"department": str(world.other_hospital)}, "not a department"),
                               ({"gateway": str(other.id)}, "not a gateway"),
                               ({"gateway": str(device.id)}, "its own gateway")):
            with pytest.raises(RegistryError, match=match):
                devices.update(conn, device.id, changes, "user:admin")
        with pytest.raises(RegistryError, match="leave the tenant you act for"):
            devices.update(conn, device.id, {"department": ""}, "user:head",
                           Scope(world.department))
        with pytest.raises(RegistryError, match="upstream"):
            devices.update(conn, gateway.id, {"gateway": str(downstream.id)}, "user:admin")
        for step in ("retired", "scrapped"):
            lifecycle.transition(conn, device.id, step, "user:admin", "end of life")
        with pytest.raises(RegistryError, match="scrapped: its record is closed") as info:
            devices.update(conn, device.id, {"location": "store"}, "user:admin")
        assert info.value.code == PRECONDITION


def test_models_metrics_are_checked(world: World) -> None:
    with world.conn() as conn:
        vendor = models.vendor_by_code(conn, world.vendor).id
        model = models.get_model(conn, world.monitor)
        assert [(m.id, m.name, m.unit, m.min, m.max) for m in model.metrics] == [
            (1, "heart_rate", "/min", None, None), (2, "spo2", "%", 50.0, 100.0),
            (1001, "st_segment", "mV", -5.0, 5.0)]
        for metrics, match in (
                ([{"id": 9}], "not in the shared catalogue"),
                ([{"id": 1, "name": "pulse"}], "catalogue's heart_rate"),
                ([{"id": 1000, "name": "x", "unit": "u"}], "valid range"),
                ([{"id": 1000, "name": "X", "unit": "u", "min": 0, "max": 1}], "a name"),
                ([{"id": 1000, "name": "x", "min": 0, "max": 1}], "needs a unit"),
                ([{"id": 1000, "name": "x", "unit": "u", "min": 1, "max": 1}], "below max"),
                ([{"id": 70000}], "1..65535"),
                ([{"id": 1}, {"id": 1}], "listed twice"),
                ([{"id": 2, "min": float("nan")}], "finite")):
            with pytest.raises(RegistryError, match=match):
                models.create_model(conn, vendor, "bad", "monitor", metrics)
        with pytest.raises(RegistryError, match="kind must be one of"):
            models.create_model(conn, vendor, "bad", "toaster", [])
        with pytest.raises(RegistryError, match="already has a model named M1") as info:
            models.create_model(conn, vendor, "M1", "monitor", [])
        assert info.value.code == EXISTS
        with pytest.raises(RegistryError, match="already exists"):
            models.create_vendor(conn, world.vendor, "again")
        with pytest.raises(RegistryError) as info:
            models.get_model(conn, world.pump, vendor_id=vendor)
        assert info.value.code == NOT_FOUND
        mine = models.list_models(conn, vendor_id=vendor)
        assert [m.id for m in mine] == [world.monitor, world.gateway_model]
        assert [m.id for m in models.list_models(conn, vendor_id=vendor, kind="gateway")] == [
            world.gateway_model]
        # The database refuses an unknown kind whatever the path.
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("INSERT INTO device_models (vendor_id, name, kind) VALUES "
                         "(%s, 'raw', 'toaster')", (vendor,))
        for kind in models.KINDS:
            conn.execute("INSERT INTO device_models (vendor_id, name, kind) VALUES "
                         "(%s, %s, %s)", (vendor, f"raw-{kind}", kind))


def test_book_value_depreciates_to_nothing() -> None:
    bought = dt.date(2020, 1, 1)
    straight = AssetData(purchase_date=bought, purchase_cost=Decimal("10000"),
                         depreciation_method="straight_line", useful_life_years=10)
    assert book_value(straight, bought) == Decimal("10000.00")
    assert book_value(straight, dt.date(2025, 1, 1)) == Decimal("4997.95")  # 1827 days of 3652.5
    assert book_value(straight, dt.date(2031, 1, 1)) == Decimal("0.00")
    declining = AssetData(purchase_date=bought, purchase_cost=Decimal("10000"),
                          depreciation_method="declining_balance", useful_life_years=10)
    one_year = book_value(declining, dt.date(2020, 12, 31))
    assert one_year is not None and Decimal("7990") < one_year < Decimal("8010")
    assert book_value(AssetData(purchase_cost=Decimal(1)), bought) is None
