//! `POST /v1/chat/completions`: validate → route → render the chat template → submit one
//! engine request per choice → answer as one JSON object or as SSE chunks.

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_lab::sse;

use super::convert::{self, ChatPlan};
use super::proxy;
use super::generation::{
    self, cache_scope, chat_prompt, collect_all, compile_grammar, failed, logged_params, submit_all, token_logprob,
    total_usage, LogDraft, Meta, RequestRecord, SharedParams,
};
use super::stream::{self, data, finish_reason, ChunkFormat, StreamResources};
use super::tools::{Choice, ToolPlan};
use super::types::{
    ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChoiceLogprobs, ChunkChoice, Delta,
    FunctionCall, ResponseMessage, ToolCall, ToolCallDelta, UsageOut,
};
use crate::api::auth::Caller;
use crate::api::error::{ApiError, ApiResult};
use crate::api::json::JsonBody;
use crate::api::limits::Permit;
use crate::api::AppState;
use crate::engine::{FinishReason, GenerationStream, ModelInfo};
use crate::logs::LogRecord;
use crate::router::Routed;
use crate::upstream::Hop;
use serde_json::Value;

pub async fn create(
    state: web::Data<AppState>,
    caller: Caller,
    http: HttpRequest,
    JsonBody(mut req, raw): JsonBody<ChatCompletionRequest>,
) -> ApiResult<HttpResponse> {
    let Some(hops) = state.upstreams.chain(&req.model) else {
        return local(&state, &caller, &http, &req).await;
    };
    // An upstream model, or a route: its hops in order while they fail before answering.
    let asked = req.model.clone();
    let task = req.metadata.as_ref().and_then(|m| m.get("task")).cloned();
    let last = hops.len() - 1;
    for (i, hop) in hops.into_iter().enumerate() {
        let answer = match hop {
            Hop::Upstream(target) => {
                let served_by = format!("{}/{}", target.upstream.name, target.model);
                let draft = |meta: &Meta, routed: &Routed, request_id| log_draft(meta, &req, routed, &served_by, &caller, request_id);
                proxy::forward(&state, &caller, &http, proxy::Endpoint::Chat, target, &asked, task.as_deref(), &raw, draft).await
            }
            Hop::Local(name) => {
                req.model = name;
                local(&state, &caller, &http, &req).await
            }
        };
        match answer {
            Err(e) if i < last && proxy::falls_back(&e) => tracing::info!(route = %asked, hop = i, "falling back: {e}"),
            answer => return answer,
        }
    }
    Err(ApiError::internal("a route without hops"))
}

/// A chat completion on the local engine (`req.model` names the base model or an adapter).
async fn local(state: &AppState, caller: &Caller, http: &HttpRequest, req: &ChatCompletionRequest) -> ApiResult<HttpResponse> {
    let meta = Meta::new("chatcmpl", &req.model, state.fingerprint.clone());
    let base = state.config.model.name.clone();
    let started = start(state, caller, http, req, meta, "chat.completions", |meta, routed, request_id| {
        log_draft(meta, req, routed, &base, caller, request_id)
    })
    .await?;
    let Started { plan, permit, mut record, meta, request_id, saved, info, streams } = started;

    if plan.common.stream {
        let format = ChatChunks {
            meta,
            info,
            n: streams.len(),
            logprobs: plan.logprobs,
            include_usage: plan.common.include_usage,
            saved,
            held: vec![String::new(); streams.len()],
            forced: (0..streams.len()).map(|_| ForcedCall::default()).collect(),
            tools: plan.tools.clone(),
        };
        let held = StreamResources { permit, record };
        let mut resp = stream::respond(streams, plan.common.n, plan.common.include_usage, format, held);
        response_headers(&mut resp, saved, &request_id);
        return Ok(resp);
    }

    let completions = match collect_all(streams).await {
        Ok(c) => c,
        Err(e) => return Err(failed(record, e).await),
    };
    drop(permit);
    for c in &completions {
        record.choice_done(&c.timings, c.usage.completion_tokens);
    }
    let usage = total_usage(plan.common.n, completions.iter().map(|c| &c.usage).enumerate()).with_saved(saved);
    record.complete(usage);
    if let Some(c) = completions.first() {
        record.set_result(&c.text, finish_reason(c.finish_reason), c.timings.time_to_first_token);
    }
    let choices = completions
        .into_iter()
        .enumerate()
        .map(|(index, c)| {
            let logprobs = plan.logprobs.then(|| ChoiceLogprobs {
                content: Some(
                    c.tokens
                        .iter()
                        .zip(&c.logprobs)
                        .zip(&c.top_logprobs)
                        .map(|((&t, &lp), top)| token_logprob(&info, t, lp, top))
                        .collect(),
                ),
                refusal: None,
            });
            let (message, finish) = answer(plan.tools.as_ref(), c.text, c.finish_reason);
            ChatChoice { index, logprobs, message, finish_reason: finish }
        })
        .collect();
    let body = ChatCompletion {
        id: meta.id,
        object: "chat.completion",
        created: meta.created,
        model: meta.model,
        system_fingerprint: meta.fingerprint.to_string(),
        choices,
        usage,
    };
    // The response goes out only once its log record is committed (`[logs] durable`).
    record.commit().await;
    record.finish();
    let mut resp = HttpResponse::Ok().json(body);
    response_headers(&mut resp, saved, &request_id);
    Ok(resp)
}

