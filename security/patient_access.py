"""Who looked at a patient's records: the audit chain's records that carry the
patient's pseudonym (every read of a patient's data through FHIR, every HL7
ADT about them, and any RPC whose handler names the patient), newest first.

``patient_access(dsn, patient)`` takes the pseudonym or the patient's row id
(any hospital's record of the person: the pseudonym is the same everywhere).
``rmiot audit patient ID|PSEUDONYM`` prints it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import psycopg


@dataclass(frozen=True)
class PatientAccess:
    id: int
    ts: dt.datetime
    actor: str
    role: str
    tenant_id: int | None
    method: str
    object: str
    outcome: str
    source: str


def pseudonym_of(conn: psycopg.Connection[tuple[object, ...]], patient: str) -> str:
    """The pseudonym ``patient`` names: itself, or that of a patient row id."""
    if patient.isdigit() and len(patient) <= 19:
        row = conn.execute("SELECT pseudonym FROM patients WHERE id = %s",
                           (int(patient),)).fetchone()
        if row is not None:
            return str(row[0])
    return patient


def patient_access(dsn: str, patient: str, limit: int = 1000) -> list[PatientAccess]:
    """The audit records of reads and changes of ``patient``'s data, newest first."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        alias = pseudonym_of(conn, patient)
        rows = conn.execute(
            "SELECT id, ts, actor, coalesce(role, ''), tenant_id, method, coalesce(object, ''), "
            "outcome, coalesce(source, '') FROM audit_log WHERE patient = %s "
            "ORDER BY ts DESC, id DESC LIMIT %s", (alias, limit)).fetchall()
    return [PatientAccess(*row) for row in rows]
