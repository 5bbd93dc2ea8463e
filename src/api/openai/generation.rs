//! What the chat and completions handlers share: submitting one engine request per choice,
//! collecting them, adding up usage as OpenAI counts it, per-token logprobs, and the
//! per-request record (task, key, tokens, outcome) written when the request ends.

use std::sync::Arc;
use std::time::Instant;

use futures_util::future::try_join_all;

use super::convert::Common;
use super::types::{TokenLogprob, TopLogprob, UsageOut};
use crate::adapters::{lora_handle, AdapterLease};
use crate::api::error::{ApiError, ApiResult};
use crate::engine::grammar::{Constraint, GrammarSpec};
use crate::engine::{
    ChatMessage, Completion, Engine, EngineError, GenerateRequest, GenerationStream, ModelInfo, Prompt, Timings, Usage,
};
use crate::logs::{LogRecord, Logs, STATUS_OK};
use crate::metrics::{ChoiceTiming, Metrics, RequestObservation};

/// The prefix-cache scope of a caller's requests: one per API key, so cached prompt
/// positions (and what `cached_tokens` or timing would reveal of them) never cross keys.
pub fn cache_scope(key_id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    key_id.hash(&mut h);
    h.finish()
}

/// Tokenizes text prompts on a blocking thread (a multi-megabyte prompt takes seconds, which
/// must not stall an HTTP worker), each prompt once whatever `n` is. Text keeps its special
/// tokens: a legacy completion prompt is raw model input.
pub async fn tokenize(info: &Arc<ModelInfo>, prompts: Vec<Prompt>) -> ApiResult<Vec<Prompt>> {
    if prompts.iter().all(|p| matches!(p, Prompt::Tokens(_))) {
        return Ok(prompts);
    }
    let info = info.clone();
    let encoded = actix_web::web::block(move || {
        prompts
            .into_iter()
            .map(|p| match p {
                Prompt::Text(t) => info.tokenizer.encode(&t, true).map(Prompt::Tokens),
                p => Ok(p),
            })
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(encoded?)
}

/// A chat's prompt as token ids, rendered and tokenized on a blocking thread; message
/// contents are tokenized as text ([`ModelInfo::chat_tokens`]).
pub async fn chat_prompt(info: &Arc<ModelInfo>, messages: Vec<ChatMessage>) -> ApiResult<Prompt> {
    let info = info.clone();
    let ids = actix_web::web::block(move || info.chat_tokens(&messages))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Prompt::Tokens(ids?))
}

/// Compiles a `response_format` grammar on a blocking thread (the first one per model also
/// builds the vocabulary's token trie; a large schema takes milliseconds). A schema the
/// grammar engine refuses is a 400 on `response_format`.
pub async fn compile_grammar(info: &Arc<ModelInfo>, spec: GrammarSpec) -> ApiResult<Constraint> {
    let info = info.clone();
    let compiled = actix_web::web::block(move || info.grammars().and_then(|g| g.compile(&spec)))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    compiled.map_err(|e| match e {
        EngineError::InvalidRequest(m) => ApiError::invalid_value("response_format", m),
        e => ApiError::from(e),
    })
}

/// Submits `n` requests per prompt. Choice `p * n + i` is prompt `p`'s `i`-th sample. If one
/// submission fails, the ones already queued are dropped, which cancels them.
pub fn submit_all(
    engine: &Engine,
    prompts: &[Prompt],
    common: &Common,
    adapter: Option<&AdapterLease>,
) -> ApiResult<Vec<GenerationStream>> {
    let mut streams = Vec::with_capacity(prompts.len() * common.n);
    for prompt in prompts {
        for i in 0..common.n {
            streams.push(engine.submit(GenerateRequest {
                prompt: prompt.clone(),
                params: common.params_for(i),
                adapter: adapter.map(lora_handle),
                cache_scope: common.cache_scope,
                constraint: common.constraint.clone(),
            })?);
        }
    }
    Ok(streams)
}

/// Waits for every choice. Dropping the future (client gone) drops the streams, which
/// cancels the generations.
pub async fn collect_all(streams: Vec<GenerationStream>) -> ApiResult<Vec<Completion>> {
    Ok(try_join_all(streams.into_iter().map(GenerationStream::collect)).await?)
}

/// Usage for the whole request: each distinct prompt counted once (the `n` samples of one
/// prompt share it), completion tokens summed over choices.
pub fn total_usage<'a>(n: usize, per_choice: impl IntoIterator<Item = (usize, &'a Usage)>) -> UsageOut {
    let (mut prompt, mut completion, mut cached) = (0, 0, 0);
    for (index, u) in per_choice {
        if index % n.max(1) == 0 {
            prompt += u.prompt_tokens;
            cached += u.cached_tokens;
        }
        completion += u.completion_tokens;
    }
    UsageOut::new(prompt, completion).with_cached(cached)
}

