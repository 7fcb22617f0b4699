//! Child workflows end to end, on a private redis-server with real processes of our binary: a
//! parent whose two children run in parallel, a child that fails once and is started again by
//! its parent's retry, a parent cancelled while its child sleeps, and a parent whose replica is
//! killed while its child runs. Every loop is bounded; nothing asserts on how long things took.

use crate::util::{RedisServer, ReplicaConfig, Served, wait_for, workflows_file};
use serde_json::{Value, json};
use std::time::Duration;

const FAMILY: &str = r#"
[[workflow]]
id = "parent"
[[workflow.step]]
id = "left"
action = "workflow"
needs = []
with = { workflow = "double", input = { n = "${input.n}" } }
[[workflow.step]]
id = "right"
action = "workflow"
needs = []
with = { workflow = "double", input = { n = 10 } }
[[workflow.step]]
id = "sum"
action = "noop"
needs = ["left", "right"]

[[workflow]]
id = "double"
result = "twice"
[[workflow.step]]
id = "wait"
action = "sleep"
with = { duration = "300ms" }
[[workflow.step]]
id = "twice"
action = "exec"
with = { command = ["sh", "-c", "n=$(printf '%s' \"$WFO_INPUT\" | tr -dc 0-9); printf '{\"doubled\":%d}' $((n * 2))"] }
[[workflow.step]]
id = "after"
action = "noop"

[[workflow]]
id = "flaky-parent"
[[workflow.step]]
id = "call"
action = "workflow"
retry = { max_attempts = 2, initial_backoff = "100ms", jitter = 0.0 }
with = { workflow = "flaky" }

[[workflow]]
id = "flaky"
[[workflow.step]]
id = "once"
action = "exec"
retry = { max_attempts = 1 }
with = { command = ["sh", "-c", "test -f {dir}/tried && echo '{\"ok\":true}' || { touch {dir}/tried; exit 3; }"] }

[[workflow]]
id = "sleepy-parent"
[[workflow.step]]
id = "call"
action = "workflow"
with = { workflow = "sleepy" }

[[workflow]]
id = "sleepy"
[[workflow.step]]
id = "nap"
action = "sleep"
with = { duration = "1h" }

[[workflow]]
id = "deep"
[[workflow.step]]
id = "again"
action = "workflow"
retry = { max_attempts = 1 }
with = { workflow = "deep" }
"#;

