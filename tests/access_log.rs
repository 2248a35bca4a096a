//! The access log (`[log] access`, `access_format`): one line per answered request with every
//! field, 404s and 5xx included, and the requests the HTTP/1 server refused before routing;
//! `X-Request-Id` kept, generated, sent upstream and returned; the combined format; SIGUSR1
//! reopening the file after logrotate's rename (the real binary).

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET with extra headers; the status, the `x-request-id` answered and the body.
async fn get_with(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut b = Request::get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::new())).expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), client().request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = resp.status().as_u16();
    let id = resp
        .headers()
        .get("x-request-id")
        .map(|v| v.to_str().expect("ascii").to_string())
        .unwrap_or_default();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, id, String::from_utf8_lossy(&body).into_owned())
}

fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

async fn wait_lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let ok = eventually(10, || async { lines(path).len() >= n }).await;
    let got = lines(path);
    assert!(ok, "expected {n} lines in {}, got {got:?}", path.display());
    got
}

fn upstream_header(up: &TestUpstream, name: &str) -> Option<String> {
    up.last_headers
        .lock()
        .expect("lock")
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

#[tokio::test]
async fn json_lines_with_every_field_and_request_ids() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let body = format!(
        "[log]\naccess = \"{}\"\naccess_format = \"json\"\n{}",
        log.display(),
        service("api", &[blue.addr], &[green.addr], "path_prefix = \"/api\"")
    );
    let p = TestProxy::start_with(&body, Some(TOKEN), Some(dir)).await;

    // 1. A client's id is kept, sent upstream and returned.
    let (s, id, b) = get_with(p.proxy, "/api/one?x=1", &[("x-request-id", "client-id-1")]).await;
    assert_eq!((s, b.as_str()), (200, "blue\n"));
    assert_eq!(id, "client-id-1");
    assert_eq!(
        upstream_header(&blue, "x-request-id").as_deref(),
        Some("client-id-1")
    );
    // 2. Without one (or with an unusable one), one is generated, sent upstream and returned.
    let (s, id2, _) = get_with(p.proxy, "/api/two", &[]).await;
    assert_eq!(s, 200);
    assert!(!id2.is_empty() && id2 != "client-id-1");
    assert_eq!(upstream_header(&blue, "x-request-id"), Some(id2.clone()));
    let (_, id3, _) = get_with(p.proxy, "/api/three", &[("x-request-id", "has space\"")]).await;
    assert!(!id3.is_empty() && !id3.contains(' ') && id3 != id2, "{id3}");
    // 3. A 500 from the upstream, a 404 of the proxy's own.
    blue.set_status(500);
    let (s, id500, _) = get_with(p.proxy, "/api/fail", &[]).await;
    assert_eq!(s, 500);
    blue.set_status(200);
    let (s, id404, b404) = get_with(p.proxy, "/nowhere", &[]).await;
    assert_eq!(s, 404);
    assert!(!id404.is_empty());

    let got = wait_lines(&log, 5).await;
    assert_eq!(got.len(), 5, "one line per request: {got:?}");
    let v: Vec<Value> = got
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for line in &v {
        let obj = line.as_object().expect("object");
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "bytes",
                "client",
                "color",
                "duration_ms",
                "method",
                "path",
                "request_id",
                "service",
                "status",
                "time",
                "upstream"
            ],
            "{line}"
        );
        assert!(humantime::parse_rfc3339(line["time"].as_str().expect("time")).is_ok());
        assert_eq!(line["client"], "127.0.0.1");
        assert_eq!(line["method"], "GET");
        assert!(line["duration_ms"].as_f64().expect("duration") >= 0.0);
    }
    let first = &v[0];
    assert_eq!(first["path"], "/api/one?x=1");
    assert_eq!(first["status"], 200);
    assert_eq!(first["bytes"], "blue\n".len());
    assert_eq!(first["service"], "api");
    assert_eq!(first["color"], "blue");
    assert_eq!(first["upstream"], blue.addr.to_string());
    assert_eq!(first["request_id"], "client-id-1");
    assert_eq!(v[1]["request_id"], id2.as_str());
    assert_eq!(v[2]["request_id"], id3.as_str());
    assert_eq!(v[3]["status"], 500);
    assert_eq!(v[3]["request_id"], id500.as_str());
    assert_eq!(v[3]["upstream"], blue.addr.to_string());
    assert_eq!(v[4]["status"], 404);
    assert_eq!(v[4]["path"], "/nowhere");
    assert_eq!(v[4]["bytes"], b404.len());
    assert_eq!(v[4]["service"], Value::Null);
    assert_eq!(v[4]["upstream"], Value::Null);
    assert_eq!(v[4]["request_id"], id404.as_str());
    p.stop().await;
}

