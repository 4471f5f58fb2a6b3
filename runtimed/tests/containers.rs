//! Containers through crictl: busybox pulled through imaged, run with runc under conmon in
//! a sandbox of its own, logs in the CRI format, exit codes and reasons, stop grace periods.

use crate::harness::Node;

fn pod(name: &str, logs: &std::path::Path) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"), "attempt": 1},
        "log_directory": logs,
        "linux": {},
    })
}

fn container(
    node: &Node,
    name: &str,
    command: &[&str],
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut config = serde_json::json!({
        "metadata": {"name": name},
        "image": {"image": node.busybox},
        "command": command,
        "log_path": format!("{name}.log"),
        "linux": {},
    });
    if let (Some(config), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        config.extend(extra.clone());
    }
    config
}

/// Runs `command` to its end in a new pod; the inspect of the exited container and the log.
fn run_to_exit(
    node: &Node,
    name: &str,
    command: &[&str],
    extra: serde_json::Value,
) -> (serde_json::Value, String) {
    run_to_exit_on(node, "", name, command, extra)
}

/// [`run_to_exit`] in a pod of the runtime `handler`.
fn run_to_exit_on(
    node: &Node,
    handler: &str,
    name: &str,
    command: &[&str],
    extra: serde_json::Value,
) -> (serde_json::Value, String) {
    let logs = node.runtimed.dir.path().join(format!("logs-{name}"));
    let pod_config = pod(name, &logs);
    let sandbox = node.run_pod(&pod_config, handler).unwrap();
    let id = node
        .create(
            &sandbox,
            &container(node, name, command, extra),
            &pod_config,
        )
        .unwrap();
    assert_eq!(
        node.inspect_container(&id)["status"]["state"],
        "CONTAINER_CREATED"
    );
    node.crictl(&["start", &id]);
    let inspect = node.wait_state(&id, "CONTAINER_EXITED");
    let log = std::fs::read_to_string(logs.join(format!("{name}.log"))).unwrap_or_default();
    node.crictl(&["rmp", "-f", &sandbox]);
    (inspect, log)
}

/// The stream, tag and text of each CRI log line (the timestamp is checked for shape).
fn log_lines(log: &str) -> Vec<(String, String, String)> {
    log.lines()
        .map(|line| {
            let mut parts = line.splitn(4, ' ');
            let timestamp = parts.next().unwrap();
            assert!(timestamp.contains('T') && timestamp.len() > 20, "{line}");
            let stream = parts.next().unwrap().to_string();
            let tag = parts.next().unwrap().to_string();
            (stream, tag, parts.next().unwrap_or_default().to_string())
        })
        .collect()
}

#[test]
fn output_goes_to_the_cri_log_and_exit_codes_become_reasons() {
    let node = Node::start("rtdctr1", "10.235.1.0/24");
    node.pull_busybox();
    let (inspect, log) = run_to_exit(
        &node,
        "echo",
        &["sh", "-c", "echo hello; echo oops >&2; printf tail"],
        serde_json::json!({}),
    );
    let status = &inspect["status"];
    assert_eq!(
        (status["exitCode"].as_i64(), status["reason"].as_str()),
        (Some(0), Some("Completed")),
        "{inspect}"
    );
    assert!(status["startedAt"].as_str().is_some() && status["finishedAt"].as_str().is_some());
    assert_eq!(status["image"]["image"], node.busybox);
    assert!(
        status["imageRef"].as_str().unwrap().contains("@sha256:"),
        "{inspect}"
    );
    let mut lines = log_lines(&log);
    lines.sort();
    assert_eq!(
        lines,
        [
            ("stderr".into(), "F".into(), "oops".into()),
            ("stdout".into(), "F".into(), "hello".into()),
            ("stdout".into(), "P".into(), "tail".into()),
        ],
        "{log}"
    );

    let (inspect, _) = run_to_exit(
        &node,
        "three",
        &["sh", "-c", "exit 3"],
        serde_json::json!({}),
    );
    assert_eq!(
        (
            inspect["status"]["exitCode"].as_i64(),
            inspect["status"]["reason"].as_str()
        ),
        (Some(3), Some("Error"))
    );

    let limit = serde_json::json!({"linux": {"resources": {"memory_limit_in_bytes": 16777216}}});
    let (inspect, _) = run_to_exit(
        &node,
        "oom",
        &[
            "sh",
            "-c",
            "dd if=/dev/zero bs=128M count=1 | cat > /dev/null",
        ],
        limit,
    );
    assert_eq!(inspect["status"]["reason"], "OOMKilled", "{inspect}");
}

