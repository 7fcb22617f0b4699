//! The Molochain workflows that speak HTTP, end to end: real replica processes on a real Redis,
//! running the workflows exactly as the built-in registry defines them (each test's workflows
//! file holds the registry's entries verbatim), against [`FakeServer`]s standing in for the
//! Laravel CMS, the main app, the Communications Hub and the probed services:
//! cms-sync, health-monitoring, cache-warmup, performance-optimization, notification-digest; and
//! `GET /api/workflows` on the registry of all ten.
//!
//! The registry's workflows have cron schedules of their own (health-monitoring every minute),
//! so each test first waits (bounded) until no fire of them is due for as long as it needs:
//! a fire in the middle would start a run next to the test's own. Loopback only, every wait
//! bounded, no assertion on how long anything took.

use crate::util::{FakeServer, Received, RedisServer, Replica, ReplicaConfig, wait_for, workflows_file};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const SECRET: &str = "hub-secret-for-tests";
const CMS_TOKEN: &str = "cms-token-never-logged";

/// The registry of the ten workflows: the built-in default (`src/definition/builtin.toml`, used
/// when `WORKFLOWS_FILE` is unset); the tests copy its entries verbatim.
fn registry_text() -> String {
    include_str!("../src/definition/builtin.toml").to_owned()
}

/// The `[[workflow]]` entry `id` of the registry, verbatim (up to the next entry).
fn entry(id: &str) -> String {
    let text = registry_text();
    let start = text.find(&format!("[[workflow]]\nid = \"{id}\"\n")).unwrap_or_else(|| panic!("no workflow {id}"));
    let rest = &text[start..];
    let end = rest[1..].find("\n[[workflow]]\n").map_or(rest.len(), |end| end + 2);
    rest[..end].to_owned()
}

fn file_of(dir: &Path, ids: &[&str], extra: &str) -> std::path::PathBuf {
    let mut text: String = ids.iter().map(|id| entry(id) + "\n").collect();
    text.push_str(extra);
    workflows_file(dir, &text)
}

/// Waits (bounded) until no fire of a schedule every `period_minutes` (aligned to the hour) is
/// due within `need`. A wait for a quiet moment, not an assertion on time.
fn clear_of_cron(period_minutes: u64, need: Duration) {
    let period = period_minutes * 60_000;
    let need = need.as_millis() as u64;
    assert!(need < period, "a test cannot need longer than the schedule's period");
    let found = wait_for(Duration::from_millis(need + 2_000), Duration::from_millis(100), || {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        (now % period + need < period).then_some(())
    });
    assert!(found.is_some(), "no quiet moment in the schedule");
}

fn json_reply(value: Value) -> (u16, &'static str, Vec<u8>) {
    (200, "application/json", value.to_string().into_bytes())
}

/// `%XX` and `+` of a query string decoded.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                out.push(u8::from_str_radix(&text[i + 1..i + 3], 16).expect("a percent escape"));
                i += 2;
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8(out).expect("UTF-8")
}

