//! The batch writer: request handlers hand records to a bounded channel and go on; one
//! background task redacts them, groups them into batches, and writes a batch when it is
//! full or when `flush_interval` has passed. When the store fails, the batch is appended to
//! a local JSONL spool file (fsync'd) and replayed until the store takes it. Replays are
//! safe to repeat: `insert_batch` ignores ids it already has.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{LogError, LogRecord, LogStore, Redactor};

#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Records the channel holds before `send` waits.
    pub capacity: usize,
    pub batch_size: usize,
    /// Longest a record waits in a partial batch.
    pub flush_interval: Duration,
    /// Where batches go while the store fails (e.g. `data/logs.spool.jsonl`).
    pub spool_path: PathBuf,
    /// How often the store is retried while the spool holds records.
    pub retry_interval: Duration,
    pub redactor: Redactor,
}

impl WriterConfig {
    pub fn new(spool_path: impl Into<PathBuf>) -> Self {
        Self {
            capacity: 4096,
            batch_size: 256,
            flush_interval: Duration::from_millis(200),
            spool_path: spool_path.into(),
            retry_interval: Duration::from_secs(1),
            redactor: Redactor::default(),
        }
    }
}

/// Counters for metrics; read them with [`WriterStats::snapshot`].
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Records the store accepted (first writes and replays; a replayed duplicate counts).
    pub written: AtomicU64,
    /// Store writes that failed (each sent its batch to the spool).
    pub failed_batches: AtomicU64,
    /// `send` calls that found the channel full and had to wait.
    pub backpressure_events: AtomicU64,
    /// Records in the channel now.
    pub queue_depth: AtomicU64,
    /// Records appended to the spool, ever.
    pub spooled: AtomicU64,
    /// Records in the spool now, waiting for replay.
    pub spool_pending: AtomicU64,
    /// Records replayed from the spool into the store.
    pub replayed: AtomicU64,
    /// Spool appends that failed; those records stay in memory and are retried.
    pub spool_errors: AtomicU64,
    /// Unreadable spool lines skipped on replay (a torn last write before a crash).
    pub spool_corrupt_lines: AtomicU64,
    /// Set while neither the store nor the spool takes records (disk full and store down):
    /// records wait in memory, and durable requests stop waiting for a commit that cannot
    /// come soon (they would each hang for the durable wait).
    pub degraded: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WriterStatsSnapshot {
    pub written: u64,
    pub failed_batches: u64,
    pub backpressure_events: u64,
    pub queue_depth: u64,
    pub spooled: u64,
    pub spool_pending: u64,
    pub replayed: u64,
    pub spool_errors: u64,
    pub spool_corrupt_lines: u64,
}

impl WriterStats {
    pub fn snapshot(&self) -> WriterStatsSnapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WriterStatsSnapshot {
            written: g(&self.written),
            failed_batches: g(&self.failed_batches),
            backpressure_events: g(&self.backpressure_events),
            queue_depth: g(&self.queue_depth),
            spooled: g(&self.spooled),
            spool_pending: g(&self.spool_pending),
            replayed: g(&self.replayed),
            spool_errors: g(&self.spool_errors),
            spool_corrupt_lines: g(&self.spool_corrupt_lines),
        }
    }
}

fn add(a: &AtomicU64, n: usize) {
    a.fetch_add(n as u64, Ordering::Relaxed);
}

type Ack = oneshot::Sender<Result<(), LogError>>;

enum Msg {
    Record(Box<LogRecord>),
    /// A record whose sender waits until it is committed (store or spool).
    Durable(Box<LogRecord>, Ack),
    Flush(Ack),
    Shutdown(Ack),
}

/// Handle to the writer task; clone it freely.
#[derive(Clone)]
pub struct LogWriter {
    tx: mpsc::Sender<Msg>,
    stats: Arc<WriterStats>,
}

impl LogWriter {
    /// Starts the writer task. Records left in the spool by an earlier run are replayed
    /// first. Await the handle after [`LogWriter::shutdown`].
    pub fn spawn(store: LogStore, cfg: WriterConfig) -> (Self, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(cfg.capacity.max(1));
        let stats = Arc::new(WriterStats::default());
        let worker = Worker {
            store,
            batch_size: cfg.batch_size.max(1),
            hold_limit: cfg.batch_size.max(1).saturating_mul(4).max(cfg.capacity),
            cfg,
            stats: stats.clone(),
            batch: Vec::new(),
            waiters: Vec::new(),
            store_down: false,
            last_retry: None,
        };
        let handle = tokio::spawn(worker.run(rx));
        (Self { tx, stats }, handle)
    }

    pub fn stats(&self) -> &Arc<WriterStats> {
        &self.stats
    }

