//! Upstreams by name: a name that resolves to two addresses gives two upstreams; a change of the
//! answer adds and drains upstreams under load with no failed request; a failing or empty answer
//! keeps the last good set and says so; `check` warns with the key.
//!
//! Answers come from a hosts-format file the test rewrites (`[proxy] resolve_hosts_file`); the
//! upstreams listen on 127.0.0.2, 127.0.0.3, … (all loopback on Linux) on one port.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// An upstream on a given address that answers its address, and counts.
struct Ip {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    /// Connections open now.
    open: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Drop for Ip {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn ip_upstream(addr: SocketAddr) -> Ip {
    let l = TcpListener::bind(addr).await.expect("bind on loopback");
    let hits = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let (h, s, o) = (hits.clone(), stop.clone(), open.clone());
    tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                r = l.accept() => match r { Ok(x) => x, Err(_) => continue },
                () = s.cancelled() => return,
            };
            let h = h.clone();
            let s2 = s.clone();
            let o = o.clone();
            o.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let h = h.clone();
                    async move {
                        if req.uri().path() != "/health" {
                            h.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                            "{addr}\n"
                        )))))
                    }
                });
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                tokio::select! {
                    _ = conn => {}
                    () = s2.cancelled() => {}
                }
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Ip {
        addr,
        hits,
        open,
        stop,
    }
}

/// A port free on 127.0.0.1..=127.0.0.5, and never handed to another test in this process:
/// the tests run side by side, a probed port is released again, and the kernel can give the
/// same ephemeral port to two of them (CI saw `AddrInUse` binding 127.0.0.2).
async fn common_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    for _ in 0..50 {
        let port = free_port();
        let mut given = GIVEN.lock().expect("ports given");
        if given.contains(&port) {
            continue;
        }
        let mut ok = true;
        for last in 1..=5u8 {
            let a = SocketAddr::from(([127, 0, 0, last], port));
            if std::net::TcpListener::bind(a).is_err() {
                ok = false;
                break;
            }
        }
        if ok {
            given.push(port);
            return port;
        }
    }
    panic!("no common free port");
}

fn write_hosts(path: &std::path::Path, lines: &[&str]) {
    // Written whole and renamed: the resolver never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, lines.join("\n") + "\n").expect("write hosts");
    std::fs::rename(&tmp, path).expect("rename hosts");
}

