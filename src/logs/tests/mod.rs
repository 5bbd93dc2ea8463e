mod crash;
mod redis_server;
mod suite;
mod writer;

use serde_json::json;

use super::{
    LogRecord, LogStore, RedisConfig, RedisStore, RequestLog, Review, SqliteOptions, SqliteStore,
};
pub use redis_server::RedisServer;

pub type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A plain successful, pending record.
pub fn rec(id: &str, task: &str, created_ms: i64) -> LogRecord {
    LogRecord {
        id: id.to_string(),
        created_ms,
        task: task.to_string(),
        model: "smollm2".into(),
        base_model: "smollm2-135m-instruct".into(),
        adapter: None,
        request: RequestLog {
            messages: json!([
                {"role": "system", "content": format!("You help with {task}.")},
                {"role": "user", "content": format!("Question {id}")},
            ]),
            params: json!({"temperature": 0.2, "max_tokens": 64}),
        },
        response: format!("Answer {id}"),
        finish_reason: Some("stop".into()),
        prompt_tokens: 20,
        completion_tokens: 5,
        prompt_tokens_saved: 0,
        ttft_ms: Some(12),
        latency_ms: 40,
        status: "ok".into(),
        api_key_id: Some("key-1".into()),
        tenant: Some("tenant-1".into()),
        request_id: None,
        client_disconnected: false,
        metadata: Default::default(),
        store: false,
        review: Review::default(),
        feedback: None,
    }
}

pub struct SqliteFixture {
    pub store: LogStore,
    _dir: tempfile::TempDir,
}

pub fn sqlite_store() -> Result<SqliteFixture, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(dir.path().join("logs.db"), &SqliteOptions::default())?;
    Ok(SqliteFixture { store: store.into(), _dir: dir })
}

pub struct RedisFixture {
    pub store: LogStore,
    pub server: RedisServer,
}

pub fn redis_store() -> Result<RedisFixture, Box<dyn std::error::Error>> {
    let server = RedisServer::start()?;
    let mut cfg = RedisConfig::new(server.url());
    cfg.prefix = "test:".into();
    let store = RedisStore::connect(&cfg)?;
    Ok(RedisFixture { store: store.into(), server })
}

/// Runs each suite function against a fresh SQLite store and a fresh Redis store.
macro_rules! store_suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite_suite {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() -> TestResult {
                    let f = sqlite_store()?;
                    suite::$name(&f.store).await
                }
            )*
        }
        mod redis_suite {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() -> TestResult {
                    let f = redis_store()?;
                    suite::$name(&f.store).await
                }
            )*
        }
    };
}

store_suite!(
    insert_get_and_idempotent,
    pages_follow_cursors_without_gaps,
    filters_narrow_the_listing,
    search_is_case_insensitive_over_prompt_and_response,
    review_transitions,
    bulk_review,
    metadata_feedback_and_delete,
    task_stats_count_states,
    approved_examples_for_training,
    export_import_round_trip,
    import_rejects_bad_files_whole,
    racing_reviews_admit_exactly_one,
);

#[test]
fn sqlite_schema_is_versioned_and_reopens() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("sub").join("logs.db");
    drop(SqliteStore::open(&path, &SqliteOptions::default())?);
    let conn = rusqlite::Connection::open(&path)?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    assert_eq!(version, 1);
    let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
    assert_eq!(mode, "wal");
    conn.pragma_update(None, "user_version", 99)?;
    drop(conn);
    let err = SqliteStore::open(&path, &SqliteOptions { synchronous_full: true }).err();
    assert!(err.as_ref().is_some_and(|e| e.to_string().contains("schema version 99")), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn sqlite_data_survives_reopen() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("logs.db");
    let store: LogStore = SqliteStore::open(&path, &SqliteOptions::default())?.into();
    store.insert_batch(&[rec("a", "t", 1)]).await?;
    drop(store);
    let store: LogStore = SqliteStore::open(&path, &SqliteOptions::default())?.into();
    assert!(store.get("a").await?.is_some());
    Ok(())
}

#[test]
fn redactor_replaces_patterns_in_messages_and_response() -> TestResult {
    let r = super::Redactor::new(&[r"sk-[A-Za-z0-9]{8,}", r"\b\d{3}-\d{2}-\d{4}\b"])?;
    let mut record = rec("a", "t", 1);
    record.request.messages = json!([
        {"role": "user", "content": "key sk-abcdefgh1234 and ssn 123-45-6789"},
        {"role": "user", "content": [{"type": "text", "text": "again sk-zzzzzzzzzz"}, {"type": "image_url", "image_url": {"url": "x"}}]},
    ]);
    record.response = "your ssn is 123-45-6789".into();
    r.redact_record(&mut record);
    assert_eq!(record.request.messages[0]["content"], "key [REDACTED] and ssn [REDACTED]");
    assert_eq!(record.request.messages[1]["content"][0]["text"], "again [REDACTED]");
    assert_eq!(record.request.messages[1]["content"][1]["image_url"]["url"], "x");
    assert_eq!(record.response, "your ssn is [REDACTED]");
    let err = super::Redactor::new(&["("]).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("invalid redaction pattern '('"), "{err}");
    Ok(())
}

#[test]
fn record_serde_round_trips() -> TestResult {
    let mut r = rec("a", "t", 1);
    r.adapter = Some(super::AdapterRef { alias: "support".into(), generation: 3 });
    r.review.state = super::ReviewState::Approved;
    let json = serde_json::to_value(&r)?;
    assert_eq!(json["review"]["state"], "approved");
    assert_eq!(serde_json::from_value::<LogRecord>(json)?, r);
    Ok(())
}

#[test]
fn training_messages_flatten_content_parts() -> TestResult {
    let mut r = rec("a", "t", 1);
    r.request.messages = json!([
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": null, "tool_calls": []},
    ]);
    r.response = "three".into();
    let turns = r.training_messages();
    let pairs: Vec<_> = turns.iter().map(|m| (m.role.as_str(), m.content.as_str())).collect();
    assert_eq!(
        pairs,
        [("system", "Be brief."), ("user", "one\ntwo"), ("assistant", ""), ("assistant", "three")]
    );
    r.review.corrected_response = Some("fixed".into());
    assert_eq!(r.training_messages().last().map(|m| m.content.as_str()), Some("fixed"));
    Ok(())
}

/// Commits never checkpoint (the WAL takes every commit; the database file keeps its size),
/// and the store's checkpoint thread copies the WAL into the database within seconds.
#[tokio::test]
async fn sqlite_checkpoints_off_the_commit_path() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("logs.db");
    let store = SqliteStore::open(&path, &SqliteOptions::default())?;
    let size = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let empty = size(&path);
    // Well past SQLite's automatic checkpoint (1,000 pages of 4 KiB).
    let big = "x".repeat(4096);
    for batch in 0..60 {
        let records: Vec<LogRecord> = (0..20)
            .map(|i| {
                let mut r = rec(&format!("r{batch}-{i}"), "t", i64::from(batch) * 100 + i64::from(i));
                r.response = big.clone();
                r
            })
            .collect();
        store.insert_batch(&records).await?;
    }
    let wal = dir.path().join("logs.db-wal");
    assert!(size(&wal) > 4 << 20, "the WAL holds the commits ({} bytes)", size(&wal));
    assert!(size(&path) <= empty + (1 << 20), "a commit checkpointed: the database grew to {} bytes", size(&path));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while size(&path) < 4 << 20 {
        assert!(std::time::Instant::now() < deadline, "no checkpoint within 10 s (database {} bytes)", size(&path));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Ok(())
}
