//! Automatic rollback end to end: a proxy with short trigger windows, flipped to green, with
//! background traffic; each test breaks green (or blue) in one way and checks what the watcher
//! does about it: events, metrics, `/api/status`, where traffic goes, and webhooks.

mod common;
use common::*;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// Background traffic: ~50 requests a second through the proxy (one task per request, so a slow
/// upstream does not slow the rate), counting the answers by body and status.
struct Traffic {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    answers: Arc<Mutex<HashMap<(u16, String), usize>>>,
}

impl Traffic {
    fn start(proxy: SocketAddr, path: &str) -> Traffic {
        let stop = CancellationToken::new();
        let answers = Arc::new(Mutex::new(HashMap::new()));
        let (stop2, answers2, path) = (stop.clone(), answers.clone(), path.to_string());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut inflight = JoinSet::new();
            let client = client();
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop2.cancelled() => break,
                }
                while inflight.try_join_next().is_some() {}
                let (client, answers, uri) = (
                    client.clone(),
                    answers2.clone(),
                    format!("http://{proxy}{path}"),
                );
                inflight.spawn(async move {
                    let req = http::Request::get(uri)
                        .body(Full::new(Bytes::new()))
                        .expect("request");
                    let Ok(Ok(resp)) =
                        tokio::time::timeout(Duration::from_secs(5), client.request(req)).await
                    else {
                        return;
                    };
                    let code = resp.status().as_u16();
                    let body = match resp.into_body().collect().await {
                        Ok(b) => String::from_utf8_lossy(&b.to_bytes()).trim().to_string(),
                        Err(_) => return,
                    };
                    if let Ok(mut a) = answers.lock() {
                        *a.entry((code, body)).or_default() += 1;
                    }
                });
            }
            inflight.abort_all();
        });
        Traffic {
            stop,
            task,
            answers,
        }
    }

    /// Answers with this body so far.
    fn count(&self, body: &str) -> usize {
        self.answers
            .lock()
            .expect("lock")
            .iter()
            .filter(|((_, b), _)| b == body)
            .map(|(_, n)| n)
            .sum()
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// Blue and green upstreams and a proxy whose "api" service has the given rollback section (and
/// other service keys), flipped to green. `head` goes before the service (e.g. `[notify]`).
struct Rig {
    blue: Arc<TestUpstream>,
    green: Arc<TestUpstream>,
    p: TestProxy,
}

impl Rig {
    async fn start(head: &str, extra: &str) -> Rig {
        let blue = TestUpstream::start("blue").await;
        let green = TestUpstream::start("green").await;
        let body = format!(
            "{head}\n{}",
            service("api", &[blue.addr], &[green.addr], extra)
        );
        let p = TestProxy::start(&body).await;
        let r = Rig { blue, green, p };
        // With health checks the pools may need a round of checks before a flip is allowed.
        let flipped = eventually(10, || async {
            let (s, _) = r.p.flip("api", "green").await;
            s == 200
        })
        .await;
        assert!(flipped, "flip to green refused: {}", r.p.status().await);
        assert_eq!(r.p.get("/x").await, (200, "green\n".to_string()));
        r
    }

    fn drive(&self) -> Traffic {
        Traffic::start(self.p.proxy, "/x")
    }

    async fn svc(&self) -> Value {
        self.p.service_status("api").await
    }

    async fn events(&self, reason: &str) -> Vec<Value> {
        self.p
            .events()
            .await
            .into_iter()
            .filter(|e| e["reason"] == reason)
            .collect()
    }

    /// Waits (bounded) for the first event with this reason.
    async fn wait_event(&self, reason: &str, secs: u64) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        let mut found = None;
        while tokio::time::Instant::now() < deadline {
            found = self.events(reason).await.into_iter().next();
            if found.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match found {
            Some(e) => e,
            None => panic!(
                "no {reason} event within {secs}s; events: {:?}; status: {}",
                self.p.events().await,
                self.svc().await
            ),
        }
    }

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        metric(&get(self.p.admin, "/metrics").await.1, name, labels)
    }

    async fn trigger_state(&self, i: usize) -> Value {
        self.svc().await["triggers"][i].clone()
    }
}

/// `[services.rollback]` with a 10-minute watch and these triggers (TOML bodies without the
/// `[[services.rollback.triggers]]` header).
fn rollback(min_requests: u64, dry_run: bool, triggers: &[&str]) -> String {
    let mut s = format!(
        "[services.rollback]\nwatch_for = \"10m\"\nmin_requests = {min_requests}\ndry_run = {dry_run}\n"
    );
    for t in triggers {
        s += &format!("[[services.rollback.triggers]]\n{t}\n");
    }
    s
}

/// The checks fail by status (503), never by timing out: the generous timeout keeps one slow
/// check on a loaded machine from taking a healthy pool down (with `unhealthy_after = 1` and
/// an `unhealthy` trigger that would be a rollback).
const HEALTH: &str = "[services.health]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"2s\"\nunhealthy_after = 1\nhealthy_after = 1\n";
const ERROR_RATE: &str = "kind = \"error_rate\"\nabove = 0.5\nover = \"5s\"\nfor = \"1s\"";

