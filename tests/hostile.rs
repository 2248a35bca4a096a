//! Hostile input on the proxy listener (raw sockets) and broken answers from upstreams. Every
//! malformed request must be refused by the proxy itself: the upstream never sees it.
mod common;
use common::*;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PROXY: &str =
    "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"2s\"\nrequest_timeout = \"10s\"\n";

/// The proxy with short timeouts (header_read_timeout and body_idle_timeout 1s unless
/// `extra_proxy` sets them).
async fn start(blue: SocketAddr, extra_proxy: &str) -> TestProxy {
    let green = dead_addr().await;
    let mut short = String::new();
    for key in ["header_read_timeout", "body_idle_timeout"] {
        if !extra_proxy.contains(key) {
            short += &format!("{key} = \"1s\"\n");
        }
    }
    TestProxy::start(&format!(
        "{PROXY}{short}{extra_proxy}{}",
        service("api", &[blue], &[green], "")
    ))
    .await
}

/// For tests that trickle bytes: a head sent a few bytes a read must not run into the
/// header_read_timeout on a loaded machine (it is not what they test).
const SLOW_HEADS: &str = "header_read_timeout = \"10s\"\n";

/// Reads until the peer closes or `quiet` passes without a byte.
async fn read_all(s: &mut TcpStream, quiet: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(quiet, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Err(_) => break false,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// Sends raw bytes, returns the status line.
async fn raw(addr: SocketAddr, data: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(data).await.expect("write");
    // The proxy closes after these answers (or at the 1 s header_read_timeout of an idle
    // keep-alive connection): the quiet period only bounds a hang.
    let (text, _) = read_all(&mut s, Duration::from_secs(5)).await;
    text.lines().next().unwrap_or("").to_string()
}

#[tokio::test]
async fn malformed_requests_are_400_and_never_reach_the_upstream() {
    let blue = TestUpstream::start("blue").await;
    let p = start(blue.addr, "").await;
    let cases: &[(&str, &[u8])] = &[
        ("two Content-Lengths", b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
        ("Content-Length list", b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 6\r\n\r\nhello!"),
        ("TE xchunked", b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
        ("TE chunked, chunked", b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
        ("TE chunked, gzip", b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"),
        ("TE on two lines", b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("TE folded onto the next line", b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n"),
        ("space before the colon", b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n"),
        ("TE in HTTP/1.0", b"POST /echo HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("obs-fold", b"GET /echo HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n"),
        ("NUL in a value", b"GET /echo HTTP/1.1\r\nHost: a\r\nX-A: b\0c\r\n\r\n"),
        ("lone CR in a value", b"GET /echo HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n"),
        ("missing Host", b"GET /echo HTTP/1.1\r\n\r\n"),
        ("two Hosts", b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        ("bad Host", b"GET /echo HTTP/1.1\r\nHost: a b\r\n\r\n"),
    ];
    for (name, data) in cases {
        let status = raw(p.proxy, data).await;
        assert!(status.starts_with("HTTP/1.1 400"), "{name}: got {status:?}");
    }
    assert_eq!(blue.hits(), 0, "a malformed request reached the upstream");
    // The same connection handling still serves a well-formed request (and chunked bodies).
    let ok = raw(
        p.proxy,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok:?}");
    assert_eq!(blue.hits(), 1);
    p.stop().await;
}

#[tokio::test]
async fn oversized_heads_are_431() {
    let blue = TestUpstream::start("blue").await;
    let p = start(blue.addr, "max_header_bytes = 16384\n").await;
    let mut many = b"GET /echo HTTP/1.1\r\nHost: a\r\n".to_vec();
    for i in 0..101 {
        many.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let status = raw(p.proxy, &many).await;
    assert!(
        status.starts_with("HTTP/1.1 431"),
        "101 headers: {status:?}"
    );
    let mut big = b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 40_000));
    big.extend_from_slice(b"\r\n\r\n");
    let status = raw(p.proxy, &big).await;
    assert!(
        status.starts_with("HTTP/1.1 431"),
        "40 kB header: {status:?}"
    );
    assert_eq!(blue.hits(), 0);
    p.stop().await;
}

/// With the default head limit (64 KiB) a request target too long to fit is 414, not 431
/// (RFC 9112 3), and the connection closes.
#[tokio::test]
async fn a_request_line_over_the_head_limit_is_414() {
    let blue = TestUpstream::start("blue").await;
    let p = start(blue.addr, "").await;
    let mut long = b"GET /".to_vec();
    long.extend(std::iter::repeat_n(b'a', 70_000));
    long.extend_from_slice(b" HTTP/1.1\r\nHost: a\r\n\r\n");
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    s.write_all(&long).await.expect("write");
    let (answer, closed) = read_all(&mut s, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 414"), "{answer:?}");
    assert!(answer.contains("connection: close") && closed, "{answer:?}");
    assert_eq!(blue.hits(), 0);
    p.stop().await;
}

#[tokio::test]
async fn slowloris_is_closed_at_the_header_read_timeout() {
    let blue = TestUpstream::start("blue").await;
    let p = start(blue.addr, "").await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    let head = b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let began = tokio::time::Instant::now();
    let mut closed = false;
    for b in head.iter() {
        if s.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        // A read that returns (EOF or a 408) means the proxy gave up on us.
        let mut buf = [0u8; 256];
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            let _ = r;
            closed = true;
            break;
        }
    }
    let took = began.elapsed();
    assert!(closed, "the proxy waited for the whole trickled head");
    // The whole trickled head takes 16 s or more.
    assert!(
        took < Duration::from_secs(8),
        "closed only after {took:?} (header_read_timeout is 1s)"
    );
    assert_eq!(blue.hits(), 0);
    p.stop().await;
}

/// An upstream that records how each request body ended.
async fn body_recorder() -> (SocketAddr, Arc<Mutex<Vec<Result<usize, String>>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let seen = seen2.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let r = match req.into_body().collect().await {
                                Ok(b) => Ok(b.to_bytes().len()),
                                Err(e) => Err(e.to_string()),
                            };
                            seen.lock().expect("lock").push(r);
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(Bytes::from_static(b"done\n")),
                            ))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn a_stalled_body_is_ended_at_the_body_idle_timeout() {
    let (up, seen) = body_recorder().await;
    let p = start(up, "").await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .expect("write");
    // Keep sending a byte now and then, but slower than body_idle_timeout (1s)... once.
    tokio::time::sleep(Duration::from_millis(400)).await;
    // (On a loaded machine the proxy may have given up already and closed: not an error.)
    let _ = s.write_all(b"a").await;
    let (text, _) = tokio::time::timeout(
        Duration::from_secs(6),
        read_all(&mut s, Duration::from_secs(5)),
    )
    .await
    .expect("the proxy kept the stalled request open");
    assert!(text.starts_with("HTTP/1.1 408"), "{text:?}");
    let ok = eventually(10, || async { !seen.lock().expect("lock").is_empty() }).await;
    assert!(ok, "the upstream never saw the request end");
    let first = seen.lock().expect("lock")[0].clone();
    assert!(first.is_err(), "the upstream saw a clean body: {first:?}");
    // Not an upstream failure: the client was slow.
    let st = p.service_status("api").await;
    let up0 = &st["colors"]["blue"]["upstreams"][0];
    assert_eq!(up0["error_rate"].as_f64(), Some(0.0), "{st}");
    p.stop().await;
}

#[tokio::test]
async fn a_steady_slow_body_is_not_cut() {
    let (up, seen) = body_recorder().await;
    let p = start(up, "body_idle_timeout = \"3s\"\n").await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 8\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("write");
    // 8 bytes over 4 s: longer than the idle timeout (3 s) in total, never idle half as long.
    for b in b"abcdefgh" {
        s.write_all(&[*b]).await.expect("write");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (text, _) = read_all(&mut s, Duration::from_secs(10)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    assert_eq!(seen.lock().expect("lock").first().cloned(), Some(Ok(8)));
    p.stop().await;
}

/// The limit counts connections, not listeners: with a second listener (preview) waiting for
/// clients, both slots still go to the clients of the first (an accept loop used to hold a
/// slot while it waited).
#[tokio::test]
async fn max_connections_holds_the_next_connection_until_one_closes() {
    let blue = TestUpstream::start("blue").await;
    let p = start(
        blue.addr,
        "max_connections = 2\nheader_read_timeout = \"10s\"\npreview_listen = \"127.0.0.1:0\"\n",
    )
    .await;
    let req = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(p.proxy).await.expect("connect");
        s.write_all(req).await.expect("write");
        let text = read_one_response(&mut s).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
        open.push(s);
    }
    let mut third = TcpStream::connect(p.proxy).await.expect("connect");
    third.write_all(req).await.expect("write");
    let (text, _) = read_all(&mut third, Duration::from_millis(500)).await;
    assert_eq!(
        text, "",
        "a third connection was served past max_connections = 2"
    );
    drop(open.pop());
    let text = read_one_response(&mut third).await;
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "not served once a slot freed: {text:?}"
    );
    assert_eq!(blue.hits(), 3);
    p.stop().await;
}

/// An upstream that answers every request with `answer` and closes.
async fn canned(answer: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                h.fetch_add(1, Ordering::SeqCst);
                let _ = s.write_all(answer).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (addr, hits)
}

#[tokio::test]
async fn ambiguous_upstream_framing_is_502() {
    for (name, answer) in [
        (
            "CL+TE",
            &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"[..],
        ),
        (
            "two CLs",
            &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"[..],
        ),
    ] {
        let (up, hits) = canned(answer).await;
        let p = start(up, "").await;
        let (status, body) = p.get("/x").await;
        assert_eq!(status, 502, "{name}: {body}");
        assert!(!body.contains("127.0.0.1"), "{name} leaks an address: {body}");
        assert_eq!(hits.load(Ordering::SeqCst), 1, "{name}");
        p.stop().await;
    }
}

/// GETs `/x` through the proxy: the status, then the body as the client collects it (`None` if
/// it was still waiting after 10 s) and how long that took after the head.
async fn get_head_then_body(
    proxy: SocketAddr,
) -> (
    u16,
    Option<Result<http_body_util::Collected<Bytes>, hyper::Error>>,
    Duration,
) {
    let req = http::Request::builder()
        .uri(format!("http://{proxy}/x"))
        .body(http_body_util::Full::new(Bytes::new()))
        .expect("req");
    let resp = tokio::time::timeout(Duration::from_secs(5), client().request(req))
        .await
        .expect("timeout")
        .expect("response head");
    let status = resp.status().as_u16();
    let began = tokio::time::Instant::now();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .ok();
    (status, body, began.elapsed())
}

#[tokio::test]
async fn a_truncated_upstream_body_aborts_the_client_response() {
    let (up, _) =
        canned(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly twenty bytes...").await;
    let p = start(up, "").await;
    let (status, body, _) = get_head_then_body(p.proxy).await;
    assert_eq!(status, 200);
    let body = body.expect("the client was left waiting for the rest of the body");
    assert!(
        body.is_err(),
        "a cut-short body looked complete to the client"
    );

    // Chunked toward an HTTP/1.1 client that cannot see a length: the last chunk never comes.
    let (up, _) =
        canned(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n").await;
    let p2 = start(up, "").await;
    let mut s = TcpStream::connect(p2.proxy).await.expect("connect");
    s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let (text, closed) = read_all(&mut s, Duration::from_secs(10)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    assert!(closed, "connection left open after a broken body");
    assert!(
        !text.ends_with("0\r\n\r\n"),
        "the proxy completed a broken body: {text:?}"
    );
    p.stop().await;
    p2.stop().await;
}

/// Writes `data` in pieces of `step` bytes with a pause between (each piece its own read on the
/// proxy's side), stopping at the first write error: the proxy may have answered and closed.
async fn trickle(s: &mut TcpStream, data: &[u8], step: usize) {
    for piece in data.chunks(step) {
        if s.write_all(piece).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Sends `data` (in pieces of `step` bytes, or at once for 0) on a fresh connection and checks
/// the proxy answered one 400 and closed, without a request reaching the upstream: neither the
/// ambiguous one nor the pipelined `/smuggled` after it.
async fn assert_refused(name: &str, data: &[u8], step: usize, reason: &str) {
    let blue = TestUpstream::start("blue").await;
    let p = start(blue.addr, SLOW_HEADS).await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    if step == 0 {
        s.write_all(data).await.expect("write");
    } else {
        trickle(&mut s, data, step).await;
    }
    // The proxy closes after its 400: the quiet period only bounds a hang.
    let (text, closed) = read_all(&mut s, Duration::from_secs(10)).await;
    assert!(text.starts_with("HTTP/1.1 400"), "{name}: {text:?}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{name}: {text:?}");
    assert!(
        closed,
        "{name}: connection kept open after a refused request"
    );
    assert_eq!(blue.hits(), 0, "{name}: a request reached the upstream");
    let metrics = metrics_text(&p).await;
    let line = format!("switchyard_rejected_requests_total{{reason=\"{reason}\"}} 1");
    assert!(metrics.contains(&line), "{name}: {metrics}");
    p.stop().await;
}

async fn metrics_text(p: &TestProxy) -> String {
    let (status, body) = get(p.admin, "/metrics").await;
    assert_eq!(status, 200);
    body
}

/// A lenient server resolves Content-Length + Transfer-Encoding in favour of chunked (hyper
/// does); the proxy refuses the request instead, in either order, however the bytes arrive.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_400() {
    for (name, head) in [
        (
            "CL then TE",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        ),
        (
            "TE then CL",
            "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        ),
    ] {
        let data = format!(
            "POST /echo HTTP/1.1\r\nHost: a\r\n{head}\r\n3\r\nabc\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
        );
        assert_refused(name, data.as_bytes(), 0, "cl_te").await;
        assert_refused(
            &format!("{name}, one byte a read"),
            data.as_bytes(),
            1,
            "cl_te",
        )
        .await;
        // The second framing header split across reads.
        let cut = data.find("\r\n\r\n").expect("head end") - 6;
        let p = {
            let blue = TestUpstream::start("blue").await;
            let p = start(blue.addr, "").await;
            let mut s = TcpStream::connect(p.proxy).await.expect("connect");
            s.write_all(&data.as_bytes()[..cut]).await.expect("write");
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = s.write_all(&data.as_bytes()[cut..]).await;
            let (text, closed) = read_all(&mut s, Duration::from_secs(10)).await;
            assert!(text.starts_with("HTTP/1.1 400"), "{name}, split: {text:?}");
            assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{name}: {text:?}");
            assert!(closed, "{name}, split");
            assert_eq!(blue.hits(), 0, "{name}, split");
            p
        };
        let metrics = metrics_text(&p).await;
        assert!(
            metrics.contains("switchyard_rejected_requests_total{reason=\"cl_te\"} 1"),
            "{metrics}"
        );
        p.stop().await;
    }
}

/// httparse accepts a bare LF as a line end; the proxy refuses it wherever it is.
#[tokio::test]
async fn bare_lf_heads_are_400() {
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    for (name, head) in [
        (
            "request line",
            "GET /echo HTTP/1.1\nHost: a\r\nX-A: b\r\n\r\n",
        ),
        (
            "header line",
            "GET /echo HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n",
        ),
        (
            "blank line only",
            "GET /echo HTTP/1.1\r\nHost: a\r\nX-A: b\r\n\n",
        ),
        ("every line", "GET /echo HTTP/1.1\nHost: a\nX-A: b\n\n"),
    ] {
        let data = format!("{head}{smuggled}");
        assert_refused(name, data.as_bytes(), 0, "bare_lf").await;
        assert_refused(
            &format!("{name}, one byte a read"),
            data.as_bytes(),
            1,
            "bare_lf",
        )
        .await;
        assert_refused(
            &format!("{name}, three bytes a read"),
            data.as_bytes(),
            3,
            "bare_lf",
        )
        .await;
    }
    // After a valid request on the same connection: the first is served, the second refused.
    let blue = TestUpstream::start("blue").await;
    let p = start(blue.addr, "").await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    s.write_all(
        format!("GET /echo HTTP/1.1\r\nHost: a\r\n\r\nGET /echo HTTP/1.1\r\nHost: a\nX: b\r\n\r\n{smuggled}")
            .as_bytes(),
    )
    .await
    .expect("write");
    let (text, closed) = read_all(&mut s, Duration::from_secs(10)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 2, "{text:?}");
    assert!(text.contains("HTTP/1.1 400"), "{text:?}");
    assert!(closed);
    assert_eq!(blue.hits(), 1);
    let metrics = metrics_text(&p).await;
    assert!(
        metrics.contains("switchyard_rejected_requests_total{reason=\"bare_lf\"} 1"),
        "{metrics}"
    );
    p.stop().await;
}

/// Bodies are framed exactly: LF bytes inside a Content-Length body or a chunked body (with
/// extensions and trailers) are data, and the next request is read in step.
#[tokio::test]
async fn requests_stay_in_step_across_bodies_on_a_keep_alive_connection() {
    let blue = TestUpstream::start("blue").await;
    let p = start(blue.addr, SLOW_HEADS).await;
    let data = b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n\r\nab\ncd\n\nef\r\n\n\
POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\na\nb\n\r\n3\r\n\n\n\n\r\n0\r\nX-Trailer: t\r\n\r\n\
GET /echo HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    for step in [0, 1, 7] {
        let mut s = TcpStream::connect(p.proxy).await.expect("connect");
        if step == 0 {
            s.write_all(data).await.expect("write");
        } else {
            trickle(&mut s, data, step).await;
        }
        // The last request asks to close: the quiet period only bounds a hang.
        let (text, _) = read_all(&mut s, Duration::from_secs(10)).await;
        assert_eq!(
            text.matches("HTTP/1.1 200").count(),
            3,
            "split every {step}: {text:?}"
        );
        assert!(text.contains("\"body_len\":12"), "{text:?}");
        assert!(text.contains("\"body_len\":7"), "{text:?}");
    }
    assert_eq!(blue.hits(), 9);
    p.stop().await;
}

/// header_read_timeout also bounds the wait for the next request on an idle keep-alive
/// connection.
#[tokio::test]
async fn idle_keep_alive_connections_close_at_the_header_read_timeout() {
    let blue = TestUpstream::start("blue").await;
    let p = start(blue.addr, "").await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let (text, closed) = read_all(&mut s, Duration::from_secs(4)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    assert!(
        closed,
        "idle keep-alive connection outlived header_read_timeout (1s)"
    );
    p.stop().await;
}

/// The timeout counts from the last request, not from the connection's start: a client that
/// sends a request every 400 ms keeps its connection well past header_read_timeout (3 s here:
/// seconds more than a pause between requests, however loaded the machine), and loses it once
/// it stops (the timer is moved lazily, so this is its behaviour to keep).
#[tokio::test]
async fn a_busy_keep_alive_connection_outlives_the_header_read_timeout() {
    let blue = TestUpstream::start("blue").await;
    let p = start(blue.addr, "header_read_timeout = \"3s\"\n").await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    for i in 0..10 {
        s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("write");
        let text = read_one_response(&mut s).await;
        assert!(text.starts_with("HTTP/1.1 200"), "request {i}: {text:?}");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let (_, closed) = read_all(&mut s, Duration::from_secs(8)).await;
    assert!(closed, "the idle connection outlived header_read_timeout");
    assert_eq!(blue.hits(), 10);
    p.stop().await;
}

/// One whole response (head and `Content-Length` body) off a keep-alive connection; what
/// arrived when the connection closed or 10 s passed otherwise.
async fn read_one_response(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())
                        .flatten()
                })
                .unwrap_or(0);
            if out.len() >= end + 4 + length {
                return text;
            }
        }
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => return text,
        }
    }
}

/// An upstream that sends part of a body and then goes quiet (the connection stays open): the
/// client's response is aborted at `body_idle_timeout` (1s here) instead of hanging.
#[tokio::test]
async fn a_stalled_upstream_body_is_aborted_at_the_body_idle_timeout() {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let up = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nten bytes.")
                    .await;
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    let p = start(up, "").await;
    let (status, body, waited) = get_head_then_body(p.proxy).await;
    assert_eq!(status, 200);
    let body = body.expect("the client was left waiting on a stalled upstream");
    assert!(body.is_err(), "a stalled body looked complete");
    assert!(
        waited >= Duration::from_millis(800),
        "cut before the idle timeout: {waited:?}"
    );
    p.stop().await;
}

/// A chunk-size line takes whitespace only before an extension (RFC 9112 7.1: `chunk-size
/// [BWS ";" ...]`): `5 ` alone is refused, toward the proxy (400) and from an upstream (the
/// broken body is cut, never passed on as complete), while `5 ;ext` and `5;ext` are read.
#[tokio::test]
async fn a_chunk_size_with_whitespace_and_no_extension_is_refused() {
    let blue = TestUpstream::start("blue").await;
    let p = start(blue.addr, "").await;
    for (line, want) in [
        ("5 ", "HTTP/1.1 400"),
        ("5\t", "HTTP/1.1 400"),
        ("5 ;ext", "HTTP/1.1 200"),
        ("5;ext=1", "HTTP/1.1 200"),
    ] {
        let data = format!(
            "POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{line}\r\nhello\r\n0\r\n\r\n"
        );
        let status = raw(p.proxy, data.as_bytes()).await;
        assert!(status.starts_with(want), "{line:?}: got {status:?}");
    }
    p.stop().await;

    for (line, good) in [("5 ", false), ("5 ;ext", true)] {
        let answer: &'static [u8] = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{line}\r\nhello\r\n0\r\n\r\n"
        )
        .into_bytes()
        .leak();
        let (up, _) = canned(answer).await;
        let p = start(up, "").await;
        let mut s = TcpStream::connect(p.proxy).await.expect("connect");
        s.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let (text, _) = read_all(&mut s, Duration::from_secs(10)).await;
        // The head is on its way before the body is read (as with a cut-short body): what
        // the client must not get is a complete body from a broken one.
        assert!(text.starts_with("HTTP/1.1 200"), "{line:?}: {text:?}");
        assert_eq!(
            text.ends_with("5\r\nhello\r\n0\r\n\r\n"),
            good,
            "{line:?}: {text:?}"
        );
        p.stop().await;
    }
}

/// A request body whose chunked framing is broken (a size line with trailing whitespace, one
/// that is not hex, a size past 15 significant hex digits, a size line still unended past its
/// limit, data not followed by CRLF, an extension off its grammar) is 400 with a body that says so, and the connection closes;
/// a body the client stops sending (it shuts its side down mid-body) keeps its own answer. The
/// same toward an HTTP/1.1 pool and an h2 one (whose client turns the body's error into a reset
/// of its own). Each broken framing is counted in
/// `switchyard_rejected_requests_total{reason="chunked"}` (at 0 from the start); the body cut
/// short is not.
#[tokio::test]
async fn a_malformed_chunked_request_body_is_400_saying_the_framing_is_invalid() {
    let blue = TestUpstream::start("blue").await;
    let green = dead_addr().await;
    let head = "POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
    // No CRLF: still no end past MAX_CHUNK_LINE (4096).
    let unended = format!("5;{}", "a".repeat(5000));
    for h2 in [false, true] {
        let p = TestProxy::start(&format!(
            "{PROXY}body_idle_timeout = \"5s\"\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{}\"]{} }}\ngreen = {{ upstreams = [\"{green}\"] }}\n",
            blue.addr,
            if h2 { ", protocol = \"h2\"" } else { "" }
        ))
        .await;
        let chunked =
            |n: usize| format!("switchyard_rejected_requests_total{{reason=\"chunked\"}} {n}\n");
        let metrics = metrics_text(&p).await;
        assert!(metrics.contains(&chunked(0)), "h2 {h2}: {metrics}");
        let bodies = [
            "5 \r\nhello\r\n0\r\n\r\n",
            "zz\r\nhello\r\n0\r\n\r\n",
            "10000000000000005\r\nhello\r\n0\r\n\r\n",
            &unended,
            "5\r\nhelloXX\r\n0\r\n\r\n",
            // Extensions off their grammar (RFC 9112 7.1.1): an unended quoted-string, no name.
            "5;a=\"b\r\nhello\r\n0\r\n\r\n",
            "5;=b\r\nhello\r\n0\r\n\r\n",
        ];
        for body in bodies {
            let mut s = TcpStream::connect(p.proxy).await.expect("connect");
            s.write_all(format!("{head}{body}").as_bytes())
                .await
                .expect("write");
            let (text, closed) = read_all(&mut s, Duration::from_secs(5)).await;
            let short = &body[..body.len().min(24)];
            assert!(
                text.starts_with("HTTP/1.1 400"),
                "h2 {h2}, {short:?}: {text:?}"
            );
            assert!(
                text.ends_with("\r\n\r\ninvalid chunked framing in the request body\n"),
                "h2 {h2}, {short:?}: {text:?}"
            );
            assert!(closed, "h2 {h2}, {short:?}: the connection stayed open");
        }

        // Cut short: the client sends part of a chunk, then shuts its side down.
        let mut s = TcpStream::connect(p.proxy).await.expect("connect");
        s.write_all(format!("{head}a\r\nhello").as_bytes())
            .await
            .expect("write");
        s.shutdown().await.expect("shutdown");
        let (text, _) = read_all(&mut s, Duration::from_secs(5)).await;
        assert!(text.starts_with("HTTP/1.1 400"), "h2 {h2}: {text:?}");
        assert!(
            text.ends_with("\r\n\r\nrequest body was not received\n"),
            "h2 {h2}: {text:?}"
        );
        let metrics = metrics_text(&p).await;
        assert!(
            metrics.contains(&chunked(bodies.len())),
            "h2 {h2}: {metrics}"
        );
        p.stop().await;
    }
}
