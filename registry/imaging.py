"""Imaging equipment (CT, MR, DR…) as devices with a DICOM address.

``set_dicom_address`` records a device's AE title, host and port in its attrs
(``{"dicom": {...}}``), where the ingest side's C-ECHO poller
(``ingest.dicom_echo``) finds it; ``None`` removes it. An AE title is 1–16
printable ASCII characters without a backslash (DICOM PS3.5, AE value
representation), leading and trailing spaces not significant.
"""

from __future__ import annotations

from typing import Any

import orjson
import psycopg

from rmiot.registry.devices import EVERYTHING, Scope, get
from rmiot.registry.store import RegistryError


def check_ae_title(title: str) -> str:
    value = title.strip()
    if not 1 <= len(value) <= 16 or not value.isascii() or not value.isprintable() \
            or "\\" in value:
        raise RegistryError(f"AE title {title!r}: 1-16 printable ASCII characters, no backslash")
    return value


def set_dicom_address(conn: psycopg.Connection[Any], device_id: int, ae_title: str | None,
                      host: str = "", port: int = 104, scope: Scope = EVERYTHING) -> None:
    """Give the device (in ``scope``) a DICOM address, or take it away (None)."""
    get(conn, device_id, scope)
    if ae_title is None:
        conn.execute("UPDATE devices SET attrs = attrs - 'dicom', updated_at = now() "
                     "WHERE id = %s", (device_id,))
        return
    if not host or not 1 <= port <= 65535:
        raise RegistryError("a DICOM address needs a host and a port 1-65535")
    address = {"ae_title": check_ae_title(ae_title), "host": host, "port": port}
    conn.execute("UPDATE devices SET attrs = jsonb_set(attrs, '{dicom}', %s::jsonb), "
                 "updated_at = now() WHERE id = %s", (orjson.dumps(address).decode(), device_id))
