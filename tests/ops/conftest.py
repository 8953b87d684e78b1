"""Fixtures for hospital operations: a small district (two hospitals with a
ward and a building each, ventilators, pumps and meters) in the real test
database, and a helper writing telemetry rows as the batch writer stores them
(for history older than ingest's time window)."""

from __future__ import annotations

import datetime as dt
import html.parser
import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
import pytest

from rmiot.registry import store
from rmiot.tenants import store as tenants

_run = itertools.count()


@dataclass
class District:
    dsn: str
    region: int
    hospital_a: int
    hospital_b: int
    icu_a: int
    building_a: int
    icu_b: int
    ventilator_model: int
    pump_model: int
    meter_model: int
    hvac_model: int
    tag: str

    def conn(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, autocommit=True)

    def device(self, model: int, home: int, hospital: int, **columns: Any) -> int:
        with self.conn() as conn:
            device = store.register_device(conn, hospital, serial_no=f"{self.tag}-{time.time_ns()}")
            sets = {"model_id": model, "department_id": home if home != hospital else None,
                    **columns}
            conn.execute(("UPDATE devices SET " + ", ".join(f"{c} = %s" for c in sets)
                          + " WHERE id = %s").encode(), [*sets.values(), device])
        return device


def write_frames(dsn: str, device: int, tenant: int,
                 frames: Sequence[tuple[dt.datetime, Sequence[tuple[int, float]]]]) -> None:
    """Store frames (ts, [(metric, value)...]) as telemetry rows."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        seq = conn.execute("SELECT coalesce(max(seq), 0) FROM telemetry WHERE device_id = %s",
                           (device,)).fetchone()
        base = int(seq[0]) if seq else 0
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO telemetry (ts, device_id, tenant_id, seq, kind, metrics, vals) "
                "VALUES (%s, %s, %s, %s, 1, %s, %s)",
                [(ts, device, tenant, base + n + 1, [m for m, _ in fields],
                  [float(v) for _, v in fields]) for n, (ts, fields) in enumerate(frames)])


class PageText(html.parser.HTMLParser):
    """An HTML page's text pieces and tags, as a reader sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        if data.strip():
            self.text.append(data.strip())


@pytest.fixture
def district(database: str) -> Iterator[District]:
    tag = f"ops{next(_run)}{time.time_ns() % 10**9}"
    with psycopg.connect(database, autocommit=True) as conn:
        region = tenants.create_tenant(conn, f"{tag}-r", "Region", "region")
        a = tenants.create_tenant(conn, f"{tag}-a", "Hospital A", "hospital", region)
        b = tenants.create_tenant(conn, f"{tag}-b", "Hospital B", "hospital", region)
        icu_a = tenants.create_tenant(conn, f"{tag}-a-icu", "ICU A", "department", a)
        building_a = tenants.create_tenant(conn, f"{tag}-a-z1", "Building A1", "department", a)
        icu_b = tenants.create_tenant(conn, f"{tag}-b-icu", "ICU B", "department", b)
        vendor = conn.execute("INSERT INTO vendors (code, name) VALUES (%s, 'V') RETURNING id",
                              (tag,)).fetchone()
        assert vendor is not None

        def model(name: str, kind: str, metrics: list[dict[str, Any]]) -> int:
            row = conn.execute("INSERT INTO device_models (vendor_id, name, kind, metrics) "
                               "VALUES (%s, %s, %s, %s) RETURNING id",
                               (vendor[0], name, kind, orjson.dumps(metrics).decode())
                               ).fetchone()
            assert row is not None
            return int(row[0])

        vent = model("Vent", "ventilator", [{"id": 304, "name": "device_state"}])
        pump = model("Pump", "infusion_pump", [{"id": 304, "name": "device_state"}])
        meter = model("Meter", "meter", [{"id": 201, "name": "energy_total"}])
        hvac = model("AHU", "sensor", [{"id": 1001, "name": "heating_output"},
                                       {"id": 1002, "name": "cooling_output"}])
    yield District(database, region, a, b, icu_a, building_a, icu_b, vent, pump, meter, hvac,
                   tag)
