//! Fine-tuning jobs in OpenAI's shape (`fine_tuning.job`, its events and checkpoints),
//! persisted under `data_dir/jobs/<id>/` and run one at a time on a dedicated thread, in
//! the order they were created. A job left `queued` or `running` by a crash is picked up
//! again at start-up and resumes from its last checkpoint. A succeeded job's adapter is
//! loaded under its `fine_tuned_model` name at once; if it passed the quality gate it
//! also replaces the task's alias (compare-and-swap on the generation it was compared to).

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::auto::{AutoRule, Requested};
use super::dataset::{DatasetOptions, Example};
use super::files::FileStore;
use super::pipeline::{self, JobError, JobEvent, JobSpec};
use super::trainer::TrainConfig;
use crate::adapters::{AdapterRegistry, LoadOptions};
use crate::engine::{tool_prompt, ChatMessage};

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Where a job is in its life, as OpenAI names the states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    ValidatingFiles,
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    /// Queued or running: counts against the tenant's limit, resumes after a restart.
    pub fn is_active(self) -> bool {
        matches!(self, JobStatus::ValidatingFiles | JobStatus::Queued | JobStatus::Running)
    }

    pub fn is_finished(self) -> bool {
        !self.is_active()
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::ValidatingFiles => "validating_files",
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JobErrorObject {
    pub code: String,
    pub message: String,
    pub param: Option<String>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Hyperparameters {
    pub n_epochs: serde_json::Value,
    pub batch_size: serde_json::Value,
    pub learning_rate_multiplier: serde_json::Value,
}

/// A fine-tuning job as stored (`jobs/<id>/job.json`): what OpenAI's `fine_tuning.job`
/// reports (the API layer adds the envelope, `api::openai::types::FineTuningJob`), plus
/// tunegate's `task`, `promoted`, `eval`, hyper-parameters and owners.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Job {
    pub id: String,
    pub created_at: u64,
    pub finished_at: Option<u64>,
    pub model: String,
    pub fine_tuned_model: Option<String>,
    pub status: JobStatus,
    pub hyperparameters: Hyperparameters,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub result_files: Vec<String>,
    pub trained_tokens: Option<u64>,
    pub error: Option<JobErrorObject>,
    pub seed: u64,
    pub estimated_finish: Option<u64>,
    pub metadata: Option<HashMap<String, String>>,
    pub suffix: Option<String>,
    pub task: String,
    pub promoted: Option<bool>,
    pub eval: Option<serde_json::Value>,
    /// The full tunegate hyper-parameters used (final once the job has run).
    pub tunegate_hyperparameters: TrainConfig,
    /// What the client fixed; the rest is chosen by the `auto` rule when the job runs.
    #[serde(default)]
    pub requested_hyperparameters: Requested,
    /// The tenant that created the job (reported as `organization_id` too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The tenant that owns the trained adapter (a client key's own fine-tuned model);
    /// `None`: the operator's (admin jobs, granted tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_owner: Option<String>,
}

/// One line of a job's event log (`events.jsonl`), reported as `fine_tuning.job.event`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JobEventRecord {
    pub id: String,
    pub created_at: u64,
    pub level: String,
    pub message: String,
    pub data: Option<serde_json::Value>,
    #[serde(rename = "type")]
    pub kind: String,
}

/// One line of a job's checkpoint log (`checkpoints.jsonl`), reported as
/// `fine_tuning.job.checkpoint`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointRecord {
    pub id: String,
    pub created_at: u64,
    pub fine_tuned_model_checkpoint: String,
    pub fine_tuning_job_id: String,
    pub metrics: serde_json::Value,
    pub step_number: usize,
}

