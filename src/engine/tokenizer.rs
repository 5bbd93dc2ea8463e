//! Tokenizers, from a GGUF file's metadata (llama.cpp's `tokenizer.ggml.*` keys) or from a Hugging
//! Face folder (`tokenizer.json` and its sidecar configs). Either way the result is a
//! `tokenizers::Tokenizer`, so splitting, merging and decoding are the Hugging Face library's; this
//! module only translates a vocabulary into that library's parts, marks special tokens, and works
//! out which ids end a generation. Chat formatting belongs in `chat_template`; incremental
//! (streaming) detokenization belongs with the batcher (`batcher.rs`).

mod gguf;
mod tiny;

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};
use tokenizers::AddedToken;

pub use self::gguf::byte_level_char;
use self::gguf::{
    byte_level_tokenizer, md_bool, md_u32, sentencepiece_tokenizer, GgufVocab, TYPE_CONTROL,
    TYPE_UNKNOWN, TYPE_USER_DEFINED,
};
pub use self::tiny::{tiny_gguf_vocab, TinyVocab, SMOLLM2_CHAT_TEMPLATE};
use super::{EngineError, Result};

/// Special tokens that end a turn in common chat formats. They stop generation when the vocabulary
/// has them as special tokens, whatever the model's single `eos` id says (llama.cpp does the same).
const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "<EOT>",
    "<｜end▁of▁sentence｜>",
];

