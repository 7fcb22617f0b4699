//! The in-memory store: the embedded default (one process, nothing survives a restart) and the
//! fast store of tests.
//!
//! It mirrors the Redis store operation by operation, so that the engine cannot tell them apart:
//! - each run keeps its log (seq = position + 1), its summary (the run hash), its timer and,
//!   once it ended, the status and time it ended with (its log is then closed, as Redis compacts
//!   it, but still readable);
//! - each shard's ready queue models a Redis stream read by the consumer group `workers`:
//!   entries with increasing `<ms>-<n>` ids, a last-delivered cursor, and a pending list whose
//!   entries (owner, last delivery, delivery count) are the leases;
//! - indexes model the sorted sets `idx:all`, `idx:wf:<workflow>`, `idx:active` (by creation
//!   time) and `idx:st:<status>` (by end time), with ties ordered by run id text as Redis orders
//!   members of equal score;
//! - a commit checks and changes in the order of `wfo_v2_commit_group` in `migrations/002_wfo_v2.lua`.
//!
//! Every operation is a synchronous method of the private `State`, run under one lock: that makes each as
//! atomic as one Redis function call and keeps the async trait methods thin.

use super::prelude::*;
use super::{
    Admission, BUS_CLOCK_TOLERANCE, BusCondition, BusEntry, Claimed, Commit, CommitOutcome, Created, CronState,
    DEAD_LETTER_KEEP, DebounceTrigger, Debounced, DueBurst, EntryCap, EventQuery, Housekeeping, Lease, ListedEvent,
    Logged, NewRun, RateAdmission, RateGroup, ReadyTask, ReplicaBeat, RunId, RunPage, RunQuery, RunSummary,
    SearchQuery, SettledEvent, SlotGroup, StepCommit, StepCommitted, StoreError, StoreHealth, StoreKind, StoreResult,
    StreamStats, burst_key, compare_entry_ids, dead_letter_fields, debounce_key, terminal_name,
};
use crate::definition::Workflow;
use crate::machine::{Millis, Recorded, RunState, Status};
use async_trait::async_trait;
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::ops::Bound;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;

/// The store kept in this process's memory. Cloning gives another handle on the same state,
/// as two replicas would share one Redis.
#[derive(Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

struct Shared {
    /// The whole state behind one lock: every operation takes it once and does all its work
    /// under it, so each is atomic like one Redis function call. Sections are short and
    /// synchronous; the lock is never held across an `.await`.
    state: Mutex<State>,
    /// Wakes `claim` calls blocked waiting for work whenever a step is dispatched, as a new
    /// stream entry wakes a blocked `XREADGROUP`.
    dispatched: Notify,
    /// Wakes the router's blocked reads when an event is published.
    published: Notify,
    shards: u16,
}

impl MemoryStore {
    /// Applies a group's items under one lock (atomic, as one call is in Redis), each by `apply`,
    /// which gives its outcome and whether it queued a step; blocked claims are woken once if
    /// any did.
    fn apply_group<T, O>(
        &self,
        items: Vec<T>,
        mut apply: impl FnMut(&mut State, T) -> StoreResult<(O, bool)>,
    ) -> StoreResult<Vec<O>> {
        let mut dispatched = false;
        let outcomes = {
            let mut state = self.shared.state.lock();
            items
                .into_iter()
                .map(|item| {
                    let (outcome, queued) = apply(&mut state, item)?;
                    dispatched |= queued;
                    Ok(outcome)
                })
                .collect::<StoreResult<Vec<O>>>()?
        };
        if dispatched {
            self.shared.dispatched.notify_waiters();
        }
        Ok(outcomes)
    }

    /// A new, empty store spreading runs over `shards` shards (at least one). Lease expiry is
    /// judged by `reclaim`'s `min_idle`, as in Redis, so the store keeps no lease time.
    pub fn new(shards: u16) -> MemoryStore {
        MemoryStore {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                dispatched: Notify::new(),
                published: Notify::new(),
                shards: shards.max(1),
            }),
        }
    }
}

/// Wall clock milliseconds since the Unix epoch: with one process, the one clock.
fn wall_clock() -> StoreResult<Millis> {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|since| since.as_millis() as Millis)
        .map_err(|_| StoreError::Fatal("the system clock is set before 1970".to_owned()))
}

/// A ready entry's id, ordered like a Redis stream id and written the same way, `<ms>-<n>`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct EntryId {
    ms: u64,
    n: u64,
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.n)
    }
}

impl EntryId {
    /// The id `XADD <stream> *` gives after `self` at `now`: never going backwards.
    fn next(self, now: Millis) -> EntryId {
        if now > self.ms { EntryId { ms: now, n: 0 } } else { EntryId { ms: self.ms, n: self.n + 1 } }
    }
}

impl FromStr for EntryId {
    type Err = ();
    fn from_str(text: &str) -> Result<EntryId, ()> {
        let (ms, n) = text.split_once('-').ok_or(())?;
        Ok(EntryId { ms: ms.parse().map_err(|_| ())?, n: n.parse().map_err(|_| ())? })
    }
}

/// A delivered, unacknowledged entry: the lease on it.
#[derive(Debug, Clone)]
struct Pending {
    owner: String,
    /// When it was last delivered or renewed: its idle time is measured from here.
    since: Instant,
    deliveries: u64,
}

/// A stream read by one consumer group, as Redis keeps one: entries with increasing ids, the
/// group's last-delivered id and its pending list. Each shard's ready stream (group `workers`)
/// and the event bus (group `router`) are one.
#[derive(Debug)]
struct GroupStream<T> {
    /// The stream: entries stay until trimmed (housekeeping keeps the queued and pending ones).
    entries: BTreeMap<EntryId, T>,
    /// The newest id handed out, so far: `XADD *` never goes backwards.
    last_id: EntryId,
    /// The group's last-delivered id: entries above it are queued.
    delivered: EntryId,
    /// The group's pending list.
    pending: BTreeMap<EntryId, Pending>,
}

impl<T> Default for GroupStream<T> {
    fn default() -> Self {
        GroupStream {
            entries: BTreeMap::new(),
            last_id: EntryId::default(),
            delivered: EntryId::default(),
            pending: BTreeMap::new(),
        }
    }
}

/// One shard's ready stream with its consumer group `workers`.
type ReadyQueue = GroupStream<ReadyTask>;

impl<T> GroupStream<T> {
    /// Appends an entry, as `XADD <stream> * ...`.
    fn push(&mut self, value: T, now: Millis) -> EntryId {
        let id = self.last_id.next(now);
        self.last_id = id;
        self.entries.insert(id, value);
        id
    }

    /// Whether `entry` is pending for `consumer`, as the Lua `holds`.
    fn holds(&self, consumer: &str, entry: &str) -> bool {
        entry.parse().ok().and_then(|id| self.pending.get(&id)).is_some_and(|p| p.owner == consumer)
    }

    /// Acknowledges `entry` if `consumer` holds it.
    fn ack(&mut self, consumer: &str, entry: &str) {
        if let Ok(id) = entry.parse::<EntryId>()
            && self.pending.get(&id).is_some_and(|pending| pending.owner == consumer)
        {
            self.pending.remove(&id);
        }
    }

    /// Delivers up to `max` new entries to `consumer`, as `XREADGROUP ... >`.
    fn read(&mut self, consumer: &str, max: usize, instant: Instant) -> Vec<(EntryId, &T)> {
        let ids: Vec<EntryId> = self
            .entries
            .range((Bound::Excluded(self.delivered), Bound::Unbounded))
            .take(max)
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            self.delivered = *id;
            self.pending.insert(*id, Pending { owner: consumer.to_owned(), since: instant, deliveries: 1 });
        }
        ids.into_iter().filter_map(|id| self.entries.get(&id).map(|value| (id, value))).collect()
    }

    /// Takes over up to `max` entries idle at least `min_idle`, whoever holds them, as
    /// `XAUTOCLAIM`; with their delivery counts. An entry deleted from the stream while pending
    /// cannot be worked: it leaves the pending list.
    fn reclaim(&mut self, consumer: &str, min_idle: Duration, max: usize, instant: Instant) -> Vec<(EntryId, u64, &T)> {
        let idle: Vec<EntryId> = self
            .pending
            .iter()
            .filter(|(_, p)| instant.saturating_duration_since(p.since) >= min_idle)
            .map(|(id, _)| *id)
            .take(max)
            .collect();
        let mut taken = Vec::new();
        for id in idle {
            if !self.entries.contains_key(&id) {
                self.pending.remove(&id);
                continue;
            }
            let pending = self.pending.get_mut(&id).expect("collected from the pending list");
            pending.owner = consumer.to_owned();
            pending.since = instant;
            pending.deliveries += 1;
            taken.push((id, pending.deliveries));
        }
        taken
            .into_iter()
            .filter_map(|(id, deliveries)| self.entries.get(&id).map(|value| (id, deliveries, value)))
            .collect()
    }

    /// The oldest id the group has not handled: its oldest pending entry, or the one after its
    /// last delivered one.
    fn oldest_unhandled(&self) -> EntryId {
        let after_delivered = EntryId { ms: self.delivered.ms, n: self.delivered.n + 1 };
        self.pending.keys().next().copied().map_or(after_delivered, |p| p.min(after_delivered))
    }
}

