//! `GET /v1/models` and `GET /v1/models/{id}`: the base model, every loaded adapter alias
//! (with `parent` = the base model, as vLLM lists LoRA modules), and the upstreams' models
//! (`<upstream>/<model>` and route names, owned by the upstream).

use actix_web::{web, HttpResponse};

use super::types::{Model, ModelList};
use crate::adapters::AdapterInfo;
use crate::api::auth::Caller;
use crate::api::error::ApiResult;
use crate::api::AppState;
use crate::router::ModelRef;

const OWNER: &str = "tunegate";

/// Whether `caller` may see the model `id` (an adapter's owner from its metadata).
fn visible(caller: &Caller, id: &str, a: Option<&AdapterInfo>) -> bool {
    let owner = a.and_then(|a| crate::router::adapter_owner(a.meta.as_ref()));
    caller.may_call(id) && (owner.is_none() || caller.owns(owner))
}

pub async fn list(state: web::Data<AppState>, caller: Caller) -> HttpResponse {
    let base_name = state.router.base_name();
    let mut data = Vec::new();
    if visible(&caller, base_name, None) {
        data.push(base(&state, base_name));
    }
    data.extend(
        state.router.registry().list().iter().filter(|a| visible(&caller, &a.alias, Some(a))).map(|a| adapter(&state, &a.alias, a)),
    );
    data.extend(state.upstreams.names().into_iter().filter(|(id, _)| caller.may_call(id)).map(|(id, up)| upstream(&state, id, up)));
    HttpResponse::Ok().json(ModelList { object: "list", data })
}

pub async fn retrieve(state: web::Data<AppState>, caller: Caller, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let id = id.into_inner();
    let hidden = || crate::router::RouteError::ModelNotFound(id.clone());
    // A listed upstream model or route, or `<upstream>/<model>` of an upstream whose models
    // are not known yet.
    let owner = state.upstreams.names().into_iter().find(|(n, _)| *n == id).map(|(_, owner)| owner);
    if let Some(owner) = owner.or_else(|| state.upstreams.resolve(&id).map(|t| t.upstream.name.clone())) {
        if !caller.may_call(&id) {
            return Err(hidden().into());
        }
        return Ok(HttpResponse::Ok().json(upstream(&state, id.clone(), owner)));
    }
    let resolved = state.router.resolve(&id)?;
    let info = match &resolved {
        ModelRef::Adapter(alias) => state.router.registry().list().into_iter().find(|a| &a.alias == alias),
        ModelRef::Base => None,
    };
    if !visible(&caller, &id, info.as_ref()) {
        return Err(hidden().into());
    }
    let model = match resolved {
        ModelRef::Base => base(&state, &id),
        ModelRef::Adapter(_) => match info {
            Some(a) => adapter(&state, &id, &a),
            // Unloaded between resolve and list.
            None => return Err(hidden().into()),
        },
    };
    Ok(HttpResponse::Ok().json(model))
}

/// A model an upstream serves, owned by that upstream.
fn upstream(state: &AppState, id: String, upstream: String) -> Model {
    Model { id, object: "model", created: state.started_at, owned_by: upstream.into(), parent: None, max_model_len: None }
}

fn base(state: &AppState, id: &str) -> Model {
    Model {
        id: id.to_string(),
        object: "model",
        created: state.started_at,
        owned_by: OWNER.into(),
        parent: None,
        max_model_len: state.engine.info().ok().map(|i| i.context_length),
    }
}

fn adapter(state: &AppState, id: &str, a: &AdapterInfo) -> Model {
    Model {
        id: id.to_string(),
        object: "model",
        created: a.loaded_at,
        owned_by: OWNER.into(),
        parent: Some(state.router.base_name().to_string()),
        max_model_len: state.engine.info().ok().map(|i| i.context_length),
    }
}
