//! The dashboard: a small single-page app served at `/ui` from assets compiled into the binary
//! (`src/api/ui/`), and its sessions.
//!
//! Every `/ui/...` path answers the same page (the app routes in the browser); the page and its
//! assets hold no run data, so they are served to anyone; the data comes from the API, which
//! needs the token. With `API_TOKEN` set, `POST /ui/login` trades the token for a session
//! cookie the API accepts in place of the `Authorization` header: `HttpOnly` (no script reads
//! it), `SameSite=Strict` (no other site's page makes the browser send it), signed with
//! HMAC-SHA256 under a key derived from the token (changing the token ends every session), and
//! expiring ([`SESSION_TTL`], the expiry inside the signed value). Cross-site requests that
//! would act with it are refused anyway by the API's origin and content-type checks.

use super::{Answer, ApiError, ApiState, Payload, authorize, object_body, ok_json};
use hmac::{Hmac, Mac};
use hyper::body::Incoming;
use hyper::header::{COOKIE, HeaderMap};
use hyper::{Request, StatusCode};
use serde_json::{Value, json};
use sha2::Sha256;

/// The page, its script and its style sheet.
pub const INDEX_HTML: &str = include_str!("ui/index.html");
pub const APP_JS: &str = include_str!("ui/app.js");
pub const APP_CSS: &str = include_str!("ui/app.css");

/// What the page may load and do: its own script and style only, requests to this origin only,
/// never framed.
pub const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";
/// For everything else (JSON, text): nothing at all, never framed.
pub const API_POLICY: &str = "default-src 'none'; frame-ancestors 'none'";

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "wfo_session";
/// How long a session lasts.
pub const SESSION_TTL: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

/// An asset by its file name under `/ui/assets/`.
pub fn asset(name: &str) -> Option<(&'static str, &'static str)> {
    match name {
        "app.js" => Some(("text/javascript; charset=utf-8", APP_JS)),
        "app.css" => Some(("text/css; charset=utf-8", APP_CSS)),
        _ => None,
    }
}

type HmacSha256 = Hmac<Sha256>;

/// The key sessions are signed with, derived from the token (never the token itself, so that a
/// signature reveals nothing usable as a bearer token).
fn session_key(token: &str) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(token.as_bytes()).expect("HMAC takes any key length");
    mac.update(b"workflow-orchestrator dashboard session key v1");
    mac.finalize().into_bytes().to_vec()
}

fn signature(token: &str, payload: &str) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(&session_key(token)).expect("HMAC takes any key length");
    mac.update(payload.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// A new session value: `v1.<expiry ms>.<nonce>.<signature>`, all but the signature signed.
pub fn new_session(token: &str, now: u64) -> String {
    let expires = now + SESSION_TTL.as_millis() as u64;
    let nonce = hex::encode(rand::random::<[u8; 12]>());
    let payload = format!("v1.{expires}.{nonce}");
    format!("{payload}.{}", hex::encode(signature(token, &payload)))
}

/// Whether `value` is a session signed under `token` that has not expired at `now`.
pub fn valid_session(token: &str, value: &str, now: u64) -> bool {
    use subtle::ConstantTimeEq;
    let Some((payload, given)) = value.rsplit_once('.') else { return false };
    let Ok(given) = hex::decode(given) else { return false };
    let expected = signature(token, payload);
    if !bool::from(expected.as_slice().ct_eq(given.as_slice())) {
        return false;
    }
    let mut parts = payload.split('.');
    matches!(
        (parts.next(), parts.next().and_then(|e| e.parse::<u64>().ok()), parts.next(), parts.next()),
        (Some("v1"), Some(expires), Some(_), None) if now < expires
    )
}

/// The session cookie's values in a request's `Cookie` headers.
pub fn session_cookies(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|header| header.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| *name == SESSION_COOKIE)
        .map(|(_, value)| value.trim_matches('"'))
}

/// Whether the request carries a valid session under `token`.
pub fn has_session(headers: &HeaderMap, token: &str, now: u64) -> bool {
    session_cookies(headers).any(|value| valid_session(token, value, now))
}

