-- A windowed counter for attempt limits (sign-in, registration).
-- KEYS[1]  the counter
-- ARGV[1]  increment (0 reads without counting)
-- ARGV[2]  window in seconds, started by the first increment
-- Returns {count, seconds until the window ends (0 when no window is open)}.
local inc = tonumber(ARGV[1])
local n
if inc > 0 then
    n = redis.call('INCRBY', KEYS[1], inc)
    if redis.call('TTL', KEYS[1]) < 0 then
        redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
    end
else
    n = tonumber(redis.call('GET', KEYS[1]) or '0')
end
local ttl = redis.call('TTL', KEYS[1])
if ttl < 0 then
    ttl = 0
end
return {n, ttl}
