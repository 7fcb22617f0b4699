//! The run state machine. Pure: no I/O, no async, no clock reads (time comes in as an argument).
//!
//! A run's log is a sequence of [`Recorded`] transitions, facts in the past tense. [`apply`]
//! folds one into a [`RunState`]; folding a whole log from the start reproduces the run's state
//! exactly (that is replay). [`next`] says what the engine must do in a state, as [`Effect`]s the
//! engine performs only after the transitions that imply them are durably appended. [`advance`]
//! combines the two for the engine: apply what happened, then record the follow-up transitions
//! the machine decides on its own (completing or failing the run).

pub mod trace;

use crate::definition::WorkflowDef;
use serde::{Deserialize, Serialize};
use std::fmt;

pub use trace::{RunTrace, TraceContext, TraceparentError};

/// Milliseconds since the Unix epoch, on the store's clock.
pub type Millis = u64;

/// A time as RFC 3339 text with milliseconds, UTC: how outputs, views and logs show times.
pub fn timestamp(at: Millis) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(at)).to_string()
}

/// An RFC 3339 time (`2026-12-07T10:00:00Z`, fractions and offsets allowed) in milliseconds
/// since the epoch; `None` if it is not one, or before the epoch.
pub fn parse_timestamp(text: &str) -> Option<Millis> {
    chrono::DateTime::parse_from_rfc3339(text).ok().and_then(|t| u64::try_from(t.timestamp_millis()).ok())
}

/// What started a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// `POST /api/workflows/:id/trigger` or the command line.
    Api,
    /// A cron fire, at its scheduled time.
    Cron { fire_at: Millis },
    /// An event from the bus, by its stream entry id and type.
    Event { event_id: String, event_type: String },
    /// `POST /api/runs/:id/rerun`: a new run of another run's definition snapshot, reusing the
    /// outputs that run recorded for the steps before `from_step`.
    Rerun { run_id: String, from_step: u32 },
}

impl Trigger {
    /// The kind of trigger: `api`, `cron`, `event` or `rerun`.
    pub fn kind(&self) -> &'static str {
        match self {
            Trigger::Api => "api",
            Trigger::Cron { .. } => "cron",
            Trigger::Event { .. } => "event",
            Trigger::Rerun { .. } => "rerun",
        }
    }

    /// What started a run, as JSON: the run view shows it, and actions see it as `run.trigger`.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Trigger::Api => json!({ "kind": "api" }),
            Trigger::Cron { fire_at } => json!({ "kind": "cron", "fireAt": timestamp(*fire_at) }),
            Trigger::Event { event_id, event_type } => {
                json!({ "kind": "event", "eventId": event_id, "eventType": event_type })
            }
            Trigger::Rerun { run_id, from_step } => json!({ "kind": "rerun", "runId": run_id, "fromStep": from_step }),
        }
    }
}

/// A fact about a run. Step numbers are indexes into the run's definition snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    RunCreated {
        workflow: String,
        definition: String,
        input: String,
        trigger: Trigger,
        /// The run's place in its trace. Last, defaulted, and left out when `None`: logs written
        /// before it existed (MessagePack arrays one element shorter) still decode, and a build
        /// before it still decodes what this one writes for runs without a trace (as long as
        /// nothing follows it: a field after it would shift when it is left out).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        trace: Option<RunTrace>,
    },
    StepStarted {
        step: u32,
        attempt: u32,
    },
    /// A rerun took this step's output from the run it reruns instead of running it.
    StepReused {
        step: u32,
        output: String,
    },
    StepCompleted {
        step: u32,
        attempt: u32,
        output: String,
    },
    /// `retry_at` is set when the step will be tried again, `None` when the run fails.
    StepFailed {
        step: u32,
        attempt: u32,
        error: String,
        retry_at: Option<Millis>,
    },
    TimerFired {
        step: u32,
        attempt: u32,
    },
    /// The step parks the run without holding an executor: until `until` (a sleep), or until an
    /// event of type `event` arrives, `until` being the time-out (a wait).
    StepSuspended {
        step: u32,
        attempt: u32,
        until: Millis,
        event: Option<String>,
    },
    /// The event a waiting step waited for arrived.
    EventReceived {
        step: u32,
        attempt: u32,
        event_id: String,
        payload: String,
    },
    RunCompleted,
    RunFailed {
        error: String,
    },
    RunCancelled {
        reason: String,
    },
    RunTimedOut,
    /// An operator resumed a failed run at its failed step, with a fresh retry budget.
    RunResumed {
        step: u32,
        attempt: u32,
    },
}

