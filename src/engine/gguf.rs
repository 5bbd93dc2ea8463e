//! GGUF loading helpers (stub; being written).
