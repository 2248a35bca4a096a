//! The upstream connection pool: keep-alive reuse, and no failed request when an upstream closes
//! idle connections behind the pool's back.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};

/// Reads the next request head off `s` (what was read past it stays in `buf`), lowercased;
/// `None` once the proxy closes the connection.
async fn next_head(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    use tokio::io::AsyncReadExt;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            buf.drain(..end + 4);
            return Some(head);
        }
        let mut chunk = [0u8; 65536];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Reads and drops the body `head` announces; false if the connection ends first.
async fn skip_body(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>, head: &str) -> bool {
    use tokio::io::AsyncReadExt;
    let len = content_length(head);
    while buf.len() < len {
        let mut chunk = [0u8; 65536];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf.drain(..len);
    true
}

/// An HTTP/1.1 upstream that counts connections and closes idle keep-alive connections after
/// `idle` without telling anyone (as many servers do).
async fn counting_upstream(idle: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = service_fn(|_req| async {
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                        b"ok\n",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(idle)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, conns)
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let (up, conns) = counting_upstream(Duration::from_secs(30)).await;
    let p = TestProxy::start(&service("api", &[up], &[up], "")).await;
    for _ in 0..20 {
        assert_eq!(p.get("/x").await, (200, "ok\n".to_string()));
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "keep-alive connection not reused"
    );
    p.stop().await;
}

#[tokio::test]
async fn upstream_closing_idle_connections_fails_no_request() {
    let (up, conns) = counting_upstream(Duration::from_millis(100)).await;
    let p = TestProxy::start(&service("api", &[up], &[up], "")).await;
    for i in 0..6 {
        let method = if i % 2 == 0 { "GET" } else { "POST" };
        let (s, b) = request(p.proxy, method, "/x", &[], Bytes::from_static(b"body")).await;
        assert_eq!((s, b.as_str()), (200, "ok\n"), "request {i} ({method})");
        // Longer than the upstream's idle timeout: the pooled connection is gone by the next one.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        conns.load(Ordering::SeqCst) >= 2,
        "the upstream never closed a connection"
    );
    p.stop().await;
}

#[tokio::test]
async fn concurrent_requests_open_several_connections_and_keep_them() {
    let (up, conns) = counting_upstream(Duration::from_secs(30)).await;
    let p = TestProxy::start(&service("api", &[up], &[up], "")).await;
    for _ in 0..3 {
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let addr = p.proxy;
            tasks.push(tokio::spawn(async move { get(addr, "/x").await }));
        }
        for t in tasks {
            assert_eq!(t.await.expect("join"), (200, "ok\n".to_string()));
        }
    }
    let n = conns.load(Ordering::SeqCst);
    assert!(
        (1..=8).contains(&n),
        "{n} upstream connections for 8 concurrent clients"
    );
    p.stop().await;
}

/// `runtime = "per_worker"`: two current-thread runtimes accept on `SO_REUSEPORT` sockets of
/// the same address; every request is served, and shutdown stops both.
#[tokio::test]
async fn per_worker_runtimes_serve_on_one_address() {
    let (up, _) = counting_upstream(Duration::from_secs(30)).await;
    let body = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nworkers = 2\nruntime = \"per_worker\"\nshutdown_grace = \"2s\"\n{}",
        service("api", &[up], &[up], "")
    );
    let p = TestProxy::start(&body).await;
    for _ in 0..40 {
        // A fresh connection each time, so the kernel spreads them over both sockets.
        assert_eq!(
            try_get(p.proxy, "/x").await,
            Some((200, "ok\n".to_string()))
        );
    }
    let addr = p.proxy;
    tokio::time::timeout(Duration::from_secs(10), p.stop())
        .await
        .expect("shutdown of both workers");
    assert_eq!(
        try_get(addr, "/x").await,
        None,
        "still listening after shutdown"
    );
}

