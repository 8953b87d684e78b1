"""Devices: register one, read, search (by code, UDI, serial number), list
with paging, and change what may change (department, location, gateway,
codes, asset data).

Tenancy: a device belongs to a hospital (``tenant_id``, the tenant its frames
carry) and may sit in one of its departments (``department_id``); moving it
between wards does not change what the device sends. Its *home* is the
department, or else the hospital. A ``Scope`` is what a caller may see: the
devices whose home is in the subtree of ``tenant_id`` and, for a vendor, of
its own models. Anything outside the scope is answered as not found, never
with its data.

Every field goes through ``registry.fields`` and ``registry.checks``, the same
checks a CSV import makes. Errors are ``RegistryError`` (see its codes).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import psycopg

from rmiot.registry.assets import ASSET_COLUMNS, AssetData
from rmiot.registry.checks import Checker
from rmiot.registry.fields import CODE_KINDS, DeviceSpec, FieldError, check_asset, parse_update
from rmiot.registry.lifecycle import set_actor
from rmiot.registry.store import EXISTS, NOT_FOUND, PRECONDITION, RegistryError

# The columns a registration writes, in the order both register() and the
# importer's staging table use.
INSERT_COLUMNS = ("id", "tenant_id", "department_id", "model_id", "udi", "serial_no", "state",
                  "auth_required", "location", "gateway_id", *ASSET_COLUMNS, "registered_by")

_SELECT = """
SELECT d.id, d.tenant_id, d.department_id, d.model_id, m.vendor_id, v.code, d.udi,
       d.serial_no, d.state,
       coalesce((SELECT jsonb_object_agg(c.kind, c.code) FROM device_codes c
                  WHERE c.device_id = d.id), '{}'),
       d.location, d.gateway_id, d.auth_required, """ + ", ".join(
    f"d.{c}" for c in ASSET_COLUMNS) + """, coalesce(d.registered_by, ''),
       (extract(epoch FROM d.created_at) * 1000000)::bigint,
       (extract(epoch FROM d.updated_at) * 1000000)::bigint
  FROM devices d
  LEFT JOIN device_models m ON m.id = d.model_id
  LEFT JOIN vendors v ON v.id = m.vendor_id
"""
_IN_SUBTREE = ("coalesce(d.department_id, d.tenant_id) IN "
               "(SELECT id FROM tenants WHERE path @> ARRAY[%s]::integer[])")
MAX_PAGE = 1000


@dataclass(frozen=True)
class Scope:
    """What a caller may see: devices homed under ``tenant_id`` (None: all) and,
    when ``vendor_id`` is set, only that vendor's."""

    tenant_id: int | None = None
    vendor_id: int | None = None


EVERYTHING = Scope()


@dataclass(frozen=True)
class Device:
    id: int
    tenant_id: int
    department_id: int | None
    model_id: int | None
    vendor_id: int | None
    vendor_code: str
    udi: str | None
    serial_no: str | None
    state: str
    codes: dict[str, str]
    location: str | None
    gateway_id: int | None
    auth_required: bool | None
    asset: AssetData
    registered_by: str
    created_at_us: int
    updated_at_us: int

    @property
    def home(self) -> int:
        return self.department_id or self.tenant_id


def _device(row: tuple[Any, ...]) -> Device:
    n = len(ASSET_COLUMNS)
    asset = AssetData(*row[13:13 + n])
    return Device(int(row[0]), int(row[1]), row[2], row[3], row[4], row[5] or "", row[6],
                  row[7], row[8], dict(row[9]), row[10], row[11], row[12], asset,
                  row[13 + n], int(row[14 + n]), int(row[15 + n]))


def _scoped(scope: Scope) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if scope.tenant_id is not None:
        where.append(_IN_SUBTREE)
        params.append(scope.tenant_id)
    if scope.vendor_id is not None:
        where.append("m.vendor_id = %s")
        params.append(scope.vendor_id)
    return where, params


