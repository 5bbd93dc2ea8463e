//! GGUF vocabularies (llama.cpp's `tokenizer.ggml.*` keys) turned into `tokenizers` parts:
//! byte-level BPE ("gpt2") with the pre-tokenizer `tokenizer.ggml.pre` names, and
//! SentencePiece-style BPE ("llama") with merges from the file or derived from the scores.
//! Special-token marking and the public `Tokenizer` live in the parent module.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{Vocab as BpeVocab, BPE};
use tokenizers::normalizers::{replace::Replace, unicode::NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::tok_err;
use crate::engine::Result;

/// llama.cpp token types (`tokenizer.ggml.token_type`).
pub(super) const TYPE_NORMAL: i32 = 1;
pub(super) const TYPE_UNKNOWN: i32 = 2;
pub(super) const TYPE_CONTROL: i32 = 3;
pub(super) const TYPE_USER_DEFINED: i32 = 4;

/// The Llama 3 split regex (llama.cpp pre-type "llama-bpe").
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex: Llama 3's with single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The `tokenizer.ggml.*` values this module uses, read and type-checked once.
pub(super) struct GgufVocab {
    pub(super) model: String,
    pub(super) pre: Option<String>,
    pub(super) tokens: Vec<String>,
    /// One per token; absent in the file means all normal.
    pub(super) types: Vec<i32>,
    pub(super) scores: Option<Vec<f32>>,
    pub(super) merges: Option<Vec<String>>,
    pub(super) bos: Option<u32>,
    pub(super) eos: Option<u32>,
    pub(super) unk: Option<u32>,
    pub(super) add_space_prefix: Option<bool>,
}

impl GgufVocab {
    pub(super) fn read(md: &HashMap<String, Value>) -> Result<Self> {
        let model = md_string(md, "tokenizer.ggml.model")?.ok_or_else(|| {
            tok_err("the GGUF file has no tokenizer (key tokenizer.ggml.model is missing)")
        })?;
        let tokens = md_array(md, "tokenizer.ggml.tokens", |v| v.to_string().ok().cloned())?
            .ok_or_else(|| tok_err("the GGUF file has no tokenizer.ggml.tokens"))?;
        let types = md_array(md, "tokenizer.ggml.token_type", |v| {
            as_i64(v).and_then(|x| i32::try_from(x).ok())
        })?
        .unwrap_or_else(|| vec![TYPE_NORMAL; tokens.len()]);
        if types.len() != tokens.len() {
            return Err(tok_err(format!(
                "tokenizer.ggml.token_type has {} entries for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let scores = md_array(md, "tokenizer.ggml.scores", |v| match v {
            Value::F32(x) => Some(*x),
            Value::F64(x) => Some(*x as f32),
            _ => None,
        })?;
        if let Some(s) = &scores {
            if s.len() != tokens.len() {
                return Err(tok_err(format!(
                    "tokenizer.ggml.scores has {} entries for {} tokens",
                    s.len(),
                    tokens.len()
                )));
            }
        }
        let merges = md_array(md, "tokenizer.ggml.merges", |v| v.to_string().ok().cloned())?;
        let id = |key: &str| -> Result<Option<u32>> {
            match md_u32(md, key) {
                Some(i) if i as usize >= tokens.len() => Err(tok_err(format!(
                    "{key} = {i} is outside the vocabulary (size {})",
                    tokens.len()
                ))),
                other => Ok(other),
            }
        };
        Ok(Self {
            model: model.to_string(),
            pre: md_string(md, "tokenizer.ggml.pre")?.map(str::to_string),
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            add_space_prefix: md_bool(md, "tokenizer.ggml.add_space_prefix"),
            tokens,
            types,
            scores,
            merges,
        })
    }

    /// Tokens of the given types, in id order.
    pub(super) fn typed<'a>(&'a self, kinds: &'a [i32]) -> impl Iterator<Item = &'a String> + 'a {
        self.tokens
            .iter()
            .zip(&self.types)
            .filter(|(_, t)| kinds.contains(t))
            .map(|(s, _)| s)
    }

    fn parsed_merges(&self) -> Result<Option<Vec<(String, String)>>> {
        let Some(merges) = &self.merges else {
            return Ok(None);
        };
        merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        tok_err(format!(
                            "merge {m:?} is not two tokens separated by a space"
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

/// Byte-level BPE (GPT-2 family). Normal tokens are spelled in GPT-2's byte alphabet; special and
/// user-defined ones are stored as their raw text and matched as added tokens.
pub(super) fn byte_level_tokenizer(v: &GgufVocab) -> Result<tokenizers::Tokenizer> {
    let merges = v
        .parsed_merges()?
        .ok_or_else(|| tok_err("a gpt2 tokenizer needs tokenizer.ggml.merges"))?;
    let alphabet = ByteLevel::alphabet();
    let vocab: BpeVocab = v
        .tokens
        .iter()
        .zip(&v.types)
        .enumerate()
        .map(|(id, (tok, &ty))| {
            // A normal token outside the byte alphabet is mislabelled raw text: respell it.
            let spelled = if ty == TYPE_NORMAL && !tok.chars().all(|c| alphabet.contains(&c)) {
                tok.bytes().map(byte_level_char).collect()
            } else {
                tok.clone()
            };
            (spelled, id as u32)
        })
        .collect();
    let pre = v.pre.as_deref().unwrap_or("default");
    let llama3 = matches!(
        pre,
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" | "falcon3" | "dbrx"
    );
    let model = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(llama3)
        .build()
        .map_err(|e| tok_err(format!("invalid byte-level BPE vocabulary: {e}")))?;
    let mut tk = tokenizers::Tokenizer::new(model);
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(
            SplitPattern::Regex(re.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| tok_err(format!("bad split regex: {e}")))?;
        Ok(PreSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into())
    };
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        "smollm" => PreSequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])
        .into(),
        _ if llama3 => split(LLAMA3_SPLIT)?,
        "qwen2" | "deepseek-r1-qwen" => {
            tk.with_normalizer(Some(NFC)).map_err(|e| tok_err(e.to_string()))?;
            split(QWEN2_SPLIT)?
        }
        "default" | "gpt-2" | "gpt2" => ByteLevel::new(false, true, true).into(),
        other => {
            tracing::warn!(
                pre = other,
                "unknown tokenizer.ggml.pre; splitting text as GPT-2 does"
            );
            ByteLevel::new(false, true, true).into()
        }
    };
    tk.with_pre_tokenizer(Some(pre_tokenizer));
    tk.with_decoder(Some(ByteLevel::default()));
    Ok(tk)
}

/// SentencePiece-style BPE ("llama"): `▁` marks spaces, `<0xNN>` tokens spell bytes the vocabulary
/// lacks. Merges come from the file, or are derived from the scores as Hugging Face's converter
/// does: each normal token splits into two known pieces, ranked by the token's score.
pub(super) fn sentencepiece_tokenizer(v: &GgufVocab) -> Result<tokenizers::Tokenizer> {
    let merges = match v.parsed_merges()? {
        Some(m) => m,
        None => merges_from_scores(v)?,
    };
    let vocab: BpeVocab = v
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = v.unk.and_then(|i| v.tokens.get(i as usize)) {
        builder = builder.unk_token(unk.clone());
    }
    let model = builder
        .build()
        .map_err(|e| tok_err(format!("invalid SentencePiece vocabulary: {e}")))?;
    let mut tk = tokenizers::Tokenizer::new(model);
    let prefix = v.add_space_prefix.unwrap_or(true);
    let scheme = if prefix {
        PrependScheme::First
    } else {
        PrependScheme::Never
    };
    tk.with_pre_tokenizer(Some(Metaspace::new('▁', scheme, false)));
    let space = Replace::new("▁", " ").map_err(|e| tok_err(format!("bad decoder: {e}")))?;
    let mut steps: Vec<DecoderWrapper> =
        vec![space.into(), ByteFallback::new().into(), Fuse::new().into()];
    if prefix {
        steps.push(Strip::new(' ', 1, 0).into());
    }
    tk.with_decoder(Some(DecoderSequence::new(steps)));
    Ok(tk)
}

fn merges_from_scores(v: &GgufVocab) -> Result<Vec<(String, String)>> {
    let scores = v.scores.as_ref().ok_or_else(|| {
        tok_err("a llama tokenizer needs tokenizer.ggml.merges or tokenizer.ggml.scores")
    })?;
    // Later duplicates win, as in a Python dict built from the list.
    let ids: HashMap<&str, usize> = v
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    // Control, byte and unused pieces are never produced or consumed by merging.
    let mergeable = |id: usize| matches!(v.types[id], 0 | TYPE_NORMAL | TYPE_USER_DEFINED);
    struct Candidate<'a> {
        score: f32,
        token: usize,
        left: (usize, &'a str),
        right: (usize, &'a str),
    }
    let mut found = Vec::new();
    for (token, text) in v.tokens.iter().enumerate() {
        if !matches!(v.types[token], 0 | TYPE_NORMAL) || ids.get(text.as_str()) != Some(&token) {
            continue;
        }
        for (at, _) in text.char_indices().skip(1) {
            let (l, r) = text.split_at(at);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                if mergeable(li) && mergeable(ri) {
                    found.push(Candidate {
                        score: scores[token],
                        token,
                        left: (li, l),
                        right: (ri, r),
                    });
                }
            }
        }
    }
    // Best score first; ties go to the longer left then right piece, then to vocabulary order.
    found.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then_with(|| b.left.1.chars().count().cmp(&a.left.1.chars().count()))
            .then_with(|| b.right.1.chars().count().cmp(&a.right.1.chars().count()))
            .then_with(|| (a.token, a.left.0, a.right.0).cmp(&(b.token, b.left.0, b.right.0)))
    });
    Ok(found
        .into_iter()
        .map(|c| (c.left.1.to_string(), c.right.1.to_string()))
        .collect())
}

/// GPT-2's printable stand-in for a byte: printable Latin-1 bytes stand for themselves, the
/// rest map, in order, to code points from U+0100.
pub fn byte_level_char(b: u8) -> char {
    let printable = |x: u8| matches!(x, 33..=126 | 161..=172 | 174..=255);
    if printable(b) {
        char::from(b)
    } else {
        let n = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + n).unwrap_or(char::REPLACEMENT_CHARACTER)
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::U8(x) => Some(i64::from(*x)),
        Value::I8(x) => Some(i64::from(*x)),
        Value::U16(x) => Some(i64::from(*x)),
        Value::I16(x) => Some(i64::from(*x)),
        Value::U32(x) => Some(i64::from(*x)),
        Value::I32(x) => Some(i64::from(*x)),
        Value::U64(x) => i64::try_from(*x).ok(),
        Value::I64(x) => Some(*x),
        _ => None,
    }
}

