//! Failures, end to end, with real processes: a private redis-server, replicas of our binary.
//!
//! What goes wrong in production, and what the engine promises then: steps that keep failing are
//! retried per their policy and then fail the run with the step's own error; steps that hang are
//! timed out and their processes killed; steps that crash their replica stop after a bounded
//! number of deliveries; a Redis restart and a SIGTERM under load lose no run and leave no work
//! orphaned. No test asserts on how long things took; they assert on what was recorded.

use crate::util::{RedisServer, Replica, ReplicaConfig, wait_for, workflows_file};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

// ---- helpers ----

/// The `type` of each transition, in order.
fn kinds(history: &[Value]) -> Vec<String> {
    history.iter().map(|t| t["type"].as_str().unwrap_or("?").to_owned()).collect()
}

fn count(history: &[Value], kind: &str) -> usize {
    history.iter().filter(|t| t["type"] == kind).count()
}

/// An RFC 3339 timestamp of the history, as a point in time.
fn instant_of(value: &Value) -> SystemTime {
    let text = value.as_str().unwrap_or_else(|| panic!("expected an RFC 3339 timestamp, got {value}"));
    humantime::parse_rfc3339(text).unwrap_or_else(|err| panic!("`{text}` is not RFC 3339: {err}"))
}

/// Whether a process with this pid exists (`kill -0`).
fn process_exists(pid: &str) -> bool {
    std::process::Command::new("kill")
        .args(["-0", pid])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Pending entries in every shard's `workers` group (the first line of `XPENDING key group`), of
/// the shards the replicas recorded.
fn pending_per_shard(redis: &RedisServer) -> BTreeMap<u16, u64> {
    let recorded = redis.cli(&["GET", "wfo:shards"]);
    let shards: u16 = recorded.trim().parse().unwrap_or_else(|_| panic!("no shard count recorded: {recorded:?}"));
    (0..shards)
        .map(|shard| {
            let reply = redis.cli(&["XPENDING", &format!("wfo:{{{shard}}}:ready"), "workers"]);
            let pending = reply
                .lines()
                .next()
                .and_then(|l| l.trim().parse().ok())
                .unwrap_or_else(|| panic!("XPENDING wfo:{{{shard}}}:ready workers answered {reply:?}"));
            (shard, pending)
        })
        .collect()
}

/// An HTTP client with timeouts, for loops that must stay bounded even if a replica hangs.
fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(2)).timeout(Duration::from_secs(20)).build()
}

/// `POST /api/workflows/:id/trigger` with an optional `Idempotency-Key`; status and body, even
/// when the replica is unreachable (status 0).
fn post_trigger(agent: &ureq::Agent, replica: &Replica, workflow: &str, key: Option<&str>) -> (u16, Value) {
    let mut request = agent.post(&format!("{}/api/workflows/{workflow}/trigger", replica.base()));
    if let Some(key) = key {
        request = request.set("Idempotency-Key", key);
    }
    crate::util::http(request.send_json(json!({ "inputData": {} })))
}

fn status_of(agent: &ureq::Agent, replica: &Replica, run_id: &str) -> Option<String> {
    match crate::util::http(agent.get(&format!("{}/api/runs/{run_id}", replica.base())).call()) {
        (200, body) => body["status"].as_str().map(str::to_owned),
        _ => None,
    }
}

fn is_terminal(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled" | "timed_out")
}

// ---- 1. retries ----

const ALWAYS_FAILS: &str = r#"
[[workflow]]
id = "always-fails"
[[workflow.step]]
id = "boom"
action = "exec"
with = { command = ["sh", "-c", "echo boom-$WFO_ATTEMPT >&2; exit 1"] }
retry = { max_attempts = 4, initial_backoff = "200ms", max_backoff = "1s", multiplier = 2.0, jitter = 0.2 }
"#;

