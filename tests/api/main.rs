//! HTTP integration tests: each starts the real gateway on port 0 with a tiny random model
//! and drives it over HTTP. One test binary (modules below) to link once.

mod adapters;
mod chat;
mod common;
mod crash;
mod errors;
mod metrics;
mod logs;
mod python;
mod real_model;
mod security;
mod structured;
mod ui;
