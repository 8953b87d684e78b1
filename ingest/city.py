"""The simulated city behind ``rmiot simulate``: which hospitals and devices
there are, how often each kind reports, and what it reports.

Per hospital, at scale 1 (a city's ``scale`` multiplies the counts):

| kind | count | every | what | connects |
|---|---|---|---|---|
| bedside monitor | 12 | 1 s | HR, SpO2, RR, temperature, NIBP, pulse | directly |
| wearable | 16 | 5 s | HR, SpO2, posture, fall, battery | ward gateway |
| infusion pump | 8 | 10 s | rate, volume left, state, battery, location | directly |
| ventilator | 4 | 10 s | state (idle / in use), battery, usage hours, location | directly |
| RFID-tagged equipment | 20 | 30 s | location: zone, x, y, floor, reader | RTLS gateway |
| environment sensor | 6 | 60 s | air temp., humidity, CO2, PM2.5, ΔP, O2 | building gateway |
| energy meter | 3 | 60 s | power, energy, water, gas, current, voltage | building gateway |
| air handling unit | 2 | 60 s | heating and cooling output, supply air temp. | building gateway |

Vitals wander around each patient's own baseline; now and then a patient has
an abnormal episode (tachycardia, desaturation, hypotension or fever) lasting
30 s to 2 min, at about ``abnormal_per_hour`` episodes per monitor an hour.

Operations see it as a hospital's staff would (issue 9): each hospital has
the zones of ``ZONES`` (department tenants: ``sim-h01-icu`` …) that devices
belong to and report as their location (metric 400 zone_id, with floor and
x/y), so ``rmiot ops available --kind ventilator`` finds idle ventilators and
pumps nearest first; every device has a model of its kind (vendor
``sim-vendor``). Of every four ventilators the first is idle but past its
calibration date (never dispatched; compliance escalates), the second idle
and due in 10 days (a reminder), the third in use, the fourth idle at 60 %
battery; now and then one is put on or taken off a patient. A third of the
pumps are idle, and pump 1's inspection is due in 20 days. Meters and air
handling units belong to zones (energy per zone), and an air handling unit
now and then heats and cools at once (the energy view's waste).

Registration is idempotent: tenants by code (``sim-city``, ``sim-h01`` …),
devices by UDI within their hospital (``sim-h01-monitor-003``, gateways
``sim-h01-gateway-ward``), so a second run finds what the first made. Devices
behind a gateway are registered behind it (``devices.gateway_id``). A device
without a model or zone (made by an older simulator) gets them, and its due
dates, once.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from dataclasses import dataclass, field
from typing import Any

import psycopg

from rmiot.core_ext import KIND_LOCATION, KIND_TELEMETRY
from rmiot.registry import models, store
from rmiot.tenants import store as tenants_store

Field = tuple[int, int, Any]   # (metric, vtype, value) as in the frame
F32, I32, BOOL = 1, 3, 5


@dataclass(frozen=True)
class Kind:
    name: str
    per_hospital: int      # at scale 1
    interval_s: float
    frame_kind: int
    gateway: str           # "" when each device has its own connection
    model_kind: str = "other"   # its device model's kind (registry.models.KINDS)
    metrics: tuple[int, ...] = ()


LOCATION = (400, 401, 402, 403)
KINDS = (
    Kind("monitor", 12, 1.0, KIND_TELEMETRY, "", "monitor", (1, 2, 3, 4, 5, 6, 7, 8)),
    Kind("wearable", 16, 5.0, KIND_TELEMETRY, "ward", "wearable", (1, 2, 20, 21, 300)),
    Kind("infusion_pump", 8, 10.0, KIND_TELEMETRY, "", "infusion_pump",
         (10, 11, 300, 303, 304, *LOCATION)),
    Kind("ventilator", 4, 10.0, KIND_TELEMETRY, "", "ventilator", (300, 302, 304, *LOCATION)),
    Kind("rfid_tag", 20, 30.0, KIND_LOCATION, "rtls", "rfid_tag", (*LOCATION, 406)),
    Kind("environment", 6, 60.0, KIND_TELEMETRY, "building", "sensor",
         (100, 101, 102, 103, 104, 105)),
    Kind("energy_meter", 3, 60.0, KIND_TELEMETRY, "building", "meter",
         (200, 201, 202, 203, 204, 205)),
    Kind("air_handler", 2, 60.0, KIND_TELEMETRY, "building", "sensor", (100, 1001, 1002)),
)
# The air handlers' own metrics (the energy view pairs heating… and cooling… names).
VENDOR_METRICS = {1001: {"id": 1001, "name": "heating_output", "unit": "%", "min": 0, "max": 100},
                  1002: {"id": 1002, "name": "cooling_output", "unit": "%", "min": 0, "max": 100}}
# Each hospital's zones: (code suffix, name, floor).
ZONES = (("icu", "Intensive care unit", 3), ("er", "Emergency department", 1),
         ("surgery", "Operating theatres", 4), ("ward", "General ward", 6))


@dataclass(frozen=True)
class City:
    hospitals: int
    scale: int


CITIES = {"small": City(3, 1), "medium": City(10, 2), "large": City(40, 4)}


def frames_per_second(city: City) -> float:
    """What the whole city sends, on average."""
    return city.hospitals * city.scale * sum(k.per_hospital / k.interval_s for k in KINDS)


@dataclass
class Device:
    """One simulated device and the state its readings evolve from."""

    id: int
    tenant: int
    kind: Kind
    rng: random.Random
    seq: int = 0
    base: dict[int, float] = field(default_factory=dict)
    episode: str = ""
    episode_left_s: float = 0.0
    counter: float = 0.0       # energy, volume, battery: values that run down or up
    zones: tuple[tuple[int, int], ...] = ((0, 1),)   # the hospital's (zone id, floor)
    number: int = 1            # its number among its hospital's devices of its kind

    def next_seq(self) -> int:
        self.seq = (self.seq + 1) & 0xFFFFFFFF
        return self.seq

    def reading(self, abnormal_per_hour: float) -> tuple[list[Field], bool]:
        """The fields of the next frame, and whether it shows abnormal vitals."""
        rng, name = self.rng, self.kind.name
        if name == "monitor":
            return self._vitals(abnormal_per_hour)
        if name == "wearable":
            hr = self.base.setdefault(1, rng.gauss(78, 8)) + rng.gauss(0, 3)
            self.counter = self.counter - 0.002 if self.counter > 5 else 100.0
            return [(1, F32, hr), (2, F32, min(100.0, rng.gauss(97, 1))),
                    (20, I32, rng.choice((0, 0, 0, 1, 2))),
                    (21, BOOL, rng.random() < 0.0005), (300, F32, self.counter)], False
        if name == "infusion_pump":
            rate = self.base.setdefault(10, rng.choice((25.0, 50.0, 80.0, 125.0)))
            self.counter = self.counter - rate * self.kind.interval_s / 3600 \
                if self.counter > 5 else rng.choice((250.0, 500.0, 1000.0))
            in_use = self.base.setdefault(304, float(self.number % 3 != 0))  # a third idle
            occluded = in_use and rng.random() < 0.001
            state = 2 if occluded else int(in_use)
            return [(10, F32, rate * in_use), (11, F32, self.counter), (304, I32, state),
                    (303, I32, 17 if occluded else 0), (300, F32, 80.0),
                    *self._place(0.002)], False
        if name == "ventilator":
            # Of every four: 1 idle (calibration expired), 2 idle, 3 in use, 4 idle at 60 %.
            in_use = self.base.setdefault(304, float(self.number % 4 == 3))
            if rng.random() < 0.002:  # put on a patient, or taken off
                in_use = self.base[304] = 1.0 - in_use
            self.counter += in_use * self.kind.interval_s / 3600
            battery = self.base.setdefault(300, 60.0 if self.number % 4 == 0 else 90.0)
            return [(304, I32, int(in_use)), (300, F32, battery), (302, F32, self.counter),
                    *self._place(0.002)], False
        if name == "rfid_tag":
            place = self._place(0.2)  # equipment moves now and then
            return [*place, (406, I32, int(place[0][2]) * 10 + 1)], False
        if name == "air_handler":
            return self._air(), False
        if name == "environment":
            return [(100, F32, rng.gauss(23, 0.5)), (101, F32, rng.gauss(50, 4)),
                    (102, F32, rng.gauss(650, 80)), (103, F32, abs(rng.gauss(18, 6))),
                    (104, F32, rng.gauss(12, 1.5)), (105, F32, rng.gauss(400, 5))], False
        power = abs(rng.gauss(self.base.setdefault(200, rng.uniform(40, 400)), 10))
        self.counter += power * self.kind.interval_s / 3600
        return [(200, F32, power), (201, F32, self.counter), (202, F32, self.counter / 90),
                (203, F32, self.counter / 400), (204, F32, power * 1000 / 380 / math.sqrt(3)),
                (205, F32, rng.gauss(380, 3))], False

    def _place(self, move_p: float) -> list[Field]:
        """Where the device is: one of its hospital's zones (its first, its
        home's), a floor and x/y; it moves to another now and then."""
        rng, base = self.rng, self.base
        if 400 not in base or rng.random() < move_p:
            zone, floor = rng.choice(self.zones) if 400 in base else \
                self.zones[self.id % len(self.zones)]
            base.update({400: zone, 403: floor, 401: rng.uniform(0, 80), 402: rng.uniform(0, 40)})
        return [(400, I32, int(base[400])), (401, F32, base[401]), (402, F32, base[402]),
                (403, I32, int(base[403]))]

    def _air(self) -> list[Field]:
        """Heating or cooling by season (per unit); now and then a stuck valve
        makes it do both for half an hour or so."""
        rng = self.rng
        heating = self.base.setdefault(1, float(self.id % 2))
        if self.episode_left_s > 0:
            self.episode_left_s -= self.kind.interval_s
        elif rng.random() < 0.004:
            self.episode_left_s = rng.uniform(900, 3600)
        both = self.episode_left_s > 0
        heat = rng.uniform(20, 70) if heating or both else 0.0
        cool = rng.uniform(20, 70) if not heating or both else 0.0
        return [(100, F32, rng.gauss(18 if cool > heat else 26, 0.5)), (1001, F32, heat),
                (1002, F32, cool)]

    def _vitals(self, abnormal_per_hour: float) -> tuple[list[Field], bool]:
        rng = self.rng
        base = self.base
        if not base:
            base.update({1: rng.gauss(76, 9), 2: rng.gauss(97.5, 0.8), 3: rng.gauss(15, 2),
                         4: rng.gauss(36.8, 0.2), 5: rng.gauss(122, 10), 6: rng.gauss(78, 6)})
        if self.episode_left_s > 0:
            self.episode_left_s -= self.kind.interval_s
            if self.episode_left_s <= 0:
                self.episode = ""
        elif rng.random() < abnormal_per_hour * self.kind.interval_s / 3600:
            self.episode = rng.choice(("tachycardia", "desaturation", "hypotension", "fever"))
            self.episode_left_s = rng.uniform(30, 120)
        hr, spo2, rr = base[1] + rng.gauss(0, 2), base[2] + rng.gauss(0, 0.4), base[3]
        temp, sys_, dia = base[4] + rng.gauss(0, 0.03), base[5] + rng.gauss(0, 3), base[6]
        episode = self.episode
        if episode == "tachycardia":
            hr = rng.uniform(135, 165)
        elif episode == "desaturation":
            spo2, rr = rng.uniform(80, 88), rr + 8
        elif episode == "hypotension":
            sys_, dia, hr = rng.uniform(70, 85), rng.uniform(40, 50), hr + 20
        elif episode == "fever":
            temp, hr = rng.uniform(38.8, 40.0), hr + 15
        spo2 = min(spo2, 100.0)
        fields: list[Field] = [(1, F32, hr), (2, F32, spo2), (3, F32, rr + rng.gauss(0, 1)),
                               (4, F32, temp), (5, F32, sys_), (6, F32, dia),
                               (7, F32, (sys_ + 2 * dia) / 3), (8, F32, hr + rng.gauss(0, 1))]
        return fields, bool(episode)


