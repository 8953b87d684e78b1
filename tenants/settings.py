"""Per-tenant settings: what each key means, its type and its bounds, and
inheritance down the tree (a key set on a node applies to its subtree unless a
descendant sets it again; SQL: ``rmiot_tenant_setting(id, key)``, migration 0009).

| key | type | meaning | enforced by |
|---|---|---|---|
| require_hmac | bool | devices must sign frames (AUTH_REQUIRED otherwise) | ingest device view |
| late_window_s | int | frames measured longer ago are STALE | ingest device view |
| max_devices | int | devices the tenant may hold (subtree counts separately) | database trigger |
| points_per_s | int | ingest quota: points a second | (planned: ingest limiter) |
| max_connections | int | device connections | (planned: ingest adapters) |
| retention_days | object | days kept per class (telemetry, rollups, alarms, audit) | retention |

Audit retention is at least 180 days (GB/T 22239 level 3).

``enabled`` is a column of its own (a disabled tenant's devices are refused).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
import psycopg

DATA_CLASSES = ("telemetry", "rollups", "alarms", "audit")
_INTS = {"late_window_s": (60, 10 * 365 * 86400), "max_devices": (0, 10**9),
         "points_per_s": (1, 10**9), "max_connections": (0, 10**7)}
KEYS = ("require_hmac", *_INTS, "retention_days")


class SettingsError(ValueError):
    """A setting that cannot be stored; the message names the key."""


def validate(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings checked key by key (unknown keys, wrong types, out of range)."""
    clean: dict[str, Any] = {}
    for key, value in settings.items():
        if key == "require_hmac":
            if not isinstance(value, bool):
                raise SettingsError("require_hmac must be true or false")
        elif key in _INTS:
            low, high = _INTS[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise SettingsError(f"{key} must be a whole number from {low} to {high}")
        elif key == "retention_days":
            if not isinstance(value, dict):
                raise SettingsError("retention_days must map data classes to days")
            for cls, days in value.items():
                if cls not in DATA_CLASSES:
                    raise SettingsError(f"retention_days: unknown data class {cls!r} "
                                        f"(known: {', '.join(DATA_CLASSES)})")
                least = 180 if cls == "audit" else 1
                if isinstance(days, bool) or not isinstance(days, int) or days < least:
                    raise SettingsError(f"retention_days.{cls} must be at least {least}")
        else:
            raise SettingsError(f"unknown tenant setting {key!r} (known: {', '.join(KEYS)})")
        clean[key] = value
    return clean


def update(conn: psycopg.Connection[Any], tenant_id: int, changes: Mapping[str, Any]) -> None:
    """Set (or, with value None, unset) keys on one tenant; validated first."""
    sets = validate({k: v for k, v in changes.items() if v is not None})
    unset = [k for k, v in changes.items() if v is None]
    for key in unset:
        if key not in KEYS:
            raise SettingsError(f"unknown tenant setting {key!r}")
    cur = conn.execute("UPDATE tenants SET settings = (settings - %s::text[]) || %s::jsonb "
                       "WHERE id = %s", (unset, orjson.dumps(sets).decode(), tenant_id))
    if cur.rowcount != 1:
        raise SettingsError(f"tenant {tenant_id} does not exist")


def effective(conn: psycopg.Connection[Any], tenant_id: int) -> dict[str, Any]:
    """Every setting in force for the tenant, inherited ones included."""
    out = {}
    for key in KEYS:
        row = conn.execute("SELECT rmiot_tenant_setting(%s, %s)", (tenant_id, key)).fetchone()
        if row and row[0] is not None:
            out[key] = row[0]
    return out