/// What a client asks for (already validated for shape by the API layer).
#[derive(Debug, Clone, Default)]
pub struct CreateJob {
    pub model: String,
    /// A file id, or `None` with `task` set to train from the task's approved logs.
    pub training_file: Option<String>,
    pub validation_file: Option<String>,
    pub task: Option<String>,
    pub suffix: Option<String>,
    pub seed: Option<u64>,
    pub n_epochs: Option<usize>,
    pub batch_size: Option<usize>,
    pub learning_rate_multiplier: Option<f64>,
    pub metadata: Option<HashMap<String, String>>,
    /// The creating tenant (owns the job object).
    pub owner: Option<String>,
    /// A client key's job without a granted `task`: its adapter is that tenant's own, under
    /// a name of its own (`<suffix>-<job id>`), never an existing alias.
    pub private_adapter: bool,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobsError {
    #[error("{0}")]
    Invalid(String),
    /// The tenant has `limits.max_active_jobs_per_tenant` jobs queued or running.
    #[error("{0}")]
    Limit(String),
    #[error("No such fine-tuning job: {0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("job storage error: {0}")]
    Io(String),
}

/// Where jobs that name a task instead of a file read its examples: the task's approved log
/// records (the reviewer's correction where there is one), the newest `max_examples`.
pub struct TaskLogs {
    logs: Arc<crate::logs::Logs>,
    /// The runtime the store's connections live on; the job worker (a thread of its own,
    /// never a runtime thread) blocks on it.
    runtime: tokio::runtime::Handle,
    max_examples: usize,
}

impl TaskLogs {
    pub fn new(logs: Arc<crate::logs::Logs>, runtime: tokio::runtime::Handle, max_examples: usize) -> Self {
        Self { logs, runtime, max_examples: max_examples.max(1) }
    }

    fn examples(&self, task: &str) -> Result<Vec<Example>, String> {
        let records = self.runtime.block_on(self.logs.store.approved_examples(task)).map_err(|e| e.to_string())?;
        if records.is_empty() {
            return Err(format!("task '{task}' has no approved examples"));
        }
        let skip = records.len().saturating_sub(self.max_examples);
        Ok(records[skip..].iter().map(record_example).collect())
    }
}

/// A logged request as a training example, its prompt written as serving wrote it: history
/// calls and results in their tags, the request's callable tools in the system prompt
/// (`engine::tool_prompt`), so a task whose examples share a system prompt *and* a tool list
/// distils both; then the approved answer (the reviewer's correction where there is one).
pub(crate) fn record_example(r: &crate::logs::LogRecord) -> Example {
    let turns = r.training_messages();
    let raw = r.request.messages.as_array().cloned().unwrap_or_default();
    let mut messages: Vec<ChatMessage> = turns
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let calls = raw.get(i).and_then(|m| m.get("tool_calls")).and_then(|c| c.as_array()).map(Vec::as_slice);
            // The answer (the last turn) is the text the model wrote, calls included.
            let calls = if i < raw.len() { calls } else { None };
            tool_prompt::turn(&t.role, t.content, calls)
        })
        .collect();
    let params = &r.request.params;
    let functions = tool_prompt::callable(params.get("tools"), params.get("tool_choice"));
    if !functions.is_empty() {
        tool_prompt::attach(&mut messages, &tool_prompt::system_block(&functions));
    }
    Example { messages }
}

pub struct JobsConfig {
    pub data_dir: PathBuf,
    pub model_path: PathBuf,
    pub base_model: String,
    pub adapters_root: PathBuf,
    pub defaults: TrainConfig,
    pub eval_fraction: f64,
    pub min_margin: f64,
    pub distill_system_prompt: bool,
    /// Where job results, progress and promotions are counted; `None` records nothing.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Jobs one tenant may have queued or running (0: no limit).
    pub max_active_per_tenant: usize,
    /// The `auto` rule for what a job leaves unset.
    pub auto: AutoRule,
    /// `[training] epochs`, when set: the epochs of a job that gives none.
    pub fixed_epochs: Option<usize>,
    /// Fewer distinct examples than this: no hold-out (see `DatasetOptions`).
    pub min_examples_for_holdout: usize,
    /// A scheduled job promotes only on a gate over at least this many held-out examples.
    pub scheduler_min_eval: usize,
    /// Threads of the job's rayon pool: 1 runs the trainer's own kernels (the fused ops and
    /// the frozen-weight products, most of a step) on the job's thread; more (0 = rayon's
    /// default) runs them on candle's worker pool, sized by `[model] threads`, where
    /// candle's remaining CPU ops run too (`engine::pool::training_chunks`).
    pub threads: usize,
}

