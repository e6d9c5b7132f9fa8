//! Hub weights on first use, through `mulo-compile`: a loopback server that speaks the part of
//! the Hub's HTTP API hf-hub uses (`/{repo}/resolve/{rev}/{file}` with `X-Repo-Commit`, `ETag`,
//! `Content-Length`, ranges) serves the fixture meta-network, with `HF_ENDPOINT` pointing at it
//! and a temporary `HF_HOME`. First use downloads; the second works offline with the server
//! gone; a missing repository, a truncated file and a server that never answers each give a
//! clear error and leave the cache as it was.
mod common;

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The fixture repository's name on the loopback Hub.
const REPO: &str = "mulo-test/fixture";
/// Its commit.
const COMMIT: &str = "1111111111111111111111111111111111111111";
/// Connections one server answers at most: a client in a loop fails the test instead of hanging.
const MAX_CONNECTIONS: usize = 40;

/// How the server misbehaves.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Answers as the Hub does.
    Normal,
    /// Sends only half of a file's body, then closes the connection.
    Truncate,
    /// Reads the request and never answers.
    Hang,
}

/// A loopback Hub serving `repos` (key -> file name -> bytes) at [`COMMIT`].
struct Hub {
    url: String,
    stop: Arc<AtomicBool>,
    /// `METHOD path authorization` of every request.
    log: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hub {
    fn start(repos: BTreeMap<String, BTreeMap<String, Vec<u8>>>, mode: Mode) -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stop2, log2) = (stop.clone(), log.clone());
        let thread = std::thread::spawn(move || {
            let mut served = 0;
            let mut held = Vec::new();
            while !stop2.load(Ordering::SeqCst) && served < MAX_CONNECTIONS {
                match listener.accept() {
                    Ok((stream, _)) => {
                        served += 1;
                        stream.set_nonblocking(false).unwrap();
                        stream
                            .set_read_timeout(Some(Duration::from_secs(5)))
                            .unwrap();
                        if let Some(stream) = serve(stream, &repos, mode, &log2) {
                            // Hang: keep the socket open, unanswered, until the server stops.
                            held.push(stream);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Hub {
            url,
            stop,
            log,
            thread: Some(thread),
        }
    }

    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Answers one request (one per connection); returns the stream when it must be held open.
fn serve(
    stream: TcpStream,
    repos: &BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    mode: Mode,
    log: &Mutex<Vec<String>>,
) -> Option<TcpStream> {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next()?.to_string(), parts.next()?.to_string());
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let auth = headers.get("authorization").cloned().unwrap_or_default();
    log.lock()
        .unwrap()
        .push(format!("{method} {path} {auth}").trim().to_string());
    if mode == Mode::Hang {
        return Some(stream);
    }
    let mut stream = stream;
    let found = path.strip_prefix('/').and_then(|p| {
        let (repo, rest) = p.split_once("/resolve/")?;
        let (_rev, file) = rest.split_once('/')?;
        Some((repo.to_string(), repos.get(repo)?.get(file)?.clone()))
    });
    let Some((_, body)) = found else {
        let msg = b"{\"error\":\"Repository not found\"}";
        let _ = write!(
            stream,
            "HTTP/1.1 404 Not Found\r\nX-Error-Code: RepositoryNotFound\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            msg.len()
        );
        let _ = stream.write_all(msg);
        return None;
    };
    let etag = hex(&Sha256::digest(&body));
    let total = body.len();
    let (status, start, end) = match headers.get("range").and_then(|r| r.strip_prefix("bytes=")) {
        Some(range) => {
            let (a, b) = range.split_once('-').unwrap();
            let a: usize = a.parse().unwrap();
            let b = if b.is_empty() {
                total - 1
            } else {
                b.parse::<usize>().unwrap().min(total - 1)
            };
            ("206 Partial Content", a, b + 1)
        }
        None => ("200 OK", 0, total),
    };
    let mut head = format!(
        "HTTP/1.1 {status}\r\nX-Repo-Commit: {COMMIT}\r\nETag: \"{etag}\"\r\nAccept-Ranges: bytes\r\nContent-Length: {}\r\nConnection: close\r\n",
        end - start
    );
    if status.starts_with("206") {
        head += &format!("Content-Range: bytes {start}-{}/{total}\r\n", end - 1);
    }
    head += "\r\n";
    let _ = stream.write_all(head.as_bytes());
    if method == "GET" {
        let mut send = &body[start..end];
        // The one-byte probe of the metadata request is answered whole even when truncating.
        if mode == Mode::Truncate && send.len() > 1 {
            send = &send[..send.len() / 2];
        }
        let _ = stream.write_all(send);
    }
    let _ = stream.flush();
    None
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The fixture meta-network as a Hub repository's files.
fn fixture_files() -> BTreeMap<String, Vec<u8>> {
    let dir = common::golden_dir().join("weights");
    ["model.safetensors", "config.json"]
        .into_iter()
        .map(|f| (f.to_string(), std::fs::read(dir.join(f)).unwrap()))
        .collect()
}

fn repos(keys: &[&str]) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
    keys.iter()
        .map(|k| (k.to_string(), fixture_files()))
        .collect()
}

/// Runs `mulo-compile --shape 8x4 --target ir ARGS` against the loopback Hub with `hf_home`,
/// killed after 60 s.
fn mulo(hf_home: &Path, endpoint: &str, args: &[&str], env: &[(&str, &str)]) -> (Output, f64) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mulo-compile"));
    cmd.args(["--shape", "8x4", "--target", "ir"])
        .args(args)
        .env("HF_HOME", hf_home)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HUB_DOWNLOAD_TIMEOUT", "10")
        .env("HF_HUB_ETAG_TIMEOUT", "10")
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("HF_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("mulo-compile runs");
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("mulo-compile {args:?} ran over 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (out, started.elapsed().as_secs_f64())
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The paths that differ between two [`tree`]s (added, removed or with other bytes), so that a
/// failure names them instead of printing whole files.
fn changed(
    before: &BTreeMap<PathBuf, Vec<u8>>,
    after: &BTreeMap<PathBuf, Vec<u8>>,
) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = before.keys().chain(after.keys()).cloned().collect();
    paths.sort();
    paths.dedup();
    paths.retain(|p| before.get(p) != after.get(p));
    paths
}

/// Every file under `dir` with its bytes (links read through), for "the cache is as it was".
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), Vec::new());
                stack.push(p);
            } else {
                let bytes = std::fs::read(&p).unwrap_or_default();
                out.insert(p.strip_prefix(dir).unwrap().to_path_buf(), bytes);
            }
        }
    }
    out
}

