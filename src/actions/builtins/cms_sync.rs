//! `cms_sync`: pulls the content changed since the stored cursor from the Laravel CMS (paginated)
//! and pushes it, page by page, to the main app's sync endpoint; the cursor advances to the newest
//! `updated_at` seen only after every page was pushed, so a failure anywhere means the next
//! attempt asks for the same changes again (the app sees them at least once; each push carries
//! `Idempotency-Key: <run>:<step>:<page>`).
//!
//! Parameters: `cms_url` (the CMS content endpoint), `app_url` (the app's sync endpoint), `token`
//! (optional bearer token for the CMS; never logged or returned), `page_size` (default 100, at
//! most 1000), `cursor_key` (the shared value holding the cursor, default `cms-sync:cursor`).
//!
//! The CMS answers `GET <cms_url>?updated_since=<cursor>&page=<n>&per_page=<size>` (no
//! `updated_since` on the first sync) with a Laravel paginator:
//! `{"data": [{"id", ..., "updated_at"}], "current_page": n, "last_page": m}` (or the same
//! numbers under `meta`, as API resources put them; or `next_page_url` as a simple paginator
//! does). Each non-empty page is pushed as `POST <app_url> {"items": [...], "page": n}`.
//!
//! Output: `{"changed", "pages", "pushed", "cursor", "previousCursor"}`.
//!
//! Offset pagination over a set that changes while it is read: the CMS should list newest first
//! (`updated_at` descending). Then an item updated mid-sync moves to the front, where it shifts
//! the rest towards later pages (a repeat, harmless) and is itself newer than the cursor, so the
//! next sync fetches it. Oldest first, an update mid-sync shifts the unread items towards
//! earlier pages, and the one that slips onto a page already read is passed by the cursor.

use super::bounded_http::{checked_url, place, read_body, send, status_error};
use crate::actions::{ActionError, Builtin, BuiltinCall};
use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use serde_json::{Value, json};
use std::time::Duration;

/// Most pages one sync reads (with `page_size` at most 1000: a million items).
const MAX_PAGES: u64 = 1000;
const MAX_PAGE_SIZE: u64 = 1000;
/// Largest CMS page accepted.
const MAX_PAGE_BYTES: usize = 16 * 1024 * 1024;
/// Bytes of the app's answer kept (for error messages).
const MAX_APP_ANSWER: usize = 64 * 1024;
/// One request to the CMS or the app.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

pub struct CmsSync;

/// One page of the CMS's answer.
#[derive(Debug)]
struct Listing {
    items: Vec<Value>,
    last_page: Option<u64>,
    /// `Some(false)`: a simple paginator said there is no next page.
    has_next: Option<bool>,
}

impl Listing {
    fn parse(body: &[u8], what: &str) -> Result<Listing, ActionError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|err| ActionError::fatal(format!("{what}: the answer is not JSON ({err})")))?;
        let Some(Value::Array(items)) = value.get("data") else {
            return Err(ActionError::fatal(format!(
                "{what}: the answer has no `data` array (expected a Laravel paginator: {{\"data\": [...], \"current_page\", \"last_page\"}})"
            )));
        };
        let number = |name: &str| {
            value.get(name).or_else(|| value.get("meta").and_then(|m| m.get(name))).and_then(|v| match v {
                Value::Number(n) => n.as_u64(),
                Value::String(s) => s.parse().ok(),
                _ => None,
            })
        };
        let has_next = value
            .get("next_page_url")
            .or_else(|| value.get("links").and_then(|l| l.get("next")))
            .map(|next| !next.is_null());
        Ok(Listing { items: items.clone(), last_page: number("last_page"), has_next })
    }

    /// Whether `page` (of `page_size` items asked for) was the last one.
    fn is_last(&self, page: u64, page_size: u64) -> bool {
        if self.items.is_empty() {
            return true;
        }
        match (self.last_page, self.has_next) {
            (Some(last), _) => page >= last,
            (None, Some(has_next)) => !has_next,
            (None, None) => (self.items.len() as u64) < page_size,
        }
    }
}

