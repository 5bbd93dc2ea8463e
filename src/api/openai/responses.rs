//! OpenAI's Responses API on the chat path: `POST /v1/responses` turns `instructions` and
//! the `input` items into chat messages (`instructions` becomes the system prompt, so
//! distillation applies), runs them exactly as a chat completion (routing, limits, logging,
//! grammars for `text.format` and function `tools`) and answers as a `response` object or
//! as the typed event stream the SDKs read (`response.created` … `response.completed`).
//!
//! State lives in the request log: a response is one log record (`resp_…` id) holding the
//! whole conversation as chat messages, so `GET`/`DELETE /v1/responses/{id}`,
//! `/input_items` and `previous_response_id` read it back, for the caller's tenant only, and
//! the review page and training see responses like chat completions. The output items are
//! rebuilt from the logged answer (ids derive from the response id), so nothing is stored
//! twice and redaction covers them too. Without a request log (`[logs] enabled = false`,
//! or logging off for the task or key) nothing is kept and those routes answer 404.

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_lab::sse;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::chat::{answer_with_ids, start, Started};
use super::generation::{self, collect_all, failed, token_logprob, total_usage, unix_now, LogDraft, Meta};
use super::stored::{list_query, page, ListQuery, DEFAULT_LIMIT};
use super::stream::{self, ChunkFormat, StreamResources};
use super::tools::{self, ToolPlan};
use super::types::{
    ChatCompletionRequest, ChatMessageIn, ContentPart, CreateResponseRequest, JsonSchemaFormat, MessageContent,
    ResponseFormat, ResponseInput, UsageOut,
};
use crate::api::admin::logs::{logs, query_pairs};
use crate::api::auth::Caller;
use crate::api::error::{ApiError, ApiResult, ErrorKind};
use crate::api::json::Json;
use crate::api::AppState;
use crate::engine::{FinishReason, ModelInfo};
use crate::logs::{LogRecord, Order, STATUS_OK};

/// The request fields a response object repeats, kept in the log record's params (the
/// sampling ones under the names chat uses, so the review page shows them alike).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Echo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    instructions: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<i64>,
    /// Function tools in the Responses form (`{"type": "function", "name", …}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    previous_response_id: Option<String>,
    /// `store` (OpenAI's default: true): readable back and chainable.
    #[serde(default)]
    store: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    text: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stream: Option<bool>,
    /// Where this request's own input starts in the logged messages (after the
    /// instructions and the chained history).
    #[serde(default)]
    input_from: usize,
    /// The output text carries token log probabilities.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    logprobs: bool,
}

/// `include` values accepted: logprobs, and reasoning content (this model has none to add).
const INCLUDES: &[&str] = &["message.output_text.logprobs", "reasoning.encrypted_content"];

