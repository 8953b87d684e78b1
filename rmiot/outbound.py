"""Hospital systems (HIS, EMR) subscribed to alarms and observations of their
patients: HL7 v2 ORU^R01 over MLLP (channel kind ``hl7``) or FHIR R4 over HTTP
(``fhir``), through the alarm outbox (``alarm_deliveries``, migration 0018).
A root module: it joins the alarm notifier (ingest) with the FHIR resources
(query).

``Outbound.send`` is the notifier's sender for those channels: it builds the
message when the delivery is attempted — an alarm event's from the alarm, an
observation batch's from the frames queued in the row — so no patient
identifier is ever stored in the outbox, and a resend carries the same
control id / identifiers. Receipts:

- hl7 (``mllp://host:port``, ``mllps://`` for TLS): the peer's ACK with MSA-1
  ``AA`` or ``CA`` is the receipt; ``AE``/``AR``/``CE``/``CR``, no ACK within
  ``TIMEOUT_S`` or a lost connection is a failure, retried with the channel's
  backoff, then dead-lettered. One connection per target, kept open, one
  message at a time on it (original mode).
- fhir (the base URL): any 2xx.

Who is named: PID-3 / the FHIR subject carry the hospital's own identifier of
the patient (from the sealed identity) only when the channel's tenant is in
the patient's own hospital; otherwise — a district's or the region's system,
or another hospital's — only the pseudonym. Every message sent is appended
to the audit chain with the patient's pseudonym (``outbound.hl7`` /
``outbound.fhir``, outcome ``ok`` or ``failed``).

``ObservationForwarder`` is the periodic job behind subscriptions: for each
enabled subscription it takes the bindings of patients of its subtree, and
queues each bound device's stored frames after the binding's cursor (in the
binding's period, from the subscription's start, up to ``settle_s`` ago) as
batches of ``max_frames``; a batch row and the cursor's move commit together.
It reads telemetry through its (device_id, ts, seq) index; the ingest path is
not involved. Frames stored later than ``settle_s`` after their measurement
time, behind a cursor that has passed them, are not forwarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import psycopg

from rmiot.ingest.alarm_writer import AuditSink
from rmiot.ingest.hl7 import outbound as hl7_out
from rmiot.ingest.hl7.mllp import END, START, frame
from rmiot.periodic import PeriodicJob
from rmiot.query.fhir import outbound as fhir_out
from rmiot.security.audit import AuditRecord, AuditUnavailable
from rmiot.security.patient_keys import PatientKeys, open_identity
from rmiot.security.sm4 import Keyring, SealError

log = logging.getLogger("rmiot.outbound")

AsyncConn = psycopg.AsyncConnection[Any]
TIMEOUT_S = 10.0
ACCEPTED = ("AA", "CA")
Frames = list[tuple[int, int, list[int], list[float]]]

_ALARM_SQL = b"""
SELECT e.id, e.alarm_id, e.kind, e.state, e.severity, a.rule_code, a.message, a.device_id,
       a.onset_at, e.at, (r.params ->> 'metric')::integer, a.value,
       rmiot_alarm_patient(a.id)
  FROM alarm_events e JOIN alarms a ON a.id = e.alarm_id
  JOIN alarm_rules r ON r.id = a.rule_id
 WHERE e.id = %s
"""
# The patient's pseudonym, sealed identity, and whether the channel's tenant is
# in the patient's own hospital.
_PATIENT_SQL = b"""
WITH hospital_of AS (
    SELECT t.id, (SELECT h.id FROM tenants h WHERE h.id = ANY (t.path)
                   AND h.level = 'hospital') AS hospital FROM tenants t)
SELECT p.pseudonym, p.identity_enc,
       coalesce((SELECT hospital FROM hospital_of WHERE id = p.tenant_id)
                = (SELECT hospital FROM hospital_of WHERE id = %s), false)
  FROM patients p WHERE p.id = %s
