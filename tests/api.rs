//! The HTTP API, route by route, against a served binary on a private redis-server: every route
//! answers with its documented shape, and every kind of bad request gets its status and the JSON
//! error body `{"error":{"code","message"}}` (and creates nothing).
//!
//! Each test starts its own Redis and replica. No test asserts on how long anything took.

use crate::util::{Replica, Served, wait_for};
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;

// ---- the service under test ----

/// The workflows these tests drive. `{dir}` is the test's temporary directory: the steps that
/// wait for or check a file look there.
const WORKFLOWS: &str = r#"
[[workflow]]
id = "two"
description = "a noop, then the input echoed"
[[workflow.step]]
id = "first"
action = "noop"
[[workflow.step]]
id = "second"
action = "exec"
with = { command = ["sh", "-c", "printf '%s' \"$WFO_INPUT\""] }

[[workflow]]
id = "quick"
[[workflow.step]]
id = "only"
action = "noop"

[[workflow]]
id = "broken"
[[workflow.step]]
id = "boom"
action = "exec"
with = { command = ["sh", "-c", "echo broken-on-purpose >&2; exit 1"] }
retry = { max_attempts = 1 }

# After a first step, fails at once when the input says so; otherwise marks that it started and
# waits (bounded) for the file `release`.
[[workflow]]
id = "held"
[[workflow.step]]
id = "prep"
action = "noop"
[[workflow.step]]
id = "wait"
action = "exec"
with = { command = ["sh", "-c", "case \"$WFO_INPUT\" in *fail*) echo failing-as-asked >&2; exit 3;; esac; touch \"started-$WFO_RUN_ID\"; i=0; while [ ! -f release ]; do i=$((i+1)); if [ $i -gt 1200 ]; then exit 9; fi; sleep 0.05; done; echo released"], cwd = "{dir}" }
retry = { max_attempts = 1 }
[[workflow.step]]
id = "after"
action = "noop"

# The second step fails until the file `marker` exists.
[[workflow]]
id = "flaky"
[[workflow.step]]
id = "first"
action = "exec"
with = { command = ["sh", "-c", "printf 'first-%s' \"$WFO_RUN_ID\""] }
[[workflow.step]]
id = "second"
action = "exec"
with = { command = ["sh", "-c", "if [ -f marker ]; then printf 'second-ok'; else echo \"not-yet-$WFO_ATTEMPT\" >&2; exit 4; fi"], cwd = "{dir}" }
retry = { max_attempts = 2, initial_backoff = "50ms", max_backoff = "50ms", jitter = 0.0 }
[[workflow.step]]
id = "third"
action = "noop"

# Each step's output names the run it ran in.
[[workflow]]
id = "chain"
[[workflow.step]]
id = "first"
action = "exec"
with = { command = ["sh", "-c", "printf 'first-%s' \"$WFO_RUN_ID\""] }
[[workflow.step]]
id = "second"
action = "exec"
with = { command = ["sh", "-c", "printf 'second-%s' \"$WFO_RUN_ID\""] }
[[workflow.step]]
id = "third"
action = "exec"
with = { command = ["sh", "-c", "printf 'third-%s' \"$WFO_RUN_ID\""] }

[[workflow]]
id = "listener"
events = ["order.created"]
[[workflow.step]]
id = "handle"
action = "noop"
"#;

/// A private Redis and one replica serving the workflows above (with `env` added).
struct Service(Served);

impl std::ops::Deref for Service {
    type Target = Served;
    fn deref(&self) -> &Served {
        &self.0
    }
}

impl Service {
    fn start(env: &[(&str, &str)]) -> Service {
        Service::start_with(env, "")
    }

    /// With more workflows than the ones above (`{dir}` replaced the same way).
    fn start_with(env: &[(&str, &str)], more_workflows: &str) -> Service {
        Service(Served::start("api", &format!("{WORKFLOWS}\n{more_workflows}"), env))
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }

    fn call(&self, method: &str, path: &str) -> Call {
        Call::new(&self.replica, method, path)
    }

    fn get(&self, path: &str) -> Answer {
        self.call("GET", path).send()
    }

    fn post_json(&self, path: &str, body: &Value) -> Answer {
        self.call("POST", path).json(body).send()
    }

    /// GET that must answer 200 with JSON.
    fn get_ok(&self, path: &str) -> Value {
        let answer = self.get(path);
        assert_eq!(answer.status, 200, "GET {path}: {}", answer.text);
        answer.json()
    }

    fn trigger(&self, workflow: &str, input: Value) -> String {
        self.replica.trigger(workflow, input)
    }

    fn wait_terminal(&self, run_id: &str) -> Value {
        self.replica.wait_terminal(run_id, Duration::from_secs(60))
    }

    fn history(&self, run_id: &str) -> Vec<Value> {
        self.replica.history(run_id)
    }
}

// ---- a small raw HTTP client ----

/// A request being built: any method, any headers, any body bytes.
struct Call {
    request: ureq::Request,
    body: Option<Vec<u8>>,
}

impl Call {
    fn new(replica: &Replica, method: &str, path: &str) -> Call {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .timeout(Duration::from_secs(60))
            .redirects(0)
            .build();
        Call { request: agent.request(method, &format!("{}{path}", replica.base())), body: None }
    }

    fn header(mut self, name: &str, value: &str) -> Call {
        self.request = self.request.set(name, value);
        self
    }

    fn body(mut self, content_type: &str, bytes: impl Into<Vec<u8>>) -> Call {
        self.request = self.request.set("Content-Type", content_type);
        self.body = Some(bytes.into());
        self
    }

    fn json(self, body: &Value) -> Call {
        self.body("application/json", body.to_string())
    }

    fn send(self) -> Answer {
        let result = match &self.body {
            Some(bytes) => self.request.send_bytes(bytes),
            // Every POST must say it is JSON, even without a body (a cross-site form cannot).
            None if self.request.method() == "POST" && self.request.header("content-type").is_none() => {
                self.request.set("Content-Type", "application/json").call()
            }
            None => self.request.call(),
        };
        let response = match result {
            Ok(response) => response,
            Err(ureq::Error::Status(_, response)) => response,
            Err(err) => panic!("the request failed without an answer: {err}"),
        };
        let header = |name: &str| response.header(name).map(str::to_owned);
        let headers = response
            .headers_names()
            .into_iter()
            .flat_map(|name| {
                response.all(&name).into_iter().map(move |v| (name.clone(), v.to_owned())).collect::<Vec<_>>()
            })
            .collect();
        Answer {
            headers,
            status: response.status(),
            content_type: header("content-type").unwrap_or_default(),
            allow: header("allow"),
            www_authenticate: header("www-authenticate"),
            text: response.into_string().unwrap_or_default(),
        }
    }
}

struct Answer {
    /// Every header, names in lowercase, in order.
    headers: Vec<(String, String)>,
    status: u16,
    content_type: String,
    allow: Option<String>,
    www_authenticate: Option<String>,
    text: String,
}

impl Answer {
    /// The first value of header `name` (lowercase).
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        assert!(
            self.content_type.starts_with("application/json"),
            "expected a JSON answer, got Content-Type `{}`: {}",
            self.content_type,
            self.text
        );
        serde_json::from_str(&self.text).unwrap_or_else(|err| panic!("not JSON ({err}): {}", self.text))
    }

    /// Asserts the status and the error body `{"error":{"code","message"}}` (nothing else).
    #[track_caller]
    fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "expected {status} {code}, got: {}", self.text);
        let body = self.json();
        let object = body.as_object().unwrap_or_else(|| panic!("the error body is not an object: {body}"));
        assert_eq!(object.len(), 1, "the error body has only `error`: {body}");
        let error = &body["error"];
        assert_eq!(error["code"], code, "{body}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "the error has a message: {body}");
        assert_eq!(error.as_object().map(|e| e.len()), Some(2), "`error` has `code` and `message`: {body}");
    }
}

// ---- small helpers ----

/// The `type` of each transition, in order.
fn kinds(history: &[Value]) -> Vec<String> {
    history.iter().map(|t| t["type"].as_str().unwrap_or("?").to_owned()).collect()
}

fn run_ids(runs: &Value) -> Vec<String> {
    runs.as_array()
        .unwrap_or_else(|| panic!("expected an array of runs: {runs}"))
        .iter()
        .map(|r| r["runId"].as_str().expect("runId").to_owned())
        .collect()
}

/// A well-formed run id that no run has.
const UNKNOWN_RUN: &str = "0193e4a17b2c7d3e8f001a2b3c4d5e6f-s1";

fn is_rfc3339(value: &Value) -> bool {
    value.as_str().is_some_and(|text| humantime::parse_rfc3339(text).is_ok())
}

fn touch(path: &Path) {
    std::fs::write(path, b"").expect("create a marker file");
}

// ---- probes and catalogue ----

