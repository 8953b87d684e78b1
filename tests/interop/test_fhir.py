"""The FHIR API against the real platform: data comes in by HL7 (ADT then ORU),
goes out as FHIR resources validated with fhir.resources' models (R4B, the
4.x line's current models: the same shapes as R4 for these resources), read
by people of different roles; every patient read audited with the pseudonym."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.device import Device
from fhir.resources.R4B.devicemetric import DeviceMetric
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir.resources.R4B.patient import Patient

from rmiot.security.patient_access import patient_access
from tests.interop.conftest import MllpClient, Running, adt, msa, obx, oru

MODELS: dict[str, Any] = {"Observation": Observation, "Device": Device, "Patient": Patient,
                          "DeviceMetric": DeviceMetric, "Bundle": Bundle,
                          "DocumentReference": DocumentReference,
                          "OperationOutcome": OperationOutcome}


def valid(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource, after its model accepted it (entries too)."""
    MODELS[resource["resourceType"]].model_validate(resource)
    for entry in resource.get("entry", ()):
        valid(entry["resource"])
    return resource


@dataclass
class Fhir:
    http: aiohttp.ClientSession
    base: str
    tokens: dict[str, str]

    async def get(self, user: str, path: str, status: int = 200) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.tokens[user]}"} if user else {}
        async with self.http.get(self.base + path, headers=headers) as resp:
            body = await resp.json(content_type=None)
            assert resp.status == status, (resp.status, body)
            assert resp.content_type == "application/fhir+json"
        return valid(body)

    async def post(self, user: str, path: str, body: dict[str, Any],
                   status: int = 201) -> dict[str, Any]:
        async with self.http.post(self.base + path, json=body, headers={
                "Authorization": f"Bearer {self.tokens[user]}"}) as resp:
            got = await resp.json(content_type=None)
            assert resp.status == status, (resp.status, got)
        return valid(got)


@dataclass
class Admitted:
    patient: int
    pseudonym: str
    times: list[str]


@pytest.fixture
async def fhir(platform: Running) -> AsyncIterator[Fhir]:
    async with aiohttp.ClientSession() as http:
        yield Fhir(http, f"http://127.0.0.1:{platform.fhir.port}/fhir",
                   platform.region.tokens)


async def admit(platform: Running, id_card: str, bed: str, device: int) -> Admitted:
    """Admit a patient by ADT and send a minute of vitals by ORU."""
    r = platform.region
    c = await MllpClient.connect(platform.hl7.port)
    cid = id_card[-10:]
    assert msa(await c.call(adt(r.code_a, f"A01-{cid}", "A01", id_card, bed=bed)))[0] == "AA"
    base = int(time.time()) + 1  # measured after the admission (within the future window)
    times = [time.strftime("%Y%m%d%H%M%S+0000", time.gmtime(base + 20 * i)) for i in range(3)]
    for i, when in enumerate(times):
        reply = await c.call(oru(r.code_a, f"O-{cid}-{i}", [
            obx(1, "8867-4^HR^LN", str(70 + i), "/min", device, when),
            obx(2, "150456^MDC_PULS_OXIM_SAT_O2^MDC", "98", "%", device, when)]))
        assert msa(reply)[0] == "AA", reply
    await c.close()
    with r.conn() as conn:
        row = conn.execute("SELECT b.patient_id, p.pseudonym FROM device_bindings b JOIN "
                           "patients p ON p.id = b.patient_id WHERE b.device_id = %s AND "
                           "b.unbound_at IS NULL", (device,)).fetchone()
    assert row is not None
    return Admitted(row[0], row[1], times)


