//! Crash recovery with real processes: replicas killed with `kill -9` while they work, and a
//! replica frozen with `kill -STOP` that wakes up after its lease was taken over.
//!
//! Each test starts its own redis-server and real processes of our binary on loopback. Steps are
//! `exec` steps that append a line to an effects file, so that the side effects a step really had
//! can be compared with what the runs' logs say. Every loop is bounded in count and time; nothing
//! asserts on how long anything took.

use crate::util::{RedisServer, Replica, ReplicaConfig, http, wait_for, workflows_file};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use workflow_orchestrator::machine;
use workflow_orchestrator::store::RunId;
use workflow_orchestrator::store::prelude::*;
use workflow_orchestrator::store::redis::RedisStore;

/// An HTTP agent whose every call is bounded: a killed or frozen replica must never hang a test.
pub(crate) fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(2)).timeout(Duration::from_secs(10)).build()
}

pub(crate) fn get(agent: &ureq::Agent, port: u16, path: &str) -> (u16, Value) {
    http(agent.get(&format!("http://127.0.0.1:{port}{path}")).call())
}

/// A replica's `/health` counters (empty when it does not answer).
pub(crate) fn counters(agent: &ureq::Agent, port: u16) -> BTreeMap<String, u64> {
    let (_, health) = get(agent, port, "/health");
    health["counters"]
        .as_object()
        .map(|c| c.iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0))).collect())
        .unwrap_or_default()
}

/// The lines of a file (none if it does not exist yet).
pub(crate) fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_owned).collect()
}

// ---------------------------------------------------------------------------------------------
// Three replicas, one of them killed with -9 every two seconds.
// ---------------------------------------------------------------------------------------------

const RUNS: usize = 1000;
const STEP_IDS: [&str; 5] = ["s1", "s2", "s3", "s4", "s5"];
const REPLICAS: usize = 3;
const KILLS: usize = 10;
const KILL_EVERY: Duration = Duration::from_secs(2);

/// Five steps, each sleeping a random 50-200 ms and then appending `run:step:attempt` to the
/// effects file. The line is written after the work, so a step that was interrupted by a kill
/// may or may not have written it: that is what at-least-once looks like from outside.
fn five_random_steps(effects: &Path) -> String {
    let script = r#"sleep "$(printf '0.%03d' $(( $(od -An -N2 -tu2 /dev/urandom) % 151 + 50 )))" && printf '%s\n' "$WFO_RUN_ID:$WFO_STEP_ID:$WFO_ATTEMPT" >> "$EFFECTS""#;
    let mut toml = String::from("[[workflow]]\nid = \"chaos\"\ndescription = \"five short steps with side effects\"\n");
    for step in STEP_IDS {
        toml.push_str(&format!(
            "[[workflow.step]]\nid = \"{step}\"\naction = \"exec\"\ntimeout = \"30s\"\n\
             with = {{ command = [\"sh\", \"-c\", '''{script}'''], env = {{ EFFECTS = '{}' }} }}\n",
            effects.display()
        ));
    }
    toml
}

/// What triggering the runs over HTTP gave.
#[derive(Debug, Default)]
pub(crate) struct Triggered {
    /// Runs whose trigger was answered 202: the ones the engine promised to finish.
    pub(crate) accepted: Vec<String>,
    /// Triggers that hit a dead replica and were sent again to another one.
    pub(crate) resent: usize,
    /// Triggers that no replica answered within the attempts allowed.
    pub(crate) unanswered: usize,
    /// Answers other than 202 from a live replica (a bug: nothing here is malformed).
    pub(crate) refused: Vec<(u16, Value)>,
}

