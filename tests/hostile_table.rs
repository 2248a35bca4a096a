//! Hostile input, table-driven (issue 14): each row is the bytes a client sends, the status it
//! must get, and what the upstream may receive (nothing, or a head with and without certain
//! lines). The README's "Hostile input" table is this table. Below it: the HTTP/2 cases (raw
//! frames through the `h2` crate), the broken upstream answers, and the resource attacks
//! (slowloris, slow readers, idle h2 connections, admin floods) against small limits, each
//! while a normal client must still be served.
mod common;
use common::*;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The size of `/large`, a finite body.
const LARGE: usize = 1024 * 1024;
/// The size of `/small`, a body under the h2 server's small-body size.
const SMALL_BODY: usize = 10_000;

/// An upstream on raw sockets that records every request head and answers by path.
struct Recorder {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    /// Connections of `/big` whose endless body could no longer be written (the proxy let go).
    released: Arc<AtomicUsize>,
}

impl Recorder {
    async fn start() -> Recorder {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let heads = Arc::new(Mutex::new(Vec::new()));
        let released = Arc::new(AtomicUsize::new(0));
        let (h, r) = (heads.clone(), released.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(serve_raw(s, h.clone(), r.clone()));
            }
        });
        Recorder {
            addr,
            heads,
            released,
        }
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.heads.lock().expect("lock"))
    }

    /// The first head recorded since the last take, lowercased ("" if none); the rest dropped.
    fn take_first_lower(&self) -> String {
        self.take()
            .first()
            .map(|h| h.to_ascii_lowercase())
            .unwrap_or_default()
    }
}

async fn serve_raw(mut s: TcpStream, heads: Arc<Mutex<Vec<String>>>, released: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        heads.lock().expect("lock").push(head.clone());
        let path = head.split(' ').nth(1).unwrap_or("/").to_string();
        let answer: Vec<u8> = match path.as_str() {
            "/big" => {
                let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
                if s.write_all(head).await.is_err() {
                    return;
                }
                let mut piece = format!("{:x}\r\n", 64 * 1024).into_bytes();
                piece.extend_from_slice(&[b'x'; 64 * 1024]);
                piece.extend_from_slice(b"\r\n");
                loop {
                    let w = tokio::time::timeout(Duration::from_secs(30), s.write_all(&piece));
                    if !matches!(w.await, Ok(Ok(()))) {
                        released.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
            }
            "/large" => {
                let mut a =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {LARGE}\r\n\r\n").into_bytes();
                a.extend_from_slice(&vec![b'y'; LARGE]);
                a
            }
            "/noread" => {
                // Takes the head, never a byte of the body.
                tokio::time::sleep(Duration::from_secs(30)).await;
                return;
            }
            "/s650" => b"HTTP/1.1 650 Odd\r\ncontent-length: 0\r\n\r\n".to_vec(),
            // Whitespace between field names and their colons (RFC 9112 5.1).
            "/spacecolon" => {
                b"HTTP/1.1 200 OK\r\nX-A : a\r\nX-Empty \t:\r\nX-B:  b\r\ncontent-length: 2\r\n\r\nok"
                    .to_vec()
            }
            // The same with lone LFs, which leave no room to rewrite the lines in place.
            "/spacecolon-lf" => {
                b"HTTP/1.1 200 OK\nX-A : a\nX-Empty \t:\nX-B:  b\ncontent-length: 2\n\nok".to_vec()
            }
            // ...and in a chunked body's trailer section.
            "/spacecolon-trailer" => {
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T : t\r\n\r\n"
                    .to_vec()
            }
            "/small" => {
                let mut a =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {SMALL_BODY}\r\n\r\n").into_bytes();
                a.extend_from_slice(&[b'z'; SMALL_BODY]);
                a
            }
            "/bighead" => {
                let mut a = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
                a.extend_from_slice(&vec![b'a'; 200 * 1024]);
                a.extend_from_slice(b"\r\ncontent-length: 2\r\n\r\nok");
                a
            }
            "/ws-h2c" => {
                b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n"
                    .to_vec()
            }
            "/ws" => {
                let a = b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n";
                if s.write_all(a).await.is_err() {
                    return;
                }
                // A tunnel: echo until either side closes.
                if !buf.is_empty() && s.write_all(&buf).await.is_err() {
                    return;
                }
                while let Ok(n) = s.read(&mut chunk).await {
                    if n == 0 || s.write_all(&chunk[..n]).await.is_err() {
                        break;
                    }
                }
                return;
            }
            _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        };
        if s.write_all(&answer).await.is_err() {
            return;
        }
    }
}

/// Reads one response (head, and a body by Content-Length); returns the head and whether the
/// proxy then closed the connection within `linger`.
async fn response(s: &mut TcpStream, linger: Duration) -> (String, bool) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut closed = false;
    let head = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            break head;
        }
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return (String::from_utf8_lossy(&buf).into_owned(), true),
        }
    };
    let len = head
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    while buf.len() < len {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => {
                closed = true;
                break;
            }
        }
    }
    if !closed {
        closed = loop {
            match tokio::time::timeout(linger, s.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(_)) => continue,
                Err(_) => break false,
            }
        };
    }
    (head, closed)
}

fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// One hostile input and what must come of it.
struct Row {
    name: &'static str,
    input: &'static [u8],
    status: u16,
    /// Whether the request reaches the upstream at all.
    reaches: bool,
    /// Lines the upstream's request head must have (compared without case).
    has: &'static [&'static str],
    /// Text the upstream's request head must not contain (compared without case).
    lacks: &'static [&'static str],
}

const fn refused(name: &'static str, input: &'static [u8]) -> Row {
    Row {
        name,
        input,
        status: 400,
        reaches: false,
        has: &[],
        lacks: &[],
    }
}

const fn passed(
    name: &'static str,
    input: &'static [u8],
    has: &'static [&'static str],
    lacks: &'static [&'static str],
) -> Row {
    Row {
        name,
        input,
        status: 200,
        reaches: true,
        has,
        lacks,
    }
}