fn output_of(run: &Value, step: &str) -> Value {
    run["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["id"] == step))
        .map_or(Value::Null, |s| s["output"].clone())
}

#[test]
fn a_parent_runs_two_children_in_parallel_and_gets_their_outputs() {
    let served = Served::start("family", FAMILY, &[]);
    let replica = &served.replica;
    let parent = replica.trigger("parent", json!({ "n": 4 }));
    let run = replica.wait_terminal(&parent, Duration::from_secs(60));
    assert_eq!(run["status"], "completed", "{run}");
    // Each child's output is its result: the output of the step its workflow names (`twice`,
    // not the last).
    let left = output_of(&run, "left");
    let right = output_of(&run, "right");
    assert_eq!(
        serde_json::from_str::<Value>(left["stdout"].as_str().unwrap()).unwrap(),
        json!({ "doubled": 8 }),
        "{run}"
    );
    assert_eq!(
        serde_json::from_str::<Value>(right["stdout"].as_str().unwrap()).unwrap(),
        json!({ "doubled": 20 }),
        "{run}"
    );
    // The parent lists its children; each records its parent.
    let children = run["children"].as_array().expect("children").clone();
    assert_eq!(children.len(), 2, "{run}");
    for child in &children {
        let id = child["runId"].as_str().unwrap();
        let child_run = replica.run(id);
        assert_eq!(child_run["status"], "completed");
        assert_eq!(child_run["parentRunId"], parent.as_str());
        assert_eq!(child_run["parentStep"], child["step"]);
        assert_eq!(child_run["trigger"]["kind"], "parent");
    }
    // The two children slept at the same time: both had started before either ended.
    let history = replica.history(&parent);
    let seq = |kind: &str, step: &str| {
        history.iter().find(|t| t["type"] == kind && t["step"] == step).and_then(|t| t["seq"].as_u64()).unwrap()
    };
    assert!(seq("child_started", "left") < seq("child_ended", "right"), "{history:#?}");
    assert!(seq("child_started", "right") < seq("child_ended", "left"), "{history:#?}");
}

#[test]
fn a_failed_child_fails_its_step_whose_retry_starts_a_new_child() {
    let served = Served::start("flaky", FAMILY, &[]);
    let replica = &served.replica;
    let parent = replica.trigger("flaky-parent", json!({}));
    let run = replica.wait_terminal(&parent, Duration::from_secs(60));
    assert_eq!(run["status"], "completed", "{run}");
    let children = run["children"].as_array().expect("children");
    assert_eq!(children.len(), 2, "one child per attempt: {run}");
    let first = replica.run(children[0]["runId"].as_str().unwrap());
    let second = replica.run(children[1]["runId"].as_str().unwrap());
    assert_eq!((first["status"].as_str(), second["status"].as_str()), (Some("failed"), Some("completed")));
    assert_eq!((children[0]["attempt"].as_u64(), children[1]["attempt"].as_u64()), (Some(1), Some(2)));
    let history = replica.history(&parent);
    let failed = history.iter().find(|t| t["type"] == "step_failed").expect("the first attempt failed");
    assert!(failed["error"].as_str().unwrap().contains("failed"), "{failed}");
    assert!(failed["retryAt"].is_string(), "retried per the step's policy: {failed}");
    assert_eq!(
        serde_json::from_str::<Value>(output_of(&run, "call")["stdout"].as_str().unwrap()).unwrap(),
        json!({ "ok": true })
    );
}

#[test]
fn cancelling_a_parent_cancels_its_sleeping_child() {
    let served = Served::start("sleepy", FAMILY, &[]);
    let replica = &served.replica;
    let parent = replica.trigger("sleepy-parent", json!({}));
    let child = wait_for(Duration::from_secs(30), Duration::from_millis(50), || {
        let run = replica.run(&parent);
        let child = run["children"].as_array()?.first()?["runId"].as_str()?.to_owned();
        (replica.run(&child)["status"] == "sleeping").then_some(child)
    })
    .expect("the child sleeps");
    assert_eq!(replica.run(&parent)["status"], "waiting", "a parent waiting for its child holds no executor");
    let (status, body) = replica.post(&format!("/api/runs/{parent}/cancel"), &json!({ "reason": "test" }));
    assert_eq!(status, 200, "{body}");
    let child_run = replica.wait_terminal(&child, Duration::from_secs(30));
    assert_eq!(child_run["status"], "cancelled", "{child_run}");
    assert!(child_run["error"].as_str().unwrap().contains(&parent), "{child_run}");
    assert_eq!(replica.run(&parent)["status"], "cancelled");
}

#[test]
fn child_workflows_nest_at_most_eight_deep() {
    let served = Served::start("deep", FAMILY, &[]);
    let replica = &served.replica;
    let top = replica.trigger("deep", json!({}));
    let run = replica.wait_terminal(&top, Duration::from_secs(60));
    assert_eq!(run["status"], "failed", "{run}");
    // Down the chain to the run that could not start a child.
    let mut current = run;
    let mut depth = 0;
    while let Some(child) =
        current["children"].as_array().and_then(|c| c.first()).map(|c| c["runId"].as_str().unwrap().to_owned())
    {
        depth += 1;
        assert!(depth <= 8, "deeper than the limit");
        current = replica.run(&child);
    }
    assert_eq!(depth, 8, "eight levels of children below the top run");
    let error = current["steps"][0]["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("nest at most 8 deep"), "{current}");
}

#[test]
fn a_parent_whose_replica_is_killed_resumes_when_its_child_ends() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = workflows_file(dir.path(), &FAMILY.replace("{dir}", &dir.path().display().to_string()));
    let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()).env("LEASE_TTL", "1s");
    let mut first = config.start("first");
    let parent = first.trigger("parent", json!({ "n": 1 }));
    // Killed once the parent waits for its children (they sleep 300 ms first).
    wait_for(Duration::from_secs(30), Duration::from_millis(10), || {
        (first.run(&parent)["children"].as_array().is_some_and(|c| c.len() == 2)).then_some(())
    })
    .expect("the parent started its children");
    first.kill9();
    let second = config.start("second");
    let run = second.wait_terminal(&parent, Duration::from_secs(60));
    assert_eq!(run["status"], "completed", "{run}; log:\n{}", second.log_text());
    assert_eq!(
        serde_json::from_str::<Value>(output_of(&run, "left")["stdout"].as_str().unwrap()).unwrap(),
        json!({ "doubled": 2 })
    );
    let history = second.history(&parent);
    for step in ["left", "right"] {
        let ended = history.iter().filter(|t| t["type"] == "child_ended" && t["step"] == step).count();
        assert_eq!(ended, 1, "{step}: {history:#?}");
    }
}