/// What a run is made of.
#[derive(Debug)]
struct Run {
    log: Vec<Recorded>,
    summary: RunSummary,
    /// The creation time the run is indexed under.
    created_at: Millis,
    /// Set once the run ended: the status and time it is indexed under.
    finished: Option<(&'static str, Millis)>,
    /// Whether the log takes no more records: it is closed by the commit that appends the
    /// run's last transitions, as Redis compacts the log then.
    closed: bool,
    timer: Option<Millis>,
}

/// An idempotency key: the run that took it, until it expires.
#[derive(Debug)]
struct Idempotent {
    run: String,
    /// `None`: a retention too long to represent, which never expires.
    expires: Option<Instant>,
}

/// A sorted set of runs: by score, then by run id text, as Redis orders members.
type Index = BTreeMap<(Millis, String), RunId>;

fn index_key(score: Millis, run: &RunId) -> (Millis, String) {
    (score, run.to_string())
}

/// Everything the store holds.
#[derive(Debug, Default)]
struct State {
    runs: HashMap<RunId, Run>,
    /// By shard and key, as the keys `wfo:{N}:idem:<key>`.
    idempotency: HashMap<(u16, String), Idempotent>,
    /// Definition snapshots by hash (Redis keeps a copy on every shard).
    definitions: HashMap<String, String>,
    /// Per shard, created on first use as Redis creates a stream on its first `XADD`.
    ready: HashMap<u16, ReadyQueue>,
    /// The shard a claim reads first, rotated so that no shard starves the others.
    next_shard: u16,
    all: Index,
    by_workflow: HashMap<String, Index>,
    /// By workflow, search field and value, as the keys `wfo:{N}:idx:in:...`.
    by_search: HashMap<(String, String, String), Index>,
    active: Index,
    /// By status name, scored by the time the run ended.
    finished: HashMap<&'static str, Index>,
    /// Runs by the time their timer is due.
    timers: Index,
    /// The event bus stream with its `router` group.
    bus: Bus,
    /// Schedules' shared state, by workflow.
    crons: HashMap<String, CronState>,
    /// Runs waiting for events, by event type.
    waits: HashMap<String, BTreeMap<RunId, Millis>>,
    /// Small shared values of the actions.
    values: HashMap<String, String>,
    /// Keys marked seen (`mark_seen`), until the instant each expires.
    seen: HashMap<String, Instant>,
    /// Replicas' last heartbeats, until the instant each expires.
    replicas: BTreeMap<String, (ReplicaBeat, Instant)>,
    /// Paused workflows.
    paused: BTreeSet<String>,
    /// Runs held back while their workflow is paused, by workflow, oldest first.
    held: HashMap<String, BTreeSet<(Millis, RunId)>>,
    /// Concurrency groups by shard, workflow and group: the runs holding slots and those
    /// waiting, each oldest first.
    slots: BTreeMap<(u16, String, String), SlotState>,
    /// Rate groups by shard, workflow and group: the runs started within the period (by start
    /// time) and those waiting (oldest first).
    rates: BTreeMap<(u16, String, String), RateState>,
    /// Debounce: each key's (`<workflow>:<group>`) latest burst, and the bursts not yet started.
    open_bursts: HashMap<String, String>,
    bursts: BTreeMap<String, Burst>,
    /// The burst a debounced trigger with an idempotency key went to, until the instant the
    /// mark expires.
    debounce_seen: HashMap<String, (String, Instant)>,
}

/// A debounce burst (see [`Debounces`]).
#[derive(Debug)]
struct Burst {
    payload: String,
    /// The order of the trigger whose payload it keeps (`ms-seq`).
    order: String,
    triggers: u64,
    first_at: Millis,
    due: Millis,
}

#[derive(Debug, Default)]
struct RateState {
    window: BTreeMap<RunId, Millis>,
    queue: BTreeSet<(Millis, RunId)>,
}

impl RateState {
    /// Slides the window to `now` and moves waiting runs into its free capacity; returns them
    /// and when capacity frees next while runs still wait.
    fn fill(&mut self, limit: u32, period: Millis, now: Millis) -> (Vec<RunId>, Option<Millis>) {
        self.window.retain(|_, started| *started > now.saturating_sub(period));
        let mut promoted = Vec::new();
        while self.window.len() < limit as usize {
            let Some((_, run)) = self.queue.pop_first() else { break };
            self.window.insert(run.clone(), now);
            promoted.push(run);
        }
        let next = (!self.queue.is_empty()).then(|| self.window.values().min().map_or(now, |oldest| oldest + period));
        (promoted, next)
    }
}

#[derive(Debug, Default)]
struct SlotState {
    holders: BTreeSet<(Millis, RunId)>,
    queue: BTreeSet<(Millis, RunId)>,
}

impl SlotState {
    /// Moves the oldest waiting runs into free slots; returns them.
    fn fill(&mut self, limit: u32) -> Vec<RunId> {
        let mut promoted = Vec::new();
        while self.holders.len() < limit as usize {
            let Some(next) = self.queue.pop_first() else { break };
            promoted.push(next.1.clone());
            self.holders.insert(next);
        }
        promoted
    }
}

/// An entry's raw fields, binary-safe.
type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// The event bus: a stream read by the consumer group `router`, its dead-letter stream, and the
/// runs each handled event started.
#[derive(Debug, Default)]
struct Bus {
    stream: GroupStream<Fields>,
    /// The dead letters, under ids of their own (as the Redis dead-letter stream's).
    dead: GroupStream<Fields>,
    /// Entries removed for ids ahead of the clock (see `repair`).
    hostile: BusCondition,
    /// Runs started per event id, until the instant they expire.
    started: HashMap<String, (Vec<(String, String)>, Instant)>,
}

/// A bus entry as a read returns it, cut to `cap`.
fn cut_entry(id: EntryId, fields: &Fields, deliveries: u64, cap: EntryCap) -> BusEntry {
    let (fields, oversized) = cap.cut(fields);
    BusEntry { id: id.to_string(), fields, deliveries, oversized }
}

impl Bus {
    fn publish(&mut self, fields: Fields, now: Millis) -> EntryId {
        self.stream.push(fields, now)
    }

    fn read(&mut self, consumer: &str, max: usize, instant: Instant, cap: EntryCap) -> Vec<BusEntry> {
        let read = self.stream.read(consumer, max, instant);
        read.into_iter().map(|(id, fields)| cut_entry(id, fields, 1, cap)).collect()
    }

    fn reclaim(
        &mut self,
        consumer: &str,
        min_idle: Duration,
        max: usize,
        instant: Instant,
        cap: EntryCap,
    ) -> Vec<BusEntry> {
        let taken = self.stream.reclaim(consumer, min_idle, max, instant);
        taken.into_iter().map(|(id, deliveries, fields)| cut_entry(id, fields, deliveries, cap)).collect()
    }

    fn dead_letter(&mut self, entry: &BusEntry, reason: &str, now: Millis) {
        self.dead.push(dead_letter_fields(entry, reason), now);
        if self.dead.entries.len() > 100_000 {
            self.dead.entries.pop_first();
        }
    }

    /// As the Redis store's `repair_bus` (with `bus_drop`): dead-letters and removes entries
    /// whose ids are more than the tolerance ahead of `now`, then sets the last id (and the
    /// group's last delivered id) back. Only the store writes this bus, by the clock, so this
    /// finds nothing unless the clock stepped back.
    fn repair(&mut self, now: Millis) -> u64 {
        let limit = now.saturating_add(BUS_CLOCK_TOLERANCE.as_millis() as u64);
        let first_hostile = EntryId { ms: limit.saturating_add(1), n: 0 };
        let hostile = self.stream.entries.split_off(&first_hostile);
        for (id, fields) in &hostile {
            let entry =
                cut_entry(*id, fields, 0, EntryCap { max_bytes: DEAD_LETTER_KEEP, keep_bytes: DEAD_LETTER_KEEP });
            let reason = format!(
                "the entry's id is {} ms ahead of the store's clock (more than {} s): every later entry would get an id above it, so it was removed from the bus",
                id.ms.saturating_sub(now),
                BUS_CLOCK_TOLERANCE.as_secs()
            );
            self.dead_letter(&entry, &reason, now);
            self.stream.pending.remove(id);
        }
        let top = self.stream.entries.keys().next_back().copied().unwrap_or_default();
        let last = top.max(EntryId { ms: now, n: 0 });
        if self.stream.last_id.ms > limit {
            self.stream.last_id = last;
        }
        if self.stream.delivered.ms > limit {
            self.stream.delivered = last;
        }
        if let Some((id, _)) = hostile.iter().next_back() {
            self.hostile.hostile_removed += hostile.len() as u64;
            self.hostile.last_hostile = Some((id.to_string(), now));
        }
        hostile.len() as u64
    }

