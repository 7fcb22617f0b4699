//! The run state machine. Pure: no I/O, no async, no clock reads (time comes in as an argument).
//!
//! A run's log is a sequence of [`Recorded`] transitions, facts in the past tense. [`apply`]
//! folds one into a [`RunState`]; folding a whole log from the start reproduces the run's state
//! exactly (that is replay). [`next`] says what the engine must do in a state, as [`Effect`]s the
//! engine performs only after the transitions that imply them are durably appended. [`advance`]
//! combines the two for the engine: apply what happened, then record the follow-up transitions
//! the machine decides on its own (completing or failing the run).
//!
//! A run's steps form a graph (`needs`): its state holds each reached step's own status, and
//! several steps may be queued or running at once. What a due timer, an awaited event, a child
//! run's end, a failed attempt or a step past its delivery limit records is decided here too
//! (`timers_fired`, `event_arrived`, `child_ended`, `attempt_failed`, `delivery_limit`), and
//! each step's view for people (`view::step_views`).

pub mod trace;
pub mod view;

use crate::definition::WorkflowDef;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

pub use trace::{RunTrace, TraceContext, TraceparentError};
pub use view::{StepView, step_views};

/// Milliseconds since the Unix epoch, on the store's clock.
pub type Millis = u64;

/// The output of a step whose `when` condition was false (what `${steps.<id>.skipped}` reads).
pub const SKIPPED_OUTPUT: &str = r#"{"skipped":true}"#;

/// The output a log entry records for its step, if it records one: a completion's, a reused
/// output, a skip's [`SKIPPED_OUTPUT`].
pub fn output_of(transition: &Transition) -> Option<(u32, &str)> {
    match transition {
        Transition::StepCompleted { step, output, .. } | Transition::StepReused { step, output } => {
            Some((*step, output.as_str()))
        }
        Transition::StepSkipped { step, .. } => Some((*step, SKIPPED_OUTPUT)),
        _ => None,
    }
}

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
    /// A parent run's step (`action = "workflow"`): the run is its child, `depth` levels below
    /// a run that has no parent.
    Parent { run_id: String, step: u32, step_id: String, attempt: u32, depth: u32 },
    /// Triggers of one key of a debounced workflow (`debounce`), burst `burst`: `triggers` of
    /// them, the first at `first_at`, collapsed into this run, which has the input of the last
    /// one, `last`.
    Debounce { burst: String, triggers: u64, first_at: Millis, last: Box<Trigger> },
}

