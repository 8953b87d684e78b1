"""A realistic district for benchmarks and demonstrations, in a database of
its own (default ``rmiot_dataset``): ``rmiot dataset generate``.

The district: a region and a district; ``hospitals`` hospitals, each with ten
clinical departments and two buildings (zones); ``devices`` devices spread
over them by kind — bedside monitors 40 %, wearables 30 %, infusion pumps 15 %
(in the clinical departments), environment sensors 8 % and energy meters 7 %
(in the buildings); one monitor model per hospital, of two vendors. 97 % are
active, 2 % in maintenance, 1 % suspended. A quarter of the monitors are bound
to patients, registered like real ones (identities sealed; a keyring of the
dataset's own).

The data: ``days`` local days up to today's midnight, 8-field frames — vitals
every 20 minutes from monitors, every 30 from wearables, hourly from pumps,
sensors and meters (whose first field is the kWh used in the hour); the meters
also for the same days a year earlier, for year-over-year comparisons. With
the defaults: 50 hospitals, 10,000 devices, 30 days: 15.1 million frames, 121
million points. Rows are generated set-based in SQL (``generate_series``), two
days at a time, device by device so each index leaf fills in order; then the
rollups are rebuilt (``rollups.rebuild``) and the job run once.

Re-running is cheap: table ``dataset_info`` records what was built, and a
database that already holds the same dataset, under the current migrations,
is kept (``force`` rebuilds).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import functools
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import orjson
import psycopg

from rmiot import db
from rmiot.config import Config
from rmiot.deploy import cluster, migrate
from rmiot.query import calendar, rollups
from rmiot.security.patient_keys import PatientKeys, register_patient
from rmiot.security.patients import PatientIdentity, pseudonym_key
from rmiot.security.sm4 import Keyring
from rmiot.tenants import store as tenants

DEFAULT_DATABASE = "rmiot_dataset"
DEPARTMENTS = ("ICU", "Emergency", "Cardiology", "Respiratory", "Neurology", "General Surgery",
               "Orthopaedics", "Paediatrics", "Obstetrics", "Oncology")
ZONES = ("Inpatient Building", "Outpatient Building")
# kind -> (share of devices, frames a day, where, 8 value expressions). ``p`` is
# the phase of the day (0..2π), ``r()`` random() in [0, 1).
KINDS: dict[str, tuple[float, int, str, tuple[str, ...]]] = {
    "monitor": (0.40, 72, "clinical", (
        "72 + 9 * sin(p) + 10 * r() + (d.id %% 9)", "94 + 5 * r()", "14 + 6 * r()",
        "36.3 + 0.9 * r()", "112 + 12 * sin(p) + 16 * r()", "70 + 12 * r()",
        "86 + 12 * r()", "72 + 9 * sin(p) + 10 * r()")),
    "wearable": (0.30, 48, "clinical", (
        "70 + 12 * sin(p) + 14 * r()", "95 + 4 * r()", "36.0 + 1.2 * r()",
        "floor(400 * r() * (1 + sin(p)))", "r()", "20 + 80 * r()", "33 + 2 * r()",
        "30 + 40 * r()")),
    "infusion_pump": (0.15, 24, "clinical", (
        "20 + 80 * r()", "500 * r()", "150 + 200 * r()", "30 + 70 * r()",
        "floor(1.02 * r())", "1000 * r()", "4 * r()", "floor(3 * r())")),
    "sensor": (0.08, 24, "zone", (
        "22 + 2 * sin(p) + 2 * r()", "40 + 20 * r()", "450 + 500 * r()", "5 + 30 * r()",
        "100 + 300 * r()", "35 + 25 * r()", "200 + 600 * r()", "1005 + 15 * r()")),
    "meter": (0.07, 24, "zone", (
        "40 + 25 * sin(p) + 15 * r()", "40 + 25 * sin(p) + 15 * r()", "220 + 8 * r()",
        "60 + 60 * r()", "0.85 + 0.14 * r()", "49.9 + 0.2 * r()", "10 * r()",
        "80 + 40 * r()")),
}
METRIC_IDS = "{1,2,3,4,5,6,7,8}"


@dataclass(frozen=True)
class DatasetSpec:
    hospitals: int = 50
    devices: int = 10_000
    days: int = 30

    def as_json(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DatasetInfo:
    spec: DatasetSpec
    lo: dt.datetime           # the data: [lo, hi)
    hi: dt.datetime
    frames: int
    points: int
    built_at: dt.datetime
    seconds: float


class ProgressBar:
    """One line on a terminal (redrawn), a line per tenth otherwise."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()
        self._shown = -1

    def __call__(self, phase: str, done: int, total: int) -> None:
        share = done / total if total else 1.0
        tenth = int(share * 10)
        if not self.tty and tenth == self._shown and done < total:
            return
        self._shown = tenth
        filled = int(share * self.width)
        line = f"{phase:<12} [{'#' * filled}{'.' * (self.width - filled)}] {share:4.0%}"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and done >= total:
            self.stream.write("\n")
        self.stream.flush()


