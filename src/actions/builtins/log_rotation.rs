//! `log_rotation`: rotates the log files of one directory and deletes old archives.
//!
//! Parameters: `dir` (required), `max_size` (bytes, default 10485760), `max_age` (default `1d`),
//! `keep_for` (default `14d`), `pattern` (the suffix of a log file's name, default `.log`).
//!
//! Each regular file of `dir` (not recursive; symbolic links are never followed) whose name ends
//! with `pattern`, that is not empty and is larger than `max_size` or was last modified longer ago
//! than `max_age`, is rotated by copy-truncate: copied to `<name>.<YYYYmmddTHHMMSSZ>` (UTC), the
//! copy synced, then the original truncated through the same open file, so that writers holding
//! it open (with `O_APPEND`) carry on writing to it. The copy is gzipped to `<copy>.gz` (written
//! as `<copy>.gz.partial`, synced, renamed) and removed. A copy left behind by a replica that died
//! mid-way is gzipped on the next run. Then archives of this naming pattern,
//! `<name>.<YYYYmmddTHHMMSSZ>.gz`, whose timestamp is older than `keep_for` are deleted; no other
//! file is ever deleted.
//!
//! Bounded: at most [`MAX_ROTATED`] files rotated and [`MAX_DELETED`] archives deleted per run
//! (`"truncated": true` says the next run has more to do), at most [`MAX_SCANNED`] directory
//! entries looked at.
//!
//! Output: `{"rotated": [{"file", "bytes", "archive"}], "deleted": [path...], "truncated"}`. When
//! some file could not be handled, the step fails (retryable) after doing all the rest, naming
//! each file and why.
//!
//! Copy-truncate's known limits: lines written between the last copy and the truncation are lost
//! (the window is kept small by copying what was appended meanwhile just before truncating), and
//! a writer that does not append (`O_APPEND`) leaves a sparse file at its old offset.

use crate::actions::{ActionError, Builtin, BuiltinCall};
use async_trait::async_trait;
use chrono::{DateTime, NaiveDateTime, Utc};
use flate2::{Compression, GzBuilder};
use serde_json::{Value, json};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// The `log_rotation` built-in.
pub struct LogRotation;

/// Files rotated per run, at most.
pub const MAX_ROTATED: usize = 1000;
/// Archives deleted per run, at most.
pub const MAX_DELETED: usize = 1000;
/// Directory entries looked at per run, at most.
pub const MAX_SCANNED: usize = 100_000;
/// Catch-up copies of what was appended during the copy, before truncating.
const CATCH_UPS: usize = 3;
/// How much is copied between two looks at the cancellation token.
const CHUNK: usize = 256 * 1024;

#[async_trait]
impl Builtin for LogRotation {
    fn name(&self) -> &'static str {
        "log_rotation"
    }

    fn operator_params(&self) -> &'static [&'static str] {
        &["dir", "pattern"]
    }

    async fn run(&self, call: BuiltinCall<'_>) -> Result<Value, ActionError> {
        let params = Params::from_call(&call)?;
        let cancel = call.cancel.clone();
        tokio::task::spawn_blocking(move || rotate_dir(&params, &cancel, Utc::now()))
            .await
            .map_err(|err| ActionError::retryable(format!("log rotation stopped: {err}")))?
    }
}

#[derive(Debug, Clone)]
struct Params {
    dir: PathBuf,
    max_size: u64,
    max_age: Duration,
    keep_for: Duration,
    pattern: String,
}

impl Params {
    fn from_call(call: &BuiltinCall<'_>) -> Result<Params, ActionError> {
        let pattern = call.text_or("pattern", ".log");
        if pattern.contains('/') || pattern.contains('\0') {
            return Err(ActionError::fatal(format!("parameter `pattern`: `{pattern}` must be a file-name suffix")));
        }
        Ok(Params {
            dir: call.directory("dir")?,
            max_size: call.number_or("max_size", 10 * 1024 * 1024)?,
            max_age: call.duration_or("max_age", Duration::from_secs(24 * 3600))?,
            keep_for: call.duration_or("keep_for", Duration::from_secs(14 * 24 * 3600))?,
            pattern,
        })
    }
}

