//! The HTTP API over hyper: a plain router (`match` on method and path segments), one `async fn`
//! per route, JSON in and out, errors as `{"error":{"code","message"}}`.

mod error;
pub mod views;

pub use error::ApiError;

use crate::engine::Engine;
use crate::machine::{self, Trigger};
use crate::store::RunId;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Longest an idempotency key may be.
const MAX_IDEMPOTENCY_KEY: usize = 200;
/// How long a request may take before it is answered 503.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

type Reply = Response<Full<Bytes>>;

/// Serves the API on `listener` until `shutdown` fires, then lets open requests finish (up to
/// a few seconds).
pub async fn serve(listener: TcpListener, engine: Arc<Engine>, shutdown: CancellationToken) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, _) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(%err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let engine = Arc::clone(&engine);
        let service = service_fn(move |request| {
            let engine = Arc::clone(&engine);
            async move { Ok::<_, std::convert::Infallible>(handle(&engine, request).await) }
        });
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10))
            .serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%err, "connection ended with an error");
            }
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

/// Answers one request; never panics, whatever the input.
pub async fn handle(engine: &Engine, request: Request<Incoming>) -> Reply {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let result = match tokio::time::timeout(REQUEST_TIMEOUT, route(engine, request)).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", "the request took too long")),
    };
    match result {
        Ok((status, body)) => json_reply(status, &body),
        Err(err) => {
            tracing::debug!(%method, %path, status = %err.status, message = %err.message, "request refused");
            json_reply(err.status, &err.body())
        }
    }
}

fn json_reply(status: StatusCode, body: &Value) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

type Answer = Result<(StatusCode, Value), ApiError>;

async fn route(engine: &Engine, request: Request<Incoming>) -> Answer {
    let path = request.uri().path().trim_end_matches('/').to_owned();
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let method = request.method().clone();
    match (segments.as_slice(), &method) {
        (["health"], &Method::GET) => health(engine).await,
        (["api", "workflows"], &Method::GET) => Ok((StatusCode::OK, workflows(engine))),
        (["api", "workflows", id, "trigger"], &Method::POST) => {
            let id = (*id).to_owned();
            trigger(engine, &id, request).await
        }
        (["api", "events"], &Method::GET) => list_events(engine, request.uri().query()).await,
        (["api", "events"], &Method::POST) => publish_event(engine, request).await,
        (["api", "runs", id], &Method::GET) => run(engine, id).await,
        (["api", "runs", id, "history"], &Method::GET) => history(engine, id).await,
        (["health"], _)
        | (["api", "workflows"], _)
        | (["api", "workflows", _, "trigger"], _)
        | (["api", "runs", _], _)
        | (["api", "runs", _, "history"], _) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        )),
        _ => Err(ApiError::not_found(format!("no route for {method} {path}"))),
    }
}

async fn health(engine: &Engine) -> Answer {
    let base = json!({
        "store": engine.store_kind().name(),
        "replica": engine.replica_id(),
        "version": env!("CARGO_PKG_VERSION"),
        "workflows": engine.registry().len(),
        "counters": engine.counter_values().into_iter().map(|(k, v)| (k.to_owned(), json!(v))).collect::<serde_json::Map<String, Value>>(),
    });
    let mut body = base;
    match engine.store_health().await {
        Ok(health) => {
            body["status"] = json!("ok");
            body["storeVersion"] = json!(health.version);
            body["warnings"] = json!(health.warnings);
            Ok((StatusCode::OK, body))
        }
        Err(err) => {
            body["status"] = json!("unavailable");
            body["error"] = json!(err.to_string());
            Ok((StatusCode::SERVICE_UNAVAILABLE, body))
        }
    }
}

fn workflows(engine: &Engine) -> Value {
    let list: Vec<Value> = engine
        .registry()
        .iter()
        .map(|w| {
            json!({
                "id": w.def.id,
                "description": w.def.description,
                "schedule": w.def.schedule,
                "timezone": w.def.timezone.clone().unwrap_or_else(|| "UTC".to_owned()),
                "nextRunAt": engine.next_fire(w).map(views::timestamp),
                "catchup": w.def.catchup,
                "overlap": w.def.overlap,
                "events": w.def.events,
                "steps": w.def.steps.iter().map(|s| json!({ "id": s.id, "action": s.action.name() })).collect::<Vec<_>>(),
                "definitionHash": w.hash,
            })
        })
        .collect();
    json!({ "workflows": list })
}

