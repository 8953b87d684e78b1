"""RMF over TCP: the device-facing socket server.

One ``asyncio.Protocol`` per connection (uvloop in production; the stock loop
works the same): bytes go to the connection's own ``FrameDecoder`` and the
events to the shared ``Pipeline``, which sends acks back on the connection.
A connection is not bound to one device: a gateway may speak for many; each
frame is checked against its own device.

Limits, each failing closed for the connection concerned only:
- ``ingest.max_connections`` per process: a connection over the limit is
  closed at once (devices retry later; the count is in ``stats``);
- ``ingest.idle_timeout_s``: a connection silent this long is closed (a paused
  connection — backpressure — is never idle-closed: it is we who stopped it);
- ``ingest.partial_frame_timeout_s``: an incomplete frame that long in the
  buffer is dropped as TRUNCATED and the decoder resynchronises after its
  first byte, so a corrupted length field cannot stall a connection.
A sweeper task checks the timeouts once a second for all connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any, cast

from rmiot import observability
from rmiot.config import IngestConfig
from rmiot.core_ext import FrameDecoder
from rmiot.ingest.pipeline import Pipeline

log = logging.getLogger("rmiot.ingest.tcp")


class RmfConnection(asyncio.Protocol):
    __slots__ = ("adapter", "decoder", "last_rx", "partial_since", "paused", "peer",
                 "transport")
    kind = "tcp"  # the transport's name in metrics and traces

    def __init__(self, adapter: TcpAdapter) -> None:
        self.adapter = adapter
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder(adapter.pipeline.view.key)
        self.last_rx = time.monotonic()
        self.partial_since = 0.0
        self.paused = False
        self.peer = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: cast, don't check.
        transport = cast(asyncio.Transport, transport)
        adapter = self.adapter
        if len(adapter.connections) >= adapter.cfg.max_connections:
            adapter.stats["refused_connection_limit"] += 1
            transport.abort()
            return
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else ""
        adapter.connections.add(self)
        adapter.pipeline.register(self)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.last_rx = now
        received_ns = time.time_ns() if observability.TRACING else 0
        events = self.decoder.feed(data)
        if events:
            self.adapter.pipeline.accept(events, self, received_ns)
            self.partial_since = now if self.decoder.pending() else 0.0
        elif not self.partial_since:
            self.partial_since = now

    def eof_received(self) -> bool | None:
        events = self.decoder.eof()
        if events:
            self.adapter.pipeline.accept(list(events), self)
        self.adapter.pipeline.input_ended(self)
        return True  # keep the write side open: acks for what was sent still go out

    def connection_lost(self, exc: Exception | None) -> None:
        self.adapter.connections.discard(self)
        self.adapter.pipeline.unregister(self)
        self.transport = None

    # -- AckSink ---------------------------------------------------------------

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def pause_reading(self) -> None:
        if self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self.paused:
            self.paused = False
            self.last_rx = time.monotonic()
            self.transport.resume_reading()

    # -- timeouts ---------------------------------------------------------------

    def sweep(self, now: float) -> None:
        cfg = self.adapter.cfg
        if self.transport is None or self.paused:
            return
        if now - self.last_rx > cfg.idle_timeout_s:
            self.adapter.stats["closed_idle"] += 1
            self.transport.close()
            return
        if self.partial_since and now - self.partial_since > cfg.partial_frame_timeout_s:
            dropped = self.decoder.drop_pending()
            events: list[Any] = [dropped] if dropped is not None else []
            events += self.decoder.feed(b"")
            self.adapter.stats["partial_frames_dropped"] += 1
            self.adapter.pipeline.accept(events, self)
            self.partial_since = now if self.decoder.pending() else 0.0


class TcpAdapter:
    def __init__(self, cfg: IngestConfig, pipeline: Pipeline) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.connections: set[RmfConnection] = set()
        self.stats = pipeline.stats
        self.server: asyncio.Server | None = None
        self.port = 0
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: RmfConnection(self), self.cfg.tcp_host,
                                               self.cfg.tcp_port, reuse_port=True,
                                               backlog=4096)
        self.port = self.server.sockets[0].getsockname()[1]
        self._sweeper = asyncio.create_task(self._sweep(), name="tcp-sweeper")
        return self.port

    async def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    def pause_all(self) -> None:
        for conn in list(self.connections):
            conn.pause_reading()

    async def close_all(self) -> None:
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        if self.server is not None:
            await self.server.wait_closed()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.sweep(now)
