"""Emergency dispatch during a surge, fed through the real ingest pipeline,
checked against the fixture's own truth; reservations and movements; and
compliance tasks that remind ahead of time and escalate once overdue."""

from __future__ import annotations

import asyncio
import datetime as dt
from decimal import Decimal

from rmiot.core_ext import FLAG_ACK_REQ, KIND_TELEMETRY, encode_frame
from rmiot.ingest.client import RmfClient
from rmiot.registry import compliance, dispatch, ledger, ops_tracker, work_orders
from rmiot.registry.devices import Scope
from rmiot.registry.dispatch import Need
from tests.ingest import conftest as ingest_fixtures
from tests.ingest.conftest import Hospital, now_us
from tests.ops.conftest import District

keyring = ingest_fixtures.keyring
hospital = ingest_fixtures.hospital
ingest_cfg = ingest_fixtures.ingest_cfg
ingest = ingest_fixtures.ingest
client = ingest_fixtures.client
F32, I32 = 1, 3


class Ward:
    """Ventilators that report state, battery and position over RMF TCP."""

    def __init__(self, client: RmfClient, district: District) -> None:
        self.client = client
        self.d = district
        self.seq: dict[int, int] = {}

    async def report(self, device: int, tenant: int, state: int, battery: float, zone: int,
                     floor: int, ago_s: float = 0.0) -> None:
        fields = [(304, I32, state), (300, F32, battery), (400, I32, zone), (403, I32, floor),
                  (401, F32, 5.0 * floor), (402, F32, 2.0)]
        ts = now_us() - int(ago_s * 1e6)
        async with asyncio.timeout(5):  # until the ingest's view knows the new device
            while True:
                self.seq[device] = seq = self.seq.get(device, 0) + 1
                before = sum(self.client.statuses.values())
                self.client.send(encode_frame(KIND_TELEMETRY, tenant, device, seq, ts, fields,
                                              flags=FLAG_ACK_REQ), device, seq)
                await self.client.drain()
                assert await self.client.wait_acks(before + 1, 5)
                if (device, seq) in self.client.acked:
                    return
                self.client.unacked.pop((device, seq), None)
                await asyncio.sleep(0.1)

    def refresh(self, devices: list[int]) -> None:
        with self.d.conn() as conn:
            ops_tracker.refresh(conn, devices, dt.datetime.now(dt.UTC) - dt.timedelta(hours=2))


async def test_dispatch_in_a_surge_returns_only_devices_really_available(
        district: District, hospital: Hospital, client: RmfClient) -> None:
    d = district
    today = dt.date.today()
    a, b = d.hospital_a, d.hospital_b

    def vent(home: int, hosp: int, **cols: object) -> int:
        return d.device(d.ventilator_model, home, hosp, **cols)

    fleet = {
        "idle_icu": vent(d.icu_a, a, calibration_due=today + dt.timedelta(days=90)),
        "idle_building": vent(d.building_a, a),
        "idle_b": vent(d.icu_b, b),
        "in_use": vent(d.icu_a, a),
        "low_battery": vent(d.icu_a, a),
        "calibration_expired": vent(d.icu_a, a, calibration_due=today - dt.timedelta(days=1)),
        "stale": vent(d.icu_a, a),
        "fault": vent(d.icu_a, a),
        "work_order": vent(d.icu_a, a),
        "suspended": vent(d.icu_a, a),
        "pump": d.device(d.pump_model, d.icu_a, a),
    }
    with d.conn() as conn:
        work_orders.report(conn, Scope(a), "user:nurse", "screen flickers",
                           device_id=fleet["work_order"])
    ward = Ward(client, d)
    await ward.report(fleet["idle_icu"], a, 0, 95, d.icu_a, 3)
    await ward.report(fleet["idle_building"], a, 0, 80, d.building_a, 1)
    await ward.report(fleet["idle_b"], b, 0, 99, d.icu_b, 2)
    await ward.report(fleet["in_use"], a, 1, 90, d.icu_a, 3)
    await ward.report(fleet["low_battery"], a, 0, 20, d.icu_a, 3)
    await ward.report(fleet["calibration_expired"], a, 0, 90, d.icu_a, 3)
    await ward.report(fleet["stale"], a, 0, 90, d.icu_a, 3, ago_s=3600)
    await ward.report(fleet["fault"], a, 2, 90, d.icu_a, 3)
    await ward.report(fleet["work_order"], a, 0, 90, d.icu_a, 3)
    await ward.report(fleet["suspended"], a, 0, 90, d.icu_a, 3)
    await ward.report(fleet["pump"], a, 0, 90, d.icu_a, 3)
    with d.conn() as conn:  # reported idle, then suspended (ingest refuses it from now on)
        conn.execute("UPDATE devices SET state = 'suspended' WHERE id = %s",
                     (fleet["suspended"],))
    ward.refresh(list(fleet.values()))

    need = Need(kind="ventilator", zone_id=d.icu_a, floor=3, min_battery=50)
    with d.conn() as conn:
        district_wide = [p.device_id for p in dispatch.available(conn, Scope(d.region), need)]
        hospital_only = [p.device_id for p in dispatch.available(conn, Scope(a), need)]
        where = {p.device_id: p for p in dispatch.locate(conn, Scope(a))}
    # Nearest first: the ICU itself, then the same hospital, then the other one.
    assert district_wide == [fleet["idle_icu"], fleet["idle_building"], fleet["idle_b"]]
    assert hospital_only == [fleet["idle_icu"], fleet["idle_building"]]
    assert where[fleet["idle_icu"]].zone_id == d.icu_a and where[fleet["idle_icu"]].floor == 3
    assert fleet["idle_b"] not in where  # another hospital's device is out of reach

    # The surge: two idle ventilators are taken into use, one is reserved.
    await ward.report(fleet["idle_icu"], a, 1, 94, d.icu_a, 3)
    await ward.report(fleet["in_use"], a, 0, 88, d.icu_a, 3)      # one is freed
    ward.refresh(list(fleet.values()))
    with d.conn() as conn:
        lent = dispatch.reserve(conn, Scope(d.region), fleet["idle_b"], a,
                                "mass-casualty surge, ED", "user:coordinator", to_zone=d.icu_a)
        now_free = [p.device_id for p in dispatch.available(conn, Scope(d.region), need)]
        assert now_free == [fleet["in_use"], fleet["idle_building"]]
        truth = conn.execute(
            "SELECT s.device_id FROM device_status s JOIN devices dv ON dv.id = s.device_id "
            "WHERE s.device_id = ANY (%s) AND s.use_state = 0 AND s.battery >= 50 "
            "AND dv.state = 'active' AND s.last_seen > now() - interval '15 minutes' "
            "AND (dv.calibration_due IS NULL OR dv.calibration_due >= current_date) "
            "AND dv.model_id = %s", ([*fleet.values()], d.ventilator_model)).fetchall()
        busy = {fleet["work_order"], fleet["idle_b"]}
        assert set(now_free) == {r[0] for r in truth} - busy
        back = dispatch.release(conn, Scope(a), lent.id, "user:coordinator", "returned",
                                to_zone=d.icu_b)
        assert back.released_by == "user:coordinator"
        moves = dispatch.movements(conn, Scope(d.region), fleet["idle_b"])
        assert [(m[1], m[2]) for m in moves] == [(d.icu_b, d.icu_a), (d.icu_b, d.icu_b)]
        assert fleet["idle_b"] in [p.device_id for p in
                                   dispatch.available(conn, Scope(d.region), need)]


