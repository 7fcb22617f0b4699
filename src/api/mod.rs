//! The HTTP API over hyper: a plain router (`match` on method and path segments), one `async fn`
//! per route, JSON in and out, errors as `{"error":{"code","message"}}`.

mod error;
mod metrics;
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

/// What the API serves with.
pub struct ApiState {
    pub engine: Arc<Engine>,
    /// `API_TOKEN`: when set, every route but `/health` and `/metrics` requires
    /// `Authorization: Bearer <token>`.
    pub token: Option<String>,
}

/// Serves the API on `listener` until `shutdown` fires, then lets open requests finish (up to
/// a few seconds).
pub async fn serve(listener: TcpListener, state: Arc<ApiState>, shutdown: CancellationToken) {
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
        let state = Arc::clone(&state);
        let service = service_fn(move |request| {
            let state = Arc::clone(&state);
            async move { Ok::<_, std::convert::Infallible>(handle(&state, request).await) }
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

/// What a route answers.
pub enum Payload {
    Json(Value),
    /// A body of another type (`/metrics`).
    Text(&'static str, String),
}

type Answer = Result<(StatusCode, Payload), ApiError>;

fn ok_json(status: StatusCode, body: Value) -> Answer {
    Ok((status, Payload::Json(body)))
}

/// Answers one request; never panics, whatever the input.
pub async fn handle(state: &ApiState, request: Request<Incoming>) -> Reply {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let result = match tokio::time::timeout(REQUEST_TIMEOUT, route(state, request)).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "timeout", "the request took too long")),
    };
    match result {
        Ok((status, Payload::Json(body))) => json_reply(status, &body),
        Ok((status, Payload::Text(content_type, body))) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            response
        }
        Err(err) => {
            tracing::debug!(%method, %path, status = %err.status, message = %err.message, "request refused");
            let mut response = json_reply(err.status, &err.body());
            if let Some(allow) = err.allow {
                response.headers_mut().insert(hyper::header::ALLOW, HeaderValue::from_static(allow));
            }
            if err.status == StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            response
        }
    }
}