struct Inner {
    cfg: JobsConfig,
    dir: PathBuf,
    files: Arc<FileStore>,
    registry: Arc<AdapterRegistry>,
    task_logs: Option<TaskLogs>,
    queue: Mutex<VecDeque<String>>,
    wake: Condvar,
    cancel: Mutex<HashMap<String, Arc<AtomicBool>>>,
    /// Serialises read-modify-write of job files.
    write: Mutex<()>,
    stop: AtomicBool,
}

#[derive(Clone)]
pub struct JobManager {
    inner: Arc<Inner>,
}

impl JobManager {
    /// Opens the job folder, re-queues unfinished jobs and starts the worker thread.
    pub fn start(
        cfg: JobsConfig,
        files: Arc<FileStore>,
        registry: Arc<AdapterRegistry>,
        task_logs: Option<TaskLogs>,
    ) -> Result<Self, JobsError> {
        let dir = cfg.data_dir.join("jobs");
        std::fs::create_dir_all(&dir).map_err(|e| JobsError::Io(e.to_string()))?;
        let inner = Arc::new(Inner {
            cfg,
            dir,
            files,
            registry,
            task_logs,
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            cancel: Mutex::new(HashMap::new()),
            write: Mutex::new(()),
            stop: AtomicBool::new(false),
        });
        let mgr = JobManager { inner };
        let mut unfinished: Vec<Job> =
            mgr.all()?.into_iter().filter(|j| j.status.is_active()).collect();
        unfinished.sort_by_key(|j| j.created_at);
        for j in unfinished {
            tracing::info!(job = %j.id, "re-queueing an unfinished fine-tuning job");
            mgr.inner.queue.lock().push_back(j.id);
        }
        let worker = mgr.inner.clone();
        std::thread::Builder::new()
            .name("tunegate-trainer".into())
            .spawn(move || worker_loop(worker))
            .map_err(|e| JobsError::Io(e.to_string()))?;
        Ok(mgr)
    }

    pub fn files(&self) -> &Arc<FileStore> {
        &self.inner.files
    }

    /// Stops the worker after the current step (jobs stay `running` on disk and resume at
    /// the next start).
    pub fn shutdown(&self) {
        self.inner.stop.store(true, Ordering::Relaxed);
        for c in self.inner.cancel.lock().values() {
            c.store(true, Ordering::Relaxed);
        }
        self.inner.wake.notify_all();
    }