/// An upstream whose first connection answers one request and then, on the next request it
/// reads, closes without answering (as if it had timed the connection out just then). Every
/// later connection answers normally. Returns the address and the number of request heads read.
async fn drops_second_request_on_first_connection() -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let heads = Arc::new(AtomicUsize::new(0));
    let h = heads.clone();
    tokio::spawn(async move {
        let mut nth = 0;
        while let Ok((mut s, _)) = listener.accept().await {
            nth += 1;
            let first = nth == 1;
            let h = h.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut served = 0;
                while let Some(head) = next_head(&mut s, &mut buf).await {
                    if !skip_body(&mut s, &mut buf, &head).await {
                        return;
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    if first && served == 1 {
                        return; // Closes without an answer.
                    }
                    served += 1;
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
                    if s.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, heads)
}

/// A pooled connection that dies under a request: a GET (idempotent, no body) is sent again on
/// a fresh connection; a POST is not (the upstream may have acted on it) and fails with 502.
#[tokio::test]
async fn a_request_lost_on_a_pooled_connection_is_retried_only_if_idempotent() {
    let (up, heads) = drops_second_request_on_first_connection().await;
    let p = TestProxy::start(&service("api", &[up], &[up], "")).await;
    assert_eq!(p.get("/first").await, (200, "ok\n".to_string()));
    assert_eq!(p.get("/again").await, (200, "ok\n".to_string()));
    assert_eq!(heads.load(Ordering::SeqCst), 3, "GET was not sent again");
    p.stop().await;

    // Without a body (only the method says no) and with one.
    for body in [Bytes::new(), Bytes::from_static(b"x")] {
        let (up, heads) = drops_second_request_on_first_connection().await;
        let p = TestProxy::start(&service("api", &[up], &[up], "")).await;
        assert_eq!(p.get("/first").await, (200, "ok\n".to_string()));
        let (status, _) = request(p.proxy, "POST", "/order", &[], body.clone()).await;
        assert_eq!(
            status, 502,
            "a POST lost on a pooled connection was retried"
        );
        assert_eq!(
            heads.load(Ordering::SeqCst),
            2,
            "the POST reached the upstream twice"
        );
        p.stop().await;
    }
}

/// A raw HTTP/1.1 upstream answering by path with responses hyper's client would have framed
/// for us: no body after HEAD, 204 and 304 (whatever their framing fields say), a 100
/// Continue first, chunked with trailers, and an
/// HTTP/1.0 body that ends when the connection closes. Counts connections.
async fn framing_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let conns = Arc::new(AtomicUsize::new(0));
    let c = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(head) = next_head(&mut s, &mut buf).await {
                    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                    if path == "/big" || path == "/big-chunked" {
                        // 3 MiB of a pattern, by length or in 64 KiB chunks.
                        let body: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
                        let mut out = Vec::new();
                        if path == "/big" {
                            out.extend_from_slice(
                                format!(
                                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                                    body.len()
                                )
                                .as_bytes(),
                            );
                            out.extend_from_slice(&body);
                        } else {
                            out.extend_from_slice(
                                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                            );
                            for chunk in body.chunks(64 << 10) {
                                out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                                out.extend_from_slice(chunk);
                                out.extend_from_slice(b"\r\n");
                            }
                            out.extend_from_slice(b"0\r\n\r\n");
                        }
                        if s.write_all(&out).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let answer: &[u8] = match path.as_str() {
                        "/head" => b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
                        // What the GET would carry; a HEAD answer ends at its empty line.
                        "/head-te" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                        "/204-te" => b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: gzip\r\n\r\n",
                        "/304-both" => b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
                        "/304-list" => b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5, 6\r\n\r\n",
                        // An empty list element is no coding (RFC 9110 5.6.1).
                        "/chunked-comma" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked,\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                        "/204" => b"HTTP/1.1 204 No Content\r\n\r\n",
                        "/304" => b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
                        "/continue" => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                        "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\n",
                        "/close" => b"HTTP/1.0 200 OK\r\n\r\nuntil close",
                        _ => b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n",
                    };
                    if s.write_all(answer).await.is_err() || path == "/close" {
                        return;
                    }
                }
            });
        }
    });
    (addr, conns)
}

