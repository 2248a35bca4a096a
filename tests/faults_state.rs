//! Faults of the state path, made for real: a real etcd stopped (SIGSTOP/SIGCONT) or killed, a
//! TCP relay between a replica and etcd that delays or black-holes traffic, and the real binary
//! killed with SIGKILL in the middle of flips. Each test checks what the operator was told
//! against what the fleet and the audit log hold.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::etcd::{etcd_state, Etcd};
use common::relay::{Mode, Relay};
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;

fn etcd_body(endpoint: &str, prefix: &str, extra_state: &str, services: &str) -> String {
    etcd_state(endpoint, prefix, &format!("{extra_state}\n{services}"))
}

async fn active_of(p: &TestProxy, svc: &str) -> (String, u64) {
    let s = p.service_status(svc).await;
    (
        s["active"].as_str().unwrap_or("").to_string(),
        s["generation"].as_u64().unwrap_or(u64::MAX),
    )
}

async fn converged(ps: &[&TestProxy], color: &str, generation: u64, secs: u64) -> bool {
    eventually(secs, || async {
        for p in ps {
            if active_of(p, "api").await != (color.to_string(), generation) {
                return false;
            }
        }
        true
    })
    .await
}

async fn degraded(p: &TestProxy) -> bool {
    p.status().await["state"]["degraded"] == true
        && get(p.admin, "/metrics")
            .await
            .1
            .contains("switchyard_state_degraded 1")
}

/// The events (from etcd, every replica's) of `reason` for service `svc` at `generation`.
async fn events_at(p: &TestProxy, svc: &str, reason: &str, generation: u64) -> usize {
    p.events()
        .await
        .iter()
        .filter(|e| e["service"] == svc && e["reason"] == reason && e["generation"] == generation)
        .count()
}

/// After a write's answer, the fleet agrees with it: applied -> every replica serves `to` at
/// `generation` and exactly one event records it; not applied -> nobody does, and no event.
async fn fleet_agrees(
    ps: &[&TestProxy],
    answer: &(u16, Value),
    from: &str,
    to: &str,
    generation: u64,
) {
    let (status, body) = answer;
    if *status == 200 {
        assert_eq!(body["changed"], true, "{body}");
        assert_eq!(body["generation"], generation, "{body}");
        assert!(
            converged(ps, to, generation, 10).await,
            "answered applied, but the fleet does not serve it"
        );
        let one = eventually(10, || async {
            events_at(ps[ps.len() - 1], "api", "manual", generation).await == 1
        })
        .await;
        assert!(one, "{:#?}", ps[0].events().await);
    } else if body["error"]
        .as_str()
        .is_some_and(|m| m.contains("outcome unknown"))
    {
        assert_eq!(*status, 503, "{body}");
        // Once etcd answers again, whatever happened is what every replica serves, and the
        // change has its event exactly when it took effect.
        let settled = eventually(20, || async {
            for p in ps {
                if degraded(p).await {
                    return false;
                }
            }
            true
        })
        .await;
        assert!(settled, "replicas did not resync");
        // What etcd holds decides (read as the last replica reaches etcd, directly, with a store
        // of its own: the replica's would note what it read as seen by its watch): a replica's
        // copy may still be behind, its reads backing off after the stall.
        let config = ps[ps.len() - 1].app().snapshot().config.clone();
        let store = switchyard::StateStore::from_config(&config.state);
        let etcd = store.as_etcd().expect("etcd");
        let mut held = None;
        for _ in 0..20 {
            if let Ok(states) = etcd.read_current().await {
                held = states
                    .get("api")
                    .map(|s| (s.active.to_string(), s.generation));
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let (color, g) = held.expect("etcd answers again");
        assert!(converged(ps, &color, g, 30).await, "replicas disagree");
        if g == generation {
            assert_eq!(color, to);
            let one = eventually(10, || async {
                events_at(ps[ps.len() - 1], "api", "manual", generation).await == 1
            })
            .await;
            assert!(one, "{:#?}", ps[0].events().await);
        } else {
            assert_eq!((color.as_str(), g), (from, generation - 1));
            assert_eq!(events_at(ps[0], "api", "manual", generation).await, 0);
        }
    } else {
        assert_eq!(*status, 503, "{body}");
        let msg = body["error"].as_str().unwrap_or("");
        assert!(msg.contains("not applied"), "{body}");
        // Give a late commit every chance to show up: it must not.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            converged(ps, from, generation - 1, 10).await,
            "answered not applied, but it went live"
        );
        for p in ps {
            assert_eq!(events_at(p, "api", "manual", generation).await, 0);
        }
    }
}

/// Flips `api` to `to` through the admin listener at `admin`, in a task of its own: the test
/// holds etcd's answer back meanwhile, then reads the answer.
fn spawn_flip(admin: SocketAddr, to: &'static str) -> tokio::task::JoinHandle<(u16, Value)> {
    tokio::spawn(async move {
        admin_post(
            admin,
            "/api/services/api/flip",
            Some(TOKEN),
            Some(json!({ "to": to })),
        )
        .await
    })
}

/// Two replicas of `api` (blue and green test upstreams) sharing etcd under `prefix`: A reaches
/// etcd through a relay the test controls, B directly. Bind every part where it is used (a
/// `_name` at least): dropping one stops what it holds.
async fn over_relay(
    prefix: &str,
    state: &str,
) -> (
    tempfile::TempDir,
    Etcd,
    Relay,
    [Arc<TestUpstream>; 2],
    TestProxy,
    TestProxy,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let relay = Relay::start(etcd.addr()).await;
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let svc = service("api", &[blue.addr], &[green.addr], "");
    let a = TestProxy::start(&etcd_body(&relay.endpoint(), prefix, state, &svc)).await;
    let b = TestProxy::start(&etcd_body(&etcd.endpoint(), prefix, state, &svc)).await;
    (dir, etcd, relay, [blue, green], a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_delayed_past_the_timeout_is_reported_applied_with_its_event() {
    let (_dir, _etcd, relay, _upstreams, a, b) = over_relay(
        "/late/",
        "etcd_timeout = \"2s\"\netcd_progress_interval = \"10s\"",
    )
    .await;
    assert_eq!(a.flip("api", "green").await.0, 200);
    assert!(converged(&[&a, &b], "green", 1, 10).await);

    // Every answer from etcd to A now arrives 3 s late: etcd commits the transaction, but A
    // hears nothing within its 2 s timeout, and its first read-back is answered late too.
    relay.set_mode(Mode::DelayAnswers(Duration::from_millis(3000)));
    let flip = spawn_flip(a.admin, "blue");
    tokio::time::sleep(Duration::from_millis(4500)).await;
    relay.set_mode(Mode::Pass);
    let answer = flip.await.expect("flip task");
    // The transaction committed: A must say so, not "refused".
    assert_eq!(answer.0, 200, "{}", answer.1);
    fleet_agrees(&[&a, &b], &answer, "green", "blue", 2).await;
    assert_eq!(
        active_of(&a, "api").await,
        ("blue".to_string(), 2),
        "A serves what it answered"
    );

    // Both directions late: the request reaches etcd after A gave up and closed its
    // connection. Whatever etcd did with it, A's answer and the fleet agree.
    relay.set_mode(Mode::Delay(Duration::from_millis(3000)));
    let flip = spawn_flip(a.admin, "green");
    tokio::time::sleep(Duration::from_millis(4500)).await;
    relay.set_mode(Mode::Pass);
    let answer = flip.await.expect("flip task");
    eprintln!("delayed both ways: answered {} {}", answer.0, answer.1);
    fleet_agrees(&[&a, &b], &answer, "blue", "green", 3).await;

    // Answers 10 s late: etcd commits at once, but neither the write nor any read-back is
    // answered within A's window. A says "outcome unknown" (not "refused"); when the change
    // reaches A, A records it as its own flip (event and counter), and serves it.
    let (color, generation) = active_of(&a, "api").await;
    let to = if color == "green" { "blue" } else { "green" };
    let counted = flips_of(&a).await;
    relay.set_mode(Mode::DelayAnswers(Duration::from_secs(10)));
    let (s, v) = a.flip("api", to).await;
    assert_eq!(s, 503, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("outcome unknown"),
        "{v}"
    );
    assert_eq!(v["outcome"], "unknown", "{v}");
    relay.set_mode(Mode::Pass);
    assert!(
        converged(&[&a, &b], to, generation + 1, 30).await,
        "the committed change never reached the fleet"
    );
    let recorded = eventually(10, || async { flips_of(&a).await == counted + 1 }).await;
    assert!(recorded, "A never recorded the change it made");
    assert!(a
        .app()
        .events
        .list()
        .iter()
        .any(|e| e.generation == Some(generation + 1) && e.reason.as_str() == "manual"));
    assert_eq!(events_at(&b, "api", "manual", generation + 1).await, 1);
    a.stop().await;
    b.stop().await;
}

/// A flip that etcd commits at once but whose answer reaches A late, after another replica
/// flipped on top of it: when A settles the write, etcd holds B's write, yet A's took effect
/// (B's was made from it). A answers applied (not 409 "retry"), records it (event, counter), and
/// serves what the fleet holds now; the fleet has one event per change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answered_flip_overwritten_since_is_reported_applied_with_its_event() {
    let (_dir, _etcd, relay, _upstreams, a, b) = over_relay(
        "/over/",
        "etcd_timeout = \"2s\"\netcd_progress_interval = \"10s\"",
    )
    .await;
    assert_eq!(a.flip("api", "green").await.0, 200);
    assert!(converged(&[&a, &b], "green", 1, 10).await);
    let counted = flips_of(&a).await;

    // etcd's answers reach A 3 s late: A's flip to blue commits at once, A does not hear it.
    relay.set_mode(Mode::DelayAnswers(Duration::from_millis(3000)));
    let flip = spawn_flip(a.admin, "blue");
    // B sees A's change and flips back on top of it, while A still waits.
    let seen = eventually(5, || async {
        active_of(&b, "api").await == ("blue".to_string(), 2)
    })
    .await;
    assert!(seen, "A's flip never reached B");
    let (s, v) = b.flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    // From now on A's read-backs are answered in time (its flip's own answer stays 3 s late,
    // past its timeout): a fixed wait here left a loaded machine no read-back before A's
    // deadline.
    relay.set_mode(Mode::Pass);

    let (s, v) = flip.await.expect("flip task");
    assert_eq!(s, 200, "A's flip took effect, but A answered {s}: {v}");
    assert_eq!(
        (v["changed"].clone(), v["generation"].clone()),
        (json!(true), json!(2)),
        "{v}"
    );
    // A serves what the fleet holds now: B's flip on top of A's.
    assert!(
        converged(&[&a, &b], "green", 3, 10).await,
        "the replicas do not serve the last change"
    );
    // A recorded its change (event and counter) and the fleet has one event per change.
    let recorded = eventually(10, || async { flips_of(&a).await == counted + 1 }).await;
    assert!(recorded, "A did not count the flip it made");
    assert!(
        a.app()
            .events
            .list()
            .iter()
            .any(|e| e.generation == Some(2) && e.reason.as_str() == "manual"),
        "A did not record the flip it made: {:#?}",
        a.app().events.list()
    );
    for g in [2, 3] {
        assert_eq!(events_at(&b, "api", "manual", g).await, 1, "generation {g}");
    }
    a.stop().await;
    b.stop().await;
}

/// A flip whose outcome stays unknown (etcd's answers never reach A in time) and that another
/// replica flips on top of before A's watch shows it (A's connections are cut, so A sees only
/// the later state when it resyncs): once etcd answers again, A still records the change it made
/// (event and counter), because etcd's history shows it took effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_outcome_replaced_before_the_resync_is_still_recorded() {
    unknown_outcome_replaced_before_the_resync(false).await;
}

/// The same, with etcd's history compacted past the write before A resyncs: the write's event
/// key (stored in the same transaction) says it took effect, so A still records it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_outcome_replaced_and_compacted_before_the_resync_is_still_recorded() {
    unknown_outcome_replaced_before_the_resync(true).await;
}

