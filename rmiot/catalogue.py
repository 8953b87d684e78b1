"""The shared metric catalogue of ``frame-v1.md`` with its interoperability codes.

One table for every interface that names a metric outside RMF: the registry
(names and units of a model's metrics), HL7 v2 inbound (an OBX's code and
unit to a metric id) and FHIR (a metric id to an Observation's codes and
UCUM unit). Pure data, no I/O: every package may import it.

Per metric: ``name`` and ``unit`` as the spec writes them; ``ucum`` the UCUM
code of the unit (empty when the unit is not a UCUM unit: codes, ids, dBm);
``mdc`` and ``mdc_ref`` the IEEE 11073-10101 code and reference id; ``loinc``
the LOINC codes, the one the FHIR vital-signs profile requires first;
``profile`` the vital-signs profile an Observation of it claims (empty: none).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

LOINC: Final = "http://loinc.org"
MDC: Final = "urn:iso:std:iso:11073:10101"
UCUM: Final = "http://unitsofmeasure.org"
RMIOT_METRIC: Final = "urn:rmiot:metric"
VITALS: Final = "http://hl7.org/fhir/StructureDefinition/"


@dataclass(frozen=True, slots=True)
class MetricCode:
    id: int
    name: str
    unit: str
    ucum: str = ""
    mdc: str = ""
    mdc_ref: str = ""
    loinc: tuple[str, ...] = ()
    display: str = ""
    profile: str = ""

    @property
    def vital_sign(self) -> bool:
        return bool(self.loinc)

    @property
    def profile_url(self) -> str:
        return VITALS + self.profile if self.profile else ""


def _m(id: int, name: str, unit: str, ucum: str | None = None, **codes: object) -> MetricCode:
    return MetricCode(id, name, unit, unit if ucum is None else ucum, **codes)  # type: ignore[arg-type]


METRICS: Final[dict[int, MetricCode]] = {m.id: m for m in (
    _m(1, "heart_rate", "/min", mdc="147842", mdc_ref="MDC_ECG_HEART_RATE", loinc=("8867-4",),
       display="Heart rate", profile="heartrate"),
    _m(2, "spo2", "%", mdc="150456", mdc_ref="MDC_PULS_OXIM_SAT_O2",
       loinc=("2708-6", "59408-5"), display="Oxygen saturation in Arterial blood",
       profile="oxygensat"),
    _m(3, "resp_rate", "/min", mdc="151562", mdc_ref="MDC_RESP_RATE", loinc=("9279-1",),
       display="Respiratory rate", profile="resprate"),
    _m(4, "body_temp", "Cel", mdc="150364", mdc_ref="MDC_TEMP_BODY", loinc=("8310-5",),
       display="Body temperature", profile="bodytemp"),
    _m(5, "nibp_sys", "mm[Hg]", mdc="150021", mdc_ref="MDC_PRESS_BLD_NONINV_SYS",
       loinc=("8480-6",), display="Systolic blood pressure", profile="vitalsigns"),
    _m(6, "nibp_dia", "mm[Hg]", mdc="150022", mdc_ref="MDC_PRESS_BLD_NONINV_DIA",
       loinc=("8462-4",), display="Diastolic blood pressure", profile="vitalsigns"),
    _m(7, "nibp_mean", "mm[Hg]", mdc="150023", mdc_ref="MDC_PRESS_BLD_NONINV_MEAN",
       loinc=("8478-0",), display="Mean blood pressure", profile="vitalsigns"),
    _m(8, "pulse_rate", "/min", mdc="149530", mdc_ref="MDC_PULS_OXIM_PULS_RATE",
       loinc=("8889-8",), display="Heart rate by Pulse oximetry", profile="vitalsigns"),
    _m(10, "infusion_rate", "mL/h"), _m(11, "infusion_volume_left", "mL"),
    _m(20, "posture", "code", ""), _m(21, "fall_detected", "bool", ""),
    _m(100, "air_temp", "Cel"), _m(101, "humidity", "%"), _m(102, "co2", "ppm", "[ppm]"),
    _m(103, "pm25", "ug/m3"), _m(104, "pressure_diff", "Pa"),
    _m(105, "o2_supply_pressure", "kPa"),
    _m(200, "active_power", "kW"), _m(201, "energy_total", "kWh", "kW.h"),
    _m(202, "water_total", "m3"), _m(203, "gas_total", "m3"), _m(204, "current", "A"),
    _m(205, "voltage", "V"),
    _m(300, "battery", "%"), _m(301, "rssi", "dBm", ""), _m(302, "usage_hours", "h"),
    _m(303, "error_code", "code", ""), _m(304, "device_state", "code", ""),
    _m(400, "zone_id", "id", ""), _m(401, "x", "m"), _m(402, "y", "m"), _m(403, "floor", "", ""),
    _m(404, "latitude", "deg"), _m(405, "longitude", "deg"), _m(406, "reader_id", "id", ""),
)}

# Code (LOINC, MDC numeric, MDC reference id) -> metric, for inbound messages.
BY_CODE: Final[dict[str, MetricCode]] = {
    code: m for m in METRICS.values() for code in (*m.loinc, m.mdc, m.mdc_ref) if code}


def metric_by_code(code: str) -> MetricCode | None:
    """The catalogue metric a LOINC code, an MDC code or an MDC reference id names."""
    return BY_CODE.get(code.strip())
