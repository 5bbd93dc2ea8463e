//! Plain data types at the engine's boundary: what a caller submits and what comes back.
//! No HTTP or OpenAI wire types here; the API layer converts to and from these.

use std::time::Duration;

use super::lora::LoraHandle;

/// One chat turn as the chat template sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// How to pick each next token.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub max_tokens: usize,
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables nucleus sampling.
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// Same seed, same prompt, same adapter: same output.
    pub seed: Option<u64>,
    /// Generation stops before any of these strings; they are never part of the text.
    pub stop: Vec<String>,
    /// Stop at the model's end-of-sequence tokens (false only for benchmarks).
    pub stop_at_eos: bool,
    /// With each token, the most likely alternatives at its position (0: none; OpenAI's
    /// `top_logprobs`, at most [`MAX_TOP_LOGPROBS`]).
    pub top_logprobs: usize,
}

/// The most alternatives a token can report ([`SamplingParams::top_logprobs`]).
pub const MAX_TOP_LOGPROBS: usize = 20;

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            stop: Vec::new(),
            stop_at_eos: true,
            top_logprobs: 0,
        }
    }
}

/// The prompt of a request, either text (tokenized by the engine, special tokens parsed)
/// or token ids.
#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// A generation request. `adapter` is held from when the request started: the request runs
/// on those weights to its end, whatever happens to the adapter's name meanwhile.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub params: SamplingParams,
    pub adapter: Option<LoraHandle>,
    /// Prefix-cache partition: a request reuses cached prompt positions only from requests
    /// of the same scope (the gateway gives each API key its own, so one client cannot learn
    /// from `cached_tokens` or timing what another's prompts began with). 0 = shared.
    pub cache_scope: u64,
    /// The grammar the output must follow (structured outputs), compiled beforehand.
    pub constraint: Option<super::grammar::Constraint>,
}

impl GenerateRequest {
    /// A request on the base model in the shared cache scope.
    pub fn new(prompt: Prompt, params: SamplingParams) -> Self {
        Self { prompt, params, adapter: None, cache_scope: 0, constraint: None }
    }

    pub fn with_adapter(mut self, adapter: Option<LoraHandle>) -> Self {
        self.adapter = adapter;
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-sequence token or a stop sequence.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
    /// The caller went away.
    Cancelled,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// Where the time went for one request, measured on the engine thread.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Submission until the request entered the running batch.
    pub queued: Duration,
    /// Submission until the first token was sent.
    pub time_to_first_token: Duration,
    /// Submission until the last event.
    pub total: Duration,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt positions whose keys and values came from the prefix cache (counted in
    /// `prompt_tokens` too, as OpenAI counts `cached_tokens`).
    pub cached_tokens: usize,
}

/// What a generation stream yields, in order: zero or more `Token`, then exactly one
/// `Done` or `Error`.
#[derive(Debug, Clone)]
pub enum StreamEvent {
    Token {
        /// Text newly made final by this token (may be empty while a stop sequence or an
        /// incomplete UTF-8 character is held back).
        text: String,
        token_id: u32,
        /// Natural log of the token's probability under the unmodified distribution.
        logprob: f32,
        /// The `top_logprobs` most likely tokens at this position with their logprobs,
        /// most likely first (empty unless asked for).
        top_logprobs: Vec<(u32, f32)>,
    },
    Done {
        finish_reason: FinishReason,
        usage: Usage,
        timings: Timings,
    },
    Error(super::EngineError),
}

/// Counters the metrics and readiness endpoints read without touching the engine thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct EngineStats {
    pub queued: usize,
    pub running: usize,
    pub kv_cache_bytes: usize,
    pub last_batch_size: usize,
}
