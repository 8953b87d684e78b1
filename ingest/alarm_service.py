"""AlarmService (proto/alarm.proto): people's side of alarms, and the
platform-process machinery behind it.

Authorised by the interceptor's rules below on the request's ``tenant_id``
(0: the caller's home tenant); rows are limited to that tenant's subtree, and
an alarm, rule or channel outside it is NOT_FOUND. Watch checks each event
against the caller's rights as it goes (a revoked grant stops the flow at
once). Every call is audited by the interceptor; the steps themselves are
alarm events.

``AlarmServices`` bundles what one platform process runs for alarms: the
feed under Watch, the escalation runner and the notifier (with its MQTT
connection, when given one).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import grpc
import orjson
from psycopg_pool import AsyncConnectionPool

from rmiot.grpc_server import Context, Service
from rmiot.ingest import alarm_admin, alarm_store
from rmiot.ingest.alarm_admin import Channel, RuleSpec, Subscription
from rmiot.ingest.alarm_escalation import EscalationRunner
from rmiot.ingest.alarm_feed import AlarmFeed
from rmiot.ingest.alarm_mqtt import AlarmPublisher
from rmiot.ingest.alarm_notify import Notifier
from rmiot.ingest.alarm_rules import RANK, SEVERITIES, Rule, RuleError
from rmiot.ingest.alarm_store import Alarm, AlarmError, AlarmNotFound, Event, from_us, to_us
from rmiot.ingest.alarm_writer import AuditSink
from rmiot.proto import alarm_pb2, alarm_pb2_grpc
from rmiot.security.interceptor import MethodRule, current_caller
from rmiot.security.sm4 import Keyring
from rmiot.security.tenant_tree import TenantTree

SERVICE = alarm_pb2.DESCRIPTOR.services_by_name["AlarmService"].full_name
RULES = {
    f"/{SERVICE}/List": MethodRule("alarm", "read", "tenant_id", "device_id"),
    f"/{SERVICE}/Get": MethodRule("alarm", "read", "tenant_id", "alarm_id"),
    f"/{SERVICE}/MarkRead": MethodRule("alarm", "read", "tenant_id", "alarm_id"),
    f"/{SERVICE}/Watch": MethodRule("alarm", "read", "tenant_id", "cursor"),
    f"/{SERVICE}/Acknowledge": MethodRule("alarm", "write", "tenant_id", "alarm_id"),
    f"/{SERVICE}/Clear": MethodRule("alarm", "write", "tenant_id", "alarm_id"),
    f"/{SERVICE}/Comment": MethodRule("alarm", "write", "tenant_id", "alarm_id"),
    f"/{SERVICE}/ListRules": MethodRule("alarm", "read", "tenant_id"),
    f"/{SERVICE}/PutRule": MethodRule("alarm", "manage", "tenant_id", "id"),
    f"/{SERVICE}/DeleteRule": MethodRule("alarm", "manage", "tenant_id", "rule_id"),
    f"/{SERVICE}/ListChannels": MethodRule("alarm", "manage", "tenant_id"),
    f"/{SERVICE}/PutChannel": MethodRule("alarm", "manage", "tenant_id", "id"),
    f"/{SERVICE}/DeleteChannel": MethodRule("alarm", "manage", "tenant_id", "channel_id"),
    f"/{SERVICE}/ListSubscriptions": MethodRule("alarm", "manage", "tenant_id"),
    f"/{SERVICE}/PutSubscription": MethodRule("alarm", "manage", "tenant_id", "id"),
    f"/{SERVICE}/DeleteSubscription": MethodRule("alarm", "manage", "tenant_id",
                                                 "subscription_id"),
}
MAX_PAGE = 1000


class Authorizer(Protocol):
    def allowed(self, subject: str, tenant_id: int, obj: str, act: str) -> bool: ...
    @property
    def tree(self) -> TenantTree: ...


def _scope(tenant_id: int) -> int:
    return tenant_id or current_caller().tenant_id or 0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def event_to_proto(e: Event) -> alarm_pb2.AlarmEvent:
    return alarm_pb2.AlarmEvent(
        id=e.id, alarm_id=e.alarm_id, tenant_id=e.tenant_id, at_us=to_us(e.at), kind=e.kind,
        actor=e.actor, severity=e.severity, state=e.state,
        detail_json=orjson.dumps(e.detail).decode() if e.detail is not None else "",
        device_id=e.device_id, rule_code=e.rule_code, message=e.message,
        raised_us=to_us(e.raised_at))


def alarm_to_proto(a: Alarm) -> alarm_pb2.Alarm:
    return alarm_pb2.Alarm(
        id=a.id, rule_id=a.rule_id, rule_code=a.rule_code, kind=a.kind, tenant_id=a.tenant_id,
        device_id=a.device_id, patient_id=a.patient_id or 0, severity=a.severity,
        state=a.state, message=a.message, value=a.value or 0.0, latching=a.latching,
        onset_us=to_us(a.onset_at), raised_us=to_us(a.raised_at),
        normal_us=to_us(a.normal_at), acked_us=to_us(a.acked_at), acked_by=a.acked_by or "",
        ack_comment=a.ack_comment or "", cleared_us=to_us(a.cleared_at),
        cleared_by=a.cleared_by or "", clear_comment=a.clear_comment or "",
        escalation_step=a.escalation_step, next_escalation_us=to_us(a.next_escalation_at))


def rule_to_proto(r: Rule) -> alarm_pb2.Rule:
    return alarm_pb2.Rule(
        id=r.id, tenant_id=r.tenant_id, code=r.code, name=r.name, kind=r.kind,
        model_id=r.model_id or 0, device_id=r.device_id or 0, patient_id=r.patient_id or 0,
        severity=r.severity, enabled=r.enabled, params_json=orjson.dumps(r.params).decode(),
        escalation_json=orjson.dumps(r.raw_escalation).decode(),
        updated_us=to_us(r.updated_at))


def channel_to_proto(c: Channel) -> alarm_pb2.Channel:
    return alarm_pb2.Channel(id=c.id, tenant_id=c.tenant_id, kind=c.kind, target=c.target,
                             min_severity=c.min_severity, events=c.events,
                             max_attempts=c.max_attempts, backoff_s=c.backoff_s,
                             enabled=c.enabled)


def _json_object(text: str, name: str) -> dict[str, Any]:
    try:
        value = orjson.loads(text or "{}")
    except orjson.JSONDecodeError:
        raise RuleError(f"{name}: not JSON") from None
    if not isinstance(value, dict):
        raise RuleError(f"{name}: a JSON object")
    return value


def subscription_to_proto(s: Subscription) -> alarm_pb2.Subscription:
    return alarm_pb2.Subscription(id=s.id, tenant_id=s.tenant_id, channel_id=s.channel_id,
                                  metrics=s.metrics, max_frames=s.max_frames,
                                  start_us=to_us(s.start_at), enabled=s.enabled)


class AlarmServicer(alarm_pb2_grpc.AlarmServiceServicer):
    def __init__(self, pool: AsyncConnectionPool, authorizer: Authorizer, feed: AlarmFeed,
                 keyring: Keyring, clock: Callable[[], dt.datetime] = _now) -> None:
        self.pool = pool
        self.authorizer = authorizer
        self.feed = feed
        self.keyring = keyring
        self.clock = clock

    async def _fail(self, context: Context, exc: Exception) -> None:
        code = grpc.StatusCode.NOT_FOUND if isinstance(exc, AlarmNotFound) else \
            grpc.StatusCode.FAILED_PRECONDITION if isinstance(exc, AlarmError) else \
            grpc.StatusCode.INVALID_ARGUMENT
        await context.abort(code, str(exc))

    async def List(self, request: alarm_pb2.ListAlarmsRequest,
                   context: Context) -> alarm_pb2.ListAlarmsReply:
        size = min(request.page_size or 100, MAX_PAGE)
        if request.min_severity and request.min_severity not in SEVERITIES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "min_severity: unknown")
        if request.state not in ("", "open", "active", "acknowledged", "cleared"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "state: unknown")
        async with self.pool.connection() as conn:
            found = await alarm_store.find(
                conn, _scope(request.tenant_id), state=request.state,
                device_id=request.device_id, min_severity=request.min_severity,
                before_id=request.before_id, limit=size)
        return alarm_pb2.ListAlarmsReply(alarms=[alarm_to_proto(a) for a in found],
                                         next_before_id=found[-1].id if len(found) == size else 0)

    async def Get(self, request: alarm_pb2.AlarmRequest, context: Context) -> alarm_pb2.Alarm:
        try:
            async with self.pool.connection() as conn:
                alarm = await alarm_store.get(conn, _scope(request.tenant_id), request.alarm_id)
                events = await alarm_store.history(conn, alarm.id)
        except AlarmNotFound as exc:
            await self._fail(context, exc)
        reply = alarm_to_proto(alarm)
        reply.history.extend(event_to_proto(e) for e in events)
        return reply

    async def _step(self, request: Any, context: Context, kind: str) -> alarm_pb2.Alarm:
        scope, actor = _scope(request.tenant_id), current_caller().subject
        try:
            async with self.pool.connection() as conn:
                if kind == "acknowledge":
                    await alarm_store.acknowledge(conn, scope, request.alarm_id, actor,
                                                  request.comment, self.clock())
                elif kind == "clear":
                    await alarm_store.clear(conn, scope, request.alarm_id, actor,
                                            request.comment, self.clock())
                else:
                    await alarm_store.note(conn, scope, request.alarm_id, actor, kind,
                                           getattr(request, "comment", ""))
                alarm = await alarm_store.get(conn, scope, request.alarm_id)
        except (AlarmNotFound, AlarmError) as exc:
            await self._fail(context, exc)
        return alarm_to_proto(alarm)

    async def Acknowledge(self, request: alarm_pb2.AlarmActionRequest,
                          context: Context) -> alarm_pb2.Alarm:
        return await self._step(request, context, "acknowledge")

    async def Clear(self, request: alarm_pb2.AlarmActionRequest,
                    context: Context) -> alarm_pb2.Alarm:
        return await self._step(request, context, "clear")

    async def Comment(self, request: alarm_pb2.AlarmActionRequest,
                      context: Context) -> alarm_pb2.Alarm:
        return await self._step(request, context, "comment")

    async def MarkRead(self, request: alarm_pb2.AlarmRequest,
                       context: Context) -> alarm_pb2.Alarm:
        return await self._step(request, context, "read")

    async def Watch(self, request: alarm_pb2.WatchRequest,
                    context: Context) -> AsyncIterator[alarm_pb2.AlarmEvent]:
        if request.min_severity and request.min_severity not in SEVERITIES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "min_severity: unknown")
        scope, subject = _scope(request.tenant_id), current_caller().subject
        least = RANK.get(request.min_severity, 0)
        authorizer = self.authorizer

        def visible(e: Event) -> bool:
            return (RANK[e.severity] >= least and authorizer.tree.reaches(scope, e.tenant_id)
                    and authorizer.allowed(subject, e.tenant_id, "alarm", "read"))

        sub = self.feed.subscribe()
        try:
            cursor = request.cursor
            if cursor:
                while True:
                    async with self.pool.connection() as conn:
                        backlog = await alarm_store.events_after(conn, cursor)
                    for event in backlog:
                        cursor = event.id
                        if visible(event):
                            yield event_to_proto(event)
                    if len(backlog) < 1000:
                        break
            else:
                cursor = self.feed.cursor
            while True:
                got = await sub.queue.get()
                if got is None:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"too far behind: resume from cursor {cursor}")
                if got.id <= cursor:
                    continue
                cursor = got.id
                if visible(got):
                    yield event_to_proto(got)
        finally:
            self.feed.unsubscribe(sub)

    # -- rules and channels ------------------------------------------------------

    async def ListRules(self, request: alarm_pb2.ListRulesRequest,
                        context: Context) -> alarm_pb2.ListRulesReply:
        async with self.pool.connection() as conn:
            rules = await alarm_admin.list_rules(conn, _scope(request.tenant_id),
                                                 request.inherited)
        return alarm_pb2.ListRulesReply(rules=[rule_to_proto(r) for r in rules])

    async def PutRule(self, request: alarm_pb2.Rule, context: Context) -> alarm_pb2.Rule:
        scope = _scope(request.tenant_id)
        try:
            spec = RuleSpec(scope, request.code, request.name, request.kind,
                            request.severity or "major", request.enabled,
                            _json_object(request.params_json, "params_json"),
                            _json_object(request.escalation_json, "escalation_json"),
                            request.model_id or None, request.device_id or None,
                            request.patient_id or None)
            async with self.pool.connection() as conn:
                rule = await alarm_admin.put_rule(conn, scope, request.id, spec,
                                                  current_caller().subject)
        except (RuleError, AlarmNotFound) as exc:
            await self._fail(context, exc)
        return rule_to_proto(rule)

    async def DeleteRule(self, request: alarm_pb2.RuleRequest,
                         context: Context) -> alarm_pb2.Rule:
        try:
            async with self.pool.connection() as conn:
                rule = await alarm_admin.delete_rule(conn, _scope(request.tenant_id),
                                                     request.rule_id, current_caller().subject)
        except AlarmNotFound as exc:
            await self._fail(context, exc)
        return rule_to_proto(rule)

    async def ListChannels(self, request: alarm_pb2.ListChannelsRequest,
                           context: Context) -> alarm_pb2.ListChannelsReply:
        async with self.pool.connection() as conn:
            found = await alarm_admin.list_channels(conn, _scope(request.tenant_id))
        return alarm_pb2.ListChannelsReply(channels=[channel_to_proto(c) for c in found])

    async def PutChannel(self, request: alarm_pb2.Channel,
                         context: Context) -> alarm_pb2.Channel:
        scope = _scope(request.tenant_id)
        if request.min_severity and request.min_severity not in SEVERITIES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "min_severity: unknown")
        channel = Channel(request.id, scope, request.kind, request.target,
                          request.min_severity or "warning", list(request.events),
                          request.max_attempts, request.backoff_s, request.enabled)
        try:
            async with self.pool.connection() as conn:
                stored = await alarm_admin.put_channel(conn, scope, request.id, self.keyring,
                                                       channel, request.secret,
                                                       current_caller().subject)
        except (RuleError, AlarmNotFound) as exc:
            await self._fail(context, exc)
        return channel_to_proto(stored)

    async def DeleteChannel(self, request: alarm_pb2.ChannelRequest,
                            context: Context) -> alarm_pb2.Channel:
        try:
            async with self.pool.connection() as conn:
                gone = await alarm_admin.delete_channel(conn, _scope(request.tenant_id),
                                                        request.channel_id)
        except AlarmNotFound as exc:
            await self._fail(context, exc)
        return channel_to_proto(gone)

    async def ListSubscriptions(self, request: alarm_pb2.ListSubscriptionsRequest,
                                context: Context) -> alarm_pb2.ListSubscriptionsReply:
        async with self.pool.connection() as conn:
            found = await alarm_admin.list_subscriptions(conn, _scope(request.tenant_id))
        return alarm_pb2.ListSubscriptionsReply(
            subscriptions=[subscription_to_proto(s) for s in found])

    async def PutSubscription(self, request: alarm_pb2.Subscription,
                              context: Context) -> alarm_pb2.Subscription:
        scope = _scope(request.tenant_id)
        sub = Subscription(request.id, scope, request.channel_id, list(request.metrics),
                           request.max_frames, from_us(request.start_us) if request.start_us
                           else self.clock(), request.enabled)
        try:
            async with self.pool.connection() as conn:
                stored = await alarm_admin.put_subscription(conn, scope, sub,
                                                            current_caller().subject)
        except (RuleError, AlarmNotFound) as exc:
            await self._fail(context, exc)
        return subscription_to_proto(stored)

    async def DeleteSubscription(self, request: alarm_pb2.SubscriptionRequest,
                                 context: Context) -> alarm_pb2.Subscription:
        try:
            async with self.pool.connection() as conn:
                gone = await alarm_admin.delete_subscription(conn, _scope(request.tenant_id),
                                                             request.subscription_id)
        except AlarmNotFound as exc:
            await self._fail(context, exc)
        return subscription_to_proto(gone)


class Outbound(Protocol):
    """Hospital systems' channels (hl7, fhir) and observation subscriptions
    (``rmiot.outbound``, which ingest may not import)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def send(self, conn: Any, delivery: int, event_id: int | None, channel_id: int,
                   kind: str, target: str, tenant: int
                   ) -> tuple[bool, int | None, str | None]: ...


