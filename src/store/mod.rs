//! The store: the only code that knows Redis. The engine talks to a [`Store`]; there are two,
//! [`redis::RedisStore`] (durable, shared by replicas) and [`memory::MemoryStore`] (the embedded
//! default and fast tests), with the same behaviour, checked by one conformance suite.
//!
//! Every transition is one atomic compare-and-append ([`Store::commit`]): if the run's sequence
//! number and the executor's lease are as expected, append the transitions, update the run's
//! summary, queue the next step or timer and acknowledge the worked entry; otherwise report the
//! conflict and change nothing.

pub mod codec;
pub mod keys;
pub mod memory;
pub mod redis;

use crate::definition::Workflow;
use crate::machine::{Millis, Recorded, RunState, Status};
use async_trait::async_trait;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// Errors of the store, named by what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or failed transiently: try again later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be decoded: a bug or a corrupted entry; retrying will not help.
    #[error("corrupt data at {key}: {problem}")]
    Corrupt { key: String, problem: String },
    /// The store refuses to serve (version too old, schema from the future): fix and restart.
    #[error("store not usable: {0}")]
    Fatal(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A run's id: a UUIDv7 (time-ordered) and the shard the run lives on, `<32 hex>-s<shard>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RunId {
    pub shard: u16,
    pub uuid: uuid::Uuid,
}

impl RunId {
    pub fn new(shard: u16, now: Millis) -> RunId {
        let ts = uuid::Timestamp::from_unix(uuid::NoContext, now / 1000, ((now % 1000) * 1_000_000) as u32);
        RunId { shard, uuid: uuid::Uuid::new_v7(ts) }
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-s{}", self.uuid.simple(), self.shard)
    }
}

impl FromStr for RunId {
    type Err = String;
    fn from_str(text: &str) -> Result<RunId, String> {
        let bad = || format!("`{text}` is not a run id (expected 32 hex digits, `-s`, a shard number)");
        let (hex_part, shard) = text.split_once("-s").ok_or_else(bad)?;
        if hex_part.len() != 32 || shard.is_empty() || shard.len() > 5 {
            return Err(bad());
        }
        let uuid = uuid::Uuid::try_parse(hex_part).map_err(|_| bad())?;
        let shard: u16 = shard.parse().map_err(|_| bad())?;
        Ok(RunId { shard, uuid })
    }
}

/// Which implementation is serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Redis,
    Memory,
}

impl StoreKind {
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Redis => "redis",
            StoreKind::Memory => "memory",
        }
    }
}

/// What `/health` reports about the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreHealth {
    pub kind: StoreKind,
    pub version: Option<String>,
    /// Problems an operator must know about (eviction policy, volatile store...).
    pub warnings: Vec<String>,
}

/// An executor's hold on a ready entry: the entry's id in its shard's ready stream. In Redis
/// the consumer group's pending entry is the lease: owner, idle time and delivery count.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lease {
    pub shard: u16,
    pub entry: String,
    /// The consumer (replica) holding it.
    pub consumer: String,
}

/// A step ready to run, as queued: the run and its state when the step was dispatched.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReadyTask {
    pub run: String,
    pub state: RunState,
}

/// A ready entry claimed by this replica.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    pub lease: Lease,
    /// How many times the entry has been delivered, this delivery included.
    pub deliveries: u64,
    /// The task, or why the entry could not be decoded (it is then dead-lettered by the store).
    pub task: Result<ReadyTask, String>,
}

/// A new run to create, atomically with its idempotency key when it has one.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub run: RunId,
    pub state: RunState,
    pub records: Vec<Recorded>,
    pub dispatch: Option<RunState>,
    /// `(key, retention)`: the same key within its retention returns the first run.
    pub idempotency: Option<(String, Duration)>,
}

/// The outcome of [`Store::create_run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    New(RunId),
    /// The idempotency key was already used, by this run.
    Duplicate(String),
}