async def test_observations_by_patient_device_code_date(platform: Running, fhir: Fhir) -> None:
    r = platform.region
    a = await admit(platform, f"1101051970{int(r.run) % 10**8:08d}", "ICU^01^07", r.bed7)
    page = await fhir.get("head_a", f"/Observation?patient={a.patient}")
    observations = [e["resource"] for e in page["entry"]]
    assert len(observations) == 6
    hr = observations[0]
    assert hr["subject"] == {"reference": f"Patient/{a.patient}"}
    assert hr["meta"]["profile"] == ["http://hl7.org/fhir/StructureDefinition/heartrate"]
    assert hr["category"][0]["coding"][0]["code"] == "vital-signs"
    codes = {(c["system"], c["code"]) for c in hr["code"]["coding"]}
    assert {("http://loinc.org", "8867-4"), ("urn:iso:std:iso:11073:10101", "147842")} <= codes
    assert hr["valueQuantity"] == {"value": 70.0, "unit": "/min",
                                   "system": "http://unitsofmeasure.org", "code": "/min"}
    spo2 = observations[1]
    assert spo2["code"]["coding"][0]["code"] == "2708-6"
    assert spo2["valueQuantity"]["code"] == "%"

    # By code (LOINC or MDC), by device, by date; paging with the next link.
    by_code = await fhir.get("head_a", f"/Observation?subject=Patient/{a.patient}"
                                       "&code=http://loinc.org|59408-5")
    assert [e["resource"]["code"]["coding"][0]["code"] for e in by_code["entry"]] == \
        ["2708-6"] * 3
    first = await fhir.get("head_a", f"/Observation?device={r.bed7}&code=147842&_count=2")
    assert [e["resource"]["valueQuantity"]["value"] for e in first["entry"]] == [70.0, 71.0]
    [link] = [lnk["url"] for lnk in first["link"] if lnk["relation"] == "next"]
    second = await fhir.get("head_a", link[len(fhir.base):])
    assert [e["resource"]["valueQuantity"]["value"] for e in second["entry"]] == [72.0]
    assert not [lnk for lnk in second["link"] if lnk["relation"] == "next"]
    # _count counts Observations, not frames: pages of 4 end inside the second
    # frame (HR, SpO2 each) and go on from where the last one stopped.
    pages, url = [], f"/Observation?patient={a.patient}&_count=4"
    while url:
        got = await fhir.get("head_a", url)
        pages.append([e["resource"]["id"] for e in got["entry"]])
        url = next((lnk["url"][len(fhir.base):] for lnk in got["link"]
                    if lnk["relation"] == "next"), "")
    assert [len(p) for p in pages] == [4, 2]
    assert [i for p in pages for i in p] == [o["id"] for o in observations]
    await fhir.get("head_a", f"/Observation?patient={a.patient}&_page=1.2.3.-1", 400)
    day = time.strftime("%Y-%m-%d", time.gmtime())
    iso = f"{a.times[1][:4]}-{a.times[1][4:6]}-{a.times[1][6:8]}T{a.times[1][8:10]}:" \
          f"{a.times[1][10:12]}:{a.times[1][12:14]}Z"
    dated = await fhir.get("head_a", f"/Observation?patient={a.patient}&code=8867-4"
                                     f"&date=ge{iso}&date=le{day}")
    assert [e["resource"]["valueQuantity"]["value"] for e in dated["entry"]][:2] == \
        [71.0, 72.0]
    # One Observation by id.
    one = await fhir.get("head_a", f"/Observation/{hr['id']}")
    assert one["valueQuantity"]["value"] == 70.0
    # Bad searches.
    await fhir.get("head_a", "/Observation?code=8867-4", 400)
    await fhir.get("head_a", f"/Observation?patient={a.patient}&code=1234-5", 400)
    await fhir.get("head_a", f"/Observation?patient={a.patient}&colour=red", 400)


async def test_who_sees_what(platform: Running, fhir: Fhir) -> None:
    r = platform.region
    a = await admit(platform, f"1101051971{int(r.run) % 10**8:08d}", "ICU^01^08", r.bed8)
    # Unauthenticated: 401; a clinician of another hospital: not found.
    await fhir.get("", f"/Patient/{a.patient}", 401)
    await fhir.get("clinician_b", f"/Patient/{a.patient}", 404)
    await fhir.get("clinician_b", f"/Observation?patient={a.patient}", 404)
    await fhir.get("clinician_b", f"/Device/{r.bed8}", 404)
    # The ICU head sees the identity in full, the hospital admin masked, the
    # commission's analyst the pseudonym only; the analyst reads no telemetry.
    full = await fhir.get("head_a", f"/Patient/{a.patient}")
    assert full["name"] == [{"text": "San Zhang"}] and "meta" not in full
    masked = await fhir.get("admin_a", f"/Patient/{a.patient}")
    assert masked["name"] == [{"text": "S********"}]
    assert masked["meta"]["security"][0]["code"] == "MASKED"
    pseudo = await fhir.get("analyst", f"/Patient/{a.patient}")
    assert pseudo["identifier"] == [{"system": "urn:rmiot:pseudonym", "value": a.pseudonym}]
    assert "name" not in pseudo and pseudo["meta"]["security"][0]["code"] == "PSEUDED"
    await fhir.get("analyst", f"/Observation?patient={a.patient}", 403)
    # A clinician of the ICU sees the bound patient's data.
    bound = await fhir.get("clinician_a", f"/Observation?patient={a.patient}")
    assert len(bound["entry"]) == 6
    # Devices and their metrics.
    device = await fhir.get("admin_a", f"/Device/{r.bed8}")
    assert device["patient"] == {"reference": f"Patient/{a.patient}"}
    assert device["location"] == {"display": "ICU/01/08"}
    metrics = await fhir.get("admin_a", f"/DeviceMetric?source=Device/{r.bed8}")
    assert [e["resource"]["type"]["coding"][-1]["code"] for e in metrics["entry"]] == \
        ["1", "2"]
    devices = await fhir.get("admin_a", f"/Device?organization={r.icu}")
    assert {e["resource"]["id"] for e in devices["entry"]} >= {str(r.bed7), str(r.bed8)}

    # Every read of the patient's data is in the audit chain with the pseudonym.
    await platform.security.audit.flush()
    readers = patient_access(r.dsn, a.pseudonym)
    seen = {(e.actor, e.method) for e in readers}
    assert (f"user:{r.users['head_a']}", "fhir:GET /fhir/Patient/" + str(a.patient)) in seen
    assert (f"user:{r.users['clinician_a']}", "fhir:GET /fhir/Observation") in seen
    assert (f"user:{r.users['analyst']}", "fhir:GET /fhir/Patient/" + str(a.patient)) in seen
    assert not any(e.actor == f"user:{r.users['clinician_b']}" and e.outcome == "ok"
                   for e in readers)