/// The contract's `X-Request-Id` without the access log: kept from the client or generated,
/// sent upstream and returned, on upstream answers, the proxy's own (404) and a head the
/// server refuses; `[log] request_id = false` leaves the header alone.
#[tokio::test]
async fn request_ids_without_the_access_log() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let svc = service("api", &[blue.addr], &[green.addr], "path_prefix = \"/api\"");
    let p = TestProxy::start(&svc).await;
    let (s, id, _) = get_with(p.proxy, "/api/x", &[]).await;
    assert_eq!(s, 200);
    assert!(id.len() == 21 && id.as_bytes()[8] == b'-', "{id:?}");
    assert_eq!(upstream_header(&blue, "x-request-id"), Some(id.clone()));
    let (_, id2, _) = get_with(p.proxy, "/api/x", &[]).await;
    assert_ne!(id, id2);
    // A client's usable id is kept, both ways; an unusable one is replaced.
    let (_, kept, _) = get_with(p.proxy, "/api/x", &[("x-request-id", "mine")]).await;
    assert_eq!(kept, "mine");
    assert_eq!(
        upstream_header(&blue, "x-request-id").as_deref(),
        Some("mine")
    );
    let (_, replaced, _) = get_with(p.proxy, "/api/x", &[("x-request-id", "a\"b")]).await;
    assert!(replaced.len() == 21, "{replaced:?}");
    assert_eq!(upstream_header(&blue, "x-request-id"), Some(replaced));
    // The proxy's own answers carry one too.
    let (s, id404, _) = get_with(p.proxy, "/nowhere", &[("x-request-id", "lost")]).await;
    assert_eq!((s, id404.as_str()), (404, "lost"));
    let mut c = tokio::net::TcpStream::connect(p.proxy)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(
        &mut c,
        b"GET /api/x HTTP/1.1\r\nHost: a\r\nHost: b\r\nX-Request-Id: refused-1\r\n\r\n",
    )
    .await
    .expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::io::AsyncReadExt::read_to_end(&mut c, &mut out),
    )
    .await;
    let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
    assert!(
        text.starts_with("http/1.1 400") && text.contains("\r\nx-request-id: refused-1\r\n"),
        "{text}"
    );
    p.stop().await;

    let off = format!("[log]\nrequest_id = false\n{svc}");
    let p = TestProxy::start(&off).await;
    let (s, id, _) = get_with(p.proxy, "/api/x", &[]).await;
    assert_eq!((s, id.as_str()), (200, ""));
    assert_eq!(upstream_header(&blue, "x-request-id"), None);
    // A client's own header still passes as any header does.
    let (_, _, _) = get_with(p.proxy, "/api/x", &[("x-request-id", "mine")]).await;
    assert_eq!(
        upstream_header(&blue, "x-request-id").as_deref(),
        Some("mine")
    );
    p.stop().await;
}

/// `client - - [date] "METHOD target VERSION" status bytes "referer" "ua" key=value...`
fn parse_combined(line: &str) -> Option<(String, String, String, u16, u64, String, String)> {
    let (client, rest) = line.split_once(" - - [")?;
    let (date, rest) = rest.split_once("] \"")?;
    let (request, rest) = rest.split_once("\" ")?;
    let mut parts = rest.splitn(3, ' ');
    let status: u16 = parts.next()?.parse().ok()?;
    let bytes: u64 = parts.next()?.parse().ok()?;
    let rest = parts.next()?.strip_prefix('"')?;
    let (referer, rest) = rest.split_once("\" \"")?;
    let (ua, extras) = rest.split_once("\" ")?;
    // 01/Dec/2026:13:47:05 +0000
    let (day, zone) = date.split_once(' ')?;
    if zone != "+0000" || day.len() != 20 || &day[2..3] != "/" || &day[6..7] != "/" {
        return None;
    }
    Some((
        client.to_string(),
        request.to_string(),
        format!("{referer}|{ua}"),
        status,
        bytes,
        extras.to_string(),
        date.to_string(),
    ))
}