    /// The oldest id the router has not handled.
    fn oldest_unhandled(&self) -> EntryId {
        self.stream.oldest_unhandled()
    }
}

impl State {
    /// Whether `lease`'s entry is still pending for its consumer (the Lua `holds`).
    fn leased(&self, lease: &Lease) -> bool {
        self.ready.get(&lease.shard).is_some_and(|queue| queue.holds(&lease.consumer, &lease.entry))
    }

    /// Acknowledges `lease`'s entry if its consumer still holds it.
    fn ack(&mut self, lease: &Lease) {
        if let Some(queue) = self.ready.get_mut(&lease.shard) {
            queue.ack(&lease.consumer, &lease.entry);
        }
    }

    fn create_run(&mut self, new: NewRun, now: Millis, instant: Instant) -> StoreResult<Created> {
        let corrupt = |problem: &str| StoreError::Corrupt { key: new.run.to_string(), problem: problem.to_owned() };
        if new.records.is_empty() {
            return Err(corrupt("a run is created with at least one transition"));
        }
        if self.runs.contains_key(&new.run) {
            return Err(corrupt("a run with this id exists already"));
        }
        if let Some((key, retention)) = &new.idempotency {
            let slot = (new.run.shard, key.clone());
            if let Some(taken) = self.idempotency.get(&slot)
                && taken.expires.is_none_or(|expires| expires > instant)
            {
                return Ok(Created::Duplicate(taken.run.clone()));
            }
            let expires = instant.checked_add(*retention);
            self.idempotency.insert(slot, Idempotent { run: new.run.to_string(), expires });
        }
        let mut summary = RunSummary { search: new.search.clone(), ..RunSummary::of(&new.state) };
        let queue = self.ready.entry(new.run.shard).or_default();
        for dispatch in new.dispatch {
            let task = ReadyTask {
                run: new.run.to_string(),
                step: dispatch.step,
                attempt: dispatch.attempt,
                state: new.state.clone(),
            };
            summary.ready_entries.push(queue.push(task, now).to_string());
        }
        let created_at = new.state.created_at;
        let key = index_key(created_at, &new.run);
        self.all.insert(key.clone(), new.run.clone());
        self.by_workflow.entry(new.state.workflow.clone()).or_default().insert(key.clone(), new.run.clone());
        for (field, value) in &new.search {
            let slot = (new.state.workflow.clone(), field.clone(), value.clone());
            self.by_search.entry(slot).or_default().insert(key.clone(), new.run.clone());
        }
        self.active.insert(key, new.run.clone());
        self.runs.insert(
            new.run.clone(),
            Run { log: new.records, summary, created_at, finished: None, closed: false, timer: None },
        );
        self.index_end(&new.run, &new.state);
        Ok(Created::New(new.run))
    }

    /// The compare-and-append, in the order of `wfo_v2_commit_group`.
    fn commit(&mut self, commit: Commit, now: Millis) -> CommitOutcome {
        let Commit { run: id, expected_seq, lease, records, state, dispatch, timer, clear_timer } = commit;
        // The run's ready stream is the one the fence checks, whatever shard the lease names.
        let queue = self.ready.entry(id.shard).or_default();
        if let Some(lease) = &lease
            && (lease.shard != id.shard || !queue.holds(&lease.consumer, &lease.entry))
        {
            return CommitOutcome::LeaseLost;
        }
        // Records cannot go into a closed log; an empty commit only needs the summary.
        let run = self.runs.get_mut(&id).filter(|run| records.is_empty() || !run.closed);
        let Some(run) = run else {
            if let Some(lease) = &lease {
                queue.ack(&lease.consumer, &lease.entry);
            }
            return CommitOutcome::Gone;
        };
        let at = if records.is_empty() { run.summary.seq } else { run.log.len() as u64 };
        if at != expected_seq {
            return CommitOutcome::Stale;
        }

        let appended = records.len() as u64;
        let ends = state.status.is_terminal();
        run.closed |= ends && appended > 0;
        run.log.extend(records);
        // The run's entries that may still be live: its own is done with, the new ones join.
        let mut ready_entries = std::mem::take(&mut run.summary.ready_entries);
        if let Some(lease) = &lease {
            ready_entries.retain(|entry| *entry != lease.entry);
        }
        if ends && appended > 0 {
            // Its other queued steps are withdrawn: never delivered, or refused if they were.
            for entry in ready_entries.drain(..).filter_map(|entry| entry.parse::<EntryId>().ok()) {
                queue.entries.remove(&entry);
            }
        }
        for dispatch in dispatch {
            let task =
                ReadyTask { run: id.to_string(), step: dispatch.step, attempt: dispatch.attempt, state: state.clone() };
            ready_entries.push(queue.push(task, now).to_string());
        }
        run.summary =
            RunSummary { ready_entries, search: std::mem::take(&mut run.summary.search), ..RunSummary::of(&state) };
        // A run that ended has nothing left to wake for.
        let old_timer = match (timer, clear_timer || ends) {
            (Some(due), _) => run.timer.replace(due),
            (None, true) => run.timer.take(),
            (None, false) => None,
        };
        if let Some(due) = old_timer {
            self.timers.remove(&index_key(due, &id));
        }
        if let Some(due) = timer {
            self.timers.insert(index_key(due, &id), id.clone());
        }
        if let Some(lease) = &lease {
            queue.ack(&lease.consumer, &lease.entry);
        }
        self.index_end(&id, &state);
        CommitOutcome::Applied { seq: expected_seq + appended }
    }

    /// Resumes a finished run: its log is open again and it is live again, if it is still
    /// finished at the commit's expected seq; then the commit.
    fn reopen(&mut self, commit: Commit, now: Millis) -> CommitOutcome {
        let id = commit.run.clone();
        let Some(run) = self.runs.get_mut(&id) else { return CommitOutcome::Gone };
        if !run.closed || run.log.len() as u64 != commit.expected_seq || run.summary.seq != commit.expected_seq {
            return CommitOutcome::Stale;
        }
        run.closed = false;
        let created_at = run.created_at;
        if let Some((status, at)) = run.finished.take()
            && let Some(index) = self.finished.get_mut(status)
        {
            index.remove(&index_key(at, &id));
        }
        self.active.insert(index_key(created_at, &id), id.clone());
        self.commit(commit, now)
    }

    /// Moves a run that ended from the active index to the index of the status it ended with.
    fn index_end(&mut self, id: &RunId, state: &RunState) {
        let Some(status) = terminal_name(&state.status) else { return };
        let Some(run) = self.runs.get_mut(id) else { return };
        self.active.remove(&index_key(run.created_at, id));
        if let Some((old_status, old_at)) = run.finished.replace((status, state.updated_at))
            && let Some(index) = self.finished.get_mut(old_status)
        {
            index.remove(&index_key(old_at, id));
        }
        self.finished.entry(status).or_default().insert(index_key(state.updated_at, id), id.clone());
    }

    /// New entries for `consumer`, at most `max` over all shards, as `XREADGROUP ... >`.
    fn claim(&mut self, consumer: &str, max: usize, shards: u16, instant: Instant) -> Vec<Claimed> {
        let first = self.next_shard % shards;
        self.next_shard = (first + 1) % shards;
        self.claim_on(consumer, max, (first..shards).chain(0..first), instant)
    }

    /// Up to `max` queued entries for `consumer` from `shards`, in turn.
    fn claim_on(
        &mut self,
        consumer: &str,
        max: usize,
        shards: impl IntoIterator<Item = u16>,
        instant: Instant,
    ) -> Vec<Claimed> {
        let mut claimed = Vec::new();
        for shard in shards {
            let Some(queue) = self.ready.get_mut(&shard) else { continue };
            for (id, task) in queue.read(consumer, max - claimed.len(), instant) {
                claimed.push(Claimed {
                    lease: Lease { shard, entry: id.to_string(), consumer: consumer.to_owned() },
                    deliveries: 1,
                    task: Ok(task.clone()),
                });
            }
            if claimed.len() == max {
                break;
            }
        }
        claimed
    }

