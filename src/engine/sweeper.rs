//! Belt and braces: finds runs whose state says they are running (or retrying) but that have
//! neither a queued or leased ready entry (nor a timer), and re-queues them from their own log.
//! Also recalibrates the clock, trims streams and expires finished runs.

use super::executor::CommitPath;
use super::{Counters, Engine, sleep_or_cancelled};
use crate::machine::{self, Status};
use crate::store::{CommitOutcome, RunId, RunSummary, StoreError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Runs examined per shard per pass.
const SWEEP_BATCH: usize = 200;
/// Housekeeping (trimming, expiry) runs every this many sweeps.
const HOUSEKEEPING_EVERY: u32 = 4;

impl Engine {
    pub(super) async fn sweeper_loop(self: Arc<Self>) {
        let period = self.config.lease_ttl.clamp(Duration::from_secs(1), Duration::from_secs(30));
        let mut passes = 0u32;
        loop {
            if sleep_or_cancelled(&self.shutdown, period.mul_f64(rand::random_range(0.8..1.2))).await {
                return;
            }
            passes += 1;
            if let Err(err) = self.calibrate_clock().await {
                tracing::warn!(%err, "reading the store's clock failed");
                continue;
            }
            if let Err(err) = self.sweep().await {
                tracing::warn!(%err, "sweeping for orphaned runs failed; will retry");
            }
            if let Err(err) = self.sweep_rates().await {
                tracing::warn!(%err, "letting runs in under their rate limits failed; will retry");
            }
            if passes.is_multiple_of(HOUSEKEEPING_EVERY) {
                let retain_until = self.clock.now().saturating_sub(self.config.run_retention.as_millis() as u64);
                let started = Instant::now();
                match self.store.housekeeping(retain_until).await {
                    Ok(report) => tracing::debug!(?report, took = ?started.elapsed(), "housekeeping"),
                    Err(err) => tracing::warn!(%err, "housekeeping failed; will retry"),
                }
            }
        }
    }

    /// One pass over quiet runs.
    pub async fn sweep(&self) -> Result<usize, StoreError> {
        // A run is only suspect once it has been quiet for longer than a lease could hide it.
        let quiet_for = self.config.lease_ttl * 2 + Duration::from_secs(1);
        let before = self.clock.now().saturating_sub(quiet_for.as_millis() as u64);
        let mut requeued = 0;
        // Runs held while their workflow was paused, whose workflow is not paused any more.
        requeued += self.release_all_held().await?;
        // Slots of runs that ended without giving them back; free slots with runs waiting.
        requeued += self.sweep_slots().await?;
        for (run, summary) in self.store.quiet_runs(before, SWEEP_BATCH).await? {
            // A paused workflow's runs are held on purpose: their steps have no live entry; so
            // are the runs of a limited workflow that wait for a slot (`sweep_slots` looks after
            // those that hold one).
            let limited = self.registry.get(&summary.workflow).is_some_and(|w| w.def.concurrency.is_some());
            if self.is_paused(&summary.workflow) || (limited && summary.status == Status::Pending) {
                continue;
            }
            // A run shows `waiting` when nothing else of it is busy; a step of a `running` one
            // may wait too.
            if matches!(summary.status, Status::Waiting | Status::Running) {
                self.register_wait(&run).await?;
            }
            // A cheap first look from reads that are not one snapshot; the re-queue itself is
            // refused by the store when the run's entry is live after all.
            if self.is_orphan(&run, &summary).await? && self.requeue(&run).await? {
                // The step's id, for the log line, from the (cached) definition.
                let step = match summary.step {
                    Some(index) => self
                        .definition(run.shard, &summary.definition)
                        .await
                        .ok()
                        .and_then(|workflow| workflow.def.steps.get(index as usize).map(|s| s.id.clone())),
                    None => None,
                };
                tracing::warn!(run_id = %run, workflow = %summary.workflow, step = step.as_deref(), attempt = summary.attempt, status = summary.status.name(), "run had no queued step, no lease and no timer: re-queued it");
                Counters::add(&self.counters.runs_swept);
                requeued += 1;
            }
        }
        Ok(requeued)
    }

    pub(super) async fn is_orphan(&self, run: &RunId, summary: &RunSummary) -> Result<bool, StoreError> {
        match summary.status {
            Status::Pending | Status::Running => {
                for entry in &summary.ready_entries {
                    if self.store.dispatch_exists(run, entry).await? {
                        return Ok(false);
                    }
                }
                Ok(true)
            }
            Status::Retrying | Status::Sleeping | Status::Waiting => Ok(!self.store.has_timer(run).await?),
            Status::Completed | Status::Failed | Status::Cancelled | Status::TimedOut => Ok(false),
        }
    }

    /// Registers a waiting run for its event again (idempotent): the registration is written
    /// after the commit that parks the run, so a crash in between could lose it. Wakes the
    /// steps whose child runs ended (their wake-up may have been lost the same way). A run of an
    /// older definition may wait for a type no workflow of the registry waits for, which the
    /// router then does not look up: such a run looks back over the bus for its event here.
    async fn register_wait(&self, run: &RunId) -> Result<(), StoreError> {
        let Some(loaded) = self.load_for_loop(run).await? else { return Ok(()) };
        self.wake_for_ended_children(run, &loaded.state).await?;
        for (event, until) in loaded.state.waits() {
            self.store.add_wait(event, run, until).await?;
            if !self.awaited_types.contains(event) {
                self.look_back_for(run, event, loaded.state.created_at).await?;
            }
        }
        Ok(())
    }

    /// Re-derives a run's effects from its log and performs them again, fenced by its seq and
    /// refused while its ready entry is live. Returns whether it re-queued.
    pub(super) async fn requeue(&self, run: &RunId) -> Result<bool, StoreError> {
        let Some(super::LoadedRun { state, workflow, .. }) = self.load_for_loop(run).await? else { return Ok(false) };
        let now = self.clock.now();
        let mut advanced = machine::advance(Some(&state), &workflow.def, Vec::new(), now)
            .map_err(|err| StoreError::Corrupt { key: run.to_string(), problem: err.to_string() })?;
        // Every step the run has queued, not only those a transition just queued: none of its
        // entries is live.
        advanced.effects = machine::next(&advanced.state, &workflow.def, now);
        // The summary the sweeper judged from may be older than the log: a run that has ended
        // since implies nothing to record or perform again.
        let performs = |effect: &machine::Effect| {
            matches!(effect, machine::Effect::Dispatch { .. } | machine::Effect::SetTimer { .. })
        };
        if advanced.appended.is_empty() && !advanced.effects.iter().any(performs) {
            return Ok(false);
        }
        let outcome = self.commit_advanced(run, state.seq, None, advanced, false, CommitPath::Requeue).await?;
        Ok(matches!(outcome, CommitOutcome::Applied { .. }))
    }
}