/// Triggers `count` runs, spread round robin over the replicas' current ports; a trigger that
/// meets a dead replica (connection refused or cut) goes to the next one, up to 30 times.
/// A cut connection may have created a run all the same: it is not counted (no 202), and it
/// must still finish, like every run.
pub(crate) fn trigger_runs(ports: &Mutex<Vec<u16>>, count: usize) -> Triggered {
    let agent = agent();
    let mut out = Triggered::default();
    for i in 0..count {
        let mut answered = false;
        for attempt in 0..30 {
            let port = {
                let ports = ports.lock().unwrap();
                ports[(i + attempt) % ports.len()]
            };
            let (status, body) = http(
                agent
                    .post(&format!("http://127.0.0.1:{port}/api/workflows/chaos/trigger"))
                    .send_json(json!({ "inputData": { "n": i } })),
            );
            match status {
                202 => {
                    out.accepted.push(body["runId"].as_str().expect("a runId in a 202").to_owned());
                    answered = true;
                    break;
                }
                0 => {
                    out.resent += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => {
                    out.refused.push((status, body));
                    answered = true;
                    break;
                }
            }
        }
        if !answered {
            out.unanswered += 1;
        }
    }
    out
}

/// Every run's log replays, to `completed`, and to the state its summary (the run hash) holds:
/// read through the library, straight from Redis.
pub(crate) fn assert_every_log_replays_to_a_completed_run(redis_url: &str, runs: &[String]) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let store = RedisStore::open(redis_url, "wfo", None).await.expect("the test connects to Redis");
        for run in runs {
            let id: RunId = run.parse().expect("a run id");
            let log = store.history(&id).await.expect("history").unwrap_or_else(|| panic!("no log for {run}"));
            let hash = machine::definition_of(log.iter().map(|l| &l.recorded)).expect("a log from run_created");
            let workflow = store.load_definition(id.shard, hash).await.expect("definition").expect("its snapshot");
            let state = machine::replay(log.iter().map(|l| &l.recorded), &workflow.def)
                .unwrap_or_else(|(index, err)| panic!("run {run}: log entry {} does not replay: {err}", index + 1))
                .unwrap_or_else(|| panic!("run {run}: empty log"));
            assert_eq!(state.status, machine::Status::Completed, "run {run}");
            let summary = store.summary(&id).await.expect("summary").unwrap_or_else(|| panic!("no summary for {run}"));
            assert!(summary.matches(&state), "run {run}: summary {summary:?} is not the replayed state {state:?}");
        }
    });
}

/// [`REPLICAS`] replicas serving a workflows file, and the ports the triggers go to.
struct Chaos {
    config: ReplicaConfig,
    names: Vec<String>,
    replicas: Vec<Replica>,
    ports: Arc<Mutex<Vec<u16>>>,
}

impl Chaos {
    fn start(redis_url: &str, dir: &Path, workflows: &str) -> Chaos {
        let file = workflows_file(dir, workflows);
        // A short lease so that a killed replica's steps are taken over quickly; enough
        // deliveries that a step caught by several kills in a row still finishes rather than
        // failing its run.
        let config = ReplicaConfig::new(Some(redis_url.to_owned()), Some(&file), dir)
            .env("LEASE_TTL", "2s")
            .env("MAX_DELIVERIES", "10")
            .env("SHUTDOWN_GRACE", "1s");
        let names: Vec<String> = (0..REPLICAS).map(|i| format!("r{i}")).collect();
        let replicas: Vec<Replica> = names.iter().map(|name| config.start(name)).collect();
        let ports = Arc::new(Mutex::new(replicas.iter().map(|r| r.port).collect::<Vec<u16>>()));
        Chaos { config, names, replicas, ports }
    }
}

/// Kills one of `replicas` every [`KILL_EVERY`], [`KILLS`] times, round robin, and restarts it at
/// once (same name, new process: a new consumer in the group; its predecessor's leases expire and
/// are taken over), keeping `ports` (where the triggers go) current. `before_kill` sees each
/// victim just before it is killed.
pub(crate) fn kill_round_robin(
    config: &ReplicaConfig,
    names: &[String],
    replicas: &mut [Replica],
    ports: &Mutex<Vec<u16>>,
    mut before_kill: impl FnMut(&Replica),
) {
    let chaos_start = Instant::now();
    for kill in 0..KILLS {
        let at = chaos_start + KILL_EVERY * (kill as u32 + 1);
        std::thread::sleep(at.saturating_duration_since(Instant::now()));
        let victim = kill % replicas.len();
        before_kill(&replicas[victim]);
        replicas[victim].kill9();
        replicas[victim] = config.start(&names[victim]);
        ports.lock().unwrap()[victim] = replicas[victim].port;
    }
}

#[test]
fn three_replicas_survive_kill_9_every_two_seconds() {
    let redis = RedisServer::start();
    survive_kill_9_every_two_seconds(&redis.url());
}

