//! The store: the only code that knows Redis. The engine talks to a [`Store`]; there are two,
//! [`redis::RedisStore`] (durable, shared by replicas) and [`memory::MemoryStore`] (the embedded
//! default and fast tests), with the same behaviour, checked by one conformance suite. A
//! [`Store`] is its concerns, each a trait: [`Backend`] (kind, clock, health), [`Definitions`],
//! [`Runs`] (creation and commits), [`ReadySteps`] (the ready queue and its leases), [`Listing`],
//! [`Schedules`], [`EventBus`], [`Waits`], [`Values`], [`Replicas`].
//!
//! Every transition is one atomic compare-and-append ([`Runs::commit`]): if the run's sequence
//! number and the executor's lease are as expected, append the transitions, update the run's
//! summary, queue the next steps and the timer and acknowledge the worked entry; otherwise report the
//! conflict and change nothing.

pub mod codec;
pub mod keys;
pub mod memory;
pub mod redis;

use crate::definition::Workflow;
use crate::machine::{Millis, Recorded, RunState, Status};
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// Errors of the store, named by what the caller should do.
#[derive(Debug, Clone, thiserror::Error)]
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

    /// When the run was created: the time its id carries (milliseconds).
    pub fn created_at(&self) -> Millis {
        self.uuid.get_timestamp().map_or(0, |t| {
            let (secs, nanos) = t.to_unix();
            secs * 1000 + u64::from(nanos / 1_000_000)
        })
    }

    /// The lowest id of runs created at `at`: a listing cursor that starts with the runs created
    /// before `at` (ids order by creation time, and a listing takes the ids below its cursor).
    pub fn first_at(at: Millis) -> RunId {
        RunId { shard: 0, uuid: uuid::Builder::from_unix_timestamp_millis(at, &[0; 10]).into_uuid() }
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
    /// What the bus has had to defend itself against.
    pub bus: BusCondition,
}

/// Entries removed from the bus because their ids were too far ahead of the store's clock (see
/// [`EventBus::repair_bus`]), over the store's lifetime.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BusCondition {
    pub hostile_removed: u64,
    /// The id of the last one removed, and when.
    pub last_hostile: Option<(String, Millis)>,
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

/// A step ready to run, as queued: the run, the step attempt, and the run's state when the step
/// was dispatched.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReadyTask {
    pub run: String,
    pub step: u32,
    pub attempt: u32,
    pub state: RunState,
}

/// A step attempt a commit queues: a ready entry of its own (so that steps whose needs are met
/// together run at once, on any executors), carrying the run's state after the commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dispatch {
    pub step: u32,
    pub attempt: u32,
}

impl Dispatch {
    /// The step attempts `effects` queue.
    pub fn of_effects(effects: &[crate::machine::Effect]) -> Vec<Dispatch> {
        effects
            .iter()
            .filter_map(|effect| match effect {
                crate::machine::Effect::Dispatch { step, attempt } => Some(Dispatch { step: *step, attempt: *attempt }),
                _ => None,
            })
            .collect()
    }
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
    /// The steps to queue, with `state`.
    pub dispatch: Vec<Dispatch>,
    /// `(key, retention)`: the same key within its retention returns the first run.
    pub idempotency: Option<(String, Duration)>,
    /// The input values the run is indexed by (`WorkflowDef::search_values`).
    pub search: Vec<(String, String)>,
}

/// The outcome of [`Runs::create_run`] (one per run of [`Runs::create_runs`]).
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
    /// The steps to queue, with `state`.
    pub dispatch: Vec<Dispatch>,
    /// Wake the run at this time (replacing any timer it had).
    pub timer: Option<Millis>,
    /// Remove the run's timer (it fired, or the run ended).
    pub clear_timer: bool,
}

/// An executor's commit of its step, which may ask for the next ready step for its executor
/// (see [`Runs::commit_steps`]).
#[derive(Debug, Clone)]
pub struct StepCommit {
    pub commit: Commit,
    /// Claim the next ready entry for the commit's lease's consumer in the same call.
    pub claim_next: bool,
}

/// The outcome of a [`StepCommit`], and the entry claimed for it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepCommitted {
    pub outcome: CommitOutcome,
    pub next: Option<Claimed>,
}

/// The outcome of [`Runs::commit`].
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
    pub status: Status,
    pub step: Option<u32>,
    pub attempt: Option<u32>,
    pub seq: u64,
    pub created_at: Millis,
    pub updated_at: Millis,
    /// The ids of the run's ready entries that may still be live: every entry queued for it and
    /// not yet acknowledged by the commit of its outcome (an entry acknowledged otherwise, or
    /// dead-lettered, stays until the run's next commit that queues or acknowledges one).
    pub ready_entries: Vec<String>,
    /// What started the run ([`crate::machine::Trigger::kind`]); `None` for runs created by a
    /// version that did not record it.
    pub trigger: Option<String>,
    /// The input values the run was indexed by when it was created (what its deletion must
    /// remove from the search indexes).
    pub search: Vec<(String, String)>,
}