/// A chat request admitted, logged (draft) and submitted: what the endpoint needs to answer.
pub(super) struct Started {
    pub plan: ChatPlan,
    pub permit: Permit,
    pub record: RequestRecord,
    pub meta: Meta,
    pub request_id: String,
    /// Prompt tokens the router dropped (distillation).
    pub saved: usize,
    pub info: Arc<ModelInfo>,
    pub streams: Vec<GenerationStream>,
}

/// Everything before the answer, shared by chat completions and the Responses API: checks
/// and converts `req`, routes it, takes the concurrency permit, starts the request record
/// (`draft` makes its log record from the meta, the route and the request id), distils the
/// prompt and submits every choice. `meta.model` becomes the routed model.
pub(super) async fn start(
    state: &AppState,
    caller: &Caller,
    http: &HttpRequest,
    req: &ChatCompletionRequest,
    mut meta: Meta,
    endpoint: &'static str,
    draft: impl FnOnce(&Meta, &Routed, String) -> LogRecord,
) -> ApiResult<Started> {
    let mut plan = convert::chat(req, &state.config.limits)?;
    plan.common.cache_scope = cache_scope(&caller.key_id);
    let routed = state.route_for(caller, &req.model, plan.common.task.as_deref())?;
    crate::api::metrics::served(http, &routed);
    let permit = state.limiter.acquire_n(&caller.limit_key, plan.common.n)?;
    meta.model = routed.model.clone();
    let mut record = RequestRecord::new(endpoint, &routed, &caller.key_id);
    record.measure(&state.metrics);
    let request_id = crate::api::request_id::client_id(http).unwrap_or_else(|| meta.id.clone());
    record.log_to(state.logs.as_ref(), || draft(&meta, &routed, request_id.clone()));
    let saved = state.router.distill(&routed, &mut plan.messages);
    record.set_saved(saved);
    let submitted = async {
        let info = state.engine.info()?;
        let prompt = chat_prompt(&info, std::mem::take(&mut plan.messages)).await?;
        if let Some(spec) = plan.common.grammar.clone() {
            plan.common.constraint = Some(compile_grammar(&info, spec).await?);
        }
        let streams = submit_all(&state.engine, &[prompt], &plan.common, routed.adapter.as_ref())?;
        ApiResult::Ok((info, streams))
    }
    .await;
    match submitted {
        Ok((info, streams)) => Ok(Started { plan, permit, record, meta, request_id, saved, info, streams }),
        Err(e) => Err(failed(record, e).await),
    }
}

/// The log record as known before generation: who asked what, routed where.
fn log_draft(
    meta: &Meta,
    req: &ChatCompletionRequest,
    routed: &Routed,
    base: &str,
    caller: &Caller,
    request_id: String,
) -> LogRecord {
    let mut params = logged_params(SharedParams {
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        max_tokens: req.max_tokens,
        n: req.n,
        stop: req.stop.as_ref(),
        seed: req.seed.as_ref(),
        stream: req.stream,
        frequency_penalty: req.frequency_penalty,
        presence_penalty: req.presence_penalty,
        ignore_eos: req.ignore_eos,
        user: req.user.as_deref(),
    });
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v.filter(|v| !v.is_null()) {
            params.insert(k.to_string(), v);
        }
    };
    put("max_completion_tokens", req.max_completion_tokens.map(Value::from));
    put("logprobs", req.logprobs.map(Value::from));
    put("top_logprobs", req.top_logprobs.map(Value::from));
    put("tools", req.tools.clone().map(Value::from));
    put("tool_choice", req.tool_choice.clone());
    put("response_format", req.response_format.as_ref().and_then(|f| serde_json::to_value(f).ok()));
    let draft = LogDraft {
        messages: serde_json::to_value(&req.messages).unwrap_or(Value::Null),
        params,
        metadata: req.metadata.clone(),
        store: req.store.unwrap_or(false),
    };
    generation::log_draft(meta, routed, base, caller, request_id, draft)
}