#[test]
fn containers_of_a_pod_share_its_namespaces_and_stop_with_grace() {
    let node = Node::start("rtdctr2", "10.235.2.0/24");
    node.pull_busybox();
    let logs = node.runtimed.dir.path().join("logs");
    let pod_config = pod("pair", &logs);
    let sandbox = node.run_pod(&pod_config, "").unwrap();
    let infra = node.inspect(&sandbox)["info"]["pid"].as_i64().unwrap();
    let polite = [
        "sh",
        "-c",
        "trap 'exit 0' TERM; while :; do sleep 0.2; done",
    ];
    let stubborn = ["sh", "-c", "trap '' TERM; while :; do sleep 0.2; done"];
    let a = node
        .create(
            &sandbox,
            &container(&node, "a", &polite, serde_json::json!({})),
            &pod_config,
        )
        .unwrap();
    let b = node
        .create(
            &sandbox,
            &container(&node, "b", &stubborn, serde_json::json!({})),
            &pod_config,
        )
        .unwrap();
    node.crictl(&["start", &a]);
    node.crictl(&["start", &b]);
    let pid = |id: &str| {
        let inspect = node.wait_state(id, "CONTAINER_RUNNING");
        inspect["info"]["pid"].as_i64().unwrap()
    };
    let (pa, pb) = (pid(&a), pid(&b));
    for ns in ["net", "ipc", "uts", "pid"] {
        let of = |p: i64| std::fs::read_link(format!("/proc/{p}/ns/{ns}")).unwrap();
        assert_eq!(of(pa), of(infra), "{ns}");
        assert_eq!(of(pb), of(infra), "{ns}");
    }
    let err = node
        .create(
            &sandbox,
            &container(&node, "a", &polite, serde_json::json!({})),
            &pod_config,
        )
        .unwrap_err();
    assert!(err.contains("AlreadyExists"), "{err}");
    assert_eq!(
        node.crictl(&["ps", "-q", "--pod", &sandbox])
            .lines()
            .count(),
        2
    );

    let started = std::time::Instant::now();
    node.crictl(&["stop", "--timeout", "10", &a]);
    assert!(started.elapsed() < std::time::Duration::from_secs(8));
    assert_eq!(node.inspect_container(&a)["status"]["exitCode"], 0);
    let started = std::time::Instant::now();
    node.crictl(&["stop", "--timeout", "2", &b]);
    assert!(started.elapsed() >= std::time::Duration::from_secs(2));
    assert_eq!(node.inspect_container(&b)["status"]["exitCode"], 137);
    node.crictl(&["stop", &b]);

    node.crictl(&["rm", &a]);
    assert_eq!(
        node.crictl(&["ps", "-a", "-q", "--pod", &sandbox]).trim(),
        b
    );
    node.crictl(&["stopp", &sandbox]);
    let err = node
        .create(
            &sandbox,
            &container(&node, "late", &polite, serde_json::json!({})),
            &pod_config,
        )
        .unwrap_err();
    assert!(
        err.contains("FailedPrecondition") && err.contains("not ready"),
        "{err}"
    );
    node.crictl(&["rmp", &sandbox]);
    assert_eq!(node.crictl(&["ps", "-a", "-q"]).trim(), "");
}

