"""Where devices are, and which are free for an emergency (the standard's 6.2 b).

Positions and use come from ``device_status`` (kept from telemetry by
``registry.ops_tracker``). A device is **available** when all of these hold:

- its lifecycle state is ``active`` (not suspended, in maintenance, retired);
- it reports ``device_state`` idle (0), recently (``fresh_s``, default 15 min);
- no work order is open on it, and no reservation holds it;
- its calibration is valid (no due date, or due today or later);
- its battery is at least ``min_battery`` % (a device that reports no battery
  runs on mains and passes).

Sorted nearest first: in the requested zone, then elsewhere in the requesting
hospital, then in other hospitals; then by floors apart, distance on the floor
plan (x, y), and freshest report.

Reserving a device for a request takes it out of the available set until it
is released; both are recorded as movements (with who, why and where to), so
a lent device has a clear trail and a responsible person.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import psycopg

from rmiot.registry.devices import Scope, get
from rmiot.registry.store import EXISTS, NOT_FOUND, PRECONDITION, RegistryError

IDLE = 0
DEFAULT_FRESH_S = 900
MAX_RESULTS = 1000


@dataclass(frozen=True)
class Position:
    device_id: int
    hospital_id: int
    home_id: int
    kind: str
    use_state: int | None
    battery: float | None
    zone_id: int | None
    floor: int | None
    x: float | None
    y: float | None
    last_seen: dt.datetime
    rank: int = 0          # 0 the requested zone, 1 the requesting hospital, 2 elsewhere
    reserved: bool = False


@dataclass(frozen=True)
class Need:
    """What a dispatch asks for."""

    kind: str = ""                 # device model kind ('ventilator'); '' any kind
    zone_id: int = 0               # where it is needed (a department/zone tenant id)
    hospital_id: int = 0           # the requesting hospital (0: the zone's, else none)
    floor: int | None = None
    x: float | None = None
    y: float | None = None
    min_battery: float = 50.0
    fresh_s: int = DEFAULT_FRESH_S
    limit: int = 50


_COLUMNS = """d.id, d.tenant_id, coalesce(d.department_id, d.tenant_id), coalesce(m.kind, ''),
       s.use_state, s.battery, s.zone_id, s.floor, s.x, s.y, s.last_seen"""

# The dispatch query. Scope by the device's hospital first (an index on
# devices.tenant_id would do; the district's hospitals are few), then the home.
_AVAILABLE = f"""
SELECT {_COLUMNS},
       CASE WHEN s.zone_id = %(zone)s THEN 0 WHEN d.tenant_id = %(hospital)s THEN 1 ELSE 2 END
  FROM device_status s
  JOIN devices d ON d.id = s.device_id
  LEFT JOIN device_models m ON m.id = d.model_id
 WHERE s.use_state = 0 AND s.last_seen >= %(fresh)s
   AND (s.battery IS NULL OR s.battery >= %(battery)s)
   AND d.state = 'active'
   AND (%(kind)s = '' OR m.kind = %(kind)s)
   AND (d.calibration_due IS NULL OR d.calibration_due >= %(today)s)
   AND (%(scope)s::int IS NULL OR coalesce(d.department_id, d.tenant_id) IN
        (SELECT id FROM tenants WHERE path @> ARRAY[%(scope)s::int]))
   AND NOT EXISTS (SELECT FROM device_reservations r
                    WHERE r.device_id = s.device_id AND r.released_at IS NULL)
   AND NOT EXISTS (SELECT FROM work_orders w WHERE w.device_id = s.device_id
                      AND w.state IN ('open', 'assigned', 'in_progress'))
 ORDER BY 12, abs(coalesce(s.floor, 0) - %(floor)s),
          (coalesce(s.x, 0) - %(x)s) ^ 2 + (coalesce(s.y, 0) - %(y)s) ^ 2, s.last_seen DESC,
          d.id
 LIMIT %(limit)s"""


def _position(row: tuple[Any, ...], reserved: bool = False) -> Position:
    return Position(int(row[0]), int(row[1]), int(row[2]), row[3], row[4], row[5], row[6],
                    row[7], row[8], row[9], row[10], int(row[11]) if len(row) > 11 else 0,
                    reserved)


def available(conn: psycopg.Connection[Any], scope: Scope, need: Need,
              now: dt.datetime | None = None) -> list[Position]:
    """The devices free for ``need`` in scope, nearest first."""
    if not 0 <= need.min_battery <= 100:
        raise RegistryError("min_battery: a percentage, 0 to 100")
    if need.fresh_s <= 0:
        raise RegistryError("fresh_s: must be positive")
    when = now or dt.datetime.now(dt.UTC)
    hospital = need.hospital_id
    if not hospital and need.zone_id:
        row = conn.execute("SELECT (SELECT t.id FROM tenants t WHERE t.id = ANY(z.path) AND "
                           "t.level = 'hospital') FROM tenants z WHERE z.id = %s",
                           (need.zone_id,)).fetchone()
        hospital = int(row[0]) if row and row[0] else 0
    rows = conn.execute(_AVAILABLE.encode(), {
        "zone": need.zone_id, "hospital": hospital, "fresh": when - dt.timedelta(
            seconds=need.fresh_s), "battery": need.min_battery, "kind": need.kind,
        "today": when.date(), "scope": scope.tenant_id,
        "floor": need.floor or 0, "x": need.x or 0.0, "y": need.y or 0.0,
        "limit": max(1, min(need.limit, MAX_RESULTS))}).fetchall()
    return [_position(r) for r in rows]


def locate(conn: psycopg.Connection[Any], scope: Scope, *, device_id: int = 0,
           kind: str = "", zone_id: int = 0, limit: int = 200) -> list[Position]:
    """Where devices are (zone, floor, last seen), one or a scope's."""
    where: list[str] = ["true"]
    params: list[Any] = []
    if scope.tenant_id is not None:
        where.append("coalesce(d.department_id, d.tenant_id) IN "
                     "(SELECT id FROM tenants WHERE path @> ARRAY[%s]::integer[])")
        params.append(scope.tenant_id)
    for column, value in (("d.id", device_id), ("m.kind", kind), ("s.zone_id", zone_id)):
        if value:
            where.append(f"{column} = %s")
            params.append(value)
    rows = conn.execute((
        f"SELECT {_COLUMNS}, 0, EXISTS (SELECT FROM device_reservations r WHERE "
        "r.device_id = d.id AND r.released_at IS NULL) FROM device_status s "
        "JOIN devices d ON d.id = s.device_id LEFT JOIN device_models m ON m.id = d.model_id "
        "WHERE " + " AND ".join(where) + " ORDER BY d.id LIMIT %s").encode(),
        [*params, max(1, min(limit, MAX_RESULTS))]).fetchall()
    return [_position(r[:12], bool(r[12])) for r in rows]