/// The table. Keep the README's "Hostile input" section in step with it.
const TABLE: &[Row] = &[
    // Request smuggling: refused by the proxy before anything reaches an upstream.
    refused("two Content-Lengths", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
    refused("Content-Length list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\nhello!"),
    refused("Content-Length with Transfer-Encoding", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    refused("Transfer-Encoding xchunked", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
    // A coding the proxy does not implement, in a framing it can read (RFC 9112 6.1).
    Row {
        name: "Transfer-Encoding gzip, chunked",
        input: b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        status: 501,
        reaches: false,
        has: &[],
        lacks: &[],
    },
    refused("Transfer-Encoding chunked, gzip", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"),
    refused("Transfer-Encoding on two lines", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    refused("Transfer-Encoding in HTTP/1.0", b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    refused("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n"),
    refused("space before the colon", b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n"),
    refused("NUL in a value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\0c\r\n\r\n"),
    refused("lone CR in a value", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n"),
    refused("bare LF line end", b"GET / HTTP/1.1\nHost: a\r\n\r\n"),
    // Content-Length past 2^63 - 1 (a signed 64-bit parser reads it as negative).
    refused("Content-Length 2^63", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9223372036854775808\r\n\r\n"),
    refused("Content-Length 2^64 - 1", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 18446744073709551615\r\n\r\n"),
    // 1*DIGIT (RFC 9110 8.6): leading zeros, however many, are the same length.
    passed("Content-Length list of one value repeated", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0, 0\r\n\r\n", &["post / http/1.1", "content-length: 0"], &["0, 0"]),
    passed("Content-Length with 21 digits, all but one leading zeros", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 000000000000000000005\r\n\r\nhello", &["post / http/1.1", "content-length: 5"], &["content-length: 0"]),
    // Host (RFC 9110 7.2, RFC 9112 3.2).
    refused("missing Host", b"GET / HTTP/1.1\r\n\r\n"),
    refused("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    refused("Host with a space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
    refused("Host a:1:2", b"GET / HTTP/1.1\r\nHost: a:1:2\r\n\r\n"),
    refused("Host port past 65535", b"GET / HTTP/1.1\r\nHost: a:99999999999\r\n\r\n"),
    refused("Host bad IPv6 literal", b"GET / HTTP/1.1\r\nHost: [zz::1:]\r\n\r\n"),
    passed("Host IPv6 literal", b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n", &["host: [::1]:8080"], &[]),
    passed("Connection: Host keeps Host", b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Host, X-Drop\r\nX-Drop: 1\r\n\r\n", &["host: a"], &["x-drop"]),
    // Request targets (RFC 9112 3.2).
    refused("target without a slash", b"GET x HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("authority form without CONNECT", b"GET a:80 HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("asterisk form without OPTIONS", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("absolute form with userinfo", b"GET http://u@b/ HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("absolute form, other scheme", b"GET ftp://b/ HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("absolute form with an invalid Host", b"GET http://b/ HTTP/1.1\r\nHost: a b\r\n\r\n"),
    refused("fragment in the target", b"GET /p#f HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("fragment in an absolute-form target", b"GET http://b/p?q#f HTTP/1.1\r\nHost: a\r\n\r\n"),
    // Raw bytes over 0x7F, quotes and angle brackets (RFC 9112 3.2), which the http crate would
    // take and pass on; what browsers send unencoded in queries passes (WHATWG URL).
    refused("backslash in the path", b"GET /a\\..\\b HTTP/1.1\r\nHost: a\r\n\r\n"),
    passed("what browsers leave unencoded in a query", b"GET /s?filter[status]=open&ids[]=1&q={x}|a^b&p=100% HTTP/1.1\r\nHost: a\r\n\r\n", &["get /s?filter[status]=open&ids[]=1&q={x}|a^b&p=100% http/1.1"], &[]),
    refused("raw UTF-8 in the path", b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("raw byte 0x80 in the query", b"GET /?q=\x80 HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("raw UTF-8 in an absolute-form target", b"GET http://b.example/\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("DEL in the target", b"GET /a\x7fb HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("double quote in the target", b"GET /\"x\" HTTP/1.1\r\nHost: a\r\n\r\n"),
    refused("angle brackets in the target", b"GET /<a> HTTP/1.1\r\nHost: a\r\n\r\n"),
    passed("percent-encoding, sub-delims, : and @ in the target", b"GET /a%20b/!$&'()*+,;=:@-._~?x=%C3%a9&y=/?:@ HTTP/1.1\r\nHost: a\r\n\r\n", &["get /a%20b/!$&'()*+,;=:@-._~?x=%c3%a9&y=/?:@ http/1.1"], &[]),
    passed("absolute form with an IPv6 literal", b"GET http://[::1]:8080/p?q HTTP/1.1\r\nHost: a\r\n\r\n", &["get /p?q http/1.1", "host: [::1]:8080"], &[]),
    passed("OPTIONS *", b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", &["options * http/1.1"], &[]),
    passed("absolute form: its authority replaces Host", b"GET http://b.example/p?q HTTP/1.1\r\nHost: a\r\n\r\n", &["get /p?q http/1.1", "host: b.example", "x-forwarded-host: b.example"], &["host: a"]),
    passed("absolute form in HTTP/1.0 without Host", b"GET http://b.example/p HTTP/1.0\r\n\r\n", &["get /p http/1.1", "host: b.example"], &[]),
    passed("absolute form without a path", b"GET http://b.example?q HTTP/1.1\r\nHost: a\r\n\r\n", &["get /?q http/1.1", "host: b.example"], &[]),
    // RFC 9112 3.2.4: the last proxy sends OPTIONS with an empty path and no query as `*`.
    passed("OPTIONS absolute form without a path", b"OPTIONS http://b.example HTTP/1.1\r\nHost: a\r\n\r\n", &["options * http/1.1", "host: b.example"], &[]),
    passed("OPTIONS absolute form with a path", b"OPTIONS http://b.example/ HTTP/1.1\r\nHost: a\r\n\r\n", &["options / http/1.1", "host: b.example"], &[]),
    // Upgrade (RFC 9110 7.8): h2c is never tunnelled.
    passed("Upgrade: websocket, h2c", b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket, h2c\r\n\r\n", &["upgrade: websocket"], &["h2c"]),
    passed("Upgrade: h2c alone", b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n", &[], &["upgrade"]),
    // RFC 9110 10.1.1: a 100-continue in HTTP/1.0 is ignored, not made real in HTTP/1.1.
    passed("Expect: 100-continue in HTTP/1.0 is dropped", b"POST / HTTP/1.0\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello", &["post / http/1.1", "content-length: 5"], &["expect"]),
    // Forwarding headers: the client's values are kept and the proxy's go last.
    passed("client Forwarded is appended to", b"GET / HTTP/1.1\r\nHost: a\r\nForwarded: for=192.0.2.1\r\n\r\n", &["forwarded: for=192.0.2.1, for=127.0.0.1;host=\"a\";proto=http"], &[]),
    // A client's Forwarded that is not RFC 7239's grammar is dropped: its open quoted-string
    // would take the proxy's element in. Empty list elements are not written (RFC 9110 5.6.1).
    passed("client Forwarded with an unterminated quoted-string is dropped", b"GET / HTTP/1.1\r\nHost: a\r\nForwarded: for=\"1.2.3.4\r\n\r\n", &["forwarded: for=127.0.0.1;host=\"a\";proto=http"], &["1.2.3.4"]),
    passed("client Forwarded ending in a backslash is dropped", b"GET / HTTP/1.1\r\nHost: a\r\nForwarded: for=1.2.3.4;proto=https;by=\"\\\r\n\r\n", &["forwarded: for=127.0.0.1;host=\"a\";proto=http"], &["1.2.3.4"]),
    passed("empty client Forwarded and X-Forwarded-For", b"GET / HTTP/1.1\r\nHost: a\r\nForwarded:\r\nX-Forwarded-For: , \r\n\r\n", &["forwarded: for=127.0.0.1;host=\"a\";proto=http", "x-forwarded-for: 127.0.0.1"], &[]),
    passed("client X-Forwarded-For is appended to", b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 192.0.2.1\r\n\r\n", &["x-forwarded-for: 192.0.2.1, 127.0.0.1"], &[]),
    // Max-Forwards (RFC 9110 7.6.2): always updated, at most 2^63 - 1; not a number: removed.
    passed("Max-Forwards past 2^64 is capped", b"OPTIONS / HTTP/1.1\r\nHost: a\r\nMax-Forwards: 99999999999999999999\r\n\r\n", &["max-forwards: 9223372036854775807"], &["99999999999999999999"]),
    passed("Max-Forwards not a number is removed", b"OPTIONS / HTTP/1.1\r\nHost: a\r\nMax-Forwards: 5x\r\n\r\n", &["options / http/1.1"], &["max-forwards"]),
    passed("underscore look-alikes of framing and forwarding fields are dropped", b"GET / HTTP/1.1\r\nHost: a\r\nX_Forwarded_For: 6.6.6.6\r\nX_Forwarded_Host: evil\r\nContent_Length: 50\r\nX_Api_Key: k\r\n\r\n", &["x_api_key: k", "x-forwarded-for: 127.0.0.1", "x-forwarded-host: a"], &["6.6.6.6", "evil", "content_length"]),
    passed("client X-Forwarded-Host/-Proto are replaced", b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Host: evil\r\nX-Forwarded-Proto: https\r\n\r\n", &["x-forwarded-host: a", "x-forwarded-proto: http"], &["evil", "https"]),
];

const PROXY: &str = "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\nheader_read_timeout = \"2s\"\nbody_idle_timeout = \"1s\"\n";

#[tokio::test]
async fn the_hostile_input_table() {
    let up = Recorder::start().await;
    let green = dead_addr().await;
    let p = TestProxy::start(&format!(
        "{PROXY}{}",
        service("api", &[up.addr], &[green], "")
    ))
    .await;
    let mut failures = Vec::new();
    for row in TABLE {
        up.take();
        let mut s = TcpStream::connect(p.proxy).await.expect("connect");
        s.write_all(row.input).await.expect("write");
        let (head, _) = response(&mut s, Duration::from_millis(1)).await;
        let status = status_of(&head);
        let got = up.take();
        let mut problems = Vec::new();
        if status != row.status {
            problems.push(format!("status {status}, want {}", row.status));
        }
        match (row.reaches, got.as_slice()) {
            (false, []) => {}
            (false, _) => problems.push(format!("reached the upstream: {got:?}")),
            (true, [h]) => {
                let lower = h.to_ascii_lowercase();
                for want in row.has {
                    let want = want.to_ascii_lowercase();
                    if !lower.lines().any(|l| l == want) {
                        problems.push(format!("upstream head lacks {want:?}"));
                    }
                }
                for bad in row.lacks {
                    if lower.contains(&bad.to_ascii_lowercase()) {
                        problems.push(format!("upstream head has {bad:?}"));
                    }
                }
                if !problems.is_empty() {
                    problems.push(format!("upstream head: {h:?}"));
                }
            }
            (true, _) => problems.push(format!("upstream got {} heads", got.len())),
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {}", row.name, problems.join("; ")));
        }
    }
    p.stop().await;
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// The README's table lists every row, with its status.
#[test]
fn the_readme_lists_the_table() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    let section = readme
        .split("## Hostile input")
        .nth(1)
        .expect("a \"Hostile input\" section");
    for row in TABLE {
        let line = format!("| {} |", row.name);
        let found = section
            .lines()
            .find(|l| l.starts_with(&line))
            .unwrap_or_else(|| panic!("README lacks a row for {:?}", row.name));
        assert!(
            found.contains(&format!("| {} |", row.status)),
            "README row {found:?} does not say {}",
            row.status
        );
    }
}

#[tokio::test]
async fn a_request_pipelined_behind_a_refused_one_is_not_run() {
    let up = Recorder::start().await;
    let green = dead_addr().await;
    let p = TestProxy::start(&format!(
        "{PROXY}{}",
        service("api", &[up.addr], &[green], "")
    ))
    .await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: a:1:2\r\n\r\nGET /second HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let (head, closed) = response(&mut s, Duration::from_secs(3)).await;
    assert_eq!(status_of(&head), 400, "{head}");
    assert!(closed, "the connection stayed open after a refused request");
    assert!(
        up.take().is_empty(),
        "the pipelined request reached the upstream"
    );
    p.stop().await;
}

#[tokio::test]
async fn broken_upstream_answers_are_502_and_failures() {
    let up = Recorder::start().await;
    let green = dead_addr().await;
    let p = TestProxy::start(&format!(
        "{PROXY}{}",
        service("api", &[up.addr], &[green], "")
    ))
    .await;
    // Each part is checked and reported on its own.
    let mut problems = Vec::new();
    // 600-999 are no HTTP status codes (RFC 9110 15).
    let s650 = get(p.proxy, "/s650").await.0;
    if s650 != 502 {
        problems.push(format!("status 650 relayed as {s650}"));
    }
    let metrics = get(p.admin, "/metrics").await.1;
    if upstream_failures(&metrics) != 1.0 {
        problems.push("status 650 not counted as an upstream failure".to_string());
    }
    // A head over 128 KiB is refused even when it arrives complete.
    let big = get(p.proxy, "/bighead").await.0;
    if big != 502 {
        problems.push(format!("a 200 KiB response head answered {big}"));
    }
    let metrics = get(p.admin, "/metrics").await.1;
    if upstream_failures(&metrics) != 2.0 {
        problems.push("a too large head not counted as an upstream failure".to_string());
    }
    p.stop().await;
    assert!(problems.is_empty(), "{problems:?}");
}

/// RFC 9112 5.1: whitespace between a response field's name and its colon is taken out, not
/// answered 502 and counted against the upstream (a legacy upstream that writes `X-A : a`
/// would look like one failing every request). A request's is still refused (the table).
#[tokio::test]
async fn an_upstream_s_space_before_the_colon_is_taken_out() {
    let up = Recorder::start().await;
    let green = dead_addr().await;
    // The health checks (hyper's client, not the proxy's) read the same head.
    let health = "[services.health]\npath = \"/spacecolon\"\ninterval = \"100ms\"\n\
                  timeout = \"2s\"\nunhealthy_after = 1\nhealthy_after = 1\n";
    let p = TestProxy::start(&format!(
        "{PROXY}{}",
        service("api", &[up.addr], &[green], health)
    ))
    .await;
    let mut problems = Vec::new();
    let checked = eventually(10, || async { up.heads.lock().expect("lock").len() >= 3 }).await;
    assert!(checked, "the health checks never reached the upstream");
    if p.service_status("api").await["colors"]["blue"]["healthy"] != serde_json::Value::Bool(true) {
        problems.push("the health checks took the upstream out".to_string());
    }
    for path in ["/spacecolon", "/spacecolon-lf"] {
        let mut s = TcpStream::connect(p.proxy).await.expect("connect");
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let (head, _) = response(&mut s, Duration::from_millis(50)).await;
        let lines: Vec<String> = head.lines().map(|l| l.to_ascii_lowercase()).collect();
        for want in ["x-a: a", "x-empty:", "x-b:  b"] {
            if status_of(&head) != 200 || !lines.iter().any(|l| l == want) {
                problems.push(format!("{path}: no {want:?} line in {head:?}"));
            }
        }
    }
    // A trailer line: the client asked for trailers, and gets `x-t: t` after the last chunk.
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    s.write_all(b"GET /spacecolon-trailer HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !(got.windows(5).any(|w| w == b"\r\n0\r\n") && got.ends_with(b"\r\n\r\n")) {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    if !text.starts_with("http/1.1 200") || !text.ends_with("\r\n0\r\nx-t: t\r\n\r\n") {
        problems.push(format!("trailer: {text:?}"));
    }
    let metrics = get(p.admin, "/metrics").await.1;
    if upstream_failures(&metrics) != 0.0 {
        problems.push("an upstream failure was counted".to_string());
    }
    p.stop().await;
    assert!(problems.is_empty(), "{problems:?}");
}

#[tokio::test]
async fn a_101_must_switch_to_a_protocol_the_client_asked_for() {
    let up = Recorder::start().await;
    let green = dead_addr().await;
    let p = TestProxy::start(&format!(
        "{PROXY}{}",
        service("api", &[up.addr], &[green], "")
    ))
    .await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    s.write_all(b"GET /ws-h2c HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket, h2c\r\n\r\n")
        .await
        .expect("write");
    let (head, _) = response(&mut s, Duration::from_millis(1)).await;
    assert_eq!(status_of(&head), 502, "{head}");
    // The protocol asked for is tunnelled.
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .expect("write");
    let (head, _) = response(&mut s, Duration::from_millis(1)).await;
    assert_eq!(status_of(&head), 101, "{head}");
    s.write_all(b"ping").await.expect("write");
    let mut b = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&b, b"ping");
    p.stop().await;
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_at_the_tunnel_idle_timeout() {
    let up = Recorder::start().await;
    let green = dead_addr().await;
    let p = TestProxy::start(&format!(
        "{PROXY}tunnel_idle_timeout = \"300ms\"\n{}",
        service("api", &[up.addr], &[green], "")
    ))
    .await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .expect("write");
    let (head, _) = response(&mut s, Duration::from_millis(1)).await;
    assert_eq!(status_of(&head), 101, "{head}");
    let mut b = [0u8; 16];
    let end = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;
    assert!(
        matches!(end, Ok(Ok(0)) | Ok(Err(_))),
        "the idle tunnel stayed open: {end:?}"
    );
    p.stop().await;
}

// ---------------------------------------------------------------------------------------------
// HTTP/2, raw frames through the h2 crate
// ---------------------------------------------------------------------------------------------

async fn h2_client(addr: SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    client
}

/// A [`Recorder`] upstream (green: nothing listening) behind a proxy with `proxy_keys` (more
/// `[proxy]` lines), and an h2 connection to it; the heads recorded so far dropped.
async fn h2_rig(proxy_keys: &str) -> (Recorder, TestProxy, h2::client::SendRequest<bytes::Bytes>) {
    let up = Recorder::start().await;
    let green = dead_addr().await;
    let p = TestProxy::start(&format!(
        "{PROXY}{proxy_keys}{}",
        service("api", &[up.addr], &[green], "")
    ))
    .await;
    let c = h2_client(p.proxy).await;
    up.take();
    (up, p, c)
}

async fn h2_status(
    client: &mut h2::client::SendRequest<bytes::Bytes>,
    req: http::Request<()>,
    end: bool,
) -> u16 {
    let mut c = client.clone().ready().await.expect("ready");
    let (resp, _send) = c.send_request(req, end).expect("send");
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("in time")
        .expect("response");
    *client = c;
    resp.status().as_u16()
}

#[tokio::test]
async fn h2_host_must_agree_with_authority_and_cookies_are_joined() {
    let (up, p, mut c) = h2_rig("").await;
    // Each part is checked and reported on its own.
    let mut problems = Vec::new();
    let req = http::Request::get("http://a.example/x")
        .header("host", "b.example")
        .body(())
        .expect("req");
    let status = h2_status(&mut c, req, true).await;
    let reached = !up.take().is_empty();
    if status != 400 || reached {
        problems.push(format!(
            "host differing from :authority: {status}, reached the upstream"
        ));
    }
    let req = http::Request::get("http://a.example/x")
        .header("host", "A.example")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(())
        .expect("req");
    let status = h2_status(&mut c, req, true).await;
    let head = up.take_first_lower();
    let joined = head.lines().any(|l| l == "cookie: a=1; b=2");
    if status != 200 || !joined || head.matches("cookie:").count() != 1 {
        problems.push(format!("cookies not joined ({status}): {head:?}"));
    }
    let req = http::Request::post("http://a.example/x")
        .header("content-length", "9223372036854775808")
        .body(())
        .expect("req");
    // Not ended: h2 itself would refuse a stream that ends before its length.
    let status = h2_status(&mut c, req, false).await;
    if status != 400 {
        problems.push(format!("content-length 2^63 answered {status}"));
    }
    p.stop().await;
    assert!(problems.is_empty(), "{problems:?}");
}

/// An h2 request loses the underscore look-alikes of the forwarding fields as an HTTP/1.1 one
/// does (CGI-style applications read `_` as `-`); an application's own `_` field goes on.
#[tokio::test]
async fn h2_underscore_lookalikes_of_forwarding_fields_are_dropped() {
    let (up, p, mut c) = h2_rig("").await;
    let req = http::Request::get("http://a/x")
        .header("x_forwarded_for", "6.6.6.6")
        .header("x_forwarded_proto", "https")
        .header("content_length", "50")
        .header("x_api_key", "k")
        .body(())
        .expect("req");
    let status = h2_status(&mut c, req, true).await;
    let head = up.take_first_lower();
    p.stop().await;
    assert_eq!(status, 200, "{head:?}");
    assert!(head.lines().any(|l| l == "x_api_key: k"), "{head:?}");
    assert!(
        head.lines().any(|l| l == "x-forwarded-for: 127.0.0.1"),
        "{head:?}"
    );
    assert!(
        head.lines().any(|l| l == "x-forwarded-proto: http"),
        "{head:?}"
    );
    for gone in ["6.6.6.6", "https", "content_length"] {
        assert!(!head.contains(gone), "{gone}: {head:?}");
    }
}

/// `:authority` and `Host` that differ only by the scheme's default port (or the case of the
/// name) are the same origin (RFC 9113 8.3.1, RFC 9110 4.2.3): served, with `:authority` as the
/// upstream's Host (an intermediary that generates a Host MUST use it, 8.3.1). Another port, or
/// the other scheme's default, is still 400.
#[tokio::test]
async fn h2_host_and_authority_agree_up_to_the_default_port() {
    let (up, p, mut c) = h2_rig("").await;
    let mut problems = Vec::new();
    for (target, host, want) in [
        ("http://a.example:80/x", "a.example", 200),
        ("http://a.example/x", "A.EXAMPLE:80", 200),
        ("https://a.example:443/x", "a.example", 200),
        ("http://a.example:443/x", "a.example", 400),
        ("https://a.example/x", "a.example:80", 400),
        ("http://a.example:8080/x", "a.example:80", 400),
    ] {
        let req = http::Request::get(target)
            .header("host", host)
            .body(())
            .expect("req");
        let authority = req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let status = h2_status(&mut c, req, true).await;
        let heads = up.take();
        let sent_host = heads.first().is_some_and(|h| {
            h.lines()
                .filter(|l| l.to_ascii_lowercase().starts_with("host:"))
                .eq([format!("host: {authority}")].iter().map(String::as_str))
        });
        if status != want || (want == 200) != sent_host {
            problems.push(format!(
                "{target} with host {host}: {status} (want {want}), upstream got {heads:?}"
            ));
        }
    }
    p.stop().await;
    assert!(problems.is_empty(), "{problems:?}");
}

/// What an HTTP/1 head is refused for as it is read, an h2 request is refused for too, before
/// anything reaches the upstream: more fields than `max_headers` (431), a value that begins or
/// ends with whitespace (RFC 9113 8.2.1: malformed), a scheme other than http(s) (400, as in an
/// absolute-form target), a `:path` that is neither origin form nor `*` (400), a `:path` with a
/// byte an HTTP/1 target may not hold (400). (No `:authority` and no Host, which the
/// h2 client cannot send: `validate::tests`.)
#[tokio::test]
async fn h2_fields_are_held_to_what_an_http1_head_is() {
    let (up, p, mut c) = h2_rig("max_headers = 10\n").await;
    let mut problems = Vec::new();
    let mut many = http::Request::get("http://a.example/many");
    for i in 0..11 {
        many = many.header(format!("x-h{i}"), "1");
    }
    // The client's own X-Request-Id is one of its fields, as in an HTTP/1 head (only one the
    // proxy adds is not).
    let mut with_id = http::Request::get("http://a.example/many-id").header("x-request-id", "c-1");
    for i in 0..10 {
        with_id = with_id.header(format!("x-h{i}"), "1");
    }
    let cases = [
        (
            "11 fields over max_headers = 10",
            many.body(()).expect("req"),
            431,
        ),
        (
            "10 fields and the client's X-Request-Id over max_headers = 10",
            with_id.body(()).expect("req"),
            431,
        ),
        (
            "a value with a leading space",
            http::Request::get("http://a.example/lead")
                .header("x-lead", " a")
                .body(())
                .expect("req"),
            400,
        ),
        (
            "a scheme other than http or https",
            http::Request::get("ftp://a.example/scheme")
                .body(())
                .expect("req"),
            400,
        ),
        (
            // `:path` is `?x=1`: neither origin form nor `*` (RFC 9113 8.3.1), as the HTTP/1
            // `GET ?x=1`.
            "a :path without a leading slash",
            http::Request::get("http://a.example?x=1")
                .body(())
                .expect("req"),
            400,
        ),
        (
            // The bytes an HTTP/1 target is refused for (commit b7175d7: an upstream that
            // turns `\` into `/` would see another path than the one routed).
            "a :path with a backslash",
            http::Request::get("http://a.example/echo/a\\..\\b")
                .body(())
                .expect("req"),
            400,
        ),
        (
            "a :path with double quotes",
            http::Request::get("http://a.example/echo/\"x\"")
                .body(())
                .expect("req"),
            400,
        ),
        (
            "a :path with raw UTF-8",
            http::Request::get("http://a.example/echo/caf\u{e9}")
                .body(())
                .expect("req"),
            400,
        ),
        (
            "a value with a trailing tab",
            http::Request::get("http://a.example/trail")
                .header("x-trail", "b\t")
                .body(())
                .expect("req"),
            400,
        ),
    ];
    for (what, req, want) in cases {
        let status = h2_status(&mut c, req, true).await;
        let reached = !up.take().is_empty();
        if status != want || reached {
            problems.push(format!(
                "{what}: {status} (want {want}), reached the upstream: {reached}"
            ));
        }
    }
    // Within the limit and clean: served. Ten as an HTTP/1.1 head has them: nine and
    // `:authority`, the `Host` line (the proxy's own `X-Request-Id` is not one of them).
    let mut ten = http::Request::get("http://a.example/ten");
    for i in 0..9 {
        ten = ten.header(format!("x-h{i}"), "a b");
    }
    let status = h2_status(&mut c, ten.body(()).expect("req"), true).await;
    if status != 200 || up.take().is_empty() {
        problems.push(format!("ten clean fields: {status}"));
    }
    // Ten and `:authority`: eleven, as the HTTP/1.1 head with its Host line (431 there too).
    let mut eleven = http::Request::get("http://a.example/eleven");
    for i in 0..10 {
        eleven = eleven.header(format!("x-h{i}"), "a b");
    }
    let status = h2_status(&mut c, eleven.body(()).expect("req"), true).await;
    if status != 431 || !up.take().is_empty() {
        problems.push(format!("ten fields and :authority: {status}"));
    }
    // A `\` in the query passes, as over HTTP/1.
    let req = http::Request::get("http://a.example/q?x=a\\b")
        .body(())
        .expect("req");
    let status = h2_status(&mut c, req, true).await;
    if status != 200 || up.take().is_empty() {
        problems.push(format!("a backslash in the query: {status}"));
    }

    p.stop().await;
    assert!(problems.is_empty(), "{problems:?}");
}

/// An h2 client splits its cookies into a field each (RFC 9113 8.2.3; browsers do): they count
/// against `max_headers` as the one HTTP/1.1 `Cookie` line they stand for, and reach an HTTP/1.1
/// upstream joined in that one line. Other fields still count one each.
#[tokio::test]
async fn h2_cookie_crumbs_count_as_one_field() {
    let (up, p, mut c) = h2_rig("max_headers = 10\n").await;
    let mut problems = Vec::new();
    // 40 crumbs, `:authority` and 8 other fields: 10 fields as HTTP/1.1 would have them (the
    // proxy's own `X-Request-Id` is not one of the client's).
    let mut crumbs = http::Request::get("http://a.example/crumbs");
    for i in 0..8 {
        crumbs = crumbs.header(format!("x-h{i}"), "1");
    }
    for i in 0..40 {
        crumbs = crumbs.header("cookie", format!("c{i}=v"));
    }
    let status = h2_status(&mut c, crumbs.body(()).expect("req"), true).await;
    let head = up.take_first_lower();
    let joined: Vec<String> = (0..40).map(|i| format!("c{i}=v")).collect();
    let line = format!("cookie: {}", joined.join("; "));
    if status != 200 || head.matches("cookie:").count() != 1 || !head.lines().any(|l| l == line) {
        problems.push(format!("40 crumbs and 8 fields: {status}, {head:?}"));
    }
    // 10 other fields, a cookie and `:authority`: 12, over the limit.
    let mut many = http::Request::get("http://a.example/many").header("cookie", "a=1");
    for i in 0..10 {
        many = many.header(format!("x-h{i}"), "1");
    }
    let status = h2_status(&mut c, many.body(()).expect("req"), true).await;
    if status != 431 || !up.take().is_empty() {
        problems.push(format!("10 fields and a cookie: {status}"));
    }
    p.stop().await;
    assert!(problems.is_empty(), "{problems:?}");
}

/// A normal GET on a fresh connection is answered while the attack goes on. Issue 14 asks for
/// a second; the bound here is 5 s, because a loaded machine can take a second to serve even
/// the defended case (where the attackers are closed at the 300 ms limits, some in two
/// rounds), while every attack in this file would hold the client out for 10 s or more
/// undefended (the attackers' own 10 s, or never).
async fn served(addr: SocketAddr) -> bool {
    let start = tokio::time::Instant::now();
    let ok = matches!(
        tokio::time::timeout(Duration::from_secs(5), try_get(addr, "/")).await,
        Ok(Some((200, _)))
    );
    // For the record (`--nocapture`): the time the defended case takes here.
    eprintln!(
        "normal GET during the attack: {ok} after {:?}",
        start.elapsed()
    );
    ok
}

const SMALL: &str = "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\nmax_connections = 4\nheader_read_timeout = \"300ms\"\nclient_send_timeout = \"300ms\"\nh2_idle_timeout = \"300ms\"\n";

async fn small_proxy(up: &Recorder, extra: &str) -> TestProxy {
    let green = dead_addr().await;
    TestProxy::start(&format!(
        "{SMALL}{extra}{}",
        service("api", &[up.addr], &[green], "")
    ))
    .await
}

#[tokio::test]
async fn slowloris_leaves_normal_clients_served() {
    let up = Recorder::start().await;
    let p = small_proxy(&up, "").await;
    let mut attackers = Vec::new();
    for _ in 0..8 {
        let addr = p.proxy;
        attackers.push(tokio::spawn(async move {
            let Ok(mut s) = TcpStream::connect(addr).await else {
                return;
            };
            for b in b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: "
                .iter()
                .cycle()
                .take(200)
            {
                if s.write_all(&[*b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        served(p.proxy).await,
        "slowloris locked a normal client out"
    );
    for a in attackers {
        a.abort();
    }
    p.stop().await;
}

/// A socket with a small receive buffer that never reads.
async fn non_reader(addr: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("rcvbuf");
    sock.connect(addr).await.expect("connect")
}

#[tokio::test]
async fn an_http1_slow_reader_is_closed_and_its_upstream_released() {
    let up = Recorder::start().await;
    let p = small_proxy(&up, "").await;
    let mut readers = Vec::new();
    for _ in 0..4 {
        let mut s = non_reader(p.proxy).await;
        s.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("write");
        readers.push(s);
    }
    assert!(
        served(p.proxy).await,
        "slow readers locked a normal client out"
    );
    released_and_not_blamed(&up, &p, 4).await;
    drop(readers);
    p.stop().await;
}

/// Every endless body the stalled readers held was let go of (`n` upstream connections
/// released), and nothing is held against the upstream: the client's fault.
async fn released_and_not_blamed(up: &Recorder, p: &TestProxy, n: usize) {
    let released = up.released.clone();
    assert!(
        eventually(10, || {
            let r = released.clone();
            async move { r.load(Ordering::SeqCst) == n }
        })
        .await,
        "released {}",
        up.released.load(Ordering::SeqCst)
    );
    let metrics = get(p.admin, "/metrics").await.1;
    assert_eq!(upstream_failures(&metrics), 0.0, "{metrics}");
}

#[tokio::test]
async fn an_h2_zero_window_reader_is_closed_and_its_upstream_released() {
    let up = Recorder::start().await;
    let p = small_proxy(&up, "").await;
    let mut conns = Vec::new();
    for _ in 0..4 {
        let tcp = TcpStream::connect(p.proxy).await.expect("connect");
        // A stream window of zero: the proxy may send headers, never a byte of body.
        let (client, conn) = h2::client::Builder::new()
            .initial_window_size(0)
            .handshake::<_, bytes::Bytes>(tcp)
            .await
            .expect("handshake");
        let done = tokio::spawn(conn);
        let mut c = client.ready().await.expect("ready");
        let req = http::Request::get("http://a/big").body(()).expect("req");
        let (resp, _) = c.send_request(req, true).expect("send");
        conns.push((c, resp, done));
    }
    assert!(
        served(p.proxy).await,
        "zero-window readers locked a normal client out"
    );
    for (_, _, done) in conns.iter_mut() {
        let end = tokio::time::timeout(Duration::from_secs(5), done).await;
        assert!(end.is_ok(), "a stalled h2 connection stayed open");
    }
    released_and_not_blamed(&up, &p, 4).await;

    // A client that reads frames but opens no window is told why it is closed: a GOAWAY
    // (RFC 9113 6.8), then the end of the connection, not a bare FIN.
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS: INITIAL_WINDOW_SIZE (4) = 0.
    out.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 0]);
    // HEADERS on stream 1, END_STREAM | END_HEADERS: GET http://a/big (HPACK: indexed
    // :method GET and :scheme http, :path and :authority literal with an indexed name).
    let block = b"\x82\x86\x04\x04/big\x01\x01a";
    out.extend_from_slice(&[0, 0, block.len() as u8, 1, 5, 0, 0, 0, 1]);
    out.extend_from_slice(block);
    s.write_all(&out).await.expect("write");
    let mut got = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("the stalled connection stayed open"),
        }
    }
    let mut types = Vec::new();
    let mut at = 0;
    while at + 9 <= got.len() {
        let len =
            usize::from(got[at]) << 16 | usize::from(got[at + 1]) << 8 | usize::from(got[at + 2]);
        types.push(got[at + 3]);
        at += 9 + len;
    }
    // HEADERS (1) of the response went out; a GOAWAY (7) after it.
    let headers = types.iter().position(|t| *t == 1);
    let goaway = types.iter().rposition(|t| *t == 7);
    assert!(
        headers.is_some() && goaway > headers,
        "frame types {types:?}"
    );
    p.stop().await;
}

/// Reads an h2 response body, giving back flow-control capacity when `release`, until it ends
/// or `until` bytes came; returns the bytes read and the error that ended it, if any.
async fn h2_read(
    body: &mut h2::RecvStream,
    release: bool,
    until: usize,
) -> (usize, Option<h2::Error>) {
    let mut n = 0;
    while n < until {
        match body.data().await {
            Some(Ok(d)) => {
                n += d.len();
                if release {
                    let _ = body.flow_control().release_capacity(d.len());
                }
            }
            Some(Err(e)) => return (n, Some(e)),
            None => break,
        }
    }
    (n, None)
}

#[tokio::test]
async fn one_stalled_h2_stream_is_reset_and_the_others_are_served() {
    stalled_stream_among_others(false).await;
}

#[tokio::test]
async fn a_stream_stalled_after_the_others_ended_is_reset_alone() {
    stalled_stream_among_others(true).await;
}

/// The same on a multi-thread runtime (the tests above run on a current-thread one), where a
/// stream's task may run on another thread than its connection's: the stalled one is reset
/// alone there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stalled_h2_stream_is_reset_alone_on_a_multi_thread_runtime() {
    stalled_stream_among_others(false).await;
    stalled_stream_among_others(true).await;
}

/// GET of `path` on `c`; returns the response body once the head is in.
async fn h2_open(c: &mut h2::client::SendRequest<bytes::Bytes>, path: &str) -> h2::RecvStream {
    let mut ready = c
        .clone()
        .ready()
        .await
        .expect("the connection takes streams");
    let req = http::Request::get(format!("http://a{path}"))
        .body(())
        .expect("req");
    let (resp, _) = ready.send_request(req, true).expect("send");
    *c = ready;
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("head in time")
        .expect("head");
    assert_eq!(resp.status(), 200);
    resp.into_body()
}

/// One stream takes 64 KiB of an endless body and never opens its window again; another on
/// the same connection is read fully (`others_first`: before the stalled one starts, else
/// while it stalls). The stalled stream alone is reset, its upstream let go of, and the
/// connection goes on serving.
async fn stalled_stream_among_others(others_first: bool) {
    let up = Recorder::start().await;
    let green = dead_addr().await;
    let p = TestProxy::start(&format!(
        "{PROXY}client_send_timeout = \"1s\"\n{}",
        service("api", &[up.addr], &[green], "")
    ))
    .await;
    let tcp = TcpStream::connect(p.proxy).await.expect("connect");
    // Stream windows of 64 KiB, and a connection window that one stalled stream cannot shut.
    let (mut c, conn) = h2::client::Builder::new()
        .initial_window_size(64 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .expect("handshake");
    let done = tokio::spawn(conn);
    let in_time = Duration::from_secs(5);
    let read_large = |mut body: h2::RecvStream| async move {
        let (n, e) = tokio::time::timeout(in_time, h2_read(&mut body, true, usize::MAX))
            .await
            .expect("the large body in time");
        assert_eq!((n, e.is_none()), (LARGE, true), "{e:?}");
    };
    if others_first {
        read_large(h2_open(&mut c, "/large").await).await;
    }
    let mut stalled = h2_open(&mut c, "/big").await;
    let (n, e) = tokio::time::timeout(in_time, h2_read(&mut stalled, false, 64 * 1024))
        .await
        .expect("the first window in time");
    assert_eq!((n, e.is_none()), (64 * 1024, true), "{e:?}");
    if !others_first {
        read_large(h2_open(&mut c, "/large").await).await;
    }
    // The stalled stream alone is reset at the client_send_timeout...
    let (_, e) = tokio::time::timeout(in_time, h2_read(&mut stalled, false, usize::MAX))
        .await
        .expect("the stalled stream ended in time");
    let reason = e.as_ref().and_then(h2::Error::reason);
    assert_eq!(reason, Some(h2::Reason::CANCEL), "{e:?}");
    // ...its upstream connection is let go of, not blamed on the upstream...
    released_and_not_blamed(&up, &p, 1).await;
    // ...and the connection goes on serving.
    let mut body = h2_open(&mut c, "/").await;
    let (n, e) = h2_read(&mut body, true, usize::MAX).await;
    assert_eq!((n, e.is_none()), (2, true), "{e:?}");
    assert!(!done.is_finished(), "the connection was closed");
    p.stop().await;
}

/// A small response (10 kB) whose stream window the client opens to 1,000 bytes and never
/// again is reset at `client_send_timeout` like a large one, while the connection goes on
/// serving: the small-body path is taken only when the window has room for the whole body.
#[tokio::test]
async fn a_small_response_the_client_never_opens_a_window_for_is_reset() {
    let up = Recorder::start().await;
    let green = dead_addr().await;
    let p = TestProxy::start(&format!(
        "{PROXY}client_send_timeout = \"1s\"\n{}",
        service("api", &[up.addr], &[green], "")
    ))
    .await;
    let tcp = TcpStream::connect(p.proxy).await.expect("connect");
    let (mut c, conn) = h2::client::Builder::new()
        .initial_window_size(1000)
        .initial_connection_window_size(16 * 1024 * 1024)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .expect("handshake");
    let done = tokio::spawn(conn);
    let in_time = Duration::from_secs(5);
    let mut stalled = h2_open(&mut c, "/small").await;
    let (n, e) = tokio::time::timeout(in_time, h2_read(&mut stalled, false, 1000))
        .await
        .expect("the first window in time");
    assert_eq!((n, e.is_none()), (1000, true), "{e:?}");
    let (_, e) = tokio::time::timeout(in_time, h2_read(&mut stalled, false, usize::MAX))
        .await
        .expect("the stalled stream ended in time");
    let reason = e.as_ref().and_then(h2::Error::reason);
    assert_eq!(reason, Some(h2::Reason::CANCEL), "{e:?}");
    let mut body = h2_open(&mut c, "/").await;
    let (n, e) = h2_read(&mut body, true, usize::MAX).await;
    assert_eq!((n, e.is_none()), (2, true), "{e:?}");
    assert!(!done.is_finished(), "the connection was closed");
    p.stop().await;
}

#[tokio::test]
async fn an_h2_connection_whose_window_is_shut_is_closed() {
    let up = Recorder::start().await;
    let green = dead_addr().await;
    let p = TestProxy::start(&format!(
        "{PROXY}client_send_timeout = \"300ms\"\n{}",
        service("api", &[up.addr], &[green], "")
    ))
    .await;
    let tcp = TcpStream::connect(p.proxy).await.expect("connect");
    // Stream windows larger than the connection's 64 KiB: the connection window shuts first.
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(1024 * 1024)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .expect("handshake");
    let done = tokio::spawn(conn);
    let mut bodies = Vec::new();
    let mut c = client.ready().await.expect("ready");
    for _ in 0..2 {
        let req = http::Request::get("http://a/big").body(()).expect("req");
        let (resp, _) = c.send_request(req, true).expect("send");
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("head in time")
            .expect("head");
        bodies.push(resp.into_body());
        c = c.ready().await.expect("ready");
    }
    // Read what arrives, never giving capacity back: the whole connection closes.
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        for b in bodies.iter_mut() {
            h2_read(b, false, usize::MAX).await;
        }
        done.await
    })
    .await;
    assert!(end.is_ok(), "a connection with a shut window stayed open");
    released_and_not_blamed(&up, &p, 2).await;
    p.stop().await;
}

/// The h2 preface and an empty SETTINGS frame, then silence (PINGs would be answered by a
/// real attacker; the proxy must not wait for them).
const PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[tokio::test]
async fn an_idle_preface_flood_leaves_normal_clients_served() {
    let up = Recorder::start().await;
    let p = small_proxy(&up, "").await;
    let mut flood = Vec::new();
    for _ in 0..8 {
        let addr = p.proxy;
        flood.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.ok()?;
            s.write_all(PREFACE_AND_SETTINGS).await.ok()?;
            // Read until the proxy closes: a GOAWAY (frame type 7) comes first.
            let mut got = Vec::new();
            let mut b = [0u8; 4096];
            loop {
                match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
                    Ok(Ok(n)) if n > 0 => got.extend_from_slice(&b[..n]),
                    Ok(_) => return Some(got),
                    Err(_) => return None,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        served(p.proxy).await,
        "idle h2 connections locked a normal client out"
    );
    for f in flood {
        let got = f.await.expect("task");
        let got = got.expect("an idle h2 connection was never closed");
        // Frames after the server's preface: find a GOAWAY among them.
        let mut at = 0;
        let mut goaway = false;
        while at + 9 <= got.len() {
            let len = (usize::from(got[at]) << 16)
                | (usize::from(got[at + 1]) << 8)
                | usize::from(got[at + 2]);
            goaway |= got[at + 3] == 7;
            at += 9 + len;
        }
        assert!(goaway, "closed without a GOAWAY");
    }
    p.stop().await;
}

#[tokio::test]
async fn an_admin_connection_flood_stays_off_the_data_plane() {
    let up = Recorder::start().await;
    let green = dead_addr().await;
    let p = TestProxy::start(&format!(
        "{SMALL}[admin]\nlisten = \"127.0.0.1:0\"\nmax_connections = 4\nheader_read_timeout = \"300ms\"\nidle_timeout = \"300ms\"\n{}",
        service("api", &[up.addr], &[green], "")
    ))
    .await;
    let mut flood = Vec::new();
    for i in 0..40 {
        let addr = p.admin;
        flood.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.ok()?;
            // Half send nothing, half open h2c and idle.
            if i % 2 == 0 {
                s.write_all(PREFACE_AND_SETTINGS).await.ok()?;
            }
            let mut b = [0u8; 1024];
            loop {
                match tokio::time::timeout(Duration::from_secs(20), s.read(&mut b)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    Ok(_) => return Some(()),
                    Err(_) => return None,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The proxy's slots are its own.
    assert!(
        served(p.proxy).await,
        "an admin flood took the data plane down"
    );
    // And the admin listener comes back as the idle ones are closed.
    let healthy = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some((200, _)) = try_get(p.admin, "/healthz").await {
                return;
            }
        }
    })
    .await;
    assert!(healthy.is_ok(), "the admin listener stayed full");
    for f in flood {
        assert!(
            f.await.expect("task").is_some(),
            "an idle admin connection was never closed"
        );
    }
    p.stop().await;
}

/// Connections that connect and send nothing (or part of the h2 preface) fill `[admin]
/// max_connections`; each is closed at the admin `header_read_timeout` (not the far-off
/// `idle_timeout`) and `/healthz` answers again.
#[tokio::test]
async fn silent_admin_connections_are_closed_at_the_admin_header_read_timeout() {
    let up = Recorder::start().await;
    let green = dead_addr().await;
    let p = TestProxy::start(&format!(
        "{PROXY}[admin]\nlisten = \"127.0.0.1:0\"\nmax_connections = 2\nheader_read_timeout = \"300ms\"\nidle_timeout = \"60s\"\n{}",
        service("api", &[up.addr], &[green], "")
    ))
    .await;
    let mut silent = Vec::new();
    // One sends nothing, one a piece of the h2 preface (hyper cannot tell h1 from h2 yet).
    for first in [&b""[..], b"PRI * HTTP/2"] {
        let mut s = TcpStream::connect(p.admin).await.expect("connect");
        s.write_all(first).await.expect("write");
        silent.push(s);
    }
    for mut s in silent {
        let mut b = [0u8; 64];
        // Only the header timeout can end it within 20 s (the idle timeout is 60 s).
        let closed = tokio::time::timeout(Duration::from_secs(20), s.read(&mut b)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "a silent admin connection was held: {closed:?}"
        );
    }
    assert_eq!(
        try_get(p.admin, "/healthz").await.map(|r| r.0),
        Some(200),
        "/healthz after the silent connections closed"
    );
    p.stop().await;
}

#[tokio::test]
async fn an_admin_slowloris_is_closed_at_the_admin_header_read_timeout() {
    let up = Recorder::start().await;
    let green = dead_addr().await;
    // The idle timeout is far off: only the header timeout can close the trickling client.
    let p = TestProxy::start(&format!(
        "{PROXY}[admin]\nlisten = \"127.0.0.1:0\"\nheader_read_timeout = \"300ms\"\nidle_timeout = \"30s\"\n{}",
        service("api", &[up.addr], &[green], "")
    ))
    .await;
    let mut s = TcpStream::connect(p.admin).await.expect("connect");
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        for b in b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Slow: "
            .iter()
            .cycle()
        {
            if s.write_all(&[*b]).await.is_err() {
                return;
            }
            let mut buf = [0u8; 256];
            // A read that returns (EOF, a reset or a 408) means the listener gave up.
            if tokio::time::timeout(Duration::from_millis(50), s.read(&mut buf))
                .await
                .is_ok()
            {
                return;
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the admin listener waited for the trickled head"
    );
    p.stop().await;
}

#[tokio::test]
async fn an_upstream_that_stops_reading_the_request_fails_at_the_upstream_send_timeout() {
    let up = Recorder::start().await;
    let green = dead_addr().await;
    let p = TestProxy::start(&format!(
        "{PROXY}request_timeout = \"20s\"\nupstream_send_timeout = \"300ms\"\n{}",
        service("api", &[up.addr], &[green], "")
    ))
    .await;
    let s = TcpStream::connect(p.proxy).await.expect("connect");
    let (mut r, mut w) = s.into_split();
    let len = 64 * 1024 * 1024;
    let writer = tokio::spawn(async move {
        let head = format!("POST /noread HTTP/1.1\r\nHost: a\r\nContent-Length: {len}\r\n\r\n");
        w.write_all(head.as_bytes()).await.ok()?;
        let piece = vec![b'x'; 64 * 1024];
        for _ in 0..len / piece.len() {
            w.write_all(&piece).await.ok()?;
        }
        Some(w)
    });
    let mut got = Vec::new();
    let mut b = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match r.read(&mut b).await {
                Ok(n) if n > 0 => got.extend_from_slice(&b[..n]),
                _ => break,
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer before the request_timeout");
    let head = String::from_utf8_lossy(&got).into_owned();
    assert_eq!(status_of(&head), 502, "{head}");
    writer.abort();
    let metrics = get(p.admin, "/metrics").await.1;
    assert_eq!(upstream_failures(&metrics), 1.0, "{metrics}");
    p.stop().await;
}

/// An h2 upstream that opens 64 MiB windows, takes the first request's head, and then never
/// reads its connection again.
async fn h2_non_reader() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::Builder::new()
                    .initial_window_size(64 << 20)
                    .initial_connection_window_size(64 << 20)
                    .handshake::<_, bytes::Bytes>(s)
                    .await
                else {
                    return;
                };
                let Some(Ok(req)) = conn.accept().await else {
                    return;
                };
                // Held, never polled again: the socket's buffers fill and stay full.
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop((req, conn));
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_h2_upstream_that_stops_reading_fails_at_the_upstream_send_timeout() {
    let up = h2_non_reader().await;
    let green = dead_addr().await;
    let p = TestProxy::start(&format!(
        "{PROXY}request_timeout = \"20s\"\nupstream_send_timeout = \"300ms\"\n\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{up}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{green}\"], protocol = \"h2\" }}\n"
    ))
    .await;
    let s = TcpStream::connect(p.proxy).await.expect("connect");
    let (mut r, mut w) = s.into_split();
    let len = 48 * 1024 * 1024;
    let writer = tokio::spawn(async move {
        let head = format!("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {len}\r\n\r\n");
        w.write_all(head.as_bytes()).await.ok()?;
        let piece = vec![b'x'; 64 * 1024];
        for _ in 0..len / piece.len() {
            w.write_all(&piece).await.ok()?;
        }
        Some(w)
    });
    let mut got = Vec::new();
    let mut b = [0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match r.read(&mut b).await {
                Ok(n) if n > 0 => got.extend_from_slice(&b[..n]),
                _ => break,
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer before the request_timeout");
    let head = String::from_utf8_lossy(&got).into_owned();
    assert_eq!(status_of(&head), 502, "{head}");
    writer.abort();
    let metrics = get(p.admin, "/metrics").await.1;
    assert_eq!(upstream_failures(&metrics), 1.0, "{metrics}");
    p.stop().await;
}

/// Starts the binary under `ulimit -n 256` and returns its log lines up to "switchyard is
/// serving".
async fn startup_log(limits: &str) -> String {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let up = dead_addr().await;
    let text = full_config(
        &format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\n{limits}\n{}",
            service("api", &[up], &[up], "")
        ),
        dir.path(),
    );
    let path = dir.path().join("switchyard.toml");
    std::fs::write(&path, text).expect("write config");
    let script = format!(
        "ulimit -n 256 && exec \"{}\" serve --config \"{}\"",
        env!("CARGO_BIN_EXE_switchyard"),
        path.display()
    );
    let mut child = tokio::process::Command::new("sh")
        .args(["-c", &script])
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let mut log = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            log.push_str(&line);
            log.push('\n');
            if line.contains("switchyard is serving") {
                break;
            }
        }
    })
    .await;
    let _ = child.kill().await;
    log
}

#[tokio::test]
async fn a_file_descriptor_limit_too_low_for_max_connections_is_a_startup_warning() {
    // 2 x 1000 + 256 idle x 2 upstreams + 128 admin + 64 > 256.
    let log = startup_log("max_connections = 1000").await;
    assert!(log.contains("switchyard is serving"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("RLIMIT_NOFILE")),
        "{log}"
    );
    // 2 x 50 + 4 x 2 + 64 + 8 admin < 256.
    let log = startup_log(
        "max_connections = 50\nupstream_max_idle = 4\n[admin]\nlisten = \"127.0.0.1:0\"\nmax_connections = 8",
    )
    .await;
    assert!(log.contains("switchyard is serving"), "{log}");
    assert!(!log.contains("RLIMIT_NOFILE"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// Request trailers
// ---------------------------------------------------------------------------------------------

/// The fields a client puts in its request's trailer section to stand beside the ones the
/// proxy writes (RFC 9110 6.5.1: not for a trailer; some upstreams merge trailers into the
/// header section), and one an application may send there.
const SPOOFED_TRAILERS: &[(&str, &str)] = &[
    ("forwarded", "for=6.6.6.6;proto=https"),
    ("x-request-id", "spoofed-id"),
    ("via", "1.1 trusted-edge"),
    ("x-forwarded-for", "6.6.6.6"),
    ("x-real-ip", "6.6.6.6"),
    ("x-forwarded-host", "evil"),
    ("max-forwards", "9"),
    // CGI-style applications read `_` as `-`.
    ("x_forwarded_for", "6.6.6.6"),
    ("x_request_id", "spoofed-id"),
    ("authorization", "Bearer spoofed"),
    ("x-kept", "1"),
];

/// An HTTP/1.1 upstream that records each chunked request's trailer section (lowercased, one
/// string per request) and answers 200, closing.
async fn trailer_recorder() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let rec = rec.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                let section = loop {
                    let found = buf.windows(4).position(|w| w == b"\r\n\r\n").and_then(|h| {
                        let body = &buf[h + 4..];
                        let last = body.windows(5).position(|w| w == b"\r\n0\r\n")? + 2;
                        let end = body[last..].windows(4).position(|w| w == b"\r\n\r\n")?;
                        Some(String::from_utf8_lossy(&body[last + 3..last + end + 2]).into_owned())
                    });
                    if let Some(section) = found {
                        break section;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                rec.lock().expect("lock").push(section.to_ascii_lowercase());
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    (addr, seen)
}

/// An h2 upstream that records each request's trailer fields (`name: value` lines) and
/// answers 200.
async fn h2_trailer_recorder() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let rec = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let rec = rec.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let rec = rec.clone();
                    tokio::spawn(async move {
                        let mut body = req.into_body();
                        while let Some(Ok(d)) = body.data().await {
                            let _ = body.flow_control().release_capacity(d.len());
                        }
                        let mut lines = String::new();
                        if let Ok(Some(t)) = body.trailers().await {
                            for (n, v) in &t {
                                let v = String::from_utf8_lossy(v.as_bytes());
                                lines.push_str(&format!("{n}: {v}\r\n"));
                            }
                        }
                        rec.lock().expect("lock").push(lines);
                        let _ = respond.send_response(http::Response::new(()), true);
                    });
                }
            });
        }
    });
    (addr, seen)
}

/// RFC 9110 6.5.1: a request's trailer section loses the forwarding, routing and
/// authentication fields (`Forwarded`, `Via`, `X-Request-Id`, `X-Real-IP`, `X-Forwarded-*`,
/// `Max-Forwards`, `Authorization`), from HTTP/1.1 and h2 clients, toward HTTP/1.1 and h2
/// upstreams; an application's own trailer goes on.
#[tokio::test]
async fn request_trailers_lose_the_fields_the_proxy_writes() {
    let (h1_up, h1_seen) = trailer_recorder().await;
    let (h2_up, h2_seen) = h2_trailer_recorder().await;
    let (d1, d2) = (dead_addr().await, dead_addr().await);
    let p = TestProxy::start(&format!(
        "{PROXY}\n[[services]]\nname = \"one\"\npath_prefix = \"/h1/\"\nblue = {{ upstreams = [\"{h1_up}\"] }}\ngreen = {{ upstreams = [\"{d1}\"] }}\n\n[[services]]\nname = \"two\"\npath_prefix = \"/h2/\"\nblue = {{ upstreams = [\"{h2_up}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{d2}\"], protocol = \"h2\" }}\n"
    ))
    .await;
    let mut problems = Vec::new();
    for prefix in ["/h1/", "/h2/"] {
        // An HTTP/1.1 client's chunked body.
        let mut s = TcpStream::connect(p.proxy).await.expect("connect");
        let mut req = format!(
            "POST {prefix}t HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
        );
        for (n, v) in SPOOFED_TRAILERS {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let (head, _) = response(&mut s, Duration::from_millis(50)).await;
        if status_of(&head) != 200 {
            problems.push(format!("HTTP/1.1 client to {prefix}: {head}"));
        }
        // An h2 client's trailers.
        let mut c = h2_client(p.proxy).await.ready().await.expect("ready");
        let req = http::Request::post(format!("http://a{prefix}t"))
            .body(())
            .expect("req");
        let (resp, mut send) = c.send_request(req, false).expect("send");
        send.send_data(bytes::Bytes::from_static(b"abc"), false)
            .expect("data");
        let mut t = http::HeaderMap::new();
        for (n, v) in SPOOFED_TRAILERS {
            t.insert(*n, http::HeaderValue::from_static(v));
        }
        send.send_trailers(t).expect("trailers");
        let status = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("in time")
            .expect("response")
            .status();
        if status != 200 {
            problems.push(format!("h2 client to {prefix}: {status}"));
        }
    }
    let seen: Vec<(&str, String)> = [("HTTP/1.1 upstream", &h1_seen), ("h2 upstream", &h2_seen)]
        .into_iter()
        .flat_map(|(up, seen)| {
            std::mem::take(&mut *seen.lock().expect("lock"))
                .into_iter()
                .map(move |s| (up, s))
        })
        .collect();
    if seen.len() != 4 {
        problems.push(format!("4 trailer sections expected: {seen:?}"));
    }
    for (up, section) in &seen {
        if !section.contains("x-kept: 1\r\n") {
            problems.push(format!(
                "{up}: the application's trailer was lost: {section:?}"
            ));
        }
        for (n, _) in SPOOFED_TRAILERS.iter().filter(|(n, _)| *n != "x-kept") {
            if section.contains(&format!("{n}:")) {
                problems.push(format!("{up}: trailer {n} went on: {section:?}"));
            }
        }
    }
    p.stop().await;
    assert!(problems.is_empty(), "{problems:#?}");
}

// ---------------------------------------------------------------------------------------------
// A trickled h2 request head
// ---------------------------------------------------------------------------------------------

/// A raw h2 frame header: length, type, flags, stream.
fn frame_header(len: usize, kind: u8, flags: u8, stream: u32) -> Vec<u8> {
    let mut h = (len as u32).to_be_bytes()[1..].to_vec();
    h.extend_from_slice(&[kind, flags]);
    h.extend_from_slice(&stream.to_be_bytes());
    h
}

/// A raw h2 connection to `addr`: preface and an empty SETTINGS frame sent.
async fn h2_raw(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&frame_header(0, 0x4, 0, 0));
    s.write_all(&hello).await.expect("preface");
    s
}

/// Writes `bytes` one at a time, `gap` apart, reading what the proxy sends meanwhile; returns
/// what it read and whether it closed the connection (within `within`).
async fn trickle(
    s: &mut TcpStream,
    bytes: &[u8],
    gap: Duration,
    within: Duration,
) -> (Vec<u8>, bool) {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut left = bytes;
    while tokio::time::Instant::now() < deadline {
        if let Some((b, rest)) = left.split_first() {
            if s.write_all(&[*b]).await.is_err() {
                return (got, true);
            }
            left = rest;
        }
        match tokio::time::timeout(gap, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
    }
    (got, false)
}

/// The (type, stream) of each whole frame in `got`, a server's bytes after its preface.
fn h2_frames(got: &[u8]) -> Vec<(u8, u32)> {
    let mut frames = Vec::new();
    let mut at = 0;
    while at + 9 <= got.len() {
        let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
        let stream = u32::from_be_bytes([got[at + 5], got[at + 6], got[at + 7], got[at + 8]]);
        if at + 9 + len > got.len() {
            break;
        }
        frames.push((got[at + 3], stream & 0x7fff_ffff));
        at += 9 + len;
    }
    frames
}

/// Whether `got` holds a HEADERS frame on stream 1 that begins with `:status: 200` (HPACK
/// static index 8).
fn h2_ok_on_stream_1(got: &[u8]) -> bool {
    let mut at = 0;
    while at + 9 <= got.len() {
        let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
        let stream = u32::from_be_bytes([got[at + 5], got[at + 6], got[at + 7], got[at + 8]]);
        if got[at + 3] == 0x1 && stream == 1 && got.get(at + 9) == Some(&0x88) {
            return true;
        }
        at += 9 + len;
    }
    false
}

/// README: `header_read_timeout` bounds a client's request head, over h2 too. A HEADERS frame
/// written one byte at a time is closed at it (1 s here), not at `h2_idle_timeout` (60 s); a
/// DATA frame trickled as slowly for longer than that is the body's, bounded by
/// `body_idle_timeout` per byte, and its request is served.
#[tokio::test]
async fn a_trickled_h2_request_head_is_closed_at_the_header_read_timeout() {
    let up = Recorder::start().await;
    let green = dead_addr().await;
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\nheader_read_timeout = \"1s\"\nbody_idle_timeout = \"3s\"\nh2_idle_timeout = \"60s\"\n{}",
        service("api", &[up.addr], &[green], "")
    ))
    .await;
    let mut problems = Vec::new();
    // GET / for a, END_STREAM and END_HEADERS, padded with literal fields to 64 bytes.
    let mut block = vec![0x82, 0x86, 0x84, 0x01, 0x01, b'a'];
    while block.len() + 6 <= 64 {
        block.extend_from_slice(&[0x00, 0x01, b'x', 0x02, b'y', b'y']);
    }
    let mut head = frame_header(block.len(), 0x1, 0x5, 1);
    head.extend_from_slice(&block);
    let mut s = h2_raw(p.proxy).await;
    let (got, closed) = trickle(
        &mut s,
        &head,
        Duration::from_millis(200),
        Duration::from_secs(12),
    )
    .await;
    if !closed {
        problems.push("a HEADERS frame trickled for 12 s kept its connection".to_string());
    }
    // Told so before the close (RFC 9113 5.4.1): a GOAWAY, stream 0, NO_ERROR.
    if !h2_frames(&got)
        .iter()
        .any(|(kind, stream)| *kind == 0x7 && *stream == 0)
    {
        problems.push(format!("no GOAWAY before the close: {got:?}"));
    }
    // POST / for a with a 12-byte body: the head and the DATA frame's header whole, its
    // payload a byte every 300 ms (3.6 s).
    let block = [0x83, 0x86, 0x84, 0x01, 0x01, b'a'];
    let mut s = h2_raw(p.proxy).await;
    let mut head = frame_header(block.len(), 0x1, 0x4, 1);
    head.extend_from_slice(&block);
    head.extend_from_slice(&frame_header(12, 0x0, 0x1, 1));
    s.write_all(&head).await.expect("head");
    let (got, closed) = trickle(
        &mut s,
        b"hello, world",
        Duration::from_millis(300),
        Duration::from_secs(4),
    )
    .await;
    if closed {
        problems.push(
            "a DATA frame's payload trickled past header_read_timeout was closed".to_string(),
        );
    }
    if !h2_ok_on_stream_1(&got) {
        problems.push(format!(
            "a DATA frame trickled past header_read_timeout was not served: {got:?}"
        ));
    }
    p.stop().await;
    assert!(problems.is_empty(), "{problems:?}");
}

/// Rapid reset of streams already handed on (CVE-2023-44487, paced so that each stream is
/// accepted and sent upstream before its RST_STREAM): past 100 streams reset before their
/// answer, at least half of those accepted, the connection gets GOAWAY ENHANCE_YOUR_CALM, and
/// the requests that reached the upstream stay bounded. (`h2`'s own limit counts only streams
/// reset before they are accepted: 5,000 went upstream on one connection in a second.) Other
/// clients are served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_of_streams_already_handed_on_gets_enhance_your_calm() {
    let slow = TestUpstream::start("slow").await;
    slow.set_delay(2000);
    let green = dead_addr().await;
    let p = TestProxy::start(&format!(
        "{PROXY}{}",
        service("api", &[slow.addr], &[green], "")
    ))
    .await;
    let tcp = TcpStream::connect(p.proxy).await.expect("connect");
    let (mut c, conn) = h2::client::handshake(tcp).await.expect("handshake");
    let done = tokio::spawn(conn);
    let mut sent = 0;
    'rounds: for _ in 0..20 {
        let mut streams = Vec::new();
        for _ in 0..50 {
            let Ok(mut ready) = c.clone().ready().await else {
                break 'rounds;
            };
            let req = http::Request::get("http://a/slow").body(()).expect("req");
            let Ok((resp, stream)) = ready.send_request(req, true) else {
                break 'rounds;
            };
            c = ready;
            streams.push((resp, stream));
            sent += 1;
        }
        // Accepted and on their way upstream, then reset.
        tokio::time::sleep(Duration::from_millis(50)).await;
        for (resp, mut stream) in streams {
            stream.send_reset(h2::Reason::CANCEL);
            drop(resp);
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), done)
        .await
        .expect("the connection ended")
        .expect("join");
    let reason = ended.err().and_then(|e| e.reason());
    assert_eq!(
        reason,
        Some(h2::Reason::ENHANCE_YOUR_CALM),
        "after {sent} streams"
    );
    assert!(sent < 1000, "all {sent} streams were taken");
    // The upstream saw a bounded number (the threshold and a round in flight), not them all.
    let hits = slow.hits();
    assert!(hits <= 300, "{hits} requests reached the upstream");
    // Another client is served meanwhile.
    assert_eq!(p.get("/x").await.0, 200);
    p.stop().await;
}
