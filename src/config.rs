//! Settings, from the environment, with the defaults a user would expect.

use crate::definition::parse_duration;
use std::path::PathBuf;
use std::time::Duration;

/// Everything a replica is configured with. Durations are written like `200ms`, `10s`, `5m`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `PORT`: the HTTP port (default 5003).
    pub port: u16,
    /// `REDIS_URL`: `redis://` or `rediss://`; unset = the embedded in-memory store.
    pub redis_url: Option<String>,
    /// `KEY_PREFIX`: prefix of every Redis key (default `wfo`).
    pub key_prefix: String,
    /// `REPLICA_ID`: this replica's name in logs, histories and the consumer group.
    pub replica_id: String,
    /// `LEASE_TTL`: how long a step's lease lasts without renewal before other replicas may take
    /// the step over (default 30s; renewed every third of it).
    pub lease_ttl: Duration,
    /// `SHARDS`: how many shards runs are spread over (default 16). Fixed for a deployment.
    pub shards: u16,
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
    /// `API_TOKEN`: when set, the API (all but `/health` and `/metrics`) requires
    /// `Authorization: Bearer <token>`.
    pub api_token: Option<String>,
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
        Settings::from_lookup(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))
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
        Ok(Settings {
            port: number(&lookup, "PORT", 5003u16, 0, u16::MAX)?,
            redis_url,
            key_prefix,
            replica_id,
            lease_ttl: duration("LEASE_TTL", Duration::from_secs(30))?,
            shards: number(&lookup, "SHARDS", 16u16, 1, 1024)?,
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
            api_token: lookup("API_TOKEN"),
        })
    }
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
        assert_eq!(s.shards, 16);
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
    }
}
