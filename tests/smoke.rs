//! The service runs on either store and answers the minimal API.

use crate::util::{RedisServer, ReplicaConfig, workflows_file};
use serde_json::json;
use std::time::Duration;

const TWO_STEPS: &str = r#"
[[workflow]]
id = "two"
description = "two steps"
[[workflow.step]]
id = "first"
action = "noop"
[[workflow.step]]
id = "second"
action = "exec"
with = { command = ["sh", "-c", "printf '%s' \"$WFO_INPUT\""] }
"#;

fn runs_two_steps(redis: Option<&RedisServer>, store: &str) {
    let dir = tempfile::tempdir().unwrap();
    let file = workflows_file(dir.path(), TWO_STEPS);
    let replica = ReplicaConfig::new(redis.map(RedisServer::url), Some(&file), dir.path()).start("smoke");
    let (status, health) = replica.get("/health");
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["store"], store);

    let run_id = replica.trigger("two", json!({ "n": 7 }));
    let run = replica.wait_terminal(&run_id, Duration::from_secs(20));
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["steps"][1]["output"]["stdout"], r#"{"n":7}"#);
    let kinds: Vec<String> = replica.history(&run_id).iter().map(|t| t["type"].as_str().unwrap().to_owned()).collect();
    assert_eq!(
        kinds,
        ["run_created", "step_started", "step_completed", "step_started", "step_completed", "run_completed"]
    );

    let (status, body) = replica.get("/api/runs/0193e4a17b2c7d3e8f001a2b3c4d5e6f-s1");
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "not_found");
    let (status, body) = replica.post("/api/workflows/nope/trigger", &json!({}));
    assert_eq!(status, 404, "{body}");
}

#[test]
fn serves_on_the_memory_store() {
    runs_two_steps(None, "memory");
}

#[test]
fn serves_on_the_redis_store() {
    let redis = RedisServer::start();
    runs_two_steps(Some(&redis), "redis");
}
