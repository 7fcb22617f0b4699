//! Replay on the command line, end to end: a run whose step fails and is retried per its policy
//! until the run fails, then a rerun of it from its second step. `workflow-orchestrator replay`
//! (our binary, run as an operator would, against the service's Redis) prints the whole story and
//! exits 0; `--json` says the fold is consistent. Corrupting a log entry, live or compacted, or
//! the stored state makes it exit non-zero and say what is wrong where. The other operator
//! commands (`runs`, `trigger`, `publish`) work against the same Redis.

use crate::util::{CommandOutput, RedisServer, Replica, ReplicaConfig, wait_for, workflows_file};
use serde_json::{Value, json};
use std::time::Duration;

/// `{dir}` is the test's temporary directory, where `flaky` looks for the file `ready`.
const WORKFLOWS: &str = r#"
[[workflow]]
id = "story"
[[workflow.step]]
id = "fetch"
action = "exec"
with = { command = ["sh", "-c", "printf 'fetched-%s' \"$WFO_RUN_ID\""] }
[[workflow.step]]
id = "flaky"
action = "exec"
with = { command = ["sh", "-c", "if [ -f ready ]; then printf 'flaky-ok'; else echo \"flaky-not-ready-attempt-$WFO_ATTEMPT\" >&2; exit 7; fi"], cwd = "{dir}" }
retry = { max_attempts = 3, initial_backoff = "50ms", max_backoff = "100ms", jitter = 0.0 }
[[workflow.step]]
id = "publish"
action = "noop"

# Fails once, then waits an hour for its retry: its log stays a live stream.
[[workflow]]
id = "parked"
[[workflow.step]]
id = "stuck"
action = "exec"
with = { command = ["sh", "-c", "echo parked-failure >&2; exit 5"] }
retry = { max_attempts = 2, initial_backoff = "1h", max_backoff = "1h", jitter = 0.0 }

[[workflow]]
id = "hello"
events = ["hello.said"]
[[workflow.step]]
id = "greet"
action = "noop"
"#;

struct Service {
    replica: Replica,
    config: ReplicaConfig,
    redis: RedisServer,
    dir: tempfile::TempDir,
}

impl Service {
    fn start() -> Service {
        let redis = RedisServer::start();
        let dir = tempfile::tempdir().expect("tempdir");
        let file = workflows_file(dir.path(), &WORKFLOWS.replace("{dir}", &dir.path().display().to_string()));
        let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path());
        let replica = config.start("teller");
        Service { replica, config, redis, dir }
    }

    /// Our binary as an operator runs it, against this service's Redis.
    fn cli(&self, args: &[&str]) -> CommandOutput {
        let output = self.config.command(args);
        eprintln!(
            "$ workflow-orchestrator {}\n-> exit {:?}\n{}{}",
            args.join(" "),
            output.code,
            output.stdout,
            output.stderr
        );
        output
    }

    fn wait_terminal(&self, run_id: &str) -> Value {
        self.replica.wait_terminal(run_id, Duration::from_secs(60))
    }

    fn wait_status(&self, run_id: &str, status: &str) {
        let reached = wait_for(Duration::from_secs(60), Duration::from_millis(50), || {
            (self.replica.run(run_id)["status"] == status).then_some(())
        });
        assert!(reached.is_some(), "run {run_id} is not {status} within 60 s: {}", self.replica.run(run_id));
    }
}

/// The key of a run's `kind` (`runlog`, `run`) in Redis, with the default prefix.
fn key(kind: &str, run_id: &str) -> String {
    let shard = run_id.rsplit_once("-s").expect("a run id ends in -s<shard>").1;
    format!("wfo:{{{shard}}}:{kind}:{run_id}")
}

/// The rows of a replay table: `[seq, time, transition, step, attempt, replica, rest...]`.
fn table_rows(stdout: &str) -> Vec<(Vec<String>, String)> {
    stdout
        .lines()
        .filter(|line| line.split_whitespace().next().is_some_and(|first| first.parse::<u64>().is_ok()))
        .map(|line| (line.split_whitespace().map(str::to_owned).collect(), line.to_owned()))
        .collect()
}

