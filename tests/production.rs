//! Production traffic end to end: TLS with ALPN and certificate reload, h2c and h2 upstreams
//! with trailers, upgrades, admin hardening, reloads, and zero failed requests while flipping,
//! reloading and shutting down.
mod common;
use common::*;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(10);

fn header_of(echo: &Value, name: &str) -> Option<String> {
    echo["headers"]
        .as_array()?
        .iter()
        .find_map(|p| (p[0].as_str()? == name).then(|| p[1].as_str().unwrap_or("").to_string()))
}

// ---------------------------------------------------------------------------------------------
// TLS

struct Cert {
    cert: PathBuf,
    key: PathBuf,
    der: rustls::pki_types::CertificateDer<'static>,
}

fn make_cert(dir: &Path, name: &str) -> Cert {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, ck.cert.pem()).expect("write cert");
    std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write key");
    Cert {
        cert,
        key,
        der: ck.cert.der().clone(),
    }
}

/// [`make_cert`], valid until midnight (UTC) of `until` (year, month, day).
fn make_cert_until(dir: &Path, name: &str, until: (i32, u8, u8)) -> Cert {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    params.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
    let key = rcgen::KeyPair::generate().expect("key");
    let c = params.self_signed(&key).expect("cert");
    let cert = dir.join(format!("{name}.crt"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert, c.pem()).expect("write cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("write key");
    Cert {
        cert,
        key: key_path,
        der: c.der().clone(),
    }
}

fn tls_head(c: &Cert) -> String {
    tls_head_with_grace(c, "2s")
}

fn tls_head_with_grace(c: &Cert, grace: &str) -> String {
    format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nshutdown_grace = \"{grace}\"\n",
        c.cert.display(),
        c.key.display()
    )
}

/// A proxy with a TLS listener (a certificate for `localhost`) and `proxy_extra` in
/// `[proxy]`, one service with `blue` live; the certificate's directory lives as long as the
/// returned guard.
async fn tls_proxy(blue: SocketAddr, proxy_extra: &str) -> (TestProxy, Cert, tempfile::TempDir) {
    tls_proxy_with_grace(blue, "2s", proxy_extra).await
}

/// [`tls_proxy`] with its own `shutdown_grace`.
async fn tls_proxy_with_grace(
    blue: SocketAddr,
    grace: &str,
    proxy_extra: &str,
) -> (TestProxy, Cert, tempfile::TempDir) {
    let certs = tempfile::tempdir().expect("tempdir");
    let c = make_cert(certs.path(), "a");
    let p = TestProxy::start(&format!(
        "{}{proxy_extra}{}",
        tls_head_with_grace(&c, grace),
        service("api", &[blue], &[dead_addr().await], "")
    ))
    .await;
    (p, c, certs)
}

/// The address the proxy's TLS listener took.
fn tls_listener(p: &TestProxy) -> SocketAddr {
    p.running
        .as_ref()
        .and_then(|r| r.tls_addr)
        .expect("tls addr")
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_connect(addr: SocketAddr, trust: &[&Cert], alpn: &[u8]) -> Tls {
    tls_connect_offering(addr, trust, alpn, None).await
}

/// [`tls_connect`] offering only `groups` for the key exchange (rustls's defaults if `None`).
async fn tls_connect_offering(
    addr: SocketAddr,
    trust: &[&Cert],
    alpn: &[u8],
    groups: Option<Vec<&'static dyn rustls::crypto::SupportedKxGroup>>,
) -> Tls {
    let mut roots = rustls::RootCertStore::empty();
    for c in trust {
        roots.add(c.der.clone()).expect("root");
    }
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    if let Some(groups) = groups {
        provider.kx_groups = groups;
    }
    let provider = Arc::new(provider);
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Empty: no ALPN offered.
    cfg.alpn_protocols = if alpn.is_empty() {
        Vec::new()
    } else {
        vec![alpn.to_vec()]
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio::time::timeout(T, connector.connect(name, tcp))
        .await
        .expect("handshake timed out")
        .expect("handshake")
}

async fn send<B>(sender: &mut B, req: Request<Empty<Bytes>>) -> (u16, String)
where
    B: SendReq,
{
    let resp = tokio::time::timeout(T, sender.send(req))
        .await
        .expect("timeout")
        .expect("request");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

trait SendReq {
    fn send(
        &mut self,
        req: Request<Empty<Bytes>>,
    ) -> impl std::future::Future<Output = hyper::Result<Response<Incoming>>>;
}
impl SendReq for hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    fn send(
        &mut self,
        req: Request<Empty<Bytes>>,
    ) -> impl std::future::Future<Output = hyper::Result<Response<Incoming>>> {
        self.send_request(req)
    }
}
impl SendReq for hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    fn send(
        &mut self,
        req: Request<Empty<Bytes>>,
    ) -> impl std::future::Future<Output = hyper::Result<Response<Incoming>>> {
        self.send_request(req)
    }
}

async fn h1<I>(io: I) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    s
}

async fn h2<I>(io: I) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    s
}

fn get_req(path: &str, h2: bool) -> Request<Empty<Bytes>> {
    let b = Request::builder();
    let b = if h2 {
        b.uri(format!("https://localhost{path}"))
            .version(http::Version::HTTP_2)
    } else {
        b.uri(path).header("host", "localhost")
    };
    b.body(Empty::new()).expect("req")
}

/// A connection the proxy closes over TLS ends with close_notify, so a client can tell a
/// complete response (above all a close-delimited body) from a cut one.
#[tokio::test]
async fn tls_responses_that_close_the_connection_end_with_close_notify() {
    // An upstream whose body has no length: an HTTP/1.0 client gets it close-delimited.
    let up = raw_upstream(|_| {
        Raw::Answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                .to_vec(),
        )
    })
    .await;
    let (p, c, _certs) = tls_proxy(up, "").await;
    let tls_addr = tls_listener(&p);
    for (request, body) in [
        (
            &b"GET /x HTTP/1.0\r\nHost: api\r\n\r\n"[..],
            "\r\n\r\nhello",
        ),
        (
            &b"GET /x HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n"[..],
            "\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
    ] {
        let mut s = tls_connect(tls_addr, &[&c], b"http/1.1").await;
        s.write_all(request).await.expect("write");
        let mut all = Vec::new();
        let read = tokio::time::timeout(T, s.read_to_end(&mut all))
            .await
            .expect("the proxy closed the connection in time");
        let text = String::from_utf8_lossy(&all).to_string();
        // rustls reports a close without close_notify as UnexpectedEof.
        assert!(read.is_ok(), "{read:?} after {text:?}");
        assert!(
            text.starts_with("HTTP/1.1 200") && text.ends_with(body),
            "{text:?}"
        );
    }
    p.stop().await;

    // The reverse: a close-delimited body the upstream cut short must not end with
    // close_notify, or the client would take the part for the whole.
    let up = raw_upstream(|_| {
        Raw::Close(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel".to_vec())
    })
    .await;
    let green = dead_addr().await;
    let p = TestProxy::start(&format!(
        "{}{}",
        tls_head(&c),
        service("api", &[up], &[green], "")
    ))
    .await;
    let tls_addr = tls_listener(&p);
    let mut s = tls_connect(tls_addr, &[&c], b"http/1.1").await;
    s.write_all(b"GET /x HTTP/1.0\r\nHost: api\r\n\r\n")
        .await
        .expect("write");
    let mut all = Vec::new();
    let read = tokio::time::timeout(T, s.read_to_end(&mut all))
        .await
        .expect("the proxy closed the connection in time");
    assert!(
        matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof),
        "{read:?} after {:?}",
        String::from_utf8_lossy(&all)
    );
    p.stop().await;
}

/// `per_worker`, the default runtime: every worker accepts TLS as well as plain HTTP (its own
/// `SO_REUSEPORT` socket on each address), so handshakes spread over the workers as requests
/// do; `shared` keeps one socket per address. Every fresh connection is answered, and after
/// shutdown no socket listens on either address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_accepts_tls_by_default() {
    let blue = TestUpstream::start("blue").await;
    for (extra, sockets) in [
        ("workers = 3\n", 3),
        ("workers = 3\nruntime = \"shared\"\n", 1),
    ] {
        let (p, c, _certs) = tls_proxy(blue.addr, extra).await;
        let (plain, tls) = (p.proxy, tls_listener(&p));
        assert_eq!(listening_sockets(plain), sockets, "{extra}listen");
        assert_eq!(listening_sockets(tls), sockets, "{extra}tls_listen");
        for _ in 0..24 {
            let mut s = tls_connect(tls, &[&c], b"http/1.1").await;
            s.write_all(b"GET /x HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
                .await
                .expect("write");
            let mut all = Vec::new();
            let _ = tokio::time::timeout(T, s.read_to_end(&mut all))
                .await
                .expect("answered in time");
            let text = String::from_utf8_lossy(&all);
            assert!(
                text.starts_with("HTTP/1.1 200") && text.ends_with("blue\n"),
                "{extra}{text:?}"
            );
            assert_eq!(
                try_get(plain, "/x").await,
                Some((200, "blue\n".to_string()))
            );
        }
        p.stop().await;
        assert_eq!(listening_sockets(plain), 0, "{extra}listen after stop");
        assert_eq!(listening_sockets(tls), 0, "{extra}tls_listen after stop");
    }
}

/// A TCP connection to the TLS listener that never starts its handshake does not hold up
/// shutdown.
#[tokio::test]
async fn a_silent_tls_connection_does_not_hold_up_shutdown() {
    let blue = TestUpstream::start("blue").await;
    // Waiting for it would take 10 s (the deadline and the grace); the bound leaves a loaded
    // machine room to stop a process.
    let (p, _, _certs) =
        tls_proxy_with_grace(blue.addr, "10s", "header_read_timeout = \"10s\"\n").await;
    let tls_addr = tls_listener(&p);
    let _silent = TcpStream::connect(tls_addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let began = tokio::time::Instant::now();
    p.stop().await;
    assert!(
        began.elapsed() < Duration::from_secs(4),
        "shutdown waited {:?} for a silent TLS connection",
        began.elapsed()
    );
}

/// A TLS handshake under way when shutdown begins (a client far away: the server's answers
/// take 600 ms to reach it) is finished, and its first request answered with
/// `connection: close`, not dropped 250 ms into the drain as a silent connection is (an
/// upgrade cut every such client off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_under_way_at_shutdown_is_finished_and_served() {
    let blue = TestUpstream::start("blue").await;
    let (p, c, _certs) = tls_proxy_with_grace(blue.addr, "10s", "").await;
    let relay = common::relay::Relay::start(tls_listener(&p)).await;
    relay.set_mode(common::relay::Mode::DelayAnswers(Duration::from_millis(
        600,
    )));
    let addr = relay.addr;
    let client = tokio::spawn(async move {
        let io = tls_connect(addr, &[&c], b"http/1.1").await;
        let mut h = h1(io).await;
        send(&mut h, get_req("/x", false)).await
    });
    // The ClientHello is in; the server's answer is on its way (600 ms).
    tokio::time::sleep(Duration::from_millis(150)).await;
    let stopping = tokio::spawn(p.stop());
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), client)
        .await
        .expect("the client in time")
        .expect("join");
    assert_eq!((status, body.as_str()), (200, "blue\n"));
    tokio::time::timeout(Duration::from_secs(15), stopping)
        .await
        .expect("stopped")
        .expect("join");
}

