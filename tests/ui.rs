//! The dashboard in a real browser: Debian's `chromium`, headless, driven through
//! `chromedriver` (WebDriver, on a free loopback port) by `fantoccini`, against a served binary
//! on a private redis-server. Each test saves a screenshot under `target/ui-screenshots/`
//! (also when it fails).
//!
//! The browser is a hard requirement: without `/usr/bin/chromium` and `/usr/bin/chromedriver`
//! (`scripts/test.sh` installs them) these tests fail, saying so. Every wait is bounded; no test
//! asserts on how long anything took.

use crate::util::{Served, free_port, wait_for};
use fantoccini::{Client, ClientBuilder, Locator};
use futures::FutureExt;
use serde_json::{Value, json};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The workflows the tests drive. `{dir}` is the test's directory.
const WORKFLOWS: &str = r#"
[[workflow]]
id = "hello"
description = "three steps, the second takes a second"
schedule = "0 3 * * *"
timezone = "Europe/Berlin"
events = ["hello.requested"]
[[workflow.step]]
id = "greet"
action = "exec"
with = { command = ["sh", "-c", "printf 'hello %s' \"$WFO_RUN_ID\""] }
[[workflow.step]]
id = "pause"
action = "exec"
with = { command = ["sh", "-c", "sleep 1; echo paused"] }
[[workflow.step]]
id = "finish"
action = "noop"

# Fails until the file `marker` exists in the test's directory.
[[workflow]]
id = "flaky"
[[workflow.step]]
id = "prepare"
action = "noop"
[[workflow.step]]
id = "needs-marker"
action = "exec"
with = { command = ["sh", "-c", "if [ -f marker ]; then echo marker-found; else echo \"no marker, attempt $WFO_ATTEMPT\" >&2; exit 4; fi"], cwd = "{dir}" }
retry = { max_attempts = 2, initial_backoff = "100ms", max_backoff = "100ms", jitter = 0.0 }

[[workflow]]
id = "sleeper"
[[workflow.step]]
id = "nap"
action = "sleep"
with = { duration = "10m" }
[[workflow.step]]
id = "after"
action = "noop"

# Its output holds markup that would run if it were ever inserted as HTML. Its runs are indexed
# by their input's `note`.
[[workflow]]
id = "xss"
search = ["note"]
[[workflow.step]]
id = "markup"
action = "exec"
with = { command = ["sh", "-c", "printf '%s' '<script>window.__xss = 1</script><img src=x onerror=\"window.__xss = 2\">'"] }
"#;

// ---- the service, the driver and the browser ----

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

    /// With more workflows (`{dir}` replaced as in [`WORKFLOWS`]).
    fn start_with(env: &[(&str, &str)], more_workflows: &str) -> Service {
        Service(Served::start("ui", &format!("{WORKFLOWS}\n{more_workflows}"), env))
    }

    fn base(&self) -> String {
        self.replica.base()
    }
}

