//! Settings, from the environment, with the defaults a user would expect.

use crate::definition::parse_duration;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The most shards a deployment may have (`SHARDS`).
pub const MAX_SHARDS: u16 = 1024;
/// The shards of a deployment that does not set `SHARDS`, on a Redis Cluster or the embedded
/// store (a standalone Redis gets one: see `RedisStore::open`).
pub const DEFAULT_SHARDS: u16 = 16;

/// Everything a replica is configured with. Durations are written like `200ms`, `10s`, `5m`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `PORT`: the HTTP port (default 5003).
    pub port: u16,
    /// `REDIS_URL`: `redis://`, `rediss://` or `redis-cluster://`; unset = the embedded
    /// in-memory store.
    pub redis_url: Option<String>,
    /// `REDIS_WAIT_REPLICAS`: how many Redis replicas must have a write before it is
    /// acknowledged (default 0: acknowledged once the primary has it).
    pub redis_wait_replicas: u32,
    /// `REDIS_WAIT_TIMEOUT`: how long a write waits for those replicas before it fails as
    /// retryable (default 1s).
    pub redis_wait_timeout: Duration,
    /// `KEY_PREFIX`: prefix of every Redis key (default `wfo`).
    pub key_prefix: String,
    /// `REPLICA_ID`: this replica's name in logs, histories and the consumer group.
    pub replica_id: String,
    /// `LEASE_TTL`: how long a step's lease lasts without renewal before other replicas may take
    /// the step over (default 30s; renewed every third of it).
    pub lease_ttl: Duration,
    /// `SHARDS`: how many shards runs are spread over. Fixed for a deployment; unset: the count
    /// the data was written with, else 16 on a Redis Cluster or the embedded store and 1 on a
    /// standalone Redis.
    pub shards: Option<u16>,
    /// `MAX_CONCURRENT_STEPS`: executors of this replica (default 32).
    pub max_concurrent_steps: usize,
    /// `SHUTDOWN_GRACE`: how long in-flight steps may finish after SIGTERM (default 30s).
    pub shutdown_grace: Duration,
    /// `MAX_DELIVERIES`: deliveries of one step attempt (crashes, lost leases) before the run
    /// fails instead of looping (default 5).
    pub max_deliveries: u64,
    /// `RUN_RETENTION`: how long finished runs are kept (default 7d).
    pub run_retention: Duration,
    /// `IDEMPOTENCY_RETENTION`: how long an idempotency key keeps returning its run (default 24h).
    pub idempotency_retention: Duration,
    /// `EVENTS_MAX_LEN`: about how many events the bus stream keeps (default 100000).
    pub events_max_len: u64,
    /// `EVENTS_RETENTION`: how long events are kept on the bus (default 7d).
    pub events_retention: Duration,
    /// `EVENT_MAX_BYTES`: the largest event payload accepted (default 1048576).
    pub event_max_bytes: usize,
    /// `WORKFLOWS_FILE`: a TOML file of workflows; unset = the built-in Molochain registry.
    pub workflows_file: Option<PathBuf>,
    /// `LOG_LEVEL`: error, warn, info (default), debug, trace, or a tracing filter.
    pub log_level: String,
    /// `LOG_FORMAT`: `json` (one object per line) or `text`; unset = chosen at start-up (text on
    /// a terminal, JSON otherwise).
    pub log_format: Option<LogFormat>,
    /// `API_TOKEN`: when set, the API (all but `/health` and `/metrics`) requires
    /// `Authorization: Bearer <token>`. Surrounding whitespace is trimmed (with a warning): a
    /// token pasted with a trailing space or newline would otherwise lock everyone out.
    pub api_token: Option<String>,
    /// `BIND_ADDR`: the address to listen on. Unset: `127.0.0.1` without `API_TOKEN` (an open
    /// API stays on this machine unless the operator says otherwise), `0.0.0.0` with one.
    pub bind_addr: IpAddr,
    /// `ALLOWED_HOSTS`: comma-separated host names (without port) that the `Host` header may
    /// name when no `API_TOKEN` is set, beside loopback names and IP addresses (DNS rebinding).
    pub allowed_hosts: Vec<String>,
    /// `OTEL_*`: where traces are exported, and how they are sampled. `None`: tracing is off
    /// (no endpoint is set, `OTEL_TRACES_EXPORTER=none` or `OTEL_SDK_DISABLED=true`).
    pub traces: Option<TraceSettings>,
    /// Where actions send things: `NOTIFY_WEBHOOK_URL` (the Communications Hub webhook),
    /// `WEBHOOK_SECRET` (signs notifications), `INNGEST_EVENT_KEY`, `INNGEST_BASE_URL` (default
    /// `https://inn.gs`).
    pub integrations: Integrations,
    /// `INNGEST_SIGNING_KEY`: when set, `POST /api/webhooks/inngest` accepts callbacks signed
    /// with it; unset, the route answers 404 `not_configured`.
    pub inngest_signing_key: Option<String>,
    /// Things worth a warning at start-up, found while reading the settings (logged by `main`
    /// once logging is set up).
    pub warnings: Vec<String>,
}

