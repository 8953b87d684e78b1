"""Bulk onboarding: devices from a CSV file (``rmiot devices import``), an
inventory out (``rmiot devices export``), and the batch behind the gRPC
``ImportDevices``.

The CSV file: UTF-8 (a spreadsheet's byte-order mark is fine), a header row,
one device a row. Columns, in any order, names as in ``registry.fields``:

    tenant, department, model, serial, udi, rfid, barcode, qr, location, gateway,
    state, auth_required, asset_class, asset_grade, purchase_date, purchase_cost,
    depreciation_method, useful_life_years, calibration_due, inspection_due

``tenant`` (hospital or department, id or code) may be left out when
``--tenant`` gives it; ``model`` is a model id or ``<vendor code>/<model
name>``; every row needs a serial number or a UDI. ``gateway`` names an
existing device (import gateways before the devices behind them). A column
``id`` (as ``export`` writes it) is ignored; any other unknown column stops the
import before it starts.

How it runs: every row is parsed and checked first — fields, then against the
database in one query per kind of reference, and for duplicates inside the
file — and then the good rows are loaded in one transaction: COPY into a
temporary staging table and one set-based INSERT of devices and their codes.
A bad row is never loaded, not even partly; good rows are loaded whatever the
bad ones. Should a concurrent registration take a code or UDI between check
and load, nothing is loaded and the import says so (run it again).

The report (``--report PATH``): CSV ``row,column,reason``, one line per
problem, ``row`` counted as a spreadsheet does (the header is row 1). On a
terminal a progress bar is drawn on stderr; otherwise a counter line at every
tenth. Exit codes: 0 every row imported, 1 some rows refused (the others are
imported) or the load failed, 2 the file cannot be used at all.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import psycopg

from rmiot import db
from rmiot.config import Config
from rmiot.registry.assets import ASSET_COLUMNS
from rmiot.registry.checks import Checked, Checker
from rmiot.registry.devices import EVERYTHING, INSERT_COLUMNS, Scope
from rmiot.registry.fields import CODE_KINDS, COLUMNS, DeviceSpec, FieldError, parse_device
from rmiot.registry.lifecycle import set_actor
from rmiot.registry.store import EXISTS, PRECONDITION, RegistryError

IGNORED_COLUMNS = ("id",)
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

_STAGING = f"""
CREATE TEMP TABLE device_import (
    id bigint, tenant_id integer, department_id integer, model_id bigint, udi text,
    serial_no text, state text, auth_required boolean, location text, gateway_id bigint,
    asset_class text, asset_grade text, purchase_date date, purchase_cost numeric,
    depreciation_method text, useful_life_years smallint, calibration_due date,
    inspection_due date, registered_by text, {", ".join(f"{k} text" for k in CODE_KINDS)}
) ON COMMIT DROP
"""
_STAGED = (*INSERT_COLUMNS, *CODE_KINDS)
_LOAD = f"""
WITH new_devices AS (
    INSERT INTO devices ({", ".join(INSERT_COLUMNS)})
    SELECT {", ".join(INSERT_COLUMNS)} FROM device_import
    RETURNING id
), new_codes AS (
    INSERT INTO device_codes (code, tenant_id, kind, device_id)
    SELECT c.code, s.tenant_id, c.kind, s.id
      FROM device_import s
     CROSS JOIN LATERAL (VALUES {", ".join(f"('{k}', s.{k})" for k in CODE_KINDS)})
           AS c (kind, code)
     WHERE c.code IS NOT NULL
    RETURNING 1
)
SELECT (SELECT count(*) FROM new_devices), (SELECT count(*) FROM new_codes)
"""


@dataclass(frozen=True)
class RowError:
    row: str           # the spreadsheet row number, or the batch position
    column: str
    reason: str


@dataclass
class ImportResult:
    imported: int = 0
    device_ids: list[int] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)

    @property
    def refused_rows(self) -> int:
        return len({e.row for e in self.errors})


class Progress:
    """A progress bar on a terminal, else a counter line at every tenth
    (``total`` 0: unknown, a count every 10,000)."""

    UNKNOWN_STEP = 10_000

    def __init__(self, label: str, total: int, stream: IO[str] | None = None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._drawn = 0.0
        self._step = 0

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.tty:
            now = time.monotonic()
            if now - self._drawn >= 0.1 or self.done >= self.total:
                self._drawn = now
                self.stream.write(f"\r{self.label} {self._bar()}{self.done:,}"
                                  + (f"/{self.total:,}" if self.total else ""))
                self.stream.flush()
            return
        step = (10 * self.done // self.total if self.total
                else self.done // self.UNKNOWN_STEP)
        if step > self._step:
            self._step = step
            print(f"{self.label}: {self.done:,}" + (f"/{self.total:,}" if self.total else ""),
                  file=self.stream, flush=True)

    def _bar(self) -> str:
        if not self.total:
            return ""
        filled = min(30, 30 * self.done // self.total)
        return f"[{'#' * filled}{'.' * (30 - filled)}] "

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class Quiet(Progress):
    def __init__(self) -> None:
        super().__init__("", 1, io.StringIO())


# -- the batch -------------------------------------------------------------------

def import_specs(conn: psycopg.Connection[Any],
                 parsed: Sequence[tuple[str, DeviceSpec, list[FieldError]]], actor: str,
                 scope: Scope = EVERYTHING, source: str = "import", noun: str = "row",
                 progress: Callable[[int], Progress] | None = None) -> ImportResult:
    """Check every device, then load the good ones at once. ``parsed``: (label,
    device, its field errors) as ``parse_device`` gives them; ``noun`` names a
    label in messages ("also given for row 7"); ``progress(n)`` makes the
    loading's progress display for n devices."""
    if scope.vendor_id is not None:
        for _, spec, errors in parsed:
            if spec.auth_required is False:
                errors.append(FieldError("auth_required",
                                         "a vendor may require HMAC, never waive it"))
    result = ImportResult()
    for label, _, errors in parsed:
        result.errors += [RowError(label, e.column, e.reason) for e in errors]
    candidates = [(label, spec) for label, spec, errors in parsed if not errors]
    checker = Checker(conn, scope.vendor_id, scope.tenant_id)
    outcomes = checker.check([s for _, s in candidates],
                             [f"{noun} {label}" for label, _ in candidates])
    good: list[Checked] = []
    for (label, _), (checked, errors) in zip(candidates, outcomes, strict=True):
        result.errors += [RowError(label, e.column, e.reason) for e in errors]
        if checked is not None:
            good.append(checked)
    if good:
        result.device_ids = load(conn, good, actor, source,
                                 progress(len(good)) if progress else Quiet())
        result.imported = len(good)
    result.errors.sort(key=lambda e: (int(e.row) if e.row.isdigit() else 0, e.row))
    return result