    /// Resets the idle time of the leases still held by their consumers, as `wfo_v2_renew`
    /// (whose `XCLAIM ... JUSTID` leaves the delivery count alone); returns the others.
    fn renew(&mut self, leases: &[Lease], instant: Instant) -> Vec<Lease> {
        let mut lost = Vec::new();
        for lease in leases {
            let held = self
                .ready
                .get_mut(&lease.shard)
                .and_then(|queue| lease.entry.parse().ok().and_then(|id: EntryId| queue.pending.get_mut(&id)))
                .filter(|pending| pending.owner == lease.consumer);
            match held {
                Some(pending) => pending.since = instant,
                None => lost.push(lease.clone()),
            }
        }
        lost
    }

    /// Takes over entries idle at least `min_idle`, whoever holds them, as `XAUTOCLAIM`.
    fn reclaim(
        &mut self,
        consumer: &str,
        min_idle: Duration,
        max: usize,
        shards: u16,
        instant: Instant,
    ) -> Vec<Claimed> {
        let mut claimed = Vec::new();
        for shard in 0..shards {
            if claimed.len() == max {
                break;
            }
            let Some(queue) = self.ready.get_mut(&shard) else { continue };
            for (id, deliveries, task) in queue.reclaim(consumer, min_idle, max - claimed.len(), instant) {
                claimed.push(Claimed {
                    lease: Lease { shard, entry: id.to_string(), consumer: consumer.to_owned() },
                    deliveries,
                    task: Ok(task.clone()),
                });
            }
        }
        claimed
    }

    /// Runs whose timer is due: at most `max` per shard, the earliest of each, as Redis reads
    /// each shard's timer set.
    fn due_timers(&self, now: Millis, max: usize) -> Vec<RunId> {
        let mut per_shard: HashMap<u16, usize> = HashMap::new();
        let due = self.timers.range(..(now.saturating_add(1), String::new())).map(|(_, id)| id);
        due.filter(|id| {
            let taken = per_shard.entry(id.shard).or_default();
            *taken += 1;
            *taken <= max
        })
        .cloned()
        .collect()
    }

    fn history(&self, id: &RunId) -> Option<Vec<Logged>> {
        let run = self.runs.get(id)?;
        let logged = run.log.iter().enumerate();
        Some(logged.map(|(index, recorded)| Logged { seq: index as u64 + 1, recorded: recorded.clone() }).collect())
    }

    /// Live runs not updated since `before`, oldest first, at most `max` per shard.
    fn quiet_runs(&self, before: Millis, max: usize) -> Vec<(RunId, RunSummary)> {
        let mut per_shard: HashMap<u16, usize> = HashMap::new();
        let mut quiet = Vec::new();
        // A run is updated no earlier than it was created, so the scan stops at `before`.
        for id in self.active.range(..(before, String::new())).map(|(_, id)| id) {
            let Some(run) = self.runs.get(id) else { continue };
            let taken = per_shard.entry(id.shard).or_default();
            if run.summary.updated_at < before && *taken < max {
                *taken += 1;
                quiet.push((id.clone(), run.summary.clone()));
            }
        }
        quiet
    }

    fn dispatch_exists(&self, id: &RunId, entry: &str) -> bool {
        let (Some(queue), Ok(entry)) = (self.ready.get(&id.shard), entry.parse::<EntryId>()) else {
            return false;
        };
        let queued = entry > queue.delivered && queue.entries.contains_key(&entry);
        queued || queue.pending.contains_key(&entry)
    }

    fn list_runs(&self, query: RunQuery<'_>) -> RunPage {
        let RunQuery { workflow, status, before, limit } = query;
        let index = match workflow {
            Some(workflow) => match self.by_workflow.get(workflow) {
                Some(index) => index,
                None => return RunPage { runs: Vec::new() },
            },
            None => &self.all,
        };
        self.page(index, status, before, limit)
    }

    fn search_runs(&self, slot: (String, String, String), before: Option<&RunId>, limit: usize) -> RunPage {
        match self.by_search.get(&slot) {
            Some(index) => self.page(index, None, before, limit),
            None => RunPage { runs: Vec::new() },
        }
    }

    /// A page of `index`, newest first, below the cursor `before`, of runs in `status` if given.
    fn page(&self, index: &Index, status: Option<Status>, before: Option<&RunId>, limit: usize) -> RunPage {
        let upper = match before {
            Some(cursor) => Bound::Excluded(index_key(self.created_at_of(cursor), cursor)),
            None => Bound::Unbounded,
        };
        let runs = index
            .range((Bound::Unbounded, upper))
            .rev()
            .map(|(_, id)| id)
            .filter(|id| match status {
                Some(status) => self.runs.get(*id).is_some_and(|run| run.summary.status == status),
                None => true,
            })
            .take(limit)
            .cloned()
            .collect();
        RunPage { runs }
    }

    /// When a run was created: from its summary, or for a run deleted since the cursor was
    /// handed out, from the time in its UUIDv7.
    fn created_at_of(&self, id: &RunId) -> Millis {
        match self.runs.get(id) {
            Some(run) => run.created_at,
            None => id.created_at(),
        }
    }

    fn housekeeping(&mut self, retain_until: Millis, instant: Instant) -> Housekeeping {
        let expired: Vec<RunId> = self
            .finished
            .values()
            .flat_map(|index| index.range(..(retain_until, String::new())).map(|(_, id)| id.clone()))
            .collect();
        for id in &expired {
            self.delete_run(id);
        }
        let mut trimmed = 0;
        for queue in self.ready.values_mut() {
            let before = queue.entries.len();
            let (delivered, pending) = (queue.delivered, &queue.pending);
            queue.entries.retain(|id, _| *id > delivered || pending.contains_key(id));
            trimmed += (before - queue.entries.len()) as u64;
        }
        self.idempotency.retain(|_, key| key.expires.is_none_or(|expires| expires > instant));
        Housekeeping { trimmed_entries: trimmed, expired_runs: expired.len() as u64 }
    }

    fn delete_run(&mut self, id: &RunId) {
        let Some(run) = self.runs.remove(id) else { return };
        let key = index_key(run.created_at, id);
        self.all.remove(&key);
        self.active.remove(&key);
        if let Some(index) = self.by_workflow.get_mut(&run.summary.workflow) {
            index.remove(&key);
            if index.is_empty() {
                self.by_workflow.remove(&run.summary.workflow);
            }
        }
        for (field, value) in &run.summary.search {
            let slot = (run.summary.workflow.clone(), field.clone(), value.clone());
            if let Some(index) = self.by_search.get_mut(&slot) {
                index.remove(&key);
                if index.is_empty() {
                    self.by_search.remove(&slot);
                }
            }
        }
        if let Some((status, at)) = run.finished
            && let Some(index) = self.finished.get_mut(status)
        {
            index.remove(&index_key(at, id));
        }
        if let Some(due) = run.timer {
            self.timers.remove(&index_key(due, id));
        }
    }
}

#[async_trait]
impl Backend for MemoryStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Memory
    }

    fn shards(&self) -> u16 {
        self.shared.shards
    }

    async fn now(&self) -> StoreResult<Millis> {
        wall_clock()
    }

    async fn health(&self) -> StoreResult<StoreHealth> {
        let mut warnings = vec![
            "the store is in memory: nothing survives a restart, and no other replica can share the work \
             (set REDIS_URL for the durable store)"
                .to_owned(),
        ];
        let bus = self.shared.state.lock().bus.hostile.clone();
        warnings.extend(bus.warning(wall_clock()?));
        Ok(StoreHealth { kind: StoreKind::Memory, version: None, warnings, bus })
    }

    async fn memory_used(&self) -> StoreResult<Option<u64>> {
        Ok(None)
    }

    async fn stream_stats(&self) -> StoreResult<StreamStats> {
        let state = self.shared.state.lock();
        Ok(StreamStats {
            ready_length: state.ready.values().map(|q| q.entries.len() as u64).sum(),
            ready_pending: state.ready.values().map(|q| q.pending.len() as u64).sum(),
            events_length: state.bus.stream.entries.len() as u64,
            events_pending: state.bus.stream.pending.len() as u64,
            events_dead: state.bus.dead.entries.len() as u64,
            events_hostile_removed: state.bus.hostile.hostile_removed,
        })
    }
}

#[async_trait]
impl Definitions for MemoryStore {
    async fn save_definitions(&self, workflows: &[Arc<Workflow>]) -> StoreResult<()> {
        let mut state = self.shared.state.lock();
        for workflow in workflows {
            state.definitions.insert(workflow.hash.clone(), workflow.snapshot.clone());
        }
        Ok(())
    }

    async fn load_definition(&self, shard: u16, hash: &str) -> StoreResult<Option<Workflow>> {
        if shard >= self.shared.shards {
            return Ok(None);
        }
        let snapshot = self.shared.state.lock().definitions.get(hash).cloned();
        let Some(snapshot) = snapshot else { return Ok(None) };
        Workflow::from_snapshot(hash, &snapshot)
            .map(Some)
            .map_err(|err| StoreError::Corrupt { key: format!("def:{hash}"), problem: err.to_string() })
    }
}

