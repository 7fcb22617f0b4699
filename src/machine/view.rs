//! Each step of a run as people see it: the one place the API, the dashboard and the command
//! line get a step's status, attempts, times, output and error from, by the run's state (where
//! each step is) and its log (what each step did).

use super::{Millis, Recorded, RunState, Status, StepStatus, Transition};
use crate::definition::WorkflowDef;

/// One step of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepView {
    pub step: u32,
    /// A run status name: `pending` (not reached, or the run has not started), `running`
    /// (queued or executing), `retrying`, `sleeping`, `waiting`, `completed`, `failed`; and for
    /// a step left live when its run ended, the run's end: `cancelled`, `timed_out`, `failed`.
    pub status: &'static str,
    /// Attempts started so far.
    pub attempts: u32,
    /// When its first attempt started (or it was reused).
    pub started_at: Option<Millis>,
    /// When it completed or failed for good (a resume clears it).
    pub ended_at: Option<Millis>,
    /// Its output (JSON text), once completed.
    pub output: Option<String>,
    /// Its last failure.
    pub error: Option<String>,
}

/// Every step of `definition`, in order, as `state` (the fold of `log`) has it.
pub fn step_views<'a>(
    state: &RunState,
    log: impl IntoIterator<Item = &'a Recorded>,
    definition: &WorkflowDef,
) -> Vec<StepView> {
    let mut views: Vec<StepView> = (0..definition.steps.len() as u32)
        .map(|step| StepView {
            step,
            status: status_of(state, step),
            attempts: 0,
            started_at: None,
            ended_at: None,
            output: None,
            error: None,
        })
        .collect();
    for recorded in log {
        let Some((step, _)) = recorded.transition.step_attempt() else { continue };
        let Some(view) = views.get_mut(step as usize) else { continue };
        match &recorded.transition {
            Transition::StepStarted { attempt, .. } => {
                view.attempts = view.attempts.max(*attempt);
                view.started_at.get_or_insert(recorded.at);
            }
            Transition::StepCompleted { output, .. } => {
                view.output = Some(output.clone());
                view.ended_at = Some(recorded.at);
            }
            Transition::StepSkipped { .. } => {
                view.output = Some(super::SKIPPED_OUTPUT.to_owned());
                view.ended_at = Some(recorded.at);
            }
            Transition::StepReused { output, .. } => {
                view.output = Some(output.clone());
                view.started_at.get_or_insert(recorded.at);
                view.ended_at = Some(recorded.at);
            }
            Transition::StepFailed { error, retry_at, .. } => {
                view.error = Some(error.clone());
                if retry_at.is_none() {
                    view.ended_at = Some(recorded.at);
                }
            }
            Transition::RunResumed { .. } => view.ended_at = None,
            Transition::RunCreated { .. }
            | Transition::ChildStarted { .. }
            | Transition::ChildEnded { .. }
            | Transition::TimerFired { .. }
            | Transition::StepSuspended { .. }
            | Transition::EventReceived { .. }
            | Transition::RunCompleted
            | Transition::RunFailed { .. }
            | Transition::RunCancelled { .. }
            | Transition::RunTimedOut => {}
        }
    }
    views
}

fn status_of(state: &RunState, step: u32) -> &'static str {
    let Some(status) = state.steps.get(&step) else { return "pending" };
    match (status, state.status) {
        (StepStatus::Completed, _) => "completed",
        (StepStatus::Failed { .. }, _) => "failed",
        (StepStatus::Queued { .. }, Status::Pending) => "pending",
        // A step left live when its run ended ends with it; one never started was not run.
        (
            StepStatus::Queued { attempt: 1 },
            Status::Cancelled | Status::TimedOut | Status::Failed | Status::Completed,
        ) => "pending",
        (_, Status::Cancelled) => "cancelled",
        (_, Status::TimedOut) => "timed_out",
        (_, Status::Failed | Status::Completed) => "failed",
        (StepStatus::Queued { .. } | StepStatus::Running { .. }, _) => "running",
        (StepStatus::Retrying { .. }, _) => "retrying",
        (StepStatus::Sleeping { .. }, _) => "sleeping",
        (StepStatus::Waiting { .. } | StepStatus::AwaitingChild { .. }, _) => "waiting",
    }
}
