//! Durable timers: wakes runs whose retry is due. Every replica polls; the fenced commit lets
//! exactly one of them fire each timer.

use super::{Engine, sleep_or_cancelled};
use crate::machine::{self, Status, Transition};
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

    async fn fire_timer(&self, run: &RunId, now: machine::Millis) -> Result<(), StoreError> {
        let Some(super::LoadedRun { state, workflow, .. }) = self.load_for_loop(run).await? else { return Ok(()) };
        match state.status {
            Status::Retrying { step, attempt, due } if due <= now => {
                let fired = self.recorded(now, Transition::TimerFired { step, attempt });
                let advanced = machine::advance(Some(&state), &workflow.def, vec![fired], now)
                    .map_err(|err| StoreError::Corrupt { key: run.to_string(), problem: err.to_string() })?;
                if let crate::store::CommitOutcome::Applied { .. } =
                    self.commit_advanced(run, state.seq, None, advanced, true).await?
                {
                    self.wait_ended(run, &state, false, now);
                }
            }
            Status::Sleeping { step, attempt, until } if until <= now => {
                let output = serde_json::json!({ "sleptUntil": crate::machine::timestamp(until) }).to_string();
                self.wake(run, &state, &workflow, Transition::TimerFired { step, attempt }, output, now).await?;
            }
            Status::Waiting { step, attempt, ref event, until } if until <= now => {
                // The wait timed out: the step completes saying so, and later steps may branch
                // on it (`when = "${steps.<id>.timedOut}"`).
                let event = event.clone();
                let output = serde_json::json!({ "timedOut": true, "event": null }).to_string();
                self.wake(run, &state, &workflow, Transition::TimerFired { step, attempt }, output, now).await?;
                self.store.remove_wait(&event, run).await?;
            }
            // Due by the set's score, not yet by the log: clocks; next poll.
            Status::Retrying { .. } | Status::Sleeping { .. } | Status::Waiting { .. } => {}
            _ => {
                // The run no longer waits on a timer: drop the stale one.
                let commit = Commit {
                    run: run.clone(),
                    expected_seq: state.seq,
                    lease: None,
                    records: Vec::new(),
                    state,
                    dispatch: None,
                    timer: None,
                    clear_timer: true,
                };
                self.store.commit(commit).await?;
            }
        }
        Ok(())
    }

    /// Wakes a parked step (`woke`: its timer or its event) and completes it with `output`, in
    /// one commit that also queues what comes next.
    pub(super) async fn wake(
        &self,
        run: &RunId,
        state: &machine::RunState,
        workflow: &crate::definition::Workflow,
        woke: Transition,
        output: String,
        now: machine::Millis,
    ) -> Result<crate::store::CommitOutcome, StoreError> {
        let Some((step, attempt)) = woke.step_attempt() else {
            return Err(StoreError::Corrupt { key: run.to_string(), problem: "a wake-up without a step".to_owned() });
        };
        let by_event = matches!(woke, Transition::EventReceived { .. });
        let happened =
            vec![self.recorded(now, woke), self.recorded(now, Transition::StepCompleted { step, attempt, output })];
        let advanced = machine::advance(Some(state), &workflow.def, happened, now)
            .map_err(|err| StoreError::Corrupt { key: run.to_string(), problem: err.to_string() })?;
        let committed = self.commit_advanced(run, state.seq, None, advanced, true).await?;
        if let crate::store::CommitOutcome::Applied { .. } = committed {
            self.wait_ended(run, state, by_event, now);
        }
        Ok(committed)
    }
}
