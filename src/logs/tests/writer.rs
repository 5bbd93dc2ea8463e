use std::time::Duration;

use super::{rec, redis_store, sqlite_store, RedisServer, TestResult};
use crate::logs::{
    LogError, LogFilter, LogStore, LogWriter, Redactor, RedisConfig, RedisStore, WriterConfig,
};

fn config(dir: &std::path::Path) -> WriterConfig {
    WriterConfig {
        capacity: 64,
        batch_size: 16,
        flush_interval: Duration::from_millis(20),
        spool_path: dir.join("spool.jsonl"),
        retry_interval: Duration::from_millis(100),
        redactor: Redactor::default(),
    }
}

async fn count(store: &LogStore) -> Result<usize, LogError> {
    Ok(store.task_stats().await?.iter().map(|s| s.total as usize).sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drains_everything_on_shutdown_under_backpressure() -> TestResult {
    let f = sqlite_store()?;
    let dir = tempfile::tempdir()?;
    let cfg = WriterConfig { capacity: 2, batch_size: 16, ..config(dir.path()) };
    let (writer, handle) = LogWriter::spawn(f.store.clone(), cfg);
    let mut senders = Vec::new();
    for t in 0..8 {
        let w = writer.clone();
        senders.push(tokio::spawn(async move {
            for i in 0..125 {
                w.send(rec(&format!("w{t}-{i:03}"), "support", i)).await?;
            }
            Ok::<_, LogError>(())
        }));
    }
    for s in senders {
        s.await??;
    }
    writer.shutdown().await?;
    handle.await?;
    assert_eq!(count(&f.store).await?, 1000);
    let stats = writer.stats().snapshot();
    assert_eq!(stats.written, 1000);
    assert_eq!(stats.queue_depth, 0);
    assert_eq!(stats.spooled, 0);
    assert!(stats.backpressure_events > 0, "{stats:?}");
    assert_eq!(writer.send(rec("late", "support", 1)).await, Err(LogError::WriterClosed));
    assert_eq!(writer.shutdown().await, Err(LogError::WriterClosed));
    Ok(())
}

#[tokio::test]
async fn flushes_a_partial_batch_on_the_interval() -> TestResult {
    let f = sqlite_store()?;
    let dir = tempfile::tempdir()?;
    let cfg = WriterConfig { batch_size: 1000, ..config(dir.path()) };
    let (writer, _handle) = LogWriter::spawn(f.store.clone(), cfg);
    for i in 0..3 {
        writer.send(rec(&format!("i{i}"), "support", i)).await?;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while count(&f.store).await? < 3 {
        assert!(tokio::time::Instant::now() < deadline, "the interval flush never came");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    writer.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn redacts_before_storage() -> TestResult {
    let f = sqlite_store()?;
    let dir = tempfile::tempdir()?;
    let cfg = WriterConfig { redactor: Redactor::new(&["secret-\\d+"])?, ..config(dir.path()) };
    let (writer, _handle) = LogWriter::spawn(f.store.clone(), cfg);
    let mut r = rec("a", "support", 1);
    r.response = "the code is secret-1234".into();
    writer.send(r).await?;
    writer.flush().await?;
    let got = f.store.get("a").await?.ok_or("a missing")?;
    assert_eq!(got.response, "the code is [REDACTED]");
    writer.shutdown().await?;
    Ok(())
}

/// The fleet case: Redis dies mid-run (SIGKILL) and comes back; every record sent reaches
/// it, via the spool for those sent while it was down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_when_redis_is_killed_and_restarted() -> TestResult {
    let mut f = redis_store()?;
    let dir = tempfile::tempdir()?;
    let spool = dir.path().join("spool.jsonl");
    let (writer, handle) = LogWriter::spawn(f.store.clone(), config(dir.path()));
    for i in 0..150 {
        if i == 40 {
            writer.flush().await?;
            f.server.kill();
        }
        if i == 110 {
            f.server.restart()?;
        }
        writer.send(rec(&format!("k{i:03}"), "support", i)).await?;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    writer.shutdown().await?;
    handle.await?;
    let stats = writer.stats().snapshot();
    assert!(stats.failed_batches > 0 && stats.spooled > 0 && stats.replayed > 0, "{stats:?}");
    assert_eq!(stats.spool_pending, 0);
    assert_eq!(std::fs::metadata(&spool)?.len(), 0, "the spool is emptied after replay");
    let page = f.store.list(&LogFilter::default(), None, 1000).await?;
    let mut ids: Vec<_> = page.records.into_iter().map(|r| r.id).collect();
    ids.sort();
    let want: Vec<_> = (0..150).map(|i| format!("k{i:03}")).collect();
    assert_eq!(ids, want);
    Ok(())
}

/// A writer that could not reach its store leaves the spool behind; the next one replays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_a_spool_left_by_an_earlier_run() -> TestResult {
    let dir = tempfile::tempdir()?;
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let dead: LogStore =
        RedisStore::connect(&RedisConfig::new(format!("redis://127.0.0.1:{dead_port}/")))?.into();
    assert!(matches!(dead.ping().await, Err(LogError::Unavailable(_))));
    let (writer, handle) = LogWriter::spawn(dead, config(dir.path()));
    for i in 0..5 {
        writer.send(rec(&format!("s{i}"), "support", i)).await?;
    }
    assert!(matches!(writer.flush().await, Err(LogError::Unavailable(_))));
    assert!(matches!(writer.shutdown().await, Err(LogError::Unavailable(_))));
    handle.await?;
    assert_eq!(writer.stats().snapshot().spool_pending, 5);
    let spool = std::fs::read_to_string(dir.path().join("spool.jsonl"))?;
    assert_eq!(spool.lines().count(), 5);

    let server = RedisServer::start()?;
    let live: LogStore = RedisStore::connect(&RedisConfig::new(server.url()))?.into();
    let (writer, handle) = LogWriter::spawn(live.clone(), config(dir.path()));
    writer.flush().await?;
    assert_eq!(count(&live).await?, 5);
    writer.shutdown().await?;
    handle.await?;
    assert_eq!(writer.stats().snapshot().replayed, 5);
    Ok(())
}

/// A torn write (a UTF-8 character cut in half, no newline: what a full disk leaves) costs
/// only that line: the records before and after it are replayed, the torn bytes are kept
/// in `<spool>.corrupt`, and a later append starts on a fresh line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_spool_line_loses_no_other_record() -> TestResult {
    let dir = tempfile::tempdir()?;
    let spool = dir.path().join("spool.jsonl");
    let good = |id: &str| -> Result<Vec<u8>, serde_json::Error> {
        let mut line = serde_json::to_vec(&rec(id, "support", 1))?;
        line.push(b'\n');
        Ok(line)
    };
    let mut bytes = good("before")?;
    let torn = serde_json::to_vec(&rec("torn", "support", 2))?;
    let cut = torn.len() / 2;
    bytes.extend_from_slice(&torn[..cut]);
    bytes.extend_from_slice(&"é".as_bytes()[..1]);
    std::fs::write(&spool, &bytes)?;
    // An append after the tear (store down: the batch goes to the spool).
    let dead_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let dead: LogStore = RedisStore::connect(&RedisConfig::new(format!("redis://127.0.0.1:{dead_port}/")))?.into();
    let (writer, handle) = LogWriter::spawn(dead, config(dir.path()));
    writer.send(rec("after", "support", 3)).await?;
    assert!(matches!(writer.shutdown().await, Err(LogError::Unavailable(_))));
    handle.await?;

    let f = sqlite_store()?;
    let (writer, handle) = LogWriter::spawn(f.store.clone(), config(dir.path()));
    writer.flush().await?;
    writer.shutdown().await?;
    handle.await?;
    for id in ["before", "after"] {
        assert!(f.store.get(id).await?.is_some(), "{id} was lost");
    }
    assert_eq!(writer.stats().snapshot().spool_corrupt_lines, 1);
    let mut corrupt_path = spool.into_os_string();
    corrupt_path.push(".corrupt");
    let corrupt = std::fs::read(corrupt_path)?;
    assert!(corrupt.starts_with(&torn[..cut]), "the torn line is kept aside");
    Ok(())
}
