//! The `ocicrypt_annotations` fuzz target; the checks are in `imaged_fuzz::ocicrypt_annotations`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| imaged_fuzz::ocicrypt_annotations::run(data));
