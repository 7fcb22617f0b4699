//! `chain3`: the peer benchmark's workload (`../shared/peers/bullmq/bench.mjs --scenario chain3
//! --mode add`) on this engine, so that the two print comparable JSON lines.
//!
//! N runs of a workflow of 3 sequential `noop` steps, on ONE in-process engine (one replica,
//! `MAX_CONCURRENT_STEPS` = `--concurrency`) against a private Redis on 127.0.0.1:`--port`, which
//! it FLUSHALLs first: never point it at a Redis you care about. Closed loop: at most
//! `--inflight` (default 2 x concurrency) runs in flight; each finished run starts the next one
//! until N were started. Latency: from just before `Engine::trigger` to the run's completion as
//! announced by `Engine::subscribe_finished`. A warm-up of `--warmup` runs (default 500) on a
//! fresh engine and a fresh FLUSHALL comes first and is not measured, like the peer's.
//!
//! ```sh
//! cargo bench --bench chain3 -- --port 6390 --concurrency 50 --n 20000
//! ```
//!
//! Prints one JSON line on stdout (progress on stderr):
//! - `runs_per_s`, `steps_per_s`, `run_latency_ms` (p50, p90, p99, max, mean);
//! - `redis_cmds_per_step`: delta of INFO `total_commands_processed` per step, which counts the
//!   commands run inside Redis Functions too; `redis_calls_per_step`: the same by command, from
//!   INFO commandstats (`fcall` = one function call = one client round trip doing real work;
//!   the commands inside it are listed under their own names); `redis_usec_per_step`: the
//!   commandstats time by command (a function's time includes the commands it runs);
//! - `redis_cpu_us_per_step`: redis-server user+sys CPU (INFO cpu) per step;
//! - `mem.bytes_per_run`: INFO `used_memory` once the runs finished and housekeeping trimmed
//!   the ready streams (called directly: `Store::housekeeping`), minus `used_memory` right after
//!   FLUSHALL and the engine's start, over N; every run's history is kept (compacted log, summary,
//!   indexes). Client buffers (`mem_clients_normal`) are left out on both sides, because the
//!   peer closes its connections before it measures; `bytes_per_run_incl_clients` keeps them.
//!
//! The admin connection (FLUSHALL, INFO) is a tiny RESP client over `std::net::TcpStream`.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::{Value, json};
use workflow_orchestrator::config::Settings;
use workflow_orchestrator::definition::Registry;
use workflow_orchestrator::engine::{Engine, EngineConfig};
use workflow_orchestrator::machine::Trigger;
use workflow_orchestrator::store::redis::RedisStore;
use workflow_orchestrator::store::{RunId, Store};

/// Loopback only, deliberately not configurable: this benchmark FLUSHALLs its Redis.
const HOST: Ipv4Addr = Ipv4Addr::LOCALHOST;
const WORKFLOW: &str = "chain3";
const STEPS_PER_RUN: u64 = 3;
const DEFINITIONS: &str = r#"
[[workflow]]
id = "chain3"
description = "benchmark: three sequential no-op steps"
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

const USAGE: &str = "usage: cargo bench --bench chain3 -- --port PORT [--concurrency 50] [--n 20000] \
[--inflight 2xC] [--warmup 500] [--time-limit 120] [--shards 16] [--run-index K] [--tag TEXT]
  Talks only to 127.0.0.1:PORT and FLUSHALLs it: use a private, throwaway redis-server.";

// ---------------------------------------------------------------- arguments

