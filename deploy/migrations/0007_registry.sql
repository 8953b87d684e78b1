-- The registry of issue 5 (the standard's 6.2 device access and 8.3 asset
-- management): what 0001 started for device models and devices, extended.
--
--   device_models      + kind from a fixed list, metrics always a JSON array
--   devices            + department, location, gateway, asset data, who registered it;
--                        lifecycle states from a fixed list
--   device_codes       RFID / barcode / QR codes, unique per tenant and kind
--   device_transitions the lifecycle state machine, as data
--   device_state_history  every state a device entered: from, to, who, when, why
--   device_bindings    device <-> patient / bed / episode over time
--   vendor_approvals   which vendors a hospital accepts devices from
--
-- Tenancy: devices.tenant_id is the owning hospital (the tenant in the
-- device's frames); department_id, when set, is a department under it. A
-- device's *home* is coalesce(department_id, tenant_id): a role granted on a
-- tenant sees the devices whose home is in that tenant's subtree.
--
-- Actor and reason of a state change come from the transaction's settings
-- rmiot.actor and rmiot.reason (registry/lifecycle.py sets them with
-- set_config(..., true)); a change made without them is still recorded, as
-- 'db:<role>'. Triggers, not the application, guard and record transitions, so
-- no path (the API, an import, psql) skips them.
--
-- The device change notification of 0002 becomes one per statement (see the
-- end): a bulk import announces its tenants, not each of its devices.

-- Device models -----------------------------------------------------------------

ALTER TABLE device_models
    ADD COLUMN description text NOT NULL DEFAULT '',
    ADD COLUMN created_by  text,
    ADD CONSTRAINT device_models_kind_known CHECK (kind IN (
        'monitor', 'wearable', 'infusion_pump', 'ventilator', 'rfid_tag', 'meter', 'sensor',
        'gateway', 'imaging', 'analyzer', 'smart_bed', 'other')),
    ADD CONSTRAINT device_models_metrics_array CHECK (jsonb_typeof(metrics) = 'array');
CREATE INDEX device_models_kind ON device_models (kind);

-- Devices -------------------------------------------------------------------------

ALTER TABLE devices
    ADD COLUMN department_id        integer REFERENCES tenants (id),
    ADD COLUMN location             text,
    ADD COLUMN gateway_id           bigint REFERENCES devices (id),
    ADD COLUMN asset_class          text,    -- medical device risk class (NMPA): I, II, III
    ADD COLUMN asset_grade          text,    -- the hospital's own importance grade: A, B, C
    ADD COLUMN purchase_date        date,
    ADD COLUMN purchase_cost        numeric(14, 2),
    ADD COLUMN depreciation_method  text,
    ADD COLUMN useful_life_years    smallint,
    ADD COLUMN calibration_due      date,
    ADD COLUMN inspection_due       date,
    ADD COLUMN registered_by        text,
    ADD CONSTRAINT devices_state_known CHECK (state IN (
        'registered', 'active', 'suspended', 'maintenance', 'retired', 'scrapped')),
    ADD CONSTRAINT devices_not_own_gateway CHECK (gateway_id <> id),
    ADD CONSTRAINT devices_asset_class CHECK (asset_class IN ('I', 'II', 'III')),
    ADD CONSTRAINT devices_asset_grade CHECK (asset_grade IN ('A', 'B', 'C')),
    ADD CONSTRAINT devices_purchase_cost CHECK (purchase_cost >= 0),
    ADD CONSTRAINT devices_depreciation CHECK (
        depreciation_method IN ('straight_line', 'declining_balance')),
    ADD CONSTRAINT devices_useful_life CHECK (useful_life_years BETWEEN 1 AND 100),
    ADD CONSTRAINT devices_depreciation_needs_life CHECK (
        depreciation_method IS NULL OR useful_life_years IS NOT NULL);

-- Search by serial number within a tenant; a serial is unique per model there.
CREATE UNIQUE INDEX devices_tenant_serial ON devices (tenant_id, serial_no, model_id)
    WHERE serial_no IS NOT NULL;
CREATE INDEX devices_model ON devices (model_id);
CREATE INDEX devices_department ON devices (department_id) WHERE department_id IS NOT NULL;
CREATE INDEX devices_gateway ON devices (gateway_id) WHERE gateway_id IS NOT NULL;

-- Codes printed on or carried by a device. The primary key makes a code unique
-- per tenant and kind, and, code first, serves a scan's lookup by code alone
-- or by (code, tenant) whatever the kind; a device carries at most one code of
-- each kind. tenant_id is the device's: one foreign key on (device, tenant)
-- holds that (and follows a device moved to another tenant), with one check
-- per code where two keys would make two — a bulk import writes 200,000 codes.
CREATE UNIQUE INDEX devices_id_tenant ON devices (id, tenant_id);
CREATE TABLE device_codes (
    code        text NOT NULL CHECK (code ~ '^[^[:space:]]{1,128}$'),
    tenant_id   integer NOT NULL,
    kind        text NOT NULL CHECK (kind IN ('rfid', 'barcode', 'qr')),
    device_id   bigint NOT NULL,
    PRIMARY KEY (code, tenant_id, kind),
    UNIQUE (device_id, kind),
    FOREIGN KEY (device_id, tenant_id) REFERENCES devices (id, tenant_id) ON UPDATE CASCADE
);

-- Lifecycle ---------------------------------------------------------------------

-- The state machine: registered -> active -> suspended / maintenance -> retired
-- -> scrapped. A new device starts registered (or active when registered by
-- an administrator who commissions it at once); scrapped is final.
CREATE TABLE device_transitions (
    from_state  text NOT NULL,
    to_state    text NOT NULL,
    PRIMARY KEY (from_state, to_state)
);
INSERT INTO device_transitions (from_state, to_state) VALUES
    ('registered', 'active'), ('registered', 'retired'),
    ('active', 'suspended'), ('active', 'maintenance'), ('active', 'retired'),
    ('suspended', 'active'), ('suspended', 'maintenance'), ('suspended', 'retired'),
    ('maintenance', 'active'), ('maintenance', 'suspended'), ('maintenance', 'retired'),
    ('retired', 'scrapped');

CREATE TABLE device_state_history (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id   bigint NOT NULL REFERENCES devices (id),
    from_state  text,                        -- NULL: the device was registered
    to_state    text NOT NULL,
    actor       text NOT NULL,
    reason      text,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX device_state_history_device ON device_state_history (device_id, id);

CREATE FUNCTION rmiot_actor() RETURNS text LANGUAGE sql STABLE AS $$
  SELECT coalesce(nullif(current_setting('rmiot.actor', true), ''), 'db:' || session_user)
$$;

CREATE FUNCTION rmiot_device_initial_state() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'a new device starts registered or active, not %', NEW.state
    USING ERRCODE = 'check_violation', CONSTRAINT = 'device_state_transition';
END
$$;

CREATE FUNCTION rmiot_device_transition_check() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NOT EXISTS (SELECT FROM device_transitions
                  WHERE from_state = OLD.state AND to_state = NEW.state) THEN
    RAISE EXCEPTION 'device % cannot go from % to %', OLD.id, OLD.state, NEW.state
      USING ERRCODE = 'check_violation', CONSTRAINT = 'device_state_transition';
  END IF;
  RETURN NEW;
END
$$;

-- Statement-level, set-based: a bulk import records its history in one INSERT.
CREATE FUNCTION rmiot_device_registered() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO device_state_history (device_id, from_state, to_state, actor, reason)
  SELECT id, NULL, state, rmiot_actor(),
         coalesce(nullif(current_setting('rmiot.reason', true), ''), 'registered')
    FROM new_rows;
  RETURN NULL;
END
$$;

-- A device leaving `active` is no longer at a bedside: its open binding ends.
CREATE FUNCTION rmiot_device_state_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO device_state_history (device_id, from_state, to_state, actor, reason)
  SELECT n.id, o.state, n.state, rmiot_actor(), nullif(current_setting('rmiot.reason', true), '')
    FROM new_rows n JOIN old_rows o ON o.id = n.id
   WHERE n.state IS DISTINCT FROM o.state;
  UPDATE device_bindings b
     SET unbound_at = now(), unbound_by = rmiot_actor(), end_kind = 'device_' || n.state,
         end_reason = nullif(current_setting('rmiot.reason', true), '')
    FROM new_rows n JOIN old_rows o ON o.id = n.id
   WHERE b.device_id = n.id AND b.unbound_at IS NULL
     AND o.state = 'active' AND n.state <> 'active';
  RETURN NULL;
END
$$;

CREATE TRIGGER devices_initial_state BEFORE INSERT ON devices
    FOR EACH ROW WHEN (NEW.state NOT IN ('registered', 'active'))
    EXECUTE FUNCTION rmiot_device_initial_state();
CREATE TRIGGER devices_transition_check BEFORE UPDATE OF state ON devices
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION rmiot_device_transition_check();
CREATE TRIGGER devices_registered AFTER INSERT ON devices
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rmiot_device_registered();
CREATE TRIGGER devices_state_changed AFTER UPDATE ON devices
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rmiot_device_state_changed();

-- Bindings ------------------------------------------------------------------------

-- Which patient, bed or episode a device serves, over time. At most one open
-- binding per device (unbound_at IS NULL); a transfer closes one and opens the
-- next in one transaction. tenant_id is where the binding was made (a ward).
CREATE TABLE device_bindings (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id   bigint NOT NULL REFERENCES devices (id),
    tenant_id   integer NOT NULL REFERENCES tenants (id),
    patient_id  bigint REFERENCES patients (id),
    bed         text,
    episode     text,
    bound_at    timestamptz NOT NULL DEFAULT now(),
    bound_by    text NOT NULL,
    reason      text,
    unbound_at  timestamptz,
    unbound_by  text,
    end_kind    text,                        -- unbind, transfer, device_<state>
    end_reason  text,
    CHECK (patient_id IS NOT NULL OR bed IS NOT NULL),
    CHECK ((unbound_at IS NULL) = (end_kind IS NULL)),
    CHECK (unbound_at IS NULL OR unbound_at >= bound_at)
);
CREATE UNIQUE INDEX device_bindings_one_open ON device_bindings (device_id)
    WHERE unbound_at IS NULL;
CREATE INDEX device_bindings_device ON device_bindings (device_id, bound_at DESC);
CREATE INDEX device_bindings_patient ON device_bindings (patient_id, bound_at DESC)
    WHERE patient_id IS NOT NULL;

-- Vendor approvals ------------------------------------------------------------------

-- A hospital accepts devices only from vendors it approved. Revoking keeps the
-- row (revoked_at), so the approvals' history stays; re-approving adds a row.
CREATE TABLE vendor_approvals (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id   integer NOT NULL REFERENCES tenants (id),
    vendor_id   bigint NOT NULL REFERENCES vendors (id),
    approved_by text NOT NULL,
    approved_at timestamptz NOT NULL DEFAULT now(),
    note        text,
    revoked_by  text,
    revoked_at  timestamptz,
    CHECK ((revoked_at IS NULL) = (revoked_by IS NULL))
);
CREATE UNIQUE INDEX vendor_approvals_current ON vendor_approvals (tenant_id, vendor_id)
    WHERE revoked_at IS NULL;

-- Change notification: one per statement ------------------------------------------

-- 0002 announced every changed device row ('device:<id>'). A bulk import of
-- 100,000 devices would then make every ingest process re-read them one query
-- at a time; instead, a statement changing more than 64 devices announces
-- their tenants ('tenant:<id>', which the device view reloads in one query).
-- Deletions stay per device: only 'device:<id>' tells the view a device is gone.
DROP TRIGGER devices_notify ON devices;

CREATE FUNCTION rmiot_notify_devices() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  ids bigint[];
  tenants integer[];
  i bigint;
BEGIN
  IF TG_OP = 'DELETE' THEN
    SELECT array_agg(id) INTO ids FROM old_rows;
  ELSE
    SELECT array_agg(id) INTO ids FROM (SELECT id FROM new_rows LIMIT 65) x;
    IF cardinality(ids) > 64 THEN
      IF TG_OP = 'UPDATE' THEN  -- a device moved between tenants: both reload
        SELECT array_agg(DISTINCT t) INTO tenants
          FROM (SELECT tenant_id AS t FROM new_rows UNION SELECT tenant_id FROM old_rows) x;
      ELSE
        SELECT array_agg(DISTINCT tenant_id) INTO tenants FROM new_rows;
      END IF;
      FOREACH i IN ARRAY tenants LOOP
        PERFORM pg_notify('rmiot_registry', 'tenant:' || i);
      END LOOP;
      RETURN NULL;
    END IF;
  END IF;
  IF ids IS NOT NULL THEN
    FOREACH i IN ARRAY ids LOOP
      PERFORM pg_notify('rmiot_registry', 'device:' || i);
    END LOOP;
  END IF;
  RETURN NULL;
END
$$;

CREATE TRIGGER devices_notify_insert AFTER INSERT ON devices
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rmiot_notify_devices();
CREATE TRIGGER devices_notify_update AFTER UPDATE ON devices
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rmiot_notify_devices();
CREATE TRIGGER devices_notify_delete AFTER DELETE ON devices
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rmiot_notify_devices();

-- Rights ----------------------------------------------------------------------------

-- The state history is append-only for the application, like the audit log.
GRANT SELECT, INSERT, DELETE ON device_codes TO rmiot_app;
GRANT SELECT ON device_transitions TO rmiot_app;
GRANT SELECT, INSERT ON device_state_history TO rmiot_app;
GRANT SELECT, INSERT, UPDATE ON device_bindings, vendor_approvals TO rmiot_app;