#[tokio::test]
async fn combined_format_parses() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let body = format!(
        "[log]\naccess = \"{}\"\naccess_format = \"combined\"\n{}",
        log.display(),
        service("api", &[blue.addr], &[green.addr], "")
    );
    let p = TestProxy::start_with(&body, Some(TOKEN), Some(dir)).await;
    let (_, id, _) = get_with(
        p.proxy,
        "/a?b=%22c%22",
        &[
            ("referer", "http://x/\"q\""),
            ("user-agent", "test-agent/1"),
        ],
    )
    .await;
    let got = wait_lines(&log, 1).await;
    let (client, request, refua, status, bytes, extras, _) =
        parse_combined(&got[0]).unwrap_or_else(|| panic!("not combined: {}", got[0]));
    assert_eq!(client, "127.0.0.1");
    assert_eq!(request, "GET /a?b=%22c%22 HTTP/1.1");
    assert_eq!(refua, "http://x/\\x22q\\x22|test-agent/1");
    assert_eq!((status, bytes), (200, "blue\n".len() as u64));
    assert!(
        extras.starts_with("rt=")
            && extras.ends_with(&format!(
                "service=api color=blue upstream={} request_id={id}",
                blue.addr
            )),
        "{extras}"
    );
    p.stop().await;
}

/// `switchyard serve` as a process of its own: proxy and admin on free ports, the state file
/// in `dir`, `proxy` and `log` the bodies of those sections, `svc` the services; its stdout to
/// `stdout`. Returned once `/healthz` answers, with the proxy's and the admin's addresses.
async fn serve_process(
    dir: &std::path::Path,
    proxy: &str,
    log: &str,
    svc: &str,
    stdout: impl Into<Stdio>,
) -> (tokio::process::Child, SocketAddr, SocketAddr) {
    let (pp, ap) = (free_port(), free_port());
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:{pp}\"\n{proxy}[admin]\nlisten = \"127.0.0.1:{ap}\"\n\
         [state]\npath = \"{}\"\n[log]\n{log}{svc}",
        dir.join("state.json").display(),
    );
    let cfg = dir.join("switchyard.toml");
    std::fs::write(&cfg, text).expect("write config");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--config", cfg.to_str().expect("utf-8")])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(stdout)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let proxy: SocketAddr = format!("127.0.0.1:{pp}").parse().expect("addr");
    let admin: SocketAddr = format!("127.0.0.1:{ap}").parse().expect("addr");
    assert!(healthz_within(admin, 15).await, "switchyard did not start");
    (child, proxy, admin)
}

