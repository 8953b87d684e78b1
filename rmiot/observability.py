"""OpenTelemetry traces and metrics of one platform process (``[otel]``).

Contract:

- ``Observability(cfg.otel).start()`` installs this process's tracer and
  meter providers with the configured exporters (``exporter``: none, console
  or otlp) and, with ``prometheus = true``, serves ``/metrics`` on its own
  port. Until then, and with ``exporter = "none"`` and no Prometheus, every
  hook below is a no-op: ``TRACING`` / ``METERING`` are False and
  ``instruments`` hold no-op instruments.
- Hot paths never make an object per frame: they check ``TRACING`` /
  ``METERING`` (module attributes) first, count into plain dicts once per read
  or per batch, and register a ``watch`` callback that the SDK calls only at
  collection time (a scrape, or every ``metric_interval_s``).
- A batch of frames is one trace (``BatchTrace``): the pipeline and the batch
  writer note timestamps as the batch goes — received, accepted, handed to
  the writers, written, acknowledged — and the spans are made once, after the
  acks went out, with those times: ``ingest.batch`` (root, tenant, device,
  transport) over ``ingest.receive``, ``ingest.queue``, ``ingest.batch.write``
  and ``ingest.ack``.
- RPCs (``rmiot.rpc_tracing``) and dashboard requests make one server span
  each, with the tenant the security layer resolved as ``rmiot.tenant``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from rmiot.config import OtelConfig

log = logging.getLogger("rmiot.observability")

TRACING = False   # spans are made (a tracer provider with an exporter is installed)
METERING = False  # metrics are collected (a meter provider is installed)

Attributes = Mapping[str, Any]
Sample = tuple[Attributes, float]
# name -> (kind, unit, description) of the values read at collection time.
OBSERVED: dict[str, tuple[str, str, str]] = {
    "rmiot.ingest.points": ("counter", "{point}",
                            "points received, by transport and tenant"),
    "rmiot.ingest.frames": ("counter", "{frame}", "frames received, by transport"),
    "rmiot.ingest.rows_committed": ("counter", "{row}", "telemetry rows committed"),
    "rmiot.ingest.queue.batches": ("gauge", "{batch}",
                                   "batches waiting for or in a batch writer"),
    "rmiot.ingest.queue.rows": ("gauge", "{row}", "rows handed to the writers, not committed"),
    "rmiot.ingest.connections": ("gauge", "{connection}", "open device connections"),
    "rmiot.outbox.backlog": ("gauge", "{frame}", "frames waiting for the uplink (hospital role)"),
    "rmiot.outbox.oldest": ("gauge", "s", "age of the oldest frame waiting for the uplink"),
}
_WATCHERS: dict[str, list[Callable[[], Iterable[Sample]]]] = {name: [] for name in OBSERVED}


def watch(name: str, read: Callable[[], Iterable[Sample]]) -> Callable[[], None]:
    """Have ``read`` report values of ``name`` at each collection; returns the
    function that stops it (call it when the source stops)."""
    _WATCHERS[name].append(read)

    def unwatch() -> None:
        if read in _WATCHERS[name]:
            _WATCHERS[name].remove(read)
    return unwatch


def _observe(name: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
    def callback(options: CallbackOptions) -> Iterable[Observation]:
        out: list[Observation] = []
        for read in list(_WATCHERS[name]):
            try:
                out += [Observation(value, dict(attrs)) for attrs, value in read()]
            except Exception:  # a source being stopped must not break the others
                log.debug("metric source failed", exc_info=True, extra={"metric": name})
        return out
    return callback


@dataclass
class Instruments:
    """The recorded (not observed) metrics; no-ops until a provider is installed."""

    batch_duration: metrics.Histogram
    batch_rows: metrics.Histogram
    rpc_duration: metrics.Histogram
    query_duration: metrics.Histogram
    http_duration: metrics.Histogram
    alarm_latency: metrics.Histogram

    @classmethod
    def of(cls, meter: metrics.Meter) -> Instruments:
        return cls(
            batch_duration=meter.create_histogram(
                "rmiot.ingest.batch.duration", "s", "batch commit: COPY to commit"),
            batch_rows=meter.create_histogram("rmiot.ingest.batch.rows", "{row}",
                                              "rows per batch"),
            rpc_duration=meter.create_histogram("rmiot.rpc.duration", "s",
                                                "gRPC calls, by method and status"),
            query_duration=meter.create_histogram("rmiot.query.duration", "s",
                                                  "QueryService calls, by tier and method"),
            http_duration=meter.create_histogram("rmiot.http.duration", "s",
                                                 "dashboard requests, by route and status"),
            alarm_latency=meter.create_histogram(
                "rmiot.alarm.latency", "s",
                "from the measurement that raised an alarm to the alarm's commit"))


instruments = Instruments.of(metrics.NoOpMeterProvider().get_meter("rmiot"))
_tracer: trace.Tracer = trace.NoOpTracer()


def tracer() -> trace.Tracer:
    """This process's tracer (a no-op one until ``Observability.start``)."""
    return _tracer


