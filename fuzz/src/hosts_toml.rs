//! Fuzzes `imaged::registry::hosts::hosts_for`, which reads the `hosts.toml` files of the
//! registry config path on every pull: a node operator's (or a config management tool's)
//! file must be refused with an error naming it, never crash the image service. The input is
//! written, as raw bytes, to `<tmp>/registry.example/hosts.toml` of a temporary config root
//! made once per process.

use std::path::PathBuf;
use std::sync::OnceLock;

use imaged::registry::hosts::hosts_for;

/// The registry whose file is fuzzed.
const REGISTRY: &str = "registry.example";

/// The config root (`config_path`) and the file inside it that each input replaces.
struct ConfigRoot {
    path: String,
    file: PathBuf,
}

/// Made on the first input and kept for the whole run; the smoke script points `TMPDIR` at a
/// directory it removes afterwards, as libFuzzer exits without running destructors.
fn config_root() -> &'static ConfigRoot {
    static ROOT: OnceLock<ConfigRoot> = OnceLock::new();
    ROOT.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("hosts-toml-")
            .tempdir()
            .expect("create config root")
            .keep();
        let registry_dir = dir.join(REGISTRY);
        std::fs::create_dir(&registry_dir).expect("create registry directory");
        ConfigRoot {
            path: dir
                .to_str()
                .expect("temporary directory is UTF-8")
                .to_owned(),
            file: registry_dir.join("hosts.toml"),
        }
    })
}

/// One input.
pub fn run(data: &[u8]) {
    let root = config_root();
    std::fs::write(&root.file, data).expect("write hosts.toml");
    match hosts_for(&root.path, REGISTRY) {
        Ok(hosts) => assert!(!hosts.is_empty(), "a hosts.toml always yields its server"),
        Err(error) => drop(error.to_string()),
    }
}