const STAMP_FORMAT: &str = "%Y%m%dT%H%M%SZ";

/// The time of a `YYYYmmddTHHMMSSZ` stamp.
fn parse_stamp(text: &str) -> Option<DateTime<Utc>> {
    if text.len() != 16 || !text.is_ascii() {
        return None;
    }
    NaiveDateTime::parse_from_str(text, STAMP_FORMAT).ok().map(|t| t.and_utc())
}

/// What a directory entry is to us, by its name.
#[derive(Debug, PartialEq)]
enum Kind {
    /// `<name><pattern>`: a log file.
    Log,
    /// `<log>.<stamp>.gz`: an archive, rotated at that time.
    Archive(DateTime<Utc>),
    /// `<log>.<stamp>`: a copy whose gzip did not finish (its replica died).
    Copy,
    Other,
}

fn kind(name: &str, pattern: &str) -> Kind {
    let rotated = |rest: &str| -> Option<DateTime<Utc>> {
        let (log, stamp) = rest.rsplit_once('.')?;
        if log.len() > pattern.len() && log.ends_with(pattern) { parse_stamp(stamp) } else { None }
    };
    if let Some(rest) = name.strip_suffix(".gz")
        && let Some(at) = rotated(rest)
    {
        return Kind::Archive(at);
    }
    if rotated(name).is_some() {
        return Kind::Copy;
    }
    if name.len() > pattern.len() && name.ends_with(pattern) {
        return Kind::Log;
    }
    Kind::Other
}

#[derive(Default)]
struct Report {
    rotated: Vec<Value>,
    deleted: Vec<String>,
    errors: Vec<String>,
    truncated: bool,
}

impl Report {
    fn error(&mut self, path: &Path, what: &str, err: impl std::fmt::Display) {
        self.errors.push(format!("{}: {what}: {err}", path.display()));
    }
}

fn cancelled() -> ActionError {
    ActionError::retryable("log rotation cancelled: the step timed out, lost its lease or the replica is stopping")
}

