//! JSON views of runs, built from their logs (the source of truth) and definition snapshots.

use crate::definition::Workflow;
use crate::machine::{self, RunState, StepStatus, Transition};
use crate::store::{BusEntry, ListedEvent, Logged, ReplicaBeat, RunSummary};
use serde_json::{Value, json};

pub use crate::machine::timestamp;

/// JSON text as a value; anything that is not JSON is kept as a string.
fn json_text(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
}

fn step_id(workflow: &Workflow, step: u32) -> Value {
    workflow.def.steps.get(step as usize).map_or(Value::Null, |s| Value::String(s.id.clone()))
}

/// `GET /api/runs/:runId`.
pub fn run(run_id: &str, state: &RunState, log: &[Logged], workflow: &Workflow) -> Value {
    let steps: Vec<Value> = machine::step_views(state, log.iter().map(|l| &l.recorded), &workflow.def)
        .into_iter()
        .map(|view| {
            json!({
                "id": step_id(workflow, view.step),
                "status": view.status,
                "attempts": view.attempts,
                "output": view.output.as_deref().map_or(Value::Null, json_text),
                "error": view.error,
                "needs": needs(workflow, view.step),
                "startedAt": view.started_at.map(timestamp),
                "endedAt": view.ended_at.map(timestamp),
            })
        })
        .collect();
    // The error that ended the run: a failure before the run was last resumed is history only.
    let run_error = log
        .iter()
        .rev()
        .take_while(|entry| !matches!(entry.recorded.transition, Transition::RunResumed { .. }))
        .find_map(|entry| match &entry.recorded.transition {
            Transition::RunFailed { error } => Some(error.clone()),
            Transition::RunCancelled { reason } => Some(format!("cancelled: {reason}")),
            _ => None,
        });
    let (parent_run, parent_step) = match &state.trigger {
        machine::Trigger::Parent { run_id, step_id, .. } => (json!(run_id), json!(step_id)),
        _ => (Value::Null, Value::Null),
    };
    let children: Vec<Value> = log
        .iter()
        .filter_map(|entry| match &entry.recorded.transition {
            Transition::ChildStarted { step, attempt, child } => {
                Some(json!({ "step": step_id(workflow, *step), "attempt": attempt, "runId": child }))
            }
            _ => None,
        })
        .collect();
    json!({
        "runId": run_id,
        "workflowId": state.workflow,
        "status": state.status.name(),
        "input": json_text(&state.input),
        "trigger": state.trigger.to_json(),
        "parentRunId": parent_run,
        "parentStep": parent_step,
        "children": children,
        "steps": steps,
        "error": run_error,
        "seq": state.seq,
        "createdAt": timestamp(state.created_at),
        "updatedAt": timestamp(state.updated_at),
    })
}

/// One transition of `GET /api/runs/:runId/history`.
pub fn transition(entry: &Logged, workflow: &Workflow) -> Value {
    let recorded = &entry.recorded;
    let (step, attempt) = recorded
        .transition
        .step_attempt()
        .map_or((Value::Null, Value::Null), |(s, a)| (step_id(workflow, s), json!(a)));
    let mut item = json!({
        "seq": entry.seq,
        "type": recorded.transition.kind(),
        "at": timestamp(recorded.at),
        "step": step,
        "attempt": attempt,
        "replica": recorded.replica,
    });
    let extra = match &recorded.transition {
        Transition::RunCreated { workflow, definition, input, trigger: t, trace } => {
            json!({
                "workflowId": workflow,
                "definition": definition,
                "input": json_text(input),
                "trigger": t.to_json(),
                "traceId": trace.as_ref().map(|t| t.span.trace_id_hex()),
            })
        }
        Transition::StepCompleted { output, .. } => json!({ "output": json_text(output) }),
        Transition::StepFailed { error, retry_at, .. } => json!({ "error": error, "retryAt": retry_at.map(timestamp) }),
        Transition::RunFailed { error } => json!({ "error": error }),
        Transition::RunCancelled { reason } => json!({ "reason": reason }),
        Transition::StepReused { output, .. } => json!({ "output": json_text(output), "reused": true }),
        Transition::StepSuspended { until, event, .. } => json!({ "until": timestamp(*until), "event": event }),
        Transition::EventReceived { event_id, payload, .. } => {
            json!({ "eventId": event_id, "payload": json_text(payload) })
        }
        Transition::ChildStarted { child, .. } => json!({ "childRunId": child }),
        Transition::ChildEnded { child, status, .. } => json!({ "childRunId": child, "childStatus": status }),
        Transition::StepSkipped { .. } => json!({ "output": json_text(machine::SKIPPED_OUTPUT) }),
        Transition::StepStarted { .. }
        | Transition::TimerFired { .. }
        | Transition::RunCompleted
        | Transition::RunTimedOut
        | Transition::RunResumed { .. } => json!({}),
    };
    if let (Value::Object(item), Value::Object(extra)) = (&mut item, extra) {
        item.extend(extra);
    }
    item
}

/// One event of `GET /api/events`.
pub fn event(listed: &ListedEvent) -> Value {
    let entry = &listed.entry;
    let text = |name: &str| entry.field(name).map(|v| String::from_utf8_lossy(v).into_owned());
    // Entry ids are `<ms>-<seq>` by construction (Redis and the memory store alike).
    let published_at = timestamp(crate::store::entry_ms(&entry.id).unwrap_or(0));
    let runs = listed.started.as_ref().map(|runs| {
        runs.iter().map(|(workflow, run)| json!({ "workflowId": workflow, "runId": run })).collect::<Vec<_>>()
    });
    // An entry too large to list whole (see `LISTED_ENTRY_CAP`) shows a prefix of each field:
    // the payload's is not JSON, so it is a string then, with the payload's size.
    let truncated = entry.oversized.is_some();
    let payload = match text("payload") {
        None => json!({}),
        Some(prefix) if truncated => Value::String(prefix),
        Some(payload) => json_text(&payload),
    };
    let mut item = json!({
        "eventId": entry.id,
        "eventType": text("type"),
        "payload": payload,
        "truncated": truncated,
        "key": text("key"),
        "source": text("source"),
        "publishedAt": published_at,
        "handled": listed.started.is_some(),
        "runs": runs,
    });
    if truncated {
        item["payloadBytes"] = json!(entry.value_bytes("payload"));
        item["bytes"] = json!(entry.total_bytes());
    }
    item
}

