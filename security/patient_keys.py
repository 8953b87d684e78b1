"""Per-patient data keys, so one patient's identifiers can be crypto-shredded.

Patients' identities used to be sealed under the keyring's shared
key-encryption key (KEK): destroying one patient's identity in backups would
mean destroying everybody's. Here every patient gets a data key of their own
(16 random bytes, SM4), and their identity is sealed under it:

- the key lives OUTSIDE the database and its backups:
  ``<keyring_dir>/patients/<patient id>.key`` (directory 0700, file 0600),
  itself sealed under the keyring's newest KEK (bound to the patient id), so
  a copy of the directory alone opens nothing;
- a sealed identity names key id 0 (``PATIENT_KEY``), which no KEK ever has
  (KEK ids start at 1): ``open_identity`` takes the patient's key for it, the
  keyring for older values ("legacy", sealed under a KEK);
- ``shred`` overwrites and deletes the key file and syncs the directory: from
  then on the identity is unreadable in the database, its replicas, every
  base backup and the WAL archive — copies that cannot be edited.

Backing up the keyring: it must be backed up (without it nobody's identity
opens), but apart from the database, and its copies kept only for a short
retention: a shredded patient's key lives on in keyring copies made before,
until they expire. On flash storage and journalling file systems the
overwrite is best effort; the guarantee is that no other copy is kept.

``adopt`` moves legacy identities to per-patient keys; their KEK-sealed
copies stay readable in backups taken before, until those age out.
``rewrap_all`` re-seals the key files under the newest KEK after
``rmiot keys rotate``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import psycopg

from rmiot.security import sm4
from rmiot.security.patients import PatientIdentity, pseudonym
from rmiot.security.sealed import patient_aad
from rmiot.security.sm4 import Keyring, SealError

PATIENT_KEY = 0  # the key id a sealed identity carries when its patient's own key sealed it


def key_aad(patient_id: int) -> bytes:
    return b"rmiot-patient-key:" + str(patient_id).encode()


class PatientKeys:
    """The per-patient data keys of a keyring (see the module docstring)."""

    def __init__(self, keyring: Keyring, directory: Path | None = None) -> None:
        self.keyring = keyring
        self.directory = directory or keyring.directory / "patients"

    def path(self, patient_id: int) -> Path:
        return self.directory / f"{int(patient_id)}.key"

    def create(self, patient_id: int) -> bytes:
        """Make the patient's key (fails if there is one); returns it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        key = secrets.token_bytes(sm4.KEY_LEN)
        _write_new(self.path(patient_id), self.keyring.seal(key, key_aad(patient_id)))
        _sync_dir(self.directory)
        return key

    def get(self, patient_id: int) -> bytes:
        """The patient's key; SealError when it was shredded (or never made)."""
        try:
            sealed = self.path(patient_id).read_bytes()
        except FileNotFoundError:
            raise SealError(f"patient {patient_id}'s key does not exist (shredded)") from None
        return self.keyring.open(sealed, key_aad(patient_id))

    def exists(self, patient_id: int) -> bool:
        return self.path(patient_id).is_file()

    def shred(self, patient_id: int) -> bool:
        """Destroy the patient's key for good; False when there was none."""
        path = self.path(patient_id)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        with path.open("r+b") as fh:
            fh.write(secrets.token_bytes(size))
            fh.flush()
            os.fsync(fh.fileno())
        path.unlink()
        _sync_dir(self.directory)
        return True

    def rewrap_all(self) -> int:
        """Re-seal every key file under the keyring's newest KEK; returns how many."""
        newest = max(self.keyring.keys)
        count = 0
        for path in sorted(self.directory.glob("*.key")):
            sealed = path.read_bytes()
            if sm4.key_id_of(sealed) == newest:
                continue
            patient_id = int(path.stem)
            key = self.keyring.open(sealed, key_aad(patient_id))
            tmp = path.with_suffix(".tmp")
            _write_new(tmp, self.keyring.seal(key, key_aad(patient_id)))
            os.replace(tmp, path)
            count += 1
        if count:
            _sync_dir(self.directory)
        return count


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _sync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal_identity(keys: PatientKeys, patient_id: int, identity: PatientIdentity) -> bytes:
    """The identity sealed under the patient's own key."""
    return sm4.seal(keys.get(patient_id), PATIENT_KEY, identity.to_json(),
                    patient_aad(patient_id))


def open_identity(keys: PatientKeys, patient_id: int, sealed: bytes) -> PatientIdentity:
    """Open a sealed identity, under the patient's key or (legacy) a KEK."""
    if sm4.key_id_of(sealed) == PATIENT_KEY:
        plain = sm4.open_sealed(keys.get(patient_id), sealed, patient_aad(patient_id))
    else:
        plain = keys.keyring.open(sealed, patient_aad(patient_id))
    return PatientIdentity.from_json(plain)


def is_legacy(sealed: bytes) -> bool:
    """True for an identity sealed under a shared KEK, not the patient's key."""
    return sm4.key_id_of(sealed) != PATIENT_KEY


def register_patient(conn: psycopg.Connection[Any], keys: PatientKeys, pseudo_key: bytes,
                     tenant_id: int, identity: PatientIdentity, sex: str = "U",
                     birth_year: int | None = None) -> tuple[int, str]:
    """Store a patient with a key of their own; returns (id, pseudonym). The row
    goes in first with a placeholder so the seal can be bound to its id; the
    identity is never written (nor WAL-logged) under any other key."""
    alias = pseudonym(pseudo_key, identity.id_card)
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO patients (tenant_id, pseudonym, identity_enc, sex, birth_year) "
            "VALUES (%s, %s, '\\x00', %s, %s) RETURNING id",
            (tenant_id, alias, sex, birth_year)).fetchone()
        assert row is not None
        patient_id = int(row[0])
        keys.create(patient_id)
        conn.execute("UPDATE patients SET identity_enc = %s WHERE id = %s",
                     (seal_identity(keys, patient_id, identity), patient_id))
    return patient_id, alias


def adopt(conn: psycopg.Connection[Any], keys: PatientKeys) -> int:
    """Re-seal every legacy identity under a new key of its patient's own, in
    one transaction; returns how many."""
    count = 0
    with conn.transaction():
        rows = conn.execute("SELECT id, identity_enc FROM patients "
                            "WHERE get_byte(identity_enc, 1) <> %s FOR UPDATE",
                            (PATIENT_KEY,)).fetchall()
        for patient_id, sealed in rows:
            identity = open_identity(keys, patient_id, bytes(sealed))
            if not keys.exists(patient_id):
                keys.create(patient_id)
            conn.execute("UPDATE patients SET identity_enc = %s WHERE id = %s",
                         (seal_identity(keys, patient_id, identity), patient_id))
            count += 1
    return count
