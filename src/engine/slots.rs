//! Concurrency limits (`concurrency = { limit, key }`): a run takes a slot of its group when its
//! first step is claimed and keeps it until it ends, whatever replica runs it; a run that finds
//! every slot taken waits in the group's queue (its step's entry acknowledged, `Slots::admit`)
//! and is queued again, oldest first, when a slot frees (`Slots::release_slot`, right after the
//! commit that ends a run). A group's runs, slots and queue share one shard, so admitting is
//! one atomic call.
//!
//! The slot belongs to the run, not to a replica: a replica that dies holding a step leaves the
//! slot to the run, whose step the others take over. A replica that dies between a run's end and
//! the release leaves the slot to the sweeper, which gives back the slots of ended runs and
//! fills free ones (`sweep_slots`).

use super::Engine;
use crate::actions::template::{Scope, render_str};
use crate::definition::WorkflowDef;
use crate::machine::{RunState, Status};
use crate::store::{Admission, Lease, RateAdmission, RateGroup, RunId, SlotGroup, StoreError};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

/// The group name of runs without a key.
const WHOLE_WORKFLOW: &str = "all";

/// A run's input as JSON (`null` if it does not parse: its key then names nothing, and a run of
/// an older definition goes unlimited).
fn run_input(state: &RunState) -> serde_json::Value {
    serde_json::from_str(&state.input).unwrap_or(serde_json::Value::Null)
}

