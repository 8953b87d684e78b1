"""Password policy and hashing.

Policy (GB/T 22239-2019 level 3): at least 8 characters with at least three of
the four classes lower case, upper case, digit, other; not the user name.

Hashing: PBKDF2-HMAC-SM3 (the national hash, through OpenSSL), 200,000
iterations (about 0.1 s here), 16-byte random salt, stored as
``pbkdf2-sm3$<iterations>$<salt b64>$<hash b64>`` so the cost can be raised
later and old hashes still verify (``needs_rehash`` says when to upgrade one).
Comparison is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import string

SCHEME = "pbkdf2-sm3"
ITERATIONS = 200_000
MIN_LENGTH = 8


class PasswordPolicyError(ValueError):
    """The password does not meet the policy; the message says which rule."""


def check_policy(password: str, username: str = "") -> None:
    if len(password) < MIN_LENGTH:
        raise PasswordPolicyError(f"a password needs at least {MIN_LENGTH} characters")
    classes = sum((
        any(c in string.ascii_lowercase for c in password),
        any(c in string.ascii_uppercase for c in password),
        any(c.isdigit() for c in password),
        any(not c.isalnum() for c in password) or any(not c.isascii() for c in password),
    ))
    if classes < 3:
        raise PasswordPolicyError("a password needs three of: lower case, upper case, "
                                  "digits, other characters")
    if username and username.lower() in password.lower():
        raise PasswordPolicyError("a password must not contain the user name")


def hash_password(password: str, iterations: int = ITERATIONS) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sm3", password.encode(), salt, iterations)
    return "$".join((SCHEME, str(iterations), _b64(salt), _b64(digest)))


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, iterations, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != SCHEME:
        return False
    computed = hashlib.pbkdf2_hmac("sm3", password.encode(), _unb64(salt), int(iterations))
    return hmac.compare_digest(computed, _unb64(digest))


def needs_rehash(stored: str) -> bool:
    parts = stored.split("$")
    return len(parts) != 4 or parts[0] != SCHEME or int(parts[1]) < ITERATIONS


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)
