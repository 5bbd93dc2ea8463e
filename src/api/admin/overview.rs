//! The per-task overview behind `GET /admin/tasks`, the `/ui` task cards and the readiness
//! gauges: review counts, fine-tuning readiness (see [`crate::logs::readiness`]), the adapter
//! serving the task and its last training job. Computing it reads the store (the newest
//! [`SAMPLE`] records per task), so it runs in the handler and in a periodic refresh, never
//! at scrape time.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use crate::api::AppState;
use crate::engine::tool_prompt;
use crate::logs::readiness::{self, Readiness};
use crate::logs::{now_ms, LogError, LogFilter, ReviewState, TaskStats};
use crate::scheduler::Policy;

/// Newest records per task the readiness is computed from, read [`PAGE`] at a time and
/// stopped early past [`SAMPLE_BYTES`] of text: records can be megabytes each, and the
/// overview must stay small whatever clients sent.
pub const SAMPLE: usize = 1000;
const PAGE: usize = 25;
const SAMPLE_BYTES: usize = 8 << 20;
/// Tasks that may become metric labels through the overview (the busiest first), so that
/// client-chosen task names cannot grow the label set without bound.
pub const MAX_LABELLED_TASKS: usize = 64;
/// How often the gauges are refreshed without anyone opening the page.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize)]
pub struct TaskOverview {
    #[serde(flatten)]
    pub stats: TaskStats,
    pub readiness: Readiness,
    /// The loaded adapter serving the task (alias = task, or trained for it), if any.
    pub adapter: Option<Value>,
    /// The task's newest fine-tuning job, if any.
    pub last_job: Option<Value>,
}

/// The adapter serving `task`: the alias named like the task, else one trained for it.
fn adapter_of(state: &AppState, task: &str) -> Option<Value> {
    let list = state.router.registry().list();
    let trained_for = |m: &Option<Value>| m.as_ref().and_then(|m| m.get("task")).and_then(Value::as_str) == Some(task);
    let a = list.iter().find(|a| a.alias == task).or_else(|| list.iter().find(|a| trained_for(&a.meta)))?;
    let meta = a.meta.as_ref();
    let get = |k: &str| meta.and_then(|m| m.get(k)).cloned().unwrap_or(Value::Null);
    let candidate = meta.and_then(|m| m.pointer("/eval/candidate"));
    Some(json!({
        "alias": a.alias,
        "generation": a.generation,
        "version": get("job_id"),
        "created_at": get("created_at"),
        "train_examples": get("train_examples"),
        "eval": candidate.map(|c| json!({
            "exact_match": c.get("exact_match"),
            "token_f1": c.get("token_f1"),
            "passed": meta.and_then(|m| m.pointer("/eval/passed")),
        })),
        "distilled_prompt_tokens": meta.and_then(|m| m.pointer("/distilled_prompt/tokens")),
    }))
}

fn last_job_of(jobs: &[crate::training::jobs::Job], task: &str) -> Option<Value> {
    let j = jobs.iter().find(|j| j.task == task)?;
    Some(json!({
        "id": j.id,
        "status": j.status,
        "fine_tuned_model": j.fine_tuned_model,
        "created_at": j.created_at,
        "finished_at": j.finished_at,
        "promoted": j.promoted,
    }))
}

