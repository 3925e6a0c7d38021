#!lua flags=allow-oom
--[[
bury: move leased entries to the dead letters with a reason.

Atomic: an entry is buried only when the caller's token is its current token and
the lease deadline has not passed. The dead-letter entry is written before the
lease is removed; the payload and attempt count stay so an operator can inspect
and requeue it.

flags=allow-oom: runs when Redis has reached maxmemory, so a drainer that is
freeing memory can set aside entries it cannot publish.

KEYS[1]  leased  zset  entry id -> lease deadline (ms)
KEYS[2]  tokens  hash  entry id -> token of the current lease
KEYS[3]  errors  hash  entry id -> last failure or dead-letter reason
KEYS[4]  dead    zset  entry id -> time it was dead-lettered (ms, server time)
ARGV[1]  reason  string  why the entry cannot be published
ARGV[2], ARGV[3]  id_1, token_1  string, string  first entry and the token of its lease
ARGV[4], ARGV[5]  id_2, token_2  ... one pair per entry

Returns: {status_1, status_2, ...} one int per pair, in order
  1  buried
  0  not buried: the token is not the current one or the lease expired
]]

local leased_key = KEYS[1]
local tokens_key = KEYS[2]
local errors_key = KEYS[3]
local dead_key = KEYS[4]
local reason = ARGV[1]

local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

-- A lease is current while the caller's token is stored for the entry and its
-- deadline has not passed. claim takes back leases whose deadline is <= now, so a
-- drainer must not act on one after that moment, even before anyone took it back.
local function holds_lease(id, token)
  if redis.call('HGET', tokens_key, id) ~= token then
    return false
  end
  local lease_deadline = tonumber(redis.call('ZSCORE', leased_key, id))
  return lease_deadline ~= nil and lease_deadline > now_ms
end

local statuses = {}
for index = 2, #ARGV, 2 do
  local id = ARGV[index]
  local token = ARGV[index + 1]
  if holds_lease(id, token) then
    redis.call('ZADD', dead_key, now_ms, id)
    redis.call('HSET', errors_key, id, reason)
    redis.call('ZREM', leased_key, id)
    redis.call('HDEL', tokens_key, id)
    statuses[#statuses + 1] = 1
  else
    statuses[#statuses + 1] = 0
  end
end
return statuses
