-- Rollups and retention bookkeeping for the query service (query/rollups.py,
-- query/retention.py). The Apache-2 edition of TimescaleDB has no continuous
-- aggregates, so the platform keeps its own.
--
-- Cells. Fleet-wide questions (a district, a hospital, a department, a device
-- kind or model) never need a single device, so the rollups aggregate over a
-- *cell*: the devices sharing a home (department, else hospital) and a model.
-- A district of 10,000 devices has on the order of a thousand cells, and a
-- month of a district at daily resolution is some tens of thousands of rows,
-- whatever the devices' sampling rate. Per-device questions read telemetry
-- through its (device_id, ts) index instead.
--
-- Levels. rollup_minute and rollup_hour are aggregated from telemetry,
-- rollup_day from rollup_hour (days are local days: see query/calendar.py),
-- rollup_day_hospital from rollup_day.
-- One row per (bucket, cell, metric):
--   n, total, lo, hi  count, sum, min and max of the finite values — exact, and
--                     merged exactly into coarser buckets and larger groups;
--   sketch            a mergeable histogram for percentiles: element = bin << 32
--                     | count, bins logarithmic with relative accuracy 1 %
--                     (rmiot_sketch_bin below; query/sketch.py reads them);
--   devices           how many devices of the cell reported in the bucket (the
--                     group size that de-identification compares with k).
-- rollup_minute covers the last few days only (the job deletes older rows);
-- hour and day rows follow each tenant's retention_days.rollups.
--
-- Keeping them current. A bucket is recomputed from its source — never patched
-- — whenever rows land in it, late ones included (or leave it):
--   rollup_marks   spans of newly stored rows, one row per ingest batch:
--                  (device ids, first ts, last ts) side by side. The batch
--                  writer adds it in the transaction of its COPY, so a mark
--                  commits exactly with its rows (query.rollups.mark_dirty);
--   rollup_dirty   (level, bucket, cell) to recompute; a bucket still open may
--                  wait a little (the hour level refreshes open hours every few
--                  minutes), 'since' says from when it is stale;
--   rollup_state   per-level as_of times and the job's scan position.
-- The job also finds recent rows itself (each device's rows since its last run,
-- through telemetry's one index), which covers on-time data when no writer
-- marks them; telemetry keeps its single index. ``rmiot data destroy`` marks
-- the rows it deletes the same way, so their buckets are recomputed without them.
--
-- device_last_seen: the newest ts per device, kept by the same job, so fleet
-- status reads 10,000 rows instead of probing telemetry 10,000 times.

-- Not STRICT, so that the planner inlines them into the aggregating queries.
CREATE FUNCTION rmiot_sketch_bin(v float8) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    -- ln((1 + 0.01) / (1 - 0.01)) = 0.020000666706669; 50000 keeps the bins of
    -- every positive double above 0 and every negative one below.
    SELECT CASE WHEN v IS NULL THEN NULL
                WHEN v > 0 THEN 50000 + ceil(ln(v) / 0.020000666706669)::integer
                WHEN v < 0 THEN -(50000 + ceil(ln(-v) / 0.020000666706669)::integer)
                ELSE 0 END
$$;

-- The value a bin stands for: within 1 % of every value in it (computed in log
-- space, so bins near the largest doubles do not overflow on the way).
CREATE FUNCTION rmiot_sketch_value(bin integer) RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN bin IS NULL THEN NULL WHEN bin = 0 THEN 0::float8
                ELSE sign(bin) * exp((abs(bin) - 50000) * 0.020000666706669
                                     + ln(2 / (1 + exp(0.020000666706669)))) END
$$;

CREATE TABLE rollup_minute (
    bucket       timestamptz NOT NULL,
    home_id      integer NOT NULL,   -- coalesce(devices.department_id, devices.tenant_id)
    model_id     bigint NOT NULL,    -- devices.model_id, 0 when none
    metric       integer NOT NULL,
    hospital_id  integer NOT NULL,   -- the hospital above the home (the home, when none is)
    devices      integer NOT NULL,
    n            bigint NOT NULL,
    total        float8 NOT NULL,
    lo           float8 NOT NULL,
    hi           float8 NOT NULL,
    sketch       int8[] NOT NULL,
    PRIMARY KEY (bucket, home_id, model_id, metric)  -- the job's and rebuilds' deletes
);
-- Queries read one or a few metrics over a time range, across the district
-- or in a few homes (a hospital, a department). Their figures come from the
-- first index alone (an index-only scan: the sketches, the bulk of a row,
-- are read only when percentiles are asked for); a scope's rows from the
-- second, instead of every home's.
CREATE INDEX rollup_minute_metric ON rollup_minute (metric, bucket)
    INCLUDE (home_id, model_id, hospital_id, devices, n, total, lo, hi);
CREATE INDEX rollup_minute_home ON rollup_minute (metric, home_id, bucket)
    INCLUDE (model_id, hospital_id, devices, n, total, lo, hi);

CREATE TABLE rollup_hour (LIKE rollup_minute INCLUDING ALL);
CREATE TABLE rollup_day (LIKE rollup_minute INCLUDING ALL);

-- Days per hospital and model: the day cells of a hospital merged, for the
-- district's dashboards (by hospital, kind or model, over weeks and months),
-- which then read a hospital's one row a day instead of its departments'
-- dozens. A hospital's devices are its cells' devices (a device has one
-- home), so ``devices`` adds up.
CREATE TABLE rollup_day_hospital (
    bucket       timestamptz NOT NULL,
    hospital_id  integer NOT NULL,
    model_id     bigint NOT NULL,
    metric       integer NOT NULL,
    devices      integer NOT NULL,
    n            bigint NOT NULL,
    total        float8 NOT NULL,
    lo           float8 NOT NULL,
    hi           float8 NOT NULL,
    sketch       int8[] NOT NULL,
    PRIMARY KEY (bucket, hospital_id, model_id, metric)
);
CREATE INDEX rollup_day_hospital_metric ON rollup_day_hospital (metric, bucket)
    INCLUDE (hospital_id, model_id, devices, n, total, lo, hi);
CREATE INDEX rollup_day_hospital_home ON rollup_day_hospital (metric, hospital_id, bucket)
    INCLUDE (model_id, devices, n, total, lo, hi);

CREATE TABLE rollup_marks (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_ids  bigint[] NOT NULL,
    first_ts    timestamptz[] NOT NULL,
    last_ts     timestamptz[] NOT NULL,
    marked_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (cardinality(device_ids) = cardinality(first_ts)
           AND cardinality(device_ids) = cardinality(last_ts))
);

CREATE TABLE rollup_dirty (
    level     text NOT NULL CHECK (level IN ('minute', 'hour')),  -- days follow their hours
    bucket    timestamptz NOT NULL,
    home_id   integer NOT NULL,
    model_id  bigint NOT NULL,
    since     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (level, bucket, home_id, model_id)
);

CREATE TABLE rollup_state (
    key    text PRIMARY KEY,
    value  timestamptz NOT NULL
);

CREATE TABLE device_last_seen (
    device_id  bigint PRIMARY KEY,
    last_ts    timestamptz NOT NULL
);

GRANT SELECT, INSERT, UPDATE, DELETE ON rollup_minute, rollup_hour, rollup_day,
    rollup_day_hospital, rollup_dirty, rollup_state, device_last_seen TO rmiot_app;
GRANT SELECT, INSERT, DELETE ON rollup_marks TO rmiot_app;
