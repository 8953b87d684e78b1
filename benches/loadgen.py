"""Load generator: many device connections sending RMF telemetry over loopback
TCP with ACK_REQ, each keeping a window of unacknowledged frames like a device
with a send buffer. Counts only frames acknowledged OK (i.e. committed).

    python benches/loadgen.py --port P --tenant T --first-device D --devices N
        --seconds S [--window W] [--fields 8]

Prints one JSON object: frames_ok, points_ok, seconds, other statuses.
Frames are encoded before the clock starts, so the generator's own CPU goes
to sockets and ack parsing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import cast

import uvloop

from rmiot.core_ext import ACK_OK, FLAG_ACK_REQ, encode_ack, encode_frame

ACK_LEN = len(encode_ack(1, 1, 1, 0, ACK_OK))
ACK_STATUS_BYTE = ACK_LEN - 4 - 1
VITALS = (72.0, 98.0, 16.0, 36.7, 120.0, 80.0, 93.3, 71.0, 55.0, 1.0, 2.0, 3.0)


class Device(asyncio.Protocol):
    def __init__(
        self,
        frames: list[bytes],
        window: int,
        chunk: int,
        done: asyncio.Future[None],
        deadline: float,
    ) -> None:
        self.frames = frames
        self.window = window
        self.chunk = chunk
        self.next = 0
        self.inflight = 0
        self.ok = 0
        self.other = 0
        self.pending = b""
        self.done = done
        self.deadline = deadline
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self._fill()

    def _fill(self) -> None:
        assert self.transport is not None
        if time.monotonic() > self.deadline:
            if not self.inflight and not self.done.done():
                self.done.set_result(None)
            return
        while self.inflight + self.chunk <= self.window and self.next < len(self.frames):
            end = min(self.next + self.chunk, len(self.frames))
            self.transport.write(b"".join(self.frames[self.next : end]))
            self.inflight += end - self.next
            self.next = end
        if self.next >= len(self.frames) and not self.inflight and not self.done.done():
            self.done.set_result(None)

    def data_received(self, data: bytes) -> None:
        # Acks are fixed-size frames (header, one int32 field, CRC), back to back:
        # count them by slicing instead of decoding each, so the generator's CPU
        # stays small next to the server's. The status's low byte sits at
        # offset 38 of each ack (statuses are 0..9).
        buf = self.pending + data if self.pending else data
        whole = len(buf) - len(buf) % ACK_LEN
        self.pending = buf[whole:]
        if whole:
            acks = whole // ACK_LEN
            ok = buf[ACK_STATUS_BYTE:whole:ACK_LEN].count(0)
            self.ok += ok
            self.other += acks - ok
            self.inflight -= acks
        self._fill()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


def build_frames(tenant: int, device: int, count: int, fields: int, start_us: int) -> list[bytes]:
    values = [(m + 1, 1, VITALS[m % len(VITALS)]) for m in range(fields)]
    return [
        encode_frame(1, tenant, device, seq, start_us + seq * 1000, values, flags=FLAG_ACK_REQ)
        for seq in range(count)
    ]


async def run(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    start_us = time.time_ns() // 1000 - 10_000_000 - args.seconds * 1_000_000
    per_device = args.frames_per_device
    devices = []
    for i in range(args.devices):
        frames = build_frames(args.tenant, args.first_device + i, per_device, args.fields, start_us)
        devices.append(frames)
    t0 = time.monotonic()
    cpu0 = time.process_time()
    deadline = t0 + args.seconds
    protos = []
    waits = []
    for frames in devices:
        done: asyncio.Future[None] = loop.create_future()
        proto = Device(frames, args.window, args.chunk, done, deadline)
        await loop.create_connection(lambda p=proto: p, args.host, args.port)
        protos.append(proto)
        waits.append(done)
    await asyncio.wait_for(asyncio.gather(*waits), args.seconds + 60)
    elapsed = time.monotonic() - t0
    cpu_s = time.process_time() - cpu0
    for p in protos:
        if p.transport:
            p.transport.close()
    ok = sum(p.ok for p in protos)
    return {
        "frames_ok": ok,
        "points_ok": ok * args.fields,
        "seconds": round(elapsed, 3),
        "other_statuses": sum(p.other for p in protos),
        "unacked": sum(p.inflight for p in protos),
        "connections": len(protos),
        "cpu_s": round(cpu_s, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tenant", type=int, required=True)
    p.add_argument("--first-device", type=int, required=True)
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--frames-per-device", type=int, default=10000)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--fields", type=int, default=8)
    args = p.parse_args()
    print(json.dumps(uvloop.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
