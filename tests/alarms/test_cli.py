"""``rmiot alarms ack|clear``: an operator's steps land in the audit chain
like the RPCs' do, refusals too."""

from __future__ import annotations

import argparse
import asyncio
import time

import psycopg
import pytest

from rmiot.config import Config
from rmiot.ingest import alarm_cli
from rmiot.registry import store
from rmiot.security.audit_verify import verify
from rmiot.tenants import store as tenants
from tests.alarms.conftest import put_rule
from tests.alarms.test_service import SPO2, raise_alarm


def run(cfg: Config, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    alarm_cli.add_parser(parser.add_subparsers())
    return alarm_cli.main(cfg, parser.parse_args(["alarms", *argv]))


def test_operator_steps_are_audited(base_cfg: Config, database: str) -> None:
    with psycopg.connect(database, autocommit=True) as conn:
        run_id = time.time_ns()
        region = tenants.create_tenant(conn, f"cli-r-{run_id}", "Region", "region")
        hospital = tenants.create_tenant(conn, f"cli-h-{run_id}", "Hospital", "hospital",
                                         region)
        device = store.register_device(conn, hospital, serial_no="cli-monitor")
    rule = asyncio.run(put_rule(database, hospital, "threshold", SPO2))
    alarm = asyncio.run(raise_alarm(database, rule, hospital, device))
    tenant = str(hospital)
    assert run(base_cfg, "ack", str(alarm), "--tenant", tenant, "--by", "operator:night",
               "--comment", "seen on the ward") == 0
    with pytest.raises(SystemExit, match="only an active alarm"):
        run(base_cfg, "ack", str(alarm), "--tenant", tenant, "--by", "operator:night")
    assert run(base_cfg, "clear", str(alarm), "--tenant", tenant, "--by", "operator:night") == 0
    with psycopg.connect(database, autocommit=True) as conn:
        audited = conn.execute(
            "SELECT actor, tenant_id, method, outcome, detail FROM audit_log "
            "WHERE object = %s AND method LIKE 'rmiot alarms %%' ORDER BY id",
            (f"alarm:{alarm}",)).fetchall()
        state = conn.execute("SELECT state, acked_by, cleared_by FROM alarms WHERE id = %s",
                             (alarm,)).fetchone()
    assert [(a, t, m, o) for a, t, m, o, _ in audited] == [
        ("operator:night", hospital, "rmiot alarms ack", "ok"),
        ("operator:night", hospital, "rmiot alarms ack", "error"),
        ("operator:night", hospital, "rmiot alarms clear", "ok")]
    assert audited[0][4] == {"comment": "seen on the ward"}
    assert "only an active alarm" in audited[1][4]["error"]
    assert state == ("cleared", "operator:night", "operator:night")
    assert verify(database).ok
