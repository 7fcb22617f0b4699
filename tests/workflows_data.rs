//! The data workflows end to end, through real replicas of our binary on a real Redis:
//! `database-backup` against a real PostgreSQL that the test starts (its dump restored into a
//! fresh database and compared table by table), and `log-rotation` in temporary directories.
//! The workflows are the built-in registry's entries, verbatim; their parameters come from the
//! replica's environment, as in production. No test asserts on how long things took.

use crate::util::{PostgresServer, RedisServer, Replica, ReplicaConfig, free_port, workflows_file};
use serde_json::{Value, json};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// `database-backup`, verbatim from the built-in registry.
const DATABASE_BACKUP: &str = r#"
[[workflow]]
id = "database-backup"
description = "Daily PostgreSQL backup"
schedule = "0 2 * * *"
overlap = "skip"
[[workflow.step]]
id = "dump"
action = "builtin"
when = "${env.DATABASE_URL:-}"
with = { name = "pg_backup", database_url = "${env.DATABASE_URL:-}", dir = "${env.BACKUP_DIR:-/var/backups/molochain}", keep = "${env.BACKUP_KEEP:-7}" }
timeout = "1h"
retry = { max_attempts = 3, initial_backoff = "1m", max_backoff = "10m" }
[[workflow.step]]
id = "report-failure"
action = "notify"
when = "${steps.dump.removedErrors}"
with = { channel = "ops", severity = "warning", message = { text = "old backups could not all be removed", details = "${steps.dump}" } }
"#;

/// `log-rotation`, verbatim from the built-in registry.
const LOG_ROTATION: &str = r#"
[[workflow]]
id = "log-rotation"
description = "Rotate and cleanup log files"
schedule = "0 0 * * *"
overlap = "skip"
[[workflow.step]]
id = "rotate"
action = "builtin"
when = "${env.LOG_DIR:-}"
with = { name = "log_rotation", dir = "${env.LOG_DIR:-}", max_size = "${env.LOG_MAX_BYTES:-10485760}", max_age = "${env.LOG_MAX_AGE:-1d}", keep_for = "${env.LOG_RETENTION:-14d}" }
timeout = "30m"
"#;

const RUN_LIMIT: Duration = Duration::from_secs(180);

/// A replica serving `toml`, with `env` (the workflow's configuration) on a private Redis.
struct Setup {
    _redis: RedisServer,
    scratch: tempfile::TempDir,
    replica: Replica,
}

fn setup(toml: &str, env: &[(&str, String)]) -> Setup {
    let redis = RedisServer::start();
    let scratch = tempfile::tempdir().expect("tempdir");
    let file = workflows_file(scratch.path(), toml);
    let mut config = ReplicaConfig::new(Some(redis.url()), Some(&file), scratch.path());
    for (key, value) in env {
        config = config.env(key, value);
    }
    let replica = config.start("data-1");
    Setup { _redis: redis, scratch, replica }
}

/// Triggers `workflow`, waits for the end of the run; returns the run.
fn run_to_end(replica: &Replica, workflow: &str) -> Value {
    let run_id = replica.trigger(workflow, json!({}));
    replica.wait_terminal(&run_id, RUN_LIMIT)
}

fn step<'a>(run: &'a Value, id: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["id"] == id))
        .unwrap_or_else(|| panic!("no step {id}: {run}"))
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("list {}: {err}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Whether `name` is `<prefix>-YYYYmmddTHHMMSSZ.dump`.
fn is_backup_name(name: &str, prefix: &str) -> bool {
    let Some(stamp) = name.strip_prefix(prefix).and_then(|n| n.strip_prefix('-')).and_then(|n| n.strip_suffix(".dump"))
    else {
        return false;
    };
    let b = stamp.as_bytes();
    b.len() == 16 && b[8] == b'T' && b[15] == b'Z' && b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit)
}

// ---- database-backup ----

