//! `pg_backup`: a PostgreSQL backup with `pg_dump`, verified with `pg_restore --list`, written
//! atomically under a timestamped name, with the oldest backups beyond a count removed.
//!
//! Parameters: `database_url` (required: a `postgres://` URI, a `key=value` connection string or
//! a database name), `dir` (required; created if missing), `keep` (default 7: how many backups of
//! this naming pattern to keep, the new one included), `prefix` (default: the database's name),
//! `pg_dump` and `pg_restore` (the programs; default: found on `PATH`).
//!
//! The dump is written to `<dir>/.<name>.partial`, checked by listing its table of contents, synced,
//! then renamed to `<dir>/<prefix>-<YYYYmmddTHHMMSSZ>.dump` (UTC) and the directory synced: a
//! reader of `dir` never sees half a backup under a backup's name. Only files named after this
//! pattern are ever removed.
//!
//! The password never reaches a command line or a message: it is taken out of the connection
//! string and handed to the tools in `PGPASSWORD`, and every message is scrubbed of it. The tools
//! run in their own process group, killed when the step is cancelled.
//!
//! Output: `{"file", "bytes", "entries", "removed": [path...], "removedErrors": [{"file",
//! "error"}]}`: `entries` counts the dump's table of contents; `removed` lists the old backups
//! removed (and any stale `.partial` of this pattern that a dead replica left, untouched for 6 h).
//! A missing program, a refused connection or a failed dump is retryable; bad parameters are not.

use crate::actions::{ActionError, Builtin, BuiltinCall};
use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// The `pg_backup` built-in.
pub struct PgBackup;

/// How much of a tool's stderr is kept (its end).
const STDERR_KEPT: usize = 16 * 1024;
/// How much of it a message quotes (its end).
const STDERR_QUOTED: usize = 1500;
/// Directory entries looked at per scan.
const MAX_SCANNED: usize = 100_000;
/// Old backups removed per run, at most.
const MAX_REMOVED: usize = 1000;
/// A `.partial` of this pattern untouched for this long was left by a dump that died with its
/// replica: removed before the next dump.
const STALE_PARTIAL: Duration = Duration::from_secs(6 * 3600);
/// `PGCONNECT_TIMEOUT` for the tools, unless the environment sets one: an unreachable host fails
/// the attempt instead of hanging until the step's time-out.
const CONNECT_TIMEOUT_SECS: &str = "30";

#[async_trait]
impl Builtin for PgBackup {
    fn name(&self) -> &'static str {
        "pg_backup"
    }

    fn operator_params(&self) -> &'static [&'static str] {
        &["database_url", "dir", "prefix", "pg_dump", "pg_restore"]
    }

    async fn run(&self, call: BuiltinCall<'_>) -> Result<Value, ActionError> {
        let params = Params::from_call(&call)?;
        backup(&params, &call.cancel).await
    }
}

struct Params {
    connection: Connection,
    dir: PathBuf,
    keep: usize,
    prefix: String,
    pg_dump: String,
    pg_restore: String,
}

impl Params {
    fn from_call(call: &BuiltinCall<'_>) -> Result<Params, ActionError> {
        let connection = Connection::parse(&call.text("database_url")?);
        let dir = call.directory("dir")?;
        let keep = call.number_or("keep", 7)?;
        if keep == 0 {
            return Err(ActionError::fatal(
                "parameter `keep` must be at least 1 (the new backup counts among those kept)",
            ));
        }
        let keep = usize::try_from(keep).unwrap_or(usize::MAX);
        let prefix = match call.params.get("prefix").and_then(Value::as_str).filter(|p| !p.is_empty()) {
            Some(prefix) => {
                if !valid_prefix(prefix) {
                    return Err(ActionError::fatal(format!(
                        "parameter `prefix`: `{prefix}` must be letters, digits, `.`, `_` or `-`, not starting with `.`"
                    )));
                }
                prefix.to_owned()
            }
            None => default_prefix(connection.database.as_deref()),
        };
        let program = |name: &str| -> Result<String, ActionError> {
            match call.params.get(name) {
                None | Some(Value::Null) => Ok(name.to_owned()),
                Some(Value::String(path)) if path.is_empty() => Ok(name.to_owned()),
                Some(Value::String(path)) => Ok(path.clone()),
                Some(_) => Err(ActionError::fatal(format!("parameter `{name}` must be a program path"))),
            }
        };
        Ok(Params { connection, dir, keep, prefix, pg_dump: program("pg_dump")?, pg_restore: program("pg_restore")? })
    }
}

fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && !prefix.starts_with('.')
        && prefix.len() <= 100
        && prefix.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The database's name made safe for a file name; `backup` when there is none.
fn default_prefix(database: Option<&str>) -> String {
    let cleaned: String = database
        .unwrap_or("")
        .chars()
        .take(100)
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '_' })
        .collect();
    let cleaned = cleaned.trim_start_matches('.');
    if cleaned.is_empty() { "backup".to_owned() } else { cleaned.to_owned() }
}

// ---- the connection string, its password kept apart ----

/// A connection string split so that its password goes to the tools' environment rather than
/// their command line (which any local user may read), and never into a message.
#[derive(Debug, Clone, PartialEq)]
struct Connection {
    /// What the tools get as `--dbname`: the connection string without its password.
    dbname: String,
    /// The password, decoded, for `PGPASSWORD`.
    password: Option<String>,
    /// The database's name, when the string says it.
    database: Option<String>,
    /// The original string, for scrubbing.
    original: String,
    /// Texts that must never appear in a message (the password, as written and decoded).
    secrets: Vec<String>,
}

impl Connection {
    fn parse(text: &str) -> Connection {
        let lower = text.to_ascii_lowercase();
        if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
            Connection::parse_uri(text)
        } else if text.contains('=') {
            Connection::parse_keywords(text)
        } else {
            Connection {
                dbname: text.to_owned(),
                password: None,
                database: Some(text.to_owned()),
                original: text.to_owned(),
                secrets: Vec::new(),
            }
        }
    }

    /// `postgres://user:password@host:port/database?key=value`.
    fn parse_uri(text: &str) -> Connection {
        let scheme_end = text.find("://").map_or(0, |i| i + 3);
        let (scheme, rest) = text.split_at(scheme_end);
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        let (path, query) = match tail.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (tail, None),
        };
        let mut secrets = Vec::new();
        let mut password = None;
        let authority = match authority.rfind('@') {
            Some(at) => {
                let (userinfo, host) = (&authority[..at], &authority[at + 1..]);
                match userinfo.split_once(':') {
                    Some((user, raw)) => {
                        secrets.push(raw.to_owned());
                        let decoded = percent_decode(raw);
                        secrets.push(decoded.clone());
                        password = Some(decoded);
                        format!("{user}@{host}")
                    }
                    None => authority.to_owned(),
                }
            }
            None => authority.to_owned(),
        };
        let mut kept = Vec::new();
        let mut database = path.strip_prefix('/').filter(|d| !d.is_empty()).map(percent_decode);
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "password" => {
                    secrets.push(value.to_owned());
                    let decoded = percent_decode(value);
                    secrets.push(decoded.clone());
                    password.get_or_insert(decoded);
                }
                "dbname" => {
                    database = Some(percent_decode(value));
                    kept.push(pair);
                }
                _ => kept.push(pair),
            }
        }
        let mut dbname = format!("{scheme}{authority}{path}");
        if !kept.is_empty() {
            dbname.push('?');
            dbname.push_str(&kept.join("&"));
        }
        secrets.retain(|s| !s.is_empty());
        Connection { dbname, password, database, original: text.to_owned(), secrets }
    }

    /// `host=... port=... dbname=... user=... password='...'` (libpq's keyword/value form).
    fn parse_keywords(text: &str) -> Connection {
        let Some(pairs) = keyword_pairs(text) else {
            // Not well formed: the tool will say why; the whole string stays out of messages.
            return Connection {
                dbname: text.to_owned(),
                password: None,
                database: None,
                original: text.to_owned(),
                secrets: vec![text.to_owned()],
            };
        };
        let mut secrets = Vec::new();
        let mut password = None;
        let mut database = None;
        let mut kept = Vec::new();
        for (key, value, raw) in pairs {
            match key.as_str() {
                "password" => {
                    secrets.push(raw);
                    secrets.push(value.clone());
                    password = Some(value);
                }
                "dbname" => {
                    database = Some(value.clone());
                    kept.push(format!("{key}={}", quote_keyword_value(&value)));
                }
                _ => kept.push(format!("{key}={}", quote_keyword_value(&value))),
            }
        }
        secrets.retain(|s| !s.is_empty());
        Connection { dbname: kept.join(" "), password, database, original: text.to_owned(), secrets }
    }

    /// The connection string as messages show it: the password replaced by `***`.
    fn shown(&self) -> String {
        let mut shown = self.dbname.clone();
        // A marker where the password was, so that a reader sees that one was given.
        if self.password.is_some()
            && let Some(start) = shown.find("://").map(|i| i + 3)
        {
            let end = shown[start..].find(['/', '?']).map_or(shown.len(), |e| e + start);
            if let Some(sign) = shown[start..end].rfind('@') {
                shown.insert_str(start + sign, ":***");
            }
        }
        self.scrub(&shown)
    }

    /// Removes every trace of the password (and of the whole original string) from `text`.
    fn scrub(&self, text: &str) -> String {
        if self.secrets.is_empty() {
            return text.to_owned();
        }
        let mut text = text.replace(&self.original, "***");
        let mut secrets = self.secrets.clone();
        // Longest first, so that a password containing another secret is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        for secret in &secrets {
            text = text.replace(secret.as_str(), "***");
        }
        text
    }
}

