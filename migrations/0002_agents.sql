-- 0002_agents: prompts with immutable versions, agents, conversations and their messages, the
-- Telegram channel (bots, accounts, chats) and the rules of the policy engine.

-- A prompt is a named, versioned system prompt. Its text lives in prompt_versions; current_version is
-- the one agents use unless they pin another.
CREATE TABLE prompts (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid REFERENCES organizations (id),  -- NULL: a system prompt for everyone
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description     text NOT NULL DEFAULT '' CHECK (length(description) <= 2000),
    current_version integer,
    created_by      uuid REFERENCES users (id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz
);
COMMENT ON TABLE prompts IS 'Named prompts; the text of each version is in prompt_versions.';
CREATE INDEX prompts_org_idx ON prompts (organization_id) WHERE deleted_at IS NULL;
CREATE TRIGGER prompts_touch BEFORE UPDATE ON prompts
    FOR EACH ROW EXECUTE FUNCTION bg_touch_updated_at();

-- Immutable versions: a conversation or a usage record that names (prompt, version) can always be
-- reproduced. A change is a new version; the trigger below refuses UPDATE and DELETE.
CREATE TABLE prompt_versions (
    prompt_id  uuid NOT NULL REFERENCES prompts (id),
    version    integer NOT NULL CHECK (version >= 1),
    template   text NOT NULL CHECK (length(template) <= 100000),  -- with {{variable}} placeholders
    variables  jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(variables) = 'object'),  -- name → default
    model      text,  -- overrides the agent's model when set
    params     jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(params) = 'object'),  -- temperature, …
    note       text NOT NULL DEFAULT '',
    created_by uuid REFERENCES users (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (prompt_id, version)
);
COMMENT ON TABLE prompt_versions IS 'Immutable prompt texts; UPDATE and DELETE are refused.';
CREATE TRIGGER prompt_versions_immutable BEFORE UPDATE OR DELETE ON prompt_versions
    FOR EACH ROW EXECUTE FUNCTION bg_refuse_change();
CREATE TRIGGER prompt_versions_no_truncate BEFORE TRUNCATE ON prompt_versions
    FOR EACH STATEMENT EXECUTE FUNCTION bg_refuse_change();
-- Deferred so that a prompt and its first version can be inserted in either order in one transaction.
ALTER TABLE prompts ADD CONSTRAINT prompts_current_version_fkey
    FOREIGN KEY (id, current_version) REFERENCES prompt_versions (prompt_id, version)
    DEFERRABLE INITIALLY DEFERRED;

-- An agent: what a user chats with — a prompt, a model and its parameters.
CREATE TABLE agents (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id uuid REFERENCES organizations (id),  -- NULL: a system agent
    slug            text NOT NULL CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description     text NOT NULL DEFAULT '' CHECK (length(description) <= 2000),
    model           text NOT NULL DEFAULT '',  -- '' means the deployment's BG_LLM_MODEL
    prompt_id       uuid REFERENCES prompts (id),
    prompt_version  integer,  -- pinned version; NULL follows prompts.current_version
    params          jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(params) = 'object'),
    visibility      text NOT NULL DEFAULT 'private'
                        CHECK (visibility IN ('private', 'organization', 'public')),
    status          text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    created_by      uuid REFERENCES users (id),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz,
    FOREIGN KEY (prompt_id, prompt_version) REFERENCES prompt_versions (prompt_id, version),
    CHECK (prompt_version IS NULL OR prompt_id IS NOT NULL)
);
COMMENT ON TABLE agents IS 'LLM agents: prompt + model + parameters; organization NULL = system.';
-- Slugs are unique per organization, and among system agents (NULLS NOT DISTINCT).
CREATE UNIQUE INDEX agents_slug_key ON agents (organization_id, slug) NULLS NOT DISTINCT
    WHERE deleted_at IS NULL;
-- GET /agents: the public ones plus the caller's organizations'.
CREATE INDEX agents_visible_idx ON agents (visibility, organization_id) WHERE deleted_at IS NULL;
CREATE TRIGGER agents_touch BEFORE UPDATE ON agents
    FOR EACH ROW EXECUTE FUNCTION bg_touch_updated_at();

CREATE TABLE conversations (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    organization_id uuid REFERENCES organizations (id),
    agent_id        uuid NOT NULL REFERENCES agents (id),
    channel         text NOT NULL CHECK (channel IN ('web', 'telegram', 'api')),
    title           text NOT NULL DEFAULT '' CHECK (length(title) <= 200),
    prompt_id       uuid,     -- the prompt version in force when the conversation began
    prompt_version  integer,
    message_count   integer NOT NULL DEFAULT 0 CHECK (message_count >= 0),
    last_message_at timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz,
    FOREIGN KEY (prompt_id, prompt_version) REFERENCES prompt_versions (prompt_id, version)
);
COMMENT ON TABLE conversations IS 'Chats between a user and an agent, on one channel.';
-- A user's conversation list, most recently active first, keyset-paginated.
CREATE INDEX conversations_user_idx ON conversations (user_id, updated_at DESC, id DESC)
    WHERE deleted_at IS NULL;
CREATE TRIGGER conversations_touch BEFORE UPDATE ON conversations
    FOR EACH ROW EXECUTE FUNCTION bg_touch_updated_at();

