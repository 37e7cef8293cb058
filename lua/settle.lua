-- Settles the reservation of a finished job: "use" turns it into one request (and its real tokens)
-- used in the window it was reserved in, "refund" drops it. Idempotent on the job id: the settled
-- marker (kept a day) makes every later settle of the same job a "duplicate" that changes nothing.
--
-- KEYS[1] quota        bg:{sN}:quota:<uid> (hash: win, used, tused)
-- KEYS[2] reservations bg:{sN}:res:<uid>   (zset: job id -> expiry ms)
-- KEYS[3] details      bg:{sN}:resd:<uid>  (hash: job id -> "<window start>|<reserved tokens>")
-- KEYS[4] marker       bg:{sN}:stl:<job id>
-- ARGV[1] job id  ARGV[2] "use" | "refund"  ARGV[3] real tokens (≥ 0)
--
-- Returns {"settled" | "duplicate" | "unknown", used}: used is the request count of the window
-- the quota hash holds, afterwards. "unknown": no reservation of that job is left (never admitted,
-- or expired and purged, which refunded it); nothing is counted and no marker is written.
--
-- A reservation past its expiry but not yet purged still settles: a "use" counts once, in the
-- window recorded for it. The quota hash holds one window (admit rewrites it lazily when a new one
-- starts), so a use whose window is no longer the one held there is not counted into the newer.
local quota, res, resd, marker = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local job_id, outcome = ARGV[1], ARGV[2]
local tokens = math.floor(tonumber(ARGV[3]) or -1)
if job_id == '' or (outcome ~= 'use' and outcome ~= 'refund') or tokens < 0 then
    return redis.error_reply('ERR settle: bad arguments')
end

local PURGE_MAX = 64
local MARKER_TTL_S = 86400

local function used_now()
    return tonumber(redis.call('HGET', quota, 'used') or '0') or 0
end

if redis.call('EXISTS', marker) == 1 then
    return {'duplicate', used_now()}
end

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local d = redis.call('HGET', resd, job_id)
local result = 'unknown'
if d then
    local win = string.match(d, '^(-?%d+)|')
    redis.call('ZREM', res, job_id)
    redis.call('HDEL', resd, job_id)
    if outcome == 'use' and win then
        local held = redis.call('HGET', quota, 'win')
        if not held then
            -- the quota hash was lost (rebuilt later from the ledger): start it from this use
            redis.call('HSET', quota, 'win', win, 'used', 1, 'tused', tokens)
        elseif tonumber(held) == tonumber(win) then
            redis.call('HINCRBY', quota, 'used', 1)
            redis.call('HINCRBY', quota, 'tused', tokens)
        end
    end
    redis.call('SET', marker, outcome, 'EX', MARKER_TTL_S)
    result = 'settled'
end

-- Tidy up reservations past their expiry (admit already stopped counting them); bounded per call.
local expired = redis.call('ZRANGEBYSCORE', res, '-inf', now_ms, 'LIMIT', 0, PURGE_MAX)
if #expired > 0 then
    redis.call('ZREM', res, unpack(expired))
    redis.call('HDEL', resd, unpack(expired))
end

return {result, used_now()}