/// `%XX` decoded; anything else kept as it is.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(byte) = u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16)
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// libpq's `key = value` pairs (values bare or single-quoted, `\` escaping); with each value's
/// text as written. `None` when the string is not well formed.
fn keyword_pairs(text: &str) -> Option<Vec<(String, String, String)>> {
    let chars: Vec<char> = text.chars().collect();
    let mut pairs = Vec::new();
    let mut i = 0;
    let skip_space = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_space(&mut i);
        if i >= chars.len() {
            return Some(pairs);
        }
        let start = i;
        while i < chars.len() && chars[i] != '=' && !chars[i].is_whitespace() {
            i += 1;
        }
        let key: String = chars[start..i].iter().collect();
        skip_space(&mut i);
        if key.is_empty() || i >= chars.len() || chars[i] != '=' {
            return None;
        }
        i += 1;
        skip_space(&mut i);
        let value_start = i;
        let mut value = String::new();
        if i < chars.len() && chars[i] == '\'' {
            i += 1;
            loop {
                match chars.get(i) {
                    None => return None,
                    Some('\'') => {
                        i += 1;
                        break;
                    }
                    Some('\\') => {
                        value.push(*chars.get(i + 1)?);
                        i += 2;
                    }
                    Some(c) => {
                        value.push(*c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < chars.len() && !chars[i].is_whitespace() {
                if chars[i] == '\\' && i + 1 < chars.len() {
                    i += 1;
                }
                value.push(chars[i]);
                i += 1;
            }
        }
        let raw: String = chars[value_start..i].iter().collect();
        pairs.push((key, value, raw));
    }
}

fn quote_keyword_value(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

// ---- running the tools ----

/// How a tool ended.
struct ToolRun {
    success: bool,
    how: String,
    /// The end of its stderr, scrubbed.
    stderr: String,
    /// Lines of its stdout that are table-of-contents entries (not empty, not `;` comments).
    entries: u64,
}

/// Runs `program` in its own process group with the password in its environment; killed (the
/// whole group) when `cancel` fires.
async fn run_tool(
    program: &str,
    args: &[String],
    connection: &Connection,
    cancel: &CancellationToken,
) -> Result<ToolRun, ActionError> {
    let mut command = Command::new(program);
    command.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    command.kill_on_drop(true);
    if let Some(password) = &connection.password {
        command.env("PGPASSWORD", password);
    }
    if std::env::var_os("PGCONNECT_TIMEOUT").is_none() {
        command.env("PGCONNECT_TIMEOUT", CONNECT_TIMEOUT_SECS);
    }
    let mut child = command.spawn().map_err(|err| {
        if err.kind() == std::io::ErrorKind::NotFound {
            ActionError::retryable(format!(
                "`{program}` was not found: install the PostgreSQL client tools (or name the program with the `{}` parameter)",
                Path::new(program).file_name().and_then(|n| n.to_str()).unwrap_or(program)
            ))
        } else {
            ActionError::retryable(format!("cannot start `{program}`: {err}"))
        }
    })?;
    let group = child.id().map(|id| Pid::from_raw(id as i32));
    let stdout = child.stdout.take().map(|s| tokio::spawn(count_entries(s)));
    let stderr = child.stderr.take().map(|s| tokio::spawn(tail(s, STDERR_KEPT)));
    let status = tokio::select! {
        status = child.wait() => status,
        () = cancel.cancelled() => {
            if let Some(group) = group {
                let _ = killpg(group, Signal::SIGKILL);
            }
            let _ = child.wait().await;
            return Err(ActionError::retryable(format!(
                "cancelled while `{program}` ran: the step timed out, lost its lease or the replica is stopping"
            )));
        }
    };
    // Whatever the tool left behind in its group goes too (and lets go of the pipes).
    if let Some(group) = group {
        let _ = killpg(group, Signal::SIGKILL);
    }
    let status = status.map_err(|err| ActionError::retryable(format!("waiting for `{program}` failed: {err}")))?;
    let entries = match stdout {
        Some(task) => task.await.unwrap_or(0),
        None => 0,
    };
    let stderr = match stderr {
        Some(task) => task.await.unwrap_or_default(),
        None => Vec::new(),
    };
    let stderr = connection.scrub(String::from_utf8_lossy(&stderr).trim());
    let how = match status.code() {
        Some(code) => format!("exited with status {code}"),
        None => "was killed by a signal".to_owned(),
    };
    Ok(ToolRun { success: status.success(), how, stderr, entries })
}

/// Counts table-of-contents lines, in bounded memory.
async fn count_entries(mut stream: impl AsyncRead + Unpin) -> u64 {
    let mut entries = 0;
    let mut at_line_start = true;
    let mut buffer = [0u8; 8192];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => return entries,
            Ok(n) => {
                for &byte in &buffer[..n] {
                    if at_line_start && !matches!(byte, b';' | b'\n' | b'\r') {
                        entries += 1;
                    }
                    at_line_start = byte == b'\n';
                }
            }
        }
    }
}

/// Reads a stream to its end, keeping its last `limit` bytes.
async fn tail(mut stream: impl AsyncRead + Unpin, limit: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buffer = [0u8; 8192];
    loop {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buffer[..n]);
                if kept.len() > 2 * limit {
                    kept.drain(..kept.len() - limit);
                }
            }
        }
    }
    if kept.len() > limit {
        kept.drain(..kept.len() - limit);
    }
    kept
}