impl RunSummary {
    /// The summary a state projects to: what the run hash must hold after a commit.
    pub fn of(state: &RunState) -> RunSummary {
        let step_attempt = state.position();
        RunSummary {
            workflow: state.workflow.clone(),
            definition: state.definition.clone(),
            status: state.status,
            step: step_attempt.map(|(s, _)| s),
            attempt: step_attempt.map(|(_, a)| a),
            seq: state.seq,
            created_at: state.created_at,
            updated_at: state.updated_at,
            ready_entries: Vec::new(),
            trigger: Some(state.trigger.kind().to_owned()),
            search: Vec::new(),
        }
    }

    /// Whether the stored summary says what the replayed state says (ignoring the ready entry
    /// and the search values, which the state does not hold, and the trigger where a run's
    /// summary has none: runs created before it was recorded).
    pub fn matches(&self, state: &RunState) -> bool {
        let mut expected = RunSummary {
            ready_entries: self.ready_entries.clone(),
            search: self.search.clone(),
            ..RunSummary::of(state)
        };
        if self.trigger.is_none() {
            expected.trigger = None;
        }
        &expected == self
    }
}

/// One transition of a run's log, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub seq: u64,
    pub recorded: Recorded,
}

/// Which runs a listing wants: of `workflow` (or any), in `status` (or any), created before
/// `before` (the last run of the previous page), at most `limit`, newest first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunQuery<'a> {
    pub workflow: Option<&'a str>,
    pub status: Option<Status>,
    pub before: Option<&'a RunId>,
    pub limit: usize,
}

/// Which runs a search wants: of `workflow` whose input held `value` in the search field `field`,
/// created before `before`, at most `limit`, newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchQuery<'a> {
    pub workflow: &'a str,
    pub field: &'a str,
    pub value: &'a str,
    pub before: Option<&'a RunId>,
    pub limit: usize,
}

/// Which events a listing wants: before the entry id `before` (exclusive), at most `limit`, of
/// type `event_type` if given (looking at no more than `scan` entries), each cut to `cap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventQuery<'a> {
    pub before: Option<&'a str>,
    pub event_type: Option<&'a str>,
    pub limit: usize,
    pub scan: usize,
    pub cap: EntryCap,
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

/// An event the router handled: its bus entry id and the runs it started (workflow, run id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettledEvent {
    pub id: String,
    pub started: Vec<(String, String)>,
}

/// An entry of the event bus stream as read: its id and raw fields (binary-safe: anyone may
/// `XADD` anything), and how often it was delivered to the router group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusEntry {
    pub id: String,
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
    pub deliveries: u64,
    /// Set when the entry was larger than the [`EntryCap`] it was read with: `fields` then hold
    /// prefixes only.
    pub oversized: Option<Oversized>,
}

/// What an entry read cut to size had: its size, and the size of each value `fields` keeps a
/// prefix of (in the same order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Oversized {
    /// Field names and values together.
    pub total_bytes: u64,
    pub value_bytes: Vec<u64>,
}

impl BusEntry {
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields.iter().find(|(k, _)| k.as_slice() == name.as_bytes()).map(|(_, v)| v.as_slice())
    }

    /// The original size of field `name`'s value (which `fields` may hold a prefix of).
    pub fn value_bytes(&self, name: &str) -> Option<u64> {
        let index = self.fields.iter().position(|(k, _)| k.as_slice() == name.as_bytes())?;
        match &self.oversized {
            Some(oversized) => oversized.value_bytes.get(index).copied(),
            None => Some(self.fields[index].1.len() as u64),
        }
    }

    /// Field names and values together, in bytes.
    pub fn total_bytes(&self) -> u64 {
        match &self.oversized {
            Some(oversized) => oversized.total_bytes,
            None => self.fields.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum(),
        }
    }
}

/// How much of a bus entry a read brings into memory. Anyone may `XADD` an entry of hundreds of
/// megabytes; the store cuts it before a replica holds it (Redis in its Lua, so that it never
/// crosses the wire whole): an entry whose names and values total at most `max_bytes` is read
/// whole, a larger one as a `keep_bytes` prefix of each of its first 64 values (names cut to
/// 256 bytes) with its sizes in [`BusEntry::oversized`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryCap {
    pub max_bytes: usize,
    pub keep_bytes: usize,
}