#[test]
fn an_always_failing_step_is_retried_per_its_policy_then_fails_the_run() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = workflows_file(dir.path(), ALWAYS_FAILS);
    let replica = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()).start("retrier");

    let run_id = replica.trigger("always-fails", json!({}));
    let run = replica.wait_terminal(&run_id, Duration::from_secs(30));
    assert_eq!(run["status"], "failed", "{run}");
    let run_error = run["error"].as_str().unwrap_or_default();
    assert!(run_error.contains("boom-4") && run_error.contains("attempt 4"), "run error: {run_error}");
    assert_eq!(run["steps"][0]["attempts"], 4, "{run}");

    let history = replica.history(&run_id);
    let mut expected = vec!["run_created"];
    for _ in 0..3 {
        expected.extend(["step_started", "step_failed", "timer_fired"]);
    }
    expected.extend(["step_started", "step_failed", "run_failed"]);
    assert_eq!(kinds(&history), expected, "{history:#?}");

    let failures: Vec<&Value> = history.iter().filter(|t| t["type"] == "step_failed").collect();
    // Each attempt reports its own stderr: the error is the attempt's, not a stale one.
    for (index, failure) in failures.iter().enumerate() {
        let attempt = index as u64 + 1;
        assert_eq!(failure["attempt"], attempt, "{failure}");
        let error = failure["error"].as_str().unwrap_or_default();
        assert!(error.contains(&format!("boom-{attempt}")), "attempt {attempt}: {error}");
    }
    // The recorded backoffs (retryAt - at, both the store's clock) follow the policy: base
    // 200 ms doubling, capped at 1 s, each within +-20 % jitter (ms rounding aside).
    for (index, failure) in failures[..3].iter().enumerate() {
        let base = [200.0, 400.0, 800.0][index];
        let delay = instant_of(&failure["retryAt"]).duration_since(instant_of(&failure["at"])).unwrap();
        let delay = delay.as_millis() as f64;
        assert!(
            (base * 0.8 - 2.0..=base * 1.2 + 2.0).contains(&delay),
            "attempt {} was retried after {delay} ms; the policy allows {base} ms +-20 %",
            index + 1
        );
        eprintln!("attempt {}: backoff {delay} ms (base {base} ms)", index + 1);
    }
    assert!(failures[3]["retryAt"].is_null(), "the last attempt is final: {}", failures[3]);
    let last_error = failures[3]["error"].as_str().unwrap_or_default();
    assert!(run_error.contains(last_error), "the run error ({run_error}) carries the last step error ({last_error})");
}

// ---- 2. timeouts ----

#[test]
fn a_step_past_its_timeout_is_failed_and_retried() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    // Each attempt records its pid, then becomes `sleep 30` (exec keeps the pid), so that we
    // can check the timeout killed it instead of leaving it behind.
    let toml = format!(
        r#"
[[workflow]]
id = "hangs"
[[workflow.step]]
id = "hang"
action = "exec"
with = {{ command = ["sh", "-c", "echo $$ >> pids; exec sleep 30"], cwd = "{}" }}
timeout = "500ms"
retry = {{ max_attempts = 2, initial_backoff = "100ms", max_backoff = "100ms" }}
"#,
        dir.path().display()
    );
    let file = workflows_file(dir.path(), &toml);
    let replica = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()).start("timer");

    let run_id = replica.trigger("hangs", json!({}));
    let run = replica.wait_terminal(&run_id, Duration::from_secs(30));
    assert_eq!(run["status"], "failed", "{run}");
    let run_error = run["error"].as_str().unwrap_or_default();
    assert!(run_error.contains("timed out after 500ms"), "run error: {run_error}");

    let history = replica.history(&run_id);
    assert_eq!(
        kinds(&history),
        ["run_created", "step_started", "step_failed", "timer_fired", "step_started", "step_failed", "run_failed"],
        "{history:#?}"
    );
    for failure in history.iter().filter(|t| t["type"] == "step_failed") {
        let error = failure["error"].as_str().unwrap_or_default();
        assert!(error.contains("timed out"), "{failure}");
    }

    let pids = std::fs::read_to_string(dir.path().join("pids")).expect("the step wrote its pids");
    let pids: Vec<&str> = pids.split_whitespace().collect();
    assert_eq!(pids.len(), 2, "one pid per attempt: {pids:?}");
    for pid in pids {
        let gone = wait_for(Duration::from_secs(5), Duration::from_millis(50), || (!process_exists(pid)).then_some(()));
        assert!(gone.is_some(), "the timed-out `sleep 30` (pid {pid}) is still alive");
    }
}

// ---- 3. a step that kills its replica ----

const KILLS_ITS_REPLICA: &str = r#"
[[workflow]]
id = "kills-replica"
[[workflow.step]]
id = "suicide"
action = "exec"
with = { command = ["sh", "-c", "kill -9 $PPID"] }
"#;

