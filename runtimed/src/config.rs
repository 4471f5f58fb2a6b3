//! runtimed's configuration: one TOML file, every key optional, names following
//! containerd's CRI runtime plugin and CRI-O where one exists. Flags of `runtimed serve`
//! override the file for the paths and the image service endpoint.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Errors reading the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config {path}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("parsing config {path}: {message}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Parser message (names the key and line).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("config {path}: {key}: {message}")]
    Invalid {
        /// File, or `(command line)`.
        path: PathBuf,
        /// Key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// How cgroups are managed: directly in the cgroup filesystem, or through systemd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    /// Paths in the cgroup filesystem (`/kubepods/.../<id>`).
    Cgroupfs,
    /// Slices and scopes through systemd (`kubepods.slice:runtimed:<id>`).
    Systemd,
}

/// One runtime handler, chosen by RunPodSandbox's `runtime_handler`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    /// Only `oci`: a runtime with runc's command line (runc, crun).
    pub runtime_type: String,
    /// The binary: a path, or a name looked up on `PATH`.
    pub runtime_path: PathBuf,
    /// The runtime's state directory (`--root`); default `<state>/runtimes/<name>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_root: Option<PathBuf>,
}

/// Where CNI network configurations and plugins are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cni {
    /// Directory of `*.conf`, `*.conflist` and `*.json` files; the first in sort order is
    /// the pod network.
    pub conf_dir: PathBuf,
    /// Plugin directories, `:`-separated as `CNI_PATH` takes them.
    pub bin_dir: String,
}

impl Default for Cni {
    fn default() -> Self {
        Self {
            conf_dir: PathBuf::from("/etc/cni/net.d"),
            bin_dir: "/usr/lib/cni:/opt/cni/bin".into(),
        }
    }
}

/// The configuration file as written.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawConfig {
    root: PathBuf,
    state: PathBuf,
    address: Option<PathBuf>,
    image_service_endpoint: String,
    default_runtime: String,
    runtimes: BTreeMap<String, Runtime>,
    cni: Cni,
    cgroup_driver: CgroupDriver,
    pause_image: String,
    conmon_path: PathBuf,
    log_size_max: i64,
    stream_server_address: String,
    stream_idle_timeout: String,
}

impl Default for RawConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/var/lib/runtimed"),
            state: PathBuf::from("/run/runtimed"),
            address: None,
            image_service_endpoint: "unix:///run/imaged/imaged.sock".into(),
            default_runtime: "runc".into(),
            runtimes: BTreeMap::new(),
            cni: Cni::default(),
            cgroup_driver: CgroupDriver::Cgroupfs,
            pause_image: "registry.k8s.io/pause:3.10".into(),
            conmon_path: PathBuf::from("conmon"),
            log_size_max: -1,
            stream_server_address: "127.0.0.1:0".into(),
            stream_idle_timeout: "4h".into(),
        }
    }
}

/// Resolved configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Persistent state: sandboxes, containers, CNI results.
    pub root: PathBuf,
    /// State that dies with the machine: the socket, bundles, runtime state.
    pub state: PathBuf,
    /// The unix socket the daemon listens on; default `<state>/runtimed.sock`.
    pub address: PathBuf,
    /// imaged's socket, as `unix:///path` (or a bare path).
    pub image_service_endpoint: String,
    /// The handler used when RunPodSandbox names none.
    pub default_runtime: String,
    /// Runtime handlers by name.
    pub runtimes: BTreeMap<String, Runtime>,
    /// CNI configuration and plugins.
    pub cni: Cni,
    /// cgroupfs or systemd, as the kubelet's `--cgroup-driver`.
    pub cgroup_driver: CgroupDriver,
    /// The image of the process that holds a pod's namespaces.
    pub pause_image: String,
    /// conmon: a path, or a name looked up on `PATH`.
    pub conmon_path: PathBuf,
    /// A container log is truncated when it would grow past this many bytes; -1 never.
    pub log_size_max: i64,
    /// Where the exec, attach and port-forward URLs point: `IP:PORT`, port 0 for one
    /// chosen at start, as containerd's default `127.0.0.1:0`.
    pub stream_server_address: String,
    /// A streaming session with no traffic for this long is closed (`4h`, `30m`, ...).
    pub stream_idle_timeout: String,
}

impl Default for Config {
    fn default() -> Self {
        Self::resolve(RawConfig::default())
    }
}

