"""Patient–device bindings driven by the HIS's ADT events (HL7 v2 A01/A02/A03/A08),
so nobody types an admission, a transfer or a discharge twice.

Beds and devices: a bedside device stays at its bed — its ``location`` is the
bed's key, ``<point of care>/<room>/<bed>`` from PV1-3 (``ICU/0101/07``); a
device without a location (a transport monitor, a wearable) goes where its
patient goes. Whatever the event, one transaction:

- the message is recorded in ``hl7_messages`` by (sender, control id) first;
  if it is there already, the message is a resend and nothing changes;
- the patient is found by pseudonym among the hospital's patients, or
  registered (identity sealed under a key of its own, ``security.patient_keys``);
  A01 and A08 re-seal the identity the message carries;
- A01 admit / A02 transfer (and A08 when the bed changed): the patient's open
  bindings move — a device fixed at another bed is unbound (it stays there),
  a device that follows the patient is transferred to the new bed — then every
  active device fixed at the new bed is bound to the patient (transferred from
  whatever it was bound to: the HIS is the source of truth for who lies there);
- A03 discharge: the patient's open bindings are closed.

Any refusal (``RegistryError``) rolls everything back: an ADT is applied whole
or not at all. Binding rules (active devices only, the patient a patient of
the device's hospital) are ``registry.bindings``'.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg

from rmiot.registry import bindings
from rmiot.registry.bindings import Target
from rmiot.registry.devices import Scope
from rmiot.registry.store import PRECONDITION, RegistryError
from rmiot.security.patient_keys import PatientKeys, register_patient, seal_identity
from rmiot.security.patients import PatientIdentity, pseudonym

EVENTS = ("A01", "A02", "A03", "A08")

_IN_HOSPITAL = "(SELECT id FROM tenants WHERE path @> ARRAY[%s]::integer[])"


@dataclass(frozen=True)
class AdtEvent:
    event: str                  # A01, A02, A03, A08
    tenant_id: int              # the sending hospital
    sender: str                 # the authenticated sender (the actor recorded)
    control_id: str
    identity: PatientIdentity
    sex: str = "U"
    birth_year: int | None = None
    bed: str = ""               # the bed key of PV1-3 ('' none)
    episode: str = ""           # PV1-19 visit number

    @property
    def message_type(self) -> str:
        return f"ADT^{self.event}"


@dataclass
class AdtOutcome:
    duplicate: bool = False
    patient_id: int | None = None
    pseudonym: str = ""
    changes: list[str] = field(default_factory=list)


def apply(conn: psycopg.Connection[Any], keys: PatientKeys, pseudo_key: bytes,
          event: AdtEvent) -> AdtOutcome:
    """Apply one ADT event, whole or not at all (see the module docstring)."""
    if event.event not in EVENTS:
        raise RegistryError(f"ADT^{event.event} is not handled (one of {', '.join(EVENTS)})")
    alias = pseudonym(pseudo_key, event.identity.id_card)
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO hl7_messages (sender, control_id, message_type, tenant_id) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1",
            (event.sender, event.control_id, event.message_type, event.tenant_id)).fetchone()
        if row is None:
            return AdtOutcome(duplicate=True, pseudonym=alias)
        out = AdtOutcome(pseudonym=alias)
        out.patient_id = _patient(conn, keys, pseudo_key, event, alias, out)
        scope = Scope(tenant_id=event.tenant_id)
        reason = f"HL7 {event.message_type} {event.control_id}"
        if event.event == "A03":
            for device, _bed, _location in _open_bindings(conn, out.patient_id, event.tenant_id):
                bindings.unbind(conn, device, event.sender, reason, scope)
                out.changes.append(f"device {device} unbound")
        elif event.bed:
            _move(conn, event, out, scope, reason)
        elif event.event != "A08":
            raise RegistryError(f"ADT^{event.event} names no bed (PV1-3)", PRECONDITION)
    return out


def _patient(conn: psycopg.Connection[Any], keys: PatientKeys, pseudo_key: bytes,
             event: AdtEvent, alias: str, out: AdtOutcome) -> int:
    row = conn.execute(
        "SELECT id FROM patients WHERE pseudonym = %s AND tenant_id IN " + _IN_HOSPITAL
        + " ORDER BY id LIMIT 1", (alias, event.tenant_id)).fetchone()
    if row is None:
        patient_id, _ = register_patient(conn, keys, pseudo_key, event.tenant_id, event.identity,
                                         event.sex, event.birth_year)
        out.changes.append(f"patient {patient_id} registered")
        return patient_id
    patient_id = int(row[0])
    if event.event in ("A01", "A08"):  # the HIS holds the current identity
        conn.execute("UPDATE patients SET identity_enc = %s, sex = %s, "
                     "birth_year = coalesce(%s, birth_year) WHERE id = %s",
                     (seal_identity(keys, patient_id, event.identity), event.sex,
                      event.birth_year, patient_id))
    return patient_id


def _open_bindings(conn: psycopg.Connection[Any], patient_id: int,
                   hospital: int) -> list[tuple[int, str | None, str | None]]:
    """(device, bed, device location) of the patient's open bindings in the hospital."""
    rows = conn.execute(
        "SELECT b.device_id, b.bed, d.location FROM device_bindings b "
        "JOIN devices d ON d.id = b.device_id WHERE b.patient_id = %s "
        "AND b.unbound_at IS NULL AND d.tenant_id IN " + _IN_HOSPITAL
        + " ORDER BY b.device_id", (patient_id, hospital)).fetchall()
    return [(int(r[0]), r[1], r[2]) for r in rows]


def _move(conn: psycopg.Connection[Any], event: AdtEvent, out: AdtOutcome, scope: Scope,
          reason: str) -> None:
    assert out.patient_id is not None
    target = Target(out.patient_id, event.bed, event.episode or None)
    for device, bed, location in _open_bindings(conn, out.patient_id, event.tenant_id):
        if bed == event.bed:
            continue
        if location:  # fixed at its bed: it stays there
            bindings.unbind(conn, device, event.sender, reason, scope)
            out.changes.append(f"device {device} unbound at {bed}")
        else:         # it follows the patient
            bindings.transfer(conn, device, target, event.sender, reason, scope)
            out.changes.append(f"device {device} moved to {event.bed}")
    fixed = conn.execute(
        "SELECT id FROM devices WHERE location = %s AND state = 'active' AND "
        "coalesce(department_id, tenant_id) IN " + _IN_HOSPITAL + " ORDER BY id",
        (event.bed, event.tenant_id)).fetchall()
    for (device,) in fixed:
        now = bindings.current(conn, device)
        if now is None:
            bindings.bind(conn, device, target, event.sender, reason, scope)
        elif (now.patient_id, now.bed) == (target.patient_id, target.bed):
            continue
        else:
            bindings.transfer(conn, device, target, event.sender, reason, scope)
        out.changes.append(f"device {device} bound at {event.bed}")
