//! tunegate: an OpenAI-compatible inference gateway that fine-tunes itself.
//! This file only lists the modules; the README's sections and each module's header say
//! what each one owns.

pub mod adapters;
pub mod api;
pub mod cli;
pub mod config;
pub mod engine;
#[doc(hidden)]
pub mod fuzz;
pub mod logs;
pub mod metrics;
pub mod router;
pub mod scheduler;
pub mod training;
