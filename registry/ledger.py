"""The asset ledger: one record per device from procurement to scrapping.

A device's ledger is its asset data (``registry.assets``: class, purchase,
depreciation, due dates) plus ``asset_events`` — one line per step of its
life, each with when, what it cost and the reference of its document (a
contract, invoice, acceptance report, calibration certificate):

    procurement → acceptance → deployment → maintenance / calibration /
    metrology / inspection / repair / transfer … → scrapping

Recording a calibration, metrology or inspection with ``next_due`` moves the
device's due date on and closes its open compliance task of that kind
(``registry.compliance``). Recording ``scrapping`` also moves the device
through the lifecycle (retired → scrapped; an active one is retired first).
A repair is recorded by closing its work order (``registry.work_orders``).

Depreciation and book value on any date come from ``assets.book_value``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg

from rmiot.registry import lifecycle
from rmiot.registry.assets import AssetData, book_value
from rmiot.registry.devices import Device, Scope, get
from rmiot.registry.store import PRECONDITION, RegistryError

EVENT_KINDS = ("procurement", "acceptance", "deployment", "maintenance", "calibration",
               "metrology", "inspection", "repair", "transfer", "scrapping")
DUE_COLUMNS = {"calibration": "calibration_due", "metrology": "metrology_due",
               "inspection": "inspection_due"}
# Kinds whose cost is maintenance cost (KPIs, reports).
MAINTENANCE_KINDS = ("maintenance", "calibration", "metrology", "inspection", "repair")


@dataclass(frozen=True)
class AssetEvent:
    id: int
    device_id: int
    kind: str
    at: dt.datetime
    cost: Decimal | None
    document_ref: str
    detail: str
    work_order_id: int | None
    actor: str


@dataclass(frozen=True)
class Ledger:
    device: Device
    metrology_due: dt.date | None
    events: list[AssetEvent]
    book_value: Decimal | None
    on: dt.date

    @property
    def maintenance_cost(self) -> Decimal:
        return sum((e.cost or Decimal(0) for e in self.events if e.kind in MAINTENANCE_KINDS),
                   Decimal(0))


_EVENT = ("SELECT id, device_id, kind, at, cost, coalesce(document_ref, ''), detail, "
          "work_order_id, actor FROM asset_events")


def _event(row: tuple[Any, ...]) -> AssetEvent:
    return AssetEvent(int(row[0]), int(row[1]), row[2], row[3], row[4], row[5], row[6],
                      row[7], row[8])


def record(conn: psycopg.Connection[Any], scope: Scope, device_id: int, kind: str,
           at: dt.datetime, actor: str, *, cost: Decimal | None = None, document_ref: str = "",
           detail: str = "", next_due: dt.date | None = None,
           work_order_id: int | None = None) -> AssetEvent:
    """Add one step to a device's ledger (the device must be in ``scope``)."""
    if kind not in EVENT_KINDS:
        raise RegistryError(f"kind must be one of {', '.join(EVENT_KINDS)}")
    if cost is not None and cost < 0:
        raise RegistryError("cost: must not be negative")
    if next_due is not None and kind not in DUE_COLUMNS:
        raise RegistryError(f"next_due: only for {', '.join(DUE_COLUMNS)}")
    if len(document_ref) > 500 or len(detail) > 2000:
        raise RegistryError("document_ref has at most 500 characters, detail 2000")
    device = get(conn, device_id, scope)
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO asset_events (device_id, kind, at, cost, document_ref, detail, "
            "work_order_id, actor) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (device_id, kind, at, cost, document_ref or None, detail, work_order_id,
             actor)).fetchone()
        assert row is not None
        if kind in DUE_COLUMNS:
            _compliance_done(conn, device_id, kind, at, actor, next_due)
        if kind == "scrapping":
            _scrap(conn, device, actor, detail or "scrapped")
    found = conn.execute(_EVENT + " WHERE id = %s", (row[0],)).fetchone()
    assert found is not None
    return _event(found)


def _compliance_done(conn: psycopg.Connection[Any], device_id: int, kind: str,
                     at: dt.datetime, actor: str, next_due: dt.date | None) -> None:
    done = conn.execute(
        "UPDATE compliance_tasks SET state = 'done', done_at = %s, done_by = %s "
        "WHERE device_id = %s AND kind = %s AND state = 'open' RETURNING id",
        (at, actor, device_id, kind)).fetchall()
    for (task,) in done:
        conn.execute("INSERT INTO compliance_events (task_id, at, kind, note) "
                     "VALUES (%s, %s, 'done', %s)", (task, at, f"{kind} recorded by {actor}"))
    if next_due is not None:
        conn.execute(f"UPDATE devices SET {DUE_COLUMNS[kind]} = %s, updated_at = now() "
                     "WHERE id = %s".encode(), (next_due, device_id))


def _scrap(conn: psycopg.Connection[Any], device: Device, actor: str, reason: str) -> None:
    if device.state == "scrapped":
        raise RegistryError(f"device {device.id} is already scrapped", PRECONDITION)
    lifecycle.set_actor(conn, actor, reason)
    if device.state != "retired":
        lifecycle.check_transition(device.id, device.state, "retired")
        conn.execute("UPDATE devices SET state = 'retired', updated_at = now() WHERE id = %s",
                     (device.id,))
    conn.execute("UPDATE devices SET state = 'scrapped', updated_at = now() WHERE id = %s",
                 (device.id,))


def events(conn: psycopg.Connection[Any], device_id: int) -> list[AssetEvent]:
    rows = conn.execute(_EVENT + " WHERE device_id = %s ORDER BY at, id", (device_id,))
    return [_event(r) for r in rows.fetchall()]


def ledger(conn: psycopg.Connection[Any], scope: Scope, device_id: int,
           on: dt.date | None = None) -> Ledger:
    """A device's whole record and its book value on ``on`` (default today)."""
    device = get(conn, device_id, scope)
    row = conn.execute("SELECT metrology_due FROM devices WHERE id = %s",
                       (device_id,)).fetchone()
    day = on or dt.date.today()
    return Ledger(device, row[0] if row else None, events(conn, device_id),
                  book_value(device.asset, day), day)


def depreciation(asset: AssetData, first: dt.date, end: dt.date) -> Decimal:
    """What the device lost in value over [first, end) (0 when it has no
    depreciation data)."""
    before, after = book_value(asset, first), book_value(asset, end)
    if before is None or after is None:
        return Decimal(0)
    return before - after


def schedule(asset: AssetData, years: int | None = None) -> list[tuple[dt.date, Decimal]]:
    """Book value at purchase and on each anniversary to the end of its life."""
    if asset.purchase_date is None:
        return []
    life = years or asset.useful_life_years or 0
    out = []
    for n in range(life + 1):
        day = _anniversary(asset.purchase_date, n)
        value = book_value(asset, day)
        if value is not None:
            out.append((day, value))
    return out


def _anniversary(day: dt.date, years: int) -> dt.date:
    try:
        return day.replace(year=day.year + years)
    except ValueError:  # 29 February
        return day.replace(year=day.year + years, day=28)
