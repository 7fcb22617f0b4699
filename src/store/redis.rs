//! The Redis store: the durable, multi-replica engine's only contact with Redis (via fred).
//!
//! Every transition is one `FCALL wfo_v2_commit_group`, alone or in a group of runs (see
//! `migrations/002_wfo_v2.lua`); data of schema 1 is upgraded at start-up; reads are
//! batched; concurrent calls share one pipelined connection, and blocking reads have their own so
//! that they never hold up a commit.

use super::codec::{
    decode_compacted, decode_recorded, decode_task, encode_recorded, encode_task, summary_fields, summary_from_fields,
};
use super::keys::{Keys, ROUTER_GROUP, WORKERS_GROUP};
use super::prelude::*;
use super::{
    Admission, BUS_CLOCK_TOLERANCE, BusCondition, BusEntry, Claimed, Commit, CommitOutcome, Created, CronState,
    DEAD_LETTER_KEEP, DebounceTrigger, Debounced, Dispatch, DueBurst, EntryCap, EventQuery, Housekeeping, Lease,
    ListedEvent, Logged, NewRun, Oversized, RateAdmission, RateGroup, ReplicaBeat, RunId, RunPage, RunQuery, RunState,
    RunSummary, SearchQuery, SettledEvent, SlotGroup, StepCommit, StepCommitted, StoreError, StoreHealth, StoreKind,
    StoreResult, StreamStats, burst_key, debounce_key, terminal_name,
};
use crate::config::{DEFAULT_SHARDS, MAX_SHARDS};
use crate::definition::Workflow;
use crate::machine::{Millis, Recorded, Status};
use async_trait::async_trait;
use fred::interfaces::EventInterface;
use fred::prelude::{ClientLike, Config, ReconnectPolicy};
use fred::types::{ClusterHash, CustomCommand, Value};
use futures::future::join_all;
use futures::{StreamExt, TryStreamExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// The Lua library, versioned: its name carries the schema version.
const LIBRARY: &str = include_str!("../../migrations/002_wfo_v2.lua");
const SCHEMA_VERSION: u64 = 2;
/// The library of schema 1, removed by the upgrade.
const V1_LIBRARY_NAME: &str = "wfo_v1";
/// The group commit and the sweeper's re-queue (named apart from the earlier layouts of their
/// arguments, `wfo_v2_commit`/`wfo_v2_requeue` and `wfo_v2_commit_group`/`wfo_v2_requeue_group`
/// (one ready entry per commit), so that a replica of an older build never sends its layout to
/// these).
const COMMIT: &str = "wfo_v2_commit_steps";
const REQUEUE: &str = "wfo_v2_requeue_steps";
/// Connections for non-blocking commands.
const POOL_SIZE: usize = 4;
/// How many ready streams' existence is asked for at once when the shard count is checked.
const SHARD_PROBES_IN_FLIGHT: usize = 32;
/// The most live runs a count of a workflow's runs by status reads (all workflows' live runs
/// share the live index), and how many it reads at a time.
const LIVE_COUNTED: usize = 16_000;
const COUNT_PAGE: usize = 1_000;
/// The router's first and longest pause between empty reads of the bus (see `read_events`).
const EVENTS_POLL_MIN: Duration = Duration::from_millis(5);
const EVENTS_POLL_MAX: Duration = Duration::from_millis(100);
/// About how many bytes of bus entries one read brings in at most.
const EVENTS_READ_BUDGET: usize = 8 * 1024 * 1024;
/// On a cluster, the first and longest pause between claim rounds that found nothing (see
/// `claim_per_shard`).
const CLAIM_POLL_MIN: Duration = Duration::from_millis(1);
const CLAIM_POLL_MAX: Duration = Duration::from_millis(25);

pub struct RedisStore {
    /// Pipelined connections for every non-blocking command, used in turn: concurrent callers'
    /// commands are written back to back without waiting for each other's replies, and a few
    /// connections spread the client-side encoding and decoding over threads.
    client: fred::prelude::Pool,
    /// Its own connection for `XREADGROUP ... BLOCK` on the ready streams, which holds a
    /// connection while it waits.
    blocking: fred::prelude::Client,
    keys: Keys,
    /// Which shard a partial read starts at, rotated so that no shard starves when fewer
    /// executors are free than there are shards.
    next_shard: AtomicUsize,
    /// The last connection error of any connection, cleared by a reconnection: the real cause
    /// (refused, wrong password) behind what a waiting command reports as a time-out.
    connection_error: Arc<parking_lot::Mutex<Option<String>>>,
    /// On Redis Cluster: every call names keys of one slot, the library is loaded on every
    /// primary, and claims go shard by shard (a read may not span slots).
    cluster: bool,
    /// `REDIS_WAIT_REPLICAS`: how many replicas must have a write before it is acknowledged.
    replica_wait: Option<ReplicaWait>,
    /// Woken when this store queued a step, so that a claim polling a cluster looks again at
    /// once instead of after its pause.
    queued: tokio::sync::Notify,
    /// The shards this store queued steps on since its last claim: that claim reads them first
    /// (a read of the other shards for work this replica just queued costs a command each).
    queued_on: parking_lot::Mutex<Vec<u16>>,
}

/// The most shards [`RedisStore::queued_on`] remembers between claims.
const QUEUED_ON_MAX: usize = 64;

/// Acknowledged means replicated: a write that answers to the outside (a trigger's run, a
/// step's accepted outcome, a cron fire, a published event) is followed by `WAIT replicas
/// timeout` on the same connection, and fails as retryable when fewer replicas confirm it.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaWait {
    pub replicas: u32,
    pub timeout: Duration,
}

/// Where a command goes on a cluster: the slot of its key, found at the position that command
/// keeps it. (fred hashes a custom command's first string argument unless it is given the
/// slot: right for `GET key ...`, wrong for `FCALL function numkeys key ...`.) Commands without
/// a key go wherever their first argument hashes, which is any node.
fn route(name: &str, args: &[Value]) -> ClusterHash {
    let key = match name {
        "FCALL" => args.get(2),
        "XINFO" | "XGROUP" => args.get(1),
        _ => return ClusterHash::FirstKey,
    };
    match key.and_then(Value::as_bytes) {
        Some(key) => ClusterHash::Custom(fred::util::redis_keyslot(key)),
        None => ClusterHash::FirstKey,
    }
}

/// A connection error as an operator reads it: authentication named as such.
fn describe_connection_error(err: &fred::error::Error) -> String {
    match err.kind() {
        fred::error::ErrorKind::Auth => {
            format!("Redis refused authentication (check the password in REDIS_URL): {err}")
        }
        fred::error::ErrorKind::IO => format!("Redis is unreachable: {err}"),
        _ => format!("the connection to Redis failed: {err}"),
    }
}

/// Records `client`'s connection errors in `last`, and clears it when the client reconnects.
fn watch_connection(client: &fred::prelude::Client, last: &Arc<parking_lot::Mutex<Option<String>>>) {
    let (on_error, on_reconnect) = (Arc::clone(last), Arc::clone(last));
    client.on_error(move |(err, _)| {
        *on_error.lock() = Some(describe_connection_error(&err));
        std::future::ready(Ok(()))
    });
    client.on_reconnect(move |_| {
        *on_reconnect.lock() = None;
        std::future::ready(Ok(()))
    });
}

fn unavailable(err: fred::error::Error) -> StoreError {
    StoreError::Unavailable(err.to_string())
}

fn corrupt(key: &str, problem: impl Into<String>) -> StoreError {
    StoreError::Corrupt { key: key.to_owned(), problem: problem.into() }
}

/// A reply as text: bulk strings, and integers (a Lua number comes back as an integer reply:
/// the commit's new seq, a pending entry's delivery count, `XTRIM`'s and `XLEN`'s counts).
fn text(value: &Value) -> Option<String> {
    match value {
        Value::Integer(number) => Some(number.to_string()),
        other => other.as_bytes().map(|b| String::from_utf8_lossy(b).into_owned()),
    }
}

/// Stream entry fields, as (field, value) pairs, from either reply shape.
fn fields(value: Value) -> Vec<(String, Value)> {
    match value {
        Value::Map(map) => {
            map.inner().into_iter().map(|(k, v)| (k.as_str().map(|s| s.to_string()).unwrap_or_default(), v)).collect()
        }
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len() / 2);
            let mut iter = items.into_iter();
            while let (Some(k), Some(v)) = (iter.next(), iter.next()) {
                out.push((text(&k).unwrap_or_default(), v));
            }
            out
        }
        _ => Vec::new(),
    }
}

/// `(id, fields)` of stream entries from an `XRANGE`-shaped reply.
fn entries(value: Value) -> Vec<(String, Vec<(String, Value)>)> {
    value
        .into_array()
        .into_iter()
        .filter_map(|entry| {
            let mut parts = entry.into_array().into_iter();
            let id = text(&parts.next()?)?;
            Some((id, fields(parts.next().unwrap_or(Value::Null))))
        })
        .collect()
}

/// Raw (binary-safe) fields of a stream entry.
fn raw_fields(value: Value) -> Vec<(Vec<u8>, Vec<u8>)> {
    let bytes =
        |v: &Value| v.as_bytes().map(<[u8]>::to_vec).unwrap_or_else(|| text(v).unwrap_or_default().into_bytes());
    match value {
        Value::Map(map) => map.inner().into_iter().map(|(k, v)| (k.as_bytes().to_vec(), bytes(&v))).collect(),
        Value::Array(items) => {
            let mut out = Vec::with_capacity(items.len() / 2);
            let mut iter = items.into_iter();
            while let (Some(k), Some(v)) = (iter.next(), iter.next()) {
                out.push((bytes(&k), bytes(&v)));
            }
            out
        }
        _ => Vec::new(),
    }
}

/// A bus entry as the Lua's `bus_cut` returns it: `{id, fields}`, or `{id, fields, total bytes,
/// value sizes}` for one cut to size.
fn cut_entry(value: Value, deliveries: u64) -> Option<BusEntry> {
    let mut parts = value.into_array().into_iter();
    let id = text(&parts.next()?)?;
    let fields = raw_fields(parts.next().unwrap_or(Value::Null));
    let total = parts.next().as_ref().and_then(text).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
    let oversized = (total > 0).then(|| Oversized {
        total_bytes: total,
        value_bytes: parts
            .next()
            .map(Value::into_array)
            .unwrap_or_default()
            .iter()
            .filter_map(|size| text(size)?.parse().ok())
            .collect(),
    });
    Some(BusEntry { id, fields, deliveries, oversized })
}

fn field<'a>(fields: &'a [(String, Value)], name: &str) -> Option<&'a Value> {
    fields.iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

/// The second of a bus entry's id (its time), whose hash records the runs it started.
fn event_second(id: &str) -> u64 {
    super::entry_ms(id).unwrap_or(0) / 1000
}

/// `ms-seq` + 1: the smallest id after `id`.
fn successor(id: &str) -> Option<String> {
    let (ms, seq) = id.split_once('-')?;
    let (ms, seq): (u64, u64) = (ms.parse().ok()?, seq.parse().ok()?);
    // The very last id has no successor (an entry written there is removed: `repair_bus`).
    Some(if seq == u64::MAX { format!("{}-0", ms.checked_add(1)?) } else { format!("{ms}-{}", seq + 1) })
}

use super::compare_entry_ids as compare_ids;

impl RedisStore {
    /// Connects, refuses Redis older than 7.0, loads the Lua library and creates the consumer
    /// groups. Reconnects by itself afterwards, forever, with backoff.
    pub async fn connect(url: &str, prefix: &str, shards: u16) -> StoreResult<RedisStore> {
        RedisStore::open(url, prefix, Some(shards)).await
    }

