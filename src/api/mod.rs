//! The HTTP API over hyper: a plain router (`match` on method and path segments), one `async fn`
//! per route, JSON in and out, errors as `{"error":{"code","message"}}`.

mod dashboard;
mod error;
mod metrics;
pub mod views;

pub use error::ApiError;

use crate::engine::{Accepted, Engine};
use crate::machine::{self, Status, Trigger};
use crate::store::{Debounced, RunId, RunQuery, SearchQuery};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{
    AUTHORIZATION, CONTENT_LENGTH, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HOST, HeaderMap, HeaderValue, ORIGIN,
};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Largest body of the Inngest webhook: it is read before its signature can be checked, by
/// anyone, so it is kept small (Inngest's callbacks are a few KiB).
pub const WEBHOOK_MAX_BODY_BYTES: usize = 64 * 1024;
/// How many unauthenticated bodies (the webhook's) may be being read at once; beyond, 503 at
/// once with `Retry-After`, so that slow clients cannot pin memory or tasks.
pub const MAX_UNAUTHENTICATED_BODIES: usize = 32;
/// How long a client may take to send a request body before it is answered 408.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `/health` and `/metrics` wait for the store before reporting it unreachable.
pub const STORE_CHECK_DEADLINE: Duration = Duration::from_secs(2);
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
    /// `ALLOWED_HOSTS`: with no token, the host names a `Host` header may carry beside
    /// loopback names and IP addresses (lowercase, without port).
    pub allowed_hosts: Vec<String>,
    /// `INNGEST_SIGNING_KEY`: the Inngest webhook's key; `None`: the webhook is off.
    pub inngest_signing_key: Option<String>,
    /// Permits for reading unauthenticated bodies (see [`MAX_UNAUTHENTICATED_BODIES`]).
    unauthenticated_bodies: Semaphore,
}

