//! External stream processors run as real child processes: shell scripts written per test
//! and the system's `zstd` and `gzip`.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use processors::{Chain, Decryption, Error, ExternalProcessor, Keyring, Layer, Stream, TAR};
use tempfile::TempDir;

const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const CUSTOM: &str = "application/vnd.test.layer";

/// Several MiB of bytes that compress only partly, so compressed and plain streams both
/// cross many pipe buffers.
fn data(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            b"abcdefgh"[(state % 8) as usize]
        })
        .collect()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(bytes).unwrap();
    encoder.finish().unwrap()
}

fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 3).unwrap()
}

/// Writes `body` as a shell script run by `/bin/sh` (not executed directly: a script
/// still open for writing in a concurrently forked test would fail with "text file busy").
fn script(dir: &Path, name: &str, accepts: &str, returns: &str, body: &str) -> ExternalProcessor {
    let file = dir.join(format!("{name}.sh"));
    fs::write(&file, body).unwrap();
    ExternalProcessor {
        name: name.to_string(),
        accepts: vec![accepts.to_string()],
        returns: returns.to_string(),
        path: PathBuf::from("/bin/sh"),
        args: vec![file.display().to_string()],
        env: Vec::new(),
    }
}

fn chain(processors: Vec<ExternalProcessor>) -> Chain {
    Chain::new(processors, Decryption::Disabled).unwrap()
}

fn open<'a>(
    chain: &Chain,
    media_type: &str,
    blob: impl Read + Send + 'a,
) -> Result<Stream<'a>, Error> {
    let annotations = BTreeMap::new();
    let layer = Layer {
        media_type,
        digest: "sha256:0123",
        size: 0,
        annotations: &annotations,
    };
    chain.open(&layer, Box::new(io::BufReader::new(blob)))
}

fn read_all(chain: &Chain, media_type: &str, blob: Vec<u8>) -> io::Result<Vec<u8>> {
    let mut stream = open(chain, media_type, Box::new(io::Cursor::new(blob))).unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out)?;
    Ok(out)
}

/// The processor error a failed read carries, as text.
fn external_error(error: &io::Error) -> String {
    match Error::from_io(error) {
        Some(e @ Error::External { .. }) => e.to_string(),
        other => panic!("expected an external processor error, got {other:?} from {error}"),
    }
}

fn dir() -> TempDir {
    tempfile::tempdir().unwrap()
}

#[test]
fn zstd_wrapper_turns_a_zstd_layer_into_tar() {
    let dir = dir();
    let unzstd = script(dir.path(), "unzstd", ZSTD, TAR, "exec zstd -d -c -q\n");
    let plain = data(6 << 20);
    let out = read_all(&chain(vec![unzstd]), ZSTD, zstd(&plain)).unwrap();
    assert!(out == plain, "output differs from the original");
}

#[test]
fn configured_gzip_processor_replaces_the_builtin_one() {
    let dir = dir();
    let marker = dir.path().join("ran");
    let body = format!("echo ran > '{}'\nexec gzip -d -c\n", marker.display());
    let gunzip = script(dir.path(), "gunzip", GZIP, TAR, &body);
    let plain = data(1 << 20);
    let out = read_all(&chain(vec![gunzip]), GZIP, gzip(&plain)).unwrap();
    assert!(out == plain, "output differs from the original");
    assert_eq!(fs::read_to_string(marker).unwrap(), "ran\n");
}

#[test]
fn two_external_stages_hand_over_to_the_builtin_gunzip() {
    let dir = dir();
    let middle = "application/vnd.test.layer+zstd";
    let first = script(dir.path(), "first", CUSTOM, middle, "exec gzip -d -c\n");
    let second = script(dir.path(), "second", middle, GZIP, "exec zstd -d -c -q\n");
    let plain = data(3 << 20);
    let blob = gzip(&zstd(&gzip(&plain)));
    let out = read_all(&chain(vec![second, first]), CUSTOM, blob).unwrap();
    assert!(out == plain, "output differs from the original");
}