#[tokio::test]
async fn sigusr1_reopens_after_rename() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let (mut child, proxy, _admin) = serve_process(
        dir.path(),
        "shutdown_grace = \"5s\"\nworkers = 1\n",
        &format!("access = \"{}\"\n", log.display()),
        &service("api", &[blue.addr], &[green.addr], ""),
        Stdio::inherit(),
    )
    .await;
    let pid = child.id().expect("pid");
    assert_eq!(get(proxy, "/before").await.0, 200);
    wait_lines(&log, 1).await;
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).expect("rename");
    // Written to the renamed file until the reopen (the file handle follows the rename).
    assert_eq!(get(proxy, "/between").await.0, 200);
    wait_lines(&rotated, 2).await;
    let sent = std::process::Command::new("kill")
        .args(["-USR1", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    // The reopen happens on the writer thread; requests go on meanwhile.
    assert!(
        eventually(10, || async {
            let _ = get(proxy, "/after").await;
            log.exists() && lines(&log).iter().any(|l| l.contains("\"/after\""))
        })
        .await,
        "no new file after SIGUSR1"
    );
    let old = lines(&rotated);
    assert!(old[0].contains("\"/before\"") && old[1].contains("\"/between\""));
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exit")
        .expect("status");
    assert!(status.success());
}

/// A download the end of `shutdown_grace` cuts is logged (what the client got, its bytes): the
/// line is queued when the runtime drops the connection, and written before the exit. (The
/// log was flushed before the runtime dropped them: such requests left no line.)
#[tokio::test]
async fn a_download_cut_by_the_end_of_the_grace_is_logged() {
    // An upstream that sends its head and one chunk, then nothing.
    let slow = raw_upstream(|_| {
        Raw::Stall(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nchunk\n\r\n".to_vec(),
        )
    })
    .await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let (mut child, proxy, _admin) = serve_process(
        dir.path(),
        "shutdown_grace = \"1s\"\n",
        &format!("access = \"{}\"\n", log.display()),
        &service("api", &[slow], &[green.addr], ""),
        Stdio::inherit(),
    )
    .await;
    let pid = child.id().expect("pid");
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    s.write_all(b"GET /stream HTTP/1.1\r\nHost: api\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("chunk") {
        let n = s.read(&mut buf).await.expect("read");
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .expect("exit")
        .expect("status");
    assert!(status.success(), "{status:?}");
    let lines = lines(&log);
    let line = lines
        .iter()
        .find(|l| l.contains("\"/stream\""))
        .unwrap_or_else(|| panic!("no line for the cut download: {lines:?}"));
    let v: Value = serde_json::from_str(line).expect("json");
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["bytes"], 6, "{v}");
}

/// A sink that does not drain (stdout into a pipe nobody reads): requests go on, lines past the
/// queue are dropped and counted, and SIGTERM stops the process all the same.
#[tokio::test]
async fn a_blocked_sink_drops_and_counts_never_waits() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    // stdout is a pipe this test never reads: once its buffer (64 KiB) is full the writer
    // thread blocks in write(2).
    let (mut child, proxy, admin) = serve_process(
        dir.path(),
        "shutdown_grace = \"2s\"\nworkers = 1\n",
        "access = \"stdout\"\naccess_buffer = 16\n",
        &service("api", &[blue.addr], &[green.addr], ""),
        Stdio::piped(),
    )
    .await;
    // ~200 bytes a line: 1,000 lines are three times what the pipe holds.
    let long = format!("/{}", "x".repeat(100));
    for i in 0..1000 {
        let (s, _) = get(proxy, &format!("{long}/{i}")).await;
        assert_eq!(s, 200, "request {i}");
    }
    let (_, metrics) = get(admin, "/metrics").await;
    let dropped: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("switchyard_access_log_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no dropped counter in\n{metrics}"));
    assert!(dropped > 0.0, "nothing dropped: {dropped}");
    // SIGTERM still stops it: the flush at the end waits a bounded time for room in the full
    // queue (it waited for ever, and the process with it, past any grace).
    let pid = child.id().expect("pid");
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
    let _ = child.start_kill();
    let status = status
        .expect("still running 15 s after SIGTERM (grace 2 s)")
        .expect("status");
    assert!(status.success(), "{status:?}");
}

/// A sink whose writes fail (stdout on /dev/full: every write is ENOSPC): requests go on, and
/// every line lost is counted as dropped, not only those the queue had no room for.
#[tokio::test]
async fn lines_lost_to_failed_writes_are_counted() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full");
    let (mut child, proxy, admin) = serve_process(
        dir.path(),
        "shutdown_grace = \"2s\"\nworkers = 1\n",
        "access = \"stdout\"\n",
        &service("api", &[blue.addr], &[green.addr], ""),
        full,
    )
    .await;
    for i in 0..20 {
        let (s, _) = get(proxy, &format!("/{i}")).await;
        assert_eq!(s, 200, "request {i}");
    }
    // The writer takes up to 10 ms per batch: wait until all 20 are counted.
    let dropped = || async {
        let (_, metrics) = get(admin, "/metrics").await;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("switchyard_access_log_dropped_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let counted = eventually(10, || async { dropped().await == Some(20.0) }).await;
    assert!(counted, "dropped: {:?}, not 20", dropped().await);
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// Sends `data` on a connection of its own and reads the answer to the end: the status, the
/// `x-request-id` it carries, and its body. The sending side is closed after `data` unless it
/// asks for `Connection: close` (a request that is routed: a client that half-closes before its
/// answer counts as gone, as with hyper's server and nginx).
async fn raw(addr: SocketAddr, data: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(data).await.expect("write");
    if !data.windows(17).any(|w| w == b"Connection: close") {
        s.shutdown().await.expect("shutdown");
    }
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("answer timed out")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer head: {text:?}"));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status: {head:?}"));
    let id = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-request-id")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, id, body.as_bytes().to_vec())
}

fn log_config(log: &std::path::Path, format: &str, services: &str) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\nmax_header_bytes = 131072\n\
         [log]\naccess = \"{}\"\naccess_format = \"{format}\"\n{services}",
        log.display()
    )
}

