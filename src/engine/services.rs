//! What the engine offers actions ([`Services`]): the bus, small shared values, activity
//! summaries, the orchestrator's own housekeeping, and child runs (see `children`).

use super::Engine;
use crate::actions::{ActionError, Services, StepContext};
use crate::machine::{Millis, Status};
use crate::store::{EntryCap, EventQuery, RunQuery};
use async_trait::async_trait;
use serde_json::{Value, json};
use std::collections::BTreeMap;

fn unavailable(err: impl std::fmt::Display) -> ActionError {
    ActionError::retryable(format!("the store: {err}"))
}

/// Most runs an activity summary looks at.
const ACTIVITY_RUNS: usize = 10_000;

#[async_trait]
impl Services for Engine {
    async fn start_child(&self, parent: &StepContext, workflow: &str, input: &Value) -> Result<String, ActionError> {
        Engine::start_child(self, parent, workflow, input).await
    }

    fn now(&self) -> Millis {
        self.clock.now()
    }

    async fn publish(&self, event_type: &str, payload: &Value, key: Option<&str>) -> Result<String, ActionError> {
        match self.publish_event(event_type, payload, key, Some("workflow-orchestrator")).await.map_err(unavailable)? {
            Ok(id) => Ok(id),
            Err(problem) => Err(ActionError::fatal(format!("the event is not valid: {problem}"))),
        }
    }

    async fn get_value(&self, key: &str) -> Result<Option<String>, ActionError> {
        self.store.get_value(key).await.map_err(unavailable)
    }

    async fn set_value(&self, key: &str, value: &str) -> Result<(), ActionError> {
        self.store.set_value(key, value).await.map_err(unavailable)
    }

    async fn activity(&self, since: Millis) -> Result<Value, ActionError> {
        // Newest first, page by page, until runs older than `since`.
        let mut by_workflow: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        let mut failures = Vec::new();
        let mut slowest: Vec<(u64, String, String)> = Vec::new();
        let mut cursor = None;
        let mut seen = 0;
        'pages: while seen < ACTIVITY_RUNS {
            let query = RunQuery { workflow: None, status: None, before: cursor.as_ref(), limit: 500 };
            let page = self.store.list_runs(query).await.map_err(unavailable)?.runs;
            let Some(last) = page.last().cloned() else { break };
            for run in &page {
                let Some(summary) = self.store.summary(run).await.map_err(unavailable)? else { continue };
                if summary.created_at < since {
                    break 'pages;
                }
                seen += 1;
                let status = summary.status.name().to_owned();
                *by_workflow.entry(summary.workflow.clone()).or_default().entry(status).or_default() += 1;
                if summary.status == Status::Failed {
                    failures.push(json!({ "runId": run.to_string(), "workflowId": summary.workflow }));
                }
                if summary.status.is_terminal() {
                    slowest.push((
                        summary.updated_at.saturating_sub(summary.created_at),
                        run.to_string(),
                        summary.workflow,
                    ));
                }
            }
            cursor = Some(last);
        }
        slowest.sort_by_key(|s| std::cmp::Reverse(s.0));
        slowest.truncate(5);
        let query = EventQuery { before: None, event_type: None, limit: 1000, scan: 1000, cap: EntryCap::IDS };
        let events = self.store.recent_events(query).await.map_err(unavailable)?;
        let since_id = format!("{since}-0");
        let events_since =
            events.iter().filter(|e| crate::store::compare_entry_ids(&e.entry.id, &since_id).is_ge()).count();
        let (_, dead) = self.store.event_counts().await.map_err(unavailable)?;
        Ok(json!({
            "since": crate::machine::timestamp(since),
            "runs": seen,
            "byWorkflow": by_workflow,
            "failures": failures.into_iter().take(20).collect::<Vec<_>>(),
            "slowest": slowest.into_iter().map(|(ms, run, workflow)| json!({ "runId": run, "workflowId": workflow, "durationMs": ms })).collect::<Vec<_>>(),
            "events": events_since,
            "deadLetteredEvents": dead,
        }))
    }

    async fn store_report(&self) -> Result<Value, ActionError> {
        let health = self.store.health().await.map_err(unavailable)?;
        Ok(json!({
            "kind": health.kind.name(),
            "version": health.version,
            "authenticated": self.config.store_authenticated,
            "warnings": health.warnings,
        }))
    }

    async fn housekeeping(&self) -> Result<Value, ActionError> {
        let now = self.clock.now();
        let retain_until = now.saturating_sub(self.config.run_retention.as_millis() as u64);
        let report = self.store.housekeeping(retain_until).await.map_err(unavailable)?;
        let min_time = now.saturating_sub(self.config.events_retention.as_millis() as u64);
        let trimmed_events = self.store.trim_events(self.config.events_max_len, min_time).await.map_err(unavailable)?;
        let stats = self.store.stream_stats().await.map_err(unavailable)?;
        let memory = self.store.memory_used().await.map_err(unavailable)?;
        Ok(json!({
            "trimmedReadyEntries": report.trimmed_entries,
            "expiredRuns": report.expired_runs,
            "trimmedEvents": trimmed_events,
            "readyPending": stats.ready_pending,
            "readyLength": stats.ready_length,
            "eventsLength": stats.events_length,
            "eventsPending": stats.events_pending,
            "eventsDead": stats.events_dead,
            "storeMemoryBytes": memory,
        }))
    }
}