#[test]
fn health_openapi_workflows_and_metrics_answer_with_their_shapes() {
    let service = Service::start(&[]);

    let health = service.get_ok("/health");
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["store"], "redis", "{health}");
    assert_eq!(health["replica"], "api", "{health}");
    assert_eq!(health["workflows"], 7, "{health}");
    assert!(health["counters"].is_object(), "{health}");

    let openapi = service.get("/api/openapi.json");
    assert_eq!(openapi.status, 200, "{}", openapi.text);
    let openapi = openapi.json();
    let version = openapi["openapi"].as_str().unwrap_or_default();
    assert!(version.starts_with("3."), "an OpenAPI 3 document: {openapi}");
    assert!(openapi["info"]["title"].is_string() && openapi["paths"].is_object(), "{openapi}");

    let workflows = service.get_ok("/api/workflows");
    let list = workflows["workflows"].as_array().expect("workflows");
    assert_eq!(list.len(), 7, "{workflows}");
    let two = list.iter().find(|w| w["id"] == "two").expect("workflow `two` is listed");
    assert_eq!(two["description"], "a noop, then the input echoed");
    assert_eq!(
        two["steps"],
        json!([
            { "id": "first", "action": "noop", "needs": [] },
            { "id": "second", "action": "exec", "needs": ["first"] }
        ])
    );
    assert!(two["schedule"].is_null() && two["nextRunAt"].is_null(), "{two}");
    assert_eq!(two["timezone"], "UTC");
    assert!(two["definitionHash"].as_str().is_some_and(|h| !h.is_empty()), "{two}");
    let listener = list.iter().find(|w| w["id"] == "listener").expect("workflow `listener` is listed");
    assert_eq!(listener["events"], json!(["order.created"]));

    let run_id = service.trigger("two", json!({ "n": 1 }));
    assert_eq!(service.wait_terminal(&run_id)["status"], "completed");

    let metrics = service.get("/metrics");
    assert_eq!(metrics.status, 200, "{}", metrics.text);
    assert!(metrics.content_type.starts_with("text/plain; version=0.0.4"), "{}", metrics.content_type);
    let text = &metrics.text;
    for line in [
        "# TYPE wfo_runs_started_total counter",
        "# TYPE wfo_runs_completed_total counter",
        "# TYPE wfo_completions_fenced_total counter",
        "# TYPE wfo_step_duration_seconds histogram",
        "# TYPE wfo_stream_length gauge",
        "# TYPE wfo_store_round_trip_seconds gauge",
        "wfo_workflow_runs_started_total{workflow=\"two\"} 1",
        "wfo_workflow_runs_completed_total{workflow=\"two\"} 1",
        "wfo_workflow_runs_failed_total{workflow=\"two\"} 0",
        "wfo_step_duration_seconds_bucket{workflow=\"two\",le=\"+Inf\"} 2",
        "wfo_step_duration_seconds_count{workflow=\"two\"} 2",
        "wfo_store_up 1",
    ] {
        assert!(text.lines().any(|l| l == line), "/metrics has the line `{line}`:\n{text}");
    }
    // Every sample is `name{labels} value` with a numeric value.
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("a sample line: `{line}`"));
        assert!(name.starts_with("wfo_"), "metric names are prefixed: `{line}`");
        assert!(value.parse::<f64>().is_ok(), "a numeric value: `{line}`");
    }

    // Without API_TOKEN the service says at start-up that the API is open.
    assert!(service.replica.log_text().contains("API_TOKEN is not set"), "{}", service.replica.log_text());
}

/// The routes the service answers, as OpenAPI path templates with their methods.
const ROUTES: [(&str, &[&str]); 27] = [
    ("/health", &["get"]),
    ("/metrics", &["get"]),
    ("/api/openapi.json", &["get"]),
    ("/api/workflows", &["get"]),
    ("/api/workflows/{workflowId}/status", &["get"]),
    ("/api/workflows/{workflowId}/trigger", &["post"]),
    ("/api/workflows/{workflowId}/pause", &["post"]),
    ("/api/workflows/{workflowId}/resume", &["post"]),
    ("/api/events", &["get", "post"]),
    ("/api/events/dead", &["get"]),
    ("/api/runs", &["get"]),
    ("/api/runs/{runId}", &["get"]),
    ("/api/runs/{runId}/history", &["get"]),
    ("/api/runs/{runId}/cancel", &["post"]),
    ("/api/runs/{runId}/retry", &["post"]),
    ("/api/runs/{runId}/rerun", &["post"]),
    ("/api/runs/bulk", &["post"]),
    ("/api/webhooks/inngest", &["post"]),
    ("/api/runs/{runId}/state", &["get"]),
    ("/api/replicas", &["get"]),
    ("/api/stats", &["get"]),
    ("/", &["get"]),
    ("/ui", &["get"]),
    ("/ui/assets/{asset}", &["get"]),
    ("/ui/session", &["get"]),
    ("/ui/login", &["post"]),
    ("/ui/logout", &["post"]),
];

#[test]
fn the_openapi_document_describes_every_route() {
    let service = Service::start(&[]);
    let openapi = service.get_ok("/api/openapi.json");
    let paths = openapi["paths"].as_object().expect("paths");
    let mut missing = Vec::new();
    for (path, methods) in ROUTES {
        for method in methods {
            if paths.get(path).and_then(|p| p.get(*method)).is_none() {
                missing.push(format!("{} {path}", method.to_uppercase()));
            }
        }
    }
    assert!(missing.is_empty(), "routes missing from /api/openapi.json: {missing:?}");
    let extra: Vec<&String> = paths.keys().filter(|path| !ROUTES.iter().any(|(route, _)| route == path)).collect();
    assert!(extra.is_empty(), "/api/openapi.json documents paths the service does not serve: {extra:?}");
}

// ---- triggering ----

