"""MLLP (the Minimal Lower Layer Protocol of HL7 v2) over TCP, optionally TLS.

Wire layout of one message::

    0x0B  <HL7 message bytes>  0x1C 0x0D

Bytes outside a start and end mark are ignored. ``MllpConnection`` is an
``asyncio.Protocol``: it cuts messages out of the stream, hands each to the
``answer`` coroutine at once (several may be in flight: a sender may stream
without waiting), and writes the answers framed, in the order the messages
came (HL7 original mode pairs each ACK with its message by order as well as by
control id). Over ``max_in_flight`` unanswered messages, and whenever the
pipeline pauses its sinks, it stops reading the socket (backpressure: TCP
slows the sender; nothing is dropped). A message over ``max_bytes`` is answered
by ``too_large`` and the connection is closed (its stream cannot be trusted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

START, END = b"\x0b", b"\x1c\x0d"

log = logging.getLogger("rmiot.ingest.hl7")


def frame(message: bytes) -> bytes:
    return START + message + END


class MllpConnection(asyncio.Protocol):
    def __init__(self, answer: Callable[[bytes, MllpConnection], Awaitable[bytes]],
                 too_large: Callable[[bytes], bytes], max_bytes: int, max_in_flight: int,
                 on_close: Callable[[MllpConnection], None]) -> None:
        self.answer = answer
        self.too_large = too_large
        self.max_bytes = max_bytes
        self.max_in_flight = max_in_flight
        self.on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.in_flight = 0
        self.last: asyncio.Task[None] | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self._held_by_pipeline = False
        self._held_by_flight = False
        self.peer = ""

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        while True:
            start = buf.find(START)
            if start < 0:
                buf.clear()
                return
            end = buf.find(END, start + 1)
            if end < 0:
                if start:
                    del buf[:start]
                if len(buf) > self.max_bytes + 3:
                    self._too_large(bytes(buf[1:1 + 4096]))
                return
            message = bytes(buf[start + 1:end])
            del buf[:end + 2]
            if len(message) > self.max_bytes:
                self._too_large(message[:4096])
                return
            self._start(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_close(self)

    # -- answers in order ----------------------------------------------------------------

    def _start(self, message: bytes) -> None:
        self.in_flight += 1
        if self.in_flight >= self.max_in_flight and not self._held_by_flight:
            self._held_by_flight = True
            self._reading()
        task = asyncio.create_task(self._reply(message, self.last))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        self.last = task

    async def _reply(self, message: bytes, before: asyncio.Task[None] | None) -> None:
        try:
            reply = await self.answer(message, self)
        except Exception:  # the answerer reports its own errors; this is a bug
            log.exception("HL7 message not answered")
            reply = b""
        if before is not None:
            with contextlib.suppress(BaseException):
                await before
        if reply and self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(reply))
        self.in_flight -= 1
        if self._held_by_flight and self.in_flight < self.max_in_flight // 2 + 1:
            self._held_by_flight = False
            self._reading()

    def _too_large(self, head: bytes) -> None:
        self.buffer.clear()
        if self.transport is not None:
            self.transport.write(frame(self.too_large(head)))
            self.transport.close()

    # -- the pipeline's backpressure (an AckSink that is sent nothing) ------------------

    def send(self, data: bytes) -> None:
        pass

    def pause_reading(self) -> None:
        self._held_by_pipeline = True
        self._reading()

    def resume_reading(self) -> None:
        self._held_by_pipeline = False
        self._reading()

    def _reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._held_by_pipeline or self._held_by_flight:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def ssl_object(self) -> Any:
        return self.transport.get_extra_info("ssl_object") if self.transport else None
