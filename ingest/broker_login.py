"""The platform's own login on the MQTT broker: ``broker.platform_user`` and the
password in ``broker.platform_password_file`` (default
``<data_dir>/broker/platform.password``, mode 0600).

For the private broker ``rmiot.deploy.broker_auth`` makes the password the
first time the broker starts and puts its hash in the broker's password file;
for an external broker the operator writes the file. Ingest only reads it.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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


def client_options(cfg: Config) -> dict[str, Any]:
    """``aiomqtt.Client`` keyword arguments that reach the platform's broker
    (``broker.url``, else ``broker.host``/``port``; TLS for ``mqtts://``
    with the platform's CA) as the platform's login. ``NoBrokerLogin`` when
    there is no password yet."""
    url = urlsplit(cfg.broker.url) if cfg.broker.url else None
    host = (url.hostname if url else None) or cfg.broker.host
    port = (url.port if url else None) or (8883 if url and url.scheme == "mqtts" else
                                             1883 if url else cfg.broker.port)
    tls = None
    if url is not None and url.scheme == "mqtts":
        ca = cfg.tls_path("ca_file")
        tls = ssl.create_default_context(cafile=str(ca) if ca.exists() else None)
    user, password = read_login(cfg)
    return {"hostname": host, "port": port, "username": user, "password": password,
            "tls_context": tls}
