//! Wire → engine: validates an OpenAI request against OpenAI's ranges and this gateway's
//! limits and turns it into a *plan* of engine types (`ChatMessage`, `Prompt`,
//! `SamplingParams`). Errors name the offending `param` and use OpenAI's codes.
//! Parameters the engine cannot honour are refused (`unsupported_parameter`), not ignored.

use crate::api::error::{ApiError, ApiResult, ErrorKind};
use crate::config::LimitsConfig;
use crate::engine::grammar::{Constraint, GrammarSpec};
use crate::engine::{ChatMessage, Prompt, SamplingParams, MAX_TOP_LOGPROBS};

use super::types::{
    ChatCompletionRequest, ChatMessageIn, CompletionRequest, MessageContent, PromptSpec, ResponseFormat, StopSpec,
};

/// What the sampling parameters of both endpoints share once validated.
#[derive(Debug, Clone)]
pub struct Common {
    pub params: SamplingParams,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub task: Option<String>,
    /// The prefix-cache partition of the caller's requests, set by the handler from the key.
    pub cache_scope: u64,
    /// The grammar every choice's output must follow (`response_format`).
    pub grammar: Option<GrammarSpec>,
    /// `grammar` compiled, set by the handler off the HTTP worker.
    pub constraint: Option<Constraint>,
}

impl Common {
    /// The parameters of choice `i`: with a seed, choice `i` uses `seed + i` so that the
    /// choices differ yet each is reproducible.
    pub fn params_for(&self, i: usize) -> SamplingParams {
        let mut p = self.params.clone();
        p.seed = p.seed.map(|s| s.wrapping_add(i as u64));
        p
    }
}

#[derive(Debug, Clone)]
pub struct ChatPlan {
    pub messages: Vec<ChatMessage>,
    pub common: Common,
    pub logprobs: bool,
    /// Functions the model may call (`None`: none may be).
    pub tools: Option<super::tools::ToolPlan>,
}

#[derive(Debug, Clone)]
pub struct CompletionPlan {
    pub prompts: Vec<Prompt>,
    pub common: Common,
    pub logprobs: bool,
    pub echo: bool,
}

const ROLES: &[&str] = &["system", "developer", "user", "assistant", "tool", "function"];
const MAX_STOP: usize = 4;
const OPENAI_MAX_N: i64 = 128;

