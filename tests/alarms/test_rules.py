"""Each rule kind through the real ingest path: frames over TCP into the
pipeline, evaluated after commit, alarms written to the real database."""

from __future__ import annotations

import asyncio

import psycopg

from rmiot.core_ext import KIND_LOCATION, KIND_STATUS
from rmiot.ingest.alarm_rules import Rule
from rmiot.ingest.client import RmfClient
from rmiot.ingest.service import IngestService
from rmiot.registry import store
from tests.alarms.conftest import (
    SEC,
    Sender,
    alarm_events,
    put_rule,
    rules_loaded,
    wait_events,
)
from tests.ingest.conftest import Hospital, now_us

SPO2, HR, BATTERY, ERROR, STATE, ZONE = 2, 1, 300, 303, 304, 400


async def settle(service: IngestService) -> None:
    """Let the writer write what the engine produced (nothing to await on)."""
    await asyncio.sleep(0.2)


async def test_threshold_waits_its_duration_and_hysteresis_prevents_flapping(
        hospital: Hospital, ingest: IngestService, client: RmfClient) -> None:
    rules: list[Rule] = []
    rules.append(await put_rule(hospital.dsn, hospital.tenant, "threshold", {
        "metric": SPO2, "op": "<", "value": 90, "for_s": 10, "clear_value": 92,
        "clear_for_s": 30}, code="spo2-low", severity="critical"))
    await rules_loaded(ingest, *rules)
    dev = Sender(client, hospital, hospital.plain)
    await dev.send(0, [(SPO2, 1, 85.0)])
    await dev.send(5, [(SPO2, 1, 86.0)])
    await settle(ingest)
    assert await alarm_events(hospital.dsn, hospital.plain) == []  # not for 10 s yet
    await dev.send(11, [(SPO2, 1, 84.0)])
    assert await wait_events(hospital.dsn, hospital.plain, 1) == [
        ("spo2-low", "raised", "active")]
    # Hovering around the limits: in the band, back under, briefly above 92.
    for at, value in ((20, 91.0), (25, 93.0), (40, 89.0), (45, 91.5), (50, 93.0), (70, 92.5)):
        await dev.send(at, [(SPO2, 1, value)])
    await settle(ingest)
    assert await alarm_events(hospital.dsn, hospital.plain) == [
        ("spo2-low", "raised", "active")]
    await dev.send(81, [(SPO2, 1, 95.0)])  # >= 92 since 50 s: 31 s
    events = await wait_events(hospital.dsn, hospital.plain, 2)
    assert events == [("spo2-low", "raised", "active"), ("spo2-low", "cleared", "cleared")]


async def test_rate_battery_fault_and_zone(hospital: Hospital, ingest: IngestService,
                                           client: RmfClient) -> None:
    rules: list[Rule] = []
    rules.append(await put_rule(hospital.dsn, hospital.tenant, "rate",
                   {"metric": HR, "max_per_s": 5, "direction": "up"}, code="hr-jump"))
    rules.append(await put_rule(hospital.dsn, hospital.tenant, "battery", {}, code="battery-low"))
    rules.append(await put_rule(hospital.dsn, hospital.tenant, "fault", {"codes": [7, 9]},
                                code="fault"))
    rules.append(await put_rule(hospital.dsn, hospital.tenant, "zone", {"allowed": [1, 2]},
                   code="infant-ward", severity="critical"))
    await rules_loaded(ingest, *rules)
    dev = Sender(client, hospital, hospital.plain)
    await dev.send(0, [(HR, 1, 70.0), (BATTERY, 1, 50.0), (ERROR, 3, 0), (STATE, 3, 1)])
    await dev.send(1, [(HR, 1, 72.0), (BATTERY, 1, 19.0)])          # battery low
    await dev.send(2, [(HR, 1, 90.0)], )                             # +18/s: jump
    await dev.send(3, [(ERROR, 3, 3)], KIND_STATUS)                  # not a listed code
    await dev.send(4, [(ERROR, 3, 9)], KIND_STATUS)                  # fault
    await dev.send(5, [(ZONE, 3, 2)], KIND_LOCATION)
    await dev.send(6, [(ZONE, 3, 5)], KIND_LOCATION)                 # left the ward
    raised = await wait_events(hospital.dsn, hospital.plain, 4)
    assert sorted(code for code, kind, _ in raised if kind == "raised") == [
        "battery-low", "fault", "hr-jump", "infant-ward"]
    await dev.send(7, [(HR, 1, 91.0), (BATTERY, 1, 22.0), (ERROR, 3, 0), (ZONE, 3, 1)])
    events = await wait_events(hospital.dsn, hospital.plain, 7)
    cleared = {code for code, kind, _ in events if kind == "cleared"}
    # Battery 22 % is inside its hysteresis (clear above 25): still low.
    assert cleared == {"hr-jump", "fault", "infant-ward"}
    await dev.send(8, [(STATE, 3, 2)], KIND_STATUS)                  # fault state
    await dev.send(9, [(BATTERY, 1, 26.0)])
    events = await wait_events(hospital.dsn, hospital.plain, 9)
    assert events[-2:] == [("fault", "raised", "active"), ("battery-low", "cleared", "cleared")]


