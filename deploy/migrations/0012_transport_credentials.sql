-- Device transport credentials: a user name and password per device for the
-- transports that carry a login of their own (MQTT CONNECT, HTTP Basic, the
-- CoAP query), so a device without HMAC still cannot speak for another one.
-- registry/transport_credentials.py is the code side of this table.
--
-- The password is a random 32-byte token shown once when issued; only its
-- hash is kept, in Mosquitto's PBKDF2-SHA512 format
-- ($7$<iterations>$<salt base64>$<hash base64>), so the same string goes into
-- the broker's password file and serves the platform's own HTTP/CoAP checks.
-- A device may hold several credentials (a new one before the old is revoked);
-- revoking keeps the row, for the record.

CREATE TABLE transport_credentials (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id      bigint NOT NULL REFERENCES devices (id),
    -- Letters, digits, . _ - only: no ':' (Mosquitto's password file and
    -- HTTP Basic both split on it) and nothing an ACL file would misread.
    username       text NOT NULL UNIQUE CHECK (username ~ '^[A-Za-z0-9._-]{1,64}$'),
    password_hash  text NOT NULL
                       CHECK (password_hash ~ '^\$7\$[0-9]+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+$'),
    created_at     timestamptz NOT NULL DEFAULT now(),
    revoked_at     timestamptz
);
CREATE INDEX transport_credentials_device ON transport_credentials (device_id);

-- Changes are announced on rmiot_transport_credentials, one notification per
-- statement: the user names changed ('login:<username>'), or 'login:*' for
-- more than 64 (a bulk issue) or a TRUNCATE. The ingest processes' login view
-- and the broker's password and ACL files follow it.
CREATE FUNCTION rmiot_notify_transport_credentials() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  names text[];
  n text;
BEGIN
  IF TG_OP = 'TRUNCATE' THEN
    PERFORM pg_notify('rmiot_transport_credentials', 'login:*');
    RETURN NULL;
  ELSIF TG_OP = 'INSERT' THEN
    SELECT array_agg(username) INTO names FROM (SELECT username FROM new_rows LIMIT 65) x;
  ELSIF TG_OP = 'DELETE' THEN
    SELECT array_agg(username) INTO names FROM (SELECT username FROM old_rows LIMIT 65) x;
  ELSE
    SELECT array_agg(username) INTO names
      FROM (SELECT username FROM new_rows UNION SELECT username FROM old_rows LIMIT 65) x;
  END IF;
  IF cardinality(names) > 64 THEN
    PERFORM pg_notify('rmiot_transport_credentials', 'login:*');
  ELSIF names IS NOT NULL THEN
    FOREACH n IN ARRAY names LOOP
      PERFORM pg_notify('rmiot_transport_credentials', 'login:' || n);
    END LOOP;
  END IF;
  RETURN NULL;
END
$$;

-- PostgreSQL allows transition tables only on single-event triggers.
CREATE TRIGGER transport_credentials_insert AFTER INSERT ON transport_credentials
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rmiot_notify_transport_credentials();
CREATE TRIGGER transport_credentials_update AFTER UPDATE ON transport_credentials
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rmiot_notify_transport_credentials();
CREATE TRIGGER transport_credentials_delete AFTER DELETE ON transport_credentials
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION rmiot_notify_transport_credentials();
CREATE TRIGGER transport_credentials_truncate AFTER TRUNCATE ON transport_credentials
    FOR EACH STATEMENT EXECUTE FUNCTION rmiot_notify_transport_credentials();

-- Issue and revoke, never delete: the row says which login a device had when.
GRANT SELECT, INSERT, UPDATE ON transport_credentials TO rmiot_app;
