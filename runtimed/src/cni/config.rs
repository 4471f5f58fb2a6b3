//! Network configuration, as the CNI specification defines it and as containerd's and
//! CRI-O's loaders pick it: the first `*.conf`, `*.conflist` or `*.json` file of the
//! configuration directory in sort order is the pod network. A `.conf` file holds a single
//! plugin and is read as a list of one.

use serde_json::Value;
use std::path::{Path, PathBuf};

/// A loaded network configuration list.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkList {
    /// The file it came from.
    pub path: PathBuf,
    /// The list's `name`.
    pub name: String,
    /// The list's `cniVersion`.
    pub cni_version: String,
    /// The plugin objects, in order.
    pub plugins: Vec<Value>,
}

/// Why no network configuration could be loaded; the text goes into NetworkReady's message.
#[derive(Debug, thiserror::Error)]
pub enum CniConfigError {
    /// The directory could not be read.
    #[error("reading CNI config directory {path}: {source}")]
    Read {
        /// Directory or file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The directory holds no configuration file.
    #[error("no network config found in {0}")]
    Missing(PathBuf),
    /// The first file is not a usable configuration.
    #[error("CNI config {path}: {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Loads the pod network from `dir`.
pub fn load(dir: &Path) -> Result<NetworkList, CniConfigError> {
    let read = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CniConfigError::Read { path, source }
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read(dir))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            let extension = path.extension().and_then(|e| e.to_str());
            matches!(extension, Some("conf" | "conflist" | "json")) && path.is_file()
        })
        .collect();
    files.sort();
    let path = files
        .into_iter()
        .next()
        .ok_or_else(|| CniConfigError::Missing(dir.to_path_buf()))?;
    let text = std::fs::read(&path).map_err(read(&path))?;
    parse(&path, &text)
}

fn parse(path: &Path, text: &[u8]) -> Result<NetworkList, CniConfigError> {
    let invalid = |message: String| CniConfigError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let value: Value =
        serde_json::from_slice(text).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let text_field = |key: &str| {
        value
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .ok_or_else(|| invalid(format!("missing {key:?}")))
    };
    let name = text_field("name")?;
    let cni_version = text_field("cniVersion")?;
    let plugins = match value.get("plugins") {
        Some(Value::Array(plugins)) if !plugins.is_empty() => plugins.clone(),
        Some(_) => return Err(invalid("\"plugins\" must be a non-empty list".into())),
        None if value.get("type").is_some_and(Value::is_string) => vec![value.clone()],
        None => return Err(invalid("neither \"plugins\" nor \"type\"".into())),
    };
    if let Some(i) = plugins.iter().position(|p| !p["type"].is_string()) {
        return Err(invalid(format!("plugin {i} has no \"type\"")));
    }
    Ok(NetworkList {
        path: path.to_path_buf(),
        name,
        cni_version,
        plugins,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"{"cniVersion":"1.0.0","name":"pods","plugins":[
        {"type":"bridge","bridge":"cni0"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#;

    #[test]
    fn the_first_file_in_sort_order_is_the_network() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("20-other.conflist"), "not json").unwrap();
        std::fs::write(dir.path().join("10-pods.conflist"), LIST).unwrap();
        std::fs::write(dir.path().join("00-notes.txt"), "ignored").unwrap();
        let list = load(dir.path()).unwrap();
        assert_eq!(list.name, "pods");
        assert_eq!(list.cni_version, "1.0.0");
        assert_eq!(list.plugins.len(), 2);
        assert_eq!(list.path, dir.path().join("10-pods.conflist"));
    }

    #[test]
    fn a_single_plugin_conf_is_a_list_of_one() {
        let dir = tempfile::tempdir().unwrap();
        let conf = r#"{"cniVersion":"0.4.0","name":"one","type":"bridge"}"#;
        std::fs::write(dir.path().join("05-one.conf"), conf).unwrap();
        let list = load(dir.path()).unwrap();
        assert_eq!(list.plugins[0]["type"], "bridge");
    }

    #[test]
    fn missing_and_broken_configs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no network config found"), "{err}");
        assert!(load(&dir.path().join("absent")).is_err());
        for (text, needle) in [
            ("{", "not JSON"),
            (
                r#"{"cniVersion":"1.0.0","plugins":[{"type":"x"}]}"#,
                "\"name\"",
            ),
            (r#"{"name":"n","plugins":[{"type":"x"}]}"#, "\"cniVersion\""),
            (
                r#"{"name":"n","cniVersion":"1.0.0","plugins":[]}"#,
                "non-empty",
            ),
            (
                r#"{"name":"n","cniVersion":"1.0.0","plugins":[{}]}"#,
                "plugin 0",
            ),
            (r#"{"name":"n","cniVersion":"1.0.0"}"#, "neither"),
        ] {
            std::fs::write(dir.path().join("10.conflist"), text).unwrap();
            let err = load(dir.path()).unwrap_err().to_string();
            assert!(
                err.contains(needle) && err.contains("10.conflist"),
                "{text}: {err}"
            );
        }
    }
}
