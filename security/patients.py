"""Patient identifiers at rest, pseudonyms, and masking by role.

- Sealing: a patient's identity (name, national ID card number, phone,
  emergency contacts) is one JSON document sealed with SM4-GCM under a data
  key of that patient's own, kept outside the database and its backups, bound
  to the patient's row id (``patient_keys``: register, open, shred). Nothing
  identifying is stored in clear.
- Pseudonym: HMAC-SM3 of the normalised ID card number under a separate key
  (``<keyring_dir>/pseudonym.key``, made once, never rotated — a new key would
  break every link), hex. The same person has the same pseudonym in every
  hospital; without the key it cannot be reversed or recomputed. Regional
  (commission) views and the audit trail use it.
- Masking: who sees what is the caller's business with the patient —
  clinicians and department heads of the patient's department see identities
  in full (``patient_identity:read``); anyone else who may see the patient gets
  ``张*``, ``110***********1234``, ``138****5678``; commission roles get the
  pseudonym only.
"""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson

PSEUDONYM_KEY_FILE = "pseudonym.key"


@dataclass(frozen=True)
class Contact:
    name: str
    phone: str
    relation: str = ""


@dataclass(frozen=True)
class PatientIdentity:
    name: str
    id_card: str
    phone: str = ""
    emergency_contacts: tuple[Contact, ...] = field(default=())

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: bytes) -> PatientIdentity:
        raw = orjson.loads(data)
        return cls(raw["name"], raw["id_card"], raw.get("phone", ""),
                   tuple(Contact(**c) for c in raw.get("emergency_contacts", ())))


def pseudonym_key(keyring_dir: Path) -> bytes:
    """The pseudonym key, made (32 random bytes, mode 0600) on first use."""
    path = keyring_dir / PSEUDONYM_KEY_FILE
    if not path.exists():
        keyring_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_bytes()  # another process made it first
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
    return path.read_bytes()


def pseudonym(key: bytes, id_card: str) -> str:
    normalised = id_card.strip().upper().encode()
    return hmac.new(key, normalised, "sm3").hexdigest()


def mask_name(name: str) -> str:
    """张三 -> 张*, 欧阳娜娜 -> 欧***; a Latin name keeps its first letter."""
    return name[:1] + "*" * max(len(name) - 1, 1) if name else ""


def mask_id_card(number: str) -> str:
    """110101199003071234 -> 110***********1234."""
    if len(number) <= 7:
        return "*" * len(number)
    return number[:3] + "*" * (len(number) - 7) + number[-4:]


def mask_phone(phone: str) -> str:
    """13812345678 -> 138****5678."""
    if len(phone) <= 7:
        return "*" * len(phone)
    return phone[:3] + "*" * (len(phone) - 7) + phone[-4:]


def masked(identity: PatientIdentity) -> PatientIdentity:
    return PatientIdentity(
        mask_name(identity.name), mask_id_card(identity.id_card), mask_phone(identity.phone),
        tuple(Contact(mask_name(c.name), mask_phone(c.phone), c.relation)
              for c in identity.emergency_contacts))