fn chromium() -> PathBuf {
    std::env::var_os("WFO_CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

fn chromedriver() -> PathBuf {
    std::env::var_os("WFO_CHROMEDRIVER").map_or_else(|| PathBuf::from("/usr/bin/chromedriver"), PathBuf::from)
}

/// A chromedriver process on a free loopback port, stopped (by its pid) when dropped.
struct Driver {
    child: Child,
    port: u16,
    profile: tempfile::TempDir,
    log: PathBuf,
}

impl Driver {
    fn start(log_dir: &Path) -> Driver {
        for (what, path) in [("chromium", chromium()), ("chromedriver", chromedriver())] {
            assert!(
                path.exists(),
                "the dashboard's browser tests need {what} at {}: install Debian's `chromium` and `chromium-driver` \
                 (scripts/test.sh does: apt-get install -y chromium chromium-driver)",
                path.display()
            );
        }
        let log = log_dir.join("chromedriver.log");
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port();
            let child = Command::new(chromedriver())
                .arg(format!("--port={port}"))
                .arg(format!("--log-path={}", log.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start chromedriver");
            let mut driver = Driver { child, port, profile: tempfile::tempdir().expect("tempdir"), log: log.clone() };
            let up = wait_for(Duration::from_secs(20), Duration::from_millis(50), || {
                std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
            });
            if up.is_some() {
                return driver;
            }
            last_error = std::fs::read_to_string(&log).unwrap_or_default();
            driver.stop();
        }
        panic!("chromedriver did not listen on a loopback port; its log:\n{last_error}");
    }

    /// A new browser session: headless Chromium with its own profile directory.
    async fn session(&self) -> Client {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".to_owned(), json!("chrome"));
        capabilities.insert(
            "goog:chromeOptions".to_owned(),
            json!({
                "binary": chromium(),
                "args": [
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--window-size=1280,1000",
                    format!("--user-data-dir={}", self.profile.path().display()),
                ],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let mut builder = ClientBuilder::new(connector);
        builder.capabilities(capabilities);
        let url = format!("http://127.0.0.1:{}", self.port);
        let connect = builder.connect(&url);
        match tokio::time::timeout(Duration::from_secs(60), connect).await {
            Ok(Ok(client)) => client,
            Ok(Err(err)) => panic!(
                "no browser session ({err}); chromedriver's log:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            ),
            Err(_) => panic!("no browser session within 60 s"),
        }
    }

    /// SIGTERM (chromedriver then ends the browsers it started), then SIGKILL if it lingers.
    fn stop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let exited =
            wait_for(Duration::from_secs(5), Duration::from_millis(50), || self.child.try_wait().ok().flatten());
        if exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How long a whole browser test may take before it fails.
const TEST_LIMIT: Duration = Duration::from_secs(240);
/// How long a page has to show what a test waits for.
const WAIT: Duration = Duration::from_secs(60);

/// Runs `test` with a browser page on `service`, bounded in time; saves a screenshot named
/// after the test whatever happened, and closes the browser.
fn in_browser<F, Fut>(name: &str, service: &Service, test: F)
where
    F: FnOnce(Page) -> Fut,
    Fut: Future<Output = ()>,
{
    let driver = Driver::start(service.dir.path());
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a runtime");
    runtime.block_on(async {
        let client = driver.session().await;
        let page = Page { client: client.clone(), base: service.base(), name: name.to_owned() };
        let outcome = tokio::time::timeout(TEST_LIMIT, AssertUnwindSafe(test(page.clone())).catch_unwind()).await;
        page.screenshot("").await;
        let _ = tokio::time::timeout(Duration::from_secs(10), client.close()).await;
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => panic!("the browser test `{name}` did not finish within {TEST_LIMIT:?}"),
        }
    });
}

/// The browser's page, and what the tests do with it.
#[derive(Clone)]
struct Page {
    client: Client,
    base: String,
    name: String,
}

impl Page {
    async fn goto(&self, path: &str) {
        self.client.goto(&format!("{}{path}", self.base)).await.expect("navigate");
    }

    async fn js(&self, script: &str) -> Value {
        self.client.execute(script, vec![]).await.unwrap_or_else(|err| panic!("script `{script}`: {err}"))
    }

    /// Waits (bounded) until `script` returns something truthy; returns it.
    async fn until(&self, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let value = self.js(script).await;
            let truthy = match &value {
                Value::Null | Value::Bool(false) => false,
                Value::String(s) => !s.is_empty(),
                Value::Number(n) => n.as_f64() != Some(0.0),
                _ => true,
            };
            if truthy {
                return value;
            }
            if Instant::now() >= deadline {
                self.screenshot("-timeout").await;
                panic!("{what}: not seen within {WAIT:?} (last: {value}); page text:\n{}", self.body_text().await);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the app says page `name` has rendered its data.
    async fn ready(&self, name: &str) {
        self.until(&format!("page `{name}` ready"), &format!("return document.body.dataset.ready === '{name}'")).await;
    }

    async fn body_text(&self) -> String {
        self.js("return document.body.innerText").await.as_str().unwrap_or_default().to_owned()
    }

    async fn text(&self, css: &str) -> String {
        let element = self.client.find(Locator::Css(css)).await.unwrap_or_else(|err| panic!("find `{css}`: {err}"));
        element.text().await.expect("element text")
    }

    async fn click(&self, css: &str) {
        let element = self.client.find(Locator::Css(css)).await.unwrap_or_else(|err| panic!("find `{css}`: {err}"));
        element.click().await.unwrap_or_else(|err| panic!("click `{css}`: {err}"));
    }

    async fn fill(&self, css: &str, text: &str) {
        let element = self.client.find(Locator::Css(css)).await.unwrap_or_else(|err| panic!("find `{css}`: {err}"));
        element.clear().await.expect("clear");
        element.send_keys(text).await.expect("type");
    }

    async fn select(&self, css: &str, value: &str) {
        let element = self.client.find(Locator::Css(css)).await.unwrap_or_else(|err| panic!("find `{css}`: {err}"));
        element.select_by_value(value).await.unwrap_or_else(|err| panic!("select {value} in `{css}`: {err}"));
    }

    /// Clicks `css`, then confirms in the dialog that asks.
    async fn click_and_confirm(&self, css: &str) {
        self.click(css).await;
        self.until("the confirmation dialog", "return document.getElementById('confirm').open").await;
        self.click("#confirm-ok").await;
    }

    /// The run page's run status, once shown.
    async fn wait_run_status(&self, status: &str) {
        self.until(
            &format!("run status `{status}`"),
            &format!("const s = document.getElementById('run-status'); return s && s.dataset.status === '{status}'"),
        )
        .await;
    }

    /// The run id of the run page shown.
    async fn run_id(&self) -> String {
        self.until(
            "a run page",
            "return location.pathname.startsWith('/ui/runs/') && document.body.dataset.ready === 'run'",
        )
        .await;
        self.js("return decodeURIComponent(location.pathname.slice('/ui/runs/'.length))")
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Marks the document: a full reload would lose the mark.
    async fn mark(&self) {
        self.js("window.__sameDocument = true; return true").await;
    }

    async fn assert_not_reloaded(&self) {
        assert_eq!(self.js("return window.__sameDocument === true").await, json!(true), "the page was reloaded");
    }

    async fn screenshot(&self, suffix: &str) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("ui-screenshots");
        let _ = std::fs::create_dir_all(&dir);
        if let Ok(Ok(png)) = tokio::time::timeout(Duration::from_secs(20), self.client.screenshot()).await {
            let _ = std::fs::write(dir.join(format!("{}{suffix}.png", self.name)), png);
        }
    }
}

/// The run ids the runs page lists, in order, comma-separated (a JavaScript expression).
const LISTED: &str =
    "[...document.querySelectorAll('#runs-list tbody tr td:first-child')].map(td => td.textContent).join(',')";

/// A run's JSON from the API (no token).
fn api_run(service: &Service, run: &str) -> Value {
    service.replica.run(run)
}

// ---- the tests ----

#[test]
fn every_page_opens_and_an_event_is_published_from_the_events_page() {
    let service = Service::start(&[]);
    let done = service.replica.trigger("hello", json!({ "from": "api" }));
    service.replica.wait_terminal(&done, Duration::from_secs(60));
    let service = &service;
    in_browser("every_page_opens", service, |page| async move {
        page.goto("/").await;
        page.ready("overview").await;
        assert_eq!(page.js("return location.pathname").await, json!("/ui"), "`/` redirects to /ui");
        assert!(page.text("#banner").await.contains("The API is open"), "the open-API banner");
        assert_eq!(page.text("#started-hour").await, "1");
        assert_eq!(page.text("#completed-hour").await, "1");
        page.until("a live replica", "return document.querySelectorAll('tr.replica').length === 1").await;
        assert_eq!(page.text("#store-status").await, "ok");
        page.screenshot("-overview").await;
        page.mark().await;

        page.click("header nav a[data-nav=workflows]").await;
        page.ready("workflows").await;
        assert_eq!(page.js("return document.querySelectorAll('tr.workflow').length").await, json!(4));
        let body = page.body_text().await;
        assert!(body.contains("every day at 03:00 (0 3 * * *)") && body.contains("Europe/Berlin"), "{body}");

        page.click("a[href='/ui/workflows/hello']").await;
        page.ready("workflow").await;
        assert_eq!(page.js("return document.querySelectorAll('#steps-graph .node').length").await, json!(3));
        assert_eq!(page.js("return document.querySelectorAll('#next-fires li').length").await, json!(5));
        assert!(page.body_text().await.contains("hello.requested"));
        page.screenshot("-workflow").await;

        page.click("header nav a[data-nav=runs]").await;
        page.ready("runs").await;
        page.click(&format!("a[href='/ui/runs/{done}']")).await;
        page.wait_run_status("completed").await;
        assert_eq!(page.js("return document.querySelectorAll('#gantt .seg.ok').length").await, json!(3));
        assert!(page.text("#fold-check").await.contains("fold to the stored state (completed)"));
        page.screenshot("-run").await;

        page.click("header nav a[data-nav=events]").await;
        page.ready("events").await;
        page.fill("#event-type", "hello.requested").await;
        page.fill("#event-payload", r#"{"who": "browser"}"#).await;
        page.click("#publish-submit").await;
        page.until(
            "the published event",
            "return document.getElementById('publish-result').textContent.startsWith('Published')",
        )
        .await;
        // The router handles it and the listing links the run it started.
        let started = page
            .until(
                "the run the event started",
                "const a = document.querySelector('tr.event a[href^=\"/ui/runs/\"]'); return a && a.textContent",
            )
            .await;
        let started = started.as_str().unwrap().to_owned();
        assert_eq!(api_run(service, &started)["input"], json!({ "who": "browser" }));
        page.screenshot("-events").await;

        page.goto("/ui/no/such/page").await;
        page.until("the not-found page", "return document.body.dataset.page === 'missing'").await;
    });
}

#[test]
fn a_run_triggered_from_its_workflow_page_completes_live_and_is_rerun_from_a_step() {
    let service = Service::start(&[]);
    let service = &service;
    in_browser("trigger_and_rerun", service, |page| async move {
        page.goto("/ui/workflows/hello").await;
        page.ready("workflow").await;
        page.mark().await;
        // The input is checked before it is sent.
        page.fill("#trigger-input", "{not json").await;
        page.click("#trigger-submit").await;
        page.until(
            "the JSON error",
            "return document.getElementById('trigger-error').textContent.includes('not valid JSON')",
        )
        .await;
        page.fill("#trigger-input", "[1, 2]").await;
        page.click("#trigger-submit").await;
        page.until(
            "the object error",
            "return document.getElementById('trigger-error').textContent.includes('must be a JSON object')",
        )
        .await;
        assert_eq!(service.replica.get("/api/runs").1["runs"], json!([]), "nothing was sent");

        page.fill("#trigger-input", r#"{"reason": "from the browser"}"#).await;
        page.click("#trigger-submit").await;
        let run = page.run_id().await;
        // Watched without a reload: live, then completed.
        page.wait_run_status("completed").await;
        page.assert_not_reloaded().await;
        let shown = api_run(service, &run);
        assert_eq!(shown["status"], "completed");
        assert_eq!(shown["input"], json!({ "reason": "from the browser" }));
        assert_eq!(page.js("return document.querySelectorAll('#gantt .seg.ok').length").await, json!(3));

        // Step-through: the state right after the first transition, then the next.
        page.click("#history tr[data-seq='1']").await;
        page.until(
            "the state after #1",
            "const s = document.querySelector('#state-status'); return s && s.textContent === 'pending'",
        )
        .await;
        assert!(page.text("#state-at").await.starts_with("After #1"));
        page.click("#state-next").await;
        page.until(
            "the state after #2",
            "return document.getElementById('state-at').textContent.startsWith('After #2')",
        )
        .await;
        page.screenshot("-stepped").await;

        // Rerun from the second step: a new run that reuses the first step's output.
        page.select("#rerun-from", "pause").await;
        page.click_and_confirm("#rerun-run").await;
        page.until(
            "the new run's page",
            &format!("return location.pathname !== '/ui/runs/{run}' && document.body.dataset.ready === 'run'"),
        )
        .await;
        let rerun = page.run_id().await;
        assert_ne!(rerun, run);
        page.wait_run_status("completed").await;
        page.assert_not_reloaded().await;
        let history = service.replica.history(&rerun);
        let reused = history.iter().find(|t| t["type"] == "step_reused").expect("a reused step");
        assert_eq!(reused["step"], "greet");
        assert_eq!(reused["output"], shown["steps"][0]["output"], "the first run's output, reused");
        assert_eq!(page.js("return document.querySelectorAll('#gantt .seg.reused').length").await, json!(1));
    });
}

#[test]
fn a_failed_run_is_retried_and_a_sleeping_run_is_cancelled_from_the_run_page() {
    let service = Service::start(&[]);
    let failed = service.replica.trigger("flaky", json!({}));
    assert_eq!(service.replica.wait_terminal(&failed, Duration::from_secs(60))["status"], "failed");
    let sleeping = service.replica.trigger("sleeper", json!({}));
    service.replica.wait_settled(&sleeping, Duration::from_secs(60));
    let marker = service.dir.path().join("marker");
    let service = &service;
    in_browser("retry_and_cancel", service, |page| async move {
        page.goto(&format!("/ui/runs/{failed}")).await;
        page.wait_run_status("failed").await;
        page.mark().await;
        assert!(page.text("#run-error").await.contains("no marker"), "the run's error is shown");
        assert!(!page.text("#run-actions").await.contains("null"), "{}", page.text("#run-actions").await);
        // Two failed attempts with a back-off between them.
        assert_eq!(page.js("return document.querySelectorAll('#gantt .seg.failed').length").await, json!(2));
        assert_eq!(page.js("return document.querySelectorAll('#gantt .seg.backoff').length").await, json!(1));
        page.screenshot("-failed").await;

        // Going back from the confirmation does nothing.
        page.click("#retry-run").await;
        page.until("the confirmation dialog", "return document.getElementById('confirm').open").await;
        page.click("#confirm-cancel").await;
        assert_eq!(api_run(service, &failed)["status"], "failed");

        std::fs::write(&marker, b"").expect("the marker file");
        page.click_and_confirm("#retry-run").await;
        page.wait_run_status("completed").await;
        page.assert_not_reloaded().await;
        let history = service.replica.history(&failed);
        assert!(history.iter().any(|t| t["type"] == "run_resumed"), "resumed: {history:?}");
        assert_eq!(api_run(service, &failed)["steps"][1]["output"]["stdout"], "marker-found\n");

        page.goto(&format!("/ui/runs/{sleeping}")).await;
        page.wait_run_status("sleeping").await;
        assert_eq!(page.js("return document.querySelectorAll('#gantt .seg.sleep').length").await, json!(1));
        page.mark().await;
        page.click_and_confirm("#cancel-run").await;
        page.wait_run_status("cancelled").await;
        page.assert_not_reloaded().await;
        assert_eq!(api_run(service, &sleeping)["status"], "cancelled");
        // A finished run offers no cancel.
        assert_eq!(page.js("return document.getElementById('cancel-run') === null").await, json!(true));
    });
}

#[test]
fn runs_are_filtered_and_a_step_output_holding_markup_is_shown_as_text() {
    let service = Service::start(&[]);
    let xss = service.replica.trigger("xss", json!({ "note": "<b>bold?</b>" }));
    service.replica.wait_terminal(&xss, Duration::from_secs(60));
    let hello = service.replica.trigger("hello", json!({}));
    service.replica.wait_terminal(&hello, Duration::from_secs(60));
    let failed = service.replica.trigger("flaky", json!({}));
    service.replica.wait_terminal(&failed, Duration::from_secs(60));
    let service = &service;
    in_browser("filter_and_xss", service, |page| async move {
        page.goto("/ui/runs").await;
        page.ready("runs").await;
        assert_eq!(
            page.js(&format!("return {LISTED}")).await,
            json!(format!("{failed},{hello},{xss}")),
            "newest first"
        );

        page.select("#filter-workflow", "hello").await;
        page.until("the runs of `hello`", &format!("return {LISTED} === '{hello}'")).await;
        assert!(page.js("return location.search").await.as_str().unwrap().contains("workflowId=hello"));
        page.select("#filter-workflow", "").await;
        page.until(
            "every run again",
            &format!("return {LISTED}.split(',').length === 3 && !location.search.includes('workflowId')"),
        )
        .await;
        page.select("#filter-status", "failed").await;
        page.until("the failed runs", &format!("return {LISTED} === '{failed}'")).await;
        // The row says what started the run and the step it failed at.
        assert_eq!(
            page.js("return [...document.querySelectorAll('#runs-list tbody tr td')].slice(3, 5).map(td => td.textContent).join('|')")
                .await,
            json!("api|needs-marker")
        );
        page.screenshot("-filtered").await;

        // By creation time: before `hello` was created, and from then on.
        let hello_created = api_run(service, &hello)["createdAt"].as_str().expect("createdAt").to_owned();
        page.goto(&format!("/ui/runs?createdBefore={hello_created}")).await;
        page.until("the runs created before `hello`", &format!("return {LISTED} === '{xss}'")).await;
        page.goto(&format!("/ui/runs?createdAfter={hello_created}")).await;
        page.until("the runs created from `hello` on", &format!("return {LISTED} === '{failed},{hello}'")).await;
        assert_eq!(page.js("return document.getElementById('filter-after').value !== ''").await, json!(true));
        page.screenshot("-by-time").await;

        // By an input field the workflow indexes: a value entered (the page re-renders on its
        // `change`, so it is set and announced in one script rather than typed).
        page.goto("/ui/runs?workflowId=xss").await;
        page.ready("runs").await;
        assert_eq!(page.js("return document.getElementById('filter-field').value").await, json!("note"));
        let enter = |value: &str| {
            format!(
                "const input = document.getElementById('filter-value'); input.value = {}; input.dispatchEvent(new Event('change')); return true",
                json!(value)
            )
        };
        page.js(&enter("<b>bold?</b>")).await;
        page.until(
            "the runs whose note is the markup",
            &format!("return location.search.includes('input.note') && {LISTED} === '{xss}'"),
        )
        .await;
        page.js(&enter("something else")).await;
        page.until("no run", "return location.search.includes('something') && document.getElementById('runs-list').textContent.includes('No runs match')").await;
        page.screenshot("-by-input").await;

        page.goto(&format!("/ui/runs/{xss}")).await;
        page.wait_run_status("completed").await;
        page.click("#step-details details[data-step='markup'] summary").await;
        let shown = page.text("#step-details details[data-step='markup'] pre").await;
        assert!(
            shown.contains(r#"<script>window.__xss = 1</script><img src=x onerror=\"window.__xss = 2\">"#),
            "{shown}"
        );
        assert_eq!(page.js("return document.querySelectorAll('main script, main img').length").await, json!(0));
        assert_eq!(page.js("return window.__xss === undefined").await, json!(true), "no script of the output ran");
        assert_eq!(
            page.js("return document.querySelector('main').textContent.includes('<b>bold?</b>')").await,
            json!(true)
        );
        assert_eq!(page.js("return document.querySelectorAll('main b').length").await, json!(0));
        page.screenshot("-xss").await;
    });
}

#[test]
fn with_an_api_token_the_dashboard_asks_for_it_once_and_refuses_a_wrong_one() {
    const TOKEN: &str = "dashboard-test-token-0123456789";
    let service = Service::start(&[("API_TOKEN", TOKEN)]);
    let service = &service;
    in_browser("login", service, |page| async move {
        page.goto("/ui/runs").await;
        page.ready("login").await;
        assert_eq!(page.js("return document.getElementById('banner').hidden").await, json!(true), "no open-API banner");
        page.fill("#login-token", "not-the-token").await;
        page.click("#login-submit").await;
        page.until("the refusal", "return document.getElementById('login-error').textContent.includes('not valid')")
            .await;
        page.screenshot("-refused").await;
        assert_eq!(page.js("return document.getElementById('runs-list') === null").await, json!(true), "no runs shown");

        page.fill("#login-token", TOKEN).await;
        page.click("#login-submit").await;
        page.ready("runs").await;
        // The session is a cookie scripts cannot read.
        assert_eq!(page.js("return document.cookie.includes('wfo_session')").await, json!(false));
        // It holds across pages and reloads: no second login.
        page.goto("/ui").await;
        page.ready("overview").await;
        page.goto("/ui/workflows/hello").await;
        page.ready("workflow").await;
        page.fill("#trigger-input", "{}").await;
        page.click("#trigger-submit").await;
        let run = page.run_id().await;
        page.wait_run_status("completed").await;
        let (status, _) = crate::util::http(
            ureq::get(&format!("{}/api/runs/{run}", service.base()))
                .set("Authorization", &format!("Bearer {TOKEN}"))
                .call(),
        );
        assert_eq!(status, 200);
        page.screenshot("-logged-in").await;

        page.click("#logout").await;
        page.ready("login").await;
        page.goto("/ui/runs").await;
        page.ready("login").await;
    });
}

/// A workflow `twenty` of 20 `exec` steps, each failing its first attempt (it leaves a file
/// behind in the test's directory) and succeeding on its second, 20 ms later.
fn twenty_steps() -> String {
    let mut toml = "[[workflow]]\nid = \"twenty\"\n".to_owned();
    for step in 1..=20 {
        toml.push_str(&format!(
            "[[workflow.step]]\nid = \"step-{step:02}\"\naction = \"exec\"\n\
             with = {{ command = [\"sh\", \"-c\", \"f=\\\"tried-$WFO_RUN_ID-$WFO_STEP_ID\\\"; if [ -f \\\"$f\\\" ]; then echo ok; else touch \\\"$f\\\"; echo first-attempt-fails >&2; exit 1; fi\"], cwd = \"{{dir}}\" }}\n\
             retry = {{ max_attempts = 2, initial_backoff = \"20ms\", max_backoff = \"20ms\", jitter = 0.0 }}\n"
        ));
    }
    toml
}

#[test]
fn the_page_of_a_twenty_step_run_with_retries_draws_every_attempt_and_records_how_long_it_took() {
    let service = Service::start_with(&[], &twenty_steps());
    let run = service.replica.trigger("twenty", json!({}));
    assert_eq!(service.replica.wait_terminal(&run, Duration::from_secs(120))["status"], "completed");
    let service = &service;
    in_browser("twenty_steps", service, |page| async move {
        page.goto(&format!("/ui/runs/{run}")).await;
        page.wait_run_status("completed").await;
        assert_eq!(page.js("return document.querySelectorAll('#gantt .row').length").await, json!(20));
        assert_eq!(page.js("return document.querySelectorAll('#gantt .seg.failed').length").await, json!(20));
        assert_eq!(page.js("return document.querySelectorAll('#gantt .seg.ok').length").await, json!(20));
        assert_eq!(page.js("return document.querySelectorAll('#gantt .seg.backoff').length").await, json!(20));
        let transitions = service.replica.history(&run).len();
        assert_eq!(
            page.js("return document.querySelectorAll('#history tr[data-seq]').length").await,
            json!(transitions)
        );
        // A figure, not a check: from navigation to the first render of the run's data.
        let ms = page.js("return Number(document.body.dataset.firstReadyMs)").await;
        let figure = format!(
            "run page of a 20-step run with a retry per step ({transitions} transitions): first render with its data {ms} ms after navigation (headless Chromium, debug build of the server)\n"
        );
        eprint!("{figure}");
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("ui-screenshots");
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(dir.join("twenty_steps.txt"), figure);
    });
}
