//! Constrained decoding: a sequence may carry a grammar, and then at every step only the
//! tokens that keep its output inside the grammar can be sampled (structured outputs: JSON,
//! or JSON that follows a schema). The grammar engine is `llguidance` (what vLLM's guidance
//! backend and mistral.rs use): it compiles a JSON schema to a grammar and computes each
//! step's token mask over a trie of the vocabulary's token bytes
//! ([`Tokenizer::token_bytes`]), built once per model.
//!
//! Compiling happens off the engine thread ([`Grammars::compile`], called where a request is
//! prepared) and is cached by the schema's hash; the engine thread only computes masks and
//! commits sampled tokens ([`Constraint`]). A sequence whose grammar is complete can only
//! end (its mask allows just the end-of-sequence tokens).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use sha2::{Digest, Sha256};

use super::{EngineError, Result, Tokenizer};

/// Compiled grammars kept per model, most recently used first out last.
const CACHE_ENTRIES: usize = 64;

/// What a sequence's output must be.
#[derive(Debug, Clone, PartialEq)]
pub enum GrammarSpec {
    /// Any JSON object.
    JsonObject,
    /// JSON that follows this schema (the subset of JSON Schema llguidance implements; the
    /// rest is refused at compile time, naming the keyword).
    JsonSchema(serde_json::Value),
    /// Free output until `trigger` appears in it, then JSON that follows `schema` (a tool
    /// call after `<tool_call>` under `tool_choice: "auto"`), then the end, or with
    /// `repeat` its closing text and then the end or more values (parallel calls). The
    /// trigger may fall anywhere inside a token; what the token carries after it is fed to
    /// the grammar.
    Lazy { trigger: String, schema: serde_json::Value, repeat: Option<Repeat> },
}

/// After a lazy grammar's JSON: the text that closes it, and the text between one JSON value
/// and the next when several may follow (parallel tool calls: `\n</tool_call>` ends a call,
/// `\n</tool_call>\n<tool_call>\n` separates two); the output ends after a closing text.
#[derive(Debug, Clone, PartialEq)]
pub struct Repeat {
    pub close: String,
    pub separator: String,
}

impl GrammarSpec {
    fn key(&self) -> [u8; 32] {
        let text = match self {
            GrammarSpec::JsonObject => "json_object".to_string(),
            GrammarSpec::JsonSchema(s) => format!("json_schema:{s}"),
            GrammarSpec::Lazy { trigger, schema, repeat } => match repeat {
                None => format!("lazy:{}:{trigger}:{schema}", trigger.len()),
                Some(r) => format!("lazy-repeat:{}:{trigger}:{}:{}:{}:{}:{schema}", trigger.len(), r.close.len(), r.close, r.separator.len(), r.separator),
            },
        };
        Sha256::digest(text.as_bytes()).into()
    }

    /// The grammar, with JSON written compactly (`{"a":1,"b":[2]}`, as OpenAI's structured
    /// outputs are): no whitespace between tokens, so a sequence cannot wander in blank space.
    fn grammar(&self) -> TopLevelGrammar {
        let mut schema = match self {
            GrammarSpec::JsonObject => serde_json::json!({ "type": "object" }),
            GrammarSpec::JsonSchema(s) | GrammarSpec::Lazy { schema: s, .. } => {
                let mut s = s.clone();
                close_objects(&mut s);
                s
            }
        };
        if let Some(o) = schema.as_object_mut() {
            o.insert(
                "x-guidance".into(),
                serde_json::json!({ "whitespace_flexible": false, "item_separator": ",", "key_separator": ":" }),
            );
        }
        match self {
            // value (separator value)* close, in llguidance's Lark dialect.
            GrammarSpec::Lazy { repeat: Some(r), .. } => {
                let quote = |t: &str| serde_json::Value::String(t.to_string()).to_string();
                TopLevelGrammar::from_lark(format!(
                    "start: value ({} value)* {}\nvalue: %json {schema}\n",
                    quote(&r.separator),
                    quote(&r.close)
                ))
            }
            _ => TopLevelGrammar::from_json_schema(schema),
        }
    }
}

