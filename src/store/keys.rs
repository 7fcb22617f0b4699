//! Every Redis key name, built here and nowhere else.
//!
//! The unit of atomicity is a shard, a hash tag `{N}`: everything one transition touches lives
//! in one shard, so the store works unchanged on Redis Cluster.

use super::RunId;
use sha2::{Digest, Sha256};

/// The consumer group of the ready streams.
pub const WORKERS_GROUP: &str = "workers";
/// The consumer group of the event bus.
pub const ROUTER_GROUP: &str = "router";

/// The shard an idempotency key lands on: stable across replicas, restarts and versions.
pub fn shard_of(key: &str, shards: u16) -> u16 {
    let digest = Sha256::digest(key.as_bytes());
    let value = u64::from_be_bytes(digest[..8].try_into().expect("a SHA-256 digest has 8 bytes"));
    (value % u64::from(shards.max(1))) as u16
}

#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    shards: u16,
}

impl Keys {
    pub fn new(prefix: &str, shards: u16) -> Keys {
        Keys { prefix: prefix.to_owned(), shards }
    }

    pub fn shards(&self) -> u16 {
        self.shards
    }

    fn shard(&self, shard: u16) -> String {
        format!("{}:{{{shard}}}", self.prefix)
    }

    /// The shard an idempotency key lands on.
    pub fn shard_of(&self, key: &str) -> u16 {
        shard_of(key, self.shards)
    }

    /// Hash: the run's summary (status, step, attempt, seq, times, current ready entry).
    pub fn run(&self, run: &RunId) -> String {
        format!("{}:run:{run}", self.shard(run.shard))
    }

    /// List: the run's transitions (MessagePack), the record of seq `i` at index `i - 1`; kept
    /// as it is when the run ends.
    pub fn log(&self, run: &RunId) -> String {
        format!("{}:runlog:{run}", self.shard(run.shard))
    }

    /// Schema 1's stream of a live run's transitions (entry ids `<seq>-0`): only read to upgrade.
    pub fn v1_log(&self, run: &RunId) -> String {
        format!("{}:log:{run}", self.shard(run.shard))
    }

    /// Schema 1's compacted log of a finished run (concatenated MessagePack): only read to
    /// upgrade.
    pub fn v1_history(&self, run: &RunId) -> String {
        format!("{}:hist:{run}", self.shard(run.shard))
    }

    /// The pattern of schema 1's run logs of a shard, streams (`log`) or compacted (`hist`).
    pub fn v1_logs_pattern(&self, shard: u16, kind: &str) -> String {
        format!("{}:{kind}:*", self.shard(shard))
    }

    /// Stream with consumer group `workers`: steps ready to run.
    pub fn ready(&self, shard: u16) -> String {
        format!("{}:ready", self.shard(shard))
    }

    /// Stream: ready entries that could not be decoded, with the reason.
    pub fn ready_dead(&self, shard: u16) -> String {
        format!("{}:ready:dead", self.shard(shard))
    }

    /// Sorted set: runs by the time their timer is due.
    pub fn timers(&self, shard: u16) -> String {
        format!("{}:timers", self.shard(shard))
    }

    pub fn idempotency(&self, shard: u16, key: &str) -> String {
        format!("{}:idem:{key}", self.shard(shard))
    }

    /// String: a definition snapshot (JSON) by hash.
    pub fn definition(&self, shard: u16, hash: &str) -> String {
        format!("{}:def:{hash}", self.shard(shard))
    }

    /// Sorted set: every run of the shard by creation time, in data written by earlier builds
    /// (no longer written: a listing of every status merges the live and finished indexes;
    /// housekeeping still takes expired runs out of it).
    pub fn index_all(&self, shard: u16) -> String {
        format!("{}:idx:all", self.shard(shard))
    }

    /// Sorted set: a workflow's runs by creation time.
    pub fn index_workflow(&self, shard: u16, workflow: &str) -> String {
        format!("{}:idx:wf:{workflow}", self.shard(shard))
    }

    /// Sorted set: a workflow's runs whose input held `value` in the search field `field`, by
    /// creation time. (Neither a workflow id nor a field name holds `:`, so the key is
    /// unambiguous whatever the value.)
    pub fn index_search(&self, shard: u16, workflow: &str, field: &str, value: &str) -> String {
        format!("{}:idx:in:{workflow}:{field}:{value}", self.shard(shard))
    }

    /// Sorted set: non-terminal runs by creation time.
    pub fn index_active(&self, shard: u16) -> String {
        format!("{}:idx:active", self.shard(shard))
    }

    /// Sorted set: runs that ended with `status`, by creation time.
    pub fn index_finished(&self, shard: u16, status: &str) -> String {
        format!("{}:idx:st:{status}", self.shard(shard))
    }

    /// Sorted set: a workflow's runs that ended with `status`, by creation time.
    pub fn index_workflow_finished(&self, shard: u16, workflow: &str, status: &str) -> String {
        format!("{}:idx:wfst:{workflow}:{status}", self.shard(shard))
    }

    /// Sorted set: a paused workflow's runs held back on this shard, by creation time.
    pub fn held(&self, shard: u16, workflow: &str) -> String {
        format!("{}:held:{workflow}", self.shard(shard))
    }

    /// Sorted set: the runs holding a slot of a concurrency group, by creation time.
    pub fn slots(&self, shard: u16, workflow: &str, group: &str) -> String {
        format!("{}:slots:{workflow}:{group}", self.shard(shard))
    }