impl Trigger {
    /// The kind of trigger: `api`, `cron`, `event`, `rerun`, `parent` or `debounce`.
    pub fn kind(&self) -> &'static str {
        match self {
            Trigger::Api => "api",
            Trigger::Cron { .. } => "cron",
            Trigger::Event { .. } => "event",
            Trigger::Rerun { .. } => "rerun",
            Trigger::Parent { .. } => "parent",
            Trigger::Debounce { .. } => "debounce",
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
            Trigger::Parent { run_id, step_id, attempt, depth, .. } => {
                json!({ "kind": "parent", "runId": run_id, "step": step_id, "attempt": attempt, "depth": depth })
            }
            Trigger::Debounce { burst, triggers, first_at, last } => json!({
                "kind": "debounce",
                "burstId": burst,
                "triggers": triggers,
                "firstAt": timestamp(*first_at),
                "last": last.to_json(),
            }),
        }
    }

    /// How deep a run is among child workflows: 0 for a run that has no parent.
    pub fn depth(&self) -> u32 {
        match self {
            Trigger::Parent { depth, .. } => *depth,
            Trigger::Api
            | Trigger::Cron { .. }
            | Trigger::Event { .. }
            | Trigger::Rerun { .. }
            | Trigger::Debounce { .. } => 0,
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
    /// The step's `when` condition was false: it completed without running, its output
    /// [`SKIPPED_OUTPUT`].
    StepSkipped {
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
    /// The step started run `child` of another workflow and waits for it, holding no executor.
    ChildStarted {
        step: u32,
        attempt: u32,
        child: String,
    },
    /// The child the step waited for ended with `status` (a run status name); the step's
    /// outcome follows in the same commit.
    ChildEnded {
        step: u32,
        attempt: u32,
        child: String,
        status: String,
    },
}

impl Transition {
    /// The snake_case name used in the log's readable `type` field and in the API.
    pub fn kind(&self) -> &'static str {
        match self {
            Transition::RunCreated { .. } => "run_created",
            Transition::StepStarted { .. } => "step_started",
            Transition::StepReused { .. } => "step_reused",
            Transition::StepSkipped { .. } => "step_skipped",
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
            Transition::ChildStarted { .. } => "child_started",
            Transition::ChildEnded { .. } => "child_ended",
        }
    }

    /// The step and attempt a transition concerns, where it concerns one.
    pub fn step_attempt(&self) -> Option<(u32, u32)> {
        match self {
            Transition::StepStarted { step, attempt }
            | Transition::StepCompleted { step, attempt, .. }
            | Transition::StepSkipped { step, attempt }
            | Transition::StepFailed { step, attempt, .. }
            | Transition::TimerFired { step, attempt }
            | Transition::StepSuspended { step, attempt, .. }
            | Transition::EventReceived { step, attempt, .. }
            | Transition::RunResumed { step, attempt }
            | Transition::ChildStarted { step, attempt, .. }
            | Transition::ChildEnded { step, attempt, .. } => Some((*step, *attempt)),
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

/// Where a run is, as a whole: what its steps add up to. Ordered as [`Status::ALL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Created; no step has started yet.
    Pending,
    /// A step is queued or running (or the next ones are about to be queued).
    Running,
    /// Nothing runs or is queued; a step waits for its retry.
    Retrying,
    /// Nothing runs, is queued or retries; a step sleeps.
    Sleeping,
    /// Nothing runs, is queued, retries or sleeps; a step waits for an event.
    Waiting,
    Completed,
    Failed,
    Cancelled,
    TimedOut,
}

impl Status {
    pub fn is_terminal(&self) -> bool {
        match self {
            Status::Completed | Status::Failed | Status::Cancelled | Status::TimedOut => true,
            Status::Pending | Status::Running | Status::Retrying | Status::Sleeping | Status::Waiting => false,
        }
    }

    /// Every status, in the order the API documents them.
    pub const ALL: [Status; 9] = [
        Status::Pending,
        Status::Running,
        Status::Retrying,
        Status::Sleeping,
        Status::Waiting,
        Status::Completed,
        Status::Failed,
        Status::Cancelled,
        Status::TimedOut,
    ];

    /// The status a public name names.
    pub fn from_name(name: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|status| status.name() == name)
    }

    /// The public name (API, run hash, indexes).
    pub fn name(&self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Running => "running",
            Status::Retrying => "retrying",
            Status::Sleeping => "sleeping",
            Status::Waiting => "waiting",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
            Status::TimedOut => "timed_out",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Every public status name, in the order the API documents them.
pub const STATUS_NAMES: [&str; 9] =
    ["pending", "running", "retrying", "sleeping", "waiting", "completed", "failed", "cancelled", "timed_out"];

/// Where one step of a run is, once it has been reached (its needs met). A step not in
/// [`RunState::steps`] has not been reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Attempt `attempt` is queued for an executor.
    Queued {
        attempt: u32,
    },
    /// Attempt `attempt` was started by a replica (never durable on its own: a start is
    /// recorded with the attempt's outcome).
    Running {
        attempt: u32,
    },
    /// Attempt `attempt` will be queued at `due`.
    Retrying {
        attempt: u32,
        due: Millis,
    },
    /// Attempt `attempt` sleeps until `until`.
    Sleeping {
        attempt: u32,
        until: Millis,
    },
    /// Attempt `attempt` waits for an event of type `event`, at most until `until`.
    Waiting {
        attempt: u32,
        event: String,
        until: Millis,
    },
    /// Attempt `attempt` waits for its child run `child` to end.
    AwaitingChild {
        attempt: u32,
        child: String,
    },
    Completed,
    /// Attempt `attempt` failed for good: the run fails with it.
    Failed {
        attempt: u32,
    },
}

impl StepStatus {
    /// The attempt a step is at, unless it completed.
    pub fn attempt(&self) -> Option<u32> {
        match self {
            StepStatus::Queued { attempt }
            | StepStatus::Running { attempt }
            | StepStatus::Retrying { attempt, .. }
            | StepStatus::Sleeping { attempt, .. }
            | StepStatus::Waiting { attempt, .. }
            | StepStatus::AwaitingChild { attempt, .. }
            | StepStatus::Failed { attempt } => Some(*attempt),
            StepStatus::Completed => None,
        }
    }

    /// Whether the step has a ready entry: queued for an executor, or leased to one.
    pub fn has_ready_entry(&self) -> bool {
        matches!(self, StepStatus::Queued { .. } | StepStatus::Running { .. })
    }

    /// When the step's timer is due: its retry, the end of its sleep, its wait's time-out.
    pub fn timer(&self) -> Option<Millis> {
        match self {
            StepStatus::Retrying { due, .. } => Some(*due),
            StepStatus::Sleeping { until, .. } | StepStatus::Waiting { until, .. } => Some(*until),
            StepStatus::Queued { .. }
            | StepStatus::Running { .. }
            | StepStatus::AwaitingChild { .. }
            | StepStatus::Completed
            | StepStatus::Failed { .. } => None,
        }
    }

    /// The public name of a step's status.
    pub fn name(&self) -> &'static str {
        match self {
            StepStatus::Queued { .. } => "queued",
            StepStatus::Running { .. } => "running",
            StepStatus::Retrying { .. } => "retrying",
            StepStatus::Sleeping { .. } => "sleeping",
            StepStatus::Waiting { .. } | StepStatus::AwaitingChild { .. } => "waiting",
            StepStatus::Completed => "completed",
            StepStatus::Failed { .. } => "failed",
        }
    }
}

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
    /// The run as a whole: terminal once it ended, else what its steps add up to.
    pub status: Status,
    /// Every step reached so far (its needs met), by index.
    pub steps: BTreeMap<u32, StepStatus>,
    /// How many transitions the log holds.
    pub seq: u64,
    pub created_at: Millis,
    pub updated_at: Millis,
    pub last_error: Option<StepError>,
    /// Per step resumed by an operator: the attempts made before the resume, which do not
    /// count against the step's retry budget.
    #[serde(default)]
    pub attempt_offsets: BTreeMap<u32, u32>,
    /// From `run_created`, so that an executor has it with the ready task. Last, defaulted and
    /// left out when `None`, like it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<RunTrace>,
}

impl RunState {
    /// The step and attempt a run is shown at: a failed run's failed step; else its first step
    /// (by index) that is queued, running or parked.
    pub fn position(&self) -> Option<(u32, u32)> {
        if self.status == Status::Failed {
            return self.last_error.as_ref().map(|err| (err.step, err.attempt));
        }
        if self.status.is_terminal() {
            return None;
        }
        self.steps.iter().find_map(|(step, status)| match status {
            StepStatus::Completed | StepStatus::Failed { .. } => None,
            live => live.attempt().map(|attempt| (*step, attempt)),
        })
    }

    /// The steps waiting for an event of type `event`, with their attempts and time-outs.
    pub fn waiting_for<'a>(&'a self, event: &'a str) -> impl Iterator<Item = (u32, u32, Millis)> + 'a {
        self.steps.iter().filter_map(move |(step, status)| match status {
            StepStatus::Waiting { attempt, event: awaited, until } if awaited == event => {
                Some((*step, *attempt, *until))
            }
            _ => None,
        })
    }

    /// The steps waiting for an event, by event type, with their time-outs.
    pub fn waits(&self) -> impl Iterator<Item = (&str, Millis)> + '_ {
        self.steps.values().filter_map(|status| match status {
            StepStatus::Waiting { event, until, .. } => Some((event.as_str(), *until)),
            _ => None,
        })
    }

    /// When the run's next timer is due: the earliest of its steps'.
    pub fn next_timer(&self) -> Option<Millis> {
        if self.status.is_terminal() {
            return None;
        }
        self.steps.values().filter_map(StepStatus::timer).min()
    }

    /// The attempts of `step` that count against its retry budget, of `attempt` made.
    pub fn counted_attempts(&self, step: u32, attempt: u32) -> u32 {
        attempt.saturating_sub(self.attempt_offsets.get(&step).copied().unwrap_or(0))
    }

    /// What a live run's steps add up to (see [`Status`]): pending until anything happened to
    /// a step, then the busiest of its steps.
    fn derived_status(&self) -> Status {
        if self.steps.values().all(|step| *step == StepStatus::Queued { attempt: 1 }) {
            return Status::Pending;
        }
        let busiest = self
            .steps
            .values()
            .map(|step| match step {
                // A failed step: the run is about to fail.
                StepStatus::Queued { .. } | StepStatus::Running { .. } | StepStatus::Failed { .. } => {
                    (4, Status::Running)
                }
                StepStatus::Retrying { .. } => (3, Status::Retrying),
                StepStatus::Sleeping { .. } => (2, Status::Sleeping),
                StepStatus::Waiting { .. } | StepStatus::AwaitingChild { .. } => (1, Status::Waiting),
                // Every step completed: the run is about to complete.
                StepStatus::Completed => (0, Status::Running),
            })
            .max_by_key(|(rank, _)| *rank);
        busiest.map_or(Status::Running, |(_, status)| status)
    }
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
        state: state.map_or_else(|| "<none>".to_owned(), |s| format!("{:?} {:?}", s.status, s.steps)),
        reason,
    }
}