fn pool_addrs(status: &Value, color: &str) -> Vec<String> {
    let mut v: Vec<String> = status["services"][0]["colors"][color]["upstreams"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|u| u["addr"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

struct Setup {
    proxy: TestProxy,
    hosts: std::path::PathBuf,
    port: u16,
}

async fn setup(port: u16, hosts_lines: &[&str], extra: &str) -> Setup {
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = dir.path().join("hosts");
    write_hosts(&hosts, hosts_lines);
    let body = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\nresolve_interval = \"100ms\"\n\
         resolve_hosts_file = \"{}\"\n\n[[services]]\nname = \"api\"\n\
         blue = {{ upstreams = [\"app.blue.test:{port}\"] }}\n\
         green = {{ upstreams = [\"{}\"] }}\n{extra}\n",
        hosts.display(),
        green.addr
    );
    // The green upstream lives as long as the test: leak its handle into the proxy's lifetime.
    std::mem::forget(green);
    let proxy = TestProxy::start_with(&body, Some(TOKEN), Some(dir)).await;
    Setup { proxy, hosts, port }
}

#[tokio::test]
async fn a_name_with_two_addresses_is_two_upstreams() {
    let port = common_port().await;
    let a = ip_upstream(SocketAddr::from(([127, 0, 0, 2], port))).await;
    let b = ip_upstream(SocketAddr::from(([127, 0, 0, 3], port))).await;
    let s = setup(
        port,
        &["127.0.0.2 app.blue.test", "127.0.0.3 app.blue.test other"],
        "[services.health]\npath = \"/health\"\ninterval = \"200ms\"",
    )
    .await;
    let status = s.proxy.status().await;
    assert_eq!(
        pool_addrs(&status, "blue"),
        [
            format!("127.0.0.2:{}", s.port),
            format!("127.0.0.3:{}", s.port)
        ],
        "{status}"
    );
    let ups = status["services"][0]["colors"]["blue"]["upstreams"].clone();
    for u in ups.as_array().expect("upstreams") {
        assert_eq!(u["name"], format!("app.blue.test:{}", s.port));
    }
    let names = &status["services"][0]["colors"]["blue"]["names"][0];
    assert_eq!(names["key"], "services[0].blue.upstreams[0]");
    assert_eq!(names["stale"], false);
    // Both get traffic; the Host the upstream sees stays the client's.
    for _ in 0..40 {
        assert_eq!(s.proxy.get("/").await.0, 200);
    }
    assert!(a.hits.load(Ordering::SeqCst) > 0 && b.hits.load(Ordering::SeqCst) > 0);
    // Each address has its own metrics series.
    let (_, metrics) = get(s.proxy.admin, "/metrics").await;
    for addr in [a.addr, b.addr] {
        assert!(
            metrics.contains(&format!(
                "switchyard_upstream_healthy{{color=\"blue\",service=\"api\",upstream=\"{addr}\"}}"
            )),
            "{metrics}"
        );
    }
    s.proxy.stop().await;
}

#[tokio::test]
async fn the_host_header_stays_the_clients() {
    let s = setup(common_port().await, &["127.0.0.2 app.blue.test"], "").await;
    let seen = Arc::new(std::sync::Mutex::new(String::new()));
    let seen2 = seen.clone();
    let l = TcpListener::bind(SocketAddr::from(([127, 0, 0, 2], s.port)))
        .await
        .expect("bind");
    tokio::spawn(async move {
        while let Ok((stream, _)) = l.accept().await {
            let seen = seen2.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    async move {
                        if let Some(h) = req.headers().get("host") {
                            *seen.lock().expect("lock") =
                                h.to_str().unwrap_or_default().to_string();
                        }
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from("ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let (st, _) = request(
        s.proxy.proxy,
        "GET",
        "/",
        &[("host", "shop.example")],
        Bytes::new(),
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(*seen.lock().expect("lock"), "shop.example");
    s.proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_answer_adds_and_drains_under_load() {
    let port = common_port().await;
    let ip = |last: u8| SocketAddr::from(([127, 0, 0, last], port));
    let a = ip_upstream(ip(2)).await;
    let b = ip_upstream(ip(3)).await;
    let c = ip_upstream(ip(4)).await;
    let s = setup(
        port,
        &["127.0.0.2 app.blue.test", "127.0.0.3 app.blue.test"],
        "",
    )
    .await;
    let proxy = s.proxy.proxy;
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    for i in 0..6 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let client = client();
            while !stop.load(Ordering::SeqCst) {
                // Half keep-alive, half a new connection each time.
                let r = if i % 2 == 0 {
                    let req = Request::get(format!("http://{proxy}/load"))
                        .body(Full::new(Bytes::new()))
                        .expect("request");
                    match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
                        Ok(Ok(resp)) => {
                            let st = resp.status().as_u16();
                            let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                            Some(st)
                        }
                        _ => None,
                    }
                } else {
                    try_get(proxy, "/load").await.map(|r| r.0)
                };
                match r {
                    Some(200) => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    other => failed.lock().expect("lock").push(format!("{other:?}")),
                }
            }
        }));
    }
    assert!(eventually(10, || async { ok.load(Ordering::SeqCst) > 200 }).await);
    assert!(a.hits.load(Ordering::SeqCst) > 0 && b.hits.load(Ordering::SeqCst) > 0);
    assert_eq!(c.hits.load(Ordering::SeqCst), 0);

    // .2 leaves, .4 joins.
    write_hosts(
        &s.hosts,
        &["127.0.0.3 app.blue.test", "127.0.0.4 app.blue.test"],
    );
    let want = vec![ip(3).to_string(), ip(4).to_string()];
    assert!(
        eventually(10, || async {
            pool_addrs(&s.proxy.status().await, "blue") == want
        })
        .await,
        "the pool did not follow the answer"
    );
    // A request that picked .2 from the snapshot before the change may still arrive there
    // (late, on a loaded machine); after those, nothing does.
    let gone_hits = settled(10, Duration::from_millis(500), || {
        a.hits.load(Ordering::SeqCst)
    })
    .await
    .expect("the drained address kept getting requests");
    let target = ok.load(Ordering::SeqCst) + 300;
    assert!(eventually(20, || async { ok.load(Ordering::SeqCst) > target }).await);
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.expect("load");
    }
    let failed = failed.lock().expect("lock").clone();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(10)]
    );
    assert!(
        c.hits.load(Ordering::SeqCst) > 0,
        "the new address got no traffic"
    );
    assert_eq!(
        a.hits.load(Ordering::SeqCst),
        gone_hits,
        "the drained address still gets requests"
    );
    // Its pooled keep-alive connections were closed.
    assert!(
        eventually(10, || async { a.open.load(Ordering::SeqCst) == 0 }).await,
        "{} connections to the drained address are still open",
        a.open.load(Ordering::SeqCst)
    );
    assert!(
        b.open.load(Ordering::SeqCst) > 0,
        "the kept address has no pooled connection"
    );
    s.proxy.stop().await;
}

