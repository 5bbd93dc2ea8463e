//! The review API (admin key): list and search request logs, review one or many, and the
//! per-task counts. Records are `LogRecord`s serialized as they are stored.
//!
//! `GET /admin/logs?task=&state=&q=&since=&until=&model=&status=&cursor=&limit=&order=`
//! pages newest first by default; `next_cursor` continues the listing.

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::{Deserialize, Serialize};

use crate::api::auth::Caller;
use crate::api::error::{ApiError, ApiResult, ErrorKind};
use crate::api::json::Json;
use crate::api::AppState;
use crate::logs::{BulkTarget, LogFilter, LogRecord, Logs, Order, ReviewAction, ReviewState};

/// Records per page when `limit` is absent.
const DEFAULT_LIMIT: usize = 50;

/// The log service, or 503 `logs_disabled`.
pub fn logs(state: &AppState) -> ApiResult<&Arc<Logs>> {
    state
        .logs
        .as_ref()
        .ok_or_else(|| ApiError::new(ErrorKind::LogsDisabled, "Request logging is disabled ([logs] enabled = false)."))
}

/// The query string as `(key, value)` pairs, in order.
pub fn query_pairs(req: &HttpRequest) -> ApiResult<Vec<(String, String)>> {
    serde_urlencoded::from_str(req.query_string())
        .map_err(|e| ApiError::new(ErrorKind::InvalidValue, format!("Invalid query string: {e}")))
}

/// The key of a `metadata[key]=value` query parameter.
pub fn metadata_key(param: &str) -> Option<&str> {
    param.strip_prefix("metadata[").and_then(|r| r.strip_suffix(']'))
}

fn int<T: std::str::FromStr>(key: &str, v: &str) -> ApiResult<T> {
    v.parse().map_err(|_| ApiError::invalid_value(key, format!("'{key}' must be an integer, got '{v}'.")))
}

#[derive(Debug, Serialize)]
struct RecordList {
    object: &'static str,
    data: Vec<LogRecord>,
    next_cursor: Option<String>,
    has_more: bool,
}

/// `GET /admin/logs`
pub async fn list(state: web::Data<AppState>, req: HttpRequest) -> ApiResult<HttpResponse> {
    let logs = logs(&state)?;
    let mut filter = LogFilter::default();
    let (mut cursor, mut limit) = (None, DEFAULT_LIMIT);
    for (k, v) in query_pairs(&req)? {
        let v = v.trim().to_string();
        if v.is_empty() {
            continue;
        }
        match k.as_str() {
            "task" => filter.task = Some(v),
            "state" => filter.state = Some(ReviewState::parse(&v).map_err(|e| ApiError::from(e).with_param("state"))?),
            "q" => filter.q = Some(v),
            "since" => filter.since_ms = Some(int(&k, &v)?),
            "until" => filter.until_ms = Some(int(&k, &v)?),
            "model" => filter.model = Some(v),
            "status" => filter.status = Some(v),
            "stored" => filter.stored_only = v == "true",
            "cursor" => cursor = Some(v),
            "limit" => limit = int(&k, &v)?,
            "order" => filter.order = order(&v)?,
            other => {
                if let Some(key) = metadata_key(other) {
                    filter.metadata.insert(key.to_string(), v);
                } else {
                    return Err(ApiError::invalid_value(other, format!("Unknown query parameter '{other}'.")));
                }
            }
        }
    }
    let page = logs.store.list(&filter, cursor.as_deref(), limit).await.map_err(|e| ApiError::from(e).with_param("cursor"))?;
    let has_more = page.next_cursor.is_some();
    Ok(HttpResponse::Ok().json(RecordList { object: "list", data: page.records, next_cursor: page.next_cursor, has_more }))
}

fn order(v: &str) -> ApiResult<Order> {
    match v {
        "newest_first" | "desc" => Ok(Order::NewestFirst),
        "oldest_first" | "asc" => Ok(Order::OldestFirst),
        _ => Err(ApiError::invalid_value("order", format!("'order' must be newest_first or oldest_first, got '{v}'."))),
    }
}

