//! `POST /v1/feedback` (tunegate's): a client rates a completion it received —
//! `{"completion_id", "score": -1..1 | "thumbs": "up"|"down", "comment"?}`. The rating is
//! kept on the log record; for tasks listed in `[logs] auto_approve_on_feedback`, positive
//! feedback approves a pending record (reviewer `feedback`).

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use crate::api::admin::logs::logs;
use crate::api::error::{ApiError, ApiResult, ErrorKind};
use crate::api::json::Json;
use crate::api::auth::Caller;
use crate::api::AppState;
use crate::logs::{now_ms, Feedback, LogError, ReviewAction, ReviewState};

#[derive(Debug, Deserialize)]
pub struct FeedbackBody {
    completion_id: String,
    score: Option<f64>,
    thumbs: Option<String>,
    comment: Option<String>,
}

pub async fn create(state: web::Data<AppState>, caller: Caller, Json(body): Json<FeedbackBody>) -> ApiResult<HttpResponse> {
    let logs = logs(&state)?;
    let score = match (body.score, body.thumbs.as_deref()) {
        (Some(s), None) if (-1.0..=1.0).contains(&s) => s,
        (Some(_), None) => return Err(ApiError::invalid_value("score", "'score' must be between -1 and 1.")),
        (None, Some("up")) => 1.0,
        (None, Some("down")) => -1.0,
        (None, Some(_)) => return Err(ApiError::invalid_value("thumbs", "'thumbs' must be \"up\" or \"down\".")),
        _ => return Err(ApiError::invalid_value("score", "Give exactly one of 'score' (-1..1) or 'thumbs' (up/down).")),
    };
    if body.comment.as_ref().is_some_and(|c| c.chars().count() > 4000) {
        return Err(ApiError::invalid_value("comment", "'comment' is limited to 4000 characters."));
    }
    let id = body.completion_id.trim().to_string();
    let not_found = || {
        ApiError::new(ErrorKind::LogNotFound, format!("No logged completion with id '{id}'.")).with_param("completion_id")
    };
    // Only the tenant that received a completion may rate it (another tenant's id is
    // indistinguishable from an unknown one).
    match logs.store.get(&id).await? {
        Some(r) if caller.owns(r.tenant.as_deref()) => {}
        _ => return Err(not_found()),
    }
    let feedback = Feedback { score: Some(score), comment: body.comment, at_ms: now_ms() };
    let mut record = logs.store.set_feedback(&id, feedback).await.map_err(|e| match e {
        LogError::NotFound(_) => not_found(),
        e => e.into(),
    })?;
    let positive = record.feedback.as_ref().is_some_and(Feedback::is_positive);
    if positive && record.review.state == ReviewState::Pending && logs.auto_approves(&record.task) {
        let action = ReviewAction {
            reviewer: Some("feedback".into()),
            expected_state: Some(ReviewState::Pending),
            ..ReviewAction::approve()
        };
        match logs.store.review(&id, &action).await {
            Ok(r) => record = r,
            // Reviewed meanwhile, or a failed request: the feedback is kept, the review stands.
            Err(LogError::IllegalTransition { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(HttpResponse::Ok().json(json!({
        "object": "feedback",
        "completion_id": record.id,
        "score": score,
        "task": record.task,
        "review_state": record.review.state,
    })))
}
