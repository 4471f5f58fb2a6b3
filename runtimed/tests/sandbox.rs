//! Pod sandboxes through crictl: the pause image pulled through imaged, run with runc (and
//! crun) under conmon, attached to a bridge network by the real CNI plugins.

use crate::harness::Node;
use std::process::Command;

fn pod(name: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut config = serde_json::json!({
        "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"), "attempt": 1},
        "labels": {"app": name},
        "linux": {},
    });
    if let (Some(config), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        config.extend(extra.clone());
    }
    config
}

fn nsenter(pid: i64, namespace: &str, args: &[&str]) -> String {
    let output = Command::new("nsenter")
        .arg("-t")
        .arg(pid.to_string())
        .arg(namespace)
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "{args:?}: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

fn state(node: &Node, id: &str) -> String {
    node.inspect(id)["status"]["state"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn a_pod_network_sandbox_runs_stops_and_is_removed_without_leftovers() {
    let node = Node::start("rtdpod1", "10.234.1.0/24");
    let config = pod(
        "web",
        serde_json::json!({
            "hostname": "pod-host",
            "dns_config": {"servers": ["10.10.10.10"], "searches": ["example.test"], "options": ["ndots:8"]},
            "port_mappings": [{"container_port": 80}],
        }),
    );
    let id = node.run_pod(&config, "").unwrap();
    assert_eq!(id.len(), 64, "{id}");

    let inspect = node.inspect(&id);
    assert_eq!(inspect["status"]["state"], "SANDBOX_READY");
    let ip = inspect["status"]["network"]["ip"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(ip.starts_with("10.234.1."), "{inspect}");
    let pid = inspect["info"]["pid"].as_i64().unwrap();
    assert_eq!(nsenter(pid, "-u", &["hostname"]).trim(), "pod-host");
    assert!(nsenter(pid, "-n", &["ip", "-4", "-o", "addr", "show", "eth0"]).contains(&ip));
    assert!(nsenter(pid, "-n", &["ip", "-o", "link", "show", "lo"]).contains("UP"));
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("/pause"));
    let own = std::fs::read_link("/proc/self/ns/pid").unwrap();
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap(),
        own
    );
    let files = node.runtimed.dir.path().join("root/sandboxes").join(&id);
    let resolv = std::fs::read_to_string(files.join("resolv.conf")).unwrap();
    assert_eq!(
        resolv,
        "search example.test\nnameserver 10.10.10.10\noptions ndots:8\n"
    );
    assert_eq!(node.leased(), std::slice::from_ref(&ip));

    let listed = node.crictl(&["pods", "-q", "--label", "app=web"]);
    assert_eq!(listed.trim(), id);
    assert_eq!(
        node.crictl(&["pods", "-q", "--label", "app=other"]).trim(),
        ""
    );

    node.crictl(&["stopp", &id]);
    assert_eq!(state(&node, &id), "SANDBOX_NOTREADY");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(node.leased(), Vec::<String>::new());
    node.crictl(&["stopp", &id]);
    assert_eq!(
        node.crictl(&["pods", "-q", "--state", "NotReady"]).trim(),
        id
    );

    node.crictl(&["rmp", &id]);
    assert_eq!(node.crictl(&["pods", "-q"]).trim(), "");
    let state_dir = node.runtimed.dir.path().join("state");
    assert!(!state_dir.join("sandboxes").join(&id).exists());
    assert!(!state_dir.join("netns").join(&id).exists());
    assert!(!files.exists());
    let runc = Command::new("runc")
        .arg("--root")
        .arg(state_dir.join("runtimes/runc"))
        .args(["list", "-q"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&runc.stdout).trim(), "");
}

#[test]
fn host_network_sandboxes_share_the_nodes_network_and_crun_runs_them() {
    let node = Node::start("rtdpod2", "10.234.2.0/24");
    let config = pod(
        "host",
        serde_json::json!({"linux": {"security_context": {"namespace_options": {"network": 2}}}}),
    );
    let id = node.run_pod(&config, "crun").unwrap();
    let inspect = node.inspect(&id);
    assert_eq!(inspect["status"]["state"], "SANDBOX_READY");
    assert_eq!(inspect["status"]["network"]["ip"], "");
    assert_eq!(inspect["status"]["runtimeHandler"], "crun");
    let pid = inspect["info"]["pid"].as_i64().unwrap();
    let own = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(),
        own
    );
    assert!(node.leased().is_empty());
    node.crictl(&["rmp", "-f", &id]);
    assert_eq!(node.crictl(&["pods", "-q"]).trim(), "");
}

#[test]
fn bad_requests_are_refused_by_name_and_leave_nothing_behind() {
    let node = Node::start("rtdpod3", "10.234.3.0/24");
    let id = node
        .run_pod(&pod("dup", serde_json::json!({})), "")
        .unwrap();
    let err = node
        .run_pod(&pod("dup", serde_json::json!({})), "")
        .unwrap_err();
    assert!(err.contains("AlreadyExists") && err.contains(&id), "{err}");
    let err = node
        .run_pod(&pod("kata", serde_json::json!({})), "kata")
        .unwrap_err();
    assert!(
        err.contains("InvalidArgument") && err.contains("kata"),
        "{err}"
    );
    let unknown = "0".repeat(64);
    let status = node.runtimed.crictl(&["inspectp", &unknown]);
    assert!(!status.status.success());
    assert!(String::from_utf8_lossy(&status.stderr).contains("NotFound"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut client = node.runtimed.client().await;
        let stop = proto::cri::StopPodSandboxRequest {
            pod_sandbox_id: unknown.clone(),
        };
        client.stop_pod_sandbox(stop).await.unwrap();
        let remove = proto::cri::RemovePodSandboxRequest {
            pod_sandbox_id: unknown.clone(),
        };
        client.remove_pod_sandbox(remove).await.unwrap();
    });
    node.crictl(&["rmp", "-f", &id]);
    assert!(node.leased().is_empty());

    let node = Node::start_with(
        "rtdpod4",
        "10.234.4.0/24",
        "conmon_path = \"/nonexistent/conmon\"",
    );
    let err = node
        .run_pod(&pod("noconmon", serde_json::json!({})), "")
        .unwrap_err();
    assert!(
        err.contains("FailedPrecondition") && err.contains("/nonexistent/conmon"),
        "{err}"
    );
    assert_eq!(node.crictl(&["pods", "-q"]).trim(), "");
}

#[test]
fn a_failed_start_undoes_the_network_and_the_netns() {
    let node = Node::start_with(
        "rtdpod5",
        "10.234.5.0/24",
        "[runtimes.broken]\nruntime_type = \"oci\"\nruntime_path = \"/bin/false\"\n",
    );
    let err = node
        .run_pod(&pod("broken", serde_json::json!({})), "broken")
        .unwrap_err();
    assert!(err.contains("broken"), "{err}");
    assert!(node.leased().is_empty(), "{:?}", node.leased());
    let state_dir = node.runtimed.dir.path().join("state");
    let netns: Vec<_> = std::fs::read_dir(state_dir.join("netns"))
        .map(|d| d.flatten().count())
        .into_iter()
        .collect();
    assert!(netns.iter().all(|n| *n == 0), "{netns:?}");
    assert_eq!(node.crictl(&["pods", "-q"]).trim(), "");
}

#[test]
fn sandboxes_outlive_a_runtimed_restart() {
    let mut node = Node::start("rtdpod6", "10.234.6.0/24");
    let id = node
        .run_pod(&pod("kept", serde_json::json!({})), "")
        .unwrap();
    let pid = node.inspect(&id)["info"]["pid"].as_i64().unwrap();
    node.runtimed.crash_and_restart();
    let inspect = node.inspect(&id);
    assert_eq!(inspect["status"]["state"], "SANDBOX_READY");
    assert_eq!(inspect["info"]["pid"].as_i64().unwrap(), pid);
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    let err = node
        .run_pod(&pod("kept", serde_json::json!({})), "")
        .unwrap_err();
    assert!(err.contains("AlreadyExists"), "{err}");

    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let mut state = String::new();
    for _ in 0..100 {
        state = node.inspect(&id)["status"]["state"]
            .as_str()
            .unwrap()
            .to_string();
        if state == "SANDBOX_NOTREADY" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        state, "SANDBOX_NOTREADY",
        "an infra process that died leaves the pod not ready"
    );
    node.crictl(&["rmp", &id]);
    assert!(node.leased().is_empty());
}

#[test]
fn what_an_interrupted_run_left_is_removed_at_start_up() {
    let mut node = Node::start("rtdpod7", "10.234.7.0/24");
    let id = node
        .run_pod(&pod("cut", serde_json::json!({})), "")
        .unwrap();
    let pid = node.inspect(&id)["info"]["pid"].as_i64().unwrap();
    assert_eq!(node.leased().len(), 1);
    // A sandbox is recorded last: without its record it is what a crash in the middle of
    // RunPodSandbox leaves.
    let record = node
        .runtimed
        .dir
        .path()
        .join(format!("root/sandboxes/{id}.json"));
    std::fs::remove_file(&record).unwrap();
    node.runtimed.crash_and_restart();
    assert_eq!(node.crictl(&["pods", "-q"]).trim(), "");
    for _ in 0..100 {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the infra process is left"
    );
    assert!(node.leased().is_empty(), "{:?}", node.leased());
    let state = node.runtimed.dir.path().join("state");
    assert!(!state.join("netns").join(&id).exists());
    assert!(!state.join("sandboxes").join(&id).exists());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&id), "mounts of {id} are left");
}
