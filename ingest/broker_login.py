"""The platform's own login on the MQTT broker: ``broker.platform_user`` and the
password in ``broker.platform_password_file`` (default
``<data_dir>/broker/platform.password``, mode 0600).

For the private broker ``rmiot.deploy.broker_auth`` makes the password the
first time the broker starts and puts its hash in the broker's password file;
for an external broker the operator writes the file. Ingest only reads it.
"""

from __future__ import annotations

from pathlib import Path

from rmiot.config import Config


class NoBrokerLogin(Exception):
    """The platform's broker password file is missing or empty."""


def password_path(cfg: Config) -> Path:
    if cfg.broker.platform_password_file:
        return Path(cfg.broker.platform_password_file)
    return cfg.data_dir / "broker" / "platform.password"


def read_login(cfg: Config) -> tuple[str, str]:
    """(user, password); ``NoBrokerLogin`` when there is no password yet."""
    path = password_path(cfg)
    try:
        password = path.read_text().strip()
    except FileNotFoundError:
        password = ""
    if not password:
        raise NoBrokerLogin(f"no broker password for {cfg.broker.platform_user} in {path} "
                            "(the private broker makes it when it starts)")
    return cfg.broker.platform_user, password
