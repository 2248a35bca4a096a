//! Shared helpers for the end-to-end tests: scripted upstream servers, an in-process
//! Switchyard, and small HTTP clients. Everything listens on 127.0.0.1 with ephemeral ports and
//! stops when dropped.
#![allow(dead_code)]

pub mod etcd;
pub mod relay;
pub mod release;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "test-token-123";

/// A scripted upstream: answers its name, or what the test tells it to.
pub struct TestUpstream {
    pub addr: SocketAddr,
    pub name: String,
    /// Status for normal requests (200 by default).
    pub status: AtomicU16,
    /// Status for `/health` (200 by default).
    pub health_status: AtomicU16,
    /// Delay before answering normal requests, in ms.
    pub delay_ms: AtomicU64,
    /// Close the connection without answering normal requests.
    pub reset: AtomicBool,
    /// Requests received (excluding /health).
    pub hits: AtomicUsize,
    pub health_hits: AtomicUsize,
    /// The last request's headers, as (name, value) pairs.
    pub last_headers: Mutex<Vec<(String, String)>>,
    stop: CancellationToken,
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// FNV-1a, to check a body arrived intact without keeping it.
pub fn fnv(data: &[u8], mut h: u64) -> u64 {
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}
pub const FNV_INIT: u64 = 0xcbf29ce484222325;

impl TestUpstream {
    pub async fn start(name: &str) -> Arc<TestUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let up = Arc::new(TestUpstream {
            addr: listener.local_addr().expect("addr"),
            name: name.to_string(),
            status: AtomicU16::new(200),
            health_status: AtomicU16::new(200),
            delay_ms: AtomicU64::new(0),
            reset: AtomicBool::new(false),
            hits: AtomicUsize::new(0),
            health_hits: AtomicUsize::new(0),
            last_headers: Mutex::new(Vec::new()),
            stop: CancellationToken::new(),
        });
        let weak = Arc::downgrade(&up);
        let stop = up.stop.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = stop.cancelled() => return,
                };
                let Some(me) = weak.upgrade() else { return };
                if me.reset.load(Ordering::SeqCst) {
                    // Read the request, then drop the connection without an answer.
                    me.hits.fetch_add(1, Ordering::SeqCst);
                    drop(me);
                    tokio::spawn(async move {
                        let mut buf = [0u8; 1024];
                        let _ = tokio::time::timeout(
                            Duration::from_millis(200),
                            tokio::io::AsyncReadExt::read(&mut { stream }, &mut buf),
                        )
                        .await;
                    });
                    continue;
                }
                let stop2 = stop.clone();
                let svc = service_fn(move |req| {
                    let me = me.clone();
                    async move { Ok::<_, Infallible>(me.answer(req).await) }
                });
                tokio::spawn(async move {
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = stop2.cancelled() => {}
                    }
                });
            }
        });
        up
    }

    pub fn set_status(&self, s: u16) {
        self.status.store(s, Ordering::SeqCst);
    }
    pub fn set_health(&self, s: u16) {
        self.health_status.store(s, Ordering::SeqCst);
    }
    pub fn set_delay(&self, ms: u64) {
        self.delay_ms.store(ms, Ordering::SeqCst);
    }
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
    /// Stops the upstream as if its process were killed: the listener and every connection
    /// close; connects are refused from then on.
    pub fn kill(&self) {
        self.stop.cancel();
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        if path == "/health" || path == "/smoke" {
            self.health_hits.fetch_add(1, Ordering::SeqCst);
            let s = self.health_status.load(Ordering::SeqCst);
            return resp(s, format!("{} health\n", self.name));
        }
        self.hits.fetch_add(1, Ordering::SeqCst);
        let headers: Vec<(String, String)> = req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        *self.last_headers.lock().expect("lock") = headers.clone();
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let status = self.status.load(Ordering::SeqCst);
        if path.starts_with("/echo") {
            let method = req.method().to_string();
            let query = req.uri().query().unwrap_or("").to_string();
            let version = format!("{:?}", req.version());
            let mut body = req.into_body();
            let mut len = 0usize;
            let mut h = FNV_INIT;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else { break };
                if let Some(d) = frame.data_ref() {
                    len += d.len();
                    h = fnv(d, h);
                }
            }
            let v = json!({
                "upstream": self.name, "method": method, "path": path, "query": query,
                "version": version, "headers": headers, "body_len": len, "body_fnv": h,
            });
            let mut r = resp(status, v.to_string());
            r.headers_mut()
                .insert("content-type", "application/json".parse().expect("hv"));
            r.headers_mut()
                .insert("connection", "x-upstream-hop".parse().expect("hv"));
            r.headers_mut()
                .insert("x-upstream-hop", "secret".parse().expect("hv"));
            r.headers_mut()
                .insert("keep-alive", "timeout=5".parse().expect("hv"));
            return r;
        }
        resp(status, format!("{}\n", self.name))
    }
}

