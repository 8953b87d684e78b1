"""Equipment KPIs over a period [lo, hi), computed from telemetry and the
ledger, never typed in.

Per device:

- **observed** time: each ``device_state`` (304) report holds until the next
  report, the end of the period, or ``max_gap`` later, whichever comes first
  (a silent device is not observed, rather than assumed up);
- **up** time: observed in idle (0) or in use (1); **in use**: in use (1);
- **uptime** = up / observed; **utilisation** = in use / observed;
- **uses**: reports in use whose previous report (in the period) was not;
- **usage hours**: growth of the ``usage_hours`` counter (302) in the period;
- **failures**: work orders reported in the period; **MTBF** = up hours /
  failures; **MTTR**: mean hours from report to close of the work orders
  closed in the period;
- **maintenance cost**: ledger costs of maintenance, calibration, metrology,
  inspection and repair in the period; **depreciation**: book value lost over
  the period; **cost per use** = (depreciation + maintenance cost) / uses.

Groups (device class = model kind, department = home, hospital) add the
parts up and divide at the end, so a group's uptime is time-weighted.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg

from rmiot.registry.assets import ASSET_COLUMNS, AssetData
from rmiot.registry.ledger import MAINTENANCE_KINDS, depreciation
from rmiot.registry.store import RegistryError

MAX_GAP = dt.timedelta(hours=1)
GROUPS = ("device", "kind", "department", "hospital")


@dataclass
class Kpi:
    group: str
    key: int | str
    name: str = ""
    devices: int = 0
    observed_s: float = 0.0
    up_s: float = 0.0
    in_use_s: float = 0.0
    uses: int = 0
    usage_hours: float = 0.0
    failures: int = 0
    repairs: int = 0
    repair_hours: float = 0.0
    maintenance_cost: Decimal = field(default_factory=lambda: Decimal(0))
    depreciation: Decimal = field(default_factory=lambda: Decimal(0))

    @property
    def uptime(self) -> float | None:
        return self.up_s / self.observed_s if self.observed_s else None

    @property
    def utilisation(self) -> float | None:
        return self.in_use_s / self.observed_s if self.observed_s else None

    @property
    def mtbf_h(self) -> float | None:
        return self.up_s / 3600 / self.failures if self.failures else None

    @property
    def mttr_h(self) -> float | None:
        return self.repair_hours / self.repairs if self.repairs else None

    @property
    def cost_per_use(self) -> Decimal | None:
        if not self.uses:
            return None
        return ((self.depreciation + self.maintenance_cost) / self.uses).quantize(Decimal("0.01"))

    def add(self, other: Kpi) -> None:
        self.devices += other.devices
        for name in ("observed_s", "up_s", "in_use_s", "uses", "usage_hours", "failures",
                     "repairs", "repair_hours", "maintenance_cost", "depreciation"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


_STATES = """
WITH s AS (
  SELECT t.device_id, t.ts, t.vals[array_position(t.metrics, 304)] AS st
    FROM telemetry t
   WHERE t.device_id = ANY (%(ids)s) AND t.ts >= %(lo)s AND t.ts < %(hi)s
     AND t.metrics @> '{304}'
), w AS (
  SELECT device_id, st, lag(st) OVER w AS prev,
         extract(epoch FROM least(coalesce(lead(ts) OVER w, %(hi)s), ts + %(gap)s) - ts) AS held
    FROM s WINDOW w AS (PARTITION BY device_id ORDER BY ts)
)
SELECT device_id, sum(held), coalesce(sum(held) FILTER (WHERE st IN (0, 1)), 0),
       coalesce(sum(held) FILTER (WHERE st = 1), 0),
       count(*) FILTER (WHERE st = 1 AND (prev IS NULL OR prev <> 1))
  FROM w GROUP BY 1"""

_USAGE = """
SELECT t.device_id, max(t.vals[array_position(t.metrics, 302)])
                    - min(t.vals[array_position(t.metrics, 302)])
  FROM telemetry t
 WHERE t.device_id = ANY (%(ids)s) AND t.ts >= %(lo)s AND t.ts < %(hi)s
   AND t.metrics @> '{302}'
 GROUP BY 1"""


@dataclass(frozen=True)
class DeviceInfo:
    id: int
    hospital_id: int
    home_id: int
    kind: str
    label: str
    asset: AssetData


def devices_in(conn: psycopg.Connection[Any], scope: int | None,
               kind: str = "") -> list[DeviceInfo]:
    """The scope's devices (homed under ``scope``; None: all) not scrapped."""
    rows = conn.execute(
        "SELECT d.id, d.tenant_id, coalesce(d.department_id, d.tenant_id), "
        "coalesce(m.kind, 'other'), coalesce(d.serial_no, d.udi, d.id::text), "
        + ", ".join(f"d.{c}" for c in ASSET_COLUMNS) +
        " FROM devices d LEFT JOIN device_models m ON m.id = d.model_id "
        "WHERE d.state <> 'scrapped' AND (%(kind)s = '' OR m.kind = %(kind)s) "
        "AND (%(scope)s::int IS NULL OR coalesce(d.department_id, d.tenant_id) IN "
        "(SELECT id FROM tenants WHERE path @> ARRAY[%(scope)s::int])) ORDER BY d.id",
        {"scope": scope, "kind": kind}).fetchall()
    return [DeviceInfo(int(r[0]), int(r[1]), int(r[2]), r[3], r[4], AssetData(*r[5:]))
            for r in rows]


