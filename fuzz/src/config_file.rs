//! Fuzzes `imaged::config::Config::load`, which reads the operator's `imaged.toml` at start-up:
//! any file must load or be refused with an error naming the file, never panic. A file that
//! loads must print (`imaged config default` prints a config the same way) to TOML that loads
//! again to the same settings. The input is written, as raw bytes, to one file in a temporary
//! directory made once per process.

use std::path::PathBuf;
use std::sync::OnceLock;

use imaged::config::Config;

/// The file each input replaces; made on the first input and kept for the whole run (the
/// smoke script points `TMPDIR` at a directory it removes afterwards).
fn config_file() -> &'static PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("config-file-")
            .tempdir()
            .expect("create config directory")
            .keep();
        dir.join("imaged.toml")
    })
}

/// One input.
pub fn run(data: &[u8]) {
    let file = config_file();
    std::fs::write(file, data).expect("write imaged.toml");
    let config = match Config::load(Some(file)) {
        Ok(config) => config,
        Err(error) => {
            let message = error.to_string();
            assert!(
                message.contains(&file.display().to_string()),
                "the error names the file: {message}"
            );
            return;
        }
    };
    let printed = toml::to_string(&config).expect("a loaded config prints as TOML");
    std::fs::write(file, &printed).expect("write imaged.toml");
    let again = Config::load(Some(file))
        .unwrap_or_else(|e| panic!("the printed config {printed:?} does not load: {e}"));
    assert_eq!(
        format!("{again:?}"),
        format!("{config:?}"),
        "the printed config loads to other settings"
    );
}
