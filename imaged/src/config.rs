//! Daemon configuration: a raw TOML file where every key is optional, resolved into a
//! [`Config`] with defaults filled in and paths checked.

use crate::registry::{Deadlines, MinRate};
use processors::{Chain, Decryption, ExternalProcessor, Keyring};
use serde::{Deserialize, Serialize};
use snapshotters::Backend;
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
    /// A value is out of range.
    #[error("config {path}: {key}: {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// Key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// The configuration file as written: every field optional, unknown fields refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    root: Option<PathBuf>,
    state: Option<PathBuf>,
    address: Option<PathBuf>,
    socket_group: Option<String>,
    metrics_address: Option<String>,
    snapshotter: Option<Backend>,
    max_concurrent_downloads: Option<usize>,
    image_pull_progress_timeout: Option<String>,
    image_pull_request_timeout: Option<String>,
    image_pull_min_rate: Option<u64>,
    image_pull_min_rate_window: Option<String>,
    garbage_collection_interval: Option<String>,
    image_pull_with_sync_fs: Option<bool>,
    discard_unpacked_layers: Option<bool>,
    max_layer_unpacked_size: Option<u64>,
    max_layer_compression_ratio: Option<u64>,
    max_image_layers: Option<usize>,
    pinned_images: Option<Vec<String>>,
    registry: Option<RawRegistry>,
    image_decryption: Option<RawDecryption>,
    stream_processors: Option<BTreeMap<String, ExternalProcessor>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    config_path: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDecryption {
    key_model: Option<String>,
    keys_dir: Option<PathBuf>,
}

/// Resolved configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Persistent data: content store, snapshots, metadata.
    pub root: PathBuf,
    /// Runtime state: the socket.
    pub state: PathBuf,
    /// The unix socket the daemon listens on.
    pub address: PathBuf,
    /// The group the socket is given (a name from /etc/group or a number), so its members
    /// can reach the daemon; by default the daemon's own group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
    /// A TCP address (`127.0.0.1:9191`) on which `GET /metrics` answers with Prometheus
    /// metrics (OpenMetrics text); unset, there is no endpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_address: Option<String>,
    /// Where layers are unpacked: `overlayfs` (the default), `btrfs` (the root must be on
    /// btrfs) or `native` (plain copies, any filesystem). Images are shared; each
    /// snapshotter keeps its own snapshots under `<root>/snapshots/<name>`.
    pub snapshotter: Backend,
    /// How many layers of one pull download at the same time.
    pub max_concurrent_downloads: usize,
    /// A registry connection that delivers no byte for this long is abandoned (the next
    /// host is tried); a Go duration, `"0"` turns it off.
    pub image_pull_progress_timeout: String,
    /// A manifest, index, config or token exchange, and a layer's response head, must be
    /// complete within this, however steadily the registry dribbles; a Go duration, `"0"`
    /// turns it off.
    pub image_pull_request_timeout: String,
    /// A layer download that receives fewer bytes per second than this over a window of
    /// `image_pull_min_rate_window` spent waiting for the network fails; `0` turns it off.
    pub image_pull_min_rate: u64,
    /// The span over which `image_pull_min_rate` is measured; a Go duration.
    pub image_pull_min_rate_window: String,
    /// Besides the collection after each RemoveImage, blobs and snapshots that nothing
    /// references and no pull holds (such as the manifest and config of a pull that failed)
    /// are removed this often; a Go duration, `"0"` turns it off.
    pub garbage_collection_interval: String,
    /// Each unpacked layer's filesystem is synced (one syncfs) before the layer is committed,
    /// as containerd's setting of the same name; off by default, as there.
    pub image_pull_with_sync_fs: bool,
    /// Once a pull has unpacked and committed a layer, its compressed blob leaves the
    /// content store, as containerd's setting of the same name; off by default, as there.
    /// A later pull sharing the layer needs only its snapshot.
    pub discard_unpacked_layers: bool,
    /// A layer that unpacks to more bytes of tar than this fails as soon as it does
    /// (ResourceExhausted), before it fills the disk; `0` turns the cap off.
    pub max_layer_unpacked_size: u64,
    /// A layer that unpacks to more than this many bytes of tar per byte of blob fails as
    /// soon as it does, once past 64 MiB: a decompression bomb (real layers stay far below;
    /// gzip cannot exceed about 1,030); `0` turns the cap off.
    pub max_layer_compression_ratio: u64,
    /// An image with more layers than this is refused (ResourceExhausted) before any layer
    /// is fetched; the default is as many as one overlay mount can stack. `0` turns the cap
    /// off.
    pub max_image_layers: usize,
    /// Images reported as pinned (kubelet's image GC leaves them alone).
    pub pinned_images: Vec<String>,
    /// Registry settings.
    pub registry: RegistryConfig,
    /// How encrypted layers are decrypted.
    pub image_decryption: DecryptionConfig,
    /// External stream processors by name, as containerd's `[stream_processors]`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub stream_processors: BTreeMap<String, ExternalProcessor>,
}