def load(conn: psycopg.Connection[Any], devices: Sequence[Checked], actor: str, source: str,
         progress: Progress) -> list[int]:
    """COPY checked devices into a staging table, then one INSERT of devices and
    codes; one transaction. Returns their new ids, in order."""
    try:
        with conn.transaction():
            ids = [int(r[0]) for r in conn.execute(
                "SELECT nextval('device_id_seq') FROM generate_series(1, %s)",
                (len(devices),)).fetchall()]
            set_actor(conn, actor, f"imported ({source})"[:500])
            conn.execute(_STAGING)
            with conn.cursor() as cur, cur.copy(
                    f"COPY device_import ({', '.join(_STAGED)}) FROM STDIN".encode()) as copy:
                for n, (device_id, checked) in enumerate(zip(ids, devices, strict=True), 1):
                    copy.write_row(_staged_row(device_id, checked, actor))
                    if n % 1000 == 0:
                        progress.advance(1000)
            progress.advance(len(devices) % 1000)
            conn.execute(_LOAD)
    except psycopg.errors.UniqueViolation:
        raise RegistryError("a device was registered meanwhile with one of these codes, UDIs "
                            "or serial numbers; nothing was imported: run the import again",
                            EXISTS) from None
    except psycopg.errors.CheckViolation as exc:  # the tenant's device quota (0009)
        raise RegistryError(f"nothing was imported: {exc.diag.message_primary or exc}",
                            PRECONDITION) from None
    finally:
        progress.finish()
    return ids