impl ApiState {
    /// The API of `engine`, as the settings say.
    pub fn new(engine: Arc<Engine>, settings: &crate::config::Settings) -> ApiState {
        ApiState {
            engine,
            token: settings.api_token.clone(),
            allowed_hosts: settings.allowed_hosts.clone(),
            inngest_signing_key: settings.inngest_signing_key.clone(),
            unauthenticated_bodies: Semaphore::new(MAX_UNAUTHENTICATED_BODIES),
        }
    }
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
    /// The dashboard's page or one of its assets: served with the page's security policy.
    Page(&'static str, &'static str),
    /// A redirection to this path (`/` to `/ui`).
    Redirect(&'static str),
    /// JSON that sets (or clears) the session cookie: the `Set-Cookie` value.
    Session(Value, String),
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
    let mut response = match result {
        Ok((status, Payload::Json(body))) => json_reply(status, &body),
        Ok((status, Payload::Text(content_type, body))) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = status;
            response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            response
        }
        Ok((status, Payload::Page(content_type, body))) => {
            let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
            *response.status_mut() = status;
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
            headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(dashboard::PAGE_POLICY));
            headers.insert(hyper::header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            headers.insert(hyper::header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
            response
        }
        Ok((status, Payload::Redirect(location))) => {
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = status;
            response.headers_mut().insert(hyper::header::LOCATION, HeaderValue::from_static(location));
            response
        }
        Ok((status, Payload::Session(body, cookie))) => {
            let mut response = json_reply(status, &body);
            response.headers_mut().insert(hyper::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            if let Ok(cookie) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(hyper::header::SET_COOKIE, cookie);
            }
            response
        }
        Err(err) => {
            tracing::debug!(%method, %path, status = %err.status, reason = %err.message, "request refused");
            let mut response = json_reply(err.status, &err.body());
            if let Some(allow) = err.allow {
                response.headers_mut().insert(hyper::header::ALLOW, HeaderValue::from_static(allow));
            }
            if let Some(seconds) = err.retry_after {
                response.headers_mut().insert(hyper::header::RETRY_AFTER, HeaderValue::from(seconds));
            }
            if matches!(err.status, StatusCode::REQUEST_TIMEOUT | StatusCode::PAYLOAD_TOO_LARGE) {
                // The body was left unread: this connection cannot carry another request.
                response.headers_mut().insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
            }
            if err.status == StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            response
        }
    };
    // Whatever the answer: never sniffed into another type, never framed, no script.
    let headers = response.headers_mut();
    headers.insert(hyper::header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(hyper::header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !headers.contains_key(CONTENT_SECURITY_POLICY) {
        headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(dashboard::API_POLICY));
    }
    response
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
    DeadEvents,
    Runs,
    Run(&'a str),
    History(&'a str),
    Cancel(&'a str),
    Retry(&'a str),
    Rerun(&'a str),
    /// `POST /api/runs/bulk`: cancel or retry the runs matching a filter.
    Bulk,
    /// `POST /api/workflows/:id/pause` (true) and `/resume` (false).
    Pause(&'a str, bool),
    RunStateAt(&'a str),
    Replicas,
    Stats,
    InngestWebhook,
    /// `/`: redirects to the dashboard.
    Root,
    /// Any other `/ui/...` path: the dashboard's page.
    UiPage,
    UiAsset(&'a str),
    UiSession,
    UiLogin,
    UiLogout,
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
            ["api", "workflows", id, "pause"] => Route::Pause(id, true),
            ["api", "workflows", id, "resume"] => Route::Pause(id, false),
            ["api", "events"] => Route::Events,
            ["api", "events", "dead"] => Route::DeadEvents,
            ["api", "runs"] => Route::Runs,
            ["api", "runs", "bulk"] => Route::Bulk,
            ["api", "runs", id] => Route::Run(id),
            ["api", "runs", id, "history"] => Route::History(id),
            ["api", "runs", id, "cancel"] => Route::Cancel(id),
            ["api", "runs", id, "retry"] => Route::Retry(id),
            ["api", "runs", id, "rerun"] => Route::Rerun(id),
            ["api", "runs", id, "state"] => Route::RunStateAt(id),
            ["api", "replicas"] => Route::Replicas,
            ["api", "stats"] => Route::Stats,
            ["api", "webhooks", "inngest"] => Route::InngestWebhook,
            [""] => Route::Root,
            ["ui", "assets", name] => Route::UiAsset(name),
            ["ui", "session"] => Route::UiSession,
            ["ui", "login"] => Route::UiLogin,
            ["ui", "logout"] => Route::UiLogout,
            ["ui", ..] => Route::UiPage,
            _ => return None,
        })
    }

    /// The methods the route answers, as an `Allow` header value (HEAD wherever GET: the same
    /// answer without its body).
    fn allow(&self) -> &'static str {
        match self {
            Route::Events => "GET, HEAD, POST",
            Route::Trigger(_)
            | Route::Pause(..)
            | Route::Cancel(_)
            | Route::Retry(_)
            | Route::Rerun(_)
            | Route::Bulk
            | Route::InngestWebhook
            | Route::UiLogin
            | Route::UiLogout => "POST",
            Route::Health
            | Route::Metrics
            | Route::OpenApi
            | Route::Workflows
            | Route::WorkflowStatus(_)
            | Route::DeadEvents
            | Route::Runs
            | Route::Run(_)
            | Route::History(_)
            | Route::RunStateAt(_)
            | Route::Replicas
            | Route::Stats
            | Route::Root
            | Route::UiPage
            | Route::UiAsset(_)
            | Route::UiSession => "GET, HEAD",
        }
    }

    /// Open without the API token: probes, scrapers, the Inngest webhook (which carries a
    /// signature of its own), and the dashboard's page, assets and login (no run data: that
    /// comes from the API).
    fn is_public(&self) -> bool {
        self.is_dashboard() || matches!(self, Route::Health | Route::Metrics | Route::InngestWebhook)
    }

    /// The dashboard's page, assets and session routes: they carry no run data and need no
    /// store (the page gets its data from the API).
    fn is_dashboard(&self) -> bool {
        matches!(
            self,
            Route::Root | Route::UiPage | Route::UiAsset(_) | Route::UiSession | Route::UiLogin | Route::UiLogout
        )
    }

    /// Whether answering needs the store (so that a store known to be down is a fast 503).
    /// `/health` and `/metrics` report on the store themselves.
    fn needs_store(&self) -> bool {
        !(self.is_dashboard() || matches!(self, Route::Health | Route::Metrics | Route::OpenApi | Route::Workflows))
    }
}

async fn route(state: &ApiState, request: Request<Incoming>) -> Answer {
    let path = request.uri().path().to_owned();
    let trimmed = if path.len() > 1 { path.trim_end_matches('/') } else { path.as_str() };
    let segments: Vec<&str> = trimmed.split('/').skip(1).collect();
    let method = request.method().clone();
    if state.token.is_none() {
        check_host(request.headers(), &state.allowed_hosts)?;
    }
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
    if !method.is_safe() {
        check_same_origin(request.headers())?;
    }
    if !route.is_public() {
        authorize(state.token.as_deref(), &request, state.engine.now())?;
    }
    // The webhook is authenticated by its signature, whatever the content type Inngest sends.
    if method == Method::POST && !matches!(route, Route::InngestWebhook) {
        require_json_content_type(request.headers())?;
    }
    let engine = &state.engine;
    if route.needs_store()
        && let Some(problem) = engine.store_problem()
    {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("store unavailable: {problem}"),
        ));
    }
    let query = request.uri().query().map(str::to_owned);
    let query = query.as_deref();
    match route {
        Route::Health => health(engine).await,
        Route::Metrics => metrics::render(engine, STORE_CHECK_DEADLINE)
            .await
            .map(|text| (StatusCode::OK, Payload::Text(metrics::CONTENT_TYPE, text))),
        Route::OpenApi => ok_json(StatusCode::OK, openapi()),
        Route::Workflows => ok_json(StatusCode::OK, workflows(engine)),
        Route::WorkflowStatus(id) => workflow_status(engine, id).await,
        Route::Trigger(id) => trigger(engine, id, request).await,
        Route::Pause(id, paused) => pause(engine, id, paused, request).await,
        Route::DeadEvents => list_dead_events(engine, query).await,
        Route::Events if method != Method::POST => list_events(engine, query).await,
        Route::Events => publish_event(engine, request).await,
        Route::Runs => list_runs(engine, query).await,
        Route::Run(id) => run(engine, id).await,
        Route::History(id) => history(engine, id).await,
        Route::Cancel(id) => cancel(engine, id, request).await,
        Route::Retry(id) => retry(engine, id, request).await,
        Route::Rerun(id) => rerun(engine, id, request).await,
        Route::Bulk => bulk(engine, request).await,
        Route::RunStateAt(id) => run_state_at(engine, id, query).await,
        Route::Replicas => replicas(engine).await,
        Route::Stats => stats(engine).await,
        Route::InngestWebhook => inngest_webhook(state, request).await,
        Route::Root => Ok((StatusCode::FOUND, Payload::Redirect("/ui"))),
        Route::UiPage => Ok((StatusCode::OK, Payload::Page("text/html; charset=utf-8", dashboard::INDEX_HTML))),
        Route::UiAsset(name) => match dashboard::asset(name) {
            Some((content_type, body)) => Ok((StatusCode::OK, Payload::Page(content_type, body))),
            None => Err(ApiError::not_found(format!("no asset `{}`", name.chars().take(80).collect::<String>()))),
        },
        Route::UiSession => dashboard::session(state, &request),
        Route::UiLogin => dashboard::login(state, request).await,
        Route::UiLogout => dashboard::logout(request).await,
    }
}

/// Without a token, refuses a `Host` that is not loopback, an IP address or an `ALLOWED_HOSTS`
/// name: a DNS-rebinding page (served from a name its owner points at this machine) would
/// otherwise read and act on the open API as if from the same origin. A rebinding page can only
/// ever send its own name, so an IP literal is always safe. No `Host` (HTTP/1.0) is no browser.
fn check_host(headers: &HeaderMap, allowed: &[String]) -> Result<(), ApiError> {
    let Some(host) = headers.get(HOST) else { return Ok(()) };
    let refused = |shown: &str| {
        ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "host_not_allowed",
            format!(
                "Host `{shown}` is not served here: without API_TOKEN only loopback names, IP addresses and ALLOWED_HOSTS are"
            ),
        )
    };
    let host = host.to_str().map_err(|_| refused("(not ASCII)"))?;
    let shown: String = host.chars().take(100).collect();
    let name = host_name(host).ok_or_else(|| refused(&shown))?;
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let loopback = name == "localhost" || name.ends_with(".localhost");
    if loopback || name.parse::<std::net::IpAddr>().is_ok() || allowed.contains(&name) {
        Ok(())
    } else {
        Err(refused(&shown))
    }
}

/// The host of a `Host` header value (`name`, `name:port`, `[v6]:port`), without its port.
fn host_name(authority: &str) -> Option<&str> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        return (after.is_empty() || after.strip_prefix(':').is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit())))
            .then_some(v6);
    }
    let name = match authority.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        Some(_) => return None,
        None => authority,
    };
    (!name.is_empty()).then_some(name)
}

