//! HTTP/2 flow control between streams that share a connection, and bodiless statuses from an
//! h2 pool: a stream that stalls (its client or its upstream stopped reading) holds at most its
//! own window and never the connection's, on the client side and on an h2 pool's upstream
//! connection; a 204 or 304 reaches an h2 client without a body, whatever its upstream sent; a
//! response head the client said it would not take is a 502 on its stream.

mod common;
use common::*;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PROXY: &str = "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\n";

/// Bytes of `/big` from [`h2_upstream`].
const BIG: usize = 8 * 1024 * 1024;

/// An h2 upstream (the `h2` crate, so that it can send what hyper would not): `/big` is
/// [`BIG`] bytes, sent as the proxy's windows allow and counted in `sent`; `/204` is a 204
/// followed by DATA `hello`; `/304` a 304 with `content-length: 5` followed by DATA `hello`;
/// anything else `ok`.
async fn h2_upstream(sent: Arc<AtomicUsize>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let sent = sent.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(s).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let sent = sent.clone();
                    tokio::spawn(async move {
                        let path = req.uri().path().to_string();
                        let (status, length, body) = match path.as_str() {
                            "/big" => (200, Some(BIG), None),
                            "/204" => (204, None, Some("hello")),
                            "/304" => (304, Some(5), Some("hello")),
                            _ => (200, Some(2), Some("ok")),
                        };
                        let mut head = http::Response::builder().status(status);
                        if let Some(n) = length {
                            head = head.header("content-length", n);
                        }
                        let Ok(head) = head.body(()) else { return };
                        let Ok(mut tx) = respond.send_response(head, false) else {
                            return;
                        };
                        match body {
                            Some(b) => {
                                let _ = tx.send_data(Bytes::from_static(b.as_bytes()), true);
                            }
                            None => send_big(&mut tx, &sent).await,
                        }
                    });
                }
            });
        }
    });
    addr
}

/// [`BIG`] bytes on `tx`, each piece once the peer's windows have room for it.
async fn send_big(tx: &mut h2::SendStream<Bytes>, sent: &AtomicUsize) {
    let piece = Bytes::from(vec![b'x'; 16 * 1024]);
    let mut left = BIG;
    while left > 0 {
        tx.reserve_capacity(left.min(piece.len()));
        let cap = match std::future::poll_fn(|cx| tx.poll_capacity(cx)).await {
            Some(Ok(n)) => n,
            _ => return,
        };
        let n = cap.min(left);
        if n == 0 {
            continue;
        }
        if tx.send_data(piece.slice(..n), n == left).is_err() {
            return;
        }
        sent.fetch_add(n, Ordering::SeqCst);
        left -= n;
    }
}

/// Waits (at most `secs`) until `count` stops moving: three samples 300 ms apart alike.
async fn settled(count: &AtomicUsize, secs: u64) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut last = count.load(Ordering::SeqCst);
    let mut same = 0;
    while same < 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = count.load(Ordering::SeqCst);
        same = if now == last && now > 0 { same + 1 } else { 0 };
        last = now;
    }
    last
}

/// Six HTTP/1.1 clients ask for 8 MiB each from an h2 pool and stop reading (4 KiB receive
/// buffers); their streams share the pool's one upstream connection. Another client is then
/// served from the same upstream (with hyper's 5 MiB connection window the stalled streams'
/// 2 MiB each shut it, and the other client's body waited for `body_idle_timeout`, then was
/// cut and charged to the upstream). A stalled client that reads again, after more than
/// `body_idle_timeout`, gets its whole body: the time the proxy did not read for it is not the
/// upstream's, and no upstream failure is counted.
#[tokio::test]
async fn stalled_readers_of_an_h2_pool_leave_its_other_streams_served() {
    let sent = Arc::new(AtomicUsize::new(0));
    let up = h2_upstream(sent.clone()).await;
    let green = dead_addr().await;
    let p = TestProxy::start(&format!(
        "{PROXY}body_idle_timeout = \"1s\"\n\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{up}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{green}\"], protocol = \"h2\" }}\n"
    ))
    .await;
    let mut stalled = Vec::new();
    for _ in 0..6 {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(4096).expect("rcvbuf");
        let mut s = sock.connect(p.proxy).await.expect("connect");
        s.write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("write");
        stalled.push(s);
    }
    let held = settled(&sent, 20).await;
    assert!(
        held < 6 * BIG,
        "the readers never stalled ({held} bytes sent)"
    );
    let victim = tokio::time::timeout(Duration::from_secs(10), get(p.proxy, "/")).await;
    assert_eq!(
        victim.ok(),
        Some((200, "ok".to_string())),
        "another stream of the upstream connection was stalled ({held} bytes sent to the stalled ones)"
    );
    // One stalled reader reads again: all of its body, not cut at the body_idle_timeout.
    let mut s = stalled.pop().expect("a stalled client");
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            let body = got
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(0, |h| got.len() - h - 4);
            if body >= BIG {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the body did not come in time");
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    assert_eq!(got.len() - head_end, BIG, "the body was cut");
    let metrics = get(p.admin, "/metrics").await.1;
    assert_eq!(upstream_failures(&metrics), 0.0, "{metrics}");
    drop(stalled);
    p.stop().await;
}

/// An HTTP/1.1 upstream: `/stall` never reads its request's body (nor answers); anything else
/// reads its `content-length` bytes and answers `got <n>`.
async fn upload_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                let end = loop {
                    if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        break end + 4;
                    }
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
                if head.starts_with("post /stall") {
                    // Held, never read: the proxy's writes fill the socket and stay stuck.
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    return;
                }
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let mut n = got.len() - end;
                while n < length {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => n += k,
                    }
                }
                let body = format!("got {n}");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// Sends `len` bytes on `tx` (ending the stream after them when `end`), each piece once the