/// A small database with several kinds of data: text that needs quoting, NULLs, arrays, JSON,
/// bytes, numerics, time stamps, a foreign key, a view and sequences.
const SCHEMA_AND_DATA: &str = r#"
CREATE TABLE users (
    id serial PRIMARY KEY,
    email text NOT NULL UNIQUE,
    name text,
    created_at timestamptz NOT NULL DEFAULT '2025-01-02 03:04:05+00'
);
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    user_id int NOT NULL REFERENCES users(id),
    amount numeric(12, 2) NOT NULL,
    note text,
    tags text[],
    meta jsonb
);
CREATE TABLE events (id int PRIMARY KEY, payload bytea, at timestamptz);
INSERT INTO users (email, name)
    SELECT 'user' || i || '@example.test', 'User ' || i || E' \'quoted\' \\ tab\there ü\nnext line'
    FROM generate_series(1, 50) i;
INSERT INTO orders (user_id, amount, note, tags, meta)
    SELECT 1 + (i % 50), i * 1.25, CASE WHEN i % 3 = 0 THEN NULL ELSE 'note ' || i END,
           ARRAY['a', 'b' || i], jsonb_build_object('i', i, 'even', i % 2 = 0)
    FROM generate_series(1, 200) i;
INSERT INTO events
    SELECT i, decode(md5(i::text), 'hex'), '2025-01-01 00:00:00+00'::timestamptz + i * interval '1 hour'
    FROM generate_series(1, 30) i;
CREATE VIEW big_orders AS SELECT * FROM orders WHERE amount > 100;
"#;

/// Everything the comparison looks at in `database`: its tables and views, each table's rows (all
/// columns, in key order, as `COPY` writes them), and its sequences' positions.
fn contents(pg: &PostgresServer, database: &str) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    let tables = pg.psql(
        database,
        "SELECT table_name || ':' || table_type FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1;",
    );
    seen.push(("tables".to_owned(), tables.clone()));
    for line in tables.lines() {
        let Some((table, "BASE TABLE")) = line.split_once(':') else { continue };
        let count = pg.psql(database, &format!("SELECT count(*) FROM {table};"));
        seen.push((format!("{table} rows"), count.trim().to_owned()));
        seen.push((
            format!("{table} data"),
            pg.psql(database, &format!("COPY (SELECT * FROM {table} ORDER BY 1) TO STDOUT;")),
        ));
    }
    let sequences =
        pg.psql(database, "SELECT sequencename || '=' || coalesce(last_value, 0) FROM pg_sequences ORDER BY 1;");
    seen.push(("sequences".to_owned(), sequences));
    seen
}

#[test]
fn database_backup_dumps_a_database_that_restores_into_a_fresh_one_with_the_same_data() {
    let pg = PostgresServer::start();
    pg.create_database("molochain");
    pg.psql("molochain", SCHEMA_AND_DATA);
    let backups = tempfile::tempdir().expect("tempdir");
    // A directory that does not exist yet: the backup creates it.
    let dir = backups.path().join("molochain");
    let url = pg.url("molochain");
    let setup = setup(
        DATABASE_BACKUP,
        &[("DATABASE_URL", url.clone()), ("BACKUP_DIR", dir.display().to_string()), ("BACKUP_KEEP", "7".into())],
    );

    let run = run_to_end(&setup.replica, "database-backup");
    assert_eq!(run["status"], "completed", "{run}");
    let output = &step(&run, "dump")["output"];
    assert_eq!(step(&run, "report-failure")["output"], json!({ "skipped": true }), "{run}");
    let file = PathBuf::from(output["file"].as_str().unwrap_or_else(|| panic!("no file: {output}")));
    assert_eq!(file.parent(), Some(dir.as_path()), "{output}");
    let name = file.file_name().unwrap().to_str().unwrap().to_owned();
    assert!(is_backup_name(&name, "molochain"), "{name}");
    assert_eq!(output["bytes"].as_u64(), Some(std::fs::metadata(&file).unwrap().len()), "{output}");
    assert_eq!(output["removed"], json!([]), "{output}");
    assert_eq!(output["removedErrors"], json!([]), "{output}");
    // Nothing half-written is left, and nothing else is there.
    assert_eq!(names_in(&dir), vec![name.clone()]);
    // A custom-format archive.
    let mut magic = [0u8; 5];
    std::fs::File::open(&file).unwrap().read_exact(&mut magic).unwrap();
    assert_eq!(&magic, b"PGDMP");

    // The table of contents the built-in counted is the one pg_restore lists.
    let listing = pg.tool("pg_restore").arg("--list").arg(&file).output().expect("pg_restore --list");
    assert!(listing.status.success(), "{}", String::from_utf8_lossy(&listing.stderr));
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    let entries = listing.lines().filter(|l| !l.trim().is_empty() && !l.starts_with(';')).count() as u64;
    assert_eq!(output["entries"].as_u64(), Some(entries), "{output}");
    for table in ["TABLE public users", "TABLE public orders", "TABLE public events", "VIEW public big_orders"] {
        assert!(listing.contains(table), "{table} missing from:\n{listing}");
    }

    // Restored into a fresh database, the data are the same.
    pg.create_database("restored");
    let restore = pg
        .tool("pg_restore")
        .args(["--no-owner", "--exit-on-error", "--dbname", "restored"])
        .arg(&file)
        .output()
        .expect("pg_restore");
    assert!(restore.status.success(), "pg_restore: {}", String::from_utf8_lossy(&restore.stderr));
    let original = contents(&pg, "molochain");
    let restored = contents(&pg, "restored");
    for ((what, before), (_, after)) in original.iter().zip(&restored) {
        assert_eq!(before, after, "{what} differs after the restore");
    }
    assert_eq!(original.len(), restored.len());
    let rows = |table: &str| original.iter().find(|(w, _)| w == &format!("{table} rows")).unwrap().1.clone();
    assert_eq!((rows("users"), rows("orders"), rows("events")), ("50".into(), "200".into(), "30".into()));

    // The password is nowhere: not in the run, not in the replica's log.
    let everything = format!("{run}{}", setup.replica.log_text());
    for secret in [pg.password.as_str(), &url] {
        assert!(!everything.contains(secret), "`{secret}` leaked");
    }
}

