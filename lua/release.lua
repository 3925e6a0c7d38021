#!lua flags=allow-oom
--[[
release: give leased entries back so that the next claim takes them again.

Atomic: an entry is released only when the caller's token is its current token and
the lease deadline has not passed. It stays in the leased set without an owner,
due at now + delay_ms (server clock), which the next claim treats like an expired
lease. With refund = 1 the claim that
leased it does not count as an attempt; broker-wide failures release this way so an
outage cannot dead-letter the backlog.

flags=allow-oom: runs when Redis has reached maxmemory, so a drainer that is
freeing memory can hand back what it could not publish.

KEYS[1]  leased    zset  entry id -> lease deadline (ms)
KEYS[2]  tokens    hash  entry id -> token of the current lease
KEYS[3]  attempts  hash  entry id -> number of claims so far
KEYS[4]  errors    hash  entry id -> last failure
ARGV[1]  delay_ms  int     milliseconds before the entry may be claimed again, >= 0
ARGV[2]  refund    int     1 to give back the attempt, 0 to count it
ARGV[3]  error     string  why the publish failed, kept for the dead-letter reason
ARGV[4], ARGV[5]  id_1, token_1  string, string  first entry and the token of its lease
ARGV[6], ARGV[7]  id_2, token_2  ... one pair per entry

Returns: {status_1, status_2, ...} one int per pair, in order
  1  released
  0  not released: the token is not the current one or the lease expired
]]

local leased_key = KEYS[1]
local tokens_key = KEYS[2]
local attempts_key = KEYS[3]
local errors_key = KEYS[4]
local delay_ms = tonumber(ARGV[1])
local refund = ARGV[2] == '1'
local error_text = ARGV[3]

local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local due = now_ms + delay_ms

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
for index = 4, #ARGV, 2 do
  local id = ARGV[index]
  local token = ARGV[index + 1]
  if holds_lease(id, token) then
    -- The new due time is written before the owner is removed.
    redis.call('ZADD', leased_key, due, id)
    redis.call('HDEL', tokens_key, id)
    if error_text ~= '' then
      redis.call('HSET', errors_key, id, error_text)
    end
    if refund and tonumber(redis.call('HGET', attempts_key, id) or '0') > 0 then
      redis.call('HINCRBY', attempts_key, id, -1)
    end
    statuses[#statuses + 1] = 1
  else
    statuses[#statuses + 1] = 0
  end
end
return statuses
