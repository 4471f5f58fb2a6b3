//! Calling CNI plugins as the CNI specification's runtime side does: each plugin of a list
//! runs as a child process in the host's network namespace with `CNI_*` variables in its
//! environment and its configuration on stdin (the list's name and version, the
//! `runtimeConfig` for the capabilities it declares, the previous plugin's result), and
//! answers with a result or an error object on stdout. ADD runs the list in order, DEL in
//! reverse with the stored ADD result.
//!
//! Written here: the Rust crates for CNI implement the plugin side, not the runtime's, and
//! the protocol is this module.

use super::config::NetworkList;
use serde_json::{Map, Value};
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Why a plugin call failed; every variant names the network and the plugin.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// No directory of the search path holds the plugin.
    #[error("network {network}: plugin {plugin:?} not found in {dirs}")]
    NotFound {
        /// Network name.
        network: String,
        /// The plugin's `type`.
        plugin: String,
        /// The directories searched, `:`-separated.
        dirs: String,
    },
    /// The plugin could not be run.
    #[error("network {network}: running plugin {plugin}: {source}")]
    Spawn {
        /// Network name.
        network: String,
        /// Plugin.
        plugin: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The plugin reported an error (or failed without a readable one).
    #[error("network {network}: plugin {plugin} {command} failed: {message}")]
    Plugin {
        /// Network name.
        network: String,
        /// Plugin.
        plugin: String,
        /// ADD or DEL.
        command: &'static str,
        /// The plugin's `msg` and `details` with its error code, or its exit status and
        /// stderr.
        message: String,
    },
    /// The plugin's result is not a CNI result.
    #[error("network {network}: plugin {plugin} returned an unreadable result: {message}")]
    Result {
        /// Network name.
        network: String,
        /// Plugin.
        plugin: String,
        /// Parser message.
        message: String,
    },
}

/// A network list with the directories its plugins are found in.
#[derive(Debug, Clone)]
pub struct Network {
    list: NetworkList,
    bin_dirs: Vec<PathBuf>,
}

/// One pod's attachment to a network.
#[derive(Debug, Clone, Default)]
pub struct Attachment {
    /// `CNI_CONTAINERID`: the sandbox id.
    pub container_id: String,
    /// `CNI_NETNS`: the path of the pod's network namespace.
    pub netns: PathBuf,
    /// `CNI_IFNAME`: the interface inside it (`eth0`, or `lo` for the loopback list).
    pub ifname: String,
    /// `CNI_ARGS` as key-value pairs (`K8S_POD_NAME`, ...); `IgnoreUnknown=1` goes first.
    pub args: Vec<(String, String)>,
    /// Capability arguments (`portMappings`, `dns`, ...), sent as `runtimeConfig` to the
    /// plugins that declare them.
    pub capabilities: Map<String, Value>,
}

/// The final ADD result, as stored for DEL and read for the pod's IPs.
#[derive(Debug, Clone, PartialEq)]
pub struct CniResult {
    /// The result object of the last plugin.
    pub raw: Value,
}