/// Refuses a state-changing request a browser sent from another origin (a page the operator
/// visits could otherwise trigger workflows: a bodiless POST needs no CORS preflight). Browsers
/// say so in `Sec-Fetch-Site` and `Origin`; `same-site` is refused too (another port or
/// subdomain, such as a local dev server, is another origin). A request with neither header
/// is not from a browser, and passes. Done whether or not a token is set.
fn check_same_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let refused = |message: String| ApiError::new(StatusCode::FORBIDDEN, "cross_origin", message);
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("?");
        if !matches!(site, "same-origin" | "none") {
            return Err(refused(format!(
                "cross-site request refused (Sec-Fetch-Site: {}): state-changing requests must come from this server's own origin",
                site.chars().take(40).collect::<String>()
            )));
        }
    }
    if let Some(origin) = headers.get(ORIGIN) {
        let origin = origin.to_str().unwrap_or("?");
        let host = headers.get(HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
        if !same_origin(origin, host) {
            return Err(refused(format!(
                "cross-origin request refused (Origin: {}): state-changing requests must come from this server's own origin",
                origin.chars().take(100).collect::<String>()
            )));
        }
    }
    Ok(())
}

/// Whether `origin` (`scheme://host[:port]`) names the authority `host` the request was sent to,
/// a scheme's default port written or not.
fn same_origin(origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else { return false };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => "80",
        "https" => "443",
        _ => return false,
    };
    let strip = |a: &str| {
        let a = a.to_ascii_lowercase();
        a.strip_suffix(&format!(":{default_port}")).map(str::to_owned).unwrap_or(a)
    };
    !host.is_empty() && !authority.contains('/') && strip(authority) == strip(host)
}

/// Every POST says `Content-Type: application/json`, even with an empty body: a browser can
/// send a form or `text/plain` cross-site without a preflight, never JSON.
fn require_json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let is_json = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json")));
    if is_json {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send Content-Type: application/json on every POST, even with an empty body",
        ))
    }
}

/// Reads a body of at most `limit` bytes within [`BODY_READ_TIMEOUT`]: 413 beyond the limit
/// (without buffering any of it when `Content-Length` says so), 408 when it does not arrive in
/// time. Only `limit` bytes are ever held.
async fn read_body(request: Request<Incoming>, limit: usize) -> Result<Bytes, ApiError> {
    let deadline = tokio::time::Instant::now() + BODY_READ_TIMEOUT;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request bodies are limited to {limit} bytes here"),
        )
    };
    let declared = request.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut body = request.into_body();
    if declared.is_some_and(|length| length > limit as u64) {
        if declared.is_some_and(|length| length <= MAX_DRAIN_BYTES as u64) {
            drain(&mut body, deadline).await;
        }
        return Err(too_large());
    }
    let mut read = Vec::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    format!("the request body did not arrive within {} s", BODY_READ_TIMEOUT.as_secs()),
                ));
            }
            Ok(None) => return Ok(Bytes::from(read)),
            Ok(Some(Err(err))) => return Err(ApiError::bad_request(format!("could not read the request body: {err}"))),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Some(data) = frame.data_ref() {
            if read.len() + data.len() > limit {
                drain(&mut body, deadline).await;
                return Err(too_large());
            }
            read.extend_from_slice(data);
        }
    }
}

