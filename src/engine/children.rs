//! Child workflows: a step (`action = "workflow"`) starts a run of another workflow and waits
//! for it without holding an executor; when the child ends, its parent's step is completed with
//! the child's output, or failed (retried per its policy: a retry starts a new child).
//!
//! The child's end wakes its parent right after the commit that ends it. Should that be lost (a
//! crash in between), or should the child end before its parent recorded that it waits for it,
//! the parent is woken anyway: right after it records the wait, and by the sweeper, which looks
//! at the children of quiet waiting runs.

use super::record::Recording;
use super::{Engine, EngineError, LoadedRun};
use crate::actions::{ActionError, StepContext};
use crate::machine::{self, ChildEnding, RunState, Status, StepStatus, Transition, Trigger};
use crate::store::{RunId, StoreError};

/// How deep child workflows may nest: a run started by a run started by ... a run with no
/// parent, at most this many levels.
pub const MAX_CHILD_DEPTH: u32 = 8;

impl Engine {
    /// Starts `workflow` with `input` as the child of the step `parent` runs, once per step
    /// attempt: the idempotency key names the attempt, so a redelivered attempt gets the child
    /// it started, and a retry starts a new one.
    pub(super) async fn start_child(
        &self,
        parent: &StepContext,
        workflow: &str,
        input: &serde_json::Value,
    ) -> Result<String, ActionError> {
        let depth = parent.trigger.get("depth").and_then(serde_json::Value::as_u64).unwrap_or(0) as u32 + 1;
        if depth > MAX_CHILD_DEPTH {
            return Err(ActionError::fatal(format!(
                "child workflows nest at most {MAX_CHILD_DEPTH} deep: run {} is already {} below a run without a parent",
                parent.run_id,
                depth - 1
            )));
        }
        let trigger = Trigger::Parent {
            run_id: parent.run_id.clone(),
            step: parent.step,
            step_id: parent.step_id.clone(),
            attempt: parent.attempt,
            depth,
        };
        let key = format!("child:{}:{}:{}", parent.run_id, parent.step_id, parent.attempt);
        match self.trigger_traced(workflow, input, Some(&key), trigger, parent.trace.clone()).await {
            Ok(triggered) => Ok(triggered.run_id),
            Err(EngineError::Store(err)) => Err(ActionError::retryable(format!("the child could not start: {err}"))),
            Err(err) => Err(ActionError::fatal(format!("the child workflow `{workflow}` could not start: {err}"))),
        }
    }

    /// After the commit that ended `child` (its final state `ended`): wakes the parent's step
    /// that waits for it, if the run has a parent.
    pub(super) async fn child_run_ended(&self, child: &RunId, ended: &RunState) {
        let Trigger::Parent { run_id, step, attempt, .. } = &ended.trigger else { return };
        let Ok(parent) = run_id.parse::<RunId>() else { return };
        let woken = match self.load_for_loop(child).await {
            Ok(Some(child_run)) => self.wake_parent(&parent, *step, *attempt, &child_run).await,
            Ok(None) => Ok(()),
            Err(err) => Err(err),
        };
        if let Err(err) = woken {
            // The sweeper wakes it later (it looks at the children of waiting runs).
            tracing::warn!(run_id = %parent, child = %child, %err, "waking the parent of a run that ended failed; will retry");
        }
    }

    /// Wakes every step of `parent` whose child has ended (the sweeper's belt and braces: the
    /// wake-up may have been lost).
    pub(super) async fn wake_for_ended_children(&self, parent: &RunId, state: &RunState) -> Result<(), StoreError> {
        for (step, status) in &state.steps {
            let StepStatus::AwaitingChild { attempt, child } = status else { continue };
            let Ok(child) = child.parse::<RunId>() else { continue };
            self.wake_if_child_ended(parent, *step, *attempt, &child).await?;
        }
        Ok(())
    }

