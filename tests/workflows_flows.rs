//! The workflows that wait, end to end: user-onboarding, sales-operations and security-audit,
//! run by real replica processes on a real Redis, their outside services stood in for by
//! [`FakeServer`]s (the Communications Hub, Inngest, the app) and, for TLS, small rustls servers
//! of the test's own with certificates made here (rcgen). Then the engine's promises for parked
//! runs: `sleep` and `wait_for_event` survive a restart of every replica, and a run whose
//! replica is killed during its slowest step is resumed without repeating what it had done.
//!
//! Workflow entries are copied verbatim from the built-in registry; where a test needs a long
//! time-out to pass, it says so and shortens that one value in its copy. No test asserts on
//! how long anything took; every wait is bounded.

use crate::util::{FakeServer, Received, RedisServer, Replica, ReplicaConfig, wait_for, workflows_file};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_rustls::rustls;
use workflow_orchestrator::actions::sign;

// ---- the registry entries, verbatim ----

const USER_ONBOARDING: &str = r#"
[[workflow]]
id = "user-onboarding"
description = "New user welcome sequence"
events = ["user.registered", "user.verified"]
overlap = "allow"
[[workflow.step]]
id = "welcome"
action = "notify"
when = "${run.eventType} == user.registered"
with = { channel = "users", message = { template = "welcome", userId = "${input.userId}", email = "${input.email:-}" } }
[[workflow.step]]
id = "await-verification"
action = "wait_for_event"
when = "${run.eventType} == user.registered"
with = { event = "user.verified", correlate = { field = "userId", equals = "${input.userId}" }, timeout = "72h" }
[[workflow.step]]
id = "reminder"
action = "notify"
when = "${steps.await-verification.timedOut}"
with = { channel = "users", message = { template = "verify-reminder", userId = "${input.userId}", email = "${input.email:-}" } }
[[workflow.step]]
id = "getting-started"
action = "notify"
with = { channel = "users", message = { template = "getting-started", userId = "${input.userId}", email = "${input.email:-}" } }
"#;

const SALES_OPERATIONS: &str = r#"
[[workflow]]
id = "sales-operations"
description = "AI-powered Rayanava workflow"
schedule = "0 8 * * 1-5"
events = ["sales.lead.created"]
overlap = "skip"
[[workflow.step]]
id = "gather"
action = "builtin"
with = { name = "sales_leads", leads_url = "${env.SALES_LEADS_URL:-}", token = "${env.APP_API_TOKEN:-}" }
timeout = "2m"
[[workflow.step]]
id = "handoff"
action = "inngest"
when = "${steps.gather.count}"
with = { event = "rayanava/leads.received", data = { runId = "${run.id}", leads = "${steps.gather.leads}" } }
timeout = "1m"
[[workflow.step]]
id = "await-result"
action = "wait_for_event"
when = "${steps.gather.count}"
with = { event = "rayanava.leads.scored", correlate = { field = "runId", equals = "${run.id}" }, timeout = "30m" }
[[workflow.step]]
id = "notify-sales"
action = "notify"
when = "${steps.gather.count}"
with = { channel = "sales", message = { leads = "${steps.gather.count}", timedOut = "${steps.await-result.timedOut}", result = "${steps.await-result.event.payload}" } }
"#;

const SECURITY_AUDIT: &str = r#"
[[workflow]]
id = "security-audit"
description = "Security compliance checks"
schedule = "0 3 * * *"
events = ["security.alert"]
overlap = "skip"
[[workflow.step]]
id = "audit"
action = "builtin"
with = { name = "security_audit", urls = "${env.SECURITY_AUDIT_URLS:-}", cert_warn_days = 21, backup_dir = "${env.BACKUP_DIR:-}", backup_max_age = "26h" }
timeout = "5m"
[[workflow.step]]
id = "report"
action = "notify"
when = "${steps.audit.total}"
with = { channel = "security", severity = "${steps.audit.severity}", message = { findings = "${steps.audit.findings}", counts = "${steps.audit.counts}" } }
"#;