    /// Queues a record. Waits while the channel is full (counted in `backpressure_events`);
    /// fails only after shutdown, handing the failure to the caller rather than dropping
    /// the record silently.
    pub async fn send(&self, record: LogRecord) -> Result<(), LogError> {
        self.enqueue(Msg::Record(Box::new(record))).await
    }

    /// Puts a record message on the channel, counting it in `queue_depth` and waiting (counted
    /// in `backpressure_events`) while the channel is full.
    async fn enqueue(&self, msg: Msg) -> Result<(), LogError> {
        self.stats.queue_depth.fetch_add(1, Ordering::Relaxed);
        let res = match self.tx.try_send(msg) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(msg)) => {
                self.stats.backpressure_events.fetch_add(1, Ordering::Relaxed);
                self.tx.send(msg).await.map_err(|_| LogError::WriterClosed)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(LogError::WriterClosed),
        };
        if res.is_err() {
            self.stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
        }
        res
    }

    /// Queues a record and waits until it is committed: in the store, or appended to the
    /// fsync'd spool when the store is down. Records arriving together share one write
    /// (group commit: the writer writes as soon as its channel is empty), so the wait is
    /// one store write, not `flush_interval`. `Err` only when neither store nor spool took
    /// it (the record stays queued and is retried) or the writer has shut down.
    pub async fn send_durable(&self, record: LogRecord) -> Result<(), LogError> {
        let (ack, done) = oneshot::channel();
        self.enqueue(Msg::Durable(Box::new(record), ack)).await?;
        done.await.map_err(|_| LogError::WriterClosed)?
    }

    /// Writes everything sent before this call and retries the spool. `Ok` means all of it
    /// is in the store; `Unavailable` means some waits in the spool.
    pub async fn flush(&self) -> Result<(), LogError> {
        self.control(Msg::Flush).await
    }

    /// Stops taking records, drains the channel, writes (or spools) everything and tries a
    /// last replay. `Err(Unavailable)` says records remain in the spool for the next start.
    pub async fn shutdown(&self) -> Result<(), LogError> {
        self.control(Msg::Shutdown).await
    }

    async fn control(&self, make: impl FnOnce(Ack) -> Msg) -> Result<(), LogError> {
        let (ack, done) = oneshot::channel();
        self.tx.send(make(ack)).await.map_err(|_| LogError::WriterClosed)?;
        done.await.map_err(|_| LogError::WriterClosed)?
    }
}