/// One token's logprob entry as chat completions report it, with its alternatives.
pub fn token_logprob(info: &ModelInfo, token_id: u32, logprob: f32, top: &[(u32, f32)]) -> TokenLogprob {
    let token = info.tokenizer.decode(&[token_id], false).unwrap_or_default();
    let top_logprobs = top
        .iter()
        .map(|&(id, logprob)| {
            let token = info.tokenizer.decode(&[id], false).unwrap_or_default();
            TopLogprob { bytes: Some(token.as_bytes().to_vec()), token, logprob }
        })
        .collect();
    TokenLogprob { bytes: Some(token.as_bytes().to_vec()), token, logprob, top_logprobs }
}

/// A legacy completion's alternatives for one token: `{token: logprob}`, most likely first.
/// Distinct ids that decode to the same text keep the likelier one.
pub fn top_logprob_map(info: &ModelInfo, top: &[(u32, f32)]) -> serde_json::Map<String, serde_json::Value> {
    let mut map = serde_json::Map::new();
    for &(id, logprob) in top {
        let token = info.tokenizer.decode(&[id], false).unwrap_or_default();
        map.entry(token).or_insert_with(|| serde_json::Value::from(logprob));
    }
    map
}

/// What a log record holds before generation, besides who asked and where it was routed.
pub struct LogDraft {
    /// The conversation as the client sent it (chat messages; a legacy prompt as one user turn).
    pub messages: serde_json::Value,
    pub params: serde_json::Map<String, serde_json::Value>,
    pub metadata: Option<std::collections::HashMap<String, String>>,
    pub store: bool,
}

/// The log record as known before generation: who asked what, routed where.
pub fn log_draft(
    meta: &Meta,
    routed: &crate::router::Routed,
    base: &str,
    caller: &crate::api::auth::Caller,
    request_id: String,
    draft: LogDraft,
) -> LogRecord {
    use crate::logs::{now_ms, AdapterRef, RequestLog, Review};
    LogRecord {
        id: meta.id.clone(),
        created_ms: now_ms(),
        task: routed.task.clone(),
        model: routed.model.clone(),
        base_model: base.to_string(),
        adapter: routed.adapter.as_ref().map(|a| AdapterRef { alias: a.alias.clone(), generation: a.generation }),
        request: RequestLog { messages: draft.messages, params: serde_json::Value::Object(draft.params) },
        response: String::new(),
        finish_reason: None,
        prompt_tokens: 0,
        completion_tokens: 0,
        prompt_tokens_saved: 0,
        ttft_ms: None,
        latency_ms: 0,
        status: STATUS_OK.to_string(),
        api_key_id: Some(caller.key_id.clone()),
        tenant: Some(caller.tenant.clone()),
        request_id: Some(request_id),
        client_disconnected: false,
        metadata: draft.metadata.unwrap_or_default().into_iter().collect(),
        store: draft.store,
        review: Review::default(),
        feedback: None,
    }
}

/// Sampling parameters both endpoints log, non-null ones only.
pub fn logged_params(p: SharedParams<'_>) -> serde_json::Map<String, serde_json::Value> {
    use serde_json::Value;
    let mut params = serde_json::Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v.filter(|v| !v.is_null()) {
            params.insert(k.to_string(), v);
        }
    };
    put("temperature", p.temperature.map(Value::from));
    put("top_p", p.top_p.map(Value::from));
    put("top_k", p.top_k.map(Value::from));
    put("max_tokens", p.max_tokens.map(Value::from));
    put("n", p.n.map(Value::from));
    put("stop", p.stop.and_then(|s| serde_json::to_value(s).ok()));
    put("seed", p.seed.cloned().map(Value::Number));
    put("stream", p.stream.map(Value::from));
    put("frequency_penalty", p.frequency_penalty.map(Value::from));
    put("presence_penalty", p.presence_penalty.map(Value::from));
    put("ignore_eos", p.ignore_eos.map(Value::from));
    put("user", p.user.map(Value::from));
    params
}

