"""Evaluators: one per (rule, device), holding that pair's state in memory.

Each gets the samples of the metrics its rule watches, with the frame's
measurement time, and appends a ``Transition`` when the condition starts
("raise") or ends ("normal"). Durations and hysteresis count measurement time
(``ts_us``), so a burst of buffered frames sent late is judged as measured.

The common state machine (threshold, rate, battery, fault, zone, energy)::

    NORMAL --abnormal--> PENDING --held for_s--> ACTIVE (raise)
    ACTIVE --normal--> CLEARING --held clear_for_s--> NORMAL ("normal")

A sample in the hysteresis band (between value and clear_value) is neither:
it ends PENDING and CLEARING without a transition, so a value hovering at the
limit cannot flap. An evaluator created while its alarm is open (another
process raised it, or the rules were reloaded) starts ACTIVE, so the alarm can
still end.

The fast path is one comparison: a NORMAL evaluator and a normal sample.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rmiot.ingest.alarm_rules import Rule

NORMAL, PENDING, ACTIVE, CLEARING = 0, 1, 2, 3
HOUR_US = 3_600_000_000
WEEK_HOURS = 168
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


@dataclass(frozen=True, slots=True)
class Transition:
    """A condition started ("raise") or ended ("normal") for a rule and device."""

    kind: str
    rule: Rule
    device: int
    tenant: int           # the device's home tenant
    patient: int | None   # bound patient, if any
    ts_us: int
    value: float | None
    message: str

    @property
    def subject(self) -> str:
        if self.rule.per_patient and self.patient is not None:
            return f"patient:{self.patient}"
        return f"device:{self.device}"


class Evaluator:
    """The shared state machine; subclasses decide what a sample means."""

    __slots__ = ("clear_us", "device", "for_us", "metrics", "out", "patient", "rule", "since",
                 "state", "tenant")

    def __init__(self, rule: Rule, device: int, tenant: int, patient: int | None,
                 out: list[Transition], active: bool) -> None:
        self.rule = rule
        self.device = device
        self.tenant = tenant
        self.patient = patient
        self.out = out
        self.state = ACTIVE if active else NORMAL
        self.since = 0
        p = rule.params
        self.for_us = int(float(p.get("for_s", 0)) * 1e6)
        self.clear_us = int(float(p.get("clear_for_s", 0)) * 1e6)
        self.metrics: tuple[int, ...] = (int(p["metric"]),) if "metric" in p else ()

    def feed(self, ts_us: int, metric: int, value: float) -> None:
        raise NotImplementedError

    def step(self, ts_us: int, abnormal: bool | None, value: float, what: str) -> None:
        """Advance the state machine; ``abnormal`` None: in the hysteresis band."""
        state = self.state
        if state == NORMAL:
            if abnormal:
                self.state, self.since = PENDING, ts_us
                if self.for_us <= 0:
                    self._emit("raise", ts_us, value, what)
        elif state == PENDING:
            if not abnormal:
                self.state = NORMAL
            elif ts_us - self.since >= self.for_us:
                self._emit("raise", ts_us, value, what)
        elif state == ACTIVE:
            if abnormal is False:
                self.state, self.since = CLEARING, ts_us
                if self.clear_us <= 0:
                    self._emit("normal", ts_us, value, what)
        elif abnormal is not False:  # CLEARING
            self.state = ACTIVE
        elif ts_us - self.since >= self.clear_us:
            self._emit("normal", ts_us, value, what)

    def _emit(self, kind: str, ts_us: int, value: float | None, what: str) -> None:
        self.state = ACTIVE if kind == "raise" else NORMAL
        name = self.rule.name or self.rule.code
        self.out.append(Transition(kind, self.rule, self.device, self.tenant, self.patient,
                                   ts_us, value, f"{name}: {what}"))


class ThresholdEval(Evaluator):
    __slots__ = ("bad", "clear", "limit", "op")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        p = self.rule.params
        if self.rule.kind == "battery":
            self.op, self.limit, self.clear = "<", float(p["below"]), float(p["clear_above"])
            self.metrics = (int(p["metric"]),)
        else:
            self.op, self.limit, self.clear = p["op"], float(p["value"]), float(p["clear_value"])
        self.bad = _OPS[self.op]

    def feed(self, ts_us: int, metric: int, value: float) -> None:
        if self.bad(value, self.limit):
            self.step(ts_us, True, value, f"metric {metric} = {value:g} ({self.op} "
                                          f"{self.limit:g})")
        elif self.state == NORMAL:
            return  # the fast path
        else:
            below = self.op in ("<", "<=")
            back = value >= self.clear if below else value <= self.clear
            self.step(ts_us, False if back else None, value, f"metric {metric} = {value:g}")


class RateEval(Evaluator):
    __slots__ = ("direction", "max_per_s", "prev_ts", "prev_v")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_per_s = float(self.rule.params["max_per_s"])
        self.direction = self.rule.params["direction"]
        self.prev_ts = 0
        self.prev_v = 0.0

    def feed(self, ts_us: int, metric: int, value: float) -> None:
        prev_ts, prev_v = self.prev_ts, self.prev_v
        if ts_us <= prev_ts:
            return  # out of order or repeated: no rate
        self.prev_ts, self.prev_v = ts_us, value
        if not prev_ts:
            return
        rate = (value - prev_v) * 1e6 / (ts_us - prev_ts)
        limit = self.max_per_s
        bad = (rate > limit if self.direction == "up" else rate < -limit
               if self.direction == "down" else abs(rate) > limit)
        if bad or self.state != NORMAL:
            self.step(ts_us, bad, value, f"metric {metric} changing {rate:+.3g}/s "
                                         f"(limit {limit:g}/s)")


class FaultEval(Evaluator):
    __slots__ = ("codes", "error_bad", "error_metric", "state_bad", "state_metric")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        p = self.rule.params
        self.error_metric, self.state_metric = int(p["error_metric"]), int(p["state_metric"])
        self.metrics = (self.error_metric, self.state_metric)
        self.codes = frozenset(int(c) for c in p["codes"])
        self.error_bad = self.state_bad = False

    def feed(self, ts_us: int, metric: int, value: float) -> None:
        if metric == self.error_metric:
            self.error_bad = value != 0 and (not self.codes or int(value) in self.codes)
        else:
            self.state_bad = value == 2
        bad = self.error_bad or self.state_bad
        if bad or self.state != NORMAL:
            what = (f"error code {value:g}" if metric == self.error_metric
                    else f"device state {value:g}")
            self.step(ts_us, bad, value, what)


class ZoneEval(Evaluator):
    __slots__ = ("allowed", "forbidden")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.allowed = frozenset(int(z) for z in self.rule.params["allowed"])
        self.forbidden = frozenset(int(z) for z in self.rule.params["forbidden"])

    def feed(self, ts_us: int, metric: int, value: float) -> None:
        zone = int(value)
        bad = zone not in self.allowed if self.allowed else zone in self.forbidden
        if bad or self.state != NORMAL:
            self.step(ts_us, bad, value, f"in zone {zone}")


class EnergyEval(Evaluator):
    """Hourly means against the same hour-of-week of the last ``weeks`` weeks.
    The previous weeks come from the database once (``seed``) and then from
    the samples seen; an hour is judged when the first sample of a later hour
    arrives."""

    __slots__ = ("count", "history", "hour", "min_weeks", "seeded", "share", "total", "weeks")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        p = self.rule.params
        self.share, self.weeks, self.min_weeks = float(p["share"]), int(p["weeks"]), \
            int(p["min_weeks"])
        self.history: dict[int, float] = {}  # hour number since 1970 -> mean
        self.hour = -1
        self.total = 0.0
        self.count = 0
        self.seeded = False

    def seed(self, hourly: dict[int, float]) -> None:
        for hour, mean in hourly.items():
            self.history.setdefault(hour, mean)
        self.seeded = True

    def baseline(self, hour: int) -> float | None:
        past = [self.history[h] for k in range(1, self.weeks + 1)
                if (h := hour - k * WEEK_HOURS) in self.history]
        return sum(past) / len(past) if len(past) >= self.min_weeks else None

    def feed(self, ts_us: int, metric: int, value: float) -> None:
        hour = ts_us // HOUR_US
        if hour == self.hour:
            self.total += value
            self.count += 1
            return
        if hour < self.hour:
            return  # a late sample of a finished hour
        if self.count:
            self._judge(self.hour, self.total / self.count, ts_us)
        self.hour, self.total, self.count = hour, value, 1

    def _judge(self, hour: int, mean: float, ts_us: int) -> None:
        self.history[hour] = mean
        for old in [h for h in self.history if h < hour - self.weeks * WEEK_HOURS]:
            del self.history[old]
        base = self.baseline(hour)
        if base is None or base <= 0:
            return
        off = (mean - base) / base
        self.step(ts_us, abs(off) > self.share, mean,
                  f"hour mean {mean:.4g} is {off:+.0%} off the baseline {base:.4g}")


class OfflineEval(Evaluator):
    """No frame for ``silence_s``: judged by the engine's sweep (wall clock)."""

    __slots__ = ("last_seen", "silence_s")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.silence_s = float(self.rule.params["silence_s"])
        self.last_seen = 0.0

    def seen(self, now: float, ts_us: int) -> None:
        self.last_seen = now
        if self.state == ACTIVE:
            self._emit("normal", ts_us, None, "frames again")

    def silent(self, now: float) -> bool:
        return self.state == NORMAL and now - self.last_seen > self.silence_s

    def raise_offline(self, ts_us: int) -> None:
        self._emit("raise", ts_us, None, f"no frame for {self.silence_s:g} s")


