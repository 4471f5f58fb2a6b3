//! The checks of every fuzz target, as plain functions: the `fuzz_targets/` bins hand them
//! libFuzzer's inputs, and `tests/seeds.rs` hands them the seed inputs and saved crashes
//! without libFuzzer, so a target that rots fails `make test`.

pub mod auth_challenge;
pub mod config_file;
pub mod hosts_toml;
pub mod layer_tar;
pub mod manifest;
pub mod ocicrypt_annotations;
pub mod reference;
