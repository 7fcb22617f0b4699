//! A backlog must not make steps run twice. Before the fix, the sweeper judged "no queued step,
//! no lease" from reads that were not one snapshot (a run's summary, then its entry), so a run
//! that advanced in between looked orphaned and got a second ready entry beside its live one:
//! with a backlog of 1,200 runs and nothing failing, 128 re-queues and 111 steps executed twice,
//! and under `kill -9` chaos the re-queues snowballed. The re-queue is now a fenced call that the
//! store refuses while the run's entry is queued or leased.
//!
//! Steps are `exec` steps appending `run:step:attempt` to an effects file, so that what really
//! ran can be counted. Every wait is bounded; nothing asserts on how long anything took (the
//! rates are printed for the notes).

use crate::chaos::{agent, counters, get, lines, trigger_runs};
use crate::util::{RedisServer, Replica, ReplicaConfig, workflows_file};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A workflow `chaos` (the name `trigger_runs` posts to) of `steps` exec steps, each optionally
/// sleeping `pause` seconds, then appending its line.
fn effect_steps(effects: &Path, steps: &[&str], pause: &str) -> String {
    let script = format!(r#"sleep {pause} && printf '%s\n' "$WFO_RUN_ID:$WFO_STEP_ID:$WFO_ATTEMPT" >> "$EFFECTS""#);
    let mut toml = String::from("[[workflow]]\nid = \"chaos\"\n");
    for step in steps {
        toml.push_str(&format!(
            "[[workflow.step]]\nid = \"{step}\"\naction = \"exec\"\ntimeout = \"60s\"\n\
             with = {{ command = [\"sh\", \"-c\", '''{script}'''], env = {{ EFFECTS = '{}' }} }}\n",
            effects.display()
        ));
    }
    toml
}

/// How often each `(run, step)` really ran.
fn executions(effects: &Path) -> HashMap<(String, String), usize> {
    let mut count = HashMap::new();
    for line in lines(effects) {
        let mut parts = line.split(':');
        let (Some(run), Some(step)) = (parts.next(), parts.next()) else { panic!("malformed effect line `{line}`") };
        *count.entry((run.to_owned(), step.to_owned())).or_default() += 1;
    }
    count
}

/// Waits (bounded) until every run in `runs` is `completed`, asking the replicas in turn;
/// panics naming a run that ended otherwise or did not end.
fn wait_all_completed(replicas: &Mutex<Vec<u16>>, runs: &[String], limit: Duration) {
    let agent = agent();
    let mut waiting: Vec<String> = runs.to_vec();
    let deadline = Instant::now() + limit;
    while !waiting.is_empty() && Instant::now() < deadline {
        let ports = replicas.lock().unwrap().clone();
        let mut still = Vec::new();
        for (i, run) in waiting.into_iter().enumerate() {
            let (_, body) = get(&agent, ports[i % ports.len()], &format!("/api/runs/{run}"));
            match body["status"].as_str() {
                Some("completed") => {}
                Some("failed" | "cancelled" | "timed_out") => panic!("run {run} ended but did not complete: {body}"),
                _ => still.push(run),
            }
        }
        waiting = still;
        if !waiting.is_empty() {
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    assert!(waiting.is_empty(), "{} runs did not complete within {limit:?}, e.g. {}", waiting.len(), waiting[0]);
}

/// Every `(run, step)` of `runs` ran at least once; returns how many ran more than once.
fn repeats(effects: &Path, runs: &[String], steps: &[&str]) -> usize {
    let count = executions(effects);
    let mut repeated = 0;
    for run in runs {
        for step in steps {
            let n = count.get(&(run.clone(), (*step).to_owned())).copied().unwrap_or(0);
            assert!(n >= 1, "run {run} step {step} completed without running");
            repeated += n - 1;
        }
    }
    repeated
}

#[test]
fn a_backlog_with_no_failure_runs_every_step_once_and_requeues_nothing() {
    const RUNS: usize = 3000;
    const STEPS: [&str; 3] = ["s1", "s2", "s3"];
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let effects = dir.path().join("effects.log");
    let file = workflows_file(dir.path(), &effect_steps(&effects, &STEPS, "0"));
    // Few executors and a short lease: the backlog is long and the sweeper (every lease period,
    // looking at runs quiet for two leases and a second) looks at it many times over.
    let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path())
        .env("LEASE_TTL", "1s")
        .env("MAX_CONCURRENT_STEPS", "4");
    let replica = config.start("r0");
    let ports = Mutex::new(vec![replica.port]);

    let began = Instant::now();
    let triggered = trigger_runs(&ports, RUNS);
    assert!(triggered.refused.is_empty() && triggered.unanswered == 0, "{triggered:?}");
    wait_all_completed(&ports, &triggered.accepted, Duration::from_secs(300));
    let took = began.elapsed();

    let repeated = repeats(&effects, &triggered.accepted, &STEPS);
    let counted = counters(&agent(), replica.port);
    let swept = counted.get("runsSwept").copied().unwrap_or(u64::MAX);
    let reclaimed = counted.get("stepsReclaimed").copied().unwrap_or(u64::MAX);
    eprintln!(
        "backlog: {RUNS} runs of {} steps on 4 executors in {:.1} s ({:.0} runs/s); re-queued {swept}, \
         reclaimed {reclaimed}, steps run more than once {repeated}",
        STEPS.len(),
        took.as_secs_f64(),
        RUNS as f64 / took.as_secs_f64()
    );
    assert_eq!(swept, 0, "the sweeper re-queued runs though nothing failed; log:\n{}", tail(&replica));
    assert_eq!(reclaimed, 0, "steps were taken over though nothing failed");
    assert_eq!(repeated, 0, "steps ran more than once though nothing failed");
}

#[test]
fn kill_9_under_a_backlog_repeats_at_most_what_the_killed_replicas_held() {
    const RUNS: usize = 1500;
    const STEPS: [&str; 5] = ["s1", "s2", "s3", "s4", "s5"];
    const EXECUTORS: usize = 4;
    const REPLICAS: usize = 3;
    const KILLS: usize = 8;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let effects = dir.path().join("effects.log");
    let file = workflows_file(dir.path(), &effect_steps(&effects, &STEPS, "0.02"));
    let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path())
        .env("LEASE_TTL", "2s")
        .env("MAX_CONCURRENT_STEPS", &EXECUTORS.to_string())
        .env("MAX_DELIVERIES", "20")
        .env("SHUTDOWN_GRACE", "1s");
    let names: Vec<String> = (0..REPLICAS).map(|i| format!("r{i}")).collect();
    let mut replicas: Vec<Replica> = names.iter().map(|name| config.start(name)).collect();
    let ports = Arc::new(Mutex::new(replicas.iter().map(|r| r.port).collect::<Vec<u16>>()));

    // The same work twice on the same replicas: first undisturbed, then with a replica killed
    // every two seconds while the backlog lasts.
    let calm_began = Instant::now();
    let calm = trigger_runs(&ports, RUNS);
    assert!(calm.refused.is_empty() && calm.unanswered == 0, "{calm:?}");
    wait_all_completed(&ports, &calm.accepted, Duration::from_secs(300));
    let calm_took = calm_began.elapsed();
    let calm_repeated = repeats(&effects, &calm.accepted, &STEPS);

    let chaos_began = Instant::now();
    let trigger_ports = Arc::clone(&ports);
    let triggering = std::thread::spawn(move || trigger_runs(&trigger_ports, RUNS));
    let agent = agent();
    let mut counted: BTreeMap<String, u64> = BTreeMap::new();
    // A replica killed every two seconds while the second batch is triggered and worked.
    for kill in 0..KILLS {
        std::thread::sleep(Duration::from_secs(2));
        let victim = kill % REPLICAS;
        for (name, value) in counters(&agent, replicas[victim].port) {
            *counted.entry(name).or_default() += value;
        }
        replicas[victim].kill9();
        replicas[victim] = config.start(&names[victim]);
        ports.lock().unwrap()[victim] = replicas[victim].port;
    }
    let chaos = triggering.join().expect("the trigger thread");
    assert!(chaos.refused.is_empty(), "live replicas refused triggers: {:?}", chaos.refused);
    wait_all_completed(&ports, &chaos.accepted, Duration::from_secs(300));
    let chaos_took = chaos_began.elapsed();
    for replica in &replicas {
        for (name, value) in counters(&agent, replica.port) {
            *counted.entry(name).or_default() += value;
        }
    }
    let chaos_repeated = repeats(&effects, &chaos.accepted, &STEPS);

    // Exactly one accepted completion per (run, step), however often a step ran.
    for run in calm.accepted.iter().chain(&chaos.accepted) {
        let (status, body) = get(&agent, replicas[0].port, &format!("/api/runs/{run}/history"));
        assert_eq!(status, 200, "history of {run}: {body}");
        let transitions = body["transitions"].as_array().cloned().unwrap_or_default();
        for step in STEPS {
            let completions = transitions.iter().filter(|t| t["type"] == "step_completed" && t["step"] == step).count();
            assert_eq!(completions, 1, "run {run} step {step}: {completions} step_completed");
        }
    }

    eprintln!(
        "kill -9 under a backlog: {RUNS} runs x {} steps on {REPLICAS} replicas x {EXECUTORS} executors; \
         undisturbed {:.1} s ({:.0} runs/s, {calm_repeated} repeats); with {KILLS} kills {:.1} s ({:.0} runs/s, \
         {chaos_repeated} repeats, bound {}); counters {counted:?}",
        STEPS.len(),
        calm_took.as_secs_f64(),
        calm.accepted.len() as f64 / calm_took.as_secs_f64(),
        chaos_took.as_secs_f64(),
        chaos.accepted.len() as f64 / chaos_took.as_secs_f64(),
        EXECUTORS * KILLS
    );
    assert_eq!(calm_repeated, 0, "steps ran twice with no failure");
    // A killed replica can leave unfinished at most the steps its executors were running.
    assert!(
        chaos_repeated <= EXECUTORS * KILLS,
        "{chaos_repeated} repeated executions after {KILLS} kills of replicas with {EXECUTORS} executors"
    );
    let swept = counted.get("runsSwept").copied().unwrap_or(0);
    assert_eq!(swept, 0, "the sweeper re-queued runs: a kill leaves leases to expire, not orphans");
}

/// The last lines of a replica's log, for a failure message.
fn tail(replica: &Replica) -> String {
    let log = replica.log_text();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
