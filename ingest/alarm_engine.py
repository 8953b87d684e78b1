"""The rule engine of one ingest process: which rules each device is under,
and their evaluation on every accepted record.

``RuleBook`` keeps every rule and every device's profile (home tenant and its
path, model, bound patient) in memory, following the database: LISTEN on
``rmiot_alarm_rules`` (rule changes; ``device:<id>`` when a binding changes)
and ``rmiot_registry`` (devices and tenants). ``Engine`` compiles, per device
and only when its first frame comes (or after a change), a ``DevicePlan``: the
rules in force for it (``alarm_rules.resolve``) as evaluators indexed by
metric. A record of a device under no rule costs one dictionary lookup; a
record of a device whose rules are thresholds, all normal, costs one pass
over its fields in the compiled core (``Frame.beyond``) with two comparisons
per watched metric; any other record its ``numeric()`` decoding and the
evaluators of its metrics.

Two hooks in the pipeline (``ingest/pipeline.py``):

- ``admit(frame)`` before a frame is batched, only when some filter rule
  exists: drop and downsample rules decide whether it is stored at all (a
  frame filtered out is acknowledged OK: it was handled as configured);
- ``accepted(frames)`` once the pipeline has queued a read's frames for the
  batch writer: the evaluators run, and what they produce (transitions, tags,
  linkage commands) is queued for the ``AlarmWriter``, which writes it in
  transactions of its own, at once: an alarm does not wait for its frame's
  batch to be written (nor the batch for the alarm). A frame older than the
  newest one judged for its device (a retransmission whose ack was lost, or
  late data) is not judged again: rules follow each device's latest state.

Per-device state lives in this process: a device's connection stays on one
process, so its frames arrive in order here. Alarms themselves live in the
database; ``is_open`` (the writer's view of open alarms, kept by NOTIFY) lets a
process that never saw an alarm raised end it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psycopg

from rmiot.core_ext import Frame
from rmiot.db import ChangeFollower
from rmiot.ingest.alarm_eval import (
    EVALUATORS,
    NORMAL,
    EnergyEval,
    Evaluator,
    FilterEval,
    OfflineEval,
    ThresholdEval,
    Transition,
)
from rmiot.ingest.alarm_rules import (
    NOT_ON_TELEMETRY,
    RULE_COLUMNS,
    Rule,
    resolve,
    rule_from_row,
)

log = logging.getLogger("rmiot.ingest.alarms")

RULES_CHANNEL = "rmiot_alarm_rules"
REGISTRY_CHANNEL = "rmiot_registry"

_PROFILES = """
SELECT d.id, h.id, h.path, d.model_id, b.patient_id, d.state = 'active'
  FROM devices d
  JOIN tenants h ON h.id = coalesce(d.department_id, d.tenant_id)
  LEFT JOIN device_bindings b ON b.device_id = d.id AND b.unbound_at IS NULL
