//! Shared test helpers: a private redis-server per test on a free loopback port (so that a test
//! may kill and restart it), real processes of our own binary as replicas, and a small HTTP
//! client. Loopback only; every wait is bounded in count and time.

#![allow(dead_code)]

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Polls `check` every `every` until it returns `Some`, for at most `limit`.
pub fn wait_for<T>(limit: Duration, every: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(found) = check() {
            return Some(found);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind a free port").local_addr().unwrap().port()
}

/// A private redis-server on 127.0.0.1, killed when dropped.
pub struct RedisServer {
    pub port: u16,
    pub dir: tempfile::TempDir,
    aof: bool,
    child: Option<Child>,
}

impl RedisServer {
    /// In-memory (no persistence).
    pub fn start() -> RedisServer {
        RedisServer::start_with(false)
    }

    /// With AOF (`appendfsync everysec`), so that a restart keeps the data.
    pub fn start_aof() -> RedisServer {
        RedisServer::start_with(true)
    }

    fn start_with(aof: bool) -> RedisServer {
        let mut server =
            RedisServer { port: free_port(), dir: tempfile::tempdir().expect("tempdir"), aof, child: None };
        server.launch();
        server
    }

    fn launch(&mut self) {
        let mut args: Vec<String> = vec![
            "--bind".into(),
            "127.0.0.1".into(),
            "--port".into(),
            self.port.to_string(),
            "--dir".into(),
            self.dir.path().display().to_string(),
            "--save".into(),
            "".into(),
            "--maxmemory-policy".into(),
            "noeviction".into(),
        ];
        if self.aof {
            args.extend(["--appendonly", "yes", "--appendfsync", "everysec"].map(String::from));
        } else {
            args.extend(["--appendonly", "no"].map(String::from));
        }
        self.child = Some(spawn_redis_server(&args, self.port));
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis-cli` against this server; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }

    /// SIGKILL, wait for the exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port and directory (with AOF, the data comes back).
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `redis-server args...` (listening on `port`) and waits, bounded, until it answers.
fn spawn_redis_server(args: &[String], port: u16) -> Child {
    let child = Command::new("redis-server")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (scripts/test.sh installs it)");
    wait_for(Duration::from_secs(10), Duration::from_millis(20), || {
        (redis_cli(port, &["PING"]).trim() == "PONG").then_some(())
    })
    .unwrap_or_else(|| panic!("redis-server on port {port} answers PING within 10 s"));
    child
}

pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli").args(["-h", "127.0.0.1", "-p", &port.to_string()]).args(args).output();
    match output {
        Ok(output) => String::from_utf8_lossy(&output.stdout).into_owned(),
        Err(_) => String::new(),
    }
}

/// The path of our binary, built by cargo for integration tests; `WFO_TEST_BINARY` names another
/// build instead (to show that a regression test fails on the build before its fix).
pub fn binary() -> PathBuf {
    std::env::var_os("WFO_TEST_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_workflow-orchestrator")))
}

/// A replica: a real process of our binary, killed when dropped.
pub struct Replica {
    pub name: String,
    pub port: u16,
    child: Option<Child>,
    /// Its standard error.
    pub log: PathBuf,
    /// Its standard output, when [`ReplicaConfig::stdout_to_file`] asked for it in a file.
    pub stdout: Option<PathBuf>,
}

/// The address (`127.0.0.1:port`) in the line a replica announces it listens with: the text
/// `listening on http://<address>`, or a JSON log line whose message says so and whose
/// `address` field is `http://<address>`.
pub fn listening_address(line: &str) -> Option<String> {
    if let Some(address) = line.strip_prefix("listening on http://") {
        return Some(address.trim_end().to_owned());
    }
    let object: Value = serde_json::from_str(line).ok()?;
    object["message"].as_str().filter(|m| m.starts_with("listening on http://"))?;
    object["address"].as_str()?.strip_prefix("http://").map(str::to_owned)
}

/// How to start replicas.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    pub redis_url: Option<String>,
    pub workflows_file: Option<PathBuf>,
    pub log_dir: PathBuf,
    pub env: Vec<(String, String)>,
    /// Standard output into `<log_dir>/<name>.out` instead of a pipe read by the harness.
    pub stdout_file: bool,
}

impl ReplicaConfig {
    pub fn new(redis_url: Option<String>, workflows_file: Option<&Path>, log_dir: &Path) -> ReplicaConfig {
        ReplicaConfig {
            redis_url,
            workflows_file: workflows_file.map(Path::to_path_buf),
            log_dir: log_dir.to_path_buf(),
            env: Vec::new(),
            stdout_file: false,
        }
    }

    /// Writes the replicas' standard output to a file (as a service manager would), where the
    /// harness looks for the announcement; see [`Replica::stdout`].
    pub fn stdout_to_file(mut self) -> ReplicaConfig {
        self.stdout_file = true;
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> ReplicaConfig {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Starts a replica and waits (bounded) until it serves HTTP.
    pub fn start(&self, name: &str) -> Replica {
        let log = self.log_dir.join(format!("{name}.log"));
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("replica log file");
        let mut command = Command::new(binary());
        command
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PORT", "0")
            .env("BIND_ADDR", "127.0.0.1")
            .env("REPLICA_ID", name)
            .env("LOG_LEVEL", "info")
            .stderr(log_file);
        let stdout_path = self.stdout_file.then(|| self.log_dir.join(format!("{name}.out")));
        match &stdout_path {
            Some(path) => command.stdout(std::fs::File::create(path).expect("replica stdout file")),
            None => command.stdout(Stdio::piped()),
        };
        if let Some(url) = &self.redis_url {
            command.env("REDIS_URL", url);
        }
        if let Some(file) = &self.workflows_file {
            command.env("WORKFLOWS_FILE", file);
        }
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start the replica binary");
        let (sender, receiver) = std::sync::mpsc::channel();
        match (child.stdout.take(), &stdout_path) {
            (Some(stdout), _) => {
                std::thread::spawn(move || {
                    for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                        if let Some(address) = listening_address(&line) {
                            let _ = sender.send(address);
                        }
                    }
                });
            }
            (None, Some(path)) => {
                let path = path.clone();
                std::thread::spawn(move || {
                    let found = wait_for(Duration::from_secs(30), Duration::from_millis(20), || {
                        std::fs::read_to_string(&path).ok()?.lines().find_map(listening_address)
                    });
                    if let Some(address) = found {
                        let _ = sender.send(address);
                    }
                });
            }
            (None, None) => unreachable!("standard output is piped or in a file"),
        }
        let address = receiver.recv_timeout(Duration::from_secs(30)).unwrap_or_else(|_| {
            panic!(
                "replica {name} did not start within 30 s; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        let port = address.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port in the listening line");
        Replica { name: name.to_owned(), port, child: Some(child), log, stdout: stdout_path }
    }
}

impl Replica {
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    pub fn signal(&self, signal: &str) {
        let status =
            Command::new("kill").args([&format!("-{signal}"), &self.pid().to_string()]).status().expect("kill");
        assert!(status.success(), "kill -{signal} {}", self.pid());
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits (bounded) for the process to exit; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let status = wait_for(limit, Duration::from_millis(50), || child.try_wait().ok().flatten())?;
        self.child = None;
        status.code()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        http(ureq::get(&format!("{}{path}", self.base())).call())
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        http(ureq::post(&format!("{}{path}", self.base())).send_json(body.clone()))
    }

    /// Triggers a workflow; returns the run id.
    /// Triggers `workflow` over REST; the run's id. A debounced workflow's trigger starts its
    /// run later: the id of the run its burst started, waited for (bounded).
    pub fn trigger(&self, workflow: &str, input: Value) -> String {
        let (status, body) =
            self.post(&format!("/api/workflows/{workflow}/trigger"), &serde_json::json!({ "inputData": input }));
        assert_eq!(status, 202, "trigger {workflow}: {body}");
        if body["status"] == "debounced" {
            let burst = body["burstId"].as_str().expect("burstId");
            return self.debounced_run(workflow, burst, Duration::from_secs(60));
        }
        body["runId"].as_str().expect("runId").to_owned()
    }

    /// The run debounce burst `burst` of `workflow` started, once it has (waited for up to
    /// `limit`).
    pub fn debounced_run(&self, workflow: &str, burst: &str, limit: Duration) -> String {
        wait_for(limit, Duration::from_millis(100), || {
            let (_, listed) = self.get(&format!("/api/runs?workflowId={workflow}&limit=50"));
            listed["runs"].as_array()?.iter().filter(|run| run["trigger"] == "debounce").find_map(|run| {
                let id = run["runId"].as_str()?;
                (self.run(id)["trigger"]["burstId"] == burst).then(|| id.to_owned())
            })
        })
        .unwrap_or_else(|| panic!("burst {burst} of {workflow} started no run within {limit:?}"))
    }

    pub fn run(&self, run_id: &str) -> Value {
        let (status, body) = self.get(&format!("/api/runs/{run_id}"));
        assert_eq!(status, 200, "run {run_id}: {body}");
        body
    }

    pub fn history(&self, run_id: &str) -> Vec<Value> {
        let (status, body) = self.get(&format!("/api/runs/{run_id}/history"));
        assert_eq!(status, 200, "history {run_id}: {body}");
        body["transitions"].as_array().cloned().unwrap_or_default()
    }

    /// Waits (bounded) until the run has ended or parked (waiting for an event, sleeping): it
    /// went on as far as it can without outside help. Returns it.
    pub fn wait_settled(&self, run_id: &str, limit: Duration) -> Value {
        wait_for(limit, Duration::from_millis(50), || {
            let (status, body) = self.get(&format!("/api/runs/{run_id}"));
            let settled = matches!(
                body["status"].as_str(),
                Some("completed" | "failed" | "cancelled" | "timed_out" | "waiting" | "sleeping")
            );
            (status == 200 && settled).then_some(body)
        })
        .unwrap_or_else(|| {
            panic!("run {run_id} did not settle within {limit:?}: {}", self.get(&format!("/api/runs/{run_id}")).1)
        })
    }

    /// Waits (bounded) until the run is in a terminal state; returns it.
    pub fn wait_terminal(&self, run_id: &str, limit: Duration) -> Value {
        wait_for(limit, Duration::from_millis(50), || {
            let (status, body) = self.get(&format!("/api/runs/{run_id}"));
            (status == 200
                && matches!(body["status"].as_str(), Some("completed" | "failed" | "cancelled" | "timed_out")))
            .then_some(body)
        })
        .unwrap_or_else(|| {
            panic!("run {run_id} did not finish within {limit:?}: {}", self.get(&format!("/api/runs/{run_id}")).1)
        })
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Status and JSON body of a response, whatever the status.
pub fn http(result: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    match result {
        Ok(response) => {
            let status = response.status();
            (status, response.into_json().unwrap_or(Value::Null))
        }
        Err(ureq::Error::Status(status, response)) => (status, response.into_json().unwrap_or(Value::Null)),
        Err(err) => (0, Value::String(err.to_string())),
    }
}

/// Writes a workflows file into `dir` and returns its path.
pub fn workflows_file(dir: &Path, toml: &str) -> PathBuf {
    let path = dir.join("workflows.toml");
    std::fs::write(&path, toml).expect("write workflows file");
    path
}

/// A private Redis and one replica named `name` serving `workflows` (`{dir}` in them replaced by
/// the test's directory), with `env` added. Dropped in field order: the replica before its
/// Redis, the directory last.
pub struct Served {
    pub replica: Replica,
    pub redis: RedisServer,
    pub dir: tempfile::TempDir,
}

impl Served {
    pub fn start(name: &str, workflows: &str, env: &[(&str, &str)]) -> Served {
        let redis = RedisServer::start();
        let dir = tempfile::tempdir().expect("tempdir");
        let file = workflows_file(dir.path(), &workflows.replace("{dir}", &dir.path().display().to_string()));
        let mut config = ReplicaConfig::new(Some(redis.url()), Some(&file), dir.path());
        for (key, value) in env {
            config = config.env(key, value);
        }
        let replica = config.start(name);
        Served { replica, redis, dir }
    }
}

// ---- added for tests/failures.rs ----

impl RedisServer {
    /// A clean stop: `SHUTDOWN` (with AOF on, Redis fsyncs the file before it exits, so nothing
    /// acknowledged is lost, unlike [`RedisServer::kill`]), then waits (bounded) for the exit.
    pub fn stop_clean(&mut self) {
        let _ = redis_cli(self.port, &["SHUTDOWN"]);
        if let Some(mut child) = self.child.take() {
            let exited =
                wait_for(Duration::from_secs(15), Duration::from_millis(20), || child.try_wait().ok().flatten());
            if exited.is_none() {
                let _ = child.kill();
                let _ = child.wait();
                panic!("redis-server did not exit within 15 s of SHUTDOWN");
            }
        }
    }

    /// Starts again on the same port and directory after [`RedisServer::stop_clean`].
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "start_again: the server is still running");
        self.launch();
    }
}

impl Replica {
    /// The exit status if the process has exited (reaping it), `None` while it runs. Unlike
    /// [`Replica::wait_exit`], tells a death by signal apart from "still running".
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }
}

// ---- added for tests/replay.rs and tests/api.rs ----

/// What a one-shot run of our binary printed, and how it exited.
#[derive(Debug)]
pub struct CommandOutput {
    /// The exit code (`None`: killed by a signal, or by us after the time limit).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl ReplicaConfig {
    /// Runs our binary once with `args` (an operator command: `replay <runId>`, `runs`,
    /// `trigger`, `publish`) in the environment a replica started from this config gets (minus
    /// `PORT`, `BIND_ADDR` and `REPLICA_ID`); waits for the exit, at most 60 s (then kills it).
    pub fn command(&self, args: &[&str]) -> CommandOutput {
        let mut command = Command::new(binary());
        command
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(url) = &self.redis_url {
            command.env("REDIS_URL", url);
        }
        if let Some(file) = &self.workflows_file {
            command.env("WORKFLOWS_FILE", file);
        }
        for (key, value) in &self.env {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start the binary");
        let read = |stream: Option<Box<dyn std::io::Read + Send>>| {
            std::thread::spawn(move || {
                let mut text = Vec::new();
                if let Some(mut stream) = stream {
                    let _ = stream.read_to_end(&mut text);
                }
                String::from_utf8_lossy(&text).into_owned()
            })
        };
        let stdout = read(child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>));
        let stderr = read(child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>));
        let status = wait_for(Duration::from_secs(60), Duration::from_millis(20), || child.try_wait().ok().flatten());
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        CommandOutput {
            code: status.and_then(|s| s.code()),
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        }
    }
}

/// A request received by a [`FakeServer`].
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// Path and query, as sent.
    pub target: String,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == &name.to_ascii_lowercase()).map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// A small HTTP/1.1 server on 127.0.0.1 standing in for an outside service (the CMS, the app,
/// the Communications Hub, Inngest): it answers with `respond` and records every request.
/// Stopped when dropped.
pub struct FakeServer {
    pub port: u16,
    pub received: std::sync::Arc<std::sync::Mutex<Vec<Received>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// A response of a [`FakeServer`]: status, content type, body.
pub type Reply = (u16, &'static str, Vec<u8>);

impl FakeServer {
    pub fn start(respond: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> FakeServer {
        use std::io::{Read, Write};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a fake server");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let port = listener.local_addr().unwrap().port();
        let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let respond = std::sync::Arc::new(respond);
        let (log, stopping) = (std::sync::Arc::clone(&received), std::sync::Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((mut stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let (log, respond) = (std::sync::Arc::clone(&log), std::sync::Arc::clone(&respond));
                std::thread::spawn(move || {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 8192];
                    // Headers, then as much body as Content-Length says (bounded reads).
                    let (head_end, length) = loop {
                        let Ok(n) = stream.read(&mut chunk) else { return };
                        if n == 0 {
                            return;
                        }
                        buffer.extend_from_slice(&chunk[..n]);
                        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
                            let length = head
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            break (end + 4, length);
                        }
                        if buffer.len() > 1 << 20 {
                            return;
                        }
                    };
                    while buffer.len() < head_end + length {
                        let Ok(n) = stream.read(&mut chunk) else { return };
                        if n == 0 {
                            break;
                        }
                        buffer.extend_from_slice(&chunk[..n]);
                    }
                    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
                    let mut lines = head.lines();
                    let mut request_line = lines.next().unwrap_or("").split_whitespace();
                    let method = request_line.next().unwrap_or("").to_owned();
                    let target = request_line.next().unwrap_or("").to_owned();
                    let headers = lines
                        .filter_map(|l| l.split_once(':'))
                        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                        .collect();
                    let body = buffer[head_end..(head_end + length).min(buffer.len())].to_vec();
                    let request = Received { method, target, headers, body };
                    let (status, content_type, body) = respond(&request);
                    log.lock().unwrap().push(request);
                    let head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(head.as_bytes());
                    let _ = stream.write_all(&body);
                });
            }
        });
        FakeServer { port, received, stop }
    }

    /// A server that answers every request 200 `{}`.
    pub fn ok() -> FakeServer {
        FakeServer::start(|_| (200, "application/json", b"{}".to_vec()))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn requests(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

// ---- added for tests/workflows_data.rs: a private PostgreSQL ----

/// The newest `/usr/lib/postgresql/<version>/bin` (Debian's `postgresql` package, which
/// scripts/test.sh installs): `initdb`, `postgres`, `psql`, `pg_dump`, `pg_restore`, ...
pub fn postgres_bin_dir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            (bin.join("postgres").exists() && bin.join("initdb").exists()).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).expect(
        "PostgreSQL must be installed: /usr/lib/postgresql/<version>/bin (scripts/test.sh installs Debian's postgresql)",
    )
}

/// A private PostgreSQL server on 127.0.0.1 (a fresh cluster in a temporary directory, its unix
/// socket there too), stopped when dropped. The superuser is `postgres`, with a password (TCP
/// connections use scram-sha-256), so that a test exercises real authentication. When the tests
/// run as root, `initdb` and `postgres` (which refuse root) run as the `postgres` user that
/// Debian's package creates.
pub struct PostgresServer {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
    pub user: String,
    pub password: String,
    child: Option<Child>,
}

impl PostgresServer {
    /// initdb, then start, then wait (bounded) until it accepts connections.
    pub fn start() -> PostgresServer {
        let bin = postgres_bin_dir();
        let dir = tempfile::tempdir().expect("tempdir");
        let server = PostgresServer {
            port: free_port(),
            dir,
            bin,
            user: "postgres".to_owned(),
            // Characters a URL must percent-encode, on purpose.
            password: "wfo-p@ss:w/rd".to_owned(),
            child: None,
        };
        server.start_inner()
    }

    fn start_inner(mut self) -> PostgresServer {
        let root = self.dir.path().to_path_buf();
        let password_file = root.join("pwfile");
        std::fs::write(&password_file, format!("{}\n", self.password)).expect("write the password file");
        let as_root = unsafe { libc::geteuid() } == 0;
        let ids = as_root.then(|| {
            let id = |flag: &str| -> u32 {
                let output = Command::new("id").args([flag, "postgres"]).output().expect("run id");
                String::from_utf8_lossy(&output.stdout).trim().parse().unwrap_or_else(|_| {
                    panic!("running as root, the tests start PostgreSQL as the `postgres` user, which does not exist")
                })
            };
            (id("-u"), id("-g"))
        });
        if ids.is_some() {
            let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(&root).status().expect("chown");
            assert!(status.success(), "chown -R postgres {}", root.display());
        }
        let as_postgres = |command: &mut Command| {
            use std::os::unix::process::CommandExt;
            if let Some((uid, gid)) = ids {
                command.uid(uid).gid(gid);
            }
            command.current_dir(&root).env("LC_ALL", "C").stdin(Stdio::null());
        };

        let mut initdb = Command::new(self.bin.join("initdb"));
        initdb
            .arg("--pgdata")
            .arg(root.join("data"))
            .args(["--username", &self.user, "--auth-host=scram-sha-256", "--auth-local=trust"])
            .args(["--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"])
            .arg(format!("--pwfile={}", password_file.display()));
        as_postgres(&mut initdb);
        let output = initdb.output().expect("run initdb");
        assert!(
            output.status.success(),
            "initdb failed: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );

        let log = std::fs::File::create(root.join("postgres.log")).expect("postgres log file");
        let mut postgres = Command::new(self.bin.join("postgres"));
        postgres.arg("-D").arg(root.join("data")).args(["-p", &self.port.to_string()]);
        for setting in [
            "listen_addresses=127.0.0.1".to_owned(),
            format!("unix_socket_directories={}", root.display()),
            "fsync=off".to_owned(),
            "synchronous_commit=off".to_owned(),
            "full_page_writes=off".to_owned(),
            "max_connections=30".to_owned(),
            "shared_buffers=16MB".to_owned(),
        ] {
            postgres.args(["-c", &setting]);
        }
        as_postgres(&mut postgres);
        postgres.stdout(log.try_clone().expect("log file")).stderr(log);
        self.child = Some(postgres.spawn().expect("start postgres"));

        let ready = wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("postgres exited ({status}) while starting; log:\n{}", self.log_text());
            }
            self.psql_output("postgres", "SELECT 1").ok().filter(|out| out.trim() == "1").map(|_| ())
        });
        if ready.is_none() {
            panic!("postgres did not accept connections within 30 s; log:\n{}", self.log_text());
        }
        self
    }

    /// What the server logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// `postgres://postgres:<password, percent-encoded>@127.0.0.1:<port>/<database>`.
    pub fn url(&self, database: &str) -> String {
        let encoded: String = self
            .password
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        format!("postgres://{}:{encoded}@127.0.0.1:{}/{database}", self.user, self.port)
    }

    /// A program of the server's version (`pg_restore`, `pg_dump`, `psql`, ...), set up to reach
    /// this server: `PGHOST`, `PGPORT`, `PGUSER` and `PGPASSWORD` in its environment.
    pub fn tool(&self, name: &str) -> Command {
        let mut command = Command::new(self.bin.join(name));
        command
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", &self.user)
            .env("PGPASSWORD", &self.password)
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null());
        command
    }

    fn psql_output(&self, database: &str, sql: &str) -> Result<String, String> {
        let mut command = self.tool("psql");
        command
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", database, "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|err| format!("cannot start psql: {err}"))?;
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("psql stdin");
            stdin.write_all(sql.as_bytes()).map_err(|err| format!("writing to psql: {err}"))?;
        }
        let output = child.wait_with_output().map_err(|err| format!("waiting for psql: {err}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    /// Runs SQL (a script: statements run one by one, stopping at the first error, which panics)
    /// in `database`; returns what psql printed (unaligned, tuples only: `a|b` lines).
    pub fn psql(&self, database: &str, sql: &str) -> String {
        self.psql_output(database, sql).unwrap_or_else(|err| panic!("psql on {database} failed: {err}\nSQL:\n{sql}"))
    }

    pub fn create_database(&self, name: &str) {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\";"));
    }

    /// Immediate shutdown (SIGQUIT), then waits (bounded) for the exit; SIGKILL after 15 s.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGQUIT);
            let exited =
                wait_for(Duration::from_secs(15), Duration::from_millis(20), || child.try_wait().ok().flatten());
            if exited.is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis Cluster of six private `redis-server --cluster-enabled yes` processes on loopback
/// ports: three primaries, each with one replica (`redis-cli --cluster create
/// --cluster-replicas 1`), a one-second `cluster-node-timeout` so that a killed primary's replica
/// takes over within a few seconds. Every node is killed by pid when dropped.
pub struct RedisCluster {
    pub nodes: Vec<ClusterNode>,
}

pub struct ClusterNode {
    pub port: u16,
    bus_port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl ClusterNode {
    fn start() -> ClusterNode {
        let mut node = ClusterNode {
            port: free_port(),
            bus_port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        node.launch();
        node
    }

    /// Starts the node (again): with its `nodes.conf` it rejoins the cluster it was part of,
    /// as a replica of whichever node took its place.
    pub fn launch(&mut self) {
        let args: Vec<String> = vec![
            "--bind".into(),
            "127.0.0.1".into(),
            "--port".into(),
            self.port.to_string(),
            // The cluster bus port is named: the default, port + 10000, may not exist.
            "--cluster-port".into(),
            self.bus_port.to_string(),
            "--dir".into(),
            self.dir.path().display().to_string(),
            "--cluster-enabled".into(),
            "yes".into(),
            "--cluster-config-file".into(),
            "nodes.conf".into(),
            "--cluster-node-timeout".into(),
            "1000".into(),
            // The shards of a lost primary are unavailable until its replica takes over; the
            // others keep serving meanwhile.
            "--cluster-require-full-coverage".into(),
            "no".into(),
            "--cluster-replica-validity-factor".into(),
            "0".into(),
            // A replica's first sync starts at once (by default a diskless sync waits 5 s for
            // more replicas), so that the cluster is replicated when the test begins.
            "--repl-diskless-sync-delay".into(),
            "0".into(),
            "--save".into(),
            "".into(),
            "--appendonly".into(),
            "no".into(),
            "--maxmemory-policy".into(),
            "noeviction".into(),
        ];
        self.child = Some(spawn_redis_server(&args, self.port));
    }

    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }

    /// SIGKILL, wait for the exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// `master` or `slave`, as the node itself says.
    pub fn role(&self) -> String {
        self.cli(&["ROLE"]).lines().next().unwrap_or_default().trim().to_owned()
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        self.kill();
    }
}

impl RedisCluster {
    /// Six nodes, formed into three primaries with a replica each; returns once every node
    /// says the cluster is `ok` and each primary's replica is in sync.
    pub fn start() -> RedisCluster {
        let nodes: Vec<ClusterNode> = (0..6).map(|_| ClusterNode::start()).collect();
        let addresses: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]).args(&addresses).args(["--cluster-replicas", "1", "--cluster-yes"]);
        let output = create.output().expect("redis-cli must be installed");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = RedisCluster { nodes };
        wait_for(Duration::from_secs(30), Duration::from_millis(100), || {
            let ok = cluster.nodes.iter().all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"));
            // A node says `slave` as soon as it is assigned; it has its primary's data once its
            // link is up.
            let synced = cluster
                .nodes
                .iter()
                .filter(|n| n.cli(&["INFO", "replication"]).contains("master_link_status:up"))
                .count();
            (ok && synced == 3).then_some(())
        })
        .expect("the cluster is formed (state ok, three replicas in sync) within 30 s");
        cluster
    }

    /// `redis-cluster://` naming every node (one reachable is enough).
    pub fn url(&self) -> String {
        let mut nodes = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port));
        let first = nodes.next().expect("six nodes");
        let rest: Vec<String> = nodes.map(|n| format!("node={n}")).collect();
        format!("redis-cluster://{first}?{}", rest.join("&"))
    }

    /// A running node, for `redis-cli -c`.
    pub fn any(&self) -> &ClusterNode {
        self.nodes.iter().find(|n| n.is_running()).expect("a running node")
    }

    /// `redis-cli -c` (following redirections) against a running node.
    pub fn cli(&self, args: &[&str]) -> String {
        let port = self.any().port.to_string();
        let output = Command::new("redis-cli").args(["-c", "-h", "127.0.0.1", "-p", &port]).args(args).output();
        output.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
    }

    /// The running primaries.
    pub fn primaries(&self) -> Vec<&ClusterNode> {
        self.nodes.iter().filter(|n| n.is_running() && n.role() == "master").collect()
    }

    /// The port of the primary serving `key`'s slot, as `CLUSTER NODES` of a running node says.
    pub fn primary_of(&self, key: &str) -> Option<u16> {
        let slot: u16 = self.cli(&["CLUSTER", "KEYSLOT", key]).trim().parse().ok()?;
        self.any().cli(&["CLUSTER", "NODES"]).lines().find_map(|line| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            let flags = parts.get(2)?;
            if !flags.contains("master") || flags.contains("fail") {
                return None;
            }
            let port: u16 = parts.get(1)?.split(['@', ',']).next()?.rsplit(':').next()?.parse().ok()?;
            let owns = parts.iter().skip(8).any(|range| {
                let (start, end) = range.split_once('-').unwrap_or((range, range));
                matches!((start.parse::<u16>(), end.parse::<u16>()), (Ok(s), Ok(e)) if (s..=e).contains(&slot))
            });
            owns.then_some(port)
        })
    }
}

/// What the tests that run on both a standalone Redis and a cluster need of either: the URL the
/// replicas take, and `redis-cli` (following redirections on a cluster).
pub trait Redis {
    fn url(&self) -> String;
    fn cli(&self, args: &[&str]) -> String;
}

impl Redis for RedisServer {
    fn url(&self) -> String {
        RedisServer::url(self)
    }

    fn cli(&self, args: &[&str]) -> String {
        RedisServer::cli(self, args)
    }
}

impl Redis for RedisCluster {
    fn url(&self) -> String {
        RedisCluster::url(self)
    }

    fn cli(&self, args: &[&str]) -> String {
        RedisCluster::cli(self, args)
    }
}
