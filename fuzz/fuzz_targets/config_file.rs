//! The `config_file` fuzz target; the checks are in `imaged_fuzz::config_file`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| imaged_fuzz::config_file::run(data));
