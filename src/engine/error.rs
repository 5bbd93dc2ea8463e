//! The engine's error type. Each kind maps to one HTTP status in the API layer.

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("the model is still loading")]
    NotReady,
    #[error("the engine is overloaded: {queued} requests are waiting (limit {limit}); retry later")]
    Overloaded { queued: usize, limit: usize },
    #[error("this request needs {needed} tokens (prompt {prompt} + at least 1 to generate) but the model's context length is {limit}")]
    ContextLength { prompt: usize, needed: usize, limit: usize },
    #[error("{0}")]
    InvalidRequest(String),
    #[error("could not load the model: {0}")]
    Load(String),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("chat template error: {0}")]
    Template(String),
    #[error("internal engine error: {0}")]
    Internal(String),
    #[error("the engine is shutting down")]
    ShuttingDown,
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Internal(e.to_string())
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
