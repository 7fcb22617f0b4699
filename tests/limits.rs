//! Concurrency and rate limits across replicas: three replicas of our binary on a private Redis,
//! one `kill -9`ed every 2 s, run workflows limited per key (one run per user at a time) and per
//! workflow (three at a time); two replicas start 200 runs limited to 20 per 2 s. The histories'
//! times show that no limit was ever exceeded and every run completed; afterwards no slot is
//! held. Every loop is bounded in count and time.

use crate::chaos::{agent, get, kill_round_robin};
use crate::util::{RedisServer, Replica, ReplicaConfig, http, wait_for, workflows_file};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use workflow_orchestrator::machine::parse_timestamp;

const USERS: usize = 10;
const PER_USER_RUNS: usize = 300;
const PER_WORKFLOW_RUNS: usize = 100;

/// Two `exec` steps of 100-300 ms each, in workflows limited per user and per workflow.
fn workflows() -> String {
    let script = r#"sleep "$(printf '0.%03d' $(( $(od -An -N2 -tu2 /dev/urandom) % 201 + 100 )))""#;
    let steps: String = ["first", "second"]
        .iter()
        .map(|id| {
            format!(
                "[[workflow.step]]\nid = \"{id}\"\naction = \"exec\"\ntimeout = \"30s\"\n\
                 with = {{ command = [\"sh\", \"-c\", '''{script}'''] }}\n"
            )
        })
        .collect();
    format!(
        "[[workflow]]\nid = \"per-user\"\nconcurrency = {{ limit = 1, key = \"${{input.userId}}\" }}\n{steps}\n\
         [[workflow]]\nid = \"per-workflow\"\nconcurrency = {{ limit = 3 }}\n{steps}"
    )
}

/// Triggers `count` runs of `workflow` round robin over the replicas' current ports, resending a
/// trigger that met a dead replica (up to 30 times). Returns the acknowledged runs with their
/// input.
fn trigger(
    ports: &Mutex<Vec<u16>>,
    workflow: &str,
    count: usize,
    input: impl Fn(usize) -> Value,
) -> Vec<(String, Value)> {
    let agent = agent();
    let mut accepted = Vec::new();
    for i in 0..count {
        for attempt in 0..30 {
            let port = {
                let ports = ports.lock().unwrap();
                ports[(i + attempt) % ports.len()]
            };
            let (status, body) = http(
                agent
                    .post(&format!("http://127.0.0.1:{port}/api/workflows/{workflow}/trigger"))
                    .send_json(json!({ "inputData": input(i) })),
            );
            match status {
                202 => {
                    accepted.push((body["runId"].as_str().unwrap().to_owned(), input(i)));
                    break;
                }
                0 => std::thread::sleep(Duration::from_millis(50)),
                other => panic!("trigger of {workflow} answered {other}: {body}"),
            }
        }
    }
    accepted
}

/// A run's active interval: its first step's start to its end, in ms.
fn active_interval(port: u16, run: &str) -> (u64, u64) {
    let (status, body) = get(&agent(), port, &format!("/api/runs/{run}/history"));
    assert_eq!(status, 200, "{body}");
    let transitions = body["transitions"].as_array().cloned().unwrap_or_default();
    let at = |t: &Value| parse_timestamp(t["at"].as_str().unwrap()).expect("an RFC 3339 time");
    let start = transitions.iter().find(|t| t["type"] == "step_started").map(at).expect("a started step");
    let end = transitions.iter().find(|t| t["type"] == "run_completed").map(at).expect("run_completed");
    (start, end)
}