/// At most this much of a refused body is read (and dropped) before answering 413.
const MAX_DRAIN_BYTES: usize = 2 * 1024 * 1024;

/// Reads and drops what is left of a refused body, up to [`MAX_DRAIN_BYTES`] and `deadline`: a
/// client still sending would otherwise see the connection reset instead of reading the 413.
async fn drain(body: &mut Incoming, deadline: tokio::time::Instant) {
    let mut left = MAX_DRAIN_BYTES;
    while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, body.frame()).await {
        let size = frame.data_ref().map_or(0, Bytes::len);
        if size >= left {
            return;
        }
        left -= size;
    }
}

/// Checks `Authorization: Bearer <token>` in constant time, or without that header the
/// dashboard's session cookie (signed, unexpired at `now`). More than one `Authorization`
/// header is refused, token or not: which one counts would be up to each proxy on the way.
fn authorize(token: Option<&str>, request: &Request<Incoming>, now: u64) -> Result<(), ApiError> {
    use subtle::ConstantTimeEq;
    if request.headers().get_all(AUTHORIZATION).iter().nth(1).is_some() {
        return Err(ApiError::bad_request("more than one Authorization header; send exactly one"));
    }
    let Some(token) = token else { return Ok(()) };
    let unauthorized = |message: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
    let Some(header) = request.headers().get(AUTHORIZATION) else {
        if dashboard::has_session(request.headers(), token, now) {
            return Ok(());
        }
        return Err(unauthorized("this API needs `Authorization: Bearer <API_TOKEN>` (or a dashboard session)"));
    };
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

/// `GET /api/runs/:runId/state?at=<seq>`: the run as it was right after its log entry `at`
/// (the machine's fold of the log up to it), in the shape of `GET /api/runs/:runId`; without
/// `at`, as it is now.
async fn run_state_at(engine: &Engine, id: &str, query: Option<&str>) -> Answer {
    let params = query_params(query, &["at"])?;
    let run = parse_run_id(id)?;
    let loaded = match params.get("at") {
        None => engine.load(&run).await?,
        Some(at) => {
            let at = at.parse::<u64>().map_err(|_| ApiError::bad_request("`at` must be a seq (a number from 1)"))?;
            engine.load_at(&run, at).await?
        }
    };
    let loaded = loaded.ok_or_else(|| ApiError::not_found(format!("no run `{id}`")))?;
    // At the end of the log: replay's check, that the fold is what the store says the run is.
    let stored = engine.summary(&run).await?;
    let at_end = stored.as_ref().is_none_or(|s| s.seq <= loaded.state.seq);
    let fold_matches = at_end.then(|| stored.is_some_and(|s| s.matches(&loaded.state)));
    let view = views::run_at(&loaded.id.to_string(), &loaded.state, &loaded.log, &loaded.workflow, fold_matches);
    ok_json(StatusCode::OK, view)
}

/// `GET /api/replicas`: the replicas whose heartbeat is live.
async fn replicas(engine: &Engine) -> Answer {
    let replicas = engine.replicas().await?;
    ok_json(
        StatusCode::OK,
        json!({
            "replicas": replicas.iter().map(views::replica).collect::<Vec<_>>(),
            "heartbeatSeconds": crate::engine::HEARTBEAT_EVERY.as_secs(),
            "ttlSeconds": crate::engine::HEARTBEAT_TTL.as_secs(),
        }),
    )
}

/// `GET /api/stats`: runs started in the last hour and day and what became of them, hour by
/// hour, and the queues' lengths.
async fn stats(engine: &Engine) -> Answer {
    let stats = engine.run_stats().await?;
    let streams = engine.stream_stats().await?;
    let sum = |series: &[u64]| series.iter().sum::<u64>();
    let last = |series: &[u64]| series.last().copied().unwrap_or(0);
    let hours: Vec<Value> = (0..stats.hours.len())
        .map(|h| {
            json!({
                "start": views::timestamp(stats.hours[h]),
                "started": stats.started[h],
                "completed": stats.completed[h],
                "failed": stats.failed[h],
            })
        })
        .collect();
    ok_json(
        StatusCode::OK,
        json!({
            "now": views::timestamp(stats.now),
            "lastHour": { "started": last(&stats.started), "completed": last(&stats.completed), "failed": last(&stats.failed) },
            "lastDay": { "started": sum(&stats.started), "completed": sum(&stats.completed), "failed": sum(&stats.failed) },
            "hours": hours,
            "capped": stats.capped,
            "bus": { "length": streams.events_length, "pending": streams.events_pending, "dead": streams.events_dead },
            "steps": { "queued": streams.ready_length, "inFlight": streams.ready_pending },
        }),
    )
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
    // A store known to be down is reported at once; one that does not answer, after a short
    // deadline: a probe must not hang on it.
    let checked = match engine.store_problem() {
        Some(problem) => Err(format!("store unavailable: {problem}")),
        None => match tokio::time::timeout(STORE_CHECK_DEADLINE, engine.store_health()).await {
            Ok(Ok(health)) => Ok(health),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err(match engine.store_problem() {
                Some(problem) => format!("store unavailable: {problem}"),
                None => format!("store unavailable: no answer within {} s", STORE_CHECK_DEADLINE.as_secs()),
            }),
        },
    };
    match checked {
        Ok(health) => {
            body["status"] = json!("ok");
            body["storeStatus"] = json!("ok");
            body["storeVersion"] = json!(health.version);
            body["warnings"] = json!(health.warnings);
            body["bus"] = json!({
                "hostileEntriesRemoved": health.bus.hostile_removed,
                "lastHostileEntry": health.bus.last_hostile.as_ref().map(|(id, _)| id),
                "lastHostileRemovedAt": health.bus.last_hostile.as_ref().map(|(_, at)| views::timestamp(*at)),
            });
            ok_json(StatusCode::OK, body)
        }
        Err(message) => {
            body["status"] = json!("unavailable");
            body["storeStatus"] = json!("unreachable");
            body["error"] = json!(message);
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
                "steps": w
                    .def
                    .steps
                    .iter()
                    .enumerate()
                    .map(|(index, s)| json!({ "id": s.id, "action": s.action.name(), "needs": views::needs(w, index as u32) }))
                    .collect::<Vec<_>>(),
                "definitionHash": w.hash,
                "search": w.def.search,
                "paused": engine.is_paused(&w.def.id),
                "concurrency": w.def.concurrency,
                "rateLimit": w.def.rate_limit,
                "debounce": w.def.debounce.as_ref().map(debounce_view),
            })
        })
        .collect();
    json!({ "workflows": list })
}

