//! The `hosts_toml` fuzz target; the checks are in `imaged_fuzz::hosts_toml`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| imaged_fuzz::hosts_toml::run(data));