#[test]
fn overlapping_accepts_go_to_the_first_name() {
    let dir = dir();
    let late = script(dir.path(), "b-late", CUSTOM, TAR, "echo late\n");
    let early = script(dir.path(), "a-early", CUSTOM, TAR, "echo early\n");
    let out = read_all(&chain(vec![late, early]), CUSTOM, Vec::new()).unwrap();
    assert_eq!(out, b"early\n");
}

#[test]
fn environment_is_inherited_then_configured_then_media_type() {
    let dir = dir();
    let dump = dir.path().join("env");
    let body = format!("env > '{}'\nexec cat\n", dump.display());
    let mut processor = script(dir.path(), "env", CUSTOM, TAR, &body);
    processor.env = vec!["TEST_SETTING=a=b".to_string()];
    let out = read_all(&chain(vec![processor]), CUSTOM, b"layer".to_vec()).unwrap();
    assert_eq!(out, b"layer");
    let env = fs::read_to_string(dump).unwrap();
    let lines: Vec<&str> = env.lines().collect();
    assert!(lines.contains(&"TEST_SETTING=a=b"), "{env}");
    assert!(
        lines.contains(&format!("STREAM_PROCESSOR_MEDIATYPE={CUSTOM}").as_str()),
        "{env}"
    );
    let path = std::env::var("PATH").unwrap();
    assert!(lines.contains(&format!("PATH={path}").as_str()), "{env}");
}

/// `0x0A <len> type_url 0x12 <len> json`, lengths as varints.
fn any(type_url: &str, json: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    for (tag, field) in [(0x0A, type_url.as_bytes()), (0x12, json.as_bytes())] {
        bytes.push(tag);
        let mut len = field.len();
        while len >= 0x80 {
            bytes.push((len as u8 & 0x7F) | 0x80);
            len >>= 7;
        }
        bytes.push(len as u8);
        bytes.extend_from_slice(field);
    }
    bytes
}

#[test]
fn ocicrypt_decoder_ids_get_the_payload_on_fd_3() {
    let dir = dir();
    let saved = dir.path().join("payload");
    let body = format!("cat <&3 > '{}'\nexec cat\n", saved.display());
    let decoder = script(
        dir.path(),
        "io.containerd.ocicrypt.decoder.v1.tar",
        CUSTOM,
        TAR,
        &body,
    );
    let chain = Chain::new(vec![decoder], Decryption::Node(Keyring::new(dir.path()))).unwrap();
    let annotations = BTreeMap::from([(
        "org.opencontainers.image.enc.keys.jwe".to_string(),
        "a2V5".to_string(),
    )]);
    let layer = Layer {
        media_type: CUSTOM,
        digest: "sha256:feed",
        size: 5,
        annotations: &annotations,
    };
    let mut out = Vec::new();
    chain
        .open(&layer, Box::new(&b"layer"[..]))
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    assert_eq!(out, b"layer");
    let json = concat!(
        r#"{"DecryptConfig":{"Parameters":null},"Descriptor":{"mediaType":"application/vnd.test.layer","#,
        r#""digest":"sha256:feed","size":5,"annotations":{"org.opencontainers.image.enc.keys.jwe":"a2V5"}}}"#
    );
    let expected = any("io.containerd.ocicrypt.v1.Payload", json);
    assert_eq!(fs::read(saved).unwrap(), expected);
}

#[test]
fn a_large_payload_does_not_block_the_stream() {
    let dir = dir();
    let saved = dir.path().join("payload");
    let annotations = BTreeMap::from([("big".to_string(), "k".repeat(200_000))]);
    let bodies = [
        // Reads fd 3 only after all of stdin.
        format!("cat\ncat <&3 > '{}'\n", saved.display()),
        // Never reads fd 3.
        "exec cat\n".to_string(),
    ];
    for body in bodies {
        let decoder = script(
            dir.path(),
            "io.containerd.ocicrypt.decoder.v1.tar",
            CUSTOM,
            TAR,
            &body,
        );
        let chain = Chain::new(vec![decoder], Decryption::Node(Keyring::new(dir.path()))).unwrap();
        let layer = Layer {
            media_type: CUSTOM,
            digest: "sha256:feed",
            size: 0,
            annotations: &annotations,
        };
        let input = data(1 << 20);
        let mut out = Vec::new();
        chain
            .open(&layer, Box::new(io::Cursor::new(input.clone())))
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        assert!(out == input, "output differs from the input");
    }
    assert!(fs::metadata(saved).unwrap().len() > 200_000);
}

