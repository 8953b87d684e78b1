"""RmfClient: a device's side of RMF over TCP, as a well-behaved device does it.

It keeps every frame sent with ACK_REQ until it holds an OK or DUPLICATE ack
for it (the spec's rule: only then may a device forget a frame), resends the
unacknowledged ones after a reconnect, and records every
ack status it received, and every COMMAND frame (``commands``; answer one with
``command_result``). Used by the tests, the load generator in ``benches/``
and the city simulator; vendors can use it to try their frames.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass, field

from rmiot.core_ext import (
    ACK_DUPLICATE,
    ACK_OK,
    FLAG_ACK_REQ,
    KIND_ACK,
    KIND_COMMAND,
    KIND_COMMAND_RESULT,
    DecodeError,
    Frame,
    FrameDecoder,
    encode_frame,
)


def command_result(tenant: int, device: int, seq: int, ts_us: int, command_id: int, code: int,
                   *, ack_req: bool = True, auth: int = 0, key: bytes | None = None) -> bytes:
    """A device's COMMAND_RESULT frame: metric 0 the command id, metric 1 the
    result code (0 success, 1 accepted and in progress, others failures)."""
    return encode_frame(KIND_COMMAND_RESULT, tenant, device, seq, ts_us,
                        [(0, 4, command_id), (1, 3, code)],
                        flags=FLAG_ACK_REQ if ack_req else 0, auth=auth, key=key)


@dataclass
class RmfClient:
    host: str
    port: int
    unacked: dict[tuple[int, int], bytes] = field(default_factory=dict)  # (device, seq) -> frame
    statuses: Counter[int] = field(default_factory=Counter)
    acked: set[tuple[int, int]] = field(default_factory=set)  # OK/DUPLICATE (device, seq)
    acks: list[tuple[int, int, int]] = field(default_factory=list)  # (device, seq, status)
    keep_acks: bool = True
    commands: list[Frame] = field(default_factory=list)  # COMMAND frames received
    _reader: asyncio.StreamReader | None = None
    _writer: asyncio.StreamWriter | None = None
    _task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        self._task = asyncio.create_task(self._read_acks())

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await self._task
        self._writer = self._task = None

    @property
    def connected(self) -> bool:
        return self._task is not None and not self._task.done()

    def send(self, frame: bytes, device: int, seq: int, ack_req: bool = True) -> None:
        """Send one frame (already encoded); remember it until acked if ACK_REQ.

        While disconnected the frame is only remembered (a device buffers):
        ``resend_unacked()`` after the reconnect sends it."""
        if ack_req:
            self.unacked[(device, seq)] = frame
        self.send_raw(frame)

    def send_raw(self, data: bytes) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(data)

    async def drain(self) -> None:
        if self._writer is not None and not self._writer.is_closing():
            await self._writer.drain()

    async def resend_unacked(self) -> int:
        """After a reconnect: send again, byte for byte, every frame not yet acked.

        (Setting RETRANS would change the bytes an HMAC tag covers; a device
        that sets it builds the frame anew. The platform needs neither: the
        same device, seq and ts_us is what makes it a retransmission.)"""
        for frame in list(self.unacked.values()):
            self.send_raw(frame)
        await self.drain()
        return len(self.unacked)

    async def wait_acked(self, timeout: float) -> bool:
        """Wait until nothing is left unacknowledged; False on timeout or disconnect."""
        try:
            async with asyncio.timeout(timeout):
                while self.unacked:
                    if not self.connected:
                        return False
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    async def wait_acks(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` acks of any status have arrived."""
        try:
            async with asyncio.timeout(timeout):
                while sum(self.statuses.values()) < count:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    async def wait_commands(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` COMMAND frames have arrived in all."""
        try:
            async with asyncio.timeout(timeout):
                while len(self.commands) < count:
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    async def _read_acks(self) -> None:
        decoder = FrameDecoder()
        assert self._reader is not None
        try:
            while data := await self._reader.read(65536):
                for ev in decoder.feed(data):
                    if isinstance(ev, DecodeError):
                        continue
                    if ev.kind == KIND_ACK:
                        self._record(ev)
                    elif ev.kind == KIND_COMMAND:
                        self.commands.append(ev)
                self._changed.set()
        finally:
            self._changed.set()

    def _record(self, ack: Frame) -> None:
        status = int(ack.fields()[0][2])  # type: ignore[call-overload]
        key = (ack.device, ack.seq)
        self.statuses[status] += 1
        if self.keep_acks:
            self.acks.append((ack.device, ack.seq, status))
        if status in (ACK_OK, ACK_DUPLICATE):
            self.unacked.pop(key, None)
            self.acked.add(key)