#[async_trait]
impl Runs for MemoryStore {
    async fn create_runs(&self, runs: Vec<NewRun>) -> StoreResult<Vec<Created>> {
        let now = wall_clock()?;
        self.apply_group(runs, |state, new| {
            let dispatches = !new.dispatch.is_empty();
            let created = state.create_run(new, now, Instant::now())?;
            let dispatched = dispatches && matches!(created, Created::New(_));
            Ok((created, dispatched))
        })
    }

    async fn commit(&self, commit: Commit) -> StoreResult<CommitOutcome> {
        let run = commit.run.to_string();
        let mut outcomes = self.commit_group(vec![commit]).await?;
        outcomes.pop().ok_or_else(|| StoreError::Corrupt { key: run, problem: "its commit had no outcome".to_owned() })
    }

    async fn commit_steps(&self, commits: Vec<StepCommit>) -> StoreResult<Vec<StepCommitted>> {
        let now = wall_clock()?;
        // Claims read the ready streams of the group's shards, as Redis's one call does.
        let mut shards: Vec<u16> = Vec::new();
        for step in &commits {
            if !shards.contains(&step.commit.run.shard) {
                shards.push(step.commit.run.shard);
            }
        }
        let applied = self.apply_group(commits, |state, step| {
            let dispatches = !step.commit.dispatch.is_empty();
            let claimer = step.commit.lease.as_ref().filter(|_| step.claim_next).map(|lease| lease.consumer.clone());
            let outcome = state.commit(step.commit, now);
            let dispatched = dispatches && matches!(outcome, CommitOutcome::Applied { .. });
            Ok(((outcome, claimer), dispatched))
        })?;
        // Every commit is written before anything is claimed, as in Redis's one call.
        let mut state = self.shared.state.lock();
        Ok(applied
            .into_iter()
            .map(|(outcome, claimer)| {
                let next = claimer
                    .and_then(|consumer| state.claim_on(&consumer, 1, shards.iter().copied(), Instant::now()).pop());
                StepCommitted { outcome, next }
            })
            .collect())
    }

    async fn reopen(&self, commit: Commit) -> StoreResult<CommitOutcome> {
        let now = wall_clock()?;
        let dispatches = !commit.dispatch.is_empty();
        let outcome = self.shared.state.lock().reopen(commit, now);
        if dispatches && matches!(outcome, CommitOutcome::Applied { .. }) {
            self.shared.dispatched.notify_waiters();
        }
        Ok(outcome)
    }

    async fn requeue(&self, commit: Commit) -> StoreResult<CommitOutcome> {
        let now = wall_clock()?;
        let dispatches = !commit.dispatch.is_empty();
        let outcome = {
            // One section: the liveness judgement and the write see the same state.
            let mut state = self.shared.state.lock();
            let live = state.runs.get(&commit.run).is_some_and(|run| {
                run.summary.ready_entries.iter().any(|entry| state.dispatch_exists(&commit.run, entry))
            });
            if live { CommitOutcome::Stale } else { state.commit(commit, now) }
        };
        if dispatches && matches!(outcome, CommitOutcome::Applied { .. }) {
            self.shared.dispatched.notify_waiters();
        }
        Ok(outcome)
    }

    async fn summary(&self, run: &RunId) -> StoreResult<Option<RunSummary>> {
        Ok(self.shared.state.lock().runs.get(run).map(|run| run.summary.clone()))
    }

    async fn history(&self, run: &RunId) -> StoreResult<Option<Vec<Logged>>> {
        Ok(self.shared.state.lock().history(run))
    }

    async fn quiet_runs(&self, before: Millis, max: usize) -> StoreResult<Vec<(RunId, RunSummary)>> {
        Ok(self.shared.state.lock().quiet_runs(before, max))
    }

    async fn has_timer(&self, run: &RunId) -> StoreResult<bool> {
        Ok(self.shared.state.lock().runs.get(run).is_some_and(|run| run.timer.is_some()))
    }

    async fn due_timers(&self, now: Millis, max: usize) -> StoreResult<Vec<RunId>> {
        Ok(self.shared.state.lock().due_timers(now, max))
    }

    async fn housekeeping(&self, retain_until: Millis) -> StoreResult<Housekeeping> {
        Ok(self.shared.state.lock().housekeeping(retain_until, Instant::now()))
    }
}

#[async_trait]
impl ReadySteps for MemoryStore {
    async fn ack(&self, lease: &Lease) -> StoreResult<()> {
        self.shared.state.lock().ack(lease);
        Ok(())
    }

    async fn claim(&self, consumer: &str, max: usize, block: Duration) -> StoreResult<Vec<Claimed>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let start = tokio::time::Instant::now();
        // A block too long to represent waits a year: as good as forever for one call.
        let deadline = start.checked_add(block).unwrap_or_else(|| start + Duration::from_secs(365 * 86_400));
        loop {
            // Registered before looking, so a dispatch between the look and the wait still
            // wakes this call.
            let notified = self.shared.dispatched.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let claimed = self.shared.state.lock().claim(consumer, max, self.shared.shards, Instant::now());
            if !claimed.is_empty() {
                return Ok(claimed);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn renew(&self, leases: &[Lease]) -> StoreResult<Vec<Lease>> {
        Ok(self.shared.state.lock().renew(leases, Instant::now()))
    }

    async fn reclaim(&self, consumer: &str, min_idle: Duration, max: usize) -> StoreResult<Vec<Claimed>> {
        Ok(self.shared.state.lock().reclaim(consumer, min_idle, max, self.shared.shards, Instant::now()))
    }

    async fn dispatch_exists(&self, run: &RunId, entry: &str) -> StoreResult<bool> {
        Ok(self.shared.state.lock().dispatch_exists(run, entry))
    }
}

#[async_trait]
impl Listing for MemoryStore {
    async fn list_runs(&self, query: RunQuery<'_>) -> StoreResult<RunPage> {
        Ok(self.shared.state.lock().list_runs(query))
    }

    async fn search_runs(&self, query: SearchQuery<'_>) -> StoreResult<RunPage> {
        let SearchQuery { workflow, field, value, before, limit } = query;
        let slot = (workflow.to_owned(), field.to_owned(), value.to_owned());
        Ok(self.shared.state.lock().search_runs(slot, before, limit))
    }

    async fn count_runs(&self, workflow: &str) -> StoreResult<Vec<(Status, u64)>> {
        let state = self.shared.state.lock();
        let mut counts: BTreeMap<Status, u64> = Status::ALL.into_iter().map(|status| (status, 0)).collect();
        for run in state.runs.values().filter(|run| run.summary.workflow == workflow) {
            *counts.entry(run.summary.status).or_default() += 1;
        }
        Ok(counts.into_iter().collect())
    }
}

#[async_trait]
impl Schedules for MemoryStore {
    async fn cron_state(&self, workflow: &str) -> StoreResult<CronState> {
        Ok(self.shared.state.lock().crons.get(workflow).cloned().unwrap_or_default())
    }

    async fn cron_advance(&self, workflow: &str, fire: Millis, run: Option<&str>) -> StoreResult<bool> {
        let mut state = self.shared.state.lock();
        let cron = state.crons.entry(workflow.to_owned()).or_default();
        let advanced = cron.last_fire.is_none_or(|last| fire > last);
        if advanced {
            cron.last_fire = Some(fire);
        }
        if let Some(run) = run {
            cron.last_run = Some(run.to_owned());
        }
        Ok(advanced)
    }

    async fn cron_buffer(&self, workflow: &str, fire: Option<Millis>) -> StoreResult<()> {
        self.shared.state.lock().crons.entry(workflow.to_owned()).or_default().buffered = fire;
        Ok(())
    }
}

#[async_trait]
impl EventBus for MemoryStore {
    async fn publish_event(&self, fields: &[(&str, &[u8])]) -> StoreResult<String> {
        let now = wall_clock()?;
        let fields = fields.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec())).collect();
        let id = {
            let mut state = self.shared.state.lock();
            // As the Redis store: never an id far ahead of the clock (here only a clock that
            // stepped back could cause one).
            if state.bus.stream.last_id.ms > now.saturating_add(BUS_CLOCK_TOLERANCE.as_millis() as u64) {
                state.bus.repair(now);
            }
            state.bus.publish(fields, now)
        };
        self.shared.published.notify_waiters();
        Ok(id.to_string())
    }