"""


@dataclass(frozen=True, slots=True)
class Who:
    patient_id: int
    pseudonym: str
    hospital_id: str | None   # the hospital's own identifier: same hospital only


class MllpPeer:
    """One kept connection to a hospital system's MLLP listener."""

    def __init__(self, target: str, tls: ssl.SSLContext | None) -> None:
        url = urlsplit(target)
        if url.scheme not in ("mllp", "mllps") or not url.hostname or not url.port:
            raise ValueError(f"not an MLLP target: {target!r}")
        self.host, self.port = url.hostname, url.port
        self.tls = (tls or ssl.create_default_context()) if url.scheme == "mllps" else None
        self.lock = asyncio.Lock()
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def call(self, message: bytes, timeout: float) -> bytes:
        """Send one message, return the ACK between the frame marks."""
        async with self.lock:
            try:
                async with asyncio.timeout(timeout):
                    if self._streams is None:
                        self._streams = await asyncio.open_connection(
                            self.host, self.port, ssl=self.tls)
                    reader, writer = self._streams
                    writer.write(frame(message))
                    await writer.drain()
                    data = await reader.readuntil(END)
            except BaseException:
                await self.close()  # the stream's state is unknown
                raise
            return data[data.find(START) + 1:-len(END)]

    async def close(self) -> None:
        streams, self._streams = self._streams, None
        if streams is not None:
            streams[1].close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await streams[1].wait_closed()


