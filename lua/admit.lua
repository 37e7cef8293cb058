-- Admission of one request: rate limits (GCRA, the user's and the API key's), feature, tokens cap,
-- concurrency, request and token quota, and the job's XADD, all or nothing. A denial writes
-- nothing (not even a rate-limit step), so a flood of denied requests costs the user nothing and
-- cannot move any counter.
--
-- KEYS[1] config      bg:{sN}:adm:<uid>   (hash, written by the plan compiler; only its packed
--                     copy "pk" is read here)
-- KEYS[2] quota       bg:{sN}:quota:<uid> (hash: win, used, tused, tmax, rmin; and the rate limits'
--                     TATs: tat for the user's, tat:<key id> for each API key's)
-- KEYS[3] reservations bg:{sN}:res:<uid>  (zset: job id -> expiry ms)
-- KEYS[4] details     bg:{sN}:resd:<uid>  (hash: job id -> "<window start>|<reserved tokens>")
-- KEYS[5] job stream  bg:{sN}:q:<role>
-- KEYS[6] job owner   bg:{sN}:job:<job id> (written only when ARGV[9] is not "")
-- KEYS[7..9] the caller's session state (bg/authstate.h; read only when ARGV[11] is not ""):
--             bg:{sN}:sess:<sid>:rev, bg:{sN}:user:<uid>:nbf, bg:{sN}:user:<uid>:locale
-- ARGV[1] job id  ARGV[2] feature needed ("" none)  ARGV[3] max tokens (0 none)
-- ARGV[4] API key id ("" none)  ARGV[5] key rpm (0 no key limit)  ARGV[6] key burst
-- ARGV[7] reservation ttl ms  ARGV[8] stream maxlen  ARGV[9] the job's owner to record ("" none)
-- ARGV[10] its ttl in seconds  ARGV[11] when the caller's access token was issued (ms; "" when
-- the caller checked the session itself)  ARGV[12..] field, value, ... of the job
--
-- Returns {decision, q_limit, q_remaining, q_reset_ms, rl_limit, rl_remaining, rl_reset_ms,
-- retry_after_ms, entry_id, locale}: decision "revoked" when the session was revoked or the user's
-- tokens issued before its not-before time (checked first: a revoked session learns nothing else);
-- locale is the user's remembered locale ("" when none or not asked); q_reset_ms is a unix time (the end of the quota window, never after
-- the plan's end); rl_reset_ms (until the reported rate limit is fully replenished) and
-- retry_after_ms are durations. rl_limit is the rpm of the tighter of the two rate limits (the one
-- that denied, on a rate denial), 0 when none applies. entry_id is "" unless the decision is "ok".
--
-- Held reservations are counted live (score > now), so a reservation past its expiry stops
-- counting at once, whether or not it has been removed yet: removing lapsed ones (here once the
-- quota hash's rmin says one may have lapsed, and in settle.lua) only tidies up, bounded per call.
--
-- KEYS[2] also keeps "tmax", a bound on the tokens of every live reservation (the script raises it
-- when it reserves more and lowers it to the exact maximum whenever it sums the live reservations):
-- while tused + live reservations x tmax + the tokens asked fit the token quota, the exact sum of
-- the reserved tokens (a read of every live reservation) is not needed. Without it, the sum is
-- taken.
--
-- Cost: the script's time in Redis is mostly its redis.call()s (each one, with its arguments and
-- its reply converted, costs several thousand instructions, a write 15,000-20,000) and
-- tonumber()/string.format() on 13-digit numbers (strtod, printf). The admitting path makes 7
-- calls without rate limits or token quota (8 recording the job's owner), and as many with both
-- rate limits and a token quota (it was 9 and 15, then 8 and 12): the plan is one HGET of the
-- compiler's packed copy, read by struct.unpack without a strtod (an 11-field HMGET and nine
-- tonumber()s cost 27,000 instructions more); the rate limits' TATs are fields of the quota hash,
-- read with it and written in its one HSET; lapsed reservations are looked for only once rmin says
-- one may have lapsed, not on every call; no token sum while the tmax bound settles it; HSETNX as
-- the duplicate check and first write; the score bound built once as a string instead of a number
-- that Redis formats with %.17g on every call.
local adm, quota, res, resd, stream, owner_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local job_id, feature = ARGV[1], ARGV[2]
local floor, ceil, max, min, tonumber = math.floor, math.ceil, math.max, math.min, tonumber
local max_tok = floor(tonumber(ARGV[3]) or -1)
local key_id = ARGV[4]
local key_rpm = (key_id == '' or ARGV[5] == '0') and 0 or floor(tonumber(ARGV[5]) or -1)
local ttl = floor(tonumber(ARGV[7]) or 0)
local maxlen = floor(tonumber(ARGV[8]) or 0)
local owner, owner_ttl = ARGV[9], ARGV[10]
local issued = ARGV[11]
if job_id == '' or max_tok < 0 or key_rpm < 0 or ttl <= 0 or maxlen <= 0 or #ARGV % 2 ~= 1 or
    (owner ~= '' and not tonumber(owner_ttl)) or (issued ~= '' and not tonumber(issued)) then
    return redis.error_reply('ERR admit: bad arguments')
