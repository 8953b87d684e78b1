"""Monthly operations reports as files: every hospital's report and each
region's de-identified one (``registry.ops_report``), written by the platform
once a month has ended, and by ``rmiot ops report`` on demand.

Layout under ``ops.reports_dir`` (default ``data_dir/reports``)::

    <YYYY-MM>/ops-hospital-<tenant>-<YYYY-MM>.csv  .html  .pdf
    <YYYY-MM>/ops-regional-<tenant>-<YYYY-MM>.csv  .html  .pdf

The PDF is the same HTML (inline SVG charts included) laid out by WeasyPrint
when ``ops.report_pdf`` is on; without Pango on the host it is left out and
said once in the log.

``MonthlyReports.run_once`` writes, for the month before ``today`` (UTC), the
reports of the enabled hospitals and regions that existed in that month and
are not all there yet: a month
already written is not rewritten, and each file is written under a temporary
name and renamed, so a crash leaves nothing that counts as written. Only the
month just ended is written; older months are ``rmiot ops report``'s.

Reports join the registry's figures and the query package's energy, and
neither package may import the other: hence this root module.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rmiot import db
from rmiot.config import Config
from rmiot.periodic import PeriodicJob
from rmiot.query.ops_energy import OpsEnergy
from rmiot.registry import ops_report

log = logging.getLogger("rmiot.ops_reports")
ENERGY_METRIC = 201  # energy_total (kWh): the report's energy section


def reports_dir(cfg: Config) -> Path:
    return Path(cfg.ops.reports_dir) if cfg.ops.reports_dir else cfg.data_dir / "reports"


def previous_month(today: dt.date) -> str:
    return (today.replace(day=1) - dt.timedelta(days=1)).strftime("%Y-%m")


def stem(directory: Path, tenant: int, month: str, regional: bool) -> Path:
    """The report's path without suffix."""
    return directory / f"ops-{'regional' if regional else 'hospital'}-{tenant}-{month}"


async def build(dsn: str, tenant: int, month: str, regional: bool) -> ops_report.Report:
    """A month's report of ``tenant`` (its energy included)."""
    first, end = ops_report.month_bounds(month)
    energy = await OpsEnergy(dsn).energy(tenant, first, end, ENERGY_METRIC)

    def figures() -> ops_report.Report:
        with db.connect(dsn) as conn:
            return ops_report.build(conn, tenant, month, regional, energy)
    return await asyncio.to_thread(figures)


@functools.cache
def _weasyprint() -> Any:
    try:
        import weasyprint  # loads Pango: a library of the host
    except (ImportError, OSError) as exc:
        log.warning("PDF reports left out: %s", exc)
        return None
    return weasyprint


def pdf_available() -> bool:
    return _weasyprint() is not None


def to_pdf(html: str) -> bytes | None:
    """The HTML page as PDF, or None when WeasyPrint cannot run here."""
    weasyprint = _weasyprint()
    return None if weasyprint is None else bytes(weasyprint.HTML(string=html).write_pdf())


def save(report: ops_report.Report, path: Path, pdf: bool) -> list[Path]:
    """Write the report as ``path``.csv, .html (and .pdf); returns the files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    html = ops_report.to_html(report)
    contents: dict[str, bytes | None] = {".csv": ops_report.to_csv(report).encode(),
                                         ".html": html.encode()}
    if pdf:
        contents[".pdf"] = to_pdf(html)
    written = []
    for suffix, data in contents.items():
        if data is None:
            continue
        target = path.with_suffix(suffix)
        partial = target.with_name(f".{target.name}.partial")
        partial.write_bytes(data)
        os.replace(partial, target)
        written.append(target)
    return written


class MonthlyReports(PeriodicJob):
    """Writes the reports of the month just ended (see the module docstring),
    checking every ``period_s``; ``today`` is the clock (tests set it), and
    ``scope`` limits it to one subtree of the tenant tree (None: all)."""

    name = "monthly-reports"

    def __init__(self, dsn: str, directory: Path, *, pdf: bool = True, period_s: float = 60.0,
                 today: Callable[[], dt.date] = lambda: dt.datetime.now(dt.UTC).date(),
                 scope: int | None = None) -> None:
        super().__init__(period_s)
        self.dsn = dsn
        self.directory = directory
        self.pdf = pdf
        self.today = today
        self.scope = scope

    @classmethod
    def of(cls, cfg: Config) -> MonthlyReports:
        return cls(db.app_dsn(cfg), reports_dir(cfg), pdf=cfg.ops.report_pdf,
                   period_s=cfg.ops.job_period_s)

    def _tenants(self, month: str) -> list[tuple[int, bool]]:
        """(tenant, regional) of the hospitals and regions that existed in ``month``."""
        end = dt.datetime.combine(ops_report.month_bounds(month)[1], dt.time(), dt.UTC)
        with db.connect(self.dsn) as conn:
            rows = conn.execute(
                "SELECT id, level = 'region' FROM tenants WHERE enabled AND created_at < %(end)s "
                "AND level IN ('hospital', 'region') AND (%(scope)s::int IS NULL "
                "OR path @> ARRAY[%(scope)s::int]) ORDER BY id",
                {"scope": self.scope, "end": end}).fetchall()
        return [(int(r[0]), bool(r[1])) for r in rows]

    async def run_once(self) -> list[Path]:
        """Write what is missing of the month just ended; returns the files written."""
        month = previous_month(self.today())
        pdf = self.pdf and await asyncio.to_thread(pdf_available)
        suffixes = (".csv", ".html", ".pdf") if pdf else (".csv", ".html")
        written: list[Path] = []
        for tenant, regional in await asyncio.to_thread(self._tenants, month):
            path = stem(self.directory / month, tenant, month, regional)
            if all(path.with_suffix(s).exists() for s in suffixes):
                continue
            report = await build(self.dsn, tenant, month, regional)
            written += await asyncio.to_thread(save, report, path, pdf)
        if written:
            log.info("monthly reports written", extra={"month": month, "files": len(written)})
        return written

    async def tick(self) -> None:
        await self.run_once()