async fn unknown_outcome_replaced_before_the_resync(compact: bool) {
    let (_dir, etcd, relay, _upstreams, a, b) = over_relay(
        "/unk/",
        // The write and its read-back (4 timeouts) must end well before the 60 s delay.
        "etcd_timeout = \"2s\"\netcd_progress_interval = \"10s\"",
    )
    .await;
    assert_eq!(a.flip("api", "green").await.0, 200);
    assert!(converged(&[&a, &b], "green", 1, 10).await);
    let counted = flips_of(&a).await;

    relay.set_mode(Mode::DelayAnswers(Duration::from_secs(60)));
    let flip = spawn_flip(a.admin, "blue");
    let seen = eventually(5, || async {
        active_of(&b, "api").await == ("blue".to_string(), 2)
    })
    .await;
    assert!(seen, "A's flip never reached B");
    assert_eq!(b.flip("api", "green").await.0, 200);
    let (s, v) = flip.await.expect("flip task");
    assert_eq!(s, 503, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("outcome unknown"),
        "{v}"
    );
    if compact {
        let etcdctl = |args: &[&str]| {
            let out = Command::new("etcdctl")
                .arg(format!("--endpoints={}", etcd.endpoint()))
                .args(args)
                .output()
                .expect("etcdctl");
            assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
            String::from_utf8_lossy(&out.stdout).to_string()
        };
        let status: Value =
            serde_json::from_str(&etcdctl(&["get", "/", "-w", "json"])).expect("etcdctl json");
        let rev = status["header"]["revision"].as_i64().expect("revision");
        etcdctl(&["compact", &rev.to_string(), "--physical"]);
    }
    // A's watch never delivers its own write: its connections go, and it resyncs from a read
    // that shows only B's.
    relay.cut_all();
    relay.set_mode(Mode::Pass);
    assert!(
        converged(&[&a, &b], "green", 3, 20).await,
        "A did not resync"
    );
    let recorded = eventually(10, || async { flips_of(&a).await == counted + 1 }).await;
    assert!(recorded, "A never recorded the change it made");
    assert!(
        a.app()
            .events
            .list()
            .iter()
            .any(|e| e.generation == Some(2) && e.reason.as_str() == "manual"),
        "{:#?}",
        a.app().events.list()
    );
    assert_eq!(events_at(&b, "api", "manual", 2).await, 1);
    a.stop().await;
    b.stop().await;
}

