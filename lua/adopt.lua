#!lua flags=allow-oom
--[[
adopt: move the oldest entries of a list written by other producers into an outbox.

Atomic: one call moves up to chunk_size entries from the tail (oldest end) of the
source list to the head of the outbox's pending list. The entries are pushed onto the
pending list before LTRIM removes them from the source, and they keep their order:
both lists get new entries at the head, and claim reads the pending list from the tail.
Entries are moved as they are; the drainer decodes them when it claims them.

The source list and the pending list must hash to one Redis Cluster slot. The Python
wrapper names the outbox after the source key, so the hash tag {source} of the outbox
keys and the source key itself give the same slot.

flags=allow-oom: runs when Redis has reached maxmemory, because moving entries is how a
full petisco list reaches the drainer; one call grows memory by at most chunk_size
entries, which LTRIM frees again before the call returns.

KEYS[1]  source      list  foreign entries, newest at the head (petisco's 'events')
KEYS[2]  pending     list  raw entries of the outbox, newest at the head
ARGV[1]  chunk_size  int   maximum entries to move in this call, 1..1000

Returns: {moved, left}
  moved  int  entries moved by this call
  left   int  entries still in the source list after this call
]]

local source_key = KEYS[1]
local pending_key = KEYS[2]
local chunk_size = tonumber(ARGV[1])

local chunk = redis.call('LRANGE', source_key, -chunk_size, -1)
if #chunk == 0 then
  return {0, 0}
end

-- LRANGE lists the chunk newest first. Pushing it oldest first leaves the newest entry
-- at the head of the pending list, as it was in the source list.
local oldest_first = {}
for index = #chunk, 1, -1 do
  oldest_first[#oldest_first + 1] = chunk[index]
end
redis.call('LPUSH', pending_key, unpack(oldest_first))

-- Only now, with the entries stored in the outbox, are they removed from the source.
redis.call('LTRIM', source_key, 0, -#chunk - 1)

return {#chunk, redis.call('LLEN', source_key)}