/// Queues every step not yet reached whose needs all completed.
fn reach_ready_steps(state: &mut RunState, definition: &WorkflowDef) {
    for step in 0..definition.steps.len() as u32 {
        if !state.steps.contains_key(&step)
            && definition.needs(step).all(|need| state.steps.get(&need) == Some(&StepStatus::Completed))
        {
            state.steps.insert(step, StepStatus::Queued { attempt: 1 });
        }
    }
}

/// Folds one recorded transition into a state (`None`: the run does not exist yet), under the
/// run's definition (which says what a completed step lets start).
///
/// Terminal states absorb every later transition except a second `run_created` and an
/// operator's resume, because streams redeliver: the state comes back unchanged (and such a
/// transition is never logged).
pub fn apply(
    state: Option<&RunState>,
    recorded: &Recorded,
    definition: &WorkflowDef,
) -> Result<RunState, InvalidTransition> {
    let transition = &recorded.transition;
    let Some(current) = state else {
        return match transition {
            Transition::RunCreated { workflow, definition: hash, input, trigger, trace } => {
                let mut created = RunState {
                    workflow: workflow.clone(),
                    definition: hash.clone(),
                    input: input.clone(),
                    trigger: trigger.clone(),
                    status: Status::Pending,
                    steps: BTreeMap::new(),
                    seq: 1,
                    created_at: recorded.at,
                    updated_at: recorded.at,
                    last_error: None,
                    attempt_offsets: BTreeMap::new(),
                    trace: trace.clone(),
                };
                reach_ready_steps(&mut created, definition);
                Ok(created)
            }
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
                next.steps.insert(*step, StepStatus::Queued { attempt: *attempt });
                next.attempt_offsets.insert(*step, attempt - 1);
                next.status = next.derived_status();
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
    let step_status = transition.step_attempt().and_then(|(step, _)| current.steps.get(&step));
    match (transition, step_status) {
        (Transition::StepStarted { step, attempt }, Some(StepStatus::Queued { attempt: a })) if attempt == a => {
            next.steps.insert(*step, StepStatus::Running { attempt: *attempt });
        }
        (Transition::StepStarted { .. }, _) => {
            return Err(invalid(transition, state, "that step attempt is not queued"));
        }
        (Transition::StepReused { step, .. }, Some(StepStatus::Queued { attempt: 1 })) => {
            next.steps.insert(*step, StepStatus::Completed);
            reach_ready_steps(&mut next, definition);
        }
        (Transition::StepReused { .. }, _) => {
            return Err(invalid(transition, state, "only a queued step can be reused"));
        }
        (Transition::StepCompleted { step, attempt, .. }, Some(StepStatus::Running { attempt: a })) if attempt == a => {
            next.steps.insert(*step, StepStatus::Completed);
            if next.last_error.as_ref().is_some_and(|err| err.step == *step) {
                next.last_error = None;
            }
            reach_ready_steps(&mut next, definition);
        }
        (Transition::StepCompleted { .. }, _) => {
            return Err(invalid(transition, state, "that step attempt is not running"));
        }
        (Transition::StepSkipped { step, attempt }, Some(StepStatus::Running { attempt: a })) if attempt == a => {
            next.steps.insert(*step, StepStatus::Completed);
            reach_ready_steps(&mut next, definition);
        }
        (Transition::StepSkipped { .. }, _) => {
            return Err(invalid(transition, state, "that step attempt is not running"));
        }
        (Transition::StepFailed { step, attempt, error, retry_at }, Some(StepStatus::Running { attempt: a }))
            if attempt == a =>
        {
            next.last_error = Some(StepError { step: *step, attempt: *attempt, message: error.clone() });
            let failed = match retry_at {
                Some(due) => StepStatus::Retrying { attempt: attempt + 1, due: *due },
                None => StepStatus::Failed { attempt: *attempt },
            };
            next.steps.insert(*step, failed);
        }
        (Transition::StepFailed { .. }, _) => {
            return Err(invalid(transition, state, "that step attempt is not running"));
        }
        (Transition::StepSuspended { step, attempt, until, event }, Some(StepStatus::Running { attempt: a }))
            if attempt == a =>
        {
            let parked = match event {
                None => StepStatus::Sleeping { attempt: *attempt, until: *until },
                Some(event) => StepStatus::Waiting { attempt: *attempt, event: event.clone(), until: *until },
            };
            next.steps.insert(*step, parked);
        }
        (Transition::StepSuspended { .. }, _) => {
            return Err(invalid(transition, state, "that step attempt is not running"));
        }
        (Transition::EventReceived { step, attempt, .. }, Some(StepStatus::Waiting { attempt: a, .. }))
            if attempt == a =>
        {
            next.steps.insert(*step, StepStatus::Running { attempt: *attempt });
        }
        (Transition::EventReceived { .. }, _) => {
            return Err(invalid(transition, state, "that step attempt is not waiting for an event"));
        }
        (Transition::ChildStarted { step, attempt, child }, Some(StepStatus::Running { attempt: a }))
            if attempt == a =>
        {
            next.steps.insert(*step, StepStatus::AwaitingChild { attempt: *attempt, child: child.clone() });
        }
        (Transition::ChildStarted { .. }, _) => {
            return Err(invalid(transition, state, "that step attempt is not running"));
        }
        (
            Transition::ChildEnded { step, attempt, child, .. },
            Some(StepStatus::AwaitingChild { attempt: a, child: c }),
        ) if attempt == a && child == c => {
            next.steps.insert(*step, StepStatus::Running { attempt: *attempt });
        }
        (Transition::ChildEnded { .. }, _) => {
            return Err(invalid(transition, state, "that step attempt is not waiting for that child"));
        }
        (
            Transition::TimerFired { step, attempt },
            Some(StepStatus::Sleeping { attempt: a, .. } | StepStatus::Waiting { attempt: a, .. }),
        ) if attempt == a => {
            next.steps.insert(*step, StepStatus::Running { attempt: *attempt });
        }
        (Transition::TimerFired { step, attempt }, Some(StepStatus::Retrying { attempt: a, .. })) if attempt == a => {
            next.steps.insert(*step, StepStatus::Queued { attempt: *attempt });
        }
        (Transition::TimerFired { .. }, _) => {
            return Err(invalid(transition, state, "no timer is set for that step attempt"));
        }
        (Transition::RunCompleted, _) => {
            let steps = definition.steps.len() as u32;
            if !(0..steps).all(|step| current.steps.get(&step) == Some(&StepStatus::Completed)) {
                return Err(invalid(transition, state, "the run has work left"));
            }
            next.status = Status::Completed;
        }
        (Transition::RunFailed { .. }, _) => next.status = Status::Failed,
        (Transition::RunCancelled { .. }, _) => next.status = Status::Cancelled,
        (Transition::RunTimedOut, _) => next.status = Status::TimedOut,
        (Transition::RunCreated { .. } | Transition::RunResumed { .. }, _) => unreachable!("handled above"),
    }
    if !next.status.is_terminal() {
        next.status = next.derived_status();
    }
    next.seq += 1;
    next.updated_at = recorded.at;
    Ok(next)
}

/// Folds a whole log from the start under the run's definition: replay.
pub fn replay<'a>(
    log: impl IntoIterator<Item = &'a Recorded>,
    definition: &WorkflowDef,
) -> Result<Option<RunState>, (usize, InvalidTransition)> {
    let mut state: Option<RunState> = None;
    for (index, recorded) in log.into_iter().enumerate() {
        state = Some(apply(state.as_ref(), recorded, definition).map_err(|err| (index, err))?);
    }
    Ok(state)
}

/// The definition hash a log's first transition names: what to load before folding it.
pub fn definition_of<'a>(log: impl IntoIterator<Item = &'a Recorded>) -> Option<&'a str> {
    match &log.into_iter().next()?.transition {
        Transition::RunCreated { definition, .. } => Some(definition),
        _ => None,
    }
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

