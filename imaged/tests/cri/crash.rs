//! Crash safety: imaged is killed (SIGKILL) at moments spread from the first manifest fetch
//! to the last commit of concurrent pulls, and started again on the same root, round after
//! round, with each snapshotter. Every round the restarted daemon's store checks clean
//! without a manual step, every image it lists has its fixture's tree, and the interrupted
//! pulls succeed when retried.

use crate::harness::{Imaged, assert_tree, disk_for, push, registry, spec};
use fixtures::catalog;
use fixtures::image::{Entry, ImageSpec, Layer};
use fixtures::registry::{Route, StaticRegistry};
use fixtures::tree::Tree;
use proto::cri;
use proto::cri::image_service_client::ImageServiceClient;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

const ROUNDS: u64 = 50;

/// Several layers of a few MiB each, so that kills land inside downloads and unpacks.
fn heavy() -> ImageSpec {
    let layers = (0..4)
        .map(|i| {
            Layer::new(vec![
                Entry::dir(&format!("layer{i}"), 0o755),
                Entry::file(&format!("layer{i}/blob"), 0o644, catalog::noise(i, 3 << 20)),
                Entry::file(&format!("layer{i}/small"), 0o600, format!("{i}\n")),
            ])
        })
        .collect();
    ImageSpec::new(layers)
}

struct Fixture {
    image: String,
    id: String,
    tree: Tree,
}

/// A reproducible spread of kill moments: a fraction of a whole pull, 0 to 1.1.
struct Moments(u64);

impl Moments {
    fn next(&mut self, whole: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        whole.mul_f64((self.0 % 1100) as f64 / 1000.0)
    }
}

/// Pulls every image at once; spawned, it goes on while the test kills the daemon.
async fn pull_all(
    client: ImageServiceClient<Channel>,
    images: Vec<String>,
) -> Vec<Result<String, tonic::Status>> {
    let pulls: Vec<_> = images
        .into_iter()
        .map(|image| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let request = cri::PullImageRequest {
                    image: Some(spec(&image)),
                    ..Default::default()
                };
                client
                    .pull_image(request)
                    .await
                    .map(|r| r.into_inner().image_ref)
            })
        })
        .collect();
    let mut results = Vec::new();
    for pull in pulls {
        results.push(pull.await.unwrap());
    }
    results
}

async fn assert_images_match(imaged: &Imaged, by_id: &BTreeMap<&str, &Fixture>, what: &str) {
    for listed in imaged.list().await {
        let fixture = by_id
            .get(listed.id.as_str())
            .unwrap_or_else(|| panic!("{what}: unknown image {}", listed.id));
        assert!(imaged.status(&fixture.image).await.is_some(), "{what}");
        let tree = imaged.rootfs(&fixture.image).await;
        assert_tree(&fixture.tree, &tree, &format!("{what}: {}", fixture.image));
    }
}

