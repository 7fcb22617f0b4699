//! Operator commands against the Redis a service runs on: replay, runs, trigger, publish,
//! workflows.

use anyhow::{Context, bail};
use std::process::ExitCode;
use workflow_orchestrator::api::views;
use workflow_orchestrator::definition::Registry;
use workflow_orchestrator::engine::{Accepted, Engine, EngineError};
use workflow_orchestrator::machine::{self, Transition, Trigger};
use workflow_orchestrator::store::{Debounced, RunId, RunQuery, RunSummary};

pub fn workflows(registry: &Registry) {
    for workflow in registry.iter() {
        let schedule = workflow.def.schedule.as_deref().unwrap_or("-");
        println!("{:<28} {:<16} {}", workflow.def.id, schedule, workflow.def.events.join(","));
    }
}

fn parse_object(what: &str, text: &str) -> anyhow::Result<serde_json::Value> {
    let value: serde_json::Value = serde_json::from_str(text).with_context(|| format!("{what} is not valid JSON"))?;
    if !value.is_object() {
        bail!("{what} must be a JSON object");
    }
    Ok(value)
}

/// Folds the run's log through the state machine, prints the timeline, and checks the fold
/// against the stored summary. With `at`, folds the log only up to that entry (a seq) and
/// shows the run as it was right after it (no check: the stored summary is the end's).
pub async fn replay(engine: &Engine, run_id: &str, json: bool, at: Option<u64>) -> anyhow::Result<ExitCode> {
    let run: RunId = run_id.parse().map_err(anyhow::Error::msg)?;
    let mut log = match engine.history(&run).await {
        Ok(Some(log)) => log,
        Ok(None) => bail!("no run `{run_id}`"),
        Err(err) => {
            eprintln!("replay of {run_id} FAILED: the log cannot be read: {err}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let last = log.last().map_or(0, |l| l.seq);
    if let Some(at) = at {
        if at == 0 || at > last {
            bail!("--at must be a seq of the run's log, from 1 to {last}");
        }
        log.retain(|l| l.seq <= at);
    }
    let partial = at.is_some_and(|at| at < last);
    let Some(hash) = machine::definition_of(log.iter().map(|l| &l.recorded)) else {
        eprintln!("replay of {run_id} FAILED: the log does not start with `run_created`");
        return Ok(ExitCode::FAILURE);
    };
    let workflow = engine.definition(run.shard, hash).await?;
    let mut state = None;
    for entry in &log {
        match machine::apply(state.as_ref(), &entry.recorded, &workflow.def) {
            Ok(next) => state = Some(next),
            Err(err) => {
                eprintln!(
                    "replay of {run_id} FAILED at log entry {} ({}): {err}",
                    entry.seq,
                    entry.recorded.transition.kind()
                );
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    let Some(state) = state else { bail!("run `{run_id}` has an empty log") };
    let stored: Option<RunSummary> = engine.summary(&run).await?;
    let consistent = stored.as_ref().is_some_and(|s| s.matches(&state));
    if partial {
        // As `GET /api/runs/:id/state?at=`: the check against the stored state is the end's.
        let view = views::run_at(run_id, &state, &log, &workflow, None);
        if json {
            println!("{}", serde_json::to_string_pretty(&view)?);
        } else {
            println!("run {run_id} right after log entry {} of {last}:", state.seq);
            println!("{}", serde_json::to_string_pretty(&view)?);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if json {
        let transitions: Vec<serde_json::Value> = log.iter().map(|entry| views::transition(entry, &workflow)).collect();
        let out = serde_json::json!({
            "runId": run_id,
            "workflowId": state.workflow,
            "status": state.status.name(),
            "seq": state.seq,
            "consistent": consistent,
            "stored": stored.as_ref().map(|s| serde_json::json!({ "status": s.status, "seq": s.seq })),
            "transitions": transitions,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("run {run_id}  workflow {}  definition {}", state.workflow, state.definition);
        println!(
            "{:<4} {:<24} {:<15} {:<20} {:>7} {:<16} {:>10}  detail",
            "seq", "time", "transition", "step", "attempt", "replica", "took"
        );
        let mut started: std::collections::HashMap<(u32, u32), u64> = std::collections::HashMap::new();
        for entry in &log {
            let recorded = &entry.recorded;
            let (step, attempt) = recorded.transition.step_attempt().unwrap_or((u32::MAX, 0));
            let step_name = workflow.def.steps.get(step as usize).map_or("-", |s| s.id.as_str());
            let took = match &recorded.transition {
                Transition::StepStarted { step, attempt } => {
                    started.insert((*step, *attempt), recorded.at);
                    String::new()
                }
                Transition::StepCompleted { step, attempt, .. } | Transition::StepFailed { step, attempt, .. } => {
                    started
                        .get(&(*step, *attempt))
                        .map_or_else(String::new, |at| format!("{}ms", recorded.at.saturating_sub(*at)))
                }
                _ => String::new(),
            };
            let detail = match &recorded.transition {
                Transition::RunCreated { trigger, .. } => match trigger {
                    Trigger::Api => "trigger api".to_owned(),
                    Trigger::Cron { fire_at } => format!("cron fire {}", views::timestamp(*fire_at)),
                    Trigger::Event { event_id, event_type } => format!("event {event_type} {event_id}"),
                    Trigger::Rerun { run_id, from_step } => format!("rerun of {run_id} from step {from_step}"),
                    Trigger::Parent { run_id, step_id, attempt, .. } => {
                        format!("child of run {run_id}, step {step_id} attempt {attempt}")
                    }
                    Trigger::Debounce { triggers, last, .. } => {
                        format!("debounce of {triggers} triggers, the last by {}", last.kind())
                    }
                },
                Transition::ChildStarted { child, .. } => format!("child run {child}"),
                Transition::ChildEnded { child, status, .. } => format!("child run {child} {status}"),
                Transition::StepFailed { error, retry_at, .. } => match retry_at {
                    Some(at) => format!("error: {error} (retry at {})", views::timestamp(*at)),
                    None => format!("error: {error}"),
                },
                Transition::RunFailed { error } => format!("error: {error}"),
                Transition::RunCancelled { reason } => format!("reason: {reason}"),
                Transition::StepReused { .. } => "output reused".to_owned(),
                Transition::StepSkipped { .. } => "condition false: skipped".to_owned(),
                _ => String::new(),
            };
            let attempt = if attempt == 0 { "-".to_owned() } else { attempt.to_string() };
            println!(
                "{:<4} {:<24} {:<15} {:<20} {:>7} {:<16} {:>10}  {}",
                entry.seq,
                views::timestamp(recorded.at),
                recorded.transition.kind(),
                step_name,
                attempt,
                recorded.replica.as_deref().unwrap_or("-"),
                took,
                detail.chars().take(200).collect::<String>()
            );
        }
        println!("replayed state: {} (seq {})", state.status.name(), state.seq);
        match &stored {
            Some(s) if consistent => println!("stored state:   {} (seq {}): consistent", s.status, s.seq),
            Some(s) => println!("stored state:   {} (seq {}): DIFFERS from the replay", s.status, s.seq),
            None => println!("stored state:   missing"),
        }
    }
    if consistent {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("replay of {run_id} FAILED: the fold of the log does not equal the stored state");
        Ok(ExitCode::FAILURE)
    }
}

/// The run status `--status` names.
fn status_arg(name: &str) -> anyhow::Result<machine::Status> {
    machine::Status::from_name(name)
        .with_context(|| format!("--status must be one of {}", machine::STATUS_NAMES.join(", ")))
}

/// `bulk <cancel|retry>`: see [`Engine::bulk`]. Exits 1 when a matched run was left as it was.
pub async fn bulk(
    engine: &Engine,
    action: &str,
    workflow: Option<String>,
    status: Option<String>,
    created_after: Option<String>,
    created_before: Option<String>,
    limit: usize,
) -> anyhow::Result<ExitCode> {
    use workflow_orchestrator::engine::{BulkAction, BulkFilter, MAX_BULK};
    let action = match action {
        "cancel" => BulkAction::Cancel,
        "retry" => BulkAction::Retry,
        other => bail!("the action is `cancel` or `retry`, not `{other}`"),
    };
    if !(1..=MAX_BULK).contains(&limit) {
        bail!("--limit must be from 1 to {MAX_BULK}");
    }
    let time = |name: &str, text: Option<String>| -> anyhow::Result<Option<machine::Millis>> {
        text.map(|text| {
            machine::parse_timestamp(&text)
                .with_context(|| format!("--{name} must be an RFC 3339 time, like 2026-12-07T10:00:00Z"))
        })
        .transpose()
    };
    let filter = BulkFilter {
        workflow,
        status: status.as_deref().map(status_arg).transpose()?,
        created_after: time("created-after", created_after)?,
        created_before: time("created-before", created_before)?,
    };
    let outcome = engine.bulk(action, &filter, limit).await?;
    println!("matched {}, done {}, left as they were {}", outcome.matched, outcome.done, outcome.failed.len());
    for (run, error) in &outcome.failed {
        println!("  {run}: {error}");
    }
    Ok(if outcome.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

pub async fn runs(
    engine: &Engine,
    workflow: Option<&str>,
    status: Option<&str>,
    limit: usize,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let status = status.map(status_arg).transpose()?;
    let query = RunQuery { workflow, status, before: None, limit: limit.clamp(1, 1000) };
    let runs = engine.list_runs(query).await?;
    let mut rows = Vec::new();
    for run in &runs {
        if let Some(summary) = engine.summary(run).await? {
            rows.push((run.to_string(), summary));
        }
    }
    if json {
        let out: Vec<serde_json::Value> = rows.iter().map(|(id, s)| views::summary(id, s, None)).collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{:<38} {:<26} {:<10} {:<24} {:<24}", "run", "workflow", "status", "created", "updated");
        for (id, s) in rows {
            println!(
                "{id:<38} {:<26} {:<10} {:<24} {:<24}",
                s.workflow,
                s.status,
                views::timestamp(s.created_at),
                views::timestamp(s.updated_at)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn trigger(engine: &Engine, workflow: &str, input: &str, key: Option<&str>) -> anyhow::Result<ExitCode> {
    let input = parse_object("--input", input)?;
    let key = key.map(|k| format!("api:{workflow}:{k}"));
    match engine.accept(workflow, &input, key.as_deref(), Trigger::Api, None).await {
        Ok(Accepted::Started(triggered)) => {
            println!("{}", triggered.run_id);
            Ok(ExitCode::SUCCESS)
        }
        Ok(Accepted::Debounced(Debounced::Absorbed { burst, triggers, due })) => {
            let due = views::timestamp(due);
            println!("debounced: burst {burst} ({triggers} triggers so far) starts its run at {due}");
            Ok(ExitCode::SUCCESS)
        }
        Ok(Accepted::Debounced(Debounced::Duplicate { burst })) => {
            println!("debounced: burst {burst} (this idempotency key was seen before)");
            Ok(ExitCode::SUCCESS)
        }
        Err(EngineError::UnknownWorkflow(id)) => bail!("no workflow `{id}` (see `workflow-orchestrator workflows`)"),
        Err(err) => Err(err.into()),
    }
}

/// `pause <workflow>` / `resume <workflow>`: prints `{"workflowId", "paused"}` as the API does.
pub async fn pause(engine: &Engine, workflow: &str, paused: bool) -> anyhow::Result<ExitCode> {
    match engine.set_paused(workflow, paused).await {
        Ok(paused) => {
            println!("{}", serde_json::json!({ "workflowId": workflow, "paused": paused }));
            Ok(ExitCode::SUCCESS)
        }
        Err(EngineError::UnknownWorkflow(id)) => bail!("no workflow `{id}` (see `workflow-orchestrator workflows`)"),
        Err(err) => Err(err.into()),
    }
}

pub async fn publish(engine: &Engine, event_type: &str, payload: &str, key: Option<&str>) -> anyhow::Result<ExitCode> {
    let payload = parse_object("--payload", payload)?;
    match engine.publish_event(event_type, &payload, key, Some("cli")).await? {
        Ok(id) => {
            println!("{id}");
            Ok(ExitCode::SUCCESS)
        }
        Err(problem) => bail!("{problem}"),
    }
}
