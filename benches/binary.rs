//! `binary`: the `chain3` workload through the release binary of this crate, as users start runs:
//! by events on the bus and over REST. `benches/chain3.rs` measures the same workload on an
//! in-process engine; the peer is `../shared/peers/bullmq` (`node bench.mjs --scenario chain3`).
//!
//! It starts `target/release/workflow-orchestrator` (or `--binary PATH`; build it first with
//! `cargo build --release --bin workflow-orchestrator`) as one replica on a private Redis on
//! 127.0.0.1:`--port`, which it FLUSHALLs before each scenario: never point it at a Redis you
//! care about. The replica gets a workflow file of its own: `chain3`, 3 sequential `noop` steps,
//! subscribed to the event type `bench.chain3`; `MAX_CONCURRENT_STEPS` = `--concurrency`; every
//! other setting is the binary's default (its environment is cleared; `--engine-env K=V` adds to
//! it). Each scenario starts a fresh replica, runs `--warmup` runs (default 500, not measured),
//! then N:
//!
//! - `events`: N `XADD wfo:events * type bench.chain3 payload {"i":k}` pipelined in chunks of
//!   `--chunk` (default 500) on one raw connection, as fast as Redis takes them (open loop, like
//!   `redis-cli --pipe`), each run to completion. runs/s is from the first XADD to the last run
//!   completed; latency is from the XADD's chunk being written to the run's completion, so it
//!   includes the wait behind the runs queued before it.
//! - `rest`: N `POST /api/workflows/chain3/trigger` (`Content-Type: application/json`) from
//!   `--concurrency` hyper clients, each on its own keep-alive connection, closed loop: at most
//!   `--inflight` (default 2 x concurrency, like the peer) runs triggered and not finished; each
//!   run to completion. Latency is from just before the request to the run's completion.
//!
//! How completions are seen, without perturbing the run much: a poller on its own connection
//! sends, every `--poll-ms` (default 5), one pipeline of a `ZCARD` per shard of the workflow's
//! `completed` index (and every tenth time of its `failed` index too): O(1) commands, about
//! 3,500 a second at 16 shards, left out of the command counts below (the poller counts what it
//! sends; give or take the one poll in flight at each end of the window) but not out of Redis
//! CPU (a `ZCARD` takes ~0.6 us: with the I/O, about 0.5% of a core, well under 1 us a step at
//! thousands of steps a second). The closed loop of `rest` learns of completions from it, so
//! `--poll-ms` bounds how fast a slot is refilled (lower it for `--concurrency 1`). Latencies are
//! read once the measurement is over, from each run's summary through the library
//! (`RedisStore::summary`: `updated_at` of the finished run, in ms on the replica's clock, which
//! is calibrated to Redis's; + 0.5 ms for the truncation), and, for `events`, which run each entry
//! started from the bus (`RedisStore::recent_events`): resolution about 1 ms.
//!
//! `--traces on` sets `OTEL_EXPORTER_OTLP_ENDPOINT` to a sink of the driver's own on loopback
//! (it answers every export 200 and keeps nothing): the cost of tracing, against `off`.
//!
//! ```sh
//! cargo build --release --bin workflow-orchestrator
//! cargo bench --bench binary -- --port 6390 --scenario events,rest --concurrency 50 --n 20000
//! ```
//!
//! Prints one JSON line per scenario on stdout (progress on stderr), with the field names of
//! `benches/chain3.rs` where they mean the same: `runs_per_s`, `steps_per_s`, `run_latency_ms`,
//! `redis_cmds_per_step`, `redis_calls_per_step`, `redis_usec_per_step`,
//! `redis_cpu_us_per_step` (INFO commandstats and INFO cpu deltas, from just before the first
//! start to the poll that saw the last run finished), `engine_cpu_us_per_step` (the binary's
//! utime+stime from /proc/<pid>/stat over the same window), `mem.bytes_per_run` (INFO
//! `used_memory` without client buffers, after the ready streams are trimmed
//! (`Runs::housekeeping`) and the replica stopped, minus the same before the N runs, over the
//! runs; every run's history is kept, and for `events` the bus entries and the record of the
//! runs each started too: `mem.events_stream_bytes` says how much of it is the bus stream).

#[path = "common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::{Admin, Reply, Snapshot, encode, flag, number, percentiles, process_cpu, round, wall_ms};
use futures::stream::{self, StreamExt};
use http_body_util::{BodyExt, Full};
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use workflow_orchestrator::store::keys::Keys;
use workflow_orchestrator::store::prelude::*;
use workflow_orchestrator::store::redis::RedisStore;
use workflow_orchestrator::store::{EntryCap, EventQuery, RunId};

