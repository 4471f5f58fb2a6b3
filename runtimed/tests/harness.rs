//! Daemons per test under one temporary directory: runtimed always, and for tests that run
//! pods a fixture registry holding the pause image and an imaged serving it.

use fixtures::registry::{Registry, RegistryOptions};
use proto::cri::runtime_service_client::RuntimeServiceClient;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

pub struct Runtimed {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub child: Child,
}

impl Runtimed {
    /// Starts runtimed with `extra` in its config file under a new temporary directory;
    /// the state directory comes from a flag, as a kubelet's unit file would pass it.
    pub fn start(extra: &str) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), extra)
    }

    /// Kills the daemon without warning and starts it again in the same directories.
    pub fn crash_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        assert!(self.socket.exists(), "a killed daemon leaves its socket");
        self.child = spawn(self.dir.path());
        wait_for(&self.socket, || self.log());
    }

    pub fn start_in(dir: tempfile::TempDir, extra: &str) -> Self {
        let net = dir.path().join("net.d");
        std::fs::create_dir_all(&net).unwrap();
        let config = dir.path().join("runtimed.toml");
        let text = format!(
            "root = {:?}\n{extra}\n[cni]\nconf_dir = {net:?}\n",
            dir.path().join("root")
        );
        std::fs::write(&config, text).unwrap();
        let child = spawn(dir.path());
        let socket = dir.path().join("state/runtimed.sock");
        let runtimed = Self { dir, socket, child };
        wait_for(&runtimed.socket, || runtimed.log());
        runtimed
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("runtimed.log")).unwrap_or_default()
    }

    pub fn crictl(&self, args: &[&str]) -> Output {
        Command::new(tool("crictl"))
            .arg("--runtime-endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .args(["--timeout", "60s"])
            .args(args)
            .output()
            .unwrap()
    }

    pub async fn client(&self) -> RuntimeServiceClient<tonic::transport::Channel> {
        RuntimeServiceClient::new(plumbing::grpc::connect(&self.socket).await.unwrap())
    }
}

impl Drop for Runtimed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node for pods: a registry with the pause image, imaged, and runtimed pointed at both,
/// with a bridge network of its own (bridge `bridge`, addresses from `subnet`).
pub struct Node {
    pub runtimed: Runtimed,
    pub imaged: Child,
    pub imaged_socket: PathBuf,
    /// The busybox fixture image, pushed to the registry (not pulled yet).
    pub busybox: String,
    _registry: Registry,
    pub bridge: String,
    pub leases: PathBuf,
}

impl Node {
    pub fn start(bridge: &str, subnet: &str) -> Self {
        Self::start_with(bridge, subnet, "")
    }

