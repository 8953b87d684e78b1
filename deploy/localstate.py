"""Where the private services keep their state, and which user runs them.

PostgreSQL refuses to run as root, and Mosquitto drops root on its own; when
rmiot runs as root the services run as their Debian system users (``postgres``,
``mosquitto``). Their state lives under ``<data_dir>/<name>`` — unless that
user cannot reach the checkout (a clone under ``/root``, say), in which case it
lives under ``/var/lib/rmiot/<hash of the data dir>/<name>`` and
``<data_dir>/<name>`` is a symlink to it, so every command finds it the same way.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from rmiot.config import Config


def service_user(system_user: str) -> str | None:
    """The user a service runs as: its system user under root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(system_user)
    except KeyError:
        raise RuntimeError(f"system user {system_user!r} is missing: run deploy/setup-system.sh "
                           "(make run / make test do)") from None
    return system_user


def run_as(user: str | None, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run a command as ``user`` (None: as ourselves), capturing its output."""
    if user:
        return subprocess.run(list(args), text=True, capture_output=True, check=False,
                              user=user, group=user, cwd="/")
    return subprocess.run(list(args), text=True, capture_output=True, check=False)


def state_dir(cfg: Config, name: str, user: str | None) -> Path:
    """The service's state directory, created and owned by ``user``."""
    link = cfg.data_dir / name
    if link.is_symlink() or link.is_dir():
        path = link.resolve()
    else:
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        if user is None or _reachable_by(user, cfg.data_dir):
            path = link
        else:
            digest = hashlib.sha256(str(cfg.data_dir).encode()).hexdigest()[:12]
            path = Path("/var/lib/rmiot") / digest / name
            path.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    path.mkdir(parents=True, exist_ok=True)
    chown(user, path)
    return path


def own(path: Path, user: str | None, mode: int = 0o700) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    chown(user, path)
    path.chmod(mode)
    return path


def chown(user: str | None, *paths: Path) -> None:
    """Give files to the service user (nothing to do when not root)."""
    for path in paths:
        if user:
            shutil.chown(path, user, user)


def _reachable_by(user: str, path: Path) -> bool:
    return run_as(user, ["test", "-x", str(path)]).returncode == 0


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return True
        time.sleep(0.05)
    return False
