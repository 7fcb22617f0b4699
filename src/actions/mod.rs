//! What a step does. Each action gets the step's context and a cancellation token (fired when
//! the step times out, its lease is lost or the replica stops) and returns the step's output as
//! JSON text, or an error saying whether trying again may help.

mod exec;

use crate::definition::{ActionSpec, StepDef};
use tokio_util::sync::CancellationToken;

/// Everything an action may know about the step it runs.
#[derive(Debug, Clone)]
pub struct StepContext {
    pub run_id: String,
    pub workflow_id: String,
    pub step_id: String,
    pub attempt: u32,
    /// The run's input, as JSON text.
    pub input: String,
}

impl StepContext {
    /// Stable across attempts and deliveries: side effects are at-least-once, so an action hands
    /// this to whatever it calls to make repeats harmless.
    pub fn idempotency_key(&self) -> String {
        format!("{}:{}", self.run_id, self.step_id)
    }
}

/// Why a step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ActionError {
    pub message: String,
    /// Whether another attempt may succeed (a 4xx, say, will not).
    pub retryable: bool,
}

impl ActionError {
    pub fn retryable(message: impl Into<String>) -> ActionError {
        ActionError { message: message.into(), retryable: true }
    }

    pub fn fatal(message: impl Into<String>) -> ActionError {
        ActionError { message: message.into(), retryable: false }
    }
}

/// Runs a step's action to its end or until `cancel` fires. The step timeout is the caller's.
pub async fn run(step: &StepDef, context: &StepContext, cancel: CancellationToken) -> Result<String, ActionError> {
    match &step.action {
        ActionSpec::Noop => Ok(context.input.clone()),
        ActionSpec::Exec(spec) => exec::run(spec, context, cancel).await,
    }
}