/// How long the tests watch for something that must NOT happen: several evaluations (the
/// watcher evaluates every 500 ms) past every `for` involved.
const QUIET: Duration = Duration::from_millis(3000);

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_rate_rolls_back_once_and_never_flips_forward() {
    let r = Rig::start("", &rollback(10, false, &[ERROR_RATE])).await;
    assert_eq!(r.svc().await["armed"], true);
    r.green.set_status(500);
    let t = r.drive();

    let ev = r.wait_event("auto_rollback", 15).await;
    assert_eq!(ev["from"], "green", "{ev}");
    assert_eq!(ev["to"], "blue", "{ev}");
    let detail = ev["detail"].as_str().expect("detail");
    for part in ["error_rate", "> 0.5", "for 1s", "requests in window"] {
        assert!(detail.contains(part), "detail {detail:?} lacks {part:?}");
    }
    let tr = &ev["trigger"];
    assert_eq!(tr["kind"], "error_rate", "{ev}");
    assert_eq!(tr["threshold"].as_f64(), Some(0.5), "{ev}");
    // The window read: the trigger's 5 s, or the seconds since the flip when fewer.
    let over = tr["over_secs"].as_u64().expect("over_secs");
    assert!((1..=5).contains(&over), "{ev}");
    let said = match over {
        5 => "over 5s for".to_string(),
        n => format!("over {n}s (since the flip or this process's start; window 5s) for"),
    };
    assert!(detail.contains(&said), "detail {detail:?} lacks {said:?}");
    assert_eq!(tr["for_secs"], 1, "{ev}");
    let n = tr["requests"].as_u64().expect("requests");
    assert!(n >= 10, "{ev}");
    assert!(
        detail.contains(&format!("({n} requests in window)")),
        "{ev}"
    );
    // Every green request in the window failed but the rig's one check before the traffic.
    // (It may have left the 5 s window already on a slow machine.)
    let v = tr["value"].as_f64().expect("value");
    assert!(
        (v - (n - 1) as f64 / n as f64).abs() < 1e-9 || v == 1.0,
        "{ev}"
    );

    let svc = r.svc().await;
    assert_eq!(svc["active"], "blue", "{svc}");
    assert_eq!(svc["previous"], "green", "{svc}");
    assert_eq!(svc["failed_color"], "green", "{svc}");
    assert_eq!(svc["armed"], false, "{svc}");
    let generation = svc["generation"].as_u64().expect("generation");
    assert_eq!(
        r.metric(
            "switchyard_flips_total",
            &[("service", "api"), ("reason", "auto_rollback")]
        )
        .await,
        Some(1.0)
    );
    assert_eq!(r.p.get("/x").await, (200, "blue\n".to_string()));

    // Traffic now goes to blue, and green gets nothing more (once the requests already on
    // their way there when the flip happened have landed). Then blue fails too: the engine
    // must not flip "back" to green (no automatic flip ever goes forward).
    let green_hits = settled(10, Duration::from_millis(500), || r.green.hits())
        .await
        .expect("green kept getting traffic after the rollback");
    let blue_answers = t.count("blue");
    r.blue.set_status(500);
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        r.green.hits(),
        green_hits,
        "green got traffic after the rollback"
    );
    let svc = r.svc().await;
    assert_eq!(svc["active"], "blue", "{svc}");
    assert_eq!(svc["generation"].as_u64(), Some(generation), "{svc}");
    assert_eq!(r.events("auto_rollback").await.len(), 1);
    assert!(
        t.count("blue") > blue_answers + 20,
        "traffic kept flowing to blue"
    );
    assert_eq!(
        r.metric(
            "switchyard_flips_total",
            &[("service", "api"), ("reason", "auto_rollback")]
        )
        .await,
        Some(1.0)
    );
    t.stop().await;
    r.p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_green_rolls_back_on_p95_latency() {
    let trigger = "kind = \"p95_latency\"\nabove = \"200ms\"\nover = \"5s\"\nfor = \"1s\"";
    let r = Rig::start("", &rollback(10, false, &[ERROR_RATE, trigger])).await;
    r.green.set_delay(300);
    let t = r.drive();
    let ev = r.wait_event("auto_rollback", 15).await;
    let tr = &ev["trigger"];
    assert_eq!(tr["kind"], "p95_latency", "{ev}");
    assert_eq!(tr["threshold"].as_f64(), Some(0.2), "{ev}");
    let v = tr["value"].as_f64().expect("value");
    assert!(v >= 0.3 * 0.965, "measured p95 {v}s below the 300 ms delay");
    let detail = ev["detail"].as_str().expect("detail");
    assert!(
        detail.starts_with("p95_latency ") && detail.contains("> 200ms"),
        "{detail}"
    );
    assert_eq!(r.svc().await["active"], "blue");
    assert_eq!(r.p.get("/x").await, (200, "blue\n".to_string()));
    t.stop().await;
    r.p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_5xx_on_a_critical_path_rolls_back_at_once() {
    let critical =
        "kind = \"critical_5xx\"\npaths = [\"/api/payments\"]\nabove = 0\nover = \"30s\"\nfor = \"0s\"";
    // A lenient error_rate trigger too, which this traffic never trips.
    let lenient = "kind = \"error_rate\"\nabove = 0.9\nover = \"5s\"\nfor = \"1s\"";
    let r = Rig::start("", &rollback(10, false, &[lenient, critical])).await;
    for _ in 0..20 {
        assert_eq!(r.p.get("/api/orders").await.0, 200);
    }
    // 5xx elsewhere is not critical.
    r.green.set_status(500);
    for _ in 0..2 {
        assert_eq!(r.p.get("/api/orders").await.0, 500);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(r.svc().await["active"], "green");
    assert!(r.events("auto_rollback").await.is_empty());

    // One failing payment, by a path that only names /api/payments once resolved (as the
    // upstream resolves it).
    assert_eq!(r.p.get("/api/./payments/charge").await.0, 500);
    r.green.set_status(200);
    // for = 0s fires at the next evaluation (500 ms); 10 s is far below the 30 s window a
    // trigger that waited for it (or for more failures) would take.
    let ev = r.wait_event("auto_rollback", 10).await;
    let tr = &ev["trigger"];
    assert_eq!(tr["kind"], "critical_5xx", "{ev}");
    assert_eq!(tr["value"].as_f64(), Some(1.0), "{ev}");
    assert_eq!(tr["threshold"].as_f64(), Some(0.0), "{ev}");
    assert!(
        ev["detail"]
            .as_str()
            .is_some_and(|d| d.contains("/api/payments")),
        "{ev}"
    );
    assert_eq!(r.svc().await["active"], "blue");
    r.p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_green_rolls_back() {
    let unhealthy = "kind = \"unhealthy\"\nfor = \"500ms\"";
    let r = Rig::start(
        "",
        &format!("{HEALTH}{}", rollback(10, false, &[ERROR_RATE, unhealthy])),
    )
    .await;
    let t = r.drive();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(r.svc().await["active"], "green", "healthy green stays live");
    r.green.set_health(503);
    let ev = r.wait_event("auto_rollback", 10).await;
    let tr = &ev["trigger"];
    assert_eq!(tr["kind"], "unhealthy", "{ev}");
    assert_eq!(tr["value"].as_f64(), Some(0.0), "{ev}");
    assert!(
        ev["detail"]
            .as_str()
            .is_some_and(|d| d.contains("0 of 1 live upstreams healthy")),
        "{ev}"
    );
    let svc = r.svc().await;
    assert_eq!(svc["active"], "blue", "{svc}");
    assert_eq!(svc["colors"]["green"]["healthy"], false, "{svc}");
    assert_eq!(r.p.get("/x").await, (200, "blue\n".to_string()));
    t.stop().await;
    r.p.stop().await;
}

/// The live color's only upstream dies: every request is the proxy's own 503 (no healthy
/// upstream), which is a failed request of that color. With no `unhealthy` trigger, the
/// error_rate trigger sees them and rolls back, and the color's window error ratio shows them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_rate_rolls_back_when_the_live_color_has_no_healthy_upstream() {
    let r = Rig::start(
        "",
        &format!("{HEALTH}{}", rollback(10, false, &[ERROR_RATE])),
    )
    .await;
    r.green.kill();
    assert!(
        eventually(10, || async {
            r.svc().await["colors"]["green"]["healthy"] == false
        })
        .await,
        "green never went unhealthy"
    );
    // From here on no request reaches green: each is answered 503 by the proxy.
    assert_eq!(r.p.get("/x").await.0, 503);
    let t = r.drive();
    let ev = r.wait_event("auto_rollback", 15).await;
    assert_eq!(
        (&ev["from"], &ev["to"]),
        (&"green".into(), &"blue".into()),
        "{ev}"
    );
    let tr = &ev["trigger"];
    assert_eq!(tr["kind"], "error_rate", "{ev}");
    assert!(tr["value"].as_f64().is_some_and(|v| v > 0.5), "{ev}");
    let ratio = r
        .metric(
            "switchyard_window_error_ratio",
            &[("service", "api"), ("color", "green")],
        )
        .await;
    assert!(
        ratio.is_some_and(|v| v > 0.5),
        "green's window error ratio {ratio:?}"
    );
    assert_eq!(r.svc().await["active"], "blue");
    assert_eq!(r.p.get("/x").await, (200, "blue\n".to_string()));
    t.stop().await;
    r.p.stop().await;
}

/// The same dead green, seen by the other window triggers: a 503 on a critical path is a
/// critical failure (it fires at once), while those 503s add no latency, so `p95_latency` is
/// not taken from the two answered requests that came before them (one of them slow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_live_color_is_critical_but_adds_no_latency() {
    let p95 = "kind = \"p95_latency\"\nabove = \"200ms\"\nover = \"5s\"\nfor = \"1s\"";
    let critical =
        "kind = \"critical_5xx\"\npaths = [\"/api/payments\"]\nabove = 0\nover = \"30s\"\nfor = \"0s\"";
    let r = Rig::start("", &format!("{HEALTH}{}", rollback(10, false, &[p95]))).await;
    r.green.set_delay(300);
    assert_eq!(r.p.get("/x").await.0, 200);
    r.green.kill();
    assert!(
        eventually(10, || async {
            r.svc().await["colors"]["green"]["healthy"] == false
        })
        .await,
        "green never went unhealthy"
    );
    let t = r.drive();
    tokio::time::sleep(QUIET).await;
    t.stop().await;
    assert!(
        r.events("auto_rollback").await.is_empty(),
        "{:?}",
        r.p.events().await
    );
    assert_eq!(r.trigger_state(0).await["state"], "insufficient_data");
    r.p.stop().await;

    let r = Rig::start("", &format!("{HEALTH}{}", rollback(10, false, &[critical]))).await;
    r.green.kill();
    assert!(
        eventually(10, || async {
            r.svc().await["colors"]["green"]["healthy"] == false
        })
        .await,
        "green never went unhealthy"
    );
    assert_eq!(r.p.get("/api/payments/charge").await.0, 503);
    let ev = r.wait_event("auto_rollback", 10).await;
    assert_eq!(ev["trigger"]["kind"], "critical_5xx", "{ev}");
    assert_eq!(ev["trigger"]["value"].as_f64(), Some(1.0), "{ev}");
    r.p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_blue_blocks_the_rollback_once_until_it_heals() {
    let r = Rig::start(
        "",
        &format!("{HEALTH}{}", rollback(10, false, &[ERROR_RATE])),
    )
    .await;
    r.blue.set_health(503);
    assert!(
        eventually(10, || async {
            r.svc().await["colors"]["blue"]["healthy"] == false
        })
        .await,
        "blue never went unhealthy"
    );
    r.green.set_status(500);
    let t = r.drive();

    let ev = r.wait_event("rollback_blocked", 15).await;
    assert_eq!(ev["from"], "green", "{ev}");
    assert_eq!(ev["to"], "blue", "{ev}");
    assert_eq!(ev["trigger"]["kind"], "error_rate", "{ev}");
    assert!(
        ev["detail"]
            .as_str()
            .is_some_and(|d| d.contains("not rolled back")),
        "{ev}"
    );
    // Several evaluations later: still blocked, still one event for the episode.
    tokio::time::sleep(QUIET).await;
    let svc = r.svc().await;
    assert_eq!(svc["active"], "green", "{svc}");
    assert_eq!(svc["rollback_blocked"], true, "{svc}");
    assert_eq!(r.events("rollback_blocked").await.len(), 1);
    assert!(r.events("auto_rollback").await.is_empty());
    assert_eq!(
        r.metric("switchyard_rollback_blocked", &[("service", "api")])
            .await,
        Some(1.0)
    );

    // Blue heals: the rollback happens, without another blocked event.
    r.blue.set_health(200);
    let ev = r.wait_event("auto_rollback", 10).await;
    assert_eq!(ev["to"], "blue", "{ev}");
    let svc = r.svc().await;
    assert_eq!(svc["active"], "blue", "{svc}");
    assert_eq!(svc["rollback_blocked"], false, "{svc}");
    assert_eq!(r.events("rollback_blocked").await.len(), 1);
    assert_eq!(r.p.get("/x").await, (200, "blue\n".to_string()));
    t.stop().await;
    r.p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_traffic_with_404s_and_jitter_never_rolls_back() {
    // The jitter tops out at 80 ms; the threshold is seconds above what a loaded machine adds.
    let p95 = "kind = \"p95_latency\"\nabove = \"2s\"\nover = \"5s\"\nfor = \"1s\"";
    let critical =
        "kind = \"critical_5xx\"\npaths = [\"/x\"]\nabove = 0\nover = \"30s\"\nfor = \"0s\"";
    let unhealthy = "kind = \"unhealthy\"\nfor = \"500ms\"";
    let strict_rate = "kind = \"error_rate\"\nabove = 0.01\nover = \"5s\"\nfor = \"1s\"";
    let r = Rig::start(
        "",
        &format!(
            "{HEALTH}{}",
            rollback(10, false, &[strict_rate, p95, critical, unhealthy])
        ),
    )
    .await;
    let t = r.drive();
    // Jitter: latency and status change every 100 ms; half the time green answers 404.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(4000);
    let mut i = 0u64;
    while tokio::time::Instant::now() < deadline {
        r.green.set_delay([0, 30, 5, 80, 10][(i % 5) as usize]);
        r.green
            .set_status(if i.is_multiple_of(2) { 404 } else { 200 });
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let svc = r.svc().await;
    assert_eq!(svc["active"], "green", "{svc}");
    assert_eq!(svc["armed"], true, "{svc}");
    // The triggers were evaluated with enough data, and nothing breached.
    for (i, kind) in ["error_rate", "p95_latency", "critical_5xx", "unhealthy"]
        .iter()
        .enumerate()
    {
        let st = &svc["triggers"][i];
        assert_eq!(st["kind"], *kind, "{svc}");
        assert_eq!(st["state"], "ok", "{svc}");
    }
    assert_eq!(svc["triggers"][0]["value"].as_f64(), Some(0.0), "{svc}");
    assert!(t.count("green") > 50, "too little traffic to mean anything");
    for reason in ["auto_rollback", "rollback_blocked", "would_rollback"] {
        assert!(r.events(reason).await.is_empty(), "{reason} event");
    }
    t.stop().await;
    r.p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_and_resume_rolls_back() {
    let r = Rig::start("", &rollback(10, false, &[ERROR_RATE])).await;
    assert_eq!(
        r.metric("switchyard_rollback_armed", &[("service", "api")])
            .await,
        Some(1.0)
    );
    let (s, v) = admin_post(r.p.admin, "/api/services/api/pause", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{v}");
    // Without the token: refused.
    let (s, _) = admin_post(r.p.admin, "/api/services/api/resume", None, None).await;
    assert_eq!(s, 401);
    let svc = r.svc().await;
    assert_eq!(svc["paused"], true, "{svc}");
    assert_eq!(svc["armed"], false, "{svc}");
    assert_eq!(
        r.metric("switchyard_rollback_armed", &[("service", "api")])
            .await,
        Some(0.0)
    );

    r.green.set_status(500);
    let t = r.drive();
    // The breach is tracked; once it has held a second past the 1 s `for` (two evaluations
    // at which an armed service would have fired), it is still green.
    assert!(
        eventually(10, || async {
            let st = r.trigger_state(0).await;
            st["state"] == "breaching" && st["held_secs"].as_f64().is_some_and(|h| h >= 2.0)
        })
        .await,
        "{}",
        r.svc().await
    );
    let svc = r.svc().await;
    assert_eq!(svc["active"], "green", "{svc}");
    assert!(r.events("auto_rollback").await.is_empty());

    let (s, v) = admin_post(r.p.admin, "/api/services/api/resume", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{v}");
    // The condition held all along: it fires (at the next evaluation; the bound only has to
    // tell that from never).
    let ev = r.wait_event("auto_rollback", 10).await;
    assert_eq!(ev["trigger"]["kind"], "error_rate");
    assert_eq!(r.svc().await["active"], "blue");
    t.stop().await;
    r.p.stop().await;
}

/// Rollback turned off by a reload and on again by another: the breach from before the gap is
/// not carried over (it was: the engine kept its `since`, and fired the moment rollback came
/// back, although nothing was evaluated in between).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breach_from_before_rollback_was_turned_off_does_not_count_after() {
    let slow = "kind = \"error_rate\"\nabove = 0.5\nover = \"5s\"\nfor = \"30s\"";
    let on = rollback(5, false, &[slow]);
    let r = Rig::start("", &on).await;
    r.green.set_status(500);
    let t = r.drive();
    let breaching = eventually(10, || async {
        r.trigger_state(0).await["state"] == "breaching"
    })
    .await;
    assert!(breaching, "{}", r.svc().await);
    let dir = r.p.dir.as_ref().expect("dir").path().to_path_buf();
    let body = |rb: &str| full_config(&service("api", &[r.blue.addr], &[r.green.addr], rb), &dir);
    std::fs::write(
        &r.p.config_path,
        body(&on.replace(
            "[services.rollback]\n",
            "[services.rollback]\nenabled = false\n",
        )),
    )
    .expect("write");
    let (s, v) = admin_post(r.p.admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{v}");
    // Off for longer than the breach had held, then on again.
    tokio::time::sleep(Duration::from_secs(4)).await;
    std::fs::write(&r.p.config_path, body(&on)).expect("write");
    let (s, v) = admin_post(r.p.admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{v}");
    let st = eventually(10, || async {
        r.trigger_state(0).await["state"] == "breaching"
    })
    .await;
    assert!(st, "{}", r.svc().await);
    let st = r.trigger_state(0).await;
    let held = st["held_secs"].as_f64().unwrap_or(f64::MAX);
    assert!(
        held < 3.0,
        "the breach from before the gap carried over: {st}"
    );
    t.stop().await;
    r.p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_records_would_rollback_once_and_does_not_flip() {
    let r = Rig::start("", &rollback(10, true, &[ERROR_RATE])).await;
    r.green.set_status(500);
    let t = r.drive();
    let ev = r.wait_event("would_rollback", 15).await;
    assert_eq!(ev["from"], "green", "{ev}");
    assert_eq!(ev["to"], "blue", "{ev}");
    assert_eq!(ev["trigger"]["kind"], "error_rate", "{ev}");
    assert!(
        ev["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("dry run: error_rate")),
        "{ev}"
    );
    tokio::time::sleep(QUIET).await;
    let svc = r.svc().await;
    assert_eq!(svc["active"], "green", "{svc}");
    assert_eq!(svc["dry_run"], true, "{svc}");
    assert_eq!(r.events("would_rollback").await.len(), 1);
    assert!(r.events("auto_rollback").await.is_empty());
    assert_eq!(
        r.metric(
            "switchyard_flips_total",
            &[("service", "api"), ("reason", "auto_rollback")]
        )
        .await
        .unwrap_or(0.0),
        0.0
    );
    assert_eq!(r.p.get("/x").await.1, "green\n");
    t.stop().await;
    r.p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trigger_states_in_status() {
    let slow_rate = "kind = \"error_rate\"\nabove = 0.5\nover = \"5s\"\nfor = \"2s\"";
    let r = Rig::start("", &rollback(10, false, &[slow_rate])).await;
    // One request so far (the rig's check): below min_requests.
    assert!(
        eventually(10, || async {
            r.trigger_state(0).await["state"] == "insufficient_data"
        })
        .await,
        "{}",
        r.svc().await
    );
    for _ in 0..3 {
        r.p.get("/x").await;
    }
    assert!(
        eventually(10, || async { r.trigger_state(0).await["requests"] == 4 }).await,
        "{}",
        r.svc().await
    );
    let st = r.trigger_state(0).await;
    assert_eq!(st["state"], "insufficient_data", "{st}");
    assert_eq!(st["kind"], "error_rate", "{st}");
    assert_eq!(st["threshold"].as_f64(), Some(0.5), "{st}");
    assert_eq!(st["value"], Value::Null, "{st}");

    r.green.set_status(500);
    let t = r.drive();
    assert!(
        eventually(10, || async {
            r.trigger_state(0).await["state"] == "breaching"
        })
        .await,
        "{}",
        r.svc().await
    );
    let st = r.trigger_state(0).await;
    assert!(
        st["since"].as_str().is_some_and(|s| s.ends_with('Z')),
        "{st}"
    );
    assert!(st["value"].as_f64().is_some_and(|v| v > 0.5), "{st}");
    assert!(st["requests"].as_u64().is_some_and(|n| n >= 10), "{st}");
    assert_eq!(r.svc().await["active"], "green");

    r.wait_event("auto_rollback", 10).await;
    assert!(
        eventually(10, || async {
            r.trigger_state(0).await["state"] == "fired"
        })
        .await,
        "{}",
        r.svc().await
    );
    let st = r.trigger_state(0).await;
    assert!(st["value"].as_f64().is_some_and(|v| v > 0.5), "{st}");
    assert!(st["since"].is_string(), "{st}");
    t.stop().await;
    r.p.stop().await;
}

/// A webhook receiver: records every JSON body POSTed to it (with its `Idempotency-Key` header
/// as `_idempotency_key`), answering after `delay`.
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Value>>>,
    stop: CancellationToken,
}

impl Receiver {
    async fn start() -> Receiver {
        Self::start_with(Duration::ZERO).await
    }

    async fn start_with(delay: Duration) -> Receiver {
        Self::start_inner(delay, None).await
    }

    /// Over TLS, serving the PEM certificate `cert` with its key `key`; it answers with a
    /// 2 MiB body (a receiver's long answer: its status alone counts).
    async fn start_tls(cert: &str, key: &str) -> Receiver {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("certificate");
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config");
        Self::start_inner(Duration::ZERO, Some(Arc::new(tls))).await
    }

    async fn start_inner(delay: Duration, tls: Option<Arc<rustls::ServerConfig>>) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (got2, stop2) = (got.clone(), stop.clone());
        let answer = if tls.is_some() {
            Bytes::from(vec![b'x'; 2 << 20])
        } else {
            Bytes::from("ok")
        };
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = stop2.cancelled() => return,
                };
                let got = got2.clone();
                let answer = answer.clone();
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (got, answer) = (got.clone(), answer.clone());
                    async move {
                        let ok = req.method() == http::Method::POST
                            && req
                                .headers()
                                .get(http::header::CONTENT_TYPE)
                                .is_some_and(|v| v == "application/json");
                        let key = req
                            .headers()
                            .get("idempotency-key")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        let body = req.into_body().collect().await.map(|b| b.to_bytes());
                        if let (true, Ok(b)) = (ok, body) {
                            if let Ok(mut v) = serde_json::from_slice::<Value>(&b) {
                                v["_idempotency_key"] = serde_json::json!(key);
                                got.lock().expect("lock").push(v);
                            }
                        }
                        tokio::time::sleep(delay).await;
                        Ok::<_, Infallible>(http::Response::new(Full::new(answer)))
                    }
                });
                let tls = tls.clone();
                tokio::spawn(async move {
                    let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let _ = server.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(tls) => {
                            // A handshake the client refuses (its CA does not sign us) ends here.
                            let Ok(stream) =
                                tokio_rustls::TlsAcceptor::from(tls).accept(stream).await
                            else {
                                return;
                            };
                            let _ = server.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        Receiver { addr, got, stop }
    }

    fn reasons(&self) -> Vec<String> {
        self.got
            .lock()
            .expect("lock")
            .iter()
            .map(|v| v["reason"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A reload applies `[notify]`: webhooks added get the reload's own event and what follows,
/// webhooks removed get nothing more. (It answered `restart_required: ["notify"]` and kept the
/// list the process started with.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_adds_and_removes_webhooks() {
    let first = Receiver::start().await;
    let second = Receiver::start().await;
    let r = Rig::start("", &rollback(10, false, &[ERROR_RATE])).await;
    let dir = r.p.dir.as_ref().expect("dir").path().to_path_buf();
    let reload = |head: String| {
        let body = format!(
            "{head}\n{}",
            service(
                "api",
                &[r.blue.addr],
                &[r.green.addr],
                &rollback(10, false, &[ERROR_RATE])
            )
        );
        std::fs::write(&r.p.config_path, full_config(&body, &dir)).expect("write");
        async {
            let (s, v) = admin_post(r.p.admin, "/api/reload", Some(TOKEN), None).await;
            assert_eq!(s, 200, "{v}");
            assert!(!v["restart_required"].to_string().contains("notify"), "{v}");
        }
    };
    let hooks = |recv: &Receiver| format!("[notify]\nwebhooks = [\"http://{}/hook\"]\n", recv.addr);
    reload(hooks(&first)).await;
    let (s, v) = r.p.flip("api", "blue").await;
    assert_eq!(s, 200, "{v}");
    let got = eventually(10, || async {
        let seen = first.reasons();
        seen.contains(&"reload".to_string()) && seen.contains(&"manual".to_string())
    })
    .await;
    assert!(got, "first got {:?}", first.reasons());
    // Swapped for the second: it gets the next flip, the first nothing more.
    reload(hooks(&second)).await;
    let before = first.reasons().len();
    let (s, v) = r.p.flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    let got = eventually(10, || async {
        second.reasons().contains(&"manual".to_string())
    })
    .await;
    assert!(got, "second got {:?}", second.reasons());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(first.reasons().len(), before, "{:?}", first.reasons());
    r.p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_get_flips_and_rollbacks_and_a_dead_one_blocks_nothing() {
    let recv = Receiver::start().await;
    let dead = dead_addr().await;
    // A receiver that takes connections and never answers: each of its deliveries takes the
    // whole timeout, twice (10 s and more), so a flip that waited for it could not answer
    // within the bound below.
    let hung = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let head = format!(
        "[notify]\nwebhooks = [\"http://{dead}/hook\", \"http://{}/hook\", \"http://{}/hook\"]\ntimeout = \"5s\"\nmax_attempts = 2\n",
        recv.addr,
        hung.local_addr().expect("addr")
    );
    let r = Rig::start(&head, &rollback(10, false, &[ERROR_RATE])).await;
    assert!(
        eventually(5, || async {
            recv.reasons().contains(&"manual".to_string())
        })
        .await,
        "receiver got {:?}",
        recv.reasons()
    );
    {
        let got = recv.got.lock().expect("lock");
        let manual = got
            .iter()
            .find(|v| v["reason"] == "manual")
            .expect("manual");
        assert_eq!(manual["service"], "api");
        assert_eq!(manual["from"], "blue");
        assert_eq!(manual["to"], "green");
        assert!(manual["time"].is_string() && manual["actor"].is_string());
    }
    // Flips keep answering while the dead and the hung receivers' deliveries are retried.
    for to in ["blue", "green"] {
        let t0 = tokio::time::Instant::now();
        let (s, v) = r.p.flip("api", to).await;
        assert_eq!(s, 200, "{v}");
        assert!(t0.elapsed() < Duration::from_secs(4), "{:?}", t0.elapsed());
    }

    r.green.set_status(500);
    let t = r.drive();
    r.wait_event("auto_rollback", 15).await;
    assert!(
        eventually(5, || async {
            recv.reasons().contains(&"auto_rollback".to_string())
        })
        .await,
        "receiver got {:?}",
        recv.reasons()
    );
    {
        let got = recv.got.lock().expect("lock");
        let ev = got
            .iter()
            .find(|v| v["reason"] == "auto_rollback")
            .expect("auto_rollback");
        assert_eq!(ev["to"], "blue");
        assert_eq!(ev["trigger"]["kind"], "error_rate");
    }
    assert_eq!(
        recv.reasons().iter().filter(|r| *r == "manual").count(),
        3,
        "{:?}",
        recv.reasons()
    );
    assert!(
        eventually(5, || async {
            r.metric("switchyard_webhook_failures_total", &[])
                .await
                .is_some_and(|v| v >= 1.0)
        })
        .await,
        "the dead webhook's failures were never counted"
    );
    t.stop().await;
    r.p.stop().await;
}

/// An `https://` webhook gets the events over TLS, its certificate verified against
/// `[notify] ca_file`; one whose certificate that file does not vouch for gets nothing (the
/// handshake fails, counted as a failed delivery).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_webhooks_are_verified_against_notify_ca_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let trusted = rcgen::generate_simple_self_signed(names.clone()).expect("rcgen");
    let stranger = rcgen::generate_simple_self_signed(names).expect("rcgen");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, trusted.cert.pem()).expect("write");
    let recv = Receiver::start_tls(&trusted.cert.pem(), &trusted.key_pair.serialize_pem()).await;
    let other = Receiver::start_tls(&stranger.cert.pem(), &stranger.key_pair.serialize_pem()).await;
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&format!(
        "[notify]\nwebhooks = [\"https://127.0.0.1:{}/hook\", \"https://localhost:{}/hook\", \"https://localhost:{}/hook\"]\n\
         ca_file = \"{}\"\ntimeout = \"5s\"\nmax_attempts = 1\n{}",
        recv.addr.port(),
        recv.addr.port(),
        other.addr.port(),
        ca.display(),
        service("api", &[blue.addr], &[green.addr], "")
    ))
    .await;
    let (s, v) = p.flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    // Once by IP, once by name.
    assert!(
        eventually(10, || async {
            recv.reasons().iter().filter(|r| *r == "manual").count() == 2
        })
        .await,
        "receiver got {:?}",
        recv.reasons()
    );
    {
        let got = recv.got.lock().expect("lock");
        assert_eq!(got[0]["to"], "green", "{got:?}");
        assert!(got[0]["_idempotency_key"].is_string(), "{got:?}");
    }
    assert!(
        eventually(10, || async {
            metric(
                &get(p.admin, "/metrics").await.1,
                "switchyard_webhook_failures_total",
                &[],
            )
            .is_some_and(|v| v >= 1.0)
        })
        .await,
        "the untrusted webhook's failure was never counted"
    );
    // Only that one: the trusted receiver's 2 MiB answers are not read, their 200 counts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        metric(
            &get(p.admin, "/metrics").await.1,
            "switchyard_webhook_failures_total",
            &[],
        ),
        Some(1.0)
    );
    assert!(other.reasons().is_empty(), "{:?}", other.reasons());
    p.stop().await;
}

/// A receiver that answers after `notify.timeout` gets each event `max_attempts` times: every
/// copy carries the same `id` in the body and as the `Idempotency-Key` header, and another
/// event another one, so it can drop the copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_webhook_can_tell_retried_copies_by_their_id() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let slow = Receiver::start_with(Duration::from_millis(1500)).await;
    let body = format!(
        "[notify]\nwebhooks = [\"http://{}/hook\"]\ntimeout = \"200ms\"\nmax_attempts = 2\n{}",
        slow.addr,
        service("api", &[blue.addr], &[green.addr], "")
    );
    let p = TestProxy::start(&body).await;
    for to in ["green", "blue"] {
        let (s, v) = p.flip("api", to).await;
        assert_eq!(s, 200, "{v}");
    }
    let manual = || {
        slow.got
            .lock()
            .expect("lock")
            .iter()
            .filter(|v| v["reason"] == "manual")
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(
        eventually(20, || async { manual().len() >= 4 }).await,
        "{:?}",
        manual()
    );
    let got = manual();
    let ids: Vec<&str> = got.iter().map(|v| v["id"].as_str().unwrap_or("")).collect();
    for v in &got {
        assert!(v["id"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
        assert_eq!(v["_idempotency_key"], v["id"], "{v}");
    }
    let to_green: Vec<&str> = got
        .iter()
        .filter(|v| v["to"] == "green")
        .map(|v| v["id"].as_str().unwrap_or(""))
        .collect();
    let to_blue: Vec<&str> = got
        .iter()
        .filter(|v| v["to"] == "blue")
        .map(|v| v["id"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(to_green.len(), 2, "{ids:?}");
    assert_eq!(to_blue.len(), 2, "{ids:?}");
    assert_eq!(to_green[0], to_green[1], "{ids:?}");
    assert_eq!(to_blue[0], to_blue[1], "{ids:?}");
    assert_ne!(to_green[0], to_blue[0], "{ids:?}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_flip_rearms_and_failures_from_before_it_do_not_count() {
    let critical =
        "kind = \"critical_5xx\"\npaths = [\"/api/payments\"]\nabove = 0\nover = \"30s\"\nfor = \"0s\"";
    let r = Rig::start("", &rollback(10, false, &[ERROR_RATE, critical])).await;
    r.green.set_status(500);
    assert_eq!(r.p.get("/api/payments").await.0, 500);
    r.green.set_status(200);
    r.wait_event("auto_rollback", 10).await;
    assert_eq!(r.svc().await["failed_color"], "green");
    // Windows have 1 s slots: let the failure's second pass before flipping again.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // The operator fixed green and flips to it again: armed again, with a clean slate. The
    // payment that failed before this flip is still inside the 30 s window of green's traffic,
    // but it was not traffic of this live period and must not roll back again.
    let (s, v) = r.p.flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    let svc = r.svc().await;
    assert_eq!(svc["armed"], true, "{svc}");
    assert_eq!(svc["failed_color"], Value::Null, "{svc}");
    let t = r.drive();
    tokio::time::sleep(QUIET).await;
    let svc = r.svc().await;
    assert_eq!(
        svc["active"], "green",
        "rolled back again on stale failures: {svc}"
    );
    assert_eq!(r.events("auto_rollback").await.len(), 1);
    assert_eq!(svc["triggers"][1]["state"], "ok", "{svc}");

    // A new failure in this live period does roll back (a new episode).
    r.green.set_status(500);
    assert_eq!(r.p.get("/api/payments").await.0, 500);
    r.green.set_status(200);
    assert!(
        eventually(10, || async { r.events("auto_rollback").await.len() == 2 }).await,
        "{:?}",
        r.p.events().await
    );
    assert_eq!(r.svc().await["active"], "blue");
    assert_eq!(
        r.metric(
            "switchyard_flips_total",
            &[("service", "api"), ("reason", "auto_rollback")]
        )
        .await,
        Some(2.0)
    );
    t.stop().await;
    r.p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_fires_after_watch_for() {
    let section = format!(
        "[services.rollback]\nwatch_for = \"1s\"\nmin_requests = 10\n[[services.rollback.triggers]]\n{ERROR_RATE}\n"
    );
    let r = Rig::start("", &section).await;
    assert!(
        eventually(10, || async { r.svc().await["armed"] == false }).await,
        "{}",
        r.svc().await
    );
    assert_eq!(
        r.metric("switchyard_rollback_armed", &[("service", "api")])
            .await,
        Some(0.0)
    );
    r.green.set_status(500);
    let t = r.drive();
    tokio::time::sleep(QUIET).await;
    // The breach is tracked and shown, but the service is no longer armed.
    assert!(
        eventually(10, || async {
            r.trigger_state(0).await["state"] == "breaching"
        })
        .await,
        "{}",
        r.svc().await
    );
    let svc = r.svc().await;
    assert_eq!(svc["active"], "green", "{svc}");
    assert!(r.events("auto_rollback").await.is_empty());
    t.stop().await;
    r.p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_begun_in_an_earlier_live_period_does_not_count_in_the_next() {
    // A request to green that times out (a failure on a critical path) after green went live
    // again: it was routed in green's previous live period, and must not roll the new one back.
    let head =
        "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\nrequest_timeout = \"4s\"\n";
    let critical =
        "kind = \"critical_5xx\"\npaths = [\"/api/payments\"]\nabove = 0\nover = \"30s\"\nfor = \"0s\"";
    let r = Rig::start(head, &rollback(1, false, &[critical])).await;
    r.green.set_delay(60_000);
    let hits = r.green.hits();
    let proxy = r.p.proxy;
    let slow = tokio::spawn(async move { get(proxy, "/api/payments").await });
    assert!(
        eventually(10, || async { r.green.hits() > hits }).await,
        "the slow request never reached green"
    );
    r.green.set_delay(0);
    for to in ["blue", "green"] {
        let (s, v) = r.p.flip("api", to).await;
        assert_eq!(s, 200, "{v}");
    }
    assert!(
        !slow.is_finished(),
        "the slow request ended before green was live again: this run checked nothing"
    );
    for _ in 0..5 {
        assert_eq!(r.p.get("/x").await, (200, "green\n".to_string()));
    }
    let (code, _) = tokio::time::timeout(Duration::from_secs(20), slow)
        .await
        .expect("the slow request ends by request_timeout")
        .expect("join");
    assert_eq!(code, 504);
    tokio::time::sleep(QUIET).await;
    let svc = r.svc().await;
    assert_eq!(
        svc["active"], "green",
        "rolled back on a request of an earlier live period: {svc}"
    );
    assert!(r.events("auto_rollback").await.is_empty());
    assert_eq!(svc["triggers"][0]["state"], "ok", "{svc}");
    // A failure of this live period does count.
    r.green.set_status(500);
    assert_eq!(r.p.get("/api/payments").await.0, 500);
    r.green.set_status(200);
    r.wait_event("auto_rollback", 10).await;
    assert_eq!(r.svc().await["active"], "blue");
    r.p.stop().await;
}