    pub fn create(&self, req: CreateJob) -> Result<Job, JobsError> {
        let i = &self.inner;
        if req.model != i.cfg.base_model {
            return Err(JobsError::Invalid(format!(
                "model '{}' cannot be fine-tuned here; the base model is '{}'",
                req.model, i.cfg.base_model
            )));
        }
        let check_file = |f: &Option<String>| -> Result<(), JobsError> {
            if let Some(id) = f {
                i.files.examples(id).map_err(|e| JobsError::Invalid(format!("{id}: {e}")))?;
            }
            Ok(())
        };
        check_file(&req.training_file)?;
        check_file(&req.validation_file)?;
        let training_file = match (&req.training_file, &req.task) {
            (Some(f), _) => f.clone(),
            (None, Some(t)) if i.task_logs.is_some() => format!("task:{t}"),
            (None, Some(_)) => return Err(JobsError::Invalid("training from logs needs the log store".into())),
            (None, None) => return Err(JobsError::Invalid("training_file is required".into())),
        };
        for (param, v) in [("task", &req.task), ("suffix", &req.suffix)] {
            if let Some(v) = v.as_deref().filter(|v| !valid_name(v)) {
                return Err(JobsError::Invalid(format!(
                    "{param} '{v}' must be 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit, \
                     without '..'"
                )));
            }
        }
        if let Some(n) = req.n_epochs.filter(|n| !(1..=MAX_EPOCHS).contains(n)) {
            return Err(JobsError::Invalid(format!("hyperparameters.n_epochs must be 1..={MAX_EPOCHS}, not {n}")));
        }
        if let Some(b) = req.batch_size.filter(|b| !(1..=MAX_BATCH).contains(b)) {
            return Err(JobsError::Invalid(format!("hyperparameters.batch_size must be 1..={MAX_BATCH}, not {b}")));
        }
        let max_active = i.cfg.max_active_per_tenant;
        if max_active > 0 {
            let active = self
                .all()?
                .iter()
                .filter(|j| j.owner == req.owner && j.status.is_active())
                .count();
            if active >= max_active {
                return Err(JobsError::Limit(format!(
                    "{active} fine-tuning jobs of this tenant are queued or running (limits.max_active_jobs_per_tenant = \
                     {max_active}); wait for one to finish or cancel one"
                )));
            }
        }
        let id = format!("ftjob-{}", uuid::Uuid::new_v4().simple());
        let short = &id[6..14];
        let task = match (&req.task, req.private_adapter) {
            (Some(t), _) => t.clone(),
            (None, false) => req.suffix.clone().unwrap_or_else(|| format!("ft-{short}")),
            (None, true) => format!("{}-{short}", req.suffix.as_deref().unwrap_or("ft")),
        };
        if !valid_name(&task) {
            return Err(JobsError::Invalid(format!("the adapter name '{task}' is not valid; use a shorter suffix")));
        }
        if let Some(m) = req.learning_rate_multiplier {
            if !(m > 0.0 && m <= 100.0 && m * i.cfg.defaults.learning_rate < 1.0) {
                return Err(JobsError::Invalid(format!(
                    "hyperparameters.learning_rate_multiplier must be in (0, 100] with learning rate {} x it below 1",
                    i.cfg.defaults.learning_rate
                )));
            }
        }
        // What the client left unset is chosen from the data when the job runs.
        let mut hyper = i.cfg.defaults.clone();
        hyper.seed = req.seed.unwrap_or(hyper.seed);
        let requested = Requested {
            n_epochs: req.n_epochs.or(i.cfg.fixed_epochs),
            batch_size: req.batch_size,
            learning_rate_multiplier: req.learning_rate_multiplier,
        };
        let shown = |v: Option<serde_json::Value>| v.unwrap_or_else(|| "auto".into());
        let job = Job {
            id: id.clone(),
            created_at: now(),
            finished_at: None,
            model: req.model,
            fine_tuned_model: None,
            status: JobStatus::Queued,
            hyperparameters: Hyperparameters {
                n_epochs: shown(requested.n_epochs.map(Into::into)),
                batch_size: shown(requested.batch_size.map(Into::into)),
                learning_rate_multiplier: shown(requested.learning_rate_multiplier.map(Into::into)),
            },
            training_file,
            validation_file: req.validation_file,
            result_files: vec![],
            trained_tokens: None,
            error: None,
            seed: hyper.seed,
            estimated_finish: None,
            metadata: req.metadata,
            suffix: req.suffix,
            task,
            promoted: None,
            eval: None,
            tunegate_hyperparameters: hyper,
            requested_hyperparameters: requested,
            adapter_owner: req.private_adapter.then(|| req.owner.clone()).flatten(),
            owner: req.owner,
        };
        std::fs::create_dir_all(i.dir.join(&id)).map_err(|e| JobsError::Io(e.to_string()))?;
        self.save(&job)?;
        self.event(&id, "info", format!("Created fine-tuning job: {id}"), None);
        i.queue.lock().push_back(id);
        i.wake.notify_all();
        Ok(job)
    }