@dataclass(frozen=True)
class Reservation:
    id: int
    device_id: int
    tenant_id: int
    request: str
    to_zone: int | None
    reserved_by: str
    reserved_at: dt.datetime
    released_at: dt.datetime | None
    released_by: str


_RESERVATION = ("SELECT id, device_id, tenant_id, request, to_zone, reserved_by, reserved_at, "
                "released_at, coalesce(released_by, '') FROM device_reservations")


def reserve(conn: psycopg.Connection[Any], scope: Scope, device_id: int, requester: int,
            request: str, actor: str, to_zone: int = 0,
            need: Need | None = None) -> Reservation:
    """Hold a device for ``request`` of tenant ``requester``; it must still be
    available (by ``need``'s thresholds) when taken."""
    request = request.strip()
    if not request or len(request) > 500:
        raise RegistryError("request: say what it is for (at most 500 characters)")
    get(conn, device_id, scope)
    check = need or Need()
    with conn.transaction():
        conn.execute("SELECT id FROM devices WHERE id = %s FOR UPDATE", (device_id,))
        if not _is_available(conn, device_id, check):
            raise RegistryError(f"device {device_id} is not available now", PRECONDITION)
        try:
            row = conn.execute(
                "INSERT INTO device_reservations (device_id, tenant_id, request, to_zone, "
                "reserved_by) VALUES (%s, %s, %s, %s, %s) RETURNING id",
                (device_id, requester, request, to_zone or None, actor)).fetchone()
        except psycopg.errors.UniqueViolation:
            raise RegistryError(f"device {device_id} is already reserved", EXISTS) from None
        assert row is not None
        _move(conn, device_id, to_zone or None, actor, f"reserved: {request}", int(row[0]))
    return _reservation(conn, int(row[0]))


