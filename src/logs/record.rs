//! The log record and the query and review types both stores share, plus the rules that
//! must behave the same in both: review transitions, text search and filter matching,
//! and the page cursor.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::LogError;

/// One turn of a logged conversation as training reads it: a role and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub role: String,
    pub content: String,
}

impl Turn {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
}

/// The `status` of a completion that succeeded. Anything else is an error code.
pub const STATUS_OK: &str = "ok";

/// Largest page `list` returns; larger limits are clamped.
pub const MAX_PAGE_LIMIT: usize = 1000;

/// One logged completion: what was asked, what was served, and what reviewers made of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    /// The response's `chatcmpl-…` id; unique, the primary key.
    pub id: String,
    /// Unix milliseconds when the request arrived.
    pub created_ms: i64,
    pub task: String,
    /// The `model` the client asked for.
    pub model: String,
    /// The base model that served it.
    pub base_model: String,
    pub adapter: Option<AdapterRef>,
    pub request: RequestLog,
    /// Assistant content as sent to the client (after redaction).
    pub response: String,
    pub finish_reason: Option<String>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens the router dropped (distilled system prompt).
    pub prompt_tokens_saved: u32,
    pub ttft_ms: Option<u64>,
    pub latency_ms: u64,
    /// [`STATUS_OK`] or the error code the client got.
    pub status: String,
    /// Id of the API key used (never the key itself).
    pub api_key_id: Option<String>,
    /// The tenant of the key (see `api::auth`); `None` for records made before tenancy or
    /// imported by an operator: only admins see those.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The `x-request-id` the response carried (the client's own, or the completion id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The client went away before the stream ended; `response` holds what was generated.
    pub client_disconnected: bool,
    pub metadata: BTreeMap<String, String>,
    /// OpenAI `store: true`: listed under `GET /v1/chat/completions`.
    pub store: bool,
    pub review: Review,
    pub feedback: Option<Feedback>,
}

/// Which adapter generation served a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterRef {
    pub alias: String,
    pub generation: u64,
}

/// The request as the engine saw it, after any prompt rewrite is *not* applied: `messages`
/// is what the client sent (redacted), so training can strip what it likes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestLog {
    /// The OpenAI `messages` array.
    pub messages: Value,
    /// Sampling parameters (`temperature`, `top_p`, `max_tokens`, `stop`, `seed`, …).
    pub params: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewState {
    #[default]
    Pending,
    Approved,
    Rejected,
}

impl ReviewState {
    pub const ALL: [ReviewState; 3] = [Self::Pending, Self::Approved, Self::Rejected];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Result<Self, LogError> {
        match s {
            "pending" => Ok(Self::Pending),
            "approved" => Ok(Self::Approved),
            "rejected" => Ok(Self::Rejected),
            other => Err(LogError::InvalidInput(format!(
                "unknown review state '{other}' (expected pending, approved or rejected)"
            ))),
        }
    }
}

impl std::fmt::Display for ReviewState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Review {
    pub state: ReviewState,
    /// The reviewer's edit of the response; training uses it instead of `response`.
    pub corrected_response: Option<String>,
    pub reviewer: Option<String>,
    /// Unix milliseconds.
    pub reviewed_at_ms: Option<i64>,
}

/// A client's rating (`POST /v1/feedback`). Thumbs map to `score` 1.0 / -1.0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Feedback {
    pub score: Option<f64>,
    pub comment: Option<String>,
    /// Unix milliseconds.
    pub at_ms: i64,
}

impl Feedback {
    pub fn is_positive(&self) -> bool {
        self.score.is_some_and(|s| s > 0.0)
    }
}

/// A reviewer's decision.
///
/// Transition rules (the same in every store):
/// - the target `state` must be `approved` or `rejected`; nothing goes back to `pending`;
/// - `pending → approved | rejected` and re-review `approved ↔ rejected` are legal, and so is
///   reviewing again into the same state (it replaces the correction, reviewer and time);
/// - a record whose `status` is not `ok` cannot be reviewed: there is nothing to train on;
/// - with `expected_state` set, the record must be in that state now (two reviewers, or a
///   bulk review racing a single one: the later one gets the conflict);
/// - `corrected_response` is only allowed when approving, and must not be empty.
///
/// The first three kinds of refusal are [`LogError::IllegalTransition`] (HTTP 409); a bad
/// correction is [`LogError::InvalidInput`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReviewAction {
    pub state: ReviewState,
    #[serde(default)]
    pub corrected_response: Option<String>,
    #[serde(default)]
    pub reviewer: Option<String>,
    #[serde(default)]
    pub expected_state: Option<ReviewState>,
}