/// Every answered request has its line, the ones the HTTP/1 server refuses before routing
/// included (as nginx logs its 400s): the status the client got, the bytes, the request id the
/// answer carried, the method and path as far as the request line has them, and null for what
/// was never decided (service, color, upstream).
/// An absolute-form target is logged as received, whole (as nginx's `$request`), though the
/// upstream gets the origin form.
#[tokio::test]
async fn an_absolute_form_target_is_logged_whole() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let body = log_config(
        &log,
        "json",
        &service("api", &[blue.addr], &[green.addr], "hosts = [\"api.test\"]"),
    );
    let p = TestProxy::start_with(&body, Some(TOKEN), Some(dir)).await;
    let (status, _, _) = raw(
        p.proxy,
        b"GET http://api.test/abs?q=1 HTTP/1.1\r\nHost: other\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    let lines = wait_lines(&log, 1).await;
    let v: serde_json::Value = serde_json::from_str(&lines[0]).expect("json line");
    assert_eq!(v["path"], "http://api.test/abs?q=1", "{v}");
    p.stop().await;
}

#[tokio::test]
async fn requests_refused_before_routing_have_their_line() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let body = log_config(
        &log,
        "json",
        &service("api", &[blue.addr], &[green.addr], "hosts = [\"api.test\"]"),
    );
    let p = TestProxy::start_with(&body, Some(TOKEN), Some(dir)).await;
    let long_target = format!("/{}", "a".repeat(70_000));
    let many_headers: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    // (what is sent, the method and path the line must have: None for null)
    let cases: Vec<(Vec<u8>, Option<&str>, Option<String>)> = vec![
        // httparse refuses a space in a field name: refused before the head is split off.
        (
            b"GET /bad-field HTTP/1.1\r\nHost: api.test\r\nBad Field: x\r\n\r\n".to_vec(),
            Some("GET"),
            Some("/bad-field".to_string()),
        ),
        // Content-Length with Transfer-Encoding: refused after the head was parsed.
        (
            b"POST /smuggle HTTP/1.1\r\nHost: api.test\r\nContent-Length: 3\r\n\
              Transfer-Encoding: chunked\r\n\r\nabc"
                .to_vec(),
            Some("POST"),
            Some("/smuggle".to_string()),
        ),
        // A lone CR inside the line is no line end: what follows it is logged too.
        (
            b"GET /ok\rinjected HTTP/1.1\r\nHost: api.test\r\n\r\n".to_vec(),
            Some("GET"),
            Some("/ok\rinjected".to_string()),
        ),
        // A bare LF line end.
        (
            b"GET /bare-lf HTTP/1.1\nHost: api.test\r\n\r\n".to_vec(),
            Some("GET"),
            Some("/bare-lf".to_string()),
        ),
        // Too many header fields: 431.
        (
            format!("GET /many HTTP/1.1\r\nHost: api.test\r\n{many_headers}\r\n").into_bytes(),
            Some("GET"),
            Some("/many".to_string()),
        ),
        // A target the URI type cannot hold: 414 (its line is cut for the log).
        (
            format!("GET {long_target} HTTP/1.1\r\nHost: api.test\r\n\r\n").into_bytes(),
            Some("GET"),
            None,
        ),
        // An HTTP version the server does not speak.
        (
            b"GET /version HTTP/3.0\r\nHost: api.test\r\n\r\n".to_vec(),
            Some("GET"),
            Some("/version".to_string()),
        ),
        // Not HTTP at all: a method-like word and nothing else.
        (b"hello\r\n\r\n".to_vec(), Some("hello"), None),
        // Routed, for comparison: no service for this Host (404), and a proxied one.
        (
            b"GET /unknown-host HTTP/1.1\r\nHost: other.test\r\nConnection: close\r\n\r\n".to_vec(),
            Some("GET"),
            Some("/unknown-host".to_string()),
        ),
        (
            b"GET /ok HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n".to_vec(),
            Some("GET"),
            Some("/ok".to_string()),
        ),
    ];
    let mut answers = Vec::new();
    for (data, _, _) in &cases {
        answers.push(raw(p.proxy, data).await);
    }
    let statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
    assert_eq!(
        &statuses[..6],
        [400, 400, 400, 400, 431, 414],
        "the refusals this test means to make"
    );
    assert!(statuses[6] >= 400 && statuses[7] >= 400, "{statuses:?}");
    assert_eq!(&statuses[8..], [404, 200]);

    let got = wait_lines(&log, cases.len()).await;
    // Late lines would show here: give the writer a moment more.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = if lines(&log).len() > got.len() {
        lines(&log)
    } else {
        got
    };
    assert_eq!(
        got.len(),
        cases.len(),
        "one line per answered request: {got:?}"
    );
    let v: Vec<Value> = got
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    for (i, ((_, method, path), (status, id, body))) in cases.iter().zip(&answers).enumerate() {
        assert!(!id.is_empty(), "case {i}: the answer has no x-request-id");
        let line = v
            .iter()
            .find(|l| l["request_id"] == id.as_str())
            .unwrap_or_else(|| panic!("case {i}: no line with request_id {id}: {got:?}"));
        assert_eq!(line["status"], *status, "case {i}: {line}");
        assert_eq!(line["bytes"], body.len(), "case {i}: {line}");
        assert_eq!(line["client"], "127.0.0.1", "case {i}: {line}");
        assert!(humantime::parse_rfc3339(line["time"].as_str().unwrap_or("")).is_ok());
        assert!(line["duration_ms"].as_f64().is_some(), "case {i}: {line}");
        assert_eq!(
            line["method"],
            method.map_or(Value::Null, Value::from),
            "case {i}: {line}"
        );
        match (i, path) {
            // The 414's path is the target as far as the line was kept.
            (5, _) => {
                let logged = line["path"].as_str().expect("a path");
                assert!(
                    logged.starts_with("/aaaa") && logged.len() < long_target.len(),
                    "case {i}: {} bytes",
                    logged.len()
                );
            }
            _ => assert_eq!(
                line["path"],
                path.clone().map_or(Value::Null, Value::from),
                "case {i}: {line}"
            ),
        }
        if i < 9 {
            for k in ["service", "color", "upstream"] {
                assert_eq!(line[k], Value::Null, "case {i}: {k}: {line}");
            }
        }
    }
    let ok = v
        .iter()
        .find(|l| l["path"] == "/ok")
        .expect("the proxied line");
    assert_eq!(ok["service"], "api");
    assert_eq!(ok["upstream"], blue.addr.to_string());
    p.stop().await;
}

