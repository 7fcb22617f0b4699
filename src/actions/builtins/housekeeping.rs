//! `housekeeping`: the orchestrator's own housekeeping (trims the streams, expires finished runs
//! past their retention, reports the store's memory and pending counts); no parameters. Its
//! output is the report of [`crate::actions::Services::housekeeping`].

use crate::actions::{ActionError, Builtin, BuiltinCall};
use async_trait::async_trait;
use serde_json::Value;

pub struct Housekeeping;

#[async_trait]
impl Builtin for Housekeeping {
    fn name(&self) -> &'static str {
        "housekeeping"
    }

    async fn run(&self, call: BuiltinCall<'_>) -> Result<Value, ActionError> {
        tokio::select! {
            report = call.services.housekeeping() => report,
            () = call.cancel.cancelled() => Err(ActionError::retryable("housekeeping: cancelled")),
        }
    }
}
