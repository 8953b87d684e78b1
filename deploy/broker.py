"""The private Mosquitto broker: ``rmiot broker start|stop|status``.

State under ``<data_dir>/broker``: ``mosquitto.conf`` (rewritten from
deploy/mosquitto.conf at every start), ``mosquitto.pid`` and ``mosquitto.log``,
and the login and ACL files of ``rmiot.deploy.broker_auth`` (assembled at every
start; ``reload`` makes a running broker read them again). No anonymous
clients: the platform logs in as ``broker.platform_user``
(``broker_auth.platform_login``), devices with their transport credentials.
The broker runs detached from the command that starts it, so ``rmiot run`` and
the test fixtures can share it; under root it drops to the ``mosquitto`` user.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from rmiot.config import Config
from rmiot.deploy import localstate

log = logging.getLogger("rmiot.broker")

MOSQUITTO = Path("/usr/sbin/mosquitto")
TEMPLATE = Path(__file__).with_name("mosquitto.conf")


class BrokerError(Exception):
    pass


def endpoint(cfg: Config) -> tuple[str, int]:
    """host, port of the broker the platform uses (private or ``broker.url``)."""
    if cfg.broker.url:
        parts = urlsplit(cfg.broker.url)
        default = 8883 if parts.scheme == "mqtts" else 1883
        return parts.hostname or "localhost", parts.port or default
    return cfg.broker.host, cfg.broker.port


def _reaped(pid: int) -> bool:
    """True once the process is gone (reaping it if it was our child)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return True
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@dataclass
class Broker:
    cfg: Config

    @property
    def root(self) -> Path:
        return self.cfg.data_dir / "broker"

    @property
    def pidfile(self) -> Path:
        return self.root / "mosquitto.pid"

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.exists() and b"mosquitto" not in cmdline.read_bytes():
            return None
        return pid

    def running(self) -> bool:
        return self.pid() is not None

    def start(self) -> bool:
        """Start the private broker; True when started now, False if already running."""
        if self.cfg.broker.url:
            raise BrokerError("broker.url is set: the platform uses that broker")
        if self.running():
            return False
        if not MOSQUITTO.exists():
            raise BrokerError("mosquitto is not installed: run deploy/setup-system.sh "
                              "(make run / make test do)")
        host, port = self.cfg.broker.host, self.cfg.broker.port
        if localstate.port_open(host, port):
            raise BrokerError(f"cannot start the broker: {host}:{port} is already in use "
                              "(set broker.port or RMIOT_BROKER_PORT)")
        self.root.mkdir(parents=True, exist_ok=True)
        from rmiot.deploy import broker_auth  # it imports this module

        files = broker_auth.assemble(self.cfg)
        conf = self.root / "mosquitto.conf"
        conf.write_text(TEMPLATE.read_text().format(
            host=host, port=port, password_file=files.password_file, acl_file=files.acl_file))
        # Spawned detached (own session, no Popen object): it outlives this command.
        with (self.root / "mosquitto.log").open("ab") as logfh:
            actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                       (os.POSIX_SPAWN_DUP2, logfh.fileno(), 1),
                       (os.POSIX_SPAWN_DUP2, logfh.fileno(), 2)]
            pid = os.posix_spawn(str(MOSQUITTO), [str(MOSQUITTO), "-c", str(conf)], os.environ,
                                 file_actions=actions, setsid=True)
        self.pidfile.write_text(f"{pid}\n")
        if not localstate.wait_port(host, port, 10.0):
            os.kill(pid, signal.SIGKILL)
            tail = (self.root / "mosquitto.log").read_text(errors="replace").splitlines()[-5:]
            raise BrokerError("the broker did not start:\n  " + "\n  ".join(tail))
        log.info("broker started", extra={"port": port})
        return True

    def reload(self) -> bool:
        """SIGHUP: the running broker rereads its login and ACL files (and drops
        clients whose login is gone). False when it is not running."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGHUP)
        return True

    def stop(self) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _reaped(pid):
            time.sleep(0.05)
        if not _reaped(pid):
            os.kill(pid, signal.SIGKILL)
        self.pidfile.unlink(missing_ok=True)
        log.info("broker stopped")
        return True
