"""The monthly operations report of a hospital, or of the region: equipment
KPIs, compliance, energy and alarms for one calendar month, as CSV and as a
readable HTML page with bar charts (inline SVG, no scripts, no external
files — it opens anywhere and prints).

A hospital's report goes down to device classes and departments. The
regional one is de-identified: per hospital only, no device, no person (no
owners, assignees or reporters), and alarm counts under ``SMALL_GROUP``
shown as ``<5`` (alarms may describe patients).

``build`` gathers the figures (energy rows come from the caller: the query
package reads them); ``to_csv`` and ``to_html`` render the same sections.
"""

from __future__ import annotations

import csv
import datetime as dt
import html
import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import psycopg

from rmiot.registry import compliance, kpis
from rmiot.registry.store import RegistryError

SMALL_GROUP = 5
SEVERITIES = ("critical", "major", "minor", "warning", "info")


class EnergyLine(Protocol):
    @property
    def zone_id(self) -> int: ...
    @property
    def zone(self) -> str: ...
    @property
    def energy(self) -> float: ...
    @property
    def previous_month(self) -> float | None: ...
    @property
    def last_year(self) -> float | None: ...


@dataclass
class Section:
    title: str
    columns: list[str]
    rows: list[list[Any]]
    chart: str = ""            # the column drawn as bars ('' none)
    note: str = ""


@dataclass
class Report:
    title: str
    tenant_id: int
    month: str
    regional: bool
    generated_at: dt.datetime
    sections: list[Section] = field(default_factory=list)


def month_bounds(month: str) -> tuple[dt.date, dt.date]:
    try:
        first = dt.datetime.strptime(month, "%Y-%m").date()
    except ValueError:
        raise RegistryError("month: YYYY-MM") from None
    end = (first.replace(day=28) + dt.timedelta(days=4)).replace(day=1)
    return first, end


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _change(now: float, before: float | None) -> str:
    return "" if not before else f"{(now - before) / before * 100:+.1f}"


def build(conn: psycopg.Connection[Any], tenant_id: int, month: str, regional: bool,
          energy: Sequence[EnergyLine] = (), energy_unit: str = "kWh") -> Report:
    first, end = month_bounds(month)
    lo = dt.datetime.combine(first, dt.time(), dt.UTC)
    hi = dt.datetime.combine(end, dt.time(), dt.UTC)
    row = conn.execute("SELECT name FROM tenants WHERE id = %s", (tenant_id,)).fetchone()
    if row is None:
        raise RegistryError(f"tenant {tenant_id} does not exist", "not_found")
    name = row[0]
    report = Report(f"{name}: operations report {month}" + (" (regional, de-identified)"
                                                             if regional else ""),
                    tenant_id, month, regional, dt.datetime.now(dt.UTC))
    devices = kpis.devices_in(conn, tenant_id)
    per_device = kpis.device_kpis(conn, devices, lo, hi)
    names = kpis.tenant_names(conn, {d.home_id for d in devices} | {d.hospital_id
                                                                     for d in devices})
    kpi_cols = ["group", "devices", "uptime %", "utilisation %", "uses", "MTBF h", "MTTR h",
                "maintenance cost", "depreciation", "cost per use"]

    def kpi_rows(group: str) -> list[list[Any]]:
        return [[k.name, k.devices, _pct(k.uptime), _pct(k.utilisation), k.uses,
                 _num(k.mtbf_h), _num(k.mttr_h), f"{k.maintenance_cost:.2f}",
                 f"{k.depreciation:.2f}", "" if k.cost_per_use is None else f"{k.cost_per_use}"]
                for k in kpis.grouped(devices, per_device, group, names)]

    if regional:
        report.sections.append(Section("Equipment KPIs by hospital", kpi_cols,
                                       kpi_rows("hospital"), chart="uptime %"))
    else:
        report.sections.append(Section("Equipment KPIs by device class", kpi_cols,
                                       kpi_rows("kind"), chart="utilisation %"))
        report.sections.append(Section("Equipment KPIs by department", kpi_cols,
                                       kpi_rows("department"), chart="uptime %"))
    report.sections.append(_compliance(conn, tenant_id, end - dt.timedelta(days=1), regional))
    report.sections.append(_energy(conn, energy, regional, energy_unit))
    report.sections.append(_alarms(conn, tenant_id, lo, hi, regional))
    return report


def _hospital_of(conn: psycopg.Connection[Any], ids: Sequence[int]) -> dict[int, tuple[int, str]]:
    rows = conn.execute(
        "SELECT z.id, h.id, h.name FROM tenants z JOIN tenants h ON h.id = ANY (z.path) "
        "AND h.level = 'hospital' WHERE z.id = ANY (%s)", (list(ids),)).fetchall()
    return {int(r[0]): (int(r[1]), r[2]) for r in rows}


def _compliance(conn: psycopg.Connection[Any], tenant_id: int, day: dt.date,
                regional: bool) -> Section:
    view = compliance.by_department(conn, tenant_id, day)
    cols = ["group", "due dates tracked", "overdue", "due soon", "open tasks", "escalated",
            "compliant %"]
    if regional:
        sums: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0] * 5)
        where = _hospital_of(conn, [v.home_id for v in view])
        for v in view:
            total = sums[where.get(v.home_id, (v.home_id, v.name))]
            for i, n in enumerate((v.tracked, v.overdue, v.due_soon, v.open_tasks, v.escalated)):
                total[i] += n
        rows = [[h[1], *n, _num(100 * (n[0] - n[1]) / n[0] if n[0] else None)]
                for h, n in sorted(sums.items())]
    else:
        rows = [[v.name, v.tracked, v.overdue, v.due_soon, v.open_tasks, v.escalated,
                 _num(v.compliant_pct)] for v in view]
    return Section(f"Calibration, metrology and inspection on {day.isoformat()}", cols, rows,
                   chart="compliant %")