impl Transition {
    /// The snake_case name used in the log's readable `type` field and in the API.
    pub fn kind(&self) -> &'static str {
        match self {
            Transition::RunCreated { .. } => "run_created",
            Transition::StepStarted { .. } => "step_started",
            Transition::StepReused { .. } => "step_reused",
            Transition::StepCompleted { .. } => "step_completed",
            Transition::StepFailed { .. } => "step_failed",
            Transition::TimerFired { .. } => "timer_fired",
            Transition::StepSuspended { event: None, .. } => "step_sleeping",
            Transition::StepSuspended { event: Some(_), .. } => "step_waiting",
            Transition::EventReceived { .. } => "event_received",
            Transition::RunCompleted => "run_completed",
            Transition::RunFailed { .. } => "run_failed",
            Transition::RunCancelled { .. } => "run_cancelled",
            Transition::RunTimedOut => "run_timed_out",
            Transition::RunResumed { .. } => "run_resumed",
        }
    }

    /// The step and attempt a transition concerns, where it concerns one.
    pub fn step_attempt(&self) -> Option<(u32, u32)> {
        match self {
            Transition::StepStarted { step, attempt }
            | Transition::StepCompleted { step, attempt, .. }
            | Transition::StepFailed { step, attempt, .. }
            | Transition::TimerFired { step, attempt }
            | Transition::StepSuspended { step, attempt, .. }
            | Transition::EventReceived { step, attempt, .. }
            | Transition::RunResumed { step, attempt } => Some((*step, *attempt)),
            Transition::StepReused { step, .. } => Some((*step, 0)),
            Transition::RunCreated { .. }
            | Transition::RunCompleted
            | Transition::RunFailed { .. }
            | Transition::RunCancelled { .. }
            | Transition::RunTimedOut => None,
        }
    }
}

/// A transition as it sits in the log: when, and by which replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    pub at: Millis,
    pub replica: Option<String>,
    pub transition: Transition,
}

/// Where a run is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Created; its first step is queued and has not started.
    Pending,
    /// `step` (attempt `attempt`) is queued for an executor: after a completed step or a retry.
    Queued {
        step: u32,
        attempt: u32,
    },
    /// `step` (attempt `attempt`) was started by a replica.
    Running {
        step: u32,
        attempt: u32,
    },
    /// Attempt `attempt` of `step` will be queued at `due`.
    Retrying {
        step: u32,
        attempt: u32,
        due: Millis,
    },
    /// `step` sleeps until `until`.
    Sleeping {
        step: u32,
        attempt: u32,
        until: Millis,
    },
    /// `step` waits for an event of type `event`, at most until `until`.
    Waiting {
        step: u32,
        attempt: u32,
        event: String,
        until: Millis,
    },
    Completed,
    Failed,
    Cancelled,
    TimedOut,
}

impl Status {
    pub fn is_terminal(&self) -> bool {
        match self {
            Status::Completed | Status::Failed | Status::Cancelled | Status::TimedOut => true,
            Status::Pending
            | Status::Queued { .. }
            | Status::Running { .. }
            | Status::Retrying { .. }
            | Status::Sleeping { .. }
            | Status::Waiting { .. } => false,
        }
    }

    /// The public name (API, run hash, indexes).
    pub fn name(&self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Queued { .. } | Status::Running { .. } => "running",
            Status::Retrying { .. } => "retrying",
            Status::Sleeping { .. } => "sleeping",
            Status::Waiting { .. } => "waiting",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::TimedOut => "timed_out",
        }
    }

    /// The current step and attempt, for states that have one.
    pub fn step_attempt(&self) -> Option<(u32, u32)> {
        match self {
            Status::Pending => Some((0, 1)),
            Status::Queued { step, attempt }
            | Status::Running { step, attempt }
            | Status::Retrying { step, attempt, .. }
            | Status::Sleeping { step, attempt, .. }
            | Status::Waiting { step, attempt, .. } => Some((*step, *attempt)),
            Status::Completed | Status::Failed | Status::Cancelled | Status::TimedOut => None,
        }
    }
}

