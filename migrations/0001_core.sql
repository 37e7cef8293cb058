-- 0001_core: people and access — users, organizations, memberships, sessions with refresh-token
-- families, API keys, the audit log and notifications.
--
-- Conventions for every migration in this directory:
--   * Each file runs in one transaction that `bgctl migrate` opens (do not write BEGIN/COMMIT) and is
--     immutable once applied: its SHA-256 is recorded, and an edit makes `bgctl migrate` refuse to run.
--     Changes go into a new file.
--   * Ids are uuid (gen_random_uuid(), built into PostgreSQL 13+) except for high-volume append-only
--     tables, which use bigint identities; times are timestamptz; money is bigint minor units.
--   * Soft deletion (deleted_at) where the product deletes things that history still points to.
--   * Secrets (passwords, refresh tokens, API keys, webhook secrets) are stored only as hashes.
--   * Enumerations are text with CHECK constraints: they read well in SQL and in the API, and adding a
--     value is a one-line migration.

-- Keeps updated_at current on every UPDATE, so callers cannot forget it.
CREATE FUNCTION bg_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END
$$;

-- Refuses the operation that fired it: attached to append-only and immutable tables (the ledger,
-- prompt versions, the audit log). restrict_violation (23001) is an integrity error, so clients map it
-- to "invalid", not to "database down".
CREATE FUNCTION bg_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% on % is not allowed: the table is append-only', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation',
              HINT = 'record a correction as a new row instead';
END
$$;

-- People who sign in. email is NULL only for accounts created from another channel (a Telegram user
-- who never registered on the web); such accounts cannot have a password.
CREATE TABLE users (
    id               uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email            text CHECK (length(email) BETWEEN 3 AND 254 AND position('@' IN email) > 1),
    password_hash    text CHECK (password_hash LIKE '$argon2id$%'),  -- libsodium crypto_pwhash_str
    name             text NOT NULL DEFAULT '' CHECK (length(name) <= 200),
    role             text NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    status           text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    locale           text NOT NULL DEFAULT 'en' CHECK (locale ~ '^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$'),
    email_verified_at timestamptz,
    last_login_at    timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    deleted_at       timestamptz,  -- soft delete: the row stays for usage, ledger and audit history
    CONSTRAINT users_password_needs_email CHECK (password_hash IS NULL OR email IS NOT NULL)
);
COMMENT ON TABLE users IS 'People who use the product; soft-deleted through deleted_at.';
-- Login and registration look users up by email, case-insensitively: store the address as typed, match
-- on lower(email) (queries must use lower(email) = lower($1) to hit this index). A deleted account
-- frees its address for a new registration.
CREATE UNIQUE INDEX users_email_key ON users (lower(email)) WHERE deleted_at IS NULL;
-- Admin listing, newest first, keyset-paginated on (created_at, id).
CREATE INDEX users_created_idx ON users (created_at DESC, id DESC);
CREATE TRIGGER users_touch BEFORE UPDATE ON users
    FOR EACH ROW EXECUTE FUNCTION bg_touch_updated_at();

-- Workspaces that own agents, prompts and (optionally) billing. Every user gets a personal one.
CREATE TABLE organizations (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    personal   boolean NOT NULL DEFAULT false,
    owner_id   uuid NOT NULL REFERENCES users (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    deleted_at timestamptz
);
COMMENT ON TABLE organizations IS 'Workspaces; personal = the one created with each user.';
CREATE UNIQUE INDEX organizations_personal_key ON organizations (owner_id) WHERE personal;
CREATE INDEX organizations_owner_idx ON organizations (owner_id);
CREATE TRIGGER organizations_touch BEFORE UPDATE ON organizations
    FOR EACH ROW EXECUTE FUNCTION bg_touch_updated_at();

CREATE TABLE memberships (
    organization_id uuid NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    role            text NOT NULL CHECK (role IN ('owner', 'admin', 'member')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, user_id)
);
COMMENT ON TABLE memberships IS 'Who belongs to which organization, with which role.';
-- "Which organizations am I in?" (the primary key serves "who is in this organization?").
CREATE INDEX memberships_user_idx ON memberships (user_id);

-- A sign-in: one family of refresh tokens. Each refresh rotates the token (the old one gets used_at);
-- presenting a token that was already used means it was stolen or replayed, and the whole family is
-- revoked (revoked_reason 'reuse_detected'), signing out both the thief and the victim.
CREATE TABLE auth_sessions (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),  -- the family id
    user_id        uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    user_agent     text CHECK (length(user_agent) <= 512),
    ip             inet,
    created_at     timestamptz NOT NULL DEFAULT now(),
    last_used_at   timestamptz,
    expires_at     timestamptz NOT NULL,  -- absolute end of the family, whatever the rotations
    revoked_at     timestamptz,
    revoked_reason text CHECK (revoked_reason IN
                       ('logout', 'reuse_detected', 'admin', 'password_changed', 'user_disabled')),
    CHECK ((revoked_at IS NULL) = (revoked_reason IS NULL))
);
COMMENT ON TABLE auth_sessions IS 'Sign-ins; each is a family of rotating refresh tokens.';
-- Revoking every live session of a user (logout everywhere, password change, account disabled).
CREATE INDEX auth_sessions_user_idx ON auth_sessions (user_id) WHERE revoked_at IS NULL;
-- Purging expired families.
CREATE INDEX auth_sessions_expires_idx ON auth_sessions (expires_at);

