//! Upstream faults, made for real: an upstream process killed with SIGKILL under load, an
//! upstream that resets or answers gateway errors, a response body the upstream cuts, and reloads
//! that bring new upstream addresses (memory). See README "Upstream faults".

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A tiny HTTP/1.1 keep-alive upstream in a process of its own, so that it can be killed with
/// SIGKILL: every request gets `200 <name>\n`, head and body in one write. It prints its port.
const PY_UPSTREAM: &str = r#"
import socket, sys, threading
name = sys.argv[1].encode()
srv = socket.socket()
srv.bind(("127.0.0.1", 0))
srv.listen(1024)
print(srv.getsockname()[1], flush=True)
def serve(c):
    buf = b""
    try:
        while True:
            while b"\r\n\r\n" not in buf:
                d = c.recv(65536)
                if not d:
                    return
                buf += d
            head, buf = buf.split(b"\r\n\r\n", 1)
            body = name + b"\n"
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

struct ChildUpstream {
    child: Child,
    addr: SocketAddr,
}

impl ChildUpstream {
    fn spawn(name: &str) -> ChildUpstream {
        let mut child = Command::new("python3")
            .args(["-c", PY_UPSTREAM, name])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn python3 upstream");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("upstream port");
        let port: u16 = line.trim().parse().expect("port number");
        ChildUpstream {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// SIGKILL, as a crash: the kernel resets its connections and refuses new ones.
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ChildUpstream {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The value of the sample `name` with exactly these labels, in a text exposition.
async fn metrics(p: &TestProxy) -> String {
    get(p.admin, "/metrics").await.1
}

fn failures(text: &str, color: &str, up: SocketAddr, kind: &str) -> f64 {
    metric(
        text,
        "switchyard_upstream_failures_total",
        &[
            ("service", "api"),
            ("color", color),
            ("upstream", &up.to_string()),
            ("kind", kind),
        ],
    )
    .unwrap_or(0.0)
}

/// The `/api/status` entry of one upstream of service `api`.
async fn upstream_status(p: &TestProxy, color: &str, up: SocketAddr) -> Value {
    let svc = p.service_status("api").await;
    svc["colors"][color]["upstreams"]
        .as_array()
        .and_then(|a| a.iter().find(|u| u["addr"] == up.to_string()).cloned())
        .unwrap_or(Value::Null)
}

/// `workers` clients, each on its own keep-alive connections, send GETs until `total` have
/// been sent; `at` runs once `at_count` have been answered. Returns the failures (status or
/// error) as text.
async fn load<F: FnOnce()>(
    proxy: SocketAddr,
    workers: usize,
    total: usize,
    at_count: usize,
    at: F,
) -> Vec<String> {
    let sent = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (sent, done) = (sent.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let client = client();
            let mut failed = Vec::new();
            while sent.fetch_add(1, Ordering::SeqCst) < total {
                let req = http::Request::get(format!("http://{proxy}/x"))
                    .body(Full::new(Bytes::new()))
                    .expect("request");
                let r = tokio::time::timeout(Duration::from_secs(10), async {
                    let resp = client.request(req).await.map_err(|e| e.to_string())?;
                    let status = resp.status().as_u16();
                    let body = resp
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>((status, body.to_bytes()))
                })
                .await;
                match r {
                    Ok(Ok((200, _))) => {}
                    Ok(Ok((s, b))) => failed.push(format!("{s} {}", String::from_utf8_lossy(&b))),
                    Ok(Err(e)) => failed.push(e),
                    Err(_) => failed.push("timed out".to_string()),
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
            failed
        }));
    }
    let ok = eventually(60, || {
        let done = done.clone();
        async move { done.load(Ordering::SeqCst) >= at_count }
    })
    .await;
    assert!(ok, "the load never reached {at_count} requests");
    at();
    let mut failed = Vec::new();
    for t in tasks {
        failed.extend(t.await.expect("load task"));
    }
    failed
}

/// One upstream killed with SIGKILL under load from 8 clients: every GET still gets its 200,
/// the request is recorded once (the live window has every request and no failure), and the
/// failures are counted against the dead upstream.
async fn kill_one_of_two_under_load(extra: &str) {
    let mut a = ChildUpstream::spawn("a");
    let b = ChildUpstream::spawn("b");
    let green = TestUpstream::start("green").await;
    let body = service("api", &[a.addr, b.addr], &[green.addr], extra);
    let p = TestProxy::start(&format!("[proxy]\nlisten = \"127.0.0.1:0\"\n{body}")).await;
    assert_eq!(p.get("/x").await.0, 200);
    let warm = 1;

    const TOTAL: usize = 1500;
    let dead = a.addr;
    let failed = load(p.proxy, 8, TOTAL, 300, || a.kill9()).await;
    assert!(
        failed.is_empty(),
        "{} of {TOTAL} GETs failed with one upstream killed: {:?}",
        failed.len(),
        &failed[..failed.len().min(10)]
    );

    // Recorded once each, on the upstream that answered; nothing in the window failed.
    let blue = &p.service_status("api").await["colors"]["blue"];
    assert_eq!(
        blue["requests"].as_u64(),
        Some((TOTAL + warm) as u64),
        "{blue}"
    );
    assert_eq!(blue["failures"].as_u64(), Some(0), "{blue}");
    let dead_status = upstream_status(&p, "blue", dead).await;
    assert_eq!(dead_status["failures"].as_u64(), Some(0), "{dead_status}");

    // The dead one is out of the rotation (ejected, or down by the active checks).
    let out = eventually(10, || async {
        // Traffic is what ejects it passively.
        let _ = p.get("/x").await;
        upstream_status(&p, "blue", dead).await["healthy"] == false
    })
    .await;
    assert!(
        out,
        "the killed upstream still counts as healthy: {}",
        upstream_status(&p, "blue", dead).await
    );
    let text = metrics(&p).await;
    assert_eq!(
        metric(
            &text,
            "switchyard_upstream_healthy",
            &[
                ("service", "api"),
                ("color", "blue"),
                ("upstream", &dead.to_string())
            ]
        ),
        Some(0.0)
    );
    drop(b);
    p.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Retries and passive ejection
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_upstream_fails_no_get_without_health_checks() {
    kill_one_of_two_under_load("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_upstream_fails_no_get_with_health_checks() {
    kill_one_of_two_under_load(
        "[services.health]\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"2s\"\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connect_goes_to_another_upstream_and_counts_against_the_dead_one() {
    let dead = dead_addr().await;
    let up = TestUpstream::start("alive").await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&service("api", &[dead, up.addr], &[green.addr], "")).await;
    // Never sent anywhere: even a POST with a body can go to the other upstream.
    for i in 0..40 {
        let (s, body) = if i % 2 == 0 {
            p.get("/x").await
        } else {
            request(p.proxy, "POST", "/x", &[], Bytes::from_static(b"payload")).await
        };
        assert_eq!((s, body.as_str()), (200, "alive\n"), "request {i}");
    }
    let text = metrics(&p).await;
    let refused = failures(&text, "blue", dead, "connect");
    assert!(refused >= 1.0, "no connect failure counted:\n{text}");
    // Recorded once, on the upstream that answered.
    let blue = &p.service_status("api").await["colors"]["blue"];
    assert_eq!(blue["requests"].as_u64(), Some(40), "{blue}");
    assert_eq!(blue["failures"].as_u64(), Some(0), "{blue}");
    let ok = metric(
        &text,
        "switchyard_requests_total",
        &[
            ("service", "api"),
            ("color", "blue"),
            ("upstream", &up.addr.to_string()),
            ("code", "200"),
        ],
    );
    assert_eq!(ok, Some(40.0));
    // Ejected after `eject_after` failures (5 by default, here at most 40 draws).
    let st = upstream_status(&p, "blue", dead).await;
    assert!(
        st["ejected"] == true || refused < 5.0,
        "5 refused connects must eject: {st}"
    );
    p.stop().await;
}

/// An HTTP/1.0 request without Host, on a connection of its own: the upstream's `/echo`
/// answer (HTTP/1.0: the proxy closes the connection after it).
async fn http10_echo_without_host(proxy: SocketAddr) -> Value {
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    s.write_all(b"GET /echo HTTP/1.0\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("the answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&got).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// The proxy fills in the Host of an HTTP/1.0 request that has none with the address of the
/// upstream it goes to; a request retried on another upstream after a refused connect carries
/// that upstream's address, not the first one's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_http10_request_without_host_carries_the_host_of_its_upstream() {
    retried_http10_without_host("http1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_http10_request_without_host_carries_the_authority_of_its_h2_upstream() {
    retried_http10_without_host("h2").await;
}

/// A Content-Length the server takes as one value though written as a list of it repeated, or
/// on two lines (RFC 9110 8.6), reaches an HTTP/2 upstream as that one value: h2 takes nothing
/// else (a list there resets the stream: a 502, and an error counted against the pool).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_content_length_repeated_reaches_an_h2_upstream_as_one_value() {
    let up = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{}\"] }}\n",
        up.addr, green.addr
    ))
    .await;
    for length in [
        "Content-Length: 2, 2",
        "Content-Length: 2\r\nContent-Length: 2",
        "Content-Length: 002",
    ] {
        let mut s = tokio::net::TcpStream::connect(p.proxy)
            .await
            .expect("connect");
        let req =
            format!("POST /echo HTTP/1.1\r\nHost: a\r\n{length}\r\nConnection: close\r\n\r\nok");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
            .await
            .expect("the answer in time")
            .expect("read");
        let text = String::from_utf8_lossy(&got).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        assert!(head.starts_with("HTTP/1.1 200"), "{length:?}: {text}");
        let echo: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(echo["version"], "HTTP/2.0", "{echo}");
        assert_eq!(echo["body_len"], 2, "{echo}");
        let lengths: Vec<&str> = echo["headers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|h| h[0] == "content-length")
            .filter_map(|h| h[1].as_str())
            .collect();
        assert_eq!(lengths, ["2"], "{length:?}: {echo}");
    }
    assert_eq!(upstream_failures(&metrics(&p).await), 0.0);
    p.stop().await;
}

async fn retried_http10_without_host(protocol: &str) {
    let dead = dead_addr().await;
    let up = TestUpstream::start("alive").await;
    let green = TestUpstream::start("green").await;
    // Passive ejection off, so that the dead upstream keeps being drawn.
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\neject_after = 0\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{dead}\", \"{}\"], protocol = \"{protocol}\" }}\ngreen = {{ upstreams = [\"{}\"] }}\n",
        up.addr, green.addr
    ))
    .await;
    let mut retried = 0.0;
    for i in 0..40 {
        if i > 0 {
            // An upstream whose last request failed is avoided for a second.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let echo = http10_echo_without_host(p.proxy).await;
        assert_eq!(echo["upstream"], "alive", "{echo}");
        if protocol == "h2" {
            assert_eq!(echo["version"], "HTTP/2.0", "{echo}");
        }
        let hosts: Vec<&str> = echo["headers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|h| h[0] == "host")
            .filter_map(|h| h[1].as_str())
            .collect();
        assert_eq!(hosts, [up.addr.to_string()], "request {i}: {echo}");
        retried = failures(&metrics(&p).await, "blue", dead, "connect");
        if retried >= 2.0 {
            break;
        }
    }
    assert!(
        retried >= 1.0,
        "no request was drawn to the dead upstream first (nothing retried)"
    );
    p.stop().await;
}

/// The access log names the upstream that answered a retried request, as the stats do, not the
/// one that refused the connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_names_the_upstream_that_answered_a_retried_request() {
    let dead = dead_addr().await;
    let up = TestUpstream::start("alive").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let body = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\neject_after = 0\n[log]\naccess = \"{}\"\naccess_format = \"json\"\n{}",
        log.display(),
        service("api", &[dead, up.addr], &[green.addr], "")
    );
    let p = TestProxy::start_with(&body, Some(TOKEN), Some(dir)).await;
    let mut sent = 0;
    for i in 0..40 {
        if i > 0 {
            // An upstream whose last request failed is avoided for a second.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert_eq!(p.get("/x").await, (200, "alive\n".to_string()));
        sent += 1;
        if failures(&metrics(&p).await, "blue", dead, "connect") >= 2.0 {
            break;
        }
    }
    assert!(
        failures(&metrics(&p).await, "blue", dead, "connect") >= 1.0,
        "nothing was retried"
    );
    let read = || -> Vec<Value> {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let all = eventually(10, || async { read().len() >= sent }).await;
    assert!(all, "{} of {sent} lines", read().len());
    for line in read() {
        assert_eq!(line["upstream"], up.addr.to_string(), "{line}");
    }
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_pool_sends_a_bodiless_request_elsewhere_when_the_connect_fails() {
    let dead = dead_addr().await;
    let up = TestUpstream::start("alive").await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&format!(
        "[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{dead}\", \"{}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{}\"] }}\n",
        up.addr, green.addr
    ))
    .await;
    for i in 0..30 {
        let (s, body) = request(p.proxy, "GET", "/echo", &[], Bytes::new()).await;
        assert_eq!(s, 200, "GET {i}: {body}");
        assert!(
            body.contains("HTTP/2"),
            "GET {i} did not go over h2: {body}"
        );
    }
    let text = metrics(&p).await;
    assert!(failures(&text, "blue", dead, "connect") >= 1.0, "{text}");
    let blue = &p.service_status("api").await["colors"]["blue"];
    assert_eq!(blue["requests"].as_u64(), Some(30), "{blue}");
    assert_eq!(blue["failures"].as_u64(), Some(0), "{blue}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_may_have_reached_the_upstream_is_not_sent_again() {
    // This upstream reads the request head and closes without an answer.
    let seen = Arc::new(AtomicUsize::new(0));
    let seen2 = seen.clone();
    let resetter = raw_upstream(move |_| {
        seen2.fetch_add(1, Ordering::SeqCst);
        Raw::Close(Vec::new())
    })
    .await;
    let up = TestUpstream::start("alive").await;
    let green = TestUpstream::start("green").await;
    // Passive ejection off, so that the resetter keeps being drawn.
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\neject_after = 0\n{}",
        service("api", &[resetter, up.addr], &[green.addr], "")
    ))
    .await;
    // An upstream whose last request failed is avoided for a second: wait that out before
    // each draw that must be able to reach the resetter.
    let avoided = Duration::from_millis(1100);
    let mut posts_502 = 0;
    for round in 0..3 {
        if round > 0 {
            tokio::time::sleep(avoided).await;
        }
        for i in 0..50 {
            let hits_before = up.hits();
            let seen_before = seen.load(Ordering::SeqCst);
            let (s, _) = request(p.proxy, "POST", "/x", &[], Bytes::from_static(b"once")).await;
            if seen.load(Ordering::SeqCst) > seen_before {
                // It may have acted on it: never sent again.
                assert_eq!(s, 502, "round {round}, POST {i}");
                assert_eq!(up.hits(), hits_before, "POST {i} was sent twice");
                posts_502 += 1;
                break;
            }
            assert_eq!(s, 200, "round {round}, POST {i}");
        }
    }
    assert_eq!(
        posts_502, 3,
        "POSTs were never drawn to the resetting upstream"
    );
    // Idempotent and bodiless: sent again, to the other upstream.
    tokio::time::sleep(avoided).await;
    let mut retried = false;
    for i in 0..50 {
        let seen_before = seen.load(Ordering::SeqCst);
        assert_eq!(p.get("/x").await, (200, "alive\n".to_string()), "GET {i}");
        if seen.load(Ordering::SeqCst) > seen_before {
            retried = true;
            break;
        }
    }
    assert!(retried, "no GET was drawn to the resetting upstream");
    let text = metrics(&p).await;
    assert!(failures(&text, "blue", resetter, "reset") >= posts_502 as f64);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_errors_eject_an_upstream_until_eject_for_passes() {
    gateway_errors_eject("").await;
}

/// Passive ejection with active checks on: the upstream's health endpoint keeps answering 200
/// while its requests fail, and the requests win.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_errors_eject_an_upstream_whose_health_checks_pass() {
    gateway_errors_eject(
        "[services.health]\npath = \"/health\"\ninterval = \"200ms\"\ntimeout = \"2s\"\n",
    )
    .await;
}

async fn gateway_errors_eject(extra: &str) {
    let sick = TestUpstream::start("sick").await;
    let up = TestUpstream::start("well").await;
    let green = TestUpstream::start("green").await;
    // `eject_for` leaves the checks of "ejected: no traffic" below seconds to run on a loaded
    // machine before the ejection ends.
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\neject_after = 3\neject_for = \"4s\"\n{}",
        service("api", &[sick.addr, up.addr], &[green.addr], extra)
    ))
    .await;
    sick.set_status(503);
    // A 503 is an answer: it reaches the client (no retry), and counts toward ejection.
    let ejected = eventually(10, || async {
        let _ = p.get("/x").await;
        upstream_status(&p, "blue", sick.addr).await["ejected"] == true
    })
    .await;
    assert!(ejected, "{}", upstream_status(&p, "blue", sick.addr).await);
    let st = upstream_status(&p, "blue", sick.addr).await;
    assert_eq!(st["healthy"], false, "{st}");
    let text = metrics(&p).await;
    assert_eq!(
        metric(
            &text,
            "switchyard_upstream_healthy",
            &[
                ("service", "api"),
                ("color", "blue"),
                ("upstream", &sick.addr.to_string())
            ]
        ),
        Some(0.0)
    );
    // Ejected: no traffic at all.
    let hits = sick.hits();
    for _ in 0..20 {
        assert_eq!(p.get("/x").await, (200, "well\n".to_string()));
    }
    assert_eq!(sick.hits(), hits, "an ejected upstream got traffic");
    // Recovered, it gets traffic again once `eject_for` has passed.
    sick.set_status(200);
    let back = eventually(15, || async {
        let _ = p.get("/x").await;
        sick.hits() > hits
    })
    .await;
    assert!(back, "the upstream never got traffic again");
    assert_eq!(
        upstream_status(&p, "blue", sick.addr).await["healthy"],
        true
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_with_every_upstream_ejected_still_sends_to_them() {
    let only = TestUpstream::start("only").await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\neject_after = 2\neject_for = \"30s\"\n{}",
        service("api", &[only.addr], &[green.addr], "")
    ))
    .await;
    only.set_status(502);
    for _ in 0..2 {
        assert_eq!(p.get("/x").await.0, 502);
    }
    let st = p.service_status("api").await;
    assert_eq!(
        st["colors"]["blue"]["upstreams"][0]["ejected"], true,
        "{st}"
    );
    assert_eq!(st["colors"]["blue"]["healthy"], false, "{st}");
    // Panic mode: the ejected upstream still gets the requests (not the proxy's own 503),
    // and a success ends its ejection's effect on balancing.
    only.set_status(200);
    let hits = only.hits();
    assert_eq!(p.get("/x").await, (200, "only\n".to_string()));
    assert_eq!(only.hits(), hits + 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_pool_ejected_whole_trips_the_unhealthy_trigger() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    // No health section: only passive ejection can say green is down.
    let extra = "[services.rollback]\nwatch_for = \"10m\"\nmin_requests = 1\n[[services.rollback.triggers]]\nkind = \"unhealthy\"\nfor = \"0s\"\n";
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\neject_after = 3\neject_for = \"30s\"\n{}",
        service("api", &[blue.addr], &[green.addr], extra)
    ))
    .await;
    let (s, v) = p.flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    green.set_status(503);
    for _ in 0..3 {
        assert_eq!(p.get("/x").await.0, 503);
    }
    let rolled = eventually(10, || async {
        p.events()
            .await
            .iter()
            .any(|e| e["reason"] == "auto_rollback" && e["trigger"]["kind"] == "unhealthy")
    })
    .await;
    assert!(rolled, "no rollback: {}", p.service_status("api").await);
    assert_eq!(p.get("/x").await, (200, "blue\n".to_string()));
    p.stop().await;
}