impl EntryCap {
    /// For reads that need only the ids.
    pub const IDS: EntryCap = EntryCap { max_bytes: 0, keep_bytes: 0 };

    /// Cuts `fields` as the Redis store's Lua does (the memory store's reads).
    pub fn cut(&self, fields: &[EntryField]) -> (Vec<EntryField>, Option<Oversized>) {
        let total: usize = fields.iter().map(|(k, v)| k.len() + v.len()).sum();
        if total <= self.max_bytes {
            return (fields.to_vec(), None);
        }
        let kept: Vec<EntryField> = fields
            .iter()
            .take(MAX_CUT_FIELDS)
            .map(|(k, v)| (k[..k.len().min(256)].to_vec(), v[..v.len().min(self.keep_bytes)].to_vec()))
            .collect();
        let value_bytes = fields.iter().take(MAX_CUT_FIELDS).map(|(_, v)| v.len() as u64).collect();
        (kept, Some(Oversized { total_bytes: total as u64, value_bytes }))
    }
}

/// A stream entry's field: its name and value, binary-safe.
pub type EntryField = (Vec<u8>, Vec<u8>);

/// How many fields an entry cut to size keeps (as `bus_cut` in the Lua).
const MAX_CUT_FIELDS: usize = 64;

/// How far ahead of the store's clock a bus entry's id may be. Redis gives each new entry an id
/// above the stream's last one, so one entry written with an id far ahead (or at the very end of
/// the id space) would push every later id there (or make appends fail for good); such entries
/// are dead-lettered and removed, and the stream's last id set back (see [`EventBus::repair_bus`]).
/// Entries of the same millisecond as now, or slightly ahead (a writer's clock), are fine.
pub const BUS_CLOCK_TOLERANCE: Duration = Duration::from_secs(60);

/// How much of each field a dead letter keeps: enough to see what was sent.
pub const DEAD_LETTER_KEEP: usize = 4096;

/// A dead letter's fields: `reason`, `entry` (the bus entry's id), `bytes` (the entry's size),
/// `truncated` (`1` when values were cut to [`DEAD_LETTER_KEEP`] bytes, else `0`), then the
/// entry's fields (one named like ours is prefixed with `original.`).
pub fn dead_letter_fields(entry: &BusEntry, reason: &str) -> Vec<EntryField> {
    let (kept, cut) = EntryCap { max_bytes: DEAD_LETTER_KEEP, keep_bytes: DEAD_LETTER_KEEP }.cut(&entry.fields);
    let truncated = entry.oversized.is_some() || cut.is_some();
    let mut fields = vec![
        (b"reason".to_vec(), reason.as_bytes().to_vec()),
        (b"entry".to_vec(), entry.id.as_bytes().to_vec()),
        (b"bytes".to_vec(), entry.total_bytes().to_string().into_bytes()),
        (b"truncated".to_vec(), if truncated { b"1".to_vec() } else { b"0".to_vec() }),
    ];
    for (name, value) in kept {
        let name = if matches!(name.as_slice(), b"reason" | b"entry" | b"bytes" | b"truncated") {
            [b"original.".as_slice(), &name].concat()
        } else {
            name
        };
        fields.push((name, value));
    }
    fields
}

impl BusCondition {
    /// How long after the last removal `/health` keeps warning about it.
    const WARN_FOR: Millis = 24 * 3600 * 1000;

    /// The `/health` warning, while the last removal is recent.
    pub fn warning(&self, now: Millis) -> Option<String> {
        let (id, at) = self.last_hostile.as_ref()?;
        (now.saturating_sub(*at) < Self::WARN_FOR).then(|| {
            format!(
                "{} event bus entr{} with ids far ahead of the clock {} removed (the last, `{id}`, less than a day ago): a client writes explicit ids with XADD; they are in the dead-letter stream",
                self.hostile_removed,
                if self.hostile_removed == 1 { "y" } else { "ies" },
                if self.hostile_removed == 1 { "was" } else { "were" },
            )
        })
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
    /// Bus entries removed for ids too far ahead of the clock, over the store's lifetime.
    pub events_hostile_removed: u64,
}

/// A replica's heartbeat: who it is and how busy, as it last said (see [`Replicas::heartbeat`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplicaBeat {
    /// The replica's consumer name (`REPLICA_ID` and an incarnation suffix): unique per process.
    pub id: String,
    pub version: String,
    pub executors_busy: u64,
    pub executors_total: u64,
    pub started_at: Millis,
    /// When it wrote this beat (by the store's clock, as the replica knows it).
    pub last_seen: Millis,
}