/// A copy of a registry entry with one long time-out shortened (the test says which).
fn shortened(entry: &str, from: &str, to: &str) -> String {
    let needle = format!("timeout = \"{from}\"");
    assert!(entry.contains(&needle), "the entry has no `{needle}`");
    entry.replace(&needle, &format!("timeout = \"{to}\""))
}

// ---- the outside world ----

const WEBHOOK_SECRET: &str = "hub-secret-for-tests";
const INNGEST_EVENT_KEY: &str = "test-event-key";
const INNGEST_SIGNING_KEY: &str = "signkey-test-5eed0123abcd";
/// The part of the signing key that keys the HMAC (after `signkey-<env>-`).
const INNGEST_HMAC_KEY: &str = "5eed0123abcd";
const APP_API_TOKEN: &str = "app-token-for-tests";

const LIMIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);

/// A private Redis, a directory, the outside services and a replica configuration pointing at
/// them.
struct World {
    redis: RedisServer,
    _dir: tempfile::TempDir,
    hub: FakeServer,
    inngest: FakeServer,
    app: FakeServer,
    config: ReplicaConfig,
}

impl World {
    fn new(workflows: &str) -> World {
        let redis = RedisServer::start();
        let dir = tempfile::tempdir().unwrap();
        let file = workflows_file(dir.path(), workflows);
        let hub = FakeServer::ok();
        let inngest = FakeServer::start(|_| (200, "application/json", br#"{"ids":["01"],"status":200}"#.to_vec()));
        let app = FakeServer::start(|_| {
            let leads = json!({ "data": [
                { "id": 101, "email": "first@example.com", "company": "Acme" },
                { "id": 102, "email": "second@example.com", "company": "Globex" },
            ] });
            (200, "application/json", leads.to_string().into_bytes())
        });
        let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path())
            .env("NOTIFY_WEBHOOK_URL", &hub.url("/webhooks/molochain"))
            .env("WEBHOOK_SECRET", WEBHOOK_SECRET)
            .env("INNGEST_BASE_URL", &inngest.url(""))
            .env("INNGEST_EVENT_KEY", INNGEST_EVENT_KEY)
            .env("INNGEST_SIGNING_KEY", INNGEST_SIGNING_KEY)
            .env("SALES_LEADS_URL", &app.url("/api/leads/new?status=new"))
            .env("APP_API_TOKEN", APP_API_TOKEN);
        World { redis, _dir: dir, hub, inngest, app, config }
    }

    /// `XADD wfo:events * type <type> payload <payload>`, as a producer would; the entry id.
    fn xadd(&self, event_type: &str, payload: &Value) -> String {
        let id = self.redis.cli(&["XADD", "wfo:events", "*", "type", event_type, "payload", &payload.to_string()]);
        let id = id.trim().to_owned();
        assert!(id.contains('-'), "XADD answered {id:?}");
        id
    }

    /// The messages the Hub received, each checked for its signature.
    fn notifications(&self) -> Vec<Value> {
        self.hub.requests().iter().map(signed_notification).collect()
    }

    /// Waits (bounded) for a notification satisfying `wanted`.
    fn await_notification(&self, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        wait_for(LIMIT, POLL, || self.notifications().into_iter().find(|n| wanted(n))).unwrap_or_else(|| {
            panic!("no notification {what} within {LIMIT:?}; the Hub got: {:#?}", self.notifications())
        })
    }
}

/// A Hub request's JSON body, after checking `X-Molochain-Signature: sha256=<HMAC of the body>`.
fn signed_notification(request: &Received) -> Value {
    assert_eq!(request.method, "POST");
    assert_eq!(request.path(), "/webhooks/molochain");
    let signature = request.header("x-molochain-signature").unwrap_or_else(|| panic!("unsigned: {request:?}"));
    assert_eq!(signature, sign(WEBHOOK_SECRET, &request.body), "a wrong signature on {}", request.json());
    request.json()
}

fn template_for(notification: &Value, template: &str, user: u64) -> bool {
    notification["message"]["template"] == template && notification["message"]["userId"] == user
}

/// Every run of a workflow, as full views (`GET /api/runs/:id`).
fn runs_of(replica: &Replica, workflow: &str) -> Vec<Value> {
    let (status, body) = replica.get(&format!("/api/runs?workflowId={workflow}&limit=500"));
    assert_eq!(status, 200, "{body}");
    let ids: Vec<String> =
        body["runs"].as_array().unwrap().iter().map(|r| r["runId"].as_str().unwrap().to_owned()).collect();
    ids.iter().map(|id| replica.run(id)).collect()
}

/// Waits (bounded) for the run of `workflow` whose input satisfies `wanted` to reach `status`.
fn await_run(replica: &Replica, workflow: &str, status: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    wait_for(LIMIT, POLL, || {
        runs_of(replica, workflow).into_iter().find(|r| wanted(&r["input"]) && r["status"] == status)
    })
    .unwrap_or_else(|| {
        panic!("no {status} run of {workflow} as wanted within {LIMIT:?}: {:#?}", runs_of(replica, workflow))
    })
}

fn await_status(replica: &Replica, run_id: &str, status: &str) -> Value {
    wait_for(LIMIT, POLL, || Some(replica.run(run_id)).filter(|r| r["status"] == status))
        .unwrap_or_else(|| panic!("run {run_id} is not {status} within {LIMIT:?}: {}", replica.run(run_id)))
}

fn step<'a>(run: &'a Value, id: &str) -> &'a Value {
    run["steps"].as_array().unwrap().iter().find(|s| s["id"] == id).unwrap_or_else(|| panic!("no step {id}: {run}"))
}