/// Values given on the command line, which win over the file.
#[derive(Debug, Default)]
pub struct Overrides {
    /// `--address`.
    pub address: Option<PathBuf>,
    /// `--root`.
    pub root: Option<PathBuf>,
    /// `--state`; the socket follows it unless an address is given.
    pub state: Option<PathBuf>,
    /// `--image-service-endpoint`.
    pub image_service_endpoint: Option<String>,
}

impl Config {
    /// Reads `path`, or the defaults when `None`.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with(path, Overrides::default())
    }

    /// Reads `path` (or the defaults), then applies the command line's `overrides`.
    pub fn load_with(path: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let mut raw = match path {
            Some(path) => read(path)?,
            None => RawConfig::default(),
        };
        raw.address = overrides.address.or(raw.address);
        raw.root = overrides.root.unwrap_or(raw.root);
        raw.state = overrides.state.unwrap_or(raw.state);
        if let Some(endpoint) = overrides.image_service_endpoint {
            raw.image_service_endpoint = endpoint;
        }
        let config = Self::resolve(raw);
        config.check(path.unwrap_or(Path::new("(command line)")))?;
        Ok(config)
    }

    /// Defaults filled in. Handlers in the file are added to runc and crun (or replace them,
    /// by name), as containerd merges its runtime table.
    fn resolve(raw: RawConfig) -> Self {
        let address = raw
            .address
            .unwrap_or_else(|| raw.state.join("runtimed.sock"));
        let mut runtimes: BTreeMap<String, Runtime> = ["crun", "runc"]
            .into_iter()
            .map(|name| {
                let runtime = Runtime {
                    runtime_type: "oci".into(),
                    runtime_path: PathBuf::from(name),
                    runtime_root: None,
                };
                (name.to_string(), runtime)
            })
            .collect();
        runtimes.extend(raw.runtimes);
        Self {
            root: raw.root,
            state: raw.state,
            address,
            image_service_endpoint: raw.image_service_endpoint,
            default_runtime: raw.default_runtime,
            runtimes,
            cni: raw.cni,
            cgroup_driver: raw.cgroup_driver,
            pause_image: raw.pause_image,
            conmon_path: raw.conmon_path,
            log_size_max: raw.log_size_max,
            stream_server_address: raw.stream_server_address,
            stream_idle_timeout: raw.stream_idle_timeout,
        }
    }

    fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };
        if !self.runtimes.contains_key(&self.default_runtime) {
            return Err(invalid(
                "default_runtime".into(),
                format!("no [runtimes.{}] table", self.default_runtime),
            ));
        }
        for (name, runtime) in &self.runtimes {
            if runtime.runtime_type != "oci" {
                return Err(invalid(
                    format!("runtimes.{name}.runtime_type"),
                    format!("{:?} is not supported (only \"oci\")", runtime.runtime_type),
                ));
            }
        }
        if self.log_size_max < -1 {
            return Err(invalid(
                "log_size_max".into(),
                "must be -1 (no limit) or a size in bytes".into(),
            ));
        }
        stream_address(&self.stream_server_address)
            .map_err(|message| invalid("stream_server_address".into(), message))?;
        idle_timeout(&self.stream_idle_timeout)
            .map_err(|message| invalid("stream_idle_timeout".into(), message))?;
        image_socket(&self.image_service_endpoint)
            .map(drop)
            .map_err(|message| invalid("image_service_endpoint".into(), message))
    }

    /// The streaming server's listening address.
    pub fn stream_address(&self) -> std::net::SocketAddr {
        stream_address(&self.stream_server_address).expect("checked when loaded")
    }

    /// The streaming server's idle timeout.
    pub fn stream_idle_timeout(&self) -> std::time::Duration {
        idle_timeout(&self.stream_idle_timeout).expect("checked when loaded")
    }

    /// The path of imaged's socket.
    pub fn image_socket(&self) -> PathBuf {
        image_socket(&self.image_service_endpoint).expect("checked when loaded")
    }

    /// Where conmon writes each container's exit status.
    pub fn exit_dir(&self) -> PathBuf {
        self.state.join("exits")
    }

    /// Where conmon puts the attach sockets.
    pub fn attach_dir(&self) -> PathBuf {
        self.state.join("attach")
    }

    /// The state directory of runtime handler `name`.
    pub fn runtime_root(&self, name: &str, runtime: &Runtime) -> PathBuf {
        runtime
            .runtime_root
            .clone()
            .unwrap_or_else(|| self.state.join("runtimes").join(name))
    }

    /// The full default configuration as TOML.
    pub fn default_toml() -> String {
        toml::to_string_pretty(&Self::default()).expect("config serialises")
    }
}