#[test]
fn without_a_payload_there_is_no_fd_3() {
    let dir = dir();
    let body = "if [ -e /proc/$$/fd/3 ]; then echo open; else echo closed; fi\n";
    let decoder = script(
        dir.path(),
        "io.containerd.ocicrypt.decoder.v1.tar",
        CUSTOM,
        TAR,
        body,
    );
    let out = read_all(&chain(vec![decoder]), CUSTOM, Vec::new()).unwrap();
    assert_eq!(out, b"closed\n");
}

#[test]
fn a_failing_child_reports_its_stderr_and_name() {
    let dir = dir();
    let body = "head -c 100000\necho boom >&2\nexit 1\n";
    let failing = script(dir.path(), "halfway", CUSTOM, TAR, body);
    let mut stream = open(
        &chain(vec![failing]),
        CUSTOM,
        Box::new(io::Cursor::new(data(1 << 20))),
    )
    .unwrap();
    let mut out = Vec::new();
    let error = stream.read_to_end(&mut out).unwrap_err();
    assert_eq!(out.len(), 100_000);
    let message = external_error(&error);
    assert!(message.contains("halfway"), "{message}");
    assert!(message.contains("exited with status 1: boom"), "{message}");
    let again = stream.read(&mut [0; 16]).unwrap_err();
    assert_eq!(external_error(&again), message);
}

#[test]
fn exit_status_after_closing_stdout_still_counts() {
    let dir = dir();
    let body = "cat\nexec >&-\nsleep 0.2\nexit 3\n";
    let late = script(dir.path(), "late", CUSTOM, TAR, body);
    let error = read_all(&chain(vec![late]), CUSTOM, b"layer".to_vec()).unwrap_err();
    let message = external_error(&error);
    assert!(message.contains("exited with status 3"), "{message}");
}

#[test]
fn death_by_signal_is_reported() {
    let dir = dir();
    let killed = script(dir.path(), "killed", CUSTOM, TAR, "kill -9 $$\n");
    let error = read_all(&chain(vec![killed]), CUSTOM, Vec::new()).unwrap_err();
    let message = external_error(&error);
    assert!(message.contains("killed by signal 9"), "{message}");
}