    async fn read_events(
        &self,
        consumer: &str,
        max: usize,
        block: Duration,
        cap: EntryCap,
    ) -> StoreResult<Vec<BusEntry>> {
        let deadline = tokio::time::Instant::now() + block.min(Duration::from_secs(3600));
        loop {
            let notified = self.shared.published.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let read = self.shared.state.lock().bus.read(consumer, max.max(1), Instant::now(), cap);
            if !read.is_empty() {
                return Ok(read);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Vec::new());
            }
        }
    }

    async fn reclaim_events(
        &self,
        consumer: &str,
        min_idle: Duration,
        max: usize,
        cap: EntryCap,
    ) -> StoreResult<Vec<BusEntry>> {
        Ok(self.shared.state.lock().bus.reclaim(consumer, min_idle, max, Instant::now(), cap))
    }

    async fn settle_events(&self, settled: &[SettledEvent], retention: Duration) -> StoreResult<()> {
        let mut state = self.shared.state.lock();
        let expires =
            Instant::now().checked_add(retention).unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
        for event in settled {
            if !event.started.is_empty() {
                state.bus.started.insert(event.id.clone(), (event.started.clone(), expires));
            }
            if let Ok(id) = event.id.parse::<EntryId>() {
                state.bus.stream.pending.remove(&id);
            }
        }
        Ok(())
    }

    async fn dead_letter_event(&self, entry: &BusEntry, reason: &str) -> StoreResult<()> {
        let now = wall_clock()?;
        let mut state = self.shared.state.lock();
        state.bus.dead_letter(entry, reason, now);
        if let Ok(id) = entry.id.parse::<EntryId>() {
            state.bus.stream.pending.remove(&id);
            if entry.oversized.is_some() {
                // As the Redis store: it can never be handled, and its size is the problem.
                state.bus.stream.entries.remove(&id);
            }
        }
        Ok(())
    }

    async fn dead_events(&self, before: Option<&str>, limit: usize, cap: EntryCap) -> StoreResult<Vec<BusEntry>> {
        let state = self.shared.state.lock();
        let upper = match before.map(str::parse::<EntryId>) {
            Some(Ok(id)) => Bound::Excluded(id),
            Some(Err(())) => return Ok(Vec::new()),
            None => Bound::Unbounded,
        };
        Ok(state
            .bus
            .dead
            .entries
            .range((Bound::Unbounded, upper))
            .rev()
            .take(limit)
            .map(|(id, fields)| cut_entry(*id, fields, 0, cap))
            .collect())
    }

    async fn repair_bus(&self) -> StoreResult<u64> {
        let now = wall_clock()?;
        Ok(self.shared.state.lock().bus.repair(now))
    }

    async fn recent_events(&self, query: EventQuery<'_>) -> StoreResult<Vec<ListedEvent>> {
        let EventQuery { before, event_type, limit, scan, cap } = query;
        let state = self.shared.state.lock();
        let bus = &state.bus;
        let upper = match before.map(str::parse::<EntryId>) {
            Some(Ok(id)) => Bound::Excluded(id),
            Some(Err(())) => return Ok(Vec::new()),
            None => Bound::Unbounded,
        };
        let handled_below = bus.oldest_unhandled();
        let now = Instant::now();
        let out = bus
            .stream
            .entries
            .range((Bound::Unbounded, upper))
            .rev()
            .take(scan.max(limit))
            .filter(|(_, fields)| {
                event_type
                    .is_none_or(|t| fields.iter().any(|(k, v)| k.as_slice() == b"type" && v.as_slice() == t.as_bytes()))
            })
            .take(limit)
            .map(|(id, fields)| {
                let handled = *id < handled_below && !bus.stream.pending.contains_key(id);
                let started = handled.then(|| {
                    bus.started
                        .get(&id.to_string())
                        .filter(|(_, expires)| *expires > now)
                        .map(|(runs, _)| runs.clone())
                        .unwrap_or_default()
                });
                ListedEvent { entry: cut_entry(*id, fields, 0, cap), started }
            })
            .collect();
        Ok(out)
    }

    async fn trim_events(&self, max_len: u64, min_time: Millis) -> StoreResult<u64> {
        let mut state = self.shared.state.lock();
        let bus = &mut state.bus;
        let floor = bus.oldest_unhandled();
        let excess = (bus.stream.entries.len() as u64).saturating_sub(max_len) as usize;
        let mut cut = EntryId { ms: min_time, n: 0 };
        if let Some((last, _)) = bus.stream.entries.iter().take(excess).next_back() {
            cut = cut.max(EntryId { ms: last.ms, n: last.n + 1 });
        }
        let cut = cut.min(floor);
        let keep = bus.stream.entries.split_off(&cut);
        let trimmed = bus.stream.entries.len() as u64;
        bus.stream.entries = keep;
        let now = Instant::now();
        bus.started.retain(|_, (_, expires)| *expires > now);
        Ok(trimmed)
    }

    async fn event_counts(&self) -> StoreResult<(u64, u64)> {
        let state = self.shared.state.lock();
        Ok((state.bus.stream.entries.len() as u64, state.bus.dead.entries.len() as u64))
    }
}

#[async_trait]
impl Waits for MemoryStore {
    async fn add_wait(&self, event: &str, run: &RunId, until: Millis) -> StoreResult<()> {
        self.shared.state.lock().waits.entry(event.to_owned()).or_default().insert(run.clone(), until);
        Ok(())
    }

    async fn remove_wait(&self, event: &str, run: &RunId) -> StoreResult<()> {
        if let Some(waits) = self.shared.state.lock().waits.get_mut(event) {
            waits.remove(run);
        }
        Ok(())
    }

    async fn waiting(&self, event: &str) -> StoreResult<Vec<RunId>> {
        Ok(self
            .shared
            .state
            .lock()
            .waits
            .get(event)
            .map(|w| w.keys().take(1000).cloned().collect())
            .unwrap_or_default())
    }
}

#[async_trait]
impl Values for MemoryStore {
    async fn get_value(&self, key: &str) -> StoreResult<Option<String>> {
        Ok(self.shared.state.lock().values.get(key).cloned())
    }

    async fn set_value(&self, key: &str, value: &str) -> StoreResult<()> {
        self.shared.state.lock().values.insert(key.to_owned(), value.to_owned());
        Ok(())
    }

    async fn mark_seen(&self, key: &str, ttl: Duration) -> StoreResult<bool> {
        let now = Instant::now();
        let mut state = self.shared.state.lock();
        state.seen.retain(|_, until| *until > now);
        Ok(state.seen.insert(key.to_owned(), now + ttl).is_none())
    }

    async fn forget_seen(&self, key: &str) -> StoreResult<()> {
        self.shared.state.lock().seen.remove(key);
        Ok(())
    }
}

#[async_trait]
impl Replicas for MemoryStore {
    async fn heartbeat(&self, beat: &ReplicaBeat, ttl: Duration) -> StoreResult<()> {
        let until = Instant::now() + ttl;
        self.shared.state.lock().replicas.insert(beat.id.clone(), (beat.clone(), until));
        Ok(())
    }

    async fn forget_replica(&self, id: &str) -> StoreResult<()> {
        self.shared.state.lock().replicas.remove(id);
        Ok(())
    }

    async fn replicas(&self) -> StoreResult<Vec<ReplicaBeat>> {
        let now = Instant::now();
        let mut state = self.shared.state.lock();
        state.replicas.retain(|_, (_, until)| *until > now);
        Ok(state.replicas.values().map(|(beat, _)| beat.clone()).collect())
    }
}

#[async_trait]
impl Pauses for MemoryStore {
    async fn set_paused(&self, workflow: &str, paused: bool) -> StoreResult<bool> {
        let mut state = self.shared.state.lock();
        Ok(if paused { state.paused.insert(workflow.to_owned()) } else { state.paused.remove(workflow) })
    }

    async fn paused_workflows(&self) -> StoreResult<BTreeSet<String>> {
        Ok(self.shared.state.lock().paused.clone())
    }

    async fn hold(&self, lease: &Lease, run: &RunId, workflow: &str, created_at: Millis) -> StoreResult<bool> {
        let mut state = self.shared.state.lock();
        if !state.leased(lease) {
            return Ok(false);
        }
        state.ack(lease);
        state.held.entry(workflow.to_owned()).or_default().insert((created_at, run.clone()));
        Ok(true)
    }

    async fn held_runs(&self, workflow: &str, max: usize) -> StoreResult<Vec<RunId>> {
        let state = self.shared.state.lock();
        Ok(state
            .held
            .get(workflow)
            .map_or_else(Vec::new, |held| held.iter().take(max).map(|(_, run)| run.clone()).collect()))
    }

    async fn release(&self, workflow: &str, run: &RunId) -> StoreResult<()> {
        if let Some(held) = self.shared.state.lock().held.get_mut(workflow) {
            held.retain(|(_, held)| held != run);
        }
        Ok(())
    }