#[tokio::test]
async fn a_failing_or_empty_answer_keeps_the_last_set() {
    let port = common_port().await;
    let a = ip_upstream(SocketAddr::from(([127, 0, 0, 2], port))).await;
    let s = setup(port, &["127.0.0.2 app.blue.test"], "").await;
    assert_eq!(s.proxy.get("/").await.0, 200);
    // The name disappears (NXDOMAIN).
    write_hosts(&s.hosts, &["127.0.0.9 someone.else"]);
    assert!(
        eventually(10, || async {
            s.proxy.status().await["services"][0]["colors"]["blue"]["names"][0]["stale"] == true
        })
        .await,
        "the failure is not shown"
    );
    let status = s.proxy.status().await;
    assert_eq!(
        pool_addrs(&status, "blue"),
        [a.addr.to_string()],
        "{status}"
    );
    let err = status["services"][0]["colors"]["blue"]["names"][0]["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(err.contains("app.blue.test"), "{err}");
    for _ in 0..10 {
        assert_eq!(s.proxy.get("/").await.0, 200);
    }
    let (_, metrics) = get(s.proxy.admin, "/metrics").await;
    let label = format!("{{name=\"app.blue.test:{}\"}}", s.port);
    assert!(
        metrics.contains(&format!("switchyard_upstream_resolution_stale{label} 1")),
        "{metrics}"
    );
    let failures: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("switchyard_resolve_failures_total{label} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(failures >= 1.0, "{metrics}");
    // Each lookup that fails again is counted too (they change nothing, so publish nothing).
    assert!(
        eventually(10, || async {
            let (_, m) = get(s.proxy.admin, "/metrics").await;
            metric(&m, &format!("switchyard_resolve_failures_total{label}")).unwrap_or(0.0) >= 3.0
        })
        .await,
        "repeated failures are not counted"
    );
    // A listed name without a usable address (an empty answer) keeps the set too.
    write_hosts(&s.hosts, &["not-an-ip app.blue.test"]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        pool_addrs(&s.proxy.status().await, "blue"),
        [a.addr.to_string()]
    );
    assert_eq!(s.proxy.get("/").await.0, 200);
    // A reload while it fails keeps the set as well.
    assert_eq!(
        admin_post(s.proxy.admin, "/api/reload", Some(TOKEN), None)
            .await
            .0,
        200
    );
    assert_eq!(
        pool_addrs(&s.proxy.status().await, "blue"),
        [a.addr.to_string()]
    );
    // It recovers.
    write_hosts(&s.hosts, &["127.0.0.2 app.blue.test"]);
    assert!(
        eventually(10, || async {
            s.proxy.status().await["services"][0]["colors"]["blue"]["names"][0]["stale"] == false
        })
        .await
    );
    s.proxy.stop().await;
}

#[tokio::test]
async fn check_accepts_names_and_warns_with_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = dir.path().join("hosts");
    write_hosts(&hosts, &["127.0.0.2 known.test"]);
    let cfg = dir.path().join("switchyard.toml");
    std::fs::write(
        &cfg,
        format!(
            "[proxy]\nresolve_hosts_file = \"{}\"\n[[services]]\nname = \"api\"\n\
             blue = {{ upstreams = [\"known.test:3000\"] }}\n\
             green = {{ upstreams = [\"unknown.test:3000\", \"127.0.0.1:3011\"] }}\n",
            hosts.display()
        ),
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "--config", cfg.to_str().expect("utf-8")])
        .env_remove("RUST_LOG")
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains(
            "warning: services[0].green.upstreams[0]: cannot resolve \"unknown.test:3000\""
        ),
        "{text}"
    );
    assert!(text.contains("known.test:3000 -> 127.0.0.2:3000"), "{text}");
    // Said once, by `check` itself: not again by the resolver's runtime WARN ("keeping its last
    // good addresses", which has none offline).
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("last good addresses"), "{err}");
    // A malformed entry is still an error with its key.
    std::fs::write(
        &cfg,
        "[[services]]\nname = \"api\"\nblue = { upstreams = [\"bad name:3000\"] }\n\
         green = { upstreams = [\"x:y\"] }\n",
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "--config", cfg.to_str().expect("utf-8")])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("services[0].blue.upstreams[0]: invalid address \"bad name:3000\""),
        "{err}"
    );
    assert!(
        err.contains("services[0].green.upstreams[0]: invalid address \"x:y\""),
        "{err}"
    );
}

