//! `list_runs`: how fast `GET /api/runs` pages are with 100,000 stored runs.
//!
//! Fills a private Redis on 127.0.0.1:`--port` (FLUSHALLed first: never point it at a Redis you
//! care about) with `--runs` runs (default 100,000) of three one-step `noop` workflows, run to
//! completion by one in-process engine (every tenth fails, so the status filter has something to
//! find), then times the pages the API serves: a page is the store's `list_runs` plus one summary
//! read per run listed, as `GET /api/runs` does. Each query is timed over `--repeat` pages
//! (default 200): the first page, pages deep in the cursor chain, and each filter.
//!
//! ```sh
//! cargo bench --bench list_runs -- --port 6390 --runs 100000
//! cargo bench --bench list_runs -- --port 6390 --runs 100000 --browser   # and the dashboard's runs page
//! ```
//!
//! With `--browser`, the same engine then serves the API and the dashboard on a loopback port,
//! and Debian's `chromium`, headless, driven through `chromedriver` (a free loopback port;
//! stopped by its pid at the end), opens the dashboard's runs page `--repeat-browser` times
//! (default 10) per query: each a fresh page load, timed from the navigation's start to the first
//! render of the listed runs (the page's `firstReadyMs`, `performance.now()` when it marked
//! itself ready), as a person opening the page would wait.
//!
//! Prints one JSON line on stdout: per query, p50 and p99 in milliseconds.

use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
use workflow_orchestrator::config::Settings;
use workflow_orchestrator::definition::Registry;
use workflow_orchestrator::engine::{Engine, EngineConfig};
use workflow_orchestrator::machine::Status;
use workflow_orchestrator::machine::Trigger;
use workflow_orchestrator::store::redis::RedisStore;
use workflow_orchestrator::store::{RunId, RunQuery, SearchQuery, Store};

const DEFINITIONS: &str = r#"
[[workflow]]
id = "alpha"
search = ["user"]
[[workflow.step]]
id = "only"
action = "noop"

[[workflow]]
id = "beta"
[[workflow.step]]
id = "only"
action = "noop"

[[workflow]]
id = "flaky"
[[workflow.step]]
id = "only"
action = "exec"
with = { command = ["false"] }
retry = { max_attempts = 1 }
"#;

const PAGE: usize = 50;

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

/// One command to the private Redis over a plain socket (FLUSHALL), reading one reply line.
fn flushall(port: u16) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.write_all(b"*1\r\n$8\r\nFLUSHALL\r\n")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(())
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    (samples[index] * 1000.0).round() / 1000.0
}

/// A page as the API serves it: the ids, then each run's summary.
async fn page(engine: &Engine, workflow: Option<&str>, status: Option<&str>, cursor: Option<&RunId>) -> Vec<RunId> {
    let status = status.map(|name| Status::from_name(name).expect("a status name"));
    let query = RunQuery { workflow, status, before: cursor, limit: PAGE };
    with_summaries(engine, engine.list_runs(query).await.expect("a page")).await
}

/// Reads each listed run's summary, as the API does for a page.
async fn with_summaries(engine: &Engine, runs: Vec<RunId>) -> Vec<RunId> {
    let reads = runs.iter().map(|run| engine.summary(run));
    for summary in futures::future::join_all(reads).await {
        summary.expect("a summary");
    }
    runs
}

async fn time<F, Fut>(repeat: usize, mut query: F) -> Value
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let mut samples = Vec::with_capacity(repeat);
    let mut listed = 0;
    for i in 0..repeat {
        let started = Instant::now();
        listed = query(i).await;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    json!({ "p50_ms": percentile(&mut samples, 0.5), "p99_ms": percentile(&mut samples, 0.99), "runs_per_page": listed })
}

