"""The ingest service alone, as a process of its own, for benchmarks and fault
tests: ``python benches/ingest_server.py`` with the usual configuration (file
and RMIOT_* variables). Prints ``PORT <n>`` once listening; stops cleanly on
SIGTERM/SIGINT. Uses uvloop like the platform."""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop

from rmiot import logs
from rmiot.config import load
from rmiot.ingest.service import IngestService


async def main() -> None:
    cfg = load()
    logs.setup(cfg.log.level, "json")
    service = IngestService(cfg)
    port = await service.start()
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await service.stop()
    stats = dict(service.pipeline.stats)
    print(f"STATS {stats}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    uvloop.run(main())