fn read(path: &Path) -> Result<RawConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn stream_address(text: &str) -> Result<std::net::SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not IP:PORT (127.0.0.1:0, [::1]:10010)"))
}

fn idle_timeout(text: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(format!(
            "{text:?} is not a duration above zero (4h, 30m, 1h30m0s)"
        )),
    }
}

/// `unix:///path` or `/path` to the path; anything else is refused, naming it.
fn image_socket(endpoint: &str) -> Result<PathBuf, String> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if path.starts_with('/') {
        Ok(PathBuf::from(path))
    } else {
        Err(format!(
            "{endpoint:?} is not a unix socket (unix:///path or an absolute path)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("runtimed.toml");
        std::fs::write(&file, text).unwrap();
        Config::load(Some(&file))
    }

    #[test]
    fn default_toml_reads_back_as_the_defaults() {
        let config = load(&Config::default_toml()).unwrap();
        assert_eq!(
            serde_json::to_value(&config).unwrap(),
            serde_json::to_value(Config::default()).unwrap()
        );
        assert_eq!(config.address, Path::new("/run/runtimed/runtimed.sock"));
        assert_eq!(config.image_socket(), Path::new("/run/imaged/imaged.sock"));
        assert_eq!(config.cgroup_driver, CgroupDriver::Cgroupfs);
        assert_eq!(config.runtimes.keys().collect::<Vec<_>>(), ["crun", "runc"]);
        assert_eq!(config.stream_address(), "127.0.0.1:0".parse().unwrap());
        assert_eq!(
            config.stream_idle_timeout(),
            std::time::Duration::from_secs(4 * 3600)
        );
    }

    #[test]
    fn stream_settings_take_addresses_and_go_durations() {
        let config =
            load("stream_server_address = \"[::1]:10010\"\nstream_idle_timeout = \"1h30m0s\"\n")
                .unwrap();
        assert_eq!(config.stream_address(), "[::1]:10010".parse().unwrap());
        assert_eq!(
            config.stream_idle_timeout(),
            std::time::Duration::from_secs(5400)
        );
    }

    #[test]
    fn address_follows_state_and_runtime_roots_live_under_it() {
        let config = load("state = \"/tmp/s\"\n[runtimes.kata]\nruntime_type = \"oci\"\nruntime_path = \"/bin/k\"\n").unwrap();
        assert_eq!(config.address, Path::new("/tmp/s/runtimed.sock"));
        let kata = &config.runtimes["kata"];
        assert_eq!(
            config.runtime_root("kata", kata),
            Path::new("/tmp/s/runtimes/kata")
        );
        assert!(config.runtimes.contains_key("runc"));
    }

    #[test]
    fn flags_win_over_the_file_and_the_socket_follows_a_new_state() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("runtimed.toml");
        std::fs::write(&file, "root = \"/file/root\"\nstate = \"/file/state\"\n").unwrap();
        let overrides = Overrides {
            state: Some("/flag/state".into()),
            image_service_endpoint: Some("/flag/imaged.sock".into()),
            ..Overrides::default()
        };
        let config = Config::load_with(Some(&file), overrides).unwrap();
        assert_eq!(config.root, Path::new("/file/root"));
        assert_eq!(config.address, Path::new("/flag/state/runtimed.sock"));
        assert_eq!(config.image_socket(), Path::new("/flag/imaged.sock"));
        let overrides = Overrides {
            image_service_endpoint: Some("dns:///imaged".into()),
            ..Overrides::default()
        };
        let err = Config::load_with(None, overrides).unwrap_err().to_string();
        assert!(
            err.contains("(command line)") && err.contains("dns:///imaged"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        for (text, needle) in [
            ("bogus = 1\n", "bogus"),
            ("cgroup_driver = \"cgroup\"\n", "cgroup"),
            ("default_runtime = \"kata\"\n", "default_runtime"),
            (
                "image_service_endpoint = \"tcp://1.2.3.4\"\n",
                "image_service_endpoint",
            ),
            ("log_size_max = -5\n", "log_size_max"),
            (
                "[runtimes.x]\nruntime_type = \"io.containerd.runc.v2\"\nruntime_path = \"x\"\n",
                "runtimes.x.runtime_type",
            ),
            ("[cni]\nconfdir = \"/x\"\n", "confdir"),
            (
                "stream_server_address = \"localhost\"\n",
                "stream_server_address",
            ),
            ("stream_idle_timeout = \"soon\"\n", "stream_idle_timeout"),
            ("stream_idle_timeout = \"0s\"\n", "stream_idle_timeout"),
        ] {
            let err = load(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
