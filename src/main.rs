//! The command line: thin. Parse settings, set up tracing, build the store and the engine, then
//! serve until a signal (and shut down gracefully), or do one operator task and exit.

mod cli;

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use workflow_orchestrator::api::ApiState;
use workflow_orchestrator::config::{self, Settings};
use workflow_orchestrator::definition::Registry;
use workflow_orchestrator::engine::{Engine, EngineConfig};
use workflow_orchestrator::store::memory::MemoryStore;
use workflow_orchestrator::store::redis::{RedisStore, ReplicaWait};
use workflow_orchestrator::store::{Store, StoreError};
use workflow_orchestrator::telemetry::{self, LogFormat};

/// The allocator: a step's hot path allocates and frees many small buffers (frames, encoded
/// records, JSON), and glibc's malloc spent about a quarter of the engine's CPU on them
/// (README, Performance).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read at its start: two arenas (its default, four per CPU, holds a few
/// MiB more of idle memory for no gain with a runtime of one worker per core).
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: &u8 = &b"narenas:2\0"[0];

/// A durable workflow engine on Redis Streams. Configured by environment variables (see the
/// README): REDIS_URL, PORT, KEY_PREFIX, REPLICA_ID, LEASE_TTL, SHARDS, MAX_CONCURRENT_STEPS,
/// SHUTDOWN_GRACE, WORKFLOWS_FILE, API_TOKEN, BIND_ADDR, ALLOWED_HOSTS, LOG_LEVEL, ...
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API and run workflows (the default).
    Serve,
    /// Replay a run's log through the state machine: print its timeline and check that the fold
    /// equals the stored state (exit 1 and name the entry if not).
    Replay {
        run_id: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Fold the log only up to this entry (a seq, from 1) and show the run as it was right
        /// after it.
        #[arg(long)]
        at: Option<u64>,
    },
    /// List runs, newest first.
    Runs {
        #[arg(long)]
        workflow: Option<String>,
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Cancel or retry every run matching a filter (at most --limit, newest first); prints what
    /// was done. Safe to repeat.
    Bulk {
        /// `cancel` (live runs) or `retry` (failed runs).
        action: String,
        #[arg(long)]
        workflow: Option<String>,
        #[arg(long)]
        status: Option<String>,
        /// Runs created at or after this time (RFC 3339).
        #[arg(long)]
        created_after: Option<String>,
        /// Runs created before this time (RFC 3339).
        #[arg(long)]
        created_before: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Start a run of a workflow.
    Trigger {
        workflow: String,
        /// The run's input, a JSON object.
        #[arg(long, default_value = "{}")]
        input: String,
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Pause a workflow: steps already running finish, no further step of its runs runs, and
    /// new runs wait until it is resumed.
    Pause { workflow: String },
    /// Resume a paused workflow: the runs held meanwhile go on, oldest first.
    Resume { workflow: String },
    /// Publish an event on the bus.
    Publish {
        event_type: String,
        /// The event's payload, a JSON object.
        #[arg(long, default_value = "{}")]
        payload: String,
        #[arg(long)]
        key: Option<String>,
    },
    /// Check the workflow definitions (WORKFLOWS_FILE or the built-in registry) and list them.
    Workflows,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    let serving = matches!(command, Command::Serve);
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(err) => {
            // Said in the format asked for, if that much reads.
            let asked = config::log_format(&config::env_lookup).ok().flatten();
            telemetry::fatal(log_format(asked, serving), &err.to_string());
            return ExitCode::from(2);
        }
    };
    let format = log_format(settings.log_format, serving);
    // Operator commands print for people (or machines): only warnings go to the log.
    let default_level = if serving { settings.log_level.as_str() } else { "warn" };
    // Traces only while serving, built before the runtime starts (their exporter's HTTP client
    // is a blocking one); `_traces` flushes them when `main` returns, after the runtime is gone.
    let traces = match settings.traces.as_ref().filter(|_| serving) {
        None => None,
        Some(traces) => match telemetry::otel::pipeline(traces, &settings.replica_id) {
            Ok(pipeline) => Some(pipeline),
            Err(err) => {
                telemetry::fatal(format, &format!("cannot set up traces: {err:#}"));
                return ExitCode::FAILURE;
            }
        },
    };
    let (trace_layer, _traces) = traces.unzip();
    if let Err(err) = telemetry::init(format, default_level, trace_layer) {
        telemetry::fatal(format, &format!("cannot set up logging: {err}"));
        return ExitCode::FAILURE;
    }
    let registry = match Registry::load(settings.workflows_file.as_deref()) {
        Ok(registry) => Arc::new(registry),
        Err(err) => {
            telemetry::fatal(format, &format!("definition error: {err}"));
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            telemetry::fatal(format, &format!("cannot start the runtime: {err}"));
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command {
            Command::Serve => serve(settings, registry, format).await.map(|()| ExitCode::SUCCESS),
            Command::Workflows => {
                cli::workflows(&registry);
                Ok(ExitCode::SUCCESS)
            }
            other => {
                if settings.redis_url.is_none() {
                    anyhow::bail!("REDIS_URL is not set: operator commands work on the Redis a service runs on");
                }
                let engine = open_engine(&settings, registry).await?;
                match other {
                    Command::Replay { run_id, json, at } => cli::replay(&engine, &run_id, json, at).await,
                    Command::Runs { workflow, status, limit, json } => {
                        cli::runs(&engine, workflow.as_deref(), status.as_deref(), limit, json).await
                    }
                    Command::Bulk { action, workflow, status, created_after, created_before, limit } => {
                        cli::bulk(&engine, &action, workflow, status, created_after, created_before, limit).await
                    }
                    Command::Trigger { workflow, input, idempotency_key } => {
                        cli::trigger(&engine, &workflow, &input, idempotency_key.as_deref()).await
                    }
                    Command::Pause { workflow } => cli::pause(&engine, &workflow, true).await,
                    Command::Resume { workflow } => cli::pause(&engine, &workflow, false).await,
                    Command::Publish { event_type, payload, key } => {
                        cli::publish(&engine, &event_type, &payload, key.as_deref()).await
                    }
                    Command::Serve | Command::Workflows => unreachable!("handled above"),
                }
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            telemetry::fatal(format, &format!("{err:#}"));
            ExitCode::FAILURE
        }
    }
}

/// The log format: `LOG_FORMAT`, else for `serve` chosen by the terminal (see
/// [`telemetry::resolve`]); operator commands are run by people, and say their errors in text.
fn log_format(asked: Option<LogFormat>, serving: bool) -> LogFormat {
    if serving { telemetry::resolve(asked) } else { asked.unwrap_or(LogFormat::Text) }
}

async fn open_store(settings: &Settings) -> anyhow::Result<Arc<dyn Store>> {
    match &settings.redis_url {
        Some(url) => {
            let store =
                RedisStore::open(url, &settings.key_prefix, settings.shards).await.map_err(|err| match err {
                    StoreError::Unavailable(msg) => anyhow::anyhow!("{msg} (REDIS_URL={})", redact(url)),
                    other => anyhow::anyhow!(other),
                })?;
            let store = store.wait_for_replicas(ReplicaWait {
                replicas: settings.redis_wait_replicas,
                timeout: settings.redis_wait_timeout,
            });
            tracing::info!(
                redis = %redact(url),
                cluster = store.is_cluster(),
                wait_replicas = settings.redis_wait_replicas,
                prefix = %settings.key_prefix,
                shards = store.keys().shards(),
                "using the Redis store"
            );
            Ok(Arc::new(store))
        }
        None => {
            tracing::warn!(
                "REDIS_URL is not set: running on the EMBEDDED IN-MEMORY STORE. One process only; nothing survives a restart. Set REDIS_URL for durable, multi-replica operation."
            );
            Ok(Arc::new(MemoryStore::new(settings.shards.unwrap_or(config::DEFAULT_SHARDS))))
        }
    }
}

async fn open_engine(settings: &Settings, registry: Arc<Registry>) -> anyhow::Result<Arc<Engine>> {
    let store = open_store(settings).await?;
    Engine::new(store, registry, EngineConfig::from_settings(settings)).await.context("starting the engine")
}

/// The URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

async fn serve(settings: Settings, registry: Arc<Registry>, format: LogFormat) -> anyhow::Result<()> {
    let engine = open_engine(&settings, registry).await?;
    if let Ok(health) = engine.store_health().await {
        for warning in &health.warnings {
            tracing::warn!("{warning}");
        }
    }
    for warning in &settings.warnings {
        tracing::warn!("{warning}");
    }
    if let Some(traces) = &settings.traces {
        tracing::info!(endpoint = %traces.endpoint, service = %traces.service_name, "exporting traces (OTLP over HTTP, protobuf)");
    }
    let bind = settings.bind_addr;
    if settings.api_token.is_none() {
        if bind.is_loopback() {
            tracing::warn!(
                %bind,
                "API_TOKEN is not set: the API is open to anyone on this machine (listening on loopback only; set API_TOKEN, then BIND_ADDR, to serve other machines)"
            );
        } else {
            tracing::warn!(
                %bind,
                "API_TOKEN is not set: the API is open to anyone who can reach it; only loopback, IP-address and ALLOWED_HOSTS Host headers are accepted"
            );
        }
    }
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(bind, settings.port))
        .await
        .with_context(|| format!("cannot listen on {bind}:{}", settings.port))?;
    let address = listener.local_addr().context("reading the listening address")?;
    engine.start();
    tracing::info!(%address, replica = %settings.replica_id, workflows = engine.registry().len(), "serving");
    // A line for scripts and test harnesses that start us with PORT=0.
    telemetry::announce_listening(format, address);

    let stop = CancellationToken::new();
    let state = Arc::new(ApiState::new(Arc::clone(&engine), &settings));
    let server = tokio::spawn(workflow_orchestrator::api::serve(listener, state, stop.clone()));
    shutdown_signal().await;
    tracing::info!(grace = ?settings.shutdown_grace, "stopping: no new work is claimed; in-flight steps may finish");
    stop.cancel();
    let finished = engine.shutdown().await;
    let _ = server.await;
    if finished {
        tracing::info!("stopped cleanly");
    } else {
        tracing::warn!("stopped; steps still running were left to the other replicas");
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(err) => {
            tracing::error!(%err, "cannot listen for SIGTERM; only Ctrl-C will stop the service");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