/// A TLS connection whose ALPN agreed on h2 is held to the first deadline for its preface,
/// as any other (it waited for `h2_idle_timeout`), and one that has sent nothing does not
/// hold up shutdown.
#[tokio::test]
async fn a_silent_h2_tls_connection_is_held_to_the_first_deadline() {
    let blue = TestUpstream::start("blue").await;
    let (p, c, _certs) = tls_proxy(blue.addr, "header_read_timeout = \"1s\"\n").await;
    let tls_addr = tls_listener(&p);
    // Half a preface, then nothing: closed at the deadline, not after a minute.
    let mut s = tls_connect(tls_addr, &[&c], b"h2").await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    s.write_all(b"PRI * HTTP/2.0\r\n").await.expect("write");
    let mut all = Vec::new();
    let read = tokio::time::timeout(T, s.read_to_end(&mut all)).await;
    assert!(read.is_ok(), "still open: the preface had no deadline");
    p.stop().await;
    // Silent from the handshake on, at shutdown. Waiting for it would take 10 s (the deadline
    // and the grace); the bound leaves a loaded machine room to stop a process.
    let (p, c, _certs) =
        tls_proxy_with_grace(blue.addr, "10s", "header_read_timeout = \"10s\"\n").await;
    let _silent = tls_connect(tls_listener(&p), &[&c], b"h2").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let began = tokio::time::Instant::now();
    p.stop().await;
    assert!(
        began.elapsed() < Duration::from_secs(4),
        "shutdown waited {:?} for a silent h2 TLS connection",
        began.elapsed()
    );
}

/// Over TLS, h2 is what ALPN agreed on, never a preface sent on a connection that agreed on
/// HTTP/1.1 (RFC 9113 3.4: prior knowledge is for cleartext): that is an HTTP/1 request line
/// of another version.
#[tokio::test]
async fn tls_without_h2_in_alpn_does_not_speak_h2() {
    let blue = TestUpstream::start("blue").await;
    let (p, c, _certs) = tls_proxy(blue.addr, "").await;
    let mut s = tls_connect(tls_listener(&p), &[&c], b"http/1.1").await;
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("write");
    let mut all = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut all)).await;
    assert!(
        all.starts_with(b"HTTP/1.1 505"),
        "{:?}",
        String::from_utf8_lossy(&all)
    );
    assert_eq!(blue.hits(), 0);
    p.stop().await;
}

/// A raw h2 frame header: length, type, flags, stream.
fn raw_frame_header(len: usize, kind: u8, flags: u8, stream: u32) -> Vec<u8> {
    let mut h = (len as u32).to_be_bytes()[1..].to_vec();
    h.extend_from_slice(&[kind, flags]);
    h.extend_from_slice(&stream.to_be_bytes());
    h
}

/// Starts a raw h2 client on `s`: the preface, an empty SETTINGS, and `GET path` on stream 1
/// for `authority`. It answers nothing the server sends, its PINGs included (a client that
/// never answers the PING after a graceful GOAWAY).
async fn raw_h2_get<S>(s: &mut S, authority: &str, path: &str, https: bool)
where
    S: tokio::io::AsyncWrite + Unpin,
{
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&raw_frame_header(0, 0x4, 0, 0));
    // GET (static 2), the scheme (6: http, 7: https), then :path (4) and :authority (1) as
    // literals without indexing.
    let mut block = vec![
        0x82,
        if https { 0x87 } else { 0x86 },
        0x04,
        path.len() as u8,
    ];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x01, authority.len() as u8]);
    block.extend_from_slice(authority.as_bytes());
    out.extend_from_slice(&raw_frame_header(block.len(), 0x1, 0x5, 1));
    out.extend_from_slice(&block);
    s.write_all(&out).await.expect("write");
}

/// Reads `s` until the response on stream 1 has ended; whether it was a 200 (its HEADERS
/// begin with `:status: 200`, static index 8). False if the connection ended first or it took
/// longer than `T`.
async fn raw_h2_response<S>(s: &mut S) -> bool
where
    S: tokio::io::AsyncRead + Unpin,
{
    let mut got = Vec::new();
    let mut ok = false;
    let read = tokio::time::timeout(T, async {
        let mut chunk = [0u8; 4096];
        loop {
            let mut at = 0;
            while at + 9 <= got.len() {
                let len = u32::from_be_bytes([0, got[at], got[at + 1], got[at + 2]]) as usize;
                if at + 9 + len > got.len() {
                    break;
                }
                let (kind, flags) = (got[at + 3], got[at + 4]);
                let stream =
                    u32::from_be_bytes([got[at + 5], got[at + 6], got[at + 7], got[at + 8]]);
                if stream == 1 && kind == 0x1 && got.get(at + 9) == Some(&0x88) {
                    ok = true;
                }
                if stream == 1 && (kind == 0x0 || kind == 0x1) && flags & 0x1 != 0 {
                    return true;
                }
                at += 9 + len;
            }
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    matches!(read, Ok(true)) && ok
}

/// README `shutdown_grace`: at shutdown an HTTP/2 connection without a stream in flight is
/// closed soon after its GOAWAY, on the proxy's listeners (TLS, with close_notify, and h2c) and
/// the admin's, even for a client that never answers the GOAWAY's PING; a stream in flight
/// gets its response. Waiting for the idle ones would take the whole grace (60 s here); the
/// bound leaves a loaded machine room to stop a process.
#[tokio::test]
async fn idle_h2_connections_do_not_hold_up_shutdown() {
    let blue = TestUpstream::start("blue").await;
    let (p, c, _certs) = tls_proxy_with_grace(blue.addr, "60s", "").await;
    let mut tls = tls_connect(tls_listener(&p), &[&c], b"h2").await;
    raw_h2_get(&mut tls, "localhost", "/a", true).await;
    assert!(raw_h2_response(&mut tls).await, "h2 over TLS");
    let mut h2c = TcpStream::connect(p.proxy).await.expect("connect");
    raw_h2_get(&mut h2c, "localhost", "/a", false).await;
    assert!(raw_h2_response(&mut h2c).await, "h2c");
    let mut admin = TcpStream::connect(p.admin).await.expect("connect");
    raw_h2_get(&mut admin, "127.0.0.1", "/healthz", false).await;
    assert!(raw_h2_response(&mut admin).await, "admin h2c");
    // A request in flight when shutdown begins.
    blue.set_delay(1000);
    let mut busy = TcpStream::connect(p.proxy).await.expect("connect");
    raw_h2_get(&mut busy, "localhost", "/slow", false).await;
    assert!(eventually(5, || async { blue.hits() == 3 }).await);

    let stopping = tokio::spawn(p.stop());
    assert!(
        raw_h2_response(&mut busy).await,
        "the request in flight at shutdown was not answered"
    );
    let bound = Duration::from_secs(20);
    let mut rest = Vec::new();
    let read = tokio::time::timeout(bound, tls.read_to_end(&mut rest))
        .await
        .expect("an idle h2 TLS connection held up shutdown");
    // rustls reports a close without close_notify as UnexpectedEof.
    assert!(read.is_ok(), "{read:?}");
    for (what, s) in [("h2c", &mut h2c), ("admin h2c", &mut admin)] {
        let read = tokio::time::timeout(bound, s.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "an idle {what} connection held up shutdown");
    }
    tokio::time::timeout(bound, stopping)
        .await
        .expect("shutdown took the whole grace")
        .expect("stop");
}

/// README "Request lifecycle": a connection the proxy closes itself over TLS ends with
/// close_notify, then FIN: an h2 connection idle past `h2_idle_timeout` (closed after its
/// GOAWAY, by a client that never answers its PING), and a connection that sent nothing by
/// its first deadline, whether ALPN agreed on h2 or HTTP/1.1.
#[tokio::test]
async fn connections_the_proxy_closes_over_tls_end_with_close_notify() {
    let blue = TestUpstream::start("blue").await;
    let (p, c, _certs) = tls_proxy(
        blue.addr,
        "header_read_timeout = \"1s\"\nh2_idle_timeout = \"1s\"\n",
    )
    .await;
    let addr = tls_listener(&p);
    let mut problems = Vec::new();
    for (what, alpn) in [
        ("an idle h2 connection", &b"h2"[..]),
        ("h2 with nothing sent", b"h2"),
        ("HTTP/1.1 with nothing sent", b"http/1.1"),
    ] {
        let mut s = tls_connect(addr, &[&c], alpn).await;
        if what == "an idle h2 connection" {
            raw_h2_get(&mut s, "localhost", "/a", true).await;
            assert!(raw_h2_response(&mut s).await, "{what}");
        }
        let mut rest = Vec::new();
        match tokio::time::timeout(T, s.read_to_end(&mut rest)).await {
            Err(_) => problems.push(format!("{what}: still open")),
            // rustls reports a close without close_notify as UnexpectedEof.
            Ok(Err(e)) => problems.push(format!("{what}: ended without close_notify: {e}")),
            Ok(Ok(_)) => {}
        }
    }
    p.stop().await;
    assert!(problems.is_empty(), "{problems:#?}");
}

/// Over TLS the admin listener speaks what ALPN agreed on, as the proxy's does (RFC 9113 3.3,
/// RFC 7301 3.2): the h2 preface on a connection that agreed on HTTP/1.1, or on nothing, is
/// answered 505, not served h2; HTTP/1.1 on one that agreed on h2 gets no HTTP/1.1 answer.
#[tokio::test]
async fn the_admin_tls_listener_speaks_what_alpn_agreed_on() {
    let blue = TestUpstream::start("blue").await;
    let certs = tempfile::tempdir().expect("tempdir");
    let c = make_cert(certs.path(), "a");
    let p = TestProxy::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n{}",
        c.cert.display(),
        c.key.display(),
        service("api", &[blue.addr], &[dead_addr().await], "")
    ))
    .await;
    let mut problems = Vec::new();
    for alpn in [&b"http/1.1"[..], b""] {
        let mut s = tls_connect(p.admin, &[&c], alpn).await;
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend_from_slice(&raw_frame_header(0, 0x4, 0, 0));
        s.write_all(&hello).await.expect("write");
        let mut all = Vec::new();
        let _ = tokio::time::timeout(T, s.read_to_end(&mut all)).await;
        if !all.starts_with(b"HTTP/1.1 505") {
            problems.push(format!(
                "h2 preface, ALPN {:?}: {:?}",
                String::from_utf8_lossy(alpn),
                String::from_utf8_lossy(&all)
            ));
        }
    }
    let mut s = tls_connect(p.admin, &[&c], b"h2").await;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut all = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut all)).await;
    if all.starts_with(b"HTTP/") {
        problems.push(format!(
            "HTTP/1.1 on ALPN h2: {:?}",
            String::from_utf8_lossy(&all)
        ));
    }
    // Each where agreed.
    let mut h = h1(tls_connect(p.admin, &[&c], b"http/1.1").await).await;
    let req = Request::get("/healthz")
        .header("host", "127.0.0.1")
        .body(Empty::new())
        .expect("req");
    assert_eq!(send(&mut h, req).await, (200, "ok".to_string()));
    let mut h = h2(tls_connect(p.admin, &[&c], b"h2").await).await;
    let req = Request::get("https://127.0.0.1/healthz")
        .body(Empty::new())
        .expect("req");
    assert_eq!(send(&mut h, req).await, (200, "ok".to_string()));
    p.stop().await;
    assert!(problems.is_empty(), "{problems:#?}");
}

