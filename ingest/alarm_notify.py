"""Notifier: the alarm outbox's delivery to hospital systems.

``alarm_deliveries`` rows are made by the database with each event, one per
matching channel (migration 0014), so a committed event is never missing from
the outbox. This worker (the platform process runs one; several may share the
table: rows are claimed with SKIP LOCKED under a lease) sends what is due:

- webhook: ``POST`` of the event as JSON, signed: ``X-Rmiot-Signature:
  sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>`` with
  ``X-Rmiot-Timestamp`` (Unix seconds) and ``X-Rmiot-Delivery`` (the delivery
  id: a receiver that saw it already ignores the repeat). Any 2xx is the
  receipt;
- mqtt: a QoS 1 publish of the same JSON to the channel's topic on the
  platform's broker; the broker's PUBACK is the receipt;
- hl7, fhir (hospital systems), and observation batches (rows without an
  event): handed to the ``outbound`` sender (``rmiot.outbound``), which says
  whether the peer took it.

A failure is retried after ``backoff_s * 2^(attempts-1)`` (at most an hour);
after ``max_attempts`` the delivery is ``dead`` (the dead letter: it stays
in the table with its last error for an operator). Receipts (status, time)
are recorded on the row. Woken by NOTIFY ``rmiot_alarm_deliveries``, and once
a second for retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import psycopg

from rmiot.ingest import alarm_store
from rmiot.ingest.alarm_store import Event
from rmiot.security.sealed import alarm_channel_aad as channel_secret_aad
from rmiot.security.sm4 import Keyring

log = logging.getLogger("rmiot.ingest.alarms")

CHANNEL = "rmiot_alarm_deliveries"
LEASE_S = 60.0
TIMEOUT_S = 5.0
MAX_BACKOFF_S = 3600.0
BATCH = 100

Publish = Callable[[str, bytes], Awaitable[None]]
# (connection, delivery id, event id or None, channel id, kind, target, channel's
# tenant) -> (delivered, status, error)
SendOutbound = Callable[[psycopg.AsyncConnection[Any], int, int | None, int, str, str, int],
                        Awaitable[tuple[bool, int | None, str | None]]]


def event_json(event: Event) -> dict[str, Any]:
    return {"id": event.id, "alarm_id": event.alarm_id, "tenant_id": event.tenant_id,
            "at_us": alarm_store.to_us(event.at), "kind": event.kind, "actor": event.actor,
            "severity": event.severity, "state": event.state, "detail": event.detail,
            "device_id": event.device_id, "rule_code": event.rule_code,
            "message": event.message, "raised_us": alarm_store.to_us(event.raised_at)}


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    """The X-Rmiot-Signature value a receiver recomputes."""
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body,
                                hashlib.sha256).hexdigest()


class Notifier:
    def __init__(self, dsn: str, keyring: Keyring, publish: Publish | None = None,
                 clock: Callable[[], float] = time.time, poll_s: float = 1.0,
                 outbound: SendOutbound | None = None) -> None:
        self.dsn = dsn
        self.keyring = keyring
        self.publish = publish  # MQTT: (topic, payload); None: mqtt channels fail
        self.outbound = outbound  # hl7, fhir; None: those channels fail
        self.clock = clock
        self.poll_s = poll_s
        self._db = alarm_store.StandingConnection(dsn)
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S))
        self._task = asyncio.create_task(self._run(), name="alarm-notifier")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._http is not None:
            await self._http.close()
        await self._db.close()

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.dsn,
                                                                 autocommit=True) as listen:
                    await listen.execute(f"LISTEN {CHANNEL}".encode())
                    delay = 0.1
                    while True:
                        while await self.deliver_due() == BATCH:
                            pass
                        async for _ in listen.notifies(timeout=self.poll_s, stop_after=1):
                            pass
            except psycopg.OperationalError as exc:
                log.warning("notifier: database unavailable", extra={"error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def deliver_due(self) -> int:
        """Send every delivery due now, concurrently; returns how many were tried."""
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        conn = await self._db.get()
        cur = await conn.execute(
            b"UPDATE alarm_deliveries SET next_attempt_at = %s WHERE id IN ("
            b"SELECT id FROM alarm_deliveries WHERE state = 'pending' "
            b"AND next_attempt_at <= %s ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) "
            b"RETURNING id, event_id, channel_id, attempts",
            (now + dt.timedelta(seconds=LEASE_S), now, BATCH))
        claimed = await cur.fetchall()
        if not claimed:
            return 0
        results = await asyncio.gather(*(self._attempt(conn, *row) for row in claimed))
        for (delivery, _, _, attempts), (ok, status, error, max_attempts, backoff) in zip(
                claimed, results, strict=True):
            tries = attempts + 1
            done = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
            if ok:
                await conn.execute(
                    b"UPDATE alarm_deliveries SET state = 'delivered', attempts = %s, "
                    b"delivered_at = %s, response_status = %s, last_error = NULL "
                    b"WHERE id = %s", (tries, done, status, delivery))
                continue
            dead = tries >= max_attempts
            wait = min(backoff * 2 ** (tries - 1), MAX_BACKOFF_S)
            await conn.execute(
                b"UPDATE alarm_deliveries SET state = %s, attempts = %s, "
                b"next_attempt_at = %s, response_status = %s, last_error = %s WHERE id = %s",
                ("dead" if dead else "pending", tries, done + dt.timedelta(seconds=wait),
                 status, error, delivery))
            if dead:
                log.error("alarm notification dead-lettered", extra={
                    "delivery": delivery, "attempts": tries, "error": error})
        return len(claimed)

    async def _attempt(self, conn: psycopg.AsyncConnection[Any], delivery: int,
                       event_id: int | None, channel_id: int, attempts: int
                       ) -> tuple[bool, int | None, str | None, int, float]:
        cur = await conn.execute(
            b"SELECT kind, target, secret_enc, max_attempts, backoff_s, enabled, tenant_id "
            b"FROM alarm_channels WHERE id = %s", (channel_id,))
        row = await cur.fetchone()
        assert row is not None
        kind, target, sealed, max_attempts, backoff, enabled, tenant = row
        if not enabled:
            return False, None, "channel disabled", 1, backoff
        if kind in ("hl7", "fhir") or event_id is None:
            if self.outbound is None:
                return False, None, f"no {kind} sender", max_attempts, backoff
            ok, status, error = await self.outbound(conn, delivery, event_id, channel_id, kind,
                                                    target, tenant)
            return ok, status, error, max_attempts, backoff
        events = await alarm_store.events_after(conn, event_id - 1, 1)
        body = orjson.dumps(event_json(events[0]))
        try:
            if kind == "webhook":
                secret = self.keyring.open(bytes(sealed), channel_secret_aad(channel_id))
                stamp = str(int(self.clock()))
                assert self._http is not None
                async with self._http.post(target, data=body, headers={
                        "Content-Type": "application/json", "X-Rmiot-Timestamp": stamp,
                        "X-Rmiot-Delivery": str(delivery),
                        "X-Rmiot-Signature": signature(secret, stamp, body)}) as reply:
                    ok = 200 <= reply.status < 300
                    return ok, reply.status, None if ok else f"HTTP {reply.status}", \
                        max_attempts, backoff
            if self.publish is None:
                return False, None, "no MQTT connection", max_attempts, backoff
            await self.publish(target, body)
            return True, None, None, max_attempts, backoff
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return False, None, f"{type(exc).__name__}: {exc}"[:500], max_attempts, backoff