def refusal(errors: list[FieldError]) -> RegistryError:
    """One error for a device's field errors: every reason, the first one's code."""
    message = "; ".join(f"{e.column}: {e.reason}" for e in errors)
    return RegistryError(message, errors[0].code)


# -- register --------------------------------------------------------------------

def register(conn: psycopg.Connection[Any], spec: DeviceSpec, actor: str,
             scope: Scope = EVERYTHING) -> Device:
    """Register one device (checked exactly as an imported one); returns it.
    ``scope``: the caller's; the device must land in it."""
    if scope.vendor_id is not None and spec.auth_required is False:
        raise RegistryError("auth_required: a vendor may require HMAC, never waive it")
    checker = Checker(conn, scope.vendor_id, scope.tenant_id)
    [(checked, errors)] = checker.check([spec])
    if errors or checked is None:
        raise refusal(errors)
    values: dict[str, Any] = {
        "tenant_id": checked.hospital, "department_id": checked.department,
        "model_id": checked.model.id, "udi": spec.udi, "serial_no": spec.serial_no,
        "state": spec.state, "auth_required": spec.auth_required, "location": spec.location,
        "gateway_id": spec.gateway_id, **{c: spec.asset.get(c) for c in ASSET_COLUMNS},
        "registered_by": actor}
    try:
        with conn.transaction():
            row = conn.execute("SELECT nextval('device_id_seq')").fetchone()
            assert row is not None
            values["id"] = device_id = int(row[0])
            set_actor(conn, actor, "registered")
            conn.execute(f"INSERT INTO devices ({', '.join(INSERT_COLUMNS)}) VALUES "
                         f"({', '.join(['%s'] * len(INSERT_COLUMNS))})".encode(),
                         [values[c] for c in INSERT_COLUMNS])
            for kind, code in spec.codes.items():
                conn.execute("INSERT INTO device_codes (code, tenant_id, kind, device_id) "
                             "VALUES (%s, %s, %s, %s)", (code, checked.hospital, kind, device_id))
    except psycopg.errors.UniqueViolation as exc:
        # Taken between the check and the insert, by a concurrent registration.
        raise RegistryError(f"already registered: {_constraint_subject(exc)}", EXISTS) from None
    except psycopg.errors.CheckViolation as exc:  # the tenant's device quota (0009)
        raise RegistryError(exc.diag.message_primary or str(exc), PRECONDITION) from None
    return get(conn, device_id, EVERYTHING)


def _constraint_subject(exc: psycopg.errors.UniqueViolation) -> str:
    name = exc.diag.constraint_name or ""
    return {"devices_tenant_udi": "the UDI", "devices_tenant_serial": "the serial number",
            "device_codes_pkey": "a code"}.get(name, name or "a unique value")


# -- read ----------------------------------------------------------------------------

def get(conn: psycopg.Connection[Any], device_id: int, scope: Scope) -> Device:
    where, params = _scoped(scope)
    row = conn.execute((_SELECT + " WHERE " + " AND ".join(["d.id = %s", *where])).encode(),
                       [device_id, *params]).fetchone()
    if row is None:
        raise RegistryError(f"device {device_id} does not exist", NOT_FOUND)
    return _device(row)


def find(conn: psycopg.Connection[Any], scope: Scope, *, code: str = "", udi: str = "",
         serial: str = "", kind: str = "") -> list[Device]:
    """Devices in scope with this code (of any kind, or ``kind``), UDI or serial
    number (every criterion given must match)."""
    if not (code or udi or serial):
        raise RegistryError("search by code, UDI or serial number")
    if kind and kind not in CODE_KINDS:
        raise RegistryError(f"kind must be one of {', '.join(CODE_KINDS)}")
    where, params = _scoped(scope)
    hospitals = _hospitals_near(conn, scope.tenant_id)
    if code:
        where.append("d.id IN (SELECT device_id FROM device_codes WHERE code = %s"
                     + (" AND kind = %s" if kind else "")
                     + (" AND tenant_id = ANY(%s))" if hospitals is not None else ")"))
        params += [code, *([kind] if kind else []),
                   *([hospitals] if hospitals is not None else [])]
    for column, value in (("udi", udi), ("serial_no", serial)):
        if value:
            where.append(f"d.{column} = %s")
            params.append(value)
    if hospitals is not None:
        where.append("d.tenant_id = ANY(%s)")  # the index on (tenant_id, udi / serial_no)
        params.append(hospitals)
    rows = conn.execute((_SELECT + " WHERE " + " AND ".join(where) + " ORDER BY d.id LIMIT %s"
                         ).encode(), [*params, MAX_PAGE]).fetchall()
    return [_device(r) for r in rows]


