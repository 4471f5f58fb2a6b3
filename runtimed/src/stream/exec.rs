//! Exec through the streaming server: `RUNTIME exec` runs the command in the container,
//! as CRI-O runs it. Without a terminal the runtime's stdio are pipes the command
//! inherits. With one, the runtime's stdio is the slave side of a pty made here and the
//! runtime is that terminal's session leader: it makes the container's own pty and relays
//! between the two, and it follows this pty's size when a resize raises SIGWINCH.

use super::fd::Fd;
use crate::exec::{ExecFiles, kill_exec};
use crate::oci::Runtime;
use bytes::Bytes;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use streaming::{Io, Outcome, TerminalSize};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;

/// The command, killed with everything it started unless it was seen to exit; so a
/// client that goes away (which drops the session's future) takes the command with it.
struct Running {
    files: ExecFiles,
    exited: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.exited {
            kill_exec(&self.files.pid);
        }
    }
}

/// Runs `cmd` in container `id` with the client's `io`.
pub async fn exec(
    runtime: Runtime,
    id: String,
    bundle: &Path,
    cmd: Vec<String>,
    tty: bool,
    io: Io,
) -> Outcome {
    let files = match ExecFiles::write(&id, bundle, &cmd, tty) {
        Ok(files) => files,
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    let mut running = Running {
        files,
        exited: false,
    };
    let mut command = tokio::process::Command::from(runtime.command());
    // Dropped before the runtime wrote the pid file, the runtime itself must go, or it
    // would still start the command.
    command.kill_on_drop(true);
    command
        .arg("exec")
        .arg("--process")
        .arg(&running.files.process)
        .arg("--pid-file")
        .arg(&running.files.pid)
        .arg(&id);
    let result = if tty {
        with_terminal(command, io, &mut running).await
    } else {
        with_pipes(command, io, &mut running).await
    };
    match result {
        Ok(status) => Outcome::Exited(exit_code(status)),
        Err(e) => Outcome::Failed(format!(
            "container {id}: exec {cmd:?} with {}: {e}",
            runtime.name
        )),
    }
}

fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

async fn with_pipes(
    mut command: tokio::process::Command,
    io: Io,
    running: &mut Running,
) -> std::io::Result<ExitStatus> {
    let piped = |wanted: bool| {
        if wanted {
            Stdio::piped()
        } else {
            Stdio::null()
        }
    };
    command
        .stdin(piped(io.stdin.is_some()))
        .stdout(piped(io.stdout.is_some()))
        .stderr(piped(io.stderr.is_some()));
    let mut child = command.spawn()?;
    let feeding = match (io.stdin, child.stdin.take()) {
        (Some(input), Some(mut pipe)) => Some(tokio::spawn(async move {
            let mut input = input;
            while let Some(data) = input.recv().await {
                if pipe.write_all(&data).await.is_err() {
                    return;
                }
            }
        })),
        _ => None,
    };
    let mut copies = Vec::new();
    if let (Some(tx), Some(pipe)) = (io.stdout, child.stdout.take()) {
        copies.push(tokio::spawn(copy_out(pipe, tx)));
    }
    if let (Some(tx), Some(pipe)) = (io.stderr, child.stderr.take()) {
        copies.push(tokio::spawn(copy_out(pipe, tx)));
    }
    let status = child.wait().await?;
    running.exited = true;
    for copy in copies {
        let _ = copy.await;
    }
    if let Some(feeding) = feeding {
        feeding.abort();
    }
    Ok(status)
}

/// Copies a pipe to the client until the pipe's end.
async fn copy_out(mut pipe: impl AsyncRead + Unpin, tx: mpsc::Sender<Bytes>) {
    let mut buf = vec![0u8; 32 << 10];
    while let Ok(n @ 1..) = pipe.read(&mut buf).await {
        if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
            return;
        }
    }
}

async fn with_terminal(
    mut command: tokio::process::Command,
    io: Io,
    running: &mut Running,
) -> std::io::Result<ExitStatus> {
    use rustix::pty::OpenptFlags;
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let master = rustix::pty::openpt(flags)?;
    rustix::pty::grantpt(&master)?;
    rustix::pty::unlockpt(&master)?;
    let slave = rustix::pty::ioctl_tiocgptpeer(&master, flags)?;
    let stdio = |fd: &OwnedFd| fd.try_clone().map(Stdio::from);
    command
        .stdin(stdio(&slave)?)
        .stdout(stdio(&slave)?)
        .stderr(stdio(&slave)?);
    // SAFETY: setsid(2) and ioctl(2) are async-signal-safe; the child becomes the
    // session leader with the pty on fd 0 as its controlling terminal.
    unsafe {
        command.pre_exec(|| {
            rustix::process::setsid()?;
            rustix::process::ioctl_tiocsctty(std::os::fd::BorrowedFd::borrow_raw(0))?;
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    // The runtime holds the slave now; the pty reports its end once the runtime is gone.
    drop(command);
    drop(slave);
    let master = std::sync::Arc::new(Fd::new(master)?);
    let typing = io
        .stdin
        .map(|input| tokio::spawn(type_into(master.clone(), input)));
    let sizing = io
        .resize
        .map(|sizes| tokio::spawn(follow_sizes(master.clone(), sizes)));
    let output = io
        .stdout
        .map(|tx| tokio::spawn(read_terminal(master.clone(), tx)));
    let status = child.wait().await?;
    running.exited = true;
    if let Some(output) = output {
        let _ = output.await;
    }
    for task in [typing, sizing].into_iter().flatten() {
        task.abort();
    }
    Ok(status)
}

async fn type_into(master: std::sync::Arc<Fd>, mut input: mpsc::Receiver<Bytes>) {
    while let Some(mut data) = input.recv().await {
        while !data.is_empty() {
            match master.write_with(|fd| rustix::io::write(fd, &data)).await {
                Ok(n) => {
                    let _ = data.split_to(n);
                }
                Err(_) => return,
            }
        }
    }
}

async fn follow_sizes(master: std::sync::Arc<Fd>, mut sizes: mpsc::Receiver<TerminalSize>) {
    while let Some(size) = sizes.recv().await {
        let winsize = rustix::termios::Winsize {
            ws_row: size.height,
            ws_col: size.width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        if let Err(e) = rustix::termios::tcsetwinsize(master.fd(), winsize) {
            tracing::debug!(error = %e, "terminal resize failed");
        }
    }
}

/// Copies the terminal to the client until it closes (EIO once no slave is open).
async fn read_terminal(master: std::sync::Arc<Fd>, tx: mpsc::Sender<Bytes>) {
    let mut buf = vec![0u8; 32 << 10];
    while let Ok(n @ 1..) = master
        .read_with(|fd| rustix::io::read(fd, &mut buf[..]))
        .await
    {
        if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
            return;
        }
    }
}
