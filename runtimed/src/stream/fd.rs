//! A non-blocking file descriptor driven by tokio's reactor: the pty master of an exec,
//! conmon's attach socket. tokio has no type for either (a pty is no pipe, and its unix
//! sockets are stream and datagram only), so this wraps `AsyncFd` around rustix's calls.

use std::io;
use std::os::fd::{AsFd as _, BorrowedFd, OwnedFd};
use tokio::io::unix::AsyncFd;

/// An fd in non-blocking mode, read and written through the reactor.
pub struct Fd(AsyncFd<OwnedFd>);

impl Fd {
    /// Takes `fd`, switching it to non-blocking mode.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        rustix::io::ioctl_fionbio(&fd, true)?;
        // SAFETY: the OwnedFd is moved in and only closed when the AsyncFd drops, so the
        // registered number names the same open file for the AsyncFd's whole life.
        let registered = unsafe { AsyncFd::register(fd) };
        Ok(Self(registered.map_err(io::Error::from)?))
    }

    /// The fd itself, for ioctls.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.get_ref().as_fd()
    }

    /// Runs `op` (a read) once the fd is readable.
    pub async fn read_with<T>(
        &self,
        mut op: impl FnMut(BorrowedFd<'_>) -> rustix::io::Result<T>,
    ) -> io::Result<T> {
        loop {
            let mut ready = self.0.readable().await?;
            match ready.try_io(|fd| op(fd.get_ref().as_fd()).map_err(io::Error::from)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Runs `op` (a write) once the fd is writable.
    pub async fn write_with<T>(
        &self,
        mut op: impl FnMut(BorrowedFd<'_>) -> rustix::io::Result<T>,
    ) -> io::Result<T> {
        loop {
            let mut ready = self.0.writable().await?;
            match ready.try_io(|fd| op(fd.get_ref().as_fd()).map_err(io::Error::from)) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}
