-- Outbound interoperability (issue 11): hospital systems (HIS, EMR) subscribed
-- to alarms and observations of their patients, as HL7 v2 ORU^R01 over MLLP or
-- FHIR R4 over HTTP, through the alarm outbox of migration 0014. The code
-- side: rmiot/outbound.py (delivery and the observation job),
-- ingest/hl7/outbound.py and query/fhir/outbound.py (the messages).
--
--   alarm_channels          two more kinds: 'hl7' (target mllp://host:port or
--                           mllps://host:port, TLS) and 'fhir' (target: the
--                           system's FHIR base URL)
--   alarm_deliveries        also carries observation batches: event_id NULL,
--                           the batch (without any patient identifier: that is
--                           added when it is sent) in payload, its subscription,
--                           patient and device
--   outbound_subscriptions  a channel's subscription to the telemetry of the
--                           patients of a tenant subtree (some metrics or all)
--   outbound_cursors        per (subscription, binding): the last frame queued;
--                           moved in the transaction that queues the batch, so
--                           nothing is queued twice or skipped across restarts
--
-- hl7 and fhir channels carry patient data: an alarm event reaches them only
-- when the alarm has a patient (the alarm's own, else the patient its device
-- was bound to when it was raised).

ALTER TABLE alarm_channels DROP CONSTRAINT alarm_channels_kind_check;
ALTER TABLE alarm_channels ADD CONSTRAINT alarm_channels_kind_check
    CHECK (kind IN ('webhook', 'mqtt', 'hl7', 'fhir'));

-- The patient an alarm is about (NULL: none).
CREATE FUNCTION rmiot_alarm_patient(alarm bigint) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce(a.patient_id, (
               SELECT b.patient_id FROM device_bindings b
                WHERE b.device_id = a.device_id AND b.bound_at <= a.raised_at
                  AND (b.unbound_at IS NULL OR b.unbound_at > a.raised_at)
                ORDER BY b.bound_at DESC LIMIT 1))
      FROM alarms a WHERE a.id = alarm
$$;

CREATE TABLE outbound_subscriptions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel_id  bigint NOT NULL REFERENCES alarm_channels (id),
    tenant_id   integer NOT NULL REFERENCES tenants (id),   -- patients of its subtree
    metrics     integer[] NOT NULL DEFAULT '{}',             -- empty: every metric
    max_frames  integer NOT NULL DEFAULT 100 CHECK (max_frames BETWEEN 1 AND 1000),
    start_at    timestamptz NOT NULL DEFAULT now(),          -- nothing measured before
    enabled     boolean NOT NULL DEFAULT true,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX outbound_subscriptions_channel ON outbound_subscriptions (channel_id);

CREATE TABLE outbound_cursors (
    subscription_id  bigint NOT NULL REFERENCES outbound_subscriptions (id),
    binding_id       bigint NOT NULL REFERENCES device_bindings (id),
    ts               timestamptz NOT NULL,
    seq              bigint NOT NULL,
    done             boolean NOT NULL DEFAULT false,   -- the binding ended and all is queued
    PRIMARY KEY (subscription_id, binding_id)
);

ALTER TABLE alarm_deliveries ALTER COLUMN event_id DROP NOT NULL;
ALTER TABLE alarm_deliveries
    ADD COLUMN subscription_id bigint REFERENCES outbound_subscriptions (id),
    ADD COLUMN patient_id bigint REFERENCES patients (id),
    ADD COLUMN device_id bigint,
    ADD COLUMN frames integer,
    ADD COLUMN payload bytea,
    ADD CONSTRAINT alarm_deliveries_event_or_batch CHECK (
        (event_id IS NOT NULL AND payload IS NULL AND subscription_id IS NULL)
        OR (event_id IS NULL AND payload IS NOT NULL AND subscription_id IS NOT NULL
            AND patient_id IS NOT NULL));

CREATE OR REPLACE FUNCTION rmiot_alarm_events_added() RETURNS trigger LANGUAGE plpgsql AS $$
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
     AND rmiot_severity_rank(e.severity) >= rmiot_severity_rank(c.min_severity)
     AND (c.kind IN ('webhook', 'mqtt') OR rmiot_alarm_patient(e.alarm_id) IS NOT NULL);
  IF FOUND THEN
    PERFORM pg_notify('rmiot_alarm_deliveries', '');
  END IF;
  PERFORM pg_notify('rmiot_alarm_events', top::text);
  RETURN NULL;
END
$$;

GRANT SELECT, INSERT, UPDATE ON outbound_subscriptions, outbound_cursors TO rmiot_app;
