//! Pulls that succeed: the unpacked rootfs equals the fixture's expected tree, layers are
//! fetched and unpacked once, mirrors from hosts.toml are used.

use crate::harness::{Imaged, assert_tree, gets_of, push, registry, requests_for};
use fixtures::catalog;
use fixtures::image::{Compression, ImageSpec};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rootfs_matches_every_fixture_tree() {
    let registry = registry();
    let imaged = Imaged::start().await;
    let cases: Vec<(&str, ImageSpec)> = vec![
        ("whiteouts", catalog::whiteouts()),
        ("links", catalog::links()),
        ("metadata", catalog::metadata()),
        ("plain", catalog::compressed(Compression::None)),
        ("gzip", catalog::compressed(Compression::Gzip)),
        ("zstd", catalog::compressed(Compression::Zstd)),
        ("docker", catalog::docker_schema2()),
        ("layers-120", catalog::many_layers()),
    ];
    for (name, spec) in cases {
        let built = push(&registry, &format!("fixtures/{name}"), "v1", &spec);
        let image = format!("{}/fixtures/{name}:v1", registry.addr());
        let id = imaged.pull(&image).await.unwrap();
        assert_eq!(id, built.id(), "{name}");
        let tree = imaged.rootfs(&image).await;
        assert_tree(&spec.expected_tree(), &tree, name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_arch_index_picks_amd64_and_records_the_index_digest() {
    let registry = registry();
    let imaged = Imaged::start().await;
    let index = catalog::multi_arch().build().unwrap();
    let index_digest = registry
        .pusher()
        .push_index("fixtures/multi", &index, &["v1"])
        .unwrap();
    let image = format!("{}/fixtures/multi:v1", registry.addr());
    let id = imaged.pull(&image).await.unwrap();
    let amd64 = &index.manifests[0];
    assert_eq!(id, amd64.id());
    let status = imaged.status(&image).await.unwrap();
    assert_eq!(
        status.repo_digests,
        [format!("{}/fixtures/multi@{index_digest}", registry.addr())]
    );
    let amd64_layers: Vec<&str> = amd64
        .layers
        .iter()
        .map(|l| l.blob.digest.as_str())
        .collect();
    for layer in &index.manifests[1].layers {
        if amd64_layers.contains(&layer.blob.digest.as_str()) {
            continue;
        }
        let gets = gets_of(&registry, &layer.blob.digest);
        assert!(gets.is_empty(), "arm64 layer fetched: {gets:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_are_fetched_once_across_images_and_concurrent_pulls() {
    let registry = registry();
    let imaged = Imaged::start().await;
    let spec = catalog::demo();
    let built = push(&registry, "fixtures/demo", "v1", &spec);
    registry
        .pusher()
        .push_image("fixtures/demo-copy", &built, &["v1"])
        .unwrap();
    let image = format!("{}/fixtures/demo:v1", registry.addr());
    let pulls = (0..10).map(|_| imaged.pull(&image));
    let ids = futures_util::future::join_all(pulls).await;
    for id in ids {
        assert_eq!(id.unwrap(), built.id());
    }
    // The second repository shares every layer: nothing is downloaded again.
    let copy = format!("{}/fixtures/demo-copy:v1", registry.addr());
    imaged.pull(&copy).await.unwrap();
    // A warm pull asks only for the manifest.
    let before = registry.requests().len();
    imaged.pull(&image).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let warm: Vec<String> = registry.requests()[before..].to_vec();
    assert_eq!(warm.len(), 1, "warm pull requests: {warm:?}");
    assert!(warm[0].contains("/manifests/v1"), "{warm:?}");
    for layer in &built.layers {
        let gets = gets_of(&registry, &layer.blob.digest);
        assert_eq!(
            gets.len(),
            1,
            "layer {} fetched: {gets:?}",
            layer.blob.digest
        );
    }
    assert_eq!(imaged.list().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_toml_mirror_serves_registry_k8s_io() {
    let registry = registry();
    let imaged = Imaged::start().await;
    let built = push(&registry, "pause", "3.9", &catalog::simple("pause"));
    imaged.hosts_toml(
        "registry.k8s.io",
        &format!(
            "server = \"https://registry.k8s.io\"\n\n[host.\"http://{}\"]\ncapabilities = [\"pull\", \"resolve\"]\n",
            registry.addr()
        ),
    );
    let id = imaged.pull("registry.k8s.io/pause:3.9").await.unwrap();
    assert_eq!(id, built.id());
    let manifest = requests_for(&registry, "/v2/pause/manifests/3.9");
    assert!(
        manifest.iter().any(|r| r.contains("ns=registry.k8s.io")),
        "{manifest:?}"
    );
    let status = imaged.status("registry.k8s.io/pause:3.9").await.unwrap();
    assert_eq!(status.repo_tags, ["registry.k8s.io/pause:3.9"]);
    // `imaged hosts` shows the same resolution without pulling.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imaged"))
        .args(["hosts", "registry.k8s.io/pause:3.9", "--config"])
        .arg(imaged.dir.path().join("imaged.toml"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "registry.k8s.io/pause:3.9");
    assert!(
        lines[1].starts_with(&format!(
            "1. http://{}/v2  [pull,resolve]  plain HTTP",
            registry.addr()
        )),
        "{text}"
    );
    assert!(
        lines[2]
            .starts_with("2. https://registry.k8s.io/v2  [pull,resolve,push]  TLS, system roots"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_info_matches_du_and_shrinks_after_removal() {
    let registry = registry();
    let imaged = Imaged::start().await;
    push(&registry, "fixtures/demo", "v1", &catalog::demo());
    let image = format!("{}/fixtures/demo:v1", registry.addr());
    let empty = fs_used(&imaged).await;
    imaged.pull(&image).await.unwrap();
    let full = fs_used(&imaged).await;
    let du = du_bytes(&imaged.root.join("snapshots/overlayfs"));
    let diff = full.0.abs_diff(du) as f64;
    assert!(
        diff <= du as f64 * 0.01,
        "ImageFsInfo {} vs du {du}",
        full.0
    );
    assert!(
        full.0 > empty.0 + 3_000_000 && full.1 > empty.1,
        "{empty:?} {full:?}"
    );
    imaged.remove(&image).await;
    let after = fs_used(&imaged).await;
    assert!(after.0 < empty.0 + 100_000, "{empty:?} -> {after:?}");

    // A walk is reused while the store is unchanged (for 10 s): what appears behind
    // imaged's back shows with the next change it makes.
    let aside = imaged.root.join("snapshots/overlayfs/aside");
    std::fs::write(&aside, vec![1u8; 4 << 20]).unwrap();
    assert_eq!(fs_used(&imaged).await, after);
    imaged.pull(&image).await.unwrap();
    let grown = fs_used(&imaged).await;
    assert!(grown.0 > full.0 + 4_000_000, "{full:?} -> {grown:?}");
    assert!(imaged.stop().success());
}

async fn fs_used(imaged: &Imaged) -> (u64, u64) {
    let info = imaged
        .cri()
        .await
        .image_fs_info(proto::cri::ImageFsInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.image_filesystems.len(), 1);
    let fs = &info.image_filesystems[0];
    assert!(fs.timestamp > 0);
    assert!(std::path::Path::new(&fs.fs_id.as_ref().unwrap().mountpoint).is_dir());
    (
        fs.used_bytes.as_ref().unwrap().value,
        fs.inodes_used.as_ref().unwrap().value,
    )
}

fn du_bytes(path: &std::path::Path) -> u64 {
    let out = std::process::Command::new("du")
        .args(["-s", "-B1"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_survive_a_crash_and_the_stale_socket_is_replaced() {
    let registry = registry();
    let imaged = Imaged::start().await;
    let built = push(&registry, "fixtures/demo", "v1", &catalog::demo());
    let image = format!("{}/fixtures/demo:v1", registry.addr());
    imaged.pull(&image).await.unwrap();
    let imaged = imaged.crash_and_restart().await;
    assert_eq!(imaged.status(&image).await.unwrap().id, built.id());
    assert_tree(
        &catalog::demo().expected_tree(),
        &imaged.rootfs(&image).await,
        "after restart",
    );
    let before = registry.requests().len();
    imaged.pull(&image).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        registry.requests().len(),
        before + 1,
        "only the manifest is fetched again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_headers_reach_their_host_and_every_failure_is_reported() {
    let registry = registry();
    push(
        &registry,
        "fixtures/simple",
        "v1",
        &catalog::simple("headers"),
    );
    // A mirror that records the headers it is sent and knows no image (404).
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Vec<(String, String)>>::new()));
    let recorder = seen.clone();
    let mirror = fixtures::http::Server::start(move |request| {
        recorder.lock().unwrap().push(request.headers.clone());
        fixtures::http::Response::new(404)
    })
    .unwrap();
    let imaged = Imaged::start().await;
    imaged.hosts_toml(
        registry.addr(),
        &format!(
            "[host.\"http://{0}\"]\n[host.\"http://{0}\".header]\nx-mirror-token = [\"a\", \"b\"]\n",
            mirror.addr()
        ),
    );
    let image = format!("{}/fixtures/simple:v1", registry.addr());
    imaged.pull(&image).await.unwrap();
    let requests = seen.lock().unwrap().clone();
    assert!(!requests.is_empty());
    for headers in &requests {
        let values: Vec<&str> = headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("x-mirror-token"))
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(values, ["a", "b"], "{headers:?}");
    }
    // Every host failed: the error lists each one with its reason.
    let missing = format!("{}/fixtures/simple:absent", registry.addr());
    let err = imaged.pull(&missing).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(
        err.message().contains(&format!(
            "http://{}/v2/fixtures/simple/manifests/absent?ns=",
            mirror.addr()
        )),
        "{err:?}"
    );
    assert!(
        err.message().contains(&format!(
            "http://{}/v2/fixtures/simple/manifests/absent: HTTP 404",
            registry.addr()
        )),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_stalls_is_abandoned_after_the_progress_timeout() {
    let registry = registry();
    let built = push(
        &registry,
        "fixtures/simple",
        "v1",
        &catalog::simple("stall"),
    );
    // Accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = std::thread::spawn(move || silent.incoming().take(4).flatten().collect::<Vec<_>>());
    let imaged = Imaged::start_with("image_pull_progress_timeout = \"1s\"").await;
    imaged.hosts_toml(
        registry.addr(),
        &format!("[host.\"http://{silent_addr}\"]\n"),
    );
    let image = format!("{}/fixtures/simple:v1", registry.addr());
    let started = std::time::Instant::now();
    assert_eq!(imaged.pull(&image).await.unwrap(), built.id());
    assert!(started.elapsed() >= Duration::from_secs(1));
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discarded_layer_blobs_are_neither_kept_nor_needed_again() {
    let registry = registry();
    let imaged = Imaged::start_with("discard_unpacked_layers = true\n").await;
    let base = catalog::demo();
    let built = push(&registry, "fixtures/demo", "v1", &base);
    let mut on_top = catalog::demo();
    on_top.layers.push(fixtures::image::Layer::new(vec![
        fixtures::image::Entry::file("added", 0o644, "on top\n"),
    ]));
    push(&registry, "fixtures/on-top", "v1", &on_top);
    let image = format!("{}/fixtures/demo:v1", registry.addr());
    imaged.pull(&image).await.unwrap();

    let blobs = imaged.store_files();
    for layer in &built.layers {
        let hex = layer.blob.digest.trim_start_matches("sha256:");
        assert!(
            !blobs.iter().any(|f| f.ends_with(hex)),
            "layer {} kept",
            layer.blob.digest
        );
    }
    let status = imaged.status(&image).await.unwrap();
    assert_eq!(status.id, built.id());
    assert_tree(&base.expected_tree(), &imaged.rootfs(&image).await, &image);

    // The second image shares every layer but its top one: only that one is fetched.
    let second = format!("{}/fixtures/on-top:v1", registry.addr());
    imaged.pull(&second).await.unwrap();
    for layer in &built.layers {
        let gets = gets_of(&registry, &layer.blob.digest);
        assert_eq!(
            gets.len(),
            1,
            "layer {} fetched: {gets:?}",
            layer.blob.digest
        );
    }
    assert_tree(
        &on_top.expected_tree(),
        &imaged.rootfs(&second).await,
        &second,
    );
}

/// How a [`BreakingRegistry`] ends its first answer for the layer.
#[derive(Clone, Copy)]
enum Break {
    /// The connection closes after a third of the blob.
    Cut,
    /// The connection goes silent after half of the blob, until the client closes it.
    Hold,
}

/// A registry whose first layer download breaks off, counting the layer bytes it serves and
/// the range each request asked for; it answers `Range` requests unless told to ignore them.
struct BreakingRegistry {
    server: fixtures::http::Server,
    served: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    ranges: std::sync::Arc<std::sync::Mutex<Vec<Option<usize>>>>,
}

impl BreakingRegistry {
    fn start(built: &fixtures::image::Built, first: Break, honour_range: bool) -> Self {
        use fixtures::http::Response;
        use std::sync::atomic::Ordering::SeqCst;
        let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ranges = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (manifest, config) = (built.manifest.clone(), built.config.clone());
        let layer = built.layers[0].blob.clone();
        let (counted, asked) = (served.clone(), ranges.clone());
        let server = fixtures::http::Server::start(move |request| {
            let path = request.path();
            let blob = |bytes: &[u8]| Response::new(200).with_body(bytes.to_vec());
            if path.ends_with("/manifests/v1") {
                return blob(&manifest.bytes)
                    .with_header("Content-Type", fixtures::image::OCI_MANIFEST);
            }
            if path.ends_with(&config.digest) {
                return blob(&config.bytes);
            }
            if !path.ends_with(&layer.digest) {
                return Response::new(if path == "/v2/" { 200 } else { 404 });
            }
            let len = layer.bytes.len();
            let from = request
                .header("range")
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|r| r.parse::<usize>().ok());
            let mut asked = asked.lock().unwrap();
            asked.push(from);
            if asked.len() == 1 {
                let (sent, response) = match first {
                    Break::Cut => (len / 3, blob(&layer.bytes).cut_after(len / 3)),
                    Break::Hold => (len / 2, blob(&layer.bytes).hold_after(len / 2)),
                };
                counted.fetch_add(sent, SeqCst);
                return response;
            }
            match from.filter(|_| honour_range) {
                Some(from) => {
                    counted.fetch_add(len - from, SeqCst);
                    Response::new(206)
                        .with_header("Content-Range", &format!("bytes {from}-{}/{len}", len - 1))
                        .with_body(layer.bytes[from..].to_vec())
                }
                None => {
                    counted.fetch_add(len, SeqCst);
                    blob(&layer.bytes)
                }
            }
        })
        .unwrap();
        BreakingRegistry {
            server,
            served,
            ranges,
        }
    }

    fn served(&self) -> usize {
        self.served.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn ranges(&self) -> Vec<Option<usize>> {
        self.ranges.lock().unwrap().clone()
    }
}

fn noise_image(len: usize) -> fixtures::image::ImageSpec {
    fixtures::image::ImageSpec::new(vec![fixtures::image::Layer::new(vec![
        fixtures::image::Entry::file("noise", 0o644, catalog::noise(3, len)),
    ])])
}

/// A layer download that breaks off goes on from the byte it stopped at (`Range`), so the
/// registry serves each byte once; a registry that ignores `Range` sends the whole blob
/// again and the part already received is skipped. Either way the digest covers every byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_download_that_breaks_off_resumes_where_it_stopped() {
    let spec = noise_image(1 << 20);
    let built = spec.build().unwrap();
    let len = built.layers[0].blob.bytes.len();
    let imaged = Imaged::start().await;
    for (honour_range, served) in [(true, len), (false, len / 3 + len)] {
        let registry = BreakingRegistry::start(&built, Break::Cut, honour_range);
        let image = format!("{}/broken/layer:v1", registry.server.addr());
        assert_eq!(imaged.pull(&image).await.unwrap(), built.id(), "{image}");
        assert_tree(&spec.expected_tree(), &imaged.rootfs(&image).await, &image);
        assert_eq!(
            registry.ranges(),
            [None, Some(len / 3)],
            "Range honoured: {honour_range}"
        );
        assert_eq!(registry.served(), served, "Range honoured: {honour_range}");
        imaged.remove(&image).await;
    }
}

/// imaged killed in the middle of a layer's download: after the restart, the retried pull
/// asks only for the bytes the ingest did not hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_short_by_a_kill_goes_on_from_its_bytes_after_the_restart() {
    let spec = noise_image(4 << 20);
    let built = spec.build().unwrap();
    let layer = &built.layers[0].blob;
    let len = layer.bytes.len();
    let registry = BreakingRegistry::start(&built, Break::Hold, true);
    let image = format!("{}/broken/layer:v1", registry.server.addr());
    let mut imaged = Imaged::start().await;
    let pull = imaged.pull_in_background(&image).await;
    let ingested = || {
        let ingest = std::fs::read_dir(imaged.root.join("content/ingest")).ok()?;
        ingest
            .flatten()
            .filter_map(|e| std::fs::metadata(e.path().join("data")).ok())
            .map(|m| m.len())
            .max()
    };
    while ingested().is_none_or(|n| n < 1 << 20) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    imaged.halt();
    assert!(pull.await.unwrap().is_err());

    let imaged = imaged.resume().await;
    let partial = imaged
        .root
        .join("content/partial")
        .join(layer.digest.trim_start_matches("sha256:"));
    let kept = std::fs::metadata(&partial).unwrap().len() as usize;
    assert!((1 << 20..=len / 2).contains(&kept), "{kept} of {len}");
    assert_eq!(imaged.pull(&image).await.unwrap(), built.id());
    assert_tree(&spec.expected_tree(), &imaged.rootfs(&image).await, &image);
    assert_eq!(registry.ranges(), [None, Some(kept)]);
    assert_eq!(registry.served(), len / 2 + (len - kept));
    assert!(!partial.exists());
    assert_eq!(imaged.check(&[]).0, 0);
}