/// What the engine must do for a run in `state` under `definition`: fail it when a step failed
/// for good, complete it when every step completed, else queue every queued step and keep a
/// timer for the earliest of its steps' (retries, sleeps, waits).
pub fn next(state: &RunState, definition: &WorkflowDef, _now: Millis) -> Vec<Effect> {
    if state.status.is_terminal() {
        return Vec::new();
    }
    let failed = state.steps.iter().find_map(|(step, status)| match status {
        StepStatus::Failed { attempt } => Some((*step, *attempt)),
        _ => None,
    });
    if let Some((step, attempt)) = failed {
        let id = definition.steps.get(step as usize).map_or("?", |s| s.id.as_str());
        let message = state.last_error.as_ref().filter(|err| err.step == step).map_or("", |err| err.message.as_str());
        return vec![Effect::FailRun { error: format!("step `{id}` failed on attempt {attempt}: {message}") }];
    }
    let steps = definition.steps.len() as u32;
    if (0..steps).all(|step| state.steps.get(&step) == Some(&StepStatus::Completed)) {
        return vec![Effect::CompleteRun];
    }
    let mut effects: Vec<Effect> = state
        .steps
        .iter()
        .filter_map(|(step, status)| match status {
            StepStatus::Queued { attempt } => Some(Effect::Dispatch { step: *step, attempt: *attempt }),
            _ => None,
        })
        .collect();
    if let Some(due) = state.next_timer() {
        effects.push(Effect::SetTimer { due });
    }
    effects
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
/// itself (`run_completed`, `run_failed`) with the same time and replica. Its effects queue only
/// the step attempts that these transitions queued: the others were queued by the commits that
/// queued them.
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
        current = Some(apply(current.as_ref(), &recorded, definition)?);
        appended.push(recorded);
    }
    let Some(mut current) = current else {
        return Err(InvalidTransition {
            transition: "<nothing>",
            state: "<none>".to_owned(),
            reason: "nothing happened to a run that does not exist",
        });
    };
    let queued_before = |step: u32, attempt: u32| {
        state.is_some_and(|before| {
            !before.status.is_terminal() && before.steps.get(&step) == Some(&StepStatus::Queued { attempt })
        })
    };
    // Each follow-up ends the run, so this settles after at most one round.
    for _ in 0..2 {
        let mut effects = next(&current, definition, now);
        let follow_up = effects.iter().find_map(|effect| match effect {
            Effect::CompleteRun => Some(Transition::RunCompleted),
            Effect::FailRun { error } => Some(Transition::RunFailed { error: error.clone() }),
            Effect::Dispatch { .. } | Effect::SetTimer { .. } => None,
        });
        match follow_up {
            Some(transition) => {
                let recorded = Recorded { at: now, replica: replica.clone(), transition };
                current = apply(Some(&current), &recorded, definition)?;
                appended.push(recorded);
            }
            None => {
                effects.retain(|effect| match effect {
                    Effect::Dispatch { step, attempt } => !queued_before(*step, *attempt),
                    _ => true,
                });
                return Ok(Advanced { state: current, appended, effects });
            }
        }
    }
    Ok(Advanced { effects: next(&current, definition, now), state: current, appended })
}

