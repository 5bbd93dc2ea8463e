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
///
/// The line carries the request's callable `tools` beside its messages, and an answer that
/// is only tool calls as the assistant's `tool_calls`, as OpenAI's format has them.
pub fn export_line(r: &LogRecord) -> Result<String, LogError> {
    let mut messages = r.request.messages.as_array().cloned().unwrap_or_default();
    let answer = r.review.corrected_response.as_deref().unwrap_or(&r.response);
    let tools = exported_tools(&r.request.params);
    let calls = if tools.is_empty() { None } else { tool_calls(answer) };
    messages.push(match calls {
        Some(calls) => json!({"role": "assistant", "content": null, "tool_calls": calls}),
        None => json!({"role": "assistant", "content": answer}),
    });
    let mut line = json!({ "messages": messages });
    if !tools.is_empty() {
        line["tools"] = serde_json::Value::Array(tools);
    }
    serde_json::to_string(&line).map_err(|e| LogError::Storage(format!("cannot encode training line: {e}")))
}

/// The request's callable function tools in OpenAI's chat form (a Responses API record
/// logs them in its own form); none under `tool_choice: "none"`.
fn exported_tools(params: &serde_json::Value) -> Vec<serde_json::Value> {
    if params.get("tool_choice").and_then(|c| c.as_str()) == Some("none") {
        return Vec::new();
    }
    let tools = params.get("tools").and_then(|t| t.as_array()).cloned().unwrap_or_default();
    tools
        .into_iter()
        .filter(|t| t.get("type").and_then(|k| k.as_str()) == Some("function"))
        .map(|t| {
            if t.get("function").is_some() {
                return t;
            }
            let mut function = json!({});
            for key in ["name", "description", "parameters", "strict"] {
                if let Some(v) = t.get(key).filter(|v| !v.is_null()) {
                    function[key] = v.clone();
                }
            }
            json!({"type": "function", "function": function})
        })
        .collect()
}

/// An answer that is only tool calls, as OpenAI's `tool_calls`: a forced call's bare
/// `{"name", "arguments"}` object, or `<tool_call>` blocks of such objects; `None` for text.
fn tool_calls(answer: &str) -> Option<Vec<serde_json::Value>> {
    let call = |text: &str| -> Option<(String, String)> {
        let v: serde_json::Value = serde_json::from_str(text.trim()).ok()?;
        let name = v.get("name")?.as_str()?.to_string();
        let arguments = v.get("arguments").filter(|a| a.is_object())?.to_string();
        Some((name, arguments))
    };
    let mut found = Vec::new();
    let trimmed = answer.trim();
    if trimmed.starts_with("<tool_call>") {
        let mut rest = trimmed;
        while let Some(body) = rest.strip_prefix("<tool_call>") {
            let end = body.find("</tool_call>")?;
            found.push(call(&body[..end])?);
            rest = body[end + "</tool_call>".len()..].trim_start();
        }
        if !rest.is_empty() {
            return None;
        }
    } else {
        found.push(call(trimmed)?);
    }
    Some(
        found
            .into_iter()
            .enumerate()
            .map(|(i, (name, arguments))| {
                json!({"id": format!("call_{i}"), "type": "function", "function": {"name": name, "arguments": arguments}})
            })
            .collect(),
    )
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

#[cfg(test)]
mod tool_tests {
    use super::*;

    #[test]
    fn tool_answers_export_as_tool_calls() {
        let forced = tool_calls(r#"{"name":"lamp","arguments":{"on":true}}"#).unwrap_or_default();
        assert_eq!(forced[0]["function"], json!({"name": "lamp", "arguments": "{\"on\":true}"}));
        let blocks = "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>{\"name\": \"b\", \"arguments\": {\"x\": 1}}</tool_call>";
        let two = tool_calls(blocks).unwrap_or_default();
        assert_eq!((two.len(), two[1]["id"].as_str()), (2, Some("call_1")));
        for text in ["Sure, the lamp is on.", "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call> and text", "{\"name\": 3}"] {
            assert!(tool_calls(text).is_none(), "{text}");
        }
        let responses_form = json!({"tools": [{"type": "function", "name": "lamp", "parameters": {"type": "object"}}]});
        assert_eq!(exported_tools(&responses_form), vec![json!({"type": "function", "function": {"name": "lamp", "parameters": {"type": "object"}}})]);
        assert!(exported_tools(&json!({"tools": [{"type": "function", "function": {"name": "x"}}], "tool_choice": "none"})).is_empty());
    }
}