/// `x-request-id` (the client's, else the completion id) and
/// `x-tunegate-prompt-tokens-saved`: prompt tokens a distilled adapter made unnecessary.
pub(super) fn response_headers(resp: &mut HttpResponse, saved: usize, request_id: &str) {
    if let Ok(v) = actix_web::http::header::HeaderValue::from_str(request_id) {
        resp.headers_mut().insert(crate::api::request_id::HEADER, v);
    }
    if saved > 0 {
        resp.headers_mut().insert(
            actix_web::http::header::HeaderName::from_static("x-tunegate-prompt-tokens-saved"),
            actix_web::http::header::HeaderValue::from(saved),
        );
    }
}

/// A finished choice as the message OpenAI returns: tool calls when the answer is a call of
/// a listed tool (and was not cut short), else the text.
/// A choice's message: its tool calls (ids from `id`) when the plan has tools and the text
/// is a call, else its text; with OpenAI's finish reason.
pub(super) fn answer_with_ids(
    tools: Option<&ToolPlan>,
    text: String,
    reason: FinishReason,
    id: &mut impl FnMut() -> String,
) -> (ResponseMessage, &'static str) {
    match tools.filter(|_| reason == FinishReason::Stop).and_then(|t| t.parse(&text, id)) {
        Some(calls) => (
            ResponseMessage { role: "assistant", content: None, refusal: None, tool_calls: Some(calls) },
            "tool_calls",
        ),
        None => (
            ResponseMessage { role: "assistant", content: Some(text), refusal: None, tool_calls: None },
            finish_reason(reason),
        ),
    }
}

/// [`answer_with_ids`] with fresh random `call_…` ids.
fn answer(tools: Option<&ToolPlan>, text: String, reason: FinishReason) -> (ResponseMessage, &'static str) {
    answer_with_ids(tools, text, reason, &mut call_id)
}

struct ChatChunks {
    meta: Meta,
    info: Arc<ModelInfo>,
    n: usize,
    logprobs: bool,
    include_usage: bool,
    saved: usize,
    /// With callable tools each choice's text is held until it ends (under `auto` a call is
    /// only known whole), then sent as its calls or its text; a forced call streams as it
    /// is written ([`ForcedCall`]).
    tools: Option<ToolPlan>,
    held: Vec<String>,
    forced: Vec<ForcedCall>,
}

/// A forced call (`tool_choice` `required` or a named function) streamed as the grammar
/// writes it, `{"name":"f","arguments":{…}}`: once the name is complete the call is
/// announced (id, type, name), then the arguments follow as written, the call object's
/// closing `}` held back until more text shows it was not the last byte.
#[derive(Debug, Default)]
struct ForcedCall {
    /// Byte offset in the held text where the arguments start, once announced.
    arguments_at: Option<usize>,
    /// Bytes of the arguments already sent.
    sent: usize,
}

impl ForcedCall {
    /// The delta the choice's text `held` allows now, if any.
    fn advance(&mut self, held: &str, id: &mut impl FnMut() -> String) -> Option<ToolCallDelta> {
        let Some(at) = self.arguments_at else {
            let rest = held.strip_prefix("{\"name\":")?;
            let mut names = serde_json::Deserializer::from_str(rest).into_iter::<String>();
            let name = names.next()?.ok()?;
            let after = &rest[names.byte_offset()..];
            after.strip_prefix(",\"arguments\":")?;
            let at = held.len() - after.len() + ",\"arguments\":".len();
            self.arguments_at = Some(at);
            self.sent = 0;
            let first = ToolCallDelta::whole(0, ToolCall { id: id(), kind: "function", function: FunctionCall { name, arguments: String::new() } });
            return Some(first);
        };
        // All but the last character: it may be the call object's closing brace.
        let end = held.char_indices().next_back().map_or(held.len(), |(i, _)| i).max(at);
        self.more(held, at, end)
    }