    /// Sorted set: the runs waiting for a slot of a concurrency group, by creation time.
    pub fn slot_queue(&self, shard: u16, workflow: &str, group: &str) -> String {
        format!("{}:slotq:{workflow}:{group}", self.shard(shard))
    }

    /// Set: a workflow's concurrency groups that have had runs on this shard.
    pub fn slot_groups(&self, shard: u16, workflow: &str) -> String {
        format!("{}:slotgroups:{workflow}", self.shard(shard))
    }

    /// Sorted set: the runs a rate group started within its period, by the time each started.
    pub fn rate_window(&self, shard: u16, workflow: &str, group: &str) -> String {
        format!("{}:rate:{workflow}:{group}", self.shard(shard))
    }

    /// Sorted set: the runs waiting for a rate group's capacity, by creation time.
    pub fn rate_queue(&self, shard: u16, workflow: &str, group: &str) -> String {
        format!("{}:rateq:{workflow}:{group}", self.shard(shard))
    }

    /// Set: a workflow's rate groups that have had runs on this shard.
    pub fn rate_groups(&self, shard: u16, workflow: &str) -> String {
        format!("{}:rategroups:{workflow}", self.shard(shard))
    }

    /// The debounce keys share one hash tag, so that a trigger is added to its burst in one
    /// atomic call (on a cluster: one slot).
    fn debounce(&self) -> String {
        format!("{}:{{debounce}}", self.prefix)
    }

    /// Hash: the open burst of each debounce key (`<workflow>:<group>` -> burst id).
    pub fn debounce_open(&self) -> String {
        format!("{}:open", self.debounce())
    }

    /// Sorted set: bursts by the time each is due.
    pub fn debounce_due(&self) -> String {
        format!("{}:due", self.debounce())
    }

    /// Hash: each burst's payload (`<id>`), trigger count (`<id>:n`) and first trigger's time
    /// (`<id>:first`).
    pub fn debounce_bursts(&self) -> String {
        format!("{}:bursts", self.debounce())
    }

    /// String (expiring): the burst a debounced trigger with idempotency key `key` went to.
    pub fn debounce_seen(&self, key: &str) -> String {
        format!("{}:seen:{key}", self.debounce())
    }

    /// Hash: the paused workflows (workflow -> when it was paused, ms).
    pub fn paused(&self) -> String {
        format!("{}:paused", self.prefix)
    }

    /// String: how many shards the data is spread over (`SHARDS`), recorded by the first replica.
    pub fn shard_count(&self) -> String {
        format!("{}:shards", self.prefix)
    }

    /// String: the version of the Lua library the data was written with.
    pub fn schema_version(&self) -> String {
        format!("{}:schema", self.prefix)
    }

    /// String, present while data of an older schema is being upgraded.
    pub fn schema_upgrading(&self) -> String {
        format!("{}:schema:upgrading", self.prefix)
    }

    /// Stream: the event bus.
    pub fn events(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// Stream: malformed events, with the reason.
    pub fn events_dead(&self) -> String {
        format!("{}:events:dead", self.prefix)
    }

    /// Hash: entries removed from the bus for ids too far ahead of the clock (`removed`, and
    /// the last one's `last_id` and `last_at`).
    pub fn events_hostile(&self) -> String {
        format!("{}:events:hostile", self.prefix)
    }

    /// Hash (expiring): the runs started by the events of one second of the bus, `second`
    /// (of their ids' time): field the event's id, value JSON. One hash per second, not a key
    /// per event, so that a batch of events settles in one write.
    pub fn event_runs(&self, second: u64) -> String {
        format!("{}:events:runs-at:{second}", self.prefix)
    }

    /// String (JSON, expiring): the runs an event started, as builds before [`Self::event_runs`]
    /// recorded them (read until they expire).
    pub fn event_runs_of_one(&self, id: &str) -> String {
        format!("{}:events:runs:{id}", self.prefix)
    }

    /// Sorted set: runs waiting for events of type `event`, by their time-out.
    pub fn waits(&self, event: &str) -> String {
        format!("{}:waits:{event}", self.prefix)
    }

    /// Set: the ids of replicas that have beaten (some possibly expired since). Its hash tag
    /// puts it beside the beats themselves, so that one `MGET` reads them on a cluster too.
    pub fn replicas(&self) -> String {
        format!("{}:{{replicas}}:ids", self.prefix)
    }

    /// String (JSON, expiring): a replica's last heartbeat.
    pub fn replica(&self, id: &str) -> String {
        format!("{}:{{replicas}}:beat:{id}", self.prefix)
    }

    /// String: a small shared value of the actions (a sync cursor, say).
    pub fn value(&self, key: &str) -> String {
        format!("{}:kv:{key}", self.prefix)
    }

    /// Hash: a workflow schedule's shared state (last fire, last run, buffered fire).
    pub fn cron(&self, workflow: &str) -> String {
        format!("{}:cron:{workflow}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_run_share_its_hash_tag() {
        let keys = Keys::new("wfo", 16);
        let run: RunId = "0193e4a17b2c7d3e8f001a2b3c4d5e6f-s3".parse().unwrap();
        for key in
            [keys.run(&run), keys.log(&run), keys.v1_log(&run), keys.v1_history(&run), keys.ready(3), keys.timers(3)]
        {
            assert!(key.starts_with("wfo:{3}:"), "{key}");
        }
        assert!(keys.shard_of("cron:a:1") < 16);
        assert_eq!(keys.shard_of("cron:a:1"), keys.shard_of("cron:a:1"));
    }
}
