//! Fuzz target: `tunegate::fuzz::Harness::peft_adapter`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tunegate::fuzz::Harness;

static HARNESS: OnceLock<Harness> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let h = HARNESS.get_or_init(|| Harness::new().unwrap_or_else(|e| panic!("harness: {e}")));
    h.peft_adapter(data);
});
