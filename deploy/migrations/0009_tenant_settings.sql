-- Tenant settings are inherited down the tree: a key set on a node applies to
-- its whole subtree unless a descendant sets it again (tenants/settings.py
-- validates the keys). rmiot_tenant_setting(id, key) is the effective value.

CREATE FUNCTION rmiot_tenant_setting(tenant integer, setting text) RETURNS jsonb
LANGUAGE sql STABLE AS $$
    SELECT a.settings -> setting
      FROM tenants t JOIN tenants a ON a.id = ANY (t.path)
     WHERE t.id = tenant AND a.settings ? setting
     ORDER BY cardinality(a.path) DESC
     LIMIT 1
$$;

-- The device quota (max_devices), checked once per statement so a bulk import
-- of 100,000 devices costs one count per tenant, not one per row.
CREATE FUNCTION rmiot_check_device_quota() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    over record;
BEGIN
    SELECT n.tenant_id, q.quota, count(d.*) AS devices INTO over
      FROM (SELECT DISTINCT tenant_id FROM new_devices) n
      CROSS JOIN LATERAL (SELECT (rmiot_tenant_setting(n.tenant_id, 'max_devices'))::int
                          AS quota) q
      JOIN devices d ON d.tenant_id = n.tenant_id
     WHERE q.quota IS NOT NULL
     GROUP BY n.tenant_id, q.quota
    HAVING count(d.*) > q.quota
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'tenant % is over its device quota (% devices, max_devices %)',
            over.tenant_id, over.devices, over.quota USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER devices_quota AFTER INSERT ON devices
    REFERENCING NEW TABLE AS new_devices
    FOR EACH STATEMENT EXECUTE FUNCTION rmiot_check_device_quota();
-- (A column list cannot go with a transition table, so every UPDATE statement
-- checks the tenants it touched: one indexed count each.)
CREATE TRIGGER devices_quota_move AFTER UPDATE ON devices
    REFERENCING NEW TABLE AS new_devices
    FOR EACH STATEMENT EXECUTE FUNCTION rmiot_check_device_quota();
