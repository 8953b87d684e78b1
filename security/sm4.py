"""SM4-GCM sealing (GB/T 32907 block cipher in GCM mode) for secrets at rest:
device keys now, patient identifiers later.

A sealed value is ``version:u8 | key_id:u8 | nonce:12 | ciphertext | tag:16``;
``key_id`` names which key-encryption key sealed it, so keys can be rotated
(new values sealed with the newest, old ones still open) and a destroyed key
makes its values unreadable for good (crypto-shredding). The associated data
binds a value to its row (e.g. the device id), so a sealed key copied to
another device's row does not open.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

VERSION = 1
NONCE_LEN = 12
TAG_LEN = 16
KEY_LEN = 16


class SealError(Exception):
    """A sealed value could not be opened: wrong key, altered, or unknown key id."""


def seal(key: bytes, key_id: int, plaintext: bytes, aad: bytes = b"") -> bytes:
    nonce = os.urandom(NONCE_LEN)
    enc = Cipher(algorithms.SM4(key), modes.GCM(nonce)).encryptor()
    enc.authenticate_additional_data(aad)
    body = enc.update(plaintext) + enc.finalize()
    return bytes((VERSION, key_id)) + nonce + body + enc.tag


def key_id_of(sealed: bytes) -> int:
    if len(sealed) < 2 + NONCE_LEN + TAG_LEN or sealed[0] != VERSION:
        raise SealError("not a sealed value of a known version")
    return sealed[1]


def open_sealed(key: bytes, sealed: bytes, aad: bytes = b"") -> bytes:
    key_id_of(sealed)
    nonce = sealed[2:2 + NONCE_LEN]
    body, tag = sealed[2 + NONCE_LEN:-TAG_LEN], sealed[-TAG_LEN:]
    dec = Cipher(algorithms.SM4(key), modes.GCM(nonce, tag)).decryptor()
    dec.authenticate_additional_data(aad)
    try:
        return dec.update(body) + dec.finalize()
    except InvalidTag:
        raise SealError("sealed value does not open: wrong key or altered") from None


@dataclass
class Keyring:
    """Key-encryption keys by id, kept in a directory of files ``kek-<id>``
    (16 random bytes each, mode 0600). The highest id seals new values."""

    directory: Path
    keys: dict[int, bytes] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: Path, create: bool = True) -> Keyring:
        ring = cls(directory)
        ring._read()
        if not ring.keys and create:
            try:
                ring.rotate()
            except FileExistsError:  # another process made the first key this moment
                ring._read()
        return ring

    def _read(self) -> None:
        if self.directory.is_dir():
            for path in self.directory.glob("kek-*"):
                self.keys[int(path.name[4:])] = path.read_bytes()

    def rotate(self) -> int:
        """Add a new key; it seals everything from now on. Returns its id."""
        new_id = max(self.keys, default=0) + 1
        if new_id > 255:
            raise SealError("key ids are exhausted (255)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.directory.chmod(0o700)
        key = secrets.token_bytes(KEY_LEN)
        path = self.directory / f"kek-{new_id}"
        # Written whole under a name of its own, then linked into place: a key
        # file is never seen half-written, and linking fails (FileExistsError)
        # when another process made that key first.
        tmp = self.directory / f".kek-{new_id}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(key)
                fh.flush()
                os.fsync(fh.fileno())
            os.link(tmp, path)
        finally:
            tmp.unlink()
        self.keys[new_id] = key
        return new_id

    def seal(self, plaintext: bytes, aad: bytes = b"") -> bytes:
        if not self.keys:
            raise SealError("the keyring is empty")
        newest = max(self.keys)
        return seal(self.keys[newest], newest, plaintext, aad)

    def open(self, sealed: bytes, aad: bytes = b"") -> bytes:
        key_id = key_id_of(sealed)
        if key_id not in self.keys:
            raise SealError(f"key-encryption key {key_id} is not in the keyring")
        return open_sealed(self.keys[key_id], sealed, aad)
