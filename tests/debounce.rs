//! Debounce across replicas: two replicas of our binary on a private Redis route a pipe of
//! events of two keys into one run per key, with the last event's input and the count of what
//! it absorbed, though one replica is `kill -9`ed while the bursts wait; REST triggers answer
//! with their burst. Every wait is bounded; no assertion on
//! how long anything took.

use crate::triggers::{redis_cli_stdin, xadds_resp};
use crate::util::{RedisServer, Replica, ReplicaConfig, wait_for, workflows_file};
use serde_json::{Value, json};
use std::time::Duration;

/// A workflow debounced per service, 3 s after the last trigger.
const WORKFLOWS: &str = r#"
[[workflow]]
id = "sync"
events = ["content.changed"]
debounce = { period = "3s", key = "${input.serviceId}" }
[[workflow.step]]
id = "sync"
action = "noop"
"#;

/// The runs of `workflow`, newest first, as their full views.
fn runs(replica: &Replica, workflow: &str) -> Vec<Value> {
    let (status, listed) = replica.get(&format!("/api/runs?workflowId={workflow}&limit=100"));
    assert_eq!(status, 200, "{listed}");
    let ids: Vec<String> =
        listed["runs"].as_array().unwrap().iter().map(|r| r["runId"].as_str().unwrap().to_owned()).collect();
    ids.iter().map(|id| replica.run(id)).collect()
}

/// `wfo_runs_held{workflow="<workflow>",reason="<reason>"}` of `/metrics`.
fn held(replica: &Replica, workflow: &str, reason: &str) -> Option<u64> {
    let text = ureq::get(&format!("{}/metrics", replica.base())).call().ok()?.into_string().ok()?;
    let series = format!("wfo_runs_held{{workflow=\"{workflow}\",reason=\"{reason}\"}} ");
    text.lines().find_map(|line| line.strip_prefix(&series)).and_then(|n| n.trim().parse().ok())
}

/// The events a replica routed (its `/health` counter).
fn routed(replica: &Replica) -> u64 {
    let (_, health) = replica.get("/health");
    health["counters"]["eventsRouted"].as_u64().unwrap_or(0)
}

#[test]
fn a_hundred_events_of_one_key_start_one_run_with_the_last_input_and_two_keys_two() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = workflows_file(dir.path(), WORKFLOWS);
    let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path());
    let mut a = config.start("debounce-a");
    let b = config.start("debounce-b");

    // 100 events of service 1 and 40 of service 2, interleaved, in one pipe.
    let events: Vec<Value> = (0..140)
        .map(|i| match i % 7 {
            0 | 3 => json!({ "serviceId": 2, "n": i }),
            _ => json!({ "serviceId": 1, "n": i }),
        })
        .collect();
    let last_of = |service: u64| events.iter().rev().find(|e| e["serviceId"] == service).unwrap().clone();
    let count_of = |service: u64| events.iter().filter(|e| e["serviceId"] == service).count() as u64;
    assert_eq!((count_of(1), count_of(2)), (100, 40));
    let piped =
        redis_cli_stdin(redis.port, &["--pipe"], &xadds_resp("content.changed", events.iter().map(Value::to_string)));
    assert!(piped.contains("errors: 0, replies: 140"), "redis-cli --pipe: {piped}");

    // While the bursts wait (every event routed), /metrics counts them (two runs held by
    // debounce) and no run exists.
    let seen = wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
        let routed = routed(&a) + routed(&b);
        (routed == 140 && held(&a, "sync", "debounce") == Some(2)).then(|| runs(&a, "sync").len())
    });
    assert_eq!(seen, Some(0), "two bursts held and no run started while they wait");
    // A replica dies while the bursts wait: they are in the store, the other starts them.
    a.kill9();

    // Then one run per key, each completed.
    let started = wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
        let runs = runs(&b, "sync");
        (runs.len() >= 2 && runs.iter().all(|r| r["status"] == "completed")).then_some(runs)
    })
    .expect("two runs completed within 30 s");
    for service in [1, 2] {
        let run = started
            .iter()
            .find(|r| r["input"]["serviceId"] == service)
            .unwrap_or_else(|| panic!("no run of service {service}: {started:?}"));
        assert_eq!(run["input"], last_of(service), "the run has the last event's input: {run}");
        let trigger = &run["trigger"];
        assert_eq!(trigger["kind"], "debounce", "{run}");
        assert_eq!(trigger["triggers"], count_of(service), "the run records what it absorbed: {run}");
        assert_eq!(trigger["last"]["kind"], "event", "{run}");
        assert_eq!(trigger["last"]["eventType"], "content.changed", "{run}");
    }
    // Nothing more starts (a period and more later), and every event was routed and settled.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(runs(&b, "sync").len(), 2, "exactly one run per key");
    assert_eq!(held(&b, "sync", "debounce"), Some(0), "no burst left");
    let pending = redis.cli(&["XPENDING", "wfo:events", "router"]);
    assert_eq!(pending.lines().next().map(str::trim), Some("0"), "every event settled: {pending}");
}

#[test]
fn rest_triggers_of_a_debounced_workflow_answer_with_their_burst_and_its_run_records_them() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = workflows_file(dir.path(), WORKFLOWS);
    let replica = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()).start("debounce-rest");

    let trigger = |input: Value, key: Option<&str>| {
        let mut request = ureq::post(&format!("{}/api/workflows/sync/trigger", replica.base()));
        if let Some(key) = key {
            request = request.set("Idempotency-Key", key);
        }
        crate::util::http(request.send_json(json!({ "inputData": input })))
    };
    let mut burst = None;
    for n in 1..=5u64 {
        let (status, body) = trigger(json!({ "serviceId": "a", "n": n }), Some(&format!("k{n}")));
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["status"], "debounced", "{body}");
        assert_eq!(body["duplicate"], false, "{body}");
        assert_eq!(body["triggers"], n, "{body}");
        assert!(body["startsAt"].is_string() && body.get("runId").is_none(), "{body}");
        let id = body["burstId"].as_str().unwrap().to_owned();
        assert_eq!(burst.get_or_insert_with(|| id.clone()), &id, "one burst for the key");
    }
    let burst = burst.unwrap();
    // A repeated idempotency key is not counted again.
    let (status, body) = trigger(json!({ "serviceId": "a", "n": 99 }), Some("k2"));
    assert_eq!(status, 200, "{body}");
    assert_eq!((body["duplicate"].clone(), body["burstId"].clone()), (json!(true), json!(burst)), "{body}");
    // A key that does not render from the input is refused, naming the problem.
    let (status, body) = trigger(json!({ "other": 1 }), None);
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("debounce key"), "{body}");

    let run_id = replica.debounced_run("sync", &burst, Duration::from_secs(30));
    let run = replica.wait_terminal(&run_id, Duration::from_secs(30));
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["input"], json!({ "serviceId": "a", "n": 5 }), "the last trigger's input: {run}");
    assert_eq!(run["trigger"]["triggers"], 5, "{run}");
    assert_eq!(run["trigger"]["last"], json!({ "kind": "api" }), "{run}");
    let (_, listed) = replica.get("/api/workflows");
    let sync = listed["workflows"].as_array().unwrap().iter().find(|w| w["id"] == "sync").unwrap().clone();
    assert_eq!(sync["debounce"], json!({ "period": "3s", "key": "${input.serviceId}" }), "{sync}");
}
