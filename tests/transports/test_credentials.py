"""Transport credentials: Mosquitto's hash format both ways, issue / verify /
revoke against the real database, and the broker files generated from them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from rmiot.config import Config
from rmiot.deploy import broker_auth
from rmiot.registry import transport_credentials as creds
from rmiot.registry.store import RegistryError
from tests.conftest import eventually
from tests.ingest.conftest import Hospital
from tests.transports.conftest import Logins

MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")


@pytest.mark.skipif(MOSQUITTO_PASSWD is None, reason="mosquitto_passwd is not installed")
def test_hashes_are_mosquittos_own(tmp_path: Path) -> None:
    """A hash mosquitto_passwd wrote checks here; ours has its exact shape."""
    assert MOSQUITTO_PASSWD is not None
    passwd = tmp_path / "passwd"
    subprocess.run([MOSQUITTO_PASSWD, "-b", "-c", str(passwd), "dev", "s3cret"], check=True)
    theirs = passwd.read_text().strip().split(":", 1)[1]
    assert creds.check_password("s3cret", theirs)
    assert not creds.check_password("s3cret!", theirs)
    ours = creds.hash_password("s3cret", salt=b"\x00" * 12)
    assert ours.startswith("$7$101$AAAAAAAAAAAAAAAA$") and len(ours.split("$")[4]) == 88
    assert theirs.split("$")[:2] == ours.split("$")[:2] == ["", "7"]
    assert creds.check_password("s3cret", ours)
    for broken in ("", "$6$x$y", "$7$101$!!$??", ours[:-4]):
        assert not creds.check_password("s3cret", broken)


def test_issue_verify_revoke(hospital: Hospital) -> None:
    with hospital.conn() as conn:
        user, password = creds.issue(conn, hospital.plain)
        other, other_password = creds.issue(conn, hospital.plain, username="bedside-7")
        assert user.startswith(f"d{hospital.plain}-") and len(password) >= 43
        assert creds.verify(conn, user, password) == hospital.plain
        assert creds.verify(conn, other, other_password) == hospital.plain
        assert creds.verify(conn, user, other_password) is None
        assert creds.verify(conn, "nobody", password) is None
        stored = conn.execute("SELECT password_hash FROM transport_credentials "
                              "WHERE username = %s", (user,)).fetchone()
        assert stored is not None and password not in stored[0]  # only the hash is kept
        assert creds.revoke(conn, username=user) == 1
        assert creds.verify(conn, user, password) is None
        assert creds.verify(conn, other, other_password) == hospital.plain
        assert creds.revoke(conn, device_id=hospital.plain) == 1
        assert creds.revoke(conn, device_id=hospital.plain) == 0
        with pytest.raises(RegistryError) as taken:
            creds.issue(conn, hospital.keyed, username="bedside-7")
        assert taken.value.code == "exists"
        with pytest.raises(RegistryError) as missing:
            creds.issue(conn, 987654321)
        assert missing.value.code == "not_found"
        for bad in ("has:colon", "rmiot-platform", "x" * 65, ""):
            with pytest.raises(RegistryError):
                creds.issue(conn, hospital.plain, username=bad)


def test_acl_fragment_keeps_each_device_to_its_topics() -> None:
    login = creds.Login("d5-ab", 5, creds.hash_password("x"))
    posing = creds.Login("rmiot-platform", 6, creds.hash_password("y"))  # not via issue()
    passwd, acl = broker_auth.fragment([login, posing], "rmiot")
    assert passwd == f"d5-ab:{login.password_hash}\n"
    assert acl == ("user d5-ab\ntopic write rmiot/up/5/#\ntopic read rmiot/down/5/#\n\n")


async def test_broker_files_follow_the_registry(transports_cfg: Config, hospital: Hospital,
                                                logins: Logins,
                                                broker_logins: broker_auth.BrokerAuthSync
                                                ) -> None:
    files = broker_auth.AuthFiles.of(transports_cfg)
    root = transports_cfg.mqtt.topic_root
    assert f"topic write {root}/up/{hospital.plain}/#" in files.acl_file.read_text()
    assert f"\n{logins.plain.username}:$7$" in "\n" + files.password_file.read_text()
    assert files.acl_file.read_text().startswith(
        f"user {transports_cfg.broker.platform_user}\ntopic readwrite #\n")
    with hospital.conn() as conn:
        creds.revoke(conn, device_id=hospital.plain)
    await eventually(lambda: logins.plain.username not in files.password_file.read_text()
                     and f"{root}/up/{hospital.plain}/#" not in files.acl_file.read_text(), 2)
    assert logins.keyed.username in files.password_file.read_text()
