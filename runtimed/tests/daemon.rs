//! A real `runtimed` process on a temporary socket, asked by crictl (grpc-go, the client the
//! kubelet shares its code with) and by a tonic client.

use crate::harness::{Runtimed, stdout};
use proto::cri;
use std::process::Command;

fn conditions(info: &serde_json::Value) -> Vec<(String, bool, String)> {
    info["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let reason = c["reason"].as_str().unwrap_or_default().to_string();
            (
                c["type"].as_str().unwrap().to_string(),
                c["status"] == true,
                reason,
            )
        })
        .collect()
}

#[test]
fn crictl_reads_version_and_status() {
    let runtimed = Runtimed::start("");
    let version = stdout(&runtimed.crictl(&["version"]));
    assert!(version.contains("RuntimeName:  runtimed"), "{version}");
    assert!(version.contains("RuntimeApiVersion:  v1"), "{version}");

    let info: serde_json::Value =
        serde_json::from_str(&stdout(&runtimed.crictl(&["info"]))).unwrap();
    assert_eq!(
        conditions(&info),
        [
            ("RuntimeReady".into(), true, String::new()),
            ("NetworkReady".into(), false, "NetworkPluginNotReady".into())
        ]
    );
    let list = r#"{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge"}]}"#;
    std::fs::write(runtimed.dir.path().join("net.d/10-pods.conflist"), list).unwrap();
    let info: serde_json::Value =
        serde_json::from_str(&stdout(&runtimed.crictl(&["info"]))).unwrap();
    assert_eq!(
        conditions(&info)[1],
        ("NetworkReady".into(), true, String::new())
    );
    assert_eq!(info["cniconfig"]["name"], "pods");
    assert_eq!(info["config"]["cgroup_driver"], "cgroupfs");
}

#[tokio::test]
async fn runtime_config_and_unimplemented_methods() {
    let runtimed = Runtimed::start("cgroup_driver = \"systemd\"");
    let mut client = runtimed.client().await;
    let config = client
        .runtime_config(cri::RuntimeConfigRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        config.linux.unwrap().cgroup_driver(),
        cri::CgroupDriver::Systemd
    );
    let update = cri::UpdateRuntimeConfigRequest {
        runtime_config: Some(cri::RuntimeConfig {
            network_config: Some(cri::NetworkConfig {
                pod_cidr: "10.88.0.0/16".into(),
            }),
        }),
    };
    client.update_runtime_config(update).await.unwrap();
    let status = client
        .run_pod_sandbox(cri::RunPodSandboxRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("metadata"), "{status:?}");
    let status = client.exec(cri::ExecRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let status = client
        .checkpoint_container(cri::CheckpointContainerRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented);
    assert!(
        status.message().contains("CheckpointContainer"),
        "{status:?}"
    );
}

#[test]
fn sigterm_stops_it_and_removes_the_socket_and_a_stale_socket_is_replaced() {
    let mut again = Runtimed::start("");
    again.crash_and_restart();
    assert!(stdout(&again.crictl(&["version"])).contains("runtimed"));
    let pid = rustix::process::Pid::from_child(&again.child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert!(again.child.wait().unwrap().success());
    assert!(!again.socket.exists());
}

#[test]
fn the_default_configuration_serves_as_printed() {
    let output = Command::new(env!("CARGO_BIN_EXE_runtimed"))
        .args(["config", "default"])
        .output()
        .unwrap();
    let text = String::from_utf8(output.stdout).unwrap();
    for key in [
        "root = \"/var/lib/runtimed\"",
        "state = \"/run/runtimed\"",
        "address = \"/run/runtimed/runtimed.sock\"",
        "image_service_endpoint = \"unix:///run/imaged/imaged.sock\"",
        "pause_image = ",
        "conmon_path = ",
        "log_size_max = -1",
        "[runtimes.runc]",
        "[runtimes.crun]",
        "[cni]",
        "bin_dir = \"/usr/lib/cni:/opt/cni/bin\"",
    ] {
        assert!(text.contains(key), "{key} missing from:\n{text}");
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, "log_size_max = -2\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_runtimed"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        err.contains("log_size_max") && err.contains("c.toml"),
        "{err}"
    );
}
