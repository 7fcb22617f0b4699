//! Triggers, end to end, with real processes: a private redis-server per test, replicas of our
//! binary, loopback only.
//!
//! Cron: every replica evaluates every schedule and a fire starts its run under the idempotency
//! key `cron:<workflow>:<fire>`, so each fire runs once however many replicas run and whichever
//! of them dies; after downtime the catch-up policy decides what runs; the overlap policy keeps a
//! slow schedule from running twice at once. The event bus: anything that can `XADD` to
//! `wfo:events` starts the workflows whose `events` name the type, once, even when the router
//! dies between starting the runs and acking; malformed entries are dead-lettered with a reason;
//! the stream stays within its retention bound under 100,000 events.
//!
//! No assertion is on how long something took. Cron tests necessarily relate fire times to the
//! wall clock (which fires fell inside the window the test watched), always with slack of at
//! least a second around the 250 ms cron tick. Every loop is bounded in count and time.

use crate::util::{Redis, RedisServer, Replica, ReplicaConfig, redis_cli, wait_for, workflows_file};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// ---- helpers ----

/// The tests of this module run one at a time: the cron tests watch schedules firing every two
/// seconds on a two-core machine, and the 100,000-event test would otherwise starve them. (Other
/// modules' tests still run alongside; the assertions allow for that.)
static SERIAL: Mutex<()> = Mutex::new(());