/// The combined format shows a refused request's line as it was sent, and `-` for what was
/// never decided.
#[tokio::test]
async fn combined_format_logs_refused_requests() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let body = log_config(
        &log,
        "combined",
        &service("api", &[blue.addr], &[green.addr], ""),
    );
    let p = TestProxy::start_with(&body, Some(TOKEN), Some(dir)).await;
    let (s1, id1, b1) = raw(
        p.proxy,
        b"GET /x\"y HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    )
    .await;
    let (s2, id2, b2) = raw(p.proxy, b"\r\nhello\r\n\r\n").await;
    assert_eq!((s1, s2), (400, 400));
    let got = wait_lines(&log, 2).await;
    assert_eq!(got.len(), 2, "{got:?}");
    for (line, (want_request, status, bytes, id)) in got.iter().zip([
        ("GET /x\\x22y HTTP/1.1", s1, b1.len(), &id1),
        ("hello", s2, b2.len(), &id2),
    ]) {
        let (client, request, refua, st, b, extras, _) =
            parse_combined(line).unwrap_or_else(|| panic!("not combined: {line}"));
        assert_eq!(client, "127.0.0.1");
        assert_eq!(request, want_request, "{line}");
        assert_eq!(refua, "-|-", "{line}");
        assert_eq!((st, b), (status, bytes as u64), "{line}");
        assert!(
            extras.starts_with("rt=")
                && extras.ends_with(&format!("service=- color=- upstream=- request_id={id}")),
            "{line}"
        );
    }
    p.stop().await;
}