class FilterEval(Evaluator):
    """Filtering and linkage: no alarm. ``matches`` says whether a record
    meets the condition (every record when there is none); ``edge`` whether
    it just started to (a command goes out once per episode)."""

    __slots__ = ("action", "bad", "every", "limit", "matched", "seen")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        p = self.rule.params
        self.action = p["action"]
        self.bad = _OPS[p["op"]] if "op" in p else None
        self.limit = float(p.get("value", 0.0))
        self.every = int(p.get("every", 1))
        self.seen = 0
        self.matched = False

    def matches(self, numeric: dict[int, float]) -> bool:
        if self.bad is None:
            return True
        value = numeric.get(self.metrics[0])
        return value is not None and self.bad(value, self.limit)

    def keep(self) -> bool:
        """Downsampling: keep one matching record in ``every``."""
        self.seen += 1
        return self.seen % self.every == 1 or self.every == 1

    def edge(self, matched: bool) -> bool:
        was, self.matched = self.matched, matched
        return matched and not was

    def feed(self, ts_us: int, metric: int, value: float) -> None:  # pragma: no cover
        raise TypeError("filters are applied by the engine, not fed samples")


EVALUATORS: dict[str, type[Evaluator]] = {
    "threshold": ThresholdEval, "battery": ThresholdEval, "rate": RateEval,
    "fault": FaultEval, "zone": ZoneEval, "energy": EnergyEval, "offline": OfflineEval,
    "filter": FilterEval}