-- Messages in order of id within a conversation. job_id ties a message to the job that produced it
-- (or that it started), so a redelivered job writes its reply once.
CREATE TABLE messages (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    conversation_id   uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    role              text NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
    content           text NOT NULL CHECK (length(content) <= 200000),
    status            text NOT NULL DEFAULT 'complete'
                          CHECK (status IN ('pending', 'streaming', 'complete', 'failed', 'canceled')),
    job_id            text,
    request_id        text,
    model             text,
    prompt_tokens     integer CHECK (prompt_tokens >= 0),
    completion_tokens integer CHECK (completion_tokens >= 0),
    error_class       text,
    created_at        timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE messages IS 'Conversation history; the assistant reply is unique per (job_id, role).';
-- History of a conversation (the last N messages for the prompt, pages for the client).
CREATE INDEX messages_conversation_idx ON messages (conversation_id, id);
CREATE UNIQUE INDEX messages_job_key ON messages (job_id, role) WHERE job_id IS NOT NULL;

-- Telegram bots served by this deployment. The token is a credential: never log it nor return it
-- from the API. Telegram echoes webhook_secret in X-Telegram-Bot-Api-Secret-Token; only its SHA-256
-- is kept and compared in constant time.
CREATE TABLE telegram_bots (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    organization_id     uuid REFERENCES organizations (id),
    agent_id            uuid NOT NULL REFERENCES agents (id),
    slug                text NOT NULL UNIQUE CHECK (slug ~ '^[A-Za-z0-9_-]{1,64}$'),  -- /webhooks/telegram/{slug}
    telegram_bot_id     bigint UNIQUE,  -- from getMe
    username            text,
    token               text NOT NULL,
    webhook_secret_hash text NOT NULL CHECK (webhook_secret_hash ~ '^[0-9a-f]{64}$'),
    status              text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'disabled')),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE telegram_bots IS 'Bots and the agent each serves; token is secret.';
CREATE TRIGGER telegram_bots_touch BEFORE UPDATE ON telegram_bots
    FOR EACH ROW EXECUTE FUNCTION bg_touch_updated_at();

-- A Telegram user, linked to one of our users (created on first contact or linked from the web).
CREATE TABLE telegram_accounts (
    telegram_user_id bigint PRIMARY KEY,
    user_id          uuid NOT NULL UNIQUE REFERENCES users (id) ON DELETE CASCADE,
    username         text,
    first_name       text,
    last_name        text,
    language_code    text,  -- Telegram's hint for the user's locale
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE telegram_accounts IS 'Telegram identities ↔ users (one to one).';
CREATE TRIGGER telegram_accounts_touch BEFORE UPDATE ON telegram_accounts
    FOR EACH ROW EXECUTE FUNCTION bg_touch_updated_at();

-- A chat between a bot and a Telegram user or group, with the conversation it currently continues.
CREATE TABLE telegram_chats (
    bot_id           uuid NOT NULL REFERENCES telegram_bots (id) ON DELETE CASCADE,
    chat_id          bigint NOT NULL,
    type             text NOT NULL CHECK (type IN ('private', 'group', 'supergroup', 'channel')),
    telegram_user_id bigint REFERENCES telegram_accounts (telegram_user_id) ON DELETE SET NULL,
    conversation_id  uuid REFERENCES conversations (id) ON DELETE SET NULL,
    title            text,
    last_update_id   bigint,       -- highest update handled, a second guard against redelivery
    blocked_at       timestamptz,  -- the user blocked the bot (Telegram answered 403)
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bot_id, chat_id)
);
COMMENT ON TABLE telegram_chats IS 'Chats of each bot and the conversation each continues.';
CREATE INDEX telegram_chats_user_idx ON telegram_chats (telegram_user_id);
CREATE TRIGGER telegram_chats_touch BEFORE UPDATE ON telegram_chats
    FOR EACH ROW EXECUTE FUNCTION bg_touch_updated_at();

-- Rules of the policy engine. The engine loads the enabled rules that apply to a request (global, the
-- user's plan, organization and user) and, per type, lets the highest priority win; body holds the
-- type's parameters, e.g. {"limit": 20, "window_s": 60} for rate_limit, {"flag": "x", "on": true}.
CREATE TABLE policy_rules (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    type       text NOT NULL CHECK (type IN ('rate_limit', 'quota', 'resource_access', 'feature_flag')),
    scope      text NOT NULL CHECK (scope IN ('global', 'plan', 'organization', 'user')),
    scope_id   text,  -- plan id, or organization/user uuid as text; NULL for global
    name       text NOT NULL DEFAULT '' CHECK (length(name) <= 200),
    body       jsonb NOT NULL CHECK (jsonb_typeof(body) = 'object'),
    priority   integer NOT NULL DEFAULT 0,
    enabled    boolean NOT NULL DEFAULT true,
    created_by uuid REFERENCES users (id),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((scope = 'global') = (scope_id IS NULL))
);
COMMENT ON TABLE policy_rules IS 'Rate limits, quotas, resource access and feature flags by scope.';
CREATE INDEX policy_rules_lookup_idx ON policy_rules (scope, scope_id, type, priority DESC)
    WHERE enabled;
CREATE TRIGGER policy_rules_touch BEFORE UPDATE ON policy_rules
    FOR EACH ROW EXECUTE FUNCTION bg_touch_updated_at();

-- Processes that cache rules LISTEN on bg_policy_rules and reload when told.
CREATE FUNCTION bg_policy_rules_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('bg_policy_rules', TG_OP);
    RETURN NULL;
END
$$;
CREATE TRIGGER policy_rules_notify AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON policy_rules
    FOR EACH STATEMENT EXECUTE FUNCTION bg_policy_rules_notify();