/// The query parameters of a received request, decoded.
fn query(request: &Received) -> Vec<(String, String)> {
    let Some((_, query)) = request.target.split_once('?') else { return Vec::new() };
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn param(request: &Received, name: &str) -> Option<String> {
    query(request).into_iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

/// Checks the Hub's signature header ourselves: `sha256=<hex HMAC-SHA256 of the body>`.
fn assert_signed(request: &Received) {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(&request.body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(request.header("x-molochain-signature"), Some(expected.as_str()), "the notification's signature");
    assert_eq!(request.header("content-type"), Some("application/json"));
}

fn events(replica: &Replica, event_type: &str) -> Vec<Value> {
    let (status, body) = replica.get(&format!("/api/events?type={event_type}&limit=100"));
    assert_eq!(status, 200, "{body}");
    body["events"].as_array().cloned().unwrap_or_default()
}

fn runs_of(replica: &Replica, workflow: &str) -> Vec<Value> {
    let (status, body) = replica.get(&format!("/api/runs?workflowId={workflow}&limit=100"));
    assert_eq!(status, 200, "{body}");
    body["runs"].as_array().cloned().unwrap_or_default()
}

/// Triggers `workflow` and waits (bounded) for the run's end; returns the run.
fn run_to_end(replica: &Replica, workflow: &str) -> Value {
    let run_id = replica.trigger(workflow, json!({}));
    replica.wait_terminal(&run_id, Duration::from_secs(60))
}

fn step<'a>(run: &'a Value, id: &str) -> &'a Value {
    run["steps"].as_array().and_then(|steps| steps.iter().find(|s| s["id"] == id)).unwrap_or(&Value::Null)
}

/// A fake Laravel CMS with five changed items on three pages (two per page), whichever
/// `per_page` is asked for; asked with `updated_since`, it has only what changed after it.
fn fake_cms() -> FakeServer {
    FakeServer::start(|request| {
        let items: Vec<Value> = [
            (1, "2024-05-01T10:00:01.000000Z"),
            (2, "2024-05-01T10:00:09.000000Z"), // the newest is not on the last page
            (3, "2024-05-01T10:00:03.000000Z"),
            (4, "2024-05-01T10:00:04.000000Z"),
            (5, "2024-05-01T10:00:05.000000Z"),
        ]
        .into_iter()
        .map(|(id, at)| json!({ "id": id, "title": format!("page {id}"), "updated_at": at }))
        .filter(|item| {
            param(request, "updated_since").is_none_or(|since| item["updated_at"].as_str().unwrap() > &since[..])
        })
        .collect();
        let page: usize = param(request, "page").and_then(|p| p.parse().ok()).unwrap_or(1);
        let last_page = items.len().div_ceil(2).max(1);
        let data: Vec<Value> = items.iter().skip((page - 1) * 2).take(2).cloned().collect();
        json_reply(
            json!({ "data": data, "current_page": page, "last_page": last_page, "per_page": 2, "total": items.len() }),
        )
    })
}

fn cms_env(config: ReplicaConfig, cms: &FakeServer, app: &FakeServer, warm: &FakeServer) -> ReplicaConfig {
    config
        .env("CMS_API_URL", &cms.url("/api/content"))
        .env("APP_SYNC_URL", &app.url("/api/sync"))
        .env("CMS_API_TOKEN", CMS_TOKEN)
        .env("CACHE_WARMUP_URLS", &format!("{},{}", warm.url("/"), warm.url("/products")))
        .env("DOCKER_SOCKET", "/nonexistent")
}

#[test]
fn cms_sync_pushes_every_page_advances_the_cursor_and_invalidates_the_cache() {
    clear_of_cron(5, Duration::from_secs(45));
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (cms, app, warm) = (fake_cms(), FakeServer::ok(), FakeServer::ok());
    let file = file_of(dir.path(), &["cms-sync", "cache-warmup"], "");
    let config = cms_env(ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()), &cms, &app, &warm);
    let replica = config.start("cms-a");

    let run = run_to_end(&replica, "cms-sync");
    assert_eq!(run["status"], "completed", "{run}");
    let sync = &step(&run, "sync")["output"];
    assert_eq!(sync["changed"], 5, "{sync}");
    assert_eq!(sync["pages"], 3, "{sync}");
    assert_eq!(sync["cursor"], "2024-05-01T10:00:09.000000Z", "the newest updated_at of all pages: {sync}");
    assert_eq!(sync["previousCursor"], Value::Null);

    // The CMS was asked for every page, with the token and the page size, and no cursor yet.
    let asked = cms.requests();
    assert_eq!(asked.len(), 3, "{asked:?}");
    for (n, request) in asked.iter().enumerate() {
        assert_eq!(request.method, "GET");
        assert_eq!(request.path(), "/api/content");
        assert_eq!(param(request, "page"), Some((n + 1).to_string()));
        assert_eq!(param(request, "per_page").as_deref(), Some("100"));
        assert_eq!(param(request, "updated_since"), None);
        assert_eq!(request.header("authorization"), Some(format!("Bearer {CMS_TOKEN}").as_str()));
    }
    // The app got every item, a page at a time, each push with its own idempotency key.
    let pushed = app.requests();
    assert_eq!(pushed.len(), 3, "{pushed:?}");
    let mut ids = Vec::new();
    for (n, request) in pushed.iter().enumerate() {
        assert_eq!((request.method.as_str(), request.path()), ("POST", "/api/sync"));
        let body = request.json();
        assert_eq!(body["page"], n + 1);
        ids.extend(body["items"].as_array().unwrap().iter().map(|item| item["id"].as_u64().unwrap()));
        let run_id = run["runId"].as_str().unwrap();
        assert_eq!(request.header("idempotency-key"), Some(format!("{run_id}:sync:{}", n + 1).as_str()));
        assert_eq!(request.header("authorization"), None, "the CMS token is for the CMS only");
    }
    assert_eq!(ids, [1, 2, 3, 4, 5]);
    assert_eq!(redis.cli(&["GET", "wfo:kv:cms-sync:cursor"]).trim(), "2024-05-01T10:00:09.000000Z");

    // Something changed: the cache is invalidated, which starts cache-warmup.
    let invalidated = events(&replica, "cache.invalidated");
    assert_eq!(invalidated.len(), 1, "{invalidated:?}");
    assert_eq!(invalidated[0]["payload"], json!({ "source": "cms-sync", "changed": 5 }));
    let warmed = wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
        let runs = runs_of(&replica, "cache-warmup");
        runs.iter().find(|r| r["status"] == "completed").cloned()
    })
    .expect("cache.invalidated starts cache-warmup, which completes");
    let warm_run = replica.run(warmed["runId"].as_str().unwrap());
    // cache-warmup is debounced: the run of the burst the event joined.
    assert_eq!(warm_run["trigger"]["kind"], "debounce", "{warm_run}");
    assert_eq!(warm_run["trigger"]["last"]["eventType"], "cache.invalidated", "{warm_run}");
    assert_eq!(step(&warm_run, "warm")["output"]["ok"], 2, "{warm_run}");
    assert_eq!(warm.requests().len(), 2);

    // The second sync asks from the new cursor, finds nothing, and announces nothing.
    let again = run_to_end(&replica, "cms-sync");
    assert_eq!(again["status"], "completed", "{again}");
    let sync = &step(&again, "sync")["output"];
    assert_eq!(sync["changed"], 0, "{sync}");
    assert_eq!(sync["pages"], 1, "{sync}");
    assert_eq!(sync["cursor"], "2024-05-01T10:00:09.000000Z");
    assert_eq!(sync["previousCursor"], "2024-05-01T10:00:09.000000Z");
    assert_eq!(step(&again, "announce")["output"], json!({ "skipped": true }));
    let asked = cms.requests();
    assert_eq!(asked.len(), 4);
    assert_eq!(param(&asked[3], "updated_since").as_deref(), Some("2024-05-01T10:00:09.000000Z"));
    assert_eq!(app.requests().len(), 3, "nothing new is pushed");
    assert_eq!(events(&replica, "cache.invalidated").len(), 1, "nothing changed: no second invalidation");

    // The token is never written down: not in the log, not in the runs.
    assert!(!replica.log_text().contains(CMS_TOKEN), "the CMS token is in the replica's log");
    assert!(!run.to_string().contains(CMS_TOKEN) && !again.to_string().contains(CMS_TOKEN));
}

