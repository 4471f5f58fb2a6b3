//! The `reference` fuzz target; the checks are in `imaged_fuzz::reference`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| imaged_fuzz::reference::run(data));
