//! A running processor seen as a reader of its stdout.
//!
//! The input stream borrows from the caller, so no thread can own it: each `read` feeds
//! the child's stdin and collects its stderr while it waits for stdout, polling the three
//! non-blocking pipes. Input is read only when stdin has room, so back-pressure from the
//! consumer of stdout reaches the input, and a child that writes before it reads never
//! stalls on a full pipe.

use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, ExitStatus};

use rustix::event::{PollFd, PollFlags, poll};
use rustix::io::{Errno, ioctl_fionbio};

use crate::{Error, Stream};

/// Input is read in pieces of this size.
const CHUNK: usize = 64 * 1024;

/// How much of the end of a child's stderr is kept for its error message.
pub(crate) const STDERR_TAIL: usize = 64 * 1024;

/// Reader of a processor's stdout that feeds it the input as it goes.
pub(crate) struct ChildStream<'a> {
    name: String,
    process: Child,
    /// `None` once read to its end.
    input: Option<Stream<'a>>,
    /// `None` once closed: input exhausted or the child stopped reading.
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
    /// `None` once at end of file.
    stderr: Option<ChildStderr>,
    /// Input read but not yet taken by the child, from `fed` on.
    pending: Vec<u8>,
    fed: usize,
    stderr_tail: Tail,
    ended: Option<Ended>,
}

/// How the stream ended; every read after the end repeats it.
enum Ended {
    Success,
    Failed(String),
    InputFailed(ErrorKind, String),
}

impl<'a> ChildStream<'a> {
    /// Takes over `process`, spawned with piped stdin, stdout and stderr.
    pub(crate) fn new(name: String, mut process: Child, input: Stream<'a>) -> io::Result<Self> {
        let stdin = process.stdin.take().expect("spawned with piped stdin");
        let stdout = process.stdout.take().expect("spawned with piped stdout");
        let stderr = process.stderr.take().expect("spawned with piped stderr");
        // Built first so that a failure below kills the child on drop.
        let stream = Self {
            name,
            process,
            input: Some(input),
            stdin: Some(stdin),
            stdout,
            stderr: Some(stderr),
            pending: Vec::new(),
            fed: 0,
            stderr_tail: Tail::default(),
            ended: None,
        };
        if let Some(stdin) = &stream.stdin {
            ioctl_fionbio(stdin, true)?;
        }
        if let Some(stderr) = &stream.stderr {
            ioctl_fionbio(stderr, true)?;
        }
        ioctl_fionbio(&stream.stdout, true)?;
        Ok(stream)
    }

    /// Waits until one of the pipes is ready, then serves stdin and stderr.
    fn pump(&mut self) -> io::Result<()> {
        let (stderr_ready, stdin_ready) = match self.poll() {
            Ok(ready) => ready,
            Err(Errno::INTR) => return Ok(()),
            Err(e) => return Err(self.fail(format!("poll: {e}"))),
        };
        if stderr_ready {
            self.read_stderr()?;
        }
        if stdin_ready {
            self.feed()?;
        }
        Ok(())
    }

    /// Whether stderr and stdin are ready.
    fn poll(&self) -> Result<(bool, bool), Errno> {
        let mut fds = vec![PollFd::new(&self.stdout, PollFlags::IN)];
        if let Some(stderr) = &self.stderr {
            fds.push(PollFd::new(stderr, PollFlags::IN));
        }
        if let Some(stdin) = &self.stdin {
            fds.push(PollFd::new(stdin, PollFlags::OUT));
        }
        poll(&mut fds, None)?;
        let ready = |index: usize| fds.get(index).is_some_and(|fd| !fd.revents().is_empty());
        let stderr_ready = self.stderr.is_some() && ready(1);
        let stdin_ready = self.stdin.is_some() && ready(1 + usize::from(self.stderr.is_some()));
        Ok((stderr_ready, stdin_ready))
    }

    /// Reads what stderr holds (all of it, to end of file, if the pipe blocks).
    fn read_stderr(&mut self) -> io::Result<()> {
        let Some(stderr) = &mut self.stderr else {
            return Ok(());
        };
        let mut buf = [0; 8192];
        loop {
            match stderr.read(&mut buf) {
                Ok(0) => {
                    self.stderr = None;
                    return Ok(());
                }
                Ok(n) => self.stderr_tail.push(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.fail(format!("reading stderr: {e}"))),
            }
        }
    }

    /// Writes input to stdin until the pipe is full or the input ends.
    fn feed(&mut self) -> io::Result<()> {
        loop {
            if self.fed == self.pending.len() && !self.refill()? {
                return Ok(());
            }
            let Some(stdin) = &mut self.stdin else {
                return Ok(());
            };
            match stdin.write(&self.pending[self.fed..]) {
                Ok(n) => self.fed += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // The child stopped reading; whether that was fine its exit status says.
                Err(e) if e.kind() == ErrorKind::BrokenPipe => {
                    self.close_stdin();
                    return Ok(());
                }
                Err(e) => return Err(self.fail(format!("writing stdin: {e}"))),
            }
        }
    }

