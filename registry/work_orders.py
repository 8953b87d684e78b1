"""Repair work orders: report a fault by scanning a device's code, assign,
update, close.

    open → assigned → in_progress → closed      (or cancelled from any open state)

A device has at most one open work order: reporting a fault again adds a note
to it (a second person scanning the same broken pump does not open a second
job). A new work order links the device's open alarms. Closing records the
repair in the asset ledger (with its cost and document) — MTTR and
maintenance cost come from there. Every step is a ``work_order_events`` line.
Work orders are seen through the device: one whose device is out of the
caller's scope is not found.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg

from rmiot.registry import ledger
from rmiot.registry.devices import Scope, find_by_code, get
from rmiot.registry.store import NOT_FOUND, PRECONDITION, RegistryError

OPEN_STATES = ("open", "assigned", "in_progress")
STEPS = {"assign": ("assigned", OPEN_STATES), "start": ("in_progress", ("assigned",)),
         "note": ("", OPEN_STATES), "close": ("closed", OPEN_STATES),
         "cancel": ("cancelled", OPEN_STATES)}


@dataclass(frozen=True)
class WorkOrderEvent:
    at: dt.datetime
    actor: str
    kind: str
    state: str
    note: str


@dataclass(frozen=True)
class WorkOrder:
    id: int
    device_id: int
    tenant_id: int
    state: str
    fault: str
    reported_by: str
    reported_at: dt.datetime
    assignee: str
    closed_at: dt.datetime | None
    resolution: str
    cost: Decimal | None
    alarm_ids: list[int]
    events: list[WorkOrderEvent]

    @property
    def repair_hours(self) -> float | None:
        if self.closed_at is None or self.state != "closed":
            return None
        return (self.closed_at - self.reported_at).total_seconds() / 3600


_SELECT = ("SELECT w.id, w.device_id, w.tenant_id, w.state, w.fault, w.reported_by, "
           "w.reported_at, coalesce(w.assignee, ''), w.closed_at, coalesce(w.resolution, ''), "
           "w.cost, w.alarm_ids FROM work_orders w JOIN devices d ON d.id = w.device_id")
_IN_SCOPE = ("coalesce(d.department_id, d.tenant_id) IN "
             "(SELECT id FROM tenants WHERE path @> ARRAY[%s]::integer[])")


def _order(conn: psycopg.Connection[Any], row: tuple[Any, ...]) -> WorkOrder:
    steps = conn.execute("SELECT at, actor, kind, state, note FROM work_order_events "
                         "WHERE work_order_id = %s ORDER BY id", (row[0],)).fetchall()
    return WorkOrder(int(row[0]), int(row[1]), int(row[2]), row[3], row[4], row[5], row[6],
                     row[7], row[8], row[9], row[10], [int(a) for a in row[11]],
                     [WorkOrderEvent(*s) for s in steps])


def get_order(conn: psycopg.Connection[Any], scope: Scope, order_id: int) -> WorkOrder:
    where, params = ["w.id = %s"], [order_id]
    if scope.tenant_id is not None:
        where.append(_IN_SCOPE)
        params.append(scope.tenant_id)
    row = conn.execute((_SELECT + " WHERE " + " AND ".join(where)).encode(), params).fetchone()
    if row is None:
        raise RegistryError(f"work order {order_id} does not exist", NOT_FOUND)
    return _order(conn, row)


def list_orders(conn: psycopg.Connection[Any], scope: Scope, *, device_id: int = 0,
                open_only: bool = False, limit: int = 100) -> list[WorkOrder]:
    where: list[str] = ["true"]
    params: list[Any] = []
    if scope.tenant_id is not None:
        where.append(_IN_SCOPE)
        params.append(scope.tenant_id)
    if device_id:
        where.append("w.device_id = %s")
        params.append(device_id)
    if open_only:
        where.append("w.state IN ('open', 'assigned', 'in_progress')")
    rows = conn.execute((_SELECT + " WHERE " + " AND ".join(where) + " ORDER BY w.id DESC "
                         "LIMIT %s").encode(), [*params, max(1, min(limit, 1000))]).fetchall()
    return [_order(conn, r) for r in rows]


def report(conn: psycopg.Connection[Any], scope: Scope, actor: str, fault: str, *,
           device_id: int = 0, code: str = "", at: dt.datetime | None = None) -> WorkOrder:
    """Report a fault on the device (named by id, or by a code scanned off it)."""
    fault = fault.strip()
    if not fault or len(fault) > 2000:
        raise RegistryError("fault: say what is wrong (at most 2000 characters)")
    if code:
        if scope.tenant_id is None:
            raise RegistryError("a code is looked up within a tenant")
        found = find_by_code(conn, scope.tenant_id, code)
        if found is None or (device_id and found.id != device_id):
            raise RegistryError(f"no device carries code {code}", NOT_FOUND)
        device = found
    elif device_id:
        device = get(conn, device_id, scope)
    else:
        raise RegistryError("name the device: device_id or a code")
    when = at or dt.datetime.now(dt.UTC)
    with conn.transaction():
        conn.execute("SELECT id FROM devices WHERE id = %s FOR UPDATE", (device.id,))
        row = conn.execute("SELECT id, state FROM work_orders WHERE device_id = %s AND state "
                           "IN ('open', 'assigned', 'in_progress')", (device.id,)).fetchone()
        if row is not None:
            _event(conn, row[0], actor, "reported", row[1], fault)
            order_id = int(row[0])
        else:
            alarms = [int(a) for (a,) in conn.execute(
                "SELECT id FROM alarms WHERE device_id = %s AND state <> 'cleared' "
                "ORDER BY id", (device.id,)).fetchall()]
            got = conn.execute(
                "INSERT INTO work_orders (device_id, tenant_id, fault, reported_by, "
                "reported_at, alarm_ids) VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
                (device.id, device.home, fault, actor, when, alarms)).fetchone()
            assert got is not None
            order_id = int(got[0])
            _event(conn, order_id, actor, "reported", "open", fault, when)
    return get_order(conn, scope, order_id)


def _event(conn: psycopg.Connection[Any], order_id: int, actor: str, kind: str, state: str,
           note: str, at: dt.datetime | None = None) -> None:
    conn.execute("INSERT INTO work_order_events (work_order_id, at, actor, kind, state, note) "
                 "VALUES (%s, coalesce(%s, now()), %s, %s, %s, %s)",
                 (order_id, at, actor, kind, state, note))


def step(conn: psycopg.Connection[Any], scope: Scope, order_id: int, action: str, actor: str,
         *, note: str = "", assignee: str = "", cost: Decimal | None = None,
         document_ref: str = "", at: dt.datetime | None = None) -> WorkOrder:
    """assign (to ``assignee``), start, note, close (with ``cost``,
    ``document_ref`` and the resolution in ``note``) or cancel."""
    if action not in STEPS:
        raise RegistryError(f"action must be one of {', '.join(STEPS)}")
    to_state, allowed = STEPS[action]
    if action == "assign" and not assignee:
        raise RegistryError("assignee: required to assign")
    if action == "close" and not note.strip():
        raise RegistryError("note: say what was done to close it")
    when = at or dt.datetime.now(dt.UTC)
    order = get_order(conn, scope, order_id)
    if order.state not in allowed:
        raise RegistryError(f"work order {order_id} is {order.state}: cannot {action}",
                            PRECONDITION)
    state = to_state or order.state
    with conn.transaction():
        closing = state in ("closed", "cancelled")
        conn.execute(
            "UPDATE work_orders SET state = %s, assignee = coalesce(nullif(%s, ''), assignee), "
            "closed_at = CASE WHEN %s THEN %s END, "
            "resolution = CASE WHEN %s THEN %s ELSE resolution END, "
            "cost = coalesce(%s, cost), updated_at = now() WHERE id = %s",
            (state, assignee, closing, when, closing, note, cost, order_id))
        _event(conn, order_id, actor, action, state, note or assignee, when)
        if state == "closed":
            ledger.record(conn, Scope(), order.device_id, "repair", when, actor, cost=cost,
                          document_ref=document_ref, detail=note, work_order_id=order_id)
    return get_order(conn, scope, order_id)
