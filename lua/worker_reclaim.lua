-- Reclaims the jobs of a role's stream in one shard whose worker died or failed, and moves the
-- ones delivered too often to the dead-letter stream. Atomic, so two workers running it at once
-- never both claim or both dead-letter an entry.
--
-- KEYS[1] job stream bg:{sN}:q:<role>     KEYS[2] dead letters bg:{sN}:dlq:<role>
-- KEYS[3] last errors bg:{sN}:qerr:<role> (hash: entry id -> message)
-- ARGV[1] group (the role)  ARGV[2] consumer claiming  ARGV[3] min idle ms  ARGV[4] claim count
-- ARGV[5] max deliveries    ARGV[6] role               ARGV[7] dead-letter maxlen
-- ARGV[8] how many idle pending entries to inspect for dead-lettering
--
-- Returns {dead, pending, dead_letters, {id, {field, value, ...}, deliveries}, ...}: the number of
-- entries moved to the dead letters now, the entries pending in the group and the length of the
-- dead-letter stream afterwards (for the metrics), then the claimed entries with their delivery
-- count after this claim.
local stream, dlq, errs = KEYS[1], KEYS[2], KEYS[3]
local group, consumer = ARGV[1], ARGV[2]
local min_idle = tonumber(ARGV[3])
local claim = tonumber(ARGV[4])
local max_deliveries = tonumber(ARGV[5])
local role, dlq_maxlen = ARGV[6], ARGV[7]
local scan = tonumber(ARGV[8])

local dead = 0
local counts = {}

-- Moves entry id, delivered `deliveries` times, to the dead letters with its last error.
local function bury(id, deliveries)
    local args = {'XADD', dlq, 'MAXLEN', '~', dlq_maxlen, '*'}
    local entry = redis.call('XRANGE', stream, id, id)
    if entry[1] then
        for _, v in ipairs(entry[1][2]) do
            args[#args + 1] = v
        end
    end
    local err = redis.call('HGET', errs, id)
    args[#args + 1] = 'dlq_role'
    args[#args + 1] = role
    args[#args + 1] = 'dlq_id'
    args[#args + 1] = id
    args[#args + 1] = 'dlq_deliveries'
    args[#args + 1] = tostring(deliveries)
    args[#args + 1] = 'dlq_error'
    args[#args + 1] = err or ''
    redis.call(unpack(args))
    redis.call('XACK', stream, group, id)
    redis.call('XDEL', stream, id)
    redis.call('HDEL', errs, id)
    dead = dead + 1
end

local pending = redis.call('XPENDING', stream, group, 'IDLE', min_idle, '-', '+', scan)
for _, p in ipairs(pending) do
    local id, deliveries = p[1], p[4]
    if deliveries >= max_deliveries then
        bury(id, deliveries)
    else
        counts[id] = deliveries
    end
end

local claimed = {}
if claim > 0 then
    local r = redis.call('XAUTOCLAIM', stream, group, consumer, min_idle, '0-0', 'COUNT', claim)
    for _, e in ipairs(r[2]) do
        -- an entry deleted from the stream while pending comes back without fields
        if e and e[1] and type(e[2]) == 'table' then
            local d = counts[e[1]]
            if d then
                d = d + 1
            else
                local p = redis.call('XPENDING', stream, group, e[1], e[1], 1)
                d = (p[1] and p[1][4]) or 1
            end
            if d > max_deliveries then
                -- it had had its deliveries yet was not in the scan above (which sees at most
                -- `scan` entries, and its own idle time a moment earlier): buried, not run again
                bury(e[1], d - 1)
            else
                claimed[#claimed + 1] = {e[1], e[2], d}
            end
        end
    end
end

local summary = redis.call('XPENDING', stream, group)
local out = {dead, summary[1], redis.call('XLEN', dlq)}
for _, c in ipairs(claimed) do
    out[#out + 1] = c
end
return out