#[test]
fn a_step_that_kills_its_replica_fails_the_run_after_bounded_deliveries() {
    const MAX_DELIVERIES: usize = 3;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = workflows_file(dir.path(), KILLS_ITS_REPLICA);
    // The exec action spawns the command directly (src/actions/exec.rs), so `$PPID` of the
    // shell is the replica itself.
    let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path())
        .env("MAX_DELIVERIES", &MAX_DELIVERIES.to_string())
        .env("LEASE_TTL", "1s");
    let names = ["a", "b"];
    let mut replicas: Vec<Replica> = names.iter().map(|name| config.start(name)).collect();
    let http = agent();

    // The replica that takes the trigger may die before it answers: retry on the other under
    // the same idempotency key, which returns the same run.
    let run_id = (0..10)
        .find_map(|round| {
            let (status, body) = post_trigger(&http, &replicas[round % 2], "kills-replica", Some("only-once"));
            matches!(status, 200 | 202).then(|| body["runId"].as_str().expect("runId").to_owned())
        })
        .expect("the trigger is acknowledged by one of the replicas");

    // Whenever a replica dies, start it again, as an orchestrator (systemd, Kubernetes) would.
    let mut deaths = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let final_status = loop {
        for (slot, name) in names.iter().enumerate() {
            if let Some(status) = replicas[slot].exited() {
                deaths.push((name.to_string(), status));
                assert!(deaths.len() <= 3 * MAX_DELIVERIES, "replicas keep dying: {deaths:?}");
                replicas[slot] = config.start(name);
            }
        }
        let status = replicas.iter().find_map(|r| status_of(&http, r, &run_id));
        if let Some(status) = status.filter(|s| is_terminal(s)) {
            break status;
        }
        assert!(Instant::now() < deadline, "run {run_id} did not finish within 60 s; deaths so far: {deaths:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("replica deaths: {deaths:?}");

    assert_eq!(final_status, "failed");
    let survivor = replicas.iter().find(|r| status_of(&http, r, &run_id).is_some()).expect("a live replica");
    let run = survivor.run(&run_id);
    let run_error = run["error"].as_str().unwrap_or_default();
    assert!(
        run_error.contains(&format!("delivered {} times", MAX_DELIVERIES + 1))
            && run_error.contains(&format!("limit {MAX_DELIVERIES}")),
        "run error: {run_error}"
    );
    // Every death was the step's SIGKILL, one per delivery up to the limit; the delivery past
    // the limit fails the run without running the step again.
    assert!(deaths.iter().all(|(_, status)| status.signal() == Some(9)), "{deaths:?}");
    assert_eq!(deaths.len(), MAX_DELIVERIES, "one death per allowed delivery: {deaths:?}");
    let history = survivor.history(&run_id);
    assert_eq!(kinds(&history), ["run_created", "step_started", "step_failed", "run_failed"], "{history:#?}");
    assert!(history[2]["retryAt"].is_null(), "a step that crashes replicas is not retried: {}", history[2]);
    // Nothing is left pending: the entry was acknowledged with the failure.
    let pending = pending_per_shard(&redis);
    assert!(pending.values().all(|&n| n == 0), "pending entries left: {pending:?}");
}

// ---- 3b. a killed replica's step, taken over ----

/// Its first start waits (for its replica to be killed); a later start finishes at once. Each
/// start appends its time (ns since the epoch) to `starts` in the working directory.
const TAKEN_OVER: &str = r#"
[[workflow]]
id = "taken-over"
[[workflow.step]]
id = "hold"
action = "exec"
with = { command = ["sh", "-c", "n=$(cat starts 2>/dev/null | wc -l); date +%s%N >> starts; if [ \"$n\" -gt 0 ]; then echo resumed; else sleep 60; fi"], cwd = "{dir}" }
timeout = "2m"
"#;

/// A step whose replica is `kill -9`ed starts again on another replica once its lease expired,
/// and completes once. Prints how long after the kill it started again, the failover figure of
/// the README (the lease is renewed every third of `LEASE_TTL`, so its last renewal was up to a
/// third of it before the kill); asserts only what was recorded.
#[test]
fn a_killed_replicas_step_starts_again_on_another_once_its_lease_expired() {
    const TRIALS: usize = 3;
    let redis = RedisServer::start();
    let mut delays = Vec::new();
    for trial in 0..TRIALS {
        let dir = tempfile::tempdir().unwrap();
        let text = TAKEN_OVER.replace("{dir}", &dir.path().display().to_string());
        let file = workflows_file(dir.path(), &text);
        let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path())
            .env("LEASE_TTL", "4s")
            .env("KEY_PREFIX", &format!("takeover{trial}"));
        let mut first = config.start("first");
        let run_id = first.trigger("taken-over", json!({}));
        let starts = dir.path().join("starts");
        let lines = |at_least: usize| {
            wait_for(Duration::from_secs(30), Duration::from_millis(5), || {
                let text = std::fs::read_to_string(&starts).ok()?;
                let times: Vec<u128> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
                (times.len() >= at_least).then_some(times)
            })
        };
        lines(1).expect("the step starts on the first replica");
        let second = config.start("second");
        let killed_at = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_nanos();
        first.kill9();
        let times = lines(2).expect("the step starts again on the second replica");
        let run = second.wait_terminal(&run_id, Duration::from_secs(30));
        assert_eq!(run["status"], "completed", "{run}");
        let history = second.history(&run_id);
        assert_eq!(count(&history, "step_completed"), 1, "{history:#?}");
        assert_eq!(history.iter().rfind(|t| t["type"] == "step_completed").unwrap()["replica"], "second");
        delays.push(Duration::from_nanos((times[1].saturating_sub(killed_at)) as u64));
    }
    eprintln!(
        "LEASE_TTL 4 s: the step started again {} after its replica was killed",
        delays.iter().map(|d| format!("{} ms", d.as_millis())).collect::<Vec<_>>().join(", ")
    );
}

