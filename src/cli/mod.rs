//! The command-line verbs that are more than "start the server": `generate` (one prompt
//! through the engine, for humans), `model fetch` (put the default model in place) and
//! `train` (one fine-tuning job in the foreground), `logs` (review and export from the
//! terminal).
//! `main.rs` parses arguments and calls these.

pub mod adapters;
pub mod fetch;
pub mod generate;
pub mod logs;
pub mod train;
