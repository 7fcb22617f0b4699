//! One conformance suite for the [`Store`] contract, run against every store.
//!
//! Every check is an `async fn(Arc<dyn Store>)` written once against the trait; the
//! `conformance!` macro turns each into three tests, `conformance::memory::<check>` on a fresh
//! [`MemoryStore`], `conformance::redis::<check>` on a [`RedisStore`] connected to its own
//! private redis-server, and `conformance::cluster::<check>` on one connected to a private Redis
//! Cluster of six nodes. A check that passes on one store and fails on the other is a
//! behavioural difference between them: fix the store, never the check.
//!
//! Times given to the state machine are synthetic (small millisecond values): the contract
//! never compares them with the store's clock, except where a check says so.

use crate::util::{RedisCluster, RedisServer};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use workflow_orchestrator::definition::{Registry, Workflow, WorkflowDef};
use workflow_orchestrator::machine::{
    Advanced, Effect, Millis, Recorded, RunState, Status, Transition, Trigger, advance, replay, step_failure,
};
use workflow_orchestrator::store::keys::shard_of;
use workflow_orchestrator::store::memory::MemoryStore;
use workflow_orchestrator::store::redis::RedisStore;
use workflow_orchestrator::store::{
    Admission, BusCondition, Claimed, Commit, CommitOutcome, Created, CronState, DebounceTrigger, Debounced, Dispatch,
    EntryCap, EventQuery, Lease, Logged, NewRun, RateAdmission, RateGroup, ReplicaBeat, RunId, RunQuery, RunSummary,
    SearchQuery, SettledEvent, SlotGroup, StepCommit, StepCommitted, Store, StoreError, StoreKind, StreamStats,
    burst_id, compare_entry_ids,
};

/// Long enough for a claim to find an entry that is queued, short enough to keep tests quick.
const BLOCK: Duration = Duration::from_millis(200);

/// Runs a check on a fresh multi-threaded runtime (the Redis client and blocking reads want one).
fn run<F: Future<Output = ()>>(check: F) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(check);
}

fn memory_store(shards: u16) -> Arc<dyn Store> {
    Arc::new(MemoryStore::new(shards))
}

async fn redis_store(redis: &RedisServer, shards: u16) -> Arc<dyn Store> {
    Arc::new(RedisStore::connect(&redis.url(), "wfo", shards).await.expect("connect to the private redis-server"))
}

/// `name = check(shards)`: the test `memory::name` and the test `redis::name`, both running
/// `check` on a store with `shards` shards.
macro_rules! conformance {
    ($($name:ident = $check:ident($shards:expr);)*) => {
        mod memory {
            $(
                #[test]
                fn $name() {
                    super::run(super::$check(super::memory_store($shards)));
                }
            )*
        }

        mod redis {
            $(
                #[test]
                fn $name() {
                    let server = crate::util::RedisServer::start();
                    super::run(async {
                        super::$check(super::redis_store(&server, $shards).await).await;
                    });
                }
            )*
        }

        mod cluster {
            $(
                #[test]
                fn $name() {
                    let cluster = super::shared_cluster();
                    super::run(async {
                        super::$check(super::cluster_store(&cluster, stringify!($name), $shards).await).await;
                    });
                }
            )*
        }
    };
}

/// The Redis Cluster the cluster checks share while any of them runs (each under its own key
/// prefix): forming one takes seconds. Stopped, by the pids of its nodes, when the last check
/// holding it ends.
fn shared_cluster() -> Arc<RedisCluster> {
    static SHARED: std::sync::Mutex<std::sync::Weak<RedisCluster>> = std::sync::Mutex::new(std::sync::Weak::new());
    let mut shared = SHARED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(cluster) = shared.upgrade() {
        return cluster;
    }
    let cluster = Arc::new(RedisCluster::start());
    *shared = Arc::downgrade(&cluster);
    cluster
}

async fn cluster_store(cluster: &RedisCluster, prefix: &str, shards: u16) -> Arc<dyn Store> {
    let store = RedisStore::connect(&cluster.url(), prefix, shards).await.expect("connect to the private cluster");
    assert!(store.is_cluster(), "a redis-cluster:// URL gives a cluster store");
    Arc::new(store)
}

conformance! {
    a_created_run_agrees_with_its_state = created_run_agrees_with_its_state(4);
    a_run_created_without_dispatch_queues_nothing = run_created_without_dispatch_queues_nothing(4);
    an_idempotency_key_creates_one_run = idempotency_key_creates_one_run(4);
    an_idempotency_key_holds_for_its_whole_retention = idempotency_key_holds_for_its_whole_retention(4);
    a_group_creation_gives_each_run_its_own_outcome = group_creation_gives_each_run_its_own_outcome(4);
    a_claim_returns_the_dispatched_task = claim_returns_the_dispatched_task(4);
    a_claim_returns_at_most_max_over_4_shards = claim_returns_at_most_max(4);
    a_claim_returns_at_most_max_over_16_shards = claim_returns_at_most_max(16);
    a_claim_finds_a_step_queued_on_any_shard = claim_finds_a_step_queued_on_any_shard(16);
    a_claim_waits_at_most_its_block = claim_waits_at_most_its_block(4);
    a_claim_with_a_zero_block_does_not_wait = claim_with_a_zero_block_does_not_wait(4);
    a_blocked_claim_wakes_when_a_step_is_dispatched = blocked_claim_wakes_when_a_step_is_dispatched(4);
    a_commit_under_its_lease_applies_acks_and_dispatches = commit_under_lease_applies_acks_and_dispatches(4);
    a_stale_commit_changes_nothing = stale_commit_changes_nothing(4);
    a_commit_under_a_lost_lease_changes_nothing = commit_under_lost_lease_changes_nothing(4);
    a_group_commit_gives_each_run_its_own_outcome = group_commit_gives_each_run_its_own_outcome(4);
    step_commits_claim_the_next_steps_of_those_that_ask = step_commits_claim_the_next_steps_of_those_that_ask(4);
    a_commit_queues_each_ready_step_as_its_own_entry = a_commit_queues_each_ready_step_as_its_own_entry(4);
    a_run_that_ends_withdraws_its_queued_steps = a_run_that_ends_withdraws_its_queued_steps(4);
    schedules_keep_the_last_fire_the_last_run_and_the_buffered_fire = schedules_keep_the_last_fire_the_last_run_and_the_buffered_fire(4);
    waits_are_registered_by_event_type = waits_are_registered_by_event_type(4);
    values_are_shared_and_marks_expire = values_are_shared_and_marks_expire(4);
    a_failed_run_is_reopened_only_while_still_failed_at_its_seq = a_failed_run_is_reopened_only_while_still_failed_at_its_seq(4);
    runs_are_counted_by_status = runs_are_counted_by_status(4);
    the_bus_publishes_reads_settles_dead_letters_and_lists = the_bus_publishes_reads_settles_dead_letters_and_lists(4);
    the_backend_says_what_it_is_and_keeps_time = the_backend_says_what_it_is_and_keeps_time(4);
    renewal_keeps_held_leases_and_reports_lost_ones = renew_keeps_held_leases_and_reports_lost_ones(4);
    a_reclaim_counts_deliveries = reclaim_counts_deliveries(4);
    a_terminal_commit_keeps_a_replayable_history = terminal_commit_keeps_replayable_history(4);
    a_late_commit_to_an_ended_run_is_gone = late_commit_to_an_ended_run_is_gone(4);
    a_timer_is_due_at_its_time_until_cleared = timer_is_due_at_its_time_until_cleared(4);
    due_timers_are_limited_per_shard = due_timers_are_limited_per_shard(4);
    quiet_runs_are_live_runs_not_updated_since = quiet_runs_are_live_runs_not_updated_since(4);
    dispatch_exists_while_queued_or_leased = dispatch_exists_while_queued_or_leased(4);
    a_requeue_loses_to_a_live_entry = requeue_loses_to_a_live_entry(4);
    runs_are_listed_newest_first_in_pages = runs_are_listed_newest_first_in_pages(16);
    housekeeping_deletes_only_runs_that_ended_before_the_retention = housekeeping_expires_old_finished_runs(4);
    definitions_are_found_by_hash_on_every_shard = definitions_are_found_by_hash(16);
    replicas_are_listed_while_their_heartbeat_lives = replicas_are_listed_while_their_heartbeat_lives(4);
    runs_are_found_by_their_input_values = runs_are_found_by_their_input_values(16);
    a_paused_workflows_claimed_steps_are_held_and_listed_oldest_first = paused_workflows_steps_are_held_oldest_first(4);
    concurrency_slots_admit_up_to_the_limit_and_pass_on_oldest_first = concurrency_slots_pass_on_oldest_first(4);
    rate_limits_count_starts_in_a_sliding_window = rate_limits_count_starts_in_a_sliding_window(4);
    debounced_triggers_collapse_into_one_burst_per_key = debounced_triggers_collapse_into_one_burst_per_key(4);
}

// ---------------------------------------------------------------------------------------------
// Building runs and commits the way the engine does: through `machine::advance`.

/// A workflow `id` of `steps` noop steps, each tried at most `max_attempts` times, 1 s apart.
pub(crate) fn definition(id: &str, steps: usize, max_attempts: u32) -> WorkflowDef {
    let mut toml = format!("[[workflow]]\nid = \"{id}\"\n");
    for step in 0..steps {
        toml.push_str(&format!(
            "[[workflow.step]]\nid = \"s{step}\"\naction = \"noop\"\n\
             retry = {{ max_attempts = {max_attempts}, initial_backoff = \"1s\", jitter = 0.0 }}\n"
        ));
    }
    let registry = Registry::parse("conformance.toml", &toml).expect("a valid test workflow");
    registry.get(id).expect("the workflow just parsed").def.clone()
}

fn record(at: Millis, transition: Transition) -> Recorded {
    Recorded { at, replica: Some("r1".to_owned()), transition }
}

/// A new run of `def` on `shard`, created at `now` (its id's time too) and queued for its first
/// step.
pub(crate) fn new_run(def: &WorkflowDef, shard: u16, now: Millis, idempotency: Option<(&str, Duration)>) -> NewRun {
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
pub(crate) fn commit_of(
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
    let task = claimed.task.as_ref().expect("a decodable task");
    let (step, attempt) = (task.step, task.attempt);
    let ended = if succeed {
        Transition::StepCompleted { step, attempt, output: "{}".to_owned() }
    } else {
        step_failure(def, &task.state, step, attempt, "boom".to_owned(), now, 0.0)
    };
    let happened = vec![Transition::StepStarted { step, attempt }, ended];
    commit_of(def, &task.run.parse().unwrap(), &task.state, Some(claimed.lease.clone()), happened, now)
}

/// A commit that changes nothing but the timer: what a timer re-arm looks like.
fn timer_only(run: &RunId, state: &RunState, timer: Option<Millis>, clear_timer: bool) -> Commit {
    Commit {
        run: run.clone(),
        expected_seq: state.seq,
        lease: None,
        records: Vec::new(),
        state: state.clone(),
        dispatch: Vec::new(),
        timer,
        clear_timer,
    }
}

async fn create(store: &Arc<dyn Store>, new: NewRun) -> RunId {
    let id = new.run.clone();
    assert_eq!(store.create_run(new).await.unwrap(), Created::New(id.clone()));
    id
}

/// Claims the one entry that is queued.
async fn claim_one(store: &Arc<dyn Store>, consumer: &str) -> Claimed {
    let mut claimed = store.claim(consumer, 10, BLOCK).await.unwrap();
    assert_eq!(claimed.len(), 1, "exactly one entry was queued: {claimed:?}");
    claimed.remove(0)
}

async fn nothing_claimable(store: &Arc<dyn Store>, consumer: &str) -> bool {
    store.claim(consumer, 10, Duration::from_millis(50)).await.unwrap().is_empty()
}

/// What a run looks like from outside: summary and history.
async fn snapshot(store: &Arc<dyn Store>, run: &RunId) -> (Option<RunSummary>, Option<Vec<Logged>>) {
    (store.summary(run).await.unwrap(), store.history(run).await.unwrap())
}

/// A search's query.
fn search<'a>(
    workflow: &'a str,
    field: &'a str,
    value: &'a str,
    before: Option<&'a RunId>,
    limit: usize,
) -> SearchQuery<'a> {
    SearchQuery { workflow, field, value, before, limit }
}

/// An event listing's query.
fn events<'a>(
    before: Option<&'a str>,
    event_type: Option<&'a str>,
    limit: usize,
    scan: usize,
    cap: EntryCap,
) -> EventQuery<'a> {
    EventQuery { before, event_type, limit, scan, cap }
}

/// A listing's query, its status by name.
fn query<'a>(workflow: Option<&'a str>, status: Option<&str>, before: Option<&'a RunId>, limit: usize) -> RunQuery<'a> {
    let status = status.map(|name| Status::from_name(name).expect("a status name"));
    RunQuery { workflow, status, before, limit }
}

/// Replays a stored history of a run of `def`.
fn replayed(history: &[Logged], def: &WorkflowDef) -> RunState {
    replay(history.iter().map(|l| &l.recorded), def).expect("the history replays").expect("a non-empty history")
}

fn sorted(mut leases: Vec<Lease>) -> Vec<Lease> {
    leases.sort_by(|a, b| (a.shard, &a.entry, &a.consumer).cmp(&(b.shard, &b.entry, &b.consumer)));
    leases
}

/// Idle time in Redis is counted in whole milliseconds: let a lease age before it is taken.
async fn age() {
    tokio::time::sleep(Duration::from_millis(5)).await;
}

// ---------------------------------------------------------------------------------------------
// Checks.

async fn created_run_agrees_with_its_state(store: Arc<dyn Store>) {
    let def = definition("wf", 2, 1);
    let new = new_run(&def, 2, 1_000, None);
    let state = new.state.clone();
    assert_eq!(new.dispatch, [Dispatch { step: 0, attempt: 1 }]);
    let id = create(&store, new).await;

    let summary = store.summary(&id).await.unwrap().expect("a summary");
    assert!(summary.matches(&state), "{summary:?} vs {state:?}");
    assert_eq!((summary.status.name(), summary.seq, summary.created_at), ("pending", 1, 1_000));
    let [entry] = summary.ready_entries.as_slice() else { panic!("the first step's ready entry: {summary:?}") };
    assert!(store.dispatch_exists(&id, entry).await.unwrap());

    let history = store.history(&id).await.unwrap().expect("a history");
    assert_eq!(history.iter().map(|l| l.seq).collect::<Vec<_>>(), [1]);
    assert_eq!(history[0].recorded.transition.kind(), "run_created");
    assert_eq!(replayed(&history, &def), state);
    assert!(summary.matches(&replayed(&history, &def)));

    assert_eq!(store.list_runs(query(None, None, None, 10)).await.unwrap().runs, std::slice::from_ref(&id));
    assert!(!store.has_timer(&id).await.unwrap());
    let claimed = claim_one(&store, "a").await;
    assert_eq!(&claimed.lease.entry, entry);
    let task = claimed.task.unwrap();
    assert_eq!((task.step, task.attempt, &task.state), (0, 1, &state));

    let unknown = RunId::new(2, 1_000);
    assert_eq!(snapshot(&store, &unknown).await, (None, None));
}