/// The store the engine runs on.
/// What a store is: its kind, shards, clock, health and memory.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    fn kind(&self) -> StoreKind;

    /// How many shards runs are spread over.
    fn shards(&self) -> u16;

    /// The store's clock: the one clock every replica judges time by.
    async fn now(&self) -> StoreResult<Millis>;

    async fn health(&self) -> StoreResult<StoreHealth>;

    /// Why the store cannot be reached right now, when its connections are known to be down
    /// (the last connection error: refused, authentication, ...); `None` when connected or
    /// when it cannot tell. Cheap and synchronous, so that a request can fail fast instead of
    /// waiting for a command time-out.
    fn connection_problem(&self) -> Option<String> {
        None
    }

    /// Bytes of memory the store uses, where it can tell.
    async fn memory_used(&self) -> StoreResult<Option<u64>>;

    async fn stream_stats(&self) -> StoreResult<StreamStats>;
}

/// Definition snapshots, by hash, so that runs find theirs.
#[async_trait]
pub trait Definitions: Send + Sync + 'static {
    /// Stores the definition snapshots (by hash, on every shard) so runs can find theirs.
    async fn save_definitions(&self, workflows: &[Arc<Workflow>]) -> StoreResult<()>;

    async fn load_definition(&self, shard: u16, hash: &str) -> StoreResult<Option<Workflow>>;
}

/// Runs and their commits: creation, the fenced transition, reads of one run, the sweeper's and
/// housekeeping's views.
#[async_trait]
pub trait Runs: Send + Sync + 'static {
    /// Creates a run: appends its first transitions, writes its summary and indexes, queues its
    /// first step; or, if its idempotency key is taken, reports the run that took it.
    async fn create_run(&self, new: NewRun) -> StoreResult<Created> {
        let run = new.run.to_string();
        let mut created = self.create_runs(vec![new]).await?;
        created.pop().ok_or_else(|| StoreError::Corrupt { key: run, problem: "its creation had no outcome".to_owned() })
    }

    /// Group creation: several runs created in one atomic call, each with its own outcome, in
    /// order, exactly as if each had been created alone right after the ones before it (two runs
    /// of one idempotency key: the second is the first's duplicate). An error means the
    /// outcomes are unknown, as for [`Runs::commit_group`]: some runs may have been created.
    async fn create_runs(&self, runs: Vec<NewRun>) -> StoreResult<Vec<Created>>;

    /// The atomic, fenced transition. See [`Commit`].
    async fn commit(&self, commit: Commit) -> StoreResult<CommitOutcome>;

    /// Group commit: several runs' transitions in one atomic call. Every commit is checked
    /// before anything is written and gets its own outcome, in order, exactly as if it had been
    /// committed alone right after the ones before it (so a second commit of one run in the same
    /// group, computed from the same seq, is [`CommitOutcome::Stale`]). An error means the
    /// outcomes are unknown: Redis has no rollback, so a call that failed half-way may have
    /// applied some commits without acknowledging their leases; each such entry is then
    /// redelivered after its lease expires and its commit, fenced by seq, found stale.
    async fn commit_group(&self, commits: Vec<Commit>) -> StoreResult<Vec<CommitOutcome>> {
        let steps = commits.into_iter().map(|commit| StepCommit { commit, claim_next: false }).collect();
        Ok(self.commit_steps(steps).await?.into_iter().map(|committed| committed.outcome).collect())
    }

    /// [`Runs::commit_group`] of executors' commits, in which each commit that asks for it
    /// (`claim_next`, with a lease) may get the next ready entry for its lease's consumer,
    /// claimed in the same call once the commits are written, without blocking, from the ready
    /// streams of the group's shards (as [`ReadySteps::claim`] would): its executor runs it
    /// next, with no read and no round trip of its own. The entries go to the commits that
    /// asked, in order, whatever their outcomes, as many as were queued; an undecodable one is
    /// dead-lettered, as by a claim. On an error nothing is known to be
    /// claimed: an entry claimed by a call whose reply was lost is pending under the consumer
    /// and taken over once its lease expires.
    async fn commit_steps(&self, commits: Vec<StepCommit>) -> StoreResult<Vec<StepCommitted>>;

    /// Like [`Runs::commit`] for a finished run being resumed: its log is live again and the
    /// run is back among the live ones, if it is still finished at `commit.expected_seq`.
    async fn reopen(&self, commit: Commit) -> StoreResult<CommitOutcome>;

    /// The sweeper's re-queue: a [`Runs::commit`] of no records that queues the run's step (or
    /// sets its timer) again, refused as [`CommitOutcome::Stale`] when the run's ready entry is
    /// live after all (queued, or leased). Judged in the same atomic step as the write, so that a
    /// re-queue never adds a second ready entry beside a live one, however many replicas sweep.
    async fn requeue(&self, commit: Commit) -> StoreResult<CommitOutcome>;

    async fn summary(&self, run: &RunId) -> StoreResult<Option<RunSummary>>;

    /// The run's whole log, in order.
    async fn history(&self, run: &RunId) -> StoreResult<Option<Vec<Logged>>>;

    /// Non-terminal runs not updated since `before`, at most `max` per shard: the sweeper's
    /// candidates.
    async fn quiet_runs(&self, before: Millis, max: usize) -> StoreResult<Vec<(RunId, RunSummary)>>;

    /// Whether the run has a timer set.
    async fn has_timer(&self, run: &RunId) -> StoreResult<bool>;

    /// Runs whose timer is due at `now`: at most `max` per shard, the earliest of each (so up
    /// to `max * shards` in all).
    async fn due_timers(&self, now: Millis, max: usize) -> StoreResult<Vec<RunId>>;

    /// Trims ready streams behind their consumers and deletes finished runs older than
    /// `retain_until`.
    async fn housekeeping(&self, retain_until: Millis) -> StoreResult<Housekeeping>;
}