def _is_available(conn: psycopg.Connection[Any], device_id: int, need: Need) -> bool:
    sql = _AVAILABLE.replace("WHERE s.use_state = 0", "WHERE s.device_id = %(device)s AND "
                             "s.use_state = 0")
    when = dt.datetime.now(dt.UTC)
    row = conn.execute(sql.encode(), {
        "device": device_id, "zone": 0, "hospital": 0,
        "fresh": when - dt.timedelta(seconds=need.fresh_s), "battery": need.min_battery,
        "kind": "", "today": when.date(), "scope": None, "floor": 0, "x": 0.0, "y": 0.0,
        "limit": 1}).fetchone()
    return row is not None


def _move(conn: psycopg.Connection[Any], device_id: int, to_zone: int | None, actor: str,
          reason: str, reservation: int | None) -> None:
    row = conn.execute("SELECT zone_id FROM device_status WHERE device_id = %s",
                       (device_id,)).fetchone()
    conn.execute("INSERT INTO device_movements (device_id, from_zone, to_zone, actor, reason, "
                 "reservation_id) VALUES (%s, %s, %s, %s, %s, %s)",
                 (device_id, row[0] if row else None, to_zone, actor, reason, reservation))


def _reservation(conn: psycopg.Connection[Any], reservation_id: int) -> Reservation:
    row = conn.execute(_RESERVATION + " WHERE id = %s", (reservation_id,)).fetchone()
    if row is None:
        raise RegistryError(f"reservation {reservation_id} does not exist", NOT_FOUND)
    return Reservation(*row)


def release(conn: psycopg.Connection[Any], scope: Scope, reservation_id: int, actor: str,
            note: str = "", to_zone: int = 0) -> Reservation:
    """End a reservation (the device goes back into the pool, at ``to_zone``
    when it was returned somewhere). The reservation must be the scope's: its
    device's, or made by a tenant in it."""
    held = _reservation(conn, reservation_id)
    if scope.tenant_id is not None:
        row = conn.execute(
            "SELECT EXISTS (SELECT FROM tenants WHERE path @> ARRAY[%s]::integer[] AND id IN "
            "(%s, (SELECT coalesce(department_id, tenant_id) FROM devices WHERE id = %s)))",
            (scope.tenant_id, held.tenant_id, held.device_id)).fetchone()
        if not row or not row[0]:
            raise RegistryError(f"reservation {reservation_id} does not exist", NOT_FOUND)
    if held.released_at is not None:
        raise RegistryError(f"reservation {reservation_id} was released already", PRECONDITION)
    with conn.transaction():
        conn.execute("UPDATE device_reservations SET released_at = now(), released_by = %s, "
                     "release_note = %s WHERE id = %s", (actor, note, reservation_id))
        _move(conn, held.device_id, to_zone or None, actor,
              f"released: {note}" if note else "released", reservation_id)
    return _reservation(conn, reservation_id)


def movements(conn: psycopg.Connection[Any], scope: Scope,
              device_id: int) -> list[tuple[dt.datetime, int | None, int | None, str, str]]:
    """A device's moves, oldest first: (at, from zone, to zone, actor, reason)."""
    get(conn, device_id, scope)
    rows = conn.execute("SELECT at, from_zone, to_zone, actor, reason FROM device_movements "
                        "WHERE device_id = %s ORDER BY id", (device_id,)).fetchall()
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]
