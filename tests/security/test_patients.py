"""Patient identifiers: sealed at rest, pseudonymous across hospitals, masked."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg
import pytest

from rmiot.security import patient_keys, patients
from rmiot.security.patient_keys import PatientKeys
from rmiot.security.patients import Contact, PatientIdentity
from rmiot.security.sm4 import Keyring, SealError
from rmiot.tenants import store as tenants

ZHANG = PatientIdentity("张三", "110101199003071234", "13812345678",
                        (Contact("李四", "13987654321", "spouse"),))


@pytest.fixture
def ring(tmp_path: Path) -> Keyring:
    return Keyring.load(tmp_path / "keys")


def test_a_raw_select_shows_no_identifier(database: str, admin_dsn: str, ring: Keyring,
                                          tmp_path: Path) -> None:
    key = patients.pseudonym_key(tmp_path / "keys")
    with psycopg.connect(database, autocommit=True) as conn:
        region = tenants.create_tenant(conn, f"pr-{time.time_ns()}", "Region", "region")
        h1 = tenants.create_tenant(conn, f"ph1-{time.time_ns()}", "H1", "hospital", region)
        h2 = tenants.create_tenant(conn, f"ph2-{time.time_ns()}", "H2", "hospital", region)
        keys = PatientKeys(ring)
        first, alias = patient_keys.register_patient(conn, keys, key, h1, ZHANG, "M", 1990)
        second, alias2 = patient_keys.register_patient(conn, keys, key, h2, ZHANG, "M", 1990)
    assert alias == alias2 and len(alias) == 64  # the same person in both hospitals
    with psycopg.connect(admin_dsn) as conn:  # what a stolen dump would show
        dump = conn.execute("SELECT p::text, identity_enc FROM patients p "
                            "WHERE id = ANY(%s)", ([first, second],)).fetchall()
    for text, sealed in dump:
        for secret in ("张三", "110101199003071234", "13812345678", "李四", "13987654321",
                       "1234"):
            assert secret not in text and secret.encode() not in bytes(sealed)
    assert patient_keys.open_identity(PatientKeys(ring), first, bytes(dump[0][1])) == ZHANG
    with pytest.raises(SealError):  # a sealed identity moved to another row does not open
        patient_keys.open_identity(PatientKeys(ring), second, bytes(dump[0][1]))


def test_pseudonyms_need_the_key(tmp_path: Path) -> None:
    one = patients.pseudonym(patients.pseudonym_key(tmp_path / "a"), "110101199003071234")
    assert one == patients.pseudonym(patients.pseudonym_key(tmp_path / "a"),
                                     " 110101199003071234 ")
    assert one != patients.pseudonym(patients.pseudonym_key(tmp_path / "b"),
                                     "110101199003071234")
    assert oct((tmp_path / "a" / "pseudonym.key").stat().st_mode & 0o777) == "0o600"


def test_masking_by_the_examples_of_the_standard() -> None:
    shown = patients.masked(ZHANG)
    assert shown.name == "张*"
    assert shown.id_card == "110***********1234"
    assert shown.phone == "138****5678"
    assert shown.emergency_contacts[0].name == "李*"
    assert patients.mask_name("欧阳娜娜") == "欧***"
    assert patients.mask_id_card("12345") == "*****"


def test_key_rotation_reseals_everything(database: str, ring: Keyring, tmp_path: Path) -> None:
    from rmiot.registry import store as registry
    from rmiot.security.sealed import reseal_all

    key = patients.pseudonym_key(tmp_path / "keys")
    with psycopg.connect(database, autocommit=True) as conn:
        region = tenants.create_tenant(conn, f"kr-{time.time_ns()}", "Region", "region")
        patient, _ = patient_keys.register_patient(conn, PatientKeys(ring), key, region, ZHANG)
        device = registry.register_device(conn, region)
        _, device_key = registry.add_key(conn, ring, device)
        new_id = ring.rotate()
        counts = reseal_all(conn, ring)
        assert counts["device_keys"] >= 1
        assert PatientKeys(ring).rewrap_all() >= 1  # the patients' own keys, re-sealed
        # Nothing of this keyring is left under the old key: drop it and all still opens.
        (ring.directory / "kek-1").unlink()
        fresh = Keyring.load(ring.directory)
        sealed = conn.execute("SELECT identity_enc FROM patients WHERE id = %s",
                              (patient,)).fetchone()
        # Sealed under the patient's own key (id 0), whose file the new KEK now seals.
        assert sealed is not None and bytes(sealed[0])[1] == patient_keys.PATIENT_KEY
        assert PatientKeys(fresh).get(patient)  # opens with the new KEK alone
        assert new_id == max(fresh.keys)
        assert patient_keys.open_identity(PatientKeys(fresh), patient, bytes(sealed[0])) == ZHANG
        stored = conn.execute("SELECT key_enc FROM device_keys WHERE device_id = %s",
                              (device,)).fetchone()
        assert stored is not None
        from rmiot.security.sealed import device_key_aad

        assert fresh.open(bytes(stored[0]), device_key_aad(device)) == device_key
