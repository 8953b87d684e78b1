-- Authorisation policy (security/authz.py, model security/rbac_model.conf):
-- RBAC with domains, where a domain is a node of the tenant tree and a role
-- granted on a node reaches that node's whole subtree.
--
--   authz_roles        the roles (defined here, by migrations only)
--   authz_permissions  role -> (object, action): Casbin's p lines, global
--                      (the same for a role wherever it is granted)
--   authz_grants       (subject, role, tenant): Casbin's g lines, g = _, _, _
--
-- Objects are resource types; actions are exactly three:
--   read    see records of the type
--   write   create or change records in normal operation (append telemetry,
--           acknowledge an alarm, send a command, register a device)
--   manage  administer the type itself: lifecycle, settings, retention,
--           deletion; for `policy`, grant/revoke roles and change permissions
-- No action implies another: every right is a row, so the table reads as the
-- whole truth. Row-level limits inside a reached tenant (a clinician's own
-- patients, a patient's own record, a vendor's own models and devices) belong
-- to the query layer; this policy decides which tenants are reached.
--
-- Writes: the security admin's RPC calls Authorizer.grant/revoke/set_permission,
-- which run in the platform process as rmiot_app. So rmiot_app may INSERT and
-- DELETE grants and permissions (never UPDATE, TRUNCATE, or touch roles).
-- Separation of duties is enforced here, by CHECK constraints, so neither the
-- API nor a direct write can give the policy to anyone but security_admin or
-- the audit log to anyone but auditor/audit_admin.
--
-- Every change NOTIFYs channel rmiot_authz once per statement, at commit:
--   'grant:<subject>'  that subject's grants changed (one per subject)
--   'grant:*'          many subjects changed (more than 64, or TRUNCATE)
--   'permission:*'     the permission table changed
-- Tenant tree changes arrive on rmiot_registry as 'tenant:<id>' (0002).

CREATE TABLE authz_roles (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z][a-z_]{1,39}$'),
    description text NOT NULL
);

INSERT INTO authz_roles (name, description) VALUES
    ('commission_admin',   'health commission: manages the tenant tree, sees regional aggregates'),
    ('commission_analyst', 'health commission: regional aggregates only, de-identified'),
    ('hospital_admin',     'a hospital''s administrator: its devices, staff and departments'),
    ('department_head',    'head of a department: its patients, devices and alarms'),
    ('clinician',          'patients bound to the department or assigned to the clinician'),
    ('patient',            'the patient''s own data only'),
    ('vendor',             'a device vendor: its own models and devices, never patient data'),
    ('hospital_platform',  'a hospital platform (mTLS): pushes data upstream'),
    ('device',             'a device or gateway: ingest only'),
    ('auditor',            'reads the audit log'),
    ('system_admin',       'operates the platform; cannot read or change the audit log or policy'),
    ('security_admin',     'the only role that manages policies and roles'),
    ('audit_admin',        'manages audit retention and auditor accounts; reads the audit log');

CREATE TABLE authz_permissions (
    role    text NOT NULL REFERENCES authz_roles (name),
    object  text NOT NULL CONSTRAINT authz_object_known CHECK (object IN (
                'telemetry', 'aggregate', 'device', 'device_model', 'alarm', 'patient',
                'patient_identity', 'audit', 'policy', 'user', 'tenant', 'command', 'ingest')),
    action  text NOT NULL CONSTRAINT authz_action_known
                CHECK (action IN ('read', 'write', 'manage')),
    PRIMARY KEY (role, object, action),
    CONSTRAINT authz_policy_only_security_admin
        CHECK (object <> 'policy' OR role = 'security_admin'),
    -- Nobody writes audit records through a permission: the platform appends them.
    CONSTRAINT authz_audit_only_auditors
        CHECK (object <> 'audit'
               OR (action = 'read' AND role IN ('auditor', 'audit_admin'))
               OR (action = 'manage' AND role = 'audit_admin'))
);

