//! ExecSync: a command run in a running container with the container's own process
//! settings (user, capabilities, environment, working directory), through `RUNTIME exec`,
//! its output captured up to a cap and its run time bounded. A command that outlives its
//! timeout is killed inside the container, as critest's execSync spec checks.

use crate::error::Error;
use crate::oci::Runtime;
use std::io::Read;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// containerd caps each of stdout and stderr at 16 MiB.
pub const OUTPUT_CAP: usize = 16 << 20;

/// What a finished command left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Its stdout, at most [`OUTPUT_CAP`] bytes.
    pub stdout: Vec<u8>,
    /// Its stderr, at most [`OUTPUT_CAP`] bytes.
    pub stderr: Vec<u8>,
    /// Its exit status (128 + signal when killed by one).
    pub exit_code: i32,
}

/// Runs `cmd` in container `id`, whose bundle holds the container's `config.json`; gives up
/// after `timeout` (none when zero), killing the command.
pub fn exec_sync(
    runtime: &Runtime,
    id: &str,
    bundle: &Path,
    cmd: &[String],
    timeout: Duration,
) -> Result<Output, Error> {
    let files = ExecFiles::write(id, bundle, cmd, false)?;
    let pid_file = files.pid.clone();
    let mut child = runtime
        .command()
        .arg("exec")
        .arg("--process")
        .arg(&files.process)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg(id)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| {
            Error::Oci(crate::oci::OciError::Spawn {
                id: id.into(),
                program: runtime.name.clone(),
                source,
            })
        })?;
    let stdout = capture(child.stdout.take().expect("piped"));
    let stderr = capture(child.stderr.take().expect("piped"));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .map_err(Error::io("wait for exec of", id))?
        {
            break status;
        }
        if !timeout.is_zero() && started.elapsed() >= timeout {
            kill_exec(&pid_file);
            // The runtime reaps what it exec'd; answer once it has, so the command is gone
            // when the caller looks.
            let reaped = (0..250).any(|_| {
                std::thread::sleep(Duration::from_millis(20));
                matches!(child.try_wait(), Ok(Some(_)))
            });
            if !reaped {
                let _ = child.kill();
                let _ = child.wait();
            }
            return Err(Error::DeadlineExceeded(format!(
                "container {id}: command {cmd:?} timed out after {timeout:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    use std::os::unix::process::ExitStatusExt as _;
    let exit_code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1);
    Ok(Output {
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        exit_code,
    })
}

/// The process spec of one `RUNTIME exec` and the file the runtime writes its pid to, in
/// a directory of the bundle that goes away with this value.
pub struct ExecFiles {
    _dir: tempfile::TempDir,
    /// `process.json`: the container's process with the command's arguments.
    pub process: std::path::PathBuf,
    /// Where `--pid-file` puts the command's host pid.
    pub pid: std::path::PathBuf,
}

impl ExecFiles {
    /// Writes the container's own process settings with `cmd` and `terminal` in place.
    pub fn write(id: &str, bundle: &Path, cmd: &[String], terminal: bool) -> Result<Self, Error> {
        if cmd.is_empty() {
            return Err(Error::InvalidArgument("exec command is empty".into()));
        }
        let spec: serde_json::Value = std::fs::read(bundle.join("config.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                Error::FailedPrecondition(format!("container {id} has no readable spec"))
            })?;
        let mut process = spec["process"].clone();
        process["args"] = serde_json::json!(cmd);
        process["terminal"] = terminal.into();
        let dir = tempfile::Builder::new()
            .prefix("exec-")
            .tempdir_in(bundle)
            .map_err(Error::io("create exec directory in", bundle))?;
        let process_file = dir.path().join("process.json");
        std::fs::write(&process_file, process.to_string())
            .map_err(Error::io("write", &process_file))?;
        Ok(Self {
            pid: dir.path().join("pid"),
            process: process_file,
            _dir: dir,
        })
    }
}

/// Reads `pipe` to its end on a thread, keeping the first [`OUTPUT_CAP`] bytes.
fn capture(pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let _ = pipe.take(OUTPUT_CAP as u64).read_to_end(&mut kept);
        kept
    })
}

/// SIGKILLs the exec'd process, whose host pid the runtime wrote to `pid_file`, and every
/// process it started (a shell's children would otherwise outlive it).
pub fn kill_exec(pid_file: &Path) {
    let Some(root) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return;
    };
    let mut doomed = vec![root];
    let parents = parents();
    let mut i = 0;
    while i < doomed.len() {
        let parent = doomed[i];
        doomed.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        i += 1;
    }
    for pid in doomed
        .into_iter()
        .filter_map(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// `(pid, parent pid)` of every process, from `/proc/<pid>/stat`.
fn parents() -> Vec<(i32, i32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The name in parentheses may hold spaces; the fields after it do not.
            let after = &stat[stat.rfind(')')? + 2..];
            let ppid = after.split(' ').nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect()
}