/// Reads a JSON body (bounded), requiring `application/json` when a body is present.
async fn json_body(request: Request<Incoming>) -> Result<Option<Value>, ApiError> {
    let content_type = request.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let bytes = Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|err| {
            if err.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("request bodies are limited to {MAX_BODY_BYTES} bytes"),
                )
            } else {
                ApiError::bad_request(format!("could not read the request body: {err}"))
            }
        })?
        .to_bytes();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let is_json = content_type
        .as_deref()
        .is_some_and(|ct| ct.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")));
    if !is_json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as Content-Type: application/json",
        ));
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|err| ApiError::bad_request(format!("the body is not valid JSON: {err}")))
}

async fn trigger(engine: &Engine, workflow_id: &str, request: Request<Incoming>) -> Answer {
    if engine.registry().get(workflow_id).is_none() {
        return Err(ApiError::not_found(format!("no workflow `{workflow_id}`")));
    }
    let key = match request.headers().get("idempotency-key") {
        None => None,
        Some(value) => {
            let key = value
                .to_str()
                .map_err(|_| ApiError::bad_request("the Idempotency-Key header must be visible ASCII"))?
                .trim()
                .to_owned();
            if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY || key.chars().any(|c| c.is_control()) {
                return Err(ApiError::bad_request(format!(
                    "the Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY} visible characters"
                )));
            }
            Some(key)
        }
    };
    let input = match json_body(request).await? {
        None => json!({}),
        Some(Value::Object(mut body)) => {
            if let Some(unknown) = body.keys().find(|k| k.as_str() != "inputData") {
                return Err(ApiError::bad_request(format!(
                    "unknown field `{unknown}`; the body is {{\"inputData\": {{...}}}}"
                )));
            }
            match body.remove("inputData") {
                None | Some(Value::Null) => json!({}),
                Some(data @ Value::Object(_)) => data,
                Some(_) => return Err(ApiError::bad_request("`inputData` must be a JSON object")),
            }
        }
        Some(_) => return Err(ApiError::bad_request("the body must be a JSON object: {\"inputData\": {...}}")),
    };
    let key = key.map(|k| format!("api:{workflow_id}:{k}"));
    let triggered = engine.trigger(workflow_id, &input, key.as_deref(), Trigger::Api).await?;
    let status = if triggered.duplicate { StatusCode::OK } else { StatusCode::ACCEPTED };
    Ok((
        status,
        json!({ "runId": triggered.run_id, "workflowId": workflow_id, "status": "pending", "duplicate": triggered.duplicate }),
    ))
}

fn parse_run_id(text: &str) -> Result<RunId, ApiError> {
    text.parse().map_err(|problem: String| ApiError::not_found(format!("no run `{text}`: {problem}")))
}

/// A run's log, folded, with its definition.
async fn load_run(
    engine: &Engine,
    id: &str,
) -> Result<(RunId, crate::machine::RunState, Vec<crate::store::Logged>, Arc<crate::definition::Workflow>), ApiError> {
    let run = parse_run_id(id)?;
    let log = engine.history(&run).await?.ok_or_else(|| ApiError::not_found(format!("no run `{id}`")))?;
    let state = machine::replay(log.iter().map(|l| &l.recorded))
        .map_err(|(index, err)| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "corrupt_log",
                format!("log entry {} of run {id} does not replay: {err}", index + 1),
            )
        })?
        .ok_or_else(|| ApiError::not_found(format!("no run `{id}`")))?;
    let workflow = engine.definition(run.shard, &state.definition).await?;
    Ok((run, state, log, workflow))
}

async fn run(engine: &Engine, id: &str) -> Answer {
    let (run, state, log, workflow) = load_run(engine, id).await?;
    Ok((StatusCode::OK, views::run(&run.to_string(), &state, &log, &workflow)))
}

async fn history(engine: &Engine, id: &str) -> Answer {
    let (run, _, log, workflow) = load_run(engine, id).await?;
    let transitions: Vec<Value> = log.iter().map(|entry| views::transition(entry, &workflow)).collect();
    Ok((StatusCode::OK, json!({ "runId": run.to_string(), "transitions": transitions })))
}