#[test]
fn trigger_answers_202_and_an_idempotency_key_returns_the_same_run_with_200() {
    let service = Service::start(&[]);

    let answer = service.post_json("/api/workflows/two/trigger", &json!({ "inputData": { "n": 42 } }));
    assert_eq!(answer.status, 202, "{}", answer.text);
    let body = answer.json();
    let run_id = body["runId"].as_str().expect("runId").to_owned();
    assert_eq!(body, json!({ "runId": run_id, "workflowId": "two", "status": "pending", "duplicate": false }));
    let run = service.wait_terminal(&run_id);
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["input"], json!({ "n": 42 }));
    assert_eq!(run["steps"][1]["output"]["stdout"], r#"{"n":42}"#);

    // No body, a null input and a JSON content type with parameters are all fine.
    let no_body = service.call("POST", "/api/workflows/quick/trigger").send();
    assert_eq!(no_body.status, 202, "{}", no_body.text);
    assert_eq!(service.replica.run(no_body.json()["runId"].as_str().unwrap())["input"], json!({}));
    let null_input = service.post_json("/api/workflows/quick/trigger", &json!({ "inputData": null }));
    assert_eq!(null_input.status, 202, "{}", null_input.text);
    let charset = service
        .call("POST", "/api/workflows/quick/trigger")
        .body("application/json; charset=utf-8", r#"{"inputData":{"a":"ü"}}"#)
        .send();
    assert_eq!(charset.status, 202, "{}", charset.text);
    assert_eq!(service.replica.run(charset.json()["runId"].as_str().unwrap())["input"], json!({ "a": "ü" }));

    // The same Idempotency-Key returns the same run, with 200 and `duplicate: true`.
    let keyed = |key: &str| {
        service
            .call("POST", "/api/workflows/quick/trigger")
            .header("Idempotency-Key", key)
            .json(&json!({ "inputData": { "k": key } }))
            .send()
    };
    let first = keyed("order-1234");
    assert_eq!(first.status, 202, "{}", first.text);
    let first = first.json();
    assert_eq!(first["duplicate"], false);
    for _ in 0..2 {
        let again = keyed("order-1234");
        assert_eq!(again.status, 200, "{}", again.text);
        let again = again.json();
        assert_eq!(again["runId"], first["runId"], "{again}");
        assert_eq!(again["duplicate"], true, "{again}");
    }
    let other = keyed("order-5678");
    assert_eq!(other.status, 202, "{}", other.text);
    assert_ne!(other.json()["runId"], first["runId"]);
    // A key is scoped to its workflow.
    let elsewhere = service
        .call("POST", "/api/workflows/two/trigger")
        .header("Idempotency-Key", "order-1234")
        .json(&json!({}))
        .send();
    assert_eq!(elsewhere.status, 202, "{}", elsewhere.text);
    assert_ne!(elsewhere.json()["runId"], first["runId"]);
    // Keys too long are refused.
    keyed(&"k".repeat(201)).assert_error(400, "bad_request");

    // Unknown and malformed workflow ids.
    service.post_json("/api/workflows/nope/trigger", &json!({})).assert_error(404, "not_found");
    service.post_json("/api/workflows/Not%20An%20Id/trigger", &json!({})).assert_error(400, "bad_request");

    let quick = service.get_ok("/api/runs?workflowId=quick&limit=100");
    assert_eq!(run_ids(&quick["runs"]).len(), 5, "no body, null input, charset, two keys: {quick}");
}

#[test]
fn malformed_bodies_wrong_content_types_and_oversized_bodies_are_refused_and_start_nothing() {
    let service = Service::start(&[]);
    let trigger = "/api/workflows/quick/trigger";

    let post = |content_type: &str, body: &str| service.call("POST", trigger).body(content_type, body).send();
    post("application/json", r#"{"inputData":"#).assert_error(400, "bad_request");
    post("application/json", "not json at all").assert_error(400, "bad_request");
    // Whitespace that is not JSON's is no empty body (the fuzzer found a form feed accepted).
    post("application/json", "\u{c}").assert_error(400, "bad_request");
    service.call("POST", "/ui/logout").body("application/json", "\u{c}").send().assert_error(400, "bad_request");
    let logout = service.call("POST", "/ui/logout").body("application/json", " \r\n\t").send();
    assert_eq!(logout.status, 200, "JSON's whitespace is an empty body: {}", logout.text);
    post("application/json", r#"{"inputData":{}} trailing"#).assert_error(400, "bad_request");
    post("application/json", "[1, 2]").assert_error(400, "bad_request");
    post("application/json", r#""a string""#).assert_error(400, "bad_request");
    post("application/json", r#"{"inputData": [1]}"#).assert_error(400, "bad_request");
    post("application/json", r#"{"inputData": "x"}"#).assert_error(400, "bad_request");
    let unknown = post("application/json", r#"{"input": {}}"#);
    unknown.assert_error(400, "bad_request");
    assert!(unknown.json()["error"]["message"].as_str().unwrap().contains("input"), "{}", unknown.text);
    post("application/json", r#"{"inputData": {}, "extra": 1}"#).assert_error(400, "bad_request");
    post("text/plain", r#"{"inputData": {}}"#).assert_error(415, "unsupported_media_type");
    post("application/x-www-form-urlencoded", "inputData=1").assert_error(415, "unsupported_media_type");
    // A body without any Content-Type.
    let bare = service.call("POST", trigger);
    let bare = Call { body: Some(br#"{"inputData":{}}"#.to_vec()), ..bare };
    bare.send().assert_error(415, "unsupported_media_type");

    // Over 1 MiB: 413, whatever the content.
    let mut big = br#"{"inputData":{"blob":""#.to_vec();
    big.resize(1024 * 1024 + 1024, b'x');
    big.extend_from_slice(br#""}}"#);
    service.call("POST", trigger).body("application/json", big).send().assert_error(413, "payload_too_large");

    // The other routes with bodies refuse the same way.
    service
        .call("POST", "/api/events")
        .body("application/json", r#"{"eventType":"#)
        .send()
        .assert_error(400, "bad_request");
    service
        .call("POST", "/api/events")
        .body("text/plain", r#"{"eventType":"a.b"}"#)
        .send()
        .assert_error(415, "unsupported_media_type");
    service.post_json("/api/events", &json!({ "eventType": "a.b", "bogus": 1 })).assert_error(400, "bad_request");
    service.post_json("/api/events", &json!({ "payload": {} })).assert_error(400, "bad_request");
    service.post_json("/api/events", &json!({ "eventType": 7 })).assert_error(400, "bad_request");
    service.post_json("/api/events", &json!({ "eventType": "Not A Type" })).assert_error(400, "bad_request");
    service.post_json("/api/events", &json!({ "eventType": "a.b", "payload": [1] })).assert_error(400, "bad_request");
    service.post_json("/api/events", &json!({ "eventType": "a.b", "key": 5 })).assert_error(400, "bad_request");
    let mut big_event = br#"{"eventType":"a.b","payload":{"blob":""#.to_vec();
    big_event.resize(1024 * 1024 + 1024, b'y');
    big_event.extend_from_slice(br#""}}"#);
    service
        .call("POST", "/api/events")
        .body("application/json", big_event)
        .send()
        .assert_error(413, "payload_too_large");

    // Nothing of it reached the store: no run, no event.
    let runs = service.get_ok("/api/runs");
    assert_eq!(runs["runs"], json!([]), "{runs}");
    let events = service.get_ok("/api/events");
    assert_eq!(events["events"], json!([]), "{events}");
    // And the service still serves.
    let answer = service.post_json(trigger, &json!({ "inputData": {} }));
    assert_eq!(answer.status, 202, "{}", answer.text);
}

// ---- workflow status ----

#[test]
fn workflow_status_counts_runs_by_status_and_lists_active_and_recent_runs_with_durations() {
    let service = Service::start(&[]);

    let failed = service.trigger("held", json!({ "fail": true }));
    assert_eq!(service.wait_terminal(&failed)["status"], "failed");
    touch(&service.path("release"));
    let completed = service.trigger("held", json!({}));
    assert_eq!(service.wait_terminal(&completed)["status"], "completed");
    std::fs::remove_file(service.path("release")).unwrap();
    let active = service.trigger("held", json!({}));
    let started = service.path(&format!("started-{active}"));
    wait_for(Duration::from_secs(60), Duration::from_millis(50), || started.exists().then_some(()))
        .expect("the held step starts");

    let status = service.get_ok("/api/workflows/held/status");
    assert_eq!(status["workflowId"], "held");
    assert!(status["schedule"].is_null() && status["nextRunAt"].is_null(), "{status}");
    assert_eq!(status["nextFires"], json!([]), "{status}");
    let counts = status["counts"].as_object().expect("counts");
    for (name, count) in counts {
        let expected = match name.as_str() {
            "running" | "completed" | "failed" => 1,
            _ => 0,
        };
        assert_eq!(count, expected, "counts[{name}]: {status}");
    }
    for name in ["pending", "running", "retrying", "completed", "failed", "cancelled", "timed_out"] {
        assert!(counts.contains_key(name), "counts has `{name}`: {status}");
    }
    let active_runs = status["activeRuns"].as_array().expect("activeRuns");
    assert_eq!(run_ids(&status["activeRuns"]), std::slice::from_ref(&active), "{status}");
    assert_eq!(active_runs[0]["status"], "running");
    assert_eq!(active_runs[0]["step"], "wait");
    assert_eq!(active_runs[0]["attempt"], 1);
    assert!(active_runs[0]["durationMs"].is_null(), "an active run has no duration yet: {status}");
    assert!(is_rfc3339(&active_runs[0]["createdAt"]) && is_rfc3339(&active_runs[0]["updatedAt"]), "{status}");

    // Recent runs, newest first, each with its status; finished ones with their duration.
    let recent = status["recentRuns"].as_array().expect("recentRuns");
    assert_eq!(run_ids(&status["recentRuns"]), [active.clone(), completed.clone(), failed.clone()], "{status}");
    assert_eq!(recent.iter().map(|r| r["status"].clone()).collect::<Vec<_>>(), ["running", "completed", "failed"]);
    for finished in &recent[1..] {
        assert!(finished["durationMs"].as_u64().is_some(), "a finished run has durationMs: {finished}");
        assert_eq!(finished["workflowId"], "held");
    }

    // Other workflows are counted apart.
    let quick = service.get_ok("/api/workflows/quick/status");
    assert_eq!(quick["recentRuns"], json!([]), "{quick}");
    assert_eq!(quick["activeRuns"], json!([]), "{quick}");
    assert!(quick["counts"].as_object().unwrap().values().all(|v| v == 0), "{quick}");

    service.get("/api/workflows/nope/status").assert_error(404, "not_found");
    service.get("/api/workflows/NOPE!/status").assert_error(400, "bad_request");

    touch(&service.path("release"));
    assert_eq!(service.wait_terminal(&active)["status"], "completed");
    let status = service.get_ok("/api/workflows/held/status");
    assert_eq!(status["counts"]["completed"], 2, "{status}");
    assert_eq!(status["counts"]["running"], 0, "{status}");
    assert_eq!(status["activeRuns"], json!([]), "{status}");
}

// ---- events ----

#[test]
fn events_are_published_with_202_listed_newest_first_and_start_subscribed_workflows() {
    let service = Service::start(&[]);

    let mut published = Vec::new();
    for n in 0..3 {
        let answer = service.post_json(
            "/api/events",
            &json!({ "eventType": "note.added", "payload": { "n": n }, "key": format!("note-{n}"), "source": "tests" }),
        );
        assert_eq!(answer.status, 202, "{}", answer.text);
        let body = answer.json();
        assert_eq!(body["eventType"], "note.added");
        published.push(body["eventId"].as_str().expect("eventId").to_owned());
    }

    // Newest first, in pages.
    let page = service.get_ok("/api/events?type=note.added&limit=2");
    let ids: Vec<&str> = page["events"].as_array().unwrap().iter().map(|e| e["eventId"].as_str().unwrap()).collect();
    assert_eq!(ids, [published[2].as_str(), published[1].as_str()], "{page}");
    let first = &page["events"][0];
    assert_eq!(first["eventType"], "note.added");
    assert_eq!(first["payload"], json!({ "n": 2 }));
    assert_eq!(first["key"], "note-2");
    assert_eq!(first["source"], "tests");
    assert!(is_rfc3339(&first["publishedAt"]), "{first}");
    let cursor = page["nextCursor"].as_str().expect("a next cursor on a full page").to_owned();
    let last = service.get_ok(&format!("/api/events?type=note.added&limit=2&before={cursor}"));
    let ids: Vec<&str> = last["events"].as_array().unwrap().iter().map(|e| e["eventId"].as_str().unwrap()).collect();
    assert_eq!(ids, [published[0].as_str()], "{last}");
    assert!(last["nextCursor"].is_null(), "{last}");

    // An event a workflow subscribes to starts a run of it.
    let answer = service.post_json("/api/events", &json!({ "eventType": "order.created", "payload": { "order": 9 } }));
    assert_eq!(answer.status, 202, "{}", answer.text);
    let event_id = answer.json()["eventId"].as_str().unwrap().to_owned();
    let handled = wait_for(Duration::from_secs(60), Duration::from_millis(50), || {
        let events = service.get_ok("/api/events?type=order.created");
        let event = events["events"].as_array()?.iter().find(|e| e["eventId"] == event_id.as_str())?.clone();
        (event["handled"] == true).then_some(event)
    })
    .expect("the router handles the event");
    let runs = handled["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 1, "{handled}");
    assert_eq!(runs[0]["workflowId"], "listener");
    let run = service.wait_terminal(runs[0]["runId"].as_str().unwrap());
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["input"], json!({ "order": 9 }), "{run}");
    assert_eq!(run["trigger"]["kind"], "event", "{run}");
    assert_eq!(run["trigger"]["eventId"], event_id.as_str(), "{run}");

    let all = service.get_ok("/api/events");
    assert_eq!(all["events"].as_array().unwrap().len(), 4, "{all}");
    assert!(all["nextCursor"].is_null(), "{all}");

    for bad in ["limit=0", "limit=abc", "limit=501", "before=abc", "before=1-x", "type=Not%20A%20Type", "bogus=1"] {
        service.get(&format!("/api/events?{bad}")).assert_error(400, "bad_request");
    }
}

// ---- listing runs ----

#[test]
fn runs_are_listed_newest_first_in_cursor_pages_and_filtered_by_workflow_and_status() {
    let service = Service::start(&[]);

    let quick: Vec<String> = (0..25).map(|n| service.trigger("quick", json!({ "n": n }))).collect();
    let broken: Vec<String> = (0..3).map(|_| service.trigger("broken", json!({}))).collect();
    for run in quick.iter().chain(&broken) {
        service.wait_terminal(run);
    }

    // Pages of 10, 10 and 5, newest first; the last page has no next cursor.
    let mut listed: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut sizes = Vec::new();
    for _ in 0..10 {
        let path = match &cursor {
            None => "/api/runs?workflowId=quick&limit=10".to_owned(),
            Some(cursor) => format!("/api/runs?workflowId=quick&limit=10&cursor={cursor}"),
        };
        let page = service.get_ok(&path);
        let runs = page["runs"].as_array().expect("runs").clone();
        sizes.push(runs.len());
        listed.extend(runs);
        match page["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(sizes, [10, 10, 5], "page sizes");
    let listed_ids = run_ids(&Value::Array(listed.clone()));
    let mut expected = quick.clone();
    expected.reverse();
    let mut sorted_listed = listed_ids.clone();
    sorted_listed.sort();
    let mut sorted_expected = expected.clone();
    sorted_expected.sort();
    assert_eq!(sorted_listed, sorted_expected, "every run exactly once");
    // Newest first: the runs come in reverse trigger order, except that runs created in the same
    // millisecond have no order among themselves.
    for pair in listed.windows(2) {
        let position = |run: &Value| quick.iter().position(|id| run["runId"] == id.as_str()).unwrap();
        assert!(
            position(&pair[0]) > position(&pair[1]) || pair[0]["createdAt"] == pair[1]["createdAt"],
            "newest first: {} before {}",
            pair[0],
            pair[1]
        );
    }
    let first = &listed[0];
    assert_eq!(first["workflowId"], "quick");
    assert_eq!(first["status"], "completed");
    assert!(first["durationMs"].as_u64().is_some(), "{first}");
    assert!(is_rfc3339(&first["createdAt"]), "{first}");

    // Filters.
    let failed = service.get_ok("/api/runs?status=failed");
    let mut failed_ids = run_ids(&failed["runs"]);
    failed_ids.sort();
    let mut broken_sorted = broken.clone();
    broken_sorted.sort();
    assert_eq!(failed_ids, broken_sorted, "{failed}");
    assert!(failed["nextCursor"].is_null());
    let none = service.get_ok("/api/runs?workflowId=quick&status=failed");
    assert_eq!(none, json!({ "runs": [], "nextCursor": null }));
    let completed = service.get_ok("/api/runs?workflowId=quick&status=completed&limit=500");
    assert_eq!(run_ids(&completed["runs"]).len(), 25);
    let running = service.get_ok("/api/runs?status=running");
    assert_eq!(running["runs"], json!([]));
    let unknown_workflow = service.get_ok("/api/runs?workflowId=nothing-here");
    assert_eq!(unknown_workflow["runs"], json!([]));
    let everything = service.get_ok("/api/runs?limit=500");
    assert_eq!(run_ids(&everything["runs"]).len(), 28);
    let default_page = service.get_ok("/api/runs");
    assert_eq!(run_ids(&default_page["runs"]).len(), 28, "the default page holds 50");
    // Percent-encoded parameters are decoded.
    let encoded = service.get_ok("/api/runs?workflow%49d=quick&limit=1");
    assert_eq!(run_ids(&encoded["runs"]), [listed_ids[0].clone()]);

    // A row says what started the run, and a failed run's row the step it failed at.
    assert_eq!(first["trigger"], "api", "{first}");
    assert!(first["step"].is_null(), "a completed run is at no step: {first}");
    for run in failed["runs"].as_array().unwrap() {
        assert_eq!((run["step"].clone(), run["trigger"].clone()), (json!("boom"), json!("api")), "{run}");
    }

    // By creation time: `createdBefore` excludes its instant, `createdAfter` includes it, in
    // pages like any listing.
    let pivot = listed[12]["createdAt"].as_str().unwrap().to_owned();
    let created = |run: &Value| run["createdAt"].as_str().unwrap().to_owned();
    let expect = |keep: &dyn Fn(&str) -> bool| {
        let mut ids: Vec<String> =
            listed.iter().filter(|r| keep(&created(r))).map(|r| r["runId"].as_str().unwrap().to_owned()).collect();
        ids.sort();
        ids
    };
    let pages = |query: &str| {
        let mut ids = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..30 {
            let path = match &cursor {
                None => format!("/api/runs?workflowId=quick&limit=4&{query}"),
                Some(cursor) => format!("/api/runs?workflowId=quick&limit=4&{query}&cursor={cursor}"),
            };
            let page = service.get_ok(&path);
            ids.extend(run_ids(&page["runs"]));
            match page["nextCursor"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        ids.sort();
        ids
    };
    let before = pages(&format!("createdBefore={pivot}"));
    assert_eq!(before, expect(&|at| at < pivot.as_str()));
    let after = pages(&format!("createdAfter={pivot}"));
    assert_eq!(after, expect(&|at| at >= pivot.as_str()));
    assert_eq!(before.len() + after.len(), 25);
    assert_eq!(pages(&format!("createdAfter={pivot}&createdBefore={pivot}")), Vec::<String>::new());
}

// ---- search by input fields ----

const SEARCHABLE: &str = r#"
[[workflow]]
id = "orders"
search = ["userId", "region"]
[[workflow.step]]
id = "take"
action = "noop"
"#;

#[test]
fn runs_are_found_by_an_indexed_input_field_newest_first() {
    let service = Service::start_with(&[], SEARCHABLE);
    let inputs = [
        json!({ "userId": 7, "region": "eu" }),
        json!({ "userId": 8, "region": "eu" }),
        json!({ "userId": "7", "region": "us" }),
        json!({ "userId": 7.5 }),
        json!({ "userId": 7, "region": ["eu"] }),
    ];
    // A few milliseconds apart: runs created in the same millisecond have no order among them.
    let runs: Vec<String> = inputs
        .iter()
        .map(|input| {
            std::thread::sleep(Duration::from_millis(3));
            service.trigger("orders", input.clone())
        })
        .collect();
    for run in &runs {
        service.wait_terminal(run);
    }
    let workflows = service.get_ok("/api/workflows");
    let orders = workflows["workflows"].as_array().unwrap().iter().find(|w| w["id"] == "orders").unwrap().clone();
    assert_eq!(orders["search"], json!(["userId", "region"]));

    let found = |query: &str| run_ids(&service.get_ok(&format!("/api/runs?workflowId=orders&{query}"))["runs"]);
    // A number and its text alike; newest first.
    assert_eq!(found("input.userId=7"), [runs[4].clone(), runs[2].clone(), runs[0].clone()]);
    assert_eq!(found("input.userId=7.5"), [runs[3].clone()]);
    assert_eq!(found("input.region=eu"), [runs[1].clone(), runs[0].clone()], "an array is not indexed");
    assert_eq!(found("input.region=asia"), Vec::<String>::new());
    // Paged like any listing.
    let first = service.get_ok("/api/runs?workflowId=orders&input.userId=7&limit=2");
    assert_eq!(run_ids(&first["runs"]), [runs[4].clone(), runs[2].clone()]);
    let cursor = first["nextCursor"].as_str().expect("a next page");
    assert_eq!(found(&format!("input.userId=7&limit=2&cursor={cursor}")), [runs[0].clone()]);
    let eu_after = service.replica.run(&runs[1])["createdAt"].as_str().unwrap().to_owned();
    assert_eq!(found(&format!("input.region=eu&createdAfter={eu_after}")), [runs[1].clone()]);

    for bad in [
        "/api/runs?input.userId=7",
        "/api/runs?workflowId=orders&input.email=a",
        "/api/runs?workflowId=orders&input.userId=7&status=completed",
        "/api/runs?workflowId=orders&input.userId=7&input.region=eu",
        "/api/runs?workflowId=quick&input.userId=7",
        "/api/runs?workflowId=nothing-here&input.userId=7",
        "/api/runs?workflowId=orders&input.userId=%ff",
    ] {
        service.get(bad).assert_error(400, "bad_request");
    }
}

// ---- bulk actions ----

/// Runs that park at once (a long sleep), holding no executor.
const NAPPING: &str = r#"
[[workflow]]
id = "napping"
[[workflow.step]]
id = "nap"
action = "sleep"
with = { duration = "1h" }

[[workflow]]
id = "dozing"
[[workflow.step]]
id = "doze"
action = "sleep"
with = { duration = "1h" }
"#;

/// Waits (bounded) until `workflow` has `count` runs in `status`.
fn wait_count(service: &Service, workflow: &str, status: &str, count: u64) {
    let seen = wait_for(Duration::from_secs(120), Duration::from_millis(100), || {
        let counts = service.get_ok(&format!("/api/workflows/{workflow}/status"))["counts"].clone();
        (counts[status] == count).then_some(())
    });
    assert!(seen.is_some(), "{workflow}: {count} runs {status} not seen within 120 s");
}

#[test]
fn a_bulk_cancel_cancels_the_matching_live_runs_once_and_a_bulk_retry_resumes_failed_ones() {
    let service = Service::start_with(&[], NAPPING);
    let napping: Vec<String> = (0..1000).map(|n| service.trigger("napping", json!({ "n": n }))).collect();
    let dozing: Vec<String> = (0..20).map(|n| service.trigger("dozing", json!({ "n": n }))).collect();
    wait_count(&service, "napping", "sleeping", 1000);
    wait_count(&service, "dozing", "sleeping", 20);

    // 1,000 runs matching the filter, cancelled; the others untouched.
    let request = json!({ "action": "cancel", "filter": { "workflowId": "napping" }, "limit": 1000 });
    let answer = service.post_json("/api/runs/bulk", &request);
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json(), json!({ "matched": 1000, "done": 1000, "failed": [] }));
    wait_count(&service, "napping", "cancelled", 1000);
    wait_count(&service, "dozing", "sleeping", 20);
    for run in [&napping[0], &napping[999]] {
        let history = service.history(run);
        assert_eq!(history.last().unwrap()["type"], "run_cancelled", "{history:#?}");
    }
    // Safe to repeat: nothing matches any more.
    let again = service.post_json("/api/runs/bulk", &request);
    assert_eq!(again.json(), json!({ "matched": 0, "done": 0, "failed": [] }));

    // By creation time and status: the dozing runs created from the eleventh on.
    let eleventh = service.replica.run(&dozing[10])["createdAt"].as_str().unwrap().to_owned();
    let answer = service.post_json(
        "/api/runs/bulk",
        &json!({ "action": "cancel", "filter": { "workflowId": "dozing", "status": "sleeping", "createdAfter": eleventh } }),
    );
    let outcome = answer.json();
    assert_eq!((outcome["matched"].clone(), outcome["done"].clone()), (json!(10), json!(10)), "{outcome}");
    wait_count(&service, "dozing", "sleeping", 10);
    assert_eq!(service.replica.run(&dozing[9])["status"], "sleeping");
    assert_eq!(service.replica.run(&dozing[10])["status"], "cancelled");

    // A bulk retry of failed runs: they fail until the marker exists, then resume and complete.
    let flaky: Vec<String> = (0..5).map(|_| service.trigger("flaky", json!({}))).collect();
    for run in &flaky {
        assert_eq!(service.wait_terminal(run)["status"], "failed");
    }
    std::fs::write(service.path("marker"), "").unwrap();
    let retry = json!({ "action": "retry", "filter": { "workflowId": "flaky" } });
    let answer = service.post_json("/api/runs/bulk", &retry);
    assert_eq!(answer.json(), json!({ "matched": 5, "done": 5, "failed": [] }));
    for run in &flaky {
        assert_eq!(service.wait_terminal(run)["status"], "completed");
    }
    assert_eq!(service.post_json("/api/runs/bulk", &retry).json(), json!({ "matched": 0, "done": 0, "failed": [] }));

    // What a bulk action refuses.
    for bad in [
        json!({ "action": "delete" }),
        json!({}),
        json!({ "action": "cancel", "filter": { "status": "completed" } }),
        json!({ "action": "retry", "filter": { "status": "sleeping" } }),
        json!({ "action": "cancel", "limit": 0 }),
        json!({ "action": "cancel", "limit": 10001 }),
        json!({ "action": "cancel", "filter": { "owner": "x" } }),
        json!({ "action": "cancel", "filter": { "workflowId": null } }),
        json!({ "action": "cancel", "filter": { "createdAfter": "yesterday" } }),
        json!({ "action": "cancel", "filter": "napping" }),
        json!({ "action": "cancel", "extra": 1 }),
    ] {
        service.post_json("/api/runs/bulk", &bad).assert_error(400, "bad_request");
    }
    wait_count(&service, "dozing", "sleeping", 10);
}

#[test]
fn bad_query_values_are_refused_with_400() {
    let service = Service::start(&[]);
    for bad in [
        "limit=0",
        "limit=abc",
        "limit=-1",
        "limit=501",
        "limit=",
        "status=nope",
        "status=COMPLETED",
        "bogus=1",
        "workflowId=Not%20An%20Id",
        "cursor=abc",
        "cursor=0193e4a17b2c7d3e8f001a2b3c4d5e6f",
        "limit=1&limit=2",
        "status=%ff",
        "createdAfter=yesterday",
        "createdBefore=2026-12-07",
        "createdAfter=",
    ] {
        let answer = service.get(&format!("/api/runs?{bad}"));
        answer.assert_error(400, "bad_request");
        eprintln!("GET /api/runs?{bad} -> {}", answer.text);
    }
    assert_eq!(service.get_ok("/api/runs?limit=500")["runs"], json!([]));
}

// ---- one run ----

#[test]
fn a_run_and_its_history_are_served_and_malformed_ids_are_400_while_unknown_ones_are_404() {
    let service = Service::start(&[]);
    let run_id = service.trigger("two", json!({ "k": "v" }));
    service.wait_terminal(&run_id);

    let run = service.get_ok(&format!("/api/runs/{run_id}"));
    assert_eq!(run["runId"], run_id.as_str());
    assert_eq!(run["workflowId"], "two");
    assert_eq!(run["status"], "completed");
    assert_eq!(run["input"], json!({ "k": "v" }));
    assert_eq!(run["trigger"], json!({ "kind": "api" }));
    assert!(run["error"].is_null(), "{run}");
    assert_eq!(run["seq"], 6);
    assert!(is_rfc3339(&run["createdAt"]) && is_rfc3339(&run["updatedAt"]), "{run}");
    let steps = run["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0]["id"], "first");
    assert_eq!(steps[0]["status"], "completed");
    assert_eq!(steps[0]["attempts"], 1);
    assert_eq!(steps[1]["id"], "second");
    assert_eq!(steps[1]["output"]["stdout"], r#"{"k":"v"}"#);
    assert_eq!(steps[1]["output"]["exitCode"], 0);

    let history = service.get_ok(&format!("/api/runs/{run_id}/history"));
    assert_eq!(history["runId"], run_id.as_str());
    let transitions = history["transitions"].as_array().expect("transitions");
    assert_eq!(
        kinds(transitions),
        ["run_created", "step_started", "step_completed", "step_started", "step_completed", "run_completed"]
    );
    for (index, transition) in transitions.iter().enumerate() {
        assert_eq!(transition["seq"], index as u64 + 1, "seq is an integer, 1, 2, ...: {transition}");
        assert!(is_rfc3339(&transition["at"]), "{transition}");
        for field in ["step", "attempt", "replica"] {
            assert!(transition.get(field).is_some(), "every transition has `{field}`: {transition}");
        }
    }
    let created = &transitions[0];
    assert_eq!(created["workflowId"], "two");
    assert_eq!(created["input"], json!({ "k": "v" }));
    assert_eq!(created["trigger"], json!({ "kind": "api" }));
    assert!(created["step"].is_null() && created["attempt"].is_null(), "{created}");
    assert_eq!(transitions[3]["step"], "second");
    assert_eq!(transitions[3]["attempt"], 1);
    assert_eq!(transitions[3]["replica"], "api");
    assert_eq!(transitions[4]["output"]["stdout"], r#"{"k":"v"}"#);
    // A trailing slash names the same resource.
    assert_eq!(service.get_ok(&format!("/api/runs/{run_id}/")), run);

    // Malformed ids are bad requests; well-formed unknown ones are not found. On every run route.
    for bad in ["not-a-run", "0193e4a17b2c7d3e8f001a2b3c4d5e6f", "0193e4a17b2c7d3e8f001a2b3c4d5e6z-s1", "x-s99999999"] {
        service.get(&format!("/api/runs/{bad}")).assert_error(400, "bad_request");
        service.get(&format!("/api/runs/{bad}/history")).assert_error(400, "bad_request");
        for action in ["cancel", "retry", "rerun"] {
            service.call("POST", &format!("/api/runs/{bad}/{action}")).send().assert_error(400, "bad_request");
        }
    }
    service.get(&format!("/api/runs/{UNKNOWN_RUN}")).assert_error(404, "not_found");
    service.get(&format!("/api/runs/{UNKNOWN_RUN}/history")).assert_error(404, "not_found");
    for action in ["cancel", "retry", "rerun"] {
        service.call("POST", &format!("/api/runs/{UNKNOWN_RUN}/{action}")).send().assert_error(404, "not_found");
    }
}

// ---- operator actions ----

#[test]
fn cancelling_a_running_step_discards_its_late_completion_and_a_second_cancel_conflicts() {
    let service = Service::start(&[]);
    let run_id = service.trigger("held", json!({}));
    let started = service.path(&format!("started-{run_id}"));
    wait_for(Duration::from_secs(60), Duration::from_millis(50), || started.exists().then_some(()))
        .expect("the held step starts");

    // Bodies are checked before anything happens.
    service.post_json(&format!("/api/runs/{run_id}/cancel"), &json!({ "why": "x" })).assert_error(400, "bad_request");
    service.post_json(&format!("/api/runs/{run_id}/cancel"), &json!({ "reason": 5 })).assert_error(400, "bad_request");
    service
        .post_json(&format!("/api/runs/{run_id}/cancel"), &json!({ "reason": "r".repeat(501) }))
        .assert_error(400, "bad_request");
    assert_eq!(service.replica.run(&run_id)["status"], "running");

    let answer = service.post_json(&format!("/api/runs/{run_id}/cancel"), &json!({ "reason": "the test says stop" }));
    assert_eq!(answer.status, 200, "{}", answer.text);
    assert_eq!(answer.json(), json!({ "runId": run_id, "workflowId": "held", "status": "cancelled" }));

    // Let the step finish now: its completion comes after the cancel and must be discarded.
    touch(&service.path("release"));
    let discarded = wait_for(Duration::from_secs(60), Duration::from_millis(50), || {
        let log = service.replica.log_text();
        log.lines()
            .any(|l| {
                l.contains(&run_id) && (l.contains("discarding the outcome") || l.contains("rejected by the fence"))
            })
            .then_some(())
    });
    assert!(discarded.is_some(), "the step's late outcome was discarded; log:\n{}", service.replica.log_text());

    let run = service.replica.run(&run_id);
    assert_eq!(run["status"], "cancelled", "{run}");
    assert_eq!(run["error"], "cancelled: the test says stop", "{run}");
    assert_eq!(run["steps"][0]["status"], "completed", "{run}");
    // The step that ran when the run was cancelled: its outcome is nowhere.
    assert!(run["steps"][1]["output"].is_null(), "{run}");
    assert_ne!(run["steps"][1]["status"], "completed", "{run}");
    assert_eq!(run["steps"][2]["status"], "pending", "{run}");
    // Nothing of the discarded attempt is in the history (its start is committed with its
    // outcome), and nothing came after the cancel.
    let history = service.history(&run_id);
    assert_eq!(kinds(&history), ["run_created", "step_started", "step_completed", "run_cancelled"], "{history:#?}");
    assert_eq!(history[1]["step"], "prep");
    assert_eq!(history[3]["reason"], "the test says stop");

    service.call("POST", &format!("/api/runs/{run_id}/cancel")).send().assert_error(409, "conflict");
    service.call("POST", &format!("/api/runs/{run_id}/retry")).send().assert_error(409, "conflict");
    let counts = service.get_ok("/api/workflows/held/status")["counts"].clone();
    assert_eq!(counts["cancelled"], 1, "{counts}");
    assert_eq!(counts["running"], 0, "{counts}");
}

#[test]
fn retry_resumes_a_failed_run_at_its_failed_step_and_only_failed_runs_can_be_retried() {
    let service = Service::start(&[]);
    let run_id = service.trigger("flaky", json!({}));
    let run = service.wait_terminal(&run_id);
    assert_eq!(run["status"], "failed", "{run}");
    assert!(run["error"].as_str().unwrap_or_default().contains("not-yet-2"), "{run}");
    assert_eq!(run["steps"][1]["attempts"], 2, "{run}");
    let first_output = run["steps"][0]["output"].clone();
    assert_eq!(first_output["stdout"], format!("first-{run_id}"));

    // A rerun cannot reuse the output of a step that never completed.
    service
        .post_json(&format!("/api/runs/{run_id}/rerun"), &json!({ "fromStep": "third" }))
        .assert_error(400, "bad_request");
    // Retry takes no body fields.
    service.post_json(&format!("/api/runs/{run_id}/retry"), &json!({ "x": 1 })).assert_error(400, "bad_request");
    // Only a failed run can be retried.
    let quick = service.trigger("quick", json!({}));
    service.wait_terminal(&quick);
    service.call("POST", &format!("/api/runs/{quick}/retry")).send().assert_error(409, "conflict");

    touch(&service.path("marker"));
    let answer = service.call("POST", &format!("/api/runs/{run_id}/retry")).send();
    assert_eq!(answer.status, 202, "{}", answer.text);
    let body = answer.json();
    assert_eq!(body["runId"], run_id.as_str());
    assert_eq!(body["workflowId"], "flaky");
    let run = service.wait_terminal(&run_id);
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["steps"][0]["output"], first_output, "the first step was not run again");
    assert_eq!(run["steps"][1]["output"]["stdout"], "second-ok");
    assert_eq!(run["steps"][1]["attempts"], 3, "{run}");
    assert!(run["error"].is_null(), "{run}");

    let history = service.history(&run_id);
    assert_eq!(
        kinds(&history),
        [
            "run_created",
            "step_started",
            "step_completed",
            "step_started",
            "step_failed",
            "timer_fired",
            "step_started",
            "step_failed",
            "run_failed",
            "run_resumed",
            "step_started",
            "step_completed",
            "step_started",
            "step_completed",
            "run_completed",
        ],
        "{history:#?}"
    );
    let resumed = &history[9];
    assert_eq!((resumed["step"].clone(), resumed["attempt"].clone()), (json!("second"), json!(3)), "{resumed}");
    let restarted = &history[10];
    assert_eq!((restarted["step"].clone(), restarted["attempt"].clone()), (json!("second"), json!(3)));
    for (index, transition) in history.iter().enumerate() {
        assert_eq!(transition["seq"], index as u64 + 1);
    }
    // Completed now: a second retry conflicts.
    service.call("POST", &format!("/api/runs/{run_id}/retry")).send().assert_error(409, "conflict");
}

#[test]
fn rerun_from_a_step_starts_a_new_run_that_reuses_the_earlier_outputs() {
    let service = Service::start(&[]);
    let original = service.trigger("chain", json!({ "v": 1 }));
    assert_eq!(service.wait_terminal(&original)["status"], "completed");

    for bad in [
        json!({ "fromStep": "nope" }),
        json!({ "fromStep": 1 }),
        json!({ "inputData": 5 }),
        json!({ "fromStep": "second", "extra": true }),
    ] {
        service.post_json(&format!("/api/runs/{original}/rerun"), &bad).assert_error(400, "bad_request");
    }

    let answer = service.post_json(&format!("/api/runs/{original}/rerun"), &json!({ "fromStep": "second" }));
    assert_eq!(answer.status, 202, "{}", answer.text);
    let body = answer.json();
    let rerun = body["runId"].as_str().expect("runId").to_owned();
    assert_ne!(rerun, original);
    assert_eq!(
        body,
        json!({ "runId": rerun, "workflowId": "chain", "status": "pending", "rerunOf": original, "fromStep": "second" })
    );
    let run = service.wait_terminal(&rerun);
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["trigger"]["kind"], "rerun", "{run}");
    assert_eq!(run["trigger"]["runId"], original.as_str(), "the new run records where it came from: {run}");
    assert!(run["trigger"]["fromStep"] == 1 || run["trigger"]["fromStep"] == "second", "{run}");
    assert_eq!(run["input"], json!({ "v": 1 }), "the original input by default");
    assert_eq!(run["steps"][0]["output"]["stdout"], format!("first-{original}"), "reused: {run}");
    assert_eq!(run["steps"][1]["output"]["stdout"], format!("second-{rerun}"), "run anew: {run}");
    assert_eq!(run["steps"][2]["output"]["stdout"], format!("third-{rerun}"), "run anew: {run}");

    let history = service.history(&rerun);
    assert_eq!(
        kinds(&history),
        [
            "run_created",
            "step_reused",
            "step_started",
            "step_completed",
            "step_started",
            "step_completed",
            "run_completed"
        ],
        "{history:#?}"
    );
    assert_eq!(history[0]["trigger"]["kind"], "rerun");
    let reused = &history[1];
    assert_eq!(reused["step"], "first", "{reused}");
    assert_eq!(reused["reused"], true, "{reused}");
    assert_eq!(reused["output"]["stdout"], format!("first-{original}"), "{reused}");
    assert_eq!(history[2]["step"], "second");

    // The original is untouched.
    let before = service.replica.run(&original);
    assert_eq!(before["steps"][1]["output"]["stdout"], format!("second-{original}"));

    // Without a body: from the first step, nothing reused; with inputData: the new input.
    let answer = service.call("POST", &format!("/api/runs/{original}/rerun")).send();
    assert_eq!(answer.status, 202, "{}", answer.text);
    let fresh = answer.json()["runId"].as_str().unwrap().to_owned();
    service.wait_terminal(&fresh);
    let fresh_history = service.history(&fresh);
    assert!(!kinds(&fresh_history).contains(&"step_reused".to_owned()), "{fresh_history:#?}");
    assert_eq!(service.replica.run(&fresh)["steps"][0]["output"]["stdout"], format!("first-{fresh}"));

    let answer = service
        .post_json(&format!("/api/runs/{rerun}/rerun"), &json!({ "fromStep": "third", "inputData": { "v": 2 } }));
    assert_eq!(answer.status, 202, "{}", answer.text);
    let third = answer.json()["runId"].as_str().unwrap().to_owned();
    let run = service.wait_terminal(&third);
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["input"], json!({ "v": 2 }));
    assert_eq!(run["trigger"]["runId"], rerun.as_str());
    // Reused outputs carry over through reruns of reruns.
    assert_eq!(run["steps"][0]["output"]["stdout"], format!("first-{original}"), "{run}");
    assert_eq!(run["steps"][1]["output"]["stdout"], format!("second-{rerun}"), "{run}");
    assert_eq!(run["steps"][2]["output"]["stdout"], format!("third-{third}"), "{run}");
}

// ---- routing ----

#[test]
fn unknown_routes_are_404_and_wrong_methods_are_405_with_an_allow_header() {
    let service = Service::start(&[]);
    for path in ["/nope", "/api", "/api/workflows/two", "/api/runs/x/y/z", "/api/workflows/two/trigger/now", "/healthz"]
    {
        service.get(path).assert_error(404, "not_found");
    }
    service.post_json("/api/nope", &json!({})).assert_error(404, "not_found");

    let run = |suffix: &str| format!("/api/runs/{UNKNOWN_RUN}{suffix}");
    let cases: Vec<(&str, String, &str)> = vec![
        ("POST", "/health".to_owned(), "GET, HEAD"),
        ("POST", "/metrics".to_owned(), "GET, HEAD"),
        ("PUT", "/api/openapi.json".to_owned(), "GET, HEAD"),
        ("DELETE", "/api/workflows".to_owned(), "GET, HEAD"),
        ("POST", "/api/workflows/two/status".to_owned(), "GET, HEAD"),
        ("GET", "/api/workflows/two/trigger".to_owned(), "POST"),
        ("PUT", "/api/events".to_owned(), "GET, HEAD, POST"),
        ("DELETE", "/api/runs".to_owned(), "GET, HEAD"),
        ("DELETE", run(""), "GET, HEAD"),
        ("PATCH", run("/history"), "GET, HEAD"),
        ("GET", run("/cancel"), "POST"),
        ("GET", run("/retry"), "POST"),
        ("GET", run("/rerun"), "POST"),
    ];
    for (method, path, allow) in cases {
        let answer = service.call(method, &path).send();
        answer.assert_error(405, "method_not_allowed");
        assert_eq!(answer.allow.as_deref(), Some(allow), "{method} {path}: the Allow header");
    }
}

// ---- access ----

#[test]
fn with_an_api_token_every_route_but_health_and_metrics_needs_the_bearer_token() {
    const TOKEN: &str = "s3cret-token-for-tests";
    let service = Service::start(&[("API_TOKEN", TOKEN)]);
    let bearer = format!("Bearer {TOKEN}");

    let protected: [(&str, String); 11] = [
        ("GET", "/api/openapi.json".to_owned()),
        ("GET", "/api/workflows".to_owned()),
        ("GET", "/api/workflows/quick/status".to_owned()),
        ("POST", "/api/workflows/quick/trigger".to_owned()),
        ("GET", "/api/events".to_owned()),
        ("POST", "/api/events".to_owned()),
        ("GET", "/api/runs".to_owned()),
        ("GET", format!("/api/runs/{UNKNOWN_RUN}")),
        ("GET", format!("/api/runs/{UNKNOWN_RUN}/history")),
        ("POST", format!("/api/runs/{UNKNOWN_RUN}/cancel")),
        ("POST", format!("/api/runs/{UNKNOWN_RUN}/rerun")),
    ];
    let wrong = [
        None,
        Some("Bearer wrong".to_owned()),
        Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Basic {TOKEN}")),
        Some(TOKEN.to_owned()),
        Some("Bearer ".to_owned()),
    ];
    for (method, path) in &protected {
        for authorization in &wrong {
            let mut call = service.call(method, path);
            if let Some(value) = authorization {
                call = call.header("Authorization", value);
            }
            if *method == "POST" {
                call = call.json(&json!({ "eventType": "a.b" }));
            }
            let answer = call.send();
            answer.assert_error(401, "unauthorized");
            assert_eq!(answer.www_authenticate.as_deref(), Some("Bearer"), "{method} {path}");
        }
    }
    let retry = service.call("POST", &format!("/api/runs/{UNKNOWN_RUN}/retry")).send();
    retry.assert_error(401, "unauthorized");

    // Nothing was started by the refused requests.
    let runs = service.call("GET", "/api/runs").header("Authorization", &bearer).send();
    assert_eq!(runs.status, 200, "{}", runs.text);
    assert_eq!(runs.json()["runs"], json!([]));

    // With the token, the API answers.
    let workflows = service.call("GET", "/api/workflows").header("Authorization", &bearer).send();
    assert_eq!(workflows.status, 200, "{}", workflows.text);
    let triggered = service
        .call("POST", "/api/workflows/quick/trigger")
        .header("Authorization", &bearer)
        .json(&json!({ "inputData": {} }))
        .send();
    assert_eq!(triggered.status, 202, "{}", triggered.text);
    let run_id = triggered.json()["runId"].as_str().unwrap().to_owned();
    let done = wait_for(Duration::from_secs(60), Duration::from_millis(50), || {
        let answer = service.call("GET", &format!("/api/runs/{run_id}")).header("Authorization", &bearer).send();
        (answer.status == 200 && answer.json()["status"] == "completed").then_some(())
    });
    assert!(done.is_some(), "the run completes");
    let unknown = service.call("GET", &format!("/api/runs/{UNKNOWN_RUN}")).header("Authorization", &bearer).send();
    unknown.assert_error(404, "not_found");

    // Probes and scrapers need no token, and a wrong one does not stop them.
    for path in ["/health", "/metrics"] {
        assert_eq!(service.get(path).status, 200, "{path} without a token");
        let answer = service.call("GET", path).header("Authorization", "Bearer wrong").send();
        assert_eq!(answer.status, 200, "{path} with a wrong token");
    }
    assert!(
        !service.replica.log_text().contains("API_TOKEN is not set"),
        "no open-API warning with a token: {}",
        service.replica.log_text()
    );
    // The token never appears in the log.
    assert!(!service.replica.log_text().contains(TOKEN));
}

// ---- the Inngest webhook ----

/// Inngest's signature, computed here independently of the service: hex HMAC-SHA256 of the body
/// followed by the timestamp, keyed with the signing key without its `signkey-<env>-` prefix.
fn inngest_signature(key: &str, body: &str, timestamp: u64) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).expect("any key length");
    mac.update(body.as_bytes());
    mac.update(timestamp.to_string().as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[test]
fn the_inngest_webhook_needs_no_api_token_but_a_valid_fresh_signature() {
    const TOKEN: &str = "api-token-for-webhook-test";
    let service = Service::start(&[("API_TOKEN", TOKEN), ("INNGEST_SIGNING_KEY", "signkey-test-0123abcd")]);
    let key = "0123abcd";
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let body = json!({ "name": "rayanava/leads.scored", "data": { "lead": 5 }, "id": "01HXWEBHOOK" }).to_string();
    let post = |signature: Option<String>, body: &str| {
        let mut call = service.call("POST", "/api/webhooks/inngest").body("application/json", body);
        if let Some(signature) = signature {
            call = call.header("X-Inngest-Signature", &signature);
        }
        call.send()
    };

    for signature in [
        None,
        Some("nonsense".to_owned()),
        Some(format!("t={now}")),
        Some(format!("t={now}&s={}", "0".repeat(64))),
        // Signed, but for another body.
        Some(format!("t={now}&s={}", inngest_signature(key, "{}", now))),
        // Signed with the whole key, prefix included.
        Some(format!("t={now}&s={}", inngest_signature("signkey-test-0123abcd", &body, now))),
        // Signed correctly, but an hour old.
        Some(format!("t={}&s={}", now - 3600, inngest_signature(key, &body, now - 3600))),
    ] {
        let answer = post(signature.clone(), &body);
        answer.assert_error(401, "bad_signature");
        eprintln!("{signature:?} -> {}", answer.text);
    }

    let answer = post(Some(format!("t={now}&s={}", inngest_signature(key, &body, now))), &body);
    assert_eq!(answer.status, 202, "{}", answer.text);
    let published = answer.json();
    assert_eq!(published["eventType"], "rayanava.leads.scored", "{published}");
    let event_id = published["eventId"].as_str().expect("eventId").to_owned();
    let events = service
        .call("GET", "/api/events?type=rayanava.leads.scored")
        .header("Authorization", &format!("Bearer {TOKEN}"))
        .send();
    assert_eq!(events.status, 200, "{}", events.text);
    let events = events.json();
    let event = &events["events"][0];
    assert_eq!(event["eventId"], event_id.as_str(), "{events}");
    assert_eq!(event["source"], "inngest");
    assert_eq!(event["key"], "inngest:01HXWEBHOOK");
    assert_eq!(event["payload"], json!({ "lead": 5 }));

    // Signed, but not a usable body.
    for bad in ["{not json", r#"{"data": {}}"#] {
        post(Some(format!("t={now}&s={}", inngest_signature(key, bad, now))), bad).assert_error(400, "bad_request");
    }
    // Too large, however it is signed.
    let big = format!(r#"{{"name":"a.b","data":{{"blob":"{}"}}}}"#, "z".repeat(1024 * 1024 + 10));
    post(Some(format!("t={now}&s={}", inngest_signature(key, &big, now))), &big).assert_error(413, "payload_too_large");

    let get = service.get("/api/webhooks/inngest");
    get.assert_error(405, "method_not_allowed");
    assert_eq!(get.allow.as_deref(), Some("POST"));
}

#[test]
fn the_inngest_webhook_without_a_signing_key_refuses_with_not_configured() {
    let service = Service::start(&[]);
    let answer = service.post_json("/api/webhooks/inngest", &json!({ "name": "a.b" }));
    answer.assert_error(404, "not_configured");
    assert_eq!(service.get_ok("/api/events")["events"], json!([]));
}

// ---- the dashboard and its routes ----

#[test]
fn the_dashboard_is_served_at_ui_with_a_tight_content_security_policy_and_slash_redirects_there() {
    let service = Service::start(&[]);
    let root = service.get("/");
    assert_eq!(root.status, 302, "{}", root.text);
    assert_eq!(root.header("location"), Some("/ui"));

    // Every /ui path is the same page, which holds no data and loads only its own assets.
    let page = service.get("/ui");
    assert_eq!(page.status, 200, "{}", page.text);
    for path in ["/ui/", "/ui/runs", &format!("/ui/runs/{UNKNOWN_RUN}"), "/ui/workflows/two", "/ui/events", "/ui/x/y"] {
        let other = service.get(path);
        assert_eq!((other.status, &other.text), (200, &page.text), "{path}");
    }
    assert!(page.content_type.starts_with("text/html"), "{}", page.content_type);
    assert!(page.text.contains(r#"<script type="module" src="/ui/assets/app.js"></script>"#), "{}", page.text);
    let policy = page.header("content-security-policy").expect("a Content-Security-Policy");
    for directive in
        ["default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"]
    {
        assert!(policy.contains(directive), "{directive} in {policy}");
    }
    assert!(!policy.contains("unsafe-inline") && !policy.contains("unsafe-eval"), "{policy}");
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(page.header("x-frame-options"), Some("DENY"));

    let script = service.get("/ui/assets/app.js");
    assert_eq!(script.status, 200);
    assert!(script.content_type.starts_with("text/javascript"), "{}", script.content_type);
    assert!(!script.text.contains("innerHTML"), "the app never writes HTML from strings");
    let style = service.get("/ui/assets/app.css");
    assert!(style.content_type.starts_with("text/css"), "{}", style.content_type);
    service.get("/ui/assets/nope.js").assert_error(404, "not_found");
    let refused = service.call("POST", "/ui").json(&json!({})).send();
    refused.assert_error(405, "method_not_allowed");

    // The API's answers are never sniffed, framed or run as a page either.
    let health = service.get("/health");
    assert_eq!(health.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(health.header("content-security-policy"), Some("default-src 'none'; frame-ancestors 'none'"));

    // Without a token there is no session to ask for, and logging in says so.
    assert_eq!(service.get_ok("/ui/session"), json!({ "tokenRequired": false, "authenticated": true }));
    let login = service.post_json("/ui/login", &json!({ "token": "anything" }));
    assert_eq!(login.status, 200, "{}", login.text);
    assert_eq!(login.json(), json!({ "tokenRequired": false, "authenticated": true }));
    assert_eq!(login.header("set-cookie"), None);
}

#[test]
fn replicas_heartbeat_stats_count_recent_runs_and_a_runs_state_is_served_after_any_transition() {
    let service = Service::start(&[]);
    // The first heartbeat is written as the replica starts its loops.
    let replicas = wait_for(Duration::from_secs(30), Duration::from_millis(50), || {
        let replicas = service.get_ok("/api/replicas");
        (replicas["replicas"].as_array().is_some_and(|r| !r.is_empty())).then_some(replicas)
    })
    .expect("the replica's heartbeat is listed");
    let listed = replicas["replicas"].as_array().expect("replicas");
    assert_eq!(listed.len(), 1, "{replicas}");
    let me = &listed[0];
    assert!(me["id"].as_str().unwrap().starts_with("api:"), "the consumer name of REPLICA_ID `api`: {me}");
    assert_eq!(me["version"], env!("CARGO_PKG_VERSION"));
    assert!(me["executorsTotal"].as_u64().unwrap() >= 1, "{me}");
    assert!(is_rfc3339(&me["lastSeen"]) && is_rfc3339(&me["startedAt"]), "{me}");
    assert!(replicas["ttlSeconds"].as_u64().unwrap() > replicas["heartbeatSeconds"].as_u64().unwrap());

    let run = service.trigger("two", json!({ "n": 1 }));
    assert_eq!(service.wait_terminal(&run)["status"], "completed");
    let failed = service.trigger("broken", json!({}));
    assert_eq!(service.wait_terminal(&failed)["status"], "failed");

    let stats = service.get_ok("/api/stats");
    assert_eq!(stats["lastHour"], json!({ "started": 2, "completed": 1, "failed": 1 }), "{stats}");
    assert_eq!(stats["lastDay"], stats["lastHour"], "{stats}");
    let hours = stats["hours"].as_array().expect("hours");
    assert_eq!(hours.len(), 24);
    assert_eq!(hours[23]["started"], 2, "the runs are in the last hour: {stats}");
    assert_eq!(stats["capped"], false);
    assert!(stats["bus"]["length"].as_u64().is_some() && stats["steps"]["inFlight"].as_u64().is_some(), "{stats}");

    // Step-through: the state right after each transition, the last one being the run as it is.
    let history = service.history(&run);
    let last = history.len() as u64;
    assert!(last >= 5, "{history:?}");
    let first = service.get_ok(&format!("/api/runs/{run}/state?at=1"));
    assert_eq!(first["at"], 1);
    assert_eq!(first["status"], "pending", "{first}");
    assert_eq!(first["current"]["step"], "first", "{first}");
    assert!(first["foldMatchesStored"].is_null(), "checked only at the end of the log: {first}");
    assert!(
        first["steps"].as_array().unwrap().iter().all(|s| s["status"] == "pending" && s["output"].is_null()),
        "{first}"
    );
    let after_first_step =
        history.iter().find(|t| t["type"] == "step_completed").expect("a completed step")["seq"].as_u64().unwrap();
    let middle = service.get_ok(&format!("/api/runs/{run}/state?at={after_first_step}"));
    assert_eq!(middle["steps"][0]["status"], "completed", "{middle}");
    assert_eq!(middle["steps"][0]["output"], json!({ "n": 1 }), "{middle}");
    assert_eq!(middle["steps"][1]["attempts"], 0, "queued, not started yet: {middle}");
    assert!(middle["steps"][1]["output"].is_null(), "{middle}");
    assert_eq!(middle["current"]["step"], "second", "{middle}");
    assert_eq!(middle["current"]["live"], json!([{ "step": "second", "status": "queued", "attempt": 1 }]), "{middle}");
    assert_eq!(middle["status"], "running", "{middle}");
    let end = service.get_ok(&format!("/api/runs/{run}/state?at={last}"));
    let mut now = service.get_ok(&format!("/api/runs/{run}"));
    now["at"] = json!(last);
    now["current"] = json!({ "status": "completed", "step": null, "attempt": null, "live": [], "lastError": null });
    now["foldMatchesStored"] = json!(true);
    assert_eq!(end, now);
    assert_eq!(service.get_ok(&format!("/api/runs/{run}/state")), now, "without `at`: as it is now");

    let failed_state = service.get_ok(&format!("/api/runs/{failed}/state"));
    assert_eq!(failed_state["current"]["lastError"]["step"], "boom", "{failed_state}");

    for bad in ["0", &(last + 1).to_string(), "x", "-1", ""] {
        service.get(&format!("/api/runs/{run}/state?at={bad}")).assert_error(400, "bad_request");
    }
    service.get(&format!("/api/runs/{run}/state?at=1&bogus=2")).assert_error(400, "bad_request");
    service.get(&format!("/api/runs/{UNKNOWN_RUN}/state?at=1")).assert_error(404, "not_found");
    service.get("/api/runs/not-a-run/state").assert_error(400, "bad_request");
}

#[test]
fn with_an_api_token_the_dashboard_trades_it_for_a_signed_session_cookie_the_api_accepts() {
    const TOKEN: &str = "s3cret-token-for-the-dashboard";
    let service = Service::start(&[("API_TOKEN", TOKEN)]);
    assert_eq!(service.get_ok("/ui/session"), json!({ "tokenRequired": true, "authenticated": false }));
    // The page itself is served (it holds nothing); the data is not.
    assert_eq!(service.get("/ui/runs").status, 200);
    service.get("/api/runs").assert_error(401, "unauthorized");

    for wrong in ["wrong", "", &TOKEN[1..], &format!("{TOKEN}x")] {
        let refused = service.post_json("/ui/login", &json!({ "token": wrong }));
        refused.assert_error(401, "unauthorized");
        assert_eq!(refused.header("set-cookie"), None);
    }
    service.post_json("/ui/login", &json!({})).assert_error(400, "bad_request");
    service
        .call("POST", "/ui/login")
        .body("text/plain", format!(r#"{{"token":"{TOKEN}"}}"#))
        .send()
        .assert_error(415, "unsupported_media_type");
    let cross = service
        .call("POST", "/ui/login")
        .header("Origin", "http://evil.example")
        .json(&json!({ "token": TOKEN }))
        .send();
    cross.assert_error(403, "cross_origin");

    let login = service.post_json("/ui/login", &json!({ "token": TOKEN }));
    assert_eq!(login.status, 200, "{}", login.text);
    assert_eq!(login.json()["authenticated"], true);
    let set_cookie = login.header("set-cookie").expect("a session cookie").to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(set_cookie.split("; ").any(|a| a == attribute), "{attribute} in {set_cookie}");
    }
    assert!(!set_cookie.contains(TOKEN), "the cookie is not the token: {set_cookie}");
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    assert!(cookie.starts_with("wfo_session="), "{cookie}");

    // The cookie stands in for the bearer header, for reading and (same-origin) acting.
    let with_cookie = |method: &str, path: &str| service.call(method, path).header("Cookie", &cookie);
    assert_eq!(with_cookie("GET", "/api/runs").send().status, 200);
    assert_eq!(
        with_cookie("GET", "/ui/session").send().json(),
        json!({ "tokenRequired": true, "authenticated": true })
    );
    let triggered = with_cookie("POST", "/api/workflows/quick/trigger").json(&json!({ "inputData": {} })).send();
    assert_eq!(triggered.status, 202, "{}", triggered.text);
    // Another origin cannot act with it, nor post anything but JSON.
    with_cookie("POST", "/api/workflows/quick/trigger")
        .header("Origin", "http://evil.example")
        .json(&json!({}))
        .send()
        .assert_error(403, "cross_origin");
    with_cookie("POST", "/api/workflows/quick/trigger")
        .header("Sec-Fetch-Site", "cross-site")
        .json(&json!({}))
        .send()
        .assert_error(403, "cross_origin");
    with_cookie("POST", "/api/workflows/quick/trigger")
        .body("text/plain", "{}")
        .send()
        .assert_error(415, "unsupported_media_type");

    // A cookie changed in any way is no session.
    let (name_value, signature) = cookie.rsplit_once('.').unwrap();
    let flipped = if signature.starts_with('0') { "1" } else { "0" };
    for forged in [
        format!("{name_value}.{flipped}{}", &signature[1..]),
        "wfo_session=v1.99999999999999.00.00".to_owned(),
        "wfo_session=".to_owned(),
    ] {
        let answer = service.call("GET", "/api/runs").header("Cookie", &forged).send();
        answer.assert_error(401, "unauthorized");
    }
    // A wrong bearer header is not rescued by a good cookie.
    with_cookie("GET", "/api/runs").header("Authorization", "Bearer wrong").send().assert_error(401, "unauthorized");

    // Logging out clears the cookie.
    let logout = with_cookie("POST", "/ui/logout").send();
    assert_eq!(logout.status, 200, "{}", logout.text);
    assert!(
        logout.header("set-cookie").is_some_and(|c| c.starts_with("wfo_session=;") && c.contains("Max-Age=0")),
        "{:?}",
        logout.headers
    );
    assert!(!service.replica.log_text().contains(TOKEN), "the token never appears in the log");
}
