//! The parameters of each action (`action` and `with` of a step), as written in workflow files.
//! Strings may hold `${...}` templates (see `actions::template`), resolved when the step runs.

use super::duration;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// `http`: a request whose JSON response is the step's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSpec {
    #[serde(default = "HttpSpec::default_method")]
    pub method: String,
    pub url: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// A JSON body (templates inside strings).
    #[serde(default)]
    pub body: Option<serde_json::Value>,
    /// Statuses that count as success; default any 2xx.
    #[serde(default)]
    pub expect: Vec<u16>,
    /// Whether a 4xx is worth retrying (default: no, it will not get better).
    #[serde(default)]
    pub retry_on_4xx: bool,
    /// Bytes of response body kept.
    #[serde(default = "HttpSpec::default_max_response")]
    pub max_response: usize,
}

impl HttpSpec {
    fn default_method() -> String {
        "GET".to_owned()
    }
    const fn default_max_response() -> usize {
        1024 * 1024
    }
}

/// `publish`: appends an event to the bus (so workflows can chain).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishSpec {
    pub event: String,
    #[serde(default)]
    pub payload: Option<serde_json::Value>,
    #[serde(default)]
    pub key: Option<String>,
}

/// `notify`: POSTs a JSON message to the Communications Hub webhook, signed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySpec {
    #[serde(default)]
    pub channel: Option<String>,
    #[serde(default)]
    pub severity: Option<String>,
    pub message: serde_json::Value,
}

/// `sleep`: parks the run for `duration` on a durable timer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SleepSpec {
    #[serde(with = "duration::serde_human")]
    pub duration: Duration,
}

/// `wait_for_event`: parks the run until an event of type `event` whose payload matches
/// `correlate` arrives, or `timeout` passes (the step's output then says `timedOut: true`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitSpec {
    pub event: String,
    #[serde(default)]
    pub correlate: Option<Correlate>,
    #[serde(with = "duration::serde_human")]
    pub timeout: Duration,
}

/// The event's payload field `field` (a dotted path) must equal `equals` (a template, e.g.
/// `${input.userId}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Correlate {
    pub field: String,
    pub equals: String,
}

/// `inngest`: sends an event to Inngest's event API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InngestSpec {
    pub event: String,
    #[serde(default)]
    pub data: Option<serde_json::Value>,
}

/// `builtin`: a named action written in Rust (`with = { name = "...", ...parameters }`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuiltinSpec {
    pub name: String,
    /// The other parameters, as JSON (templates inside strings).
    pub params: serde_json::Value,
}

fn parse<T: serde::de::DeserializeOwned>(
    action: &str,
    with: Option<toml::Value>,
    example: &str,
) -> Result<T, (&'static str, String)> {
    let with = with.ok_or(("with", format!("`{action}` needs `with = {example}`")))?;
    with.try_into().map_err(|err: toml::de::Error| ("with", err.message().to_owned()))
}

fn json(value: toml::Value) -> Result<serde_json::Value, (&'static str, String)> {
    serde_json::to_value(value).map_err(|err| ("with", err.to_string()))
}

/// Parses the actions beyond `noop` and `exec`.
pub(super) fn parse_more(
    action: &str,
    with: Option<toml::Value>,
) -> Option<Result<super::ActionSpec, (&'static str, String)>> {
    use super::ActionSpec;
    let parsed = match action {
        "http" => parse::<HttpSpec>(action, with, "{ url = \"https://...\" }").and_then(|spec| {
            let method = spec.method.to_ascii_uppercase();
            if !["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"].contains(&method.as_str()) {
                return Err((
                    "with.method",
                    format!("`{}` is not one of GET, POST, PUT, PATCH, DELETE, HEAD", spec.method),
                ));
            }
            if spec.expect.iter().any(|s| !(100..=599).contains(s)) {
                return Err(("with.expect", "statuses are between 100 and 599".to_owned()));
            }
            Ok(ActionSpec::Http(HttpSpec { method, ..spec }))
        }),
        "publish" => parse::<PublishSpec>(action, with, "{ event = \"type\", payload = { ... } }").and_then(|spec| {
            if !spec.event.contains("${") && !super::valid_event_type(&spec.event) {
                return Err(("with.event", format!("`{}` is not an event type", spec.event)));
            }
            Ok(ActionSpec::Publish(spec))
        }),
        "notify" => parse::<NotifySpec>(action, with, "{ message = \"...\" }").map(ActionSpec::Notify),
        "sleep" => parse::<SleepSpec>(action, with, "{ duration = \"10m\" }").map(ActionSpec::Sleep),
        "wait_for_event" => {
            parse::<WaitSpec>(action, with, "{ event = \"type\", timeout = \"1h\" }").and_then(|spec| {
                if !super::valid_event_type(&spec.event) {
                    return Err(("with.event", format!("`{}` is not an event type", spec.event)));
                }
                Ok(ActionSpec::WaitForEvent(spec))
            })
        }
        "inngest" => {
            parse::<InngestSpec>(action, with, "{ event = \"app/name\", data = { ... } }").map(ActionSpec::Inngest)
        }
        "builtin" => {
            let Some(toml::Value::Table(mut table)) = with else {
                return Some(Err(("with", "`builtin` needs `with = { name = \"...\", ... }`".to_owned())));
            };
            match table.remove("name") {
                Some(toml::Value::String(name)) if !name.is_empty() => {
                    json(toml::Value::Table(table)).map(|params| ActionSpec::Builtin(BuiltinSpec { name, params }))
                }
                _ => Err(("with.name", "names the built-in action, a string".to_owned())),
            }
        }
        _ => return None,
    };
    Some(parsed)
}