"""


@dataclass(frozen=True, slots=True)
class Profile:
    home: int                   # department, else hospital
    path: tuple[int, ...]       # root .. home
    model: int | None
    patient: int | None
    active: bool


def subject_of(rule: Rule, device: int, patient: int | None) -> str:
    if rule.per_patient and patient is not None:
        return f"patient:{patient}"
    return f"device:{device}"


class RuleBook(ChangeFollower):
    channels = (RULES_CHANNEL, REGISTRY_CHANNEL)
    name = "alarm rules"

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn)
        self.by_tenant: dict[int, list[Rule]] = {}   # tenant-wide and model rules
        self.by_device: dict[int, list[Rule]] = {}
        self.by_patient: dict[int, list[Rule]] = {}
        self.profiles: dict[int, Profile] = {}
        self.count = 0
        self.has_filters = False
        self.has_offline = False
        self.version = 0
        self.on_change: Callable[[int | None], None] = lambda device: None

    def rules_for(self, device: int) -> list[Rule]:
        """The rules in force for the device (overrides applied)."""
        profile = self.profiles.get(device)
        if profile is None:
            return []
        candidates: list[tuple[int, Rule]] = []
        for depth, tenant in enumerate(profile.path):
            for rule in self.by_tenant.get(tenant, ()):
                if rule.model_id is None or rule.model_id == profile.model:
                    candidates.append((depth, rule))
        own = len(profile.path)
        candidates += [(own, r) for r in self.by_device.get(device, ())
                       if r.tenant_id in profile.path]
        if profile.patient is not None:
            candidates += [(own, r) for r in self.by_patient.get(profile.patient, ())
                           if r.tenant_id in profile.path]
        return resolve(candidates) if candidates else []

    async def load_all(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await self._load_rules(conn)
        await self._load_profiles(conn, "", ())
        self.on_change(None)

    async def apply(self, conn: psycopg.AsyncConnection[Any],
                    notes: list[psycopg.Notify]) -> None:
        everything = False
        for payload in dict.fromkeys(n.payload for n in notes):
            kind, _, ident = payload.partition(":")
            if kind == "rules":
                await self._load_rules(conn)
                everything = True
            elif kind == "device":
                device = int(ident)
                await self._load_profiles(conn, " WHERE d.id = %s", (device,), gone=device)
                if not everything:
                    self.on_change(device)
            elif kind == "tenant":
                await self._load_profiles(conn, " WHERE h.path @> ARRAY[%s]::integer[]",
                                          (int(ident),))
                everything = True
        if everything:
            self.on_change(None)

    async def _load_rules(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cur = await conn.execute(f"SELECT {RULE_COLUMNS} FROM alarm_rules "
                                 "WHERE deleted_at IS NULL".encode())
        by_tenant: dict[int, list[Rule]] = {}
        by_device: dict[int, list[Rule]] = {}
        by_patient: dict[int, list[Rule]] = {}
        count = 0
        filters = offline = False
        for row in await cur.fetchall():
            rule = rule_from_row(row)
            if rule.kind in NOT_ON_TELEMETRY:
                continue
            if rule.device_id is not None:
                by_device.setdefault(rule.device_id, []).append(rule)
            elif rule.patient_id is not None:
                by_patient.setdefault(rule.patient_id, []).append(rule)
            else:
                by_tenant.setdefault(rule.tenant_id, []).append(rule)
            if rule.enabled:
                count += 1
                filters = filters or (rule.kind == "filter"
                                      and rule.params["action"] in ("drop", "downsample"))
                offline = offline or rule.kind == "offline"
        self.by_tenant, self.by_device, self.by_patient = by_tenant, by_device, by_patient
        self.count, self.has_filters, self.has_offline = count, filters, offline
        self.version += 1

    async def _load_profiles(self, conn: psycopg.AsyncConnection[Any], where: str,
                             params: tuple[int, ...], gone: int | None = None) -> None:
        cur = await conn.execute((_PROFILES + where).encode(), params)
        rows = await cur.fetchall()
        if not where:
            self.profiles = {}
        elif gone is not None and not rows:
            self.profiles.pop(gone, None)
        for device, home, path, model, patient, active in rows:
            self.profiles[device] = Profile(home, tuple(path), model, patient, bool(active))


class Bounds:
    """A metric's threshold evaluators with the open interval (lo, hi) of
    values that change none of them while all are NORMAL (``calm``): such a
    sample costs two comparisons, whatever the number of rules."""

    __slots__ = ("calm", "evs", "hi", "lo")

    def __init__(self) -> None:
        self.evs: list[ThresholdEval] = []
        self.lo, self.hi = -math.inf, math.inf
        self.calm = False

    def add(self, ev: ThresholdEval) -> None:
        self.evs.append(ev)
        if ev.op in ("<", "<="):  # safe: above the limit (or at it, for "<")
            self.lo = max(self.lo, math.nextafter(ev.limit, -math.inf) if ev.op == "<"
                          else ev.limit)
        else:
            self.hi = min(self.hi, math.nextafter(ev.limit, math.inf) if ev.op == ">"
                          else ev.limit)
        self.settle()

    def settle(self) -> None:
        self.calm = all(ev.state == NORMAL for ev in self.evs)


class DevicePlan:
    """One device's evaluators: by metric, the offline watch, the filters."""

    __slots__ = ("bounded", "by_metric", "empty", "energy", "fast", "filters", "newest",
                 "offline", "patient", "quiet", "stored_filters", "tenant")

    def __init__(self, tenant: int, patient: int | None) -> None:
        self.tenant = tenant
        self.patient = patient
        self.by_metric: dict[int, list[Evaluator]] = {}  # fed every sample
        self.bounded: dict[int, Bounds] = {}              # thresholds
        self.offline: OfflineEval | None = None
        self.filters: list[FilterEval] = []         # drop / downsample: before storing
        self.stored_filters: list[FilterEval] = []  # tag / command: after commit
        self.energy: list[EnergyEval] = []
        self.empty = True
        self.newest = 0  # ts_us of the newest frame judged
        # metric -> (lo, hi) while every evaluator fed per sample is a calm
        # threshold: a frame inside all of them changes nothing (Frame.beyond
        # tells, in the compiled core, without a dict per frame).
        self.quiet: dict[int, tuple[float, float]] | None = None
        # quiet, when nothing else looks at each frame (no offline watch, no
        # tag or command filter): the engine's shortest path.
        self.fast: dict[int, tuple[float, float]] | None = None

    def settle(self) -> None:
        self.quiet = None if self.by_metric or not all(
            b.calm for b in self.bounded.values()) else {
            metric: (b.lo, b.hi) for metric, b in self.bounded.items()}
        self.fast = self.quiet if self.offline is None and not self.stored_filters else None

    def evaluators(self) -> Iterable[Evaluator]:
        seen: set[int] = set()
        groups: list[list[Evaluator]] = [*self.by_metric.values(), [*self.filters],
                                         [*self.stored_filters]]
        for bounds in self.bounded.values():
            groups.append([*bounds.evs])
        if self.offline is not None:
            groups.append([self.offline])
        for group in groups:
            for ev in group:
                if id(ev) not in seen:
                    seen.add(id(ev))
                    yield ev


