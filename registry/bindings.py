"""Which patient, bed or care episode a device serves, over time.

``bind`` opens a binding (the device must be active and not bound already),
``transfer`` closes the open one and opens the next in one transaction (a pump
moving to another patient or bed), ``unbind`` closes it. Nothing is deleted:
``history`` lists every binding with who opened and closed it, when and why.
At most one binding per device is open (a unique index of migration 0007
holds it even against concurrent calls). A device leaving ``active`` is
unbound by the lifecycle's trigger.

A device is bound only to a patient of its own hospital, and the caller's
scope must reach both: the device (its home under the scope's tenant) and
the patient (registered in the scope's subtree or above it — a department
treats its hospital's patients). Vendors never see bindings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from rmiot.registry.devices import EVERYTHING, Device, Scope, get
from rmiot.registry.store import NOT_FOUND, PRECONDITION, RegistryError

MAX_TEXT = 64
MAX_REASON = 500

_SELECT = """
SELECT id, device_id, tenant_id, patient_id, bed, episode,
       (extract(epoch FROM bound_at) * 1000000)::bigint, bound_by, coalesce(reason, ''),
       (extract(epoch FROM unbound_at) * 1000000)::bigint, unbound_by, end_kind,
       coalesce(end_reason, '')
  FROM device_bindings
"""


@dataclass(frozen=True)
class Binding:
    id: int
    device_id: int
    tenant_id: int
    patient_id: int | None
    bed: str | None
    episode: str | None
    bound_at_us: int
    bound_by: str
    reason: str
    unbound_at_us: int | None
    unbound_by: str | None
    end_kind: str | None           # unbind, transfer, device_<state>
    end_reason: str


@dataclass(frozen=True)
class Target:
    """Whom or what a device is bound to: a patient, a bed, or both; an episode
    (admission or encounter number) optionally."""

    patient_id: int | None = None
    bed: str | None = None
    episode: str | None = None


def _binding(row: tuple[Any, ...]) -> Binding:
    return Binding(int(row[0]), int(row[1]), int(row[2]), row[3], row[4], row[5], int(row[6]),
                   row[7], row[8], row[9], row[10], row[11], row[12])


def _check_text(target: Target, reason: str, actor: str) -> None:
    if target.patient_id is None and not target.bed:
        raise RegistryError("a binding names a patient, a bed, or both")
    for name, value in (("bed", target.bed), ("episode", target.episode)):
        if value is not None and len(value) > MAX_TEXT:
            raise RegistryError(f"{name}: at most {MAX_TEXT} characters")
    if len(reason) > MAX_REASON:
        raise RegistryError(f"reason: at most {MAX_REASON} characters")
    if not actor:
        raise RegistryError("a binding needs an actor")


def _no_vendor(scope: Scope) -> None:
    if scope.vendor_id is not None:
        raise RegistryError("vendors do not see bindings", NOT_FOUND)


def _patient_path(conn: psycopg.Connection[Any], patient_id: int, scope: Scope) -> list[int]:
    """The path of the patient's tenant, when the scope reaches the patient:
    registered in the scope tenant's subtree, or above it (a department treats
    its hospital's patients)."""
    row = conn.execute(
        "SELECT t.path FROM patients p JOIN tenants t ON t.id = p.tenant_id WHERE p.id = %s",
        (patient_id,)).fetchone()
    path: list[int] = list(row[0]) if row else []
    if path and scope.tenant_id is not None and scope.tenant_id not in path:
        above = conn.execute("SELECT path FROM tenants WHERE id = %s",
                             (scope.tenant_id,)).fetchone()
        if above is None or list(above[0])[:len(path)] != path:
            path = []
    if not path:
        raise RegistryError(f"patient {patient_id} does not exist", NOT_FOUND)
    return path


def _check_patient(conn: psycopg.Connection[Any], patient_id: int, device: Device,
                   scope: Scope) -> None:
    if device.tenant_id not in _patient_path(conn, patient_id, scope):
        raise RegistryError(f"patient {patient_id} is not a patient of the device's "
                            f"hospital ({device.tenant_id})", PRECONDITION)


def current(conn: psycopg.Connection[Any], device_id: int) -> Binding | None:
    row = conn.execute(_SELECT + " WHERE device_id = %s AND unbound_at IS NULL",
                       (device_id,)).fetchone()
    return _binding(row) if row else None


