//! Traces: the OpenTelemetry pipeline (OTLP over HTTP, protobuf) and the layer of the process's
//! subscriber that turns the engine's `step` spans into OpenTelemetry spans. [`super`] owns the
//! logs and installs this layer beside them.
//!
//! Built only when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set: with traces
//! off there is no layer, no exporter and no global tracer provider, so the engine's spans cost
//! what an unobserved `tracing` span costs and its run, back-off and parked spans are not built
//! at all (it checks its configuration first).
//!
//! The engine makes its run, back-off and parked spans through the global tracer
//! ([`opentelemetry::global`]) with the ids kept in the run, and its step-attempt spans through
//! `tracing` with the run span as their parent; both reach the same provider, set here.

use crate::config::TraceSettings;
use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::Layer as _;

/// The layer [`super::init`] stacks directly on the registry, beside the log lines. The log
/// lines' `LOG_LEVEL` filter is per-layer and does not apply to it: a trace layer carries its own
/// filter (e.g. `.with_filter(LevelFilter::INFO)`) so that traces do not depend on `LOG_LEVEL`.
pub type Layer = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

/// The instrumentation scope of every span of ours.
pub const TRACER: &str = "workflow-orchestrator";

/// How long the exit waits for the last spans to be exported: it comes after `SHUTDOWN_GRACE`
/// and must stay within the stop grace period of the supervisor (compose: 30 s for 25 s of
/// grace), also when the collector does not answer.
const SHUTDOWN_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// The `tracing` spans exported as OpenTelemetry spans: a step attempt's. Other spans (none
/// today) would each start a trace of their own, outside any run; events inside a step span
/// become its span events (a failure, a retry) whatever `LOG_LEVEL` is.
const EXPORTED_SPANS: &[&str] = &["step"];

/// Keeps the tracer provider alive; dropping it flushes the spans not yet exported and shuts the
/// exporter down, within [`SHUTDOWN_FLUSH`]. Held by `main` until after the runtime
/// has stopped: the exporter's blocking HTTP client must not be dropped inside it.
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Drop for Traces {
    fn drop(&mut self) {
        if let Err(err) = self.provider.shutdown_with_timeout(SHUTDOWN_FLUSH) {
            eprintln!("workflow-orchestrator: traces not all exported at exit: {err}");
        }
    }
}

/// Builds the exporter and the tracer provider, installs the provider as the global one, and
/// returns the subscriber layer with the guard that flushes it at exit.
///
/// Call before starting a Tokio runtime: the OTLP client is a blocking one (the batch processor
/// exports from a thread of its own, not from the runtime).
pub fn pipeline(settings: &TraceSettings, replica: &str) -> anyhow::Result<(Layer, Traces)> {
    // Headers (`OTEL_EXPORTER_OTLP_HEADERS`) and the time-out (`OTEL_EXPORTER_OTLP_TIMEOUT`) are
    // read by the exporter, the batch processor's tuning (`OTEL_BSP_*`) and the resource's
    // attributes (`OTEL_RESOURCE_ATTRIBUTES`) by the SDK, each as the specification says.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(settings.endpoint.clone())
        .build()
        .with_context(|| format!("cannot set up the OTLP exporter for {}", settings.endpoint))?;
    let resource = Resource::builder()
        .with_service_name(settings.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new("service.instance.id", replica.to_owned()))
        .build();
    // Runs are sampled when they are created (`Sampler` in the settings) and the decision is kept
    // in their trace flags; every span of ours has a run's context for parent, so following the
    // parent is all the SDK has to do.
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(TRACER))
        .with_location(false)
        .with_threads(false)
        .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            // Events up to info only: a filter without a level would make every `debug!` in the
            // process evaluated.
            if meta.is_span() { EXPORTED_SPANS.contains(&meta.name()) } else { *meta.level() <= tracing::Level::INFO }
        }));
    Ok((Box::new(layer), Traces { provider }))
}