#[test]
fn bad_container_requests_are_refused_by_name() {
    let node = Node::start("rtdctr3", "10.235.3.0/24");
    let logs = node.runtimed.dir.path().join("logs");
    let pod_config = pod("bad", &logs);
    let sandbox = node.run_pod(&pod_config, "").unwrap();
    let sleep = ["sleep", "100"];
    let err = node
        .create(
            &sandbox,
            &container(&node, "nopull", &sleep, serde_json::json!({})),
            &pod_config,
        )
        .unwrap_err();
    assert!(
        err.contains("NotFound") && err.contains("fixtures/busybox"),
        "{err}"
    );
    node.pull_busybox();
    let missing = serde_json::json!({"mounts": [{"container_path": "/data", "host_path": "/nonexistent/volume"}]});
    let err = node
        .create(
            &sandbox,
            &container(&node, "mount", &sleep, missing),
            &pod_config,
        )
        .unwrap_err();
    assert!(
        err.contains("InvalidArgument") && err.contains("/nonexistent/volume"),
        "{err}"
    );
    let group = serde_json::json!({"linux": {"security_context": {"run_as_group": {"value": 5}}}});
    let err = node
        .create(
            &sandbox,
            &container(&node, "group", &sleep, group),
            &pod_config,
        )
        .unwrap_err();
    assert!(
        err.contains("InvalidArgument") && err.contains("run_as_group"),
        "{err}"
    );
    assert_eq!(node.crictl(&["ps", "-a", "-q"]).trim(), "");
    let bundles = node.runtimed.dir.path().join("state/containers");
    let left = std::fs::read_dir(&bundles).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "bundles left in {}", bundles.display());
    let unknown = "f".repeat(64);
    let output = node.crictl_output(&["inspect", &unknown]);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("NotFound"),
        "{output:?}"
    );
    node.crictl(&["rmp", "-f", &sandbox]);
}

#[test]
fn exit_codes_survive_a_runtimed_restart() {
    let mut node = Node::start("rtdctr4", "10.235.4.0/24");
    node.pull_busybox();
    let logs = node.runtimed.dir.path().join("logs");
    let pod_config = pod("restart", &logs);
    let sandbox = node.run_pod(&pod_config, "").unwrap();
    let exits = ["sh", "-c", "sleep 1; exit 7"];
    let id = node
        .create(
            &sandbox,
            &container(&node, "later", &exits, serde_json::json!({})),
            &pod_config,
        )
        .unwrap();
    node.crictl(&["start", &id]);
    node.wait_state(&id, "CONTAINER_RUNNING");
    node.runtimed.crash_and_restart();
    let inspect = node.wait_state(&id, "CONTAINER_EXITED");
    assert_eq!(inspect["status"]["exitCode"], 7);
    node.runtimed.crash_and_restart();
    assert_eq!(node.inspect_container(&id)["status"]["exitCode"], 7);
    node.crictl(&["rmp", "-f", &sandbox]);
}

