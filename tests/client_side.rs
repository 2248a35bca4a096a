//! HTTP/1.x as clients speak it to the proxy (raw sockets): `Expect: 100-continue`, pipelining,
//! HTTP/1.0 keep-alive and close-delimited bodies, HEAD framing, chunked responses, bodies the
//! proxy never reads, idle connections at shutdown, clients that leave mid-request, `Date`,
//! silent connections and the first head's deadline, an upstream's 1xx heads.
mod common;
use common::*;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PROXY: &str =
    "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\nheader_read_timeout = \"5s\"\n";

async fn start(blue: SocketAddr, extra_service: &str) -> TestProxy {
    let green = dead_addr().await;
    TestProxy::start(&format!(
        "{PROXY}{}",
        service("api", &[blue], &[green], extra_service)
    ))
    .await
}

/// Reads one response (head, then a body framed by Content-Length or chunked, or until close
/// when it has neither) and returns the head and body.
async fn read_response(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    head_request: bool,
) -> (String, Vec<u8>) {
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        fill(s, buf).await;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    buf.drain(..head_end);
    let lower = head.to_ascii_lowercase();
    let length = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse::<usize>().ok());
    // No body follows a 1xx.
    if head_request || head.starts_with("HTTP/1.1 1") {
        return (head, Vec::new());
    }
    if let Some(n) = length {
        while buf.len() < n {
            fill(s, buf).await;
        }
        return (head, buf.drain(..n).collect());
    }
    if lower.contains("transfer-encoding: chunked") {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                fill(s, buf).await;
            };
            let size = usize::from_str_radix(&String::from_utf8_lossy(&buf[..line_end]), 16)
                .expect("chunk size");
            buf.drain(..line_end + 2);
            if size == 0 {
                // The trailer section (or its empty line) is left in `buf`.
                return (head, body);
            }
            while buf.len() < size + 2 {
                fill(s, buf).await;
            }
            body.extend(buf.drain(..size));
            buf.drain(..2);
        }
    }
    // Neither: the body ends with the connection.
    loop {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            other => panic!("close-delimited body did not end: {other:?}"),
        }
    }
    (head, std::mem::take(buf))
}

async fn fill(s: &mut TcpStream, buf: &mut Vec<u8>) {
    let mut chunk = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
        .await
        .expect("response in time")
        .expect("read");
    assert!(
        n > 0,
        "closed mid-response: {:?}",
        String::from_utf8_lossy(buf)
    );
    buf.extend_from_slice(&chunk[..n]);
}

/// The connection is closed (EOF, not a reset) within a few seconds.
async fn assert_closed(s: &mut TcpStream) {
    let mut chunk = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(4), s.read(&mut chunk)).await;
    assert!(
        matches!(r, Ok(Ok(0))),
        "connection not closed cleanly: {r:?}"
    );
}

/// Also when `100-continue` shares its line with another expectation (`Expect =
/// #expectation`, RFC 9110 10.1.1).
#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    let blue = TestUpstream::start("blue").await;
    let p = start(blue.addr, "").await;
    for expect in ["100-continue", "foo=bar, 100-Continue"] {
        let mut s = TcpStream::connect(p.proxy).await.expect("connect");
        s.write_all(
            format!(
                "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: {expect}\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
        let mut buf = Vec::new();
        let (interim, _) = read_response(&mut s, &mut buf, false).await;
        assert!(
            interim.starts_with("HTTP/1.1 100 Continue"),
            "{expect}: {interim:?}"
        );
        s.write_all(b"hello").await.expect("write body");
        let (head, body) = read_response(&mut s, &mut buf, false).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("echo");
        assert_eq!(v["body_len"], 5, "{v}");
    }
    p.stop().await;
}

/// A HEAD the server refuses as it reads the head (505, 431, 414, 501, 400) is answered without
/// content (RFC 9110 9.3.2): nothing follows the empty line before the connection closes.
#[tokio::test]
async fn a_refused_head_request_gets_no_content() {
    let blue = TestUpstream::start("blue").await;
    let p = start(blue.addr, "").await;
    let long_field = format!(
        "HEAD / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
        "x".repeat(70_000)
    );
    let long_target = format!("HEAD /{} HTTP/1.1\r\nHost: a\r\n\r\n", "x".repeat(70_000));
    let cases: [(&[u8], &str); 5] = [
        (b"HEAD / HTTP/2.0\r\nHost: a\r\n\r\n", "505"),
        (long_field.as_bytes(), "431"),
        (long_target.as_bytes(), "414"),
        (
            b"HEAD / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "501",
        ),
        (b"HEAD / HTTP/1.1\r\nHost: a\r\nX : y\r\n\r\n", "400"),
    ];
    for (input, status) in cases {
        let mut s = TcpStream::connect(p.proxy).await.expect("connect");
        // The proxy may answer (and close) before it has read all of a long head.
        let _ = s.write_all(input).await;
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
                Err(_) => panic!("{status}: the connection did not close"),
            }
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text:?}");
        let end = text.find("\r\n\r\n").expect("a whole head") + 4;
        assert_eq!(
            &text[end..],
            "",
            "{status}: content after the head: {text:?}"
        );
    }
    assert_eq!(blue.hits(), 0);
    p.stop().await;
}

