//! A daemon per test: its own root, state and certs.d under a temporary directory.

use fixtures::image::{Built, ImageSpec};
use fixtures::registry::{Registry, RegistryOptions};
use fixtures::tree::Tree;
use fixtures::volume::Volume;
use proto::cri;
use proto::cri::image_service_client::ImageServiceClient;
use proto::imaged::snapshots_client::SnapshotsClient;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;
use tonic::transport::Channel;

pub struct Imaged {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub socket: PathBuf,
    pub certs: PathBuf,
    child: Option<Child>,
}

impl Imaged {
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// Starts imaged with `extra` appended to its config file.
    pub async fn start_with(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        Self::start_in(dir, root, Some(extra)).await
    }

    /// Starts imaged with its root at `root` (e.g. on a filesystem the test mounted).
    pub async fn start_at(root: &Path, extra: &str) -> Self {
        Self::start_in(
            tempfile::tempdir().unwrap(),
            root.to_path_buf(),
            Some(extra),
        )
        .await
    }

    /// Stops the daemon and starts it again on the same root with `extra` as the config's
    /// additions instead.
    pub async fn restart_with(mut self, extra: &str) -> Self {
        self.halt();
        let dir = tempfile::TempDir::new_in("/tmp").unwrap();
        let old = std::mem::replace(&mut self.dir, dir);
        let root = self.root.clone();
        Self::start_in(old, root, Some(extra)).await
    }

    /// Kills the daemon without warning (a crash) and starts it again on the same root.
    pub async fn crash_and_restart(mut self) -> Self {
        self.halt();
        assert!(
            self.socket.exists(),
            "a killed daemon leaves its socket behind"
        );
        self.resume().await
    }

