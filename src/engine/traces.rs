//! A run's spans. One trace per run: the run's [`RunTrace`] (kept in `run_created` and in the
//! run's state) fixes the trace id and the run span's id when the run is created, so that every
//! replica parents its spans to the same run span:
//!
//! - a step attempt is the executor's `step` span (a `tracing` span, exported by the replica
//!   that ran the attempt through the subscriber's OpenTelemetry layer), its parent set to the
//!   run span;
//! - the run span itself is exported when the run ends, by whichever replica ends it, with the
//!   run's creation time as its start;
//! - a back-off (between a failed attempt and the next) and a parked time (`sleep`,
//!   `wait_for_event`) are exported when they end, by the replica that ends them, from the time
//!   the run entered them (the state's `updated_at`).
//!
//! With traces off (`config.traces` is `None`) nothing here builds a span; a caller's context is
//! still kept with the run and passed on to what the steps call.

use super::Engine;
use crate::machine::{Millis, RunState, RunTrace, Status, StepStatus, TraceContext};
use crate::store::RunId;
use crate::telemetry::otel::TRACER;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, Status as SpanStatus, TraceContextExt, TraceFlags, TraceId,
};
use opentelemetry::trace::{TraceState, Tracer as _};
use opentelemetry::{Context, KeyValue};
use std::time::{Duration, SystemTime};
use tracing_opentelemetry::OpenTelemetrySpanExt;

impl Engine {
    /// The trace of a run being created, `caller` being the span of whoever started it.
    ///
    /// Traces on: a new span id for the run, in the caller's trace (or a new one), sampled as
    /// the settings say. Traces off: the caller's context only, kept so that it is passed on
    /// (propagation needs no exporter); no context at all without a caller.
    pub(super) fn new_run_trace(&self, caller: Option<TraceContext>) -> Option<RunTrace> {
        let Some(sampler) = self.config.traces else {
            return caller
                .map(|caller| RunTrace { span: caller.at_span(random_span_id()), parent: Some(caller.span_id) });
        };
        let trace_id = caller.as_ref().map_or_else(random_trace_id, |c| c.trace_id);
        let sampled = sampler.samples(&trace_id, caller.as_ref().map(TraceContext::sampled));
        Some(RunTrace {
            span: TraceContext {
                trace_id,
                span_id: random_span_id(),
                flags: u8::from(sampled),
                tracestate: caller.as_ref().map(|c| c.tracestate.clone()).unwrap_or_default(),
            },
            parent: caller.map(|c| c.span_id),
        })
    }

    /// Makes `span` (a step attempt's) a child of the run span, and returns the context the
    /// attempt passes on to what it calls (`traceparent`): the attempt's own span when traces
    /// are on, the caller's when they are off, nothing for a run without a trace.
    pub(super) fn attempt_trace(&self, span: &tracing::Span, trace: Option<&RunTrace>) -> Option<TraceContext> {
        let trace = trace?;
        if self.config.traces.is_none() {
            return trace.caller();
        }
        // Fails only without the OpenTelemetry layer (then nothing is exported anyway).
        let _ = span.set_parent(Context::new().with_remote_span_context(span_context(&trace.span)));
        span.record("trace_id", trace.span.trace_id_hex());
        let own = span.context().span().span_context().clone();
        if !own.is_valid() {
            return Some(trace.span.clone());
        }
        Some(TraceContext {
            trace_id: own.trace_id().to_bytes(),
            span_id: own.span_id().to_bytes(),
            flags: own.trace_flags().to_u8(),
            tracestate: trace.span.tracestate.clone(),
        })
    }

    /// Records the end of a step attempt on its span: the outcome, and the error if it failed.
    pub(super) fn attempt_ended(&self, span: &tracing::Span, outcome: &'static str, error: Option<&str>) {
        if self.config.traces.is_none() {
            return;
        }
        span.set_attribute("outcome", outcome);
        span.set_attribute("replica", self.config.replica_id.clone());
        if let Some(error) = error {
            span.set_attribute("error.message", error.to_owned());
            span.set_status(SpanStatus::error(error.to_owned()));
        }
    }

