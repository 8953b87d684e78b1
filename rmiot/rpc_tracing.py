"""Spans and latency of every gRPC call (``rmiot.observability``).

``RpcTracing`` is the outermost server interceptor: one SERVER span per call
(``rpc.system``, ``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``;
the security interceptor inside it adds ``rmiot.tenant``, ``enduser.id`` and
``rmiot.outcome`` once it has resolved them), the call's duration in
``rmiot.rpc.duration``, and for QueryService methods also in
``rmiot.query.duration`` by tier. Health checks and reflection are left out,
as the security interceptor leaves them out of the audit log. With
observability off it hands the handler on untouched.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import grpc
from opentelemetry import trace

from rmiot import observability
from rmiot.grpc_server import Context, ServerInterceptor

UNTRACED = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class RpcTracing(ServerInterceptor):
    def __init__(self, tiers: Mapping[str, str] | None = None) -> None:
        self.tiers = dict(tiers or {})  # full method name -> query tier

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
            details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(UNTRACED) or not (
                observability.TRACING or observability.METERING):
            return handler
        if handler.unary_stream or handler.stream_stream:
            wrap = (grpc.unary_stream_rpc_method_handler if handler.unary_stream
                    else grpc.stream_stream_rpc_method_handler)
            return wrap(self._streaming(handler.unary_stream or handler.stream_stream, method),
                        request_deserializer=handler.request_deserializer,
                        response_serializer=handler.response_serializer)
        wrap = (grpc.unary_unary_rpc_method_handler if handler.unary_unary
                else grpc.stream_unary_rpc_method_handler)
        return wrap(self._unary(handler.unary_unary or handler.stream_unary, method),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)

    def _start(self, method: str) -> trace.Span:
        service, _, name = method.lstrip("/").rpartition("/")
        return observability.tracer().start_span(
            method.lstrip("/"), kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name})

    def _finish(self, span: trace.Span, method: str, context: Context, started: float,
                failed: BaseException | None) -> None:
        code: Any = context.code()  # None until set; a StatusCode (or its int) after
        if code is None:
            code = grpc.StatusCode.UNKNOWN if failed is not None else grpc.StatusCode.OK
        status = code.value[0] if isinstance(code, grpc.StatusCode) else int(code)
        span.set_attribute("rpc.grpc.status_code", status)
        if status != 0:
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(code)))
        span.end()
        elapsed = time.perf_counter() - started
        attrs = {"rpc.method": method, "rpc.grpc.status_code": status}
        observability.instruments.rpc_duration.record(elapsed, attrs)
        tier = self.tiers.get(method)
        if tier is not None:
            observability.instruments.query_duration.record(elapsed, {**attrs, "tier": tier})

    def _unary(self, behavior: Callable[..., Awaitable[Any]],
               method: str) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(behavior)
        async def traced(request: Any, context: Context) -> Any:
            span, started, failed = self._start(method), time.perf_counter(), None
            try:
                with trace.use_span(span, end_on_exit=False):
                    return await behavior(request, context)
            except BaseException as exc:
                failed = exc
                raise
            finally:
                self._finish(span, method, context, started, failed)
        return traced

    def _streaming(self, behavior: Callable[..., AsyncIterator[Any]],
                   method: str) -> Callable[..., AsyncIterator[Any]]:
        @functools.wraps(behavior)
        async def traced(request: Any, context: Context) -> AsyncIterator[Any]:
            span, started, failed = self._start(method), time.perf_counter(), None
            try:
                with trace.use_span(span, end_on_exit=False):
                    async for item in behavior(request, context):
                        yield item
            except BaseException as exc:
                failed = exc
                raise
            finally:
                self._finish(span, method, context, started, failed)
        return traced