struct Args {
    port: u16,
    concurrency: usize,
    n: usize,
    inflight: usize,
    warmup: usize,
    time_limit: Duration,
    shards: u16,
    run_index: Option<u64>,
    tag: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut values: HashMap<String, String> = HashMap::new();
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        // `cargo bench` passes `--bench` to every bench binary.
        if arg == "--bench" {
            continue;
        }
        let Some(name) = arg.strip_prefix("--") else { return Err(format!("unexpected argument `{arg}`")) };
        let (name, value) = match name.split_once('=') {
            Some((name, value)) => (name.to_owned(), value.to_owned()),
            None => (name.to_owned(), argv.next().ok_or_else(|| format!("--{name} needs a value"))?),
        };
        if !matches!(
            name.as_str(),
            "port" | "concurrency" | "n" | "inflight" | "warmup" | "time-limit" | "shards" | "run-index" | "tag"
        ) {
            return Err(format!("unknown option --{name}"));
        }
        values.insert(name, value);
    }
    fn number<T: std::str::FromStr>(values: &HashMap<String, String>, name: &str, default: T) -> Result<T, String> {
        match values.get(name) {
            None => Ok(default),
            Some(text) => text.parse().map_err(|_| format!("--{name}: `{text}` is not a valid number")),
        }
    }
    let port: u16 = match values.get("port") {
        None => return Err("--port is required: the private redis-server this benchmark may FLUSHALL".to_owned()),
        Some(_) => number(&values, "port", 0)?,
    };
    if port == 0 {
        return Err("--port must be a real port".to_owned());
    }
    let concurrency: usize = number(&values, "concurrency", 50)?;
    let n: usize = number(&values, "n", 20_000)?;
    if concurrency == 0 || n == 0 {
        return Err("--concurrency and --n must be at least 1".to_owned());
    }
    let inflight: usize = number(&values, "inflight", 2 * concurrency)?;
    if inflight == 0 || inflight > 4000 {
        // The engine's finished-run announcements are a lossy channel of 4096.
        return Err("--inflight must be between 1 and 4000".to_owned());
    }
    Ok(Args {
        port,
        concurrency,
        n,
        inflight,
        warmup: number(&values, "warmup", 500)?,
        time_limit: Duration::from_secs_f64(number(&values, "time-limit", 120.0)?),
        shards: number(&values, "shards", 16)?,
        run_index: values.get("run-index").map(|_| number(&values, "run-index", 0)).transpose()?,
        tag: values.get("tag").cloned(),
    })
}

fn log(message: &str) {
    eprintln!("[chain3 {}] {message}", humantime::format_rfc3339_millis(SystemTime::now()));
}

// ---------------------------------------------------------------- a tiny RESP client

