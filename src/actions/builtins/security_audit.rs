//! `security_audit`: the security-audit workflow's checks, each a finding by severity.
//!
//! - For each `https` URL of `urls`: a TLS handshake (rustls) reads the peer certificate's
//!   `notAfter` (x509-parser). Expired, or a chain that does not verify against the trusted roots
//!   (Mozilla's, plus the system's or `SSL_CERT_FILE`'s): critical; expiring within
//!   `cert_warn_days` (default 21): warning.
//! - For each URL: a GET, and a warning per missing security header: `Strict-Transport-Security`
//!   (https only), `X-Content-Type-Options: nosniff`, `X-Frame-Options` or a CSP with
//!   `frame-ancestors`, `Content-Security-Policy`. (The GET does not judge the certificate: the
//!   TLS check does that, and the headers are checked either way.)
//! - The store ([`crate::actions::Services::store_report`]): Redis without authentication is a
//!   warning; a setting that lets Redis evict keys is critical.
//! - The newest file in `backup_dir` older than `backup_max_age` (default 26h), or none: critical.
//!
//! Output: `{"findings": [{"severity", "check", "target", "message"}], "counts": {"critical",
//! "warning", "info"}, "total", "severity": the highest or null, "checked": {...}}`, findings
//! ordered by severity, critical first.

use crate::actions::{ActionError, Builtin, BuiltinCall};
use async_trait::async_trait;
use futures::StreamExt;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_rustls::rustls;
use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// Most URLs one audit checks.
const MAX_URLS: usize = 50;
/// URLs checked at once.
const URL_CONCURRENCY: usize = 4;
/// Connecting, the TLS handshake, the GET: each bounded by this.
const NETWORK_TIMEOUT: Duration = Duration::from_secs(15);
/// Most directory entries looked at in `backup_dir`.
const MAX_BACKUP_ENTRIES: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Critical,
    Warning,
    Info,
}

impl Severity {
    pub fn name(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub check: &'static str,
    pub target: String,
    pub message: String,
}

impl Finding {
    fn new(severity: Severity, check: &'static str, target: &str, message: impl Into<String>) -> Finding {
        Finding { severity, check, target: target.to_owned(), message: message.into() }
    }

    fn to_json(&self) -> Value {
        json!({ "severity": self.severity.name(), "check": self.check, "target": self.target, "message": self.message })
    }
}

pub struct SecurityAudit;

#[async_trait]
impl Builtin for SecurityAudit {
    fn name(&self) -> &'static str {
        "security_audit"
    }

    fn operator_params(&self) -> &'static [&'static str] {
        &["urls", "backup_dir"]
    }

    async fn run(&self, call: BuiltinCall<'_>) -> Result<Value, ActionError> {
        let cancel = call.cancel.clone();
        tokio::select! {
            output = audit(&call) => output,
            () = cancel.cancelled() => Err(ActionError::retryable("security audit: cancelled")),
        }
    }
}