def device_kpis(conn: psycopg.Connection[Any], devices: list[DeviceInfo], lo: dt.datetime,
                hi: dt.datetime, max_gap: dt.timedelta = MAX_GAP) -> dict[int, Kpi]:
    """One ``Kpi`` per device over [lo, hi)."""
    out = {d.id: Kpi("device", d.id, d.label, devices=1) for d in devices}
    if not out:
        return out
    ids = list(out)
    params = {"ids": ids, "lo": lo, "hi": hi, "gap": max_gap}
    for dev, observed, up, in_use, uses in conn.execute(_STATES.encode(), params).fetchall():
        k = out[int(dev)]
        k.observed_s, k.up_s, k.in_use_s, k.uses = (float(observed), float(up), float(in_use),
                                                     int(uses))
    for dev, grown in conn.execute(_USAGE.encode(), params).fetchall():
        out[int(dev)].usage_hours = float(grown or 0)
    for dev, n in conn.execute(
            "SELECT device_id, count(*) FROM work_orders WHERE device_id = ANY (%s) "
            "AND reported_at >= %s AND reported_at < %s GROUP BY 1", (ids, lo, hi)).fetchall():
        out[int(dev)].failures = int(n)
    for dev, n, hours in conn.execute(
            "SELECT device_id, count(*), sum(extract(epoch FROM closed_at - reported_at)) / 3600 "
            "FROM work_orders WHERE device_id = ANY (%s) AND state = 'closed' "
            "AND closed_at >= %s AND closed_at < %s GROUP BY 1", (ids, lo, hi)).fetchall():
        out[int(dev)].repairs, out[int(dev)].repair_hours = int(n), float(hours)
    for dev, cost in conn.execute(
            "SELECT device_id, sum(cost) FROM asset_events WHERE device_id = ANY (%s) "
            "AND kind = ANY (%s) AND at >= %s AND at < %s AND cost IS NOT NULL GROUP BY 1",
            (ids, list(MAINTENANCE_KINDS), lo, hi)).fetchall():
        out[int(dev)].maintenance_cost = Decimal(cost)
    first, end = lo.date(), hi.date()
    for d in devices:
        out[d.id].depreciation = depreciation(d.asset, first, end)
    return out


def grouped(devices: Iterable[DeviceInfo], per_device: dict[int, Kpi], group: str,
            names: dict[int, str] | None = None) -> list[Kpi]:
    """Per-device KPIs summed by ``group`` (kind, department or hospital)."""
    if group == "device":
        return [per_device[d.id] for d in devices]
    if group not in GROUPS:
        raise RegistryError(f"group must be one of {', '.join(GROUPS)}")
    sums: dict[int | str, Kpi] = defaultdict(lambda: Kpi(group, 0))
    for d in devices:
        key: int | str = d.kind if group == "kind" else \
            d.home_id if group == "department" else d.hospital_id
        total = sums[key]
        total.key = key
        total.name = str(key) if isinstance(key, str) else (names or {}).get(key, str(key))
        total.add(per_device[d.id])
    return sorted(sums.values(), key=lambda k: str(k.key) if group == "kind" else int(k.key))


def tenant_names(conn: psycopg.Connection[Any], ids: Iterable[int]) -> dict[int, str]:
    rows = conn.execute("SELECT id, name FROM tenants WHERE id = ANY (%s)", (list(set(ids)),))
    return {int(r[0]): r[1] for r in rows.fetchall()}


def kpis(conn: psycopg.Connection[Any], scope: int | None, lo: dt.datetime, hi: dt.datetime,
         group: str, kind: str = "") -> list[Kpi]:
    """KPIs of the scope's devices over [lo, hi), by ``group``."""
    if hi <= lo:
        raise RegistryError("the period is empty")
    found = devices_in(conn, scope, kind)
    per_device = device_kpis(conn, found, lo, hi)
    names = tenant_names(conn, {d.home_id for d in found} | {d.hospital_id for d in found})
    return grouped(found, per_device, group, names)
