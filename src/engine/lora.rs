//! Per-sequence LoRA deltas (stub; being written).

#[derive(Debug, Default)]
pub struct LoraWeights;