@dataclass
class Hospital:
    tenant: int
    code: str
    devices: list[Device]
    gateways: dict[str, int] = field(default_factory=dict)  # name -> gateway device id


def register(conn: psycopg.Connection[Any], city: City, seed: int = 1) -> tuple[
        list[Hospital], int]:
    """Make (or find) the city's tenants and devices; returns the hospitals and
    how many devices were created now."""
    created = 0
    root = _tenant(conn, "sim-city", "Simulated city health commission", "region", None)
    kinds = _models(conn)
    today = dt.date.today()
    hospitals = []
    for h in range(1, city.hospitals + 1):
        code = f"sim-h{h:02d}"
        tenant = _tenant(conn, code, f"Simulated hospital {h}", "hospital", root)
        zones = tuple((_tenant(conn, f"{code}-{suffix}", name, "department", tenant), floor)
                      for suffix, name, floor in ZONES)
        homes: list[tuple[Any, ...]] = []
        known = {udi: int(i) for udi, i in conn.execute(
            "SELECT udi, id FROM devices WHERE tenant_id = %s AND udi LIKE 'sim-%%'",
            (tenant,)).fetchall()}
        devices = []
        for kind in KINDS:
            for n in range(1, kind.per_hospital * city.scale + 1):
                udi = f"{code}-{kind.name}-{n:03d}"
                device_id = known.get(udi)
                if device_id is None:
                    device_id = store.register_device(conn, tenant, udi=udi, serial_no=udi)
                    created += 1
                devices.append(Device(device_id, tenant, kind,
                                      random.Random(seed * 1_000_003 + device_id), zones=zones,
                                      number=n))
                homes.append((kinds[kind.name], zones[(n - 1) % len(zones)][0],
                              *_due(kind.name, n, today), device_id))
        gateways = {}
        for name in dict.fromkeys(k.gateway for k in KINDS if k.gateway):
            udi = f"{code}-gateway-{name}"
            gateway = known.get(udi)
            if gateway is None:
                gateway = store.register_device(conn, tenant, udi=udi, serial_no=udi)
                created += 1
            gateways[name] = gateway
            homes.append((kinds["gateway"], None, None, None, gateway))
            conn.execute("UPDATE devices SET gateway_id = %s WHERE id = ANY (%s) "
                         "AND gateway_id IS DISTINCT FROM %s",
                         (gateway, [d.id for d in devices if d.kind.gateway == name], gateway))
        with conn.cursor() as cur:  # once per device: a model, a zone, due dates
            cur.executemany(
                "UPDATE devices SET model_id = %s, department_id = %s, calibration_due = %s, "
                "inspection_due = %s WHERE id = %s AND model_id IS NULL", homes)
        hospitals.append(Hospital(tenant, code, devices, gateways))
    return hospitals, created