/// The release key, written with a compare-and-swap whose answer comes late while another
/// replica writes on top of it: etcd's history says the write landed, so it is applied (replaced
/// since, with what the key holds now), not lost; a write that another one beat is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answered_release_write_overwritten_since_is_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let relay = Relay::start(etcd.addr()).await;
    let store_of = |endpoint: String| {
        let cfg = switchyard::config::from_toml_str_with_env(
            &format!(
                "{}\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"127.0.0.1:3001\"] }}\ngreen = {{ upstreams = [\"127.0.0.1:3011\"] }}\n",
                // Below the 2.5 s delay with a margin (the late answer must not come in time).
                etcd_body(&endpoint, "/rel/", "etcd_timeout = \"1500ms\"", "")
            ),
            Some(Default::default()),
        )
        .expect("config");
        switchyard::StateStore::from_config(&cfg.state)
    };
    let (a, b) = (store_of(relay.endpoint()), store_of(etcd.endpoint()));
    let (a, b) = (a.as_etcd().expect("etcd"), b.as_etcd().expect("etcd"));
    let first = a
        .cas_release(0, &json!({ "release": null, "write_id": "w-1" }), "w-1")
        .await;
    let rev: i64 = format!("{first:?}")
        .strip_prefix("Applied(")
        .and_then(|r| r.strip_suffix(')'))
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("first write: {first:?}"));

    relay.set_mode(Mode::DelayAnswers(Duration::from_millis(2500)));
    let late = {
        let a = a.clone();
        tokio::spawn(async move {
            a.cas_release(rev, &json!({ "release": null, "write_id": "w-2" }), "w-2")
                .await
        })
    };
    // B sees A's write land and writes on top of it.
    let mut b_rev = 0;
    let landed = eventually(5, || {
        let b = b.clone();
        async move {
            b.read_release()
                .await
                .is_ok_and(|r| r.value.is_some_and(|v| v["write_id"] == "w-2"))
        }
    })
    .await;
    assert!(landed, "A's write never landed");
    if let Ok(r) = b.read_release().await {
        b_rev = r.mod_revision;
    }
    let over = b
        .cas_release(b_rev, &json!({ "release": null, "write_id": "w-3" }), "w-3")
        .await;
    assert!(format!("{over:?}").starts_with("Applied"), "{over:?}");
    // A's read-backs are answered in time from now on (its write's own answer stays late).
    relay.set_mode(Mode::Pass);
    // Applied at B's compare revision, and carrying what etcd holds now (B's newer write), so
    // that A does not take its view of the key back behind B's write.
    let late = format!("{:?}", late.await.expect("task"));
    assert!(
        late.starts_with(&format!("Replaced {{ rev: {b_rev}, now: ")),
        "A's write landed first: {late}"
    );
    assert!(late.contains("w-3") && !late.contains("w-2"), "{late}");
    assert!(
        late.ends_with(&format!("mod_revision: {} }} }}", b_rev + 1)),
        "{late}"
    );

    // A write from the revision B already replaced never lands: lost, with what etcd holds.
    relay.set_mode(Mode::DelayAnswers(Duration::from_millis(2500)));
    let stale = {
        let a = a.clone();
        tokio::spawn(async move {
            a.cas_release(b_rev, &json!({ "release": null, "write_id": "w-4" }), "w-4")
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    relay.set_mode(Mode::Pass);
    let stale = format!("{:?}", stale.await.expect("task"));
    assert!(
        stale.starts_with("Lost") && stale.contains("w-3"),
        "{stale}"
    );
}

/// Two endpoints: the first commits the release write but answers too late, so the same call
/// goes on to the second, whose compare fails because of that very write. That is our write
/// applied, not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_write_committed_through_a_slow_endpoint_is_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let relay = Relay::start(etcd.addr()).await;
    let endpoints = format!("{}\", \"{}", relay.endpoint(), etcd.endpoint());
    let cfg = switchyard::config::from_toml_str_with_env(
        &format!(
            "{}\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"127.0.0.1:3001\"] }}\ngreen = {{ upstreams = [\"127.0.0.1:3011\"] }}\n",
            // Below the 3 s delay with a margin: the first endpoint's answer must come too late.
            etcd_body(&endpoints, "/two/", "etcd_timeout = \"2s\"", "")
        ),
        Some(Default::default()),
    )
    .expect("config");
    let store = switchyard::StateStore::from_config(&cfg.state);
    let a = store.as_etcd().expect("etcd");
    let first = format!(
        "{:?}",
        a.cas_release(0, &json!({ "release": null, "write_id": "w-1" }), "w-1")
            .await
    );
    assert!(first.starts_with("Applied"), "{first}");
    let rev = a.read_release().await.expect("read").mod_revision;
    relay.set_mode(Mode::DelayAnswers(Duration::from_millis(3000)));
    let second = format!(
        "{:?}",
        a.cas_release(rev, &json!({ "release": null, "write_id": "w-2" }), "w-2")
            .await
    );
    relay.set_mode(Mode::Pass);
    assert!(second.starts_with("Applied"), "{second}");
}

/// The same for a flip: the first endpoint commits it but answers too late, the second one's
/// compare fails because of it. A answers applied, with its event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flip_committed_through_a_slow_endpoint_is_applied_with_its_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let relay = Relay::start(etcd.addr()).await;
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let svc = service("api", &[blue.addr], &[green.addr], "");
    let endpoints = format!("{}\", \"{}", relay.endpoint(), etcd.endpoint());
    // Below the 3 s delay with a margin: the first endpoint's answer must come too late.
    let state = "etcd_timeout = \"2s\"\netcd_progress_interval = \"10s\"";
    let a = TestProxy::start(&etcd_body(&endpoints, "/two-flip/", state, &svc)).await;
    assert_eq!(a.flip("api", "green").await.0, 200);
    assert!(converged(&[&a], "green", 1, 10).await);
    relay.set_mode(Mode::DelayAnswers(Duration::from_millis(3000)));
    let (s, v) = a.flip("api", "blue").await;
    relay.set_mode(Mode::Pass);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["generation"], 2, "{v}");
    assert!(converged(&[&a], "blue", 2, 10).await);
    assert_eq!(events_at(&a, "api", "manual", 2).await, 1);
    a.stop().await;
}