CREATE TABLE refresh_tokens (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    session_id uuid NOT NULL REFERENCES auth_sessions (id) ON DELETE CASCADE,
    token_hash text NOT NULL UNIQUE CHECK (token_hash ~ '^[0-9a-f]{64}$'),  -- SHA-256 hex of the token
    parent_id  uuid REFERENCES refresh_tokens (id) ON DELETE CASCADE,  -- the token this one replaced
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz,  -- set when rotated; a second use is reuse
    revoked_at timestamptz
);
COMMENT ON TABLE refresh_tokens IS 'Refresh tokens, stored as SHA-256; rotated on every use.';
CREATE INDEX refresh_tokens_session_idx ON refresh_tokens (session_id);

-- Keys for the OpenAI-compatible API. The key is shown once; only its SHA-256 is kept, with a short
-- prefix so that a user can tell keys apart in a list.
CREATE TABLE api_keys (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    organization_id uuid REFERENCES organizations (id) ON DELETE CASCADE,
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    prefix          text NOT NULL CHECK (length(prefix) BETWEEN 4 AND 32),
    key_hash        text NOT NULL UNIQUE CHECK (key_hash ~ '^[0-9a-f]{64}$'),
    scopes          text[] NOT NULL DEFAULT '{}',
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_used_at    timestamptz,
    expires_at      timestamptz,
    revoked_at      timestamptz
);
COMMENT ON TABLE api_keys IS 'API keys by SHA-256; looked up by key_hash on every API request.';
CREATE INDEX api_keys_user_idx ON api_keys (user_id, created_at DESC);

-- Who did what: admin actions, security events (logins, reuse detection), billing changes. Rows are
-- never updated; old rows may be deleted by retention jobs.
CREATE TABLE audit_log (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at     timestamptz NOT NULL DEFAULT now(),
    actor_kind      text NOT NULL CHECK (actor_kind IN ('user', 'admin', 'system', 'api_key', 'webhook')),
    actor_id        uuid,  -- no foreign key: the log outlives what it mentions
    action          text NOT NULL CHECK (action ~ '^[a-z][a-z0-9_.]{0,63}$'),  -- 'user.create'
    target_type     text,
    target_id       text,
    organization_id uuid,
    request_id      text,
    ip              inet,
    details         jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(details) = 'object')
);
COMMENT ON TABLE audit_log IS 'Append-only record of security-relevant and administrative actions.';
CREATE INDEX audit_log_time_idx ON audit_log (occurred_at DESC);
CREATE INDEX audit_log_actor_idx ON audit_log (actor_id, occurred_at DESC);
CREATE INDEX audit_log_target_idx ON audit_log (target_type, target_id, occurred_at DESC);
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION bg_refuse_change();

-- Messages to people (payment receipts, trial ending, quota low). dedupe_key makes each one happen
-- once however many times the event behind it is delivered ('trial_ending:<subscription>:<date>').
CREATE TABLE notifications (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id    uuid REFERENCES users (id) ON DELETE CASCADE,
    channel    text NOT NULL CHECK (channel IN ('email', 'telegram', 'web')),
    kind       text NOT NULL CHECK (kind ~ '^[a-z][a-z0-9_.]{0,63}$'),
    dedupe_key text NOT NULL UNIQUE CHECK (length(dedupe_key) BETWEEN 1 AND 200),
    locale     text NOT NULL DEFAULT 'en',
    payload    jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(payload) = 'object'),
    status     text NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'skipped')),
    attempts   integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    last_error text,
    send_after timestamptz NOT NULL DEFAULT now(),
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at    timestamptz,
    read_at    timestamptz  -- web notifications: when the user saw it
);
COMMENT ON TABLE notifications IS 'Outgoing notifications, each sent once (unique dedupe_key).';
-- The sender's queue: due, unsent notifications in order.
CREATE INDEX notifications_due_idx ON notifications (send_after) WHERE status = 'pending';
CREATE INDEX notifications_user_idx ON notifications (user_id, created_at DESC);
