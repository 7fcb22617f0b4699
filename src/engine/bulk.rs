//! Bulk actions: cancel or retry every run that matches a filter, up to a limit, through the
//! same operator paths as one run (`operator`). Safe to repeat: a run that was cancelled or
//! retried no longer matches, and a run that changed meanwhile is reported, not forced.

use super::{Engine, EngineError};
use crate::machine::{Millis, Status};
use crate::store::{RunId, RunQuery};
use futures::StreamExt;

/// The most runs one bulk action may act on.
pub const MAX_BULK: usize = 10_000;
/// Runs acted on at once.
const IN_FLIGHT: usize = 16;
/// Runs listed per store read while matching.
const PAGE: usize = 500;

/// What a bulk action does to each matching run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkAction {
    /// Cancels live runs.
    Cancel,
    /// Resumes failed runs at their failed step.
    Retry,
}

impl BulkAction {
    /// The statuses a run must be in for the action to apply to it.
    fn statuses(self) -> Vec<Status> {
        match self {
            BulkAction::Cancel => Status::ALL.into_iter().filter(|s| !s.is_terminal()).collect(),
            BulkAction::Retry => vec![Status::Failed],
        }
    }
}

/// Which runs a bulk action matches: every field optional; `created_after` inclusive,
/// `created_before` exclusive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BulkFilter {
    pub workflow: Option<String>,
    pub status: Option<Status>,
    pub created_after: Option<Millis>,
    pub created_before: Option<Millis>,
}

/// What a bulk action did: how many runs matched, how many it changed, and why the others were
/// left as they were (run id, reason).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BulkOutcome {
    pub matched: usize,
    pub done: usize,
    pub failed: Vec<(String, String)>,
}

impl Engine {
    /// Applies `action` to at most `limit` runs matching `filter`, newest first. A `status` in
    /// the filter the action cannot apply to (cancelling finished runs, retrying runs that did
    /// not fail) is invalid.
    pub async fn bulk(
        &self,
        action: BulkAction,
        filter: &BulkFilter,
        limit: usize,
    ) -> Result<BulkOutcome, EngineError> {
        let statuses: Vec<Status> = match filter.status {
            None => action.statuses(),
            Some(status) if action.statuses().contains(&status) => vec![status],
            Some(status) => {
                let names: Vec<&str> = action.statuses().iter().map(Status::name).collect();
                return Err(EngineError::Invalid(format!(
                    "a bulk {} applies to runs that are {}, not `{}`",
                    match action {
                        BulkAction::Cancel => "cancel",
                        BulkAction::Retry => "retry",
                    },
                    names.join(", "),
                    status.name()
                )));
            }
        };
        let limit = limit.min(MAX_BULK);
        let mut matched: Vec<RunId> = Vec::new();
        for status in statuses {
            self.matching(filter, status, limit - matched.len(), &mut matched).await?;
            if matched.len() >= limit {
                break;
            }
        }
        let mut outcome = BulkOutcome { matched: matched.len(), ..BulkOutcome::default() };
        let results: Vec<(RunId, Result<(), EngineError>)> = futures::stream::iter(matched)
            .map(|run| async move {
                let result = match action {
                    BulkAction::Cancel => self.cancel(&run, "cancelled by a bulk action").await.map(drop),
                    BulkAction::Retry => self.retry(&run).await.map(drop),
                };
                (run, result)
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        for (run, result) in results {
            match result {
                Ok(()) => outcome.done += 1,
                // The store failing is the caller's to retry; a run that changed is reported.
                Err(EngineError::Store(err)) => return Err(EngineError::Store(err)),
                Err(err) => outcome.failed.push((run.to_string(), err.to_string())),
            }
        }
        Ok(outcome)
    }

    /// Adds to `into` up to `want` runs in `status` matching `filter`, newest first.
    async fn matching(
        &self,
        filter: &BulkFilter,
        status: Status,
        want: usize,
        into: &mut Vec<RunId>,
    ) -> Result<(), EngineError> {
        let mut cursor = filter.created_before.map(RunId::first_at);
        let mut added = 0;
        while added < want {
            let query = RunQuery {
                workflow: filter.workflow.as_deref(),
                status: Some(status),
                before: cursor.as_ref(),
                limit: PAGE,
            };
            let page = self.list_runs(query).await?;
            for run in &page {
                if filter.created_after.is_some_and(|after| run.created_at() < after) {
                    return Ok(());
                }
                into.push(run.clone());
                added += 1;
                if added == want {
                    return Ok(());
                }
            }
            if page.len() < PAGE {
                return Ok(());
            }
            cursor = page.last().cloned();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancel_applies_to_live_runs_and_a_retry_to_failed_ones() {
        let names = |action: BulkAction| action.statuses().iter().map(Status::name).collect::<Vec<_>>();
        assert_eq!(names(BulkAction::Cancel), ["pending", "running", "retrying", "sleeping", "waiting"]);
        assert_eq!(names(BulkAction::Retry), ["failed"]);
    }
}