// ---------------------------------------------------------------------------------------------
// A body the upstream cuts
// ---------------------------------------------------------------------------------------------

const CUT_CL: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial";
const CUT_CHUNKED: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\npartial\r\n";

async fn cutting_upstream() -> SocketAddr {
    raw_upstream(|head| {
        if head.contains("/chunked") {
            Raw::Close(CUT_CHUNKED.to_vec())
        } else if head.contains("/whole") {
            Raw::Answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nwhole".to_vec())
        } else {
            Raw::Close(CUT_CL.to_vec())
        }
    })
    .await
}

/// A raw HTTP/1.1 GET on a keep-alive connection the client never closes: what arrived, and
/// how long the proxy kept the connection open after the response's first bytes (the time
/// from the cut to the close: the request's own way through the proxy is not counted, so a
/// loaded machine adds little to it).
async fn raw_get_until_closed(proxy: SocketAddr, path: &str) -> (Vec<u8>, Duration) {
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: api\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut first = None;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    first.get_or_insert_with(tokio::time::Instant::now);
                    got.extend_from_slice(&buf[..n]);
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the proxy kept the cut connection open 5 s");
    let open_for = first.map_or(Duration::ZERO, |t| t.elapsed());
    (got, open_for)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_body_is_a_failure_and_the_client_sees_the_cut_at_once() {
    let cut = cutting_upstream().await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&service("api", &[cut], &[green.addr], "")).await;

    for (i, path) in ["/cl", "/chunked"].into_iter().enumerate() {
        let (got, took) = raw_get_until_closed(p.proxy, path).await;
        let text = String::from_utf8_lossy(&got).into_owned();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("partial"), "{text}");
        // Cut: never the last chunk, never the whole length.
        assert!(!text.ends_with("0\r\n\r\n"), "{text}");
        // The proxy used to linger 1 s after a cut before closing; now it closes at once. (The
        // linger is a fixed 1 s, so this bound cannot leave seconds; it counts only from the
        // response's first bytes, which the cut follows at once.)
        eprintln!("{path}: the cut connection closed {took:?} after the first bytes");
        assert!(
            took < Duration::from_millis(800),
            "{path}: the connection closed only after {took:?}"
        );

        // Recorded as a failure, once: window, failure counter (kind reset), status counter.
        let n = (i + 1) as u64;
        let blue = &p.service_status("api").await["colors"]["blue"];
        assert_eq!(blue["requests"].as_u64(), Some(n), "{blue}");
        assert_eq!(blue["failures"].as_u64(), Some(n), "{blue}");
        let text = metrics(&p).await;
        assert_eq!(failures(&text, "blue", cut, "reset"), n as f64, "{text}");
    }

    // A whole body is no failure.
    assert_eq!(p.get("/whole").await, (200, "whole".to_string()));
    let blue = &p.service_status("api").await["colors"]["blue"];
    assert_eq!(blue["requests"].as_u64(), Some(3), "{blue}");
    assert_eq!(blue["failures"].as_u64(), Some(2), "{blue}");
    p.stop().await;
}

