"""The platform's operations jobs: monthly reports written once a month has
ended (opened and read back, not only found), idempotent; and compliance
reminders and escalations raised, escalated and cleared as alarms, with
their notifications queued in the outbox."""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import subprocess
import sys
from pathlib import Path

from rmiot.compliance_alarms import ComplianceAlarms
from rmiot.config import Config
from rmiot.ops_reports import MonthlyReports, previous_month
from rmiot.registry import compliance, ledger
from rmiot.registry.devices import Scope
from tests.ops.conftest import District, PageText, write_frames


def _read_html(path: Path) -> PageText:
    page = PageText()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _sections(path: Path) -> dict[str, list[list[str]]]:
    """The CSV's sections: title -> rows (header first)."""
    out: dict[str, list[list[str]]] = {}
    current: list[list[str]] = []
    for row in csv.reader(io.StringIO(path.read_text(encoding="utf-8"))):
        if row and row[0].startswith("# ") and len(row) == 1:
            current = out.setdefault(row[0][2:], [])
        elif row:
            current.append(row)
    return out


async def test_monthly_reports_are_written_once_after_the_month_ends(
        district: District, tmp_path: Path) -> None:
    d = district
    now = dt.datetime.now(dt.UTC)
    month = now.strftime("%Y-%m")
    next_month = (now.date().replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    meter = d.device(d.meter_model, d.building_a, d.hospital_a)
    write_frames(d.dsn, meter, d.building_a, [(now - dt.timedelta(minutes=30), [(201, 100.0)]),
                                              (now - dt.timedelta(minutes=1), [(201, 142.5)])])
    d.device(d.ventilator_model, d.icu_a, d.hospital_a,
             calibration_due=now.date() - dt.timedelta(days=3))
    job = MonthlyReports(d.dsn, tmp_path, today=lambda: next_month, scope=d.region)

    written = await job.run_once()

    folder = tmp_path / month
    expected = {f"ops-{kind}-{t}-{month}.{ext}" for kind, t in (
        ("hospital", d.hospital_a), ("hospital", d.hospital_b), ("regional", d.region))
        for ext in ("csv", "html", "pdf")}
    assert {p.name for p in written} == expected == {p.name for p in folder.iterdir()}
    hospital = _read_html(folder / f"ops-hospital-{d.hospital_a}-{month}.html")
    assert f"Hospital A: operations report {month}" in hospital.text
    assert "svg" in hospital.tags and "Building A1" in hospital.text
    sections = _sections(folder / f"ops-hospital-{d.hospital_a}-{month}.csv")
    energy = sections["Energy by zone"]
    assert energy[0][:2] == ["zone", "used (kWh)"] and energy[1][:2] == ["Building A1", "42.5"]
    assert any(r[0] == "ICU A" and r[2] == "1" for r in sections[next(
        s for s in sections if s.startswith("Calibration"))][1:])  # one overdue in ICU A
    regional = _read_html(folder / f"ops-regional-{d.region}-{month}.html")
    assert "(regional, de-identified)" in " ".join(regional.text)
    assert "ICU A" not in regional.text and "Building A1" not in regional.text
    assert "Hospital A" in regional.text
    pdf = (folder / f"ops-regional-{d.region}-{month}.pdf").read_bytes()
    assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF")

    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert await job.run_once() == []  # written already: not rewritten
    (folder / f"ops-hospital-{d.hospital_b}-{month}.html").unlink()
    again = await job.run_once()  # a report missing a file is written again, alone
    assert sorted(p.name for p in again) == sorted(
        f"ops-hospital-{d.hospital_b}-{month}.{ext}" for ext in ("csv", "html", "pdf"))
    assert all(p.stat().st_mtime_ns == before[p.name] for p in folder.iterdir()
               if str(d.hospital_b) not in p.name)
    # A month that ended before these tenants existed has nothing to report.
    early = MonthlyReports(d.dsn, tmp_path, today=lambda: now.date().replace(day=1),
                           scope=d.region, pdf=False)
    assert await early.run_once() == []
    assert previous_month(dt.date(2026, 1, 1)) == "2025-12"


async def test_compliance_reminders_and_escalations_become_alarms(district: District) -> None:
    d = district
    today = dt.datetime.now(dt.UTC).date()
    late = d.device(d.ventilator_model, d.icu_a, d.hospital_a,
                    calibration_due=today - dt.timedelta(days=10))
    soon = d.device(d.pump_model, d.icu_a, d.hospital_a,
                    inspection_due=today + dt.timedelta(days=5))
    later = d.device(d.pump_model, d.icu_b, d.hospital_b,
                     calibration_due=today + dt.timedelta(days=200))
    with d.conn() as conn:
        conn.execute("INSERT INTO alarm_channels (tenant_id, kind, target, created_by) "
                     "VALUES (%s, 'mqtt', %s, 'test')", (d.hospital_a, f"{d.tag}/alarms"))
        compliance.run(conn, today, d.region)
    job = ComplianceAlarms(d.dsn, scope=d.region)

    first = await job.run()
    assert (first.raised, first.escalated, first.cleared) == (2, 0, 0)
    assert (await job.run()).raised == 0  # reconciled: nothing more to do
    with d.conn() as conn:
        rows = conn.execute(
            "SELECT device_id, rule_code, severity, state, escalation_step, tenant_id, message "
            "FROM alarms WHERE device_id = ANY (%s)", ([late, soon, later],)).fetchall()
        alarms = {r[0]: r[1:] for r in rows}
        assert set(alarms) == {late, soon}
        assert alarms[late][:5] == ("compliance.calibration", "major", "active", 2, d.icu_a)
        assert "overdue 10 days" in alarms[late][5]
        assert alarms[soon][:4] == ("compliance.inspection", "warning", "active", 0)
        rules = conn.execute("SELECT DISTINCT r.kind, r.enabled, r.tenant_id FROM alarm_rules r "
                             "JOIN alarms a ON a.rule_id = r.id WHERE a.device_id = ANY (%s)",
                             ([late, soon],)).fetchall()
        assert rules == [("compliance", True, d.hospital_a)]  # never evaluated on telemetry
        queued = conn.execute(
            "SELECT count(*) FROM alarm_deliveries q JOIN alarm_events e ON e.id = q.event_id "
            "JOIN alarms a ON a.id = e.alarm_id WHERE a.device_id = ANY (%s)",
            ([late, soon],)).fetchone()
        assert queued == (2,)  # the hospital's channel gets both raises

        compliance.run(conn, today + dt.timedelta(days=25), d.region)
    step = await job.run(dt.datetime.now(dt.UTC) + dt.timedelta(days=25))
    assert (step.raised, step.escalated) == (0, 2)
    with d.conn() as conn:
        got = dict(conn.execute("SELECT device_id, severity FROM alarms WHERE device_id = "
                                "ANY (%s)", ([late, soon],)).fetchall())
        assert got == {late: "critical", soon: "major"}  # 35 days late: level 3; 20: level 2
        detail = conn.execute(
            "SELECT e.detail FROM alarm_events e JOIN alarms a ON a.id = e.alarm_id "
            "WHERE a.device_id = %s AND e.kind = 'escalated'", (late,)).fetchone()
        assert detail is not None and detail[0]["step"] == 3
        assert detail[0]["notify"] == f"role:hospital_admin@{d.hospital_a}"

        ledger.record(conn, Scope(d.hospital_a), late, "calibration", dt.datetime.now(dt.UTC),
                      "engineer", next_due=today + dt.timedelta(days=365))
    done = await job.run()
    assert (done.raised, done.escalated, done.cleared) == (0, 0, 1)
    with d.conn() as conn:
        states = dict(conn.execute("SELECT device_id, state FROM alarms WHERE device_id = "
                                   "ANY (%s)", ([late, soon],)).fetchall())
        assert states == {late: "cleared", soon: "active"}


def test_rmiot_ops_report_writes_csv_html_and_pdf(district: District, base_cfg: Config,
                                                  tmp_path: Path) -> None:
    env = {**os.environ, "RMIOT_DATABASE_NAME": base_cfg.database.name}
    district.device(district.ventilator_model, district.icu_b, district.hospital_b)
    month = dt.datetime.now(dt.UTC).strftime("%Y-%m")
    done = subprocess.run([sys.executable, "-m", "rmiot.cli", "ops", "report",
                           str(district.region), "--month", month, "--regional", "--pdf",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr
    stem = tmp_path / f"ops-regional-{district.region}-{month}"
    assert done.stdout.split() == [f"{stem}.{ext}" for ext in ("csv", "html", "pdf")]
    assert "Hospital B" in _read_html(stem.with_suffix(".html")).text
    assert stem.with_suffix(".pdf").read_bytes().startswith(b"%PDF-")