/// Checks that the table has one row per transition of the API's history, with the same seq,
/// time, transition, step, attempt and replica.
fn assert_rows_match_history(stdout: &str, history: &[Value]) {
    let rows = table_rows(stdout);
    assert_eq!(rows.len(), history.len(), "one row per transition:\n{stdout}");
    for ((columns, line), transition) in rows.iter().zip(history) {
        let text = |value: &Value| match value {
            Value::Null => "-".to_owned(),
            Value::Number(n) if n.as_u64() == Some(0) => "-".to_owned(),
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let expected = [
            transition["seq"].to_string(),
            text(&transition["at"]),
            text(&transition["type"]),
            text(&transition["step"]),
            text(&transition["attempt"]),
            text(&transition["replica"]),
        ];
        assert_eq!(&columns[..6], &expected, "row `{line}` against {transition}");
    }
}

fn kinds(history: &[Value]) -> Vec<String> {
    history.iter().map(|t| t["type"].as_str().unwrap_or("?").to_owned()).collect()
}

/// Runs the story: the original run fails after three attempts of `flaky`; then `ready` is
/// created and the run is rerun from `flaky`, and completes. Returns (original, rerun).
fn tell_the_story(service: &Service) -> (String, String) {
    let original = service.replica.trigger("story", json!({ "order": 17 }));
    let run = service.wait_terminal(&original);
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["steps"][1]["attempts"], 3, "retried per its policy: {run}");
    std::fs::write(service.dir.path().join("ready"), b"").unwrap();
    let (status, body) = service.replica.post(&format!("/api/runs/{original}/rerun"), &json!({ "fromStep": "flaky" }));
    assert_eq!(status, 202, "{body}");
    let rerun = body["runId"].as_str().expect("runId").to_owned();
    let run = service.wait_terminal(&rerun);
    assert_eq!(run["status"], "completed", "{run}");
    (original, rerun)
}

