//! The OCI runtime (runc, crun) and conmon, driven the way CRI-O drives them: conmon runs
//! `RUNTIME create` for a container, holds its stdio and log, records its exit status in
//! the exit directory and outlives runtimed; runtimed itself runs `start`, `kill`, `state`
//! and `delete`.

use std::io::{BufRead as _, BufReader};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Why a runtime or conmon call failed; every variant names the container.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// A binary is not there.
    #[error("{what} {path:?} not found (set its path in the configuration)")]
    Missing {
        /// `conmon` or `runtime <name>`.
        what: String,
        /// Path or name looked up.
        path: PathBuf,
    },
    /// A process could not be run.
    #[error("container {id}: running {program}: {source}")]
    Spawn {
        /// Container.
        id: String,
        /// Program.
        program: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The runtime refused.
    #[error("container {id}: {program} {command} failed: {message}")]
    Failed {
        /// Container.
        id: String,
        /// Program.
        program: String,
        /// Subcommand.
        command: String,
        /// Its stderr, or conmon's report.
        message: String,
    },
}

/// One configured OCI runtime.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// The handler name.
    pub name: String,
    /// Absolute path of the binary.
    pub path: PathBuf,
    /// `--root` of the runtime.
    pub root: PathBuf,
    /// Pass `--systemd-cgroup`.
    pub systemd_cgroup: bool,
}

/// What `RUNTIME state` reports.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct State {
    /// `created`, `running`, `stopped`, `paused`.
    pub status: String,
}

impl Runtime {
    /// The runtime's command line with its global options (`--root`, cgroup driver).
    pub fn command(&self) -> Command {
        let mut command = Command::new(&self.path);
        command.arg("--root").arg(&self.root);
        if self.systemd_cgroup {
            command.arg("--systemd-cgroup");
        }
        command.stdin(Stdio::null());
        command
    }

    fn run(&self, id: &str, args: &[&str]) -> Result<Vec<u8>, OciError> {
        let output = self
            .command()
            .args(args)
            .output()
            .map_err(|source| OciError::Spawn {
                id: id.into(),
                program: self.name.clone(),
                source,
            })?;
        if output.status.success() {
            return Ok(output.stdout);
        }
        Err(OciError::Failed {
            id: id.into(),
            program: self.name.clone(),
            command: args.first().copied().unwrap_or_default().into(),
            message: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        })
    }

    /// Starts a created container.
    pub fn start(&self, id: &str) -> Result<(), OciError> {
        self.run(id, &["start", id]).map(drop)
    }

    /// Sends `signal` (`KILL`, `TERM`, ...) to the container's init process.
    pub fn kill(&self, id: &str, signal: &str) -> Result<(), OciError> {
        self.run(id, &["kill", id, signal]).map(drop)
    }

    /// Deletes the container's runtime state, killing it first when `force`.
    pub fn delete(&self, id: &str) -> Result<(), OciError> {
        self.run(id, &["delete", "--force", id]).map(drop)
    }

    /// The container's state; `None` when the runtime does not know it.
    pub fn state(&self, id: &str) -> Result<Option<State>, OciError> {
        match self.run(id, &["state", id]) {
            Ok(stdout) => serde_json::from_slice(&stdout)
                .map(Some)
                .map_err(|e| OciError::Failed {
                    id: id.into(),
                    program: self.name.clone(),
                    command: "state".into(),
                    message: e.to_string(),
                }),
            Err(OciError::Failed { message, .. })
                if message.contains("does not exist") || message.contains("not found") =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// conmon and the directories it writes to.
#[derive(Debug, Clone)]
pub struct Conmon {
    /// Absolute path of conmon.
    pub path: PathBuf,
    /// Where conmon writes `<id>` with the exit status.
    pub exits: PathBuf,
    /// Where conmon puts the attach sockets (short paths for clients).
    pub sockets: PathBuf,
    /// `--log-size-max`; -1 for none.
    pub log_size_max: i64,
}

/// A container to create under conmon.
#[derive(Debug, Clone)]
pub struct Create<'a> {
    /// Container id.
    pub id: &'a str,
    /// Its name, for conmon's logs.
    pub name: &'a str,
    /// The bundle directory holding `config.json`.
    pub bundle: &'a Path,
    /// The CRI log file.
    pub log: &'a Path,
    /// The container's stdio: a terminal, an open stdin.
    pub stdio: StdioMode,
}

/// How conmon holds a container's stdio for attach.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StdioMode {
    /// A terminal (conmon takes the pty from the runtime's console socket).
    pub tty: bool,
    /// stdin stays open for attach.
    pub stdin: bool,
    /// stdin closes when the first attached client ends its input.
    pub stdin_once: bool,
}

impl Conmon {
    /// The exit status conmon recorded for `id`, once it exited.
    pub fn exit_status(&self, id: &str) -> Option<i32> {
        let text = std::fs::read_to_string(self.exits.join(id)).ok()?;
        text.trim().parse().ok()
    }

