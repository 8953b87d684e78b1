"""The broker's logins and ACLs, generated from the registry's transport
credentials (migration 0012), so that on MQTT a device can publish only as
itself — even without HMAC in its frames.

What Mosquitto reads (``password_file`` and ``acl_file``, see
deploy/mosquitto.conf), under ``<data_dir>/broker/``:

- ``passwd``: ``user:hash`` lines, the hashes in Mosquitto's own PBKDF2-SHA512
  format, copied from the database as they are (the platform never sees a
  device's password again after issuing it);
- ``acl``: the platform's login may read and write every topic; each device
  login may publish only to ``<root>/up/<its id>/#`` and read only
  ``<root>/down/<its id>/#``. Mosquitto checks the ACL on every publish and on
  every message it delivers, so a device that subscribes to ``<root>/down/#``
  still gets only its own.

Several platforms may share one broker (a hospital and a region on one host,
test runs beside a running platform), each with its own database and
``mqtt.topic_root``: each writes only its own fragment,
``auth.d/<topic root>.passwd`` and ``.acl``, and the two files Mosquitto reads
are assembled from the platform login and every fragment, under a file lock.

The platform's login (``broker.platform_user``) has a random password kept in
``broker.platform_password_file`` (``rmiot.ingest.broker_login``), made here the
first time the private broker needs it.

Staying current: ``BrokerAuthSync`` follows NOTIFY on
``rmiot_transport_credentials``; after each burst of changes it rewrites the
platform's fragment and, if it changed, reassembles the files and sends the
private broker SIGHUP. Mosquitto then reloads them and disconnects any client
whose login is gone, so a revoked device is off the broker within about a
second. The broker's own start (``rmiot broker start``) assembles the files
from what is there. ``python -m rmiot.deploy.broker_auth`` writes them once
(for an external Mosquitto that reads the same files).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import pwd
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from rmiot import db
from rmiot.config import Config, ConfigError, load
from rmiot.db import ChangeFollower
from rmiot.deploy import broker
from rmiot.ingest.broker_login import NoBrokerLogin, password_path, read_login
from rmiot.registry.transport_credentials import (
    CHANNEL,
    LIVE_SQL,
    RESERVED_PREFIX,
    USERNAME,
    Login,
    hash_password,
)

log = logging.getLogger("rmiot.broker")

BROKER_USER = "mosquitto"  # who the broker runs as when started by root


@dataclass(frozen=True)
class AuthFiles:
    """Where the broker's login and ACL files are, for one configuration."""

    root: Path

    @classmethod
    def of(cls, cfg: Config) -> AuthFiles:
        return cls(cfg.data_dir / "broker")

    @property
    def password_file(self) -> Path:
        return self.root / "passwd"

    @property
    def acl_file(self) -> Path:
        return self.root / "acl"

    @property
    def fragments(self) -> Path:
        return self.root / "auth.d"

    @property
    def lock(self) -> Path:
        return self.root / "auth.lock"


def topic_up(root: str, device: int) -> str:
    return f"{root}/up/{device}"


def topic_down(root: str, device: int) -> str:
    return f"{root}/down/{device}"


# -- the platform's login ------------------------------------------------------

def platform_login(cfg: Config) -> tuple[str, str]:
    """(user, password) the platform logs in to the broker with. For the
    private broker the password is made on first use; for an external one
    the file must be there (``broker.platform_password_file``)."""
    try:
        return read_login(cfg)
    except NoBrokerLogin:
        if not cfg.broker.private:
            raise ConfigError(f"broker.platform_password_file: no password in "
                              f"{password_path(cfg)} for {cfg.broker.platform_user} on "
                              f"{cfg.broker.url}") from None
    _write_private(password_path(cfg), secrets.token_urlsafe(32) + "\n", for_broker=False)
    return read_login(cfg)


# -- files -------------------------------------------------------------------------

def fragment(logins: Iterable[Login], topic_root: str) -> tuple[str, str]:
    """One platform's (passwd, acl) fragment for its device logins. A login
    that could pass for the platform's own (``rmiot-...``) is left out."""
    passwd: list[str] = []
    acl: list[str] = []
    for login in logins:
        if not USERNAME.match(login.username) or login.username.startswith(RESERVED_PREFIX):
            log.warning("a device login the broker must not have is left out",
                        extra={"username": login.username, "device": login.device_id})
            continue
        passwd.append(f"{login.username}:{login.password_hash}\n")
        acl.append(f"user {login.username}\n"
                   f"topic write {topic_up(topic_root, login.device_id)}/#\n"
                   f"topic read {topic_down(topic_root, login.device_id)}/#\n\n")
    return "".join(passwd), "".join(acl)


