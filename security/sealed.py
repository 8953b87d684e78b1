"""Every secret the platform keeps sealed (SM4-GCM) in the database, and the
associated data that binds each value to its row — written once, so sealing,
opening and key rotation agree.

| table.column | bound to | holds |
|---|---|---|
| device_keys.key_enc | device id | a device's HMAC key |
| users.totp_secret_enc | user id | a TOTP secret |
| patients.identity_enc | patient id | name, ID card number, phone, contacts |
| alarm_channels.secret_enc | channel id | a webhook's HMAC key |

``reseal_all`` re-seals every value under the keyring's newest key, after
``Keyring.rotate()``; a key-encryption key no value needs any more can then be
destroyed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from rmiot.security.sm4 import Keyring, SealError


def device_key_aad(device_id: int) -> bytes:
    return b"rmiot-device-key:" + str(device_id).encode()


def totp_aad(user_id: int) -> bytes:
    return b"rmiot-totp:" + str(user_id).encode()


def patient_aad(patient_id: int) -> bytes:
    return b"rmiot-patient:" + str(patient_id).encode()


def alarm_channel_aad(channel_id: int) -> bytes:
    return b"rmiot-alarm-channel:" + str(channel_id).encode()


@dataclass(frozen=True)
class SealedColumn:
    table: str
    key_columns: tuple[str, ...]
    column: str
    aad: Callable[[int], bytes]


SEALED = (
    SealedColumn("device_keys", ("device_id", "version"), "key_enc", device_key_aad),
    SealedColumn("users", ("id",), "totp_secret_enc", totp_aad),
    SealedColumn("patients", ("id",), "identity_enc", patient_aad),
    SealedColumn("alarm_channels", ("id",), "secret_enc", alarm_channel_aad),
)


def reseal_all(conn: psycopg.Connection[Any], keyring: Keyring) -> dict[str, int]:
    """Re-seal every sealed value not yet under the newest key, one table per
    transaction; returns how many values each table had re-sealed. A value this
    keyring cannot open is left as it is and counted under ``<table>
    unreadable`` (its key is missing: restore it, or it is shredded)."""
    newest = max(keyring.keys)
    done = {}
    for spec in SEALED:
        keys = ", ".join(spec.key_columns)
        count = 0
        with conn.transaction():
            rows = conn.execute(
                f"SELECT {keys}, {spec.column} FROM {spec.table} "
                # key id 0: sealed under a patient's own key (patient_keys), not a KEK
                f"WHERE {spec.column} IS NOT NULL AND get_byte({spec.column}, 1) NOT IN (%s, 0) "
                "FOR UPDATE", (newest,)).fetchall()
            unreadable = 0
            for *ident, sealed in rows:
                try:
                    plain = keyring.open(bytes(sealed), spec.aad(ident[0]))
                except SealError:
                    unreadable += 1
                    continue
                where = " AND ".join(f"{k} = %s" for k in spec.key_columns)
                conn.execute(f"UPDATE {spec.table} SET {spec.column} = %s WHERE {where}",
                             (keyring.seal(plain, spec.aad(ident[0])), *ident))
                count += 1
        done[spec.table] = count
        if unreadable:
            done[f"{spec.table} unreadable"] = unreadable
    return done
