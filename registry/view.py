"""DeviceView: what the ingest path knows about every device, in memory.

A lookup is one dict access (no I/O on the hot path). The view loads every
device at start, then LISTENs on ``rmiot_registry`` (migration 0002) and
reloads a device — or, for a tenant change, that tenant's devices — as soon as
the change commits, so a revoked key or a suspended device is refused on the
next frame of every open connection, typically within milliseconds. If the
listening connection drops, the view reconnects and reloads everything (a
change made while it was away is not missed): see ``rmiot.db.ChangeFollower``.

Which devices may send: lifecycle states ``registered``, ``active`` and
``maintenance`` in an enabled tenant. HMAC is required when the device says so,
or else when its tenant's (inherited) ``require_hmac`` setting is true; the
tenant's ``late_window_s`` replaces ``ingest.past_window_s`` for its devices.
Keys are stored sealed (SM4-GCM, bound to the device id) and opened here once
per change. A child device with no key of its own behind a gateway
(``gateway_id``) is verified with the gateway's keys: the gateway signs for the
devices it speaks for, and a change of the gateway reloads its children.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from rmiot.db import ChangeFollower
from rmiot.security.sealed import device_key_aad
from rmiot.security.sm4 import Keyring, SealError

log = logging.getLogger("rmiot.registry.view")

CHANNEL = "rmiot_registry"

_SELECT = """
SELECT d.id, d.tenant_id,
       coalesce(d.auth_required, (rmiot_tenant_setting(t.id, 'require_hmac'))::boolean, false),
       d.state IN ('registered', 'active', 'maintenance') AND t.enabled,
       (rmiot_tenant_setting(t.id, 'late_window_s'))::bigint,
       (rmiot_tenant_setting(t.id, 'points_per_s'))::float8,
       k.owner, k.sealed, k.until, d.gateway_id
  FROM devices d
  JOIN tenants t ON t.id = d.tenant_id
  LEFT JOIN LATERAL (
        SELECT max(k.device_id) AS owner,  -- the device itself, or its gateway
               array_agg(key_enc ORDER BY version DESC) AS sealed,
               array_agg(extract(epoch FROM not_after)::float8 ORDER BY version DESC) AS until
          FROM device_keys k
         WHERE k.revoked_at IS NULL AND k.not_before <= now()
           AND (k.not_after IS NULL OR k.not_after > now())
           -- its own keys; a child device without any signs with its gateway's
           AND k.device_id = CASE WHEN d.gateway_id IS NULL OR EXISTS (
                   SELECT 1 FROM device_keys o WHERE o.device_id = d.id
                      AND o.revoked_at IS NULL AND (o.not_after IS NULL OR o.not_after > now()))
               THEN d.id ELSE d.gateway_id END) k ON true
"""


@dataclass(frozen=True, slots=True)
class DeviceEntry:
    id: int
    tenant_id: int
    auth_required: bool
    may_send: bool
    # The tenant's late-arrival window in microseconds (None: ingest.past_window_s).
    late_window_us: int | None
    # The tenant's ingest quota in points a second (None: ingest.tenant_points_per_s).
    points_per_s: float | None
    # Valid HMAC keys, newest first, each with the end of its validity (Unix
    # seconds; None: until rotated or revoked). Two during a rotation's overlap.
    keys: tuple[tuple[bytes, float | None], ...]
    # The gateway that speaks for the device (its frames may come on the
    # gateway's connection or login), if any.
    gateway_id: int | None = None


class DeviceView(ChangeFollower):
    channels = (CHANNEL,)
    name = "device view"

    def __init__(self, dsn: str, keyring: Keyring) -> None:
        super().__init__(dsn)
        self.keyring = keyring
        self.devices: dict[int, DeviceEntry] = {}
        self.listeners: list[Callable[[int], None]] = []

    def get(self, device_id: int) -> DeviceEntry | None:
        return self.devices.get(device_id)

    def key(self, device_id: int) -> bytes | tuple[bytes, ...] | None:
        """The decoder's key lookup: the device's one key, or during a rotation's
        overlap the keys still valid now (an old key stops at its end of
        validity by the clock, with no notification needed)."""
        entry = self.devices.get(device_id)
        if entry is None or not entry.keys:
            return None
        if len(entry.keys) == 1 and entry.keys[0][1] is None:
            return entry.keys[0][0]
        now = time.time()
        valid = tuple(key for key, until in entry.keys if until is None or until > now)
        return valid if len(valid) > 1 else (valid[0] if valid else None)

    async def load_all(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await self._reload(conn, "", ())

    async def apply(self, conn: psycopg.AsyncConnection[Any],
                    notes: list[psycopg.Notify]) -> None:
        for payload in dict.fromkeys(n.payload for n in notes):  # once each, in order
            kind, _, ident = payload.partition(":")
            if kind == "device":
                # The device, and the children of a gateway (they may sign with its keys).
                await self._reload(conn, " WHERE d.id = %s OR d.gateway_id = %s",
                                   (int(ident), int(ident)), gone=int(ident))
            elif kind == "tenant":  # its settings reach its whole subtree
                await self._reload(conn, " WHERE d.tenant_id IN (SELECT id FROM tenants "
                                   "WHERE %s = ANY(path))", (int(ident),))

    async def _reload(self, conn: psycopg.AsyncConnection[Any], where: str,
                      params: tuple[int, ...], gone: int | None = None) -> None:
        cur = await conn.execute((_SELECT + where).encode(), params)
        rows = await cur.fetchall()
        if not where:
            self.devices = {}
        if gone is not None and all(row[0] != gone for row in rows):
            self.devices.pop(gone, None)
            self._changed(gone)
        for dev_id, tenant_id, auth_required, may_send, late_s, quota, owner, sealed, until, \
                gateway in rows:
            keys = tuple((key, end) for key, end in zip(
                (self._open_key(owner, s) for s in sealed or ()), until or (), strict=True)
                if key is not None)
            self.devices[dev_id] = DeviceEntry(dev_id, tenant_id, auth_required, may_send,
                                               late_s * 1_000_000 if late_s else None, quota,
                                               keys, gateway)
            if where:
                self._changed(dev_id)

    def _open_key(self, device_id: int, sealed: bytes | None) -> bytes | None:
        if sealed is None:
            return None
        try:
            return self.keyring.open(bytes(sealed), device_key_aad(device_id))
        except SealError as exc:
            log.error("device key does not open; the device cannot authenticate",
                      extra={"device": device_id, "error": str(exc)})
            return None

    def _changed(self, device_id: int) -> None:
        for listener in self.listeners:
            listener(device_id)
