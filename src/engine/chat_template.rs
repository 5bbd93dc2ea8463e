//! Chat templates: a model's Jinja template (from GGUF `tokenizer.chat_template` or a Hugging Face
//! folder), compiled once with minijinja and rendered with Hugging Face's semantics (`trim_blocks`,
//! `lstrip_blocks`, loop controls, Python string methods, `raise_exception`, a `tojson` that writes
//! what Python's `json.dumps` writes). Tokenizing the rendered prompt belongs in `tokenizer`;
//! choosing or rewriting messages belongs to the router.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io;

use candle_core::quantized::gguf_file;
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};
use serde::Serialize;

use super::{tool_prompt, ChatMessage, EngineError, Result};

const TEMPLATE_NAME: &str = "chat_template";

/// Gemma's turn format, for Gemma GGUF files that carry no template of their own (the
/// `gemma3-270m` one does not): `<start_of_turn>user` / `<start_of_turn>model` turns closed
/// by `<end_of_turn>`, a system message folded into the first user turn as Gemma's own
/// template does, tool results sent as user turns.
pub const GEMMA_CHAT_TEMPLATE: &str = "{{ bos_token }}\
{% set ns = namespace(prefix='') %}\
{% for message in messages %}\
{% if message['role'] == 'system' %}{% set ns.prefix = ns.prefix + message['content'] + '\n\n' %}\
{% else %}\
{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' }}\
{% if message['role'] != 'assistant' %}{{ ns.prefix }}{% set ns.prefix = '' %}{% endif %}\
{{ message['content'] | trim }}<end_of_turn>\n\
{% endif %}\
{% endfor %}\
{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}";

/// A compiled chat template plus the special tokens it may refer to.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// The template reads Hugging Face's `tools` variable: tool conversations are rendered
    /// through it ([`tool_prompt::lift`]) rather than in the generic tool prompt.
    accepts_tools: bool,
}

impl ChatTemplate {
    /// Compiles `source`; syntax errors surface here, not on the first request.
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        // jinja2 as transformers configures it; keep_trailing_newline stays off as in jinja2.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, without_generation_tags(source))
            .map_err(|e| {
                EngineError::Template(format!(
                    "the chat template does not compile: {}",
                    describe(&e)
                ))
            })?;
        let accepts_tools = env
            .get_template(TEMPLATE_NAME)
            .is_ok_and(|t| t.undeclared_variables(false).contains("tools"));
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token: bos_token.map(str::to_string),
            eos_token: eos_token.map(str::to_string),
            accepts_tools,
        })
    }

    /// The template an architecture's files are known to use when they carry none (Gemma).
    pub fn builtin(architecture: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Option<Self>> {
        match architecture {
            "gemma3" => Self::new(GEMMA_CHAT_TEMPLATE, bos_token, eos_token).map(Some),
            _ => Ok(None),
        }
    }

    /// The template under GGUF key `tokenizer.chat_template`, or `None` when the file has none.
    pub fn from_gguf(
        md: &HashMap<String, gguf_file::Value>,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Option<Self>> {
        match md.get("tokenizer.chat_template") {
            None => Ok(None),
            Some(gguf_file::Value::String(source)) => {
                Self::new(source, bos_token, eos_token).map(Some)
            }
            Some(other) => Err(EngineError::Template(format!(
                "tokenizer.chat_template should be a string, found {:?}",
                other.value_type()
            ))),
        }
    }

    /// Renders `messages` into the prompt text, ending with the assistant's header when
    /// `add_generation_prompt`. A template's `raise_exception("...")` comes back as a Template
    /// error carrying that message.
    /// A conversation with tools (in [`tool_prompt`]'s generic form) is lifted into the
    /// template's own `tools` and `tool_calls` when the template takes them.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        match self.accepts_tools.then(|| tool_prompt::lift(messages)).flatten() {
            Some(lifted) => {
                ctx.insert("messages", Value::from_serialize(&lifted.messages));
                if !lifted.tools.is_empty() {
                    ctx.insert("tools", Value::from_serialize(&lifted.tools));
                }
            }
            None => {
                ctx.insert("messages", Value::from_serialize(messages));
            }
        }
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        // Unset tokens stay undefined, as in transformers, so `{{ bos_token }}` renders nothing.
        if let Some(t) = &self.bos_token {
            ctx.insert("bos_token", Value::from(t.as_str()));
        }
        if let Some(t) = &self.eos_token {
            ctx.insert("eos_token", Value::from(t.as_str()));
        }
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| EngineError::Template(describe(&e)))?;
        template.render(ctx).map_err(|e| match raised_message(&e) {
            Some(msg) => EngineError::Template(msg.to_string()),
            None => {
                EngineError::Template(format!("cannot render the chat template: {}", describe(&e)))
            }
        })
    }

    /// Whether tools are rendered by the template itself (its `tools` variable).
    pub fn accepts_tools(&self) -> bool {
        self.accepts_tools
    }

    /// The template source as the model ships it.
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// The message a template passed to `raise_exception`, carried as the error's source.
#[derive(Debug)]
struct Raised(String);

