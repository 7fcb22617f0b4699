//! The process's telemetry. This module owns the logs: the global `tracing` subscriber, its
//! filter (`LOG_LEVEL`) and the line format (`LOG_FORMAT`: one JSON object per line, or text),
//! and the few lines `main` prints itself; [`otel`] owns the traces, the OpenTelemetry layer
//! this subscriber carries.

pub mod otel;

pub use crate::config::LogFormat;

use serde_json::{Map, Value};
use std::fmt;
use std::io::{IsTerminal, Write};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{FormatEvent, JsonFields, Writer};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// The subscriber under the log lines: the registry and the trace layer (if any).
type Base = tracing_subscriber::layer::Layered<Option<otel::Layer>, Registry>;

/// What every JSON line is tagged with when the process itself prints it (not a module's event).
const TARGET: &str = "workflow_orchestrator";

/// The format when `LOG_FORMAT` is not set: text for a person at a terminal, JSON for whatever
/// collects the output of a service (a file, a pipe, a container runtime).
pub fn resolve(setting: Option<LogFormat>) -> LogFormat {
    setting.unwrap_or(if std::io::stdout().is_terminal() { LogFormat::Text } else { LogFormat::Json })
}

/// Installs the global subscriber: the trace layer, and the log lines on standard error in
/// `format`, filtered by `level` (a `LOG_LEVEL`: a level or a tracing filter; `info` if it does
/// not parse). The filter is the log lines' own, so that `LOG_LEVEL` does not decide what is
/// traced.
pub fn init(format: LogFormat, level: &str, otel: Option<otel::Layer>) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    Registry::default().with(otel).with(lines(format, std::io::stderr).with_filter(filter)).try_init()?;
    if format == LogFormat::Json {
        // The default hook's message would be the one line on stderr that is not JSON; logged,
        // it also carries the span it happened in (a step's ids).
        std::panic::set_hook(Box::new(|info| {
            let payload = info.payload();
            let message = payload
                .downcast_ref::<&str>()
                .map(|text| (*text).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".to_owned());
            let location = info.location().map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
            let thread = std::thread::current();
            tracing::error!(target: "panic", location = location.as_deref(), thread = thread.name(), "panicked: {message}");
        }));
    }
    Ok(())
}

/// The fmt layer writing log lines in `format` to `writer`.
fn lines<W>(format: LogFormat, writer: W) -> Box<dyn Layer<Base> + Send + Sync>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer().fmt_fields(JsonFields::new()).event_format(FlatJson).with_writer(writer),
        ),
        // Colours only for a terminal: escape codes in a file or a log collector are noise.
        LogFormat::Text => {
            Box::new(tracing_subscriber::fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(writer))
        }
    }
}