pub(crate) fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Milliseconds since the Unix epoch, as the replicas' clocks (calibrated to the same Redis on
/// the same host) count them.
fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// An RFC 3339 timestamp of the API, in milliseconds since the epoch.
fn ms_of(value: &Value) -> u64 {
    let text = value.as_str().unwrap_or_else(|| panic!("expected an RFC 3339 timestamp, got {value}"));
    let at = humantime::parse_rfc3339(text).unwrap_or_else(|err| panic!("`{text}` is not RFC 3339: {err}"));
    at.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn show(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Sleeps until the wall clock is `offset` ms past a multiple of `period` ms (the next such
/// moment). Bounded: at most one period.
fn sleep_until_phase(period: u64, offset: u64) {
    let phase = now_ms() % period;
    let wait = if phase < offset { offset - phase } else { period - phase + offset };
    std::thread::sleep(Duration::from_millis(wait));
}

/// Sleeps until `at` (ms since the epoch), if it is in the future.
fn sleep_until(at: u64) {
    let now = now_ms();
    if at > now {
        std::thread::sleep(Duration::from_millis(at - now));
    }
}

/// The multiples of `period` in `(after, until]`.
fn marks_between(period: u64, after: u64, until: u64) -> Vec<u64> {
    let first = (after / period + 1) * period;
    (first..=until).step_by(period as usize).collect()
}

/// A run as the API shows it, with what its history adds.
#[derive(Debug, Clone)]
struct Run {
    id: String,
    status: String,
    trigger: Value,
    input: Value,
    created_at: u64,
    /// `trigger.fireAt` of a cron run.
    fire_at: Option<u64>,
    /// The replica that recorded `run_created`.
    created_by: String,
    /// When the run reached a terminal state (its last transition), if it did.
    finished_at: Option<u64>,
}

/// Every run of `workflow`, read the way an operator would without a list endpoint: the run ids
/// from the per-workflow index of each of the 16 shards (`redis-cli ZRANGE`), then each run and
/// its history over HTTP from `via`. Sorted by creation time.
fn runs_of(redis: &dyn Redis, via: &Replica, workflow: &str) -> Vec<Run> {
    let mut ids = BTreeSet::new();
    for shard in 0..16 {
        let reply = redis.cli(&["ZRANGE", &format!("wfo:{{{shard}}}:idx:wf:{workflow}"), "0", "-1"]);
        ids.extend(reply.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned));
    }
    let mut runs: Vec<Run> = ids
        .into_iter()
        .map(|id| {
            let body = via.run(&id);
            let history = via.history(&id);
            let created = history.first().unwrap_or_else(|| panic!("run {id} has an empty history"));
            assert_eq!(created["type"], "run_created", "run {id}: {history:?}");
            let last = history.last().unwrap();
            let finished = matches!(
                last["type"].as_str(),
                Some("run_completed" | "run_failed" | "run_cancelled" | "run_timed_out")
            );
            Run {
                status: body["status"].as_str().unwrap_or_default().to_owned(),
                trigger: body["trigger"].clone(),
                input: body["input"].clone(),
                created_at: ms_of(&body["createdAt"]),
                fire_at: body["trigger"]["fireAt"].as_str().map(|_| ms_of(&body["trigger"]["fireAt"])),
                created_by: created["replica"].as_str().unwrap_or_default().to_owned(),
                finished_at: finished.then(|| ms_of(&last["at"])),
                id,
            }
        })
        .collect();
    runs.sort_by_key(|r| r.created_at);
    runs
}

/// The fire times of cron runs, checking each run is a well-formed cron run of a `period` ms
/// schedule, and that no fire has two runs.
fn cron_fires(runs: &[Run], period: u64) -> Vec<u64> {
    let mut by_fire: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
    for run in runs {
        assert_eq!(run.trigger["kind"], "cron", "run {} was not started by cron: {}", run.id, run.trigger);
        let fire = run.fire_at.expect("a cron run has trigger.fireAt");
        assert_eq!(fire % period, 0, "run {} fired at {}, not on the schedule", run.id, show(fire));
        assert_eq!(run.input["fireTime"], run.trigger["fireAt"], "run {}: the input names the fire", run.id);
        by_fire.entry(fire).or_default().push(&run.id);
    }
    let duplicates: Vec<String> = by_fire
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .map(|(fire, ids)| format!("{} -> {ids:?}", show(*fire)))
        .collect();
    assert!(duplicates.is_empty(), "fires with more than one run: {duplicates:?}");
    by_fire.into_keys().collect()
}

/// Fires that are not `period` after the previous one (the ends of gaps), as text.
fn gaps(fires: &[u64], period: u64) -> Vec<String> {
    fires.windows(2).filter(|w| w[1] - w[0] != period).map(|w| format!("{} .. {}", show(w[0]), show(w[1]))).collect()
}

/// A `/health` counter (0 when the replica does not answer).
fn counter(replica: &Replica, name: &str) -> u64 {
    let (status, body) = replica.get("/health");
    if status != 200 {
        return 0;
    }
    body["counters"][name].as_u64().unwrap_or_else(|| panic!("no counter {name} in {body}"))
}

fn counter_sum(replicas: &[&Replica], name: &str) -> u64 {
    replicas.iter().map(|r| counter(r, name)).sum()
}

/// A log line without its ANSI colour codes.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn log_lines(replicas: &[&Replica], needle: &str) -> Vec<String> {
    replicas
        .iter()
        .flat_map(|r| r.log_text().lines().filter(|l| l.contains(needle)).map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

/// `redis-cli` with `stdin` fed to it (for `-x`, which takes the last argument from stdin, and
/// for `--pipe`); returns stdout.
pub(crate) fn redis_cli_stdin(port: u16, args: &[&str], stdin: &[u8]) -> String {
    let mut child = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("redis-cli");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    // Written from a thread so that a large input cannot deadlock against a full stdout pipe.
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let output = child.wait_with_output().expect("redis-cli output");
    let _ = writer.join();
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// `XADD wfo:events * type <event_type> payload <payload>` for each payload, as raw RESP for
/// `redis-cli --pipe`.
pub(crate) fn xadds_resp(event_type: &str, payloads: impl Iterator<Item = String>) -> Vec<u8> {
    let mut resp = Vec::new();
    for payload in payloads {
        let args = ["XADD", "wfo:events", "*", "type", event_type, "payload", &payload];
        resp.extend(format!("*{}\r\n", args.len()).as_bytes());
        for arg in args {
            resp.extend(format!("${}\r\n{arg}\r\n", arg.len()).as_bytes());
        }
    }
    resp
}

/// A RESP2 reply.
#[derive(Debug, Clone, PartialEq)]
enum Resp {
    Nil,
    Int(i64),
    Bytes(Vec<u8>),
    Error(String),
    Array(Vec<Resp>),
}

impl Resp {
    fn bytes(&self) -> &[u8] {
        match self {
            Resp::Bytes(b) => b,
            other => panic!("expected a string reply, got {other:?}"),
        }
    }

    fn array(&self) -> &[Resp] {
        match self {
            Resp::Array(items) => items,
            other => panic!("expected an array reply, got {other:?}"),
        }
    }
}

/// One command over a raw connection: binary-safe both ways, unlike `redis-cli` output, which is
/// what reading back fields of arbitrary bytes needs.
fn resp_call(port: u16, args: &[&[u8]]) -> Resp {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to redis");
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend(format!("${}\r\n", arg.len()).as_bytes());
        request.extend(*arg);
        request.extend(b"\r\n");
    }
    stream.write_all(&request).expect("send the command");
    fn read(reader: &mut BufReader<TcpStream>) -> Resp {
        let mut line = Vec::new();
        reader.read_until(b'\n', &mut line).expect("read a reply line");
        let text = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
        match line[0] {
            b'+' => Resp::Bytes(text.into_bytes()),
            b'-' => Resp::Error(text),
            b':' => Resp::Int(text.parse().unwrap()),
            b'$' => match text.parse::<i64>().unwrap() {
                -1 => Resp::Nil,
                len => {
                    let mut body = vec![0; len as usize + 2];
                    reader.read_exact(&mut body).expect("read a bulk string");
                    body.truncate(len as usize);
                    Resp::Bytes(body)
                }
            },
            b'*' => match text.parse::<i64>().unwrap() {
                -1 => Resp::Nil,
                count => Resp::Array((0..count).map(|_| read(reader)).collect()),
            },
            other => panic!("unexpected RESP type byte {other:?}"),
        }
    }
    read(&mut BufReader::new(stream))
}

/// A stream entry: id and (field, value) pairs, as bytes.
type Entry = (String, Vec<(Vec<u8>, Vec<u8>)>);

fn xrange(port: u16, stream: &str) -> Vec<Entry> {
    resp_call(port, &[b"XRANGE", stream.as_bytes(), b"-", b"+"])
        .array()
        .iter()
        .map(|entry| {
            let parts = entry.array();
            let id = String::from_utf8(parts[0].bytes().to_vec()).unwrap();
            let flat = parts[1].array();
            let fields = flat.chunks(2).map(|kv| (kv[0].bytes().to_vec(), kv[1].bytes().to_vec())).collect();
            (id, fields)
        })
        .collect()
}

fn field<'a>(entry: &'a Entry, name: &str) -> Option<&'a [u8]> {
    entry.1.iter().find(|(k, _)| k == name.as_bytes()).map(|(_, v)| v.as_slice())
}

/// `XADD wfo:events * <fields>` through `redis-cli`, as any producer would; returns the id.
fn xadd(redis: &dyn Redis, fields: &[&str]) -> String {
    let mut args = vec!["XADD", "wfo:events", "*"];
    args.extend(fields);
    let id = redis.cli(&args).trim().to_owned();
    assert!(id.contains('-'), "XADD {fields:?} answered {id:?}");
    id
}

/// `redis-cli -x XADD wfo:events * <fields> <stdin>`: the last field's value read from stdin.
fn xadd_stdin(redis: &RedisServer, fields: &[&str], last_value: &[u8]) -> String {
    let mut args = vec!["-x", "XADD", "wfo:events", "*"];
    args.extend(fields);
    let id = redis_cli_stdin(redis.port, &args, last_value).trim().to_owned();
    assert!(id.contains('-') && !id.contains(' '), "XADD -x {fields:?} answered {id:?}");
    id
}

/// The router group's `pending` and `lag` (XINFO GROUPS wfo:events), when the group exists.
fn router_backlog(redis: &RedisServer) -> Option<(u64, Option<u64>)> {
    let reply = resp_call(redis.port, &[b"XINFO", b"GROUPS", b"wfo:events"]);
    let Resp::Array(groups) = reply else { return None };
    groups.iter().find_map(|group| {
        let flat = group.array();
        let get =
            |name: &str| flat.chunks(2).find(|kv| kv[0] == Resp::Bytes(name.as_bytes().to_vec())).map(|kv| &kv[1]);
        (get("name")? == &Resp::Bytes(b"router".to_vec())).then_some(())?;
        let pending = match get("pending")? {
            Resp::Int(n) => *n as u64,
            _ => return None,
        };
        let lag = match get("lag") {
            Some(Resp::Int(n)) => Some(*n as u64),
            _ => None,
        };
        Some((pending, lag))
    })
}

fn xlen(redis: &RedisServer, stream: &str) -> u64 {
    let reply = redis.cli(&["XLEN", stream]);
    reply.trim().parse().unwrap_or_else(|_| panic!("XLEN {stream} answered {reply:?}"))
}

/// The events of `GET /api/events`, by id (at most 500, newest first).
fn listed_events(replica: &Replica) -> BTreeMap<String, Value> {
    let (status, body) = replica.get("/api/events?limit=500");
    assert_eq!(status, 200, "GET /api/events: {body}");
    body["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| (e["eventId"].as_str().unwrap().to_owned(), e.clone()))
        .collect()
}

/// Waits (bounded) until every one of `ids` is listed as handled; returns the listing.
fn wait_handled(replica: &Replica, ids: &[String], limit: Duration) -> BTreeMap<String, Value> {
    wait_for(limit, Duration::from_millis(200), || {
        let listed = listed_events(replica);
        ids.iter().all(|id| listed.get(id).is_some_and(|e| e["handled"] == true)).then_some(listed)
    })
    .unwrap_or_else(|| panic!("events {ids:?} not all handled within {limit:?}: {:#?}", listed_events(replica)))
}

// ---- 1. cron: exactly once across replicas ----

/// `overlap = "allow"`: these tests are about which fires start a run, so the run before must not
/// be able to hold a fire back (a run whose step a killed replica held would otherwise block the
/// schedule until its lease expired). The overlap policy has its own test below.
const EVERY_TWO_SECONDS: &str = r#"
[[workflow]]
id = "every-two"
description = "a 6-field schedule firing every 2 s"
schedule = "*/2 * * * * *"
overlap = "allow"
[[workflow.step]]
id = "tick"
action = "noop"
"#;

#[test]
fn three_replicas_start_each_fire_of_a_two_second_schedule_once_even_when_one_is_killed() {
    let _serial = serial();
    cron_fires_once_on_three_replicas_one_killed(&RedisServer::start());
}

/// Three replicas of `redis` serve a two-second schedule for about 30 s, the one winning the
/// fires killed midway: every fire has exactly one run.
pub(crate) fn cron_fires_once_on_three_replicas_one_killed(redis: &dyn Redis) {
    let dir = tempfile::tempdir().unwrap();
    let file = workflows_file(dir.path(), EVERY_TWO_SECONDS);
    let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()).env("LEASE_TTL", "3s");
    let spawned = now_ms();
    let mut replicas = vec![config.start("cron-a")];
    let first_ready = now_ms();
    replicas.push(config.start("cron-b"));
    replicas.push(config.start("cron-c"));

    // The schedule as the API lists it, with the next fire on a two-second mark ahead.
    let (status, body) = replicas[0].get("/api/workflows");
    assert_eq!(status, 200, "{body}");
    let listed = body["workflows"].as_array().unwrap().iter().find(|w| w["id"] == "every-two").cloned().unwrap();
    assert_eq!(listed["schedule"], "*/2 * * * * *", "{listed}");
    assert_eq!(listed["timezone"], "UTC", "{listed}");
    let next = ms_of(&listed["nextRunAt"]);
    assert_eq!(next % 2000, 0, "nextRunAt {listed}");
    assert!(next + 1000 >= now_ms(), "nextRunAt is ahead: {listed}");

    // Midway, in the middle of an interval, kill -9 the replica that started the newest run (the
    // one winning the fires, so that the others must take over); it is not restarted: the other
    // two carry on alone.
    sleep_until(first_ready + 14_000);
    sleep_until_phase(2000, 1000);
    let winner = runs_of(redis, &replicas[0], "every-two").last().expect("no run yet").created_by.clone();
    let victim = replicas.iter().position(|r| r.name == winner).expect("the newest run's replica");
    let mut killed = replicas.remove(victim);
    killed.kill9();
    let killed_at = now_ms();
    eprintln!("killed {winner}, which started the newest run, at {}", show(killed_at));

    // About 30 s in all; stop watching in the middle of an interval, then give the replicas time
    // to handle every fire up to that point before reading the runs.
    sleep_until(first_ready + 30_000);
    sleep_until_phase(2000, 1000);
    let window_end = now_ms();
    std::thread::sleep(Duration::from_secs(3));

    let runs: Vec<Run> =
        runs_of(redis, &replicas[0], "every-two").into_iter().filter(|r| r.fire_at <= Some(window_end)).collect();
    let fires = cron_fires(&runs, 2000);
    eprintln!("{} fires from {} to {}", fires.len(), show(fires[0]), show(*fires.last().unwrap()));
    // No gap anywhere between the first fire and the last one.
    assert_eq!(
        gaps(&fires, 2000),
        Vec::<String>::new(),
        "fires {:?}",
        fires.iter().map(|f| show(*f)).collect::<Vec<_>>()
    );
    // Nothing fired before a replica ran; every mark from a second after the first replica was
    // up (its first cron tick) to the end of the window has its run. The very first mark may or
    // may not have been caught, depending on when that first tick fell.
    assert!(fires[0] > spawned, "a fire before any replica ran: {}", show(fires[0]));
    let expected = marks_between(2000, first_ready + 1000, window_end);
    let missing: Vec<String> = expected.iter().filter(|m| !fires.contains(m)).map(|m| show(*m)).collect();
    assert!(missing.is_empty(), "fires without a run: {missing:?}");
    assert!(expected.len() >= 12, "the window covered {} fires", expected.len());

    // The kill happened: nothing was created by the dead replica after it died; the fires after
    // it were started by the survivors.
    let mut by_replica: BTreeMap<(&str, bool), usize> = BTreeMap::new();
    for run in &runs {
        *by_replica.entry((&run.created_by, run.fire_at.unwrap() > killed_at)).or_default() += 1;
        if run.created_by == winner {
            assert!(run.created_at < killed_at, "run {} created by {winner} after it was killed", run.id);
        }
    }
    let after_kill = fires.iter().filter(|f| **f > killed_at).count();
    assert!(after_kill >= 6, "only {after_kill} fires after the kill");
    // The shared schedule state agrees with the runs.
    let last_fire: u64 = redis.cli(&["HGET", "wfo:cron:every-two", "last_fire"]).trim().parse().unwrap();
    assert!(last_fire >= *fires.last().unwrap(), "cron state last_fire {}", show(last_fire));
    let fires_counted: Vec<u64> = replicas.iter().map(|r| counter(r, "cronFires")).collect();
    eprintln!("runs per (replica, after the kill): {by_replica:?}; survivors' cronFires {fires_counted:?}");
}

// ---- 2. cron: catch-up after every replica was down ----

#[test]
fn after_all_replicas_were_down_across_three_fires_only_the_latest_missed_fire_runs() {
    let _serial = serial();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    // `catchup` unset: the default is `latest`.
    let file = workflows_file(dir.path(), EVERY_TWO_SECONDS);
    let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()).env("LEASE_TTL", "2s");
    let mut first: Vec<Replica> = ["up-a", "up-b", "up-c"].iter().map(|n| config.start(n)).collect();

    // Let the schedule run (so that there is a last fire to catch up from), then kill -9 every
    // replica shortly after a fire, and keep them down across three more fires (~7 s).
    let fired = wait_for(Duration::from_secs(20), Duration::from_millis(200), || {
        (runs_of(&redis, &first[0], "every-two").len() >= 3).then_some(())
    });
    assert!(fired.is_some(), "the schedule did not fire 3 times in 20 s");
    sleep_until_phase(2000, 400);
    for replica in &mut first {
        replica.kill9();
    }
    let killed_at = now_ms();
    sleep_until(killed_at + 7_000);
    let restarted_at = now_ms();
    let second: Vec<Replica> = ["back-a", "back-b", "back-c"].iter().map(|n| config.start(n)).collect();
    let back_ready = now_ms();
    eprintln!("all down from {} to {} (first back up at {})", show(killed_at), show(restarted_at), show(back_ready));

    // Normal fires resume: watch three more.
    std::thread::sleep(Duration::from_secs(7));
    let runs = runs_of(&redis, &second[0], "every-two");
    let fires = cron_fires(&runs, 2000);
    let before: Vec<u64> = fires.iter().copied().filter(|f| *f <= killed_at).collect();
    let after: Vec<u64> = fires.iter().copied().filter(|f| *f > killed_at).collect();
    let (last_before, caught_up) = (*before.last().unwrap(), *after.first().expect("no run after the restart"));
    let missed = marks_between(2000, last_before, restarted_at);
    eprintln!(
        "last fire before the outage {}; missed {:?}; first fire run after it {}",
        show(last_before),
        missed.iter().map(|m| show(*m)).collect::<Vec<_>>(),
        show(caught_up)
    );
    assert!(missed.len() >= 3, "the outage covered {} fires", missed.len());
    // Exactly one run for the missed fires: the latest one (or, had the restart straddled a
    // mark, the one just after; never an older one), started after the restart, i.e. late.
    let latest_missed = *missed.last().unwrap();
    assert!(
        caught_up >= latest_missed && caught_up <= back_ready,
        "the first run after the outage is for {}; the latest missed fire was {}",
        show(caught_up),
        show(latest_missed)
    );
    let catch_up_run = runs.iter().find(|r| r.fire_at == Some(caught_up)).unwrap();
    assert!(
        catch_up_run.created_at >= restarted_at,
        "the catch-up run was created at {}",
        show(catch_up_run.created_at)
    );
    let skipped = marks_between(2000, last_before, caught_up).len() - 1;
    assert!(skipped >= 2, "only {skipped} missed fires were skipped");
    let caught: Vec<String> = log_lines(&second.iter().collect::<Vec<_>>(), "catching up a missed fire");
    assert!(
        caught.iter().any(|l| l.contains(&show(caught_up))),
        "no replica logged catching up {}: {caught:#?}",
        show(caught_up)
    );
    // The older missed fires were counted, not silently dropped.
    let missed_counted = counter_sum(&second.iter().collect::<Vec<_>>(), "cronMissed");
    assert!(missed_counted >= skipped as u64, "cronMissed {missed_counted}, skipped {skipped}");
    // Then every fire again, without a gap.
    assert_eq!(gaps(&after, 2000), Vec::<String>::new());
    assert!(after.len() >= 3, "normal fires did not resume: {after:?}");
    eprintln!("skipped {skipped} missed fires; cronMissed over the restarted replicas: {missed_counted}");
}

