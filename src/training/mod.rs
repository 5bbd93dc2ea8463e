//! Fine-tuning: datasets from approved examples (with optional system-prompt
//! distillation), the LoRA trainer on the engine's model code, and publishing adapters in
//! Hugging Face PEFT layout. Serving and HTTP live elsewhere.

pub mod dataset;
pub mod auto;
pub mod eval;
pub mod pipeline;
pub mod jobs;
pub mod export;
pub mod files;
pub mod trainer;
#[cfg(test)]
mod tests;
