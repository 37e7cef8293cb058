-- Moves one pending job to the dead-letter stream at once (its handler called it permanently
-- invalid), unless another worker acknowledged it meanwhile.
--
-- KEYS[1] job stream   KEYS[2] dead letters   KEYS[3] last errors (hash)
-- ARGV[1] group   ARGV[2] entry id   ARGV[3] dead-letter maxlen
-- ARGV[4..] the dead-letter entry's fields: the job's own, then dlq_role, dlq_id, dlq_deliveries,
-- dlq_error
--
-- Returns 1 when moved, 0 when the entry was no longer pending.
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
    return 0
end
local args = {'XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*'}
for i = 4, #ARGV do
    args[#args + 1] = ARGV[i]
end
redis.call(unpack(args))
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
return 1
