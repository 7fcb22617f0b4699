//! The event bus against hostile and oversized entries (issue 8), against a served binary on a
//! private redis-server, with entries written as any producer would (`redis-cli`, or the Redis
//! protocol over a `TcpStream` for entries too large for a command line):
//! - an entry with an id at the very end of the id space, or far ahead of the clock, does not
//!   stop `POST /api/events` nor `publish` steps: it is dead-lettered and removed, the stream's
//!   last id is set back, and `/health` and `/metrics` report it;
//! - entries of 20 MB are never read whole by a replica: its memory stays put, each is
//!   dead-lettered as a bounded prefix with a reason naming its size and the limit, and the
//!   listings answer bounded bodies.
//!
//! Every wait is bounded; nothing asserts on how long anything took.

use crate::util::{RedisServer, Replica, ReplicaConfig, http, wait_for, workflows_file};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `bus.ping` starts `relay`, whose `publish` step sends `bus.pong`, which starts `ponged`.
const WORKFLOWS: &str = r#"
[[workflow]]
id = "relay"
events = ["bus.ping"]
[[workflow.step]]
id = "forward"
action = "publish"
with = { event = "bus.pong", payload = { from = "relay" } }

[[workflow]]
id = "ponged"
events = ["bus.pong"]
[[workflow.step]]
id = "only"
action = "noop"

[[workflow]]
id = "sized"
events = ["bus.sized"]
[[workflow.step]]
id = "only"
action = "noop"
"#;

/// The end of the stream id space: Redis can give no id after it.
const LAST_ID: &str = "18446744073709551615-18446744073709551615";
const MB: usize = 1024 * 1024;

struct Service {
    replica: Replica,
    redis: RedisServer,
    _dir: tempfile::TempDir,
}

impl Service {
    fn start() -> Service {
        let redis = RedisServer::start();
        let dir = tempfile::tempdir().expect("tempdir");
        let file = workflows_file(dir.path(), WORKFLOWS);
        let replica = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()).start("bus");
        Service { replica, redis, _dir: dir }
    }

    fn publish(&self, event_type: &str, payload: Value) -> (u16, Value) {
        self.replica.post("/api/events", &json!({ "eventType": event_type, "payload": payload }))
    }

    fn runs(&self, workflow: &str, status: &str) -> Vec<Value> {
        let (code, body) = self.replica.get(&format!("/api/runs?workflowId={workflow}&status={status}"));
        assert_eq!(code, 200, "{body}");
        body["runs"].as_array().cloned().unwrap_or_default()
    }

    fn dead_letters(&self) -> Vec<Value> {
        let (code, body) = self.replica.get("/api/events/dead?limit=500");
        assert_eq!(code, 200, "{body}");
        body["deadLetters"].as_array().cloned().unwrap_or_default()
    }

    /// A route's raw body, read up to 64 MiB (so that an unbounded answer shows as large).
    fn body_len(&self, path: &str) -> usize {
        let response = ureq::get(&format!("{}{path}", self.replica.base())).call().expect("GET answers 200");
        let mut body = Vec::new();
        response.into_reader().take(64 * MB as u64).read_to_end(&mut body).expect("read the body");
        serde_json::from_slice::<Value>(&body).expect("the body is JSON");
        body.len()
    }

    fn metric(&self, name: &str) -> Option<u64> {
        let text = ureq::get(&format!("{}/metrics", self.replica.base())).call().ok()?.into_string().ok()?;
        text.lines().find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn id_ms(id: &str) -> u64 {
    id.split_once('-').and_then(|(ms, _)| ms.parse().ok()).unwrap_or(0)
}

/// Writes `hostile` as the id of a bus entry, then shows that the service keeps publishing: a
/// REST event starts its run, whose `publish` step starts another, ids are by the clock again,
/// the entry is dead-lettered with its reason, and `/health` and `/metrics` say so.
fn bus_survives(hostile: &str) {
    let service = Service::start();
    // The router group exists once the replica serves.
    let written = service.redis.cli(&["XADD", "wfo:events", hostile, "type", "x", "payload", "{}"]);
    assert_eq!(written.trim(), hostile, "the hostile XADD was taken");

    let (code, body) = service.publish("bus.ping", json!({ "n": 1 }));
    assert_eq!(code, 202, "POST /api/events after a hostile entry: {body}");
    let event_id = body["eventId"].as_str().expect("eventId").to_owned();
    let ahead = id_ms(&event_id).abs_diff(now_ms());
    assert!(ahead < 60_000, "the event's id {event_id} is by the clock");

    // The event starts `relay`, whose `publish` step starts `ponged`.
    wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
        (!service.runs("ponged", "completed").is_empty()).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the publish step did not chain: relay {:?}, ponged {:?}; log:\n{}",
            service.runs("relay", "failed"),
            service.runs("ponged", "completed"),
            service.replica.log_text()
        )
    });
    assert_eq!(service.runs("relay", "completed").len(), 1);

    let letter = wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
        service.dead_letters().into_iter().find(|letter| letter["eventId"] == hostile)
    })
    .expect("the hostile entry is dead-lettered");
    let reason = letter["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("ahead of the store's clock"), "{letter}");
    assert!(service.redis.cli(&["XRANGE", "wfo:events", hostile, hostile]).trim().is_empty(), "it left the bus");

    // Anyone's `XADD *` gets an id by the clock again.
    let next = service.redis.cli(&["XADD", "wfo:events", "*", "type", "bus.other"]);
    assert!(id_ms(next.trim()).abs_diff(now_ms()) < 60_000, "XADD * answered {next}");

    let (code, health) = service.replica.get("/health");
    assert_eq!(code, 200, "{health}");
    assert_eq!(health["status"], "ok", "{health}");
    assert!(health["bus"]["hostileEntriesRemoved"].as_u64() >= Some(1), "{health}");
    assert_eq!(health["bus"]["lastHostileEntry"], hostile, "{health}");
    let warned = health["warnings"].as_array().is_some_and(|w| {
        w.iter().any(|w| w.as_str().is_some_and(|w| w.contains("ahead of the clock") && w.contains(hostile)))
    });
    assert!(warned, "/health warns: {health}");
    assert!(service.metric("wfo_events_hostile_removed_total ") >= Some(1), "/metrics counts it");
}