fn json_reply(status: StatusCode, body: &Value) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// The routes, by path.
enum Route<'a> {
    Health,
    Metrics,
    OpenApi,
    Workflows,
    WorkflowStatus(&'a str),
    Trigger(&'a str),
    Events,
    Runs,
    Run(&'a str),
    History(&'a str),
    Cancel(&'a str),
    Retry(&'a str),
    Rerun(&'a str),
    InngestWebhook,
}

impl<'a> Route<'a> {
    fn resolve(segments: &[&'a str]) -> Option<Route<'a>> {
        Some(match segments {
            ["health"] => Route::Health,
            ["metrics"] => Route::Metrics,
            ["api", "openapi.json"] => Route::OpenApi,
            ["api", "workflows"] => Route::Workflows,
            ["api", "workflows", id, "status"] => Route::WorkflowStatus(id),
            ["api", "workflows", id, "trigger"] => Route::Trigger(id),
            ["api", "events"] => Route::Events,
            ["api", "runs"] => Route::Runs,
            ["api", "runs", id] => Route::Run(id),
            ["api", "runs", id, "history"] => Route::History(id),
            ["api", "runs", id, "cancel"] => Route::Cancel(id),
            ["api", "runs", id, "retry"] => Route::Retry(id),
            ["api", "runs", id, "rerun"] => Route::Rerun(id),
            ["api", "webhooks", "inngest"] => Route::InngestWebhook,
            _ => return None,
        })
    }

    /// The methods the route answers, as an `Allow` header value.
    fn allow(&self) -> &'static str {
        match self {
            Route::Events => "GET, POST",
            Route::Trigger(_) | Route::Cancel(_) | Route::Retry(_) | Route::Rerun(_) | Route::InngestWebhook => "POST",
            Route::Health
            | Route::Metrics
            | Route::OpenApi
            | Route::Workflows
            | Route::WorkflowStatus(_)
            | Route::Runs
            | Route::Run(_)
            | Route::History(_) => "GET",
        }
    }

    /// Open without the API token: probes, scrapers, and the Inngest webhook (which carries a
    /// signature of its own).
    fn is_public(&self) -> bool {
        matches!(self, Route::Health | Route::Metrics | Route::InngestWebhook)
    }
}

async fn route(state: &ApiState, request: Request<Incoming>) -> Answer {
    let path = request.uri().path().to_owned();
    let trimmed = if path.len() > 1 { path.trim_end_matches('/') } else { path.as_str() };
    let segments: Vec<&str> = trimmed.split('/').skip(1).collect();
    let method = request.method().clone();
    let Some(route) = Route::resolve(&segments) else {
        return Err(ApiError::not_found(format!("no route for {method} {path}")));
    };
    if !route.allow().split(", ").any(|allowed| allowed == method.as_str()) {
        let mut err = ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        );
        err.allow = Some(route.allow());
        return Err(err);
    }
    if !route.is_public() {
        authorize(state.token.as_deref(), &request)?;
    }
    let engine = &state.engine;
    let query = request.uri().query().map(str::to_owned);
    let query = query.as_deref();
    match route {
        Route::Health => health(engine).await,
        Route::Metrics => {
            metrics::render(engine).await.map(|text| (StatusCode::OK, Payload::Text(metrics::CONTENT_TYPE, text)))
        }
        Route::OpenApi => ok_json(StatusCode::OK, openapi()),
        Route::Workflows => ok_json(StatusCode::OK, workflows(engine)),
        Route::WorkflowStatus(id) => workflow_status(engine, id).await,
        Route::Trigger(id) => trigger(engine, id, request).await,
        Route::Events if method == Method::GET => list_events(engine, query).await,
        Route::Events => publish_event(engine, request).await,
        Route::Runs => list_runs(engine, query).await,
        Route::Run(id) => run(engine, id).await,
        Route::History(id) => history(engine, id).await,
        Route::Cancel(id) => cancel(engine, id, request).await,
        Route::Retry(id) => retry(engine, id, request).await,
        Route::Rerun(id) => rerun(engine, id, request).await,
        Route::InngestWebhook => inngest_webhook(engine, request).await,
    }
}

/// Checks `Authorization: Bearer <token>` in constant time.
fn authorize(token: Option<&str>, request: &Request<Incoming>) -> Result<(), ApiError> {
    use subtle::ConstantTimeEq;
    let Some(token) = token else { return Ok(()) };
    let unauthorized = |message: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
    let header = request
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("this API needs `Authorization: Bearer <API_TOKEN>`"))?;
    let given = header
        .to_str()
        .ok()
        .and_then(|h| {
            h.split_once(' ').filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer")).map(|(_, token)| token)
        })
        .ok_or_else(|| unauthorized("the Authorization header must be `Bearer <token>`"))?;
    if bool::from(given.trim().as_bytes().ct_eq(token.as_bytes())) {
        Ok(())
    } else {
        Err(unauthorized("the bearer token is not valid"))
    }
}

fn openapi() -> Value {
    serde_json::from_str(OPENAPI).unwrap_or_else(|_| json!({}))
}

/// The OpenAPI 3 document of this API.
const OPENAPI: &str = include_str!("openapi.json");

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
            ok_json(StatusCode::OK, body)
        }
        Err(err) => {
            body["status"] = json!("unavailable");
            body["error"] = json!(err.to_string());
            ok_json(StatusCode::SERVICE_UNAVAILABLE, body)
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
    check_workflow_id(workflow_id)?;
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
    ok_json(
        status,
        json!({ "runId": triggered.run_id, "workflowId": workflow_id, "status": "pending", "duplicate": triggered.duplicate }),
    )
}

/// A run id from a path: malformed is a bad request, well-formed but unknown is not found.
fn parse_run_id(text: &str) -> Result<RunId, ApiError> {
    text.parse().map_err(|problem: String| ApiError::bad_request(problem))
}

fn check_workflow_id(id: &str) -> Result<(), ApiError> {
    if crate::definition::valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "`{}` is not a workflow id (a-z, 0-9, `-`, `_`)",
            id.chars().take(80).collect::<String>()
        )))
    }
}

async fn load_run(engine: &Engine, id: &str) -> Result<crate::engine::LoadedRun, ApiError> {
    let run = parse_run_id(id)?;
    engine.load(&run).await?.ok_or_else(|| ApiError::not_found(format!("no run `{id}`")))
}