fn resp(status: u16, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r
}

/// A loopback port that refuses connections. The socket stays bound without listening (a
/// connect gets a RST) for the rest of the test process, so no other test running in parallel
/// can take the port and answer in its place.
pub async fn dead_addr() -> SocketAddr {
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let a = s.local_addr().expect("addr");
    std::mem::forget(s);
    a
}

/// A Switchyard running in-process with its own temp dir for state.
pub struct TestProxy {
    pub running: Option<switchyard::Running>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub preview: Option<SocketAddr>,
    pub dir: Option<tempfile::TempDir>,
    pub config_path: std::path::PathBuf,
}

impl TestProxy {
    /// `body` is the config after `[proxy]`/`[admin]`/`[state]` (services etc.). Listeners use
    /// ephemeral ports.
    pub async fn start(body: &str) -> TestProxy {
        Self::start_with(body, Some(TOKEN), None).await
    }

    pub async fn start_with(
        body: &str,
        token: Option<&str>,
        dir: Option<tempfile::TempDir>,
    ) -> TestProxy {
        let dir = dir.unwrap_or_else(|| tempfile::tempdir().expect("tempdir"));
        let text = full_config(body, dir.path());
        let config_path = dir.path().join("switchyard.toml");
        std::fs::write(&config_path, &text).expect("write config");
        let cfg = switchyard::config::from_toml_str_with_env(&text, Some(Default::default()))
            .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n{text}"));
        let store = match cfg.state.backend {
            switchyard::config::StateBackend::Etcd => {
                switchyard::StateStore::from_config(&cfg.state)
            }
            switchyard::config::StateBackend::File => {
                switchyard::StateStore::file(dir.path().join("state.json"))
            }
        };
        let running = switchyard::start(
            cfg,
            switchyard::Options {
                config_path: Some(config_path.clone()),
                store,
                admin_token: token.map(str::to_string),
            },
        )
        .await
        .expect("start switchyard");
        TestProxy {
            proxy: running.proxy_addr,
            admin: running.admin_addr,
            preview: running.preview_addr,
            running: Some(running),
            dir: Some(dir),
            config_path,
        }
    }

    pub fn app(&self) -> &Arc<switchyard::App> {
        &self.running.as_ref().expect("running").app
    }

    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
        self.dir.take().expect("dir")
    }

    pub async fn get(&self, path: &str) -> (u16, String) {
        get(self.proxy, path).await
    }

    pub async fn status(&self) -> Value {
        admin_get(self.admin, "/api/status").await.1
    }

    pub async fn flip(&self, service: &str, to: &str) -> (u16, Value) {
        admin_post(
            self.admin,
            &format!("/api/services/{service}/flip"),
            Some(TOKEN),
            Some(json!({ "to": to })),
        )
        .await
    }

    pub async fn service_status(&self, name: &str) -> Value {
        let s = self.status().await;
        s["services"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == name).cloned())
            .unwrap_or(Value::Null)
    }

    pub async fn events(&self) -> Vec<Value> {
        admin_get(self.admin, "/api/events").await.1["events"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(r) = &self.running {
            r.app.shutdown.cancel();
        }
    }
}