/// The event `id` as `GET /api/events` lists it, once the router has handled it.
fn handled_event(replica: &Replica, event_type: &str, id: &str) -> Value {
    wait_for(LIMIT, POLL, || {
        let (_, body) = replica.get(&format!("/api/events?type={event_type}&limit=500"));
        body["events"].as_array()?.iter().find(|e| e["eventId"] == id && e["handled"] == true).cloned()
    })
    .unwrap_or_else(|| panic!("event {id} not handled within {LIMIT:?}"))
}

fn unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// POSTs an Inngest callback, signed `t=<secs>&s=<hex HMAC-SHA256 of body + t>` with `key`.
fn inngest_callback(replica: &Replica, body: &Value, key: &str) -> (u16, Value) {
    let bytes = body.to_string();
    let t = unix_secs().to_string();
    let signature = sign(key, format!("{bytes}{t}").as_bytes());
    let signature = signature.trim_start_matches("sha256=");
    crate::util::http(
        ureq::post(&format!("{}/api/webhooks/inngest", replica.base()))
            .set("Content-Type", "application/json")
            .set("X-Inngest-Signature", &format!("t={t}&s={signature}"))
            .send_string(&bytes),
    )
}

// ---- user-onboarding ----

#[test]
fn user_onboarding_welcomes_waits_for_the_same_users_verification_then_gets_started() {
    let world = World::new(USER_ONBOARDING);
    let replicas = [world.config.start("a"), world.config.start("b")];
    let api = &replicas[0];

    world.xadd("user.registered", &json!({ "userId": 7, "email": "a@b" }));
    let welcome = world.await_notification("welcoming user 7", |n| template_for(n, "welcome", 7));
    assert_eq!(welcome["channel"], "users");
    assert_eq!(welcome["message"], json!({ "template": "welcome", "userId": 7, "email": "a@b" }));
    assert_eq!(welcome["workflowId"], "user-onboarding");
    let run7 = await_run(api, "user-onboarding", "waiting", |input| input["userId"] == 7);
    let run7_id = run7["runId"].as_str().unwrap().to_owned();
    assert_eq!(step(&run7, "await-verification")["status"], "waiting", "{run7}");

    // Another user's verification does not wake user 7's run, and starts a short run of its own.
    let other = world.xadd("user.verified", &json!({ "userId": 8, "email": "c@d" }));
    world.await_notification("getting user 8 started", |n| template_for(n, "getting-started", 8));
    let run8 = await_run(api, "user-onboarding", "completed", |input| input["userId"] == 8);
    for skipped in ["welcome", "await-verification", "reminder"] {
        assert_eq!(step(&run8, skipped)["output"], json!({ "skipped": true }), "{run8}");
    }
    let listed = handled_event(api, "user.verified", &other);
    assert_eq!(listed["runs"].as_array().map(Vec::len), Some(1), "user 8's verification started one run: {listed}");
    assert_eq!(api.run(&run7_id)["status"], "waiting", "user 8's verification must not wake user 7's run");

    // User 7's verification wakes the waiting run: getting started, no reminder, no new run.
    let verified = world.xadd("user.verified", &json!({ "userId": 7, "email": "a@b" }));
    let run7 = await_status(&replicas[1], &run7_id, "completed");
    let awaited = &step(&run7, "await-verification")["output"];
    assert_eq!(awaited["timedOut"], false, "{run7}");
    assert_eq!(awaited["event"]["id"], verified.as_str());
    assert_eq!(awaited["event"]["payload"]["userId"], 7);
    assert_eq!(step(&run7, "reminder")["output"], json!({ "skipped": true }), "{run7}");
    let listed = handled_event(api, "user.verified", &verified);
    assert_eq!(listed["runs"], json!([]), "the verification that woke a run starts none: {listed}");
    assert_eq!(runs_of(api, "user-onboarding").len(), 2, "one run per user");

    let sent: Vec<(String, u64)> = world
        .notifications()
        .iter()
        .map(|n| (n["message"]["template"].as_str().unwrap().to_owned(), n["message"]["userId"].as_u64().unwrap()))
        .collect();
    let expected = [("welcome", 7), ("getting-started", 8), ("getting-started", 7)];
    assert_eq!(sent, expected.map(|(t, u)| (t.to_owned(), u)), "what the Hub got, in order");
}