def _due(kind: str, n: int, today: dt.date) -> tuple[dt.date | None, dt.date | None]:
    """(calibration, inspection) due dates of the kind's device ``n``."""
    if kind == "ventilator":
        return today + dt.timedelta(days={1: -3, 2: 10}.get(n % 4, 180)), None
    if kind == "infusion_pump":
        return today + dt.timedelta(days=365), today + dt.timedelta(days=20) if n == 1 else None
    return None, None


def _models(conn: psycopg.Connection[Any]) -> dict[str, int]:
    """Device model id per simulated kind (and "gateway"), made when missing."""
    vendor = conn.execute("SELECT id FROM vendors WHERE code = 'sim-vendor'").fetchone()
    vendor_id = int(vendor[0]) if vendor else \
        models.create_vendor(conn, "sim-vendor", "Simulated device maker").id
    known = {name: int(i) for name, i in conn.execute(
        "SELECT name, id FROM device_models WHERE vendor_id = %s", (vendor_id,)).fetchall()}
    out = {}
    for name, kind, metrics in [*((k.name, k.model_kind, k.metrics) for k in KINDS),
                                ("gateway", "gateway", ())]:
        model = f"Sim {name.replace('_', ' ')}"
        if model not in known:
            known[model] = models.create_model(
                conn, vendor_id, model, kind,
                [VENDOR_METRICS.get(m, {"id": m}) for m in metrics]).id
        out[name] = known[model]
    return out


def _tenant(conn: psycopg.Connection[Any], code: str, name: str, level: str,
            parent: int | None) -> int:
    row = conn.execute("SELECT id FROM tenants WHERE code = %s", (code,)).fetchone()
    if row is not None:
        return int(row[0])
    return tenants_store.create_tenant(conn, code, name, level, parent)