#[test]
fn concurrency_limits_hold_across_three_replicas_while_one_is_killed_every_two_seconds() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = workflows_file(dir.path(), &workflows());
    let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path())
        .env("LEASE_TTL", "2s")
        .env("MAX_DELIVERIES", "10")
        .env("SHUTDOWN_GRACE", "1s");
    let names: Vec<String> = (0..3).map(|i| format!("limits-{i}")).collect();
    let mut replicas: Vec<Replica> = names.iter().map(|name| config.start(name)).collect();
    let ports = Arc::new(Mutex::new(replicas.iter().map(|r| r.port).collect::<Vec<u16>>()));

    let began = Instant::now();
    let per_user = {
        let ports = Arc::clone(&ports);
        std::thread::spawn(move || {
            trigger(&ports, "per-user", PER_USER_RUNS, |i| json!({ "userId": format!("user-{}", i % USERS), "n": i }))
        })
    };
    let per_workflow = {
        let ports = Arc::clone(&ports);
        std::thread::spawn(move || trigger(&ports, "per-workflow", PER_WORKFLOW_RUNS, |i| json!({ "n": i })))
    };
    kill_round_robin(&config, &names, &mut replicas, &ports, |_| {});
    let per_user = per_user.join().expect("the per-user triggers");
    let per_workflow = per_workflow.join().expect("the per-workflow triggers");
    let port = replicas[0].port;

    // Every run completes.
    let all: Vec<&String> = per_user.iter().chain(&per_workflow).map(|(run, _)| run).collect();
    let mut waiting = all.clone();
    let deadline = Instant::now() + Duration::from_secs(240);
    while !waiting.is_empty() && Instant::now() < deadline {
        waiting.retain(|run| get(&agent(), port, &format!("/api/runs/{run}")).1["status"] != "completed");
        if !waiting.is_empty() {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    assert!(
        waiting.is_empty(),
        "{} runs not completed after 240 s, e.g. {}",
        waiting.len(),
        get(&agent(), port, &format!("/api/runs/{}", waiting[0])).1
    );
    let settled = began.elapsed();

    // Per user: one run at a time. Each replica reads the store's clock through its own
    // calibration, so times of two replicas may differ by a millisecond or two: 5 ms allowed.
    let mut by_user: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for (run, input) in &per_user {
        by_user.entry(input["userId"].as_str().unwrap().to_owned()).or_default().push(active_interval(port, run));
    }
    for (user, intervals) in &mut by_user {
        intervals.sort();
        for pair in intervals.windows(2) {
            assert!(
                pair[1].0 + 5 >= pair[0].1,
                "{user}: a run started at {} while another was active until {}",
                pair[1].0,
                pair[0].1
            );
        }
    }
    // Per workflow: at most three at a time (the same 5 ms allowed at each boundary).
    let mut edges: Vec<(u64, i32)> = Vec::new();
    for (run, _) in &per_workflow {
        let (start, end) = active_interval(port, run);
        edges.push((start + 5, 1));
        edges.push((end, -1));
    }
    edges.sort();
    let (mut active, mut most) = (0, 0);
    for (_, change) in edges {
        active += change;
        most = most.max(active);
    }
    assert!(most <= 3, "{most} per-workflow runs were active at once");

    // No slot is held afterwards (the last releases follow the last commits at once).
    let held = wait_for(Duration::from_secs(10), Duration::from_millis(200), || {
        let keys = redis.cli(&["--scan", "--pattern", "wfo:*:slots:*"]);
        let held: u64 = keys
            .lines()
            .filter(|k| !k.is_empty())
            .map(|k| redis.cli(&["ZCARD", k]).trim().parse::<u64>().unwrap_or(0))
            .sum();
        (held == 0).then_some(held)
    });
    assert_eq!(held, Some(0), "slots still held after every run ended");
    eprintln!(
        "limits: {} per-user runs over {USERS} users and {} per-workflow runs, 10 kills; all completed {:.1} s after the start; at most {most} per-workflow runs active at once",
        per_user.len(),
        per_workflow.len(),
        settled.as_secs_f64()
    );
}

/// A run's first step's start, in ms.
fn first_start(port: u16, run: &str) -> u64 {
    active_interval(port, run).0
}

#[test]
fn a_rate_limit_starts_at_most_its_limit_per_period_across_replicas_and_drops_nothing() {
    const LIMIT: usize = 20;
    const PERIOD_MS: u64 = 2_000;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = workflows_file(
        dir.path(),
        "[[workflow]]\nid = \"rated\"\nrate_limit = { limit = 20, period = \"2s\" }\n\
         [[workflow.step]]\nid = \"only\"\naction = \"noop\"\n",
    );
    let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path());
    let replicas: Vec<Replica> = ["rate-a", "rate-b"].iter().map(|name| config.start(name)).collect();
    let ports = Mutex::new(replicas.iter().map(|r| r.port).collect::<Vec<u16>>());
    let accepted = trigger(&ports, "rated", 200, |i| json!({ "n": i }));
    assert_eq!(accepted.len(), 200);
    let port = replicas[0].port;
    let done = wait_for(Duration::from_secs(60), Duration::from_millis(250), || {
        accepted
            .iter()
            .all(|(run, _)| get(&agent(), port, &format!("/api/runs/{run}")).1["status"] == "completed")
            .then_some(())
    });
    assert!(done.is_some(), "not every rate-limited run completed within 60 s");
    let mut starts: Vec<u64> = accepted.iter().map(|(run, _)| first_start(port, run)).collect();
    starts.sort();
    // In any window of the period, at most LIMIT starts. A start is counted by the store's clock
    // just before the step's start is taken by the replica's: 50 ms are allowed for that lag.
    let mut most = 0;
    for (i, start) in starts.iter().enumerate() {
        let within = starts[i..].iter().take_while(|s| **s < start + PERIOD_MS - 50).count();
        most = most.max(within);
    }
    assert!(most <= LIMIT, "{most} starts within one period");
    let span = starts.last().unwrap() - starts.first().unwrap();
    assert!(span >= 8 * PERIOD_MS, "200 starts at 20 per 2 s take at least 18 s, not {span} ms");
    eprintln!("rate limit: 200 runs started over {span} ms, at most {most} in any {PERIOD_MS} ms window");
}
