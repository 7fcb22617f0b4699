//! The cron scheduler. Every replica evaluates every schedule; a fire starts its run under the
//! idempotency key `cron:<workflow>:<fire ms>` in the same atomic call as the start, so it runs
//! once however many replicas there are. The schedule's shared state (last fire handled, last
//! run, buffered fire) lives in the store, which makes catch-up after downtime and the overlap
//! policy the same on every replica. Skipped and missed fires are logged and counted.

use super::{Counters, Engine, sleep_or_cancelled};
use crate::definition::schedule::{CatchUpPlan, FireDecision, decide_fire};
use crate::definition::{Overlap, Workflow};
use crate::machine::{Millis, Trigger};
use crate::store::StoreError;
use std::sync::Arc;
use std::time::Duration;

/// How often schedules are evaluated: a fire starts within this of its time.
const CRON_TICK: Duration = Duration::from_millis(250);
/// Most fires of one schedule handled per tick (a schedule firing every second that fell behind
/// catches up over a few ticks rather than in one burst).
const FIRES_PER_TICK: usize = 100;
/// Fires younger than this at start-up are not "missed": running replicas may be about to
/// handle them.
const CATCHUP_GRACE: Duration = Duration::from_secs(2);
/// Missed fires are counted up to this many per outage (counting is a walk over the schedule).
const MAX_COUNTED: usize = 100_000;

/// This replica's position in one schedule.
#[derive(Debug, Default)]
struct Cursor {
    /// Fires up to this time have been looked at by this replica (`None`: not yet started).
    checked_until: Option<Millis>,
    /// Under `skip`: fires from just before start-up, decided once their grace has passed.
    deferred: Vec<Millis>,
}

impl Engine {
    pub(super) async fn cron_loop(self: Arc<Self>) {
        let schedules: Vec<Arc<Workflow>> = self.registry.iter().filter(|w| w.schedule.is_some()).cloned().collect();
        if schedules.is_empty() {
            return;
        }
        let mut cursors: Vec<Cursor> = schedules.iter().map(|_| Cursor::default()).collect();
        loop {
            let now = self.clock.now();
            for (workflow, cursor) in schedules.iter().zip(cursors.iter_mut()) {
                if let Err(err) = self.tick_schedule(workflow, cursor, now).await {
                    tracing::warn!(workflow = %workflow.def.id, %err, "evaluating the schedule failed; will retry");
                }
            }
            if sleep_or_cancelled(&self.shutdown, CRON_TICK).await {
                return;
            }
        }
    }

    async fn tick_schedule(&self, workflow: &Workflow, cursor: &mut Cursor, now: Millis) -> Result<(), StoreError> {
        let Some(schedule) = &workflow.schedule else { return Ok(()) };
        if self.is_paused(&workflow.def.id) {
            // Nothing fires while paused; on resume the fires missed meanwhile are handled as
            // after downtime, by the workflow's catch-up policy.
            *cursor = Cursor::default();
            return Ok(());
        }
        let checked_until = &mut cursor.checked_until;
        let from = match *checked_until {
            Some(from) => from,
            None => {
                // First look since this replica started: fires missed while no replica ran.
                let (caught_up, deferred) = self.catch_up(workflow, now).await?;
                cursor.deferred = deferred;
                *checked_until = Some(caught_up);
                caught_up
            }
        };
        self.settle_deferred(workflow, &mut cursor.deferred, now).await?;
        let checked_until = &mut cursor.checked_until;
        let fires = schedule.fires_between(from, now, FIRES_PER_TICK);
        let caught_up = fires.len() < FIRES_PER_TICK;
        for fire in fires {
            self.fire(workflow, fire).await?;
            *checked_until = Some(fire);
        }
        if caught_up {
            *checked_until = Some(now);
        }
        if workflow.def.overlap == Overlap::Buffer {
            self.start_buffered(workflow).await?;
        }
        Ok(())
    }

    /// Under `skip`, fires of the last moments before start-up, once their grace has passed:
    /// one that no running replica handled by then was missed, and is skipped.
    async fn settle_deferred(
        &self,
        workflow: &Workflow,
        deferred: &mut Vec<Millis>,
        now: Millis,
    ) -> Result<(), StoreError> {
        let grace = CATCHUP_GRACE.as_millis() as u64;
        let due: Vec<Millis> = deferred.iter().copied().filter(|fire| fire + grace <= now).collect();
        if due.is_empty() {
            return Ok(());
        }
        deferred.retain(|fire| fire + grace > now);
        let id = &workflow.def.id;
        let handled = self.store.cron_state(id).await?.last_fire;
        let missed: Vec<Millis> = due.into_iter().filter(|fire| handled.is_none_or(|last| last < *fire)).collect();
        if let Some(newest) = missed.last() {
            tracing::warn!(workflow = %id, missed = missed.len(), last = %crate::machine::timestamp(*newest), "fires missed while no replica ran are not started (catch-up policy skip)");
            self.counters.cron_missed.fetch_add(missed.len() as u64, std::sync::atomic::Ordering::Relaxed);
            self.store.cron_advance(id, *newest, None).await?;
        }
        Ok(())
    }

