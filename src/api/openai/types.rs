//! OpenAI wire types, field for field, for the endpoints tunegate serves: chat completions,
//! completions, models and fine-tuning jobs. Requests ignore unknown fields, as OpenAI does; every optional
//! request field accepts `null`. Responses keep the fields OpenAI's schema requires even when
//! they are `null` (`message.refusal`, `choices[].logprobs`). Nothing here converts or
//! validates: `convert.rs` turns requests into engine types.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

// ---------------------------------------------------------------------------------------
// Requests

#[derive(Debug, Clone, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessageIn>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Not OpenAI's; vLLM and llama.cpp accept it too.
    pub top_k: Option<i64>,
    /// Not OpenAI's; vLLM's: keep generating past end-of-sequence (benchmarks, tests).
    pub ignore_eos: Option<bool>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<StopSpec>,
    /// Any 64-bit integer, signed or not (OpenAI's schema allows the whole range).
    pub seed: Option<serde_json::Number>,
    pub user: Option<String>,
    pub metadata: Option<HashMap<String, String>>,
    pub store: Option<bool>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub logit_bias: Option<HashMap<String, Value>>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub functions: Option<Vec<Value>>,
    pub function_call: Option<Value>,
    pub response_format: Option<ResponseFormat>,
    pub audio: Option<Value>,
}

/// Serializable too: request logs keep the messages as the client sent them.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: Option<MessageContent>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged, expecting = "a string or an array of content parts")]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
}

/// `{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ResponseFormat {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub json_schema: Option<JsonSchemaFormat>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct JsonSchemaFormat {
    pub name: Option<String>,
    pub description: Option<String>,
    pub schema: Option<Value>,
    pub strict: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged, expecting = "a string or an array of strings")]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    /// Outer `None`: absent (an error); inner `None`: `null`, which OpenAI's schema defines
    /// as the document separator `<|endoftext|>`.
    #[serde(default, deserialize_with = "present")]
    pub prompt: Option<Option<PromptSpec>>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub ignore_eos: Option<bool>,
    pub n: Option<i64>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<StopSpec>,
    /// Any 64-bit integer, signed or not (OpenAI's schema allows the whole range).
    pub seed: Option<serde_json::Number>,
    pub user: Option<String>,
    /// Not in OpenAI's completions schema; accepted for task tagging as on chat.
    pub metadata: Option<HashMap<String, String>>,
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub logit_bias: Option<HashMap<String, Value>>,
}

/// `POST /v1/responses`. Input items stay JSON here: `responses.rs` checks and converts
/// them, naming the item that is wrong.
#[derive(Debug, Clone, Deserialize)]
pub struct CreateResponseRequest {
    pub model: String,
    pub input: Option<ResponseInput>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_logprobs: Option<i64>,
    pub metadata: Option<HashMap<String, String>>,
    /// OpenAI's default is `true`.
    pub store: Option<bool>,
    pub stream: Option<bool>,
    pub previous_response_id: Option<String>,
    pub text: Option<ResponseTextConfig>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    pub user: Option<String>,
    pub include: Option<Vec<String>>,
    pub background: Option<bool>,
    pub conversation: Option<Value>,
    pub prompt: Option<Value>,
    pub reasoning: Option<Value>,
    pub truncation: Option<String>,
    pub max_tool_calls: Option<i64>,
}

/// `POST /v1/embeddings`.
#[derive(Debug, Clone, Deserialize)]
pub struct EmbeddingRequest {
    pub model: String,
    /// Outer `None`: absent (an error).
    #[serde(default, deserialize_with = "present")]
    pub input: Option<Option<PromptSpec>>,
    /// `float` (the default) or `base64` (little-endian f32s, what the SDKs ask for).
    pub encoding_format: Option<String>,
    pub dimensions: Option<i64>,
    pub user: Option<String>,
}

/// `input`: a string (one user message) or a list of items.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a string or an array of input items")]
pub enum ResponseInput {
    Text(String),
    Items(Vec<Value>),
}

/// `text`: the output's format (`{"type": "text" | "json_object" | "json_schema", …}`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ResponseTextConfig {
    pub format: Option<Value>,
}

/// A string, a list of strings, a list of token ids, or a list of token id lists.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "a string, an array of strings, an array of token ids or an array of token id arrays")]
pub enum PromptSpec {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
}

/// Tells a field that is present but `null` from one that is absent.
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

// ---------------------------------------------------------------------------------------
// Responses

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UsageOut {
    /// Tokens the model actually ran (after any distilled system prompt was dropped).
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
}

/// OpenAI's `prompt_tokens_details`: `cached_tokens` (prompt positions taken from the prefix
/// cache), with tunegate's `distilled_tokens`: prompt tokens a distilled adapter made
/// unnecessary (dropped before the model ran).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
    pub distilled_tokens: usize,
}