/// `switchyard_flips_total{reason="manual",service="api"}` of a replica.
async fn flips_of(p: &TestProxy) -> u64 {
    get(p.admin, "/metrics")
        .await
        .1
        .lines()
        .find(|l| {
            l.starts_with("switchyard_flips_total{")
                && l.contains("reason=\"manual\"")
                && l.contains("service=\"api\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flip_while_etcd_is_stopped_is_answered_with_what_the_fleet_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let svc = service("api", &[blue.addr], &[green.addr], "");
    let state = "etcd_timeout = \"2s\"";
    let a = TestProxy::start(&etcd_body(&etcd.endpoint(), "/stop/", state, &svc)).await;
    let b = TestProxy::start(&etcd_body(&etcd.endpoint(), "/stop/", state, &svc)).await;
    assert!(converged(&[&a, &b], "blue", 0, 10).await);
    // One flip first, so the event lease is granted.
    assert_eq!(a.flip("api", "green").await.0, 200);
    assert!(converged(&[&a, &b], "green", 1, 10).await);

    let mut generation = 1;
    let mut colors = ("green", "blue");
    // Short stalls end within the read-back window (an answer: applied or not applied); the
    // last one outlasts it (outcome unknown, settled by the watch when etcd continues).
    for pause_ms in [2500u64, 4500, 10000] {
        etcd.signal("-STOP");
        let flip = spawn_flip(a.admin, colors.1);
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        etcd.signal("-CONT");
        let answer = flip.await.expect("flip task");
        eprintln!(
            "etcd stopped {pause_ms} ms: answered {} {}",
            answer.0, answer.1
        );
        fleet_agrees(&[&a, &b], &answer, colors.0, colors.1, generation + 1).await;
        if active_of(&a, "api").await.1 == generation + 1 {
            generation += 1;
            colors = (colors.1, colors.0);
        }
        // Both replicas resync after the stall.
        let healed = eventually(20, || async { !degraded(&a).await && !degraded(&b).await }).await;
        assert!(healed, "replicas did not recover");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_watch_is_reported_degraded_and_recovers() {
    let (_dir, etcd, relay, _upstreams, a, b) = over_relay(
        "/stall/",
        "etcd_timeout = \"2s\"\netcd_progress_interval = \"300ms\"",
    )
    .await;
    assert!(converged(&[&a, &b], "blue", 0, 10).await);
    assert!(!degraded(&a).await);

    // Packets between A and etcd silently vanish: A's watch is open but says nothing.
    relay.set_mode(Mode::Blackhole);
    assert!(
        eventually(10, || degraded(&a)).await,
        "a black-holed watch was never reported"
    );
    // The fleet moves on without A.
    assert_eq!(b.flip("api", "green").await.0, 200);
    assert_eq!(active_of(&a, "api").await, ("blue".to_string(), 0));
    relay.set_mode(Mode::Pass);
    assert!(
        eventually(15, || async { !degraded(&a).await }).await,
        "A did not recover"
    );
    assert!(converged(&[&a, &b], "green", 1, 10).await);
    assert_eq!(a.get("/x").await, (200, "green\n".to_string()));

    // etcd itself hangs: both replicas say so, and both recover when it continues.
    etcd.signal("-STOP");
    assert!(
        eventually(10, || async { degraded(&a).await && degraded(&b).await }).await,
        "a hung etcd was never reported"
    );
    etcd.signal("-CONT");
    assert!(
        eventually(15, || async { !degraded(&a).await && !degraded(&b).await }).await,
        "replicas did not recover from a hung etcd"
    );
    // (etcd's first fsync after SIGCONT can outlast the 2 s timeout on a loaded machine: a
    // flip whose outcome that leaves unknown is asked again, and is then applied or found
    // done; generation 2 either way.)
    let flipped = eventually(20, || async { a.flip("api", "blue").await.0 == 200 }).await;
    assert!(flipped, "no flip after etcd continued");
    assert!(converged(&[&a, &b], "blue", 2, 10).await);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_compare_and_swap_applies_the_state_read() {
    let (_dir, _etcd, relay, _upstreams, a, b) = over_relay(
        "/cas/",
        "etcd_timeout = \"2s\"\netcd_progress_interval = \"20s\"",
    )
    .await;
    assert!(converged(&[&a, &b], "blue", 0, 10).await);

    // A's watch goes silent (its open connections are black-holed; new ones pass), so A keeps
    // an old view while B flips.
    relay.freeze_existing();
    assert_eq!(b.flip("api", "green").await.0, 200);
    assert_eq!(b.flip("api", "blue").await.0, 200);
    assert_eq!(active_of(&a, "api").await, ("blue".to_string(), 0));

    // A's flip from its stale view loses the compare-and-swap: 409, and A now serves what etcd
    // holds instead of answering "retry" forever.
    let (s, v) = a.flip("api", "green").await;
    assert_eq!(s, 409, "{v}");
    assert_eq!(active_of(&a, "api").await, ("blue".to_string(), 2), "{v}");
    let (s, v) = a.flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    assert!(converged(&[&a, &b], "green", 3, 10).await);
    a.stop().await;
    b.stop().await;
}

/// Two replicas flip to the same color, one from a stale view: the one that loses the
/// compare-and-swap reads green live and answers 200 "already on green" (no change), as a flip
/// to the live color does, rather than 409; a flip-all to the live color likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_compare_and_swap_to_the_color_now_live_is_nothing_to_do() {
    let (_dir, _etcd, relay, _upstreams, a, b) = over_relay(
        "/cas-same/",
        "etcd_timeout = \"2s\"\netcd_progress_interval = \"20s\"",
    )
    .await;
    assert!(converged(&[&a, &b], "blue", 0, 10).await);
    // A's watch goes silent while B flips to green: A still shows blue.
    relay.freeze_existing();
    assert_eq!(b.flip("api", "green").await.0, 200);
    assert_eq!(active_of(&a, "api").await, ("blue".to_string(), 0));
    let (s, v) = a.flip("api", "green").await;
    assert_eq!((s, &v["changed"]), (200, &json!(false)), "{v}");
    assert_eq!(v["generation"], 1, "{v}");
    assert!(converged(&[&a, &b], "green", 1, 10).await);
    a.stop().await;
    b.stop().await;
}

/// The color a rollback latched as failed on `svc`, as `p` shows it.
async fn latched(p: &TestProxy, svc: &str) -> Value {
    p.service_status(svc).await["failed_color"].clone()
}

/// `POST /api/services/api/rollback` on `p`.
async fn rollback(p: &TestProxy) -> (u16, Value) {
    admin_post(p.admin, "/api/services/api/rollback", Some(TOKEN), None).await
}

/// A flips api to green (`generation`) and B sees it; then A's watch goes silent while B rolls
/// back to blue (latching green): A still shows green. (A's watch stays silent: A learns of
/// later changes by its own writes.)
async fn rolled_back_behind_a(a: &TestProxy, b: &TestProxy, relay: &Relay, generation: u64) {
    assert_eq!(a.flip("api", "green").await.0, 200);
    assert!(converged(&[a, b], "green", generation, 10).await);
    relay.freeze_existing();
    assert_eq!(rollback(b).await.0, 200);
    assert_eq!(active_of(a, "api").await, ("green".to_string(), generation));
}

/// A manual flip that loses its compare-and-swap to a rollback to the same color is not
/// "already on" it: the rollback latched the color it left, which disarms automatic rollback,
/// where the manual flip asked for would have cleared the latch. It answers 409 naming the
/// rollback and the latch (and the fleet stays as the rollback left it); a flip to the live
/// color asked afterwards is the contract's no-op (200), its message naming the latch. A
/// rollback that loses to that same rollback is nothing to do; flip-all as a manual flip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flip_that_lost_to_a_rollback_to_its_color_says_so() {
    let (_dir, _etcd, relay, _upstreams, a, b) = over_relay(
        "/cas-rollback/",
        "etcd_timeout = \"2s\"\netcd_progress_interval = \"20s\"",
    )
    .await;
    rolled_back_behind_a(&a, &b, &relay, 1).await;
    let (s, v) = a.flip("api", "blue").await;
    assert_eq!(
        s, 409,
        "a manual flip reported done over a rollback's latch: {v}"
    );
    let why = v["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("rollback") && why.contains("green is latched as failed"),
        "{v}"
    );
    assert!(converged(&[&a, &b], "blue", 2, 10).await);
    assert_eq!(latched(&a, "api").await, json!("green"));
    assert_eq!(latched(&b, "api").await, json!("green"));
    // Asked again, knowing: the live color, nothing to do, and the latch named.
    let (s, v) = a.flip("api", "blue").await;
    assert_eq!((s, &v["changed"]), (200, &json!(false)), "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains("latched"),
        "{v}"
    );
    assert_eq!(latched(&a, "api").await, json!("green"));

    // A rollback that loses to the same rollback: nothing to do.
    rolled_back_behind_a(&a, &b, &relay, 3).await;
    let (s, v) = rollback(&a).await;
    assert_eq!((s, &v["changed"]), (200, &json!(false)), "{v}");
    assert!(converged(&[&a, &b], "blue", 4, 10).await);

    // Flip-all, a manual flip of every service, likewise refused.
    rolled_back_behind_a(&a, &b, &relay, 5).await;
    let (s, v) = admin_post(
        a.admin,
        "/api/flip",
        Some(TOKEN),
        Some(json!({ "to": "blue" })),
    )
    .await;
    assert_eq!(s, 409, "{v}");
    assert!(converged(&[&a, &b], "blue", 6, 10).await);
    a.stop().await;
    b.stop().await;
}

/// A replica whose watch went silent still shows the color the fleet left. Asked to flip (or
/// flip-all, or pause) to what it shows, it must not answer "already so, nothing to do" from
/// that stale view: the operator would be told the fleet is where it is not, and the flip would
/// be lost. It reads etcd first: the flip then happens, and with etcd unreachable it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_replica_never_answers_nothing_to_do_for_a_fleet_elsewhere() {
    let (_dir, _etcd, relay, _upstreams, a, b) = over_relay(
        "/noop/",
        "etcd_timeout = \"2s\"\netcd_progress_interval = \"20s\"",
    )
    .await;
    assert!(converged(&[&a, &b], "blue", 0, 10).await);

    // A's watch goes silent while B flips: A still shows blue.
    relay.freeze_existing();
    assert_eq!(b.flip("api", "green").await.0, 200);
    assert_eq!(active_of(&a, "api").await, ("blue".to_string(), 0));

    // "Flip to blue" through A: the fleet is on green, so this is a real flip.
    let (s, v) = a.flip("api", "blue").await;
    assert_eq!((s, &v["changed"]), (200, &json!(true)), "{v}");
    assert_eq!(v["generation"], 2, "{v}");
    assert!(converged(&[&a, &b], "blue", 2, 10).await);

    // The same through flip-all.
    relay.freeze_existing();
    assert_eq!(b.flip("api", "green").await.0, 200);
    assert_eq!(active_of(&a, "api").await, ("blue".to_string(), 2));
    let (s, v) = admin_post(
        a.admin,
        "/api/flip",
        Some(TOKEN),
        Some(json!({ "to": "blue" })),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(converged(&[&a, &b], "blue", 4, 10).await, "{v}");

    // Pause: B pauses while A is silent, so A shows automatic rollback running; "resume"
    // through A is not "already resumed" from that view: it resumes the fleet.
    relay.freeze_existing();
    let pause = |p: &TestProxy, what: &str| {
        let (admin, path) = (p.admin, format!("/api/services/api/{what}"));
        async move { admin_post(admin, &path, Some(TOKEN), None).await }
    };
    assert_eq!(pause(&b, "pause").await.0, 200);
    assert_eq!(a.service_status("api").await["paused"], false);
    let (s, v) = pause(&a, "resume").await;
    assert_eq!(s, 200, "{v}");
    let resumed = eventually(10, || async {
        b.service_status("api").await["paused"] == false
    })
    .await;
    assert!(resumed, "A answered {v}, but the fleet stays paused");

    // etcd out of reach: A cannot know, so it refuses instead of answering "nothing to do".
    relay.set_mode(Mode::Blackhole);
    relay.freeze_existing();
    let (s, v) = a.flip("api", "blue").await;
    assert_eq!(s, 503, "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("etcd"), "{v}");
    let (s, v) = pause(&a, "resume").await;
    assert_eq!(s, 503, "{v}");
    a.stop().await;
    b.stop().await;
}

/// etcd may come to hold a lower generation than the replicas served: restored from a backup,
/// or a state written by hand. The replicas serve what etcd holds (as a replica started since
/// does), and flips work from there instead of losing every compare-and-swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_generation_in_etcd_is_what_every_replica_serves() {
    let (_dir, etcd, _relay, _upstreams, a, b) =
        over_relay("/older/", "etcd_timeout = \"2s\"").await;
    for to in ["green", "blue", "green"] {
        let (s, v) = a.flip("api", to).await;
        assert_eq!(s, 200, "{v}");
    }
    assert!(converged(&[&a, &b], "green", 3, 10).await);

    let older = json!({ "active": "blue", "previous": "green", "generation": 1,
        "updated_at": "2026-01-01T00:00:00.000Z", "paused": false, "failed": null });
    let out = Command::new("etcdctl")
        .arg(format!("--endpoints={}", etcd.endpoint()))
        .args(["put", "/older/services/api", &older.to_string()])
        .output()
        .expect("etcdctl");
    assert!(out.status.success(), "{out:?}");
    assert!(
        converged(&[&a, &b], "blue", 1, 10).await,
        "replicas keep serving a color etcd no longer holds: {:?} {:?}",
        active_of(&a, "api").await,
        active_of(&b, "api").await
    );
    assert_eq!(a.get("/x").await, (200, "blue\n".to_string()));
    let (s, v) = a.flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["generation"], 2, "{v}");
    assert!(converged(&[&a, &b], "green", 2, 10).await);
    a.stop().await;
    b.stop().await;
}

/// The lease a replica keeps for its events can vanish (revoked, or etcd restored from a
/// backup older than it). etcd then refuses the whole transaction at once: the flip must not be
/// answered "etcd did not answer in time … not applied"; it goes through with a new lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flip_after_the_event_lease_vanished_goes_through() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let svc = service("api", &[blue.addr], &[green.addr], "");
    let a = TestProxy::start(&etcd_body(&etcd.endpoint(), "/lease/", "", &svc)).await;
    assert_eq!(a.flip("api", "green").await.0, 200);

    let etcdctl = |args: &[&str]| {
        let out = Command::new("etcdctl")
            .arg(format!("--endpoints={}", etcd.endpoint()))
            .args(args)
            .output()
            .expect("etcdctl");
        assert!(out.status.success(), "etcdctl {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let leases: Vec<String> = etcdctl(&["lease", "list"])
        .lines()
        .skip(1)
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    assert!(!leases.is_empty(), "no event lease to revoke");
    for l in &leases {
        etcdctl(&["lease", "revoke", l]);
    }

    let (s, v) = a.flip("api", "blue").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["generation"], 2, "{v}");
    let recorded = eventually(5, || async { events_at(&a, "api", "manual", 2).await == 1 }).await;
    assert!(recorded, "{:#?}", a.events().await);
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_during_an_outage_serves_the_fleet_color() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut etcd = Etcd::start(&dir.path().join("etcd")).await;
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    // The config says blue; the fleet goes green.
    let svc = service("api", &[blue.addr], &[green.addr], "");
    let body = etcd_body(&etcd.endpoint(), "/cache/", "etcd_timeout = \"2s\"", &svc);
    let a = TestProxy::start(&body).await;
    let b = TestProxy::start(&body).await;
    assert_eq!(a.status().await["state"]["source"], "etcd");
    assert_eq!(b.flip("api", "green").await.0, 200);
    assert!(converged(&[&a, &b], "green", 1, 10).await);

    // A restarts while etcd is down.
    let a_dir = a.stop().await;
    etcd.stop();
    let a = TestProxy::start_with(&body, Some(TOKEN), Some(a_dir)).await;
    assert_eq!(a.get("/x").await, (200, "green\n".to_string()));
    let st = a.status().await;
    assert_eq!(st["state"]["source"], "cache", "{st}");
    assert_eq!(active_of(&a, "api").await, ("green".to_string(), 1));
    // Serving the last state it saw: ready.
    assert_eq!(get(a.admin, "/readyz").await, (200, "ready".to_string()));
    // A replica without a cache can only serve the config's colors, and says so; it is alive
    // but not ready (a new pod during an outage must not take traffic to a color the fleet
    // may have rolled back from).
    let fresh = TestProxy::start(&body).await;
    assert_eq!(fresh.status().await["state"]["source"], "config");
    assert_eq!(fresh.get("/x").await, (200, "blue\n".to_string()));
    assert_eq!(get(fresh.admin, "/healthz").await.0, 200);
    let (code, why) = get(fresh.admin, "/readyz").await;
    assert_eq!(code, 503, "{why}");
    assert!(why.contains("config's colors"), "{why}");

    etcd.spawn();
    etcd.wait_ready().await;
    for p in [&a, &fresh] {
        let back = eventually(20, || async {
            p.status().await["state"]["source"] == "etcd" && !degraded(p).await
        })
        .await;
        assert!(back, "replica did not go back to etcd");
    }
    assert!(converged(&[&a, &b, &fresh], "green", 1, 10).await);
    assert_eq!(
        get(fresh.admin, "/readyz").await,
        (200, "ready".to_string())
    );
    a.stop().await;
    b.stop().await;
    fresh.stop().await;
}

/// A webhook receiver: records every JSON body POSTed to it.
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Value>>>,
    stop: tokio_util::sync::CancellationToken,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = tokio_util::sync::CancellationToken::new();
        let (got2, stop2) = (got.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = stop2.cancelled() => return,
                };
                let got = got2.clone();
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let got = got.clone();
                    async move {
                        if let Ok(b) = req.into_body().collect().await {
                            if let Ok(v) = serde_json::from_slice::<Value>(&b.to_bytes()) {
                                got.lock().expect("lock").push(v);
                            }
                        }
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("ok"))))
                    }
                });
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver { addr, got, stop }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flip_all_events_reach_every_replica_and_the_webhooks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let hook = Receiver::start().await;
    let services = format!(
        "[notify]\nwebhooks = [\"http://{}/hook\"]\n{}{}",
        hook.addr,
        service("api", &[blue.addr], &[green.addr], "path_prefix = \"/api\""),
        service("web", &[blue.addr], &[green.addr], "")
    );
    let body = etcd_body(
        &etcd.endpoint(),
        "/all/",
        "etcd_timeout = \"5s\"",
        &services,
    );
    let a = TestProxy::start(&body).await;
    let b = TestProxy::start(&body).await;
    let (s, v) = admin_post(
        a.admin,
        "/api/flip",
        Some(TOKEN),
        Some(json!({"to": "green"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    for p in [&a, &b] {
        for svc in ["api", "web"] {
            let seen = eventually(10, || async { events_at(p, svc, "manual", 1).await == 1 }).await;
            assert!(
                seen,
                "{svc} flip-all event missing: {:#?}",
                p.events().await
            );
        }
    }
    let hooked = eventually(10, || async {
        let got = hook.got.lock().expect("lock").clone();
        ["api", "web"].iter().all(|svc| {
            got.iter()
                .any(|e| e["service"] == *svc && e["reason"] == "manual" && e["generation"] == 1)
        })
    })
    .await;
    assert!(hooked, "{:?}", hook.got.lock().expect("lock"));
    a.stop().await;
    b.stop().await;
}

/// The audit file's events (JSON lines that are events, confirmed ones included via the ring).
fn audit_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("torn line {l:?}: {e}"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_last_line_stale_temp_files_and_rotation() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state.json");
    let audit = dir.path().join("state.events.jsonl");
    let body = format!(
        "[state]\npath = \"{}\"\nevents_max_bytes = 4096\n{}",
        state.display(),
        service("api", &[blue.addr], &[green.addr], "")
    );
    let p = TestProxy::start_with(&body, Some(TOKEN), Some(dir)).await;
    assert_eq!(p.flip("api", "green").await.0, 200);
    let dir = p.stop().await;

    // A crash mid-append left a torn line; a crash mid-write left a temp file.
    let mut torn = std::fs::read(&audit).expect("audit");
    torn.extend_from_slice(br#"{"time":"2026-12-01T10:00:00.000Z","serv"#);
    std::fs::write(&audit, &torn).expect("write");
    let stale = dir.path().join(".state.json.tmp.4242.7");
    std::fs::write(&stale, b"{").expect("write");

    let p = TestProxy::start_with(&body, Some(TOKEN), Some(dir)).await;
    assert!(!stale.exists(), "stale temp file left in place");
    assert_eq!(p.flip("api", "blue").await.0, 200);
    let evs = p.events().await;
    for g in [1, 2] {
        assert_eq!(
            evs.iter()
                .filter(|e| e["generation"] == g && e["reason"] == "manual")
                .count(),
            1,
            "{evs:#?}"
        );
    }
    audit_lines(&audit);

    // Rotation: 4 KiB at most per file, one rotated file kept.
    for i in 0..30 {
        let to = if i % 2 == 0 { "green" } else { "blue" };
        assert_eq!(p.flip("api", to).await.0, 200);
    }
    let rotated = dir_of(&audit).join("state.events.jsonl.1");
    assert!(rotated.exists(), "never rotated");
    let size = std::fs::metadata(&audit).expect("audit").len();
    assert!(size <= 4096, "audit log is {size} bytes");
    audit_lines(&rotated);
    audit_lines(&audit);
    // The newest events survive a restart (read from both files).
    let dir = p.stop().await;
    let p = TestProxy::start_with(&body, Some(TOKEN), Some(dir)).await;
    let evs = p.events().await;
    assert!(
        evs.iter()
            .any(|e| e["generation"] == 32 && e["reason"] == "manual"),
        "{evs:#?}"
    );
    p.stop().await;
}

fn dir_of(p: &std::path::Path) -> std::path::PathBuf {
    p.parent().expect("parent").to_path_buf()
}

/// A flip that reports any failure (the process was killed under it) as None.
async fn try_flip(admin: SocketAddr, to: &str) -> Option<(u16, Value)> {
    let stream = tokio::net::TcpStream::connect(admin).await.ok()?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = http::Request::post("/api/services/api/flip")
        .header("host", admin.to_string())
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(json!({ "to": to }).to_string())))
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
    Some((status, serde_json::from_slice(&body).ok()?))
}

/// The binary's log, beside its config (appended across restarts).
fn log_file(config: &std::path::Path) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(config.with_extension("log"))
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

/// The real binary, file backend, on fixed free ports.
struct Binary {
    child: Child,
}

impl Binary {
    async fn start(config: &std::path::Path, admin: SocketAddr) -> Binary {
        let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["serve", "--config"])
            .arg(config)
            .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file(config))
            .spawn()
            .expect("spawn switchyard");
        let b = Binary { child };
        let up = healthz_within(admin, 20).await;
        if !up {
            let log = std::fs::read_to_string(config.with_extension("log")).unwrap_or_default();
            let tail: String = log
                .chars()
                .rev()
                .take(3000)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            panic!("switchyard did not start:\n{tail}");
        }
        b
    }

    /// SIGKILL, and reaped.
    fn kill9(self) {}
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_any_instant_of_a_flip_leaves_state_and_audit_consistent() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let state = dir.path().join("state.json");
    let config = dir.path().join("switchyard.toml");
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"{proxy}\"\n[admin]\nlisten = \"{admin}\"\n[state]\npath = \"{}\"\n{}",
            state.display(),
            service("api", &[blue.addr], &[green.addr], "")
        ),
    )
    .expect("config");
    let applied = Arc::new(Mutex::new(Vec::<u64>::new()));
    for round in 0..12u64 {
        let bin = Binary::start(&config, admin).await;
        let stop = tokio_util::sync::CancellationToken::new();
        let (applied2, stop2) = (applied.clone(), stop.clone());
        let flipper = tokio::spawn(async move {
            let mut to = if round % 2 == 0 { "green" } else { "blue" };
            while !stop2.is_cancelled() {
                let Some((s, v)) = try_flip(admin, to).await else {
                    continue;
                };
                if s == 200 && v["changed"] == true {
                    if let Some(g) = v["generation"].as_u64() {
                        applied2.lock().expect("lock").push(g);
                    }
                }
                to = if to == "green" { "blue" } else { "green" };
            }
        });
        // Kill at a random moment once the loop is flipping (the machine may be slow to start).
        let before = applied.lock().expect("lock").len();
        let flipping = eventually(20, || async {
            applied.lock().expect("lock").len() > before
        })
        .await;
        assert!(flipping, "no flip was answered in round {round}");
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..300))).await;
        bin.kill9();
        stop.cancel();
        let _ = flipper.await;
    }
    let bin = Binary::start(&config, admin).await;
    let st = admin_get(admin, "/api/status").await.1;
    let svc = st["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == "api").cloned())
        .expect("api");
    let generation = svc["generation"].as_u64().expect("generation");
    let answered = applied.lock().expect("lock").clone();
    eprintln!(
        "{} flips answered applied across 12 kill -9s; final generation {generation}",
        answered.len()
    );
    assert!(answered.len() >= 12, "too few flips: {answered:?}");
    assert!(
        answered.iter().all(|g| *g <= generation),
        "an answered flip was lost"
    );
    // `/api/events` lists the last `RING_CAPACITY` (1000) events: a fast machine answers more
    // flips than that in 12 rounds, so the check covers the generations the list still holds.
    let evs = admin_get(admin, "/api/events").await.1["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let first = if evs.len() < 1000 {
        1
    } else {
        evs.iter()
            .filter_map(|e| e["generation"].as_u64())
            .min()
            .unwrap_or(1)
    };
    assert!(
        generation < 1000 || first > 1,
        "a full list must have dropped the oldest"
    );
    for g in first..=generation {
        let n = evs
            .iter()
            .filter(|e| e["reason"] == "manual" && e["generation"] == g)
            .count();
        assert_eq!(n, 1, "generation {g} has {n} events: {evs:#?}");
    }
    assert!(
        !evs.iter()
            .any(|e| e["generation"].as_u64().unwrap_or(0) > generation),
        "an event for a change that never took effect: {evs:#?}"
    );
    let temps: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
        .collect();
    assert!(temps.is_empty(), "stale temp files: {temps:?}");
    audit_lines(&dir.path().join("state.events.jsonl"));
    let log = std::fs::read_to_string(config.with_extension("log")).unwrap_or_default();
    eprintln!(
        "settled at startup: {} changes that had taken effect, {} that had not; {} torn lines cut, {} temp files removed",
        log.matches("had taken effect").count(),
        log.matches("had not taken effect").count(),
        log.matches("torn last line").count(),
        log.matches("stale temp file").count(),
    );
    bin.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_smoke_test_does_not_delay_another_services_rollback() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let slow_blue = TestUpstream::start("slow-blue").await;
    let slow_green = TestUpstream::start("slow-green").await;
    let body = format!(
        "{}{}",
        service(
            "slow",
            &[slow_blue.addr],
            &[slow_green.addr],
            "hosts = [\"slow.local\"]\nsmoke_paths = [\"/slow\"]"
        ),
        service(
            "api",
            &[blue.addr],
            &[green.addr],
            "[services.rollback]\nwatch_for = \"10m\"\nmin_requests = 1\n\
             [[services.rollback.triggers]]\nkind = \"critical_5xx\"\npaths = [\"/pay\"]\nover = \"10s\"\nfor = \"0s\"\n"
        )
    );
    let p = TestProxy::start(&body).await;
    assert_eq!(p.flip("api", "green").await.0, 200);

    // A flip of `slow` whose smoke test takes 6 s...
    slow_green.set_delay(6000);
    let admin = p.admin;
    let slow_flip = tokio::spawn(async move {
        admin_post(
            admin,
            "/api/services/slow/flip",
            Some(TOKEN),
            Some(json!({"to": "green"})),
        )
        .await
    });
    assert!(
        eventually(5, || async {
            slow_green.hits.load(std::sync::atomic::Ordering::SeqCst) > 0
        })
        .await,
        "the smoke test never started"
    );
    // ...while green of `api` fails a critical path: the rollback must not wait for it.
    green.set_status(500);
    assert_eq!(p.get("/pay").await.0, 500);
    let rolled_back = eventually(10, || async {
        active_of(&p, "api").await.0 == "blue" || slow_flip.is_finished()
    })
    .await;
    assert!(rolled_back);
    assert!(
        !slow_flip.is_finished(),
        "the automatic rollback of api waited for the smoke test of slow"
    );
    assert_eq!(active_of(&p, "api").await, ("blue".to_string(), 2));
    let (s, v) = slow_flip.await.expect("slow flip");
    assert_eq!(s, 200, "{v}");
    assert_eq!(active_of(&p, "slow").await, ("green".to_string(), 1));
    p.stop().await;
}

