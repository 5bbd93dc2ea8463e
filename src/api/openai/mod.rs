//! The OpenAI-compatible endpoints: wire types (`types`), wire → engine conversion
//! (`convert`), one handler module per resource, and what the handlers share (`generation`,
//! `stream`), and `proxy`, which forwards requests for upstream engines' models. Handlers stay
//! thin: extract, convert, call, map.

pub mod chat;
pub mod completions;
pub mod convert;
pub mod embeddings;
pub mod feedback;
pub mod files;
pub mod fine_tuning;
pub mod generation;
pub mod models;
pub mod proxy;
pub mod responses;
pub mod stored;
pub mod stream;
pub mod tools;
pub mod types;
