"""Rules and notification channels in the database: create, replace, delete
(soft: a rule's alarms keep pointing at it), list — each within a tenant's
subtree (the caller's scope); anything outside is ``AlarmNotFound``.

A rule is written whole (``put_rule``): its params are validated and stored
with their defaults (``alarm_rules.check_rule``). A device, model or patient a
rule narrows to must be within the rule's tenant's reach: a device or patient
of its subtree, any model. A webhook channel's secret is sealed (SM4-GCM,
bound to the channel id) and never read back.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

import psycopg
from psycopg.types.json import Jsonb

from rmiot.ingest.alarm_rules import RULE_COLUMNS, Rule, RuleError, check_rule, rule_from_row
from rmiot.ingest.alarm_store import IN_SUBTREE, AlarmNotFound
from rmiot.security.sealed import alarm_channel_aad as channel_secret_aad
from rmiot.security.sm4 import Keyring

AsyncConn = psycopg.AsyncConnection[Any]
EVENT_KINDS = ("raised", "acknowledged", "cleared", "normal", "escalated", "renotified",
               "comment", "read")


@dataclass(frozen=True, slots=True)
class RuleSpec:
    tenant_id: int
    code: str
    name: str
    kind: str
    severity: str
    enabled: bool
    params: dict[str, Any]
    escalation: dict[str, Any]
    model_id: int | None = None
    device_id: int | None = None
    patient_id: int | None = None


@dataclass(frozen=True, slots=True)
class Channel:
    id: int
    tenant_id: int
    kind: str
    target: str
    min_severity: str
    events: list[str]
    max_attempts: int
    backoff_s: float
    enabled: bool


async def _in_scope(conn: AsyncConn, scope: int, tenant: int) -> bool:
    cur = await conn.execute(b"SELECT 1 FROM tenants WHERE id = %s AND path @> ARRAY[%s]::int[]",
                             (tenant, scope))
    return await cur.fetchone() is not None


async def _check_targets(conn: AsyncConn, spec: RuleSpec) -> None:
    if spec.device_id is not None:
        cur = await conn.execute(
            b"SELECT 1 FROM devices d JOIN tenants t ON t.id = coalesce(d.department_id, "
            b"d.tenant_id) WHERE d.id = %s AND (t.path @> ARRAY[%s]::int[] OR d.tenant_id = %s)",
            (spec.device_id, spec.tenant_id, spec.tenant_id))
        if await cur.fetchone() is None:
            raise AlarmNotFound(f"device {spec.device_id} not found")
    if spec.patient_id is not None:
        cur = await conn.execute(
            b"SELECT 1 FROM patients p JOIN tenants t ON t.id = p.tenant_id "
            b"WHERE p.id = %s AND (t.path @> ARRAY[%s]::int[] OR %s = ANY (t.path))",
            (spec.patient_id, spec.tenant_id, spec.tenant_id))
        if await cur.fetchone() is None:
            raise AlarmNotFound(f"patient {spec.patient_id} not found")
    if spec.model_id is not None:
        cur = await conn.execute(b"SELECT 1 FROM device_models WHERE id = %s", (spec.model_id,))
        if await cur.fetchone() is None:
            raise AlarmNotFound(f"device model {spec.model_id} not found")


async def put_rule(conn: AsyncConn, scope: int, rule_id: int, spec: RuleSpec,
                   actor: str) -> Rule:
    """Create (rule_id 0) or replace a rule of the scope's subtree."""
    params = check_rule(spec.kind, spec.severity, spec.params, spec.escalation,
                        (spec.model_id, spec.device_id, spec.patient_id))
    if not await _in_scope(conn, scope, spec.tenant_id):
        raise AlarmNotFound(f"tenant {spec.tenant_id} not found")
    await _check_targets(conn, spec)
    values = (spec.tenant_id, spec.code, spec.name, spec.kind, spec.model_id, spec.device_id,
              spec.patient_id, spec.severity, spec.enabled, Jsonb(params),
              Jsonb(spec.escalation), actor)
    try:
        if rule_id:
            cur = await conn.execute(
                f"UPDATE alarm_rules SET tenant_id = %s, code = %s, name = %s, kind = %s, "
                f"model_id = %s, device_id = %s, patient_id = %s, severity = %s, enabled = %s, "
                f"params = %s, escalation = %s, updated_by = %s, updated_at = now() "
                f"WHERE id = %s AND deleted_at IS NULL AND {IN_SUBTREE} "
                f"RETURNING {RULE_COLUMNS}".encode(), (*values, rule_id, scope))
        else:
            cur = await conn.execute(
                f"INSERT INTO alarm_rules (tenant_id, code, name, kind, model_id, device_id, "
                f"patient_id, severity, enabled, params, escalation, updated_by, created_by) "
                f"VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                f"RETURNING {RULE_COLUMNS}".encode(), (*values, actor))
    except psycopg.errors.UniqueViolation:
        raise RuleError(f"a rule {spec.code!r} already exists at that scope; "
                        "replace it instead") from None
    except psycopg.errors.CheckViolation as exc:
        raise RuleError(exc.diag.message_primary or "rule refused") from None
    row = await cur.fetchone()
    if row is None:
        raise AlarmNotFound(f"rule {rule_id} not found")
    return rule_from_row(row)


async def delete_rule(conn: AsyncConn, scope: int, rule_id: int, actor: str) -> Rule:
    cur = await conn.execute(
        f"UPDATE alarm_rules SET deleted_at = now(), enabled = false, updated_by = %s, "
        f"updated_at = now() WHERE id = %s AND deleted_at IS NULL AND {IN_SUBTREE} "
        f"RETURNING {RULE_COLUMNS}".encode(), (actor, rule_id, scope))
    row = await cur.fetchone()
    if row is None:
        raise AlarmNotFound(f"rule {rule_id} not found")
    return rule_from_row(row)


async def list_rules(conn: AsyncConn, scope: int, inherited: bool) -> list[Rule]:
    """The subtree's rules; with ``inherited``, its ancestors' too."""
    where = IN_SUBTREE + (" OR tenant_id = ANY ((SELECT path FROM tenants WHERE id = %s)::int[])"
                          if inherited else "")
    params = (scope, scope) if inherited else (scope,)
    cur = await conn.execute(f"SELECT {RULE_COLUMNS} FROM alarm_rules WHERE deleted_at IS NULL "
                             f"AND ({where}) ORDER BY id".encode(), params)
    return [rule_from_row(row) for row in await cur.fetchall()]


_CHANNEL_COLUMNS = ("id, tenant_id, kind, target, min_severity, events, max_attempts, "
                    "backoff_s, enabled")


def _check_channel(kind: str, target: str, secret: bytes, events: list[str]) -> None:
    if kind not in ("webhook", "mqtt", "hl7", "fhir"):
        raise RuleError("kind: webhook, mqtt, hl7 or fhir")
    if kind == "hl7":
        url = urlsplit(target)
        if url.scheme not in ("mllp", "mllps") or not url.hostname or not _port(url):
            raise RuleError("target: mllp://host:port or mllps://host:port (TLS)")
    elif kind == "fhir":
        if not target.startswith(("https://", "http://")):
            raise RuleError("target: the FHIR base URL, http(s)")
    elif kind == "webhook":
        if not target.startswith(("https://", "http://")):
            raise RuleError("target: an http(s) URL")
        if len(secret) < 16:
            raise RuleError("secret: at least 16 bytes for the webhook's HMAC")
    elif not target or any(c in target for c in "+#") or len(target) > 200:
        raise RuleError("target: an MQTT topic without wildcards")
    unknown = set(events) - set(EVENT_KINDS)
    if unknown:
        raise RuleError(f"events: unknown kinds {', '.join(sorted(unknown))}")


async def put_channel(conn: AsyncConn, scope: int, channel_id: int, keyring: Keyring,
                      channel: Channel, secret: bytes, actor: str) -> Channel:
    """Create (id 0) or replace a channel; a replaced webhook keeps its secret
    unless a new one is given."""
    events = channel.events or ["raised", "escalated", "renotified", "acknowledged", "cleared"]
    if not (channel_id and channel.kind == "webhook" and not secret):
        _check_channel(channel.kind, channel.target, secret, events)
    if not await _in_scope(conn, scope, channel.tenant_id):
        raise AlarmNotFound(f"tenant {channel.tenant_id} not found")
    async with conn.transaction():
        values = (channel.tenant_id, channel.kind, channel.target, channel.min_severity, events,
                  channel.max_attempts or 8, channel.backoff_s or 1.0, channel.enabled)
        try:
            if channel_id:
                cur = await conn.execute(
                    f"UPDATE alarm_channels SET tenant_id = %s, kind = %s, target = %s, "
                    f"min_severity = %s, events = %s, max_attempts = %s, backoff_s = %s, "
                    f"enabled = %s WHERE id = %s AND {IN_SUBTREE} "
                    f"RETURNING {_CHANNEL_COLUMNS}".encode(), (*values, channel_id, scope))
            else:
                cur = await conn.execute(
                    f"INSERT INTO alarm_channels (tenant_id, kind, target, min_severity, events, "
                    f"max_attempts, backoff_s, enabled, created_by, secret_enc) VALUES "
                    f"(%s, %s, %s, %s, %s, %s, %s, %s, %s, CASE WHEN %s = 'webhook' "
                    f"THEN '\\x00'::bytea END) RETURNING {_CHANNEL_COLUMNS}".encode(),
                    (*values, actor, channel.kind))
        except psycopg.errors.CheckViolation as exc:
            raise RuleError(exc.diag.message_primary or "channel refused") from None
        row = await cur.fetchone()
        if row is None:
            raise AlarmNotFound(f"channel {channel_id} not found")
        stored = Channel(*row)
        if secret:
            await conn.execute(b"UPDATE alarm_channels SET secret_enc = %s WHERE id = %s",
                               (keyring.seal(secret, channel_secret_aad(stored.id)), stored.id))
    return stored


def _port(url: SplitResult) -> int | None:
    try:
        return url.port
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class Subscription:
    id: int
    tenant_id: int
    channel_id: int
    metrics: list[int]
    max_frames: int
    start_at: dt.datetime
    enabled: bool


_SUBSCRIPTION_COLUMNS = "id, tenant_id, channel_id, metrics, max_frames, start_at, enabled"


async def put_subscription(conn: AsyncConn, scope: int, sub: Subscription,
                           actor: str) -> Subscription:
    """Create (id 0) or replace an observation subscription: its tenant in the
    scope's subtree, its channel an hl7 or fhir channel of an ancestor of that
    tenant (or the tenant itself) within the scope."""
    if not await _in_scope(conn, scope, sub.tenant_id):
        raise AlarmNotFound(f"tenant {sub.tenant_id} not found")
    cur = await conn.execute(
        f"SELECT kind FROM alarm_channels WHERE id = %s AND {IN_SUBTREE} AND tenant_id = ANY "
        f"((SELECT path FROM tenants WHERE id = %s)::int[])".encode(),
        (sub.channel_id, scope, sub.tenant_id))
    row = await cur.fetchone()
    if row is None:
        raise AlarmNotFound(f"channel {sub.channel_id} not found")
    if row[0] not in ("hl7", "fhir"):
        raise RuleError("channel: observations go to hl7 or fhir channels")
    if not 1 <= (sub.max_frames or 100) <= 1000:
        raise RuleError("max_frames: 1 to 1000")
    values = (sub.tenant_id, sub.channel_id, sub.metrics, sub.max_frames or 100, sub.start_at,
              sub.enabled)
    if sub.id:
        cur = await conn.execute(
            f"UPDATE outbound_subscriptions SET tenant_id = %s, channel_id = %s, metrics = %s, "
            f"max_frames = %s, start_at = %s, enabled = %s WHERE id = %s AND {IN_SUBTREE} "
            f"RETURNING {_SUBSCRIPTION_COLUMNS}".encode(), (*values, sub.id, scope))
    else:
        cur = await conn.execute(
            f"INSERT INTO outbound_subscriptions (tenant_id, channel_id, metrics, max_frames, "
            f"start_at, enabled, created_by) VALUES (%s, %s, %s, %s, %s, %s, %s) "
            f"RETURNING {_SUBSCRIPTION_COLUMNS}".encode(), (*values, actor))
    got = await cur.fetchone()
    if got is None:
        raise AlarmNotFound(f"subscription {sub.id} not found")
    return Subscription(*got)


async def delete_subscription(conn: AsyncConn, scope: int, sub_id: int) -> Subscription:
    """Disabled, not deleted: its cursors and deliveries stay."""
    cur = await conn.execute(
        f"UPDATE outbound_subscriptions SET enabled = false WHERE id = %s AND {IN_SUBTREE} "
        f"RETURNING {_SUBSCRIPTION_COLUMNS}".encode(), (sub_id, scope))
    row = await cur.fetchone()
    if row is None:
        raise AlarmNotFound(f"subscription {sub_id} not found")
    return Subscription(*row)


async def list_subscriptions(conn: AsyncConn, scope: int) -> list[Subscription]:
    cur = await conn.execute(f"SELECT {_SUBSCRIPTION_COLUMNS} FROM outbound_subscriptions "
                             f"WHERE {IN_SUBTREE} ORDER BY id".encode(), (scope,))
    return [Subscription(*row) for row in await cur.fetchall()]


async def delete_channel(conn: AsyncConn, scope: int, channel_id: int) -> Channel:
    """Channels are disabled, not deleted: their deliveries stay as receipts."""
    cur = await conn.execute(f"UPDATE alarm_channels SET enabled = false WHERE id = %s AND "
                             f"{IN_SUBTREE} RETURNING {_CHANNEL_COLUMNS}".encode(),
                             (channel_id, scope))
    row = await cur.fetchone()
    if row is None:
        raise AlarmNotFound(f"channel {channel_id} not found")
    return Channel(*row)


async def list_channels(conn: AsyncConn, scope: int) -> list[Channel]:
    cur = await conn.execute(f"SELECT {_CHANNEL_COLUMNS} FROM alarm_channels WHERE {IN_SUBTREE} "
                             f"ORDER BY id".encode(), (scope,))
    return [Channel(*row) for row in await cur.fetchall()]