impl UsageOut {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens, prompt_tokens_details: None }
    }

    /// Records `saved` distilled prompt tokens (per prompt, times `n_prompts`).
    pub fn with_saved(mut self, saved: usize) -> Self {
        if saved > 0 {
            self.details().distilled_tokens = saved;
        }
        self
    }

    /// Records prompt tokens served from the prefix cache.
    pub fn with_cached(mut self, cached: usize) -> Self {
        if cached > 0 {
            self.details().cached_tokens = cached;
        }
        self
    }

    fn details(&mut self) -> &mut PromptTokensDetails {
        self.prompt_tokens_details.get_or_insert(PromptTokensDetails { cached_tokens: 0, distilled_tokens: 0 })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChatChoice>,
    pub usage: UsageOut,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: usize,
    pub message: ResponseMessage,
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct ResponseMessage {
    pub role: &'static str,
    pub content: Option<String>,
    pub refusal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// A call the model made: `arguments` is the arguments object as a JSON string.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// A streamed call, numbered within its choice: its first delta carries `id`, `type` and the
/// function's name; later ones only more of its `arguments` text (as OpenAI streams them).
#[derive(Debug, Clone, Serialize)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

#[derive(Debug, Clone, Serialize)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

impl ToolCallDelta {
    /// A whole call in one delta.
    pub fn whole(index: usize, call: ToolCall) -> Self {
        let function = FunctionDelta { name: Some(call.function.name), arguments: call.function.arguments };
        Self { index, id: Some(call.id), kind: Some(call.kind), function }
    }

    /// More of a call's arguments.
    pub fn arguments(index: usize, arguments: String) -> Self {
        Self { index, id: None, kind: None, function: FunctionDelta { name: None, arguments } }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ChoiceLogprobs {
    pub content: Option<Vec<TokenLogprob>>,
    pub refusal: Option<Vec<TokenLogprob>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
    /// The request's `top_logprobs` most likely tokens at this position, most likely
    /// first (empty when it asked for none).
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChunkChoice>,
    /// Absent unless `stream_options.include_usage`; then `null` on every chunk but the
    /// last, which has no choices and the request's usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageOut>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChoiceLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// A legacy completion; streamed chunks have the same shape.
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageOut>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub text: String,
    pub index: usize,
    pub logprobs: Option<CompletionLogprobs>,
    /// `null` on streamed chunks before the choice's last.
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    /// Per token, its `logprobs` most likely alternatives as `{token: logprob}`, most
    /// likely first.
    pub top_logprobs: Vec<serde_json::Map<String, serde_json::Value>>,
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Model {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: std::borrow::Cow<'static, str>,
    /// For adapters, the base model they apply to (as vLLM lists LoRA modules).
    pub parent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_model_len: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<Model>,
}

// ---------------------------------------------------------------------------------------
// Fine-tuning jobs: the request, and the envelopes OpenAI's objects wear over the stored
// records of `training::jobs` (whose fields are already OpenAI's, under the same names).

/// `POST /v1/fine_tuning/jobs`.
#[derive(Debug, Deserialize)]
pub struct CreateFineTuningJob {
    pub model: String,
    #[serde(default)]
    pub training_file: Option<String>,
    #[serde(default)]
    pub validation_file: Option<String>,
    #[serde(default)]
    pub hyperparameters: Option<HyperparametersIn>,
    #[serde(default)]
    pub method: Option<Value>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub metadata: Option<HashMap<String, String>>,
    /// tunegate: the task (adapter alias) to train; with no `training_file`, its approved logs.
    #[serde(default)]
    pub task: Option<String>,
}

/// `"auto"` or a number, as OpenAI allows.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum AutoOr<T> {
    Auto(String),
    Value(T),
}


#[derive(Debug, Deserialize)]
pub struct HyperparametersIn {
    #[serde(default)]
    pub n_epochs: Option<AutoOr<usize>>,
    #[serde(default)]
    pub batch_size: Option<AutoOr<usize>>,
    #[serde(default)]
    pub learning_rate_multiplier: Option<AutoOr<f64>>,
}

/// `fine_tuning.job`: the stored job with its envelope.
#[derive(Debug, Serialize)]
pub struct FineTuningJob<'a> {
    pub object: &'static str,
    /// The creating tenant (OpenAI's organisation), `tunegate` for the operator's jobs.
    pub organization_id: &'a str,
    #[serde(flatten)]
    pub job: &'a crate::training::jobs::Job,
}

impl<'a> From<&'a crate::training::jobs::Job> for FineTuningJob<'a> {
    fn from(job: &'a crate::training::jobs::Job) -> Self {
        Self { object: "fine_tuning.job", organization_id: job.owner.as_deref().unwrap_or("tunegate"), job }
    }
}

/// `fine_tuning.job.event`.
#[derive(Debug, Serialize)]
pub struct FineTuningJobEvent<'a> {
    pub object: &'static str,
    #[serde(flatten)]
    pub event: &'a crate::training::jobs::JobEventRecord,
}

impl<'a> From<&'a crate::training::jobs::JobEventRecord> for FineTuningJobEvent<'a> {
    fn from(event: &'a crate::training::jobs::JobEventRecord) -> Self {
        Self { object: "fine_tuning.job.event", event }
    }
}

/// `fine_tuning.job.checkpoint`.
#[derive(Debug, Serialize)]
pub struct FineTuningJobCheckpoint<'a> {
    pub object: &'static str,
    #[serde(flatten)]
    pub checkpoint: &'a crate::training::jobs::CheckpointRecord,
}

impl<'a> From<&'a crate::training::jobs::CheckpointRecord> for FineTuningJobCheckpoint<'a> {
    fn from(checkpoint: &'a crate::training::jobs::CheckpointRecord) -> Self {
        Self { object: "fine_tuning.job.checkpoint", checkpoint }
    }
}