/// Without `resolve_hosts_file` the system resolver answers (`getaddrinfo`: `/etc/hosts`,
/// nsswitch, DNS), as for every other program on the host: `localhost` is one of its names.
#[tokio::test]
async fn the_system_resolver_answers_names() {
    let port = common_port().await;
    let up = ip_upstream(SocketAddr::from(([127, 0, 0, 1], port))).await;
    let green = TestUpstream::start("green").await;
    let body = format!(
        "[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"localhost:{port}\"] }}\n\
         green = {{ upstreams = [\"{}\"] }}\n",
        green.addr
    );
    let p = TestProxy::start(&body).await;
    let status = p.status().await;
    let addrs = pool_addrs(&status, "blue");
    assert!(addrs.contains(&up.addr.to_string()), "{status}");
    let names = &status["services"][0]["colors"]["blue"]["names"][0];
    assert_eq!(names["stale"], false, "{status}");
    assert_eq!(names["key"], "services[0].blue.upstreams[0]");
    p.stop().await;
}

/// The binary says so in its log: a WARN line naming the upstream and its key when a name stops
/// resolving (with the addresses kept), an INFO line when it resolves again.
#[tokio::test]
async fn a_failing_name_is_logged_at_warn_with_its_key() {
    let port = common_port().await;
    let _a = ip_upstream(SocketAddr::from(([127, 0, 0, 2], port))).await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = dir.path().join("hosts");
    write_hosts(&hosts, &["127.0.0.2 app.blue.test"]);
    let (pp, ap) = (free_port(), free_port());
    let config = dir.path().join("switchyard.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{pp}\"\nshutdown_grace = \"2s\"\n\
             resolve_interval = \"100ms\"\nresolve_hosts_file = \"{}\"\n\
             [admin]\nlisten = \"127.0.0.1:{ap}\"\n[state]\npath = \"{}\"\n\
             [[services]]\nname = \"api\"\nblue = {{ upstreams = [\"app.blue.test:{port}\"] }}\n\
             green = {{ upstreams = [\"{}\"] }}\n",
            hosts.display(),
            dir.path().join("state.json").display(),
            green.addr
        ),
    )
    .expect("config");
    let log = dir.path().join("switchyard.log");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let read = || String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    let admin = SocketAddr::from(([127, 0, 0, 1], ap));
    assert!(
        eventually(20, || async {
            try_get(admin, "/healthz")
                .await
                .is_some_and(|(c, _)| c == 200)
        })
        .await,
        "switchyard did not start: {}",
        read()
    );
    write_hosts(&hosts, &["127.0.0.9 someone.else"]);
    assert!(
        eventually(10, || async {
            read().contains("cannot resolve an upstream name")
        })
        .await,
        "no log line: {}",
        read()
    );
    write_hosts(&hosts, &["127.0.0.2 app.blue.test"]);
    assert!(
        eventually(10, || async {
            read().contains("upstream name resolves again")
        })
        .await,
        "no recovery line: {}",
        read()
    );
    let _ = child.start_kill();
    let _ = child.wait().await;
    let text = read();
    let warn = text
        .lines()
        .find(|l| l.contains("cannot resolve an upstream name"))
        .expect("the line");
    assert!(warn.contains(" WARN "), "{warn}");
    assert!(
        warn.contains(&format!("upstream=app.blue.test:{port}")),
        "{warn}"
    );
    assert!(warn.contains("key=services[0].blue.upstreams[0]"), "{warn}");
    assert!(warn.contains("127.0.0.2"), "the kept addresses: {warn}");
    let info = text
        .lines()
        .find(|l| l.contains("upstream name resolves again"))
        .expect("the line");
    assert!(info.contains(" INFO "), "{info}");
}

