"""Traces and metrics of the ingest path, read the way an operator would: the
spans of one frame's batch (in memory here; console or OTLP in production),
and the Prometheus scrape endpoint's counters."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import aiohttp
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rmiot.config import Config, OtelConfig
from rmiot.core_ext import ACK_OK
from rmiot.ingest.client import RmfClient
from rmiot.ingest.service import IngestService
from rmiot.observability import Observability
from tests.ingest.conftest import Hospital, now_us, vitals


@pytest.fixture
async def spans() -> AsyncIterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    obs = Observability(OtelConfig(), span_processors=[SimpleSpanProcessor(exporter)])
    await obs.start()
    yield exporter
    await obs.stop()


async def _send(cfg: Config, hospital: Hospital, frames: int,
                scrape: str = "") -> str:
    """Send ``frames`` frames over TCP and wait for their acks; returns what the
    scrape endpoint says then (while the ingest service still runs)."""
    text = ""
    service = IngestService(cfg)
    await service.start()
    client = RmfClient("127.0.0.1", service.tcp.port)
    await client.connect()
    try:
        base = now_us()
        for seq in range(frames):
            client.send(vitals(hospital.tenant, hospital.plain, seq, base + seq),
                        hospital.plain, seq)
        await client.drain()
        assert await client.wait_acked(10)
        assert client.statuses == {ACK_OK: frames}
        if scrape:
            async with aiohttp.ClientSession() as http, http.get(scrape) as response:
                assert response.status == 200
                text = await response.text()
    finally:
        await client.close()
        await service.stop(drain_timeout=5)
    return text


async def test_one_frame_is_traced_from_socket_to_commit(
        ingest_cfg: Config, hospital: Hospital, spans: InMemorySpanExporter) -> None:
    await _send(ingest_cfg, hospital, 1)
    finished = spans.get_finished_spans()
    roots = [s for s in finished if s.name == "ingest.batch"
             and s.attributes and s.attributes["rmiot.device"] == hospital.plain]
    assert len(roots) == 1
    root = roots[0]
    assert root.attributes is not None
    assert root.attributes["rmiot.tenant"] == hospital.tenant
    assert root.attributes["rmiot.transport"] == "tcp"
    assert root.attributes["rmiot.rows"] == 1 and root.attributes["rmiot.seq"] == 0
    steps = {s.name: s for s in finished
             if s.parent is not None and s.parent.span_id == root.context.span_id}
    assert set(steps) == {"ingest.receive", "ingest.queue", "ingest.batch.write", "ingest.ack"}
    for step in steps.values():
        assert step.context.trace_id == root.context.trace_id
        assert step.attributes and step.attributes["rmiot.tenant"] == hospital.tenant

    def at(name: str) -> tuple[int, int]:
        span = steps[name]
        assert span.start_time is not None and span.end_time is not None
        return span.start_time, span.end_time

    # In order: read and checked, queued, written and committed, then acked.
    assert root.start_time == at("ingest.receive")[0]
    assert at("ingest.receive")[1] <= at("ingest.queue")[0] <= at("ingest.queue")[1]
    assert at("ingest.queue")[1] == at("ingest.batch.write")[0]
    assert at("ingest.batch.write")[1] == at("ingest.ack")[0]
    assert at("ingest.ack")[1] == root.end_time
    assert hospital.stored(hospital.plain) == 1


async def test_scrape_endpoint_reports_the_ingest_rate(ingest_cfg: Config,
                                                        hospital: Hospital) -> None:
    obs = Observability(OtelConfig(prometheus=True, prometheus_port=0))
    url = await obs.start()
    try:
        text = await _send(ingest_cfg, hospital, 50, scrape=url)
    finally:
        await obs.stop()

    def value(metric: str, **labels: object) -> float:
        for line in text.splitlines():
            if line.startswith(metric + "{") and all(
                    f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{metric} {labels} not in:\n{text}")

    # 50 frames of 8 vitals each, over TCP, for this tenant.
    assert value("rmiot_ingest_points_total", transport="tcp", tenant=hospital.tenant) == 400
    assert value("rmiot_ingest_frames_total", transport="tcp") == 50
    assert value("rmiot_ingest_rows_committed_total") == 50
    assert re.search(r"^rmiot_ingest_batch_duration_seconds_count\S* [1-9]", text, re.M), text
    assert value("rmiot_ingest_queue_rows") == 0