/// A token that is only whitespace (and not empty: special tokens have no bytes).
fn is_whitespace(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.iter().all(u8::is_ascii_whitespace)
}

/// Objects that list their `properties` and say nothing of others get
/// `additionalProperties: false`, as llama.cpp's schema converter does: the properties a
/// schema names are what a caller parses (LangChain's and pydantic's tool and output schemas
/// leave the keyword out), and a model allowed any further key can wander in made-up keys
/// until `max_tokens` instead of closing the object. A schema that says
/// `additionalProperties` (or `patternProperties`) keeps its own rule.
fn close_objects(schema: &mut serde_json::Value) {
    let Some(node) = schema.as_object_mut() else { return };
    let open = ["additionalProperties", "patternProperties", "unevaluatedProperties"];
    if node.contains_key("properties") && !open.iter().any(|k| node.contains_key(*k)) {
        node.insert("additionalProperties".into(), serde_json::Value::Bool(false));
    }
    for (key, value) in node.iter_mut() {
        match key.as_str() {
            // Maps of name → schema.
            "properties" | "patternProperties" | "$defs" | "definitions" | "dependentSchemas" => {
                if let Some(map) = value.as_object_mut() {
                    map.values_mut().for_each(close_objects);
                }
            }
            // Lists of schemas.
            "anyOf" | "oneOf" | "allOf" | "prefixItems" => {
                if let Some(list) = value.as_array_mut() {
                    list.iter_mut().for_each(close_objects);
                }
            }
            // One schema.
            "items" | "additionalProperties" | "unevaluatedProperties" | "not" | "if" | "then" | "else"
            | "contains" | "propertyNames" => close_objects(value),
            _ => {}
        }
    }
}

/// The vocabulary as llguidance sees it: the trie of token bytes, and our tokenizer for
/// the text it needs tokenized.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        match std::str::from_utf8(s).ok().map(|t| self.tokenizer.encode_plain(t)) {
            Some(Ok(ids)) => ids,
            _ => self.trie.greedy_tokenize(s),
        }
    }
}

/// One model's grammar compiler and its cache of compiled grammars.
pub struct Grammars {
    factory: ParserFactory,
    /// The vocabulary (token bytes, tokenizer), for lazy constraints.
    env: llguidance::toktrie::TokEnv,
    /// The tokens that are only whitespace (allowed between a lazy trigger and its call).
    whitespace: Arc<SimpleVob>,
    /// Fresh (nothing consumed) matchers by spec hash, with a use counter for eviction.
    cache: Mutex<HashMap<[u8; 32], (u64, Matcher)>>,
    uses: std::sync::atomic::AtomicU64,
    vocab_size: usize,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars").field("vocab_size", &self.vocab_size).finish()
    }
}