pub fn chat(req: &ChatCompletionRequest, limits: &LimitsConfig) -> ApiResult<ChatPlan> {
    if req.messages.is_empty() {
        return Err(ApiError::new(
            ErrorKind::EmptyArray,
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty array instead.",
        )
        .with_param("messages"));
    }
    let mut messages = req.messages.iter().enumerate().map(|(i, m)| message(i, m)).collect::<ApiResult<Vec<_>>>()?;
    check_metadata(req.metadata.as_ref())?;
    let mut tools = super::tools::plan(req.tools.as_deref(), req.tool_choice.as_ref())?;
    if let Some(t) = tools.as_mut() {
        t.parallel = req.parallel_tool_calls.unwrap_or(true);
    }
    // Functions the model is told not to call change nothing, so only callable ones are refused.
    let none = |choice: &Option<serde_json::Value>| choice.as_ref().is_some_and(|c| c == "none");
    if req.functions.as_ref().is_some_and(|f| !f.is_empty()) && !none(&req.function_call) {
        return Err(ApiError::unsupported(
            "functions",
            "the engine does not do function calling (function_call \"none\" is accepted)",
        ));
    }
    let mut grammar = req.response_format.as_ref().map(response_format).transpose()?.flatten();
    if let Some(t) = &tools {
        if t.choice == super::tools::Choice::Auto && grammar.is_some() {
            return Err(ApiError::unsupported(
                "response_format",
                "a JSON response_format together with tool_choice 'auto' is not available yet; use tool_choice 'required' or a named function",
            ));
        }
        // A forced call's grammar replaces the answer format: the answer is the call.
        grammar = t.grammar().or(grammar);
        crate::engine::tool_prompt::attach(&mut messages, &t.system_block());
    }
    if req.audio.as_ref().is_some_and(|a| !a.is_null()) {
        return Err(ApiError::unsupported("audio", "the models served are text only"));
    }
    let max_tokens = match (req.max_completion_tokens, req.max_tokens) {
        (Some(v), _) => Some(("max_completion_tokens", v)),
        (None, Some(v)) => Some(("max_tokens", v)),
        (None, None) => None,
    };
    let max_tokens = match max_tokens {
        Some((param, v)) => int_range(param, v, 1, limits.max_tokens as i64)? as usize,
        None => limits.max_tokens,
    };
    let top_logprobs = match req.top_logprobs {
        Some(t) => int_range("top_logprobs", t, 0, MAX_TOP_LOGPROBS as i64)? as usize,
        None => 0,
    };
    if top_logprobs > 0 && req.logprobs != Some(true) {
        return Err(ApiError::invalid_value("top_logprobs", "top_logprobs needs logprobs: true"));
    }
    let common = common(CommonIn {
        max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        ignore_eos: req.ignore_eos,
        n: req.n,
        seed: req.seed.as_ref(),
        stop: req.stop.as_ref(),
        stream: req.stream,
        include_usage: req.stream_options.as_ref().and_then(|o| o.include_usage),
        frequency_penalty: req.frequency_penalty,
        presence_penalty: req.presence_penalty,
        logit_bias_len: req.logit_bias.as_ref().map_or(0, |b| b.len()),
        top_logprobs,
        task: req.metadata.as_ref().and_then(|m| m.get("task")).cloned(),
        limits,
    })?;
    let common = Common { grammar, ..common };
    Ok(ChatPlan { messages, common, logprobs: req.logprobs.unwrap_or(false), tools })
}

/// `response_format` → the grammar the output must follow (`None` for plain text).
fn response_format(f: &ResponseFormat) -> ApiResult<Option<GrammarSpec>> {
    match f.kind.as_str() {
        "text" => Ok(None),
        "json_object" => Ok(Some(GrammarSpec::JsonObject)),
        "json_schema" => {
            let Some(js) = &f.json_schema else {
                return Err(ApiError::invalid_value("response_format.json_schema", "is required when type is json_schema"));
            };
            let name_ok = js.name.as_deref().is_some_and(|n| {
                (1..=64).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            });
            if !name_ok {
                return Err(ApiError::invalid_value(
                    "response_format.json_schema.name",
                    "must be 1 to 64 letters, digits, '_' or '-'",
                ));
            }
            match &js.schema {
                None => Ok(Some(GrammarSpec::JsonSchema(serde_json::json!({})))),
                Some(schema @ serde_json::Value::Object(_)) => Ok(Some(GrammarSpec::JsonSchema(schema.clone()))),
                Some(_) => Err(ApiError::invalid_value("response_format.json_schema.schema", "must be a JSON object")),
            }
        }
        other => Err(ApiError::invalid_value(
            "response_format.type",
            format!("'{other}' is not one of 'text', 'json_object', 'json_schema'"),
        )),
    }
}