fn snapshot(hf_home: &Path, key: &str) -> PathBuf {
    hf_home
        .join("hub")
        .join(format!("models--{}", key.replace('/', "--")))
        .join("snapshots")
        .join(COMMIT)
}

#[test]
fn first_use_downloads_then_the_cache_serves_offline() {
    let home = common::temp_dir("hub-first-use");
    let hub = Hub::start(repos(&[REPO, "btherien/mulo"]), Mode::Normal);

    let (out, _) = mulo(
        &home,
        &hub.url,
        &["--weights", REPO],
        &[("HF_TOKEN", "tok-1")],
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("weights: Hub model {REPO}, downloaded")),
        "says it downloaded: {err}"
    );
    let snap = snapshot(&home, REPO);
    for (file, bytes) in fixture_files() {
        assert_eq!(std::fs::read(snap.join(&file)).unwrap(), bytes, "{file}");
    }
    let refs = home.join("hub/models--mulo-test--fixture/refs/main");
    assert_eq!(std::fs::read_to_string(refs).unwrap(), COMMIT);
    let requests = hub.requests();
    assert!(
        requests.iter().all(|r| r.ends_with("Bearer tok-1")),
        "HF_TOKEN is sent: {requests:?}"
    );

    // The default key comes from the Hub too, not the demo network.
    let (out, _) = mulo(&home, &hub.url, &[], &[]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("weights: Hub model btherien/mulo, downloaded") && !err.contains("DEMO"),
        "{err}"
    );
    drop(hub);

    // The server is gone: offline, by the variable or the flag, the cache serves.
    let before = tree(&home);
    for (args, env) in [
        (vec!["--weights", REPO], vec![("HF_HUB_OFFLINE", "1")]),
        (vec!["--weights", REPO, "--offline"], vec![]),
        (vec![], vec![("HF_HUB_OFFLINE", "1")]),
    ] {
        let (out, _) = mulo(&home, "http://127.0.0.1:9", &args, &env);
        let err = stderr(&out);
        assert!(out.status.success(), "{args:?}: {err}");
        assert!(err.contains("from the local cache"), "{args:?}: {err}");
    }
    // Not offline, the cache is still used first: no request reaches the (gone) server.
    let (out, _) = mulo(&home, "http://127.0.0.1:9", &["--weights", REPO], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let after = tree(&home);
    assert!(
        changed(&before, &after).is_empty(),
        "loading from the cache changes nothing, but these changed: {:?}",
        changed(&before, &after)
    );

    // Offline with nothing cached: the cache's error, no download attempted.
    let (out, _) = mulo(
        &home,
        "http://127.0.0.1:9",
        &["--weights", "mulo-test/other"],
        &[("HF_HUB_OFFLINE", "1")],
    );
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(
        err.contains("mulo-test/other") && err.contains("not in the local Hugging Face cache"),
        "{err}"
    );
}

