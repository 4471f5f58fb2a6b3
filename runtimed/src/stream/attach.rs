//! Attach: the client joins the container's stdio through conmon's attach socket
//! (`SOCK_SEQPACKET`; each packet from conmon is one byte naming the stream, 2 stdout or 3
//! stderr, then the bytes; what is sent to it goes to the container's stdin). Resizes go
//! through conmon's control fifo. Leaving closes only this connection.

use super::fd::Fd;
use bytes::Bytes;
use std::os::fd::AsRawFd as _;
use std::path::Path;
use std::sync::Arc;
use streaming::{Io, Outcome, TerminalSize};
use tokio::sync::mpsc;

/// conmon's packets: one stream byte and up to 8192 bytes of output.
const PACKET: usize = 8193;

/// What conmon reads of one write to stdin.
const STDIN_CHUNK: usize = 8192;

/// Attaches `io` to the container whose conmon socket directory is `sockets` (holding
/// `attach`) and whose bundle is `bundle` (holding `ctl`). `stdin` is whether the
/// container keeps an open stdin; without one the client's input is dropped.
pub async fn attach(sockets: &Path, bundle: &Path, stdin: bool, io: Io) -> Outcome {
    let socket = match connect(sockets) {
        Ok(socket) => Arc::new(socket),
        Err(e) => {
            return Outcome::Failed(format!(
                "attach socket {}: {e}",
                sockets.join("attach").display()
            ));
        }
    };
    let typing = io
        .stdin
        .filter(|_| stdin)
        .map(|input| tokio::spawn(type_into(socket.clone(), input)));
    let sizing = io
        .resize
        .map(|sizes| tokio::spawn(follow_sizes(bundle.join("ctl"), sizes)));
    let mut buf = vec![0u8; PACKET];
    loop {
        let n = match socket
            .read_with(|fd| rustix::net::recv(fd, &mut buf[..], rustix::net::RecvFlags::empty()))
            .await
        {
            Ok((n, _)) if n > 0 => n,
            _ => break,
        };
        let target = match buf[0] {
            2 => io.stdout.as_ref(),
            3 => io.stderr.as_ref(),
            _ => None,
        };
        if let Some(tx) = target
            && tx.send(Bytes::copy_from_slice(&buf[1..n])).await.is_err()
        {
            break;
        }
    }
    for task in [typing, sizing].into_iter().flatten() {
        task.abort();
    }
    Outcome::Exited(0)
}

/// Connects through `/proc/self/fd`, since the socket's own path may exceed the 108 bytes
/// of a unix socket address.
fn connect(sockets: &Path) -> std::io::Result<Fd> {
    use rustix::fs::{Mode, OFlags};
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let dir = rustix::fs::open(
        sockets,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let socket = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let address = SocketAddrUnix::new(format!("/proc/self/fd/{}/attach", dir.as_raw_fd()))?;
    rustix::net::connect(&socket, &address)?;
    Fd::new(socket)
}

async fn type_into(socket: Arc<Fd>, mut input: mpsc::Receiver<Bytes>) {
    while let Some(data) = input.recv().await {
        for chunk in data.chunks(STDIN_CHUNK) {
            let sent = socket
                .write_with(|fd| rustix::net::send(fd, chunk, rustix::net::SendFlags::NOSIGNAL))
                .await;
            if sent.is_err() {
                return;
            }
        }
    }
    // The client's input ended: conmon closes the container's stdin if it was opened once.
    let _ = rustix::net::shutdown(socket.fd(), rustix::net::Shutdown::Write);
}

/// Writes each size to conmon's control fifo as `1 <rows> <columns>`.
async fn follow_sizes(ctl: std::path::PathBuf, mut sizes: mpsc::Receiver<TerminalSize>) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    while let Some(size) = sizes.recv().await {
        // Non-blocking: a fifo without its reader (conmon gone) fails instead of hanging.
        let written = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&ctl)
            .and_then(|mut fifo| writeln!(fifo, "1 {} {}", size.height, size.width));
        if let Err(e) = written {
            tracing::debug!(ctl = %ctl.display(), error = %e, "terminal resize failed");
        }
    }
}
