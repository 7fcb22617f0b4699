//! Traces (issue 14): served replicas export OTLP/HTTP protobuf to a receiver of the test's own
//! on loopback, decoded with `opentelemetry-proto`. One trace per run under the caller's span,
//! whichever replicas run its steps; the trace context goes out to what steps call.

use crate::util::{FakeServer, RedisServer, ReplicaConfig, http, wait_for, workflows_file};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use prost::Message;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);
/// The caller's span, as a service in front of us would send it.
const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// A span as the receiver decoded it: ids in lowercase hex, attribute values as text.
#[derive(Debug, Clone)]
struct Exported {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    attributes: HashMap<String, String>,
    /// 0 unset, 1 ok, 2 error.
    status: i32,
    /// `service.instance.id` of the resource: the replica that exported it.
    exporter: String,
}

impl Exported {
    fn attr(&self, name: &str) -> &str {
        self.attributes.get(name).map_or("", String::as_str)
    }
}

/// A small OTLP/HTTP receiver: `POST /v1/traces` with protobuf bodies, answered 200 with an
/// empty `ExportTraceServiceResponse`. Stopped when dropped.
struct Receiver {
    port: u16,
    spans: Arc<Mutex<Vec<Exported>>>,
    stop: Arc<AtomicBool>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the OTLP receiver");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let port = listener.local_addr().unwrap().port();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (collected, stopping) = (Arc::clone(&spans), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let collected = Arc::clone(&collected);
                std::thread::spawn(move || serve(stream, &collected));
            }
        });
        Receiver { port, spans, stop }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn spans(&self) -> Vec<Exported> {
        self.spans.lock().unwrap().clone()
    }

    fn trace(&self, trace_id: &str) -> Vec<Exported> {
        self.spans().into_iter().filter(|s| s.trace_id == trace_id).collect()
    }

    /// Waits (bounded) until the spans of `trace_id` satisfy `done`; returns them.
    fn wait_trace(&self, trace_id: &str, what: &str, done: impl Fn(&[Exported]) -> bool) -> Vec<Exported> {
        wait_for(LIMIT, POLL, || {
            let spans = self.trace(trace_id);
            done(&spans).then_some(spans)
        })
        .unwrap_or_else(|| {
            panic!("{what} not exported within {LIMIT:?}; spans of the trace: {:#?}", self.trace(trace_id))
        })
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One connection: requests one after another (keep-alive), each body by Content-Length.
fn serve(mut stream: std::net::TcpStream, collected: &Mutex<Vec<Exported>>) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    for _ in 0..10_000 {
        let head_end = loop {
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
            if buffer.len() > 16 << 20 {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        while buffer.len() < head_end + length {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buffer.drain(..head_end + length).skip(head_end).collect();
        let status = if head.starts_with("post /v1/traces ") && head.contains("application/x-protobuf") {
            match ExportTraceServiceRequest::decode(body.as_slice()) {
                Ok(request) => {
                    collected.lock().unwrap().extend(flatten(request));
                    200
                }
                Err(_) => 400,
            }
        } else {
            404
        };
        let reply = format!("HTTP/1.1 {status} X\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n");
        if stream.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

fn text(value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn flatten(request: ExportTraceServiceRequest) -> Vec<Exported> {
    let mut out = Vec::new();
    for resource_spans in request.resource_spans {
        let exporter = resource_spans
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.instance.id")
            .map(|kv| text(&kv.value))
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                out.push(Exported {
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent: hex(&span.parent_span_id),
                    name: span.name,
                    attributes: span.attributes.iter().map(|kv| (kv.key.clone(), text(&kv.value))).collect(),
                    status: span.status.map_or(0, |s| s.code),
                    exporter: exporter.clone(),
                });
            }
        }
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Replicas that export to `receiver`, with a short batch delay so spans arrive soon.
fn traced(config: ReplicaConfig, receiver: &Receiver) -> ReplicaConfig {
    config
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint())
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .env("OTEL_SERVICE_NAME", "wfo-under-test")
}

fn caller_traceparent() -> String {
    format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01")
}

/// Triggers `workflow` on `base` with the caller's `traceparent`; returns the run id.
fn trigger_traced(base: &str, workflow: &str) -> String {
    let (status, body) = http(
        ureq::post(&format!("{base}/api/workflows/{workflow}/trigger"))
            .set("traceparent", &caller_traceparent())
            .set("tracestate", "caller=1")
            .send_json(json!({ "inputData": {} })),
    );
    assert_eq!(status, 202, "{body}");
    body["runId"].as_str().expect("runId").to_owned()
}

/// The parsed `traceparent` a stand-in received: (trace id, parent id).
fn received_traceparent(value: Option<&str>) -> (String, String) {
    let value = value.expect("a traceparent header");
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "00", "{value}");
    (parts[1].to_owned(), parts[2].to_owned())
}

fn three_steps_one_retry(dir: &std::path::Path, service: &FakeServer) -> String {
    format!(
        r#"
[[workflow]]
id = "traced"
[[workflow.step]]
id = "first"
action = "exec"
with = {{ command = ["sh", "-c", "echo one"] }}
[[workflow.step]]
id = "flaky"
action = "exec"
with = {{ command = ["sh", "-c", "if [ -f flaked ]; then echo two; else touch flaked; echo once >&2; exit 1; fi"], cwd = "{dir}" }}
retry = {{ max_attempts = 3, initial_backoff = "100ms", max_backoff = "100ms" }}
[[workflow.step]]
id = "call"
action = "http"
with = {{ method = "POST", url = "{url}", body = {{ run = "${{run.id}}" }} }}
"#,
        dir = dir.display(),
        url = service.url("/hook"),
    )
}

#[test]
fn a_run_with_a_retry_is_one_trace_under_the_callers_span() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start();
    let service = FakeServer::ok();
    let file = workflows_file(dir.path(), &three_steps_one_retry(dir.path(), &service));
    let replica = traced(ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()), &receiver).start("solo");

    let run_id = trigger_traced(&replica.base(), "traced");
    let run = replica.wait_terminal(&run_id, LIMIT);
    assert_eq!(run["status"], "completed", "{run}");

    let spans = receiver.wait_trace(CALLER_TRACE, "the run span and four attempt spans", |spans| {
        spans.iter().any(|s| s.name == "run")
            && spans.iter().any(|s| s.name == "backoff")
            && spans.iter().filter(|s| s.name == "step").count() >= 4
    });
    // Nothing of the run went to another trace.
    let all = receiver.spans();
    let elsewhere: Vec<&Exported> =
        all.iter().filter(|s| s.attr("run_id") == run_id && s.trace_id != CALLER_TRACE).collect();
    assert!(elsewhere.is_empty(), "spans of the run in other traces: {elsewhere:#?}");

    let runs: Vec<&Exported> = spans.iter().filter(|s| s.name == "run").collect();
    assert_eq!(runs.len(), 1, "one run span: {spans:#?}");
    let run_span = runs[0];
    assert_eq!(run_span.parent, CALLER_SPAN, "the run is a child of the caller's span");
    assert_eq!(run_span.attr("run_id"), run_id);
    assert_eq!(run_span.attr("workflow"), "traced");
    assert_eq!(run_span.attr("outcome"), "completed");
    assert_eq!(run_span.attr("replica"), "solo");
    assert_eq!(run_span.exporter, "solo");
    // The caller's span is the trace's root: every other span hangs under the run span.
    let ids: Vec<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    for span in &spans {
        assert!(span.parent == CALLER_SPAN || ids.contains(&span.parent.as_str()), "orphan {span:#?}");
    }

    let attempts: Vec<&Exported> = spans.iter().filter(|s| s.name == "step").collect();
    let mut seen: Vec<(String, String, String)> = attempts
        .iter()
        .map(|s| (s.attr("step").to_owned(), s.attr("attempt").to_owned(), s.attr("outcome").to_owned()))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("call".into(), "1".into(), "completed".into()),
            ("first".into(), "1".into(), "completed".into()),
            ("flaky".into(), "1".into(), "retrying".into()),
            ("flaky".into(), "2".into(), "completed".into()),
        ],
        "{attempts:#?}"
    );
    for attempt in &attempts {
        assert_eq!(attempt.parent, run_span.span_id, "an attempt is a child of the run span: {attempt:#?}");
        assert_eq!(attempt.attr("run_id"), run_id, "{attempt:#?}");
        assert_eq!(attempt.attr("workflow"), "traced", "{attempt:#?}");
        assert_eq!(attempt.attr("replica"), "solo", "{attempt:#?}");
    }
    let failed = attempts.iter().find(|s| s.attr("outcome") == "retrying").unwrap();
    assert_eq!(failed.status, 2, "the failed attempt's error is recorded: {failed:#?}");
    assert!(failed.attr("error.message").contains("once"), "{failed:#?}");

    let backoff = spans.iter().find(|s| s.name == "backoff").unwrap_or_else(|| panic!("a back-off span: {spans:#?}"));
    assert_eq!(backoff.parent, run_span.span_id);
    assert_eq!((backoff.attr("step"), backoff.attr("attempt")), ("flaky", "2"));

    // The http step sent the attempt's span as the parent of what it called.
    let hooks = service.requests();
    assert_eq!(hooks.len(), 1, "{hooks:?}");
    let (trace, parent) = received_traceparent(hooks[0].header("traceparent"));
    assert_eq!(trace, CALLER_TRACE);
    let call = attempts.iter().find(|s| s.attr("step") == "call").unwrap();
    assert_eq!(parent, call.span_id, "the http call's parent is its attempt span");
    assert_eq!(hooks[0].header("tracestate"), Some("caller=1"));

    // The run's history says which trace it is in.
    let history = replica.history(&run_id);
    assert_eq!(history[0]["traceId"], CALLER_TRACE, "{:#}", history[0]);
}