impl CniResult {
    /// The IPs of the interface named `ifname` inside the pod's namespace, in result order
    /// (IPv4 ones first, as the CRI's `ip` then `additional_ips` want them).
    pub fn pod_ips(&self, ifname: &str) -> Vec<IpAddr> {
        let interfaces = self.raw["interfaces"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let inside = |index: &Value| {
            let interface = index.as_u64().and_then(|i| interfaces.get(i as usize));
            interface.is_some_and(|i| {
                i["name"] == ifname && i["sandbox"].as_str().is_some_and(|s| !s.is_empty())
            })
        };
        let mut ips: Vec<IpAddr> = self.raw["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|ip| ip.get("interface").is_none_or(inside))
            .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
            .collect();
        ips.sort_by_key(|ip| !ip.is_ipv4());
        ips
    }
}

/// The loopback list containerd and CRI-O run for every pod network namespace.
pub fn loopback() -> NetworkList {
    NetworkList {
        path: PathBuf::from("(built in)"),
        name: "cni-loopback".into(),
        cni_version: "0.3.1".into(),
        plugins: vec![serde_json::json!({"type": "loopback"})],
    }
}

impl Network {
    /// `list`, with plugins looked up in the `:`-separated `bin_dir`.
    pub fn new(list: NetworkList, bin_dir: &str) -> Self {
        let bin_dirs = bin_dir
            .split(':')
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .collect();
        Self { list, bin_dirs }
    }

    /// The list's name.
    pub fn name(&self) -> &str {
        &self.list.name
    }

    /// Attaches the pod: every plugin in order, each given the previous one's result.
    pub fn add(&self, pod: &Attachment) -> Result<CniResult, CniError> {
        let mut previous = None;
        for plugin in &self.list.plugins {
            let result = self.call("ADD", plugin, pod, previous.as_ref())?;
            previous = Some(result);
        }
        Ok(CniResult {
            raw: previous.unwrap_or_else(|| Value::Object(Map::new())),
        })
    }

    /// Detaches the pod: every plugin in reverse order, given the stored ADD result (none
    /// when ADD never produced one). Every plugin runs; the first failure is returned.
    pub fn del(&self, pod: &Attachment, added: Option<&CniResult>) -> Result<(), CniError> {
        let previous = added.map(|r| &r.raw);
        let mut first = None;
        for plugin in self.list.plugins.iter().rev() {
            if let Err(e) = self.call("DEL", plugin, pod, previous) {
                tracing::warn!(error = %e, "CNI DEL");
                first = first.or(Some(e));
            }
        }
        first.map_or(Ok(()), Err)
    }

    fn call(
        &self,
        command: &'static str,
        plugin: &Value,
        pod: &Attachment,
        previous: Option<&Value>,
    ) -> Result<Value, CniError> {
        let kind = plugin["type"].as_str().unwrap_or_default().to_string();
        let binary = self.find(&kind)?;
        let stdin = self.stdin(plugin, pod, previous);
        let mut child = Command::new(&binary)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &pod.container_id)
            .env("CNI_NETNS", &pod.netns)
            .env("CNI_IFNAME", &pod.ifname)
            .env("CNI_ARGS", cni_args(&pod.args))
            .env("CNI_PATH", self.search_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| self.spawn_error(&kind, source))?;
        let mut input = child.stdin.take().expect("piped stdin");
        // A plugin that exits without reading its input makes this fail; its exit status
        // below says why.
        let _ = input.write_all(stdin.to_string().as_bytes());
        drop(input);
        let output = child
            .wait_with_output()
            .map_err(|source| self.spawn_error(&kind, source))?;
        if !output.status.success() {
            return Err(CniError::Plugin {
                network: self.list.name.clone(),
                plugin: kind,
                command,
                message: failure(&output),
            });
        }
        if command == "DEL" {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&output.stdout).map_err(|e| CniError::Result {
            network: self.list.name.clone(),
            plugin: kind,
            message: e.to_string(),
        })
    }

    /// The plugin's configuration as the runtime sends it.
    fn stdin(&self, plugin: &Value, pod: &Attachment, previous: Option<&Value>) -> Value {
        let mut config = plugin.as_object().cloned().unwrap_or_default();
        config.insert("cniVersion".into(), self.list.cni_version.clone().into());
        config.insert("name".into(), self.list.name.clone().into());
        let declared = config.remove("capabilities");
        let runtime_config: Map<String, Value> = pod
            .capabilities
            .iter()
            .filter(|(name, _)| declared.as_ref().is_some_and(|d| d[name.as_str()] == true))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        if !runtime_config.is_empty() {
            config.insert("runtimeConfig".into(), Value::Object(runtime_config));
        }
        if let Some(previous) = previous {
            config.insert("prevResult".into(), previous.clone());
        }
        Value::Object(config)
    }

    fn find(&self, kind: &str) -> Result<PathBuf, CniError> {
        let valid = !kind.is_empty() && !kind.contains('/') && kind != "..";
        let found = valid
            .then(|| {
                self.bin_dirs
                    .iter()
                    .map(|d| d.join(kind))
                    .find(|p| is_executable(p))
            })
            .flatten();
        found.ok_or_else(|| CniError::NotFound {
            network: self.list.name.clone(),
            plugin: kind.to_string(),
            dirs: self.search_path(),
        })
    }

    fn search_path(&self) -> String {
        let dirs: Vec<String> = self
            .bin_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        dirs.join(":")
    }

    fn spawn_error(&self, plugin: &str, source: std::io::Error) -> CniError {
        CniError::Spawn {
            network: self.list.name.clone(),
            plugin: plugin.to_string(),
            source,
        }
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `CNI_ARGS`: `IgnoreUnknown=1` first, so plugins accept the keys they do not know.
fn cni_args(args: &[(String, String)]) -> String {
    let pairs = args.iter().map(|(k, v)| format!("{k}={v}"));
    std::iter::once("IgnoreUnknown=1".to_string())
        .chain(pairs)
        .collect::<Vec<_>>()
        .join(";")
}

/// The plugin's error object (`code`, `msg`, `details`), else its status and stderr.
fn failure(output: &std::process::Output) -> String {
    let error: Option<Value> = serde_json::from_slice(&output.stdout).ok();
    if let Some(msg) = error.as_ref().and_then(|e| e["msg"].as_str()) {
        let error = error.as_ref().expect("parsed");
        let details = error["details"].as_str().filter(|d| !d.is_empty());
        let code = error["code"].as_u64().unwrap_or(0);
        return match details {
            Some(details) => format!("{msg}: {details} (code {code})"),
            None => format!("{msg} (code {code})"),
        };
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    format!("{}: {}", output.status, stderr.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_start_with_ignore_unknown() {
        let args = [("K8S_POD_NAME".to_string(), "p".to_string())];
        assert_eq!(cni_args(&args), "IgnoreUnknown=1;K8S_POD_NAME=p");
    }

    #[test]
    fn runtime_config_carries_only_declared_capabilities() {
        let list = NetworkList {
            path: "x".into(),
            name: "pods".into(),
            cni_version: "1.0.0".into(),
            plugins: vec![],
        };
        let network = Network::new(list, "/nonexistent");
        let plugin = serde_json::json!({"type": "portmap", "capabilities": {"portMappings": true}});
        let pod = Attachment {
            capabilities: Map::from_iter([
                (
                    "portMappings".to_string(),
                    serde_json::json!([{"hostPort": 1}]),
                ),
                ("dns".to_string(), serde_json::json!({})),
            ]),
            ..Attachment::default()
        };
        let previous = serde_json::json!({"cniVersion": "1.0.0"});
        let stdin = network.stdin(&plugin, &pod, Some(&previous));
        assert_eq!(
            stdin,
            serde_json::json!({
                "type": "portmap", "cniVersion": "1.0.0", "name": "pods",
                "runtimeConfig": {"portMappings": [{"hostPort": 1}]},
                "prevResult": {"cniVersion": "1.0.0"},
            })
        );
    }

    #[test]
    fn pod_ips_come_from_the_pods_interface_ipv4_first() {
        let result = CniResult {
            raw: serde_json::json!({
                "interfaces": [
                    {"name": "cni0", "mac": "m"},
                    {"name": "eth0", "mac": "m", "sandbox": "/run/netns/x"},
                ],
                "ips": [
                    {"address": "10.0.0.1/24", "interface": 0},
                    {"address": "fd00::5/64", "interface": 1},
                    {"address": "10.0.0.5/24", "interface": 1, "gateway": "10.0.0.1"},
                ],
            }),
        };
        let ips: Vec<String> = result
            .pod_ips("eth0")
            .iter()
            .map(|i| i.to_string())
            .collect();
        assert_eq!(ips, ["10.0.0.5", "fd00::5"]);
    }

    #[test]
    fn plugin_types_cannot_name_paths() {
        let dir = tempfile::tempdir().unwrap();
        let list = loopback();
        let network = Network::new(list, &dir.path().display().to_string());
        for kind in ["", "../bin/sh", "/bin/sh", "missing"] {
            let err = network.find(kind).unwrap_err().to_string();
            assert!(
                err.contains("not found") && err.contains("cni-loopback"),
                "{err}"
            );
        }
    }
}
