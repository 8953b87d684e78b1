"""IngestService.Push: hospital platforms push batches of RMF frames
(proto/ingest.proto) — the gRPC adapter in front of the shared pipeline.

Who: a hospital platform's client certificate on the mutual-TLS port
(``cert:<CN>``, speaking for the tenant in its ``urn:rmiot:tenant:<id>``
name). The interceptor checks ``ingest:write`` on that home tenant (role
``hospital_platform``); here every frame's tenant must be in the home tenant's
subtree and allowed ``ingest:write`` too, else the frame is refused as
TENANT_FORBIDDEN and the others go on.

What: the request's frames are decoded (the region's device keys verify
HMACs), then handed to the pipeline — one ``accept`` call per device, with a
``PushCall`` as their sink — and the pipeline's batch is flushed: the same
checks, de-duplication, batching and commit as over TCP. A device's frames of
one request are in one batch, so in one transaction: a hospital's pushes,
each answered before the next one for the same devices is sent, are stored in
order. The reply goes out once every frame has its ack, i.e. after commit.
A frame sent without ACK_REQ is given it first (flags byte set,
HMAC tag — with the key that just verified it — and CRC recomputed; the stored
row is the same), since the pipeline answers only frames that ask and the
caller needs an answer for each.

Idempotent: a resent request stores nothing twice (the database's unique
index answers DUPLICATE), and the reply's per-device high-water marks say
what is durable. Backpressure: while the pipeline is paused (the database
behind) a Push waits before accepting, so gRPC flow control slows the sender.
Limits: at most ``MAX_FRAMES`` frames per request (INVALID_ARGUMENT); the
pipeline's per-device and per-tenant rate limits apply as to devices, and a
frame over them is refused RATE_LIMITED (worth resending later).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections import Counter
from collections.abc import Sequence
from operator import attrgetter

import grpc

from rmiot.core_ext import (
    ACK_STATUS,
    AUTH_HMAC_SHA256,
    FLAG_ACK_REQ,
    HEADER_LEN,
    TAG_LEN,
    DecodeError,
    Frame,
    FrameDecoder,
    crc32,
    encode_ack,
)
from rmiot.grpc_server import Context, Service
from rmiot.ingest.pipeline import Pipeline
from rmiot.proto import ingest_pb2, ingest_pb2_grpc
from rmiot.security.authz import Authorizer
from rmiot.security.interceptor import MethodRule, current_caller

log = logging.getLogger("rmiot.ingest.push")

SERVICE = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].full_name
RULES = {f"/{SERVICE}/Push": MethodRule("ingest", "write", object_field="batch_id")}
MAX_FRAMES = 100_000
MAX_BATCH_ID = 128
FORBIDDEN = "TENANT_FORBIDDEN"

ACK_LEN = len(encode_ack(1, 1, 1, 0, 0))
_STATUS_AT = ACK_LEN - 4 - 1  # the low byte of the ack's int32 status (statuses are 0..9)
_CODE = {status: code for code, status in ACK_STATUS.items() if code != "FUTURE"}
_NEWEST = attrgetter("ts_us", "seq")


def service(pipeline: Pipeline, authorizer: Authorizer) -> Service:
    """The servicer to mount (its RULES go to the interceptor)."""
    return Service(SERVICE, ingest_pb2_grpc.add_IngestServiceServicer_to_server,
                   PushServicer(pipeline, authorizer))


class PushCall:
    kind = "grpc"  # the transport's name in metrics and traces
    """The pipeline's sink for one Push: collects the acks of its frames and
    completes ``done`` when every one has its answer."""

    __slots__ = ("done", "expected", "received", "refused", "statuses")

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.received = 0
        self.statuses: Counter[str] = Counter()
        self.refused: list[tuple[int, int, str]] = []   # (device, seq, code)
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not expected:
            self.done.set_result(None)

    def send(self, data: bytes) -> None:
        """Acks back to back (fixed-size frames): count them by status byte."""
        count = len(data) // ACK_LEN
        statuses = data[_STATUS_AT::ACK_LEN]
        ok, duplicate = statuses.count(0), statuses.count(1)
        self.statuses["OK"] += ok
        self.statuses["DUPLICATE"] += duplicate
        if ok + duplicate < count:
            for i, status in enumerate(statuses[:count]):
                if status > 1:
                    at = i * ACK_LEN
                    code = _CODE.get(status, f"STATUS_{status}")
                    self.statuses[code] += 1
                    self.refused.append((int.from_bytes(data[at + 12:at + 20]),
                                         int.from_bytes(data[at + 20:at + 24]), code))
        self.received += count
        if self.received >= self.expected and not self.done.done():
            self.done.set_result(None)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Gate:
    """Registered with the pipeline: open unless it is applying backpressure."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.open.set()

    def send(self, data: bytes) -> None:
        pass

    def pause_reading(self) -> None:
        self.open.clear()

    def resume_reading(self) -> None:
        self.open.set()


