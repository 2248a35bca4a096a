//! Telemetry end to end: `/metrics` after real traffic carries every contract series with
//! exactly its labels, passes `promtool check metrics`, leaks no path or client address, and
//! `/api/status` reports exactly the traffic the test sent.

mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One sample of the text exposition: metric name, labels, value.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A small parser for the Prometheus text format (enough for what the prometheus crate writes:
/// `name{k="v",...} value`, with `\\`, `\"` and `\n` escapes in label values).
fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => panic!("bad metrics line: {line}"),
        };
        let mut labels = BTreeMap::new();
        let rest = if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let mut end = None;
            loop {
                // key
                let mut key = String::new();
                loop {
                    let (i, c) = chars.next().unwrap_or_else(|| panic!("bad line: {line}"));
                    if c == '}' && key.is_empty() {
                        end = Some(i + 1);
                        break;
                    }
                    if c == '=' {
                        break;
                    }
                    key.push(c);
                }
                if end.is_some() {
                    break;
                }
                assert_eq!(chars.next().map(|x| x.1), Some('"'), "bad line: {line}");
                let mut val = String::new();
                loop {
                    let (_, c) = chars.next().unwrap_or_else(|| panic!("bad line: {line}"));
                    match c {
                        '\\' => match chars.next().map(|x| x.1) {
                            Some('n') => val.push('\n'),
                            Some(o) => val.push(o),
                            None => panic!("bad line: {line}"),
                        },
                        '"' => break,
                        o => val.push(o),
                    }
                }
                labels.insert(key, val);
                match chars.next() {
                    Some((_, ',')) => {
                        if let Some(&(i, '}')) = chars.peek() {
                            end = Some(i + 1);
                            break;
                        }
                    }
                    Some((i, '}')) => {
                        end = Some(i + 1);
                        break;
                    }
                    other => panic!("bad line {line}: {other:?}"),
                }
            }
            &body[end.unwrap_or(body.len())..]
        } else {
            rest
        };
        let value = rest.split_whitespace().next().unwrap_or("");
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse::<f64>()
                .unwrap_or_else(|e| panic!("bad value in {line}: {e}")),
        };
        out.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    out
}

fn of<'a>(samples: &'a [Sample], name: &str) -> Vec<&'a Sample> {
    samples.iter().filter(|s| s.name == name).collect()
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

fn keys(s: &Sample) -> BTreeSet<&str> {
    s.labels.keys().map(String::as_str).collect()
}

fn set<'a>(k: &[&'a str]) -> BTreeSet<&'a str> {
    k.iter().copied().collect()
}

async fn metrics(admin: SocketAddr) -> String {
    let (s, body) = get(admin, "/metrics").await;
    assert_eq!(s, 200, "{body}");
    body
}