#[test]
fn exec_sync_returns_output_and_exit_code_and_kills_at_its_timeout() {
    let node = Node::start("rtdctr5", "10.235.5.0/24");
    node.pull_busybox();
    let logs = node.runtimed.dir.path().join("logs");
    let pod_config = pod("exec", &logs);
    let sandbox = node.run_pod(&pod_config, "").unwrap();
    let sleeper = ["sleep", "1000"];
    let user = serde_json::json!({"linux": {"security_context": {"run_as_user": {"value": 33}}}});
    let id = node
        .create(
            &sandbox,
            &container(&node, "exec", &sleeper, user),
            &pod_config,
        )
        .unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let exec = |cmd: &[&str], timeout: i64| {
        runtime.block_on(async {
            let request = proto::cri::ExecSyncRequest {
                container_id: id.clone(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout,
            };
            let mut client = node.runtimed.client().await;
            client.exec_sync(request).await.map(|r| r.into_inner())
        })
    };
    let status = exec(&["true"], 0).unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("not running"), "{status:?}");
    node.crictl(&["start", &id]);
    node.wait_state(&id, "CONTAINER_RUNNING");
    let hello = exec(&["echo", "-n", "hello"], 0).unwrap();
    assert_eq!(
        (
            hello.stdout.as_slice(),
            hello.stderr.as_slice(),
            hello.exit_code
        ),
        (&b"hello"[..], &b""[..], 0)
    );
    assert_eq!(exec(&["id", "-u"], 0).unwrap().stdout, b"33\n");
    let failed = exec(&["sh", "-c", "echo err >&2; exit 4"], 0).unwrap();
    assert_eq!(
        (failed.exit_code, failed.stderr.as_slice()),
        (4, &b"err\n"[..])
    );
    let started = std::time::Instant::now();
    let status = exec(&["sleep", "4321"], 1).unwrap_err();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let left = exec(
        &["sh", "-c", "ps | grep 'sleep 4321' | grep -v grep || true"],
        0,
    )
    .unwrap();
    assert_eq!(left.stdout, b"", "the timed-out command still runs");
    node.crictl(&["rmp", "-f", &sandbox]);
}

#[test]
fn stats_logs_reopen_and_resource_updates_of_a_running_container() {
    let node = Node::start("rtdctr6", "10.235.6.0/24");
    node.pull_busybox();
    let logs = node.runtimed.dir.path().join("logs");
    let pod_config = pod("stats", &logs);
    let sandbox = node.run_pod(&pod_config, "").unwrap();
    let busy = [
        "sh",
        "-c",
        "dd if=/dev/zero of=/tmp/blob bs=1M count=4 2>/dev/null; while :; do echo tick; sleep 0.2; done",
    ];
    let labels = serde_json::json!({"labels": {"role": "busy"}});
    let id = node
        .create(
            &sandbox,
            &container(&node, "busy", &busy, labels),
            &pod_config,
        )
        .unwrap();
    node.crictl(&["start", &id]);
    node.wait_state(&id, "CONTAINER_RUNNING");
    std::thread::sleep(std::time::Duration::from_millis(600));

    let stats: serde_json::Value =
        serde_json::from_str(&node.crictl(&["stats", "-o", "json", "--id", &id])).unwrap();
    let entry = &stats["stats"][0];
    assert_eq!(entry["attributes"]["id"], id.as_str(), "{stats}");
    assert!(entry["cpu"]["timestamp"].as_str().unwrap() != "0");
    assert!(
        entry["memory"]["workingSetBytes"]["value"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 0,
        "{stats}"
    );
    let written: u64 = entry["writableLayer"]["usedBytes"]["value"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(written >= 4 << 20, "{stats}");
    let by_label = node.crictl(&["stats", "-o", "json", "--label", "role=busy"]);
    assert!(by_label.contains(&id));
    let pod_stats: serde_json::Value =
        serde_json::from_str(&node.crictl(&["statsp", "-o", "json", "--id", &sandbox])).unwrap();
    let linux = &pod_stats["stats"][0]["linux"];
    assert_eq!(
        linux["containers"][0]["attributes"]["id"],
        id.as_str(),
        "{pod_stats}"
    );
    assert_eq!(
        linux["network"]["defaultInterface"]["name"], "eth0",
        "{pod_stats}"
    );

    let log = logs.join("busy.log");
    let rotated = logs.join("busy.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let request = proto::cri::ReopenContainerLogRequest {
            container_id: id.clone(),
        };
        node.runtimed
            .client()
            .await
            .reopen_container_log(request)
            .await
            .unwrap();
    });
    assert!(
        log.exists(),
        "the log is there again when ReopenContainerLog returns"
    );
    std::thread::sleep(std::time::Duration::from_millis(600));
    let frozen = std::fs::read_to_string(&rotated).unwrap();
    let fresh = std::fs::read_to_string(&log).unwrap();
    assert!(fresh.contains("stdout F tick"), "{fresh}");
    std::thread::sleep(std::time::Duration::from_millis(400));
    assert_eq!(
        std::fs::read_to_string(&rotated).unwrap(),
        frozen,
        "the rotated file still grows"
    );

    node.crictl(&["update", "--memory", "67108864", "--cpu-share", "512", &id]);
    let pid = node.inspect_container(&id)["info"]["pid"].as_i64().unwrap();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let memory = cgroup
        .lines()
        .find(|l| l.contains(":memory:"))
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    let limit = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory{memory}/memory.limit_in_bytes"
    ))
    .unwrap();
    assert_eq!(limit.trim(), "67108864");
    let reported = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let request = proto::cri::ContainerStatusRequest {
            container_id: id.clone(),
            verbose: false,
        };
        let mut client = node.runtimed.client().await;
        let status = client.container_status(request).await.unwrap().into_inner();
        status.status.unwrap().resources.unwrap().linux.unwrap()
    });
    assert_eq!(
        (reported.memory_limit_in_bytes, reported.cpu_shares),
        (67108864, 512)
    );
    node.crictl(&["rmp", "-f", &sandbox]);
}

