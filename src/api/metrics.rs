//! `GET /metrics`: the replica's counters, per-workflow run counts and step durations, the
//! store's queue lengths and a round trip to the store, in Prometheus text format.

use super::ApiError;
use crate::engine::{Engine, STEP_BUCKETS};
use std::fmt::Write;

pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A label value escaped as the text format wants.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders the metrics; the store's part waits at most `store_deadline` (a scrape must not hang
/// on an unreachable store) and is skipped at once when the store is known to be down.
pub async fn render(engine: &Engine, store_deadline: std::time::Duration) -> Result<String, ApiError> {
    let mut out = String::with_capacity(4096);
    let replica = engine.counter_values();
    let counters: [(&str, &str, &str); 13] = [
        ("runsStarted", "wfo_runs_started", "Runs this replica started."),
        ("runsCompleted", "wfo_runs_completed", "Runs this replica completed."),
        ("runsFailed", "wfo_runs_failed", "Runs this replica failed."),
        ("stepsCompleted", "wfo_steps_completed", "Steps completed by this replica's executors."),
        ("stepsFailed", "wfo_steps_failed", "Step attempts that failed on this replica."),
        ("retriesScheduled", "wfo_retries_scheduled", "Step retries scheduled."),
        ("stepsReclaimed", "wfo_steps_reclaimed", "Steps taken over after their lease expired."),
        (
            "completionsFenced",
            "wfo_completions_fenced",
            "Step outcomes rejected by the fence (lease lost or run moved on).",
        ),
        ("runsSwept", "wfo_runs_swept", "Orphaned runs re-queued by the sweeper."),
        ("cronFires", "wfo_cron_fires", "Cron fires that started a run."),
        ("cronSkipped", "wfo_cron_skipped", "Cron fires skipped by the overlap policy."),
        (
            "cronMissed",
            "wfo_cron_missed",
            "Cron fires missed while no replica ran, not started per the catch-up policy.",
        ),
        ("eventsDeadLettered", "wfo_events_dead_lettered", "Malformed events moved to the dead-letter stream."),
    ];
    for (key, name, help) in counters {
        let value = replica.iter().find(|(k, _)| *k == key).map_or(0, |(_, v)| *v);
        family(&mut out, &format!("{name}_total"), "counter", help);
        let _ = writeln!(out, "{name}_total {value}");
    }
    let events_routed = replica.iter().find(|(k, _)| *k == "eventsRouted").map_or(0, |(_, v)| *v);
    family(&mut out, "wfo_events_routed_total", "counter", "Events handled by this replica's router.");
    let _ = writeln!(out, "wfo_events_routed_total {events_routed}");

    let workflows = engine.metrics.snapshot();
    family(&mut out, "wfo_workflow_runs_started_total", "counter", "Runs started by this replica, by workflow.");
    for (workflow, m) in &workflows {
        let _ = writeln!(out, "wfo_workflow_runs_started_total{{workflow=\"{}\"}} {}", label(workflow), m.runs_started);
    }
    family(&mut out, "wfo_workflow_runs_completed_total", "counter", "Runs completed by this replica, by workflow.");
    for (workflow, m) in &workflows {
        let _ =
            writeln!(out, "wfo_workflow_runs_completed_total{{workflow=\"{}\"}} {}", label(workflow), m.runs_completed);
    }
    family(&mut out, "wfo_workflow_runs_failed_total", "counter", "Runs failed by this replica, by workflow.");
    for (workflow, m) in &workflows {
        let _ = writeln!(out, "wfo_workflow_runs_failed_total{{workflow=\"{}\"}} {}", label(workflow), m.runs_failed);
    }
    family(&mut out, "wfo_step_duration_seconds", "histogram", "Step attempt durations on this replica, by workflow.");
    for (workflow, m) in &workflows {
        let workflow = label(workflow);
        for (bound, count) in STEP_BUCKETS.iter().zip(m.step_buckets) {
            let _ = writeln!(out, "wfo_step_duration_seconds_bucket{{workflow=\"{workflow}\",le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(out, "wfo_step_duration_seconds_bucket{{workflow=\"{workflow}\",le=\"+Inf\"}} {}", m.steps);
        let _ = writeln!(out, "wfo_step_duration_seconds_sum{{workflow=\"{workflow}\"}} {}", m.step_seconds);
        let _ = writeln!(out, "wfo_step_duration_seconds_count{{workflow=\"{workflow}\"}} {}", m.steps);
    }
    family(&mut out, "wfo_executors_busy", "gauge", "Executors of this replica running a step now.");
    let _ = writeln!(out, "wfo_executors_busy {}", engine.busy_executors());
    family(&mut out, "wfo_workflow_paused", "gauge", "Whether the workflow is paused (as this replica last read it).");
    let paused = engine.paused_workflows();
    for workflow in engine.registry().iter() {
        let id = &workflow.def.id;
        let _ = writeln!(out, "wfo_workflow_paused{{workflow=\"{}\"}} {}", label(id), u8::from(paused.contains(id)));
    }

    // The store's side: answered only if the store is reachable.
    let store_side = async {
        let held = async {
            Ok::<_, crate::store::StoreError>((
                engine.held_counts().await?,
                engine.limited_counts().await?,
                engine.burst_counts().await?,
            ))
        };
        (engine.stream_stats().await, engine.store_round_trip().await, held.await)
    };
    let answered = match engine.store_problem() {
        Some(_) => None,
        None => tokio::time::timeout(store_deadline, store_side).await.ok(),
    };
    match answered {
        Some((Ok(stats), Ok(round_trip), Ok((paused, limited, bursts)))) => {
            family(
                &mut out,
                "wfo_runs_held",
                "gauge",
                "Runs held back, by workflow and reason (pause, concurrency, rate_limit; debounce: bursts of \
                 triggers whose run has not started yet), by any replica.",
            );
            let held = paused
                .into_iter()
                .map(|(workflow, count)| (workflow, "pause", count))
                .chain(limited.into_iter().flat_map(|(workflow, slots, rates)| {
                    [(workflow.clone(), "concurrency", slots), (workflow, "rate_limit", rates)]
                }))
                .chain(bursts.into_iter().map(|(workflow, count)| (workflow, "debounce", count)));
            for (workflow, reason, count) in held {
                let _ = writeln!(out, "wfo_runs_held{{workflow=\"{}\",reason=\"{reason}\"}} {count}", label(&workflow));
            }
            family(&mut out, "wfo_stream_length", "gauge", "Entries in the store's streams.");
            let _ = writeln!(out, "wfo_stream_length{{stream=\"ready\"}} {}", stats.ready_length);
            let _ = writeln!(out, "wfo_stream_length{{stream=\"events\"}} {}", stats.events_length);
            let _ = writeln!(out, "wfo_stream_length{{stream=\"events_dead\"}} {}", stats.events_dead);
            family(&mut out, "wfo_stream_pending", "gauge", "Entries delivered and not yet acknowledged.");
            let _ = writeln!(out, "wfo_stream_pending{{stream=\"ready\"}} {}", stats.ready_pending);
            let _ = writeln!(out, "wfo_stream_pending{{stream=\"events\"}} {}", stats.events_pending);
            family(
                &mut out,
                "wfo_events_hostile_removed_total",
                "counter",
                "Bus entries removed (and dead-lettered) because their ids were far ahead of the clock, by any replica.",
            );
            let _ = writeln!(out, "wfo_events_hostile_removed_total {}", stats.events_hostile_removed);
            family(&mut out, "wfo_store_round_trip_seconds", "gauge", "One round trip to the store, measured now.");
            let _ = writeln!(out, "wfo_store_round_trip_seconds {}", round_trip.as_secs_f64());
            family(&mut out, "wfo_store_up", "gauge", "Whether the store answered.");
            let _ = writeln!(out, "wfo_store_up 1");
        }
        _ => {
            family(&mut out, "wfo_store_up", "gauge", "Whether the store answered.");
            let _ = writeln!(out, "wfo_store_up 0");
        }
    }
    Ok(out)
}
