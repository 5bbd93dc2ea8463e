//! Request logs: the record of every completion, its review state, and where it is kept.
//!
//! Owns the [`LogRecord`] and query types, the two stores behind [`LogStore`] (embedded
//! SQLite in WAL mode, and Redis for fleets), the batched [`LogWriter`] that keeps storage
//! off the request path (with a local spool when the store is down), redaction, and the
//! OpenAI fine-tuning JSONL export/import. HTTP routes, the review page and training
//! policy do not belong here; they call this module's API.
//!
//! Durability rule: a record is in the store at most `flush_interval` (plus the store's
//! write time) after [`LogWriter::send`] returns while the store is healthy, and once there
//! it survives a kill of the gateway process (SQLite: a WAL commit; Redis: acknowledged by
//! the server, then as durable as its own persistence, e.g. `appendonly yes` with
//! `appendfsync everysec` may lose a second if the Redis host crashes). [`LogWriter::flush`]
//! returns once everything sent before it is in the store. If the store fails, the batch
//! is appended to the spool file and fsync'd before the writer moves on, and replayed
//! until the store takes it. What sits in the channel or the current batch lives in memory
//! only: a graceful shutdown drains it, a SIGKILL loses it.
//! With SQLite `synchronous=NORMAL` (the default) the last commits may roll back on power
//! loss or an OS crash, never on a process crash; [`SqliteOptions::synchronous_full`]
//! closes that gap at the cost of an fsync per batch.

mod jsonl;
pub mod readiness;
mod record;
mod redact;
mod redis;
mod service;
mod sqlite;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

pub use jsonl::{export_jsonl, export_line, import_jsonl, ImportOptions};
pub use record::{
    cursor_after, now_ms, AdapterRef, BulkReviewOutcome, BulkTarget, Feedback, LogFilter,
    LogRecord, Order, Page, RequestLog, Review, ReviewAction, ReviewState, TaskStats,
    MAX_PAGE_LIMIT, STATUS_OK,
};
pub use redact::{Redactor, REDACTED};
pub use redis::{RedisConfig, RedisStore};
pub use service::{open_store, Logs};
pub use sqlite::{SqliteOptions, SqliteStore};
pub use writer::{read_spool, LogWriter, WriterConfig, WriterStats, WriterStatsSnapshot};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LogError {
    #[error("log record '{0}' not found")]
    NotFound(String),
    #[error("illegal review of '{id}': {reason}")]
    IllegalTransition { id: String, reason: String },
    #[error("{0}")]
    InvalidInput(String),
    /// The store cannot be reached now (Redis down, timeout); retrying later may work.
    #[error("log store unavailable: {0}")]
    Unavailable(String),
    /// The store answered with an error or holds data this build cannot read.
    #[error("log store error: {0}")]
    Storage(String),
    #[error("the log writer has shut down")]
    WriterClosed,
}

impl LogError {
    /// Stable snake_case kind for API error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "log_not_found",
            Self::IllegalTransition { .. } => "illegal_review_transition",
            Self::InvalidInput(_) => "invalid_log_query",
            Self::Unavailable(_) => "log_store_unavailable",
            Self::Storage(_) => "log_store_error",
            Self::WriterClosed => "log_writer_closed",
        }
    }

    /// The HTTP status an API should answer with.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::NotFound(_) => 404,
            Self::IllegalTransition { .. } => 409,
            Self::InvalidInput(_) => 400,
            Self::Unavailable(_) | Self::WriterClosed => 503,
            Self::Storage(_) => 500,
        }
    }

    pub(crate) fn with_id(self, id: &str) -> Self {
        match self {
            Self::IllegalTransition { reason, .. } => {
                Self::IllegalTransition { id: id.to_string(), reason }
            }
            other => other,
        }
    }
}

/// A log store. An enum rather than a trait object: two backends, `async fn` methods, no
/// boxing. Cloning is cheap and shares the connection(s).
#[derive(Clone)]
pub enum LogStore {
    Sqlite(SqliteStore),
    Redis(RedisStore),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            LogStore::Sqlite($s) => $e,
            LogStore::Redis($s) => $e,
        }
    };
}