async fn run_created_without_dispatch_queues_nothing(store: Arc<dyn Store>) {
    let def = definition("wf", 1, 1);
    let new = NewRun { dispatch: Vec::new(), ..new_run(&def, 1, 1_000, None) };
    let state = new.state.clone();
    let id = create(&store, new).await;
    let summary = store.summary(&id).await.unwrap().unwrap();
    assert!(summary.matches(&state), "{summary:?}");
    assert_eq!(summary.ready_entries, Vec::<String>::new());
    assert!(nothing_claimable(&store, "a").await);
}

async fn idempotency_key_creates_one_run(store: Arc<dyn Store>) {
    let def = definition("wf", 1, 1);
    let key = "cron:wf:60000";
    let shard = shard_of(key, store.shards());
    let first = new_run(&def, shard, 1_000, Some((key, Duration::from_secs(60))));
    let id = create(&store, first).await;
    let before = snapshot(&store, &id).await;

    let second = new_run(&def, shard, 1_001, Some((key, Duration::from_secs(60))));
    let second_id = second.run.clone();
    assert_eq!(store.create_run(second).await.unwrap(), Created::Duplicate(id.to_string()));
    assert_eq!(snapshot(&store, &second_id).await, (None, None), "the duplicate created nothing");
    assert_eq!(snapshot(&store, &id).await, before, "the first run is untouched");
    assert_eq!(store.list_runs(query(None, None, None, 10)).await.unwrap().runs, std::slice::from_ref(&id));
    let claimed = store.claim("a", 10, BLOCK).await.unwrap();
    assert_eq!(claimed.len(), 1, "only the first run's step was queued: {claimed:?}");
    assert_eq!(claimed[0].task.as_ref().unwrap().run, id.to_string());

    // Another key is another run.
    let other_key = "cron:wf:120000";
    let other = new_run(&def, shard_of(other_key, store.shards()), 1_002, Some((other_key, Duration::from_secs(60))));
    create(&store, other).await;
}

/// Runs created in one group: each its own outcome, in order, as if created one after the
/// other (a second run of a key taken earlier in the group is the first's duplicate and
/// creates nothing), across shards.
async fn group_creation_gives_each_run_its_own_outcome(store: Arc<dyn Store>) {
    let def = definition("wf", 1, 1);
    let key = "api:group";
    let shard = shard_of(key, store.shards());
    let keyed = new_run(&def, shard, 1_000, Some((key, Duration::from_secs(60))));
    let same_key = new_run(&def, shard, 1_001, Some((key, Duration::from_secs(60))));
    let plain = new_run(&def, (shard + 1) % store.shards(), 1_002, None);
    let other_key = "api:group-other";
    let other = new_run(&def, shard_of(other_key, store.shards()), 1_003, Some((other_key, Duration::from_secs(60))));
    let ids: Vec<RunId> = [&keyed, &same_key, &plain, &other].iter().map(|new| new.run.clone()).collect();
    let created = store.create_runs(vec![keyed, same_key, plain, other]).await.unwrap();
    assert_eq!(
        created,
        vec![
            Created::New(ids[0].clone()),
            Created::Duplicate(ids[0].to_string()),
            Created::New(ids[2].clone()),
            Created::New(ids[3].clone()),
        ]
    );
    assert_eq!(snapshot(&store, &ids[1]).await, (None, None), "the duplicate created nothing");
    for id in [&ids[0], &ids[2], &ids[3]] {
        let (summary, history) = snapshot(&store, id).await;
        assert_eq!(summary.expect("created").seq, 1, "{id}");
        assert_eq!(history.expect("its log").len(), 1, "{id}");
    }
    let mut claimed: Vec<String> =
        claim_exactly(&store, "a", 3).await.into_iter().map(|c| c.task.unwrap().run).collect();
    claimed.sort();
    let mut expected: Vec<String> = [&ids[0], &ids[2], &ids[3]].iter().map(|id| id.to_string()).collect();
    expected.sort();
    assert_eq!(claimed, expected, "one entry queued for each run created");
    assert!(nothing_claimable(&store, "b").await, "and no other");
    assert!(store.create_runs(Vec::new()).await.unwrap().is_empty(), "an empty group is no call");
}

async fn idempotency_key_holds_for_its_whole_retention(store: Arc<dyn Store>) {
    let def = definition("wf", 1, 1);
    // Held for 1.9 s: still held at 1.2 s.
    let key = "api:long";
    let shard = shard_of(key, store.shards());
    let retention = Duration::from_millis(1_900);
    let started = Instant::now();
    let id = create(&store, new_run(&def, shard, 1_000, Some((key, retention)))).await;
    tokio::time::sleep(Duration::from_millis(1_200).saturating_sub(started.elapsed())).await;
    let again = new_run(&def, shard, 1_001, Some((key, retention)));
    assert_eq!(
        store.create_run(again).await.unwrap(),
        Created::Duplicate(id.to_string()),
        "a key is held for its whole retention, {:?} < {retention:?}",
        started.elapsed()
    );

    // Free again once its retention has passed.
    let key = "api:short";
    let shard = shard_of(key, store.shards());
    let retention = Duration::from_secs(1);
    create(&store, new_run(&def, shard, 2_000, Some((key, retention)))).await;
    tokio::time::sleep(retention + Duration::from_millis(300)).await;
    create(&store, new_run(&def, shard, 2_001, Some((key, retention)))).await;
}

async fn claim_returns_the_dispatched_task(store: Arc<dyn Store>) {
    let def = definition("wf", 2, 1);
    let new = new_run(&def, 3, 1_000, None);
    let dispatched = new.state.clone();
    let id = create(&store, new).await;

    let claimed = claim_one(&store, "a").await;
    assert_eq!(claimed.deliveries, 1);
    assert_eq!((claimed.lease.shard, claimed.lease.consumer.as_str()), (3, "a"));
    let listed = store.summary(&id).await.unwrap().unwrap().ready_entries;
    assert_eq!(std::slice::from_ref(&claimed.lease.entry), listed.as_slice());
    let task = claimed.task.expect("a decodable task");
    assert_eq!((task.run, task.step, task.attempt), (id.to_string(), 0, 1));
    assert_eq!(task.state, dispatched);
    assert!(nothing_claimable(&store, "b").await, "an entry is delivered once");
}

/// Claims `count` queued steps for `consumer` (bounded: 20 claims), failing if fewer come.
async fn claim_exactly(store: &Arc<dyn Store>, consumer: &str, count: usize) -> Vec<Claimed> {
    let mut claims = Vec::new();
    for _ in 0..20 {
        if claims.len() == count {
            break;
        }
        claims.extend(store.claim(consumer, count - claims.len(), BLOCK).await.unwrap());
    }
    assert_eq!(claims.len(), count, "the queued steps are claimed");
    claims
}

async fn paused_workflows_steps_are_held_oldest_first(store: Arc<dyn Store>) {
    assert!(store.set_paused("wf", true).await.unwrap(), "pausing changes the state");
    assert!(!store.set_paused("wf", true).await.unwrap(), "pausing twice changes nothing");
    assert_eq!(store.paused_workflows().await.unwrap(), BTreeSet::from(["wf".to_owned()]));
    let def = definition("wf", 1, 1);
    // Created newest first, on different shards.
    let mut runs = Vec::new();
    for (i, at) in [3_000u64, 2_000, 1_000].into_iter().enumerate() {
        runs.push(create(&store, new_run(&def, i as u16, at, None)).await);
    }
    let claims = claim_exactly(&store, "a", 3).await;
    for claimed in &claims {
        let task = claimed.task.as_ref().expect("a decodable task");
        let run: RunId = task.run.parse().unwrap();
        assert!(store.hold(&claimed.lease, &run, "wf", task.state.created_at).await.unwrap());
        // Acknowledged: held once, not delivered again, not reclaimable.
        assert!(!store.hold(&claimed.lease, &run, "wf", task.state.created_at).await.unwrap());
    }
    assert!(nothing_claimable(&store, "b").await, "a held step's entry is acknowledged");
    assert!(store.reclaim("b", Duration::ZERO, 10).await.unwrap().is_empty(), "nothing left pending");
    let oldest_first: Vec<RunId> = runs.iter().rev().cloned().collect();
    assert_eq!(store.held_runs("wf", 10).await.unwrap(), oldest_first);
    assert_eq!(store.held_runs("wf", 2).await.unwrap(), oldest_first[..2].to_vec());
    assert_eq!(store.held_count("wf").await.unwrap(), 3);
    assert_eq!(store.held_count("other").await.unwrap(), 0);
    // A claim by a consumer that does not hold the entry holds nothing.
    let fourth = create(&store, new_run(&def, 3, 4_000, None)).await;
    let claimed = claim_one(&store, "a").await;
    let stranger = Lease { consumer: "b".to_owned(), ..claimed.lease.clone() };
    assert!(!store.hold(&stranger, &fourth, "wf", 4_000).await.unwrap());
    assert_eq!(store.held_count("wf").await.unwrap(), 3);
    store.release("wf", &oldest_first[0]).await.unwrap();
    assert_eq!(store.held_runs("wf", 10).await.unwrap(), oldest_first[1..].to_vec());
    assert!(store.set_paused("wf", false).await.unwrap());
    assert!(!store.set_paused("wf", false).await.unwrap());
    assert!(store.paused_workflows().await.unwrap().is_empty());
}

async fn concurrency_slots_pass_on_oldest_first(store: Arc<dyn Store>) {
    let def = definition("wf", 2, 1);
    let group = SlotGroup { workflow: "wf".to_owned(), group: "g".to_owned(), limit: 1 };
    // Three runs of one group, on its shard, created in this order.
    let mut runs = Vec::new();
    for at in [1_000u64, 2_000, 3_000] {
        runs.push(create(&store, new_run(&def, 1, at, None)).await);
    }
    let claims = claim_exactly(&store, "a", 3).await;
    let claim_of = |run: &RunId| {
        claims.iter().find(|c| c.task.as_ref().is_ok_and(|t| t.run == run.to_string())).expect("a claim of the run")
    };
    let (a, b, c) = (&runs[0], &runs[1], &runs[2]);
    let stranger = Lease { consumer: "b".to_owned(), ..claim_of(a).lease.clone() };
    assert_eq!(store.admit(&stranger, a, &group, 1_000).await.unwrap(), Admission::NotOurs);
    assert_eq!(store.admit(&claim_of(a).lease, a, &group, 1_000).await.unwrap(), Admission::Admitted);
    assert_eq!(store.admit(&claim_of(b).lease, b, &group, 2_000).await.unwrap(), Admission::Held { promoted: vec![] });
    assert_eq!(store.admit(&claim_of(c).lease, c, &group, 3_000).await.unwrap(), Admission::Held { promoted: vec![] });
    // The holder stays admitted for its later steps; the waiting runs' entries are acknowledged.
    assert_eq!(store.admit(&claim_of(a).lease, a, &group, 1_000).await.unwrap(), Admission::Admitted);
    assert!(
        store.reclaim("b", Duration::ZERO, 10).await.unwrap().iter().all(|r| r.lease.entry == claim_of(a).lease.entry)
    );
    assert_eq!(store.slot_holders(1, &group).await.unwrap(), (vec![a.clone()], 2));
    assert_eq!(store.slot_groups(1, "wf").await.unwrap(), vec!["g".to_owned()]);
    assert_eq!(store.queued(1, "wf").await.unwrap(), (2, 0), "two wait for a slot");
    assert_eq!(store.queued(0, "wf").await.unwrap(), (0, 0), "none on another shard");
    // A waiting run that ends (cancelled) leaves the queue; the holder's end passes the slot on
    // to the oldest waiting run.
    assert!(store.release_slot(1, &group, Some(c)).await.unwrap().is_empty());
    assert_eq!(store.release_slot(1, &group, Some(a)).await.unwrap(), vec![b.clone()]);
    assert_eq!(store.slot_holders(1, &group).await.unwrap(), (vec![b.clone()], 0));
    assert!(store.release_slot(1, &group, None).await.unwrap().is_empty(), "no free slot, nobody waiting");
    // A larger limit admits at once.
    let wide = SlotGroup { limit: 5, ..group.clone() };
    assert!(store.release_slot(1, &wide, None).await.unwrap().is_empty());
}

async fn rate_limits_count_starts_in_a_sliding_window(store: Arc<dyn Store>) {
    let def = definition("wf", 1, 1);
    let group = RateGroup { workflow: "wf".to_owned(), group: "g".to_owned(), limit: 2, period_ms: 1_000 };
    let mut runs = Vec::new();
    for at in [1_000u64, 2_000, 3_000] {
        runs.push(create(&store, new_run(&def, 2, at, None)).await);
    }
    let claims = claim_exactly(&store, "a", 3).await;
    let lease_of = |run: &RunId| {
        claims.iter().find(|c| c.task.as_ref().is_ok_and(|t| t.run == run.to_string())).expect("a claim").lease.clone()
    };
    let (a, b, c) = (&runs[0], &runs[1], &runs[2]);
    let before = store.now().await.unwrap();
    let stranger = Lease { consumer: "b".to_owned(), ..lease_of(a) };
    assert_eq!(store.rate_admit(&stranger, a, &group, 1_000).await.unwrap(), RateAdmission::NotOurs);
    assert_eq!(store.rate_admit(&lease_of(a), a, &group, 1_000).await.unwrap(), RateAdmission::Admitted);
    assert_eq!(store.rate_admit(&lease_of(b), b, &group, 2_000).await.unwrap(), RateAdmission::Admitted);
    let RateAdmission::Held { promoted, next: Some(next) } =
        store.rate_admit(&lease_of(c), c, &group, 3_000).await.unwrap()
    else {
        panic!("the third start within the period waits, with the time capacity frees");
    };
    assert!(promoted.is_empty());
    assert!((before + 1_000..=before + 1_500).contains(&next), "capacity frees a period after the first start");
    assert_eq!(store.queued(2, "wf").await.unwrap(), (0, 1), "one waits for the window");
    // Counted once: a later step of an admitted run is admitted within the period.
    assert_eq!(store.rate_admit(&lease_of(a), a, &group, 1_000).await.unwrap(), RateAdmission::Admitted);
    assert!(store.reclaim("b", Duration::ZERO, 10).await.unwrap().iter().all(|r| r.lease.entry != lease_of(c).entry));
    let (promoted, still) = store.rate_release(2, &group).await.unwrap();
    assert!(promoted.is_empty() && still.is_some(), "no capacity yet");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(store.rate_release(2, &group).await.unwrap(), (vec![c.clone()], None));
    assert_eq!(store.rate_groups(2, "wf").await.unwrap(), vec!["g".to_owned()]);
}