#[test]
fn database_backup_keeps_the_newest_backups_of_its_own_pattern_only() {
    let pg = PostgresServer::start();
    pg.create_database("shop");
    pg.psql(
        "shop",
        "CREATE TABLE items (id int PRIMARY KEY, name text); INSERT INTO items VALUES (1, 'one'), (2, 'two');",
    );
    let backups = tempfile::tempdir().expect("tempdir");
    let dir = backups.path();
    // An old backup of the same pattern (removed in its turn), and files that are none of ours.
    let old = "shop-20000101T000000Z.dump";
    let foreign = ["other-20000101T000000Z.dump", "shop-manual.dump", "notes.txt", "shop-20000101T000000Z.dump.bak"];
    for name in std::iter::once(old).chain(foreign) {
        std::fs::write(dir.join(name), name.as_bytes()).unwrap();
    }
    let setup = setup(
        DATABASE_BACKUP,
        &[("DATABASE_URL", pg.url("shop")), ("BACKUP_DIR", dir.display().to_string()), ("BACKUP_KEEP", "2".into())],
    );

    let mut made = Vec::new();
    let mut removed = Vec::new();
    for round in 1..=3 {
        let run = run_to_end(&setup.replica, "database-backup");
        assert_eq!(run["status"], "completed", "round {round}: {run}");
        let output = &step(&run, "dump")["output"];
        assert_eq!(output["removedErrors"], json!([]), "{output}");
        made.push(output["file"].as_str().unwrap().to_owned());
        removed.push(output["removed"].clone());
    }
    let made: Vec<String> =
        made.iter().map(|f| Path::new(f).file_name().unwrap().to_str().unwrap().to_owned()).collect();
    assert!(made.iter().all(|name| is_backup_name(name, "shop")), "{made:?}");
    assert!(made[0] < made[1] && made[1] < made[2], "three distinct, ordered names: {made:?}");
    let path = |name: &str| dir.join(name).display().to_string();
    assert_eq!(removed, vec![json!([]), json!([path(old)]), json!([path(&made[0])])]);

    let mut expected: Vec<String> =
        foreign.iter().map(|s| s.to_string()).chain([made[1].clone(), made[2].clone()]).collect();
    expected.sort();
    assert_eq!(names_in(dir), expected);
    for name in foreign {
        assert_eq!(std::fs::read(dir.join(name)).unwrap(), name.as_bytes(), "{name} was touched");
    }
}

