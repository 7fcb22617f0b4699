//! Logs that machines can read (issue 14): off a terminal, every line a served binary writes on
//! standard output and standard error is one JSON object, the `listening on` announcement
//! included, and every line about a step says which step of which run; text off a terminal has
//! no escape codes.

use crate::util::{RedisServer, Replica, ReplicaConfig, wait_for, workflows_file};
use serde_json::{Map, Value, json};
use std::path::Path;
use std::time::Duration;

/// Three exec steps; the middle one fails its first attempt (it leaves a marker) and is retried.
fn three_steps(dir: &Path) -> String {
    format!(
        r#"
[[workflow]]
id = "logged"
[[workflow.step]]
id = "first"
action = "exec"
with = {{ command = ["sh", "-c", "echo one"] }}
[[workflow.step]]
id = "flaky"
action = "exec"
with = {{ command = ["sh", "-c", "if [ -e flaked ]; then echo two; else touch flaked; echo flaking >&2; exit 1; fi"], cwd = "{}" }}
retry = {{ max_attempts = 3, initial_backoff = "100ms", max_backoff = "100ms" }}
[[workflow.step]]
id = "last"
action = "exec"
with = {{ command = ["sh", "-c", "echo three"] }}
"#,
        dir.display()
    )
}

/// Serves, runs the workflow to completion, stops the replica with SIGTERM (so its shutdown
/// lines are written too); returns the run id and the replica (exited).
fn serve_one_run(config: ReplicaConfig, name: &str) -> (String, Replica) {
    let mut replica = config.start(name);
    let run_id = replica.trigger("logged", json!({ "n": 1 }));
    let run = replica.wait_terminal(&run_id, Duration::from_secs(30));
    assert_eq!(run["status"], "completed", "{run}");
    replica.signal("TERM");
    assert_eq!(replica.wait_exit(Duration::from_secs(30)), Some(0), "log:\n{}", replica.log_text());
    (run_id, replica)
}

fn config(redis: &RedisServer, dir: &Path) -> ReplicaConfig {
    let file = workflows_file(dir, &three_steps(dir));
    // Debug for our own lines: a step's started/completed lines are debug.
    ReplicaConfig::new(Some(redis.url()), Some(&file), dir)
        .stdout_to_file()
        .env("LOG_LEVEL", "info,workflow_orchestrator=debug")
}

/// Every line of `text` as a JSON object with time, level, message and target; fails on the
/// first that is not.
fn json_lines(what: &str, text: &str) -> Vec<Map<String, Value>> {
    text.lines()
        .map(|line| {
            let Ok(Value::Object(object)) = serde_json::from_str::<Value>(line) else {
                panic!("{what}: a line that is not a JSON object: {line:?}\nwhole text:\n{text}")
            };
            for key in ["timestamp", "level", "message", "target"] {
                assert!(object.get(key).is_some_and(Value::is_string), "{what}: no string `{key}` in {line}");
            }
            object
        })
        .collect()
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|err| panic!("reading {}: {err}", path.display()))
}

#[test]
fn off_a_terminal_every_line_is_a_json_object_and_step_lines_carry_the_run() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    // No LOG_FORMAT: standard output is a file, so the default is JSON.
    let (run_id, replica) = serve_one_run(config(&redis, dir.path()), "json");

    let stdout = read(replica.stdout.as_ref().expect("stdout in a file"));
    let stderr = read(&replica.log);
    for (what, bytes) in [("stdout", &stdout), ("stderr", &stderr)] {
        assert!(!bytes.contains(&0x1b), "{what} holds an escape code:\n{}", String::from_utf8_lossy(bytes));
    }
    let stdout = String::from_utf8(stdout).expect("stdout is UTF-8");
    let stderr = String::from_utf8(stderr).expect("stderr is UTF-8");

    // The announcement: a JSON line on stdout, its address in a field, the old text kept in
    // its message for tools that grep for it.
    let out = json_lines("stdout", &stdout);
    assert_eq!(out.len(), 1, "stdout:\n{stdout}");
    let address = format!("http://127.0.0.1:{}", replica.port);
    assert_eq!(out[0]["address"], address.as_str(), "{stdout}");
    assert_eq!(out[0]["message"], format!("listening on {address}").as_str(), "{stdout}");
    assert_eq!(out[0]["level"], "INFO");

    let lines = json_lines("stderr", &stderr);
    assert!(lines.iter().any(|l| l["message"] == "serving"), "{stderr}");
    assert!(lines.iter().any(|l| l["message"] == "stopped cleanly"), "{stderr}");
    // Every line of the run's steps carries its ids; each step attempt has lines.
    let of_run: Vec<&Map<String, Value>> = lines.iter().filter(|l| l.get("run_id") == Some(&json!(run_id))).collect();
    let steps: Vec<&&Map<String, Value>> = of_run.iter().filter(|l| l.get("span") == Some(&json!("step"))).collect();
    for line in &steps {
        assert_eq!(line["workflow"], "logged", "{line:?}");
        assert!(line["step"].is_string(), "{line:?}");
        assert!(line["attempt"].is_u64(), "{line:?}");
    }
    let attempts = |step: &str, message: &str| -> Vec<u64> {
        steps
            .iter()
            .filter(|l| l["step"] == step && l["message"] == message)
            .filter_map(|l| l["attempt"].as_u64())
            .collect()
    };
    assert_eq!(attempts("first", "step started"), [1], "{stderr}");
    assert_eq!(attempts("first", "step completed"), [1], "{stderr}");
    assert_eq!(attempts("flaky", "step started"), [1, 2], "{stderr}");
    assert_eq!(attempts("flaky", "step failed"), [1], "{stderr}");
    assert_eq!(attempts("flaky", "step completed"), [2], "{stderr}");
    assert_eq!(attempts("last", "step completed"), [1], "{stderr}");
    let failed = steps.iter().find(|l| l["message"] == "step failed").expect("a failure line");
    assert!(failed["error"].as_str().is_some_and(|e| e.contains("flaking")), "{failed:?}");
    assert_eq!(failed["retrying"], true, "{failed:?}");
}

