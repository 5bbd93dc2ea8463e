//! Requests whose model is an upstream engine's (`<upstream>/<model>` or a `[routes]` name):
//! forwarded as the client wrote them (only `model` renamed, and a stream asked for its usage
//! so its tokens are counted), answered as the upstream answers, with the gateway's `id` and
//! the client's `model` (so `/v1/feedback` and the review finds the log record). Tenancy,
//! concurrency limits, logging and metrics apply as to local requests; the log record's
//! `base_model` says which upstream served it.
//!
//! Streams are relayed event by event. A stream the upstream breaks off (connection lost,
//! timeout, no `[DONE]`) ends with an OpenAI-shaped error event, never silently; the record
//! keeps what arrived and the error.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde_json::{json, Value};

use super::generation::{failed, Meta, RequestRecord};
use super::types::UsageOut;
use crate::api::auth::Caller;
use crate::api::error::{ApiError, ApiResult, ErrorKind};
use crate::api::limits::Permit;
use crate::api::AppState;
use crate::logs::LogRecord;
use crate::metrics::{Metrics, UpstreamObservation};
use crate::router::{RouteError, Routed};
use crate::upstream::{Target, UpstreamError};

/// The OpenAI endpoints forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Completions => "/completions",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Endpoint::Chat => "chat.completions",
            Endpoint::Completions => "completions",
        }
    }

    fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completions => "cmpl",
        }
    }

    /// A choice's text: a message's or a chunk's delta content (chat), or `text`.
    fn text(self, choice: &Value) -> Option<&str> {
        match self {
            Endpoint::Chat => choice.pointer("/message/content").or_else(|| choice.pointer("/delta/content")),
            Endpoint::Completions => choice.get("text"),
        }
        .and_then(Value::as_str)
    }
}