async fn run(port: u16, total: usize, repeat: usize, browser_repeat: Option<usize>) -> Result<Value, String> {
    flushall(port).map_err(|err| format!("cannot reach 127.0.0.1:{port}: {err}"))?;
    let registry = Arc::new(Registry::parse("list_runs benchmark", DEFINITIONS).map_err(|e| e.to_string())?);
    let store: Arc<dyn Store> = Arc::new(
        RedisStore::connect(&format!("redis://127.0.0.1:{port}"), "wfo", 16).await.map_err(|e| e.to_string())?,
    );
    let defaults = Settings::from_lookup(|_| None).map_err(|e| e.to_string())?;
    let config = EngineConfig {
        replica_id: "bench".to_owned(),
        max_concurrent_steps: 64,
        ..EngineConfig::from_settings(&defaults)
    };
    let engine = Engine::new(store, Arc::clone(&registry), config).await.map_err(|e| e.to_string())?;
    engine.start();

    // Fill: at most 500 triggers in flight; wait until every run ended.
    let started = Instant::now();
    let mut finished = engine.subscribe_finished();
    let mut in_flight = FuturesUnordered::new();
    for i in 0..total {
        let workflow = if i % 10 == 9 {
            "flaky"
        } else if i % 2 == 0 {
            "alpha"
        } else {
            "beta"
        };
        let engine = Arc::clone(&engine);
        // 100 users: a search by one of the even ones finds its 1,000 alpha runs among 100,000.
        let input = json!({ "i": i, "user": i % 100 });
        in_flight.push(async move { engine.trigger(workflow, &input, None, Trigger::Api).await });
        if in_flight.len() >= 500 {
            in_flight.next().await.transpose().map_err(|e| e.to_string())?;
        }
    }
    while let Some(result) = in_flight.next().await {
        result.map_err(|e| e.to_string())?;
    }
    let mut ended = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    while ended < total && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), finished.recv()).await {
            Ok(Ok(_)) => ended += 1,
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(missed))) => ended += missed as usize,
            Ok(Err(_)) | Err(_) => break,
        }
    }
    let fill_s = started.elapsed().as_secs_f64();
    eprintln!("[list_runs] {total} runs stored in {fill_s:.1} s ({ended} seen ending)");

    // The cursor chain, to time pages deep in it.
    let mut cursors: Vec<Option<RunId>> = vec![None];
    for _ in 0..40 {
        let page = engine
            .list_runs(RunQuery {
                workflow: None,
                status: None,
                before: cursors.last().cloned().flatten().as_ref(),
                limit: PAGE,
            })
            .await
            .map_err(|e| e.to_string())?;
        match page.last() {
            Some(last) if page.len() == PAGE => cursors.push(Some(last.clone())),
            _ => break,
        }
    }
    let engine_ref = &engine;
    let cursors = &cursors;
    // The time filter starts its page deep in the cursor chain.
    let deep = cursors.last().cloned().flatten();
    let browser = match browser_repeat {
        Some(repeat) => Some(browser::runs_page(Arc::clone(engine_ref), repeat, deep).await?),
        None => None,
    };
    let engine = engine_ref;
    let results = json!({
        "first_page": time(repeat, |_| async move { page(engine, None, None, None).await.len() }).await,
        "deep_pages": time(repeat, |i| async move { page(engine, None, None, cursors[i % cursors.len()].as_ref()).await.len() }).await,
        "by_workflow": time(repeat, |_| async move { page(engine, Some("alpha"), None, None).await.len() }).await,
        "by_status_failed": time(repeat, |_| async move { page(engine, None, Some("failed"), None).await.len() }).await,
        "by_workflow_and_status": time(repeat, |_| async move { page(engine, Some("flaky"), Some("failed"), None).await.len() }).await,
        "by_input_field": time(repeat, |i| async move {
            let user = (i % 50 * 2).to_string();
            let query = SearchQuery { workflow: "alpha", field: "user", value: &user, before: None, limit: PAGE };
            let runs = engine.search_runs(query).await.expect("a page");
            with_summaries(engine, runs).await.len()
        }).await,
    });
    engine.shutdown().await;
    Ok(json!({
        "bench": "list_runs",
        "runs_stored": total,
        "page": PAGE,
        "repeat": repeat,
        "fill_s": (fill_s * 10.0).round() / 10.0,
        "queries": results,
        "runs_page_in_browser": browser,
    }))
}

/// The dashboard's runs page in a real browser, over the engine's own API.
mod browser {
    use super::percentile;
    use fantoccini::{Client, ClientBuilder};
    use serde_json::{Value, json};
    use std::process::{Child, Command, Stdio};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tokio_util::sync::CancellationToken;
    use workflow_orchestrator::api::{ApiState, serve};
    use workflow_orchestrator::engine::Engine;
    use workflow_orchestrator::store::RunId;

    /// chromedriver, killed by its pid when dropped.
    struct Driver(Child);

    impl Drop for Driver {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn free_port() -> Result<u16, String> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(|e| e.to_string())?;
        Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
    }