/// One dead letter of `GET /api/events/dead`: why, which entry, and what it held (a dead
/// letter keeps a prefix of each field; a listing may cut it further).
pub fn dead_letter(letter: &BusEntry) -> Value {
    let text = |name: &str| letter.field(name).map(|v| String::from_utf8_lossy(v).into_owned());
    let ours = ["reason", "entry", "bytes", "truncated"];
    let fields: serde_json::Map<String, Value> = letter
        .fields
        .iter()
        .filter(|(name, _)| !ours.iter().any(|ours| ours.as_bytes() == name.as_slice()))
        .map(|(name, value)| {
            (String::from_utf8_lossy(name).into_owned(), Value::String(String::from_utf8_lossy(value).into_owned()))
        })
        .collect();
    let at = crate::store::entry_ms(&letter.id).unwrap_or(0);
    json!({
        "deadLetterId": letter.id,
        "eventId": text("entry"),
        "reason": text("reason"),
        "bytes": text("bytes").and_then(|b| b.parse::<u64>().ok()),
        "truncated": text("truncated").as_deref() == Some("1") || letter.oversized.is_some(),
        "deadLetteredAt": timestamp(at),
        "fields": fields,
    })
}

/// A run in a list: its summary (`GET /api/runs`, workflow status).
pub fn summary(run_id: &str, summary: &RunSummary, step: Option<String>) -> Value {
    let finished = summary.status.is_terminal();
    json!({
        "runId": run_id,
        "workflowId": summary.workflow,
        "status": summary.status.name(),
        "trigger": summary.trigger,
        "step": step,
        "attempt": summary.attempt,
        "createdAt": timestamp(summary.created_at),
        "updatedAt": timestamp(summary.updated_at),
        "durationMs": finished.then(|| summary.updated_at.saturating_sub(summary.created_at)),
    })
}

/// A run as it was right after the last entry of `log` (its fold `state`): the run view with
/// `at` (that entry's seq), `current`, and `foldMatchesStored`, replay's check against the
/// stored summary where it was made (at the log's end), else `null`.
pub fn run_at(
    run_id: &str,
    state: &RunState,
    log: &[Logged],
    workflow: &Workflow,
    fold_matches: Option<bool>,
) -> Value {
    let mut view = run(run_id, state, log, workflow);
    view["at"] = json!(state.seq);
    view["current"] = current(state, workflow);
    view["foldMatchesStored"] = json!(fold_matches);
    view
}

/// Where a run is, in detail: the step it is shown at (see [`RunState::position`]), with its
/// attempt and what it waits for, and every step that is live now.
fn current(state: &RunState, workflow: &Workflow) -> Value {
    let (step, attempt) =
        state.position().map_or((Value::Null, Value::Null), |(s, a)| (step_id(workflow, s), json!(a)));
    let mut current = json!({ "status": state.status.name(), "step": step, "attempt": attempt });
    let live: Vec<Value> = if state.status.is_terminal() {
        Vec::new()
    } else {
        state
            .steps
            .iter()
            .filter(|(_, status)| !matches!(status, StepStatus::Completed | StepStatus::Failed { .. }))
            .map(|(step, status)| {
                let mut live =
                    json!({ "step": step_id(workflow, *step), "status": status.name(), "attempt": status.attempt() });
                match status {
                    StepStatus::Retrying { due, .. } => live["retryAt"] = json!(timestamp(*due)),
                    StepStatus::Sleeping { until, .. } => live["until"] = json!(timestamp(*until)),
                    StepStatus::Waiting { event, until, .. } => {
                        live["event"] = json!(event);
                        live["until"] = json!(timestamp(*until));
                    }
                    StepStatus::AwaitingChild { child, .. } => live["child"] = json!(child),
                    StepStatus::Queued { .. }
                    | StepStatus::Running { .. }
                    | StepStatus::Completed
                    | StepStatus::Failed { .. } => {}
                }
                live
            })
            .collect()
    };
    // The shown step's details at the top level, as for a run with one step at a time.
    if let Some(shown) = live.iter().find(|l| l["step"] == current["step"]) {
        for field in ["retryAt", "until", "event"] {
            if let Some(value) = shown.get(field) {
                current[field] = value.clone();
            }
        }
    }
    current["live"] = json!(live);
    current["lastError"] = state.last_error.as_ref().map_or(
        Value::Null,
        |err| json!({ "step": step_id(workflow, err.step), "attempt": err.attempt, "message": err.message }),
    );
    current
}

/// The ids of the steps `step` starts after.
pub fn needs(workflow: &Workflow, step: u32) -> Vec<Value> {
    workflow.def.needs(step).map(|need| step_id(workflow, need)).collect()
}

/// One live replica of `GET /api/replicas`.
pub fn replica(beat: &ReplicaBeat) -> Value {
    json!({
        "id": beat.id,
        "version": beat.version,
        "executorsBusy": beat.executors_busy,
        "executorsTotal": beat.executors_total,
        "startedAt": timestamp(beat.started_at),
        "lastSeen": timestamp(beat.last_seen),
    })
}
