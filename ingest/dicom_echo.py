"""DICOM C-ECHO of imaging equipment, fed into telemetry (standard 9.5, DICOM 3.0).

Imaging devices (CT, MR, DR…) are registered like any device, with their
DICOM address in the device's attrs: ``{"dicom": {"ae_title", "host",
"port"}}`` (``registry.imaging.set_dicom_address``). Every
``dicom.interval_s`` the poller sends each active one a C-ECHO (Verification
SOP class, pynetdicom) as ``dicom.ae_title``, at most ``CONCURRENCY`` at once,
each bounded by ``dicom.timeout_s``, and hands the pipeline one STATUS frame
per device: metric 304 device_state = 0 (it answers: online) or 2 (no
association or a failed echo: down) — the catalogue's own metric, so imaging
modalities appear in asset KPIs (uptime is the share of 0s over time) and in
dispatch like any other device. The frames go through the same checks,
de-duplication and acknowledgement after commit as a device's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from rmiot import db
from rmiot.config import Config
from rmiot.core_ext import FrameDecoder, encode_frame
from rmiot.ingest.pipeline import Pipeline

log = logging.getLogger("rmiot.ingest.dicom")
KIND_STATUS = 4
DEVICE_STATE = 304
ONLINE, DOWN = 0, 2
VTYPE_I32 = 3
CONCURRENCY = 16


@dataclass(frozen=True)
class Modality:
    device: int
    tenant: int
    ae_title: str
    host: str
    port: int


def echo(calling: str, target: Modality, timeout: float) -> bool:
    """One C-ECHO: True when the modality accepted the association and answered
    with status Success (blocking: run it in a thread)."""
    # A refused or unreachable port is answered here: pynetdicom leaves its
    # socket unclosed on that path.
    try:
        socket.create_connection((target.host, target.port), timeout).close()
    except OSError:
        return False
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    assoc = ae.associate(target.host, target.port, ae_title=target.ae_title)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and int(status.Status) == 0
    finally:
        assoc.release()


class _Sink:
    """The poller's acks are not needed: the next poll says the state again."""

    def send(self, data: bytes) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class DicomEcho:
    def __init__(self, cfg: Config, pipeline: Pipeline) -> None:
        self.cfg = cfg
        self.pipeline = pipeline
        self.dsn = db.app_dsn(cfg)
        self.sink = _Sink()
        self.last: dict[int, bool] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dicom-echo")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.poll_once()
            except (psycopg.Error, OSError) as exc:
                log.warning("DICOM echo round failed", extra={"error": str(exc).strip()})
            await asyncio.sleep(max(0.0, self.cfg.dicom.interval_s -
                                    (time.monotonic() - started)))

    async def modalities(self) -> list[Modality]:
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            cur = await conn.execute(
                b"SELECT id, tenant_id, attrs -> 'dicom' FROM devices "
                b"WHERE state = 'active' AND attrs ? 'dicom' ORDER BY id")
            rows = await cur.fetchall()
        out = []
        for device, tenant, address in rows:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                out.append(Modality(device, tenant, str(address["ae_title"]),
                                    str(address["host"]), int(address["port"])))
        return out

    async def poll_once(self) -> dict[int, bool]:
        """Echo every modality once; hand the pipeline their states."""
        targets = await self.modalities()
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(target: Modality) -> bool:
            async with gate:
                try:
                    return await asyncio.to_thread(echo, self.cfg.dicom.ae_title, target,
                                                   self.cfg.dicom.timeout_s)
                except (OSError, RuntimeError, ValueError):
                    return False

        results = await asyncio.gather(*(one(t) for t in targets))
        now_us = time.time_ns() // 1000
        raw = b"".join(
            encode_frame(KIND_STATUS, t.tenant, t.device, (now_us // 1_000_000) & 0xFFFFFFFF,
                         now_us, [(DEVICE_STATE, VTYPE_I32, ONLINE if ok else DOWN)])
            for t, ok in zip(targets, results, strict=True))
        if raw:
            events: list[Any] = FrameDecoder().feed(raw)
            self.pipeline.accept(events, self.sink)
        self.last = {t.device: ok for t, ok in zip(targets, results, strict=True)}
        return self.last