/// An HTTP/1.0 client reads a body of unknown length until the close: a cut one ends with a
/// reset, never the FIN that would pass it off as whole (RFC 9112 6.3); a cut with a length
/// ends with a FIN, the framing tells that client (and the bytes sent are all delivered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_close_delimited_body_ends_with_a_reset() {
    let cut = cutting_upstream().await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&service("api", &[cut], &[green.addr], "")).await;
    for (path, reset) in [("/chunked", true), ("/cl", false)] {
        let mut s = tokio::net::TcpStream::connect(p.proxy)
            .await
            .expect("connect");
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: api\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .expect("the proxy kept the cut connection open 5 s");
        let text = String::from_utf8_lossy(&got).into_owned();
        match end {
            Err(e) => {
                assert!(reset, "{path}: {e}; got {text:?}");
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{path}");
            }
            Ok(()) => {
                assert!(!reset, "{path}: a clean end (FIN) after {text:?}");
                assert!(text.starts_with("HTTP/1.1 200"), "{text}");
                assert!(text.ends_with("partial"), "{text}");
            }
        }
    }
    // The proxy serves on.
    assert_eq!(p.get("/whole").await, (200, "whole".to_string()));
    p.stop().await;
}

/// An HTTP/1.0 client that stops reading an endless close-delimited body past
/// `client_send_timeout`: the proxy lets the connection go with a reset, never the FIN that
/// would end that body as if whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_delimited_body_the_client_stops_reading_ends_with_a_reset() {
    let chunk = format!("4000\r\n{}\r\n", "x".repeat(0x4000)).into_bytes();
    let endless = raw_upstream(move |_| {
        Raw::Endless(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec(),
            chunk.clone(),
        )
    })
    .await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"1s\"\nclient_send_timeout = \"1s\"\n{}",
        service("api", &[endless], &[green.addr], "")
    ))
    .await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut s = socket.connect(p.proxy).await.expect("connect");
    s.write_all(b"GET /endless HTTP/1.0\r\nHost: api\r\n\r\n")
        .await
        .expect("write");
    // Not read for longer than client_send_timeout: the proxy's writes stall and it gives up.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut buf = vec![0u8; 64 * 1024];
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await
    .expect("the connection ended in time");
    let e = end.expect_err("a clean end (FIN) of a body cut by the send timeout");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_body_reaches_an_h2_client_as_an_error() {
    let cut = cutting_upstream().await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&service("api", &[cut], &[green.addr], "")).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let req = http::Request::get(format!("http://{}/chunked", p.proxy))
        .body(Full::new(Bytes::new()))
        .expect("request");
    // The proxy answers the head as soon as the upstream's arrives and resets the stream when the
    // body is cut; when the cut is in the same read as the head, h2 drops the still-queued HEADERS
    // frame with the reset (RFC 9113 5.4.2 lets it), so the client sees the error on the head.
    // Either way the client must see an error, never a clean end.
    let head = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .expect("head or reset in time");
    if let Ok(resp) = head {
        assert_eq!(resp.status(), 200);
        let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
            .await
            .expect("the cut reached the client within 10 s");
        assert!(body.is_err(), "a cut body ended cleanly for the h2 client");
    }
    let blue = &p.service_status("api").await["colors"]["blue"];
    assert_eq!(blue["failures"].as_u64(), Some(1), "{blue}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_body_on_a_critical_path_rolls_back() {
    let blue = TestUpstream::start("blue").await;
    let cut = cutting_upstream().await;
    let extra = "[services.rollback]\nwatch_for = \"10m\"\nmin_requests = 1\n[[services.rollback.triggers]]\nkind = \"critical_5xx\"\npaths = [\"/pay\"]\nabove = 0\nover = \"30s\"\nfor = \"0s\"\n";
    let p = TestProxy::start(&service("api", &[blue.addr], &[cut], extra)).await;
    let (s, v) = p.flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    let (got, _) = raw_get_until_closed(p.proxy, "/pay/now").await;
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    let rolled = eventually(10, || async {
        p.events()
            .await
            .iter()
            .any(|e| e["reason"] == "auto_rollback")
    })
    .await;
    assert!(rolled, "no rollback: {}", p.service_status("api").await);
    assert_eq!(p.service_status("api").await["active"], "blue");
    p.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Memory over reloads
// ---------------------------------------------------------------------------------------------

fn config_with(ups: &[SocketAddr], green: SocketAddr) -> String {
    service("api", ups, &[green], "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_drops_removed_upstreams_their_series_and_reuses_their_windows() {
    let green = TestUpstream::start("green").await;
    let first = [dead_addr().await, dead_addr().await];
    let p = TestProxy::start(&config_with(&first, green.addr)).await;
    let app = p.app().clone();
    let old: Vec<std::sync::Weak<switchyard::Upstream>> = app
        .snapshot()
        .service("api")
        .expect("api")
        .pool(switchyard::config::Color::Blue)
        .upstreams
        .iter()
        .map(Arc::downgrade)
        .collect();
    // Series for the old upstreams (a refused connect on each: failures and 502s).
    for _ in 0..4 {
        let _ = p.get("/x").await;
    }
    let text = metrics(&p).await;
    assert!(first.iter().any(|a| text.contains(&a.to_string())));

    for round in 0..3 {
        let next = [dead_addr().await, dead_addr().await];
        let body = full_config(
            &config_with(&next, green.addr),
            p.dir.as_ref().expect("dir").path(),
        );
        std::fs::write(&p.config_path, body).expect("write config");
        app.reload("test").await.expect("reload");
        // The windows of the upstreams each reload removes serve the next one's new upstreams.
        let bin = app.snapshot().windows.clone();
        let removed_by_this_one = eventually(5, || {
            let bin = bin.clone();
            async move { bin.len() == 2 }
        })
        .await;
        assert!(
            removed_by_this_one,
            "round {round}: {} windows kept",
            bin.len()
        );
        assert_eq!(bin.reused(), 2 * round, "round {round}");
    }
    // Dropped: nothing holds the removed upstreams (no task, no cycle).
    let gone = eventually(5, || {
        let old = old.clone();
        async move { old.iter().all(|w| w.upgrade().is_none()) }
    })
    .await;
    assert!(gone, "removed upstreams are still alive after the reloads");
    // And their series are gone from /metrics.
    let text = metrics(&p).await;
    for a in first {
        assert!(
            !text.contains(&a.to_string()),
            "series of removed upstream {a} remain:\n{text}"
        );
    }
    // Their windows wait for the next reload's new upstreams.
    assert_eq!(app.snapshot().windows.len(), 2);
    p.stop().await;
}

/// A reload that removes a whole service removes every series that names it, its
/// `switchyard_flips_total` counters included (created at 0 for every reason).
#[tokio::test]
async fn a_reload_that_removes_a_service_takes_all_its_series() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let api = service("api", &[blue.addr], &[green.addr], "path_prefix = \"/api\"");
    let old = service("old", &[blue.addr], &[green.addr], "");
    let p = TestProxy::start(&format!("{api}{old}")).await;
    assert_eq!(p.get("/x").await.0, 200);
    assert_eq!(p.flip("old", "green").await.0, 200);
    assert_eq!(p.get("/x").await.0, 200);
    let text = metrics(&p).await;
    assert!(
        text.contains("switchyard_flips_total{reason=\"manual\",service=\"old\"} 1"),
        "{text}"
    );
    let body = full_config(&api, p.dir.as_ref().expect("dir").path());
    std::fs::write(&p.config_path, body).expect("write config");
    p.app().reload("test").await.expect("reload");
    let text = metrics(&p).await;
    let left: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("service=\"old\""))
        .collect();
    assert!(
        left.is_empty(),
        "series of the removed service remain: {left:#?}"
    );
    assert!(text.contains("service=\"api\""));
    p.stop().await;
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The real binary: 40 reloads, each with four new upstream addresses (health checks on, a
/// scrape after each), and RSS ends within 32 MiB of where it started and within 4 MiB of where
/// it was after reload 10 (it grew by ~5 MiB per reload before the fix: about 200 MiB over the
/// same run). Measured in a debug build: 26.4 MiB at start, 31.8 after reload 10, 31.9 after 40;
/// session 18, the same test on the same machine: 42.3 → 51.2 MiB with 1 MiB window rings, and
/// 46.1 → 61.1 after reload 10 → 61.0 after 40 with 2 MiB ones (the p95 change): the one-time
/// cost is the windows kept for the next reload's new upstreams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rss_stays_flat_over_40_reloads_with_new_upstreams() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (proxy, admin) = (free_port(), free_port());
    let write = |base: u16| {
        let mut s = format!(
            "[proxy]\nlisten = \"127.0.0.1:{proxy}\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[state]\npath = \"{}\"\n",
            dir.path().join("state.json").display()
        );
        s += &format!(
            "[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"] }}\ngreen = {{ upstreams = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"] }}\nhealth = {{ path = \"/health\", interval = \"100ms\" }}\n",
            base + 1,
            base + 2,
            base + 3,
            base + 4
        );
        std::fs::write(dir.path().join("sy.toml"), s).expect("write config");
    };
    write(1000);
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--config"])
        .arg(dir.path().join("sy.toml"))
        .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn switchyard");
    let pid = child.id().expect("pid");
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let up = eventually(20, || async {
        try_get(admin_addr, "/healthz").await.is_some()
    })
    .await;
    assert!(up, "switchyard did not start");
    // Settle: the first scrape and health rounds allocate what they keep.
    let _ = get(admin_addr, "/metrics").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let start = rss_kib(pid);
    let mut after_10 = 0;
    for i in 1..=40u16 {
        write(1000 + i * 10);
        let (s, v) = admin_post(admin_addr, "/api/reload", Some(TOKEN), None).await;
        assert_eq!(s, 200, "reload {i}: {v}");
        let _ = get(admin_addr, "/metrics").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        if i % 10 == 0 {
            let rss = rss_kib(pid);
            eprintln!("RSS after reload {i}: {rss} KiB");
            if i == 10 {
                after_10 = rss;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let end = rss_kib(pid);
    eprintln!("RSS {start} KiB at start, {end} KiB after 40 reloads");
    let _ = child.kill().await;
    assert!(start > 0 && end > 0, "no RSS read ({start}, {end})");
    assert!(
        end < start + 32 * 1024,
        "RSS grew from {start} KiB to {end} KiB over 40 reloads"
    );
    // Flat: the one-time cost (the windows kept for the next reload's new upstreams) is paid by
    // reload 10; the last 30 reloads add nothing that stays (measured: +0.2 MiB).
    assert!(
        end < after_10 + 4 * 1024,
        "RSS grew from {after_10} KiB after reload 10 to {end} KiB after reload 40"
    );
}

#[test]
fn retry_and_ejection_keys_are_checked_with_their_keys() {
    let svc = "[[services]]\nname = \"api\"\nblue = { upstreams = [\"127.0.0.1:3001\"] }\ngreen = { upstreams = [\"127.0.0.1:3011\"] }\n";
    let parse = |proxy: &str| {
        switchyard::config::from_toml_str_with_env(
            &format!("[proxy]\n{proxy}\n{svc}"),
            Some(Default::default()),
        )
    };
    let cfg = parse("").expect("defaults");
    assert_eq!(cfg.proxy.retries, 2);
    assert_eq!(cfg.proxy.passive.eject_after, 5);
    assert_eq!(cfg.proxy.passive.eject_for, Duration::from_secs(10));
    let cfg = parse("retries = 0\neject_after = 0\neject_for = \"250ms\"").expect("valid");
    assert_eq!((cfg.proxy.retries, cfg.proxy.passive.eject_after), (0, 0));
    let err = parse("retries = 11\neject_after = -1\neject_for = \"0s\"")
        .expect_err("invalid")
        .to_string();
    for key in ["proxy.retries", "proxy.eject_after", "proxy.eject_for"] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
    let err = parse("eject_for = \"10\"")
        .expect_err("no unit")
        .to_string();
    assert!(err.contains("proxy.eject_for"), "{err}");
}

/// What an h2 test upstream does with each stream: answer it somehow and go on (true), or
/// drop the connection under it (false).
type OnStream = fn(h2::server::SendResponse<Bytes>) -> bool;

/// An h2 upstream that hands every stream it accepts to `on_stream`, counting them.
async fn h2_upstream_that(on_stream: OnStream) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_req, reply))) = conn.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    if !on_stream(reply) {
                        // Dropped: the TCP connection closes under the stream.
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// An h2 upstream that resets every stream with REFUSED_STREAM (RFC 9113 8.7: not processed),
/// counting them.
async fn refusing_h2_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    h2_upstream_that(|mut reply| {
        reply.send_reset(h2::Reason::REFUSED_STREAM);
        true
    })
    .await
}

