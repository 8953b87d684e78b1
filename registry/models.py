"""Vendors and device models: who makes a device, what kind it is, and which
metrics it sends.

A model's ``metrics`` is a list of ``{"id", "name", "unit", "min", "max"}``:

- ids 1–999 are the shared catalogue of ``frame-v1.md`` (``CATALOGUE`` here):
  only catalogue ids may be used, name and unit come from the catalogue (a
  different name or unit given for one is an error), and ``min``/``max`` may
  narrow the valid range for this model;
- ids 1000–65535 (the frame's metric field is 16 bits) are the vendor's own:
  name (``[a-z][a-z0-9_]*``), unit and a valid range ``min < max`` are
  required.

Names are unique within a model, ids too. A model belongs to one vendor; its
name is unique per vendor. Kinds are ``KINDS`` (migration 0007 holds the same
list as a constraint).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg

from rmiot.registry.store import EXISTS, NOT_FOUND, RegistryError

KINDS = ("monitor", "wearable", "infusion_pump", "ventilator", "rfid_tag", "meter", "sensor",
         "gateway", "imaging", "analyzer", "smart_bed", "other")
VENDOR_METRICS_FROM = 1000
MAX_METRIC_ID = 0xFFFF
MAX_METRICS = 512

# The shared metric catalogue (frame-v1.md): id -> (name, unit).
CATALOGUE: dict[int, tuple[str, str]] = {
    1: ("heart_rate", "/min"), 2: ("spo2", "%"), 3: ("resp_rate", "/min"),
    4: ("body_temp", "Cel"), 5: ("nibp_sys", "mm[Hg]"), 6: ("nibp_dia", "mm[Hg]"),
    7: ("nibp_mean", "mm[Hg]"), 8: ("pulse_rate", "/min"),
    10: ("infusion_rate", "mL/h"), 11: ("infusion_volume_left", "mL"),
    20: ("posture", "code"), 21: ("fall_detected", "bool"),
    100: ("air_temp", "Cel"), 101: ("humidity", "%"), 102: ("co2", "ppm"),
    103: ("pm25", "ug/m3"), 104: ("pressure_diff", "Pa"), 105: ("o2_supply_pressure", "kPa"),
    200: ("active_power", "kW"), 201: ("energy_total", "kWh"), 202: ("water_total", "m3"),
    203: ("gas_total", "m3"), 204: ("current", "A"), 205: ("voltage", "V"),
    300: ("battery", "%"), 301: ("rssi", "dBm"), 302: ("usage_hours", "h"),
    303: ("error_code", "code"), 304: ("device_state", "code"),
    400: ("zone_id", "id"), 401: ("x", "m"), 402: ("y", "m"), 403: ("floor", ""),
    404: ("latitude", "deg"), 405: ("longitude", "deg"), 406: ("reader_id", "id"),
}

_METRIC_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_VENDOR_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Metric:
    id: int
    name: str
    unit: str
    min: float | None = None
    max: float | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "name": self.name, "unit": self.unit}
        if self.min is not None:
            out["min"] = self.min
        if self.max is not None:
            out["max"] = self.max
        return out


@dataclass(frozen=True)
class Vendor:
    id: int
    code: str
    name: str


@dataclass(frozen=True)
class DeviceModel:
    id: int
    vendor_id: int
    vendor_code: str
    name: str
    kind: str
    metrics: tuple[Metric, ...]
    description: str
    created_at_us: int


def check_metrics(metrics: Iterable[Mapping[str, Any]]) -> tuple[Metric, ...]:
    """Validate a model's metric list (see the module docstring); returns it
    normalised (catalogue names and units filled in, sorted by id)."""
    found: dict[int, Metric] = {}
    names: set[str] = set()
    for n, raw in enumerate(metrics, start=1):
        where = f"metric #{n}"
        ident = raw.get("id")
        if not isinstance(ident, int) or isinstance(ident, bool) \
                or not 1 <= ident <= MAX_METRIC_ID:
            raise RegistryError(f"{where}: id must be an integer 1..{MAX_METRIC_ID}")
        where = f"metric {ident}"
        name, unit = str(raw.get("name") or ""), str(raw.get("unit") or "")
        low, high = _bound(raw.get("min"), where, "min"), _bound(raw.get("max"), where, "max")
        if ident < VENDOR_METRICS_FROM:
            if ident not in CATALOGUE:
                raise RegistryError(f"{where} is not in the shared catalogue (frame-v1.md); "
                                    f"a vendor's own metrics use ids {VENDOR_METRICS_FROM} "
                                    "and above")
            known_name, known_unit = CATALOGUE[ident]
            if (name and name != known_name) or (unit and unit != known_unit):
                raise RegistryError(f"{where} is the catalogue's {known_name} "
                                    f"({known_unit or 'no unit'}): leave name and unit empty "
                                    "or give those")
            name, unit = known_name, known_unit
        else:
            if not _METRIC_NAME.match(name):
                raise RegistryError(f"{where}: a vendor metric needs a name of lower-case "
                                    "letters, digits and _ (starting with a letter)")
            if not unit or len(unit) > 32:
                raise RegistryError(f"{where} ({name}): a vendor metric needs a unit "
                                    "(UCUM, up to 32 characters)")
            if low is None or high is None:
                raise RegistryError(f"{where} ({name}): a vendor metric needs its valid "
                                    "range, min and max")
        if low is not None and high is not None and not low < high:
            raise RegistryError(f"{where} ({name}): min must be below max")
        if ident in found:
            raise RegistryError(f"{where} is listed twice")
        if name in names:
            raise RegistryError(f"{where}: the name {name} is used twice")
        found[ident] = Metric(ident, name, unit, low, high)
        names.add(name)
    if len(found) > MAX_METRICS:
        raise RegistryError(f"a model lists at most {MAX_METRICS} metrics")
    return tuple(found[i] for i in sorted(found))


def _bound(value: Any, where: str, which: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value):
        raise RegistryError(f"{where}: {which} must be a finite number")
    return float(value)


# -- vendors ---------------------------------------------------------------------

def create_vendor(conn: psycopg.Connection[Any], code: str, name: str) -> Vendor:
    """Add a vendor; ``code`` is the common name of its client certificate."""
    if not _VENDOR_CODE.match(code):
        raise RegistryError("a vendor code is 1-64 letters, digits, - and _ "
                            "(the common name of the vendor's client certificate)")
    if not name.strip():
        raise RegistryError("a vendor needs a name")
    try:
        row = conn.execute("INSERT INTO vendors (code, name) VALUES (%s, %s) RETURNING id",
                           (code, name.strip())).fetchone()
    except psycopg.errors.UniqueViolation:
        raise RegistryError(f"vendor {code} already exists", EXISTS) from None
    assert row is not None
    return Vendor(int(row[0]), code, name.strip())


def vendor_by_code(conn: psycopg.Connection[Any], code: str) -> Vendor:
    row = conn.execute("SELECT id, code, name FROM vendors WHERE code = %s", (code,)).fetchone()
    if row is None:
        raise RegistryError(f"vendor {code} does not exist", NOT_FOUND)
    return Vendor(int(row[0]), row[1], row[2])


# -- models ----------------------------------------------------------------------

_SELECT_MODEL = """
SELECT m.id, m.vendor_id, v.code, m.name, m.kind, m.metrics, m.description,
       (extract(epoch FROM m.created_at) * 1000000)::bigint
  FROM device_models m JOIN vendors v ON v.id = m.vendor_id