    /// Sends SIGTERM and waits up to `limit` for the daemon to exit: its status, or `None`
    /// (the daemon then still runs).
    pub async fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().unwrap();
        rustix::process::kill_process(
            rustix::process::Pid::from_child(child),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        let started = std::time::Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Kills the daemon and leaves its store as it was, for [`Imaged::resume`].
    pub fn halt(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Starts the daemon again, with the same config, after [`Imaged::halt`].
    pub async fn resume(mut self) -> Self {
        assert!(self.child.is_none(), "the daemon is running");
        let dir = tempfile::TempDir::new_in("/tmp").unwrap();
        let old = std::mem::replace(&mut self.dir, dir);
        let root = self.root.clone();
        Self::start_in(old, root, None).await
    }

    /// Runs `imaged check` on this daemon's config with `args`: the exit status and stdout.
    pub fn check(&self, args: &[&str]) -> (i32, String) {
        let output = Command::new(env!("CARGO_BIN_EXE_imaged"))
            .args(["check", "--config"])
            .arg(self.dir.path().join("imaged.toml"))
            .args(args)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr);
        (output.status.code().unwrap(), format!("{stdout}{stderr}"))
    }

    /// Starts imaged in `dir`; a config is written when `extra` is given, else the one
    /// there is used again.
    async fn start_in(dir: tempfile::TempDir, root: PathBuf, extra: Option<&str>) -> Self {
        let certs = dir.path().join("certs.d");
        std::fs::create_dir_all(&certs).unwrap();
        let socket = dir.path().join("state/imaged.sock");
        let config = dir.path().join("imaged.toml");
        if let Some(extra) = extra {
            std::fs::write(
                &config,
                format!(
                    "root = {root:?}\nstate = {:?}\n{extra}\n[registry]\nconfig_path = {certs:?}\n",
                    dir.path().join("state")
                ),
            )
            .unwrap();
        }
        let log = std::fs::File::create(dir.path().join("imaged.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_imaged"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("IMAGED_LOG", "debug")
            .stderr(log)
            .spawn()
            .unwrap();
        let imaged = Self {
            dir,
            root,
            socket,
            certs,
            child: Some(child),
        };
        for _ in 0..200 {
            if std::os::unix::net::UnixStream::connect(&imaged.socket).is_ok() {
                return imaged;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("imaged did not start: {}", imaged.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("imaged.log")).unwrap_or_default()
    }

    /// Writes `<certs.d>/<host>/hosts.toml`.
    pub fn hosts_toml(&self, host: &str, text: &str) {
        let dir = self.certs.join(host);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hosts.toml"), text).unwrap();
    }

    pub async fn channel(&self) -> Channel {
        imaged::cli::connect(&self.socket).await.unwrap()
    }

    pub async fn cri(&self) -> ImageServiceClient<Channel> {
        ImageServiceClient::new(self.channel().await)
    }

    /// Starts a PullImage that goes on while the test does other things.
    pub async fn pull_in_background(
        &self,
        image: &str,
    ) -> tokio::task::JoinHandle<Result<tonic::Response<cri::PullImageResponse>, tonic::Status>>
    {
        let mut client = self.cri().await;
        let request = cri::PullImageRequest {
            image: Some(spec(image)),
            ..Default::default()
        };
        tokio::spawn(async move { client.pull_image(request).await })
    }

    pub async fn pull(&self, image: &str) -> Result<String, tonic::Status> {
        self.pull_with(image, None).await
    }

    pub async fn pull_with(
        &self,
        image: &str,
        auth: Option<cri::AuthConfig>,
    ) -> Result<String, tonic::Status> {
        let response = self
            .cri()
            .await
            .pull_image(cri::PullImageRequest {
                image: Some(spec(image)),
                auth,
                sandbox_config: None,
            })
            .await?;
        Ok(response.into_inner().image_ref)
    }

    pub async fn status(&self, image: &str) -> Option<cri::Image> {
        self.cri()
            .await
            .image_status(cri::ImageStatusRequest {
                image: Some(spec(image)),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .image
    }

    pub async fn remove(&self, image: &str) {
        self.cri()
            .await
            .remove_image(cri::RemoveImageRequest {
                image: Some(spec(image)),
            })
            .await
            .unwrap();
    }

    pub async fn list(&self) -> Vec<cri::Image> {
        self.cri()
            .await
            .list_images(cri::ListImagesRequest { filter: None })
            .await
            .unwrap()
            .into_inner()
            .images
    }

    /// Mounts a read-only view of the image and reads its file tree.
    pub async fn rootfs(&self, image: &str) -> Tree {
        let key = format!("view-{}", rand_suffix());
        let mut snapshots = SnapshotsClient::new(self.channel().await);
        let response = snapshots
            .prepare(proto::imaged::PrepareRequest {
                image: image.to_string(),
                key: key.clone(),
                readonly: true,
            })
            .await
            .unwrap();
        let mounts = imaged::internal_api::mounts_from(response.into_inner());
        let target = tempfile::tempdir().unwrap();
        plumbing::mount::Mount::mount_all(&mounts, target.path()).unwrap();
        let tree = Tree::read(target.path());
        plumbing::mount::unmount(target.path()).unwrap();
        snapshots
            .remove(proto::imaged::RemoveSnapshotRequest { key })
            .await
            .unwrap();
        tree.unwrap()
    }

    /// Every file under the content store and snapshot directories.
    pub fn store_files(&self) -> BTreeSet<String> {
        let mut files = BTreeSet::new();
        for top in ["content/blobs", "content/ingest", "snapshots"] {
            walk(&self.root.join(top), &self.root, &mut files);
        }
        files
    }

    /// SIGTERM, then the exit status.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&child),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        child.wait().unwrap()
    }
}

impl Drop for Imaged {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn walk(dir: &Path, root: &Path, out: &mut BTreeSet<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        out.insert(path.strip_prefix(root).unwrap().display().to_string());
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&path, root, out);
        }
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// A `127.0.0.1:PORT` with nothing listening (until the test starts something there).
pub fn free_addr() -> String {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string()
}

pub fn spec(image: &str) -> cri::ImageSpec {
    cri::ImageSpec {
        image: image.to_string(),
        ..Default::default()
    }
}

pub fn registry() -> Registry {
    Registry::start(RegistryOptions::default()).unwrap()
}

/// Builds `spec`, pushes it as `repo:tag`, returns the built image.
pub fn push(registry: &Registry, repo: &str, tag: &str, spec: &ImageSpec) -> Built {
    let built = spec.build().unwrap();
    registry.pusher().push_image(repo, &built, &[tag]).unwrap();
    built
}

/// Registry requests (method and path) that name `needle`.
pub fn requests_for(registry: &Registry, needle: &str) -> Vec<String> {
    registry
        .requests()
        .into_iter()
        .filter(|r| r.contains(needle))
        .collect()
}

/// The GET requests the registry served for `digest`.
pub fn gets_of(registry: &Registry, digest: &str) -> Vec<String> {
    requests_for(registry, digest)
        .into_iter()
        .filter(|r| r.starts_with("GET"))
        .collect()
}

pub fn assert_tree(expected: &Tree, actual: &Tree, what: &str) {
    let diff = expected.diff(actual);
    assert!(
        diff.is_empty(),
        "{what}: rootfs differs:\n{}",
        diff.join("\n")
    );
}

/// No file below `dir` (store, state, configuration, log) holds `needle`.
pub fn assert_not_on_disk(dir: &std::path::Path, needle: &[u8]) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            assert_not_on_disk(&path, needle);
        } else if meta.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "a credential was written to {}",
                path.display()
            );
        }
    }
}

/// A directory for imaged's root that suits a snapshotter: on a loop-mounted btrfs for
/// btrfs, else on the test machine's disk. Declare it before the daemon using it, so the
/// daemon goes first.
pub struct Disk {
    pub root: PathBuf,
    _volume: Option<Volume>,
    _dir: tempfile::TempDir,
}

pub fn disk_for(backend: &str) -> Disk {
    let dir = tempfile::tempdir().unwrap();
    let volume = (backend == "btrfs").then(|| Volume::btrfs(dir.path()).unwrap());
    let root = volume
        .as_ref()
        .map_or(dir.path().to_path_buf(), |v| v.mountpoint.clone())
        .join("root");
    Disk {
        root,
        _volume: volume,
        _dir: dir,
    }
}