/// proxy's windows have room; returns how many went out before no room came for a second.
async fn upload(tx: &mut h2::SendStream<Bytes>, len: usize, end: bool) -> usize {
    let piece = Bytes::from(vec![b'u'; 16 * 1024]);
    let mut sent = 0;
    while sent < len {
        tx.reserve_capacity((len - sent).min(piece.len()));
        let cap = tokio::time::timeout(
            Duration::from_secs(1),
            std::future::poll_fn(|cx| tx.poll_capacity(cx)),
        )
        .await;
        let n = match cap {
            Ok(Some(Ok(n))) => n.min(len - sent),
            // No room for a second (stalled), or the stream is gone.
            _ => return sent,
        };
        if n == 0 {
            continue;
        }
        if tx
            .send_data(piece.slice(..n), end && sent + n == len)
            .is_err()
        {
            return sent;
        }
        sent += n;
    }
    sent
}

/// One upload on an h2 client connection whose upstream stops reading it holds at most its
/// own stream window: another upload on the same connection still goes through (with equal
/// 1 MiB stream and connection windows, the stalled one shut the connection's window and the
/// other could not send a byte).
#[tokio::test]
async fn a_stalled_upload_leaves_the_other_uploads_of_its_h2_connection_served() {
    let up = upload_upstream().await;
    let green = dead_addr().await;
    let p = TestProxy::start(&format!("{PROXY}{}", service("api", &[up], &[green], ""))).await;
    let tcp = TcpStream::connect(p.proxy).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let done = tokio::spawn(conn);
    let mut c = client.ready().await.expect("ready");
    let len = 1024 * 1024;
    let post = |path: &str, len: usize| {
        http::Request::post(format!("http://a{path}"))
            .header("content-length", len)
            .body(())
            .expect("req")
    };
    let (_stalled_resp, mut stalled) = c
        .send_request(post("/stall", 64 << 20), false)
        .expect("send");
    // Until the proxy stops taking it (64 MiB at most: the upstream's socket buffers and the
    // proxy's window fill long before); its declared length is not reached.
    let held = upload(&mut stalled, 64 << 20, false).await;
    assert!(held < 64 << 20, "the stalled upload never stalled");
    let mut c = c.ready().await.expect("ready");
    let (resp, mut tx) = c.send_request(post("/sink", len), false).expect("send");
    let sent = upload(&mut tx, len, true).await;
    assert_eq!(
        sent, len,
        "the second upload was stalled behind the first ({held} bytes of it taken)"
    );
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("the answer in time")
        .expect("the answer");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(Ok(d)) = body.data().await {
        got.extend_from_slice(&d);
    }
    assert_eq!(got, format!("got {len}").as_bytes());
    drop(stalled);
    done.abort();
    p.stop().await;
}

/// A GET of `path` on `client`: its response head (within 5 s), or the stream's error.
async fn h2_get(
    client: &h2::client::SendRequest<Bytes>,
    path: &str,
) -> Result<http::Response<h2::RecvStream>, h2::Error> {
    let mut c = client.clone().ready().await.expect("ready");
    let req = http::Request::get(format!("http://a{path}"))
        .body(())
        .expect("req");
    let (resp, _) = c.send_request(req, true).expect("send");
    tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .expect("head in time")
}