async fn audit(call: &BuiltinCall<'_>) -> Result<Value, ActionError> {
    let warn_days = call.number_or("cert_warn_days", 21)?;
    let backup_max_age = call.duration_or("backup_max_age", Duration::from_secs(26 * 3600))?;
    let backup_dir = match call.text("backup_dir") {
        Ok(_) => Some(call.directory("backup_dir")?.display().to_string()),
        Err(_) => None,
    };
    let mut urls = call.list("urls");
    let mut findings = Vec::new();
    if urls.len() > MAX_URLS {
        findings.push(Finding::new(
            Severity::Info,
            "configuration",
            "urls",
            format!("{} URLs configured; only the first {MAX_URLS} were checked", urls.len()),
        ));
        urls.truncate(MAX_URLS);
    }

    let tls = Tls::new();
    // The certificate is judged by the TLS check; the GET only reads the headers.
    let client = reqwest::Client::builder()
        .user_agent(concat!("workflow-orchestrator/", env!("CARGO_PKG_VERSION"), " security-audit"))
        .danger_accept_invalid_certs(true)
        .redirect(reqwest::redirect::Policy::limited(5))
        .connect_timeout(NETWORK_TIMEOUT)
        .timeout(NETWORK_TIMEOUT)
        .build()
        .map_err(|err| ActionError::fatal(format!("security audit: an HTTP client: {err}")))?;
    let now = unix_now();
    // Built first: a closure inside the stream would be held across the await, which the
    // `Send` check of async-trait cannot see through.
    let checks: Vec<_> = urls.iter().map(|url| check_url(url, &tls, &client, now, warn_days)).collect();
    let checked: Vec<(Vec<Finding>, Value)> = futures::stream::iter(checks).buffered(URL_CONCURRENCY).collect().await;
    let mut checked_urls = Vec::new();
    for (url_findings, summary) in checked {
        findings.extend(url_findings);
        checked_urls.push(summary);
    }

    let store = match call.services.store_report().await {
        Ok(report) => {
            findings.extend(store_findings(&report));
            report
        }
        Err(err) => {
            findings.push(Finding::new(
                Severity::Warning,
                "store",
                "store",
                format!("could not read the store's settings: {err}"),
            ));
            Value::Null
        }
    };

    let backup = match &backup_dir {
        None => {
            findings.push(Finding::new(
                Severity::Info,
                "backup",
                "backup_dir",
                "no backup directory configured (BACKUP_DIR): the last backup's age was not checked",
            ));
            Value::Null
        }
        Some(dir) => {
            let dir = dir.clone();
            let newest = tokio::task::spawn_blocking(move || newest_backup(Path::new(&dir))).await.map_err(|err| {
                ActionError::retryable(format!("security audit: reading the backup directory: {err}"))
            })?;
            let dir = backup_dir.as_deref().unwrap_or_default();
            let (finding, summary) = backup_finding(dir, newest, SystemTime::now(), backup_max_age);
            findings.extend(finding);
            summary
        }
    };

    Ok(report(findings, json!({ "urls": checked_urls, "store": store, "backup": backup })))
}