def _energy(conn: psycopg.Connection[Any], energy: Sequence[EnergyLine], regional: bool,
            unit: str) -> Section:
    cols = ["zone", f"used ({unit})", "previous month", "MoM %", "last year", "YoY %"]
    lines: list[tuple[str, float, float | None, float | None]] = [
        (e.zone, e.energy, e.previous_month, e.last_year) for e in energy]
    if regional:
        where = _hospital_of(conn, [e.zone_id for e in energy])
        sums: dict[tuple[int, str], list[float | None]] = {}
        for e in energy:
            key = where.get(e.zone_id, (e.zone_id, e.zone))
            acc = sums.setdefault(key, [0.0, None, None])
            acc[0] = (acc[0] or 0.0) + e.energy
            for i, v in ((1, e.previous_month), (2, e.last_year)):
                if v is not None:
                    acc[i] = (acc[i] or 0.0) + v
        lines = [(h[1], a[0] or 0.0, a[1], a[2]) for h, a in sorted(sums.items())]
    rows = [[z, _num(used), _num(prev), _change(used, prev), _num(year), _change(used, year)]
            for z, used, prev, year in lines]
    return Section("Energy by zone" if not regional else "Energy by hospital", cols, rows,
                   chart=f"used ({unit})",
                   note="" if rows else "no sub-metered readings in this month")


def _alarms(conn: psycopg.Connection[Any], tenant_id: int, lo: dt.datetime, hi: dt.datetime,
            regional: bool) -> Section:
    rows = conn.execute(
        "SELECT a.tenant_id, a.severity, count(*) FROM alarms a WHERE a.raised_at >= %s "
        "AND a.raised_at < %s AND a.tenant_id IN (SELECT id FROM tenants WHERE path @> "
        "ARRAY[%s]::integer[]) GROUP BY 1, 2", (lo, hi, tenant_id)).fetchall()
    if regional:
        where = _hospital_of(conn, [int(r[0]) for r in rows])
        groups = {int(r[0]): where.get(int(r[0]), (int(r[0]), str(r[0])))[1] for r in rows}
    else:
        names = kpis.tenant_names(conn, [int(r[0]) for r in rows])
        groups = {int(r[0]): names.get(int(r[0]), str(r[0])) for r in rows}
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for home, severity, n in rows:
        counts[groups[int(home)]][severity] += int(n)

    def shown(n: int) -> Any:
        return f"<{SMALL_GROUP}" if regional and 0 < n < SMALL_GROUP else n

    out = [[g, *(shown(c.get(s, 0)) for s in SEVERITIES), shown(sum(c.values()))]
           for g, c in sorted(counts.items())]
    return Section("Alarms raised", ["group", *SEVERITIES, "total"], out, chart="total",
                   note="" if out else "no alarms raised in this month")


def to_csv(report: Report) -> str:
    """Every section: a ``# title`` line, the header, the rows; a blank line between."""
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow([f"# {report.title}"])
    out.writerow([f"# generated {report.generated_at.isoformat(timespec='seconds')}"])
    for s in report.sections:
        out.writerow([])
        out.writerow([f"# {s.title}"])
        out.writerow(s.columns)
        out.writerows(s.rows)
    return buf.getvalue()


def _bars(section: Section) -> str:
    """A horizontal bar chart of the section's chart column, as inline SVG."""
    if not section.chart or section.chart not in section.columns or not section.rows:
        return ""
    col = section.columns.index(section.chart)
    points = []
    for r in section.rows:
        try:
            points.append((str(r[0]), float(str(r[col]).lstrip("<"))))
        except ValueError:
            continue
    if not points:
        return ""
    top = max(v for _, v in points) or 1.0
    bar_h, label_w, width = 18, 200, 360
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" '
             f'aria-label="{html.escape(section.chart)}" width="{label_w + width + 80}" '
             f'height="{bar_h * len(points) + 10}">']
    for i, (label, value) in enumerate(points):
        y = 5 + i * bar_h
        w = max(0.0, value / top * width)
        parts.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end" '
                     f'font-size="12">{html.escape(label[:32])}</text>'
                     f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{bar_h - 5}" '
                     f'fill="#3a7ca5"><title>{html.escape(label)}: {value:g}</title></rect>'
                     f'<text x="{label_w + w + 4:.1f}" y="{y + 13}" font-size="12">'
                     f'{value:g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def to_html(report: Report) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{e(report.title)}</title>",
           "<style>body{font-family:sans-serif;margin:2em;max-width:70em}"
           "table{border-collapse:collapse;margin:.5em 0 1em}"
           "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}"
           "td:first-child,th:first-child{text-align:left}th{background:#eef}</style>",
           "</head><body>", f"<h1>{e(report.title)}</h1>",
           f"<p>Generated {e(report.generated_at.isoformat(timespec='seconds'))}.</p>"]
    for s in report.sections:
        out.append(f"<h2>{e(s.title)}</h2>")
        if s.note:
            out.append(f"<p>{e(s.note)}</p>")
        if s.rows:
            out.append(_bars(s))
            out.append("<table><thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in s.columns)
                       + "</tr></thead><tbody>")
            out.extend("<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in r) + "</tr>"
                       for r in s.rows)
            out.append("</tbody></table>")
    out.append("</body></html>")
    return "\n".join(out)
