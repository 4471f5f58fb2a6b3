//! ImageStatus, ListImages and RemoveImage semantics as the kubelet and critest expect.

use crate::harness::{Imaged, push, registry, spec};
use fixtures::catalog;
use proto::cri;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_identical_by_id_prefix_tag_and_digest() {
    let registry = registry();
    let imaged = Imaged::start().await;
    let built = push(&registry, "fixtures/simple", "v1", &catalog::simple("a"));
    let name = format!("{}/fixtures/simple", registry.addr());
    let id = imaged.pull(&format!("{name}:v1")).await.unwrap();
    let by_tag = imaged.status(&format!("{name}:v1")).await.unwrap();
    assert_eq!(by_tag.id, id);
    assert_eq!(by_tag.repo_tags, [format!("{name}:v1")]);
    assert_eq!(
        by_tag.repo_digests,
        [format!("{name}@{}", built.manifest.digest)]
    );
    assert!(by_tag.size > 0);
    assert_eq!(by_tag.uid, None);
    assert_eq!(by_tag.username, "");
    let hex = id.strip_prefix("sha256:").unwrap();
    for reference in [
        id.clone(),
        hex.to_string(),
        hex[..12].to_string(),
        format!("{name}@{}", built.manifest.digest),
    ] {
        assert_eq!(
            imaged.status(&reference).await.as_ref(),
            Some(&by_tag),
            "{reference}"
        );
    }
    for unknown in [
        format!("{name}:nope"),
        built.manifest.digest.clone(),
        "not a reference!".to_string(),
        "sha256:0000000000000000000000000000000000000000000000000000000000000000".into(),
    ] {
        assert_eq!(imaged.status(&unknown).await, None, "{unknown}");
    }
    let verbose = imaged
        .cri()
        .await
        .image_status(cri::ImageStatusRequest {
            image: Some(spec(&id)),
            verbose: true,
        })
        .await
        .unwrap()
        .into_inner();
    let info: serde_json::Value = serde_json::from_str(&verbose.info["info"]).unwrap();
    assert_eq!(
        info["chainID"].as_str().unwrap(),
        built.layers.last().unwrap().diff_id
    );
    assert_eq!(info["imageSpec"]["rootfs"]["type"], "layers");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_maps_to_uid_or_username() {
    let registry = registry();
    let imaged = Imaged::start().await;
    for (user, uid, username) in [
        ("1002", Some(1002), ""),
        ("www-data", None, "www-data"),
        ("1003:users", Some(1003), ""),
        ("www-data:users", None, "www-data"),
        ("0", Some(0), ""),
    ] {
        let repo = format!("fixtures/user-{}", user.replace(':', "-"));
        push(&registry, &repo, "v1", &catalog::user(user));
        let image = format!("{}/{repo}:v1", registry.addr());
        imaged.pull(&image).await.unwrap();
        let status = imaged.status(&image).await.unwrap();
        assert_eq!(status.uid.map(|u| u.value), uid, "{user}");
        assert_eq!(status.username, username, "{user}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_accumulate_move_and_go_with_removal() {
    let registry = registry();
    let imaged = Imaged::start().await;
    let a = push(&registry, "fixtures/tags", "1", &catalog::simple("a"));
    let pusher = registry.pusher();
    pusher.push_image("fixtures/tags", &a, &["2", "3"]).unwrap();
    let name = format!("{}/fixtures/tags", registry.addr());
    for tag in ["3", "1", "2"] {
        imaged.pull(&format!("{name}:{tag}")).await.unwrap();
    }
    let images = imaged.list().await;
    assert_eq!(images.len(), 1);
    let filtered = imaged
        .cri()
        .await
        .list_images(cri::ListImagesRequest {
            filter: Some(cri::ImageFilter {
                image: Some(spec(&format!("{name}:2"))),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .images;
    assert_eq!(filtered, images);
    let none = imaged
        .cri()
        .await
        .list_images(cri::ListImagesRequest {
            filter: Some(cri::ImageFilter {
                image: Some(spec(&format!("{name}:absent"))),
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .images;
    assert!(none.is_empty());
    assert_eq!(
        images[0].repo_tags,
        [
            format!("{name}:1"),
            format!("{name}:2"),
            format!("{name}:3")
        ]
    );
    // Tag 3 moves to another image: the first keeps tags 1 and 2.
    let b = push(&registry, "fixtures/tags", "3", &catalog::simple("b"));
    imaged.pull(&format!("{name}:3")).await.unwrap();
    let old = imaged.status(a.id()).await.unwrap();
    assert_eq!(old.repo_tags, [format!("{name}:1"), format!("{name}:2")]);
    assert_eq!(
        imaged.status(&format!("{name}:3")).await.unwrap().id,
        b.id()
    );
    // The listing, kept between calls, follows the change.
    let tags: Vec<Vec<String>> = imaged
        .list()
        .await
        .into_iter()
        .map(|i| i.repo_tags)
        .collect();
    assert_eq!(tags.len(), 2, "{tags:?}");
    assert!(
        tags.contains(&vec![format!("{name}:1"), format!("{name}:2")]),
        "{tags:?}"
    );
    assert!(tags.contains(&vec![format!("{name}:3")]), "{tags:?}");
    // Removing by one tag removes every name of the image, repeatedly without error.
    imaged.remove(&format!("{name}:1")).await;
    imaged.remove(&format!("{name}:1")).await;
    assert_eq!(imaged.status(&format!("{name}:2")).await, None);
    assert_eq!(imaged.status(a.id()).await, None);
    assert_eq!(imaged.list().await.len(), 1);
    // Pulled by digest: no tag, exactly the digest name.
    let by_digest = format!("{name}@{}", a.manifest.digest);
    imaged.pull(&by_digest).await.unwrap();
    let status = imaged.status(&by_digest).await.unwrap();
    assert!(status.repo_tags.is_empty());
    assert_eq!(status.repo_digests, std::slice::from_ref(&by_digest));
    imaged.remove(b.id()).await;
    imaged.remove(&by_digest).await;
    assert!(imaged.list().await.is_empty());
    let left: Vec<String> = imaged
        .store_files()
        .into_iter()
        .filter(|f| {
            f.starts_with("content/blobs/sha256/")
                || f.matches('/').count() == 3 && f.starts_with("snapshots/overlayfs/snapshots/")
        })
        .collect();
    assert!(left.is_empty(), "left after removing every image: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_images_are_reported_and_still_removable() {
    let registry = registry();
    let pause = format!("{}/pause:3.10", registry.addr());
    let imaged = Imaged::start_with(&format!("pinned_images = [{pause:?}]")).await;
    push(&registry, "pause", "3.10", &catalog::simple("pause"));
    push(&registry, "other", "v1", &catalog::simple("other"));
    imaged.pull(&pause).await.unwrap();
    let other = format!("{}/other:v1", registry.addr());
    imaged.pull(&other).await.unwrap();
    assert!(imaged.status(&pause).await.unwrap().pinned);
    assert!(!imaged.status(&other).await.unwrap().pinned);
    imaged.remove(&pause).await;
    assert_eq!(imaged.status(&pause).await, None);
}
