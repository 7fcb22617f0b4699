//! Debounce (`debounce = { period, key, max_wait }`): a trigger of a debounced workflow (REST,
//! the command line, an event) starts no run; it is added to its key's burst in the store
//! (`Debounces::debounce`, one atomic call), which falls due once `period` passed since its
//! last trigger (or `max_wait` since its first). Every replica looks for due bursts every
//! [`DEBOUNCE_POLL`] and starts each one's run with the last trigger's input, under an
//! idempotency key of the burst: two replicas starting the same burst start one run, and a
//! replica that dies between starting it and forgetting the burst leaves it to be started
//! again, and found started.
//!
//! Cron fires, reruns and child runs are not debounced: they start their runs directly.

use super::{Engine, EngineError, Triggered, sleep_or_cancelled, slots::group_name};
use crate::machine::{TraceContext, Trigger};
use crate::store::{DebounceTrigger, Debounced, DueBurst, StoreError, burst_id};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// How often due bursts are looked for while a workflow is debounced: a burst's run starts
/// within this (plus a start) of its due time.
pub const DEBOUNCE_POLL: Duration = Duration::from_millis(200);
/// How often they are looked for when no workflow is debounced (bursts of an earlier
/// definition may still wait).
const IDLE_POLL: Duration = Duration::from_secs(5);
/// Bursts started per poll.
const BURST_BATCH: usize = 64;

/// What a trigger did: started a run, or joined its key's burst.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    Started(Triggered),
    /// The trigger joined its key's burst (see [`Debounced`]): the burst's run starts when it
    /// is due, with the input of the burst's last trigger.
    Debounced(Debounced),
}

/// What a burst keeps of its last trigger, to start the run with.
#[derive(Serialize, Deserialize)]
struct LastTrigger {
    input: serde_json::Value,
    trigger: Trigger,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    trace: Option<TraceContext>,
}

impl Engine {
    /// A trigger from outside (REST, the command line, an event): starts a run of
    /// `workflow_id` ([`Engine::trigger_traced`]), or, when it is debounced, adds the trigger
    /// to its key's burst.
    pub async fn accept(
        &self,
        workflow_id: &str,
        input: &serde_json::Value,
        idempotency_key: Option<&str>,
        trigger: Trigger,
        caller: Option<TraceContext>,
    ) -> Result<Accepted, EngineError> {
        let workflow = self.registered(workflow_id)?;
        let Some(debounce) = &workflow.def.debounce else {
            let triggered = self.trigger_traced(workflow_id, input, idempotency_key, trigger, caller).await?;
            return Ok(Accepted::Started(triggered));
        };
        let group = group_name("debounce", debounce.key.as_deref(), input).map_err(EngineError::Invalid)?;
        // A limit's key that does not render is refused now, not when the burst starts.
        self.limited_shard(&workflow.def, input).map_err(EngineError::Invalid)?;
        let order = match &trigger {
            Trigger::Event { event_id, .. } => Some(event_id.clone()),
            _ => None,
        };
        let last = LastTrigger { input: input.clone(), trigger, trace: caller };
        let payload = serde_json::to_string(&last).map_err(|err| EngineError::Invalid(err.to_string()))?;
        let debounced = DebounceTrigger {
            workflow: workflow_id.to_owned(),
            burst: burst_id(workflow_id, &group),
            group,
            payload,
            order,
            period_ms: debounce.period.as_millis() as u64,
            max_wait_ms: debounce.max_wait.map_or(0, |wait| wait.as_millis() as u64),
            key: idempotency_key.map(|key| (key.to_owned(), self.config.idempotency_retention)),
        };
        let joined = self.store.debounce(&debounced).await?;
        tracing::debug!(workflow = workflow_id, ?joined, "trigger debounced");
        Ok(Accepted::Debounced(joined))
    }

    pub(super) async fn debounce_loop(self: Arc<Self>) {
        let poll = if self.registry.iter().any(|w| w.def.debounce.is_some()) { DEBOUNCE_POLL } else { IDLE_POLL };
        loop {
            if sleep_or_cancelled(&self.shutdown, poll).await {
                return;
            }
            match self.store.due_bursts(BURST_BATCH).await {
                Ok(due) => {
                    for burst in due {
                        if let Err(err) = self.start_burst(&burst).await {
                            tracing::warn!(burst = %burst.burst, %err, "starting a debounced run failed; will retry");
                        }
                    }
                }
                Err(err) => tracing::warn!(%err, "reading due debounce bursts failed; will retry"),
            }
        }
    }

    /// Starts a due burst's run (once, whichever replicas try) and forgets the burst. A burst
    /// whose run can never start (its workflow is gone, its payload unreadable, its input
    /// refused) is logged as an error and forgotten.
    async fn start_burst(&self, burst: &DueBurst) -> Result<(), StoreError> {
        let last = match serde_json::from_str::<LastTrigger>(&burst.payload) {
            Ok(last) => last,
            Err(err) => {
                tracing::error!(burst = %burst.burst, %err, "a debounce burst's payload does not read: dropped");
                return self.store.finish_burst(burst).await;
            }
        };
        let trigger = Trigger::Debounce {
            burst: burst.burst.clone(),
            triggers: burst.triggers,
            first_at: burst.first_at,
            last: Box::new(last.trigger),
        };
        let key = format!("debounce:{}", burst.burst);
        match self.trigger_traced(&burst.workflow, &last.input, Some(&key), trigger, last.trace).await {
            Ok(triggered) => {
                tracing::debug!(burst = %burst.burst, run_id = %triggered.run_id, triggers = burst.triggers, "debounced run started");
            }
            Err(EngineError::Store(err)) => return Err(err),
            Err(err) => {
                tracing::error!(burst = %burst.burst, workflow = %burst.workflow, %err, "a debounced run cannot start: dropped")
            }
        }
        self.store.finish_burst(burst).await
    }

    /// Debounce bursts not yet started, by workflow (every debounced workflow, 0 when it has
    /// none).
    pub async fn burst_counts(&self) -> Result<std::collections::BTreeMap<String, u64>, StoreError> {
        let mut counts = self.store.burst_counts().await?;
        for workflow in self.registry.iter().filter(|w| w.def.debounce.is_some()) {
            counts.entry(workflow.def.id.clone()).or_default();
        }
        Ok(counts)
    }
}