async def test_results_shared_between_hospitals(platform: Running, fhir: Fhir) -> None:
    r = platform.region
    id_card = f"1101051972{int(r.run) % 10**8:08d}"
    a = await admit(platform, id_card, "ICU^01^07", r.bed7)
    summary = b'{"ahi": 23.5, "spo2_min": 84}'
    doc = {"resourceType": "DocumentReference", "status": "current",
           "type": {"coding": [{"system": "http://loinc.org", "code": "28633-6"}]},
           "subject": {"reference": f"Patient/{a.patient}"},
           "context": {"related": [{"reference": f"Device/{r.bed7}"}],
                       "period": {"start": "2024-01-01T22:00:00Z",
                                  "end": "2024-01-02T06:00:00Z"}},
           "content": [{"attachment": {"contentType": "application/json",
                                       "title": "Sleep study summary",
                                       "data": base64.b64encode(summary).decode()}}]}
    published = await fhir.post("clinician_a", "/DocumentReference", doc)
    # Hospital B registers the same person (same ID card) and binds them.
    c = await MllpClient.connect(platform.hl7.port)
    with r.conn() as conn:
        conn.execute("INSERT INTO authz_grants (subject, role, tenant_id) VALUES "
                     "(%s, 'his_interface', %s) ON CONFLICT DO NOTHING",
                     (f"mllp:{r.code_b}", r.hospital_b))
        conn.execute("UPDATE devices SET location = 'WARD/1/1' WHERE id = %s", (r.monitor_b,))
    await _until_allowed(platform, f"mllp:{r.code_b}", r.hospital_b)
    assert msa(await c.call(adt(r.code_b, "B-A01", "A01", id_card, bed="WARD^1^1")))[0] == "AA"
    await c.close()
    with r.conn() as conn:
        row = conn.execute("SELECT patient_id FROM device_bindings WHERE device_id = %s "
                           "AND unbound_at IS NULL", (r.monitor_b,)).fetchone()
    assert row is not None
    theirs = row[0]
    assert theirs != a.patient
    found = await fhir.get("clinician_b", f"/DocumentReference?patient={theirs}")
    [entry] = [e["resource"] for e in found["entry"]]
    assert entry["id"] == published["id"]
    assert entry["subject"] == {"reference": f"Patient/{theirs}"}
    assert base64.b64decode(entry["content"][0]["attachment"]["data"]) == summary
    assert (await fhir.get("clinician_b", f"/DocumentReference/{published['id']}"))["id"] == \
        published["id"]
    # Someone who treats no such person does not find it.
    await fhir.get("analyst", f"/DocumentReference/{published['id']}", 403)
    with r.conn() as conn:
        conn.execute("UPDATE device_bindings SET unbound_at = now(), unbound_by = 'test', "
                     "end_kind = 'unbind' WHERE device_id = %s AND unbound_at IS NULL",
                     (r.monitor_b,))


async def _until_allowed(platform: Running, subject: str, tenant: int) -> None:
    from tests.conftest import eventually

    await eventually(lambda: platform.security.authorizer.allowed(subject, tenant, "patient",
                                                                  "write"), 5)
