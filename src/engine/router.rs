//! The event router: one consumer per replica in group `router` on the bus stream. Validates
//! each entry, starts every workflow whose `events` names its type under the idempotency key
//! `event:<entry id>:<workflow>` (or `event:key:<key>:<workflow>` when the entry carries a
//! de-duplication `key`), records the runs it started, and acks. A malformed entry goes to the
//! dead-letter stream with its reason. A router that dies before acking has its entries taken
//! over by another after the lease time; the idempotency keys make that start nothing twice.
//!
//! Anyone can `XADD` anything, so the bus is read cut to size by the store (an entry over
//! `EVENT_MAX_BYTES` plus room for the other fields arrives as prefixes and is dead-lettered,
//! then deleted), and an entry whose id is far ahead of the clock (which would push every later
//! id past it, or end the id space) is handed to the store's repair: dead-lettered, deleted, and
//! the stream's last id set back.

use super::record::Recording;
use super::{Accepted, Counters, Engine, EngineError, backoff, sleep_or_cancelled};
use crate::definition::valid_event_type;
use crate::machine::{TraceContext, Trigger};
use crate::store::{BUS_CLOCK_TOLERANCE, BusEntry, DEAD_LETTER_KEEP, EntryCap, EventQuery, SettledEvent, StoreError};
use futures::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Entries read per call.
const ROUTER_BATCH: usize = 100;
/// Entries of a batch routed at once.
const ROUTE_IN_FLIGHT: usize = 32;
/// How long one blocking read waits before looking at the shutdown token again.
const ROUTER_BLOCK: Duration = Duration::from_secs(1);
/// The bus is trimmed at most this often.
const TRIM_EVERY: Duration = Duration::from_secs(2);
/// Longest `key` and `source` accepted.
const MAX_LABEL: usize = 200;
/// Room for the fields beside `payload` (names, `type`, `key`, `source`, fields of the sender's
/// own): an entry over `EVENT_MAX_BYTES` plus this is never read whole.
const ENTRY_OVERHEAD: usize = 64 * 1024;
/// How the API lists entries (events, dead letters): whole up to 64 KiB, else 4 KiB prefixes.
pub const LISTED_ENTRY_CAP: EntryCap = EntryCap { max_bytes: 64 * 1024, keep_bytes: 4096 };

/// How the router reads the bus: whole up to what an event may be, else prefixes for the dead
/// letter.
pub fn router_cap(event_max_bytes: usize) -> EntryCap {
    EntryCap { max_bytes: event_max_bytes.saturating_add(ENTRY_OVERHEAD), keep_bytes: DEAD_LETTER_KEEP }
}

/// A valid event, as the bus carries it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub event_type: String,
    /// A JSON object.
    pub payload: serde_json::Value,
    pub key: Option<String>,
    pub source: Option<String>,
    /// The publisher's span (`traceparent`, with `tracestate`): the runs the event starts
    /// continue its trace. An invalid one is ignored, as the W3C specification says, not
    /// dead-lettered: the event itself is fine.
    pub trace: Option<TraceContext>,
}

fn utf8<'a>(name: &str, bytes: &'a [u8]) -> Result<&'a str, String> {
    std::str::from_utf8(bytes).map_err(|_| format!("field `{name}` is not UTF-8 text"))
}