def test_overdue_calibration_escalates_and_reminders_come_ahead(district: District) -> None:
    d = district
    today = dt.date(2025, 6, 1)
    late = d.device(d.ventilator_model, d.icu_a, d.hospital_a,
                    calibration_due=today - dt.timedelta(days=10))
    soon = d.device(d.ventilator_model, d.icu_a, d.hospital_a,
                    inspection_due=today + dt.timedelta(days=20))
    far = d.device(d.ventilator_model, d.icu_a, d.hospital_a,
                   metrology_due=today + dt.timedelta(days=200))
    with d.conn() as conn:
        compliance.set_policy(conn, d.hospital_a, compliance.Policy((30, 7), (0, 7, 30),
                                                                    "user:biomed-lead"),
                              "user:admin")
        first = compliance.run(conn, today, d.region)
        again = compliance.run(conn, today, d.region)
        tasks = {t.device_id: t for t in compliance.tasks(conn, d.hospital_a)}
        assert set(tasks) == {late, soon} and far not in tasks
        assert tasks[late].escalation_level == 2    # 10 days late: past 0 and 7
        assert tasks[late].reminders == 2 and tasks[late].owner == "user:biomed-lead"
        assert tasks[soon].escalation_level == 0 and tasks[soon].reminders == 1
        assert (first.created, first.reminders, first.escalations) == (2, 3, 2)
        assert (again.created, again.reminders, again.escalations) == (0, 0, 0)
        steps = compliance.events(conn, tasks[late].id)
        assert [(s[1], s[2], s[3]) for s in steps if s[1] == "escalation"] == [
            ("escalation", 1, "user:biomed-lead"),
            ("escalation", 2, f"role:department_head@{d.icu_a}")]
        # Three weeks on: the inspection's second reminder, then it is a day late
        # (level 1); the calibration is 31 days late (level 3).
        later = compliance.run(conn, today + dt.timedelta(days=21), d.region)
        assert later.reminders == 1 and later.escalations == 2
        view = {v.home_id: v for v in compliance.by_department(conn, d.hospital_a, today)}
        assert view[d.icu_a].tracked == 3 and view[d.icu_a].overdue == 1
        assert view[d.icu_a].due_soon == 1 and view[d.icu_a].escalated == 2
        # Doing the calibration closes the task and moves the due date on.
        ledger.record(conn, Scope(d.hospital_a), late, "calibration",
                      dt.datetime(2025, 6, 2, tzinfo=dt.UTC), "user:eng", cost=Decimal("80"),
                      document_ref="CAL-77", next_due=dt.date(2026, 6, 2))
        open_now = {t.device_id for t in compliance.tasks(conn, d.hospital_a)}
        assert late not in open_now and soon in open_now