impl LogStore {
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Redis(_) => "redis",
        }
    }

    /// Inserts records whose id is not stored yet; an existing id is left untouched, so a
    /// batch can be replayed safely. Returns how many were new.
    pub async fn insert_batch(&self, records: &[LogRecord]) -> Result<usize, LogError> {
        dispatch!(self, s => s.insert_batch(records).await)
    }

    pub async fn get(&self, id: &str) -> Result<Option<LogRecord>, LogError> {
        dispatch!(self, s => s.get(id).await)
    }

    /// Records matching `filter` in `(created_ms, id)` order (newest first by default),
    /// starting after `cursor`. `limit` is clamped to `1..=MAX_PAGE_LIMIT`.
    pub async fn list(
        &self,
        filter: &LogFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page, LogError> {
        dispatch!(self, s => s.list(filter, cursor, limit).await)
    }

    /// Reviews one record atomically; see [`ReviewAction`] for the rules.
    pub async fn review(&self, id: &str, action: &ReviewAction) -> Result<LogRecord, LogError> {
        action.validate().map_err(|e| e.with_id(id))?;
        dispatch!(self, s => s.review(id, action).await)
    }

    /// Reviews many records. Each record changes atomically (SQLite: the whole bulk is one
    /// transaction); records the action may not apply to are counted as skipped.
    pub async fn review_bulk(
        &self,
        target: &BulkTarget,
        action: &ReviewAction,
    ) -> Result<BulkReviewOutcome, LogError> {
        action.validate().map_err(|e| e.with_id("*"))?;
        let mut action = action.clone();
        if let BulkTarget::Filter(f) = target {
            action.expected_state = action.expected_state.or(f.state);
        }
        dispatch!(self, s => s.review_bulk(target, &action).await)
    }

    /// Replaces the record's metadata (OpenAI `POST /v1/chat/completions/{id}`).
    pub async fn update_metadata(
        &self,
        id: &str,
        metadata: BTreeMap<String, String>,
    ) -> Result<LogRecord, LogError> {
        dispatch!(self, s => s.update_metadata(id, metadata).await)
    }

    /// Replaces the record's client feedback.
    pub async fn set_feedback(&self, id: &str, feedback: Feedback) -> Result<LogRecord, LogError> {
        dispatch!(self, s => s.set_feedback(id, feedback).await)
    }

    /// Returns whether the record existed.
    pub async fn delete(&self, id: &str) -> Result<bool, LogError> {
        dispatch!(self, s => s.delete(id).await)
    }

    /// Counts per task, sorted by task name; tasks with no records are absent.
    pub async fn task_stats(&self) -> Result<Vec<TaskStats>, LogError> {
        dispatch!(self, s => s.task_stats().await)
    }

    /// Approved records of `task` whose request succeeded, oldest first (a stable order,
    /// so a dataset built from them hashes the same until the approvals change).
    pub async fn approved_examples(&self, task: &str) -> Result<Vec<LogRecord>, LogError> {
        let filter = LogFilter {
            task: Some(task.to_string()),
            state: Some(ReviewState::Approved),
            status: Some(STATUS_OK.to_string()),
            order: Order::OldestFirst,
            ..LogFilter::default()
        };
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let page = self.list(&filter, cursor.as_deref(), MAX_PAGE_LIMIT).await?;
            out.extend(page.records);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(out),
            }
        }
    }

    /// Cheap reachability check for `/ready`.
    pub async fn ping(&self) -> Result<(), LogError> {
        dispatch!(self, s => s.ping().await)
    }
}

impl From<SqliteStore> for LogStore {
    fn from(s: SqliteStore) -> Self {
        Self::Sqlite(s)
    }
}

impl From<RedisStore> for LogStore {
    fn from(s: RedisStore) -> Self {
        Self::Redis(s)
    }
}
