"""The HL7 v2 inbound listener: MLLP connections from monitor gateways and the HIS.

For each message (``Hl7Listener.answer``), in this order:

1. parse (``messages.parse``): unreadable, no control id, not v2.x, not P/T → AR;
2. the sender: with ``hl7.tls`` the verified client certificate
   (``cert:<common name>``), else ``mllp:<MSH-4>``; the tenant is the one whose
   code is MSH-4 (or, empty, the certificate's). Authorised like an RPC:
   ORU needs ``ingest:write`` there, ADT ``patient:write`` (both held by the
   ``his_interface`` role, migration 0015; a ``hospital_platform`` sender may
   send ORU but never ADT) — else AR, as for an unknown message type;
3. a control id this process already answered AA for is answered AA again at
   once (a resend after a lost ACK); for ADT the database also knows
   (``hl7_messages``, in the binding transaction), for ORU the frames do;
4. ORU^R01 (``oru``): content checked whole (codes, types, units, times,
   devices) → AE with one ERR per problem and nothing taken; the devices must
   be known, allowed to send, in the sender's tenant subtree, not require HMAC,
   and the times in the ingest window — else AE, nothing taken; then the
   frames go through the ingest pipeline like any device's, and the ACK is AA
   once all are committed (OK or DUPLICATE), else AE naming each refused
   frame (a resend stores only what is missing);
5. ADT A01/A02/A03/A08 (``adt`` → ``registry.adt``): applied whole in one
   transaction or AE;
6. every message is audited (actor the sender, method ``hl7:<type>``, object
   the control id, outcome, the ACK code; ADT with the patient's pseudonym).
   The audit trail fails closed: when it cannot take the record, AE.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import ssl
import time
import zoneinfo
from collections import Counter, OrderedDict
from typing import Any

import psycopg
from cryptography import x509

from rmiot import db
from rmiot.config import Config
from rmiot.core_ext import FLAG_ACK_REQ, Frame, FrameDecoder, encode_frame
from rmiot.ingest.answers import Answer, RequestSession
from rmiot.ingest.hl7 import adt, oru
from rmiot.ingest.hl7.messages import (
    INTERNAL,
    RECORD_LOCKED,
    UNKNOWN_KEY,
    UNSUPPORTED_MESSAGE,
    Header,
    Message,
    MessageError,
    Problem,
    ack,
    parse,
)
from rmiot.ingest.hl7.mllp import MllpConnection
from rmiot.ingest.pipeline import Pipeline
from rmiot.registry import adt as registry_adt
from rmiot.registry.store import NOT_FOUND, RegistryError
from rmiot.security.audit import AuditRecord, AuditUnavailable
from rmiot.security.authz import Authorizer
from rmiot.security.interceptor import AuditSink, certificate_caller
from rmiot.security.patient_keys import PatientKeys
from rmiot.security.patients import pseudonym_key
from rmiot.security.sm4 import Keyring

log = logging.getLogger("rmiot.ingest.hl7")
RECENT_MAX = 100_000
KIND_TELEMETRY = 1
RIGHTS = {"ORU": ("ingest", "write"), "ADT": ("patient", "write")}


class Denied(MessageError):
    """The sender may not send this message (AR, audited as denied)."""


class Hl7Listener:
    def __init__(self, cfg: Config, pipeline: Pipeline, authorizer: Authorizer,
                 audit: AuditSink, keyring: Keyring) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.authorizer = authorizer
        self.audit = audit
        self.dsn = db.app_dsn(cfg)
        self.tz = zoneinfo.ZoneInfo(cfg.hl7.timezone)
        self.patient_keys = PatientKeys(keyring)
        self.pseudo_key = pseudonym_key(cfg.keyring_dir)
        self.session = RequestSession(0)  # the pipeline's acks come back here
        self.recent: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.stats: Counter[str] = Counter()
        self.connections: set[MllpConnection] = set()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self._codes: dict[str, int] = {}
        self._codes_version = -1
        self._codes_lock = asyncio.Lock()
        self._record: list[tuple[str, str, str, int]] = []
        self._recorder: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> int:
        """Listen; returns the port bound."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            self._connection, self.cfg.hl7.host, self.cfg.hl7.port, reuse_port=True,
            backlog=1024, ssl=self._tls())
        self.port = int(self.server.sockets[0].getsockname()[1])
        self._recorder = asyncio.create_task(self._record_loop(), name="hl7-recorder")
        log.info("HL7 MLLP listening", extra={"port": self.port, "tls": self.cfg.hl7.tls})
        return self.port

    def _tls(self) -> ssl.SSLContext | None:
        if not self.cfg.hl7.tls:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH,
                                             cafile=str(self.cfg.tls_path("ca_file")))
        context.load_cert_chain(self.cfg.tls_path("cert_file"), self.cfg.tls_path("key_file"))
        context.verify_mode = ssl.CERT_REQUIRED
        return context

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for conn in list(self.connections):
                if conn.tasks:
                    await asyncio.wait(list(conn.tasks), timeout=self.cfg.hl7.answer_timeout_s)
                if conn.transport is not None:
                    conn.transport.close()
            await self.server.wait_closed()
            self.server = None
        if self._recorder is not None:
            self._recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recorder
            await self._flush_record()
            self._recorder = None

    def _connection(self) -> MllpConnection:
        conn = MllpConnection(self.answer, self._too_large, self.cfg.hl7.max_message_bytes,
                              self.cfg.hl7.max_in_flight, self._closed)
        self.connections.add(conn)
        self.pipeline.register(conn)
        return conn

    def _closed(self, conn: MllpConnection) -> None:
        self.connections.discard(conn)
        self.pipeline.sinks.discard(conn)

    def _too_large(self, head: bytes) -> bytes:
        self.stats["too_large"] += 1
        header = None
        with contextlib.suppress(MessageError):
            header = parse(head.split(b"\r", 1)[0]).header
        return ack(header, "AR", [Problem(INTERNAL, f"message over "
                                          f"{self.cfg.hl7.max_message_bytes} bytes")])

    # -- one message -----------------------------------------------------------------

    async def answer(self, raw: bytes, conn: MllpConnection) -> bytes:
        started = time.monotonic()
        header: Header | None = None
        subject, tenant, patient = "anonymous", None, None
        outcome, code, problems = "ok", "AA", list[Problem]()
        try:
            message = parse(raw)
            header = message.header
            subject, tenant = await self._sender(message, conn)
            problems, patient = await self._handle(message, subject, tenant)
        except MessageError as exc:
            header = exc.header or header
            code, problems = exc.ack_code, exc.problems
            outcome = "denied" if isinstance(exc, Denied) else "invalid"
        except Exception:
            log.exception("HL7 message failed", extra={"peer": conn.peer})
            code, outcome = "AE", "error"
            problems = [Problem(INTERNAL, "internal error; send the message again")]
        self.stats[code] += 1
        try:
            self.audit.append(AuditRecord(
                ts=dt.datetime.now(dt.UTC), actor=subject, tenant_id=tenant,
                method=f"hl7:{header.message_type if header else '?'}",
                object=(header.control_id if header else None) or None,
                outcome=outcome, source=conn.peer, request_id=header.control_id if header
                else None, detail={"ack": code, "ms": round((time.monotonic() - started) * 1e3,
                                                            1)}, patient=patient))
        except AuditUnavailable:
            code = "AE"
            problems = [Problem(INTERNAL, "the audit trail is unavailable; send again later")]
        return ack(header, code, problems)

    async def _sender(self, message: Message, conn: MllpConnection) -> tuple[str, int]:
        """(subject, tenant) of an authorised sender; MessageError AR otherwise."""
        header = message.header
        subject = f"mllp:{header.sending_facility or '-'}"
        cert_tenant = None
        tls = conn.ssl_object()
        if tls is not None:
            der = tls.getpeercert(binary_form=True)
            caller = certificate_caller(x509.load_der_x509_certificate(der))
            subject, cert_tenant = caller.subject, caller.tenant_id
        tenant = await self._tenant(header.sending_facility) if header.sending_facility \
            else cert_tenant
        rights = RIGHTS.get(header.message_code)
        if rights is None:
            raise MessageError("AR", [Problem(UNSUPPORTED_MESSAGE, f"{header.message_type} is "
                                              "not handled (ORU^R01, ADT^A01/A02/A03/A08)",
                                              "MSH", 1, 9)], header)
        if tenant is None or not self.authorizer.allowed(subject, tenant, *rights):
            self.stats["denied"] += 1
            raise Denied("AR", [Problem(INTERNAL, f"{subject} may not send "
                                              f"{header.message_type} for "
                                              f"{header.sending_facility!r}", "MSH", 1, 4)],
                               header)
        return subject, tenant

    async def _tenant(self, code: str) -> int | None:
        """The tenant whose code is ``code`` (re-read when the tree changed)."""
        if self._codes_version != self.authorizer.version:
            async with self._codes_lock:  # one re-read for all the messages waiting
                version = self.authorizer.version
                if self._codes_version != version:
                    async with await psycopg.AsyncConnection.connect(self.dsn,
                                                                     autocommit=True) as c:
                        cur = await c.execute(b"SELECT code, id FROM tenants")
                        self._codes = dict(await cur.fetchall())
                    self._codes_version = version
        return self._codes.get(code)

    async def _handle(self, message: Message, subject: str,
                      tenant: int) -> tuple[list[Problem], str | None]:
        header = message.header
        key = (subject, header.control_id)
        if key in self.recent:
            self.stats["resent"] += 1
            return [], None
        if header.message_code == "ORU":
            if header.trigger != "R01":
                raise MessageError("AR", [Problem(UNSUPPORTED_MESSAGE, "ORU^R01 only",
                                                  "MSH", 1, 9)], header)
            warnings = await self._observations(message, subject, tenant)
            self._remember(key, header, tenant)
            return warnings, None
        event = adt.adt_event(message, tenant, subject)
        outcome = await asyncio.to_thread(self._apply_adt, event)
        self._remember(key, None, tenant)
        return [], outcome.pseudonym

    def _remember(self, key: tuple[str, str], header: Header | None, tenant: int) -> None:
        self.recent[key] = None
        if len(self.recent) > RECENT_MAX:
            self.recent.popitem(last=False)
        if header is not None:  # ADT rows are written with the bindings
            self._record.append((key[0], key[1], header.message_type, tenant))
            self._wake.set()

    # -- ORU -------------------------------------------------------------------------

    async def _observations(self, message: Message, subject: str,
                            tenant: int) -> list[Problem]:
        found = oru.observations(message, self.tz)
        if not found.readings:
            return found.warnings
        reach = self.authorizer.tree.subtree(tenant)
        now_us = time.time_ns() // 1000
        cfg = self.pipeline.cfg
        newest = now_us + cfg.future_window_s * 1_000_000
        problems: list[Problem] = []
        raws: list[bytes] = []
        for index, reading in enumerate(found.readings):
            entry = self.pipeline.view.get(reading.device)
            if entry is None or not entry.may_send or entry.tenant_id not in reach:
                problems.append(Problem(UNKNOWN_KEY, f"device {reading.device} is not a "
                                        "device of the sender that may send", "OBX", 0, 18))
                continue
            if entry.auth_required:
                problems.append(Problem(UNKNOWN_KEY, f"device {reading.device} requires "
                                        "HMAC-signed frames; it cannot report through HL7",
                                        "OBX", 0, 18))
                continue
            oldest = now_us - (entry.late_window_us or cfg.past_window_s * 1_000_000)
            if not oldest <= reading.ts_us <= newest:
                problems.append(Problem(RECORD_LOCKED, f"device {reading.device}: observation "
                                        "time outside the accepted window", "OBX", 0, 14))
                continue
            raws.append(encode_frame(KIND_TELEMETRY, entry.tenant_id, reading.device,
                                     oru.frame_seq(subject, message.header.control_id, index),
                                     reading.ts_us, reading.fields, flags=FLAG_ACK_REQ))
        if problems:
            raise MessageError("AE", problems, message.header)
        events = FrameDecoder().feed(b"".join(raws))
        answer = Answer(events)
        self.session.expect(answer)
        self.pipeline.accept(list(events), self.session)
        # The gateway is no device connection: commands never go out here.
        self.pipeline.input_ended(self.session)
        await answer.wait(self.cfg.hl7.answer_timeout_s)
        refused = [(ev, status) for ev, status in zip(events, answer.statuses, strict=True)
                   if status not in ("OK", "DUPLICATE") and type(ev) is Frame]
        if refused:
            raise MessageError("AE", [Problem(RECORD_LOCKED if status == "PENDING" else INTERNAL,
                                              f"device {ev.device} at {ev.ts_us} us: {status}"
                                              + ("; send the message again"
                                                 if status in ("PENDING", "RATE_LIMITED")
                                                 else ""))
                                      for ev, status in refused], message.header)
        return found.warnings

    async def _record_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0.05)  # gather a batch
            await self._flush_record()

    async def _flush_record(self) -> None:
        rows, self._record = self._record, []
        if not rows:
            return
        try:
            async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as c:
                await c.execute(
                    b"INSERT INTO hl7_messages (sender, control_id, message_type, tenant_id) "
                    b"SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::int[]) "
                    b"ON CONFLICT DO NOTHING", [list(col) for col in zip(*rows, strict=True)])
        except psycopg.Error as exc:  # a trace only: the frames are stored
            log.warning("HL7 messages not recorded", extra={"rows": len(rows),
                                                            "error": str(exc).strip()})

    # -- ADT -------------------------------------------------------------------------

    def _apply_adt(self, event: registry_adt.AdtEvent) -> registry_adt.AdtOutcome:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                outcome = registry_adt.apply(conn, self.patient_keys, self.pseudo_key, event)
        except RegistryError as exc:
            raise MessageError("AE", [Problem(UNKNOWN_KEY if exc.code == NOT_FOUND
                                              else INTERNAL, str(exc))]) from None
        if outcome.duplicate:
            self.stats["resent"] += 1
        return outcome

    def describe(self) -> dict[str, Any]:
        return {"port": self.port, "connections": len(self.connections), **self.stats}