    fn job_path(&self, id: &str) -> Result<PathBuf, JobsError> {
        if !id.starts_with("ftjob-") || !id[6..].chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(JobsError::NotFound(id.to_string()));
        }
        Ok(self.inner.dir.join(id))
    }

    pub fn get(&self, id: &str) -> Result<Job, JobsError> {
        let raw = std::fs::read(self.job_path(id)?.join("job.json")).map_err(|_| JobsError::NotFound(id.to_string()))?;
        serde_json::from_slice(&raw).map_err(|e| JobsError::Io(e.to_string()))
    }

    fn all(&self) -> Result<Vec<Job>, JobsError> {
        let rd = std::fs::read_dir(&self.inner.dir).map_err(|e| JobsError::Io(e.to_string()))?;
        Ok(rd
            .filter_map(|e| e.ok())
            .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path().join("job.json")).ok()?).ok())
            .collect())
    }

    /// Newest first, OpenAI cursor paging (`after` = a job id); only `owner`'s jobs when given.
    pub fn list(&self, after: Option<&str>, limit: usize, owner: Option<&str>) -> Result<(Vec<Job>, bool), JobsError> {
        let mut all = self.all()?;
        if let Some(o) = owner {
            all.retain(|j| j.owner.as_deref() == Some(o));
        }
        all.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        let start = match after {
            Some(a) => all.iter().position(|j| j.id == a).map_or(all.len(), |p| p + 1),
            None => 0,
        };
        let rest = &all[start.min(all.len())..];
        let page: Vec<Job> = rest.iter().take(limit).cloned().collect();
        Ok((page, rest.len() > limit))
    }

    pub fn cancel(&self, id: &str) -> Result<Job, JobsError> {
        let mut job = self.get(id)?;
        if job.status.is_finished() {
            return Err(JobsError::Conflict(format!("job {id} has already {}", job.status)));
        }
        if let Some(c) = self.inner.cancel.lock().get(id) {
            c.store(true, Ordering::Relaxed);
        }
        self.inner.queue.lock().retain(|q| q != id);
        job.status = JobStatus::Cancelled;
        job.finished_at = Some(now());
        self.save(&job)?;
        self.event(id, "info", "Job cancelled".into(), None);
        Ok(job)
    }

    /// Newest first.
    pub fn events(&self, id: &str, after: Option<&str>, limit: usize) -> Result<(Vec<JobEventRecord>, bool), JobsError> {
        let raw = std::fs::read_to_string(self.job_path(id)?.join("events.jsonl")).map_err(|_| JobsError::NotFound(id.to_string()))?;
        let mut evs: Vec<JobEventRecord> = raw.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        evs.reverse();
        let start = match after {
            Some(a) => evs.iter().position(|e| e.id == a).map_or(evs.len(), |p| p + 1),
            None => 0,
        };
        let rest = &evs[start.min(evs.len())..];
        Ok((rest.iter().take(limit).cloned().collect(), rest.len() > limit))
    }

    pub fn checkpoints(&self, id: &str) -> Result<Vec<CheckpointRecord>, JobsError> {
        let raw = std::fs::read_to_string(self.job_path(id)?.join("checkpoints.jsonl")).unwrap_or_default();
        let mut v: Vec<CheckpointRecord> = raw.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        v.reverse();
        Ok(v)
    }

    fn save(&self, job: &Job) -> Result<(), JobsError> {
        let _w = self.inner.write.lock();
        let dir = self.job_path(&job.id)?;
        let tmp = dir.join("job.json.tmp");
        let io = |e: std::io::Error| JobsError::Io(e.to_string());
        let bytes = serde_json::to_vec_pretty(job).map_err(|e| JobsError::Io(e.to_string()))?;
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(&bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, dir.join("job.json")).map_err(io)
    }

    fn append(&self, id: &str, file: &str, line: &impl serde::Serialize) {
        let Ok(dir) = self.job_path(id) else { return };
        let Ok(s) = serde_json::to_string(line) else { return };
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(file))
            .and_then(|mut f| writeln!(f, "{s}"));
        if let Err(e) = r {
            tracing::warn!(job = id, "could not record a job event: {e}");
        }
    }

    fn event(&self, id: &str, level: &str, message: String, data: Option<serde_json::Value>) {
        let kind = if data.as_ref().is_some_and(|d| d.get("step").is_some()) { "metrics" } else { "message" };
        let ev = JobEventRecord {
            id: format!("ftevent-{}", uuid::Uuid::new_v4().simple()),
            created_at: now(),
            level: level.into(),
            message,
            data,
            kind: kind.into(),
        };
        self.append(id, "events.jsonl", &ev);
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Job)) -> Result<Job, JobsError> {
        let mut job = self.get(id)?;
        f(&mut job);
        self.save(&job)?;
        Ok(job)
    }

    fn run_one(&self, id: &str) {
        let i = &self.inner;
        let Ok(job) = self.get(id) else { return };
        if job.status == JobStatus::Cancelled {
            return;
        }
        let cancel = Arc::new(AtomicBool::new(false));
        i.cancel.lock().insert(id.to_string(), cancel.clone());
        let _ = self.update(id, |j| j.status = JobStatus::Running);
        let result = match rayon::ThreadPoolBuilder::new().num_threads(i.cfg.threads).thread_name(|n| format!("tunegate-train-{n}")).build() {
            Ok(pool) => pool.install(|| self.execute(&job, &cancel)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot build the training thread pool; using the shared one");
                self.execute(&job, &cancel)
            }
        };
        i.cancel.lock().remove(id);
        if i.stop.load(Ordering::Relaxed) && matches!(result, Err(JobError::Cancelled)) {
            return; // shutting down: stays `running`, resumes at the next start
        }
        if let Some(m) = &i.cfg.metrics {
            let outcome = match &result {
                Ok(()) => "succeeded",
                Err(JobError::Cancelled) => "cancelled",
                Err(JobError::Failed(_)) => "failed",
            };
            m.training_job(&job.task, outcome);
        }
        match result {
            Ok(()) => {}
            Err(JobError::Cancelled) => {
                let _ = self.update(id, |j| {
                    j.status = JobStatus::Cancelled;
                    j.finished_at.get_or_insert(now());
                });
            }
            Err(JobError::Failed(msg)) => {
                tracing::warn!(job = id, "fine-tuning job failed: {msg}");
                self.event(id, "error", format!("Job failed: {msg}"), None);
                let _ = self.update(id, |j| {
                    j.status = JobStatus::Failed;
                    j.finished_at = Some(now());
                    j.error = Some(JobErrorObject { code: "training_failed".into(), message: msg, param: None });
                });
            }
        }
    }

    /// Makes `alias` serve the adapter at `path` if it still serves generation `expected`.
    /// The folder watcher may be loading the same freshly published version at that moment
    /// (the first version of an alias it promotes on its own): a busy alias is retried, and
    /// an alias that already serves this very folder counts as promoted. Returns the
    /// generation now serving.
    pub(crate) fn promote(&self, alias: &str, path: &Path, expected: Option<u64>) -> Result<u64, crate::adapters::AdapterError> {
        let registry = &self.inner.registry;
        let mut tries = 0;
        let result = loop {
            match registry.load(alias, path, LoadOptions { replace: true, expected_generation: expected }) {
                Err(crate::adapters::AdapterError::Busy(_)) if tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => break other,
            }
        };
        match result {
            Ok(g) => Ok(g.generation),
            Err(e) => match registry.list().into_iter().find(|a| a.alias == alias) {
                Some(a) if a.path == path => Ok(a.generation),
                _ => Err(e),
            },
        }
    }

    fn execute(&self, job: &Job, cancel: &AtomicBool) -> Result<(), JobError> {
        let i = &self.inner;
        let fail = |e: String| JobError::Failed(e);
        let examples = match job.training_file.strip_prefix("task:") {
            Some(task) => match &i.task_logs {
                Some(logs) => logs.examples(task).map_err(fail)?,
                None => return Err(fail("no log store".into())),
            },
            None => i.files.examples(&job.training_file).map_err(|e| fail(e.to_string()))?,
        };
        let validation = match &job.validation_file {
            Some(f) => Some(i.files.examples(f).map_err(|e| fail(e.to_string()))?),
            None => None,
        };
        let current = i.registry.list().into_iter().find(|a| a.alias == job.task);
        let spec = JobSpec {
            id: job.id.clone(),
            task: job.task.clone(),
            model_path: i.cfg.model_path.clone(),
            base_model: i.cfg.base_model.clone(),
            examples,
            validation,
            hyper: job.tunegate_hyperparameters.clone(),
            dataset: DatasetOptions {
                distill_system_prompt: i.cfg.distill_system_prompt,
                eval_fraction: i.cfg.eval_fraction,
                min_examples_for_holdout: i.cfg.min_examples_for_holdout,
                seed: job.seed,
                ..Default::default()
            },
            adapters_root: i.cfg.adapters_root.clone(),
            job_dir: i.dir.join(&job.id),
            current_adapter: current.as_ref().map(|c| c.path.clone()),
            min_margin: i.cfg.min_margin,
            adapter_precision: i.registry.limits().precision,
            owner: job.adapter_owner.clone(),
            auto: Some((i.cfg.auto.clone(), job.requested_hyperparameters)),
        };
        let id = job.id.clone();
        let mut emit = |e: JobEvent| {
            if let Some(step) = e.data.as_ref().and_then(|d| d.get("step")).and_then(|s| s.as_u64()) {
                let every = job.tunegate_hyperparameters.checkpoint_every.max(1) as u64;
                let total = e.data.as_ref().and_then(|d| d.get("total_steps")).and_then(|s| s.as_u64()).unwrap_or(0);
                if step % every == 0 || step == total {
                    let ck = CheckpointRecord {
                        id: format!("ftckpt-{}", uuid::Uuid::new_v4().simple()),
                        created_at: now(),
                        fine_tuned_model_checkpoint: format!("{}:ckpt-step-{step}", id),
                        fine_tuning_job_id: id.clone(),
                        metrics: serde_json::json!({"step": step, "train_loss": e.data.as_ref().and_then(|d| d.get("loss")).cloned()}),
                        step_number: step as usize,
                    };
                    self.append(&id, "checkpoints.jsonl", &ck);
                }
                if let Some(eta) = e.data.as_ref().and_then(|d| d.get("eta_seconds")).and_then(|s| s.as_f64()) {
                    let _ = self.update(&id, |j| j.estimated_finish = Some(now() + eta as u64));
                }
            }
            if let Some(h) = e.data.as_ref().and_then(|d| d.get("hyperparameters")) {
                let chosen = Hyperparameters {
                    n_epochs: h["n_epochs"].clone(),
                    batch_size: h["batch_size"].clone(),
                    learning_rate_multiplier: h["learning_rate_multiplier"].clone(),
                };
                let _ = self.update(&id, |j| j.hyperparameters = chosen);
            }
            if let (Some(m), Some(d)) = (&i.cfg.metrics, e.data.as_ref()) {
                let number = |k: &str| d.get(k).and_then(|v| v.as_f64());
                m.training_progress(&job.task, number("loss"), number("tokens_per_second"));
            }
            self.event(&id, e.level, e.message, e.data);
        };
        let res = pipeline::run(&spec, cancel, &mut emit)?;
        let name = format!("{}-{}", job.task, res.version);
        i.registry
            .load(&name, &res.adapter_path, LoadOptions { replace: true, expected_generation: None })
            .map_err(|e| fail(format!("the trained adapter did not load: {e}")))?;
        if let Some(m) = &i.cfg.metrics {
            m.know_task(&job.task);
            observe_gate(m, &job.task, &name, &res);
        }
        let mut promoted = false;
        let mut promotion = "gate_failed";
        let scheduled = job.metadata.as_ref().and_then(|m| m.get("scheduled_by")).is_some();
        let min_eval = i.cfg.scheduler_min_eval;
        let eval_too_small = scheduled && (res.dataset.eval_in_sample || res.dataset.eval < min_eval);
        if res.gate.passed && eval_too_small {
            promotion = "eval_too_small";
            self.event(
                &id,
                "warn",
                format!(
                    "Not promoted: a scheduled job promotes only on a gate over at least {min_eval} held-out examples \
                     (this one: {}{}); '{name}' serves under its own name",
                    res.dataset.eval,
                    if res.dataset.eval_in_sample { ", scored in-sample" } else { "" }
                ),
                None,
            );
        } else if res.gate.passed && res.dataset.eval_in_sample && current.is_some() {
            // An in-sample score shows memory, not skill: it may start an alias, never
            // replace the adapter serving one.
            promotion = "eval_too_small";
            self.event(
                &id,
                "warn",
                format!(
                    "Not promoted: '{}' already serves an adapter, and this job's gate scored its training \
                     examples (too few to hold any out); give a validation_file to replace it. '{name}' serves \
                     under its own name",
                    job.task
                ),
                None,
            );
        } else if res.gate.passed {
            let expected = Some(current.as_ref().map_or(0, |c| c.generation));
            match self.promote(&job.task, &res.adapter_path, expected) {
                Ok(generation) => {
                    promoted = true;
                    promotion = "promoted";
                    // A restart (and the folder watcher) serves what was promoted.
                    if let Err(e) = crate::adapters::watch::write_pin(&i.cfg.adapters_root, &job.task, &res.version) {
                        tracing::warn!(task = %job.task, error = %e, "cannot write the adapter pin file");
                    }
                    self.event(&id, "info", format!("Promoted: '{}' now serves {} (generation {generation})", job.task, res.version), None);
                }
                Err(e) => {
                    promotion = "conflict";
                    self.event(&id, "warn", format!("Not promoted: {e}"), None);
                }
            }
        } else {
            self.event(&id, "warn", format!("Not promoted: {}", res.gate.reason), None);
        }
        if let Some(m) = &i.cfg.metrics {
            m.promotion(&job.task, promotion);
        }
        self.event(&id, "info", format!("The job has successfully completed; fine-tuned model: {name}"), None);
        let tokens = res.train_tokens;
        let used = res.hyper.clone();
        self.update(&id, |j| {
            j.tunegate_hyperparameters = used;
            j.status = JobStatus::Succeeded;
            j.finished_at = Some(now());
            j.fine_tuned_model = Some(name.clone());
            j.trained_tokens = Some(tokens);
            j.promoted = Some(promoted);
            j.eval = serde_json::to_value(&res.gate).ok();
            j.result_files = vec![];
        })
        .map_err(|e| fail(e.to_string()))?;
        Ok(())
    }
}

