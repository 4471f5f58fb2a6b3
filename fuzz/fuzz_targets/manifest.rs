//! The `manifest` fuzz target; the checks are in `imaged_fuzz::manifest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| imaged_fuzz::manifest::run(data));