#[test]
fn user_onboarding_reminds_a_user_who_never_verifies() {
    // The registry's 72h wait, shortened to 2s.
    let world = World::new(&shortened(USER_ONBOARDING, "72h", "2s"));
    let replica = world.config.start("a");

    world.xadd("user.registered", &json!({ "userId": 9, "email": "late@b" }));
    let run = await_run(&replica, "user-onboarding", "completed", |input| input["userId"] == 9);
    assert_eq!(step(&run, "await-verification")["output"], json!({ "timedOut": true, "event": null }), "{run}");
    let sent: Vec<Value> = world.notifications().iter().map(|n| n["message"].clone()).collect();
    assert_eq!(
        sent,
        ["welcome", "verify-reminder", "getting-started"]
            .map(|t| json!({ "template": t, "userId": 9, "email": "late@b" })),
        "welcome, then (the wait timed out) the reminder, then getting started"
    );
}

// ---- sales-operations ----

fn handoffs(world: &World) -> Vec<Received> {
    world.inngest.requests()
}

#[test]
fn sales_operations_hands_a_new_lead_to_rayanava_and_reports_its_scores() {
    let world = World::new(SALES_OPERATIONS);
    let replicas = [world.config.start("a"), world.config.start("b")];
    let api = &replicas[0];

    let lead = json!({ "id": 42, "email": "lead@example.com", "name": "Ada", "source": "website" });
    world.xadd("sales.lead.created", &lead);
    let handoff = wait_for(LIMIT, POLL, || handoffs(&world).into_iter().next())
        .unwrap_or_else(|| panic!("Inngest received nothing within {LIMIT:?}"));
    assert_eq!(handoff.method, "POST");
    assert_eq!(handoff.path(), format!("/e/{INNGEST_EVENT_KEY}"));
    let sent = handoff.json();
    assert_eq!(sent["name"], "rayanava/leads.received");
    assert_eq!(sent["data"]["leads"], json!([lead]), "the event's lead, as it came");
    let run_id = sent["data"]["runId"].as_str().expect("the runId goes along").to_owned();
    assert_eq!(sent["id"], format!("{run_id}:handoff"), "the step's idempotency key is the Inngest event id");
    assert!(world.app.requests().is_empty(), "the lead came with the event: the app is not asked");

    let run = await_status(api, &run_id, "waiting");
    assert_eq!(step(&run, "gather")["output"]["source"], "event");

    let callback = json!({
        "name": "rayanava/leads.scored",
        "data": { "runId": run_id, "scores": [{ "id": 42, "score": 0.93, "tier": "hot" }] },
        "id": "01HSCORED",
    });
    // A callback signed with another key is refused, and wakes nothing.
    let (status, body) = inngest_callback(api, &callback, "not-the-key");
    assert_eq!(status, 401, "{body}");
    let (status, body) = crate::util::http(
        ureq::post(&format!("{}/api/webhooks/inngest", api.base())).send_string(&callback.to_string()),
    );
    assert_eq!(status, 401, "unsigned: {body}");
    assert_eq!(api.run(&run_id)["status"], "waiting");

    let (status, body) = inngest_callback(&replicas[1], &callback, INNGEST_HMAC_KEY);
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["eventType"], "rayanava.leads.scored");
    let run = await_status(api, &run_id, "completed");
    assert_eq!(step(&run, "await-result")["output"]["timedOut"], false, "{run}");

    let notification = world.await_notification("to the sales channel", |n| n["channel"] == "sales");
    assert_eq!(notification["runId"], run_id.as_str());
    assert_eq!(
        notification["message"],
        json!({ "leads": 1, "timedOut": false, "result": callback["data"] }),
        "the sales channel gets Rayanava's result"
    );
    assert_eq!(world.notifications().len(), 1);
    assert_eq!(handoffs(&world).len(), 1);
}

