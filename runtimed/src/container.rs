//! Containers: their records and the steps of their lives. A container is created under
//! conmon at CreateContainer (CRI-O's order: the runtime's `create` runs then, so a bad spec
//! fails the create) and started by StartContainer; conmon writes its CRI log and its exit
//! status.

use crate::error::Error;
use crate::oci::{Conmon, Create, Runtime};
use proto::cri;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// What is kept of a container, in memory and in `<root>/containers/<id>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Container {
    /// 64 hex digits.
    pub id: String,
    /// Its sandbox.
    pub sandbox_id: String,
    /// The request's config, as given.
    pub config: cri::ContainerConfig,
    /// The image as asked for (ContainerStatus.image).
    pub image_name: String,
    /// The image's repo digest (image_ref).
    pub image_ref: String,
    /// The image's id.
    pub image_id: String,
    /// The image's stop signal, if it names one.
    pub stop_signal: Option<String>,
    /// The handler of its sandbox.
    pub runtime_handler: String,
    /// The absolute CRI log path; empty when the sandbox or the container gave none.
    pub log_path: String,
    /// Nanoseconds since the epoch.
    pub created_at: i64,
    /// When StartContainer succeeded; 0 before.
    pub started_at: i64,
    /// The container's init process on the host.
    pub pid: i64,
    /// The uid, gid and groups its first process starts with (ContainerStatus.user).
    #[serde(default)]
    pub user: Option<cri::ContainerUser>,
}

/// The state as the CRI sees it, from the record and conmon's exit file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit status (128 + signal for a signal).
    pub code: i32,
    /// When the exit file was written, nanoseconds since the epoch.
    pub at: i64,
}

impl Container {
    /// `name_sandbox_attempt`: unique in its pod.
    pub fn reserved_name(config: &cri::ContainerConfig, sandbox_id: &str) -> String {
        let m = config.metadata.clone().unwrap_or_default();
        format!("{}_{}_{}", m.name, sandbox_id, m.attempt)
    }

    /// Whether a list filter selects it: id and sandbox id by prefix (empty matches all),
    /// and every label of `labels`.
    pub fn selected(
        &self,
        id: &str,
        sandbox_id: &str,
        labels: &std::collections::HashMap<String, String>,
    ) -> bool {
        self.id.starts_with(id)
            && self.sandbox_id.starts_with(sandbox_id)
            && labels
                .iter()
                .all(|(k, v)| self.config.labels.get(k) == Some(v))
    }

    /// How it exited, once it did.
    pub fn exit(&self, conmon: &Conmon) -> Option<Exit> {
        let code = conmon.exit_status(&self.id)?;
        let modified = std::fs::metadata(conmon.exits.join(&self.id))
            .and_then(|m| m.modified())
            .ok()?;
        let at = modified
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        Some(Exit { code, at })
    }

    /// CREATED, RUNNING or EXITED.
    pub fn state(&self, conmon: &Conmon) -> cri::ContainerState {
        if self.exit(conmon).is_some() {
            cri::ContainerState::ContainerExited
        } else if self.started_at > 0 {
            cri::ContainerState::ContainerRunning
        } else {
            cri::ContainerState::ContainerCreated
        }
    }
}

/// Where a container's files are: its bundle under `state`.
pub fn bundle(state: &Path, id: &str) -> PathBuf {
    state.join("containers").join(id)
}

/// `OOMKilled` when conmon saw the cgroup's OOM killer at work, else `Completed` for exit 0
/// and `Error` otherwise.
pub fn reason(bundle: &Path, exit: Exit) -> &'static str {
    if bundle.join("oom").exists() {
        "OOMKilled"
    } else if exit.code == 0 {
        "Completed"
    } else {
        "Error"
    }
}

/// Creates the container under conmon from the spec at `<bundle>/config.json`.
pub fn create(
    container: &Container,
    bundle: &Path,
    runtime: &Runtime,
    conmon: &Conmon,
) -> Result<i64, Error> {
    let log = if container.log_path.is_empty() {
        bundle.join("console.log")
    } else {
        PathBuf::from(&container.log_path)
    };
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent).map_err(Error::io("create log directory", parent))?;
    }
    let name = Container::reserved_name(&container.config, &container.sandbox_id);
    let create = Create {
        id: &container.id,
        name: &name,
        bundle,
        log: &log,
        stdio: crate::oci::StdioMode {
            tty: container.config.tty,
            stdin: container.config.stdin,
            stdin_once: container.config.stdin_once,
        },
    };
    Ok(conmon.create(runtime, &create)?)
}

