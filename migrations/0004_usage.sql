-- 0004_usage: one row per LLM request (written exactly once by the usage worker) and the daily rollups
-- that /billing/usage and /admin/stats read.

CREATE TABLE usage_records (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id        text NOT NULL UNIQUE CHECK (length(request_id) BETWEEN 1 AND 200),  -- the job id
    user_id           uuid NOT NULL REFERENCES users (id),
    organization_id   uuid,
    agent_id          uuid,
    conversation_id   uuid,
    api_key_id        uuid,
    channel           text NOT NULL CHECK (channel IN ('web', 'telegram', 'api')),
    model             text NOT NULL DEFAULT '',
    prompt_tokens     integer NOT NULL DEFAULT 0 CHECK (prompt_tokens >= 0),
    completion_tokens integer NOT NULL DEFAULT 0 CHECK (completion_tokens >= 0),
    token_source      text NOT NULL CHECK (token_source IN ('provider', 'estimated')),
    latency_ms        integer CHECK (latency_ms >= 0),  -- request start to last token
    ttft_ms           integer CHECK (ttft_ms >= 0),     -- time to first token
    status            text NOT NULL CHECK (status IN ('ok', 'error', 'canceled', 'timeout')),
    error_class       text,  -- 'provider_5xx', 'provider_429', 'timeout', … when status <> 'ok'
    cache_hit         boolean NOT NULL DEFAULT false,
    requests_charged  integer NOT NULL DEFAULT 1 CHECK (requests_charged >= 0),  -- 0: refunded
    created_at        timestamptz NOT NULL DEFAULT now(),
    CHECK ((status = 'ok') = (error_class IS NULL))
);
COMMENT ON TABLE usage_records IS 'One row per request, unique request_id (exactly-once usage).';
-- A user's usage over time (/billing/usage), and the admin's time-range scans.
CREATE INDEX usage_records_user_idx ON usage_records (user_id, created_at DESC);
CREATE INDEX usage_records_org_idx ON usage_records (organization_id, created_at DESC)
    WHERE organization_id IS NOT NULL;
CREATE INDEX usage_records_time_idx ON usage_records USING brin (created_at);

-- Per day (UTC), user, organization, agent, channel and model. Kept current by the trigger below,
-- in the same transaction as the record, so the rollup can never count a request twice or miss one.
CREATE TABLE usage_daily (
    day               date NOT NULL,
    user_id           uuid NOT NULL,
    organization_id   uuid,
    agent_id          uuid,
    channel           text NOT NULL,
    model             text NOT NULL,
    requests          bigint NOT NULL DEFAULT 0,
    errors            bigint NOT NULL DEFAULT 0,
    requests_charged  bigint NOT NULL DEFAULT 0,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    estimated_tokens  bigint NOT NULL DEFAULT 0,  -- part of the tokens that were estimated
    cache_hits        bigint NOT NULL DEFAULT 0,
    latency_ms_sum    bigint NOT NULL DEFAULT 0,
    ttft_ms_sum       bigint NOT NULL DEFAULT 0,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    UNIQUE NULLS NOT DISTINCT (day, user_id, organization_id, agent_id, channel, model)
);
COMMENT ON TABLE usage_daily IS 'Daily usage rollups, maintained by a trigger on usage_records.';
CREATE INDEX usage_daily_user_idx ON usage_daily (user_id, day DESC);
CREATE INDEX usage_daily_day_idx ON usage_daily (day);

CREATE FUNCTION bg_usage_rollup() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO usage_daily AS d (day, user_id, organization_id, agent_id, channel, model, requests,
                                  errors, requests_charged, prompt_tokens, completion_tokens,
                                  estimated_tokens, cache_hits, latency_ms_sum, ttft_ms_sum)
    VALUES ((NEW.created_at AT TIME ZONE 'UTC')::date, NEW.user_id, NEW.organization_id, NEW.agent_id,
            NEW.channel, NEW.model, 1, CASE WHEN NEW.status = 'ok' THEN 0 ELSE 1 END,
            NEW.requests_charged, NEW.prompt_tokens, NEW.completion_tokens,
            CASE WHEN NEW.token_source = 'estimated' THEN NEW.prompt_tokens + NEW.completion_tokens
                 ELSE 0 END,
            CASE WHEN NEW.cache_hit THEN 1 ELSE 0 END, coalesce(NEW.latency_ms, 0),
            coalesce(NEW.ttft_ms, 0))
    ON CONFLICT (day, user_id, organization_id, agent_id, channel, model) DO UPDATE SET
        requests          = d.requests + 1,
        errors            = d.errors + EXCLUDED.errors,
        requests_charged  = d.requests_charged + EXCLUDED.requests_charged,
        prompt_tokens     = d.prompt_tokens + EXCLUDED.prompt_tokens,
        completion_tokens = d.completion_tokens + EXCLUDED.completion_tokens,
        estimated_tokens  = d.estimated_tokens + EXCLUDED.estimated_tokens,
        cache_hits        = d.cache_hits + EXCLUDED.cache_hits,
        latency_ms_sum    = d.latency_ms_sum + EXCLUDED.latency_ms_sum,
        ttft_ms_sum       = d.ttft_ms_sum + EXCLUDED.ttft_ms_sum,
        updated_at        = now();
    RETURN NULL;
END
$$;
CREATE TRIGGER usage_records_rollup AFTER INSERT ON usage_records
    FOR EACH ROW EXECUTE FUNCTION bg_usage_rollup();