    /// Applies the catch-up policy to fires missed since the last one any replica handled;
    /// returns the time from which the normal path takes over, and (under `skip`) the fires too
    /// recent to call missed yet.
    async fn catch_up(&self, workflow: &Workflow, now: Millis) -> Result<(Millis, Vec<Millis>), StoreError> {
        let Some(schedule) = &workflow.schedule else { return Ok((now, Vec::new())) };
        let id = &workflow.def.id;
        let Some(last) = self.store.cron_state(id).await?.last_fire else {
            // Never fired anywhere: nothing was missed.
            return Ok((now, Vec::new()));
        };
        let CatchUpPlan { run, skipped_until, deferred } =
            schedule.plan_catch_up(workflow.def.catchup, workflow.def.catchup_window, last, now, CATCHUP_GRACE);
        if let Some(skipped_until) = skipped_until {
            let skipped = schedule.fires_between(last, skipped_until, MAX_COUNTED).len();
            tracing::warn!(
                workflow = %id,
                missed = skipped,
                first = %schedule.next_after(last).map(crate::machine::timestamp).unwrap_or_default(),
                last = %crate::machine::timestamp(skipped_until),
                policy = ?workflow.def.catchup,
                "fires missed while no replica ran are not started (catch-up policy)"
            );
            self.counters.cron_missed.fetch_add(skipped as u64, std::sync::atomic::Ordering::Relaxed);
            self.store.cron_advance(id, skipped_until, None).await?;
        }
        for fire in &run {
            tracing::info!(workflow = %id, fire = %crate::machine::timestamp(*fire), "catching up a missed fire");
            self.fire(workflow, *fire).await?;
        }
        Ok((now, deferred))
    }

    /// Handles one fire: skips it if another replica already did, applies the overlap policy,
    /// or starts its run.
    async fn fire(&self, workflow: &Workflow, fire: Millis) -> Result<(), StoreError> {
        let id = &workflow.def.id;
        let state = self.store.cron_state(id).await?;
        if state.last_fire.is_some_and(|last| last >= fire) {
            return Ok(()); // handled by another replica
        }
        let previous_active =
            workflow.def.overlap != Overlap::Allow && self.previous_run_active(state.last_run.as_deref()).await?;
        let decision = decide_fire(workflow.def.overlap, previous_active, state.buffered.is_some());
        if decision != FireDecision::Start {
            // Only the replica whose record moves the last fire forward logs and counts the
            // decision: replicas deciding at the same moment decide alike, once. (A buffered fire
            // is kept before the record, so that a crash in between cannot lose it.)
            let buffered = decision == FireDecision::Buffer;
            if buffered {
                self.store.cron_buffer(id, Some(fire)).await?;
            }
            if self.store.cron_advance(id, fire, None).await? {
                if buffered {
                    tracing::info!(workflow = %id, fire = %crate::machine::timestamp(fire), "previous run still active: fire buffered");
                } else {
                    Counters::add(&self.counters.cron_skipped);
                    tracing::warn!(workflow = %id, fire = %crate::machine::timestamp(fire), previous = ?state.last_run, "previous run still active: fire skipped (overlap policy)");
                }
            }
            return Ok(());
        }
        self.start_fire(workflow, fire).await
    }

    async fn start_fire(&self, workflow: &Workflow, fire: Millis) -> Result<(), StoreError> {
        let id = &workflow.def.id;
        let input = serde_json::json!({ "fireTime": crate::machine::timestamp(fire) });
        let key = format!("cron:{id}:{fire}");
        let triggered = match self.trigger(id, &input, Some(&key), Trigger::Cron { fire_at: fire }).await {
            Ok(triggered) => triggered,
            Err(super::EngineError::Store(err)) => return Err(err),
            Err(other) => {
                tracing::error!(workflow = %id, error = %other, "a cron fire could not start its run");
                return Ok(());
            }
        };
        if !triggered.duplicate {
            Counters::add(&self.counters.cron_fires);
            tracing::info!(workflow = %id, fire = %crate::machine::timestamp(fire), run_id = %triggered.run_id, "cron fire started a run");
        }
        self.store.cron_advance(id, fire, Some(&triggered.run_id)).await?;
        Ok(())
    }

    /// Starts the buffered fire once the previous run has ended.
    async fn start_buffered(&self, workflow: &Workflow) -> Result<(), StoreError> {
        let state = self.store.cron_state(&workflow.def.id).await?;
        let Some(fire) = state.buffered else { return Ok(()) };
        if self.previous_run_active(state.last_run.as_deref()).await? {
            return Ok(());
        }
        self.store.cron_buffer(&workflow.def.id, None).await?;
        self.start_fire(workflow, fire).await
    }

    async fn previous_run_active(&self, run: Option<&str>) -> Result<bool, StoreError> {
        let Some(run) = run.and_then(|r| r.parse().ok()) else { return Ok(false) };
        Ok(self.store.summary(&run).await?.is_some_and(|s| !s.status.is_terminal()))
    }

    /// The next fire of a workflow's schedule after now.
    pub fn next_fire(&self, workflow: &Workflow) -> Option<Millis> {
        workflow.schedule.as_ref()?.next_after(self.clock.now())
    }

    /// The next `count` fires of a workflow's schedule after now (none without a schedule).
    pub fn next_fires(&self, workflow: &Workflow, count: usize) -> Vec<Millis> {
        let Some(schedule) = workflow.schedule.as_ref() else { return Vec::new() };
        let mut fires = Vec::with_capacity(count);
        let mut after = self.clock.now();
        while fires.len() < count {
            match schedule.next_after(after) {
                Some(fire) if fire > after => {
                    fires.push(fire);
                    after = fire;
                }
                _ => break,
            }
        }
        fires
    }
}
