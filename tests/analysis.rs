//! `prometheus` and `probe` triggers and `[[services.verify]]` checks, end to end: a real
//! Prometheus (the `prometheus` binary) scraping a small exporter the test controls every second,
//! real upstream servers whose deep health answer the test changes, faults made for real (kill -9,
//! a listener that never answers).

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// An exporter: serves whatever text exposition the test sets, on every scrape.
struct Exporter {
    addr: SocketAddr,
    text: Arc<Mutex<String>>,
}

impl Exporter {
    async fn start(text: &str) -> Exporter {
        let text = Arc::new(Mutex::new(text.to_string()));
        let t = text.clone();
        let addr = raw_upstream(move |_head| {
            let body = t.lock().expect("lock").clone();
            Raw::Answer(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes(),
            )
        })
        .await;
        Exporter { addr, text }
    }

    fn set(&self, text: &str) {
        *self.text.lock().expect("lock") = text.to_string();
    }
}

/// A real Prometheus scraping `target` every second; killed (SIGKILL) when dropped.
struct Prometheus {
    child: Option<tokio::process::Child>,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: app\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let child = tokio::process::Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start prometheus (is the `prometheus` binary installed?)");
        let p = Prometheus {
            child: Some(child),
            addr,
            _dir: dir,
        };
        let ready = eventually(60, || async {
            matches!(try_get(addr, "/-/ready").await, Some((200, _)))
        })
        .await;
        assert!(ready, "prometheus did not become ready on {addr}");
        // At least one successful scrape of the exporter.
        let scraped =
            eventually(60, || async { p.query("up").await.as_deref() == Some("1") }).await;
        assert!(scraped, "prometheus did not scrape the exporter {target}");
        p
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The value of a one-series instant query, as text.
    async fn query(&self, q: &str) -> Option<String> {
        let path = format!("/api/v1/query?query={}", enc(q));
        let (status, body) = try_get(self.addr, &path).await?;
        if status != 200 {
            return None;
        }
        let v: Value = serde_json::from_str(&body).ok()?;
        let r = v["data"]["result"].as_array()?;
        if r.len() != 1 {
            return None;
        }
        r[0]["value"][1].as_str().map(str::to_string)
    }

    /// Waits until Prometheus has scraped `q` at the value `want`.
    async fn wait_for(&self, q: &str, want: &str) {
        let ok = eventually(30, || async {
            self.query(q).await.as_deref() == Some(want)
        })
        .await;
        assert!(ok, "prometheus never saw {q} = {want}");
    }

    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(|c| c.id())
            .expect("prometheus runs")
    }

    async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
            let _ = c.wait().await;
        }
    }
}