#[test]
fn replay_prints_the_whole_story_of_a_retried_failed_run_and_of_its_rerun_and_exits_0() {
    let service = Service::start();
    let (original, rerun) = tell_the_story(&service);

    // The original: created, fetched, three failed attempts with their errors, failed.
    let history = service.replica.history(&original);
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
            "timer_fired",
            "step_started",
            "step_failed",
            "run_failed"
        ],
        "{history:#?}"
    );
    let replay = service.cli(&["replay", &original]);
    assert_eq!(replay.code, Some(0), "{}{}", replay.stdout, replay.stderr);
    let out = &replay.stdout;
    assert!(out.starts_with(&format!("run {original}  workflow story  definition ")), "{out}");
    assert_rows_match_history(out, &history);
    let rows = table_rows(out);
    assert!(rows[0].1.contains("trigger api"), "{}", rows[0].1);
    assert!(rows[2].0.get(6).is_some_and(|took| took.ends_with("ms")), "a step's duration: {}", rows[2].1);
    let failures: Vec<&String> = rows.iter().filter(|(c, _)| c[2] == "step_failed").map(|(_, line)| line).collect();
    assert_eq!(failures.len(), 3);
    for (index, line) in failures.iter().enumerate() {
        let attempt = index + 1;
        assert!(line.contains(&format!("flaky-not-ready-attempt-{attempt}")), "attempt {attempt}'s error: {line}");
        assert!(line.contains("exited with status 7"), "{line}");
        assert_eq!(line.contains("(retry at "), attempt < 3, "only attempts 1 and 2 are retried: {line}");
    }
    let failed = &rows.last().unwrap().1;
    assert!(failed.contains("run_failed") && failed.contains("flaky-not-ready-attempt-3"), "{failed}");
    assert!(out.contains("replayed state: failed (seq 12)"), "{out}");
    assert!(out.contains("stored state:   failed (seq 12): consistent"), "{out}");

    // The rerun: records where it came from, reuses `fetch`, runs `flaky` and `publish`.
    let rerun_history = service.replica.history(&rerun);
    assert_eq!(
        kinds(&rerun_history),
        [
            "run_created",
            "step_reused",
            "step_started",
            "step_completed",
            "step_started",
            "step_completed",
            "run_completed"
        ],
        "{rerun_history:#?}"
    );
    let replay = service.cli(&["replay", &rerun]);
    assert_eq!(replay.code, Some(0), "{}{}", replay.stdout, replay.stderr);
    let out = &replay.stdout;
    assert_rows_match_history(out, &rerun_history);
    let rows = table_rows(out);
    assert!(rows[0].1.contains(&format!("rerun of {original} from step 1")), "{}", rows[0].1);
    assert!(rows[1].1.contains("output reused") && rows[1].0[3] == "fetch", "{}", rows[1].1);
    assert_eq!(rows[2].0[3], "flaky");
    assert!(out.contains("replayed state: completed (seq 7)"), "{out}");
    assert!(out.contains(": consistent"), "{out}");

    // --json: what the API's history says, and consistent.
    for (run_id, history, status) in [(&original, &history, "failed"), (&rerun, &rerun_history, "completed")] {
        let replay = service.cli(&["replay", run_id, "--json"]);
        assert_eq!(replay.code, Some(0), "{}{}", replay.stdout, replay.stderr);
        let report: Value = serde_json::from_str(&replay.stdout).expect("--json prints JSON");
        assert_eq!(report["runId"], run_id.as_str());
        assert_eq!(report["workflowId"], "story");
        assert_eq!(report["status"], status);
        assert_eq!(report["consistent"], true, "{report}");
        assert_eq!(report["seq"], history.len());
        assert_eq!(report["stored"], json!({ "status": status, "seq": history.len() }));
        assert_eq!(report["transitions"], Value::Array(history.clone()), "the same transitions as the API");
    }
    // The JSON of the original carries the errors and the rerun's the reused output.
    let report: Value = serde_json::from_str(&service.cli(&["replay", &rerun, "--json"]).stdout).unwrap();
    assert_eq!(report["transitions"][1]["output"]["stdout"], format!("fetched-{original}"), "{report}");

    // --at <seq>: the run right after that entry, as the API's step-through shows it.
    for at in 1..rerun_history.len() {
        let replay = service.cli(&["replay", &rerun, "--json", "--at", &at.to_string()]);
        assert_eq!(replay.code, Some(0), "{}{}", replay.stdout, replay.stderr);
        let state: Value = serde_json::from_str(&replay.stdout).expect("--json prints JSON");
        let (status, served) = service.replica.get(&format!("/api/runs/{rerun}/state?at={at}"));
        assert_eq!(status, 200, "{served}");
        assert_eq!(state, served, "replay --at {at}");
        assert_eq!(state["at"], at);
    }
    let past = service.cli(&["replay", &rerun, "--at", &(rerun_history.len() + 1).to_string()]);
    assert_ne!(past.code, Some(0), "an --at past the log's end is refused");
    assert!(past.stderr.contains("--at must be a seq"), "{}", past.stderr);
    let _ = &service.redis;
}