/// The checks of a flip run outside the writer lock; under it the service is re-read, and a
/// pool that changed while they ran (a reload) is checked again: a flip never goes to a pool
/// its smoke test did not pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_reloaded_during_the_smoke_test_is_checked_again() {
    let blue = TestUpstream::start("blue").await;
    let slow = TestUpstream::start("slow-green").await;
    let broken = TestUpstream::start("broken-green").await;
    broken.set_status(500);
    let config =
        |green: SocketAddr| service("api", &[blue.addr], &[green], "smoke_paths = [\"/check\"]");
    let p = TestProxy::start(&config(slow.addr)).await;
    slow.set_delay(3000);
    let flip = spawn_flip(p.admin, "green");
    let started = eventually(5, || async { slow.hits() > 0 || flip.is_finished() }).await;
    assert!(
        started && !flip.is_finished(),
        "the smoke test never started: {:?}",
        if flip.is_finished() {
            Some(flip.await)
        } else {
            None
        }
    );
    // While it runs, a reload replaces green by an upstream that fails the smoke test.
    let body = full_config(&config(broken.addr), p.dir.as_ref().expect("dir").path());
    std::fs::write(&p.config_path, body).expect("write config");
    p.app().reload("test").await.expect("reload");
    let (s, v) = flip.await.expect("flip task");
    assert_eq!(s, 409, "{v}");
    let msg = v["error"].as_str().unwrap_or("");
    assert!(msg.contains("smoke") && msg.contains("500"), "{v}");
    assert!(broken.hits() > 0, "the new pool was never checked");
    assert_eq!(active_of(&p, "api").await, ("blue".to_string(), 0));
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_silently_lost_its_connection_catches_up() {
    let (_dir, _etcd, relay, _upstreams, a, b) = over_relay(
        "/lag/",
        "etcd_timeout = \"2s\"\netcd_progress_interval = \"300ms\"",
    )
    .await;
    assert!(converged(&[&a, &b], "blue", 0, 10).await);
    // Only the connections open now go silent (A's watch among them); etcd still answers A.
    relay.freeze_existing();
    assert_eq!(b.flip("api", "green").await.0, 200);
    assert!(
        converged(&[&a, &b], "green", 1, 15).await,
        "A never noticed that its watch missed a change"
    );
    assert_eq!(a.get("/x").await, (200, "green\n".to_string()));
    a.stop().await;
    b.stop().await;
}

