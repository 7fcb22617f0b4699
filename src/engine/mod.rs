//! The engine: the loops of a replica, over a [`Store`].
//!
//! - `executor`: claims ready steps (only as many as it has free executors), runs them under a
//!   lease it renews, and commits each outcome as one fenced transition; takes over steps whose
//!   lease expired.
//! - `commits`: group commit: the executors' outcomes, and the triggers' new runs, go to the store
//!   together; an executor's commit may bring back its next step, claimed in the same call.
//! - `record`: the one path for what happens to a run outside its executors (load, decide,
//!   advance, commit, decide again when stale), used by:
//! - `timers`: wakes runs whose retry, sleep or wait time-out is due;
//! - `router`: the event bus: starts the workflows an event names, wakes waiting steps;
//! - `children`: child runs (`action = "workflow"`): starts them, wakes a parent's step when its
//!   child ends, cancels a cancelled parent's children;
//! - `operator`: what operators do to runs (read, cancel, retry, rerun); `bulk`: to many.
//! - `pauses`: paused workflows: their claimed steps are held, and queued again on resume.
//! - `slots`: concurrency limits (a run holds a slot of its group from its first step to its
//!   end) and rate limits (a run's start is counted in its group's sliding window).
//! - `debounce`: a debounced workflow's triggers collapse into bursts, each starting one run.
//! - `cron`: the schedules, exactly once across replicas, with catch-up and overlap policies.
//! - `sweeper`: belt and braces: re-queues runs that say they are running but have neither a
//!   live lease nor a queued entry; re-registers waits; trims streams and expires finished runs.
//! - `services`: what the engine offers actions ([`crate::actions::Services`]).
//! - `replicas`: each replica's heartbeat in the store, and the list of live replicas.
//! - `stats`: counts of recent runs for the dashboard; `metrics`: Prometheus counters.
//! - `traces`: a run's OpenTelemetry spans; `clock`: the store's clock, or a test's.
//!
//! Shutdown: one root [`CancellationToken`]; every loop races its work against it; in-flight
//! steps get the grace period to finish, then are cancelled and left to the other replicas.

mod bulk;
mod children;
mod clock;
mod commits;
mod cron;
mod debounce;
mod executor;
mod metrics;
mod operator;
mod pauses;
mod record;
mod replicas;
mod router;
mod services;
mod slots;
mod stats;
mod sweeper;
mod timers;
mod traces;

pub use bulk::{BulkAction, BulkFilter, BulkOutcome, MAX_BULK};
pub use clock::{Clock, ManualClock, StoreClock};
pub use debounce::{Accepted, DEBOUNCE_POLL};
pub use metrics::{Metrics, STEP_BUCKETS, WorkflowMetrics};
pub use operator::LoadedRun;
pub use pauses::PAUSES_REFRESH;
pub use replicas::{HEARTBEAT_EVERY, HEARTBEAT_TTL};
pub use stats::{MAX_COUNTED, RunStats};

use crate::definition::{Registry, Workflow};
use crate::machine::{self, Millis, Recorded, TraceContext, Transition, Trigger};
use crate::store::{Created, Lease, Logged, NewRun, RunId, Store, StoreError, StoreHealth, StoreKind};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How a replica's engine is tuned.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub replica_id: String,
    pub lease_ttl: Duration,
    pub max_concurrent_steps: usize,
    pub shutdown_grace: Duration,
    pub max_deliveries: u64,
    pub run_retention: Duration,
    pub idempotency_retention: Duration,
    /// Whether the store connection authenticates (a password in `REDIS_URL`), for audits.
    pub store_authenticated: bool,
    pub events_max_len: u64,
    pub events_retention: Duration,
    pub event_max_bytes: usize,
    /// How runs are sampled when traces are on; `None`: traces are off (no run, back-off or
    /// parked span is built, and a run keeps a trace context only if its caller sent one).
    pub traces: Option<crate::config::Sampler>,
    /// Where actions send things.
    pub actions: crate::actions::ActionConfig,
    /// The clock the engine reads; `None`: the store's (see `clock`). Tests set a
    /// [`ManualClock`].
    pub clock: Option<Arc<dyn Clock>>,
}

