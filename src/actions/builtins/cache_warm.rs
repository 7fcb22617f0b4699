//! `cache_warm`: GETs each configured URL (so the app fills its caches), at most `concurrency`
//! at a time, and reports each URL's status and time.
//!
//! Parameters: `urls` (a list, or comma-separated), `concurrency` (default 4, at most 64),
//! `timeout` (per URL, default `30s`).
//!
//! Output: `{"results": [{"url", "status", "ms", "ok", "bytes", "error"?}], "ok": n, "failed": n}`
//! (results in the order of `urls`). The step fails, retryably, only when every URL failed: a
//! partly warm cache is still worth having, and the failures are in the output.

use super::bounded_http::{checked_url, read_body, redacted, send};
use crate::actions::{ActionError, Builtin, BuiltinCall};
use async_trait::async_trait;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Most URLs one warm-up requests.
const MAX_URLS: usize = 1000;
const MAX_CONCURRENCY: u64 = 64;
/// Bytes of each answer read (and counted, not kept): enough for the app to render it.
const MAX_BODY: usize = 32 * 1024 * 1024;

pub struct CacheWarm;

#[async_trait]
impl Builtin for CacheWarm {
    fn name(&self) -> &'static str {
        "cache_warm"
    }

    fn operator_params(&self) -> &'static [&'static str] {
        &["urls"]
    }

    async fn run(&self, call: BuiltinCall<'_>) -> Result<Value, ActionError> {
        let urls = call.list("urls");
        if urls.len() > MAX_URLS {
            return Err(ActionError::fatal(format!("parameter `urls`: at most {MAX_URLS} URLs")));
        }
        let concurrency = call.number_or("concurrency", 4)?;
        if !(1..=MAX_CONCURRENCY).contains(&concurrency) {
            return Err(ActionError::fatal(format!("parameter `concurrency` must be between 1 and {MAX_CONCURRENCY}")));
        }
        let timeout = call.duration_or("timeout", Duration::from_secs(30))?;
        let permits = Arc::new(Semaphore::new(concurrency as usize));
        let warms = urls.iter().map(|url| {
            let permits = Arc::clone(&permits);
            let call = &call;
            async move {
                let _permit =
                    permits.acquire_owned().await.map_err(|_| ActionError::retryable("cache warm-up: stopped"))?;
                Ok::<Value, ActionError>(warm(call, url, timeout).await)
            }
        });
        let results = futures::future::join_all(warms).await.into_iter().collect::<Result<Vec<Value>, _>>()?;
        if call.cancel.is_cancelled() {
            return Err(ActionError::retryable("cache warm-up: cancelled"));
        }
        let ok = results.iter().filter(|r| r["ok"] == json!(true)).count();
        let failed = results.len() - ok;
        if !results.is_empty() && ok == 0 {
            let first = results[0]["error"].as_str().unwrap_or("").to_owned();
            return Err(ActionError::retryable(format!(
                "cache warm-up: all {failed} URLs failed (the first: {} {first})",
                results[0]["url"].as_str().unwrap_or("")
            )));
        }
        Ok(json!({ "results": results, "ok": ok, "failed": failed, "concurrency": concurrency }))
    }
}

async fn warm(call: &BuiltinCall<'_>, url: &str, timeout: Duration) -> Value {
    let shown = redacted(url);
    let failed = |status: Option<u16>, ms: Option<u64>, error: String| json!({ "url": shown, "status": status, "ms": ms, "ok": false, "error": error });
    let parsed = match checked_url(url) {
        Ok(parsed) => parsed,
        Err(err) => return failed(None, None, err.message),
    };
    let what = format!("GET {shown}");
    let started = Instant::now();
    let response = match send(call.http.get(parsed).timeout(timeout), &what, &call.cancel).await {
        Ok(response) => response,
        Err(err) => return failed(None, Some(started.elapsed().as_millis() as u64), err.message),
    };
    let status = response.status().as_u16();
    let body = read_body(response, MAX_BODY, false, &what, &call.cancel).await;
    let ms = started.elapsed().as_millis() as u64;
    match body {
        Err(err) => failed(Some(status), Some(ms), err.message),
        Ok(_) if !(200..300).contains(&status) => failed(Some(status), Some(ms), format!("answered {status}")),
        Ok(body) => json!({ "url": shown, "status": status, "ms": ms, "ok": true, "bytes": body.received }),
    }
}
