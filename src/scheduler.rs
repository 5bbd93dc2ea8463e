//! The auto-train scheduler: every `check_interval` it reads each task's review counts and
//! queues a fine-tuning job (trained from the task's approved logs) for a task whose policy
//! says it is due — enough newly approved examples since its last scheduled job, and long
//! enough since then. The job manager runs one job at a time, in the order queued; the
//! quality gate decides promotion. A failing check or job is logged and never stops serving
//! or the scheduler. What it last scheduled per task is kept in `<data_dir>/scheduler.json`,
//! so a restart neither repeats nor forgets a decision.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::SchedulerSection;
use crate::logs::{now_ms, Logs, TaskStats};
use crate::training::jobs::{CreateJob, JobManager};

/// What the scheduler remembers of one task.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskState {
    /// Approved examples when the last job was queued.
    pub approved_at_last_job: u64,
    /// Unix ms when the last job was queued.
    pub last_job_ms: Option<i64>,
    pub last_job_id: Option<String>,
}

/// The policy in force for one task (the `[scheduler]` defaults with its overrides).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub enabled: bool,
    pub min_new_approved: u64,
    pub min_interval: Duration,
}

impl Policy {
    pub fn for_task(cfg: &SchedulerSection, task: &str) -> Self {
        let o = cfg.tasks.get(task);
        Self {
            enabled: o.and_then(|o| o.enabled).unwrap_or(cfg.enabled),
            min_new_approved: o.and_then(|o| o.min_new_approved).unwrap_or(cfg.min_new_approved),
            min_interval: Duration::from_secs_f64(
                o.and_then(|o| o.min_interval_seconds).unwrap_or(cfg.min_interval_seconds).max(0.0),
            ),
        }
    }

    /// Whether a job is due for `stats` given what was last scheduled, at `now_ms`.
    pub fn due(&self, stats: &TaskStats, state: &TaskState, now_ms: i64) -> bool {
        let new = stats.approved.saturating_sub(state.approved_at_last_job);
        let waited = state.last_job_ms.is_none_or(|t| {
            u128::try_from(now_ms.saturating_sub(t)).unwrap_or(0) >= self.min_interval.as_millis()
        });
        self.enabled && stats.approved > 0 && new >= self.min_new_approved.max(1) && waited
    }
}

/// The running scheduler; dropping it does not stop it, [`Scheduler::stop`] does.
pub struct Scheduler {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Scheduler {
    /// Starts checking on the current runtime.
    pub fn spawn(cfg: SchedulerSection, logs: Arc<Logs>, jobs: JobManager, base_model: String, data_dir: PathBuf) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let path = data_dir.join("scheduler.json");
        let task = tokio::spawn(async move {
            let mut state = load(&path);
            let interval = Duration::from_secs_f64(cfg.check_interval_seconds.max(0.05));
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stopped.changed() => return,
                }
                match check(&cfg, &logs, &jobs, &base_model, &mut state).await {
                    Ok(true) => save(&path, &state),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "scheduler check failed; retrying next interval"),
                }
            }
        });
        Self { stop, task }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// One round: queues a job for every due task with no job queued or running. Returns
/// whether anything was queued.
pub async fn check(
    cfg: &SchedulerSection,
    logs: &Logs,
    jobs: &JobManager,
    base_model: &str,
    state: &mut BTreeMap<String, TaskState>,
) -> anyhow::Result<bool> {
    let stats = logs.store.task_stats().await?;
    let (recent, _) = jobs.list(None, 1000, None)?;
    let mut queued = false;
    for s in stats {
        let policy = Policy::for_task(cfg, &s.task);
        let st = state.entry(s.task.clone()).or_default();
        if !policy.due(&s, st, now_ms()) {
            continue;
        }
        let busy = recent
            .iter()
            .any(|j| j.task == s.task && j.status.is_active());
        if busy {
            continue;
        }
        let req = CreateJob {
            model: base_model.to_string(),
            training_file: None,
            validation_file: None,
            task: Some(s.task.clone()),
            suffix: None,
            seed: None,
            n_epochs: None,
            batch_size: None,
            learning_rate_multiplier: None,
            metadata: Some([("scheduled_by".to_string(), "tunegate-scheduler".to_string())].into()),
            owner: None,
            private_adapter: false,
        };
        match jobs.create(req) {
            Ok(job) => {
                tracing::info!(task = %s.task, job = %job.id, approved = s.approved, "scheduler queued a fine-tuning job");
                *st = TaskState { approved_at_last_job: s.approved, last_job_ms: Some(now_ms()), last_job_id: Some(job.id) };
                queued = true;
            }
            Err(e) => tracing::warn!(task = %s.task, error = %e, "scheduler could not queue a job"),
        }
    }
    Ok(queued)
}

fn load(path: &std::path::Path) -> BTreeMap<String, TaskState> {
    match std::fs::read(path) {
        Ok(raw) => serde_json::from_slice(&raw).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "unreadable scheduler state; starting afresh");
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    }
}

/// Atomically (temp file, rename).
fn save(path: &std::path::Path, state: &BTreeMap<String, TaskState>) {
    let tmp = path.with_extension("json.tmp");
    let res = serde_json::to_vec_pretty(state)
        .map_err(std::io::Error::other)
        .and_then(|raw| std::fs::write(&tmp, raw))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = res {
        tracing::warn!(path = %path.display(), error = %e, "cannot save the scheduler state");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(approved: u64) -> TaskStats {
        TaskStats { task: "t".into(), pending: 0, approved, rejected: 0, total: approved, newest_ms: None }
    }

    #[test]
    fn due_needs_new_approvals_and_the_interval() {
        let cfg = SchedulerSection { min_new_approved: 10, min_interval_seconds: 60.0, ..Default::default() };
        let p = Policy::for_task(&cfg, "t");
        let fresh = TaskState::default();
        assert!(!p.due(&stats(9), &fresh, 0));
        assert!(p.due(&stats(10), &fresh, 0));
        let after = TaskState { approved_at_last_job: 10, last_job_ms: Some(1_000), last_job_id: None };
        assert!(!p.due(&stats(19), &after, 1_000_000), "only 9 new");
        assert!(!p.due(&stats(20), &after, 30_000), "too soon");
        assert!(p.due(&stats(20), &after, 61_000));
    }

    #[test]
    fn per_task_overrides_win() {
        let mut cfg = SchedulerSection::default();
        cfg.tasks.insert(
            "small".into(),
            crate::config::TaskPolicySection { enabled: Some(false), min_new_approved: Some(5), min_interval_seconds: None },
        );
        let p = Policy::for_task(&cfg, "small");
        assert!(!p.enabled);
        assert_eq!(p.min_new_approved, 5);
        assert_eq!(Policy::for_task(&cfg, "other").min_new_approved, cfg.min_new_approved);
    }
}