async fn run(engine: &Engine, id: &str) -> Answer {
    let loaded = load_run(engine, id).await?;
    ok_json(StatusCode::OK, views::run(&loaded.id.to_string(), &loaded.state, &loaded.log, &loaded.workflow))
}

async fn history(engine: &Engine, id: &str) -> Answer {
    let loaded = load_run(engine, id).await?;
    let transitions: Vec<Value> = loaded.log.iter().map(|entry| views::transition(entry, &loaded.workflow)).collect();
    ok_json(StatusCode::OK, json!({ "runId": loaded.id.to_string(), "transitions": transitions }))
}

/// An optional JSON object body with only the `known` fields.
async fn object_body(request: Request<Incoming>, known: &[&str]) -> Result<serde_json::Map<String, Value>, ApiError> {
    match json_body(request).await? {
        None => Ok(serde_json::Map::new()),
        Some(Value::Object(body)) => {
            if let Some(unknown) = body.keys().find(|k| !known.contains(&k.as_str())) {
                let known = if known.is_empty() { "none".to_owned() } else { known.join(", ") };
                return Err(ApiError::bad_request(format!("unknown field `{unknown}` (known: {known})")));
            }
            Ok(body)
        }
        Some(_) => Err(ApiError::bad_request("the body must be a JSON object")),
    }
}

async fn cancel(engine: &Engine, id: &str, request: Request<Incoming>) -> Answer {
    let run = parse_run_id(id)?;
    let mut body = object_body(request, &["reason"]).await?;
    let reason = match body.remove("reason") {
        None | Some(Value::Null) => "cancelled by an operator".to_owned(),
        Some(Value::String(reason)) if reason.chars().count() <= 500 => reason,
        Some(_) => return Err(ApiError::bad_request("`reason` must be a string of at most 500 characters")),
    };
    let state = engine.cancel(&run, &reason).await?;
    ok_json(
        StatusCode::OK,
        json!({ "runId": run.to_string(), "workflowId": state.workflow, "status": state.status.name() }),
    )
}

async fn retry(engine: &Engine, id: &str, request: Request<Incoming>) -> Answer {
    let run = parse_run_id(id)?;
    object_body(request, &[]).await?;
    let state = engine.retry(&run).await?;
    ok_json(
        StatusCode::ACCEPTED,
        json!({ "runId": run.to_string(), "workflowId": state.workflow, "status": state.status.name() }),
    )
}

async fn rerun(engine: &Engine, id: &str, request: Request<Incoming>) -> Answer {
    let run = parse_run_id(id)?;
    let mut body = object_body(request, &["fromStep", "inputData"]).await?;
    let from_step = match body.remove("fromStep") {
        None | Some(Value::Null) => None,
        Some(Value::String(step)) => Some(step),
        Some(_) => return Err(ApiError::bad_request("`fromStep` must be a step id (a string)")),
    };
    let input = match body.remove("inputData") {
        None | Some(Value::Null) => None,
        Some(data @ Value::Object(_)) => Some(data),
        Some(_) => return Err(ApiError::bad_request("`inputData` must be a JSON object")),
    };
    let triggered = engine.rerun(&run, from_step.as_deref(), input.as_ref()).await?;
    let loaded = engine.load(&triggered.run_id.parse().map_err(ApiError::bad_request)?).await?;
    let workflow = loaded.map(|l| l.state.workflow).unwrap_or_default();
    ok_json(
        StatusCode::ACCEPTED,
        json!({ "runId": triggered.run_id, "workflowId": workflow, "status": "pending", "rerunOf": run.to_string(), "fromStep": from_step }),
    )
}

/// `GET /api/runs`: newest first, a cursor-paginated page of summaries.
async fn list_runs(engine: &Engine, query: Option<&str>) -> Answer {
    let params = query_params(query, &["workflowId", "status", "limit", "cursor"])?;
    let limit = limit_param(&params, 50, 500)?;
    let workflow = params.get("workflowId").map(String::as_str);
    if let Some(workflow) = workflow {
        check_workflow_id(workflow)?;
    }
    let status = params.get("status").map(String::as_str);
    if let Some(status) = status
        && !machine::STATUS_NAMES.contains(&status)
    {
        return Err(ApiError::bad_request(format!("`status` must be one of {}", machine::STATUS_NAMES.join(", "))));
    }
    let cursor = match params.get("cursor") {
        None => None,
        Some(text) => Some(
            text.parse::<RunId>()
                .map_err(|_| ApiError::bad_request("`cursor` is not a cursor from a previous page"))?,
        ),
    };
    let runs = engine.list_runs(workflow, status, cursor.as_ref(), limit).await?;
    let next_cursor = (runs.len() == limit).then(|| runs.last().map(ToString::to_string)).flatten();
    let views = summaries(engine, &runs).await?;
    ok_json(StatusCode::OK, json!({ "runs": views, "nextCursor": next_cursor }))
}