/// A workflow's `debounce` as the API shows it (durations as written, absent fields left out).
fn debounce_view(debounce: &crate::definition::Debounce) -> Value {
    use crate::definition::format_duration;
    let mut view = json!({ "period": format_duration(debounce.period) });
    if let Some(key) = &debounce.key {
        view["key"] = json!(key);
    }
    if let Some(max_wait) = debounce.max_wait {
        view["maxWait"] = json!(format_duration(max_wait));
    }
    view
}

/// Reads a JSON body (bounded in size and time; the content type was checked by `route`).
async fn json_body(request: Request<Incoming>) -> Result<Option<Value>, ApiError> {
    let bytes = read_body(request, MAX_BODY_BYTES).await?;
    // No body, or only JSON's whitespace (not ASCII's: a form feed is not JSON).
    if bytes.iter().all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r')) {
        return Ok(None);
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
    let caller = caller_trace(request.headers());
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
    let (duplicate, body) = match engine.accept(workflow_id, &input, key.as_deref(), Trigger::Api, caller).await? {
        Accepted::Started(triggered) => (
            triggered.duplicate,
            json!({ "runId": triggered.run_id, "workflowId": workflow_id, "status": "pending", "duplicate": triggered.duplicate }),
        ),
        Accepted::Debounced(Debounced::Absorbed { burst, triggers, due }) => (
            false,
            json!({ "workflowId": workflow_id, "status": "debounced", "duplicate": false, "burstId": burst,
                    "triggers": triggers, "startsAt": views::timestamp(due) }),
        ),
        Accepted::Debounced(Debounced::Duplicate { burst }) => {
            (true, json!({ "workflowId": workflow_id, "status": "debounced", "duplicate": true, "burstId": burst }))
        }
    };
    ok_json(if duplicate { StatusCode::OK } else { StatusCode::ACCEPTED }, body)
}

