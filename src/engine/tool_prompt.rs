//! How tools are written into a prompt for models whose chat template has no tool syntax of
//! its own (SmolLM2's has none): the functions in a block appended to the system prompt, in
//! the `<tools>` / `<tool_call>` convention many open models are trained on; a call as
//! `<tool_call>{"name": …, "arguments": {…}}</tool_call>`; a result inside
//! `<tool_response>` tags.
//!
//! This generic form is the canonical conversation everywhere (logs, router, training). A
//! model whose chat template takes tools itself (Hugging Face's `tools` variable and
//! assistant `tool_calls`, as Qwen's and Hermes' templates do) gets the conversation
//! [`lift`]ed back into that structure when it is rendered, so it reads tools in the format it
//! was trained on; its calls are parsed in the `<tool_call>` convention those families write.
//!
//! Serving (the API) and training (datasets from logs and files) write prompts through these
//! functions alone, so a system prompt with its tools is the same text, and has the same
//! hash, on both sides: an adapter that distilled a task's system prompt *and* tool list is
//! matched, and both are dropped, exactly when a request carries that prompt and that list.

use serde_json::{json, Value};

use super::types::ChatMessage;

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Function {
    pub name: String,
    pub description: Option<String>,
    /// Its arguments' JSON schema (`{"type": "object"}` when the definition gave none).
    pub parameters: Value,
}

impl Function {
    /// An OpenAI function tool as written into prompts: chat's form (`{"type": "function",
    /// "function": {name, description, parameters}}`) or the Responses API's (the same fields
    /// beside `type`); `None` for another kind of tool or a nameless one.
    pub fn from_openai(tool: &Value) -> Option<Function> {
        if tool.get("type").and_then(Value::as_str) != Some("function") {
            return None;
        }
        let f = tool.get("function").unwrap_or(tool);
        let name = f.get("name").and_then(Value::as_str).filter(|n| !n.is_empty())?;
        let parameters = match f.get("parameters") {
            Some(p @ Value::Object(_)) => p.clone(),
            _ => json!({"type": "object"}),
        };
        let description = f.get("description").and_then(Value::as_str).map(String::from);
        Some(Function { name: name.to_string(), description, parameters })
    }
}

/// The callable functions of a request's logged `tools` and `tool_choice` (none when the
/// choice is `"none"`: serving then writes no block either).
pub fn callable(tools: Option<&Value>, tool_choice: Option<&Value>) -> Vec<Function> {
    if tool_choice.and_then(Value::as_str) == Some("none") {
        return Vec::new();
    }
    tools.and_then(Value::as_array).into_iter().flatten().filter_map(Function::from_openai).collect()
}

const BLOCK_HEAD: &str = "# Tools\n\nYou may call these functions:\n<tools>\n";

/// The block appended to the system prompt: the functions, and how to call one.
pub fn system_block(functions: &[Function]) -> String {
    let mut out = String::from(BLOCK_HEAD);
    for f in functions {
        let mut function = json!({"name": f.name, "parameters": f.parameters});
        if let Some(d) = &f.description {
            function["description"] = json!(d);
        }
        out.push_str(&json!({"type": "function", "function": function}).to_string());
        out.push('\n');
    }
    out.push_str(
        "</tools>\nTo call one, answer with only:\n<tool_call>\n{\"name\": <function name>, \"arguments\": <arguments object>}\n</tool_call>",
    );
    out
}

/// Puts the tool block into the conversation: after the system prompt, or as the system
/// prompt when there is none.
pub fn attach(messages: &mut Vec<ChatMessage>, block: &str) {
    match messages.iter_mut().find(|m| m.role == "system") {
        Some(m) => m.content = format!("{}\n\n{block}", m.content),
        None => messages.insert(0, ChatMessage::new("system", block)),
    }
}