/// What a run's timers due at `now` record, step by step: a retry's attempt is queued again;
/// a sleep that ended completes its step with `{"sleptUntil": <time>}`; a wait that timed out
/// completes its step with `{"timedOut": true, "event": null}` (later steps may branch on it:
/// `when = "${steps.<id>.timedOut}"`). Steps whose timers are not due record nothing.
pub fn timers_fired(state: &RunState, now: Millis) -> Vec<(u32, Vec<Transition>)> {
    if state.status.is_terminal() {
        return Vec::new();
    }
    state
        .steps
        .iter()
        .filter(|(_, status)| status.timer().is_some_and(|due| due <= now))
        .filter_map(|(step, status)| {
            let (step, fired) = (*step, |attempt| Transition::TimerFired { step: *step, attempt });
            let completed = |attempt, output: serde_json::Value| Transition::StepCompleted {
                step,
                attempt,
                output: output.to_string(),
            };
            let transitions = match status {
                StepStatus::Retrying { attempt, .. } => vec![fired(*attempt)],
                StepStatus::Sleeping { attempt, until } => {
                    vec![fired(*attempt), completed(*attempt, serde_json::json!({ "sleptUntil": timestamp(*until) }))]
                }
                StepStatus::Waiting { attempt, .. } => {
                    vec![fired(*attempt), completed(*attempt, serde_json::json!({ "timedOut": true, "event": null }))]
                }
                StepStatus::Queued { .. }
                | StepStatus::Running { .. }
                | StepStatus::AwaitingChild { .. }
                | StepStatus::Completed
                | StepStatus::Failed { .. } => return None,
            };
            Some((step, transitions))
        })
        .collect()
}

