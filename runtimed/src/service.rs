//! The runtime service's logic on plain Rust types: what each RPC answers, without gRPC
//! concerns.

use crate::cni;
use crate::config::{CgroupDriver, Config};
use proto::cri;
use std::collections::HashMap;

/// The CRI version this service speaks, as `VersionResponse.version` reports it.
const KUBELET_API_VERSION: &str = "0.1.0";
/// The name the kubelet shows as `<runtime_name>://<version>`.
const RUNTIME_NAME: &str = "runtimed";

/// runtimed's runtime service.
pub struct RuntimeService {
    config: Config,
}

impl RuntimeService {
    /// A service configured by `config`.
    pub fn new(config: Config) -> Self {
        Self { config }
    }

    /// `Version`.
    pub fn version(&self) -> cri::VersionResponse {
        cri::VersionResponse {
            version: KUBELET_API_VERSION.into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: env!("CARGO_PKG_VERSION").into(),
            runtime_api_version: "v1".into(),
        }
    }

    /// `Status`: the runtime is ready once serving; the network once a CNI configuration
    /// loads, with the reason containerd gives until then.
    pub fn status(&self, verbose: bool) -> cri::StatusResponse {
        let network = cni::load(&self.config.cni.conf_dir);
        let network_ready = match &network {
            Ok(_) => condition("NetworkReady", Ok(())),
            Err(e) => condition(
                "NetworkReady",
                Err(("NetworkPluginNotReady", e.to_string())),
            ),
        };
        let info = if verbose {
            self.info(&network)
        } else {
            HashMap::new()
        };
        cri::StatusResponse {
            status: Some(cri::RuntimeStatus {
                conditions: vec![condition("RuntimeReady", Ok(())), network_ready],
            }),
            info,
            runtime_handlers: self.handlers(),
            // Nothing is claimed that the runtime does not do yet.
            features: Some(cri::RuntimeFeatures {
                supplemental_groups_policy: false,
            }),
        }
    }

    /// One entry per configured handler, and `""` for the default one.
    fn handlers(&self) -> Vec<cri::RuntimeHandler> {
        let names = std::iter::once("").chain(self.config.runtimes.keys().map(String::as_str));
        names
            .map(|name| cri::RuntimeHandler {
                name: name.into(),
                features: Some(cri::RuntimeHandlerFeatures {
                    recursive_read_only_mounts: false,
                    user_namespaces: false,
                }),
            })
            .collect()
    }

    /// Verbose status, as containerd's keys: the configuration and the CNI load result.
    fn info(
        &self,
        network: &Result<cni::NetworkList, cni::CniConfigError>,
    ) -> HashMap<String, String> {
        let config = serde_json::to_string(&self.config).expect("config serialises");
        let cni_config = match network {
            Ok(list) => serde_json::json!({
                "path": list.path,
                "name": list.name,
                "cniVersion": list.cni_version,
                "plugins": list.plugins,
            }),
            Err(_) => serde_json::Value::Null,
        };
        let load_status = match network {
            Ok(_) => "OK".to_string(),
            Err(e) => e.to_string(),
        };
        HashMap::from([
            ("config".to_string(), config),
            ("cniconfig".to_string(), cni_config.to_string()),
            (
                "lastCNILoadStatus".to_string(),
                serde_json::Value::String(load_status).to_string(),
            ),
        ])
    }

    /// `RuntimeConfig`: the cgroup driver the kubelet must match.
    pub fn runtime_config(&self) -> cri::RuntimeConfigResponse {
        let cgroup_driver = match self.config.cgroup_driver {
            CgroupDriver::Systemd => cri::CgroupDriver::Systemd,
            CgroupDriver::Cgroupfs => cri::CgroupDriver::Cgroupfs,
        };
        cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: cgroup_driver.into(),
            }),
        }
    }
}

fn condition(kind: &str, state: Result<(), (&str, String)>) -> cri::RuntimeCondition {
    let (status, reason, message) = match state {
        Ok(()) => (true, String::new(), String::new()),
        Err((reason, message)) => (false, reason.to_string(), message),
    };
    cri::RuntimeCondition {
        r#type: kind.into(),
        status,
        reason,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(conf_dir: &std::path::Path) -> RuntimeService {
        let mut config = Config::default();
        config.cni.conf_dir = conf_dir.to_path_buf();
        RuntimeService::new(config)
    }

    fn conditions(response: &cri::StatusResponse) -> Vec<(String, bool, String)> {
        let status = response.status.as_ref().unwrap();
        status
            .conditions
            .iter()
            .map(|c| (c.r#type.clone(), c.status, c.reason.clone()))
            .collect()
    }

    #[test]
    fn the_network_is_ready_once_a_cni_config_loads() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path());
        let response = service.status(false);
        assert_eq!(
            conditions(&response),
            [
                ("RuntimeReady".into(), true, String::new()),
                ("NetworkReady".into(), false, "NetworkPluginNotReady".into())
            ]
        );
        assert!(response.info.is_empty());
        let list = r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge"}]}"#;
        std::fs::write(dir.path().join("10-pods.conflist"), list).unwrap();
        let response = service.status(true);
        assert_eq!(
            conditions(&response)[1],
            ("NetworkReady".into(), true, String::new())
        );
        let cni: serde_json::Value = serde_json::from_str(&response.info["cniconfig"]).unwrap();
        assert_eq!(cni["name"], "pods");
        assert!(response.info["config"].contains("\"pause_image\""));
    }

    #[test]
    fn every_handler_and_the_default_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        let names: Vec<String> = service(dir.path())
            .status(false)
            .runtime_handlers
            .into_iter()
            .map(|h| h.name)
            .collect();
        assert_eq!(names, ["", "crun", "runc"]);
    }

    #[test]
    fn version_and_cgroup_driver() {
        let dir = tempfile::tempdir().unwrap();
        let service = service(dir.path());
        let version = service.version();
        assert_eq!(
            (
                version.version.as_str(),
                version.runtime_api_version.as_str()
            ),
            ("0.1.0", "v1")
        );
        let linux = service.runtime_config().linux.unwrap();
        assert_eq!(linux.cgroup_driver(), cri::CgroupDriver::Cgroupfs);
    }
}