/// Forwards one request to `target`. `asked` is the model name the client used, `task` its
/// `metadata.task`, `body` the request as received; `draft` makes its log record.
#[expect(clippy::too_many_arguments, reason = "one argument per part of the request")]
pub async fn forward(
    state: &AppState,
    caller: &Caller,
    http: &HttpRequest,
    endpoint: Endpoint,
    target: Target,
    asked: &str,
    task: Option<&str>,
    body: &[u8],
    draft: impl FnOnce(&Meta, &Routed, String) -> LogRecord,
) -> ApiResult<HttpResponse> {
    if !caller.may_call(asked) {
        return Err(RouteError::ModelNotFound(asked.to_string()).into());
    }
    let mut req: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::new(ErrorKind::InvalidJson, format!("Could not parse the body: {e}")))?;
    let n = req.get("n").and_then(Value::as_u64).unwrap_or(1).max(1) as usize;
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let client_usage = req.pointer("/stream_options/include_usage").and_then(Value::as_bool).unwrap_or(false);
    let task = task.map(str::trim).filter(|t| !t.is_empty()).unwrap_or(asked).to_string();
    let routed = Routed { model: asked.to_string(), adapter: None, task };
    crate::api::metrics::served(http, &routed);
    let permit = state.limiter.acquire_n(&caller.limit_key, n)?;
    let meta = Meta::new(endpoint.id_prefix(), asked, state.fingerprint.clone());
    let mut record = RequestRecord::new(endpoint.name(), &routed, &caller.key_id);
    record.measure(&state.metrics);
    let request_id = crate::api::request_id::client_id(http).unwrap_or_else(|| meta.id.clone());
    record.log_to(state.logs.as_ref(), || draft(&meta, &routed, request_id.clone()));

    req["model"] = Value::String(target.model.clone());
    if stream {
        match req.get_mut("stream_options").and_then(Value::as_object_mut) {
            Some(o) => {
                o.insert("include_usage".into(), Value::Bool(true));
            }
            None => req["stream_options"] = json!({ "include_usage": true }),
        }
    }
    let mut exchange = Exchange::new(state.metrics.clone(), &target.upstream.name);
    let sent = target.upstream.send(endpoint.path(), &req).await;
    state.metrics.set_upstream_breaker(&target.upstream.name, target.upstream.breaker_open());
    let sent = match sent {
        Ok(s) => s,
        Err((e, retries)) => {
            exchange.retries = retries;
            exchange.outcome = e.outcome();
            return rejected(record, e, &request_id).await;
        }
    };
    exchange.retries = sent.retries;
    let with_id = |mut r: HttpResponse| {
        if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&request_id) {
            r.headers_mut().insert(crate::api::request_id::HEADER, v);
        }
        r
    };

    if !stream {
        let mut answer: Value = match sent.response.json().await {
            Ok(v) => v,
            Err(e) => {
                exchange.outcome = if e.is_timeout() { "timeout" } else { "stream_error" };
                let kind = if e.is_timeout() { ErrorKind::UpstreamTimeout } else { ErrorKind::UpstreamError };
                let message = format!("upstream '{}' sent no complete answer: {e}", target.upstream.name);
                return Err(failed(record, ApiError::new(kind, message)).await);
            }
        };
        drop(sent.slot);
        drop(permit);
        let first = answer.pointer("/choices/0").cloned().unwrap_or(Value::Null);
        let text = endpoint.text(&first).unwrap_or_default();
        let reason = first.get("finish_reason").and_then(Value::as_str).unwrap_or("stop");
        record.set_result(text, reason, exchange.started.elapsed());
        exchange.first_token = Some(exchange.started.elapsed());
        let usage = usage_of(&answer);
        exchange.count(usage);
        record.complete(usage);
        answer["id"] = Value::String(meta.id.clone());
        answer["model"] = Value::String(asked.to_string());
        exchange.outcome = "ok";
        record.commit().await;
        record.finish();
        return Ok(with_id(HttpResponse::Ok().json(answer)));
    }

    let relay = Relay {
        upstream: Box::pin(sent.response.bytes_stream()),
        buf: Vec::new(),
        pending: VecDeque::new(),
        record,
        exchange,
        endpoint,
        id: meta.id,
        model: asked.to_string(),
        client_usage,
        saw_done: false,
        ended: false,
        held: (permit, sent.slot),
    };
    let events = futures_util::stream::unfold(relay, |mut r| async move {
        loop {
            if let Some(b) = r.pending.pop_front() {
                return Some((Ok::<_, actix_web::Error>(b), r));
            }
            if r.ended {
                r.close().await;
                return None;
            }
            match r.upstream.next().await {
                Some(Ok(bytes)) => r.feed(&bytes),
                Some(Err(e)) => {
                    let timeout = e.is_timeout();
                    r.break_off(&format!("the upstream's stream broke off: {e}"), timeout);
                }
                None if !r.saw_done => r.break_off("the upstream ended its stream without [DONE]", false),
                None => r.ended = true,
            }
        }
    });
    let resp = HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((actix_web::http::header::CACHE_CONTROL, "no-cache"))
        .streaming(events);
    Ok(with_id(resp))
}

/// Whether a route's next hop should be tried after this error: the hop failed before
/// answering (an upstream unreachable, timed out, failing, busy or behind an open breaker;
/// the local engine overloaded or not loaded). A client's own mistakes and limits do not.
pub fn falls_back(e: &ApiError) -> bool {
    matches!(
        e.kind,
        ErrorKind::UpstreamError
            | ErrorKind::UpstreamTimeout
            | ErrorKind::UpstreamBusy
            | ErrorKind::UpstreamUnavailable
            | ErrorKind::EngineOverloaded
            | ErrorKind::ModelNotReady
    )
}