/// Sends the stop signal, waits `timeout` seconds for the exit, then SIGKILL and waits
/// again. A container that is not running is left as it is.
pub fn stop(
    container: &Container,
    timeout: i64,
    runtime: &Runtime,
    conmon: &Conmon,
) -> Result<(), Error> {
    if container.exit(conmon).is_some() || container.pid == 0 {
        return Ok(());
    }
    let signal = container
        .stop_signal
        .clone()
        .unwrap_or_else(|| "TERM".into());
    let signal = signal.trim_start_matches("SIG").to_string();
    if timeout > 0 && signal != "KILL" {
        if let Err(e) = runtime.kill(&container.id, &signal) {
            tracing::debug!(error = %e, "stop signal");
        }
        if wait_exit(
            container,
            conmon,
            std::time::Duration::from_secs(timeout as u64),
        ) {
            return Ok(());
        }
    }
    if let Err(e) = runtime.kill(&container.id, "KILL") {
        tracing::debug!(error = %e, "SIGKILL");
    }
    if wait_exit(container, conmon, std::time::Duration::from_secs(10)) {
        return Ok(());
    }
    Err(Error::FailedPrecondition(format!(
        "container {}: still running 10 s after SIGKILL",
        container.id
    )))
}

fn wait_exit(container: &Container, conmon: &Conmon, limit: std::time::Duration) -> bool {
    let started = std::time::Instant::now();
    while started.elapsed() < limit {
        if container.exit(conmon).is_some() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    container.exit(conmon).is_some()
}

/// Removes the runtime's state, the rootfs mount and the bundle; what is gone is fine. The
/// mount and the bundle go even when the runtime fails, and its error is returned after.
pub fn remove_files(
    container: &Container,
    bundle: &Path,
    runtime: &Runtime,
    conmon: &Conmon,
) -> Result<(), Error> {
    let deleted = crate::sandbox::delete_state(runtime, &container.id);
    let _ = std::fs::remove_file(conmon.exits.join(&container.id));
    crate::sandbox::remove_bundle(bundle)?;
    deleted
}

/// Asks conmon to reopen the log (`2 0 0` on the `ctl` fifo in the bundle) and waits, a
/// few seconds at most, until the file exists again.
pub fn reopen_log(bundle: &Path, log: &Path) -> Result<(), Error> {
    use std::io::Write as _;
    let ctl = bundle.join("ctl");
    let mut fifo = std::fs::OpenOptions::new()
        .write(true)
        .open(&ctl)
        .map_err(Error::io("open", &ctl))?;
    fifo.write_all(b"2 0 0\n")
        .map_err(Error::io("write to", &ctl))?;
    for _ in 0..250 {
        if log.exists() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Err(Error::FailedPrecondition(format!(
        "conmon did not reopen {} within 5 s",
        log.display()
    )))
}

/// Applies `limits` to container `id` with `RUNTIME update --resources`, and records them
/// in the bundle's spec so that a later read of it agrees.
pub fn update(
    runtime: &Runtime,
    id: &str,
    bundle: &Path,
    limits: &oci_spec::runtime::LinuxResources,
) -> Result<(), Error> {
    let file = bundle.join("resources.json");
    let json = serde_json::to_vec(limits).expect("resources serialise");
    std::fs::write(&file, json).map_err(Error::io("write", &file))?;
    let output = runtime
        .command()
        .arg("update")
        .arg("--resources")
        .arg(&file)
        .arg(id)
        .output()
        .map_err(Error::io("run runtime update for", id))?;
    if !output.status.success() {
        return Err(Error::Oci(crate::oci::OciError::Failed {
            id: id.into(),
            program: runtime.name.clone(),
            command: "update".into(),
            message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        }));
    }
    let config = bundle.join("config.json");
    let mut spec: serde_json::Value = std::fs::read(&config)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    spec["linux"]["resources"] = serde_json::to_value(limits).expect("resources serialise");
    std::fs::write(&config, spec.to_string()).map_err(Error::io("write", &config))
}
