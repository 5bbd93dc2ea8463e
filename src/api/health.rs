//! `GET /health` (the process answers) and `GET /ready` (the model is loaded and the
//! adapters folder scanned: safe to send traffic). Both are open, for probes.

use std::sync::atomic::Ordering;

use actix_web::{web, HttpResponse};

use super::error::{ApiError, ApiResult, ErrorKind};
use super::AppState;

pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

pub async fn ready(state: web::Data<AppState>) -> ApiResult<HttpResponse> {
    if let Some(e) = state.engine.load_error() {
        return Err(ApiError::new(ErrorKind::ModelNotReady, format!("The model failed to load: {e}")));
    }
    if !state.engine.is_ready() {
        return Err(ApiError::new(ErrorKind::ModelNotReady, "The model is still loading."));
    }
    if !state.adapters_scanned.load(Ordering::Relaxed) {
        return Err(ApiError::new(ErrorKind::ModelNotReady, "The adapters folder is still being loaded."));
    }
    let stats = state.engine.stats();
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "status": "ready",
        "model": state.router.base_name(),
        "adapters": state.router.registry().aliases(),
        "engine": stats,
    })))
}