/// With `catchup = "skip"`: `period` ms between fires; every replica is killed `kill_phase` ms
/// after a fire and stays down for `down` ms; the restarted replicas must start no run for any
/// fire of the outage, and the normal fires resume with the first mark after the restart.
fn catchup_skip_starts_no_missed_fire(period: u64, kill_phase: u64, down: u64) {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        r#"
[[workflow]]
id = "skips-missed"
schedule = "*/{} * * * * *"
catchup = "skip"
overlap = "allow"
[[workflow.step]]
id = "tick"
action = "noop"
"#,
        period / 1000
    );
    let file = workflows_file(dir.path(), &toml);
    let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()).env("LEASE_TTL", "2s");
    let mut first: Vec<Replica> = ["up-a", "up-b"].iter().map(|n| config.start(n)).collect();
    let fired = wait_for(Duration::from_secs(20), Duration::from_millis(200), || {
        (!runs_of(&redis, &first[0], "skips-missed").is_empty()).then_some(())
    });
    assert!(fired.is_some(), "the schedule did not fire in 20 s");
    sleep_until_phase(period, kill_phase);
    for replica in &mut first {
        replica.kill9();
    }
    let killed_at = now_ms();
    sleep_until(killed_at + down);
    let restarted_at = now_ms();
    let second: Vec<Replica> = ["back-a", "back-b"].iter().map(|n| config.start(n)).collect();
    std::thread::sleep(Duration::from_millis(2 * period + 1000));

    let runs = runs_of(&redis, &second[0], "skips-missed");
    let fires = cron_fires(&runs, period);
    let last_before = *fires.iter().rfind(|f| **f <= killed_at).unwrap();
    let missed = marks_between(period, last_before, restarted_at);
    let run_after: Vec<u64> = fires.iter().copied().filter(|f| *f > last_before).collect();
    eprintln!(
        "down from {} to {}; missed {:?}; runs after the outage {:?}",
        show(killed_at),
        show(restarted_at),
        missed.iter().map(|m| show(*m)).collect::<Vec<_>>(),
        run_after.iter().map(|m| show(*m)).collect::<Vec<_>>()
    );
    assert!(missed.len() >= 3, "the outage covered {} fires", missed.len());
    let ran_missed: Vec<String> = missed.iter().filter(|m| fires.contains(m)).map(|m| show(*m)).collect();
    assert!(ran_missed.is_empty(), "catchup = skip, yet missed fires ran: {ran_missed:?}");
    // Normal fires resume with the first mark after the restart.
    let first_mark_after_restart = (restarted_at / period + 1) * period;
    assert_eq!(run_after.first().copied(), Some(first_mark_after_restart), "runs after the outage");
    assert_eq!(gaps(&run_after, period), Vec::<String>::new());
    let missed_counted = counter_sum(&second.iter().collect::<Vec<_>>(), "cronMissed");
    assert!(missed_counted >= missed.len() as u64, "cronMissed {missed_counted} for {} missed fires", missed.len());
    let logged = log_lines(&second.iter().collect::<Vec<_>>(), "fires missed while no replica ran are not started");
    assert!(!logged.is_empty(), "the skipped fires were not logged");
    eprintln!("cronMissed over the restarted replicas: {missed_counted}");
}