/// An admin h2 connection over TLS that is idle at shutdown is closed with close_notify, then
/// FIN, though its client never answers the GOAWAY's PING (hyper, which serves the admin
/// listener, has no close of its own for it).
#[tokio::test]
async fn an_idle_admin_h2_tls_connection_ends_with_close_notify_at_shutdown() {
    let blue = TestUpstream::start("blue").await;
    let certs = tempfile::tempdir().expect("tempdir");
    let c = make_cert(certs.path(), "a");
    let p = TestProxy::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n{}",
        c.cert.display(),
        c.key.display(),
        service("api", &[blue.addr], &[dead_addr().await], "")
    ))
    .await;
    let mut s = tls_connect(p.admin, &[&c], b"h2").await;
    raw_h2_get(&mut s, "127.0.0.1", "/healthz", true).await;
    assert!(raw_h2_response(&mut s).await, "admin h2 over TLS");
    let stopping = tokio::spawn(p.stop());
    let mut rest = Vec::new();
    let read = tokio::time::timeout(T, s.read_to_end(&mut rest))
        .await
        .expect("the idle connection was closed");
    // rustls reports a close without close_notify as UnexpectedEof.
    assert!(read.is_ok(), "{read:?}");
    tokio::time::timeout(T, stopping)
        .await
        .expect("stopped")
        .expect("stop");
}

/// A client that offers the X25519MLKEM768 hybrid (current browsers, rustls) gets a
/// post-quantum key exchange; one that offers only X25519 (OpenSSL 3.0) gets X25519 without a
/// HelloRetryRequest.
#[tokio::test]
async fn tls_key_exchange_is_post_quantum_hybrid_for_clients_that_offer_it() {
    use rustls::crypto::aws_lc_rs::kx_group;
    use rustls::{HandshakeKind, NamedGroup};
    let blue = TestUpstream::start("blue").await;
    let (p, c, _certs) = tls_proxy(blue.addr, "").await;
    type Groups = Option<Vec<&'static dyn rustls::crypto::SupportedKxGroup>>;
    let cases: [(Groups, NamedGroup); 2] = [
        (None, NamedGroup::X25519MLKEM768),
        (Some(vec![kx_group::X25519]), NamedGroup::X25519),
    ];
    for (groups, want) in cases {
        let io = tls_connect_offering(tls_listener(&p), &[&c], b"http/1.1", groups).await;
        let conn = io.get_ref().1;
        let got = conn.negotiated_key_exchange_group().map(|g| g.name());
        assert_eq!(got, Some(want));
        assert_eq!(conn.handshake_kind(), Some(HandshakeKind::Full));
        let mut s = h1(io).await;
        let (status, body) = send(&mut s, get_req("/echo", false)).await;
        assert_eq!(status, 200, "{body}");
    }
    p.stop().await;
}

#[tokio::test]
async fn tls_serves_http1_and_h2_by_alpn_with_forwarded_proto_https() {
    let blue = TestUpstream::start("blue").await;
    let (p, c, _certs) = tls_proxy(blue.addr, "").await;
    let tls_addr = tls_listener(&p);

    let io = tls_connect(tls_addr, &[&c], b"http/1.1").await;
    assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut s = h1(io).await;
    let (status, body) = send(&mut s, get_req("/echo", false)).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(header_of(&v, "x-forwarded-proto").as_deref(), Some("https"));

    let io = tls_connect(tls_addr, &[&c], b"h2").await;
    assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut s = h2(io).await;
    let (status, body) = send(&mut s, get_req("/echo", true)).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(header_of(&v, "x-forwarded-proto").as_deref(), Some("https"));
    assert_eq!(header_of(&v, "host").as_deref(), Some("localhost"));

    // The plain listener says http.
    let (_, body) = p.get("/echo").await;
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(header_of(&v, "x-forwarded-proto").as_deref(), Some("http"));
    p.stop().await;
}

#[tokio::test]
async fn a_bad_certificate_or_key_is_a_startup_error_naming_the_key() {
    let certs = tempfile::tempdir().expect("tempdir");
    let good = make_cert(certs.path(), "good");
    let garbage = certs.path().join("garbage.key");
    std::fs::write(&garbage, "not a key\n").expect("write");
    let other = make_cert(certs.path(), "other");
    for (name, cert, key, want) in [
        (
            "missing cert",
            certs.path().join("nope.crt"),
            good.key.clone(),
            "proxy.tls_cert",
        ),
        (
            "garbage key",
            good.cert.clone(),
            garbage.clone(),
            "proxy.tls_key",
        ),
        (
            "mismatched pair",
            good.cert.clone(),
            other.key.clone(),
            "proxy.tls_cert",
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let body = format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n{}",
            cert.display(),
            key.display(),
            service("api", &[dead_addr().await], &[dead_addr().await], "")
        );
        let text = full_config(&body, dir.path());
        let err = match switchyard::config::from_toml_str_with_env(&text, Some(Default::default()))
        {
            Err(e) => e.to_string(),
            Ok(cfg) => {
                let r = switchyard::start(
                    cfg,
                    switchyard::Options {
                        config_path: None,
                        store: switchyard::StateStore::file(dir.path().join("s.json")),
                        admin_token: None,
                    },
                )
                .await;
                match r {
                    Ok(running) => {
                        running.shutdown().await;
                        panic!("{name}: started with a bad certificate");
                    }
                    Err(e) => format!("{e:#}"),
                }
            }
        };
        assert!(err.contains(want), "{name}: {err}");
    }
}

#[tokio::test]
async fn reload_swaps_the_certificate_without_dropping_open_connections() {
    let blue = TestUpstream::start("blue").await;
    let green = dead_addr().await;
    let certs = tempfile::tempdir().expect("tempdir");
    let a = make_cert(certs.path(), "a");
    let b = make_cert_until(certs.path(), "b", (2061, 3, 4));
    let svc = service("api", &[blue.addr], &[green], "");
    let p = TestProxy::start(&format!("{}{svc}", tls_head(&a))).await;
    let tls_addr = tls_listener(&p);
    // The served certificate's notAfter, by listener (rcgen's default ends in 4096); none for
    // the admin listener, which has no TLS here.
    let expiry = |text: &str, listener: &str| {
        metric(
            text,
            "switchyard_tls_certificate_expiry_timestamp_seconds",
            &[("listener", listener)],
        )
    };
    let text = get(p.admin, "/metrics").await.1;
    assert_eq!(expiry(&text, "proxy"), Some(67_090_118_400.0), "{text}");
    assert_eq!(expiry(&text, "admin"), None, "{text}");

    let io = tls_connect(tls_addr, &[&a, &b], b"http/1.1").await;
    let served = io.get_ref().1.peer_certificates().map(|c| c[0].clone());
    assert_eq!(served.as_ref(), Some(&a.der));
    let mut old = h1(io).await;
    assert_eq!(send(&mut old, get_req("/x", false)).await.0, 200);

    let dir = p.dir.as_ref().expect("dir").path().to_path_buf();
    std::fs::write(
        &p.config_path,
        full_config(&format!("{}{svc}", tls_head(&b)), &dir),
    )
    .expect("write config");
    let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{v}");

    // The open connection keeps working; new handshakes get the new certificate.
    assert_eq!(send(&mut old, get_req("/x", false)).await.0, 200);
    let io = tls_connect(tls_addr, &[&a, &b], b"http/1.1").await;
    let served = io.get_ref().1.peer_certificates().map(|c| c[0].clone());
    assert_eq!(
        served.as_ref(),
        Some(&b.der),
        "still serving the old certificate"
    );
    let text = get(p.admin, "/metrics").await.1;
    assert_eq!(expiry(&text, "proxy"), Some(2_877_120_000.0), "{text}");

    // A reload with a broken key pair is refused and keeps serving the current one.
    let bad = certs.path().join("bad.key");
    std::fs::write(&bad, "nope\n").expect("write");
    let broken = Cert {
        cert: b.cert.clone(),
        key: bad,
        der: b.der.clone(),
    };
    std::fs::write(
        &p.config_path,
        full_config(&format!("{}{svc}", tls_head(&broken)), &dir),
    )
    .expect("write config");
    let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(s, 400, "{v}");
    assert!(v.to_string().contains("proxy.tls"), "{v}");
    let io = tls_connect(tls_addr, &[&a, &b], b"http/1.1").await;
    let mut s2 = h1(io).await;
    assert_eq!(send(&mut s2, get_req("/x", false)).await.0, 200);
    p.stop().await;
}