/// `promtool check metrics` on the text; fails the test if promtool is missing or complains.
fn promtool_check(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => panic!(
            "promtool is required for this test but could not be run ({e}); \
             install the Debian `prometheus` package (apt-get install prometheus), which provides \
             /usr/bin/promtool"
        ),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool output");
    assert!(
        out.status.success(),
        "promtool check metrics rejected the exposition ({}):\nstdout: {}\nstderr: {}\n---\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
}

/// A GET over a raw TCP connection whose client address the test knows.
async fn raw_get(addr: SocketAddr, path: &str) -> (SocketAddr, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let local = s.local_addr().expect("local addr");
    let req = format!("GET {path} HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("raw request timed out")
        .expect("read");
    (local, String::from_utf8_lossy(&buf).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_every_contract_series_with_its_labels() {
    let api_blue = TestUpstream::start("api-blue").await;
    let api_green = TestUpstream::start("api-green").await;
    // The timeout (2 s) leaves a loaded machine seconds to answer every other request in time,
    // and far less than the slow upstream's 10 s.
    let slow = TestUpstream::start("slow").await;
    slow.set_delay(10_000);
    let flaky = TestUpstream::start("flaky").await;
    flaky.reset.store(true, std::sync::atomic::Ordering::SeqCst);
    let dead = dead_addr().await;
    let other = TestUpstream::start("other").await;

    let mut body = String::from(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\nrequest_timeout = \"2s\"\nconnect_timeout = \"1s\"\n",
    );
    body += &service(
        "api",
        &[api_blue.addr],
        &[api_green.addr],
        "path_prefix = \"/api\"",
    );
    body += &service("dead", &[dead], &[other.addr], "path_prefix = \"/dead\"");
    body += &service(
        "slow",
        &[slow.addr],
        &[other.addr],
        "path_prefix = \"/slow\"",
    );
    body += &service(
        "flaky",
        &[flaky.addr],
        &[other.addr],
        "path_prefix = \"/flaky\"",
    );
    let p = TestProxy::start(&body).await;

    // Traffic: 200s and 500s on api (with a distinctive path), a connect failure, a timeout, a
    // reset, and some requests from a client address the test knows.
    const SECRET_PATH: &str = "/api/very-secret-path-7f3a";
    let mut client_addrs = Vec::new();
    for _ in 0..5 {
        let (local, resp) = raw_get(p.proxy, &format!("{SECRET_PATH}?user=alice")).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        client_addrs.push(local);
    }
    api_blue.set_status(500);
    for _ in 0..3 {
        assert_eq!(p.get(SECRET_PATH).await.0, 500);
    }
    api_blue.set_status(200);
    assert_eq!(p.get("/dead/x").await.0, 502);
    assert_eq!(p.get("/slow/x").await.0, 504);
    assert_eq!(p.get("/flaky/x").await.0, 502);
    let (s, v) = p.flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(p.get("/api/y").await, (200, "api-green\n".to_string()));

    let text = metrics(p.admin).await;
    let samples = parse(&text);

    // Every contract metric with exactly its labels.
    let contract: &[(&str, &[&str])] = &[
        (
            "switchyard_requests_total",
            &["service", "color", "upstream", "code"],
        ),
        (
            "switchyard_upstream_failures_total",
            &["service", "color", "upstream", "kind"],
        ),
        (
            "switchyard_request_duration_seconds_bucket",
            &["service", "color", "le"],
        ),
        (
            "switchyard_request_duration_seconds_sum",
            &["service", "color"],
        ),
        (
            "switchyard_request_duration_seconds_count",
            &["service", "color"],
        ),
        ("switchyard_active_color", &["service", "color"]),
        ("switchyard_flips_total", &["service", "reason"]),
        ("switchyard_window_error_ratio", &["service", "color"]),
        (
            "switchyard_window_latency_p95_seconds",
            &["service", "color"],
        ),
        (
            "switchyard_upstream_healthy",
            &["service", "color", "upstream"],
        ),
        ("switchyard_rollback_armed", &["service"]),
        ("switchyard_state_generation", &["service"]),
    ];
    for (name, labels) in contract {
        let series = of(&samples, name);
        assert!(!series.is_empty(), "{name} missing from /metrics:\n{text}");
        for s in series {
            assert_eq!(keys(s), set(labels), "{name} has the wrong labels: {s:?}");
        }
    }
    for (name, ty) in [
        ("switchyard_requests_total", "counter"),
        ("switchyard_upstream_failures_total", "counter"),
        ("switchyard_request_duration_seconds", "histogram"),
        ("switchyard_active_color", "gauge"),
        ("switchyard_flips_total", "counter"),
        ("switchyard_window_error_ratio", "gauge"),
        ("switchyard_window_latency_p95_seconds", "gauge"),
        ("switchyard_upstream_healthy", "gauge"),
        ("switchyard_rollback_armed", "gauge"),
        ("switchyard_state_generation", "gauge"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {ty}\n")),
            "{name} is not declared a {ty}"
        );
    }

    // The values follow the traffic.
    let blue_up = api_blue.addr.to_string();
    let green_up = api_green.addr.to_string();
    let req = |svc: &str, color: &str, up: &str, code: &str| {
        value(
            &samples,
            "switchyard_requests_total",
            &[
                ("service", svc),
                ("color", color),
                ("upstream", up),
                ("code", code),
            ],
        )
    };
    assert_eq!(req("api", "blue", &blue_up, "200"), Some(5.0));
    assert_eq!(req("api", "blue", &blue_up, "500"), Some(3.0));
    assert_eq!(req("api", "green", &green_up, "200"), Some(1.0));
    assert_eq!(req("dead", "blue", &dead.to_string(), "502"), Some(1.0));
    assert_eq!(
        req("slow", "blue", &slow.addr.to_string(), "504"),
        Some(1.0)
    );
    assert_eq!(
        req("flaky", "blue", &flaky.addr.to_string(), "502"),
        Some(1.0)
    );
    let fail = |svc: &str, up: &str, kind: &str| {
        value(
            &samples,
            "switchyard_upstream_failures_total",
            &[
                ("service", svc),
                ("color", "blue"),
                ("upstream", up),
                ("kind", kind),
            ],
        )
    };
    assert_eq!(fail("api", &blue_up, "5xx"), Some(3.0), "{text}");
    assert_eq!(
        fail("dead", &dead.to_string(), "connect"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        fail("slow", &slow.addr.to_string(), "timeout"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        fail("flaky", &flaky.addr.to_string(), "reset"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            &samples,
            "switchyard_request_duration_seconds_count",
            &[("service", "api"), ("color", "blue")]
        ),
        Some(8.0)
    );
    assert_eq!(
        value(
            &samples,
            "switchyard_flips_total",
            &[("service", "api"), ("reason", "manual")]
        ),
        Some(1.0),
        "{text}"
    );
    let gauge = |name: &str, labels: &[(&str, &str)]| value(&samples, name, labels);
    assert_eq!(
        gauge(
            "switchyard_active_color",
            &[("service", "api"), ("color", "green")]
        ),
        Some(1.0)
    );
    assert_eq!(
        gauge(
            "switchyard_active_color",
            &[("service", "api"), ("color", "blue")]
        ),
        Some(0.0)
    );
    assert_eq!(
        gauge("switchyard_state_generation", &[("service", "api")]),
        Some(1.0)
    );
    assert_eq!(
        gauge("switchyard_state_generation", &[("service", "dead")]),
        Some(0.0)
    );
    // No triggers configured: never armed.
    assert_eq!(
        gauge("switchyard_rollback_armed", &[("service", "api")]),
        Some(0.0)
    );
    assert_eq!(
        gauge(
            "switchyard_upstream_healthy",
            &[
                ("service", "api"),
                ("color", "blue"),
                ("upstream", &blue_up)
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        gauge(
            "switchyard_window_error_ratio",
            &[("service", "api"), ("color", "blue")]
        ),
        Some(3.0 / 8.0)
    );
    assert_eq!(
        gauge(
            "switchyard_window_error_ratio",
            &[("service", "dead"), ("color", "blue")]
        ),
        Some(1.0)
    );
    let p95 = gauge(
        "switchyard_window_latency_p95_seconds",
        &[("service", "slow"), ("color", "blue")],
    )
    .expect("slow p95");
    // At least the 2 s timeout; far below the upstream's 10 s (which a duration taken at the
    // upstream's answer instead of the proxy's would show).
    assert!((2.0 * 0.965..6.0).contains(&p95), "slow p95 {p95}");

    // No label value carries a request path, a query or a client address; every label value
    // comes from a small known vocabulary.
    let upstreams: BTreeSet<String> = [
        api_blue.addr,
        api_green.addr,
        slow.addr,
        flaky.addr,
        dead,
        other.addr,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    for s in &samples {
        for (k, v) in &s.labels {
            assert!(
                !v.contains('/') && !v.contains("secret") && !v.contains("alice"),
                "label {k}={v:?} of {} carries a path or query",
                s.name
            );
            for c in &client_addrs {
                assert!(
                    !v.contains(&c.port().to_string()) || upstreams.contains(v),
                    "label {k}={v:?} of {} carries the client address {c}",
                    s.name
                );
            }
            let ok = match k.as_str() {
                "service" => ["api", "dead", "slow", "flaky"].contains(&v.as_str()),
                "color" => v == "blue" || v == "green",
                // "none": the 503s answered when a pool has no healthy upstream.
                "upstream" => upstreams.contains(v) || v == "none",
                "code" => v.len() == 3 && v.parse::<u16>().is_ok(),
                "kind" => ["connect", "timeout", "reset", "5xx"].contains(&v.as_str()),
                "le" => v == "+Inf" || v.parse::<f64>().is_ok(),
                "reason" | "result" | "task" => {
                    v.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                }
                // switchyard_tls_handshakes_total: the listener that took the handshake.
                "listener" => v == "proxy" || v == "admin",
                // switchyard_release_state: the release states of the contract.
                "state" => switchyard::RELEASE_STATES.contains(&v.as_str()),
                _ => false,
            };
            assert!(ok, "unexpected label {k}={v:?} on {}", s.name);
        }
    }
    for c in &client_addrs {
        assert!(
            !text.contains(&c.to_string()),
            "the exposition carries the client address {c}"
        );
    }
    assert!(
        !text.contains("very-secret"),
        "the exposition carries a request path"
    );

    promtool_check(&text);
    p.stop().await;
}

/// Status of one color of "api".
fn color<'a>(svc: &'a Value, c: &str) -> &'a Value {
    &svc["colors"][c]
}

fn upstream<'a>(svc: &'a Value, c: &str, addr: SocketAddr) -> &'a Value {
    color(svc, c)["upstreams"]
        .as_array()
        .and_then(|a| a.iter().find(|u| u["addr"] == addr.to_string()))
        .unwrap_or_else(|| panic!("upstream {addr} not in {svc}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_numbers_match_the_traffic() {
    let blue = TestUpstream::start("blue").await;
    blue.set_delay(50);
    let g1 = TestUpstream::start("g1").await;
    let g2 = TestUpstream::start("g2").await;
    g2.set_status(404);
    let p = TestProxy::start(&service("api", &[blue.addr], &[g1.addr, g2.addr], "")).await;

    // Blue: 40 requests, 10 of them answered 500, each at least 50 ms.
    let mut sent = 0;
    // The slowest answer as the client saw it: the proxy's own timing of each request lies
    // inside the client's, so its p95 can never be above this (bucket precision aside), however
    // loaded the machine is.
    let mut slowest = Duration::ZERO;
    for batch in 0..4 {
        if batch == 3 {
            blue.set_status(500);
        }
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let addr = p.proxy;
            tasks.push(tokio::spawn(async move {
                let start = tokio::time::Instant::now();
                let code = get(addr, "/x").await.0;
                (code, start.elapsed())
            }));
        }
        for t in tasks {
            let (code, took) = t.await.expect("task");
            slowest = slowest.max(took);
            assert_eq!(code, if batch == 3 { 500 } else { 200 });
            sent += 1;
        }
    }
    assert_eq!(sent, 40);
    assert_eq!(blue.hits(), 40);

    // Green: 20 requests over two upstreams, one of which answers 404 (not a failure).
    let (s, v) = p.flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    for _ in 0..20 {
        let (code, _) = p.get("/y").await;
        assert!(code == 200 || code == 404, "{code}");
    }
    assert_eq!(g1.hits() + g2.hits(), 20);
    assert!(
        g1.hits() > 0 && g2.hits() > 0,
        "both green upstreams get traffic"
    );

    let st = p.status().await;
    let window = st["window_secs"].as_u64().expect("window_secs is a number");
    assert!(window >= 60, "{st}");
    let svc = p.service_status("api").await;
    assert_eq!(svc["active"], "green", "{svc}");

    let b = color(&svc, "blue");
    assert_eq!(b["requests"], 40, "{svc}");
    assert_eq!(b["error_rate"].as_f64(), Some(0.25), "{svc}");
    let bu = upstream(&svc, "blue", blue.addr);
    assert_eq!(bu["requests"], 40, "{svc}");
    assert_eq!(bu["error_rate"].as_f64(), Some(0.25), "{svc}");
    for p95 in [b["p95_ms"].as_f64(), bu["p95_ms"].as_f64()] {
        let p95 = p95.expect("p95_ms is a number");
        // The bucket midpoint is within ~3.5% of the true value.
        assert!(p95 >= 50.0 * 0.965, "p95 {p95} ms below the 50 ms delay");
        let ceiling = slowest.as_secs_f64() * 1000.0 * 1.035;
        assert!(
            p95 <= ceiling,
            "p95 {p95} ms above the slowest answer the client saw ({ceiling:.1} ms with the bucket precision)"
        );
    }

    let g = color(&svc, "green");
    assert_eq!(g["requests"], 20, "{svc}");
    assert_eq!(g["error_rate"].as_f64(), Some(0.0), "{svc}");
    for up in [&g1, &g2] {
        let u = upstream(&svc, "green", up.addr);
        assert_eq!(u["requests"].as_u64(), Some(up.hits() as u64), "{svc}");
        assert_eq!(u["error_rate"].as_f64(), Some(0.0), "{svc}");
        assert!(u["p95_ms"].as_f64().is_some(), "{svc}");
    }

    // The windowed gauges agree with the status.
    let samples = parse(&metrics(p.admin).await);
    assert_eq!(
        value(
            &samples,
            "switchyard_window_error_ratio",
            &[("service", "api"), ("color", "blue")]
        ),
        Some(0.25)
    );
    assert_eq!(
        value(
            &samples,
            "switchyard_window_error_ratio",
            &[("service", "api"), ("color", "green")]
        ),
        Some(0.0)
    );
    let p95 = value(
        &samples,
        "switchyard_window_latency_p95_seconds",
        &[("service", "api"), ("color", "blue")],
    )
    .expect("p95 gauge");
    // The same bounds as the status's p95: a fixed ceiling above the delay is a timing
    // assertion that a loaded machine breaks; the slowest answer the client saw is not.
    let ceiling = slowest.as_secs_f64() * 1.035;
    assert!(
        (0.050 * 0.965..=ceiling).contains(&p95),
        "p95 gauge {p95} s outside 48.25 ms ..= {ceiling:.4} s (the slowest answer the client saw)"
    );
    p.stop().await;
}

/// A color flipped back to shows what it served since that flip, as its triggers read it: the
/// status and the `switchyard_window_*` gauges showed green failing 100% right after it went
/// live again, from an earlier live period's requests. The idle color keeps its whole window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_color_flipped_back_to_shows_only_what_it_served_since() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    green.set_status(500);
    let p = TestProxy::start(&service("api", &[blue.addr], &[green.addr], "")).await;
    assert_eq!(p.flip("api", "green").await.0, 200);
    for _ in 0..10 {
        assert_eq!(p.get("/x").await.0, 500);
    }
    assert_eq!(p.flip("api", "blue").await.0, 200);
    for _ in 0..5 {
        assert_eq!(p.get("/x").await.0, 200);
    }
    // The windows count whole seconds: the flip back comes in a later one than any request.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(p.flip("api", "green").await.0, 200);
    let svc = p.service_status("api").await;
    let g = color(&svc, "green");
    assert_eq!(g["requests"], 0, "{svc}");
    assert_eq!(g["error_rate"], Value::Null, "{svc}");
    assert_eq!(upstream(&svc, "green", green.addr)["requests"], 0, "{svc}");
    assert_eq!(color(&svc, "blue")["requests"], 5, "{svc}");
    let samples = parse(&metrics(p.admin).await);
    let gauge = |name, c| value(&samples, name, &[("service", "api"), ("color", c)]);
    assert_eq!(gauge("switchyard_window_requests", "green"), Some(0.0));
    assert_eq!(gauge("switchyard_window_error_ratio", "green"), Some(0.0));
    assert_eq!(gauge("switchyard_window_requests", "blue"), Some(5.0));
    // What it serves from now on is counted.
    for _ in 0..3 {
        assert_eq!(p.get("/x").await.0, 500);
    }
    let svc = p.service_status("api").await;
    assert_eq!(color(&svc, "green")["requests"], 3, "{svc}");
    assert_eq!(
        color(&svc, "green")["error_rate"].as_f64(),
        Some(1.0),
        "{svc}"
    );
    p.stop().await;
}

/// The statistics windows' dropped samples are exported per service and color: a gauge with
/// exactly those labels, 0 when requests come one at a time (nothing races a slot's clearing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_dropped_samples_are_exported() {
    let blue = TestUpstream::start("api-blue").await;
    let green = TestUpstream::start("api-green").await;
    let body = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n{}",
        service("api", &[blue.addr], &[green.addr], "")
    );
    let p = TestProxy::start(&body).await;
    for _ in 0..5 {
        assert_eq!(p.get("/x").await.0, 200);
    }
    let text = metrics(p.admin).await;
    assert!(
        text.contains("# TYPE switchyard_window_dropped_samples gauge\n"),
        "{text}"
    );
    let samples = parse(&text);
    for s in of(&samples, "switchyard_window_dropped_samples") {
        assert_eq!(keys(s), set(&["service", "color"]), "{s:?}");
    }
    for c in ["blue", "green"] {
        assert_eq!(
            value(
                &samples,
                "switchyard_window_dropped_samples",
                &[("service", "api"), ("color", c)]
            ),
            Some(0.0),
            "{text}"
        );
    }
    p.stop().await;
}
