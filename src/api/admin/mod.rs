//! Admin routes (admin key scope): the vLLM-compatible LoRA adapter endpoints and the
//! review API over request logs (`logs`). Their wire
//! types are vLLM's, not OpenAI's, so they live in `admin::types`.

pub mod adapters;
pub mod logs;
pub mod overview;
pub mod types;
