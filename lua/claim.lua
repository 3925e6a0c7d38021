#!lua flags=allow-oom
--[[
claim: lease up to batch_size entries of one outbox to one drainer.

Atomic: takes back expired leases first (oldest deadline first), then leases new
entries from the tail of the pending list (FIFO, since producers LPUSH at the head).
A taken-back entry that already used max_attempts claims goes to the dead letters
instead. Every leased entry gets the same new token and a deadline of
now + lease_ms, both from the Redis server clock.

flags=allow-oom: runs when Redis has reached maxmemory, because draining is how
a full outbox frees memory; one call grows memory by at most batch_size leases.

KEYS[1]  pending   list    raw entries, newest at the head
KEYS[2]  leased    zset    entry id -> lease deadline (ms, server time)
KEYS[3]  tokens    hash    entry id -> token of the current lease
KEYS[4]  payloads  hash    entry id -> raw entry
KEYS[5]  attempts  hash    entry id -> number of claims so far
KEYS[6]  errors    hash    entry id -> last failure or dead-letter reason
KEYS[7]  dead      zset    entry id -> time it was dead-lettered (ms, server time)
KEYS[8]  sequence  string  counter for entry ids and tokens
ARGV[1]  batch_size    int  maximum entries to lease, 1..10000
ARGV[2]  lease_ms      int  lease duration in milliseconds, > 0
ARGV[3]  max_attempts  int  claims an entry may get before it is dead-lettered, >= 1

Returns: {token, now_ms, dead_count, id_1, attempts_1, payload_1, id_2, ...}
  token       string  token of every lease in this reply
  now_ms      int     server time of the claim in milliseconds
  dead_count  int     entries moved to the dead letters by this call
  then one triple per leased entry: id (string), attempts (int), payload (bytes)
]]

local pending_key = KEYS[1]
local leased_key = KEYS[2]
local tokens_key = KEYS[3]
local payloads_key = KEYS[4]
local attempts_key = KEYS[5]
local errors_key = KEYS[6]
local dead_key = KEYS[7]
local sequence_key = KEYS[8]
local batch_size = tonumber(ARGV[1])
local lease_ms = tonumber(ARGV[2])
local max_attempts = tonumber(ARGV[3])

-- Lists are read in chunks so no single reply or table grows with the backlog.
local CHUNK = 1000

local time = redis.call('TIME')
local now_ms = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local deadline = now_ms + lease_ms
local token = tostring(redis.call('INCR', sequence_key))
local reply = {token, now_ms, 0}
local leased_count = 0
local dead_count = 0

-- Phase 1: expired leases (crashed or slow drainers, released and requeued entries).
-- At most batch_size entries are examined, so a long run of dead letters stays bounded.
local expired = redis.call('ZRANGE', leased_key, '-inf', now_ms, 'BYSCORE', 'LIMIT', 0, batch_size)
for _, id in ipairs(expired) do
  local attempts = tonumber(redis.call('HGET', attempts_key, id) or '0')
  local had_owner = redis.call('HEXISTS', tokens_key, id) == 1
  if had_owner then
    redis.call('HSET', errors_key, id, 'lease expired before the drainer acknowledged it')
  end
  if attempts >= max_attempts then
    local last_error = redis.call('HGET', errors_key, id) or 'no error recorded'
    redis.call('ZADD', dead_key, now_ms, id)
    redis.call('HSET', errors_key, id,
      'gave up after ' .. attempts .. ' attempts; last error: ' .. last_error)
    redis.call('ZREM', leased_key, id)
    redis.call('HDEL', tokens_key, id)
    dead_count = dead_count + 1
  else
    local payload = redis.call('HGET', payloads_key, id)
    if payload then
      attempts = redis.call('HINCRBY', attempts_key, id, 1)
      redis.call('HSET', tokens_key, id, token)
      redis.call('ZADD', leased_key, deadline, id)
      reply[#reply + 1] = id
      reply[#reply + 1] = attempts
      reply[#reply + 1] = payload
      leased_count = leased_count + 1
    else
      -- A lease without a payload has nothing left to publish; drop its remains.
      redis.call('ZREM', leased_key, id)
      redis.call('HDEL', tokens_key, id)
      redis.call('HDEL', attempts_key, id)
      redis.call('HDEL', errors_key, id)
    end
  end
end

-- Phase 2: new entries, oldest (the tail) first. Each chunk is copied into the
-- lease tables before LTRIM removes it from the list. Every write covers a whole
-- chunk, so at most 2 * CHUNK arguments are unpacked into one command.
while leased_count < batch_size do
  local take = math.min(CHUNK, batch_size - leased_count)
  local chunk = redis.call('LRANGE', pending_key, -take, -1)
  if #chunk == 0 then
    break
  end
  local last_id = redis.call('INCRBY', sequence_key, #chunk)
  local first_id = last_id - #chunk + 1
  local payload_fields = {}
  local attempt_fields = {}
  local token_fields = {}
  local deadlines = {}
  for offset = 0, #chunk - 1 do
    local id = tostring(first_id + offset)
    local payload = chunk[#chunk - offset]
    payload_fields[#payload_fields + 1] = id
    payload_fields[#payload_fields + 1] = payload
    attempt_fields[#attempt_fields + 1] = id
    attempt_fields[#attempt_fields + 1] = 1
    token_fields[#token_fields + 1] = id
    token_fields[#token_fields + 1] = token
    deadlines[#deadlines + 1] = deadline
    deadlines[#deadlines + 1] = id
    reply[#reply + 1] = id
    reply[#reply + 1] = 1
    reply[#reply + 1] = payload
  end
  redis.call('HSET', payloads_key, unpack(payload_fields))
  redis.call('HSET', attempts_key, unpack(attempt_fields))
  redis.call('HSET', tokens_key, unpack(token_fields))
  redis.call('ZADD', leased_key, unpack(deadlines))
  redis.call('LTRIM', pending_key, 0, -#chunk - 1)
  leased_count = leased_count + #chunk
end

reply[3] = dead_count
return reply
