"""Alarm rules: what each kind means and checks, and which rules a device is under.

A rule belongs to a tenant and applies to every device whose home (its
department, else its hospital) is in that tenant's subtree — optionally only
to one device model, one device, or the devices bound to one patient. Rules
with the same ``code`` override one another: for a device, the most specific
wins — a patient's rule, then a device's, then a model's, then the deepest
tenant's. An override with ``enabled = false`` switches the inherited rule off
there (a department that does not want the hospital's rule).

Kinds and their ``params`` (defaults in brackets):

==========  =================================================================
threshold   metric, op (< <= > >=), value; for_s [0]: held this long before
            raising; clear_value [value] and clear_for_s [0]: the hysteresis —
            back past clear_value for clear_for_s before it ends (SpO2 < 90
            for 10 s; ended when >= 92 for 30 s); latching [false]
rate        metric, max_per_s (> 0), direction (up, down, any [any]),
            clear_for_s [0]: change between consecutive samples
battery     metric [300], below [20], clear_above [below + 5]
fault       error_metric [303] (non-zero is a fault; codes [any]: only these),
            state_metric [304] (2 is fault)
zone        metric [400]; allowed (zone ids) or forbidden; on location frames
            and any frame carrying the metric
offline     silence_s (>= 5): no frame or heartbeat for that long
energy      metric [200], share [0.2], weeks [4], min_weeks [1]: an hour's
            mean off the mean of the same hour-of-week in recent weeks by
            more than share
filter      metric/op/value (optional: no condition matches every record) and
            action: drop, downsample (every N), tag (tag), command (device_id,
            name, params [[metric, vtype, value]...], ttl_s): no alarm
==========  =================================================================

Every alarm rule may be ``per`` "device" (one alarm per device, the default)
or "patient" (one alarm per bound patient, whichever device measured).

``escalation``: ``{"steps": [{"after_s": 60, "notify": "department_head",
"severity": "critical"}, ...], "renotify_s": 120}`` — deadlines counted from
the raise while the alarm is unacknowledged; a step notifies its audience and
may raise the severity; between and after steps the alarm is re-notified every
``renotify_s`` until acknowledged.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KINDS = ("threshold", "rate", "offline", "fault", "battery", "zone", "energy", "filter",
         "compliance")
# Raised by the platform from compliance tasks (rmiot.compliance_alarms), never
# evaluated on telemetry: the rule engine leaves them out.
NOT_ON_TELEMETRY = frozenset({"compliance"})
SEVERITIES = ("warning", "minor", "major", "critical")
RANK = {s: i + 1 for i, s in enumerate(SEVERITIES)}
OPS = ("<", "<=", ">", ">=")
ACTIONS = ("drop", "downsample", "tag", "command")
AUDIENCES = ("clinician", "department_head", "hospital_admin", "emergency_contact")
MAX_STEPS = 10


class RuleError(ValueError):
    """A rule that cannot be stored as given; the message names the field."""


@dataclass(frozen=True, slots=True)
class Step:
    after_s: float
    notify: str
    severity: str | None


@dataclass(frozen=True, slots=True)
class Escalation:
    steps: tuple[Step, ...] = ()
    renotify_s: float | None = None

    def next_deadline_s(self, step: int, since_raise_s: float) -> float | None:
        """Seconds from the raise to the next deadline, ``step`` steps done and
        ``since_raise_s`` elapsed: the next step's, or the next re-notice
        (whichever is first); None when nothing more is due."""
        due: list[float] = []
        if step < len(self.steps):
            due.append(self.steps[step].after_s)
        if self.renotify_s is not None:
            due.append((math.floor(since_raise_s / self.renotify_s) + 1) * self.renotify_s)
        return min(due) if due else None


@dataclass(frozen=True, slots=True)
class Rule:
    id: int
    tenant_id: int
    code: str
    name: str
    kind: str
    model_id: int | None
    device_id: int | None
    patient_id: int | None
    severity: str
    enabled: bool
    params: Mapping[str, Any]
    escalation: Escalation
    updated_at: dt.datetime | None = None
    raw_escalation: Mapping[str, Any] = field(default_factory=dict)

    @property
    def specificity(self) -> int:
        """patient 3 > device 2 > model 1 > the tenant's own 0."""
        if self.patient_id is not None:
            return 3
        if self.device_id is not None:
            return 2
        return 1 if self.model_id is not None else 0

    @property
    def per_patient(self) -> bool:
        return self.params.get("per") == "patient" or self.patient_id is not None


