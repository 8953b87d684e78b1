"""FHIR R4 resources (JSON as dicts) from the platform's rows. Pure functions.

- ``observation``: one value of one metric of one frame; vital signs carry the
  ``vital-signs`` category, the profile of the catalogue (heartrate, oxygensat,
  resprate, bodytemp, vitalsigns), their LOINC code(s) first and the IEEE
  11073 MDC code; every value a ``valueQuantity`` in UCUM when the unit is one.
  Its id is ``<device>-<ts µs>-<seq>-<metric>``; the subject is the patient the
  device was bound to at that time, else the device. ``frame_observations``
  makes those of one frame, sharing what a metric's Observations have in
  common (built once per metric) and the frame's time as text (once per frame).
- ``device``, ``device_metric`` (one per metric of the device's model),
  ``patient`` (full, masked or pseudonymised: ``meta.security`` says which),
  ``document_reference`` (a result shared between hospitals), ``bundle``
  (searchset with self/next links), ``outcome`` (OperationOutcome).
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rmiot.catalogue import LOINC, MDC, METRICS, RMIOT_METRIC, UCUM, MetricCode

JSON = dict[str, Any]
PSEUDONYM = "urn:rmiot:pseudonym"
DEVICE_ID = "urn:rmiot:device"
TENANT_ID = "urn:rmiot:tenant"
SECURITY = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
DEVICE_STATUS = {"registered": "inactive", "active": "active", "maintenance": "active",
                 "suspended": "inactive", "retired": "inactive", "scrapped": "inactive"}
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def instant(ts: dt.datetime) -> str:
    return ts.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def to_us(ts: dt.datetime) -> int:
    return (ts - EPOCH) // dt.timedelta(microseconds=1)


def metric_code(metric: int) -> MetricCode:
    return METRICS.get(metric) or MetricCode(metric, f"metric_{metric}", "")


def parse_observation_id(text: str) -> tuple[int, int, int, int] | None:
    parts = text.split("-")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        return None
    device, ts_us, seq, metric = (int(p) for p in parts)
    return device, ts_us, seq, metric


def codeable(m: MetricCode) -> JSON:
    coding = [{"system": LOINC, "code": code, "display": m.display} for code in m.loinc]
    if m.mdc:
        coding.append({"system": MDC, "code": m.mdc, "display": m.mdc_ref})
    coding.append({"system": RMIOT_METRIC, "code": str(m.id), "display": m.name})
    return {"coding": coding, "text": m.display or m.name}


def quantity(m: MetricCode, value: float) -> JSON:
    out: JSON = {"value": value}
    if m.ucum:
        out.update(unit=m.unit, system=UCUM, code=m.ucum)
    elif m.unit:
        out["unit"] = m.unit
    return out


@functools.cache
def _observation_parts(metric: int) -> tuple[JSON, JSON]:
    """What every Observation of ``metric`` shares: the members from ``meta`` to
    ``code``, and the unit of its ``valueQuantity``. Shared, never changed."""
    m = metric_code(metric)
    head: JSON = {}
    if m.profile:
        head["meta"] = {"profile": [m.profile_url]}
    head["status"] = "final"
    if m.vital_sign:
        head["category"] = [{"coding": [{"system": CATEGORY, "code": "vital-signs",
                                         "display": "Vital Signs"}], "text": "Vital Signs"}]
    head["code"] = codeable(m)
    unit = quantity(m, 0.0)
    del unit["value"]
    return head, unit


def frame_observations(device: int, ts: dt.datetime, seq: int, metrics: Sequence[int],
                       values: Sequence[float], patient: int | None,
                       wanted: frozenset[int] | set[int] = frozenset(), start: int = 0,
                       ) -> list[tuple[int, JSON]]:
    """(index in the frame, Observation) of each value from ``start`` on, of the
    ``wanted`` metrics (all when empty); values FHIR cannot carry (NaN,
    infinities) are left out."""
    prefix = f"{device}-{to_us(ts)}-{seq}-"
    when = instant(ts)
    subject = {"reference": f"Patient/{patient}" if patient else f"Device/{device}"}
    source = {"reference": f"Device/{device}"}
    out = []
    for index in range(start, len(metrics)):
        metric, value = metrics[index], values[index]
        if (wanted and metric not in wanted) or not math.isfinite(value):
            continue
        head, unit = _observation_parts(metric)
        obs: JSON = {"resourceType": "Observation", "id": f"{prefix}{metric}", **head,
                     "subject": subject, "effectiveDateTime": when,
                     "valueQuantity": {"value": value, **unit}, "device": source}
        out.append((index, obs))
    return out


def observation(device: int, ts: dt.datetime, seq: int, metric: int, value: float,
                patient: int | None) -> JSON | None:
    """One Observation; None for a value FHIR cannot carry (NaN, infinities)."""
    found = frame_observations(device, ts, seq, [metric], [value], patient)
    return found[0][1] if found else None


@dataclass(frozen=True)
class DeviceRow:
    id: int
    tenant_id: int
    home: int
    tenant_name: str
    state: str
    udi: str | None
    serial_no: str | None
    location: str | None
    gateway_id: int | None
    vendor: str | None
    model: str | None
    kind: str | None
    metrics: Sequence[int]
    patient_id: int | None   # bound now (None also when the caller may not see it)


def device(row: DeviceRow) -> JSON:
    out: JSON = {"resourceType": "Device", "id": str(row.id),
                 "identifier": [{"system": DEVICE_ID, "value": str(row.id)}]}
    if row.udi:
        out["udiCarrier"] = [{"deviceIdentifier": row.udi}]
    out["status"] = DEVICE_STATUS.get(row.state, "unknown")
    if row.vendor:
        out["manufacturer"] = row.vendor
    if row.model:
        out["deviceName"] = [{"name": row.model, "type": "model-name"}]
        out["modelNumber"] = row.model
    if row.serial_no:
        out["serialNumber"] = row.serial_no
    if row.kind:
        out["type"] = {"text": row.kind}
    if row.patient_id:
        out["patient"] = {"reference": f"Patient/{row.patient_id}"}
    out["owner"] = {"identifier": {"system": TENANT_ID, "value": str(row.home)},
                    "display": row.tenant_name}
    if row.location:
        out["location"] = {"display": row.location}
    if row.gateway_id:
        out["parent"] = {"reference": f"Device/{row.gateway_id}"}
    return out


def device_metric(row: DeviceRow, metric: int) -> JSON:
    m = metric_code(metric)
    out: JSON = {"resourceType": "DeviceMetric", "id": f"{row.id}-{metric}",
                 "type": codeable(m)}
    if m.ucum:
        out["unit"] = {"coding": [{"system": UCUM, "code": m.ucum}], "text": m.unit}
    out["source"] = {"reference": f"Device/{row.id}"}
    out["operationalStatus"] = "on" if row.state == "active" else "off"
    out["category"] = "measurement"
    return out


@dataclass(frozen=True)
class PatientView:
    id: int
    pseudonym: str
    tenant_name: str
    how: str                 # full, masked, pseudonymised
    name: str = ""
    id_card: str = ""
    phone: str = ""
    sex: str = "U"
    birth_year: int | None = None


def patient(p: PatientView) -> JSON:
    out: JSON = {"resourceType": "Patient", "id": str(p.id)}
    if p.how != "full":
        code = "PSEUDED" if p.how == "pseudonymised" else "MASKED"
        out["meta"] = {"security": [{"system": SECURITY, "code": code}]}
    out["identifier"] = [{"system": PSEUDONYM, "value": p.pseudonym}]
    if p.how == "pseudonymised":
        return out
    if p.id_card:
        out["identifier"].append({"type": {"text": "national id card"},
                                  "system": "urn:oid:2.16.156.10011.1.5", "value": p.id_card})
    if p.name:
        out["name"] = [{"text": p.name}]
    if p.phone:
        out["telecom"] = [{"system": "phone", "value": p.phone}]
    out["gender"] = {"F": "female", "M": "male"}.get(p.sex, "unknown")
    if p.birth_year:
        out["birthDate"] = f"{p.birth_year:04d}"
    out["managingOrganization"] = {"display": p.tenant_name}
    return out


@dataclass(frozen=True)
class SharedResult:
    id: int
    tenant_id: int
    tenant_name: str
    patient_id: int
    device_id: int | None
    code: str
    title: str
    content_type: str
    content: bytes
    period_start: dt.datetime | None
    period_end: dt.datetime | None
    published_by: str
    published_at: dt.datetime


def document_reference(r: SharedResult, patient_here: int | None) -> JSON:
    """``patient_here``: the reader's own record of the same person, if any."""
    system, _, code = r.code.rpartition("|")
    out: JSON = {"resourceType": "DocumentReference", "id": str(r.id), "status": "current",
                 "type": {"coding": [{"system": system or LOINC, "code": code}],
                          "text": r.title},
                 "date": instant(r.published_at),
                 "author": [{"identifier": {"system": TENANT_ID, "value": str(r.tenant_id)},
                             "display": r.tenant_name}],
                 "description": r.title,
                 "content": [{"attachment": {
                     "contentType": r.content_type, "title": r.title,
                     "data": base64.b64encode(r.content).decode(),
                     "creation": instant(r.published_at)}}]}
    if patient_here:
        out["subject"] = {"reference": f"Patient/{patient_here}"}
    context: JSON = {}
    if r.device_id:
        context["related"] = [{"reference": f"Device/{r.device_id}"}]
    if r.period_start or r.period_end:
        context["period"] = {k: instant(v) for k, v in
                             (("start", r.period_start), ("end", r.period_end)) if v}
    if context:
        out["context"] = context
    return out


def bundle(base: str, self_query: str, entries: Sequence[JSON], next_query: str | None,
           ) -> JSON:
    out: JSON = {"resourceType": "Bundle", "type": "searchset",
                 "link": [{"relation": "self", "url": f"{base}?{self_query}".rstrip("?")}]}
    if next_query:
        out["link"].append({"relation": "next", "url": f"{base}?{next_query}"})
    root = base.rsplit("/", 1)[0]
    out["entry"] = [{"fullUrl": f"{root}/{e['resourceType']}/{e['id']}", "resource": e,
                     "search": {"mode": "match"}} for e in entries]
    return out


def outcome(code: str, text: str, severity: str = "error") -> JSON:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": text}]}