/// A request the proxy answers without its body (no service for this host, a malformed Host)
/// gets that answer at once, with no `100 Continue` ahead of it (RFC 9110 10.1.1): the client is
/// not asked for a body that would be thrown away.
#[tokio::test]
async fn expect_100_continue_is_not_sent_ahead_of_the_proxys_own_answer() {
    let blue = TestUpstream::start("blue").await;
    let p = start(blue.addr, "hosts = [\"api.example\"]\n").await;
    for (host, status) in [("other.example", "404"), ("a:1:2", "400")] {
        let mut s = TcpStream::connect(p.proxy).await.expect("connect");
        s.write_all(
            format!(
                "POST /upload HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .expect("write");
        let mut buf = Vec::new();
        let (head, _) = read_response(&mut s, &mut buf, false).await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}")),
            "{host}: {head:?}"
        );
        assert_closed(&mut s).await;
    }
    assert_eq!(blue.hits(), 0);
    p.stop().await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let blue = TestUpstream::start("blue").await;
    let p = start(blue.addr, "").await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    s.write_all(
        b"GET /echo?n=1 HTTP/1.1\r\nHost: a\r\n\r\n\
          POST /echo?n=2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc\
          POST /echo?n=3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n\
          GET /echo?n=4 HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await
    .expect("write");
    let mut buf = Vec::new();
    for (n, len) in [(1, 0), (2, 3), (3, 2), (4, 0)] {
        let (head, body) = read_response(&mut s, &mut buf, false).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{n}: {head:?}");
        let v: serde_json::Value = serde_json::from_slice(&body).expect("echo");
        assert_eq!(v["query"], format!("n={n}"), "{v}");
        assert_eq!(v["body_len"], len, "{v}");
    }
    assert_eq!(blue.hits(), 4);
    p.stop().await;
}

#[tokio::test]
async fn head_keeps_the_length_and_sends_no_body() {
    let blue = TestUpstream::start("blue").await;
    let p = start(blue.addr, "").await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    let mut buf = Vec::new();
    s.write_all(b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let (head, _) = read_response(&mut s, &mut buf, true).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    assert!(
        head.to_ascii_lowercase().contains("content-length: 5\r\n"),
        "{head:?}"
    );
    // No body followed: the next response on the connection starts right away.
    s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let (head, body) = read_response(&mut s, &mut buf, false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    assert_eq!(body, b"blue\n");
    p.stop().await;
}

#[tokio::test]
async fn http10_keeps_alive_only_when_asked() {
    let blue = TestUpstream::start("blue").await;
    let p = start(blue.addr, "").await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    let mut buf = Vec::new();
    for _ in 0..2 {
        s.write_all(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await
            .expect("write");
        let (head, body) = read_response(&mut s, &mut buf, false).await;
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("connection: keep-alive\r\n"), "{head:?}");
        assert!(lower.contains("content-length: 5\r\n"), "{head:?}");
        assert_eq!(body, b"blue\n");
    }
    s.write_all(b"GET /x HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let (head, body) = read_response(&mut s, &mut buf, false).await;
    assert!(
        !head.to_ascii_lowercase().contains("keep-alive"),
        "{head:?}"
    );
    assert_eq!(body, b"blue\n");
    assert_closed(&mut s).await;
    p.stop().await;
}

/// An upstream answering every request with a chunked body and a trailer.
async fn chunked_upstream() -> SocketAddr {
    raw_upstream(|_| {
        Raw::Answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nx-sum: 11\r\n\r\n".to_vec(),
        )
    })
    .await
}

#[tokio::test]
async fn bodies_of_unknown_length_are_chunked_for_http11_and_close_delimited_for_http10() {
    let up = chunked_upstream().await;
    let p = start(up, "").await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    let mut buf = Vec::new();
    s.write_all(b"GET /c HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n")
        .await
        .expect("write");
    let (head, body) = read_response(&mut s, &mut buf, false).await;
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head:?}"
    );
    assert_eq!(body, b"hello world");
    // The trailer section came through (read_response stops at the last chunk's line).
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        fill(&mut s, &mut buf).await;
    }
    assert!(
        String::from_utf8_lossy(&buf).starts_with("x-sum: 11\r\n\r\n"),
        "{buf:?}"
    );
    drop(s);

    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    let mut buf = Vec::new();
    s.write_all(b"GET /c HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .await
        .expect("write");
    let (head, body) = read_response(&mut s, &mut buf, false).await;
    let lower = head.to_ascii_lowercase();
    assert!(
        !lower.contains("transfer-encoding") && !lower.contains("keep-alive"),
        "{head:?}"
    );
    assert_eq!(body, b"hello world");
    p.stop().await;
}

/// The proxy answers before reading the body (no service for this host): the client still gets
/// the whole response, not a reset, and the connection then closes.
#[tokio::test]
async fn a_body_the_proxy_never_reads_does_not_cost_the_client_its_response() {
    let blue = TestUpstream::start("blue").await;
    let p = start(blue.addr, "hosts = [\"api.example\"]\n").await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    let (mut rd, mut wr) = s.split();
    let body = vec![b'x'; 100_000];
    let writer = async {
        wr.write_all(
            b"POST /upload HTTP/1.1\r\nHost: other.example\r\nContent-Length: 100000\r\n\r\n",
        )
        .await?;
        wr.write_all(&body).await
    };
    let reader = async {
        let mut out = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), rd.read(&mut chunk)).await {
                Ok(Ok(0)) => return Ok(out),
                Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Err(e),
                Err(_) => panic!("the connection stayed open"),
            }
        }
    };
    let (wrote, read) = tokio::join!(writer, reader);
    assert!(wrote.is_ok(), "the upload failed: {wrote:?}");
    let text = String::from_utf8_lossy(&read.expect("no reset")).to_string();
    assert!(text.starts_with("HTTP/1.1 404"), "{text:?}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text:?}"
    );
    assert!(
        text.ends_with("no service matches this request\n"),
        "{text:?}"
    );
    assert_eq!(blue.hits(), 0);
    p.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_closes_at_shutdown() {
    let blue = TestUpstream::start("blue").await;
    // Waiting for it would take the whole 10 s grace.
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"10s\"\n{}",
        service("api", &[blue.addr], &[dead_addr().await], "")
    ))
    .await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    let mut buf = Vec::new();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let (head, _) = read_response(&mut s, &mut buf, false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    let began = tokio::time::Instant::now();
    p.stop().await;
    assert!(
        began.elapsed() < Duration::from_secs(4),
        "shutdown waited for an idle connection"
    );
    assert_closed(&mut s).await;
}

