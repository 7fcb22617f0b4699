//! HTTP helpers shared by the built-ins that speak HTTP (`cms_sync`, `health_probe`,
//! `cache_warm`): URL checks, error descriptions without query strings, bodies read up to a
//! bound and cancellable, and the retryable/fatal split of statuses (connection errors, 5xx,
//! 408 and 429 are worth a retry; other 4xx are not).

use crate::actions::ActionError;
use tokio_util::sync::CancellationToken;

/// Parses an http(s) URL, or says why not (a configuration error: not worth a retry).
pub(crate) fn checked_url(url: &str) -> Result<reqwest::Url, ActionError> {
    let parsed = reqwest::Url::parse(url.trim())
        .map_err(|err| ActionError::fatal(format!("`{}` is not a URL: {err}", redacted(url))))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(ActionError::fatal(format!("`{}`: only http and https URLs", redacted(url))));
    }
    Ok(parsed)
}

/// Where a request went, for messages: origin and path, without the query string or a password.
pub(super) fn place(url: &reqwest::Url) -> String {
    format!("{}{}", url.origin().ascii_serialization(), url.path())
}

/// A URL as it may be shown (outputs, messages, keys): a password in it and the values of its
/// query and fragment (`?token=...`, `#access_token=...`) are replaced by `***`; the names stay,
/// so the reader still sees which URL it is. A text that is not a URL is cut at its `?` or `#`.
pub(crate) fn redacted(url: &str) -> String {
    let url = url.trim();
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        return match url.find(['?', '#']) {
            Some(at) => format!("{}{}***", &url[..at], &url[at..=at]),
            None => url.to_owned(),
        };
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    }
    if let Some(query) = parsed.query().map(mask_values) {
        parsed.set_query(Some(&query));
    }
    if let Some(fragment) = parsed.fragment().map(mask_values) {
        parsed.set_fragment(Some(&fragment));
    }
    parsed.to_string()
}

/// `a=1&b&c=` as `a=***&***&c=`: every value hidden (a bare item may itself be the secret),
/// empty values left empty.
fn mask_values(query: &str) -> String {
    query
        .split('&')
        .map(|item| match item.split_once('=') {
            Some((name, "")) => format!("{name}="),
            Some((name, _)) => format!("{name}=***"),
            None if item.is_empty() => String::new(),
            None => "***".to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// A reqwest error without the URL (its query string may carry secrets).
pub(crate) fn describe(err: &reqwest::Error) -> String {
    let kind = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "could not connect"
    } else if err.is_request() {
        "request failed"
    } else if err.is_body() || err.is_decode() {
        "reading the response failed"
    } else {
        "failed"
    };
    let mut source = std::error::Error::source(err);
    let mut detail = String::new();
    while let Some(inner) = source {
        detail = inner.to_string();
        source = inner.source();
    }
    if detail.is_empty() { kind.to_owned() } else { format!("{kind} ({detail})") }
}

/// Why a request could not be made or answered: always worth a retry (the other side may be
/// restarting), except a request reqwest could not even build.
pub(super) fn transport_error(what: &str, err: &reqwest::Error) -> ActionError {
    let message = format!("{what}: {}", describe(err));
    if err.is_builder() { ActionError::fatal(message) } else { ActionError::retryable(message) }
}

/// The error for a non-success status: 5xx, 408 and 429 are retryable, the rest fatal.
pub(super) fn status_error(what: &str, status: u16, body: &[u8]) -> ActionError {
    let excerpt: String = String::from_utf8_lossy(body).chars().take(300).collect();
    let message = format!("{what} answered {status}: {}", excerpt.trim());
    if status >= 500 || status == 408 || status == 429 {
        ActionError::retryable(message)
    } else {
        ActionError::fatal(message)
    }
}

/// A response body, read up to a bound.
pub(super) struct Body {
    pub bytes: Vec<u8>,
    /// More came than the bound: `bytes` holds the first `max` bytes only.
    pub truncated: bool,
    /// Bytes received in all (counted up to the bound when `keep` was false too).
    pub received: usize,
}

/// Reads a response body up to `max` bytes, keeping them when `keep` (otherwise only counting,
/// as a cache warm-up does); stops early at the bound. Cancellable.
pub(super) async fn read_body(
    mut response: reqwest::Response,
    max: usize,
    keep: bool,
    what: &str,
    cancel: &CancellationToken,
) -> Result<Body, ActionError> {
    let mut body = Body { bytes: Vec::new(), truncated: false, received: 0 };
    loop {
        let chunk = tokio::select! {
            chunk = response.chunk() => chunk.map_err(|err| transport_error(what, &err))?,
            () = cancel.cancelled() => return Err(ActionError::retryable(format!("{what}: cancelled"))),
        };
        let Some(chunk) = chunk else { break };
        let room = max.saturating_sub(body.received);
        let taken = chunk.len().min(room);
        if keep {
            body.bytes.extend_from_slice(&chunk[..taken]);
        }
        body.received += taken;
        if chunk.len() > room {
            body.truncated = true;
            break;
        }
    }
    Ok(body)
}

/// Sends a request, cancellable; a transport error is retryable.
pub(super) async fn send(
    request: reqwest::RequestBuilder,
    what: &str,
    cancel: &CancellationToken,
) -> Result<reqwest::Response, ActionError> {
    tokio::select! {
        response = request.send() => response.map_err(|err| transport_error(what, &err)),
        () = cancel.cancelled() => Err(ActionError::retryable(format!("{what}: cancelled"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_queries_stay_out_of_messages() {
        assert_eq!(redacted("https://user:secret@example.com/x"), "https://user:***@example.com/x");
        assert_eq!(redacted("http://example.com/health"), "http://example.com/health");
        assert_eq!(
            redacted("https://example.com/health?token=abc&verbose&empty=&x=1"),
            "https://example.com/health?token=***&***&empty=&x=***"
        );
        assert_eq!(
            redacted("https://u:p@example.com/cb#access_token=abc"),
            "https://u:***@example.com/cb#access_token=***"
        );
        assert_eq!(redacted(" not a url?token=abc "), "not a url?***");
        assert!(!checked_url("ftp://example.com/?key=hunter2").unwrap_err().message.contains("hunter2"));
        let url = checked_url("https://example.com/api/content?token=abc").unwrap();
        assert_eq!(place(&url), "https://example.com/api/content");
        assert!(checked_url("ftp://example.com").is_err());
        assert!(!checked_url("not a url").unwrap_err().retryable);
    }

    #[test]
    fn statuses_split_into_retryable_and_fatal() {
        assert!(status_error("x", 500, b"").retryable);
        assert!(status_error("x", 503, b"").retryable);
        assert!(status_error("x", 429, b"").retryable);
        assert!(!status_error("x", 404, b"").retryable);
        assert!(!status_error("x", 401, b"").retryable);
        assert!(status_error("x", 422, b"bad things").message.contains("422: bad things"));
    }
}