/// `[image_decryption]` settings.
#[derive(Debug, Clone, Serialize)]
pub struct DecryptionConfig {
    /// `"node"`: keys kept on this node decrypt layers; `""`: encrypted layers are refused.
    pub key_model: String,
    /// Directory of private keys (and certificates for PKCS#7), re-read when it changes.
    pub keys_dir: PathBuf,
}

/// `[registry]` settings.
#[derive(Debug, Clone, Serialize)]
pub struct RegistryConfig {
    /// Directory of `<host>/hosts.toml` files (containerd's `certs.d` layout); several
    /// directories may be joined with `:`.
    pub config_path: String,
}

impl Default for Config {
    fn default() -> Self {
        Self::resolve(RawConfig::default())
    }
}

impl Config {
    /// Reads `path`; with no path, the defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: RawConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if raw.max_concurrent_downloads == Some(0) {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "max_concurrent_downloads",
                message: "must be at least 1".into(),
            });
        }
        for (key, value) in [
            (
                "image_pull_progress_timeout",
                &raw.image_pull_progress_timeout,
            ),
            (
                "garbage_collection_interval",
                &raw.garbage_collection_interval,
            ),
            (
                "image_pull_request_timeout",
                &raw.image_pull_request_timeout,
            ),
            (
                "image_pull_min_rate_window",
                &raw.image_pull_min_rate_window,
            ),
        ] {
            if let Some(text) = value
                && plumbing::go_duration(text).is_none()
            {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    key,
                    message: format!("{text:?} is not a duration like \"5m\" or \"30s\""),
                });
            }
        }
        if let Some(model) = raw
            .image_decryption
            .as_ref()
            .and_then(|d| d.key_model.as_ref())
            && !matches!(model.as_str(), "node" | "")
        {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "image_decryption.key_model",
                message: format!("{model:?} is not \"node\" or \"\""),
            });
        }
        if let Some(window) = &raw.image_pull_min_rate_window
            && plumbing::go_duration(window).is_some_and(|d| d.is_zero())
        {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "image_pull_min_rate_window",
                message: "must be longer than 0 (image_pull_min_rate = 0 turns the check off)"
                    .into(),
            });
        }
        for (key, value) in [("root", &raw.root), ("state", &raw.state)] {
            if let Some(dir) = value
                && !dir.is_absolute()
            {
                return Err(ConfigError::Invalid {
                    path: path.to_path_buf(),
                    key,
                    message: format!("{} is not an absolute path", dir.display()),
                });
            }
        }
        if let Some(address) = &raw.metrics_address
            && address.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "metrics_address",
                message: format!("{address:?} is not an address like \"127.0.0.1:9191\""),
            });
        }
        let config = Self::resolve(raw);
        config
            .socket_gid()
            .map_err(|message| ConfigError::Invalid {
                path: path.to_path_buf(),
                key: "socket_group",
                message,
            })?;
        config.processors().map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: "stream_processors",
            message: e.to_string(),
        })?;
        Ok(config)
    }

    fn resolve(raw: RawConfig) -> Self {
        let decryption = raw.image_decryption.unwrap_or_default();
        let stream_processors = raw.stream_processors.unwrap_or_default();
        let root = raw.root.unwrap_or_else(|| "/var/lib/imaged".into());
        let state = raw.state.unwrap_or_else(|| "/run/imaged".into());
        let address = raw.address.unwrap_or_else(|| state.join("imaged.sock"));
        Self {
            root,
            state,
            address,
            socket_group: raw.socket_group,
            metrics_address: raw.metrics_address,
            snapshotter: raw.snapshotter.unwrap_or(Backend::Overlayfs),
            max_concurrent_downloads: raw.max_concurrent_downloads.unwrap_or(3),
            image_pull_progress_timeout: raw
                .image_pull_progress_timeout
                .unwrap_or_else(|| "5m".into()),
            image_pull_request_timeout: raw
                .image_pull_request_timeout
                .unwrap_or_else(|| "30s".into()),
            image_pull_min_rate: raw.image_pull_min_rate.unwrap_or(1024),
            image_pull_min_rate_window: raw
                .image_pull_min_rate_window
                .unwrap_or_else(|| "1m".into()),
            garbage_collection_interval: raw
                .garbage_collection_interval
                .unwrap_or_else(|| "30m".into()),
            image_pull_with_sync_fs: raw.image_pull_with_sync_fs.unwrap_or(false),
            discard_unpacked_layers: raw.discard_unpacked_layers.unwrap_or(false),
            max_layer_unpacked_size: raw.max_layer_unpacked_size.unwrap_or(256 << 30),
            max_layer_compression_ratio: raw.max_layer_compression_ratio.unwrap_or(500),
            max_image_layers: raw.max_image_layers.unwrap_or(500),
            pinned_images: raw
                .pinned_images
                .unwrap_or_else(|| vec!["registry.k8s.io/pause:3.10".into()]),
            registry: RegistryConfig {
                config_path: raw
                    .registry
                    .and_then(|r| r.config_path)
                    .unwrap_or_else(|| "/etc/imaged/certs.d".into()),
            },
            image_decryption: DecryptionConfig {
                key_model: decryption.key_model.unwrap_or_else(|| "node".into()),
                keys_dir: decryption
                    .keys_dir
                    .unwrap_or_else(|| "/etc/imaged/ocicrypt/keys".into()),
            },
            stream_processors,
        }
    }

    /// The processor chain this configuration describes.
    pub fn processors(&self) -> Result<Chain, processors::Error> {
        let external = self
            .stream_processors
            .iter()
            .map(|(name, processor)| ExternalProcessor {
                name: name.clone(),
                ..processor.clone()
            })
            .collect();
        let decryption = match self.image_decryption.key_model.as_str() {
            "node" => Decryption::Node(Keyring::new(&self.image_decryption.keys_dir)),
            _ => Decryption::Disabled,
        };
        Chain::new(external, decryption)
    }

    /// What the registry client holds registries to.
    pub fn deadlines(&self) -> Deadlines {
        let duration = |text: &str| plumbing::go_duration(text).filter(|d| !d.is_zero());
        let min_rate = duration(&self.image_pull_min_rate_window)
            .filter(|_| self.image_pull_min_rate > 0)
            .map(|window| MinRate {
                bytes_per_second: self.image_pull_min_rate,
                window,
            });
        Deadlines {
            stall: duration(&self.image_pull_progress_timeout),
            request: duration(&self.image_pull_request_timeout),
            min_rate,
        }
    }

    /// The socket's group id, if one is configured: a number, or a name looked up in
    /// /etc/group (read by hand: a colon-separated file needs no crate).
    pub fn socket_gid(&self) -> Result<Option<u32>, String> {
        let Some(group) = &self.socket_group else {
            return Ok(None);
        };
        if let Ok(gid) = group.parse::<u32>() {
            return Ok(Some(gid));
        }
        let groups = std::fs::read_to_string("/etc/group")
            .map_err(|e| format!("reading /etc/group to find {group:?}: {e}"))?;
        groups
            .lines()
            .filter_map(|line| {
                let mut fields = line.split(':');
                Some((fields.next()?, fields.nth(1)?))
            })
            .find(|(name, _)| name == group)
            .and_then(|(_, gid)| gid.parse().ok())
            .map(Some)
            .ok_or_else(|| format!("no group {group:?} in /etc/group"))
    }

    /// How often garbage is collected, `None` when turned off (`"0"`).
    pub fn gc_interval(&self) -> Option<std::time::Duration> {
        plumbing::go_duration(&self.garbage_collection_interval).filter(|d| !d.is_zero())
    }

    /// The caps on what one layer may unpack to; `0` in the file is no cap.
    pub fn unpack_limits(&self) -> crate::pull::UnpackLimits {
        let cap = |value: u64| (value > 0).then_some(value);
        crate::pull::UnpackLimits {
            max_size: cap(self.max_layer_unpacked_size),
            max_ratio: cap(self.max_layer_compression_ratio),
        }
    }

    /// The full default configuration as TOML.
    pub fn default_toml() -> String {
        toml::to_string_pretty(&Self::default()).expect("config serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn default_toml_reads_back_as_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, Config::default_toml()).unwrap();
        let loaded = Config::load(Some(&file)).unwrap();
        assert_eq!(loaded.root, Path::new("/var/lib/imaged"));
        assert_eq!(loaded.address, Path::new("/run/imaged/imaged.sock"));
        assert_eq!(loaded.max_concurrent_downloads, 3);
        assert!(!loaded.image_pull_with_sync_fs);
        assert!(!loaded.discard_unpacked_layers);
        assert_eq!(loaded.snapshotter, Backend::Overlayfs);
        assert!(Config::default_toml().contains("snapshotter = \"overlayfs\""));
        assert_eq!(loaded.registry.config_path, "/etc/imaged/certs.d");
    }

    #[test]
    fn snapshotter_is_one_of_three_names() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        for backend in Backend::ALL {
            std::fs::write(&file, format!("snapshotter = \"{backend}\"\n")).unwrap();
            assert_eq!(Config::load(Some(&file)).unwrap().snapshotter, backend);
        }
        std::fs::write(&file, "snapshotter = \"zfs\"\n").unwrap();
        let err = Config::load(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("snapshotter") && err.contains("zfs"), "{err}");
    }

    #[test]
    fn sync_fs_is_a_boolean() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "image_pull_with_sync_fs = true\n").unwrap();
        assert!(Config::load(Some(&file)).unwrap().image_pull_with_sync_fs);
        std::fs::write(&file, "image_pull_with_sync_fs = \"yes\"\n").unwrap();
        let err = Config::load(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("image_pull_with_sync_fs"), "{err}");
    }

    #[test]
    fn address_follows_state() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "state = \"/tmp/s\"\n[registry]\nconfig_path = \"/x\"\n",
        )
        .unwrap();
        let loaded = Config::load(Some(&file)).unwrap();
        assert_eq!(loaded.address, Path::new("/tmp/s/imaged.sock"));
        assert_eq!(loaded.registry.config_path, "/x");
    }

    #[test]
    fn deadlines_are_go_durations_and_zero_turns_each_off() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        let deadlines = Config::default().deadlines();
        assert_eq!(deadlines.stall, Some(Duration::from_secs(300)));
        assert_eq!(deadlines.request, Some(Duration::from_secs(30)));
        let rate = deadlines.min_rate.unwrap();
        assert_eq!(
            (rate.bytes_per_second, rate.window),
            (1024, Duration::from_secs(60))
        );
        let load = |text: &str| {
            std::fs::write(&file, text).unwrap();
            Config::load(Some(&file))
        };
        let off = load(
            "image_pull_progress_timeout = \"0\"\nimage_pull_request_timeout = \"0s\"\n\
             image_pull_min_rate = 0\n",
        )
        .unwrap()
        .deadlines();
        assert_eq!((off.stall, off.request), (None, None));
        assert!(off.min_rate.is_none());
        for (text, key) in [
            (
                "image_pull_progress_timeout = \"5 minutes\"\n",
                "image_pull_progress_timeout",
            ),
            (
                "image_pull_request_timeout = \"soon\"\n",
                "image_pull_request_timeout",
            ),
            (
                "image_pull_min_rate_window = \"0\"\n",
                "image_pull_min_rate_window",
            ),
            ("image_pull_min_rate = -1\n", "image_pull_min_rate"),
            ("metrics_address = \"localhost\"\n", "metrics_address"),
        ] {
            let err = load(text).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn gc_interval_is_a_go_duration_and_zero_turns_it_off() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        assert_eq!(
            Config::default().gc_interval(),
            Some(std::time::Duration::from_secs(1800))
        );
        std::fs::write(&file, "garbage_collection_interval = \"0\"\n").unwrap();
        assert_eq!(Config::load(Some(&file)).unwrap().gc_interval(), None);
        std::fs::write(&file, "garbage_collection_interval = \"hourly\"\n").unwrap();
        let err = Config::load(Some(&file)).unwrap_err().to_string();
        assert!(
            err.contains("garbage_collection_interval") && err.contains("hourly"),
            "{err}"
        );
    }

    #[test]
    fn socket_group_is_a_number_or_a_known_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "socket_group = \"123\"\n").unwrap();
        assert_eq!(
            Config::load(Some(&file)).unwrap().socket_gid(),
            Ok(Some(123))
        );
        std::fs::write(&file, "socket_group = \"root\"\n").unwrap();
        assert_eq!(Config::load(Some(&file)).unwrap().socket_gid(), Ok(Some(0)));
        std::fs::write(&file, "socket_group = \"no-such-group\"\n").unwrap();
        let err = Config::load(Some(&file)).unwrap_err().to_string();
        assert!(
            err.contains("socket_group") && err.contains("no-such-group"),
            "{err}"
        );
        assert_eq!(Config::default().socket_gid(), Ok(None));
    }

    #[test]
    fn unknown_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "rooot = \"/x\"\n").unwrap();
        let err = Config::load(Some(&file)).unwrap_err().to_string();
        assert!(err.contains("rooot"), "{err}");
    }
}
