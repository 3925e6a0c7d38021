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
-- The wrapper sends at most 1000 pairs a call, so each command below gets at most
-- 1000 ids.
local ids = {}
local tokens = {}
for index = 1, #ARGV, 2 do
  ids[#ids + 1] = ARGV[index]
  tokens[#tokens + 1] = ARGV[index + 1]
end
if #ids == 0 then
  return {}
end

local current_tokens = redis.call('HMGET', tokens_key, unpack(ids))
local lease_deadlines = redis.call('ZMSCORE', leased_key, unpack(ids))

local statuses = {}
local done = {}
-- An id listed twice is acknowledged once; its second pair reports 0.
local acked = {}
for position, id in ipairs(ids) do
  local lease_deadline = tonumber(lease_deadlines[position])
  if current_tokens[position] == tokens[position] and not acked[id]
      and lease_deadline ~= nil and lease_deadline > now_ms then
    done[#done + 1] = id
    acked[id] = true
    statuses[position] = 1
  else
    statuses[position] = 0
  end
end

if #done > 0 then
  redis.call('ZREM', leased_key, unpack(done))
  redis.call('HDEL', tokens_key, unpack(done))
  redis.call('HDEL', payloads_key, unpack(done))
  redis.call('HDEL', attempts_key, unpack(done))
  redis.call('HDEL', errors_key, unpack(done))
end
return statuses