#[test]
fn seccomp_profiles_are_enforced_by_runc_and_crun() {
    let node = Node::start("rtdctr7", "10.235.7.0/24");
    node.pull_busybox();
    let blocks_hostname = node.runtimed.dir.path().join("block-hostname.json");
    let profile = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO"}],
    });
    std::fs::write(&blocks_hostname, profile.to_string()).unwrap();
    let script = "grep ^Seccomp: /proc/self/status; \
        unshare -U true && echo unshared; hostname x && echo renamed; true";
    let default = serde_json::json!({"profile_type": 0});
    let sys_admin = serde_json::json!({"add_capabilities": ["SYS_ADMIN"]});
    let cases = [
        ("unconfined", serde_json::json!({}), "0 unshared"),
        ("default", serde_json::json!({"seccomp": default}), "2"),
        (
            "default-admin",
            serde_json::json!({"seccomp": default, "capabilities": sys_admin}),
            "2 unshared renamed",
        ),
        (
            "deprecated-path",
            serde_json::json!({
                "seccomp_profile_path": format!("localhost/{}", blocks_hostname.display()),
                "capabilities": sys_admin,
            }),
            "2 unshared",
        ),
    ];
    for handler in ["runc", "crun"] {
        for (name, security, expected) in &cases {
            let extra = serde_json::json!({"linux": {"security_context": security}});
            let name = format!("{name}-{handler}");
            let (inspect, log) =
                run_to_exit_on(&node, handler, &name, &["sh", "-c", script], extra);
            assert_eq!(inspect["status"]["exitCode"], 0, "{name}: {inspect}");
            let words: Vec<String> = log_lines(&log)
                .into_iter()
                .filter(|(stream, _, _)| stream == "stdout")
                .map(|(_, _, text)| text.replace("Seccomp:", "").trim().to_string())
                .collect();
            assert_eq!(words.join(" "), *expected, "{name}: {log}");
        }
    }
}

