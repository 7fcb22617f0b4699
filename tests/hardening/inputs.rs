//! What a run's input can make an action do (issue 8): each class against a served binary on a
//! private redis-server, with [`FakeServer`] stand-ins recording where `http` steps really went.
//!
//! - A definition whose URL lets input, steps or run values choose the scheme, host or port is
//!   refused at load (unless it says `allow_dynamic_host = true`).
//! - Values substituted after the origin are percent-encoded for the part they land in: hostile
//!   inputs reach the intended host and path, and a value making a `.`/`..` segment fails the
//!   step for good. A header value with CR/LF fails the step for good.
//! - `${input.missing}` fails the step naming the template; `${input.missing:-d}` renders `d`; in
//!   `when` a missing field is falsy.
//! - `exec` gets inputs too large for the environment from `WFO_INPUT_FILE` (never on stdin), and a
//!   template in its command is refused at load.
//! - Query-string secrets of configured URLs are masked in outputs, histories and notifications.

use crate::util::{FakeServer, RedisServer, Replica, ReplicaConfig, wait_for, workflows_file};
use serde_json::{Value, json};
use std::time::Duration;

const RUN_LIMIT: Duration = Duration::from_secs(30);

fn step<'a>(run: &'a Value, id: &str) -> &'a Value {
    run["steps"].as_array().and_then(|steps| steps.iter().find(|s| s["id"] == id)).unwrap_or(&Value::Null)
}

/// Runs the binary's `serve` on a definitions file that must be refused: it exits at once
/// (code 2), and its message names the workflow, the field and what to do. Returns the message.
fn refused_at_load(dir: &std::path::Path, toml: &str) -> String {
    let file = workflows_file(dir, toml);
    let output = ReplicaConfig::new(None, Some(&file), dir).env("PORT", "0").command(&["serve"]);
    assert_eq!(output.code, Some(2), "expected a definition error: {output:?}");
    assert!(output.stderr.contains("definition error"), "{output:?}");
    output.stderr
}

#[test]
fn issue8_a_url_whose_host_a_run_could_choose_is_refused_at_load_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let redirectable = |extra: &str| {
        format!(
            r#"
[[workflow]]
id = "redirectable"
[[workflow.step]]
id = "call"
action = "http"
with = {{ url = "http://127.0.0.1:1${{input.path}}"{extra} }}
"#
        )
    };
    let message = refused_at_load(dir.path(), &redirectable(""));
    for needle in ["workflow `redirectable`", "step[0].with.url", "${input.path}", "allow_dynamic_host"] {
        assert!(message.contains(needle), "`{needle}` missing from: {message}");
    }
    // The same for each way of reaching the origin: host, port, userinfo, scheme, steps, run.
    for url in [
        "http://${input.host}/x",
        "http://127.0.0.1:${input.port}/x",
        "http://${input.user}@127.0.0.1/x",
        "${input.scheme}://127.0.0.1/x",
        "${steps.find.url}/x",
        "http://${run.trigger.host}/x",
    ] {
        let toml = redirectable("").replace("http://127.0.0.1:1${input.path}", url);
        let message = refused_at_load(dir.path(), &toml);
        assert!(message.contains("step[0].with.url"), "{url}: {message}");
    }

    // Said explicitly, it is accepted, and the run goes where its input says.
    let target = FakeServer::ok();
    let redis = RedisServer::start();
    let toml = redirectable(", allow_dynamic_host = true")
        .replace("http://127.0.0.1:1${input.path}", "http://127.0.0.1:${input.port}/dynamic/${input.id}");
    let file = workflows_file(dir.path(), &toml);
    let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path());
    let listed = config.command(&["workflows"]);
    assert_eq!(listed.code, Some(0), "{listed:?}");
    let replica = config.start("dynamic");
    let run_id = replica.trigger("redirectable", json!({ "port": target.port, "id": "a/b" }));
    let run = replica.wait_terminal(&run_id, RUN_LIMIT);
    assert_eq!(run["status"], "completed", "{run}");
    let targets: Vec<String> = target.requests().into_iter().map(|r| r.target).collect();
    // Even with a dynamic host, values after the origin are encoded.
    assert_eq!(targets, ["/dynamic/a%2Fb"], "{run}");
}