/// The last `limit` characters of `text`.
fn last_chars(text: &str, limit: usize) -> String {
    let count = text.chars().count();
    if count <= limit {
        return text.to_owned();
    }
    let skipped: String = text.chars().skip(count - limit).collect();
    format!("…{skipped}")
}

/// Whether a tool's complaint is about the connection string itself (another try will not help).
fn bad_connection_string(stderr: &str) -> bool {
    [
        "invalid URI",
        "invalid connection option",
        "missing \"=\" after",
        "unterminated quoted string",
        "invalid integer value",
        "invalid percent-encoded token",
        "invalid sslmode value",
    ]
    .iter()
    .any(|needle| stderr.contains(needle))
}

// ---- the backup ----

/// Removes a file when dropped, unless disarmed: a failed or cancelled dump leaves no partial.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn utc_stamp() -> String {
    chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string()
}

/// Whether `name` is `<prefix>-YYYYmmddTHHMMSSZ.dump`; its timestamp if so.
fn backup_stamp<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    let stamp = name.strip_prefix(prefix)?.strip_prefix('-')?.strip_suffix(".dump")?;
    is_stamp(stamp).then_some(stamp)
}

/// `YYYYmmddTHHMMSSZ`.
fn is_stamp(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() == 16
        && bytes[8] == b'T'
        && bytes[15] == b'Z'
        && bytes[..8].iter().chain(&bytes[9..15]).all(u8::is_ascii_digit)
}

fn io_error(what: &str, path: &Path, err: std::io::Error) -> ActionError {
    ActionError::retryable(format!("{what} {}: {err}", path.display()))
}

