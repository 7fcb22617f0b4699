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
    /// Whether templates other than `${env...}` may supply the URL's scheme, userinfo, host or
    /// port (off by default: a run's input must not choose where a request goes). Left out of
    /// the snapshot when off, so definitions that do not use it keep their hashes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_dynamic_host: bool,
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

/// `workflow`: starts a run of another workflow (a child) and parks the step, holding no
/// executor, until the child ends; the child's output becomes the step's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChildSpec {
    /// The child workflow's id (checked at load to be a workflow of the same registry).
    pub workflow: String,
    /// The child's input (templates rendered from the parent run); default `{}`.
    #[serde(default)]
    pub input: Option<serde_json::Value>,
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

/// One `${...}` of a text: where it is (`start..end`, braces included) and what it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template<'a> {
    pub start: usize,
    pub end: usize,
    /// The text between the braces, trimmed: `input.id`, `env.NAME:-default`.
    pub path: &'a str,
}

impl Template<'_> {
    /// `input`, `steps`, `env`, `run` (or whatever else was written).
    pub fn root(&self) -> &str {
        self.path.split(['.', ':']).next().unwrap_or("").trim()
    }
}

/// The templates of a text, in order; an unclosed `${` ends the list (rendering reports it).
pub fn templates(text: &str) -> Vec<Template<'_>> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(offset) = text[from..].find("${") {
        let start = from + offset;
        let Some(length) = text[start + 2..].find('}') else { break };
        let end = start + 2 + length + 1;
        found.push(Template { start, end, path: text[start + 2..end - 1].trim() });
        from = end;
    }
    found
}

/// How many bytes at the start of a URL template make its origin (scheme, userinfo, host and
/// port): up to the first literal `/`, `?` or `#` after a literal `scheme://`; or, when the URL
/// starts with a template and no literal `://` comes first, that template alone (it supplies the
/// whole origin, as `${env.CMS_API_URL}/items` does). Templates in the origin are rendered as they
/// are; those after it are percent-encoded for the part of the URL they land in.
pub fn url_origin_len(url: &str) -> usize {
    let found = templates(url);
    let inside = |at: usize| found.iter().find(|t| (t.start..t.end).contains(&at));
    // The first literal character that ends a scheme, a path segment, a query or a fragment.
    let mut at = 0;
    let mut scheme_end = None;
    while at < url.len() {
        if let Some(template) = inside(at) {
            at = template.end;
            continue;
        }
        let rest = &url[at..];
        if rest.starts_with("://") {
            scheme_end = Some(at + 3);
            break;
        }
        if rest.starts_with(['/', '?', '#', ':']) {
            break;
        }
        at += rest.chars().next().map_or(1, char::len_utf8);
    }
    let Some(authority_start) = scheme_end else {
        return found.first().filter(|t| t.start == 0).map_or(0, |t| t.end);
    };
    let mut at = authority_start;
    while at < url.len() {
        if let Some(template) = inside(at) {
            at = template.end;
            continue;
        }
        if url[at..].starts_with(['/', '?', '#']) {
            return at;
        }
        at += url[at..].chars().next().map_or(1, char::len_utf8);
    }
    url.len()
}

/// Refuses a URL whose origin a run could choose: a template other than `${env...}` (operator
/// configuration) in its scheme, userinfo, host or port, unless `allow_dynamic_host`.
fn check_url_origin(spec: &HttpSpec) -> Result<(), (&'static str, String)> {
    if spec.allow_dynamic_host {
        return Ok(());
    }
    let origin = url_origin_len(&spec.url);
    match templates(&spec.url).into_iter().find(|t| t.start < origin && t.root() != "env") {
        Some(template) => Err((
            "with.url",
            format!(
                "`${{{}}}` would choose the scheme, host or port of `{}`: a run's input, steps and run \
                 values may only fill the path, query and fragment (they are percent-encoded there). \
                 Put them after a literal `/`, supply the origin from `${{env.NAME}}`, or set \
                 `allow_dynamic_host = true` in `with` if the host really is chosen per run",
                template.path, spec.url
            ),
        )),
        None => Ok(()),
    }
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
            check_url_origin(&spec)?;
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
        "workflow" => parse::<ChildSpec>(action, with, "{ workflow = \"<id>\", input = { ... } }").and_then(|spec| {
            if !super::valid_id(&spec.workflow) {
                return Err(("with.workflow", format!("`{}` is not a workflow id", spec.workflow)));
            }
            Ok(ActionSpec::Workflow(spec))
        }),
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