Progress = Callable[[str, int, int], None]


def _quiet(phase: str, done: int, total: int) -> None:
    pass


def configured(cfg: Config, database: str) -> Config:
    """``cfg`` pointing at the dataset's database, with a keyring of its own
    (patients' key files are named by patient id: another database's patients
    must not meet them)."""
    return dataclasses.replace(
        cfg, database=dataclasses.replace(cfg.database, name=database),
        security=dataclasses.replace(cfg.security,
                                     keyring_dir=str(cfg.data_dir / "dataset-keys" / database)))


def existing(cfg: Config) -> DatasetInfo | None:
    """The dataset recorded in the configured database, if one was completed
    under the migrations there are now, or under some of them: then the newer
    ones are applied, as on an upgrade. A migration changed since it was
    applied means another schema: None (it is built again)."""
    try:
        with db.connect(db.app_dsn(cfg)) as conn:
            row = conn.execute("SELECT to_regclass('dataset_info') IS NOT NULL").fetchone()
            if not row or not row[0]:
                return None
            applied = dict(conn.execute("SELECT version, checksum FROM schema_migrations")
                           .fetchall())
            got = conn.execute("SELECT spec, lo, hi, frames, points, built_at, seconds "
                               "FROM dataset_info").fetchone()
    except db.DatabaseUnreachable:
        return None
    now = {m.version: m.checksum for m in migrate.available()}
    if got is None or any(now.get(version) != checksum for version, checksum in applied.items()):
        return None
    if applied != now:
        migrate.migrate(db.admin_dsn(cfg))
    spec, *rest = got
    return DatasetInfo(DatasetSpec(**spec), *rest)


def generate(cfg: Config, spec: DatasetSpec, *, force: bool = False,
             progress: Progress = _quiet) -> DatasetInfo:
    """Build the dataset in the configured database unless it is there already."""
    found = existing(cfg)
    if found is not None and found.spec == spec and not force:
        return found
    t0 = time.perf_counter()
    _fresh_database(cfg)
    dsn, admin = db.app_dsn(cfg), db.admin_dsn(cfg)
    today = calendar.floor(dt.datetime.now(dt.UTC), calendar.DAY)
    lo, hi = today - spec.days * calendar.DAY, today
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("CREATE TABLE dataset_info (spec jsonb, lo timestamptz, hi timestamptz, "
                     "frames bigint, points bigint, built_at timestamptz, seconds float8)")
        conn.execute("GRANT SELECT ON dataset_info TO rmiot_app")
    with psycopg.connect(admin, autocommit=True) as conn:  # patients' ids need the owner
        progress("structure", 0, 1)
        _structure(conn, cfg, spec)
        progress("structure", 1, 1)
    days = [lo + i * calendar.DAY for i in range(spec.days)]
    year_ago = [calendar.add_months(day, -12) for day in days]
    tasks = [(day, kind) for day in days for kind in KINDS]
    tasks += [(day, "meter") for day in year_ago]
    asyncio.run(_telemetry(admin, lo, tasks, progress))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("ANALYZE")
    total = 2 * spec.days
    done = 0

    def rolled(n: int, _: int) -> None:
        nonlocal done
        done += 1
        progress("rollups", done, total)

    for first in (lo, year_ago[0]):
        start = calendar.local_date(first)
        asyncio.run(rollups.rebuild(dsn, start, start + dt.timedelta(days=spec.days),
                                    progress=rolled))
    asyncio.run(rollups.RollupJob(dsn).run_once())
    with psycopg.connect(admin, autocommit=True) as conn:
        # Visibility maps set, so figures come from index-only scans at once
        # (autovacuum would get there too, later).
        conn.execute("VACUUM (ANALYZE) rollup_minute, rollup_hour, rollup_day, "
                     "rollup_day_hospital, device_last_seen")
        row = conn.execute("SELECT count(*), coalesce(sum(cardinality(vals)), 0) "
                           "FROM telemetry").fetchone()
        assert row is not None
        frames, points = int(row[0]), int(row[1])
        info = DatasetInfo(spec, lo, hi, frames, points, dt.datetime.now(dt.UTC),
                           time.perf_counter() - t0)
        conn.execute("INSERT INTO dataset_info VALUES (%s, %s, %s, %s, %s, %s, %s)",
                     (orjson.dumps(spec.as_json()).decode(), lo, hi, frames, points,
                      info.built_at, info.seconds))
    return info