fn message(i: usize, m: &ChatMessageIn) -> ApiResult<ChatMessage> {
    if !ROLES.contains(&m.role.as_str()) {
        return Err(ApiError::invalid_value(
            format!("messages[{i}].role"),
            format!(
                "Invalid value: '{}'. Supported values are: 'system', 'developer', 'user', 'assistant', 'tool' and 'function'.",
                m.role
            ),
        ));
    }
    let content = match &m.content {
        Some(MessageContent::Text(t)) => t.clone(),
        Some(MessageContent::Parts(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, p) in parts.iter().enumerate() {
                let (field, text) = match p.kind.as_str() {
                    "text" => ("text", p.text.as_ref()),
                    "refusal" => ("refusal", p.refusal.as_ref()),
                    _ => ("", None),
                };
                match text {
                    Some(t) => texts.push(t.as_str()),
                    None if !field.is_empty() => {
                        let param = format!("messages[{i}].content[{j}].{field}");
                        return Err(ApiError::new(
                            ErrorKind::MissingRequiredParameter,
                            format!("Missing required parameter: '{param}'."),
                        )
                        .with_param(param));
                    }
                    None => {
                        return Err(ApiError::invalid_value(
                            format!("messages[{i}].content[{j}]"),
                            format!(
                                "Content parts of type '{}' are not supported: the models served are text only.",
                                p.kind
                            ),
                        ))
                    }
                }
            }
            texts.join("\n")
        }
        // An assistant turn that only called tools, or a function result, may have no content.
        None if m.role == "assistant" || m.role == "function" || m.role == "tool" => String::new(),
        None => {
            return Err(ApiError::new(
                ErrorKind::MissingRequiredParameter,
                format!("Missing required parameter: 'messages[{i}].content'."),
            )
            .with_param(format!("messages[{i}].content")))
        }
    };
    // Calls and results in the history, written as the model writes and reads them; OpenAI's
    // `developer` role as `system`, which chat templates know.
    Ok(crate::engine::tool_prompt::turn(&m.role, content, m.tool_calls.as_deref()))
}

pub fn completion(req: &CompletionRequest, limits: &LimitsConfig) -> ApiResult<CompletionPlan> {
    let prompts = prompts(req.prompt.as_ref().map(Option::as_ref))?;
    // OpenAI's default for the legacy endpoint is 16; 0 returns no tokens (useful with echo).
    let max_tokens = match req.max_tokens {
        Some(v) => int_range("max_tokens", v, 0, limits.max_tokens as i64)? as usize,
        None => 16.min(limits.max_tokens),
    };
    let top_logprobs = match req.logprobs {
        Some(l) => int_range("logprobs", l, 0, 5)? as usize,
        None => 0,
    };
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported("suffix", "the models served do not do fill-in-the-middle"));
    }
    if let Some(b) = req.best_of {
        int_range("best_of", b, 0, 20)?;
        if b > 1 && Some(b) != req.n {
            return Err(ApiError::unsupported("best_of", "best-of ranking is not implemented; use n"));
        }
    }
    let common = common(CommonIn {
        max_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        ignore_eos: req.ignore_eos,
        n: req.n,
        seed: req.seed.as_ref(),
        stop: req.stop.as_ref(),
        stream: req.stream,
        include_usage: req.stream_options.as_ref().and_then(|o| o.include_usage),
        frequency_penalty: req.frequency_penalty,
        presence_penalty: req.presence_penalty,
        logit_bias_len: req.logit_bias.as_ref().map_or(0, |b| b.len()),
        top_logprobs,
        task: req.metadata.as_ref().and_then(|m| m.get("task")).cloned(),
        limits,
    })?;
    check_metadata(req.metadata.as_ref())?;
    let sequences = prompts.len().saturating_mul(common.n);
    if sequences > limits.max_sequences_per_request {
        return Err(ApiError::invalid_value(
            "prompt",
            format!(
                "This request asks for {sequences} sequences ({} prompts x n = {}); the limit is {} \
                 (limits.max_sequences_per_request).",
                prompts.len(),
                common.n,
                limits.max_sequences_per_request
            ),
        ));
    }
    Ok(CompletionPlan { prompts, common, logprobs: req.logprobs.is_some(), echo: req.echo.unwrap_or(false) })
}

/// What OpenAI's schema makes of `"prompt": null`.
const DEFAULT_PROMPT: &str = "<|endoftext|>";