    /// Exports the run span of a run that just ended (`state` is its final state). A run that
    /// was resumed after it failed had its run span exported when it first ended: its later
    /// end is a `run.resumed` span under it (from the resume's first attempt on, they are
    /// children of the run span as before), never a second span with the run span's id.
    pub(super) fn run_ended(&self, run: &RunId, state: &RunState, now: Millis) {
        let Some(trace) = self.sampled(state) else { return };
        let tracer = opentelemetry::global::tracer(TRACER);
        // A resume starts its step at an attempt after the failed one: only then is there an
        // offset.
        let resumed = !state.attempt_offsets.is_empty();
        let (parent, mut builder) = if resumed {
            let parent = Context::new().with_remote_span_context(span_context(&trace.span));
            (parent, tracer.span_builder("run.resumed").with_start_time(system_time(state.updated_at)))
        } else {
            let parent = match trace.parent {
                Some(span_id) => Context::new().with_remote_span_context(span_context(&trace.span.at_span(span_id))),
                None => Context::new(),
            };
            let mut builder = tracer.span_builder("run").with_start_time(system_time(state.created_at));
            builder.trace_id = Some(TraceId::from_bytes(trace.span.trace_id));
            builder.span_id = Some(SpanId::from_bytes(trace.span.span_id));
            (parent, builder)
        };
        builder = builder.with_attributes(self.attributes(run, state, None, state.status.name()));
        let mut span = tracer.build_with_context(builder, &parent);
        match (&state.status, &state.last_error) {
            (Status::Completed, _) => span.set_status(SpanStatus::Ok),
            (Status::Failed, Some(error)) => span.set_status(SpanStatus::error(error.message.clone())),
            (_, _) => span.set_status(SpanStatus::error(format!("the run {}", state.status.name()))),
        }
        span.end_with_timestamp(system_time(now));
    }

    /// Exports the span of a wait of `step` that just ended: a back-off (the step is
    /// `retrying`) or a parked step (`sleeping`, `waiting`). `state` is the run's state before
    /// the wake-up, whose last update is taken as the wait's start (exact for a run with one
    /// step at a time); `by_event`: a waiting step's event came (else its time did).
    pub(super) fn wait_ended(&self, run: &RunId, state: &RunState, step: u32, by_event: bool, now: Millis) {
        let Some(trace) = self.sampled(state) else { return };
        let (name, attempt, outcome) = match state.steps.get(&step) {
            Some(StepStatus::Retrying { attempt, .. }) => ("backoff", *attempt, "retry"),
            Some(StepStatus::Sleeping { attempt, .. }) => ("sleep", *attempt, "slept"),
            Some(StepStatus::Waiting { attempt, .. }) => {
                ("wait", *attempt, if by_event { "event" } else { "timed_out" })
            }
            Some(
                StepStatus::Queued { .. }
                | StepStatus::Running { .. }
                | StepStatus::AwaitingChild { .. }
                | StepStatus::Completed
                | StepStatus::Failed { .. },
            )
            | None => return,
        };
        let tracer = opentelemetry::global::tracer(TRACER);
        let builder = tracer
            .span_builder(name)
            .with_start_time(system_time(state.updated_at))
            .with_attributes(self.attributes(run, state, Some((step, attempt)), outcome));
        let parent = Context::new().with_remote_span_context(span_context(&trace.span));
        tracer.build_with_context(builder, &parent).end_with_timestamp(system_time(now));
    }

