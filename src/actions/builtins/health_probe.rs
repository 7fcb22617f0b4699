//! `health_probe`: probes the configured service URLs (concurrently: status and latency) and,
//! where the Docker socket exists, the containers' states; with flap protection, so that one
//! slow answer does not page anyone.
//!
//! Parameters: `urls` (a list, or comma-separated), `docker_socket` (a path; skipped when empty
//! or when nothing is there), `timeout` (per URL, default `5s`), `flap_threshold` (consecutive
//! failures before a target counts as failing, default 2), `slow_ms` (an answer slower than this
//! is a failure, default 2000).
//!
//! A URL fails when it does not answer, answers other than 2xx, or answers slower than
//! `slow_ms`; a container fails when it is neither running nor exited with code 0; the Docker
//! socket fails when it exists but cannot be asked. Each target's consecutive failures are kept
//! in the shared value `health:<target>` (so every replica agrees); a target is `failing` once
//! they reach `flap_threshold`, and recovers on its first success.
//!
//! Output: `{"checks": [{"url", "status", "latencyMs", "ok", "error"?, "consecutiveFailures"}],
//! "containers": [{"name", "state", "status", "ok", "consecutiveFailures"}], "docker": {...},
//! "failing": [{"target", "reason", "consecutiveFailures"}], "alert": bool}`.

use super::bounded_http::{checked_url, read_body, redacted, send};
use crate::actions::{ActionError, Builtin, BuiltinCall, Services};
use async_trait::async_trait;
use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};

/// Most URLs one probe checks.
const MAX_URLS: usize = 200;
/// Bytes of a health answer read (to time the whole answer, not just its headers).
const MAX_HEALTH_BODY: usize = 64 * 1024;
/// Largest container list accepted from Docker.
const MAX_DOCKER_BODY: usize = 4 * 1024 * 1024;
/// Most containers reported.
const MAX_CONTAINERS: usize = 500;

pub struct HealthProbe;

/// One target's result before flap protection.
struct Probed {
    /// How the target is shown (a URL masked).
    target: String,
    /// What its failure count is kept under: the shown target, made distinct with a digest of
    /// the real URL when masking hid something (two URLs may differ only in a masked value).
    key: String,
    ok: bool,
    reason: Option<String>,
    view: Value,
}

#[async_trait]
impl Builtin for HealthProbe {
    fn name(&self) -> &'static str {
        "health_probe"
    }

    fn operator_params(&self) -> &'static [&'static str] {
        &["urls", "docker_socket"]
    }

    async fn run(&self, call: BuiltinCall<'_>) -> Result<Value, ActionError> {
        let urls = call.list("urls");
        if urls.len() > MAX_URLS {
            return Err(ActionError::fatal(format!("parameter `urls`: at most {MAX_URLS} URLs")));
        }
        let timeout = call.duration_or("timeout", Duration::from_secs(5))?;
        let threshold = call.number_or("flap_threshold", 2)?.max(1);
        let slow_ms = call.number_or("slow_ms", 2000)?;
        let socket = call.text_or("docker_socket", "");

        let probes = urls.iter().map(|url| probe_url(&call, url, timeout, slow_ms));
        let mut probed: Vec<Probed> = futures::future::join_all(probes).await;
        if call.cancel.is_cancelled() {
            return Err(ActionError::retryable("health probe: cancelled"));
        }

        let mut docker = json!({ "socket": socket, "checked": false });
        let socket_path = Path::new(&socket);
        if !socket.is_empty() && socket_path.exists() {
            docker["checked"] = json!(true);
            match docker_containers(socket_path, timeout).await {
                Ok(containers) => {
                    docker["containers"] = json!(containers.len());
                    probed.extend(containers.into_iter().take(MAX_CONTAINERS).map(container));
                }
                Err(problem) => {
                    docker["error"] = json!(problem);
                    probed.push(Probed {
                        target: format!("docker:{socket}"),
                        key: format!("docker:{socket}"),
                        ok: false,
                        reason: Some(problem),
                        view: Value::Null,
                    });
                }
            }
        } else if !socket.is_empty() {
            docker["skipped"] = json!("no Docker socket there");
        }

        let (mut checks, mut containers, mut failing) = (Vec::new(), Vec::new(), Vec::new());
        for Probed { target, key, ok, reason, mut view } in probed {
            let failures = track(call.services, &key, ok).await?;
            if failures >= threshold {
                failing.push(json!({
                    "target": target,
                    "reason": reason.clone().unwrap_or_default(),
                    "consecutiveFailures": failures,
                }));
            }
            if view.is_object() {
                view["consecutiveFailures"] = json!(failures);
                if target.starts_with("container:") {
                    containers.push(view);
                } else {
                    checks.push(view);
                }
            }
        }
        Ok(json!({
            "checks": checks,
            "containers": containers,
            "docker": docker,
            "failing": failing,
            "alert": !failing.is_empty(),
            "flapThreshold": threshold,
        }))
    }
}

