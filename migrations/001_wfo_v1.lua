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

-- Orders two stream ids (`ms-seq`): -1, 0 or 1.
local function compare_ids(a, b)
  local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
  local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
  a_ms, b_ms = tonumber(a_ms), tonumber(b_ms)
  if a_ms ~= b_ms then return a_ms < b_ms and -1 or 1 end
  a_seq, b_seq = tonumber(a_seq), tonumber(b_seq)
  if a_seq ~= b_seq then return a_seq < b_seq and -1 or 1 end
  return 0
end

-- Is entry `id` of `stream` still live for `group`: leased (pending under some consumer), or
-- queued (in the stream and after the group's last delivered id)? An acknowledged entry stays
-- in the stream until it is trimmed, so being in it is not enough.
local function live_entry(stream, group, id)
  if #redis.call('XPENDING', stream, group, id, id, 1) == 1 then return true end
  if #redis.call('XRANGE', stream, id, id) == 0 then return false end
  for _, info in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local name, last
    for f = 1, #info, 2 do
      if info[f] == 'name' then name = info[f + 1] end
      if info[f] == 'last-delivered-id' then last = info[f + 1] end
    end
    if name == group then return compare_ids(id, last) > 0 end
  end
  return false
end

-- The sweeper's re-queue of a run it found with no queued step, no lease and no timer: the same
-- arguments as `commit`, but refused as stale when the run's ready entry is live after all (the
-- sweeper judged from reads that were not one snapshot). Judged here, in the same atomic call as
-- the append, so that a re-queue never adds a second ready entry beside a live one, however
-- many replicas sweep at once.
local function requeue(keys, argv)
  local entry = redis.call('HGET', keys[1], 'ready_entry')
  if entry and entry ~= '' and live_entry(keys[4], argv[4], entry) then
    return {'stale'}
  end
  return commit(keys, argv)
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

-- ---- The event bus: anyone may XADD anything, so every read of it is cut to size here, in
-- Redis, before a replica sees it; and entries with ids ahead of the clock are removed so that
-- Redis can keep giving new entries ids. Each function touches one key (cluster-safe).