/// The held requests that reached the upstream, and the held connections the proxy closed.
type Held = (
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
);

/// An upstream that never answers `/hold` and counts the held requests and the held
/// connections the proxy closes; anything else gets the chunked answer of `chunked_upstream`.
async fn holding_upstream() -> (SocketAddr, Held) {
    let arrived = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let closed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (arrivals, counter) = (arrived.clone(), closed.clone());
    let addr = raw_upstream(move |head| {
        if head.starts_with("GET /hold") {
            arrivals.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return Raw::Hold(counter.clone());
        }
        Raw::Answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
        )
    })
    .await;
    (addr, (arrived, closed))
}

/// A client that gives up on a slow request cancels it: the upstream connection is closed at
/// once instead of being held until `request_timeout`, and nothing is recorded for it.
#[tokio::test]
async fn a_client_that_goes_away_cancels_its_upstream_request() {
    use std::sync::atomic::Ordering;
    let (up, (arrived, closed)) = holding_upstream().await;
    let p = start(up, "").await;
    for request in [
        &b"GET /hold HTTP/1.1\r\nHost: a\r\n\r\n"[..],
        // With a body the proxy has read whole before the upstream got it.
        &b"GET /hold HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"[..],
    ] {
        let (sent, before) = (
            arrived.load(Ordering::SeqCst),
            closed.load(Ordering::SeqCst),
        );
        let mut s = TcpStream::connect(p.proxy).await.expect("connect");
        s.write_all(request).await.expect("write");
        // The client leaves once its request is at the upstream (not after a fixed pause, which
        // a loaded machine may not have forwarded it in).
        assert!(
            eventually(10, || async { arrived.load(Ordering::SeqCst) > sent }).await,
            "the request never reached the upstream"
        );
        drop(s);
        // Held otherwise until the request_timeout (30 s).
        assert!(
            eventually(10, || async { closed.load(Ordering::SeqCst) > before }).await,
            "the upstream request was still open 10 s after its client left"
        );
    }
    // Over h2 (prior knowledge), a stream the client resets: the same, and counted too.
    let (sent, before) = (
        arrived.load(Ordering::SeqCst),
        closed.load(Ordering::SeqCst),
    );
    let tcp = TcpStream::connect(p.proxy).await.expect("connect");
    let (mut client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let conn = tokio::spawn(conn);
    let req = http::Request::get("http://a/hold").body(()).expect("req");
    let (_resp, mut stream) = client.send_request(req, true).expect("send");
    assert!(
        eventually(10, || async { arrived.load(Ordering::SeqCst) > sent }).await,
        "the h2 request never reached the upstream"
    );
    stream.send_reset(h2::Reason::CANCEL);
    assert!(
        eventually(10, || async { closed.load(Ordering::SeqCst) > before }).await,
        "the upstream request was still open 10 s after its client reset the stream"
    );
    let counted = eventually(10, || async {
        let (_, m) = get(p.admin, "/metrics").await;
        m.contains("\nswitchyard_client_closed_requests_total 3\n")
    })
    .await;
    conn.abort();
    let status = p.service_status("api").await;
    assert_eq!(status["colors"]["blue"]["requests"], 0, "{status}");
    let (_, metrics) = get(p.admin, "/metrics").await;
    assert!(counted, "{metrics}");
    // Its HELP says so too: h2 streams are in it, not only HTTP/1 requests.
    let help = metrics
        .lines()
        .find(|l| l.starts_with("# HELP switchyard_client_closed_requests_total "))
        .unwrap_or_default();
    assert!(
        help.contains("HTTP/1") && help.contains("h2 stream"),
        "{help}"
    );
    p.stop().await;
}

/// Requests pipelined behind a slow one are not taken for the client going away.
#[tokio::test]
async fn a_pipelined_request_behind_a_slow_one_is_kept() {
    let blue = TestUpstream::start("blue").await;
    blue.set_delay(300);
    let p = start(blue.addr, "").await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    s.write_all(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(b"GET /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    for _ in 0..2 {
        let (head, _) = read_response(&mut s, &mut buf, false).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    }
    assert_closed(&mut s).await;
    p.stop().await;
}

/// A client that pipelines its requests and then half-closes (`printf ... | nc`): the requests
/// buffered behind the one in flight are answered (watching for the client's close stops while
/// a next request waits); the last one, in flight when the FIN is read, counts as abandoned, as
/// with nginx's default. A FIN cannot tell a half-close from a close.
#[tokio::test]
async fn pipelined_requests_then_a_half_close() {
    let blue = TestUpstream::start("blue").await;
    blue.set_delay(200);
    let p = start(blue.addr, "").await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    s.write_all(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    s.shutdown().await.expect("half-close");
    let mut buf = Vec::new();
    let (head, body) = read_response(&mut s, &mut buf, false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    assert_eq!(body, b"blue\n");
    assert_closed(&mut s).await;
    p.stop().await;
}

/// A connection that has sent nothing (a browser's preconnect) does not hold up shutdown.
#[tokio::test]
async fn a_silent_new_connection_does_not_hold_up_shutdown() {
    let blue = TestUpstream::start("blue").await;
    let green = dead_addr().await;
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"10s\"\nheader_read_timeout = \"10s\"\n{}",
        service("api", &[blue.addr], &[green], "")
    ))
    .await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let began = tokio::time::Instant::now();
    p.stop().await;
    // Waiting for it would take 10 s.
    assert!(
        began.elapsed() < Duration::from_secs(4),
        "shutdown waited {:?} for a silent connection",
        began.elapsed()
    );
    assert_closed(&mut s).await;
}

/// `header_read_timeout` bounds the first head from the accept: bytes trickling in do not
/// restart it.
#[tokio::test]
async fn the_first_head_has_one_deadline_from_the_accept() {
    let blue = TestUpstream::start("blue").await;
    let green = dead_addr().await;
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\nheader_read_timeout = \"2s\"\n{}",
        service("api", &[blue.addr], &[green], "")
    ))
    .await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(1800)).await;
    // (A loaded machine may oversleep past the deadline: the proxy has closed, and the write
    // may fail.)
    // Taken before the write: the proxy may read the bytes before `write_all` returns.
    let wrote = tokio::time::Instant::now();
    let _ = s.write_all(b"GET / HTTP/1.1\r\n").await;
    let mut chunk = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(6), s.read(&mut chunk)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    // From the accept: 2 s, about 200 ms after the bytes; restarted by them it would be 2 s
    // after them at the earliest (a timer never fires early). Measured from the bytes, so that
    // a slow sleep before them does not count.
    assert!(
        wrote.elapsed() < Duration::from_secs(2),
        "closed {:?} after the bytes",
        wrote.elapsed()
    );
    p.stop().await;
}