/// The output: findings by severity, their counts, the highest severity.
fn report(mut findings: Vec<Finding>, checked: Value) -> Value {
    findings.sort_by_key(|f| f.severity);
    let count = |severity: Severity| findings.iter().filter(|f| f.severity == severity).count();
    json!({
        "findings": findings.iter().map(Finding::to_json).collect::<Vec<_>>(),
        "counts": {
            "critical": count(Severity::Critical),
            "warning": count(Severity::Warning),
            "info": count(Severity::Info),
        },
        "total": findings.len(),
        "severity": findings.first().map(|f| f.severity.name()),
        "checked": checked,
    })
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

fn rfc3339(secs: i64) -> String {
    chrono::DateTime::from_timestamp(secs, 0).map_or_else(|| secs.to_string(), |t| t.to_rfc3339())
}

/// Checks one URL: its certificate (https) and its security headers.
async fn check_url(url: &str, tls: &Tls, client: &reqwest::Client, now: i64, warn_days: u64) -> (Vec<Finding>, Value) {
    let mut findings = Vec::new();
    let parsed = match reqwest::Url::parse(url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") && parsed.host_str().is_some() => parsed,
        _ => {
            // Shown masked: a configured URL's query may carry a secret.
            let shown = super::bounded_http::redacted(url);
            findings.push(Finding::new(Severity::Warning, "configuration", &shown, "not an http(s) URL: not checked"));
            return (findings, json!({ "url": shown, "checked": false }));
        }
    };
    // Named without the query string, which may carry a secret.
    let target = format!("{}{}", parsed.origin().ascii_serialization(), parsed.path());
    let https = parsed.scheme() == "https";
    let mut certificate = Value::Null;
    if https {
        match tls.certificate(&parsed).await {
            Ok(cert) => {
                findings.extend(certificate_finding(&target, &cert, now, warn_days));
                certificate = json!({
                    "subject": cert.subject,
                    "notAfter": rfc3339(cert.not_after),
                    "daysLeft": (cert.not_after - now).div_euclid(86_400),
                    "chainValid": cert.chain_error.is_none(),
                });
            }
            Err(TlsProblem::Unreachable(problem)) => findings.push(Finding::new(
                Severity::Warning,
                "tls-certificate",
                &target,
                format!("could not connect to check the certificate: {problem}"),
            )),
            Err(TlsProblem::Handshake(problem)) => findings.push(Finding::new(
                Severity::Critical,
                "tls-certificate",
                &target,
                format!("the TLS handshake failed: {problem}"),
            )),
        }
    } else {
        findings.push(Finding::new(
            Severity::Info,
            "tls-certificate",
            &target,
            "served over plain http: no certificate to check",
        ));
    }
    let status = match client.get(parsed.clone()).send().await {
        Ok(response) => {
            let headers = response.headers();
            let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
            for message in missing_headers(get, https) {
                findings.push(Finding::new(Severity::Warning, "security-headers", &target, message));
            }
            json!(response.status().as_u16())
        }
        Err(err) => {
            findings.push(Finding::new(
                Severity::Warning,
                "security-headers",
                &target,
                format!("could not GET the URL to check its headers: {}", without_url(&err)),
            ));
            Value::Null
        }
    };
    (findings, json!({ "url": target, "status": status, "certificate": certificate }))
}

/// What is wrong with a response's security headers, one message per missing header.
/// `get` looks a header up by name (case-insensitively).
pub fn missing_headers(get: impl Fn(&str) -> Option<String>, https: bool) -> Vec<String> {
    let mut missing = Vec::new();
    if https {
        match get("strict-transport-security") {
            None => missing.push("no Strict-Transport-Security header".to_owned()),
            Some(value) if value.to_ascii_lowercase().replace(' ', "").contains("max-age=0") => {
                missing.push("Strict-Transport-Security has max-age=0 (HSTS disabled)".to_owned())
            }
            Some(_) => {}
        }
    }
    match get("x-content-type-options") {
        Some(value) if value.trim().eq_ignore_ascii_case("nosniff") => {}
        Some(value) => missing.push(format!("X-Content-Type-Options is `{}`, not `nosniff`", value.trim())),
        None => missing.push("no X-Content-Type-Options header".to_owned()),
    }
    let csp = get("content-security-policy");
    let frame_ancestors = csp.as_deref().is_some_and(|csp| csp.to_ascii_lowercase().contains("frame-ancestors"));
    if get("x-frame-options").is_none() && !frame_ancestors {
        missing.push("neither an X-Frame-Options header nor a CSP frame-ancestors directive (clickjacking)".to_owned());
    }
    if csp.is_none() {
        missing.push("no Content-Security-Policy header".to_owned());
    }
    missing
}

/// What the handshake showed of a server's certificate.
#[derive(Debug, Clone)]
pub struct Certificate {
    pub subject: String,
    /// `notAfter`, in seconds since the Unix epoch.
    pub not_after: i64,
    /// Why the chain does not verify, if it does not.
    pub chain_error: Option<String>,
}

/// The finding a certificate comes to, if any: expired or not verifying is critical, expiring
/// within `warn_days` a warning.
pub fn certificate_finding(target: &str, cert: &Certificate, now: i64, warn_days: u64) -> Option<Finding> {
    let finding = |severity, message: String| Some(Finding::new(severity, "tls-certificate", target, message));
    let until = rfc3339(cert.not_after);
    if cert.not_after <= now {
        let days = (now - cert.not_after).div_euclid(86_400);
        return finding(Severity::Critical, format!("the certificate expired on {until} ({days} days ago)"));
    }
    if let Some(problem) = &cert.chain_error {
        return finding(Severity::Critical, format!("the certificate does not verify: {problem}"));
    }
    let left = cert.not_after - now;
    if left < warn_days as i64 * 86_400 {
        let days = left.div_euclid(86_400);
        return finding(
            Severity::Warning,
            format!("the certificate expires on {until}, in {days} days (warning at {warn_days})"),
        );
    }
    None
}

/// The findings of the store's report (`{"kind", "authenticated", "warnings"}`).
pub fn store_findings(report: &Value) -> Vec<Finding> {
    let mut findings = Vec::new();
    let kind = report.get("kind").and_then(Value::as_str).unwrap_or("unknown");
    if kind == "memory" {
        findings.push(Finding::new(
            Severity::Info,
            "store",
            kind,
            "the embedded in-memory store: runs do not survive a restart (set REDIS_URL)",
        ));
    } else if report.get("authenticated") != Some(&Value::Bool(true)) {
        findings.push(Finding::new(
            Severity::Warning,
            "store",
            kind,
            "the store connection does not authenticate (no password in REDIS_URL)",
        ));
    }
    for warning in report.get("warnings").and_then(Value::as_array).into_iter().flatten() {
        let Some(text) = warning.as_str() else { continue };
        let lower = text.to_ascii_lowercase();
        // A setting that evicts is critical; one that could not be read, a warning.
        let unverified = lower.contains("cannot") || lower.contains("could not");
        let severity = if lower.contains("evict") && !unverified { Severity::Critical } else { Severity::Warning };
        findings.push(Finding::new(severity, "store", kind, text));
    }
    findings
}

/// The newest backup of a directory.
#[derive(Debug, Clone, PartialEq)]
pub enum Newest {
    File { name: String, modified: SystemTime },
    None,
    Unreadable(String),
}

/// The newest regular file of `dir` (not hidden, not a partial `.tmp`/`.part` file).
pub fn newest_backup(dir: &Path) -> Newest {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) => return Newest::Unreadable(err.to_string()),
    };
    let mut newest: Option<(String, SystemTime)> = None;
    for entry in entries.take(MAX_BACKUP_ENTRIES).flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || [".tmp", ".part", ".partial"].iter().any(|s| name.ends_with(s)) {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        let Ok(modified) = meta.modified() else { continue };
        if meta.is_file() && newest.as_ref().is_none_or(|(_, at)| modified > *at) {
            newest = Some((name, modified));
        }
    }
    match newest {
        Some((name, modified)) => Newest::File { name, modified },
        None => Newest::None,
    }
}