/// Every four seconds, down from 0.5 s after a fire M to M + 14.5 s: M+4, M+8 and M+12 are
/// missed, the latest 2.5 s before the restart, so older than the scheduler's 2 s start-up grace.
#[test]
fn with_catchup_skip_no_missed_fire_runs_after_all_replicas_were_down() {
    let _serial = serial();
    catchup_skip_starts_no_missed_fire(4000, 500, 14_000);
}

/// A fire younger than the start-up grace (2 s) when the first replica starts may be one that
/// running replicas are about to handle, so it is decided only once the grace has passed: no
/// replica handled it, so it was missed, and under `skip` it does not run. Down from 0.4 s after a
/// fire M to M + 7.4 s: M+2, M+4, M+6 are missed, M+6 only 1.4 s before the restart.
#[test]
fn with_catchup_skip_a_missed_fire_just_before_the_restart_does_not_run_either() {
    let _serial = serial();
    catchup_skip_starts_no_missed_fire(2000, 400, 7_000);
}

/// Three per-second schedules, one per catch-up policy, `overlap = "allow"` so that only the
/// catch-up policy decides what runs.
const EVERY_SECOND_BY_POLICY: &str = r#"
[[workflow]]
id = "policy-latest"
schedule = "* * * * * *"
catchup = "latest"
overlap = "allow"
[[workflow.step]]
id = "tick"
action = "noop"

[[workflow]]
id = "policy-skip"
schedule = "* * * * * *"
catchup = "skip"
overlap = "allow"
[[workflow.step]]
id = "tick"
action = "noop"

[[workflow]]
id = "policy-all"
schedule = "* * * * * *"
catchup = "all"
catchup_window = "10s"
overlap = "allow"
[[workflow.step]]
id = "tick"
action = "noop"
"#;

/// An outage of 3,000 fires, more than the 1,000 `all` may run: the shared schedule state says the
/// last fire any replica handled was 50 minutes ago (written with redis-cli before the first
/// replica starts, instead of waiting 50 minutes). Regression test: the scheduler used to list
/// only the oldest 1,001 missed fires, so `latest` ran a fire 33 minutes old, `all` saw nothing
/// in its window and ran none of it, and `skip` handed the fires past the 1,001st to the normal
/// path, which started a run for each of them.
#[test]
fn after_an_outage_of_thousands_of_fires_each_catch_up_policy_is_obeyed() {
    let _serial = serial();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = workflows_file(dir.path(), EVERY_SECOND_BY_POLICY);
    let seeded = (now_ms() / 1000 - 3000) * 1000;
    for workflow in ["policy-latest", "policy-skip", "policy-all"] {
        redis.cli(&["HSET", &format!("wfo:cron:{workflow}"), "last_fire", &seeded.to_string()]);
    }
    let started_at = now_ms();
    let replica = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path()).start("after-outage");
    let ready_at = now_ms();
    std::thread::sleep(Duration::from_secs(4));

    let fires_of = |workflow: &str| cron_fires(&runs_of(&redis, &replica, workflow), 1000);
    let describe = |fires: &[u64]| {
        format!("{} runs, {:?}", fires.len(), fires.iter().take(12).map(|f| show(*f)).collect::<Vec<_>>())
    };
    let (latest, skip, all) = (fires_of("policy-latest"), fires_of("policy-skip"), fires_of("policy-all"));
    eprintln!(
        "started {}\nlatest: {}\nskip: {}\nall: {}",
        show(started_at),
        describe(&latest),
        describe(&skip),
        describe(&all)
    );
    for fires in [&latest, &skip, &all] {
        assert_eq!(gaps(fires, 1000), Vec::<String>::new(), "{}", describe(fires));
        assert!(fires.len() <= 20, "a burst of runs after the outage: {}", describe(fires));
    }
    // latest: one run for the newest missed fire (the second the replica's first tick fell in),
    // then the normal fires.
    assert!(
        latest[0] + 1000 > started_at && latest[0] <= ready_at + 1000,
        "latest ran {} first; the newest missed fire was at {}",
        show(latest[0]),
        show(started_at - started_at % 1000)
    );
    // skip: no run for a missed fire older than the 2 s start-up grace (see the ignored test
    // above for the fires within it).
    assert!(skip[0] + 2000 >= started_at, "skip ran the missed fire {}", show(skip[0]));
    // all: every fire of the 10 s window before the restart, and none older.
    assert!(all[0] + 11_000 >= started_at, "all ran {}, outside its 10 s window", show(all[0]));
    let window = marks_between(1000, started_at - 8_000, started_at);
    assert!(window.iter().all(|f| all.contains(f)), "all did not run its window {}", describe(&all));
    let missed = counter(&replica, "cronMissed");
    assert!(missed >= 3 * 2_900, "cronMissed {missed} for three schedules that missed ~3,000 fires each");
    eprintln!("cronMissed {missed}");
}