#[test]
fn replay_exits_non_zero_naming_an_undecodable_or_impossible_log_entry() {
    let service = Service::start();

    // Two live runs, parked in `retrying` for an hour: their logs are lists, record `seq` at
    // index `seq - 1`.
    let garbled = service.replica.trigger("parked", json!({}));
    let impossible = service.replica.trigger("parked", json!({}));
    for run in [&garbled, &impossible] {
        service.wait_status(run, "retrying");
        let log = key("runlog", run);
        assert_eq!(service.redis.cli(&["LLEN", &log]).trim(), "3", "{log}");
        assert_eq!(service.cli(&["replay", run]).code, Some(0), "intact, the log replays");
    }

    // (a) Record 2 replaced by bytes that are no MessagePack transition.
    let log = key("runlog", &garbled);
    let replaced = service.redis.cli(&["LSET", &log, "1", "\u{1}garbage, not a transition"]);
    assert_eq!(replaced.trim(), "OK", "{replaced}");
    let replay = service.cli(&["replay", &garbled]);
    assert_ne!(replay.code, Some(0), "a corrupt log fails the replay: {}", replay.stdout);
    assert!(replay.stderr.contains("FAILED"), "{}", replay.stderr);
    assert!(replay.stderr.contains(&log), "names the log: {}", replay.stderr);
    assert!(replay.stderr.contains("record 2"), "names the entry: {}", replay.stderr);
    let json = service.cli(&["replay", &garbled, "--json"]);
    assert_ne!(json.code, Some(0), "--json fails too");
    // The API reports it as a server-side problem, in JSON, and keeps serving.
    let (status, body) = service.replica.get(&format!("/api/runs/{garbled}"));
    assert_eq!(status, 500, "{body}");
    assert!(body["error"]["code"].is_string() && body["error"]["message"].is_string(), "{body}");
    assert_eq!(service.replica.get("/health").0, 200);

    // (b) Record 3 (step_failed) replaced by a copy of record 1 (run_created): every record
    // decodes, but the log cannot be folded.
    let log = key("runlog", &impossible);
    let copied = service.redis.cli(&[
        "EVAL",
        "return redis.call('LSET', KEYS[1], 2, redis.call('LINDEX', KEYS[1], 0))",
        "1",
        &log,
    ]);
    assert_eq!(copied.trim(), "OK", "{copied}");
    let replay = service.cli(&["replay", &impossible]);
    assert_ne!(replay.code, Some(0), "an impossible log fails the replay: {}", replay.stdout);
    assert!(replay.stderr.contains("FAILED at log entry 3 (run_created)"), "names the entry: {}", replay.stderr);

    // (c) A finished run's log keeps its list; its last record cut short by 5 bytes.
    let (original, rerun) = tell_the_story(&service);
    let log = key("runlog", &rerun);
    assert_eq!(service.redis.cli(&["LLEN", &log]).trim(), "7", "a finished run keeps its whole log in {log}");
    assert_eq!(service.cli(&["replay", &rerun]).code, Some(0), "intact, the finished log replays");
    let cut = service.redis.cli(&[
        "EVAL",
        "local v = redis.call('LINDEX', KEYS[1], -1); redis.call('LSET', KEYS[1], -1, string.sub(v, 1, #v - 5)); return #v",
        "1",
        &log,
    ]);
    assert!(cut.trim().parse::<u64>().is_ok_and(|n| n > 5), "{cut}");
    let replay = service.cli(&["replay", &rerun]);
    assert_ne!(replay.code, Some(0), "a truncated record fails the replay: {}", replay.stdout);
    assert!(replay.stderr.contains(&log), "names the key: {}", replay.stderr);
    assert!(replay.stderr.contains("record 7"), "names the record: {}", replay.stderr);

    // Bytes overwritten in the middle of another finished run's record (0xc1 is never valid
    // MessagePack): its first, run_created, is the longest.
    let log = key("runlog", &original);
    let overwritten = service.redis.cli(&[
        "EVAL",
        "local v = redis.call('LINDEX', KEYS[1], 0); local m = math.floor(#v / 2); redis.call('LSET', KEYS[1], 0, string.sub(v, 1, m) .. string.rep('\\193', 16) .. string.sub(v, m + 17)); return #v",
        "1",
        &log,
    ]);
    assert!(overwritten.trim().parse::<u64>().is_ok_and(|n| n > 32), "{overwritten}");
    let replay = service.cli(&["replay", &original]);
    assert_ne!(replay.code, Some(0), "garbage in a record fails the replay: {}", replay.stdout);
    assert!(replay.stderr.contains(&log), "names the key: {}", replay.stderr);
}