/// A reload is all or nothing for certificates too: refused for the admin's pair, the proxy's
/// new pair (read fine) is not served either.
#[tokio::test]
async fn a_reload_refused_for_the_admin_pair_serves_neither_new_pair() {
    let blue = TestUpstream::start("blue").await;
    let certs = tempfile::tempdir().expect("tempdir");
    let a = make_cert(certs.path(), "a");
    let b = make_cert(certs.path(), "b");
    let admin = |c: &Cert| {
        format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            c.cert.display(),
            c.key.display()
        )
    };
    let svc = service("api", &[blue.addr], &[dead_addr().await], "");
    let p = TestProxy::start(&format!("{}{}{svc}", tls_head(&a), admin(&a))).await;
    let tls_addr = tls_listener(&p);
    let bad = certs.path().join("bad.crt");
    std::fs::write(&bad, "garbage\n").expect("write");
    let broken = Cert {
        cert: bad,
        key: a.key.clone(),
        der: a.der.clone(),
    };
    let dir = p.dir.as_ref().expect("dir").path().to_path_buf();
    std::fs::write(
        &p.config_path,
        full_config(&format!("{}{}{svc}", tls_head(&b), admin(&broken)), &dir),
    )
    .expect("write config");
    let refused = p.app().reload("test").await;
    let Err(e) = refused else {
        panic!("the reload was not refused")
    };
    assert!(e.to_string().contains("admin.tls_cert"), "{e}");
    let io = tls_connect(tls_addr, &[&a, &b], b"http/1.1").await;
    let served = io.get_ref().1.peer_certificates().map(|c| c[0].clone());
    assert_eq!(
        served.as_ref(),
        Some(&a.der),
        "the proxy serves the new pair"
    );
    p.stop().await;
}

/// A client that offers only `http/1.0` by ALPN is served (HTTP/1), not refused with
/// `no_application_protocol`; and a client resumes its session by ticket after hundreds of other
/// clients connected (rustls's default cache alone keeps 256 sessions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_http10_by_alpn_and_resumes_after_many_clients() {
    let blue = TestUpstream::start("blue").await;
    let (p, c, _certs) = tls_proxy(blue.addr, "header_read_timeout = \"1s\"\n").await;
    let tls_addr = tls_listener(&p);
    let io = tls_connect(tls_addr, &[&c], b"http/1.0").await;
    assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"http/1.0"[..]));
    let mut s = h1(io).await;
    assert_eq!(send(&mut s, get_req("/x", false)).await.0, 200);

    let mut roots = rustls::RootCertStore::empty();
    roots.add(c.der.clone()).expect("root");
    let config = |roots: rustls::RootCertStore| {
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    };
    let connect = |cfg: Arc<rustls::ClientConfig>| async move {
        let tcp = TcpStream::connect(tls_addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let io = tokio::time::timeout(T, tokio_rustls::TlsConnector::from(cfg).connect(name, tcp))
            .await
            .expect("handshake timed out")
            .expect("handshake");
        let kind = io.get_ref().1.handshake_kind();
        // A request and its answer: the session tickets come after the handshake.
        let mut s = h1(io).await;
        assert_eq!(send(&mut s, get_req("/x", false)).await.0, 200);
        kind
    };
    let ours = config(roots.clone());
    assert_eq!(
        connect(ours.clone()).await,
        Some(rustls::HandshakeKind::Full)
    );
    for _ in 0..300 {
        connect(config(roots.clone())).await;
    }
    assert_eq!(
        connect(ours).await,
        Some(rustls::HandshakeKind::Resumed),
        "no resumption after 300 other clients"
    );

    // Every handshake is counted by how it ended: a client that is not speaking TLS (refused),
    // one that says nothing (past header_read_timeout).
    let mut junk = TcpStream::connect(tls_addr).await.expect("connect");
    junk.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let silent = TcpStream::connect(tls_addr).await.expect("connect");
    let count = |text: &str, result: &str| {
        metric(
            text,
            "switchyard_tls_handshakes_total",
            &[("listener", "proxy"), ("result", result)],
        )
        .unwrap_or(0.0)
    };
    let counted = eventually(10, || async {
        let text = get(p.admin, "/metrics").await.1;
        count(&text, "error") >= 1.0 && count(&text, "timeout") >= 1.0
    })
    .await;
    let text = get(p.admin, "/metrics").await.1;
    assert!(counted, "{text}");
    assert!(count(&text, "ok") >= 303.0, "{text}");
    drop((junk, silent));
    p.stop().await;
}

// ---------------------------------------------------------------------------------------------
// HTTP/2

#[tokio::test]
async fn h2c_prior_knowledge_on_the_plain_listener() {
    let blue = TestUpstream::start("blue").await;
    let p = TestProxy::start(&service("api", &[blue.addr], &[dead_addr().await], "")).await;
    let tcp = TcpStream::connect(p.proxy).await.expect("connect");
    let mut s = h2(tcp).await;
    for _ in 0..3 {
        let req = Request::builder()
            .uri(format!("http://api.local:{}/echo", p.proxy.port()))
            .body(Empty::new())
            .expect("req");
        let (status, body) = send(&mut s, req).await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["version"], "HTTP/1.1", "toward an http1 pool: {v}");
        assert_eq!(
            header_of(&v, "host").as_deref(),
            Some(&*format!("api.local:{}", p.proxy.port()))
        );
        // Received over HTTP/2 (RFC 9110 7.6.3).
        assert_eq!(header_of(&v, "via").as_deref(), Some("2 switchyard"), "{v}");
    }
    assert_eq!(blue.hits(), 3);
    p.stop().await;
}

/// One data frame, then trailers: what a gRPC server sends.
struct Trailed(Option<Bytes>, Option<HeaderMap>);
impl http_body::Body for Trailed {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(d) = self.0.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.1.take().map(|t| Ok(Frame::trailers(t))))
    }
}

/// An h2c-only upstream that answers with trailers and reports the version and `te` it saw.
async fn grpc_like_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let svc = service_fn(|req: Request<Incoming>| async move {
                let te = req.headers().get("te").map(|v| v.as_bytes().to_vec());
                let body = format!(
                    "{:?} te={}",
                    req.version(),
                    String::from_utf8_lossy(&te.unwrap_or_default())
                );
                let mut trailers = HeaderMap::new();
                trailers.insert("grpc-status", HeaderValue::from_static("0"));
                trailers.insert("grpc-message", HeaderValue::from_static("fine"));
                // Not for a trailer (RFC 9110 6.5.1): the proxy drops it.
                trailers.insert("host", HeaderValue::from_static("evil.example"));
                let mut r = Response::new(Trailed(Some(Bytes::from(body)), Some(trailers)));
                r.headers_mut()
                    .insert("content-type", HeaderValue::from_static("application/grpc"));
                Ok::<_, Infallible>(r)
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc),
            );
        }
    });
    addr
}

#[tokio::test]
async fn h2_upstream_pool_passes_trailers_end_to_end() {
    let up = grpc_like_upstream().await;
    let p = TestProxy::start(&format!(
        "\n[[services]]\nname = \"grpc\"\nblue = {{ upstreams = [\"{up}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{}\"], protocol = \"h2\" }}\n",
        dead_addr().await
    ))
    .await;
    let tcp = TcpStream::connect(p.proxy).await.expect("connect");
    let mut s = h2(tcp).await;
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://grpc.local:{}/pkg.Svc/Call", p.proxy.port()))
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(Empty::new())
        .expect("req");
    let resp = tokio::time::timeout(T, s.send_request(req))
        .await
        .expect("timeout")
        .expect("request");
    assert_eq!(resp.status(), 200);
    let collected = tokio::time::timeout(T, resp.into_body().collect())
        .await
        .expect("timeout")
        .expect("body");
    let trailers = collected
        .trailers()
        .cloned()
        .expect("the client got no trailers");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
    assert_eq!(
        trailers.get("grpc-message").map(|v| v.as_bytes()),
        Some(&b"fine"[..])
    );
    assert!(trailers.get("host").is_none(), "{trailers:?}");
    let body = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
    assert_eq!(body, "HTTP/2.0 te=trailers", "the upstream saw: {body}");
    p.stop().await;
}

/// An HTTP/1.1 upstream's trailers reach an h2 client without the fields a trailer may not
/// carry: a connection-specific one would make the client reset the stream (RFC 9113 8.2.2)
/// and lose the whole response.
#[tokio::test]
async fn h1_upstream_trailers_reach_h2_clients_without_connection_fields() {
    let up = raw_upstream(|_| {
        Raw::Answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\
              Connection: close\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\n\
              Host: evil\r\nContent-Length: 99\r\nTE: gzip\r\nGrpc-Status: 0\r\n\r\n"
                .to_vec(),
        )
    })
    .await;
    let p = TestProxy::start(&service("api", &[up], &[dead_addr().await], "")).await;
    let tcp = TcpStream::connect(p.proxy).await.expect("connect");
    let mut s = h2(tcp).await;
    let req = Request::get(format!("http://api.local:{}/t", p.proxy.port()))
        .header("te", "trailers")
        .body(Empty::new())
        .expect("req");
    let resp = tokio::time::timeout(T, s.send_request(req))
        .await
        .expect("timeout")
        .expect("request");
    assert_eq!(resp.status(), 200);
    let collected = tokio::time::timeout(T, resp.into_body().collect())
        .await
        .expect("timeout")
        .expect("the response was lost");
    let trailers = collected.trailers().cloned().expect("trailers");
    let names: Vec<&str> = trailers.keys().map(|k| k.as_str()).collect();
    assert_eq!(names, ["grpc-status"]);
    assert_eq!(&collected.to_bytes()[..], b"hello");
    p.stop().await;
}

/// A body that sends one frame and then never another (nor ends).
struct Stalls(Option<Bytes>);
impl http_body::Body for Stalls {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        match self.0.take() {
            Some(b) => std::task::Poll::Ready(Some(Ok(http_body::Frame::data(b)))),
            None => std::task::Poll::Pending,
        }
    }
}

/// `body_idle_timeout` holds for h2 upstream pools too: a response body that stalls is aborted
/// toward the client instead of holding it forever.
#[tokio::test]
async fn a_stalled_h2_upstream_body_is_aborted_at_the_body_idle_timeout() {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let up = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let svc = service_fn(|_req: Request<Incoming>| async move {
                Ok::<_, Infallible>(Response::new(Stalls(Some(Bytes::from_static(b"partial")))))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc),
            );
        }
    });
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nbody_idle_timeout = \"1s\"\nshutdown_grace = \"1s\"\n\n[[services]]\nname = \"grpc\"\nblue = {{ upstreams = [\"{up}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{}\"], protocol = \"h2\" }}\n",
        dead_addr().await
    ))
    .await;
    let tcp = TcpStream::connect(p.proxy).await.expect("connect");
    let mut s = h1(tcp).await;
    let req = Request::builder()
        .uri("/stream")
        .header("host", "a")
        .body(Empty::new())
        .expect("req");
    let resp = tokio::time::timeout(T, s.send_request(req))
        .await
        .expect("timeout")
        .expect("request");
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .expect("the client was left waiting on a stalled h2 upstream");
    assert!(body.is_err(), "a stalled body looked complete");
    p.stop().await;
}