// ---- 3. cron: overlap ----

/// A step that takes longer than the interval; `overlap` unset (the default is `skip`).
const SLOW_EVERY_TWO_SECONDS: &str = r#"
[[workflow]]
id = "slow-tick"
schedule = "*/2 * * * * *"
[[workflow.step]]
id = "sleep"
action = "exec"
with = { command = ["sleep", "5"] }
"#;

#[test]
fn with_overlap_skip_a_slow_schedule_never_runs_twice_at_once_and_counts_the_skips() {
    let _serial = serial();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = workflows_file(dir.path(), SLOW_EVERY_TWO_SECONDS);
    let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path());
    let a = config.start("slow-a");
    let b = config.start("slow-b");
    let (_, body) = a.get("/api/workflows");
    assert_eq!(body["workflows"][0]["overlap"], "skip", "{body}");

    std::thread::sleep(Duration::from_secs(20));
    // Let the newest run finish, then read them all (the schedule keeps going meanwhile; a run
    // started after that is checked against it like any other).
    let newest = runs_of(&redis, &a, "slow-tick").last().expect("the schedule started no run").id.clone();
    a.wait_terminal(&newest, Duration::from_secs(30));
    let runs = runs_of(&redis, &a, "slow-tick");
    cron_fires(&runs, 2000);
    assert!(runs.len() >= 3, "only {} runs in 20 s", runs.len());
    // Each run was created only after the one before it had finished: never two at once. (Only
    // the newest may still be active.)
    for pair in runs.windows(2) {
        let (previous, next) = (&pair[0], &pair[1]);
        assert_eq!(previous.status, "completed", "run {}", previous.id);
        let finished = previous.finished_at.unwrap();
        assert!(
            next.created_at >= finished,
            "run {} (fire {}) was created at {}, while run {} was active until {}",
            next.id,
            show(next.fire_at.unwrap()),
            show(next.created_at),
            previous.id,
            show(finished)
        );
    }
    // Every fire between the first run and the newest without a run of its own was skipped.
    let fires: Vec<u64> = runs.iter().map(|r| r.fire_at.unwrap()).collect();
    let skipped_fires = marks_between(2000, fires[0], *fires.last().unwrap()).len() + 1 - fires.len();
    let skipped = counter_sum(&[&a, &b], "cronSkipped");
    assert!(skipped >= 1, "no skipped fire was counted");
    assert!(skipped >= skipped_fires as u64, "{skipped_fires} fires skipped, cronSkipped {skipped}");
    // Every skipped fire was logged (by one replica or by both, when both looked at it before
    // either recorded it: the per-replica counters then both count it).
    let logged = log_lines(&[&a, &b], "fire skipped (overlap policy)");
    let logged_fires: BTreeSet<String> = logged
        .iter()
        .filter_map(|line| {
            // A JSON line (the default off a terminal) has the fire in a field; a text line
            // says ` fire=<time>`.
            if let Ok(object) = serde_json::from_str::<serde_json::Value>(line) {
                return object["fire"].as_str().map(str::to_owned);
            }
            let line = strip_ansi(line);
            let at = line.find(" fire=")? + 6;
            Some(line[at..].split_whitespace().next()?.to_owned())
        })
        .collect();
    let between: Vec<String> = marks_between(2000, fires[0], *fires.last().unwrap())
        .into_iter()
        .filter(|m| !fires.contains(m))
        .map(show)
        .collect();
    let unlogged: Vec<&String> = between.iter().filter(|m| !logged_fires.contains(*m)).collect();
    assert!(unlogged.is_empty(), "skipped fires not logged: {unlogged:?}; logged {logged_fires:?}");
    eprintln!(
        "{} runs, fires {:?}; {skipped_fires} fires skipped between them; {} skip log lines for {} distinct fires; cronSkipped a={} b={}",
        runs.len(),
        runs.iter().map(|r| show(r.fire_at.unwrap())).collect::<Vec<_>>(),
        logged.len(),
        logged_fires.len(),
        counter(&a, "cronSkipped"),
        counter(&b, "cronSkipped")
    );
}

// ---- 4. the event bus: the built-in trigger table ----

/// The built-in registry's event table (issue 3).
const TABLE: [(&str, &str); 11] = [
    ("cms.content.updated", "cms-sync"),
    ("cms.service.created", "cms-sync"),
    ("cache.invalidated", "cache-warmup"),
    ("deployment.completed", "cache-warmup"),
    ("system.health.check", "health-monitoring"),
    ("user.registered", "user-onboarding"),
    ("user.verified", "user-onboarding"),
    ("sales.lead.created", "sales-operations"),
    ("security.alert", "security-audit"),
    ("performance.degraded", "performance-optimization"),
    ("memory.high", "performance-optimization"),
];

const BUILTIN_WORKFLOWS: [&str; 10] = [
    "cms-sync",
    "database-backup",
    "health-monitoring",
    "cache-warmup",
    "sales-operations",
    "log-rotation",
    "performance-optimization",
    "user-onboarding",
    "notification-digest",
    "security-audit",
];

/// The event-started runs of `workflow` (the built-in workflows also have schedules; their cron
/// runs, if a minute boundary passes, are not what these tests look at).
fn event_runs(redis: &dyn Redis, via: &Replica, workflow: &str) -> Vec<Run> {
    runs_of(redis, via, workflow).into_iter().filter(|r| r.trigger["kind"] == "event").collect()
}

#[test]
fn redis_cli_xadd_of_each_seed_event_type_starts_exactly_the_workflows_of_the_table_once() {
    let _serial = serial();
    xadd_of_each_seed_event_starts_the_workflows_of_the_table_once(&RedisServer::start());
}