#[test]
fn text_off_a_terminal_has_no_escape_codes_and_keeps_the_old_announcement() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (run_id, replica) = serve_one_run(config(&redis, dir.path()).env("LOG_FORMAT", "text"), "text");

    let stdout = read(replica.stdout.as_ref().expect("stdout in a file"));
    let stderr = read(&replica.log);
    for (what, bytes) in [("stdout", &stdout), ("stderr", &stderr)] {
        assert!(!bytes.contains(&0x1b), "{what} holds an escape code:\n{}", String::from_utf8_lossy(bytes));
    }
    let stdout = String::from_utf8(stdout).unwrap();
    assert_eq!(stdout, format!("listening on http://127.0.0.1:{}\n", replica.port));
    let stderr = String::from_utf8(stderr).unwrap();
    let failed = stderr.lines().find(|l| l.contains("step failed")).unwrap_or_else(|| panic!("{stderr}"));
    for shown in [run_id.as_str(), "workflow=logged", "step=flaky", "attempt=1"] {
        assert!(failed.contains(shown), "{shown} not in {failed}");
    }
    assert!(serde_json::from_str::<Value>(failed).is_err(), "text, not JSON: {failed}");
}

#[test]
fn a_start_up_failure_is_a_json_line_in_json_mode_and_the_old_text_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let config = ReplicaConfig::new(None, None, dir.path()).env("PORT", "not-a-port");

    let json = config.clone().env("LOG_FORMAT", "json").command(&["serve"]);
    assert_eq!(json.code, Some(2), "{json:?}");
    let lines = json_lines("stderr", &json.stderr);
    assert_eq!(lines.len(), 1, "{}", json.stderr);
    assert_eq!(lines[0]["level"], "ERROR");
    assert!(lines[0]["message"].as_str().is_some_and(|m| m.contains("PORT")), "{}", json.stderr);
    assert_eq!(json.stdout, "");

    // A bad LOG_FORMAT itself is reported in the default format: JSON, standard output being
    // a pipe here.
    let bad = ReplicaConfig::new(None, None, dir.path()).env("LOG_FORMAT", "yaml").command(&["serve"]);
    assert_eq!(bad.code, Some(2), "{bad:?}");
    let lines = json_lines("stderr", &bad.stderr);
    assert_eq!(lines[0]["message"], "environment variable LOG_FORMAT: `yaml` is not json or text", "{}", bad.stderr);

    let text = config.env("LOG_FORMAT", "text").command(&["serve"]);
    assert_eq!(text.code, Some(2), "{text:?}");
    assert!(text.stderr.starts_with("workflow-orchestrator: environment variable PORT"), "{}", text.stderr);
}

#[test]
fn operator_commands_keep_their_human_output() {
    let dir = tempfile::tempdir().unwrap();
    let file = workflows_file(dir.path(), &three_steps(dir.path()));
    // Standard output is a pipe here, yet `workflows` prints for people, not JSON lines.
    let listed = ReplicaConfig::new(None, Some(&file), dir.path()).command(&["workflows"]);
    assert_eq!(listed.code, Some(0), "{listed:?}");
    assert!(listed.stdout.contains("logged"), "{}", listed.stdout);
    assert!(serde_json::from_str::<Value>(listed.stdout.lines().next().unwrap_or("")).is_err(), "{}", listed.stdout);
}

