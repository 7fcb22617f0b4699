//! `sales_leads`: gathers the new leads for the sales-operations workflow.
//!
//! The leads are, in this order: the run input's `leads` array (a run triggered with a batch),
//! the input itself when it looks like one lead (it has an `id` or an `email`: the payload of a
//! `sales.lead.created` event), or else the app's new-leads endpoint (`leads_url`, answering
//! `{"data": [...]}` or a bare array; `token` is sent as a bearer token). Without any of these
//! there are no leads, which is not an error: the later steps skip on `count` 0.
//!
//! Output: `{"leads": [...], "count": n, "source": "input" | "event" | "api" | "none"}`, at most
//! [`MAX_LEADS`] leads (`truncated` says when more were offered).

use crate::actions::{ActionError, Builtin, BuiltinCall};
use async_trait::async_trait;
use serde_json::{Value, json};
use std::time::Duration;

/// Most leads handed on by one run.
pub const MAX_LEADS: usize = 1000;
/// Largest response of the leads endpoint read.
const MAX_RESPONSE: usize = 4 * 1024 * 1024;
/// How long the leads endpoint may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

pub struct SalesLeads;

#[async_trait]
impl Builtin for SalesLeads {
    fn name(&self) -> &'static str {
        "sales_leads"
    }

    fn operator_params(&self) -> &'static [&'static str] {
        &["leads_url", "token"]
    }

    async fn run(&self, call: BuiltinCall<'_>) -> Result<Value, ActionError> {
        let input: Value = serde_json::from_str(&call.step.input).unwrap_or(Value::Null);
        let (mut leads, source) = match from_input(&input) {
            Some(found) => found,
            None => match call.text("leads_url") {
                Ok(url) => (fetch(&call, &url).await?, "api"),
                Err(_) => (Vec::new(), "none"),
            },
        };
        let offered = leads.len();
        leads.truncate(MAX_LEADS);
        let mut output = json!({ "leads": leads, "count": leads.len(), "source": source });
        if offered > MAX_LEADS {
            output["truncated"] = json!({ "offered": offered, "kept": MAX_LEADS });
        }
        Ok(output)
    }
}

/// The leads the run's input carries, if it carries any.
fn from_input(input: &Value) -> Option<(Vec<Value>, &'static str)> {
    if let Some(Value::Array(leads)) = input.get("leads") {
        return Some((leads.clone(), "input"));
    }
    looks_like_lead(input).then(|| (vec![input.clone()], "event"))
}

/// An object with a non-empty `id` or `email`.
fn looks_like_lead(value: &Value) -> bool {
    let present = |name: &str| match value.get(name) {
        None | Some(Value::Null) => false,
        Some(Value::String(text)) => !text.trim().is_empty(),
        Some(_) => true,
    };
    value.is_object() && (present("id") || present("email"))
}

/// GETs the app's new leads.
async fn fetch(call: &BuiltinCall<'_>, url: &str) -> Result<Vec<Value>, ActionError> {
    let parsed =
        reqwest::Url::parse(url).map_err(|err| ActionError::fatal(format!("`leads_url` is not a URL: {err}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ActionError::fatal("`leads_url`: only http and https URLs"));
    }
    // Named without the query string, which may carry a secret.
    let what = format!("the leads endpoint {}{}", parsed.origin().ascii_serialization(), parsed.path());
    let mut request = call.http.get(parsed).header("Accept", "application/json").timeout(REQUEST_TIMEOUT);
    if let Ok(token) = call.text("token") {
        request = request.bearer_auth(token);
    }
    let cancelled = || ActionError::retryable(format!("{what}: cancelled"));
    let mut response = tokio::select! {
        response = request.send() => response.map_err(|err| ActionError::retryable(format!("{what}: {}", without_url(&err))))?,
        () = call.cancel.cancelled() => return Err(cancelled()),
    };
    let status = response.status();
    let mut body = Vec::new();
    loop {
        let chunk = tokio::select! {
            chunk = response.chunk() => chunk.map_err(|err| ActionError::retryable(format!("{what}: reading the response: {}", without_url(&err))))?,
            () = call.cancel.cancelled() => return Err(cancelled()),
        };
        let Some(chunk) = chunk else { break };
        if body.len() + chunk.len() > MAX_RESPONSE {
            return Err(ActionError::fatal(format!("{what}: the response is over {MAX_RESPONSE} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    if !status.is_success() {
        let excerpt: String = String::from_utf8_lossy(&body).chars().take(300).collect();
        let message = format!("{what} answered {}: {}", status.as_u16(), excerpt.trim());
        return Err(if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
            ActionError::retryable(message)
        } else {
            ActionError::fatal(message)
        });
    }
    let parsed: Value = serde_json::from_slice(&body)
        .map_err(|err| ActionError::fatal(format!("{what}: the response is not JSON: {err}")))?;
    leads_of(parsed).ok_or_else(|| ActionError::fatal(format!("{what}: expected {{\"data\": [...]}} or an array")))
}

/// The leads of a response: `{"data": [...]}` or `[...]`.
fn leads_of(response: Value) -> Option<Vec<Value>> {
    match response {
        Value::Array(leads) => Some(leads),
        Value::Object(mut map) => match map.remove("data") {
            Some(Value::Array(leads)) => Some(leads),
            _ => None,
        },
        _ => None,
    }
}

/// A reqwest error without its URL (whose query may carry a secret).
fn without_url(err: &reqwest::Error) -> String {
    let kind = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    let mut detail = String::new();
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        detail = inner.to_string();
        source = inner.source();
    }
    if detail.is_empty() { kind.to_owned() } else { format!("{kind} ({detail})") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leads_come_from_the_input_a_lead_event_or_nowhere() {
        let (leads, source) = from_input(&json!({ "leads": [{ "id": 1 }, { "id": 2 }] })).unwrap();
        assert_eq!((leads.len(), source), (2, "input"));
        let (leads, source) = from_input(&json!({ "id": 42, "email": "x@y.z" })).unwrap();
        assert_eq!((leads, source), (vec![json!({ "id": 42, "email": "x@y.z" })], "event"));
        let (_, source) = from_input(&json!({ "email": "x@y.z" })).unwrap();
        assert_eq!(source, "event");
        assert!(from_input(&json!({})).is_none());
        assert!(from_input(&json!({ "id": null, "email": "  " })).is_none());
        assert!(from_input(&Value::Null).is_none());
    }

    #[test]
    fn responses_are_data_arrays_or_arrays() {
        assert_eq!(leads_of(json!({ "data": [{ "id": 1 }] })), Some(vec![json!({ "id": 1 })]));
        assert_eq!(leads_of(json!([{ "id": 1 }, { "id": 2 }])).map(|l| l.len()), Some(2));
        assert_eq!(leads_of(json!({ "data": { "id": 1 } })), None);
        assert_eq!(leads_of(json!("nope")), None);
    }
}
