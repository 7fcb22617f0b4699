//! `exec`: runs an argv directly (never through a shell of ours) in its own process group, with
//! bounded capture of stdout and stderr; a non-zero exit is a step failure.

use super::{ActionError, StepContext};
use crate::definition::ExecSpec;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::process::Stdio;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

pub async fn run(spec: &ExecSpec, context: &StepContext, cancel: CancellationToken) -> Result<String, ActionError> {
    let mut command = Command::new(&spec.command[0]);
    command
        .args(&spec.command[1..])
        .envs(&spec.env)
        .env("WFO_RUN_ID", &context.run_id)
        .env("WFO_WORKFLOW_ID", &context.workflow_id)
        .env("WFO_STEP_ID", &context.step_id)
        .env("WFO_ATTEMPT", context.attempt.to_string())
        .env("WFO_IDEMPOTENCY_KEY", context.idempotency_key())
        .env("WFO_INPUT", &context.input)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a timeout kills whatever the command started too.
        .process_group(0)
        .kill_on_drop(true);
    if let Some(cwd) = &spec.cwd {
        command.current_dir(cwd);
    }
    let mut child =
        command.spawn().map_err(|err| ActionError::retryable(format!("cannot start `{}`: {err}", spec.command[0])))?;
    let group = child.id().map(|id| Pid::from_raw(id as i32));
    let stdout = child.stdout.take().map(|s| tokio::spawn(capture(s, spec.max_output)));
    let stderr = child.stderr.take().map(|s| tokio::spawn(capture(s, spec.max_output)));

    let status = tokio::select! {
        status = child.wait() => status.map_err(|err| ActionError::retryable(format!("waiting for the command failed: {err}")))?,
        () = cancel.cancelled() => {
            if let Some(group) = group {
                let _ = killpg(group, Signal::SIGKILL);
            }
            let _ = child.wait().await;
            return Err(ActionError::retryable("cancelled: the step timed out, lost its lease or the replica is stopping"));
        }
    };
    // The group may have children that outlive the leader and hold the pipes open.
    if let Some(group) = group {
        let _ = killpg(group, Signal::SIGKILL);
    }
    let (stdout, stdout_truncated) = collect(stdout).await;
    let (stderr, stderr_truncated) = collect(stderr).await;
    if status.success() {
        let output = serde_json::json!({
            "exitCode": 0,
            "stdout": stdout,
            "stderr": stderr,
            "truncated": stdout_truncated || stderr_truncated,
        });
        Ok(output.to_string())
    } else {
        let how = match status.code() {
            Some(code) => format!("exited with status {code}"),
            None => "was killed by a signal".to_owned(),
        };
        let tail: String = stderr.chars().rev().take(500).collect::<Vec<_>>().into_iter().rev().collect();
        Err(ActionError::retryable(format!("`{}` {how}: {}", spec.command[0], tail.trim())))
    }
}

/// Reads a stream to its end, keeping at most `limit` bytes.
async fn capture(mut stream: impl AsyncRead + Unpin, limit: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buffer = [0u8; 8192];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return (kept, truncated),
            Ok(n) => {
                let room = limit.saturating_sub(kept.len());
                kept.extend_from_slice(&buffer[..n.min(room)]);
                truncated |= n > room;
            }
        }
    }
}

async fn collect(task: Option<tokio::task::JoinHandle<(Vec<u8>, bool)>>) -> (String, bool) {
    match task {
        Some(handle) => match handle.await {
            Ok((bytes, truncated)) => (String::from_utf8_lossy(&bytes).into_owned(), truncated),
            Err(_) => (String::new(), true),
        },
        None => (String::new(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> StepContext {
        StepContext {
            run_id: "r1".into(),
            workflow_id: "wf".into(),
            step_id: "s".into(),
            attempt: 2,
            input: r#"{"a":1}"#.into(),
            steps: Default::default(),
            trigger: serde_json::Value::Null,
        }
    }

    fn spec(argv: &[&str]) -> ExecSpec {
        ExecSpec {
            command: argv.iter().map(|s| s.to_string()).collect(),
            env: Default::default(),
            cwd: None,
            max_output: 16,
        }
    }

    #[tokio::test]
    async fn passes_the_step_variables_and_bounds_output() {
        let out = run(
            &spec(&[
                "sh",
                "-c",
                "printf '%s|%s|%s|%s|and more' \"$WFO_STEP_ID\" \"$WFO_ATTEMPT\" \"$WFO_IDEMPOTENCY_KEY\" \"$WFO_INPUT\"",
            ]),
            &context(),
            CancellationToken::new(),
        )
        .await
        .unwrap();
        let value: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(value["stdout"], "s|2|r1:s|{\"a\":1}");
        assert_eq!(value["truncated"], true);
    }

    #[tokio::test]
    async fn non_zero_exit_is_a_retryable_failure_with_stderr() {
        let err =
            run(&spec(&["sh", "-c", "echo nope >&2; exit 3"]), &context(), CancellationToken::new()).await.unwrap_err();
        assert!(err.retryable);
        assert!(err.message.contains("status 3") && err.message.contains("nope"), "{}", err.message);
    }

    #[tokio::test]
    async fn cancellation_kills_the_whole_group() {
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            trigger.cancel();
        });
        let started = std::time::Instant::now();
        let err = run(&spec(&["sh", "-c", "sleep 30 & sleep 30"]), &context(), cancel).await.unwrap_err();
        assert!(err.message.contains("cancelled"));
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }

    #[tokio::test]
    async fn a_missing_program_is_a_clear_error() {
        let err = run(&spec(&["/nonexistent/prog"]), &context(), CancellationToken::new()).await.unwrap_err();
        assert!(err.message.contains("cannot start"), "{}", err.message);
    }
}