end

local PURGE_MAX_S = '64'
local BUSY_RETRY_MS = 1000
local UNPACK_MAX = 1000 -- ids per HMGET when summing many live reservations
local sformat, ssub = string.format, string.sub

local t = redis.call('TIME')
-- milliseconds with microsecond resolution: exact in a double until the year 2255
local now = t[1] * 1000 + t[2] / 1000 -- TIME answers digits: coerced without tonumber()
local now_ms = floor(now)
-- the same as a string, without formatting a number: seconds, then the microseconds' first 3 digits
local now_ms_s = t[1] .. ssub(string.rep('0', 6 - #t[2]) .. t[2], 1, 3)

local locale = ''
local function deny(decision, q, rl, retry)
    return {decision, q[1], q[2], q[3], rl[1], rl[2], rl[3], max(0, ceil(retry)), '', locale}
end
local NONE = {0, 0, 0}

-- 0. the session, when the caller left its check to this script (one round trip for the turn)
if issued ~= '' then
    local a = redis.call('MGET', KEYS[7], KEYS[8], KEYS[9])
    -- the not-before mark is in milliseconds, like issued (a UUIDv7's time)
    if a[1] or (a[2] and (tonumber(a[2]) or 0) > tonumber(issued)) then
        return deny('revoked', NONE, NONE, 0)
    end
    locale = a[3] or ''
end

-- 1. state: the plan compiler's packed copy (bg/policy.h, BG_POLICY_PK_MAX): nine little-endian
-- doubles, then the status, a newline and the features
local pk = redis.call('HGET', adm, 'pk')
if not pk or #pk < 73 then
    -- missing (or from an older format): the caller rebuilds it from Postgres; never guess a plan
    return deny('no_state', NONE, NONE, 0)
end
local q_limit, w_anchor, w_len, w_until, rpm, burst, conc, tok_cap, tq_limit, rest =
    struct.unpack('<ddddddddd', pk)
local status, features = string.match(pk, '^([^\n]*)\n(.*)$', rest)
if not status or w_len <= 0 then
    return deny('no_state', NONE, NONE, 0)
end

-- 2. plan
if (status ~= 'active' and status ~= 'trialing') or (w_until > 0 and now_ms >= w_until) then
    return deny('no_plan', NONE, NONE, 0)
end
rpm = max(0, rpm)
burst = max(1, floor(burst))

-- Everything the checks need is read before any of them runs; nothing is written until all pass.
local win = w_anchor + floor((now_ms - w_anchor) / w_len) * w_len
local reset = win + w_len
if w_until > 0 and reset > w_until then
    reset = w_until
end
local key_tat = key_rpm > 0 and 'tat:' .. key_id or nil
local qs
if key_tat then
    qs = redis.call('HMGET', quota, 'win', 'used', 'tused', 'tmax', 'rmin', 'tat', key_tat)
else
    qs = redis.call('HMGET', quota, 'win', 'used', 'tused', 'tmax', 'rmin', 'tat')
end
local used, tused = 0, 0
local fresh = tonumber(qs[1]) ~= win
if not fresh then
    used = tonumber(qs[2]) or 0
    tused = tonumber(qs[3]) or 0
end

local held = redis.call('ZCOUNT', res, '(' .. now_ms_s, '+inf')
local q_remaining = max(0, q_limit - used - held)
local qinfo = {q_limit, q_remaining, reset}

-- GCRA: TAT = theoretical arrival time of the next request; a request passes when it comes no
-- more than burst intervals before its TAT. Returns a table: ok, tat (the TAT to store when the
-- request is admitted), wait (ms until it would pass), and {limit, remaining, ms until full} as
-- it stands now (before) and as it would stand after admitting (after).
local function gcra(stored, limit, b)
    local interval = 60000 / limit
    local tat = tonumber(stored or '') or now
    if tat < now then
        tat = now
    end
    local new_tat = tat + interval
    local allow_at = new_tat - b * interval
    local left = floor((b * interval - (tat - now)) / interval)
    return {ok = now >= allow_at, tat = new_tat, wait = allow_at - now,
        before = {limit, max(0, min(b, left)), ceil(tat - now)},
        after = {limit, max(0, min(b, left - 1)), ceil(new_tat - now)}}
end

local user, key
if rpm > 0 then
    user = gcra(qs[6], rpm, burst)
end
if key_tat then
    local key_burst = floor(tonumber(ARGV[6]) or 0)
    if key_burst < 1 then
        key_burst = 1
    end
    key = gcra(qs[7], key_rpm, key_burst)
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
local reserve_tok, new_tmax = 0, nil
if tq_limit > 0 then
    reserve_tok = max_tok > 0 and max_tok or tok_cap
    local tmax = tonumber(qs[4])
    local need = tused + max(reserve_tok, 1)
    local bound -- tmax once this request holds its reservation too
    if held > 0 and not (tmax and tmax >= 0 and need + held * tmax <= tq_limit) then
        -- the bound does not settle it: sum the tokens of the live reservations
        local held_tok, live_max = 0, 0
        local live = redis.call('ZRANGEBYSCORE', res, '(' .. now_ms_s, '+inf')
        local match = string.match
        for i = 1, #live, UNPACK_MAX do
            for _, d in ipairs(redis.call('HMGET', resd, unpack(live, i, min(#live, i + UNPACK_MAX - 1)))) do
                if d then
                    local n = tonumber(match(d, '|(%d+)$')) or 0
                    held_tok = held_tok + n
                    if n > live_max then
                        live_max = n
                    end
                end
            end
        end
        if need + held_tok > tq_limit then
            return deny('quota_exceeded', qinfo, rl, tused >= tq_limit and reset - now or BUSY_RETRY_MS)
        end
        bound = max(live_max, reserve_tok)
    elseif held > 0 then
        bound = max(tmax, reserve_tok)
    else
        -- nothing live: only this request's reservation will be
        if need > tq_limit then
            return deny('quota_exceeded', qinfo, rl, tused >= tq_limit and reset - now or BUSY_RETRY_MS)
        end
        bound = reserve_tok
    end
    if bound ~= tmax then
        new_tmax = bound
    end
end

-- Admitted. The details go first, only when the job id holds none: the same job admitted twice
-- would hold one reservation for two jobs (and HSETNX writes nothing then). The XADD comes next;
-- if it fails (a wrong type, say) the details are taken back before any other write, so a failed
-- admit holds nothing.
if redis.call('HSETNX', resd, job_id, sformat('%d|%d', win, reserve_tok)) == 0 then
    return redis.error_reply('ERR admit: job id already reserved')
end
-- the job's "locale" field is the request's guess; the user's remembered locale, when this
-- script read it, is the one the job must carry (as when the caller read the session itself)
-- (ARGV is this call's own table: changed in place rather than copied)
if locale ~= '' then
    for i = 12, #ARGV - 1, 2 do
        if ARGV[i] == 'locale' then
            ARGV[i + 1] = locale
            break
        end
    end
end
local entry_id = redis.pcall('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'job_id', job_id,
    unpack(ARGV, 12))
if type(entry_id) == 'table' and entry_id.err then
    redis.call('HDEL', resd, job_id)
    return entry_id
end

local expiry = now_ms + ttl
redis.call('ZADD', res, expiry, job_id)
-- who may read the job's output and cancel it (/chat/jobs/<id>/...), in the same step
if owner ~= '' then
    redis.call('SET', owner_key, owner, 'EX', owner_ttl)
end
-- The quota hash in one write: a new window's counters, the tokens bound, the rate limits' TATs
-- (kept in ms with microsecond decimals; a TAT in the past is worth nothing, as if never set).
local w, n = {}, 0
local function put(field, value)
    w[n + 1], w[n + 2] = field, value
    n = n + 2
end
if fresh then
    -- a new window (renewal, a new day): what was used before no longer counts
    put('win', sformat('%d', win))
    put('used', '0')
    put('tused', '0')
end
if new_tmax then
    put('tmax', new_tmax)
end
if user then
    put('tat', sformat('%.3f', user.tat))
end
if key then
    put(key_tat, sformat('%.3f', key.tat))
end
-- rmin: no reservation expires before it (a lower bound, kept in the same write), so lapsed
-- reservations are looked for only once one may have lapsed: up to 64 are removed here, then
-- rmin moves to the earliest left. Settling moves nothing, so rmin may come early; that costs
-- one look that finds nothing.
local rmin = tonumber(qs[5])
if rmin and rmin <= now_ms then
    local expired = redis.call('ZRANGEBYSCORE', res, '-inf', now_ms_s, 'LIMIT', '0', PURGE_MAX_S)
    if #expired > 0 then
        redis.call('ZREM', res, unpack(expired))
        redis.call('HDEL', resd, unpack(expired))
    end
    put('rmin', redis.call('ZRANGE', res, '0', '0', 'WITHSCORES')[2]) -- this job's, at the latest
elseif not rmin or expiry < rmin then
    put('rmin', sformat('%d', expiry))
end
if n > 0 then
    redis.call('HSET', quota, unpack(w, 1, n))
end

rl = rate_info('after')
return {'ok', q_limit, max(0, q_limit - used - held - 1), reset, rl[1], rl[2], rl[3], 0, entry_id,
    locale}
