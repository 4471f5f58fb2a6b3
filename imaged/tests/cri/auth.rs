//! Registries that want credentials: HTTP basic and bearer tokens.

use crate::harness::{Imaged, assert_not_on_disk, push};
use base64::Engine as _;
use fixtures::catalog;
use fixtures::registry::{Registry, RegistryAuth, RegistryOptions, TokenOptions};
use proto::cri::AuthConfig;

fn creds(username: &str, password: &str) -> Option<AuthConfig> {
    Some(AuthConfig {
        username: username.into(),
        password: password.into(),
        ..Default::default()
    })
}

async fn check_auth(registry: &Registry) {
    let imaged = Imaged::start().await;
    push(registry, "private/app", "v1", &catalog::simple("private"));
    let image = format!("{}/private/app:v1", registry.addr());
    let anonymous = imaged.pull(&image).await.unwrap_err();
    assert_eq!(
        anonymous.code(),
        tonic::Code::Unauthenticated,
        "{anonymous:?}"
    );
    let wrong = imaged
        .pull_with(&image, creds("alice", "wrong"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated, "{wrong:?}");
    assert!(
        !wrong.message().contains("wrong"),
        "password leaked: {wrong:?}"
    );
    imaged
        .pull_with(&image, creds("alice", "s3cret"))
        .await
        .unwrap();
    imaged.remove(&image).await;
    let encoded = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    let auth = Some(AuthConfig {
        auth: encoded,
        ..Default::default()
    });
    imaged.pull_with(&image, auth).await.unwrap();
    imaged.remove(&image).await;
    // Credentials meant for another registry are not sent here.
    let elsewhere = Some(AuthConfig {
        username: "alice".into(),
        password: "s3cret".into(),
        server_address: "https://other.example".into(),
        ..Default::default()
    });
    let err = imaged.pull_with(&image, elsewhere).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    imaged
        .pull_with(&image, creds("alice", "s3cret"))
        .await
        .unwrap();
    let encoded = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    for needle in ["s3cret", encoded.as_str()] {
        assert_not_on_disk(imaged.dir.path(), needle.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_registry() {
    let registry = Registry::start(RegistryOptions {
        storage: None,
        auth: RegistryAuth::Basic {
            user: "alice".into(),
            password: "s3cret".into(),
        },
        ..RegistryOptions::default()
    })
    .unwrap();
    check_auth(&registry).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_registry() {
    let registry = Registry::start(RegistryOptions {
        storage: None,
        auth: RegistryAuth::Token(TokenOptions {
            user: "alice".into(),
            password: "s3cret".into(),
            anonymous_pull: false,
        }),
        ..RegistryOptions::default()
    })
    .unwrap();
    check_auth(&registry).await;
    let server = registry.token_server().unwrap();
    assert!(!server.requests().is_empty(), "no token was requested");
    // A token the caller already holds (CRI registry_token) is sent as is.
    let url = format!(
        "{}?service={}&scope={}",
        server.realm(),
        fixtures::http::percent_encode(server.service()),
        fixtures::http::percent_encode("repository:private/app:pull")
    );
    let basic = fixtures::push::basic_authorization("alice", "s3cret");
    let response = fixtures::http::send("GET", &url, &[("Authorization", &basic)], &[]).unwrap();
    let body: serde_json::Value = serde_json::from_str(&response.text()).unwrap();
    let token = body["token"].as_str().unwrap().to_string();
    let imaged = Imaged::start().await;
    let image = format!("{}/private/app:v1", registry.addr());
    let auth = Some(AuthConfig {
        registry_token: token,
        ..Default::default()
    });
    imaged.pull_with(&image, auth).await.unwrap();
    imaged.remove(&image).await;
    // An identity token is an OAuth2 refresh token, exchanged at the realm.
    let identity = |token: &str| {
        Some(AuthConfig {
            identity_token: token.into(),
            ..Default::default()
        })
    };
    let err = imaged
        .pull_with(&image, identity("not-it"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    imaged.pull_with(&image, identity("s3cret")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_reach_the_mirror_configured_for_the_registry_and_never_the_log() {
    let mirror = Registry::start(RegistryOptions {
        auth: RegistryAuth::Basic {
            user: "alice".into(),
            password: "s3cret".into(),
        },
        ..RegistryOptions::default()
    })
    .unwrap();
    push(&mirror, "team/app", "v1", &catalog::simple("mirrored"));
    let imaged = Imaged::start().await;
    imaged.hosts_toml(
        "registry.example",
        &format!("server = \"http://{}\"\n", mirror.addr()),
    );
    let image = "registry.example/team/app:v1";
    let err = imaged.pull(image).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains(mirror.addr()), "{err:?}");
    imaged
        .pull_with(image, creds("alice", "s3cret"))
        .await
        .unwrap();
    let log = imaged.log();
    assert!(
        log.contains("registry.example/team/app:v1"),
        "debug log is empty?"
    );
    assert!(!log.contains("s3cret"), "a password reached the log");
}
