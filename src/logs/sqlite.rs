//! Embedded store: one SQLite file in WAL mode. The full record is kept as JSON (the
//! source of truth) beside the columns queries filter on. Calls run on tokio's blocking
//! pool; one connection writes, another reads, so listing never waits for a batch insert.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::record::{clamp_limit, search_text, Cursor};
use super::{
    now_ms, BulkReviewOutcome, BulkTarget, Feedback, LogError, LogFilter, LogRecord, Order, Page,
    ReviewAction, ReviewState, TaskStats,
};

/// Schema migrations, applied in order; `PRAGMA user_version` is the number applied.
/// Append only: never edit a migration that has shipped.
const MIGRATIONS: &[&str] = &[
    // 1: the log table and its query indexes.
    "CREATE TABLE logs (
        id TEXT PRIMARY KEY NOT NULL,
        created_ms INTEGER NOT NULL,
        task TEXT NOT NULL,
        model TEXT NOT NULL,
        status TEXT NOT NULL,
        state TEXT NOT NULL,
        stored INTEGER NOT NULL,
        metadata TEXT NOT NULL,
        search TEXT NOT NULL,
        record TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX logs_created ON logs(created_ms, id);
    CREATE INDEX logs_task ON logs(task, created_ms, id);
    CREATE INDEX logs_state ON logs(state, created_ms, id);
    CREATE INDEX logs_task_state ON logs(task, state, created_ms, id);
    CREATE INDEX logs_stored ON logs(created_ms, id) WHERE stored = 1;",
];

#[derive(Debug, Clone, Default)]
pub struct SqliteOptions {
    /// `synchronous=FULL`: a commit survives power loss, at one fsync per batch. The default,
    /// `NORMAL`, survives process crashes only.
    pub synchronous_full: bool,
}

#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    write: Mutex<Connection>,
    read: Mutex<Connection>,
}

fn storage(e: rusqlite::Error) -> LogError {
    LogError::Storage(format!("sqlite: {e}"))
}

