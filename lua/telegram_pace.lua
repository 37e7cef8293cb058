-- Paces outgoing Telegram Bot API calls (GCRA), shared by every worker: one key per chat (about one
-- message or edit a second) and one per bot (about thirty a second). Called once per key: the two
-- live in different slots.
-- KEYS[1]  the limiter                 bg:tg:pace:<bot>[:<chat>]
-- ARGV[1]  now (unix ms), ARGV[2] interval (ms), ARGV[3] burst (calls allowed at once, >= 1)
-- ARGV[4]  hold (ms): > 0 pushes the limiter to now + hold (a 429's retry_after) and returns 0
-- Returns 0 when the call may go now (it is counted), else the ms to wait (nothing is counted).
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local burst = tonumber(ARGV[3])
local hold = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if hold > 0 then
    local until_tat = now + hold + interval * (burst - 1)
    if until_tat > tat then
        redis.call('SET', KEYS[1], until_tat, 'PX', until_tat - now + 1000)
    end
    return 0
end
if tat < now then
    tat = now
end
local allow_at = tat - interval * (burst - 1)
if allow_at > now then
    return allow_at - now
end
redis.call('SET', KEYS[1], tat + interval, 'PX', tat + interval - now + 1000)
return 0
