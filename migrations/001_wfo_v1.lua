#!lua name=wfo_v1
-- workflow-orchestrator: the store's atomic operations, schema version 1.
--
-- Workflow logic never lives here. The Rust state machine decides what happens; these functions
-- only compare-and-append, so that every transition is one round trip, all or nothing.
-- Keys are always passed in KEYS (one shard's hash tag each call), so they work on Redis Cluster.

-- Reads ARGV front to back.
local function cursor(argv)
  local i = 0
  return function()
    i = i + 1
    return argv[i]
  end
end

-- Is entry `id` of stream `stream` pending for `consumer` in `group`?
local function holds(stream, group, consumer, id)
  local pending = redis.call('XPENDING', stream, group, id, id, 1)
  return #pending == 1 and pending[1][2] == consumer
end

-- KEYS: 1 run hash, 2 log stream, 3 compacted history, 4 ready stream, 5 timers, 6.. extra keys
-- ARGV: run id, expected seq (0 = create), lease entry ('' = none), group, consumer,
--       idempotency key index into KEYS (0 = none), idempotency ttl (s),
--       n reopened, n x (type, data) (a finished run's whole log, written back as a live log
--       before the records: resuming a failed run),
--       n records, n x (type, data), compact ('1' = the run ends: fold the log into KEYS[3]),
--       n fields, n x (field, value), dispatch data ('' = none), timer due ('' = none),
--       clear timer ('1'/'0'), n zadd, n x (key index, score, member), n zrem, n x (key index, member),
--       fetch next ('1': also claim one new entry of the shard for the lease's consumer)
-- Returns {'ok', seq, ready entry id or '' [, next id, next fields]} | {'duplicate', run id} |
--         {'stale'} | {'lease_lost'} | {'gone'}
local function commit(keys, argv)
  local arg = cursor(argv)
  local run_id = arg()
  local expected = tonumber(arg())
  local lease, group, consumer = arg(), arg(), arg()
  local idem_index, idem_ttl = tonumber(arg()), arg()

  if lease ~= '' and not holds(keys[4], group, consumer, lease) then
    return {'lease_lost'}
  end

  local n_reopen = tonumber(arg())
  local reopen = {}
  for i = 1, n_reopen do
    reopen[i] = {arg(), arg()}
  end

  local n_records = tonumber(arg())
  local records = {}
  for i = 1, n_records do
    records[i] = {arg(), arg()}
  end

  -- The compare: a new run's first record goes in at id `1-0`, which Redis refuses if the log
  -- exists; a live run's records go in from `<expected + 1>-0`.
  if expected == 0 and n_records > 0 then
    if idem_index > 0 then
      local first = redis.call('SET', keys[idem_index], run_id, 'NX', 'GET', 'EX', idem_ttl)
      if first then
        return {'duplicate', first}
      end
    end
    local added = redis.pcall('XADD', keys[2], '1-0', 'type', records[1][1], 'data', records[1][2])
    if type(added) == 'table' and added.err then
      return {'stale'}
    end
  elseif n_records > 0 then
    if n_reopen > 0 then
      -- Resuming a finished run: its compacted log becomes a live log again (`1-0` ...), if the
      -- run is still finished exactly as the caller read it; then the records follow as usual.
      if redis.call('EXISTS', keys[2]) == 1 then
        return {'stale'}
      end
      local seq = redis.call('HGET', keys[1], 'seq')
      if not seq or redis.call('EXISTS', keys[3]) == 0 then
        return {'gone'}
      end
      if tonumber(seq) ~= expected or n_reopen ~= expected then
        return {'stale'}
      end
      for i = 1, n_reopen do
        redis.call('XADD', keys[2], i .. '-0', 'type', reopen[i][1], 'data', reopen[i][2])
      end
      redis.call('DEL', keys[3])
    end
    -- Redis refuses an id at or below the log's last one: so this append fails if anything was
    -- appended since `expected` (the caller decided on stale state). A seq from the future is
    -- not checked: every seq the engine uses was read from the log, and an extra read per
    -- transition is the price of checking it.
    local added = redis.pcall('XADD', keys[2], 'NOMKSTREAM', (expected + 1) .. '-0',
      'type', records[1][1], 'data', records[1][2])
    if type(added) == 'table' and added.err then
      return {'stale'}
    end
    if not added then
      -- No live log: the run ended (its log was compacted) or does not exist.
      if lease ~= '' then redis.call('XACK', keys[4], group, lease) end
      return {'gone'}
    end
  else
    local seq = redis.call('HGET', keys[1], 'seq')
    if not seq then
      if lease ~= '' then redis.call('XACK', keys[4], group, lease) end
      return {'gone'}
    end
    if tonumber(seq) ~= expected then
      return {'stale'}
    end
  end

  local compact = arg() == '1'
  if compact then
    -- The run ends: its whole log becomes one value, and the stream (with its fixed node
    -- overhead) goes away.
    local parts = {}
    for _, entry in ipairs(redis.call('XRANGE', keys[2], '-', '+')) do
      local fields = entry[2]
      for f = 1, #fields, 2 do
        if fields[f] == 'data' then parts[#parts + 1] = fields[f + 1] end
      end
    end
    for i = 2, n_records do
      parts[#parts + 1] = records[i][2]
    end
    redis.call('SET', keys[3], table.concat(parts))
    redis.call('DEL', keys[2])
  else
    for i = 2, n_records do
      redis.call('XADD', keys[2], (expected + i) .. '-0', 'type', records[i][1], 'data', records[i][2])
    end
  end

  local n_fields = tonumber(arg())
  local hset = {}
  for i = 1, n_fields * 2 do
    hset[i] = arg()
  end

  local dispatch = arg()
  local ready_id = ''
  if dispatch ~= '' then
    ready_id = redis.call('XADD', keys[4], '*', 'run', run_id, 'data', dispatch)
    hset[#hset + 1] = 'ready_entry'
    hset[#hset + 1] = ready_id
  end
  if #hset > 0 then
    redis.call('HSET', keys[1], unpack(hset))
  end

  local due = arg()
  if arg() == '1' and due == '' then
    redis.call('ZREM', keys[5], run_id)
  end
  if due ~= '' then
    redis.call('ZADD', keys[5], due, run_id)
  end

  for _ = 1, tonumber(arg()) do
    local index, score, member = tonumber(arg()), arg(), arg()
    redis.call('ZADD', keys[index], score, member)
  end
  for _ = 1, tonumber(arg()) do
    local index, member = tonumber(arg()), arg()
    redis.call('ZREM', keys[index], member)
  end

  if lease ~= '' then
    redis.call('XACK', keys[4], group, lease)
  end
  -- The executor may take its next step in the same round trip (often the step just queued):
  -- one new entry of this shard's ready stream, for the same consumer.
  if arg() == '1' and lease ~= '' then
    local next = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', keys[4], '>')
    if next then
      local entry = next[1][2][1]
      return {'ok', expected + n_records, ready_id, entry[1], entry[2]}
    end
  end
  return {'ok', expected + n_records, ready_id}
end

-- Renews leases: resets the idle time of the entries `consumer` still holds.
-- KEYS: 1 ready stream. ARGV: group, consumer, entry ids... Returns the ids it no longer holds.
local function renew(keys, argv)
  local group, consumer = argv[1], argv[2]
  local lost = {}
  for i = 3, #argv do
    if holds(keys[1], group, consumer, argv[i]) then
      redis.call('XCLAIM', keys[1], group, consumer, 0, argv[i], 'JUSTID')
    else
      lost[#lost + 1] = argv[i]
    end
  end
  return lost
end

-- Claims up to `max` new entries for `consumer` from the streams in KEYS, in order, without
-- blocking: exact, however few executors are free and however many shards there are.
-- KEYS: ready streams. ARGV: group, consumer, max. Returns {{key index, id, fields}...}.
local function claim(keys, argv)
  local group, consumer, left = argv[1], argv[2], tonumber(argv[3])
  local out = {}
  for i = 1, #keys do
    if left <= 0 then break end
    local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', left, 'STREAMS', keys[i], '>')
    if reply then
      for _, entry in ipairs(reply[1][2]) do
        out[#out + 1] = {i, entry[1], entry[2]}
        left = left - 1
      end
    end
  end
  return out
end

-- Acknowledges an entry if `consumer` still holds it. KEYS: 1 ready. ARGV: group, consumer, id.
local function ack(keys, argv)
  if holds(keys[1], argv[1], argv[2], argv[3]) then
    return redis.call('XACK', keys[1], argv[1], argv[3])
  end
  return 0
end

-- Takes over entries idle longer than the lease (Redis's clock judges), with delivery counts.
-- KEYS: 1 ready stream. ARGV: group, consumer, min idle ms, start id, count.
-- Returns {next start, {{id, fields, deliveries}...}, {deleted ids...}}.
local function reclaim(keys, argv)
  local group, consumer = argv[1], argv[2]
  local claimed = redis.call('XAUTOCLAIM', keys[1], group, consumer, argv[3], argv[4], 'COUNT', argv[5])
  local out = {}
  for _, entry in ipairs(claimed[2]) do
    local pending = redis.call('XPENDING', keys[1], group, entry[1], entry[1], 1)
    local deliveries = 1
    if #pending == 1 then deliveries = pending[1][4] end
    out[#out + 1] = {entry[1], entry[2], deliveries}
  end
  -- Entries deleted from the stream while pending cannot be worked: drop them from the
  -- pending list (the sweeper re-queues their runs from the runs' own state).
  for _, id in ipairs(claimed[3] or {}) do
    redis.call('XACK', keys[1], group, id)
  end
  return {claimed[1], out, claimed[3] or {}}
end

-- Moves an undecodable ready entry to the dead-letter stream with its reason, and acks it.
-- KEYS: 1 ready, 2 dead. ARGV: group, id, reason.
local function dead_letter(keys, argv)
  local entry = redis.call('XRANGE', keys[1], argv[2], argv[2])
  local fields = {'reason', argv[3], 'entry', argv[2]}
  if #entry == 1 then
    for _, value in ipairs(entry[1][2]) do fields[#fields + 1] = value end
  end
  redis.call('XADD', keys[2], 'MAXLEN', '~', 10000, '*', unpack(fields))
  return redis.call('XACK', keys[1], argv[1], argv[2])
end

-- Records a handled cron fire; the last fire only moves forward.
-- KEYS: 1 the schedule's hash. ARGV: fire (ms), run id ('' = none started).
-- Returns 1 if this call moved the last fire forward, 0 if another replica had already.
local function cron_advance(keys, argv)
  local last = tonumber(redis.call('HGET', keys[1], 'last_fire') or '0')
  local advanced = 0
  if tonumber(argv[1]) > last then
    redis.call('HSET', keys[1], 'last_fire', argv[1])
    advanced = 1
  end
  if argv[2] ~= '' then
    redis.call('HSET', keys[1], 'last_run', argv[2])
  end
  return advanced
end

redis.register_function('wfo_v1_commit', commit)
redis.register_function('wfo_v1_cron_advance', cron_advance)
redis.register_function('wfo_v1_renew', renew)
redis.register_function('wfo_v1_claim', claim)
redis.register_function('wfo_v1_ack', ack)
redis.register_function('wfo_v1_reclaim', reclaim)
redis.register_function('wfo_v1_dead_letter', dead_letter)