    /// Wakes `parent`'s step `step`, attempt `attempt`, if its child `child` has ended (a child
    /// may end before its parent recorded the wait: its end then found nothing to wake).
    pub(super) async fn wake_if_child_ended(
        &self,
        parent: &RunId,
        step: u32,
        attempt: u32,
        child: &RunId,
    ) -> Result<(), StoreError> {
        let ended = self.store.summary(child).await?.is_some_and(|summary| summary.status.is_terminal());
        if ended && let Some(child_run) = self.load_for_loop(child).await? {
            self.wake_parent(parent, step, attempt, &child_run).await?;
        }
        Ok(())
    }

    /// Records the end of `child` on `parent`'s step `step`, attempt `attempt`, if that step
    /// still waits for it, and what follows (the step's outcome, the next steps).
    async fn wake_parent(&self, parent: &RunId, step: u32, attempt: u32, child: &LoadedRun) -> Result<(), StoreError> {
        let ending = ending_of(child);
        let child_id = child.id.to_string();
        let recording = self.record_on_run(parent, false, |loaded, now| {
            let waits = matches!(
                loaded.state.steps.get(&step),
                Some(StepStatus::AwaitingChild { attempt: a, child: c }) if *a == attempt && *c == child_id
            );
            // Woken already, or the parent moved on (cancelled, failed): nothing to record.
            (waits && !loaded.state.status.is_terminal()).then(|| {
                let jitter = rand::random_range(-1.0..=1.0);
                let happened = machine::child_ended(
                    &loaded.workflow.def,
                    &loaded.state,
                    step,
                    attempt,
                    &child_id,
                    ending.clone(),
                    now,
                    jitter,
                );
                (happened, ())
            })
        });
        match recording.await? {
            Recording::Applied { .. } => {
                let status = child.state.status.name();
                tracing::info!(run_id = %parent, child = %child_id, status, "a child run ended: its parent's step goes on");
                Ok(())
            }
            Recording::Nothing(_) => Ok(()),
            Recording::KeptChanging => {
                Err(StoreError::Unavailable(format!("run {parent} kept changing while its child {child_id} ended")))
            }
        }
    }

    /// Cancels the live children of a run that was just cancelled (`state`: its state before),
    /// and theirs in turn.
    pub(super) async fn cancel_children(&self, parent: &RunId, state: &RunState) {
        for status in state.steps.values() {
            let StepStatus::AwaitingChild { child, .. } = status else { continue };
            let Ok(child) = child.parse::<RunId>() else { continue };
            let reason = format!("its parent run {parent} was cancelled");
            match Box::pin(self.cancel(&child, &reason)).await {
                Ok(_) | Err(EngineError::Conflict(_) | EngineError::UnknownRun(_)) => {}
                Err(err) => {
                    tracing::warn!(run_id = %parent, %child, %err, "cancelling a child of a cancelled run failed")
                }
            }
        }
    }
}

/// How a child run that ended did, for its parent: its result (the output of the step its
/// workflow names in `result`, else of its last step), or why it did not complete.
fn ending_of(child: &LoadedRun) -> ChildEnding {
    let log = &child.log;
    if child.state.status == Status::Completed {
        let result = child.workflow.def.result_step();
        let output = log.iter().rev().find_map(|entry| match machine::output_of(&entry.recorded.transition) {
            Some((step, output)) if step == result => Some(output.to_owned()),
            _ => None,
        });
        return ChildEnding::Completed { output: output.unwrap_or_else(|| "null".to_owned()) };
    }
    let reason = log
        .iter()
        .rev()
        .find_map(|entry| match &entry.recorded.transition {
            Transition::RunFailed { error } => Some(error.clone()),
            Transition::RunCancelled { reason } => Some(reason.clone()),
            Transition::RunTimedOut => Some("it timed out".to_owned()),
            _ => None,
        })
        .unwrap_or_else(|| child.state.status.name().to_owned());
    ChildEnding::Ended { status: child.state.status, reason }
}