/// The Grafana dashboard and the Prometheus config name only what the replicas serve: every
/// `wfo_*` metric in a panel's query is a family `/metrics` declares (a renamed metric would
/// otherwise leave an empty panel), and the scrape targets are the compose file's replicas.
#[test]
fn the_dashboard_queries_only_metrics_that_metrics_serves() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dashboard: Value =
        serde_json::from_slice(&read(&root.join("docker/grafana/dashboards/workflow-orchestrator.json"))).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("a query").to_owned());
        }
    }
    // The metric names: the words of the queries that start with `wfo_`.
    let mut named: Vec<String> = exprs
        .iter()
        .flat_map(|expr| expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
        .filter(|word| word.starts_with("wfo_"))
        .map(str::to_owned)
        .collect();
    named.sort();
    named.dedup();
    assert!(named.len() >= 15, "{named:?}");

    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let replica = ReplicaConfig::new(Some(redis.url()), None, dir.path()).start("scraped");
    let metrics = ureq::get(&format!("{}/metrics", replica.base())).call().expect("/metrics").into_string().unwrap();
    for name in &named {
        let family = name.strip_suffix("_bucket").unwrap_or(name);
        assert!(metrics.contains(&format!("# TYPE {family} ")), "the dashboard queries {name}, not served:\n{metrics}");
    }

    let prometheus = String::from_utf8(read(&root.join("docker/prometheus.yml"))).unwrap();
    let compose = String::from_utf8(read(&root.join("docker/docker-compose.yml"))).unwrap();
    for service in ["workflow-orchestrator-1", "workflow-orchestrator-2"] {
        assert!(prometheus.contains(&format!("{service}:5003")), "{prometheus}");
        assert!(compose.contains(&format!("  {service}:\n")), "no service {service} in the compose file");
    }
}

/// The lines of a step's life outside the plain path carry its ids too: a replica frozen
/// mid-step past its lease (`SIGSTOP`) loses the step to another, which says it took it over;
/// woken, the first says its lease was lost and its outcome fenced.
#[test]
fn a_takeover_and_a_fenced_completion_are_logged_with_the_step_ids() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let started = dir.path().join("started");
    let toml = format!(
        r#"
[[workflow]]
id = "slow"
[[workflow.step]]
id = "work"
action = "exec"
timeout = "60s"
with = {{ command = ["sh", "-c", "touch started; sleep 3"], cwd = "{}" }}
"#,
        dir.path().display()
    );
    let file = workflows_file(dir.path(), &toml);
    let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()).env("LEASE_TTL", "1s");
    let mut a = config.start("a");
    let run_id = a.trigger("slow", json!({}));
    wait_for(Duration::from_secs(30), Duration::from_millis(20), || started.exists().then_some(()))
        .unwrap_or_else(|| panic!("A never started the step; A's log:\n{}", a.log_text()));
    a.signal("STOP");
    let mut b = config.start("b");
    let run = b.wait_terminal(&run_id, Duration::from_secs(60));
    a.signal("CONT");
    assert_eq!(run["status"], "completed", "{run}");
    wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
        a.log_text().contains("rejected by the fence").then_some(())
    })
    .unwrap_or_else(|| panic!("A's late outcome was not fenced within 30 s; A's log:\n{}", a.log_text()));
    for replica in [&mut a, &mut b] {
        replica.signal("TERM");
        assert_eq!(replica.wait_exit(Duration::from_secs(30)), Some(0), "log:\n{}", replica.log_text());
    }

    let ids = json!({ "run_id": run_id, "workflow": "slow", "step": "work", "attempt": 1 });
    let carries_ids = |line: &Map<String, Value>| ids.as_object().unwrap().iter().all(|(k, v)| line.get(k) == Some(v));
    let b_text = b.log_text();
    let b_lines = json_lines("B's stderr", &b_text);
    let took_over = b_lines.iter().find(|l| l["message"] == "took over a step whose lease expired");
    assert!(took_over.is_some_and(carries_ids), "{took_over:?}\nB's log:\n{b_text}");
    let a_text = a.log_text();
    let a_lines = json_lines("A's stderr", &a_text);
    let fenced = a_lines.iter().find(|l| l["message"].as_str().is_some_and(|m| m.contains("rejected by the fence")));
    assert!(fenced.is_some_and(carries_ids), "{fenced:?}\nA's log:\n{a_text}");
    // Renewal may or may not come before the outcome (see tests/chaos.rs); when it says the
    // lease was lost, it names the step.
    for lost in a_lines.iter().filter(|l| l["message"].as_str().is_some_and(|m| m.starts_with("lease lost"))) {
        assert!(carries_ids(lost), "{lost:?}");
    }
}
