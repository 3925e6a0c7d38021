#!lua flags=allow-oom
--[[
purge: delete dead letters for good.

Atomic per call. Without ids, the oldest dead letters are deleted, at most limit;
callers repeat until the reply is 0 to purge everything.

flags=allow-oom: runs when Redis has reached maxmemory, because purging is one
way to free memory.

KEYS[1]  payloads  hash  entry id -> raw entry
KEYS[2]  attempts  hash  entry id -> number of claims so far
KEYS[3]  errors    hash  entry id -> last failure or dead-letter reason
KEYS[4]  dead      zset  entry id -> time it was dead-lettered (ms)
ARGV[1]  limit  int     maximum entries to delete when no ids are given, 1..10000
ARGV[2]  id_1   string  optional: entries to delete; ids that are not dead letters are skipped
ARGV[3]  id_2   ...

Returns: int  number of entries deleted
]]

local payloads_key = KEYS[1]
local attempts_key = KEYS[2]
local errors_key = KEYS[3]
local dead_key = KEYS[4]
local limit = tonumber(ARGV[1])

local ids = {}
if #ARGV > 1 then
  for index = 2, #ARGV do
    ids[#ids + 1] = ARGV[index]
  end
else
  ids = redis.call('ZRANGE', dead_key, 0, limit - 1)
end

local purged = 0
for _, id in ipairs(ids) do
  if redis.call('ZSCORE', dead_key, id) then
    redis.call('HDEL', payloads_key, id)
    redis.call('HDEL', attempts_key, id)
    redis.call('HDEL', errors_key, id)
    redis.call('ZREM', dead_key, id)
    purged = purged + 1
  end
end
return purged