/// An admin client that goes away while its flip is being written: the change still completes
/// on this replica as one, with its event and counter (the handler is not cancelled halfway
/// through the one commit path).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flip_whose_admin_client_goes_away_mid_write_is_still_recorded() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let relay = Relay::start(etcd.addr()).await;
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let svc = service("api", &[blue.addr], &[green.addr], "");
    // The timeout leaves seconds between it and the relay's 1.5 s delay below, for an etcd
    // that commits slowly on a loaded machine.
    let state = "etcd_timeout = \"6s\"\netcd_progress_interval = \"10s\"";
    let a = TestProxy::start(&etcd_body(&relay.endpoint(), "/gone/", state, &svc)).await;
    // One flip first, so the event lease is granted.
    assert_eq!(a.flip("api", "green").await.0, 200);
    assert!(converged(&[&a], "green", 1, 10).await);
    let counted = flips_of(&a).await;

    // etcd commits at once; its answer reaches A 1.5 s later (within A's etcd_timeout).
    relay.set_mode(Mode::DelayAnswers(Duration::from_millis(1500)));
    let body = r#"{"to":"blue"}"#;
    let req = format!(
        "POST /api/services/api/flip HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {TOKEN}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        a.admin,
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(a.admin)
        .await
        .expect("connect");
    s.write_all(req.as_bytes()).await.expect("write");
    // The client gives up while the write is in flight.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    relay.set_mode(Mode::Pass);

    let reached = converged(&[&a], "blue", 2, 20).await;
    if !reached {
        let out = Command::new("etcdctl")
            .args(["--endpoints", &etcd.endpoint(), "get", "--prefix", "/gone/"])
            .output()
            .expect("etcdctl");
        eprintln!("etcd holds: {}", String::from_utf8_lossy(&out.stdout));
        eprintln!("A: {:?}", active_of(&a, "api").await);
    }
    assert!(reached, "the committed change never reached A");
    let recorded = eventually(10, || async { flips_of(&a).await == counted + 1 }).await;
    assert!(recorded, "A applied a flip it never recorded (counter)");
    assert!(
        a.app()
            .events
            .list()
            .iter()
            .any(|e| e.generation == Some(2) && e.reason.as_str() == "manual"),
        "A applied a flip without its event: {:#?}",
        a.app().events.list()
    );
    a.stop().await;
}