#[test]
fn cms_sync_keeps_the_cursor_when_the_app_fails_and_the_retry_sends_it_all_again() {
    // The step's retry waits 10 s (plus jitter) before the second attempt.
    clear_of_cron(5, Duration::from_secs(60));
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let cms = fake_cms();
    let page_two_failed = Arc::new(AtomicBool::new(false));
    let failed = Arc::clone(&page_two_failed);
    // The app fails page 2 once (a 500), then accepts everything.
    let app = FakeServer::start(move |request| {
        if request.json()["page"] == 2 && !failed.swap(true, Ordering::SeqCst) {
            return (500, "application/json", br#"{"message":"Server Error"}"#.to_vec());
        }
        json_reply(json!({ "ok": true }))
    });
    let warm = FakeServer::ok();
    let file = file_of(dir.path(), &["cms-sync"], "");
    let config = cms_env(ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()), &cms, &app, &warm);
    let replica = config.start("cms-b");

    let run_id = replica.trigger("cms-sync", json!({}));
    let retrying = wait_for(Duration::from_secs(30), Duration::from_millis(50), || {
        let run = replica.run(&run_id);
        (run["status"] == "retrying").then_some(run)
    })
    .expect("the 500 makes the step retry");
    assert!(step(&retrying, "sync")["error"].as_str().unwrap().contains("answered 500"), "{retrying}");
    assert_eq!(redis.cli(&["EXISTS", "wfo:kv:cms-sync:cursor"]).trim(), "0", "the cursor must not advance");

    let run = replica.wait_terminal(&run_id, Duration::from_secs(60));
    assert_eq!(run["status"], "completed", "{run}");
    let sync = step(&run, "sync");
    assert_eq!(sync["attempts"], 2, "{run}");
    assert_eq!(sync["output"]["changed"], 5);
    // The retry asked from the old cursor (none), and sent every page again.
    let asked = cms.requests();
    let pages: Vec<String> = asked.iter().map(|r| param(r, "page").unwrap()).collect();
    assert_eq!(pages, ["1", "2", "1", "2", "3"]);
    assert!(asked.iter().all(|r| param(r, "updated_since").is_none()), "{asked:?}");
    let pushed = app.requests();
    let pushed_pages: Vec<Value> = pushed.iter().map(|r| r.json()["page"].clone()).collect();
    assert_eq!(pushed_pages, [json!(1), json!(2), json!(1), json!(2), json!(3)]);
    // A repeated page carries the same idempotency key, so the app can drop the repeat.
    assert_eq!(pushed[0].header("idempotency-key"), pushed[2].header("idempotency-key"));
    assert_eq!(pushed[1].header("idempotency-key"), pushed[3].header("idempotency-key"));
    assert_eq!(redis.cli(&["GET", "wfo:kv:cms-sync:cursor"]).trim(), "2024-05-01T10:00:09.000000Z");
    assert_eq!(events(&replica, "cache.invalidated").len(), 1);
}