pub fn full_config(body: &str, dir: &std::path::Path) -> String {
    let head = if body.contains("[proxy]") {
        String::new()
    } else {
        "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n".to_string()
    };
    let admin = if body.contains("[admin]") {
        String::new()
    } else {
        "[admin]\nlisten = \"127.0.0.1:0\"\n".to_string()
    };
    let state = if body.contains("[state]") {
        // The etcd backend keeps its last known state at `path`: in the test's own dir.
        if !body.contains("\npath =") {
            let body_state = format!("[state]\npath = \"{}\"", dir.join("state.json").display());
            return one_worker(format!(
                "{head}{admin}{}",
                body.replacen("[state]", &body_state, 1)
            ));
        }
        String::new()
    } else {
        format!("[state]\npath = \"{}\"\n", dir.join("state.json").display())
    };
    one_worker(format!("{head}{admin}{state}{body}"))
}

/// `workers = 1` unless the config names `workers`. In process ([`TestProxy`]) the proxy runs
/// on the test's own runtime beside the scripted upstreams, as it always has (before
/// `per_worker` became the default, `start_with` ran every worker there): `per_worker` would
/// add threads with runtimes of their own, and a scripted step (an upstream that closes, cuts
/// its connections) would race the proxy's next request. Tests of several workers name
/// `workers`; the tests that spawn the binary run the default.
fn one_worker(text: String) -> String {
    if text.lines().any(|l| l.trim_start().starts_with("workers")) {
        text
    } else {
        text.replacen("[proxy]\n", "[proxy]\nworkers = 1\n", 1)
    }
}

/// One service "api" with the given pools, plus extra service keys (e.g. health).
pub fn service(name: &str, blue: &[SocketAddr], green: &[SocketAddr], extra: &str) -> String {
    let list = |a: &[SocketAddr]| {
        a.iter()
            .map(|x| format!("\"{x}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "\n[[services]]\nname = \"{name}\"\nblue = {{ upstreams = [{}] }}\ngreen = {{ upstreams = [{}] }}\n{extra}\n",
        list(blue),
        list(green)
    )
}

pub fn client() -> Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(16)
        .build_http()
}

pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    request(addr, "GET", path, &[], Bytes::new()).await
}

pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> (u16, String) {
    let (status, body) = request_bytes(addr, method, path, headers, body).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// [`request`] with the response body as it came, byte for byte.
pub async fn request_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> (u16, Bytes) {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(body)).expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(20), client().request(req))
        .await
        .expect("request timed out")
        .expect("request failed");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, body)
}

/// Whether `GET /x` through `proxy` is answered by the upstream named `color` within `secs`.
pub async fn serves(proxy: SocketAddr, color: &str, secs: u64) -> bool {
    eventually(secs, || async {
        try_get(proxy, "/x").await == Some((200, format!("{color}\n")))
    })
    .await
}

/// Starts a one-phase release of service `api` (10 m bake and validation) through the admin
/// API and waits until it bakes; returns its id.
pub async fn start_baking_release(admin: SocketAddr) -> Value {
    let plan = json!({
        "name": "one phase",
        "validate": "10m",
        "phases": [{ "name": "api", "services": ["api"], "bake": "10m" }],
    });
    let (s, v) = admin_post(admin, "/api/releases", Some(TOKEN), Some(plan)).await;
    assert_eq!(s, 200, "{v}");
    let baking = eventually(15, || async {
        admin_get(admin, "/api/releases").await.1["current"]["phases"][0]["state"] == "baking"
    })
    .await;
    assert!(baking, "{}", admin_get(admin, "/api/releases").await.1);
    v["release"]["id"].clone()
}