#[test]
fn recursive_read_only_mounts_and_the_user_a_container_starts_as() {
    use proto::cri;
    let node = Node::start("rtdctr8", "10.235.8.0/24");
    node.pull_busybox();
    let volume = node.runtimed.dir.path().join("volume");
    let below = volume.join("below");
    std::fs::create_dir_all(&below).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&below)
        .status()
        .unwrap();
    assert!(mounted.success());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let status = runtime.block_on(async {
        let mut client = node.runtimed.client().await;
        let request = cri::StatusRequest { verbose: false };
        client.status(request).await.unwrap().into_inner()
    });
    let rro: Vec<(String, bool)> = status
        .runtime_handlers
        .iter()
        .map(|h| {
            (
                h.name.clone(),
                h.features.unwrap().recursive_read_only_mounts,
            )
        })
        .collect();
    assert_eq!(
        rro,
        [
            ("".into(), true),
            ("crun".into(), false),
            ("runc".into(), true)
        ],
        "runc 1.1 reports rro in `runc features`; crun 1.8 has no features command"
    );
    assert!(status.features.unwrap().supplemental_groups_policy);

    let create = |sandbox: &str, name: &str, recursive: bool| {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: node.busybox.clone(),
                ..Default::default()
            }),
            command: ["sh", "-c", "id -G; touch /data/below/x && echo wrote; true"]
                .map(String::from)
                .to_vec(),
            log_path: format!("{name}.log"),
            mounts: vec![cri::Mount {
                container_path: "/data".into(),
                host_path: volume.display().to_string(),
                readonly: true,
                recursive_read_only: recursive,
                ..Default::default()
            }],
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    run_as_user: Some(cri::Int64Value { value: 1000 }),
                    supplemental_groups: vec![1234],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: sandbox.into(),
            config: Some(config),
            sandbox_config: Some(cri::PodSandboxConfig::default()),
        };
        runtime.block_on(async {
            let mut client = node.runtimed.client().await;
            let created = client.create_container(request).await;
            created.map(|r| r.into_inner().container_id)
        })
    };
    for (name, recursive, expected) in [("plain", false, "0 1234\nwrote"), ("rro", true, "0 1234")]
    {
        let logs = node.runtimed.dir.path().join(format!("logs-{name}"));
        let sandbox = node.run_pod(&pod(name, &logs), "").unwrap();
        let id = create(&sandbox, name, recursive).unwrap();
        node.crictl(&["start", &id]);
        node.wait_state(&id, "CONTAINER_EXITED");
        let log = std::fs::read_to_string(logs.join(format!("{name}.log"))).unwrap();
        let stdout: Vec<String> = log_lines(&log)
            .into_iter()
            .filter(|(stream, _, _)| stream == "stdout")
            .map(|(_, _, text)| text)
            .collect();
        assert_eq!(stdout.join("\n"), expected, "{name}: {log}");
        let user = runtime.block_on(async {
            let mut client = node.runtimed.client().await;
            let request = cri::ContainerStatusRequest {
                container_id: id.clone(),
                verbose: false,
            };
            let status = client.container_status(request).await.unwrap().into_inner();
            status.status.unwrap().user.unwrap().linux.unwrap()
        });
        assert_eq!(
            (user.uid, user.gid, user.supplemental_groups),
            (1000, 0, vec![0, 1234])
        );
        node.crictl(&["rmp", "-f", &sandbox]);
    }

    let logs = node.runtimed.dir.path().join("logs-crun");
    let sandbox = node.run_pod(&pod("crun", &logs), "crun").unwrap();
    let refused = create(&sandbox, "crun", true).unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused.message().contains("/data") && refused.message().contains("\"crun\""),
        "{refused:?}"
    );
    node.crictl(&["rmp", "-f", &sandbox]);
    let unmounted = std::process::Command::new("umount").arg(&below).status();
    assert!(unmounted.unwrap().success());
}