/// Computes every task's overview and updates the gauges.
pub async fn compute(state: &AppState) -> Result<Vec<TaskOverview>, LogError> {
    let Some(logs) = state.logs.as_ref() else { return Ok(Vec::new()) };
    let stats = logs.store.task_stats().await?;
    let jobs = state.jobs.as_ref().and_then(|j| j.list(None, 1000, None).ok()).map(|(j, _)| j).unwrap_or_default();
    let info = state.engine.info().ok();
    let now = now_ms();

    // One computation at a time: concurrent page loads and the refresh share its cost.
    let _one = state.overview_lock.lock().await;
    // Readiness is sampled for the busiest tasks only (client-chosen task names are unbounded).
    let mut by_volume: Vec<(u64, String)> = stats.iter().map(|s| (s.total, s.task.clone())).collect();
    by_volume.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let sampled: std::collections::HashSet<String> =
        by_volume.into_iter().take(MAX_LABELLED_TASKS).map(|(_, t)| t).collect();
    let mut out = Vec::with_capacity(stats.len());
    for s in stats {
        let records = if sampled.contains(&s.task) { sample(logs, &s.task).await? } else { Vec::new() };
        let threshold = Policy::for_task(&state.config.scheduler, &s.task).min_new_approved;
        // Off the runtime: counting a system prompt's tokens can take a while for a huge one.
        let (info, approved) = (info.clone(), s.approved);
        let readiness = tokio::task::spawn_blocking(move || {
            let count = |p: &str, params: &serde_json::Value| {
                // The prompt as serving writes it, with the requests' callable tools.
                let mut messages = Vec::new();
                if !p.is_empty() {
                    messages.push(crate::engine::ChatMessage::new("system", p));
                }
                let functions = tool_prompt::callable(params.get("tools"), params.get("tool_choice"));
                if !functions.is_empty() {
                    tool_prompt::attach(&mut messages, &tool_prompt::system_block(&functions));
                }
                let text = messages.first().map(|m| m.content.as_str()).unwrap_or_default();
                info.as_ref().and_then(|i| i.tokenizer.encode(text, false).ok()).map(|t| t.len() as u64)
            };
            readiness::assess(&records, approved, threshold, now, count)
        })
        .await
        .map_err(|e| LogError::Storage(format!("the readiness task failed: {e}")))?;
        out.push(TaskOverview {
            adapter: adapter_of(state, &s.task),
            last_job: last_job_of(&jobs, &s.task),
            stats: s,
            readiness,
        });
    }
    publish(state, &out);
    Ok(out)
}

/// The newest records of `task`, at most [`SAMPLE`] and about [`SAMPLE_BYTES`] of text.
async fn sample(logs: &crate::logs::Logs, task: &str) -> Result<Vec<crate::logs::LogRecord>, LogError> {
    let filter = LogFilter { task: Some(task.to_string()), ..LogFilter::default() };
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut cursor: Option<String> = None;
    while out.len() < SAMPLE && bytes < SAMPLE_BYTES {
        let page = logs.store.list(&filter, cursor.as_deref(), PAGE.min(SAMPLE - out.len())).await?;
        bytes += page.records.iter().map(|r| r.response.len() + json_bytes(&r.request.messages)).sum::<usize>();
        out.extend(page.records);
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    Ok(out)
}

/// About how many bytes of text a JSON value holds.
fn json_bytes(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        Value::Array(a) => a.iter().map(json_bytes).sum(),
        Value::Object(o) => o.iter().map(|(k, v)| k.len() + json_bytes(v)).sum(),
        _ => 8,
    }
}

/// Sets the per-task gauges. Configured tasks and the busiest tasks become labels.
fn publish(state: &AppState, tasks: &[TaskOverview]) {
    let m = &state.metrics;
    for t in state.config.scheduler.tasks.keys() {
        m.know_task(t);
    }
    let mut busiest: Vec<&TaskOverview> = tasks.iter().collect();
    busiest.sort_by_key(|t| std::cmp::Reverse(t.stats.total));
    for t in busiest.iter().take(MAX_LABELLED_TASKS) {
        m.know_task(&t.stats.task);
    }
    for t in tasks {
        let task = t.stats.task.as_str();
        if m.label(task) != task {
            continue;
        }
        for state in ReviewState::ALL {
            let n = match state {
                ReviewState::Pending => t.stats.pending,
                ReviewState::Approved => t.stats.approved,
                ReviewState::Rejected => t.stats.rejected,
            };
            m.set_examples(task, state.as_str(), n);
        }
        let r = &t.readiness;
        m.set_readiness(
            task,
            r.ratio,
            r.format.as_ref().map_or(0.0, |f| f.consistency),
            r.projected_prompt_tokens_saved_per_month as f64,
        );
    }
}

/// Refreshes the gauges every [`REFRESH_INTERVAL`] until the state is dropped.
pub fn spawn_refresh(state: actix_web::web::Data<AppState>) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(&state.into_inner());
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(REFRESH_INTERVAL).await;
            let Some(state) = weak.upgrade() else { return };
            if let Err(e) = compute(&state).await {
                tracing::warn!(error = %e, "refreshing the task overview gauges failed");
            }
        }
    })
}
