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
use crate::store::{Admission, Lease, RunId, SlotGroup, StoreError};
use sha2::{Digest, Sha256};

/// The group name of runs without a key.
const WHOLE_WORKFLOW: &str = "all";

impl Engine {
    /// The concurrency group of a run of `def` with `input`; `None` when the workflow has no
    /// limit. An error names a key that does not render from the input.
    pub(super) fn slot_group(def: &WorkflowDef, input: &serde_json::Value) -> Result<Option<SlotGroup>, String> {
        let Some(concurrency) = &def.concurrency else { return Ok(None) };
        let group = match &concurrency.key {
            None => WHOLE_WORKFLOW.to_owned(),
            Some(key) => {
                let scope = Scope { input, steps: &serde_json::Map::new(), run: serde_json::Value::Null };
                let value = render_str(key, &scope).map_err(|problem| format!("concurrency key `{key}`: {problem}"))?;
                // Hashed: a value may hold any character, and keys name the group.
                let digest = Sha256::digest(value.as_bytes());
                digest[..8].iter().map(|b| format!("{b:02x}")).collect()
            }
        };
        Ok(Some(SlotGroup { workflow: def.id.clone(), group, limit: concurrency.limit }))
    }

    /// The shard every run of `group` lives on.
    pub(super) fn slot_shard(&self, group: &SlotGroup) -> u16 {
        crate::store::keys::shard_of(&format!("slots:{}:{}", group.workflow, group.group), self.store.shards())
    }

    /// Before a claimed step of a limited workflow runs: whether its run holds a slot (or just
    /// took one). When not, the run waits (its entry acknowledged) and the step is not run.
    pub(super) async fn admit_step(
        &self,
        lease: &Lease,
        run: &RunId,
        state: &RunState,
        def: &WorkflowDef,
    ) -> Result<bool, StoreError> {
        let input: serde_json::Value = serde_json::from_str(&state.input).unwrap_or(serde_json::Value::Null);
        let group = match Self::slot_group(def, &input) {
            Ok(Some(group)) => group,
            Ok(None) => return Ok(true),
            // Checked when the run was created: a run of an older definition goes unlimited.
            Err(_) => return Ok(true),
        };
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
        let input: serde_json::Value = serde_json::from_str(&state.input).unwrap_or(serde_json::Value::Null);
        let Ok(Some(group)) = Self::slot_group(def, &input) else { return };
        match self.store.release_slot(run.shard, &group, Some(run)).await {
            Ok(promoted) => self.queue_promoted(&promoted).await,
            Err(err) => {
                tracing::warn!(run_id = %run, %err, "giving back a concurrency slot failed; the sweeper will")
            }
        }
    }

    /// Queues runs that took a slot again (their step's entry was acknowledged while they
    /// waited). A failure is left to the sweeper, which re-queues a quiet run without an entry.
    async fn queue_promoted(&self, promoted: &[RunId]) {
        for run in promoted {
            if let Err(err) = self.requeue(run).await {
                tracing::warn!(run_id = %run, %err, "queueing a run that got a concurrency slot failed; the sweeper will");
            }
        }
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