/// Token ids are stored as u32 by llama.cpp but as other integer types by some writers.
pub(super) fn md_u32(md: &HashMap<String, Value>, key: &str) -> Option<u32> {
    md.get(key)
        .and_then(as_i64)
        .and_then(|x| u32::try_from(x).ok())
}

pub(super) fn md_bool(md: &HashMap<String, Value>, key: &str) -> Option<bool> {
    match md.get(key)? {
        Value::Bool(b) => Some(*b),
        other => as_i64(other).map(|x| x != 0),
    }
}

fn md_string<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<Option<&'a str>> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(tok_err(format!(
            "{key} should be a string, found {:?}",
            other.value_type()
        ))),
    }
}

fn md_array<T>(
    md: &HashMap<String, Value>,
    key: &str,
    f: impl Fn(&Value) -> Option<T>,
) -> Result<Option<Vec<T>>> {
    let Some(value) = md.get(key) else {
        return Ok(None);
    };
    let Value::Array(items) = value else {
        return Err(tok_err(format!(
            "{key} should be an array, found {:?}",
            value.value_type()
        )));
    };
    items
        .iter()
        .enumerate()
        .map(|(i, x)| {
            f(x).ok_or_else(|| {
                tok_err(format!(
                    "{key}[{i}] has an unexpected type {:?}",
                    x.value_type()
                ))
            })
        })
        .collect::<Result<Vec<T>>>()
        .map(Some)
}
