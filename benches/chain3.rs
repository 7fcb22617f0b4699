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
//!   the ready streams (called directly: `Runs::housekeeping`), minus `used_memory` right after
//!   FLUSHALL and the engine's start, over N; every run's history is kept (compacted log, summary,
//!   indexes). Client buffers (`mem_clients_normal`) are left out on both sides, because the
//!   peer closes its connections before it measures; `bytes_per_run_incl_clients` keeps them.
//!
//! The admin connection (FLUSHALL, INFO) is a tiny RESP client over `std::net::TcpStream`, shared
//! with `benches/binary.rs` (`benches/common/mod.rs`), as is how the figures are computed.

#[path = "common/mod.rs"]
mod common;

/// The binary's allocator (see `src/main.rs`), so that the engine in process costs what it
/// costs in the binary.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use common::{Admin, HOST, Snapshot, number, percentiles, process_cpu, round};
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::{Value, json};
use workflow_orchestrator::config::Settings;
use workflow_orchestrator::definition::Registry;
use workflow_orchestrator::engine::{Engine, EngineConfig};
use workflow_orchestrator::machine::Trigger;
use workflow_orchestrator::store::redis::{RedisStore, ReplicaWait};
use workflow_orchestrator::store::{RunId, Store};

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
[--inflight 2xC] [--warmup 500] [--time-limit 120] [--shards N (default: the engine's: 1 on a standalone Redis, 16 on a cluster)] [--run-index K] [--tag TEXT] [--url URL] [--wait-replicas N]
  Talks only to 127.0.0.1:PORT and FLUSHALLs it: use a private, throwaway redis-server.";

// ---------------------------------------------------------------- arguments

struct Args {
    port: u16,
    concurrency: usize,
    n: usize,
    inflight: usize,
    warmup: usize,
    time_limit: Duration,
    /// `None`: the engine's default (`SHARDS` unset).
    shards: Option<u16>,
    run_index: Option<u64>,
    tag: Option<String>,
    /// Where the engine connects (default `redis://127.0.0.1:PORT`): a `redis-cluster://` URL
    /// puts it on a cluster, while `--port` names one of its nodes for FLUSHALL and INFO (so the
    /// Redis figures are that node's; `benches/cluster.sh` reads every node's itself).
    url: Option<String>,
    /// `REDIS_WAIT_REPLICAS` for the engine's store (default 0).
    wait_replicas: u32,
}

fn parse_args() -> Result<Args, String> {
    let values = common::parse_flags(&[
        "port",
        "concurrency",
        "n",
        "inflight",
        "warmup",
        "time-limit",
        "shards",
        "run-index",
        "tag",
        "url",
        "wait-replicas",
    ])?;
    let port = common::port(&values)?;
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
        shards: common::flag(&values, "shards").map(|_| number(&values, "shards", 16)).transpose()?,
        run_index: common::flag(&values, "run-index").map(|_| number(&values, "run-index", 0)).transpose()?,
        tag: common::flag(&values, "tag").map(str::to_owned),
        url: common::flag(&values, "url").map(str::to_owned),
        wait_replicas: number(&values, "wait-replicas", 0)?,
    })
}

fn log(message: &str) {
    common::log("chain3", message);
}

// ---------------------------------------------------------------- the scenario

struct Outcome {
    report: Value,
}

async fn start_engine(args: &Args, registry: &Arc<Registry>) -> Result<(Arc<RedisStore>, Arc<Engine>), String> {
    let url = args.url.clone().unwrap_or_else(|| format!("redis://{HOST}:{}", args.port));
    let store = RedisStore::open(&url, "wfo", args.shards).await.map_err(|e| e.to_string())?;
    let wait = ReplicaWait { replicas: args.wait_replicas, timeout: Duration::from_secs(1) };
    let store = Arc::new(store.wait_for_replicas(wait));
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

    let cpu0 = process_cpu(None);
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
            measured =
                Some((t_start.elapsed().as_secs_f64(), process_cpu(None), steps, admin.info()?, latencies.len()));
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
                measured = Some((t_start.elapsed().as_secs_f64(), process_cpu(None), steps, admin.info()?, latencies.len()));
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
    if args.url.as_deref().is_some_and(|url| url.starts_with("redis-cluster://")) {
        // On a cluster the admin connection sees one node: the Redis and memory figures are
        // read per node by benches/cluster.sh instead.
        let in_time = engine.shutdown().await;
        let report = json!({
            "scenario": "chain3",
            "mode": "engine-cluster",
            "concurrency": args.concurrency,
            "shards": store.keys().shards(),
            "n_requested": n,
            "stop_reason": stop_reason,
            "runs_completed": runs,
            "steps_completed": steps,
            "failed": failed,
            "trigger_errors": trigger_errors,
            "elapsed_s": round(elapsed, 3),
            "runs_per_s": round(runs as f64 / elapsed, 1),
            "steps_per_s": round(steps as f64 / elapsed, 1),
            "run_latency_ms": percentiles(&mut latencies),
            "engine_cpu_us_per_step": round((cpu1 - cpu0) * 1e6 / steps.max(1) as f64, 1),
            "shutdown_in_time": in_time,
        });
        let _ = snap_end;
        return Ok(Outcome { report });
    }

    // Memory: trim the ready streams behind the consumer group (what the sweeper does every few
    // passes), stop the engine, and read used_memory with every run's history still kept.
    let keys = store.keys().clone();
    let (ready_before_housekeeping, ready_entries_left, housekeeping_passes) =
        common::trim_ready(&store, &mut admin).await?;
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
        for key in [keys.run(&run), keys.log(&run)] {
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

    let fields = json!({
        "scenario": "chain3",
        "mode": "engine",
        "engine": "workflow-orchestrator",
        "concurrency": args.concurrency,
        "inflight": inflight.min(n),
        "shards": store.keys().shards(),
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
        // In process: the engine's CPU and this driver's, together.
        "engine_cpu_util": round((cpu1 - cpu0) / elapsed, 2),
        "engine_cpu_us_per_step": round((cpu1 - cpu0) * 1e6 / steps.max(1) as f64, 1),
        "shutdown_in_time": in_time,
        "redis_aof": after.aof,
        "redis": after.redis_version,
    });
    let mut mem = common::memory_report(&after_flush, &before, &after, runs, steps);
    mem.insert("dbsize".into(), json!(dbsize));
    mem.insert("housekeeping_passes".into(), json!(housekeeping_passes));
    mem.insert("ready_entries_before_housekeeping".into(), json!(ready_before_housekeeping));
    mem.insert("ready_entries_left".into(), json!(ready_entries_left));
    mem.insert("ready_streams_bytes".into(), json!(ready_bytes));
    mem.insert("index_bytes".into(), json!(index_bytes));
    mem.insert("sample_run_key_bytes".into(), Value::Object(sample));
    let mut report = common::redis_report(&snap_start, &snap_end, steps, elapsed, &[]);
    if let Value::Object(fields) = fields {
        report.extend(fields);
    }
    report.insert("mem".into(), Value::Object(mem));
    let report = Value::Object(report);
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
    // Colours only for a terminal, as the binary logs: escape codes cost a step's span a few
    // per cent of the engine's CPU.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
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
