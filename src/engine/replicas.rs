//! Replica heartbeats: every replica writes who it is and how busy it is into the store every
//! few seconds, with a time-to-live, so that any replica can list the live ones (the
//! dashboard's overview, `GET /api/replicas`).

use super::{Engine, sleep_or_cancelled};
use crate::store::{ReplicaBeat, StoreError};
use std::sync::Arc;
use std::time::Duration;

/// How often a replica beats.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(5);
/// How long a beat keeps a replica listed: three beats, so that one slow or lost write does not
/// make a live replica vanish.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(15);

impl Engine {
    pub(super) async fn heartbeat_loop(self: Arc<Self>) {
        let started_at = self.clock.now();
        loop {
            if let Err(err) = self.store.heartbeat(&self.beat(started_at), HEARTBEAT_TTL).await {
                tracing::debug!(%err, "writing this replica's heartbeat failed; will retry");
            }
            if sleep_or_cancelled(&self.shutdown, HEARTBEAT_EVERY).await {
                // Leaving: no longer listed as live (best effort; the time-to-live does it anyway).
                let _ = tokio::time::timeout(Duration::from_secs(2), self.store.forget_replica(&self.consumer)).await;
                return;
            }
        }
    }

    fn beat(&self, started_at: crate::machine::Millis) -> ReplicaBeat {
        ReplicaBeat {
            id: self.consumer.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            executors_busy: self.busy_executors() as u64,
            executors_total: self.config.max_concurrent_steps as u64,
            started_at,
            last_seen: self.clock.now(),
        }
    }

    /// The replicas whose heartbeat is live, this one among them once it has beaten.
    pub async fn replicas(&self) -> Result<Vec<ReplicaBeat>, StoreError> {
        self.store.replicas().await
    }
}