/// [`RUNS`] runs of five steps on three replicas of `redis_url`, one replica killed every two
/// seconds: every run completes, each step's completion is accepted once, every log replays.
pub(crate) fn survive_kill_9_every_two_seconds(redis_url: &str) {
    let began = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let effects = dir.path().join("effects.log");
    let Chaos { config, names, mut replicas, ports } =
        Chaos::start(redis_url, dir.path(), &five_random_steps(&effects));
    let agent = agent();

    // Trigger while the kills go on, so that triggers too meet dead replicas.
    let trigger_ports = Arc::clone(&ports);
    let triggering = std::thread::spawn(move || trigger_runs(&trigger_ports, RUNS));

    // Counters live in the process, so each one's counters are read just before it is killed.
    let mut counted: BTreeMap<String, u64> = BTreeMap::new();
    kill_round_robin(&config, &names, &mut replicas, &ports, |victim| {
        for (name, value) in counters(&agent, victim.port) {
            *counted.entry(name).or_default() += value;
        }
    });
    let triggered = triggering.join().expect("the trigger thread");
    assert!(triggered.refused.is_empty(), "live replicas refused triggers: {:?}", triggered.refused);
    assert!(!triggered.accepted.is_empty(), "no trigger was accepted");

    // Every accepted run reaches `completed` (bounded wait; a run that ends otherwise is kept).
    let mut waiting: Vec<String> = triggered.accepted.clone();
    let mut ended_otherwise: Vec<(String, Value)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !waiting.is_empty() && Instant::now() < deadline {
        let mut still = Vec::new();
        for (i, run) in waiting.into_iter().enumerate() {
            let (status, body) = get(&agent, replicas[i % REPLICAS].port, &format!("/api/runs/{run}"));
            match body["status"].as_str() {
                Some("completed") if status == 200 => {}
                Some("failed" | "cancelled" | "timed_out") => ended_otherwise.push((run, body)),
                _ => still.push(run),
            }
        }
        waiting = still;
        if !waiting.is_empty() {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let settled = began.elapsed();
    assert!(ended_otherwise.is_empty(), "runs ended but not completed: {ended_otherwise:#?}");
    assert!(
        waiting.is_empty(),
        "{} runs still not finished after 180 s, e.g. {}: {}",
        waiting.len(),
        waiting[0],
        get(&agent, replicas[0].port, &format!("/api/runs/{}", waiting[0])).1
    );

    // Every (run, step) had its side effect at least once; count the repeats.
    let mut effect_count: HashMap<(String, String), usize> = HashMap::new();
    let effect_lines = lines(&effects);
    for line in &effect_lines {
        let mut parts = line.split(':');
        let (Some(run), Some(step), Some(_attempt), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            panic!("malformed effect line `{line}`")
        };
        *effect_count.entry((run.to_owned(), step.to_owned())).or_default() += 1;
    }
    let accepted: HashSet<&String> = triggered.accepted.iter().collect();
    let mut missing = Vec::new();
    for run in &triggered.accepted {
        for step in STEP_IDS {
            if !effect_count.contains_key(&(run.clone(), step.to_owned())) {
                missing.push(format!("{run}:{step}"));
            }
        }
    }
    assert!(missing.is_empty(), "{} (run, step) pairs completed without an effect: {:?}", missing.len(), missing);
    let duplicate_effects: usize =
        effect_count.iter().filter(|((run, _), _)| accepted.contains(run)).map(|(_, n)| n - 1).sum();
    // Runs created by a trigger whose answer was cut by a kill: nobody was promised them, but
    // they exist and went through the same machinery; report where they ended.
    let unacknowledged_runs: HashSet<&String> =
        effect_count.keys().map(|(run, _)| run).filter(|run| !accepted.contains(run)).collect();
    let unacknowledged_status: Vec<String> = unacknowledged_runs
        .iter()
        .map(|run| {
            get(&agent, replicas[0].port, &format!("/api/runs/{run}")).1["status"].as_str().unwrap_or("?").to_owned()
        })
        .collect();

    // The logs accepted exactly one completion per step, however often the step ran.
    for (i, run) in triggered.accepted.iter().enumerate() {
        let (status, body) = get(&agent, replicas[i % REPLICAS].port, &format!("/api/runs/{run}/history"));
        assert_eq!(status, 200, "history of {run}: {body}");
        let transitions = body["transitions"].as_array().cloned().unwrap_or_default();
        for step in STEP_IDS {
            let completions = transitions.iter().filter(|t| t["type"] == "step_completed" && t["step"] == step).count();
            assert_eq!(completions, 1, "run {run} step {step}: {completions} step_completed in {transitions:#?}");
        }
        assert_eq!(transitions.last().map(|t| t["type"].clone()), Some(json!("run_completed")), "run {run}");
    }

    assert_every_log_replays_to_a_completed_run(redis_url, &triggered.accepted);

    // The kills must have interrupted work, or this test showed nothing about recovery.
    for replica in &replicas {
        for (counter, value) in counters(&agent, replica.port) {
            *counted.entry(counter).or_default() += value;
        }
    }
    let takeovers_logged: Vec<usize> =
        replicas.iter().map(|r| r.log_text().matches("took over a step whose lease expired").count()).collect();
    let reclaimed = counted.get("stepsReclaimed").copied().unwrap_or(0);
    assert!(
        reclaimed > 0 || takeovers_logged.iter().sum::<usize>() > 0,
        "no step was ever taken over: the kills did not interrupt any work"
    );

    eprintln!(
        "chaos summary: {} runs accepted ({} triggers resent to another replica, {} unanswered), \
         {} kills; {} effect lines, {} duplicate effects of accepted runs, {} runs started by cut triggers (status {:?}); \
         takeovers logged per replica {:?}; counters summed over all incarnations {:?}; \
         all runs seen completed {:.1} s after the test began",
        triggered.accepted.len(),
        triggered.resent,
        triggered.unanswered,
        KILLS,
        effect_lines.len(),
        duplicate_effects,
        unacknowledged_runs.len(),
        unacknowledged_status,
        takeovers_logged,
        counted,
        settled.as_secs_f64(),
    );
}

// ---------------------------------------------------------------------------------------------
// Steps as a graph: a diamond whose middle steps run at once, through the same kills.
// ---------------------------------------------------------------------------------------------

const DIAMOND_RUNS: usize = 500;
const DIAMOND_STEPS: [&str; 4] = ["a", "b", "c", "d"];

/// `a`; `b` and `c` need `a`; `d` needs `b` and `c`: each step sleeps a random 50-200 ms and then
/// appends `run:step:attempt` to the effects file.
fn diamond_steps(effects: &Path) -> String {
    let script = r#"sleep "$(printf '0.%03d' $(( $(od -An -N2 -tu2 /dev/urandom) % 151 + 50 )))" && printf '%s\n' "$WFO_RUN_ID:$WFO_STEP_ID:$WFO_ATTEMPT" >> "$EFFECTS""#;
    let mut toml = String::from("[[workflow]]\nid = \"chaos\"\ndescription = \"a diamond of short steps\"\n");
    let needs = [("a", ""), ("b", "needs = [\"a\"]\n"), ("c", "needs = [\"a\"]\n"), ("d", "needs = [\"b\", \"c\"]\n")];
    for (step, needs) in needs {
        toml.push_str(&format!(
            "[[workflow.step]]\nid = \"{step}\"\naction = \"exec\"\ntimeout = \"30s\"\n{needs}\
             with = {{ command = [\"sh\", \"-c\", '''{script}'''], env = {{ EFFECTS = '{}' }} }}\n",
            effects.display()
        ));
    }
    toml
}

/// When each step of a run's history started and completed (its accepted attempt), by step id.
fn step_spans(transitions: &[Value]) -> HashMap<String, (u64, u64)> {
    let at = |t: &Value| t["at"].as_str().and_then(machine::parse_timestamp).unwrap_or(0);
    let mut started: HashMap<(String, u64), u64> = HashMap::new();
    let mut spans = HashMap::new();
    for t in transitions {
        let (Some(step), Some(attempt)) = (t["step"].as_str(), t["attempt"].as_u64()) else { continue };
        match t["type"].as_str() {
            Some("step_started") => {
                started.insert((step.to_owned(), attempt), at(t));
            }
            Some("step_completed") => {
                let start = started.get(&(step.to_owned(), attempt)).copied().unwrap_or(0);
                spans.insert(step.to_owned(), (start, at(t)));
            }
            _ => {}
        }
    }
    spans
}

#[test]
fn a_diamond_runs_its_middle_steps_at_once_through_kill_9_every_two_seconds() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let effects = dir.path().join("effects.log");
    let Chaos { config, names, mut replicas, ports } = Chaos::start(&redis.url(), dir.path(), &diamond_steps(&effects));
    let agent = agent();

    let trigger_ports = Arc::clone(&ports);
    let triggering = std::thread::spawn(move || trigger_runs(&trigger_ports, DIAMOND_RUNS));
    kill_round_robin(&config, &names, &mut replicas, &ports, |_| {});
    let triggered = triggering.join().expect("the trigger thread");
    assert!(triggered.refused.is_empty(), "live replicas refused triggers: {:?}", triggered.refused);
    assert!(triggered.accepted.len() > DIAMOND_RUNS / 2, "too few triggers accepted: {triggered:?}");

    // Every accepted run completes (bounded wait).
    let mut waiting: Vec<String> = triggered.accepted.clone();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !waiting.is_empty() && Instant::now() < deadline {
        waiting.retain(|run| {
            let (status, body) = get(&agent, replicas[0].port, &format!("/api/runs/{run}"));
            assert!(
                !matches!(body["status"].as_str(), Some("failed" | "cancelled" | "timed_out")),
                "run {run} ended otherwise: {body}"
            );
            !(status == 200 && body["status"] == "completed")
        });
        if !waiting.is_empty() {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    assert!(waiting.is_empty(), "{} runs still not finished after 180 s, e.g. {}", waiting.len(), waiting[0]);

    // One accepted completion per (run, step), never a step before its needs, and `b` and `c`
    // at once in most runs.
    let mut overlapping = 0;
    for run in &triggered.accepted {
        let (status, body) = get(&agent, replicas[0].port, &format!("/api/runs/{run}/history"));
        assert_eq!(status, 200, "history of {run}: {body}");
        let transitions = body["transitions"].as_array().cloned().unwrap_or_default();
        for step in DIAMOND_STEPS {
            let completions = transitions.iter().filter(|t| t["type"] == "step_completed" && t["step"] == step).count();
            assert_eq!(completions, 1, "run {run} step {step}: {completions} step_completed in {transitions:#?}");
        }
        // In the log's order (the times are each replica's reading of the store's clock, a
        // few milliseconds apart): a step's accepted start comes after its needs' completions.
        let seq_of = |kind: &str, step: &str| {
            transitions.iter().rev().find(|t| t["type"] == kind && t["step"] == step).and_then(|t| t["seq"].as_u64())
        };
        let (started, completed) = (|s| seq_of("step_started", s), |s| seq_of("step_completed", s));
        assert!(completed("a") < started("b") && completed("a") < started("c"), "run {run}: b or c before a");
        assert!(completed("b") < started("d") && completed("c") < started("d"), "run {run}: d before b and c");
        let spans = step_spans(&transitions);
        let (b, c) = (spans["b"], spans["c"]);
        if b.0 < c.1 && c.0 < b.1 {
            overlapping += 1;
        }
    }
    assert!(
        overlapping * 2 > triggered.accepted.len(),
        "b and c overlapped in only {overlapping} of {} runs",
        triggered.accepted.len()
    );

    // Every (run, step) had its side effect, and every log replays to its stored summary.
    let done: HashSet<(String, String)> = lines(&effects)
        .iter()
        .filter_map(|line| {
            let mut parts = line.split(':');
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect();
    for run in &triggered.accepted {
        for step in DIAMOND_STEPS {
            assert!(done.contains(&(run.clone(), step.to_owned())), "{run}:{step} completed without its effect");
        }
    }
    assert_every_log_replays_to_a_completed_run(&redis.url(), &triggered.accepted);
    let takeovers: usize =
        replicas.iter().map(|r| r.log_text().matches("took over a step whose lease expired").count()).sum();
    eprintln!(
        "diamond chaos: {} runs accepted, b and c overlapped in {overlapping}; takeovers logged by the last incarnations {takeovers}",
        triggered.accepted.len()
    );
}

// ---------------------------------------------------------------------------------------------
// A frozen replica wakes up after its lease was taken over: the fence discards its outcome.
// ---------------------------------------------------------------------------------------------

/// One step that announces its start, works for about four seconds, then records its effect.
/// Each line carries `$PPID`, the replica process that ran it (exec starts `sh` directly).
fn one_slow_step(effects: &Path) -> String {
    let script = r#"printf '%s\n' "start:$PPID" >> "$EFFECTS"; sleep 4; printf '%s\n' "done:$PPID" >> "$EFFECTS""#;
    format!(
        "[[workflow]]\nid = \"slow\"\ndescription = \"one slow step\"\n\
         [[workflow.step]]\nid = \"work\"\naction = \"exec\"\ntimeout = \"60s\"\n\
         with = {{ command = [\"sh\", \"-c\", '''{script}'''], env = {{ EFFECTS = '{}' }} }}\n",
        effects.display()
    )
}

#[test]
fn a_stopped_replica_is_fenced_after_its_lease() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let effects = dir.path().join("effects.log");
    let file = workflows_file(dir.path(), &one_slow_step(&effects));
    let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()).env("LEASE_TTL", "1s");
    let agent = agent();

    // A alone: it must be the one that claims the step.
    let a = config.start("a");
    let run_id = a.trigger("slow", json!({}));
    let a_start = format!("start:{}", a.pid());
    wait_for(Duration::from_secs(30), Duration::from_millis(20), || lines(&effects).contains(&a_start).then_some(()))
        .unwrap_or_else(|| {
            panic!("A never started the step; effects {:?}; A's log:\n{}", lines(&effects), a.log_text())
        });

    // Freeze A mid-step. Its child process (its own process group) is not frozen: it finishes
    // and writes its effect meanwhile, as a real side effect would. A's lease is no longer
    // renewed, so it expires after LEASE_TTL by Redis's clock, and B takes the step over.
    a.signal("STOP");
    let b = config.start("b");
    let run = wait_for(Duration::from_secs(60), Duration::from_millis(100), || {
        let (status, body) = get(&agent, b.port, &format!("/api/runs/{run_id}"));
        (status == 200 && body["status"] == "completed").then_some(body)
    });
    let Some(run) = run else {
        a.signal("CONT");
        let history = get(&agent, b.port, &format!("/api/runs/{run_id}/history")).1;
        panic!("B did not complete the run within 60 s; history {history:#}; B's log:\n{}", b.log_text());
    };
    let history = b.history(&run_id);
    let completions: Vec<&Value> = history.iter().filter(|t| t["type"] == "step_completed").collect();
    assert_eq!(completions.len(), 1, "{history:#?}");
    assert_eq!(completions[0]["replica"], "b", "B, not the frozen A, completed the step: {history:#?}");

    // Wake A. Its step's outcome is ready (the child exited long ago) and its renewal is overdue;
    // whichever comes first, the outcome must be discarded, visibly:
    // - renewal first: it finds the lease lost (B holds or acked the entry), logs "lease lost"
    //   and cancels the step, which then reports a "cancelled" failure; that failure's commit is
    //   still a commit under A's lease, and the fence rejects it;
    // - completion first: A commits the step's success under its lease; the fence rejects it.
    // Both paths count in `completionsFenced` and log "rejected by the fence".
    a.signal("CONT");
    let fenced = wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
        let fenced = counters(&agent, a.port).get("completionsFenced").copied().unwrap_or(0);
        (fenced >= 1 || a.log_text().contains("rejected by the fence")).then_some(fenced)
    })
    .unwrap_or_else(|| panic!("A's late outcome was not visibly fenced within 30 s; A's log:\n{}", a.log_text()));
    // The counter is incremented just before the log line is written: read both again.
    let fenced = counters(&agent, a.port).get("completionsFenced").copied().unwrap_or(fenced);
    let a_log = a.log_text();
    assert!(fenced >= 1, "completionsFenced = {fenced}; A's log:\n{a_log}");
    assert!(a_log.contains("rejected by the fence"), "A's log:\n{a_log}");
    let path = match (a_log.contains("lease lost"), a_log.contains("step failed")) {
        (true, true) => "renewal found the lease lost first and cancelled the step; its `cancelled` failure was fenced",
        (true, false) => "renewal found the lease lost, but the step's success won the race and was fenced",
        (false, _) => "the step's success reached the fence before any renewal and was rejected",
    };
    eprintln!("fence path taken: {path} (completionsFenced = {fenced})");

    // The log is unchanged by A's wake-up: still exactly one completion, B's, and nothing of A's.
    let history = b.history(&run_id);
    let completions: Vec<&Value> = history.iter().filter(|t| t["type"] == "step_completed").collect();
    assert_eq!(completions.len(), 1, "{history:#?}");
    assert_eq!(completions[0]["replica"], "b", "{history:#?}");
    assert!(
        history.iter().filter(|t| !t["step"].is_null()).all(|t| t["replica"] == "b"),
        "A's outcome reached the log: {history:#?}"
    );
    assert_eq!(run["status"], "completed");

    // The side effect happened twice, once under each replica: at-least-once, fenced log.
    let a_done = format!("done:{}", a.pid());
    let b_done = format!("done:{}", b.pid());
    let seen = wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
        let seen = lines(&effects);
        (seen.contains(&a_done) && seen.contains(&b_done)).then_some(seen)
    })
    .unwrap_or_else(|| panic!("effects {:?} lack {a_done} or {b_done}", lines(&effects)));
    assert_eq!(seen.iter().filter(|l| l.starts_with("done:")).count(), 2, "{seen:?}");
    let (status, health) = get(&agent, a.port, "/health");
    assert_eq!(status, 200, "A serves again after its wake-up: {health}");
}