#[test]
fn sales_operations_gathers_leads_from_the_app_and_reports_a_timed_out_wait() {
    // The registry's 30m wait for Rayanava, shortened to 2s.
    let world = World::new(&shortened(SALES_OPERATIONS, "30m", "2s"));
    let replica = world.config.start("a");

    // The weekday-morning way: no lead in the input, so the app's new-leads endpoint is asked.
    let run_id = replica.trigger("sales-operations", json!({}));
    let run = replica.wait_terminal(&run_id, LIMIT);
    assert_eq!(run["status"], "completed", "{run}");

    let asked = world.app.requests();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!((asked[0].method.as_str(), asked[0].target.as_str()), ("GET", "/api/leads/new?status=new"));
    assert_eq!(asked[0].header("authorization"), Some(format!("Bearer {APP_API_TOKEN}").as_str()));
    let gathered = &step(&run, "gather")["output"];
    assert_eq!((gathered["count"].as_u64(), gathered["source"].as_str()), (Some(2), Some("api")), "{gathered}");

    let handoff = handoffs(&world);
    assert_eq!(handoff.len(), 1);
    assert_eq!(handoff[0].json()["data"]["leads"].as_array().map(Vec::len), Some(2));
    assert_eq!(step(&run, "await-result")["output"], json!({ "timedOut": true, "event": null }));
    let notification = world.await_notification("to the sales channel", |n| n["channel"] == "sales");
    assert_eq!(notification["message"], json!({ "leads": 2, "timedOut": true, "result": null }));
}

// ---- security-audit ----

