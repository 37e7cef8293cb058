-- Accepts one Telegram webhook update: deduplicates it on its update_id (per bot, for a day, as
-- long as Telegram keeps an update), numbers it within its chat and enqueues it for the telegram
-- worker, atomically, so a repeated delivery can never enqueue twice and an accepted one is never
-- lost between the mark and the XADD. All keys share the chat's shard tag.
-- KEYS[1]  the seen-update mark    bg:{s<N>}:tg:seen:<bot>:<update id>
-- KEYS[2]  the job stream          bg:{s<N>}:q:telegram
-- KEYS[3]  the chat's counter      bg:{s<N>}:tg:seq:<bot>:<chat>
-- ARGV[1]  the stream's approximate MAXLEN
-- ARGV[2]  job id, ARGV[3] bot, ARGV[4] chat, ARGV[5] update id, ARGV[6] the update (JSON)
-- Returns the update's number within its chat (>= 1), or 0 for an update seen before.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', 86400) then
    return 0
end
local seq = redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], 604800)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'job_id', ARGV[2], 'bot', ARGV[3],
           'chat', ARGV[4], 'update_id', ARGV[5], 'seq', seq, 'update', ARGV[6])
return seq