/// A text tokenizer plus what generation needs to know about its special tokens.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The same tokenizer with special tokens' text treated as text, for untrusted content
    /// that spells one; built the first time such text comes (a second copy of a 262k-token
    /// vocabulary is ~40 MiB, and text without special tokens encodes the same either way).
    plain: std::sync::OnceLock<tokenizers::Tokenizer>,
    /// The text of every special token (`<|im_start|>`, …).
    special_texts: Vec<String>,
    eos_ids: Vec<u32>,
    bos: Option<String>,
    eos: Option<String>,
    vocab_size: usize,
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes (`tokenizer.ggml.model` "gpt2" or "llama").
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Self> {
        let v = GgufVocab::read(md)?;
        let (mut inner, default_add_bos) = match v.model.as_str() {
            "gpt2" => (byte_level_tokenizer(&v)?, false),
            "llama" => (sentencepiece_tokenizer(&v)?, true),
            other => {
                return Err(tok_err(format!(
                    "unsupported tokenizer.ggml.model {other:?} (supported: \"gpt2\", \"llama\")"
                )))
            }
        };
        let specials: Vec<AddedToken> = v
            .typed(&[TYPE_UNKNOWN, TYPE_CONTROL])
            .map(|t| AddedToken::from(t, true).normalized(false))
            .collect();
        inner.add_special_tokens(specials).map_err(|e| EngineError::Tokenizer(e.to_string()))?;
        let user: Vec<AddedToken> = v
            .typed(&[TYPE_USER_DEFINED])
            .map(|t| AddedToken::from(t, false).normalized(false))
            .collect();
        inner.add_tokens(user).map_err(|e| EngineError::Tokenizer(e.to_string()))?;

        let token = |id: Option<u32>| id.and_then(|i| v.tokens.get(i as usize)).cloned();
        let (bos, eos) = (token(v.bos), token(v.eos));
        let add_bos = md_bool(md, "tokenizer.ggml.add_bos_token").unwrap_or(default_add_bos);
        let add_eos = md_bool(md, "tokenizer.ggml.add_eos_token").unwrap_or(false);
        let bos_pair = bos.clone().zip(v.bos).filter(|_| add_bos);
        let eos_pair = eos.clone().zip(v.eos).filter(|_| add_eos);
        if let Some(pp) = post_processor(bos_pair, eos_pair)? {
            inner.with_post_processor(Some(pp));
        }
        let stop = [
            v.eos,
            md_u32(md, "tokenizer.ggml.eot_token_id"),
            md_u32(md, "tokenizer.ggml.eom_token_id"),
        ];
        let eos_ids = end_of_generation_ids(stop.into_iter().flatten(), &inner);
        let vocab_size = v.tokens.len().max(inner.get_vocab_size(true));
        Ok(Self::assemble(inner, eos_ids, bos, eos, vocab_size))
    }

    /// A Hugging Face folder: `tokenizer.json`, with `tokenizer_config.json` for the bos/eos
    /// tokens and chat template, and `generation_config.json` / `config.json` for extra
    /// `eos_token_id`s (one id or a list). Returns the chat template source if found
    /// (`chat_template.jinja` wins over tokenizer_config.json, as in transformers).
    pub fn from_hf_dir(dir: &Path) -> Result<(Self, Option<String>)> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| tok_err(format!("cannot load {}: {e}", path.display())))?;
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or_default();
        let jinja = dir.join("chat_template.jinja");
        let template = if jinja.is_file() {
            Some(
                std::fs::read_to_string(&jinja)
                    .map_err(|e| tok_err(format!("cannot read {}: {e}", jinja.display())))?,
            )
        } else {
            config_chat_template(config.get("chat_template"))?
        };

        let mut bos = special_token_text(config.get("bos_token"));
        let mut eos = special_token_text(config.get("eos_token"));
        let mut stop: Vec<u32> = eos
            .as_deref()
            .and_then(|t| inner.token_to_id(t))
            .into_iter()
            .collect();
        for file in ["generation_config.json", "config.json"] {
            let Some(cfg) = read_json(&dir.join(file))? else {
                continue;
            };
            let eos_ids = id_list(cfg.get("eos_token_id"));
            // Older folders name their special tokens only by id.
            let text = |ids: &[u32]| ids.first().and_then(|&id| inner.id_to_token(id));
            bos = bos.or_else(|| text(&id_list(cfg.get("bos_token_id"))));
            eos = eos.or_else(|| text(&eos_ids));
            stop.extend(eos_ids);
        }
        let eos_ids = end_of_generation_ids(stop, &inner);
        let vocab_size = inner.get_vocab_size(true);
        Ok((
            Self::assemble(inner, eos_ids, bos, eos, vocab_size),
            template,
        ))
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        eos_ids: Vec<u32>,
        bos: Option<String>,
        eos: Option<String>,
        vocab_size: usize,
    ) -> Self {
        let mut special_texts: Vec<String> =
            inner.get_added_tokens_decoder().values().filter(|t| t.special).map(|t| t.content.clone()).collect();
        special_texts.sort();
        Self { inner, plain: std::sync::OnceLock::new(), special_texts, eos_ids, bos, eos, vocab_size }
    }

    /// Whether `text` spells any special token (which [`Tokenizer::encode`] would turn into
    /// its id).
    pub fn has_special_text(&self, text: &str) -> bool {
        self.special_texts.iter().any(|t| !t.is_empty() && text.contains(t.as_str()))
    }

    /// Encodes untrusted text: special tokens written in it stay text ("<|im_start|>" is
    /// several ordinary tokens), and nothing is added.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let tokenizer = if self.has_special_text(text) {
            self.plain.get_or_init(|| {
                let mut plain = self.inner.clone();
                plain.set_encode_special_tokens(true);
                plain
            })
        } else {
            &self.inner
        };
        let enc = tokenizer.encode_fast(text, false).map_err(|e| tok_err(format!("cannot encode text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Special tokens written in `text` (e.g. "<|im_start|>") become their single ids.
    /// `add_special_tokens` prepends BOS (and appends EOS) when the model says so.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| tok_err(format!("cannot encode text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Exact text back for ids from `encode`; special tokens are dropped when
    /// `skip_special_tokens`. Ids outside the vocabulary are an error, not silently skipped.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(tok_err(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.vocab_size
            )));
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| tok_err(format!("cannot decode ids: {e}")))
    }

    /// Every id that ends generation: the model's eos plus end-of-turn special tokens it has.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_deref()
    }

    /// Number of ids, added tokens included (for a GGUF, the length of its token list).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of a token written as the vocabulary spells it (special tokens as their text).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Each id's bytes as the model reads them (what a grammar matches generated text
    /// against): byte-level BPE tokens respelled from GPT-2's byte alphabet, SentencePiece
    /// pieces with `▁` as a space and `<0xNN>` as that byte, added tokens as their text, and
    /// special tokens as their text behind 0xFF (toktrie's marker, which no text contains).
    /// Ids without a token get no bytes.
    pub fn token_bytes(&self) -> Vec<Vec<u8>> {
        let byte_level = self
            .inner
            .get_decoder()
            .and_then(|d| serde_json::to_string(d).ok())
            .is_some_and(|d| d.contains("ByteLevel"));
        let alphabet: HashMap<char, u8> = (0..=255u8).map(|b| (gguf::byte_level_char(b), b)).collect();
        let added = self.inner.get_added_tokens_decoder();
        (0..self.vocab_size as u32)
            .map(|id| {
                if let Some(t) = added.get(&id) {
                    let marker = if t.special { vec![0xFF] } else { Vec::new() };
                    return [marker, t.content.as_bytes().to_vec()].concat();
                }
                let Some(tok) = self.inner.id_to_token(id) else { return Vec::new() };
                if byte_level {
                    return tok.chars().map(|c| alphabet.get(&c).copied()).collect::<Option<Vec<u8>>>().unwrap_or_else(|| tok.into_bytes());
                }
                let hex = tok.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')).filter(|h| h.len() == 2);
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => vec![b],
                    None => tok.replace('\u{2581}', " ").into_bytes(),
                }
            })
            .collect()
    }
}