#[test]
fn with_traces_off_the_callers_context_still_reaches_what_steps_call() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let service = FakeServer::ok();
    let file = workflows_file(dir.path(), &three_steps_one_retry(dir.path(), &service));
    // No OTEL_* at all: no exporter.
    let replica = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()).start("plain");

    let run_id = trigger_traced(&replica.base(), "traced");
    let run = replica.wait_terminal(&run_id, LIMIT);
    assert_eq!(run["status"], "completed", "{run}");
    let hooks = service.requests();
    assert_eq!(hooks.len(), 1, "{hooks:?}");
    // Not a participant: the downstream service joins the caller's trace under the caller's span.
    assert_eq!(hooks[0].header("traceparent"), Some(caller_traceparent().as_str()));
    assert_eq!(hooks[0].header("tracestate"), Some("caller=1"));
    assert_eq!(replica.history(&run_id)[0]["traceId"], CALLER_TRACE);

    // A run started without a context has none and sends none.
    let plain = replica.trigger("traced", json!({}));
    assert_eq!(replica.wait_terminal(&plain, LIMIT)["status"], "completed");
    let hooks = service.requests();
    assert_eq!(hooks.len(), 2, "{hooks:?}");
    assert_eq!(hooks[1].header("traceparent"), None);
    assert_eq!(replica.history(&plain)[0]["traceId"], Value::Null);
}

