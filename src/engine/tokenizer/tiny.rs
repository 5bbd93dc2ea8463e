//! A tiny byte-level vocabulary for tests elsewhere in the crate that build a small random model
//! (GGUF or safetensors) and need a real tokenizer and chat template to go with it.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;

use super::gguf::{byte_level_char, TYPE_CONTROL, TYPE_NORMAL};

/// A small GPT-2-style byte-level vocabulary for tests that build a tiny model: ids 0-2 are
/// `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (control), then the 256 byte symbols in byte
/// order, then one token per merge. `bos_id`/`eos_id` and the chat template are SmolLM2's.
#[derive(Debug, Clone)]
pub struct TinyVocab {
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    pub token_types: Vec<i32>,
    pub bos_id: u32,
    pub eos_id: u32,
    pub chat_template: String,
}

/// SmolLM2-135M-Instruct's chat template, as its GGUF file stores it.
pub const SMOLLM2_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Common English pairs, in merge order (each right-hand side exists by the time it is used).
const TINY_MERGES: &[&str] = &[
    "Ġ t", "h e", "Ġ a", "i n", "Ġt he", "e r", "o n", "Ġ s", "r e", "a t", "e n", "o r", "Ġ w",
    "Ġ o", "i s", "e s", "n d", "Ġ c", "i t", "a n", "Ġ b", "Ġ f", "Ġ p", "o u", "a r", "Ġ m",
    "l l", "in g", "Ġ h", "e d", "Ġ i", "Ġa nd", "Ġ d", "Ġt o", "Ġo f", "Ġ l", "l o", "Ġ n",
    "Ġi s", "Ġ y", "Ġy ou", "Ġi n", "Ġ H", "H e", "He ll", "Hell o", "l d", "Ġw or", "Ġwor ld",
    "Ċ Ċ", "Ġ Ġ", "u s", "s t", "Ġ T", "ĠT he", "Ġ 1", "a s", "Ġs t", "Ġt h", "Ġth is",
];

#[doc(hidden)]
pub fn tiny_gguf_vocab() -> TinyVocab {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .into();
    let mut token_types = vec![TYPE_CONTROL; 3];
    tokens.extend((0..=255u8).map(|b| byte_level_char(b).to_string()));
    for m in TINY_MERGES {
        tokens.push(m.replace(' ', ""));
    }
    token_types.resize(tokens.len(), TYPE_NORMAL);
    TinyVocab {
        tokens,
        merges: TINY_MERGES.iter().map(|m| m.to_string()).collect(),
        token_types,
        bos_id: 1,
        eos_id: 2,
        chat_template: SMOLLM2_CHAT_TEMPLATE.to_string(),
    }
}

impl TinyVocab {
    /// The `tokenizer.*` GGUF metadata for this vocabulary, as a tiny SmolLM2-like file has it.
    pub fn gguf_metadata(&self) -> HashMap<String, Value> {
        let strings =
            |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
        HashMap::from([
            (
                "tokenizer.ggml.model".to_string(),
                Value::String("gpt2".into()),
            ),
            (
                "tokenizer.ggml.pre".to_string(),
                Value::String("smollm".into()),
            ),
            ("tokenizer.ggml.tokens".to_string(), strings(&self.tokens)),
            ("tokenizer.ggml.merges".to_string(), strings(&self.merges)),
            (
                "tokenizer.ggml.token_type".to_string(),
                Value::Array(self.token_types.iter().map(|&t| Value::I32(t)).collect()),
            ),
            (
                "tokenizer.ggml.bos_token_id".to_string(),
                Value::U32(self.bos_id),
            ),
            (
                "tokenizer.ggml.eos_token_id".to_string(),
                Value::U32(self.eos_id),
            ),
            (
                "tokenizer.ggml.add_bos_token".to_string(),
                Value::Bool(false),
            ),
            (
                "tokenizer.chat_template".to_string(),
                Value::String(self.chat_template.clone()),
            ),
        ])
    }
}