async fn debounced_triggers_collapse_into_one_burst_per_key(store: Arc<dyn Store>) {
    let trigger = |group: &str, payload: &str, key: Option<&str>| DebounceTrigger {
        workflow: "wf".to_owned(),
        group: group.to_owned(),
        burst: burst_id("wf", group),
        payload: payload.to_owned(),
        order: None,
        period_ms: 300,
        max_wait_ms: 0,
        key: key.map(|key| (key.to_owned(), Duration::from_secs(60))),
    };
    let absorbed = |debounced: Debounced| match debounced {
        Debounced::Absorbed { burst, triggers, due } => (burst, triggers, due),
        other => panic!("absorbed, not {other:?}"),
    };
    let before = store.now().await.unwrap();
    // Three triggers of one key: one burst, due a period after the last.
    let (burst, triggers, due) = absorbed(store.debounce(&trigger("g", "p1", Some("k1"))).await.unwrap());
    assert_eq!(triggers, 1);
    assert!(due >= before + 300, "due a period after the trigger");
    for (n, payload) in [(2, "p2"), (3, "p3")] {
        let (same, triggers, later) = absorbed(store.debounce(&trigger("g", payload, None)).await.unwrap());
        assert_eq!((same.as_str(), triggers), (burst.as_str(), n), "the key's open burst takes the trigger");
        assert!(later >= due, "each trigger puts the burst off");
    }
    // A trigger absorbed late but older by its order (an event's id) keeps the later payload.
    let older = DebounceTrigger { order: Some("1-0".to_owned()), ..trigger("g", "old", None) };
    let (_, triggers, _) = absorbed(store.debounce(&older).await.unwrap());
    assert_eq!(triggers, 4);
    // A trigger whose idempotency key was seen is not counted again.
    assert_eq!(
        store.debounce(&trigger("g", "p9", Some("k1"))).await.unwrap(),
        Debounced::Duplicate { burst: burst.clone() }
    );
    // Another key has its own burst.
    let (other, triggers, _) = absorbed(store.debounce(&trigger("h", "q1", None)).await.unwrap());
    assert_ne!(other, burst);
    assert_eq!(triggers, 1);
    assert!(store.due_bursts(10).await.unwrap().is_empty(), "nothing is due within the period");
    assert_eq!(store.burst_counts().await.unwrap(), BTreeMap::from([("wf".to_owned(), 2)]));

    tokio::time::sleep(Duration::from_millis(450)).await;
    let due = store.due_bursts(10).await.unwrap();
    let found = |id: &str| due.iter().find(|d| d.burst == id).unwrap_or_else(|| panic!("burst {id} is due: {due:?}"));
    let g = found(&burst);
    assert_eq!((g.workflow.as_str(), g.group.as_str(), g.payload.as_str(), g.triggers), ("wf", "g", "p3", 4));
    assert!(g.first_at >= before, "the first trigger's time");
    assert_eq!((found(&other).payload.as_str(), found(&other).triggers), ("q1", 1));
    assert_eq!(store.due_bursts(1).await.unwrap().len(), 1, "at most max");

    // A trigger after its key's burst is due opens the next burst; the due one keeps its state.
    let (next, triggers, _) = absorbed(store.debounce(&trigger("g", "p4", None)).await.unwrap());
    assert_ne!(next, burst);
    assert_eq!(triggers, 1);
    let g = store.due_bursts(10).await.unwrap().into_iter().find(|d| d.burst == burst).expect("still due");
    assert_eq!((g.payload.as_str(), g.triggers), ("p3", 4));
    // Started bursts are forgotten; the open one stays.
    store.finish_burst(&g).await.unwrap();
    store.finish_burst(found(&other)).await.unwrap();
    assert!(store.due_bursts(10).await.unwrap().is_empty());
    assert_eq!(store.burst_counts().await.unwrap(), BTreeMap::from([("wf".to_owned(), 1)]));
    let (same, triggers, _) = absorbed(store.debounce(&trigger("g", "p5", None)).await.unwrap());
    assert_eq!((same, triggers), (next, 2), "finishing the old burst left the open one to its key");

    // `max_wait` bounds how far a burst is put off from its first trigger.
    let bounded = DebounceTrigger { period_ms: 60_000, max_wait_ms: 500, ..trigger("m", "r1", None) };
    let now = store.now().await.unwrap();
    let (_, _, due) = absorbed(store.debounce(&bounded).await.unwrap());
    assert!((now + 400..now + 700).contains(&due), "due at most max_wait after the first trigger: {due} vs {now}");
}

async fn claim_returns_at_most_max(store: Arc<dyn Store>) {
    let def = definition("wf", 1, 1);
    let shards = store.shards();
    let mut queued = BTreeSet::new();
    for i in 0..40u64 {
        let id = create(&store, new_run(&def, (i % u64::from(shards)) as u16, 1_000 + i, None)).await;
        queued.insert(id.to_string());
    }
    let mut seen = BTreeSet::new();
    let mut entries = HashSet::new();
    for _ in 0..200 {
        if seen.len() == queued.len() {
            break;
        }
        let claimed = store.claim("a", 5, Duration::from_millis(20)).await.unwrap();
        assert!(claimed.len() <= 5, "claim(max = 5) returned {}", claimed.len());
        for c in claimed {
            assert_eq!(c.deliveries, 1);
            assert!(entries.insert((c.lease.shard, c.lease.entry.clone())), "an entry delivered twice: {c:?}");
            assert!(seen.insert(c.task.unwrap().run), "a run's step delivered twice");
        }
    }
    assert_eq!(seen, queued, "every queued step is claimed, once");
    assert!(nothing_claimable(&store, "b").await);
    assert!(store.claim("a", 0, Duration::from_millis(20)).await.unwrap().is_empty(), "max 0 claims nothing");
}

async fn claim_finds_a_step_queued_on_any_shard(store: Arc<dyn Store>) {
    // One free executor (max = 1), one queued step, wherever it is: the claim returns it.
    let def = definition("wf", 1, 1);
    for (n, shard) in [0, 9, 15, 1, 14].into_iter().enumerate() {
        let id = create(&store, new_run(&def, shard, 1_000 + n as u64, None)).await;
        let claimed = store.claim("a", 1, BLOCK).await.unwrap();
        let runs: Vec<String> = claimed.iter().map(|c| c.task.as_ref().unwrap().run.clone()).collect();
        assert_eq!(runs, [id.to_string()], "claim(max = 1) with one step queued, on shard {shard}");
    }
}

async fn claim_waits_at_most_its_block(store: Arc<dyn Store>) {
    let started = Instant::now();
    let claimed = store.claim("a", 5, Duration::from_millis(300)).await.unwrap();
    let waited = started.elapsed();
    assert!(claimed.is_empty());
    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_secs(3), "waited {waited:?}");
}

async fn claim_with_a_zero_block_does_not_wait(store: Arc<dyn Store>) {
    let started = Instant::now();
    let claimed = tokio::time::timeout(Duration::from_secs(5), store.claim("a", 5, Duration::ZERO))
        .await
        .expect("claim(block = 0) returns at once, it does not wait for work");
    assert!(claimed.unwrap().is_empty());
    assert!(started.elapsed() < Duration::from_secs(1), "waited {:?}", started.elapsed());
}

