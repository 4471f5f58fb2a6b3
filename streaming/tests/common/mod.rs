//! A runtime for the streaming server's own tests: its "commands" are scripted, so what
//! a client must see is known exactly, and its ports are listeners of the test.

#![allow(dead_code)]

use bytes::Bytes;
use proto::cri;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use streaming::{Config, Io, Outcome, Server};

/// Commands:
/// - `["echo", WORDS...]`: WORDS joined by spaces on stdout, `err` on stderr, exit 0;
/// - `["cat"]`: stdin copied to stdout until its end, exit 0;
/// - `["exit", N]`: exit N;
/// - `["sizes", N]`: the first N terminal sizes on stdout as `WxH\n`, exit 0;
/// - `["flood"]`: stdout without end, until the client stops taking it;
/// - `["wait"]`: `waiting` on stdout, then runs until dropped (counted in `cancelled`).
///
/// Attach behaves as `cat`. `dial` connects to `127.0.0.1:<port>`.
#[derive(Default)]
pub struct Scripted {
    /// Commands dropped before they finished: the client went away.
    pub cancelled: Arc<AtomicUsize>,
}

struct CountOnDrop(Arc<AtomicUsize>, bool);

impl Drop for CountOnDrop {
    fn drop(&mut self) {
        if !self.1 {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn cat(io: &mut Io) {
    let (Some(stdin), Some(stdout)) = (io.stdin.as_mut(), io.stdout.as_ref()) else {
        return;
    };
    while let Some(data) = stdin.recv().await {
        if stdout.send(data).await.is_err() {
            return;
        }
    }
}

impl streaming::Runtime for Scripted {
    async fn exec(&self, request: cri::ExecRequest, mut io: Io) -> Outcome {
        let mut guard = CountOnDrop(self.cancelled.clone(), false);
        let cmd: Vec<&str> = request.cmd.iter().map(String::as_str).collect();
        let outcome = match cmd.as_slice() {
            ["echo", words @ ..] => {
                if let Some(out) = &io.stdout {
                    let _ = out.send(Bytes::from(words.join(" "))).await;
                }
                if let Some(err) = &io.stderr {
                    let _ = err.send(Bytes::from_static(b"err")).await;
                }
                Outcome::Exited(0)
            }
            ["cat"] => {
                cat(&mut io).await;
                Outcome::Exited(0)
            }
            ["exit", code] => Outcome::Exited(code.parse().unwrap_or(255)),
            ["sizes", n] => {
                let n: usize = n.parse().unwrap_or(1);
                let (Some(sizes), Some(out)) = (io.resize.as_mut(), io.stdout.as_ref()) else {
                    return Outcome::Failed("sizes needs a terminal and stdout".into());
                };
                for _ in 0..n {
                    let Some(size) = sizes.recv().await else {
                        break;
                    };
                    let line = format!("{}x{}\n", size.width, size.height);
                    let _ = out.send(Bytes::from(line)).await;
                }
                Outcome::Exited(0)
            }
            ["flood"] => {
                let chunk = Bytes::from(vec![b'y'; 64 << 10]);
                while let Some(out) = &io.stdout {
                    if out.send(chunk.clone()).await.is_err() {
                        break;
                    }
                }
                Outcome::Exited(0)
            }
            ["wait"] => {
                if let Some(out) = &io.stdout {
                    let _ = out.send(Bytes::from_static(b"waiting")).await;
                }
                std::future::pending().await
            }
            other => Outcome::Failed(format!("no such command {other:?}")),
        };
        guard.1 = true;
        outcome
    }

    async fn attach(&self, _request: cri::AttachRequest, mut io: Io) -> Outcome {
        cat(&mut io).await;
        Outcome::Exited(0)
    }

    async fn dial(&self, _sandbox: &str, port: u16) -> std::io::Result<tokio::net::TcpStream> {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await
    }
}

/// A streaming server with the scripted runtime on a free port of 127.0.0.1.
pub async fn server(config: Config) -> (Arc<Server<Scripted>>, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let runtime = Scripted::default();
    let cancelled = runtime.cancelled.clone();
    let server = Arc::new(Server::new(runtime, config, listener.local_addr().unwrap()));
    tokio::spawn(server.clone().serve(listener, std::future::pending()));
    (server, cancelled)
}