/// Forwards `/v1/embeddings` to `target`: not logged (as local embeddings), limited and
/// counted; the answer with the client's model name.
pub async fn embeddings(
    state: &AppState,
    caller: &Caller,
    http: &HttpRequest,
    target: Target,
    asked: &str,
    body: &[u8],
) -> ApiResult<HttpResponse> {
    if !caller.may_call(asked) {
        return Err(RouteError::ModelNotFound(asked.to_string()).into());
    }
    let mut req: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::new(ErrorKind::InvalidJson, format!("Could not parse the body: {e}")))?;
    crate::api::metrics::served(http, &Routed { model: asked.to_string(), adapter: None, task: asked.to_string() });
    let _permit = state.limiter.acquire_n(&caller.limit_key, 1)?;
    req["model"] = Value::String(target.model.clone());
    let mut exchange = Exchange::new(state.metrics.clone(), &target.upstream.name);
    let sent = target.upstream.send("/embeddings", &req).await;
    state.metrics.set_upstream_breaker(&target.upstream.name, target.upstream.breaker_open());
    let sent = sent.map_err(|(e, retries)| {
        exchange.retries = retries;
        exchange.outcome = e.outcome();
        e
    });
    let sent = match sent {
        Ok(s) => s,
        Err(UpstreamError::Status { status, body: Some(body), .. }) if (400..500).contains(&status) && status != 429 => {
            return Ok(HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST)).json(body));
        }
        Err(e) => return Err(ApiError::new(error_kind(&e), e.to_string())),
    };
    exchange.retries = sent.retries;
    let mut answer: Value = sent.response.json().await.map_err(|e| {
        exchange.outcome = if e.is_timeout() { "timeout" } else { "stream_error" };
        ApiError::new(ErrorKind::UpstreamError, format!("upstream '{}' sent no complete answer: {e}", target.upstream.name))
    })?;
    answer["model"] = Value::String(asked.to_string());
    exchange.count(UsageOut::new(usage_of(&answer).prompt_tokens, 0));
    exchange.outcome = "ok";
    Ok(HttpResponse::Ok().json(answer))
}

/// The gateway's error for an upstream failure before its first byte.
fn error_kind(e: &UpstreamError) -> ErrorKind {
    match e {
        UpstreamError::Busy { .. } | UpstreamError::Status { status: 429, .. } => ErrorKind::UpstreamBusy,
        UpstreamError::Timeout { .. } => ErrorKind::UpstreamTimeout,
        UpstreamError::Open { .. } => ErrorKind::UpstreamUnavailable,
        UpstreamError::Status { status, .. } if (400..500).contains(status) => ErrorKind::InvalidValue,
        UpstreamError::Connect { .. } | UpstreamError::Status { .. } => ErrorKind::UpstreamError,
    }
}

/// The client's answer when the upstream refused or failed before its first byte: its own
/// 4xx error passed through (429 aside), else 429 / 502 / 504 from the gateway.
async fn rejected(mut record: RequestRecord, e: UpstreamError, request_id: &str) -> ApiResult<HttpResponse> {
    let kind = match &e {
        UpstreamError::Status { status, body: Some(body), .. }
            if (400..500).contains(status) && *status != 429 && body.get("error").is_some() =>
        {
            let code = body.pointer("/error/code").and_then(Value::as_str).unwrap_or("upstream_rejected").to_string();
            record.fail(&code);
            record.commit().await;
            record.finish();
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST);
            let mut r = HttpResponse::build(status).json(body);
            if let Ok(v) = actix_web::http::header::HeaderValue::from_str(request_id) {
                r.headers_mut().insert(crate::api::request_id::HEADER, v);
            }
            return Ok(r);
        }
        other => error_kind(other),
    };
    Err(failed(record, ApiError::new(kind, e.to_string())).await)
}

/// `usage` of an answer or chunk (zeros when absent).
fn usage_of(v: &Value) -> UsageOut {
    let n = |k: &str| v.pointer(&format!("/usage/{k}")).and_then(Value::as_u64).unwrap_or(0) as usize;
    UsageOut::new(n("prompt_tokens"), n("completion_tokens"))
}

/// One exchange with an upstream, counted in the metrics when dropped (`cancelled` unless an
/// outcome was set).
struct Exchange {
    metrics: std::sync::Arc<Metrics>,
    upstream: String,
    started: Instant,
    retries: u32,
    outcome: &'static str,
    first_token: Option<Duration>,
    usage: UsageOut,
}

impl Exchange {
    fn new(metrics: std::sync::Arc<Metrics>, upstream: &str) -> Self {
        Self {
            metrics,
            upstream: upstream.to_string(),
            started: Instant::now(),
            retries: 0,
            outcome: "cancelled",
            first_token: None,
            usage: UsageOut::new(0, 0),
        }
    }

