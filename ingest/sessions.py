"""Device sessions: the pipeline's sinks for devices on the message transports
(MQTT, CoAP, HTTP), and the read gate that gives those transports backpressure.

The pipeline sends a sink its acks (after commit) and the command dispatcher
sends it COMMAND frames; the dispatcher also remembers which sink a device was
last seen on. Over TCP the connection is that sink. The message transports
have no connection per device, so a ``DeviceSession`` per (adapter, device)
stands in for one: made on the device's first message, it ends
``ingest.idle_timeout_s`` after the last (``Sessions.sweep``), and then the
dispatcher is told the device left (``Pipeline.input_ended``), so commands it
sent there but the device never confirmed are queued again. Subclasses say
where acks and commands go: MQTT publishes them on the device's downlink
topic; CoAP and HTTP hand acks to the request that waits for them
(``ingest.answers``) and keep commands for the device's next response or its
CoAP observation.

``ReadGate``: one per adapter, registered with the pipeline as if it were a
connection. When the pipeline pauses its sinks (uncommitted rows above its
high-water mark), the adapter stops taking messages — MQTT stops acking so the
broker keeps the rest, CoAP and HTTP requests wait before their payload is
decoded — until the pipeline resumes them. Never drops; fails closed.

``read_downlink`` splits what a sink is sent into acks and COMMAND frames.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, TypeVar

from rmiot.core_ext import (
    CRC_LEN,
    HEADER_LEN,
    KIND_ACK,
    KIND_COMMAND,
    Frame,
    decode_frame,
)
from rmiot.ingest.pipeline import Pipeline

# An ACK frame as the pipeline encodes it: header, one int32 field (metric 0), CRC.
_ACK = struct.Struct(">2sBBBBHIQIqHBiI")
_BODY_LEN = struct.Struct(">H")


def read_downlink(data: bytes) -> tuple[list[tuple[int, int, int]], list[Frame]]:
    """(device, seq, status) of each ACK frame and the COMMAND frames in
    ``data`` (what the pipeline and the dispatcher send a sink), in order."""
    acks: list[tuple[int, int, int]] = []
    commands: list[Frame] = []
    at, end = 0, len(data)
    while at + HEADER_LEN <= end:
        size = HEADER_LEN + _BODY_LEN.unpack_from(data, at + 6)[0] + CRC_LEN
        if at + size > end:
            break
        kind = data[at + 4]
        if kind == KIND_ACK and size == _ACK.size:
            fields = _ACK.unpack_from(data, at)
            acks.append((fields[7], fields[8], fields[12]))
        elif kind == KIND_COMMAND:
            frame = decode_frame(data[at:at + size])
            if type(frame) is Frame:
                commands.append(frame)
        at += size
    return acks, commands


class ReadGate:
    """Open unless the pipeline paused its sinks; see the module's docstring."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.open.set()

    def send(self, data: bytes) -> None:
        pass  # nothing is acked to a gate

    def pause_reading(self) -> None:
        self.open.clear()

    def resume_reading(self) -> None:
        self.open.set()

    async def wait(self) -> None:
        if not self.open.is_set():
            await self.open.wait()


class DeviceSession:
    """An ``AckSink`` for one device on one message transport."""

    def __init__(self, device: int) -> None:
        self.device = device
        self.last_used = time.monotonic()

    @property
    def held(self) -> bool:
        """True while something keeps the session alive however idle it is."""
        return False

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    # The adapter's ReadGate stops the transport; a session has nothing to stop.
    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def ended(self) -> None:
        """Called once when the session ends (idle, or the adapter stops)."""


K = TypeVar("K", bound=Hashable)
S = TypeVar("S", bound=DeviceSession)


class Sessions(Generic[K, S]):
    """The live sessions of one adapter, by key; ends the idle ones."""

    def __init__(self, pipeline: Pipeline, make: Callable[[K], S]) -> None:
        self.pipeline = pipeline
        self.make = make
        self.live: dict[K, S] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def get(self, key: K) -> S:
        """The key's session (made if new), marked as used now."""
        session = self.live.get(key)
        if session is None:
            session = self.live[key] = self.make(key)
        else:
            session.last_used = time.monotonic()
        return session

    def __iter__(self) -> Iterator[S]:
        return iter(list(self.live.values()))

    def sweep(self, now: float) -> None:
        idle = self.pipeline.cfg.idle_timeout_s
        for key, session in list(self.live.items()):
            if now - session.last_used > idle and not session.held:
                self._end(key, session)

    def _end(self, key: K, session: S) -> None:
        del self.live[key]
        self.pipeline.input_ended(session)
        session.ended()

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="session-sweeper")

    async def stop(self) -> None:
        """End every session (their unconfirmed commands are queued again)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for key, session in list(self.live.items()):
            self._end(key, session)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.sweep(time.monotonic())
