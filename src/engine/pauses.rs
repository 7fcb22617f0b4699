//! Pausing a workflow: while paused, steps already executing finish, but no further step of its
//! runs is run; triggers are accepted as ever and their runs wait. A step claimed while its
//! workflow is paused is held (`Pauses::hold`: its entry acknowledged, the run put in the
//! workflow's held set by creation time, at once); on resume the held runs are queued again,
//! oldest first, from their own logs (the sweeper's re-queue). Held runs of a workflow that is
//! not paused (a replica died while resuming, or held a step just after the resume) are released
//! by every replica's sweeper too.
//!
//! The paused set lives in the store; each replica reads it every [`PAUSES_REFRESH`], and
//! releases a workflow's held runs when it sees it resumed.

use super::{Engine, EngineError, sleep_or_cancelled};
use crate::store::{Lease, ReadyTask, RunId, StoreError};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// How often a replica reads the paused workflows: a pause is seen everywhere within this.
pub const PAUSES_REFRESH: Duration = Duration::from_millis(500);
/// Held runs queued again per read of the held set.
const RELEASE_BATCH: usize = 100;
/// At most this many batches per release: the rest wait for the next pass.
const RELEASE_BATCHES: usize = 100;

impl Engine {
    /// Pauses or resumes a workflow of the registry; returns whether it is paused now.
    pub async fn set_paused(&self, workflow: &str, paused: bool) -> Result<bool, EngineError> {
        self.registered(workflow)?;
        if self.store.set_paused(workflow, paused).await? {
            tracing::info!(workflow, paused, "{}", if paused { "workflow paused" } else { "workflow resumed" });
        }
        {
            let mut known = self.paused.write();
            if paused {
                known.insert(workflow.to_owned());
            } else {
                known.remove(workflow);
            }
        }
        if !paused {
            self.release_held(workflow).await?;
        }
        Ok(paused)
    }

    /// Whether `workflow` is paused, as this replica last read it.
    pub fn is_paused(&self, workflow: &str) -> bool {
        self.paused.read().contains(workflow)
    }

    /// The paused workflows, as this replica last read them.
    pub fn paused_workflows(&self) -> BTreeSet<String> {
        self.paused.read().clone()
    }

    pub(super) async fn pauses_loop(self: Arc<Self>) {
        loop {
            match self.store.paused_workflows().await {
                Ok(paused) => {
                    let resumed: Vec<String> = {
                        let mut known = self.paused.write();
                        let resumed = known.difference(&paused).cloned().collect();
                        *known = paused;
                        resumed
                    };
                    for workflow in resumed {
                        if let Err(err) = self.release_held(&workflow).await {
                            tracing::warn!(workflow, %err, "queueing the runs held while paused failed; the sweeper will");
                        }
                    }
                }
                Err(err) => tracing::warn!(%err, "reading the paused workflows failed; will retry"),
            }
            if sleep_or_cancelled(&self.shutdown, PAUSES_REFRESH).await {
                return;
            }
        }
    }

    /// Holds the run of a step claimed while its workflow is paused, instead of running it.
    /// Returns whether the step was held (the caller does not run it then either way: an entry
    /// no longer ours is someone else's).
    pub(super) async fn hold_step(&self, lease: &Lease, run: &RunId, task: &ReadyTask) -> Result<bool, StoreError> {
        let held = self.store.hold(lease, run, &task.state.workflow, task.state.created_at).await?;
        tracing::debug!(run_id = %run, workflow = %task.state.workflow, held, "step held: its workflow is paused");
        Ok(held)
    }

    /// Queues the held runs of `workflow` again, oldest first, unless it is paused (again).
    /// Returns how many were queued.
    pub(super) async fn release_held(&self, workflow: &str) -> Result<usize, StoreError> {
        let mut released = 0;
        for _ in 0..RELEASE_BATCHES {
            let runs = self.store.held_runs(workflow, RELEASE_BATCH).await?;
            if runs.is_empty() {
                break;
            }
            for run in &runs {
                if self.is_paused(workflow) {
                    return Ok(released);
                }
                // A run that ended meanwhile has nothing to queue; it leaves the set all the same.
                self.requeue(run).await?;
                self.store.release(workflow, run).await?;
                released += 1;
            }
        }
        if released > 0 {
            tracing::info!(workflow, released, "queued the runs held while the workflow was paused");
        }
        Ok(released)
    }

    /// How many runs each paused workflow holds (for `/metrics`).
    pub async fn held_counts(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut counts = Vec::new();
        for workflow in self.paused_workflows() {
            counts.push((workflow.clone(), self.store.held_count(&workflow).await?));
        }
        Ok(counts)
    }

    /// Releases the held runs of every workflow that is not paused (the sweeper's backstop).
    pub(super) async fn release_all_held(&self) -> Result<usize, StoreError> {
        let mut released = 0;
        for workflow in self.registry.iter() {
            if !self.is_paused(&workflow.def.id) {
                released += self.release_held(&workflow.def.id).await?;
            }
        }
        Ok(released)
    }
}