#[test]
fn a_step_finished_by_another_replica_after_a_kill_is_still_a_child_of_its_run() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start();
    let toml = format!(
        r#"
[[workflow]]
id = "slow-middle"
[[workflow.step]]
id = "first"
action = "exec"
with = {{ command = ["sh", "-c", "echo one"] }}
[[workflow.step]]
id = "slow"
action = "exec"
with = {{ command = ["sh", "-c", "echo $PPID >> pids; exec sleep 3"], cwd = "{dir}" }}
[[workflow.step]]
id = "last"
action = "exec"
with = {{ command = ["sh", "-c", "echo three"] }}
"#,
        dir = dir.path().display()
    );
    let file = workflows_file(dir.path(), &toml);
    // A short lease, so that the survivor takes the step over soon.
    let config =
        traced(ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()), &receiver).env("LEASE_TTL", "2s");
    let mut replicas = [config.start("a"), config.start("b")];

    let run_id = trigger_traced(&replicas[0].base(), "slow-middle");
    let pids = dir.path().join("pids");
    let runner: i32 = wait_for(LIMIT, POLL, || std::fs::read_to_string(&pids).ok()?.trim().parse().ok())
        .expect("the slow step started");
    let victim = replicas.iter().position(|r| r.pid() == runner).expect("the slow step runs in one of our replicas");
    replicas[victim].kill9();
    let survivor = &replicas[1 - victim];
    let run = survivor.wait_terminal(&run_id, LIMIT);
    assert_eq!(run["status"], "completed", "{run}");

    let spans = receiver.wait_trace(CALLER_TRACE, "the run span and the survivor's attempts", |spans| {
        spans.iter().any(|s| s.name == "run")
            && spans.iter().any(|s| s.name == "step" && s.attr("step") == "slow" && s.exporter == survivor.name)
            && spans.iter().any(|s| s.name == "step" && s.attr("step") == "last")
    });
    let runs: Vec<&Exported> = spans.iter().filter(|s| s.name == "run").collect();
    assert_eq!(runs.len(), 1, "one run span: {spans:#?}");
    let run_span = runs[0];
    assert_eq!(run_span.parent, CALLER_SPAN);
    assert_eq!(run_span.exporter, survivor.name, "the replica that ended the run exported its span");
    assert_eq!(run_span.attr("outcome"), "completed");
    for attempt in spans.iter().filter(|s| s.name == "step") {
        assert_eq!(attempt.parent, run_span.span_id, "child of the one run span: {attempt:#?}");
        assert_eq!(attempt.attr("run_id"), run_id);
        assert_eq!(attempt.attr("replica"), attempt.exporter, "{attempt:#?}");
    }
    let slow = spans.iter().find(|s| s.name == "step" && s.attr("step") == "slow").unwrap();
    assert_eq!(slow.exporter, survivor.name, "the killed replica's attempt never ended: {spans:#?}");
    assert_eq!(slow.attr("outcome"), "completed");
}