/// `POST /v1/responses`
pub async fn create(
    state: web::Data<AppState>,
    caller: Caller,
    http: HttpRequest,
    Json(req): Json<CreateResponseRequest>,
) -> ApiResult<HttpResponse> {
    check_unsupported(&req)?;
    let hex = uuid::Uuid::new_v4().simple().to_string();
    let meta = Meta { id: format!("resp_{hex}"), created: unix_now(), model: req.model.clone(), fingerprint: state.fingerprint.clone() };

    let mut messages = Vec::new();
    if let Some(instructions) = &req.instructions {
        messages.push(text_message("system", instructions.clone()));
    }
    if let Some(prev) = &req.previous_response_id {
        let r = stored(&state, &caller, prev).await.map_err(|_| not_found(prev).with_param("previous_response_id"))?;
        messages.extend(conversation(&r)?);
    }
    let input_from = messages.len();
    match &req.input {
        Some(ResponseInput::Text(s)) => messages.push(text_message("user", s.clone())),
        Some(ResponseInput::Items(items)) => messages.extend(items_to_messages(items, "input")?),
        None => {}
    }
    if messages.len() == input_from {
        return Err(ApiError::new(ErrorKind::MissingRequiredParameter, "'input' must hold at least one item.")
            .with_param("input"));
    }

    let include = req.include.clone().unwrap_or_default();
    let logprobs = include.iter().any(|i| i == "message.output_text.logprobs") || req.top_logprobs.unwrap_or(0) > 0;
    let echo = Echo {
        instructions: req.instructions.clone(),
        max_output_tokens: req.max_output_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        top_logprobs: req.top_logprobs,
        tools: req.tools.clone().unwrap_or_default(),
        tool_choice: req.tool_choice.clone(),
        parallel_tool_calls: req.parallel_tool_calls,
        previous_response_id: req.previous_response_id.clone(),
        store: req.store.unwrap_or(true),
        text: req.text.as_ref().and_then(|t| serde_json::to_value(t).ok()),
        user: req.user.clone(),
        stream: req.stream,
        input_from,
        logprobs,
    };
    let chat = ChatCompletionRequest {
        model: req.model.clone(),
        messages,
        max_tokens: None,
        max_completion_tokens: req.max_output_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: None,
        ignore_eos: None,
        n: None,
        stream: req.stream,
        stream_options: None,
        stop: None,
        seed: None,
        user: req.user.clone(),
        metadata: req.metadata.clone(),
        store: None,
        // Chat needs `logprobs: true` beside `top_logprobs`; here the number alone asks
        // (and a bad number gets chat's range error).
        logprobs: (logprobs || req.top_logprobs.is_some_and(|n| n != 0)).then_some(true),
        top_logprobs: req.top_logprobs,
        frequency_penalty: None,
        presence_penalty: None,
        logit_bias: None,
        tools: req.tools.as_deref().map(chat_tools).transpose()?,
        tool_choice: req.tool_choice.as_ref().map(chat_tool_choice).transpose()?,
        parallel_tool_calls: req.parallel_tool_calls,
        functions: None,
        function_call: None,
        response_format: req.text.as_ref().and_then(|t| t.format.as_ref()).map(response_format).transpose()?,
        audio: None,
    };

    let base = state.config.model.name.clone();
    let started = start(&state, &caller, &http, &chat, meta, "responses", |meta, routed, request_id| {
        let mut params = match serde_json::to_value(&echo) {
            Ok(Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        if let Some(m) = chat.max_completion_tokens {
            params.insert("max_completion_tokens".into(), m.into());
        }
        let draft = LogDraft {
            messages: serde_json::to_value(&chat.messages).unwrap_or(Value::Null),
            params,
            metadata: chat.metadata.clone(),
            // Kept out of the stored *chat completions* list; `params.store` says whether
            // this response can be read back.
            store: false,
        };
        generation::log_draft(meta, routed, &base, &caller, request_id, draft)
    })
    .await
    .map_err(responses_param)?;
    let Started { plan, permit, mut record, meta, request_id, saved, info, streams } = started;
    let object = ObjectParts { id: meta.id.clone(), created_at: meta.created, model: meta.model.clone(), metadata: req.metadata.clone(), echo };

    if plan.common.stream {
        let format = ResponseEvents {
            object,
            info,
            hex,
            seq: 0,
            tools: plan.tools.clone(),
            text: String::new(),
            logprobs: Vec::new(),
            done: None,
            saved,
        };
        let held = StreamResources { permit, record };
        let mut resp = stream::respond(streams, 1, false, format, held);
        super::chat::response_headers(&mut resp, saved, &request_id);
        return Ok(resp);
    }

    let completions = match collect_all(streams).await {
        Ok(c) => c,
        Err(e) => return Err(failed(record, e).await),
    };
    drop(permit);
    let Some(c) = completions.into_iter().next() else {
        return Err(failed(record, ApiError::internal("the engine returned no choice")).await);
    };
    record.choice_done(&c.timings, c.usage.completion_tokens);
    let usage = total_usage(1, [(0, &c.usage)]).with_saved(saved);
    record.complete(usage);
    record.set_result(&c.text, stream::finish_reason(c.finish_reason), c.timings.time_to_first_token);
    let logprobs: Vec<Value> = if object.echo.logprobs {
        c.tokens
            .iter()
            .zip(&c.logprobs)
            .zip(&c.top_logprobs)
            .map(|((&t, &lp), top)| serde_json::to_value(token_logprob(&info, t, lp, top)).unwrap_or(Value::Null))
            .collect()
    } else {
        Vec::new()
    };
    let out = outcome(&hex, plan.tools.as_ref(), c.text, c.finish_reason, logprobs);
    let body = object.render(out.status, out.items, Some(usage_json(&usage)), Value::Null);
    record.commit().await;
    record.finish();
    let mut resp = HttpResponse::Ok().json(body);
    super::chat::response_headers(&mut resp, saved, &request_id);
    Ok(resp)
}

/// `GET /v1/responses/{id}`
pub async fn retrieve(state: web::Data<AppState>, caller: Caller, id: web::Path<String>) -> ApiResult<HttpResponse> {
    let r = stored(&state, &caller, &id).await?;
    Ok(HttpResponse::Ok().json(from_record(&r)?))
}

/// `DELETE /v1/responses/{id}`: deletes the record (its review and training use too).
pub async fn delete(state: web::Data<AppState>, caller: Caller, id: web::Path<String>) -> ApiResult<HttpResponse> {
    stored(&state, &caller, &id).await?;
    if !logs(&state)?.store.delete(&id).await? {
        return Err(not_found(&id));
    }
    tracing::info!(id = %id, "stored response deleted");
    Ok(HttpResponse::Ok().json(json!({"id": *id, "object": "response", "deleted": true})))
}

/// `GET /v1/responses/{id}/input_items`: this request's own input (not the instructions nor
/// the chained history), newest first by default as at OpenAI.
pub async fn input_items(
    state: web::Data<AppState>,
    caller: Caller,
    id: web::Path<String>,
    req: HttpRequest,
) -> ApiResult<HttpResponse> {
    let r = stored(&state, &caller, &id).await?;
    let echo = echo_of(&r);
    let mut q = ListQuery { limit: DEFAULT_LIMIT, after: None, order: Order::NewestFirst };
    for (k, v) in query_pairs(&req)? {
        // `include` asks for extra fields this gateway does not keep; nothing to add.
        if k != "include" && k != "include[]" && !list_query(&k, &v, &mut q)? {
            return Err(ApiError::invalid_value(k.clone(), format!("Unknown query parameter '{k}'.")));
        }
    }
    let hex = r.id.trim_start_matches("resp_");
    let messages: Vec<Value> = r.request.messages.as_array().cloned().unwrap_or_default();
    let all = messages_to_items(messages.get(echo.input_from..).unwrap_or_default(), hex, echo.input_from);
    page(all, &q, "input item")
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(ErrorKind::ResponseNotFound, format!("Response with id '{id}' not found.")).with_param("response_id")
}

/// The stored response `id`, or 404 (also for one made with `store: false`, and for another
/// tenant's: a client cannot tell those from ids that do not exist).
async fn stored(state: &AppState, caller: &Caller, id: &str) -> ApiResult<LogRecord> {
    if !id.starts_with("resp_") {
        return Err(not_found(id));
    }
    match logs(state)?.store.get(id).await? {
        Some(r) if echo_of(&r).store && caller.owns(r.tenant.as_deref()) => Ok(r),
        _ => Err(not_found(id)),
    }
}

fn echo_of(r: &LogRecord) -> Echo {
    serde_json::from_value(r.request.params.clone()).unwrap_or_default()
}

/// A stored response's conversation to continue from: its messages without its own
/// instructions (OpenAI does not carry them over), then its output.
fn conversation(r: &LogRecord) -> ApiResult<Vec<ChatMessageIn>> {
    let echo = echo_of(r);
    let mut messages: Vec<ChatMessageIn> = serde_json::from_value(r.request.messages.clone())
        .map_err(|e| ApiError::internal(format!("stored response {} has unreadable messages: {e}", r.id)))?;
    if echo.instructions.is_some() && messages.first().is_some_and(|m| m.role == "system") {
        messages.remove(0);
    }
    let out = stored_outcome(r, &echo)?;
    messages.extend(items_to_messages(&out.items, "previous_response_id")?);
    Ok(messages)
}

/// A stored record's output items, rebuilt from its logged answer.
fn stored_outcome(r: &LogRecord, echo: &Echo) -> ApiResult<Outcome> {
    let plan = tools::plan(
        Some(&chat_tools(&echo.tools)?),
        echo.tool_choice.as_ref().map(chat_tool_choice).transpose()?.as_ref(),
    )?;
    let reason = match r.finish_reason.as_deref() {
        Some("length") => FinishReason::Length,
        Some("cancelled") => FinishReason::Cancelled,
        _ if r.client_disconnected => FinishReason::Cancelled,
        _ => FinishReason::Stop,
    };
    Ok(outcome(r.id.trim_start_matches("resp_"), plan.as_ref(), r.response.clone(), reason, Vec::new()))
}

/// A stored record as the `response` object.
fn from_record(r: &LogRecord) -> ApiResult<Value> {
    let echo = echo_of(r);
    let mut out = stored_outcome(r, &echo)?;
    let error = if r.status == STATUS_OK {
        Value::Null
    } else {
        out.status = "failed";
        // OpenAI's error codes for responses are a closed set; ours goes in the message.
        json!({"code": "server_error", "message": format!("The response failed: {}.", r.status)})
    };
    let mut usage = UsageOut::new(r.prompt_tokens as usize, r.completion_tokens as usize);
    usage = usage.with_saved(r.prompt_tokens_saved as usize);
    let object = ObjectParts {
        id: r.id.clone(),
        created_at: u64::try_from(r.created_ms / 1000).unwrap_or(0),
        model: r.model.clone(),
        metadata: Some(r.metadata.clone().into_iter().collect()),
        echo,
    };
    Ok(object.render(out.status, out.items, Some(usage_json(&usage)), error))
}

/// What the client asked for that this gateway does not do, as 400s naming the field.
fn check_unsupported(req: &CreateResponseRequest) -> ApiResult<()> {
    if req.background == Some(true) {
        return Err(ApiError::unsupported("background", "responses run in the foreground; use stream for long answers"));
    }
    if req.conversation.as_ref().is_some_and(|c| !c.is_null()) {
        return Err(ApiError::unsupported("conversation", "chain responses with previous_response_id instead"));
    }
    if req.prompt.as_ref().is_some_and(|p| !p.is_null()) {
        return Err(ApiError::unsupported("prompt", "stored prompt templates are not kept here; send instructions"));
    }
    if let Some(t) = req.truncation.as_deref().filter(|t| *t != "disabled" && *t != "auto") {
        return Err(ApiError::invalid_value("truncation", format!("'truncation' must be 'auto' or 'disabled', not '{t}'.")));
    }
    for i in req.include.iter().flatten() {
        if !INCLUDES.contains(&i.as_str()) {
            return Err(ApiError::unsupported("include", &format!("'{i}' (supported: {})", INCLUDES.join(", "))));
        }
    }
    Ok(())
}

/// Chat's parameter names in errors, as this endpoint's client spelled them.
fn responses_param(mut e: ApiError) -> ApiError {
    if let Some(p) = e.param.take() {
        let renamed = if let Some(rest) = p.strip_prefix("messages") {
            format!("input{rest}")
        } else {
            match p.as_str() {
                "max_completion_tokens" | "max_tokens" => "max_output_tokens".to_string(),
                "response_format" => "text.format".to_string(),
                _ => p,
            }
        };
        e.param = Some(renamed);
    }
    e
}

fn text_message(role: &str, text: String) -> ChatMessageIn {
    ChatMessageIn { role: role.to_string(), content: Some(MessageContent::Text(text)), name: None, tool_calls: None, tool_call_id: None }
}

fn str_field<'a>(item: &'a Value, key: &str, at: &str) -> ApiResult<&'a str> {
    item.get(key).and_then(Value::as_str).ok_or_else(|| {
        ApiError::new(ErrorKind::MissingRequiredParameter, format!("'{at}.{key}' must be a string.")).with_param(format!("{at}.{key}"))
    })
}

