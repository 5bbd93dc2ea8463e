//! Tool calling: validation of `tools` and `tool_choice`, the grammars that make calls valid,
//! and parsing answers back into OpenAI's `message.tool_calls`. How tools reach the prompt is
//! `engine::tool_prompt`'s (a generic block in the system prompt, or the model's own chat
//! template when it takes tools); calls are written `<tool_call>{"name": …, "arguments": {…}}</tool_call>`.
//!
//! `tool_choice: "required"` and a named function are forced from the first token: the
//! output must be one call object (`{"name": …, "arguments": …}`) that the grammar checks
//! against the chosen function's `parameters` schema. `"auto"` leaves the model free until
//! it writes `<tool_call>`; from there a lazy grammar makes the call valid for one listed
//! function and closes it, then allows the end or (with `parallel_tool_calls`) another call.
//! A block that still does not parse (cut short by `max_tokens`) leaves the whole answer as
//! text.

use serde_json::{json, Value};

use super::types::{FunctionCall, ToolCall};
use crate::api::error::{ApiError, ApiResult};
use crate::engine::grammar::{GrammarSpec, Repeat};

pub use crate::engine::tool_prompt::Function;

#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// The model decides.
    Auto,
    /// The model must call one of the tools.
    Required,
    /// The model must call this one.
    Named(String),
}

/// The tools of a request that may call them.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolPlan {
    pub functions: Vec<Function>,
    pub choice: Choice,
    /// `parallel_tool_calls` (default true): under `auto`, the answer may hold several calls.
    pub parallel: bool,
}

/// `tools` + `tool_choice` → the plan, or `None` when nothing may be called (no tools, or
/// `tool_choice: "none"`).
pub fn plan(tools: Option<&[Value]>, choice: Option<&Value>) -> ApiResult<Option<ToolPlan>> {
    let tools = tools.unwrap_or_default();
    let choice = match choice {
        None => Choice::Auto,
        Some(Value::String(s)) if s == "none" => return Ok(None),
        Some(Value::String(s)) if s == "auto" => Choice::Auto,
        Some(Value::String(s)) if s == "required" => Choice::Required,
        Some(v @ Value::Object(_)) => match v.pointer("/function/name").and_then(Value::as_str) {
            Some(name) if v["type"] == "function" => Choice::Named(name.to_string()),
            _ => return Err(ApiError::invalid_value("tool_choice", "must name a function: {\"type\": \"function\", \"function\": {\"name\": …}}")),
        },
        Some(_) => return Err(ApiError::invalid_value("tool_choice", "must be 'none', 'auto', 'required' or a named function")),
    };
    if tools.is_empty() {
        return match choice {
            Choice::Auto => Ok(None),
            _ => Err(ApiError::invalid_value("tool_choice", "is only allowed when 'tools' are given")),
        };
    }
    let mut functions = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        if t["type"] != "function" {
            return Err(ApiError::invalid_value(format!("tools[{i}].type"), "only 'function' tools are available"));
        }
        let f = &t["function"];
        let name = f["name"].as_str().unwrap_or_default();
        if !(1..=64).contains(&name.len()) || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return Err(ApiError::invalid_value(format!("tools[{i}].function.name"), "must be 1 to 64 letters, digits, '_' or '-'"));
        }
        if functions.iter().any(|g: &Function| g.name == name) {
            return Err(ApiError::invalid_value(format!("tools[{i}].function.name"), format!("'{name}' is listed twice")));
        }
        let parameters = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object"}),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => return Err(ApiError::invalid_value(format!("tools[{i}].function.parameters"), "must be a JSON schema object")),
        };
        let description = f["description"].as_str().map(String::from);
        functions.push(Function { name: name.to_string(), description, parameters });
    }
    if let Choice::Named(n) = &choice {
        if !functions.iter().any(|f| &f.name == n) {
            return Err(ApiError::invalid_value("tool_choice", format!("no tool is named '{n}'")));
        }
    }
    Ok(Some(ToolPlan { functions, choice, parallel: true }))
}

impl ToolPlan {
    /// The block appended to the system prompt: the functions, and how to call one.
    pub fn system_block(&self) -> String {
        crate::engine::tool_prompt::system_block(&self.functions)
    }