def bind(conn: psycopg.Connection[Any], device_id: int, target: Target, actor: str,
         reason: str = "", scope: Scope = EVERYTHING) -> Binding:
    """Bind a device that is not bound; returns the new binding."""
    _no_vendor(scope)
    _check_text(target, reason, actor)
    with conn.transaction():
        device = _lock_device(conn, device_id, scope)
        if target.patient_id is not None:
            _check_patient(conn, target.patient_id, device, scope)
        open_now = current(conn, device_id)
        if open_now is not None:
            raise RegistryError(f"device {device_id} is already bound (binding {open_now.id}): "
                                "transfer or unbind it", PRECONDITION)
        return _open(conn, device, target, actor, reason)


def transfer(conn: psycopg.Connection[Any], device_id: int, target: Target, actor: str,
             reason: str = "", scope: Scope = EVERYTHING) -> Binding:
    """Close the device's open binding and open one to ``target``, at once."""
    _no_vendor(scope)
    _check_text(target, reason, actor)
    with conn.transaction():
        device = _lock_device(conn, device_id, scope)
        if target.patient_id is not None:
            _check_patient(conn, target.patient_id, device, scope)
        open_now = current(conn, device_id)
        if open_now is None:
            raise RegistryError(f"device {device_id} is not bound: bind it", PRECONDITION)
        if (open_now.patient_id, open_now.bed, open_now.episode) == (
                target.patient_id, target.bed, target.episode):
            raise RegistryError(f"device {device_id} is already bound there", PRECONDITION)
        _close(conn, open_now.id, actor, "transfer", reason)
        return _open(conn, device, target, actor, reason)


def unbind(conn: psycopg.Connection[Any], device_id: int, actor: str, reason: str = "",
           scope: Scope = EVERYTHING) -> Binding:
    """Close the device's open binding; returns it, closed."""
    _no_vendor(scope)
    if not actor:
        raise RegistryError("unbinding needs an actor")
    with conn.transaction():
        _lock_device(conn, device_id, scope, need_active=False)
        open_now = current(conn, device_id)
        if open_now is None:
            raise RegistryError(f"device {device_id} is not bound", PRECONDITION)
        _close(conn, open_now.id, actor, "unbind", reason)
    row = conn.execute(_SELECT + " WHERE id = %s", (open_now.id,)).fetchone()
    assert row is not None
    return _binding(row)


def history(conn: psycopg.Connection[Any], scope: Scope, *, device_id: int = 0,
            patient_id: int = 0, limit: int = 1000) -> list[Binding]:
    """Bindings of a device, or of a patient, newest first."""
    _no_vendor(scope)
    if bool(device_id) == bool(patient_id):
        raise RegistryError("name a device or a patient")
    if device_id:
        get(conn, device_id, scope)
        where, param = "device_id = %s", device_id
    else:
        _patient_path(conn, patient_id, scope)
        where, param = "patient_id = %s", patient_id
    rows = conn.execute((_SELECT + f" WHERE {where} ORDER BY bound_at DESC, id DESC LIMIT %s"
                         ).encode(), (param, limit)).fetchall()
    return [_binding(r) for r in rows]


def _lock_device(conn: psycopg.Connection[Any], device_id: int, scope: Scope,
                 need_active: bool = True) -> Device:
    """The device in scope, locked against concurrent binding and state changes."""
    conn.execute("SELECT 1 FROM devices WHERE id = %s FOR UPDATE", (device_id,))
    device = get(conn, device_id, scope)
    if need_active and device.state != "active":
        raise RegistryError(f"device {device_id} is {device.state}: only an active device "
                            "is bound or transferred", PRECONDITION)
    return device


def _open(conn: psycopg.Connection[Any], device: Device, target: Target, actor: str,
          reason: str) -> Binding:
    try:
        row = conn.execute(
            "INSERT INTO device_bindings (device_id, tenant_id, patient_id, bed, episode, "
            "bound_by, reason) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (device.id, device.home, target.patient_id, target.bed or None,
             target.episode or None, actor, reason or None)).fetchone()
    except psycopg.errors.UniqueViolation:
        raise RegistryError(f"device {device.id} was bound meanwhile", PRECONDITION) from None
    assert row is not None
    found = conn.execute(_SELECT + " WHERE id = %s", (row[0],)).fetchone()
    assert found is not None
    return _binding(found)


def _close(conn: psycopg.Connection[Any], binding_id: int, actor: str, kind: str,
           reason: str) -> None:
    conn.execute("UPDATE device_bindings SET unbound_at = now(), unbound_by = %s, "
                 "end_kind = %s, end_reason = %s WHERE id = %s",
                 (actor, kind, reason or None, binding_id))