/// Announces the listening address on standard output, for scripts and test harnesses that
/// start the service with `PORT=0`. Both forms hold `listening on http://<address>`; the JSON
/// line also has it in the `address` field.
pub fn announce_listening(format: LogFormat, address: std::net::SocketAddr) {
    let url = format!("http://{address}");
    let line = match format {
        LogFormat::Text => format!("listening on {url}"),
        LogFormat::Json => {
            let mut fields = Map::new();
            fields.insert("address".to_owned(), Value::String(url.clone()));
            json_line("INFO", &format!("listening on {url}"), TARGET, fields)
        }
    };
    let mut stdout = std::io::stdout().lock();
    // Flushed now: standard output is block-buffered when it is not a terminal.
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

/// Reports an error that stops the process (before or instead of logging) on standard error:
/// `workflow-orchestrator: <message>` in text, an ERROR line in JSON.
pub fn fatal(format: LogFormat, message: &str) {
    let line = match format {
        LogFormat::Text => format!("workflow-orchestrator: {message}"),
        LogFormat::Json => json_line("ERROR", message, TARGET, Map::new()),
    };
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// One JSON log line: the time, level, message and target first (for people reading the raw
/// lines; `serde_json`'s map would sort them in among the fields), then the fields.
fn json_line(level: &str, message: &str, target: &str, fields: Map<String, Value>) -> String {
    let quoted = |text: &str| Value::String(text.to_owned()).to_string();
    let mut line = format!(
        "{{\"timestamp\":{},\"level\":{},\"message\":{},\"target\":{}",
        quoted(&now()),
        quoted(level),
        quoted(message),
        quoted(target)
    );
    for (key, value) in fields {
        // A field must not hide one of the four above.
        let key = if matches!(key.as_str(), "timestamp" | "level" | "message" | "target") {
            format!("fields.{key}")
        } else {
            key
        };
        line.push_str(&format!(",{}:{value}", quoted(&key)));
    }
    line.push('}');
    line
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// The JSON line format: one flat object per event, whose fields are the event's and those of
/// every span it happened in (a step's `run_id`, `workflow`, `step`, `attempt`), so that a log
/// search finds all lines of a run by one top-level key. tracing-subscriber's own JSON format
/// nests span fields under `span`/`spans`.
struct FlatJson;

impl<S> FormatEvent<S, JsonFields> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Map::new();
        let mut span_name = None;
        if let Some(scope) = ctx.event_scope() {
            // Outermost first, so that an inner span's field wins over an outer one's.
            for span in scope.from_root() {
                span_name = Some(span.name());
                if let Some(formatted) = span.extensions().get::<FormattedFields<JsonFields>>()
                    && let Ok(Value::Object(map)) = serde_json::from_str::<Value>(formatted.as_str())
                {
                    fields.extend(map);
                }
            }
        }
        if let Some(name) = span_name {
            fields.insert("span".to_owned(), Value::String(name.to_owned()));
        }
        let mut visitor = FieldVisitor { fields: Map::new(), message: String::new(), log_target: None };
        event.record(&mut visitor);
        fields.extend(visitor.fields);
        let meta = event.metadata();
        let target = visitor.log_target.as_deref().unwrap_or(meta.target());
        writeln!(writer, "{}", json_line(meta.level().as_str(), &visitor.message, target, fields))
    }
}

/// Collects an event's fields as JSON values; `message` apart, and the `log.*` fields of events
/// bridged from the `log` crate dropped but for their target.
struct FieldVisitor {
    fields: Map<String, Value>,
    message: String,
    log_target: Option<String>,
}

impl FieldVisitor {
    fn put(&mut self, field: &Field, value: Value) {
        match field.name() {
            "message" => {
                self.message = match value {
                    Value::String(text) => text,
                    other => other.to_string(),
                }
            }
            "log.target" => self.log_target = value.as_str().map(str::to_owned),
            name if name.starts_with("log.") => {}
            name => {
                self.fields.insert(name.to_owned(), value);
            }
        }
    }
}

impl Visit for FieldVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer into a shared buffer, for capturing lines.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'w> tracing_subscriber::fmt::MakeWriter<'w> for Captured {
        type Writer = Captured;
        fn make_writer(&'w self) -> Captured {
            self.clone()
        }
    }

    fn capture(format: LogFormat, body: impl FnOnce()) -> String {
        let out = Captured::default();
        let subscriber = Registry::default().with(None::<otel::Layer>).with(lines(format, out.clone()));
        tracing::subscriber::with_default(subscriber, body);
        String::from_utf8(out.0.lock().unwrap().clone()).unwrap()
    }

    fn parse(text: &str) -> Vec<Map<String, Value>> {
        text.lines()
            .map(|line| match serde_json::from_str(line) {
                Ok(Value::Object(object)) => object,
                other => panic!("not a JSON object: {line} ({other:?})"),
            })
            .collect()
    }

    #[test]
    fn a_json_line_carries_the_fields_of_its_spans_at_the_top_level() {
        let text = capture(LogFormat::Json, || {
            let span = tracing::info_span!(
                "step",
                run_id = "r-1",
                workflow = "wf",
                step = tracing::field::Empty,
                attempt = 2u32
            );
            let _entered = span.enter();
            span.record("step", "build");
            tracing::info!(error = "boom", code = 7, "step failed");
        });
        let lines = parse(&text);
        assert_eq!(lines.len(), 1, "{text}");
        let line = &lines[0];
        assert_eq!(line["message"], "step failed");
        assert_eq!(line["level"], "INFO");
        assert_eq!(line["target"], module_path!());
        assert!(line["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{line:?}");
        assert_eq!(line["run_id"], "r-1");
        assert_eq!(line["workflow"], "wf");
        assert_eq!(line["step"], "build");
        assert_eq!(line["attempt"], 2);
        assert_eq!(line["error"], "boom");
        assert_eq!(line["code"], 7);
        assert_eq!(line["span"], "step");
    }

    #[test]
    fn an_event_field_wins_over_a_span_field_and_cannot_hide_the_message() {
        let text = capture(LogFormat::Json, || {
            let span = tracing::info_span!("outer", attempt = 1u32);
            let _entered = span.enter();
            tracing::warn!(attempt = 3u32, level = "mine", "text with \"quotes\"\nand a newline");
        });
        let lines = parse(&text);
        assert_eq!(lines.len(), 1, "{text}");
        assert_eq!(lines[0]["attempt"], 3);
        assert_eq!(lines[0]["level"], "WARN");
        assert_eq!(lines[0]["fields.level"], "mine");
        assert_eq!(lines[0]["message"], "text with \"quotes\"\nand a newline");
    }

    #[test]
    fn text_lines_off_a_terminal_have_no_escape_codes() {
        // The test's standard error is not a terminal under `cargo test` capture or CI.
        if std::io::stderr().is_terminal() {
            return;
        }
        let text = capture(LogFormat::Text, || {
            let span = tracing::info_span!("step", run_id = "r-1");
            let _entered = span.enter();
            tracing::warn!(error = "boom", "step failed");
        });
        assert!(text.contains("step failed"), "{text}");
        assert!(text.contains("run_id"), "{text}");
        assert!(!text.contains('\u{1b}'), "{text:?}");
    }

    #[test]
    fn printed_lines_are_json_objects_with_the_same_keys() {
        let mut fields = Map::new();
        fields.insert("address".to_owned(), Value::String("http://127.0.0.1:1".to_owned()));
        fields.insert("message".to_owned(), Value::String("shadow".to_owned()));
        let text = json_line("INFO", "listening on http://127.0.0.1:1", TARGET, fields);
        let line = parse(&text).remove(0);
        assert_eq!(line["message"], "listening on http://127.0.0.1:1");
        assert_eq!(line["address"], "http://127.0.0.1:1");
        assert_eq!(line["fields.message"], "shadow");
        assert_eq!(line["target"], TARGET);
        // The four come first, in this order, for people reading the raw lines.
        let at = |key: &str| text.find(&format!("\"{key}\":")).unwrap();
        assert!(text.starts_with("{\"timestamp\":"), "{text}");
        assert!(at("level") < at("message") && at("message") < at("target") && at("target") < at("address"), "{text}");
    }
}
