-- Rules, alarms and notifications (issue 8; standard 6.1 c, 6.3 c/f, 9.2).
-- The code side: ingest/alarm_*.py.
--
--   alarm_rules       what to watch, per tenant; inherited down the tree and
--                     overridden (same code) per department, device model,
--                     device or patient
--   alarms            one open alarm per (rule, subject) — subject is
--                     'device:<id>' or 'patient:<id>'; lifecycle
--                     active -> acknowledged -> cleared, with who/when/comment
--   alarm_events      every step of every alarm (raised, acknowledged, cleared,
--                     escalated, ...): the durable feed AlarmService.Watch
--                     replays from a cursor and the notifiers deliver
--   alarm_channels    webhooks (HMAC-signed) and MQTT topics of hospital systems
--   alarm_deliveries  the outbox of those channels: one row per (event,
--                     channel), with attempts, dead-letter and receipts
--   telemetry_tags    tags that filter rules put on stored records
--
-- Event ids follow commit order: every transaction writing alarm_events takes
-- the advisory lock rmiot_alarm_lock() first (ingest/alarm_store.py does), so a
-- Watch client resuming after id N can never miss an event committed later
-- with a smaller id. Alarm transactions are small and rare next to telemetry.

CREATE FUNCTION rmiot_severity_rank(severity text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE severity WHEN 'warning' THEN 1 WHEN 'minor' THEN 2 WHEN 'major' THEN 3
                         WHEN 'critical' THEN 4 END
$$;

CREATE TABLE alarm_rules (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   integer NOT NULL REFERENCES tenants (id),   -- applies to its subtree
    code        text NOT NULL CHECK (code ~ '^[a-z][a-z0-9_.-]{0,63}$'),
    name        text NOT NULL DEFAULT '',
    kind        text NOT NULL CHECK (kind IN ('threshold', 'rate', 'offline', 'fault',
                                              'battery', 'zone', 'energy', 'filter')),
    -- At most one narrower scope; none: every device whose home is in the subtree.
    model_id    bigint REFERENCES device_models (id),
    device_id   bigint REFERENCES devices (id),
    patient_id  bigint REFERENCES patients (id),
    severity    text NOT NULL DEFAULT 'major'
                CHECK (rmiot_severity_rank(severity) IS NOT NULL),
    enabled     boolean NOT NULL DEFAULT true,   -- false on an override: switched off there
    params      jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(params) = 'object'),
    escalation  jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(escalation) = 'object'),
    created_by  text NOT NULL,
    updated_by  text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    deleted_at  timestamptz,
    CHECK (num_nonnulls(model_id, device_id, patient_id) <= 1)
);
CREATE UNIQUE INDEX alarm_rules_one_per_scope ON alarm_rules (
    tenant_id, code, coalesce(model_id, 0), coalesce(device_id, 0), coalesce(patient_id, 0))
    WHERE deleted_at IS NULL;
CREATE INDEX alarm_rules_tenant ON alarm_rules (tenant_id) WHERE deleted_at IS NULL;

CREATE TABLE alarms (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rule_id             bigint NOT NULL REFERENCES alarm_rules (id),
    rule_code           text NOT NULL,
    kind                text NOT NULL,
    tenant_id           integer NOT NULL REFERENCES tenants (id), -- the device's home
    device_id           bigint NOT NULL REFERENCES devices (id),
    patient_id          bigint REFERENCES patients (id),
    subject             text NOT NULL,             -- 'device:<id>' or 'patient:<id>'
    severity            text NOT NULL CHECK (rmiot_severity_rank(severity) IS NOT NULL),
    state               text NOT NULL DEFAULT 'active'
                        CHECK (state IN ('active', 'acknowledged', 'cleared')),
    message             text NOT NULL,
    value               float8,
    latching            boolean NOT NULL DEFAULT false,  -- cleared only once acknowledged
    onset_at            timestamptz NOT NULL,      -- measurement time the condition began
    raised_at           timestamptz NOT NULL,
    normal_at           timestamptz,               -- the condition ended (alarm may stay)
    acked_at            timestamptz,
    acked_by            text,
    ack_comment         text,
    cleared_at          timestamptz,
    cleared_by          text,
    clear_comment       text,
    escalation_step     integer NOT NULL DEFAULT 0,
    next_escalation_at  timestamptz,               -- next deadline while unacknowledged
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CHECK ((state = 'cleared') = (cleared_at IS NOT NULL)),
    CHECK (state = 'active' OR acked_at IS NOT NULL OR state = 'cleared')
);
CREATE UNIQUE INDEX alarms_one_open ON alarms (rule_id, subject) WHERE state <> 'cleared';
CREATE INDEX alarms_tenant ON alarms (tenant_id, id DESC);
CREATE INDEX alarms_device ON alarms (device_id, id DESC);
CREATE INDEX alarms_due ON alarms (next_escalation_at) WHERE state = 'active';

CREATE FUNCTION rmiot_alarm_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF OLD.state <> NEW.state AND (OLD.state, NEW.state) NOT IN (
      ('active', 'acknowledged'), ('active', 'cleared'), ('acknowledged', 'cleared')) THEN
    RAISE EXCEPTION 'alarm %: % -> % is not a step an alarm can take', OLD.id, OLD.state,
        NEW.state USING ERRCODE = 'check_violation', CONSTRAINT = 'alarm_lifecycle';
  END IF;
  RETURN NEW;
END
$$;
CREATE TRIGGER alarms_lifecycle BEFORE UPDATE OF state ON alarms
    FOR EACH ROW EXECUTE FUNCTION rmiot_alarm_check();

