//! `/v1/files` (purpose `fine-tune`): multipart upload validated line by line, list, get,
//! content, delete. Storage is `training::files`; this file only speaks HTTP.
//!
//! An upload streams to a `.part` file as it arrives (at most `limits.max_upload_bytes`,
//! `limits.max_concurrent_uploads` at once), so memory does not grow with the file. A file
//! belongs to the caller's tenant: another tenant's id answers 404 like an unknown one.

use std::io::Write;

use actix_multipart::Multipart;
use actix_web::{web, HttpResponse};
use futures_util::StreamExt;

use crate::api::auth::Caller;
use crate::api::error::{ApiError, ApiResult, ErrorKind};
use crate::api::AppState;
use crate::training::files::{FileObject, FileStore};

/// Largest `purpose` (or any other small form field) read.
const MAX_FIELD_BYTES: usize = 1024;

fn store(state: &AppState) -> ApiResult<std::sync::Arc<FileStore>> {
    state
        .jobs
        .as_ref()
        .map(|j| j.files().clone())
        .ok_or_else(|| ApiError::new(ErrorKind::TrainingDisabled, "fine-tuning is disabled ([training] enabled = false)"))
}

/// The file `id` if the caller may see it.
fn owned(files: &FileStore, caller: &Caller, id: &str) -> ApiResult<FileObject> {
    let f = files.get(id)?;
    if !caller.owns(f.owner.as_deref()) {
        return Err(crate::training::files::FileError::NotFound(id.to_string()).into());
    }
    Ok(f)
}

/// Removes a `.part` file unless it was moved into place.
struct PartFile(std::path::PathBuf);

impl Drop for PartFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub async fn create(state: web::Data<AppState>, caller: Caller, mut form: Multipart) -> ApiResult<HttpResponse> {
    let files = store(&state)?;
    let _slot = state.uploads.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            ErrorKind::TooManyUploads,
            format!("{} uploads are in progress (limits.max_concurrent_uploads); retry shortly.", state.config.limits.max_concurrent_uploads),
        )
    })?;
    let max = state.config.limits.max_upload_bytes;
    let too_large = || ApiError::new(ErrorKind::RequestTooLarge, format!("files are limited to {max} bytes (limits.max_upload_bytes)"));
    let io = |e: std::io::Error| ApiError::internal(format!("cannot store the upload: {e}"));
    // Each piece of the body must arrive within the body timeout (a large upload may take
    // longer in all, but a stalled one is cut off).
    let gap = std::time::Duration::from_secs_f64(state.config.limits.body_timeout_seconds);
    let stalled = || {
        ApiError::new(ErrorKind::RequestTimeout, format!("The upload stalled for {} s (limits.body_timeout_seconds).", gap.as_secs_f64()))
    };
    let mut purpose = None;
    let mut upload: Option<(String, PartFile)> = None;
    while let Some(field) = tokio::time::timeout(gap, form.next()).await.map_err(|_| stalled())? {
        let mut field = field.map_err(|e| ApiError::new(ErrorKind::InvalidValue, format!("malformed multipart body: {e}")))?;
        let name = field.name().unwrap_or_default().to_string();
        let interrupted = |e: actix_multipart::MultipartError| ApiError::new(ErrorKind::InvalidValue, format!("upload interrupted: {e}"));
        if name == "file" {
            if upload.is_some() {
                return Err(ApiError::invalid_value("file", "Give one 'file' per upload."));
            }
            let filename = field.content_disposition().and_then(|c| c.get_filename()).unwrap_or("upload.jsonl").to_string();
            let part = PartFile(files.upload_path());
            let mut out = std::io::BufWriter::new(std::fs::File::create(&part.0).map_err(io)?);
            let mut written = 0usize;
            while let Some(chunk) = tokio::time::timeout(gap, field.next()).await.map_err(|_| stalled())? {
                let chunk = chunk.map_err(interrupted)?;
                written += chunk.len();
                if written > max {
                    return Err(too_large());
                }
                out.write_all(&chunk).map_err(io)?;
            }
            out.flush().map_err(io)?;
            upload = Some((filename, part));
        } else {
            // Small fields only (`purpose`); anything else is read and dropped, bounded.
            let mut bytes = Vec::new();
            while let Some(chunk) = tokio::time::timeout(gap, field.next()).await.map_err(|_| stalled())? {
                let chunk = chunk.map_err(interrupted)?;
                if bytes.len() + chunk.len() > MAX_FIELD_BYTES {
                    return Err(ApiError::invalid_value(name, format!("form fields other than 'file' are limited to {MAX_FIELD_BYTES} bytes")));
                }
                bytes.extend_from_slice(&chunk);
            }
            if name == "purpose" {
                purpose = Some(String::from_utf8_lossy(&bytes).trim().to_string());
            }
        }
    }
    let purpose = purpose.ok_or_else(|| {
        ApiError::new(ErrorKind::MissingRequiredParameter, "Missing required parameter: 'purpose'.").with_param("purpose")
    })?;
    let (filename, part) = upload.ok_or_else(|| {
        ApiError::new(ErrorKind::MissingRequiredParameter, "Missing required parameter: 'file'.").with_param("file")
    })?;
    let owner = caller.tenant.clone();
    let obj = web::block(move || {
        let r = files.create_from(Some(&owner), &filename, &purpose, &part.0);
        drop(part);
        r
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(HttpResponse::Ok().json(obj))
}

pub async fn list(state: web::Data<AppState>, caller: Caller) -> ApiResult<HttpResponse> {
    let files = store(&state)?;
    let mut data = web::block(move || files.list()).await.map_err(|e| ApiError::internal(e.to_string()))??;
    data.retain(|f| caller.owns(f.owner.as_deref()));
    Ok(HttpResponse::Ok().json(serde_json::json!({ "object": "list", "data": data, "has_more": false })))
}

pub async fn retrieve(state: web::Data<AppState>, caller: Caller, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let files = store(&state)?;
    Ok(HttpResponse::Ok().json(owned(&files, &caller, &id)?))
}

pub async fn content(state: web::Data<AppState>, caller: Caller, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let files = store(&state)?;
    owned(&files, &caller, &id)?;
    let id = id.into_inner();
    let bytes = web::block(move || files.content(&id)).await.map_err(|e| ApiError::internal(e.to_string()))??;
    Ok(HttpResponse::Ok().content_type("application/jsonl").body(bytes))
}

pub async fn delete(state: web::Data<AppState>, caller: Caller, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let files = store(&state)?;
    owned(&files, &caller, &id)?;
    files.delete(&id)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "id": id.as_str(), "object": "file", "deleted": true })))
}