/// The finding the newest backup comes to (critical when missing or too old), and a summary.
pub fn backup_finding(dir: &str, newest: Newest, now: SystemTime, max_age: Duration) -> (Option<Finding>, Value) {
    let limit = crate::definition::format_duration(max_age);
    let critical = |message: String| Some(Finding::new(Severity::Critical, "backup", dir, message));
    match newest {
        Newest::Unreadable(problem) => {
            (critical(format!("the backup directory cannot be read: {problem}")), json!({ "dir": dir }))
        }
        Newest::None => (critical("the backup directory holds no backup".to_owned()), json!({ "dir": dir })),
        Newest::File { name, modified } => {
            let age = now.duration_since(modified).unwrap_or_default();
            let age_text = crate::definition::format_duration(Duration::from_secs(age.as_secs()));
            let summary = json!({ "dir": dir, "newest": name, "ageSeconds": age.as_secs() });
            if age > max_age {
                (critical(format!("the newest backup, {name}, is {age_text} old (limit {limit})")), summary)
            } else {
                (None, summary)
            }
        }
    }
}

enum TlsProblem {
    Unreachable(String),
    Handshake(String),
}

/// The roots and crypto for reading certificates.
struct Tls {
    provider: Arc<rustls::crypto::CryptoProvider>,
    roots: Arc<rustls::RootCertStore>,
}

impl Tls {
    fn new() -> Tls {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        // The system's roots, or SSL_CERT_FILE / SSL_CERT_DIR's: a private CA is trusted there.
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        Tls { provider: Arc::new(rustls::crypto::ring::default_provider()), roots: Arc::new(roots) }
    }

