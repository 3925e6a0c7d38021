#!lua flags=allow-oom
--[[
extend: renew leases so that a slow publish does not let them expire.

Atomic: a lease is renewed only when the caller's token is its current token and
its deadline has not passed; an expired lease cannot be revived. The new deadline is
now + lease_ms on the Redis server clock.

flags=allow-oom: runs when Redis has reached maxmemory, so a drainer that is
freeing memory keeps its leases.

KEYS[1]  leased  zset  entry id -> lease deadline (ms)
KEYS[2]  tokens  hash  entry id -> token of the current lease
ARGV[1]  lease_ms  int  new lease duration in milliseconds, > 0
ARGV[2], ARGV[3]  id_1, token_1  string, string  first entry and the token of its lease
ARGV[4], ARGV[5]  id_2, token_2  ... one pair per entry

Returns: {status_1, status_2, ...} one int per pair, in order
  1  renewed
  0  not renewed: the token is not the current one or the lease expired
]]

local leased_key = KEYS[1]
local tokens_key = KEYS[2]
local lease_ms = tonumber(ARGV[1])

local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local deadline = now_ms + lease_ms

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
    redis.call('ZADD', leased_key, deadline, id)
    statuses[#statuses + 1] = 1
  else
    statuses[#statuses + 1] = 0
  end
end
return statuses