#[test]
fn health_monitoring_alerts_only_after_the_flap_threshold_and_recovers_on_success() {
    // health-monitoring fires every minute: three runs must fit between two fires.
    clear_of_cron(1, Duration::from_secs(30));
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let healthy = FakeServer::ok();
    let broken = Arc::new(AtomicBool::new(true));
    let state = Arc::clone(&broken);
    let failing = FakeServer::start(move |_| {
        if state.load(Ordering::SeqCst) {
            (503, "text/plain", b"down for maintenance".to_vec())
        } else {
            (200, "text/plain", b"ok".to_vec())
        }
    });
    let hub = FakeServer::ok();
    let file = file_of(dir.path(), &["health-monitoring"], "");
    let (healthy_url, failing_url) = (healthy.url("/health"), failing.url("/health"));
    let replica = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path())
        .env("HEALTH_URLS", &format!("{healthy_url},{failing_url}"))
        .env("DOCKER_SOCKET", "/nonexistent")
        .env("NOTIFY_WEBHOOK_URL", &hub.url("/webhooks/orchestrator"))
        .env("WEBHOOK_SECRET", SECRET)
        .start("health");

    // First failure: below the threshold (2), no alert.
    let first = run_to_end(&replica, "health-monitoring");
    assert_eq!(first["status"], "completed", "{first}");
    let probe = &step(&first, "probe")["output"];
    let checks = probe["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 2, "{probe}");
    assert_eq!(
        (checks[0]["url"].as_str(), checks[0]["status"].as_u64(), checks[0]["ok"].as_bool()),
        (Some(healthy_url.as_str()), Some(200), Some(true))
    );
    assert_eq!(
        (checks[1]["url"].as_str(), checks[1]["status"].as_u64(), checks[1]["ok"].as_bool()),
        (Some(failing_url.as_str()), Some(503), Some(false))
    );
    assert!(checks.iter().all(|c| c["latencyMs"].is_u64()), "{probe}");
    assert_eq!(checks[1]["consecutiveFailures"], 1);
    assert_eq!(probe["alert"], false, "{probe}");
    assert_eq!(probe["failing"], json!([]));
    assert_eq!(probe["containers"], json!([]));
    assert_eq!(probe["docker"]["checked"], false, "no socket at /nonexistent: skipped");
    assert_eq!(step(&first, "degraded")["output"], json!({ "skipped": true }));
    assert_eq!(step(&first, "alert")["output"], json!({ "skipped": true }));
    assert!(hub.requests().is_empty());
    assert!(events(&replica, "performance.degraded").is_empty());

    // Second failure in a row: the alert, on the bus and to the Hub, signed.
    let second = run_to_end(&replica, "health-monitoring");
    assert_eq!(second["status"], "completed", "{second}");
    let probe = &step(&second, "probe")["output"];
    assert_eq!(probe["alert"], true, "{probe}");
    let failing_list = probe["failing"].as_array().unwrap();
    assert_eq!(failing_list.len(), 1, "{probe}");
    assert_eq!(failing_list[0]["target"], failing_url.as_str());
    assert_eq!(failing_list[0]["consecutiveFailures"], 2);
    assert!(failing_list[0]["reason"].as_str().unwrap().contains("503"), "{probe}");
    let degraded = events(&replica, "performance.degraded");
    assert_eq!(degraded.len(), 1, "{degraded:?}");
    assert_eq!(degraded[0]["payload"]["source"], "health-monitoring");
    assert_eq!(degraded[0]["payload"]["failing"], probe["failing"]);
    let notes = hub.requests();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(notes[0].path(), "/webhooks/orchestrator");
    assert_signed(&notes[0]);
    let note = notes[0].json();
    assert_eq!(note["channel"], "ops");
    assert_eq!(note["severity"], "critical");
    assert_eq!(note["workflowId"], "health-monitoring");
    assert_eq!(note["message"]["failing"], probe["failing"]);

    // The service is back: it recovers on its first success.
    broken.store(false, Ordering::SeqCst);
    let third = run_to_end(&replica, "health-monitoring");
    let probe = &step(&third, "probe")["output"];
    assert_eq!(probe["alert"], false, "{probe}");
    assert_eq!(probe["checks"][1]["consecutiveFailures"], 0);
    assert_eq!(hub.requests().len(), 1);
    assert_eq!(events(&replica, "performance.degraded").len(), 1);
}

