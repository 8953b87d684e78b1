"""Pipeline: what every transport adapter shares after decoding — the
platform's checks, batching, acknowledgement after commit, and backpressure.

An adapter feeds decoded events with ``accept(events, sink)``; ``sink`` is the
connection (or message context) that gets the acks: an object with
``send(data: bytes)``, ``pause_reading()`` and ``resume_reading()``.

Checks, in order, after the decoder's own (magic … MALFORMED):
UNKNOWN_DEVICE (not in the registry view, or not allowed to send: suspended,
retired, or its tenant disabled), TENANT_MISMATCH, AUTH_REQUIRED, kind (a
device may send kinds 1–5 only: MALFORMED otherwise), STALE/FUTURE (``ts_us``
outside ``[now - past_window_s, now + future_window_s]``; both NACK as STALE,
the only code the spec has), RATE_LIMITED (token buckets per device and per
tenant — frames per device (``ingest.device_rate_per_s``), points per tenant
(the tenant's ``points_per_s`` setting, else ``ingest.tenant_points_per_s``); fails closed for
that device or tenant only; sustained abuse goes to ``on_abuse``, which the
platform audits), DUPLICATE (the same (device, seq, ts_us) already waiting in
an uncommitted batch: acked DUPLICATE once the first commits).

A NACK goes out at once, and only when the frame asked for an ack (ACK_REQ).
An OK goes out only after the frame's batch is committed, DUPLICATE when the
database already had it.

Backpressure (fails closed, never drops): rows handed to the writers but not
yet committed are counted; above ``high_water`` every sink is paused (the
sockets stop being read, so devices' TCP windows fill and they slow down); they
resume below half of it. A batch is handed over when it has
``batch_max_rows`` rows or its first row has waited ``batch_max_ms``.

Device commands (``dispatcher``, a ``registry.commands.CommandDispatcher``,
when set): the first accepted frame of a device in each ``accept`` call tells
it the device is on that sink (it remembers, so this is a set lookup);
``input_ended`` (EOF) and ``unregister`` tell it the sink is gone; committed
COMMAND_RESULT frames go to it after their acks (stored like any other frame).

Alarm rules (``alarms``, an ``ingest.alarm_engine.Engine``, when set): drop and
downsample rules decide in ``accept`` whether a frame is stored (one filtered
out is acked OK at once: it was handled as configured); the frames of each
``accept`` call that are queued for storing are evaluated at its end, so an
alarm never waits for its frame's batch (``Engine.accepted``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from rmiot import observability
from rmiot.config import IngestConfig
from rmiot.core_ext import (
    ACK_AUTH_REQUIRED,
    ACK_DUPLICATE,
    ACK_MALFORMED,
    ACK_OK,
    ACK_RATE_LIMITED,
    ACK_STALE,
    ACK_STATUS,
    ACK_TENANT_MISMATCH,
    ACK_UNKNOWN_DEVICE,
    KIND_COMMAND_RESULT,
    Frame,
    encode_ack,
)
from rmiot.ingest.alarm_engine import Engine
from rmiot.ingest.writer import Batch, BatchWriter, Key, Outcome, frame_key
from rmiot.registry.commands import CommandDispatcher
from rmiot.registry.view import DeviceView
from rmiot.security.limits import RateLimiter, Refusal

DEVICE_KINDS = frozenset((1, 2, 3, 4, 5))


class AckSink(Protocol):
    def send(self, data: bytes) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class _ReadGroups:
    """One read's frames grouped by device and its points summed by tenant, in
    one pass made the first time a rate limit asks (a gateway's or an MQTT
    batch's read holds many devices: no rescan per device)."""

    __slots__ = ("by_device", "events", "points")

    def __init__(self, events: list[Any]) -> None:
        self.events = events
        self.by_device: dict[int, list[Frame]] | None = None
        self.points: dict[int, int] = {}

    def _build(self) -> dict[int, list[Frame]]:
        by_device: dict[int, list[Frame]] = {}
        points = self.points
        for ev in self.events:
            if type(ev) is Frame:
                by_device.setdefault(ev.device, []).append(ev)
                points[ev.tenant] = points.get(ev.tenant, 0) + ev.count
        self.by_device = by_device
        return by_device

    def frames_of(self, device: int) -> list[Frame]:
        by_device = self.by_device if self.by_device is not None else self._build()
        return by_device.get(device, [])

    def points_of(self, tenant: int) -> int:
        if self.by_device is None:
            self._build()
        return self.points.get(tenant, 0)


class Pipeline:
    def __init__(self, cfg: IngestConfig, view: DeviceView, dsn: str) -> None:
        self.cfg = cfg
        self.view = view
        self.writer = BatchWriter(dsn, cfg.writers, self._committed)
        self.batch = Batch()
        self.pending_rows = 0
        self.high_water = max(cfg.batch_max_rows * cfg.writers * 4, 10_000)
        self.paused = False
        self.sinks: set[Any] = set()
        # Keys of frames in uncommitted batches -> extra waiters (None: none yet).
        self.inflight: dict[Key, list[tuple[Any, Frame]] | None] = {}
        self.stats: Counter[str] = Counter()
        self._flush_handle: asyncio.TimerHandle | None = None
        self.per_device = RateLimiter(cfg.device_rate_per_s, cfg.device_rate_per_s * 2)
        self.per_tenant = RateLimiter(cfg.tenant_points_per_s, cfg.tenant_points_per_s * 2)
        # Called as on_abuse("device" | "tenant", id) once a minute while a key
        # keeps being refused; the platform audits it.
        self.on_abuse: Callable[[str, int], None] | None = None
        self.dispatcher: CommandDispatcher | None = None
        self.alarms: Engine | None = None
        # Received so far, counted per read when metrics are on (observability).
        self.points_in: dict[tuple[str, int], int] = {}
        self.frames_in: dict[str, int] = {}

    # -- sinks ---------------------------------------------------------------

    def register(self, sink: AckSink) -> None:
        self.sinks.add(sink)
        if self.paused:
            sink.pause_reading()

    def unregister(self, sink: AckSink) -> None:
        self.sinks.discard(sink)
        self.input_ended(sink)

    def input_ended(self, sink: AckSink) -> None:
        """The sink's peer sends nothing more (EOF): acks still go out on it,
        commands no longer do (its device could not answer there)."""
        if self.dispatcher is not None:
            self.dispatcher.connection_closed(sink)

    # -- the hot path ----------------------------------------------------------

    def accept(self, events: list[Any], sink: AckSink, received_ns: int = 0) -> None:
        """Check decoded events; queue good frames; NACK bad ones that asked.
        ``received_ns``: when their bytes arrived (for the batch's trace)."""
        now_us = time.time_ns() // 1000
        oldest = now_us - self.cfg.past_window_s * 1_000_000
        newest = now_us + self.cfg.future_window_s * 1_000_000
        devices = self.view.devices
        inflight = self.inflight
        batch = self.batch
        stats = self.stats
        nacks = bytearray()
        # Rate limits take tokens once per device per call (a read usually holds
        # many frames of one device), not once per frame: see _grant.
        budget: dict[int, int] = {}
        tenant_budget: dict[int, int] = {}
        groups = _ReadGroups(events)
        alarms = self.alarms if self.alarms is not None and self.alarms.filtering else None
        queued_before = len(batch)
        for ev in events:
            if type(ev) is not Frame:
                stats[ev.code] += 1
                status = ACK_STATUS.get(ev.code)
                if ev.ack_req and status is not None:
                    nacks += encode_ack(ev.tenant, ev.device, ev.seq, now_us, status)
                continue
            entry = devices.get(ev.device)
            if entry is None or not entry.may_send:
                code, status = "UNKNOWN_DEVICE", ACK_UNKNOWN_DEVICE
            elif entry.tenant_id != ev.tenant:
                code, status = "TENANT_MISMATCH", ACK_TENANT_MISMATCH
            elif entry.auth_required and not ev.auth:
                code, status = "AUTH_REQUIRED", ACK_AUTH_REQUIRED
            elif ev.kind not in DEVICE_KINDS:
                code, status = "MALFORMED", ACK_MALFORMED
            elif ev.ts_us < (oldest if entry.late_window_us is None
                             else now_us - entry.late_window_us):
                code, status = "STALE", ACK_STALE
            elif ev.ts_us > newest:
                code, status = "FUTURE", ACK_STALE
            elif (left := budget.get(ev.device)) == 0 or (
                    left is None and not self._grant(ev, groups, budget, tenant_budget, sink)):
                code, status = "RATE_LIMITED", ACK_RATE_LIMITED
            else:
                budget[ev.device] -= 1
                key = (ev.device, ev.seq, ev.ts_us)
                if key in inflight:
                    waiting = inflight[key]
                    if waiting is None:
                        inflight[key] = [(sink, ev)]
                    else:
                        waiting.append((sink, ev))
                    stats["DUPLICATE"] += 1
                    continue
                if alarms is not None and not alarms.admit(ev):
                    stats["FILTERED"] += 1
                    if ev.ack_req:
                        nacks += encode_ack(ev.tenant, ev.device, ev.seq, now_us, ACK_OK)
                    continue
                inflight[key] = None
                batch.add(ev, sink)
                continue
            stats[code] += 1
            if ev.ack_req:
                nacks += encode_ack(ev.tenant, ev.device, ev.seq, now_us, status)
        if nacks:
            sink.send(bytes(nacks))
        if self.alarms is not None and len(batch) > queued_before:
            self.alarms.accepted(batch.frames[queued_before:])
        if observability.METERING:
            self._count(events, sink, groups)
        if batch.frames and observability.TRACING:
            self._trace(batch, sink, groups, received_ns)
        if len(batch) >= self.cfg.batch_max_rows:
            self.flush()
        elif batch.frames and self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(
                self.cfg.batch_max_ms / 1000, self.flush)

    def _grant(self, first: Frame, groups: _ReadGroups, budget: dict[int, int],
               tenant_budget: dict[int, int], sink: AckSink) -> bool:
        """Take the tokens for all of ``first``'s device's frames in this call at
        once; set how many may pass; True when ``first`` may (and then the
        device is known to be on ``sink``)."""
        device, tenant = first.device, first.tenant
        mine = groups.frames_of(device)
        granted, verdict = self.per_device.take_up_to(device, len(mine))
        self._report(verdict, "device", device)
        # The tenant's quota counts points (fields), taken once per tenant per call.
        points = tenant_budget.get(tenant)
        if points is None:
            wanted = groups.points_of(tenant)
            entry = self.view.devices.get(device)
            points, verdict = self.per_tenant.take_up_to(
                tenant, wanted, rate=entry.points_per_s if entry else None)
            self._report(verdict, "tenant", tenant)
        fit = 0
        for ev in mine[:granted]:
            if ev.count > points:
                break
            points -= ev.count
            fit += 1
        tenant_budget[tenant] = points
        budget[device] = granted = fit
        if granted and self.dispatcher is not None:
            self.dispatcher.device_seen(device, sink)
        return granted > 0

    def _count(self, events: list[Any], sink: AckSink, groups: _ReadGroups) -> None:
        """Once per read: frames by transport, points by transport and tenant."""
        kind = getattr(sink, "kind", "other")
        self.frames_in[kind] = self.frames_in.get(kind, 0) + len(events)
        points = self.points_in
        for tenant, count in groups.points.items():
            key = (kind, tenant)
            points[key] = points.get(key, 0) + count

    def _trace(self, batch: Batch, sink: AckSink, groups: _ReadGroups,
               received_ns: int) -> None:
        """The open batch's trace starts with the read that opened it."""
        trace = batch.trace
        now = time.time_ns()
        if trace is None:
            first = batch.frames[0]
            trace = batch.trace = observability.BatchTrace(
                getattr(sink, "kind", "other"), received_ns or now, first.device, first.seq,
                first.tenant)
            trace.accepted_ns = now
        trace.tenants.update(groups.points)

    def _report(self, verdict: Refusal, kind: str, key: int) -> None:
        if verdict is Refusal.SUSTAINED and self.on_abuse is not None:
            self.on_abuse(kind, key)

    def flush(self) -> None:
        """Hand the current batch to the writers now."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        batch = self.batch
        if not batch.frames:
            return
        self.batch = Batch()
        if batch.trace is not None:
            batch.trace.queued_ns = time.time_ns()
        self.pending_rows += len(batch)
        self.writer.submit(batch)
        if not self.paused and self.pending_rows > self.high_water:
            self.paused = True
            self.stats["backpressure_pauses"] += 1
            for sink in self.sinks:
                sink.pause_reading()

    # -- after commit ----------------------------------------------------------

    def _committed(self, batch: Batch, outcome: Outcome) -> None:
        now_us = time.time_ns() // 1000
        acks: dict[Any, bytearray] = {}
        duplicates, rejected = outcome.duplicates, outcome.rejected
        inflight = self.inflight
        results: list[Frame] = []
        result_kind = KIND_COMMAND_RESULT
        for frame, sink in zip(batch.frames, batch.sinks, strict=True):
            key = frame_key(frame)
            waiting = inflight.pop(key, None)
            if rejected and key in rejected:
                status = ACK_MALFORMED
            elif duplicates and key in duplicates:
                status = ACK_DUPLICATE
            else:
                status = ACK_OK
            if frame.kind == result_kind and status != ACK_MALFORMED:
                # A duplicate too: its first copy's commit may have come just
                # before a restart; applying a result twice changes nothing.
                results.append(frame)
            if frame.ack_req:
                out = acks.get(sink)
                if out is None:
                    out = acks[sink] = bytearray()
                out += encode_ack(frame.tenant, frame.device, frame.seq, now_us, status)
            for other_sink, other in waiting or ():
                if other.ack_req:
                    acks.setdefault(other_sink, bytearray()).extend(encode_ack(
                        other.tenant, other.device, other.seq, now_us,
                        ACK_DUPLICATE if status == ACK_OK else status))
        self.stats["stored"] += len(batch) - len(duplicates) - len(rejected)
        self.stats["DUPLICATE"] += len(duplicates)
        self.stats["REJECTED_BY_DB"] += len(rejected)
        for sink, data in acks.items():
            sink.send(bytes(data))
        if results and self.dispatcher is not None:
            self.dispatcher.results(results)
        self.pending_rows -= len(batch)
        if batch.trace is not None:
            batch.trace.acked_ns = time.time_ns()
            batch.trace.emit()
        if self.paused and self.pending_rows <= self.high_water // 2:
            self.paused = False
            for sink in self.sinks:
                sink.resume_reading()