#[derive(Debug)]
enum Reply {
    Status(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    fn text(&self) -> String {
        match self {
            Reply::Status(s) | Reply::Error(s) => s.clone(),
            Reply::Integer(i) => i.to_string(),
            Reply::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            Reply::Bulk(None) | Reply::Array(None) => String::new(),
            Reply::Array(Some(items)) => items.iter().map(Reply::text).collect::<Vec<_>>().join(" "),
        }
    }

    fn integer(&self) -> Option<i64> {
        match self {
            Reply::Integer(i) => Some(*i),
            _ => None,
        }
    }
}

/// One admin connection to the private Redis: FLUSHALL, INFO, XLEN, MEMORY USAGE.
struct Admin {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Admin {
    fn connect(port: u16) -> std::io::Result<Admin> {
        let stream = TcpStream::connect_timeout(&SocketAddrV4::new(HOST, port).into(), Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        stream.set_nodelay(true)?;
        Ok(Admin { reader: BufReader::new(stream.try_clone()?), writer: stream })
    }

    fn call(&mut self, args: &[&str]) -> Result<Reply, String> {
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        let io = |err: std::io::Error| format!("redis {}: {err}", args.first().unwrap_or(&""));
        self.writer.write_all(&request).map_err(io)?;
        match read_reply(&mut self.reader).map_err(io)? {
            Reply::Error(err) => Err(format!("redis {}: {err}", args.join(" "))),
            reply => Ok(reply),
        }
    }

    fn info(&mut self) -> Result<Snapshot, String> {
        let text = self.call(&["INFO", "all"])?.text();
        Ok(Snapshot::parse(&text))
    }
}

fn read_reply(reader: &mut impl BufRead) -> std::io::Result<Reply> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(bad("connection closed"));
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at_checked(1).ok_or_else(|| bad("empty reply line"))?;
    let length = || rest.parse::<i64>().map_err(|_| bad("bad length"));
    Ok(match kind {
        "+" => Reply::Status(rest.to_owned()),
        "-" => Reply::Error(rest.to_owned()),
        ":" => Reply::Integer(length()?),
        "$" => match length()? {
            n if n < 0 => Reply::Bulk(None),
            n => {
                let mut body = vec![0; n as usize + 2];
                reader.read_exact(&mut body)?;
                body.truncate(n as usize);
                Reply::Bulk(Some(body))
            }
        },
        "*" => match length()? {
            n if n < 0 => Reply::Array(None),
            n => Reply::Array(Some((0..n).map(|_| read_reply(reader)).collect::<std::io::Result<_>>()?)),
        },
        other => return Err(bad(&format!("unknown reply type `{other}`"))),
    })
}

// ---------------------------------------------------------------- INFO snapshots

#[derive(Debug, Clone, Default)]
struct Snapshot {
    used_memory: i64,
    mem_clients_normal: i64,
    cpu: f64,
    total_commands: u64,
    redis_version: String,
    aof: bool,
    /// commandstats: name -> (calls, usec)
    cmd: BTreeMap<String, (u64, u64)>,
}

impl Snapshot {
    fn parse(text: &str) -> Snapshot {
        let mut info: HashMap<&str, &str> = HashMap::new();
        for line in text.lines() {
            if let Some((k, v)) = line.trim_end().split_once(':')
                && !k.starts_with('#')
            {
                info.insert(k, v);
            }
        }
        let num = |k: &str| info.get(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let mut cmd = BTreeMap::new();
        for (k, v) in &info {
            let Some(name) = k.strip_prefix("cmdstat_") else { continue };
            let field = |f: &str| {
                v.split(',').find_map(|kv| kv.strip_prefix(f).and_then(|x| x.strip_prefix('='))?.parse::<u64>().ok())
            };
            if let (Some(calls), Some(usec)) = (field("calls"), field("usec")) {
                cmd.insert(name.to_owned(), (calls, usec));
            }
        }
        Snapshot {
            used_memory: num("used_memory") as i64,
            mem_clients_normal: num("mem_clients_normal") as i64,
            cpu: num("used_cpu_user") + num("used_cpu_sys"),
            total_commands: num("total_commands_processed") as u64,
            redis_version: info.get("redis_version").copied().unwrap_or("?").to_owned(),
            aof: info.get("aof_enabled") == Some(&"1"),
            cmd,
        }
    }
}

/// The admin connection's own commands, left out of the breakdown.
const ADMIN_COMMANDS: &[&str] = &["info", "flushall", "dbsize", "memory|usage", "xlen", "ping", "config|resetstat"];

/// Per-step calls and usec by command, between two snapshots, largest first.
fn command_deltas(a: &Snapshot, b: &Snapshot, per: f64) -> (Value, Value) {
    let mut rows: Vec<(String, u64, u64)> = b
        .cmd
        .iter()
        .filter(|(name, _)| !ADMIN_COMMANDS.contains(&name.as_str()))
        .filter_map(|(name, (calls, usec))| {
            let (calls0, usec0) = a.cmd.get(name).copied().unwrap_or((0, 0));
            (calls > &calls0).then(|| (name.clone(), calls - calls0, usec.saturating_sub(usec0)))
        })
        .collect();
    rows.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
    let mut calls = serde_json::Map::new();
    let mut usec = serde_json::Map::new();
    for (name, c, u) in rows {
        calls.insert(name.clone(), json!(round(c as f64 / per, 3)));
        usec.insert(name, json!(round(u as f64 / per, 2)));
    }
    (Value::Object(calls), Value::Object(usec))
}

fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

fn percentiles(latencies: &mut [f64]) -> Value {
    if latencies.is_empty() {
        return json!({ "p50": null, "p90": null, "p99": null, "max": null, "mean": null });
    }
    latencies.sort_by(f64::total_cmp);
    let count = latencies.len();
    let q = |p: f64| latencies[(((p / 100.0) * count as f64).ceil() as usize).clamp(1, count) - 1];
    let mean = latencies.iter().sum::<f64>() / count as f64;
    json!({
        "p50": round(q(50.0), 2), "p90": round(q(90.0), 2), "p99": round(q(99.0), 2),
        "max": round(latencies[count - 1], 2), "mean": round(mean, 2),
    })
}

/// This process's user+sys CPU seconds, from /proc (USER_HZ is 100 on Linux).
fn process_cpu() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return 0.0 };
    // Fields after the command name (which is in parentheses and may contain spaces).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

// ---------------------------------------------------------------- the scenario

struct Outcome {
    report: Value,
}

async fn start_engine(args: &Args, registry: &Arc<Registry>) -> Result<(Arc<RedisStore>, Arc<Engine>), String> {
    let url = format!("redis://{HOST}:{}", args.port);
    let store = Arc::new(RedisStore::connect(&url, "wfo", args.shards).await.map_err(|e| e.to_string())?);
    let defaults = Settings::from_lookup(|_| None).map_err(|e| e.to_string())?;
    let config = EngineConfig {
        replica_id: "bench".to_owned(),
        max_concurrent_steps: args.concurrency,
        shutdown_grace: Duration::from_secs(10),
        ..EngineConfig::from_settings(&defaults)
    };
    let dyn_store: Arc<dyn Store> = Arc::clone(&store) as Arc<dyn Store>;
    let engine = Engine::new(dyn_store, Arc::clone(registry), config).await.map_err(|e| e.to_string())?;
    engine.start();
    Ok((store, engine))
}

async fn chain3(args: &Args, n: usize, inflight: usize, time_limit: Duration) -> Result<Outcome, String> {
    let registry = Arc::new(Registry::parse("chain3 benchmark", DEFINITIONS).map_err(|e| e.to_string())?);
    let mut admin = Admin::connect(args.port).map_err(|e| format!("cannot reach 127.0.0.1:{}: {e}", args.port))?;
    admin.call(&["PING"])?;
    admin.call(&["FLUSHALL"])?;
    let after_flush = admin.info()?;
    let (store, engine) = start_engine(args, &registry).await?;
    let mut finished = engine.subscribe_finished();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = admin.info()?;

    let steps0 = engine.counters.steps_completed.load(Ordering::Relaxed);
    let mut started_at: HashMap<String, Instant> = HashMap::with_capacity(inflight * 2);
    // Runs announced before their trigger call returned (possible: the claim loop may finish a
    // run before the trigger's task is polled again).
    let mut early: HashMap<String, (Instant, &'static str)> = HashMap::new();
    let mut latencies: Vec<f64> = Vec::with_capacity(n);
    let (mut started, mut done, mut failed, mut trigger_errors) = (0usize, 0usize, 0usize, 0usize);
    let mut triggers = FuturesUnordered::new();
    let trigger = |i: usize| {
        let engine = Arc::clone(&engine);
        async move {
            let t0 = Instant::now();
            let input = json!({ "run": i });
            (t0, engine.trigger(WORKFLOW, &input, None, Trigger::Api).await)
        }
    };

    let cpu0 = process_cpu();
    let snap_start = admin.info()?;
    let t_start = Instant::now();
    let deadline = tokio::time::Instant::now() + time_limit;
    for i in 0..inflight.min(n) {
        triggers.push(trigger(i));
        started += 1;
    }
    let mut stop_reason = "done";
    // Taken when the N-th run finished or the time limit hit: (elapsed s, own CPU s, steps,
    // INFO, runs). After a time limit the runs in flight are drained (not counted) so that the
    // memory figure is of finished runs only.
    let mut measured: Option<(f64, f64, u64, Snapshot, usize)> = None;
    let drain_deadline = deadline + Duration::from_secs(20);
    loop {
        if measured.is_none() && done >= n {
            let steps = engine.counters.steps_completed.load(Ordering::Relaxed) - steps0;
            measured = Some((t_start.elapsed().as_secs_f64(), process_cpu(), steps, admin.info()?, latencies.len()));
        }
        if measured.is_some() && done >= started {
            break;
        }
        let more = measured.is_none() && started < n;
        tokio::select! {
            Some((t0, result)) = triggers.next() => match result {
                Ok(triggered) => match early.remove(&triggered.run_id) {
                    Some((at, status)) => {
                        if measured.is_none() {
                            latencies.push(at.duration_since(t0).as_secs_f64() * 1e3);
                            if status != "completed" { failed += 1; }
                        }
                        done += 1;
                        if more { triggers.push(trigger(started)); started += 1; }
                    }
                    None => { started_at.insert(triggered.run_id, t0); }
                },
                Err(err) => {
                    trigger_errors += 1;
                    if trigger_errors < 5 { log(&format!("trigger failed: {err}")); }
                    // Keep the loop closed: the slot is free again.
                    done += 1;
                    if more { triggers.push(trigger(started)); started += 1; }
                }
            },
            announced = finished.recv() => match announced {
                Ok((run, status)) => {
                    let at = Instant::now();
                    match started_at.remove(&run) {
                        Some(t0) => {
                            if measured.is_none() {
                                latencies.push(at.duration_since(t0).as_secs_f64() * 1e3);
                                if status != "completed" { failed += 1; }
                            }
                            done += 1;
                            if more { triggers.push(trigger(started)); started += 1; }
                        }
                        None => { early.insert(run, (at, status)); }
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    return Err(format!("missed {missed} finished-run announcements: the driver fell behind"));
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Err("the engine went away".to_owned()),
            },
            () = tokio::time::sleep_until(deadline), if measured.is_none() => {
                stop_reason = "time_limit";
                let steps = engine.counters.steps_completed.load(Ordering::Relaxed) - steps0;
                measured = Some((t_start.elapsed().as_secs_f64(), process_cpu(), steps, admin.info()?, latencies.len()));
                log(&format!("time limit: draining {} runs in flight", started - done));
            },
            () = tokio::time::sleep_until(drain_deadline), if measured.is_some() => {
                log(&format!("{} runs still in flight after the drain; memory includes them", started - done));
                break;
            },
        }
    }
    let Some((elapsed, cpu1, steps, snap_end, runs)) = measured else { unreachable!("measured before leaving") };
    latencies.truncate(runs);

    // Memory: trim the ready streams behind the consumer group (what the sweeper does every few
    // passes), stop the engine, and read used_memory with every run's history still kept.
    let keys = store.keys().clone();
    let ready_len = |admin: &mut Admin| -> Result<i64, String> {
        let mut total = 0;
        for shard in 0..keys.shards() {
            total += admin.call(&["XLEN", &keys.ready(shard)])?.integer().unwrap_or(0);
        }
        Ok(total)
    };
    // One pass trims at most 10,000 entries a shard (XTRIM ~ has an implicit LIMIT of 100 x
    // stream-node-max-entries): pass again until a pass trims nothing, as the sweeper would.
    let ready_before_housekeeping = ready_len(&mut admin)?;
    let mut ready_entries_left = ready_before_housekeeping;
    let mut housekeeping_passes = 0;
    for _ in 0..100 {
        store.housekeeping(0).await.map_err(|e| e.to_string())?;
        housekeeping_passes += 1;
        let left = ready_len(&mut admin)?;
        let progress = left < ready_entries_left;
        ready_entries_left = left;
        if !progress {
            break;
        }
    }
    let in_time = engine.shutdown().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = admin.info()?;
    let dbsize = admin.call(&["DBSIZE"])?.integer().unwrap_or(0);
    let mut ready_bytes = 0;
    for shard in 0..keys.shards() {
        ready_bytes += admin.call(&["MEMORY", "USAGE", &keys.ready(shard)])?.integer().unwrap_or(0);
    }
    // One finished run, key by key.
    let mut sample = serde_json::Map::new();
    let first = admin.call(&["ZRANGE", &keys.index_all(0), "0", "0"])?.text();
    if let Ok(run) = first.parse::<RunId>() {
        for key in [keys.run(&run), keys.history(&run), keys.log(&run)] {
            let usage = admin.call(&["MEMORY", "USAGE", &key])?.integer();
            sample.insert(key.split(':').nth(2).unwrap_or("?").to_owned(), json!(usage));
        }
    }
    let mut index_bytes = 0;
    for shard in 0..keys.shards() {
        for key in
            [keys.index_all(shard), keys.index_workflow(shard, WORKFLOW), keys.index_finished(shard, "completed")]
        {
            index_bytes += admin.call(&["MEMORY", "USAGE", &key])?.integer().unwrap_or(0);
        }
    }

    let per_step = steps.max(1) as f64;
    let (calls, usec) = command_deltas(&snap_start, &snap_end, per_step);
    let data = |s: &Snapshot| s.used_memory - s.mem_clients_normal;
    let delta = data(&after) - data(&before);
    let delta_incl = after.used_memory - before.used_memory;
    let per_run = |bytes: i64| if runs > 0 { json!(round(bytes as f64 / runs as f64, 1)) } else { Value::Null };
    let report = json!({
        "scenario": "chain3",
        "mode": "engine",
        "engine": "workflow-orchestrator",
        "concurrency": args.concurrency,
        "inflight": inflight.min(n),
        "shards": args.shards,
        "n_requested": n,
        "stop_reason": stop_reason,
        "runs_completed": runs,
        "steps_completed": steps,
        "steps_expected": runs as u64 * STEPS_PER_RUN,
        "failed": failed,
        "trigger_errors": trigger_errors,
        "elapsed_s": round(elapsed, 3),
        "runs_per_s": round(runs as f64 / elapsed, 1),
        "steps_per_s": round(steps as f64 / elapsed, 1),
        "run_latency_ms": percentiles(&mut latencies),
        "engine_cpu_util": round((cpu1 - cpu0) / elapsed, 2),
        "redis_cpu_util": round((snap_end.cpu - snap_start.cpu) / elapsed, 2),
        "redis_cmds_per_step": round((snap_end.total_commands - snap_start.total_commands) as f64 / per_step, 1),
        "redis_calls_per_step": calls,
        "redis_usec_per_step": usec,
        "redis_cpu_us_per_step": round((snap_end.cpu - snap_start.cpu) * 1e6 / per_step, 1),
        "mem": {
            "used_memory_after_flush": after_flush.used_memory,
            "used_memory_before": before.used_memory,
            "used_memory_after": after.used_memory,
            "clients_before": before.mem_clients_normal,
            "clients_after": after.mem_clients_normal,
            "delta_bytes": delta,
            "bytes_per_run": per_run(delta),
            "bytes_per_run_incl_clients": per_run(delta_incl),
            "bytes_per_step": if steps > 0 { json!(round(delta as f64 / steps as f64, 1)) } else { Value::Null },
            "engine_fixed_bytes": data(&before) - data(&after_flush),
            "dbsize": dbsize,
            "housekeeping_passes": housekeeping_passes,
            "ready_entries_before_housekeeping": ready_before_housekeeping,
            "ready_entries_left": ready_entries_left,
            "ready_streams_bytes": ready_bytes,
            "index_bytes": index_bytes,
            "sample_run_key_bytes": sample,
        },
        "shutdown_in_time": in_time,
        "redis_aof": after.aof,
        "redis": after.redis_version,
    });
    Ok(Outcome { report })
}

async fn run(args: Args) -> Result<(), String> {
    if args.warmup > 0 {
        log(&format!("warmup: {} runs", args.warmup.min(args.n)));
        let n = args.warmup.min(args.n);
        chain3(&args, n, args.inflight.min(n), Duration::from_secs(20)).await?;
    }
    log(&format!("measure: concurrency {} inflight {} n {}", args.concurrency, args.inflight, args.n));
    let Outcome { mut report } = chain3(&args, args.n, args.inflight, args.time_limit).await?;
    let extra = json!({
        "run_index": args.run_index,
        "tag": args.tag,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "when": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    });
    if let (Value::Object(report), Value::Object(extra)) = (&mut report, extra) {
        report.extend(extra);
    }
    println!("{report}");
    Ok(())
}

fn main() {
    // `cargo test --all-targets` runs bench targets too, with no arguments: nothing to measure.
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.is_empty() {
        eprintln!(
            "chain3: a benchmark; run it with `cargo bench --bench chain3 -- --port PORT` (nothing to do without arguments)"
        );
        return;
    }
    let args = match parse_args() {
        Ok(args) => args,
        Err(problem) => {
            eprintln!("chain3: {problem}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    let hard_limit = args.time_limit + Duration::from_secs(90);
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
    // Do not wait for the engine's idle connections.
    runtime.shutdown_timeout(Duration::from_secs(1));
}