def find_by_code(conn: psycopg.Connection[Any], tenant: int, code: str, kind: str = "",
                 vendor_id: int | None = None) -> Device | None:
    """The device under ``tenant`` carrying ``code`` (an RFID, barcode or QR
    code; ``kind`` narrows it), or None. Two devices carrying it as codes of
    different kinds: an error naming them (ask with ``kind``)."""
    found = find(conn, Scope(tenant, vendor_id), code=code, kind=kind)
    if len(found) > 1:
        owners = ", ".join(f"device {d.id} ({k})" for d in found
                           for k, c in d.codes.items() if c == code)
        raise RegistryError(f"code {code} is carried by {owners}: name its kind")
    return found[0] if found else None


def list_devices(conn: psycopg.Connection[Any], scope: Scope, *, state: str = "",
                 model_id: int = 0, gateway_id: int = 0, due_before: dt.date | None = None,
                 after_id: int = 0, limit: int = 100) -> list[Device]:
    """Devices in scope by id, after ``after_id`` (keyset paging). ``due_before``:
    those whose calibration or inspection falls due before that day."""
    where, params = _scoped(scope)
    where.append("d.id > %s")
    params.append(after_id)
    for column, value in (("d.state", state), ("d.model_id", model_id),
                          ("d.gateway_id", gateway_id)):
        if value:
            where.append(f"{column} = %s")
            params.append(value)
    if due_before is not None:
        where.append("(d.calibration_due < %s OR d.inspection_due < %s)")
        params += [due_before, due_before]
    limit = max(1, min(limit, MAX_PAGE))
    rows = conn.execute((_SELECT + " WHERE " + " AND ".join(where)
                         + " ORDER BY d.id LIMIT %s").encode(), [*params, limit]).fetchall()
    return [_device(r) for r in rows]


def _hospitals_near(conn: psycopg.Connection[Any], tenant: int | None) -> list[int] | None:
    """The hospitals a scope's devices can belong to: those in the tenant's
    subtree and the one above it (a department's). None: no limit."""
    if tenant is None:
        return None
    rows = conn.execute("SELECT id FROM tenants WHERE level = 'hospital' AND (path @> "
                        "ARRAY[%s]::integer[] OR id = ANY((SELECT path FROM tenants "
                        "WHERE id = %s)::integer[]))", (tenant, tenant)).fetchall()
    return [int(r[0]) for r in rows]


# -- update --------------------------------------------------------------------------

def update(conn: psycopg.Connection[Any], device_id: int, changes: Mapping[str, str],
           actor: str, scope: Scope = EVERYTHING) -> Device:
    """Change the fields named in ``changes`` (``registry.fields.UPDATABLE``;
    an empty value clears one); returns the device as it now is."""
    parsed, errors = parse_update(changes)
    if errors:
        raise refusal(errors)
    if scope.vendor_id is not None and "auth_required" in parsed \
            and parsed["auth_required"] is not True:
        raise RegistryError("auth_required: a vendor may require HMAC, never waive it")
    with conn.transaction():
        device = get(conn, device_id, scope)
        conn.execute("SELECT 1 FROM devices WHERE id = %s FOR UPDATE", (device_id,))
        if device.state == "scrapped":
            raise RegistryError(f"device {device_id} is scrapped: its record is closed",
                                PRECONDITION)
        checker = Checker(conn, scope.vendor_id, scope.tenant_id)
        columns = _changed_columns(conn, checker, device, parsed, scope)
        codes = {k: parsed[k] for k in CODE_KINDS if k in parsed}
        _change_codes(conn, checker, device, codes)
        if columns or codes:
            set_actor(conn, actor, "updated")
            assignments = "".join(f"{c} = %s, " for c in columns)
            conn.execute(f"UPDATE devices SET {assignments}updated_at = now() "
                         "WHERE id = %s".encode(), [*columns.values(), device_id])
    return get(conn, device_id, EVERYTHING)