    async fn held_count(&self, workflow: &str) -> StoreResult<u64> {
        Ok(self.shared.state.lock().held.get(workflow).map_or(0, |held| held.len() as u64))
    }
}

#[async_trait]
impl Slots for MemoryStore {
    async fn admit(&self, lease: &Lease, run: &RunId, group: &SlotGroup, created_at: Millis) -> StoreResult<Admission> {
        let mut state = self.shared.state.lock();
        let id = (lease.shard, group.workflow.clone(), group.group.clone());
        if state.slots.get(&id).is_some_and(|slots| slots.holders.iter().any(|(_, holder)| holder == run)) {
            return Ok(Admission::Admitted);
        }
        if !state.leased(lease) {
            return Ok(Admission::NotOurs);
        }
        let slots = state.slots.entry(id).or_default();
        if slots.queue.is_empty() && slots.holders.len() < group.limit as usize {
            slots.holders.insert((created_at, run.clone()));
            return Ok(Admission::Admitted);
        }
        slots.queue.insert((created_at, run.clone()));
        let promoted = slots.fill(group.limit);
        state.ack(lease);
        Ok(Admission::Held { promoted })
    }

    async fn release_slot(&self, shard: u16, group: &SlotGroup, run: Option<&RunId>) -> StoreResult<Vec<RunId>> {
        let mut state = self.shared.state.lock();
        let slots = state.slots.entry((shard, group.workflow.clone(), group.group.clone())).or_default();
        if let Some(run) = run {
            slots.holders.retain(|(_, holder)| holder != run);
            slots.queue.retain(|(_, waiting)| waiting != run);
        }
        Ok(slots.fill(group.limit))
    }

    async fn slot_groups(&self, shard: u16, workflow: &str) -> StoreResult<Vec<String>> {
        let state = self.shared.state.lock();
        Ok(state.slots.keys().filter(|(s, w, _)| *s == shard && w == workflow).map(|(_, _, g)| g.clone()).collect())
    }

    async fn rate_admit(
        &self,
        lease: &Lease,
        run: &RunId,
        group: &RateGroup,
        created_at: Millis,
    ) -> StoreResult<RateAdmission> {
        let now = self.now().await?;
        let mut state = self.shared.state.lock();
        let id = (lease.shard, group.workflow.clone(), group.group.clone());
        let period = group.period_ms;
        if let Some(rate) = state.rates.get_mut(&id) {
            rate.window.retain(|_, started| *started > now.saturating_sub(period));
            if rate.window.contains_key(run) {
                return Ok(RateAdmission::Admitted);
            }
        }
        if !state.leased(lease) {
            return Ok(RateAdmission::NotOurs);
        }
        let rate = state.rates.entry(id).or_default();
        if rate.queue.is_empty() && rate.window.len() < group.limit as usize {
            rate.window.insert(run.clone(), now);
            return Ok(RateAdmission::Admitted);
        }
        rate.queue.insert((created_at, run.clone()));
        let (promoted, next) = rate.fill(group.limit, period, now);
        state.ack(lease);
        Ok(RateAdmission::Held { promoted, next })
    }

    async fn rate_release(&self, shard: u16, group: &RateGroup) -> StoreResult<(Vec<RunId>, Option<Millis>)> {
        let now = self.now().await?;
        let mut state = self.shared.state.lock();
        let rate = state.rates.entry((shard, group.workflow.clone(), group.group.clone())).or_default();
        Ok(rate.fill(group.limit, group.period_ms, now))
    }

    async fn rate_groups(&self, shard: u16, workflow: &str) -> StoreResult<Vec<String>> {
        let state = self.shared.state.lock();
        Ok(state.rates.keys().filter(|(s, w, _)| *s == shard && w == workflow).map(|(_, _, g)| g.clone()).collect())
    }

    async fn queued(&self, shard: u16, workflow: &str) -> StoreResult<(u64, u64)> {
        let state = self.shared.state.lock();
        let ours = |(s, w, _): &&(u16, String, String)| *s == shard && w == workflow;
        let slots = state.slots.iter().filter(|(id, _)| ours(id)).map(|(_, slots)| slots.queue.len() as u64).sum();
        let rates = state.rates.iter().filter(|(id, _)| ours(id)).map(|(_, rate)| rate.queue.len() as u64).sum();
        Ok((slots, rates))
    }

    async fn slot_holders(&self, shard: u16, group: &SlotGroup) -> StoreResult<(Vec<RunId>, u64)> {
        let state = self.shared.state.lock();
        Ok(state.slots.get(&(shard, group.workflow.clone(), group.group.clone())).map_or((Vec::new(), 0), |slots| {
            (slots.holders.iter().map(|(_, run)| run.clone()).collect(), slots.queue.len() as u64)
        }))
    }
}

#[async_trait]
impl Debounces for MemoryStore {
    async fn debounce(&self, trigger: &DebounceTrigger) -> StoreResult<Debounced> {
        let now = self.now().await?;
        let instant = Instant::now();
        let mut state = self.shared.state.lock();
        state.debounce_seen.retain(|_, (_, until)| *until > instant);
        if let Some((key, _)) = &trigger.key
            && let Some((burst, _)) = state.debounce_seen.get(key)
        {
            return Ok(Debounced::Duplicate { burst: burst.clone() });
        }
        let key = debounce_key(&trigger.workflow, &trigger.group);
        let open = state.open_bursts.get(&key).filter(|burst| state.bursts.get(*burst).is_some_and(|b| b.due > now));
        let burst = match open {
            Some(burst) => burst.clone(),
            None => {
                let fresh =
                    Burst { payload: String::new(), order: String::new(), triggers: 0, first_at: now, due: now };
                state.bursts.insert(trigger.burst.clone(), fresh);
                state.open_bursts.insert(key, trigger.burst.clone());
                trigger.burst.clone()
            }
        };
        let entry = state.bursts.get_mut(&burst).expect("the burst was just found or made");
        let order = trigger.order.clone().unwrap_or_else(|| format!("{now}-0"));
        if entry.order.is_empty() || compare_entry_ids(&order, &entry.order).is_ge() {
            entry.payload = trigger.payload.clone();
            entry.order = order;
        }
        entry.triggers += 1;
        entry.due = now + trigger.period_ms;
        if trigger.max_wait_ms > 0 {
            entry.due = entry.due.min(entry.first_at + trigger.max_wait_ms);
        }
        let (triggers, due) = (entry.triggers, entry.due);
        if let Some((key, ttl)) = &trigger.key {
            state.debounce_seen.insert(key.clone(), (burst.clone(), instant + *ttl));
        }
        Ok(Debounced::Absorbed { burst, triggers, due })
    }

    async fn due_bursts(&self, max: usize) -> StoreResult<Vec<DueBurst>> {
        let now = self.now().await?;
        let state = self.shared.state.lock();
        let mut due: Vec<(&String, &Burst)> = state.bursts.iter().filter(|(_, burst)| burst.due <= now).collect();
        due.sort_by_key(|(id, burst)| (burst.due, *id));
        Ok(due
            .into_iter()
            .take(max)
            .filter_map(|(id, burst)| {
                let (workflow, group) = burst_key(id)?;
                Some(DueBurst {
                    burst: id.clone(),
                    workflow: workflow.to_owned(),
                    group: group.to_owned(),
                    payload: burst.payload.clone(),
                    triggers: burst.triggers,
                    first_at: burst.first_at,
                })
            })
            .collect())
    }

    async fn finish_burst(&self, burst: &DueBurst) -> StoreResult<()> {
        let mut state = self.shared.state.lock();
        state.bursts.remove(&burst.burst);
        let key = debounce_key(&burst.workflow, &burst.group);
        if state.open_bursts.get(&key) == Some(&burst.burst) {
            state.open_bursts.remove(&key);
        }
        Ok(())
    }