/// Summary views of runs (skipping runs deleted meanwhile).
async fn summaries(engine: &Engine, runs: &[RunId]) -> Result<Vec<Value>, ApiError> {
    let reads = runs.iter().map(|run| engine.summary(run));
    let mut out = Vec::with_capacity(runs.len());
    for (run, summary) in runs.iter().zip(futures::future::join_all(reads).await) {
        let Some(summary) = summary? else { continue };
        let step = match summary.step {
            Some(step) => engine
                .definition(run.shard, &summary.definition)
                .await
                .ok()
                .and_then(|w| w.def.steps.get(step as usize).map(|s| s.id.clone())),
            None => None,
        };
        out.push(views::summary(&run.to_string(), &summary, step));
    }
    Ok(out)
}

/// `GET /api/workflows/:id/status`.
async fn workflow_status(engine: &Engine, id: &str) -> Answer {
    check_workflow_id(id)?;
    let workflow = engine.registry().get(id).ok_or_else(|| ApiError::not_found(format!("no workflow `{id}`")))?;
    let mut active = Vec::new();
    for status in machine::STATUS_NAMES.into_iter().filter(|s| !crate::store::is_terminal_name(s)) {
        active.extend(engine.list_runs(Some(id), Some(status), None, 20).await?);
    }
    active.sort_by_key(|r| std::cmp::Reverse(r.uuid));
    let recent = engine.list_runs(Some(id), None, None, 20).await?;
    // Every status, counted or not: the stores only report the ones they saw.
    let mut counts: serde_json::Map<String, Value> =
        machine::STATUS_NAMES.iter().map(|status| ((*status).to_owned(), json!(0))).collect();
    for (status, count) in engine.count_runs(id).await? {
        counts.insert(status, json!(count));
    }
    ok_json(
        StatusCode::OK,
        json!({
            "workflowId": id,
            "description": workflow.def.description,
            "schedule": workflow.def.schedule,
            "nextRunAt": engine.next_fire(workflow).map(views::timestamp),
            "activeRuns": summaries(engine, &active).await?,
            "recentRuns": summaries(engine, &recent).await?,
            "counts": counts,
        }),
    )
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

/// An event (stream entry) id `<ms>-<seq>`, both parts decimal and within u64 as Redis wants.
fn entry_id(text: &str) -> Option<(u64, u64)> {
    let (ms, seq) = text.split_once('-')?;
    let number = |part: &str| {
        (!part.is_empty() && part.len() <= 20 && part.bytes().all(|b| b.is_ascii_digit()))
            .then(|| part.parse::<u64>().ok())
            .flatten()
    };
    Some((number(ms)?, number(seq)?))
}

async fn list_events(engine: &Engine, query: Option<&str>) -> Answer {
    let params = query_params(query, &["limit", "before", "type"])?;
    let limit = limit_param(&params, 50, 500)?;
    let before = params.get("before").map(String::as_str);
    let before_id = match before {
        None => None,
        Some(before) => Some(
            entry_id(before)
                .ok_or_else(|| ApiError::bad_request("`before` must be an event id such as `1700000000000-0`"))?,
        ),
    };
    let event_type = params.get("type").map(String::as_str);
    if let Some(event_type) = event_type
        && !crate::definition::valid_event_type(event_type)
    {
        return Err(ApiError::bad_request("`type` must match ^[a-z0-9][a-z0-9_.-]{0,127}$"));
    }
    if before_id == Some((0, 0)) {
        // Nothing comes before the first possible id (and Redis refuses that range).
        return ok_json(StatusCode::OK, json!({ "events": [], "nextCursor": null }));
    }
    let listed = engine.recent_events(before, event_type, limit).await?;
    let next_cursor = (listed.len() == limit).then(|| listed.last().map(|e| e.entry.id.clone())).flatten();
    let events: Vec<Value> = listed.iter().map(views::event).collect();
    ok_json(StatusCode::OK, json!({ "events": events, "nextCursor": next_cursor }))
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
        Ok(event_id) => ok_json(StatusCode::ACCEPTED, json!({ "eventId": event_id, "eventType": event_type })),
        Err(problem) => Err(ApiError::bad_request(problem)),
    }
}