/// Input (or output) items → chat messages: messages, function calls (consecutive calls
/// become one assistant turn) and their outputs. Reasoning items carry nothing this model
/// reads and are skipped; files, images and item references are 400s naming the item.
fn items_to_messages(items: &[Value], param: &str) -> ApiResult<Vec<ChatMessageIn>> {
    let mut out: Vec<ChatMessageIn> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{param}[{i}]");
        if !item.is_object() {
            return Err(ApiError::invalid_value(at, "Each input item must be an object."));
        }
        let kind = match item.get("type").and_then(Value::as_str) {
            Some(k) => k,
            None if item.get("role").is_some() => "message",
            None => return Err(ApiError::invalid_value(format!("{at}.type"), "The item has no 'type'.")),
        };
        match kind {
            "message" => {
                let role = match str_field(item, "role", &at)? {
                    "developer" | "system" => "system",
                    r @ ("user" | "assistant") => r,
                    r => {
                        return Err(ApiError::invalid_value(
                            format!("{at}.role"),
                            format!("'{r}' is not a role: use user, assistant, system or developer."),
                        ))
                    }
                };
                let content = match item.get("content") {
                    Some(Value::String(s)) => MessageContent::Text(s.clone()),
                    Some(Value::Array(parts)) => {
                        let mut texts = Vec::new();
                        for (j, part) in parts.iter().enumerate() {
                            let pat = format!("{at}.content[{j}]");
                            match part.get("type").and_then(Value::as_str) {
                                Some("input_text" | "output_text") => texts.push(str_field(part, "text", &pat)?.to_string()),
                                Some("refusal") => texts.push(str_field(part, "refusal", &pat)?.to_string()),
                                Some(t @ ("input_image" | "input_file" | "input_audio")) => {
                                    return Err(ApiError::unsupported(
                                        &format!("{pat}.type"),
                                        &format!("'{t}': the served model reads text only"),
                                    ))
                                }
                                _ => {
                                    return Err(ApiError::invalid_value(
                                        format!("{pat}.type"),
                                        "Content parts are input_text, output_text or refusal.",
                                    ))
                                }
                            }
                        }
                        MessageContent::Parts(
                            texts
                                .into_iter()
                                .map(|t| ContentPart { kind: "text".into(), text: Some(t), refusal: None })
                                .collect(),
                        )
                    }
                    _ => {
                        return Err(ApiError::invalid_value(
                            format!("{at}.content"),
                            "'content' must be a string or an array of content parts.",
                        ))
                    }
                };
                out.push(ChatMessageIn {
                    role: role.to_string(),
                    content: Some(content),
                    name: None,
                    tool_calls: None,
                    tool_call_id: None,
                });
            }
            "function_call" => {
                let call = json!({
                    "id": str_field(item, "call_id", &at)?,
                    "type": "function",
                    "function": {"name": str_field(item, "name", &at)?, "arguments": str_field(item, "arguments", &at)?},
                });
                match out.last_mut() {
                    Some(m) if m.role == "assistant" && m.content.is_none() && m.tool_calls.is_some() => {
                        m.tool_calls.get_or_insert_with(Vec::new).push(call);
                    }
                    _ => out.push(ChatMessageIn {
                        role: "assistant".into(),
                        content: None,
                        name: None,
                        tool_calls: Some(vec![call]),
                        tool_call_id: None,
                    }),
                }
            }
            "function_call_output" => {
                let output = match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(parts)) => {
                        parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).collect::<Vec<_>>().join("")
                    }
                    _ => {
                        return Err(ApiError::invalid_value(format!("{at}.output"), "'output' must be a string or text parts."))
                    }
                };
                out.push(ChatMessageIn {
                    role: "tool".into(),
                    content: Some(MessageContent::Text(output)),
                    name: None,
                    tool_calls: None,
                    tool_call_id: Some(str_field(item, "call_id", &at)?.to_string()),
                });
            }
            "reasoning" => {}
            "item_reference" => {
                return Err(ApiError::unsupported(&format!("{at}.type"), "item references; send the item itself or use previous_response_id"))
            }
            other => {
                return Err(ApiError::invalid_value(
                    format!("{at}.type"),
                    format!("'{other}' items are not supported: use message, function_call or function_call_output."),
                ))
            }
        }
    }
    Ok(out)
}