/// Every public status name, in the order the API documents them.
pub const STATUS_NAMES: [&str; 9] =
    ["pending", "running", "retrying", "sleeping", "waiting", "completed", "failed", "cancelled", "timed_out"];

/// The last failure of a step, kept so the run can report it and `next` can fail the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepError {
    pub step: u32,
    pub attempt: u32,
    pub message: String,
}

/// The state of a run: what folding its log yields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunState {
    pub workflow: String,
    /// Hash of the definition snapshot the run was created with.
    pub definition: String,
    /// The run's input, as JSON text.
    pub input: String,
    pub trigger: Trigger,
    pub status: Status,
    /// How many transitions the log holds.
    pub seq: u64,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub last_error: Option<StepError>,
    /// Attempts of the current step made before the run was last resumed: they do not count
    /// against the step's retry budget.
    #[serde(default)]
    pub attempt_offset: u32,
    /// From `run_created`, so that an executor has it with the ready task. Last, defaulted and
    /// left out when `None`, like it (and the state is the last field of a ready task).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<RunTrace>,
}

/// A transition that cannot happen in the state it was applied to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct InvalidTransition {
    pub transition: &'static str,
    pub state: String,
    pub reason: &'static str,
}

impl fmt::Display for InvalidTransition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` cannot be applied in state {}: {}", self.transition, self.state, self.reason)
    }
}

fn invalid(transition: &Transition, state: Option<&RunState>, reason: &'static str) -> InvalidTransition {
    InvalidTransition {
        transition: transition.kind(),
        state: state.map_or_else(|| "<none>".to_owned(), |s| format!("{:?}", s.status)),
        reason,
    }
}

/// Folds one recorded transition into a state (`None`: the run does not exist yet).
///
/// Terminal states absorb every later transition except a second `run_created`, because streams
/// redeliver: the state comes back unchanged (and such a transition is never logged).
pub fn apply(state: Option<&RunState>, recorded: &Recorded) -> Result<RunState, InvalidTransition> {
    let transition = &recorded.transition;
    let Some(current) = state else {
        return match transition {
            Transition::RunCreated { workflow, definition, input, trigger, trace } => Ok(RunState {
                workflow: workflow.clone(),
                definition: definition.clone(),
                input: input.clone(),
                trigger: trigger.clone(),
                status: Status::Pending,
                seq: 1,
                created_at: recorded.at,
                updated_at: recorded.at,
                last_error: None,
                attempt_offset: 0,
                trace: trace.clone(),
            }),
            _ => Err(invalid(transition, None, "the run has not been created")),
        };
    };
    if let Transition::RunCreated { .. } = transition {
        return Err(invalid(transition, state, "the run already exists"));
    }
    if let Transition::RunResumed { step, attempt } = transition {
        return match (&current.status, &current.last_error) {
            (Status::Failed, Some(err)) if err.step == *step && err.attempt + 1 == *attempt => {
                let mut next = current.clone();
                next.status = Status::Queued { step: *step, attempt: *attempt };
                next.attempt_offset = attempt - 1;
                next.seq += 1;
                next.updated_at = recorded.at;
                Ok(next)
            }
            (Status::Failed, _) => {
                Err(invalid(transition, state, "a resume must name the failed step and its next attempt"))
            }
            _ => Err(invalid(transition, state, "only a failed run can be resumed")),
        };
    }
    if current.status.is_terminal() {
        return Ok(current.clone());
    }
    let mut next = current.clone();
    match (transition, &current.status) {
        (Transition::StepStarted { step, attempt }, Status::Pending) if (*step, *attempt) == (0, 1) => {
            next.status = Status::Running { step: *step, attempt: *attempt };
        }
        (Transition::StepStarted { step, attempt }, Status::Queued { step: s, attempt: a })
            if (step, attempt) == (s, a) =>
        {
            next.status = Status::Running { step: *step, attempt: *attempt };
        }
        (Transition::StepStarted { .. }, _) => {
            return Err(invalid(transition, state, "that step attempt is not queued"));
        }
        (Transition::StepReused { step: 0, .. }, Status::Pending) => {
            next.status = Status::Queued { step: 1, attempt: 1 };
        }
        (Transition::StepReused { step, .. }, Status::Queued { step: s, attempt: 1 }) if step == s => {
            next.status = Status::Queued { step: step + 1, attempt: 1 };
        }
        (Transition::StepReused { .. }, _) => {
            return Err(invalid(transition, state, "only a queued step can be reused"));
        }
        (Transition::StepCompleted { step, attempt, .. }, Status::Running { step: s, attempt: a })
            if (step, attempt) == (s, a) && !failed_at(current, *s, *a) =>
        {
            next.status = Status::Queued { step: step + 1, attempt: 1 };
            next.last_error = None;
        }
        (Transition::StepCompleted { .. }, _) => {
            return Err(invalid(transition, state, "that step attempt is not running"));
        }
        (Transition::StepFailed { step, attempt, error, retry_at }, Status::Running { step: s, attempt: a })
            if (step, attempt) == (s, a) && !failed_at(current, *s, *a) =>
        {
            next.last_error = Some(StepError { step: *step, attempt: *attempt, message: error.clone() });
            if let Some(due) = retry_at {
                next.status = Status::Retrying { step: *step, attempt: attempt + 1, due: *due };
            }
        }
        (Transition::StepFailed { .. }, _) => {
            return Err(invalid(transition, state, "that step attempt is not running"));
        }
        (Transition::StepSuspended { step, attempt, until, event }, Status::Running { step: s, attempt: a })
            if (step, attempt) == (s, a) && !failed_at(current, *s, *a) =>
        {
            next.status = match event {
                None => Status::Sleeping { step: *step, attempt: *attempt, until: *until },
                Some(event) => Status::Waiting { step: *step, attempt: *attempt, event: event.clone(), until: *until },
            };
        }
        (Transition::StepSuspended { .. }, _) => {
            return Err(invalid(transition, state, "that step attempt is not running"));
        }
        (Transition::EventReceived { step, attempt, .. }, Status::Waiting { step: s, attempt: a, .. })
            if (step, attempt) == (s, a) =>
        {
            next.status = Status::Running { step: *step, attempt: *attempt };
        }
        (Transition::EventReceived { .. }, _) => {
            return Err(invalid(transition, state, "that step attempt is not waiting for an event"));
        }
        (
            Transition::TimerFired { step, attempt },
            Status::Sleeping { step: s, attempt: a, .. } | Status::Waiting { step: s, attempt: a, .. },
        ) if (step, attempt) == (s, a) => {
            next.status = Status::Running { step: *step, attempt: *attempt };
        }
        (Transition::TimerFired { step, attempt }, Status::Retrying { step: s, attempt: a, .. })
            if (step, attempt) == (s, a) =>
        {
            next.status = Status::Queued { step: *step, attempt: *attempt };
        }
        (Transition::TimerFired { .. }, _) => {
            return Err(invalid(transition, state, "no timer is set for that step attempt"));
        }
        (Transition::RunCompleted, Status::Queued { attempt: 1, step }) if *step > 0 => {
            next.status = Status::Completed;
        }
        (Transition::RunCompleted, _) => return Err(invalid(transition, state, "the run has work left")),
        (Transition::RunFailed { .. }, _) => next.status = Status::Failed,
        (Transition::RunCancelled { .. }, _) => next.status = Status::Cancelled,
        (Transition::RunTimedOut, _) => next.status = Status::TimedOut,
        (Transition::RunCreated { .. } | Transition::RunResumed { .. }, _) => unreachable!("handled above"),
    }
    next.seq += 1;
    next.updated_at = recorded.at;
    Ok(next)
}

fn failed_at(state: &RunState, step: u32, attempt: u32) -> bool {
    state.last_error.as_ref().is_some_and(|e| e.step == step && e.attempt == attempt)
}

/// Folds a whole log from the start: replay.
pub fn replay<'a>(log: impl IntoIterator<Item = &'a Recorded>) -> Result<Option<RunState>, (usize, InvalidTransition)> {
    let mut state: Option<RunState> = None;
    for (index, recorded) in log.into_iter().enumerate() {
        state = Some(apply(state.as_ref(), recorded).map_err(|err| (index, err))?);
    }
    Ok(state)
}

/// Work the engine must do for a run, as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Queue `step`, attempt `attempt`, for an executor.
    Dispatch { step: u32, attempt: u32 },
    /// Wake the run at `due`.
    SetTimer { due: Millis },
    /// Record `run_completed`.
    CompleteRun,
    /// Record `run_failed` with this error.
    FailRun { error: String },
}

/// What the engine must do for a run in `state` under `definition`.
pub fn next(state: &RunState, definition: &WorkflowDef, _now: Millis) -> Vec<Effect> {
    let steps = definition.steps.len() as u32;
    match &state.status {
        Status::Pending => vec![Effect::Dispatch { step: 0, attempt: 1 }],
        Status::Queued { step, .. } if *step >= steps => vec![Effect::CompleteRun],
        Status::Queued { step, attempt } => vec![Effect::Dispatch { step: *step, attempt: *attempt }],
        Status::Running { step, attempt } => match &state.last_error {
            Some(err) if err.step == *step && err.attempt == *attempt => {
                let id = definition.steps.get(*step as usize).map_or("?", |s| s.id.as_str());
                vec![Effect::FailRun { error: format!("step `{id}` failed on attempt {attempt}: {}", err.message) }]
            }
            _ => Vec::new(),
        },
        Status::Retrying { due, .. } => vec![Effect::SetTimer { due: *due }],
        Status::Sleeping { until, .. } | Status::Waiting { until, .. } => vec![Effect::SetTimer { due: *until }],
        Status::Completed | Status::Failed | Status::Cancelled | Status::TimedOut => Vec::new(),
    }
}

/// The outcome of [`advance`]: the new state, every transition to append (in order) and the
/// effects to perform once they are appended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advanced {
    pub state: RunState,
    pub appended: Vec<Recorded>,
    pub effects: Vec<Effect>,
}

/// Applies `happened` to `state`, then records the follow-up transitions the machine decides by
/// itself (`run_completed`, `run_failed`) with the same time and replica.
pub fn advance(
    state: Option<&RunState>,
    definition: &WorkflowDef,
    happened: Vec<Recorded>,
    now: Millis,
) -> Result<Advanced, InvalidTransition> {
    let replica = happened.last().and_then(|r| r.replica.clone());
    let mut current = state.cloned();
    let mut appended = Vec::with_capacity(happened.len() + 1);
    for recorded in happened {
        current = Some(apply(current.as_ref(), &recorded)?);
        appended.push(recorded);
    }
    let Some(mut current) = current else {
        return Err(InvalidTransition {
            transition: "<nothing>",
            state: "<none>".to_owned(),
            reason: "nothing happened to a run that does not exist",
        });
    };
    // Each follow-up ends the run, so this settles after at most one round.
    for _ in 0..2 {
        let effects = next(&current, definition, now);
        let follow_up = effects.iter().find_map(|effect| match effect {
            Effect::CompleteRun => Some(Transition::RunCompleted),
            Effect::FailRun { error } => Some(Transition::RunFailed { error: error.clone() }),
            Effect::Dispatch { .. } | Effect::SetTimer { .. } => None,
        });
        match follow_up {
            Some(transition) => {
                let recorded = Recorded { at: now, replica: replica.clone(), transition };
                current = apply(Some(&current), &recorded)?;
                appended.push(recorded);
            }
            None => return Ok(Advanced { state: current, appended, effects }),
        }
    }
    Ok(Advanced { effects: next(&current, definition, now), state: current, appended })
}

/// The transition for a failed attempt: retried at `now + backoff` while attempts remain,
/// otherwise final. `jitter_unit` is a sample in `[-1, 1]` (the caller's randomness).
pub fn step_failure(
    definition: &WorkflowDef,
    state: &RunState,
    step: u32,
    attempt: u32,
    error: String,
    now: Millis,
    jitter_unit: f64,
) -> Transition {
    // Attempts made before a resume do not count against the budget.
    let counted = attempt.saturating_sub(state.attempt_offset);
    let retry_at = definition
        .steps
        .get(step as usize)
        .filter(|s| counted < s.retry.max_attempts)
        .map(|s| now + s.retry.delay(counted, jitter_unit).as_millis() as u64);
    Transition::StepFailed { step, attempt, error, retry_at }
}

#[cfg(test)]
mod tests;
