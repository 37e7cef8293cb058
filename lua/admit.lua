-- Admission of one request: rate limits (GCRA, the user's and the API key's), feature, tokens cap,
-- concurrency, request and token quota, and the job's XADD, all or nothing. A denial writes
-- nothing (not even the purge of expired reservations, nor a rate-limit step), so a flood of
-- denied requests costs the user nothing and cannot move any counter.
--
-- KEYS[1] config      bg:{sN}:adm:<uid>   (hash, written by the plan compiler; read only here)
-- KEYS[2] quota       bg:{sN}:quota:<uid> (hash: win, used, tused)
-- KEYS[3] reservations bg:{sN}:res:<uid>  (zset: job id -> expiry ms)
-- KEYS[4] details     bg:{sN}:resd:<uid>  (hash: job id -> "<window start>|<reserved tokens>")
-- KEYS[5] user rate   bg:{sN}:gcra:<uid>
-- KEYS[6] key rate    bg:{sN}:gcra:key:<key id> (a same-slot dummy, never touched, without a key)
-- KEYS[7] job stream  bg:{sN}:q:<role>
-- ARGV[1] job id  ARGV[2] feature needed ("" none)  ARGV[3] max tokens (0 none)
-- ARGV[4] key rpm (0 no key limit)  ARGV[5] key burst  ARGV[6] reservation ttl ms
-- ARGV[7] stream maxlen  ARGV[8..] field, value, ... of the job
--
-- Returns {decision, q_limit, q_remaining, q_reset_ms, rl_limit, rl_remaining, rl_reset_ms,
-- retry_after_ms, entry_id}: q_reset_ms is a unix time (the end of the quota window, never after
-- the plan's end); rl_reset_ms (until the reported rate limit is fully replenished) and
-- retry_after_ms are durations. rl_limit is the rpm of the tighter of the two rate limits (the one
-- that denied, on a rate denial), 0 when none applies. entry_id is "" unless the decision is "ok".
--
-- Held reservations are counted live (score > now) with ZCOUNT, so a reservation past its expiry
-- stops counting at once, whether or not it has been purged yet: the purge only tidies up, and is
-- bounded per call to keep the script short.
local adm, quota, res, resd, gcra_user, gcra_key, stream =
    KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local job_id, feature = ARGV[1], ARGV[2]
local max_tok = math.floor(tonumber(ARGV[3]) or -1)
local key_rpm = math.floor(tonumber(ARGV[4]) or -1)
local key_burst = math.floor(tonumber(ARGV[5]) or 0)
local ttl = math.floor(tonumber(ARGV[6]) or 0)
local maxlen = math.floor(tonumber(ARGV[7]) or 0)
if job_id == '' or max_tok < 0 or key_rpm < 0 or ttl <= 0 or maxlen <= 0 or #ARGV % 2 ~= 1 then
    return redis.error_reply('ERR admit: bad arguments')
end
if key_burst < 1 then
    key_burst = 1
end

local PURGE_MAX = 64
local BUSY_RETRY_MS = 1000

local t = redis.call('TIME')
-- milliseconds with microsecond resolution: exact in a double until the year 2255
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local now_ms = math.floor(now)

local function deny(decision, q, rl, retry)
    return {decision, q[1], q[2], q[3], rl[1], rl[2], rl[3], math.max(0, math.ceil(retry)), ''}
end
local NONE = {0, 0, 0}

-- 1. state
local c = redis.call('HMGET', adm, 'status', 'q_limit', 'w_anchor', 'w_len', 'w_until', 'rpm',
    'burst', 'conc', 'tok_cap', 'tq_limit', 'features')
local status = c[1]
local q_limit, w_anchor, w_len = tonumber(c[2]), tonumber(c[3]), tonumber(c[4])
if not status or not q_limit or not w_anchor or not w_len or w_len <= 0 then
    -- missing (or unusable) config: the caller rebuilds it from Postgres; never guess a plan
    return deny('no_state', NONE, NONE, 0)
end
local w_until = tonumber(c[5]) or 0
local rpm = math.max(0, tonumber(c[6]) or 0)
local burst = math.max(1, math.floor(tonumber(c[7]) or 1))
local conc = tonumber(c[8]) or 0
local tok_cap = tonumber(c[9]) or 0
local tq_limit = tonumber(c[10]) or 0
local features = c[11] or ''

-- 2. plan
if (status ~= 'active' and status ~= 'trialing') or (w_until > 0 and now_ms >= w_until) then
    return deny('no_plan', NONE, NONE, 0)
end

-- Everything the checks need is read before any of them runs; nothing is written until all pass.
local win = w_anchor + math.floor((now_ms - w_anchor) / w_len) * w_len
local reset = win + w_len
if w_until > 0 and reset > w_until then
    reset = w_until
end
local qs = redis.call('HMGET', quota, 'win', 'used', 'tused')
local used, tused = 0, 0
local fresh = tonumber(qs[1]) ~= win
if not fresh then
    used = tonumber(qs[2]) or 0
    tused = tonumber(qs[3]) or 0
end
local held = redis.call('ZCOUNT', res, '(' .. now_ms, '+inf')
local q_remaining = math.max(0, q_limit - used - held)
local qinfo = {q_limit, q_remaining, reset}

-- GCRA: TAT = theoretical arrival time of the next request; a request passes when it comes no
-- more than burst intervals before its TAT. Returns a table: ok, tat (the TAT to store when the
-- request is admitted), wait (ms until it would pass), and {limit, remaining, ms until full} as
-- it stands now (before) and as it would stand after admitting (after).
local function gcra(key, limit, b)
    local interval = 60000 / limit
    local tat = tonumber(redis.call('GET', key) or '') or now
    if tat < now then
        tat = now
    end
    local new_tat = tat + interval
    local allow_at = new_tat - b * interval
    local left = math.floor((b * interval - (tat - now)) / interval)
    local g = {ok = now >= allow_at, tat = new_tat, wait = allow_at - now}
    g.before = {limit, math.max(0, math.min(b, left)), math.ceil(tat - now)}
    g.after = {limit, math.max(0, math.min(b, left - 1)), math.ceil(new_tat - now)}
    return g
end

local user, key
if rpm > 0 then
    user = gcra(gcra_user, rpm, burst)
end
if key_rpm > 0 then
    key = gcra(gcra_key, key_rpm, key_burst)
end
-- The rate limit reported: the tighter of the two, the one a client has to pace itself by.
local function rate_info(when)
    if user and key then
        return key[when][2] < user[when][2] and key[when] or user[when]
    end
    return (user and user[when]) or (key and key[when]) or NONE
end
local rl = rate_info('before')

-- 3. feature
if feature ~= '' and
    (string.find(feature, ',', 1, true) or not string.find(features, ',' .. feature .. ',', 1, true)) then
    return deny('feature', qinfo, rl, 0)
end

-- 4. tokens cap
if tok_cap > 0 and max_tok > tok_cap then
    return deny('too_many_tokens', qinfo, rl, 0)
end

-- 5. rate, the user's first
if user and not user.ok then
    return deny('rate_limited', qinfo, user.before, user.wait)
end
if key and not key.ok then
    return deny('rate_limited', qinfo, key.before, key.wait)
end

-- 6. concurrency: the live reservations are the generations running
if conc > 0 and held >= conc then
    return deny('concurrency', qinfo, rl, BUSY_RETRY_MS)
end

-- 7. quota: requests, then tokens (reserving the request's max tokens, or the cap without one)
if used + held >= q_limit then
    -- when only reservations fill the window, one settling frees a request before the reset
    return deny('quota_exceeded', qinfo, rl, used >= q_limit and reset - now or BUSY_RETRY_MS)
end
local reserve_tok = 0
if tq_limit > 0 then
    reserve_tok = max_tok > 0 and max_tok or tok_cap
    local held_tok = 0
    local live = redis.call('ZRANGEBYSCORE', res, '(' .. now_ms, '+inf')
    if #live > 0 then
        for _, d in ipairs(redis.call('HMGET', resd, unpack(live))) do
            if d then
                held_tok = held_tok + (tonumber(string.match(d, '|(%d+)$')) or 0)
            end
        end
    end
    if tused + held_tok + math.max(reserve_tok, 1) > tq_limit then
        return deny('quota_exceeded', qinfo, rl, tused >= tq_limit and reset - now or BUSY_RETRY_MS)
    end
end
if redis.call('HEXISTS', resd, job_id) == 1 then
    -- the same job admitted twice would hold one reservation for two jobs
    return redis.error_reply('ERR admit: job id already reserved')
end

-- Admitted. The XADD goes first: if it fails (a wrong type, say) the script stops before any
-- other write, so a failed admit holds nothing.
local xadd = {'XADD', stream, 'MAXLEN', '~', maxlen, '*', 'job_id', job_id}
for i = 8, #ARGV do
    xadd[#xadd + 1] = ARGV[i]
end
local entry_id = redis.call(unpack(xadd))

redis.call('ZADD', res, now_ms + ttl, job_id)
redis.call('HSET', resd, job_id, string.format('%d|%d', win, reserve_tok))
if fresh then
    -- a new window (renewal, a new day): what was used before no longer counts
    redis.call('HSET', quota, 'win', string.format('%d', win), 'used', 0, 'tused', 0)
end
-- The TAT is kept in ms with microsecond decimals; once it is in the past the key is worth
-- nothing, hence the expiry.
if user then
    redis.call('SET', gcra_user, string.format('%.3f', user.tat), 'PX', math.ceil(user.tat - now) + 1)
end
if key then
    redis.call('SET', gcra_key, string.format('%.3f', key.tat), 'PX', math.ceil(key.tat - now) + 1)
end

-- Tidy up reservations past their expiry (they stopped counting already); bounded per call.
local expired = redis.call('ZRANGEBYSCORE', res, '-inf', now_ms, 'LIMIT', 0, PURGE_MAX)
if #expired > 0 then
    redis.call('ZREM', res, unpack(expired))
    redis.call('HDEL', resd, unpack(expired))
end

rl = rate_info('after')
return {'ok', q_limit, math.max(0, q_limit - used - held - 1), reset, rl[1], rl[2], rl[3], 0,
    entry_id}