fn rotate_dir(params: &Params, cancel: &CancellationToken, now: DateTime<Utc>) -> Result<Value, ActionError> {
    let dir = &params.dir;
    let meta = std::fs::metadata(dir)
        .map_err(|err| ActionError::retryable(format!("cannot read the log directory {}: {err}", dir.display())))?;
    if !meta.is_dir() {
        return Err(ActionError::fatal(format!("parameter `dir`: {} is not a directory", dir.display())));
    }
    let entries = std::fs::read_dir(dir)
        .map_err(|err| ActionError::retryable(format!("cannot list the log directory {}: {err}", dir.display())))?;
    let (mut logs, mut copies, mut archives) = (Vec::new(), Vec::new(), Vec::new());
    let mut scanned = 0;
    for entry in entries {
        scanned += 1;
        if scanned > MAX_SCANNED {
            break;
        }
        let Ok(entry) = entry else { continue };
        // Regular files only: `file_type` does not follow symbolic links.
        if !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        match kind(name, &params.pattern) {
            Kind::Log => logs.push(entry.path()),
            Kind::Copy => copies.push(entry.path()),
            Kind::Archive(at) => archives.push((at, entry.path())),
            Kind::Other => {}
        }
    }
    let mut report = Report { truncated: scanned > MAX_SCANNED, ..Report::default() };
    logs.sort();
    copies.sort();
    archives.sort();

    // Copies a dead replica left: gzip them now.
    for copy in copies {
        if cancel.is_cancelled() {
            return Err(cancelled());
        }
        if report.rotated.len() >= MAX_ROTATED {
            report.truncated = true;
            break;
        }
        let bytes = std::fs::symlink_metadata(&copy).map(|m| m.len()).unwrap_or(0);
        match compress(&copy, cancel) {
            Ok(archive) => {
                let file = copy.to_string_lossy();
                let file = file.rsplit_once('.').map_or(file.as_ref(), |(log, _)| log);
                report.rotated.push(json!({
                    "file": file,
                    "bytes": bytes,
                    "archive": archive.display().to_string(),
                    "recovered": true,
                }));
            }
            Err(Some(err)) => report.error(&copy, "cannot gzip a leftover copy", err),
            Err(None) => return Err(cancelled()),
        }
    }

    let stamp = now.format(STAMP_FORMAT).to_string();
    let now_system = SystemTime::now();
    for log in logs {
        if cancel.is_cancelled() {
            return Err(cancelled());
        }
        if report.rotated.len() >= MAX_ROTATED {
            report.truncated = true;
            break;
        }
        match rotate_one(&log, &stamp, params, now_system, cancel) {
            Ok(Some((bytes, archive))) => report.rotated.push(json!({
                "file": log.display().to_string(),
                "bytes": bytes,
                "archive": archive.display().to_string(),
            })),
            Ok(None) => {}
            Err(Some(err)) => report.errors.push(format!("{}: {err}", log.display())),
            Err(None) => return Err(cancelled()),
        }
    }

    // Archives past the retention, by the time in their names.
    let keep_for = chrono::Duration::from_std(params.keep_for).unwrap_or(chrono::Duration::MAX);
    for (at, archive) in archives {
        if now.signed_duration_since(at) <= keep_for {
            continue;
        }
        if report.deleted.len() >= MAX_DELETED {
            report.truncated = true;
            break;
        }
        match std::fs::remove_file(&archive) {
            Ok(()) => report.deleted.push(archive.display().to_string()),
            Err(err) => report.error(&archive, "cannot delete an old archive", err),
        }
    }
    if (!report.rotated.is_empty() || !report.deleted.is_empty())
        && let Err(err) = File::open(dir).and_then(|d| d.sync_all())
    {
        report.error(dir, "cannot sync the directory", err);
    }

    tracing::info!(
        dir = %dir.display(),
        rotated = report.rotated.len(),
        deleted = report.deleted.len(),
        errors = report.errors.len(),
        truncated = report.truncated,
        "log rotation done"
    );
    if !report.errors.is_empty() {
        let shown: Vec<&str> = report.errors.iter().take(10).map(String::as_str).collect();
        let more = report.errors.len().saturating_sub(shown.len());
        return Err(ActionError::retryable(format!(
            "log rotation in {}: {} file(s) could not be handled (rotated {}, deleted {} meanwhile): {}{}",
            dir.display(),
            report.errors.len(),
            report.rotated.len(),
            report.deleted.len(),
            shown.join("; "),
            if more > 0 { format!("; and {more} more") } else { String::new() }
        )));
    }
    Ok(json!({ "rotated": report.rotated, "deleted": report.deleted, "truncated": report.truncated }))
}

/// Rotates `log` if it is due; `Ok(None)` if it is not. `Err(None)`: cancelled.
fn rotate_one(
    log: &Path,
    stamp: &str,
    params: &Params,
    now: SystemTime,
    cancel: &CancellationToken,
) -> Result<Option<(u64, PathBuf)>, Option<String>> {
    // Opened once, without following a link: the file copied is the file truncated.
    let mut source = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(log)
        .map_err(|err| Some(format!("cannot open: {err}")))?;
    let meta = source.metadata().map_err(|err| Some(format!("cannot read: {err}")))?;
    if !meta.is_file() || meta.len() == 0 {
        return Ok(None);
    }
    let age = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).unwrap_or_default();
    if meta.len() <= params.max_size && age <= params.max_age {
        return Ok(None);
    }
    let mode = meta.permissions().mode() & 0o777;
    let copy = PathBuf::from(format!("{}.{stamp}", log.display()));
    let archive = PathBuf::from(format!("{}.gz", copy.display()));
    if archive.exists() {
        return Err(Some(format!("{} exists already (rotated twice within a second?)", archive.display())));
    }
    let mut target = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&copy)
        .map_err(|err| Some(format!("cannot create the copy {}: {err}", copy.display())))?;
    let result = (|| {
        let _ = target.set_permissions(std::fs::Permissions::from_mode(mode));
        let mut copied = copy_until_end(&mut source, &mut target, cancel)?;
        target.sync_data().map_err(|err| Some(format!("cannot sync the copy: {err}")))?;
        // What writers appended meanwhile, then the truncation right after.
        for _ in 0..CATCH_UPS {
            let length = source.metadata().map_err(|err| Some(format!("cannot read: {err}")))?.len();
            if length <= copied {
                break;
            }
            copied += copy_until_end(&mut source, &mut target, cancel)?;
        }
        source.set_len(0).map_err(|err| Some(format!("cannot truncate: {err}")))?;
        target.sync_all().map_err(|err| Some(format!("cannot sync the copy: {err}")))?;
        Ok(copied)
    })();
    drop(target);
    let copied = match result {
        Ok(copied) => copied,
        Err(err) => {
            // The original is whole (it is truncated last): the copy goes.
            let _ = std::fs::remove_file(&copy);
            return Err(err);
        }
    };
    // From here the copy holds the only copy of the data: it stays until its archive is whole.
    let archive = compress(&copy, cancel).map_err(|err| {
        err.map(|err| format!("rotated to {} but cannot gzip it (the next run will): {err}", copy.display()))
    })?;
    Ok(Some((copied, archive)))
}

