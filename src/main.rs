//! The command line: thin. Parse settings, set up tracing, build the store and the engine, serve
//! until a signal, shut down gracefully.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use workflow_orchestrator::config::Settings;
use workflow_orchestrator::definition::Registry;
use workflow_orchestrator::engine::{Engine, EngineConfig};
use workflow_orchestrator::store::memory::MemoryStore;
use workflow_orchestrator::store::redis::RedisStore;
use workflow_orchestrator::store::{Store, StoreError};

/// A durable workflow engine on Redis Streams. Configured by environment variables (see the
/// README): REDIS_URL, PORT, KEY_PREFIX, REPLICA_ID, LEASE_TTL, SHARDS, MAX_CONCURRENT_STEPS,
/// SHUTDOWN_GRACE, WORKFLOWS_FILE, LOG_LEVEL, ...
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
    /// Check the workflow definitions (WORKFLOWS_FILE or the built-in registry) and exit.
    Workflows,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("workflow-orchestrator: {err}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&settings.log_level);
    let registry = match Registry::load(settings.workflows_file.as_deref()) {
        Ok(registry) => Arc::new(registry),
        Err(err) => {
            eprintln!("workflow-orchestrator: definition error: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("workflow-orchestrator: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => runtime.block_on(serve(settings, registry)),
        Command::Workflows => {
            for workflow in registry.iter() {
                let schedule = workflow.def.schedule.as_deref().unwrap_or("-");
                println!("{:<28} {:<14} {}", workflow.def.id, schedule, workflow.def.events.join(","));
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("workflow-orchestrator: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(level: &str) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

async fn open_store(settings: &Settings) -> anyhow::Result<Arc<dyn Store>> {
    match &settings.redis_url {
        Some(url) => {
            let store =
                RedisStore::connect(url, &settings.key_prefix, settings.shards).await.map_err(|err| match err {
                    StoreError::Unavailable(msg) => anyhow::anyhow!("{msg} (REDIS_URL={})", redact(url)),
                    other => anyhow::anyhow!(other),
                })?;
            tracing::info!(redis = %redact(url), prefix = %settings.key_prefix, shards = settings.shards, "using the Redis store");
            Ok(Arc::new(store))
        }
        None => {
            tracing::warn!(
                "REDIS_URL is not set: running on the EMBEDDED IN-MEMORY STORE. One process only; nothing survives a restart. Set REDIS_URL for durable, multi-replica operation."
            );
            Ok(Arc::new(MemoryStore::new(settings.shards, settings.lease_ttl)))
        }
    }
}

/// The URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

async fn serve(settings: Settings, registry: Arc<Registry>) -> anyhow::Result<()> {
    let store = open_store(&settings).await?;
    if let Ok(health) = store.health().await {
        for warning in &health.warnings {
            tracing::warn!("{warning}");
        }
    }
    let engine =
        Engine::new(store, registry, EngineConfig::from_settings(&settings)).await.context("starting the engine")?;
    let bind: std::net::IpAddr =
        std::env::var("BIND_ADDR").ok().and_then(|a| a.parse().ok()).unwrap_or([0, 0, 0, 0].into());
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(bind, settings.port))
        .await
        .with_context(|| format!("cannot listen on {bind}:{}", settings.port))?;
    let address = listener.local_addr().context("reading the listening address")?;
    engine.start();
    tracing::info!(%address, replica = %settings.replica_id, workflows = engine.registry().len(), "serving");
    // A line for scripts and test harnesses that start us with PORT=0.
    println!("listening on http://{address}");

    let stop = CancellationToken::new();
    let server = tokio::spawn(workflow_orchestrator::api::serve(listener, Arc::clone(&engine), stop.clone()));
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