/// A group's name (of a limit or a debounce): `all` without a key, else the key rendered from
/// the input, hashed (a value may hold any character, and keys name the group).
pub(super) fn group_name(limit: &str, key: Option<&str>, input: &serde_json::Value) -> Result<String, String> {
    let Some(key) = key else { return Ok(WHOLE_WORKFLOW.to_owned()) };
    let scope = Scope { input, steps: &serde_json::Map::new(), run: serde_json::Value::Null };
    let value = render_str(key, &scope).map_err(|problem| format!("{limit} key `{key}`: {problem}"))?;
    let digest = Sha256::digest(value.as_bytes());
    Ok(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
}

impl Engine {
    /// The concurrency group of a run of `def` with `input`; `None` when the workflow has no
    /// limit. An error names a key that does not render from the input.
    pub(super) fn slot_group(def: &WorkflowDef, input: &serde_json::Value) -> Result<Option<SlotGroup>, String> {
        let Some(concurrency) = &def.concurrency else { return Ok(None) };
        let group = group_name("concurrency", concurrency.key.as_deref(), input)?;
        Ok(Some(SlotGroup { workflow: def.id.clone(), group, limit: concurrency.limit }))
    }

    /// The rate group of a run of `def` with `input`; `None` when the workflow has no rate
    /// limit.
    pub(super) fn rate_group(def: &WorkflowDef, input: &serde_json::Value) -> Result<Option<RateGroup>, String> {
        let Some(rate) = &def.rate_limit else { return Ok(None) };
        let group = group_name("rate_limit", rate.key.as_deref(), input)?;
        let period_ms = rate.period.as_millis() as u64;
        Ok(Some(RateGroup { workflow: def.id.clone(), group, limit: rate.limit, period_ms }))
    }

    /// The shard a limited run of `def` with `input` lives on, beside its group (a workflow
    /// with both limits has one key for both); `None` when it has no limit.
    pub(super) fn limited_shard(&self, def: &WorkflowDef, input: &serde_json::Value) -> Result<Option<u16>, String> {
        let group = match Self::slot_group(def, input)? {
            Some(group) => Some(group.group),
            None => Self::rate_group(def, input)?.map(|group| group.group),
        };
        let shards = self.store.shards();
        Ok(group.map(|group| crate::store::keys::shard_of(&format!("slots:{}:{group}", def.id), shards)))
    }

    /// Before a claimed step of a limited workflow runs: whether it may. A rate-limited run's
    /// start is counted in its window first (while the run is `pending`), then a run of a
    /// workflow with a concurrency limit must hold a slot of its group. When not, the run waits
    /// (its entry acknowledged) and the step is not run.
    pub(super) async fn admit_limited(
        self: &Arc<Self>,
        lease: &Lease,
        run: &RunId,
        state: &RunState,
        def: &WorkflowDef,
    ) -> Result<bool, StoreError> {
        if def.rate_limit.is_none() && def.concurrency.is_none() {
            return Ok(true);
        }
        let input = run_input(state);
        if state.status == Status::Pending && !self.admit_start(lease, run, state, def, &input).await? {
            return Ok(false);
        }
        self.admit_step(lease, run, state, def, &input).await
    }

    /// Whether the run of a claimed step holds a slot of its concurrency group (or just took
    /// one); `true` without a concurrency limit.
    async fn admit_step(
        &self,
        lease: &Lease,
        run: &RunId,
        state: &RunState,
        def: &WorkflowDef,
        input: &serde_json::Value,
    ) -> Result<bool, StoreError> {
        // (A group that does not render was refused when the run was created: a run of an
        // older definition goes unlimited.)
        let Ok(Some(group)) = Self::slot_group(def, input) else { return Ok(true) };
        match self.store.admit(lease, run, &group, state.created_at).await? {
            Admission::Admitted => Ok(true),
            Admission::NotOurs => Ok(false),
            Admission::Held { promoted } => {
                tracing::debug!(run_id = %run, workflow = %def.id, "run waits for a concurrency slot");
                self.queue_promoted(&promoted).await;
                Ok(false)
            }
        }
    }

    /// After a run of a limited workflow ended: gives its slot back and queues the runs that
    /// took the freed slots.
    pub(super) async fn release_run_slot(&self, run: &RunId, state: &RunState, def: &WorkflowDef) {
        let input = run_input(state);
        let Ok(Some(group)) = Self::slot_group(def, &input) else { return };
        match self.store.release_slot(run.shard, &group, Some(run)).await {
            Ok(promoted) => self.queue_promoted(&promoted).await,
            Err(err) => {
                tracing::warn!(run_id = %run, %err, "giving back a concurrency slot failed; the sweeper will")
            }
        }
    }

    /// Queues runs that a limit let in again (their step's entry was acknowledged while they
    /// waited). A failure is left to the sweeper, which re-queues a quiet run without an entry.
    async fn queue_promoted(&self, promoted: &[RunId]) {
        for run in promoted {
            if let Err(err) = self.requeue(run).await {
                tracing::warn!(run_id = %run, %err, "queueing a run its limit let in failed; the sweeper will");
            }
        }
    }

    /// Whether the start of a pending run is counted in its rate group's window (or was);
    /// `true` without a rate limit. When not, the run waits and this replica wakes the group
    /// when capacity frees.
    async fn admit_start(
        self: &Arc<Self>,
        lease: &Lease,
        run: &RunId,
        state: &RunState,
        def: &WorkflowDef,
        input: &serde_json::Value,
    ) -> Result<bool, StoreError> {
        let Ok(Some(group)) = Self::rate_group(def, input) else { return Ok(true) };
        match self.store.rate_admit(lease, run, &group, state.created_at).await? {
            RateAdmission::Admitted => Ok(true),
            RateAdmission::NotOurs => Ok(false),
            RateAdmission::Held { promoted, next } => {
                tracing::debug!(run_id = %run, workflow = %def.id, "run waits for its rate limit");
                self.queue_promoted(&promoted).await;
                if let Some(next) = next {
                    self.wake_rate_group(run.shard, group, next);
                }
                Ok(false)
            }
        }
    }

    /// Lets waiting runs of `group` in as its window frees capacity, from `at` on, until none
    /// waits: one such task per group on this replica (every replica's sweeper does the same, as
    /// a backstop).
    fn wake_rate_group(self: &Arc<Self>, shard: u16, group: RateGroup, at: crate::machine::Millis) {
        let id = (shard, group.workflow.clone(), group.group.clone());
        if !self.rate_wakers.lock().insert(id.clone()) {
            return;
        }
        let engine = Arc::clone(self);
        self.tasks.spawn(async move {
            let mut at = at;
            // Bounded: each round lets at least one run in, or ends.
            for _ in 0..1_000_000 {
                let wait = Duration::from_millis(at.saturating_sub(engine.clock.now()));
                if super::sleep_or_cancelled(&engine.shutdown, wait).await {
                    break;
                }
                match engine.store.rate_release(shard, &group).await {
                    Ok((promoted, next)) => {
                        engine.queue_promoted(&promoted).await;
                        match next {
                            Some(next) => at = next,
                            None => break,
                        }
                    }
                    Err(err) => {
                        tracing::warn!(workflow = %group.workflow, %err, "letting runs in under their rate limit failed; will retry");
                        at = engine.clock.now() + 1_000;
                    }
                }
            }
            engine.rate_wakers.lock().remove(&id);
        });
    }

    /// The sweeper's backstop for rate limits: lets waiting runs in where capacity is free, and
    /// wakes the groups whose runs still wait.
    pub(super) async fn sweep_rates(self: &Arc<Self>) -> Result<usize, StoreError> {
        let mut queued = 0;
        for workflow in self.registry.iter() {
            let Some(rate) = &workflow.def.rate_limit else { continue };
            for shard in 0..self.store.shards() {
                for name in self.store.rate_groups(shard, &workflow.def.id).await? {
                    let group = RateGroup {
                        workflow: workflow.def.id.clone(),
                        group: name,
                        limit: rate.limit,
                        period_ms: rate.period.as_millis() as u64,
                    };
                    let (promoted, next) = self.store.rate_release(shard, &group).await?;
                    queued += promoted.len();
                    self.queue_promoted(&promoted).await;
                    if let Some(next) = next {
                        self.wake_rate_group(shard, group, next);
                    }
                }
            }
        }
        Ok(queued)
    }

    /// Runs waiting for a concurrency slot and for a rate window, by limited workflow, over
    /// every shard.
    pub async fn limited_counts(&self) -> Result<Vec<(String, u64, u64)>, StoreError> {
        let mut counts = Vec::new();
        for workflow in self.registry.iter() {
            let def = &workflow.def;
            if def.concurrency.is_none() && def.rate_limit.is_none() {
                continue;
            }
            let shards = (0..self.store.shards()).map(|shard| self.store.queued(shard, &def.id));
            let (slots, rates) = futures::future::try_join_all(shards)
                .await?
                .into_iter()
                .fold((0, 0), |(slots, rates), (s, r)| (slots + s, rates + r));
            counts.push((def.id.clone(), slots, rates));
        }
        Ok(counts)
    }

    /// The sweeper's backstop: in every group of every limited workflow, gives back the slots
    /// of runs that ended (or are gone) and fills free slots. Returns how many runs it queued.
    pub(super) async fn sweep_slots(&self) -> Result<usize, StoreError> {
        let mut queued = 0;
        let quiet_for = self.config.lease_ttl * 2 + std::time::Duration::from_secs(1);
        let quiet_before = self.clock.now().saturating_sub(quiet_for.as_millis() as u64);
        for workflow in self.registry.iter() {
            let Some(concurrency) = &workflow.def.concurrency else { continue };
            for shard in 0..self.store.shards() {
                for name in self.store.slot_groups(shard, &workflow.def.id).await? {
                    let group = SlotGroup { workflow: workflow.def.id.clone(), group: name, limit: concurrency.limit };
                    let (holders, _) = self.store.slot_holders(shard, &group).await?;
                    for holder in holders {
                        let summary = self.store.summary(&holder).await?;
                        // A run that took a slot while it waited, whose re-queue was lost.
                        if let Some(summary) = summary.as_ref().filter(|s| s.status == Status::Pending)
                            && summary.updated_at < quiet_before
                            && self.is_orphan(&holder, summary).await?
                            && self.requeue(&holder).await?
                        {
                            queued += 1;
                        }
                        let ended = summary.is_none_or(|s| s.status.is_terminal());
                        if ended {
                            tracing::warn!(run_id = %holder, workflow = %workflow.def.id, "a concurrency slot outlived its run: given back");
                            let promoted = self.store.release_slot(shard, &group, Some(&holder)).await?;
                            queued += promoted.len();
                            self.queue_promoted(&promoted).await;
                        }
                    }
                    let promoted = self.store.release_slot(shard, &group, None).await?;
                    queued += promoted.len();
                    self.queue_promoted(&promoted).await;
                }
            }
        }
        Ok(queued)
    }
}