#[test]
fn replay_exits_non_zero_when_the_stored_state_is_not_the_fold_of_the_log() {
    let service = Service::start();
    let finished = service.replica.trigger("hello", json!({}));
    assert_eq!(service.wait_terminal(&finished)["status"], "completed");
    let live = service.replica.trigger("parked", json!({}));
    service.wait_status(&live, "retrying");
    for run in [&finished, &live] {
        assert_eq!(service.cli(&["replay", run]).code, Some(0));
    }

    // The finished run's stored seq, tampered with.
    let hash = key("run", &finished);
    assert_eq!(service.redis.cli(&["HGET", &hash, "seq"]).trim(), "4");
    service.redis.cli(&["HSET", &hash, "seq", "99"]);
    let replay = service.cli(&["replay", &finished]);
    assert_ne!(replay.code, Some(0), "{}", replay.stdout);
    assert!(replay.stderr.contains("the fold of the log does not equal the stored state"), "{}", replay.stderr);
    assert!(replay.stdout.contains("replayed state: completed (seq 4)"), "{}", replay.stdout);
    assert!(replay.stdout.contains("stored state:   completed (seq 99): DIFFERS from the replay"), "{}", replay.stdout);
    let json = service.cli(&["replay", &finished, "--json"]);
    assert_ne!(json.code, Some(0));
    let report: Value = serde_json::from_str(&json.stdout).expect("--json prints JSON even when inconsistent");
    assert_eq!(report["consistent"], false, "{report}");
    assert_eq!(report["seq"], 4, "{report}");
    assert_eq!(report["stored"], json!({ "status": "completed", "seq": 99 }), "{report}");

    // The live run's stored status, tampered with.
    let hash = key("run", &live);
    assert_eq!(service.redis.cli(&["HGET", &hash, "status"]).trim(), "retrying");
    service.redis.cli(&["HSET", &hash, "status", "completed"]);
    let replay = service.cli(&["replay", &live]);
    assert_ne!(replay.code, Some(0), "{}", replay.stdout);
    assert!(replay.stderr.contains("the fold of the log does not equal the stored state"), "{}", replay.stderr);
    assert!(replay.stdout.contains("replayed state: retrying (seq 3)"), "{}", replay.stdout);
    assert!(replay.stdout.contains("DIFFERS"), "{}", replay.stdout);
}

#[test]
fn replay_refuses_unknown_and_malformed_run_ids_and_needs_redis_url() {
    let service = Service::start();
    let unknown = service.cli(&["replay", "0193e4a17b2c7d3e8f001a2b3c4d5e6f-s1"]);
    assert_ne!(unknown.code, Some(0));
    assert!(unknown.stderr.contains("no run"), "{}", unknown.stderr);
    let malformed = service.cli(&["replay", "not-a-run"]);
    assert_ne!(malformed.code, Some(0));
    assert!(malformed.stderr.contains("not a run id"), "{}", malformed.stderr);

    let no_redis = ReplicaConfig::new(None, None, service.dir.path());
    for args in [&["replay", "0193e4a17b2c7d3e8f001a2b3c4d5e6f-s1"][..], &["runs"], &["trigger", "hello"]] {
        let output = no_redis.command(args);
        assert_ne!(output.code, Some(0), "{args:?}");
        assert!(output.stderr.contains("REDIS_URL is not set"), "{args:?}: {}", output.stderr);
    }
}