class PushServicer(ingest_pb2_grpc.IngestServiceServicer):
    def __init__(self, pipeline: Pipeline, authorizer: Authorizer) -> None:
        self.pipeline = pipeline
        self.authorizer = authorizer
        self.gate = Gate()
        pipeline.register(self.gate)

    async def Push(self, request: ingest_pb2.PushRequest,
                   context: Context) -> ingest_pb2.PushReply:
        if len(request.batch_id) > MAX_BATCH_ID:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"batch_id: at most {MAX_BATCH_ID} characters")
        decoder = FrameDecoder(self.pipeline.view.key)
        events: list[Frame | DecodeError] = [*decoder.feed(request.frames), *decoder.eof()]
        if len(events) > MAX_FRAMES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{len(events)} frames in one request: at most {MAX_FRAMES}")
        reply = ingest_pb2.PushReply(batch_id=request.batch_id, frames=len(events))
        frames, refused = self._admit(events)
        await self.gate.open.wait()
        call = PushCall(len(frames))
        if frames:
            # One accept for the request, as for one read of a TCP stream:
            # each device's frames stay in order, and the pipeline's
            # per-device work is done once per device.
            self.pipeline.accept(frames, call)
            # The request gives nothing more: commands are not sent down a push.
            self.pipeline.input_ended(call)
            self.pipeline.flush()
        await call.done
        statuses = call.statuses
        for device, seq, ts_us, code in refused:
            statuses[code] += 1
            reply.refused.add(device_id=device, seq=seq, ts_us=ts_us, code=code)
        if call.refused:
            ts_of = {(f.device, f.seq): f.ts_us for f in frames}
            reply.refused.extend(
                ingest_pb2.RefusedFrame(device_id=device, seq=seq,
                                        ts_us=ts_of.get((device, seq), 0), code=code)
                for device, seq, code in call.refused)
        for code, n in statuses.items():
            if n:
                reply.statuses[code] = n
        reply.high_water.extend(high_water(frames, call.refused))
        return reply

    def _admit(self, events: Sequence[Frame | DecodeError]
               ) -> tuple[list[Frame], list[tuple[int, int, int, str]]]:
        """The frames for the pipeline, in request order, each asking for an
        ack; and the events refused here, as (device, seq, ts_us, code)."""
        caller = current_caller()
        home = caller.tenant_id
        stats = self.pipeline.stats
        permitted: dict[int, bool] = {}
        frames: list[Frame] = []
        refused: list[tuple[int, int, int, str]] = []
        rewritten: list[tuple[int, bytes]] = []  # (index in frames, the frame with ACK_REQ)
        for ev in events:
            if type(ev) is not Frame:
                stats[ev.code] += 1
                refused.append((ev.device, ev.seq, 0, ev.code))
                continue
            tenant = ev.tenant
            ok = permitted.get(tenant)
            if ok is None:
                ok = permitted[tenant] = home is not None and \
                    self.authorizer.tree.reaches(home, tenant) and \
                    self.authorizer.allowed(caller.subject, tenant, "ingest", "write")
            if not ok:
                stats[FORBIDDEN] += 1
                refused.append((ev.device, ev.seq, ev.ts_us, FORBIDDEN))
                continue
            if not ev.ack_req:
                raw = asking_for_ack(ev, self.pipeline.view.key(ev.device))
                if raw is None:  # its key went away since the decode
                    refused.append((ev.device, ev.seq, ev.ts_us, "AUTH_FAILED"))
                    continue
                rewritten.append((len(frames), raw))
            frames.append(ev)
        denied = [t for t, ok in permitted.items() if not ok]
        if denied:
            log.warning("push: frames for tenants outside the caller's subtree refused",
                        extra={"caller": caller.subject, "home": home, "tenants": denied})
        if rewritten:
            again = FrameDecoder(self.pipeline.view.key).feed(b"".join(r for _, r in rewritten))
            for (index, _), ev in zip(rewritten, again, strict=True):
                if type(ev) is Frame:
                    frames[index] = ev
                else:  # its key changed since the first decode: the original stays out
                    refused.append((ev.device, ev.seq, frames[index].ts_us, ev.code))
            frames = [f for f in frames if f.ack_req]
        return frames, refused


def asking_for_ack(frame: Frame, keys: bytes | tuple[bytes, ...] | None) -> bytes | None:
    """``frame``'s bytes with ACK_REQ set: the CRC, and for a signed frame the
    HMAC tag (with whichever of ``keys`` signed it), recomputed. None when no
    key signed it."""
    raw = bytearray(frame.raw)
    raw[3] |= FLAG_ACK_REQ
    if frame.auth:
        end = HEADER_LEN + int.from_bytes(raw[6:8])
        algorithm = "sha256" if frame.auth == AUTH_HMAC_SHA256 else "sm3"
        tag = frame.raw[end:end + TAG_LEN]
        signed = frame.raw[:end]
        for key in (keys,) if isinstance(keys, bytes) else keys or ():
            if key and hmac.compare_digest(hmac.digest(key, signed, algorithm)[:TAG_LEN], tag):
                raw[end:end + TAG_LEN] = hmac.digest(key, bytes(raw[:end]), algorithm)[:TAG_LEN]
                break
        else:
            return None
    raw[-4:] = crc32(bytes(raw[:-4])).to_bytes(4, "big")
    return bytes(raw)


def high_water(frames: Sequence[Frame], refused: Sequence[tuple[int, int, str]]
               ) -> list[ingest_pb2.HighWater]:
    """Per device, the newest (ts_us, seq) among its frames stored or already
    stored, in the order the devices first appear."""
    skip = {(device, seq) for device, seq, _ in refused}
    newest: dict[int, Frame] = {}
    for f in frames:
        if skip and (f.device, f.seq) in skip:
            continue
        best = newest.get(f.device)
        if best is None or _NEWEST(f) > _NEWEST(best):
            newest[f.device] = f
    return [ingest_pb2.HighWater(device_id=d, tenant_id=f.tenant, seq=f.seq, ts_us=f.ts_us)
            for d, f in newest.items()]