def _fresh_database(cfg: Config) -> None:
    """Drop and re-create the database, and forget its patients' keys."""
    shutil.rmtree(cfg.keyring_dir / "patients", ignore_errors=True)
    cluster.recreate_database(cfg)
    migrate.migrate(db.admin_dsn(cfg))


def _structure(conn: psycopg.Connection[Any], cfg: Config, spec: DatasetSpec) -> None:
    """Tenants, vendors and models, devices, patients and bindings."""
    def tenant(code: str, name: str, level: str, parent: int | None) -> int:
        return tenants.create_tenant(conn, code, name, level, parent)

    region = tenant("sz", "Shenzhen Health Commission", "region", None)
    district = tenant("sz-ft", "Futian District", "district", region)
    vendors = [_one(conn.execute("INSERT INTO vendors (code, name) VALUES (%s, %s) RETURNING id",
                                 (code, name))) for code, name in
               (("medix", "Medix Devices"), ("huakang", "Huakang Medical"))]
    models: dict[str, list[int]] = {}
    for kind in KINDS:
        names = ["A", "B"] if kind == "monitor" else ["A"]
        for i, variant in enumerate(names):
            metrics = orjson.dumps([{"id": m, "name": f"{kind}_{m}"} for m in range(1, 9)])
            models.setdefault(kind, []).append(_one(conn.execute(
                "INSERT INTO device_models (vendor_id, name, kind, metrics) "
                "VALUES (%s, %s, %s, %s) RETURNING id",
                (vendors[i], f"{kind.replace('_', ' ').title()} {variant}", kind,
                 metrics.decode()))))
    per_hospital = spec.devices // spec.hospitals
    for h in range(spec.hospitals):
        hospital = tenant(f"sz-ft-h{h:03d}", f"Hospital {h + 1}", "hospital", district)
        clinical = [tenant(f"sz-ft-h{h:03d}-d{i}", name, "department", hospital)
                    for i, name in enumerate(DEPARTMENTS)]
        zones = [tenant(f"sz-ft-h{h:03d}-z{i}", name, "department", hospital)
                 for i, name in enumerate(ZONES)]
        left = per_hospital
        for n, (kind, (share, _, where, _)) in enumerate(KINDS.items()):
            count = left if n == len(KINDS) - 1 else round(per_hospital * share)
            left -= count
            homes = clinical if where == "clinical" else zones
            model = models[kind][h % len(models[kind])]
            conn.execute(
                "INSERT INTO devices (id, tenant_id, department_id, model_id, state, serial_no) "
                "SELECT nextval('device_id_seq'), %(h)s, (%(homes)s::int[])[1 + g %% %(n)s], "
                "       %(model)s, 'active', %(code)s || '-' || g "
                "  FROM generate_series(0, %(count)s - 1) g",
                {"h": hospital, "homes": homes, "n": len(homes), "model": model,
                 "code": f"{kind[:3].upper()}-{h:03d}", "count": count})
    # 2 % in maintenance, 1 % suspended (a state change each: the lifecycle's rules hold).
    conn.execute("UPDATE devices SET state = 'maintenance' WHERE id % 50 = 7")
    conn.execute("UPDATE devices SET state = 'suspended' WHERE id % 100 = 13")
    _patients(conn, cfg, models["monitor"])


