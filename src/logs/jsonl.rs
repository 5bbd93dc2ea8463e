//! OpenAI fine-tuning JSONL: one `{"messages":[...]}` object per line, the conversation as
//! the client sent it followed by the approved assistant answer (the reviewer's correction
//! where there is one). Import reads the same shape back as approved records.

use std::io::{BufRead, Write};

use serde_json::{json, Value};

use super::{now_ms, LogError, LogRecord, LogStore, RequestLog, Review, ReviewState, STATUS_OK};

/// Records per store write during an import.
const IMPORT_BATCH: usize = 500;

#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub task: String,
    /// Stored as the requested and base model of the imported records.
    pub model: String,
    /// Stored as the reviewer; defaults to `import`.
    pub reviewer: Option<String>,
}

/// The training line for one record.
pub fn export_line(r: &LogRecord) -> Result<String, LogError> {
    let mut messages = r.request.messages.as_array().cloned().unwrap_or_default();
    let answer = r.review.corrected_response.as_deref().unwrap_or(&r.response);
    messages.push(json!({"role": "assistant", "content": answer}));
    serde_json::to_string(&json!({ "messages": messages }))
        .map_err(|e| LogError::Storage(format!("cannot encode training line: {e}")))
}

/// Writes every approved example of `task` (oldest first) and returns how many.
pub async fn export_jsonl<W: Write>(
    store: &LogStore,
    task: &str,
    out: &mut W,
) -> Result<usize, LogError> {
    let records = store.approved_examples(task).await?;
    let io = |e: std::io::Error| LogError::Storage(format!("cannot write the export: {e}"));
    for r in &records {
        out.write_all(export_line(r)?.as_bytes()).map_err(io)?;
        out.write_all(b"\n").map_err(io)?;
    }
    out.flush().map_err(io)?;
    Ok(records.len())
}

/// Reads a whole file of training lines and stores each as an approved record of the task.
/// Nothing is written unless every line is valid. Ids are `chatcmpl-import-<uuid>-<line>`,
/// one uuid per import, so the import keeps the file's order (records share `created_ms`
/// and sort by id) and a later export reproduces the file. Keys other than `messages`
/// (such as `tools`) are not kept.
pub async fn import_jsonl<R: BufRead>(
    store: &LogStore,
    input: R,
    opts: &ImportOptions,
) -> Result<usize, LogError> {
    let batch_id = uuid::Uuid::new_v4().simple().to_string();
    let now = now_ms();
    let mut records = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let n = i + 1;
        let line =
            line.map_err(|e| LogError::InvalidInput(format!("line {n}: cannot read: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let (messages, answer) =
            parse_line(&line).map_err(|m| LogError::InvalidInput(format!("line {n}: {m}")))?;
        records.push(LogRecord {
            id: format!("chatcmpl-import-{batch_id}-{n:09}"),
            created_ms: now,
            task: opts.task.clone(),
            model: opts.model.clone(),
            base_model: opts.model.clone(),
            adapter: None,
            request: RequestLog { messages: Value::Array(messages), params: json!({}) },
            response: answer,
            finish_reason: Some("stop".into()),
            prompt_tokens: 0,
            completion_tokens: 0,
            prompt_tokens_saved: 0,
            ttft_ms: None,
            latency_ms: 0,
            status: STATUS_OK.into(),
            api_key_id: None,
            tenant: None,
            request_id: None,
            client_disconnected: false,
            metadata: Default::default(),
            store: false,
            review: Review {
                state: ReviewState::Approved,
                corrected_response: None,
                reviewer: Some(opts.reviewer.clone().unwrap_or_else(|| "import".into())),
                reviewed_at_ms: Some(now),
            },
            feedback: None,
        });
    }
    for chunk in records.chunks(IMPORT_BATCH) {
        store.insert_batch(chunk).await?;
    }
    Ok(records.len())
}

/// Splits a line into the conversation and the final assistant answer.
fn parse_line(line: &str) -> Result<(Vec<Value>, String), String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let mut messages = match v.get("messages") {
        Some(Value::Array(m)) => m.clone(),
        _ => return Err("expected an object with a \"messages\" array".into()),
    };
    for (i, m) in messages.iter().enumerate() {
        if m.get("role").and_then(Value::as_str).is_none() {
            return Err(format!("message {i} has no string \"role\""));
        }
    }
    let last = messages.pop().ok_or("\"messages\" is empty")?;
    if last.get("role").and_then(Value::as_str) != Some("assistant") {
        return Err("the last message must be the assistant's answer".into());
    }
    let answer = last
        .get("content")
        .and_then(Value::as_str)
        .ok_or("the assistant's answer must have string \"content\"")?;
    if messages.is_empty() {
        return Err("there is no prompt before the assistant's answer".into());
    }
    Ok((messages, answer.to_string()))
}