/// The ready queue and its leases: claims, renewal, take-over, acknowledgement.
#[async_trait]
pub trait ReadySteps: Send + Sync + 'static {
    /// Acknowledges an entry without a transition (it is obsolete), if it is still ours.
    async fn ack(&self, lease: &Lease) -> StoreResult<()>;

    /// New ready entries for `consumer`, at most `max` when any are queued; otherwise waits up
    /// to `block` for one, and what arrives then may exceed `max` by up to one per shard.
    async fn claim(&self, consumer: &str, max: usize, block: Duration) -> StoreResult<Vec<Claimed>>;

    /// Renews the leases still held by their consumers; returns the ones no longer held.
    async fn renew(&self, leases: &[Lease]) -> StoreResult<Vec<Lease>>;

    /// Takes over entries whose lease expired (idle longer than `min_idle`), at most `max`.
    async fn reclaim(&self, consumer: &str, min_idle: Duration, max: usize) -> StoreResult<Vec<Claimed>>;

    /// Whether the run's current ready entry still exists (queued, or pending under a lease).
    async fn dispatch_exists(&self, run: &RunId, entry: &str) -> StoreResult<bool>;
}

/// Runs listed newest first: all, by workflow and status, by indexed input values.
#[async_trait]
pub trait Listing: Send + Sync + 'static {
    /// Newest runs first (by creation), optionally of one workflow and/or status, created
    /// before `before` (the last run of the previous page). Finished statuses are indexed, so a
    /// page costs O(page); live statuses are filtered from the shard's live runs.
    async fn list_runs(&self, query: RunQuery<'_>) -> StoreResult<RunPage>;

    /// Runs of a workflow whose input held a value in a search field when they were created,
    /// newest first, created before the cursor (the last run of the previous page): O(page),
    /// like [`Listing::list_runs`].
    async fn search_runs(&self, query: SearchQuery<'_>) -> StoreResult<RunPage>;

    /// How many stored runs of `workflow` are in each status (live statuses counted over at
    /// most 16,000 live runs of all workflows).
    async fn count_runs(&self, workflow: &str) -> StoreResult<Vec<(Status, u64)>>;
}

/// Each cron schedule's shared state.
#[async_trait]
pub trait Schedules: Send + Sync + 'static {
    async fn cron_state(&self, workflow: &str) -> StoreResult<CronState>;

    /// Records that `fire` was handled (the stored last fire only moves forward) and, when a run
    /// was started for it, which.
    /// Returns whether this call moved the last fire forward (another replica may have first).
    async fn cron_advance(&self, workflow: &str, fire: Millis, run: Option<&str>) -> StoreResult<bool>;

    /// Sets (or, with `None`, clears) the buffered fire.
    async fn cron_buffer(&self, workflow: &str, fire: Option<Millis>) -> StoreResult<()>;
}