/// A loopback HTTPS server (rustls) answering every request 200 with every security header.
struct TlsServer {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl TlsServer {
    fn start(chain: Vec<rustls::pki_types::CertificateDer<'static>>, key: Vec<u8>) -> TlsServer {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.into());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("a certificate and key");
        let config = Arc::new(config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        std::thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let config = Arc::clone(&config);
                std::thread::spawn(move || {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    let Ok(connection) = rustls::ServerConnection::new(config) else { return };
                    let mut tls = rustls::StreamOwned::new(connection, stream);
                    let mut request = Vec::new();
                    let mut chunk = [0u8; 4096];
                    // Up to the end of the headers (the audit's certificate check sends none).
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 64 * 1024 {
                        match tls.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let response = "HTTP/1.1 200 OK\r\n\
                        content-type: text/plain\r\n\
                        strict-transport-security: max-age=63072000; includeSubDomains\r\n\
                        x-content-type-options: nosniff\r\n\
                        content-security-policy: default-src 'self'; frame-ancestors 'none'\r\n\
                        content-length: 2\r\nconnection: close\r\n\r\nok";
                    let _ = tls.write_all(response.as_bytes());
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                });
            }
        });
        TlsServer { port, stop }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/", self.port)
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A test CA (written as PEM to `dir/ca.pem`, for `SSL_CERT_FILE`) and a function making leaf
/// certificates for 127.0.0.1 signed by it, valid from `from` to `until` days from today.
fn test_ca(dir: &Path) -> impl Fn(i64, i64) -> (Vec<rustls::pki_types::CertificateDer<'static>>, Vec<u8>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, "workflow-orchestrator test CA");
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca = rcgen::CertifiedIssuer::self_signed(params, ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    move |from: i64, until: i64| {
        let day = |offset: i64| {
            let date = (chrono::Utc::now() + chrono::Duration::days(offset)).date_naive();
            use chrono::Datelike;
            rcgen::date_time_ymd(date.year(), date.month() as u8, date.day() as u8)
        };
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, "127.0.0.1");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = day(from);
        params.not_after = day(until);
        let leaf = params.signed_by(&key, &*ca).unwrap();
        (vec![leaf.der().clone(), ca.der().clone()], key.serialize_der())
    }
}

#[test]
fn security_audit_reports_certificates_headers_the_store_and_backups_by_severity() {
    let dir = tempfile::tempdir().unwrap();
    let leaf = test_ca(dir.path());
    let (chain, key) = leaf(-30, 5);
    let expiring = TlsServer::start(chain, key);
    let (chain, key) = leaf(-60, -2);
    let expired = TlsServer::start(chain, key);
    // Plain http, no security header at all (the FakeServer sends only the content headers).
    let bare = FakeServer::ok();
    let backups = tempfile::tempdir().unwrap();
    let old = std::fs::File::create(backups.path().join("molochain-20240101T020000Z.dump")).unwrap();
    old.set_modified(SystemTime::now() - Duration::from_secs(3 * 24 * 3600)).unwrap();

    let world = World::new(SECURITY_AUDIT);
    let urls = [bare.url("/health"), expiring.url(), expired.url()];
    let config = world
        .config
        .clone()
        .env("SECURITY_AUDIT_URLS", &urls.join(","))
        .env("BACKUP_DIR", &backups.path().display().to_string())
        .env("SSL_CERT_FILE", &dir.path().join("ca.pem").display().to_string());
    let replica = config.start("a");
    // A Redis that may evict keys (ours has no password either).
    assert_eq!(world.redis.cli(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]).trim(), "OK");