/// The `Set-Cookie` value of a new session (`Secure` when the request came over HTTPS, as a
/// gateway says with `X-Forwarded-Proto`).
pub fn set_cookie(value: &str, secure: bool) -> String {
    format!(
        "{SESSION_COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        SESSION_TTL.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that ends a session.
pub fn clear_cookie() -> String {
    format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// `GET /ui/session`: whether the API needs a token and whether this request carries one (a
/// bearer header or a session), so that the dashboard knows to ask for it.
pub(super) fn session(state: &ApiState, request: &Request<Incoming>) -> Answer {
    let authenticated = match state.token.as_deref() {
        None => true,
        Some(_) => authorize(state.token.as_deref(), request, state.engine.now()).is_ok(),
    };
    ok_json(StatusCode::OK, json!({ "tokenRequired": state.token.is_some(), "authenticated": authenticated }))
}

/// `POST /ui/login` `{"token": "..."}`: the token for a session cookie (see `dashboard`). A
/// wrong token is 401; without `API_TOKEN` there is nothing to log in to, and it says so.
pub(super) async fn login(state: &ApiState, request: Request<Incoming>) -> Answer {
    use subtle::ConstantTimeEq;
    let secure = request
        .headers()
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|proto| proto.eq_ignore_ascii_case("https"));
    let mut body = object_body(request, &["token"]).await?;
    let given = match body.remove("token") {
        Some(Value::String(given)) => given,
        _ => return Err(ApiError::bad_request("the body is {\"token\": \"<API_TOKEN>\"}")),
    };
    let Some(token) = state.token.as_deref() else {
        return ok_json(StatusCode::OK, json!({ "tokenRequired": false, "authenticated": true }));
    };
    if !bool::from(given.trim().as_bytes().ct_eq(token.as_bytes())) {
        return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "the token is not valid"));
    }
    let session = new_session(token, state.engine.now());
    Ok((
        StatusCode::OK,
        Payload::Session(
            json!({ "tokenRequired": true, "authenticated": true, "expiresInSeconds": SESSION_TTL.as_secs() }),
            set_cookie(&session, secure),
        ),
    ))
}

/// `POST /ui/logout`: clears the session cookie.
pub(super) async fn logout(request: Request<Incoming>) -> Answer {
    object_body(request, &[]).await?;
    Ok((StatusCode::OK, Payload::Session(json!({ "authenticated": false }), clear_cookie())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn a_session_is_valid_until_it_expires_and_only_under_its_token() {
        let now = 1_700_000_000_000;
        let session = new_session("secret", now);
        assert!(valid_session("secret", &session, now));
        assert!(valid_session("secret", &session, now + SESSION_TTL.as_millis() as u64 - 1));
        assert!(!valid_session("secret", &session, now + SESSION_TTL.as_millis() as u64));
        assert!(!valid_session("other", &session, now));
        assert_ne!(new_session("secret", now), session, "each session has its own nonce");
    }

    #[test]
    fn a_tampered_session_is_refused() {
        let now = 1_700_000_000_000;
        let session = new_session("secret", now);
        let (payload, signature) = session.rsplit_once('.').unwrap();
        let later = payload.replacen(&(now + SESSION_TTL.as_millis() as u64).to_string(), "99999999999999", 1);
        assert!(!valid_session("secret", &format!("{later}.{signature}"), now));
        for garbage in ["", ".", "v1", "v1.1.2.zz", "secret", &format!("{payload}.")] {
            assert!(!valid_session("secret", garbage, now), "{garbage}");
        }
    }

    #[test]
    fn the_session_is_found_among_other_cookies() {
        let now = 1_700_000_000_000;
        let session = new_session("secret", now);
        let mut headers = HeaderMap::new();
        headers.insert(COOKIE, HeaderValue::from_str(&format!("a=b; {SESSION_COOKIE}={session}; c=d")).unwrap());
        assert!(has_session(&headers, "secret", now));
        assert!(!has_session(&headers, "other", now));
        assert!(!has_session(&HeaderMap::new(), "secret", now));
    }
}