impl ReviewAction {
    pub fn approve() -> Self {
        Self {
            state: ReviewState::Approved,
            corrected_response: None,
            reviewer: None,
            expected_state: None,
        }
    }

    pub fn reject() -> Self {
        Self { state: ReviewState::Rejected, ..Self::approve() }
    }

    /// Checks what does not depend on the record (done once for a bulk review).
    pub fn validate(&self) -> Result<(), LogError> {
        if self.state == ReviewState::Pending {
            return Err(LogError::IllegalTransition {
                id: String::new(),
                reason: "a record cannot be moved back to pending".into(),
            });
        }
        if let Some(c) = &self.corrected_response {
            if self.state != ReviewState::Approved {
                return Err(LogError::InvalidInput(
                    "corrected_response is only allowed when approving".into(),
                ));
            }
            if c.trim().is_empty() {
                return Err(LogError::InvalidInput("corrected_response must not be empty".into()));
            }
        }
        Ok(())
    }

    /// Applies the action to `record` or says why it may not.
    pub fn apply(&self, record: &mut LogRecord, now_ms: i64) -> Result<(), LogError> {
        self.validate().map_err(|e| e.with_id(&record.id))?;
        if record.status != STATUS_OK {
            return Err(LogError::IllegalTransition {
                id: record.id.clone(),
                reason: format!(
                    "the request failed with status '{}' and cannot be reviewed",
                    record.status
                ),
            });
        }
        if let Some(expected) = self.expected_state {
            if record.review.state != expected {
                return Err(LogError::IllegalTransition {
                    id: record.id.clone(),
                    reason: format!(
                        "expected state {expected} but the record is {}",
                        record.review.state
                    ),
                });
            }
        }
        record.review = Review {
            state: self.state,
            corrected_response: self.corrected_response.clone(),
            reviewer: self.reviewer.clone(),
            reviewed_at_ms: Some(now_ms),
        };
        Ok(())
    }
}

/// What a bulk review applies to.
#[derive(Debug, Clone, PartialEq)]
pub enum BulkTarget {
    Ids(Vec<String>),
    /// Every record matching the filter (its `order` is ignored). When the action has no
    /// `expected_state`, the filter's `state` (if any) is used as one, so a record reviewed
    /// by someone else meanwhile is skipped rather than overwritten.
    Filter(LogFilter),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct BulkReviewOutcome {
    pub reviewed: u64,
    /// Unknown ids and records the action may not apply to (error status, state changed).
    pub skipped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    #[default]
    NewestFirst,
    OldestFirst,
}

/// Which records `list` returns. Empty fields do not filter.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct LogFilter {
    pub task: Option<String>,
    pub state: Option<ReviewState>,
    /// Case-insensitive substring of any message content, the response or the correction.
    pub q: Option<String>,
    /// Unix ms, inclusive.
    pub since_ms: Option<i64>,
    /// Unix ms, exclusive.
    pub until_ms: Option<i64>,
    /// Requested model, exact.
    pub model: Option<String>,
    /// Exact `status` (`ok` or an error code).
    pub status: Option<String>,
    /// Every pair must be present in the record's metadata.
    pub metadata: BTreeMap<String, String>,
    /// Only OpenAI stored completions (`store: true`).
    pub stored_only: bool,
    /// Only records of this tenant (a client key's view).
    pub tenant: Option<String>,
    pub order: Order,
}

impl LogFilter {
    pub fn task(task: impl Into<String>) -> Self {
        Self { task: Some(task.into()), ..Self::default() }
    }

    /// The lowercased search needle, if the filter searches.
    pub(crate) fn needle(&self) -> Option<String> {
        self.q.as_deref().filter(|q| !q.is_empty()).map(str::to_lowercase)
    }

    /// Whether `r` passes every field of the filter. SQLite evaluates the same conditions in
    /// SQL; this is the reference the Redis store applies after reading.
    pub fn matches(&self, r: &LogRecord) -> bool {
        self.task.as_ref().is_none_or(|t| *t == r.task)
            && self.state.is_none_or(|s| s == r.review.state)
            && self.since_ms.is_none_or(|s| r.created_ms >= s)
            && self.until_ms.is_none_or(|u| r.created_ms < u)
            && self.model.as_ref().is_none_or(|m| *m == r.model)
            && self.status.as_ref().is_none_or(|s| *s == r.status)
            && (!self.stored_only || r.store)
            && self.tenant.as_ref().is_none_or(|t| r.tenant.as_ref() == Some(t))
            && self.metadata.iter().all(|(k, v)| r.metadata.get(k) == Some(v))
            && self.needle().is_none_or(|n| search_text(r).contains(&n))
    }
}