#[tokio::test]
async fn upstream_responses_are_framed_and_their_connections_reused() {
    let (up, conns) = framing_upstream().await;
    let p = TestProxy::start(&service("api", &[up], &[up], "")).await;
    let none = Bytes::new();
    assert_eq!(
        request(p.proxy, "HEAD", "/head", &[], none.clone()).await,
        (200, String::new())
    );
    assert_eq!(p.get("/204").await, (204, String::new()));
    assert_eq!(p.get("/304").await, (304, String::new()));
    assert_eq!(
        request(p.proxy, "HEAD", "/head-te", &[], none.clone()).await,
        (200, String::new())
    );
    assert_eq!(p.get("/204-te").await, (204, String::new()));
    assert_eq!(p.get("/304-both").await, (304, String::new()));
    assert_eq!(p.get("/304-list").await, (304, String::new()));
    assert_eq!(p.get("/chunked-comma").await, (200, "ok".to_string()));
    assert_eq!(p.get("/continue").await, (200, "ok".to_string()));
    assert_eq!(p.get("/chunked").await, (200, "hello world".to_string()));
    // Large bodies (the client's reads grow past their first 8 KiB) arrive byte for byte.
    let expected: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    for path in ["/big", "/big-chunked"] {
        let (status, body) = request_bytes(p.proxy, "GET", path, &[], Bytes::new()).await;
        assert_eq!(status, 200, "{path}");
        assert!(
            body == expected,
            "{path}: {} bytes, not the upstream's",
            body.len()
        );
    }
    assert_eq!(p.get("/x").await, (200, "ok\n".to_string()));
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "every one of those should have left the connection reusable"
    );
    assert_eq!(p.get("/close").await, (200, "until close".to_string()));
    assert_eq!(p.get("/x").await, (200, "ok\n".to_string()));
    assert_eq!(
        conns.load(Ordering::SeqCst),
        2,
        "a body ended by close cannot leave its connection in the pool"
    );
    p.stop().await;
}

/// A raw upstream that numbers its connections and answers `conn=<n>`, logs when the proxy
/// closes a connection, and on `/duplex` answers 8 MiB at once while it reads the request's
/// 8 MiB body concurrently (logging whether the whole upload arrived).
async fn logging_upstream() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let log = Arc::new(Mutex::new(Vec::new()));
    let l2 = log.clone();
    tokio::spawn(async move {
        let mut id = 0;
        while let Ok((mut s, _)) = listener.accept().await {
            id += 1;
            let (me, log) = (id, l2.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let Some(head) = next_head(&mut s, &mut buf).await else {
                        log.lock().expect("log").push(format!("{me} closed"));
                        return;
                    };
                    let cl = content_length(&head);
                    if head.starts_with("post /duplex") {
                        let (mut r, mut w) = s.into_split();
                        let have = buf.len();
                        let reader = tokio::spawn(async move {
                            let mut left = cl - have.min(cl);
                            let mut c = vec![0u8; 65536];
                            while left > 0 {
                                match r.read(&mut c).await {
                                    Ok(0) | Err(_) => return false,
                                    Ok(n) => left -= n.min(left),
                                }
                            }
                            true
                        });
                        let body = vec![b'x'; 8 << 20];
                        let head =
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                        let _ = w.write_all(head.as_bytes()).await;
                        let _ = w.write_all(&body).await;
                        let complete = reader.await.unwrap_or(false);
                        log.lock()
                            .expect("log")
                            .push(format!("{me} upload complete={complete}"));
                        return;
                    }
                    if head.starts_with("post /refuse") {
                        // Refuses the upload at once, chunked, then reads what comes until the
                        // proxy closes (never closing first: the upload is left waiting).
                        let refusal = b"HTTP/1.1 413 Payload Too Large\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n6\r\nearly\n\r\n0\r\n\r\n";
                        if s.write_all(refusal).await.is_err() {
                            return;
                        }
                        let mut c = vec![0u8; 65536];
                        while let Ok(n) = s.read(&mut c).await {
                            if n == 0 {
                                break;
                            }
                        }
                        log.lock().expect("log").push(format!("{me} closed"));
                        return;
                    }
                    let body = format!("conn={me}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, log)
}

fn pool_config(up: SocketAddr, extra: &str) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\n{extra}{}",
        service("api", &[up], &[up], "")
    )
}

#[tokio::test]
async fn max_idle_zero_turns_reuse_off() {
    let (up, _) = logging_upstream().await;
    let p = TestProxy::start(&pool_config(up, "upstream_max_idle = 0\n")).await;
    assert_eq!(p.get("/x").await, (200, "conn=1".to_string()));
    assert_eq!(p.get("/x").await, (200, "conn=2".to_string()));
    p.stop().await;
}

/// Idle connections past `upstream_idle_timeout` are closed even when no request comes to take
/// them (the idle color after a flip).
#[tokio::test]
async fn idle_upstream_connections_are_closed_after_the_idle_timeout() {
    let (up, log) = logging_upstream().await;
    let p = TestProxy::start(&pool_config(up, "upstream_idle_timeout = \"200ms\"\n")).await;
    assert_eq!(p.get("/x").await, (200, "conn=1".to_string()));
    let closed = eventually(10, || async {
        log.lock().expect("log").iter().any(|e| e == "1 closed")
    })
    .await;
    assert!(
        closed,
        "idle connection still open: {:?}",
        log.lock().expect("log")
    );
    p.stop().await;
}

/// An upstream that refuses an upload at once with a chunked answer, while the client has sent
/// only part of its body and waits: the client gets the whole answer, its last chunk included,
/// at once, not when the stalled upload ends (`body_idle_timeout`).
#[tokio::test]
async fn a_chunked_early_answer_ends_while_the_upload_waits() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up, _) = logging_upstream().await;
    let p = TestProxy::start(&pool_config(up, "body_idle_timeout = \"60s\"\n")).await;
    let mut s = tokio::net::TcpStream::connect(p.proxy)
        .await
        .expect("connect");
    s.write_all(b"POST /refuse HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\npart")
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut c = [0u8; 4096];
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while !got.ends_with(b"0\r\n\r\n") {
            match s.read(&mut c).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => got.extend_from_slice(&c[..n]),
            }
        }
        true
    })
    .await;
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(
        matches!(ended, Ok(true)),
        "the answer did not end while the upload waited: {text:?}"
    );
    assert!(text.starts_with("HTTP/1.1 413"), "{text:?}");
    p.stop().await;
}

