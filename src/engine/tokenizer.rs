//! Tokenizers from GGUF metadata or `tokenizer.json` (stub; being written).

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file;

use super::Result;

#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    pub fn from_gguf(_md: &HashMap<String, gguf_file::Value>) -> Result<Self> {
        todo!()
    }
    pub fn from_hf_dir(_dir: &Path) -> Result<(Self, Option<String>)> {
        todo!()
    }
    pub fn encode(&self, _text: &str, _add_special_tokens: bool) -> Result<Vec<u32>> {
        todo!()
    }
    pub fn decode(&self, _ids: &[u32], _skip_special_tokens: bool) -> Result<String> {
        todo!()
    }
    pub fn eos_token_ids(&self) -> &[u32] {
        todo!()
    }
    pub fn bos_token(&self) -> Option<&str> {
        todo!()
    }
    pub fn eos_token(&self) -> Option<&str> {
        todo!()
    }
    pub fn vocab_size(&self) -> usize {
        todo!()
    }
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

#[doc(hidden)]
pub struct TinyVocab {
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    pub token_types: Vec<i32>,
    pub bos_id: u32,
    pub eos_id: u32,
    pub chat_template: String,
}

#[doc(hidden)]
pub fn tiny_gguf_vocab() -> TinyVocab {
    todo!()
}