async def test_overrides_per_department_device_and_switch_off(
        hospital: Hospital, ingest: IngestService, client: RmfClient) -> None:
    rules: list[Rule] = []
    with psycopg.connect(hospital.dsn, autocommit=True) as conn:
        from rmiot.tenants import store as tenants
        ward = tenants.create_tenant(conn, f"ward-{now_us()}", "Ward", "department",
                                     hospital.tenant)
        in_ward = store.register_device(conn, hospital.tenant, serial_no="ward-monitor")
        conn.execute("UPDATE devices SET department_id = %s WHERE id = %s", (ward, in_ward))
    hr = {"metric": HR, "op": ">", "value": 120}
    rules.append(await put_rule(hospital.dsn, hospital.tenant, "threshold", hr, code="hr-high"))
    rules.append(await put_rule(hospital.dsn, ward, "threshold", {**hr, "value": 150},
                                code="hr-high"))
    rules.append(await put_rule(hospital.dsn, hospital.tenant, "threshold",
                                {**hr, "value": 100}, code="hr-high", device_id=hospital.plain))
    rules.append(await put_rule(hospital.dsn, hospital.tenant, "battery", {}, code="battery-low"))
    rules.append(await put_rule(hospital.dsn, ward, "battery", {}, code="battery-low",
                                enabled=False))
    await rules_loaded(ingest, *rules)
    plain, ward_dev = Sender(client, hospital, hospital.plain), Sender(client, hospital,
                                                                        in_ward)
    await plain.send(0, [(HR, 1, 110.0)])     # its own rule: > 100
    await ward_dev.send(0, [(HR, 1, 130.0), (BATTERY, 1, 5.0)])  # the ward's: > 150; no battery
    await ward_dev.send(1, [(HR, 1, 151.0)])
    assert await wait_events(hospital.dsn, hospital.plain, 1) == [
        ("hr-high", "raised", "active")]
    assert await wait_events(hospital.dsn, in_ward, 1) == [("hr-high", "raised", "active")]
    await asyncio.sleep(0.2)
    assert len(await alarm_events(hospital.dsn, in_ward)) == 1
    assert ingest.alarms.book.rules_for(in_ward)[0].params["value"] == 150


async def test_filters_drop_downsample_tag_and_command(
        hospital: Hospital, ingest: IngestService, client: RmfClient) -> None:
    rules: list[Rule] = []
    rules.append(await put_rule(hospital.dsn, hospital.tenant, "filter",
                   {"metric": HR, "op": "<", "value": 1, "action": "drop"}, code="no-zero-hr"))
    rules.append(await put_rule(hospital.dsn, hospital.tenant, "filter",
                   {"metric": BATTERY, "op": ">=", "value": 0, "action": "downsample",
                    "every": 3}, code="battery-thin", device_id=hospital.plain))
    rules.append(await put_rule(hospital.dsn, hospital.tenant, "filter",
                   {"metric": SPO2, "op": "<", "value": 80, "action": "tag", "tag": "suspect"},
                   code="tag-low"))
    rules.append(await put_rule(hospital.dsn, hospital.tenant, "filter",
                   {"metric": SPO2, "op": "<", "value": 80, "action": "command",
                    "device_id": hospital.keyed, "name": "raise_o2",
                    "params": [[10, 1, 2.0]]}, code="o2-linkage"))
    await rules_loaded(ingest, *rules)
    dev = Sender(client, hospital, hospital.plain)
    await dev.send(0, [(HR, 1, 0.0)])                       # dropped, acked
    for i in range(6):
        await dev.send(1 + i, [(BATTERY, 1, 80.0)])         # 2 of 6 kept
    await dev.send(10, [(SPO2, 1, 70.0)])                   # tagged, command once
    await dev.send(11, [(SPO2, 1, 71.0)])                   # tagged, no second command
    await asyncio.sleep(0.3)
    assert hospital.stored(hospital.plain) == 4
    with psycopg.connect(hospital.dsn, autocommit=True) as conn:
        tags = conn.execute("SELECT count(*) FROM telemetry_tags WHERE device_id = %s",
                            (hospital.plain,)).fetchone()
        sent = conn.execute("SELECT name, created_by FROM commands WHERE device_id = %s",
                            (hospital.keyed,)).fetchall()
    assert tags is not None and tags[0] == 2
    assert len(sent) == 1 and sent[0][0] == "raise_o2" and sent[0][1].startswith("rule:")
    assert ingest.pipeline.stats["FILTERED"] == 5