/// What the arrival of the event a waiting step waited for records: the event, and the step's
/// completion with `{"timedOut": false, "event": {"id", "type", "payload"}}`.
pub fn event_arrived(
    step: u32,
    attempt: u32,
    event_id: &str,
    event_type: &str,
    payload: &serde_json::Value,
) -> Vec<Transition> {
    let output = serde_json::json!({
        "timedOut": false,
        "event": { "id": event_id, "type": event_type, "payload": payload },
    });
    vec![
        Transition::EventReceived { step, attempt, event_id: event_id.to_owned(), payload: payload.to_string() },
        Transition::StepCompleted { step, attempt, output: output.to_string() },
    ]
}

/// How a child run ended, as its parent's step sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildEnding {
    /// Completed with this output (JSON text): the step's output.
    Completed { output: String },
    /// Failed, cancelled or timed out (`status`), for `reason`.
    Ended { status: Status, reason: String },
}

/// What the end of `child`, the run step `step` (attempt `attempt`) waited for, records: the
/// child's end, then the step's completion with the child's output, or its failure (retried per
/// the step's policy: a retry starts a new child). `jitter_unit` as for [`step_failure`].
#[allow(clippy::too_many_arguments)]
pub fn child_ended(
    definition: &WorkflowDef,
    state: &RunState,
    step: u32,
    attempt: u32,
    child: &str,
    ending: ChildEnding,
    now: Millis,
    jitter_unit: f64,
) -> Vec<Transition> {
    let (status, outcome) = match ending {
        ChildEnding::Completed { output } => (Status::Completed, Transition::StepCompleted { step, attempt, output }),
        ChildEnding::Ended { status, reason } => {
            let error = format!("child run {child} {}: {reason}", status.name());
            (status, step_failure(definition, state, step, attempt, error, now, jitter_unit))
        }
    };
    vec![Transition::ChildEnded { step, attempt, child: child.to_owned(), status: status.name().to_owned() }, outcome]
}

