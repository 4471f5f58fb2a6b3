//! The CNI invoker against Debian's real plugins (bridge, host-local, loopback, portmap),
//! each test in a network namespace of its own with its own bridge and address range, all
//! on this machine. Root only.

use runtimed::cni::invoke::loopback;
use runtimed::cni::{Attachment, Network, NetworkList};
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN_DIR: &str = "/usr/lib/cni:/opt/cni/bin";

/// A network namespace made with `ip netns add`, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Self {
        let name = format!("rtd-{tag}-{}", std::process::id());
        run("ip", &["netns", "add", &name]);
        Self { name }
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -o ...` run inside the namespace.
    fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", &self.name, "ip", "-o"];
        all.extend_from_slice(args);
        run("ip", &all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// bridge + host-local (+ portmap) on bridge `bridge`, addresses from `subnet`, leases
/// kept in `data`.
fn pod_network(bridge: &str, subnet: &str, data: &Path, portmap: bool) -> NetworkList {
    let mut plugins = vec![serde_json::json!({
        "type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
        "hairpinMode": true,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": data},
    })];
    if portmap {
        plugins.push(serde_json::json!({
            "type": "portmap", "capabilities": {"portMappings": true}, "snat": false,
        }));
    }
    NetworkList {
        path: PathBuf::from("test"),
        name: format!("net-{bridge}"),
        cni_version: "1.0.0".into(),
        plugins,
    }
}

fn attachment(id: &str, netns: &Netns, ifname: &str) -> Attachment {
    Attachment {
        container_id: id.into(),
        netns: netns.path(),
        ifname: ifname.into(),
        args: vec![
            ("K8S_POD_NAMESPACE".into(), "default".into()),
            ("K8S_POD_NAME".into(), "pod".into()),
            ("K8S_POD_INFRA_CONTAINER_ID".into(), id.into()),
        ],
        ..Attachment::default()
    }
}

fn remove_bridge(bridge: &str) {
    let _ = Command::new("ip").args(["link", "delete", bridge]).status();
}

#[test]
fn add_gives_the_pod_an_address_and_del_takes_it_back() {
    let data = tempfile::tempdir().unwrap();
    let netns = Netns::new("add");
    let bridge = format!("rtd{}a", std::process::id() % 100_000);
    let network = Network::new(
        pod_network(&bridge, "10.233.1.0/24", data.path(), false),
        BIN_DIR,
    );
    let pod = attachment("sandbox-add", &netns, "eth0");

    let result = network.add(&pod).unwrap();
    let ips = result.pod_ips("eth0");
    assert_eq!(ips.len(), 1, "{:?}", result.raw);
    let ip = ips[0].to_string();
    assert!(ip.starts_with("10.233.1."), "{ip}");
    assert!(netns.ip(&["-4", "addr", "show", "eth0"]).contains(&ip));
    let leases = data.path().join(network.name());
    assert!(leases.join(&ip).exists());

    network.del(&pod, Some(&result)).unwrap();
    assert!(!netns.ip(&["link", "show"]).contains("eth0"));
    assert!(!leases.join(&ip).exists());
    network.del(&pod, Some(&result)).unwrap();
    network.del(&pod, None).unwrap();
    remove_bridge(&bridge);
}

#[test]
fn loopback_comes_up_and_port_mappings_reach_portmap() {
    let data = tempfile::tempdir().unwrap();
    let netns = Netns::new("lo");
    network_down_then_up(&netns);
    let bridge = format!("rtd{}b", std::process::id() % 100_000);
    let network = Network::new(
        pod_network(&bridge, "10.233.2.0/24", data.path(), true),
        BIN_DIR,
    );
    let id = format!("sandbox-portmap-{}", std::process::id());
    let mut pod = attachment(&id, &netns, "eth0");
    let mapping = serde_json::json!([{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]);
    pod.capabilities.insert("portMappings".into(), mapping);

    let result = network.add(&pod).unwrap();
    let rules = run("iptables", &["-t", "nat", "-S"]);
    assert!(rules.contains(&id) && rules.contains("18080"), "{rules}");
    network.del(&pod, Some(&result)).unwrap();
    let rules = run("iptables", &["-t", "nat", "-S"]);
    assert!(!rules.contains(&id), "{rules}");
    remove_bridge(&bridge);
}

/// The loopback list brings `lo` up in a namespace where it starts down.
fn network_down_then_up(netns: &Netns) {
    assert!(netns.ip(&["link", "show", "lo"]).contains("state DOWN"));
    let network = Network::new(loopback(), BIN_DIR);
    let pod = attachment("sandbox-lo", netns, "lo");
    network.add(&pod).unwrap();
    let lo = netns.ip(&["link", "show", "lo"]);
    assert!(lo.contains("LOOPBACK,UP"), "{lo}");
    network.del(&pod, None).unwrap();
}

#[test]
fn plugin_failures_name_the_network_the_plugin_and_its_message() {
    let data = tempfile::tempdir().unwrap();
    let netns = Netns::new("fail");
    let mut list = pod_network("rtdfail0", "10.233.3.0/24", data.path(), false);
    list.plugins[0]["ipam"]["ranges"] = serde_json::json!([[{"subnet": "not-a-subnet"}]]);
    let network = Network::new(list, BIN_DIR);
    let err = network
        .add(&attachment("sandbox-fail", &netns, "eth0"))
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("net-rtdfail0") && text.contains("bridge"),
        "{text}"
    );
    assert!(
        text.contains("not-a-subnet") || text.contains("invalid"),
        "{text}"
    );

    let mut list = pod_network("rtdfail1", "10.233.4.0/24", data.path(), false);
    list.plugins[0]["type"] = "no-such-plugin".into();
    let err = Network::new(list, BIN_DIR)
        .add(&attachment("sandbox-fail", &netns, "eth0"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no-such-plugin") && err.contains("/usr/lib/cni"),
        "{err}"
    );
    remove_bridge("rtdfail0");
}
