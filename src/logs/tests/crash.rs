//! The durability rule with SQLite, checked with a real SIGKILL: a child process (this test
//! binary, re-run on the ignored `crash_child`) writes through a `LogWriter` and is killed.
//! Records that `flush()` confirmed, and records sent at least a flush interval (plus slack
//! for the write) before the kill, must be in the database when it is reopened.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{rec, TestResult};
use crate::logs::{LogStore, LogWriter, SqliteOptions, SqliteStore, WriterConfig};

const DB_ENV: &str = "TUNEGATE_LOGS_CRASH_DB";
const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// Slack for the interval flush to commit on a loaded machine.
const SETTLE: Duration = Duration::from_secs(1);

#[tokio::test]
#[ignore = "helper process for sqlite_records_survive_sigkill"]
async fn crash_child() -> TestResult {
    let Ok(db) = std::env::var(DB_ENV) else { return Ok(()) };
    let store: LogStore = SqliteStore::open(&db, &SqliteOptions::default())?.into();
    let cfg = WriterConfig {
        batch_size: 10_000,
        flush_interval: FLUSH_INTERVAL,
        ..WriterConfig::new(format!("{db}.spool"))
    };
    let (writer, _handle) = LogWriter::spawn(store, cfg);
    for i in 0..50 {
        writer.send(rec(&format!("flushed-{i:03}"), "crash", i)).await?;
    }
    writer.flush().await?;
    for i in 0..50 {
        writer.send(rec(&format!("interval-{i:03}"), "crash", 100 + i)).await?;
    }
    tokio::time::sleep(FLUSH_INTERVAL + SETTLE).await;
    for i in 0..20 {
        writer.send(rec(&format!("unflushed-{i:03}"), "crash", 200 + i)).await?;
    }
    println!("CRASH-CHILD-READY");
    tokio::time::sleep(Duration::from_secs(60)).await;
    Ok(())
}

#[tokio::test]
async fn sqlite_records_survive_sigkill() -> TestResult {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("logs.db");
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--exact", "logs::tests::crash::crash_child", "--ignored", "--nocapture"])
        .env(DB_ENV, &db)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().ok_or("no child stdout")?;
    let ready = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("CRASH-CHILD-READY"));
    child.kill()?; // SIGKILL
    child.wait()?;
    assert!(ready, "the child exited before it was ready");

    let store: LogStore = SqliteStore::open(&db, &SqliteOptions::default())?.into();
    for i in 0..50 {
        for id in [format!("flushed-{i:03}"), format!("interval-{i:03}")] {
            assert!(store.get(&id).await?.is_some(), "{id} was lost");
        }
    }
    Ok(())
}