/// A CMS timestamp as an instant: RFC 3339 (`2024-05-01T10:00:00.000000Z`) or Laravel's older
/// `2024-05-01 10:00:00` (taken as UTC).
fn instant(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Some(at.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
        .or_else(|_| NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f"))
        .ok()
        .map(|naive| naive.and_utc())
}

/// Whether timestamp `a` is later than `b` (instants when both parse, else their text).
fn later(a: &str, b: &str) -> bool {
    if b.is_empty() {
        return !a.is_empty();
    }
    match (instant(a), instant(b)) {
        (Some(a), Some(b)) => a > b,
        _ => a > b,
    }
}

#[async_trait]
impl Builtin for CmsSync {
    fn name(&self) -> &'static str {
        "cms_sync"
    }

    fn operator_params(&self) -> &'static [&'static str] {
        &["cms_url", "app_url", "token", "cursor_key"]
    }

    async fn run(&self, call: BuiltinCall<'_>) -> Result<Value, ActionError> {
        let cms = checked_url(&call.text("cms_url")?)?;
        let app = checked_url(&call.text("app_url")?)?;
        let token = call.text_or("token", "");
        let page_size = call.number_or("page_size", 100)?;
        if !(1..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(ActionError::fatal(format!("parameter `page_size` must be between 1 and {MAX_PAGE_SIZE}")));
        }
        let cursor_key = call.text_or("cursor_key", "cms-sync:cursor");
        let previous = call.services.get_value(&cursor_key).await?.unwrap_or_default();

        let mut newest = previous.clone();
        let (mut changed, mut pages, mut pushed) = (0usize, 0u64, 0u64);
        for page in 1..=MAX_PAGES + 1 {
            if page > MAX_PAGES {
                return Err(ActionError::fatal(format!(
                    "the CMS has more than {MAX_PAGES} pages of changes; raise `page_size` (the cursor was not advanced)"
                )));
            }
            let listing = fetch_page(&call, &cms, &token, &previous, page, page_size).await?;
            pages += 1;
            if !listing.items.is_empty() {
                for item in &listing.items {
                    if let Some(updated) = item.get("updated_at").and_then(Value::as_str)
                        && later(updated, &newest)
                    {
                        newest = updated.to_owned();
                    }
                }
                push_page(&call, &app, page, &listing.items).await?;
                changed += listing.items.len();
                pushed += 1;
            }
            if listing.is_last(page, page_size) {
                break;
            }
        }
        // Every page is with the app: only now may the next sync start after these changes.
        if newest != previous {
            call.services.set_value(&cursor_key, &newest).await?;
        }
        let text_or_null = |text: &str| if text.is_empty() { Value::Null } else { Value::String(text.to_owned()) };
        Ok(json!({
            "changed": changed,
            "pages": pages,
            "pushed": pushed,
            "cursor": text_or_null(&newest),
            "previousCursor": text_or_null(&previous),
        }))
    }
}

async fn fetch_page(
    call: &BuiltinCall<'_>,
    cms: &reqwest::Url,
    token: &str,
    since: &str,
    page: u64,
    page_size: u64,
) -> Result<Listing, ActionError> {
    let mut url = cms.clone();
    {
        let mut query = url.query_pairs_mut();
        if !since.is_empty() {
            query.append_pair("updated_since", since);
        }
        query.append_pair("page", &page.to_string()).append_pair("per_page", &page_size.to_string());
    }
    let what = format!("the CMS (GET {} page {page})", place(cms));
    let mut request = call.http.get(url).header("Accept", "application/json").timeout(REQUEST_TIMEOUT);
    if !token.is_empty() {
        request = request.bearer_auth(token);
    }
    let response = send(request, &what, &call.cancel).await?;
    let status = response.status().as_u16();
    let body = read_body(response, MAX_PAGE_BYTES, true, &what, &call.cancel).await?;
    if !(200..300).contains(&status) {
        return Err(status_error(&what, status, &body.bytes));
    }
    if body.truncated {
        return Err(ActionError::fatal(format!(
            "{what}: the page is larger than {} MiB; lower `page_size`",
            MAX_PAGE_BYTES / (1024 * 1024)
        )));
    }
    Listing::parse(&body.bytes, &what)
}

async fn push_page(call: &BuiltinCall<'_>, app: &reqwest::Url, page: u64, items: &[Value]) -> Result<(), ActionError> {
    let what = format!("the app (POST {} page {page})", place(app));
    let request = call
        .http
        .post(app.clone())
        .header("Idempotency-Key", format!("{}:{page}", call.step.idempotency_key()))
        .timeout(REQUEST_TIMEOUT)
        .json(&json!({ "items": items, "page": page }));
    let response = send(request, &what, &call.cancel).await?;
    let status = response.status().as_u16();
    let body = read_body(response, MAX_APP_ANSWER, true, &what, &call.cancel).await?;
    if (200..300).contains(&status) { Ok(()) } else { Err(status_error(&what, status, &body.bytes)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_compare_as_instants() {
        assert!(later("2024-05-01T10:00:01.000000Z", "2024-05-01T10:00:00.000000Z"));
        assert!(later("2024-05-01T12:00:00+02:00", "2024-05-01T09:59:59Z"));
        assert!(!later("2024-05-01T12:00:00+02:00", "2024-05-01T10:00:00Z"));
        assert!(later("2024-05-01 10:00:01", "2024-05-01T10:00:00Z"));
        assert!(later("2024-01-01T00:00:00Z", ""));
        assert!(!later("", ""));
    }

    #[test]
    fn paginators_say_when_the_last_page_is_reached() {
        let parse = |text: &str| Listing::parse(text.as_bytes(), "cms").unwrap();
        let full = parse(r#"{"data":[{"id":1},{"id":2}],"current_page":1,"last_page":3}"#);
        assert!(!full.is_last(1, 2));
        assert!(full.is_last(3, 2));
        let resource = parse(r#"{"data":[{"id":1}],"meta":{"current_page":2,"last_page":2}}"#);
        assert!(resource.is_last(2, 1));
        let simple = parse(r#"{"data":[{"id":1}],"next_page_url":"https://cms/x?page=2"}"#);
        assert!(!simple.is_last(1, 1));
        let simple_end = parse(r#"{"data":[{"id":1}],"next_page_url":null}"#);
        assert!(simple_end.is_last(1, 1));
        let bare = parse(r#"{"data":[{"id":1}]}"#);
        assert!(!bare.is_last(1, 1));
        assert!(bare.is_last(1, 2));
        assert!(parse(r#"{"data":[],"last_page":9}"#).is_last(1, 10));
        assert!(!Listing::parse(b"<html>", "cms").unwrap_err().retryable);
        assert!(!Listing::parse(br#"{"items":[]}"#, "cms").unwrap_err().retryable);
    }
}