#[test]
fn an_entry_at_the_end_of_the_id_space_does_not_stop_the_bus() {
    bus_survives(LAST_ID);
}

#[test]
fn an_entry_far_ahead_of_the_clock_does_not_stop_the_bus() {
    bus_survives(&format!("{}-0", now_ms() + 86_400_000));
}

/// A hostile entry written while no replica runs: the first `POST /api/events` repairs the bus
/// itself (before or with the router) and its event is not lost among the removed ones.
#[test]
fn a_publisher_repairs_the_bus_itself() {
    let service = Service::start();
    for _ in 0..3 {
        let (code, body) = service.publish("bus.sized", json!({}));
        assert_eq!(code, 202, "{body}");
    }
    service.redis.cli(&["XADD", "wfo:events", LAST_ID, "type", "x"]);
    let mut ids = Vec::new();
    for n in 0..5 {
        let (code, body) = service.publish("bus.sized", json!({ "n": n }));
        assert_eq!(code, 202, "POST /api/events {n}: {body}");
        ids.push(body["eventId"].as_str().expect("eventId").to_owned());
    }
    wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
        (service.runs("sized", "completed").len() == 8).then_some(())
    })
    .unwrap_or_else(|| panic!("8 runs of `sized`: {:?}", service.runs("sized", "completed")));
    for id in &ids {
        assert!(id_ms(id).abs_diff(now_ms()) < 60_000, "{id} is by the clock");
    }
}

/// `XADD wfo:events * type big.one payload <bytes>` over the Redis protocol, the value written
/// in 1 MiB pieces (so this test never holds it whole); returns the id.
fn xadd_large(port: u16, event_type: &str, payload_bytes: usize) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = [b"XADD".as_slice(), b"wfo:events", b"*", b"type", event_type.as_bytes(), b"payload"];
    let mut out = format!("*{}\r\n", head.len() + 1).into_bytes();
    for part in head {
        out.extend(format!("${}\r\n", part.len()).as_bytes());
        out.extend(part);
        out.extend(b"\r\n");
    }
    out.extend(format!("${payload_bytes}\r\n").as_bytes());
    stream.write_all(&out).unwrap();
    // A JSON object: `{"x":"aaa...a"}`.
    let piece = vec![b'a'; MB];
    stream.write_all(b"{\"x\":\"").unwrap();
    let mut left = payload_bytes - 8;
    while left > 0 {
        let n = left.min(MB);
        stream.write_all(&piece[..n]).unwrap();
        left -= n;
    }
    stream.write_all(b"\"}\r\n").unwrap();
    let mut replies = BufReader::new(&stream);
    let mut reply = String::new();
    replies.read_line(&mut reply).expect("XADD answers");
    // `$<len>` then the id.
    let mut id = String::new();
    if reply.starts_with('$') {
        replies.read_line(&mut id).unwrap();
    }
    assert!(id.trim().contains('-'), "XADD answered {reply:?} {id:?}");
    id.trim().to_owned()
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn oversized_entries_are_never_read_whole() {
    let service = Service::start();
    // Warm up the paths measured below once, then take the replica's memory.
    let (code, _) = service.publish("bus.sized", json!({}));
    assert_eq!(code, 202);
    wait_for(Duration::from_secs(20), Duration::from_millis(100), || {
        (!service.runs("sized", "completed").is_empty()).then_some(())
    })
    .expect("the warm-up event is handled");
    service.body_len("/api/events");
    service.body_len("/api/events/dead");
    let start_kib = rss_kib(service.replica.pid());
    assert!(start_kib > 0, "VmRSS of the replica is readable");

    let size = 20 * MB;
    let ids: Vec<String> = (0..10).map(|_| xadd_large(service.redis.port, "bus.sized", size)).collect();
    let letters = wait_for(Duration::from_secs(60), Duration::from_millis(200), || {
        let letters = service.dead_letters();
        ids.iter().all(|id| letters.iter().any(|l| l["eventId"] == id.as_str())).then_some(letters)
    })
    .unwrap_or_else(|| panic!("10 dead letters; log:\n{}", service.replica.log_text()));
    for id in &ids {
        let letter = letters.iter().find(|l| l["eventId"] == id.as_str()).unwrap();
        let reason = letter["reason"].as_str().unwrap_or_default();
        assert!(reason.contains(&size.to_string()) && reason.contains("over the limit"), "{letter}");
        assert!(reason.contains(&(MB + 64 * 1024).to_string()), "the reason names the limit: {reason}");
        assert_eq!(letter["truncated"], true, "{id}");
        assert!(letter["bytes"].as_u64() > Some(size as u64), "{letter}");
        let kept = letter["fields"]["payload"].as_str().expect("a payload prefix");
        assert!(!kept.is_empty() && kept.len() <= 4096, "a bounded prefix: {} bytes", kept.len());
        assert!(kept.starts_with("{\"x\":\"aaa"), "the prefix is the start of the payload");
        assert!(
            service.redis.cli(&["XRANGE", "wfo:events", id, id]).trim().is_empty(),
            "the oversized original {id} was deleted"
        );
    }
    assert_eq!(service.runs("sized", "completed").len(), 1, "no oversized entry started a run");
    let grown_kib = rss_kib(service.replica.pid()).saturating_sub(start_kib);
    eprintln!("replica VmRSS {start_kib} KiB before, grew by {grown_kib} KiB");
    assert!(grown_kib < 80 * 1024, "the replica grew by {grown_kib} KiB reading ten 20 MB entries");
    assert!(service.body_len("/api/events/dead?limit=500") < 200 * 1024, "the dead-letter listing is bounded");
}