    /// The grammar of the answer: a forced call (`required` or a named function) from the
    /// first token; under `auto`, a lazy grammar that engages when `<tool_call>` appears.
    pub fn grammar(&self) -> Option<GrammarSpec> {
        let call = |f: &Function| {
            json!({
                "type": "object",
                "properties": {"name": {"const": f.name}, "arguments": f.parameters},
                "required": ["name", "arguments"],
                "additionalProperties": false
            })
        };
        match &self.choice {
            // Free until the model opens a call; the call then follows a listed function.
            // With parallel calls, the grammar also writes `</tool_call>` after each call and
            // allows only the end or the next call there.
            Choice::Auto => Some(GrammarSpec::Lazy {
                trigger: "<tool_call>".into(),
                schema: json!({"anyOf": self.functions.iter().map(call).collect::<Vec<_>>()}),
                repeat: self.parallel.then(|| Repeat {
                    close: "\n</tool_call>".into(),
                    separator: "\n</tool_call>\n<tool_call>\n".into(),
                }),
            }),
            Choice::Named(n) => self.functions.iter().find(|f| &f.name == n).map(|f| GrammarSpec::JsonSchema(call(f))),
            Choice::Required => {
                Some(GrammarSpec::JsonSchema(json!({"anyOf": self.functions.iter().map(call).collect::<Vec<_>>()})))
            }
        }
    }

    /// The calls in a finished answer, or `None` when it is text; `id` names each call.
    pub fn parse(&self, text: &str, id: &mut impl FnMut() -> String) -> Option<Vec<ToolCall>> {
        let calls: Vec<Value> = match self.choice {
            Choice::Auto => {
                let mut calls = Vec::new();
                let mut rest = text;
                while let Some(start) = rest.find("<tool_call>") {
                    let body = &rest[start + "<tool_call>".len()..];
                    let end = body.find("</tool_call>").unwrap_or(body.len());
                    calls.push(serde_json::from_str(body[..end].trim()).ok()?);
                    rest = &body[end..];
                }
                calls
            }
            Choice::Required | Choice::Named(_) => vec![serde_json::from_str(text.trim()).ok()?],
        };
        if calls.is_empty() {
            return None;
        }
        calls
            .into_iter()
            .map(|c| {
                let name = c["name"].as_str()?;
                self.functions.iter().find(|f| f.name == name)?;
                let arguments = c.get("arguments").filter(|a| a.is_object())?;
                Some(ToolCall {
                    id: id(),
                    kind: "function",
                    function: FunctionCall { name: name.to_string(), arguments: arguments.to_string() },
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    }

    #[test]
    fn choices_and_parsing() -> ApiResult<()> {
        let tools = weather();
        let tools = tools.as_array().map(Vec::as_slice);
        assert_eq!(plan(tools, Some(&json!("none")))?, None);
        assert_eq!(plan(None, None)?, None);
        assert!(plan(None, Some(&json!("required"))).is_err());
        assert!(plan(tools, Some(&json!({"type": "function", "function": {"name": "other"}}))).is_err());
        let auto = plan(tools, None)?.ok_or_else(|| ApiError::internal("no plan"))?;
        assert!(auto.system_block().contains("\"get_weather\""));
        assert!(matches!(auto.grammar(), Some(GrammarSpec::Lazy { .. })));
        let mut n = 0;
        let mut id = || {
            n += 1;
            format!("call_{n}")
        };
        let calls = auto.parse("Sure.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>", &mut id);
        let calls = calls.ok_or_else(|| ApiError::internal("not parsed"))?;
        assert_eq!((calls[0].function.name.as_str(), calls[0].function.arguments.as_str()), ("get_weather", "{\"city\":\"Oslo\"}"));
        assert_eq!(auto.parse("It is sunny.", &mut id), None);
        assert_eq!(auto.parse("<tool_call>{\"name\": \"nope\", \"arguments\": {}}</tool_call>", &mut id), None);
        let forced = plan(tools, Some(&json!("required")))?.ok_or_else(|| ApiError::internal("no plan"))?;
        assert!(matches!(forced.grammar(), Some(GrammarSpec::JsonSchema(_))));
        assert!(forced.parse("{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Rome\"}}", &mut id).is_some());
        Ok(())
    }
}