#[tokio::test]
async fn h2_streams_past_the_limit_wait_instead_of_running() {
    let blue = TestUpstream::start("blue").await;
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nh2_max_concurrent_streams = 4\nshutdown_grace = \"2s\"\n{}",
        service("api", &[blue.addr], &[dead_addr().await], "")
    ))
    .await;
    let tcp = TcpStream::connect(p.proxy).await.expect("connect");
    let mut s = h2(tcp).await;
    let port = p.proxy.port();
    let req = || {
        Request::builder()
            .uri(format!("http://a:{port}/x"))
            .body(Empty::new())
            .expect("req")
    };
    // One request first, so the client has the server's SETTINGS before the burst.
    assert_eq!(send(&mut s, req()).await.0, 200);
    blue.set_delay(300);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..12 {
        let mut s = s.clone();
        let r = req();
        tasks.spawn(async move {
            match s.send_request(r).await {
                Ok(r) => r.status().as_u16(),
                Err(e) => {
                    eprintln!("stream failed: {e:?}");
                    0
                }
            }
        });
    }
    let app = p.app().clone();
    let mut peak = 0;
    let mut ok = 0;
    let deadline = tokio::time::Instant::now() + T;
    while !tasks.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "streams did not finish"
        );
        let snap = app.snapshot();
        let live: usize = snap.upstreams().map(|(_, _, u)| u.outstanding()).sum();
        peak = peak.max(live);
        if let Ok(Some(r)) =
            tokio::time::timeout(Duration::from_millis(20), tasks.join_next()).await
        {
            if r.expect("task") == 200 {
                ok += 1;
            }
        }
    }
    assert_eq!(ok, 12, "every stream past the limit still completes");
    assert!(
        peak <= 4,
        "{peak} streams ran at once with h2_max_concurrent_streams = 4"
    );
    assert!(peak >= 2, "the burst never ran concurrently (peak {peak})");
    assert_eq!(blue.hits(), 13);
    p.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Upgrades

/// Answers 101 to upgrade requests (and to `/force101` whatever was asked), then echoes every
/// chunk back prefixed with its name.
async fn ws_upstream(name: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let h = h.clone();
            let svc = service_fn(move |mut req: Request<Incoming>| {
                h.fetch_add(1, Ordering::SeqCst);
                async move {
                    let asked = req.headers().get("upgrade").is_some();
                    if !asked && req.uri().path() != "/force101" {
                        return Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(
                            format!("{name} plain\n"),
                        ))));
                    }
                    let on = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        let Ok(up) = on.await else { return };
                        let mut io = TokioIo::new(up);
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = io.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            let mut out = format!("{name}:").into_bytes();
                            out.extend_from_slice(&buf[..n]);
                            if io.write_all(&out).await.is_err() {
                                break;
                            }
                        }
                    });
                    let mut r = Response::new(Full::new(Bytes::new()));
                    *r.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                    r.headers_mut()
                        .insert("connection", HeaderValue::from_static("upgrade"));
                    r.headers_mut()
                        .insert("upgrade", HeaderValue::from_static("websocket"));
                    Ok(r)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades(),
            );
        }
    });
    (addr, hits)
}

async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(T, s.read(&mut b))
            .await
            .expect("timeout")
        {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

async fn roundtrip(s: &mut TcpStream, msg: &str) -> String {
    s.write_all(msg.as_bytes()).await.expect("write");
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(T, s.read(&mut buf))
        .await
        .expect("timeout")
        .expect("read");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test]
async fn websocket_tunnels_stay_on_their_color_and_only_when_asked() {
    let (blue, _) = ws_upstream("blue").await;
    let (green, green_hits) = ws_upstream("green").await;
    let p = TestProxy::start(&service("api", &[blue], &[green], "")).await;

    let mut ws = TcpStream::connect(p.proxy).await.expect("connect");
    ws.write_all(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await
        .expect("write");
    let head = read_head(&mut ws).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head:?}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head:?}"
    );
    assert_eq!(roundtrip(&mut ws, "one").await, "blue:one");

    let (s, v) = p.flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(p.get("/x").await, (200, "green plain\n".to_string()));
    assert_eq!(
        roundtrip(&mut ws, "two").await,
        "blue:two",
        "the tunnel moved"
    );
    assert_eq!(roundtrip(&mut ws, "three").await, "blue:three");
    assert_eq!(
        green_hits.load(Ordering::SeqCst),
        1,
        "only the plain request went to green"
    );

    // An upstream that switches protocols unasked is a broken response.
    let (s, body) = p.get("/force101").await;
    assert_eq!(s, 502, "{body}");
    // ...and its connection never goes back to the pool: the next requests are served.
    for _ in 0..3 {
        assert_eq!(p.get("/x").await, (200, "green plain\n".to_string()));
    }
    // The metrics count what each client got: the tunnel's 101, the unasked switch's 502.
    let by_code =
        |m: &str, code: &str| metric_sum(m, "switchyard_requests_total", &[("code", code)]);
    let counted = eventually(10, || async {
        let (_, m) = get(p.admin, "/metrics").await;
        by_code(&m, "101") == 1.0 && by_code(&m, "502") == 1.0
    })
    .await;
    let (_, m) = get(p.admin, "/metrics").await;
    assert!(counted, "one 101 and one 502:\n{m}");
    p.stop().await;
}

/// Opens a WebSocket-style tunnel through the proxy.
async fn open_tunnel(proxy: SocketAddr) -> TcpStream {
    let mut ws = TcpStream::connect(proxy).await.expect("connect");
    ws.write_all(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .expect("write");
    let head = read_head(&mut ws).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head:?}");
    ws
}

/// At shutdown an open tunnel drains like a request: bytes still flow through it during
/// `shutdown_grace`, and shutdown ends as soon as it closes.
#[tokio::test]
async fn websocket_tunnels_drain_at_shutdown() {
    let (blue, _) = ws_upstream("blue").await;
    // Waiting out the grace would take 10 s: seconds more than the bound below, which leaves
    // a loaded machine seconds for the two pauses and three round trips.
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"10s\"\n{}",
        service("api", &[blue], &[dead_addr().await], "")
    ))
    .await;
    let mut ws = open_tunnel(p.proxy).await;
    assert_eq!(roundtrip(&mut ws, "one").await, "blue:one");

    let began = tokio::time::Instant::now();
    let stop = tokio::spawn(p.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !stop.is_finished(),
        "shutdown did not wait for the open tunnel"
    );
    assert_eq!(roundtrip(&mut ws, "two").await, "blue:two");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(roundtrip(&mut ws, "three").await, "blue:three");
    assert!(!stop.is_finished());

    drop(ws);
    tokio::time::timeout(Duration::from_secs(5), stop)
        .await
        .expect("shutdown did not end once the tunnel closed")
        .expect("stop");
    assert!(
        began.elapsed() < Duration::from_secs(6),
        "{:?}",
        began.elapsed()
    );
}

/// A proxy with `extra` in its `[proxy]` table in front of a WebSocket upstream (blue), and a
/// tunnel through it that has carried one message.
async fn proxy_with_tunnel(extra: &str) -> (TestProxy, TcpStream) {
    let (blue, _) = ws_upstream("blue").await;
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n{extra}{}",
        service("api", &[blue], &[dead_addr().await], "")
    ))
    .await;
    let mut ws = open_tunnel(p.proxy).await;
    assert_eq!(roundtrip(&mut ws, "one").await, "blue:one");
    (p, ws)
}

/// A tunnel still open when `shutdown_grace` ends is closed, and shutdown ends then.
#[tokio::test]
async fn a_tunnel_open_past_the_grace_is_closed() {
    let (p, mut ws) = proxy_with_tunnel("shutdown_grace = \"1s\"\n").await;
    let began = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(4), p.stop())
        .await
        .expect("shutdown waited past the grace for an open tunnel");
    let took = began.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "closed before the grace: {took:?}"
    );
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(10), ws.read(&mut buf))
        .await
        .expect("the tunnel was left open after shutdown");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
}

/// An open tunnel is a client connection: it keeps its `max_connections` slot, and the slot
/// frees when the tunnel closes.
#[tokio::test]
async fn an_open_tunnel_counts_against_max_connections() {
    let (p, ws) = proxy_with_tunnel("max_connections = 1\nshutdown_grace = \"2s\"\n").await;
    let mut next = TcpStream::connect(p.proxy).await.expect("connect");
    next.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(500), next.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "a second connection was served while the tunnel held the only slot"
    );
    drop(ws);
    let n = tokio::time::timeout(Duration::from_secs(10), next.read(&mut buf))
        .await
        .expect("not served after the tunnel closed")
        .expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    p.stop().await;
}

