//! workflow-orchestrator: a durable workflow engine on Redis Streams.
//!
//! # Layout
//!
//! Layers from the bottom up; a module only uses the ones above it in this list.
//!
//! - [`definition`]: workflow definitions as plain data: the TOML format, validation, the
//!   registry and the built-in Molochain workflows.
//! - [`machine`]: the run state machine: `apply`, `next`, `advance` over a run's steps as a
//!   graph (`needs`), what timers, events and child runs record (`timers_fired`,
//!   `event_arrived`, `child_ended`), retry or final failure (`step_failure`), and each step's
//!   view (`step_views`). Pure: no I/O, no clock.
//! - [`store`]: the only code that knows Redis: key layout, codecs, the Lua functions in
//!   `migrations/`; a [`store::Store`] trait with the Redis and the in-memory implementations.
//! - [`actions`]: what a step does (noop, exec, http, publish, notify, sleep, wait_for_event,
//!   inngest, the built-ins, workflow: a child run), reaching the engine only through
//!   [`actions::Services`].
//! - [`engine`]: the loops of a replica: executors, group commit, lease renewal, reclaim,
//!   timers, the event router, cron, child runs, the sweeper, operators' actions, graceful
//!   shutdown.
//! - [`api`]: the hyper server: routing, JSON, errors; the dashboard's page and assets
//!   (`src/api/ui/`, compiled in) and its sessions.
//! - [`config`]: settings from the environment.
//! - [`telemetry`]: the process's logs (the `tracing` subscriber, `LOG_FORMAT`) and traces
//!   ([`telemetry::otel`]); set up by `main`, used by no other module.

//! # Where a transition happens
//!
//! A transition is **decided** in [`machine`]: the engine hands it what happened (a step's
//! outcome, a timer, an event, a child's end, an operator's action) and `machine::advance`
//! returns the transitions to record and the effects they imply (steps to queue, a timer, the
//! run's end). It is **persisted** by one atomic, fenced commit of [`store::Store`]
//! (`Runs::commit` / `commit_group`: the Lua function `wfo_v2_commit_steps` in
//! `migrations/002_wfo_v2.lua` for Redis, `store::memory` in memory), which appends the records,
//! queues the steps and sets the timer together, or refuses as stale. It is **executed** by
//! [`engine`]: `engine::executor` claims a queued step, runs its action ([`actions`]) and
//! commits the outcome; `engine::timers`, `engine::router` and `engine::children` record wake-ups
//! the same way.

#![forbid(unsafe_code)]

pub mod actions;
pub mod api;
pub mod config;
pub mod definition;
pub mod engine;
pub mod machine;
pub mod store;
pub mod telemetry;