fn json_err(e: serde_json::Error) -> LogError {
    LogError::Storage(format!("stored log record is not valid: {e}"))
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: impl AsRef<Path>, opts: &SqliteOptions) -> Result<Self, LogError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| LogError::Storage(format!("cannot create {}: {e}", dir.display())))?;
        }
        let mut write = connect(&path, opts)?;
        migrate(&mut write)?;
        // Commits never checkpoint: SQLite's automatic checkpoint runs inside the commit that
        // crosses 1,000 WAL pages, copying pages and syncing the database file while every
        // request waiting for that commit (durable logging) waits too; a proxied request's
        // p99 grew by about 9 ms at 1,000 requests/s (`benches/results/proxy.md`). A thread
        // checkpoints instead, on its own connection, without blocking the writer.
        write.pragma_update(None, "wal_autocheckpoint", 0).map_err(storage)?;
        let read = connect(&path, opts)?;
        let checkpoints = connect(&path, opts)?;
        let inner = Arc::new(Inner { path, write: Mutex::new(write), read: Mutex::new(read) });
        let weak = Arc::downgrade(&inner);
        let spawned = std::thread::Builder::new().name("tunegate-log-checkpoint".into()).spawn(move || checkpoint_loop(&weak, &checkpoints));
        if let Err(e) = spawned {
            return Err(LogError::Storage(format!("cannot start the checkpoint thread: {e}")));
        }
        Ok(Self { inner })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn with_write<T, F>(&self, f: F) -> Result<T, LogError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, LogError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&mut inner.write.lock()))
            .await
            .map_err(|e| LogError::Storage(format!("sqlite task failed: {e}")))?
    }

    async fn with_read<T, F>(&self, f: F) -> Result<T, LogError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, LogError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner.read.lock()))
            .await
            .map_err(|e| LogError::Storage(format!("sqlite task failed: {e}")))?
    }

    pub async fn insert_batch(&self, records: &[LogRecord]) -> Result<usize, LogError> {
        let rows = records.iter().map(Row::from_record).collect::<Result<Vec<_>, _>>()?;
        self.with_write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(storage)?;
            let mut n = 0;
            {
                let mut stmt = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO logs
                         (id, created_ms, task, model, status, state, stored, metadata, search, record)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                    )
                    .map_err(storage)?;
                for r in &rows {
                    n += stmt
                        .execute(params![
                            r.id, r.created_ms, r.task, r.model, r.status, r.state, r.stored,
                            r.metadata, r.search, r.record
                        ])
                        .map_err(storage)?;
                }
            }
            tx.commit().map_err(storage)?;
            Ok(n)
        })
        .await
    }

    pub async fn get(&self, id: &str) -> Result<Option<LogRecord>, LogError> {
        let id = id.to_string();
        self.with_read(move |conn| get_in(conn, &id)).await
    }

    pub async fn list(
        &self,
        filter: &LogFilter,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page, LogError> {
        let cursor = cursor.map(|c| Cursor::decode(c, filter.order)).transpose()?;
        let limit = clamp_limit(limit);
        let filter = filter.clone();
        self.with_read(move |conn| {
            let mut records = select(conn, &filter, cursor.as_ref(), Some(limit + 1))?;
            let next_cursor = if records.len() > limit {
                records.truncate(limit);
                records.last().map(|r| {
                    Cursor { order: filter.order, created_ms: r.created_ms, id: r.id.clone() }
                        .encode()
                })
            } else {
                None
            };
            Ok(Page { records, next_cursor })
        })
        .await
    }

    pub async fn review(&self, id: &str, action: &ReviewAction) -> Result<LogRecord, LogError> {
        let id = id.to_string();
        let action = action.clone();
        self.with_write(move |conn| {
            let tx =
                conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(storage)?;
            let mut record = get_in(&tx, &id)?.ok_or_else(|| LogError::NotFound(id.clone()))?;
            action.apply(&mut record, now_ms())?;
            put_reviewed(&tx, &record)?;
            tx.commit().map_err(storage)?;
            Ok(record)
        })
        .await
    }

    /// One transaction for the whole bulk: it applies completely or not at all.
    pub async fn review_bulk(
        &self,
        target: &BulkTarget,
        action: &ReviewAction,
    ) -> Result<BulkReviewOutcome, LogError> {
        let target = target.clone();
        let action = action.clone();
        self.with_write(move |conn| {
            let tx =
                conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(storage)?;
            let now = now_ms();
            // Ok(true): reviewed; Ok(false): the action may not apply to this record.
            let apply = |mut record: LogRecord| -> Result<bool, LogError> {
                match action.apply(&mut record, now) {
                    Ok(()) => put_reviewed(&tx, &record).map(|()| true),
                    Err(LogError::IllegalTransition { .. }) => Ok(false),
                    Err(e) => Err(e),
                }
            };
            let mut outcomes = Vec::new();
            match &target {
                BulkTarget::Ids(ids) => {
                    for id in ids {
                        outcomes.push(match get_in(&tx, id)? {
                            Some(r) => apply(r)?,
                            None => false,
                        });
                    }
                }
                BulkTarget::Filter(filter) => {
                    for r in select(&tx, filter, None, None)? {
                        outcomes.push(apply(r)?);
                    }
                }
            }
            let reviewed = outcomes.iter().filter(|ok| **ok).count() as u64;
            let out = BulkReviewOutcome { reviewed, skipped: outcomes.len() as u64 - reviewed };
            tx.commit().map_err(storage)?;
            Ok(out)
        })
        .await
    }

    pub async fn update_metadata(
        &self,
        id: &str,
        metadata: BTreeMap<String, String>,
    ) -> Result<LogRecord, LogError> {
        self.modify(id, move |r| r.metadata = metadata).await
    }

    pub async fn set_feedback(&self, id: &str, feedback: Feedback) -> Result<LogRecord, LogError> {
        self.modify(id, move |r| r.feedback = Some(feedback)).await
    }

    async fn modify<F>(&self, id: &str, f: F) -> Result<LogRecord, LogError>
    where
        F: FnOnce(&mut LogRecord) + Send + 'static,
    {
        let id = id.to_string();
        self.with_write(move |conn| {
            let tx =
                conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(storage)?;
            let mut record = get_in(&tx, &id)?.ok_or_else(|| LogError::NotFound(id.clone()))?;
            f(&mut record);
            let row = Row::from_record(&record)?;
            tx.execute(
                "UPDATE logs SET metadata = ?2, record = ?3 WHERE id = ?1",
                params![row.id, row.metadata, row.record],
            )
            .map_err(storage)?;
            tx.commit().map_err(storage)?;
            Ok(record)
        })
        .await
    }

    pub async fn delete(&self, id: &str) -> Result<bool, LogError> {
        let id = id.to_string();
        self.with_write(move |conn| {
            let n = conn.execute("DELETE FROM logs WHERE id = ?1", params![id]).map_err(storage)?;
            Ok(n > 0)
        })
        .await
    }

    pub async fn task_stats(&self) -> Result<Vec<TaskStats>, LogError> {
        self.with_read(|conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT task, state, COUNT(*), MAX(created_ms) FROM logs
                     GROUP BY task, state ORDER BY task",
                )
                .map_err(storage)?;
            let rows = stmt
                .query_map([], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, i64>(2)?,
                        row.get::<_, i64>(3)?,
                    ))
                })
                .map_err(storage)?;
            let mut out: Vec<TaskStats> = Vec::new();
            for row in rows {
                let (task, state, count, newest) = row.map_err(storage)?;
                let count = u64::try_from(count).unwrap_or(0);
                if out.last().is_none_or(|s| s.task != task) {
                    out.push(TaskStats {
                        task,
                        pending: 0,
                        approved: 0,
                        rejected: 0,
                        total: 0,
                        newest_ms: None,
                    });
                }
                let Some(s) = out.last_mut() else { continue };
                match ReviewState::parse(&state)? {
                    ReviewState::Pending => s.pending += count,
                    ReviewState::Approved => s.approved += count,
                    ReviewState::Rejected => s.rejected += count,
                }
                s.total += count;
                s.newest_ms = Some(s.newest_ms.map_or(newest, |n| n.max(newest)));
            }
            Ok(out)
        })
        .await
    }

    pub async fn ping(&self) -> Result<(), LogError> {
        self.with_read(|conn| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(storage)).await
    }
}