/// Logged chat messages → input items, ids derived from the response and the position.
fn messages_to_items(messages: &[Value], hex: &str, offset: usize) -> Vec<Value> {
    let mut items = Vec::new();
    for (k, m) in messages.iter().enumerate() {
        let i = offset + k;
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let texts: Vec<String> = match m.get("content") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(parts)) => {
                parts.iter().filter_map(|p| p.get("text").and_then(Value::as_str)).map(str::to_string).collect()
            }
            _ => Vec::new(),
        };
        match role {
            "tool" => items.push(json!({
                "id": format!("fco_{hex}_{i}"),
                "type": "function_call_output",
                "call_id": m.get("tool_call_id").cloned().unwrap_or(Value::Null),
                "output": texts.join(""),
                "status": "completed",
            })),
            _ => {
                if !texts.is_empty() || m.get("tool_calls").is_none() {
                    let content: Vec<Value> = texts
                        .into_iter()
                        .map(|t| {
                            if role == "assistant" {
                                json!({"type": "output_text", "text": t, "annotations": [], "logprobs": []})
                            } else {
                                json!({"type": "input_text", "text": t})
                            }
                        })
                        .collect();
                    items.push(json!({
                        "id": format!("msg_{hex}_{i}"),
                        "type": "message",
                        "role": role,
                        "status": "completed",
                        "content": content,
                    }));
                }
                for (j, call) in m.get("tool_calls").and_then(Value::as_array).into_iter().flatten().enumerate() {
                    items.push(json!({
                        "id": format!("fc_{hex}_{i}_{j}"),
                        "type": "function_call",
                        "call_id": call.get("id").cloned().unwrap_or(Value::Null),
                        "name": call.pointer("/function/name").cloned().unwrap_or(Value::Null),
                        "arguments": call.pointer("/function/arguments").cloned().unwrap_or(Value::Null),
                        "status": "completed",
                    }));
                }
            }
        }
    }
    items
}

