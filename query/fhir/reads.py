"""What one caller may read through FHIR, and the resources for it.

Row-level rules are the query layer's (``query.access``), per resource type:

- Device, DeviceMetric: ``device:read`` — the device's home in the scope;
- Observation: ``telemetry:read`` — a device whose home the caller sees
  (every frame), or, for clinicians, the periods a patient was bound to it by
  a binding made in their subtree;
- Patient: ``patient:read`` — registered in the caller's subtree, or bound
  to a device by a binding made in it (a ward treats its hospital's
  patients; a clinician only those); shown in full
  with ``patient_identity:read`` on the patient's tenant, masked otherwise;
  commission roles (``aggregate:read``) get the pseudonym only;
- DocumentReference (shared results): a result is read by whoever may read a
  patient record of the same person (same pseudonym) — the publishing
  hospital's staff and any hospital of the region that treats that person.

Anything outside is ``NotFound`` — the same as a row that does not exist.
Every answer names the pseudonyms of the patients whose data it carries
(``Read.patients``): the API audits one record per patient.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from rmiot.query.access import Access, Scope
from rmiot.query.fhir import resources as fhir
from rmiot.query.fhir import store
from rmiot.query.fhir.store import Conn, Period
from rmiot.security.authz import Authorizer
from rmiot.security.patient_keys import PatientKeys, open_identity
from rmiot.security.patients import masked

JSON = dict[str, Any]
Keyset = tuple[dt.datetime, int, int, int]  # an Observation's frame (ts, device, seq), index


class NotFound(Exception):
    pass


class Invalid(Exception):
    pass


@dataclass
class Read:
    body: JSON
    patients: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class ObservationQuery:
    patient: int = 0
    device: int = 0
    metrics: tuple[int, ...] = ()
    lo: dt.datetime = store.EVER
    hi: dt.datetime = store.NEVER
    count: int = 100
    after: Keyset | None = None


class Reader:
    def __init__(self, authorizer: Authorizer, keys: PatientKeys) -> None:
        self.authorizer = authorizer
        self.keys = keys
        self.access = Access(authorizer, lambda tenant: authorizer.tree.subtree(tenant))

    def scope(self, subject: str, obj: str, act: str = "read") -> Scope:
        return self.access.scope(subject, obj, act)

    # -- devices ------------------------------------------------------------------

    async def device(self, conn: Conn, subject: str, device_id: int) -> JSON:
        row = await store.device(conn, device_id)
        if row is None or not self.scope(subject, "device").reaches(row.home):
            raise NotFound(f"Device/{device_id}")
        return fhir.device(self._patient_shown(subject, row))

    def _patient_shown(self, subject: str, row: fhir.DeviceRow) -> fhir.DeviceRow:
        if row.patient_id and not self.scope(subject, "patient").sees(row.home):
            return dataclasses.replace(row, patient_id=None)
        return row

    async def devices(self, conn: Conn, subject: str, *, organization: int = 0,
                      patient: int = 0, after: int = 0, count: int = 100) -> list[JSON]:
        scope = self.scope(subject, "device")
        reached = sorted(scope.full | scope.bound | scope.deid)
        if organization:
            if organization not in reached:
                return []
            homes = sorted(self.authorizer.tree.subtree(organization) & set(reached))
        else:
            homes = reached
        if patient:
            await self.patient_row(conn, subject, patient)
        rows = await store.devices(conn, homes=homes, patient_id=patient or None, after=after,
                                   limit=count)
        return [fhir.device(self._patient_shown(subject, r)) for r in rows]

    async def device_metrics(self, conn: Conn, subject: str, device_id: int) -> list[JSON]:
        row = await store.device(conn, device_id)
        if row is None or not self.scope(subject, "device").reaches(row.home):
            raise NotFound(f"Device/{device_id}")
        return [fhir.device_metric(row, m) for m in row.metrics]

    # -- patients -----------------------------------------------------------------

    async def patient_row(self, conn: Conn, subject: str,
                          patient_id: int) -> tuple[store.PatientRow, str]:
        """The patient and how the caller may see them (full, masked,
        pseudonymised); NotFound when not at all."""
        row, how, _ = await self._patient_access(conn, subject, patient_id)
        return row, how

    async def _patient_access(self, conn: Conn, subject: str, patient_id: int,
                              ) -> tuple[store.PatientRow, str, list[Period]]:
        """``patient_row`` and the patient's bindings it was decided on."""
        row = await store.patient(conn, patient_id)
        if row is None:
            raise NotFound(f"Patient/{patient_id}")
        scope = self.scope(subject, "patient")
        how = ""
        bindings = await store.bindings_of_patient(conn, patient_id)
        wards = {p.tenant_id for p in bindings}
        if scope.sees(row.tenant_id) or any(scope.reaches(t) for t in wards):
            how = "seen"
        elif self.scope(subject, "aggregate").reaches(row.tenant_id):
            how = "pseudonymised"
        if not how:
            raise NotFound(f"Patient/{patient_id}")
        if how == "seen":  # in full for the patient's hospital's or ward's clinicians
            how = "full" if any(self.authorizer.allowed(subject, t, "patient_identity", "read")
                                for t in (row.tenant_id, *wards)) else "masked"
        return row, how, bindings

    async def patient(self, conn: Conn, subject: str, patient_id: int) -> Read:
        row, how = await self.patient_row(conn, subject, patient_id)
        view = fhir.PatientView(row.id, row.pseudonym, row.tenant_name, how)
        if how != "pseudonymised":
            identity = open_identity(self.keys, row.id, row.sealed)
            if how == "masked":
                identity = masked(identity)
            view = fhir.PatientView(row.id, row.pseudonym, row.tenant_name, how, identity.name,
                                    identity.id_card, identity.phone, row.sex, row.birth_year)
        return Read(fhir.patient(view), {row.pseudonym})

    # -- observations ---------------------------------------------------------------

    async def _periods(self, conn: Conn, subject: str, q: ObservationQuery) -> list[Period]:
        """The device windows the caller may read for the query."""
        scope = self.scope(subject, "telemetry")
        if q.patient:
            _, how, periods = await self._patient_access(conn, subject, q.patient)
            if how == "pseudonymised":
                raise NotFound(f"Patient/{q.patient}")
            homes = await store.homes(conn, {p.device for p in periods})
            periods = [p for p in periods if scope.sees(homes.get(p.device, 0))
                       or p.tenant_id in scope.bound]
            if q.device:
                periods = [p for p in periods if p.device == q.device]
            return periods
        home = (await store.homes(conn, {q.device})).get(q.device, 0)
        if home and scope.sees(home):
            return [Period(q.device, store.EVER, store.NEVER)]
        mine = [p for p in await store.bindings_of_device(conn, q.device)
                if p.tenant_id in scope.bound]
        if not home or not mine:
            raise NotFound(f"Device/{q.device}")
        return mine

    async def observations(self, conn: Conn, subject: str,
                           q: ObservationQuery) -> tuple[Read, Keyset | None]:
        """A page of ``q.count`` Observations and the keyset of the next page (None:
        the last). The keyset is the last Observation's frame and index in it: a
        page may end inside a frame, and the next one starts after that index."""
        periods = await self._periods(conn, subject, q)
        wanted = set(q.metrics)
        bound: dict[int, list[Period]] = {}
        read = Read({})
        entries: list[JSON] = []
        last: Keyset | None = None

        async def take(device: int, ts: dt.datetime, seq: int, metrics: list[int],
                       vals: list[float], start: int) -> None:
            nonlocal last
            if device not in bound:
                bound[device] = [p for p in periods if p.device == device] if q.patient \
                    else await store.bindings_of_device(conn, device)
            who = next((p for p in bound[device] if p.start <= ts < p.end), None)
            found = fhir.frame_observations(device, ts, seq, metrics, vals,
                                            who.patient_id if who else None, wanted, start)
            for index, obs in found[:q.count - len(entries)]:
                entries.append(obs)
                last = (ts, device, seq, index)
            if found and who is not None and who.pseudonym:
                read.patients.add(who.pseudonym)

        after = q.after
        if after is not None:  # the rest of the frame the last page ended in
            ts, device, seq, index = after
            frame = await store.frame(conn, device, ts, seq)
            if frame is not None and q.lo <= ts < q.hi and any(
                    p.device == device and p.start <= ts < p.end for p in periods):
                await take(device, ts, seq, frame[0], frame[1], index + 1)
        cursor = after[:3] if after is not None else None
        while len(entries) < q.count:
            need = q.count - len(entries)
            rows = await store.frames(conn, periods, q.lo, q.hi, list(q.metrics) or None,
                                      cursor, need)
            for device, ts, seq, metrics, vals in rows:
                await take(device, ts, seq, metrics, vals, 0)
                if len(entries) == q.count:
                    break
            if len(rows) < need:
                break
            cursor = (rows[-1][1], rows[-1][0], rows[-1][2])
        read.body = {"entries": entries}
        return read, last if len(entries) == q.count else None

    async def observation(self, conn: Conn, subject: str, ident: str) -> Read:
        parsed = fhir.parse_observation_id(ident)
        if parsed is None:
            raise NotFound(f"Observation/{ident}")
        device, ts_us, seq, metric = parsed
        ts = fhir.EPOCH + dt.timedelta(microseconds=ts_us)
        periods = await self._periods(conn, subject, ObservationQuery(device=device))
        found = await store.frame(conn, device, ts, seq)
        if found is None or metric not in found[0] or not any(
                p.start <= ts < p.end for p in periods):
            raise NotFound(f"Observation/{ident}")
        value = found[1][found[0].index(metric)]
        who = next((p for p in await store.bindings_of_device(conn, device)
                    if p.start <= ts < p.end), None)
        obs = fhir.observation(device, ts, seq, metric, value, who.patient_id if who else None)
        if obs is None:
            raise NotFound(f"Observation/{ident}")
        return Read(obs, {who.pseudonym} if who else set())

    # -- shared results ------------------------------------------------------------

    async def _own_record(self, conn: Conn, subject: str, alias: str) -> int | None:
        """The caller's visible record of the person, if any."""
        for patient_id, _tenant in await store.patients_by_pseudonym(conn, alias):
            try:
                _, how = await self.patient_row(conn, subject, patient_id)
            except NotFound:
                continue
            if how != "pseudonymised":
                return patient_id
        return None

    async def results(self, conn: Conn, subject: str, patient_id: int,
                      count: int) -> Read:
        row, how = await self.patient_row(conn, subject, patient_id)
        if how == "pseudonymised":
            raise NotFound(f"Patient/{patient_id}")
        found = await store.results_of(conn, row.pseudonym, count)
        return Read({"entries": [fhir.document_reference(r, patient_id) for r in found]},
                    {row.pseudonym} if found else set())

    async def result(self, conn: Conn, subject: str, result_id: int) -> Read:
        found = await store.result(conn, result_id)
        if found is None:
            raise NotFound(f"DocumentReference/{result_id}")
        shared, alias = found
        mine = await self._own_record(conn, subject, alias)
        if mine is None:
            raise NotFound(f"DocumentReference/{result_id}")
        return Read(fhir.document_reference(shared, mine), {alias})

    async def publish(self, conn: Conn, subject: str, home: int, body: JSON) -> Read:
        """A DocumentReference from a hospital: stored as a shared result."""
        patient_id, device_id, code, title, content_type, data, start, end = _document(body)
        row, how = await self.patient_row(conn, subject, patient_id)
        writes = self.scope(subject, "patient", "write")
        if how == "pseudonymised" or not (writes.sees(row.tenant_id) or any(
                writes.reaches(p.tenant_id)
                for p in await store.bindings_of_patient(conn, patient_id))):
            raise NotFound(f"Patient/{patient_id}")
        if device_id:
            await self.device(conn, subject, device_id)
        shared = await store.publish(conn, home, patient_id, row.pseudonym, device_id or None,
                                     code, title, content_type, data, start, end, subject)
        return Read(fhir.document_reference(shared, patient_id), {row.pseudonym})


