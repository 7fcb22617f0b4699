//! Pausing and resuming a workflow, with real replicas on a private Redis: while paused nothing
//! of it runs (triggers are accepted, their runs wait, cron does not fire), a replica killed
//! meanwhile changes nothing, and on resume the waiting runs go on in creation order and the
//! missed cron fires follow the catch-up policy. Every loop is bounded in count and time.

use crate::chaos::{agent, get};
use crate::util::{RedisServer, ReplicaConfig, http, wait_for, workflows_file};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const WORKFLOWS: &str = r#"
[[workflow]]
id = "held"
description = "one short step"
[[workflow.step]]
id = "only"
action = "noop"

[[workflow]]
id = "ticking"
description = "fires every second"
schedule = "* * * * * *"
catchup = "latest"
overlap = "allow"
[[workflow.step]]
id = "tick"
action = "noop"
"#;

fn post(port: u16, path: &str) -> (u16, Value) {
    http(agent().post(&format!("http://127.0.0.1:{port}{path}")).send_json(json!({})))
}

/// The ids of `workflow`'s runs, oldest first (at most 500).
fn runs(port: u16, workflow: &str) -> Vec<Value> {
    let (status, body) = get(&agent(), port, &format!("/api/runs?workflowId={workflow}&limit=500"));
    assert_eq!(status, 200, "{body}");
    let mut runs = body["runs"].as_array().cloned().unwrap_or_default();
    runs.reverse();
    runs
}

fn history(port: u16, run: &str) -> Vec<Value> {
    let (status, body) = get(&agent(), port, &format!("/api/runs/{run}/history"));
    assert_eq!(status, 200, "{body}");
    body["transitions"].as_array().cloned().unwrap_or_default()
}

/// `wfo_runs_held{workflow="held",reason="pause"}` from a replica's `/metrics`.
fn held_metric(port: u16) -> Option<u64> {
    let text = agent().get(&format!("http://127.0.0.1:{port}/metrics")).call().ok()?.into_string().ok()?;
    text.lines()
        .find(|line| line.starts_with("wfo_runs_held{workflow=\"held\""))
        .and_then(|line| line.rsplit(' ').next()?.parse().ok())
}