/// Responses function tools → chat tools. Hosted tools (web search, file search, …) are
/// 400s naming the tool.
fn chat_tools(tools: &[Value]) -> ApiResult<Vec<Value>> {
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| match t.get("type").and_then(Value::as_str) {
            Some("function") => {
                let name = str_field(t, "name", &format!("tools[{i}]"))?;
                let mut function = json!({"name": name});
                for key in ["description", "parameters", "strict"] {
                    if let Some(v) = t.get(key).filter(|v| !v.is_null()) {
                        function[key] = v.clone();
                    }
                }
                Ok(json!({"type": "function", "function": function}))
            }
            Some(other) => Err(ApiError::unsupported(
                &format!("tools[{i}].type"),
                &format!("'{other}' tools are hosted by OpenAI; only function tools are served here"),
            )),
            None => Err(ApiError::invalid_value(format!("tools[{i}].type"), "Each tool needs a 'type'.")),
        })
        .collect()
}

/// `tool_choice`: the modes as they are, `{"type": "function", "name"}` in chat's form.
fn chat_tool_choice(choice: &Value) -> ApiResult<Value> {
    match choice {
        Value::String(_) => Ok(choice.clone()),
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = str_field(choice, "name", "tool_choice")?;
            Ok(json!({"type": "function", "function": {"name": name}}))
        }
        _ => Err(ApiError::unsupported("tool_choice", "only 'none', 'auto', 'required' or a named function")),
    }
}