    async fn burst_counts(&self) -> StoreResult<BTreeMap<String, u64>> {
        let state = self.shared.state.lock();
        let mut counts = BTreeMap::new();
        for (workflow, _) in state.bursts.keys().filter_map(|id| burst_key(id)) {
            *counts.entry(workflow.to_owned()).or_default() += 1;
        }
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::definition::{ActionSpec, RetryPolicy, StepDef, WorkflowDef};
    use crate::machine::{Advanced, Effect, Transition, Trigger, advance, step_failure};
    use crate::store::Dispatch;

    fn definition(steps: usize, max_attempts: u32) -> WorkflowDef {
        WorkflowDef {
            id: "wf".to_owned(),
            description: String::new(),
            schedule: None,
            timezone: None,
            catchup: Default::default(),
            catchup_window: std::time::Duration::from_secs(3600),
            overlap: Default::default(),
            events: Vec::new(),
            steps: (0..steps)
                .map(|i| StepDef {
                    id: format!("s{i}"),
                    action: ActionSpec::Noop,
                    when: None,
                    timeout: Duration::from_secs(1),
                    retry: RetryPolicy { max_attempts, ..RetryPolicy::default() },
                    needs: None,
                })
                .collect(),
            search: Vec::new(),
            result: None,
            concurrency: None,
            rate_limit: None,
            debounce: None,
        }
    }

    fn store() -> MemoryStore {
        MemoryStore::new(4)
    }

    fn record(at: Millis, transition: Transition) -> Recorded {
        Recorded { at, replica: Some("r1".to_owned()), transition }
    }

    /// A new run of `def` on `shard`, created at `now` and queued for its first step.
    fn new_run(def: &WorkflowDef, shard: u16, now: Millis, idempotency: Option<(&str, Duration)>) -> NewRun {
        let created = record(
            now,
            Transition::RunCreated {
                workflow: def.id.clone(),
                definition: "h".to_owned(),
                input: "{}".to_owned(),
                trigger: Trigger::Api,
                trace: None,
            },
        );
        let Advanced { state, appended, effects } = advance(None, def, vec![created], now).unwrap();
        NewRun {
            run: RunId::new(shard, now),
            dispatch: Dispatch::of_effects(&effects),
            state,
            records: appended,
            idempotency: idempotency.map(|(key, retention)| (key.to_owned(), retention)),
            search: Vec::new(),
        }
    }

    /// The commit of `happened` to a run in state `from`, as the engine builds it.
    fn commit_of(
        def: &WorkflowDef,
        run: &RunId,
        from: &RunState,
        lease: Option<Lease>,
        happened: Vec<Transition>,
        now: Millis,
    ) -> Commit {
        let records = happened.into_iter().map(|transition| record(now, transition)).collect();
        let Advanced { state, appended, effects } = advance(Some(from), def, records, now).unwrap();
        let timer = effects.iter().find_map(|effect| match effect {
            Effect::SetTimer { due } => Some(*due),
            Effect::Dispatch { .. } | Effect::CompleteRun | Effect::FailRun { .. } => None,
        });
        Commit {
            run: run.clone(),
            expected_seq: from.seq,
            lease,
            records: appended,
            dispatch: Dispatch::of_effects(&effects),
            state,
            timer,
            clear_timer: timer.is_none(),
        }
    }

    /// The commit of an executor that worked `claimed`: the step started, then succeeded or failed.
    fn work(def: &WorkflowDef, claimed: &Claimed, succeed: bool, now: Millis) -> Commit {
        let task = claimed.task.as_ref().unwrap();
        let (step, attempt) = (task.step, task.attempt);
        let ended = if succeed {
            Transition::StepCompleted { step, attempt, output: "{}".to_owned() }
        } else {
            step_failure(def, &task.state, step, attempt, "boom".to_owned(), now, 0.0)
        };
        let happened = vec![Transition::StepStarted { step, attempt }, ended];
        commit_of(def, &task.run.parse().unwrap(), &task.state, Some(claimed.lease.clone()), happened, now)
    }

    #[tokio::test]
    async fn a_run_that_ends_loses_its_timer() {
        let store = store();
        let def = definition(1, 2);
        let new = new_run(&def, 1, 1_000, None);
        let id = new.run.clone();
        store.create_run(new).await.unwrap();
        let claimed = store.claim("a", 1, Duration::ZERO).await.unwrap().remove(0);
        let failed = work(&def, &claimed, false, 1_010);
        let retrying = failed.state.clone();
        store.commit(failed).await.unwrap();
        let cancel = vec![Transition::RunCancelled { reason: "operator".to_owned() }];
        let cancelled = Commit { clear_timer: false, ..commit_of(&def, &id, &retrying, None, cancel, 1_020) };
        assert_eq!(store.commit(cancelled).await.unwrap(), CommitOutcome::Applied { seq: 4 });
        assert!(!store.has_timer(&id).await.unwrap());
        assert!(store.due_timers(Millis::MAX, 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_commit_without_records_redispatches_at_the_same_seq() {
        let store = store();
        let def = definition(1, 1);
        let new = new_run(&def, 2, 1_000, None);
        let id = new.run.clone();
        let state = new.state.clone();
        store.create_run(new).await.unwrap();
        let lost = store.claim("a", 1, Duration::ZERO).await.unwrap().remove(0);
        store.ack(&lost.lease).await.unwrap();
        assert!(!store.dispatch_exists(&id, &lost.lease.entry).await.unwrap());

        // What the sweeper does for a run left with neither a queued entry nor a lease.
        let again = Commit {
            run: id.clone(),
            expected_seq: 1,
            lease: None,
            records: Vec::new(),
            state,
            dispatch: vec![Dispatch { step: 0, attempt: 1 }],
            timer: None,
            clear_timer: false,
        };
        assert_eq!(store.commit(Commit { expected_seq: 2, ..again.clone() }).await.unwrap(), CommitOutcome::Stale);
        assert_eq!(store.commit(again).await.unwrap(), CommitOutcome::Applied { seq: 1 });
        let entries = store.summary(&id).await.unwrap().unwrap().ready_entries;
        let entry = entries.last().unwrap();
        assert_ne!(*entry, lost.lease.entry);
        assert!(store.dispatch_exists(&id, entry).await.unwrap());
        assert_eq!(store.history(&id).await.unwrap().unwrap().len(), 1);
        assert_eq!(store.claim("b", 5, Duration::ZERO).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn the_bus_removes_entries_ahead_of_the_clock() {
        let store = MemoryStore::new(4);
        let ok = store.publish_event(&[("type", b"a")]).await.unwrap();
        let now = wall_clock().unwrap();
        let hostile = EntryId { ms: now + 86_400_000, n: 0 };
        {
            let mut state = store.shared.state.lock();
            state.bus.stream.entries.insert(hostile, vec![(b"type".to_vec(), b"x".to_vec())]);
            state.bus.stream.last_id = hostile;
        }
        let read =
            store.read_events("c", 10, Duration::ZERO, EntryCap { max_bytes: 1024, keep_bytes: 16 }).await.unwrap();
        assert_eq!(read.len(), 2);
        let next = store.publish_event(&[("type", b"b")]).await.unwrap();
        let next: EntryId = next.parse().unwrap();
        assert!(next.ms < now + 60_000, "{next} is by the clock");
        let dead = store.dead_events(None, 10, EntryCap { max_bytes: 1 << 20, keep_bytes: 16 }).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].field("entry"), Some(hostile.to_string().as_bytes()));
        assert!(String::from_utf8_lossy(dead[0].field("reason").unwrap()).contains("ahead of the store's clock"));
        assert_eq!(store.health().await.unwrap().bus.hostile_removed, 1);
        // The router's group was moved back too: the new entry is delivered.
        let read =
            store.read_events("c", 10, Duration::ZERO, EntryCap { max_bytes: 1024, keep_bytes: 16 }).await.unwrap();
        assert_eq!(read.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), [next.to_string().as_str()]);
        assert_ne!(ok, next.to_string());
    }

    /// Parity with the Redis store's `bus_cut`: a large entry is read as prefixes with its sizes,
    /// dead-lettered as 4 KiB prefixes, and deleted from the bus.
    #[tokio::test]
    async fn oversized_bus_entries_are_read_cut_and_dead_lettered_bounded() {
        let store = MemoryStore::new(4);
        let payload = vec![b'a'; 100_000];
        let id = store.publish_event(&[("type", b"big"), ("payload", &payload)]).await.unwrap();
        let cap = EntryCap { max_bytes: 50_000, keep_bytes: DEAD_LETTER_KEEP };
        let read = store.read_events("c", 10, Duration::ZERO, cap).await.unwrap();
        let entry = &read[0];
        assert_eq!(entry.field("payload").unwrap().len(), DEAD_LETTER_KEEP);
        assert_eq!(entry.value_bytes("payload"), Some(100_000));
        assert_eq!(entry.total_bytes(), 100_000 + 4 + 3 + 7);
        store.dead_letter_event(entry, "too big").await.unwrap();
        let dead = store.dead_events(None, 10, EntryCap { max_bytes: 1 << 20, keep_bytes: 16 }).await.unwrap();
        assert_eq!(dead[0].field("payload").unwrap().len(), DEAD_LETTER_KEEP);
        assert_eq!(dead[0].field("truncated"), Some(b"1".as_slice()));
        assert_eq!(dead[0].field("bytes"), Some(b"100014".as_slice()));
        let query = EventQuery { before: None, event_type: None, limit: 10, scan: 10, cap: EntryCap::IDS };
        let listed = store.recent_events(query).await.unwrap();
        assert!(listed.iter().all(|e| e.entry.id != id), "the oversized original was deleted");
    }
}
