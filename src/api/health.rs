//! `GET /health` (the process answers) and `GET /ready` (the model is loaded and the
//! adapters folder scanned: safe to send traffic). Both are open, for probes; on a keyed
//! server `/ready` names the loaded adapters only to an admin key (the names can say whose
//! they are), and gives their count otherwise.

use std::sync::atomic::Ordering;

use actix_web::{web, HttpResponse};

use super::error::{ApiError, ApiResult, ErrorKind};
use super::AppState;

pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

pub async fn ready(state: web::Data<AppState>, req: actix_web::HttpRequest) -> ApiResult<HttpResponse> {
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
    let authorization = req.headers().get(actix_web::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let admin = state.auth.authenticate(authorization, super::auth::Scope::Admin).is_ok();
    let aliases = state.router.registry().aliases();
    let mut body = serde_json::json!({
        "status": "ready",
        "model": state.router.base_name(),
        "adapters_loaded": aliases.len(),
        "engine": stats,
    });
    if admin {
        body["adapters"] = serde_json::json!(aliases);
    }
    Ok(HttpResponse::Ok().json(body))
}