/// Records a target's result in its shared failure count; returns the consecutive failures.
async fn track(services: &dyn Services, target: &str, ok: bool) -> Result<u64, ActionError> {
    let key = format!("health:{target}");
    let previous: u64 = services.get_value(&key).await?.and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    let failures = if ok { 0 } else { previous.saturating_add(1) };
    if failures != previous {
        services.set_value(&key, &failures.to_string()).await?;
    }
    Ok(failures)
}

async fn probe_url(call: &BuiltinCall<'_>, url: &str, timeout: Duration, slow_ms: u64) -> Probed {
    let shown = redacted(url);
    let key = if shown == url.trim() {
        shown.clone()
    } else {
        use sha2::Digest;
        format!("{shown}:{}", &hex::encode(sha2::Sha256::digest(url.trim().as_bytes()))[..16])
    };
    let failed = |status: Option<u16>, latency: Option<u64>, reason: String| Probed {
        target: shown.clone(),
        key: key.clone(),
        ok: false,
        reason: Some(reason.clone()),
        view: json!({ "url": shown, "status": status, "latencyMs": latency, "ok": false, "error": reason }),
    };
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
    let body = read_body(response, MAX_HEALTH_BODY, false, &what, &call.cancel).await;
    let latency = started.elapsed().as_millis() as u64;
    if let Err(err) = body {
        return failed(Some(status), Some(latency), err.message);
    }
    if !(200..300).contains(&status) {
        return failed(Some(status), Some(latency), format!("answered {status}"));
    }
    if latency > slow_ms {
        return failed(Some(status), Some(latency), format!("slow: {latency} ms (more than {slow_ms} ms)"));
    }
    Probed {
        target: shown.clone(),
        key,
        ok: true,
        reason: None,
        view: json!({ "url": shown, "status": status, "latencyMs": latency, "ok": true }),
    }
}

/// A container of Docker's list: fine when running, or exited with code 0.
fn container(entry: Value) -> Probed {
    let name = entry
        .get("Names")
        .and_then(|n| n.get(0))
        .and_then(Value::as_str)
        .map(|n| n.trim_start_matches('/').to_owned())
        .or_else(|| entry.get("Id").and_then(Value::as_str).map(|id| id.chars().take(12).collect()))
        .unwrap_or_else(|| "?".to_owned());
    let state = entry.get("State").and_then(Value::as_str).unwrap_or("").to_owned();
    let status = entry.get("Status").and_then(Value::as_str).unwrap_or("").to_owned();
    let exit_code = exit_code(&status);
    let ok = state == "running" || (state == "exited" && exit_code == Some(0));
    let reason = (!ok).then(|| match exit_code {
        Some(code) if state == "exited" => format!("exited with code {code}"),
        _ => format!("{} ({status})", if state.is_empty() { "unknown state" } else { &state }),
    });
    Probed {
        target: format!("container:{name}"),
        key: format!("container:{name}"),
        ok,
        reason,
        view: json!({ "name": name, "state": state, "status": status, "ok": ok }),
    }
}

/// The code in Docker's `Exited (137) 2 hours ago`.
fn exit_code(status: &str) -> Option<i64> {
    let rest = status.strip_prefix("Exited (")?;
    rest[..rest.find(')')?].trim().parse().ok()
}