class Outbound:
    """The notifier's sender for hl7 and fhir channels, and the observation job."""

    def __init__(self, dsn: str, keyring: Keyring, audit: AuditSink | None,
                 tls: ssl.SSLContext | None = None, period_s: float = 5.0,
                 settle_s: float = 10.0, timeout_s: float = TIMEOUT_S) -> None:
        self.keys = PatientKeys(keyring)
        self.audit = audit
        self.tls = tls
        self.timeout_s = timeout_s
        self.forwarder = ObservationForwarder(dsn, period_s, settle_s)
        self._http: aiohttp.ClientSession | None = None
        self._peers: dict[str, MllpPeer] = {}

    async def start(self) -> None:
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        await self.forwarder.start()

    async def stop(self) -> None:
        await self.forwarder.stop()
        for peer in self._peers.values():
            await peer.close()
        self._peers.clear()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def send(self, conn: AsyncConn, delivery: int, event_id: int | None,
                   channel_id: int, kind: str, target: str, tenant: int
                   ) -> tuple[bool, int | None, str | None]:
        if event_id is not None:
            cur = await conn.execute(_ALARM_SQL, (event_id,))
            row = await cur.fetchone()
            assert row is not None
            facts = hl7_out.AlarmFacts(*row[:12])
            patient, device = row[12], facts.device_id
            frames: Frames = []
            if patient is None:  # unbound since the delivery was made: nobody to tell
                return False, None, "the alarm has no patient"
        else:
            cur = await conn.execute(
                b"SELECT patient_id, device_id, payload FROM alarm_deliveries WHERE id = %s",
                (delivery,))
            got = await cur.fetchone()
            assert got is not None
            patient, device, frames = got[0], got[1], orjson.loads(got[2])
        who = await self._who(conn, patient, tenant)
        facility = await _tenant_code(conn, tenant)
        try:
            if kind == "hl7":
                body = (hl7_out.alarm_segments(facts) if event_id is not None
                        else hl7_out.observation_segments(device, frames))
                result = await self._send_hl7(target, f"RMIOT-D{delivery}", facility, who, body)
            elif kind == "fhir":
                subject = fhir_out.subject(who.hospital_id, who.pseudonym)
                if event_id is not None:
                    resource = fhir_out.communication(
                        event_id=facts.event_id, alarm_id=facts.alarm_id, event=facts.event,
                        state=facts.state, severity=facts.severity,
                        rule_code=facts.rule_code, message=facts.message,
                        device_id=facts.device_id, onset_at=facts.onset_at, at=facts.at,
                        metric=facts.metric, value=facts.value, who=subject)
                    url = target.rstrip("/") + "/Communication"
                    condition = f"identifier={fhir_out.ALARM_EVENT}|{event_id}"
                else:
                    resource = fhir_out.observation_bundle(device, frames, subject)
                    url, condition = target.rstrip("/"), ""
                result = await self._send_fhir(url, resource, condition)
            else:
                result = False, None, f"channel kind {kind!r} does not carry observations"
        except (aiohttp.ClientError, TimeoutError, OSError, ssl.SSLError, ValueError) as exc:
            result = False, None, f"{type(exc).__name__}: {exc}"[:500]
        self._audited(kind, who, tenant, channel_id, delivery, event_id, device, result)
        return result

    async def _who(self, conn: AsyncConn, patient: int, tenant: int) -> Who:
        cur = await conn.execute(_PATIENT_SQL, (tenant, patient))
        row = await cur.fetchone()
        assert row is not None
        pseudonym, sealed, same_hospital = row
        hospital_id = None
        if same_hospital:
            try:
                hospital_id = open_identity(self.keys, patient, bytes(sealed)).id_card
            except SealError:  # shredded: the pseudonym is all there is
                hospital_id = None
        return Who(patient, pseudonym, hospital_id)

    async def _send_hl7(self, target: str, control: str, facility: str, who: Who,
                        body: list[str]) -> tuple[bool, int | None, str | None]:
        message = hl7_out.message(control, facility, hl7_out.pid(who.hospital_id, who.pseudonym),
                                  body, dt.datetime.now(dt.UTC))
        peer = self._peers.get(target)
        if peer is None:
            peer = self._peers[target] = MllpPeer(target, self.tls)
        code, why = hl7_out.ack_code(await peer.call(message, self.timeout_s), control)
        if code in ACCEPTED:
            return True, None, None
        return False, None, f"ACK {code or '?'}: {why}"[:500]

    async def _send_fhir(self, url: str, resource: dict[str, Any], condition: str
                         ) -> tuple[bool, int | None, str | None]:
        assert self._http is not None
        headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
        if condition:
            headers["If-None-Exist"] = condition
        async with self._http.post(url, data=orjson.dumps(resource), headers=headers) as reply:
            ok = 200 <= reply.status < 300
            return ok, reply.status, None if ok else f"HTTP {reply.status}"

    def _audited(self, kind: str, who: Who, tenant: int, channel: int, delivery: int,
                 event_id: int | None, device: int,
                 result: tuple[bool, int | None, str | None]) -> None:
        if self.audit is None:
            return
        detail: dict[str, Any] = {"delivery": delivery, "device": device,
                                  "identified": who.hospital_id is not None}
        if event_id is not None:
            detail["event"] = event_id
        if result[2]:
            detail["error"] = result[2]
        try:
            self.audit.append(AuditRecord(
                actor="system:outbound", role=None, tenant_id=tenant, method=f"outbound.{kind}",
                object=f"channel:{channel}", outcome="ok" if result[0] else "failed",
                source=None, request_id="", detail=detail, patient=who.pseudonym))
        except AuditUnavailable as exc:
            log.error("outbound message not audited", extra={"delivery": delivery,
                                                             "error": str(exc)})


async def _tenant_code(conn: AsyncConn, tenant: int) -> str:
    cur = await conn.execute(b"SELECT code FROM tenants WHERE id = %s", (tenant,))
    row = await cur.fetchone()
    return str(row[0]) if row else ""


_BINDINGS_SQL = b"""
SELECT b.id, b.device_id, b.patient_id, greatest(b.bound_at, s.start_at), b.unbound_at,
       c.ts, c.seq
  FROM outbound_subscriptions s
  JOIN device_bindings b ON b.patient_id IS NOT NULL
   AND (b.unbound_at IS NULL OR b.unbound_at > s.start_at)
  JOIN patients p ON p.id = b.patient_id
  JOIN tenants t ON t.id = p.tenant_id AND s.tenant_id = ANY (t.path)
  LEFT JOIN outbound_cursors c ON c.subscription_id = s.id AND c.binding_id = b.id
 WHERE s.id = %s AND c.done IS NOT TRUE
 ORDER BY b.id
"""
_FRAMES_SQL = b"""
SELECT ts, seq, metrics, vals FROM telemetry
 WHERE device_id = %s AND ts >= %s AND ts < %s AND (ts > %s OR seq > %s)
 ORDER BY ts, seq LIMIT %s
"""
_NEVER = -(2 ** 63)


