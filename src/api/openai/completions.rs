//! `POST /v1/completions` (the legacy text endpoint): one or more prompts (text or token
//! ids), `n` samples each, `echo`, `logprobs`; JSON or SSE. `max_tokens: 0` answers from the
//! tokenizer alone, without the engine.
//!
//! Logged like chat, so its traffic can be reviewed and trained on: the prompt is the user
//! turn and choice 0's text the response. A request with several prompts is logged as its
//! first (the record's `params.prompt_count` says how many there were).

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_lab::sse;

use super::convert::{self, CompletionPlan};
use super::generation::{
    self, cache_scope, collect_all, failed, logged_params, submit_all, tokenize, top_logprob_map, total_usage, LogDraft,
    Meta, RequestRecord, SharedParams,
};
use super::stream::{self, data, finish_reason, ChunkFormat, StreamResources};
use super::types::{
    Completion as CompletionOut, CompletionChoice, CompletionLogprobs, CompletionRequest, PromptSpec, UsageOut,
};
use crate::api::auth::Caller;
use crate::api::error::ApiResult;
use crate::api::json::JsonBody;
use crate::api::AppState;
use crate::engine::{Completion, FinishReason, ModelInfo, Prompt, Timings, Usage};
use crate::logs::LogRecord;
use crate::router::Routed;
use crate::upstream::Hop;
use serde_json::Value;

/// `POST /v1/completions`; the response carries `x-request-id` (the client's, else the
/// completion id).
pub async fn create(
    state: web::Data<AppState>,
    caller: Caller,
    http: HttpRequest,
    JsonBody(mut req, raw): JsonBody<CompletionRequest>,
) -> ApiResult<HttpResponse> {
    let Some(hops) = state.upstreams.chain(&req.model) else {
        return local(&state, &caller, &http, &req).await;
    };
    // An upstream model, or a route: its hops in order while they fail before answering.
    let asked = req.model.clone();
    let task = req.metadata.as_ref().and_then(|m| m.get("task")).cloned();
    // The log keeps text prompts; token-id prompts are the upstream's tokens, not ours.
    let texts: Vec<String> = match &req.prompt {
        Some(Some(PromptSpec::Text(t))) => vec![t.clone()],
        Some(Some(PromptSpec::Texts(t))) => t.clone(),
        _ => Vec::new(),
    };
    let last = hops.len() - 1;
    for (i, hop) in hops.into_iter().enumerate() {
        let answer = match hop {
            Hop::Upstream(target) => {
                let served_by = format!("{}/{}", target.upstream.name, target.model);
                let draft = |meta: &Meta, routed: &Routed, request_id| {
                    log_draft(meta, &req, &texts, routed, &served_by, &caller, request_id)
                };
                let endpoint = super::proxy::Endpoint::Completions;
                super::proxy::forward(&state, &caller, &http, endpoint, target, &asked, task.as_deref(), &raw, draft).await
            }
            Hop::Local(name) => {
                req.model = name;
                local(&state, &caller, &http, &req).await
            }
        };
        match answer {
            Err(e) if i < last && super::proxy::falls_back(&e) => tracing::info!(route = %asked, hop = i, "falling back: {e}"),
            answer => return answer,
        }
    }
    Err(crate::api::error::ApiError::internal("a route without hops"))
}