/// A bodiless request an h2 upstream refused (REFUSED_STREAM: it did not process it) goes to
/// another upstream of the pool, as a failed connect does; the client never sees the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_pool_sends_a_refused_bodiless_request_elsewhere() {
    let (refuser, refused) = refusing_h2_upstream().await;
    let up = TestUpstream::start("alive").await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\neject_after = 0\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{refuser}\", \"{}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{}\"] }}\n",
        up.addr, green.addr
    ))
    .await;
    for i in 0..40 {
        if i > 0 && refused.load(Ordering::SeqCst) >= 2 {
            break;
        }
        if i > 0 {
            // An upstream whose last request failed is avoided for a second.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let (s, body) = request(p.proxy, "GET", "/echo", &[], Bytes::new()).await;
        assert_eq!(s, 200, "GET {i}: {body}");
        assert!(
            body.contains("HTTP/2"),
            "GET {i} did not go over h2: {body}"
        );
    }
    assert!(
        refused.load(Ordering::SeqCst) >= 1,
        "no request was drawn to the refusing upstream first (nothing retried)"
    );
    p.stop().await;
}

/// An h2 upstream that reads each request, then drops its connection without an answer (a
/// crash between the request and the answer).
async fn dying_h2_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    h2_upstream_that(|_| false).await
}