#[test]
fn cache_warmup_reports_each_url_and_keeps_to_its_concurrency() {
    clear_of_cron(30, Duration::from_secs(30));
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (in_flight, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (now, max) = (Arc::clone(&in_flight), Arc::clone(&most));
    // Each answer takes a while, so that requests would pile up if the bound did not hold.
    let site = FakeServer::start(move |request| {
        let current = now.fetch_add(1, Ordering::SeqCst) + 1;
        max.fetch_max(current, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(150));
        now.fetch_sub(1, Ordering::SeqCst);
        if request.path() == "/missing" {
            (404, "text/plain", b"not found".to_vec())
        } else {
            (200, "text/html", vec![b'x'; 1000])
        }
    });
    let mut urls: Vec<String> = (0..7).map(|n| site.url(&format!("/page/{n}"))).collect();
    urls.insert(3, site.url("/missing"));
    let file = file_of(dir.path(), &["cache-warmup"], "");
    let replica = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path())
        .env("CACHE_WARMUP_URLS", &urls.join(","))
        .env("CACHE_WARMUP_CONCURRENCY", "2")
        .start("warm");

    let run = run_to_end(&replica, "cache-warmup");
    assert_eq!(run["status"], "completed", "{run}");
    let output = &step(&run, "warm")["output"];
    assert_eq!((output["ok"].as_u64(), output["failed"].as_u64()), (Some(7), Some(1)), "{output}");
    let results = output["results"].as_array().unwrap();
    let reported: Vec<&str> = results.iter().map(|r| r["url"].as_str().unwrap()).collect();
    assert_eq!(reported, urls.iter().map(String::as_str).collect::<Vec<_>>(), "results in the order of the URLs");
    for result in results {
        assert!(result["ms"].is_u64(), "each URL's time: {result}");
        let missing = result["url"].as_str().unwrap().ends_with("/missing");
        assert_eq!(result["status"], if missing { 404 } else { 200 }, "{result}");
        assert_eq!(result["ok"], !missing, "{result}");
    }
    assert_eq!(site.requests().len(), 8);
    let most = most.load(Ordering::SeqCst);
    assert!((1..=2).contains(&most), "at most 2 requests at a time, saw {most}");
}