async fn kill_rounds(backend: &str) {
    let registry = registry();
    let specs = [
        ("demo", catalog::demo()),
        ("whiteouts", catalog::whiteouts()),
        ("links", catalog::links()),
        ("heavy", heavy()),
    ];
    let fixtures: Vec<Fixture> = specs
        .into_iter()
        .map(|(name, spec)| {
            let built = push(&registry, &format!("crash/{name}"), "v1", &spec);
            Fixture {
                image: format!("{}/crash/{name}:v1", registry.addr()),
                id: built.id().to_string(),
                tree: spec.expected_tree(),
            }
        })
        .collect();
    let by_id: BTreeMap<&str, &Fixture> = fixtures.iter().map(|f| (f.id.as_str(), f)).collect();
    let disk = disk_for(backend);
    let mut imaged = Imaged::start_at(&disk.root, &format!("snapshotter = {backend:?}\n")).await;
    let images: Vec<String> = fixtures.iter().map(|f| f.image.clone()).collect();
    let started = Instant::now();
    for pulled in pull_all(imaged.cri().await, images.clone()).await {
        pulled.unwrap();
    }
    let whole = started.elapsed();
    for fixture in &fixtures {
        imaged.remove(&fixture.image).await;
    }
    let mut moments = Moments(0x9e37_79b9_7f4a_7c15);
    // How many images had been stored when each kill came, for the test's output.
    let mut survivors = vec![0; fixtures.len() + 1];
    for round in 0..ROUNDS {
        let at = moments.next(whole);
        let what = format!("{backend} round {round} (killed {at:?} into {whole:?})");
        let running = tokio::spawn(pull_all(imaged.cri().await, images.clone()));
        tokio::time::sleep(at).await;
        imaged.halt();
        let _interrupted = running.await.unwrap();
        imaged = imaged.resume().await;

        let (status, out) = imaged.check(&[]);
        assert_eq!(status, 0, "{what}: {out}");
        survivors[imaged.list().await.len()] += 1;
        assert_images_match(&imaged, &by_id, &what).await;
        let retried = pull_all(imaged.cri().await, images.clone()).await;
        for (fixture, pulled) in fixtures.iter().zip(retried) {
            let pulled =
                pulled.unwrap_or_else(|e| panic!("{what}: retrying {}: {e}", fixture.image));
            assert_eq!(pulled, fixture.id, "{what}");
        }
        assert_images_match(&imaged, &by_id, &what).await;
        for fixture in &fixtures {
            imaged.remove(&fixture.image).await;
        }
    }
    eprintln!("{backend}: rounds by images stored at the kill (0, 1, ...): {survivors:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlayfs_survives_kills_at_any_moment_of_concurrent_pulls() {
    kill_rounds("overlayfs").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_survives_kills_at_any_moment_of_concurrent_pulls() {
    kill_rounds("native").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn btrfs_survives_kills_at_any_moment_of_concurrent_pulls() {
    kill_rounds("btrfs").await;
}

/// SIGTERM while a pull runs that would take far longer (its layer dribbles in): the
/// daemon exits 0 once its grace (10 s) is over, and the next start finds a clean store
/// from which the image pulls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_during_a_pull_ends_the_daemon_after_its_grace_with_a_clean_store() {
    let spec = ImageSpec::new(vec![Layer::new(vec![Entry::file(
        "noise",
        0o644,
        catalog::noise(7, 4096),
    )])]);
    let built = spec.build().unwrap();
    let manifest = fixtures::image::OCI_MANIFEST;
    let slow = Duration::from_millis(50);
    let fake = StaticRegistry::start(vec![
        Route::manifest("slow/layer", "v1", manifest, &built.manifest.bytes),
        Route::blob("slow/layer", &built.config),
        Route {
            response: Route::blob("slow/layer", &built.layers[0].blob)
                .response
                .paced(slow),
            ..Route::blob("slow/layer", &built.layers[0].blob)
        },
    ])
    .unwrap();
    let mut imaged = Imaged::start().await;
    let image = format!("{}/slow/layer:v1", fake.addr());
    let pull = tokio::spawn(pull_all(imaged.cri().await, vec![image.clone()]));
    while !fake
        .requests()
        .iter()
        .any(|r| r.contains(&built.layers[0].blob.digest))
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The layer alone would take 4096 × 50 ms, over three minutes.
    let status = imaged.terminate(Duration::from_secs(60)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}: {}",
        imaged.log()
    );
    assert!(pull.await.unwrap()[0].is_err());

    let (status, out) = imaged.check(&["-o", "json"]);
    assert_eq!(status, 1, "the interrupted download is left: {out}");
    let imaged = imaged.resume().await;
    assert_eq!(imaged.check(&[]).0, 0);
    let registry = registry();
    let quick = push(&registry, "quick/layer", "v1", &spec);
    let quick_image = format!("{}/quick/layer:v1", registry.addr());
    assert_eq!(imaged.pull(&quick_image).await.unwrap(), quick.id());
    assert_tree(
        &spec.expected_tree(),
        &imaged.rootfs(&quick_image).await,
        &quick_image,
    );
}
