"""``rmiot query``: the operator's commands answer from the database like the
service does (one JSON object a line)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt

import orjson
import pytest

from rmiot.config import Config
from rmiot.query import calendar, cli
from tests.query.conftest import District


def run(cfg: Config, capsys: pytest.CaptureFixture[str], *argv: str) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    assert cli.main(cfg, parser.parse_args(["query", *argv])) == 0
    return [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_operators_query_the_same_figures(district: District,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    d = district
    cfg = dataclasses.replace(d.cfg, database=dataclasses.replace(
        d.cfg.database, name=d.cfg.database.name))
    lo = d.base + dt.timedelta(hours=1)
    rows = run(cfg, capsys, "aggregate", "--tenant", str(d.hospital_b), "--metric", "1",
               "--from", lo.isoformat(), "--to", (lo + calendar.HOUR).isoformat(),
               "--kind", "monitor", "--group-by", "department")
    with d.conn() as conn:
        want = conn.execute(
            "SELECT count(*), max(vals[1]) FROM telemetry WHERE device_id = ANY (%s) "
            "AND ts >= %s AND ts < %s", (d.monitors[d.b1], lo, lo + calendar.HOUR)).fetchone()
    assert [(r["group_id"], r["count"], r["hi"], r["resolution"]) for r in rows] == [
        (d.b1, want[0], want[1], "hour")] if want else False
    latest = run(cfg, capsys, "latest", str(d.monitors[d.b1][0]), "--metric", "2")
    assert [v["metric"] for v in latest] == [2]
    status = run(cfg, capsys, "status")[0]
    assert "hour.as_of" in status["state"]  # type: ignore[operator]
    report = run(cfg, capsys, "rollup")[0]
    assert report["ran"] in (True, False)
    fleet = run(cfg, capsys, "fleet", "--tenant", str(d.hospital_a))
    assert {r["group_id"] for r in fleet} == {d.a1, d.a2}
