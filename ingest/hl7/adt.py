"""ADT A01/A02/A03/A08 to the registry's ``AdtEvent`` (``registry.adt`` applies it).

- the patient: PID-3 (the repetition whose identifier type is NNCHN or NI —
  the national ID card number the pseudonym is made from — else the first,
  qualified by its assigning authority), PID-5 name (family^given), PID-7
  birth date (its year is kept), PID-8 sex, PID-13 phone;
- the bed: PV1-3 (point of care^room^bed) as ``ICU/0101/07``; the episode:
  PV1-19 (visit number).

A missing PID-3 or PID-5, or a missing bed on A01/A02, is ``ContentError`` (AE).
"""

from __future__ import annotations

from rmiot.ingest.hl7.messages import (
    REQUIRED_MISSING,
    UNSUPPORTED_EVENT,
    ContentError,
    Message,
    MessageError,
    Problem,
    Segment,
    field,
)
from rmiot.registry.adt import EVENTS, AdtEvent
from rmiot.security.patients import PatientIdentity

NATIONAL_ID_TYPES = ("NNCHN", "NI")
MAX_REPEATS = 10


def bed_key(message: Message, number: int = 3) -> str:
    """PV1-number (a PL) as ``point of care/room/bed``, trailing empties dropped."""
    pv1 = message.segment("PV1")
    parts = [field(pv1, number, c) for c in (1, 2, 3)]
    while parts and not parts[-1]:
        parts.pop()
    return "/".join(parts)


def _patient_id(pid: Segment) -> str:
    first = ""
    for repeat in range(1, MAX_REPEATS + 1):
        ident = field(pid, 3, 1, repeat)
        if not ident:
            break
        kind = field(pid, 3, 5, repeat)
        if kind in NATIONAL_ID_TYPES:
            return ident
        if not first:
            authority = field(pid, 3, 4, repeat)
            first = f"{authority}:{ident}" if authority else ident
    return first


def adt_event(message: Message, tenant_id: int, sender: str) -> AdtEvent:
    header = message.header
    if header.trigger not in EVENTS:
        raise MessageError("AR", [Problem(UNSUPPORTED_EVENT, f"ADT^{header.trigger} is not "
                                          f"handled (one of {', '.join(EVENTS)})",
                                          "MSH", 1, 9)], header)
    pid = message.segment("PID")
    if pid is None:
        raise ContentError([Problem(REQUIRED_MISSING, "no PID segment", "PID", 1, 0)])
    problems = []
    ident = _patient_id(pid)
    if not ident:
        problems.append(Problem(REQUIRED_MISSING, "PID-3 (patient identifier) is empty",
                                "PID", 1, 3))
    family, given = field(pid, 5, 1), field(pid, 5, 2)
    name = family + given if not (family + given).isascii() else " ".join(
        p for p in (given, family) if p)
    if not name:
        problems.append(Problem(REQUIRED_MISSING, "PID-5 (patient name) is empty", "PID", 1, 5))
    bed = bed_key(message)
    if header.trigger in ("A01", "A02") and not bed:
        problems.append(Problem(REQUIRED_MISSING, "PV1-3 (assigned location) names no bed",
                                "PV1", 1, 3))
    if problems:
        raise ContentError(problems)
    born = field(pid, 7)
    sex = field(pid, 8)
    episode = field(message.segment("PV1"), 19)
    return AdtEvent(header.trigger, tenant_id, sender, header.control_id,
                    PatientIdentity(name, ident, field(pid, 13)),
                    sex if sex in ("F", "M") else "U",
                    int(born[:4]) if born[:4].isdigit() and 1880 <= int(born[:4]) <= 2200
                    else None, bed, episode[:64])
