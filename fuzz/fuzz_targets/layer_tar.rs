//! The `layer_tar` fuzz target; the checks are in `imaged_fuzz::layer_tar`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| imaged_fuzz::layer_tar::run(data));