/// The event bus: publishing, the router's reads and settlement, dead letters, listings.
#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    /// Appends an event to the bus; returns its entry id. When Redis cannot give it an id by
    /// the clock (an entry with an id far ahead of it was written), repairs the bus once
    /// ([`EventBus::repair_bus`]) and tries again; fails as unavailable (retryable) if it still
    /// cannot.
    async fn publish_event(&self, fields: &[(&str, &[u8])]) -> StoreResult<String>;

    /// New bus entries for the router consumer `consumer`, at most `max`, waiting up to `block`,
    /// each cut to `cap`.
    async fn read_events(
        &self,
        consumer: &str,
        max: usize,
        block: Duration,
        cap: EntryCap,
    ) -> StoreResult<Vec<BusEntry>>;

    /// Bus entries delivered to a router that did not settle them within `min_idle`, cut to
    /// `cap`.
    async fn reclaim_events(
        &self,
        consumer: &str,
        min_idle: Duration,
        max: usize,
        cap: EntryCap,
    ) -> StoreResult<Vec<BusEntry>>;

    /// Records the runs each event started (kept for `retention`) and acknowledges them all:
    /// the records first, then one acknowledgement for the batch, so that an event is never
    /// acknowledged without its record.
    async fn settle_events(&self, settled: &[SettledEvent], retention: Duration) -> StoreResult<()>;

    /// Moves a malformed entry to the dead-letter stream with its reason, and acknowledges it.
    /// The dead letter keeps a [`DEAD_LETTER_KEEP`]-byte prefix of each value, the entry's size
    /// (`bytes`) and whether it was cut (`truncated`); an oversized entry (read cut to size) is
    /// deleted from the bus, as it can never be handled.
    async fn dead_letter_event(&self, entry: &BusEntry, reason: &str) -> StoreResult<()>;

    /// Dead letters, newest first, before the dead letter `before` (exclusive), at most
    /// `limit`, cut to `cap`. Their ids are the dead-letter stream's.
    async fn dead_events(&self, before: Option<&str>, limit: usize, cap: EntryCap) -> StoreResult<Vec<BusEntry>>;

    /// Dead-letters and removes every bus entry whose id is more than [`BUS_CLOCK_TOLERANCE`]
    /// ahead of the store's clock, then sets the stream's last id (and the router group's last
    /// delivered id) back so that new entries get ids by the clock again. Returns how many it
    /// removed.
    async fn repair_bus(&self) -> StoreResult<u64>;

    /// Recent events, newest first, as `query` says.
    async fn recent_events(&self, query: EventQuery<'_>) -> StoreResult<Vec<ListedEvent>>;

    /// Trims the bus to about `max_len` entries and to entries newer than `min_time`, never
    /// dropping one the router has not handled. Returns the entries trimmed.
    async fn trim_events(&self, max_len: u64, min_time: Millis) -> StoreResult<u64>;

    /// The bus stream's length and the dead-letter stream's length.
    async fn event_counts(&self) -> StoreResult<(u64, u64)>;
}

/// Runs waiting for events, by event type.
#[async_trait]
pub trait Waits: Send + Sync + 'static {
    /// Registers a run waiting for events of type `event` until `until`.
    async fn add_wait(&self, event: &str, run: &RunId, until: Millis) -> StoreResult<()>;

    async fn remove_wait(&self, event: &str, run: &RunId) -> StoreResult<()>;

    /// Runs registered as waiting for `event` (at most 1,000).
    async fn waiting(&self, event: &str) -> StoreResult<Vec<RunId>>;
}

/// Small shared values and seen-markers.
#[async_trait]
pub trait Values: Send + Sync + 'static {
    async fn get_value(&self, key: &str) -> StoreResult<Option<String>>;

    async fn set_value(&self, key: &str, value: &str) -> StoreResult<()>;

    /// Marks `key` as seen for `ttl`, for every replica at once (set if absent): `true` when
    /// it was not marked yet, `false` when it already was (a replay).
    async fn mark_seen(&self, key: &str, ttl: Duration) -> StoreResult<bool>;

    /// Takes a [`Values::mark_seen`] mark back (what it guarded did not happen after all).
    async fn forget_seen(&self, key: &str) -> StoreResult<()>;
}

/// Replicas' heartbeats.
#[async_trait]
pub trait Replicas: Send + Sync + 'static {
    /// Records `beat` for `ttl`: the replica counts as live until then unless it beats again.
    async fn heartbeat(&self, beat: &ReplicaBeat, ttl: Duration) -> StoreResult<()>;

    /// Takes a replica's heartbeat back (it is shutting down).
    async fn forget_replica(&self, id: &str) -> StoreResult<()>;

    /// The live replicas' last beats (whose time-to-live has not run out), by id.
    async fn replicas(&self) -> StoreResult<Vec<ReplicaBeat>>;
}