/// A client that sends its whole 8 MiB body before reading; the upstream answers 8 MiB at once
/// while it reads. The proxy must keep uploading while the client is not reading, and finish
/// the upload even after the response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_response_does_not_stall_or_cut_the_upload() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (up, log) = logging_upstream().await;
    let p = TestProxy::start(&pool_config(up, "")).await;
    let mut s = tokio::net::TcpStream::connect(p.proxy)
        .await
        .expect("connect");
    let n = 8usize << 20;
    let head = format!("POST /duplex HTTP/1.1\r\nHost: a\r\nContent-Length: {n}\r\n\r\n");
    s.write_all(head.as_bytes()).await.expect("write head");
    tokio::time::timeout(Duration::from_secs(10), s.write_all(&vec![b'y'; n]))
        .await
        .expect("upload stalled: the client is blocked writing")
        .expect("write body");
    let mut got = 0;
    let mut c = vec![0u8; 1 << 16];
    while got < n {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut c)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(k)) => got += k,
            Err(_) => panic!("response stalled after {got} bytes"),
        }
    }
    assert!(got >= n, "response cut at {got} bytes");
    let done = eventually(10, || async {
        log.lock()
            .expect("log")
            .iter()
            .any(|e| e.contains("upload complete="))
    })
    .await;
    assert!(done, "{:?}", log.lock().expect("log"));
    assert!(
        log.lock()
            .expect("log")
            .iter()
            .any(|e| e.ends_with("upload complete=true")),
        "the upstream got a cut upload: {:?}",
        log.lock().expect("log")
    );
    p.stop().await;
}

/// An upstream that answers a request to `/burst` only once `n` of them wait at once (so that
/// `n` connections are in use together), any other at once, counting the connections it
/// accepts and those the proxy closes.
async fn gathering_upstream(n: usize) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (opened, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (o, c) = (opened.clone(), closed.clone());
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            o.fetch_add(1, Ordering::SeqCst);
            let (c, barrier) = (c.clone(), barrier.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(head) = next_head(&mut s, &mut buf).await {
                    if head.starts_with("get /burst") {
                        barrier.wait().await;
                    }
                    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
                    if s.write_all(ok).await.is_err() {
                        break;
                    }
                }
                c.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (addr, opened, closed)
}

/// `n` requests to `/burst` at once (the upstream answers when all have come), each answered.
async fn burst(p: &TestProxy, n: usize) {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let addr = p.proxy;
        tasks.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(10), get(addr, "/burst")).await
        }));
    }
    for t in tasks {
        let got = t.await.expect("join").expect("answered in time");
        assert_eq!(got, (200, "ok\n".to_string()));
    }
}