/// Every response carries `Date` (RFC 9110 6.6.1): the proxy's own answers and upstream
/// answers without one get the proxy's; an upstream's own is passed on unchanged.
#[tokio::test]
async fn responses_carry_a_date() {
    let up = chunked_upstream().await; // sends no Date
    let p = start(up, "hosts = [\"a\"]\n").await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    let mut buf = Vec::new();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: nosuch\r\n\r\n")
        .await
        .expect("write");
    for expected in ["HTTP/1.1 200", "HTTP/1.1 404"] {
        let (head, _) = read_response(&mut s, &mut buf, false).await;
        assert!(head.starts_with(expected), "{head:?}");
        let date = head
            .lines()
            .find_map(|l| l.strip_prefix("date: "))
            .unwrap_or_else(|| panic!("no date in {head:?}"));
        assert!(
            date.len() == 29 && date.ends_with(" GMT"),
            "not an IMF-fixdate: {date:?}"
        );
        if expected.ends_with("200") {
            // The chunked answer's trailer section.
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                fill(&mut s, &mut buf).await;
            }
            let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0);
            buf.drain(..end + 4);
        }
    }
    p.stop().await;

    // The upstream's own Date: exactly one, the upstream's.
    let up = raw_upstream(|_| {
        Raw::Answer(
            b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 2\r\n\r\nok"
                .to_vec(),
        )
    })
    .await;
    let p = start(up, "").await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    let mut buf = Vec::new();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let (head, _) = read_response(&mut s, &mut buf, false).await;
    let dates: Vec<&str> = head.lines().filter(|l| l.starts_with("date: ")).collect();
    assert_eq!(dates, ["date: Sun, 06 Nov 1994 08:49:37 GMT"], "{head:?}");
    p.stop().await;
}