def _one(cur: psycopg.Cursor[Any]) -> int:
    row = cur.fetchone()
    assert row is not None
    return int(row[0])


def _patients(conn: psycopg.Connection[Any], cfg: Config, monitor_models: list[int]) -> None:
    """A patient bound to every fourth active monitor, registered as the
    platform registers them (a data key of their own, identity sealed)."""
    keys = PatientKeys(Keyring.load(cfg.keyring_dir))
    key = pseudonym_key(cfg.keyring_dir)
    monitors = conn.execute(
        "SELECT id, department_id FROM devices WHERE model_id = ANY (%s) AND state = 'active' "
        "AND id %% 4 = 1 ORDER BY id", (monitor_models,)).fetchall()
    patients = []
    for n, (_, home) in enumerate(monitors):
        card = f"44030419{70 + n % 30}{1 + n % 12:02d}{1 + n % 28:02d}{n % 10000:04d}"
        person = PatientIdentity(f"患者{n}", card, f"138{n:08d}")
        patients.append(register_patient(conn, keys, key, home, person, "FM"[n % 2],
                                         1940 + n % 70)[0])
    conn.execute(
        "INSERT INTO device_bindings (device_id, tenant_id, patient_id, bed, bound_at, bound_by) "
        "SELECT m.id, m.home, m.patient, 'bed-' || (m.patient %% 40 + 1), "
        "       now() - (m.patient %% 20) * interval '1 day', 'dataset' "
        "  FROM unnest(%s::bigint[], %s::int[], %s::bigint[]) AS m (id, home, patient)",
        ([m[0] for m in monitors], [m[1] for m in monitors], patients))


async def _telemetry(dsn: str, lo: dt.datetime, tasks: list[tuple[dt.datetime, str]],
                     progress: Progress, workers: int = 2) -> None:
    queue: asyncio.Queue[tuple[dt.datetime, str]] = asyncio.Queue()
    for task in tasks:
        queue.put_nowait(task)
    done = 0

    async def insert(conn: psycopg.AsyncConnection[Any], day: dt.datetime, kind: str) -> int:
        await conn.execute(_frames_sql(kind).encode(), {
            "day": day, "kind": kind, "index": (day - lo) // calendar.DAY})
        return 0

    async def worker() -> None:
        nonlocal done
        while not queue.empty():
            day, kind = queue.get_nowait()
            # One statement a task: a retry after a lost connection writes it once.
            await rollups.retrying(functools.partial(insert, day=day, kind=kind), dsn)
            done += 1
            progress("telemetry", done, len(tasks))

    await asyncio.gather(*(worker() for _ in range(workers)))


def _frames_sql(kind: str) -> str:
    """One local day of one kind's frames, device after device."""
    _, per_day, _, values = KINDS[kind]
    step = 86400 // per_day
    vals = ", ".join(v.replace("r()", "random()") for v in values)
    return f"""
INSERT INTO telemetry (ts, device_id, tenant_id, seq, kind, metrics, vals)
SELECT %(day)s + (i * {step} + d.id %% {step}) * interval '1 second', d.id, d.tenant_id,
       %(index)s * {per_day} + i + 1000000, 1, '{METRIC_IDS}',
       ARRAY[{vals}]::float8[]
  FROM (SELECT d.id, d.tenant_id FROM devices d JOIN device_models m ON m.id = d.model_id
         WHERE m.kind = %(kind)s ORDER BY d.id) d,
       LATERAL (SELECT i, i * {2 * math.pi / per_day} AS p
                  FROM generate_series(0, {per_day - 1}) i) x"""
