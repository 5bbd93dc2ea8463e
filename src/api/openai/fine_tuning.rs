//! `/v1/fine_tuning/jobs[/{id}[/events|/checkpoints|/cancel]]` in OpenAI's shapes, plus
//! tunegate's extension: `training_file` may be omitted when `task` names a task whose
//! approved logs to train on. Jobs themselves live in `training::jobs`; their wire shapes in
//! `types.rs`.

use actix_web::{web, HttpResponse};
use serde::Deserialize;

use super::types::{AutoOr, CreateFineTuningJob, FineTuningJob, FineTuningJobCheckpoint, FineTuningJobEvent, HyperparametersIn};
use crate::api::auth::Caller;
use crate::api::error::{ApiError, ApiResult, ErrorKind};
use crate::api::json::Json;
use crate::api::AppState;
use crate::training::jobs::{CreateJob, Job, JobManager};

impl<T: Copy> AutoOr<T> {
    fn get(&self, param: &str) -> ApiResult<Option<T>> {
        match self {
            AutoOr::Value(v) => Ok(Some(*v)),
            AutoOr::Auto(s) if s == "auto" => Ok(None),
            AutoOr::Auto(s) => Err(ApiError::invalid_value(param, format!("'{s}' is not 'auto' or a number"))),
        }
    }
}

fn jobs(state: &AppState) -> ApiResult<&JobManager> {
    state
        .jobs
        .as_ref()
        .ok_or_else(|| ApiError::new(ErrorKind::TrainingDisabled, "fine-tuning is disabled ([training] enabled = false)"))
}

pub async fn create(state: web::Data<AppState>, caller: Caller, Json(req): Json<CreateFineTuningJob>) -> ApiResult<HttpResponse> {
    let jobs = jobs(&state)?.clone();
    // A client key trains only on its own files, and on a task's logs (replacing that task's
    // alias) only where `train_tasks` grants it; otherwise its adapter is its own.
    for (param, file) in [("training_file", &req.training_file), ("validation_file", &req.validation_file)] {
        if let Some(id) = file {
            let owner = jobs.files().get(id).map_err(|e| ApiError::from(e).with_param(param))?.owner;
            if !caller.owns(owner.as_deref()) {
                return Err(ApiError::from(crate::training::files::FileError::NotFound(id.clone())).with_param(param));
            }
        }
    }
    if let Some(task) = req.task.as_deref().filter(|t| !caller.may_train(t)) {
        return Err(ApiError::new(
            ErrorKind::PermissionDenied,
            format!("This key may not train task '{task}' (auth.keys train_tasks); omit 'task' to train a model of your own."),
        )
        .with_param("task"));
    }
    // `method.supervised.hyperparameters` (the newer shape) wins over the legacy field.
    let method_hyper: Option<HyperparametersIn> = req
        .method
        .as_ref()
        .and_then(|m| m.get("supervised")?.get("hyperparameters").cloned())
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| ApiError::invalid_value("method", e.to_string()))?;
    let hyper = method_hyper.or(req.hyperparameters);
    crate::api::openai::convert::check_metadata(req.metadata.as_ref())?;
    let get = |h: &Option<HyperparametersIn>| -> ApiResult<(Option<usize>, Option<usize>, Option<f64>)> {
        let Some(h) = h else { return Ok((None, None, None)) };
        Ok((
            h.n_epochs.as_ref().map(|v| v.get("hyperparameters.n_epochs")).transpose()?.flatten(),
            h.batch_size.as_ref().map(|v| v.get("hyperparameters.batch_size")).transpose()?.flatten(),
            h.learning_rate_multiplier.as_ref().map(|v| v.get("hyperparameters.learning_rate_multiplier")).transpose()?.flatten(),
        ))
    };
    let (n_epochs, batch_size, learning_rate_multiplier) = get(&hyper)?;
    if req.training_file.is_none() && req.task.is_none() {
        return Err(ApiError::new(ErrorKind::MissingRequiredParameter, "Missing required parameter: 'training_file'.")
            .with_param("training_file"));
    }
    let private_adapter = !caller.admin && req.task.is_none();
    let create = CreateJob {
        model: req.model,
        training_file: req.training_file,
        validation_file: req.validation_file,
        task: req.task,
        suffix: req.suffix,
        seed: req.seed,
        n_epochs,
        batch_size,
        learning_rate_multiplier,
        metadata: req.metadata,
        owner: Some(caller.tenant.clone()),
        private_adapter,
    };
    let job = web::block(move || jobs.create(create)).await.map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(HttpResponse::Ok().json(FineTuningJob::from(&job)))
}

#[derive(Debug, Deserialize)]
pub struct Page {
    #[serde(default)]
    pub after: Option<String>,
    #[serde(default)]
    pub limit: Option<usize>,
}

/// The job `id` if the caller may see it (another tenant's answers 404 like an unknown id).
fn owned(jobs: &JobManager, caller: &Caller, id: &str) -> ApiResult<Job> {
    let job = jobs.get(id)?;
    if !caller.owns(job.owner.as_deref()) {
        return Err(crate::training::jobs::JobsError::NotFound(id.to_string()).into());
    }
    Ok(job)
}

pub async fn list(state: web::Data<AppState>, caller: Caller, q: web::Query<Page>) -> ApiResult<HttpResponse> {
    let owner = caller.tenant_filter();
    let (jobs, has_more) = jobs(&state)?.list(q.after.as_deref(), q.limit.unwrap_or(20).clamp(1, 100), owner.as_deref())?;
    let data: Vec<_> = jobs.iter().map(FineTuningJob::from).collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "object": "list", "data": data, "has_more": has_more })))
}

pub async fn retrieve(state: web::Data<AppState>, caller: Caller, id: web::Path<String>) -> ApiResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(FineTuningJob::from(&owned(jobs(&state)?, &caller, &id)?)))
}

pub async fn cancel(state: web::Data<AppState>, caller: Caller, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let jobs = jobs(&state)?;
    owned(jobs, &caller, &id)?;
    Ok(HttpResponse::Ok().json(FineTuningJob::from(&jobs.cancel(&id)?)))
}

pub async fn events(
    state: web::Data<AppState>,
    caller: Caller,
    id: web::Path<String>,
    q: web::Query<Page>,
) -> ApiResult<HttpResponse> {
    owned(jobs(&state)?, &caller, &id)?;
    let (events, has_more) = jobs(&state)?.events(&id, q.after.as_deref(), q.limit.unwrap_or(20).clamp(1, 1000))?;
    let data: Vec<_> = events.iter().map(FineTuningJobEvent::from).collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "object": "list", "data": data, "has_more": has_more })))
}

pub async fn checkpoints(
    state: web::Data<AppState>,
    caller: Caller,
    id: web::Path<String>,
    q: web::Query<Page>,
) -> ApiResult<HttpResponse> {
    owned(jobs(&state)?, &caller, &id)?;
    let all = jobs(&state)?.checkpoints(&id)?;
    let limit = q.limit.unwrap_or(10).clamp(1, 100);
    let start = match &q.after {
        Some(a) => all.iter().position(|c| &c.id == a).map_or(all.len(), |p| p + 1),
        None => 0,
    };
    let rest = &all[start.min(all.len())..];
    let data: Vec<_> = rest.iter().take(limit).map(FineTuningJobCheckpoint::from).collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "object": "list",
        "data": data,
        "has_more": rest.len() > limit,
        "first_id": data.first().map(|c| c.checkpoint.id.clone()),
        "last_id": data.last().map(|c| c.checkpoint.id.clone()),
    })))
}
