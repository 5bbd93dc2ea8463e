//! `POST /v1/embeddings`, served by the engine from the base model (or an adapter named by
//! `model`): each input's final-normed hidden states, averaged over its tokens and scaled to
//! unit length (`Model::embed`). Inputs are a string, strings, token ids or lists of token
//! ids; the vectors come back as floats or, as the SDKs ask by default, base64 of
//! little-endian f32s. The engine runs a request's inputs between generation steps, a
//! prefill-sized batch at a time, so embedding traffic does not stall streams.
//!
//! Not logged: there is no answer to review or train on. A `model` of an upstream engine is
//! forwarded to it (`proxy::embeddings`).

use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine as _;
use serde_json::{json, Value};

use super::generation::tokenize;
use super::types::{EmbeddingRequest, PromptSpec};
use crate::adapters::lora_handle;
use crate::api::auth::Caller;
use crate::api::error::{ApiError, ApiResult, ErrorKind};
use crate::api::json::JsonBody;
use crate::upstream::Hop;
use crate::api::AppState;
use crate::engine::{EngineError, Prompt};

/// OpenAI's limit on inputs per request.
pub const MAX_INPUTS: usize = 2048;
/// Tokens one request may embed in all (OpenAI's limit is 300,000; a CPU takes minutes for that).
pub const MAX_TOTAL_TOKENS: usize = 65_536;

/// `POST /v1/embeddings`
pub async fn create(
    state: web::Data<AppState>,
    caller: Caller,
    http: HttpRequest,
    JsonBody(mut req, raw): JsonBody<EmbeddingRequest>,
) -> ApiResult<HttpResponse> {
    // An upstream's model, or a route: its first hop serves (embeddings do not fall back: a
    // vector from another model would not compare with the ones stored before).
    match state.upstreams.chain(&req.model).and_then(|hops| hops.into_iter().next()) {
        Some(Hop::Upstream(target)) => {
            return super::proxy::embeddings(&state, &caller, &http, target, &req.model, &raw).await;
        }
        Some(Hop::Local(name)) => req.model = name,
        None => {}
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid_value(
                "encoding_format",
                format!("'{other}' is not an encoding: use 'float' or 'base64'."),
            ))
        }
    };
    let inputs = inputs(req.input.as_ref().map(Option::as_ref))?;
    let routed = state.route_for(&caller, &req.model, None)?;
    let info = state.engine.info()?;
    if let Some(d) = req.dimensions {
        if usize::try_from(d).ok() != Some(info.shape.hidden_size) {
            return Err(ApiError::unsupported(
                "dimensions",
                &format!("this model's embeddings have {} dimensions and cannot be shortened", info.shape.hidden_size),
            ));
        }
    }
    crate::api::metrics::served(&http, &routed);
    let _permit = state.limiter.acquire_n(&caller.limit_key, 1)?;
    let tokens: Vec<Vec<u32>> = tokenize(&info, inputs)
        .await?
        .into_iter()
        .map(|p| match p {
            Prompt::Tokens(t) => t,
            Prompt::Text(_) => Vec::new(),
        })
        .collect();
    let mut total = 0;
    for (i, t) in tokens.iter().enumerate() {
        let at = if tokens.len() == 1 { "input".to_string() } else { format!("input[{i}]") };
        if t.is_empty() {
            return Err(ApiError::invalid_value(at, "An input is empty: there is nothing to embed."));
        }
        if t.len() > info.context_length {
            return Err(ApiError::new(
                ErrorKind::ContextLengthExceeded,
                format!(
                    "This model's maximum context length is {} tokens; the input has {} tokens.",
                    info.context_length,
                    t.len()
                ),
            )
            .with_param(at));
        }
        total += t.len();
    }
    if total > MAX_TOTAL_TOKENS {
        return Err(ApiError::invalid_value(
            "input",
            format!("The inputs hold {total} tokens; one request may embed at most {MAX_TOTAL_TOKENS}."),
        ));
    }
    let adapter = routed.adapter.as_ref().map(lora_handle);
    let rx = state.engine.embed(tokens, adapter).map_err(|e| match e {
        EngineError::InvalidRequest(m) => ApiError::invalid_value("input", m),
        e => ApiError::from(e),
    })?;
    let vectors = rx.await.map_err(|_| ApiError::from(EngineError::ShuttingDown))??;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
                Value::from(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                Value::from(v.clone())
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "object": "list",
        "data": data,
        "model": routed.model,
        "usage": {"prompt_tokens": total, "total_tokens": total},
    })))
}

/// `input` → prompts (text or token ids), within [`MAX_INPUTS`].
fn inputs(spec: Option<Option<&PromptSpec>>) -> ApiResult<Vec<Prompt>> {
    let missing = || ApiError::new(ErrorKind::MissingRequiredParameter, "Missing required parameter: 'input'.").with_param("input");
    let empty = || ApiError::new(ErrorKind::EmptyArray, "Invalid 'input': empty array.").with_param("input");
    let ids = |param: String, ids: &[i64]| -> ApiResult<Prompt> {
        ids.iter()
            .map(|&t| u32::try_from(t).map_err(|_| ApiError::invalid_value(&param, format!("Invalid token id {t}."))))
            .collect::<ApiResult<Vec<u32>>>()
            .map(Prompt::Tokens)
    };
    let prompts = match spec.ok_or_else(missing)?.ok_or_else(missing)? {
        PromptSpec::Text(t) => vec![Prompt::Text(t.clone())],
        PromptSpec::Texts(ts) => ts.iter().map(|t| Prompt::Text(t.clone())).collect(),
        PromptSpec::Tokens(t) if t.is_empty() => return Err(empty()),
        PromptSpec::Tokens(t) => vec![ids("input".into(), t)?],
        PromptSpec::TokenLists(ls) => {
            ls.iter().enumerate().map(|(i, t)| ids(format!("input[{i}]"), t)).collect::<ApiResult<_>>()?
        }
    };
    if prompts.is_empty() {
        return Err(empty());
    }
    if prompts.len() > MAX_INPUTS {
        return Err(ApiError::invalid_value("input", format!("At most {MAX_INPUTS} inputs per request.")));
    }
    Ok(prompts)
}