/// One page of `list`. `next_cursor` is `Some` exactly when more records follow.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page {
    pub records: Vec<LogRecord>,
    pub next_cursor: Option<String>,
}

/// Per-task counts for `GET /admin/tasks` and the scheduler. `pending` includes records of
/// failed requests, which cannot be reviewed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TaskStats {
    pub task: String,
    pub pending: u64,
    pub approved: u64,
    pub rejected: u64,
    pub total: u64,
    /// `created_ms` of the newest record.
    pub newest_ms: Option<i64>,
}

impl LogRecord {
    /// The conversation to train on: the request's messages as the engine saw them (text
    /// and refusal parts joined by newlines, `developer` as `system`) and then the approved
    /// answer, the reviewer's correction where there is one.
    pub fn training_messages(&self) -> Vec<Turn> {
        let mut out: Vec<Turn> = self
            .request
            .messages
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
                let role = if role == "developer" { "system" } else { role };
                Turn::new(role, content_texts(m).join("\n"))
            })
            .collect();
        let answer = self.review.corrected_response.as_deref().unwrap_or(&self.response);
        out.push(Turn::new("assistant", answer));
        out
    }
}

/// The lowercased text `q` searches: every message's text content, the response and the
/// correction, newline-separated.
pub(crate) fn search_text(r: &LogRecord) -> String {
    let mut out = String::new();
    for text in message_texts(&r.request.messages) {
        out.push_str(text);
        out.push('\n');
    }
    out.push_str(&r.response);
    if let Some(c) = &r.review.corrected_response {
        out.push('\n');
        out.push_str(c);
    }
    out.to_lowercase()
}

/// Text of every message: a string `content`, or the text of each content part.
fn message_texts(messages: &Value) -> Vec<&str> {
    messages.as_array().into_iter().flatten().flat_map(content_texts).collect()
}

/// A message's text: its string `content`, or its `text` / `refusal` parts in order.
fn content_texts(m: &Value) -> Vec<&str> {
    match m.get("content") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").or_else(|| p.get("refusal")).and_then(Value::as_str))
            .collect(),
        _ => Vec::new(),
    }
}

/// Current time in unix milliseconds.
pub fn now_ms() -> i64 {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A position in `(created_ms, id)` order; records strictly past it come next. Opaque to
/// clients (hex), stable under inserts: a record inserted later never shifts a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub order: Order,
    pub created_ms: i64,
    pub id: String,
}

impl Cursor {
    pub fn encode(&self) -> String {
        let dir = match self.order {
            Order::NewestFirst => 'd',
            Order::OldestFirst => 'a',
        };
        hex::encode(format!("{dir}:{}:{}", self.created_ms, self.id))
    }

    pub fn decode(s: &str, order: Order) -> Result<Self, LogError> {
        let bad = || LogError::InvalidInput(format!("invalid cursor '{s}'"));
        let raw = String::from_utf8(hex::decode(s).map_err(|_| bad())?).map_err(|_| bad())?;
        let mut parts = raw.splitn(3, ':');
        let dir = parts.next().ok_or_else(bad)?;
        let created_ms = parts.next().and_then(|c| c.parse().ok()).ok_or_else(bad)?;
        let id = parts.next().ok_or_else(bad)?.to_string();
        let cursor_order = match dir {
            "d" => Order::NewestFirst,
            "a" => Order::OldestFirst,
            _ => return Err(bad()),
        };
        if cursor_order != order {
            return Err(LogError::InvalidInput(
                "the cursor belongs to a listing in the other order".into(),
            ));
        }
        Ok(Self { order, created_ms, id })
    }
}

/// The cursor that continues a listing right after `record`, for APIs that page by id
/// (OpenAI's `after=<id>`): fetch the record, then list from this cursor.
pub fn cursor_after(record: &LogRecord, order: Order) -> String {
    Cursor { order, created_ms: record.created_ms, id: record.id.clone() }.encode()
}

pub(crate) fn clamp_limit(limit: usize) -> usize {
    limit.clamp(1, MAX_PAGE_LIMIT)
}