class AlarmServices:
    """The feed, escalation and notifier of one platform process, and the
    servicer to mount."""

    def __init__(self, dsn: str, pool: AsyncConnectionPool, authorizer: Authorizer,
                 keyring: Keyring, audit: AuditSink | None,
                 mqtt: AlarmPublisher | None = None, outbound: Outbound | None = None) -> None:
        self.feed = AlarmFeed(dsn)
        self.escalation = EscalationRunner(dsn, audit)
        self.mqtt = mqtt  # None: MQTT channels fail (and dead-letter)
        self.outbound = outbound  # None: hl7 and fhir channels fail (and dead-letter)
        self.notifier = Notifier(dsn, keyring, mqtt.publish if mqtt is not None else None,
                                 outbound=outbound.send if outbound is not None else None)
        self.servicer = AlarmServicer(pool, authorizer, self.feed, keyring)

    async def start(self) -> None:
        await self.feed.start()
        await self.escalation.start()
        if self.mqtt is not None:
            await self.mqtt.start()
        if self.outbound is not None:
            await self.outbound.start()
        await self.notifier.start()

    def service(self) -> Service:
        return Service(SERVICE, alarm_pb2_grpc.add_AlarmServiceServicer_to_server,
                       self.servicer)

    async def stop(self) -> None:
        await self.notifier.stop()
        if self.outbound is not None:
            await self.outbound.stop()
        if self.mqtt is not None:
            await self.mqtt.stop()
        await self.escalation.stop()
        await self.feed.stop()
