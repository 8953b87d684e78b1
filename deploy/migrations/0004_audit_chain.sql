-- The audit chain (security/audit.py): what 0001's audit_log needs to be one
-- linear SM3 hash chain shared by every platform process, and to be searched
-- by an auditor.
--
-- audit_head is a single row holding the end of the chain. An appender locks it
-- (SELECT ... FOR UPDATE), numbers and hashes its batch from it, inserts the
-- batch and moves it forward, all in one transaction: appenders in different
-- processes queue on that row lock, so ids stay dense (1, 2, 3 ...) and each
-- record's prev_hash is the hash of the record with the previous id.
-- `count` is the number of records appended since genesis (equal to last_id
-- while ids are dense from 1); `rmiot audit verify` checks the last record
-- against this row, so a deleted tail shows even without external checkpoints.

-- The pseudonym of the patient whose data an RPC read (NULL for other calls).
ALTER TABLE audit_log ADD COLUMN patient text;

CREATE TABLE audit_head (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    last_id     bigint NOT NULL CHECK (last_id >= 0),
    last_hash   bytea NOT NULL CHECK (octet_length(last_hash) = 32),
    count       bigint NOT NULL CHECK (count >= 0),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Start from whatever audit_log already holds (nothing, on a new platform);
-- the genesis prev_hash is 32 zero bytes.
INSERT INTO audit_head (last_id, last_hash, count)
SELECT coalesce(max(id), 0),
       coalesce((SELECT hash FROM audit_log ORDER BY id DESC LIMIT 1),
                decode(repeat('00', 32), 'hex')),
       count(*)
FROM audit_log;

-- The auditor's filters (actor already has audit_log_actor_ts from 0001).
-- Verification walks audit_log_id (id, ts) in id order.
CREATE INDEX audit_log_ts ON audit_log (ts DESC);
CREATE INDEX audit_log_tenant_ts ON audit_log (tenant_id, ts DESC);
CREATE INDEX audit_log_patient_ts ON audit_log (patient, ts DESC) WHERE patient IS NOT NULL;

-- The application appends and reads; it never rewrites or removes a record
-- (retention runs as the administrator), and it may only move the head.
REVOKE UPDATE, DELETE, TRUNCATE ON audit_log FROM rmiot_app;
GRANT SELECT, INSERT ON audit_log TO rmiot_app;
REVOKE ALL ON audit_head FROM rmiot_app;
GRANT SELECT, UPDATE ON audit_head TO rmiot_app;
