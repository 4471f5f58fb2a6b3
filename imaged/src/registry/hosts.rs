//! Registry host resolution from containerd-style `certs.d/<host>/hosts.toml` files.
//!
//! The result is an ordered list of [`Host`]s: the `[host."URL"]` tables in file order,
//! then the `server` entry (or the registry itself). Files are read on every pull, so
//! edits apply without a restart.

use crate::reference::{DOCKER_HUB, DOCKER_HUB_API};
use reqwest::Url;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What a host may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Fetch manifests and blobs by digest.
    pub pull: bool,
    /// Resolve tags to digests.
    pub resolve: bool,
    /// Push (unused by a node, kept for `imaged hosts`).
    pub push: bool,
}

impl Capabilities {
    const ALL: Self = Self {
        pull: true,
        resolve: true,
        push: true,
    };
}

/// One endpoint to try.
#[derive(Debug, Clone)]
pub struct Host {
    /// Base URL including the API path, e.g. `https://mirror.example/v2`.
    pub base: Url,
    /// `host[:port]` as contacted.
    pub authority: String,
    /// What this host may do.
    pub capabilities: Capabilities,
    /// Skip TLS verification.
    pub skip_verify: bool,
    /// Extra CA files (PEM).
    pub ca: Vec<PathBuf>,
    /// Client certificates: (cert, key); key `None` means inside the cert file.
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// TCP connect timeout.
    pub dial_timeout: Duration,
    /// Where this entry came from: a hosts.toml path, or `built-in`.
    pub source: String,
}

/// Why a hosts.toml could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    /// The file or directory could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// Path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// TOML syntax error.
    #[error("parsing {path}: {message}")]
    Syntax {
        /// File.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
    /// A field has a bad value or is unknown.
    #[error("{path}: field {field}: {message}")]
    Field {
        /// File.
        path: PathBuf,
        /// Field (dotted, e.g. `host."https://m".capabilities`).
        field: String,
        /// What is wrong.
        message: String,
    },
}

const DEFAULT_DIAL_TIMEOUT: Duration = Duration::from_secs(30);
const HOST_KEYS: [&str; 8] = [
    "capabilities",
    "ca",
    "client",
    "skip_verify",
    "header",
    "override_path",
    "dial_timeout",
    "server",
];

/// The hosts to try for `registry`, given the `:`-separated `config_path` roots.
pub fn hosts_for(config_path: &str, registry: &str) -> Result<Vec<Host>, HostsError> {
    let Some(dir) = find_dir(config_path, registry)? else {
        return Ok(vec![upstream(registry)]);
    };
    let file = dir.join("hosts.toml");
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(vec![upstream(registry)]);
        }
        Err(source) => return Err(HostsError::Read { path: file, source }),
    };
    parse(&file, &text, registry)
}

fn find_dir(config_path: &str, registry: &str) -> Result<Option<PathBuf>, HostsError> {
    let mut names = Vec::new();
    if let Some((name, port)) = registry.rsplit_once(':')
        && port.bytes().all(|b| b.is_ascii_digit())
    {
        names.push(format!("{name}_{port}_"));
    }
    names.push(registry.to_string());
    names.push("_default".to_string());
    for root in config_path.split(':').filter(|r| !r.is_empty()) {
        for name in &names {
            let dir = Path::new(root).join(name);
            match std::fs::metadata(&dir) {
                Ok(_) => return Ok(Some(dir)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(HostsError::Read { path: dir, source }),
            }
        }
    }
    Ok(None)
}

/// The registry itself, as used when no file says otherwise.
fn upstream(registry: &str) -> Host {
    let (scheme, authority) = match registry {
        DOCKER_HUB => ("https", DOCKER_HUB_API.to_string()),
        r if is_loopback(r) => ("http", r.to_string()),
        r => ("https", r.to_string()),
    };
    let base = Url::parse(&format!("{scheme}://{authority}/v2")).expect("registry host is valid");
    Host {
        base,
        authority,
        capabilities: Capabilities::ALL,
        skip_verify: false,
        ca: Vec::new(),
        client: Vec::new(),
        headers: Vec::new(),
        dial_timeout: DEFAULT_DIAL_TIMEOUT,
        source: "built-in".into(),
    }
}

/// Whether `host[:port]` names the loopback interface.
pub fn is_loopback(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => authority.split(':').next().unwrap_or(""),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn parse(file: &Path, text: &str, registry: &str) -> Result<Vec<Host>, HostsError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| HostsError::Syntax {
        path: file.to_path_buf(),
        message: e.to_string(),
    })?;
    let dir = file.parent().unwrap_or(Path::new("/"));
    let field = |field: String, message: String| HostsError::Field {
        path: file.to_path_buf(),
        field,
        message,
    };
    let mut hosts = Vec::new();
    for (key, value) in &table {
        if key == "host" {
            let toml::Value::Table(entries) = value else {
                return Err(field(
                    "host".into(),
                    "must be a table of [host.\"URL\"]".into(),
                ));
            };
            for (url, settings) in entries {
                let toml::Value::Table(settings) = settings else {
                    return Err(field(format!("host.{url:?}"), "must be a table".into()));
                };
                let prefix = format!("host.{url:?}.");
                let mut host = host_from_url(url, settings, &prefix, &field)?;
                apply_settings(&mut host, settings, &prefix, dir, &field, false)?;
                host.source = file.display().to_string();
                hosts.push(host);
            }
        } else if !HOST_KEYS.contains(&key.as_str()) {
            return Err(field(key.clone(), "unknown field".into()));
        }
    }
    let mut server = match table.get("server") {
        Some(toml::Value::String(url)) => host_from_url(url, &table, "", &field)?,
        Some(_) => return Err(field("server".into(), "must be a string URL".into())),
        None => upstream(registry),
    };
    let explicit_server = table.contains_key("server");
    apply_settings(&mut server, &table, "", dir, &field, !explicit_server)?;
    server.source = file.display().to_string();
    hosts.push(server);
    Ok(hosts)
}

