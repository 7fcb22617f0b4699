#!lua name=wfo_v2
-- workflow-orchestrator: the store's atomic operations, schema version 2 (run logs are lists).
--
-- Workflow logic never lives here. The Rust state machine decides what happens; these functions
-- only compare-and-append, so that every transition is one round trip, all or nothing.
-- Keys are always passed in KEYS (one shard's hash tag each call), so they work on Redis Cluster.

-- Is entry `id` of stream `stream` pending for `consumer` in `group`?
local function holds(stream, group, consumer, id)
  local pending = redis.call('XPENDING', stream, group, id, id, 1)
  return #pending == 1 and pending[1][2] == consumer
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

-- The statuses a run ends in.
local TERMINAL = {completed = true, failed = true, cancelled = true, timed_out = true}

-- Group commit: the transitions of several runs in one call. Every run is checked before anything
-- is written, and each gets its own outcome; the leases of the accepted runs are acknowledged
-- together at the end. The fence is one `XPENDING` read per ready stream of the consumer's own
-- pending entries (a replica holds at most about its executors' worth on a stream).
--
-- A run's log is a list: entry i (1-based) is the record of seq i, so its length is the seq.
-- The run hash's `seq` always equals it (both are written here, together: `seq` is set from the
-- records, never sent).
--
-- The arguments are positional and few, read in place (records and summary fields go to their
-- commands straight from ARGV with `unpack`): the cost of a call is its commands and its
-- arguments, so nothing a step does not use is sent.
--
-- KEYS: any order; the arguments name them by index (a run's keys share its shard's hash tag;
--       on Redis Cluster a call holds runs of one shard).
-- ARGV: group, consumer, n runs, then per run:
--       run id, expected seq (0 = create), shard key index s (KEYS[s] its ready stream,
--       KEYS[s + 1] its timers), run key index k (KEYS[k] its summary hash, KEYS[k + 1] its log),
--       lease entry ('' = none), options ('' or letters: 'r' reopen: the run may be finished,
--       resuming it; 't' clear its timer; 'e' the commit ends the run: its other queued
--       entries are withdrawn; 's' the lease's entry is the run's only live one (see
--       `check`); 'i' an idempotency key, whose key index and ttl (s) follow),
--       n records, n x record, n fields, n x (field, value), n ready tasks, n x task (each
--       its own ready entry), timer due ('' = none), n index moves, n x (key index, score for
--       ZADD or '' for ZREM) (index members are the run id),
--       then optionally how many new ready entries to claim for `consumer` once the runs are
--       written (absent or 0: none; see `claim_after`)
-- The summary's `ready_entry` holds the ids of the run's entries that may still be live,
-- space-separated: an applied commit drops its lease's entry and adds the ones it queues.
-- Returns one outcome per run, in order: {'ok', seq} | {'duplicate', run id} | {'stale'}
--         | {'lease_lost'} | {'gone'}; then the claimed entries, three items each: its ready
--         stream's key index, its id and its `data` (false when it has none).
local function parse_commits(argv)
  local runs, i = {}, 4
  for r = 1, tonumber(argv[3]) do
    local options, reopen, clear_timer, ends, sole, idem, idem_ttl = argv[i + 5], false, false, false, false, 0, nil
    local first = i
    i = i + 6
    if options ~= '' then
      reopen = string.find(options, 'r', 1, true) ~= nil
      clear_timer = string.find(options, 't', 1, true) ~= nil
      ends = string.find(options, 'e', 1, true) ~= nil
      sole = string.find(options, 's', 1, true) ~= nil
      if string.find(options, 'i', 1, true) then
        idem, idem_ttl = tonumber(argv[i]), argv[i + 1]
        i = i + 2
      end
    end
    local records = tonumber(argv[i])
    local first_record = i + 1
    i = i + 1 + records
    local fields = tonumber(argv[i]) * 2
    local first_field = i + 1
    i = i + 1 + fields
    local tasks = tonumber(argv[i])
    local first_task = i + 1
    i = i + 1 + tasks
    local indexes = tonumber(argv[i + 1]) * 2
    -- Built in one constructor, every field at once: a table grown field by field is rehashed
    -- at each power of two.
    runs[r] = {
      id = argv[first], expected = tonumber(argv[first + 1]), shard = tonumber(argv[first + 2]),
      key = tonumber(argv[first + 3]), lease = argv[first + 4], idem = idem, idem_ttl = idem_ttl,
      reopen = reopen, clear_timer = clear_timer, ends = ends, sole = sole, optimistic = false,
      records = records, first_record = first_record, fields = fields, first_field = first_field,
      tasks = tasks, first_task = first_task, due = argv[i], indexes = indexes, first_index = i + 2,
      entries = false,
    }
    i = i + 2 + indexes
  end
  -- How many commits of the call each run has (by its summary's key index).
  local commits_of = {}
  for _, run in ipairs(runs) do commits_of[run.key] = (commits_of[run.key] or 0) + 1 end
  return argv[1], argv[2], runs, tonumber(argv[i]) or 0, commits_of
end

-- Is id `a` before id `b` (both of one stream)? Cheaper than `compare_ids`: ids have no leading
-- zeros, so a shorter millisecond part is an earlier one, and parts of one length compare as
-- strings.
local function id_before(a, b)
  local a_dash, b_dash = string.find(a, '-', 1, true), string.find(b, '-', 1, true)
  if a_dash ~= b_dash then return a_dash < b_dash end
  local a_ms, b_ms = string.sub(a, 1, a_dash - 1), string.sub(b, 1, b_dash - 1)
  if a_ms ~= b_ms then return a_ms < b_ms end
  return tonumber(string.sub(a, a_dash + 1)) < tonumber(string.sub(b, b_dash + 1))
end

-- The entries of `stream` from `from` to `to` that `consumer` holds (its pending entries), as a
-- set.
local function held_by(stream, group, consumer, from, to)
  local held, page = {}, 1000
  while true do
    local pending = redis.call('XPENDING', stream, group, from, to, page, consumer)
    for _, entry in ipairs(pending) do held[entry[1]] = true end
    if #pending < page then return held end
    from = '(' .. pending[#pending][1]
  end
end

-- Checks one run against the store, without writing (but the idempotency key of a new run,
-- which is its check). `planned` holds the seq a run reaches through earlier runs of this call.
local function check_stored(keys, run, planned)
  local log = keys[run.key + 1]
  if run.expected == 0 and run.records > 0 then
    -- A creation. A run id is fresh: a run already there is this very call's, resent after a
    -- lost reply; `apply` finds that out from its log's length, without a read here.
    if planned[log] then return {'stale'} end
    if run.idem > 0 then
      local first = redis.call('SET', keys[run.idem], run.id, 'NX', 'GET', 'EX', run.idem_ttl)
      if first == run.id then return {'stale'} end
      if first then return {'duplicate', first} end
    end
    return nil
  end
  local seq, status = planned[log], nil
  if not seq then
    local summary = redis.call('HMGET', keys[run.key], 'seq', 'status', 'ready_entry')
    seq, status, run.entries = tonumber(summary[1]), summary[2], summary[3]
  end
  if not seq then
    return {'gone'}
  end
  local finished = status and TERMINAL[status]
  if run.reopen then
    -- A resume: only of a run that is still finished as the caller read it.
    if not finished then return {'stale'} end
  elseif run.records > 0 and finished then
    -- Records never go into a finished run's log (only a resume reopens it).
    return {'gone'}
  end
  if seq ~= run.expected then
    return {'stale'}
  end
  return nil
end

-- Checks one run of a call: its lease (the fence, read beforehand into `held`), then the
-- store. A step's commit whose lease is its run's only live entry ('s'), with records, the
-- run's one commit of the call, reads nothing: it is accepted on its lease (`optimistic`), and
-- `apply` checks its seq by the log's length, which its `RPUSH` returns anyway; another length
-- than the one expected takes its records back out and gives the outcome the reads would have.
-- Its live entries are then its lease's, which the commit uses up. One read fewer per step.
local function check(keys, run, held, planned, commits_of)
  if run.lease ~= '' and not held[run.shard][run.lease] then
    return {'lease_lost'}
  end
  if run.sole and run.records > 0 and commits_of and commits_of[run.key] == 1 then
    run.optimistic, run.entries = true, run.lease
    return nil
  end
  return check_stored(keys, run, planned)
end

-- The run's entries that may still be live after a commit: those before (`entries`, ids
-- separated by spaces) but the commit's lease, then the ones it queued.
local function live_entries(entries, lease, queued)
  if entries == lease or not entries or entries == '' then
    -- The usual case, a run with one step in flight: no list to go through.
    if #queued == 1 then return queued[1] end
    return table.concat(queued, ' ')
  end
  local kept = {}
  if entries and entries ~= '' then
    for id in string.gmatch(entries, '%S+') do
      if id ~= lease then kept[#kept + 1] = id end
    end
  end
  for _, id in ipairs(queued) do kept[#kept + 1] = id end
  return table.concat(kept, ' ')
end

-- Writes one checked run; returns its outcome. `written` holds the live entries of the runs
-- this call wrote so far (a run may be written twice by commits without records).
local function apply(keys, argv, run, written)
  local seq = run.expected + run.records
  if run.records > 0 then
    local length = redis.call('RPUSH', keys[run.key + 1], unpack(argv, run.first_record, run.first_record + run.records - 1))
    if run.optimistic and length ~= seq then
      -- The run moved on, ended or is gone: its records are taken back out (a log made anew
      -- here goes whole), and it gets the outcome of the reads `check` left out. A run they
      -- find at the expected seq after all (its log and its summary disagree) is written as
      -- it would have been without the option.
      local refused = check_stored(keys, run, {})
      if refused then
        if length == run.records then
          redis.call('DEL', keys[run.key + 1])
        else
          redis.call('LTRIM', keys[run.key + 1], 0, length - run.records - 1)
        end
        return refused
      end
    end
    if run.expected == 0 and length ~= run.records then
      -- A creation resent after a lost reply (see `check`): the run is there. Nothing else
      -- has been written for it; its records are taken back out.
      redis.call('LTRIM', keys[run.key + 1], 0, length - run.records - 1)
      return {'stale'}
    end
  end
  local queued = {}
  for t = run.first_task, run.first_task + run.tasks - 1 do
    queued[#queued + 1] = redis.call('XADD', keys[run.shard], '*', 'run', run.id, 'data', argv[t])
  end
  local last_field = run.first_field + run.fields - 1
  if run.ends then
    -- Its other queued steps are withdrawn: never delivered, or refused if they were (an
    -- entry being worked stays pending until its commit finds the run finished).
    local entries = live_entries(written[keys[run.key]] or run.entries, run.lease, queued)
    for id in string.gmatch(entries, '%S+') do redis.call('XDEL', keys[run.shard], id) end
    written[keys[run.key]] = ''
    redis.call('HSET', keys[run.key], 'seq', seq, 'ready_entry', '', unpack(argv, run.first_field, last_field))
  elseif run.lease ~= '' or #queued > 0 then
    local entries = live_entries(written[keys[run.key]] or run.entries, run.lease, queued)
    written[keys[run.key]] = entries
    redis.call('HSET', keys[run.key], 'seq', seq, 'ready_entry', entries, unpack(argv, run.first_field, last_field))
  else
    redis.call('HSET', keys[run.key], 'seq', seq, unpack(argv, run.first_field, last_field))
  end
  if run.due ~= '' then
    redis.call('ZADD', keys[run.shard + 1], run.due, run.id)
  elseif run.clear_timer then
    redis.call('ZREM', keys[run.shard + 1], run.id)
  end
  for i = run.first_index, run.first_index + run.indexes - 1, 2 do
    local score = argv[i + 1]
    if score == '' then
      redis.call('ZREM', keys[tonumber(argv[i])], run.id)
    else
      redis.call('ZADD', keys[tonumber(argv[i])], score, run.id)
    end
  end
  return {'ok', seq}
end

-- Claims up to `count` new entries for `consumer` from the ready streams of `runs`' shards, in
-- turn, without blocking, appending each to `out` as (shard key index, id, data). The executors
-- whose steps a commit ends take their next step from its reply: no read of their own, no
-- round trip between one step and the next. A failed read (the group is missing after a
-- restart without persistence) claims nothing: the runs are written already.
local function claim_after(keys, group, consumer, runs, count, out)
  local read = {}
  for _, run in ipairs(runs) do
    if count <= 0 then return end
    if not read[run.shard] then
      read[run.shard] = true
      local ok, reply = pcall(redis.call, 'XREADGROUP', 'GROUP', group, consumer, 'COUNT', count,
        'STREAMS', keys[run.shard], '>')
      if ok and reply then
        for _, entry in ipairs(reply[1][2]) do
          local fields, data = entry[2], false
          for f = 1, #fields, 2 do
            if fields[f] == 'data' then data = fields[f + 1] end
          end
          out[#out + 1] = run.shard
          out[#out + 1] = entry[1]
          out[#out + 1] = data
          count = count - 1
        end
      end
    end
  end
end

-- `guard(keys, group, run, held, planned)`, when given, checks each run in place of `check`
-- (the sweeper's re-queue refuses more, and claims nothing).
local function commit_runs(keys, argv, guard)
  local group, consumer, runs, claim_count, commits_of = parse_commits(argv)
  -- The fence: every lease of the call, one read per ready stream, of the consumer's pending
  -- entries between the call's first and last lease there (each one turned into a Lua table
  -- costs: a replica holds about its executors' worth).
  local held, range = {}, {}
  for _, run in ipairs(runs) do
    if run.lease ~= '' then
      local bounds = range[run.shard]
      if not bounds then
        range[run.shard] = {run.lease, run.lease}
      elseif id_before(run.lease, bounds[1]) then
        bounds[1] = run.lease
      elseif id_before(bounds[2], run.lease) then
        bounds[2] = run.lease
      end
    end
  end
  for shard, bounds in pairs(range) do
    held[shard] = held_by(keys[shard], group, consumer, bounds[1], bounds[2])
  end
  local outcomes, planned, acks = {}, {}, {}
  for r, run in ipairs(runs) do
    local refused
    if guard then
      refused = guard(keys, group, run, held, planned)
    else
      refused = check(keys, run, held, planned, commits_of)
    end
    outcomes[r] = refused
    if not refused then
      planned[keys[run.key + 1]] = run.expected + run.records
      -- Its lease is used up by this commit, as if the commit had been applied alone.
      if run.lease ~= '' then held[run.shard][run.lease] = nil end
    elseif refused[1] == 'gone' and run.lease ~= '' then
      -- Nothing to apply it to: the entry is done with.
      acks[run.shard] = acks[run.shard] or {}
      table.insert(acks[run.shard], run.lease)
    end
  end
  local written = {}
  for r, run in ipairs(runs) do
    if not outcomes[r] then
      outcomes[r] = apply(keys, argv, run, written)
      -- Applied, or found gone by an optimistic commit (see `check`): the entry is done with.
      if run.lease ~= '' and (outcomes[r][1] == 'ok' or outcomes[r][1] == 'gone') then
        acks[run.shard] = acks[run.shard] or {}
        table.insert(acks[run.shard], run.lease)
      end
    end
  end
  for shard, ids in pairs(acks) do
    redis.call('XACK', keys[shard], group, unpack(ids))
  end
  if claim_count > 0 and consumer ~= '' and not guard then
    claim_after(keys, group, consumer, runs, claim_count, outcomes)
  end
  return outcomes
end

local function commit(keys, argv)
  return commit_runs(keys, argv, nil)
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
  return commit_runs(keys, argv, function(keys, group, run, held, planned)
    local entries = redis.call('HGET', keys[run.key], 'ready_entry')
    if entries then
      for entry in string.gmatch(entries, '%S+') do
        if live_entry(keys[run.shard], group, entry) then return {'stale'} end
      end
    end
    return check(keys, run, held, planned)
  end)
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

-- Holds a run back while its workflow is paused: acknowledges the entry if `consumer` still
-- holds it and adds the run to the workflow's held set, scored by its creation time.
-- KEYS: 1 ready stream, 2 held set. ARGV: group, consumer, id, run, created at. Returns 1 or 0.
local function hold(keys, argv)
  if holds(keys[1], argv[1], argv[2], argv[3]) then
    redis.call('XACK', keys[1], argv[1], argv[3])
    redis.call('ZADD', keys[2], argv[5], argv[4])
    return 1
  end
  return 0
end

-- Concurrency groups: at most `limit` runs hold a slot (a sorted set by creation time); the
-- others wait in the group's queue (likewise), first come first served.

-- Moves the oldest waiting runs into free slots; returns their ids.
local function fill_slots(slots, queue, limit)
  local promoted = {}
  local free = limit - redis.call('ZCARD', slots)
  if free > 0 then
    local next = redis.call('ZRANGE', queue, 0, free - 1, 'WITHSCORES')
    for i = 1, #next, 2 do
      redis.call('ZADD', slots, next[i + 1], next[i])
      redis.call('ZREM', queue, next[i])
      promoted[#promoted + 1] = next[i]
    end
  end
  return promoted
end

-- What admitting a claimed run to a group (a concurrency group's slots, a rate group's window)
-- has in common: a run already in `keys[2]` goes on; an entry no longer `consumer`'s is left
-- alone; a run goes in (scored `score`) if there is room and nobody waits before it; else its
-- entry is acknowledged and it waits in `keys[3]` by creation time. KEYS: 1 ready stream, 2 the
-- group's members, 3 its queue, 4 the workflow's groups. ARGV: group, consumer, entry id, run,
-- created at, ..., group name (last). Returns 'admitted', 'not_ours' or 'queued'.
local function admit_or_queue(keys, argv, limit, score)
  local group, consumer, id, run = argv[1], argv[2], argv[3], argv[4]
  if redis.call('ZSCORE', keys[2], run) then
    return 'admitted'
  end
  if not holds(keys[1], group, consumer, id) then
    return 'not_ours'
  end
  redis.call('SADD', keys[4], argv[#argv])
  if redis.call('ZCARD', keys[3]) == 0 and redis.call('ZCARD', keys[2]) < limit then
    redis.call('ZADD', keys[2], score, run)
    return 'admitted'
  end
  redis.call('XACK', keys[1], group, id)
  redis.call('ZADD', keys[3], argv[5], run)
  return 'queued'
end

-- Admits a run whose step `consumer` claimed to its concurrency group (see `admit_or_queue`);
-- when it waits, the oldest waiting runs take any free slot.
-- ARGV: group, consumer, entry id, run, created at, limit, group name. Returns {'admitted'} |
-- {'not_ours'} | {'held', promoted...}.
local function admit(keys, argv)
  local limit = tonumber(argv[6])
  local verdict = admit_or_queue(keys, argv, limit, argv[5])
  if verdict ~= 'queued' then
    return {verdict}
  end
  local out = {'held'}
  for _, promoted in ipairs(fill_slots(keys[2], keys[3], limit)) do
    out[#out + 1] = promoted
  end
  return out
end

-- Gives back an ended run's slot (or its place in the queue), and fills free slots.
-- KEYS: 1 slots, 2 queue. ARGV: run or '', limit. Returns the promoted runs.
local function release_slot(keys, argv)
  if argv[1] ~= '' then
    redis.call('ZREM', keys[1], argv[1])
    redis.call('ZREM', keys[2], argv[1])
  end
  return fill_slots(keys[1], keys[2], tonumber(argv[2]))
end

-- Rate groups: the runs started within the period (a sorted set by start time, trimmed as the
-- window slides) and the runs waiting for capacity (by creation time), first come first served.

-- Redis's clock in ms.
local function rate_now()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

-- Slides the window to `now`, moves waiting runs into its free capacity; returns {next, ids...}
-- where `next` is when capacity frees next while runs still wait (0: none wait).
local function rate_fill(window, queue, limit, period, now)
  redis.call('ZREMRANGEBYSCORE', window, '-inf', now - period)
  local out = {0}
  local free = limit - redis.call('ZCARD', window)
  if free > 0 then
    local next = redis.call('ZRANGE', queue, 0, free - 1)
    for _, run in ipairs(next) do
      redis.call('ZADD', window, now, run)
      redis.call('ZREM', queue, run)
      out[#out + 1] = run
    end
  end
  if redis.call('ZCARD', queue) > 0 then
    local oldest = redis.call('ZRANGE', window, 0, 0, 'WITHSCORES')
    out[1] = (tonumber(oldest[2]) or now) + period
  end
  return out
end

-- Admits a run whose first step `consumer` claimed to its rate group, its start counted in the
-- window by Redis's clock (see `admit_or_queue`). KEYS: as `admit_or_queue`, 2 being the window.
-- ARGV: group, consumer, entry id, run, created at, limit, period ms, group name. Returns
-- {'admitted'} | {'not_ours'} | {'held', next, promoted...}.
local function rate_admit(keys, argv)
  local limit, period = tonumber(argv[6]), tonumber(argv[7])
  local now = rate_now()
  redis.call('ZREMRANGEBYSCORE', keys[2], '-inf', now - period)
  local verdict = admit_or_queue(keys, argv, limit, now)
  if verdict ~= 'queued' then
    return {verdict}
  end
  local out = {'held'}
  for _, value in ipairs(rate_fill(keys[2], keys[3], limit, period, now)) do
    out[#out + 1] = value
  end
  return out
end

-- Moves waiting runs into the window's free capacity. KEYS: 1 window, 2 queue. ARGV: limit,
-- period ms. Returns {next, promoted...} (next: 0 when none waits).
local function rate_release(keys, argv)
  return rate_fill(keys[1], keys[2], tonumber(argv[1]), tonumber(argv[2]), rate_now())
end

-- Debounce: a burst collects the triggers of one key until `period` passes without another (or
-- `max wait` since its first); it is then due, no longer changes (a later trigger opens the next
-- burst), and waits for a replica to start its run. Time is Redis's clock.

-- Adds a trigger to its key's open burst, or opens one. KEYS: 1 open bursts, 2 due, 3 bursts,
-- [4 the trigger's seen mark]. ARGV: key (`<workflow>:<group>`), new burst id, payload, period
-- ms, max wait ms (0: none), seen mark ttl ms, order (`ms-seq`: an event's id; '': Redis's clock
-- now). Returns {'absorbed', burst, triggers, due} |
-- {'duplicate', burst}.
local function debounce(keys, argv)
  if keys[4] then
    local seen = redis.call('GET', keys[4])
    if seen then
      return {'duplicate', seen}
    end
  end
  local now = rate_now()
  local burst = redis.call('HGET', keys[1], argv[1])
  local due = burst and tonumber(redis.call('ZSCORE', keys[2], burst))
  local first
  if due and due > now then
    first = tonumber(redis.call('HGET', keys[3], burst .. ':first')) or now
  else
    burst, first = argv[2], now
    redis.call('HSET', keys[1], argv[1], burst)
    redis.call('HSET', keys[3], burst .. ':first', now)
  end
  due = now + tonumber(argv[4])
  local max_wait = tonumber(argv[5])
  if max_wait > 0 and due > first + max_wait then
    due = first + max_wait
  end
  -- The burst keeps the payload of its latest trigger by `order`, whatever order concurrent
  -- routers absorb them in.
  local order = argv[7] ~= '' and argv[7] or (now .. '-0')
  local latest = redis.call('HGET', keys[3], burst .. ':order')
  if not latest or compare_ids(order, latest) >= 0 then
    redis.call('HSET', keys[3], burst, argv[3], burst .. ':order', order)
  end
  local triggers = redis.call('HINCRBY', keys[3], burst .. ':n', 1)
  redis.call('ZADD', keys[2], due, burst)
  if keys[4] then
    redis.call('SET', keys[4], burst, 'PX', argv[6])
  end
  return {'absorbed', burst, triggers, due}
end

-- Up to `max` due bursts, the longest due first. KEYS: 1 due, 2 bursts. ARGV: max.
-- Returns {{burst, payload, triggers, first}...} (payload '' if it is missing).
local function debounce_due(keys, argv)
  local out = {}
  local due = redis.call('ZRANGE', keys[1], '-inf', rate_now(), 'BYSCORE', 'LIMIT', 0, tonumber(argv[1]))
  for _, burst in ipairs(due) do
    local fields = redis.call('HMGET', keys[2], burst, burst .. ':n', burst .. ':first')
    out[#out + 1] = {burst, fields[1] or '', fields[2] or '0', fields[3] or '0'}
  end
  return out
end

-- Forgets a burst whose run was started. KEYS: 1 open bursts, 2 due, 3 bursts. ARGV: key, burst.
local function debounce_finish(keys, argv)
  local burst = argv[2]
  redis.call('ZREM', keys[2], burst)
  redis.call('HDEL', keys[3], burst, burst .. ':n', burst .. ':first', burst .. ':order')
  if redis.call('HGET', keys[1], argv[1]) == burst then
    redis.call('HDEL', keys[1], argv[1])
  end
  return 1
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

-- ---- Upgrading data written by schema 1, whose run logs were streams while live and one
-- concatenated string once finished. One run per call, refused (0) when the run is already in
-- the new shape, so that replicas upgrading at once convert each run once.

-- KEYS: 1 the v1 log stream, 2 the v2 log list. Returns the entries moved.
local function migrate_log(keys, argv)
  if redis.call('EXISTS', keys[2]) == 1 then return 0 end
  local entries = redis.call('XRANGE', keys[1], '-', '+')
  local values = {}
  for i, entry in ipairs(entries) do
    local fields = entry[2]
    for f = 1, #fields, 2 do
      if fields[f] == 'data' then values[#values + 1] = fields[f + 1] end
    end
    if #values ~= i then return redis.error_reply('v1 log entry ' .. entry[1] .. ' has no data') end
  end
  if #values > 0 then redis.call('RPUSH', keys[2], unpack(values)) end
  redis.call('DEL', keys[1])
  return #values
end

-- KEYS: 1 the v1 compacted history, 2 the v2 log list. ARGV: the history's byte length as read,
-- its records (split by the caller, which decodes MessagePack). Returns the records moved.
local function migrate_history(keys, argv)
  if redis.call('EXISTS', keys[2]) == 1 then return 0 end
  if redis.call('STRLEN', keys[1]) ~= tonumber(argv[1]) then
    return redis.error_reply('v1 history ' .. keys[1] .. ' changed while it was upgraded')
  end
  if #argv > 1 then redis.call('RPUSH', keys[2], unpack(argv, 2)) end
  redis.call('DEL', keys[1])
  return #argv - 1
end

redis.register_function('wfo_v2_commit_steps', commit)
redis.register_function('wfo_v2_requeue_steps', requeue)
redis.register_function('wfo_v2_migrate_log', migrate_log)
redis.register_function('wfo_v2_migrate_history', migrate_history)
redis.register_function('wfo_v2_cron_advance', cron_advance)
redis.register_function('wfo_v2_renew', renew)
redis.register_function('wfo_v2_claim', claim)
redis.register_function('wfo_v2_ack', ack)
redis.register_function('wfo_v2_hold', hold)
redis.register_function('wfo_v2_admit', admit)
redis.register_function('wfo_v2_release_slot', release_slot)
redis.register_function('wfo_v2_rate_admit', rate_admit)
redis.register_function('wfo_v2_rate_release', rate_release)
redis.register_function('wfo_v2_debounce', debounce)
redis.register_function('wfo_v2_debounce_due', debounce_due)
redis.register_function('wfo_v2_debounce_finish', debounce_finish)
redis.register_function('wfo_v2_reclaim', reclaim)
redis.register_function('wfo_v2_dead_letter', dead_letter)
redis.register_function('wfo_v2_bus_read', bus_read)
redis.register_function('wfo_v2_bus_reclaim', bus_reclaim)
redis.register_function('wfo_v2_bus_range', bus_range)
redis.register_function('wfo_v2_bus_publish', bus_publish)
redis.register_function('wfo_v2_bus_drop', bus_drop)