@dataclass
class Observability:
    """The providers and exporters of one process. ``span_processors`` and
    ``metric_readers`` add to the configured ones (tests read spans and
    metrics in memory this way)."""

    cfg: OtelConfig
    span_processors: list[SpanProcessor] = field(default_factory=list)
    metric_readers: list[MetricReader] = field(default_factory=list)
    tracer_provider: TracerProvider | None = None
    meter_provider: MeterProvider | None = None
    prometheus_port: int = 0
    _runner: Any = None

    async def start(self) -> str:
        """Install the providers, start the exporters and the scrape endpoint;
        returns where metrics can be scraped ("" when not served)."""
        global TRACING, METERING, _tracer, instruments
        resource = Resource.create({"service.name": self.cfg.service_name})
        processors = list(self.span_processors)
        readers = list(self.metric_readers)
        if self.cfg.exporter == "console":
            processors.append(BatchSpanProcessor(ConsoleSpanExporter()))
            readers.append(PeriodicExportingMetricReader(
                ConsoleMetricExporter(), export_interval_millis=self.cfg.metric_interval_s * 1e3))
        elif self.cfg.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
                OTLPMetricExporter,
            )
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            processors.append(BatchSpanProcessor(OTLPSpanExporter(
                endpoint=self.cfg.otlp_endpoint, insecure=self.cfg.otlp_insecure)))
            readers.append(PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=self.cfg.otlp_endpoint,
                                   insecure=self.cfg.otlp_insecure),
                export_interval_millis=self.cfg.metric_interval_s * 1e3))
        scrape = ""
        if self.cfg.prometheus:
            scrape = await self._serve_prometheus(readers)
        if processors:
            provider = TracerProvider(
                resource=resource, sampler=ParentBased(TraceIdRatioBased(self.cfg.sample_ratio)))
            for processor in processors:
                provider.add_span_processor(processor)
            self.tracer_provider = provider
            _tracer = provider.get_tracer("rmiot")
            TRACING = True
        if readers:
            self.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
            meter = self.meter_provider.get_meter("rmiot")
            for name, (kind, unit, description) in OBSERVED.items():
                make = (meter.create_observable_counter if kind == "counter"
                        else meter.create_observable_gauge)
                make(name, [_observe(name)], unit, description)
            instruments = Instruments.of(meter)
            METERING = True
        return scrape

    async def _serve_prometheus(self, readers: list[MetricReader]) -> str:
        from aiohttp import web
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        # A registry of our own, not prometheus_client's global one: a second
        # start in one process (tests) registers afresh.
        registry = CollectorRegistry(auto_describe=True)
        readers.append(PrometheusMetricReader(registry=registry))

        async def scrape(request: web.Request) -> web.Response:
            # Collection runs the watch callbacks: on the loop, next to their data.
            return web.Response(body=generate_latest(registry),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", scrape)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.cfg.prometheus_host, self.cfg.prometheus_port,
                           reuse_address=True)
        await site.start()
        self._runner = runner
        self.prometheus_port = bound_port(site)
        return f"http://{self.cfg.prometheus_host}:{self.prometheus_port}/metrics"

    async def stop(self) -> None:
        """Flush and uninstall what this one installed (its hooks are no-ops again)."""
        global TRACING, METERING, _tracer, instruments
        if self.tracer_provider is not None:
            TRACING = False
            _tracer = trace.NoOpTracer()
        if self.meter_provider is not None:
            METERING = False
            instruments = Instruments.of(metrics.NoOpMeterProvider().get_meter("rmiot"))
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


def bound_port(site: Any) -> int:
    """The port an aiohttp ``TCPSite`` bound (configured as 0: the system's pick)."""
    server = site._server
    assert server is not None and server.sockets
    return int(server.sockets[0].getsockname()[1])


class BatchTrace:
    """Timestamps (ns since the epoch) of one batch on its way, made into
    spans once its acks are out (``emit``)."""

    __slots__ = ("accepted_ns", "acked_ns", "device", "duplicates", "queued_ns", "received_ns",
                 "rejected", "rows", "seq", "tenant", "tenants", "transport", "writing_ns",
                 "written_ns")

    def __init__(self, transport: str, received_ns: int, device: int, seq: int,
                 tenant: int) -> None:
        self.transport = transport
        self.received_ns = received_ns
        self.accepted_ns = self.queued_ns = self.writing_ns = self.written_ns = 0
        self.acked_ns = 0
        self.device, self.seq, self.tenant = device, seq, tenant
        self.tenants: set[int] = set()
        self.rows = self.duplicates = self.rejected = 0

    def emit(self) -> None:
        tr = _tracer
        now = time.time_ns()
        root = tr.start_span("ingest.batch", kind=trace.SpanKind.SERVER,
                             start_time=self.received_ns, attributes={
                                 "rmiot.transport": self.transport,
                                 "rmiot.tenant": self.tenant,
                                 "rmiot.tenants": sorted(self.tenants or {self.tenant}),
                                 "rmiot.device": self.device, "rmiot.seq": self.seq,
                                 "rmiot.rows": self.rows,
                                 "rmiot.duplicates": self.duplicates,
                                 "rmiot.rejected": self.rejected})
        if not root.is_recording():
            return
        ctx = trace.set_span_in_context(root)
        steps = (("ingest.receive", self.received_ns, self.accepted_ns),
                 ("ingest.queue", self.queued_ns, self.writing_ns),
                 ("ingest.batch.write", self.writing_ns, self.written_ns),
                 ("ingest.ack", self.written_ns, self.acked_ns or now))
        for name, start, end in steps:
            if start and end:
                tr.start_span(name, context=ctx, start_time=start, attributes={
                    "rmiot.tenant": self.tenant}).end(end_time=end)
        root.end(end_time=self.acked_ns or now)