impl EngineConfig {
    pub fn from_settings(settings: &crate::config::Settings) -> EngineConfig {
        EngineConfig {
            replica_id: settings.replica_id.clone(),
            lease_ttl: settings.lease_ttl,
            max_concurrent_steps: settings.max_concurrent_steps,
            shutdown_grace: settings.shutdown_grace,
            max_deliveries: settings.max_deliveries,
            run_retention: settings.run_retention,
            idempotency_retention: settings.idempotency_retention,
            store_authenticated: settings
                .redis_url
                .as_deref()
                .is_some_and(|url| url.split_once("://").and_then(|(_, rest)| rest.split_once('@')).is_some()),
            events_max_len: settings.events_max_len,
            events_retention: settings.events_retention,
            event_max_bytes: settings.event_max_bytes,
            traces: settings.traces.as_ref().map(|t| t.sampler),
            actions: crate::actions::ActionConfig::from_settings(&settings.integrations),
            clock: None,
        }
    }
}

/// Errors of the engine, named by what the caller must do.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("no workflow `{0}`")]
    UnknownWorkflow(String),
    #[error("no run `{0}`")]
    UnknownRun(String),
    /// The request does not fit the run's state (retrying a run that did not fail, ...).
    #[error("{0}")]
    Conflict(String),
    /// The request itself is wrong (an unknown step, ...).
    #[error("{0}")]
    Invalid(String),
    /// The run's log does not replay: names the entry.
    #[error("run {run}: log entry {entry} does not replay: {problem}")]
    CorruptLog { run: String, entry: u64, problem: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a trigger did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Triggered {
    pub run_id: String,
    /// The idempotency key had been used: this is the run it started.
    pub duplicate: bool,
}

/// What started a run: the trigger, and the caller's span when it sent a `traceparent`.
struct Origin {
    trigger: Trigger,
    caller: Option<TraceContext>,
}

/// Counters for `/health` and metrics.
#[derive(Debug, Default)]
pub struct Counters {
    pub runs_started: AtomicU64,
    pub runs_completed: AtomicU64,
    pub runs_failed: AtomicU64,
    pub steps_completed: AtomicU64,
    pub steps_failed: AtomicU64,
    pub retries_scheduled: AtomicU64,
    pub steps_reclaimed: AtomicU64,
    pub completions_fenced: AtomicU64,
    pub runs_swept: AtomicU64,
    pub cron_fires: AtomicU64,
    pub cron_skipped: AtomicU64,
    pub cron_missed: AtomicU64,
    pub events_routed: AtomicU64,
    pub events_dead_lettered: AtomicU64,
}

impl Counters {
    fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

pub struct Engine {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    config: EngineConfig,
    /// This process's name in the consumer group: the replica id plus an incarnation suffix, so
    /// that a restarted replica never mistakes its predecessor's leases for its own.
    consumer: String,
    clock: Arc<dyn Clock>,
    /// Definition snapshots by hash: the registry's, plus older ones runs in flight still use.
    /// Read on every step; written only on a miss. Short sections, never held across `.await`.
    definitions: RwLock<HashMap<String, Arc<Workflow>>>,
    /// The leases of steps executing here, with the token that aborts each: renewed together,
    /// and cancelled when a renewal finds the lease lost. With the step's span, so that the line
    /// saying so names the step. Short sections only.
    in_flight: Mutex<HashMap<Lease, (CancellationToken, tracing::Span)>>,
    /// One permit per executor; a claim asks for no more entries than permits it holds.
    executors: Arc<Semaphore>,
    /// When the claim loop next looks for steps whose lease expired. It does so with the
    /// permits it holds, so from then on an executor takes no next step from its commit (which
    /// would keep its permit) until the look is done: a busy replica still takes steps over.
    reclaim_due: Mutex<std::time::Instant>,
    /// Claimed steps waiting for a free executor (a read may bring a few more than asked for):
    /// while any wait, no executor takes a next step from its commit, so that its permit goes to
    /// them.
    waiting_for_executor: std::sync::atomic::AtomicUsize,
    /// Fired to stop claiming work and stop every loop.
    shutdown: CancellationToken,
    /// Fired after the grace period: aborts steps still running.
    abort_steps: CancellationToken,
    /// The loops and the step tasks, joined at shutdown.
    tasks: TaskTracker,
    /// The event types the registry's `wait_for_event` steps wait for: the router looks for
    /// waiting runs only for these (see `sweeper` for runs of older definitions).
    awaited_types: std::collections::HashSet<String>,
    /// Where executors commit step outcomes: together, a group per store call.
    commits: commits::CommitQueue,
    /// Where triggers create runs: together, a group per store call.
    creations: commits::CreateQueue,
    /// Announces runs this replica finished (id, status), for in-process observers such as the
    /// benchmark. Lossy by design: a slow observer misses announcements, never stalls a commit.
    finished: tokio::sync::broadcast::Sender<(String, &'static str)>,
    /// What steps do: the HTTP client, where notifications go, the built-ins.
    actions: crate::actions::Actions,
    /// The paused workflows, as last read from the store (see `pauses`).
    paused: RwLock<std::collections::BTreeSet<String>>,
    /// The rate groups this replica is letting runs into (see `slots`).
    rate_wakers: Mutex<std::collections::HashSet<(u16, String, String)>>,
    pub counters: Counters,
    pub metrics: Metrics,
}

impl Engine {
    pub async fn new(
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        config: EngineConfig,
    ) -> Result<Arc<Engine>, EngineError> {
        let actions = crate::actions::Actions::new(config.actions.clone());
        Engine::with_actions(store, registry, config, actions).await
    }

    /// With actions of the caller's (more built-ins, another configuration). Refuses a registry
    /// whose steps name built-ins that are not registered.
    pub async fn with_actions(
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        config: EngineConfig,
        actions: crate::actions::Actions,
    ) -> Result<Arc<Engine>, EngineError> {
        for workflow in registry.iter() {
            for step in &workflow.def.steps {
                if let crate::definition::ActionSpec::Builtin(spec) = &step.action
                    && let Err(problem) = actions.check_builtin(spec)
                {
                    return Err(EngineError::Invalid(format!(
                        "workflow `{}`: step `{}`: {problem}",
                        workflow.def.id, step.id
                    )));
                }
            }
        }
        let incarnation = uuid::Uuid::now_v7().simple().to_string();
        let consumer = format!("{}:{}", config.replica_id, &incarnation[incarnation.len() - 8..]);
        let workflows: Vec<Arc<Workflow>> = registry.iter().cloned().collect();
        store.save_definitions(&workflows).await?;
        let definitions = workflows.iter().map(|w| (w.hash.clone(), Arc::clone(w))).collect();
        let commits = commits::CommitQueue::commits(Arc::clone(&store));
        let creations = commits::CreateQueue::creations(Arc::clone(&store));
        let awaited_types = workflows
            .iter()
            .flat_map(|workflow| &workflow.def.steps)
            .filter_map(|step| match &step.action {
                crate::definition::ActionSpec::WaitForEvent(wait) => Some(wait.event.clone()),
                _ => None,
            })
            .collect();
        let engine = Arc::new(Engine {
            executors: Arc::new(Semaphore::new(config.max_concurrent_steps)),
            reclaim_due: Mutex::new(std::time::Instant::now()),
            waiting_for_executor: std::sync::atomic::AtomicUsize::new(0),
            store,
            registry,
            consumer,
            clock: config.clock.clone().unwrap_or_else(|| Arc::new(StoreClock::default())),
            definitions: RwLock::new(definitions),
            in_flight: Mutex::new(HashMap::new()),
            shutdown: CancellationToken::new(),
            abort_steps: CancellationToken::new(),
            tasks: TaskTracker::new(),
            awaited_types,
            commits,
            creations,
            finished: tokio::sync::broadcast::channel(4096).0,
            actions,
            paused: RwLock::new(std::collections::BTreeSet::new()),
            rate_wakers: Mutex::new(std::collections::HashSet::new()),
            counters: Counters::default(),
            metrics: Metrics::default(),
            config,
        });
        engine.calibrate_clock().await?;
        *engine.paused.write() = engine.store.paused_workflows().await?;
        Ok(engine)
    }

    /// Starts the replica's loops.
    pub fn start(self: &Arc<Self>) {
        self.tasks.spawn(Arc::clone(self).claim_loop());
        self.tasks.spawn(Arc::clone(self).renew_loop());
        self.tasks.spawn(Arc::clone(self).timer_loop());
        self.tasks.spawn(Arc::clone(self).debounce_loop());
        self.tasks.spawn(Arc::clone(self).sweeper_loop());
        self.tasks.spawn(Arc::clone(self).cron_loop());
        self.tasks.spawn(Arc::clone(self).router_loop());
        self.tasks.spawn(Arc::clone(self).router_reclaim_loop());
        self.tasks.spawn(Arc::clone(self).heartbeat_loop());
        self.tasks.spawn(Arc::clone(self).pauses_loop());
    }

    /// Stops claiming, lets in-flight steps finish within the grace period, then aborts the
    /// rest (their entries stay pending and other replicas take them over when the lease
    /// expires). Returns whether everything finished within the grace period.
    pub async fn shutdown(&self) -> bool {
        self.shutdown.cancel();
        self.tasks.close();
        let in_time = tokio::time::timeout(self.config.shutdown_grace, self.tasks.wait()).await.is_ok();
        if !in_time {
            tracing::warn!(
                left = self.in_flight.lock().len(),
                "grace period over: aborting steps still running; other replicas will take them over"
            );
            self.abort_steps.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), self.tasks.wait()).await;
        }
        in_time
    }

    /// Runs finished by this replica from now on, as `(run id, status)`.
    pub fn subscribe_finished(&self) -> tokio::sync::broadcast::Receiver<(String, &'static str)> {
        self.finished.subscribe()
    }

    /// The counters as JSON-friendly pairs.
    pub fn counter_values(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        [
            ("runsStarted", &c.runs_started),
            ("runsCompleted", &c.runs_completed),
            ("runsFailed", &c.runs_failed),
            ("stepsCompleted", &c.steps_completed),
            ("stepsFailed", &c.steps_failed),
            ("retriesScheduled", &c.retries_scheduled),
            ("stepsReclaimed", &c.steps_reclaimed),
            ("completionsFenced", &c.completions_fenced),
            ("runsSwept", &c.runs_swept),
            ("cronFires", &c.cron_fires),
            ("cronSkipped", &c.cron_skipped),
            ("cronMissed", &c.cron_missed),
            ("eventsRouted", &c.events_routed),
            ("eventsDeadLettered", &c.events_dead_lettered),
        ]
        .into_iter()
        .map(|(name, counter)| (name, counter.load(Ordering::Relaxed)))
        .collect()
    }

    /// Executors running a step now (not the permits the claim loop holds while it waits).
    pub fn busy_executors(&self) -> usize {
        self.metrics.executors_busy()
    }

    /// Queue lengths and pending counts of the store's streams.
    pub async fn stream_stats(&self) -> Result<crate::store::StreamStats, StoreError> {
        self.store.stream_stats().await
    }

    /// One round trip to the store, timed.
    pub async fn store_round_trip(&self) -> Result<Duration, StoreError> {
        let sent = Instant::now();
        self.store.now().await?;
        Ok(sent.elapsed())
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn store_kind(&self) -> StoreKind {
        self.store.kind()
    }

    pub fn replica_id(&self) -> &str {
        &self.config.replica_id
    }

    pub fn now(&self) -> Millis {
        self.clock.now()
    }

    pub async fn store_health(&self) -> Result<StoreHealth, StoreError> {
        self.store.health().await
    }

    /// Why the store is known to be unreachable right now, if it is (see
    /// [`crate::store::Backend::connection_problem`]).
    pub fn store_problem(&self) -> Option<String> {
        self.store.connection_problem()
    }

    /// Marks `key` as seen for `ttl` across replicas; `false` if it already was.
    pub async fn mark_seen(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.store.mark_seen(key, ttl).await
    }

    /// Takes a [`Engine::mark_seen`] mark back.
    pub async fn forget_seen(&self, key: &str) -> Result<(), StoreError> {
        self.store.forget_seen(key).await
    }

    async fn calibrate_clock(&self) -> Result<(), StoreError> {
        let sent = Instant::now();
        let store_now = self.store.now().await?;
        self.clock.calibrate(store_now, sent);
        Ok(())
    }

    fn recorded(&self, at: Millis, transition: Transition) -> Recorded {
        Recorded { at, replica: Some(self.config.replica_id.clone()), transition }
    }

    /// The registry's workflow `workflow_id`.
    fn registered(&self, workflow_id: &str) -> Result<&Arc<Workflow>, EngineError> {
        self.registry.get(workflow_id).ok_or_else(|| EngineError::UnknownWorkflow(workflow_id.to_owned()))
    }

    /// Starts a run of `workflow_id`. With an idempotency key, the same key within its retention
    /// returns the first run instead.
    pub async fn trigger(
        &self,
        workflow_id: &str,
        input: &serde_json::Value,
        idempotency_key: Option<&str>,
        trigger: Trigger,
    ) -> Result<Triggered, EngineError> {
        self.trigger_traced(workflow_id, input, idempotency_key, trigger, None).await
    }

    /// [`Engine::trigger`], the run continuing the trace of the caller's span `caller` (its
    /// `traceparent`): the run span is a child of that span.
    pub async fn trigger_traced(
        &self,
        workflow_id: &str,
        input: &serde_json::Value,
        idempotency_key: Option<&str>,
        trigger: Trigger,
        caller: Option<TraceContext>,
    ) -> Result<Triggered, EngineError> {
        let workflow = self.registered(workflow_id)?;
        let shard = match idempotency_key {
            // The key's shard, so that the duplicate check and the start are one atomic call.
            Some(key) => crate::store::keys::shard_of(key, self.store.shards()),
            None => rand::random_range(0..self.store.shards()),
        };
        let key = idempotency_key.map(|k| (k.to_owned(), self.config.idempotency_retention));
        self.start_run(workflow, shard, input, Origin { trigger, caller }, Vec::new(), key).await
    }

    /// Creates a run of `workflow` on `shard`, its first steps possibly reused from another run.
    async fn start_run(
        &self,
        workflow: &Workflow,
        shard: u16,
        input: &serde_json::Value,
        origin: Origin,
        reused: Vec<(u32, String)>,
        idempotency: Option<(String, Duration)>,
    ) -> Result<Triggered, EngineError> {
        let Origin { trigger, caller } = origin;
        // A limited workflow's runs live on their group's shard, beside its slots or window.
        let shard = self.limited_shard(&workflow.def, input).map_err(EngineError::Invalid)?.unwrap_or(shard);
        let now = self.clock.now();
        let run = RunId::new(shard, now);
        let created = Transition::RunCreated {
            workflow: workflow.def.id.clone(),
            definition: workflow.hash.clone(),
            input: input.to_string(),
            trigger,
            trace: self.new_run_trace(caller),
        };
        let happened = std::iter::once(created)
            .chain(reused.into_iter().map(|(step, output)| Transition::StepReused { step, output }))
            .map(|t| self.recorded(now, t))
            .collect();
        let advanced = machine::advance(None, &workflow.def, happened, now)
            .map_err(|err| EngineError::Invalid(format!("the run cannot start: {err}")))?;
        let dispatch = crate::store::Dispatch::of_effects(&advanced.effects);
        let search = workflow.def.search_values(input);
        let new = NewRun {
            run: run.clone(),
            state: advanced.state,
            records: advanced.appended,
            dispatch,
            idempotency,
            search,
        };
        match self.creations.submit(new).await? {
            Created::New(run) => {
                Counters::add(&self.counters.runs_started);
                self.metrics.run_started(&workflow.def.id);
                Ok(Triggered { run_id: run.to_string(), duplicate: false })
            }
            Created::Duplicate(first) => Ok(Triggered { run_id: first, duplicate: true }),
        }
    }

    /// A run's whole log.
    pub async fn history(&self, run: &RunId) -> Result<Option<Vec<Logged>>, StoreError> {
        self.store.history(run).await
    }

    pub async fn summary(&self, run: &RunId) -> Result<Option<crate::store::RunSummary>, StoreError> {
        self.store.summary(run).await
    }

    pub async fn list_runs(&self, query: crate::store::RunQuery<'_>) -> Result<Vec<RunId>, StoreError> {
        Ok(self.store.list_runs(query).await?.runs)
    }

    /// Runs of `workflow` by a search field's value (see [`crate::store::Listing::search_runs`]).
    pub async fn search_runs(&self, query: crate::store::SearchQuery<'_>) -> Result<Vec<RunId>, StoreError> {
        Ok(self.store.search_runs(query).await?.runs)
    }

    pub async fn count_runs(&self, workflow: &str) -> Result<Vec<(machine::Status, u64)>, StoreError> {
        self.store.count_runs(workflow).await
    }

    /// Recent events, newest first (see [`crate::store::EventBus::recent_events`]).
    pub async fn recent_events(
        &self,
        before: Option<&str>,
        event_type: Option<&str>,
        limit: usize,
    ) -> Result<Vec<crate::store::ListedEvent>, StoreError> {
        let scan = limit.saturating_mul(20).max(1000);
        let query = crate::store::EventQuery { before, event_type, limit, scan, cap: router::LISTED_ENTRY_CAP };
        self.store.recent_events(query).await
    }

    /// Dead letters of the bus, newest first (see [`crate::store::EventBus::dead_events`]).
    pub async fn dead_events(
        &self,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<crate::store::BusEntry>, StoreError> {
        self.store.dead_events(before, limit, router::LISTED_ENTRY_CAP).await
    }

    /// The definition a run was created with, by hash: cached, else loaded from the run's shard.
    pub async fn definition(&self, shard: u16, hash: &str) -> Result<Arc<Workflow>, StoreError> {
        if let Some(found) = self.definitions.read().get(hash) {
            return Ok(Arc::clone(found));
        }
        let loaded = self.store.load_definition(shard, hash).await?.ok_or_else(|| StoreError::Corrupt {
            key: format!("definition {hash}"),
            problem: "the definition snapshot of a run is missing".to_owned(),
        })?;
        let loaded = Arc::new(loaded);
        self.definitions.write().insert(hash.to_owned(), Arc::clone(&loaded));
        Ok(loaded)
    }
}

/// Sleeps `duration` unless `token` fires first; returns whether it fired.
async fn sleep_or_cancelled(token: &CancellationToken, duration: Duration) -> bool {
    tokio::select! {
        () = token.cancelled() => true,
        () = tokio::time::sleep(duration) => false,
    }
}

/// Backoff for a loop whose store call failed: 100 ms doubling to 5 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64.saturating_mul(1 << failures.min(6))).min(Duration::from_secs(5))
}
