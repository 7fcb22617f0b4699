//! The actions that speak HTTP: `http`, `notify` (the Communications Hub webhook, signed with
//! HMAC-SHA256) and `inngest` (Inngest's event API). Connection errors and 5xx are worth a retry;
//! a 4xx is not (unless the step says so). Response bodies are read up to a bound.

use super::builtins::bounded_http::{checked_url, describe};
use super::{ActionConfig, ActionError, StepContext};
use crate::definition::actions::HttpSpec;
use hmac::{Hmac, Mac};
use reqwest::header::{HeaderName, HeaderValue};
use serde_json::Value;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

/// `sha256=<hex HMAC-SHA256 of body under secret>`: the signature header value of notifications.
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Sends a request; returns `{"status", "body"}` (the body parsed as JSON when it is JSON).
async fn send(
    request: reqwest::RequestBuilder,
    expect: &[u16],
    retry_on_4xx: bool,
    max_response: usize,
    what: &str,
    cancel: CancellationToken,
) -> Result<Value, ActionError> {
    let response = tokio::select! {
        response = request.send() => response.map_err(|err| ActionError::retryable(format!("{what}: {}", describe(&err))))?,
        () = cancel.cancelled() => return Err(ActionError::retryable(format!("{what}: cancelled"))),
    };
    let status = response.status().as_u16();
    let mut body = Vec::new();
    let mut truncated = false;
    let mut response = response;
    loop {
        let chunk = tokio::select! {
            chunk = response.chunk() => chunk.map_err(|err| ActionError::retryable(format!("{what}: reading the response: {}", describe(&err))))?,
            () = cancel.cancelled() => return Err(ActionError::retryable(format!("{what}: cancelled"))),
        };
        let Some(chunk) = chunk else { break };
        let room = max_response.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if chunk.len() > room {
            truncated = true;
            break;
        }
    }
    let text = String::from_utf8_lossy(&body).into_owned();
    let parsed: Value = if truncated {
        Value::String(text.clone())
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text.clone()))
    };
    let ok = if expect.is_empty() { (200..300).contains(&status) } else { expect.contains(&status) };
    if ok {
        return Ok(serde_json::json!({ "status": status, "body": parsed, "truncated": truncated }));
    }
    let excerpt: String = text.chars().take(300).collect();
    let message = format!("{what} answered {status}: {}", excerpt.trim());
    if status >= 500 || status == 429 || status == 408 || (retry_on_4xx && status >= 400) {
        Err(ActionError::retryable(message))
    } else {
        Err(ActionError::fatal(message))
    }
}

/// An `http` step's request, its templates resolved.
pub struct Request {
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Value>,
}

pub async fn request(
    client: &reqwest::Client,
    spec: &HttpSpec,
    rendered: Request,
    context: &StepContext,
    cancel: CancellationToken,
) -> Result<Value, ActionError> {
    let url = checked_url(&rendered.url)?;
    let method = reqwest::Method::from_bytes(spec.method.as_bytes()).map_err(|_| ActionError::fatal("bad method"))?;
    let what = format!("{} {}{}", spec.method, url.origin().ascii_serialization(), url.path());
    let request = client.request(method, url).header("Idempotency-Key", context.idempotency_key());
    // The run's trace, unless the definition sets these headers itself.
    let own = |name: &str| rendered.headers.iter().any(|(header, _)| header.eq_ignore_ascii_case(name));
    let mut request = with_trace(request, context, own);
    for (name, value) in rendered.headers {
        let (name, value) = header(&name, &value)?;
        request = request.header(name, value);
    }
    if let Some(body) = &rendered.body {
        request = request.json(body);
    }
    send(request, &spec.expect, spec.retry_on_4xx, spec.max_response, &what, cancel).await
}

/// A header of an `http` step, checked: a rendered value holding CR, LF or another control
/// character (a run's input trying to add headers) fails the step for good, naming the header
/// but not the value (it may be a credential).
fn header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), ActionError> {
    let name = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| ActionError::fatal(format!("header `{name}`: not a valid header name")))?;
    let value = HeaderValue::from_str(value).map_err(|_| {
        ActionError::fatal(format!(
            "header `{name}`: its rendered value holds a character no header may carry (CR, LF or another control character); refused"
        ))
    })?;
    Ok((name, value))
}

/// POSTs a message to the Communications Hub, signed in `X-Molochain-Signature`.
pub async fn notify(
    client: &reqwest::Client,
    config: &ActionConfig,
    body: &Value,
    context: &StepContext,
    cancel: CancellationToken,
) -> Result<Value, ActionError> {
    // No hub configured (a fresh install, a test bench): nothing to send to, which is not the
    // workflow's failure; the output says so.
    let Some(url) = config.notify_url.as_deref() else {
        tracing::warn!(run = %context.run_id, step = %context.step_id, "NOTIFY_WEBHOOK_URL is not set: notification skipped");
        return Ok(serde_json::json!({ "skipped": true, "reason": "NOTIFY_WEBHOOK_URL is not set" }));
    };
    let secret = config
        .webhook_secret
        .as_deref()
        .ok_or_else(|| ActionError::fatal("WEBHOOK_SECRET is not set: notifications are always signed"))?;
    let url = checked_url(url)?;
    let bytes = serde_json::to_vec(body).map_err(|err| ActionError::fatal(err.to_string()))?;
    let request = client
        .post(url)
        .header("Content-Type", "application/json")
        .header("Idempotency-Key", context.idempotency_key())
        .header("X-Molochain-Signature", sign(secret, &bytes));
    let request = with_trace(request, context, |_| false).body(bytes);
    send(request, &[], false, 64 * 1024, "the notification webhook", cancel).await
}

/// Adds the run's trace headers (`traceparent`, `tracestate`) to a request, but those `own`
/// says the request sets itself.
fn with_trace(
    mut request: reqwest::RequestBuilder,
    context: &StepContext,
    own: impl Fn(&str) -> bool,
) -> reqwest::RequestBuilder {
    for (name, value) in context.trace_headers() {
        if !own(name) {
            request = request.header(name, value);
        }
    }
    request
}

/// Sends an event to Inngest: `POST <INNGEST_BASE_URL>/e/<INNGEST_EVENT_KEY>`.
pub async fn inngest(
    client: &reqwest::Client,
    config: &ActionConfig,
    event: &str,
    data: &Value,
    context: &StepContext,
    cancel: CancellationToken,
) -> Result<Value, ActionError> {
    let key = config.inngest_event_key.as_deref().ok_or_else(|| ActionError::fatal("INNGEST_EVENT_KEY is not set"))?;
    // The key is one path segment, whatever it holds.
    let key = super::template::encode_component(key);
    let url = checked_url(&format!("{}/e/{key}", config.inngest_base_url.trim_end_matches('/')))?;
    // The event id makes Inngest drop a repeat of the same step's send.
    let body = serde_json::json!({ "name": event, "data": data, "id": context.idempotency_key() });
    let request = with_trace(client.post(url).json(&body), context, |_| false);
    send(request, &[], false, 64 * 1024, "the Inngest event API", cancel).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
