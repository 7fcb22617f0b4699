//! Executors: claim ready steps, run them under a renewed lease, commit each outcome as one
//! fenced transition; take over steps whose lease expired.

use super::{Counters, Engine, backoff, sleep_or_cancelled};
use crate::actions::{self, StepContext};
use crate::machine::{self, Effect, Transition};
use crate::store::{Claimed, Commit, CommitOutcome, Lease, ReadyTask, RunId, StepCommit, StoreError};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Which of the store's commit calls a commit goes through.
#[derive(Debug)]
pub(super) enum CommitPath<'a> {
    /// The replica's group commit (see `commits`): a step's outcome, with its lease. While
    /// `next` is empty and the replica is not stopping, the call also claims the executor's next
    /// step into it.
    Grouped { next: &'a mut Option<Claimed> },
    /// [`crate::store::Runs::requeue`]: the sweeper's, refused when the run's entry is live.
    Requeue,
    /// [`crate::store::Runs::commit`] of a decision its caller makes again when it is stale
    /// (`record::record_on_run`).
    Decided,
}

/// How often a step's outcome is applied again on its run's new state after losing the
/// sequence compare to another transition of the run, before it is given up.
const REAPPLY_LIMIT: usize = 3;

/// The longest wait between two looks for steps whose lease expired (see `claim_loop`).
const RECLAIM_EVERY: Duration = Duration::from_millis(400);
/// How long one blocking read waits for work before looking at the shutdown token again.
const CLAIM_BLOCK: Duration = Duration::from_secs(1);

