-- Patients: identifiers are never stored in clear. name, national ID card
-- number, phone and emergency contacts are one SM4-GCM sealed JSON document
-- (security/patients.py), bound to the row's id. The pseudonym — HMAC-SM3 of
-- the ID card number under a key of its own — is the same person's key in
-- every hospital, so regional views can count people without knowing them.
-- Sex and birth year are kept coarse, for de-identified aggregates.

CREATE TABLE patients (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    integer NOT NULL REFERENCES tenants (id),  -- registering hospital/department
    pseudonym    text NOT NULL,
    identity_enc bytea NOT NULL,
    sex          char(1) CHECK (sex IN ('F', 'M', 'U')),
    birth_year   smallint CHECK (birth_year BETWEEN 1880 AND 2200),
    created_at   timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, pseudonym)
);
CREATE INDEX patients_pseudonym ON patients (pseudonym);

GRANT SELECT, INSERT, UPDATE ON patients TO rmiot_app;
