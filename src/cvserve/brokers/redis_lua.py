"""The Lua scripts of the Redis Streams broker (:mod:`cvserve.brokers.redis_streams`):
each keeps a stream's bound exact and never drops unfinished work (the module docstring
there says what each does). Plain text, registered once per broker."""

__all__ = ["ACK", "DEAD", "PUBLISH", "PUBLISH_MANY", "PUBLISH_REPLY", "RECLAIM", "TOUCH"]

PUBLISH = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], '*', 'm', ARGV[2])
"""

PUBLISH_REPLY = """
local made = redis.call('EXISTS', KEYS[1]) == 0
if not made and redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
local id = redis.call('XADD', KEYS[1], '*', 'm', ARGV[2])
if made then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return id
"""

PUBLISH_MANY = """
if redis.call('XLEN', KEYS[1]) + #ARGV - 1 > tonumber(ARGV[1]) then return false end
local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', 'm', ARGV[i]) end
return ids
"""

# finish(key, group, ids): XACK, then drop what every group has finished (see above).
FINISH = """
local function finish(key, group, ids)
if redis.call('EXISTS', key) == 0 then return 0 end
local groups = redis.call('XINFO', 'GROUPS', key)
local acked = 0
if #groups <= 1 then
  for _, id in ipairs(ids) do
    if redis.call('XACK', key, group, id) == 1 then
      redis.call('XDEL', key, id)
      acked = acked + 1
    end
  end
  return acked
end
for _, id in ipairs(ids) do
  acked = acked + redis.call('XACK', key, group, id)
end
if acked == 0 then return 0 end
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local floor_ms, floor_seq
for _, g in ipairs(groups) do
  local name, last
  for j = 1, #g, 2 do
    if g[j] == 'name' then name = g[j + 1] elseif g[j] == 'last-delivered-id' then last = g[j + 1] end
  end
  local ms, seq
  local summary = redis.call('XPENDING', key, name)
  if summary[1] > 0 then
    ms, seq = parse(summary[2])
  else
    ms, seq = parse(last)
    seq = seq + 1
  end
  if floor_ms == nil or ms < floor_ms or (ms == floor_ms and seq < floor_seq) then
    floor_ms, floor_seq = ms, seq
  end
end
redis.call('XTRIM', key, 'MINID', string.format('%d-%d', floor_ms, floor_seq))
return acked
end
"""

ACK = (
    FINISH
    + """
local ids = {}
for i = 2, #ARGV do ids[#ids + 1] = ARGV[i] end
return finish(KEYS[1], ARGV[1], ids)
"""
)

# KEYS: topic, its dead letters; ARGV: group, entry id, dead maxlen, field/value pairs.
DEAD = (
    FINISH
    + """
local key, group, id = KEYS[1], ARGV[1], ARGV[2]
local pending = redis.call('XPENDING', key, group, id, id, 1)
if #pending == 0 then return false end
local fields = {}
local entry = redis.call('XRANGE', key, id, id)
if #entry > 0 then
  for _, v in ipairs(entry[1][2]) do fields[#fields + 1] = v end
end
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
fields[#fields + 1] = 'deliveries'
fields[#fields + 1] = tostring(pending[1][4])
local dead = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
finish(key, group, {id})
return dead
"""
)

# XAUTOCLAIM, and the delivery count of each entry it claimed (counting this delivery).
RECLAIM = """
local key, group = KEYS[1], ARGV[1]
local r = redis.call('XAUTOCLAIM', key, group, ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local counts = {}
for i, e in ipairs(r[2]) do
  local n = 0
  if e then
    local p = redis.call('XPENDING', key, group, e[1], e[1], 1)
    if #p > 0 then n = p[1][4] end
  end
  counts[i] = n
end
return {r[1], r[2], counts}
"""

# Restart the idle clocks of the entries ARGV[2] still holds (JUSTID: the delivery count
# stays); one that another consumer reclaimed meanwhile stays theirs.
TOUCH = """
local key, group, consumer = KEYS[1], ARGV[1], ARGV[2]
local n = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', key, group, ARGV[i], ARGV[i], 1)
  if #p > 0 and p[1][2] == consumer then
    redis.call('XCLAIM', key, group, consumer, 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
return n
"""