/// The caller's span, from its `traceparent` (and `tracestate`) headers. A missing, repeated or
/// invalid `traceparent` is no context at all (the W3C specification says to ignore it, not to
/// refuse the request); several `tracestate` headers are one list.
fn caller_trace(headers: &HeaderMap) -> Option<machine::TraceContext> {
    let mut parents = headers.get_all("traceparent").iter();
    let parent = parents.next()?.to_str().ok()?;
    if parents.next().is_some() {
        return None;
    }
    let states: Vec<&str> = headers.get_all("tracestate").iter().filter_map(|v| v.to_str().ok()).collect();
    let state = (!states.is_empty()).then(|| states.join(","));
    machine::TraceContext::parse(parent, state.as_deref()).ok()
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

/// `POST /api/workflows/:id/pause` and `/resume`.
async fn pause(engine: &Engine, id: &str, paused: bool, request: Request<Incoming>) -> Answer {
    check_workflow_id(id)?;
    object_body(request, &[]).await?;
    let paused = engine.set_paused(id, paused).await?;
    ok_json(StatusCode::OK, json!({ "workflowId": id, "paused": paused }))
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

/// `POST /api/runs/bulk` `{"action": "cancel"|"retry", "filter": {"workflowId", "status",
/// "createdAfter", "createdBefore"}, "limit": N}`: at most `limit` matching runs (default 100, at
/// most [`crate::engine::MAX_BULK`]), newest first; `{"matched", "done", "failed": [{"runId",
/// "error"}]}`. Safe to repeat: what was done no longer matches.
async fn bulk(engine: &Engine, request: Request<Incoming>) -> Answer {
    use crate::engine::{BulkAction, BulkFilter, MAX_BULK};
    let mut body = object_body(request, &["action", "filter", "limit"]).await?;
    let action = match body.remove("action") {
        Some(Value::String(action)) if action == "cancel" => BulkAction::Cancel,
        Some(Value::String(action)) if action == "retry" => BulkAction::Retry,
        _ => return Err(ApiError::bad_request("`action` must be \"cancel\" or \"retry\"")),
    };
    let limit = match body.remove("limit") {
        None | Some(Value::Null) => 100,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(limit) if (1..=MAX_BULK as u64).contains(&limit) => limit as usize,
            _ => return Err(ApiError::bad_request(format!("`limit` must be a number from 1 to {MAX_BULK}"))),
        },
        Some(_) => return Err(ApiError::bad_request(format!("`limit` must be a number from 1 to {MAX_BULK}"))),
    };
    let mut filter = BulkFilter::default();
    match body.remove("filter") {
        None | Some(Value::Null) => {}
        Some(Value::Object(mut given)) => {
            let known = ["workflowId", "status", "createdAfter", "createdBefore"];
            if let Some(unknown) = given.keys().find(|k| !known.contains(&k.as_str())) {
                return Err(ApiError::bad_request(format!(
                    "unknown filter field `{}`; the filter takes {}",
                    unknown.chars().take(64).collect::<String>(),
                    known.join(", ")
                )));
            }
            let mut text = |name: &str| -> Result<Option<String>, ApiError> {
                match given.remove(name) {
                    None => Ok(None),
                    Some(Value::String(text)) => Ok(Some(text)),
                    Some(_) => Err(ApiError::bad_request(format!("filter `{name}` must be a string"))),
                }
            };
            filter.workflow = text("workflowId")?;
            filter.status = text("status")?.map(|status| status_param(&status)).transpose()?;
            filter.created_after = text("createdAfter")?.map(|t| time_param("createdAfter", &t)).transpose()?;
            filter.created_before = text("createdBefore")?.map(|t| time_param("createdBefore", &t)).transpose()?;
        }
        Some(_) => return Err(ApiError::bad_request("`filter` must be a JSON object")),
    }
    if let Some(workflow) = &filter.workflow {
        check_workflow_id(workflow)?;
    }
    let outcome = engine.bulk(action, &filter, limit).await?;
    ok_json(
        StatusCode::OK,
        json!({
            "matched": outcome.matched,
            "done": outcome.done,
            "failed": outcome.failed.iter().map(|(run, error)| json!({ "runId": run, "error": error })).collect::<Vec<_>>(),
        }),
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
    let (query, inputs) = input_params(query)?;
    let params =
        query_params(Some(&query), &["workflowId", "status", "limit", "cursor", "createdAfter", "createdBefore"])?;
    let limit = limit_param(&params, 50, 500)?;
    let workflow = params.get("workflowId").map(String::as_str);
    if let Some(workflow) = workflow {
        check_workflow_id(workflow)?;
    }
    let status = params.get("status").map(|status| status_param(status)).transpose()?;
    let cursor = match params.get("cursor") {
        None => None,
        Some(text) => Some(
            text.parse::<RunId>()
                .map_err(|_| ApiError::bad_request("`cursor` is not a cursor from a previous page"))?,
        ),
    };
    let created_after = params.get("createdAfter").map(|t| time_param("createdAfter", t)).transpose()?;
    let created_before = params.get("createdBefore").map(|t| time_param("createdBefore", t)).transpose()?;
    // Runs are listed newest first by creation: `createdBefore` is where the first page starts
    // (the cursor, when a later page's is further), `createdAfter` where the last page ends.
    let start = match (cursor, created_before.map(RunId::first_at)) {
        (Some(cursor), Some(bound)) => Some(if bound.uuid < cursor.uuid { bound } else { cursor }),
        (cursor, bound) => cursor.or(bound),
    };
    let mut runs = match inputs.as_slice() {
        [] => engine.list_runs(RunQuery { workflow, status, before: start.as_ref(), limit }).await?,
        [(field, value)] => {
            let workflow = searchable(engine, workflow, field)?;
            if status.is_some() {
                return Err(ApiError::bad_request("`input.*` cannot be combined with `status`"));
            }
            engine.search_runs(SearchQuery { workflow, field, value, before: start.as_ref(), limit }).await?
        }
        _ => return Err(ApiError::bad_request("at most one `input.<field>` parameter")),
    };
    let full = runs.len() == limit;
    if let Some(after) = created_after {
        runs.retain(|run| run.created_at() >= after);
    }
    let next_cursor = (full && runs.len() == limit).then(|| runs.last().map(ToString::to_string)).flatten();
    let views = summaries(engine, &runs).await?;
    ok_json(StatusCode::OK, json!({ "runs": views, "nextCursor": next_cursor }))
}

/// Splits the `input.<field>=<value>` parameters (searches by an indexed input field) from the
/// others, which are returned as a query string of their own.
fn input_params(query: Option<&str>) -> Result<(String, Vec<(String, String)>), ApiError> {
    let mut rest = Vec::new();
    let mut inputs = Vec::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let bad = || ApiError::bad_request("a query parameter is not valid percent-encoded UTF-8");
        match percent_decode(name).ok_or_else(bad)?.strip_prefix("input.") {
            Some(field) => inputs.push((field.to_owned(), percent_decode(value).ok_or_else(bad)?)),
            None => rest.push(pair),
        }
    }
    Ok((rest.join("&"), inputs))
}

/// The workflow a search by `input.<field>` names, if it indexes that field.
fn searchable<'a>(engine: &Engine, workflow: Option<&'a str>, field: &str) -> Result<&'a str, ApiError> {
    let Some(workflow) = workflow else {
        return Err(ApiError::bad_request("`input.<field>` needs `workflowId` (fields are indexed per workflow)"));
    };
    let Some(loaded) = engine.registry().get(workflow) else {
        return Err(ApiError::bad_request(format!("no workflow `{workflow}` to search the runs of")));
    };
    if !loaded.def.search.iter().any(|f| f == field) {
        let fields = if loaded.def.search.is_empty() { "none".to_owned() } else { loaded.def.search.join(", ") };
        return Err(ApiError::bad_request(format!(
            "workflow `{workflow}` does not index the input field `{}` (its `search` fields: {fields})",
            field.chars().take(64).collect::<String>()
        )));
    }
    Ok(workflow)
}

