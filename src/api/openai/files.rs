//! `/v1/files` (purpose `fine-tune`): multipart upload validated line by line, list, get,
//! content, delete. Storage is `training::files`; this file only speaks HTTP.

use actix_multipart::Multipart;
use actix_web::{web, HttpResponse};
use futures_util::StreamExt;

use crate::api::error::{ApiError, ApiResult, ErrorKind};
use crate::api::AppState;
use crate::training::files::FileStore;

/// Largest upload accepted.
const MAX_UPLOAD_BYTES: usize = 256 << 20;

fn store(state: &AppState) -> ApiResult<std::sync::Arc<FileStore>> {
    state
        .jobs
        .as_ref()
        .map(|j| j.files().clone())
        .ok_or_else(|| ApiError::new(ErrorKind::TrainingDisabled, "fine-tuning is disabled ([training] enabled = false)"))
}

pub async fn create(state: web::Data<AppState>, mut form: Multipart) -> ApiResult<HttpResponse> {
    let files = store(&state)?;
    let mut purpose = None;
    let mut upload: Option<(String, Vec<u8>)> = None;
    while let Some(field) = form.next().await {
        let mut field = field.map_err(|e| ApiError::new(ErrorKind::InvalidValue, format!("malformed multipart body: {e}")))?;
        let name = field.name().unwrap_or_default().to_string();
        let filename = field.content_disposition().and_then(|c| c.get_filename()).unwrap_or("upload.jsonl").to_string();
        let mut bytes = Vec::new();
        while let Some(chunk) = field.next().await {
            let chunk = chunk.map_err(|e| ApiError::new(ErrorKind::InvalidValue, format!("upload interrupted: {e}")))?;
            if bytes.len() + chunk.len() > MAX_UPLOAD_BYTES {
                return Err(ApiError::new(ErrorKind::RequestTooLarge, format!("files are limited to {MAX_UPLOAD_BYTES} bytes")));
            }
            bytes.extend_from_slice(&chunk);
        }
        match name.as_str() {
            "purpose" => purpose = Some(String::from_utf8_lossy(&bytes).trim().to_string()),
            "file" => upload = Some((filename, bytes)),
            _ => {}
        }
    }
    let purpose = purpose.ok_or_else(|| {
        ApiError::new(ErrorKind::MissingRequiredParameter, "Missing required parameter: 'purpose'.").with_param("purpose")
    })?;
    let (filename, bytes) = upload.ok_or_else(|| {
        ApiError::new(ErrorKind::MissingRequiredParameter, "Missing required parameter: 'file'.").with_param("file")
    })?;
    let obj = web::block(move || files.create(&filename, &purpose, &bytes)).await.map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(HttpResponse::Ok().json(obj))
}

pub async fn list(state: web::Data<AppState>) -> ApiResult<HttpResponse> {
    let files = store(&state)?;
    let data = web::block(move || files.list()).await.map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "object": "list", "data": data, "has_more": false })))
}

pub async fn retrieve(state: web::Data<AppState>, id: web::Path<String>) -> ApiResult<HttpResponse> {
    Ok(HttpResponse::Ok().json(store(&state)?.get(&id)?))
}

pub async fn content(state: web::Data<AppState>, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let bytes = store(&state)?.content(&id)?;
    Ok(HttpResponse::Ok().content_type("application/jsonl").body(bytes))
}

pub async fn delete(state: web::Data<AppState>, id: web::Path<String>) -> ApiResult<HttpResponse> {
    store(&state)?.delete(&id)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "id": id.as_str(), "object": "file", "deleted": true })))
}