/// An h2 upstream that dies with a request on it: an idempotent bodiless request goes to
/// another upstream of the pool, as on an HTTP/1.1 pool (the client got a 502, and the crash
/// of one instance counted in the live color's window); a POST, which it may have acted on, is
/// never sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_pool_sends_an_idempotent_request_elsewhere_when_its_upstream_dies() {
    let (dier, seen) = dying_h2_upstream().await;
    let up = TestUpstream::start("alive").await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\neject_after = 0\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{dier}\", \"{}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{}\"] }}\n",
        up.addr, green.addr
    ))
    .await;
    // An upstream whose last request failed is avoided for a second.
    let avoided = Duration::from_millis(1100);
    for method in ["GET", "DELETE"] {
        let mut drawn = false;
        for i in 0..40 {
            let before = seen.load(Ordering::SeqCst);
            let (s, body) = request(p.proxy, method, "/echo", &[], Bytes::new()).await;
            assert_eq!(s, 200, "{method} {i}: {body}");
            if seen.load(Ordering::SeqCst) > before {
                drawn = true;
                break;
            }
        }
        assert!(drawn, "no {method} was drawn to the dying upstream");
        tokio::time::sleep(avoided).await;
    }
    let mut drawn = false;
    for i in 0..40 {
        let before = (seen.load(Ordering::SeqCst), up.hits());
        let (s, _) = request(p.proxy, "POST", "/echo", &[], Bytes::new()).await;
        if seen.load(Ordering::SeqCst) > before.0 {
            assert_eq!(s, 502, "POST {i}");
            assert_eq!(up.hits(), before.1, "POST {i} was sent again");
            drawn = true;
            break;
        }
        assert_eq!(s, 200, "POST {i}");
    }
    assert!(drawn, "no POST was drawn to the dying upstream");
    p.stop().await;
}

