//! Disk usage of a directory tree as `du` counts it: allocated blocks, each inode once.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Bytes allocated and inodes used under `root` (root included), hardlinks counted once.
/// Entries that vanish during the walk are skipped.
pub fn disk_usage(root: &Path) -> (u64, u64) {
    let mut seen = HashSet::new();
    let mut bytes = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        bytes += meta.blocks() * 512;
        if meta.is_dir()
            && let Ok(entries) = std::fs::read_dir(&path)
        {
            stack.extend(entries.flatten().map(|e| e.path()));
        }
    }
    (bytes, seen.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_hardlinks_once_and_matches_du() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![1u8; 100_000]).unwrap();
        std::fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        let (bytes, inodes) = disk_usage(dir.path());
        assert_eq!(inodes, 3);
        let du = std::process::Command::new("du")
            .args(["-s", "-B1"])
            .arg(dir.path())
            .output()
            .unwrap();
        let du: u64 = String::from_utf8_lossy(&du.stdout)
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(bytes, du);
    }
}