    world.xadd("security.alert", &json!({ "reason": "test" }));
    let run = await_run(&replica, "security-audit", "completed", |_| true);
    let audit = &step(&run, "audit")["output"];
    let findings: Vec<(String, String, String)> = audit["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let text = |k: &str| f[k].as_str().unwrap_or_default().to_owned();
            (text("severity"), text("check"), text("target"))
        })
        .collect();
    let bare_target = bare.url("/health");
    let (expiring_target, expired_target) = (expiring.url(), expired.url());
    let redis = "redis".to_owned();
    let backup_dir = backups.path().display().to_string();
    let expected: Vec<(&str, &str, &String)> = vec![
        ("critical", "tls-certificate", &expired_target),
        ("critical", "store", &redis),
        ("critical", "backup", &backup_dir),
        ("warning", "security-headers", &bare_target),
        ("warning", "security-headers", &bare_target),
        ("warning", "security-headers", &bare_target),
        ("warning", "tls-certificate", &expiring_target),
        ("warning", "store", &redis),
        ("info", "tls-certificate", &bare_target),
    ];
    let mut sorted = findings.clone();
    sorted.sort();
    let mut expected: Vec<(String, String, String)> =
        expected.into_iter().map(|(s, c, t)| (s.to_owned(), c.to_owned(), t.clone())).collect();
    expected.sort();
    assert_eq!(sorted, expected, "findings: {:#}", audit["findings"]);
    // Ordered by severity, critical first.
    let rank = |s: &str| ["critical", "warning", "info"].iter().position(|x| *x == s).unwrap();
    assert!(findings.windows(2).all(|w| rank(&w[0].0) <= rank(&w[1].0)), "{findings:?}");
    assert_eq!(audit["counts"], json!({ "critical": 3, "warning": 5, "info": 1 }));
    assert_eq!((audit["total"].as_u64(), audit["severity"].as_str()), (Some(9), Some("critical")));
    let message = |target: &String, check: &str| {
        audit["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["target"] == target.as_str() && f["check"] == check)
            .map(|f| f["message"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
            .join(" | ")
    };
    assert!(
        message(&expired_target, "tls-certificate").contains("expired on"),
        "{}",
        message(&expired_target, "tls-certificate")
    );
    let soon = message(&expiring_target, "tls-certificate");
    assert!(soon.contains("expires on") && soon.contains("days"), "{soon}");
    let headers = message(&bare_target, "security-headers");
    for header in ["X-Content-Type-Options", "X-Frame-Options", "Content-Security-Policy"] {
        assert!(headers.contains(header), "{headers}");
    }
    assert!(!headers.contains("Strict-Transport-Security"), "HSTS is not asked of plain http: {headers}");
    assert!(message(&backup_dir, "backup").contains("molochain-20240101T020000Z.dump"));
    assert!(message(&redis, "store").contains("evict"));
    // The certificate that verifies (through the test CA) is judged by its date alone.
    let checked = &audit["checked"]["urls"];
    assert_eq!(checked[1]["certificate"]["chainValid"], true, "{checked}");

    let notification = world.await_notification("to the security channel", |n| n["channel"] == "security");
    assert_eq!(notification["severity"], "critical");
    assert_eq!(notification["message"]["counts"], audit["counts"]);
    assert_eq!(notification["message"]["findings"], audit["findings"], "the findings, by severity");
}

// ---- parked runs survive every replica ----

const PARKED: &str = r#"
[[workflow]]
id = "napper"
[[workflow.step]]
id = "nap"
action = "sleep"
with = { duration = "3s" }
[[workflow.step]]
id = "after-nap"
action = "noop"

[[workflow]]
id = "waiter"
[[workflow.step]]
id = "wait"
action = "wait_for_event"
with = { event = "order.paid", correlate = { field = "orderId", equals = "${input.orderId}" }, timeout = "1h" }
[[workflow.step]]
id = "after-wait"
action = "noop"
"#;

#[test]
fn sleep_and_wait_for_event_survive_a_restart_of_every_replica() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = workflows_file(dir.path(), PARKED);
    let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path());
    let mut old = [config.start("a"), config.start("b")];

    let napper = old[0].trigger("napper", json!({}));
    let waiter = old[1].trigger("waiter", json!({ "orderId": "o-1" }));
    await_status(&old[0], &napper, "sleeping");
    await_status(&old[0], &waiter, "waiting");
    for replica in &mut old {
        replica.kill9();
    }

    let new = [config.start("c"), config.start("d")];
    let napped = new[0].wait_terminal(&napper, LIMIT);
    assert_eq!(napped["status"], "completed", "{napped}");
    assert!(step(&napped, "nap")["output"]["sleptUntil"].is_string(), "{napped}");
    assert_eq!(new[1].run(&waiter)["status"], "waiting", "no event yet");

    // An event for another order leaves it waiting; its own wakes it.
    redis.cli(&["XADD", "wfo:events", "*", "type", "order.paid", "payload", r#"{"orderId":"o-2"}"#]);
    redis.cli(&["XADD", "wfo:events", "*", "type", "order.paid", "payload", r#"{"orderId":"o-1","amount":12}"#]);
    let woken = new[1].wait_terminal(&waiter, LIMIT);
    assert_eq!(woken["status"], "completed", "{woken}");
    let output = &step(&woken, "wait")["output"];
    assert_eq!(
        (output["timedOut"].as_bool(), &output["event"]["payload"]),
        (Some(false), &json!({ "orderId": "o-1", "amount": 12 }))
    );
    for (run, replica, parked, woke) in
        [(&napper, &new[0], "step_sleeping", "timer_fired"), (&waiter, &new[1], "step_waiting", "event_received")]
    {
        let kinds: Vec<String> =
            replica.history(run).iter().map(|t| t["type"].as_str().unwrap_or_default().to_owned()).collect();
        let count = |kind: &str| kinds.iter().filter(|k| *k == kind).count();
        assert_eq!((count(parked), count(woke)), (1, 1), "parked once, woken once: {kinds:?}");
        assert_eq!(kinds.last().map(String::as_str), Some("run_completed"), "{kinds:?}");
    }
}

// ---- a replica killed during the slowest step ----

#[test]
fn a_run_whose_replica_is_killed_during_its_slowest_step_is_resumed_without_repeating_steps() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let service = FakeServer::ok();
    let toml = format!(
        r#"
[[workflow]]
id = "slow-middle"
[[workflow.step]]
id = "first"
action = "http"
with = {{ method = "POST", url = "{first}", body = {{ run = "${{run.id}}" }} }}
[[workflow.step]]
id = "slow"
action = "exec"
with = {{ command = ["sh", "-c", "echo $PPID >> pids; exec sleep 3"], cwd = "{dir}" }}
[[workflow.step]]
id = "last"
action = "http"
with = {{ method = "POST", url = "{last}", body = {{ run = "${{run.id}}" }} }}
"#,
        first = service.url("/first"),
        last = service.url("/last"),
        dir = dir.path().display()
    );
    let file = workflows_file(dir.path(), &toml);
    // A short lease, so that the survivor takes the step over soon.
    let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()).env("LEASE_TTL", "2s");
    let mut replicas = [config.start("a"), config.start("b")];

    let run_id = replicas[0].trigger("slow-middle", json!({}));
    let pids = dir.path().join("pids");
    let runner: i32 = wait_for(LIMIT, POLL, || std::fs::read_to_string(&pids).ok()?.trim().parse().ok())
        .expect("the slow step started");
    let victim = replicas.iter().position(|r| r.pid() == runner).expect("the slow step runs in one of our replicas");
    replicas[victim].kill9();
    let survivor = &replicas[1 - victim];

    let run = survivor.wait_terminal(&run_id, LIMIT);
    assert_eq!(run["status"], "completed", "{run}");
    let started: Vec<i32> =
        std::fs::read_to_string(&pids).unwrap().split_whitespace().map(|p| p.parse().unwrap()).collect();
    assert_eq!(started, [runner, survivor.pid()], "the slow step ran again, on the survivor");

    let requests = service.requests();
    let keys = |path: &str| -> Vec<String> {
        requests
            .iter()
            .filter(|r| r.path() == path)
            .map(|r| r.header("idempotency-key").unwrap_or("").to_owned())
            .collect()
    };
    assert_eq!(keys("/first"), [format!("{run_id}:first")], "the first step is not repeated");
    assert_eq!(keys("/last"), [format!("{run_id}:last")]);
    let history = survivor.history(&run_id);
    for id in ["first", "slow", "last"] {
        let completions = history.iter().filter(|t| t["type"] == "step_completed" && t["step"] == id).count();
        assert_eq!(completions, 1, "one completion of {id}: {history:#?}");
    }
    assert_eq!(history.last().map(|t| t["type"].clone()), Some(json!("run_completed")));
}