/// Paused workflows, and the runs held back while their workflow is paused: a run whose step is
/// claimed while its workflow is paused is held (its entry acknowledged, the run kept in the
/// workflow's held set by creation time) instead of run; once the workflow is resumed the held
/// runs are queued again, oldest first.
#[async_trait]
pub trait Pauses: Send + Sync + 'static {
    /// Pauses or resumes `workflow`; returns whether that changed anything.
    async fn set_paused(&self, workflow: &str, paused: bool) -> StoreResult<bool>;

    /// The paused workflows.
    async fn paused_workflows(&self) -> StoreResult<BTreeSet<String>>;

    /// Holds `run` (of `workflow`, created at `created_at`) back instead of running the step of
    /// `lease`: acknowledges the entry and adds the run to the workflow's held set, at once; does
    /// nothing (false) when the entry is no longer this consumer's.
    async fn hold(&self, lease: &Lease, run: &RunId, workflow: &str, created_at: Millis) -> StoreResult<bool>;

    /// Up to `max` held runs of `workflow`, oldest first (over every shard).
    async fn held_runs(&self, workflow: &str, max: usize) -> StoreResult<Vec<RunId>>;

    /// Takes `run` out of `workflow`'s held set (it was queued again, or it ended).
    async fn release(&self, workflow: &str, run: &RunId) -> StoreResult<()>;

    /// How many runs of `workflow` are held.
    async fn held_count(&self, workflow: &str) -> StoreResult<u64>;
}

/// A concurrency group: the runs of `workflow` whose keys render alike (`group` names the key's
/// value, hashed), at most `limit` of them active at once. A group's runs live on one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotGroup {
    pub workflow: String,
    pub group: String,
    pub limit: u32,
}

/// What [`Slots::admit`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The run holds a slot: its step runs.
    Admitted,
    /// The run waits for a slot (its entry acknowledged); `promoted` runs took free slots and
    /// are to be queued again.
    Held { promoted: Vec<RunId> },
    /// The entry is no longer this consumer's.
    NotOurs,
}

/// A rate group: the runs of `workflow` whose keys render alike, at most `limit` of them
/// started per `period_ms`. A group's runs live on one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateGroup {
    pub workflow: String,
    pub group: String,
    pub limit: u32,
    pub period_ms: u64,
}

/// What [`Slots::rate_admit`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateAdmission {
    /// Counted as a start: the step runs.
    Admitted,
    /// The run waits (its entry acknowledged); `promoted` runs were counted in and are to be
    /// queued again; `next`: when capacity frees next while runs wait.
    Held { promoted: Vec<RunId>, next: Option<Millis> },
    /// The entry is no longer this consumer's.
    NotOurs,
}

/// Concurrency limits: a run takes a slot of its group when its first step is claimed, keeps it
/// while it is active (asleep or waiting too), and gives it back when it ends; runs that find
/// every slot taken wait in the group's queue, oldest first, and are queued again as slots free.
#[async_trait]
pub trait Slots: Send + Sync + 'static {
    /// Admits `run` (on `lease`'s shard) to `group`, or holds it back (see [`Admission`]).
    async fn admit(&self, lease: &Lease, run: &RunId, group: &SlotGroup, created_at: Millis) -> StoreResult<Admission>;

    /// Gives `run`'s slot (or its place in the queue) back, if given, and fills free slots with
    /// the oldest waiting runs; returns them (to be queued again).
    async fn release_slot(&self, shard: u16, group: &SlotGroup, run: Option<&RunId>) -> StoreResult<Vec<RunId>>;

    /// The groups of `workflow` that have had runs on `shard`.
    async fn slot_groups(&self, shard: u16, workflow: &str) -> StoreResult<Vec<String>>;

    /// The runs holding a slot of `group` on `shard`, and how many wait.
    async fn slot_holders(&self, shard: u16, group: &SlotGroup) -> StoreResult<(Vec<RunId>, u64)>;

    /// Rate limits: counts `run`'s start in `group`'s window (by the store's clock), or holds
    /// it back (see [`RateAdmission`]). A run counted within the period is admitted again.
    async fn rate_admit(
        &self,
        lease: &Lease,
        run: &RunId,
        group: &RateGroup,
        created_at: Millis,
    ) -> StoreResult<RateAdmission>;

    /// Moves waiting runs of `group` into the window's free capacity; returns them (to be
    /// queued again) and when capacity frees next while runs still wait.
    async fn rate_release(&self, shard: u16, group: &RateGroup) -> StoreResult<(Vec<RunId>, Option<Millis>)>;

    /// The rate groups of `workflow` that have had runs on `shard`.
    async fn rate_groups(&self, shard: u16, workflow: &str) -> StoreResult<Vec<String>>;

    /// How many runs of `workflow` on `shard` wait for a concurrency slot, and how many for a
    /// rate window.
    async fn queued(&self, shard: u16, workflow: &str) -> StoreResult<(u64, u64)>;
}