    /// Connects and reads the peer's certificate, recording whether its chain verifies.
    async fn certificate(&self, url: &reqwest::Url) -> Result<Certificate, TlsProblem> {
        let host = url.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = url.port_or_known_default().unwrap_or(443);
        let name = ServerName::try_from(host.clone())
            .map_err(|err| TlsProblem::Handshake(format!("`{host}` is not a server name: {err}")))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::clone(&self.roots),
            Arc::clone(&self.provider),
        )
        .build()
        .map_err(|err| TlsProblem::Handshake(format!("no certificate verifier: {err}")))?;
        let recording = Arc::new(Recording { inner, verdict: std::sync::Mutex::new(None) });
        let config = rustls::ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_safe_default_protocol_versions()
            .map_err(|err| TlsProblem::Handshake(err.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(recording.clone())
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = tokio::time::timeout(NETWORK_TIMEOUT, tokio::net::TcpStream::connect((host.as_str(), port)))
            .await
            .map_err(|_| TlsProblem::Unreachable("connecting timed out".to_owned()))?
            .map_err(|err| TlsProblem::Unreachable(err.to_string()))?;
        let stream = tokio::time::timeout(NETWORK_TIMEOUT, connector.connect(name, tcp))
            .await
            .map_err(|_| TlsProblem::Handshake("the handshake timed out".to_owned()))?
            .map_err(|err| TlsProblem::Handshake(err.to_string()))?;
        let (_, connection) = stream.get_ref();
        let der = connection
            .peer_certificates()
            .and_then(|certs| certs.first())
            .ok_or_else(|| TlsProblem::Handshake("the server sent no certificate".to_owned()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|err| TlsProblem::Handshake(format!("the certificate does not parse: {err}")))?;
        let chain_error = match recording.verdict.lock().map(|v| v.clone()) {
            Ok(Some(verdict)) => verdict,
            _ => Some("the certificate was not verified".to_owned()),
        };
        Ok(Certificate {
            subject: cert.subject().to_string(),
            not_after: cert.validity().not_after.timestamp(),
            chain_error,
        })
    }
}

/// Verifies the server's certificate with webpki but lets the handshake go on either way,
/// recording the verdict, so that an invalid certificate's dates can still be read. The
/// handshake's signatures are still verified.
#[derive(Debug)]
struct Recording {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    /// `Some(None)`: verified; `Some(Some(problem))`: not.
    verdict: std::sync::Mutex<Option<Option<String>>>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .err()
            .map(|err| err.to_string());
        if let Ok(mut slot) = self.verdict.lock() {
            *slot = Some(verdict);
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
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

    const DAY: i64 = 86_400;

    fn cert(not_after: i64, chain_error: Option<&str>) -> Certificate {
        Certificate { subject: "CN=test".to_owned(), not_after, chain_error: chain_error.map(str::to_owned) }
    }

    #[test]
    fn certificates_are_judged_by_their_not_after_and_chain() {
        let now = 1_800_000_000;
        let judge = |c: &Certificate| certificate_finding("https://x", c, now, 21).map(|f| (f.severity, f.message));
        assert_eq!(judge(&cert(now + 90 * DAY, None)), None);
        let (severity, message) = judge(&cert(now + 5 * DAY + 10, None)).unwrap();
        assert_eq!(severity, Severity::Warning);
        assert!(message.contains("in 5 days"), "{message}");
        // Just inside and just outside the warning window.
        assert_eq!(judge(&cert(now + 21 * DAY - 1, None)).unwrap().0, Severity::Warning);
        assert_eq!(judge(&cert(now + 21 * DAY, None)), None);
        let (severity, message) = judge(&cert(now - 2 * DAY, Some("expired"))).unwrap();
        assert_eq!(severity, Severity::Critical);
        assert!(message.contains("expired on") && message.contains("2 days ago"), "{message}");
        assert_eq!(judge(&cert(now, None)).unwrap().0, Severity::Critical);
        let (severity, message) = judge(&cert(now + 90 * DAY, Some("UnknownIssuer"))).unwrap();
        assert_eq!(severity, Severity::Critical);
        assert!(message.contains("UnknownIssuer"), "{message}");
    }

    #[test]
    fn a_missing_security_header_is_one_warning_each() {
        let none = |_: &str| None;
        assert_eq!(missing_headers(none, false).len(), 3);
        assert_eq!(missing_headers(none, true).len(), 4);
        let all = |name: &str| {
            Some(
                match name {
                    "strict-transport-security" => "max-age=31536000",
                    "x-content-type-options" => "nosniff",
                    "content-security-policy" => "default-src 'self'; frame-ancestors 'none'",
                    _ => return None,
                }
                .to_owned(),
            )
        };
        assert_eq!(missing_headers(all, true), Vec::<String>::new());
        let weak = |name: &str| match name {
            "strict-transport-security" => Some("max-age=0".to_owned()),
            "x-content-type-options" => Some("sniff-away".to_owned()),
            "x-frame-options" => Some("DENY".to_owned()),
            _ => None,
        };
        let missing = missing_headers(weak, true);
        assert_eq!(missing.len(), 3, "{missing:?}");
        assert!(
            missing[0].contains("max-age=0")
                && missing[1].contains("sniff-away")
                && missing[2].contains("Content-Security-Policy")
        );
    }

    #[test]
    fn the_store_is_judged_by_authentication_and_eviction() {
        let findings = store_findings(&json!({
            "kind": "redis",
            "authenticated": false,
            "warnings": [
                "Redis maxmemory-policy is `allkeys-lru`: Redis may evict keys and silently lose runs; set `noeviction`",
                "CONFIG GET is not allowed: cannot check that maxmemory-policy is `noeviction`",
            ],
        }));
        let severities: Vec<Severity> = findings.iter().map(|f| f.severity).collect();
        assert_eq!(severities, [Severity::Warning, Severity::Critical, Severity::Warning]);
        assert!(store_findings(&json!({ "kind": "redis", "authenticated": true, "warnings": [] })).is_empty());
        assert_eq!(
            store_findings(&json!({ "kind": "memory", "authenticated": false, "warnings": [] }))[0].severity,
            Severity::Info
        );
    }

    #[test]
    fn the_newest_backup_must_be_younger_than_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().display().to_string();
        let limit = Duration::from_secs(26 * 3600);
        assert_eq!(newest_backup(dir.path()), Newest::None);
        assert_eq!(
            backup_finding(&path, Newest::None, SystemTime::now(), limit).0.unwrap().severity,
            Severity::Critical
        );
        let now = SystemTime::now();
        for (name, age_hours) in [("old.dump", 50), ("newer.dump", 30), (".hidden", 1), ("writing.dump.tmp", 1)] {
            let file = std::fs::File::create(dir.path().join(name)).unwrap();
            file.set_modified(now - Duration::from_secs(age_hours * 3600)).unwrap();
        }
        let newest = newest_backup(dir.path());
        assert!(matches!(&newest, Newest::File { name, .. } if name == "newer.dump"), "{newest:?}");
        let (finding, summary) = backup_finding(&path, newest, now, limit);
        let finding = finding.unwrap();
        assert_eq!(finding.severity, Severity::Critical);
        assert!(finding.message.contains("newer.dump") && finding.message.contains("1day 6h"), "{}", finding.message);
        assert_eq!(summary["newest"], "newer.dump");
        let file = std::fs::File::create(dir.path().join("fresh.dump")).unwrap();
        file.set_modified(now - Duration::from_secs(3600)).unwrap();
        assert_eq!(backup_finding(&path, newest_backup(dir.path()), now, limit).0, None);
        let missing = dir.path().join("nope");
        assert!(matches!(newest_backup(&missing), Newest::Unreadable(_)));
    }

    #[test]
    fn the_report_orders_findings_and_counts_them() {
        let findings = vec![
            Finding::new(Severity::Info, "a", "t", "i"),
            Finding::new(Severity::Warning, "b", "t", "w"),
            Finding::new(Severity::Critical, "c", "t", "c"),
        ];
        let out = report(findings, json!({}));
        assert_eq!(out["total"], 3);
        assert_eq!(out["severity"], "critical");
        assert_eq!(out["counts"], json!({ "critical": 1, "warning": 1, "info": 1 }));
        assert_eq!(out["findings"][0]["check"], "c");
        assert_eq!(report(Vec::new(), json!({}))["severity"], Value::Null);
    }
}