#[tokio::test]
async fn upgrade_h2c_is_stripped_and_connect_is_405() {
    let blue = TestUpstream::start("blue").await;
    let p = TestProxy::start(&service("api", &[blue.addr], &[dead_addr().await], "")).await;
    let mut s = TcpStream::connect(p.proxy).await.expect("connect");
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
        .await
        .expect("write");
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head:?}");
    let seen = blue.last_headers.lock().expect("lock").clone();
    for (k, _) in &seen {
        assert!(
            !matches!(k.as_str(), "upgrade" | "connection" | "http2-settings"),
            "{k} reached the upstream: {seen:?}"
        );
    }
    let mut c = TcpStream::connect(p.proxy).await.expect("connect");
    c.write_all(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        .await
        .expect("write");
    let head = read_head(&mut c).await;
    assert!(head.starts_with("HTTP/1.1 405"), "{head:?}");
    // A 405 says which methods are taken (RFC 9110 15.5.6).
    assert!(
        head.to_ascii_lowercase()
            .contains("\r\nallow: get, head, post, put, delete, options, trace, patch\r\n"),
        "{head:?}"
    );
    assert_eq!(blue.hits(), 1);
    p.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Admin hardening

#[tokio::test]
async fn admin_checks_host_and_methods() {
    let blue = TestUpstream::start("blue").await;
    let p = TestProxy::start(&service("api", &[blue.addr], &[dead_addr().await], "")).await;
    let evil = [("host", "evil.example")];
    let (s, b) = request(p.admin, "GET", "/api/status", &evil, Bytes::new()).await;
    assert_eq!(s, 403, "{b}");
    let (s, b) = request(p.admin, "POST", "/api/flip", &evil, Bytes::new()).await;
    assert_eq!(s, 403, "{b}");
    let wrong = [("host", "evil.example"), ("authorization", "Bearer nope")];
    let (s, b) = request(p.admin, "GET", "/api/status", &wrong, Bytes::new()).await;
    assert_eq!(s, 403, "{b}");
    // The right token is no rebinding page: a name not listed is served (`ctl --admin
    // http://switchyard:9090` in a container network), for reads and changes alike.
    let auth = format!("Bearer {TOKEN}");
    let token = [
        ("host", "switchyard:9090"),
        ("authorization", auth.as_str()),
    ];
    let (s, b) = request(p.admin, "GET", "/api/status", &token, Bytes::new()).await;
    assert_eq!(s, 200, "{b}");
    let flip = [
        ("host", "switchyard:9090"),
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    let (s, b) = request(
        p.admin,
        "POST",
        "/api/services/api/flip",
        &flip,
        Bytes::from_static(b"{\"to\": \"blue\"}"),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    for host in ["localhost:9090", "127.0.0.1", "[::1]:9090"] {
        let (s, b) = request(
            p.admin,
            "GET",
            "/api/status",
            &[("host", host)],
            Bytes::new(),
        )
        .await;
        assert_eq!(s, 200, "{host}: {b}");
    }
    for path in ["/metrics", "/healthz"] {
        let (s, b) = request(p.admin, "GET", path, &evil, Bytes::new()).await;
        assert_eq!(s, 200, "{path}: {b}");
    }
    for (m, path) in [
        ("DELETE", "/api/status"),
        ("GET", "/api/reload"),
        ("GET", "/api/flip"),
        ("PUT", "/api/services/api/flip"),
    ] {
        let (s, b) = request(p.admin, m, path, &[], Bytes::new()).await;
        assert_eq!(s, 405, "{m} {path}: {b}");
    }
    p.stop().await;
}

/// The Host allow-list is a DNS-rebinding defence, and a rebinding page makes the browser send
/// the attacker's name: an IP-literal Host (any address, with or without port, IPv6 bracketed)
/// is accepted by default, as containers and load balancers reach the admin listener by IP.
/// Names stay refused unless `[admin] allowed_hosts` lists them.
#[tokio::test]
async fn admin_accepts_any_ip_literal_host_and_only_listed_names() {
    let blue = TestUpstream::start("blue").await;
    let body = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\nallowed_hosts = [\"switchyard.internal\"]\n{}",
        service("api", &[blue.addr], &[dead_addr().await], "")
    );
    let p = TestProxy::start(&body).await;
    let mut problems = Vec::new();
    for (host, want) in [
        ("10.0.0.5:9090", 200),
        ("10.0.0.5", 200),
        ("192.168.1.20:80", 200),
        ("[2001:db8::5]:9090", 200),
        ("[fd00::5]", 200),
        ("switchyard.internal:9090", 200),
        ("SwitchYard.Internal", 200),
        ("switchyard:9090", 403),
        ("10.0.0.5.nip.io", 403),
        ("evil.example", 403),
        // Only a port may follow a bracketed IPv6 literal; brackets hold IPv6 only.
        ("[::1]evil.com", 403),
        ("[::1]evil.com:9090", 403),
        ("[::1].evil.com", 403),
        ("[::1]:9090evil", 403),
        ("[::1]:", 200),
        ("[10.0.0.5]", 403),
        ("[localhost]", 403),
        ("10.0.0.5:evil", 403),
    ] {
        let (s, b) = request(
            p.admin,
            "GET",
            "/api/status",
            &[("host", host)],
            Bytes::new(),
        )
        .await;
        if s != want {
            problems.push(format!("GET Host {host}: {s} (want {want}): {b}"));
        }
    }
    // A mutating call by IP passes the Host check and reaches the token check.
    let (s, b) = request(
        p.admin,
        "POST",
        "/api/flip",
        &[("host", "10.0.0.5:9090")],
        Bytes::new(),
    )
    .await;
    if s != 401 {
        problems.push(format!(
            "POST /api/flip by IP without a token: {s} (want 401): {b}"
        ));
    }
    // Absolute form: the target's authority is the one checked.
    for (authority, want) in [("10.0.0.5:9090", 200), ("[::1]evil.com", 403)] {
        let (status, text) = raw_admin(
            p.admin,
            &format!(
                "GET http://{authority}/api/status HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        if status != want {
            let short: String = text.chars().take(300).collect();
            problems.push(format!(
                "absolute form {authority}: {status} (want {want}): {short:?}"
            ));
        }
    }
    let c = h2c_client(p.admin).await;
    h2_statuses(
        &c,
        &[
            ("http://10.0.0.5:9090/api/status", 200),
            ("http://[2001:db8::5]/api/status", 200),
            ("http://rebind.example/api/status", 403),
            ("http://[::1]evil.com/api/status", 403),
        ],
        &mut problems,
    )
    .await;
    p.stop().await;
    assert!(problems.is_empty(), "{problems:#?}");
}

/// One raw HTTP/1 request to `addr` (that asks to close, or is HTTP/1.0); the status and the
/// whole answer.
async fn raw_admin(addr: SocketAddr, req: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(T, s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// GET each URI over `c`; a status other than the one wanted is a problem.
async fn h2_statuses(
    c: &h2::client::SendRequest<Bytes>,
    cases: &[(&str, u16)],
    problems: &mut Vec<String>,
) {
    for &(uri, want) in cases {
        let (status, _, _) = h2c_request(c, "GET", uri).await;
        if status != want {
            problems.push(format!("h2 {uri}: {status} (want {want})"));
        }
    }
}

/// An authorized h2 POST of a flip declaring `length` body bytes, none sent yet: the response
/// to come and the stream to send the body on.
async fn h2_flip_post(
    admin: SocketAddr,
    length: u64,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let c = h2c_client(admin).await;
    let req = Request::post("http://127.0.0.1/api/services/api/flip")
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .header("content-length", length)
        .body(())
        .expect("request");
    let mut c = c.ready().await.expect("ready");
    c.send_request(req, false).expect("send")
}

/// An h2c client (raw frames, the `h2` crate) on `addr`.
async fn h2c_client(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    client
}

/// One h2 request without a body: the status, the Content-Length and the DATA received
/// (`Err` if the stream failed while reading it).
async fn h2c_request(
    client: &h2::client::SendRequest<Bytes>,
    method: &str,
    uri: &str,
) -> (u16, Option<String>, Result<Vec<u8>, String>) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .body(())
        .expect("req");
    let mut c = client.clone().ready().await.expect("ready");
    let (resp, _) = c.send_request(req, true).expect("send");
    let resp = tokio::time::timeout(T, resp)
        .await
        .expect("in time")
        .expect("response");
    let status = resp.status().as_u16();
    let len = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut body = resp.into_body();
    let mut data = Ok(Vec::new());
    while let Some(chunk) = tokio::time::timeout(T, body.data()).await.expect("in time") {
        match chunk {
            Ok(b) => {
                let _ = body.flow_control().release_capacity(b.len());
                if let Ok(d) = data.as_mut() {
                    d.extend_from_slice(&b);
                }
            }
            Err(e) => {
                data = Err(e.to_string());
                break;
            }
        }
    }
    (status, len, data)
}

/// RFC 9112 3.2 / 3.2.2 on the admin listener: an HTTP/1.1 request without exactly one Host is
/// 400 (JSON, as every admin error), whatever its path; an absolute-form target's authority is
/// what the allowed-hosts check reads, not Host. HTTP/1.0 without Host, and h2 by
/// `:authority`, are served as before.
#[tokio::test]
async fn admin_requests_need_one_host_and_an_absolute_target_is_checked_by_its_authority() {
    let blue = TestUpstream::start("blue").await;
    let p = TestProxy::start(&service("api", &[blue.addr], &[dead_addr().await], "")).await;
    let mut problems = Vec::new();
    let close = "Connection: close\r\n\r\n";
    for (what, head, want) in [
        (
            "two Hosts",
            "GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n",
            400,
        ),
        (
            "two Hosts, /healthz",
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: 127.0.0.1\r\n",
            400,
        ),
        ("no Host", "GET /api/status HTTP/1.1\r\n", 400),
        ("no Host, /metrics", "GET /metrics HTTP/1.1\r\n", 400),
        (
            "absolute form without Host",
            "GET http://127.0.0.1/api/status HTTP/1.1\r\n",
            400,
        ),
        (
            "absolute form naming another host",
            "GET http://evil.example/api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n",
            403,
        ),
        (
            "absolute form naming loopback",
            "GET http://127.0.0.1/api/status HTTP/1.1\r\nHost: evil.example\r\n",
            200,
        ),
        (
            "one Host",
            "GET /api/status HTTP/1.1\r\nHost: localhost:9090\r\n",
            200,
        ),
        ("HTTP/1.0 without Host", "GET /api/status HTTP/1.0\r\n", 200),
        (
            "userinfo in an absolute form",
            "GET http://evil.example@127.0.0.1/api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n",
            400,
        ),
        (
            "userinfo in Host",
            "GET /api/status HTTP/1.1\r\nHost: evil.example@127.0.0.1\r\n",
            400,
        ),
    ] {
        let (status, text) = raw_admin(p.admin, &format!("{head}{close}")).await;
        let json_error =
            text.contains("\r\ncontent-type: application/json\r\n") && text.contains("\"error\"");
        if status != want || (want >= 400 && !json_error) {
            let short: String = text.chars().take(300).collect();
            problems.push(format!("{what}: {status} (want {want}): {short:?}"));
        }
    }
    let c = h2c_client(p.admin).await;
    h2_statuses(
        &c,
        &[
            ("http://localhost/api/status", 200),
            ("http://evil.example/api/status", 403),
        ],
        &mut problems,
    )
    .await;
    p.stop().await;
    assert!(problems.is_empty(), "{problems:#?}");
}

/// RFC 9110 9.3.2: an answer to HEAD has no body, over h2c as over HTTP/1.1 (hyper's h2 server
/// sends what the handler gives it), and keeps the GET answer's Content-Length.
#[tokio::test]
async fn admin_head_answers_have_no_body_over_h2c_and_http1() {
    let blue = TestUpstream::start("blue").await;
    let p = TestProxy::start(&service("api", &[blue.addr], &[dead_addr().await], "")).await;
    let c = h2c_client(p.admin).await;
    let mut problems = Vec::new();
    for path in ["/healthz", "/metrics", "/api/status", "/", "/nope"] {
        let uri = format!("http://localhost{path}");
        let (get_status, get_len, get_body) = h2c_request(&c, "GET", &uri).await;
        let (status, len, body) = h2c_request(&c, "HEAD", &uri).await;
        if status != get_status {
            problems.push(format!("h2 HEAD {path}: {status}, GET {get_status}"));
        }
        if body != Ok(Vec::new()) {
            problems.push(format!("h2 HEAD {path}: a body: {body:?}"));
        }
        // /metrics and /api/status may change between the two.
        let stable = matches!(path, "/healthz" | "/" | "/nope");
        if len.is_none() || (stable && len != get_len) {
            problems.push(format!(
                "h2 HEAD {path}: content-length {len:?}, GET {get_len:?} ({} bytes)",
                get_body.map(|b| b.len()).unwrap_or(0)
            ));
        }
        let (status, text) = raw_admin(
            p.admin,
            &format!("HEAD {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
        )
        .await;
        let after_head = text.split_once("\r\n\r\n").map(|(_, b)| b.len());
        let h1_len = text.lines().find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_string)
        });
        if status != get_status || after_head != Some(0) || (stable && h1_len != get_len) {
            problems.push(format!(
                "HTTP/1.1 HEAD {path}: {text:?}, GET length {get_len:?}"
            ));
        }
    }
    p.stop().await;
    assert!(problems.is_empty(), "{problems:#?}");
}

// ---------------------------------------------------------------------------------------------
// Reload

fn upstream_requests(svc: &Value, color: &str, addr: SocketAddr) -> Option<u64> {
    svc["colors"][color]["upstreams"]
        .as_array()?
        .iter()
        .find(|u| u["addr"] == addr.to_string())?["requests"]
        .as_u64()
}

#[tokio::test]
async fn reload_keeps_colors_generations_and_stats_and_refuses_bad_files() {
    let b1 = TestUpstream::start("b1").await;
    let g1 = TestUpstream::start("g1").await;
    let g2 = TestUpstream::start("g2").await;
    let p = TestProxy::start(&service("api", &[b1.addr], &[g1.addr], "")).await;
    let dir = p.dir.as_ref().expect("dir").path().to_path_buf();
    assert_eq!(p.flip("api", "green").await.0, 200);
    for _ in 0..5 {
        assert_eq!(p.get("/x").await, (200, "g1\n".to_string()));
    }
    let before = p.service_status("api").await;
    assert_eq!(
        upstream_requests(&before, "green", g1.addr),
        Some(5),
        "{before}"
    );

    std::fs::write(
        &p.config_path,
        full_config(&service("api", &[b1.addr], &[g1.addr, g2.addr], ""), &dir),
    )
    .expect("write");
    let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["restart_required"], serde_json::json!([]), "{v}");
    let after = p.service_status("api").await;
    assert_eq!(after["active"], "green", "{after}");
    assert_eq!(after["generation"], before["generation"], "{after}");
    assert_eq!(
        upstream_requests(&after, "green", g1.addr),
        Some(5),
        "{after}"
    );
    assert_eq!(
        upstream_requests(&after, "green", g2.addr),
        Some(0),
        "{after}"
    );

    // Invalid: every error reported, nothing changed.
    let bad = format!(
        "{}\nbogus_key = 1\n",
        service("api", &[b1.addr], &[g1.addr], "").replace(&g1.addr.to_string(), "x:y")
    );
    std::fs::write(&p.config_path, full_config(&bad, &dir)).expect("write");
    let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(s, 400, "{v}");
    let errors = v["errors"].as_array().cloned().unwrap_or_default();
    assert!(errors.len() >= 2, "{v}");
    let all = v.to_string();
    assert!(all.contains("bogus_key") && all.contains("x:y"), "{v}");
    let same = p.service_status("api").await;
    assert_eq!(
        upstream_requests(&same, "green", g2.addr),
        Some(0),
        "{same}"
    );
    assert_eq!(same["active"], "green");

    // A new listen address takes a restart, and says so.
    let moved = full_config(&service("api", &[b1.addr], &[g1.addr, g2.addr], ""), &dir).replacen(
        "listen = \"127.0.0.1:0\"",
        "listen = \"127.0.0.1:1\"",
        1,
    );
    std::fs::write(&p.config_path, moved).expect("write");
    let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["restart_required"],
        serde_json::json!(["proxy.listen"]),
        "{v}"
    );
    assert_eq!(p.get("/x").await.0, 200, "still serving on the old address");
    p.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Zero-error changes

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_request_fails_while_flipping_and_reloading() {
    let b1 = TestUpstream::start("b1").await;
    let b2 = TestUpstream::start("b2").await;
    let g1 = TestUpstream::start("g1").await;
    let one = service("api", &[b1.addr], &[g1.addr], "");
    let two = service("api", &[b1.addr, b2.addr], &[g1.addr], "");
    let p = TestProxy::start(&one).await;
    let dir = p.dir.as_ref().expect("dir").path().to_path_buf();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..8 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let addr = p.proxy;
        clients.spawn(async move {
            let h1c = client();
            let mut h2c = if i % 2 == 1 {
                Some(h2(TcpStream::connect(addr).await.expect("connect")).await)
            } else {
                None
            };
            while !stop.load(Ordering::SeqCst) {
                let outcome = match &mut h2c {
                    Some(s) => {
                        let req = Request::builder()
                            .uri(format!("http://a:{}/x", addr.port()))
                            .body(Empty::new())
                            .expect("req");
                        match tokio::time::timeout(T, s.send_request(req)).await {
                            Ok(Ok(r)) => {
                                let st = r.status().as_u16();
                                match r.into_body().collect().await {
                                    Ok(_) => Ok(st),
                                    Err(e) => Err(format!("h2 body: {e}")),
                                }
                            }
                            Ok(Err(e)) => Err(format!("h2: {e}")),
                            Err(_) => Err("h2 timeout".to_string()),
                        }
                    }
                    None => {
                        let req = Request::builder()
                            .uri(format!("http://{addr}/x"))
                            .body(Full::new(Bytes::new()))
                            .expect("req");
                        match tokio::time::timeout(T, h1c.request(req)).await {
                            Ok(Ok(r)) => {
                                let st = r.status().as_u16();
                                match r.into_body().collect().await {
                                    Ok(_) => Ok(st),
                                    Err(e) => Err(format!("h1 body: {e}")),
                                }
                            }
                            Ok(Err(e)) => Err(format!("h1: {e}")),
                            Err(_) => Err("h1 timeout".to_string()),
                        }
                    }
                };
                match outcome {
                    Ok(200) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(s) => failed.lock().expect("lock").push(format!("status {s}")),
                    Err(e) => failed.lock().expect("lock").push(e),
                }
            }
        });
    }
    for i in 0..30 {
        let to = if i % 2 == 0 { "green" } else { "blue" };
        let (s, v) = p.flip("api", to).await;
        assert_eq!(s, 200, "flip {i}: {v}");
        if i % 3 == 0 {
            let body = if (i / 3) % 2 == 0 { &two } else { &one };
            std::fs::write(&p.config_path, full_config(body, &dir)).expect("write");
            let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
            assert_eq!(s, 200, "reload {i}: {v}");
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    stop.store(true, Ordering::SeqCst);
    while let Some(r) = tokio::time::timeout(T, clients.join_next())
        .await
        .expect("clients did not stop")
    {
        r.expect("client task");
    }
    let failed = failed.lock().expect("lock").clone();
    let ok = ok.load(Ordering::SeqCst);
    eprintln!("zero-error run: {ok} requests ok, {} failed", failed.len());
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 200, "too little traffic to prove anything: {ok}");
    assert!(b1.hits() > 0 && g1.hits() > 0 && b2.hits() > 0);
    let events = p.events().await;
    assert!(events.iter().filter(|e| e["reason"] == "reload").count() >= 10);
    p.stop().await;
}

/// The real binary under load: SIGHUP reloads, SIGTERM finishes every in-flight request and
/// exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_finishes_in_flight_requests_and_exits_0() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    blue.set_delay(300);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("switchyard.toml");
    let body = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n{}",
        service("api", &[blue.addr], &[green.addr], "")
    );
    std::fs::write(&path, full_config(&body, dir.path())).expect("write");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let pid = child.id().expect("pid").to_string();
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    let find = |line: &str, key: &str| -> Option<SocketAddr> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split_whitespace()
            .next()?
            .trim_matches('"')
            .parse()
            .ok()
    };
    let (proxy, admin) = tokio::time::timeout(T, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("switchyard is serving") {
                return (find(&line, "proxy="), find(&line, "admin="));
            }
        }
        (None, None)
    })
    .await
    .expect("no startup line");
    let (proxy, admin) = (proxy.expect("proxy addr"), admin.expect("admin addr"));
    // Keep draining the log so the child never blocks on a full pipe.
    let log = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            all.push(line);
        }
        all
    });

    // SIGHUP reloads the file.
    assert_eq!(get(proxy, "/x").await, (200, "blue\n".to_string()));
    let kill = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
        assert!(status.success());
    };
    kill("-HUP");
    let ok = eventually(5, || async {
        let (_, v) = admin_get(admin, "/api/events").await;
        v["events"].as_array().is_some_and(|e| {
            e.iter()
                .any(|e| e["reason"] == "reload" && e["actor"] == "SIGHUP")
        })
    })
    .await;
    assert!(ok, "SIGHUP did not reload");

    let mut inflight = tokio::task::JoinSet::new();
    for i in 0..6 {
        inflight.spawn(async move {
            let path = if i % 2 == 0 { "/x" } else { "/echo" };
            let body = if i % 2 == 0 {
                Bytes::new()
            } else {
                Bytes::from_static(b"payload")
            };
            let method = if i % 2 == 0 { "GET" } else { "POST" };
            request(proxy, method, path, &[], body).await.0
        });
    }
    let started = eventually(5, || async { blue.hits() >= 7 }).await;
    assert!(started, "requests never reached the upstream");
    kill("-TERM");
    let mut codes = Vec::new();
    while let Some(r) = tokio::time::timeout(T, inflight.join_next())
        .await
        .expect("in-flight requests hung")
    {
        codes.push(r.expect("task"));
    }
    assert_eq!(codes, vec![200; 6], "in-flight requests failed on SIGTERM");
    let status = tokio::time::timeout(T, child.wait())
        .await
        .expect("did not exit after SIGTERM")
        .expect("wait");
    let log = log.await.unwrap_or_default();
    assert_eq!(status.code(), Some(0), "log:\n{}", log.join("\n"));
    // Stopped listening.
    assert!(
        TcpStream::connect(proxy).await.is_err(),
        "still accepting after exit"
    );
}