/// `text.format` → chat's `response_format`.
fn response_format(format: &Value) -> ApiResult<ResponseFormat> {
    let kind = format.get("type").and_then(Value::as_str).unwrap_or("text");
    match kind {
        "text" | "json_object" => Ok(ResponseFormat { kind: kind.to_string(), json_schema: None }),
        "json_schema" => Ok(ResponseFormat {
            kind: kind.to_string(),
            json_schema: Some(JsonSchemaFormat {
                name: format.get("name").and_then(Value::as_str).map(str::to_string),
                description: format.get("description").and_then(Value::as_str).map(str::to_string),
                schema: format.get("schema").cloned(),
                strict: format.get("strict").and_then(Value::as_bool),
            }),
        }),
        other => Err(ApiError::invalid_value("text.format.type", format!("'{other}' is not a format: use text, json_object or json_schema."))),
    }
}

/// A finished answer as output items, and the response status it gives.
struct Outcome {
    items: Vec<Value>,
    status: &'static str,
}

fn message_id(hex: &str) -> String {
    format!("msg_{hex}")
}

/// The output items of an answer: its function calls when it is a call of a listed tool,
/// else one assistant message. Ids derive from the response's, so a stored response yields
/// the same items every time.
fn outcome(hex: &str, tools: Option<&ToolPlan>, text: String, reason: FinishReason, logprobs: Vec<Value>) -> Outcome {
    let status = match reason {
        FinishReason::Stop => "completed",
        FinishReason::Length => "incomplete",
        FinishReason::Cancelled => "cancelled",
    };
    let mut n = 0;
    let (message, _) = answer_with_ids(tools, text, reason, &mut || {
        n += 1;
        format!("call_{hex}_{}", n - 1)
    });
    let items = match message.tool_calls {
        Some(calls) => calls
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                json!({
                    "id": format!("fc_{hex}_{i}"),
                    "type": "function_call",
                    "call_id": c.id,
                    "name": c.function.name,
                    "arguments": c.function.arguments,
                    "status": "completed",
                })
            })
            .collect(),
        None => vec![message_item(hex, message.content.unwrap_or_default(), logprobs, if status == "completed" { "completed" } else { "incomplete" })],
    };
    Outcome { items, status }
}

