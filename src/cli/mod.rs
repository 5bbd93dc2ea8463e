//! The command-line verbs that are more than "start the server": `generate` (one prompt
//! through the engine, for humans) and `model fetch` (put the default model in place).
//! `main.rs` parses arguments and calls these.

pub mod fetch;
pub mod generate;