@dataclass(frozen=True, slots=True)
class Tag:
    device: int
    ts_us: int
    seq: int
    tag: str
    rule_id: int


@dataclass(frozen=True, slots=True)
class Linkage:
    rule: Rule
    source_device: int


_NO_PLAN = DevicePlan(0, None)


class Engine:
    def __init__(self, book: RuleBook, is_open: Callable[[int, str], bool],
                 clock: Callable[[], float] = time.time) -> None:
        self.book = book
        self.is_open = is_open
        self.clock = clock
        self.plans: dict[int, DevicePlan] = {}
        self.transitions: list[Transition] = []
        self.tags: list[Tag] = []
        self.linkages: list[Linkage] = []
        self.to_seed: list[tuple[int, EnergyEval]] = []
        self.wake: Callable[[], None] = lambda: None  # the writer's doorbell
        self.evaluated = 0
        book.on_change = self.invalidate

    @property
    def filtering(self) -> bool:
        return self.book.has_filters

    def invalidate(self, device: int | None) -> None:
        """Rules or a device changed: plans are compiled again, keeping the
        state of evaluators whose rule did not change."""
        if device is None:
            old, self.plans = self.plans, {}
            if self.book.has_offline:
                self._watch_all_offline()
            for dev, plan in old.items():
                if plan is not _NO_PLAN and (dev in self.book.profiles):
                    self.plans[dev] = self._compile(dev, plan)
        else:
            old_plan = self.plans.pop(device, None)
            self.plans[device] = self._compile(device, old_plan)

    def plan(self, device: int) -> DevicePlan:
        plan = self.plans.get(device)
        if plan is None:
            plan = self.plans[device] = self._compile(device, None)
        return plan

    def _compile(self, device: int, old: DevicePlan | None) -> DevicePlan:
        profile = self.book.profiles.get(device)
        rules = self.book.rules_for(device) if profile is not None else []
        if profile is None or not rules:
            return _NO_PLAN
        kept = {(ev.rule.id, ev.rule.updated_at): ev for ev in old.evaluators()} \
            if old is not None and old is not _NO_PLAN else {}
        plan = DevicePlan(profile.home, profile.patient)
        if old is not None:
            plan.newest = old.newest
        for rule in rules:
            ev = kept.get((rule.id, rule.updated_at))
            if ev is None or ev.patient != profile.patient:
                ev = EVALUATORS[rule.kind](
                    rule, device, profile.home, profile.patient, self.transitions,
                    self.is_open(rule.id, subject_of(rule, device, profile.patient)))
                if isinstance(ev, EnergyEval):
                    self.to_seed.append((device, ev))
            if isinstance(ev, OfflineEval):
                if not ev.last_seen:
                    ev.last_seen = self.clock()
                plan.offline = ev
            elif isinstance(ev, FilterEval):
                (plan.filters if ev.action in ("drop", "downsample")
                 else plan.stored_filters).append(ev)
            elif isinstance(ev, ThresholdEval):
                plan.bounded.setdefault(ev.metrics[0], Bounds()).add(ev)
            else:
                if isinstance(ev, EnergyEval):
                    plan.energy.append(ev)
                for metric in ev.metrics:
                    plan.by_metric.setdefault(metric, []).append(ev)
        plan.empty = False
        plan.settle()
        return plan

    def _watch_all_offline(self) -> None:
        """Devices that never send after a start must go offline too: every
        active device under an offline rule gets a plan now."""
        for device, profile in self.book.profiles.items():
            if profile.active and device not in self.plans and any(
                    r.kind == "offline" for r in self.book.rules_for(device)):
                self.plans[device] = self._compile(device, None)

    # -- the pipeline's hooks ----------------------------------------------------

    def admit(self, frame: Frame) -> bool:
        """False when a drop or downsample rule says not to store the frame."""
        plan = self.plans.get(frame.device) or self.plan(frame.device)
        if not plan.filters:
            return True
        numeric = frame.numeric()
        for flt in plan.filters:
            if flt.matches(numeric) and (flt.action == "drop" or not flt.keep()):
                return False
        return True

    def accepted(self, frames: Iterable[Frame]) -> None:
        """Evaluate frames the pipeline accepted (queued to be stored)."""
        plans = self.plans
        before = len(self.transitions) + len(self.tags) + len(self.linkages)
        now = 0.0
        judged = 0
        for frame in frames:
            device = frame.device
            plan = plans.get(device)
            if plan is None:
                plan = self.plan(device)
            fast = plan.fast
            if fast is not None:  # calm thresholds only: the usual case
                ts = frame.ts_us
                if ts >= plan.newest:
                    plan.newest = ts
                    judged += 1
                    if frame.beyond(fast):
                        self._judge(frame, plan, ts)
                continue
            if plan.empty:
                continue
            ts = frame.ts_us
            if plan.offline is not None:
                if not now:
                    now = self.clock()
                plan.offline.seen(now, ts)
            if ts < plan.newest:
                continue
            plan.newest = ts
            judged += 1
            if (plan.bounded or plan.by_metric) and (
                    plan.quiet is None or frame.beyond(plan.quiet)):
                self._judge(frame, plan, ts)
            if plan.stored_filters:
                self._stored_filters(frame, plan)
        self.evaluated += judged
        if len(self.transitions) + len(self.tags) + len(self.linkages) != before:
            self.wake()

    @staticmethod
    def _judge(frame: Frame, plan: DevicePlan, ts: int) -> None:
        """Feed the frame's samples to the plan's evaluators."""
        numeric = frame.numeric()
        for metric, bounds in plan.bounded.items():
            value = numeric.get(metric)
            if value is None or (bounds.calm and bounds.lo < value < bounds.hi):
                continue
            for threshold in bounds.evs:
                threshold.feed(ts, metric, value)
            bounds.settle()
        for metric, evs in plan.by_metric.items():
            value = numeric.get(metric)
            if value is not None:
                for ev in evs:
                    ev.feed(ts, metric, value)
        plan.settle()

    def _stored_filters(self, frame: Frame, plan: DevicePlan) -> None:
        numeric = frame.numeric()
        for flt in plan.stored_filters:
            matched = flt.matches(numeric)
            if flt.action == "tag":
                if matched:
                    self.tags.append(Tag(frame.device, frame.ts_us, frame.seq,
                                         str(flt.rule.params["tag"]), flt.rule.id))
            elif flt.edge(matched):
                self.linkages.append(Linkage(flt.rule, frame.device))

    def silent(self) -> list[OfflineEval]:
        """Offline watches whose device has been silent too long (the writer
        checks the database before raising: the device may be sending to
        another process)."""
        now = self.clock()
        return [plan.offline for plan in self.plans.values()
                if plan.offline is not None and plan.offline.silent(now)]