type FieldErr<'a> = dyn Fn(String, String) -> HostsError + 'a;

fn host_from_url(
    text: &str,
    settings: &toml::Table,
    prefix: &str,
    field: &FieldErr,
) -> Result<Host, HostsError> {
    let with_scheme = if text.starts_with("http://") || text.starts_with("https://") {
        text.to_string()
    } else if text.contains("://") {
        return Err(field(
            format!("{prefix}url"),
            format!("{text:?}: scheme must be http or https"),
        ));
    } else {
        format!("https://{text}")
    };
    let url = Url::parse(&with_scheme)
        .map_err(|e| field(format!("{prefix}url"), format!("{text:?}: {e}")))?;
    let Some(host) = url.host_str() else {
        return Err(field(
            format!("{prefix}url"),
            format!("{text:?} has no host"),
        ));
    };
    let authority = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    let override_path = match settings.get("override_path") {
        None => false,
        Some(toml::Value::Boolean(b)) => *b,
        Some(_) => {
            return Err(field(
                format!("{prefix}override_path"),
                "must be a boolean".into(),
            ));
        }
    };
    let cleaned: Vec<&str> = url.path().split('/').filter(|s| !s.is_empty()).collect();
    let mut path = cleaned.join("/");
    if !override_path && path != "v2" && !path.ends_with("/v2") {
        path = if path.is_empty() {
            "v2".into()
        } else {
            format!("{path}/v2")
        };
    }
    let base = Url::parse(&format!("{}://{authority}/{path}", url.scheme()))
        .map_err(|e| field(format!("{prefix}url"), format!("{text:?}: {e}")))?;
    let mut host = upstream(&authority);
    host.base = base;
    host.authority = authority;
    Ok(host)
}

fn apply_settings(
    host: &mut Host,
    settings: &toml::Table,
    prefix: &str,
    dir: &Path,
    field: &FieldErr,
    upstream_defaults: bool,
) -> Result<(), HostsError> {
    for (key, value) in settings {
        let name = format!("{prefix}{key}");
        match key.as_str() {
            "capabilities" if !upstream_defaults => {
                host.capabilities = capabilities(value).map_err(|m| field(name, m))?
            }
            "capabilities" | "server" | "override_path" => {}
            "host" if prefix.is_empty() => {}
            "skip_verify" => {
                host.skip_verify = value
                    .as_bool()
                    .ok_or_else(|| field(name, "must be a boolean".into()))?
            }
            "ca" => host.ca = paths(value, dir).map_err(|m| field(name, m))?,
            "client" => host.client = clients(value, dir).map_err(|m| field(name, m))?,
            "header" => host.headers = headers(value).map_err(|m| field(name, m))?,
            "dial_timeout" => {
                host.dial_timeout =
                    value
                        .as_str()
                        .and_then(plumbing::go_duration)
                        .ok_or_else(|| {
                            field(name, "must be a duration like \"500ms\" or \"2s\"".into())
                        })?
            }
            _ => return Err(field(name, "unknown field".into())),
        }
    }
    Ok(())
}

fn capabilities(value: &toml::Value) -> Result<Capabilities, String> {
    let list = value.as_array().ok_or("must be an array of strings")?;
    if list.is_empty() {
        return Ok(Capabilities::ALL);
    }
    let mut caps = Capabilities {
        pull: false,
        resolve: false,
        push: false,
    };
    for item in list {
        match item.as_str().map(str::to_ascii_lowercase).as_deref() {
            Some("pull") => caps.pull = true,
            Some("resolve") => caps.resolve = true,
            Some("push") => caps.push = true,
            Some("referrers") => {}
            _ => return Err(format!("unknown capability {item}")),
        }
    }
    Ok(caps)
}

fn resolve_path(path: &str, dir: &Path) -> PathBuf {
    let path = Path::new(path);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        dir.join(path)
    }
}

