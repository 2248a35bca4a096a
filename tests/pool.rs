//! The upstream connection pool: keep-alive reuse, and no failed request when an upstream closes
//! idle connections behind the pool's back.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};

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