"""


def create_model(conn: psycopg.Connection[Any], vendor_id: int, name: str, kind: str,
                 metrics: Iterable[Mapping[str, Any]], description: str = "",
                 actor: str = "") -> DeviceModel:
    """Add a device model to a vendor's catalogue; returns it."""
    name = name.strip()
    if not name or len(name) > 128:
        raise RegistryError("a model needs a name of 1-128 characters")
    if kind not in KINDS:
        raise RegistryError(f"kind must be one of {', '.join(KINDS)}")
    checked = check_metrics(metrics)
    try:
        row = conn.execute(
            "INSERT INTO device_models (vendor_id, name, kind, metrics, description, created_by)"
            " VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
            (vendor_id, name, kind, orjson.dumps([m.as_json() for m in checked]).decode(),
             description, actor or None)).fetchone()
    except psycopg.errors.UniqueViolation:
        raise RegistryError(f"this vendor already has a model named {name}", EXISTS) from None
    except psycopg.errors.ForeignKeyViolation:
        raise RegistryError(f"vendor {vendor_id} does not exist", NOT_FOUND) from None
    assert row is not None
    return get_model(conn, int(row[0]))


def get_model(conn: psycopg.Connection[Any], model_id: int,
              vendor_id: int | None = None) -> DeviceModel:
    """One model; with ``vendor_id``, only that vendor's (another's is not found)."""
    row = conn.execute(_SELECT_MODEL + " WHERE m.id = %s", (model_id,)).fetchone()
    if row is None or (vendor_id is not None and row[1] != vendor_id):
        raise RegistryError(f"device model {model_id} does not exist", NOT_FOUND)
    return _model(row)


def list_models(conn: psycopg.Connection[Any], *, vendor_id: int | None = None,
                kind: str = "", after_id: int = 0, limit: int = 100) -> list[DeviceModel]:
    """Models by id, after ``after_id`` (keyset paging)."""
    where: list[str] = ["m.id > %s"]
    params: list[object] = [after_id]
    if vendor_id is not None:
        where.append("m.vendor_id = %s")
        params.append(vendor_id)
    if kind:
        if kind not in KINDS:
            raise RegistryError(f"kind must be one of {', '.join(KINDS)}")
        where.append("m.kind = %s")
        params.append(kind)
    rows = conn.execute((_SELECT_MODEL + " WHERE " + " AND ".join(where)
                         + " ORDER BY m.id LIMIT %s").encode(), [*params, limit]).fetchall()
    return [_model(r) for r in rows]


def _model(row: tuple[Any, ...]) -> DeviceModel:
    metrics = tuple(Metric(m["id"], m["name"], m["unit"], m.get("min"), m.get("max"))
                    for m in row[5])
    return DeviceModel(int(row[0]), int(row[1]), row[2], row[3], row[4], metrics, row[6],
                       int(row[7]))