/// A refused head's Referer and User-Agent are logged in combined, as for any request, when the
/// head carried them in field lines that could be read (before the first that could not); `-`
/// when it did not. A client's usable `X-Request-Id` is kept and answered, as for any request.
#[tokio::test]
async fn combined_format_logs_the_referer_and_user_agent_of_refused_requests() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let body = log_config(
        &log,
        "combined",
        &service("api", &[blue.addr], &[green.addr], ""),
    );
    let p = TestProxy::start_with(&body, Some(TOKEN), Some(dir)).await;
    let many: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    // (what is sent, the status, the "referer|ua" the line must have, the client's id if kept)
    let cases: Vec<(Vec<u8>, u16, &str, Option<&str>)> = vec![
        // Parsed, then refused for its framing.
        (
            b"GET /te HTTP/1.1\r\nHost: a\r\nUser-Agent: curl/8.5.0\r\nReferer: http://r/p?q=1\r\n\
              X-Request-Id: client-1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
                .to_vec(),
            400,
            "http://r/p?q=1|curl/8.5.0",
            Some("client-1"),
        ),
        // Refused by httparse at a bad field line: the fields before it are known, not after.
        (
            b"GET /bad HTTP/1.1\r\nUser-Agent: ua/1\r\nBad Field: x\r\nReferer: http://late/\r\n\r\n"
                .to_vec(),
            400,
            "-|ua/1",
            None,
        ),
        // A bare LF line end.
        (
            b"GET /lf HTTP/1.1\nHost: a\r\nReferer: http://r/\r\nUser-Agent: ua \"q\"\r\n\r\n".to_vec(),
            400,
            "http://r/|ua \\x22q\\x22",
            None,
        ),
        // Too many fields: 431.
        (
            format!("GET /many HTTP/1.1\r\nUser-Agent: many/1\r\n{many}\r\n").into_bytes(),
            431,
            "-|many/1",
            None,
        ),
        // Neither field: `-` for both.
        (
            b"GET /none HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n".to_vec(),
            400,
            "-|-",
            None,
        ),
    ];
    let mut answers = Vec::new();
    for (data, status, _, client_id) in &cases {
        let a = raw(p.proxy, data).await;
        assert_eq!(a.0, *status, "{}", String::from_utf8_lossy(&data[..20]));
        if let Some(id) = client_id {
            assert_eq!(a.1, *id, "the client's request id is answered");
        }
        answers.push(a);
    }
    let got = wait_lines(&log, cases.len()).await;
    for (i, ((_, _, refua, _), (_, id, _))) in cases.iter().zip(&answers).enumerate() {
        let line = got
            .iter()
            .find(|l| l.ends_with(&format!("request_id={id}")))
            .unwrap_or_else(|| panic!("case {i}: no line with request_id {id}: {got:?}"));
        let (_, _, got_refua, _, _, _, _) =
            parse_combined(line).unwrap_or_else(|| panic!("not combined: {line}"));
        assert_eq!(got_refua, *refua, "case {i}: {line}");
    }
    p.stop().await;
}

/// h2 requests (prior knowledge) are logged as HTTP/1 ones are, with their request id returned
/// and sent upstream.
#[tokio::test]
async fn h2_requests_have_their_line() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let body = log_config(
        &log,
        "json",
        &service("api", &[blue.addr], &[green.addr], ""),
    );
    let p = TestProxy::start_with(&body, Some(TOKEN), Some(dir)).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let mut ids = Vec::new();
    for path in ["/h2/one", "/h2/two?q=1"] {
        let req = Request::get(format!("http://{}{path}", p.proxy))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
            .await
            .expect("in time")
            .expect("h2 request");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let id = resp
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .expect("an x-request-id")
            .to_string();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"blue\n");
        assert_eq!(upstream_header(&blue, "x-request-id"), Some(id.clone()));
        ids.push((path, id));
    }
    let got = wait_lines(&log, 2).await;
    assert_eq!(got.len(), 2, "{got:?}");
    for (line, (path, id)) in got.iter().zip(&ids) {
        let v: Value = serde_json::from_str(line).expect("JSON");
        assert_eq!(v["path"], *path, "{v}");
        assert_eq!(v["method"], "GET", "{v}");
        assert_eq!(v["status"], 200, "{v}");
        assert_eq!(v["bytes"], 5, "{v}");
        assert_eq!(v["request_id"], id.as_str(), "{v}");
        assert_eq!(v["service"], "api", "{v}");
        assert_eq!(v["color"], "blue", "{v}");
        assert_eq!(v["upstream"], blue.addr.to_string(), "{v}");
    }
    p.stop().await;
}