fn paths(value: &toml::Value, dir: &Path) -> Result<Vec<PathBuf>, String> {
    let strings: Vec<&str> = match value {
        toml::Value::String(s) => vec![s],
        toml::Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().ok_or("must hold strings"))
            .collect::<Result<_, _>>()?,
        _ => return Err("must be a path or a list of paths".into()),
    };
    let resolved: Vec<PathBuf> = strings.iter().map(|s| resolve_path(s, dir)).collect();
    for path in &resolved {
        if !path.is_file() {
            return Err(format!("{} does not exist", path.display()));
        }
    }
    Ok(resolved)
}

fn clients(value: &toml::Value, dir: &Path) -> Result<Vec<(PathBuf, Option<PathBuf>)>, String> {
    let items = match value {
        toml::Value::Array(items) => items.clone(),
        other => vec![other.clone()],
    };
    let mut out = Vec::new();
    for item in &items {
        let (cert, key) = match item {
            toml::Value::String(cert) => (cert.as_str(), ""),
            toml::Value::Array(pair) if pair.len() == 2 => (
                pair[0].as_str().ok_or("certificate must be a string")?,
                pair[1].as_str().ok_or("key must be a string")?,
            ),
            _ => return Err("must be a path, or [cert, key] pairs".into()),
        };
        let cert = paths(&toml::Value::String(cert.into()), dir)?.remove(0);
        let key = match key {
            "" => None,
            key => Some(paths(&toml::Value::String(key.into()), dir)?.remove(0)),
        };
        out.push((cert, key));
    }
    Ok(out)
}

fn headers(value: &toml::Value) -> Result<Vec<(String, String)>, String> {
    let table = value.as_table().ok_or("must be a table")?;
    let mut out = Vec::new();
    for (name, values) in table {
        match values {
            toml::Value::String(v) => out.push((name.clone(), v.clone())),
            toml::Value::Array(vs) => {
                for v in vs {
                    let v = v
                        .as_str()
                        .ok_or(format!("{name}: values must be strings"))?;
                    out.push((name.clone(), v.to_string()));
                }
            }
            _ => return Err(format!("{name}: must be a string or list of strings")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, dir: &str, text: &str) {
        std::fs::create_dir_all(root.join(dir)).unwrap();
        std::fs::write(root.join(dir).join("hosts.toml"), text).unwrap();
    }

    fn urls(hosts: &[Host]) -> Vec<String> {
        hosts.iter().map(|h| h.base.to_string()).collect()
    }

    #[test]
    fn no_file_means_the_registry_itself() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().to_str().unwrap();
        assert_eq!(
            urls(&hosts_for(path, "docker.io").unwrap()),
            ["https://registry-1.docker.io/v2"]
        );
        assert_eq!(
            urls(&hosts_for(path, "quay.io").unwrap()),
            ["https://quay.io/v2"]
        );
        assert_eq!(
            urls(&hosts_for(path, "localhost:5000").unwrap()),
            ["http://localhost:5000/v2"]
        );
    }

    #[test]
    fn hosts_in_file_order_then_server() {
        let root = tempfile::tempdir().unwrap();
        write(
            root.path(),
            "registry.k8s.io",
            r#"
server = "https://registry.k8s.io"
[host."http://127.0.0.1:5001"]
capabilities = ["pull", "resolve"]
[host."https://m.example/cache/"]
capabilities = ["pull"]
[host."https://m.example/v2/hub"]
override_path = true
[host."m2.example:5000"]
"#,
        );
        let hosts = hosts_for(root.path().to_str().unwrap(), "registry.k8s.io").unwrap();
        assert_eq!(
            urls(&hosts),
            [
                "http://127.0.0.1:5001/v2",
                "https://m.example/cache/v2",
                "https://m.example/v2/hub",
                "https://m2.example:5000/v2",
                "https://registry.k8s.io/v2"
            ]
        );
        assert!(!hosts[1].capabilities.resolve && hosts[1].capabilities.pull);
        assert!(hosts[4].capabilities.resolve);
    }

    #[test]
    fn port_spelling_and_default_fallback() {
        let root = tempfile::tempdir().unwrap();
        write(root.path(), "myreg.io_5000_", "server = \"https://a\"\n");
        write(root.path(), "myreg.io:5000", "server = \"https://b\"\n");
        write(root.path(), "_default", "server = \"https://c\"\n");
        let path = root.path().to_str().unwrap();
        assert_eq!(
            urls(&hosts_for(path, "myreg.io:5000").unwrap()),
            ["https://a/v2"]
        );
        assert_eq!(
            urls(&hosts_for(path, "other.io").unwrap()),
            ["https://c/v2"]
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().to_str().unwrap();
        for (text, needle) in [
            (
                "[host.\"https://m\"]\ncapabilities = [\"pulls\"]\n",
                "capabilities",
            ),
            ("[host.\"https://m\"]\nca = \"missing.pem\"\n", "ca"),
            ("[host.\"https://m\"]\nfoo = 1\n", "foo"),
            ("[host.\"ftp://m\"]\n", "url"),
            ("server = [", "parsing"),
        ] {
            write(root.path(), "r.io", text);
            let err = hosts_for(path, "r.io").unwrap_err().to_string();
            assert!(err.contains(needle) && err.contains("hosts.toml"), "{err}");
        }
    }
}