/// Legacy completions on the local engine (`req.model` names the base model or an adapter).
async fn local(state: &AppState, caller: &Caller, http: &HttpRequest, req: &CompletionRequest) -> ApiResult<HttpResponse> {
    let mut plan = convert::completion(req, &state.config.limits)?;
    plan.common.cache_scope = cache_scope(&caller.key_id);
    let routed = state.route_for(caller, &req.model, plan.common.task.as_deref())?;
    crate::api::metrics::served(http, &routed);
    let permit = state.limiter.acquire_n(&caller.limit_key, plan.prompts.len() * plan.common.n)?;
    let info = state.engine.info()?;
    let texts = prompt_texts(&info, &plan.prompts)?;
    let echoes = if plan.echo { texts.clone() } else { vec![String::new(); plan.prompts.len()] };
    plan.prompts = tokenize(&info, std::mem::take(&mut plan.prompts)).await?;
    let mut record = RequestRecord::new("completions", &routed, &caller.key_id);
    record.measure(&state.metrics);
    let meta = Meta::new("cmpl", &routed.model, state.fingerprint.clone());
    let request_id = crate::api::request_id::client_id(http).unwrap_or_else(|| meta.id.clone());
    record.log_to(state.logs.as_ref(), || {
        log_draft(&meta, req, &texts, &routed, &state.config.model.name, caller, request_id.clone())
    });
    let with_id = |mut r: HttpResponse| {
        if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&request_id) {
            r.headers_mut().insert(crate::api::request_id::HEADER, v);
        }
        r
    };
    let n = plan.common.n;
    let mut format =
        CompletionChunks { meta, info: info.clone(), n, echoes, logprobs: plan.logprobs, offsets: Vec::new() };

    let completions = if plan.common.params.max_tokens == 0 {
        without_generation(&info, &plan)?
    } else {
        let streams = match submit_all(&state.engine, &plan.prompts, &plan.common, routed.adapter.as_ref()) {
            Ok(s) => s,
            Err(e) => return Err(failed(record, e).await),
        };
        if plan.common.stream {
            format.offsets = (0..streams.len()).map(|i| format.echo(i).chars().count()).collect();
            let held = StreamResources { permit, record };
            return Ok(with_id(stream::respond(streams, n, plan.common.include_usage, format, held)));
        }
        let completions = match collect_all(streams).await {
            Ok(c) => c,
            Err(e) => return Err(failed(record, e).await),
        };
        for c in &completions {
            record.choice_done(&c.timings, c.usage.completion_tokens);
        }
        completions
    };
    drop(permit);
    let usage = total_usage(n, completions.iter().map(|c| &c.usage).enumerate());
    record.complete(usage);
    if let Some(c) = completions.first() {
        record.set_result(&c.text, finish_reason(c.finish_reason), c.timings.time_to_first_token);
    }
    // The response goes out only once its log record is committed (`[logs] durable`).
    record.commit().await;
    record.finish();
    if plan.common.stream {
        // Nothing was generated (max_tokens 0): the whole stream is known now.
        let mut events: Vec<sse::Data> = format.opening();
        events.extend((0..completions.len()).flat_map(|i| format.finished(i, FinishReason::Length)));
        if plan.common.include_usage {
            events.extend(format.usage(usage));
        }
        events.push(sse::Data::new("[DONE]"));
        return Ok(with_id(stream::respond_static(events)));
    }
    let choices = completions.into_iter().enumerate().map(|(index, c)| format.choice(index, c)).collect();
    let meta = &format.meta;
    Ok(with_id(HttpResponse::Ok().json(CompletionOut {
        id: meta.id.clone(),
        object: "text_completion",
        created: meta.created,
        model: meta.model.clone(),
        system_fingerprint: meta.fingerprint.to_string(),
        choices,
        usage: Some(usage),
    })))
}

/// The log record as known before generation: the first prompt as the user turn.
fn log_draft(
    meta: &Meta,
    req: &CompletionRequest,
    texts: &[String],
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
    put("logprobs", req.logprobs.map(Value::from));
    put("echo", req.echo.map(Value::from));
    put("prompt_count", (texts.len() > 1).then(|| Value::from(texts.len())));
    let draft = LogDraft {
        messages: serde_json::json!([{"role": "user", "content": texts.first().cloned().unwrap_or_default()}]),
        params,
        metadata: req.metadata.clone(),
        store: false,
    };
    generation::log_draft(meta, routed, base, caller, request_id, draft)
}

/// The prompts as text (the log's user turn, and `echo`).
fn prompt_texts(info: &ModelInfo, prompts: &[Prompt]) -> ApiResult<Vec<String>> {
    prompts
        .iter()
        .map(|p| match p {
            Prompt::Text(t) => Ok(t.clone()),
            Prompt::Tokens(ids) => Ok(info.tokenizer.decode(ids, false)?),
        })
        .collect()
}