def _staged_row(device_id: int, checked: Checked, actor: str) -> tuple[Any, ...]:
    spec = checked.spec
    return (device_id, checked.hospital, checked.department, checked.model.id, spec.udi,
            spec.serial_no, spec.state, spec.auth_required, spec.location, spec.gateway_id,
            *(spec.asset.get(c) for c in ASSET_COLUMNS), actor,
            *(spec.codes.get(k) for k in CODE_KINDS))


# -- CSV in ------------------------------------------------------------------------

class FileError(Exception):
    """The file cannot be imported at all; the message says why."""


def read_csv(text: IO[str], default_tenant: str = "",
             progress: Progress | None = None) -> list[tuple[str, DeviceSpec, list[FieldError]]]:
    """Parse every row of a CSV file (header first); raises FileError when the
    header itself is unusable."""
    reader = csv.reader(text)
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise FileError("the file is empty (a header row is needed)") from None
    check_header(header, default_tenant)
    keep = [i for i, h in enumerate(header) if h not in IGNORED_COLUMNS]
    parsed = []
    for n, values in enumerate(reader, start=2):
        if progress:
            progress.advance()
        if not any(v.strip() for v in values):
            continue  # a blank line
        label = str(n)
        if len(values) > len(header):
            parsed.append((label, DeviceSpec(), [FieldError(
                "", f"{len(values)} values for {len(header)} columns")]))
            continue
        row = {header[i]: values[i] if i < len(values) else "" for i in keep}
        spec, errors = parse_device(row, default_tenant)
        parsed.append((label, spec, errors))
    if progress:
        progress.finish()
    return parsed


def check_header(header: Sequence[str], default_tenant: str) -> None:
    unknown = [h for h in header if h not in COLUMNS and h not in IGNORED_COLUMNS]
    if unknown:
        raise FileError(f"unknown column(s): {', '.join(unknown)}; the columns are "
                        f"{', '.join(COLUMNS)}")
    if len(set(header)) != len(header):
        raise FileError("a column is named twice")
    if "model" not in header:
        raise FileError("the file needs a model column")
    if "serial" not in header and "udi" not in header:
        raise FileError("the file needs a serial or a udi column")
    if "tenant" not in header and not default_tenant:
        raise FileError("the file has no tenant column: give --tenant")


def write_report(path: Path, errors: Iterable[RowError]) -> None:
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(("row", "column", "reason"))
        writer.writerows((e.row, e.column, e.reason) for e in errors)


# -- CSV out -----------------------------------------------------------------------

def export_csv(conn: psycopg.Connection[Any], out: IO[str], tenant: int | None = None) -> int:
    """Write the devices (under ``tenant``, or all) as CSV in the import's
    columns, with ``id`` first; returns how many."""
    codes = ", ".join(f"max(c.code) FILTER (WHERE c.kind = '{k}') AS {k}" for k in CODE_KINDS)
    assets = ", ".join(f"d.{c}" for c in ASSET_COLUMNS)
    where = ("WHERE coalesce(d.department_id, d.tenant_id) IN (SELECT id FROM tenants "
             f"WHERE path @> ARRAY[{int(tenant)}])" if tenant is not None else "")
    query = f"""
        SELECT d.id, t.code AS tenant, dep.code AS department,
               CASE WHEN m.id IS NULL THEN NULL ELSE v.code || '/' || m.name END AS model,
               d.serial_no AS serial, d.udi, {", ".join(f"k.{k}" for k in CODE_KINDS)},
               d.location, d.gateway_id AS gateway, d.state, d.auth_required, {assets}
          FROM devices d
          JOIN tenants t ON t.id = d.tenant_id
          LEFT JOIN tenants dep ON dep.id = d.department_id
          LEFT JOIN device_models m ON m.id = d.model_id
          LEFT JOIN vendors v ON v.id = m.vendor_id
          LEFT JOIN LATERAL (SELECT {codes} FROM device_codes c WHERE c.device_id = d.id) k
                 ON true
          {where}
         ORDER BY d.id"""
    with conn.cursor() as cur:
        with cur.copy(f"COPY ({query}) TO STDOUT WITH (FORMAT csv, HEADER true)".encode()
                      ) as copy:
            for chunk in copy:
                out.write(bytes(chunk).decode())
        return max(cur.rowcount, 0)


