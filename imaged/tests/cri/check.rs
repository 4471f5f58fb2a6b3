//! `imaged check [--repair]`: with the daemon stopped (the store opened directly) and with
//! it running (through its socket), on stores broken the ways disks and crashes break them.

use crate::harness::{Imaged, assert_tree, push, registry};
use fixtures::catalog;
use serde_json::Value;
use std::path::PathBuf;

fn problems(report: &str) -> Vec<Value> {
    let report: Value = serde_json::from_str(report).unwrap_or_else(|e| panic!("{e}: {report}"));
    report["problems"].as_array().unwrap().clone()
}

/// The problem about `subject`, which must be there exactly once.
fn about<'a>(problems: &'a [Value], subject: &str) -> &'a Value {
    let found: Vec<&Value> = problems
        .iter()
        .filter(|p| p["subject"].as_str().unwrap().starts_with(subject))
        .collect();
    assert_eq!(found.len(), 1, "{subject} in {problems:#?}");
    found[0]
}

fn blob(imaged: &Imaged, digest: &str) -> PathBuf {
    imaged
        .root
        .join("content/blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// The highest-numbered snapshot directory: the last layer unpacked.
fn newest_snapshot_dir(imaged: &Imaged) -> PathBuf {
    let dir = imaged.root.join("snapshots/overlayfs/snapshots");
    let newest = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap();
    dir.join(newest.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_daemon_stopped_check_names_each_problem_and_repair_leaves_a_clean_store() {
    let registry = registry();
    let demo = push(&registry, "fixtures/demo", "v1", &catalog::demo());
    push(
        &registry,
        "fixtures/simple",
        "v1",
        &catalog::simple("checked"),
    );
    let demo_image = format!("{}/fixtures/demo:v1", registry.addr());
    let simple_image = format!("{}/fixtures/simple:v1", registry.addr());
    let mut imaged = Imaged::start().await;
    imaged.pull(&demo_image).await.unwrap();
    imaged.pull(&simple_image).await.unwrap();
    imaged.halt();
    let (status, out) = imaged.check(&[]);
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("no problems found"), "{out}");

    std::fs::write(blob(&imaged, &demo.manifest.digest), b"tampered").unwrap();
    let snapshot = newest_snapshot_dir(&imaged);
    std::fs::remove_dir_all(&snapshot).unwrap();
    let ingest = imaged.root.join("content/ingest/0123abcd-99999-0");
    std::fs::create_dir_all(&ingest).unwrap();
    std::fs::write(ingest.join("data"), vec![7u8; 100]).unwrap();
    let stray = imaged.root.join("content/blobs/sha256/not-a-digest");
    std::fs::write(&stray, b"?").unwrap();

    let (status, out) = imaged.check(&["-o", "json"]);
    assert_eq!(status, 1, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["via"], "store");
    let found = problems(&out);
    assert_eq!(found.len(), 5, "{found:#?}");
    let manifest = &demo.manifest.digest;
    let expected = [
        (
            format!("blob {manifest}"),
            "its content hashes to sha256:".to_string(),
        ),
        (
            format!("image {} ({demo_image})", demo.id()),
            format!("its manifest {manifest} is corrupt"),
        ),
        (
            "overlayfs snapshot sha256:".to_string(),
            format!("its directory {} is missing", snapshot.join("fs").display()),
        ),
        (
            ingest.display().to_string(),
            "a download left behind (100 bytes)".to_string(),
        ),
        (stray.display().to_string(), "not a blob".to_string()),
    ];
    for (subject, problem) in &expected {
        let found = about(&found, subject);
        assert!(
            found["problem"].as_str().unwrap().contains(problem),
            "{found}"
        );
        assert_eq!(found["repaired"], false, "{found}");
    }

    let (status, out) = imaged.check(&["--repair"]);
    assert_eq!(status, 1, "{out}");
    assert!(out.contains("5 problem(s) found, 5 repaired"), "{out}");
    let (status, out) = imaged.check(&[]);
    assert_eq!(status, 0, "{out}");

    let imaged = imaged.resume().await;
    assert_eq!(imaged.status(&demo_image).await, None);
    assert_eq!(imaged.pull(&demo_image).await.unwrap(), demo.id());
    assert_tree(
        &catalog::demo().expected_tree(),
        &imaged.rootfs(&demo_image).await,
        &demo_image,
    );
    // Its snapshot went; its blobs stayed, so it is unpacked again without a pull.
    assert!(imaged.status(&simple_image).await.is_some());
    assert_tree(
        &catalog::simple("checked").expected_tree(),
        &imaged.rootfs(&simple_image).await,
        &simple_image,
    );
    assert_eq!(imaged.check(&[]).0, 0);
}

/// With the daemon running the check goes through it; layer blobs that
/// `discard_unpacked_layers` removed are not missing while their snapshots are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_daemon_running_check_goes_through_it_and_accepts_discarded_layers() {
    let registry = registry();
    let simple = push(&registry, "fixtures/simple", "v1", &catalog::simple("live"));
    let image = format!("{}/fixtures/simple:v1", registry.addr());
    let imaged = Imaged::start_with("discard_unpacked_layers = true\n").await;
    imaged.pull(&image).await.unwrap();
    assert!(!blob(&imaged, &simple.layers[0].blob.digest).exists());
    let (status, out) = imaged.check(&["-o", "json"]);
    assert_eq!(status, 0, "{out}");
    assert_eq!(
        serde_json::from_str::<Value>(&out).unwrap()["via"],
        "daemon"
    );

    let config = &simple.config.digest;
    std::fs::write(blob(&imaged, config), b"{}").unwrap();
    let (status, out) = imaged.check(&["-o", "json", "--repair"]);
    assert_eq!(status, 1, "{out}");
    let found = problems(&out);
    assert_eq!(found.len(), 2, "{found:#?}");
    about(&found, &format!("blob {config}"));
    let broken = about(&found, &format!("image {}", simple.id()));
    assert!(
        broken["problem"]
            .as_str()
            .unwrap()
            .contains(&format!("its config {config} is corrupt")),
        "{broken}"
    );
    assert!(found.iter().all(|p| p["repaired"] == true), "{found:#?}");
    assert_eq!(imaged.status(&image).await, None);
    assert_eq!(imaged.check(&[]).0, 0);
    assert_eq!(imaged.pull(&image).await.unwrap(), simple.id());
    assert_tree(
        &catalog::simple("live").expected_tree(),
        &imaged.rootfs(&image).await,
        &image,
    );
}
