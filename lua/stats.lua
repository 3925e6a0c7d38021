#!lua flags=no-writes
--[[
stats: count the entries of one outbox in each state.

Atomic: all counts come from one consistent moment. Read-only, so it also runs on
replicas.

KEYS[1]  pending  list  raw entries, newest at the head
KEYS[2]  leased   zset  entry id -> lease deadline (ms)
KEYS[3]  tokens   hash  entry id -> token of the current lease
KEYS[4]  dead     zset  entry id -> time it was dead-lettered (ms)

Returns: {pending, leased, waiting, dead, expired, now_ms}
  pending  int  entries never claimed
  leased   int  entries held by a drainer (including leases that expired)
  waiting  int  entries released or requeued, due for the next claim at their time
  dead     int  dead letters
  expired  int  leased or waiting entries whose deadline has passed
  now_ms   int  server time in milliseconds
]]

local pending_key = KEYS[1]
local leased_key = KEYS[2]
local tokens_key = KEYS[3]
local dead_key = KEYS[4]

local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)

local in_leased_set = redis.call('ZCARD', leased_key)
local owned = redis.call('HLEN', tokens_key)
return {
  redis.call('LLEN', pending_key),
  owned,
  in_leased_set - owned,
  redis.call('ZCARD', dead_key),
  redis.call('ZCOUNT', leased_key, '-inf', now_ms),
  now_ms,
}