#[test]
fn cache_warmup_fails_retryably_only_when_every_url_failed() {
    clear_of_cron(30, Duration::from_secs(30));
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let down = FakeServer::start(|_| (502, "text/plain", b"bad gateway".to_vec()));
    let file = file_of(dir.path(), &["cache-warmup"], "");
    let replica = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path())
        .env("CACHE_WARMUP_URLS", &format!("{},{}", down.url("/a"), down.url("/b")))
        .start("warm-down");
    let run_id = replica.trigger("cache-warmup", json!({}));
    // The step's retry waits 30 s; that it is retrying is what this test wants to see.
    let retrying = wait_for(Duration::from_secs(30), Duration::from_millis(50), || {
        let run = replica.run(&run_id);
        (run["status"] == "retrying").then_some(run)
    })
    .expect("every URL failed: the step retries");
    let error = step(&retrying, "warm")["error"].as_str().unwrap().to_owned();
    assert!(error.contains("all 2 URLs failed"), "{error}");
    assert_eq!(down.requests().len(), 2);
    let (status, body) = replica.post(&format!("/api/runs/{run_id}/cancel"), &json!({}));
    assert_eq!(status, 200, "{body}");
}

#[test]
fn performance_optimization_sends_the_housekeeping_report_to_the_hook() {
    clear_of_cron(15, Duration::from_secs(30));
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let hook = FakeServer::start(|_| json_reply(json!({ "optimized": ["opcache"] })));
    let file = file_of(dir.path(), &["performance-optimization"], "");
    let replica = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path())
        .env("OPTIMIZE_HOOK_URL", &hook.url("/api/internal/optimize"))
        .start("perf");

    // Started by the event health-monitoring publishes.
    let (status, body) = replica.post(
        "/api/events",
        &json!({ "eventType": "performance.degraded", "payload": { "source": "health-monitoring", "failing": [] } }),
    );
    assert!(status == 200 || status == 202, "{status} {body}");
    let started = wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
        runs_of(&replica, "performance-optimization").first().map(|r| r["runId"].as_str().unwrap().to_owned())
    })
    .expect("performance.degraded starts performance-optimization");
    let run = replica.wait_terminal(&started, Duration::from_secs(60));
    assert_eq!(run["status"], "completed", "{run}");
    let report = &step(&run, "housekeeping")["output"];
    for key in
        ["trimmedReadyEntries", "expiredRuns", "trimmedEvents", "readyPending", "eventsLength", "storeMemoryBytes"]
    {
        assert!(report.get(key).is_some(), "the housekeeping report has {key}: {report}");
    }
    assert!(report["storeMemoryBytes"].as_u64().is_some_and(|bytes| bytes > 0), "{report}");

    let calls = hook.requests();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!((calls[0].method.as_str(), calls[0].path()), ("POST", "/api/internal/optimize"));
    let body = calls[0].json();
    assert_eq!(&body["report"], report, "the hook gets the report");
    // performance-optimization is debounced: the run of the burst the event joined.
    assert_eq!(body["trigger"]["kind"], "debounce");
    assert_eq!(body["trigger"]["last"]["eventType"], "performance.degraded");
    assert_eq!(calls[0].header("idempotency-key"), Some(format!("{started}:optimize").as_str()));
    assert_eq!(step(&run, "optimize")["output"]["body"], json!({ "optimized": ["opcache"] }));
}