    /// [`RedisStore::connect`] with `shards`, or when `None` the count the data was written
    /// with, else the default for a new deployment (see [`RedisStore::default_shards`]).
    pub async fn open(url: &str, prefix: &str, shards: Option<u16>) -> StoreResult<RedisStore> {
        let config =
            Config::from_url(url).map_err(|err| StoreError::Fatal(format!("REDIS_URL is not usable: {err}")))?;
        let builder = |command_timeout: Duration| {
            let mut builder = fred::types::Builder::from_config(config.clone());
            builder
                .with_connection_config(|c| {
                    c.connection_timeout = Duration::from_secs(5);
                    c.max_command_attempts = 3;
                })
                .with_performance_config(|p| p.default_command_timeout = command_timeout)
                .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2));
            builder
        };
        let build = |command_timeout: Duration| {
            builder(command_timeout)
                .build()
                .map_err(|err| StoreError::Fatal(format!("cannot build the Redis client: {err}")))
        };
        let client = builder(Duration::from_secs(10))
            .build_pool(POOL_SIZE)
            .map_err(|err| StoreError::Fatal(format!("cannot build the Redis client: {err}")))?;
        let connection_error = Arc::new(parking_lot::Mutex::new(None));
        let cannot_connect = |err: fred::error::Error| {
            StoreError::Unavailable(format!("cannot connect: {}", describe_connection_error(&err)))
        };
        for c in client.clients() {
            watch_connection(c, &connection_error);
        }
        client.init().await.map_err(cannot_connect)?;
        let blocking = build(Duration::from_secs(15))?;
        watch_connection(&blocking, &connection_error);
        blocking.init().await.map_err(cannot_connect)?;
        let mut store = RedisStore {
            cluster: config.server.is_clustered(),
            client,
            blocking,
            keys: Keys::new(prefix, shards.unwrap_or(DEFAULT_SHARDS)),
            next_shard: AtomicUsize::new(0),
            connection_error,
            replica_wait: None,
            queued: tokio::sync::Notify::new(),
            queued_on: parking_lot::Mutex::new(Vec::new()),
        };
        let version = store.server_version().await?;
        let major: u32 = version.split('.').next().and_then(|m| m.parse().ok()).unwrap_or(0);
        if major < 7 {
            return Err(StoreError::Fatal(format!(
                "Redis {version} is too old: workflow-orchestrator needs Redis 7.0 or newer (functions, XAUTOCLAIM)"
            )));
        }
        if shards.is_none() {
            store.keys = Keys::new(prefix, store.default_shards().await?);
        }
        store.install_schema().await?;
        Ok(store)
    }

    /// The shard count when none is asked for: the one recorded with the data; 16 for data of
    /// the builds that did not record it (their default), found by a ready stream beyond shard
    /// 0; for new data [`DEFAULT_SHARDS`] on a cluster, to spread over its primaries,
    /// and one on a standalone Redis, where shards only cost (each ready stream a group commit
    /// touches is one more fence read and acknowledgement in the call).
    async fn default_shards(&self) -> StoreResult<u16> {
        let recorded = text(&self.cmd("GET", vec![self.keys.shard_count().into()]).await?);
        if let Some(count) = recorded.and_then(|count| count.parse::<u16>().ok()) {
            return Ok(count);
        }
        let earlier = self.last_ready_stream(1..DEFAULT_SHARDS).await?.is_some();
        Ok(if self.cluster || earlier { DEFAULT_SHARDS } else { 1 })
    }

    /// The last shard of `shards` whose ready stream exists: data there was written with at
    /// least one more shard. (A ready stream's key does not depend on the shard count.)
    async fn last_ready_stream(&self, shards: std::ops::Range<u16>) -> StoreResult<Option<u16>> {
        let first = shards.start;
        let probes = shards.map(|shard| self.cmd("EXISTS", vec![self.keys.ready(shard).into()]));
        // A few in flight, not up to `MAX_SHARDS` at once: the memory of a thousand commands
        // in flight stays with the allocator, and an idle replica would keep it.
        let found: Vec<Value> = futures::stream::iter(probes).buffered(SHARD_PROBES_IN_FLIGHT).try_collect().await?;
        Ok(found.iter().rposition(|found| found.as_i64() == Some(1)).map(|last| first + last as u16))
    }

    /// Acknowledges writes only once `wait.replicas` replicas have them (see [`ReplicaWait`]).
    pub fn wait_for_replicas(mut self, wait: ReplicaWait) -> RedisStore {
        self.replica_wait = (wait.replicas > 0).then_some(wait);
        self
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Whether this store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    async fn cmd(&self, name: &'static str, args: Vec<Value>) -> StoreResult<Value> {
        self.cmd_on(self.client.next(), name, args).await
    }

    async fn cmd_on(
        &self,
        client: &impl fred::interfaces::ClientLike,
        name: &'static str,
        args: Vec<Value>,
    ) -> StoreResult<Value> {
        let route = if self.cluster { route(name, &args) } else { ClusterHash::FirstKey };
        client.custom(CustomCommand::new_static(name, route, false), args).await.map_err(|err| {
            // A command that waited out a reconnection says "Timeout": name the cause too.
            match self.connection_error.lock().as_deref() {
                Some(cause) if *err.kind() == fred::error::ErrorKind::Timeout => {
                    StoreError::Unavailable(format!("{err} ({cause})"))
                }
                _ => unavailable(err),
            }
        })
    }

    /// The primaries of the cluster (empty on a standalone Redis).
    fn primaries(&self) -> Vec<fred::types::config::Server> {
        use fred::interfaces::ClusterInterface;
        self.client.next().cached_cluster_state().map(|state| state.unique_primary_nodes()).unwrap_or_default()
    }

    /// `FUNCTION args...` on the one Redis, or on every primary of a cluster (functions are
    /// per node; replicas get them by replication).
    async fn function_everywhere(&self, args: Vec<Value>) -> StoreResult<Vec<Value>> {
        if !self.cluster {
            return Ok(vec![self.cmd("FUNCTION", args).await?]);
        }
        let primaries = self.primaries();
        if primaries.is_empty() {
            return Err(StoreError::Unavailable("the cluster's primaries are not known yet".to_owned()));
        }
        let client = self.client.next();
        let calls = primaries.iter().map(|node| self.cmd_on_node(client, node, "FUNCTION", args.clone()));
        join_all(calls).await.into_iter().collect()
    }

    async fn cmd_on_node(
        &self,
        client: &fred::prelude::Client,
        node: &fred::types::config::Server,
        name: &'static str,
        args: Vec<Value>,
    ) -> StoreResult<Value> {
        self.cmd_on(&client.with_cluster_node(node.clone()), name, args)
            .await
            .map_err(|err| StoreError::Unavailable(format!("{err} (on the cluster node {node})")))
    }

    async fn server_version(&self) -> StoreResult<String> {
        let info = self.cmd("INFO", vec!["server".into()]).await?;
        let info = text(&info).unwrap_or_default();
        Ok(info
            .lines()
            .find_map(|line| line.strip_prefix("redis_version:"))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned()))
    }

    /// Loads the Lua library and the consumer groups; checks the schema version is not newer
    /// than this binary's, and upgrades data of schema 1 in place (see [`RedisStore::upgrade_v1`]).
    async fn install_schema(&self) -> StoreResult<()> {
        let schema_key = self.keys.schema_version();
        let upgrading_key = self.keys.schema_upgrading();
        let stored = self.cmd("GET", vec![schema_key.clone().into()]).await?;
        let stored = text(&stored).and_then(|v| v.parse::<u64>().ok());
        if let Some(stored) = stored
            && stored > SCHEMA_VERSION
        {
            return Err(StoreError::Fatal(format!(
                "the data under this KEY_PREFIX was written by a newer version (schema {stored}, this binary knows {SCHEMA_VERSION}); upgrade this binary"
            )));
        }
        if stored == Some(1) && self.cluster {
            // Schema 1 never ran on a cluster (its claim read every shard in one call).
            return Err(StoreError::Fatal(
                "the data under this KEY_PREFIX is of schema 1, which cannot have been written on a Redis Cluster; upgrade it on a standalone Redis first".to_owned(),
            ));
        }
        if stored == Some(1) {
            // Marked first, so that a replica starting while this one upgrades upgrades too;
            // then schema 1's library goes, so that no replica of the old version writes a log
            // of the old shape from now on (its reinstall refuses the newer schema).
            self.cmd("SET", vec![upgrading_key.clone().into(), "1".into()]).await?;
            self.cmd("SET", vec![schema_key.clone().into(), SCHEMA_VERSION.to_string().into()]).await?;
            match self.function_everywhere(vec!["DELETE".into(), V1_LIBRARY_NAME.into()]).await {
                Ok(_) => {}
                Err(StoreError::Unavailable(msg)) if msg.contains("not found") || msg.contains("no such") => {}
                Err(err) => return Err(err),
            }
        }
        self.check_libraries().await?;
        self.check_shards().await?;
        self.function_everywhere(vec!["LOAD".into(), "REPLACE".into(), LIBRARY.into()])
            .await
            .map_err(|err| StoreError::Fatal(format!("cannot load the Lua library: {err}")))?;
        if !self.cmd("GET", vec![upgrading_key.clone().into()]).await?.is_null() {
            let upgraded = self.upgrade_v1().await?;
            tracing::info!(runs = upgraded, "upgraded the runs of schema 1 to schema {SCHEMA_VERSION}");
            self.cmd("DEL", vec![upgrading_key.into()]).await?;
        }
        self.cmd("SET", vec![schema_key.into(), SCHEMA_VERSION.to_string().into()]).await?;
        let groups = (0..self.keys.shards()).map(|shard| {
            self.cmd(
                "XGROUP",
                vec![
                    "CREATE".into(),
                    self.keys.ready(shard).into(),
                    WORKERS_GROUP.into(),
                    "0".into(),
                    "MKSTREAM".into(),
                ],
            )
        });
        let bus = self.cmd(
            "XGROUP",
            vec!["CREATE".into(), self.keys.events().into(), ROUTER_GROUP.into(), "0".into(), "MKSTREAM".into()],
        );
        for result in join_all(groups.chain(std::iter::once(bus))).await {
            match result {
                Ok(_) => {}
                Err(StoreError::Unavailable(msg)) if msg.contains("BUSYGROUP") => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// Refuses a Redis (every primary of a cluster) holding the library of a newer schema: its
    /// replicas write data this binary cannot read, and loading ours beside it would not stop
    /// them.
    async fn check_libraries(&self) -> StoreResult<()> {
        for listing in self.function_everywhere(vec!["LIST".into(), "LIBRARYNAME".into(), "wfo_v".into()]).await? {
            for library in listing.into_array() {
                let name = field(&fields(library), "library_name").and_then(text).unwrap_or_default();
                let version = name.strip_prefix("wfo_v").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                if version > SCHEMA_VERSION {
                    return Err(StoreError::Fatal(format!(
                        "Redis holds the Lua library `{name}` of a newer version (schema {version}, this binary knows {SCHEMA_VERSION}); upgrade this binary"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Refuses a shard count other than the data's: runs, idempotency keys and limit groups are
    /// placed by it, so a replica counting otherwise would leave runs unclaimed and could start
    /// a run twice. The first replica of a store records its count; for data of a build that
    /// did not record it, a ready stream of a shard beyond the count gives the data away.
    async fn check_shards(&self) -> StoreResult<()> {
        let key = self.keys.shard_count();
        let configured = self.keys.shards();
        let refuse = |stored: &str| {
            StoreError::Fatal(format!(
                "SHARDS={configured}, but the data under this KEY_PREFIX is spread over {stored} shards (`{key}`): \
                 runs, idempotency keys and limits are placed by that count, so this replica would leave runs \
                 unclaimed and could start some twice; set SHARDS={stored}"
            ))
        };
        if let Some(stored) = text(&self.cmd("GET", vec![key.clone().into()]).await?) {
            return if stored.parse::<u16>().ok() == Some(configured) { Ok(()) } else { Err(refuse(&stored)) };
        }
        if let Some(shard) = self.last_ready_stream(configured..MAX_SHARDS).await? {
            return Err(StoreError::Fatal(format!(
                "SHARDS={configured}, but the data under this KEY_PREFIX has runs on shard {shard}: it was written with \
                 more shards (at least {}); set SHARDS to the count it was written with",
                shard + 1
            )));
        }
        self.cmd("SET", vec![key.clone().into(), configured.to_string().into(), "NX".into()]).await?;
        // A replica with another count may have recorded its own first.
        match text(&self.cmd("GET", vec![key.clone().into()]).await?) {
            Some(stored) if stored.parse::<u16>().ok() != Some(configured) => Err(refuse(&stored)),
            _ => Ok(()),
        }
    }

    /// Rewrites every run log of schema 1 in the shape of schema 2: a live run's stream and a
    /// finished run's compacted string both become the run's list, one run per atomic call (a
    /// run already upgraded, by a replica upgrading at the same time, is left alone). Live runs
    /// go on afterwards: their seqs, summaries, ready entries and timers are unchanged.
    async fn upgrade_v1(&self) -> StoreResult<u64> {
        let mut upgraded = 0;
        for shard in 0..self.keys.shards() {
            for kind in ["log", "hist"] {
                let pattern = self.keys.v1_logs_pattern(shard, kind);
                let marker = format!(":{kind}:");
                let mut cursor = "0".to_owned();
                loop {
                    let reply = self
                        .cmd(
                            "SCAN",
                            vec![cursor.into(), "MATCH".into(), pattern.clone().into(), "COUNT".into(), 1000.into()],
                        )
                        .await?
                        .into_array();
                    let mut reply = reply.into_iter();
                    cursor = reply.next().as_ref().and_then(text).unwrap_or_else(|| "0".to_owned());
                    let found = reply.next().map(Value::into_array).unwrap_or_default();
                    for key in found.iter().filter_map(text) {
                        let Some(run) = key.rsplit_once(marker.as_str()).and_then(|(_, id)| id.parse::<RunId>().ok())
                        else {
                            tracing::warn!(%key, "not a run log of schema 1; left as it is");
                            continue;
                        };
                        let moved = if kind == "log" {
                            self.fcall_once("wfo_v2_migrate_log", vec![key.clone(), self.keys.log(&run)], Vec::new())
                                .await?
                        } else {
                            let blob = self.cmd("GET", vec![key.clone().into()]).await?;
                            let Some(bytes) = blob.as_bytes() else { continue };
                            let records = decode_compacted(bytes).map_err(|p| corrupt(&key, p))?;
                            let mut args = vec![Value::from(bytes.len().to_string())];
                            args.extend(records.iter().map(|r| Value::Bytes(encode_recorded(r).into())));
                            self.fcall_once("wfo_v2_migrate_history", vec![key.clone(), self.keys.log(&run)], args)
                                .await?
                        };
                        if moved.as_i64().unwrap_or(0) > 0 {
                            upgraded += 1;
                        }
                    }
                    if cursor == "0" {
                        break;
                    }
                }
            }
        }
        Ok(upgraded)
    }

    /// `FCALL`, reinstalling the library once if Redis lost it (restarted without persistence).
    async fn fcall(&self, function: &'static str, keys: Vec<String>, args: Vec<Value>) -> StoreResult<Value> {
        self.fcall_on(self.client.next(), function, keys, args).await
    }

    /// [`RedisStore::fcall`] on the connections of `client`.
    async fn fcall_on(
        &self,
        client: &fred::prelude::Client,
        function: &'static str,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> StoreResult<Value> {
        let call = fcall_args(function, keys, args);
        self.fcall_on_with(client, call.clone(), || call).await
    }

    /// `FCALL` with the arguments `call`, on the connections of `client`; if Redis lost the
    /// library, it is reinstalled and the call sent again as `again` builds it (a hot path
    /// builds its arguments twice in that rare case rather than copy them every time).
    async fn fcall_on_with(
        &self,
        client: &fred::prelude::Client,
        call: Vec<Value>,
        again: impl FnOnce() -> Vec<Value>,
    ) -> StoreResult<Value> {
        match self.cmd_on(client, "FCALL", call).await {
            Err(StoreError::Unavailable(msg)) if msg.contains("Function not found") || msg.contains("NOGROUP") => {
                tracing::warn!(
                    "Redis lost the Lua library or the consumer groups (restarted without persistence?); reinstalling"
                );
                Box::pin(self.install_schema()).await?;
                self.cmd_on(client, "FCALL", again()).await
            }
            other => other,
        }
    }

    /// `FCALL` of a write that is acknowledged to the outside: with `REDIS_WAIT_REPLICAS`, not
    /// before that many replicas have it. `WAIT` goes on the connection that carried the write
    /// (so it counts it), to the node of its first key.
    async fn fcall_acknowledged(
        &self,
        function: &'static str,
        keys: Vec<String>,
        args: Vec<Value>,
    ) -> StoreResult<Value> {
        let call = fcall_args(function, keys, args);
        self.fcall_acknowledged_with(function, call.clone(), || call).await
    }

    /// [`RedisStore::fcall_acknowledged`] of the arguments `call` (as [`fcall_args`] makes
    /// them), built again by `again` if the call must be sent again (see `fcall_on_with`).
    async fn fcall_acknowledged_with(
        &self,
        function: &'static str,
        call: Vec<Value>,
        again: impl FnOnce() -> Vec<Value>,
    ) -> StoreResult<Value> {
        let client = self.client.next();
        let Some(wait) = self.replica_wait else { return self.fcall_on_with(client, call, again).await };
        // The first key follows the function's name and the count of keys.
        let slot = match call.get(1).and_then(Value::as_i64) {
            Some(keys) if keys > 0 => call.get(2).and_then(Value::as_bytes).map_or(0, fred::util::redis_keyslot),
            _ => 0,
        };
        let reply = self.fcall_on_with(client, call, again).await?;
        let confirmed = client
            .custom::<Value, Value>(
                CustomCommand::new_static("WAIT", ClusterHash::Custom(slot), false),
                vec![Value::from(i64::from(wait.replicas)), Value::from(wait.timeout.as_millis() as i64)],
            )
            .await
            .map_err(unavailable)?;
        let confirmed = confirmed.as_i64().unwrap_or(0);
        if confirmed < i64::from(wait.replicas) {
            return Err(StoreError::Unavailable(format!(
                "{function}: written, but only {confirmed} of the {} replicas asked for (REDIS_WAIT_REPLICAS) confirmed it within {} ms; not acknowledged, try again",
                wait.replicas,
                wait.timeout.as_millis()
            )));
        }
        Ok(reply)
    }

    /// `FCALL` as it is, for the installation itself.
    async fn fcall_once(&self, function: &'static str, keys: Vec<String>, args: Vec<Value>) -> StoreResult<Value> {
        self.cmd("FCALL", fcall_args(function, keys, args)).await
    }

    fn decode_claimed(&self, shard: u16, id: String, data: Option<&[u8]>, deliveries: u64, consumer: &str) -> Claimed {
        let task = match data {
            Some(bytes) => decode_task(bytes),
            None => Err("ready entry without a `data` field".to_owned()),
        };
        Claimed { lease: Lease { shard, entry: id, consumer: consumer.to_owned() }, deliveries, task }
    }

    /// One `XREADGROUP` of new entries of `shards`' ready streams, up to `count` from each:
    /// blocking for `block` on the blocking connection, or not at all on the pool's.
    async fn read_ready(
        &self,
        consumer: &str,
        shards: &[u16],
        count: usize,
        block: Option<Duration>,
    ) -> StoreResult<Vec<Claimed>> {
        let mut args: Vec<Value> =
            vec!["GROUP".into(), WORKERS_GROUP.into(), consumer.into(), "COUNT".into(), (count as i64).into()];
        if let Some(block) = block {
            // `BLOCK 0` would wait forever: a zero block waits one millisecond.
            args.extend(["BLOCK".into(), (block.as_millis().max(1) as i64).into()]);
        }
        args.push("STREAMS".into());
        args.extend(shards.iter().map(|s| Value::from(self.keys.ready(*s))));
        args.extend(shards.iter().map(|_| Value::from(">")));
        let reply = match block {
            Some(_) => {
                self.blocking
                    .custom::<Value, Value>(CustomCommand::new_static("XREADGROUP", None::<u16>, true), args)
                    .await
            }
            None => {
                self.client
                    .next()
                    .custom::<Value, Value>(CustomCommand::new_static("XREADGROUP", None::<u16>, false), args)
                    .await
            }
        };
        let reply = match reply {
            Ok(reply) => reply,
            Err(err) if err.to_string().contains("NOGROUP") => {
                tracing::warn!("consumer groups missing (Redis restarted without persistence?); recreating");
                self.install_schema().await?;
                return Ok(Vec::new());
            }
            Err(err) => return Err(unavailable(err)),
        };
        let streams: Vec<(String, Value)> = match reply {
            Value::Null => Vec::new(),
            Value::Map(map) => map
                .inner()
                .into_iter()
                .map(|(k, v)| (k.as_str().map(|s| s.to_string()).unwrap_or_default(), v))
                .collect(),
            Value::Array(items) => items
                .into_iter()
                .filter_map(|pair| {
                    let mut parts = pair.into_array().into_iter();
                    Some((text(&parts.next()?)?, parts.next()?))
                })
                .collect(),
            _ => Vec::new(),
        };
        let mut claimed = Vec::new();
        for (stream, body) in streams {
            let Some(&shard) = shards.iter().find(|s| self.keys.ready(**s) == stream) else { continue };
            for (id, fields) in entries(body) {
                claimed.push(self.decode_claimed(shard, id, data_of(&fields), 1, consumer));
            }
        }
        Ok(claimed)
    }

    /// `wfo_v2_claim` of one shard: up to `max` of its queued entries.
    async fn claim_shard(&self, consumer: &str, shard: u16, max: usize) -> StoreResult<Vec<Claimed>> {
        let reply = self
            .fcall(
                "wfo_v2_claim",
                vec![self.keys.ready(shard)],
                vec![WORKERS_GROUP.into(), consumer.into(), (max as i64).into()],
            )
            .await?;
        let mut claimed = Vec::new();
        for entry in reply.into_array() {
            let mut parts = entry.into_array().into_iter().skip(1);
            let (Some(id), Some(body)) = (parts.next(), parts.next()) else { continue };
            let Some(id) = text(&id) else { continue };
            claimed.push(self.decode_claimed(shard, id, data_of(&fields(body)), 1, consumer));
        }
        Ok(claimed)
    }

    /// A claim on a cluster, where no read may span slots (so no blocking read can wait on
    /// every shard at once): rounds of non-blocking claims, shard by shard from `order`'s first,
    /// never more than `max` in all; between rounds that found nothing a pause that doubles up to
    /// `CLAIM_POLL_MAX`, cut short when this replica queues a step itself. With at least as many
    /// free executors as shards every shard is asked at once, for its share.
    async fn claim_per_shard(
        &self,
        consumer: &str,
        max: usize,
        block: Duration,
        order: &[u16],
    ) -> StoreResult<Vec<Claimed>> {
        let deadline = tokio::time::Instant::now() + block;
        let mut pause = CLAIM_POLL_MIN;
        loop {
            // Listening before the round, so that a step this replica queues during it is not
            // missed.
            let queued = self.queued.notified();
            tokio::pin!(queued);
            queued.as_mut().enable();
            let mut claimed = Vec::new();
            if max >= order.len() {
                let share = max / order.len();
                let extra = max % order.len();
                let calls = order
                    .iter()
                    .enumerate()
                    .map(|(i, shard)| self.claim_shard(consumer, *shard, share + usize::from(i < extra)));
                for found in join_all(calls).await {
                    claimed.extend(found?);
                }
            } else {
                for shard in order {
                    if claimed.len() >= max {
                        break;
                    }
                    claimed.extend(self.claim_shard(consumer, *shard, max - claimed.len()).await?);
                }
            }
            let now = tokio::time::Instant::now();
            if !claimed.is_empty() || now >= deadline {
                self.bury(&claimed).await?;
                return Ok(claimed);
            }
            tokio::select! {
                _ = tokio::time::sleep(pause.min(deadline - now)) => {}
                _ = queued => {}
            }
            pause = (pause * 2).min(CLAIM_POLL_MAX);
        }
    }

    /// Moves undecodable entries to the shard's dead-letter stream (and acks them).
    async fn bury(&self, claimed: &[Claimed]) -> StoreResult<()> {
        for c in claimed {
            if let Err(reason) = &c.task {
                tracing::error!(entry = %c.lease.entry, shard = c.lease.shard, %reason, "dead-lettering a malformed ready entry");
                self.fcall(
                    "wfo_v2_dead_letter",
                    vec![self.keys.ready(c.lease.shard), self.keys.ready_dead(c.lease.shard)],
                    vec![WORKERS_GROUP.into(), c.lease.entry.clone().into(), reason.clone().into()],
                )
                .await?;
            }
        }
        Ok(())
    }

    /// A range of a bus stream (the bus or its dead letters) through `wfo_v2_bus_range`, cut to
    /// `cap` in Redis. `direction` is `rev` (from `from` down to `to`) or `fwd`.
    async fn bus_range(
        &self,
        stream: &str,
        direction: &'static str,
        from: &str,
        to: &str,
        count: usize,
        cap: EntryCap,
    ) -> StoreResult<Vec<BusEntry>> {
        let reply = self
            .fcall(
                "wfo_v2_bus_range",
                vec![stream.to_owned()],
                vec![
                    direction.into(),
                    from.into(),
                    to.into(),
                    (count.max(1) as i64).into(),
                    (cap.max_bytes as i64).into(),
                    (cap.keep_bytes as i64).into(),
                ],
            )
            .await?;
        Ok(reply.into_array().into_iter().filter_map(|entry| cut_entry(entry, 0)).collect())
    }

    /// Appends a bus entry's dead letter (bounded: see [`super::dead_letter_fields`]).
    async fn write_dead_letter(&self, entry: &BusEntry, reason: &str) -> StoreResult<()> {
        let mut args: Vec<Value> =
            vec![self.keys.events_dead().into(), "MAXLEN".into(), "~".into(), "100000".into(), "*".into()];
        for (name, value) in super::dead_letter_fields(entry, reason) {
            args.push(Value::Bytes(name.into()));
            args.push(Value::Bytes(value.into()));
        }
        self.cmd("XADD", args).await?;
        Ok(())
    }

    /// What the bus has had removed for ids ahead of the clock.
    async fn bus_condition(&self) -> StoreResult<BusCondition> {
        let reply = self.cmd("HGETALL", vec![self.keys.events_hostile().into()]).await?;
        let mut condition = BusCondition::default();
        let (mut last_id, mut last_at) = (None, None);
        for (name, value) in fields(reply) {
            match name.as_str() {
                "removed" => condition.hostile_removed = text(&value).and_then(|v| v.parse().ok()).unwrap_or(0),
                "last_id" => last_id = text(&value),
                "last_at" => last_at = text(&value).and_then(|v| v.parse::<Millis>().ok()),
                _ => {}
            }
        }
        condition.last_hostile = last_id.zip(last_at);
        Ok(condition)
    }

    /// Sends one `wfo_v2_commit_steps` (or `wfo_v2_requeue_steps`) of `parts`: one outcome per
    /// part, in order, each `(tag, rest)`; and the entries it claimed, up to `claim`, for the
    /// consumer of the parts' leases (after the commits, as `commit_steps` does).
    async fn call_commit(
        &self,
        parts: &[CommitPart<'_>],
        function: &'static str,
        claim: usize,
    ) -> StoreResult<(Vec<(String, Vec<Value>)>, Vec<Claimed>)> {
        // Every lease of one call is one replica's: the executors' batches are per replica.
        let consumer = parts.iter().find_map(|p| p.lease).map_or("", |l| l.consumer.as_str());
        let build = || {
            let mut call = CommitCall::default();
            call.args.push(Value::from_static_str(WORKERS_GROUP));
            call.args.push(consumer.into());
            call.args.push(parts.len().to_string().into());
            for part in parts {
                call.push(&self.keys, part);
            }
            if claim > 0 {
                call.args.push(Value::from(claim as i64));
            }
            call
        };
        let call = build();
        let shards = call.shards;
        let again = || {
            let call = build();
            fcall_args(function, call.keys, call.args)
        };
        let reply = self.fcall_acknowledged_with(function, fcall_args(function, call.keys, call.args), again).await?;
        if parts.iter().any(|part| !part.dispatch.is_empty()) {
            let mut queued_on = self.queued_on.lock();
            for part in parts.iter().filter(|part| !part.dispatch.is_empty()) {
                if queued_on.len() < QUEUED_ON_MAX && !queued_on.contains(&part.run.shard) {
                    queued_on.push(part.run.shard);
                }
            }
            drop(queued_on);
            self.queued.notify_waiters();
        }
        let mut reply = reply.into_array();
        if reply.len() < parts.len() {
            return Err(corrupt(function, format!("{} outcomes for {} commits", reply.len(), parts.len())));
        }
        let entries = reply.split_off(parts.len());
        let outcomes: Vec<(String, Vec<Value>)> = reply.into_iter().map(outcome).collect::<StoreResult<_>>()?;
        let mut claimed = Vec::new();
        for entry in entries.chunks(3) {
            let [index, id, data] = entry else {
                return Err(corrupt(function, "a claimed entry of fewer than 3 items"));
            };
            let index = index.as_i64().and_then(|i| usize::try_from(i).ok());
            let shard = shards.iter().find(|(_, at)| Some(*at) == index).map(|(shard, _)| *shard);
            let (Some(shard), Some(id)) = (shard, text(id)) else {
                return Err(corrupt(function, "a claimed entry of an unknown stream"));
            };
            claimed.push(self.decode_claimed(shard, id, data.as_bytes(), 1, consumer));
        }
        self.bury(&claimed).await?;
        Ok((outcomes, claimed))
    }

    /// The part of a `wfo_v2_commit_group` call that carries `commit` (`reopen`: resuming a
    /// finished run, which moves it back among the live runs).
    fn commit_part<'a>(&self, commit: &'a Commit, reopen: bool) -> CommitPart<'a> {
        let shard = commit.run.shard;
        let state = &commit.state;
        let terminal = state.status.is_terminal();
        let status = state.status.name();
        // What a transition may change (`seq` is set by the function from the records).
        let (step, attempt) = state.position().unzip();
        let fields = vec![
            ("status", status.to_owned()),
            ("step", step.map_or_else(String::new, |s| s.to_string())),
            ("attempt", attempt.map_or_else(String::new, |a| a.to_string())),
            ("updated_at", state.updated_at.to_string()),
        ];
        let indexes = if terminal {
            vec![
                (self.keys.index_finished(shard, status), Some(state.created_at)),
                (self.keys.index_workflow_finished(shard, &state.workflow, status), Some(state.created_at)),
                (self.keys.index_active(shard), None),
            ]
        } else if reopen {
            // Back among the live runs, out of the finished ones (it was `failed`).
            vec![
                (self.keys.index_active(shard), Some(state.created_at)),
                (self.keys.index_finished(shard, "failed"), None),
                (self.keys.index_workflow_finished(shard, &state.workflow, "failed"), None),
            ]
        } else {
            Vec::new()
        };
        // The lease's entry is the run's only live one when no step but those the commit
        // queues has a ready entry after it: nothing else was in flight beside the lease's
        // step, so the function needs no read of the run's live entries, and checks its seq by
        // the log's length (see `check` in the library).
        let sole = commit.lease.is_some()
            && !reopen
            && !commit.records.is_empty()
            && commit.state.steps.iter().all(|(step, status)| {
                !status.has_ready_entry() || commit.dispatch.iter().any(|dispatch| dispatch.step == *step)
            });
        CommitPart {
            run: &commit.run,
            expected_seq: commit.expected_seq,
            lease: commit.lease.as_ref(),
            reopen,
            sole,
            ends: terminal && !commit.records.is_empty(),
            records: &commit.records,
            fields,
            state: &commit.state,
            dispatch: &commit.dispatch,
            timer: commit.timer,
            // A run that ends may have a timer to remove: one ended from elsewhere (a cancel, a
            // time-out), or by a step while a sibling of it was parked or retrying.
            clear_timer: commit.clear_timer
                || (terminal && (commit.lease.is_none() || commit.state.steps.values().any(|s| s.timer().is_some()))),
            idempotency: None,
            indexes,
        }
    }

    /// Sends `items` in as few calls as Redis allows, `call` making each: one call on a
    /// standalone Redis; on a cluster, where one call holds keys of one slot, a call per shard,
    /// all at once. Each outcome is put back in its item's place.
    async fn by_call<'a, T, O, Call, Calls>(
        &self,
        items: &[&'a T],
        shard_of: impl Fn(&T) -> u16,
        call: Call,
    ) -> StoreResult<Vec<O>>
    where
        Call: Fn(Vec<&'a T>) -> Calls,
        Calls: std::future::Future<Output = StoreResult<Vec<O>>>,
    {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        if !self.cluster {
            return call(items.to_vec()).await;
        }
        let mut by_shard: std::collections::BTreeMap<u16, Vec<usize>> = std::collections::BTreeMap::new();
        for (index, item) in items.iter().enumerate() {
            by_shard.entry(shard_of(item)).or_default().push(index);
        }
        let groups: Vec<Vec<usize>> = by_shard.into_values().collect();
        let calls = groups.iter().map(|indexes| call(indexes.iter().map(|i| items[*i]).collect()));
        let mut outcomes: Vec<Option<O>> = (0..items.len()).map(|_| None).collect();
        for (indexes, result) in groups.iter().zip(join_all(calls).await) {
            for (index, outcome) in indexes.iter().zip(result?) {
                outcomes[*index] = Some(outcome);
            }
        }
        outcomes.into_iter().map(|o| o.ok_or_else(|| corrupt(COMMIT, "a call without an outcome for each"))).collect()
    }

    /// Creates `runs` in one `wfo_v2_commit_steps` call (a creation is a commit at seq 0).
    async fn apply_creations(&self, runs: Vec<&NewRun>) -> StoreResult<Vec<Created>> {
        let parts: Vec<CommitPart<'_>> = runs.iter().map(|new| self.creation_part(new)).collect();
        let outcomes = self.call_commit(&parts, COMMIT, 0).await?.0;
        runs.iter()
            .zip(outcomes)
            .map(|(new, (tag, rest))| match tag.as_str() {
                "ok" => Ok(Created::New(new.run.clone())),
                "duplicate" => Ok(Created::Duplicate(rest.first().and_then(text).unwrap_or_default())),
                // The run id is fresh, so a run already there is this very call's: the client
                // resent it after a lost reply (a reconnect), and the first one created the run.
                "stale" => Ok(Created::New(new.run.clone())),
                other => Err(corrupt(&self.keys.run(&new.run), format!("creating a run answered `{other}`"))),
            })
            .collect()
    }

    /// The part of a `wfo_v2_commit_steps` call that creates `new`.
    fn creation_part<'a>(&self, new: &'a NewRun) -> CommitPart<'a> {
        let shard = new.run.shard;
        let created = new.state.created_at;
        CommitPart {
            run: &new.run,
            expected_seq: 0,
            lease: None,
            reopen: false,
            sole: false,
            ends: false,
            records: &new.records,
            // `seq` is set by the function, from the records.
            fields: summary_fields(&RunSummary { search: new.search.clone(), ..RunSummary::of(&new.state) })
                .into_iter()
                .filter(|(name, _)| *name != "seq")
                .collect(),
            state: &new.state,
            dispatch: &new.dispatch,
            timer: None,
            clear_timer: false,
            idempotency: new.idempotency.as_ref(),
            indexes: [self.keys.index_workflow(shard, &new.state.workflow), self.keys.index_active(shard)]
                .into_iter()
                .chain(
                    new.search
                        .iter()
                        .map(|(field, value)| self.keys.index_search(shard, &new.state.workflow, field, value)),
                )
                .map(|key| (key, Some(created)))
                .collect(),
        }
    }

    /// The executors' commits of one call, each that asks for it given the next entry claimed.
    async fn apply_steps(&self, steps: Vec<&StepCommit>) -> StoreResult<Vec<StepCommitted>> {
        let asks = |step: &StepCommit| step.claim_next && step.commit.lease.is_some();
        let claim = steps.iter().filter(|step| asks(step)).count();
        let commits = steps.iter().map(|step| &step.commit).collect();
        let (outcomes, claimed) = self.apply_commits(commits, false, COMMIT, claim).await?;
        let mut claimed = claimed.into_iter();
        Ok(steps
            .iter()
            .zip(outcomes)
            .map(|(step, outcome)| StepCommitted { outcome, next: if asks(step) { claimed.next() } else { None } })
            .collect())
    }

    /// Commits `commits` in one call and reads each outcome; and the entries it claimed, up to
    /// `claim` (see `call_commit`).
    async fn apply_commits(
        &self,
        commits: Vec<&Commit>,
        reopen: bool,
        function: &'static str,
        claim: usize,
    ) -> StoreResult<(Vec<CommitOutcome>, Vec<Claimed>)> {
        let parts: Vec<CommitPart<'_>> = commits.iter().map(|c| self.commit_part(c, reopen)).collect();
        let (outcomes, claimed) = self.call_commit(&parts, function, claim).await?;
        let outcomes = commits
            .iter()
            .zip(outcomes)
            .map(|(commit, (tag, rest))| {
                Ok(match tag.as_str() {
                    "ok" => CommitOutcome::Applied {
                        seq: rest.first().and_then(text).and_then(|s| s.parse().ok()).unwrap_or(0),
                    },
                    "stale" => CommitOutcome::Stale,
                    "lease_lost" => CommitOutcome::LeaseLost,
                    "gone" => CommitOutcome::Gone,
                    other => return Err(corrupt(&self.keys.run(&commit.run), format!("commit answered `{other}`"))),
                })
            })
            .collect::<StoreResult<_>>()?;
        Ok((outcomes, claimed))
    }

    /// The last id of `stream` delivered to consumer group `group`: the entries after it are
    /// queued. `None` when the group is missing.
    async fn last_delivered(&self, stream: &str, group: &str) -> StoreResult<Option<String>> {
        let groups = self.cmd("XINFO", vec!["GROUPS".into(), stream.into()]).await?;
        Ok(groups.into_array().into_iter().find_map(|info| {
            let info = fields(info);
            let name = field(&info, "name").and_then(text)?;
            (name == group).then(|| field(&info, "last-delivered-id").and_then(text)).flatten()
        }))
    }

    /// The oldest id of `stream` that consumer group `group` has not handled: its oldest pending
    /// entry, or the one after its last delivered entry. `None` when the group is missing.
    async fn oldest_unhandled(&self, stream: &str, group: &str) -> StoreResult<Option<String>> {
        let Some(last_delivered) = self.last_delivered(stream, group).await? else { return Ok(None) };
        let pending = self.cmd("XPENDING", vec![stream.into(), group.into()]).await?.into_array();
        let Some(mut oldest) = successor(&last_delivered) else { return Ok(None) };
        if let Some(pending) = pending.get(1).and_then(text)
            && compare_ids(&pending, &oldest).is_lt()
        {
            oldest = pending;
        }
        Ok(Some(oldest))
    }

    /// The newest `fetch` runs of each shard's index `key_of(shard)` created before `before`'s
    /// millisecond, merged newest first, those not below the cursor left out.
    async fn index_page(
        &self,
        keys_of: impl Fn(u16) -> Vec<String>,
        before: Option<&RunId>,
        fetch: usize,
    ) -> StoreResult<Vec<RunId>> {
        let max_score = before.map_or_else(|| "+inf".to_owned(), |b| b.created_at().to_string());
        let keys: Vec<String> = (0..self.keys.shards()).flat_map(keys_of).collect();
        let reads = keys.into_iter().map(|key| {
            self.cmd(
                "ZREVRANGEBYSCORE",
                vec![
                    key.into(),
                    max_score.clone().into(),
                    "-inf".into(),
                    "LIMIT".into(),
                    "0".into(),
                    (fetch as i64).into(),
                ],
            )
        });
        let mut candidates: Vec<RunId> = Vec::new();
        for reply in join_all(reads).await {
            candidates.extend(reply?.into_array().iter().filter_map(|m| text(m)?.parse::<RunId>().ok()));
        }
        candidates.sort_by_key(|r| std::cmp::Reverse(r.uuid));
        if let Some(cursor) = before {
            candidates.retain(|r| r.uuid < cursor.uuid);
        }
        Ok(candidates)
    }

    async fn summaries(&self, runs: &[RunId]) -> StoreResult<Vec<Option<RunSummary>>> {
        join_all(runs.iter().map(|run| self.summary(run))).await.into_iter().collect()
    }
}

/// The arguments of `FCALL function`.
fn fcall_args(function: &'static str, keys: Vec<String>, args: Vec<Value>) -> Vec<Value> {
    let mut call = vec![Value::from(function), Value::from(keys.len() as i64)];
    call.extend(keys.into_iter().map(Value::from));
    call.extend(args);
    call
}

/// The one outcome of a call of one commit.
fn one(mut outcomes: Vec<CommitOutcome>) -> StoreResult<CommitOutcome> {
    outcomes.pop().ok_or_else(|| corrupt(COMMIT, "no outcome"))
}

/// A ready entry's `data` field.
fn data_of(fields: &[(String, Value)]) -> Option<&[u8]> {
    field(fields, "data").and_then(Value::as_bytes)
}

fn outcome(reply: Value) -> StoreResult<(String, Vec<Value>)> {
    let mut parts = reply.into_array().into_iter();
    let tag = parts.next().as_ref().and_then(text).ok_or_else(|| corrupt("wfo_v2 function", "empty reply"))?;
    Ok((tag, parts.collect()))
}

/// One run's transition as `wfo_v2_commit_group` takes it.
struct CommitPart<'a> {
    run: &'a RunId,
    expected_seq: u64,
    lease: Option<&'a Lease>,
    reopen: bool,
    /// The lease's entry is the run's only live one (see `commit_part`).
    sole: bool,
    /// The commit ends the run: its other queued entries are withdrawn.
    ends: bool,
    records: &'a [Recorded],
    /// Summary fields to set (`seq` is set by the function).
    fields: Vec<(&'static str, String)>,
    /// The run's state after the commit, which every ready entry carries.
    state: &'a RunState,
    dispatch: &'a [Dispatch],
    timer: Option<Millis>,
    clear_timer: bool,
    idempotency: Option<&'a (String, Duration)>,
    /// Index moves: `ZADD` with the score, or `ZREM` for `None`.
    indexes: Vec<(String, Option<Millis>)>,
}

/// The keys and arguments of one `wfo_v2_commit_group` call being built: each shard's ready
/// stream and timers once (runs of one shard share them), then each run's summary and log.
#[derive(Default)]
struct CommitCall {
    keys: Vec<String>,
    /// The index in KEYS of each shard's ready stream (its timers follow it).
    shards: Vec<(u16, usize)>,
    args: Vec<Value>,
}

impl CommitCall {
    /// Adds a key; its 1-based index in KEYS.
    fn key(&mut self, key: String) -> usize {
        self.keys.push(key);
        self.keys.len()
    }

    fn push(&mut self, keys: &Keys, part: &CommitPart<'_>) {
        let shard = part.run.shard;
        let shard_index = match self.shards.iter().find(|(s, _)| *s == shard) {
            Some((_, index)) => *index,
            None => {
                let index = self.key(keys.ready(shard));
                self.key(keys.timers(shard));
                self.shards.push((shard, index));
                index
            }
        };
        let run_index = self.key(keys.run(part.run));
        self.key(keys.log(part.run));
        let idempotency = part.idempotency.map(|(key, ttl)| (self.key(keys.idempotency(shard, key)), ttl));
        let indexes: Vec<(usize, Option<Millis>)> =
            part.indexes.iter().map(|(key, score)| (self.key(key.clone()), *score)).collect();
        let run_text = part.run.to_string();
        let args = &mut self.args;
        args.reserve(16 + part.records.len() + 2 * part.fields.len() + 2 * indexes.len());
        let number = |n: usize| Value::from(n as i64);
        args.push(run_text.as_str().into());
        args.push(Value::from(part.expected_seq as i64));
        args.push(number(shard_index));
        args.push(number(run_index));
        args.push(part.lease.map_or_else(|| "".into(), |l| l.entry.as_str().into()));
        let mut options = String::new();
        if part.reopen {
            options.push('r');
        }
        if part.clear_timer {
            options.push('t');
        }
        if part.ends {
            options.push('e');
        }
        if part.sole {
            options.push('s');
        }
        if idempotency.is_some() {
            options.push('i');
        }
        args.push(options.into());
        if let Some((index, ttl)) = idempotency {
            args.push(number(index));
            // `EX` counts whole seconds: round up, so a key is held at least its retention.
            args.push(Value::from(ttl.as_millis().div_ceil(1000).max(1) as i64));
        }
        args.push(number(part.records.len()));
        args.extend(part.records.iter().map(|recorded| Value::Bytes(encode_recorded(recorded).into())));
        args.push(number(part.fields.len()));
        for (name, value) in &part.fields {
            args.push(Value::from_static_str(name));
            args.push(value.as_str().into());
        }
        args.push(number(part.dispatch.len()));
        args.extend(
            part.dispatch.iter().map(|dispatch| Value::Bytes(encode_task(&run_text, *dispatch, part.state).into())),
        );
        args.push(part.timer.map_or_else(|| "".into(), |t| Value::from(t as i64)));
        args.push(number(indexes.len()));
        for (index, score) in indexes {
            args.push(number(index));
            args.push(score.map_or_else(|| "".into(), |s| Value::from(s as i64)));
        }
    }
}

#[async_trait]
impl Backend for RedisStore {
    fn kind(&self) -> StoreKind {
        StoreKind::Redis
    }

    fn shards(&self) -> u16 {
        self.keys.shards()
    }

    async fn now(&self) -> StoreResult<Millis> {
        let reply = self.cmd("TIME", Vec::new()).await?.into_array();
        let number = |v: Option<&Value>| v.and_then(text).and_then(|t| t.parse::<u64>().ok());
        match (number(reply.first()), number(reply.get(1))) {
            (Some(secs), Some(micros)) => Ok(secs * 1000 + micros / 1000),
            _ => Err(corrupt("TIME", "unexpected reply")),
        }
    }

    async fn health(&self) -> StoreResult<StoreHealth> {
        let version = self.server_version().await?;
        let mut warnings = Vec::new();
        match self.cmd("CONFIG", vec!["GET".into(), "maxmemory-policy".into()]).await {
            Ok(reply) => {
                let policy =
                    fields(reply).into_iter().find(|(k, _)| k == "maxmemory-policy").and_then(|(_, v)| text(&v));
                match policy.as_deref() {
                    Some("noeviction") => {}
                    Some(other) => warnings.push(format!(
                        "Redis maxmemory-policy is `{other}`: Redis may evict keys and silently lose runs; set `noeviction`"
                    )),
                    None => warnings.push("could not read Redis maxmemory-policy; make sure it is `noeviction`".to_owned()),
                }
            }
            Err(_) => warnings
                .push("CONFIG GET is not allowed: cannot check that maxmemory-policy is `noeviction`".to_owned()),
        }
        let bus = self.bus_condition().await?;
        if let Some(warning) = bus.warning(self.now().await?) {
            warnings.push(warning);
        }
        Ok(StoreHealth { kind: StoreKind::Redis, version: Some(version), warnings, bus })
    }

    fn connection_problem(&self) -> Option<String> {
        if self.client.clients().iter().any(|c| c.is_connected()) {
            return None;
        }
        Some(self.connection_error.lock().clone().unwrap_or_else(|| "not connected to Redis".to_owned()))
    }

    async fn memory_used(&self) -> StoreResult<Option<u64>> {
        let info = text(&self.cmd("INFO", vec!["memory".into()]).await?).unwrap_or_default();
        Ok(info.lines().find_map(|line| line.strip_prefix("used_memory:")).and_then(|v| v.trim().parse().ok()))
    }

    async fn stream_stats(&self) -> StoreResult<StreamStats> {
        let number = |reply: &Value| text(reply).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
        let pending_count = |reply: Value| reply.into_array().first().map_or(0, number);
        let mut stats = StreamStats::default();
        let lengths = (0..self.keys.shards()).map(|shard| self.cmd("XLEN", vec![self.keys.ready(shard).into()]));
        let pendings = (0..self.keys.shards())
            .map(|shard| self.cmd("XPENDING", vec![self.keys.ready(shard).into(), WORKERS_GROUP.into()]));
        let (lengths, pendings) = futures::join!(join_all(lengths), join_all(pendings));
        for reply in lengths {
            stats.ready_length += number(&reply?);
        }
        for reply in pendings {
            stats.ready_pending += pending_count(reply?);
        }
        let (events, dead) = self.event_counts().await?;
        stats.events_length = events;
        stats.events_dead = dead;
        stats.events_hostile_removed = self.bus_condition().await?.hostile_removed;
        stats.events_pending =
            pending_count(self.cmd("XPENDING", vec![self.keys.events().into(), ROUTER_GROUP.into()]).await?);
        Ok(stats)
    }
}

#[async_trait]
impl Definitions for RedisStore {
    async fn save_definitions(&self, workflows: &[Arc<Workflow>]) -> StoreResult<()> {
        let writes = workflows.iter().flat_map(|w| {
            (0..self.keys.shards()).map(move |shard| {
                self.cmd("SET", vec![self.keys.definition(shard, &w.hash).into(), w.snapshot.clone().into()])
            })
        });
        join_all(writes).await.into_iter().collect::<StoreResult<Vec<_>>>()?;
        Ok(())
    }

    async fn load_definition(&self, shard: u16, hash: &str) -> StoreResult<Option<Workflow>> {
        let key = self.keys.definition(shard, hash);
        let reply = self.cmd("GET", vec![key.clone().into()]).await?;
        match text(&reply) {
            None => Ok(None),
            Some(snapshot) => {
                Workflow::from_snapshot(hash, &snapshot).map(Some).map_err(|err| corrupt(&key, err.to_string()))
            }
        }
    }
}

#[async_trait]
impl Runs for RedisStore {
    async fn create_runs(&self, runs: Vec<NewRun>) -> StoreResult<Vec<Created>> {
        let runs: Vec<&NewRun> = runs.iter().collect();
        self.by_call(&runs, |new| new.run.shard, |group| self.apply_creations(group)).await
    }

    async fn commit(&self, commit: Commit) -> StoreResult<CommitOutcome> {
        one(self.apply_commits(vec![&commit], false, COMMIT, 0).await?.0)
    }

    async fn commit_steps(&self, commits: Vec<StepCommit>) -> StoreResult<Vec<StepCommitted>> {
        let steps: Vec<&StepCommit> = commits.iter().collect();
        self.by_call(&steps, |step| step.commit.run.shard, |group| self.apply_steps(group)).await
    }

    async fn reopen(&self, commit: Commit) -> StoreResult<CommitOutcome> {
        one(self.apply_commits(vec![&commit], true, COMMIT, 0).await?.0)
    }

    async fn requeue(&self, commit: Commit) -> StoreResult<CommitOutcome> {
        one(self.apply_commits(vec![&commit], false, REQUEUE, 0).await?.0)
    }

    async fn summary(&self, run: &RunId) -> StoreResult<Option<RunSummary>> {
        let key = self.keys.run(run);
        let reply = self.cmd("HGETALL", vec![key.clone().into()]).await?;
        let pairs: Vec<(String, String)> =
            fields(reply).into_iter().map(|(k, v)| (k, text(&v).unwrap_or_default())).collect();
        summary_from_fields(&key, pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    async fn history(&self, run: &RunId) -> StoreResult<Option<Vec<Logged>>> {
        let log_key = self.keys.log(run);
        let values = self.cmd("LRANGE", vec![log_key.clone().into(), 0.into(), (-1).into()]).await?.into_array();
        if values.is_empty() {
            return Ok(None);
        }
        values
            .iter()
            .enumerate()
            .map(|(i, value)| {
                let seq = i as u64 + 1;
                let bytes =
                    value.as_bytes().ok_or_else(|| corrupt(&log_key, format!("record {seq} is not a string")))?;
                let recorded = decode_recorded(bytes).map_err(|p| corrupt(&log_key, format!("record {seq}: {p}")))?;
                Ok(Logged { seq, recorded })
            })
            .collect::<StoreResult<Vec<Logged>>>()
            .map(Some)
    }

    async fn quiet_runs(&self, before: Millis, max: usize) -> StoreResult<Vec<(RunId, RunSummary)>> {
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        for shard in 0..self.keys.shards() {
            // Oldest first, page by page, so that runs busy since `before` do not hide the quiet
            // ones created after them. A run created at or after `before` cannot be quiet.
            let (mut found, mut offset) = (0, 0);
            while found < max {
                let members = self
                    .cmd(
                        "ZRANGEBYSCORE",
                        vec![
                            self.keys.index_active(shard).into(),
                            "-inf".into(),
                            format!("({before}").into(),
                            "LIMIT".into(),
                            (offset as i64).into(),
                            (max as i64).into(),
                        ],
                    )
                    .await?
                    .into_array();
                offset += members.len();
                let runs: Vec<RunId> = members.iter().filter_map(|m| text(m)?.parse().ok()).collect();
                for (run, summary) in runs.iter().zip(self.summaries(&runs).await?) {
                    let quiet = summary.filter(|s| s.updated_at < before && !s.status.is_terminal());
                    if let Some(summary) = quiet
                        && found < max
                    {
                        out.push((run.clone(), summary));
                        found += 1;
                    }
                }
                if members.len() < max {
                    break;
                }
            }
        }
        Ok(out)
    }

    async fn has_timer(&self, run: &RunId) -> StoreResult<bool> {
        let reply = self.cmd("ZSCORE", vec![self.keys.timers(run.shard).into(), run.to_string().into()]).await?;
        Ok(!reply.is_null())
    }

    async fn due_timers(&self, now: Millis, max: usize) -> StoreResult<Vec<RunId>> {
        let reads = (0..self.keys.shards()).map(|shard| {
            self.cmd(
                "ZRANGEBYSCORE",
                vec![
                    self.keys.timers(shard).into(),
                    "-inf".into(),
                    now.to_string().into(),
                    "LIMIT".into(),
                    "0".into(),
                    (max as i64).into(),
                ],
            )
        });
        let mut due = Vec::new();
        for reply in join_all(reads).await {
            for member in reply?.into_array() {
                if let Some(run) = text(&member).and_then(|t| t.parse::<RunId>().ok()) {
                    due.push(run);
                }
            }
        }
        Ok(due)
    }

    async fn housekeeping(&self, retain_until: Millis) -> StoreResult<Housekeeping> {
        let mut report = Housekeeping::default();
        for shard in 0..self.keys.shards() {
            let ready = self.keys.ready(shard);
            // Trim only behind every consumer: below the oldest pending entry and the group's
            // last delivered one, so no queued or leased step is ever dropped.
            let Some(min_id) = self.oldest_unhandled(&ready, WORKERS_GROUP).await? else { continue };
            let trimmed = self
                .cmd("XTRIM", vec![ready.into(), "MINID".into(), "~".into(), min_id.into(), "LIMIT".into(), "0".into()])
                .await?;
            report.trimmed_entries += text(&trimmed).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);

            for status in Status::ALL.iter().filter_map(terminal_name) {
                // Oldest created first; a run is kept until it has been finished for the
                // whole retention (its last update is its end).
                let index = self.keys.index_finished(shard, status);
                let members = self
                    .cmd(
                        "ZRANGEBYSCORE",
                        vec![
                            index.clone().into(),
                            "-inf".into(),
                            format!("({retain_until}").into(),
                            "LIMIT".into(),
                            "0".into(),
                            "500".into(),
                        ],
                    )
                    .await?
                    .into_array();
                let candidates: Vec<RunId> = members.iter().filter_map(|m| text(m)?.parse().ok()).collect();
                let mut runs = Vec::new();
                let mut summaries = Vec::new();
                for (run, summary) in candidates.iter().zip(self.summaries(&candidates).await?) {
                    if summary.as_ref().is_none_or(|s| s.updated_at < retain_until) {
                        runs.push(run.clone());
                        summaries.push(summary);
                    }
                }
                if runs.is_empty() {
                    continue;
                }
                let mut doomed: Vec<Value> = Vec::new();
                for run in &runs {
                    doomed.extend([self.keys.run(run), self.keys.log(run)].map(Value::from));
                }
                self.cmd("DEL", doomed).await?;
                let mut by_index: std::collections::HashMap<String, Vec<Value>> = std::collections::HashMap::new();
                for (run, summary) in runs.iter().zip(summaries) {
                    // Earlier builds also indexed every run in `idx:all`.
                    by_index.entry(self.keys.index_all(shard)).or_default().push(run.to_string().into());
                    by_index.entry(index.clone()).or_default().push(run.to_string().into());
                    if let Some(summary) = summary {
                        for (field, value) in &summary.search {
                            by_index
                                .entry(self.keys.index_search(shard, &summary.workflow, field, value))
                                .or_default()
                                .push(run.to_string().into());
                        }
                        by_index
                            .entry(self.keys.index_workflow(shard, &summary.workflow))
                            .or_default()
                            .push(run.to_string().into());
                        by_index
                            .entry(self.keys.index_workflow_finished(shard, &summary.workflow, status))
                            .or_default()
                            .push(run.to_string().into());
                    }
                }
                for (key, members) in by_index {
                    let mut args = vec![Value::from(key)];
                    args.extend(members);
                    self.cmd("ZREM", args).await?;
                }
                report.expired_runs += runs.len() as u64;
            }
        }
        Ok(report)
    }
}

#[async_trait]
impl ReadySteps for RedisStore {
    async fn ack(&self, lease: &Lease) -> StoreResult<()> {
        self.fcall(
            "wfo_v2_ack",
            vec![self.keys.ready(lease.shard)],
            vec![WORKERS_GROUP.into(), lease.consumer.clone().into(), lease.entry.clone().into()],
        )
        .await?;
        Ok(())
    }

    async fn claim(&self, consumer: &str, max: usize, block: Duration) -> StoreResult<Vec<Claimed>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let shards = self.keys.shards() as usize;
        let start = self.next_shard.fetch_add(1, Ordering::Relaxed);
        // The shards this replica just queued steps on first, then the others in rotation.
        let queued_on = std::mem::take(&mut *self.queued_on.lock());
        let queued = queued_on.iter().filter(|s| usize::from(**s) < shards).count();
        let mut all: Vec<u16> = Vec::with_capacity(shards);
        for shard in queued_on.into_iter().chain((0..shards).map(|i| ((start + i) % shards) as u16)) {
            if usize::from(shard) < shards && !all.contains(&shard) {
                all.push(shard);
            }
        }
        // (`queued_on` holds each shard once, so they are the first of `all`.)
        let just_queued = &all[..queued];
        if self.cluster {
            return self.claim_per_shard(consumer, max, block, &all).await;
        }
        // COUNT applies per stream. With fewer free executors than shards, first take exactly
        // `max` from whichever shards have work, without blocking, in one call.
        if max < shards {
            let keys: Vec<String> = all.iter().map(|s| self.keys.ready(*s)).collect();
            let reply = self
                .fcall("wfo_v2_claim", keys, vec![WORKERS_GROUP.into(), consumer.into(), (max as i64).into()])
                .await?;
            let mut claimed = Vec::new();
            for entry in reply.into_array() {
                let mut parts = entry.into_array().into_iter();
                let (Some(index), Some(id), Some(body)) = (parts.next(), parts.next(), parts.next()) else { continue };
                let (Some(index), Some(id)) = (text(&index).and_then(|i| i.parse::<usize>().ok()), text(&id)) else {
                    continue;
                };
                let Some(&shard) = all.get(index.saturating_sub(1)) else { continue };
                claimed.push(self.decode_claimed(shard, id, data_of(&fields(body)), 1, consumer));
            }
            if !claimed.is_empty() {
                self.bury(&claimed).await?;
                return Ok(claimed);
            }
        } else if !just_queued.is_empty() {
            // A step this replica just queued is most likely still there: read it at once,
            // without blocking (a blocking read goes through its own connection, later).
            let count = (max / just_queued.len()).max(1);
            let claimed = self.read_ready(consumer, just_queued, count, None).await?;
            if !claimed.is_empty() {
                self.bury(&claimed).await?;
                return Ok(claimed);
            }
        }
        // Then wait for work on every shard. With fewer executors free than shards, entries
        // arriving on several shards in the same instant can bring more than `max` (at most
        // one per shard): the caller queues them for the next free executor.
        let count = (max / shards).max(1);
        let claimed = self.read_ready(consumer, &all, count, Some(block)).await?;
        self.bury(&claimed).await?;
        Ok(claimed)
    }

    async fn renew(&self, leases: &[Lease]) -> StoreResult<Vec<Lease>> {
        let mut by_shard: std::collections::BTreeMap<(u16, &str), Vec<&Lease>> = std::collections::BTreeMap::new();
        for lease in leases {
            by_shard.entry((lease.shard, lease.consumer.as_str())).or_default().push(lease);
        }
        let calls = by_shard.iter().map(|((shard, consumer), group)| {
            let mut args: Vec<Value> = vec![WORKERS_GROUP.into(), (*consumer).into()];
            args.extend(group.iter().map(|l| Value::from(l.entry.clone())));
            self.fcall("wfo_v2_renew", vec![self.keys.ready(*shard)], args)
        });
        let mut lost = Vec::new();
        for (reply, ((shard, consumer), _)) in join_all(calls).await.into_iter().zip(by_shard.iter()) {
            for id in reply?.into_array() {
                if let Some(entry) = text(&id) {
                    lost.push(Lease { shard: *shard, entry, consumer: (*consumer).to_owned() });
                }
            }
        }
        Ok(lost)
    }

    async fn reclaim(&self, consumer: &str, min_idle: Duration, max: usize) -> StoreResult<Vec<Claimed>> {
        let mut claimed = Vec::new();
        for shard in 0..self.keys.shards() {
            if claimed.len() >= max {
                break;
            }
            let reply = self
                .fcall(
                    "wfo_v2_reclaim",
                    vec![self.keys.ready(shard)],
                    vec![
                        WORKERS_GROUP.into(),
                        consumer.into(),
                        (min_idle.as_millis() as i64).into(),
                        "0-0".into(),
                        ((max - claimed.len()) as i64).into(),
                    ],
                )
                .await?;
            let mut parts = reply.into_array().into_iter();
            let _next = parts.next();
            for entry in parts.next().map(Value::into_array).unwrap_or_default() {
                let mut items = entry.into_array().into_iter();
                let (Some(id), Some(body), Some(deliveries)) = (items.next(), items.next(), items.next()) else {
                    continue;
                };
                let Some(id) = text(&id) else { continue };
                let deliveries = text(&deliveries).and_then(|d| d.parse().ok()).unwrap_or(1);
                claimed.push(self.decode_claimed(shard, id, data_of(&fields(body)), deliveries, consumer));
            }
        }
        self.bury(&claimed).await?;
        Ok(claimed)
    }

    async fn dispatch_exists(&self, run: &RunId, entry: &str) -> StoreResult<bool> {
        // An acknowledged entry stays in the stream until it is trimmed: being in it is not
        // enough. Queued is checked before pending, so an entry delivered between the two reads
        // is still seen (an entry only moves forward: queued, pending, acknowledged).
        if successor(entry).is_none() {
            return Ok(false); // not a stream id: never handed out
        }
        let ready = self.keys.ready(run.shard);
        if let Some(last_delivered) = self.last_delivered(&ready, WORKERS_GROUP).await?
            && compare_ids(entry, &last_delivered).is_gt()
        {
            let queued = self.cmd("XRANGE", vec![ready.clone().into(), entry.into(), entry.into()]).await?;
            if !queued.into_array().is_empty() {
                return Ok(true);
            }
        }
        let pending = self
            .cmd("XPENDING", vec![ready.into(), WORKERS_GROUP.into(), entry.into(), entry.into(), "1".into()])
            .await?;
        Ok(!pending.into_array().is_empty())
    }
}

#[async_trait]
impl Listing for RedisStore {
    async fn list_runs(&self, query: RunQuery<'_>) -> StoreResult<RunPage> {
        let RunQuery { workflow, status, before, limit } = query;
        let live_status = status.filter(|s| !s.is_terminal());
        // Finished statuses and a workflow's runs have an index of their own: read the page
        // from each shard (over-fetching for runs created in the cursor's millisecond) and
        // merge. Every run is either live or finished in one status, so "any status" is the
        // merge of the live index and the finished ones (no index of its own to write per run).
        // Live statuses come from the shard's live runs, filtered.
        let fetch = if live_status.is_some() { 1000 } else { limit + 16 };
        let keys_of = |shard| match (workflow, status) {
            (_, Some(_)) if live_status.is_some() => vec![self.keys.index_active(shard)],
            (Some(w), Some(s)) => vec![self.keys.index_workflow_finished(shard, w, s.name())],
            (None, Some(s)) => vec![self.keys.index_finished(shard, s.name())],
            (Some(w), None) => vec![self.keys.index_workflow(shard, w)],
            (None, None) => std::iter::once(self.keys.index_active(shard))
                .chain(Status::ALL.iter().filter_map(terminal_name).map(|s| self.keys.index_finished(shard, s)))
                .collect(),
        };
        let mut candidates = self.index_page(keys_of, before, fetch).await?;
        let Some(live_status) = live_status else {
            candidates.truncate(limit);
            return Ok(RunPage { runs: candidates });
        };
        let mut runs = Vec::new();
        for chunk in candidates.chunks(limit.max(1) * 2) {
            for (run, summary) in chunk.iter().zip(self.summaries(chunk).await?) {
                let wanted =
                    summary.is_some_and(|s| s.status == live_status && workflow.is_none_or(|w| s.workflow == w));
                if wanted && runs.len() < limit {
                    runs.push(run.clone());
                }
            }
            if runs.len() >= limit {
                break;
            }
        }
        Ok(RunPage { runs })
    }

    async fn search_runs(&self, query: SearchQuery<'_>) -> StoreResult<RunPage> {
        let SearchQuery { workflow, field, value, before, limit } = query;
        let keys_of = |shard| vec![self.keys.index_search(shard, workflow, field, value)];
        let mut runs = self.index_page(keys_of, before, limit + 16).await?;
        runs.truncate(limit);
        Ok(RunPage { runs })
    }

    async fn count_runs(&self, workflow: &str) -> StoreResult<Vec<(Status, u64)>> {
        let mut counts: std::collections::BTreeMap<Status, u64> = Status::ALL.into_iter().map(|s| (s, 0)).collect();
        for status in Status::ALL.into_iter().filter(Status::is_terminal) {
            let reads = (0..self.keys.shards()).map(|shard| {
                self.cmd("ZCARD", vec![self.keys.index_workflow_finished(shard, workflow, status.name()).into()])
            });
            let mut total = 0;
            for reply in join_all(reads).await {
                total += text(&reply?).and_then(|t| t.parse::<u64>().ok()).unwrap_or(0);
            }
            counts.insert(status, total);
        }
        // The live runs of every workflow are in one index per shard: read in pages, at most
        // LIVE_COUNTED of them in all, however they are spread over the shards.
        let mut read = 0;
        for shard in 0..self.keys.shards() {
            let mut from = 0;
            while read < LIVE_COUNTED {
                let to = from + COUNT_PAGE.min(LIVE_COUNTED - read) - 1;
                let members = self
                    .cmd(
                        "ZRANGE",
                        vec![self.keys.index_active(shard).into(), from.to_string().into(), to.to_string().into()],
                    )
                    .await?
                    .into_array();
                let runs: Vec<RunId> = members.iter().filter_map(|m| text(m)?.parse().ok()).collect();
                read += members.len();
                from += members.len();
                for summary in self.summaries(&runs).await?.into_iter().flatten().filter(|s| s.workflow == workflow) {
                    *counts.entry(summary.status).or_default() += 1;
                }
                if members.len() < COUNT_PAGE {
                    break;
                }
            }
        }
        Ok(counts.into_iter().collect())
    }
}

#[async_trait]
impl Schedules for RedisStore {
    async fn cron_state(&self, workflow: &str) -> StoreResult<CronState> {
        let reply = self.cmd("HGETALL", vec![self.keys.cron(workflow).into()]).await?;
        let mut state = CronState::default();
        for (name, value) in fields(reply) {
            let value = text(&value);
            match name.as_str() {
                "last_fire" => state.last_fire = value.and_then(|v| v.parse().ok()),
                "last_run" => state.last_run = value.filter(|v| !v.is_empty()),
                "buffered" => state.buffered = value.and_then(|v| v.parse().ok()),
                _ => {}
            }
        }
        Ok(state)
    }

    async fn cron_advance(&self, workflow: &str, fire: Millis, run: Option<&str>) -> StoreResult<bool> {
        let reply = self
            .fcall_acknowledged(
                "wfo_v2_cron_advance",
                vec![self.keys.cron(workflow)],
                vec![fire.to_string().into(), run.unwrap_or("").into()],
            )
            .await?;
        Ok(text(&reply).as_deref() == Some("1"))
    }

    async fn cron_buffer(&self, workflow: &str, fire: Option<Millis>) -> StoreResult<()> {
        let key = self.keys.cron(workflow);
        match fire {
            Some(fire) => self.cmd("HSET", vec![key.into(), "buffered".into(), fire.to_string().into()]).await?,
            None => self.cmd("HDEL", vec![key.into(), "buffered".into()]).await?,
        };
        Ok(())
    }
}

#[async_trait]
impl EventBus for RedisStore {
    async fn publish_event(&self, fields: &[(&str, &[u8])]) -> StoreResult<String> {
        let mut args: Vec<Value> = vec![(BUS_CLOCK_TOLERANCE.as_millis() as i64).into()];
        for (name, value) in fields {
            args.push((*name).into());
            args.push(Value::Bytes(value.to_vec().into()));
        }
        let mut why = String::new();
        for attempt in 0..2 {
            let call_args = if attempt == 0 { args.clone() } else { std::mem::take(&mut args) };
            let (tag, rest) =
                outcome(self.fcall_acknowledged("wfo_v2_bus_publish", vec![self.keys.events()], call_args).await?)?;
            if tag == "ok" {
                return rest.first().and_then(text).ok_or_else(|| corrupt(&self.keys.events(), "XADD returned no id"));
            }
            why = rest.first().and_then(text).unwrap_or_default();
            if attempt == 0 {
                tracing::warn!(%why, "the event bus cannot give a new entry an id by the clock; repairing it");
                self.repair_bus().await?;
            }
        }
        Err(StoreError::Unavailable(format!(
            "the event bus cannot take new entries ({why}) even after removing entries with ids ahead of the clock; try again"
        )))
    }

    async fn read_events(
        &self,
        consumer: &str,
        max: usize,
        block: Duration,
        cap: EntryCap,
    ) -> StoreResult<Vec<BusEntry>> {
        // Not a blocking XREADGROUP: whatever wakes it comes back whole, and an entry may be
        // hundreds of megabytes. The Lua reads without blocking and cuts entries to size in
        // Redis; between empty reads this waits a little longer each time, up to
        // EVENTS_POLL_MAX, so an idle router costs a few calls a second.
        let deadline = tokio::time::Instant::now() + block;
        let mut pause = EVENTS_POLL_MIN;
        loop {
            let reply = self
                .fcall(
                    "wfo_v2_bus_read",
                    vec![self.keys.events()],
                    vec![
                        ROUTER_GROUP.into(),
                        consumer.into(),
                        (max.max(1) as i64).into(),
                        (cap.max_bytes as i64).into(),
                        (cap.keep_bytes as i64).into(),
                        (EVENTS_READ_BUDGET as i64).into(),
                    ],
                )
                .await?;
            let entries: Vec<BusEntry> = reply.into_array().into_iter().filter_map(|e| cut_entry(e, 1)).collect();
            let now = tokio::time::Instant::now();
            if !entries.is_empty() || now >= deadline {
                return Ok(entries);
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(EVENTS_POLL_MAX);
        }
    }

    async fn reclaim_events(
        &self,
        consumer: &str,
        min_idle: Duration,
        max: usize,
        cap: EntryCap,
    ) -> StoreResult<Vec<BusEntry>> {
        let reply = self
            .fcall(
                "wfo_v2_bus_reclaim",
                vec![self.keys.events()],
                vec![
                    ROUTER_GROUP.into(),
                    consumer.into(),
                    (min_idle.as_millis() as i64).into(),
                    (max.max(1) as i64).into(),
                    (cap.max_bytes as i64).into(),
                    (cap.keep_bytes as i64).into(),
                ],
            )
            .await?;
        Ok(reply
            .into_array()
            .into_iter()
            .filter_map(|entry| {
                let mut parts = entry.into_array();
                let deliveries = parts.get(4).and_then(text).and_then(|d| d.parse().ok()).unwrap_or(1);
                parts.truncate(4);
                cut_entry(Value::Array(parts), deliveries)
            })
            .collect())
    }

    async fn settle_events(&self, settled: &[SettledEvent], retention: Duration) -> StoreResult<()> {
        if settled.is_empty() {
            return Ok(());
        }
        // The records go out together, one hash per second of the events' ids (a batch of
        // events read together is mostly of one or two seconds: a write or two, not one per
        // event), each hash expiring `retention` after its second ends; then one XACK for all.
        let mut by_second: std::collections::BTreeMap<u64, Vec<Value>> = std::collections::BTreeMap::new();
        for event in settled.iter().filter(|event| !event.started.is_empty()) {
            let runs: Vec<serde_json::Value> = event
                .started
                .iter()
                .map(|(workflow, run)| serde_json::json!({ "workflowId": workflow, "runId": run }))
                .collect();
            let fields = by_second.entry(event_second(&event.id)).or_default();
            fields.push(event.id.clone().into());
            fields.push(serde_json::Value::Array(runs).to_string().into());
        }
        let records = by_second.into_iter().map(|(second, fields)| async move {
            let key = self.keys.event_runs(second);
            let expires_at = (second + 1).saturating_add(retention.as_secs().max(1));
            let mut set = vec![key.clone().into()];
            set.extend(fields);
            // In turn: the pool's connections may carry two commands in any order, and an
            // expiry set before the hash exists is lost.
            self.cmd("HSET", set).await?;
            self.cmd("EXPIREAT", vec![key.into(), (expires_at as i64).into()]).await
        });
        for recorded in join_all(records).await {
            recorded?;
        }
        let mut args: Vec<Value> = vec![self.keys.events().into(), ROUTER_GROUP.into()];
        args.extend(settled.iter().map(|event| Value::from(event.id.clone())));
        self.cmd("XACK", args).await?;
        Ok(())
    }

    async fn dead_letter_event(&self, entry: &BusEntry, reason: &str) -> StoreResult<()> {
        self.write_dead_letter(entry, reason).await?;
        self.cmd("XACK", vec![self.keys.events().into(), ROUTER_GROUP.into(), entry.id.clone().into()]).await?;
        if entry.oversized.is_some() {
            // It can never be handled, and it is the size that makes it a problem.
            self.cmd("XDEL", vec![self.keys.events().into(), entry.id.clone().into()]).await?;
        }
        Ok(())
    }

    async fn dead_events(&self, before: Option<&str>, limit: usize, cap: EntryCap) -> StoreResult<Vec<BusEntry>> {
        let from = before.map_or_else(|| "+".to_owned(), |b| format!("({b}"));
        self.bus_range(&self.keys.events_dead(), "rev", &from, "-", limit, cap).await
    }

    async fn repair_bus(&self) -> StoreResult<u64> {
        let stream = self.keys.events();
        let tolerance = BUS_CLOCK_TOLERANCE.as_millis() as u64;
        let mut removed = 0u64;
        // Each round dead-letters and removes up to 100; entries written ahead meanwhile are
        // the next round's (bounded: a writer faster than this is not repaired away).
        for _ in 0..10 {
            let now = self.now().await?;
            let from = format!("{}-0", now.saturating_add(tolerance + 1));
            let dead_cap = EntryCap { max_bytes: DEAD_LETTER_KEEP, keep_bytes: DEAD_LETTER_KEEP };
            let hostile = self.bus_range(&stream, "fwd", &from, "+", 100, dead_cap).await?;
            for entry in &hostile {
                let ms = super::entry_ms(&entry.id).unwrap_or(u64::MAX);
                let reason = format!(
                    "the entry's id is {} ms ahead of the store's clock (more than {} s): Redis gives every later entry an id above it, so it was removed from the bus",
                    ms.saturating_sub(now),
                    BUS_CLOCK_TOLERANCE.as_secs()
                );
                tracing::warn!(event = %entry.id, %reason, "removing a bus entry with an id ahead of the clock");
                self.write_dead_letter(entry, &reason).await?;
            }
            let mut args: Vec<Value> = vec![ROUTER_GROUP.into(), (tolerance as i64).into()];
            args.extend(hostile.iter().map(|entry| Value::from(entry.id.clone())));
            let (tag, rest) = outcome(self.fcall("wfo_v2_bus_drop", vec![stream.clone()], args).await?)?;
            let dropped = rest.first().and_then(text).and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
            if dropped > 0
                && let Some(last) = hostile.last()
            {
                let condition = self.keys.events_hostile();
                self.cmd("HINCRBY", vec![condition.clone().into(), "removed".into(), (dropped as i64).into()]).await?;
                self.cmd(
                    "HSET",
                    vec![
                        condition.into(),
                        "last_id".into(),
                        last.id.clone().into(),
                        "last_at".into(),
                        now.to_string().into(),
                    ],
                )
                .await?;
            }
            removed += dropped;
            if tag == "ok" {
                if removed > 0 {
                    let last = rest.get(1).and_then(text).unwrap_or_default();
                    tracing::warn!(removed, last_id = %last, "the event bus was repaired: new entries get ids by the clock again");
                }
                return Ok(removed);
            }
        }
        Ok(removed)
    }

    async fn recent_events(&self, query: EventQuery<'_>) -> StoreResult<Vec<ListedEvent>> {
        let EventQuery { before, event_type, limit, scan, cap } = query;
        let stream = self.keys.events();
        let handled_below = self.oldest_unhandled(&stream, ROUTER_GROUP).await?;
        let pending: std::collections::HashSet<String> = self
            .cmd("XPENDING", vec![stream.clone().into(), ROUTER_GROUP.into(), "-".into(), "+".into(), "1000".into()])
            .await
            .map(|reply| reply.into_array().into_iter().filter_map(|p| p.into_array().first().and_then(text)).collect())
            .unwrap_or_default();
        let mut found: Vec<BusEntry> = Vec::new();
        let mut cursor = before.map_or_else(|| "+".to_owned(), |b| format!("({b}"));
        let mut scanned = 0;
        let page = limit.clamp(1, 500);
        while found.len() < limit && scanned < scan.max(limit) {
            let entries = self.bus_range(&stream, "rev", &cursor, "-", page, cap).await?;
            let Some(last) = entries.last() else { break };
            cursor = format!("({}", last.id);
            scanned += entries.len();
            let exhausted = entries.len() < page;
            for entry in entries {
                if found.len() < limit
                    && event_type.is_none_or(|t| entry.field("type").is_some_and(|v| v == t.as_bytes()))
                {
                    found.push(entry);
                }
            }
            if exhausted {
                break;
            }
        }
        let handled = |id: &str| {
            !pending.contains(id) && handled_below.as_deref().is_some_and(|below| compare_ids(id, below).is_lt())
        };
        let lookups = found.iter().map(|entry| async {
            let record = self
                .cmd("HGET", vec![self.keys.event_runs(event_second(&entry.id)).into(), entry.id.clone().into()])
                .await?;
            if !record.is_null() || !handled(&entry.id) {
                return Ok(record);
            }
            // Settled by an earlier build, which kept a key per event.
            self.cmd("GET", vec![self.keys.event_runs_of_one(&entry.id).into()]).await
        });
        let runs = join_all(lookups).await;
        let mut out = Vec::with_capacity(found.len());
        for (entry, runs) in found.into_iter().zip(runs) {
            let started = if handled(&entry.id) {
                let parsed: Vec<(String, String)> = text(&runs?)
                    .and_then(|json| serde_json::from_str::<Vec<serde_json::Value>>(&json).ok())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|r| Some((r["workflowId"].as_str()?.to_owned(), r["runId"].as_str()?.to_owned())))
                    .collect();
                Some(parsed)
            } else {
                None
            };
            out.push(ListedEvent { entry, started });
        }
        Ok(out)
    }

    async fn trim_events(&self, max_len: u64, min_time: Millis) -> StoreResult<u64> {
        let stream = self.keys.events();
        let Some(floor) = self.oldest_unhandled(&stream, ROUTER_GROUP).await? else { return Ok(0) };
        let length = text(&self.cmd("XLEN", vec![stream.clone().into()]).await?)
            .and_then(|l| l.parse::<u64>().ok())
            .unwrap_or(0);
        // The first id to keep by length: after the (length - max_len) oldest entries, looked up
        // a bounded page at a time (repeated passes converge).
        let mut cut = format!("{min_time}-0");
        if length > max_len {
            let excess = (length - max_len).min(10_000);
            let oldest = self.bus_range(&stream, "fwd", "-", "+", excess as usize, EntryCap::IDS).await?;
            if let Some(last) = oldest.last().and_then(|e| successor(&e.id))
                && compare_ids(&last, &cut).is_gt()
            {
                cut = last;
            }
        }
        if compare_ids(&floor, &cut).is_lt() {
            cut = floor;
        }
        let trimmed = self
            .cmd("XTRIM", vec![stream.into(), "MINID".into(), "~".into(), cut.into(), "LIMIT".into(), "0".into()])
            .await?;
        Ok(text(&trimmed).and_then(|t| t.parse().ok()).unwrap_or(0))
    }

    async fn event_counts(&self) -> StoreResult<(u64, u64)> {
        let length = |reply: Value| text(&reply).and_then(|l| l.parse::<u64>().ok()).unwrap_or(0);
        let bus = length(self.cmd("XLEN", vec![self.keys.events().into()]).await?);
        let dead = length(self.cmd("XLEN", vec![self.keys.events_dead().into()]).await?);
        Ok((bus, dead))
    }
}

#[async_trait]
impl Waits for RedisStore {
    async fn add_wait(&self, event: &str, run: &RunId, until: Millis) -> StoreResult<()> {
        self.cmd("ZADD", vec![self.keys.waits(event).into(), until.to_string().into(), run.to_string().into()]).await?;
        Ok(())
    }

    async fn remove_wait(&self, event: &str, run: &RunId) -> StoreResult<()> {
        self.cmd("ZREM", vec![self.keys.waits(event).into(), run.to_string().into()]).await?;
        Ok(())
    }

    async fn waiting(&self, event: &str) -> StoreResult<Vec<RunId>> {
        let reply = self.cmd("ZRANGE", vec![self.keys.waits(event).into(), "0".into(), "999".into()]).await?;
        Ok(reply.into_array().iter().filter_map(|m| text(m)?.parse().ok()).collect())
    }
}

#[async_trait]
impl Pauses for RedisStore {
    async fn set_paused(&self, workflow: &str, paused: bool) -> StoreResult<bool> {
        let key = self.keys.paused();
        let changed = if paused {
            let now = self.now().await?;
            self.cmd("HSETNX", vec![key.into(), workflow.into(), now.to_string().into()]).await?
        } else {
            self.cmd("HDEL", vec![key.into(), workflow.into()]).await?
        };
        Ok(changed.as_i64().unwrap_or(0) > 0)
    }

    async fn paused_workflows(&self) -> StoreResult<std::collections::BTreeSet<String>> {
        let reply = self.cmd("HKEYS", vec![self.keys.paused().into()]).await?;
        Ok(reply.into_array().iter().filter_map(text).collect())
    }

    async fn hold(&self, lease: &Lease, run: &RunId, workflow: &str, created_at: Millis) -> StoreResult<bool> {
        let reply = self
            .fcall(
                "wfo_v2_hold",
                vec![self.keys.ready(lease.shard), self.keys.held(lease.shard, workflow)],
                claim_args(lease, run, created_at),
            )
            .await?;
        Ok(reply.as_i64().unwrap_or(0) > 0)
    }

    async fn held_runs(&self, workflow: &str, max: usize) -> StoreResult<Vec<RunId>> {
        let reads = (0..self.keys.shards()).map(|shard| {
            self.cmd(
                "ZRANGE",
                vec![
                    self.keys.held(shard, workflow).into(),
                    "0".into(),
                    ((max.max(1) - 1) as i64).into(),
                    "WITHSCORES".into(),
                ],
            )
        });
        let mut held: Vec<(u64, RunId)> = Vec::new();
        for reply in join_all(reads).await {
            let items = reply?.into_array();
            for pair in items.chunks(2) {
                let (Some(run), Some(score)) = (pair.first().and_then(text), pair.get(1).and_then(text)) else {
                    continue;
                };
                if let (Ok(run), Ok(score)) = (run.parse::<RunId>(), score.parse::<f64>()) {
                    held.push((score as u64, run));
                }
            }
        }
        held.sort();
        held.truncate(max);
        Ok(held.into_iter().map(|(_, run)| run).collect())
    }

    async fn release(&self, workflow: &str, run: &RunId) -> StoreResult<()> {
        self.cmd("ZREM", vec![self.keys.held(run.shard, workflow).into(), run.to_string().into()]).await?;
        Ok(())
    }

    async fn held_count(&self, workflow: &str) -> StoreResult<u64> {
        let reads =
            (0..self.keys.shards()).map(|shard| self.cmd("ZCARD", vec![self.keys.held(shard, workflow).into()]));
        let mut total = 0;
        for reply in join_all(reads).await {
            total += reply?.as_i64().unwrap_or(0) as u64;
        }
        Ok(total)
    }
}

/// What `wfo_v2_hold` and `wfo_v2_admit` take first: the claim (group, consumer, entry) and the
/// run with its creation time.
fn claim_args(lease: &Lease, run: &RunId, created_at: Millis) -> Vec<Value> {
    vec![
        WORKERS_GROUP.into(),
        lease.consumer.clone().into(),
        lease.entry.clone().into(),
        run.to_string().into(),
        (created_at as i64).into(),
    ]
}

/// `{next, promoted...}` of the rate functions: the promoted runs, and when capacity frees
/// next while runs wait (`0`: none waits).
fn rate_outcome(values: Vec<Value>) -> (Vec<RunId>, Option<Millis>) {
    let mut values = values.into_iter();
    let next = values.next().and_then(|v| v.as_i64()).filter(|n| *n > 0).map(|n| n as Millis);
    (run_ids(values), next)
}

/// Run ids in a function's reply (the ids it promoted).
fn run_ids(values: impl IntoIterator<Item = Value>) -> Vec<RunId> {
    values.into_iter().filter_map(|v| text(&v)?.parse().ok()).collect()
}

#[async_trait]
impl Slots for RedisStore {
    async fn admit(&self, lease: &Lease, run: &RunId, group: &SlotGroup, created_at: Millis) -> StoreResult<Admission> {
        let shard = lease.shard;
        let reply = self
            .fcall(
                "wfo_v2_admit",
                vec![
                    self.keys.ready(shard),
                    self.keys.slots(shard, &group.workflow, &group.group),
                    self.keys.slot_queue(shard, &group.workflow, &group.group),
                    self.keys.slot_groups(shard, &group.workflow),
                ],
                [claim_args(lease, run, created_at), vec![i64::from(group.limit).into(), group.group.clone().into()]]
                    .concat(),
            )
            .await?;
        let (tag, rest) = outcome(reply)?;
        match tag.as_str() {
            "admitted" => Ok(Admission::Admitted),
            "held" => Ok(Admission::Held { promoted: run_ids(rest) }),
            "not_ours" => Ok(Admission::NotOurs),
            other => Err(corrupt(
                &self.keys.slots(shard, &group.workflow, &group.group),
                format!("admit answered `{other}`"),
            )),
        }
    }

    async fn release_slot(&self, shard: u16, group: &SlotGroup, run: Option<&RunId>) -> StoreResult<Vec<RunId>> {
        let reply = self
            .fcall(
                "wfo_v2_release_slot",
                vec![
                    self.keys.slots(shard, &group.workflow, &group.group),
                    self.keys.slot_queue(shard, &group.workflow, &group.group),
                ],
                vec![run.map_or_else(String::new, RunId::to_string).into(), i64::from(group.limit).into()],
            )
            .await?;
        Ok(run_ids(reply.into_array()))
    }

    async fn slot_groups(&self, shard: u16, workflow: &str) -> StoreResult<Vec<String>> {
        let reply = self.cmd("SMEMBERS", vec![self.keys.slot_groups(shard, workflow).into()]).await?;
        Ok(reply.into_array().iter().filter_map(text).collect())
    }

    async fn rate_admit(
        &self,
        lease: &Lease,
        run: &RunId,
        group: &RateGroup,
        created_at: Millis,
    ) -> StoreResult<RateAdmission> {
        let shard = lease.shard;
        let window = self.keys.rate_window(shard, &group.workflow, &group.group);
        let reply = self
            .fcall(
                "wfo_v2_rate_admit",
                vec![
                    self.keys.ready(shard),
                    window.clone(),
                    self.keys.rate_queue(shard, &group.workflow, &group.group),
                    self.keys.rate_groups(shard, &group.workflow),
                ],
                [
                    claim_args(lease, run, created_at),
                    vec![i64::from(group.limit).into(), (group.period_ms as i64).into(), group.group.clone().into()],
                ]
                .concat(),
            )
            .await?;
        let (tag, rest) = outcome(reply)?;
        match tag.as_str() {
            "admitted" => Ok(RateAdmission::Admitted),
            "not_ours" => Ok(RateAdmission::NotOurs),
            "held" => {
                let (promoted, next) = rate_outcome(rest);
                Ok(RateAdmission::Held { promoted, next })
            }
            other => Err(corrupt(&window, format!("rate admit answered `{other}`"))),
        }
    }

    async fn rate_release(&self, shard: u16, group: &RateGroup) -> StoreResult<(Vec<RunId>, Option<Millis>)> {
        let reply = self
            .fcall(
                "wfo_v2_rate_release",
                vec![
                    self.keys.rate_window(shard, &group.workflow, &group.group),
                    self.keys.rate_queue(shard, &group.workflow, &group.group),
                ],
                vec![i64::from(group.limit).into(), (group.period_ms as i64).into()],
            )
            .await?;
        Ok(rate_outcome(reply.into_array()))
    }

    async fn rate_groups(&self, shard: u16, workflow: &str) -> StoreResult<Vec<String>> {
        let reply = self.cmd("SMEMBERS", vec![self.keys.rate_groups(shard, workflow).into()]).await?;
        Ok(reply.into_array().iter().filter_map(text).collect())
    }

    async fn queued(&self, shard: u16, workflow: &str) -> StoreResult<(u64, u64)> {
        let waiting = |queues: Vec<String>| async move {
            let lengths = futures::future::try_join_all(queues.into_iter().map(|q| self.cmd("ZCARD", vec![q.into()])));
            Ok::<u64, StoreError>(lengths.await?.iter().filter_map(Value::as_u64).sum())
        };
        let slot_groups = self.slot_groups(shard, workflow).await?;
        let rate_groups = self.rate_groups(shard, workflow).await?;
        let slot_queues = slot_groups.iter().map(|group| self.keys.slot_queue(shard, workflow, group)).collect();
        let rate_queues = rate_groups.iter().map(|group| self.keys.rate_queue(shard, workflow, group)).collect();
        Ok((waiting(slot_queues).await?, waiting(rate_queues).await?))
    }

    async fn slot_holders(&self, shard: u16, group: &SlotGroup) -> StoreResult<(Vec<RunId>, u64)> {
        let holders = self
            .cmd("ZRANGE", vec![self.keys.slots(shard, &group.workflow, &group.group).into(), "0".into(), "-1".into()])
            .await?;
        let waiting =
            self.cmd("ZCARD", vec![self.keys.slot_queue(shard, &group.workflow, &group.group).into()]).await?;
        Ok((run_ids(holders.into_array()), waiting.as_i64().unwrap_or(0) as u64))
    }
}

#[async_trait]
impl Debounces for RedisStore {
    async fn debounce(&self, trigger: &DebounceTrigger) -> StoreResult<Debounced> {
        let mut keys = vec![self.keys.debounce_open(), self.keys.debounce_due(), self.keys.debounce_bursts()];
        let mut seen_ttl = 0;
        if let Some((key, ttl)) = &trigger.key {
            keys.push(self.keys.debounce_seen(key));
            seen_ttl = ttl.as_millis().clamp(1, i64::MAX as u128) as i64;
        }
        let args = vec![
            debounce_key(&trigger.workflow, &trigger.group).into(),
            trigger.burst.clone().into(),
            trigger.payload.clone().into(),
            (trigger.period_ms as i64).into(),
            (trigger.max_wait_ms as i64).into(),
            seen_ttl.into(),
            trigger.order.clone().unwrap_or_default().into(),
        ];
        let (tag, rest) = outcome(self.fcall_acknowledged("wfo_v2_debounce", keys, args).await?)?;
        let burst = rest.first().and_then(text).ok_or_else(|| corrupt("wfo_v2_debounce", "no burst in the reply"))?;
        match tag.as_str() {
            "absorbed" => {
                let number = |index: usize| rest.get(index).and_then(text).and_then(|t| t.parse().ok()).unwrap_or(0);
                Ok(Debounced::Absorbed { burst, triggers: number(1), due: number(2) })
            }
            "duplicate" => Ok(Debounced::Duplicate { burst }),
            other => Err(corrupt("wfo_v2_debounce", format!("unexpected reply `{other}`"))),
        }
    }

    async fn due_bursts(&self, max: usize) -> StoreResult<Vec<DueBurst>> {
        let reply = self
            .fcall(
                "wfo_v2_debounce_due",
                vec![self.keys.debounce_due(), self.keys.debounce_bursts()],
                vec![(max as i64).into()],
            )
            .await?;
        let mut due = Vec::new();
        for entry in reply.into_array() {
            let fields: Vec<String> = entry.into_array().iter().filter_map(text).collect();
            let [burst, payload, triggers, first_at] = fields.as_slice() else {
                return Err(corrupt("wfo_v2_debounce_due", "a burst is not four fields"));
            };
            let Some((workflow, group)) = burst_key(burst) else {
                return Err(corrupt(&self.keys.debounce_due(), format!("burst id `{burst}` names no key")));
            };
            due.push(DueBurst {
                burst: burst.clone(),
                workflow: workflow.to_owned(),
                group: group.to_owned(),
                payload: payload.clone(),
                triggers: triggers.parse().unwrap_or(0),
                first_at: first_at.parse().unwrap_or(0),
            });
        }
        Ok(due)
    }

    async fn finish_burst(&self, burst: &DueBurst) -> StoreResult<()> {
        let keys = vec![self.keys.debounce_open(), self.keys.debounce_due(), self.keys.debounce_bursts()];
        let args = vec![debounce_key(&burst.workflow, &burst.group).into(), burst.burst.clone().into()];
        self.fcall("wfo_v2_debounce_finish", keys, args).await?;
        Ok(())
    }

    async fn burst_counts(&self) -> StoreResult<BTreeMap<String, u64>> {
        let bursts = self.cmd("ZRANGE", vec![self.keys.debounce_due().into(), "0".into(), "-1".into()]).await?;
        let mut counts = BTreeMap::new();
        for burst in bursts.into_array().iter().filter_map(text) {
            if let Some((workflow, _)) = burst_key(&burst) {
                *counts.entry(workflow.to_owned()).or_default() += 1;
            }
        }
        Ok(counts)
    }
}

#[async_trait]
impl Values for RedisStore {
    async fn get_value(&self, key: &str) -> StoreResult<Option<String>> {
        Ok(text(&self.cmd("GET", vec![self.keys.value(key).into()]).await?))
    }

    async fn set_value(&self, key: &str, value: &str) -> StoreResult<()> {
        self.cmd("SET", vec![self.keys.value(key).into(), value.into()]).await?;
        Ok(())
    }

    async fn mark_seen(&self, key: &str, ttl: Duration) -> StoreResult<bool> {
        let key = self.keys.value(&format!("seen:{key}"));
        let ttl = (ttl.as_millis().max(1)).min(i64::MAX as u128) as i64;
        let reply = self.cmd("SET", vec![key.into(), "1".into(), "NX".into(), "PX".into(), ttl.into()]).await?;
        Ok(!matches!(reply, Value::Null))
    }

    async fn forget_seen(&self, key: &str) -> StoreResult<()> {
        self.cmd("DEL", vec![self.keys.value(&format!("seen:{key}")).into()]).await?;
        Ok(())
    }
}

#[async_trait]
impl Replicas for RedisStore {
    async fn heartbeat(&self, beat: &ReplicaBeat, ttl: Duration) -> StoreResult<()> {
        let json = serde_json::to_string(beat).map_err(|err| StoreError::Fatal(format!("a heartbeat: {err}")))?;
        let ttl = (ttl.as_millis().max(1)).min(i64::MAX as u128) as i64;
        self.cmd("SET", vec![self.keys.replica(&beat.id).into(), json.into(), "PX".into(), ttl.into()]).await?;
        self.cmd("SADD", vec![self.keys.replicas().into(), beat.id.clone().into()]).await?;
        Ok(())
    }

    async fn forget_replica(&self, id: &str) -> StoreResult<()> {
        self.cmd("DEL", vec![self.keys.replica(id).into()]).await?;
        self.cmd("SREM", vec![self.keys.replicas().into(), id.into()]).await?;
        Ok(())
    }

    async fn replicas(&self) -> StoreResult<Vec<ReplicaBeat>> {
        let ids: Vec<String> = match self.cmd("SMEMBERS", vec![self.keys.replicas().into()]).await? {
            Value::Array(items) => items.iter().filter_map(text).collect(),
            _ => Vec::new(),
        };
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys = ids.iter().map(|id| self.keys.replica(id).into()).collect();
        let beats = match self.cmd("MGET", keys).await? {
            Value::Array(items) => items,
            _ => Vec::new(),
        };
        let mut live = Vec::new();
        let mut gone: Vec<Value> = vec![self.keys.replicas().into()];
        for (id, beat) in ids.iter().zip(beats.iter().map(text).chain(std::iter::repeat(None))) {
            match beat.and_then(|json| serde_json::from_str::<ReplicaBeat>(&json).ok()) {
                Some(beat) => live.push(beat),
                // Expired (or unreadable, from another version): no longer a live replica.
                None => gone.push(id.clone().into()),
            }
        }
        if gone.len() > 1 {
            self.cmd("SREM", gone).await?;
        }
        live.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(live)
    }
}