    fn count(&mut self, usage: UsageOut) {
        self.usage = usage;
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.metrics.observe_upstream(&UpstreamObservation {
            upstream: &self.upstream,
            outcome: self.outcome,
            retries: self.retries,
            time_to_first_token: self.first_token,
            duration: self.started.elapsed(),
            prompt_tokens: self.usage.prompt_tokens,
            completion_tokens: self.usage.completion_tokens,
        });
    }
}

/// A streamed answer on its way from the upstream to the client.
struct Relay {
    upstream: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>>>>,
    /// Bytes of an event not yet complete.
    buf: Vec<u8>,
    /// Events ready for the client.
    pending: VecDeque<Bytes>,
    record: RequestRecord,
    exchange: Exchange,
    endpoint: Endpoint,
    id: String,
    model: String,
    /// The client asked for the usage chunk itself.
    client_usage: bool,
    saw_done: bool,
    /// No more events will come (after `[DONE]` or an error event).
    ended: bool,
    /// The client's concurrency slot and the upstream's, until the stream ends.
    #[expect(dead_code, reason = "held for its drop")]
    held: (Permit, tokio::sync::OwnedSemaphorePermit),
}

impl Relay {
    /// Takes the upstream's bytes; complete events are relayed.
    fn feed(&mut self, bytes: &[u8]) {
        // SSE lines may end in CR LF; JSON strings never hold a raw CR.
        self.buf.extend(bytes.iter().filter(|&&b| b != b'\r'));
        while let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.buf.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            let data: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() && !self.ended {
                self.event(&data.join("\n"));
            }
        }
    }

    fn event(&mut self, data: &str) {
        if data.trim() == "[DONE]" {
            self.saw_done = true;
            self.ended = true;
            self.pending.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
            return;
        }
        let mut v: Value = match serde_json::from_str(data) {
            Ok(v) => v,
            Err(e) => return self.break_off(&format!("the upstream sent an event that is not JSON: {e}"), false),
        };
        if v.get("error").is_some() {
            // The upstream's own error event: relayed, and the end of the stream.
            self.record.fail("upstream_error");
            self.exchange.outcome = "stream_error";
            self.pending.push_back(sse(&v));
            self.ended = true;
            return;
        }
        v["id"] = Value::String(self.id.clone());
        v["model"] = Value::String(self.model.clone());
        let choices = v.get("choices").and_then(Value::as_array).cloned().unwrap_or_default();
        for c in &choices {
            let index = c.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
            if let Some(text) = self.endpoint.text(c).filter(|t| !t.is_empty()) {
                self.exchange.first_token.get_or_insert_with(|| self.exchange.started.elapsed());
                self.record.on_token(index, text);
            }
            if let Some(reason) = c.get("finish_reason").and_then(Value::as_str) {
                self.record.on_finish(index, reason);
            }
        }
        if v.get("usage").is_some_and(|u| !u.is_null()) {
            let usage = usage_of(&v);
            self.exchange.count(usage);
            self.record.complete(usage);
            if !self.client_usage {
                if choices.is_empty() {
                    return;
                }
                if let Some(o) = v.as_object_mut() {
                    o.remove("usage");
                }
            }
        }
        self.pending.push_back(sse(&v));
    }

    /// Ends the stream with an error event: what arrived stays logged, with the error.
    fn break_off(&mut self, why: &str, timeout: bool) {
        let kind = if timeout { ErrorKind::UpstreamTimeout } else { ErrorKind::UpstreamError };
        let e = ApiError::new(kind, why.to_string());
        self.record.fail(kind.code());
        self.exchange.outcome = if timeout { "timeout" } else { "stream_error" };
        self.pending.push_back(sse(&e.body()));
        self.ended = true;
    }

    /// After the last event: the record committed (an answer that ended with `[DONE]` is
    /// complete, with the upstream's usage or none) and the exchange counted.
    async fn close(&mut self) {
        if self.saw_done {
            if !self.record.completed {
                self.record.complete(UsageOut::new(0, 0));
            }
            self.exchange.outcome = "ok";
        }
        self.record.commit().await;
        self.record.finish();
    }
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}
