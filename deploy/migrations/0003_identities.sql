-- Identities of people: users with passwords (PBKDF2-HMAC-SM3), lockout,
-- forced password change, TOTP second factor, and server-side sessions.
-- Roles are not here: they are authorisation policy (migration 0005).

CREATE TABLE users (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username            text NOT NULL UNIQUE CHECK (username ~ '^[a-z0-9][a-z0-9._-]{1,63}$'),
    display_name        text NOT NULL DEFAULT '',
    tenant_id           integer REFERENCES tenants (id),  -- home tenant
    password_hash       text NOT NULL,       -- pbkdf2-sm3$<iterations>$<salt>$<hash> (base64)
    password_changed_at timestamptz NOT NULL DEFAULT now(),
    must_change_password boolean NOT NULL DEFAULT true,   -- set by an administrator's reset
    failed_logins       integer NOT NULL DEFAULT 0,
    locked_until        timestamptz,
    totp_secret_enc     bytea,               -- SM4-GCM sealed, bound to the user id
    enabled             boolean NOT NULL DEFAULT true,
    created_at          timestamptz NOT NULL DEFAULT now()
);

-- A session is found by the SM3 hash of its token: a copy of this table does
-- not give anyone a usable token. One active session per user.
CREATE TABLE sessions (
    token_hash  bytea PRIMARY KEY,
    user_id     bigint NOT NULL REFERENCES users (id),
    source      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    ended_at    timestamptz,
    end_reason  text            -- logout, replaced, idle, locked, disabled
);
CREATE UNIQUE INDEX sessions_one_active ON sessions (user_id) WHERE ended_at IS NULL;

GRANT SELECT, INSERT, UPDATE ON users, sessions TO rmiot_app;