/// Every second while the store is open: a passive checkpoint (copies what it can of the WAL
/// into the database without waiting for, or blocking, the writer; once a checkpoint has
/// copied every frame, the next commit starts the WAL over, so it stays small).
fn checkpoint_loop(store: &std::sync::Weak<Inner>, conn: &Connection) {
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        if store.strong_count() == 0 {
            return;
        }
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "log store checkpoint failed; retrying in a second");
        }
    }
}

fn connect(path: &Path, opts: &SqliteOptions) -> Result<Connection, LogError> {
    let conn = Connection::open(path).map_err(storage)?;
    conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(storage)?;
    let mode: String =
        conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(storage)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(LogError::Storage(format!(
            "{} cannot use WAL mode (got '{mode}')",
            path.display()
        )));
    }
    let sync = if opts.synchronous_full { "FULL" } else { "NORMAL" };
    conn.pragma_update(None, "synchronous", sync).map_err(storage)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<(), LogError> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(storage)?;
    let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    if version > known {
        return Err(LogError::Storage(format!(
            "the log database has schema version {version}, newer than this build knows ({known})"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(version).unwrap_or(0)) {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive).map_err(storage)?;
        tx.execute_batch(sql).map_err(storage)?;
        tx.pragma_update(None, "user_version", i64::try_from(i + 1).unwrap_or(i64::MAX))
            .map_err(storage)?;
        tx.commit().map_err(storage)?;
    }
    Ok(())
}

/// A record as the `logs` table stores it.
struct Row {
    id: String,
    created_ms: i64,
    task: String,
    model: String,
    status: String,
    state: &'static str,
    stored: bool,
    metadata: String,
    search: String,
    record: String,
}

impl Row {
    fn from_record(r: &LogRecord) -> Result<Self, LogError> {
        let enc =
            |e: serde_json::Error| LogError::Storage(format!("cannot encode log record: {e}"));
        Ok(Self {
            id: r.id.clone(),
            created_ms: r.created_ms,
            task: r.task.clone(),
            model: r.model.clone(),
            status: r.status.clone(),
            state: r.review.state.as_str(),
            stored: r.store,
            metadata: serde_json::to_string(&r.metadata).map_err(enc)?,
            search: search_text(r),
            record: serde_json::to_string(r).map_err(enc)?,
        })
    }
}

fn get_in(conn: &Connection, id: &str) -> Result<Option<LogRecord>, LogError> {
    let json: Option<String> = conn
        .prepare_cached("SELECT record FROM logs WHERE id = ?1")
        .map_err(storage)?
        .query_row(params![id], |r| r.get(0))
        .optional()
        .map_err(storage)?;
    json.map(|j| serde_json::from_str(&j).map_err(json_err)).transpose()
}

/// Writes back a record whose review changed (state, correction and search text).
fn put_reviewed(conn: &Connection, r: &LogRecord) -> Result<(), LogError> {
    let row = Row::from_record(r)?;
    conn.prepare_cached("UPDATE logs SET state = ?2, search = ?3, record = ?4 WHERE id = ?1")
        .map_err(storage)?
        .execute(params![row.id, row.state, row.search, row.record])
        .map_err(storage)?;
    Ok(())
}

/// Every record matching `filter` after `cursor`, in the filter's order.
fn select(
    conn: &Connection,
    filter: &LogFilter,
    cursor: Option<&Cursor>,
    limit: Option<usize>,
) -> Result<Vec<LogRecord>, LogError> {
    let mut sql = String::from("SELECT record FROM logs WHERE 1 = 1");
    let mut args: Vec<SqlValue> = Vec::new();
    let mut cond = |clause: &str, values: Vec<SqlValue>| {
        sql.push_str(" AND ");
        sql.push_str(clause);
        args.extend(values);
    };
    if let Some(t) = &filter.task {
        cond("task = ?", vec![t.clone().into()]);
    }
    if let Some(s) = filter.state {
        cond("state = ?", vec![s.as_str().to_string().into()]);
    }
    if let Some(s) = filter.since_ms {
        cond("created_ms >= ?", vec![s.into()]);
    }
    if let Some(u) = filter.until_ms {
        cond("created_ms < ?", vec![u.into()]);
    }
    if let Some(m) = &filter.model {
        cond("model = ?", vec![m.clone().into()]);
    }
    if let Some(s) = &filter.status {
        cond("status = ?", vec![s.clone().into()]);
    }
    if filter.stored_only {
        cond("stored = 1", vec![]);
    }
    if let Some(t) = &filter.tenant {
        cond("json_extract(record, '$.tenant') = ?", vec![t.clone().into()]);
    }
    for (k, v) in &filter.metadata {
        cond(
            "EXISTS (SELECT 1 FROM json_each(logs.metadata) AS m WHERE m.key = ? AND m.value = ?)",
            vec![k.clone().into(), v.clone().into()],
        );
    }
    if let Some(n) = filter.needle() {
        // `search` is already lowercased the same way; instr avoids LIKE's wildcards.
        cond("instr(search, ?) > 0", vec![n.into()]);
    }
    if let Some(c) = cursor {
        let op = match filter.order {
            Order::NewestFirst => "<",
            Order::OldestFirst => ">",
        };
        cond(
            &format!("(created_ms, id) {op} (?, ?)"),
            vec![c.created_ms.into(), c.id.clone().into()],
        );
    }
    sql.push_str(match filter.order {
        Order::NewestFirst => " ORDER BY created_ms DESC, id DESC",
        Order::OldestFirst => " ORDER BY created_ms ASC, id ASC",
    });
    if let Some(l) = limit {
        sql.push_str(&format!(" LIMIT {l}"));
    }
    let mut stmt = conn.prepare_cached(&sql).map_err(storage)?;
    let rows = stmt
        .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(0))
        .map_err(storage)?;
    rows.map(|j| serde_json::from_str(&j.map_err(storage)?).map_err(json_err)).collect()
}
