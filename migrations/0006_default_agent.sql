-- 0006_default_agent: what agents and prompt versions need beyond 0002 (structured prompt
-- definitions, provider, memory policy, response caching, channels), and the ready agent
-- "assistant" that a fresh installation serves, so a new user can chat at once.

-- The structured prompt (shared/include/bg/prompt.h has its JSON schema): system template, examples,
-- user template and typed variables. template keeps the system template and variables the defaults
-- (name → value), so both old columns stay meaningful; definition is what rendering reads. A row
-- without one (written before this migration) reads as {"system": template} with string variables
-- taking their defaults from variables. Adding a nullable column rewrites no row, so the immutability
-- trigger is not involved.
ALTER TABLE prompt_versions
    ADD COLUMN definition jsonb CHECK (definition IS NULL OR (jsonb_typeof(definition) = 'object'
                                       AND jsonb_typeof(definition -> 'system') = 'string'));
COMMENT ON COLUMN prompt_versions.definition IS
    'Structured prompt (system, examples, user, variables); NULL for rows older than 0006.';

-- provider: '' means the deployment's provider (BG_LLM_BASE_URL), like model '' means BG_LLM_MODEL.
-- params (0002) holds {"temperature": 0..2, "max_tokens": 1..}.
-- memory: how much of the conversation the prompt carries, {"last_turns": 0..1000} or
-- {"token_budget": 1..10000000}, exactly one of them.
-- cache_enabled, cache_ttl_s: replies to identical rendered prompts may be served from a cache for
-- that long.
-- channels: where the agent may be used; a Telegram bot serves it through telegram_bots.agent_id.
-- Who may use it is decided by resource_access rules of the policy engine (policy_rules).
ALTER TABLE agents
    ADD COLUMN provider text NOT NULL DEFAULT '' CHECK (provider ~ '^[a-z0-9_.-]{0,64}$'),
    ADD COLUMN memory jsonb NOT NULL DEFAULT '{"last_turns": 20}' CHECK (
        jsonb_typeof(memory) = 'object'
        AND memory - 'last_turns' - 'token_budget' = '{}'::jsonb
        AND (memory ? 'last_turns') <> (memory ? 'token_budget')
        AND CASE WHEN jsonb_typeof(memory -> 'last_turns') = 'number'
                     THEN (memory ->> 'last_turns')::numeric BETWEEN 0 AND 1000
                 WHEN jsonb_typeof(memory -> 'token_budget') = 'number'
                     THEN (memory ->> 'token_budget')::numeric BETWEEN 1 AND 10000000
                 ELSE false END),
    ADD COLUMN cache_enabled boolean NOT NULL DEFAULT false,
    ADD COLUMN cache_ttl_s integer NOT NULL DEFAULT 3600 CHECK (cache_ttl_s BETWEEN 1 AND 2592000),
    ADD COLUMN channels text[] NOT NULL DEFAULT '{web}'
        CHECK (channels <@ ARRAY['web', 'telegram', 'api']::text[]);

-- The ready agent. Fixed ids keep this idempotent and let operators and tests name it; ON CONFLICT
-- DO NOTHING leaves an "assistant" that already exists alone. The prompt row names version 1 as
-- current before the version exists: that foreign key is deferred to the end of the transaction.
INSERT INTO prompts (id, organization_id, name, description, current_version)
VALUES ('00000000-0000-4000-8000-00000000a551', NULL, 'assistant',
        'The system prompt of the default agent.', 1)
ON CONFLICT DO NOTHING;

INSERT INTO prompt_versions (prompt_id, version, template, variables, definition, note)
VALUES ('00000000-0000-4000-8000-00000000a551', 1,
        'You are Assistant, a helpful, friendly and precise assistant. '
        || 'The user''s name is {{builtin.user_name}}; address them by name when it fits, and '
        || 'never invent a name when it is empty. '
        || 'Answer in the language the user writes in; when that is unclear, answer in the '
        || 'language of the locale {{builtin.locale}}. '
        || 'Today is {{builtin.date}} (UTC). Be concise, say so when you are not sure, and use '
        || 'Markdown only where it helps.',
        '{}',
        jsonb_build_object(
            'system',
            'You are Assistant, a helpful, friendly and precise assistant. '
            || 'The user''s name is {{builtin.user_name}}; address them by name when it fits, and '
            || 'never invent a name when it is empty. '
            || 'Answer in the language the user writes in; when that is unclear, answer in the '
            || 'language of the locale {{builtin.locale}}. '
            || 'Today is {{builtin.date}} (UTC). Be concise, say so when you are not sure, and use '
            || 'Markdown only where it helps.',
            'examples', '[]'::jsonb,
            'variables', '[]'::jsonb),
        'initial version')
ON CONFLICT DO NOTHING;

INSERT INTO agents (id, organization_id, slug, name, description, prompt_id, prompt_version,
                    params, visibility, status, memory, cache_enabled, channels)
VALUES ('00000000-0000-4000-8000-00000000a550', NULL, 'assistant', 'Assistant',
        'A helpful general-purpose assistant that answers in your language.',
        '00000000-0000-4000-8000-00000000a551', NULL,
        '{"temperature": 0.7, "max_tokens": 1024}', 'public', 'active',
        '{"last_turns": 20}', false, ARRAY['web'])
ON CONFLICT DO NOTHING;
