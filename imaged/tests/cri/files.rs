//! The daemon's own files: a private store, a state directory that only leads to the
//! socket, and a socket for its group.

use crate::harness::Imaged;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_is_private_and_the_socket_belongs_to_its_group() {
    let imaged = Imaged::start_with("socket_group = \"4242\"\n").await;
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&imaged.root), 0o700);
    assert_eq!(mode(imaged.socket.parent().unwrap()), 0o711);
    assert_eq!(mode(&imaged.socket), 0o660);
    assert_eq!(std::fs::metadata(&imaged.socket).unwrap().gid(), 4242);
    assert!(imaged.stop().success());
}