#[test]
fn issue8_hostile_inputs_reach_the_intended_host_and_path_encoded() {
    let intended = FakeServer::ok();
    let other = FakeServer::ok();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"
[[workflow]]
id = "fetch-item"
[[workflow.step]]
id = "get"
action = "http"
with = {{ url = "http://127.0.0.1:{port}/items/${{input.id}}?q=${{input.q}}" }}
retry = {{ max_attempts = 3, initial_backoff = "100ms" }}

[[workflow]]
id = "tagged"
[[workflow.step]]
id = "get"
action = "http"
with = {{ url = "http://127.0.0.1:{port}/tagged", headers = {{ X-Tag = "${{input.tag}}" }} }}
retry = {{ max_attempts = 3, initial_backoff = "100ms" }}
"#,
        port = intended.port
    );
    let file = workflows_file(dir.path(), &toml);
    let replica = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()).start("hostile");

    let other_authority = format!("@127.0.0.1:{}/x", other.port);
    let cases = [
        (other_authority.as_str(), "a", format!("/items/%40127.0.0.1%3A{}%2Fx?q=a", other.port)),
        ("ok", "a&admin=1#frag", "/items/ok?q=a%26admin%3D1%23frag".to_owned()),
        ("%2e%2ex", "%2E", "/items/%252e%252ex?q=%252E".to_owned()),
        ("a/b?c#d", "/?&=", "/items/a%2Fb%3Fc%23d?q=%2F%3F%26%3D".to_owned()),
        ("x\\y z", "ü", "/items/x%5Cy%20z?q=%C3%BC".to_owned()),
    ];
    for (id, q, expected) in &cases {
        let run_id = replica.trigger("fetch-item", json!({ "id": id, "q": q }));
        let run = replica.wait_terminal(&run_id, RUN_LIMIT);
        assert_eq!(run["status"], "completed", "{id}: {run}");
        let last = intended.requests().last().cloned().expect("a request at the intended host");
        assert_eq!(&last.target, expected, "{id} / {q}");
        assert_eq!(last.header("host"), Some(format!("127.0.0.1:{}", intended.port).as_str()));
    }

    // A value holding a `.` or `..` path piece would walk the path (`%2e` is a dot to the URL
    // parser, and a server may decode `%2F` before resolving dots, so encoding cannot help): the
    // step fails for good, nothing is sent.
    let before = intended.requests().len();
    for dots in ["..", ".", "../../admin", "a/../..", "%2e%2e", "x\\..\\y"] {
        let run_id = replica.trigger("fetch-item", json!({ "id": dots, "q": "x" }));
        let run = replica.wait_terminal(&run_id, RUN_LIMIT);
        assert_eq!(run["status"], "failed", "{dots}: {run}");
        let error = run["error"].as_str().unwrap_or_default();
        assert!(error.contains("walk"), "{dots}: {error}");
        assert_eq!(step(&run, "get")["attempts"], 1, "a fatal error is not retried: {run}");
    }

    // A header value cannot add headers: CR/LF fails the step for good, naming the header.
    let run_id = replica.trigger("tagged", json!({ "tag": "a\r\nX-Evil: 1" }));
    let run = replica.wait_terminal(&run_id, RUN_LIMIT);
    assert_eq!(run["status"], "failed", "{run}");
    let error = run["error"].as_str().unwrap_or_default();
    assert!(error.contains("x-tag") || error.contains("X-Tag"), "{error}");
    assert_eq!(step(&run, "get")["attempts"], 1, "{run}");

    assert_eq!(intended.requests().len(), before, "nothing was sent for the refused values");
    assert!(other.requests().is_empty(), "the other stand-in got {:?}", other.requests());
}