/// The read a replica makes before answering "nothing to do" is a snapshot of one moment; a
/// change its watch brought in while that read was on its way (a pause elsewhere, which keeps
/// the generation) is newer, and the read must not undo it: the replica would serve an
/// unpaused service, and its next write would carry that back to etcd for the whole fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_confirming_read_never_undoes_a_newer_change() {
    let (_dir, _etcd, relay, _upstreams, a, b) = over_relay(
        "/lateread/",
        "etcd_timeout = \"5s\"\netcd_progress_interval = \"30s\"",
    )
    .await;
    // The key exists in etcd (a state never written is no key at all).
    assert_eq!(a.flip("api", "green").await.0, 200);
    assert!(converged(&[&a, &b], "green", 1, 10).await);

    // A's confirming read is answered at once by etcd but reaches A 3 s later.
    relay.set_mode(Mode::DelayAnswers(Duration::from_millis(3000)));
    let flip = spawn_flip(a.admin, "green");
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.set_mode(Mode::Pass);
    // Meanwhile B pauses; A's watch brings it in at once.
    let (s, v) = admin_post(b.admin, "/api/services/api/pause", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{v}");
    assert!(
        eventually(10, || async {
            a.service_status("api").await["paused"] == true
        })
        .await,
        "A never saw the pause"
    );
    let answer = flip.await.expect("flip task");
    assert_eq!(answer.0, 200, "{}", answer.1);
    // The late read came in after the pause: A still serves it paused.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        a.service_status("api").await["paused"],
        true,
        "A undid the pause"
    );
    // And A's next write keeps the pause for the fleet.
    assert_eq!(a.flip("api", "blue").await.0, 200);
    assert!(converged(&[&a, &b], "blue", 2, 10).await);
    assert_eq!(
        b.service_status("api").await["paused"],
        true,
        "the pause was lost"
    );
    a.stop().await;
    b.stop().await;
}

