"""What ``make run`` shows operators: a simulated hospital, fed through a real
ingest service, answers the dispatch query with its idle ventilators and
pumps (not the one past its calibration date, nor the one in use), locates
its tagged equipment in its own zones, and sub-meters energy per zone."""

from __future__ import annotations

import datetime as dt

import psycopg

from rmiot.config import Config
from rmiot.ingest import simulator
from rmiot.ingest.service import IngestService
from rmiot.query.fleet import EnergyRow
from rmiot.query.ops_energy import sub_metered
from rmiot.registry import dispatch, ops_tracker
from rmiot.registry.devices import Scope
from rmiot.registry.dispatch import Need
from tests.conftest import eventually
from tests.ingest import conftest as ingest_fixtures

keyring = ingest_fixtures.keyring
ingest_cfg = ingest_fixtures.ingest_cfg
WATCHED = ("ventilator", "infusion_pump", "rfid_tag", "energy_meter")


async def test_a_simulated_hospital_answers_the_dispatch_query(ingest_cfg: Config,
                                                               database: str) -> None:
    cfg = ingest_cfg
    ingest = IngestService(cfg)
    port = await ingest.start()
    try:
        sim = await simulator.start_simulation(cfg, "small", hospitals=1, port=port, speed=10)
        devices = [d for d in sim.hospitals[0].devices if d.kind.name in WATCHED]
        ids = [d.id for d in devices]

        def reported() -> bool:
            with psycopg.connect(database, autocommit=True) as conn:
                row = conn.execute("SELECT count(DISTINCT device_id) FROM telemetry WHERE "
                                   "device_id = ANY (%s) AND ts > now() - interval '1 minute'",
                                   (ids,)).fetchone()
            return row is not None and row[0] == len(ids)
        try:
            await eventually(reported, 30, 0.2)
        finally:
            await sim.stop()
    finally:
        await ingest.stop(drain_timeout=5)
    hospital = sim.hospitals[0].tenant
    number = {d.id: (d.kind.name, d.number) for d in devices}
    zones = {z for z, _ in devices[0].zones}
    with psycopg.connect(database, autocommit=True) as conn:
        ops_tracker.refresh(conn, ids, dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
        vents = dispatch.available(conn, Scope(hospital), Need(kind="ventilator"))
        strong = dispatch.available(conn, Scope(hospital), Need(kind="ventilator",
                                                                min_battery=70))
        pumps = dispatch.available(conn, Scope(hospital), Need(kind="infusion_pump"))
        tags = dispatch.locate(conn, Scope(hospital), kind="rfid_tag")
        energy = await _energy(database, hospital)
    # Of four ventilators: 1 past calibration, 2 idle, 3 in use, 4 idle at 60 %
    # (now and then one is put on or taken off a patient: hence subsets).
    found = {number[p.device_id][1] for p in vents}
    assert found and found <= {2, 4}, found
    assert {number[p.device_id][1] for p in strong} <= {2}
    assert all(p.kind == "ventilator" and p.zone_id in zones and p.hospital_id == hospital
               for p in vents)
    idle_pumps = {number[p.device_id][1] for p in pumps}
    assert idle_pumps and idle_pumps <= {3, 6}, idle_pumps
    assert len(tags) == 20 and all(p.zone_id in zones for p in tags)
    assert {row.zone_id for row in energy} <= zones and energy


async def _energy(dsn: str, hospital: int) -> list[EnergyRow]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        today = dt.datetime.now(dt.UTC).date()
        return await sub_metered(conn, hospital, today - dt.timedelta(days=1),
                                 today + dt.timedelta(days=2), 201)