    /// Reads the next piece of input into `pending`; false (and stdin closed) at its end.
    fn refill(&mut self) -> io::Result<bool> {
        self.pending.resize(CHUNK, 0);
        let n = self.read_input()?;
        self.pending.truncate(n);
        self.fed = 0;
        if n == 0 {
            self.close_stdin();
        }
        Ok(n > 0)
    }

    /// Reads input into `pending`; 0 at its end.
    fn read_input(&mut self) -> io::Result<usize> {
        let Some(input) = &mut self.input else {
            return Ok(0);
        };
        loop {
            match input.read(&mut self.pending) {
                Ok(0) => {
                    self.input = None;
                    return Ok(0);
                }
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(self.input_failed(e)),
            }
        }
    }

    fn close_stdin(&mut self) {
        self.stdin = None;
        self.pending.clear();
        self.fed = 0;
    }

    /// Stdout is at its end: the child's exit status decides, then the rest of the input
    /// is read so that a failure of an earlier stage is not missed.
    fn finish(&mut self) -> io::Result<usize> {
        self.close_stdin();
        if let Some(stderr) = &self.stderr {
            // The child may still write to stderr before it exits; blocking reads take
            // it all without a poll loop.
            if let Err(e) = ioctl_fionbio(stderr, false) {
                return Err(self.fail(format!("reading stderr: {e}")));
            }
            self.read_stderr()?;
        }
        let status = match self.process.wait() {
            Ok(status) => status,
            Err(e) => return Err(self.fail(format!("waiting for exit: {e}"))),
        };
        if !status.success() {
            let reason = exit_reason(status, &self.stderr_tail.text());
            return Err(self.fail(reason));
        }
        self.drain_input()?;
        self.ended = Some(Ended::Success);
        Ok(0)
    }

    fn drain_input(&mut self) -> io::Result<()> {
        self.pending.resize(CHUNK, 0);
        while self.read_input()? > 0 {}
        self.pending = Vec::new();
        Ok(())
    }

    /// Records a failure of the child (or of its pipes) and returns it.
    fn fail(&mut self, reason: String) -> io::Error {
        self.stop();
        let error = external(&self.name, reason.clone());
        self.ended = Some(Ended::Failed(reason));
        error
    }

    /// Records a failure of the input and returns it unchanged.
    fn input_failed(&mut self, error: io::Error) -> io::Error {
        self.stop();
        self.ended = Some(Ended::InputFailed(error.kind(), error.to_string()));
        error
    }

    fn stop(&mut self) {
        // Killing an already reaped child does nothing: std keeps its exit status.
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

impl Read for ChildStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(ended) = &self.ended {
            return ended.repeat(&self.name);
        }
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.stdout.read(buf) {
                Ok(0) => return self.finish(),
                Ok(n) => return Ok(n),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => return Err(self.fail(format!("reading stdout: {e}"))),
            }
            self.pump()?;
        }
    }
}

impl Drop for ChildStream<'_> {
    /// A stream dropped before its end (a cancelled pull) takes the child with it.
    fn drop(&mut self) {
        self.stop();
    }
}

impl Ended {
    fn repeat(&self, name: &str) -> io::Result<usize> {
        match self {
            Ended::Success => Ok(0),
            Ended::Failed(reason) => Err(external(name, reason.clone())),
            Ended::InputFailed(kind, message) => Err(io::Error::new(*kind, message.clone())),
        }
    }
}

fn external(name: &str, reason: String) -> io::Error {
    Error::External {
        name: name.to_string(),
        reason,
    }
    .into_io()
}

fn exit_reason(status: ExitStatus, stderr: &str) -> String {
    let how = match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => format!("ended with {status}"),
    };
    if stderr.is_empty() {
        how
    } else {
        format!("{how}: {stderr}")
    }
}

/// The last [`STDERR_TAIL`] bytes of a stream, in bounded memory.
#[derive(Default)]
struct Tail {
    bytes: Vec<u8>,
    truncated: bool,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
        // Trimming only past twice the limit keeps the copying linear in the input.
        if self.bytes.len() > 2 * STDERR_TAIL {
            self.bytes.drain(..self.bytes.len() - STDERR_TAIL);
            self.truncated = true;
        }
    }

    /// The kept text, trimmed, marked with "..." when its beginning was dropped.
    fn text(&self) -> String {
        let start = self.bytes.len().saturating_sub(STDERR_TAIL);
        let text = String::from_utf8_lossy(&self.bytes[start..]);
        if self.truncated || start > 0 {
            format!("...{}", text.trim_end())
        } else {
            text.trim().to_string()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end_within_the_limit() {
        let mut tail = Tail::default();
        for i in 0..10_000u32 {
            tail.push(format!("line {i}\n").as_bytes());
            assert!(tail.bytes.len() <= 2 * STDERR_TAIL + 16);
        }
        let text = tail.text();
        assert!(text.starts_with("..."), "{}", &text[..20]);
        assert!(text.ends_with("line 9999"));
        assert!(text.len() <= STDERR_TAIL + 3);
    }

    #[test]
    fn short_stderr_is_kept_whole() {
        let mut tail = Tail::default();
        tail.push(b"  boom\n");
        assert_eq!(tail.text(), "boom");
    }
}