/// An assistant turn's OpenAI `tool_calls` as the model writes them.
pub fn render_calls(calls: &[Value]) -> String {
    calls
        .iter()
        .map(|c| {
            let f = &c["function"];
            let arguments = f["arguments"].as_str().and_then(|a| serde_json::from_str::<Value>(a).ok()).unwrap_or(json!({}));
            // `name` first, as the tool prompt shows and the call grammar writes it.
            let name = json!(f["name"].as_str().unwrap_or_default());
            format!("<tool_call>\n{{\"name\":{name},\"arguments\":{arguments}}}\n</tool_call>")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A `tool` turn's content as the model reads it.
pub fn render_result(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

/// A turn as the model reads it: an assistant's calls after its text, a tool result in its
/// tags, `developer` as `system` (what chat templates know).
pub fn turn(role: &str, content: String, tool_calls: Option<&[Value]>) -> ChatMessage {
    let content = match (role, tool_calls) {
        ("assistant", Some(calls)) if !calls.is_empty() => {
            let calls = render_calls(calls);
            if content.is_empty() { calls } else { format!("{content}\n{calls}") }
        }
        ("tool", _) => render_result(&content),
        _ => content,
    };
    let role = if role == "developer" { "system" } else { role };
    ChatMessage::new(role, content)
}

/// A conversation in the structure chat templates with tool support take.
#[derive(Debug, Clone, PartialEq)]
pub struct Lifted {
    /// Messages as template input: `role`, `content`, and `tool_calls` (`{"type": "function",
    /// "function": {"name", "arguments": {…}}}`, arguments as an object) on assistant turns.
    pub messages: Vec<Value>,
    /// The functions in OpenAI's tool form (`{"type": "function", "function": {…}}`).
    pub tools: Vec<Value>,
}

/// The inverse of [`attach`] and [`turn`]: the tool block taken out of the system prompt
/// (a system prompt that was only the block goes), calls out of assistant turns, results out
/// of their tags. Each part is lifted only when writing it back gives exactly the original
/// text, so a prompt that merely looks like one stays text. `None` when there is nothing to
/// lift.
pub fn lift(messages: &[ChatMessage]) -> Option<Lifted> {
    let mut tools = Vec::new();
    let mut lifted_any = false;
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let plain = |content: &str| json!({"role": m.role, "content": content});
        match m.role.as_str() {
            "system" if i == 0 => match lift_block(&m.content) {
                Some((rest, functions)) => {
                    lifted_any = true;
                    tools = functions;
                    if !rest.is_empty() {
                        out.push(plain(rest));
                    }
                }
                None => out.push(plain(&m.content)),
            },
            "assistant" => match lift_calls(&m.content) {
                Some((text, calls)) => {
                    lifted_any = true;
                    let mut v = plain(text);
                    v["tool_calls"] = Value::Array(calls);
                    out.push(v);
                }
                None => out.push(plain(&m.content)),
            },
            "tool" => match m.content.strip_prefix("<tool_response>\n").and_then(|r| r.strip_suffix("\n</tool_response>")) {
                Some(result) => {
                    lifted_any = true;
                    out.push(plain(result));
                }
                None => out.push(plain(&m.content)),
            },
            _ => out.push(plain(&m.content)),
        }
    }
    lifted_any.then_some(Lifted { messages: out, tools })
}

/// A system prompt's text before its tool block, and the block's functions.
fn lift_block(content: &str) -> Option<(&str, Vec<Value>)> {
    let at = if content.starts_with(BLOCK_HEAD) { 0 } else { content.rfind(&format!("\n\n{BLOCK_HEAD}"))? + 2 };
    let block = &content[at..];
    let lines = block[BLOCK_HEAD.len()..].split_once("</tools>\n")?.0;
    let tools: Vec<Value> = lines.lines().map(serde_json::from_str).collect::<Result<_, _>>().ok()?;
    let functions: Vec<Function> = tools.iter().filter_map(Function::from_openai).collect();
    if functions.len() != tools.len() || system_block(&functions) != block {
        return None;
    }
    let text = if at == 0 { "" } else { &content[..at - 2] };
    Some((text, tools))
}

/// An assistant turn's text before its calls, and the calls (arguments as objects).
fn lift_calls(content: &str) -> Option<(&str, Vec<Value>)> {
    let at = if content.starts_with("<tool_call>\n") { 0 } else { content.find("\n<tool_call>\n")? + 1 };
    let mut rest = &content[at..];
    let mut calls = Vec::new();
    while let Some(body) = rest.strip_prefix("<tool_call>\n") {
        let (call, after) = body.split_once("\n</tool_call>")?;
        let call: Value = serde_json::from_str(call).ok()?;
        let name = call.get("name")?.as_str()?;
        let arguments = call.get("arguments").filter(|a| a.is_object())?;
        calls.push(json!({"type": "function", "function": {"name": name, "arguments": arguments}}));
        rest = after.strip_prefix('\n').unwrap_or(after);
    }
    // Only an exact round trip: the calls are the whole tail, written as `render_calls` writes.
    let openai: Vec<Value> = calls
        .iter()
        .map(|c| json!({"function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"].to_string()}}))
        .collect();
    if !rest.is_empty() || calls.is_empty() || render_calls(&openai) != content[at..] {
        return None;
    }
    let text = if at == 0 { "" } else { &content[..at - 1] };
    Some((text, calls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_attach_and_turns() {
        let tools = json!([{"type": "function", "function": {"name": "lamp", "description": "Switch it",
            "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}}}}}, {"type": "web_search"}]);
        let functions: Vec<Function> = tools.as_array().into_iter().flatten().filter_map(Function::from_openai).collect();
        assert_eq!(functions.len(), 1);
        let responses_form = json!({"type": "function", "name": "lamp", "description": "Switch it",
            "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}}}, "strict": true});
        assert_eq!(Function::from_openai(&responses_form).as_ref(), functions.first());
        assert!(callable(Some(&tools), Some(&json!("none"))).is_empty());
        assert_eq!(callable(Some(&tools), Some(&json!("auto"))), functions);
        let block = system_block(&functions);
        assert!(block.starts_with("# Tools") && block.contains(r#""name":"lamp""#), "{block}");
        let mut with_system = vec![ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "hi")];
        attach(&mut with_system, &block);
        assert_eq!(with_system[0].content, format!("Be brief.\n\n{block}"));
        let mut without = vec![ChatMessage::new("user", "hi")];
        attach(&mut without, &block);
        assert_eq!(without[0], ChatMessage::new("system", block.clone()));
        let call = json!([{"id": "c1", "type": "function", "function": {"name": "lamp", "arguments": "{\"on\":true}"}}]);
        let t = turn("assistant", String::new(), call.as_array().map(Vec::as_slice));
        let inner = t.content.strip_prefix("<tool_call>\n").and_then(|r| r.strip_suffix("\n</tool_call>")).unwrap_or_default();
        assert_eq!(serde_json::from_str::<Value>(inner).ok(), Some(json!({"name": "lamp", "arguments": {"on": true}})));
        assert_eq!(turn("tool", "ok".into(), None).content, "<tool_response>\nok\n</tool_response>");
        assert_eq!(turn("developer", "x".into(), None).role, "system");
    }

    #[test]
    fn lift_inverts_the_generic_form_exactly() -> Result<(), &'static str> {
        let tools = json!([{"type": "function", "function": {"name": "lamp", "description": "Switch it",
            "parameters": {"type": "object", "properties": {"on": {"type": "boolean"}}}}}]);
        let functions = callable(Some(&tools), None);
        let call = json!([{"id": "c1", "type": "function", "function": {"name": "lamp", "arguments": "{\"on\":true}"}},
            {"id": "c2", "type": "function", "function": {"name": "lamp", "arguments": "{\"on\":false}"}}]);
        let mut messages = vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Light on"),
            turn("assistant", "Sure.".into(), call.as_array().map(Vec::as_slice)),
            turn("tool", "done".into(), None),
        ];
        attach(&mut messages, &system_block(&functions));
        let lifted = lift(&messages).ok_or("not lifted")?;
        assert_eq!(lifted.tools, tools.as_array().cloned().unwrap_or_default());
        assert_eq!(lifted.messages[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(lifted.messages[2]["content"], "Sure.");
        assert_eq!(lifted.messages[2]["tool_calls"][1]["function"], json!({"name": "lamp", "arguments": {"on": false}}));
        assert_eq!(lifted.messages[3], json!({"role": "tool", "content": "done"}));
        // A system prompt that was only the block goes; a call alone leaves empty text.
        let mut only = vec![ChatMessage::new("user", "hi"), turn("assistant", String::new(), call.as_array().map(Vec::as_slice))];
        attach(&mut only, &system_block(&functions));
        let lifted = lift(&only).ok_or("not lifted")?;
        assert_eq!(lifted.messages[0], json!({"role": "user", "content": "hi"}));
        assert_eq!(lifted.messages[1]["content"], "");
        // Look-alikes that do not round-trip stay text; nothing to lift is `None`.
        let near = vec![
            ChatMessage::new("system", format!("{}extra", system_block(&functions))),
            ChatMessage::new("assistant", "<tool_call>\n{\"name\": \"lamp\", \"arguments\": {}}\n</tool_call>"),
            ChatMessage::new("tool", "<tool_response>x</tool_response>"),
        ];
        assert_eq!(lift(&near), None);
        assert_eq!(lift(&[ChatMessage::new("user", "hi")]), None);
        Ok(())
    }
}
