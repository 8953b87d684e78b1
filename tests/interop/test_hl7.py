"""HL7 v2 over MLLP against the real listener, pipeline, registry and database:
ORU^R01 to telemetry, ADT to bindings, ACK/NAK with ERR segments, resends."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg

from rmiot.registry import bindings
from rmiot.registry.bindings import Target
from rmiot.security.patients import pseudonym, pseudonym_key
from tests.conftest import eventually
from tests.interop.conftest import (
    MllpClient,
    Region,
    Running,
    adt,
    errors,
    hl7_now,
    msa,
    obx,
    oru,
)

SPO2_MDC = "150456^MDC_PULS_OXIM_SAT_O2^MDC"
HR_LOINC = "8867-4^Heart rate^LN"
PERCENT = "262688^MDC_DIM_PERCENT^MDC"
PER_MIN = "/min^/min^UCUM"


def rows(r: Region, device: int) -> list[tuple[Any, ...]]:
    with r.conn() as conn:
        return conn.execute("SELECT seq, metrics, vals FROM telemetry WHERE device_id = %s "
                            "ORDER BY ts", (device,)).fetchall()


def open_binding(r: Region, device: int) -> tuple[Any, ...] | None:
    with r.conn() as conn:
        return conn.execute("SELECT patient_id, bed, episode FROM device_bindings "
                            "WHERE device_id = %s AND unbound_at IS NULL", (device,)).fetchone()


async def client(platform: Running) -> MllpClient:
    return await MllpClient.connect(platform.hl7.port)


async def test_oru_becomes_telemetry_once(platform: Running) -> None:
    r = platform.region
    c = await client(platform)
    message = oru(r.code_a, "ORU-1", [obx(1, SPO2_MDC, "97.5", PERCENT, r.bed7),
                                      obx(2, HR_LOINC, "72", PER_MIN, r.bed7)])
    reply = await c.call(message)
    assert msa(reply) == ("AA", "ORU-1"), reply
    assert reply[0][8] == "ACK^R01^ACK"
    stored = rows(r, r.bed7)
    assert [(m, v) for _, m, v in stored] == [([2, 1], [97.5, 72.0])]
    # The same message again (its ACK was lost): answered AA, stored once.
    assert msa(await c.call(message)) == ("AA", "ORU-1")
    # From a fresh process too: the frames' keys come from the control id.
    platform.hl7.recent.clear()
    assert msa(await c.call(message)) == ("AA", "ORU-1")
    assert len(rows(r, r.bed7)) == 1
    await c.close()
    with r.conn() as conn:
        await eventually(lambda: conn.execute(
            "SELECT 1 FROM hl7_messages WHERE control_id = 'ORU-1'").fetchone(), 5)


async def test_units_are_converted_and_unknown_codes_skipped(platform: Running) -> None:
    r = platform.region
    c = await client(platform)
    reply = await c.call(oru(r.code_a, "ORU-2", [
        obx(1, "150364^MDC_TEMP_BODY^MDC", "98.6", "[degF]^[degF]^UCUM", r.bed8),
        obx(2, "99999^MDC_SOMETHING_ELSE^MDC", "1", "", r.bed8),
        obx(3, "8480-6^Systolic^LN", "16", "kPa^kPa^UCUM", r.bed8)]))
    assert msa(reply) == ("AA", "ORU-2")
    [warning] = errors(reply)
    assert warning[2] == "OBX^2^3" and warning[4] == "W" and warning[3].startswith("103^")
    [(_, metrics, vals)] = rows(r, r.bed8)
    assert metrics == [4, 5]
    assert abs(vals[0] - 37.0) < 1e-9 and abs(vals[1] - 120.0) < 0.01
    await c.close()


async def test_bad_content_is_answered_ae_and_nothing_stored(platform: Running) -> None:
    r = platform.region
    c = await client(platform)
    before = len(rows(r, r.portable))
    reply = await c.call(oru(r.code_a, "ORU-3", [
        obx(1, HR_LOINC, "71", PER_MIN, r.portable),
        obx(2, SPO2_MDC, "abc", PERCENT, r.portable),
        obx(3, SPO2_MDC, "97", "mmol^mmol^UCUM", r.portable),
        obx(4, HR_LOINC, "70", PER_MIN, r.portable, value_type="ST"),
        f"OBX|5|NM|{HR_LOINC}||70|{PER_MIN}|||||F"]))
    assert msa(reply) == ("AE", "ORU-3")
    where = [(e[2], e[3].split("^")[0]) for e in errors(reply)]
    assert where == [("OBX^2^5", "102"), ("OBX^3^6", "103"), ("OBX^4^2", "102"),
                     ("OBX^5^18", "101")]
    # A device of another hospital, a device that needs HMAC, a time far back.
    for control, device, when in (("ORU-4", r.monitor_b, ""), ("ORU-5", r.keyed, ""),
                                  ("ORU-6", r.portable, "20000101000000+0000")):
        reply = await c.call(oru(r.code_a, control, [
            obx(1, HR_LOINC, "71", PER_MIN, r.portable),
            obx(2, HR_LOINC, "71", PER_MIN, device, when)]))
        assert msa(reply) == ("AE", control), reply
        assert errors(reply), reply
    assert len(rows(r, r.portable)) == before
    assert rows(r, r.monitor_b) == [] and rows(r, r.keyed) == []
    await c.close()


async def test_rejections(platform: Running) -> None:
    r = platform.region
    c = await client(platform)
    reply = await c.call(b"this is not HL7")
    assert msa(reply)[0] == "AR"
    reply = await c.call(f"MSH|^~\\&|X|{r.code_a}|RMIOT|R|{hl7_now()}||QRY^A19|Q-1|P|2.5\r")
    assert msa(reply) == ("AR", "Q-1") and errors(reply)[0][3].startswith("200^")
    reply = await c.call(f"MSH|^~\\&|X|{r.code_a}|RMIOT|R|{hl7_now()}||ORU^R01||P|2.5\r")
    assert msa(reply)[0] == "AR" and errors(reply)[0][2] == "MSH^1^10"
    reply = await c.call(f"MSH|^~\\&|X|{r.code_a}|RMIOT|R|{hl7_now()}||ORU^R01|V-1|P|3.0\r")
    assert msa(reply) == ("AR", "V-1") and errors(reply)[0][3].startswith("203^")
    # A sending facility nobody granted (hospital B's HIS is not set up).
    reply = await c.call(oru(r.code_b, "ORU-B", [obx(1, HR_LOINC, "1", PER_MIN, r.monitor_b)]))
    assert msa(reply) == ("AR", "ORU-B")
    assert rows(r, r.monitor_b) == []
    await c.close()


async def test_a_hospital_platform_sender_may_not_drive_bindings(platform: Running) -> None:
    """hospital_platform pushes telemetry and holds no patient data: its ADT is refused."""
    r = platform.region
    gateway = f"icu-{r.run}"  # the ICU's code as MSH-4: mllp:icu-<run>
    with r.conn() as conn:
        conn.execute("INSERT INTO authz_grants (subject, role, tenant_id) VALUES "
                     "(%s, 'hospital_platform', %s)", (f"mllp:{gateway}", r.icu))
    authz = platform.security.authorizer
    await eventually(lambda: authz.allowed(f"mllp:{gateway}", r.icu, "ingest", "write"), 5)
    assert not authz.allowed(f"mllp:{gateway}", r.icu, "patient", "write")
    c = await client(platform)
    reply = await c.call(adt(gateway, "GW-ADT", "A01", "440301198001019999", bed="ICU^01^07"))
    assert msa(reply) == ("AR", "GW-ADT") and errors(reply)[0][2] == "MSH^1^4", reply
    await c.close()
    with r.conn() as conn:
        assert conn.execute("SELECT count(*) FROM hl7_messages WHERE sender = %s",
                            (f"mllp:{gateway}",)).fetchone() == (0,)


async def test_pipelined_messages_are_answered_in_order(platform: Running) -> None:
    r = platform.region
    c = await client(platform)
    base = int(time.time()) - 600
    controls = [f"P-{i}" for i in range(40)]
    await c.send(*(oru(r.code_a, cid, [obx(1, HR_LOINC, str(60 + i), PER_MIN, r.portable,
                                           time.strftime("%Y%m%d%H%M%S+0000",
                                                         time.gmtime(base + i)))])
                   for i, cid in enumerate(controls)))
    answered = [msa(await c.ack()) for _ in controls]
    assert answered == [("AA", cid) for cid in controls]
    await c.close()


async def test_adt_drives_bindings(platform: Running) -> None:
    r = platform.region
    c = await client(platform)
    id_card = f"44030119800101{int(r.run) % 10000:04d}"
    reply = await c.call(adt(r.code_a, "ADT-1", "A01", id_card, bed="ICU^01^07"))
    assert msa(reply) == ("AA", "ADT-1"), reply
    bound = open_binding(r, r.bed7)
    assert bound is not None and bound[1:] == ("ICU/01/07", "V1")
    patient = bound[0]
    with r.conn() as conn:
        row = conn.execute("SELECT pseudonym, tenant_id, sex, birth_year FROM patients "
                           "WHERE id = %s", (patient,)).fetchone()
    alias = pseudonym(pseudonym_key(r.cfg.keyring_dir), id_card)
    assert row == (alias, r.hospital_a, "M", 1980)
    # A transport monitor goes with the patient.
    with r.conn() as conn:
        bindings.bind(conn, r.portable, Target(patient, "ICU/01/07"), "test")

    reply = await c.call(adt(r.code_a, "ADT-2", "A02", id_card, bed="ICU^01^08",
                             prior="ICU^01^07"))
    assert msa(reply) == ("AA", "ADT-2"), reply
    assert open_binding(r, r.bed7) is None
    assert open_binding(r, r.bed8) == (patient, "ICU/01/08", "V1")
    assert open_binding(r, r.portable) == (patient, "ICU/01/08", "V1")
    with r.conn() as conn:
        ends = conn.execute("SELECT device_id, end_kind, unbound_by, end_reason FROM "
                            "device_bindings WHERE patient_id = %s AND unbound_at IS NOT NULL "
                            "ORDER BY device_id", (patient,)).fetchall()
    assert ends == [(r.bed7, "unbind", f"mllp:{r.code_a}", "HL7 ADT^A02 ADT-2"),
                    (r.portable, "transfer", f"mllp:{r.code_a}", "HL7 ADT^A02 ADT-2")]

    # A resend changes nothing; a malformed one is AE and changes nothing.
    assert msa(await c.call(adt(r.code_a, "ADT-2", "A02", id_card, bed="ICU^01^07"))) == \
        ("AA", "ADT-2")
    assert open_binding(r, r.bed8) == (patient, "ICU/01/08", "V1")
    reply = await c.call(adt(r.code_a, "ADT-3", "A02", "", bed="ICU^01^07"))
    assert msa(reply) == ("AE", "ADT-3") and errors(reply)[0][2] == "PID^1^3"
    reply = await c.call(adt(r.code_a, "ADT-4", "A02", id_card, bed=""))
    assert msa(reply) == ("AE", "ADT-4") and errors(reply)[0][2] == "PV1^1^3"
    assert open_binding(r, r.bed8) == (patient, "ICU/01/08", "V1")

    # A08 updates the identity; A03 discharges.
    assert msa(await c.call(adt(r.code_a, "ADT-5", "A08", id_card, name="Zhang^Sanfeng",
                                bed="ICU^01^08")))[0] == "AA"
    assert msa(await c.call(adt(r.code_a, "ADT-6", "A03", id_card)))[0] == "AA"
    assert open_binding(r, r.bed8) is None and open_binding(r, r.portable) is None
    await c.close()

    # Each ADT is audited with the patient's pseudonym.
    await platform.security.audit.flush()
    with r.conn() as conn:
        audited = conn.execute("SELECT object, outcome FROM audit_log WHERE patient = %s "
                               "AND method LIKE 'hl7:%%' ORDER BY id", (alias,)).fetchall()
    # (The resent ADT-2 was answered from memory, without reading the patient.)
    assert audited == [("ADT-1", "ok"), ("ADT-2", "ok"), ("ADT-5", "ok"), ("ADT-6", "ok")]


async def test_tls_needs_a_client_certificate(platform: Running, tmp_path: Any) -> None:
    import dataclasses
    import ssl

    from rmiot.deploy import certs
    from rmiot.ingest.hl7.listener import Hl7Listener

    r = platform.region
    cfg = dataclasses.replace(r.cfg, hl7=dataclasses.replace(r.cfg.hl7, tls=True))
    listener = Hl7Listener(cfg, platform.ingest.pipeline, platform.security.authorizer,
                           platform.security.audit, platform.security.keyring)
    await listener.start()
    try:
        name = f"gw-{r.run}"
        crt = certs.issue_client(cfg.data_dir / "certs", name, "platform", r.hospital_a)
        key = crt.with_suffix(".key")
        with psycopg.connect(r.dsn, autocommit=True) as conn:
            conn.execute("INSERT INTO authz_grants (subject, role, tenant_id) VALUES "
                         "(%s, 'his_interface', %s)", (f"cert:{name}", r.hospital_a))
        await eventually(lambda: platform.security.authorizer.allowed(
            f"cert:{name}", r.hospital_a, "ingest", "write"), 5)
        context = ssl.create_default_context(cafile=str(cfg.tls_path("ca_file")))
        context.load_cert_chain(crt, key)
        c = await MllpClient.connect(listener.port, ssl=context)
        reply = await c.call(oru(r.code_a, "TLS-1", [obx(1, HR_LOINC, "66", PER_MIN, r.bed7)]))
        assert msa(reply) == ("AA", "TLS-1"), reply
        await c.close()
        bare = ssl.create_default_context(cafile=str(cfg.tls_path("ca_file")))
        try:
            c = await MllpClient.connect(listener.port, ssl=bare)
            await c.send(oru(r.code_a, "TLS-2", [obx(1, HR_LOINC, "66", PER_MIN, r.bed7)]))
            await asyncio.wait_for(c.reader.read(), 5)
        except (ssl.SSLError, ConnectionError):
            pass
    finally:
        await listener.stop()
