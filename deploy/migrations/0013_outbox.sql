-- The hospital role's outbox (ingest/outbox.py, ingest/uplink.py): every
-- frame committed to telemetry that is to go up to the region, written by the
-- batch writer in the same transaction as the telemetry COPY, so nothing
-- committed is ever missing from it; the uplink pushes it to the region and
-- deletes a row only once the region has acknowledged the frame.
--
-- Order: within one ingest process the writers commit outbox rows in the
-- order their batches were formed, so ``id`` follows each device's arrival
-- order; the uplink sends in ``id`` order.
--
-- The region role never writes here (the table stays empty).

CREATE TABLE outbox (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id   bigint NOT NULL,
    tenant_id   integer NOT NULL,
    frame       bytea NOT NULL,                   -- the RMF frame as the device sent it
    queued_at   timestamptz NOT NULL DEFAULT now()
);

-- Rows come and go in bulk: vacuum after a few percent of dead rows, not 20 %.
ALTER TABLE outbox SET (autovacuum_vacuum_scale_factor = 0.02,
                        autovacuum_vacuum_insert_scale_factor = 0.02);

GRANT SELECT, INSERT, DELETE ON outbox TO rmiot_app;