/// An h2c upstream that answers with the `:authority` and `Host` it saw.
async fn authority_echo_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let svc = service_fn(|req: Request<Incoming>| async move {
                let authority = req.uri().authority().map(|a| a.to_string());
                let host = req
                    .headers()
                    .get("host")
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                let body = format!("authority={authority:?} host={host:?}");
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body))))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc),
            );
        }
    });
    addr
}

/// RFC 9113 8.3.1: over an h2 upstream pool the request's `:authority` is the client's host,
/// the same as its `Host` (as an HTTP/1.1 upstream keeps the client's `Host`), not the
/// upstream's address; and a bodiless request retried on another upstream keeps it.
#[tokio::test]
async fn an_h2_upstream_sees_the_clients_authority_equal_to_host() {
    let up = authority_echo_upstream().await;
    let dead = dead_addr().await;
    let p = TestProxy::start(&format!(
        "[proxy]\nretries = 1\n\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{dead}\", \"{up}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{up}\"], protocol = \"h2\" }}\n"
    ))
    .await;
    // Over HTTP/1.1 (Host), several times so that both the dead and the live upstream are
    // picked first at least once.
    for _ in 0..6 {
        let mut s = TcpStream::connect(p.proxy).await.expect("connect");
        s.write_all(b"GET /x HTTP/1.1\r\nHost: api.example:8443\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut got = Vec::new();
        tokio::time::timeout(T, s.read_to_end(&mut got))
            .await
            .expect("timeout")
            .expect("read");
        let got = String::from_utf8_lossy(&got);
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert!(
            got.ends_with("authority=Some(\"api.example:8443\") host=Some(\"api.example:8443\")"),
            "{got}"
        );
    }
    // Over h2 (:authority).
    let tcp = TcpStream::connect(p.proxy).await.expect("connect");
    let mut s = h2(tcp).await;
    let req = Request::builder()
        .uri("http://api.example/y")
        .version(http::Version::HTTP_2)
        .body(Empty::new())
        .expect("req");
    let resp = tokio::time::timeout(T, s.send_request(req))
        .await
        .expect("timeout")
        .expect("request");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.starts_with("authority=Some(\"api.example\")"),
        "{body}"
    );
    assert!(
        !body.contains(&up.to_string()),
        "the upstream's address leaked into the request: {body}"
    );
    p.stop().await;
}

