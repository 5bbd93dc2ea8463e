//! Server-sent events for streamed completions. The choices' engine streams are merged;
//! a [`ChunkFormat`] (chat, legacy completions or the Responses API) turns each event into
//! a JSON chunk and says how the response ends (chat: the optional usage chunk and
//! `data: [DONE]`). SSE framing is
//! `actix-web-lab`'s.
//!
//! The body owns the engine streams, the concurrency permit and the request record: when the
//! client disconnects actix drops the body, which cancels every choice on the engine.

use std::collections::VecDeque;
use std::convert::Infallible;

use actix_web::http::header;
use actix_web::HttpResponse;
use actix_web_lab::sse::{self, Sse};
use futures_util::stream::{self, BoxStream, SelectAll, Stream, StreamExt};
use serde::Serialize;

use super::generation::{total_usage, RequestRecord};
use super::types::UsageOut;
use crate::api::error::ApiError;
use crate::api::limits::Permit;
use crate::engine::{FinishReason, GenerationStream, StreamEvent, Usage};

/// How one endpoint spells its chunks.
pub trait ChunkFormat: Send + 'static {
    /// Chunks before any token (chat: one role chunk per choice).
    fn opening(&mut self) -> Vec<sse::Data>;
    /// A token of choice `index`; `None` to send nothing (e.g. an empty delta).
    fn token(&mut self, index: usize, text: String, token_id: u32, logprob: f32, top: &[(u32, f32)]) -> Option<sse::Data>;
    /// The last chunks of choice `index`.
    fn finished(&mut self, index: usize, reason: FinishReason) -> Vec<sse::Data>;
    /// The usage chunk (`stream_options.include_usage`), for formats that have one.
    fn usage(&mut self, _usage: UsageOut) -> Option<sse::Data> {
        None
    }
    /// The events after every choice has finished: chat and legacy completions send the
    /// usage chunk when asked, then `data: [DONE]`.
    fn closing(&mut self, usage: UsageOut, include_usage: bool) -> Vec<sse::Data> {
        let mut out = Vec::new();
        if include_usage {
            out.extend(self.usage(usage));
        }
        out.push(sse::Data::new("[DONE]"));
        out
    }
    /// The event that reports a failure mid-stream (OpenAI's error body; SDKs raise it).
    fn error(&mut self, e: &ApiError) -> sse::Data {
        sse::Data::new(e.body().to_string())
    }
}

/// Serializes a chunk into an SSE data event.
pub fn data(value: &impl Serialize) -> sse::Data {
    match serde_json::to_string(value) {
        Ok(s) => sse::Data::new(s),
        Err(e) => sse::Data::new(ApiError::internal(format!("could not encode a chunk: {e}")).body().to_string()),
    }
}

/// What the body keeps alive until the stream ends.
pub struct StreamResources {
    pub permit: Permit,
    pub record: RequestRecord,
}

struct State<F> {
    merged: Option<SelectAll<BoxStream<'static, (usize, StreamEvent)>>>,
    format: F,
    pending: VecDeque<sse::Data>,
    usages: Vec<(usize, Usage)>,
    n: usize,
    include_usage: bool,
    held: StreamResources,
    ended: bool,
}

/// Builds the `text/event-stream` response for the given choices (`n` per prompt).
pub fn respond<F: ChunkFormat>(
    streams: Vec<GenerationStream>,
    n: usize,
    include_usage: bool,
    mut format: F,
    held: StreamResources,
) -> HttpResponse {
    let merged = stream::select_all(streams.into_iter().enumerate().map(|(i, s)| per_choice(i, s)));
    let pending = format.opening().into();
    let state =
        State { merged: Some(merged), format, pending, usages: Vec::new(), n, include_usage, held, ended: false };
    let events = stream::unfold(state, |mut st| async move {
        loop {
            if let Some(d) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(sse::Event::Data(d)), st));
            }
            if st.ended {
                return None;
            }
            let next = match st.merged.as_mut() {
                Some(m) => m.next().await,
                None => None,
            };
            st.step(next);
            if st.ended {
                // The last chunks wait until the log record is committed.
                st.held.record.commit().await;
                st.held.record.finish();
            }
        }
    });
    sse_response(events)
}

/// A stream whose every event is known up front.
pub fn respond_static(events: Vec<sse::Data>) -> HttpResponse {
    sse_response(stream::iter(events.into_iter().map(|d| Ok::<_, Infallible>(sse::Event::Data(d)))))
}

fn sse_response(events: impl Stream<Item = Result<sse::Event, Infallible>> + 'static) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .content_type("text/event-stream")
        // No keep-alive comments: OpenAI sends none, and some SSE consumers (schemathesis's
        // validator among them) take a comment for an event.
        .body(Sse::from_stream(events))
}

impl<F: ChunkFormat> State<F> {
    fn step(&mut self, next: Option<(usize, StreamEvent)>) {
        match next {
            Some((i, StreamEvent::Token { text, token_id, logprob, top_logprobs })) => {
                self.held.record.on_token(i, &text);
                self.pending.extend(self.format.token(i, text, token_id, logprob, &top_logprobs));
            }
            Some((i, StreamEvent::Done { finish_reason: reason, usage, timings })) => {
                self.held.record.choice_done(&timings, usage.completion_tokens);
                self.usages.push((i, usage));
                self.held.record.on_finish(i, finish_reason(reason));
                let last = self.format.finished(i, reason);
                self.pending.extend(last);
            }
            Some((_, StreamEvent::Error(e))) => {
                // OpenAI reports a failure mid-stream as an `error` event; SDKs raise it.
                // Dropping the other choices cancels them.
                self.merged = None;
                let e = ApiError::from(e);
                self.held.record.fail(e.kind.code());
                let event = self.format.error(&e);
                self.pending.push_back(event);
                self.ended = true;
            }
            None => {
                let usage = total_usage(self.n, self.usages.iter().map(|(i, u)| (*i, u)));
                self.held.record.complete(usage);
                let closing = self.format.closing(usage, self.include_usage);
                self.pending.extend(closing);
                self.ended = true;
            }
        }
    }
}

/// One choice's events, tagged with its index, ending after `Done` or `Error`.
fn per_choice(index: usize, s: GenerationStream) -> BoxStream<'static, (usize, StreamEvent)> {
    stream::unfold(Some(s), move |s| async move {
        let mut s = s?;
        let ev = s.next().await?;
        let last = matches!(ev, StreamEvent::Done { .. } | StreamEvent::Error(_));
        Some(((index, ev), (!last).then_some(s)))
    })
    .boxed()
}

/// Finish reasons as OpenAI spells them. `Cancelled` only reaches a client that is gone.
pub fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
    }
}