#[test]
fn database_backup_with_an_unreachable_database_retries_then_fails_without_showing_the_password() {
    // Nothing listens there: the connection is refused.
    let url = format!("postgres://backup:Sup3rS3cretPw@127.0.0.1:{}/molochain", free_port());
    // The registry's entry with the retry policy's backoffs shortened (1 m and 2 m in production),
    // so that the three attempts take seconds.
    let toml = DATABASE_BACKUP.replace(
        r#"retry = { max_attempts = 3, initial_backoff = "1m", max_backoff = "10m" }"#,
        r#"retry = { max_attempts = 3, initial_backoff = "200ms", max_backoff = "1s" }"#,
    );
    assert_ne!(toml, DATABASE_BACKUP, "the retry line to shorten is there");
    let backups = tempfile::tempdir().expect("tempdir");
    let setup = setup(&toml, &[("DATABASE_URL", url.clone()), ("BACKUP_DIR", backups.path().display().to_string())]);

    let run_id = setup.replica.trigger("database-backup", json!({}));
    let run = setup.replica.wait_terminal(&run_id, RUN_LIMIT);
    assert_eq!(run["status"], "failed", "{run}");
    let dump = step(&run, "dump");
    assert_eq!(dump["attempts"], 3, "{run}");
    let error = dump["error"].as_str().unwrap_or_default();
    assert!(error.contains("pg_dump") && error.contains("refused"), "a clear error: {error}");
    assert!(error.contains("postgres://backup:***@127.0.0.1"), "which database, redacted: {error}");
    assert!(run["error"].as_str().unwrap_or_default().contains("refused"), "{run}");

    let history = setup.replica.history(&run_id);
    let failures: Vec<&Value> = history.iter().filter(|t| t["type"] == "step_failed").collect();
    assert_eq!(failures.len(), 3, "three failed attempts recorded: {history:?}");
    assert!(failures.iter().all(|f| f["error"].as_str().is_some_and(|e| e.contains("refused"))), "{failures:?}");
    let everything = format!("{run}{}{}", json!(history), setup.replica.log_text());
    assert!(!everything.contains("Sup3rS3cretPw"), "the password leaked:\n{everything}");
    // No partial dump is left behind.
    assert_eq!(names_in(backups.path()), Vec::<String>::new());
}

// ---- log-rotation ----

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap_or_else(|err| panic!("{}: {err}", path.display())))
        .read_to_end(&mut out)
        .unwrap_or_else(|err| panic!("gunzip {}: {err}", path.display()));
    out
}

fn set_age(path: &Path, age: Duration) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.set_modified(SystemTime::now() - age).unwrap();
}

fn stamp_ago(age: Duration) -> String {
    (chrono::Utc::now() - chrono::Duration::from_std(age).unwrap()).format("%Y%m%dT%H%M%SZ").to_string()
}