/// The quality gate's scores: the candidate under its fine-tuned name, what served the
/// task before under the task's name; final loss and throughput of the run.
fn observe_gate(m: &crate::metrics::Metrics, task: &str, candidate: &str, res: &pipeline::JobResult) {
    for (adapter, s) in [(candidate, &res.gate.candidate), (task, &res.gate.baseline)] {
        for (metric, v) in [("exact_match", s.exact_match), ("token_f1", s.token_f1), ("loss", s.loss)] {
            m.eval_score(task, adapter, metric, v);
        }
    }
    m.training_progress(task, res.final_loss.map(f64::from), Some(res.train_tokens_per_second));
}

fn worker_loop(inner: Arc<Inner>) {
    let mgr = JobManager { inner };
    loop {
        let next = {
            let mut q = mgr.inner.queue.lock();
            while q.is_empty() && !mgr.inner.stop.load(Ordering::Relaxed) {
                mgr.inner.wake.wait_for(&mut q, std::time::Duration::from_millis(500));
            }
            if mgr.inner.stop.load(Ordering::Relaxed) {
                return;
            }
            q.pop_front()
        };
        if let Some(id) = next {
            // A panic in one job must not stop the worker or serving.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| mgr.run_one(&id)));
            if r.is_err() {
                let _ = mgr.update(&id, |j| {
                    j.status = JobStatus::Failed;
                    j.error = Some(JobErrorObject { code: "internal".into(), message: "the trainer panicked".into(), param: None });
                });
            }
        }
    }
}

/// Largest `n_epochs` and `batch_size` a job may ask for (beyond: 400, never clamped).
pub const MAX_EPOCHS: usize = 100;
pub const MAX_BATCH: usize = 256;

/// Task, suffix and adapter names become folder names under the adapters root: letters,
/// digits, '-', '_' and '.', starting with a letter or digit, no '..', at most 64.
pub fn valid_name(name: &str) -> bool {
    name.len() <= 64
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.contains("..")
}

/// Where a job's files live (for tests and the CLI).
pub fn job_dir(data_dir: &Path, id: &str) -> PathBuf {
    data_dir.join("jobs").join(id)
}
