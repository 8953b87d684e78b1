"""HL7 v2 ORU^R01 out, for hospital systems subscribed to alarms and
observations (``rmiot.outbound`` sends them over MLLP). Pure functions.

One message::

    MSH|^~\\&|RMIOT|RMIOT||<receiving facility>|<now>||ORU^R01^ORU_R01|<control id>|P|2.6
    PID|1||<patient identifier>
    OBR|1|||<what>|||<observation time>            one per frame, or the alarm
    OBX|1|NM|<code>||<value>|<unit>|||||F|||<time>||||<device id>

- PID-3: the hospital's own identifier of the patient (``ident^^^CHN^NNCHN``
  for a national ID card number, ``ident^^^<authority>^MR`` for a record
  number its ADT gave as ``authority:ident``) when the receiving system
  belongs to the patient's hospital; otherwise only the pseudonym
  (``<hex>^^^RMIOT^ANON``). The caller decides which (``pid``).
- Observations: OBX-3 the metric's IEEE 11073 MDC code with its LOINC code as
  the alternate (``147842^MDC_ECG_HEART_RATE^MDC^8867-4^Heart rate^LN``),
  OBX-6 the UCUM unit, OBX-14 the measurement time, OBX-18 the device id — the
  layout the platform's own ORU listener reads.
- An alarm: OBR-4 ``<rule code>^<rule code>^RMIOT``, OBR-7 its onset; OBX
  ``ST`` for the event (raised, acknowledged…), the alarm's state and
  severity, ``TX`` its message, and ``NM`` the triggering value in the rule's
  metric with OBX-8 ``AA`` (critical, major) or ``A`` (minor, warning).

MSH-10 is the outbox delivery's own id (``RMIOT-D<id>``): a resent message
keeps it, so a receiver that ignores repeated control ids stores it once.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import dataclass

from rmiot.catalogue import METRICS, MetricCode
from rmiot.ingest.hl7.messages import Header, MessageError, field, parse
from rmiot.ingest.hl7.messages import escape as _escape

_HEADER = Header(version="2.6")
ABNORMAL = {"critical": "AA", "major": "AA", "minor": "A", "warning": "A"}


def escape(text: str) -> str:
    return _escape(text, _HEADER)


def hl7_ts(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%Y%m%d%H%M%S.%f")[:-2] + "+0000"


def pid(hospital_id: str | None, pseudonym: str) -> str:
    """The PID segment: the hospital's identifier, or only the pseudonym."""
    if hospital_id:
        authority, colon, ident = hospital_id.rpartition(":")
        cx = (f"{escape(ident)}^^^{escape(authority)}^MR" if colon
              else f"{escape(hospital_id)}^^^CHN^NNCHN")
    else:
        cx = f"{escape(pseudonym)}^^^RMIOT^ANON"
    return f"PID|1||{cx}"


def message(control_id: str, facility: str, pid_segment: str, body: Sequence[str],
            now: dt.datetime) -> bytes:
    msh = (f"MSH|^~\\&|RMIOT|RMIOT||{escape(facility)}|{hl7_ts(now)}||ORU^R01^ORU_R01|"
           f"{escape(control_id)}|P|2.6")
    return ("\r".join((msh, pid_segment, *body)) + "\r").encode()


def _code(m: MetricCode) -> str:
    own = f"{m.mdc}^{escape(m.mdc_ref)}^MDC" if m.mdc else f"{m.id}^{escape(m.name)}^RMIOT"
    if m.loinc:
        return f"{own}^{m.loinc[0]}^{escape(m.display or m.name)}^LN"
    return own


def _obx(n: int, metric: int, value: float, at: str, device: int, flag: str = "") -> str:
    m = METRICS.get(metric) or MetricCode(metric, f"metric_{metric}", "")
    unit = f"{escape(m.ucum)}^^UCUM" if m.ucum else escape(m.unit)
    return f"OBX|{n}|NM|{_code(m)}||{value!r}|{unit}||{flag}|||F|||{at}||||{device}"


def observation_segments(device: int, frames: Sequence[tuple[int, int, Sequence[int],
                                                              Sequence[float]]]) -> list[str]:
    """OBR and OBX segments of frames (ts µs, seq, metrics, values); values
    that are not finite are left out, and frames left empty."""
    out: list[str] = []
    order = 0
    for ts_us, _seq, metrics, values in frames:
        at = hl7_ts(dt.datetime.fromtimestamp(ts_us / 1e6, dt.UTC))
        obx = [(m, v) for m, v in zip(metrics, values, strict=True) if math.isfinite(v)]
        if not obx:
            continue
        order += 1
        out.append(f"OBR|{order}|||182777000^monitoring of patient^SCT|||{at}")
        out.extend(_obx(n, m, v, at, device) for n, (m, v) in enumerate(obx, 1))
    return out


@dataclass(frozen=True, slots=True)
class AlarmFacts:
    """What an ORU (or a FHIR Communication) tells of one alarm event."""

    event_id: int
    alarm_id: int
    event: str               # raised, acknowledged, cleared, escalated...
    state: str
    severity: str
    rule_code: str
    message: str
    device_id: int
    onset_at: dt.datetime
    at: dt.datetime
    metric: int | None
    value: float | None


def alarm_segments(a: AlarmFacts) -> list[str]:
    onset = hl7_ts(a.onset_at)
    code = f"{escape(a.rule_code)}^{escape(a.rule_code)}^RMIOT"
    out = [f"OBR|1|RMIOT-A{a.alarm_id}||{code}|||{onset}",
           f"OBX|1|ST|ALARM_EVENT^Alarm event^RMIOT||{escape(a.event)}||||||F|||{hl7_ts(a.at)}"
           f"||||{a.device_id}",
           f"OBX|2|ST|ALARM_STATE^Alarm state^RMIOT||{escape(a.state)}||||||F",
           f"OBX|3|ST|ALARM_SEVERITY^Alarm severity^RMIOT||{escape(a.severity)}||||||F",
           f"OBX|4|TX|ALARM_MESSAGE^Alarm message^RMIOT||{escape(a.message)}||||||F"]
    if a.metric is not None and a.value is not None and math.isfinite(a.value):
        out.append(_obx(5, a.metric, a.value, onset, a.device_id, ABNORMAL[a.severity]))
    return out


def ack_code(raw: bytes, control_id: str) -> tuple[str, str]:
    """(MSA-1, what is wrong) of a peer's ACK to ``control_id``; MSA-1 '' when
    the ACK is unreadable or acknowledges another message."""
    try:
        msg = parse(raw)
    except MessageError as exc:
        return "", f"unreadable ACK: {exc.problems[0].text if exc.problems else exc}"
    msa = msg.segment("MSA")
    if msa is None:
        return "", "ACK without MSA"
    if field(msa, 2) != control_id:
        return "", f"ACK for {field(msa, 2)!r}, not {control_id!r}"
    err = msg.segment("ERR")
    return field(msa, 1), field(err, 8) or field(msa, 3)