#[test]
fn a_missing_binary_is_named() {
    let missing = ExternalProcessor {
        name: "missing".to_string(),
        accepts: vec![CUSTOM.to_string()],
        returns: TAR.to_string(),
        path: PathBuf::from("/nonexistent/ctd-decoder"),
        args: Vec::new(),
        env: Vec::new(),
    };
    let error = open(&chain(vec![missing]), CUSTOM, Box::new(io::empty()))
        .err()
        .unwrap();
    assert!(matches!(error, Error::External { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("/nonexistent/ctd-decoder"), "{message}");
    assert!(message.contains("No such file or directory"), "{message}");
}

#[test]
fn returning_an_accepted_type_is_rejected() {
    let dir = dir();
    let looping = script(dir.path(), "looping", CUSTOM, CUSTOM, "exec cat\n");
    let error = Chain::new(vec![looping], Decryption::Disabled).unwrap_err();
    assert!(matches!(error, Error::Config { .. }), "{error}");
    assert!(error.to_string().contains("looping"), "{error}");
}

#[test]
fn a_child_that_never_reads_can_write_a_lot() {
    let dir = dir();
    let body = "head -c 5000000 /dev/zero\n";
    let deaf = script(dir.path(), "deaf", CUSTOM, TAR, body);
    let out = read_all(&chain(vec![deaf]), CUSTOM, data(4 << 20)).unwrap();
    assert_eq!(out.len(), 5_000_000);
}

#[test]
fn a_child_may_write_a_lot_before_it_reads() {
    let dir = dir();
    let body = "head -c 1000000 /dev/zero\nexec cat\n";
    let chatty = script(dir.path(), "chatty", CUSTOM, TAR, body);
    let input = data(4 << 20);
    let out = read_all(&chain(vec![chatty]), CUSTOM, input.clone()).unwrap();
    assert_eq!(out.len(), 1_000_000 + input.len());
    assert!(out[1_000_000..] == input[..], "input not passed through");
}

#[test]
fn dropping_the_stream_kills_the_child() {
    let dir = dir();
    let pid_file = dir.path().join("pid");
    let body = format!("echo $$ > '{}'\nexec cat\n", pid_file.display());
    let endless = script(dir.path(), "endless", CUSTOM, TAR, &body);
    let mut stream = open(
        &chain(vec![endless]),
        CUSTOM,
        Box::new(io::repeat(7).take(u64::MAX)),
    )
    .unwrap();
    let mut first = vec![0; 1 << 20];
    stream.read_exact(&mut first).unwrap();
    let pid = fs::read_to_string(&pid_file).unwrap().trim().to_string();
    let proc = PathBuf::from(format!("/proc/{pid}"));
    assert!(
        proc.exists(),
        "child {pid} should run while the stream is open"
    );
    drop(stream);
    assert!(
        !proc.exists(),
        "child {pid} still exists after the stream was dropped"
    );
}

/// Input that fails after some bytes.
struct Broken(usize);

impl Read for Broken {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.0 == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "registry went away",
            ));
        }
        let n = buf.len().min(self.0);
        buf[..n].fill(1);
        self.0 -= n;
        Ok(n)
    }
}

#[test]
fn input_errors_pass_through_and_stop_the_child() {
    let dir = dir();
    let pid_file = dir.path().join("pid");
    let body = format!("echo $$ > '{}'\nexec cat\n", pid_file.display());
    let cat = script(dir.path(), "cat", CUSTOM, TAR, &body);
    let mut stream = open(&chain(vec![cat]), CUSTOM, Box::new(Broken(300_000))).unwrap();
    let error = stream.read_to_end(&mut Vec::new()).unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
    assert_eq!(error.to_string(), "registry went away");
    let pid = fs::read_to_string(&pid_file).unwrap().trim().to_string();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "child {pid} still runs"
    );
}

#[test]
fn long_stderr_keeps_its_tail() {
    let dir = dir();
    let body = concat!(
        "i=0\n",
        "while [ $i -lt 20000 ]; do echo \"line $i\" >&2; i=$((i+1)); done\n",
        "exit 2\n",
    );
    let noisy = script(dir.path(), "noisy", CUSTOM, TAR, body);
    let error = read_all(&chain(vec![noisy]), CUSTOM, Vec::new()).unwrap_err();
    let message = external_error(&error);
    assert!(
        message.len() < 64 * 1024 + 200,
        "{} bytes kept",
        message.len()
    );
    assert!(
        message.ends_with("line 19999"),
        "{}",
        &message[message.len() - 40..]
    );
    assert!(
        message.contains("exited with status 2: ..."),
        "{}",
        &message[..80]
    );
    assert!(!message.contains("line 0\n"));
}

#[test]
fn an_earlier_stage_failing_after_the_last_one_finished_is_reported() {
    let dir = dir();
    let middle = "application/vnd.test.middle";
    let first = script(
        dir.path(),
        "first",
        CUSTOM,
        middle,
        "cat\necho bad hmac >&2\nexit 1\n",
    );
    let second = script(dir.path(), "second", middle, TAR, "head -c 10\n");
    let error = read_all(&chain(vec![first, second]), CUSTOM, data(1 << 20)).unwrap_err();
    let message = external_error(&error);
    assert!(message.contains("first"), "{message}");
    assert!(message.contains("bad hmac"), "{message}");
}