impl Grammars {
    /// Builds the token trie (tens of milliseconds for a 50k vocabulary): call it off the
    /// engine thread, once per model.
    pub fn new(tokenizer: &Tokenizer) -> Result<Self> {
        let eos = tokenizer.eos_token_ids();
        let first_eos = *eos.first().ok_or_else(|| EngineError::Internal("the model has no end-of-sequence token".into()))?;
        let vocab_size = tokenizer.vocab_size();
        let info = TokRxInfo::new(vocab_size as u32, first_eos);
        let trie = TokTrie::from(&info, &tokenizer.token_bytes()).with_eos_tokens(eos);
        let env: llguidance::toktrie::TokEnv = Arc::new(Vocabulary { trie, tokenizer: tokenizer.clone() });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| EngineError::Internal(format!("grammar engine: {e}")))?;
        factory.quiet();
        let mut whitespace = SimpleVob::alloc(vocab_size);
        for id in 0..vocab_size as u32 {
            if is_whitespace(env.tok_trie().token(id)) {
                whitespace.allow_token(id);
            }
        }
        let whitespace = Arc::new(whitespace);
        Ok(Self { factory, env, whitespace, cache: Mutex::new(HashMap::new()), uses: Default::default(), vocab_size })
    }

    /// A fresh constraint for one sequence. Compiling a schema takes from microseconds to
    /// tens of milliseconds; a spec seen before comes from the cache. A schema llguidance
    /// cannot compile is an `InvalidRequest` naming what it refused.
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint> {
        let key = spec.key();
        let n = self.uses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let lazy = match spec {
            GrammarSpec::Lazy { trigger, .. } => {
                Some(Lazy {
                    trigger: trigger.as_bytes().to_vec(),
                    seen: Vec::new(),
                    armed: false,
                    given_up: false,
                    started: false,
                    env: self.env.clone(),
                    whitespace: self.whitespace.clone(),
                })
            }
            _ => None,
        };
        if let Some((used, m)) = self.lock().get_mut(&key) {
            *used = n;
            return Ok(Constraint { matcher: m.deep_clone(), vocab_size: self.vocab_size, lazy, prepared: None });
        }
        let parser = self.factory.create_parser(spec.grammar()).map_err(|e| invalid_schema(&e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(invalid_schema(&e));
        }
        let mut cache = self.lock();
        if cache.len() >= CACHE_ENTRIES {
            if let Some(oldest) = cache.iter().min_by_key(|(_, (used, _))| *used).map(|(k, _)| *k) {
                cache.remove(&oldest);
            }
        }
        cache.insert(key, (n, matcher.deep_clone()));
        Ok(Constraint { matcher, vocab_size: self.vocab_size, lazy, prepared: None })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], (u64, Matcher)>> {
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn invalid_schema(message: &str) -> EngineError {
    // llguidance's messages name the keyword ("Unimplemented keys: [\"not\"]").
    let first = message.lines().next().unwrap_or(message);
    EngineError::InvalidRequest(format!("the response format's schema is not supported: {first}"))
}

/// One sequence's grammar state.
pub struct Constraint {
    matcher: Matcher,
    vocab_size: usize,
    /// For a lazy grammar: whether it has engaged yet.
    lazy: Option<Lazy>,
    /// The next step's allowed tokens, computed ahead by [`Constraint::prepare`] (`None`
    /// inside: no restriction, a lazy grammar not engaged yet).
    prepared: Option<Result<Option<SimpleVob>>>,
}

/// A lazy grammar's state before and after its trigger.
#[derive(Clone)]
struct Lazy {
    trigger: Vec<u8>,
    /// The output's bytes so far, until the trigger is found (then dropped).
    seen: Vec<u8>,
    armed: bool,
    /// What followed the trigger was not the grammar's start: the output stays free text.
    given_up: bool,
    /// The grammar has taken a token: whitespace between the trigger and the call (the
    /// tool prompt writes `<tool_call>\n{…}`) is over.
    started: bool,
    env: llguidance::toktrie::TokEnv,
    whitespace: Arc<SimpleVob>,
}

impl Lazy {
    fn engaged(&self) -> bool {
        self.armed && !self.given_up
    }
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("stopped", &self.matcher.is_stopped()).finish()
    }
}

impl Clone for Constraint {
    fn clone(&self) -> Self {
        Self { matcher: self.matcher.deep_clone(), vocab_size: self.vocab_size, lazy: self.lazy.clone(), prepared: None }
    }
}

impl Constraint {
    /// Sets every token the grammar does not allow next to -inf in `logits` (nothing, for a
    /// lazy grammar not yet engaged). An error (the grammar cannot go on) ends the sequence.
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        let allowed = match self.prepared.take() {
            Some(prepared) => prepared?,
            None => self.allowed()?,
        };
        let Some(allowed) = allowed else { return Ok(()) };
        let n = logits.len().min(self.vocab_size).min(allowed.len());
        allowed.iter_unset_entries(|id| {
            if id < n {
                logits[id] = f32::NEG_INFINITY;
            }
        });
        logits[n..].fill(f32::NEG_INFINITY);
        Ok(())
    }

    /// Computes the next step's mask ahead of [`Constraint::mask`]: it depends only on the
    /// tokens committed so far, so the batcher runs this beside the step's forward pass.
    pub fn prepare(&mut self) {
        self.prepared = Some(self.allowed());
    }

    /// The tokens the grammar allows next; `None` for a lazy grammar not engaged yet.
    fn allowed(&mut self) -> Result<Option<SimpleVob>> {
        if self.lazy.as_ref().is_some_and(|l| !l.engaged()) {
            return Ok(None);
        }
        let mut allowed = self.matcher.compute_mask_or_eos().map_err(|e| EngineError::Internal(format!("grammar: {e}")))?;
        // Right after a lazy grammar's trigger, whitespace may still come before the call.
        if let Some(lazy) = self.lazy.as_ref().filter(|l| !l.started) {
            allowed.or(&lazy.whitespace);
        }
        Ok(Some(allowed))
    }

    /// The output is complete: nothing may follow but the end.
    pub fn is_complete(&self) -> bool {
        self.lazy.as_ref().is_none_or(Lazy::engaged) && self.matcher.is_stopped()
    }

    /// Advances the grammar past a sampled token. A lazy grammar watches for its trigger
    /// and, once it appears, takes what follows it in the output (leading whitespace aside).
    pub fn commit(&mut self, token: u32) -> Result<()> {
        self.prepared = None;
        let grammar_err = |e: String| EngineError::Internal(format!("grammar: {e}"));
        if let Some(lazy) = self.lazy.as_mut().filter(|l| l.engaged()) {
            if !lazy.started && lazy.whitespace.is_allowed(token) {
                return Ok(());
            }
            lazy.started = true;
        }
        let Some(lazy) = self.lazy.as_mut().filter(|l| !l.armed || l.given_up) else {
            return self.matcher.consume_token(token).map_err(|e| grammar_err(e.to_string()));
        };
        if lazy.given_up {
            return Ok(());
        }
        lazy.seen.extend_from_slice(lazy.env.tok_trie().token(token));
        let Some(at) = lazy.seen.windows(lazy.trigger.len()).position(|w| w == lazy.trigger.as_slice()) else {
            // Keep only what could still begin the trigger.
            let keep = lazy.trigger.len().saturating_sub(1);
            if lazy.seen.len() > keep {
                lazy.seen.drain(..lazy.seen.len() - keep);
            }
            return Ok(());
        };
        lazy.armed = true;
        let rest: Vec<u8> = lazy.seen[at + lazy.trigger.len()..].to_vec();
        lazy.seen = Vec::new();
        let start = rest.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(rest.len());
        if start < rest.len() {
            let ids = lazy.env.tokenize_bytes(&rest[start..]);
            let fits = ids.iter().all(|&id| self.matcher.consume_token(id).is_ok());
            lazy.started = true;
            if !fits {
                lazy.given_up = true;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::close_objects;
    use serde_json::json;

    #[test]
    fn objects_with_properties_are_closed_unless_they_say_otherwise() {
        let mut s = json!({
            "type": "object",
            "properties": {
                "properties": {"type": "object", "properties": {"a": {"type": "integer"}}},
                "open": {"type": "object", "properties": {"b": {}}, "additionalProperties": true},
                "list": {"type": "array", "items": {"type": "object", "properties": {"c": {}}}},
                "any": {"anyOf": [{"type": "object", "properties": {"d": {}}}, {"type": "null"}]},
                "free": {"type": "object"},
            },
            "$defs": {"X": {"type": "object", "properties": {"e": {}}}},
        });
        close_objects(&mut s);
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["properties"]["properties"]["additionalProperties"], false);
        let names = &s["properties"]["properties"]["properties"];
        assert!(names.get("additionalProperties").is_none(), "a map of names is not a schema: {names}");
        assert_eq!(s["properties"]["open"]["additionalProperties"], true);
        assert_eq!(s["properties"]["list"]["items"]["additionalProperties"], false);
        assert_eq!(s["properties"]["any"]["anyOf"][0]["additionalProperties"], false);
        assert!(s["properties"]["free"].get("additionalProperties").is_none(), "no properties: any object");
        assert_eq!(s["$defs"]["X"]["additionalProperties"], false);
    }
}