/// A setting that could not be read: names the variable and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("environment variable {variable}: {problem}")]
pub struct SettingsError {
    pub variable: &'static str,
    pub problem: String,
}

impl Settings {
    pub fn from_env() -> Result<Settings, SettingsError> {
        Settings::from_lookup(env_lookup)
    }

    /// Reads settings through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Settings, SettingsError> {
        let duration = |variable: &'static str, default: Duration| -> Result<Duration, SettingsError> {
            match lookup(variable) {
                None => Ok(default),
                Some(text) => match parse_duration(&text) {
                    Ok(d) if !d.is_zero() => Ok(d),
                    Ok(_) => Err(SettingsError { variable, problem: "must be greater than zero".to_owned() }),
                    Err(problem) => Err(SettingsError { variable, problem }),
                },
            }
        };
        fn number<T: std::str::FromStr + PartialOrd + std::fmt::Display>(
            lookup: &dyn Fn(&str) -> Option<String>,
            variable: &'static str,
            default: T,
            min: T,
            max: T,
        ) -> Result<T, SettingsError> {
            match lookup(variable) {
                None => Ok(default),
                Some(text) => match text.trim().parse::<T>() {
                    Ok(v) if v >= min && v <= max => Ok(v),
                    _ => Err(SettingsError {
                        variable,
                        problem: format!("`{text}` is not a number between {min} and {max}"),
                    }),
                },
            }
        }
        // A variable set to blanks counts as unset.
        let set = |variable: &str| lookup(variable).filter(|value| !value.trim().is_empty());
        let key_prefix = lookup("KEY_PREFIX").unwrap_or_else(|| "wfo".to_owned());
        if key_prefix.contains(['{', '}', ' ']) {
            return Err(SettingsError {
                variable: "KEY_PREFIX",
                problem: "must not contain `{`, `}` or spaces".to_owned(),
            });
        }
        let replica_id = lookup("REPLICA_ID").unwrap_or_else(default_replica_id);
        if replica_id.contains([' ', ':']) {
            return Err(SettingsError { variable: "REPLICA_ID", problem: "must not contain spaces or `:`".to_owned() });
        }
        let redis_url = lookup("REDIS_URL");
        if let Some(url) = &redis_url
            && !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("redis-cluster://"))
        {
            return Err(SettingsError {
                variable: "REDIS_URL",
                problem: "must start with redis://, rediss:// or redis-cluster://".to_owned(),
            });
        }
        let mut warnings = Vec::new();
        let api_token = match lookup("API_TOKEN") {
            Some(raw) if raw.trim() != raw => {
                warnings.push(
                    "API_TOKEN has surrounding whitespace; it was trimmed (clients send the token without it)"
                        .to_owned(),
                );
                Some(raw.trim().to_owned())
            }
            other => other.filter(|token| !token.is_empty()),
        };
        let bind_addr = match lookup("BIND_ADDR") {
            None if api_token.is_none() => IpAddr::from([127, 0, 0, 1]),
            None => IpAddr::from([0, 0, 0, 0]),
            Some(text) => text.trim().parse().map_err(|_| SettingsError {
                variable: "BIND_ADDR",
                problem: format!("`{text}` is not an IP address (such as 127.0.0.1, 0.0.0.0 or ::)"),
            })?,
        };
        let allowed_hosts = match lookup("ALLOWED_HOSTS") {
            None => Vec::new(),
            Some(text) => {
                let hosts: Vec<String> =
                    text.split(',').map(|h| h.trim().to_ascii_lowercase()).filter(|h| !h.is_empty()).collect();
                if let Some(bad) = hosts
                    .iter()
                    .find(|h| !h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')))
                {
                    return Err(SettingsError {
                        variable: "ALLOWED_HOSTS",
                        problem: format!("`{bad}` is not a host name (comma-separated names, without port)"),
                    });
                }
                hosts
            }
        };
        Ok(Settings {
            port: number(&lookup, "PORT", 5003u16, 0, u16::MAX)?,
            redis_url,
            redis_wait_replicas: number(&lookup, "REDIS_WAIT_REPLICAS", 0u32, 0, 16)?,
            redis_wait_timeout: duration("REDIS_WAIT_TIMEOUT", Duration::from_secs(1))?,
            key_prefix,
            replica_id,
            lease_ttl: duration("LEASE_TTL", Duration::from_secs(30))?,
            shards: match lookup("SHARDS") {
                Some(_) => Some(number(&lookup, "SHARDS", DEFAULT_SHARDS, 1, MAX_SHARDS)?),
                None => None,
            },
            max_concurrent_steps: number(&lookup, "MAX_CONCURRENT_STEPS", 32usize, 1, 10_000)?,
            shutdown_grace: duration("SHUTDOWN_GRACE", Duration::from_secs(30))?,
            max_deliveries: number(&lookup, "MAX_DELIVERIES", 5u64, 1, 1000)?,
            run_retention: duration("RUN_RETENTION", Duration::from_secs(7 * 24 * 3600))?,
            idempotency_retention: duration("IDEMPOTENCY_RETENTION", Duration::from_secs(24 * 3600))?,
            events_max_len: number(&lookup, "EVENTS_MAX_LEN", 100_000u64, 1, u64::MAX)?,
            events_retention: duration("EVENTS_RETENTION", Duration::from_secs(7 * 24 * 3600))?,
            event_max_bytes: number(&lookup, "EVENT_MAX_BYTES", 1024 * 1024usize, 1, 64 * 1024 * 1024)?,
            workflows_file: lookup("WORKFLOWS_FILE").map(PathBuf::from),
            log_level: lookup("LOG_LEVEL").unwrap_or_else(|| "info".to_owned()),
            log_format: log_format(&lookup)?,
            api_token,
            bind_addr,
            allowed_hosts,
            traces: trace_settings(&lookup)?,
            integrations: Integrations {
                notify_url: set("NOTIFY_WEBHOOK_URL"),
                webhook_secret: set("WEBHOOK_SECRET"),
                inngest_event_key: set("INNGEST_EVENT_KEY"),
                inngest_base_url: set("INNGEST_BASE_URL").unwrap_or_else(|| "https://inn.gs".to_owned()),
            },
            inngest_signing_key: lookup("INNGEST_SIGNING_KEY").filter(|key| !key.is_empty()),
            warnings,
        })
    }
}