/// Two workflows of the test's own whose runs the digest counts.
const JOBS: &str = r#"
[[workflow]]
id = "good-job"
description = "completes"
[[workflow.step]]
id = "work"
action = "noop"

[[workflow]]
id = "bad-job"
description = "fails"
[[workflow.step]]
id = "work"
action = "exec"
with = { command = ["false"] }
retry = { max_attempts = 1 }
"#;

#[test]
fn notification_digest_counts_the_days_runs_and_sends_them_signed() {
    clear_of_cron(60, Duration::from_secs(60));
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let hub = FakeServer::ok();
    let file = file_of(dir.path(), &["notification-digest"], JOBS);
    let replica = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path())
        .env("NOTIFY_WEBHOOK_URL", &hub.url("/webhooks/orchestrator"))
        .env("WEBHOOK_SECRET", SECRET)
        .start("digest");
    for _ in 0..3 {
        assert_eq!(run_to_end(&replica, "good-job")["status"], "completed");
    }
    for _ in 0..2 {
        assert_eq!(run_to_end(&replica, "bad-job")["status"], "failed");
    }

    let run = run_to_end(&replica, "notification-digest");
    assert_eq!(run["status"], "completed", "{run}");
    let digest = &step(&run, "summary")["output"];
    assert_eq!(digest["hours"], 24);
    assert_eq!(digest["byWorkflow"]["good-job"], json!({ "completed": 3 }), "{digest}");
    assert_eq!(digest["byWorkflow"]["bad-job"], json!({ "failed": 2 }), "{digest}");
    let failures = digest["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 2, "{digest}");
    assert!(failures.iter().all(|f| f["workflowId"] == "bad-job"));
    assert!(digest["slowest"].as_array().is_some_and(|s| !s.is_empty()), "{digest}");

    let notes = hub.requests();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_signed(&notes[0]);
    let note = notes[0].json();
    assert_eq!(note["channel"], "ops");
    assert_eq!(note["workflowId"], "notification-digest");
    assert_eq!(&note["message"]["digest"], digest, "the Hub gets the digest");
}

#[test]
fn the_registry_lists_exactly_the_ten_workflows_with_the_specs_schedules() {
    // The default registry: no WORKFLOWS_FILE.
    let dir = tempfile::tempdir().unwrap();
    let replica = ReplicaConfig::new(None, None, dir.path()).start("registry");
    let (status, body) = replica.get("/api/workflows");
    assert_eq!(status, 200, "{body}");
    let listed: Vec<(String, Value, Value)> = body["workflows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["id"].as_str().unwrap().to_owned(), w["schedule"].clone(), w["events"].clone()))
        .collect();
    let expected: Vec<(String, Value, Value)> = [
        ("cms-sync", json!("*/5 * * * *"), json!(["cms.content.updated", "cms.service.created"])),
        ("database-backup", json!("0 2 * * *"), json!([])),
        ("health-monitoring", json!("* * * * *"), json!(["system.health.check"])),
        ("cache-warmup", json!("*/30 * * * *"), json!(["cache.invalidated", "deployment.completed"])),
        ("sales-operations", json!("0 8 * * 1-5"), json!(["sales.lead.created"])),
        ("log-rotation", json!("0 0 * * *"), json!([])),
        ("performance-optimization", json!("*/15 * * * *"), json!(["performance.degraded", "memory.high"])),
        ("user-onboarding", Value::Null, json!(["user.registered", "user.verified"])),
        ("notification-digest", json!("0 9 * * *"), json!([])),
        ("security-audit", json!("0 3 * * *"), json!(["security.alert"])),
    ]
    .into_iter()
    .map(|(id, schedule, events)| (id.to_owned(), schedule, events))
    .collect();
    let mut sorted = listed.clone();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut wanted = expected.clone();
    wanted.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(sorted, wanted, "{body}");
}