# -- rmiot devices ---------------------------------------------------------------------

def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``devices`` to rmiot's sub-parsers (``parser.add_subparsers(...)``)."""
    text = "the device registry: bulk import from CSV, export"
    parser: argparse.ArgumentParser = subparsers.add_parser("devices", help=text,
                                                            description=text)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    imp = actions.add_parser(
        "import", help="register the devices of a CSV file (its columns: "
                       "python -m pydoc rmiot.registry.importer)")
    imp.add_argument("file", type=Path, help="CSV file with a header row ('-': stdin)")
    imp.add_argument("--report", type=Path, metavar="PATH",
                     help="write every refused row as CSV row,column,reason")
    imp.add_argument("--tenant", metavar="ID",
                     help="the tenant (id or code) of rows without one")
    exp = actions.add_parser("export", help="write the devices as CSV in the import's columns")
    exp.add_argument("--tenant", type=int, metavar="ID", help="only under this tenant")
    exp.add_argument("--output", type=Path, metavar="PATH", help="file (default: stdout)")
    return parser


def main(cfg: Config, args: argparse.Namespace) -> int:
    """Run ``rmiot devices <action>``; returns the exit code."""
    with db.connect(db.app_dsn(cfg), autocommit=True) as conn:
        if args.action == "export":
            if args.output:
                with args.output.open("w", newline="", encoding="utf-8") as out:
                    count = export_csv(conn, out, args.tenant)
                print(f"exported {count} devices to {args.output}", file=sys.stderr)
            else:
                export_csv(conn, sys.stdout, args.tenant)
            return EXIT_OK
        return _import(conn, args)


def _import(conn: psycopg.Connection[Any], args: argparse.Namespace) -> int:
    source = str(args.file)
    try:
        text = (io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", newline="")
                if source == "-" else args.file.open(encoding="utf-8-sig", newline=""))
    except OSError as exc:
        print(f"rmiot: cannot read {source}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    with text:
        try:
            total = _count_lines(args.file) if source != "-" else 0
            parsed = read_csv(text, args.tenant or "", Progress("checking", total))
        except (FileError, UnicodeDecodeError, csv.Error) as exc:
            print(f"rmiot: {source}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    started = time.monotonic()
    try:
        result = import_specs(conn, parsed, "operator:" + _operator(), EVERYTHING,
                              source=source, progress=lambda n: Progress("loading", n))
    except RegistryError as exc:
        print(f"rmiot: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.report:
        write_report(args.report, result.errors)
    seconds = time.monotonic() - started
    print(f"imported {result.imported} devices in {seconds:.1f} s; "
          f"{result.refused_rows} rows refused"
          + (f" (see {args.report})" if args.report and result.errors else ""),
          file=sys.stderr)
    if result.errors and not args.report:
        for e in result.errors[:20]:
            print(f"row {e.row}: {e.column}: {e.reason}", file=sys.stderr)
        if len(result.errors) > 20:
            print(f"... {len(result.errors) - 20} more: use --report PATH", file=sys.stderr)
    return EXIT_FAILED if result.errors else EXIT_OK


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return max(sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b"")) - 1,
                   1)


def _operator() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def parse_rows(rows: Iterable[Mapping[str, str]], default_tenant: str = ""
               ) -> Iterator[tuple[str, DeviceSpec, list[FieldError]]]:
    """Devices from column dicts (the gRPC batch), labelled by position from 1."""
    for n, row in enumerate(rows, start=1):
        spec, errors = parse_device(row, default_tenant)
        yield str(n), spec, errors