    /// What is left of the arguments when the answer ends (the call's closing `}` dropped).
    fn finish(&mut self, held: &str) -> Option<ToolCallDelta> {
        let at = self.arguments_at?;
        let end = if held.ends_with('}') { held.len() - 1 } else { held.len() }.max(at);
        self.more(held, at, end)
    }

    fn more(&mut self, held: &str, at: usize, end: usize) -> Option<ToolCallDelta> {
        let part = held.get(at + self.sent..end).filter(|p| !p.is_empty())?;
        self.sent += part.len();
        Some(ToolCallDelta::arguments(0, part.to_string()))
    }
}

/// A fresh `call_…` id.
fn call_id() -> String {
    format!("call_{}", &uuid::Uuid::new_v4().simple().to_string()[..24])
}

impl ChatChunks {
    fn chunk(&self, choices: Vec<ChunkChoice>, usage: Option<UsageOut>) -> sse::Data {
        data(&ChatCompletionChunk {
            id: self.meta.id.clone(),
            object: "chat.completion.chunk",
            created: self.meta.created,
            model: self.meta.model.clone(),
            system_fingerprint: self.meta.fingerprint.to_string(),
            choices,
            usage: self.include_usage.then_some(usage),
        })
    }
}

impl ChunkFormat for ChatChunks {
    fn opening(&mut self) -> Vec<sse::Data> {
        (0..self.n)
            .map(|index| {
                let delta = Delta { role: Some("assistant"), content: Some(String::new()), tool_calls: None };
                self.chunk(vec![ChunkChoice { index, delta, logprobs: None, finish_reason: None }], None)
            })
            .collect()
    }

    fn token(&mut self, index: usize, text: String, token_id: u32, logprob: f32, top: &[(u32, f32)]) -> Option<sse::Data> {
        if let Some(tools) = &self.tools {
            let h = self.held.get_mut(index)?;
            h.push_str(&text);
            if tools.choice == Choice::Auto {
                return None;
            }
            let call = self.forced.get_mut(index)?.advance(h, &mut call_id)?;
            let delta = Delta { role: None, content: None, tool_calls: Some(vec![call]) };
            return Some(self.chunk(vec![ChunkChoice { index, delta, logprobs: None, finish_reason: None }], None));
        }
        if text.is_empty() && !self.logprobs {
            return None;
        }
        let logprobs = self.logprobs.then(|| ChoiceLogprobs {
            content: Some(vec![token_logprob(&self.info, token_id, logprob, top)]),
            refusal: None,
        });
        let delta = Delta { role: None, content: Some(text), tool_calls: None };
        Some(self.chunk(vec![ChunkChoice { index, delta, logprobs, finish_reason: None }], None))
    }

    fn finished(&mut self, index: usize, reason: FinishReason) -> Vec<sse::Data> {
        let announced = self.forced.get(index).is_some_and(|f| f.arguments_at.is_some());
        if let (true, Some(text)) = (announced, self.held.get(index)) {
            // A streamed forced call: its last arguments, and the finish (`length` when cut short).
            let rest = self.forced.get_mut(index).and_then(|f| f.finish(text));
            let finish = if reason == FinishReason::Stop { "tool_calls" } else { finish_reason(reason) };
            let delta = Delta { role: None, content: None, tool_calls: rest.map(|r| vec![r]) };
            let choice = ChunkChoice { index, delta, logprobs: None, finish_reason: Some(finish) };
            return vec![self.chunk(vec![choice], None)];
        }
        let delta = match self.held.get_mut(index) {
            Some(text) if self.tools.is_some() => {
                let (message, finish) = answer(self.tools.as_ref(), std::mem::take(text), reason);
                let calls = message.tool_calls.map(|c| {
                    c.into_iter().enumerate().map(|(index, call)| ToolCallDelta::whole(index, call)).collect()
                });
                let choice = ChunkChoice {
                    index,
                    delta: Delta { role: None, content: message.content, tool_calls: calls },
                    logprobs: None,
                    finish_reason: Some(finish),
                };
                return vec![self.chunk(vec![choice], None)];
            }
            _ => Delta::default(),
        };
        let choice = ChunkChoice { index, delta, logprobs: None, finish_reason: Some(finish_reason(reason)) };
        vec![self.chunk(vec![choice], None)]
    }

    fn usage(&mut self, usage: UsageOut) -> Option<sse::Data> {
        Some(self.chunk(Vec::new(), Some(usage.with_saved(self.saved))))
    }
}