struct Worker {
    store: LogStore,
    cfg: WriterConfig,
    batch_size: usize,
    /// While this many records wait (store and spool both failing), stop taking more, so
    /// the channel fills and `send` applies backpressure instead of memory growing.
    hold_limit: usize,
    stats: Arc<WriterStats>,
    batch: Vec<LogRecord>,
    /// Senders of durable records in `batch`, answered once the batch is written.
    waiters: Vec<Ack>,
    /// Set after a failed write: batches go straight to the spool until a replay succeeds.
    store_down: bool,
    last_retry: Option<Instant>,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        match count_lines(self.cfg.spool_path.clone()).await {
            Ok(n) if n > 0 => {
                tracing::info!(records = n, spool = %self.cfg.spool_path.display(), "replaying log spool");
                self.stats.spool_pending.store(n, Ordering::Relaxed);
                self.store_down = true;
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "cannot read the log spool"),
        }
        let mut tick = tokio::time::interval(self.cfg.flush_interval.max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut acks: Vec<Ack> = Vec::new();
        loop {
            let accepting = self.batch.len() < self.hold_limit;
            tokio::select! {
                msg = rx.recv(), if accepting => match msg {
                    Some(Msg::Record(r)) => self.push(*r).await,
                    Some(Msg::Durable(r, ack)) => {
                        self.waiters.push(ack);
                        self.push(*r).await;
                        // Group commit: write once nothing else is waiting to join the batch.
                        if rx.is_empty() {
                            self.flush_batch().await;
                        }
                    }
                    Some(Msg::Flush(ack)) => {
                        self.flush_batch().await;
                        let res = self.replay(true).await;
                        let _ = ack.send(res);
                    }
                    Some(Msg::Shutdown(ack)) => {
                        acks.push(ack);
                        rx.close();
                        break;
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    self.flush_batch().await;
                    if self.replay(false).await.is_err() {
                        tracing::debug!("log store still unavailable; records wait in the spool");
                    }
                }
            }
        }
        // Drain: the channel is closed (or every handle dropped), so this ends.
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Record(r) => self.push(*r).await,
                Msg::Durable(r, ack) => {
                    self.waiters.push(ack);
                    self.push(*r).await;
                }
                Msg::Flush(ack) | Msg::Shutdown(ack) => acks.push(ack),
            }
        }
        let mut res = Ok(());
        for _ in 0..3 {
            self.flush_batch().await;
            if self.batch.is_empty() {
                res = self.replay(true).await;
                break;
            }
            tokio::time::sleep(self.cfg.retry_interval).await;
        }
        if !self.batch.is_empty() {
            // Neither the store nor the spool took them: say so loudly; nothing else can.
            tracing::error!(
                records = self.batch.len(),
                "log records lost at shutdown: store and spool both failed"
            );
            res = Err(LogError::Unavailable(format!(
                "{} log records could be written neither to the store nor to the spool",
                self.batch.len()
            )));
        } else if let Err(e) = &res {
            tracing::warn!(error = %e, spool = %self.cfg.spool_path.display(), "log records remain in the spool for the next start");
        }
        let lost = if self.batch.is_empty() { Ok(()) } else { res.clone() };
        for ack in self.waiters.drain(..) {
            let _ = ack.send(lost.clone());
        }
        for ack in acks {
            let _ = ack.send(res.clone());
        }
    }

    async fn push(&mut self, mut r: LogRecord) {
        self.stats.queue_depth.fetch_sub(1, Ordering::Relaxed);
        self.cfg.redactor.redact_record(&mut r);
        self.batch.push(r);
        if self.batch.len() >= self.batch_size {
            self.flush_batch().await;
        }
    }

    /// Writes the current batch (see [`Self::write_batch`]) and, once it is out of memory,
    /// answers the durable senders waiting on it. When neither the store nor the spool took
    /// it (degraded), they are answered at once with the reason: the records stay queued
    /// for the next try, and no response hangs on a commit that cannot come soon.
    async fn flush_batch(&mut self) {
        self.write_batch().await;
        if self.batch.is_empty() {
            for ack in self.waiters.drain(..) {
                let _ = ack.send(Ok(()));
            }
        } else if self.stats.degraded.load(Ordering::Relaxed) {
            let why = LogError::Unavailable(format!(
                "neither the log store nor the spool takes records; {} wait in memory",
                self.batch.len()
            ));
            for ack in self.waiters.drain(..) {
                let _ = ack.send(Err(why.clone()));
            }
        }
    }

    /// Writes the current batch to the store, or to the spool if the store fails or is
    /// known to be down. If the spool fails too, the records stay in `batch`.
    async fn write_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        if !self.store_down {
            for chunk in self.batch.chunks(self.batch_size) {
                match self.store.insert_batch(chunk).await {
                    Ok(_) => {
                        add(&self.stats.written, chunk.len());
                        self.stats.degraded.store(false, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "log store write failed; spooling");
                        self.stats.failed_batches.fetch_add(1, Ordering::Relaxed);
                        self.store_down = true;
                        self.last_retry = Some(Instant::now());
                        break;
                    }
                }
            }
            if !self.store_down {
                self.batch.clear();
                return;
            }
            // Re-spooling the chunks that did reach the store is harmless: replay skips them.
        }
        let batch = std::mem::take(&mut self.batch);
        match append_spool(self.cfg.spool_path.clone(), batch).await {
            Ok(n) => {
                add(&self.stats.spooled, n);
                add(&self.stats.spool_pending, n);
                self.stats.degraded.store(false, Ordering::Relaxed);
            }
            Err((e, batch)) => {
                tracing::error!(error = %e, spool = %self.cfg.spool_path.display(), "cannot append to the log spool");
                self.stats.spool_errors.fetch_add(1, Ordering::Relaxed);
                self.stats.degraded.store(true, Ordering::Relaxed);
                self.batch = batch;
                // Maybe the store is back; let the next flush try it before the spool.
                self.store_down = false;
            }
        }
    }

    /// Moves spooled records into the store. Without `force`, at most once per
    /// `retry_interval`. Truncates the spool only after every record went in.
    async fn replay(&mut self, force: bool) -> Result<(), LogError> {
        if self.stats.spool_pending.load(Ordering::Relaxed) == 0 {
            self.store_down = false;
            return Ok(());
        }
        let due = self.last_retry.is_none_or(|t| t.elapsed() >= self.cfg.retry_interval);
        if !force && !due {
            return Err(LogError::Unavailable("waiting to retry the log store".into()));
        }
        self.last_retry = Some(Instant::now());
        let (tx, mut rx) = mpsc::channel::<Vec<LogRecord>>(2);
        let path = self.cfg.spool_path.clone();
        let batch_size = self.batch_size;
        let stats = self.stats.clone();
        let reader = tokio::task::spawn_blocking(move || {
            read_spool(&path, batch_size, &stats, &mut |chunk| tx.blocking_send(chunk).is_ok())
        });
        let mut replayed = 0;
        while let Some(chunk) = rx.recv().await {
            if let Err(e) = self.store.insert_batch(&chunk).await {
                self.store_down = true;
                return Err(e);
            }
            replayed += chunk.len();
            add(&self.stats.written, chunk.len());
            add(&self.stats.replayed, chunk.len());
        }
        let read =
            reader.await.map_err(|e| LogError::Storage(format!("spool reader failed: {e}")))?;
        if let Err(e) = read {
            return Err(LogError::Storage(format!("cannot read the log spool: {e}")));
        }
        let path = self.cfg.spool_path.clone();
        tokio::task::spawn_blocking(move || truncate(&path))
            .await
            .map_err(|e| LogError::Storage(format!("spool truncate failed: {e}")))?
            .map_err(|e| LogError::Storage(format!("cannot truncate the log spool: {e}")))?;
        self.stats.spool_pending.store(0, Ordering::Relaxed);
        self.store_down = false;
        tracing::info!(records = replayed, "log spool replayed");
        Ok(())
    }
}