async fn backup(params: &Params, cancel: &CancellationToken) -> Result<Value, ActionError> {
    let dir = params.dir.clone();
    tokio::fs::create_dir_all(&dir).await.map_err(|err| io_error("cannot create the backup directory", &dir, err))?;
    let meta =
        tokio::fs::metadata(&dir).await.map_err(|err| io_error("cannot read the backup directory", &dir, err))?;
    if !meta.is_dir() {
        return Err(ActionError::fatal(format!("parameter `dir`: {} is not a directory", dir.display())));
    }
    let prefix = params.prefix.clone();
    let stale = {
        let (dir, prefix) = (dir.clone(), prefix.clone());
        tokio::task::spawn_blocking(move || remove_stale_partials(&dir, &prefix))
            .await
            .map_err(|err| ActionError::retryable(format!("the backup directory scan failed: {err}")))?
    };

    let partial = dir.join(format!(".{prefix}-{}.dump.partial", utc_stamp()));
    let mut guard = RemoveOnDrop(Some(partial.clone()));
    let shown = params.connection.shown();
    let dump = run_tool(
        &params.pg_dump,
        &[
            "--format=custom".to_owned(),
            "--compress=6".to_owned(),
            "--no-password".to_owned(),
            format!("--file={}", partial.display()),
            format!("--dbname={}", params.connection.dbname),
        ],
        &params.connection,
        cancel,
    )
    .await?;
    if !dump.success {
        let message = format!(
            "pg_dump of {shown} {}: {}",
            dump.how,
            if dump.stderr.is_empty() { "(no message)".to_owned() } else { last_chars(&dump.stderr, STDERR_QUOTED) }
        );
        return Err(if bad_connection_string(&dump.stderr) {
            ActionError::fatal(message)
        } else {
            ActionError::retryable(message)
        });
    }

    let list =
        run_tool(&params.pg_restore, &["--list".to_owned(), partial.display().to_string()], &params.connection, cancel)
            .await?;
    if !list.success {
        return Err(ActionError::retryable(format!(
            "the dump of {shown} did not verify: pg_restore --list {}: {}",
            list.how,
            last_chars(&list.stderr, STDERR_QUOTED)
        )));
    }

    // A name not taken yet: two backups finishing within one second get the next second's.
    let mut target = None;
    for _ in 0..3 {
        let candidate = dir.join(format!("{prefix}-{}.dump", utc_stamp()));
        if !tokio::fs::try_exists(&candidate).await.unwrap_or(false) {
            target = Some(candidate);
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(1000)) => {}
            () = cancel.cancelled() => return Err(ActionError::retryable("cancelled before the backup was renamed")),
        }
    }
    let target = target.ok_or_else(|| {
        ActionError::retryable(format!("backups of this pattern keep appearing in {}: another writer?", dir.display()))
    })?;

    let keep = params.keep;
    let finished = {
        let (partial, target, dir, prefix) = (partial.clone(), target.clone(), dir.clone(), prefix.clone());
        tokio::task::spawn_blocking(move || -> Result<(u64, Vec<String>, Vec<Value>), ActionError> {
            let file = std::fs::File::open(&partial).map_err(|err| io_error("cannot open the dump", &partial, err))?;
            file.sync_all().map_err(|err| io_error("cannot sync the dump", &partial, err))?;
            let bytes = file.metadata().map_err(|err| io_error("cannot read the dump", &partial, err))?.len();
            drop(file);
            std::fs::rename(&partial, &target).map_err(|err| io_error("cannot rename the dump to", &target, err))?;
            sync_dir(&dir).map_err(|err| io_error("cannot sync the backup directory", &dir, err))?;
            let (removed, errors) = remove_old_backups(&dir, &prefix, keep, &target);
            if !removed.is_empty() {
                let _ = sync_dir(&dir);
            }
            Ok((bytes, removed, errors))
        })
        .await
        .map_err(|err| ActionError::retryable(format!("finishing the backup failed: {err}")))?
    };
    guard.0 = None;
    let (bytes, mut removed, removed_errors) = finished?;
    removed.splice(0..0, stale);
    tracing::info!(
        file = %target.display(),
        bytes,
        entries = list.entries,
        removed = removed.len(),
        removed_errors = removed_errors.len(),
        "pg_backup: backup written and verified"
    );
    Ok(json!({
        "file": target.display().to_string(),
        "bytes": bytes,
        "entries": list.entries,
        "removed": removed,
        "removedErrors": removed_errors,
    }))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Removes `.<prefix>-<stamp>.dump.partial` files left untouched for [`STALE_PARTIAL`] (a dump
/// whose replica died mid-way); returns their paths.
fn remove_stale_partials(dir: &Path, prefix: &str) -> Vec<String> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return removed };
    let now = SystemTime::now();
    for entry in entries.take(MAX_SCANNED).flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours =
            name.strip_prefix('.').and_then(|n| n.strip_suffix(".partial")).and_then(|n| backup_stamp(n, prefix));
        if ours.is_none() {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        let idle = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).unwrap_or_default();
        if meta.is_file() && idle > STALE_PARTIAL && std::fs::remove_file(entry.path()).is_ok() {
            tracing::warn!(file = %entry.path().display(), "pg_backup: removed a stale partial dump");
            removed.push(entry.path().display().to_string());
        }
    }
    removed
}