/// On an h2 pool, a client's upload that stalls (past `body_idle_timeout`) or is cut is the
/// client's doing, as on an HTTP/1.1 pool: 408, and no failure charged to the upstream (the
/// pool's client turns the body's error into a reset of its own, which read as the upstream's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_pools_upload_the_client_stalls_or_cuts_is_not_an_upstream_failure() {
    let up = TestUpstream::start("alive").await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nbody_idle_timeout = \"1s\"\nrequest_timeout = \"20s\"\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{}\"] }}\n",
        up.addr, green.addr
    ))
    .await;
    let head = b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nhello";
    // Stalled: half the body, then nothing.
    let mut s = tokio::net::TcpStream::connect(p.proxy)
        .await
        .expect("connect");
    s.write_all(head).await.expect("write");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut got)).await;
    let got = String::from_utf8_lossy(&got).to_string();
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    // Cut: half the body, then the connection closed.
    let mut s = tokio::net::TcpStream::connect(p.proxy)
        .await
        .expect("connect");
    s.write_all(head).await.expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let blue = &p.service_status("api").await["colors"]["blue"];
    assert_eq!(blue["failures"].as_u64(), Some(0), "{blue}");
    let text = metrics(&p).await;
    for kind in ["reset", "timeout", "protocol", "connect"] {
        assert_eq!(
            failures(&text, "blue", up.addr, kind),
            0.0,
            "{kind}: {text}"
        );
    }
    p.stop().await;
}

/// An h2c upstream that answers `/cl` with `:status 200`, `content-length: 10` and 5 bytes of
/// DATA, `/nocl` with the same 5 bytes and no length, then resets the stream with
/// RST_STREAM(NO_ERROR), never sending END_STREAM; `/early` gets a whole `ok` and then the
/// polite reset (RFC 9113 8.1: an early response, the request body no longer wanted); anything
/// else gets a whole `ok`.
async fn polite_resetting_h2_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, mut reply))) = conn.accept().await {
                    tokio::spawn(async move {
                        let mut head = http::Response::builder().status(200);
                        let cut = match req.uri().path() {
                            "/cl" => {
                                head = head.header("content-length", "10");
                                true
                            }
                            "/nocl" => true,
                            _ => false,
                        };
                        let Ok(mut tx) = reply.send_response(head.body(()).expect("head"), false)
                        else {
                            return;
                        };
                        if !cut {
                            let _ = tx.send_data(Bytes::from_static(b"ok"), true);
                            if req.uri().path() == "/early" {
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                tx.send_reset(h2::Reason::NO_ERROR);
                            }
                            return;
                        }
                        let _ = tx.send_data(Bytes::from_static(b"12345"), false);
                        // The DATA goes out before the reset (a reset drops what is queued).
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        tx.send_reset(h2::Reason::NO_ERROR);
                    });
                }
            });
        }
    });
    addr
}

/// What an HTTP/1.1 client reads for `req` until the proxy closes the connection (None: it
/// was still open after 10 s).
async fn read_until_closed(proxy: SocketAddr, req: &[u8]) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(proxy)
        .await
        .expect("connect");
    s.write_all(req).await.expect("write");
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    read.ok()
        .map(|_| String::from_utf8_lossy(&got).into_owned())
}

/// An h2 upstream that resets its stream with NO_ERROR mid-body (after `:status 200`, some
/// DATA, no END_STREAM) has not sent a complete response (RFC 9113 8.1), though hyper ends
/// such a body as if it were whole: the client sees an aborted response (HTTP/1.1: the
/// connection closes short of the Content-Length or without the last chunk, and the next
/// request on it is not answered into the cut body; h2: the stream is reset), and each is a
/// `reset` failure of the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_upstreams_polite_reset_mid_body_is_a_cut_body() {
    let up = polite_resetting_h2_upstream().await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{up}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{}\"] }}\n",
        green.addr
    ))
    .await;
    let (s, body) = p.get("/whole").await;
    assert_eq!((s, body.as_str()), (200, "ok"));
    // A complete response (END_STREAM) and then the polite reset, while the upload is still
    // going on: a whole answer, not a cut one (h2 keeps "END_STREAM came" across the reset).
    let mut c = tokio::net::TcpStream::connect(p.proxy)
        .await
        .expect("connect");
    c.write_all(b"POST /early HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n12345")
        .await
        .expect("write");
    let mut got = Vec::new();
    let whole = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"\r\n0\r\n\r\n") {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got);
    // Chunked (the upstream sent no length), ended by its last chunk.
    assert!(whole.is_ok(), "{text:?}");
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
    assert!(text.ends_with("\r\n\r\n2\r\nok\r\n0\r\n\r\n"), "{text:?}");
    drop(c);

    // HTTP/1.1, with Content-Length, and a second request pipelined behind the first.
    let got = read_until_closed(
        p.proxy,
        b"GET /cl HTTP/1.1\r\nHost: a\r\n\r\nGET /whole HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await
    .expect("the connection was kept open after a cut body (the client waits for 5 more bytes, and the next response lands in them)");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains("content-length: 10\r\n"), "{got}");
    let body = got.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    assert!(body.len() < 10, "a whole body from a cut stream: {got:?}");
    assert_eq!(got.matches("HTTP/1.1").count(), 1, "{got:?}");

    // HTTP/1.1, chunked (no length upstream): no last chunk.
    let got = read_until_closed(p.proxy, b"GET /nocl HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("the connection was kept open after a cut body");
    assert!(got.contains("transfer-encoding: chunked\r\n"), "{got}");
    assert!(
        !got.ends_with("0\r\n\r\n"),
        "a cut body ended with a clean last chunk: {got:?}"
    );

    // h2 (prior knowledge): the stream is reset, never ended.
    let tcp = tokio::net::TcpStream::connect(p.proxy)
        .await
        .expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let conn = tokio::spawn(conn);
    for path in ["/cl", "/nocl"] {
        let mut client = client.clone().ready().await.expect("ready");
        let req = http::Request::get(format!("http://a{path}"))
            .body(())
            .expect("req");
        let (resp, _) = client.send_request(req, true).expect("send");
        let resp = tokio::time::timeout(Duration::from_secs(10), resp)
            .await
            .expect("no head in 10 s")
            .expect("head");
        assert_eq!(resp.status(), 200, "{path}");
        let mut body = resp.into_body();
        let mut got = Vec::new();
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match body.data().await {
                    Some(Ok(d)) => got.extend_from_slice(&d),
                    Some(Err(e)) => return Err(e),
                    None => return Ok(()),
                }
            }
        })
        .await
        .expect("the body neither ended nor failed in 10 s");
        assert!(
            end.is_err(),
            "{path}: a cut body reached the h2 client as a whole one: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    conn.abort();

    let counted = eventually(10, || async {
        failures(&metrics(&p).await, "blue", up, "reset") == 4.0
    })
    .await;
    let text = metrics(&p).await;
    assert!(counted, "four cut bodies, four reset failures: {text}");
    p.stop().await;
}

/// An h2c-only upstream (as a gRPC server is): HTTP/1.1 is refused (the connection is dropped
/// at its first bytes); over h2 every request gets `200 h2 <path>`. Counts the requests that
/// reached it, HTTP/1.1 attempts included.
async fn h2c_only_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                if tcp.peek(&mut preface).await.is_ok() && !preface.starts_with(b"PRI * HTTP/2.0") {
                    // An HTTP/1.1 request: refused.
                    count.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((req, mut reply))) = conn.accept().await {
                    count.fetch_add(1, Ordering::SeqCst);
                    let body = Bytes::from(format!("h2 {}", req.uri().path()));
                    let head = http::Response::builder()
                        .status(200)
                        .header("content-length", body.len())
                        .body(())
                        .expect("head");
                    if let Ok(mut tx) = reply.send_response(head, false) {
                        let _ = tx.send_data(body, true);
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// Health checks and smoke tests speak the pool's protocol: an h2c-only upstream in a
/// `protocol = "h2"` pool with `[services.health]` is healthy and serves (it was marked
/// unhealthy by checks sent as HTTP/1.1, and every request answered 503), and a flip to an h2
/// pool passes its `smoke_paths`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_and_smoke_tests_of_an_h2_pool_speak_h2() {
    let (blue, blue_seen) = h2c_only_upstream().await;
    let (green, green_seen) = h2c_only_upstream().await;
    // Without health checks: the flip's smoke test alone.
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{blue}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{green}\"], protocol = \"h2\" }}\nsmoke_paths = [\"/smoke\"]\n"
    ))
    .await;
    let (s, answer) = p.flip("api", "green").await;
    assert_eq!(s, 200, "the smoke test of an h2 pool failed: {answer}");
    let (s, body) = p.get("/z").await;
    assert_eq!((s, body.as_str()), (200, "h2 /z"));
    p.stop().await;

    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{blue}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{green}\"], protocol = \"h2\" }}\nsmoke_paths = [\"/smoke\"]\n[services.health]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"1s\"\nunhealthy_after = 1\nhealthy_after = 1\n"
    ))
    .await;
    // Several rounds of checks on both colors.
    assert!(
        eventually(10, || async {
            blue_seen.load(Ordering::SeqCst) >= 3 && green_seen.load(Ordering::SeqCst) >= 3
        })
        .await,
        "no health checks reached the upstreams"
    );
    let status = p.service_status("api").await;
    for color in ["blue", "green"] {
        assert_eq!(
            status["colors"][color]["healthy"], true,
            "{color}: {status}"
        );
    }
    let (s, body) = p.get("/x").await;
    assert_eq!((s, body.as_str()), (200, "h2 /x"));
    let (s, answer) = p.flip("api", "green").await;
    assert_eq!(s, 200, "{answer}");
    let (s, body) = p.get("/y").await;
    assert_eq!((s, body.as_str()), (200, "h2 /y"));
    p.stop().await;
}

