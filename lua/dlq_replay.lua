-- Puts one dead letter back on its job stream as a new entry (so its delivery count starts
-- afresh) and removes it from the dead letters, atomically.
--
-- KEYS[1] dead letters bg:{sN}:dlq:<role>   KEYS[2] job stream bg:{sN}:q:<role>
-- ARGV[1] dead-letter entry id               ARGV[2] job stream maxlen
--
-- Returns the new entry id, or nil when there is no such dead letter.
local entry = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #entry == 0 then
    return false
end
local args = {'XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*'}
local fields = entry[1][2]
for i = 1, #fields, 2 do
    -- the dlq_* fields describe the failure; the job itself is the rest
    if string.sub(fields[i], 1, 4) ~= 'dlq_' then
        args[#args + 1] = fields[i]
        args[#args + 1] = fields[i + 1]
    end
end
if #args == 6 then
    return redis.error_reply('ERR dead letter ' .. ARGV[1] .. ' carries no job fields')
end
local id = redis.call(unpack(args))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