fn message_item(hex: &str, text: String, logprobs: Vec<Value>, status: &str) -> Value {
    json!({
        "id": message_id(hex),
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [output_text(text, logprobs)],
    })
}

fn output_text(text: String, logprobs: Vec<Value>) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs})
}

fn usage_json(u: &UsageOut) -> Value {
    let details = u.prompt_tokens_details;
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": details.map_or(0, |d| d.cached_tokens),
            "cache_write_tokens": 0,
            // tunegate's: prompt tokens a distilled adapter made unnecessary.
            "distilled_tokens": details.map_or(0, |d| d.distilled_tokens),
        },
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.total_tokens,
    })
}

/// What a `response` object is made of besides its output and usage.
struct ObjectParts {
    id: String,
    created_at: u64,
    model: String,
    metadata: Option<std::collections::HashMap<String, String>>,
    echo: Echo,
}

impl ObjectParts {
    fn render(&self, status: &str, output: Vec<Value>, usage: Option<Value>, error: Value) -> Value {
        let e = &self.echo;
        let tool_choice = e.tool_choice.clone().unwrap_or_else(|| Value::from("auto"));
        let format = e.text.as_ref().and_then(|t| t.get("format")).filter(|f| !f.is_null()).cloned();
        let done = !matches!(status, "in_progress" | "queued");
        let mut object = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": if status == "completed" { Value::from(unix_now()) } else { Value::Null },
            "background": false,
            "error": error,
            "incomplete_details": if status == "incomplete" { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "instructions": e.instructions,
            "max_output_tokens": e.max_output_tokens,
            "max_tool_calls": null,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": e.parallel_tool_calls.unwrap_or(true),
            "previous_response_id": e.previous_response_id,
            "reasoning": {"effort": null, "summary": null},
            "service_tier": "default",
            "store": e.store,
            "temperature": e.temperature.unwrap_or(1.0),
            "text": {"format": format.unwrap_or_else(|| json!({"type": "text"}))},
            "tool_choice": tool_choice,
            "tools": e.tools,
            "top_logprobs": e.top_logprobs.unwrap_or(0),
            "top_p": e.top_p.unwrap_or(1.0),
            "truncation": "disabled",
            "metadata": self.metadata.clone().unwrap_or_default(),
        });
        // Absent rather than null where OpenAI's schema does not allow null.
        if let (true, Some(usage)) = (done, usage) {
            object["usage"] = usage;
        }
        if let Some(user) = &e.user {
            object["user"] = Value::from(user.clone());
        }
        object
    }
}

/// The Responses API's typed stream: `response.created`, `response.in_progress`, the output
/// item and content part openings, `response.output_text.delta`s, their closings and
/// `response.completed` (or `response.incomplete`), each with its `sequence_number`. With
/// callable tools the answer is held until it ends (a call is only known whole), then sent
/// as `function_call` items with their arguments, or as the message.
struct ResponseEvents {
    object: ObjectParts,
    info: Arc<ModelInfo>,
    hex: String,
    seq: u64,
    tools: Option<ToolPlan>,
    text: String,
    logprobs: Vec<Value>,
    /// The answer's items and status, once it has finished.
    done: Option<Outcome>,
    saved: usize,
}

impl ResponseEvents {
    fn event(&mut self, kind: &str, mut body: Value) -> sse::Data {
        body["type"] = Value::from(kind);
        body["sequence_number"] = Value::from(self.seq);
        self.seq += 1;
        sse::Data::new(body.to_string()).event(kind.to_string())
    }

    /// The events of one whole message item (tools held the text until the end).
    fn message_events(&mut self, output_index: usize, text: String, item_status: &str) -> Vec<sse::Data> {
        let mut out = self.message_opening(output_index);
        if !text.is_empty() {
            let body = json!({"item_id": message_id(&self.hex), "output_index": output_index, "content_index": 0, "delta": text, "logprobs": []});
            out.push(self.event("response.output_text.delta", body));
        }
        out.extend(self.message_closing(output_index, text, Vec::new(), item_status));
        out
    }