const BENCH: &str = "binary";
const PREFIX: &str = "wfo";
const WORKFLOW: &str = "chain3";
const EVENT_TYPE: &str = "bench.chain3";
const STEPS_PER_RUN: u64 = 3;
const DEFINITIONS: &str = r#"
[[workflow]]
id = "chain3"
description = "benchmark: three sequential no-op steps"
events = ["bench.chain3"]
[[workflow.step]]
id = "s1"
action = "noop"
[[workflow.step]]
id = "s2"
action = "noop"
[[workflow.step]]
id = "s3"
action = "noop"
"#;

const USAGE: &str = "usage: cargo bench --bench binary -- --port PORT [--scenario events,rest] [--binary PATH] \
[--concurrency 50] [--n 20000] [--inflight 2xC] [--warmup 500] [--time-limit 120] [--shards N (default: the engine's: 1 on a standalone Redis, 16 on a cluster)] [--chunk 500] \
[--poll-ms 5] [--engine-env K=V]... [--traces off|on] [--run-index K] [--tag TEXT]
  Talks only to 127.0.0.1:PORT and FLUSHALLs it: use a private, throwaway redis-server.
  The binary: cargo build --release --bin workflow-orchestrator";

fn log(message: &str) {
    common::log(BENCH, message);
}

// ---------------------------------------------------------------- arguments

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Events,
    Rest,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Events => "events",
            Scenario::Rest => "rest",
        }
    }
}

struct Args {
    port: u16,
    binary: PathBuf,
    scenarios: Vec<Scenario>,
    concurrency: usize,
    n: usize,
    inflight: usize,
    warmup: usize,
    time_limit: Duration,
    /// `None`: the engine's default (`SHARDS` unset).
    shards: Option<u16>,
    chunk: usize,
    poll: Duration,
    engine_env: Vec<(String, String)>,
    /// `--traces on`: the replica exports OTLP to a sink of this driver's on loopback.
    otlp_sink: bool,
    run_index: Option<u64>,
    tag: Option<String>,
}

/// `$CARGO_TARGET_DIR/release/workflow-orchestrator`, or `target/release/` of this crate.
fn default_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("release").join("workflow-orchestrator")
}

fn parse_args() -> Result<Args, String> {
    let values = common::parse_flags(&[
        "port",
        "binary",
        "scenario",
        "concurrency",
        "n",
        "inflight",
        "warmup",
        "time-limit",
        "shards",
        "chunk",
        "poll-ms",
        "engine-env",
        "traces",
        "run-index",
        "tag",
    ])?;
    let port = common::port(&values)?;
    let concurrency: usize = number(&values, "concurrency", 50)?;
    let n: usize = number(&values, "n", 20_000)?;
    if concurrency == 0 || n == 0 {
        return Err("--concurrency and --n must be at least 1".to_owned());
    }
    let inflight: usize = number(&values, "inflight", 2 * concurrency)?;
    if inflight == 0 {
        return Err("--inflight must be at least 1".to_owned());
    }
    let mut scenarios = Vec::new();
    for name in flag(&values, "scenario").unwrap_or("events,rest").split(',').map(str::trim) {
        let scenario = match name {
            "events" => Scenario::Events,
            "rest" => Scenario::Rest,
            other => return Err(format!("--scenario: `{other}` is not one of events, rest")),
        };
        if !scenarios.contains(&scenario) {
            scenarios.push(scenario);
        }
    }
    let mut engine_env = Vec::new();
    for (name, value) in &values {
        if name == "engine-env" {
            let (key, value) = value.split_once('=').ok_or_else(|| format!("--engine-env `{value}`: expected K=V"))?;
            engine_env.push((key.to_owned(), value.to_owned()));
        }
    }
    let chunk: usize = number(&values, "chunk", 500)?;
    let poll_ms: f64 = number(&values, "poll-ms", 5.0)?;
    if chunk == 0 || !(0.1..=1000.0).contains(&poll_ms) {
        return Err("--chunk must be at least 1 and --poll-ms between 0.1 and 1000".to_owned());
    }
    Ok(Args {
        port,
        binary: flag(&values, "binary").map_or_else(default_binary, PathBuf::from),
        scenarios,
        concurrency,
        n,
        inflight,
        warmup: number(&values, "warmup", 500)?,
        time_limit: Duration::from_secs_f64(number(&values, "time-limit", 120.0)?),
        shards: common::flag(&values, "shards").map(|_| number(&values, "shards", 16)).transpose()?,
        chunk,
        poll: Duration::from_secs_f64(poll_ms / 1e3),
        engine_env,
        otlp_sink: match flag(&values, "traces").unwrap_or("off") {
            "on" => true,
            "off" => false,
            other => return Err(format!("--traces: `{other}` is not on or off")),
        },
        run_index: flag(&values, "run-index").map(|_| number(&values, "run-index", 0)).transpose()?,
        tag: flag(&values, "tag").map(str::to_owned),
    })
}

