//! What the benchmarks share (`#[path = "common/mod.rs"] mod common;` in each): their argument
//! parsing, a tiny RESP client for the admin connection to the private Redis (FLUSHALL, INFO,
//! pipelines), INFO snapshots and the Redis figures computed from two of them, memory deltas,
//! percentiles and process CPU, so that every bench prints the same fields the same way.

// Each bench compiles this module on its own and uses part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::time::{Duration, SystemTime};

use serde_json::{Map, Value, json};
use workflow_orchestrator::store::prelude::*;
use workflow_orchestrator::store::redis::RedisStore;

/// Loopback only, deliberately not configurable: the benchmarks FLUSHALL their Redis.
pub const HOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

pub fn log(bench: &str, message: &str) {
    eprintln!("[{bench} {}] {message}", humantime::format_rfc3339_millis(SystemTime::now()));
}

pub fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

/// Milliseconds since the epoch, as an `f64` (sub-millisecond precision).
pub fn wall_ms() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

// ---------------------------------------------------------------- arguments

/// `--name value` or `--name=value` pairs, in order (an option may repeat), checked against
/// `allowed`. `cargo bench` passes `--bench` to every bench binary: skipped.
pub fn parse_flags(allowed: &[&str]) -> Result<Vec<(String, String)>, String> {
    let mut values = Vec::new();
    let mut argv = std::env::args().skip(1);
    while let Some(arg) = argv.next() {
        if arg == "--bench" {
            continue;
        }
        let Some(name) = arg.strip_prefix("--") else { return Err(format!("unexpected argument `{arg}`")) };
        let (name, value) = match name.split_once('=') {
            Some((name, value)) => (name.to_owned(), value.to_owned()),
            None => (name.to_owned(), argv.next().ok_or_else(|| format!("--{name} needs a value"))?),
        };
        if !allowed.contains(&name.as_str()) {
            return Err(format!("unknown option --{name}"));
        }
        values.push((name, value));
    }
    Ok(values)
}

/// The last value given for `name`.
pub fn flag<'a>(values: &'a [(String, String)], name: &str) -> Option<&'a str> {
    values.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

pub fn number<T: std::str::FromStr>(values: &[(String, String)], name: &str, default: T) -> Result<T, String> {
    match flag(values, name) {
        None => Ok(default),
        Some(text) => text.parse().map_err(|_| format!("--{name}: `{text}` is not a valid number")),
    }
}

/// `--port`: required, never 0.
pub fn port(values: &[(String, String)]) -> Result<u16, String> {
    if flag(values, "port").is_none() {
        return Err("--port is required: the private redis-server this benchmark may FLUSHALL".to_owned());
    }
    match number(values, "port", 0u16)? {
        0 => Err("--port must be a real port".to_owned()),
        port => Ok(port),
    }
}

// ---------------------------------------------------------------- a tiny RESP client