    fn message_opening(&mut self, output_index: usize) -> Vec<sse::Data> {
        let id = message_id(&self.hex);
        let item = json!({"id": id, "type": "message", "role": "assistant", "status": "in_progress", "content": []});
        vec![
            self.event("response.output_item.added", json!({"output_index": output_index, "item": item})),
            self.event(
                "response.content_part.added",
                json!({"item_id": id, "output_index": output_index, "content_index": 0, "part": output_text(String::new(), Vec::new())}),
            ),
        ]
    }

    fn message_closing(&mut self, output_index: usize, text: String, logprobs: Vec<Value>, status: &str) -> Vec<sse::Data> {
        let id = message_id(&self.hex);
        let part = output_text(text.clone(), logprobs.clone());
        vec![
            self.event(
                "response.output_text.done",
                json!({"item_id": id, "output_index": output_index, "content_index": 0, "text": text, "logprobs": logprobs}),
            ),
            self.event("response.content_part.done", json!({"item_id": id, "output_index": output_index, "content_index": 0, "part": part})),
            self.event(
                "response.output_item.done",
                json!({"output_index": output_index, "item": message_item(&self.hex, text, logprobs, status)}),
            ),
        ]
    }
}

impl ChunkFormat for ResponseEvents {
    fn opening(&mut self) -> Vec<sse::Data> {
        let object = self.object.render("in_progress", Vec::new(), None, Value::Null);
        let mut out = vec![
            self.event("response.created", json!({"response": object})),
            self.event("response.in_progress", json!({"response": object})),
        ];
        if self.tools.is_none() {
            out.extend(self.message_opening(0));
        }
        out
    }

    fn token(&mut self, _index: usize, text: String, token_id: u32, logprob: f32, top: &[(u32, f32)]) -> Option<sse::Data> {
        self.text.push_str(&text);
        if self.tools.is_some() {
            return None;
        }
        let logprobs = if self.object.echo.logprobs {
            let lp = serde_json::to_value(token_logprob(&self.info, token_id, logprob, top)).unwrap_or(Value::Null);
            self.logprobs.push(lp.clone());
            vec![lp]
        } else if text.is_empty() {
            return None;
        } else {
            Vec::new()
        };
        let body = json!({"item_id": message_id(&self.hex), "output_index": 0, "content_index": 0, "delta": text, "logprobs": logprobs});
        Some(self.event("response.output_text.delta", body))
    }

    fn finished(&mut self, _index: usize, reason: FinishReason) -> Vec<sse::Data> {
        let text = std::mem::take(&mut self.text);
        let logprobs = std::mem::take(&mut self.logprobs);
        let out = outcome(&self.hex, self.tools.as_ref(), text.clone(), reason, logprobs.clone());
        let item_status = if out.status == "completed" { "completed" } else { "incomplete" };
        let items = out.items.clone();
        self.done = Some(out);
        if self.tools.is_none() {
            return self.message_closing(0, text, logprobs, item_status);
        }
        let mut events = Vec::new();
        for (i, item) in items.into_iter().enumerate() {
            if item["type"] == "function_call" {
                let mut opened = item.clone();
                opened["status"] = "in_progress".into();
                opened["arguments"] = "".into();
                let id = item["id"].clone();
                let args = item["arguments"].clone();
                events.push(self.event("response.output_item.added", json!({"output_index": i, "item": opened})));
                events.push(self.event(
                    "response.function_call_arguments.delta",
                    json!({"item_id": id, "output_index": i, "delta": args}),
                ));
                events.push(self.event(
                    "response.function_call_arguments.done",
                    json!({"item_id": id, "output_index": i, "name": item["name"], "arguments": args}),
                ));
                events.push(self.event("response.output_item.done", json!({"output_index": i, "item": item})));
            } else {
                events.extend(self.message_events(i, text.clone(), item_status));
            }
        }
        events
    }

    fn closing(&mut self, usage: UsageOut, _include_usage: bool) -> Vec<sse::Data> {
        // The one choice has finished (`finished` made its items).
        let out = self.done.take().unwrap_or(Outcome { items: Vec::new(), status: "incomplete" });
        let usage = usage.with_saved(self.saved);
        let object = self.object.render(out.status, out.items, Some(usage_json(&usage)), Value::Null);
        let kind = if out.status == "completed" { "response.completed" } else { "response.incomplete" };
        vec![self.event(kind, json!({"response": object}))]
    }

    fn error(&mut self, e: &ApiError) -> sse::Data {
        let body = json!({"code": e.kind.code(), "message": e.message, "param": e.param});
        self.event("error", body)
    }
}