#[test]
fn the_runs_trigger_and_publish_commands_work_against_the_service_redis() {
    let service = Service::start();

    // trigger: prints the new run's id; the service runs it.
    let triggered = service.cli(&["trigger", "hello", "--input", r#"{"from":"cli"}"#]);
    assert_eq!(triggered.code, Some(0), "{}", triggered.stderr);
    let run_id = triggered.stdout.trim().to_owned();
    assert!(
        run_id.split_once("-s").is_some_and(|(hex, shard)| hex.len() == 32 && shard.parse::<u16>().is_ok()),
        "a run id: {run_id}"
    );
    let run = service.wait_terminal(&run_id);
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["input"], json!({ "from": "cli" }));
    assert_eq!(run["trigger"]["kind"], "api");

    // An idempotency key: the same run from the command line and from the API.
    let keyed = service.cli(&["trigger", "hello", "--idempotency-key", "cli-key-1"]);
    assert_eq!(keyed.code, Some(0), "{}", keyed.stderr);
    let again = service.cli(&["trigger", "hello", "--idempotency-key", "cli-key-1"]);
    assert_eq!(again.stdout.trim(), keyed.stdout.trim(), "the same key, the same run");
    let response = ureq::post(&format!("{}/api/workflows/hello/trigger", service.replica.base()))
        .set("Idempotency-Key", "cli-key-1")
        .send_json(json!({}));
    let (status, body) = crate::util::http(response);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["runId"], keyed.stdout.trim(), "{body}");
    assert_eq!(body["duplicate"], true);

    for (args, message) in [
        (&["trigger", "nope"][..], "no workflow `nope`"),
        (&["trigger", "hello", "--input", "[1]"], "must be a JSON object"),
        (&["trigger", "hello", "--input", "{"], "not valid JSON"),
        (&["runs", "--status", "nope"], "--status must be one of"),
        (&["publish", "Not A Type"], ""),
        (&["publish", "a.b", "--payload", "7"], "must be a JSON object"),
    ] {
        let output = service.cli(args);
        assert_ne!(output.code, Some(0), "{args:?} fails");
        assert!(output.stderr.contains(message), "{args:?}: {}", output.stderr);
    }

    // publish: prints the event id; the event is on the bus, from the cli, and starts the
    // workflow that subscribes to it.
    let published = service.cli(&["publish", "hello.said", "--payload", r#"{"who":"cli"}"#, "--key", "k-1"]);
    assert_eq!(published.code, Some(0), "{}", published.stderr);
    let event_id = published.stdout.trim().to_owned();
    assert!(event_id.split_once('-').is_some_and(|(a, b)| a.parse::<u64>().is_ok() && b.parse::<u64>().is_ok()));
    let event = wait_for(Duration::from_secs(60), Duration::from_millis(50), || {
        let (_, events) = service.replica.get("/api/events?type=hello.said");
        let event = events["events"].as_array()?.iter().find(|e| e["eventId"] == event_id.as_str())?.clone();
        (event["handled"] == true).then_some(event)
    })
    .expect("the published event is listed and handled");
    assert_eq!(event["source"], "cli");
    assert_eq!(event["key"], "k-1");
    assert_eq!(event["payload"], json!({ "who": "cli" }));
    let started = event["runs"][0]["runId"].as_str().expect("the event started a run").to_owned();
    let run = service.wait_terminal(&started);
    assert_eq!(run["trigger"]["kind"], "event", "{run}");
    assert_eq!(run["input"], json!({ "who": "cli" }));

    // runs: the three runs of `hello`, newest first, as JSON and as a table.
    let listed = service.cli(&["runs", "--workflow", "hello", "--json"]);
    assert_eq!(listed.code, Some(0), "{}", listed.stderr);
    let listed: Value = serde_json::from_str(&listed.stdout).expect("runs --json prints JSON");
    let ids: Vec<&str> = listed.as_array().unwrap().iter().map(|r| r["runId"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 3, "{listed}");
    for id in [run_id.as_str(), keyed.stdout.trim(), started.as_str()] {
        assert!(ids.contains(&id), "{id} in {listed}");
    }
    assert_eq!(ids[0], started, "newest first: {listed}");
    assert!(listed.as_array().unwrap().iter().all(|r| r["workflowId"] == "hello" && r["status"] == "completed"));
    let table = service.cli(&["runs", "--limit", "2"]);
    assert_eq!(table.code, Some(0), "{}", table.stderr);
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "a header and two runs: {}", table.stdout);
    assert!(lines[0].starts_with("run ") && lines[0].contains("status"), "{}", lines[0]);
    assert!(lines[1].starts_with(&started) && lines[1].contains("completed"), "{}", lines[1]);
    let completed = service.cli(&["runs", "--status", "completed", "--json"]);
    assert_eq!(serde_json::from_str::<Value>(&completed.stdout).unwrap().as_array().unwrap().len(), 3);
}
