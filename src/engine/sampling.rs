//! Sampling (stub; being written).
