//! `POST /v1/chat/completions`: validate → route → render the chat template → submit one
//! engine request per choice → answer as one JSON object or as SSE chunks.

use std::sync::Arc;

use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_lab::sse;

use super::convert;
use super::generation::{collect_all, submit_all, token_logprob, total_usage, Meta, RequestRecord};
use super::stream::{self, data, finish_reason, ChunkFormat, Held};
use super::types::{
    ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChoiceLogprobs, ChunkChoice, Delta,
    ResponseMessage, UsageOut,
};
use crate::api::auth::Caller;
use crate::api::error::ApiResult;
use crate::api::json::Json;
use crate::api::AppState;
use crate::engine::{FinishReason, ModelInfo, Prompt};

pub async fn create(
    state: web::Data<AppState>,
    caller: Caller,
    http: HttpRequest,
    Json(req): Json<ChatCompletionRequest>,
) -> ApiResult<HttpResponse> {
    let mut plan = convert::chat(&req, &state.config.limits)?;
    let routed = state.router.route(&req.model, plan.common.task.as_deref())?;
    crate::api::metrics::served(&http, &routed);
    let saved = state.router.distill(&routed, &mut plan.messages);
    let permit = state.limiter.acquire(&caller.key_id)?;
    let info = state.engine.info()?;
    let prompt = Prompt::Text(info.render_chat(&plan.messages)?);
    let streams = submit_all(&state.engine, &[prompt], &plan.common, routed.adapter.as_ref())?;
    let mut record = RequestRecord::new("chat.completions", &routed, &caller.key_id).measured(&state.metrics, saved);
    let meta = Meta::new("chatcmpl", &routed.model, state.fingerprint.clone());

    if plan.common.stream {
        let format = ChatChunks {
            meta,
            info,
            n: streams.len(),
            logprobs: plan.logprobs,
            include_usage: plan.common.include_usage,
            saved,
        };
        let held = Held { permit, record };
        let mut resp = stream::respond(streams, plan.common.n, plan.common.include_usage, format, held);
        saved_header(&mut resp, saved);
        return Ok(resp);
    }

    let completions = collect_all(streams).await?;
    drop(permit);
    for c in &completions {
        record.choice_done(&c.timings, c.usage.completion_tokens);
    }
    let usage = total_usage(plan.common.n, completions.iter().map(|c| &c.usage).enumerate()).with_saved(saved);
    record.complete(usage);
    let choices = completions
        .into_iter()
        .enumerate()
        .map(|(index, c)| ChatChoice {
            index,
            logprobs: plan.logprobs.then(|| ChoiceLogprobs {
                content: Some(c.tokens.iter().zip(&c.logprobs).map(|(&t, &lp)| token_logprob(&info, t, lp)).collect()),
                refusal: None,
            }),
            message: ResponseMessage { role: "assistant", content: Some(c.text), refusal: None },
            finish_reason: finish_reason(c.finish_reason),
        })
        .collect();
    let mut resp = HttpResponse::Ok().json(ChatCompletion {
        id: meta.id,
        object: "chat.completion",
        created: meta.created,
        model: meta.model,
        system_fingerprint: meta.fingerprint.to_string(),
        choices,
        usage,
    });
    saved_header(&mut resp, saved);
    Ok(resp)
}

/// `x-tunegate-prompt-tokens-saved`: prompt tokens a distilled adapter made unnecessary.
fn saved_header(resp: &mut HttpResponse, saved: usize) {
    if saved > 0 {
        resp.headers_mut().insert(
            actix_web::http::header::HeaderName::from_static("x-tunegate-prompt-tokens-saved"),
            actix_web::http::header::HeaderValue::from(saved),
        );
    }
}

struct ChatChunks {
    meta: Meta,
    info: Arc<ModelInfo>,
    n: usize,
    logprobs: bool,
    include_usage: bool,
    saved: usize,
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
                let delta = Delta { role: Some("assistant"), content: Some(String::new()) };
                self.chunk(vec![ChunkChoice { index, delta, logprobs: None, finish_reason: None }], None)
            })
            .collect()
    }

    fn token(&mut self, index: usize, text: String, token_id: u32, logprob: f32) -> Option<sse::Data> {
        if text.is_empty() && !self.logprobs {
            return None;
        }
        let logprobs = self.logprobs.then(|| ChoiceLogprobs {
            content: Some(vec![token_logprob(&self.info, token_id, logprob)]),
            refusal: None,
        });
        let delta = Delta { role: None, content: Some(text) };
        Some(self.chunk(vec![ChunkChoice { index, delta, logprobs, finish_reason: None }], None))
    }

    fn finished(&mut self, index: usize, reason: FinishReason) -> sse::Data {
        let choice =
            ChunkChoice { index, delta: Delta::default(), logprobs: None, finish_reason: Some(finish_reason(reason)) };
        self.chunk(vec![choice], None)
    }

    fn usage(&mut self, usage: UsageOut) -> sse::Data {
        self.chunk(Vec::new(), Some(usage.with_saved(self.saved)))
    }
}
