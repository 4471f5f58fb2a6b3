//! The Prometheus endpoint (`metrics_address`), scraped while a pull runs and after pulls,
//! a failed pull and a removal.

use crate::harness::Imaged;
use fixtures::catalog;
use fixtures::image::{Entry, ImageSpec, Layer, OCI_MANIFEST};
use fixtures::registry::{Route, StaticRegistry};
use std::time::Duration;

/// The value of the sample `name` (with its labels, as exposed), if there is one.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map(|value| value.parse().unwrap())
}

fn scrape(address: &str) -> String {
    let response = fixtures::http::get(&format!("http://{address}/metrics")).unwrap();
    assert_eq!(response.status, 200);
    assert!(
        response
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/openmetrics-text")),
        "{response:?}"
    );
    response.text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_pulls_bytes_per_host_the_store_and_collections() {
    let spec = ImageSpec::new(vec![Layer::new(vec![Entry::file(
        "noise",
        0o644,
        catalog::noise(11, 2000),
    )])]);
    let built = spec.build().unwrap();
    let layer = &built.layers[0].blob;
    let fake = StaticRegistry::start(vec![
        Route::manifest("paced/image", "v1", OCI_MANIFEST, &built.manifest.bytes),
        Route::blob("paced/image", &built.config),
        Route {
            response: Route::blob("paced/image", layer)
                .response
                .paced(Duration::from_millis(1)),
            ..Route::blob("paced/image", layer)
        },
    ])
    .unwrap();
    let address = crate::harness::free_addr();
    let imaged = Imaged::start_with(&format!("metrics_address = {address:?}\n")).await;
    let idle = scrape(&address);
    assert_eq!(sample(&idle, "imaged_pulls_in_flight"), Some(0.0), "{idle}");
    assert_eq!(sample(&idle, "imaged_blobs"), Some(0.0), "{idle}");

    let image = format!("{}/paced/image:v1", fake.addr());
    let pull = imaged.pull_in_background(&image).await;
    while !fake.requests().iter().any(|r| r.contains(&layer.digest)) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let during = scrape(&address);
    assert_eq!(
        sample(&during, "imaged_pulls_in_flight"),
        Some(1.0),
        "{during}"
    );
    pull.await.unwrap().unwrap();
    assert!(
        imaged
            .pull(&format!("{}/paced/absent:v1", fake.addr()))
            .await
            .is_err()
    );

    let after = scrape(&address);
    let blob_bytes =
        (built.manifest.bytes.len() + built.config.bytes.len() + layer.bytes.len()) as f64;
    let host = fake.addr();
    for (name, value) in [
        ("imaged_pulls_in_flight".to_string(), 0.0),
        ("imaged_pulls_total{result=\"success\"}".to_string(), 1.0),
        ("imaged_pulls_total{result=\"failure\"}".to_string(), 1.0),
        (
            "imaged_pull_duration_seconds_count{result=\"success\"}".to_string(),
            1.0,
        ),
        (
            format!("imaged_registry_fetched_bytes_total{{host=\"{host}\"}}"),
            blob_bytes,
        ),
        ("imaged_blobs".to_string(), 3.0),
        ("imaged_blob_bytes".to_string(), blob_bytes),
        ("imaged_snapshots".to_string(), 1.0),
    ] {
        assert_eq!(sample(&after, &name), Some(value), "{name} in {after}");
    }
    assert!(
        sample(&after, "imaged_snapshot_bytes").unwrap() > 2000.0,
        "{after}"
    );

    imaged.remove(&image).await;
    let collected = scrape(&address);
    for (name, value) in [
        ("imaged_gc_removed_blobs_total", 3.0),
        ("imaged_gc_freed_blob_bytes_total", blob_bytes),
        ("imaged_gc_removed_snapshots_total", 1.0),
        ("imaged_blobs", 0.0),
        ("imaged_snapshots", 0.0),
    ] {
        assert_eq!(
            sample(&collected, name),
            Some(value),
            "{name} in {collected}"
        );
    }
    assert!(
        sample(&collected, "imaged_gc_runs_total").unwrap() >= 2.0,
        "{collected}"
    );
    let other = fixtures::http::get(&format!("http://{address}/other")).unwrap();
    assert_eq!(other.status, 404);
}