/// A 204 and a 304 from an h2 pool whose upstream sends DATA after them reach an h2 client
/// with the stream ended on the head (RFC 9110 6.4.1): the 204 without `content-length`, the
/// 304 with the upstream's. (Before, the client got the DATA as the response's content.)
#[tokio::test]
async fn no_body_follows_a_204_or_a_304_from_an_h2_pool() {
    let up = h2_upstream(Arc::new(AtomicUsize::new(0))).await;
    let green = dead_addr().await;
    let p = TestProxy::start(&format!(
        "{PROXY}\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{up}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{green}\"], protocol = \"h2\" }}\n"
    ))
    .await;
    let tcp = TcpStream::connect(p.proxy).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let done = tokio::spawn(conn);
    for (path, status, length) in [("/204", 204, None), ("/304", 304, Some("5"))] {
        let resp = h2_get(&client, path).await.expect("head");
        assert_eq!(resp.status(), status, "{path}");
        let cl = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok());
        assert_eq!(cl, length, "{path}");
        let mut body = resp.into_body();
        assert!(
            body.is_end_stream(),
            "{path}: the head did not end the stream"
        );
        let data = tokio::time::timeout(Duration::from_secs(5), body.data())
            .await
            .expect("the end in time");
        assert!(data.is_none(), "{path}: a body came: {data:?}");
    }
    // An HTTP/1.1 client is answered the same.
    let (status, body) = get(p.proxy, "/204").await;
    assert_eq!((status, body.as_str()), (204, ""));
    done.abort();
    p.stop().await;
}

/// A response head larger than the SETTINGS_MAX_HEADER_LIST_SIZE the client announced (16 KiB
/// here; a 20 KB field) is answered 502 on its stream alone, and the connection goes on
/// serving (before, the head was sent anyway and the client failed it: python-h2 drops the
/// whole connection).
#[tokio::test]
async fn a_head_over_the_clients_header_list_size_is_a_502_on_its_stream() {
    let up = raw_upstream(|head| {
        let answer = if head.starts_with("GET /bighead") {
            format!(
                "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 2\r\n\r\nok",
                "v".repeat(20_000)
            )
        } else {
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_string()
        };
        Raw::Answer(answer.into_bytes())
    })
    .await;
    let green = dead_addr().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let body = format!(
        "{PROXY}\n[log]\naccess = \"{}\"\naccess_format = \"json\"\n{}",
        log.display(),
        service("api", &[up], &[green], "")
    );
    let p = TestProxy::start_with(&body, Some(TOKEN), Some(dir)).await;
    let tcp = TcpStream::connect(p.proxy).await.expect("connect");
    let (client, conn) = h2::client::Builder::new()
        .max_header_list_size(16 * 1024)
        .handshake::<_, Bytes>(tcp)
        .await
        .expect("h2 handshake");
    let done = tokio::spawn(conn);
    for (path, status) in [("/bighead", 502), ("/", 200)] {
        let resp = h2_get(&client, path).await;
        let status_got = resp.as_ref().map(|r| r.status().as_u16());
        assert_eq!(status_got.ok(), Some(status), "{path}: {resp:?}");
    }
    assert!(!done.is_finished(), "the connection was closed");
    done.abort();
    // The log and the metrics say what the client got: the 502, not the upstream's 200. Each
    // request is recorded as its body ends, the last maybe just after the client had it.
    let by_code = |metrics: &str, code: &str| {
        metric_sum(metrics, "switchyard_requests_total", &[("code", code)])
    };
    let counted = eventually(10, || async {
        let (_, m) = get(p.admin, "/metrics").await;
        by_code(&m, "502") == 1.0 && by_code(&m, "200") == 1.0
    })
    .await;
    let (_, metrics) = get(p.admin, "/metrics").await;
    assert!(counted, "one 502 and one 200 counted:\n{metrics}");
    // Not the upstream's failure: it answered; the limit is the client's.
    assert_eq!(upstream_failures(&metrics), 0.0, "{metrics}");
    let blue = &p.service_status("api").await["colors"]["blue"];
    assert_eq!(blue["requests"].as_u64(), Some(2), "{blue}");
    assert_eq!(blue["failures"].as_u64(), Some(0), "{blue}");
    let mut lines = Vec::new();
    let logged = eventually(10, || {
        lines = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        let n = lines.len();
        async move { n >= 2 }
    })
    .await;
    assert!(logged, "two access log lines: {lines:?}");
    let mut got: Vec<(String, u64, u64)> = lines
        .iter()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
            let path = v["path"].as_str().unwrap_or_default().to_string();
            (
                path,
                v["status"].as_u64().unwrap_or(0),
                v["bytes"].as_u64().unwrap_or(9),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [("/".to_string(), 200, 2), ("/bighead".to_string(), 502, 0)],
        "{lines:?}"
    );
    p.stop().await;
}
