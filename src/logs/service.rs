//! The gateway's handle on request logging: the store, the batch writer and the policy
//! from `[logs]` (who is not logged, which tasks auto-approve on feedback). The HTTP layer
//! asks it whether to log a request and hands it finished records; the review routes and
//! the CLI reach the store through it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::task::JoinHandle;

use super::{
    LogError, LogRecord, LogStore, LogWriter, RedisConfig, RedisStore, Redactor, SqliteOptions,
    SqliteStore, WriterConfig,
};
use crate::config::{LogBackend, LogsSection};

/// Longest a response waits for its record's commit before it is sent anyway (the record
/// stays queued and is still written; only the durability promise is broken, loudly).
const DURABLE_WAIT: Duration = Duration::from_secs(10);

/// Logging for one gateway process. Cheap to share behind an `Arc`.
pub struct Logs {
    pub store: LogStore,
    pub writer: LogWriter,
    durable: bool,
    disabled_tasks: Vec<String>,
    disabled_keys: Vec<String>,
    auto_approve: Vec<String>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// Opens the configured store (without the writer): for the CLI and for `Logs::start`.
pub fn open_store(cfg: &LogsSection, data_dir: &Path) -> Result<LogStore, LogError> {
    Ok(match cfg.store {
        LogBackend::Sqlite => SqliteStore::open(
            cfg.sqlite_file(data_dir),
            &SqliteOptions { synchronous_full: cfg.sqlite_synchronous_full },
        )?
        .into(),
        LogBackend::Redis => {
            let mut rc = RedisConfig::new(cfg.redis_url.clone());
            rc.prefix = cfg.redis_prefix.clone();
            RedisStore::connect(&rc)?.into()
        }
    })
}

impl Logs {
    /// Opens the store and starts the writer on the current tokio runtime. Records left in
    /// `<data_dir>/logs.spool.jsonl` by an earlier run are replayed first.
    pub fn start(cfg: &LogsSection, data_dir: &Path) -> Result<Arc<Self>, LogError> {
        let store = open_store(cfg, data_dir)?;
        let mut wc = WriterConfig::new(data_dir.join("logs.spool.jsonl"));
        wc.batch_size = cfg.batch_size;
        wc.capacity = cfg.queue_capacity;
        wc.flush_interval = Duration::from_millis(cfg.flush_interval_ms);
        wc.redactor = Redactor::new(&cfg.redact)?;
        std::fs::create_dir_all(data_dir).map_err(|e| {
            LogError::Storage(format!("cannot create {}: {e}", data_dir.display()))
        })?;
        let (writer, task) = LogWriter::spawn(store.clone(), wc);
        Ok(Arc::new(Self {
            store,
            writer,
            durable: cfg.durable,
            disabled_tasks: cfg.disabled_tasks.clone(),
            disabled_keys: cfg.disabled_keys.clone(),
            auto_approve: cfg.auto_approve_on_feedback.clone(),
            task: Mutex::new(Some(task)),
        }))
    }

    /// Whether requests of `task` made with key `key_id` are logged.
    pub fn enabled_for(&self, task: &str, key_id: &str) -> bool {
        !self.disabled_tasks.iter().any(|t| t == task) && !self.disabled_keys.iter().any(|k| k == key_id)
    }

    /// Whether positive feedback approves a pending record of `task`.
    pub fn auto_approves(&self, task: &str) -> bool {
        self.auto_approve.iter().any(|t| t == "*" || t == task)
    }

    /// Hands a finished record to the writer. With `durable` on, returns once the record is
    /// committed (or after [`DURABLE_WAIT`], logging why); never fails the request.
    pub async fn record(&self, record: LogRecord) {
        let id = record.id.clone();
        // Degraded (store and spool both failing, e.g. a full disk): the record waits in
        // memory and is retried, but the response does not hang on it.
        let degraded = self.writer.stats().degraded.load(std::sync::atomic::Ordering::Relaxed);
        let res = if self.durable && !degraded {
            match tokio::time::timeout(DURABLE_WAIT, self.writer.send_durable(record)).await {
                Ok(r) => r,
                Err(_) => Err(LogError::Unavailable(format!(
                    "not committed within {}s; still queued",
                    DURABLE_WAIT.as_secs()
                ))),
            }
        } else {
            self.writer.send(record).await
        };
        if let Err(e) = res {
            tracing::error!(id = %id, error = %e, "request log record not committed");
        }
    }

    /// Queues a record without waiting (for a client that has gone away).
    pub fn record_detached(self: &Arc<Self>, record: LogRecord) {
        let this = self.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    if let Err(e) = this.writer.send(record).await {
                        tracing::error!(error = %e, "request log record lost");
                    }
                });
            }
            Err(_) => tracing::error!(id = %record.id, "no runtime to log a request record on"),
        }
    }

    /// Drains the writer: everything sent is written (or left in the spool for the next
    /// start, which is logged).
    pub async fn shutdown(&self) {
        if let Err(e) = self.writer.shutdown().await {
            tracing::warn!(error = %e, "log writer shut down with records in the spool");
        }
        let task = self.task.lock().take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }
}