/// Switchyard in front of Switchyard over h2: the inner one refuses a request whose `host`
/// differs from its `:authority` (RFC 9113 8.3.1), so this chain works only when the outer one
/// sends the client's authority.
#[tokio::test]
async fn switchyard_behind_switchyard_over_h2() {
    let app = TestUpstream::start("inner").await;
    let inner = TestProxy::start(&service("api", &[app.addr], &[app.addr], "")).await;
    let outer = TestProxy::start(&format!(
        "\n[[services]]\nname = \"edge\"\nblue = {{ upstreams = [\"{}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{}\"], protocol = \"h2\" }}\n",
        inner.proxy, inner.proxy
    ))
    .await;
    let (s, body) = outer.get("/hello").await;
    assert_eq!(s, 200, "{body}");
    inner.stop().await;
    outer.stop().await;
}

/// An h2 upstream whose connections all close (it restarted): the next request through the
/// pool opens a new connection instead of failing on the old one.
#[tokio::test]
async fn an_h2_upstream_that_closes_its_connections_is_reconnected() {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let up = l.local_addr().expect("addr");
    let (cut_tx, cut_rx) = tokio::sync::watch::channel(0u32);
    let accepted = Arc::new(AtomicUsize::new(0));
    let accepted2 = accepted.clone();
    let server = tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            accepted2.fetch_add(1, Ordering::SeqCst);
            let mut cut = cut_rx.clone();
            cut.mark_unchanged();
            tokio::spawn(async move {
                let svc = service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"up"))))
                });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc);
                // A restart: the connection is dropped, no GOAWAY.
                tokio::select! {
                    _ = conn => {}
                    _ = cut.changed() => {}
                }
            });
        }
    });
    let p = TestProxy::start(&format!(
        "\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{up}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{up}\"], protocol = \"h2\" }}\n"
    ))
    .await;
    for round in 0..3u32 {
        for _ in 0..3 {
            let (s, body) = p.get("/x").await;
            assert_eq!((s, body.as_str()), (200, "up"), "round {round}");
        }
        cut_tx.send_replace(round + 1);
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "one connection per round, shared by its requests"
    );
    p.stop().await;
    server.abort();
}

/// A POST whose body stalls is answered 408 (JSON) within `[admin] header_read_timeout` and its
/// connection closed, over HTTP/1.1 and h2: stalled bodies no longer hold the admin's
/// connections (and `/healthz` behind them) for as long as the client likes. A body the client
/// cuts is 400, not "too large".
#[tokio::test]
async fn an_admin_post_whose_body_stalls_is_answered_408_and_its_slot_freed() {
    let blue = TestUpstream::start("blue").await;
    let body = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\nmax_connections = 2\nheader_read_timeout = \"1s\"\n{}",
        service("api", &[blue.addr], &[dead_addr().await], "")
    );
    let p = TestProxy::start(&body).await;
    let stalled = format!(
        "POST /api/services/api/flip HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    );
    // Both of the listener's slots, each with a body that never comes.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(p.admin).await.expect("connect");
        s.write_all(stalled.as_bytes()).await.expect("write");
        held.push(s);
    }
    let mut problems = Vec::new();
    for (i, mut s) in held.into_iter().enumerate() {
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        if read.is_err() {
            problems.push(format!("connection {i}: still open after 10 s: {text:?}"));
        } else if !(text.starts_with("HTTP/1.1 408 ")
            && text.contains("\"error\"")
            && text.contains("header_read_timeout"))
        {
            problems.push(format!("connection {i}: {text:?}"));
        }
    }
    let (status, text) = raw_admin(
        p.admin,
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    if status != 200 {
        problems.push(format!(
            "/healthz after the stalled POSTs: {status} {text:?}"
        ));
    }
    // A body cut short: 400, not 413.
    let cut = {
        let mut s = TcpStream::connect(p.admin).await.expect("connect");
        s.write_all(stalled.as_bytes()).await.expect("write");
        s.shutdown().await.expect("shutdown");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    if !cut.starts_with("HTTP/1.1 400 ") || !cut.contains("\"error\"") {
        problems.push(format!("body cut short: {cut:?}"));
    }
    // h2: the stream answered 408 too.
    let (resp, mut tx) = h2_flip_post(p.admin, 100).await;
    tx.send_data(Bytes::from_static(b"{"), false).expect("data");
    match tokio::time::timeout(Duration::from_secs(10), resp).await {
        Ok(Ok(r)) if r.status() == 408 => {}
        other => problems.push(format!("h2 stalled POST: {other:?}")),
    }
    assert!(problems.is_empty(), "{problems:#?}");
    let (s, _) = admin_get(p.admin, "/api/status").await;
    assert_eq!(s, 200);
    p.stop().await;
}

/// A POST that declares a body over the 64 KiB limit is answered 413 (JSON) at once, before
/// any of it is read: no `100 Continue` that would invite the upload, no wait for a body that
/// is never sent, and the connection closed (the unread body is not the next request).
#[tokio::test]
async fn an_admin_post_declared_too_large_is_answered_413_before_its_body() {
    let blue = TestUpstream::start("blue").await;
    let body = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\nheader_read_timeout = \"1s\"\n{}",
        service("api", &[blue.addr], &[dead_addr().await], "")
    );
    let p = TestProxy::start(&body).await;
    let mut problems = Vec::new();
    for expect in ["Expect: 100-continue\r\n", ""] {
        let head = format!(
            "POST /api/services/api/flip HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/json\r\n{expect}Content-Length: 70000\r\n\r\n"
        );
        // Read to the end: the connection must close (no wait for the body).
        let (_, text) = raw_admin(p.admin, &head).await;
        if !text.starts_with("HTTP/1.1 413 ")
            || !text.contains("\"error\"")
            || !text.to_ascii_lowercase().contains("connection: close")
        {
            problems.push(format!("{expect:?}: {text:?}"));
        }
    }
    // h2: the stream answered 413 with no DATA sent.
    let (resp, _tx) = h2_flip_post(p.admin, 70_000).await;
    match tokio::time::timeout(T, resp).await {
        Ok(Ok(r)) if r.status() == 413 => {}
        other => problems.push(format!("h2: {other:?}")),
    }
    assert!(problems.is_empty(), "{problems:#?}");
    let (s, _) = admin_get(p.admin, "/api/status").await;
    assert_eq!(s, 200);
    p.stop().await;
}

/// Admin TLS is turned on or off only by a restart: a reload that adds `[admin] tls_cert` and
/// `tls_key` to a plain admin listener (or takes them off one with TLS) says so in
/// `restart_required`, every time, instead of answering as if it were applied. With TLS on,
/// another pair of files is read at once, as a renewal is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_turns_admin_tls_on_or_off_takes_a_restart() {
    let blue = TestUpstream::start("blue").await;
    let certs = tempfile::tempdir().expect("tempdir");
    let a = make_cert(certs.path(), "a");
    let b = make_cert(certs.path(), "b");
    let tls_lines = |c: &Cert| {
        format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            c.cert.display(),
            c.key.display()
        )
    };
    let both = serde_json::json!(["admin.tls_cert", "admin.tls_key"]);
    let svc = service("api", &[blue.addr], &[dead_addr().await], "");

    // Off at startup, on in the file: reported by each reload; the listener stays plain.
    let p = TestProxy::start(&format!("[admin]\nlisten = \"127.0.0.1:0\"\n{svc}")).await;
    let text = std::fs::read_to_string(&p.config_path).expect("config");
    let on = text.replacen(
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\n{}", tls_lines(&a)),
        1,
    );
    assert_ne!(on, text);
    std::fs::write(&p.config_path, &on).expect("write");
    for round in 0..2 {
        let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["restart_required"], both, "reload {round}: {v}");
        assert_eq!(get(p.admin, "/healthz").await, (200, "ok".to_string()));
    }
    p.stop().await;

    // On at startup: another pair of files is served after the reload, nothing to restart;
    // the keys taken out are reported, and TLS stays on.
    let p = TestProxy::start(&format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n{}{svc}",
        tls_lines(&a)
    ))
    .await;
    let text = std::fs::read_to_string(&p.config_path).expect("config");
    std::fs::write(&p.config_path, text.replace(&tls_lines(&a), &tls_lines(&b))).expect("write");
    let outcome = p.app().reload("test").await.expect("reload");
    assert!(outcome.restart_required.is_empty(), "{outcome:?}");
    drop(tls_connect(p.admin, &[&b], b"http/1.1").await);
    std::fs::write(&p.config_path, text.replace(&tls_lines(&a), "")).expect("write");
    let outcome = p.app().reload("test").await.expect("reload");
    assert_eq!(
        serde_json::json!(outcome.restart_required),
        both,
        "{outcome:?}"
    );
    drop(tls_connect(p.admin, &[&b], b"http/1.1").await);
    p.stop().await;
}
