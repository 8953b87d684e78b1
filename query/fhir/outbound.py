"""FHIR R4 resources pushed to hospital systems (``rmiot.outbound`` POSTs
them). Pure functions.

- An alarm event is a ``Communication`` (POST ``<base>/Communication``). R4
  has no alert resource (``DeviceAlert`` comes with R6); ``Flag`` is a standing
  warning about a patient, not an event, and ``DetectedIssue`` is a
  clinical-decision finding about orders. An alarm notification is a message
  conveyed from a device to the clinicians' systems, which is what
  ``Communication`` records (IHE's alert communication profile on FHIR uses it
  the same way): category ``alert``, ``priority`` from the severity
  (critical ``stat``, major ``asap``, minor ``urgent``, warning ``routine``),
  the rule, event, state and severity as codes of the platform's own systems
  in ``reasonCode``, the message as the payload, the device as the sender,
  the triggering value as a contained ``Observation`` it is ``about``. Its
  identifier (the alarm event) makes a resend recognisable (``If-None-Exist``).
- Observations go as one ``transaction`` Bundle (POST to the base URL), each
  entry a conditional create on the Observation's identifier (its read API id),
  so a batch sent twice is stored once.

The subject is a logical reference by identifier: the hospital's own
identifier of the patient when the system belongs to the patient's hospital,
else the pseudonym (``subject``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from rmiot.query.fhir.resources import (
    DEVICE_ID,
    JSON,
    PSEUDONYM,
    frame_observations,
    instant,
    observation,
)

NATIONAL_ID = "urn:oid:2.16.156.10011.1.5"
OBSERVATION_ID = "urn:rmiot:observation"
ALARM_EVENT = "urn:rmiot:alarm-event"
ALARM_RULE = "urn:rmiot:alarm-rule"
ALARM_STATE = "urn:rmiot:alarm-state"
ALARM_SEVERITY = "urn:rmiot:alarm-severity"
ALARM_EVENT_KIND = "urn:rmiot:alarm-event-kind"
CATEGORY = "http://terminology.hl7.org/CodeSystem/communication-category"
PRIORITY = {"critical": "stat", "major": "asap", "minor": "urgent", "warning": "routine"}


def subject(hospital_id: str | None, pseudonym: str) -> JSON:
    if hospital_id:
        authority, colon, ident = hospital_id.rpartition(":")
        if colon:
            return {"type": "Patient", "identifier": {
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                     "code": "MR"}]},
                "system": f"urn:rmiot:mrn:{authority}", "value": ident}}
        return {"type": "Patient", "identifier": {"system": NATIONAL_ID, "value": hospital_id}}
    return {"type": "Patient", "identifier": {"system": PSEUDONYM, "value": pseudonym}}


def communication(*, event_id: int, alarm_id: int, event: str, state: str, severity: str,
                  rule_code: str, message: str, device_id: int, onset_at: dt.datetime,
                  at: dt.datetime, metric: int | None, value: float | None,
                  who: JSON) -> JSON:
    out: JSON = {"resourceType": "Communication"}
    trigger = (observation(device_id, onset_at, 0, metric, value, None)
               if metric is not None and value is not None else None)
    if trigger is not None:
        trigger["id"] = "trigger"
        trigger["subject"] = who
        trigger["interpretation"] = [{"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
            "code": "AA" if severity in ("critical", "major") else "A"}]}]
        out["contained"] = [trigger]
    out.update({
        "identifier": [{"system": ALARM_EVENT, "value": str(event_id)},
                       {"system": "urn:rmiot:alarm", "value": str(alarm_id)}],
        "status": "completed",
        "category": [{"coding": [{"system": CATEGORY, "code": "alert"}]}],
        "priority": PRIORITY[severity],
        "subject": who,
        "topic": {"coding": [{"system": ALARM_RULE, "code": rule_code}], "text": message},
        "sent": instant(at),
        "sender": {"type": "Device", "identifier": {"system": DEVICE_ID,
                                                    "value": str(device_id)}},
        "reasonCode": [{"coding": [{"system": ALARM_EVENT_KIND, "code": event},
                                   {"system": ALARM_STATE, "code": state},
                                   {"system": ALARM_SEVERITY, "code": severity}],
                        "text": f"{severity} alarm {event} ({state})"}],
        "payload": [{"contentString": message}],
    })
    if trigger is not None:
        out["about"] = [{"reference": "#trigger"}]
    return out


def observation_bundle(device: int, frames: Sequence[tuple[int, int, Sequence[int],
                                                            Sequence[float]]],
                       who: JSON) -> JSON:
    """A transaction of conditional creates, one per value of the frames
    (ts µs, seq, metrics, values)."""
    entries = []
    for ts_us, seq, metrics, values in frames:
        ts = dt.datetime.fromtimestamp(0, dt.UTC) + dt.timedelta(microseconds=ts_us)
        for _, obs in frame_observations(device, ts, seq, metrics, values, None):
            ident = obs.pop("id")
            obs["identifier"] = [{"system": OBSERVATION_ID, "value": ident}]
            obs["subject"] = who
            obs["device"] = {"identifier": {"system": DEVICE_ID, "value": str(device)}}
            entries.append({"fullUrl": f"urn:rmiot:observation:{ident}", "resource": obs,
                            "request": {"method": "POST", "url": "Observation",
                                        "ifNoneExist": f"identifier={OBSERVATION_ID}|{ident}"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}