/// One atomic transition of a run.
#[derive(Debug, Clone)]
pub struct Commit {
    pub run: RunId,
    /// The run's `seq` this commit was computed from.
    pub expected_seq: u64,
    /// The entry being worked, checked to be still ours and acknowledged by the commit.
    pub lease: Option<Lease>,
    pub records: Vec<Recorded>,
    /// The run's state after `records`.
    pub state: RunState,
    /// Queue a step: the state to hand to the executor.
    pub dispatch: Option<RunState>,
    /// Wake the run at this time (replacing any timer it had).
    pub timer: Option<Millis>,
    /// Remove the run's timer (it fired, or the run ended).
    pub clear_timer: bool,
}

/// The outcome of [`Store::commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    Applied {
        seq: u64,
    },
    /// The run moved on since `expected_seq`: the caller decided on stale state.
    Stale,
    /// The lease is no longer this replica's: another replica took the entry over, or it was
    /// acknowledged already.
    LeaseLost,
    /// The run is finished or gone; the entry (if any) was acknowledged.
    Gone,
}

/// A run's summary as kept for O(1) reads: the run hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSummary {
    pub workflow: String,
    pub definition: String,
    pub status: String,
    pub step: Option<u32>,
    pub attempt: Option<u32>,
    pub seq: u64,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// The id of the ready entry of the current dispatch, if the run has one.
    pub ready_entry: Option<String>,
}

impl RunSummary {
    /// The summary a state projects to: what the run hash must hold after a commit.
    pub fn of(state: &RunState) -> RunSummary {
        let step_attempt = state.status.step_attempt();
        RunSummary {
            workflow: state.workflow.clone(),
            definition: state.definition.clone(),
            status: state.status.name().to_owned(),
            step: step_attempt.map(|(s, _)| s),
            attempt: step_attempt.map(|(_, a)| a),
            seq: state.seq,
            created_at: state.created_at,
            updated_at: state.updated_at,
            ready_entry: None,
        }
    }

    /// Whether the stored summary says what the replayed state says (ignoring the ready entry).
    pub fn matches(&self, state: &RunState) -> bool {
        let expected = RunSummary { ready_entry: self.ready_entry.clone(), ..RunSummary::of(state) };
        &expected == self
    }
}

/// One transition of a run's log, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub seq: u64,
    pub recorded: Recorded,
}

/// A page of runs, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPage {
    pub runs: Vec<RunId>,
}

/// What a pass of housekeeping did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Housekeeping {
    pub trimmed_entries: u64,
    pub expired_runs: u64,
}

/// The durable state of one workflow's schedule, shared by every replica.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CronState {
    /// The latest fire handled (started, skipped or buffered) by any replica.
    pub last_fire: Option<Millis>,
    /// The run the latest started fire created.
    pub last_run: Option<String>,
    /// A fire waiting for the previous run to end (`overlap = "buffer"`).
    pub buffered: Option<Millis>,
}

/// An entry of the event bus stream as read: its id and raw fields (binary-safe: anyone may
/// `XADD` anything), and how often it was delivered to the router group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusEntry {
    pub id: String,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    pub deliveries: u64,
}

impl BusEntry {
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields.iter().find(|(k, _)| k.as_slice() == name.as_bytes()).map(|(_, v)| v.as_slice())
    }
}

/// An event as listed by the API: the entry and, once the router has handled it, the runs it
/// started (`None` while it waits for the router).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedEvent {
    pub entry: BusEntry,
    pub started: Option<Vec<(String, String)>>,
}

/// Queue lengths for `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Entries in the ready streams (queued, leased, or acked and not yet trimmed).
    pub ready_length: u64,
    /// Ready entries delivered and not yet acknowledged: steps running (or orphaned).
    pub ready_pending: u64,
    pub events_length: u64,
    /// Events delivered to a router and not yet settled.
    pub events_pending: u64,
    pub events_dead: u64,
}

