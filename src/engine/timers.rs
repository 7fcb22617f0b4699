//! Durable timers: wakes runs whose retry, sleep or wait time-out is due. Every replica polls;
//! the fenced commit lets exactly one of them fire each timer.

use super::record::Recording;
use super::{Engine, sleep_or_cancelled};
use crate::machine::{self, StepStatus};
use crate::store::{RunId, StoreError};
use std::sync::Arc;
use std::time::Duration;

/// How often due timers are looked for: a timer fires within this (plus a commit) of its due
/// time.
const TIMER_POLL: Duration = Duration::from_millis(200);
/// Timers fired per shard per poll.
const TIMER_BATCH: usize = 100;

impl Engine {
    pub(super) async fn timer_loop(self: Arc<Self>) {
        let mut full = false;
        loop {
            // A full batch may have left due timers behind: look again at once.
            let stopping =
                if full { self.shutdown.is_cancelled() } else { sleep_or_cancelled(&self.shutdown, TIMER_POLL).await };
            if stopping {
                return;
            }
            let now = self.clock.now();
            match self.store.due_timers(now, TIMER_BATCH).await {
                Ok(due) => {
                    // (Not after a failure, which would be met again at once.)
                    full = due.len() >= TIMER_BATCH;
                    for run in due {
                        if let Err(err) = self.fire_timer(&run, now).await {
                            full = false;
                            tracing::warn!(run_id = %run, %err, "firing a timer failed; will retry");
                        }
                    }
                }
                Err(err) => {
                    full = false;
                    tracing::warn!(%err, "reading due timers failed; will retry");
                }
            }
        }
    }

    /// Fires every timer of `run` that is due (retries, sleeps, waits' time-outs), in one
    /// commit that also queues what comes next and keeps the run's next timer; drops the timer
    /// of a run that no longer has one due.
    async fn fire_timer(&self, run: &RunId, now: machine::Millis) -> Result<(), StoreError> {
        let recording = self
            .record_on_run(run, true, |loaded, _| {
                if loaded.state.next_timer().is_none() {
                    // No step waits on a timer any more: a commit of nothing drops the stale one.
                    return Some((Vec::new(), Vec::new()));
                }
                let fired = machine::timers_fired(&loaded.state, now);
                // None yet by the log (due by the set's score: clocks): the next poll.
                (!fired.is_empty()).then(|| {
                    let steps = fired.iter().map(|(step, _)| *step).collect::<Vec<_>>();
                    (fired.into_iter().flat_map(|(_, fired)| fired).collect(), steps)
                })
            })
            .await?;
        if let Recording::Applied { before, note: steps, .. } = recording {
            for step in steps {
                self.wait_ended(run, &before.state, step, false, now);
                if let Some(StepStatus::Waiting { event, .. }) = before.state.steps.get(&step) {
                    self.store.remove_wait(event, run).await?;
                }
            }
        }
        Ok(())
    }
}