def _number(params: Mapping[str, Any], key: str, default: float | None = None, *,
            low: float = -math.inf, high: float = math.inf) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RuleError(f"params.{key}: a number is required")
    if not low <= value <= high:
        raise RuleError(f"params.{key}: from {low} to {high}")
    return float(value)


def _metric(params: Mapping[str, Any], default: int | None = None) -> int:
    value = params.get("metric", default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise RuleError("params.metric: a metric id from 1 to 65535")
    return value


def _ids(params: Mapping[str, Any], key: str) -> list[int]:
    value = params.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                              for v in value):
        raise RuleError(f"params.{key}: a list of whole numbers")
    return list(value)


def validate_params(kind: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The kind's parameters with defaults filled in; RuleError when wrong."""
    if kind not in KINDS:
        raise RuleError(f"kind: one of {', '.join(KINDS)}")
    p = dict(params)
    if p.get("per", "device") not in ("device", "patient"):
        raise RuleError("params.per: device or patient")
    if not isinstance(p.get("latching", False), bool):
        raise RuleError("params.latching: true or false")
    if kind == "threshold":
        p["metric"] = _metric(p)
        if p.get("op") not in OPS:
            raise RuleError(f"params.op: one of {' '.join(OPS)}")
        p["value"] = _number(p, "value")
        p["clear_value"] = _number(p, "clear_value", p["value"])
        if (p["op"] in ("<", "<=") and p["clear_value"] < p["value"]) or \
                (p["op"] in (">", ">=") and p["clear_value"] > p["value"]):
            raise RuleError("params.clear_value: on the normal side of value (hysteresis)")
        p["for_s"] = _number(p, "for_s", 0, low=0, high=86400)
        p["clear_for_s"] = _number(p, "clear_for_s", 0, low=0, high=86400)
    elif kind == "rate":
        p["metric"] = _metric(p)
        p["max_per_s"] = _number(p, "max_per_s", low=1e-9)
        if p.setdefault("direction", "any") not in ("up", "down", "any"):
            raise RuleError("params.direction: up, down or any")
        p["clear_for_s"] = _number(p, "clear_for_s", 0, low=0, high=86400)
    elif kind == "battery":
        p["metric"] = _metric(p, 300)
        p["below"] = _number(p, "below", 20, low=0, high=100)
        p["clear_above"] = _number(p, "clear_above", p["below"] + 5, low=p["below"])
    elif kind == "fault":
        p["error_metric"] = _metric({"metric": p.get("error_metric", 303)})
        p["state_metric"] = _metric({"metric": p.get("state_metric", 304)})
        p["codes"] = _ids(p, "codes")
    elif kind == "zone":
        p["metric"] = _metric(p, 400)
        p["allowed"], p["forbidden"] = _ids(p, "allowed"), _ids(p, "forbidden")
        if bool(p["allowed"]) == bool(p["forbidden"]):
            raise RuleError("params: either allowed or forbidden zones")
    elif kind == "offline":
        p["silence_s"] = _number(p, "silence_s", low=5, high=30 * 86400)
    elif kind == "energy":
        p["metric"] = _metric(p, 200)
        p["share"] = _number(p, "share", 0.2, low=0.01, high=10)
        p["weeks"] = int(_number(p, "weeks", 4, low=1, high=52))
        p["min_weeks"] = int(_number(p, "min_weeks", 1, low=1, high=p["weeks"]))
    elif kind == "filter":
        if "metric" in p or "op" in p:
            p["metric"] = _metric(p)
            if p.get("op") not in OPS:
                raise RuleError(f"params.op: one of {' '.join(OPS)}")
            p["value"] = _number(p, "value")
        action = p.get("action")
        if action not in ACTIONS:
            raise RuleError(f"params.action: one of {', '.join(ACTIONS)}")
        if action == "downsample":
            p["every"] = int(_number(p, "every", low=2, high=1_000_000))
        elif action == "tag":
            tag = p.get("tag")
            if not isinstance(tag, str) or not 1 <= len(tag) <= 64:
                raise RuleError("params.tag: 1 to 64 characters")
        elif action == "command":
            p["device_id"] = int(_number(p, "device_id", low=1, high=2**63 - 1))
            name = p.get("name")
            if not isinstance(name, str) or not name:
                raise RuleError("params.name: the command's name")
            params_list = p.setdefault("params", [])
            if not isinstance(params_list, list) or not all(
                    isinstance(x, list) and len(x) == 3 for x in params_list):
                raise RuleError("params.params: [[metric, vtype, value], ...]")
            p["ttl_s"] = int(_number(p, "ttl_s", 300, low=1, high=7 * 86400))
    return p


def parse_escalation(raw: Mapping[str, Any]) -> Escalation:
    """The escalation chain of a rule; RuleError when wrong."""
    steps_raw = raw.get("steps", [])
    if not isinstance(steps_raw, list) or len(steps_raw) > MAX_STEPS:
        raise RuleError(f"escalation.steps: a list of at most {MAX_STEPS}")
    steps: list[Step] = []
    last = 0.0
    for i, s in enumerate(steps_raw):
        if not isinstance(s, dict):
            raise RuleError(f"escalation.steps[{i}]: an object")
        after = _number(s, "after_s", low=1, high=7 * 86400)
        if after <= last:
            raise RuleError(f"escalation.steps[{i}].after_s: later than the step before")
        last = after
        notify = s.get("notify")
        if notify not in AUDIENCES:
            raise RuleError(f"escalation.steps[{i}].notify: one of {', '.join(AUDIENCES)}")
        severity = s.get("severity")
        if severity is not None and severity not in SEVERITIES:
            raise RuleError(f"escalation.steps[{i}].severity: one of {', '.join(SEVERITIES)}")
        steps.append(Step(after, notify, severity))
    renotify = raw.get("renotify_s")
    if renotify is not None:
        renotify = _number(raw, "renotify_s", low=5, high=7 * 86400)
    unknown = set(raw) - {"steps", "renotify_s"}
    if unknown:
        raise RuleError(f"escalation: unknown keys {', '.join(sorted(unknown))}")
    return Escalation(tuple(steps), renotify)


def check_rule(kind: str, severity: str, params: Mapping[str, Any],
               escalation: Mapping[str, Any], scopes: tuple[int | None, ...]) -> dict[str, Any]:
    """Validate a rule's parts; returns its params with defaults."""
    if severity not in SEVERITIES:
        raise RuleError(f"severity: one of {', '.join(SEVERITIES)}")
    if sum(s is not None for s in scopes) > 1:
        raise RuleError("at most one of model_id, device_id, patient_id")
    clean = validate_params(kind, params)
    parse_escalation(escalation)
    return clean


RULE_COLUMNS = ("id, tenant_id, code, name, kind, model_id, device_id, patient_id, severity, "
                "enabled, params, escalation, updated_at")


def rule_from_row(row: tuple[Any, ...]) -> Rule:
    (rid, tenant, code, name, kind, model, device, patient, severity, enabled, params,
     escalation, updated) = row
    return Rule(int(rid), int(tenant), code, name, kind, model, device, patient, severity,
                bool(enabled), params, parse_escalation(escalation), updated, escalation)


def resolve(candidates: list[tuple[int, Rule]]) -> list[Rule]:
    """From (tenant depth, rule) candidates for one device, the rule in force
    for each code: most specific scope, then deepest tenant; disabled ones drop."""
    best: dict[str, tuple[int, int, Rule]] = {}
    for depth, rule in candidates:
        key = (rule.specificity, depth)
        held = best.get(rule.code)
        if held is None or key > held[:2]:
            best[rule.code] = (*key, rule)
    return [rule for _, _, rule in best.values() if rule.enabled]
