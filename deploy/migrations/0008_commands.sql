-- Device commands (standard 6.3 e): what people ask a device to do, sent down
-- the device's RMF connection as a COMMAND frame (kind 0x82, field metric 0 =
-- the command id, further fields = the parameters); the device answers with a
-- COMMAND_RESULT frame (kind 5: metric 0 = the command id, metric 1 = the
-- result code). registry/commands.py is the code side of this table.
--
-- States (the trigger below refuses any other move):
--
--   queued     stored, waiting for the device to have a live connection
--   sent       written to the device's connection (not yet confirmed)
--   delivered  the device confirmed receipt: result code 1 "accepted, in
--              progress", or implied by a final result
--   succeeded  result code 0                                   (final)
--   failed     any other result code                           (final)
--   expired    not finished by expires_at, whatever the state  (final)
--
--   queued    -> sent | delivered | expired
--   sent      -> delivered | queued | expired
--   delivered -> succeeded | failed | expired
--
-- sent -> queued: the connection it was written to closed before the device
-- confirmed it, so it goes out again when the device is back (at least once:
-- a device recognises a repeat by its command id). queued -> delivered: the
-- device's answer to a copy sent before that requeue arrived afterwards.
--
-- Every state change is one row in command_events, written by the trigger
-- from the row's updated_at and detail (the code sets both with the state), so
-- the history cannot miss a change whoever makes it.

CREATE SEQUENCE command_id_seq AS bigint START 1 MINVALUE 1;

CREATE TABLE commands (
    id            bigint PRIMARY KEY DEFAULT nextval('command_id_seq') CHECK (id > 0),
    device_id     bigint NOT NULL REFERENCES devices (id),
    tenant_id     integer NOT NULL REFERENCES tenants (id),  -- the device's, when queued
    name          text NOT NULL CHECK (name ~ '^[a-z][a-z0-9_.-]{0,63}$'),
    -- [[metric, vtype, value], ...] as in the frame; bytes values as {"hex": "..."}
    params        jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(params) = 'array'),
    state         text NOT NULL DEFAULT 'queued' CHECK (state IN
                      ('queued', 'sent', 'delivered', 'succeeded', 'failed', 'expired')),
    created_by    text NOT NULL,                              -- the caller, "user:alice"
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now(),         -- of the latest state change
    sent_at       timestamptz,                                -- the latest send
    delivered_at  timestamptz,
    finished_at   timestamptz,
    result_code   integer,
    detail        jsonb,                                      -- why the latest change
    CHECK (expires_at > created_at),
    CHECK ((state IN ('succeeded', 'failed')) = (result_code IS NOT NULL))
);
-- "What is pending for device X": small, since rows leave it once sent.
CREATE INDEX commands_queued ON commands (device_id, id) WHERE state = 'queued';
-- A device's commands by time (ids grow with created_at), and a tenant's.
CREATE INDEX commands_device_id ON commands (device_id, id DESC);
CREATE INDEX commands_tenant_id ON commands (tenant_id, id DESC);
-- The expiry sweep reads only the unfinished ones.
CREATE INDEX commands_open_expiry ON commands (expires_at)
    WHERE state IN ('queued', 'sent', 'delivered');

CREATE TABLE command_events (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    command_id  bigint NOT NULL REFERENCES commands (id),
    at          timestamptz NOT NULL,
    state       text NOT NULL,
    detail      jsonb
);
CREATE INDEX command_events_command ON command_events (command_id, id);

CREATE FUNCTION rmiot_command_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF (OLD.state, NEW.state) NOT IN (
      ('queued', 'sent'), ('queued', 'delivered'), ('queued', 'expired'),
      ('sent', 'delivered'), ('sent', 'queued'), ('sent', 'expired'),
      ('delivered', 'succeeded'), ('delivered', 'failed'), ('delivered', 'expired')) THEN
    RAISE EXCEPTION 'command %: % -> % is not a state change a command can make',
        OLD.id, OLD.state, NEW.state USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END
$$;

-- Record the change; a command (re)queued is announced on rmiot_commands as
-- 'device:<id>', at commit, so the ingest process holding that device's
-- connection sends it at once.
CREATE FUNCTION rmiot_command_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO command_events (command_id, at, state, detail)
      VALUES (NEW.id, NEW.updated_at, NEW.state, NEW.detail);
  IF NEW.state = 'queued' THEN
    PERFORM pg_notify('rmiot_commands', 'device:' || NEW.device_id);
  END IF;
  RETURN NULL;
END
$$;

CREATE TRIGGER commands_check BEFORE UPDATE OF state ON commands
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION rmiot_command_check();
CREATE TRIGGER commands_queued AFTER INSERT ON commands
    FOR EACH ROW EXECUTE FUNCTION rmiot_command_changed();
CREATE TRIGGER commands_changed AFTER UPDATE OF state ON commands
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION rmiot_command_changed();

-- The platform queues commands and moves their state; it never deletes them
-- (retention is an administrator's job) nor rewrites their history.
GRANT SELECT, INSERT, UPDATE ON commands TO rmiot_app;
GRANT SELECT, INSERT ON command_events TO rmiot_app;
GRANT USAGE, SELECT ON SEQUENCE command_id_seq TO rmiot_app;
