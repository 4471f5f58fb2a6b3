//! Exec, attach and port-forward through the streaming server, with crictl as the client
//! (SPDY/3.1, as the kubelet proxies it) and busybox containers under runc and conmon.

use crate::harness::Node;
use proto::cri;
use std::io::{Read as _, Write as _};
use std::os::fd::{AsFd as _, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn pod(name: &str) -> serde_json::Value {
    serde_json::json!({
        "metadata": {"name": name, "namespace": "streams", "uid": format!("uid-{name}"), "attempt": 1},
        "linux": {},
    })
}

/// A running container of busybox running `command` in a pod of its own; (pod, container).
fn running(
    node: &Node,
    name: &str,
    command: &[&str],
    extra: serde_json::Value,
) -> (String, String) {
    let pod_config = pod(name);
    let sandbox = node.run_pod(&pod_config, "").unwrap();
    let mut config = serde_json::json!({
        "metadata": {"name": name},
        "image": {"image": node.busybox},
        "command": command,
        "linux": {},
    });
    if let (Some(config), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        config.extend(extra.clone());
    }
    let id = node.create(&sandbox, &config, &pod_config).unwrap();
    node.crictl(&["start", &id]);
    node.wait_state(&id, "CONTAINER_RUNNING");
    (sandbox, id)
}

/// crictl with `args`, given `input` and then the end of its stdin; what it left.
fn crictl_with_input(node: &Node, args: &[&str], input: &[u8]) -> std::process::Output {
    let mut crictl = node
        .crictl_command()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    crictl.stdin.take().unwrap().write_all(input).unwrap();
    crictl.wait_with_output().unwrap()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Host pids whose command line is exactly `argv`.
fn pids_running(argv: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .collect()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Processes whose parent is `pid` (runtimed's runtime and dialler children).
fn children(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .count()
}

/// Waits until runtimed holds no more descriptors or children than `fds` and `kids`:
/// sessions linger a moment after their client closes.
fn assert_nothing_leaked(node: &Node, fds: usize, kids: usize) {
    let pid = node.runtimed.child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while (open_fds(pid) > fds || children(pid) > kids) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        open_fds(pid) <= fds,
        "runtimed had {fds} fds, now {}",
        open_fds(pid)
    );
    assert!(
        children(pid) <= kids,
        "runtimed had {kids} children, now {}",
        children(pid)
    );
}

#[test]
fn exec_streams_output_input_and_exit_codes_and_dies_with_its_client() {
    let node = Node::start("rtdstr1", "10.236.1.0/24");
    node.pull_busybox();
    let (_pod, id) = running(&node, "exec", &["sleep", "3600"], serde_json::json!({}));
    // One session first, so lazily made descriptors (the reactor, the listener) exist.
    node.crictl(&["exec", &id, "true"]);
    let pid = node.runtimed.child.id();
    let (fds, kids) = (open_fds(pid), children(pid));

    assert_eq!(node.crictl(&["exec", &id, "echo", "-n", "hello"]), "hello");
    let out = node.crictl_output(&["exec", &id, "sh", "-c", "echo oops >&2"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("oops"),
        "{out:?}"
    );
    assert!(out.stdout.is_empty(), "{out:?}");

    // crictl reports the code it read from the v4 status, and fails.
    let out = node.crictl_output(&["exec", &id, "sh", "-c", "exit 3"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("command terminated with exit code 3"),
        "{out:?}"
    );

    // Far past SPDY's 64 KiB window, which Go clients never open again.
    let big = node.crictl(&[
        "exec",
        &id,
        "sh",
        "-c",
        "head -c 300000 /dev/zero | tr '\\0' a",
    ]);
    assert_eq!(big.len(), 300_000);
    assert!(big.bytes().all(|b| b == b'a'));

    let out = crictl_with_input(&node, &["exec", "-i", &id, "cat"], b"abc\ndef");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"abc\ndef");

    let mut sleeper = node
        .crictl_command()
        .args(["exec", &id, "sleep", "1234"])
        .spawn()
        .unwrap();
    wait_until("the exec'd sleep runs", || {
        !pids_running(&["sleep", "1234"]).is_empty()
    });
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    wait_until("the exec'd sleep is killed with its client", || {
        pids_running(&["sleep", "1234"]).is_empty()
    });
    assert_nothing_leaked(&node, fds, kids);
}

/// A pty whose slave side is crictl's terminal (crictl is its session leader, so a size
/// change signals it); the master side is read into a buffer by a thread.
struct Terminal {
    master: Arc<OwnedFd>,
    seen: Arc<Mutex<Vec<u8>>>,
    child: Child,
}

impl Terminal {
    fn spawn(mut command: Command, rows: u16, cols: u16) -> Self {
        use rustix::pty::OpenptFlags;
        use std::os::unix::process::CommandExt as _;
        let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
        let master = rustix::pty::openpt(flags).unwrap();
        rustix::pty::grantpt(&master).unwrap();
        rustix::pty::unlockpt(&master).unwrap();
        let slave = rustix::pty::ioctl_tiocgptpeer(&master, flags).unwrap();
        let master = Arc::new(master);
        Self::sized(&master, rows, cols);
        for stdio in 0..3 {
            let fd = slave.try_clone().unwrap();
            match stdio {
                0 => command.stdin(fd),
                1 => command.stdout(fd),
                _ => command.stderr(fd),
            };
        }
        // SAFETY: setsid and ioctl are async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                rustix::process::setsid()?;
                rustix::process::ioctl_tiocsctty(std::os::fd::BorrowedFd::borrow_raw(0))?;
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        drop(command);
        drop(slave);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (reader, into) = (master.clone(), seen.clone());
        std::thread::spawn(move || {
            let mut file = std::fs::File::from(reader.try_clone().unwrap());
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = file.read(&mut buf) {
                into.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self {
            master,
            seen,
            child,
        }
    }

    fn sized(master: &OwnedFd, rows: u16, cols: u16) {
        let size = rustix::termios::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        rustix::termios::tcsetwinsize(master.as_fd(), size).unwrap();
    }

    fn resize(&self, rows: u16, cols: u16) {
        Self::sized(&self.master, rows, cols);
    }

    fn type_line(&self, line: &str) {
        rustix::io::write(self.master.as_fd(), format!("{line}\r").as_bytes()).unwrap();
    }

    fn wait_for(&self, want: &str) {
        wait_until(&format!("the terminal shows {want:?}"), || {
            String::from_utf8_lossy(&self.seen.lock().unwrap()).contains(want)
        });
    }

    /// Types `line` every half second until the terminal shows `want`.
    fn type_until(&self, line: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.type_line(line);
            std::thread::sleep(Duration::from_millis(500));
            let seen = String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned();
            if seen.contains(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "terminal never showed {want:?}: {seen:?}"
            );
        }
    }
}

#[test]
fn exec_and_attach_with_a_terminal_follow_its_size() {
    let node = Node::start("rtdstr2", "10.236.2.0/24");
    node.pull_busybox();
    let (_pod, id) = running(&node, "tty-exec", &["sleep", "3600"], serde_json::json!({}));
    let mut exec = node.crictl_command();
    exec.args(["exec", "-it", &id, "sh"]);
    let mut terminal = Terminal::spawn(exec, 33, 101);
    terminal.type_until("stty size", "33 101");
    terminal.resize(40, 120);
    terminal.type_until("stty size", "40 120");
    terminal.type_line("exit 7");
    // crictl reports the code it read from the v4 status, and fails.
    assert!(!terminal.child.wait().unwrap().success());
    terminal.wait_for("command terminated with exit code 7");

    let tty = serde_json::json!({"tty": true, "stdin": true});
    let (_pod, attached) = running(&node, "tty-attach", &["sh"], tty);
    let mut attach = node.crictl_command();
    attach.args(["attach", "-it", &attached]);
    let mut terminal = Terminal::spawn(attach, 21, 77);
    terminal.type_until("stty size", "21 77");
    terminal.resize(25, 90);
    terminal.type_until("stty size", "25 90");
    terminal.type_line("exit");
    terminal.child.wait().unwrap();
    node.wait_state(&attached, "CONTAINER_EXITED");
}

#[test]
fn attach_carries_stdin_and_detaching_leaves_the_container_running() {
    let node = Node::start("rtdstr3", "10.236.3.0/24");
    node.pull_busybox();
    let once = serde_json::json!({"stdin": true, "stdin_once": true});
    let (_pod, id) = running(&node, "attach-once", &["cat"], once);
    let out = crictl_with_input(&node, &["attach", "-i", &id], b"hello\n");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"hello\n");
    // stdin_once: the end of the client's input was the end of cat's.
    node.wait_state(&id, "CONTAINER_EXITED");

    let open = serde_json::json!({"stdin": true, "stdin_once": false});
    let (_pod, id) = running(&node, "attach-open", &["cat"], open);
    for word in ["one", "two"] {
        let mut client = node
            .crictl_command()
            .args(["attach", "-i", &id])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = client.stdin.take().unwrap();
        stdin.write_all(format!("{word}\n").as_bytes()).unwrap();
        let mut stdout = client.stdout.take().unwrap();
        let mut got = vec![0u8; word.len() + 1];
        stdout.read_exact(&mut got).unwrap();
        assert_eq!(got, format!("{word}\n").as_bytes());
        client.kill().unwrap();
        client.wait().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            node.inspect_container(&id)["status"]["state"],
            "CONTAINER_RUNNING",
            "detaching stopped the container"
        );
    }
}

/// `crictl port-forward` of `local` to the pod's `remote`, once crictl listens.
fn port_forward(node: &Node, sandbox: &str, local: u16, remote: u16) -> Child {
    let forward = node
        .crictl_command()
        .args(["port-forward", sandbox, &format!("{local}:{remote}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("crictl listens", || {
        std::net::TcpStream::connect(("127.0.0.1", local)).is_ok()
    });
    forward
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET /index.html` on 127.0.0.1:`port`; the whole response.
fn get(port: u16) -> std::io::Result<String> {
    let mut tcp = std::net::TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
    tcp.write_all(b"GET /index.html HTTP/1.0\r\nHost: pod\r\n\r\n")?;
    let mut response = String::new();
    tcp.read_to_string(&mut response)?;
    Ok(response)
}

#[test]
fn port_forward_carries_parallel_connections_and_reports_closed_ports() {
    let node = Node::start("rtdstr4", "10.236.4.0/24");
    node.pull_busybox();
    let server =
        "mkdir -p /www && echo pod-page > /www/index.html && exec httpd -f -p 8080 -h /www";
    let (sandbox, _id) = running(&node, "web", &["sh", "-c", server], serde_json::json!({}));
    let pid = node.runtimed.child.id();
    let (fds, kids) = (open_fds(pid), children(pid));

    let local = free_port();
    let mut forward = port_forward(&node, &sandbox, local, 8080);
    let gets: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || get(local)))
        .collect();
    for response in gets {
        let response = response.join().unwrap().unwrap();
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.ends_with("pod-page\n"), "{response}");
    }
    forward.kill().unwrap();
    forward.wait().unwrap();

    let closed = free_port();
    let mut forward = port_forward(&node, &sandbox, closed, 9999);
    let response = get(closed).unwrap_or_default();
    assert!(response.is_empty(), "nothing listens on 9999: {response}");
    std::thread::sleep(Duration::from_millis(500));
    forward.kill().unwrap();
    let out = forward.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("9999") && said.contains("refused"), "{said}");
    assert_nothing_leaked(&node, fds, kids);
}

#[tokio::test(flavor = "current_thread")]
async fn streaming_requests_are_checked_and_urls_are_single_use() {
    let node = Node::start("rtdstr5", "10.236.5.0/24");
    node.pull_busybox();
    let (sandbox, id) = running(&node, "urls", &["sleep", "3600"], serde_json::json!({}));
    let mut client = node.runtimed.client().await;
    let exec = |container_id: &str| cri::ExecRequest {
        container_id: container_id.into(),
        cmd: vec!["true".into()],
        stdout: true,
        ..Default::default()
    };

    let unknown = client.exec(exec("0123abcd")).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    let empty = cri::ExecRequest {
        cmd: vec![],
        ..exec(&id)
    };
    let status = client.exec(empty).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let both = cri::ExecRequest {
        tty: true,
        stderr: true,
        ..exec(&id)
    };
    let status = client.exec(both).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let forward = cri::PortForwardRequest {
        pod_sandbox_id: "0123abcd".into(),
        port: vec![80],
    };
    let status = client.port_forward(forward).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");

    let url = client.exec(exec(&id)).await.unwrap().into_inner().url;
    let forged = format!("{}XXXXXXXX", url.trim_end_matches(|c| c != '/'));
    assert_eq!(http_status(&forged, true), 404, "forged token");
    assert_eq!(http_status(&url, false), 400, "no upgrade asked for");
    assert_eq!(http_status(&url, true), 404, "the token was used up");
    let attach_url = client
        .attach(cri::AttachRequest {
            container_id: id.clone(),
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let as_exec = attach_url.replace("/attach/", "/exec/");
    assert_eq!(
        http_status(&as_exec, true),
        404,
        "token of another request kind"
    );

    node.crictl(&["stop", &id]);
    let stopped = client.exec(exec(&id)).await.unwrap_err();
    assert_eq!(
        stopped.code(),
        tonic::Code::FailedPrecondition,
        "{stopped:?}"
    );
    let stopped = client
        .attach(cri::AttachRequest {
            container_id: id.clone(),
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(
        stopped.code(),
        tonic::Code::FailedPrecondition,
        "{stopped:?}"
    );
    node.crictl(&["stopp", &sandbox]);
    let forward = cri::PortForwardRequest {
        pod_sandbox_id: sandbox.clone(),
        port: vec![80],
    };
    let status = client.port_forward(forward).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
}

/// The HTTP status of a request for `url`, asking for SPDY/3.1 or not.
fn http_status(url: &str, upgrade: bool) -> u16 {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut tcp = std::net::TcpStream::connect(host).unwrap();
    let upgrade = if upgrade {
        "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n"
    } else {
        ""
    };
    write!(
        tcp,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\n{upgrade}Content-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).unwrap();
    std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap()
}