/// Runs a failing download of `REPO` over a cache that already holds `btherien/mulo`, and
/// checks that the error says `expect` and the cache is untouched and still usable.
fn failure_leaves_the_cache_as_it_was(name: &str, mode: Mode, serve: &[&str], expect: &[&str]) {
    let home = common::temp_dir(name);
    {
        let hub = Hub::start(repos(&["btherien/mulo"]), Mode::Normal);
        let (out, _) = mulo(&home, &hub.url, &[], &[]);
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let before = tree(&home);
    let hub = Hub::start(repos(serve), mode);
    let (out, secs) = mulo(
        &home,
        &hub.url,
        &["--weights", REPO],
        &[
            ("HF_HUB_DOWNLOAD_TIMEOUT", "1"),
            ("HF_HUB_ETAG_TIMEOUT", "1"),
        ],
    );
    let err = stderr(&out);
    assert!(!out.status.success(), "{name}: {err}");
    assert!(!err.contains("panicked"), "{name}: {err}");
    for word in expect.iter().chain([&REPO, &"the cache is as it was"]) {
        assert!(err.contains(word), "{name}: the error says {word:?}: {err}");
    }
    assert!(secs < 30.0, "{name}: took {secs} s");
    assert!(
        hub.requests().len() <= 4,
        "{name}: bounded requests {:?}",
        hub.requests()
    );
    let after = tree(&home);
    assert!(
        changed(&before, &after).is_empty(),
        "{name}: the cache is as it was, but these changed: {:?}",
        changed(&before, &after)
    );
    drop(hub);
    let (out, _) = mulo(&home, "http://127.0.0.1:9", &[], &[("HF_HUB_OFFLINE", "1")]);
    let err = stderr(&out);
    assert!(
        out.status.success() && err.contains("btherien/mulo from the local cache"),
        "{name}: the cache stays usable: {err}"
    );
}

#[test]
fn a_missing_repository_is_a_clear_error() {
    failure_leaves_the_cache_as_it_was(
        "hub-missing",
        Mode::Normal,
        &[],
        &["404", "no such repository"],
    );
}

#[test]
fn a_truncated_file_is_a_clear_error() {
    failure_leaves_the_cache_as_it_was(
        "hub-truncated",
        Mode::Truncate,
        &[REPO],
        &["closed before all bytes were read"],
    );
}

#[test]
fn a_server_that_never_answers_times_out() {
    failure_leaves_the_cache_as_it_was(
        "hub-hang",
        Mode::Hang,
        &[REPO],
        &["no complete answer within 4 s", "HF_HUB_DOWNLOAD_TIMEOUT"],
    );
}

#[test]
fn the_default_weights_fall_back_to_the_demo_when_the_hub_cannot_be_reached() {
    let home = common::temp_dir("hub-unreachable");
    // Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
    let (out, _) = mulo(&home, "http://127.0.0.1:9", &[], &[]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: using the bundled DEMO network")
            && err.contains("could not be reached"),
        "says why: {err}"
    );
    assert_eq!(tree(&home.join("hub")), BTreeMap::new(), "nothing written");
}
