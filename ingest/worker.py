"""An ingest worker process: the ingest service alone (device view, pipeline,
batch writers, TCP adapter), sharing ``ingest.tcp_port`` with the platform's
own process and the other workers through SO_REUSEPORT — the kernel spreads
device connections across them, so ingest uses every core (one Python process
per core; the GIL is per process). Stateless: any worker can take any device.

``python -m rmiot.ingest.worker`` with the usual configuration (file and
RMIOT_* variables). Prints ``PORT <n>`` once listening; stops cleanly (drains
its batches and acks) on SIGTERM/SIGINT. The platform starts
``ingest.processes - 1`` of these; benchmarks and fault tests run them alone.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvloop

from rmiot import logs
from rmiot.config import load
from rmiot.ingest.service import IngestService
from rmiot.observability import Observability


async def main() -> None:
    cfg = load()
    logs.setup(cfg.log.level, "json")
    observability = Observability(cfg.otel)
    await observability.start()
    service = IngestService(cfg)
    port = await service.start()
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await service.stop()
    await observability.stop()
    print(f"STATS {dict(service.pipeline.stats)}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    uvloop.run(main())