/// An h2c upstream written frame by frame: its first connection answers the first request's
/// HEADERS with GOAWAY(last-stream-id 0, NO_ERROR) and closes (RFC 9113 6.8: that stream was
/// not processed); every later connection answers each request `:status 200`. Counts the
/// connections.
async fn goaway_first_h2_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let conns = Arc::new(AtomicUsize::new(0));
    let count = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let first = count.fetch_add(1, Ordering::SeqCst) == 0;
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                if tcp.read_exact(&mut preface).await.is_err() {
                    return;
                }
                // Our SETTINGS (empty).
                if tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.is_err() {
                    return;
                }
                loop {
                    let mut head = [0u8; 9];
                    if tcp.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let len = usize::from(head[0]) << 16
                        | usize::from(head[1]) << 8
                        | usize::from(head[2]);
                    let (kind, flags) = (head[3], head[4]);
                    let stream =
                        u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    let mut payload = vec![0u8; len];
                    if tcp.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    let out: Vec<u8> = match kind {
                        // SETTINGS without ACK: acknowledged.
                        4 if flags & 1 == 0 => vec![0, 0, 0, 4, 1, 0, 0, 0, 0],
                        1 if first => {
                            // GOAWAY, last-stream-id 0, NO_ERROR; then the connection closes.
                            let goaway = [0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                            let _ = tcp.write_all(&goaway).await;
                            let _ = tcp.shutdown().await;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            return;
                        }
                        // HEADERS: `:status 200` (static table index 8), END_STREAM|END_HEADERS.
                        1 => {
                            let s = stream.to_be_bytes();
                            vec![0, 0, 1, 1, 5, s[0], s[1], s[2], s[3], 0x88]
                        }
                        _ => continue,
                    };
                    if tcp.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, conns)
}

/// A request on a stream the h2 upstream's GOAWAY did not cover (above its last-stream-id:
/// not processed, RFC 9113 6.8) is sent once more on a new connection, whatever its method,
/// also when the pool has no other upstream; the upstream closing a connection is not a
/// failure of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_an_h2_upstreams_goaway_left_out_is_sent_again_on_a_new_connection() {
    let (up, conns) = goaway_first_h2_upstream().await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{up}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{}\"] }}\n",
        green.addr
    ))
    .await;
    let (s, body) = tokio::time::timeout(
        Duration::from_secs(10),
        request(p.proxy, "POST", "/x", &[], Bytes::new()),
    )
    .await
    .expect("answered");
    assert_eq!(s, 200, "{body}");
    assert!(
        conns.load(Ordering::SeqCst) >= 2,
        "not sent on a new connection"
    );
    let (s, body) = p.get("/y").await;
    assert_eq!(s, 200, "{body}");
    let text = metrics(&p).await;
    for kind in ["reset", "timeout", "protocol", "connect"] {
        assert_eq!(failures(&text, "blue", up, kind), 0.0, "{kind}: {text}");
    }
    p.stop().await;
}

/// A listener whose accept queue is full: SYNs to it are dropped, a connect hangs (a
/// black-holed upstream). Hold the returned connections while it is used.
async fn black_hole() -> (SocketAddr, socket2::Socket, Vec<tokio::net::TcpStream>) {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    socket.bind(&any.into()).expect("bind");
    socket.listen(0).expect("listen");
    let addr = socket
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("inet");
    let mut filler = Vec::new();
    loop {
        match tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(c)) => filler.push(c),
            Ok(Err(e)) => panic!("connect: {e}"),
            Err(_) => break,
        }
        assert!(filler.len() < 64, "the accept queue never filled");
    }
    (addr, socket, filler)
}

/// Requests that arrive while the connect to a black-holed h2 upstream is under way share
/// its outcome: each is a connect failure (502) when it fails, none waits for connects of
/// its own, one after another, until its `request_timeout` (504, never sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_on_an_h2_connect_share_its_failure() {
    let (dead, _socket, _filler) = black_hole().await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nconnect_timeout = \"1s\"\nrequest_timeout = \"3500ms\"\neject_after = 0\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{dead}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{}\"] }}\n",
        green.addr
    ))
    .await;
    let mut all = Vec::new();
    for i in 0..6 {
        let proxy = p.proxy;
        all.push(tokio::spawn(async move {
            request(proxy, "GET", &format!("/{i}"), &[], Bytes::new()).await
        }));
    }
    let mut statuses = Vec::new();
    for r in all {
        let (s, _) = tokio::time::timeout(Duration::from_secs(15), r)
            .await
            .expect("answered")
            .expect("task");
        statuses.push(s);
    }
    assert!(statuses.iter().all(|&s| s == 502), "{statuses:?}");
    p.stop().await;
}