async def test_offline_after_silence_and_back(hospital: Hospital, ingest: IngestService,
                                              client: RmfClient) -> None:
    rules: list[Rule] = []
    rules.append(await put_rule(hospital.dsn, hospital.tenant, "offline", {"silence_s": 5},
                   code="offline", device_id=hospital.plain))
    await rules_loaded(ingest, *rules)
    dev = Sender(client, hospital, hospital.plain, base_us=now_us())
    await dev.send(0, [(HR, 1, 70.0)])
    assert await wait_events(hospital.dsn, hospital.plain, 1, timeout=10) == [
        ("offline", "raised", "active")]
    dev.base = now_us()
    await dev.send(0, [(HR, 1, 70.0)], KIND_STATUS)  # a heartbeat
    assert (await wait_events(hospital.dsn, hospital.plain, 2))[-1] == (
        "offline", "cleared", "cleared")


async def test_energy_deviation_from_the_same_hour_of_week(
        hospital: Hospital, ingest: IngestService, client: RmfClient) -> None:
    rules: list[Rule] = []
    hour = 3600 * SEC
    this_hour = now_us() // hour * hour
    base = this_hour - 3 * hour  # judged hour: base .. base+1h; history: weeks before
    with psycopg.connect(hospital.dsn, autocommit=True) as conn:
        for week in (1, 2):
            for minute in range(0, 60, 10):
                ts = base - week * 168 * hour + minute * 60 * SEC
                conn.execute(
                    "INSERT INTO telemetry (ts, device_id, tenant_id, seq, kind, metrics, vals) "
                    "VALUES (to_timestamp(%s / 1e6), %s, %s, %s, 1, '{200}', %s)",
                    (ts, hospital.plain, hospital.tenant, 10_000 + week * 100 + minute,
                     [100.0]))
    rules.append(await put_rule(hospital.dsn, hospital.tenant, "energy", {"share": 0.2},
                   code="energy", device_id=hospital.plain))
    await rules_loaded(ingest, *rules)
    dev = Sender(client, hospital, hospital.plain, base_us=base)
    await dev.send(0, [(200, 1, 130.0)])                     # plan made, baseline seeded
    await asyncio.sleep(1.5)                                  # the sweeper seeds it
    await dev.send(1800, [(200, 1, 126.0)])                   # this hour: mean 128
    await dev.send(3600 + 60, [(200, 1, 100.0)])              # next hour: judge the first
    assert await wait_events(hospital.dsn, hospital.plain, 1) == [
        ("energy", "raised", "active")]


async def test_compliance_rules_are_never_evaluated_on_telemetry(
        hospital: Hospital, ingest: IngestService, client: RmfClient) -> None:
    """A hospital's compliance.<kind> rules are the platform's (raised from
    compliance tasks): the engine leaves them out, and the rules beside them
    work as before."""
    compliance = await put_rule(hospital.dsn, hospital.tenant, "compliance", {},
                                code="compliance.calibration")
    battery = await put_rule(hospital.dsn, hospital.tenant, "battery", {}, code="battery-low")
    await rules_loaded(ingest, battery)
    dev = Sender(client, hospital, hospital.plain)
    await dev.send(0, [(BATTERY, 1, 50.0), (ERROR, 3, 9), (STATE, 3, 2)])
    await dev.send(1, [(BATTERY, 1, 10.0)])
    assert await wait_events(hospital.dsn, hospital.plain, 1) == [
        ("battery-low", "raised", "active")]
    await settle(ingest)
    book = ingest.rules
    assert compliance.id not in {r.id for group in (book.by_tenant, book.by_device,
                                                    book.by_patient)
                                 for rules in group.values() for r in rules}
    assert len(await alarm_events(hospital.dsn, hospital.plain)) == 1
