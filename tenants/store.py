"""The tenant tree's write side: add nodes (region > district > hospital >
department; departments may nest for wards and campuses).

Each node stores ``path``, the ids from the root down to itself, so "is X in
Y's subtree" is ``Y = ANY(X.path)`` in SQL and a tuple lookup in memory. Every
change is announced on ``rmiot_registry`` ('tenant:<id>', migration 0002).
"""

from __future__ import annotations

from typing import Any

import orjson
import psycopg

LEVELS = ("region", "district", "hospital", "department")
# Which level may sit under which (None: the root).
PARENT_LEVELS = {"region": (None,), "district": ("region",), "hospital": ("region", "district"),
                 "department": ("hospital", "department")}


class TenantError(Exception):
    """A tenant request that cannot be carried out; the message says why."""


def create_tenant(conn: psycopg.Connection[Any], code: str, name: str, level: str,
                  parent_id: int | None = None, settings: dict[str, Any] | None = None,
                  tenant_id: int | None = None) -> int:
    """Add a node to the tenant tree; returns its id."""
    if level not in LEVELS:
        raise TenantError(f"level must be one of {', '.join(LEVELS)}")
    path: list[int] = []
    parent_level = None
    if parent_id is not None:
        row = conn.execute("SELECT path, level FROM tenants WHERE id = %s",
                           (parent_id,)).fetchone()
        if row is None:
            raise TenantError(f"parent tenant {parent_id} does not exist")
        path, parent_level = list(row[0]), row[1]
    if parent_level not in PARENT_LEVELS[level]:
        raise TenantError(f"a {level} cannot sit under "
                          f"{'nothing' if parent_level is None else 'a ' + parent_level}")
    if tenant_id is None:
        got = conn.execute("SELECT nextval('tenant_id_seq')").fetchone()
        assert got is not None
        tenant_id = int(got[0])
    conn.execute("INSERT INTO tenants (id, parent_id, level, code, name, path, settings) "
                 "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                 (tenant_id, parent_id, level, code, name, [*path, tenant_id],
                  orjson.dumps(settings or {}).decode()))
    return tenant_id
