-- The registry's changes are announced on channel rmiot_registry so every
-- ingest process refreshes its in-memory device view within a second.
-- Payloads: 'device:<id>' or 'tenant:<id>'. Notifications are sent at commit.

CREATE FUNCTION rmiot_notify_device() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('rmiot_registry', 'device:' || coalesce(NEW.id, OLD.id));
  RETURN NULL;
END
$$;

CREATE FUNCTION rmiot_notify_device_key() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('rmiot_registry', 'device:' || coalesce(NEW.device_id, OLD.device_id));
  RETURN NULL;
END
$$;

CREATE FUNCTION rmiot_notify_tenant() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('rmiot_registry', 'tenant:' || coalesce(NEW.id, OLD.id));
  RETURN NULL;
END
$$;

CREATE TRIGGER devices_notify AFTER INSERT OR UPDATE OR DELETE ON devices
    FOR EACH ROW EXECUTE FUNCTION rmiot_notify_device();
CREATE TRIGGER device_keys_notify AFTER INSERT OR UPDATE OR DELETE ON device_keys
    FOR EACH ROW EXECUTE FUNCTION rmiot_notify_device_key();
CREATE TRIGGER tenants_notify AFTER INSERT OR UPDATE OR DELETE ON tenants
    FOR EACH ROW EXECUTE FUNCTION rmiot_notify_tenant();
