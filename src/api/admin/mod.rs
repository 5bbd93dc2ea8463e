//! Admin routes (admin key scope): the vLLM-compatible LoRA adapter endpoints. Their wire
//! types are vLLM's, not OpenAI's, so they live in `admin::types`.

pub mod adapters;
pub mod types;
