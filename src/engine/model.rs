//! Model code (stub; being written).

/// The base model's dimensions, which adapters are checked against.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelShape {
    pub architecture: String,
    pub base_name: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// GGUF Llama files store q/k rows permuted for interleaved RoPE; PEFT adapters use the
    /// Hugging Face order, so their q/k `lora_B` rows are permuted on load.
    pub qk_interleaved: bool,
}

pub struct Model;