/// Entries too large to list whole but valid events, and many mid-sized ones: every listing
/// answers a bounded body, cutting payloads (marked `truncated`, with their size) and pages.
#[test]
fn listings_are_bounded() {
    let service = Service::start();
    let big = 900 * 1024;
    let big_ids: Vec<String> = (0..5).map(|_| xadd_large(service.redis.port, "bus.sized", big)).collect();
    for _ in 0..40 {
        xadd_large(service.redis.port, "bus.sized", 60 * 1024);
    }
    wait_for(Duration::from_secs(60), Duration::from_millis(200), || {
        (service.runs("sized", "completed").len() == 45).then_some(())
    })
    .unwrap_or_else(|| panic!("45 runs of `sized`; log:\n{}", service.replica.log_text()));

    let bytes = service.body_len("/api/events?limit=500");
    assert!(bytes < 1200 * 1024, "GET /api/events answered {bytes} bytes");
    // Page by page, every event is listed once, the large ones cut.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..50 {
        let path = match &cursor {
            Some(c) => format!("/api/events?limit=500&before={c}"),
            None => "/api/events?limit=500".to_owned(),
        };
        let (code, body) = http(ureq::get(&format!("{}{path}", service.replica.base())).call());
        assert_eq!(code, 200, "{body}");
        for event in body["events"].as_array().unwrap() {
            seen.push(event.clone());
        }
        cursor = body["nextCursor"].as_str().map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(seen.len(), 45, "every event listed once over the pages");
    for id in &big_ids {
        let event = seen.iter().find(|e| e["eventId"] == id.as_str()).expect("the large event is listed");
        assert_eq!(event["truncated"], true, "{id}");
        assert_eq!(event["payloadBytes"], big, "{id}");
        assert!(event["payload"].as_str().is_some_and(|p| p.len() <= 4096), "{id}: a prefix");
    }
    assert!(seen.iter().filter(|e| e["truncated"] == false).all(|e| e["payload"]["x"].is_string()));
}

/// An explicit id of this very millisecond (even with the largest sequence number) is an
/// ordinary entry: handled, not removed, and appends go on by the clock.
#[test]
fn an_entry_of_the_current_millisecond_is_handled_as_usual() {
    let service = Service::start();
    let id = format!("{}-18446744073709551615", now_ms());
    let written = service.redis.cli(&["XADD", "wfo:events", &id, "type", "bus.sized", "payload", "{}"]);
    assert_eq!(written.trim(), id, "the XADD was taken");
    let (code, body) = service.publish("bus.sized", json!({ "n": 2 }));
    assert_eq!(code, 202, "{body}");
    assert!(id_ms(body["eventId"].as_str().unwrap()).abs_diff(now_ms()) < 60_000, "{body}");
    wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
        (service.runs("sized", "completed").len() == 2).then_some(())
    })
    .unwrap_or_else(|| panic!("both events start a run; log:\n{}", service.replica.log_text()));
    assert!(service.dead_letters().is_empty(), "nothing dead-lettered: {:?}", service.dead_letters());
    let (_, health) = service.replica.get("/health");
    assert_eq!(health["bus"]["hostileEntriesRemoved"], 0, "{health}");
}