/// The store the engine runs on.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    fn kind(&self) -> StoreKind;

    /// How many shards runs are spread over.
    fn shards(&self) -> u16;

    /// The store's clock: the one clock every replica judges time by.
    async fn now(&self) -> StoreResult<Millis>;

    async fn health(&self) -> StoreResult<StoreHealth>;

    /// Stores the definition snapshots (by hash, on every shard) so runs can find theirs.
    async fn save_definitions(&self, workflows: &[Arc<Workflow>]) -> StoreResult<()>;

    async fn load_definition(&self, shard: u16, hash: &str) -> StoreResult<Option<Workflow>>;

    /// Creates a run: appends its first transitions, writes its summary and indexes, queues its
    /// first step; or, if its idempotency key is taken, reports the run that took it.
    async fn create_run(&self, new: NewRun) -> StoreResult<Created>;

    /// The atomic, fenced transition. See [`Commit`].
    async fn commit(&self, commit: Commit) -> StoreResult<CommitOutcome>;

    /// A leased commit that, when applied, also claims one new ready entry of the run's shard
    /// for the lease's consumer, in the same round trip (an executor's next step, often the one
    /// just queued).
    async fn commit_and_claim(&self, commit: Commit) -> StoreResult<(CommitOutcome, Option<Claimed>)> {
        Ok((self.commit(commit).await?, None))
    }

    /// Like [`Store::commit`] for a finished run being resumed: `finished_log` (the run's whole
    /// log, as read) becomes a live log again before `commit.records` are appended, if the run
    /// is still finished at `commit.expected_seq`.
    async fn reopen(&self, commit: Commit, finished_log: &[Recorded]) -> StoreResult<CommitOutcome>;

    /// Deletes a queued ready entry (its run was cancelled): it is never delivered; if it was,
    /// its lease holder's commit is rejected as stale.
    async fn retract(&self, run: &RunId, entry: &str) -> StoreResult<()>;

    /// Acknowledges an entry without a transition (it is obsolete), if it is still ours.
    async fn ack(&self, lease: &Lease) -> StoreResult<()>;

    /// New ready entries for `consumer`, at most `max` when any are queued; otherwise waits up
    /// to `block` for one, and what arrives then may exceed `max` by up to one per shard.
    async fn claim(&self, consumer: &str, max: usize, block: Duration) -> StoreResult<Vec<Claimed>>;

    /// Renews the leases still held by their consumers; returns the ones no longer held.
    async fn renew(&self, leases: &[Lease]) -> StoreResult<Vec<Lease>>;

    /// Takes over entries whose lease expired (idle longer than `min_idle`), at most `max`.
    async fn reclaim(&self, consumer: &str, min_idle: Duration, max: usize) -> StoreResult<Vec<Claimed>>;

    /// Runs whose timer is due at `now`: at most `max` per shard, the earliest of each (so up
    /// to `max * shards` in all).
    async fn due_timers(&self, now: Millis, max: usize) -> StoreResult<Vec<RunId>>;

    async fn summary(&self, run: &RunId) -> StoreResult<Option<RunSummary>>;

    /// The run's whole log, in order (live or compacted).
    async fn history(&self, run: &RunId) -> StoreResult<Option<Vec<Logged>>>;

    /// Non-terminal runs not updated since `before`, at most `max` per shard: the sweeper's
    /// candidates.
    async fn quiet_runs(&self, before: Millis, max: usize) -> StoreResult<Vec<(RunId, RunSummary)>>;

    /// Whether the run's current ready entry still exists (queued, or pending under a lease).
    async fn dispatch_exists(&self, run: &RunId, entry: &str) -> StoreResult<bool>;

    /// Whether the run has a timer set.
    async fn has_timer(&self, run: &RunId) -> StoreResult<bool>;

    /// Newest runs first (by creation), optionally of one workflow and/or status, created
    /// before `before` (the last run of the previous page). Finished statuses are indexed, so a
    /// page costs O(page); live statuses are filtered from the shard's live runs.
    async fn list_runs(
        &self,
        workflow: Option<&str>,
        status: Option<&str>,
        before: Option<&RunId>,
        limit: usize,
    ) -> StoreResult<RunPage>;

    /// How many stored runs of `workflow` are in each status (live statuses counted over at
    /// most 1,000 live runs per shard).
    async fn count_runs(&self, workflow: &str) -> StoreResult<Vec<(String, u64)>>;

    /// Trims ready streams behind their consumers and deletes finished runs older than
    /// `retain_until`.
    async fn housekeeping(&self, retain_until: Millis) -> StoreResult<Housekeeping>;

    // ---- schedules ----

    async fn cron_state(&self, workflow: &str) -> StoreResult<CronState>;

    /// Records that `fire` was handled (the stored last fire only moves forward) and, when a run
    /// was started for it, which.
    /// Returns whether this call moved the last fire forward (another replica may have first).
    async fn cron_advance(&self, workflow: &str, fire: Millis, run: Option<&str>) -> StoreResult<bool>;

    /// Sets (or, with `None`, clears) the buffered fire.
    async fn cron_buffer(&self, workflow: &str, fire: Option<Millis>) -> StoreResult<()>;

    // ---- the event bus ----

    /// Appends an event to the bus; returns its entry id.
    async fn publish_event(&self, fields: &[(&str, &[u8])]) -> StoreResult<String>;

    /// New bus entries for the router consumer `consumer`, at most `max`, waiting up to `block`.
    async fn read_events(&self, consumer: &str, max: usize, block: Duration) -> StoreResult<Vec<BusEntry>>;

    /// Bus entries delivered to a router that did not settle them within `min_idle`.
    async fn reclaim_events(&self, consumer: &str, min_idle: Duration, max: usize) -> StoreResult<Vec<BusEntry>>;

    /// Records the runs an event started (kept for `retention`) and acknowledges it.
    async fn settle_event(&self, id: &str, started: &[(String, String)], retention: Duration) -> StoreResult<()>;

    /// Moves a malformed entry to the dead-letter stream with its reason, and acknowledges it.
    async fn dead_letter_event(&self, entry: &BusEntry, reason: &str) -> StoreResult<()>;

    /// Recent events, newest first, before the entry id `before` (exclusive), at most `limit`,
    /// of type `event_type` if given (looking at no more than `scan` entries).
    async fn recent_events(
        &self,
        before: Option<&str>,
        event_type: Option<&str>,
        limit: usize,
        scan: usize,
    ) -> StoreResult<Vec<ListedEvent>>;

    /// Trims the bus to about `max_len` entries and to entries newer than `min_time`, never
    /// dropping one the router has not handled. Returns the entries trimmed.
    async fn trim_events(&self, max_len: u64, min_time: Millis) -> StoreResult<u64>;

    /// The bus stream's length and the dead-letter stream's length.
    async fn event_counts(&self) -> StoreResult<(u64, u64)>;

    async fn stream_stats(&self) -> StoreResult<StreamStats>;

    // ---- runs waiting for events ----

    /// Registers a run waiting for events of type `event` until `until`.
    async fn add_wait(&self, event: &str, run: &RunId, until: Millis) -> StoreResult<()>;

    async fn remove_wait(&self, event: &str, run: &RunId) -> StoreResult<()>;

    /// Runs registered as waiting for `event` (at most 1,000).
    async fn waiting(&self, event: &str) -> StoreResult<Vec<RunId>>;

    // ---- small shared values (a sync cursor, say) ----

    async fn get_value(&self, key: &str) -> StoreResult<Option<String>>;

    async fn set_value(&self, key: &str, value: &str) -> StoreResult<()>;

    /// Bytes of memory the store uses, where it can tell.
    async fn memory_used(&self) -> StoreResult<Option<u64>>;
}

/// Orders stream entry ids (`<ms>-<seq>`) numerically.
pub fn compare_entry_ids(a: &str, b: &str) -> std::cmp::Ordering {
    let parse = |id: &str| {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (ms.parse::<u64>().unwrap_or(0), seq.parse::<u64>().unwrap_or(0))
    };
    parse(a).cmp(&parse(b))
}

/// The summary fields of a status.
pub fn is_terminal_name(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled" | "timed_out")
}

/// A status's projection for the terminal indexes.
pub fn terminal_name(status: &Status) -> Option<&'static str> {
    status.is_terminal().then(|| status.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_round_trip_and_reject_garbage() {
        let id = RunId::new(7, 1_700_000_000_123);
        let text = id.to_string();
        assert!(text.ends_with("-s7"), "{text}");
        assert_eq!(text.parse::<RunId>().unwrap(), id);
        for bad in ["", "x-s1", "0193e4a17b2c7d3e8f001a2b3c4d5e6f", "0193e4a17b2c7d3e8f001a2b3c4d5e6f-sx", "../../etc"]
        {
            assert!(bad.parse::<RunId>().is_err(), "{bad}");
        }
    }
}
