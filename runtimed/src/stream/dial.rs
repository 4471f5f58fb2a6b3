//! Port forwarding's connections: to the pod's loopback, made from inside its network
//! namespace. A socket belongs to the namespace it was created in, so a short-lived thread
//! enters the namespace, connects, and hands the connected socket back; the thread's
//! namespace dies with it and no other thread ever leaves the host's.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a connection to a pod's port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `port` on localhost in `netns`, or the host's when `None`: IPv4 first,
/// then IPv6, as the kubelet's port forwarding does.
pub async fn dial(netns: Option<PathBuf>, port: u16) -> std::io::Result<tokio::net::TcpStream> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("port-forward-dial".into())
        .spawn(move || {
            let _ = tx.send(connect(netns.as_deref(), port));
        })?;
    let stream = rx
        .await
        .map_err(|_| std::io::Error::other("port-forward dialler panicked"))??;
    stream.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(stream)
}

fn connect(netns: Option<&Path>, port: u16) -> std::io::Result<TcpStream> {
    if let Some(netns) = netns {
        let ns = std::fs::File::open(netns)?;
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&ns),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )?;
    }
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT).or_else(|first| {
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
        TcpStream::connect_timeout(&v6, CONNECT_TIMEOUT).map_err(|_| first)
    })
}