impl fmt::Display for Raised {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        "the template raised an exception",
    )
    .with_source(Raised(message)))
}

fn raised_message(e: &Error) -> Option<&str> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(r) = c.downcast_ref::<Raised>() {
            return Some(&r.0);
        }
        cause = c.source();
    }
    None
}

/// One line: the error, its detail and where in the template it happened.
fn describe(e: &Error) -> String {
    let mut s = e.kind().to_string();
    if let Some(d) = e.detail() {
        s.push_str(": ");
        s.push_str(d);
    }
    if let Some(line) = e.line() {
        s.push_str(&format!(" (line {line})"));
    }
    s
}

/// transformers' `{% generation %}` block (it marks assistant text for training masks) renders
/// its body unchanged; minijinja has no such tag, so it becomes an always-true `if` with the same
/// whitespace-control markers, which trims exactly as the original block would.
fn without_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        let Some(end) = tag.find("%}") else {
            break;
        };
        let inner = &tag[2..end];
        let (open, body, close) = split_markers(inner);
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{open} if true {close}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{open} endif {close}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// Splits a tag's inside into its leading `-`/`+` marker, its body and its trailing marker.
fn split_markers(inner: &str) -> (&str, &str, &str) {
    let marker = |c: char| c == '-' || c == '+';
    let (open, rest) = if inner.starts_with(marker) {
        inner.split_at(1)
    } else {
        ("", inner)
    };
    let (body, close) = if rest.ends_with(marker) {
        rest.split_at(rest.len() - 1)
    } else {
        (rest, "")
    };
    (open, body, close)
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`. Unlike minijinja's built-in it does not HTML-escape and it
/// uses Python's separators (`", "` and `": "`, or `","` with an indent).
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
            (None, Some(s)) => Some(s.to_string()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ))
            }
        },
    };
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be two strings",
            ))
        }
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let json = if sort_keys.unwrap_or(false) {
        // serde_json::Value's map is sorted unless `preserve_order` is on; sort explicitly anyway.
        let v = serde_json::to_value(&value)
            .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
        to_python_json(
            &sorted(v),
            PyFormatter::new(indent, item_sep, key_sep, ensure_ascii.unwrap_or(false)),
        )
    } else {
        to_python_json(
            &value,
            PyFormatter::new(indent, item_sep, key_sep, ensure_ascii.unwrap_or(false)),
        )
    }?;
    Ok(Value::from(json))
}

fn sorted(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(map) => {
            let mut entries: Vec<_> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.into_iter().map(sorted).collect())
        }
        other => other,
    }
}

fn to_python_json<T: Serialize + ?Sized>(
    value: &T,
    f: PyFormatter,
) -> std::result::Result<String, Error> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, f);
    value
        .serialize(&mut ser)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    String::from_utf8(out)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))
}

/// A serde_json formatter that lays out JSON as Python's `json.dumps` does.
struct PyFormatter {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    depth: usize,
    /// Whether the container being written has had an element yet (for `[]` / `{}`).
    has_items: Vec<bool>,
}

impl PyFormatter {
    fn new(indent: Option<String>, item_sep: String, key_sep: String, ensure_ascii: bool) -> Self {
        Self {
            indent,
            item_sep,
            key_sep,
            ensure_ascii,
            depth: 0,
            has_items: Vec::new(),
        }
    }

    fn newline<W: ?Sized + io::Write>(&self, w: &mut W) -> io::Result<()> {
        if let Some(ind) = &self.indent {
            w.write_all(b"\n")?;
            for _ in 0..self.depth {
                w.write_all(ind.as_bytes())?;
            }
        }
        Ok(())
    }

    fn open<W: ?Sized + io::Write>(&mut self, w: &mut W, c: &[u8]) -> io::Result<()> {
        self.depth += 1;
        self.has_items.push(false);
        w.write_all(c)
    }

    fn close<W: ?Sized + io::Write>(&mut self, w: &mut W, c: &[u8]) -> io::Result<()> {
        self.depth = self.depth.saturating_sub(1);
        if self.has_items.pop().unwrap_or(false) {
            self.newline(w)?;
        }
        w.write_all(c)
    }

    fn item<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if let Some(last) = self.has_items.last_mut() {
            *last = true;
        }
        if !first {
            w.write_all(self.item_sep.as_bytes())?;
        }
        self.newline(w)
    }
}

impl serde_json::ser::Formatter for PyFormatter {
    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"[")
    }
    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"]")
    }
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.item(w, first)
    }
    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"{")
    }
    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"}")
    }
    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.item(w, first)
    }
    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(self.key_sep.as_bytes())
    }
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        if !self.ensure_ascii {
            return w.write_all(fragment.as_bytes());
        }
        for c in fragment.chars() {
            if c.is_ascii() {
                w.write_all(&[c as u8])?;
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    write!(w, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tokenizer::SMOLLM2_CHAT_TEMPLATE;

    fn messages() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "  Be brief.  "),
            ChatMessage::new("user", "héllo <b>"),
        ]
    }

    /// Expected outputs below come from transformers' own template compiler (jinja2 3.1.6).
    fn render(source: &str) -> Result<String> {
        ChatTemplate::new(source, Some("<s>"), Some("</s>"))?.render(&messages(), true)
    }

    /// A template in the style of the families that take tools (written for this test): the
    /// functions in the system turn, calls from `tool_calls`, results in a `tool` turn.
    const TOOL_TEMPLATE: &str = "{%- if tools %}<sys>{% if messages[0].role == 'system' %}{{ messages[0].content }}\n{% endif %}\
        Tools:{% for t in tools %}\n{{ t | tojson }}{% endfor %}</sys>\n\
        {%- elif messages[0].role == 'system' %}<sys>{{ messages[0].content }}</sys>\n{% endif %}\
        {%- for m in messages %}{% if m.role != 'system' %}<{{ m.role }}>{{ m.content }}\
        {%- for c in m.tool_calls or [] %}[call {{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}\
        </{{ m.role }}>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";

    #[test]
    fn tools_go_through_a_template_that_takes_them() -> Result<()> {
        use crate::engine::tool_prompt;
        let tools = serde_json::json!([{"type": "function", "function": {"name": "lamp", "parameters": {"type": "object"}}}]);
        let calls = serde_json::json!([{"id": "c", "type": "function", "function": {"name": "lamp", "arguments": "{\"on\":true}"}}]);
        let mut messages = vec![
            ChatMessage::new("system", "Be brief."),
            ChatMessage::new("user", "Light"),
            tool_prompt::turn("assistant", String::new(), calls.as_array().map(Vec::as_slice)),
            tool_prompt::turn("tool", "ok".into(), None),
        ];
        tool_prompt::attach(&mut messages, &tool_prompt::system_block(&tool_prompt::callable(Some(&tools), None)));
        let native = ChatTemplate::new(TOOL_TEMPLATE, None, None)?;
        assert!(native.accepts_tools());
        assert_eq!(
            native.render(&messages, true)?,
            // (`trim_blocks` eats the newline after each block tag, as in transformers.)
            "<sys>Be brief.\nTools:{\"type\": \"function\", \"function\": {\"name\": \"lamp\", \"parameters\": {\"type\": \"object\"}}}</sys>\
             <user>Light</user>\n<assistant>[call lamp {\"on\": true}]</assistant>\n<tool>ok</tool>\n<assistant>"
        );
        // Without tools the same template renders plain turns.
        assert_eq!(native.render(&[ChatMessage::new("user", "hi")], true)?, "<user>hi</user>\n<assistant>");
        // A template without a `tools` variable reads the generic tool prompt as text.
        let generic = ChatTemplate::new(SMOLLM2_CHAT_TEMPLATE, None, None)?;
        assert!(!generic.accepts_tools());
        let text = generic.render(&messages, true)?;
        assert!(text.contains("# Tools") && text.contains("<tool_call>\n{\"name\":\"lamp\"") && text.contains("<tool_response>\nok"), "{text}");
        Ok(())
    }

    #[test]
    fn smollm2_template_matches_transformers() -> Result<()> {
        let t = ChatTemplate::new(SMOLLM2_CHAT_TEMPLATE, None, None)?;
        let both = [
            ChatMessage::new("system", "You are a terse assistant."),
            ChatMessage::new("user", "What is 2+2?"),
        ];
        assert_eq!(
            t.render(&both, true)?,
            "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&[ChatMessage::new("user", "Hello!")], false)?,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHello!<|im_end|>\n"
        );
        Ok(())
    }

    #[test]
    fn trims_and_lstrips_blocks_like_transformers() -> Result<()> {
        let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.role }}]\n    {% endif %}\n{% endfor %}\nend\n";
        assert_eq!(render(src)?, "[user]\nend");
        Ok(())
    }

    #[test]
    fn python_string_methods_work() -> Result<()> {
        let src = "{{ messages[0].content.strip() }}|{{ messages[1].content.upper() }}|\
                   {% if messages[1].content.startswith('hé') %}yes{% endif %}|{{ 'a,b'.split(',') | join('+') }}";
        assert_eq!(render(src)?, "Be brief.|HÉLLO <B>|yes|a+b");
        Ok(())
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() -> Result<()> {
        let src = "{{ messages[1] | tojson }}\n{{ {'z': [1, 2.5, none, true], 'a': 'x<y'} | tojson(indent=2) }}\n\
                   {{ {'k': 'ü'} | tojson(ensure_ascii=true) }}\n\
                   {{ {'b': 1, 'a': {'d': 2, 'c': 3}} | tojson(sort_keys=true, separators=[',', ':']) }}\n{{ [] | tojson(indent=2) }}";
        assert_eq!(
            render(src)?,
            "{\"role\": \"user\", \"content\": \"héllo <b>\"}\n{\n  \"z\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"a\": \"x<y\"\n}\n\
             {\"k\": \"\\u00fc\"}\n{\"a\":{\"c\":3,\"d\":2},\"b\":1}\n[]"
        );
        Ok(())
    }

    #[test]
    fn special_tokens_namespace_and_loop_controls() -> Result<()> {
        let src =
            "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}";
        assert_eq!(render(src)?, "<s>  Be brief.  </s>héllo <b></s>");
        let src = "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}\
                   {% set ns.n = ns.n + 1 %}{{ m.role }}{% endfor %}={{ ns.n }}";
        assert_eq!(render(src)?, "system=1");
        // Unset special tokens render as nothing, not "none".
        let t = ChatTemplate::new("[{{ bos_token }}]", None, None)?;
        assert_eq!(t.render(&messages(), false)?, "[]");
        Ok(())
    }

    #[test]
    fn generation_blocks_render_their_body() -> Result<()> {
        let src = "{% for m in messages %}\n{%- generation %}\n{{ m.role }};\n{%- endgeneration %}\n{% endfor %}";
        assert_eq!(render(src)?, "system;user;");
        Ok(())
    }

    #[test]
    fn raise_exception_becomes_a_template_error_with_its_message() -> Result<()> {
        let src = "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}";
        match render(src) {
            Err(EngineError::Template(msg)) => assert_eq!(msg, "System role not supported"),
            other => {
                return Err(EngineError::Internal(format!(
                    "expected a template error, got {other:?}"
                )))
            }
        }
        Ok(())
    }

    #[test]
    fn syntax_errors_surface_at_compile_time() -> Result<()> {
        match ChatTemplate::new("{% for m in messages %}", None, None) {
            Err(EngineError::Template(msg)) => assert!(msg.contains("does not compile"), "{msg}"),
            other => {
                return Err(EngineError::Internal(format!(
                    "expected a compile error, got {other:?}"
                )))
            }
        }
        Ok(())
    }

    #[test]
    fn from_gguf_reads_the_template_key() -> Result<()> {
        let mut md = HashMap::new();
        assert!(ChatTemplate::from_gguf(&md, None, None)?.is_none());
        md.insert(
            "tokenizer.chat_template".to_string(),
            gguf_file::Value::String("{{ eos_token }}".into()),
        );
        let t =
            ChatTemplate::from_gguf(&md, None, Some("<|im_end|>"))?.ok_or(EngineError::NotReady)?;
        assert_eq!(t.render(&[], false)?, "<|im_end|>");
        md.insert(
            "tokenizer.chat_template".to_string(),
            gguf_file::Value::U32(1),
        );
        assert!(ChatTemplate::from_gguf(&md, None, None).is_err());
        Ok(())
    }

    #[test]
    fn template_is_shareable_across_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<ChatTemplate>();
    }
}