/// The value of `series` (`name{labels}`) in a metrics text; None when it is not exported.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn lookups_at_startup_and_reload_count_and_a_removed_name_takes_its_series() {
    let port = common_port().await;
    let _a = ip_upstream(SocketAddr::from(([127, 0, 0, 2], port))).await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = dir.path().join("hosts");
    write_hosts(&hosts, &["127.0.0.2 app.blue.test"]);
    // An hour between the watch's lookups: every lookup here is the startup's or a reload's.
    let config = |green_entry: &str| {
        format!(
            "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\nresolve_interval = \"1h\"\n\
             resolve_hosts_file = \"{}\"\n\n[[services]]\nname = \"api\"\n\
             blue = {{ upstreams = [\"app.blue.test:{port}\"] }}\n\
             green = {{ upstreams = [\"{green_entry}\"] }}\n",
            hosts.display()
        )
    };
    let typo = format!("app.typo.test:{port}");
    let proxy = TestProxy::start_with(&config(&typo), Some(TOKEN), Some(dir)).await;
    let failures = format!("switchyard_resolve_failures_total{{name=\"{typo}\"}}");
    let stale = format!("switchyard_upstream_resolution_stale{{name=\"{typo}\"}}");
    let blue_failures =
        format!("switchyard_resolve_failures_total{{name=\"app.blue.test:{port}\"}}");
    let blue_stale =
        format!("switchyard_upstream_resolution_stale{{name=\"app.blue.test:{port}\"}}");

    // The startup lookup failed once: counted.
    let (_, m) = get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&m, &failures), Some(1.0), "{m}");
    assert_eq!(metric(&m, &stale), Some(1.0), "{m}");
    assert_eq!(metric(&m, &blue_failures), Some(0.0), "{m}");
    assert_eq!(metric(&m, &blue_stale), Some(0.0), "{m}");

    // A reload looks it up again, and fails again: counted.
    let reload = || admin_post(proxy.admin, "/api/reload", Some(TOKEN), None);
    assert_eq!(reload().await.0, 200);
    let (_, m) = get(proxy.admin, "/metrics").await;
    assert_eq!(metric(&m, &failures), Some(2.0), "{m}");
    assert_eq!(metric(&m, &stale), Some(1.0), "{m}");
    assert_eq!(metric(&m, &blue_failures), Some(0.0), "{m}");

    // A reload that takes the name out of the config takes its series with it.
    std::fs::write(&proxy.config_path, config(&green.addr.to_string())).expect("config");
    assert_eq!(reload().await.0, 200);
    let status = proxy.status().await;
    assert_eq!(
        status["services"][0]["colors"]["green"]["names"],
        serde_json::json!([]),
        "{status}"
    );
    let (_, m) = get(proxy.admin, "/metrics").await;
    assert!(!m.contains(&typo), "a removed name is still exported:\n{m}");
    assert_eq!(metric(&m, &blue_failures), Some(0.0), "{m}");
    assert_eq!(metric(&m, &blue_stale), Some(0.0), "{m}");
    proxy.stop().await;
}