pub async fn admin_get(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (s, body) = get(addr, path).await;
    (
        s,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

pub async fn admin_post(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers: Vec<(&str, &str)> = Vec::new();
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    let bytes = match &body {
        Some(b) => {
            headers.push(("content-type", "application/json"));
            Bytes::from(b.to_string())
        }
        None => Bytes::new(),
    };
    let (s, body) = request(addr, "POST", path, &headers, bytes).await;
    (
        s,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

/// Polls `f` every 20 ms until it returns true, at most `secs` seconds.
pub async fn eventually<F, Fut>(secs: u64, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The events of `p` with this `reason` once at least one is listed (waiting at most `secs`
/// seconds; empty if none came) and the count held for a second. With the etcd backend an event goes to etcd in its own task
/// after the change it records, so a replica (this one or another) can show the change first:
/// read the events after this, not right after the change.
pub async fn events_once_listed(p: &TestProxy, reason: &str, secs: u64) -> Vec<Value> {
    let of = || async {
        p.events()
            .await
            .into_iter()
            .filter(|e| e["reason"] == reason)
            .collect::<Vec<Value>>()
    };
    eventually(secs, || async { !of().await.is_empty() }).await;
    // A second one written a moment later (a duplicate) must count too: the list settles first.
    let mut last = of().await;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let now = of().await;
        if now.len() == last.len() {
            return now;
        }
        last = now;
    }
    panic!("the {reason} events never stopped changing: {last:#?}");
}

/// Waits (at most `secs` seconds) until process `pid` catches SIGHUP (bit 0 of `SigCgt` in
/// /proc/PID/status): before its handler is installed a SIGHUP kills the process (the default
/// action), which no test means to check. False if it never did or the process is gone.
pub async fn catches_sighup(pid: u32, secs: u64) -> bool {
    eventually(secs, || async {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("SigCgt:"))
                    .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            })
            .is_some_and(|mask| mask & 1 == 1)
    })
    .await
}

/// Waits (at most `secs` seconds) until the count `f` reads stays the same for `quiet`, and
/// returns it; None if it never settled. For "nothing more arrives there" after a change: a
/// request already on its way when the change happened may land late on a loaded machine, so
/// a fixed pause before taking the count is a race; traffic that keeps arriving never settles.
pub async fn settled<F>(secs: u64, quiet: Duration, f: F) -> Option<usize>
where
    F: Fn() -> usize,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut last = f();
    let mut since = tokio::time::Instant::now();
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = f();
        if now != last {
            last = now;
            since = tokio::time::Instant::now();
        } else if since.elapsed() >= quiet {
            return Some(last);
        }
    }
    None
}

