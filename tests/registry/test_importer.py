"""Bulk onboarding from CSV: bad rows reported (row, column, reason), good rows
all loaded, nothing half-created; the command line; export."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
from pathlib import Path

import pytest

from rmiot.config import Config
from rmiot.registry import importer
from rmiot.registry.checks import Checker
from rmiot.registry.devices import EVERYTHING
from rmiot.registry.fields import COLUMNS, parse_device
from rmiot.registry.importer import Progress, RowError
from rmiot.registry.store import EXISTS, RegistryError
from rmiot.registry.view import DeviceView
from rmiot.security.sm4 import Keyring
from tests.conftest import eventually
from tests.registry.conftest import World


def write(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\ufeff" + "\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def cli(cfg: Config, *argv: str) -> int:
    parser = argparse.ArgumentParser()
    importer.add_parser(parser.add_subparsers(dest="command"))
    return importer.main(cfg, parser.parse_args(["devices", *argv]))


@pytest.fixture
def cfg(base_cfg: Config, database: str) -> Config:
    return dataclasses.replace(base_cfg)


def test_good_rows_load_and_bad_rows_are_reported(world: World, cfg: Config,
                                                  tmp_path: Path) -> None:
    h, m = world.hospital, f"{world.vendor}/M1"
    with world.conn() as conn:
        world.device(conn, "EXIST-1")
    source = write(tmp_path / "devices.csv",
                   "tenant,department,model,serial,udi,rfid,barcode,asset_class,"
                   "purchase_date,purchase_cost,depreciation_method,useful_life_years,id", [
                       f"{h},,{m},IMP-1,UDI-IMP-1,RF-IMP-1,,II,2024-01-01,1000,straight_line,5,",
                       f"rh-{world.stamp},rd-{world.stamp},{world.monitor},IMP-2,,RF-IMP-2,"
                       "BC-IMP-2,,,,,,77",
                       f"{h},,{m},IMP-3,,RF-IMP-1,,,,,,,",
                       f"{h},,{m},IMP-4,,RF-IMP-4,,IV,,,,,",
                       f"{h},,{world.other_vendor}/P1,IMP-5,,,,,,,,,",
                       f"{h},,{m},EXIST-1,,,,,,,,,",
                       ",,,,,,,,,,,,",
                       f"no-such-tenant,,{m},IMP-7,,,,,,,,,",
                       f"{h},,{m},IMP-8,,RF-IMP-8,,,2024-02-30,-5,,,",
                       f"{h},,{m},IMP-9,,,,,,,declining_balance,,",
                   ])
    report = tmp_path / "report.csv"
    assert cli(cfg, "import", str(source), "--report", str(report)) == 1
    with report.open(newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["row"], r["column"]) for r in rows}
    assert got == {("4", "rfid"), ("5", "asset_class"), ("6", "model"), ("7", "serial"),
                   ("9", "tenant"), ("10", "purchase_date"), ("10", "purchase_cost"),
                   ("11", "useful_life_years")}
    reasons = {(r["row"], r["column"]): r["reason"] for r in rows}
    assert reasons[("4", "rfid")] == "rfid code RF-IMP-1 is also given for row 2"
    assert "has not approved vendor" in reasons[("6", "model")]
    assert "already registered" in reasons[("7", "serial")]
    with world.conn() as conn:
        loaded = conn.execute(
            "SELECT serial_no, department_id, asset_class, registered_by FROM devices "
            "WHERE tenant_id = %s AND serial_no LIKE 'IMP-%%' ORDER BY serial_no",
            (h,)).fetchall()
        codes = conn.execute("SELECT code FROM device_codes WHERE tenant_id = %s AND code "
                             "LIKE '%%IMP%%' ORDER BY code", (h,)).fetchall()
        history = conn.execute(
            "SELECT count(*) FROM device_state_history s JOIN devices d ON d.id = s.device_id "
            "WHERE d.serial_no LIKE 'IMP-%%' AND s.reason LIKE 'imported%%'").fetchone()
    assert [r[:3] for r in loaded] == [("IMP-1", None, "II"), ("IMP-2", world.department, None)]
    assert loaded[0][3].startswith("operator:")
    # No trace of the refused rows: their codes were never stored either.
    assert codes == [("BC-IMP-2",), ("RF-IMP-1",), ("RF-IMP-2",)]
    assert history == (2,)


def test_default_tenant_and_unusable_files(world: World, cfg: Config, tmp_path: Path) -> None:
    source = write(tmp_path / "a.csv", "model,serial", [f"{world.monitor},T-1"])
    assert cli(cfg, "import", str(source), "--tenant", f"rh-{world.stamp}") == 0
    assert cli(cfg, "import", str(source)) == 2  # no tenant anywhere
    bad = write(tmp_path / "b.csv", "model,seriel", [f"{world.monitor},T-2"])
    assert cli(cfg, "import", str(bad), "--tenant", str(world.hospital)) == 2
    assert cli(cfg, "import", str(tmp_path / "missing.csv")) == 2
    with world.conn() as conn:
        assert conn.execute("SELECT count(*) FROM devices WHERE serial_no LIKE 'T-%%' "
                            "AND tenant_id = %s", (world.hospital,)).fetchone() == (1,)


def test_a_conflict_at_load_time_loads_nothing(world: World) -> None:
    """Checked rows whose code is taken meanwhile: the whole load rolls back."""
    with world.conn() as conn:
        specs = [parse_device({"tenant": str(world.hospital), "model": str(world.monitor),
                               "serial": f"RACE-{i}", "rfid": f"RACE-TAG-{i}"})[0]
                 for i in range(3)]
        checked = [c for c, _ in Checker(conn).check(specs)]
        world.device(conn, "RACE-X", rfid="RACE-TAG-2")  # the concurrent registration
        with pytest.raises(RegistryError, match="nothing was imported") as info:
            importer.load(conn, [c for c in checked if c], "user:test", "test",
                          importer.Quiet())
        assert info.value.code == EXISTS
        assert conn.execute("SELECT count(*) FROM devices WHERE serial_no LIKE 'RACE-%%' "
                            "AND tenant_id = %s", (world.hospital,)).fetchone() == (1,)


def test_export_writes_the_import_columns(world: World, cfg: Config, tmp_path: Path) -> None:
    with world.conn() as conn:
        device = world.device(conn, "EXP-1", rfid="EXP-TAG", location="Ward 1, bed 2",
                              purchase_cost="12.50")
    out = tmp_path / "out.csv"
    assert cli(cfg, "export", "--tenant", str(world.hospital), "--output", str(out)) == 0
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(rows[0]) == {"id", *COLUMNS}
    [row] = [r for r in rows if r["serial"] == "EXP-1"]
    assert (row["id"], row["tenant"], row["model"], row["rfid"], row["location"],
            row["purchase_cost"]) == (str(device.id), f"rh-{world.stamp}",
                                      f"{world.vendor}/M1", "EXP-TAG", "Ward 1, bed 2",
                                      "12.50")
    with world.conn() as conn:
        assert importer.export_csv(conn, io.StringIO(), world.other_hospital) == 0


def test_progress_is_a_counter_off_a_terminal() -> None:
    stream = io.StringIO()
    progress = Progress("loading", 100, stream)
    for _ in range(100):
        progress.advance()
    progress.finish()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "loading: 10/100" and lines[-1] == "loading: 100/100"
    assert len(lines) == 10
    stream = io.StringIO()
    unknown = Progress("checking", 0, stream)  # from stdin: the total is not known
    unknown.advance(25_000)
    unknown.advance(1)
    assert stream.getvalue().splitlines() == ["checking: 25,000"]


def test_the_report_is_csv(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    importer.write_report(path, [RowError("2", "udi", "a, b"), RowError("10", "", "x")])
    assert path.read_text().splitlines() == ["row,column,reason", '2,udi,"a, b"', "10,,x"]


async def test_a_bulk_import_reaches_the_ingest_view_at_once(world: World,
                                                             keyring: Keyring) -> None:
    """More than 64 devices in one statement are announced per tenant, not per
    device; the view loads them in one query either way."""
    view = DeviceView(world.dsn, keyring)
    await view.start()
    try:
        with world.conn() as conn:
            parsed = list(importer.parse_rows(
                ({"model": str(world.monitor), "serial": f"BULK-{i}", "state": "active"}
                 for i in range(200)), default_tenant=str(world.hospital)))
            conn.execute("LISTEN rmiot_registry")
            result = importer.import_specs(conn, parsed, "user:test", EVERYTHING)
            payloads = {n.payload for n in conn.notifies(timeout=0.5)}
        assert result.imported == 200
        assert payloads == {f"tenant:{world.hospital}"}
        await eventually(lambda: all(view.get(d) is not None for d in result.device_ids), 1.0)
        assert all(view.get(d).may_send for d in result.device_ids)  # type: ignore[union-attr]
    finally:
        await view.stop()
