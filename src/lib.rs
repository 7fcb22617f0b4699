//! workflow-orchestrator: a durable workflow engine on Redis Streams.
//!
//! # Layout
//!
//! Layers from the bottom up; a module only uses the ones above it in this list.
//!
//! - [`definition`]: workflow definitions as plain data: the TOML format, validation, the
//!   registry and the built-in Molochain workflows.
//! - [`machine`]: the run state machine: `apply`, `next`, `advance`. Pure: no I/O, no clock.
//! - [`store`]: the only code that knows Redis: key layout, codecs, the Lua functions in
//!   `migrations/`; a [`store::Store`] trait with the Redis and the in-memory implementations.
//! - [`actions`]: what a step does (noop, exec).
//! - [`engine`]: the loops of a replica: executors, lease renewal, reclaim, timers, sweeper,
//!   graceful shutdown.
//! - [`api`]: the hyper server: routing, JSON, errors; the dashboard's page and assets
//!   (`src/api/ui/`, compiled in) and its sessions.
//! - [`config`]: settings from the environment.
//! - [`telemetry`]: the process's logs (the `tracing` subscriber, `LOG_FORMAT`) and traces
//!   ([`telemetry::otel`]); set up by `main`, used by no other module.

#![forbid(unsafe_code)]

pub mod actions;
pub mod api;
pub mod config;
pub mod definition;
pub mod engine;
pub mod machine;
pub mod store;
pub mod telemetry;