    async fn session(port: u16, profile: &std::path::Path) -> Result<Client, String> {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".to_owned(), json!("chrome"));
        capabilities.insert(
            "goog:chromeOptions".to_owned(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--window-size=1280,1000", format!("--user-data-dir={}", profile.display())],
            }),
        );
        let mut builder = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
        builder.capabilities(capabilities);
        let url = format!("http://127.0.0.1:{port}");
        // chromedriver takes a moment to listen: a bounded number of tries.
        let mut last = String::new();
        for _ in 0..100 {
            match tokio::time::timeout(Duration::from_secs(60), builder.connect(&url)).await {
                Ok(Ok(client)) => return Ok(client),
                Ok(Err(err)) => last = err.to_string(),
                Err(_) => last = "no session within 60 s".to_owned(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(format!("no browser session: {last}"))
    }

    /// Loads `path` and waits (bounded) until the runs page marked itself ready; the time from
    /// the navigation's start to that first render, in ms.
    async fn load(client: &Client, base: &str, path: &str) -> Result<f64, String> {
        client.goto(&format!("{base}{path}")).await.map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = client
                .execute(
                    "return document.body.dataset.ready === 'runs' ? Number(document.body.dataset.firstReadyMs) : null",
                    vec![],
                )
                .await
                .map_err(|e| e.to_string())?;
            if let Some(ms) = ready.as_f64() {
                let rows = client
                    .execute("return document.querySelectorAll('#runs-list tbody tr').length", vec![])
                    .await
                    .map_err(|e| e.to_string())?;
                if rows.as_u64().unwrap_or(0) == 0 {
                    return Err(format!("{path}: the page listed no runs"));
                }
                return Ok(ms);
            }
            if Instant::now() > deadline {
                return Err(format!("{path}: not ready within 60 s"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn runs_page(engine: Arc<Engine>, repeat: usize, deep: Option<RunId>) -> Result<Value, String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
        let base = format!("http://{}", listener.local_addr().map_err(|e| e.to_string())?);
        let stop = CancellationToken::new();
        // No token, no allowed hosts: the settings of an empty environment.
        let settings = workflow_orchestrator::config::Settings::from_lookup(|_| None).map_err(|e| e.to_string())?;
        let server = tokio::spawn(serve(listener, Arc::new(ApiState::new(engine, &settings)), stop.clone()));
        let port = free_port()?;
        let profile = tempfile::tempdir().map_err(|e| e.to_string())?;
        let _driver = Driver(
            Command::new("/usr/bin/chromedriver")
                .arg(format!("--port={port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start /usr/bin/chromedriver (Debian's chromium-driver): {e}"))?,
        );
        let client = session(port, profile.path()).await?;
        let before = deep.map(|run| workflow_orchestrator::machine::timestamp(run.created_at()));
        let mut queries: Vec<(&str, String)> = vec![
            ("first_page", "/ui/runs".to_owned()),
            ("by_workflow", "/ui/runs?workflowId=alpha".to_owned()),
            ("by_status_failed", "/ui/runs?status=failed".to_owned()),
            ("by_input_field", "/ui/runs?workflowId=alpha&input.user=42".to_owned()),
        ];
        if let Some(before) = before {
            queries.push(("created_before_a_deep_run", format!("/ui/runs?createdBefore={before}")));
        }
        let mut results = serde_json::Map::new();
        for (name, path) in &queries {
            let mut samples = Vec::with_capacity(repeat);
            for _ in 0..repeat {
                samples.push(load(&client, &base, path).await?);
            }
            results.insert(
                (*name).to_owned(),
                json!({ "p50_ms": percentile(&mut samples, 0.5), "max_ms": percentile(&mut samples, 1.0) }),
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), client.close()).await;
        stop.cancel();
        let _ = server.await;
        Ok(
            json!({ "repeat": repeat, "from": "navigation start to the first render of the listed runs", "queries": results }),
        )
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --all-targets` runs bench targets too, with no arguments: nothing to measure.
    if args.len() <= 1 {
        eprintln!("list_runs: a benchmark; run it with `cargo bench --bench list_runs -- --port PORT`");
        return;
    }
    let Some(port) = flag(&args, "--port").and_then(|p| p.parse::<u16>().ok()).filter(|p| *p > 0) else {
        eprintln!(
            "usage: cargo bench --bench list_runs -- --port PORT [--runs 100000] [--repeat 200]\n--port is required: the private redis-server this benchmark FLUSHALLs"
        );
        std::process::exit(2);
    };
    let total = flag(&args, "--runs").and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let repeat = flag(&args, "--repeat").and_then(|n| n.parse().ok()).unwrap_or(200);
    let browser_repeat = args
        .iter()
        .any(|a| a == "--browser")
        .then(|| flag(&args, "--repeat-browser").and_then(|n| n.parse().ok()).unwrap_or(10));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    match runtime.block_on(run(port, total, repeat, browser_repeat)) {
        Ok(report) => println!("{report}"),
        Err(problem) => {
            eprintln!("list_runs: {problem}");
            std::process::exit(1);
        }
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
}