/// `max_tokens: 0`: empty completions whose usage counts the prompt as the engine would.
fn without_generation(info: &ModelInfo, plan: &CompletionPlan) -> ApiResult<Vec<Completion>> {
    let mut out = Vec::with_capacity(plan.prompts.len() * plan.common.n);
    for p in &plan.prompts {
        let prompt_tokens = match p {
            Prompt::Text(t) => info.tokenizer.encode(t, true)?.len(),
            Prompt::Tokens(ids) => ids.len(),
        };
        for _ in 0..plan.common.n {
            out.push(Completion {
                text: String::new(),
                tokens: Vec::new(),
                logprobs: Vec::new(),
                top_logprobs: Vec::new(),
                finish_reason: FinishReason::Length,
                usage: Usage { prompt_tokens, ..Usage::default() },
                timings: Timings::default(),
            });
        }
    }
    Ok(out)
}

struct CompletionChunks {
    meta: Meta,
    info: Arc<ModelInfo>,
    n: usize,
    /// Per prompt: the text `echo` puts before the completion (empty without echo).
    echoes: Vec<String>,
    logprobs: bool,
    /// Per choice, streaming: characters sent so far, for `text_offset`.
    offsets: Vec<usize>,
}

impl CompletionChunks {
    fn echo(&self, choice: usize) -> &str {
        self.echoes.get(choice / self.n.max(1)).map(String::as_str).unwrap_or("")
    }

    fn chunk(&self, choices: Vec<CompletionChoice>, usage: Option<UsageOut>) -> sse::Data {
        data(&CompletionOut {
            id: self.meta.id.clone(),
            object: "text_completion",
            created: self.meta.created,
            model: self.meta.model.clone(),
            system_fingerprint: self.meta.fingerprint.to_string(),
            choices,
            usage,
        })
    }

    fn choice(&self, index: usize, c: Completion) -> CompletionChoice {
        let echo = self.echo(index);
        let logprobs = self.logprobs.then(|| {
            let mut lp = CompletionLogprobs::default();
            let mut offset = echo.chars().count();
            for ((&t, &p), top) in c.tokens.iter().zip(&c.logprobs).zip(&c.top_logprobs) {
                let token = self.info.tokenizer.decode(&[t], false).unwrap_or_default();
                lp.text_offset.push(offset);
                offset += token.chars().count();
                lp.tokens.push(token);
                lp.token_logprobs.push(p);
                lp.top_logprobs.push(top_logprob_map(&self.info, top));
            }
            lp
        });
        CompletionChoice {
            text: format!("{echo}{}", c.text),
            index,
            logprobs,
            finish_reason: Some(finish_reason(c.finish_reason)),
        }
    }
}

impl ChunkFormat for CompletionChunks {
    fn opening(&mut self) -> Vec<sse::Data> {
        let total = self.echoes.len() * self.n;
        (0..total)
            .filter(|&i| !self.echo(i).is_empty())
            .map(|index| {
                let text = self.echo(index).to_string();
                self.chunk(vec![CompletionChoice { text, index, logprobs: None, finish_reason: None }], None)
            })
            .collect()
    }

    fn token(&mut self, index: usize, text: String, token_id: u32, logprob: f32, top: &[(u32, f32)]) -> Option<sse::Data> {
        if text.is_empty() && !self.logprobs {
            return None;
        }
        let logprobs = self.logprobs.then(|| {
            let token = self.info.tokenizer.decode(&[token_id], false).unwrap_or_default();
            let offset = self.offsets.get(index).copied().unwrap_or(0);
            if let Some(o) = self.offsets.get_mut(index) {
                *o += token.chars().count();
            }
            CompletionLogprobs {
                tokens: vec![token],
                token_logprobs: vec![logprob],
                top_logprobs: vec![top_logprob_map(&self.info, top)],
                text_offset: vec![offset],
            }
        });
        Some(self.chunk(vec![CompletionChoice { text, index, logprobs, finish_reason: None }], None))
    }

    fn finished(&mut self, index: usize, reason: FinishReason) -> Vec<sse::Data> {
        let choice =
            CompletionChoice { text: String::new(), index, logprobs: None, finish_reason: Some(finish_reason(reason)) };
        vec![self.chunk(vec![choice], None)]
    }

    fn usage(&mut self, usage: UsageOut) -> Option<sse::Data> {
        Some(self.chunk(Vec::new(), Some(usage)))
    }
}
