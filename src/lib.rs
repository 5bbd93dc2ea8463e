//! tunegate: an OpenAI-compatible inference gateway that fine-tunes itself.
//! This file only lists the modules; the README's sections and each module's header say
//! what each one owns.

pub mod adapters;
pub mod api;
pub mod cli;
pub mod config;
pub mod engine;
#[cfg(any(test, feature = "testing"))]
#[doc(hidden)]
pub mod fuzz;
pub mod gateway;
pub mod logs;
pub mod metrics;
pub mod router;
pub mod scheduler;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod training;
pub mod upstream;