/// A service at the largest generation a state may hold (only an edited state file or etcd
/// key gets there): a flip is refused (409) saying why, and nothing changes; it used to be
/// answered and stored as a state no replica could read back (and, from u64::MAX, wrapped
/// to generation 0).
#[tokio::test]
async fn a_flip_past_the_largest_generation_is_refused_and_nothing_changes() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state.json");
    std::fs::write(
        &state,
        serde_json::json!({"version": 1, "services": {"api": {"active": "blue", "generation": 9007199254740991_u64}}}).to_string(),
    )
    .expect("state");
    let p = TestProxy::start_with(
        &service("api", &[blue.addr], &[green.addr], ""),
        Some(TOKEN),
        Some(dir),
    )
    .await;
    let (s, v) = admin_post(
        p.admin,
        "/api/services/api/flip",
        Some(TOKEN),
        Some(serde_json::json!({"to": "green"})),
    )
    .await;
    assert_eq!(s, 409, "{v}");
    let e = v["error"].as_str().unwrap_or("");
    assert!(e.contains("largest a state may hold"), "{v}");
    assert_eq!(p.get("/").await.1, "blue\n");
    let (s, v) = admin_post(
        p.admin,
        "/api/services/api/flip",
        Some(TOKEN),
        Some(serde_json::json!({"to": "green", "force": true})),
    )
    .await;
    assert_eq!(s, 409, "forced too: {v}");
    let kept = std::fs::read_to_string(&state).expect("state file");
    assert!(kept.contains("9007199254740991"), "{kept}");
    p.stop().await;
}

/// File backend: a state file that cannot be written (here a directory stands where the state
/// file is renamed to; a full disk or an immutable directory alike) refuses every change with a
/// 500 saying nothing was changed, and the backend shows as degraded (`switchyard_state_degraded`
/// 1, `/api/status` `state.degraded`) until a write succeeds: automatic rollbacks cannot be made
/// meanwhile either, which a log line alone would not tell an operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_state_file_shows_the_backend_degraded_until_a_write_succeeds() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&service("api", &[blue.addr], &[green.addr], "")).await;
    let state = p.dir.as_ref().expect("dir").path().join("state.json");
    let degraded = |p: &TestProxy| {
        let admin = p.admin;
        async move {
            let st = admin_get(admin, "/api/status").await.1;
            let m = get(admin, "/metrics").await.1;
            (
                st["state"]["degraded"].clone(),
                m.lines().any(|l| l == "switchyard_state_degraded 1"),
            )
        }
    };
    assert_eq!(degraded(&p).await, (json!(false), false));
    std::fs::remove_file(&state).expect("remove state file");
    std::fs::create_dir(&state).expect("mkdir");
    std::fs::write(state.join("x"), b"x").expect("write");
    let (s, v) = p.flip("api", "green").await;
    assert_eq!(s, 500, "{v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("nothing was changed") || e.contains("cannot write")),
        "{v}"
    );
    assert_eq!(degraded(&p).await, (json!(true), true));
    assert_eq!(p.get("/x").await, (200, "blue\n".to_string()));
    // `ctl status`, where a failed change sends an operator, says so.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["ctl", "--admin", &format!("http://{}", p.admin), "status"])
        .output()
        .await
        .expect("ctl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("STATE DEGRADED: the state file cannot be written"),
        "{text}"
    );
    std::fs::remove_dir_all(&state).expect("rmdir");
    let (s, v) = p.flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(degraded(&p).await, (json!(false), false));
    p.stop().await;
}