/// Checks the wire format: `type` (required, `^[a-z0-9][a-z0-9_.-]{0,127}$`), `payload`
/// (optional, a JSON object of at most `max_bytes`), `key` and `source` (optional, at most 200
/// characters), `traceparent` and `tracestate` (optional, W3C trace context). Other fields are
/// ignored.
pub fn parse_event(entry: &BusEntry, max_bytes: usize) -> Result<Event, String> {
    if let Some(oversized) = &entry.oversized {
        let (largest, largest_bytes) = entry
            .fields
            .iter()
            .zip(&oversized.value_bytes)
            .max_by_key(|(_, bytes)| **bytes)
            .map_or((String::new(), 0), |((name, _), bytes)| (String::from_utf8_lossy(name).into_owned(), *bytes));
        return Err(format!(
            "`{}` is {largest_bytes} bytes and the entry {} bytes, over the limit of {} bytes for an entry (EVENT_MAX_BYTES {max_bytes} plus {ENTRY_OVERHEAD} for its other fields)",
            truncate(&largest),
            oversized.total_bytes,
            max_bytes.saturating_add(ENTRY_OVERHEAD),
        ));
    }
    let event_type = utf8("type", entry.field("type").ok_or("missing field `type`")?)?;
    if !valid_event_type(event_type) {
        return Err(format!("`type` {:?} does not match ^[a-z0-9][a-z0-9_.-]{{0,127}}$", truncate(event_type)));
    }
    let payload = match entry.field("payload") {
        None => serde_json::json!({}),
        Some(bytes) => {
            if bytes.len() > max_bytes {
                return Err(format!("`payload` is {} bytes, over the limit of {max_bytes}", bytes.len()));
            }
            let text = utf8("payload", bytes)?;
            match serde_json::from_str::<serde_json::Value>(text) {
                Ok(value @ serde_json::Value::Object(_)) => value,
                Ok(_) => return Err("`payload` must be a JSON object".to_owned()),
                Err(err) => return Err(format!("`payload` is not valid JSON: {err}")),
            }
        }
    };
    let label = |name: &str| -> Result<Option<String>, String> {
        match entry.field(name) {
            None => Ok(None),
            Some(bytes) => {
                let text = utf8(name, bytes)?;
                if text.is_empty() || text.chars().count() > MAX_LABEL || text.chars().any(char::is_control) {
                    return Err(format!("`{name}` must be 1 to {MAX_LABEL} printable characters"));
                }
                Ok(Some(text.to_owned()))
            }
        }
    };
    let trace = entry.field("traceparent").and_then(|parent| {
        let parent = std::str::from_utf8(parent).ok()?;
        let state = entry.field("tracestate").and_then(|state| std::str::from_utf8(state).ok());
        TraceContext::parse(parent, state).ok()
    });
    Ok(Event { event_type: event_type.to_owned(), payload, key: label("key")?, source: label("source")?, trace })
}

/// Test-only fault injection, read once: `WFO_TEST_CRASH_BEFORE_EVENT_ACK=1` makes the router
/// abort the process between starting an event's runs and acknowledging the event.
fn crash_before_ack() -> bool {
    static FLAG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FLAG.get_or_init(|| std::env::var("WFO_TEST_CRASH_BEFORE_EVENT_ACK").is_ok_and(|v| v == "1"))
}

fn truncate(text: &str) -> String {
    text.chars().take(64).collect()
}

impl Engine {
    /// Validates and appends an event to the bus (the REST way in); returns its entry id.
    pub async fn publish_event(
        &self,
        event_type: &str,
        payload: &serde_json::Value,
        key: Option<&str>,
        source: Option<&str>,
    ) -> Result<Result<String, String>, StoreError> {
        self.publish_event_traced(event_type, payload, key, source, None).await
    }