/// An HTTP/1.0 request's Upgrade is ignored (RFC 9110 7.8): it reaches the upstream as a
/// plain request, without the upgrade fields, so an upstream never switches protocols for it.
#[tokio::test]
async fn an_http10_upgrade_is_not_tunnelled() {
    let up = raw_upstream(|head| {
        if head.to_ascii_lowercase().contains("upgrade: websocket") {
            Raw::Echo(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n".to_vec())
        } else {
            Raw::Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain".to_vec())
        }
    })
    .await;
    let p = start(up, "").await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    s.write_all(
        b"GET /ws HTTP/1.0\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .expect("write");
    let mut buf = Vec::new();
    let (head, body) = read_response(&mut s, &mut buf, false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    assert_eq!(body, b"plain");
    p.stop().await;
}

/// A request target longer than a URI can hold is 414, not a generic 400.
#[tokio::test]
async fn an_overlong_request_target_is_414() {
    let blue = TestUpstream::start("blue").await;
    let green = dead_addr().await;
    let p = TestProxy::start(&format!(
        "{PROXY}max_header_bytes = 131072\n{}",
        service("api", &[blue.addr], &[green], "")
    ))
    .await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    let path = "a".repeat(70_000);
    s.write_all(format!("GET /{path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = Vec::new();
    let (head, _) = read_response(&mut s, &mut buf, false).await;
    assert!(head.starts_with("HTTP/1.1 414"), "{head:?}");
    assert_eq!(blue.hits(), 0);
    p.stop().await;
}

/// An upstream answering every request at once with a 101 that carries a Content-Length.
async fn eager_101_upstream() -> SocketAddr {
    raw_upstream(|_| {
        Raw::Echo(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n".to_vec(),
        )
    })
    .await
}

/// A 101 never carries Content-Length (RFC 9110 8.6); a 101 that arrives before the request
/// body was sent cannot become a tunnel and is answered 502.
#[tokio::test]
async fn switching_protocols_framing() {
    let p = start(eager_101_upstream().await, "").await;
    let upgrade = "GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n";

    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    s.write_all(format!("{upgrade}\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = Vec::new();
    let (head, _) = read_response(&mut s, &mut buf, true).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head:?}");
    assert!(
        !head.to_ascii_lowercase().contains("content-length"),
        "{head:?}"
    );
    // The tunnel works: the upstream echoes.
    s.write_all(b"ping").await.expect("write");
    while buf.len() < 4 {
        fill(&mut s, &mut buf).await;
    }
    assert_eq!(&buf[..], b"ping");
    drop(s);

    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    s.write_all(format!("{upgrade}Content-Length: 10\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut buf = Vec::new();
    let (head, _) = read_response(&mut s, &mut buf, false).await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head:?}");
    p.stop().await;
}

/// An upstream that answers `GET /one` with a `103 Early Hints` (carrying hop-by-hop fields
/// too), then waits for `go` before its `200`; anything else with 40 interim heads (`103` and
/// `102`) and the `200` at once.
async fn early_hints_upstream(go: std::sync::Arc<tokio::sync::Notify>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let go = go.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let one = buf.starts_with(b"GET /one ");
                    buf.drain(..end + 4);
                    let hint: &[u8] = b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nConnection: x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\r\n";
                    let done: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
                    if one {
                        if s.write_all(hint).await.is_err() {
                            return;
                        }
                        go.notified().await;
                    } else {
                        let mut all = Vec::new();
                        for i in 0..40 {
                            all.extend_from_slice(if i % 2 == 0 {
                                hint
                            } else {
                                b"HTTP/1.1 102 Processing\r\n\r\n"
                            });
                        }
                        if s.write_all(&all).await.is_err() {
                            return;
                        }
                    }
                    if s.write_all(done).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// RFC 9110 15.2: a proxy forwards the 1xx responses it did not ask for. An HTTP/1.1 client
/// gets the upstream's `103` as it comes (before the upstream has answered), without its
/// hop-by-hop fields, then the response; at most 16 interim heads per request; an HTTP/1.0
/// client gets none (a server must not send it a 1xx).
#[tokio::test]
async fn an_upstreams_interim_responses_reach_http11_clients() {
    let go = std::sync::Arc::new(tokio::sync::Notify::new());
    let up = early_hints_upstream(go.clone()).await;
    let p = start(up, "").await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    let mut buf = Vec::new();
    s.write_all(b"GET /one HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    // The upstream sends its 200 only once the 103 has reached the client.
    let (hint, _) = read_response(&mut s, &mut buf, false).await;
    go.notify_one();
    let lower = hint.to_ascii_lowercase();
    assert!(hint.starts_with("HTTP/1.1 103 Early Hints\r\n"), "{hint:?}");
    assert!(
        lower.contains("link: </a.css>; rel=preload\r\n"),
        "{hint:?}"
    );
    for hop in [
        "connection",
        "x-hop",
        "keep-alive",
        "content-length",
        "date",
    ] {
        assert!(!lower.contains(&format!("{hop}:")), "{hop} in {hint:?}");
    }
    let (head, body) = read_response(&mut s, &mut buf, false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    assert_eq!(body, b"ok\n");

    // Forty interim heads: sixteen are passed on, then the response, on the same connection.
    s.write_all(b"GET /many HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let mut interim = Vec::new();
    let (head, body) = loop {
        let (head, body) = read_response(&mut s, &mut buf, false).await;
        if !head.starts_with("HTTP/1.1 1") {
            break (head, body);
        }
        interim.push(head.lines().next().unwrap_or_default().to_string());
    };
    assert_eq!(interim.len(), 16, "{interim:?}");
    assert_eq!(interim[1], "HTTP/1.1 102 Processing");
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    assert_eq!(body, b"ok\n");

    // HTTP/1.0: the response alone.
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    let mut buf = Vec::new();
    s.write_all(b"GET /many HTTP/1.0\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let (head, body) = read_response(&mut s, &mut buf, false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    assert_eq!(body, b"ok\n");
    p.stop().await;
}

/// The same for an h2 client (RFC 9110 15.2, RFC 9113 8.1): the upstream's `103` reaches it as
/// an interim HEADERS frame before the upstream has answered, without the hop-by-hop fields,
/// then the response.
#[tokio::test]
async fn an_upstreams_interim_responses_reach_h2_clients() {
    let go = std::sync::Arc::new(tokio::sync::Notify::new());
    let up = early_hints_upstream(go.clone()).await;
    let p = start(up, "").await;
    let tcp = TcpStream::connect(p.proxy).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut client = client.ready().await.expect("ready");
    let req = http::Request::get(format!("http://{}/one", p.proxy))
        .body(())
        .expect("request");
    let (mut resp, _) = client.send_request(req, true).expect("send");
    // The upstream sends its 200 only once the 103 has reached the client.
    let hint = tokio::time::timeout(
        Duration::from_secs(10),
        std::future::poll_fn(|cx| resp.poll_informational(cx)),
    )
    .await
    .expect("a 103 in time")
    .expect("an interim response")
    .expect("no stream error");
    go.notify_one();
    assert_eq!(hint.status(), 103);
    assert_eq!(
        hint.headers().get("link").map(|v| v.as_bytes()),
        Some(&b"</a.css>; rel=preload"[..])
    );
    for hop in ["connection", "x-hop", "keep-alive", "content-length"] {
        assert!(hint.headers().get(hop).is_none(), "{hop} in {hint:?}");
    }
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("a response in time")
        .expect("response");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        got.extend_from_slice(&chunk.expect("data"));
    }
    assert_eq!(got, b"ok\n");

    // Forty interim heads: sixteen are passed on, then the response.
    let req = http::Request::get(format!("http://{}/many", p.proxy))
        .body(())
        .expect("request");
    let (mut resp, _) = client.send_request(req, true).expect("send");
    let mut interim = Vec::new();
    while let Some(r) = tokio::time::timeout(
        Duration::from_secs(10),
        std::future::poll_fn(|cx| resp.poll_informational(cx)),
    )
    .await
    .expect("interim heads in time")
    {
        interim.push(r.expect("no stream error").status().as_u16());
    }
    assert_eq!(interim.len(), 16, "{interim:?}");
    assert_eq!(interim[1], 102);
    let resp = resp.await.expect("response");
    assert_eq!(resp.status(), 200);
    p.stop().await;
}

/// An upstream that reads one request head, answers `/head` with a head and 2 of 100 body
/// bytes (`/none`: nothing), then waits; it reports when it has the request and when the
/// proxy closes the connection.
async fn stalling_upstream() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    channel_upstream(|mut s, tx| async move {
        let mut buf = Vec::new();
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let which = if buf.starts_with(b"GET /head ") {
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nab")
                .await;
            "head"
        } else {
            "none"
        };
        let _ = tx.send(format!("got {which}"));
        // Whatever comes next, an EOF or a reset means the proxy let go.
        let mut chunk = [0u8; 4096];
        while let Ok(n) = s.read(&mut chunk).await {
            if n == 0 {
                break;
            }
        }
        let _ = tx.send(format!("closed {which}"));
    })
    .await
}

/// An h2 client that resets its stream (RST_STREAM CANCEL) gets the proxy to let go of the
/// upstream request at once, whether the upstream has not answered yet or is in the middle of
/// a (small) body: the upstream connection is closed long before `body_idle_timeout`.
#[tokio::test]
async fn an_h2_stream_the_client_resets_lets_go_of_its_upstream() {
    let (up, mut closed) = stalling_upstream().await;
    let p = start(up, "").await;
    let tcp = TcpStream::connect(p.proxy).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut client = client.ready().await.expect("ready");
    for path in ["none", "head"] {
        let req = http::Request::get(format!("http://{}/{path}", p.proxy))
            .body(())
            .expect("request");
        let (resp, mut stream) = client.send_request(req, true).expect("send");
        if path == "head" {
            let resp = tokio::time::timeout(Duration::from_secs(10), resp)
                .await
                .expect("a head in time")
                .expect("response");
            assert_eq!(resp.status(), 200);
            let mut body = resp.into_body();
            let first = tokio::time::timeout(Duration::from_secs(10), body.data())
                .await
                .expect("data in time")
                .expect("data")
                .expect("data");
            assert_eq!(&first[..], b"ab");
            stream.send_reset(h2::Reason::CANCEL);
        } else {
            // Once the request has reached the upstream.
            let got = tokio::time::timeout(Duration::from_secs(10), closed.recv())
                .await
                .expect("the request reached the upstream in time");
            assert_eq!(got.as_deref(), Some("got none"));
            stream.send_reset(h2::Reason::CANCEL);
            drop(resp);
        }
        // body_idle_timeout is 60 s by default: far beyond this bound.
        let mut seen = Vec::new();
        while !seen.contains(&format!("closed {path}")) {
            let next = tokio::time::timeout(Duration::from_secs(15), closed.recv())
                .await
                .expect("the upstream was let go of in time")
                .expect("upstream task");
            seen.push(next);
        }
    }
    p.stop().await;
}

/// An upstream that reads one request (head and whatever body follows) until the proxy closes
/// the connection or a whole chunked body has arrived, and reports what it read.
async fn recording_upstream() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    channel_upstream(|mut s, tx| async move {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if buf.ends_with(b"\r\n0\r\n\r\n") {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                    .await;
                break;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let _ = tx.send(buf);
    })
    .await
}

/// An upstream on an ephemeral port: each connection is served by `serve`, which reports
/// what it saw on the channel.
async fn channel_upstream<T, F, Fut>(
    serve: F,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<T>)
where
    T: Send + 'static,
    F: Fn(TcpStream, tokio::sync::mpsc::UnboundedSender<T>) -> Fut + Send + Copy + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(s, tx.clone()));
        }
    });
    (addr, rx)
}

/// An h2 upload the client resets mid-body (RST_STREAM, CANCEL or NO_ERROR) is incomplete: the
/// upstream must see an aborted body, never the last chunk of a complete one (RFC 9112 7.1,
/// RFC 9113 8.1).
#[tokio::test]
async fn an_h2_upload_the_client_resets_never_reaches_the_upstream_complete() {
    let (up, mut seen) = recording_upstream().await;
    let p = start(up, "").await;
    // Without Content-Length the proxy sends the body chunked; with it, every declared byte is
    // sent before the reset, which still leaves the request incomplete (RFC 9113 8.1: no
    // END_STREAM), so the upstream must not get all of it.
    // Last, the control: the same declared upload ended by an empty END_STREAM frame of its
    // own before the reset reaches the upstream whole (the last bytes were held, not lost).
    let cases = [
        (h2::Reason::CANCEL, false, false),
        (h2::Reason::NO_ERROR, false, false),
        (h2::Reason::CANCEL, true, false),
        (h2::Reason::NO_ERROR, true, false),
        (h2::Reason::CANCEL, true, true),
    ];
    for (reason, declared, ended) in cases {
        let tcp = TcpStream::connect(p.proxy).await.expect("connect");
        let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
        tokio::spawn(conn);
        let mut client = client.ready().await.expect("ready");
        let mut req = http::Request::post(format!("http://{}/upload", p.proxy));
        if declared {
            req = req.header("content-length", "12");
        }
        let req = req.body(()).expect("request");
        let (_resp, mut body) = client.send_request(req, false).expect("send");
        body.send_data(bytes::Bytes::from_static(b"partial-"), false)
            .expect("data");
        tokio::time::sleep(Duration::from_millis(300)).await;
        body.send_data(bytes::Bytes::from_static(b"more"), false)
            .expect("data");
        // The reset comes after the proxy has read the last bytes (arriving with them, `h2`
        // would discard them unread).
        tokio::time::sleep(Duration::from_millis(300)).await;
        if ended {
            body.send_data(bytes::Bytes::new(), true).expect("end");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        body.send_reset(reason);
        let got = tokio::time::timeout(Duration::from_secs(15), seen.recv())
            .await
            .expect("the upstream's connection ended in time")
            .expect("upstream task");
        let got = String::from_utf8_lossy(&got).to_string();
        assert!(got.starts_with("POST /upload "), "{got:?}");
        let complete = if declared {
            got.ends_with("partial-more")
        } else {
            got.ends_with("\r\n0\r\n\r\n")
        };
        assert_eq!(
            complete, ended,
            "{reason:?}, declared length {declared}, END_STREAM {ended}: {got:?}"
        );
    }
    p.stop().await;
}

/// HEAD over h2 to an answer the proxy makes itself (the upstream refuses connections: 502)
/// gets its head with END_STREAM and no DATA (RFC 9110 9.3.2; a body makes the response
/// malformed, RFC 9113 8.1.1, and strict clients reset the stream); GET gets the body.
#[tokio::test]
async fn an_h2_head_gets_no_body_from_the_proxys_own_answers() {
    let p = start(dead_addr().await, "").await;
    let tcp = TcpStream::connect(p.proxy).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut client = client.ready().await.expect("ready");
    for method in [http::Method::HEAD, http::Method::GET] {
        let req = http::Request::builder()
            .method(method.clone())
            .uri(format!("http://{}/x", p.proxy))
            .body(())
            .expect("request");
        let (resp, _) = client.send_request(req, true).expect("send");
        let resp = tokio::time::timeout(Duration::from_secs(10), resp)
            .await
            .expect("answered in time")
            .expect("response");
        assert!(
            resp.status().is_server_error(),
            "{method}: {}",
            resp.status()
        );
        let mut body = resp.into_body();
        let mut got = Vec::new();
        while let Some(d) = tokio::time::timeout(Duration::from_secs(10), body.data())
            .await
            .expect("body in time")
        {
            got.extend_from_slice(&d.expect("data"));
        }
        if method == http::Method::HEAD {
            assert!(got.is_empty(), "a body to HEAD: {got:?}");
        } else {
            assert!(!got.is_empty(), "GET got no body");
        }
        client = client.ready().await.expect("the connection still serves");
    }
    p.stop().await;
}

/// An upstream that answers an upload early (a 413 before the body's end) and closes: the
/// client gets the answer and the connection then closes cleanly, after the proxy has read
/// (and dropped) what the client was still sending, rather than with a reset that can destroy
/// the answer before the client reads it (RFC 9112 9.6). The reader the unfinished body held
/// lingered only when the body had been dropped before the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_to_an_upload_closes_cleanly_after_the_rest_is_read() {
    let up = raw_upstream(|_| {
        Raw::Close(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbig!"
                .to_vec(),
        )
    })
    .await;
    let p = TestProxy::start(&service("api", &[up], &[dead_addr().await], "")).await;
    for round in 0..5 {
        let mut c = TcpStream::connect(p.proxy).await.expect("connect");
        let chunk = vec![b'x'; 64 * 1024];
        c.write_all(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 100000000\r\n\r\n")
            .await
            .expect("head");
        c.write_all(&chunk).await.expect("body");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"big!") && !got.ends_with(b"bad gateway\n") {
            let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
                .await
                .expect("answer timed out")
                .expect("read");
            assert!(
                n > 0,
                "round {round}: closed early: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got).into_owned();
        assert!(text.starts_with("HTTP/1.1 413 "), "round {round}: {text}");
        // More of the upload, as a client that has not read the answer yet sends it.
        for _ in 0..3 {
            c.write_all(&chunk)
                .await
                .expect("the proxy reset the connection");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        c.shutdown().await.expect("shutdown");
        let end = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("no close");
        assert!(matches!(end, Ok(0)), "round {round}: {end:?}");
    }
    p.stop().await;
}