/// A `101` the server cannot switch to (the upstream switched before the request body was all
/// sent) reaches the client as a 502, and the line says 502, not 101.
#[tokio::test]
async fn a_101_answered_as_502_is_logged_as_502() {
    let up = raw_upstream(|_| {
        Raw::Answer(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
                .to_vec(),
        )
    })
    .await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let body = log_config(&log, "json", &service("api", &[up], &[green.addr], ""));
    let p = TestProxy::start_with(&body, Some(TOKEN), Some(dir)).await;
    let mut s = tokio::net::TcpStream::connect(p.proxy)
        .await
        .expect("connect");
    // Ten bytes of body announced, two sent: the upstream answers 101 before the rest.
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Content-Length: 10\r\n\r\nab",
    )
    .await
    .expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("answer timed out")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(text.starts_with("HTTP/1.1 502 "), "{text}");
    // The answer keeps the request's id, as every answer does.
    let id = text
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap_or_default()
        .to_string();
    assert_eq!(id.len(), 21, "{text}");
    let got = wait_lines(&log, 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = if lines(&log).len() > got.len() {
        lines(&log)
    } else {
        got
    };
    assert_eq!(got.len(), 1, "{got:?}");
    let v: Value = serde_json::from_str(&got[0]).expect("JSON");
    assert_eq!(v["status"], 502, "{v}");
    assert_eq!(v["bytes"], "bad gateway\n".len(), "{v}");
    assert_eq!(v["path"], "/ws", "{v}");
    assert_eq!(v["service"], "api", "{v}");
    assert_eq!(v["upstream"], up.to_string(), "{v}");
    assert_eq!(v["request_id"], id.as_str(), "{v}");
    // The metrics say 502 too; not a failure of the upstream, which answered.
    let (_, m) = get(p.admin, "/metrics").await;
    let by_code = |code: &str| metric_sum(&m, "switchyard_requests_total", &[("code", code)]);
    assert_eq!((by_code("502"), by_code("101")), (1.0, 0.0), "{m}");
    p.stop().await;
}

/// A WebSocket tunnel is logged when it closes, not when its `101` is written (as nginx and
/// HAProxy log one): `bytes` is what it carried to the client (the bytes the upstream sent
/// behind its 101 included) and `duration_ms` its whole life, whether the client closed it or
/// the end of `shutdown_grace` cut it.
#[tokio::test]
async fn a_tunnel_is_logged_when_it_closes_with_the_bytes_it_carried() {
    let up = raw_upstream(|_| {
        Raw::Echo(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nhi"
                .to_vec(),
        )
    })
    .await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let body = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\n\
         [log]\naccess = \"{}\"\n{}",
        log.display(),
        service("api", &[up], &[green.addr], "")
    );
    let p = TestProxy::start_with(&body, Some(TOKEN), Some(dir)).await;
    // The head and the two bytes the upstream sent behind it; then `n` bytes echoed.
    async fn open(proxy: SocketAddr, path: &str) -> tokio::net::TcpStream {
        let mut s = tokio::net::TcpStream::connect(proxy)
            .await
            .expect("connect");
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"\r\n\r\nhi") {
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
                .await
                .expect("read timed out")
                .expect("read");
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 101 "), "{got:?}");
        s
    }
    async fn echo(s: &mut tokio::net::TcpStream, msg: &[u8]) {
        s.write_all(msg).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
            .await
            .expect("echo timed out")
            .expect("echo");
        assert_eq!(back, msg);
    }

    let mut first = open(p.proxy, "/ws/one").await;
    echo(&mut first, b"hello").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    echo(&mut first, b"again").await;
    // Open, so not logged yet (the writer writes within 10 ms of a line).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(lines(&log), Vec::<String>::new());
    drop(first);
    let got = wait_lines(&log, 1).await;
    let v: Value = serde_json::from_str(&got[0]).expect("JSON");
    assert_eq!(v["path"], "/ws/one", "{v}");
    assert_eq!(v["status"], 101, "{v}");
    assert_eq!(v["bytes"], 2 + 5 + 5, "{v}");
    assert!(v["duration_ms"].as_f64().expect("duration") >= 500.0, "{v}");
    assert_eq!(v["upstream"], up.to_string(), "{v}");

    // Still open at the end of the grace: cut, and logged with what it carried.
    let mut second = open(p.proxy, "/ws/two").await;
    echo(&mut second, b"abc").await;
    let dir = p.stop().await;
    let got = wait_lines(&log, 2).await;
    let v: Value = serde_json::from_str(&got[1]).expect("JSON");
    assert_eq!(v["path"], "/ws/two", "{v}");
    assert_eq!(
        (v["status"].clone(), v["bytes"].clone()),
        (101.into(), 5.into()),
        "{v}"
    );
    assert!(v["duration_ms"].as_f64().expect("duration") >= 900.0, "{v}");
    drop(second);
    drop(dir);
}