/// Appends the records as JSON lines and fsyncs. On failure the records come back.
async fn append_spool(
    path: PathBuf,
    batch: Vec<LogRecord>,
) -> Result<usize, (std::io::Error, Vec<LogRecord>)> {
    let mut buf = Vec::new();
    for r in &batch {
        if let Err(e) = serde_json::to_writer(&mut buf, r) {
            return Err((e.into(), batch));
        }
        buf.push(b'\n');
    }
    let n = batch.len();
    let res = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let existed = path.exists();
        let mut f = OpenOptions::new().create(true).append(true).read(true).open(&path)?;
        // A torn earlier write (disk full, crash) may have left a line without its newline:
        // start on a fresh line so this batch's first record is not glued to it.
        if ends_mid_line(&mut f)? {
            f.write_all(b"\n")?;
        }
        f.write_all(&buf)?;
        f.sync_data()?;
        if !existed {
            sync_dir(&path)?;
        }
        Ok(())
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    match res {
        Ok(()) => Ok(n),
        Err(e) => Err((e, batch)),
    }
}

/// A new file's directory entry is durable only once the directory is synced.
fn ends_mid_line(f: &mut std::fs::File) -> std::io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(false);
    }
    f.seek(SeekFrom::Start(len - 1))?;
    let mut last = [0u8; 1];
    f.read_exact(&mut last)?;
    Ok(last[0] != b'\n')
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Streams the spool in chunks to `tx`; stops early when the receiver goes away.
/// Reads the spool at `path` in chunks of `batch_size` records, handing each to `sink`
/// (which returns false to stop). Public for the fuzz targets (`crate::fuzz`).
pub fn read_spool(
    path: &Path,
    batch_size: usize,
    stats: &WriterStats,
    sink: &mut dyn FnMut(Vec<LogRecord>) -> bool,
) -> std::io::Result<()> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut chunk = Vec::with_capacity(batch_size);
    // Byte lines, not `lines()`: a torn write can cut a UTF-8 character in half, and one such
    // line must not hide every record after it. Unreadable lines are kept aside in
    // `<spool>.corrupt` for an operator, never silently dropped.
    for line in BufReader::new(file).split(b'\n') {
        let line = line?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<LogRecord>(&line) {
            Ok(r) => chunk.push(r),
            Err(e) => {
                tracing::warn!(error = %e, "skipping an unreadable log spool line (kept in the .corrupt file)");
                stats.spool_corrupt_lines.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = keep_corrupt(path, &line) {
                    tracing::error!(error = %e, "cannot keep an unreadable spool line aside");
                }
            }
        }
        if chunk.len() >= batch_size.max(1) && !sink(std::mem::take(&mut chunk)) {
            return Ok(());
        }
    }
    if !chunk.is_empty() {
        sink(chunk);
    }
    Ok(())
}

fn truncate(path: &Path) -> std::io::Result<()> {
    match OpenOptions::new().write(true).open(path) {
        Ok(f) => {
            f.set_len(0)?;
            f.sync_all()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Appends an unreadable spool line to `<spool>.corrupt`.
fn keep_corrupt(spool: &Path, line: &[u8]) -> std::io::Result<()> {
    let mut name = spool.as_os_str().to_owned();
    name.push(".corrupt");
    let mut f = OpenOptions::new().create(true).append(true).open(PathBuf::from(name))?;
    f.write_all(line)?;
    f.write_all(b"\n")?;
    f.sync_data()
}

async fn count_lines(path: PathBuf) -> std::io::Result<u64> {
    tokio::task::spawn_blocking(move || match std::fs::File::open(&path) {
        Ok(f) => {
            let mut n = 0;
            for line in BufReader::new(f).split(b'\n') {
                if !line?.iter().all(u8::is_ascii_whitespace) {
                    n += 1;
                }
            }
            Ok(n)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)))
}