def _changed_columns(conn: psycopg.Connection[Any], checker: Checker, device: Device,
                     parsed: dict[str, Any], scope: Scope) -> dict[str, Any]:
    columns: dict[str, Any] = {}
    if "department" in parsed:
        hospital_ref = str(device.tenant_id)
        checker.load_tenants([hospital_ref, parsed["department"] or ""])
        hospital = checker.tenants[hospital_ref]
        department, error = checker.department(parsed["department"] or "", hospital)
        if error:
            raise refusal([error])
        home = department or device.tenant_id
        if scope.tenant_id is not None and home != scope.tenant_id and not _under(
                conn, home, scope.tenant_id):
            raise RegistryError("department: the device would leave the tenant you act for")
        columns["department_id"] = department
    if "gateway" in parsed:
        gateway = parsed["gateway"]
        if gateway is not None:
            checker.load_gateways([gateway])
            errors = checker.gateway_errors(gateway, device.tenant_id, device.id)
            if not errors and _gateway_loop(conn, gateway, device.id):
                errors = [FieldError("gateway", f"device {device.id} is already upstream of "
                                                f"gateway {gateway}")]
            if errors:
                raise refusal(errors)
        columns["gateway_id"] = gateway
    for column in ("location", "auth_required"):
        if column in parsed:
            columns[column] = parsed[column]
    asset_changes = {c: parsed[c] for c in ASSET_COLUMNS if c in parsed}
    if asset_changes:
        merged = replace(device.asset, **asset_changes)
        errors = check_asset(merged.__dict__)
        if errors:
            raise refusal(errors)
        columns.update(asset_changes)
    return columns


def _under(conn: psycopg.Connection[Any], node: int, ancestor: int) -> bool:
    row = conn.execute("SELECT %s = ANY(path) FROM tenants WHERE id = %s",
                       (ancestor, node)).fetchone()
    return bool(row and row[0])


def _gateway_loop(conn: psycopg.Connection[Any], gateway: int, device: int) -> bool:
    """Would ``device`` behind ``gateway`` make a loop (the device is upstream of it)?"""
    row = conn.execute(
        "WITH RECURSIVE up (id) AS (SELECT %s::bigint UNION SELECT d.gateway_id FROM devices d "
        "JOIN up ON d.id = up.id WHERE d.gateway_id IS NOT NULL) "
        "SELECT EXISTS (SELECT FROM up WHERE id = %s)", (gateway, device)).fetchone()
    return bool(row and row[0])


def _change_codes(conn: psycopg.Connection[Any], checker: Checker, device: Device,
                  codes: dict[str, str | None]) -> None:
    wanted = [(device.tenant_id, code, kind) for kind, code in codes.items() if code]
    if wanted:
        checker.note_taken_codes(wanted)
    for hospital, code, kind in wanted:
        holder = checker.taken.get((kind, hospital, code))
        if holder is not None and holder != device.id:
            raise RegistryError(f"{kind}: {kind} code {code} is already registered in "
                                f"hospital {hospital} (device {holder})", EXISTS)
    try:
        for kind, new_code in codes.items():
            conn.execute("DELETE FROM device_codes WHERE device_id = %s AND kind = %s",
                         (device.id, kind))
            if new_code:
                conn.execute("INSERT INTO device_codes (code, tenant_id, kind, device_id) "
                             "VALUES (%s, %s, %s, %s)",
                             (new_code, device.tenant_id, kind, device.id))
    except psycopg.errors.UniqueViolation:
        raise RegistryError("a code was taken meanwhile by another device", EXISTS) from None