impl Engine {
    /// Claims ready steps for the free executors and, every half lease period (at most
    /// [`RECLAIM_EVERY`]), first takes over steps whose lease expired. Both are done here
    /// because this loop holds every free executor's permit while its read blocks: a separate
    /// reclaim loop asking for free permits would nearly always find none and never take
    /// anything over on an idle replica.
    pub(super) async fn claim_loop(self: Arc<Self>) {
        let mut failures = 0u32;
        // A step whose replica died is taken over at most one period (and its jitter) after its
        // lease expired: a short period bounds that wait, whatever `LEASE_TTL`, for a few cheap
        // calls a second (an `XAUTOCLAIM` per shard that finds nothing idle costs microseconds).
        let reclaim_every = (self.config.lease_ttl / 2).clamp(Duration::from_millis(100), RECLAIM_EVERY);
        let next_reclaim = || {
            let at = Instant::now() + reclaim_every.mul_f64(rand::random_range(0.8..1.2));
            *self.reclaim_due.lock() = at;
            at
        };
        let mut reclaim_at = next_reclaim();
        loop {
            // Hold permits first, then claim only as many entries as permits held.
            let first = tokio::select! {
                biased; // once stopping, start no new read even if a permit is free
                () = self.shutdown.cancelled() => return,
                permit = Arc::clone(&self.executors).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let mut permits = vec![first];
            while let Ok(permit) = Arc::clone(&self.executors).try_acquire_owned() {
                permits.push(permit);
            }
            if Instant::now() >= reclaim_at {
                reclaim_at = next_reclaim();
                self.reclaim_expired(&mut permits).await;
                if permits.is_empty() {
                    continue;
                }
            }
            // Block no longer than until the next reclaim is due (and never 0: BLOCK 0 is forever).
            let block =
                CLAIM_BLOCK.min(reclaim_at.saturating_duration_since(Instant::now())).max(Duration::from_millis(1));
            if self.shutdown.is_cancelled() {
                return;
            }
            // Not raced against shutdown: a blocking read that was sent stays blocked in Redis
            // after its future is dropped, and whatever Redis delivers to it then is pending under
            // this consumer yet run by no one until its lease expires. The read returns within
            // `block`; what it brings is run within the grace period like any in-flight step.
            let claimed = self.store.claim(&self.consumer, permits.len(), block).await;
            match claimed {
                Ok(claimed) => {
                    failures = 0;
                    self.spawn_steps(claimed, &mut permits, false);
                }
                Err(err) => {
                    failures += 1;
                    tracing::warn!(%err, "claiming ready steps failed; retrying");
                    drop(permits);
                    if sleep_or_cancelled(&self.shutdown, backoff(failures)).await {
                        return;
                    }
                }
            }
        }
    }

    /// `took_over`: the entries were reclaimed from a replica whose lease expired.
    fn spawn_steps(self: &Arc<Self>, claimed: Vec<Claimed>, permits: &mut Vec<OwnedSemaphorePermit>, took_over: bool) {
        for entry in claimed {
            let Ok(task) = entry.task else { continue }; // dead-lettered by the store
            let permit = permits.pop();
            let engine = Arc::clone(self);
            self.tasks.spawn(async move {
                // A read may bring a few more entries than free executors (see `ReadySteps::claim`):
                // those wait here for the next free one, their leases renewed meanwhile.
                let permit = match permit {
                    Some(permit) => permit,
                    None => {
                        engine
                            .in_flight
                            .lock()
                            .insert(entry.lease.clone(), (engine.abort_steps.child_token(), tracing::Span::none()));
                        engine.waiting_for_executor.fetch_add(1, Ordering::SeqCst);
                        let permit = Arc::clone(&engine.executors).acquire_owned().await;
                        engine.waiting_for_executor.fetch_sub(1, Ordering::SeqCst);
                        engine.in_flight.lock().remove(&entry.lease);
                        match permit {
                            Ok(permit) => permit,
                            Err(_) => return,
                        }
                    }
                };
                let busy = engine.metrics.executor_busy();
                // A step's commit may bring this executor's next step (`CommitPath::Grouped`):
                // it runs here, on the same permit, without a read of its own.
                let (mut lease, mut deliveries, mut task, mut took_over) =
                    (entry.lease, entry.deliveries, task, took_over);
                loop {
                    let mut next = None;
                    engine.execute(lease, deliveries, task, took_over, &mut next).await;
                    let Some(Claimed { lease: next_lease, deliveries: next_deliveries, task: Ok(next_task) }) = next
                    else {
                        break; // none, or dead-lettered by the store
                    };
                    (lease, deliveries, task, took_over) = (next_lease, next_deliveries, next_task, false);
                }
                drop(busy);
                drop(permit);
            });
        }
    }

    /// Renews the leases of every step executing here, a few times per lease period; a lease
    /// found lost aborts its step (the fence would reject its completion anyway). Keeps renewing
    /// through the shutdown grace period, until the last step here has finished.
    pub(super) async fn renew_loop(self: Arc<Self>) {
        let period = self.config.lease_ttl / 3;
        let mut last_renewal = std::time::Instant::now();
        loop {
            let stopping = self.shutdown.is_cancelled();
            // Every permit back means no step runs here and no read can still bring one (the
            // claim loop holds permits while it reads).
            if stopping && self.executors.available_permits() == self.config.max_concurrent_steps {
                return;
            }
            let wait = if stopping { Duration::from_millis(100) } else { period };
            if !stopping {
                sleep_or_cancelled(&self.shutdown, wait).await;
            } else {
                tokio::time::sleep(wait).await;
            }
            if last_renewal.elapsed() < period {
                continue;
            }
            last_renewal = std::time::Instant::now();
            let leases: Vec<Lease> = self.in_flight.lock().keys().cloned().collect();
            if leases.is_empty() {
                continue;
            }
            match self.store.renew(&leases).await {
                Ok(lost) => {
                    let in_flight = self.in_flight.lock();
                    for lease in lost {
                        if let Some((token, span)) = in_flight.get(&lease) {
                            tracing::warn!(parent: span, entry = %lease.entry, shard = lease.shard, "lease lost: another replica took the step over; aborting it here");
                            token.cancel();
                        }
                    }
                }
                Err(err) => tracing::warn!(%err, "renewing leases failed; will retry"),
            }
        }
    }

    /// Takes over steps whose lease expired (their replica died or stalled), as many as `permits`.
    async fn reclaim_expired(self: &Arc<Self>, permits: &mut Vec<OwnedSemaphorePermit>) {
        match self.store.reclaim(&self.consumer, self.config.lease_ttl, permits.len()).await {
            Ok(claimed) => {
                for _ in &claimed {
                    Counters::add(&self.counters.steps_reclaimed);
                }
                // Each is logged in its step's span, once its step is known.
                self.spawn_steps(claimed, permits, true);
            }
            Err(err) => tracing::warn!(%err, "reclaiming expired leases failed; will retry"),
        }
    }

    /// Runs one claimed step and commits its outcome; the commit may claim the executor's next
    /// step into `next`.
    async fn execute(
        self: &Arc<Self>,
        lease: Lease,
        deliveries: u64,
        task: ReadyTask,
        took_over: bool,
        next: &mut Option<Claimed>,
    ) {
        let run: RunId = match task.run.parse() {
            Ok(run) => run,
            Err(problem) => {
                tracing::error!(run_id = %task.run, workflow = %task.state.workflow, %problem, "ready entry names no valid run; dropping it");
                let _ = self.store.ack(&lease).await;
                return;
            }
        };
        if self.is_paused(&task.state.workflow) {
            if let Err(err) = self.hold_step(&lease, &run, &task).await {
                tracing::warn!(run_id = %run, %err, "holding a step of a paused workflow failed; it will be claimed again after its lease expires");
            }
            return;
        }
        // Read before the span is made, so that the span gets every field at once: a field
        // recorded later costs the JSON log format a second encoding of them all.
        let workflow = match self.definition(run.shard, &task.state.definition).await {
            Ok(workflow) => workflow,
            Err(err) => {
                tracing::warn!(run_id = %run, workflow = %task.state.workflow, %err, "step not started: its definition cannot be read; it will be retried after its lease expires");
                return;
            }
        };
        match self.admit_limited(&lease, &run, &task.state, &workflow.def).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(err) => {
                tracing::warn!(run_id = %run, %err, "admitting a step under its workflow's rate or concurrency limit failed; it will be claimed again after its lease expires");
                return;
            }
        }
        let span = step_span(&run, &task, &workflow);
        // Before the span is first entered: that is when its OpenTelemetry span starts.
        let trace = self.attempt_trace(&span, task.state.trace.as_ref());
        if took_over {
            span.in_scope(|| {
                tracing::info!(entry = %lease.entry, shard = lease.shard, deliveries, "took over a step whose lease expired");
            });
        }
        let result =
            self.execute_step(&run, &lease, deliveries, task, &workflow, trace, next).instrument(span.clone()).await;
        if let Err(err) = result {
            // The entry stays pending: after the lease expires another replica (or this one)
            // takes it over, up to the delivery bound.
            span.in_scope(|| tracing::warn!(%err, "step not committed; it will be retried after its lease expires"));
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn execute_step(
        self: &Arc<Self>,
        run: &RunId,
        lease: &Lease,
        deliveries: u64,
        task: ReadyTask,
        workflow: &crate::definition::Workflow,
        trace: Option<crate::machine::TraceContext>,
        next: &mut Option<Claimed>,
    ) -> Result<(), StoreError> {
        let (step, attempt) = (task.step, task.attempt);
        let Some(step_def) = workflow.def.steps.get(step as usize) else {
            return Err(StoreError::Corrupt {
                key: run.to_string(),
                problem: format!("step {step} is not in the definition"),
            });
        };
        tracing::debug!(deliveries, "step started");
        let started_at = self.clock.now();
        let outcome = if let Some(failure) =
            machine::delivery_limit(&workflow.def, step, deliveries, self.config.max_deliveries)
        {
            Err(actions::ActionError { message: failure.error, retryable: failure.retryable })
        } else {
            // Earlier outputs only when the step's templates name them: a read of the log.
            let steps = if actions::Actions::needs_outputs(step_def) {
                self.outputs(run, workflow).await?
            } else {
                Default::default()
            };
            let context = StepContext {
                step,
                run_id: task.run.clone(),
                workflow_id: workflow.def.id.clone(),
                step_id: step_def.id.clone(),
                attempt,
                input: task.state.input.clone(),
                steps,
                trigger: task.state.trigger.to_json(),
                trace,
            };
            let cancel = self.abort_steps.child_token();
            self.in_flight.lock().insert(lease.clone(), (cancel.clone(), tracing::Span::current()));
            let result = self.run_with_timeout(step_def, &context, cancel).await;
            self.in_flight.lock().remove(lease);
            result
        };
        let now = self.clock.now();
        self.metrics.step_took(&workflow.def.id, std::time::Duration::from_millis(now.saturating_sub(started_at)));
        let mut parked_on = None;
        let mut started_child = None;
        let span = tracing::Span::current();
        let finished = match outcome {
            Ok(actions::Outcome::Skipped) => {
                tracing::debug!("step skipped: its condition is false");
                self.attempt_ended(&span, "skipped", None);
                Transition::StepSkipped { step, attempt }
            }
            Ok(actions::Outcome::Done(output)) => {
                Counters::add(&self.counters.steps_completed);
                tracing::debug!("step completed");
                self.attempt_ended(&span, "completed", None);
                Transition::StepCompleted { step, attempt, output }
            }
            Ok(actions::Outcome::Child { run_id }) => {
                tracing::debug!(child = %run_id, "step waits for its child run");
                self.attempt_ended(&span, "waiting", None);
                started_child = run_id.parse::<RunId>().ok();
                Transition::ChildStarted { step, attempt, child: run_id }
            }
            Ok(actions::Outcome::Park { until, event }) => {
                tracing::debug!(until, event = event.as_deref(), "step parked");
                self.attempt_ended(&span, if event.is_some() { "waiting" } else { "sleeping" }, None);
                parked_on = event.clone().map(|event| (event, until));
                Transition::StepSuspended { step, attempt, until, event }
            }
            Err(err) => {
                Counters::add(&self.counters.steps_failed);
                let jitter = rand::random_range(-1.0..=1.0);
                let failure = machine::Failure { error: err.message, retryable: err.retryable };
                machine::attempt_failed(&workflow.def, &task.state, step, attempt, failure, now, jitter)
            }
        };
        if let Transition::StepFailed { error, retry_at, .. } = &finished {
            tracing::info!(%error, retrying = retry_at.is_some(), "step failed");
            self.attempt_ended(&span, if retry_at.is_some() { "retrying" } else { "failed" }, Some(error));
        }
        let happened =
            vec![self.recorded(started_at, Transition::StepStarted { step, attempt }), self.recorded(now, finished)];
        let created_at = task.state.created_at;
        let outcome = self.commit_outcome(run, lease, task.state, workflow, happened, now, next).await?;
        if let (Some(child), CommitOutcome::Applied { .. }) = (&started_child, &outcome) {
            self.wake_if_child_ended(run, step, attempt, child).await?;
        }
        if let (Some((event, until)), CommitOutcome::Applied { .. }) = (parked_on, outcome) {
            // Found by the router when the event arrives. Not atomic with the commit: the
            // sweeper registers a waiting run again if this is lost.
            self.store.add_wait(&event, run, until).await?;
            // An event that came after the run started and before this registration was not
            // seen by the router for this run: look for it.
            self.look_back_for(run, &event, created_at).await?;
        }
        Ok(())
    }

    /// Commits what a step's attempt recorded (`happened`) on the state it was queued with. When
    /// the run moved on meanwhile (another transition of it was committed first), the outcome is
    /// applied again on the run's new state, not executed again: if the machine still takes it
    /// (a sibling's completion), it is committed there, under the same lease; if not (the run
    /// was cancelled, or ended), it is discarded and the entry acknowledged.
    #[allow(clippy::too_many_arguments)]
    async fn commit_outcome(
        &self,
        run: &RunId,
        lease: &Lease,
        queued: machine::RunState,
        workflow: &crate::definition::Workflow,
        happened: Vec<machine::Recorded>,
        now: machine::Millis,
        next: &mut Option<Claimed>,
    ) -> Result<CommitOutcome, StoreError> {
        let mut state = queued;
        let mut reapplied = 0;
        loop {
            let advanced = match machine::advance(Some(&state), &workflow.def, happened.clone(), now) {
                Ok(advanced) => advanced,
                Err(invalid) if reapplied == 0 => {
                    // The queued state itself cannot take this outcome: never loop on it.
                    tracing::error!(%invalid, "step outcome does not apply to the queued state; dropping the entry");
                    self.store.ack(lease).await?;
                    return Ok(CommitOutcome::Stale);
                }
                Err(_) => return self.discard_moved_on(run, Some(lease), &state.workflow).await,
            };
            let path = CommitPath::Grouped { next: &mut *next };
            let outcome = self.commit_advanced(run, state.seq, Some(lease.clone()), advanced, false, path).await?;
            if outcome != CommitOutcome::Stale {
                return Ok(outcome);
            }
            if reapplied == REAPPLY_LIMIT {
                return self.discard_moved_on(run, Some(lease), &state.workflow).await;
            }
            reapplied += 1;
            match self.load_for_loop(run).await? {
                Some(loaded) => state = loaded.state,
                None => return self.discard_moved_on(run, Some(lease), &state.workflow).await,
            }
        }
    }

    /// The run moved on while the step ran (cancelled, or already advanced by another replica):
    /// this work is obsolete. The entry, if there is one, is acknowledged if it is still ours,
    /// so that it is not delivered again.
    async fn discard_moved_on(
        &self,
        run: &RunId,
        lease: Option<&Lease>,
        workflow: &str,
    ) -> Result<CommitOutcome, StoreError> {
        Counters::add(&self.counters.completions_fenced);
        tracing::info!(run_id = %run, workflow = %workflow, "run moved on while the step ran; discarding the outcome");
        if let Some(lease) = lease {
            self.store.ack(lease).await?;
        }
        Ok(CommitOutcome::Stale)
    }

    /// The outputs of a run's completed (or reused) steps, by step id.
    pub(super) async fn outputs(
        &self,
        run: &RunId,
        workflow: &crate::definition::Workflow,
    ) -> Result<serde_json::Map<String, serde_json::Value>, StoreError> {
        let mut outputs = serde_json::Map::new();
        let Some(log) = self.store.history(run).await? else { return Ok(outputs) };
        for entry in &log {
            if let Some((step, output)) = machine::output_of(&entry.recorded.transition)
                && let Some(def) = workflow.def.steps.get(step as usize)
            {
                let value =
                    serde_json::from_str(output).unwrap_or_else(|_| serde_json::Value::String(output.to_owned()));
                outputs.insert(def.id.clone(), value);
            }
        }
        Ok(outputs)
    }

    /// Commits an advanced state (its transitions, and the effects they imply) through one of
    /// the store's commit calls (see [`CommitPath`]).
    pub(super) async fn commit_advanced(
        &self,
        run: &RunId,
        expected_seq: u64,
        lease: Option<Lease>,
        advanced: machine::Advanced,
        clear_timer: bool,
        path: CommitPath<'_>,
    ) -> Result<CommitOutcome, StoreError> {
        let dispatch = crate::store::Dispatch::of_effects(&advanced.effects);
        let timer = advanced.effects.iter().find_map(|effect| match effect {
            Effect::SetTimer { due } => Some(*due),
            _ => None,
        });
        let retrying =
            advanced.appended.iter().any(|r| matches!(r.transition, Transition::StepFailed { retry_at: Some(_), .. }));
        let ended = advanced.appended.iter().find_map(|r| match r.transition {
            Transition::RunCompleted => Some(true),
            Transition::RunFailed { .. } => Some(false),
            _ => None,
        });
        let workflow = advanced.state.workflow.clone();
        let final_status = advanced.state.status.is_terminal().then(|| advanced.state.status.name());
        let ended_at = advanced.appended.last().map(|r| r.at);
        // A run that ends gives its concurrency slot back.
        let limited = match final_status {
            Some(_) => self.definition(run.shard, &advanced.state.definition).await.ok(),
            None => None,
        }
        .filter(|w| w.def.concurrency.is_some());
        // Once the end is committed: a child run's end wakes its parent, the run span is
        // exported (when traces are on), the slot is given back. Each needs the ended state.
        let child = advanced.state.trigger.depth() > 0;
        let traced = self.config.traces.is_some();
        let ended_state =
            (final_status.is_some() && (child || traced || limited.is_some())).then(|| advanced.state.clone());
        let commit = Commit {
            run: run.clone(),
            expected_seq,
            lease: lease.clone(),
            records: advanced.appended,
            state: advanced.state,
            dispatch,
            timer,
            clear_timer,
        };
        let requeue = matches!(path, CommitPath::Requeue);
        let outcome = match path {
            CommitPath::Decided => self.store.commit(commit).await?,
            CommitPath::Grouped { next } => {
                // Not while a claimed step waits for an executor (it would wait behind new ones).
                let claim_next = next.is_none()
                    && !self.shutdown.is_cancelled()
                    && self.waiting_for_executor.load(Ordering::SeqCst) == 0
                    && Instant::now() < *self.reclaim_due.lock();
                let committed = self.commits.submit(StepCommit { commit, claim_next }).await?;
                if committed.next.is_some() {
                    *next = committed.next;
                }
                committed.outcome
            }
            CommitPath::Requeue => self.store.requeue(commit).await?,
        };
        match &outcome {
            CommitOutcome::Applied { .. } => {
                if retrying {
                    Counters::add(&self.counters.retries_scheduled);
                }
                match ended {
                    Some(true) => Counters::add(&self.counters.runs_completed),
                    Some(false) => Counters::add(&self.counters.runs_failed),
                    None => {}
                }
                if let Some(completed) = ended {
                    self.metrics.run_ended(&workflow, completed);
                }
                if let Some(status) = final_status {
                    let _ = self.finished.send((run.to_string(), status));
                }
                if let Some(state) = &ended_state {
                    if let Some(at) = ended_at.filter(|_| traced) {
                        self.run_ended(run, state, at);
                    }
                    if child {
                        Box::pin(self.child_run_ended(run, state)).await;
                    }
                    if let Some(workflow) = &limited {
                        Box::pin(self.release_run_slot(run, state, &workflow.def)).await;
                    }
                }
            }
            CommitOutcome::LeaseLost => {
                Counters::add(&self.counters.completions_fenced);
                tracing::warn!(run_id = %run, workflow = %workflow, "completion rejected by the fence: this replica's lease was lost and the step belongs to another");
            }
            CommitOutcome::Stale if requeue => {
                tracing::debug!(run_id = %run, workflow = %workflow, "re-queue refused: the run's step is queued or leased after all");
            }
            // The executor applies the outcome again on the run's new state (`commit_outcome`);
            // a decision is made again (`record_on_run`).
            CommitOutcome::Stale => {}
            CommitOutcome::Gone => {
                tracing::info!(run_id = %run, workflow = %workflow, "run is finished or gone; discarding the outcome")
            }
        }
        Ok(outcome)
    }
}

/// The span a step attempt runs in, so that every line logged while it runs says which step of
/// which run it is about. Its `step` (the step's id) is recorded once the definition is read;
/// `trace_id` is recorded by the traces when they are on, this being the attempt's span. At
/// ERROR level so that no `LOG_LEVEL` drops it while it still lets its lines through.
pub(super) fn step_span(run: &RunId, task: &ReadyTask, workflow: &crate::definition::Workflow) -> tracing::Span {
    let attempt = task.attempt;
    // As text (`step=fetch`), like the other fields, not as a quoted debug string.
    let step = workflow.def.steps.get(task.step as usize).map(|def| tracing::field::display(&def.id));
    tracing::error_span!(
        "step",
        run_id = %run,
        workflow = %task.state.workflow,
        step,
        attempt,
        trace_id = tracing::field::Empty,
    )
}

impl Engine {
    /// Runs the action until it ends or its timeout; on timeout the action is cancelled and
    /// awaited, so that it cleans up (an `exec` kills its whole process group).
    async fn run_with_timeout(
        &self,
        step: &crate::definition::StepDef,
        context: &StepContext,
        cancel: CancellationToken,
    ) -> Result<actions::Outcome, actions::ActionError> {
        let action = self.actions.run(step, context, self, cancel.clone());
        tokio::pin!(action);
        tokio::select! {
            result = &mut action => result,
            () = tokio::time::sleep(step.timeout) => {
                cancel.cancel();
                let _ = action.await;
                Err(actions::ActionError::retryable(format!(
                    "step `{}` timed out after {}",
                    step.id,
                    crate::definition::format_duration(step.timeout)
                )))
            }
        }
    }
}
