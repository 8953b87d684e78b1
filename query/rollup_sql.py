"""The SQL that computes rollup rows (migration 0010 describes the tables).

Two shapes, each used by the job (dirty buckets of some cells) and by a
rebuild (every cell over a range of days):

- ``insert_from_telemetry``: minute and hour rows from telemetry. One pass
  over the rows: unnest ``metrics``/``vals`` in the select list (the fastest
  way PostgreSQL has to take arrays apart), group by (bucket, cell, metric,
  sketch bin) — count, sum, min and max per bin — then by (bucket, cell,
  metric), where the per-bin counts become the sketch. Non-finite values
  (NaN, ±Infinity) are left out of every aggregate.
- ``insert_day_from_hours``: day rows merged from hour rows (and
  ``insert_hospital_days``: a hospital's day rows merged from its cells'): sums of counts
  and totals, min of mins, max of maxes, and the sketches' counts summed per
  bin. A day's ``devices`` cannot be summed from its hours (the same device
  reports in many), so it is counted with one index probe per device of the
  cell: "has this device a row in that day?".

A *source* is a SELECT yielding ``b`` (the target bucket), ``home_id``,
``model_id``, ``device_id``, ``metrics`` and ``vals``; a *cell filter* picks the
hour rows to merge. Bucket widths and the origin are bound parameters
(``%(width)s``, ``%(origin)s``).
"""

from __future__ import annotations

# Where a device belongs: its department, else its owning tenant; its model, 0 if none.
HOME = "coalesce(d.department_id, d.tenant_id)"
MODEL = "coalesce(d.model_id, 0)"
COLUMNS = "bucket, home_id, model_id, metric, hospital_id, devices, n, total, lo, hi, sketch"

# The hospital above each tenant (the tenant itself when none is above it):
# the key for grouping and filtering by hospital.
HOSPITAL_OF = """
hospital_of AS (
    SELECT t.id, coalesce((SELECT h.id FROM tenants h
                            WHERE h.id = ANY (t.path) AND h.level = 'hospital'), t.id) AS hospital
      FROM tenants t)"""


def telemetry_in_range() -> str:
    """Every device's rows in [%(lo)s, %(hi)s) (a rebuild)."""
    return f"""
    SELECT time_bucket(%(width)s::interval, t.ts, %(origin)s::timestamptz) AS b,
           {HOME} AS home_id, {MODEL} AS model_id, t.device_id, t.metrics, t.vals
      FROM telemetry t JOIN devices d ON d.id = t.device_id
     WHERE t.ts >= %(lo)s AND t.ts < %(hi)s"""


def telemetry_of_runs(runs: str) -> str:
    """The rows of each cell's devices inside that cell's runs of dirty buckets
    (table ``runs``: home_id, model_id, lo, hi): one index range scan per
    device and run."""
    return f"""
    SELECT time_bucket(%(width)s::interval, t.ts, %(origin)s::timestamptz) AS b,
           r.home_id, r.model_id, t.device_id, t.metrics, t.vals
      FROM {runs} r
      JOIN devices d ON {HOME} = r.home_id AND {MODEL} = r.model_id
      JOIN LATERAL (SELECT t.ts, t.device_id, t.metrics, t.vals FROM telemetry t
                     WHERE t.device_id = d.id AND t.ts >= r.lo AND t.ts < r.hi) t ON true"""


def insert_from_telemetry(table: str, source: str) -> str:
    return f"""
WITH src AS MATERIALIZED ({source}),
{HOSPITAL_OF.strip()},
stats AS (
    SELECT b, home_id, model_id, m AS metric, sum(c)::int8 AS n, sum(s) AS total,
           min(lo) AS lo, max(hi) AS hi, array_agg((bin::int8 << 32) | c) AS sketch
      FROM (SELECT b, home_id, model_id, m, rmiot_sketch_bin(v) AS bin, count(*)::int AS c,
                   sum(v) AS s, min(v) AS lo, max(v) AS hi
              FROM (SELECT b, home_id, model_id, unnest(metrics) AS m, unnest(vals) AS v
                      FROM src) u
             WHERE abs(v) < 'Infinity'::float8
             GROUP BY 1, 2, 3, 4, 5) per_bin
     GROUP BY 1, 2, 3, 4),
reporting AS (
    SELECT b, home_id, model_id, count(DISTINCT device_id)::int AS devices
      FROM src GROUP BY 1, 2, 3)
INSERT INTO {table} ({COLUMNS})
SELECT s.b, s.home_id, s.model_id, s.metric, coalesce(h.hospital, s.home_id), r.devices,
       s.n, s.total, s.lo, s.hi, s.sketch
  FROM stats s JOIN reporting r USING (b, home_id, model_id)
  LEFT JOIN hospital_of h ON h.id = s.home_id"""