#[test]
fn log_rotation_rotates_big_and_old_logs_and_deletes_old_archives() {
    const DAY: Duration = Duration::from_secs(24 * 3600);
    let logs = tempfile::tempdir().expect("tempdir");
    let dir = logs.path();
    let outside = tempfile::tempdir().expect("tempdir");

    let big: Vec<u8> = (0..200u32).flat_map(|i| format!("{i:04} big log line\n").into_bytes()).collect();
    assert!(big.len() > 2000);
    std::fs::write(dir.join("big.log"), &big).unwrap();
    // A writer holds it open (appending), as a running service would.
    let mut writer = std::fs::OpenOptions::new().append(true).open(dir.join("big.log")).unwrap();
    std::fs::write(dir.join("old.log"), b"an old line\n").unwrap();
    set_age(&dir.join("old.log"), 3 * DAY);
    std::fs::write(dir.join("fresh.log"), b"a fresh small line\n").unwrap();
    std::fs::write(dir.join("empty.log"), b"").unwrap();
    set_age(&dir.join("empty.log"), 3 * DAY);
    std::fs::write(dir.join("big.txt"), &big).unwrap();
    std::fs::create_dir(dir.join("sub")).unwrap();
    std::fs::write(dir.join("sub/deep.log"), &big).unwrap();
    std::fs::write(outside.path().join("target.log"), &big).unwrap();
    std::os::unix::fs::symlink(outside.path().join("target.log"), dir.join("link.log")).unwrap();
    // Archives: one past the 14-day retention, one within it, and look-alikes that are not ours.
    let expired = format!("app.log.{}.gz", stamp_ago(20 * DAY));
    let recent = format!("app.log.{}.gz", stamp_ago(2 * DAY));
    let strangers = ["app.log.1.gz", "backup.tar.gz", "app.txt.20000101T000000Z.gz"];
    for name in [expired.as_str(), recent.as_str()].into_iter().chain(strangers) {
        std::fs::write(dir.join(name), b"archive").unwrap();
        set_age(&dir.join(name), 30 * DAY);
    }

    let setup = setup(LOG_ROTATION, &[("LOG_DIR", dir.display().to_string()), ("LOG_MAX_BYTES", "1000".into())]);
    let run = run_to_end(&setup.replica, "log-rotation");
    assert_eq!(run["status"], "completed", "{run}");
    let output = &step(&run, "rotate")["output"];

    let mut rotated: Vec<(String, u64, String)> = output["rotated"]
        .as_array()
        .unwrap_or_else(|| panic!("{output}"))
        .iter()
        .map(|r| {
            (
                r["file"].as_str().unwrap().to_owned(),
                r["bytes"].as_u64().unwrap(),
                r["archive"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    rotated.sort();
    let path = |name: &str| dir.join(name).display().to_string();
    assert_eq!(
        rotated.iter().map(|(f, b, _)| (f.clone(), *b)).collect::<Vec<_>>(),
        vec![(path("big.log"), big.len() as u64), (path("old.log"), 12)],
        "{output}"
    );
    for ((file, _, archive), content) in rotated.iter().zip([&big[..], b"an old line\n"]) {
        let archive = PathBuf::from(archive);
        let name = archive.file_name().unwrap().to_str().unwrap();
        let stamp = name
            .strip_prefix(Path::new(file).file_name().unwrap().to_str().unwrap())
            .and_then(|s| s.strip_prefix('.'))
            .and_then(|s| s.strip_suffix(".gz"))
            .unwrap_or_else(|| panic!("archive name {name}"));
        assert!(stamp.len() == 16 && stamp.ends_with('Z') && stamp.as_bytes()[8] == b'T', "{name}");
        assert_eq!(archive.parent(), Some(dir), "{name}");
        assert_eq!(gunzip(&archive), content, "{name}");
        // The original is truncated, not replaced.
        assert_eq!(std::fs::metadata(file).unwrap().len(), 0, "{file}");
    }
    assert_eq!(output["deleted"], json!([path(&expired)]), "{output}");

    // The writer keeps writing to the same (truncated) file.
    writer.write_all(b"after rotation\n").unwrap();
    drop(writer);
    assert_eq!(std::fs::read(dir.join("big.log")).unwrap(), b"after rotation\n");
    // Everything else is untouched.
    assert_eq!(std::fs::read(dir.join("fresh.log")).unwrap(), b"a fresh small line\n");
    assert_eq!(std::fs::read(dir.join("big.txt")).unwrap(), big);
    assert_eq!(std::fs::read(dir.join("sub/deep.log")).unwrap(), big);
    assert_eq!(std::fs::read(outside.path().join("target.log")).unwrap(), big);
    assert!(std::fs::symlink_metadata(dir.join("link.log")).unwrap().file_type().is_symlink());
    let mut expected: Vec<String> =
        ["big.log", "old.log", "fresh.log", "empty.log", "big.txt", "sub", "link.log", recent.as_str()]
            .iter()
            .map(|s| s.to_string())
            .chain(strangers.iter().map(|s| s.to_string()))
            .chain(rotated.iter().map(|(_, _, a)| Path::new(a).file_name().unwrap().to_str().unwrap().to_owned()))
            .collect();
    expected.sort();
    assert_eq!(names_in(dir), expected, "no copy or partial archive is left");

    // A second run finds nothing due.
    let again = run_to_end(&setup.replica, "log-rotation");
    assert_eq!(again["status"], "completed", "{again}");
    let output = &step(&again, "rotate")["output"];
    assert_eq!((&output["rotated"], &output["deleted"]), (&json!([]), &json!([])), "{output}");
    drop(setup.scratch);
}
