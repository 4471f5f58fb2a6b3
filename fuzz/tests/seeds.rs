//! Every fuzz target's seed inputs (written by `scripts/fuzz-smoke.sh --seeds-only DIR`, found
//! through `FUZZ_SEEDS=DIR`) and saved crashes (`fuzz/regressions/<target>/`) run through the
//! target's checks as ordinary tests, without libFuzzer. `make test` runs them through
//! `scripts/fuzz-seeds.sh`. The layer target needs root.

use std::path::{Path, PathBuf};

/// The files of `dir`, sorted; none when it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

/// Runs `check` on every seed and saved crash of `target`; there must be seeds.
fn replay(target: &str, check: fn(&[u8])) {
    let seeds = std::env::var_os("FUZZ_SEEDS")
        .map(PathBuf::from)
        .expect("FUZZ_SEEDS names the directory scripts/fuzz-smoke.sh --seeds-only wrote");
    let seeds = inputs(&seeds.join(target));
    assert!(!seeds.is_empty(), "no seeds for {target}");
    let regressions = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("regressions")
        .join(target);
    for input in seeds.iter().chain(&inputs(&regressions)) {
        let data = std::fs::read(input).unwrap();
        eprintln!("{target}: {}", input.display());
        check(&data);
    }
}

#[test]
fn reference() {
    replay("reference", imaged_fuzz::reference::run);
}

#[test]
fn manifest() {
    replay("manifest", imaged_fuzz::manifest::run);
}

#[test]
fn hosts_toml() {
    replay("hosts_toml", imaged_fuzz::hosts_toml::run);
}

#[test]
fn auth_challenge() {
    replay("auth_challenge", imaged_fuzz::auth_challenge::run);
}

#[test]
fn config_file() {
    replay("config_file", imaged_fuzz::config_file::run);
}

#[test]
fn layer_tar() {
    replay("layer_tar", imaged_fuzz::layer_tar::run);
}

#[test]
fn ocicrypt_annotations() {
    replay(
        "ocicrypt_annotations",
        imaged_fuzz::ocicrypt_annotations::run,
    );
}