#[derive(Debug)]
pub enum Reply {
    Status(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    pub fn text(&self) -> String {
        match self {
            Reply::Status(s) | Reply::Error(s) => s.clone(),
            Reply::Integer(i) => i.to_string(),
            Reply::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            Reply::Bulk(None) | Reply::Array(None) => String::new(),
            Reply::Array(Some(items)) => items.iter().map(Reply::text).collect::<Vec<_>>().join(" "),
        }
    }

    pub fn integer(&self) -> Option<i64> {
        match self {
            Reply::Integer(i) => Some(*i),
            _ => None,
        }
    }
}

/// Appends one command in RESP to `out`.
pub fn encode(args: &[&[u8]], out: &mut Vec<u8>) {
    out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

/// One blocking connection to the private Redis: FLUSHALL, INFO, XLEN, MEMORY USAGE, pipelines.
pub struct Admin {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Admin {
    pub fn connect(port: u16) -> Result<Admin, String> {
        let connect = || -> std::io::Result<Admin> {
            let stream = TcpStream::connect_timeout(&SocketAddrV4::new(HOST, port).into(), Duration::from_secs(3))?;
            stream.set_read_timeout(Some(Duration::from_secs(60)))?;
            stream.set_nodelay(true)?;
            Ok(Admin { reader: BufReader::new(stream.try_clone()?), writer: stream })
        };
        connect().map_err(|e| format!("cannot reach {HOST}:{port}: {e}"))
    }

    pub fn call(&mut self, args: &[&str]) -> Result<Reply, String> {
        let mut request = Vec::new();
        encode(&args.iter().map(|a| a.as_bytes()).collect::<Vec<_>>(), &mut request);
        let io = |err: std::io::Error| format!("redis {}: {err}", args.first().unwrap_or(&""));
        self.writer.write_all(&request).map_err(io)?;
        match read_reply(&mut self.reader).map_err(io)? {
            Reply::Error(err) => Err(format!("redis {}: {err}", args.join(" "))),
            reply => Ok(reply),
        }
    }

    /// Sends `request` (commands already in RESP, see [`encode`]) in one write and reads
    /// `count` replies; error replies are returned as such, not as `Err`.
    pub fn pipeline(&mut self, request: &[u8], count: usize) -> Result<Vec<Reply>, String> {
        let io = |err: std::io::Error| format!("redis pipeline: {err}");
        self.writer.write_all(request).map_err(io)?;
        (0..count).map(|_| read_reply(&mut self.reader).map_err(io)).collect()
    }

    pub fn info(&mut self) -> Result<Snapshot, String> {
        let text = self.call(&["INFO", "all"])?.text();
        Ok(Snapshot::parse(&text))
    }
}

pub fn read_reply(reader: &mut impl BufRead) -> std::io::Result<Reply> {
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
pub struct Snapshot {
    pub used_memory: i64,
    pub mem_clients_normal: i64,
    pub cpu: f64,
    pub total_commands: u64,
    pub redis_version: String,
    pub aof: bool,
    /// commandstats: name -> (calls, usec)
    pub cmd: BTreeMap<String, (u64, u64)>,
}

impl Snapshot {
    pub fn parse(text: &str) -> Snapshot {
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

    /// Stored data: `used_memory` without client buffers (`mem_clients_normal`), which the peer
    /// leaves out too (it closes its connections before it measures).
    pub fn data(&self) -> i64 {
        self.used_memory - self.mem_clients_normal
    }
}

/// The admin connection's own commands, left out of the breakdown.
const ADMIN_COMMANDS: &[&str] = &["info", "flushall", "dbsize", "memory|usage", "xlen", "ping", "config|resetstat"];

/// Per-step calls and usec by command, between two snapshots, largest first; `own` are calls
/// the benchmark itself made in between (a poller's), subtracted from their command's count.
fn command_deltas(a: &Snapshot, b: &Snapshot, per: f64, own: &[(&str, u64)]) -> (Value, Value) {
    let mut rows: Vec<(String, u64, u64)> = b
        .cmd
        .iter()
        .filter(|(name, _)| !ADMIN_COMMANDS.contains(&name.as_str()))
        .filter_map(|(name, (calls, usec))| {
            let (calls0, usec0) = a.cmd.get(name).copied().unwrap_or((0, 0));
            let mine = own.iter().filter(|(n, _)| n == name).map(|(_, c)| c).sum::<u64>();
            let calls = calls.saturating_sub(calls0).saturating_sub(mine);
            (calls > 0).then(|| (name.clone(), calls, usec.saturating_sub(usec0)))
        })
        .collect();
    rows.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
    let mut calls = Map::new();
    let mut usec = Map::new();
    for (name, c, u) in rows {
        calls.insert(name.clone(), json!(round(c as f64 / per, 3)));
        usec.insert(name, json!(round(u as f64 / per, 2)));
    }
    (Value::Object(calls), Value::Object(usec))
}

/// The Redis side of a measurement between `start` and `end`, over `steps` steps and `elapsed`
/// seconds:
/// - `redis_cmds_per_step`: delta of INFO `total_commands_processed` per step (which counts the
///   commands run inside Redis Functions too), less `own` (the benchmark's own calls);
/// - `redis_calls_per_step`: the same by command, from INFO commandstats (`fcall` = one
///   function call; the commands inside it are listed under their own names);
/// - `redis_usec_per_step`: commandstats time by command (a function's includes its commands);
/// - `redis_cpu_us_per_step`, `redis_cpu_util`: redis-server user+sys CPU (INFO cpu).
pub fn redis_report(
    start: &Snapshot,
    end: &Snapshot,
    steps: u64,
    elapsed: f64,
    own: &[(&str, u64)],
) -> Map<String, Value> {
    let per_step = steps.max(1) as f64;
    let (calls, usec) = command_deltas(start, end, per_step, own);
    let own_total: u64 = own.iter().map(|(_, c)| c).sum();
    let commands = (end.total_commands - start.total_commands).saturating_sub(own_total);
    let cpu = end.cpu - start.cpu;
    let mut report = Map::new();
    report.insert("redis_cmds_per_step".into(), json!(round(commands as f64 / per_step, 1)));
    report.insert("redis_calls_per_step".into(), calls);
    report.insert("redis_usec_per_step".into(), usec);
    report.insert("redis_cpu_us_per_step".into(), json!(round(cpu * 1e6 / per_step, 1)));
    report.insert("redis_cpu_util".into(), json!(round(cpu / elapsed.max(1e-9), 2)));
    report
}

/// The `mem` object: `used_memory` (without client buffers) once the runs finished and the
/// ready streams were trimmed, minus the same `before` the runs, over `runs`.
pub fn memory_report(
    after_flush: &Snapshot,
    before: &Snapshot,
    after: &Snapshot,
    runs: usize,
    steps: u64,
) -> Map<String, Value> {
    let delta = after.data() - before.data();
    let delta_incl = after.used_memory - before.used_memory;
    let per =
        |bytes: i64, count: u64| if count > 0 { json!(round(bytes as f64 / count as f64, 1)) } else { Value::Null };
    let mut mem = Map::new();
    mem.insert("used_memory_after_flush".into(), json!(after_flush.used_memory));
    mem.insert("used_memory_before".into(), json!(before.used_memory));
    mem.insert("used_memory_after".into(), json!(after.used_memory));
    mem.insert("clients_before".into(), json!(before.mem_clients_normal));
    mem.insert("clients_after".into(), json!(after.mem_clients_normal));
    mem.insert("delta_bytes".into(), json!(delta));
    mem.insert("bytes_per_run".into(), per(delta, runs as u64));
    mem.insert("bytes_per_run_incl_clients".into(), per(delta_incl, runs as u64));
    mem.insert("bytes_per_step".into(), per(delta, steps));
    mem.insert("engine_fixed_bytes".into(), json!(before.data() - after_flush.data()));
    mem
}

/// Trims the ready streams behind the consumer group, as the sweeper does every few passes:
/// one pass trims at most 10,000 entries a shard (`XTRIM ~` has an implicit LIMIT of 100 x
/// stream-node-max-entries), so pass again until a pass trims nothing. Returns the entries
/// before, the entries left and the passes.
pub async fn trim_ready(store: &RedisStore, admin: &mut Admin) -> Result<(i64, i64, u32), String> {
    let keys = store.keys().clone();
    let ready_len = |admin: &mut Admin| -> Result<i64, String> {
        let mut total = 0;
        for shard in 0..keys.shards() {
            total += admin.call(&["XLEN", &keys.ready(shard)])?.integer().unwrap_or(0);
        }
        Ok(total)
    };
    let before = ready_len(admin)?;
    let mut left = before;
    let mut passes = 0;
    for _ in 0..100 {
        store.housekeeping(0).await.map_err(|e| e.to_string())?;
        passes += 1;
        let now = ready_len(admin)?;
        let progress = now < left;
        left = now;
        if !progress {
            break;
        }
    }
    Ok((before, left, passes))
}

// ---------------------------------------------------------------- latency and CPU

pub fn percentiles(latencies: &mut [f64]) -> Value {
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

/// User+sys CPU seconds of a process (all its threads) from /proc: this one with `None`.
pub fn process_cpu(pid: Option<u32>) -> f64 {
    let path = pid.map_or_else(|| "/proc/self/stat".to_owned(), |pid| format!("/proc/{pid}/stat"));
    let Ok(stat) = std::fs::read_to_string(path) else { return 0.0 };
    // Fields after the command name (which is in parentheses and may contain spaces).
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name, in ticks of
    // USER_HZ, which the kernel's ABI fixes at 100 on Linux.
    (ticks(11) + ticks(12)) / 100.0
}
