//! The `auth_challenge` fuzz target; the checks are in `imaged_fuzz::auth_challenge`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| imaged_fuzz::auth_challenge::run(data));