-- The default rights of each role. Patient data is telemetry, alarm, patient
-- and patient_identity: the commission, vendors, devices and the three
-- administrators get none of it.
INSERT INTO authz_permissions (role, object, action)
SELECT role, object, unnest(actions) FROM (VALUES
    ('commission_admin',   'aggregate',        ARRAY['read']),
    ('commission_admin',   'tenant',           ARRAY['read', 'write', 'manage']),
    ('commission_admin',   'device',           ARRAY['read']),
    ('commission_admin',   'device_model',     ARRAY['read']),
    ('commission_analyst', 'aggregate',        ARRAY['read']),
    ('commission_analyst', 'tenant',           ARRAY['read']),
    ('hospital_admin',     'tenant',           ARRAY['read', 'write']),
    ('hospital_admin',     'user',             ARRAY['read', 'write']),
    ('hospital_admin',     'device',           ARRAY['read', 'write', 'manage']),
    ('hospital_admin',     'device_model',     ARRAY['read']),
    ('hospital_admin',     'command',          ARRAY['read', 'write']),
    ('hospital_admin',     'alarm',            ARRAY['read', 'write']),
    ('hospital_admin',     'telemetry',        ARRAY['read']),
    ('hospital_admin',     'aggregate',        ARRAY['read']),
    ('hospital_admin',     'patient',          ARRAY['read']),
    ('department_head',    'tenant',           ARRAY['read']),
    ('department_head',    'user',             ARRAY['read']),
    ('department_head',    'device',           ARRAY['read', 'write']),
    ('department_head',    'command',          ARRAY['read', 'write']),
    ('department_head',    'alarm',            ARRAY['read', 'write']),
    ('department_head',    'telemetry',        ARRAY['read']),
    ('department_head',    'aggregate',        ARRAY['read']),
    ('department_head',    'patient',          ARRAY['read', 'write']),
    ('department_head',    'patient_identity', ARRAY['read']),
    ('clinician',          'tenant',           ARRAY['read']),
    ('clinician',          'device',           ARRAY['read']),
    ('clinician',          'command',          ARRAY['read', 'write']),
    ('clinician',          'alarm',            ARRAY['read', 'write']),
    ('clinician',          'telemetry',        ARRAY['read']),
    ('clinician',          'patient',          ARRAY['read', 'write']),
    ('clinician',          'patient_identity', ARRAY['read']),
    ('patient',            'telemetry',        ARRAY['read']),
    ('patient',            'alarm',            ARRAY['read']),
    ('patient',            'patient',          ARRAY['read']),
    ('patient',            'patient_identity', ARRAY['read']),
    ('vendor',             'device_model',     ARRAY['read', 'write', 'manage']),
    ('vendor',             'device',           ARRAY['read', 'write']),
    ('hospital_platform',  'ingest',           ARRAY['write']),
    ('hospital_platform',  'device',           ARRAY['read']),
    ('hospital_platform',  'command',          ARRAY['read']),
    ('device',             'ingest',           ARRAY['write']),
    ('device',             'command',          ARRAY['read']),
    ('auditor',            'audit',            ARRAY['read']),
    ('system_admin',       'tenant',           ARRAY['read', 'write', 'manage']),
    ('system_admin',       'user',             ARRAY['read', 'write', 'manage']),
    ('system_admin',       'device',           ARRAY['read', 'write', 'manage']),
    ('system_admin',       'device_model',     ARRAY['read', 'write', 'manage']),
    ('system_admin',       'command',          ARRAY['read']),
    ('system_admin',       'ingest',           ARRAY['manage']),
    ('security_admin',     'policy',           ARRAY['read', 'write', 'manage']),
    ('security_admin',     'user',             ARRAY['read']),
    ('security_admin',     'tenant',           ARRAY['read']),
    ('audit_admin',        'audit',            ARRAY['read', 'manage']),
    ('audit_admin',        'user',             ARRAY['read']),
    ('audit_admin',        'tenant',           ARRAY['read'])
) AS defaults (role, object, actions);

-- Subjects: "<kind>:<name>" (user:alice, cert:hospital-12, device:123). A
-- device holds the device role and nothing else, and only a device holds it,
-- so a stolen device key never opens a person's rights and vice versa.
CREATE TABLE authz_grants (
    subject     text NOT NULL CHECK (subject ~ '^[a-z]+:[^[:space:]]{1,200}$'),
    role        text NOT NULL REFERENCES authz_roles (name),
    tenant_id   integer NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    granted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject, role, tenant_id),
    CONSTRAINT authz_device_role_only_for_devices
        CHECK ((role = 'device') = (subject LIKE 'device:%'))
);
CREATE INDEX authz_grants_tenant ON authz_grants (tenant_id);

-- One notification per statement, not per row: a bulk load of 50,000 grants
-- sends 'grant:*' once instead of 50,000 payloads every process would reload.
CREATE FUNCTION rmiot_authz_notify_grants() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  subjects text[];
  s text;
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    PERFORM pg_notify('rmiot_authz', 'grant:*');
    RETURN NULL;
  ELSIF TG_OP = 'INSERT' THEN
    SELECT array_agg(subject) INTO subjects
      FROM (SELECT DISTINCT subject FROM new_rows LIMIT 65) x;
  ELSIF TG_OP = 'DELETE' THEN
    SELECT array_agg(subject) INTO subjects
      FROM (SELECT DISTINCT subject FROM old_rows LIMIT 65) x;
  ELSE
    SELECT array_agg(subject) INTO subjects
      FROM (SELECT subject FROM new_rows UNION SELECT subject FROM old_rows LIMIT 65) x;
  END IF;
  IF cardinality(subjects) > 64 THEN
    PERFORM pg_notify('rmiot_authz', 'grant:*');
  ELSIF subjects IS NOT NULL THEN
    FOREACH s IN ARRAY subjects LOOP
      PERFORM pg_notify('rmiot_authz', 'grant:' || s);
    END LOOP;
  END IF;
  RETURN NULL;
END
$$;

-- PostgreSQL allows transition tables only on single-event triggers.
CREATE TRIGGER authz_grants_insert AFTER INSERT ON authz_grants
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rmiot_authz_notify_grants();
CREATE TRIGGER authz_grants_update AFTER UPDATE ON authz_grants
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rmiot_authz_notify_grants();
CREATE TRIGGER authz_grants_delete AFTER DELETE ON authz_grants
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rmiot_authz_notify_grants();
CREATE TRIGGER authz_grants_truncate AFTER TRUNCATE ON authz_grants
    FOR EACH STATEMENT EXECUTE FUNCTION rmiot_authz_notify_grants();

-- The permission table is small (about a hundred rows): any change reloads it whole.
CREATE FUNCTION rmiot_authz_notify_permissions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('rmiot_authz', 'permission:*');
  RETURN NULL;
END
$$;

CREATE TRIGGER authz_permissions_notify
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON authz_permissions
    FOR EACH STATEMENT EXECUTE FUNCTION rmiot_authz_notify_permissions();

GRANT SELECT ON authz_roles TO rmiot_app;
GRANT SELECT, INSERT, DELETE ON authz_permissions, authz_grants TO rmiot_app;