fn signal_pid(pid: u32, signal: &str) {
    let ok = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -{signal} {pid} failed");
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An upstream with a deep health endpoint `/health/deps` whose JSON the test sets.
struct DeepUpstream {
    addr: SocketAddr,
    deps: Arc<Mutex<Value>>,
}

impl DeepUpstream {
    async fn start() -> DeepUpstream {
        let deps = Arc::new(Mutex::new(json!({"database": "ok", "payments": "ok"})));
        let d = deps.clone();
        let addr = raw_upstream(move |head| {
            let deps = d.lock().expect("lock").clone();
            let (status, body) = if head.starts_with("GET /health/deps ") {
                (200, deps.to_string())
            } else if head.starts_with("GET /health ") && deps["shallow"] == "down" {
                (503, "down\n".to_string())
            } else {
                (200, "ok\n".to_string())
            };
            Raw::Answer(
                format!(
                    "HTTP/1.1 {status} OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes(),
            )
        })
        .await;
        DeepUpstream { addr, deps }
    }

    fn set(&self, key: &str, value: &str) {
        self.deps.lock().expect("lock")[key] = json!(value);
    }
}

/// A listener that accepts connections and never answers (a hung Prometheus).
async fn silent_listener() -> SocketAddr {
    raw_upstream(|_head| Raw::Hold(Arc::new(std::sync::atomic::AtomicUsize::new(0)))).await
}

fn two_colors(
    name: &str,
    prefix: &str,
    blue: &[SocketAddr],
    green: &[SocketAddr],
    extra: &str,
) -> String {
    let list = |a: &[SocketAddr]| {
        a.iter()
            .map(|x| format!("\"{x}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "\n[[services]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nblue = {{ upstreams = [{}] }}\ngreen = {{ upstreams = [{}] }}\n{extra}\n",
        list(blue),
        list(green)
    )
}

fn trigger_of(svc: &Value, i: usize) -> Value {
    svc["triggers"][i].clone()
}

async fn auto_rollbacks(p: &TestProxy, service: &str) -> Vec<Value> {
    p.events()
        .await
        .into_iter()
        .filter(|e| e["service"] == service && e["reason"] == "auto_rollback")
        .collect()
}

/// Waits until the service's trigger `i` was evaluated (for the current live color) and
/// satisfies `f`.
async fn wait_trigger(p: &TestProxy, service: &str, i: usize, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let t = trigger_of(&p.service_status(service).await, i);
        if !t["evaluated_at"].is_null() && f(&t) {
            return t;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{service} trigger {i} never matched; last: {t:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn flip(p: &TestProxy, service: &str, to: &str, force: bool) -> (u16, Value) {
    admin_post(
        p.admin,
        &format!("/api/services/{service}/flip"),
        Some(TOKEN),
        Some(json!({ "to": to, "force": force })),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// Prometheus triggers
// ---------------------------------------------------------------------------------------------

/// A query crossing its threshold rolls back (within for + interval + scrape), and `{{color}}`
/// selects only the live color's series: the idle color's high value never fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_query_crossing_its_threshold_rolls_back() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    // `other`: another service's series, high all along; `{{service}}` leaves it out.
    let series = |b: u32, g: u32| {
        format!("app_db_errors{{service=\"api\",color=\"blue\"}} {b}\napp_db_errors{{service=\"api\",color=\"green\"}} {g}\napp_db_errors{{service=\"other\",color=\"green\"}} 7\n")
    };
    let exp = Exporter::start(&series(0, 0)).await;
    let prom = Prometheus::start(exp.addr).await;
    let body = format!(
        "[analysis]\nprometheus_url = \"{}\"\ntimeout = \"2s\"\n{}",
        prom.url(),
        two_colors(
            "api",
            "/",
            &[blue.addr],
            &[green.addr],
            r#"
[services.rollback]
watch_for = "10m"
[[services.rollback.triggers]]
kind = "prometheus"
query = 'max(app_db_errors{service="{{service}}",color="{{color}}"})'
above = 0.5
interval = "1s"
for = "2s"
"#
        )
    );
    let p = TestProxy::start(&body).await;
    assert_eq!(flip(&p, "api", "green", false).await.0, 200);
    let t = wait_trigger(&p, "api", 0, |t| {
        t["state"] == "ok" && t["value"] == json!(0.0)
    })
    .await;
    assert_eq!(t["kind"], "prometheus");
    assert_eq!(
        t["query"],
        r#"max(app_db_errors{service="{{service}}",color="{{color}}"})"#
    );
    assert_eq!(
        t["evaluated"],
        r#"max(app_db_errors{service="api",color="green"})"#
    );
    assert_eq!(t["error"], Value::Null);
    assert_eq!(t["threshold"], json!(0.5));

    // The idle color (blue) goes bad: the live color's query does not see it.
    exp.set(&series(9, 0));
    prom.wait_for("max(app_db_errors{service=\"api\",color=\"blue\"})", "9")
        .await;
    let seen = p.service_status("api").await["triggers"][0]["evaluated_at"].clone();
    wait_trigger(&p, "api", 0, |t| {
        t["evaluated_at"] != seen && t["state"] == "ok"
    })
    .await;
    let seen = p.service_status("api").await["triggers"][0]["evaluated_at"].clone();
    wait_trigger(&p, "api", 0, |t| {
        t["evaluated_at"] != seen && t["value"] == json!(0.0)
    })
    .await;
    assert!(auto_rollbacks(&p, "api").await.is_empty());
    assert_eq!(p.service_status("api").await["active"], "green");

    // The live color goes bad: rolled back to blue, the event names the trigger and the value.
    exp.set(&series(9, 3));
    let rolled = eventually(40, || async { !auto_rollbacks(&p, "api").await.is_empty() }).await;
    assert!(
        rolled,
        "no automatic rollback: {:#}",
        p.service_status("api").await
    );
    let ev = auto_rollbacks(&p, "api").await.remove(0);
    assert_eq!(ev["from"], "green");
    assert_eq!(ev["to"], "blue");
    assert_eq!(ev["trigger"]["kind"], "prometheus");
    assert_eq!(ev["trigger"]["threshold"], json!(0.5));
    assert_eq!(ev["trigger"]["value"], json!(3.0));
    assert_eq!(
        ev["trigger"]["query"],
        r#"max(app_db_errors{service="api",color="green"})"#
    );
    let detail = ev["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("prometheus 3 > 0.5"), "{detail}");
    assert_eq!(p.service_status("api").await["active"], "blue");
    // One flip per episode: still exactly one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(auto_rollbacks(&p, "api").await.len(), 1);
    p.stop().await;
}

/// `{{upstreams}}` selects the flip target's (and then the live color's) instances; a verify
/// check refuses a flip with the failing value (409) unless forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_placeholder_and_verify_gate() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    // (`app_addr`: how the placeholder's bracketed regex reads in Prometheus, IPv6 included.)
    let util = |b: &str, g: &str| {
        format!(
            "app_pool_utilization{{upstream=\"{}\"}} {b}\napp_pool_utilization{{upstream=\"{}\"}} {g}\napp_addr{{addr=\"[::1]:3002\"}} 1\napp_addr{{addr=\"10.0.0.1:80\"}} 1\napp_addr{{addr=\"10x0x0x1:80\"}} 1\napp_addr{{addr=\"::1:3002\"}} 1\n",
            blue.addr, green.addr
        )
    };
    let exp = Exporter::start(&util("0.95", "0.95")).await;
    let prom = Prometheus::start(exp.addr).await;
    // The regex `{{upstreams}}` gives for ["[::1]:3002", "10.0.0.1:80"] (the unit test
    // `upstreams_become_a_regex_without_backslashes` pins it) matches exactly those two.
    prom.wait_for(
        r#"count(app_addr{addr=~"[[]::1[]]:3002|10[.]0[.]0[.]1:80"})"#,
        "2",
    )
    .await;
    let exact = prom
        .query(r#"count(app_addr{addr=~"[[]::1[]]:3002"})"#)
        .await;
    assert_eq!(exact.as_deref(), Some("1"));
    let body = format!(
        "[analysis]\nprometheus_url = \"{}\"\n{}",
        prom.url(),
        two_colors(
            "api",
            "/",
            &[blue.addr],
            &[green.addr],
            r#"
[[services.verify]]
kind = "prometheus"
query = 'max(app_pool_utilization{upstream=~"{{upstreams}}"})'
above = 0.9
[services.rollback]
[[services.rollback.triggers]]
kind = "prometheus"
query = 'max(app_pool_utilization{upstream=~"{{upstreams}}"})'
above = 0.9
interval = "1s"
for = "1s"
"#
        )
    );
    let p = TestProxy::start(&body).await;
    let (status, v) = flip(&p, "api", "green", false).await;
    assert_eq!(status, 409, "{v}");
    let err = v["error"].as_str().unwrap_or_default();
    assert!(err.contains("verify[0]"), "{err}");
    assert!(err.contains("value 0.95 > 0.9"), "{err}");
    assert!(
        err.contains(&format!(
            "upstream=~\"{}\"",
            green.addr.to_string().replace('.', "[.]")
        )),
        "{err}"
    );
    assert_eq!(p.service_status("api").await["active"], "blue");

    // Only green's instance matters to the check: blue stays at 0.95.
    exp.set(&util("0.95", "0.5"));
    prom.wait_for(
        &format!("app_pool_utilization{{upstream=\"{}\"}}", green.addr),
        "0.5",
    )
    .await;
    let (status, v) = flip(&p, "api", "green", false).await;
    assert_eq!(status, 200, "{v}");
    let t = wait_trigger(&p, "api", 0, |t| t["state"] == "ok").await;
    assert_eq!(t["value"], json!(0.5));

    // Green saturates: rolled back.
    exp.set(&util("0.95", "0.97"));
    let rolled = eventually(40, || async { !auto_rollbacks(&p, "api").await.is_empty() }).await;
    assert!(rolled, "no rollback: {:#}", p.service_status("api").await);
    assert_eq!(p.service_status("api").await["active"], "blue");

    // A forced flip skips the verify checks.
    let (status, v) = flip(&p, "api", "green", true).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(p.service_status("api").await["active"], "green");
    p.stop().await;
}

/// An empty result is `insufficient_data` and never fires; with `on_empty = "fail"` it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_result_is_insufficient_data() {
    let ups: Vec<_> = futures_ups(4).await;
    let exp = Exporter::start("app_db_errors{color=\"blue\"} 0\n").await;
    let prom = Prometheus::start(exp.addr).await;
    let trig = |on_empty: &str| {
        format!(
            r#"
[services.rollback]
[[services.rollback.triggers]]
kind = "prometheus"
query = 'max(app_db_errors{{color="{{{{color}}}}"}})'
above = 0.5
interval = "500ms"
for = "0s"
on_empty = "{on_empty}"
"#
        )
    };
    let body = format!(
        "[analysis]\nprometheus_url = \"{}\"\n{}{}",
        prom.url(),
        two_colors(
            "a",
            "/a",
            &[ups[0].addr],
            &[ups[1].addr],
            &trig("insufficient_data")
        ),
        two_colors("b", "/b", &[ups[2].addr], &[ups[3].addr], &trig("fail")),
    );
    let p = TestProxy::start(&body).await;
    assert_eq!(flip(&p, "a", "green", false).await.0, 200);
    assert_eq!(flip(&p, "b", "green", false).await.0, 200);
    let rolled = eventually(40, || async { !auto_rollbacks(&p, "b").await.is_empty() }).await;
    assert!(
        rolled,
        "on_empty = fail did not fire: {:#}",
        p.service_status("b").await
    );
    let ev = auto_rollbacks(&p, "b").await.remove(0);
    assert!(
        ev["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("empty result"),
        "{ev}"
    );
    // Service a saw the same empty result all along.
    let t = wait_trigger(&p, "a", 0, |t| t["state"] == "insufficient_data").await;
    assert_eq!(t["value"], Value::Null);
    assert_eq!(t["error"], Value::Null);
    assert!(
        t["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("no series"),
        "{t}"
    );
    assert!(auto_rollbacks(&p, "a").await.is_empty());
    assert_eq!(p.service_status("a").await["active"], "green");
    p.stop().await;
}

async fn futures_ups(n: usize) -> Vec<Arc<TestUpstream>> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(TestUpstream::start(&format!("u{i}")).await);
    }
    v
}

/// Two services on one Prometheus, `on_error = "hold"` and `"fail"`: once Prometheus fails
/// (`fault`), both are inconclusive with the error; after max_errors the hold one is blind (status
/// and metric) and never fires, the fail one rolls back.
async fn on_error_policies(
    prometheus_url: &str,
    timeout: &str,
    values_first: bool,
    fault: impl std::future::Future<Output = ()>,
    error_has: &str,
    recover: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
) {
    let ups = futures_ups(4).await;
    let trig = |on_error: &str| {
        format!(
            r#"
[services.rollback]
[[services.rollback.triggers]]
kind = "prometheus"
query = 'max(app_db_errors{{color="{{{{color}}}}"}})'
above = 0.5
interval = "500ms"
for = "0s"
on_error = "{on_error}"
max_errors = 2
"#
        )
    };
    let body = format!(
        "[analysis]\nprometheus_url = \"{prometheus_url}\"\ntimeout = \"{timeout}\"\n{}{}",
        two_colors("hold", "/h", &[ups[0].addr], &[ups[1].addr], &trig("hold")),
        two_colors("fail", "/f", &[ups[2].addr], &[ups[3].addr], &trig("fail")),
    );
    let p = TestProxy::start(&body).await;
    assert_eq!(flip(&p, "hold", "green", false).await.0, 200);
    assert_eq!(flip(&p, "fail", "green", false).await.0, 200);
    if values_first {
        for svc in ["hold", "fail"] {
            wait_trigger(&p, svc, 0, |t| t["state"] == "ok").await;
        }
    }
    fault.await;
    // (A query in flight when Prometheus dies fails otherwise; the next ones say this.)
    wait_trigger(&p, "hold", 0, |t| {
        t["state"] == "inconclusive" && t["error"].as_str().is_some_and(|e| e.contains(error_has))
    })
    .await;
    let rolled = eventually(40, || async {
        !auto_rollbacks(&p, "fail").await.is_empty()
    })
    .await;
    assert!(
        rolled,
        "on_error = fail did not fire: {:#}",
        p.service_status("fail").await
    );
    // The event says why: the errors in a row, the policy, the query and the last error.
    let ev = auto_rollbacks(&p, "fail").await.remove(0);
    let detail = ev["detail"].as_str().unwrap_or_default();
    for want in [
        "consecutive errors",
        "on_error = \"fail\"",
        "query max(app_db_errors",
        "last error: ",
    ] {
        assert!(detail.contains(want), "missing {want:?} in {detail}");
    }
    assert!(ev["trigger"]["error"].is_string(), "{ev}");
    let t = wait_trigger(&p, "hold", 0, |t| t["blind"] == json!(true)).await;
    assert_eq!(t["state"], "inconclusive");
    assert!(t["consecutive_errors"].as_u64().unwrap_or(0) >= 2, "{t}");
    let (_, metrics) = admin_get(p.admin, "/metrics").await;
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    assert!(
        metrics.contains(
            "switchyard_analysis_blind{kind=\"prometheus\",service=\"hold\",trigger=\"0\"} 1"
        ),
        "{metrics}"
    );
    // The fail one's errors count as a breach: it is not blind (it was shown so, and the
    // shipped SwitchyardAnalysisBlind alert paged for it).
    assert!(
        metrics.contains(
            "switchyard_analysis_blind{kind=\"prometheus\",service=\"fail\",trigger=\"0\"} 0"
        ),
        "{metrics}"
    );
    assert_eq!(
        p.service_status("fail").await["triggers"][0]["blind"],
        json!(false)
    );
    assert!(auto_rollbacks(&p, "hold").await.is_empty());
    assert_eq!(p.service_status("hold").await["active"], "green");
    assert_eq!(p.service_status("fail").await["active"], "blue");
    if let Some(recover) = recover {
        // Prometheus answers again: the held trigger reads values, is no longer blind.
        recover.await;
        let t = wait_trigger(&p, "hold", 0, |t| {
            t["state"] == "ok" && t["blind"] == json!(false)
        })
        .await;
        assert_eq!(t["error"], Value::Null, "{t}");
        assert_eq!(t["consecutive_errors"], json!(0), "{t}");
        let (_, metrics) = admin_get(p.admin, "/metrics").await;
        let metrics = metrics.as_str().unwrap_or_default().to_string();
        assert!(
            metrics.contains(
                "switchyard_analysis_blind{kind=\"prometheus\",service=\"hold\",trigger=\"0\"} 0"
            ),
            "{metrics}"
        );
        assert!(auto_rollbacks(&p, "hold").await.is_empty());
    }
    p.stop().await;
}

/// Prometheus killed (-9) after the triggers read values: inconclusive, then on_error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_down_is_inconclusive_then_on_error() {
    let exp =
        Exporter::start("app_db_errors{color=\"blue\"} 0\napp_db_errors{color=\"green\"} 0\n")
            .await;
    let mut prom = Prometheus::start(exp.addr).await;
    let url = prom.url();
    let kill = async move { prom.kill().await };
    on_error_policies(&url, "2s", true, kill, "cannot connect", None).await;
}

/// A Prometheus that accepts connections and never answers: timeouts, then on_error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_slow_is_inconclusive_then_on_error() {
    let hung = silent_listener().await;
    on_error_policies(
        &format!("http://{hung}"),
        "300ms",
        false,
        async {},
        "timed out after 300ms",
        None,
    )
    .await;
}

/// A real Prometheus stopped (SIGSTOP): its queries time out, inconclusive, then on_error;
/// resumed (SIGCONT), the held trigger reads values again and is no longer blind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_stopped_is_inconclusive_then_on_error_and_recovers() {
    let exp =
        Exporter::start("app_db_errors{color=\"blue\"} 0\napp_db_errors{color=\"green\"} 0\n")
            .await;
    let prom = Prometheus::start(exp.addr).await;
    let pid = prom.pid();
    on_error_policies(
        &prom.url(),
        "500ms",
        true,
        async move { signal_pid(pid, "STOP") },
        "timed out after 500ms",
        Some(Box::pin(async move { signal_pid(pid, "CONT") })),
    )
    .await;
    drop(prom);
}

/// A result that is neither a scalar nor one series is a configuration error shown in the
/// trigger state with the query (status, `ctl status`, the state metric); NaN is no data; +Inf
/// is a value past any `above`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_shapes_nan_and_inf() {
    let ups = futures_ups(8).await;
    let exp =
        Exporter::start("app_db_errors{color=\"blue\"} 0\napp_db_errors{color=\"green\"} 1\n")
            .await;
    let prom = Prometheus::start(exp.addr).await;
    let trig = |query: &str| {
        format!(
            "[services.rollback]\n[[services.rollback.triggers]]\nkind = \"prometheus\"\nquery = '{query}'\nabove = 0.5\ninterval = \"300ms\"\nfor = \"0s\"\nmax_errors = 2\n"
        )
    };
    let body = format!(
        "[analysis]\nprometheus_url = \"{}\"\n{}{}{}{}",
        prom.url(),
        two_colors(
            "multi",
            "/m",
            &[ups[0].addr],
            &[ups[1].addr],
            &trig("app_db_errors")
        ),
        two_colors(
            "matrix",
            "/r",
            &[ups[2].addr],
            &[ups[3].addr],
            &trig(r#"app_db_errors{color="{{color}}"}[1m]"#)
        ),
        two_colors(
            "nan",
            "/n",
            &[ups[4].addr],
            &[ups[5].addr],
            &trig(r#"max(app_db_errors{color="{{color}}"}) * 0 / 0"#)
        ),
        two_colors(
            "inf",
            "/i",
            &[ups[6].addr],
            &[ups[7].addr],
            &trig(r#"max(app_db_errors{color="{{color}}"}) / 0"#)
        ),
    );
    let p = TestProxy::start(&body).await;
    for svc in ["multi", "matrix", "nan", "inf"] {
        assert_eq!(flip(&p, svc, "green", false).await.0, 200, "{svc}");
    }

    // (Waiting for the configuration error itself: a query that times out on a loaded machine
    // is inconclusive too, for another reason.)
    let t = wait_trigger(&p, "multi", 0, |t| {
        t["blind"] == json!(true) && t["config_error"] == json!(true)
    })
    .await;
    assert_eq!(t["state"], "inconclusive", "{t}");
    assert_eq!(t["config_error"], json!(true), "{t}");
    assert_eq!(t["query"], "app_db_errors", "{t}");
    assert_eq!(t["evaluated"], "app_db_errors", "{t}");
    assert_eq!(t["value"], Value::Null, "{t}");
    let err = t["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("configuration error") && err.contains("2 series"),
        "{t}"
    );
    let t = wait_trigger(&p, "matrix", 0, |t| {
        t["state"] == "inconclusive" && t["config_error"] == json!(true)
    })
    .await;
    assert_eq!(t["config_error"], json!(true), "{t}");
    assert_eq!(t["evaluated"], r#"app_db_errors{color="green"}[1m]"#, "{t}");
    assert!(
        t["error"].as_str().unwrap_or_default().contains("matrix"),
        "{t}"
    );
    let t = wait_trigger(&p, "nan", 0, |t| t["state"] == "insufficient_data").await;
    assert!(
        t["detail"].as_str().unwrap_or_default().contains("NaN"),
        "{t}"
    );
    assert_eq!(t["error"], Value::Null, "{t}");

    let rolled = eventually(40, || async { !auto_rollbacks(&p, "inf").await.is_empty() }).await;
    assert!(
        rolled,
        "+Inf did not fire: {:#}",
        p.service_status("inf").await
    );
    let ev = auto_rollbacks(&p, "inf").await.remove(0);
    assert_eq!(ev["trigger"]["value_text"], "+Inf", "{ev}");
    let detail = ev["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("prometheus +Inf > 0.5"), "{detail}");

    // The state metric and `ctl status` show the same.
    let (_, metrics) = admin_get(p.admin, "/metrics").await;
    let metrics = metrics.as_str().unwrap_or_default().to_string();
    for want in [
        r#"switchyard_analysis_state{kind="prometheus",service="multi",state="inconclusive",trigger="0"} 1"#,
        r#"switchyard_analysis_state{kind="prometheus",service="multi",state="ok",trigger="0"} 0"#,
        r#"switchyard_analysis_state{kind="prometheus",service="nan",state="insufficient_data",trigger="0"} 1"#,
        r#"switchyard_analysis_state{kind="prometheus",service="inf",state="fired",trigger="0"} 1"#,
        r#"switchyard_analysis_blind{kind="prometheus",service="multi",trigger="0"} 1"#,
    ] {
        assert!(metrics.contains(want), "missing {want} in:\n{metrics}");
    }
    let text = ctl_read(&p, &["status"]).await;
    let multi = text
        .split("\nmulti ")
        .nth(1)
        .and_then(|s| s.split("\nmatrix ").next())
        .unwrap_or_default();
    for want in [
        "trigger prometheus   inconclusive",
        "query app_db_errors  [evaluated 20",
        "BLIND after",
        "error: configuration error: the query returned 2 series",
    ] {
        assert!(multi.contains(want), "missing {want:?} in:\n{text}");
    }
    assert!(
        text.contains("trigger prometheus   insufficient_data"),
        "{text}"
    );
    p.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Probes
// ---------------------------------------------------------------------------------------------

/// A per-path answer server: GET `path` answers the status and JSON the test set for it.
struct Answers {
    addr: SocketAddr,
    table: Arc<Mutex<std::collections::HashMap<String, (u16, String)>>>,
}

impl Answers {
    async fn start() -> Answers {
        let table: Arc<Mutex<std::collections::HashMap<String, (u16, String)>>> = Arc::default();
        let t = table.clone();
        let addr = raw_upstream(move |head| {
            let path = head.split(' ').nth(1).unwrap_or("").to_string();
            let (status, body) = t
                .lock()
                .expect("lock")
                .get(&path)
                .cloned()
                .unwrap_or((404, "{}".to_string()));
            Raw::Answer(
                format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                )
                .into_bytes(),
            )
        })
        .await;
        Answers { addr, table }
    }

    fn set(&self, path: &str, status: u16, body: Value) {
        self.table
            .lock()
            .expect("lock")
            .insert(path.to_string(), (status, body.to_string()));
    }
}

/// A probe of one fixed `url` (templated with `{{color}}`) and a numeric `above` on a JSON
/// value; a status-only verify check by `url` refuses a flip while the target answers 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_by_url_with_a_numeric_bound() {
    let srv = Answers::start().await;
    srv.set("/ready/green", 503, json!({"ready": false}));
    srv.set("/deps/blue", 200, json!({"pool": 0.95}));
    srv.set("/deps/green", 200, json!({"pool": 0.5}));
    let ups = futures_ups(2).await;
    let extra = r#"
[[services.verify]]
kind = "probe"
url = "http://SRV/ready/{{color}}"
[services.rollback]
[[services.rollback.triggers]]
kind = "probe"
url = "http://SRV/deps/{{color}}"
json_pointer = "/pool"
above = 0.9
interval = "300ms"
for = "0s"
"#
    .replace("SRV", &srv.addr.to_string());
    let p = TestProxy::start(&two_colors(
        "api",
        "/",
        &[ups[0].addr],
        &[ups[1].addr],
        &extra,
    ))
    .await;
    let (status, v) = flip(&p, "api", "green", false).await;
    assert_eq!(status, 409, "{v}");
    let err = v["error"].as_str().unwrap_or_default();
    assert!(err.contains("verify[0] (probe)"), "{err}");
    assert!(err.contains("answered 503"), "{err}");
    assert!(
        err.contains(&format!("http://{}/ready/green", srv.addr)),
        "{err}"
    );
    assert_eq!(p.service_status("api").await["active"], "blue");
    srv.set("/ready/green", 200, json!({"ready": true}));
    let (status, v) = flip(&p, "api", "green", false).await;
    assert_eq!(status, 200, "{v}");

    // Green's pool at 0.5 passes (blue's 0.95 is not looked at).
    let t = wait_trigger(&p, "api", 0, |t| t["state"] == "ok").await;
    assert_eq!(t["value"], json!(0.0), "{t}");
    assert_eq!(
        t["evaluated"],
        json!(format!("http://{}/deps/green", srv.addr)),
        "{t}"
    );
    assert_eq!(
        t["probe"],
        json!(format!(
            "GET http://{}/deps/{{{{color}}}}: /pool not > 0.9",
            srv.addr
        )),
        "{t}"
    );
    srv.set("/deps/green", 200, json!({"pool": 0.97}));
    let rolled = eventually(40, || async { !auto_rollbacks(&p, "api").await.is_empty() }).await;
    assert!(rolled, "no rollback: {:#}", p.service_status("api").await);
    let ev = auto_rollbacks(&p, "api").await.remove(0);
    let detail = ev["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("/pool = 0.97 > 0.9"), "{detail}");
    assert_eq!(p.service_status("api").await["active"], "blue");
    p.stop().await;
}

/// A probe fires when more than `above_fraction` of the live upstreams fail it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_fires_past_above_fraction() {
    let blue = DeepUpstream::start().await;
    let g1 = DeepUpstream::start().await;
    let g2 = DeepUpstream::start().await;
    let body = two_colors(
        "api",
        "/",
        &[blue.addr],
        &[g1.addr, g2.addr],
        r#"
[services.rollback]
[[services.rollback.triggers]]
kind = "probe"
path = "/health/deps"
json_pointer = "/payments"
equals = "ok"
above_fraction = 0.5
interval = "300ms"
for = "1s"
"#,
    );
    let p = TestProxy::start(&body).await;
    assert_eq!(flip(&p, "api", "green", false).await.0, 200);
    let t = wait_trigger(&p, "api", 0, |t| {
        t["state"] == "ok" && t["value"] == json!(0.0)
    })
    .await;
    assert_eq!(t["kind"], "probe");
    assert_eq!(t["probe"], "GET /health/deps: /payments == \"ok\"");

    // Half the live pool fails: not more than 0.5.
    g1.set("payments", "down");
    let t = wait_trigger(&p, "api", 0, |t| t["value"] == json!(0.5)).await;
    assert_eq!(t["state"], "ok");
    assert!(
        t["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("/payments = \"down\""),
        "{t}"
    );
    // The idle color's health does not matter.
    blue.set("payments", "down");
    let seen = p.service_status("api").await["triggers"][0]["evaluated_at"].clone();
    let t = wait_trigger(&p, "api", 0, |t| t["evaluated_at"] != seen).await;
    assert_eq!(t["value"], json!(0.5), "{t}");

    g2.set("payments", "down");
    let rolled = eventually(40, || async { !auto_rollbacks(&p, "api").await.is_empty() }).await;
    assert!(rolled, "no rollback: {:#}", p.service_status("api").await);
    let ev = auto_rollbacks(&p, "api").await.remove(0);
    assert_eq!(ev["trigger"]["kind"], "probe");
    assert_eq!(ev["trigger"]["value"], json!(1.0));
    assert!(
        ev["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("2 of 2 failing"),
        "{ev}"
    );
    assert_eq!(p.service_status("api").await["active"], "blue");
    p.stop().await;
}

/// A probe GETs every upstream of the live color, those health checks took out too (as the
/// contract says): an upstream whose deep health fails and whose shallow `/health` then fails
/// is still counted failing, and a live color all marked down and not answering reads as
/// failing, not as a blind probe. (Only healthy upstreams were probed: the failure vanished
/// from the count once health checks caught it, and a whole color down left the trigger
/// inconclusive with nothing rolled back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_counts_upstreams_health_checks_took_out() {
    let blue = DeepUpstream::start().await;
    let g1 = DeepUpstream::start().await;
    let g2 = DeepUpstream::start().await;
    let dead = dead_addr().await;
    let trigger = |fraction: &str| {
        format!(
            r#"
[services.health]
path = "/health"
interval = "100ms"
timeout = "1s"
unhealthy_after = 1
healthy_after = 1
[services.rollback]
[[services.rollback.triggers]]
kind = "probe"
path = "/health/deps"
json_pointer = "/database"
equals = "ok"
above_fraction = {fraction}
interval = "200ms"
for = "1s"
"#
        )
    };
    let p = TestProxy::start(&two_colors(
        "api",
        "/",
        &[blue.addr],
        &[g1.addr, g2.addr],
        &trigger("0.6"),
    ))
    .await;
    assert_eq!(flip(&p, "api", "green", false).await.0, 200);
    wait_trigger(&p, "api", 0, |t| t["value"] == json!(0.0)).await;
    // g1's database goes, and its shallow health with it: taken out of the pool, still probed.
    g1.set("database", "down");
    g1.set("shallow", "down");
    let out = eventually(20, || async {
        let svc = p.service_status("api").await;
        svc["colors"]["green"]["upstreams"]
            .as_array()
            .is_some_and(|u| u.iter().any(|u| u["healthy"] == json!(false)))
    })
    .await;
    assert!(out, "{:#}", p.service_status("api").await);
    let seen = p.service_status("api").await["triggers"][0]["evaluated_at"].clone();
    let t = wait_trigger(&p, "api", 0, |t| t["evaluated_at"] != seen).await;
    assert_eq!(t["value"], json!(0.5), "{t:#}");
    assert!(
        t["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("1 of 2 failing"),
        "{t:#}"
    );
    // g2 too: the whole live color fails, and it rolls back.
    g2.set("database", "down");
    g2.set("shallow", "down");
    let rolled = eventually(40, || async { !auto_rollbacks(&p, "api").await.is_empty() }).await;
    assert!(rolled, "no rollback: {:#}", p.service_status("api").await);
    let ev = auto_rollbacks(&p, "api").await.remove(0);
    assert!(
        ev["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("2 of 2 failing"),
        "{ev}"
    );
    assert_eq!(p.service_status("api").await["active"], "blue");
    p.stop().await;

    // A live color whose only upstream is dead, and marked so by health checks: failing (it
    // was inconclusive, `blind`, and rolled nothing back).
    let p = TestProxy::start(&two_colors(
        "api",
        "/",
        &[blue.addr],
        &[dead],
        &trigger("0"),
    ))
    .await;
    let down = eventually(20, || async {
        p.service_status("api").await["colors"]["green"]["upstreams"][0]["healthy"] == json!(false)
    })
    .await;
    assert!(down, "{:#}", p.service_status("api").await);
    assert_eq!(flip(&p, "api", "green", true).await.0, 200);
    let rolled = eventually(40, || async { !auto_rollbacks(&p, "api").await.is_empty() }).await;
    assert!(rolled, "no rollback: {:#}", p.service_status("api").await);
    let ev = auto_rollbacks(&p, "api").await.remove(0);
    let detail = ev["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("marked unhealthy"), "{ev}");
    p.stop().await;

    // One upstream of two down (a pod restarting) and marked so: not counted while the other
    // answers. A verify check does not refuse a flip to that color for it.
    let g = DeepUpstream::start().await;
    let p = TestProxy::start(&two_colors(
        "api",
        "/",
        &[blue.addr],
        &[g.addr, dead],
        "[services.health]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"1s\"\nunhealthy_after = 1\nhealthy_after = 1\n\
         [[services.verify]]\nkind = \"probe\"\npath = \"/health/deps\"\njson_pointer = \"/database\"\nequals = \"ok\"\n",
    ))
    .await;
    let down = eventually(20, || async {
        p.service_status("api").await["colors"]["green"]["upstreams"][1]["healthy"] == json!(false)
    })
    .await;
    assert!(down, "{:#}", p.service_status("api").await);
    let (s, v) = flip(&p, "api", "green", false).await;
    assert_eq!(s, 200, "{v}");
    p.stop().await;
}

/// A probe verify check refuses the flip (409, the failing upstream and value) unless forced;
/// a probe trigger's dead upstreams are inconclusive, not failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_verify_gate_and_probe_errors() {
    let blue = DeepUpstream::start().await;
    let green = DeepUpstream::start().await;
    green.set("payments", "down");
    let body = two_colors(
        "api",
        "/",
        &[blue.addr],
        &[green.addr],
        r#"
[[services.verify]]
kind = "probe"
path = "/health/deps"
json_pointer = "/payments"
equals = "ok"
"#,
    );
    let p = TestProxy::start(&body).await;
    let (status, v) = flip(&p, "api", "green", false).await;
    assert_eq!(status, 409, "{v}");
    let err = v["error"].as_str().unwrap_or_default();
    assert!(err.contains("verify[0] (probe)"), "{err}");
    assert!(err.contains("/payments = \"down\" (want \"ok\")"), "{err}");
    assert!(err.contains(&green.addr.to_string()), "{err}");
    let (status, v) = flip(&p, "api", "green", true).await;
    assert_eq!(status, 200, "{v}");
    // Back to blue (verify on blue passes), then green heals and passes too.
    assert_eq!(flip(&p, "api", "blue", false).await.0, 200);
    green.set("payments", "ok");
    let (status, v) = flip(&p, "api", "green", false).await;
    assert_eq!(status, 200, "{v}");
    p.stop().await;

    // A probe whose upstream refuses connections: inconclusive, with the error.
    let dead = dead_addr().await;
    let blue = DeepUpstream::start().await;
    let body = two_colors(
        "api",
        "/",
        &[blue.addr],
        &[dead],
        r#"
[services.rollback]
[[services.rollback.triggers]]
kind = "probe"
path = "/health/deps"
interval = "200ms"
max_errors = 2
"#,
    );
    let p = TestProxy::start(&body).await;
    assert_eq!(flip(&p, "api", "green", true).await.0, 200);
    let t = wait_trigger(&p, "api", 0, |t| t["blind"] == json!(true)).await;
    assert_eq!(t["state"], "inconclusive");
    assert!(
        t["error"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot connect"),
        "{t}"
    );
    assert!(auto_rollbacks(&p, "api").await.is_empty());
    p.stop().await;
}

/// A manual rollback is the way back when the analysis itself is down: a verify check with an
/// error (or no data) does not refuse it, while it still refuses a manual flip; a check that
/// reads a failing value on the previous color still refuses the rollback (it used to refuse
/// the rollback on any error: an operator's emergency rollback blocked by a Prometheus outage).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verify_check_that_errors_does_not_refuse_a_manual_rollback() {
    let rollback = |p: &TestProxy| {
        let admin = p.admin;
        async move { admin_post(admin, "/api/services/api/rollback", Some(TOKEN), None).await }
    };
    // A check that cannot be evaluated: its URL refuses connections.
    let dead = dead_addr().await;
    let blue = DeepUpstream::start().await;
    let green = DeepUpstream::start().await;
    let body = two_colors(
        "api",
        "/",
        &[blue.addr],
        &[green.addr],
        &format!("\n[[services.verify]]\nkind = \"probe\"\nurl = \"http://{dead}/check\"\n"),
    );
    let p = TestProxy::start(&body).await;
    assert_eq!(flip(&p, "api", "green", true).await.0, 200);
    let (status, v) = flip(&p, "api", "blue", false).await;
    assert_eq!(status, 409, "a manual flip is still refused: {v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("verify[0] (probe)"),
        "{v}"
    );
    let (status, v) = rollback(&p).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(p.get("/").await.0, 200);
    p.stop().await;

    // A check that reads a failing value on the previous color refuses the rollback.
    let blue = DeepUpstream::start().await;
    let green = DeepUpstream::start().await;
    let body = two_colors(
        "api",
        "/",
        &[blue.addr],
        &[green.addr],
        "\n[[services.verify]]\nkind = \"probe\"\npath = \"/health/deps\"\njson_pointer = \"/payments\"\nequals = \"ok\"\n",
    );
    let p = TestProxy::start(&body).await;
    assert_eq!(flip(&p, "api", "green", false).await.0, 200);
    blue.set("payments", "down");
    let (status, v) = rollback(&p).await;
    assert_eq!(status, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("/payments = \"down\""),
        "{v}"
    );
    p.stop().await;
}

/// A release phase runs the verify checks of its services before its flip: the second phase's
/// target fails one, and the whole release (the first phase's flip too) is rolled back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_phase_runs_the_verify_checks() {
    let panel = futures_ups(2).await;
    let blue = DeepUpstream::start().await;
    let green = DeepUpstream::start().await;
    green.set("payments", "down");
    let body = two_colors("panel", "/panel", &[panel[0].addr], &[panel[1].addr], "")
        + &two_colors(
            "api",
            "/",
            &[blue.addr],
            &[green.addr],
            r#"
[[services.verify]]
kind = "probe"
path = "/health/deps"
json_pointer = "/payments"
equals = "ok"
"#,
        );
    let p = TestProxy::start(&body).await;
    let (s, v) = admin_post(
        p.admin,
        "/api/releases",
        Some(TOKEN),
        Some(json!({
            "name": "verify in a phase",
            "validate": "1s",
            "phases": [
                { "name": "frontend", "services": ["panel"], "bake": "1s" },
                { "name": "backend", "services": ["api"], "bake": "1s" },
            ]
        })),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let ended = eventually(40, || async {
        admin_get(p.admin, "/api/releases").await.1["current"].is_null()
    })
    .await;
    let all = admin_get(p.admin, "/api/releases").await.1;
    assert!(ended, "the release did not end: {all}");
    let end = &all["recent"][0];
    assert_eq!(end["state"], "rolled_back", "{end}");
    let reason = end["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("verify[0] (probe)"), "{reason}");
    assert!(reason.contains("/payments = \"down\""), "{reason}");
    assert_eq!(end["phases"][0]["state"], "rolled_back", "{end}");
    assert_eq!(p.service_status("panel").await["active"], "blue");
    assert_eq!(p.service_status("api").await["active"], "blue");
    p.stop().await;
}

// ---------------------------------------------------------------------------------------------
// switchyard check
// ---------------------------------------------------------------------------------------------

#[test]
fn check_names_every_analysis_error_with_its_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[analysis]
prometheus_url = "http://127.0.0.1:9091"
[[services]]
name = "api"
blue = { upstreams = ["127.0.0.1:3001"] }
green = { upstreams = ["127.0.0.1:3011"] }
[[services.verify]]
kind = "probe"
json_pointer = "/payments"
equals = "ok"
[services.rollback]
[[services.rollback.triggers]]
kind = "prometheus"
query = 'sum(rate(x{colour="{{colour}}"}[1m]))'
above = 0.5
[[services.rollback.triggers]]
kind = "probe"
for = "30"
"#,
    )
    .expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run switchyard check");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for want in [
        "services[0].rollback.triggers[0].query: unknown placeholder {{colour}}",
        "services[0].rollback.triggers[1].path: required",
        "services[0].rollback.triggers[1].for: invalid duration \"30\"",
        "services[0].verify[0].path: required",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// The demo
// ---------------------------------------------------------------------------------------------

/// The demo's printed command breaks green's payments dependency; its probe trigger rolls back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_probe_trigger_fires_from_the_printed_command() {
    use tokio::io::AsyncBufReadExt;
    let port = |_| format!("127.0.0.1:{}", free_port());
    // A port `free_port` found free can be taken by another test before the demo binds it (the
    // demo then exits at startup): a fresh set of ports, at most three times.
    let mut url = None;
    let mut started = None;
    for _ in 0..3 {
        let (proxy, admin, preview): (String, String, String) = (port(0), port(1), port(2));
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args([
                "demo",
                "--listen",
                &proxy,
                "--admin",
                &admin,
                "--preview",
                &preview,
            ])
            .args(["--token", "demo-token", "--no-traffic"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn demo");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Ok(Some(line))) =
            tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await
        {
            if line.contains("/_demo/deps?payments=down") {
                url = line
                    .split('\'')
                    .nth(1)
                    .and_then(|u| u.strip_prefix("http://"))
                    .map(str::to_string);
                break;
            }
        }
        if url.is_some() {
            let admin: SocketAddr = admin.parse().expect("addr");
            started = Some((child, admin, lines));
            break;
        }
        let _ = child.kill().await;
    }
    let (mut child, admin, mut lines) = started.expect("the demo started");
    let url = url.expect("the demo prints the /_demo/deps?payments=down command");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let (host, path) = url.split_once('/').expect("host/path");
    let green: SocketAddr = host.parse().expect("green addr");
    let (s, v) = admin_post(
        admin,
        "/api/services/api/flip",
        Some("demo-token"),
        Some(json!({"to": "green"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    // Green's own signals before the fault: a deep health endpoint and a metrics endpoint.
    let (s, deps) = get(green, "/health/deps").await;
    assert_eq!(s, 200, "{deps}");
    let deps: Value = serde_json::from_str(&deps).expect("deep health is JSON");
    assert_eq!(deps["payments"], "ok", "{deps}");
    let (s, metrics) = get(green, "/metrics").await;
    assert_eq!(s, 200, "{metrics}");
    assert!(
        metrics.contains(
            "app_dependency_up{service=\"api\",color=\"green\",dependency=\"payments\"} 1"
        ),
        "{metrics}"
    );
    assert_eq!(get(green, &format!("/{path}")).await.0, 200);
    let (_, deps) = get(green, "/health/deps").await;
    assert!(deps.contains("\"payments\":\"down\""), "{deps}");
    let (_, metrics) = get(green, "/metrics").await;
    assert!(
        metrics.contains(
            "app_dependency_up{service=\"api\",color=\"green\",dependency=\"payments\"} 0"
        ),
        "{metrics}"
    );
    let probe_rollback = || async {
        admin_get(admin, "/api/events").await.1["events"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["reason"] == "auto_rollback" && e["trigger"]["kind"] == "probe")
    };
    let rolled = eventually(40, probe_rollback).await;
    let (_, status) = admin_get(admin, "/api/status").await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    assert!(rolled, "no probe rollback: {status:#}");
}

/// The reference's analysis example is valid, and `[analysis]` keys take environment overrides.
#[test]
fn reference_analysis_example_is_valid() {
    let doc = include_str!("../docs/configuration.md");
    let block = doc
        .split("<!-- analysis example")
        .nth(1)
        .and_then(|b| b.split("```toml\n").nth(1))
        .and_then(|b| b.split("```").next())
        .expect("the analysis example in docs/configuration.md");
    let cfg = switchyard::config::from_toml_str_with_env(block, Some(Default::default()))
        .unwrap_or_else(|e| panic!("the analysis example is invalid:\n{e}"));
    assert_eq!(cfg.services[0].rollback.triggers.len(), 3);
    assert_eq!(cfg.services[0].verify.len(), 1);
    let env = [(
        "SWITCHYARD__ANALYSIS__PROMETHEUS_URL".to_string(),
        "https://prom.internal:9090".to_string(),
    )];
    let cfg = switchyard::config::from_toml_str_with_env(block, Some(env.into_iter().collect()))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg.analysis.prometheus_url.as_deref(),
        Some("https://prom.internal:9090")
    );
}

/// The shipped config's commented analysis examples are valid once uncommented.
#[test]
fn shipped_config_analysis_examples_are_valid() {
    let text = include_str!("../config/switchyard.toml");
    let uncommented: String = text
        .lines()
        .map(|l| {
            let body = l.strip_prefix("# ").unwrap_or(l);
            let is_toml = body.starts_with('[')
                || body.split_once(" = ").is_some_and(|(k, _)| {
                    k.trim().chars().all(|c| c.is_ascii_lowercase() || c == '_')
                });
            if l.starts_with("# ") && is_toml {
                body.to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let cfg = switchyard::config::from_toml_str_with_env(&uncommented, Some(Default::default()))
        .unwrap_or_else(|e| {
            panic!("the uncommented shipped config is invalid:\n{e}\n{uncommented}")
        });
    let api = &cfg.services[0];
    let kinds: Vec<&str> = api
        .rollback
        .triggers
        .iter()
        .map(|t| t.kind.name())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "prometheus").count(),
        2,
        "{kinds:?}"
    );
    assert_eq!(
        kinds.iter().filter(|k| **k == "probe").count(),
        2,
        "{kinds:?}"
    );
    assert_eq!(api.verify.len(), 1);
    assert!(cfg.analysis.prometheus_url.is_some());
}

// ---------------------------------------------------------------------------------------------
// TLS and the bearer token
// ---------------------------------------------------------------------------------------------

/// `https://` by the URL's scheme: a real Prometheus serving TLS (its web config), trusted
/// through `[analysis] ca_file`; the same URL without the CA is an error, inconclusive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_over_tls() {
    let exp = Exporter::start("app_db_errors{color=\"green\"} 0.25\n").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
    let (cert, key) = (dir.path().join("prom.crt"), dir.path().join("prom.key"));
    std::fs::write(&cert, ck.cert.pem()).expect("write cert");
    std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write key");
    let web = dir.path().join("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
            cert.display(),
            key.display()
        ),
    )
    .expect("write web.yml");
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: app\n    static_configs:\n      - targets: ['{}']\n",
            exp.addr
        ),
    )
    .expect("write prometheus.yml");
    let port = free_port();
    let mut child = tokio::process::Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--web.config.file={}", web.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start prometheus");
    let ups = futures_ups(4).await;
    let trig = r#"
[services.rollback]
[[services.rollback.triggers]]
kind = "prometheus"
query = 'max(app_db_errors{color="{{color}}"})'
above = 0.5
interval = "300ms"
"#;
    // The CA file is not there at first (a sidecar writes it later): an error, tried again at
    // every evaluation, and once it is there the queries go through.
    let ca = dir.path().join("ca.pem");
    let body = format!(
        "[analysis]\nprometheus_url = \"https://localhost:{port}\"\nca_file = \"{}\"\n{}",
        ca.display(),
        two_colors("api", "/", &[ups[0].addr], &[ups[1].addr], trig)
    );
    let p = TestProxy::start(&body).await;
    assert_eq!(flip(&p, "api", "green", false).await.0, 200);
    // (Until Prometheus listens, a loaded machine may show "cannot connect" first: the
    // connection comes before the CA file.)
    wait_trigger(&p, "api", 0, |t| {
        t["state"] == "inconclusive"
            && t["error"]
                .as_str()
                .is_some_and(|e| e.contains("cannot read CA file"))
    })
    .await;
    std::fs::copy(&cert, &ca).expect("copy the CA");
    let t = wait_trigger(&p, "api", 0, |t| t["value"] == json!(0.25)).await;
    assert_eq!(t["state"], "ok");
    p.stop().await;

    // Without the CA (the system bundle does not trust it): a TLS error, inconclusive.
    let body = format!(
        "[analysis]\nprometheus_url = \"https://localhost:{port}\"\n{}",
        two_colors("api", "/", &[ups[2].addr], &[ups[3].addr], trig)
    );
    let p = TestProxy::start(&body).await;
    assert_eq!(flip(&p, "api", "green", false).await.0, 200);
    wait_trigger(&p, "api", 0, |t| {
        t["state"] == "inconclusive"
            && t["error"]
                .as_str()
                .is_some_and(|e| e.contains("TLS handshake") || e.contains("CA"))
    })
    .await;
    p.stop().await;
    let _ = child.kill().await;
}

/// The bearer token comes from the variable `prometheus_token_env` names (here one cargo sets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_from_the_environment() {
    let heads = Arc::new(Mutex::new(Vec::<String>::new()));
    let h = heads.clone();
    let fake = raw_upstream(move |head| {
        h.lock().expect("lock").push(head.to_string());
        let body = r#"{"status":"success","data":{"resultType":"scalar","result":[1,"7"]}}"#;
        Raw::Answer(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    })
    .await;
    let ups = futures_ups(2).await;
    let body = format!(
        "[analysis]\nprometheus_url = \"http://{fake}/prefix/\"\nprometheus_token_env = \"CARGO_PKG_NAME\"\n{}",
        two_colors(
            "api",
            "/",
            &[ups[0].addr],
            &[ups[1].addr],
            r#"
[services.rollback]
[[services.rollback.triggers]]
kind = "prometheus"
query = 'scalar(x{color="{{color}}"})'
below = 1
interval = "300ms"
for = "1h"
"#
        )
    );
    let p = TestProxy::start(&body).await;
    assert_eq!(flip(&p, "api", "green", false).await.0, 200);
    let t = wait_trigger(&p, "api", 0, |t| t["value"] == json!(7.0)).await;
    assert_eq!(t["state"], "ok");
    let head = heads
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .unwrap_or_default();
    assert!(
        head.starts_with(
            "GET /prefix/api/v1/query?query=scalar%28x%7Bcolor%3D%22green%22%7D%29 HTTP/1.1"
        ),
        "{head}"
    );
    match std::env::var("CARGO_PKG_NAME") {
        Ok(v) => assert!(
            head.to_ascii_lowercase()
                .contains(&format!("authorization: bearer {}", v.to_ascii_lowercase())),
            "{head}"
        ),
        Err(_) => assert!(
            !head.to_ascii_lowercase().contains("authorization"),
            "{head}"
        ),
    }
    p.stop().await;
}

/// The dashboard (in headless Chromium) shows a probe trigger's state, what it checks and its
/// error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_analysis_triggers() {
    let blue = DeepUpstream::start().await;
    let dead = dead_addr().await;
    // A Prometheus answer of two series: a configuration error, shown with the query.
    let fake = raw_upstream(|_head| {
        let body = r#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{"color":"blue"},"value":[1,"0"]},{"metric":{"color":"green"},"value":[1,"1"]}]}}"#;
        Raw::Answer(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    })
    .await;
    let body = format!("[analysis]\nprometheus_url = \"http://{fake}\"\n")
        + &two_colors(
            "api",
            "/",
            &[blue.addr],
            &[dead],
            r#"
[services.rollback]
[[services.rollback.triggers]]
kind = "probe"
path = "/health/deps"
json_pointer = "/payments"
equals = "ok"
interval = "200ms"
[[services.rollback.triggers]]
kind = "prometheus"
query = 'app_db_errors_by_color_total'
above = 0.5
interval = "200ms"
"#,
        );
    let p = TestProxy::start(&body).await;
    assert_eq!(flip(&p, "api", "green", true).await.0, 200);
    wait_trigger(&p, "api", 0, |t| t["state"] == "inconclusive").await;
    wait_trigger(&p, "api", 1, |t| t["state"] == "inconclusive").await;
    let out = tokio::time::timeout(
        Duration::from_secs(90),
        tokio::process::Command::new("/usr/bin/chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--virtual-time-budget=5000",
                "--dump-dom",
            ])
            .arg(format!("http://{}/", p.admin))
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium timed out")
    .expect("run /usr/bin/chromium (Debian package chromium)");
    let dom = String::from_utf8_lossy(&out.stdout).to_string();
    p.stop().await;
    assert!(dom.contains("st-inconclusive"), "{dom}");
    assert!(
        dom.contains("GET /health/deps: /payments == \"ok\""),
        "{dom}"
    );
    assert!(dom.contains("error: "), "{dom}");
    assert!(dom.contains("cannot connect"), "{dom}");
    assert!(dom.contains("app_db_errors_by_color_total"), "{dom}");
    assert!(
        dom.contains("configuration error: the query returned 2 series"),
        "{dom}"
    );
}

/// A trigger is evaluated at its own `interval`, not at the engine's twice a second; a reload
/// that changes it restarts its task with the new query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_interval_and_reload() {
    let heads = Arc::new(Mutex::new(Vec::<String>::new()));
    let h = heads.clone();
    let fake = raw_upstream(move |head| {
        h.lock().expect("lock").push(head.to_string());
        let body = r#"{"status":"success","data":{"resultType":"scalar","result":[1,"7"]}}"#;
        Raw::Answer(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    })
    .await;
    let ups = futures_ups(2).await;
    let body = format!(
        "[analysis]\nprometheus_url = \"http://{fake}\"\n{}",
        two_colors(
            "api",
            "/",
            &[ups[0].addr],
            &[ups[1].addr],
            r#"
[services.rollback]
[[services.rollback.triggers]]
kind = "prometheus"
query = 'scalar(first_query)'
above = 100
interval = "1h"
"#
        )
    );
    let p = TestProxy::start(&body).await;
    assert_eq!(flip(&p, "api", "green", false).await.0, 200);
    wait_trigger(&p, "api", 0, |t| t["value"] == json!(7.0)).await;
    let before = heads.lock().expect("lock").len();
    // The engine evaluates the trigger 4 times or more in these 2 s; Prometheus is not asked.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(heads.lock().expect("lock").len(), before);
    assert_eq!(p.service_status("api").await["triggers"][0]["state"], "ok");

    let text = std::fs::read_to_string(&p.config_path).expect("read config");
    let text = text
        .replace("scalar(first_query)", "scalar(second_query)")
        .replace("\"1h\"", "\"200ms\"");
    std::fs::write(&p.config_path, text).expect("write config");
    let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{v}");
    let t = wait_trigger(&p, "api", 0, |t| t["evaluated"] == "scalar(second_query)").await;
    assert_eq!(t["query"], "scalar(second_query)");
    assert!(heads
        .lock()
        .expect("lock")
        .iter()
        .any(|h| h.contains("second_query")));
    let state_series =
        r#"switchyard_analysis_state{kind="prometheus",service="api",state="ok",trigger="0"} 1"#;
    let metrics = || async {
        let (_, m) = admin_get(p.admin, "/metrics").await;
        m.as_str().unwrap_or_default().to_string()
    };
    assert!(
        eventually(20, || async { metrics().await.contains(state_series) }).await,
        "{}",
        metrics().await
    );

    // A reload that disables automatic rollback stops the task and drops its series.
    let text = std::fs::read_to_string(&p.config_path).expect("read config");
    let text = text.replace(
        "[services.rollback]\n",
        "[services.rollback]\nenabled = false\n",
    );
    std::fs::write(&p.config_path, text).expect("write config");
    let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{v}");
    let gone = eventually(20, || async {
        let m = metrics().await;
        !m.contains("switchyard_analysis_state{") && !m.contains("switchyard_analysis_value{")
    })
    .await;
    assert!(gone, "{}", metrics().await);
    p.stop().await;
}

/// Text from a remote answer (Prometheus's error body) reaches `ctl status` and `ctl events`
/// with its control characters shown escaped and on one line: a Prometheus (or whatever
/// answers in its place) cannot retitle or clear the operator's terminal, nor print a forged
/// status line under the real one (they used to go out raw).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_error_text_reaches_ctl_escaped_and_on_one_line() {
    let ups = futures_ups(2).await;
    let prom = raw_upstream(|_| {
        let body = "\u{1b}]0;pwned\u{7}\u{1b}[2J\napi  live: GREEN  previous: blue  generation: 99\n";
        Raw::Answer(
            format!(
                "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    })
    .await;
    let trig = r#"
[services.rollback]
[[services.rollback.triggers]]
kind = "prometheus"
query = 'up'
above = 0.5
interval = "200ms"
for = "0s"
on_error = "fail"
max_errors = 1
"#;
    let body = format!(
        "[analysis]\nprometheus_url = \"http://{prom}\"\n{}",
        two_colors("api", "/", &[ups[0].addr], &[ups[1].addr], trig)
    );
    let p = TestProxy::start(&body).await;
    assert_eq!(flip(&p, "api", "green", false).await.0, 200);
    let rolled = eventually(20, || async { !auto_rollbacks(&p, "api").await.is_empty() }).await;
    assert!(rolled, "no auto rollback: {:?}", p.events().await);
    for args in [&["status"][..], &["events"][..]] {
        let text = ctl_read(&p, args).await;
        assert!(
            text.contains("pwned"),
            "{args:?}: the text is shown: {text}"
        );
        assert!(
            !text.contains('\u{1b}') && !text.contains('\u{7}'),
            "{args:?}: {text:?}"
        );
        assert!(
            !text.lines().any(|l| l.starts_with("api  live: GREEN")),
            "{args:?}: a forged line: {text}"
        );
    }
    p.stop().await;
}

/// `switchyard ctl ARGS` (a read: no token) against `p`'s admin listener: its stdout, after
/// asserting it succeeded.
async fn ctl_read(p: &TestProxy, args: &[&str]) -> String {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["ctl", "--admin", &format!("http://{}", p.admin)])
        .args(args)
        .env_remove("SWITCHYARD_ADMIN_TOKEN")
        .env_remove("SWITCHYARD_ADMIN_URL")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .expect("ctl finished")
        .expect("run ctl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "ctl {args:?}: {text}");
    text
}

/// A Prometheus on raw sockets answering `app_err{color="blue|green"}`: blue always 0.1, green
/// what the test sets (None: HTTP 503 with Prometheus's error body).
async fn fake_prometheus(green: Arc<Mutex<Option<f64>>>) -> SocketAddr {
    raw_upstream(move |head| {
        let blue = head.contains("blue");
        let answer = if blue {
            Some(0.1)
        } else {
            *green.lock().expect("lock")
        };
        let (status, body) = match answer {
            Some(v) => (
                "200 OK",
                json!({"status": "success", "data": {"resultType": "scalar", "result": [1.0, v.to_string()]}}),
            ),
            None => (
                "503 Service Unavailable",
                json!({"status": "error", "errorType": "unavailable", "error": "down"}),
            ),
        };
        let body = body.to_string();
        Raw::Answer(
            format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .into_bytes(),
        )
    })
    .await
}

/// `value` is the last value measured, for the color and time `color` and `evaluated_at` name:
/// an error since keeps it (status and `switchyard_analysis_value`); after the trigger fired and
/// rolled back, it is the new live color's reading, and `fired_value` the value it fired on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn value_is_the_last_measured_through_errors_and_after_firing() {
    let ups = futures_ups(2).await;
    let green = Arc::new(Mutex::new(Some(0.3)));
    let prom = fake_prometheus(green.clone()).await;
    let trig = r#"
[services.rollback]
[[services.rollback.triggers]]
kind = "prometheus"
query = 'app_err{color="{{color}}"}'
above = 0.5
interval = "200ms"
for = "0s"
max_errors = 1000
"#;
    let body = format!(
        "[analysis]\nprometheus_url = \"http://{prom}\"\n{}",
        two_colors("api", "/", &[ups[0].addr], &[ups[1].addr], trig)
    );
    let p = TestProxy::start(&body).await;
    assert_eq!(flip(&p, "api", "green", false).await.0, 200);
    wait_trigger(&p, "api", 0, |t| {
        t["state"] == "ok" && t["value"] == json!(0.3)
    })
    .await;

    *green.lock().expect("lock") = None;
    let t = wait_trigger(&p, "api", 0, |t| t["state"] == "inconclusive").await;
    assert_eq!(t["value"], json!(0.3), "{t}");
    assert!(t["error"].is_string(), "{t}");
    let m = get(p.admin, "/metrics").await.1;
    assert_eq!(
        metric(
            &m,
            "switchyard_analysis_value",
            &[("kind", "prometheus"), ("service", "api"), ("trigger", "0")]
        ),
        Some(0.3),
        "{m}"
    );

    *green.lock().expect("lock") = Some(0.9);
    let t = wait_trigger(&p, "api", 0, |t| {
        t["state"] == "fired" && t["color"] == "blue"
    })
    .await;
    assert_eq!(t["value"], json!(0.1), "{t}");
    assert_eq!(t["fired_value"], json!(0.9), "{t}");
    assert_eq!(p.service_status("api").await["active"], "blue");
    p.stop().await;
}

/// An h2c-only upstream (as a gRPC server is): an HTTP/1.1 connection is dropped at its first
/// bytes; over h2 every request gets `{"payments": "ok"}`.
async fn h2c_only_deep_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut preface = [0u8; 24];
                if tcp.peek(&mut preface).await.is_ok() && !preface.starts_with(b"PRI * HTTP/2.0") {
                    return;
                }
                let Ok(mut conn) = h2::server::handshake(tcp).await else {
                    return;
                };
                while let Some(Ok((_req, mut reply))) = conn.accept().await {
                    let body = bytes::Bytes::from_static(br#"{"payments": "ok"}"#);
                    let head = http::Response::builder()
                        .status(200)
                        .header("content-type", "application/json")
                        .body(())
                        .expect("head");
                    if let Ok(mut tx) = reply.send_response(head, false) {
                        let _ = tx.send_data(body, true);
                    }
                }
            });
        }
    });
    addr
}

/// A `path` probe on a `protocol = "h2"` pool speaks h2c, as the pool does: a verify check on
/// h2c-only upstreams passes (over HTTP/1.1 it could only fail, and refuse every flip).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_of_an_h2_pool_speaks_h2() {
    let (blue, green) = (
        h2c_only_deep_upstream().await,
        h2c_only_deep_upstream().await,
    );
    let body = format!(
        "\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{blue}\"], protocol = \"h2\" }}\ngreen = {{ upstreams = [\"{green}\"], protocol = \"h2\" }}\n[[services.verify]]\nkind = \"probe\"\npath = \"/health/deps\"\njson_pointer = \"/payments\"\nequals = \"ok\"\n"
    );
    let p = TestProxy::start(&body).await;
    let (status, v) = flip(&p, "api", "green", false).await;
    assert_eq!(status, 200, "{v}");
    p.stop().await;
}