-- An entry of the bus as a replica may see it: `{id, fields}` when its field names and values
-- total at most `max` bytes; else `{id, cut fields, total bytes, value sizes}`, where each of the
-- first 64 fields keeps a `keep`-byte prefix of its value (and of its name), and value sizes are
-- the original sizes of the kept values. `#value` of a Lua string costs nothing.
local function bus_cut(entry, max, keep)
  local fields = entry[2]
  local total = 0
  for f = 1, #fields do
    total = total + #fields[f]
  end
  if total <= max then
    return {entry[1], fields}
  end
  local cut, sizes = {}, {}
  for f = 1, math.min(#fields, 128), 2 do
    cut[#cut + 1] = string.sub(fields[f], 1, 256)
    cut[#cut + 1] = string.sub(fields[f + 1] or '', 1, keep)
    sizes[#sizes + 1] = #(fields[f + 1] or '')
  end
  return {entry[1], cut, total, sizes}
end

-- Bytes an entry as returned by `bus_cut` carries.
local function bus_weight(cut)
  local weight = 0
  for _, part in ipairs(cut[2]) do weight = weight + #part end
  return weight
end

-- The store's clock in ms.
local function bus_now()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

-- The ms part of an entry id, as a number.
local function bus_ms(id)
  return tonumber(string.match(id, '^(%d+)-')) or 0
end

-- New bus entries for the router, cut to size, read a few at a time so that neither this call
-- nor its reply holds more than about `budget` bytes (the rest stays queued for the next read).
-- KEYS: 1 bus. ARGV: group, consumer, count, max, keep, budget. Returns cut entries.
local function bus_read(keys, argv)
  local group, consumer = argv[1], argv[2]
  local left, max, keep, budget = tonumber(argv[3]), tonumber(argv[4]), tonumber(argv[5]), tonumber(argv[6])
  local out, weight = {}, 0
  while left > 0 and weight < budget do
    local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', math.min(left, 10),
      'STREAMS', keys[1], '>')
    if not reply then break end
    local entries = reply[1][2]
    for _, entry in ipairs(entries) do
      local cut = bus_cut(entry, max, keep)
      out[#out + 1] = cut
      weight = weight + bus_weight(cut)
    end
    left = left - #entries
    if #entries == 0 then break end
  end
  return out
end

-- Takes over bus entries idle longer than the lease, cut to size, with their delivery counts;
-- entries deleted while pending leave the pending list.
-- KEYS: 1 bus. ARGV: group, consumer, min idle ms, count, max, keep.
-- Returns {{id, fields, total or 0, sizes or {}, deliveries}...}.
local function bus_reclaim(keys, argv)
  local group, consumer, idle = argv[1], argv[2], argv[3]
  local left, max, keep = tonumber(argv[4]), tonumber(argv[5]), tonumber(argv[6])
  local out, start = {}, '0-0'
  while left > 0 do
    local claimed = redis.call('XAUTOCLAIM', keys[1], group, consumer, idle, start, 'COUNT', math.min(left, 10))
    for _, entry in ipairs(claimed[2]) do
      local pending = redis.call('XPENDING', keys[1], group, entry[1], entry[1], 1)
      local cut = bus_cut(entry, max, keep)
      local deliveries = 1
      if #pending == 1 then deliveries = pending[1][4] end
      out[#out + 1] = {cut[1], cut[2], cut[3] or 0, cut[4] or {}, deliveries}
      left = left - 1
    end
    for _, id in ipairs(claimed[3] or {}) do
      redis.call('XACK', keys[1], group, id)
    end
    start = claimed[1]
    if start == '0-0' then break end
  end
  return out
end

-- A range of a stream (the bus or its dead letters), cut to size, read a few at a time.
-- KEYS: 1 stream. ARGV: 'rev' or 'fwd', start, end (as XRANGE/XREVRANGE take them), count, max,
-- keep. Returns cut entries.
local function bus_range(keys, argv)
  local command = argv[1] == 'rev' and 'XREVRANGE' or 'XRANGE'
  local from, to = argv[2], argv[3]
  local left, max, keep = tonumber(argv[4]), tonumber(argv[5]), tonumber(argv[6])
  local out = {}
  while left > 0 do
    local entries = redis.call(command, keys[1], from, to, 'COUNT', math.min(left, 10))
    for _, entry in ipairs(entries) do
      out[#out + 1] = bus_cut(entry, max, keep)
    end
    left = left - #entries
    if #entries < 10 then break end
    from = '(' .. entries[#entries][1]
  end
  return out
end

-- Appends an event, as `XADD * ...`, unless Redis cannot give it an id at most `tolerance` ms
-- ahead of its clock (an entry with an id far ahead, or at the very end of the id space, was
-- written): then nothing is appended and the caller repairs the bus (`bus_drop`) and retries.
-- KEYS: 1 bus. ARGV: tolerance ms, field, value, ... Returns {'ok', id} | {'hostile', why}.
local function bus_publish(keys, argv)
  local tolerance = tonumber(argv[1])
  local added = redis.pcall('XADD', keys[1], '*', unpack(argv, 2))
  if type(added) == 'table' and added.err then
    -- "The stream has exhausted the last possible ID" / "The ID specified in XADD is equal or
    -- smaller than the target stream top item": the ids; anything else is not ours to repair.
    if string.find(added.err, ' ID', 1, true) then
      return {'hostile', added.err}
    end
    return redis.error_reply(added.err)
  end
  if bus_ms(added) > bus_now() + tolerance then
    redis.call('XDEL', keys[1], added)
    return {'hostile', 'the next id, ' .. added .. ', is ahead of the clock'}
  end
  return {'ok', added}
end

-- Removes the given bus entries (already dead-lettered by the caller) that are still more than
-- `tolerance` ms ahead of the clock, and, once none is left, sets the stream's last id back to
-- its top entry (or now), and the router group's last delivered id back to it, so that `XADD *`
-- gives ids by the clock again. MAXDELETEDID goes back with it: XSETID refuses one above the
-- last id.
-- KEYS: 1 bus. ARGV: group, tolerance ms, ids... Returns {'ok', removed, last id} | {'more', removed}.
local function bus_drop(keys, argv)
  local group, limit = argv[1], bus_now() + tonumber(argv[2])
  local removed = 0
  if redis.call('EXISTS', keys[1]) == 0 then
    return {'ok', 0, ''}
  end
  for i = 3, #argv do
    if bus_ms(argv[i]) > limit then
      redis.call('XACK', keys[1], group, argv[i])
      removed = removed + redis.call('XDEL', keys[1], argv[i])
    end
  end
  if #redis.call('XRANGE', keys[1], string.format('%.0f-0', limit + 1), '+', 'COUNT', 1) > 0 then
    return {'more', removed}
  end
  local now = string.format('%.0f-0', bus_now())
  local last = now
  local top = redis.call('XREVRANGE', keys[1], '+', '-', 'COUNT', 1)
  if #top == 1 and bus_ms(top[1][1]) >= bus_ms(now) then
    last = top[1][1]
  end
  local info = redis.call('XINFO', 'STREAM', keys[1])
  local generated = last
  for f = 1, #info, 2 do
    if info[f] == 'last-generated-id' then generated = info[f + 1] end
  end
  if bus_ms(generated) > limit then
    redis.call('XSETID', keys[1], last, 'MAXDELETEDID', last)
  else
    last = generated
  end
  for _, group_info in ipairs(redis.call('XINFO', 'GROUPS', keys[1])) do
    local name, delivered
    for f = 1, #group_info, 2 do
      if group_info[f] == 'name' then name = group_info[f + 1] end
      if group_info[f] == 'last-delivered-id' then delivered = group_info[f + 1] end
    end
    if name == group and delivered and bus_ms(delivered) > limit then
      redis.call('XGROUP', 'SETID', keys[1], group, last)
    end
  end
  return {'ok', removed, last}
end

redis.register_function('wfo_v1_commit', commit)
redis.register_function('wfo_v1_requeue', requeue)
redis.register_function('wfo_v1_cron_advance', cron_advance)
redis.register_function('wfo_v1_renew', renew)
redis.register_function('wfo_v1_claim', claim)
redis.register_function('wfo_v1_ack', ack)
redis.register_function('wfo_v1_reclaim', reclaim)
redis.register_function('wfo_v1_dead_letter', dead_letter)
redis.register_function('wfo_v1_bus_read', bus_read)
redis.register_function('wfo_v1_bus_reclaim', bus_reclaim)
redis.register_function('wfo_v1_bus_range', bus_range)
redis.register_function('wfo_v1_bus_publish', bus_publish)
redis.register_function('wfo_v1_bus_drop', bus_drop)