async fn blocked_claim_wakes_when_a_step_is_dispatched(store: Arc<dyn Store>) {
    let waiting = tokio::spawn({
        let store = Arc::clone(&store);
        async move { store.claim("a", 5, Duration::from_secs(10)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let id = create(&store, new_run(&definition("wf", 1, 1), 2, 1_000, None)).await;
    let claimed = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("the blocked claim wakes up when a step is queued")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].task.as_ref().unwrap().run, id.to_string());
}

async fn commit_under_lease_applies_acks_and_dispatches(store: Arc<dyn Store>) {
    let def = definition("wf", 2, 1);
    let id = create(&store, new_run(&def, 2, 1_000, None)).await;
    let first = claim_one(&store, "a").await;

    let commit = work(&def, &first, true, 1_010);
    let state = commit.state.clone();
    assert_eq!(commit.dispatch, [Dispatch { step: 1, attempt: 1 }], "the second step is dispatched");
    let next = commit.state.clone();
    assert_eq!(store.commit(commit.clone()).await.unwrap(), CommitOutcome::Applied { seq: 3 });

    let summary = store.summary(&id).await.unwrap().unwrap();
    assert!(summary.matches(&state), "{summary:?}");
    assert_eq!((summary.status.name(), summary.step, summary.attempt, summary.seq), ("running", Some(1), Some(1), 3));
    let history = store.history(&id).await.unwrap().unwrap();
    assert_eq!(history.iter().map(|l| l.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(replayed(&history, &def), state);

    // The worked entry is acknowledged: not queued, not leased, not to be taken over.
    assert!(!store.dispatch_exists(&id, &first.lease.entry).await.unwrap(), "the worked entry was acked");
    assert_eq!(store.renew(std::slice::from_ref(&first.lease)).await.unwrap(), std::slice::from_ref(&first.lease));
    age().await;
    assert!(store.reclaim("b", Duration::ZERO, 10).await.unwrap().is_empty(), "an acked entry is not reclaimed");

    // The next step is queued, once.
    let next_entry = summary.ready_entries.last().cloned().expect("the next step's entry");
    assert_ne!(next_entry, first.lease.entry);
    assert!(store.dispatch_exists(&id, &next_entry).await.unwrap());
    let second = claim_one(&store, "b").await;
    assert_eq!(second.lease.entry, next_entry);
    assert_eq!(second.deliveries, 1);
    assert_eq!(second.task.as_ref().unwrap().state, next);
    assert!(nothing_claimable(&store, "c").await);

    // A commit is accepted once.
    assert_eq!(store.commit(commit).await.unwrap(), CommitOutcome::LeaseLost);
    assert_eq!(store.history(&id).await.unwrap().unwrap().len(), 3);

    // A lease is acknowledged without a transition by `ack`, only by its holder.
    store.ack(&Lease { consumer: "intruder".to_owned(), ..second.lease.clone() }).await.unwrap();
    assert!(store.dispatch_exists(&id, &next_entry).await.unwrap(), "only the holder acks");
    store.ack(&second.lease).await.unwrap();
    assert!(!store.dispatch_exists(&id, &next_entry).await.unwrap());
    assert_eq!(store.renew(std::slice::from_ref(&second.lease)).await.unwrap(), std::slice::from_ref(&second.lease));
}

async fn stale_commit_changes_nothing(store: Arc<dyn Store>) {
    let def = definition("wf", 2, 1);
    let id = create(&store, new_run(&def, 1, 1_000, None)).await;
    let claimed = claim_one(&store, "a").await;
    let good = work(&def, &claimed, true, 1_010);
    let before = snapshot(&store, &id).await;

    // Behind the log (here 0: the run exists) is stale. A seq ahead of the log is not checked by
    // the Redis store (one fewer command per transition; the engine only uses seqs it read from
    // the log), so it is not part of the shared contract.
    for expected_seq in [0] {
        let stale = Commit { expected_seq, ..good.clone() };
        assert_eq!(store.commit(stale).await.unwrap(), CommitOutcome::Stale, "expected_seq {expected_seq} (seq is 1)");
        let unleased = Commit { expected_seq, lease: None, ..good.clone() };
        assert_eq!(
            store.commit(unleased).await.unwrap(),
            CommitOutcome::Stale,
            "unleased, expected_seq {expected_seq}"
        );
        let empty = Commit { expected_seq, lease: None, records: Vec::new(), ..good.clone() };
        assert_eq!(store.commit(empty).await.unwrap(), CommitOutcome::Stale, "no records, expected_seq {expected_seq}");
        assert_eq!(snapshot(&store, &id).await, before, "a stale commit changed the run (expected_seq {expected_seq})");
    }
    assert!(store.renew(std::slice::from_ref(&claimed.lease)).await.unwrap().is_empty(), "the lease is kept");
    assert!(store.dispatch_exists(&id, &claimed.lease.entry).await.unwrap(), "the entry is not acked");
    assert!(nothing_claimable(&store, "b").await, "nothing was dispatched");
    assert!(!store.has_timer(&id).await.unwrap());

    assert_eq!(store.commit(good).await.unwrap(), CommitOutcome::Applied { seq: 3 });
    let history = store.history(&id).await.unwrap().unwrap();
    assert_eq!(history.iter().map(|l| l.seq).collect::<Vec<_>>(), [1, 2, 3]);
}

/// `a`; then `b` and `c`, which both need `a`: each tried once.
fn fork(id: &str) -> WorkflowDef {
    let toml = format!(
        "[[workflow]]\nid = \"{id}\"\n\
         [[workflow.step]]\nid = \"a\"\naction = \"noop\"\nretry = {{ max_attempts = 1 }}\n\
         [[workflow.step]]\nid = \"b\"\naction = \"noop\"\nneeds = [\"a\"]\nretry = {{ max_attempts = 1 }}\n\
         [[workflow.step]]\nid = \"c\"\naction = \"noop\"\nneeds = [\"a\"]\nretry = {{ max_attempts = 1 }}\n"
    );
    Registry::parse("fork.toml", &toml).expect("a valid test workflow").get(id).expect("parsed").def.clone()
}

/// Steps whose needs are met together are queued together, each as its own entry for any
/// consumer; the run's live entries are tracked through the commits that ack them; a sibling's
/// outcome decided on the older state is stale, and applies re-decided on the new one.
async fn a_commit_queues_each_ready_step_as_its_own_entry(store: Arc<dyn Store>) {
    let def = fork("wf");
    let id = create(&store, new_run(&def, 1, 1_000, None)).await;
    let a = claim_one(&store, "x").await;
    let commit = work(&def, &a, true, 1_010);
    assert_eq!(commit.dispatch, [Dispatch { step: 1, attempt: 1 }, Dispatch { step: 2, attempt: 1 }]);
    assert_eq!(store.commit(commit).await.unwrap(), CommitOutcome::Applied { seq: 3 });
    let entries = store.summary(&id).await.unwrap().unwrap().ready_entries;
    assert_eq!(entries.len(), 2, "{entries:?}");

    // Two consumers take one each.
    let first = store.claim("x", 1, BLOCK).await.unwrap().remove(0);
    let second = store.claim("y", 1, BLOCK).await.unwrap().remove(0);
    let steps: BTreeSet<u32> = [&first, &second].iter().map(|c| c.task.as_ref().unwrap().step).collect();
    assert_eq!(steps, BTreeSet::from([1, 2]));
    let mut claimed: Vec<String> = vec![first.lease.entry.clone(), second.lease.entry.clone()];
    claimed.sort();
    let mut listed = entries.clone();
    listed.sort();
    assert_eq!(claimed, listed, "the summary lists the entries it queued");

    // The first commits; the other's outcome, decided on the state both were queued with, is stale.
    assert_eq!(store.commit(work(&def, &first, true, 1_020)).await.unwrap(), CommitOutcome::Applied { seq: 5 });
    let listed = store.summary(&id).await.unwrap().unwrap().ready_entries;
    assert_eq!(listed.as_slice(), std::slice::from_ref(&second.lease.entry));
    let before = snapshot(&store, &id).await;
    assert_eq!(store.commit(work(&def, &second, true, 1_020)).await.unwrap(), CommitOutcome::Stale);
    assert_eq!(snapshot(&store, &id).await, before, "a stale sibling writes nothing");
    // Re-decided on the run's new state, under the same lease, it applies and ends the run.
    let now = replayed(&store.history(&id).await.unwrap().unwrap(), &def);
    let task = second.task.as_ref().unwrap();
    let happened = vec![
        Transition::StepStarted { step: task.step, attempt: task.attempt },
        Transition::StepCompleted { step: task.step, attempt: task.attempt, output: "{}".to_owned() },
    ];
    let again = commit_of(&def, &id, &now, Some(second.lease.clone()), happened, 1_030);
    assert_eq!(store.commit(again).await.unwrap(), CommitOutcome::Applied { seq: 8 });
    let (summary, history) = snapshot(&store, &id).await;
    let summary = summary.unwrap();
    assert_eq!((summary.status.name(), summary.ready_entries.len()), ("completed", 0));
    assert_eq!(replayed(&history.unwrap(), &def).status, Status::Completed);
    assert!(nothing_claimable(&store, "z").await);
}

/// A commit that ends a run withdraws the steps it still had queued: they are never delivered.
async fn a_run_that_ends_withdraws_its_queued_steps(store: Arc<dyn Store>) {
    let def = fork("wf");
    let id = create(&store, new_run(&def, 2, 1_000, None)).await;
    let a = claim_one(&store, "x").await;
    assert!(matches!(store.commit(work(&def, &a, true, 1_010)).await.unwrap(), CommitOutcome::Applied { .. }));
    let b = store.claim("x", 1, BLOCK).await.unwrap().remove(0);
    // `b` fails for good (one attempt): the run fails, and `c`, still queued, is withdrawn.
    let failed = work(&def, &b, false, 1_020);
    assert_eq!(failed.state.status, Status::Failed);
    assert_eq!(store.commit(failed).await.unwrap(), CommitOutcome::Applied { seq: 6 });
    let summary = store.summary(&id).await.unwrap().unwrap();
    assert_eq!((summary.status.name(), summary.ready_entries.len()), ("failed", 0));
    assert!(nothing_claimable(&store, "y").await, "the sibling's entry was withdrawn");
}

async fn commit_under_lost_lease_changes_nothing(store: Arc<dyn Store>) {
    let def = definition("wf", 2, 1);
    let id = create(&store, new_run(&def, 3, 1_000, None)).await;
    let mine = claim_one(&store, "a").await;
    assert!(store.reclaim("b", Duration::from_secs(60), 10).await.unwrap().is_empty(), "the lease is fresh");
    age().await;
    let taken = store.reclaim("b", Duration::ZERO, 10).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert_eq!((taken[0].lease.entry.as_str(), taken[0].lease.consumer.as_str()), (mine.lease.entry.as_str(), "b"));

    let before = snapshot(&store, &id).await;
    assert_eq!(store.commit(work(&def, &mine, true, 1_010)).await.unwrap(), CommitOutcome::LeaseLost);
    assert_eq!(store.commit(work(&def, &mine, false, 1_010)).await.unwrap(), CommitOutcome::LeaseLost);
    assert_eq!(snapshot(&store, &id).await, before, "a commit under a lost lease changed the run");
    assert!(nothing_claimable(&store, "c").await, "nothing was dispatched");
    assert!(!store.has_timer(&id).await.unwrap(), "no timer was set");
    assert!(store.dispatch_exists(&id, &mine.lease.entry).await.unwrap(), "b still holds the entry");
    store.ack(&mine.lease).await.unwrap();
    assert!(store.dispatch_exists(&id, &mine.lease.entry).await.unwrap(), "a lost lease does not ack");

    assert_eq!(store.commit(work(&def, &taken[0], true, 1_020)).await.unwrap(), CommitOutcome::Applied { seq: 3 });
    assert_eq!(replayed(&store.history(&id).await.unwrap().unwrap(), &def).updated_at, 1_020);
}

/// One group of fresh, stale, lease-lost and finished runs' commits: each gets the outcome it
/// would get alone, the refused ones write nothing, and a second commit of one run in the same
/// group (a sibling's, decided on the same seq) loses the compare and applies once re-decided.
async fn group_commit_gives_each_run_its_own_outcome(store: Arc<dyn Store>) {
    assert!(store.commit_group(Vec::new()).await.unwrap().is_empty());
    let def = definition("wf", 2, 1);
    // `lost`'s lease goes from `a` to `b` before the others are claimed.
    let lost_id = create(&store, new_run(&def, 2, 1_000, None)).await;
    let lost = claim_one(&store, "a").await;
    age().await;
    assert_eq!(store.reclaim("b", Duration::ZERO, 10).await.unwrap().len(), 1);
    let mut ids = Vec::new();
    for (shard, now) in [(0, 1_001), (1, 1_002), (3, 1_003)] {
        ids.push(create(&store, new_run(&def, shard, now, None)).await);
    }
    let claimed = store.claim("a", 10, BLOCK).await.unwrap();
    assert_eq!(claimed.len(), 3);
    let of = |id: &RunId| {
        claimed.iter().find(|c| c.task.as_ref().is_ok_and(|t| t.run == id.to_string())).expect("claimed").clone()
    };
    let (fresh, stale, finished) = (of(&ids[0]), of(&ids[1]), of(&ids[2]));
    ids.insert(2, lost_id);
    let state = |c: &Claimed| c.task.as_ref().unwrap().state.clone();

    // `stale`'s run moves on (a record appended elsewhere); `finished`'s run is cancelled.
    let (step, attempt) = state(&stale).position().unwrap();
    let moved = commit_of(&def, &ids[1], &state(&stale), None, vec![Transition::StepStarted { step, attempt }], 1_005);
    assert_eq!(store.commit(moved).await.unwrap(), CommitOutcome::Applied { seq: 2 });
    let cancel = commit_of(
        &def,
        &ids[3],
        &state(&finished),
        None,
        vec![Transition::RunCancelled { reason: "op".to_owned() }],
        1_006,
    );
    assert_eq!(store.commit(cancel).await.unwrap(), CommitOutcome::Applied { seq: 2 });

    let before: Vec<_> = futures::future::join_all(ids[1..].iter().map(|id| snapshot(&store, id))).await;
    let first = work(&def, &fresh, true, 1_010);
    // Another commit of the same run decided on the same seq (a sibling step's, once steps run in
    // parallel), in the same group after the first.
    let (step, attempt) = state(&fresh).position().unwrap();
    let sibling =
        commit_of(&def, &ids[0], &state(&fresh), None, vec![Transition::StepStarted { step, attempt }], 1_011);
    let outcomes = store
        .commit_group(vec![
            first.clone(),
            work(&def, &stale, true, 1_010),
            work(&def, &lost, true, 1_010),
            work(&def, &finished, true, 1_010),
            sibling,
        ])
        .await
        .unwrap();
    assert_eq!(
        outcomes,
        [
            CommitOutcome::Applied { seq: 3 },
            CommitOutcome::Stale,
            CommitOutcome::LeaseLost,
            CommitOutcome::Gone,
            CommitOutcome::Stale,
        ]
    );
    let after: Vec<_> = futures::future::join_all(ids[1..].iter().map(|id| snapshot(&store, id))).await;
    assert_eq!(after, before, "a refused commit wrote nothing");
    assert_eq!(replayed(&store.history(&ids[0]).await.unwrap().unwrap(), &def), first.state);
    assert!(!store.dispatch_exists(&ids[0], &fresh.lease.entry).await.unwrap(), "the applied one's lease is acked");
    assert!(store.dispatch_exists(&ids[1], &stale.lease.entry).await.unwrap(), "a stale commit acks nothing");
    assert!(store.dispatch_exists(&ids[2], &lost.lease.entry).await.unwrap(), "b still holds its entry");
    assert!(!store.dispatch_exists(&ids[3], &finished.lease.entry).await.unwrap(), "a gone run's entry is done");

    // The sibling, re-decided on the run's new state, applies.
    let next = claim_one(&store, "a").await;
    assert_eq!(next.task.as_ref().unwrap().run, ids[0].to_string());
    let redone = work(&def, &next, true, 1_020);
    assert_eq!(store.commit_group(vec![redone.clone()]).await.unwrap(), [CommitOutcome::Applied { seq: 6 }]);
    assert_eq!(replayed(&store.history(&ids[0]).await.unwrap().unwrap(), &def), redone.state);
}

/// Executors' commits that ask for their next step get it from the same call: claimed for their
/// consumer once the group is written, oldest first, whatever their own outcomes, as many as are
/// queued; a commit that does not ask gets none; what is claimed is leased like any claim.
async fn step_commits_claim_the_next_steps_of_those_that_ask(store: Arc<dyn Store>) {
    assert!(store.commit_steps(Vec::new()).await.unwrap().is_empty());
    let def = definition("wf", 2, 1);
    let mut ids = Vec::new();
    for now in [1_000, 1_001, 1_002] {
        ids.push(create(&store, new_run(&def, 2, now, None)).await);
    }
    let first = claim_exactly(&store, "a", 2).await;
    let run_of = |c: &Claimed| c.task.as_ref().expect("a decodable task").run.clone();
    let step_of = |c: &Claimed| c.task.as_ref().expect("a decodable task").step;
    assert_eq!([run_of(&first[0]), run_of(&first[1])], [ids[0].to_string(), ids[1].to_string()]);
    let ask = |commit: Commit, claim_next: bool| StepCommit { commit, claim_next };

    // The first asks, the second does not: the oldest queued step (the third run's first) goes to
    // the first; both commits queued their runs' second steps.
    let committed = store
        .commit_steps(vec![
            ask(work(&def, &first[0], true, 1_010), true),
            ask(work(&def, &first[1], true, 1_010), false),
        ])
        .await
        .unwrap();
    let outcomes: Vec<&CommitOutcome> = committed.iter().map(|c| &c.outcome).collect();
    assert_eq!(outcomes, [&CommitOutcome::Applied { seq: 3 }, &CommitOutcome::Applied { seq: 3 }]);
    let StepCommitted { next: Some(third), .. } = &committed[0] else { panic!("the first asked: {committed:?}") };
    assert_eq!(committed[1].next, None, "the second did not ask");
    assert_eq!((run_of(third), step_of(third), third.deliveries), (ids[2].to_string(), 0, 1));
    assert_eq!((third.lease.shard, third.lease.consumer.as_str()), (2, "a"));
    assert!(store.dispatch_exists(&ids[2], &third.lease.entry).await.unwrap(), "it is leased");

    // Both ask, one commit applies and one is refused (its lease was acknowledged by its first
    // commit): each gets a step, oldest first (the first run's, then the second's).
    let committed = store
        .commit_steps(vec![ask(work(&def, third, true, 1_020), true), ask(work(&def, &first[1], true, 1_020), true)])
        .await
        .unwrap();
    let outcomes: Vec<&CommitOutcome> = committed.iter().map(|c| &c.outcome).collect();
    assert_eq!(outcomes, [&CommitOutcome::Applied { seq: 3 }, &CommitOutcome::LeaseLost]);
    let next: Vec<&Claimed> = committed.iter().map(|c| c.next.as_ref().expect("a queued step for each")).collect();
    assert_eq!([run_of(next[0]), run_of(next[1])], [ids[0].to_string(), ids[1].to_string()]);
    assert_eq!([step_of(next[0]), step_of(next[1])], [1, 1]);
    // Left queued: the third run's second step, which the first commit of this group queued.
    let left = claim_exactly(&store, "b", 1).await;
    assert_eq!((run_of(&left[0]), step_of(&left[0])), (ids[2].to_string(), 1));

    // Nothing queued: one that asks gets none. The claimed steps commit under their leases.
    let committed = store.commit_steps(vec![ask(work(&def, next[0], true, 1_030), true)]).await.unwrap();
    assert_eq!(committed, [StepCommitted { outcome: CommitOutcome::Applied { seq: 6 }, next: None }]);
    assert_eq!(store.commit(work(&def, next[1], true, 1_030)).await.unwrap(), CommitOutcome::Applied { seq: 6 });
    assert!(nothing_claimable(&store, "c").await);
}

async fn renew_keeps_held_leases_and_reports_lost_ones(store: Arc<dyn Store>) {
    let def = definition("wf", 1, 1);
    for (shard, now) in [(0, 1_000), (1, 1_001), (2, 1_002)] {
        create(&store, new_run(&def, shard, now, None)).await;
    }
    let mine = store.claim("a", 10, BLOCK).await.unwrap();
    assert_eq!(mine.len(), 3);
    let leases: Vec<Lease> = mine.iter().map(|c| c.lease.clone()).collect();
    assert!(store.renew(&leases).await.unwrap().is_empty(), "all are held");

    age().await;
    let taken = store.reclaim("b", Duration::ZERO, 1).await.unwrap();
    assert_eq!(taken.len(), 1, "reclaim takes at most max");
    let stolen = Lease { consumer: "a".to_owned(), ..taken[0].lease.clone() };
    let acked = mine.iter().map(|c| c.lease.clone()).find(|l| *l != stolen).unwrap();
    store.ack(&acked).await.unwrap();
    let lost = store.renew(&leases).await.unwrap();
    assert_eq!(sorted(lost), sorted(vec![stolen.clone(), acked.clone()]), "taken over and acked leases are lost");
    // The lease taken over is held by its new owner.
    assert!(store.renew(std::slice::from_ref(&taken[0].lease)).await.unwrap().is_empty());

    // Renewal resets the idle time: only the lease nobody renewed expires.
    let held: Vec<Lease> = leases.iter().filter(|l| **l != stolen && **l != acked).cloned().collect();
    assert_eq!(held.len(), 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(store.renew(&held).await.unwrap().is_empty());
    let expired = store.reclaim("c", Duration::from_millis(350), 10).await.unwrap();
    let expired: Vec<Lease> = expired.into_iter().map(|c| c.lease).collect();
    assert_eq!(expired, [Lease { consumer: "c".to_owned(), ..taken[0].lease.clone() }]);
    assert!(store.renew(&[]).await.unwrap().is_empty());
}

async fn reclaim_counts_deliveries(store: Arc<dyn Store>) {
    let def = definition("wf", 1, 1);
    let new = new_run(&def, 1, 1_000, None);
    let dispatched = new.state.clone();
    create(&store, new).await;
    let first = claim_one(&store, "a").await;
    assert_eq!(first.deliveries, 1);
    assert!(store.reclaim("b", Duration::from_secs(60), 10).await.unwrap().is_empty(), "the lease is fresh");

    let mut holder = first.clone();
    for (consumer, deliveries) in [("b", 2), ("c", 3), ("c", 4)] {
        age().await;
        let mut taken = store.reclaim(consumer, Duration::ZERO, 10).await.unwrap();
        assert_eq!(taken.len(), 1);
        let taken = taken.remove(0);
        assert_eq!(taken.deliveries, deliveries, "delivery count after reclaim by {consumer}");
        assert_eq!(taken.lease, Lease { consumer: consumer.to_owned(), ..first.lease.clone() });
        assert_eq!(taken.task.as_ref().unwrap().state, dispatched);
        holder = taken;
    }
    // Renewal is not a delivery.
    assert!(store.renew(std::slice::from_ref(&holder.lease)).await.unwrap().is_empty());
    age().await;
    let taken = store.reclaim("d", Duration::ZERO, 10).await.unwrap();
    assert_eq!(taken.iter().map(|c| c.deliveries).collect::<Vec<_>>(), [5]);
    assert!(store.reclaim("e", Duration::ZERO, 0).await.unwrap().is_empty(), "max 0 reclaims nothing");
}

/// Creates a run of `def` and works its steps to the end, each succeeding; returns it with its
/// final state.
async fn run_to_completion(store: &Arc<dyn Store>, def: &WorkflowDef, shard: u16, now: Millis) -> (RunId, RunState) {
    let id = create(store, new_run(def, shard, now, None)).await;
    let mut at = now;
    loop {
        let claimed = claim_one(store, "a").await;
        at += 10;
        let commit = work(def, &claimed, true, at);
        let state = commit.state.clone();
        let seq = commit.expected_seq + commit.records.len() as u64;
        assert_eq!(store.commit(commit).await.unwrap(), CommitOutcome::Applied { seq });
        if state.status.is_terminal() {
            return (id, state);
        }
    }
}

async fn terminal_commit_keeps_replayable_history(store: Arc<dyn Store>) {
    let def = definition("wf", 3, 1);
    let (id, state) = run_to_completion(&store, &def, 1, 1_000).await;
    let history = store.history(&id).await.unwrap().expect("a finished run keeps its history");
    let kinds: Vec<&str> = history.iter().map(|l| l.recorded.transition.kind()).collect();
    assert_eq!(
        kinds,
        [
            "run_created",
            "step_started",
            "step_completed",
            "step_started",
            "step_completed",
            "step_started",
            "step_completed",
            "run_completed"
        ]
    );
    assert_eq!(history.iter().map(|l| l.seq).collect::<Vec<_>>(), (1..=8).collect::<Vec<u64>>());
    assert_eq!(replayed(&history, &def), state);
    let summary = store.summary(&id).await.unwrap().unwrap();
    assert!(summary.matches(&state), "{summary:?}");
    assert_eq!((summary.status.name(), summary.step, summary.seq), ("completed", None, 8));
    assert!(!store.has_timer(&id).await.unwrap());
    assert!(store.quiet_runs(Millis::MAX, 10).await.unwrap().is_empty(), "a finished run is never quiet");
    assert_eq!(
        store.list_runs(query(None, Some("completed"), None, 10)).await.unwrap().runs,
        std::slice::from_ref(&id)
    );
    assert!(store.list_runs(query(None, Some("running"), None, 10)).await.unwrap().runs.is_empty());

    // A run that fails ends the same way.
    let failing = definition("wf", 1, 1);
    let failed_id = create(&store, new_run(&failing, 2, 2_000, None)).await;
    let claimed = claim_one(&store, "a").await;
    let commit = work(&failing, &claimed, false, 2_010);
    let failed = commit.state.clone();
    assert_eq!(store.commit(commit).await.unwrap(), CommitOutcome::Applied { seq: 4 });
    let history = store.history(&failed_id).await.unwrap().unwrap();
    let kinds: Vec<&str> = history.iter().map(|l| l.recorded.transition.kind()).collect();
    assert_eq!(kinds, ["run_created", "step_started", "step_failed", "run_failed"]);
    assert_eq!(replayed(&history, &def), failed);
    assert!(store.summary(&failed_id).await.unwrap().unwrap().matches(&failed));
    assert_eq!(store.list_runs(query(None, Some("failed"), None, 10)).await.unwrap().runs, [failed_id]);
}

async fn late_commit_to_an_ended_run_is_gone(store: Arc<dyn Store>) {
    let def = definition("wf", 1, 1);
    let (id, state) = run_to_completion(&store, &def, 0, 1_000).await;
    let before = snapshot(&store, &id).await;
    let late = commit_of(&def, &id, &state, None, vec![Transition::RunCancelled { reason: "late".to_owned() }], 1_100);
    assert_eq!(store.commit(late).await.unwrap(), CommitOutcome::Gone);
    assert_eq!(snapshot(&store, &id).await, before);

    // A run cancelled while its step is leased: the executor's commit is gone, its lease acked.
    let other = new_run(&def, 0, 2_000, None);
    let pending = other.state.clone();
    let other_id = create(&store, other).await;
    let worked = claim_one(&store, "a").await;
    let cancel =
        commit_of(&def, &other_id, &pending, None, vec![Transition::RunCancelled { reason: "op".to_owned() }], 2_005);
    let cancelled = cancel.state.clone();
    assert_eq!(store.commit(cancel).await.unwrap(), CommitOutcome::Applied { seq: 2 });
    let before = snapshot(&store, &other_id).await;
    assert_eq!(store.commit(work(&def, &worked, true, 2_010)).await.unwrap(), CommitOutcome::Gone);
    assert_eq!(snapshot(&store, &other_id).await, before);
    assert_eq!(store.renew(std::slice::from_ref(&worked.lease)).await.unwrap(), std::slice::from_ref(&worked.lease));
    let history = store.history(&other_id).await.unwrap().unwrap();
    assert_eq!(replayed(&history, &def), cancelled);
    assert_eq!(store.list_runs(query(None, Some("cancelled"), None, 10)).await.unwrap().runs, [other_id]);

    // A run that does not exist is gone too.
    let nobody = RunId::new(0, 3_000);
    let timed_out = record(3_000, Transition::RunTimedOut);
    let ghost = Commit { records: vec![timed_out], ..timer_only(&nobody, &pending, None, true) };
    assert_eq!(store.commit(ghost).await.unwrap(), CommitOutcome::Gone);
    assert_eq!(snapshot(&store, &nobody).await, (None, None));
}

async fn timer_is_due_at_its_time_until_cleared(store: Arc<dyn Store>) {
    let def = definition("wf", 1, 3);
    let id = create(&store, new_run(&def, 1, 1_000, None)).await;
    let claimed = claim_one(&store, "a").await;
    let failed = work(&def, &claimed, false, 1_010);
    let due = failed.timer.expect("a failed attempt with attempts left sets a timer");
    assert_eq!(due, 2_010);
    let retrying = failed.state.clone();
    assert_eq!(store.commit(failed).await.unwrap(), CommitOutcome::Applied { seq: 3 });
    assert!(store.has_timer(&id).await.unwrap());
    assert!(store.due_timers(due - 1, 10).await.unwrap().is_empty(), "not due before its time");
    assert_eq!(store.due_timers(due, 10).await.unwrap(), std::slice::from_ref(&id));
    assert_eq!(store.due_timers(due + 1_000, 10).await.unwrap(), std::slice::from_ref(&id), "reading does not remove");
    assert!(store.due_timers(due, 0).await.unwrap().is_empty());
    assert!(nothing_claimable(&store, "a").await, "a retry waits for its timer");

    // A timer set again replaces the old one.
    assert_eq!(
        store.commit(timer_only(&id, &retrying, Some(5_000), false)).await.unwrap(),
        CommitOutcome::Applied { seq: 3 }
    );
    assert!(store.due_timers(4_999, 10).await.unwrap().is_empty(), "the old due time is gone");
    assert_eq!(store.due_timers(5_000, 10).await.unwrap(), std::slice::from_ref(&id));

    // `clear_timer` removes it.
    assert_eq!(store.commit(timer_only(&id, &retrying, None, true)).await.unwrap(), CommitOutcome::Applied { seq: 3 });
    assert!(!store.has_timer(&id).await.unwrap());
    assert!(store.due_timers(Millis::MAX, 10).await.unwrap().is_empty());
    assert_eq!(
        store.commit(timer_only(&id, &retrying, Some(due), false)).await.unwrap(),
        CommitOutcome::Applied { seq: 3 }
    );

    // Firing it: the commit clears it and queues the retry.
    let (step, attempt) = retrying.position().unwrap();
    let fired = commit_of(&def, &id, &retrying, None, vec![Transition::TimerFired { step, attempt }], due);
    assert!(fired.clear_timer && fired.timer.is_none());
    assert_eq!(store.commit(fired).await.unwrap(), CommitOutcome::Applied { seq: 4 });
    assert!(!store.has_timer(&id).await.unwrap());
    assert!(store.due_timers(Millis::MAX, 10).await.unwrap().is_empty());
    let retry = claim_one(&store, "a").await;
    let task = retry.task.as_ref().unwrap();
    assert_eq!((task.step, task.attempt), (0, 2));

    // A run that ends loses its timer, even when the commit does not say so.
    let failed = work(&def, &retry, false, due + 10);
    let retrying = failed.state.clone();
    store.commit(failed).await.unwrap();
    assert!(store.has_timer(&id).await.unwrap());
    let cancel =
        commit_of(&def, &id, &retrying, None, vec![Transition::RunCancelled { reason: "op".to_owned() }], due + 20);
    let cancel = Commit { clear_timer: false, ..cancel };
    store.commit(cancel).await.unwrap();
    assert!(!store.has_timer(&id).await.unwrap());
    assert!(store.due_timers(Millis::MAX, 10).await.unwrap().is_empty());
}

async fn due_timers_are_limited_per_shard(store: Arc<dyn Store>) {
    let def = definition("wf", 1, 1);
    let mut by_shard: Vec<(u16, RunId)> = Vec::new();
    for (n, (shard, due)) in
        [(0, 5_000), (0, 5_001), (0, 9_000), (1, 5_002), (2, 4_000), (2, 6_000)].into_iter().enumerate()
    {
        let new = new_run(&def, shard, 1_000 + n as u64, None);
        let state = new.state.clone();
        let id = create(&store, new).await;
        store.commit(timer_only(&id, &state, Some(due), false)).await.unwrap();
        by_shard.push((shard, id));
    }
    let due = store.due_timers(6_000, 1).await.unwrap();
    let mut shards: Vec<u16> = due.iter().map(|id| id.shard).collect();
    shards.sort_unstable();
    assert_eq!(shards, [0, 1, 2], "at most max = 1 per shard, and every shard with a due timer: {due:?}");
    // The earliest of each shard.
    assert!(due.contains(&by_shard[0].1) && due.contains(&by_shard[3].1) && due.contains(&by_shard[4].1), "{due:?}");

    let all = store.due_timers(6_000, 10).await.unwrap();
    let expected: BTreeSet<RunId> = [0, 1, 3, 4, 5].into_iter().map(|i| by_shard[i].1.clone()).collect();
    assert_eq!(all.into_iter().collect::<BTreeSet<_>>(), expected);
}

async fn quiet_runs_are_live_runs_not_updated_since(store: Arc<dyn Store>) {
    let def = definition("wf", 2, 1);
    // Shard 0: the oldest run is busy (worked at 5 000), a younger one is quiet.
    let busy = create(&store, new_run(&def, 0, 1_000, None)).await;
    let claimed = claim_one(&store, "a").await;
    assert_eq!(store.commit(work(&def, &claimed, true, 5_000)).await.unwrap(), CommitOutcome::Applied { seq: 3 });
    let quiet_young = create(&store, new_run(&def, 0, 1_500, None)).await;
    // Shard 1: three quiet runs, and one created after `before`.
    let mut shard1 = Vec::new();
    for now in [1_100, 1_200, 1_300] {
        shard1.push(create(&store, new_run(&def, 1, now, None)).await);
    }
    create(&store, new_run(&def, 1, 3_500, None)).await;
    // Shard 2: a run that ended long ago.
    let one = definition("wf", 1, 1);
    let ended = create(&store, new_run(&one, 2, 1_000, None)).await;
    let all = store.claim("z", 100, BLOCK).await.unwrap();
    let mine = all.iter().find(|c| c.task.as_ref().unwrap().run == ended.to_string()).expect("its step was claimed");
    assert_eq!(store.commit(work(&one, mine, true, 1_010)).await.unwrap(), CommitOutcome::Applied { seq: 4 });

    let quiet = store.quiet_runs(3_000, 2).await.unwrap();
    for (id, summary) in &quiet {
        assert_eq!(store.summary(id).await.unwrap().as_ref(), Some(summary));
        assert!(summary.updated_at < 3_000, "{summary:?}");
    }
    let ids: BTreeSet<RunId> = quiet.iter().map(|(id, _)| id.clone()).collect();
    assert!(!ids.contains(&busy), "a run updated since is not quiet");
    assert!(!ids.contains(&ended), "a finished run is not quiet");
    let expected: BTreeSet<RunId> = [quiet_young.clone(), shard1[0].clone(), shard1[1].clone()].into_iter().collect();
    assert_eq!(ids, expected, "at most max = 2 per shard, oldest first; a busy run does not hide a quiet one");

    let one = store.quiet_runs(3_000, 1).await.unwrap();
    let ids: BTreeSet<RunId> = one.into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, [quiet_young, shard1[0].clone()].into_iter().collect(), "max = 1 per shard");
    assert!(store.quiet_runs(1_000, 10).await.unwrap().is_empty(), "nothing was quiet before 1 000");
    assert!(store.quiet_runs(3_000, 0).await.unwrap().is_empty());
}

async fn dispatch_exists_while_queued_or_leased(store: Arc<dyn Store>) {
    let def = definition("wf", 1, 1);
    let id = create(&store, new_run(&def, 2, 1_000, None)).await;
    let entry = store.summary(&id).await.unwrap().unwrap().ready_entries.last().cloned().unwrap();
    assert!(store.dispatch_exists(&id, &entry).await.unwrap(), "queued");
    let claimed = claim_one(&store, "a").await;
    assert!(store.dispatch_exists(&id, &entry).await.unwrap(), "pending under a lease");
    age().await;
    let taken = store.reclaim("b", Duration::ZERO, 10).await.unwrap();
    assert_eq!(taken.len(), 1);
    assert!(store.dispatch_exists(&id, &entry).await.unwrap(), "pending under the new lease");
    store.ack(&claimed.lease).await.unwrap();
    assert!(store.dispatch_exists(&id, &entry).await.unwrap(), "a lost lease does not ack");
    store.ack(&taken[0].lease).await.unwrap();
    assert!(!store.dispatch_exists(&id, &entry).await.unwrap(), "acked: neither queued nor pending");

    // What the sweeper does for such a run: re-queue it from its state, at the same seq.
    let state = replayed(&store.history(&id).await.unwrap().unwrap(), &def);
    let again = Commit { dispatch: vec![Dispatch { step: 0, attempt: 1 }], ..timer_only(&id, &state, None, false) };
    assert_eq!(store.commit(again).await.unwrap(), CommitOutcome::Applied { seq: 1 });
    let requeued = store.summary(&id).await.unwrap().unwrap().ready_entries.last().cloned().unwrap();
    assert_ne!(requeued, entry);
    assert!(store.dispatch_exists(&id, &requeued).await.unwrap());
    assert!(!store.dispatch_exists(&id, &entry).await.unwrap());
    assert_eq!(store.history(&id).await.unwrap().unwrap().len(), 1);
    let claimed = claim_one(&store, "c").await;
    assert_eq!(claimed.lease.entry, requeued);

    // Entries of another shard, and ids never handed out, do not exist.
    let other = RunId::new(3, 1_000);
    assert!(!store.dispatch_exists(&other, &requeued).await.unwrap(), "entries are per shard");
    assert!(!store.dispatch_exists(&id, "99999999999999-0").await.unwrap());
}

/// Issue 8: the sweeper's re-queue is refused while the run's entry is queued or leased (its
/// first look came from reads that were not one snapshot), and applies once the entry is gone;
/// it never adds a second entry beside a live one.
async fn requeue_loses_to_a_live_entry(store: Arc<dyn Store>) {
    let def = definition("wf", 1, 1);
    let id = create(&store, new_run(&def, 2, 1_000, None)).await;
    let entry = store.summary(&id).await.unwrap().unwrap().ready_entries.last().cloned().unwrap();
    let state = replayed(&store.history(&id).await.unwrap().unwrap(), &def);
    let requeue = Commit { dispatch: vec![Dispatch { step: 0, attempt: 1 }], ..timer_only(&id, &state, None, false) };

    assert_eq!(store.requeue(requeue.clone()).await.unwrap(), CommitOutcome::Stale, "queued: refused");
    let claimed = claim_one(&store, "a").await;
    assert_eq!(claimed.lease.entry, entry);
    assert_eq!(store.requeue(requeue.clone()).await.unwrap(), CommitOutcome::Stale, "leased: refused");
    assert!(nothing_claimable(&store, "b").await, "a refused re-queue queues nothing");
    assert_eq!(
        store.summary(&id).await.unwrap().unwrap().ready_entries.last().map(String::as_str),
        Some(entry.as_str())
    );

    // The entry acknowledged without a transition (its work lost): now the run is an orphan.
    store.ack(&claimed.lease).await.unwrap();
    assert_eq!(store.requeue(requeue.clone()).await.unwrap(), CommitOutcome::Applied { seq: 1 });
    let requeued = store.summary(&id).await.unwrap().unwrap().ready_entries.last().cloned().unwrap();
    assert_ne!(requeued, entry);
    // A second sweeper with the same view loses to the entry the first one queued.
    assert_eq!(store.requeue(requeue.clone()).await.unwrap(), CommitOutcome::Stale, "re-queued already");
    let claimed = claim_one(&store, "c").await;
    assert_eq!(claimed.lease.entry, requeued);
    assert!(nothing_claimable(&store, "c").await, "one entry, not two");
    // A re-queue computed from an older seq is stale as any commit is.
    let behind = Commit { expected_seq: 0, ..requeue };
    store.ack(&claimed.lease).await.unwrap();
    assert_eq!(store.requeue(behind).await.unwrap(), CommitOutcome::Stale);
}

async fn runs_are_listed_newest_first_in_pages(store: Arc<dyn Store>) {
    let (a, b) = (definition("alpha", 1, 1), definition("beta", 1, 1));
    let shards = store.shards();
    // (workflow, shard, created at): ties in time on different shards on purpose.
    let mut runs: Vec<(String, Millis, RunId)> = Vec::new();
    for n in 0..24u64 {
        let def = if n % 3 == 0 { &b } else { &a };
        let now = 10_000 + (n / 2) * 1_000;
        let shard = ((n * 7) % u64::from(shards)) as u16;
        let id = create(&store, new_run(def, shard, now, None)).await;
        runs.push((def.id.clone(), now, id));
    }
    // Newest first; equal times by run id, descending.
    runs.sort_by_key(|(_, at, id)| std::cmp::Reverse((*at, id.to_string())));
    let newest_first = |workflow: Option<&str>| -> Vec<RunId> {
        runs.iter().filter(|(w, _, _)| workflow.is_none_or(|wf| wf == w)).map(|(_, _, id)| id.clone()).collect()
    };

    for workflow in [None, Some("alpha"), Some("beta")] {
        let expected = newest_first(workflow);
        assert_eq!(store.list_runs(query(workflow, None, None, 100)).await.unwrap().runs, expected, "{workflow:?}");
        let mut paged = Vec::new();
        let mut cursor: Option<RunId> = None;
        for _ in 0..30 {
            let page = store.list_runs(query(workflow, None, cursor.as_ref(), 5)).await.unwrap().runs;
            assert!(page.len() <= 5);
            if page.is_empty() {
                break;
            }
            cursor = page.last().cloned();
            paged.extend(page);
        }
        assert_eq!(paged, expected, "pages of 5 of {workflow:?}");
    }
    assert!(store.list_runs(query(Some("gamma"), None, None, 10)).await.unwrap().runs.is_empty());
    assert!(store.list_runs(query(None, None, None, 0)).await.unwrap().runs.is_empty());

    // Status filter: finish the newest alpha run.
    let newest_alpha = newest_first(Some("alpha"))[0].clone();
    let claimed = store.claim("a", 100, BLOCK).await.unwrap();
    assert_eq!(claimed.len(), runs.len(), "claim(max = 100) reads every shard");
    let mine = claimed.iter().find(|c| c.task.as_ref().unwrap().run == newest_alpha.to_string()).unwrap();
    assert!(matches!(store.commit(work(&a, mine, true, 50_000)).await.unwrap(), CommitOutcome::Applied { .. }));
    assert_eq!(
        store.list_runs(query(Some("alpha"), Some("completed"), None, 10)).await.unwrap().runs,
        std::slice::from_ref(&newest_alpha)
    );
    assert!(store.list_runs(query(Some("beta"), Some("completed"), None, 10)).await.unwrap().runs.is_empty());
    let pending: Vec<RunId> = newest_first(Some("alpha")).into_iter().skip(1).take(3).collect();
    assert_eq!(store.list_runs(query(Some("alpha"), Some("pending"), None, 3)).await.unwrap().runs, pending);
    let rest = store.list_runs(query(Some("alpha"), Some("pending"), pending.last(), 100)).await.unwrap().runs;
    assert_eq!(rest, newest_first(Some("alpha")).into_iter().skip(4).collect::<Vec<_>>());
    // Every status: live and finished runs together, in one order, page by page.
    let mut paged = Vec::new();
    let mut cursor: Option<RunId> = None;
    for _ in 0..30 {
        let page = store.list_runs(query(None, None, cursor.as_ref(), 7)).await.unwrap().runs;
        if page.is_empty() {
            break;
        }
        cursor = page.last().cloned();
        paged.extend(page);
    }
    assert_eq!(paged, newest_first(None), "a finished run keeps its place among the live ones");
}

async fn housekeeping_expires_old_finished_runs(store: Arc<dyn Store>) {
    let def = definition("wf", 1, 1);
    let two = definition("wf", 2, 1);
    let (old, _) = run_to_completion(&store, &def, 0, 1_000).await; // ended at 1 010
    let (recent, _) = run_to_completion(&store, &def, 1, 2_000).await; // ended at 2 010
    // A live run with its step leased, and one with its step queued.
    let leased_id = create(&store, new_run(&two, 2, 1_000, None)).await;
    let leased = claim_one(&store, "a").await;
    let queued_id = create(&store, new_run(&def, 3, 1_000, None)).await;
    let queued_entry = store.summary(&queued_id).await.unwrap().unwrap().ready_entries.last().cloned().unwrap();

    let report = store.housekeeping(1_010).await.unwrap();
    assert_eq!(report.expired_runs, 0, "a run that ended at the retention time is kept");
    assert!(store.summary(&old).await.unwrap().is_some());

    let report = store.housekeeping(2_000).await.unwrap();
    assert_eq!(report.expired_runs, 1);
    assert_eq!(snapshot(&store, &old).await, (None, None), "history and summary are gone");
    assert!(store.summary(&recent).await.unwrap().is_some());
    assert_eq!(store.history(&recent).await.unwrap().unwrap().len(), 4);
    assert_eq!(
        store.list_runs(query(None, Some("completed"), None, 10)).await.unwrap().runs,
        std::slice::from_ref(&recent)
    );
    let listed = store.list_runs(query(Some("wf"), None, None, 10)).await.unwrap().runs;
    assert!(!listed.contains(&old) && listed.contains(&recent) && listed.contains(&leased_id), "{listed:?}");

    // Live runs are never expired, and their queued and leased entries stay.
    let report = store.housekeeping(Millis::MAX).await.unwrap();
    assert_eq!(report.expired_runs, 1, "only the recent finished run");
    assert_eq!(snapshot(&store, &recent).await, (None, None));
    for live in [&leased_id, &queued_id] {
        assert!(store.summary(live).await.unwrap().is_some());
    }
    assert!(store.dispatch_exists(&queued_id, &queued_entry).await.unwrap(), "a queued entry stays");
    assert!(store.dispatch_exists(&leased_id, &leased.lease.entry).await.unwrap(), "a leased entry stays");
    assert!(store.renew(std::slice::from_ref(&leased.lease)).await.unwrap().is_empty());
    assert_eq!(store.commit(work(&two, &leased, true, 3_000)).await.unwrap(), CommitOutcome::Applied { seq: 3 });
    let mut runs: Vec<String> =
        store.claim("b", 10, BLOCK).await.unwrap().into_iter().map(|c| c.task.unwrap().run).collect();
    runs.sort();
    let mut expected = vec![leased_id.to_string(), queued_id.to_string()];
    expected.sort();
    assert_eq!(runs, expected, "the queued step and the leased run's next step are claimable");
    assert_eq!(store.housekeeping(Millis::MAX).await.unwrap().expired_runs, 0);
}

async fn runs_are_found_by_their_input_values(store: Arc<dyn Store>) {
    let toml = "[[workflow]]\nid = \"wf\"\nsearch = [\"user\", \"order\"]\n[[workflow.step]]\nid = \"s0\"\naction = \"noop\"\n";
    let def = Registry::parse("search.toml", toml).unwrap().get("wf").unwrap().def.clone();
    let shards = store.shards();
    // (user, created at, id), across shards, two runs per millisecond.
    let mut runs: Vec<(u64, Millis, RunId)> = Vec::new();
    for n in 0..18u64 {
        let now = 10_000 + (n / 2) * 1_000;
        let input = serde_json::json!({ "user": n % 3, "order": format!("o-{n}"), "note": { "nested": true } });
        let search = def.search_values(&input);
        assert_eq!(search, [("user".to_owned(), (n % 3).to_string()), ("order".to_owned(), format!("o-{n}"))]);
        let shard = ((n * 5) % u64::from(shards)) as u16;
        let id = create(&store, NewRun { search, ..new_run(&def, shard, now, None) }).await;
        runs.push((n % 3, now, id));
    }
    runs.sort_by_key(|(_, at, id)| std::cmp::Reverse((*at, id.to_string())));
    let of_user =
        |user: u64| -> Vec<RunId> { runs.iter().filter(|(u, _, _)| *u == user).map(|(_, _, id)| id.clone()).collect() };
    for user in 0..3 {
        let expected = of_user(user);
        let found = store.search_runs(search("wf", "user", &user.to_string(), None, 100)).await.unwrap().runs;
        assert_eq!(found, expected, "user {user}, newest first");
        let mut paged = Vec::new();
        let mut cursor: Option<RunId> = None;
        for _ in 0..10 {
            let page =
                store.search_runs(search("wf", "user", &user.to_string(), cursor.as_ref(), 2)).await.unwrap().runs;
            if page.is_empty() {
                break;
            }
            cursor = page.last().cloned();
            paged.extend(page);
        }
        assert_eq!(paged, expected, "user {user} in pages of 2");
    }
    let seventh = store.search_runs(search("wf", "order", "o-7", None, 10)).await.unwrap().runs;
    assert_eq!(seventh.len(), 1);
    for (workflow, field, value) in
        [("wf", "user", "3"), ("wf", "note", "true"), ("other", "user", "1"), ("wf", "order", "o-")]
    {
        assert!(
            store.search_runs(search(workflow, field, value, None, 10)).await.unwrap().runs.is_empty(),
            "{field}={value}"
        );
    }

    // The summary keeps the values through the run's commits; expiry takes it out of the index.
    let (_, _, newest) = runs[0].clone();
    let claimed = store.claim("a", 100, BLOCK).await.unwrap();
    let mine = claimed.iter().find(|c| c.task.as_ref().unwrap().run == newest.to_string()).unwrap();
    let commit = work(&def, mine, true, 30_000);
    assert!(matches!(store.commit(commit).await.unwrap(), CommitOutcome::Applied { .. }));
    let summary = store.summary(&newest).await.unwrap().unwrap();
    assert_eq!((summary.status.name(), summary.search.len()), ("completed", 2), "{summary:?}");
    assert_eq!(store.housekeeping(Millis::MAX).await.unwrap().expired_runs, 1);
    let user = runs[0].0;
    assert_eq!(
        store.search_runs(search("wf", "user", &user.to_string(), None, 100)).await.unwrap().runs,
        of_user(user)[1..]
    );
}

async fn definitions_are_found_by_hash(store: Arc<dyn Store>) {
    let first = Arc::new(Workflow::new(definition("alpha", 2, 3)));
    let second = Arc::new(Workflow::new(definition("beta", 1, 1)));
    assert_ne!(first.hash, second.hash);
    store.save_definitions(&[Arc::clone(&first), Arc::clone(&second)]).await.unwrap();
    for shard in 0..store.shards() {
        assert_eq!(store.load_definition(shard, &first.hash).await.unwrap().as_ref(), Some(&*first), "shard {shard}");
        assert_eq!(store.load_definition(shard, &second.hash).await.unwrap().as_ref(), Some(&*second));
    }
    assert_eq!(store.load_definition(0, "0000000000000000").await.unwrap(), None);
    // Saving again is harmless; an edited workflow is another hash, and the old one stays.
    let edited = Arc::new(Workflow::new(definition("alpha", 3, 3)));
    assert_ne!(edited.hash, first.hash);
    store.save_definitions(&[Arc::clone(&first), Arc::clone(&edited)]).await.unwrap();
    assert_eq!(store.load_definition(3, &first.hash).await.unwrap().as_ref(), Some(&*first));
    assert_eq!(store.load_definition(3, &edited.hash).await.unwrap().as_ref(), Some(&*edited));
}

// ---------------------------------------------------------------------------------------------
// What only the Redis store does, checked on its keys.

/// The shard count is the data's: the first connection records it, and a store with another
/// count is refused, naming both; data of a build that did not record it is refused when a ready
/// stream of a shard beyond the count exists. Without a count asked for (`SHARDS` unset), the data's is used;
/// for new data on a standalone Redis, one.
#[test]
fn redis_refuses_a_shard_count_other_than_the_datas() {
    let server = RedisServer::start();
    run(async {
        let refusal = |result: Result<RedisStore, StoreError>| match result {
            Err(StoreError::Fatal(message)) => message,
            Err(other) => panic!("refused as fatal, not {other}"),
            Ok(_) => panic!("a store with another shard count must be refused"),
        };
        let url = server.url();
        RedisStore::connect(&url, "wfo", 4).await.expect("the first connection records its count");
        assert_eq!(server.cli(&["GET", "wfo:shards"]).trim(), "4");
        RedisStore::connect(&url, "wfo", 4).await.expect("the same count again");
        let message = refusal(RedisStore::connect(&url, "wfo", 16).await);
        assert!(message.contains("SHARDS=16") && message.contains("set SHARDS=4"), "{message}");

        // Data of an earlier build, without the record: a ready stream on shard 9.
        server.cli(&["XADD", "old:{9}:ready", "*", "run", "x"]);
        let message = refusal(RedisStore::connect(&url, "old", 4).await);
        assert!(message.contains("shard 9") && message.contains("at least 10"), "{message}");
        assert_eq!(server.cli(&["EXISTS", "old:shards"]).trim(), "0", "nothing recorded when refused");
        RedisStore::connect(&url, "old", 16).await.expect("the count it was written with");
        assert_eq!(server.cli(&["GET", "old:shards"]).trim(), "16");

        // No count asked for (`SHARDS` unset): the data's.
        assert_eq!(RedisStore::open(&url, "wfo", None).await.unwrap().keys().shards(), 4, "the recorded count");
        server.cli(&["XADD", "older:{15}:ready", "*", "run", "x"]);
        let older = RedisStore::open(&url, "older", None).await.unwrap();
        assert_eq!(older.keys().shards(), 16, "data of a build that did not record it: that build's default");
        assert_eq!(server.cli(&["GET", "older:shards"]).trim(), "16");
        // New data on a standalone Redis: one shard, recorded.
        assert_eq!(RedisStore::open(&url, "new", None).await.unwrap().keys().shards(), 1);
        assert_eq!(server.cli(&["GET", "new:shards"]).trim(), "1");
    });
}

/// A creation resent after a lost reply (the client's retry on a reconnect) finds its run there:
/// the run is reported created, not a duplicate of itself, and nothing is written twice (one
/// record, one ready entry), with or without an idempotency key.
#[test]
fn redis_a_resent_creation_writes_nothing_twice() {
    let server = RedisServer::start();
    run(async {
        let store = redis_store(&server, 4).await;
        let def = definition("wf", 1, 1);
        let key = "api:resent";
        let keyed = new_run(&def, shard_of(key, 4), 1_000, Some((key, Duration::from_secs(60))));
        let plain = new_run(&def, 0, 1_001, None);
        let ids = [keyed.run.clone(), plain.run.clone()];
        let created = vec![Created::New(ids[0].clone()), Created::New(ids[1].clone())];
        assert_eq!(store.create_runs(vec![keyed.clone(), plain.clone()]).await.unwrap(), created);
        assert_eq!(store.create_runs(vec![keyed, plain]).await.unwrap(), created, "the resend");
        for id in &ids {
            let (summary, history) = snapshot(&store, id).await;
            assert_eq!(summary.expect("created").seq, 1, "{id}");
            assert_eq!(history.expect("its log").len(), 1, "one record: {id}");
        }
        claim_exactly(&store, "a", 2).await;
        assert!(nothing_claimable(&store, "b").await, "one ready entry each, and no other");
    });
}

/// A run's log is one list, its length the run's seq, kept as it is when the run ends; schema 1's
/// keys are never written.
#[test]
fn redis_keeps_a_runs_log_as_a_list() {
    let server = RedisServer::start();
    run(async {
        let store = redis_store(&server, 4).await;
        let def = definition("wf", 2, 1);
        let live = create(&store, new_run(&def, 1, 500, None)).await;
        let live_log = format!("wfo:{{1}}:runlog:{live}");
        assert_eq!(server.cli(&["TYPE", &live_log]).trim(), "list", "a run's log is a list");
        assert_eq!(server.cli(&["LLEN", &live_log]).trim(), "1");
        let _ = store.claim("a", 10, BLOCK).await.unwrap();

        let (id, state) = run_to_completion(&store, &def, 1, 1_000).await;
        let log = format!("wfo:{{1}}:runlog:{id}");
        assert_eq!(server.cli(&["LLEN", &log]).trim(), "6", "the whole log stays, one record per seq");
        assert_eq!(server.cli(&["HGET", &format!("wfo:{{1}}:run:{id}"), "seq"]).trim(), "6");
        for old in [format!("wfo:{{1}}:log:{id}"), format!("wfo:{{1}}:hist:{id}")] {
            assert_eq!(server.cli(&["EXISTS", &old]).trim(), "0", "{old}");
        }
        let history = store.history(&id).await.unwrap().unwrap();
        assert_eq!(history.len(), 6);
        assert_eq!(replayed(&history, &def), state);
        assert_eq!(server.cli(&["GET", "wfo:schema"]).trim(), "2");
    });
}

/// A step's commit whose lease is its run's only live entry reads nothing of the run: its seq
/// is checked by the length its log's `RPUSH` returns. Refused, it leaves no record behind: a
/// run that moved on keeps its log, a run deleted meanwhile gets no log made anew.
#[test]
fn redis_checks_a_lone_steps_commit_by_its_logs_length() {
    let server = RedisServer::start();
    run(async {
        let store = redis_store(&server, 4).await;
        let def = definition("wf", 3, 1);
        let reads = || {
            let stats = server.cli(&["INFO", "commandstats"]);
            stats
                .lines()
                .find_map(|line| line.strip_prefix("cmdstat_hmget:calls="))
                .and_then(|rest| rest.split(',').next())
                .map_or(0, |calls| calls.parse::<u64>().unwrap())
        };
        let id = create(&store, new_run(&def, 1, 1_000, None)).await;
        let claimed = claim_one(&store, "a").await;
        let before = reads();
        assert_eq!(store.commit(work(&def, &claimed, true, 1_010)).await.unwrap(), CommitOutcome::Applied { seq: 3 });
        assert_eq!(reads(), before, "no read of the run");
        assert_eq!(replayed(&store.history(&id).await.unwrap().unwrap(), &def).seq, 3);

        // The run moves on under the next step's executor (a record appended elsewhere): its
        // commit is stale, and the log keeps exactly what it had.
        let next = claim_one(&store, "a").await;
        let state = next.task.as_ref().unwrap().state.clone();
        let (step, attempt) = state.position().unwrap();
        let moved = commit_of(&def, &id, &state, None, vec![Transition::StepStarted { step, attempt }], 1_020);
        assert_eq!(store.commit(moved).await.unwrap(), CommitOutcome::Applied { seq: 4 });
        let log = format!("wfo:{{1}}:runlog:{id}");
        assert_eq!(store.commit(work(&def, &next, true, 1_030)).await.unwrap(), CommitOutcome::Stale);
        assert_eq!(server.cli(&["LLEN", &log]).trim(), "4");
        assert!(store.dispatch_exists(&id, &next.lease.entry).await.unwrap(), "a stale commit acks nothing");

        // Deleted while its step ran: gone, its entry done with, and no log made anew.
        for key in [format!("wfo:{{1}}:run:{id}"), log.clone()] {
            server.cli(&["DEL", &key]);
        }
        assert_eq!(store.commit(work(&def, &next, true, 1_040)).await.unwrap(), CommitOutcome::Gone);
        assert_eq!(server.cli(&["EXISTS", &log]).trim(), "0");
        assert!(!store.dispatch_exists(&id, &next.lease.entry).await.unwrap(), "a gone run's entry is done");
    });
}

/// Redis that lost the library (restarted without persistence, or flushed): the next call
/// reinstalls it and is sent again, built anew: a step's commit, which claims the next step in
/// the same call, and a creation.
#[test]
fn redis_reinstalls_a_lost_library_and_sends_the_call_again() {
    let server = RedisServer::start();
    run(async {
        let store = redis_store(&server, 4).await;
        let def = definition("wf", 2, 1);
        let first = create(&store, new_run(&def, 2, 1_000, None)).await;
        let second = create(&store, new_run(&def, 2, 1_001, None)).await;
        let claimed = claim_exactly(&store, "a", 1).await;
        assert_eq!(claimed[0].task.as_ref().unwrap().run, first.to_string());

        assert_eq!(server.cli(&["FUNCTION", "FLUSH"]).trim(), "OK");
        let committed = store
            .commit_steps(vec![StepCommit { commit: work(&def, &claimed[0], true, 1_010), claim_next: true }])
            .await
            .unwrap();
        assert_eq!(committed[0].outcome, CommitOutcome::Applied { seq: 3 });
        let next = committed[0].next.as_ref().expect("the second run's step, claimed in the call sent again");
        assert_eq!(next.task.as_ref().unwrap().run, second.to_string());
        assert!(server.cli(&["FUNCTION", "LIST"]).contains("wfo_v2"), "the library is back");

        assert_eq!(server.cli(&["FUNCTION", "FLUSH"]).trim(), "OK");
        let third = create(&store, new_run(&def, 2, 1_002, None)).await;
        assert_eq!(store.history(&third).await.unwrap().map(|h| h.len()), Some(1), "created once");
        assert_eq!(store.history(&first).await.unwrap().map(|h| h.len()), Some(3), "committed once");
    });
}

/// The runs each event started are kept per second of the bus, one hash for a batch of events
/// (not a key per event), expiring `retention` after their second; records of an earlier build
/// (a key per event) are still listed.
#[test]
fn redis_records_the_runs_events_started_per_second() {
    let server = RedisServer::start();
    run(async {
        let store = redis_store(&server, 4).await;
        let cap = EntryCap { max_bytes: 1 << 20, keep_bytes: 1 << 20 };
        let mut ids = Vec::new();
        for _ in 0..3 {
            ids.push(store.publish_event(&[("type", b"a.b")]).await.unwrap());
        }
        let read = store.read_events("router", 10, BLOCK, cap).await.unwrap();
        assert_eq!(read.len(), 3);
        let started = |run: &str| vec![("wf".to_owned(), run.to_owned())];
        let settled: Vec<SettledEvent> = ids[..2]
            .iter()
            .enumerate()
            .map(|(i, id)| SettledEvent { id: id.clone(), started: started(&format!("run-{i}")) })
            .collect();
        let before = server.cli(&["DBSIZE"]).trim().parse::<u64>().unwrap();
        store.settle_events(&settled, Duration::from_secs(3600)).await.unwrap();
        let seconds: std::collections::BTreeSet<u64> =
            ids[..2].iter().map(|id| id.split_once('-').unwrap().0.parse::<u64>().unwrap() / 1000).collect();
        let after = server.cli(&["DBSIZE"]).trim().parse::<u64>().unwrap();
        assert_eq!(after - before, seconds.len() as u64, "one key per second of the events, not one per event");
        for second in &seconds {
            let key = format!("wfo:events:runs-at:{second}");
            assert_eq!(server.cli(&["TYPE", &key]).trim(), "hash");
            let ttl = server.cli(&["TTL", &key]);
            let ttl: u64 = ttl.trim().parse().unwrap_or_else(|_| panic!("TTL {key}: {ttl:?}"));
            assert!((3590..=3601).contains(&ttl), "expires the retention after its second: {ttl} s");
        }
        // The third event, settled by an earlier build: its record is a key of its own.
        server.cli(&[
            "SET",
            &format!("wfo:events:runs:{}", ids[2]),
            r#"[{"workflowId":"wf","runId":"old"}]"#,
            "EX",
            "60",
        ]);
        store
            .settle_events(&[SettledEvent { id: ids[2].clone(), started: vec![] }], Duration::from_secs(3600))
            .await
            .unwrap();
        let listed = store.recent_events(events(None, None, 10, 100, cap)).await.unwrap();
        let runs: Vec<_> = listed.iter().map(|l| (l.entry.id.clone(), l.started.clone())).collect();
        assert_eq!(
            runs,
            [
                (ids[2].clone(), Some(started("old"))),
                (ids[1].clone(), Some(started("run-1"))),
                (ids[0].clone(), Some(started("run-0"))),
            ]
        );
    });
}

/// Redis holding schema 1's data (a live run mid-way, its log a stream, its next step queued; a
/// finished run, its log compacted into one string), then this version: the data is upgraded at
/// connection, schema 1's library is removed, both histories read as before, and the live run
/// goes on from where it was.
#[test]
fn redis_upgrades_schema_1_data_in_place() {
    use fred::prelude::{ClientLike, Config};
    use fred::types::{CustomCommand, Value};
    use workflow_orchestrator::store::ReadyTask;
    use workflow_orchestrator::store::codec::{encode_recorded, encode_task, summary_fields};

    let server = RedisServer::start();
    run(async {
        // The two runs, made by the machine on a memory store: their records are what schema 1
        // held.
        let def = definition("wf", 3, 1);
        let memory = memory_store(4);
        let (done, done_state) = run_to_completion(&memory, &def, 1, 1_000).await;
        let done_log: Vec<Recorded> =
            memory.history(&done).await.unwrap().unwrap().into_iter().map(|l| l.recorded).collect();
        let live = create(&memory, new_run(&def, 2, 2_000, None)).await;
        let first = claim_one(&memory, "a").await;
        let step_one = work(&def, &first, true, 2_010);
        let live_state = step_one.state.clone();
        assert_eq!(memory.commit(step_one).await.unwrap(), CommitOutcome::Applied { seq: 3 });
        let live_log: Vec<Recorded> =
            memory.history(&live).await.unwrap().unwrap().into_iter().map(|l| l.recorded).collect();

        // Written in schema 1's shape, as its library wrote them.
        let client = fred::prelude::Client::new(Config::from_url(&server.url()).unwrap(), None, None, None);
        client.init().await.unwrap();
        let call = |args: Vec<Value>| {
            let client = client.clone();
            async move {
                let name = args[0].as_str().unwrap().into_owned();
                let rest = args[1..].to_vec();
                let reply: Value = client.custom(CustomCommand::new(name, None::<u16>, false), rest).await.unwrap();
                reply
            }
        };
        let bytes = |b: Vec<u8>| Value::Bytes(b.into());
        call(vec!["FUNCTION".into(), "LOAD".into(), include_str!("../migrations/001_wfo_v1.lua").into()]).await;
        call(vec!["SET".into(), "wfo:schema".into(), "1".into()]).await;
        let mut blob = Vec::new();
        for recorded in &done_log {
            blob.extend(encode_recorded(recorded));
        }
        call(vec!["SET".into(), format!("wfo:{{1}}:hist:{done}").into(), bytes(blob)]).await;
        let mut hset = vec!["HSET".into(), format!("wfo:{{1}}:run:{done}").into()];
        for (name, value) in summary_fields(&RunSummary::of(&done_state)) {
            hset.extend([name.into(), value.into()]);
        }
        call(hset).await;
        call(vec!["ZADD".into(), "wfo:{1}:idx:st:completed".into(), "1000".into(), done.to_string().into()]).await;
        for (i, recorded) in live_log.iter().enumerate() {
            let id = format!("{}-0", i + 1);
            call(vec![
                "XADD".into(),
                format!("wfo:{{2}}:log:{live}").into(),
                id.into(),
                "type".into(),
                recorded.transition.kind().into(),
                "data".into(),
                bytes(encode_recorded(recorded)),
            ])
            .await;
        }
        let (step, attempt) = live_state.position().expect("a live run's step");
        let task = ReadyTask { run: live.to_string(), step, attempt, state: live_state.clone() };
        let entry = call(vec![
            "XADD".into(),
            "wfo:{2}:ready".into(),
            "*".into(),
            "run".into(),
            live.to_string().into(),
            "data".into(),
            bytes(encode_task(&task.run, Dispatch { step, attempt }, &task.state)),
        ])
        .await;
        let mut hset = vec!["HSET".into(), format!("wfo:{{2}}:run:{live}").into()];
        for (name, value) in summary_fields(&RunSummary::of(&live_state)) {
            hset.extend([name.into(), value.into()]);
        }
        hset.extend(["ready_entry".into(), entry]);
        call(hset).await;
        call(vec!["ZADD".into(), "wfo:{2}:idx:active".into(), "2000".into(), live.to_string().into()]).await;

        // This version connects: upgraded.
        let store = redis_store(&server, 4).await;
        assert_eq!(server.cli(&["GET", "wfo:schema"]).trim(), "2");
        assert!(!server.cli(&["FUNCTION", "LIST"]).contains("wfo_v1"), "schema 1's library is gone");
        for old in [format!("wfo:{{1}}:hist:{done}"), format!("wfo:{{2}}:log:{live}")] {
            assert_eq!(server.cli(&["EXISTS", &old]).trim(), "0", "{old}");
        }
        let records = |history: Vec<Logged>| history.into_iter().map(|l| l.recorded).collect::<Vec<_>>();
        assert_eq!(records(store.history(&done).await.unwrap().unwrap()), done_log);
        assert_eq!(records(store.history(&live).await.unwrap().unwrap()), live_log);
        assert!(store.summary(&done).await.unwrap().unwrap().matches(&done_state));

        // The live run's queued step is worked and the run completes, its seqs continuing.
        let mut at = 3_000;
        loop {
            let claimed = claim_one(&store, "a").await;
            assert_eq!(claimed.task.as_ref().unwrap().run, live.to_string());
            at += 10;
            let commit = work(&def, &claimed, true, at);
            let state = commit.state.clone();
            let seq = commit.expected_seq + commit.records.len() as u64;
            assert_eq!(store.commit(commit).await.unwrap(), CommitOutcome::Applied { seq });
            if state.status.is_terminal() {
                let history = store.history(&live).await.unwrap().unwrap();
                assert_eq!(history.iter().map(|l| l.seq).collect::<Vec<_>>(), (1..=seq).collect::<Vec<u64>>());
                assert_eq!(replayed(&history, &def), state);
                break;
            }
        }
        // A second connection (another replica, a restart) finds nothing left to upgrade.
        let again = redis_store(&server, 4).await;
        assert_eq!(records(again.history(&done).await.unwrap().unwrap()), done_log);
    });
}

// ---------------------------------------------------------------------------------------------
// Replica heartbeats.

fn beat(id: &str, busy: u64) -> ReplicaBeat {
    ReplicaBeat {
        id: id.to_owned(),
        version: "0.1.0".to_owned(),
        executors_busy: busy,
        executors_total: 32,
        started_at: 1_000,
        last_seen: 2_000 + busy,
    }
}

async fn replicas_are_listed_while_their_heartbeat_lives(store: Arc<dyn Store>) {
    assert_eq!(store.replicas().await.unwrap(), Vec::<ReplicaBeat>::new(), "no replica has beaten yet");
    store.heartbeat(&beat("replica-b:0002", 1), Duration::from_secs(300)).await.unwrap();
    store.heartbeat(&beat("replica-a:0001", 0), Duration::from_secs(300)).await.unwrap();
    store.heartbeat(&beat("short-lived:0003", 0), Duration::from_millis(300)).await.unwrap();
    let listed = store.replicas().await.unwrap();
    assert_eq!(listed, vec![beat("replica-a:0001", 0), beat("replica-b:0002", 1), beat("short-lived:0003", 0)]);

    // A new beat replaces the last one.
    store.heartbeat(&beat("replica-a:0001", 5), Duration::from_secs(300)).await.unwrap();
    // A replica that stops beating is no longer listed once its time-to-live has run out.
    let expired = async {
        for _ in 0..100 {
            let listed = store.replicas().await.unwrap();
            if listed.len() == 2 {
                return listed;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the short-lived heartbeat never expired: {:?}", store.replicas().await.unwrap());
    };
    assert_eq!(expired.await, vec![beat("replica-a:0001", 5), beat("replica-b:0002", 1)]);

    // A replica that leaves takes its beat back.
    store.forget_replica("replica-b:0002").await.unwrap();
    assert_eq!(store.replicas().await.unwrap(), vec![beat("replica-a:0001", 5)]);
    // And comes back with its next beat.
    store.heartbeat(&beat("replica-b:0002", 2), Duration::from_secs(300)).await.unwrap();
    assert_eq!(store.replicas().await.unwrap(), vec![beat("replica-a:0001", 5), beat("replica-b:0002", 2)]);
}

// ---------------------------------------------------------------------------------------------
// The store's other concerns: schedules, waits, values, the bus, reopening, counts, the backend.

async fn schedules_keep_the_last_fire_the_last_run_and_the_buffered_fire(store: Arc<dyn Store>) {
    assert_eq!(store.cron_state("nightly").await.unwrap(), CronState::default(), "never fired");
    assert!(store.cron_advance("nightly", 60_000, None).await.unwrap(), "the first record moves it");
    assert!(!store.cron_advance("nightly", 30_000, None).await.unwrap(), "the last fire only moves forward");
    assert!(!store.cron_advance("nightly", 60_000, None).await.unwrap(), "a fire recorded once is not moved again");
    let state = store.cron_state("nightly").await.unwrap();
    assert_eq!((state.last_fire, state.last_run.as_deref(), state.buffered), (Some(60_000), None, None));
    assert!(store.cron_advance("nightly", 120_000, Some("run-2")).await.unwrap());
    store.cron_buffer("nightly", Some(180_000)).await.unwrap();
    let state = store.cron_state("nightly").await.unwrap();
    assert_eq!(
        (state.last_fire, state.last_run.as_deref(), state.buffered),
        (Some(120_000), Some("run-2"), Some(180_000))
    );
    store.cron_buffer("nightly", None).await.unwrap();
    assert_eq!(store.cron_state("nightly").await.unwrap().buffered, None);
    assert_eq!(store.cron_state("hourly").await.unwrap(), CronState::default(), "schedules are apart");
}

async fn waits_are_registered_by_event_type(store: Arc<dyn Store>) {
    let (a, b, c) = (RunId::new(0, 1_000), RunId::new(1, 1_001), RunId::new(2, 1_002));
    store.add_wait("user.verified", &a, 5_000).await.unwrap();
    store.add_wait("user.verified", &b, 6_000).await.unwrap();
    store.add_wait("order.paid", &c, 7_000).await.unwrap();
    store.add_wait("user.verified", &a, 5_000).await.unwrap(); // again: idempotent
    let waiting = |event: &'static str| {
        let store = Arc::clone(&store);
        async move {
            let mut runs = store.waiting(event).await.unwrap();
            runs.sort();
            runs
        }
    };
    let mut both = vec![a.clone(), b.clone()];
    both.sort();
    assert_eq!(waiting("user.verified").await, both);
    assert_eq!(waiting("order.paid").await, std::slice::from_ref(&c));
    store.remove_wait("user.verified", &a).await.unwrap();
    assert_eq!(waiting("user.verified").await, std::slice::from_ref(&b));
    store.remove_wait("user.verified", &a).await.unwrap(); // again: nothing to remove
    assert!(waiting("nothing.waits").await.is_empty());
}

async fn values_are_shared_and_marks_expire(store: Arc<dyn Store>) {
    assert_eq!(store.get_value("cms:cursor").await.unwrap(), None);
    store.set_value("cms:cursor", "2026-12-07T10:00:00Z").await.unwrap();
    assert_eq!(store.get_value("cms:cursor").await.unwrap().as_deref(), Some("2026-12-07T10:00:00Z"));
    store.set_value("cms:cursor", "later").await.unwrap();
    assert_eq!(store.get_value("cms:cursor").await.unwrap().as_deref(), Some("later"));

    assert!(store.mark_seen("webhook:1", Duration::from_secs(60)).await.unwrap(), "first time");
    assert!(!store.mark_seen("webhook:1", Duration::from_secs(60)).await.unwrap(), "a replay");
    store.forget_seen("webhook:1").await.unwrap();
    assert!(store.mark_seen("webhook:1", Duration::from_secs(60)).await.unwrap(), "forgotten, so new again");
    assert!(store.mark_seen("webhook:2", Duration::from_secs(1)).await.unwrap());
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert!(store.mark_seen("webhook:2", Duration::from_secs(1)).await.unwrap(), "a mark lasts its ttl only");
}

async fn a_failed_run_is_reopened_only_while_still_failed_at_its_seq(store: Arc<dyn Store>) {
    let def = definition("wf", 1, 1);
    let id = create(&store, new_run(&def, 1, 1_000, None)).await;
    let claimed = claim_one(&store, "a").await;
    let failed = work(&def, &claimed, false, 1_010);
    let failed_state = failed.state.clone();
    assert_eq!(failed_state.status, Status::Failed);
    assert_eq!(store.commit(failed).await.unwrap(), CommitOutcome::Applied { seq: 4 });
    assert_eq!(
        store.list_runs(query(Some("wf"), Some("failed"), None, 10)).await.unwrap().runs,
        std::slice::from_ref(&id)
    );

    let resumed = vec![Transition::RunResumed { step: 0, attempt: 2 }];
    let reopen = commit_of(&def, &id, &failed_state, None, resumed, 1_020);
    assert_eq!(reopen.dispatch, [Dispatch { step: 0, attempt: 2 }]);
    let behind = Commit { expected_seq: 3, ..reopen.clone() };
    assert_eq!(store.reopen(behind).await.unwrap(), CommitOutcome::Stale, "decided on an older seq");
    assert_eq!(store.reopen(reopen.clone()).await.unwrap(), CommitOutcome::Applied { seq: 5 });
    assert_eq!(store.summary(&id).await.unwrap().unwrap().status, Status::Running);
    assert!(store.list_runs(query(Some("wf"), Some("failed"), None, 10)).await.unwrap().runs.is_empty());
    assert_eq!(
        store.list_runs(query(Some("wf"), Some("running"), None, 10)).await.unwrap().runs,
        std::slice::from_ref(&id)
    );
    assert_eq!(store.reopen(reopen).await.unwrap(), CommitOutcome::Stale, "live again: nothing to reopen");
    let retried = claim_one(&store, "b").await;
    assert_eq!(retried.task.as_ref().map(|t| (t.step, t.attempt)).unwrap(), (0, 2));
    assert_eq!(
        store
            .reopen(Commit { run: RunId::new(1, 9), ..commit_of(&def, &id, &failed_state, None, vec![], 1) })
            .await
            .unwrap(),
        CommitOutcome::Gone
    );
}

async fn runs_are_counted_by_status(store: Arc<dyn Store>) {
    let def = definition("wf", 1, 1);
    for (i, succeed) in [true, true, false].into_iter().enumerate() {
        create(&store, new_run(&def, i as u16, 1_000 + i as u64, None)).await;
        let claimed = claim_one(&store, "a").await;
        assert!(matches!(
            store.commit(work(&def, &claimed, succeed, 1_100)).await.unwrap(),
            CommitOutcome::Applied { .. }
        ));
    }
    create(&store, new_run(&def, 3, 2_000, None)).await;
    create(&store, new_run(&definition("other", 1, 1), 0, 2_001, None)).await;
    let mut counts = store.count_runs("wf").await.unwrap();
    counts.retain(|(_, n)| *n > 0);
    counts.sort();
    let expected = [(Status::Pending, 1), (Status::Completed, 2), (Status::Failed, 1)];
    assert_eq!(counts, expected);
}

async fn the_bus_publishes_reads_settles_dead_letters_and_lists(store: Arc<dyn Store>) {
    let cap = EntryCap { max_bytes: 1 << 20, keep_bytes: 64 };
    let first = store.publish_event(&[("type", b"user.registered"), ("payload", b"{\"userId\":1}")]).await.unwrap();
    let second = store.publish_event(&[("type", b"order.paid"), ("payload", b"{}")]).await.unwrap();
    let third = store.publish_event(&[("type", b"user.registered"), ("payload", b"not json")]).await.unwrap();
    assert!(compare_entry_ids(&first, &second).is_lt() && compare_entry_ids(&second, &third).is_lt(), "ids grow");
    assert_eq!(store.event_counts().await.unwrap(), (3, 0));

    let read = store.read_events("router-a", 10, BLOCK, cap).await.unwrap();
    assert_eq!(read.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), [&first, &second, &third]);
    assert_eq!(read[0].field("payload"), Some(&b"{\"userId\":1}"[..]));
    assert_eq!(read[0].deliveries, 1);
    assert!(
        store.read_events("router-b", 10, Duration::from_millis(50), cap).await.unwrap().is_empty(),
        "delivered once"
    );
    let stats = store.stream_stats().await.unwrap();
    assert_eq!((stats.events_length, stats.events_pending), (3, 3));

    // A router that died: its unsettled entries are taken over, counted.
    age().await;
    let taken = store.reclaim_events("router-b", Duration::ZERO, 10, cap).await.unwrap();
    assert_eq!(taken.len(), 3);
    assert!(taken.iter().all(|e| e.deliveries == 2), "{taken:?}");

    // Settled with the runs they started; one dead-lettered.
    let settled = vec![
        SettledEvent { id: first.clone(), started: vec![("onboarding".to_owned(), "run-1".to_owned())] },
        SettledEvent { id: second.clone(), started: vec![] },
    ];
    store.settle_events(&settled, Duration::from_secs(3600)).await.unwrap();
    store.dead_letter_event(&taken[2], "`payload` is not JSON").await.unwrap();
    assert_eq!(store.stream_stats().await.unwrap().events_pending, 0);
    assert_eq!(store.event_counts().await.unwrap().1, 1);
    let dead = store.dead_events(None, 10, cap).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].field("entry"), Some(third.as_bytes()));
    assert_eq!(dead[0].field("reason"), Some(&b"`payload` is not JSON"[..]));

    // Listed newest first, by type, with the runs each started (`None`: not handled).
    let recent = store.recent_events(events(None, None, 10, 100, cap)).await.unwrap();
    let ids: Vec<&str> = recent.iter().map(|l| l.entry.id.as_str()).collect();
    assert_eq!(ids, [&third, &second, &first]);
    assert_eq!(recent[2].started, Some(vec![("onboarding".to_owned(), "run-1".to_owned())]));
    assert_eq!(recent[1].started, Some(vec![]));
    let of_type = store.recent_events(events(None, Some("user.registered"), 10, 100, cap)).await.unwrap();
    assert_eq!(of_type.iter().map(|l| l.entry.id.as_str()).collect::<Vec<_>>(), [&third, &first]);
    let older = store.recent_events(events(Some(&second), None, 10, 100, cap)).await.unwrap();
    assert_eq!(older.iter().map(|l| l.entry.id.as_str()).collect::<Vec<_>>(), [&first]);

    // Trimming (about: Redis trims whole nodes of its stream) never drops an entry the router
    // has not handled.
    let unhandled = store.publish_event(&[("type", b"late.event")]).await.unwrap();
    let trimmed = store.trim_events(0, Millis::MAX).await.unwrap();
    assert!(trimmed <= 3, "only handled entries are trimmed: {trimmed}");
    let left = store.recent_events(events(None, None, 10, 100, cap)).await.unwrap();
    assert!(left.iter().any(|l| l.entry.id == unhandled), "the unhandled entry stays: {left:?}");
    assert_eq!(store.read_events("router-a", 10, BLOCK, cap).await.unwrap().len(), 1);
    assert_eq!(store.repair_bus().await.unwrap(), 0, "no entry ahead of the clock");
}

async fn the_backend_says_what_it_is_and_keeps_time(store: Arc<dyn Store>) {
    let wall = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let now = store.now().await.unwrap();
    assert!(now.abs_diff(wall) < 5_000, "the store's clock ({now}) is this machine's ({wall}), near enough");
    let health = store.health().await.unwrap();
    assert_eq!(health.kind, store.kind());
    assert_eq!(health.bus, BusCondition::default());
    assert_eq!(store.connection_problem(), None);
    assert_eq!(store.shards(), 4);
    assert_eq!(store.stream_stats().await.unwrap(), StreamStats::default(), "nothing queued yet");
    match store.kind() {
        StoreKind::Redis => assert!(store.memory_used().await.unwrap().is_some_and(|bytes| bytes > 0)),
        StoreKind::Memory => {
            assert_eq!(store.memory_used().await.unwrap(), None, "the memory store does not measure itself")
        }
    }
}
