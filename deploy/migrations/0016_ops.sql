-- Hospital operations (issue 9; the standard's 6.2 a/b, seed 003 themes 1 and 4):
--
--   asset_events        the asset ledger: one line per step of a device's life
--                       (procurement .. scrapping) with cost and document reference
--   work_orders (+ _events)  repair work orders: reported by a device's code,
--                       assigned, updated, closed; linked to the device and its alarms
--   device_status       where each tagged device is and what it is doing (zone,
--                       floor, x/y, battery, device_state), kept from telemetry
--   device_reservations a device lent for an emergency request, until released
--   device_movements    every move of a device between zones (who, why)
--   compliance_policies lead times and escalation steps, per tenant (inherited)
--   compliance_tasks (+ _events)  calibration / metrology / inspection tasks
--                       with owners, reminders and escalations
--
-- Asset data the registry already holds (purchase, depreciation, calibration
-- and inspection due dates, 0007) stays on devices; metrology joins them.

ALTER TABLE devices ADD COLUMN metrology_due date;

CREATE TABLE asset_events (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id      bigint NOT NULL REFERENCES devices (id),
    kind           text NOT NULL CHECK (kind IN (
                       'procurement', 'acceptance', 'deployment', 'maintenance', 'calibration',
                       'metrology', 'inspection', 'repair', 'transfer', 'scrapping')),
    at             timestamptz NOT NULL,
    cost           numeric(14, 2) CHECK (cost >= 0),
    document_ref   text CHECK (length(document_ref) <= 500),  -- contract, invoice, certificate
    detail         text NOT NULL DEFAULT '' CHECK (length(detail) <= 2000),
    work_order_id  bigint,
    actor          text NOT NULL,
    recorded_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX asset_events_device ON asset_events (device_id, at);
CREATE INDEX asset_events_at ON asset_events (at);

-- One open work order per device: reporting a fault again adds to it.
CREATE TABLE work_orders (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id    bigint NOT NULL REFERENCES devices (id),
    tenant_id    integer NOT NULL REFERENCES tenants (id),   -- the device's home when reported
    state        text NOT NULL DEFAULT 'open'
                 CHECK (state IN ('open', 'assigned', 'in_progress', 'closed', 'cancelled')),
    fault        text NOT NULL CHECK (length(fault) BETWEEN 1 AND 2000),
    reported_by  text NOT NULL,
    reported_at  timestamptz NOT NULL,
    assignee     text,
    closed_at    timestamptz,
    resolution   text,
    cost         numeric(14, 2) CHECK (cost >= 0),
    alarm_ids    bigint[] NOT NULL DEFAULT '{}',
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CHECK ((state IN ('closed', 'cancelled')) = (closed_at IS NOT NULL))
);
CREATE UNIQUE INDEX work_orders_one_open ON work_orders (device_id)
    WHERE state NOT IN ('closed', 'cancelled');
CREATE INDEX work_orders_device ON work_orders (device_id, id DESC);
CREATE INDEX work_orders_tenant ON work_orders (tenant_id, id DESC);

CREATE TABLE work_order_events (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    work_order_id  bigint NOT NULL REFERENCES work_orders (id),
    at             timestamptz NOT NULL DEFAULT now(),
    actor          text NOT NULL,
    kind           text NOT NULL,     -- reported, assigned, started, note, closed, cancelled
    state          text NOT NULL,
    note           text NOT NULL DEFAULT ''
);
CREATE INDEX work_order_events_order ON work_order_events (work_order_id, id);

-- The latest position and use of each device that reports them (metrics 300
-- battery, 304 device_state, 400 zone_id, 401 x, 402 y, 403 floor), kept by
-- registry.ops_tracker from telemetry. zone_id is a tenant id (a department
-- or building) when the device reports one the tree knows, else NULL.
CREATE TABLE device_status (
    device_id    bigint PRIMARY KEY REFERENCES devices (id),
    use_state    smallint,            -- 0 idle, 1 in use, 2 fault, 3 maintenance
    state_since  timestamptz,
    battery      real,
    zone_id      integer,
    floor        smallint,
    x            real,
    y            real,
    last_seen    timestamptz NOT NULL
);
CREATE INDEX device_status_zone ON device_status (zone_id);

CREATE TABLE device_reservations (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id     bigint NOT NULL REFERENCES devices (id),
    tenant_id     integer NOT NULL REFERENCES tenants (id),  -- the requesting tenant
    request       text NOT NULL CHECK (length(request) BETWEEN 1 AND 500),
    to_zone       integer REFERENCES tenants (id),
    reserved_by   text NOT NULL,
    reserved_at   timestamptz NOT NULL DEFAULT now(),
    released_at   timestamptz,
    released_by   text,
    release_note  text
);
CREATE UNIQUE INDEX device_reservations_open ON device_reservations (device_id)
    WHERE released_at IS NULL;
CREATE INDEX device_reservations_tenant ON device_reservations (tenant_id, id DESC);

CREATE TABLE device_movements (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id       bigint NOT NULL REFERENCES devices (id),
    from_zone       integer,
    to_zone         integer,
    at              timestamptz NOT NULL DEFAULT now(),
    actor           text NOT NULL,
    reason          text NOT NULL,
    reservation_id  bigint REFERENCES device_reservations (id)
);
CREATE INDEX device_movements_device ON device_movements (device_id, id);

CREATE TABLE compliance_policies (
    tenant_id      integer PRIMARY KEY REFERENCES tenants (id),
    lead_days      integer[] NOT NULL CHECK (cardinality(lead_days) BETWEEN 1 AND 10),
    escalate_days  integer[] NOT NULL CHECK (cardinality(escalate_days) BETWEEN 1 AND 10),
    owner          text,
    updated_by     text NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE compliance_tasks (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id         bigint NOT NULL REFERENCES devices (id),
    tenant_id         integer NOT NULL REFERENCES tenants (id),   -- the device's home
    kind              text NOT NULL CHECK (kind IN ('calibration', 'metrology', 'inspection')),
    due_on            date NOT NULL,
    owner             text NOT NULL,
    state             text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'done')),
    created_at        timestamptz NOT NULL,
    reminders         integer NOT NULL DEFAULT 0,
    escalation_level  integer NOT NULL DEFAULT 0,
    done_at           timestamptz,
    done_by           text,
    UNIQUE (device_id, kind, due_on)
);
CREATE INDEX compliance_tasks_open ON compliance_tasks (tenant_id, due_on) WHERE state = 'open';

CREATE TABLE compliance_events (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    task_id   bigint NOT NULL REFERENCES compliance_tasks (id),
    at        timestamptz NOT NULL,
    kind      text NOT NULL CHECK (kind IN ('created', 'reminder', 'escalation', 'done')),
    level     integer NOT NULL DEFAULT 0,
    notify    text NOT NULL DEFAULT '',     -- whom it went to
    note      text NOT NULL DEFAULT ''
);
CREATE INDEX compliance_events_task ON compliance_events (task_id, id);

CREATE TABLE ops_state (
    key    text PRIMARY KEY,
    value  timestamptz NOT NULL
);

GRANT SELECT, INSERT, UPDATE ON work_orders, device_status, device_reservations,
    compliance_policies, compliance_tasks, ops_state TO rmiot_app;
GRANT SELECT, INSERT ON asset_events, work_order_events, device_movements, compliance_events
    TO rmiot_app;
GRANT DELETE ON device_status TO rmiot_app;
