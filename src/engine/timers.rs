//! Durable timers: wakes runs whose retry, sleep or wait time-out is due. Every replica polls;
//! the fenced commit lets exactly one of them fire each timer.

use super::{Engine, sleep_or_cancelled};
use crate::machine::{self, StepStatus, Transition};
use crate::store::{Commit, RunId, StoreError};
use std::sync::Arc;
use std::time::Duration;

/// How often due timers are looked for: a timer fires within this (plus a commit) of its due
/// time.
const TIMER_POLL: Duration = Duration::from_millis(200);
/// Timers fired per shard per poll.
const TIMER_BATCH: usize = 100;

impl Engine {
    pub(super) async fn timer_loop(self: Arc<Self>) {
        loop {
            if sleep_or_cancelled(&self.shutdown, TIMER_POLL).await {
                return;
            }
            let now = self.clock.now();
            match self.store.due_timers(now, TIMER_BATCH).await {
                Ok(due) => {
                    for run in due {
                        if let Err(err) = self.fire_timer(&run, now).await {
                            tracing::warn!(run_id = %run, %err, "firing a timer failed; will retry");
                        }
                    }
                }
                Err(err) => tracing::warn!(%err, "reading due timers failed; will retry"),
            }
        }
    }

    /// Fires every timer of `run` that is due (retries, sleeps, waits' time-outs), in one
    /// commit that also queues what comes next and keeps the run's next timer.
    async fn fire_timer(&self, run: &RunId, now: machine::Millis) -> Result<(), StoreError> {
        let Some(super::LoadedRun { state, workflow, .. }) = self.load_for_loop(run).await? else { return Ok(()) };
        if state.next_timer().is_none() {
            // The run no longer waits on a timer: drop the stale one.
            let commit = Commit {
                run: run.clone(),
                expected_seq: state.seq,
                lease: None,
                records: Vec::new(),
                state,
                dispatch: Vec::new(),
                timer: None,
                clear_timer: true,
            };
            self.store.commit(commit).await?;
            return Ok(());
        }
        let fired = machine::timers_fired(&state, now);
        if fired.is_empty() {
            // Due by the set's score, not yet by the log: clocks; next poll.
            return Ok(());
        }
        let happened =
            fired.iter().flat_map(|(_, fired)| fired.iter().map(|t| self.recorded(now, t.clone()))).collect();
        let advanced = machine::advance(Some(&state), &workflow.def, happened, now)
            .map_err(|err| StoreError::Corrupt { key: run.to_string(), problem: err.to_string() })?;
        if let crate::store::CommitOutcome::Applied { .. } =
            self.commit_advanced(run, state.seq, None, advanced, true).await?
        {
            for (step, _) in &fired {
                self.wait_ended(run, &state, *step, false, now);
                if let Some(StepStatus::Waiting { event, .. }) = state.steps.get(step) {
                    self.store.remove_wait(event, run).await?;
                }
            }
        }
        Ok(())
    }

    /// Records `happened` (a parked step's wake-up and completion) on `state` in one commit that
    /// also queues what comes next.
    pub(super) async fn wake(
        &self,
        run: &RunId,
        state: &machine::RunState,
        workflow: &crate::definition::Workflow,
        happened: Vec<Transition>,
        now: machine::Millis,
    ) -> Result<crate::store::CommitOutcome, StoreError> {
        let happened = happened.into_iter().map(|t| self.recorded(now, t)).collect();
        let advanced = machine::advance(Some(state), &workflow.def, happened, now)
            .map_err(|err| StoreError::Corrupt { key: run.to_string(), problem: err.to_string() })?;
        self.commit_advanced(run, state.seq, None, advanced, true).await
    }
}