/// A run status named by a parameter, or a 400 listing the names.
fn status_param(name: &str) -> Result<Status, ApiError> {
    Status::from_name(name)
        .ok_or_else(|| ApiError::bad_request(format!("`status` must be one of {}", machine::STATUS_NAMES.join(", "))))
}

/// A time parameter: RFC 3339 (`2026-12-07T10:00:00Z`, fractions and offsets allowed).
fn time_param(name: &str, text: &str) -> Result<machine::Millis, ApiError> {
    machine::parse_timestamp(text)
        .ok_or_else(|| ApiError::bad_request(format!("`{name}` must be an RFC 3339 time, like 2026-12-07T10:00:00Z")))
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
    let of_workflow = |status| RunQuery { workflow: Some(id), status, before: None, limit: 20 };
    for status in Status::ALL.into_iter().filter(|s| !s.is_terminal()) {
        active.extend(engine.list_runs(of_workflow(Some(status))).await?);
    }
    active.sort_by_key(|r| std::cmp::Reverse(r.uuid));
    let recent = engine.list_runs(of_workflow(None)).await?;
    // Every status, counted or not: the stores only report the ones they saw.
    let mut counts: serde_json::Map<String, Value> =
        machine::STATUS_NAMES.iter().map(|status| ((*status).to_owned(), json!(0))).collect();
    for (status, count) in engine.count_runs(id).await? {
        counts.insert(status.name().to_owned(), json!(count));
    }
    ok_json(
        StatusCode::OK,
        json!({
            "workflowId": id,
            "description": workflow.def.description,
            "schedule": workflow.def.schedule,
            "nextRunAt": engine.next_fire(workflow).map(views::timestamp),
            "nextFires": engine.next_fires(workflow, 5).into_iter().map(views::timestamp).collect::<Vec<_>>(),
            "paused": engine.is_paused(id),
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
    let (events, cut_short) = bounded(listed.iter().map(|e| (e.entry.id.as_str(), views::event(e))));
    let next_cursor =
        if cut_short || listed.len() == limit { events.last().map(|(id, _)| id.to_owned()) } else { None };
    let events: Vec<Value> = events.into_iter().map(|(_, event)| event).collect();
    ok_json(StatusCode::OK, json!({ "events": events, "nextCursor": next_cursor }))
}

/// About the most a listing of bus entries answers: each entry is cut to size already
/// (`LISTED_ENTRY_CAP`), and a page stops before it would pass this (the cursor goes on).
const LISTING_BUDGET: usize = 1024 * 1024;

/// The items of a listing that fit in [`LISTING_BUDGET`] (at least one), and whether some did
/// not.
fn bounded<'a>(items: impl Iterator<Item = (&'a str, Value)>) -> (Vec<(&'a str, Value)>, bool) {
    let mut kept = Vec::new();
    let mut size = 0;
    for (id, item) in items {
        size += item.to_string().len() + 1;
        if size > LISTING_BUDGET && !kept.is_empty() {
            return (kept, true);
        }
        kept.push((id, item));
    }
    (kept, false)
}

/// `GET /api/events/dead`: the bus's dead letters, newest first, each with its reason.
async fn list_dead_events(engine: &Engine, query: Option<&str>) -> Answer {
    let params = query_params(query, &["limit", "before"])?;
    let limit = limit_param(&params, 50, 500)?;
    let before = params.get("before").map(String::as_str);
    if let Some(before) = before {
        match entry_id(before) {
            Some((0, 0)) => return ok_json(StatusCode::OK, json!({ "deadLetters": [], "nextCursor": null })),
            Some(_) => {}
            None => return Err(ApiError::bad_request("`before` must be a dead letter id such as `1700000000000-0`")),
        }
    }
    let dead = engine.dead_events(before, limit).await?;
    let (letters, cut_short) = bounded(dead.iter().map(|entry| (entry.id.as_str(), views::dead_letter(entry))));
    let next_cursor = if cut_short || dead.len() == limit { letters.last().map(|(id, _)| id.to_owned()) } else { None };
    let letters: Vec<Value> = letters.into_iter().map(|(_, letter)| letter).collect();
    ok_json(StatusCode::OK, json!({ "deadLetters": letters, "nextCursor": next_cursor }))
}

async fn publish_event(engine: &Engine, request: Request<Incoming>) -> Answer {
    let caller = caller_trace(request.headers());
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
    let published =
        engine.publish_event_traced(&event_type, &payload, key.as_deref(), source.as_deref(), caller.as_ref()).await?;
    match published {
        Ok(event_id) => ok_json(StatusCode::ACCEPTED, json!({ "eventId": event_id, "eventType": event_type })),
        Err(problem) => Err(ApiError::bad_request(problem)),
    }
}

/// How far an Inngest signature's timestamp may be from now.
const INNGEST_SIGNATURE_SKEW_SECS: u64 = 300;
/// How long a signature is remembered as seen: as long as it can be accepted (its timestamp
/// up to the skew either side of now), plus a margin.
const INNGEST_SIGNATURE_MEMORY: Duration = Duration::from_secs(2 * INNGEST_SIGNATURE_SKEW_SECS + 60);

/// `POST /api/webhooks/inngest`: a signed callback from Inngest (`X-Inngest-Signature:
/// t=<unix seconds>&s=<hex HMAC-SHA256 of body + t>`, keyed with `INNGEST_SIGNING_KEY` without
/// its `signkey-<env>-` prefix), published onto the bus: `{"name": "rayanava/leads.scored",
/// "data": {...}}` becomes an event of type `rayanava.leads.scored` with `data` as its payload.
///
/// Anyone can reach it, so everything that costs memory waits for the cheap checks: the
/// header's shape and age first, then a small body (64 KiB) read by at most
/// [`MAX_UNAUTHENTICATED_BODIES`] requests at once within [`BODY_READ_TIMEOUT`]. A signature
/// already seen (in the store, so on any replica) is a replay: 200 `duplicate: true`, nothing
/// published.
async fn inngest_webhook(state: &ApiState, request: Request<Incoming>) -> Answer {
    let engine = &state.engine;
    use subtle::ConstantTimeEq;
    let Some(key) = state.inngest_signing_key.clone() else {
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
    let Ok(_reading) = state.unauthenticated_bodies.try_acquire() else {
        let mut busy = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            format!("{MAX_UNAUTHENTICATED_BODIES} webhook requests are being read already; retry shortly"),
        );
        busy.retry_after = Some(1);
        return Err(busy);
    };
    let bytes = read_body(request, WEBHOOK_MAX_BODY_BYTES).await?;
    // The body is in: what the bound protects (memory held by senders not yet authenticated)
    // is no longer at stake, and a slow store must not keep verified callbacks out.
    drop(_reading);
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
    let seen = format!("inngest-signature:{}", signature.to_ascii_lowercase());
    if !engine.mark_seen(&seen, INNGEST_SIGNATURE_MEMORY).await? {
        return ok_json(StatusCode::OK, json!({ "eventType": event_type, "duplicate": true }));
    }
    let published = engine.publish_event(&event_type, &payload, key.as_deref(), Some("inngest")).await;
    if published.is_err() {
        // Not published: the sender's retry of the same signed callback must not be taken for
        // a replay. (If taking the mark back fails too, the callback answers 503 either way.)
        let _ = engine.forget_seen(&seen).await;
    }
    match published? {
        Ok(event_id) => {
            ok_json(StatusCode::ACCEPTED, json!({ "eventId": event_id, "eventType": event_type, "duplicate": false }))
        }
        Err(problem) => Err(ApiError::bad_request(problem)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| (hyper::header::HeaderName::from_static(k), HeaderValue::from_str(v).unwrap()))
            .collect()
    }

    #[test]
    fn host_names_lose_their_port_and_brackets() {
        assert_eq!(host_name("localhost:5003"), Some("localhost"));
        assert_eq!(host_name("example.com"), Some("example.com"));
        assert_eq!(host_name("[::1]:5003"), Some("::1"));
        assert_eq!(host_name("[::1]"), Some("::1"));
        assert_eq!(host_name("[::1]x"), None);
        assert_eq!(host_name("a:b"), None);
        assert_eq!(host_name(":80"), None);
    }

    #[test]
    fn only_loopback_ip_and_allowed_hosts_pass_without_a_token() {
        let allowed = vec!["gateway".to_owned()];
        for ok in
            ["localhost", "localhost:1", "api.localhost", "127.0.0.1:5003", "[::1]:5003", "10.0.0.5", "Gateway:80"]
        {
            assert!(check_host(&headers(&[("host", ok)]), &allowed).is_ok(), "{ok}");
        }
        for refused in ["evil.example", "localhost.evil.example", "gateway.evil", "1.2.3.4.evil"] {
            let err = check_host(&headers(&[("host", refused)]), &allowed).unwrap_err();
            assert_eq!(err.status, StatusCode::MISDIRECTED_REQUEST, "{refused}");
        }
        assert!(check_host(&HeaderMap::new(), &allowed).is_ok(), "no Host: not a browser");
    }

    #[test]
    fn a_state_changing_request_must_come_from_the_same_origin_or_no_browser() {
        let host = ("host", "127.0.0.1:5003");
        for ok in [
            vec![host],
            vec![host, ("origin", "http://127.0.0.1:5003")],
            vec![("host", "api.example.com"), ("origin", "https://api.example.com")],
            vec![("host", "api.example.com:443"), ("origin", "https://api.example.com")],
            vec![host, ("sec-fetch-site", "same-origin")],
            vec![host, ("sec-fetch-site", "none")],
        ] {
            assert!(check_same_origin(&headers(&ok)).is_ok(), "{ok:?}");
        }
        for refused in [
            vec![host, ("origin", "http://evil.example")],
            vec![host, ("origin", "http://127.0.0.1:5004")],
            vec![host, ("origin", "null")],
            vec![host, ("origin", "http://127.0.0.1:5003/path")],
            vec![host, ("sec-fetch-site", "cross-site")],
            vec![host, ("sec-fetch-site", "same-site")],
            vec![("origin", "http://127.0.0.1:5003")],
        ] {
            let err = check_same_origin(&headers(&refused)).unwrap_err();
            assert_eq!((err.status, err.code), (StatusCode::FORBIDDEN, "cross_origin"), "{refused:?}");
        }
    }

    #[test]
    fn posts_must_say_json() {
        assert!(require_json_content_type(&headers(&[("content-type", "application/json; charset=utf-8")])).is_ok());
        assert!(require_json_content_type(&headers(&[("content-type", "Application/JSON")])).is_ok());
        for refused in [vec![], vec![("content-type", "text/plain")], vec![("content-type", "application/jsonx")]] {
            assert_eq!(
                require_json_content_type(&headers(&refused)).unwrap_err().status,
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            );
        }
    }
}