/// `GET /admin/logs/{id}`
pub async fn get(state: web::Data<AppState>, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let record = logs(&state)?.store.get(&id).await?.ok_or_else(|| not_found(&id))?;
    Ok(HttpResponse::Ok().json(record))
}

pub fn not_found(id: &str) -> ApiError {
    ApiError::new(ErrorKind::LogNotFound, format!("No log record with id '{id}'."))
}

/// `POST /admin/logs/{id}/review` body: a review action.
#[derive(Debug, Deserialize)]
pub struct ReviewBody {
    pub state: ReviewState,
    pub corrected_response: Option<String>,
    pub reviewer: Option<String>,
    pub expected_state: Option<ReviewState>,
}

impl ReviewBody {
    fn action(self, caller: &Caller) -> ReviewAction {
        ReviewAction {
            state: self.state,
            corrected_response: self.corrected_response,
            reviewer: Some(self.reviewer.unwrap_or_else(|| caller.key_id.clone())),
            expected_state: self.expected_state,
        }
    }
}

/// `POST /admin/logs/{id}/review`
pub async fn review(
    state: web::Data<AppState>,
    caller: Caller,
    id: web::Path<String>,
    Json(body): Json<ReviewBody>,
) -> ApiResult<HttpResponse> {
    let logs = logs(&state)?;
    let record = logs.store.review(&id, &body.action(&caller)).await.map_err(|e| match e {
        crate::logs::LogError::NotFound(_) => not_found(&id),
        e => e.into(),
    })?;
    tracing::info!(id = %record.id, task = %record.task, state = %record.review.state, "log record reviewed");
    state.metrics.review(&record.task, record.review.state.as_str());
    Ok(HttpResponse::Ok().json(record))
}

/// What a bulk review's `filter` may say.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterBody {
    task: Option<String>,
    state: Option<ReviewState>,
    q: Option<String>,
    since: Option<i64>,
    until: Option<i64>,
    model: Option<String>,
    status: Option<String>,
}

/// `POST /admin/logs/review` body.
#[derive(Debug, Deserialize)]
pub struct BulkBody {
    ids: Option<Vec<String>>,
    filter: Option<FilterBody>,
    #[serde(flatten)]
    review: ReviewBody,
}

/// `POST /admin/logs/review`: by `ids` or by `filter` (exactly one).
pub async fn review_bulk(
    state: web::Data<AppState>,
    caller: Caller,
    Json(body): Json<BulkBody>,
) -> ApiResult<HttpResponse> {
    let logs = logs(&state)?;
    let target = match (body.ids, body.filter) {
        (Some(ids), None) => BulkTarget::Ids(ids),
        (None, Some(f)) => BulkTarget::Filter(LogFilter {
            task: f.task,
            state: f.state,
            q: f.q,
            since_ms: f.since,
            until_ms: f.until,
            model: f.model,
            status: f.status,
            ..LogFilter::default()
        }),
        _ => {
            return Err(ApiError::invalid_value("ids", "Give exactly one of 'ids' (an array of record ids) or 'filter'."))
        }
    };
    let outcome = logs.store.review_bulk(&target, &body.review.action(&caller)).await?;
    tracing::info!(reviewed = outcome.reviewed, skipped = outcome.skipped, "bulk review");
    Ok(HttpResponse::Ok().json(outcome))
}

#[derive(Debug, Serialize)]
struct TaskList {
    object: &'static str,
    data: Vec<super::overview::TaskOverview>,
}

/// `GET /admin/tasks`: per task, counts by review state, the newest record's time, and the
/// overview (fine-tuning `readiness`, the serving `adapter`, the `last_job`); also refreshes
/// the per-task gauges.
pub async fn tasks(state: web::Data<AppState>) -> ApiResult<HttpResponse> {
    logs(&state)?;
    let data = super::overview::compute(&state).await?;
    Ok(HttpResponse::Ok().json(TaskList { object: "list", data }))
}
