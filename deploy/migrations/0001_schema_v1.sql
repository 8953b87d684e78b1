-- Schema v1: the tenant tree, device models and devices, device keys,
-- telemetry, and the audit chain. Later issues extend these tables with
-- migrations of their own (0002_..., 0003_...); a migration never changes
-- once applied (the runner checks its checksum).

CREATE EXTENSION IF NOT EXISTS timescaledb;

-- The application connects as an unprivileged role (created by `rmiot db init`
-- on the private cluster; on an external server, by its administrator). It
-- gets data rights only; the audit log is append-only for it.
DO $$
BEGIN
  IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'rmiot_app') THEN
    CREATE ROLE rmiot_app LOGIN;
  END IF;
END
$$;

-- Tenant tree: region > district > hospital > department (wards and campuses
-- are departments under a department or hospital). Ids are positive int32 so
-- they fit the frame's uint32 tenant field and the telemetry column.
CREATE TABLE tenants (
    id          integer PRIMARY KEY CHECK (id > 0),
    parent_id   integer REFERENCES tenants (id),
    level       text NOT NULL CHECK (level IN ('region', 'district', 'hospital', 'department')),
    code        text NOT NULL UNIQUE,
    name        text NOT NULL,
    path        integer[] NOT NULL,          -- ids from the root down to this node
    enabled     boolean NOT NULL DEFAULT true,
    settings    jsonb NOT NULL DEFAULT '{}', -- quotas, retention, windows, auth policy
    created_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((level = 'region') = (parent_id IS NULL))
);
CREATE INDEX tenants_path_gin ON tenants USING gin (path);
CREATE SEQUENCE tenant_id_seq AS integer START 1000;

CREATE TABLE vendors (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    code        text NOT NULL UNIQUE,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE device_models (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    vendor_id   bigint NOT NULL REFERENCES vendors (id),
    name        text NOT NULL,
    kind        text NOT NULL,               -- monitor, wearable, infusion_pump, rfid_tag, meter...
    metrics     jsonb NOT NULL DEFAULT '[]', -- [{"id", "name", "unit", "min", "max"}]
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (vendor_id, name)
);

-- Device ids are assigned by the registry in 1 .. 2^63-1.
CREATE SEQUENCE device_id_seq AS bigint START 1 MINVALUE 1;
CREATE TABLE devices (
    id            bigint PRIMARY KEY CHECK (id > 0),
    tenant_id     integer NOT NULL REFERENCES tenants (id),
    model_id      bigint REFERENCES device_models (id),
    udi           text,
    serial_no     text,
    state         text NOT NULL DEFAULT 'registered',
    auth_required boolean,                   -- NULL: the tenant's policy decides
    attrs         jsonb NOT NULL DEFAULT '{}',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devices_tenant ON devices (tenant_id);
CREATE UNIQUE INDEX devices_tenant_udi ON devices (tenant_id, udi) WHERE udi IS NOT NULL;

-- Per-device HMAC keys, versioned for rotation with an overlap window.
-- key_enc holds the key encrypted under the platform's key-encryption key.
CREATE TABLE device_keys (
    device_id   bigint NOT NULL REFERENCES devices (id),
    version     integer NOT NULL,
    alg         smallint NOT NULL CHECK (alg IN (1, 2)),  -- 1 HMAC-SHA256, 2 HMAC-SM3
    key_enc     bytea NOT NULL,
    not_before  timestamptz NOT NULL DEFAULT now(),
    not_after   timestamptz,
    revoked_at  timestamptz,
    PRIMARY KEY (device_id, version)
);

-- Telemetry: one row per accepted frame, not one per point. A monitor's frame
-- of 8 vitals is one row with metrics[] and vals[] side by side, so a write of
-- N points costs N/8 index entries and one tuple header instead of N: the
-- narrow (ts, device, metric, value) layout most platforms use spends most of
-- its ingest time there. Numeric values (float, int, bool) are float8 in vals;
-- string and bytes fields go to attrs (NULL when absent).
--
-- Chunks: 1 day. A district at ~1 frame/10 s from 10,000 devices writes ~86 M
-- rows a day; a day's chunk with its one index stays within a quarter of RAM,
-- and dashboards' "today"/"last hour" queries touch one or two chunks.
-- Retention drops whole chunks (drop_chunks), per tenant class by the platform.
--
-- One index, unique on (device_id, ts DESC, seq): it is the dedup guarantee
-- (a retransmission never stores twice, across restarts too) and it serves
-- every per-device query (latest values, raw window). Tenant- and fleet-wide
-- queries read the platform's rollups, not this table.
CREATE TABLE telemetry (
    ts          timestamptz NOT NULL,
    device_id   bigint NOT NULL,
    tenant_id   integer NOT NULL,
    seq         bigint NOT NULL,
    kind        smallint NOT NULL,
    metrics     integer[] NOT NULL,
    vals        float8[] NOT NULL,
    attrs       jsonb
);
SELECT create_hypertable('telemetry', by_range('ts', INTERVAL '1 day'),
                         create_default_indexes => false);
CREATE UNIQUE INDEX telemetry_device_ts_seq ON telemetry (device_id, ts DESC, seq);

-- Audit chain: every RPC and login. hash = SM3(prev_hash || canonical record);
-- `rmiot audit verify` recomputes it. The application may only append.
CREATE TABLE audit_log (
    ts          timestamptz NOT NULL,
    id          bigint NOT NULL,
    actor       text NOT NULL,
    role        text,
    tenant_id   integer,
    method      text NOT NULL,
    object      text,
    outcome     text NOT NULL,
    source      text,
    request_id  text,
    detail      jsonb,
    prev_hash   bytea NOT NULL,
    hash        bytea NOT NULL
);
SELECT create_hypertable('audit_log', by_range('ts', INTERVAL '7 days'),
                         create_default_indexes => false);
CREATE UNIQUE INDEX audit_log_id ON audit_log (id, ts);
CREATE INDEX audit_log_actor_ts ON audit_log (actor, ts DESC);

GRANT USAGE ON SCHEMA public TO rmiot_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON tenants, vendors, device_models, devices, device_keys
    TO rmiot_app;
GRANT SELECT, INSERT ON telemetry TO rmiot_app;
GRANT SELECT, INSERT ON audit_log TO rmiot_app;
GRANT USAGE, SELECT ON SEQUENCE tenant_id_seq, device_id_seq TO rmiot_app;