class ObservationForwarder(PeriodicJob):
    name = "outbound-observations"

    def __init__(self, dsn: str, period_s: float, settle_s: float) -> None:
        super().__init__(period_s)
        self.dsn = dsn
        self.settle_s = settle_s

    async def tick(self) -> None:
        await self.run()

    async def run(self, now: float | None = None) -> int:
        """One pass over every subscription; returns how many batches it queued."""
        until = dt.datetime.fromtimestamp((now or time.time()) - self.settle_s, dt.UTC)
        queued = 0
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            cur = await conn.execute(
                b"SELECT s.id FROM outbound_subscriptions s JOIN alarm_channels c "
                b"ON c.id = s.channel_id WHERE s.enabled AND c.enabled ORDER BY s.id")
            for (subscription,) in await cur.fetchall():
                queued += await self._subscription(conn, subscription, until)
        return queued

    async def _subscription(self, conn: AsyncConn, subscription: int,
                            until: dt.datetime) -> int:
        queued = 0
        async with conn.transaction():
            cur = await conn.execute(
                b"SELECT channel_id, metrics, max_frames FROM outbound_subscriptions "
                b"WHERE id = %s AND enabled FOR UPDATE SKIP LOCKED", (subscription,))
            row = await cur.fetchone()
            if row is None:  # another host has it
                return 0
            channel, metrics, size = row[0], set(row[1]), row[2]
            cur = await conn.execute(_BINDINGS_SQL, (subscription,))
            for binding, device, patient, start, end, at, seq in await cur.fetchall():
                at, seq = (at, seq) if at is not None else (start, _NEVER)
                upper = min(end, until) if end is not None else until
                while True:
                    got = await conn.execute(_FRAMES_SQL, (device, max(at, start), upper, at,
                                                           seq, size))
                    rows = await got.fetchall()
                    frames = [(_us(ts), s, *_wanted(m, v, metrics)) for ts, s, m, v in rows]
                    frames = [f for f in frames if f[2]]
                    if rows:
                        at, seq = rows[-1][0], rows[-1][1]
                    done = len(rows) < size and end is not None and end <= until
                    if frames:
                        await conn.execute(
                            b"INSERT INTO alarm_deliveries (event_id, channel_id, "
                            b"subscription_id, patient_id, device_id, frames, payload) "
                            b"VALUES (NULL, %s, %s, %s, %s, %s, %s)",
                            (channel, subscription, patient, device, len(frames),
                             orjson.dumps(frames)))
                        queued += 1
                    if rows or done:
                        await conn.execute(
                            b"INSERT INTO outbound_cursors (subscription_id, binding_id, ts, "
                            b"seq, done) VALUES (%s, %s, %s, %s, %s) ON CONFLICT "
                            b"(subscription_id, binding_id) DO UPDATE SET ts = excluded.ts, "
                            b"seq = excluded.seq, done = excluded.done",
                            (subscription, binding, at, seq, done))
                    if len(rows) < size:
                        break
            if queued:
                await conn.execute(b"SELECT pg_notify('rmiot_alarm_deliveries', '')")
        return queued


def _us(ts: dt.datetime) -> int:
    return (ts - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)


def _wanted(metrics: list[int], values: list[float], wanted: set[int]
            ) -> tuple[list[int], list[float]]:
    pairs = [(m, v) for m, v in zip(metrics, values, strict=True)
             if (not wanted or m in wanted) and math.isfinite(v)]
    return [m for m, _ in pairs], [v for _, v in pairs]