    /// The run's trace, if traces are on and the run is sampled.
    fn sampled<'a>(&self, state: &'a RunState) -> Option<&'a RunTrace> {
        self.config.traces?;
        state.trace.as_ref().filter(|trace| trace.span.sampled())
    }

    fn attributes(
        &self,
        run: &RunId,
        state: &RunState,
        step: Option<(u32, u32)>,
        outcome: &'static str,
    ) -> Vec<KeyValue> {
        let mut attributes = vec![
            KeyValue::new("run_id", run.to_string()),
            KeyValue::new("workflow", state.workflow.clone()),
            KeyValue::new("replica", self.config.replica_id.clone()),
            KeyValue::new("outcome", outcome),
        ];
        if let Some((step, attempt)) = step {
            let id = self
                .definitions
                .read()
                .get(&state.definition)
                .and_then(|w| w.def.steps.get(step as usize).map(|s| s.id.clone()));
            attributes.push(KeyValue::new("step", id.unwrap_or_else(|| step.to_string())));
            attributes.push(KeyValue::new("attempt", i64::from(attempt)));
        }
        attributes
    }
}

/// The OpenTelemetry form of a kept context, as a remote parent.
fn span_context(trace: &TraceContext) -> SpanContext {
    SpanContext::new(
        TraceId::from_bytes(trace.trace_id),
        SpanId::from_bytes(trace.span_id),
        TraceFlags::new(trace.flags),
        true,
        trace.tracestate.parse::<TraceState>().unwrap_or_default(),
    )
}

fn system_time(at: Millis) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(at)
}

fn random_trace_id() -> [u8; 16] {
    loop {
        let id: [u8; 16] = rand::random();
        if id != [0; 16] {
            return id;
        }
    }
}

fn random_span_id() -> [u8; 8] {
    loop {
        let id: [u8; 8] = rand::random();
        if id != [0; 8] {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Sampler;
    use crate::engine::EngineConfig;
    use std::sync::Arc;

    async fn engine_with(traces: Option<Sampler>) -> Arc<Engine> {
        let settings = crate::config::Settings::from_lookup(|_| None).unwrap();
        let config = EngineConfig { traces, ..EngineConfig::from_settings(&settings) };
        let registry = crate::definition::Registry::parse(
            "traces test",
            "[[workflow]]\nid = \"w\"\n[[workflow.step]]\nid = \"s\"\naction = \"noop\"\n",
        )
        .unwrap();
        Engine::new(Arc::new(crate::store::memory::MemoryStore::new(1)), Arc::new(registry), config).await.unwrap()
    }

    fn caller(flags: &str) -> TraceContext {
        let parent = format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}");
        TraceContext::parse(&parent, Some("k=v")).unwrap()
    }

    #[tokio::test]
    async fn with_traces_off_a_run_keeps_only_its_callers_context() {
        let engine = engine_with(None).await;
        assert_eq!(engine.new_run_trace(None), None, "no caller, no context: nothing to continue");
        let trace = engine.new_run_trace(Some(caller("01"))).unwrap();
        assert_eq!(trace.parent, Some(caller("01").span_id));
        assert_eq!((trace.span.trace_id, trace.span.flags), (caller("01").trace_id, 1));
        assert_eq!(trace.caller(), Some(caller("01")), "what steps pass on: the caller's own span");
        let span = tracing::info_span!("step");
        assert_eq!(engine.attempt_trace(&span, Some(&trace)), Some(caller("01")));
        assert_eq!(engine.attempt_trace(&span, None), None);
    }

    #[tokio::test]
    async fn with_traces_on_a_run_gets_its_own_span_sampled_once() {
        let engine = engine_with(Some(Sampler { parent_based: true, ratio: 1.0 })).await;
        let root = engine.new_run_trace(None).unwrap();
        assert_eq!((root.parent, root.span.flags), (None, 1), "a new trace, sampled");
        assert_ne!(root.span.trace_id, [0; 16]);
        let child = engine.new_run_trace(Some(caller("00"))).unwrap();
        assert_eq!(child.span.trace_id, caller("00").trace_id);
        assert_ne!(child.span.span_id, caller("00").span_id, "the run span is a span of its own");
        assert_eq!(child.parent, Some(caller("00").span_id));
        assert_eq!((child.span.flags, child.span.tracestate.as_str()), (0, "k=v"), "the caller's decision and state");
        let never = engine_with(Some(Sampler { parent_based: false, ratio: 0.0 })).await;
        assert_eq!(never.new_run_trace(Some(caller("01"))).unwrap().span.flags, 0);
    }
}
