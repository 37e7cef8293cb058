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
--
-- Cost: as in admit.lua, few redis.call()s (8 for a settled job, 2 for a duplicate) and strings
-- rather than numbers as arguments. The marker is written first with SET NX, which is also the
-- duplicate check (and is taken back when no reservation is left, so "unknown" leaves none).
local quota, res, resd, marker = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local job_id, outcome = ARGV[1], ARGV[2]
local tokens = math.floor(tonumber(ARGV[3]) or -1)
if job_id == '' or (outcome ~= 'use' and outcome ~= 'refund') or tokens < 0 then
    return redis.error_reply('ERR settle: bad arguments')
end

local PURGE_MAX_S = '65' -- 64, and this job's own when it is among them
local MARKER_TTL_S = '86400'

if not redis.call('SET', marker, outcome, 'NX', 'EX', MARKER_TTL_S) then
    return {'duplicate', tonumber(redis.call('HGET', quota, 'used') or '0') or 0}
end

local t = redis.call('TIME')
local now_ms_s = t[1] .. string.sub(string.rep('0', 6 - #t[2]) .. t[2], 1, 3)

local d = redis.call('HGET', resd, job_id)
local q = redis.call('HMGET', quota, 'win', 'used', 'tused')
local used = tonumber(q[2] or '0') or 0
-- Reservations past their expiry, to tidy up (admit already stopped counting them); bounded.
local expired = redis.call('ZRANGEBYSCORE', res, '-inf', now_ms_s, 'LIMIT', '0', PURGE_MAX_S)
local result = 'unknown'
local gone = expired
if d then
    local win = string.match(d, '^(-?%d+)|')
    gone = {job_id}
    for i = 1, #expired do
        if expired[i] ~= job_id and #gone <= 64 then
            gone[#gone + 1] = expired[i]
        end
    end
    if outcome == 'use' and win then
        local held = q[1]
        if not held then
            -- the quota hash was lost (rebuilt later from the ledger): start it from this use
            redis.call('HSET', quota, 'win', win, 'used', '1', 'tused', string.format('%d', tokens))
            used = 1
        elseif tonumber(held) == tonumber(win) then
            local u, tu = tonumber(q[2] or '0'), tonumber(q[3] or '0')
            if u and tu and u == math.floor(u) and tu == math.floor(tu) and u < 2^52 and tu + tokens < 2^52 then
                redis.call('HSET', quota, 'used', string.format('%d', u + 1), 'tused',
                    string.format('%d', tu + tokens))
                used = u + 1
            else
                -- not plain integers: let Redis count (and refuse) as it always did
                redis.call('HINCRBY', quota, 'used', 1)
                redis.call('HINCRBY', quota, 'tused', tokens)
                used = tonumber(redis.call('HGET', quota, 'used') or '0') or 0
            end
        end
    end
    result = 'settled'
else
    redis.call('DEL', marker)
    if #expired > 64 then
        expired[65] = nil
    end
end

if #gone > 0 then
    redis.call('ZREM', res, unpack(gone))
    redis.call('HDEL', resd, unpack(gone))
end

return {result, used}
