//! OpenAI stored completions: chat completions made with `store: true` are kept in the
//! request log and served back in OpenAI's shapes — `GET /v1/chat/completions` (filters
//! `model`, `metadata[key]=value`, `after`, `limit`, `order`), `GET/POST/DELETE
//! /v1/chat/completions/{id}` and `GET /v1/chat/completions/{id}/messages` — so
//! `client.chat.completions.list()` and friends work. A completion made without `store`
//! is logged for review but is not visible here, as at OpenAI.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::admin::logs::{logs, metadata_key, query_pairs};
use crate::api::error::{ApiError, ApiResult, ErrorKind};
use crate::api::json::Json;
use crate::api::auth::Caller;
use crate::api::AppState;
use crate::logs::{cursor_after, LogError, LogFilter, LogRecord, Order};

/// OpenAI's default and largest page sizes for these lists.
pub(super) const DEFAULT_LIMIT: usize = 20;
const MAX_LIMIT: usize = 100;

fn not_found(id: &str) -> ApiError {
    ApiError::new(ErrorKind::LogNotFound, format!("No stored chat completion with id '{id}'."))
        .with_param("completion_id")
}

/// The stored completion `id`, or 404 (also for a logged completion made without `store`,
/// and for another tenant's: a client cannot tell those from ids that do not exist).
async fn stored(state: &AppState, caller: &Caller, id: &str) -> ApiResult<LogRecord> {
    match logs(state)?.store.get(id).await? {
        Some(r) if r.store && caller.owns(r.tenant.as_deref()) => Ok(r),
        _ => Err(not_found(id)),
    }
}

/// A record as OpenAI's `chat.completion` object (one choice: the logged response).
fn completion_object(r: &LogRecord, fingerprint: &str) -> Value {
    json!({
        "id": r.id,
        "object": "chat.completion",
        "created": r.created_ms / 1000,
        "model": r.model,
        "system_fingerprint": fingerprint,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": r.response, "refusal": null},
            // A generation cut short (the client went away) ended before the model stopped:
            // of OpenAI's reasons, "length" says that; "stop" would claim a finished answer.
            "finish_reason": match r.finish_reason.as_deref() {
                Some("cancelled") => "length",
                Some(f) => f,
                None if r.client_disconnected => "length",
                None => "stop",
            },
            "logprobs": null,
        }],
        "usage": {
            "prompt_tokens": r.prompt_tokens,
            "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens,
        },
        "metadata": r.metadata,
        "service_tier": null,
    })
}

/// `limit`, `after` and `order` of OpenAI's list routes (order defaults to `asc`).
pub(super) struct ListQuery {
    pub limit: usize,
    pub after: Option<String>,
    pub order: Order,
}

pub(super) fn list_query(key: &str, value: &str, q: &mut ListQuery) -> ApiResult<bool> {
    match key {
        "limit" => {
            let n: usize = value
                .parse()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| ApiError::invalid_value("limit", format!("'limit' must be 1..={MAX_LIMIT}.")))?;
            q.limit = n;
        }
        "after" => q.after = Some(value.to_string()),
        "order" => {
            q.order = match value {
                "asc" => Order::OldestFirst,
                "desc" => Order::NewestFirst,
                _ => return Err(ApiError::invalid_value("order", "'order' must be 'asc' or 'desc'.")),
            }
        }
        _ => return Ok(false),
    }
    Ok(true)
}

pub(super) fn list_body(data: Vec<Value>, has_more: bool) -> Value {
    // OpenAI's schema types these as strings; an empty page has "".
    let id = |v: Option<&Value>| v.and_then(|v| v.get("id")).cloned().unwrap_or_else(|| Value::from(""));
    json!({
        "object": "list",
        "first_id": id(data.first()),
        "last_id": id(data.last()),
        "has_more": has_more,
        "data": data,
    })
}

/// `GET /v1/chat/completions`
pub async fn list(state: web::Data<AppState>, caller: Caller, req: HttpRequest) -> ApiResult<HttpResponse> {
    let logs = logs(&state)?;
    let mut filter = LogFilter { stored_only: true, tenant: caller.tenant_filter(), ..LogFilter::default() };
    let mut q = ListQuery { limit: DEFAULT_LIMIT, after: None, order: Order::OldestFirst };
    for (k, v) in query_pairs(&req)? {
        if list_query(&k, &v, &mut q)? {
            continue;
        }
        if k == "model" {
            filter.model = Some(v);
        } else if let Some(key) = metadata_key(&k) {
            filter.metadata.insert(key.to_string(), v);
        } else {
            return Err(ApiError::invalid_value(k.clone(), format!("Unknown query parameter '{k}'.")));
        }
    }
    filter.order = q.order;
    let cursor = match &q.after {
        Some(after) => {
            let r = stored(&state, &caller, after).await.map_err(|_| {
                ApiError::invalid_value("after", format!("'after' names no stored completion: '{after}'."))
            })?;
            Some(cursor_after(&r, q.order))
        }
        None => None,
    };
    let page = logs.store.list(&filter, cursor.as_deref(), q.limit).await?;
    let data = page.records.iter().map(|r| completion_object(r, &state.fingerprint)).collect();
    Ok(HttpResponse::Ok().json(list_body(data, page.next_cursor.is_some())))
}