/// How far an Inngest signature's timestamp may be from now.
const INNGEST_SIGNATURE_SKEW_SECS: u64 = 300;

/// `POST /api/webhooks/inngest`: a signed callback from Inngest (`X-Inngest-Signature:
/// t=<unix seconds>&s=<hex HMAC-SHA256 of body + t>`, keyed with `INNGEST_SIGNING_KEY` without
/// its `signkey-<env>-` prefix), published onto the bus: `{"name": "rayanava/leads.scored",
/// "data": {...}}` becomes an event of type `rayanava.leads.scored` with `data` as its payload.
async fn inngest_webhook(engine: &Engine, request: Request<Incoming>) -> Answer {
    use subtle::ConstantTimeEq;
    let Some(key) = std::env::var("INNGEST_SIGNING_KEY").ok().filter(|k| !k.is_empty()) else {
        // Not enabled here: as if the route did not exist.
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_configured",
            "the Inngest webhook is off: INNGEST_SIGNING_KEY is not set",
        ));
    };
    let unauthorized = |message: &str| ApiError::new(StatusCode::UNAUTHORIZED, "bad_signature", message);
    let header = request
        .headers()
        .get("x-inngest-signature")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| unauthorized("missing X-Inngest-Signature"))?;
    let mut timestamp = None;
    let mut signature = None;
    for part in header.split('&') {
        match part.split_once('=') {
            Some(("t", t)) => timestamp = t.parse::<u64>().ok(),
            Some(("s", s)) => signature = Some(s.to_owned()),
            _ => {}
        }
    }
    let (Some(timestamp), Some(signature)) = (timestamp, signature) else {
        return Err(unauthorized("X-Inngest-Signature must be `t=<seconds>&s=<hex>`"));
    };
    let now_secs = engine.now() / 1000;
    if now_secs.abs_diff(timestamp) > INNGEST_SIGNATURE_SKEW_SECS {
        return Err(unauthorized("the signature's timestamp is too old or in the future"));
    }
    let bytes = Limited::new(request.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|_| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "the body is too large"))?
        .to_bytes();
    let key =
        key.split_once("signkey-").map_or(key.as_str(), |(_, rest)| rest.split_once('-').map_or(rest, |(_, k)| k));
    let mut signed = bytes.to_vec();
    signed.extend_from_slice(timestamp.to_string().as_bytes());
    let expected = crate::actions::sign(key, &signed);
    let expected = expected.trim_start_matches("sha256=");
    if !bool::from(expected.as_bytes().ct_eq(signature.to_ascii_lowercase().as_bytes())) {
        return Err(unauthorized("the signature does not match"));
    }
    let body: Value = serde_json::from_slice(&bytes)
        .map_err(|err| ApiError::bad_request(format!("the body is not valid JSON: {err}")))?;
    let name = body.get("name").and_then(Value::as_str).ok_or_else(|| ApiError::bad_request("`name` is required"))?;
    let event_type: String = name
        .to_ascii_lowercase()
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' | '.' | '-' => c,
            _ => '.',
        })
        .collect();
    let payload = match body.get("data") {
        Some(data @ Value::Object(_)) => data.clone(),
        None | Some(Value::Null) => json!({}),
        Some(other) => json!({ "data": other }),
    };
    let key = body.get("id").and_then(Value::as_str).map(|id| format!("inngest:{id}"));
    match engine.publish_event(&event_type, &payload, key.as_deref(), Some("inngest")).await? {
        Ok(event_id) => ok_json(StatusCode::ACCEPTED, json!({ "eventId": event_id, "eventType": event_type })),
        Err(problem) => Err(ApiError::bad_request(problem)),
    }
}