#[test]
fn a_paused_workflow_runs_nothing_until_resumed_then_its_runs_go_on_in_creation_order() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = workflows_file(dir.path(), WORKFLOWS);
    // One shard and one executor on the replica that resumes, so that the order in which the
    // held runs are queued again is the order in which they start.
    let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path())
        .env("SHARDS", "1")
        .env("MAX_CONCURRENT_STEPS", "1")
        .env("LEASE_TTL", "2s");
    let a = config.start("pause-a");
    let mut b = config.start("pause-b");

    // Unknown workflows are refused; pausing is idempotent.
    let (status, body) = post(a.port, "/api/workflows/nope/pause");
    assert_eq!(status, 404, "{body}");
    for workflow in ["held", "ticking"] {
        for _ in 0..2 {
            let (status, body) = post(b.port, &format!("/api/workflows/{workflow}/pause"));
            assert_eq!(status, 200, "{body}");
            assert_eq!(body, json!({ "workflowId": workflow, "paused": true }));
        }
    }
    // Seen by the other replica within a second.
    let seen = wait_for(Duration::from_secs(2), Duration::from_millis(50), || {
        let (_, body) = get(&agent(), a.port, "/api/workflows");
        let paused = |id: &str| body["workflows"].as_array()?.iter().find(|w| w["id"] == id)?["paused"].as_bool();
        (paused("held") == Some(true) && paused("ticking") == Some(true)).then_some(())
    });
    assert!(seen.is_some(), "replica a does not show the workflows paused");
    let paused_at = Instant::now();
    let cron_runs_before = runs(a.port, "ticking").len();

    // Triggers are accepted while paused, over both replicas.
    let mut triggered = Vec::new();
    for i in 0..50 {
        let port = if i % 2 == 0 { a.port } else { b.port };
        let (status, body) = http(
            agent()
                .post(&format!("http://127.0.0.1:{port}/api/workflows/held/trigger"))
                .send_json(json!({ "inputData": { "n": i } })),
        );
        assert_eq!(status, 202, "{body}");
        triggered.push(body["runId"].as_str().unwrap().to_owned());
    }
    // A replica killed while paused (it may hold claimed steps) changes nothing.
    b.kill9();
    std::thread::sleep(Duration::from_secs(3));
    for run in &triggered {
        let transitions = history(a.port, run);
        assert!(
            transitions.iter().all(|t| t["type"] != "step_started"),
            "run {run} started a step while its workflow was paused: {transitions:#?}"
        );
        let (_, body) = get(&agent(), a.port, &format!("/api/runs/{run}"));
        assert_eq!(body["status"], "pending", "run {run}: {body}");
    }
    // Every run is held (the killed replica's claims come back once their leases expire).
    let held = wait_for(Duration::from_secs(15), Duration::from_millis(200), || {
        held_metric(a.port).filter(|held| *held == 50)
    });
    assert_eq!(held, Some(50), "/metrics wfo_runs_held: {:?}", held_metric(a.port));
    // Cron did not fire while paused (runs created before the pause may be there).
    let cron_runs_paused = runs(a.port, "ticking").len();
    assert!(
        cron_runs_paused <= cron_runs_before + 1,
        "cron started {} runs while paused ({cron_runs_before} before)",
        cron_runs_paused - cron_runs_before
    );
    let (_, status_body) = get(&agent(), a.port, "/api/workflows/held/status");
    assert_eq!(status_body["paused"], true, "{status_body}");

    // Resume: everything completes, in creation order.
    for workflow in ["held", "ticking"] {
        let (status, body) = post(a.port, &format!("/api/workflows/{workflow}/resume"));
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, json!({ "workflowId": workflow, "paused": false }));
    }
    let resumed_at = Instant::now();
    let done = wait_for(Duration::from_secs(60), Duration::from_millis(200), || {
        triggered
            .iter()
            .all(|run| get(&agent(), a.port, &format!("/api/runs/{run}")).1["status"] == "completed")
            .then_some(())
    });
    assert!(done.is_some(), "not every run completed within 60 s of the resume");
    // Creation order is the order of the runs' recorded creation times (each replica's clock,
    // in ms): runs created in the same millisecond on two replicas have no order between them.
    let mut created_then_started: Vec<(String, String)> = triggered
        .iter()
        .map(|run| {
            let (_, body) = get(&agent(), a.port, &format!("/api/runs/{run}"));
            let transitions = history(a.port, run);
            let started = transitions.iter().find(|t| t["type"] == "step_started").expect("a started step");
            (body["createdAt"].as_str().unwrap().to_owned(), started["at"].as_str().unwrap().to_owned())
        })
        .collect();
    created_then_started.sort();
    // RFC 3339 times of one format order as text.
    for pair in created_then_started.windows(2) {
        let ((created_0, started_0), (created_1, started_1)) = (&pair[0], &pair[1]);
        assert!(
            created_0 == created_1 || started_0 <= started_1,
            "a run created at {created_1} started at {started_1}, before one created at {created_0} (started at {started_0})"
        );
    }
    // The missed cron fires follow the catch-up policy (`latest`: one run for them), then the
    // schedule goes on.
    let cron_resumed = wait_for(Duration::from_secs(10), Duration::from_millis(200), || {
        (runs(a.port, "ticking").len() > cron_runs_paused).then_some(())
    });
    assert!(cron_resumed.is_some(), "cron did not fire after the resume");
    assert_eq!(held_metric(a.port), None, "no paused workflow, no held gauge");
    eprintln!(
        "paused {:.1} s; 50 runs held and released in creation order; resumed runs all completed {:.1} s after the resume",
        resumed_at.duration_since(paused_at).as_secs_f64(),
        resumed_at.elapsed().as_secs_f64()
    );
}