/// Where actions send things (see [`Settings::integrations`]); an empty value is unset.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Integrations {
    pub notify_url: Option<String>,
    pub webhook_secret: Option<String>,
    pub inngest_event_key: Option<String>,
    pub inngest_base_url: String,
}

/// Where traces go: OTLP over HTTP, protobuf-encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    /// The URL spans are POSTed to: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as it is, else
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` with `/v1/traces` appended (as the OTLP specification says).
    pub endpoint: String,
    /// `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG`.
    pub sampler: Sampler,
    /// `OTEL_SERVICE_NAME`, else `service.name` in `OTEL_RESOURCE_ATTRIBUTES`, else
    /// `workflow-orchestrator`.
    pub service_name: String,
}

/// Which runs are sampled (`OTEL_TRACES_SAMPLER`): decided once, when a run is created, and kept
/// in its trace flags, so that every span of the run, on every replica, agrees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    /// `parentbased_*` (the default): a run started with a `traceparent` follows its sampled
    /// flag; only runs without one are sampled by `ratio`.
    pub parent_based: bool,
    /// The share of traces sampled, by trace id: 1 for `always_on`, 0 for `always_off`, the
    /// argument of `traceidratio` (default 1).
    pub ratio: f64,
}

impl Sampler {
    /// Whether a run whose trace is `trace_id` is sampled, its caller's flag being
    /// `parent_sampled`. The trace id's lower 63 bits against the ratio, as the OpenTelemetry
    /// SDKs' `TraceIdRatioBased` does, so the same trace gets the same answer everywhere.
    pub fn samples(&self, trace_id: &[u8; 16], parent_sampled: Option<bool>) -> bool {
        if let (true, Some(sampled)) = (self.parent_based, parent_sampled) {
            return sampled;
        }
        if self.ratio >= 1.0 {
            return true;
        }
        let low = u64::from_be_bytes(trace_id[8..16].try_into().expect("8 bytes")) >> 1;
        low < (self.ratio.max(0.0) * (1u64 << 63) as f64) as u64
    }
}

/// The `OTEL_*` variables of traces. Refuses what this build cannot do (`grpc`, `http/json`)
/// rather than start without the traces asked for.
fn trace_settings(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Option<TraceSettings>, SettingsError> {
    if lookup("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    match lookup("OTEL_TRACES_EXPORTER").map(|v| v.trim().to_ascii_lowercase()) {
        Some(exporter) if exporter == "none" => return Ok(None),
        None => {}
        Some(exporter) if exporter == "otlp" => {}
        Some(other) => {
            return Err(SettingsError {
                variable: "OTEL_TRACES_EXPORTER",
                problem: format!("`{other}` is not supported: only `otlp` (or `none`)"),
            });
        }
    }
    let endpoint = match (lookup("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"), lookup("OTEL_EXPORTER_OTLP_ENDPOINT")) {
        (Some(traces), _) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", traces.trim().to_owned()),
        (None, Some(base)) => {
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("{}/v1/traces", base.trim().trim_end_matches('/')))
        }
        (None, None) => return Ok(None),
    };
    let (variable, endpoint) = endpoint;
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(SettingsError { variable, problem: format!("`{endpoint}` is not an http:// or https:// URL") });
    }
    for variable in ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"] {
        if let Some(protocol) = lookup(variable) {
            match protocol.trim() {
                "http/protobuf" => break,
                other => {
                    return Err(SettingsError {
                        variable,
                        problem: format!(
                            "`{other}` is not supported: this build exports OTLP over HTTP as protobuf only (`http/protobuf`); point it at a collector's HTTP port (4318)"
                        ),
                    });
                }
            }
        }
    }
    let argument = |default: f64| -> Result<f64, SettingsError> {
        match lookup("OTEL_TRACES_SAMPLER_ARG") {
            None => Ok(default),
            Some(text) => match text.trim().parse::<f64>() {
                Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
                _ => Err(SettingsError {
                    variable: "OTEL_TRACES_SAMPLER_ARG",
                    problem: format!("`{text}` is not a ratio between 0 and 1"),
                }),
            },
        }
    };
    let sampler = match lookup("OTEL_TRACES_SAMPLER").map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        None | Some("parentbased_always_on") => Sampler { parent_based: true, ratio: 1.0 },
        Some("always_on") => Sampler { parent_based: false, ratio: 1.0 },
        Some("always_off") => Sampler { parent_based: false, ratio: 0.0 },
        Some("parentbased_always_off") => Sampler { parent_based: true, ratio: 0.0 },
        Some("traceidratio") => Sampler { parent_based: false, ratio: argument(1.0)? },
        Some("parentbased_traceidratio") => Sampler { parent_based: true, ratio: argument(1.0)? },
        Some(other) => {
            return Err(SettingsError {
                variable: "OTEL_TRACES_SAMPLER",
                problem: format!(
                    "`{other}` is not supported (always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off, parentbased_traceidratio)"
                ),
            });
        }
    };
    let service_name = lookup("OTEL_SERVICE_NAME")
        .or_else(|| {
            let attributes = lookup("OTEL_RESOURCE_ATTRIBUTES")?;
            attributes.split(',').find_map(|pair| match pair.split_once('=') {
                Some((key, value)) if key.trim() == "service.name" && !value.trim().is_empty() => {
                    Some(value.trim().to_owned())
                }
                _ => None,
            })
        })
        .map_or_else(|| "workflow-orchestrator".to_owned(), |name| name.trim().to_owned());
    Ok(Some(TraceSettings { endpoint, sampler, service_name }))
}

/// How log lines are written (`LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line: time, level, message, target and the fields.
    Json,
    /// Lines for people; coloured only on a terminal.
    Text,
}