#[test]
fn devices_are_placed_with_their_cgroup_permissions_and_privileged_sees_the_hosts() {
    let node = Node::start("rtdctr9", "10.235.9.0/24");
    node.pull_busybox();
    // Not a device runc allows by default, so only the rule from `permissions` lets it open.
    let open = "ls -l /dev/loopctl; (: < /dev/loopctl) && echo opened; true";
    for (name, permissions, expected) in [("r", "r", "opened"), ("w", "w", "")] {
        let device = serde_json::json!({"devices": [{
            "container_path": "/dev/loopctl", "host_path": "/dev/loop-control",
            "permissions": permissions,
        }]});
        let (inspect, log) = run_to_exit(&node, name, &["sh", "-c", open], device);
        assert_eq!(inspect["status"]["exitCode"], 0, "{inspect}");
        let stdout: Vec<String> = log_lines(&log)
            .into_iter()
            .filter(|(stream, _, _)| stream == "stdout")
            .map(|(_, _, text)| text)
            .collect();
        assert!(stdout[0].starts_with("crw"), "{name}: {log}");
        assert_eq!(stdout[1..].join(" "), expected, "{name}: {log}");
    }
    let missing = serde_json::json!({"devices": [
        {"container_path": "/dev/x", "host_path": "/dev/no-such-device", "permissions": "rwm"}
    ]});
    let logs = node.runtimed.dir.path().join("logs-missing");
    let pod_config = pod("missing", &logs);
    let sandbox = node.run_pod(&pod_config, "").unwrap();
    let refused = node
        .create(
            &sandbox,
            &container(&node, "missing", &["true"], missing),
            &pod_config,
        )
        .unwrap_err();
    assert!(refused.contains("/dev/no-such-device"), "{refused}");
    node.crictl(&["rmp", "-f", &sandbox]);

    let logs = node.runtimed.dir.path().join("logs-privileged");
    let mut pod_config = pod("privileged", &logs);
    pod_config["linux"] = serde_json::json!({"security_context": {"privileged": true}});
    let sandbox = node.run_pod(&pod_config, "").unwrap();
    let privileged = serde_json::json!({"linux": {"security_context": {"privileged": true}}});
    let config = container(
        &node,
        "privileged",
        &["ls", "/dev/loop-control"],
        privileged,
    );
    let id = node.create(&sandbox, &config, &pod_config).unwrap();
    node.crictl(&["start", &id]);
    let inspect = node.wait_state(&id, "CONTAINER_EXITED");
    assert_eq!(inspect["status"]["exitCode"], 0, "{inspect}");
    node.crictl(&["rmp", "-f", &sandbox]);
}