def _reference(value: Any, kind: str, where: str) -> int:
    text = value.get("reference", "") if isinstance(value, dict) else ""
    prefix = f"{kind}/"
    if not text.startswith(prefix) or not text[len(prefix):].isdigit():
        raise Invalid(f"{where} must be a reference to {kind}/<id>")
    return int(text[len(prefix):])


def _document(body: JSON) -> tuple[int, int, str, str, str, bytes, dt.datetime | None,
                                   dt.datetime | None]:
    import base64
    import binascii

    if body.get("resourceType") != "DocumentReference":
        raise Invalid("the body must be a DocumentReference")
    patient_id = _reference(body.get("subject"), "Patient", "subject")
    context = body.get("context") or {}
    related = context.get("related") or []
    device_id = _reference(related[0], "Device", "context.related[0]") if related else 0
    coding = ((body.get("type") or {}).get("coding") or [{}])[0]
    code = coding.get("code") or ""
    if not code:
        raise Invalid("type.coding[0].code is required")
    code = f"{coding.get('system', '')}|{code}" if coding.get("system") else code
    content = body.get("content") or []
    attachment = content[0].get("attachment", {}) if content else {}
    title = str(attachment.get("title") or body.get("description") or "")[:200]
    if not title:
        raise Invalid("content[0].attachment.title (or description) is required")
    try:
        data = base64.b64decode(attachment.get("data", ""), validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise Invalid("content[0].attachment.data must be base64") from None
    if not data or len(data) > 1 << 20:
        raise Invalid("content[0].attachment.data: 1 byte to 1 MiB")
    period = context.get("period") or {}
    try:
        start, end = (dt.datetime.fromisoformat(period[k].replace("Z", "+00:00"))
                      if period.get(k) else None for k in ("start", "end"))
    except (ValueError, AttributeError):
        raise Invalid("context.period: ISO date-times") from None
    return (patient_id, device_id, code, title,
            str(attachment.get("contentType") or "application/octet-stream"), data, start, end)