    /// Runs `RUNTIME create` under a new conmon; returns the container's pid.
    pub fn create(&self, runtime: &Runtime, container: &Create<'_>) -> Result<i64, OciError> {
        let id = container.id;
        let spawn = |source| OciError::Spawn {
            id: id.into(),
            program: "conmon".into(),
            source,
        };
        let (reader, writer) = rustix::pipe::pipe().map_err(|e| spawn(e.into()))?;
        let mut command = self.command(runtime, container);
        let writer_fd = writer.as_raw_fd();
        // SAFETY: between fork and exec only dup2 runs, which is async-signal-safe; fd 3
        // becomes the sync pipe conmon reports on, without CLOEXEC.
        unsafe {
            command.pre_exec(move || {
                if libc::dup2(writer_fd, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let log = container.bundle.join("conmon.log");
        let log_file = std::fs::File::create(&log).map_err(spawn)?;
        command.stderr(log_file);
        let status = command.status().map_err(spawn)?;
        drop(writer);
        let report = read_report(reader);
        match report {
            Some(Report { pid, .. }) if pid > 0 && status.success() => Ok(pid),
            other => {
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                let message = other
                    .map(|r| r.message)
                    .filter(|m| !m.is_empty())
                    .or_else(|| said.lines().last().map(str::to_string))
                    .unwrap_or_else(|| format!("exited with {status} without reporting a pid"));
                Err(OciError::Failed {
                    id: id.into(),
                    program: format!("conmon (runtime {})", runtime.name),
                    command: "create".into(),
                    message,
                })
            }
        }
    }

    fn command(&self, runtime: &Runtime, container: &Create<'_>) -> Command {
        let bundle = container.bundle;
        let mut command = Command::new(&self.path);
        command
            .current_dir(bundle)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("_OCI_SYNCPIPE", "3")
            .args(["--api-version", "1", "-c", container.id, "-u", container.id])
            .arg("-n")
            .arg(container.name)
            .arg("-r")
            .arg(&runtime.path)
            .arg("-b")
            .arg(bundle)
            .arg("-p")
            .arg(bundle.join("pidfile"))
            .arg("-P")
            .arg(bundle.join("conmon-pidfile"))
            .arg("-l")
            .arg(format!("k8s-file:{}", container.log.display()))
            .arg("--exit-dir")
            .arg(&self.exits)
            .arg("--persist-dir")
            .arg(bundle)
            .arg("--socket-dir-path")
            .arg(&self.sockets)
            .args(["--log-level", "info"])
            .arg("--runtime-arg")
            .arg(format!("--root={}", runtime.root.display()));
        if runtime.systemd_cgroup {
            command.args(["--runtime-arg", "--systemd-cgroup"]);
        }
        let stdio = container.stdio;
        if stdio.tty {
            command.arg("-t");
        }
        if stdio.stdin {
            command.arg("-i");
            if !stdio.stdin_once {
                command.arg("--leave-stdin-open");
            }
        }
        if self.log_size_max >= 0 {
            command
                .arg("--log-size-max")
                .arg(self.log_size_max.to_string());
        }
        command.stdin(Stdio::null()).stdout(Stdio::null());
        command
    }
}

/// conmon's answer on the sync pipe: `{"data": pid}` (or `"pid"`), with `message` on
/// failure.
struct Report {
    pid: i64,
    message: String,
}

fn read_report(reader: OwnedFd) -> Option<Report> {
    let mut line = String::new();
    BufReader::new(std::fs::File::from(reader))
        .read_line(&mut line)
        .ok()?;
    let value: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    let pid = value.get("data").or(value.get("pid"))?.as_i64()?;
    let message = value["message"].as_str().unwrap_or_default().to_string();
    Some(Report { pid, message })
}

/// What a runtime handler can do beyond the OCI spec's basics, as `RUNTIME features` (OCI
/// runtime features, runc 1.1 and later) reports it; a runtime without that command is
/// taken to have none of them, as containerd takes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// `rro` mounts (read-only with every mount below); also needs Linux 5.12's
    /// mount_setattr(2).
    pub recursive_read_only: bool,
}

impl Runtime {
    /// The handler's features; none when it cannot say.
    pub fn features(&self) -> Features {
        let output = Command::new(&self.path)
            .arg("features")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output();
        match output {
            Ok(out) if out.status.success() => parse_features(&out.stdout),
            _ => Features::default(),
        }
    }
}

fn parse_features(json: &[u8]) -> Features {
    let report: serde_json::Value = serde_json::from_slice(json).unwrap_or_default();
    let options = report["mountOptions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    Features {
        recursive_read_only: options.iter().any(|o| o == "rro")
            && crate::spec::kernel_at_least(5, 12),
    }
}

/// `name` as an absolute path: itself when it has a `/`, else found on `PATH`.
pub fn find_binary(what: &str, name: &Path) -> Result<PathBuf, OciError> {
    let missing = || OciError::Missing {
        what: what.into(),
        path: name.to_path_buf(),
    };
    if name.components().count() > 1 || name.is_absolute() {
        return if name.is_file() {
            std::path::absolute(name).map_err(|_| missing())
        } else {
            Err(missing())
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .ok_or_else(missing)
}