    /// [`Engine::publish_event`] with the publisher's span, carried in the entry's
    /// `traceparent` and `tracestate` fields.
    pub async fn publish_event_traced(
        &self,
        event_type: &str,
        payload: &serde_json::Value,
        key: Option<&str>,
        source: Option<&str>,
        trace: Option<&TraceContext>,
    ) -> Result<Result<String, String>, StoreError> {
        let payload_text = payload.to_string();
        let traceparent = trace.map(TraceContext::traceparent);
        let mut fields: Vec<(&str, &[u8])> =
            vec![("type", event_type.as_bytes()), ("payload", payload_text.as_bytes())];
        if let Some(key) = key {
            fields.push(("key", key.as_bytes()));
        }
        if let Some(source) = source {
            fields.push(("source", source.as_bytes()));
        }
        if let (Some(parent), Some(trace)) = (&traceparent, trace) {
            fields.push(("traceparent", parent.as_bytes()));
            if !trace.tracestate.is_empty() {
                fields.push(("tracestate", trace.tracestate.as_bytes()));
            }
        }
        let entry = BusEntry {
            id: String::new(),
            fields: fields.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec())).collect(),
            deliveries: 0,
            oversized: None,
        };
        if let Err(problem) = parse_event(&entry, self.config.event_max_bytes) {
            return Ok(Err(problem));
        }
        Ok(Ok(self.store.publish_event(&fields).await?))
    }

    pub(super) async fn router_loop(self: Arc<Self>) {
        let mut failures = 0u32;
        let mut last_trim = Instant::now();
        loop {
            let read = tokio::select! {
                () = self.shutdown.cancelled() => return,
                read = self.store.read_events(&self.consumer, ROUTER_BATCH, ROUTER_BLOCK, self.router_cap()) => read,
            };
            match read {
                Ok(entries) => {
                    failures = 0;
                    self.route_all(entries).await;
                }
                Err(err) => {
                    failures += 1;
                    tracing::warn!(%err, "reading the event bus failed; retrying");
                    if sleep_or_cancelled(&self.shutdown, backoff(failures)).await {
                        return;
                    }
                }
            }
            if last_trim.elapsed() >= TRIM_EVERY {
                last_trim = Instant::now();
                let min_time = self.clock.now().saturating_sub(self.config.events_retention.as_millis() as u64);
                if let Err(err) = self.store.trim_events(self.config.events_max_len, min_time).await {
                    tracing::warn!(%err, "trimming the event bus failed; will retry");
                }
            }
        }
    }

    /// Takes over events a router took and did not settle within the lease time.
    pub(super) async fn router_reclaim_loop(self: Arc<Self>) {
        let period = (self.config.lease_ttl / 2).max(Duration::from_millis(200));
        loop {
            if sleep_or_cancelled(&self.shutdown, period.mul_f64(rand::random_range(0.8..1.2))).await {
                return;
            }
            match self
                .store
                .reclaim_events(&self.consumer, self.config.lease_ttl, ROUTER_BATCH, self.router_cap())
                .await
            {
                Ok(entries) => {
                    for entry in &entries {
                        tracing::info!(event = %entry.id, deliveries = entry.deliveries, "took over an event another router did not settle");
                    }
                    self.route_all(entries).await;
                }
                Err(err) => tracing::warn!(%err, "reclaiming events failed; will retry"),
            }
        }
    }

    /// Handles a batch of bus entries, up to [`ROUTE_IN_FLIGHT`] at once, so that their round
    /// trips overlap on the pipelined connection instead of queueing behind each other; then
    /// settles the ones whose runs were started, together (their records, one acknowledgement).
    /// An entry whose starts failed is left pending, to be retried after the lease time; its
    /// idempotency keys make a retry start nothing twice. Two events racing for one waiting run
    /// are decided by the commit's fence: one wakes it, the other goes on as if it had come after.
    async fn route_all(&self, entries: Vec<BusEntry>) {
        let settled: Vec<SettledEvent> = futures::stream::iter(entries)
            .map(|entry| self.route(entry))
            .buffer_unordered(ROUTE_IN_FLIGHT)
            .filter_map(|settled| async move { settled })
            .collect()
            .await;
        if settled.is_empty() {
            return;
        }
        if crash_before_ack() {
            // Fault injection for the crash-recovery tests: die like `kill -9` would, after
            // the runs were started and before the events are acknowledged.
            tracing::error!(events = settled.len(), "WFO_TEST_CRASH_BEFORE_EVENT_ACK is set: aborting before the ack");
            std::process::abort();
        }
        match self.store.settle_events(&settled, self.config.events_retention).await {
            Ok(()) => {
                for _ in &settled {
                    Counters::add(&self.counters.events_routed);
                }
            }
            Err(err) => {
                tracing::warn!(events = settled.len(), %err, "events not settled; they will be retried after the lease time")
            }
        }
    }

    /// Handles one bus entry; returns it, with the runs it started, when it is to be settled.
    /// Never fails: a problem of the entry dead-letters it; a problem of the store leaves it
    /// pending, to be retried after the lease time (up to the delivery bound).
    async fn route(&self, entry: BusEntry) -> Option<SettledEvent> {
        if self.ahead_of_clock(&entry.id) {
            // Redis would give every later entry an id above this one (or none at all): the
            // store dead-letters it and sets the bus's last id back, judged by its own clock.
            // Not handled either way: removed (by this call, or by another replica's or a
            // publisher's repair), or, if Redis's clock judged it in time after all, left
            // pending, to be taken over after the lease time and handled then.
            match self.store.repair_bus().await {
                Ok(removed) => tracing::warn!(event = %entry.id, removed, "bus entry with an id ahead of the clock"),
                Err(err) => {
                    tracing::warn!(event = %entry.id, %err, "could not remove a bus entry with an id ahead of the clock; will retry")
                }
            }
            return None;
        }
        let result = if entry.deliveries > self.config.max_deliveries {
            let reason = format!("not handled after {} deliveries", entry.deliveries);
            self.dead_letter(&entry, &reason).await.map(|()| None)
        } else {
            match parse_event(&entry, self.config.event_max_bytes) {
                Err(reason) => self.dead_letter(&entry, &reason).await.map(|()| None),
                Ok(event) => self.start_for(&entry.id, &event).await.map(Some),
            }
        };
        result.unwrap_or_else(|err| {
            tracing::warn!(event = %entry.id, %err, "event not settled; it will be retried after the lease time");
            None
        })
    }

    /// Wakes the runs waiting for this event whose correlation rule it satisfies; returns the
    /// workflows of the runs it woke.
    async fn wake_waiting(&self, id: &str, event: &Event) -> Result<Vec<String>, StoreError> {
        let mut woken = Vec::new();
        for run in self.store.waiting(&event.event_type).await? {
            if let Some(workflow) = self.wake_one(&run, id, event).await? {
                woken.push(workflow);
            }
        }
        Ok(woken)
    }

    /// Wakes `run` with the event `id` if it waits for it (type and correlation): the first
    /// step (by index) waiting for its type whose correlation rule it satisfies. Returns the
    /// run's workflow if it did.
    async fn wake_one(&self, run: &crate::store::RunId, id: &str, event: &Event) -> Result<Option<String>, StoreError> {
        let run_id = run.to_string();
        let recording = self.record_on_run(run, true, |loaded, _| {
            let (step, attempt, _) = loaded.state.waiting_for(&event.event_type).find(|(step, _, _)| {
                loaded.workflow.def.steps.get(*step as usize).is_some_and(|step_def| {
                    crate::actions::Actions::correlates(step_def, &run_id, &loaded.state.input, &event.payload)
                })
            })?;
            let happened = crate::machine::event_arrived(step, attempt, id, &event.event_type, &event.payload);
            Some((happened, (step, attempt)))
        });
        match recording.await {
            Ok(Recording::Applied { before, note: (step, attempt), .. }) => {
                let step_id = before.workflow.def.steps.get(step as usize).map_or("?", |s| s.id.as_str());
                tracing::info!(run_id = %run, workflow = %before.state.workflow, step = %step_id, attempt, event = %id, "event woke a waiting run");
                self.wait_ended(run, &before.state, step, true, self.clock.now());
                // Kept while another step of the run waits for this type.
                if before.state.waiting_for(&event.event_type).nth(1).is_none() {
                    self.store.remove_wait(&event.event_type, run).await?;
                }
                Ok(Some(before.state.workflow.clone()))
            }
            Ok(Recording::Nothing(loaded)) => {
                // Woken or ended meanwhile (or gone): the registration is stale.
                if loaded.is_none_or(|loaded| loaded.state.waiting_for(&event.event_type).next().is_none()) {
                    self.store.remove_wait(&event.event_type, run).await?;
                }
                Ok(None)
            }
            Ok(Recording::KeptChanging) => {
                tracing::error!(run_id = %run, event = %id, "the run kept changing while an event was waking it: the event was not delivered to it");
                Ok(None)
            }
            Err(StoreError::Corrupt { problem, .. }) => {
                tracing::error!(run_id = %run, %problem, "a waiting run cannot be read; leaving it to its time-out");
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }

    /// After a step parked its run to wait for `event_type`: an event of that type may have
    /// arrived since the run started and before it was registered as waiting (the router then
    /// did not find it). Looks back over the bus (the last 1,000 events) for one, oldest first,
    /// and wakes the run with the first that matches.
    pub(super) async fn look_back_for(
        &self,
        run: &crate::store::RunId,
        event_type: &str,
        since: crate::machine::Millis,
    ) -> Result<(), StoreError> {
        let since = format!("{since}-0");
        let query =
            EventQuery { before: None, event_type: Some(event_type), limit: 100, scan: 1000, cap: self.router_cap() };
        let mut recent = self.store.recent_events(query).await?;
        recent.retain(|listed| crate::store::compare_entry_ids(&listed.entry.id, &since).is_ge());
        for listed in recent.iter().rev() {
            let Ok(event) = parse_event(&listed.entry, self.config.event_max_bytes) else { continue };
            if self.wake_one(run, &listed.entry.id, &event).await?.is_some() {
                break;
            }
        }
        Ok(())
    }

    fn router_cap(&self) -> EntryCap {
        router_cap(self.config.event_max_bytes)
    }

    /// Whether an entry's id is further ahead of the clock than the bus tolerates.
    fn ahead_of_clock(&self, id: &str) -> bool {
        let ms = crate::store::entry_ms(id).unwrap_or(0);
        ms > self.clock.now().saturating_add(BUS_CLOCK_TOLERANCE.as_millis() as u64)
    }

    async fn dead_letter(&self, entry: &BusEntry, reason: &str) -> Result<(), StoreError> {
        tracing::warn!(event = %entry.id, %reason, "malformed event moved to the dead-letter stream");
        self.store.dead_letter_event(entry, reason).await?;
        Counters::add(&self.counters.events_dead_lettered);
        Ok(())
    }

    /// Wakes the runs waiting for the event and starts the workflows it triggers; returns what
    /// is to be settled.
    async fn start_for(&self, id: &str, event: &Event) -> Result<SettledEvent, StoreError> {
        // Runs waiting for this event go first; a workflow whose run the event woke is not also
        // started anew by it (a `user.verified` continues the onboarding that waits for it, and
        // starts one only when none waits). Only types some workflow waits for are looked up:
        // most events wake nothing, and the lookup would be a round trip each.
        let woken = if self.awaited_types.contains(&event.event_type) {
            self.wake_waiting(id, event).await?
        } else {
            Vec::new()
        };
        let mut started = Vec::new();
        for workflow in
            self.registry.iter().filter(|w| w.def.events.contains(&event.event_type) && !woken.contains(&w.def.id))
        {
            let workflow_id = &workflow.def.id;
            let key = match &event.key {
                Some(key) => format!("event:key:{key}:{workflow_id}"),
                None => format!("event:{id}:{workflow_id}"),
            };
            let trigger = Trigger::Event { event_id: id.to_owned(), event_type: event.event_type.clone() };
            // Each run is a child of the publisher's span: one event, one trace, however many
            // runs it starts.
            match self.accept(workflow_id, &event.payload, Some(&key), trigger, event.trace.clone()).await {
                Ok(Accepted::Started(triggered)) => started.push((workflow_id.clone(), triggered.run_id)),
                // Its run starts when the burst is due; the event is settled now.
                Ok(Accepted::Debounced(_)) => {}
                Err(EngineError::Store(err)) => return Err(err),
                Err(other) => {
                    tracing::error!(event = %id, workflow = %workflow_id, error = %other, "an event could not start its run")
                }
            }
        }
        Ok(SettledEvent { id: id.to_owned(), started })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&str, &[u8])]) -> BusEntry {
        BusEntry {
            id: "1-0".to_owned(),
            fields: fields.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec())).collect(),
            deliveries: 1,
            oversized: None,
        }
    }

    #[test]
    fn the_documented_example_is_valid() {
        let event =
            parse_event(&entry(&[("type", b"user.registered"), ("payload", br#"{"userId":7}"#)]), 1024).unwrap();
        assert_eq!(event.event_type, "user.registered");
        assert_eq!(event.payload["userId"], 7);
        let event = parse_event(&entry(&[("type", b"cache.invalidated")]), 1024).unwrap();
        assert_eq!(event.payload, serde_json::json!({}));
    }

    #[test]
    fn malformed_entries_say_why() {
        let reason = |fields: &[(&str, &[u8])]| parse_event(&entry(fields), 16).unwrap_err();
        assert!(reason(&[("payload", b"{}")]).contains("missing field `type`"));
        assert!(reason(&[("type", b"User Registered")]).contains("does not match"));
        assert!(reason(&[("type", b"a"), ("payload", b"{nope")]).contains("not valid JSON"));
        assert!(reason(&[("type", b"a"), ("payload", b"[1]")]).contains("JSON object"));
        assert!(reason(&[("type", b"a"), ("payload", &[b' '; 17])]).contains("over the limit"));
        assert!(reason(&[("type", &[0xff, 0xfe])]).contains("not UTF-8"));
        assert!(reason(&[("type", b"a"), ("key", b"")]).contains("`key`"));
    }

    #[test]
    fn a_traceparent_is_read_and_an_invalid_one_ignored() {
        let parent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let event =
            parse_event(&entry(&[("type", b"a"), ("traceparent", parent), ("tracestate", b"k=v")]), 16).unwrap();
        let trace = event.trace.unwrap();
        assert_eq!(trace.traceparent().as_bytes(), parent);
        assert_eq!(trace.tracestate, "k=v");
        let event = parse_event(&entry(&[("type", b"a"), ("traceparent", b"00-XYZ")]), 16).unwrap();
        assert_eq!(event.trace, None);
    }

    #[test]
    fn an_entry_read_cut_to_size_names_its_size_and_the_limit() {
        let mut big = entry(&[("type", b"a"), ("payload", b"{\"x\":")]);
        big.oversized = Some(crate::store::Oversized { total_bytes: 20_000_020, value_bytes: vec![1, 20_000_000] });
        let reason = parse_event(&big, 1000).unwrap_err();
        assert!(reason.contains("`payload` is 20000000 bytes"), "{reason}");
        assert!(reason.contains("the entry 20000020 bytes"), "{reason}");
        assert!(reason.contains(&format!("limit of {} bytes", 1000 + ENTRY_OVERHEAD)), "{reason}");
    }
}