fn tok_err(msg: impl Into<String>) -> EngineError {
    EngineError::Tokenizer(msg.into())
}

fn post_processor(
    bos: Option<(String, u32)>,
    eos: Option<(String, u32)>,
) -> Result<Option<TemplateProcessing>> {
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    // Template pieces are labels; the token text lives in `SpecialToken`, so odd characters in a
    // token cannot break the template syntax.
    let (b, e) = (bos.is_some(), eos.is_some());
    let mut single = Vec::new();
    let mut specials = Vec::new();
    if let Some((text, id)) = bos {
        single.push("bos");
        specials.push(
            SpecialToken::new("bos".into(), vec![id], vec![text])
                .map_err(|e| tok_err(e.to_string()))?,
        );
    }
    single.push("$A");
    if let Some((text, id)) = eos {
        single.push("eos");
        specials.push(
            SpecialToken::new("eos".into(), vec![id], vec![text])
                .map_err(|e| tok_err(e.to_string()))?,
        );
    }
    let mut pair = single.clone();
    pair.extend(
        b.then_some("bos:1")
            .into_iter()
            .chain(["$B:1"])
            .chain(e.then_some("eos:1")),
    );
    TemplateProcessing::builder()
        .try_single(single)
        .and_then(|b| b.try_pair(pair))
        .map_err(tok_err)?
        .special_tokens(specials)
        .build()
        .map(Some)
        .map_err(|e| tok_err(format!("cannot build the BOS/EOS post-processor: {e}")))
}

/// `stop` in order, then end-of-turn tokens the vocabulary has as special tokens; no duplicates.
fn end_of_generation_ids(
    stop: impl IntoIterator<Item = u32>,
    tk: &tokenizers::Tokenizer,
) -> Vec<u32> {
    let added = tk.get_added_tokens_decoder();
    let special = |name: &str| {
        added
            .iter()
            .find(|(_, t)| t.special && t.content == name)
            .map(|(id, _)| *id)
    };
    let mut ids: Vec<u32> = Vec::new();
    for id in stop
        .into_iter()
        .chain(END_OF_TURN_TOKENS.iter().filter_map(|n| special(n)))
    {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

fn read_json(path: &Path) -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| tok_err(format!("cannot read {}: {e}", path.display())))?;
    match serde_json::from_str(&text) {
        Ok(serde_json::Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(tok_err(format!("{} is not a JSON object", path.display()))),
        Err(e) => Err(tok_err(format!(
            "{} is not valid JSON: {e}",
            path.display()
        ))),
    }
}

/// `"<s>"` or `{"content": "<s>", ...}` (transformers' serialized AddedToken).
fn special_token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// A string, or a list of `{name, template}` of which "default" is the chat template.
fn config_chat_template(v: Option<&serde_json::Value>) -> Result<Option<String>> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(list)) => Ok(list
            .iter()
            .find(|e| e.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|e| e.get("template")?.as_str().map(str::to_string))),
        Some(_) => Err(tok_err(
            "tokenizer_config.json: chat_template should be a string or a list",
        )),
    }
}

/// `eos_token_id` as one id or a list of ids.
fn id_list(v: Option<&serde_json::Value>) -> Vec<u32> {
    let one = |x: &serde_json::Value| x.as_u64().and_then(|n| u32::try_from(n).ok());
    match v {
        Some(serde_json::Value::Array(items)) => items.iter().filter_map(one).collect(),
        Some(x) => one(x).into_iter().collect(),
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests;