/// `redis-cli XADD` of each seed event type to `redis`'s bus, two replicas routing: each starts
/// exactly the workflows of the table, once.
pub(crate) fn xadd_of_each_seed_event_starts_the_workflows_of_the_table_once(redis: &dyn Redis) {
    let dir = tempfile::tempdir().unwrap();
    // No WORKFLOWS_FILE: the built-in Molochain registry. Two replicas, two routers in the group.
    let config = ReplicaConfig::new(Some(redis.url()), None, dir.path());
    let a = config.start("bus-a");
    let b = config.start("bus-b");

    // The debounced workflows (`debounce` in the registry): their events start one run per burst.
    let (_, workflows) = a.get("/api/workflows");
    let debounced: BTreeSet<String> = workflows["workflows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| !w["debounce"].is_null())
        .map(|w| w["id"].as_str().unwrap().to_owned())
        .collect();
    assert!(debounced.contains("cms-sync"), "{workflows}");

    let ids: Vec<String> = TABLE.iter().map(|(t, _)| xadd(redis, &["type", t, "payload", r#"{"id":1}"#])).collect();
    let listed = wait_handled(&a, &ids, Duration::from_secs(30));
    for ((event_type, workflow), id) in TABLE.iter().zip(&ids) {
        let event = &listed[id];
        assert_eq!(event["eventType"], *event_type, "{event}");
        assert_eq!(event["payload"], json!({ "id": 1 }), "{event}");
        let runs = event["runs"].as_array().unwrap();
        if debounced.contains(*workflow) {
            assert!(runs.is_empty(), "{event_type} joined a burst, its run starts later: {runs:?}");
            continue;
        }
        assert_eq!(runs.len(), 1, "{event_type} started {runs:?}");
        assert_eq!(runs[0]["workflowId"], *workflow, "{event}");
    }
    // From the workflows' side: each has exactly one run per event naming it (a debounced one,
    // one run for all of them), and the workflows no event names have none.
    for workflow in BUILTIN_WORKFLOWS {
        let expected: BTreeSet<&str> =
            TABLE.iter().zip(&ids).filter(|((_, w), _)| *w == workflow).map(|(_, id)| id.as_str()).collect();
        if debounced.contains(workflow) {
            let debounce_runs = |runs: Vec<Run>| runs.into_iter().filter(|r| r.trigger["kind"] == "debounce").collect();
            let runs: Vec<Run> = wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
                let runs: Vec<Run> = debounce_runs(runs_of(redis, &a, workflow));
                (!runs.is_empty()).then_some(runs)
            })
            .unwrap_or_else(|| panic!("{workflow}: its burst started no run within 30 s"));
            assert_eq!(runs.len(), 1, "{workflow}: one run for the burst");
            let trigger = &runs[0].trigger;
            assert_eq!(trigger["triggers"], expected.len(), "{workflow}: {trigger}");
            assert!(expected.contains(trigger["last"]["eventId"].as_str().unwrap()), "{workflow}: {trigger}");
            assert_eq!(runs[0].input, json!({ "id": 1 }), "run {}", runs[0].id);
            a.wait_settled(&runs[0].id, Duration::from_secs(20));
            assert!(event_runs(redis, &a, workflow).is_empty(), "{workflow}: no run started by an event itself");
            continue;
        }
        let runs = event_runs(redis, &a, workflow);
        let got: Vec<&str> = runs.iter().map(|r| r.trigger["eventId"].as_str().unwrap()).collect();
        assert_eq!(got.len(), expected.len(), "{workflow}: event runs {got:?}, expected {expected:?}");
        assert_eq!(got.iter().copied().collect::<BTreeSet<_>>(), expected, "{workflow}");
        for run in &runs {
            assert_eq!(run.input, json!({ "id": 1 }), "run {}", run.id);
            let id = run.trigger["eventId"].as_str().unwrap();
            let listed_run = &listed[id]["runs"][0]["runId"];
            assert_eq!(listed_run, run.id.as_str(), "the event lists the run that names it");
            // Ended, or parked (user-onboarding waits for the user's verification).
            a.wait_settled(&run.id, Duration::from_secs(20));
        }
    }
    let routed = counter_sum(&[&a, &b], "eventsRouted");
    assert_eq!(routed, TABLE.len() as u64, "eventsRouted");
    eprintln!("eventsRouted a={} b={}", counter(&a, "eventsRouted"), counter(&b, "eventsRouted"));
}

#[test]
fn a_router_killed_between_starting_the_run_and_acking_never_starts_it_twice() {
    let _serial = serial();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = ReplicaConfig::new(Some(redis.url()), None, dir.path()).env("LEASE_TTL", "1s");
    // The router of this replica aborts after starting an event's runs, before the ack.
    let mut crashing = config.clone().env("WFO_TEST_CRASH_BEFORE_EVENT_ACK", "1").start("crashes");
    let id = xadd(&redis, &["type", "user.registered", "payload", r#"{"userId":7}"#]);
    let status = wait_for(Duration::from_secs(30), Duration::from_millis(50), || crashing.exited())
        .expect("the router did not abort within 30 s");
    eprintln!("router replica died: {status:?}");
    assert!(crashing.log_text().contains("aborting before the ack"), "{}", crashing.log_text());
    // Left behind: the run it started, and the event still pending (not acked).
    let pending = redis.cli(&["XPENDING", "wfo:events", "router"]);
    assert_eq!(pending.lines().next().map(str::trim), Some("1"), "XPENDING: {pending}");

    let survivor = config.start("takes-over");
    let listed = wait_handled(&survivor, std::slice::from_ref(&id), Duration::from_secs(30));
    let runs = event_runs(&redis, &survivor, "user-onboarding");
    assert_eq!(runs.len(), 1, "runs for the event: {runs:#?}");
    let run = &runs[0];
    assert_eq!(run.trigger["eventId"], id.as_str());
    assert_eq!(run.created_by, "crashes", "the one run is the one the dead router started");
    assert_eq!(listed[&id]["runs"], json!([{ "workflowId": "user-onboarding", "runId": run.id }]));
    // The run itself goes on too (the surviving replica takes its step over once the dead one's
    // lease expires), as far as it goes alone: user-onboarding then waits for `user.verified`.
    let finished = survivor.wait_settled(&run.id, Duration::from_secs(30));
    eprintln!("the event's run {} ended {}", run.id, finished["status"]);
    assert_eq!(router_backlog(&redis).map(|(pending, _)| pending), Some(0));
    assert!(
        survivor.log_text().contains("took over an event another router did not settle"),
        "{}",
        survivor.log_text()
    );
    assert_eq!(counter(&survivor, "eventsRouted"), 1);
}

// ---- 5. malformed entries ----

/// A malformed entry published: its id, its original fields, what its reason must mention.
type Malformed = (String, Vec<(&'static str, Vec<u8>)>, Vec<&'static str>);

#[test]
fn malformed_entries_are_dead_lettered_with_reasons_while_valid_ones_around_them_are_handled() {
    let _serial = serial();
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let replica = ReplicaConfig::new(Some(redis.url()), None, dir.path()).start("router");

    // A 2 MiB JSON object, over the default 1 MiB EVENT_MAX_BYTES.
    let mut big = br#"{"pad":""#.to_vec();
    big.resize(2 * 1024 * 1024 - 2, b'x');
    big.extend(br#""}"#);
    assert_eq!(big.len(), 2 * 1024 * 1024);
    let garbage: &[u8] = b"\xff\xfe\x00\x9f garbage \xc3";

    let valid = |n: u32| xadd(&redis, &["type", "user.registered", "payload", &format!(r#"{{"n":{n}}}"#)]);
    let mut valid_ids = vec![valid(1)];
    // (id, the original fields, what the reason must mention)
    let mut malformed: Vec<Malformed> = Vec::new();
    let id = xadd(&redis, &["payload", r#"{"n":2}"#]);
    malformed.push((id, vec![("payload", br#"{"n":2}"#.to_vec())], vec!["missing field `type`"]));
    valid_ids.push(valid(3));
    let id = xadd(&redis, &["type", "user.registered", "payload", "{nope"]);
    malformed.push((
        id,
        vec![("type", b"user.registered".to_vec()), ("payload", b"{nope".to_vec())],
        vec!["`payload`", "not valid JSON"],
    ));
    valid_ids.push(valid(5));
    let id = xadd_stdin(&redis, &["type", "big", "payload"], &big);
    malformed.push((
        id,
        vec![("type", b"big".to_vec()), ("payload", big.clone())],
        vec!["`payload`", "2097152 bytes", "over the limit"],
    ));
    valid_ids.push(valid(7));
    let id = xadd_stdin(&redis, &["payload", "{}", "type"], garbage);
    malformed.push((id, vec![("payload", b"{}".to_vec()), ("type", garbage.to_vec())], vec!["`type`", "not UTF-8"]));
    valid_ids.push(valid(9));
    let id = xadd_stdin(&redis, &["type", "user.registered", "payload"], garbage);
    malformed.push((
        id,
        vec![("type", b"user.registered".to_vec()), ("payload", garbage.to_vec())],
        vec!["`payload`", "not UTF-8"],
    ));
    valid_ids.push(valid(11));

    let listed = wait_handled(&replica, &valid_ids, Duration::from_secs(30));
    let runs = event_runs(&redis, &replica, "user-onboarding");
    for id in &valid_ids {
        let event = &listed[id];
        assert_eq!(event["runs"].as_array().map(Vec::len), Some(1), "{event}");
        assert_eq!(runs.iter().filter(|r| r.trigger["eventId"] == id.as_str()).count(), 1, "runs of {id}");
    }
    assert_eq!(runs.len(), valid_ids.len(), "only the valid events started runs");

    let dead = wait_for(Duration::from_secs(20), Duration::from_millis(100), || {
        let dead = xrange(redis.port, "wfo:events:dead");
        (dead.len() >= malformed.len()).then_some(dead)
    })
    .expect("the malformed entries did not all reach wfo:events:dead");
    assert_eq!(dead.len(), malformed.len(), "dead-lettered: {:?}", dead.iter().map(|d| &d.0).collect::<Vec<_>>());
    for (id, fields, mentions) in &malformed {
        let entry = dead
            .iter()
            .find(|d| field(d, "entry") == Some(id.as_bytes()))
            .unwrap_or_else(|| panic!("entry {id} is not in the dead-letter stream"));
        let reason = String::from_utf8(field(entry, "reason").expect("a reason").to_vec()).unwrap();
        for mention in mentions {
            assert!(reason.contains(mention), "entry {id}: reason {reason:?} does not mention {mention:?}");
        }
        // A dead letter keeps the first 4 KiB of each value (issue 8: bounded dead letters).
        for (name, value) in fields {
            let kept = &value[..value.len().min(4096)];
            assert_eq!(field(entry, name), Some(kept), "entry {id}: original field `{name}` kept");
        }
        let whole: usize = fields.iter().map(|(name, value)| name.len() + value.len()).sum();
        assert_eq!(field(entry, "bytes"), Some(whole.to_string().as_bytes()), "entry {id}: its size");
        let truncated: &[u8] = if whole > 4096 { b"1" } else { b"0" };
        assert_eq!(field(entry, "truncated"), Some(truncated), "entry {id}");
        eprintln!("{id}: {reason}");
    }
    // Healthy, counted, nothing left pending, and the listing still answers.
    let (status, health) = replica.get("/health");
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["counters"]["eventsDeadLettered"], malformed.len() as u64, "{health}");
    assert_eq!(health["counters"]["eventsRouted"], valid_ids.len() as u64, "{health}");
    assert_eq!(router_backlog(&redis), Some((0, Some(0))));
    let listed = listed_events(&replica);
    for (id, fields, _) in &malformed {
        if fields.iter().map(|(name, value)| name.len() + value.len()).sum::<usize>() > 1024 * 1024 + 64 * 1024 {
            // Too large to ever be handled: deleted from the bus once dead-lettered.
            assert!(!listed.contains_key(id), "the oversized entry {id} left the bus");
            continue;
        }
        assert_eq!(listed[id]["runs"], json!([]), "a malformed event is handled and started nothing");
    }
}

// ---- 6. retention under 100,000 events ----

#[test]
fn a_hundred_thousand_events_are_routed_and_the_stream_stays_within_events_max_len() {
    let _serial = serial();
    const EVENTS: u64 = 100_000;
    const MAX_LEN: u64 = 10_000;
    // `XTRIM MINID ~` removes whole macro nodes only (up to stream-node-max-entries, 100 by
    // default, per node): the node holding the cut survives with up to 99 entries older than
    // it. 200 leaves room for that node and rounding, and is far below anything a missing trim
    // would leave.
    const SLACK: u64 = 200;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = ReplicaConfig::new(Some(redis.url()), None, dir.path()).env("EVENTS_MAX_LEN", &MAX_LEN.to_string());
    let a = config.start("flood-a");
    let b = config.start("flood-b");

    // 100,000 XADDs of a type no workflow names (nothing but routing happens), as raw RESP
    // through `redis-cli --pipe`.
    let payloads = (0..EVENTS).map(|i| format!(r#"{{"i":{i}}}"#));
    let resp = xadds_resp("load.unrouted", payloads);
    let started = Instant::now();
    let piped = redis_cli_stdin(redis.port, &["--pipe"], &resp);
    assert!(piped.contains(&format!("errors: 0, replies: {EVENTS}")), "redis-cli --pipe: {piped}");
    eprintln!("published {EVENTS} events in {:?}", started.elapsed());

    // Until the router group has handled everything, sample the stream's length.
    let mut max_seen = 0;
    let mut samples = 0;
    let handled = wait_for(Duration::from_secs(300), Duration::from_millis(250), || {
        let length = xlen(&redis, "wfo:events");
        max_seen = max_seen.max(length);
        samples += 1;
        (router_backlog(&redis) == Some((0, Some(0)))).then_some(())
    });
    assert!(handled.is_some(), "not all handled in 300 s: backlog {:?}", router_backlog(&redis));
    let handled_after = started.elapsed();
    // Trimming runs every 2 s behind the router, a bounded page per pass: wait (bounded) for it
    // to converge, then watch it stay there over a few trim periods.
    let converged = wait_for(Duration::from_secs(120), Duration::from_millis(250), || {
        let length = xlen(&redis, "wfo:events");
        (length <= MAX_LEN + SLACK).then_some(length)
    });
    let trimmed_after = started.elapsed();
    assert!(converged.is_some(), "XLEN wfo:events is {} after 120 s", xlen(&redis, "wfo:events"));
    let mut lengths = Vec::new();
    for _ in 0..12 {
        lengths.push(xlen(&redis, "wfo:events"));
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "all handled after {handled_after:?}; within bound after {trimmed_after:?}; XLEN max seen {max_seen} over {samples} samples; XLEN afterwards {lengths:?}"
    );
    for length in &lengths {
        assert!(*length <= MAX_LEN + SLACK, "XLEN {length} > {MAX_LEN} + {SLACK}");
        // The newest EVENTS_MAX_LEN are kept: trimming by length cuts only the excess.
        assert!(*length >= MAX_LEN, "XLEN {length}: trimmed below EVENTS_MAX_LEN");
    }
    assert_eq!(counter_sum(&[&a, &b], "eventsRouted"), EVENTS);
    assert_eq!(counter_sum(&[&a, &b], "eventsDeadLettered"), 0);
    assert_eq!(redis_cli(redis.port, &["XLEN", "wfo:events:dead"]).trim(), "0");
}

// ---- 7. 20,000 events in one pipe, a router killed while it works ----

/// The consumers of the router group with entries pending, and how many each holds.
fn router_pending_by_consumer(redis: &RedisServer) -> BTreeMap<String, u64> {
    let reply = resp_call(redis.port, &[b"XPENDING", b"wfo:events", b"router"]);
    let Resp::Array(summary) = reply else { return BTreeMap::new() };
    let Some(Resp::Array(consumers)) = summary.get(3) else { return BTreeMap::new() };
    consumers
        .iter()
        .filter_map(|consumer| match consumer.array() {
            [Resp::Bytes(name), Resp::Bytes(count)] => {
                Some((String::from_utf8_lossy(name).into_owned(), String::from_utf8_lossy(count).parse().ok()?))
            }
            _ => None,
        })
        .collect()
}

#[test]
fn twenty_thousand_piped_events_start_their_runs_exactly_once_while_a_router_is_killed() {
    let _serial = serial();
    const EVENTS: usize = 20_000;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = workflows_file(
        dir.path(),
        "[[workflow]]\nid = \"on-load\"\nevents = [\"load.started\"]\n[[workflow.step]]\nid = \"only\"\naction = \"noop\"\n",
    );
    // A short lease so that the killed router's entries are taken over soon; the bus keeps
    // every event, so that the test can list them all afterwards.
    let config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path())
        .env("LEASE_TTL", "2s")
        .env("EVENTS_MAX_LEN", "1000000");
    let mut victim = config.start("pipe-a");
    let survivor = config.start("pipe-b");

    let payloads = (0..EVENTS).map(|i| format!(r#"{{"i":{i}}}"#));
    let resp = xadds_resp("load.started", payloads);
    let piped = redis_cli_stdin(redis.port, &["--pipe"], &resp);
    assert!(piped.contains(&format!("errors: 0, replies: {EVENTS}")), "redis-cli --pipe: {piped}");

    // Kill the victim while it holds events it has not settled (its consumer's pending
    // entries), after it has routed some.
    let routed = wait_for(Duration::from_secs(120), Duration::from_millis(20), || {
        (counter(&victim, "eventsRouted") > 0).then_some(())
    });
    assert!(routed.is_some(), "the victim routed no event within 120 s");
    let held = wait_for(Duration::from_secs(60), Duration::from_millis(1), || {
        router_pending_by_consumer(&redis)
            .into_iter()
            .find(|(consumer, count)| consumer.starts_with("pipe-a:") && *count > 0)
    });
    let (dead_consumer, _) = held.expect("the victim held unsettled events within 60 s");
    victim.kill9();
    let held_at_kill = router_pending_by_consumer(&redis).get(&dead_consumer).copied().unwrap_or(0);
    let restarted = config.start("pipe-a");

    // Everything handled: no entry pending, none left unread.
    let handled = wait_for(Duration::from_secs(300), Duration::from_millis(250), || {
        (router_backlog(&redis) == Some((0, Some(0)))).then_some(())
    });
    assert!(handled.is_some(), "not all handled in 300 s: backlog {:?}", router_backlog(&redis));

    // One run per event, each started by its own event, all completed: read from Redis
    // through the library.
    let bus = redis.cli(&["XRANGE", "wfo:events", "-", "+"]);
    let published: BTreeSet<String> = bus
        .lines()
        .map(str::trim)
        .filter(|line| {
            line.split_once('-').is_some_and(|(ms, seq)| ms.parse::<u64>().is_ok() && seq.parse::<u64>().is_ok())
        })
        .map(str::to_owned)
        .collect();
    assert_eq!(published.len(), EVENTS, "the bus keeps every event");
    let run_keys = redis.cli(&["--scan", "--pattern", "wfo:*:run:*"]);
    let runs: Vec<String> =
        run_keys.lines().filter_map(|key| key.trim().rsplit_once(":run:").map(|(_, id)| id.to_owned())).collect();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (started_by, not_completed) = runtime.block_on(async {
        let store = workflow_orchestrator::store::redis::RedisStore::open(&redis.url(), "wfo", None)
            .await
            .expect("the test connects to Redis");
        let mut started_by: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut not_completed = Vec::new();
        for run in &runs {
            let id: workflow_orchestrator::store::RunId = run.parse().expect("a run id");
            let summary = workflow_orchestrator::store::Runs::summary(&store, &id).await.expect("summary");
            let summary = summary.unwrap_or_else(|| panic!("no summary for {run}"));
            if summary.status != workflow_orchestrator::machine::Status::Completed {
                // Ended already or about to: the backlog is empty, so each was started; wait for
                // it below.
                not_completed.push(id.clone());
            }
            let log = workflow_orchestrator::store::Runs::history(&store, &id).await.expect("history");
            let first = log.and_then(|log| log.into_iter().next()).unwrap_or_else(|| panic!("no log for {run}"));
            match first.recorded.transition {
                workflow_orchestrator::machine::Transition::RunCreated {
                    trigger: workflow_orchestrator::machine::Trigger::Event { event_id, .. },
                    ..
                } => started_by.entry(event_id).or_default().push(run.clone()),
                other => panic!("run {run} was not started by an event: {other:?}"),
            }
        }
        // Runs still going when read: each completes (bounded).
        let mut still = not_completed;
        for _ in 0..600 {
            let mut next = Vec::new();
            for id in still {
                let summary = workflow_orchestrator::store::Runs::summary(&store, &id).await.expect("summary");
                if summary.as_ref().map(|s| s.status) != Some(workflow_orchestrator::machine::Status::Completed) {
                    next.push(id);
                }
            }
            still = next;
            if still.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (started_by, still)
    });
    assert!(not_completed.is_empty(), "{} runs not completed, e.g. {}", not_completed.len(), not_completed[0]);
    let doubles: Vec<(&String, &Vec<String>)> = started_by.iter().filter(|(_, runs)| runs.len() > 1).collect();
    assert!(doubles.is_empty(), "events that started more than one run: {doubles:?}");
    let started: BTreeSet<String> = started_by.keys().cloned().collect();
    let never: Vec<&String> = published.difference(&started).take(5).collect();
    assert!(
        never.is_empty(),
        "events that started no run ({} runs read, {} events started some), e.g. {never:?}",
        runs.len(),
        started.len()
    );
    assert_eq!(runs.len(), EVENTS, "one run per event");
    let took_over = [&survivor, &restarted]
        .iter()
        .map(|r| r.log_text().matches("took over an event another router did not settle").count())
        .sum::<usize>();
    if held_at_kill > 0 {
        assert!(
            took_over > 0,
            "the {held_at_kill} events the victim held were settled, but no router says it took them over"
        );
    }
    eprintln!(
        "{EVENTS} events, {} runs; the victim held {held_at_kill} unsettled events when killed; {took_over} taken over",
        runs.len()
    );
}