/// The request fields chat and legacy completions share, as [`logged_params`] reads them.
pub struct SharedParams<'a> {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub max_tokens: Option<i64>,
    pub n: Option<i64>,
    pub stop: Option<&'a super::types::StopSpec>,
    pub seed: Option<&'a serde_json::Number>,
    pub stream: Option<bool>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub ignore_eos: Option<bool>,
    pub user: Option<&'a str>,
}

/// The response metadata every object and chunk of one request repeats.
#[derive(Debug, Clone)]
pub struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub fingerprint: Arc<str>,
}

impl Meta {
    pub fn new(prefix: &str, model: &str, fingerprint: Arc<str>) -> Self {
        Self {
            id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            created: unix_now(),
            model: model.to_string(),
            fingerprint,
        }
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// One request's account: the tracing line when it is dropped and, when the request is
/// logged, the [`LogRecord`] filled as the response is produced and committed by
/// [`RequestRecord::commit`] before the response's last bytes go out (see `[logs] durable`).
/// A record still uncommitted when this is dropped (the client went away mid-stream) is
/// logged marked `client_disconnected`, with what had been generated. When dropped it is also
/// counted in the metrics given to [`RequestRecord::measure`].
pub struct RequestRecord {
    pub endpoint: &'static str,
    pub task: String,
    pub model: String,
    pub key_id: String,
    pub adapter_generation: Option<u64>,
    pub started: Instant,
    pub usage: Option<UsageOut>,
    pub completed: bool,
    log: Option<(Arc<Logs>, Box<LogRecord>)>,
    first_token: Option<Instant>,
    saved: usize,
    /// The alias that served it (`None`: the base model).
    adapter: Option<String>,
    /// The longest engine time of the finished choices.
    engine_time: Option<std::time::Duration>,
    choices: Vec<ChoiceTiming>,
    metrics: Option<Arc<Metrics>>,
    /// The error code the client got, when the request failed.
    failed: Option<String>,
    /// `finish` has run.
    finished: bool,
}

impl RequestRecord {
    pub fn new(endpoint: &'static str, routed: &crate::router::Routed, key_id: &str) -> Self {
        Self {
            endpoint,
            task: routed.task.clone(),
            model: routed.model.clone(),
            key_id: key_id.to_string(),
            adapter_generation: routed.adapter.as_ref().map(|a| a.generation),
            started: Instant::now(),
            usage: None,
            completed: false,
            log: None,
            first_token: None,
            saved: 0,
            adapter: routed.adapter.as_ref().map(|a| a.alias.clone()),
            engine_time: None,
            choices: Vec::new(),
            metrics: None,
            failed: None,
            finished: false,
        }
    }

    /// Counts this request in `metrics` when it ends.
    pub fn measure(&mut self, metrics: &Arc<Metrics>) {
        self.metrics = Some(metrics.clone());
    }

    /// One choice finished on the engine: its timings, relative to now.
    pub fn choice_done(&mut self, t: &Timings, completion_tokens: usize) {
        let elapsed = self.started.elapsed();
        let decode = t.total.saturating_sub(t.time_to_first_token);
        self.engine_time = Some(self.engine_time.map_or(t.total, |e| e.max(t.total)));
        self.choices.push(ChoiceTiming {
            time_to_first_token: elapsed.saturating_sub(decode),
            decode,
            completion_tokens,
        });
    }

    /// Logs this request into `logs` (when logging is on for its task and key): `draft` is
    /// the record as known before generation.
    pub fn log_to(&mut self, logs: Option<&Arc<Logs>>, draft: impl FnOnce() -> LogRecord) {
        if let Some(logs) = logs.filter(|l| l.enabled_for(&self.task, &self.key_id)) {
            self.log = Some((logs.clone(), Box::new(draft())));
        }
    }

    /// Prompt tokens the router dropped (distillation), for the log.
    pub fn set_saved(&mut self, saved: usize) {
        self.saved = saved;
    }

    /// A streamed token of choice `index`; the log keeps choice 0's text.
    pub fn on_token(&mut self, index: usize, text: &str) {
        self.first_token.get_or_insert_with(Instant::now);
        if index == 0 {
            if let Some((_, r)) = self.log.as_mut() {
                r.response.push_str(text);
            }
        }
    }

    /// Choice `index` ended.
    pub fn on_finish(&mut self, index: usize, reason: &str) {
        if index == 0 {
            if let Some((_, r)) = self.log.as_mut() {
                r.finish_reason = Some(reason.to_string());
            }
        }
    }

    /// A non-streamed result: choice 0's text and finish reason, and when its first token came.
    pub fn set_result(&mut self, text: &str, reason: &str, ttft: std::time::Duration) {
        self.first_token = Some(self.started + ttft);
        self.on_finish(0, reason);
        if let Some((_, r)) = self.log.as_mut() {
            r.response = text.to_string();
        }
    }

    pub fn complete(&mut self, usage: UsageOut) {
        self.usage = Some(usage);
        self.completed = true;
    }

    /// Marks the request failed with the error `code` the client got.
    pub fn fail(&mut self, code: &str) {
        self.failed = Some(code.to_string());
        if let Some((_, r)) = self.log.as_mut() {
            r.status = code.to_string();
        }
    }

    /// Fills in the outcome and commits the log record (once; later calls do nothing).
    pub async fn commit(&mut self) {
        if let Some((logs, record)) = self.take_log() {
            logs.record(record).await;
        }
    }

    fn take_log(&mut self) -> Option<(Arc<Logs>, LogRecord)> {
        let (logs, mut r) = self.log.take()?;
        let usage = self.usage.unwrap_or(UsageOut::new(0, 0));
        r.prompt_tokens = u32::try_from(usage.prompt_tokens).unwrap_or(u32::MAX);
        r.completion_tokens = u32::try_from(usage.completion_tokens).unwrap_or(u32::MAX);
        r.prompt_tokens_saved = u32::try_from(self.saved).unwrap_or(u32::MAX);
        r.ttft_ms = self.first_token.map(|t| millis(t.saturating_duration_since(self.started)));
        r.latency_ms = millis(self.started.elapsed());
        if !self.completed && r.status == STATUS_OK {
            r.client_disconnected = true;
            r.finish_reason.get_or_insert_with(|| "cancelled".to_string());
        }
        Some((logs, *r))
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl RequestRecord {
    /// Ends the request's accounting, once: the log record (if `commit` has not written it
    /// already), the "request finished" trace line and the metrics. Handlers call it when the
    /// response is decided (after `commit`, so the record is durable first).
    pub fn finish(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        if let Some((logs, record)) = self.take_log() {
            logs.record_detached(record);
        }
        let usage = self.usage.unwrap_or(UsageOut::new(0, 0));
        tracing::info!(
            endpoint = self.endpoint,
            task = %self.task,
            model = %self.model,
            key = %self.key_id,
            adapter_generation = ?self.adapter_generation,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            seconds = self.started.elapsed().as_secs_f64(),
            outcome = match (&self.failed, self.completed) {
                (Some(code), _) => code.as_str(),
                (None, true) => "ok",
                (None, false) => "cancelled",
            },
            "request finished"
        );
        if let Some(m) = &self.metrics {
            m.observe_request(&RequestObservation {
                task: &self.task,
                adapter: self.adapter.as_deref(),
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                prompt_tokens_saved: if self.completed { self.saved } else { 0 },
                prompt_tokens_cached: usage.prompt_tokens_details.map_or(0, |d| d.cached_tokens),
                duration: self.started.elapsed(),
                engine_time: self.engine_time,
                choices: &self.choices,
            });
        }
    }
}

/// Finishes a request that failed after routing, with the error the client gets: its log
/// record is committed with that error's code first.
pub async fn failed(mut record: RequestRecord, e: impl Into<ApiError>) -> ApiError {
    let e = e.into();
    record.fail(e.kind.code());
    record.commit().await;
    record.finish();
    e
}

/// The one path no handler code runs to its end: the client went away, so actix dropped the
/// handler's future or the response stream mid-way. The request is finished here, as
/// cancelled; every other path has called `finish` already and this does nothing.
impl Drop for RequestRecord {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_counted_once_per_prompt() {
        let u = |p, c| Usage { prompt_tokens: p, completion_tokens: c, cached_tokens: 0 };
        let choices = [u(10, 3), u(10, 4), u(7, 1), u(7, 2)];
        let total = total_usage(2, choices.iter().enumerate());
        assert_eq!(total, UsageOut::new(17, 10));
    }
}
