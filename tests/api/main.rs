//! HTTP integration tests: each starts the real gateway on port 0 with a tiny random model
//! and drives it over HTTP. One test binary (modules below) to link once.

mod adapters;
mod chat;
mod common;
mod cors;
mod crash;
mod embeddings;
mod errors;
mod metrics;
mod logs;
mod node;
mod python;
mod real_model;
mod responses;
mod security;
mod structured;
mod ui;
mod upstream;
