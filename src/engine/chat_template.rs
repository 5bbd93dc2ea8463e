//! Chat templates (stub; being written).

use std::collections::HashMap;

use candle_core::quantized::gguf_file;

use super::{ChatMessage, Result};

#[derive(Debug)]
pub struct ChatTemplate;

impl ChatTemplate {
    pub fn new(_source: &str, _bos_token: Option<&str>, _eos_token: Option<&str>) -> Result<Self> {
        todo!()
    }
    pub fn from_gguf(_md: &HashMap<String, gguf_file::Value>, _bos_token: Option<&str>, _eos_token: Option<&str>) -> Result<Option<Self>> {
        todo!()
    }
    pub fn render(&self, _messages: &[ChatMessage], _add_generation_prompt: bool) -> Result<String> {
        todo!()
    }
}