/// More answers coming back at once than `upstream_max_idle` (a burst, as from an h2 client
/// with many streams in flight) keep their connections for the requests about to need them:
/// the next burst opens none. The excess is closed by the next reap, down to the cap.
#[tokio::test]
async fn a_burst_beyond_max_idle_reuses_its_connections_and_the_reap_trims_them() {
    const BURST: usize = 8;
    let (up, opened, closed) = gathering_upstream(BURST).await;
    let p = TestProxy::start(&pool_config(up, "upstream_max_idle = 2\n")).await;
    for _ in 0..3 {
        burst(&p, BURST).await;
    }
    assert_eq!(
        opened.load(Ordering::SeqCst),
        BURST,
        "each burst should reuse the connections of the one before"
    );
    // The reap (every 4 s) closes all but `upstream_max_idle` of them.
    let trimmed = eventually(20, || async { closed.load(Ordering::SeqCst) == BURST - 2 }).await;
    assert!(
        trimmed,
        "{} of {BURST} idle connections closed, expected {}",
        closed.load(Ordering::SeqCst),
        BURST - 2
    );
    // And no more than that.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(closed.load(Ordering::SeqCst), BURST - 2);
    p.stop().await;
}

/// Under a steady load with more requests in flight than `upstream_max_idle` (three, cap two),
/// the connections a burst left beyond what the load needs are closed while the load goes on,
/// although it takes each pooled connection in turn.
#[tokio::test]
async fn a_steady_load_keeps_only_the_connections_it_needs_after_a_burst() {
    const BURST: usize = 8;
    let (up, opened, closed) = gathering_upstream(BURST).await;
    let p = TestProxy::start(&pool_config(up, "upstream_max_idle = 2\n")).await;
    burst(&p, BURST).await;
    assert_eq!(opened.load(Ordering::SeqCst), BURST);
    // Three clients, one request at a time each, for up to 14 s (three reaps and more).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..3 {
        let (addr, stop) = (p.proxy, stop.clone());
        load.push(tokio::spawn(async move {
            let mut failed = 0;
            while !stop.load(Ordering::SeqCst) {
                let got = tokio::time::timeout(Duration::from_secs(10), get(addr, "/steady")).await;
                if !matches!(got, Ok((200, _))) {
                    failed += 1;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            failed
        }));
    }
    let trimmed = eventually(14, || async { closed.load(Ordering::SeqCst) >= BURST - 3 }).await;
    stop.store(true, Ordering::SeqCst);
    for l in load {
        assert_eq!(
            l.await.expect("join"),
            0,
            "requests failed under the steady load"
        );
    }
    assert!(
        trimmed,
        "{} of the burst's {BURST} connections closed under a load that needs 3",
        closed.load(Ordering::SeqCst)
    );
    p.stop().await;
}

/// An HTTP/1.1 upstream answering 200 to every request, keeping connections alive; it logs
/// "open" and "closed" for each connection.
async fn open_close_upstream() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let log = Arc::new(Mutex::new(Vec::new()));
    let l2 = log.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let log = l2.clone();
            log.lock().expect("log").push("open".to_string());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while next_head(&mut s, &mut buf).await.is_some() {
                    let resp = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        break;
                    }
                }
                log.lock().expect("log").push("closed".to_string());
            });
        }
    });
    (addr, log)
}

/// The health probes' kept-alive connection to an upstream a reload removes closes within
/// `upstream_idle_timeout`, as the traffic's own connections do: the probe client kept it open
/// for a fixed 30 s. (No request goes to it: the connection is the probes'.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_upstream_s_probe_connection_closes_after_the_idle_timeout() {
    let (up, log) = open_close_upstream().await;
    let (other, _) = open_close_upstream().await;
    let health = "[services.health]\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"1s\"\n\
                  unhealthy_after = 2\nhealthy_after = 1\n";
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\nupstream_idle_timeout = \"500ms\"\n{}",
        service("api", &[other], &[up], health)
    ))
    .await;
    // Probed (a connection open), then taken out of the config.
    assert!(
        eventually(10, || async {
            log.lock().expect("log").iter().any(|e| e == "open")
        })
        .await
    );
    let text = std::fs::read_to_string(&p.config_path).expect("config");
    std::fs::write(
        &p.config_path,
        text.replace(&format!("\"{up}\""), &format!("\"{other}\"")),
    )
    .expect("write");
    let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{v}");
    let closed = eventually(10, || async {
        log.lock().expect("log").iter().any(|e| e == "closed")
    })
    .await;
    assert!(
        closed,
        "the removed upstream's probe connection is still open: {:?}",
        log.lock().expect("log")
    );
    p.stop().await;
}