/// A warning when a source file is newer than the binary: measuring an old build by mistake.
fn warn_if_stale(binary: &Path) {
    let Ok(built) = std::fs::metadata(binary).and_then(|m| m.modified()) else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pending = vec![root.join("src"), root.join("migrations")];
    let mut newer = Vec::new();
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if entry.metadata().and_then(|m| m.modified()).is_ok_and(|m| m > built) {
                newer.push(path);
            }
        }
    }
    if let Some(first) = newer.first() {
        log(&format!(
            "warning: {} source file(s) are newer than {} (e.g. {}): rebuild with `cargo build --release --bin workflow-orchestrator`",
            newer.len(),
            binary.display(),
            first.display()
        ));
    }
}

// ---------------------------------------------------------------- the replica

/// The address in the binary's announcement: `listening on http://<address>` as a text line,
/// or inside a JSON log line (its message); the address ends at the next `"` or whitespace.
fn listening_address(line: &str) -> Option<SocketAddr> {
    const MARK: &str = "listening on http://";
    let rest = &line[line.find(MARK)? + MARK.len()..];
    let end = rest.find(|c: char| c == '"' || c.is_whitespace()).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// One replica: the release binary as a child process, its output appended to a log file.
struct Replica {
    child: Child,
    pid: u32,
    address: SocketAddr,
    log: PathBuf,
}

impl Replica {
    /// Must be called on the thread that lives as long as the benchmark (the main thread,
    /// inside `block_on`): the child gets SIGKILL when the thread that started it ends, so that
    /// a benchmark killed by ^C or a time limit leaves no replica behind.
    fn start(args: &Args, workflows: &Path, log: &Path) -> Result<Replica, String> {
        let open_log = || std::fs::OpenOptions::new().create(true).append(true).open(log);
        let log_file = open_log().map_err(|e| format!("log file {}: {e}", log.display()))?;
        let mut command = Command::new(&args.binary);
        if let Some(shards) = args.shards {
            command.env("SHARDS", shards.to_string());
        }
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("REDIS_URL", format!("redis://{}:{}", common::HOST, args.port))
            .env("KEY_PREFIX", PREFIX)
            .env("PORT", "0")
            .env("BIND_ADDR", "127.0.0.1")
            .env("REPLICA_ID", "bench-binary")
            .env("WORKFLOWS_FILE", workflows)
            .env("MAX_CONCURRENT_STEPS", args.concurrency.to_string())
            .env("SHUTDOWN_GRACE", "5s")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file);
        for (key, value) in &args.engine_env {
            command.env(key, value);
        }
        if args.otlp_sink {
            command.env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{}", otlp_sink()));
        }
        // SAFETY: between fork and exec only one prctl system call runs, which is
        // async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let mut child = command.spawn().map_err(|e| format!("cannot start {}: {e}", args.binary.display()))?;
        let pid = child.id();
        let stdout = child.stdout.take().expect("piped stdout");
        let mut copy = open_log().map_err(|e| format!("log file {}: {e}", log.display()))?;
        let (sender, receiver) = std::sync::mpsc::channel();
        // Reads standard output to its end (so the replica never blocks on a full pipe),
        // copying it to the log and handing over the announced address.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(address) = listening_address(&line) {
                    let _ = sender.send(address);
                }
                let _ = writeln!(copy, "{line}");
            }
        });
        let mut replica = Replica { child, pid, address: SocketAddr::from(([127, 0, 0, 1], 0)), log: log.to_owned() };
        let deadline = Instant::now() + Duration::from_secs(30);
        replica.address = loop {
            match receiver.recv_timeout(Duration::from_millis(100)) {
                Ok(address) => break address,
                Err(_) if Instant::now() > deadline => {
                    return Err(format!("the replica did not announce its address within 30 s{}", replica.log_tail()));
                }
                Err(_) => {
                    if let Ok(Some(status)) = replica.child.try_wait() {
                        return Err(format!("the replica exited at start ({status}){}", replica.log_tail()));
                    }
                }
            }
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while http_status(replica.address, "/health") != Some(200) {
            if Instant::now() > deadline {
                return Err(format!("the replica's /health did not answer 200 within 15 s{}", replica.log_tail()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(replica)
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "; the end of its log ({}):\n{}",
            self.log.display(),
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }

    /// SIGTERM, then SIGKILL after 15 s. Whether it exited by itself in time.
    fn stop(&mut self) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        if self.child.try_wait().ok().flatten().is_some() {
            return false;
        }
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The status of `GET path`, on a connection of its own (for /health at start).
fn http_status(address: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

// ---------------------------------------------------------------- the completion poller

/// Runs of the workflow finished so far, as the poller last saw them.
#[derive(Debug, Clone, Copy, Default)]
struct Finished {
    completed: u64,
    failed: u64,
}

impl Finished {
    fn total(&self) -> u64 {
        self.completed + self.failed
    }
}

/// Counts finished runs on a connection of its own: see the module's comment.
struct Poller {
    /// Set to end the thread.
    stop: Arc<AtomicBool>,
    /// Commands it sent, to leave out of the measurement's command counts.
    commands: Arc<AtomicU64>,
    finished: watch::Receiver<Finished>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl Poller {
    fn start(port: u16, keys: &Keys, every: Duration) -> Result<Poller, String> {
        let mut admin = Admin::connect(port)?;
        let zcards = |status: &str| {
            let mut request = Vec::new();
            for shard in 0..keys.shards() {
                let key = keys.index_workflow_finished(shard, WORKFLOW, status);
                encode(&[b"ZCARD", key.as_bytes()], &mut request);
            }
            request
        };
        let (completed, failed) = (zcards("completed"), zcards("failed"));
        let both = [completed.as_slice(), failed.as_slice()].concat();
        let shards = usize::from(keys.shards());
        let stop = Arc::new(AtomicBool::new(false));
        let commands = Arc::new(AtomicU64::new(0));
        let (sender, finished) = watch::channel(Finished::default());
        let thread = {
            let (stop, commands) = (Arc::clone(&stop), Arc::clone(&commands));
            std::thread::spawn(move || -> Result<(), String> {
                let sum = |replies: &[Reply]| replies.iter().map(|r| r.integer().unwrap_or(0).max(0) as u64).sum();
                let mut seen = Finished::default();
                let mut round = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Failures are rare here: their count is refreshed every tenth poll.
                    let with_failed = round.is_multiple_of(10);
                    round += 1;
                    let (request, count) = if with_failed { (&both, 2 * shards) } else { (&completed, shards) };
                    let replies = admin.pipeline(request, count)?;
                    commands.fetch_add(count as u64, Ordering::Relaxed);
                    let now = Finished {
                        completed: sum(&replies[..shards]),
                        failed: if with_failed { sum(&replies[shards..]) } else { seen.failed },
                    };
                    if now.completed != seen.completed || now.failed != seen.failed {
                        seen = now;
                        sender.send_replace(now);
                    }
                    std::thread::sleep(every);
                }
                Ok(())
            })
        };
        Ok(Poller { stop, commands, finished, thread: Some(thread) })
    }

    fn now(&self) -> Finished {
        *self.finished.borrow()
    }

    /// Waits until `target` runs finished or `deadline`; whether they did.
    async fn wait_for(&self, target: u64, deadline: tokio::time::Instant) -> bool {
        let mut finished = self.finished.clone();
        tokio::time::timeout_at(deadline, finished.wait_for(|f| f.total() >= target)).await.is_ok_and(|r| r.is_ok())
    }

    fn stop(&mut self) -> Result<(), String> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(std::thread::JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err("the poller panicked".to_owned()),
            None => Ok(()),
        }
    }
}

impl Drop for Poller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------- the two ways runs start

/// What started one run: an entry id on the bus (`events`) or a run id (`rest`), and when the
/// request was written (ms since the epoch).
struct Started {
    what: String,
    at_ms: f64,
}

/// The XADDs of runs `first..first + count`, pipelined in chunks on one connection.
fn publish_events(
    port: u16,
    stream: &str,
    first: usize,
    count: usize,
    chunk: usize,
) -> Result<(Vec<Started>, usize), String> {
    let mut admin = Admin::connect(port)?;
    let mut started = Vec::with_capacity(count);
    let mut errors = 0;
    let mut request = Vec::new();
    for from in (first..first + count).step_by(chunk) {
        let to = (from + chunk).min(first + count);
        request.clear();
        for i in from..to {
            let payload = format!("{{\"i\":{i}}}");
            encode(
                &[b"XADD", stream.as_bytes(), b"*", b"type", EVENT_TYPE.as_bytes(), b"payload", payload.as_bytes()],
                &mut request,
            );
        }
        let at_ms = wall_ms();
        for reply in admin.pipeline(&request, to - from)? {
            match reply {
                Reply::Bulk(Some(id)) => {
                    started.push(Started { what: String::from_utf8_lossy(&id).into_owned(), at_ms })
                }
                other => {
                    errors += 1;
                    if errors <= 5 {
                        log(&format!("XADD failed: {}", other.text()));
                    }
                }
            }
        }
    }
    Ok((started, errors))
}

/// What the REST clients share: the closed loop's counts.
struct Loop {
    n: usize,
    inflight: usize,
    /// Finished runs counted by the poller before this phase.
    base: u64,
    /// Triggers sent (or about to be), the slots taken.
    started: AtomicUsize,
    /// Triggers that failed: their slots are free again, they will never finish.
    lost: AtomicUsize,
    /// Set at the time limit: no new triggers.
    stop: AtomicBool,
}

/// One client: one keep-alive connection, triggers while the loop has a free slot.
async fn rest_client(
    address: SocketAddr,
    shared: Arc<Loop>,
    mut finished: watch::Receiver<Finished>,
) -> Result<Vec<Started>, String> {
    let connect = || async {
        let stream = tokio::net::TcpStream::connect(address).await.map_err(|e| format!("connect {address}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(connection);
        Ok::<_, String>(sender)
    };
    let mut sender = connect().await?;
    let host = address.to_string();
    let uri = format!("/api/workflows/{WORKFLOW}/trigger");
    let mut started = Vec::new();
    loop {
        // Take a slot: at most `inflight` runs triggered and not finished.
        let i = loop {
            if shared.stop.load(Ordering::Relaxed) {
                return Ok(started);
            }
            let taken = shared.started.load(Ordering::Acquire);
            if taken >= shared.n {
                return Ok(started);
            }
            let done =
                finished.borrow().total().saturating_sub(shared.base) as usize + shared.lost.load(Ordering::Relaxed);
            if taken.saturating_sub(done) >= shared.inflight {
                // The stop flag is looked at again at least every 100 ms.
                let _ = tokio::time::timeout(Duration::from_millis(100), finished.changed()).await;
                continue;
            }
            if shared.started.compare_exchange(taken, taken + 1, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                break taken;
            }
        };
        let body = Bytes::from(format!("{{\"inputData\":{{\"i\":{i}}}}}"));
        let request = hyper::Request::post(uri.as_str())
            .header(hyper::header::HOST, host.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let at_ms = wall_ms();
        let outcome = async {
            sender.ready().await.map_err(|e| format!("connection: {e}"))?;
            let response = sender.send_request(request).await.map_err(|e| format!("request: {e}"))?;
            let status = response.status();
            let body = response.into_body().collect().await.map_err(|e| format!("response: {e}"))?.to_bytes();
            let reply: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            match (status.as_u16(), reply["runId"].as_str()) {
                (202, Some(run)) => Ok(run.to_owned()),
                _ => Err(format!("{status}: {}", String::from_utf8_lossy(&body))),
            }
        }
        .await;
        match outcome {
            Ok(run) => started.push(Started { what: run, at_ms }),
            Err(problem) => {
                let lost = shared.lost.fetch_add(1, Ordering::Relaxed) + 1;
                if lost <= 5 {
                    log(&format!("trigger failed: {problem}"));
                }
                if sender.is_closed() {
                    sender = connect().await?;
                }
            }
        }
    }
}

// ---------------------------------------------------------------- a scenario

/// One scenario's private set-up: a flushed Redis, a fresh replica, the library's store (for
/// housekeeping and for reading the runs afterwards) and the poller.
struct Session {
    admin: Admin,
    store: RedisStore,
    replica: Replica,
    poller: Poller,
    after_flush: Snapshot,
}

/// What one phase (the warm-up or the measurement) saw.
struct Phase {
    started: Vec<Started>,
    errors: usize,
    stop_reason: &'static str,
    t_start_ms: f64,
    t_end_ms: f64,
    /// The time to write every XADD (`events`).
    enqueue_s: Option<f64>,
    /// Finished runs of this phase when the measurement ended.
    finished: u64,
    snap_start: Snapshot,
    snap_end: Snapshot,
    engine_cpu: f64,
    driver_cpu: f64,
    poll_commands: u64,
    /// Finished runs of this phase once the ones in flight at the end were drained.
    drained: u64,
}

async fn phase(
    args: &Args,
    session: &mut Session,
    scenario: Scenario,
    first: usize,
    n: usize,
    time_limit: Duration,
) -> Result<Phase, String> {
    let base = session.poller.now().total();
    let target = base + n as u64;
    let stream = session.store.keys().events();
    let snap_start = session.admin.info()?;
    let commands0 = session.poller.commands.load(Ordering::Relaxed);
    let (engine0, driver0) = (process_cpu(Some(session.replica.pid)), process_cpu(None));
    let t_start_ms = wall_ms();
    let deadline = tokio::time::Instant::now() + time_limit;
    let (port, chunk) = (args.port, args.chunk);

    enum Producer {
        Events(tokio::task::JoinHandle<Result<(Vec<Started>, usize), String>>),
        Rest(Arc<Loop>, Vec<tokio::task::JoinHandle<Result<Vec<Started>, String>>>),
    }
    let producer = match scenario {
        Scenario::Events => Producer::Events(tokio::task::spawn_blocking(move || {
            let sent = publish_events(port, &stream, first, n, chunk);
            sent.map(|(started, errors)| {
                log(&format!("{} events written in {:.3} s", started.len(), (wall_ms() - t_start_ms) / 1e3));
                (started, errors)
            })
        })),
        Scenario::Rest => {
            let shared = Arc::new(Loop {
                n,
                inflight: args.inflight,
                base,
                started: AtomicUsize::new(0),
                lost: AtomicUsize::new(0),
                stop: AtomicBool::new(false),
            });
            let clients = (0..args.concurrency.min(n))
                .map(|_| {
                    tokio::spawn(rest_client(
                        session.replica.address,
                        Arc::clone(&shared),
                        session.poller.finished.clone(),
                    ))
                })
                .collect();
            Producer::Rest(shared, clients)
        }
    };

    let all_done = session.poller.wait_for(target, deadline).await;
    let snap_end = session.admin.info()?;
    let t_end_ms = wall_ms();
    let (engine1, driver1) = (process_cpu(Some(session.replica.pid)), process_cpu(None));
    let poll_commands = session.poller.commands.load(Ordering::Relaxed) - commands0;
    let finished = session.poller.now().total() - base;
    let stop_reason = if all_done { "done" } else { "time_limit" };
    if !all_done {
        log(&format!("time limit: {finished} of {n} runs finished; draining the runs in flight"));
    }

    let (started, errors, enqueue_s) = match producer {
        Producer::Events(sender) => {
            let (started, errors) = sender.await.map_err(|e| format!("the XADD sender: {e}"))??;
            let last = started.last().map_or(t_start_ms, |s| s.at_ms);
            (started, errors, Some(round((last - t_start_ms) / 1e3, 3)))
        }
        Producer::Rest(shared, clients) => {
            shared.stop.store(true, Ordering::Relaxed);
            let mut started = Vec::with_capacity(n);
            for client in clients {
                started.extend(client.await.map_err(|e| format!("a REST client: {e}"))??);
            }
            (started, shared.lost.load(Ordering::Relaxed), None)
        }
    };
    // The runs still in flight finish before memory is read (their count is not measured).
    let drain = tokio::time::Instant::now() + Duration::from_secs(20);
    if !session.poller.wait_for(base + started.len() as u64, drain).await {
        log(&format!(
            "{} runs still in flight after the drain",
            base + started.len() as u64 - session.poller.now().total()
        ));
    }
    let drained = session.poller.now().total() - base;
    Ok(Phase {
        started,
        errors,
        stop_reason,
        t_start_ms,
        t_end_ms,
        enqueue_s,
        finished,
        snap_start,
        snap_end,
        engine_cpu: engine1 - engine0,
        driver_cpu: driver1 - driver0,
        poll_commands,
        drained,
    })
}

/// Each started run's latency (ms) and completion time, from the runs' summaries; `failed`
/// counts the runs that ended otherwise.
struct Completions {
    latencies: Vec<f64>,
    last_completed_ms: f64,
    completed_in_time: usize,
    failed: usize,
    unknown: usize,
}

async fn completions(
    store: &RedisStore,
    scenario: Scenario,
    started: &[Started],
    until_ms: f64,
) -> Result<Completions, String> {
    // `events`: which run each entry started, from the bus's record of it.
    let runs: Vec<(Option<RunId>, f64)> = match scenario {
        Scenario::Rest => started.iter().map(|s| (s.what.parse().ok(), s.at_ms)).collect(),
        Scenario::Events => {
            let mut run_of: HashMap<String, RunId> = HashMap::with_capacity(started.len());
            let mut before: Option<String> = None;
            loop {
                let query = EventQuery {
                    before: before.as_deref(),
                    event_type: None,
                    limit: 500,
                    scan: 500,
                    cap: EntryCap::IDS,
                };
                let page = store.recent_events(query).await.map_err(|e| format!("reading the bus: {e}"))?;
                let Some(last) = page.last() else { break };
                before = Some(last.entry.id.clone());
                for listed in &page {
                    let run = listed.started.iter().flatten().find(|(workflow, _)| workflow == WORKFLOW);
                    if let Some(run) = run.and_then(|(_, run)| run.parse().ok()) {
                        run_of.insert(listed.entry.id.clone(), run);
                    }
                }
                if page.len() < 500 {
                    break;
                }
            }
            started.iter().map(|s| (run_of.get(&s.what).cloned(), s.at_ms)).collect()
        }
    };
    let summaries: Vec<_> = stream::iter(runs.into_iter().map(|(run, at_ms)| async move {
        match run {
            Some(run) => (store.summary(&run).await, at_ms),
            None => (Ok(None), at_ms),
        }
    }))
    .buffer_unordered(64)
    .collect()
    .await;
    let mut out =
        Completions { latencies: Vec::new(), last_completed_ms: 0.0, completed_in_time: 0, failed: 0, unknown: 0 };
    for (summary, at_ms) in summaries {
        match summary.map_err(|e| format!("reading a summary: {e}"))? {
            Some(summary) if summary.status == workflow_orchestrator::machine::Status::Completed => {
                // `updated_at` is truncated to the ms: the middle of that ms.
                let done_ms = summary.updated_at as f64 + 0.5;
                if done_ms <= until_ms + 1.0 {
                    out.completed_in_time += 1;
                    out.latencies.push(done_ms - at_ms);
                    out.last_completed_ms = out.last_completed_ms.max(done_ms);
                }
            }
            Some(summary) if summary.status.is_terminal() => out.failed += 1,
            _ => out.unknown += 1,
        }
    }
    Ok(out)
}

async fn scenario(args: &Args, scenario: Scenario) -> Result<Value, String> {
    let name = scenario.name();
    let mut admin = Admin::connect(args.port)?;
    admin.call(&["PING"])?;
    admin.call(&["FLUSHALL"])?;
    let after_flush = admin.info()?;
    let dir = tempfile::Builder::new().prefix("wfo-bench-binary.").tempdir().map_err(|e| e.to_string())?;
    let workflows = dir.path().join("workflows.toml");
    std::fs::write(&workflows, DEFINITIONS).map_err(|e| e.to_string())?;
    let replica_log = std::env::temp_dir().join(format!("wfo-bench-binary-{name}-{}.log", std::process::id()));
    let replica = Replica::start(args, &workflows, &replica_log)?;
    log(&format!("{name}: replica pid {} on http://{}, log {}", replica.pid, replica.address, replica_log.display()));
    let url = format!("redis://{}:{}", common::HOST, args.port);
    let store = RedisStore::open(&url, PREFIX, args.shards).await.map_err(|e| e.to_string())?;
    let poller = Poller::start(args.port, store.keys(), args.poll)?;
    let mut session = Session { admin, store, replica, poller, after_flush };

    if args.warmup > 0 {
        let n = args.warmup.min(args.n);
        log(&format!("{name}: warm-up, {n} runs"));
        let warm = phase(args, &mut session, scenario, 0, n, Duration::from_secs(30)).await?;
        if warm.stop_reason != "done" {
            return Err(format!("{name}: the warm-up did not finish within 30 s{}", session.replica.log_tail()));
        }
    }
    common::trim_ready(&session.store, &mut session.admin).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = session.admin.info()?;

    log(&format!("{name}: measure, concurrency {} n {}", args.concurrency, args.n));
    let measured = phase(args, &mut session, scenario, args.warmup, args.n, args.time_limit).await?;
    session.poller.stop()?;

    // Memory: ready streams trimmed, replica stopped, every run's history kept.
    let (ready_before_housekeeping, ready_entries_left, housekeeping_passes) =
        common::trim_ready(&session.store, &mut session.admin).await?;
    let shutdown_in_time = session.replica.stop();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = session.admin.info()?;
    let dbsize = session.admin.call(&["DBSIZE"])?.integer().unwrap_or(0);
    let events_stream = session.store.keys().events();
    let events_stream_bytes = session.admin.call(&["MEMORY", "USAGE", &events_stream])?.integer().unwrap_or(0);

    let done = completions(&session.store, scenario, &measured.started, measured.t_end_ms).await?;
    let Phase { started, errors, stop_reason, t_start_ms, t_end_ms, .. } = &measured;
    let runs = done.completed_in_time;
    let end_ms = if *stop_reason == "done" && runs > 0 { done.last_completed_ms } else { *t_end_ms };
    let elapsed = ((end_ms - t_start_ms) / 1e3).max(1e-3);
    // The Redis and CPU windows end at the poll that saw the last run finished.
    let steps = measured.finished * STEPS_PER_RUN;
    let window = ((t_end_ms - t_start_ms) / 1e3).max(1e-3);
    let mut latencies = done.latencies;

    let mut report = Map::new();
    let fields = json!({
        "scenario": "chain3",
        "mode": format!("binary-{name}"),
        "engine": "workflow-orchestrator",
        "binary": args.binary.display().to_string(),
        "concurrency": args.concurrency,
        "inflight": match scenario { Scenario::Rest => json!(args.inflight.min(args.n)), Scenario::Events => json!(args.n) },
        "shards": session.store.keys().shards(),
        "n_requested": args.n,
        "warmup": args.warmup.min(args.n),
        "stop_reason": stop_reason,
        "runs_started": started.len(),
        "runs_completed": runs,
        "steps_completed": runs as u64 * STEPS_PER_RUN,
        "steps_expected": args.n as u64 * STEPS_PER_RUN,
        "failed": done.failed,
        "runs_not_found": done.unknown,
        "trigger_errors": errors,
        "enqueue_s": measured.enqueue_s,
        "elapsed_s": round(elapsed, 3),
        "runs_per_s": round(runs as f64 / elapsed, 1),
        "steps_per_s": round(runs as f64 * STEPS_PER_RUN as f64 / elapsed, 1),
        "run_latency_ms": percentiles(&mut latencies),
        "latency_resolution_ms": 1,
        "engine_cpu_util": round(measured.engine_cpu / window, 2),
        "engine_cpu_us_per_step": round(measured.engine_cpu * 1e6 / steps.max(1) as f64, 1),
        "driver_cpu_util": round(measured.driver_cpu / window, 2),
        "poll": { "interval_ms": args.poll.as_secs_f64() * 1e3, "commands": measured.poll_commands },
        "shutdown_in_time": shutdown_in_time,
        "redis_aof": after.aof,
        "redis": after.redis_version,
        "run_index": args.run_index,
        "tag": args.tag,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "when": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    });
    if let Value::Object(fields) = fields {
        report.extend(fields);
    }
    report.extend(common::redis_report(
        &measured.snap_start,
        &measured.snap_end,
        steps,
        window,
        &[("zcard", measured.poll_commands)],
    ));
    let mut mem = common::memory_report(
        &session.after_flush,
        &before,
        &after,
        measured.drained as usize,
        measured.drained * STEPS_PER_RUN,
    );
    mem.insert("dbsize".into(), json!(dbsize));
    mem.insert("housekeeping_passes".into(), json!(housekeeping_passes));
    mem.insert("ready_entries_before_housekeeping".into(), json!(ready_before_housekeeping));
    mem.insert("ready_entries_left".into(), json!(ready_entries_left));
    mem.insert("events_stream_bytes".into(), json!(events_stream_bytes));
    report.insert("mem".into(), Value::Object(mem));
    drop(session);
    let _ = std::fs::remove_file(&replica_log);
    Ok(Value::Object(report))
}

async fn run(args: Args) -> Result<(), String> {
    if !args.binary.is_file() {
        return Err(format!(
            "no binary at {}: build it with `cargo build --release --bin workflow-orchestrator` or pass --binary PATH",
            args.binary.display()
        ));
    }
    warn_if_stale(&args.binary);
    for &which in &args.scenarios {
        let report = scenario(&args, which).await?;
        println!("{report}");
    }
    Ok(())
}

/// The port of a sink for OTLP/HTTP exports (`--traces on`): answers every request 200 and
/// keeps nothing, so that a measurement with traces on costs the replica what exporting costs it,
/// not what a collector does. Started once, on a thread of its own, for the whole process.
fn otlp_sink() -> u16 {
    static PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *PORT.get_or_init(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port for the OTLP sink");
        let port = listener.local_addr().expect("the sink's address").port();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || serve_otlp_connection(stream));
            }
        });
        port
    })
}

/// Reads requests off one keep-alive connection (headers, then `Content-Length` bytes) and
/// answers each `200` with an empty body, until the client closes it.
fn serve_otlp_connection(stream: std::net::TcpStream) {
    use std::io::{BufRead, Read, Write};
    let mut writer = match stream.try_clone() {
        Ok(writer) => writer,
        Err(_) => return,
    };
    let mut reader = std::io::BufReader::new(stream);
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        if std::io::copy(&mut (&mut reader).take(length as u64), &mut std::io::sink()).is_err()
            || writer
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n")
                .is_err()
        {
            return;
        }
    }
}

fn main() {
    // `cargo test --all-targets` runs bench targets too, with no arguments: nothing to measure.
    if std::env::args().len() <= 1 {
        eprintln!(
            "binary: a benchmark; run it with `cargo bench --bench binary -- --port PORT` (nothing to do without arguments)"
        );
        return;
    }
    let args = match parse_args() {
        Ok(args) => args,
        Err(problem) => {
            eprintln!("binary: {problem}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    let hard_limit = (args.time_limit + Duration::from_secs(180)) * args.scenarios.len() as u32;
    // The scenarios run on this (the main) thread, which the replicas' parent-death signal
    // is tied to: see `Replica::start`.
    let result = runtime.block_on(async move {
        match tokio::time::timeout(hard_limit, run(args)).await {
            Ok(result) => result,
            Err(_) => Err("hard time limit hit".to_owned()),
        }
    });
    if let Err(problem) = result {
        log(&format!("fatal: {problem}"));
        std::process::exit(1);
    }
    runtime.shutdown_timeout(Duration::from_secs(1));
}