#[test]
fn issue8_a_missing_input_fails_the_step_naming_it_and_defaults_fill_in() {
    let target = FakeServer::ok();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"
[[workflow]]
id = "strict"
[[workflow.step]]
id = "post"
action = "http"
with = {{ method = "POST", url = "http://127.0.0.1:{port}/strict", body = {{ reason = "${{input.missing}}" }} }}

[[workflow]]
id = "defaults"
[[workflow.step]]
id = "optional"
action = "http"
when = "${{input.flag}}"
with = {{ url = "http://127.0.0.1:{port}/flagged" }}
[[workflow.step]]
id = "post"
action = "http"
with = {{ method = "POST", url = "http://127.0.0.1:{port}/defaults?r=${{input.missing:-d}}", body = {{ reason = "${{input.missing:-d}}", note = "${{input.note:-}}", from = "${{steps.optional.status:-skipped}}" }} }}
"#,
        port = target.port
    );
    let file = workflows_file(dir.path(), &toml);
    let replica = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()).start("missing");

    let run_id = replica.trigger("strict", json!({ "other": 1 }));
    let run = replica.wait_terminal(&run_id, RUN_LIMIT);
    assert_eq!(run["status"], "failed", "{run}");
    let error = run["error"].as_str().unwrap_or_default();
    assert!(error.contains("${input.missing}") && error.contains("names nothing"), "{error}");
    assert_eq!(step(&run, "post")["attempts"], 1, "a template error is not retried: {run}");
    assert!(target.requests().is_empty(), "{:?}", target.requests());

    let run_id = replica.trigger("defaults", json!({}));
    let run = replica.wait_terminal(&run_id, RUN_LIMIT);
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(step(&run, "optional")["output"], json!({ "skipped": true }), "a missing flag is falsy: {run}");
    let requests = target.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].target, "/defaults?r=d");
    assert_eq!(requests[0].json(), json!({ "reason": "d", "note": "", "from": "skipped" }));

    // The flag present: the optional step runs.
    let run_id = replica.trigger("defaults", json!({ "flag": true, "missing": "given" }));
    let run = replica.wait_terminal(&run_id, RUN_LIMIT);
    assert_eq!(run["status"], "completed", "{run}");
    let requests = target.requests();
    assert_eq!(requests.iter().map(|r| r.target.as_str()).collect::<Vec<_>>()[1..], ["/flagged", "/defaults?r=given"]);
    assert_eq!(requests[2].json()["from"], 200);
}

#[test]
fn issue8_exec_reads_an_input_too_large_for_the_environment_from_its_file() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let toml = r#"
[[workflow]]
id = "big-input"
[[workflow.step]]
id = "read"
action = "exec"
with = { command = ["sh", "-c", "test -z \"$WFO_INPUT\" || exit 7; printf '%s %s %s' $(wc -c < \"$WFO_INPUT_FILE\") $(wc -c) $(head -c 9 \"$WFO_INPUT_FILE\")"] }
retry = { max_attempts = 1 }
"#;
    let file = workflows_file(dir.path(), toml);
    let replica = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()).start("big");
    let blob = "x".repeat(300 * 1024);
    let run_id = replica.trigger("big-input", json!({ "blob": blob }));
    let run = replica.wait_terminal(&run_id, RUN_LIMIT);
    assert_eq!(run["status"], "completed", "{}", run["error"]);
    let stdout = step(&run, "read")["output"]["stdout"].as_str().unwrap_or_default().to_owned();
    let fields: Vec<&str> = stdout.split(' ').collect();
    let expected = json!({ "blob": blob }).to_string().len().to_string();
    // The whole input in the file, none on stdin nor in the environment.
    assert_eq!(fields, [expected.as_str(), "0", "{\"blob\":\""], "{stdout}");
}

