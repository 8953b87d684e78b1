"""WorkerPool: the extra ingest processes of one platform host.

The platform process runs one IngestService itself and starts
``ingest.processes - 1`` worker processes (``python -m rmiot.ingest.worker``)
on the same port; 0 means one process per core. A worker that dies is
started again after a short pause (devices reconnect and retransmit what was
not acknowledged); stopping sends SIGTERM, so each worker drains its batches
and acks first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys

from rmiot.config import Config

log = logging.getLogger("rmiot.ingest.workers")


def process_count(cfg: Config) -> int:
    return cfg.ingest.processes or os.cpu_count() or 1


class WorkerPool:
    def __init__(self, cfg: Config, port: int) -> None:
        self.cfg = cfg
        self.port = port
        self.procs: list[asyncio.subprocess.Process] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    async def start(self) -> int:
        """Start the workers; returns how many."""
        count = process_count(self.cfg) - 1
        for index in range(count):
            self._tasks.append(asyncio.create_task(self._keep(index),
                                                   name=f"ingest-worker-{index}"))
        return count

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        env = {**os.environ, "RMIOT_INGEST_TCP_PORT": str(self.port)}
        if self.cfg.otel.prometheus:  # each worker serves its own metrics, on the next ports
            port = self.cfg.otel.prometheus_port
            env["RMIOT_OTEL_PROMETHEUS_PORT"] = str(port + 1 + index if port else 0)
        if self.cfg.source != "defaults":
            env["RMIOT_CONFIG"] = self.cfg.source
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rmiot.ingest.worker", env=env,
            stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        if not line.startswith(b"PORT "):
            raise RuntimeError(f"ingest worker did not start: {line!r}")
        return proc

    async def _keep(self, index: int) -> None:
        delay = 1.0
        while not self._stopping:
            try:
                proc = await self._spawn(index)
            except (OSError, RuntimeError) as exc:
                log.error("ingest worker failed to start", extra={"error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            self.procs.append(proc)
            code = await proc.wait()
            self.procs.remove(proc)
            if not self._stopping:
                log.error("ingest worker exited; starting it again",
                          extra={"worker": index, "code": code})
                await asyncio.sleep(delay)

    async def stop(self, timeout: float = 15.0) -> None:
        self._stopping = True
        for proc in list(self.procs):
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in list(self.procs):
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
