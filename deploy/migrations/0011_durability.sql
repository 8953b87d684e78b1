-- Data destruction with two-person approval (standard 9.3 h; deploy/destroy.py).
--
-- One security administrator requests the destruction of a tenant's, a
-- patient's or a device's data, with a reason; another approves it, which
-- executes it. The table is the record of both people and of what was removed
-- (outcome); the audit chain records the same acts. The constraints hold
-- whoever writes: nobody approves their own request, nothing is executed
-- unapproved, a request is approved and executed once.
--
-- Only the administrator's connection writes here (the CLI); the platform's
-- role may read, for the auditors' and dashboards' views.

CREATE TABLE destruction_requests (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    target_kind   text NOT NULL CHECK (target_kind IN ('tenant', 'patient', 'device')),
    target_id     bigint NOT NULL CHECK (target_id > 0),
    tenant_id     integer NOT NULL,   -- the target's tenant when requested: the approvers' scope
    reason        text NOT NULL CHECK (length(btrim(reason)) BETWEEN 3 AND 1000),
    requested_by  text NOT NULL,      -- "user:<name>"
    requested_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    approved_by   text,
    approved_at   timestamptz,
    executed_at   timestamptz,
    outcome       jsonb,              -- what was removed, counted; keys shredded
    CHECK (expires_at > requested_at),
    CONSTRAINT destruction_two_people CHECK (approved_by IS NULL OR approved_by <> requested_by),
    CHECK ((approved_by IS NULL) = (approved_at IS NULL)),
    CHECK (executed_at IS NULL OR approved_at IS NOT NULL)
);
CREATE INDEX destruction_requests_target ON destruction_requests (target_kind, target_id);

-- Once approved, a request's who, what and why are fixed.
CREATE FUNCTION rmiot_destruction_request_fixed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF (OLD.target_kind, OLD.target_id, OLD.tenant_id, OLD.reason, OLD.requested_by,
      OLD.requested_at) IS DISTINCT FROM
     (NEW.target_kind, NEW.target_id, NEW.tenant_id, NEW.reason, NEW.requested_by,
      NEW.requested_at)
     OR (OLD.approved_by IS NOT NULL AND NEW.approved_by IS DISTINCT FROM OLD.approved_by)
     OR (OLD.executed_at IS NOT NULL AND NEW.executed_at IS DISTINCT FROM OLD.executed_at) THEN
    RAISE EXCEPTION 'destruction request %: who, what and why cannot change once made',
        OLD.id USING ERRCODE = 'check_violation';
  END IF;
  RETURN NEW;
END
$$;

CREATE TRIGGER destruction_requests_fixed BEFORE UPDATE ON destruction_requests
    FOR EACH ROW EXECUTE FUNCTION rmiot_destruction_request_fixed();

REVOKE ALL ON destruction_requests FROM rmiot_app;
GRANT SELECT ON destruction_requests TO rmiot_app;
