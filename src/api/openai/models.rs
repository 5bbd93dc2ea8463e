//! `GET /v1/models` and `GET /v1/models/{id}`: the base model and every loaded adapter alias
//! (with `parent` = the base model, as vLLM lists LoRA modules).

use actix_web::{web, HttpResponse};

use super::types::{Model, ModelList};
use crate::adapters::AdapterInfo;
use crate::api::error::ApiResult;
use crate::api::AppState;
use crate::router::ModelRef;

const OWNER: &str = "tunegate";

pub async fn list(state: web::Data<AppState>) -> HttpResponse {
    let mut data = vec![base(&state, state.router.base_name())];
    data.extend(state.router.registry().list().iter().map(|a| adapter(&state, &a.alias, a)));
    HttpResponse::Ok().json(ModelList { object: "list", data })
}

pub async fn retrieve(state: web::Data<AppState>, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let id = id.into_inner();
    let model = match state.router.resolve(&id)? {
        ModelRef::Base => base(&state, &id),
        ModelRef::Adapter(alias) => {
            let info = state.router.registry().list().into_iter().find(|a| a.alias == alias);
            match info {
                Some(a) => adapter(&state, &id, &a),
                // Unloaded between resolve and list.
                None => return Err(crate::router::RouteError::ModelNotFound(id).into()),
            }
        }
    };
    Ok(HttpResponse::Ok().json(model))
}

fn base(state: &AppState, id: &str) -> Model {
    Model {
        id: id.to_string(),
        object: "model",
        created: state.started_at,
        owned_by: OWNER,
        parent: None,
        max_model_len: state.engine.info().ok().map(|i| i.context_length),
    }
}

fn adapter(state: &AppState, id: &str, a: &AdapterInfo) -> Model {
    Model {
        id: id.to_string(),
        object: "model",
        created: a.loaded_at,
        owned_by: OWNER,
        parent: Some(state.router.base_name().to_string()),
        max_model_len: state.engine.info().ok().map(|i| i.context_length),
    }
}
