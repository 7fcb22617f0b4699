//! `digest`: a summary of the last `hours` (default 24, at most a year) of runs and events from
//! our own store: counts by workflow and status, failures, the slowest runs, events seen. Its
//! output is [`crate::actions::Services::activity`]'s summary, plus `hours`.

use crate::actions::{ActionError, Builtin, BuiltinCall};
use async_trait::async_trait;
use serde_json::{Value, json};

const MAX_HOURS: u64 = 24 * 366;

pub struct Digest;

#[async_trait]
impl Builtin for Digest {
    fn name(&self) -> &'static str {
        "digest"
    }

    async fn run(&self, call: BuiltinCall<'_>) -> Result<Value, ActionError> {
        let hours = call.number_or("hours", 24)?;
        if !(1..=MAX_HOURS).contains(&hours) {
            return Err(ActionError::fatal(format!("parameter `hours` must be between 1 and {MAX_HOURS}")));
        }
        let since = call.services.now().saturating_sub(hours * 3600 * 1000);
        let mut summary = tokio::select! {
            summary = call.services.activity(since) => summary?,
            () = call.cancel.cancelled() => return Err(ActionError::retryable("digest: cancelled")),
        };
        if let Value::Object(map) = &mut summary {
            map.insert("hours".to_owned(), json!(hours));
        }
        Ok(summary)
    }
}