// ---- 3b. A ready entry this build cannot read ----

const TWO_NOOPS: &str = r#"
[[workflow]]
id = "two"
[[workflow.step]]
id = "one"
action = "noop"
[[workflow.step]]
id = "two"
action = "noop"
"#;

/// A ready entry that does not decode (one queued by the build before steps formed a graph, or
/// any corrupt one) is dead-lettered with its reason, and its run, left with no live entry, is
/// queued again from its log by the sweeper: it completes, each step once.
#[test]
fn an_undecodable_ready_entry_is_dead_lettered_and_its_run_queued_again_from_its_log() {
    use workflow_orchestrator::definition::Registry;
    use workflow_orchestrator::machine::{self, Recorded, Transition, Trigger};
    use workflow_orchestrator::store::prelude::*;
    use workflow_orchestrator::store::redis::RedisStore;
    use workflow_orchestrator::store::{Created, NewRun, RunId};

    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = workflows_file(dir.path(), TWO_NOOPS);
    let replica = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()).env("LEASE_TTL", "1s").start("a");

    // A run created without a ready entry of this build: only one the build cannot decode.
    let registry = Registry::parse("two.toml", TWO_NOOPS).unwrap();
    let workflow = registry.get("two").unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let run = runtime.block_on(async {
        let store = RedisStore::open(&redis.url(), "wfo", None).await.expect("the test connects to Redis");
        let now = store.now().await.unwrap();
        let created = Recorded {
            at: now,
            replica: None,
            transition: Transition::RunCreated {
                workflow: "two".to_owned(),
                definition: workflow.hash.clone(),
                input: "{}".to_owned(),
                trigger: Trigger::Api,
                trace: None,
            },
        };
        let advanced = machine::advance(None, &workflow.def, vec![created], now).unwrap();
        let run = RunId::new(0, now);
        let new = NewRun {
            run: run.clone(),
            state: advanced.state,
            records: advanced.appended,
            dispatch: Vec::new(),
            idempotency: None,
            search: Vec::new(),
        };
        assert_eq!(store.create_run(new).await.unwrap(), Created::New(run.clone()));
        run
    });
    let stream = "wfo:{0}:ready";
    let entry =
        redis.cli(&["XADD", stream, "*", "run", &run.to_string(), "data", "\u{92}\u{a5}old shape"]).trim().to_owned();
    redis.cli(&["HSET", &format!("wfo:{{0}}:run:{run}"), "ready_entry", &entry]);

    let run_id = run.to_string();
    let settled = replica.wait_terminal(&run_id, Duration::from_secs(30));
    assert_eq!(settled["status"], "completed", "{settled}; log:\n{}", replica.log_text());
    let history = replica.history(&run_id);
    assert_eq!(count(&history, "step_completed"), 2, "{history:#?}");
    let dead = redis.cli(&["XRANGE", "wfo:{0}:ready:dead", "-", "+"]);
    assert!(dead.contains(&entry) || dead.contains(&run_id), "the entry was dead-lettered: {dead}");
    assert!(dead.contains("undecodable"), "with its reason: {dead}");
    assert!(replica.log_text().contains("re-queued it"), "the sweeper queued the run again:\n{}", replica.log_text());
}