/// A free loopback port (bound, then released) for a child's listeners. Taken below the
/// kernel's ephemeral range: a port bound and released there is the next one the kernel hands
/// out for an outgoing connection or a bind to port 0 (every test makes many), which could take
/// it before the child binds it. Below the range only another `free_port` can, and each call
/// of this process moves on to a port not tried before.
pub fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    const FLOOR: usize = 10_000;
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<usize>().ok())
        .unwrap_or(32_768);
    if low > FLOOR + 1_000 {
        let span = low - FLOOR;
        // Test binaries run one after another; two at once start at random points apart (a
        // port another one took is skipped by the bind).
        static START: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let start = *START.get_or_init(|| fastrand::usize(..span));
        for _ in 0..span {
            let port = FLOOR + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
            if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
                return port as u16;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The value of the sample `name` with exactly these labels, in a text exposition.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let Some(rest) = l.strip_prefix(name) else {
                return false;
            };
            let Some(inner) = rest.strip_prefix('{').and_then(|r| r.split('}').next()) else {
                return labels.is_empty() && rest.starts_with(' ');
            };
            inner.split(',').filter(|p| !p.is_empty()).count() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| inner.split(',').any(|p| p == format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The sum of the samples of `name` whose labels include every `labels` pair, in a text
/// exposition (0 when there are none).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|rest| rest.split_once('}'))
        .filter(|(inner, _)| {
            labels
                .iter()
                .all(|(k, v)| inner.split(',').any(|p| p == format!("{k}=\"{v}\"")))
        })
        .filter_map(|(_, value)| value.trim().parse::<f64>().ok())
        .sum()
}

/// Every upstream failure counted (`switchyard_upstream_failures_total`, all series).
pub fn upstream_failures(metrics: &str) -> f64 {
    metric_sum(metrics, "switchyard_upstream_failures_total", &[])
}

/// Whether a process's admin listener at `admin` answers `/healthz` with 200 within `secs`
/// seconds: the binary started (or took over) and serves.
pub async fn healthz_within(admin: SocketAddr, secs: u64) -> bool {
    eventually(secs, || async {
        try_get(admin, "/healthz").await.map(|r| r.0) == Some(200)
    })
    .await
}

/// A GET on a fresh connection that reports any failure (refused, reset, timeout) as None.
pub async fn try_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let stream = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header("host", addr.to_string())
        .body(Full::new(Bytes::new()))
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .ok()?
        .ok()?
        .to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// What a [`raw_upstream`] does with one request head (its text, as received).
pub enum Raw {
    /// Writes these bytes and waits for the next request on the connection.
    Answer(Vec<u8>),
    /// Never answers; once the proxy closes the connection, counts it here.
    Hold(Arc<AtomicUsize>),
    /// Writes these bytes, then echoes whatever arrives (a tunnel after a 101).
    Echo(Vec<u8>),
    /// Writes these bytes and closes the connection (a response cut short).
    Close(Vec<u8>),
    /// Writes these bytes, then nothing until the proxy closes the connection (a stalled body).
    Stall(Vec<u8>),
    /// Writes the first bytes, then the second over and over while the proxy takes them (an
    /// endless body).
    Endless(Vec<u8>, Vec<u8>),
}

/// An upstream on raw sockets, for framing the hyper-based [`TestUpstream`] cannot produce:
/// `answer` decides per request head. A request's body is not read (send bodiless requests).
pub async fn raw_upstream<F>(answer: F) -> SocketAddr
where
    F: Fn(&str) -> Raw + Send + Sync + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
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
                    match answer(&head) {
                        Raw::Answer(bytes) => {
                            if s.write_all(&bytes).await.is_err() {
                                return;
                            }
                        }
                        Raw::Hold(closed) => {
                            while let Ok(n) = s.read(&mut chunk).await {
                                if n == 0 {
                                    break;
                                }
                            }
                            closed.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        Raw::Close(bytes) => {
                            let _ = s.write_all(&bytes).await;
                            return;
                        }
                        Raw::Stall(bytes) => {
                            let _ = s.write_all(&bytes).await;
                            while let Ok(n) = s.read(&mut chunk).await {
                                if n == 0 {
                                    break;
                                }
                            }
                            return;
                        }
                        Raw::Endless(head, again) => {
                            let _ = s.write_all(&head).await;
                            while s.write_all(&again).await.is_ok() {}
                            return;
                        }
                        Raw::Echo(bytes) => {
                            if s.write_all(&bytes).await.is_err() {
                                return;
                            }
                            while let Ok(n) = s.read(&mut chunk).await {
                                if n == 0 || s.write_all(&chunk[..n]).await.is_err() {
                                    return;
                                }
                            }
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Log lines (WARN and up) of the in-process proxies of this test binary (every test's), from
/// the first call on.
pub fn captured_logs() -> Arc<std::sync::Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<std::sync::Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(std::sync::Mutex::new(Vec::new()));
        struct W(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                if let Ok(mut v) = self.0.lock() {
                    v.extend_from_slice(b);
                }
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let w = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || W(w.clone()))
            .try_init();
        buf
    })
    .clone()
}

/// How many sockets listen on `addr` (IPv4), from the kernel's own table: `per_worker` binds
/// one `SO_REUSEPORT` socket per worker on the same address, and the kernel spreads new
/// connections over them.
pub fn listening_sockets(addr: SocketAddr) -> usize {
    let SocketAddr::V4(a) = addr else {
        panic!("an IPv4 address: {addr}")
    };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(a.ip().octets()),
        a.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == want && f[3] == "0A"
        })
        .count()
}