/// Removes the oldest backups of this pattern beyond `keep` (the new one, `newest`, counts and is
/// never removed). Returns what was removed and what could not be.
fn remove_old_backups(dir: &Path, prefix: &str, keep: usize, newest: &Path) -> (Vec<String>, Vec<Value>) {
    let mut backups: Vec<(String, PathBuf)> = Vec::new();
    let mut errors = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries.take(MAX_SCANNED).flatten() {
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                let Some(stamp) = backup_stamp(name, prefix) else { continue };
                let path = entry.path();
                if path == newest || !entry.file_type().is_ok_and(|t| t.is_file()) {
                    continue;
                }
                backups.push((stamp.to_owned(), path));
            }
        }
        Err(err) => {
            errors.push(json!({ "file": dir.display().to_string(), "error": format!("cannot list: {err}") }));
            return (Vec::new(), errors);
        }
    }
    // Newest first (the stamp sorts as the time does).
    backups.sort_by(|a, b| b.0.cmp(&a.0));
    let mut removed = Vec::new();
    for (_, path) in backups.into_iter().skip(keep.saturating_sub(1)).take(MAX_REMOVED) {
        match std::fs::remove_file(&path) {
            Ok(()) => removed.push(path.display().to_string()),
            Err(err) => errors.push(json!({ "file": path.display().to_string(), "error": err.to_string() })),
        }
    }
    (removed, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uri_password_goes_to_the_environment_and_out_of_messages() {
        let c = Connection::parse("postgres://app:s3cr%40t@db.local:5432/molochain?sslmode=disable");
        assert_eq!(c.dbname, "postgres://app@db.local:5432/molochain?sslmode=disable");
        assert_eq!(c.password.as_deref(), Some("s3cr@t"));
        assert_eq!(c.database.as_deref(), Some("molochain"));
        assert_eq!(c.shown(), "postgres://app:***@db.local:5432/molochain?sslmode=disable");
        let scrubbed = c.scrub("failed for postgres://app:s3cr%40t@db.local:5432/molochain?sslmode=disable (s3cr@t)");
        assert!(!scrubbed.contains("s3cr"), "{scrubbed}");
    }

    #[test]
    fn a_password_in_the_query_is_taken_out_too() {
        let c = Connection::parse("postgresql://app@h/db?password=pw%21x&application_name=wfo");
        assert_eq!(c.dbname, "postgresql://app@h/db?application_name=wfo");
        assert_eq!(c.password.as_deref(), Some("pw!x"));
        assert!(!c.shown().contains("pw"));
    }

    #[test]
    fn uris_without_a_password_or_database_stay_as_they_are() {
        let c = Connection::parse("postgres://h:5433");
        assert_eq!(c.dbname, "postgres://h:5433");
        assert_eq!(c.password, None);
        assert_eq!(c.database, None);
        assert_eq!(default_prefix(c.database.as_deref()), "backup");
    }

    #[test]
    fn keyword_strings_lose_their_password() {
        // Malformed: the tool will say so; the whole string is secret.
        let c = Connection::parse("host=localhost password");
        assert_eq!(c.shown(), "***");
        let c = Connection::parse(r"host=localhost dbname='my db' password='p\'w d' user=x");
        assert_eq!(c.password.as_deref(), Some("p'w d"));
        assert_eq!(c.dbname, "host='localhost' dbname='my db' user='x'");
        assert_eq!(c.database.as_deref(), Some("my db"));
        assert_eq!(default_prefix(c.database.as_deref()), "my_db");
        assert_eq!(c.scrub("password='p\\'w d' and p'w d"), "password=*** and ***");
    }

    #[test]
    fn only_this_pattern_counts_as_a_backup() {
        assert_eq!(backup_stamp("app-20250102T030405Z.dump", "app"), Some("20250102T030405Z"));
        assert_eq!(backup_stamp("app-x-20250102T030405Z.dump", "app"), None);
        assert_eq!(backup_stamp("app-20250102T030405Z.dump.partial", "app"), None);
        assert_eq!(backup_stamp("app-2025010T030405Z.dump", "app"), None);
        assert_eq!(backup_stamp("other-20250102T030405Z.dump", "app"), None);
        assert!(!valid_prefix(".hidden") && !valid_prefix("a/b") && valid_prefix("molochain_prod-1"));
    }

    #[test]
    fn toc_lines_are_counted_not_comments() {
        let listing =
            b";\n; Archive created at\n;\n3; 2615 2200 SCHEMA - public pg\n215; 1259 16386 TABLE public users pg\n\n";
        let count = futures::executor::block_on(count_entries(&listing[..]));
        assert_eq!(count, 2);
    }

    #[test]
    fn retention_keeps_the_newest_and_touches_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let names = [
            "app-20240101T000000Z.dump",
            "app-20240102T000000Z.dump",
            "app-20240103T000000Z.dump",
            "app-20240104T000000Z.dump",
            "other-20200101T000000Z.dump",
            "app-notes.txt",
            ".app-20200101T000000Z.dump.partial",
        ];
        for name in names {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let newest = dir.path().join("app-20240104T000000Z.dump");
        let (removed, errors) = remove_old_backups(dir.path(), "app", 2, &newest);
        assert!(errors.is_empty(), "{errors:?}");
        let mut removed: Vec<String> =
            removed.iter().map(|p| Path::new(p).file_name().unwrap().to_string_lossy().into_owned()).collect();
        removed.sort();
        assert_eq!(removed, ["app-20240101T000000Z.dump", "app-20240102T000000Z.dump"]);
        for name in
            ["app-20240103T000000Z.dump", "app-20240104T000000Z.dump", "other-20200101T000000Z.dump", "app-notes.txt"]
        {
            assert!(dir.path().join(name).exists(), "{name}");
        }
    }

    #[test]
    fn the_new_backup_is_kept_even_if_the_clock_went_back() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["app-20990101T000000Z.dump", "app-20240101T000000Z.dump"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let newest = dir.path().join("app-20240101T000000Z.dump");
        let (removed, _) = remove_old_backups(dir.path(), "app", 1, &newest);
        assert_eq!(removed.len(), 1);
        assert!(newest.exists());
    }

    /// Stand-ins for the PostgreSQL tools: shell scripts in `dir`.
    fn fake_tools(dir: &Path, dump_body: &str) -> (String, String) {
        use std::os::unix::fs::PermissionsExt;
        let write = |name: &str, body: &str| {
            let path = dir.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            path.display().to_string()
        };
        let dump = write("fake_pg_dump", dump_body);
        let restore =
            write("fake_pg_restore", "printf ';\\n; Archive\\n1; 2615 SCHEMA - public\\n2; 1259 TABLE public t\\n'");
        (dump, restore)
    }

    fn params(url: &str, dir: &Path, pg_dump: String, pg_restore: String) -> Params {
        let connection = Connection::parse(url);
        let prefix = default_prefix(connection.database.as_deref());
        Params { connection, dir: dir.to_path_buf(), keep: 2, prefix, pg_dump, pg_restore }
    }

    #[tokio::test]
    async fn the_password_reaches_the_tool_by_its_environment_only() {
        let tools = tempfile::tempdir().unwrap();
        let args = tools.path().join("args");
        let body = format!(
            "for a; do case \"$a\" in --file=*) f=\"${{a#--file=}}\";; esac; done\n\
             printf '%s\\n' \"$@\" > {args}\nprintf 'PGDMP:%s' \"$PGPASSWORD\" > \"$f\"",
            args = args.display()
        );
        let (dump, restore) = fake_tools(tools.path(), &body);
        let backups = tempfile::tempdir().unwrap();
        let dir = backups.path().join("nested/dir");
        let url = "postgres://app:pa%24%24word@127.0.0.1:1/appdb";
        let out = backup(&params(url, &dir, dump, restore), &CancellationToken::new()).await.unwrap();
        assert_eq!(out["entries"], 2, "{out}");
        let file = PathBuf::from(out["file"].as_str().unwrap());
        assert_eq!(std::fs::read(&file).unwrap(), b"PGDMP:pa$$word");
        assert_eq!(out["bytes"], 14);
        assert!(backup_stamp(file.file_name().unwrap().to_str().unwrap(), "appdb").is_some(), "{out}");
        let args = std::fs::read_to_string(&args).unwrap();
        assert!(args.contains("--dbname=postgres://app@127.0.0.1:1/appdb\n"), "{args}");
        assert!(args.contains("--format=custom\n--compress=6\n"), "{args}");
        assert!(!args.contains("pa%24") && !args.contains("pa$$"), "{args}");
        // Only the backup is left.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[tokio::test]
    async fn a_failing_dump_leaves_nothing_and_says_why_without_the_password() {
        let tools = tempfile::tempdir().unwrap();
        let body = "for a; do case \"$a\" in --file=*) f=\"${a#--file=}\";; esac; done\n\
                    echo partial > \"$f\"\necho \"pg_dump: error: connection for $1 $PGPASSWORD failed\" >&2\nexit 1";
        let (dump, restore) = fake_tools(tools.path(), body);
        let backups = tempfile::tempdir().unwrap();
        let url = "postgres://app:hunter2hunter2@db/app";
        let err = backup(&params(url, backups.path(), dump, restore), &CancellationToken::new()).await.unwrap_err();
        assert!(err.retryable, "{err}");
        assert!(err.message.contains("connection for") && err.message.contains("status 1"), "{err}");
        assert!(!err.message.contains("hunter2"), "{err}");
        assert!(err.message.contains("postgres://app:***@db/app"), "{err}");
        assert_eq!(std::fs::read_dir(backups.path()).unwrap().count(), 0, "the partial is removed");
    }

    #[tokio::test]
    async fn a_missing_tool_is_a_clear_retryable_error() {
        let backups = tempfile::tempdir().unwrap();
        let p = params("app", backups.path(), "/nonexistent/pg_dump".into(), "pg_restore".into());
        let err = backup(&p, &CancellationToken::new()).await.unwrap_err();
        assert!(err.retryable && err.message.contains("was not found"), "{err}");
    }

    #[tokio::test]
    async fn cancellation_kills_the_whole_group_and_removes_the_partial() {
        let tools = tempfile::tempdir().unwrap();
        let pid_file = tools.path().join("pid");
        let body = format!(
            "for a; do case \"$a\" in --file=*) f=\"${{a#--file=}}\";; esac; done\n\
             echo partial > \"$f\"\nsleep 60 &\necho $! > {}\nwait",
            pid_file.display()
        );
        let (dump, restore) = fake_tools(tools.path(), &body);
        let backups = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        let watched = pid_file.clone();
        tokio::spawn(async move {
            // Once the tool has started its own child, cancel (bounded).
            for _ in 0..200 {
                if std::fs::read_to_string(&watched).is_ok_and(|p| !p.trim().is_empty()) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            trigger.cancel();
        });
        let err = backup(&params("app", backups.path(), dump, restore), &cancel).await.unwrap_err();
        assert!(err.retryable && err.message.contains("cancelled"), "{err}");
        let pid = std::fs::read_to_string(&pid_file).unwrap().trim().to_owned();
        // The grandchild is gone (or a zombie awaiting its reaper).
        let gone = (0..200).any(|_| {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let dead =
                state.is_empty() || state.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z'));
            if !dead {
                std::thread::sleep(Duration::from_millis(25));
            }
            dead
        });
        assert!(gone, "sleep {pid} survived the cancellation");
        assert_eq!(std::fs::read_dir(backups.path()).unwrap().count(), 0, "the partial is removed");
    }

    #[tokio::test]
    async fn bad_parameters_are_fatal() {
        let tools = tempfile::tempdir().unwrap();
        let (dump, restore) =
            fake_tools(tools.path(), "echo 'pg_dump: error: invalid URI query parameter: \"bogus\"' >&2; exit 1");
        let backups = tempfile::tempdir().unwrap();
        let err = backup(&params("postgres://h/db?bogus=1", backups.path(), dump, restore), &CancellationToken::new())
            .await
            .unwrap_err();
        assert!(!err.retryable, "{err}");
        let file = backups.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let err = backup(&params("app", &file, "pg_dump".into(), "pg_restore".into()), &CancellationToken::new())
            .await
            .unwrap_err();
        assert!(err.message.contains("backup directory") || err.message.contains("not a directory"), "{err}");
    }
}