fn prompts(spec: Option<Option<&PromptSpec>>) -> ApiResult<Vec<Prompt>> {
    let empty = || {
        ApiError::new(ErrorKind::EmptyArray, "Invalid 'prompt': empty array. Expected at least one prompt.")
            .with_param("prompt")
    };
    let tokens = |param: String, ids: &[i64]| -> ApiResult<Prompt> {
        if ids.is_empty() {
            return Err(
                ApiError::new(ErrorKind::EmptyArray, format!("Invalid '{param}': empty token list.")).with_param(param)
            );
        }
        ids.iter()
            .map(|&t| u32::try_from(t).map_err(|_| ApiError::invalid_value(&param, format!("Invalid token id {t}."))))
            .collect::<ApiResult<Vec<u32>>>()
            .map(Prompt::Tokens)
    };
    match spec {
        None => Err(ApiError::new(ErrorKind::MissingRequiredParameter, "Missing required parameter: 'prompt'.")
            .with_param("prompt")),
        Some(None) => Ok(vec![Prompt::Text(DEFAULT_PROMPT.to_string())]),
        Some(Some(spec)) => match spec {
            PromptSpec::Text(t) => Ok(vec![Prompt::Text(t.clone())]),
            PromptSpec::Texts(ts) if ts.is_empty() => Err(empty()),
            PromptSpec::Texts(ts) => Ok(ts.iter().map(|t| Prompt::Text(t.clone())).collect()),
            PromptSpec::Tokens(ids) => Ok(vec![tokens("prompt".into(), ids)?]),
            PromptSpec::TokenLists(ls) if ls.is_empty() => Err(empty()),
            PromptSpec::TokenLists(ls) => {
                ls.iter().enumerate().map(|(i, ids)| tokens(format!("prompt[{i}]"), ids)).collect()
            }
        },
    }
}

struct CommonIn<'a> {
    max_tokens: usize,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    ignore_eos: Option<bool>,
    n: Option<i64>,
    seed: Option<&'a serde_json::Number>,
    stop: Option<&'a StopSpec>,
    stream: Option<bool>,
    include_usage: Option<bool>,
    frequency_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    logit_bias_len: usize,
    /// Alternatives reported per token (already checked).
    top_logprobs: usize,
    task: Option<String>,
    limits: &'a LimitsConfig,
}

fn common(c: CommonIn<'_>) -> ApiResult<Common> {
    let temperature = decimal_range("temperature", c.temperature.unwrap_or(1.0), 0.0, 2.0)?;
    let top_p = decimal_range("top_p", c.top_p.unwrap_or(1.0), 0.0, 1.0)?;
    // -1 is how vLLM spells "off".
    let top_k = match c.top_k {
        None | Some(-1) => 0,
        Some(k) => int_range("top_k", k, 0, i64::from(u32::MAX))? as usize,
    };
    let n = match c.n {
        None => 1,
        Some(n) => {
            int_range("n", n, 1, OPENAI_MAX_N)?;
            if n as usize > c.limits.max_n {
                return Err(ApiError::new(
                    ErrorKind::IntegerAboveMaxValue,
                    format!(
                        "Invalid 'n': this gateway allows at most {} choices per request (limits.max_n).",
                        c.limits.max_n
                    ),
                )
                .with_param("n"));
            }
            n as usize
        }
    };
    for (param, v) in [("frequency_penalty", c.frequency_penalty), ("presence_penalty", c.presence_penalty)] {
        if let Some(v) = v {
            if decimal_range(param, v, -2.0, 2.0)? != 0.0 {
                return Err(ApiError::unsupported(param, "the sampler has no repetition penalties; send 0 or omit it"));
            }
        }
    }
    if c.logit_bias_len > 0 {
        return Err(ApiError::unsupported("logit_bias", "the sampler cannot bias tokens"));
    }
    let stop: Vec<String> = match c.stop {
        None => Vec::new(),
        Some(StopSpec::One(s)) => vec![s.clone()],
        Some(StopSpec::Many(v)) => v.clone(),
    };
    if stop.len() > MAX_STOP {
        return Err(ApiError::invalid_value(
            "stop",
            format!("Invalid 'stop': at most {MAX_STOP} stop sequences, got {}.", stop.len()),
        ));
    }
    let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
    // top_p = 0 keeps only the most likely token: greedy, which the engine spells temperature 0.
    let temperature = if top_p == 0.0 { 0.0 } else { temperature as f32 };
    Ok(Common {
        params: SamplingParams {
            max_tokens: c.max_tokens,
            temperature,
            top_p: top_p as f32,
            top_k,
            seed: c.seed.map(seed).transpose()?,
            stop,
            stop_at_eos: !c.ignore_eos.unwrap_or(false),
            top_logprobs: c.top_logprobs,
        },
        n,
        stream: c.stream.unwrap_or(false),
        include_usage: c.include_usage.unwrap_or(false),
        task: c.task,
        cache_scope: 0, // set by the handler from the caller's key
        grammar: None,
        constraint: None,
    })
}