#[test]
fn pods_with_a_user_namespace_see_their_layers_and_volumes_as_their_own() {
    use proto::cri;
    let mut node = Node::start("rtdctr10", "10.235.10.0/24");
    node.pull_busybox();
    let volume = node.runtimed.dir.path().join("userns-volume");
    std::fs::create_dir_all(&volume).unwrap();
    std::fs::write(volume.join("f"), "host file\n").unwrap();
    let range = |host_id| cri::IdMapping {
        host_id,
        container_id: 0,
        length: 65536,
    };
    let userns = |host_id| cri::NamespaceOption {
        userns_options: Some(cri::UserNamespace {
            mode: cri::NamespaceMode::Pod as i32,
            uids: vec![range(host_id)],
            gids: vec![range(host_id)],
        }),
        ..Default::default()
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // A pod of `handler` whose user namespace maps root to `host_id`, with one container
    // running `script` and the volume bound idmapped; its sandbox, container and log dir.
    let create = |node: &Node, name: &str, handler: &str, host_id: u32, script: &str| {
        let logs = node.runtimed.dir.path().join(format!("logs-{name}"));
        let pod = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                namespace: "ns".into(),
                uid: format!("uid-{name}"),
                attempt: 0,
            }),
            log_directory: logs.display().to_string(),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(userns(host_id)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let container = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: "c".into(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: node.busybox.clone(),
                ..Default::default()
            }),
            command: ["sh", "-c", script].map(String::from).to_vec(),
            log_path: "c.log".into(),
            mounts: vec![cri::Mount {
                container_path: "/data".into(),
                host_path: volume.display().to_string(),
                uid_mappings: vec![range(host_id)],
                gid_mappings: vec![range(host_id)],
                ..Default::default()
            }],
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(userns(host_id)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let (sandbox, id) = runtime.block_on(async {
            let mut client = node.runtimed.client().await;
            let run = cri::RunPodSandboxRequest {
                config: Some(pod.clone()),
                runtime_handler: handler.into(),
            };
            let sandbox = client.run_pod_sandbox(run).await.unwrap().into_inner();
            let create = cri::CreateContainerRequest {
                pod_sandbox_id: sandbox.pod_sandbox_id.clone(),
                config: Some(container),
                sandbox_config: Some(pod),
            };
            let created = client.create_container(create).await.unwrap().into_inner();
            (sandbox.pod_sandbox_id, created.container_id)
        });
        (sandbox, id, logs)
    };
    let nothing_left_mounted = |node: &Node, what: &str| {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let state = node.runtimed.dir.path().display().to_string();
        let left: Vec<&str> = mounts.lines().filter(|l| l.contains(&state)).collect();
        assert!(left.is_empty(), "{what}: left mounted: {left:?}");
    };
    let script = "head -1 /proc/self/uid_map | tr -s ' '; id -u; touch /etc/mine && echo wrote; \
        stat -c '%u %g' /data/f; echo mine > /data/g && echo shared";
    for (handler, host_id) in [("runc", 200_000), ("crun", 300_000)] {
        let (sandbox, id, logs) = create(
            &node,
            &format!("userns-{handler}"),
            handler,
            host_id,
            script,
        );
        let ip = node.inspect(&sandbox)["status"]["network"]["ip"].clone();
        assert!(
            ip.as_str().unwrap().starts_with("10.235.10."),
            "{handler}: {ip}"
        );
        node.crictl(&["start", &id]);
        let inspect = node.wait_state(&id, "CONTAINER_EXITED");
        let log = std::fs::read_to_string(logs.join("c.log")).unwrap();
        assert_eq!(inspect["status"]["exitCode"], 0, "{handler}: {log}");
        let stdout: Vec<String> = log_lines(&log)
            .into_iter()
            .filter(|(stream, _, _)| stream == "stdout")
            .map(|(_, _, text)| text.trim().to_string())
            .collect();
        assert_eq!(
            stdout,
            [
                format!("0 {host_id} 65536"),
                "0".into(),
                "wrote".into(),
                "0 0".into(),
                "shared".into()
            ],
            "{handler}: {log}"
        );
        let written = std::fs::metadata(volume.join("g")).unwrap();
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(written.uid(), 0, "the pod's root writes as root on disk");
        std::fs::remove_file(volume.join("g")).unwrap();
        node.crictl(&["rmp", "-f", &sandbox]);
        nothing_left_mounted(&node, handler);
    }

    // Namespaces and idmapped mounts outlive a restart of runtimed.
    let (sandbox, id, _) = create(&node, "userns-restart", "runc", 400_000, "sleep 1000");
    node.crictl(&["start", &id]);
    node.wait_state(&id, "CONTAINER_RUNNING");
    node.runtimed.crash_and_restart();
    let exec = node.crictl(&["exec", "-s", &id, "sh", "-c", "id -u; ls /data"]);
    assert_eq!(
        exec.split_whitespace().collect::<Vec<_>>(),
        ["0", "f"],
        "{exec}"
    );
    node.crictl(&["rmp", "-f", &sandbox]);
    nothing_left_mounted(&node, "after a restart");

    let mut host_network = userns(200_000);
    host_network.network = cri::NamespaceMode::Node as i32;
    let refused = runtime.block_on(async {
        let mut client = node.runtimed.client().await;
        let run = cri::RunPodSandboxRequest {
            config: Some(cri::PodSandboxConfig {
                metadata: Some(cri::PodSandboxMetadata {
                    name: "userns-host".into(),
                    namespace: "ns".into(),
                    uid: "uid-userns-host".into(),
                    attempt: 0,
                }),
                linux: Some(cri::LinuxPodSandboxConfig {
                    security_context: Some(cri::LinuxSandboxSecurityContext {
                        namespace_options: Some(host_network),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            runtime_handler: String::new(),
        };
        client.run_pod_sandbox(run).await.unwrap_err()
    });
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("user namespace"), "{refused:?}");
}