/// An h2 upstream whose headers and trailers are over 16 KiB (hyper's default limit) and
/// under 128 KiB (the limit on any upstream head) are passed on; trailers over 128 KiB cut
/// the response (a failure), never a clean end without them. `/big-head` gets a 20,000-byte
/// header; `/big-trailer` and `/huge-trailer` `grpc-status: 13` after a 20,000- or
/// 200,000-byte `grpc-message`.
async fn big_fields_h2_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::Builder::new()
                    .max_send_buffer_size(1 << 20)
                    .handshake::<_, Bytes>(tcp)
                    .await
                else {
                    return;
                };
                while let Some(Ok((req, mut reply))) = conn.accept().await {
                    let path = req.uri().path().to_owned();
                    let mut head = http::Response::builder().status(200);
                    if path == "/big-head" {
                        head = head.header("x-big", "h".repeat(20_000));
                    }
                    let Ok(mut tx) = reply.send_response(head.body(()).expect("head"), false)
                    else {
                        continue;
                    };
                    let message = match path.as_str() {
                        "/big-trailer" => Some(20_000),
                        "/huge-trailer" => Some(200_000),
                        _ => None,
                    };
                    let _ = tx.send_data(Bytes::from_static(b"ok"), message.is_none());
                    if let Some(n) = message {
                        let mut t = http::HeaderMap::new();
                        t.insert("grpc-status", http::HeaderValue::from_static("13"));
                        t.insert(
                            "grpc-message",
                            http::HeaderValue::from_str(&"m".repeat(n)).expect("value"),
                        );
                        let _ = tx.send_trailers(t);
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_upstreams_headers_and_trailers_up_to_128_kib_pass() {
    let up = big_fields_h2_upstream().await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{up}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{}\"] }}\n",
        green.addr
    ))
    .await;
    let tcp = tokio::net::TcpStream::connect(p.proxy)
        .await
        .expect("connect");
    let (client, conn) = h2::client::Builder::new()
        .max_header_list_size(1 << 20)
        .handshake::<_, Bytes>(tcp)
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    // What the client gets: the status, a header's length, the trailers' (None: no trailers),
    // or an error where the response was cut.
    let fetch = |path: &'static str| {
        let client = client.clone();
        async move {
            let req = http::Request::get(format!("http://a{path}"))
                .body(())
                .expect("request");
            let mut client = client.clone().ready().await.map_err(|e| e.to_string())?;
            let (resp, _) = client.send_request(req, true).map_err(|e| e.to_string())?;
            let resp = resp.await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            let big = resp.headers().get("x-big").map_or(0, |v| v.len());
            let mut body = resp.into_body();
            while let Some(d) = body.data().await {
                let d = d.map_err(|e| e.to_string())?;
                let _ = body.flow_control().release_capacity(d.len());
            }
            let trailers = body.trailers().await.map_err(|e| e.to_string())?;
            let trailers = trailers.map(|t| {
                (
                    t.get("grpc-status").map(|v| v.as_bytes().to_vec()),
                    t.get("grpc-message").map_or(0, |v| v.len()),
                )
            });
            Ok::<_, String>((status, big, trailers))
        }
    };
    let got = tokio::time::timeout(Duration::from_secs(10), fetch("/big-head"))
        .await
        .expect("answered");
    assert_eq!(got, Ok((200, 20_000, None)), "{got:?}");
    let got = tokio::time::timeout(Duration::from_secs(10), fetch("/big-trailer"))
        .await
        .expect("answered");
    assert_eq!(
        got,
        Ok((200, 0, Some((Some(b"13".to_vec()), 20_000)))),
        "{got:?}"
    );
    let got = tokio::time::timeout(Duration::from_secs(10), fetch("/huge-trailer"))
        .await
        .expect("answered");
    assert!(got.is_err(), "trailers over 128 KiB ended cleanly: {got:?}");
    let text = metrics(&p).await;
    assert!(failures(&text, "blue", up, "reset") >= 1.0, "{text}");
    p.stop().await;
}

/// An h2 upstream whose first connection answers its first request and then never another
/// (nothing more is read from it: a peer gone without a FIN, or stuck); later connections
/// answer every request.
async fn stuck_after_one_h2_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let conns = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let first = conns.fetch_add(1, Ordering::SeqCst) == 0;
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                let mut held = Vec::new();
                let mut n = 0;
                while let Some(Ok((_req, mut reply))) = conn.accept().await {
                    n += 1;
                    if first && n > 1 {
                        held.push(reply);
                        continue;
                    }
                    let head = http::Response::builder()
                        .status(200)
                        .body(())
                        .expect("head");
                    if let Ok(mut tx) = reply.send_response(head, false) {
                        let _ = tx.send_data(Bytes::from_static(b"ok"), true);
                    }
                }
            });
        }
    });
    addr
}

/// A request that timed out on an h2 upstream connection from which nothing was read since
/// it was sent leaves that connection suspect: the next request opens a new one rather than
/// waiting there too (until PINGs give it up, up to 40 s later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_timeout_on_a_silent_h2_connection_the_next_request_opens_another() {
    let up = stuck_after_one_h2_upstream().await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nrequest_timeout = \"1s\"\neject_after = 0\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{up}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{}\"] }}\n",
        green.addr
    ))
    .await;
    let (s, body) = p.get("/1").await;
    assert_eq!((s, body.as_str()), (200, "ok"));
    let (s, _) = p.get("/2").await;
    assert_eq!(s, 504);
    let (s, body) = p.get("/3").await;
    assert_eq!(
        (s, body.as_str()),
        (200, "ok"),
        "the silent connection was used again"
    );
    p.stop().await;
}

/// An h2 upstream that answers every request at once except those under `/slow`, which it
/// holds unanswered; it counts the connections made to it.
async fn holding_h2_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                let mut held = Vec::new();
                while let Some(Ok((req, mut reply))) = conn.accept().await {
                    if req.uri().path().starts_with("/slow") {
                        held.push(reply);
                        continue;
                    }
                    let head = http::Response::builder()
                        .status(200)
                        .body(())
                        .expect("head");
                    if let Ok(mut tx) = reply.send_response(head, false) {
                        let _ = tx.send_data(Bytes::from_static(b"ok"), true);
                    }
                }
            });
        }
    });
    (addr, conns)
}

/// A client that leaves at once says nothing of the upstream: its request, dropped before the
/// answer with nothing read meanwhile, does not make the h2 connection suspect (before, every
/// abandoned request made the pool open a new connection: churn any client could drive).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_at_once_does_not_make_its_h2_connection_suspect() {
    let (up, conns) = holding_h2_upstream().await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nrequest_timeout = \"30s\"\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{up}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{}\"] }}\n",
        green.addr
    ))
    .await;
    assert_eq!(p.get("/warm").await.0, 200);
    for i in 0..3 {
        // The client gives up after 200 ms: its connection closes with the request unanswered.
        let path = format!("/slow{i}");
        let gone = tokio::time::timeout(Duration::from_millis(200), p.get(&path)).await;
        assert!(gone.is_err(), "the held request was answered");
        // Let the proxy see the close and drop the request.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(p.get(&format!("/fast{i}")).await.0, 200);
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "a new upstream connection per abandoned request"
    );
    p.stop().await;
}

/// A stream the only upstream refused (REFUSED_STREAM) is sent once more, and each refused
/// attempt counts against it, as in a pool of two (it did not count there with one upstream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refused_attempt_counts_against_the_upstream_whatever_the_pool_s_size() {
    let (refuser, refused) = refusing_h2_upstream().await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\neject_after = 0\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{refuser}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{}\"] }}\n",
        green.addr
    ))
    .await;
    let (s, body) = request(p.proxy, "GET", "/echo", &[], Bytes::new()).await;
    assert_eq!(s, 502, "{body}");
    let attempts = refused.load(Ordering::SeqCst);
    assert_eq!(attempts, 2, "sent once more after the refusal");
    let text = metrics(&p).await;
    assert_eq!(
        failures(&text, "blue", refuser, "reset"),
        attempts as f64,
        "{text}"
    );
    p.stop().await;
}

/// An upstream that closes each connection right after its answer, without `Connection:
/// close`: the pooled connection is already closed when the next request comes. A GET would
/// be sent again on a fresh one; a POST cannot be, so before one goes on a pooled connection
/// the kernel is asked whether it is still open, and every POST is answered. (The race itself,
/// a FIN the reactor has not seen yet, is made in the unit test
/// `a_sure_checkout_sees_a_fin_the_reactor_has_not`.) One worker: the proxy and the scripted
/// upstream share the test's thread, so the upstream has closed by the time the next POST
/// comes; on another worker's thread the close may still be on its way, the race this test
/// does not make.
#[tokio::test]
async fn a_post_never_goes_on_a_connection_the_upstream_has_closed() {
    let seen = Arc::new(AtomicUsize::new(0));
    let seen2 = seen.clone();
    let closer = raw_upstream(move |_| {
        seen2.fetch_add(1, Ordering::SeqCst);
        Raw::Close(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec())
    })
    .await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nworkers = 1\n{}",
        service("api", &[closer], &[green.addr], "")
    ))
    .await;
    const POST: &[u8] = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n";
    let mut answers = String::new();
    for _ in 0..100 {
        let mut c = tokio::net::TcpStream::connect(p.proxy)
            .await
            .expect("connect");
        c.write_all(&[POST, POST].concat()).await.expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while got.windows(2).filter(|w| w == b"ok").count() < 2 {
            match tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        answers.push_str(&String::from_utf8_lossy(&got));
    }
    let statuses: Vec<&str> = answers
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|a| a.get(..3).unwrap_or(a))
        .collect();
    assert_eq!(statuses, vec!["200"; 200], "{answers}");
    assert_eq!(seen.load(Ordering::SeqCst), 200);
    p.stop().await;
}