def insert_day_from_hours(hour_rows: str) -> str:
    """``hour_rows``: a FROM item over rollup_hour aliased ``h`` with its
    filter (the cells and days to merge)."""
    return f"""
WITH src AS MATERIALIZED (
    SELECT time_bucket('1 day'::interval, h.bucket, %(origin)s::timestamptz) AS b,
           h.home_id, h.model_id, h.metric, h.hospital_id, h.n, h.total, h.lo, h.hi, h.sketch
      FROM {hour_rows}),
stats AS (
    SELECT b, home_id, model_id, metric, max(hospital_id) AS hospital_id, sum(n)::int8 AS n,
           sum(total) AS total, min(lo) AS lo, max(hi) AS hi
      FROM src GROUP BY 1, 2, 3, 4),
bins AS (
    SELECT b, home_id, model_id, metric, array_agg((bin << 32) | c) AS sketch
      FROM (SELECT b, home_id, model_id, metric, e >> 32 AS bin,
                   sum((e & 4294967295)::int) AS c
              FROM (SELECT b, home_id, model_id, metric, unnest(sketch) AS e FROM src) x
             GROUP BY 1, 2, 3, 4, 5) per_bin
     GROUP BY 1, 2, 3, 4),
reporting AS (
    SELECT b, home_id, model_id, (count(*) FILTER (WHERE seen))::int AS devices
      FROM (SELECT c.b, c.home_id, c.model_id,
                   EXISTS (SELECT FROM telemetry t
                            WHERE t.device_id = d.id AND t.ts >= c.b
                              AND t.ts < c.b + '1 day'::interval) AS seen
              FROM (SELECT DISTINCT b, home_id, model_id FROM src) c
              JOIN devices d ON {HOME} = c.home_id AND {MODEL} = c.model_id) probed
     GROUP BY 1, 2, 3)
INSERT INTO rollup_day ({COLUMNS})
SELECT s.b, s.home_id, s.model_id, s.metric, s.hospital_id, coalesce(r.devices, 0), s.n,
       s.total, s.lo, s.hi, k.sketch
  FROM stats s JOIN bins k USING (b, home_id, model_id, metric)
  LEFT JOIN reporting r USING (b, home_id, model_id)"""


def insert_hospital_days(day_rows: str) -> str:
    """``day_rows``: a FROM item over rollup_day aliased ``r`` with its filter
    (the hospitals, models and days to merge)."""
    return f"""
WITH src AS MATERIALIZED (
    SELECT r.bucket, r.hospital_id, r.model_id, r.metric, r.devices, r.n, r.total, r.lo,
           r.hi, r.sketch
      FROM {day_rows}),
stats AS (
    SELECT bucket, hospital_id, model_id, metric, sum(devices)::int AS devices,
           sum(n)::int8 AS n, sum(total) AS total, min(lo) AS lo, max(hi) AS hi
      FROM src GROUP BY 1, 2, 3, 4),
bins AS (
    SELECT bucket, hospital_id, model_id, metric, array_agg((bin << 32) | c) AS sketch
      FROM (SELECT bucket, hospital_id, model_id, metric, e >> 32 AS bin,
                   sum((e & 4294967295)::int) AS c
              FROM (SELECT bucket, hospital_id, model_id, metric, unnest(sketch) AS e
                      FROM src) x
             GROUP BY 1, 2, 3, 4, 5) per_bin
     GROUP BY 1, 2, 3, 4)
INSERT INTO rollup_day_hospital (bucket, hospital_id, model_id, metric, devices, n, total, lo,
                                 hi, sketch)
SELECT s.bucket, s.hospital_id, s.model_id, s.metric, s.devices, s.n, s.total, s.lo, s.hi,
       k.sketch
  FROM stats s JOIN bins k USING (bucket, hospital_id, model_id, metric)"""


def runs_of(work: str, width: str) -> str:
    """Runs of consecutive buckets per cell in table ``work`` (home_id,
    model_id, bucket): (home_id, model_id, lo, hi), so a cell dirty over many
    buckets is read with one range scan per device, not one per bucket."""
    return f"""
    SELECT home_id, model_id, min(bucket) AS lo, max(bucket) + {width} AS hi
      FROM (SELECT home_id, model_id, bucket,
                   bucket - row_number() OVER (PARTITION BY home_id, model_id
                                               ORDER BY bucket) * {width} AS island
              FROM {work}) w
     GROUP BY home_id, model_id, island"""