/// A seed as the sampler takes it: any 64-bit integer, negative ones reinterpreted.
fn seed(n: &serde_json::Number) -> ApiResult<u64> {
    n.as_u64().or_else(|| n.as_i64().map(|s| s as u64)).ok_or_else(|| {
        ApiError::new(ErrorKind::InvalidType, format!("Invalid type for 'seed': expected a 64-bit integer, got {n}."))
            .with_param("seed")
    })
}

fn int_range(param: &str, v: i64, min: i64, max: i64) -> ApiResult<i64> {
    if v < min {
        Err(ApiError::new(
            ErrorKind::IntegerBelowMinValue,
            format!("Invalid '{param}': integer below minimum value. Expected a value >= {min}, but got {v} instead."),
        )
        .with_param(param))
    } else if v > max {
        Err(ApiError::new(
            ErrorKind::IntegerAboveMaxValue,
            format!("Invalid '{param}': integer above maximum value. Expected a value <= {max}, but got {v} instead."),
        )
        .with_param(param))
    } else {
        Ok(v)
    }
}

fn decimal_range(param: &str, v: f64, min: f64, max: f64) -> ApiResult<f64> {
    if v < min {
        Err(ApiError::new(
            ErrorKind::DecimalBelowMinValue,
            format!("Invalid '{param}': decimal below minimum value. Expected a value >= {min}, but got {v} instead."),
        )
        .with_param(param))
    } else if v > max {
        Err(ApiError::new(
            ErrorKind::DecimalAboveMaxValue,
            format!("Invalid '{param}': decimal above maximum value. Expected a value <= {max}, but got {v} instead."),
        )
        .with_param(param))
    } else {
        Ok(v)
    }
}