/// Why an attempt failed, and whether another attempt may succeed (a 4xx, say, will not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub error: String,
    pub retryable: bool,
}

/// Whether a step delivered `deliveries` times (this delivery included) is past the bound of
/// `limit` deliveries: then it fails for good without running, as a step that keeps crashing or
/// stalling its replica would never complete.
pub fn delivery_limit(definition: &WorkflowDef, step: u32, deliveries: u64, limit: u64) -> Option<Failure> {
    (deliveries > limit).then(|| {
        let id = definition.steps.get(step as usize).map_or("?", |s| s.id.as_str());
        Failure {
            error: format!(
                "step `{id}` was delivered {deliveries} times without completing (limit {limit}): it crashes or stalls its replica"
            ),
            retryable: false,
        }
    })
}

/// The transition for a failed attempt: final when another attempt cannot help, else as
/// [`step_failure`] (retried while the step's policy allows).
pub fn attempt_failed(
    definition: &WorkflowDef,
    state: &RunState,
    step: u32,
    attempt: u32,
    failure: Failure,
    now: Millis,
    jitter_unit: f64,
) -> Transition {
    if failure.retryable {
        step_failure(definition, state, step, attempt, failure.error, now, jitter_unit)
    } else {
        Transition::StepFailed { step, attempt, error: failure.error, retry_at: None }
    }
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
    let counted = state.counted_attempts(step, attempt);
    let retry_at = definition
        .steps
        .get(step as usize)
        .filter(|s| counted < s.retry.max_attempts)
        .map(|s| now + s.retry.delay(counted, jitter_unit).as_millis() as u64);
    Transition::StepFailed { step, attempt, error, retry_at }
}

#[cfg(test)]
mod tests;