/// `GET /containers/json?all=1` over Docker's unix socket (HTTP/1.1, hyper).
async fn docker_containers(socket: &Path, timeout: Duration) -> Result<Vec<Value>, String> {
    use http_body_util::BodyExt;
    let ask = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|err| format!("connecting to the Docker socket {}: {err}", socket.display()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|err| format!("the Docker socket: {err}"))?;
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        let answer = async {
            let request = hyper::Request::get("/containers/json?all=1")
                .header(hyper::header::HOST, "docker")
                .header(hyper::header::ACCEPT, "application/json")
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .map_err(|err| format!("the Docker request: {err}"))?;
            let response = sender.send_request(request).await.map_err(|err| format!("the Docker API: {err}"))?;
            let status = response.status().as_u16();
            let body = http_body_util::Limited::new(response.into_body(), MAX_DOCKER_BODY)
                .collect()
                .await
                .map_err(|err| format!("the Docker API's answer: {err}"))?
                .to_bytes();
            if status != 200 {
                let excerpt: String = String::from_utf8_lossy(&body).chars().take(200).collect();
                return Err(format!("the Docker API answered {status}: {}", excerpt.trim()));
            }
            match serde_json::from_slice(&body) {
                Ok(Value::Array(containers)) => Ok(containers),
                _ => Err("the Docker API's container list is not a JSON array".to_owned()),
            }
        }
        .await;
        driver.abort();
        answer
    };
    tokio::time::timeout(timeout, ask).await.unwrap_or_else(|_| {
        Err(format!("the Docker API did not answer within {}", humantime::format_duration(timeout)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn containers_fail_unless_running_or_exited_cleanly() {
        let probe =
            |state: &str, status: &str| container(json!({ "Names": ["/web"], "State": state, "Status": status }));
        assert!(probe("running", "Up 2 hours").ok);
        assert!(probe("exited", "Exited (0) 3 minutes ago").ok);
        let crashed = probe("exited", "Exited (137) 3 minutes ago");
        assert!(!crashed.ok);
        assert_eq!(crashed.reason.as_deref(), Some("exited with code 137"));
        assert_eq!(crashed.target, "container:web");
        assert!(!probe("restarting", "Restarting (1) 5 seconds ago").ok);
        assert!(!probe("dead", "Dead").ok);
        assert_eq!(exit_code("Exited (2) About an hour ago"), Some(2));
        assert_eq!(exit_code("Up 5 minutes"), None);
    }

    /// A one-request stand-in for the Docker daemon on a unix socket.
    async fn fake_docker(path: std::path::PathBuf, answer: &'static str) -> tokio::task::JoinHandle<String> {
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 65536 {
                let n = stream.read(&mut chunk).await.unwrap();
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&chunk[..n]);
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                answer.len()
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            stream.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&request).into_owned()
        })
    }

    #[tokio::test]
    async fn lists_containers_over_the_docker_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker.sock");
        let server = fake_docker(
            path.clone(),
            r#"[{"Id":"abc","Names":["/api"],"State":"running","Status":"Up 1 hour"},{"Id":"def","Names":["/worker"],"State":"exited","Status":"Exited (1) 2 minutes ago"}]"#,
        )
        .await;
        let containers = docker_containers(&path, Duration::from_secs(10)).await.unwrap();
        let request = server.await.unwrap();
        assert!(request.starts_with("GET /containers/json?all=1 HTTP/1.1\r\n"), "{request}");
        let probed: Vec<Probed> = containers.into_iter().map(container).collect();
        assert_eq!(probed.len(), 2);
        assert!(probed[0].ok);
        assert_eq!(probed[1].target, "container:worker");
        assert!(!probed[1].ok);
    }

    #[tokio::test]
    async fn a_socket_nobody_answers_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker.sock");
        let _listener = tokio::net::UnixListener::bind(&path).unwrap(); // accepts nothing
        let err = docker_containers(&path, Duration::from_millis(300)).await.unwrap_err();
        assert!(err.contains("did not answer"), "{err}");
        let missing = docker_containers(&dir.path().join("none.sock"), Duration::from_secs(1)).await.unwrap_err();
        assert!(missing.contains("connecting"), "{missing}");
    }
}