-- The lock every alarm-writing transaction takes first ("rmalarm").
CREATE FUNCTION rmiot_alarm_lock() RETURNS void LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(32208412542595693)
$$;

CREATE SEQUENCE alarm_event_id_seq AS bigint START 1 MINVALUE 1;
CREATE TABLE alarm_events (
    id          bigint PRIMARY KEY DEFAULT nextval('alarm_event_id_seq'),
    alarm_id    bigint NOT NULL REFERENCES alarms (id),
    tenant_id   integer NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    kind        text NOT NULL CHECK (kind IN ('raised', 'acknowledged', 'cleared', 'normal',
                                              'escalated', 'renotified', 'comment', 'read')),
    actor       text NOT NULL,
    severity    text NOT NULL,
    state       text NOT NULL,
    detail      jsonb
);
CREATE INDEX alarm_events_alarm ON alarm_events (alarm_id, id);
CREATE INDEX alarm_events_tenant ON alarm_events (tenant_id, id);

-- Notification channels of hospital systems. secret_enc: the webhook's HMAC
-- key, sealed with SM4-GCM (security/sealed.py).
CREATE TABLE alarm_channels (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id     integer NOT NULL REFERENCES tenants (id),  -- alarms of its subtree
    kind          text NOT NULL CHECK (kind IN ('webhook', 'mqtt')),
    target        text NOT NULL,                             -- URL, or MQTT topic
    secret_enc    bytea,
    min_severity  text NOT NULL DEFAULT 'warning'
                  CHECK (rmiot_severity_rank(min_severity) IS NOT NULL),
    events        text[] NOT NULL DEFAULT ARRAY['raised', 'escalated', 'renotified',
                                                'acknowledged', 'cleared'],
    max_attempts  integer NOT NULL DEFAULT 8 CHECK (max_attempts BETWEEN 1 AND 100),
    backoff_s     float8 NOT NULL DEFAULT 1.0 CHECK (backoff_s > 0 AND backoff_s <= 3600),
    enabled       boolean NOT NULL DEFAULT true,
    created_by    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'webhook') = (secret_enc IS NOT NULL))
);
CREATE INDEX alarm_channels_tenant ON alarm_channels (tenant_id) WHERE enabled;

CREATE TABLE alarm_deliveries (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id         bigint NOT NULL REFERENCES alarm_events (id),
    channel_id       bigint NOT NULL REFERENCES alarm_channels (id),
    state            text NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    response_status  integer,
    delivered_at     timestamptz,                           -- the receipt
    UNIQUE (event_id, channel_id)
);
CREATE INDEX alarm_deliveries_due ON alarm_deliveries (next_attempt_at) WHERE state = 'pending';

-- Each new event: the Watch feeds are told (payload: the highest new id), and
-- the channels whose subtree, severity and event kinds match get a delivery.
CREATE FUNCTION rmiot_alarm_events_added() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  top bigint;
BEGIN
  SELECT max(id) INTO top FROM new_events;
  IF top IS NULL THEN
    RETURN NULL;
  END IF;
  INSERT INTO alarm_deliveries (event_id, channel_id)
  SELECT e.id, c.id
    FROM new_events e
    JOIN tenants t ON t.id = e.tenant_id
    JOIN alarm_channels c ON c.tenant_id = ANY (t.path) AND c.enabled
   WHERE e.kind = ANY (c.events)
     AND rmiot_severity_rank(e.severity) >= rmiot_severity_rank(c.min_severity);
  IF FOUND THEN
    PERFORM pg_notify('rmiot_alarm_deliveries', '');
  END IF;
  PERFORM pg_notify('rmiot_alarm_events', top::text);
  RETURN NULL;
END
$$;
CREATE TRIGGER alarm_events_added AFTER INSERT ON alarm_events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION rmiot_alarm_events_added();

-- Rules and bindings change what the ingest processes evaluate: they reload.
CREATE FUNCTION rmiot_alarm_rules_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('rmiot_alarm_rules', 'rules');
  RETURN NULL;
END
$$;
CREATE TRIGGER alarm_rules_changed AFTER INSERT OR UPDATE OR DELETE ON alarm_rules
    FOR EACH STATEMENT EXECUTE FUNCTION rmiot_alarm_rules_changed();

CREATE FUNCTION rmiot_alarm_binding_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('rmiot_alarm_rules', 'device:' || coalesce(NEW.device_id, OLD.device_id));
  RETURN NULL;
END
$$;
CREATE TRIGGER device_bindings_alarm_rules AFTER INSERT OR UPDATE OR DELETE ON device_bindings
    FOR EACH ROW EXECUTE FUNCTION rmiot_alarm_binding_changed();

-- Tags filter rules put on stored records (the telemetry row itself is not
-- rewritten: it was COPYed as the device sent it).
CREATE TABLE telemetry_tags (
    device_id  bigint NOT NULL,
    ts         timestamptz NOT NULL,
    seq        bigint NOT NULL,
    tag        text NOT NULL,
    rule_id    bigint NOT NULL REFERENCES alarm_rules (id),
    PRIMARY KEY (device_id, ts, seq, tag)
);

-- Managing rules and channels is its own right.
INSERT INTO authz_permissions (role, object, action) VALUES
    ('hospital_admin', 'alarm', 'manage'),
    ('department_head', 'alarm', 'manage');

GRANT SELECT, INSERT, UPDATE ON alarm_rules, alarms, alarm_channels, alarm_deliveries
    TO rmiot_app;
GRANT SELECT, INSERT ON alarm_events, telemetry_tags TO rmiot_app;
GRANT USAGE, SELECT ON SEQUENCE alarm_event_id_seq TO rmiot_app;