/// OpenAI's limits on `metadata`: 16 pairs, keys up to 64 characters, values up to 512
/// (the log record keeps it, so it must stay small).
pub fn check_metadata<'a>(m: Option<impl IntoIterator<Item = (&'a String, &'a String)>>) -> ApiResult<()> {
    let Some(m) = m else { return Ok(()) };
    let mut n = 0;
    for (k, v) in m {
        n += 1;
        if n > 16 || k.chars().count() > 64 || v.chars().count() > 512 {
            return Err(ApiError::invalid_value(
                "metadata",
                "'metadata' holds at most 16 pairs, keys up to 64 characters and values up to 512.",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::json::parse;

    fn plan(body: serde_json::Value) -> ApiResult<ChatPlan> {
        let req: ChatCompletionRequest = parse(body.to_string().as_bytes())?;
        chat(&req, &LimitsConfig::default())
    }

    fn code(body: serde_json::Value) -> (ErrorKind, Option<String>) {
        match plan(body) {
            Ok(_) => (ErrorKind::Internal, None),
            Err(e) => (e.kind, e.param),
        }
    }

    #[test]
    fn defaults_follow_openai() -> ApiResult<()> {
        let p = plan(serde_json::json!({"model": "m", "messages": [{"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}))?;
        assert_eq!(p.messages, vec![ChatMessage::new("system", "be brief"), ChatMessage::new("user", "a\nb")]);
        assert_eq!(p.common.params.temperature, 1.0);
        assert_eq!(p.common.params.max_tokens, 4096);
        assert_eq!(p.common.n, 1);
        assert!(!p.common.stream);
        Ok(())
    }

    #[test]
    fn seeds_differ_per_choice() -> ApiResult<()> {
        let p =
            plan(serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 7, "n": 3,
            "max_completion_tokens": 5, "max_tokens": 9, "stop": "\n"}))?;
        assert_eq!([p.common.params_for(0).seed, p.common.params_for(2).seed], [Some(7), Some(9)]);
        assert_eq!(p.common.params.max_tokens, 5);
        assert_eq!(p.common.params.stop, vec!["\n".to_string()]);
        Ok(())
    }

    #[test]
    fn bad_values_get_their_codes() {
        let user = serde_json::json!([{"role": "user", "content": "x"}]);
        assert_eq!(
            code(serde_json::json!({"model": "m", "messages": []})),
            (ErrorKind::EmptyArray, Some("messages".into()))
        );
        assert_eq!(
            code(serde_json::json!({"model": "m", "messages": [{"role": "wizard", "content": "x"}]})),
            (ErrorKind::InvalidValue, Some("messages[0].role".into()))
        );
        assert_eq!(
            code(serde_json::json!({"model": "m", "messages": user, "max_tokens": -1})),
            (ErrorKind::IntegerBelowMinValue, Some("max_tokens".into()))
        );
        assert_eq!(
            code(serde_json::json!({"model": "m", "messages": user, "max_tokens": 5000})),
            (ErrorKind::IntegerAboveMaxValue, Some("max_tokens".into()))
        );
        assert_eq!(
            code(serde_json::json!({"model": "m", "messages": user, "temperature": 2.5})),
            (ErrorKind::DecimalAboveMaxValue, Some("temperature".into()))
        );
        assert_eq!(
            code(serde_json::json!({"model": "m", "messages": user, "n": 9})),
            (ErrorKind::IntegerAboveMaxValue, Some("n".into()))
        );
        assert_eq!(
            code(serde_json::json!({"model": "m", "messages": user, "presence_penalty": 1.0})),
            (ErrorKind::UnsupportedParameter, Some("presence_penalty".into()))
        );
        assert_eq!(
            code(serde_json::json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})),
            (ErrorKind::InvalidValue, Some("messages[0].content[0]".into()))
        );
        assert_eq!(
            code(serde_json::json!({"model": "m", "messages": [{"role": "user", "content": null}]})),
            (ErrorKind::MissingRequiredParameter, Some("messages[0].content".into()))
        );
    }

    #[test]
    fn uncallable_tools_and_wide_seeds_are_accepted() -> ApiResult<()> {
        let p = plan(serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none",
            "seed": 18446744073709551615u64}))?;
        assert_eq!(p.common.params.seed, Some(u64::MAX));
        let p = plan(serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": -1}))?;
        assert_eq!(p.common.params.seed, Some(u64::MAX));
        assert_eq!(
            code(serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 1.5})),
            (ErrorKind::InvalidType, Some("seed".into()))
        );
        assert_eq!(
            code(serde_json::json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]})),
            (ErrorKind::MissingRequiredParameter, Some("messages[0].content[0].text".into()))
        );
        Ok(())
    }

    #[test]
    fn completion_prompts() -> ApiResult<()> {
        let req: CompletionRequest =
            parse(br#"{"model": "m", "prompt": [[1, 2], [3]], "max_tokens": 0, "echo": true, "logprobs": 0}"#)?;
        let p = completion(&req, &LimitsConfig::default())?;
        assert_eq!(p.prompts.len(), 2);
        assert_eq!(p.common.params.max_tokens, 0);
        assert!(p.echo && p.logprobs);
        let req: CompletionRequest = parse(br#"{"model": "m", "prompt": [-1]}"#)?;
        assert_eq!(
            completion(&req, &LimitsConfig::default()).map(|_| ()).map_err(|e| e.kind),
            Err(ErrorKind::InvalidValue)
        );
        let req: CompletionRequest = parse(br#"{"model": "m", "prompt": []}"#)?;
        assert_eq!(
            completion(&req, &LimitsConfig::default()).map(|_| ()).map_err(|e| e.kind),
            Err(ErrorKind::EmptyArray)
        );
        Ok(())
    }
}