/// Copies from the current position of `source` to its end; returns the bytes copied.
fn copy_until_end(source: &mut File, target: &mut File, cancel: &CancellationToken) -> Result<u64, Option<String>> {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut copied = 0u64;
    let mut since_check = 0usize;
    loop {
        let n = match source.read(&mut buffer) {
            Ok(0) => return Ok(copied),
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(Some(format!("cannot read: {err}"))),
        };
        target.write_all(&buffer[..n]).map_err(|err| Some(format!("cannot write the copy: {err}")))?;
        copied += n as u64;
        since_check += n;
        if since_check >= CHUNK {
            since_check = 0;
            if cancel.is_cancelled() {
                return Err(None);
            }
        }
    }
}

/// Gzips `copy` to `<copy>.gz` (via `<copy>.gz.partial`, synced and renamed), then removes `copy`.
/// `Err(None)`: cancelled (the copy stays for the next run).
fn compress(copy: &Path, cancel: &CancellationToken) -> Result<PathBuf, Option<String>> {
    let archive = PathBuf::from(format!("{}.gz", copy.display()));
    let partial = PathBuf::from(format!("{}.gz.partial", copy.display()));
    let mut source = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(copy)
        .map_err(|err| Some(format!("cannot open {}: {err}", copy.display())))?;
    let meta = source.metadata().map_err(|err| Some(format!("cannot read {}: {err}", copy.display())))?;
    let mode = meta.permissions().mode() & 0o777;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|m| m.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| u32::try_from(d.as_secs()).unwrap_or(0));
    let result = (|| {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&partial)
            .map_err(|err| Some(format!("cannot create {}: {err}", partial.display())))?;
        let _ = file.set_permissions(std::fs::Permissions::from_mode(mode));
        let name = copy.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let mut encoder = GzBuilder::new().filename(name).mtime(mtime).write(file, Compression::default());
        let mut buffer = vec![0u8; 64 * 1024];
        let mut since_check = 0usize;
        loop {
            let n = match source.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(Some(format!("cannot read {}: {err}", copy.display()))),
            };
            encoder.write_all(&buffer[..n]).map_err(|err| Some(format!("cannot write the archive: {err}")))?;
            since_check += n;
            if since_check >= CHUNK {
                since_check = 0;
                if cancel.is_cancelled() {
                    return Err(None);
                }
            }
        }
        let file = encoder.finish().map_err(|err| Some(format!("cannot finish the archive: {err}")))?;
        file.sync_all().map_err(|err| Some(format!("cannot sync the archive: {err}")))?;
        Ok(())
    })();
    if let Err(err) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(err);
    }
    std::fs::rename(&partial, &archive)
        .map_err(|err| Some(format!("cannot rename {} to {}: {err}", partial.display(), archive.display())))?;
    std::fs::remove_file(copy).map_err(|err| Some(format!("cannot remove {}: {err}", copy.display())))?;
    Ok(archive)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;

    fn params(dir: &Path) -> Params {
        Params {
            dir: dir.to_path_buf(),
            max_size: 100,
            max_age: Duration::from_secs(24 * 3600),
            keep_for: Duration::from_secs(14 * 24 * 3600),
            pattern: ".log".to_owned(),
        }
    }

    fn gunzip(path: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        GzDecoder::new(File::open(path).unwrap()).read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn names_are_told_apart() {
        let at = parse_stamp("20250102T030405Z").unwrap();
        assert_eq!(kind("app.log", ".log"), Kind::Log);
        assert_eq!(kind("app.log.20250102T030405Z.gz", ".log"), Kind::Archive(at));
        assert_eq!(kind("app.log.20250102T030405Z", ".log"), Kind::Copy);
        assert_eq!(kind("app.log.20250102T030405Z.gz.partial", ".log"), Kind::Other);
        assert_eq!(kind("app.log.1.gz", ".log"), Kind::Other);
        assert_eq!(kind("app.txt.20250102T030405Z.gz", ".log"), Kind::Other);
        assert_eq!(kind(".log", ".log"), Kind::Other);
        assert_eq!(kind("app.log.20251302T030405Z.gz", ".log"), Kind::Other);
        assert_eq!(kind("x.out", ".out"), Kind::Log);
    }

    #[test]
    fn rotates_big_files_keeps_small_ones_and_deletes_old_archives() {
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..5000u32).flat_map(|i| format!("line {i}\n").into_bytes()).collect();
        std::fs::write(dir.path().join("big.log"), &big).unwrap();
        std::fs::write(dir.path().join("small.log"), b"small\n").unwrap();
        std::fs::write(dir.path().join("app.log.20000101T000000Z.gz"), b"old").unwrap();
        std::fs::write(dir.path().join("app.log.29990101T000000Z.gz"), b"future").unwrap();
        std::os::unix::fs::symlink(dir.path().join("big.log"), dir.path().join("link.log")).unwrap();
        // A copy a dead replica left.
        std::fs::write(dir.path().join("crashed.log.20240101T000000Z"), b"left over\n").unwrap();

        let now = Utc::now();
        let out = rotate_dir(&params(dir.path()), &CancellationToken::new(), now).unwrap();
        let rotated = out["rotated"].as_array().unwrap();
        assert_eq!(rotated.len(), 2, "{out}");
        let fresh = rotated.iter().find(|r| r["file"].as_str().unwrap().ends_with("big.log")).unwrap();
        assert_eq!(fresh["bytes"], big.len());
        let archive = PathBuf::from(fresh["archive"].as_str().unwrap());
        assert_eq!(gunzip(&archive), big);
        assert_eq!(std::fs::metadata(dir.path().join("big.log")).unwrap().len(), 0);
        assert_eq!(std::fs::read(dir.path().join("small.log")).unwrap(), b"small\n");
        assert_eq!(gunzip(&dir.path().join("crashed.log.20240101T000000Z.gz")), b"left over\n");
        assert!(!dir.path().join("crashed.log.20240101T000000Z").exists());
        let deleted: Vec<&str> = out["deleted"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
        assert_eq!(deleted.len(), 1, "{deleted:?}");
        assert!(deleted[0].ends_with("app.log.20000101T000000Z.gz"), "{deleted:?}");
        assert!(dir.path().join("app.log.29990101T000000Z.gz").exists());
        assert!(std::fs::symlink_metadata(dir.path().join("link.log")).unwrap().file_type().is_symlink());
        // Nothing is left half-done.
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(!name.ends_with(".partial"), "{name}");
        }
        // Again: nothing is due.
        let again = rotate_dir(&params(dir.path()), &CancellationToken::new(), now).unwrap();
        assert_eq!(again["rotated"], json!([]), "{again}");
    }

    #[test]
    fn a_cancelled_run_stops_and_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("big.log"), vec![b'x'; 1000]).unwrap();
        let cancel = CancellationToken::new();
        cancel.cancel();
        let err = rotate_dir(&params(dir.path()), &cancel, Utc::now()).unwrap_err();
        assert!(err.retryable && err.message.contains("cancelled"), "{err}");
        assert_eq!(std::fs::metadata(dir.path().join("big.log")).unwrap().len(), 1000);
    }

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = rotate_dir(&params(&dir.path().join("nope")), &CancellationToken::new(), Utc::now()).unwrap_err();
        assert!(err.message.contains("cannot read the log directory"), "{err}");
    }
}