#[test]
fn issue8_a_template_in_an_exec_command_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    for (with, field) in [
        (r#"{ command = ["sh", "-c", "echo ${input.name}"] }"#, "step[0].with.command"),
        (r#"{ command = ["true"], env = { NAME = "${input.name}" } }"#, "step[0].with.env"),
        (r#"{ command = ["true"], cwd = "/tmp/${input.dir}" }"#, "step[0].with.cwd"),
    ] {
        let toml = format!(
            "[[workflow]]\nid = \"shell-out\"\n[[workflow.step]]\nid = \"run\"\naction = \"exec\"\nwith = {with}\n"
        );
        let message = refused_at_load(dir.path(), &toml);
        for needle in ["workflow `shell-out`", field, "WFO_INPUT_FILE"] {
            assert!(message.contains(needle), "`{needle}` missing from: {message}");
        }
    }
}

#[test]
fn issue8_built_in_parameters_that_choose_hosts_programs_or_directories_take_no_run_values() {
    let dir = tempfile::tempdir().unwrap();
    for (with, parameter) in [
        (r#"{ name = "log_rotation", dir = "/var/log/${input.app}" }"#, "dir"),
        (
            r#"{ name = "pg_backup", database_url = "${env.DATABASE_URL:-}", dir = "/b", pg_dump = "${input.tool}" }"#,
            "pg_dump",
        ),
        (r#"{ name = "health_probe", urls = ["http://127.0.0.1:1/", "${steps.find.url}"] }"#, "urls"),
        (r#"{ name = "cms_sync", cms_url = "${run.trigger.url}", app_url = "http://127.0.0.1:1/" }"#, "cms_url"),
    ] {
        let toml = format!(
            "[[workflow]]\nid = \"chosen\"\n[[workflow.step]]\nid = \"b\"\naction = \"builtin\"\nwith = {with}\n"
        );
        let file = workflows_file(dir.path(), &toml);
        let output = ReplicaConfig::new(None, Some(&file), dir.path()).command(&["serve"]);
        assert!(output.code.is_some_and(|code| code != 0), "{output:?}");
        for needle in ["workflow `chosen`", "step `b`", &format!("parameter `{parameter}`")] {
            assert!(output.stderr.contains(needle), "`{needle}` missing from: {output:?}");
        }
    }
    // A directory parameter never walks out with `..`, however it was written.
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let toml = format!(
        "[[workflow]]\nid = \"rotate\"\n[[workflow.step]]\nid = \"b\"\naction = \"builtin\"\nwith = {{ name = \"log_rotation\", dir = \"{}/../logs\" }}\nretry = {{ max_attempts = 1 }}\n",
        logs.display()
    );
    let file = workflows_file(dir.path(), &toml);
    let replica = ReplicaConfig::new(None, Some(&file), dir.path()).start("walker");
    let run = replica.wait_terminal(&replica.trigger("rotate", json!({})), RUN_LIMIT);
    assert_eq!(run["status"], "failed", "{run}");
    assert!(run["error"].as_str().unwrap_or_default().contains("`..`"), "{run}");
}

#[test]
fn issue8_query_string_secrets_of_configured_urls_are_masked() {
    let services = FakeServer::start(|request| {
        if request.path() == "/down" {
            (503, "text/plain", b"no".to_vec())
        } else {
            (200, "text/plain", b"ok".to_vec())
        }
    });
    let hub = FakeServer::ok();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let healthy = services.url("/health?token=s3cret-token&verbose");
    let down = services.url("/down?key=hunter2-key");
    // The built-in registry: health-monitoring probes HEALTH_URLS and notifies the hub.
    let replica: Replica = ReplicaConfig::new(Some(redis.url()), None, dir.path())
        .env("HEALTH_URLS", &format!("{healthy},{down}"))
        .env("HEALTH_FLAP_THRESHOLD", "1")
        .env("DOCKER_SOCKET", "/nonexistent/docker.sock")
        .env("NOTIFY_WEBHOOK_URL", &hub.url("/hook"))
        .env("WEBHOOK_SECRET", "hook-secret")
        .start("masking");
    let run_id = replica.trigger("health-monitoring", json!({}));
    let run = replica.wait_terminal(&run_id, RUN_LIMIT);
    assert_eq!(run["status"], "completed", "{run}");
    let probe = &step(&run, "probe")["output"];
    let urls: Vec<&str> = probe["checks"].as_array().unwrap().iter().filter_map(|c| c["url"].as_str()).collect();
    assert_eq!(urls, [services.url("/health?token=***&***"), services.url("/down?key=***")], "{probe}");
    assert_eq!(probe["failing"][0]["target"], services.url("/down?key=***"), "{probe}");
    // The probes themselves carried the secrets: they reached the services.
    assert!(services.requests().iter().any(|r| r.target == "/down?key=hunter2-key"));

    let notification = wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
        hub.requests().into_iter().find(|r| r.path() == "/hook")
    })
    .expect("the alert reached the hub");
    let sent = String::from_utf8_lossy(&notification.body).into_owned();
    assert!(sent.contains("key=***"), "{sent}");
    let history = serde_json::to_string(&replica.history(&run_id)).unwrap();
    for shown in [sent.as_str(), &run.to_string(), &history, &replica.log_text()] {
        assert!(!shown.contains("s3cret-token") && !shown.contains("hunter2-key"), "a secret shows in: {shown}");
    }
}
