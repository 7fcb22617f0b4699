//! `exec`: runs an argv directly (never through a shell of ours) in its own process group, with
//! bounded capture of stdout and stderr; a non-zero exit is a step failure.
//!
//! The run's input reaches the process two ways: in a private file named by `WFO_INPUT_FILE`
//! (mode 0600, removed when the step ends), and in `WFO_INPUT` when it is at most
//! [`MAX_INPUT_IN_ENV`] bytes (otherwise `WFO_INPUT` is empty: the environment has a size limit,
//! about 128 KiB per string on Linux, over which the process could not even start). Not on
//! stdin, which stays `/dev/null`: a command that reads stdin (`ssh`, `psql`, `kubectl apply -f
//! -`) would otherwise forward or execute the run's input.

use super::{ActionError, StepContext};
use crate::definition::ExecSpec;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use std::io::Write;
use std::process::Stdio;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// Largest input also passed in `WFO_INPUT`; larger ones only in the file.
pub const MAX_INPUT_IN_ENV: usize = 64 * 1024;

/// Writes the input to a private temporary file (removed when the value is dropped).
fn input_file(input: &str) -> Result<tempfile::NamedTempFile, ActionError> {
    let mut file = tempfile::Builder::new()
        .prefix("wfo-input-")
        .suffix(".json")
        .tempfile()
        .map_err(|err| ActionError::retryable(format!("cannot create the input file for WFO_INPUT_FILE: {err}")))?;
    file.write_all(input.as_bytes())
        .and_then(|()| file.flush())
        .map_err(|err| ActionError::retryable(format!("cannot write the input file for WFO_INPUT_FILE: {err}")))?;
    Ok(file)
}

pub async fn run(spec: &ExecSpec, context: &StepContext, cancel: CancellationToken) -> Result<String, ActionError> {
    // Lives until the step ends; dropping it removes the file.
    let input = input_file(&context.input)?;
    let in_env = if context.input.len() <= MAX_INPUT_IN_ENV { context.input.as_str() } else { "" };
    let mut command = Command::new(&spec.command[0]);
    command
        .args(&spec.command[1..])
        .envs(&spec.env)
        .env("WFO_RUN_ID", &context.run_id)
        .env("WFO_WORKFLOW_ID", &context.workflow_id)
        .env("WFO_STEP_ID", &context.step_id)
        .env("WFO_ATTEMPT", context.attempt.to_string())
        .env("WFO_IDEMPOTENCY_KEY", context.idempotency_key())
        .env("WFO_INPUT", in_env)
        .env("WFO_INPUT_FILE", input.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a timeout kills whatever the command started too.
        .process_group(0)
        .kill_on_drop(true);
    // Set or removed: a `TRACEPARENT` inherited from the replica's own environment is not the
    // run's.
    match &context.trace {
        Some(trace) => {
            command.env("TRACEPARENT", trace.traceparent()).env("TRACESTATE", &trace.tracestate);
        }
        None => {
            command.env_remove("TRACEPARENT").env_remove("TRACESTATE");
        }
    }
    if let Some(cwd) = &spec.cwd {
        command.current_dir(cwd);
    }
    let mut child = command.spawn().map_err(|err| spawn_error(&spec.command[0], &err))?;
    let group = child.id().map(|id| Pid::from_raw(id as i32));
    let stdout = child.stdout.take().map(|s| tokio::spawn(capture(s, spec.max_output)));
    let stderr = child.stderr.take().map(|s| tokio::spawn(capture(s, spec.max_output)));

    let status = tokio::select! {
        status = child.wait() => status.map_err(|err| ActionError::retryable(format!("waiting for the command failed: {err}"))),
        () = cancel.cancelled() => {
            if let Some(group) = group {
                let _ = killpg(group, Signal::SIGKILL);
            }
            let _ = child.wait().await;
            return Err(ActionError::retryable("cancelled: the step timed out, lost its lease or the replica is stopping"));
        }
    };
    let status = status?;
    // The group may have children that outlive the leader and hold the pipes open.
    if let Some(group) = group {
        let _ = killpg(group, Signal::SIGKILL);
    }
    drop(input);
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

/// Why a command could not start. `E2BIG` (the arguments and environment are over the system's
/// limit) will be the same on every attempt, so it is not retried.
fn spawn_error(program: &str, err: &std::io::Error) -> ActionError {
    if err.raw_os_error() == Some(libc::E2BIG) {
        return ActionError::fatal(format!(
            "cannot start `{program}`: its arguments and environment are over the system's size limit \
             (E2BIG). The run's input is in WFO_INPUT only up to {MAX_INPUT_IN_ENV} bytes; shorten the \
             step's `command` and `env`, and read large values from the file WFO_INPUT_FILE names"
        ));
    }
    ActionError::retryable(format!("cannot start `{program}`: {err}"))
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
            step: 0,
            run_id: "r1".into(),
            workflow_id: "wf".into(),
            step_id: "s".into(),
            attempt: 2,
            input: r#"{"a":1}"#.into(),
            steps: Default::default(),
            trigger: serde_json::Value::Null,
            trace: None,
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
    async fn the_runs_trace_context_is_in_the_environment() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let traced =
            StepContext { trace: Some(crate::machine::TraceContext::parse(parent, Some("k=v")).unwrap()), ..context() };
        let mut wide = spec(&["sh", "-c", "printf '%s|%s' \"$TRACEPARENT\" \"$TRACESTATE\""]);
        wide.max_output = 1024;
        let out = run(&wide, &traced, CancellationToken::new()).await.unwrap();
        let value: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(value["stdout"], format!("{parent}|k=v"));
        let out = run(&wide, &context(), CancellationToken::new()).await.unwrap();
        let value: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(value["stdout"], "|", "no context: none inherited either");
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
    async fn a_large_input_comes_by_file_and_stays_out_of_the_environment_and_stdin() {
        let mut context = context();
        context.input = serde_json::json!({ "blob": "x".repeat(300 * 1024) }).to_string();
        let mut spec = spec(&[
            "sh",
            "-c",
            "test -z \"$WFO_INPUT\" && f=$(wc -c < \"$WFO_INPUT_FILE\") && s=$(wc -c) && \
             m=$(stat -c %a \"$WFO_INPUT_FILE\") && printf '%s %s %s %s' \"$f\" \"$s\" \"$m\" \"$WFO_INPUT_FILE\"",
        ]);
        spec.max_output = 4096;
        let out = run(&spec, &context, CancellationToken::new()).await.unwrap();
        let value: serde_json::Value = serde_json::from_str(&out).unwrap();
        let stdout = value["stdout"].as_str().unwrap().to_owned();
        let fields: Vec<&str> = stdout.split(' ').collect();
        let size = context.input.len().to_string();
        assert_eq!(&fields[..3], [size.as_str(), "0", "600"], "{value}");
        assert!(!std::path::Path::new(fields[3]).exists(), "the input file is removed after the step");
    }

    #[tokio::test]
    async fn arguments_over_the_system_limit_fail_for_good() {
        let huge = "z".repeat(4 * 1024 * 1024);
        let err = run(&spec(&["echo", &huge]), &context(), CancellationToken::new()).await.unwrap_err();
        assert!(!err.retryable, "{}", err.message);
        assert!(err.message.contains("E2BIG") && err.message.contains("WFO_INPUT_FILE"), "{}", err.message);
    }

    #[tokio::test]
    async fn a_missing_program_is_a_clear_error() {
        let err = run(&spec(&["/nonexistent/prog"]), &context(), CancellationToken::new()).await.unwrap_err();
        assert!(err.message.contains("cannot start"), "{}", err.message);
    }
}
