-- Interoperability (issue 11): HL7 v2 inbound, results shared between
-- institutions, and the rights hospital systems need.
--
--   hl7_messages    every HL7 v2 message answered AA, by (sender, MSH-10 control
--                   id): an ADT's row goes in in the same transaction as the
--                   binding changes it makes, so a resent message (same control
--                   id) is recognised and changes nothing; ORU rows are recorded
--                   after their telemetry commits (a resent ORU stores nothing
--                   twice anyway: its frames' keys are derived from the control id)
--   shared_results  a device-derived result a hospital publishes for the region
--                   (standard 6.3 g): found by the patient's pseudonym, read by
--                   another hospital that treats the same person
--   his_interface   the role of a hospital's HIS/EMR interface (below)

CREATE TABLE hl7_messages (
    sender       text NOT NULL,                  -- the authenticated sender (cert:..., mllp:...)
    control_id   text NOT NULL,                  -- MSH-10
    message_type text NOT NULL,                  -- ORU^R01, ADT^A02 ...
    tenant_id    integer REFERENCES tenants (id),
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (sender, control_id)
);
CREATE INDEX hl7_messages_received ON hl7_messages (received_at);
GRANT SELECT, INSERT ON hl7_messages TO rmiot_app;

CREATE TABLE shared_results (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    integer NOT NULL REFERENCES tenants (id),   -- the publishing hospital or ward
    patient_id   bigint NOT NULL REFERENCES patients (id),
    pseudonym    text NOT NULL,                              -- the person, across hospitals
    device_id    bigint REFERENCES devices (id),
    code         text NOT NULL,                              -- LOINC (or local) document code
    title        text NOT NULL CHECK (length(title) BETWEEN 1 AND 200),
    content_type text NOT NULL,
    content      bytea NOT NULL CHECK (length(content) <= 1048576),
    period_start timestamptz,
    period_end   timestamptz,
    published_by text NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now(),
    CHECK (period_end IS NULL OR period_start IS NULL OR period_end >= period_start)
);
CREATE INDEX shared_results_pseudonym ON shared_results (pseudonym, published_at DESC);
GRANT SELECT, INSERT ON shared_results TO rmiot_app;

-- A hospital's HIS/EMR interface (its interface engine, speaking HL7 v2 over
-- MLLP) is a role of its own: hospital_platform pushes telemetry upstream and
-- holds no patient data, while the HIS drives patient-device bindings (ADT:
-- patient write) and relays its monitor gateways' results (ORU: ingest
-- write). Only an interface holds it: mllp:<sending facility> or
-- cert:<common name>, never a person or a device.
INSERT INTO authz_roles (name, description) VALUES
    ('his_interface', 'a hospital''s HIS/EMR interface (HL7 v2 over MLLP): ADT and ORU');
INSERT INTO authz_permissions (role, object, action) VALUES
    ('his_interface', 'patient', 'write'),
    ('his_interface', 'ingest', 'write');
ALTER TABLE authz_grants ADD CONSTRAINT authz_his_interface_only_for_interfaces
    CHECK (role <> 'his_interface' OR subject LIKE 'mllp:%' OR subject LIKE 'cert:%');
