//! `POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter`, `GET /v1/lora_adapters`.
//! Loading reads and checks tensors, so it runs on the blocking pool, never on a worker.

use actix_web::{web, HttpResponse};

use super::types::{AdapterList, AdapterObject, LoadLoraRequest, UnloadLoraRequest};
use crate::adapters::{paths, LoadOptions};
use crate::api::error::ApiResult;
use crate::api::json::Json;
use crate::api::AppState;

pub async fn load(state: web::Data<AppState>, Json(req): Json<LoadLoraRequest>) -> ApiResult<HttpResponse> {
    let root = state.config.adapters.root.clone();
    let registry = state.router.registry().clone();
    let info = web::block(move || -> ApiResult<_> {
        let path = paths::resolve(&root, &req.lora_path)?;
        let opts =
            LoadOptions { replace: req.load_inplace.unwrap_or(false), expected_generation: req.expected_generation };
        Ok(registry.load(&req.lora_name, &path, opts)?)
    })
    .await??;
    tracing::info!(alias = %info.alias, generation = info.generation, path = %info.path.display(), "adapter loaded");
    Ok(HttpResponse::Ok().json(AdapterObject::from(info)))
}

pub async fn unload(state: web::Data<AppState>, Json(req): Json<UnloadLoraRequest>) -> ApiResult<HttpResponse> {
    let info = state.router.registry().unload(&req.lora_name, req.expected_generation)?;
    tracing::info!(alias = %info.alias, generation = info.generation, "adapter unloaded");
    Ok(HttpResponse::Ok().json(AdapterObject::from(info)))
}

pub async fn list(state: web::Data<AppState>) -> HttpResponse {
    let registry = state.router.registry();
    HttpResponse::Ok().json(AdapterList {
        object: "list",
        data: registry.list().into_iter().map(AdapterObject::from).collect(),
        retired: registry.retired(),
    })
}