/// A trigger of a debounced workflow, to be collapsed with the others of its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DebounceTrigger {
    pub workflow: String,
    /// The key's value, hashed (as a limit's group).
    pub group: String,
    /// The id of the burst this trigger opens if none is open for its key.
    pub burst: String,
    /// What the run is started with if this trigger is its burst's latest (the engine's JSON).
    pub payload: String,
    /// Which trigger is the latest: an event's stream id (`ms-seq`); `None`: the store's clock
    /// now. Triggers absorbed out of this order do not replace a later one's payload.
    pub order: Option<String>,
    pub period_ms: u64,
    /// 0: a burst is put off by each trigger without bound.
    pub max_wait_ms: u64,
    /// The trigger's own idempotency key, and how long it is remembered: a trigger seen before
    /// is not counted again.
    pub key: Option<(String, Duration)>,
}

/// A new burst's id: its workflow and group (which hold no `:`), and a unique part.
pub fn burst_id(workflow: &str, group: &str) -> String {
    format!("{}:{}", debounce_key(workflow, group), uuid::Uuid::now_v7().simple())
}

/// A debounce key as the store names it, `<workflow>:<group>`: the prefix of its bursts' ids.
pub fn debounce_key(workflow: &str, group: &str) -> String {
    format!("{workflow}:{group}")
}

/// The workflow and group a burst id names.
pub fn burst_key(burst: &str) -> Option<(&str, &str)> {
    let mut parts = burst.splitn(3, ':');
    let (workflow, group, unique) = (parts.next()?, parts.next()?, parts.next()?);
    (!workflow.is_empty() && !group.is_empty() && !unique.is_empty()).then_some((workflow, group))
}

/// What [`Debounces::debounce`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Debounced {
    /// The trigger is the burst's last so far: the burst's triggers and when it is due.
    Absorbed { burst: String, triggers: u64, due: Millis },
    /// The trigger's key was seen before: it went to `burst` (perhaps started already).
    Duplicate { burst: String },
}

/// A burst whose period passed since its last trigger: its run is to be started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueBurst {
    pub burst: String,
    pub workflow: String,
    pub group: String,
    pub payload: String,
    pub triggers: u64,
    /// When its first trigger came (the store's clock).
    pub first_at: Millis,
}

/// Debounce: the triggers of one key of a workflow collapse into a burst until `period` passes
/// without another (or `max_wait` since the first); then the burst is due and its run is
/// started, once, with the last trigger's payload. A trigger that comes after its key's burst
/// is due opens the next burst; a due burst no longer changes. Time is the store's clock.
#[async_trait]
pub trait Debounces: Send + Sync + 'static {
    /// Adds `trigger` to its key's open burst, or opens one (see [`Debounced`]).
    async fn debounce(&self, trigger: &DebounceTrigger) -> StoreResult<Debounced>;

    /// Up to `max` due bursts, the longest due first.
    async fn due_bursts(&self, max: usize) -> StoreResult<Vec<DueBurst>>;

    /// Forgets a burst whose run was started.
    async fn finish_burst(&self, burst: &DueBurst) -> StoreResult<()>;

    /// Bursts not yet started, by workflow.
    async fn burst_counts(&self) -> StoreResult<BTreeMap<String, u64>>;
}

/// Everything a store does, by concern, each its own trait: the engine holds an `Arc<dyn Store>`.
pub trait Store:
    Backend
    + Definitions
    + Runs
    + ReadySteps
    + Listing
    + Schedules
    + EventBus
    + Waits
    + Values
    + Replicas
    + Pauses
    + Slots
    + Debounces
{
}

impl<
    T: Backend
        + Definitions
        + Runs
        + ReadySteps
        + Listing
        + Schedules
        + EventBus
        + Waits
        + Values
        + Replicas
        + Pauses
        + Slots
        + Debounces,
> Store for T
{
}

/// The store's traits, for calling a concrete store's methods (`RedisStore`, `MemoryStore`): a
/// trait's methods need the trait in scope (those of an `Arc<dyn Store>` do not).
pub mod prelude {
    pub use super::{
        Backend, Debounces, Definitions, EventBus, Listing, Pauses, ReadySteps, Replicas, Runs, Schedules, Slots,
        Values, Waits,
    };
}

/// The time part of a stream entry id (`<ms>-<seq>`): when it was written, by the writer's
/// clock; `None` for a text of another shape.
pub fn entry_ms(id: &str) -> Option<u64> {
    id.split_once('-').and_then(|(ms, _)| ms.parse().ok())
}

/// Orders stream entry ids (`<ms>-<seq>`) numerically.
pub fn compare_entry_ids(a: &str, b: &str) -> std::cmp::Ordering {
    let parse = |id: &str| {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (ms.parse::<u64>().unwrap_or(0), seq.parse::<u64>().unwrap_or(0))
    };
    parse(a).cmp(&parse(b))
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