/// `GET /v1/chat/completions/{id}`
pub async fn retrieve(state: web::Data<AppState>, caller: Caller, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let r = stored(&state, &caller, &id).await?;
    Ok(HttpResponse::Ok().json(completion_object(&r, &state.fingerprint)))
}

#[derive(Debug, Deserialize)]
pub struct UpdateBody {
    metadata: Option<std::collections::BTreeMap<String, String>>,
}

/// `POST /v1/chat/completions/{id}` `{"metadata": {...}}`: replaces the metadata.
pub async fn update(
    state: web::Data<AppState>,
    caller: Caller,
    id: web::Path<String>,
    Json(body): Json<UpdateBody>,
) -> ApiResult<HttpResponse> {
    let metadata = body.metadata.unwrap_or_default();
    crate::api::openai::convert::check_metadata(Some(&metadata))?;
    stored(&state, &caller, &id).await?;
    let r = logs(&state)?.store.update_metadata(&id, metadata).await.map_err(|e| match e {
        LogError::NotFound(_) => not_found(&id),
        e => e.into(),
    })?;
    Ok(HttpResponse::Ok().json(completion_object(&r, &state.fingerprint)))
}

/// `DELETE /v1/chat/completions/{id}`: deletes the record (its review and training use too).
pub async fn delete(state: web::Data<AppState>, caller: Caller, id: web::Path<String>) -> ApiResult<HttpResponse> {
    stored(&state, &caller, &id).await?;
    let deleted = logs(&state)?.store.delete(&id).await?;
    if !deleted {
        return Err(not_found(&id));
    }
    tracing::info!(id = %id, "stored completion deleted");
    Ok(HttpResponse::Ok().json(json!({"object": "chat.completion.deleted", "id": *id, "deleted": true})))
}

/// `GET /v1/chat/completions/{id}/messages`: the request's messages, ids `<id>-<index>`.
pub async fn messages(
    state: web::Data<AppState>,
    caller: Caller,
    id: web::Path<String>,
    req: HttpRequest,
) -> ApiResult<HttpResponse> {
    let r = stored(&state, &caller, &id).await?;
    let mut q = ListQuery { limit: DEFAULT_LIMIT, after: None, order: Order::OldestFirst };
    for (k, v) in query_pairs(&req)? {
        if !list_query(&k, &v, &mut q)? {
            return Err(ApiError::invalid_value(k.clone(), format!("Unknown query parameter '{k}'.")));
        }
    }
    let all: Vec<Value> = r
        .request
        .messages
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(i, m)| message_object(&r.id, i, m))
        .collect();
    page(all, &q, "message")
}

/// One page of `all` (in stored order) as a list body: `order`, then the items after the
/// one `after` names (a 400 naming `what` when none has that id), then `limit` of them.
pub(super) fn page(mut all: Vec<Value>, q: &ListQuery, what: &str) -> ApiResult<HttpResponse> {
    if q.order == Order::NewestFirst {
        all.reverse();
    }
    let start = match &q.after {
        Some(after) => {
            let pos = all.iter().position(|m| m.get("id").and_then(Value::as_str) == Some(after.as_str()));
            pos.map(|p| p + 1).ok_or_else(|| ApiError::invalid_value("after", format!("'after' names no {what}: '{after}'.")))?
        }
        None => 0,
    };
    let rest: Vec<Value> = all.into_iter().skip(start).collect();
    let has_more = rest.len() > q.limit;
    Ok(HttpResponse::Ok().json(list_body(rest.into_iter().take(q.limit).collect(), has_more)))
}

/// One request message in OpenAI's message-list shape: `content` as text, and the parts as
/// `content_parts` when the client sent parts.
fn message_object(completion_id: &str, index: usize, m: &Value) -> Value {
    let (content, parts) = match m.get("content") {
        Some(Value::String(s)) => (Value::String(s.clone()), Value::Null),
        Some(Value::Array(parts)) => {
            let text: Vec<&str> = parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect();
            (Value::String(text.join("\n")), Value::Array(parts.clone()))
        }
        _ => (Value::Null, Value::Null),
    };
    json!({
        "id": format!("{completion_id}-{index}"),
        "role": m.get("role").cloned().unwrap_or(Value::Null),
        "content": content,
        "refusal": null,
        "name": m.get("name").cloned().unwrap_or(Value::Null),
        "content_parts": parts,
    })
}
