"""The Lua scripts of the Redis store (serve_app/stores/redis_store.py): each touches the keys
of one hash tag, so it runs on one slot of a Redis Cluster."""

# Keep `key -> value` in the hash `entries`, and only the newest `limit` keys (in `order`).
REMEMBER = """
local function remember(entries, order, key, value, limit)
  if redis.call('HEXISTS', entries, key) == 0 then redis.call('RPUSH', order, key) end
  redis.call('HSET', entries, key, value)
  while redis.call('LLEN', order) > limit do
    redis.call('HDEL', entries, redis.call('LPOP', order))
  end
end
"""

# The done mark is written every time (a retry too), so that the WAIT after it covers the
# first write of the outcome even on another connection (likewise a session change always
# rewrites the record) (WAIT waits for the client's last
# write; a script that writes nothing would leave nothing to wait for).
RECORD_OUTCOME = (
    REMEMBER
    + """
redis.call('HDEL', KEYS[5], ARGV[6])
redis.call('HDEL', KEYS[6], ARGV[1])
local counted = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], '1', 'EX', ARGV[4])
if counted == 1 then return 0 end
if ARGV[5] ~= '' then redis.call('HINCRBY', KEYS[2], 'reason:' .. ARGV[5], 1) end
redis.call('HINCRBY', KEYS[2], 'outcome:' .. ARGV[2], 1)
remember(KEYS[3], KEYS[4], ARGV[1], ARGV[2], tonumber(ARGV[3]))
return 1
"""
)

RECORD_REJECTION = (
    REMEMBER
    + """
redis.call('HINCRBY', KEYS[1], 'rejection:' .. ARGV[2], 1)
remember(KEYS[2], KEYS[3], ARGV[1], ARGV[2], tonumber(ARGV[3]))
return 1
"""
)

# Open only what has no outcome yet (a late open must not reopen a decided request).
OPEN_REQUEST = """
local key = ARGV[2]
if redis.call('HEXISTS', KEYS[3], key) == 1 or redis.call('HEXISTS', KEYS[4], key) == 1 then
  key = key .. '~' .. string.sub(ARGV[1], 1, 12)
  redis.call('HINCRBY', KEYS[5], 'repeated_request_ids', 1)
end
if redis.call('EXISTS', KEYS[1]) == 1 then return key end
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode({request_id = key, replica_id = ARGV[3]}))
redis.call('HSET', KEYS[4], key, ARGV[1])
return key
"""

CLOSE_REQUEST = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
redis.call('HDEL', KEYS[2], cjson.decode(raw)['request_id'])
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""

# Compare-and-set a session: write only if the record is still the one the change was
# computed from (by SHA-1; '' for none), and keep the sorted set of new sessions in step.
CHANGE_SESSION = """
local raw = redis.call('GET', KEYS[1])
local seen = ''
if raw then seen = redis.sha1hex(raw) end
if seen ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[2], ARGV[5])
else
  redis.call('ZADD', KEYS[2], ARGV[6], ARGV[5])
end
return 1
"""

REPORT_LOAD = """
local known = redis.call('HGET', KEYS[1], ARGV[1])
if known and cjson.decode(known)['seq'] >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""

# Drop the load reports that are still expired (one written meanwhile is fresh: kept).
DROP_EXPIRED = """
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  if cjson.decode(fields[i + 1])['expires_at'] <= tonumber(ARGV[1]) then
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
return 1
"""

# Drop the oldest sessions without history beyond the bound (never one that has history: it
# left the set when it got some). The session keys share the set's hash tag (one slot).
TRIM_NEW = """
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[1])
if excess <= 0 then return 0 end
local oldest = redis.call('ZRANGE', KEYS[1], 0, excess - 1)
for _, sid in ipairs(oldest) do
  redis.call('DEL', ARGV[2] .. sid)
  redis.call('ZREM', KEYS[1], sid)
end
return excess
"""