    /// Starts the node with `extra` in runtimed's config.
    pub fn start_with(bridge: &str, subnet: &str, extra: &str) -> Self {
        let registry = Registry::start(RegistryOptions::default()).unwrap();
        let pause = fixtures::catalog::pause().unwrap().build().unwrap();
        registry
            .pusher()
            .push_image("fixtures/pause", &pause, &["v1"])
            .unwrap();
        let busybox = fixtures::catalog::busybox().unwrap().build().unwrap();
        let pusher = registry.pusher();
        pusher
            .push_image("fixtures/busybox", &busybox, &["v1"])
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let imaged_socket = dir.path().join("imaged/imaged.sock");
        let imaged = Command::new(tool("imaged"))
            .arg("serve")
            .arg("--config")
            .arg(imaged_config(dir.path()))
            .stderr(std::fs::File::create(dir.path().join("imaged.log")).unwrap())
            .spawn()
            .unwrap();
        wait_for(&imaged_socket, String::new);
        let leases = dir.path().join("leases");
        let list = serde_json::json!({
            "cniVersion": "1.0.0", "name": format!("net-{bridge}"),
            "plugins": [
                {"type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
                 "hairpinMode": true,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": leases}},
                {"type": "portmap", "capabilities": {"portMappings": true}, "snat": false}
            ]
        });
        std::fs::create_dir_all(dir.path().join("net.d")).unwrap();
        std::fs::write(dir.path().join("net.d/10-pods.conflist"), list.to_string()).unwrap();
        let extra = format!(
            "image_service_endpoint = \"unix://{}\"\npause_image = \"{}/fixtures/pause:v1\"\n{extra}",
            imaged_socket.display(),
            registry.addr()
        );
        let runtimed = Runtimed::start_in(dir, &extra);
        Self {
            runtimed,
            imaged,
            imaged_socket,
            busybox: format!("{}/fixtures/busybox:v1", registry.addr()),
            _registry: registry,
            bridge: bridge.to_string(),
            leases,
        }
    }

    /// crictl's answer to `args`, which must succeed.
    pub fn crictl(&self, args: &[&str]) -> String {
        stdout(&self.crictl_output(args))
    }

    /// crictl with both endpoints set, to be given `args` and its stdio and run.
    pub fn crictl_command(&self) -> Command {
        let mut command = Command::new(tool("crictl"));
        command
            .arg("--runtime-endpoint")
            .arg(format!("unix://{}", self.runtimed.socket.display()))
            .arg("--image-endpoint")
            .arg(format!("unix://{}", self.imaged_socket.display()))
            .args(["--timeout", "60s"]);
        command
    }

    /// crictl with imaged as the image endpoint.
    pub fn crictl_output(&self, args: &[&str]) -> Output {
        let endpoint = format!("unix://{}", self.imaged_socket.display());
        let mut all = vec!["--image-endpoint", endpoint.as_str()];
        all.extend_from_slice(args);
        self.runtimed.crictl(&all)
    }

    /// Writes `value` to a JSON file in the test directory; its path.
    pub fn json_file(&self, value: &serde_json::Value) -> String {
        let file = self
            .runtimed
            .dir
            .path()
            .join(format!("{}.json", rand_suffix()));
        std::fs::write(&file, value.to_string()).unwrap();
        file.display().to_string()
    }

    /// `crictl create` of `container` in sandbox `pod` (made from `pod_config`).
    pub fn create(
        &self,
        pod: &str,
        container: &serde_json::Value,
        pod_config: &serde_json::Value,
    ) -> Result<String, String> {
        let (container, pod_config) = (self.json_file(container), self.json_file(pod_config));
        let output = self.crictl_output(&["create", pod, &container, &pod_config]);
        if output.status.success() {
            Ok(String::from_utf8(output.stdout).unwrap().trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    /// `crictl inspect -o json` of a container.
    pub fn inspect_container(&self, id: &str) -> serde_json::Value {
        serde_json::from_str(&self.crictl(&["inspect", "-o", "json", id])).unwrap()
    }

    /// Polls the container until its state is `state` (for at most 30 s); its inspect.
    pub fn wait_state(&self, id: &str, state: &str) -> serde_json::Value {
        for _ in 0..600 {
            let inspect = self.inspect_container(id);
            if inspect["status"]["state"] == state {
                return inspect;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "container {id} never reached {state}: {}",
            self.inspect_container(id)
        );
    }

    /// `crictl runp` of `config` (with `--runtime handler` unless empty); the sandbox id.
    pub fn run_pod(&self, config: &serde_json::Value, handler: &str) -> Result<String, String> {
        let file = self
            .runtimed
            .dir
            .path()
            .join(format!("pod-{}.json", rand_suffix()));
        std::fs::write(&file, config.to_string()).unwrap();
        let file = file.display().to_string();
        let mut args = vec!["runp"];
        if !handler.is_empty() {
            args.extend(["--runtime", handler]);
        }
        args.push(&file);
        let output = self.runtimed.crictl(&args);
        if output.status.success() {
            Ok(String::from_utf8(output.stdout).unwrap().trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    /// Pulls the busybox fixture through imaged.
    pub fn pull_busybox(&self) {
        let output = self.crictl_output(&["pull", &self.busybox]);
        assert!(output.status.success(), "{output:?}");
    }

    /// `crictl inspectp -o json`.
    pub fn inspect(&self, id: &str) -> serde_json::Value {
        serde_json::from_str(&self.crictl(&["inspectp", "-o", "json", id])).unwrap()
    }

    /// Files of the host-local IPAM store (one per leased address).
    pub fn leased(&self) -> Vec<String> {
        let dir = self.leases.join(format!("net-{}", self.bridge));
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains('.') && !n.starts_with("last_reserved") && n != "lock")
            .collect()
    }
}

impl Drop for Node {
    /// Removes every pod first, so a failed test leaves no process, mount or address.
    fn drop(&mut self) {
        let _ = self.crictl_output(&["rmp", "--all", "--force"]);
        let _ = self.imaged.kill();
        let _ = self.imaged.wait();
        let _ = Command::new("ip")
            .args(["link", "delete", &self.bridge])
            .status();
    }
}

/// runtimed on the config file in `dir`, its state directory given by flag.
fn spawn(dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("runtimed.log"))
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_runtimed"))
        .arg("serve")
        .arg("--config")
        .arg(dir.join("runtimed.toml"))
        .arg("--state")
        .arg(dir.join("state"))
        .env("RUNTIMED_LOG", "debug")
        .stderr(log)
        .spawn()
        .unwrap()
}

fn imaged_config(dir: &Path) -> PathBuf {
    let config = dir.join("imaged.toml");
    let text = format!(
        "root = {:?}\nstate = {:?}\n",
        dir.join("imaged-root"),
        dir.join("imaged")
    );
    std::fs::write(&config, text).unwrap();
    config
}

fn wait_for(socket: &Path, log: impl Fn() -> String) {
    for _ in 0..400 {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{} did not appear: {}", socket.display(), log());
}

/// A program of the workspace's target directory (`imaged`, and crictl which `make deps`
/// puts in `target/tools`), else from `PATH`.
pub fn tool(name: &str) -> PathBuf {
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    [
        target.join("debug").join(name),
        target.join("tools").join(name),
    ]
    .into_iter()
    .find(|p| p.exists())
    .unwrap_or_else(|| name.into())
}

pub fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "crictl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}
