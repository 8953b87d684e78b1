"""Vendor approvals: a hospital accepts devices only from vendors its
administrator approved (migration 0007's ``vendor_approvals``).

An approval is given by a hospital (a tenant of level ``hospital``) and covers
its departments. Revoking keeps the row with who and when; devices already
registered stay, new ones of that vendor are refused. Every registration
path (one device, a CSV import, a gRPC batch) asks through
``registry.checks``, which reads ``approved_pairs`` once per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from rmiot.registry.store import NOT_FOUND, RegistryError


@dataclass(frozen=True)
class Approval:
    tenant_id: int
    vendor_id: int
    vendor_code: str
    approved_by: str
    approved_at_us: int
    note: str


def hospital_of(conn: psycopg.Connection[Any], tenant_id: int) -> tuple[int, int | None]:
    """(hospital, department) for a tenant: the hospital itself, or a department's
    hospital and the department. Anything above a hospital holds no devices."""
    row = conn.execute(
        "SELECT t.level, (SELECT h.id FROM tenants h WHERE h.id = ANY(t.path) "
        "AND h.level = 'hospital') FROM tenants t WHERE t.id = %s", (tenant_id,)).fetchone()
    if row is None:
        raise RegistryError(f"tenant {tenant_id} does not exist", NOT_FOUND)
    level, hospital = row
    if hospital is None:
        raise RegistryError(f"tenant {tenant_id} is a {level}: devices belong to a hospital "
                            "or one of its departments")
    return int(hospital), (tenant_id if level == "department" else None)


def approve(conn: psycopg.Connection[Any], tenant_id: int, vendor_id: int, actor: str,
            note: str = "") -> Approval:
    """The hospital ``tenant_id`` approves the vendor (again: no change)."""
    hospital, department = hospital_of(conn, tenant_id)
    if department is not None:
        raise RegistryError(f"tenant {tenant_id} is a department: its hospital "
                            f"({hospital}) approves vendors")
    with conn.transaction():
        conn.execute("INSERT INTO vendor_approvals (tenant_id, vendor_id, approved_by, note) "
                     "VALUES (%s, %s, %s, %s) ON CONFLICT (tenant_id, vendor_id) "
                     "WHERE revoked_at IS NULL DO NOTHING",
                     (hospital, vendor_id, actor, note or None))
    found = current(conn, hospital, vendor_id)
    assert found is not None
    return found


def revoke(conn: psycopg.Connection[Any], tenant_id: int, vendor_id: int, actor: str) -> bool:
    """End the hospital's approval of the vendor; False when there was none."""
    cur = conn.execute("UPDATE vendor_approvals SET revoked_at = now(), revoked_by = %s "
                       "WHERE tenant_id = %s AND vendor_id = %s AND revoked_at IS NULL",
                       (actor, tenant_id, vendor_id))
    return cur.rowcount > 0


def current(conn: psycopg.Connection[Any], hospital: int, vendor_id: int) -> Approval | None:
    rows = approvals(conn, hospital, vendor_id)
    return rows[0] if rows else None


def approvals(conn: psycopg.Connection[Any], hospital: int,
              vendor_id: int | None = None) -> list[Approval]:
    """The hospital's approvals in force, by vendor code."""
    rows = conn.execute(
        "SELECT a.tenant_id, a.vendor_id, v.code, a.approved_by, "
        "(extract(epoch FROM a.approved_at) * 1000000)::bigint, coalesce(a.note, '') "
        "FROM vendor_approvals a JOIN vendors v ON v.id = a.vendor_id "
        "WHERE a.tenant_id = %s AND a.revoked_at IS NULL AND (%s::bigint IS NULL "
        "OR a.vendor_id = %s) ORDER BY v.code", (hospital, vendor_id, vendor_id)).fetchall()
    return [Approval(int(r[0]), int(r[1]), r[2], r[3], int(r[4]), r[5]) for r in rows]


def approved_pairs(conn: psycopg.Connection[Any],
                   hospitals: list[int]) -> set[tuple[int, int]]:
    """(hospital, vendor) pairs in force among these hospitals (for bulk checks)."""
    rows = conn.execute("SELECT tenant_id, vendor_id FROM vendor_approvals "
                        "WHERE tenant_id = ANY(%s) AND revoked_at IS NULL",
                        (hospitals,)).fetchall()
    return {(int(t), int(v)) for t, v in rows}