/// Query parameters as pairs (percent-decoded); a repeated or unknown parameter is an error.
fn query_params<'a>(
    query: Option<&str>,
    known: &[&'a str],
) -> Result<std::collections::HashMap<&'a str, String>, ApiError> {
    let mut params = std::collections::HashMap::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |text: &str| {
            percent_decode(text).ok_or_else(|| {
                ApiError::bad_request(format!("query parameter `{name}` is not valid percent-encoded UTF-8"))
            })
        };
        let name = decode(name)?;
        let Some(known) = known.iter().find(|k| **k == name) else {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter `{name}` (known: {})",
                known.join(", ")
            )));
        };
        if params.insert(*known, decode(value)?).is_some() {
            return Err(ApiError::bad_request(format!("query parameter `{name}` is given twice")));
        }
    }
    Ok(params)
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

fn limit_param(
    params: &std::collections::HashMap<&str, String>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    match params.get("limit") {
        None => Ok(default),
        Some(text) => match text.parse::<usize>() {
            Ok(limit) if (1..=max).contains(&limit) => Ok(limit),
            _ => Err(ApiError::bad_request(format!("`limit` must be a number from 1 to {max}"))),
        },
    }
}

fn is_entry_id(text: &str) -> bool {
    text.split_once('-').is_some_and(|(ms, seq)| {
        !ms.is_empty()
            && !seq.is_empty()
            && ms.len() <= 20
            && seq.len() <= 20
            && ms.bytes().chain(seq.bytes()).all(|b| b.is_ascii_digit())
    })
}

async fn list_events(engine: &Engine, query: Option<&str>) -> Answer {
    let params = query_params(query, &["limit", "before", "type"])?;
    let limit = limit_param(&params, 50, 500)?;
    let before = params.get("before").map(String::as_str);
    if let Some(before) = before {
        if !is_entry_id(before) {
            return Err(ApiError::bad_request("`before` must be an event id such as `1700000000000-0`"));
        }
    }
    let event_type = params.get("type").map(String::as_str);
    if let Some(event_type) = event_type {
        if !crate::definition::valid_event_type(event_type) {
            return Err(ApiError::bad_request("`type` must match ^[a-z0-9][a-z0-9_.-]{0,127}$"));
        }
    }
    let listed = engine.recent_events(before, event_type, limit).await?;
    let next_cursor = (listed.len() == limit).then(|| listed.last().map(|e| e.entry.id.clone())).flatten();
    let events: Vec<Value> = listed.iter().map(views::event).collect();
    Ok((StatusCode::OK, json!({ "events": events, "nextCursor": next_cursor })))
}

async fn publish_event(engine: &Engine, request: Request<Incoming>) -> Answer {
    let Some(Value::Object(mut body)) = json_body(request).await? else {
        return Err(ApiError::bad_request(
            "the body must be a JSON object: {\"eventType\": \"...\", \"payload\": {...}}",
        ));
    };
    if let Some(unknown) = body.keys().find(|k| !matches!(k.as_str(), "eventType" | "payload" | "key" | "source")) {
        return Err(ApiError::bad_request(format!(
            "unknown field `{unknown}` (known: eventType, payload, key, source)"
        )));
    }
    let event_type = match body.remove("eventType") {
        Some(Value::String(t)) => t,
        Some(_) => return Err(ApiError::bad_request("`eventType` must be a string")),
        None => return Err(ApiError::bad_request("`eventType` is required")),
    };
    let payload = match body.remove("payload") {
        None | Some(Value::Null) => json!({}),
        Some(payload @ Value::Object(_)) => payload,
        Some(_) => return Err(ApiError::bad_request("`payload` must be a JSON object")),
    };
    let text_field = |name: &str, value: Option<Value>| match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(ApiError::bad_request(format!("`{name}` must be a string"))),
    };
    let key = text_field("key", body.remove("key"))?;
    let source = text_field("source", body.remove("source"))?;
    match engine.publish_event(&event_type, &payload, key.as_deref(), source.as_deref()).await? {
        Ok(event_id) => Ok((StatusCode::ACCEPTED, json!({ "eventId": event_id, "eventType": event_type }))),
        Err(problem) => Err(ApiError::bad_request(problem)),
    }
}