// ---- 4. Redis restarted under load ----

const THREE_SHORT_STEPS: &str = r#"
[[workflow]]
id = "three"
[[workflow.step]]
id = "one"
action = "exec"
with = { command = ["sleep", "0.02"] }
[[workflow.step]]
id = "two"
action = "exec"
with = { command = ["sleep", "0.05"] }
[[workflow.step]]
id = "three"
action = "exec"
with = { command = ["sleep", "0.03"] }
"#;

#[test]
fn redis_restarted_under_load_loses_no_run() {
    let mut redis = RedisServer::start_aof();
    let dir = tempfile::tempdir().unwrap();
    let file = workflows_file(dir.path(), THREE_SHORT_STEPS);
    // A short lease, so that a step whose commit failed while Redis was away is taken over soon.
    let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()).env("LEASE_TTL", "2s");
    let mut replicas = [config.start("a"), config.start("b")];
    let http = agent();

    // Run ids acknowledged with 202, with when each trigger was sent and answered (for the
    // report only: how many triggers waited through the outage).
    let acknowledged = Mutex::new(Vec::<(String, Duration, Duration)>::new());
    let refused = Mutex::new(Vec::<(u16, Value)>::new());
    let outage = Mutex::new((Duration::MAX, Duration::MAX));
    let started = Instant::now();
    std::thread::scope(|scope| {
        for replica in &replicas {
            let (http, acknowledged, refused) = (&http, &acknowledged, &refused);
            scope.spawn(move || {
                while started.elapsed() < Duration::from_secs(6) {
                    let sent = started.elapsed();
                    match post_trigger(http, replica, "three", None) {
                        (202, body) => {
                            let run = body["runId"].as_str().unwrap().to_owned();
                            acknowledged.lock().unwrap().push((run, sent, started.elapsed()));
                        }
                        other => refused.lock().unwrap().push(other),
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        }
        // In the middle of the load: a clean stop (AOF fsynced, so nothing acknowledged is
        // lost: guarantee 3 is about crashes), two seconds without Redis, then back.
        std::thread::sleep(Duration::from_secs(2));
        redis.stop_clean();
        *outage.lock().unwrap() = (started.elapsed(), Duration::MAX);
        std::thread::sleep(Duration::from_secs(2));
        redis.start_again();
        outage.lock().unwrap().1 = started.elapsed();
    });
    let (down, up) = outage.into_inner().unwrap();
    let acknowledged = acknowledged.into_inner().unwrap();
    let across = acknowledged.iter().filter(|(_, sent, answered)| *sent < up && *answered > down).count();
    let acknowledged: Vec<String> = acknowledged.into_iter().map(|(run, _, _)| run).collect();
    let refused = refused.into_inner().unwrap();
    eprintln!(
        "Redis down from {down:?} to {up:?}; {} triggers acknowledged ({across} of them waited through the outage), {} refused",
        acknowledged.len(),
        refused.len()
    );
    for (status, body) in refused.iter().take(5) {
        eprintln!("  refused: {status} {body}");
    }
    assert!(acknowledged.len() >= 20, "the load was real: {} runs", acknowledged.len());
    assert_eq!(acknowledged.iter().collect::<HashSet<_>>().len(), acknowledged.len(), "run ids are unique");

    // The replicas reconnect by themselves: both are still the processes started above.
    for replica in &mut replicas {
        assert!(replica.exited().is_none(), "{} exited:\n{}", replica.name, replica.log_text());
    }
    for replica in &replicas {
        let healthy = wait_for(Duration::from_secs(30), Duration::from_millis(200), || {
            (replica.get("/health").0 == 200).then_some(())
        });
        assert!(healthy.is_some(), "{} /health is not 200 again: {}", replica.name, replica.get("/health").1);
    }

    // Every acknowledged run completes.
    let mut unfinished: Vec<&String> = acknowledged.iter().collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !unfinished.is_empty() && Instant::now() < deadline {
        unfinished.retain(|run| !status_of(&http, &replicas[0], run).is_some_and(|s| is_terminal(&s)));
        if !unfinished.is_empty() {
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    let lost: Vec<(String, Value)> =
        unfinished.iter().map(|run| (run.to_string(), replicas[0].get(&format!("/api/runs/{run}")).1)).collect();
    assert!(lost.is_empty(), "{} acknowledged runs did not finish: {lost:#?}", lost.len());
    for run in &acknowledged {
        let body = replicas[0].run(run);
        assert_eq!(body["status"], "completed", "{body}");
    }
    eprintln!("all {} acknowledged runs completed at {:?}", acknowledged.len(), started.elapsed());
    for replica in &replicas {
        eprintln!("{} counters: {}", replica.name, replica.get("/health").1["counters"]);
    }
}

// ---- 5. SIGTERM under load ----

#[test]
fn sigterm_under_load_finishes_in_flight_steps_and_exits_zero() {
    const RUNS: usize = 40;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    // Each step notes which replica runs it (its parent's pid) as it starts, so that the test
    // knows when replica A has steps in flight.
    let toml = format!(
        r#"
[[workflow]]
id = "slow"
[[workflow.step]]
id = "first"
action = "exec"
with = {{ command = ["sh", "-c", "echo $PPID >> started; sleep 1"], cwd = "{0}" }}
[[workflow.step]]
id = "second"
action = "exec"
with = {{ command = ["sh", "-c", "echo $PPID >> started; sleep 1"], cwd = "{0}" }}
"#,
        dir.path().display()
    );
    let file = workflows_file(dir.path(), &toml);
    let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path())
        .env("SHUTDOWN_GRACE", "10s")
        .env("LEASE_TTL", "3s");
    let mut a = config.start("a");
    let b = config.start("b");

    let runs: Vec<String> =
        (0..RUNS).map(|i| if i % 2 == 0 { &a } else { &b }.trigger("slow", json!({ "i": i }))).collect();
    let a_pid = a.pid().to_string();
    let started_file = dir.path().join("started");
    let a_busy = wait_for(Duration::from_secs(20), Duration::from_millis(20), || {
        let started = std::fs::read_to_string(&started_file).unwrap_or_default();
        started.lines().any(|pid| pid == a_pid).then_some(())
    });
    assert!(a_busy.is_some(), "replica A never started a step");

    a.signal("TERM");
    let code = a.wait_exit(Duration::from_secs(10 + 10));
    assert_eq!(code, Some(0), "A exits 0 within the grace period; log:\n{}", a.log_text());
    assert!(a.log_text().contains("stopped cleanly"), "A finished its in-flight steps in time:\n{}", a.log_text());

    for run in &runs {
        let body = b.wait_terminal(run, Duration::from_secs(60));
        assert_eq!(body["status"], "completed", "{body}");
    }
    let mut by_replica: BTreeMap<String, usize> = BTreeMap::new();
    for run in &runs {
        let history = b.history(run);
        // Exactly one accepted completion per step: nothing ran twice to completion.
        for step in ["first", "second"] {
            let completions = history.iter().filter(|t| t["type"] == "step_completed" && t["step"] == step).count();
            assert_eq!(completions, 1, "run {run} step {step}: {history:#?}");
        }
        assert_eq!(count(&history, "step_failed"), 0, "run {run}: {history:#?}");
        for t in history.iter().filter(|t| t["type"] == "step_completed") {
            *by_replica.entry(t["replica"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
        }
    }
    eprintln!("step completions by replica: {by_replica:?}");
    assert!(by_replica.get("a").is_some_and(|&n| n > 0), "A completed its in-flight steps: {by_replica:?}");

    // Nothing orphaned: no entry pending in any shard's group, and B never had to take over a
    // step of A's after lease expiry (A handed everything back or finished it).
    let pending = pending_per_shard(&redis);
    assert!(pending.values().all(|&n| n == 0), "pending entries left: {pending:?}");
    let counters = b.get("/health").1["counters"].clone();
    eprintln!("B counters: {counters}");
    assert_eq!(counters["stepsReclaimed"], 0, "B took over steps A left behind; B's log:\n{}", b.log_text());
}
