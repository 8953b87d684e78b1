"""ORU^R01 observations to RMF frames (IHE PCD-01 style, as monitor gateways send).

Each OBX is one value:

- OBX-3 names the metric by a code of the catalogue (``rmiot.catalogue``):
  LOINC, the IEEE 11073 MDC code or its reference id (``150456``,
  ``MDC_PULS_OXIM_SAT_O2``, ``59408-5`` all mean spo2). An OBX with a code the
  catalogue does not have is skipped with a warning (W) in the ACK: gateways
  send device-hierarchy and setting OBX the platform does not store;
- OBX-2 must be NM (numeric) and OBX-5 a number;
- OBX-6 the unit: the catalogue's UCUM unit, its MDC unit, empty (the
  catalogue's unit meant), or one converted ([degF] to Cel, kPa to mm[Hg]);
- OBX-14 the time it was measured, else OBR-7, else MSH-7;
- OBX-18 the device: the platform's device id (digits, first component);
- OBX-11 X (not obtained) or D (deleted) skip the OBX.

Values of one device at one time become one TELEMETRY frame (float64 fields).
Its ``seq`` is derived from the sender, the control id and the group's place
in the message, so a resent message makes the same frames and the pipeline's
de-duplication stores nothing twice.

Every problem with a catalogued OBX (wrong type, value, unit, time, no
device) makes ``ContentError`` listing them all: the message is answered AE
and none of it is taken.
"""

from __future__ import annotations

import datetime as dt
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from rmiot.catalogue import MetricCode, metric_by_code
from rmiot.ingest.hl7.messages import (
    DATA_TYPE,
    REQUIRED_MISSING,
    TABLE_VALUE,
    ContentError,
    Message,
    Problem,
    hl7_time,
)
from rmiot.ingest.payload import device_id

VTYPE_F64 = 2
MAX_FIELDS = 255

# (unit as sent, catalogue UCUM unit) -> conversion to the catalogue's unit.
_CONVERT: dict[tuple[str, str], Callable[[float], float]] = {
    ("[degF]", "Cel"): lambda v: (v - 32.0) * 5.0 / 9.0,
    ("kPa", "mm[Hg]"): lambda v: v * 7.500615613,
}
# Other spellings of a unit (MDC reference ids and codes, common variants).
_ALIASES = {
    "MDC_DIM_BEAT_PER_MIN": "/min", "264864": "/min", "{beats}/min": "/min", "bpm": "/min",
    "MDC_DIM_RESP_PER_MIN": "/min", "264928": "/min", "{breaths}/min": "/min",
    "MDC_DIM_PERCENT": "%", "262688": "%", "MDC_DIM_DEGC": "Cel", "268192": "Cel",
    "MDC_DIM_FAHR": "[degF]", "266560": "[degF]", "MDC_DIM_MMHG": "mm[Hg]",
    "266016": "mm[Hg]", "mmHg": "mm[Hg]", "MDC_DIM_KILO_PASCAL": "kPa", "268224": "kPa",
    "MDC_DIM_MILLI_L_PER_HR": "mL/h", "265266": "mL/h", "MDC_DIM_MILLI_L": "mL",
    "263762": "mL",
}


@dataclass
class Reading:
    """The values of one device at one time (one frame)."""

    device: int
    ts_us: int
    fields: list[tuple[int, int, float]] = field(default_factory=list)


@dataclass
class Observations:
    readings: list[Reading]
    warnings: list[Problem]


def _value_in_unit(metric: MetricCode, value: float, unit: str) -> float | None:
    """``value`` in the catalogue's unit, or None when ``unit`` cannot be converted."""
    unit = _ALIASES.get(unit, unit)
    if not unit or unit in (metric.unit, metric.ucum):
        return value
    convert = _CONVERT.get((unit, metric.ucum or metric.unit))
    return convert(value) if convert else None


def observations(msg: Message, tz: dt.tzinfo) -> Observations:
    """The readings of an ORU^R01 (see the module docstring); ContentError if any
    catalogued OBX is wrong."""
    problems: list[Problem] = []
    warnings: list[Problem] = []
    default_time = msg.segments[0].field(7)
    obr_time = ""
    groups: dict[tuple[int, int], Reading] = {}
    times: dict[str, int] = {}  # the OBX of a message mostly share one time
    obx_seq = 0
    for segment in msg.segments:
        kind = segment.name
        if kind == "OBR":
            obr_time = segment.field(7)
            continue
        if kind != "OBX":
            continue
        obx_seq += 1
        at = segment.field

        def bad(code: int, text: str, at: int, *, _n: int = obx_seq) -> None:
            problems.append(Problem(code, text, "OBX", _n, at))

        code = at(3, 1)
        metric = metric_by_code(code) if code else None
        if metric is None:
            warnings.append(Problem(TABLE_VALUE, f"OBX-3 code {code!r} is not in the "
                                    "platform's catalogue: skipped", "OBX", obx_seq, 3, "W"))
            continue
        if at(11) in ("X", "D"):
            continue
        if at(2) not in ("NM", ""):
            bad(DATA_TYPE, f"OBX-2 must be NM for {metric.name}, got "
                f"{at(2)!r}", 2)
            continue
        text = at(5)
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            bad(DATA_TYPE, f"OBX-5 {text!r} is not a number", 5)
            continue
        unit = at(6, 1)
        value = _value_in_unit(metric, number, unit)
        if value is None:
            bad(TABLE_VALUE, f"OBX-6 unit {unit!r} cannot be {metric.name}'s "
                f"{metric.ucum or metric.unit}", 6)
            continue
        when = at(14) or obr_time or default_time
        try:
            ts_us = times.get(when) or times.setdefault(when, hl7_time(when, tz))
        except ValueError:
            bad(DATA_TYPE if when else REQUIRED_MISSING,
                f"no observation time (OBX-14, OBR-7 or MSH-7): {when!r}", 14)
            continue
        device = device_id(at(18, 1))
        if device is None:
            bad(REQUIRED_MISSING, "OBX-18 must name the device (its platform id)", 18)
            continue
        reading = groups.get((device, ts_us))
        if reading is None:
            reading = groups[(device, ts_us)] = Reading(device, ts_us)
        if len(reading.fields) == MAX_FIELDS:
            bad(DATA_TYPE, f"more than {MAX_FIELDS} values of one device at one time", 5)
            continue
        reading.fields.append((metric.id, VTYPE_F64, value))
    if problems:
        raise ContentError(problems)
    return Observations(list(groups.values()), warnings)


def frame_seq(sender: str, control_id: str, index: int) -> int:
    """The frame's sequence number: the same for the same message every time."""
    return zlib.crc32(f"{sender}\x00{control_id}\x00{index}".encode())
