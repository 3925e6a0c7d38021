#!lua flags=allow-oom
--[[
ack: delete entries whose publish RabbitMQ confirmed.

Atomic: each entry is deleted only when the caller's token is its current lease
token and the lease deadline has not passed on the Redis server clock, so a drainer
whose lease expired or was taken over changes nothing.

flags=allow-oom: runs when Redis has reached maxmemory, because deleting
confirmed entries is how a full outbox frees memory.

KEYS[1]  leased    zset  entry id -> lease deadline (ms)
KEYS[2]  tokens    hash  entry id -> token of the current lease
KEYS[3]  payloads  hash  entry id -> raw entry
KEYS[4]  attempts  hash  entry id -> number of claims so far
KEYS[5]  errors    hash  entry id -> last failure
ARGV[1], ARGV[2]  id_1, token_1  string, string  first entry and the token of its lease
ARGV[3], ARGV[4]  id_2, token_2  ... one pair per entry

Returns: {status_1, status_2, ...} one int per pair, in order
  1  acknowledged and deleted
  0  not acknowledged: the token is not the current one (stale, released or already
     done) or the lease expired
]]

local leased_key = KEYS[1]
local tokens_key = KEYS[2]
local payloads_key = KEYS[3]
local attempts_key = KEYS[4]
local errors_key = KEYS[5]

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
for index = 1, #ARGV, 2 do
  local id = ARGV[index]
  local token = ARGV[index + 1]
  if holds_lease(id, token) then
    redis.call('ZREM', leased_key, id)
    redis.call('HDEL', tokens_key, id)
    redis.call('HDEL', payloads_key, id)
    redis.call('HDEL', attempts_key, id)
    redis.call('HDEL', errors_key, id)
    statuses[#statuses + 1] = 1
  else
    statuses[#statuses + 1] = 0
  end
end
return statuses