def write_realm(cfg: Config, logins: Iterable[Login]) -> bool:
    """Write this platform's fragment (its ``mqtt.topic_root``) and, if it
    changed, assemble the broker's files; True when they changed."""
    files = AuthFiles.of(cfg)
    root = cfg.mqtt.topic_root
    passwd, acl = fragment(logins, root)
    with _locked(files):
        base = files.fragments / root
        old = [_read(base.with_suffix(".passwd")), _read(base.with_suffix(".acl"))]
        if old == [passwd, acl] and files.password_file.exists():
            return False
        _write_private(base.with_suffix(".passwd"), passwd, for_broker=False)
        _write_private(base.with_suffix(".acl"), acl, for_broker=False)
        _assemble(cfg, files)
    return True


def remove_realm(cfg: Config) -> None:
    """Drop this platform's fragment and reassemble (its devices lose the broker)."""
    files = AuthFiles.of(cfg)
    with _locked(files):
        for suffix in (".passwd", ".acl"):
            (files.fragments / cfg.mqtt.topic_root).with_suffix(suffix).unlink(missing_ok=True)
        _assemble(cfg, files)


def assemble(cfg: Config) -> AuthFiles:
    """Write the files the broker reads from the platform login and every
    fragment there is (the broker's start calls this)."""
    files = AuthFiles.of(cfg)
    with _locked(files):
        _assemble(cfg, files)
    return files


def _assemble(cfg: Config, files: AuthFiles) -> None:
    user, password = platform_login(cfg)
    passwd = [f"{user}:{hash_password(password)}\n"]
    acl = [f"user {user}\ntopic readwrite #\n\n"]
    for part in sorted(files.fragments.glob("*.passwd")):
        passwd.append(_read(part))
        acl.append(_read(part.with_suffix(".acl")))
    _write_private(files.password_file, "".join(passwd), for_broker=True)
    _write_private(files.acl_file, "".join(acl), for_broker=True)


@contextlib.contextmanager
def _locked(files: AuthFiles) -> Iterator[None]:
    files.fragments.mkdir(parents=True, exist_ok=True)
    with files.lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _write_private(path: Path, text: str, *, for_broker: bool) -> None:
    """Replace ``path`` atomically with mode 0600; owned by the broker's user
    when we are root (Mosquitto rereads its files after dropping privileges)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    if for_broker and os.geteuid() == 0:
        with contextlib.suppress(KeyError):
            who = pwd.getpwnam(BROKER_USER)
            os.chown(tmp, who.pw_uid, who.pw_gid)
    os.replace(tmp, path)


# -- following the registry -------------------------------------------------------------

class BrokerAuthSync(ChangeFollower):
    """Keeps this platform's fragment current and the private broker reloaded;
    see the module's docstring."""

    channels = (CHANNEL,)
    name = "broker auth"

    def __init__(self, cfg: Config, dsn: str) -> None:
        super().__init__(dsn)
        self.cfg = cfg
        self.writes = 0

    async def load_all(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await self._write(conn)

    async def apply(self, conn: psycopg.AsyncConnection[Any],
                    notes: list[psycopg.Notify]) -> None:
        await self._write(conn)  # every change rewrites the fragment: one query

    async def _write(self, conn: psycopg.AsyncConnection[Any]) -> None:
        cur = await conn.execute(LIVE_SQL + " ORDER BY username")
        logins = [Login(name, int(device), hashed) for name, device, hashed
                  in await cur.fetchall()]
        if await asyncio.to_thread(write_realm, self.cfg, logins):
            self.writes += 1
            if self.cfg.broker.private and broker.Broker(self.cfg).reload():
                log.info("broker logins reloaded", extra={"logins": len(logins),
                                                          "topic_root": self.cfg.mqtt.topic_root})


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m rmiot.deploy.broker_auth",
        description="Write the broker's password and ACL files from the registry once "
                    "(and reload the private broker).")
    parser.parse_args()
    cfg = load()
    with db.connect(db.app_dsn(cfg)) as conn:
        rows = conn.execute(LIVE_SQL + " ORDER BY username").fetchall()
    logins = [Login(name, int(device), hashed) for name, device, hashed in rows]
    write_realm(cfg, logins)
    files = AuthFiles.of(cfg)
    reloaded = cfg.broker.private and broker.Broker(cfg).reload()
    print(f"{len(logins)} device logins for {cfg.mqtt.topic_root}/...: {files.password_file}, "
          f"{files.acl_file}{' (broker reloaded)' if reloaded else ''}")


if __name__ == "__main__":
    main()
