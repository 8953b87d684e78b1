"""Device credentials over their life: rotation with an overlap window.

``rotate_key`` gives a device a new HMAC key and lets its older keys live on
for ``overlap_s`` more seconds: the ingest path accepts frames signed with any
key still valid (the decoder tries each), so a fleet can be re-keyed without
losing a frame, and after the window only the new key works. ``revoke_keys``
(registry.store) ends every key at once.
"""

from __future__ import annotations

from typing import Any

import psycopg

from rmiot.registry import store
from rmiot.security.sm4 import Keyring

DEFAULT_OVERLAP_S = 24 * 3600


def rotate_key(conn: psycopg.Connection[Any], keyring: Keyring, device_id: int,
               algorithm: str = "hmac-sha256", overlap_s: int = DEFAULT_OVERLAP_S,
               key: bytes | None = None) -> tuple[int, bytes]:
    """A new key for the device, the old ones valid ``overlap_s`` longer;
    returns (version, key) — the key is shown once."""
    if overlap_s < 0:
        raise store.RegistryError("the overlap window cannot be negative")
    with conn.transaction():
        version, new_key = store.add_key(conn, keyring, device_id, algorithm, key)
        conn.execute(
            "UPDATE device_keys SET not_after = now() + make_interval(secs => %s) "
            "WHERE device_id = %s AND version < %s AND revoked_at IS NULL "
            "AND (not_after IS NULL OR not_after > now() + make_interval(secs => %s))",
            (overlap_s, device_id, version, overlap_s))
    return version, new_key