#[test]
fn an_event_xadded_with_a_traceparent_continues_that_trace() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start();
    let toml = r#"
[[workflow]]
id = "on-order"
events = ["order.placed"]
[[workflow.step]]
id = "nap"
action = "sleep"
with = { duration = "300ms" }
[[workflow.step]]
id = "ack"
action = "exec"
with = { command = ["sh", "-c", "printf '%s' \"$TRACEPARENT\""] }
"#;
    let file = workflows_file(dir.path(), toml);
    let replica = traced(ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()), &receiver).start("router");

    let event_trace = "0af7651916cd43dd8448eb211c80319c";
    let event_span = "b7ad6b7169203331";
    let traceparent = format!("00-{event_trace}-{event_span}-01");
    let id =
        redis.cli(&["XADD", "wfo:events", "*", "type", "order.placed", "payload", "{}", "traceparent", &traceparent]);
    assert!(id.trim().contains('-'), "XADD answered {id:?}");

    let spans = receiver.wait_trace(event_trace, "the event's run", |spans| {
        spans.iter().any(|s| s.name == "run")
            && spans.iter().any(|s| s.name == "sleep")
            && spans.iter().filter(|s| s.name == "step").count() >= 2
    });
    let run_span = spans.iter().find(|s| s.name == "run").unwrap();
    assert_eq!(run_span.parent, event_span, "the run is a child of the publisher's span");
    assert_eq!(run_span.attr("workflow"), "on-order");
    let attempt = spans.iter().find(|s| s.name == "step" && s.attr("step") == "ack").unwrap();
    assert_eq!(attempt.parent, run_span.span_id);
    let nap = spans.iter().find(|s| s.name == "step" && s.attr("step") == "nap").unwrap();
    assert_eq!(nap.attr("outcome"), "sleeping");
    // The parked time is a span of its own.
    let slept = spans.iter().find(|s| s.name == "sleep").unwrap_or_else(|| panic!("a sleep span: {spans:#?}"));
    assert_eq!(slept.parent, run_span.span_id);
    assert_eq!((slept.attr("step"), slept.attr("outcome")), ("nap", "slept"));

    // `exec` had the attempt's span as TRACEPARENT.
    let run_id = run_span.attr("run_id").to_owned();
    let run = replica.wait_terminal(&run_id, LIMIT);
    assert_eq!(run["status"], "completed", "{run}");
    let history = replica.history(&run_id);
    let output = history
        .iter()
        .find(|t| t["type"] == "step_completed" && t["step"] == "ack")
        .map(|t| t["output"]["stdout"].clone());
    assert_eq!(output, Some(json!(format!("00-{event_trace}-{}-01", attempt.span_id))), "{history:#?}");
}