/// `LOG_FORMAT` alone: `main` also needs it when the other settings do not read, to report that
/// in the format asked for.
pub fn log_format(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Option<LogFormat>, SettingsError> {
    match lookup("LOG_FORMAT").map(|text| text.trim().to_ascii_lowercase()) {
        None => Ok(None),
        Some(text) if text == "json" => Ok(Some(LogFormat::Json)),
        Some(text) if text == "text" => Ok(Some(LogFormat::Text)),
        Some(text) => Err(SettingsError { variable: "LOG_FORMAT", problem: format!("`{text}` is not json or text") }),
    }
}

/// What [`Settings::from_env`] reads a variable with: set and not blank.
pub fn env_lookup(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
    let host = if host.is_empty() { "replica".to_owned() } else { host.replace([' ', ':'], "-") };
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn settings(pairs: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Settings::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn defaults_are_sane() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.port, 5003);
        assert_eq!(s.key_prefix, "wfo");
        assert_eq!(s.shards, None, "the data's count, or the deployment's default");
        assert_eq!(settings(&[("SHARDS", "4")]).unwrap().shards, Some(4));
        assert_eq!(s.lease_ttl, Duration::from_secs(30));
        assert!(s.redis_url.is_none());
    }

    #[test]
    fn errors_name_the_variable() {
        let err = settings(&[("LEASE_TTL", "soon")]).unwrap_err();
        assert_eq!(err.variable, "LEASE_TTL");
        let err = settings(&[("SHARDS", "0")]).unwrap_err();
        assert_eq!(err.variable, "SHARDS");
        let err = settings(&[("REDIS_URL", "localhost:6379")]).unwrap_err();
        assert_eq!(err.variable, "REDIS_URL");
        assert_eq!(settings(&[("SHUTDOWN_GRACE", "200ms")]).unwrap().shutdown_grace, Duration::from_millis(200));
        assert_eq!(settings(&[("BIND_ADDR", "everywhere")]).unwrap_err().variable, "BIND_ADDR");
        assert_eq!(settings(&[("ALLOWED_HOSTS", "a.example:80")]).unwrap_err().variable, "ALLOWED_HOSTS");
    }

    #[test]
    fn an_open_api_binds_to_loopback_unless_told_otherwise() {
        assert_eq!(settings(&[]).unwrap().bind_addr, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(settings(&[("API_TOKEN", "t")]).unwrap().bind_addr, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(settings(&[("BIND_ADDR", "0.0.0.0")]).unwrap().bind_addr, IpAddr::from([0, 0, 0, 0]));
        assert_eq!(settings(&[("BIND_ADDR", "::1")]).unwrap().bind_addr, "::1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_token_with_surrounding_whitespace_is_trimmed_with_a_warning() {
        let s = settings(&[("API_TOKEN", " secret \n")]).unwrap();
        assert_eq!(s.api_token.as_deref(), Some("secret"));
        assert!(s.warnings.iter().any(|w| w.contains("API_TOKEN")), "{:?}", s.warnings);
        assert!(settings(&[("API_TOKEN", "secret")]).unwrap().warnings.is_empty());
    }

    #[test]
    fn log_format_is_json_or_text_and_unset_means_chosen_at_start_up() {
        assert_eq!(settings(&[]).unwrap().log_format, None);
        assert_eq!(settings(&[("LOG_FORMAT", "json")]).unwrap().log_format, Some(LogFormat::Json));
        assert_eq!(settings(&[("LOG_FORMAT", " Text ")]).unwrap().log_format, Some(LogFormat::Text));
        let err = settings(&[("LOG_FORMAT", "yaml")]).unwrap_err();
        assert_eq!(err.variable, "LOG_FORMAT");
        assert!(err.problem.contains("yaml"), "{}", err.problem);
    }

    #[test]
    fn allowed_hosts_are_a_comma_separated_lowercased_list() {
        let s = settings(&[("ALLOWED_HOSTS", "Orchestrator-1, api.example.com,,")]).unwrap();
        assert_eq!(s.allowed_hosts, vec!["orchestrator-1".to_owned(), "api.example.com".to_owned()]);
    }

    #[test]
    fn integrations_are_read_here_blank_values_unset() {
        let none = settings(&[]).unwrap();
        assert_eq!(none.integrations.inngest_base_url, "https://inn.gs");
        assert_eq!((none.integrations.notify_url, none.inngest_signing_key), (None, None));
        let set = settings(&[
            ("NOTIFY_WEBHOOK_URL", "http://hub/hook"),
            ("WEBHOOK_SECRET", "  "),
            ("INNGEST_BASE_URL", "http://inngest:8288"),
            ("INNGEST_SIGNING_KEY", "signkey-test-abc"),
        ])
        .unwrap();
        assert_eq!(set.integrations.notify_url.as_deref(), Some("http://hub/hook"));
        assert_eq!(set.integrations.webhook_secret, None, "blanks are unset");
        assert_eq!(set.integrations.inngest_base_url, "http://inngest:8288");
        assert_eq!(set.inngest_signing_key.as_deref(), Some("signkey-test-abc"));
    }

    #[test]
    fn traces_are_off_unless_an_endpoint_is_set() {
        assert_eq!(settings(&[]).unwrap().traces, None);
        let base = [("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")];
        let on = settings(&base).unwrap().traces.unwrap();
        assert_eq!(on.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(on.sampler, Sampler { parent_based: true, ratio: 1.0 });
        let exact = settings(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://c/otlp/traces"), base[0]]).unwrap();
        assert_eq!(exact.traces.unwrap().endpoint, "https://c/otlp/traces");
        assert_eq!(settings(&[base[0], ("OTEL_TRACES_EXPORTER", "none")]).unwrap().traces, None);
        assert_eq!(settings(&[base[0], ("OTEL_SDK_DISABLED", "true")]).unwrap().traces, None);
    }

    #[test]
    fn grpc_and_unknown_samplers_are_refused_at_start_up() {
        let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");
        let err = settings(&[base, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).unwrap_err();
        assert_eq!(err.variable, "OTEL_EXPORTER_OTLP_PROTOCOL");
        assert!(err.problem.contains("http/protobuf"), "{}", err.problem);
        assert!(settings(&[base, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]).unwrap().traces.is_some());
        assert_eq!(settings(&[base, ("OTEL_TRACES_SAMPLER", "jaeger")]).unwrap_err().variable, "OTEL_TRACES_SAMPLER");
        assert_eq!(
            settings(&[base, ("OTEL_TRACES_SAMPLER", "traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "2")])
                .unwrap_err()
                .variable,
            "OTEL_TRACES_SAMPLER_ARG"
        );
        assert_eq!(settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")]).unwrap_err().variable, base.0);
    }

    #[test]
    fn sampling_follows_the_caller_when_parent_based_and_the_trace_id_otherwise() {
        let low = [0u8; 16];
        let mut high = [0u8; 16];
        high[8] = 0xff;
        let half = Sampler { parent_based: true, ratio: 0.5 };
        assert!(half.samples(&high, Some(true)));
        assert!(!half.samples(&low, Some(false)));
        assert!(half.samples(&low, None));
        assert!(!half.samples(&high, None));
        let ratio = Sampler { parent_based: false, ratio: 0.5 };
        assert!(!ratio.samples(&high, Some(true)));
        assert!(!Sampler { parent_based: false, ratio: 0.0 }.samples(&low, None));
    }
}
