//! Releases shared through a real etcd (Debian's `etcd-server`) by two Switchyard replicas with
//! real upstreams: one release on both, ended by a trigger on the replica that did not start it,
//! and taken over (the bake resuming with the time already spent) when its driver stops.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::etcd::{b64, Etcd};
use common::release::{releases, start_release, two_phases, until_validation_ends_in};
use common::*;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const TRIGGERS: &str = "[services.rollback]\nwatch_for = \"10m\"\nmin_requests = 10\n[[services.rollback.triggers]]\nkind = \"error_rate\"\nabove = 0.5\nover = \"5s\"\nfor = \"1s\"\n";

/// Two services, `api` and `panel` (each its own blue and green upstream, both on blue), their
/// state in `etcd` under `prefix`; heartbeats every 200 ms.
struct Rig {
    ups: [Arc<TestUpstream>; 4],
    body: String,
}

impl Rig {
    /// etcd answers within 3 s (a loaded test machine's etcd can take over a second to fsync).
    async fn new(etcd: &Etcd, prefix: &str) -> Rig {
        Rig::with_timeout(etcd, prefix, "3s").await
    }

    async fn with_timeout(etcd: &Etcd, prefix: &str, timeout: &str) -> Rig {
        let ups = [
            TestUpstream::start("api-blue").await,
            TestUpstream::start("api-green").await,
            TestUpstream::start("panel-blue").await,
            TestUpstream::start("panel-green").await,
        ];
        let body = format!(
            "[state]\nbackend = \"etcd\"\netcd_endpoints = [\"http://127.0.0.1:{}\"]\netcd_prefix = \"{prefix}\"\netcd_timeout = \"{timeout}\"\netcd_progress_interval = \"200ms\"\n{}{}",
            etcd.client,
            service(
                "api",
                &[ups[0].addr],
                &[ups[1].addr],
                &format!("path_prefix = \"/api\"\n{TRIGGERS}")
            ),
            service(
                "panel",
                &[ups[2].addr],
                &[ups[3].addr],
                &format!("path_prefix = \"/panel\"\n{TRIGGERS}")
            ),
        );
        Rig { ups, body }
    }

    /// The config with etcd reached through `relay` (the test delays, black-holes or cuts it).
    fn through(&self, relay: &common::relay::Relay, etcd: &Etcd) -> String {
        let body = self.body.replace(
            &format!("127.0.0.1:{}", etcd.client),
            &relay.addr.to_string(),
        );
        assert_ne!(body, self.body);
        body
    }
}

async fn metric(p: &TestProxy, line_start: &str) -> Option<f64> {
    get(p.admin, "/metrics")
        .await
        .1
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn events_of(p: &TestProxy, reason: &str) -> Vec<Value> {
    p.events()
        .await
        .into_iter()
        .filter(|e| e["reason"] == reason)
        .collect()
}

/// The events of `reason` once at least one is listed (at most 10 s) and the count held for a
/// second: an event goes to etcd in its own task after the change it records, so a replica can
/// show the change first.
async fn events_once_stored(p: &TestProxy, reason: &str) -> Vec<Value> {
    common::events_once_listed(p, reason, 10).await
}

/// Requests on `path` until cancelled.
fn traffic(addr: std::net::SocketAddr, path: &'static str) -> CancellationToken {
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        while !s.is_cancelled() {
            let _ = try_get(addr, path).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    stop
}

/// Waits until `p` shows phase `i` of the current release in `state`.
async fn wait_phase(p: &TestProxy, i: usize, state: &str) {
    let seen = eventually(20, || async {
        releases(p).await["current"]["phases"][i]["state"] == state
    })
    .await;
    assert!(seen, "phase {i} never {state}: {}", releases(p).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_release_and_a_trigger_on_the_other_rolls_back_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let rig = Rig::new(&etcd, "/sy-rel-share/").await;
    let a = TestProxy::start(&rig.body).await;
    let b = TestProxy::start(&rig.body).await;
    let v = start_release(&a, two_phases("1s", "10m", "10m")).await;
    let id = v["release"]["id"].as_str().unwrap_or_default().to_string();
    assert!(!id.is_empty(), "{v}");

    // Replica b, which did not start it, shows the same release, phase and metrics.
    let seen = eventually(20, || async {
        let c = releases(&b).await["current"].clone();
        c["id"] == id.as_str() && c["phase"] == 1 && c["phases"][1]["state"] == "baking"
    })
    .await;
    assert!(seen, "b: {}", releases(&b).await);
    let c = releases(&b).await["current"].clone();
    assert_eq!(c["phases"][0]["state"], "passed", "{c}");
    assert!(
        c["phases"][1]["bake_left_secs"].as_f64().unwrap_or(0.0) > 0.0,
        "{c}"
    );
    assert_eq!(metric(&b, "switchyard_release_phase ").await, Some(1.0));
    assert_eq!(
        metric(&b, "switchyard_release_state{state=\"running\"}").await,
        Some(1.0)
    );
    // One release at a time across the replicas: b refuses a second one, naming the first.
    let (s, v) = admin_post(
        b.admin,
        "/api/releases",
        Some(TOKEN),
        Some(two_phases("1s", "1s", "1s")),
    )
    .await;
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("feature release"),
        "{v}"
    );

    // panel's new color fails; only b sees the traffic, so only b's trigger fires.
    rig.ups[3].set_status(500);
    let load = traffic(b.proxy, "/panel/x");
    for p in [&a, &b] {
        let ended = eventually(30, || async { releases(p).await["current"].is_null() }).await;
        let all = releases(p).await;
        assert!(ended, "{all}");
        assert_eq!(all["recent"][0]["id"], id.as_str(), "{all}");
        assert_eq!(all["recent"][0]["state"], "rolled_back", "{all}");
    }
    load.cancel();
    for p in [&a, &b] {
        let back = eventually(10, || async {
            p.get("/api/x").await.1 == "api-blue\n" && p.get("/panel/x").await.1 == "panel-blue\n"
        })
        .await;
        assert!(back, "both services back on blue: {}", p.status().await);
        assert_eq!(
            metric(p, "switchyard_releases_total{result=\"rolled_back\"}").await,
            Some(1.0)
        );
        assert_eq!(metric(p, "switchyard_release_phase ").await, Some(-1.0));
    }
    // One event, in the history both replicas read, names the trigger and b's service; both
    // services went back in that one step; no service rolled back on its own.
    for p in [&a, &b] {
        let evs = events_once_stored(p, "release_rollback").await;
        assert_eq!(evs.len(), 1, "{evs:#?}");
        let ev = &evs[0];
        assert_eq!(ev["service"], "panel", "{ev}");
        assert_eq!(ev["trigger"]["kind"], "error_rate", "{ev}");
        assert_eq!(ev["trigger"]["threshold"], 0.5, "{ev}");
        let returned = ev["trigger"]["returned"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(returned.len(), 2, "{ev}");
        assert!(events_of(p, "auto_rollback").await.is_empty());
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_driver_is_taken_over_and_the_bake_resumes_with_the_time_spent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let rig = Rig::new(&etcd, "/sy-rel-takeover/").await;
    let a = TestProxy::start(&rig.body).await;
    let b = TestProxy::start(&rig.body).await;
    let gen_before = b.service_status("api").await["generation"]
        .as_u64()
        .unwrap_or(0);
    // The takeover comes ~3.6 s after the driver stops (three 200 ms beats and the 3 s etcd
    // timeout); the 10 s bake leaves seconds after it for "the bake left" on a loaded machine.
    start_release(&a, two_phases("10s", "1s", "1s")).await;
    wait_phase(&b, 0, "baking").await;
    let first = releases(&b).await["current"].clone();
    // The replica that started (and drives) the release stops mid-bake, then comes back.
    let a_dir = a.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let a = TestProxy::start_with(&rig.body, Some(TOKEN), Some(a_dir)).await;
    // The bake goes on where it was (its end unchanged) and the release completes.
    for p in [&a, &b] {
        // (A replica that just started lists the release once it has read it from etcd.)
        let done = eventually(40, || async {
            let all = releases(p).await;
            all["current"].is_null() && all["recent"][0]["id"] == first["id"]
        })
        .await;
        let all = releases(p).await;
        assert!(done, "{all}");
        let end = &all["recent"][0];
        assert_eq!(end["id"], first["id"], "{all}");
        assert_eq!(end["state"], "complete", "{all}");
        assert_eq!(
            end["phases"][0]["bake_ends_at"], first["phases"][0]["bake_ends_at"],
            "{all}"
        );
        assert_eq!(
            end["phases"][0]["started_at"], first["phases"][0]["started_at"],
            "{all}"
        );
    }
    // Taken over once, with part of the bake already spent; each phase advanced once. (Each
    // event reaches etcd in its own task after what it records: b can show the end first.)
    let detail = |e: &Value| e["detail"].as_str().unwrap_or("").to_string();
    eventually(10, || async {
        let details: Vec<String> = events_of(&b, "release_phase")
            .await
            .iter()
            .map(detail)
            .collect();
        let has = |a: &str, b: &str| details.iter().any(|d| d.contains(a) && d.contains(b));
        has("taken over", "")
            && has("phase 0", "flipped in one step")
            && has("phase 1", "flipped in one step")
    })
    .await;
    let phase_events = events_of(&b, "release_phase").await;
    let took: Vec<String> = phase_events
        .iter()
        .map(detail)
        .filter(|d| d.contains("taken over"))
        .collect();
    assert_eq!(took.len(), 1, "{phase_events:#?}");
    assert!(took[0].contains("of the bake left"), "{took:?}");
    for (phase, label) in [
        ("phase 0", "flipped in one step"),
        ("phase 1", "flipped in one step"),
    ] {
        let n = phase_events
            .iter()
            .map(detail)
            .filter(|d| d.contains(phase) && d.contains(label))
            .count();
        assert_eq!(n, 1, "{phase} flipped once: {phase_events:#?}");
    }
    assert_eq!(
        events_once_stored(&b, "release_complete").await.len(),
        1,
        "{:#?} {}",
        b.events()
            .await
            .iter()
            .map(|e| format!("{} {}", e["reason"], e["detail"]))
            .collect::<Vec<_>>(),
        releases(&b).await
    );
    for p in [&a, &b] {
        assert_eq!(p.get("/api/x").await.1, "api-green\n");
        assert_eq!(p.get("/panel/x").await.1, "panel-green\n");
        assert_eq!(
            p.service_status("api").await["generation"].as_u64(),
            Some(gen_before + 1),
            "api flipped exactly once"
        );
        assert_eq!(
            metric(p, "switchyard_releases_total{result=\"complete\"}").await,
            Some(1.0)
        );
    }
    a.stop().await;
    b.stop().await;
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_etcd_does_not_answer_is_not_refused_and_never_leaves_a_half_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let rig = Rig::with_timeout(&etcd, "/sy-rel-unknown/", "1s").await;
    let a = TestProxy::start(&rig.body).await;
    let b = TestProxy::start(&rig.body).await;
    start_release(&a, two_phases("1s", "10m", "10m")).await;
    wait_phase(&b, 1, "baking").await;
    // etcd stops answering (SIGSTOP): an abort on b cannot know whether it was stored.
    let pid = etcd.pid();
    signal(pid, "-STOP");
    let (s, v) = admin_post(
        b.admin,
        "/api/releases/current/abort",
        Some(TOKEN),
        Some(json!({})),
    )
    .await;
    signal(pid, "-CONT");
    assert_eq!(s, 503, "an unknown outcome is not a refusal: {v}");
    assert!(v["error"].as_str().unwrap_or("").contains("unknown"), "{v}");
    // Once etcd answers, either the abort was stored (and then its services are returned), or
    // it was not (the release still runs, and an abort now works): never an ended release
    // with its services left on the new colors.
    let settled = eventually(30, || async {
        let (ra, rb) = (releases(&a).await, releases(&b).await);
        ra["current"]["id"] == rb["current"]["id"]
            && ra["current"]["state"] == rb["current"]["state"]
            && (ra["current"].is_null() || ra["current"]["state"] == "running")
    })
    .await;
    assert!(
        settled,
        "a: {}\nb: {}",
        releases(&a).await,
        releases(&b).await
    );
    if !releases(&b).await["current"].is_null() {
        // etcd has just been woken (1 s timeout, a loaded machine): an abort whose outcome is
        // unknown again answers 503 and is settled like the first; it is asked again.
        let mut answer = (0, Value::Null);
        for _ in 0..10 {
            answer = admin_post(
                b.admin,
                "/api/releases/current/abort",
                Some(TOKEN),
                Some(json!({})),
            )
            .await;
            if answer.0 != 503 || releases(&b).await["current"].is_null() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let (s, v) = answer;
        assert!(
            s == 200 || releases(&b).await["current"].is_null(),
            "{s} {v}"
        );
    }
    for p in [&a, &b] {
        let ended = eventually(20, || async { releases(p).await["current"].is_null() }).await;
        let all = releases(p).await;
        assert!(ended, "{all}");
        assert_eq!(
            all["recent"][0]["state"],
            "aborted",
            "{all}\n{:#?}",
            p.events().await
        );
        let back = eventually(20, || async {
            p.get("/api/x").await.1 == "api-blue\n" && p.get("/panel/x").await.1 == "panel-blue\n"
        })
        .await;
        assert!(back, "both services back on blue: {}", p.status().await);
    }
    assert_eq!(events_once_stored(&b, "release_abort").await.len(), 1);
    a.stop().await;
    b.stop().await;
}

/// An etcd outage longer than three heartbeats is no sign that the driver stopped: the driver
/// keeps driving through it, its staleness counts only time the other replica could read, so
/// nobody takes the release over once etcd answers again, and it completes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_outage_is_not_taken_for_a_stopped_driver() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    // Stale after 0.6 s of beats and the 2 s timeout.
    let rig = Rig::with_timeout(&etcd, "/sy-rel-outage/", "2s").await;
    let a = TestProxy::start(&rig.body).await;
    let b = TestProxy::start(&rig.body).await;
    start_release(&a, two_phases("12s", "1s", "1s")).await;
    wait_phase(&b, 0, "baking").await;
    // etcd is killed (-9) and started again on its data 4 s later.
    let mut etcd = etcd;
    etcd.stop();
    tokio::time::sleep(Duration::from_secs(4)).await;
    etcd.spawn();
    etcd.wait_ready().await;
    for p in [&a, &b] {
        let done = eventually(60, || async {
            let all = releases(p).await;
            all["current"].is_null() && all["recent"][0]["state"] == "complete"
        })
        .await;
        assert!(done, "{}", releases(p).await);
    }
    let phase_events = events_of(&b, "release_phase").await;
    let took: Vec<&Value> = phase_events
        .iter()
        .filter(|e| e["detail"].as_str().unwrap_or("").contains("taken over"))
        .collect();
    assert!(took.is_empty(), "taken over after an outage: {took:#?}");
    assert_eq!(events_once_stored(&b, "release_complete").await.len(), 1);
    a.stop().await;
    b.stop().await;
}

/// A forced flip of a service of the running release, on the replica that drives it, whose
/// write etcd commits but answers too late (outcome unknown, 503): never taken for a refusal.
/// The release pauses (the pause says the outcome is not known) and waits at the end of the
/// bake instead of going on; once the flip shows, a promote is refused while the service is
/// off its release color, and an abort ends the release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_flip_whose_outcome_is_not_known_pauses_the_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let rig = Rig::with_timeout(&etcd, "/sy-rel-forced-unknown/", "1s").await;
    let relay = common::relay::Relay::start(etcd.addr()).await;
    let a = TestProxy::start(&rig.through(&relay, &etcd)).await;
    start_release(&a, two_phases("20s", "1s", "1s")).await;
    wait_phase(&a, 0, "baking").await;
    // With etcd a phase bakes from its claim, before its flip: the forced flip back is meant
    // for a service the phase flipped (one already on blue is confirmed with a read first).
    let flipped = eventually(20, || async { a.get("/api/x").await.1 == "api-green\n" }).await;
    assert!(flipped, "{}", a.status().await);
    // etcd commits at once, but neither the write nor a read-back is answered in time.
    relay.set_mode(common::relay::Mode::DelayAnswers(Duration::from_secs(10)));
    let (s, v) = admin_post(
        a.admin,
        "/api/services/api/flip",
        Some(TOKEN),
        Some(json!({"to": "blue", "force": true})),
    )
    .await;
    relay.set_mode(common::relay::Mode::Pass);
    assert_eq!(s, 503, "an unknown outcome is not a refusal: {v}");
    assert!(v["error"].as_str().unwrap_or("").contains("unknown"), "{v}");
    let paused = releases(&a).await["current"]["paused"].clone();
    let p = paused.as_str().unwrap_or_default();
    assert!(p.contains("forced flip of api"), "{paused}");
    assert!(p.contains("outcome is not known"), "{paused}");
    // The flip took effect: it shows once etcd answers again.
    let moved = eventually(30, || async { a.get("/api/x").await.1 == "api-blue\n" }).await;
    assert!(moved, "{}", a.status().await);
    // Paused: the bake ends and the release waits; phase 1 never flips.
    let waiting = eventually(40, || async {
        let c = releases(&a).await["current"].clone();
        c["state"] == "waiting" && c["phases"][0]["state"] == "waiting"
    })
    .await;
    assert!(waiting, "{}", releases(&a).await);
    assert_eq!(a.get("/panel/x").await.1, "panel-blue\n");
    let (s, v) = admin_post(
        a.admin,
        "/api/releases/current/promote",
        Some(TOKEN),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 409, "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("api was"), "{v}");
    let (s, v) = admin_post(
        a.admin,
        "/api/releases/current/abort",
        Some(TOKEN),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let all = releases(&a).await;
    assert!(all["current"].is_null(), "{all}");
    assert_eq!(all["recent"][0]["state"], "aborted", "{all}");
    assert!(events_of(&a, "release_complete").await.is_empty());
    a.stop().await;
}

/// What a request that writes (or reads) the release history under `prefix` carries: its key
/// in base64, cut to whole 3-byte groups so that it does not depend on the release's id. The
/// first such request after the start-up reads is the completion's own write (the release and
/// its history entry in one transaction).
fn history_key_b64(prefix: &str) -> Vec<u8> {
    let key = format!("{prefix}release_history/");
    b64(&key[..key.len() / 3 * 3]).into_bytes()
}

/// The completion's own write to etcd is committed but answered too late (outcome unknown):
/// the driver reads the key back until etcd answers, finds its write there and records the
/// completion once; a forced flip meanwhile is refused, not landed beside it. (It used to stop
/// driving there: a completion no replica recorded, or, had the write not landed, a release
/// left live in etcd with nobody to end it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_answered_too_late_is_read_back_and_recorded_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let rig = Rig::with_timeout(&etcd, "/sy-rel-complete-unknown/", "1s").await;
    let relay = common::relay::Relay::start(etcd.addr()).await;
    let a = TestProxy::start(&rig.through(&relay, &etcd)).await;
    start_release(&a, two_phases("0s", "0s", "4s")).await;
    let validating = eventually(20, || async {
        releases(&a).await["current"]["state"] == "validating"
    })
    .await;
    assert!(validating, "{}", releases(&a).await);
    // From the completion's own write on (the first request to touch the release history),
    // etcd's answers come 10 s late (it commits at once).
    until_validation_ends_in(&a, Duration::from_secs(1)).await;
    relay.delay_answers_when_sent(
        &history_key_b64("/sy-rel-complete-unknown/"),
        Duration::from_secs(10),
    );
    let sent = eventually(10, || async { relay.delayed_by_pattern() }).await;
    assert!(sent, "no completion written: {}", releases(&a).await);
    // The driver is storing the completion (under the release's lock, the write unanswered)
    // or reading it back. A forced flip of a release service waits for neither: it is refused
    // (503) while the completion is not known, never landing beside it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, v) = admin_post(
        a.admin,
        "/api/services/api/flip",
        Some(TOKEN),
        Some(json!({"to": "blue", "force": true})),
    )
    .await;
    assert_eq!(s, 503, "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("is completing"),
        "{v}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    relay.set_mode(common::relay::Mode::Pass);
    let done = eventually(60, || async {
        let all = releases(&a).await;
        all["current"].is_null() && all["recent"][0]["state"] == "complete"
    })
    .await;
    assert!(done, "{}", releases(&a).await);
    let complete = events_once_stored(&a, "release_complete").await;
    assert_eq!(complete.len(), 1, "{:#?}", a.events().await);
    assert_eq!(a.get("/api/x").await.1, "api-green\n");
    a.stop().await;
}

/// The driver stops while it reads back a completion etcd stored but did not answer: another
/// replica finds the completed release unrecorded once the driver is silent for as long as a
/// stopped driver is, and records its `release_complete` once. (Nobody recorded it before.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_whose_driver_stopped_before_knowing_it_is_recorded_by_another_replica() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let rig = Rig::with_timeout(&etcd, "/sy-rel-complete-stopped/", "1s").await;
    let relay = common::relay::Relay::start(etcd.addr()).await;
    let a = TestProxy::start(&rig.through(&relay, &etcd)).await;
    let b = TestProxy::start(&rig.body).await;
    let id = start_release(&a, two_phases("0s", "0s", "4s")).await["release"]["id"].clone();
    let validating = eventually(20, || async {
        releases(&a).await["current"]["state"] == "validating"
    })
    .await;
    assert!(validating, "{}", releases(&a).await);
    // From the completion's own write on, a's etcd answers come 30 s late (etcd commits at
    // once): a stores the completion and reads it back, never answered. (Set from a time
    // before the window's end instead, a heartbeat landed unanswered first, the completion's
    // compare then failed, and b took the release over and completed it itself.)
    until_validation_ends_in(&a, Duration::from_secs(1)).await;
    relay.delay_answers_when_sent(
        &history_key_b64("/sy-rel-complete-stopped/"),
        Duration::from_secs(30),
    );
    let completed = eventually(30, || async { releases(&b).await["recent"][0]["id"] == id }).await;
    assert!(completed, "{}", releases(&b).await);
    assert!(relay.delayed_by_pattern(), "a's completion was not written");
    assert_eq!(releases(&b).await["recent"][0]["state"], "complete");
    // a stops before any answer comes: it never learnt that its write landed.
    a.stop().await;
    let complete = events_once_stored(&b, "release_complete").await;
    assert_eq!(complete.len(), 1, "{:#?}", b.events().await);
    let detail = complete[0]["detail"].as_str().unwrap_or("");
    assert!(detail.contains("recorded by another replica"), "{detail}");
    assert_eq!(b.get("/api/x").await.1, "api-green\n");
    b.stop().await;
}

/// The driver's completion lands in etcd but its answers come late; meanwhile another replica
/// starts the next release (over the completion's "not recorded yet" mark) and completes it.
/// The first completion is recorded once (by the replica that stored the next release over its
/// mark, or the driver once it reads back its write, whichever first), and the driver, when its
/// answers come, stops: its heartbeat never writes its old release back over the newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_that_learns_late_of_its_completion_never_writes_over_the_next_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let rig = Rig::with_timeout(&etcd, "/sy-rel-complete-late/", "1s").await;
    let relay = common::relay::Relay::start(etcd.addr()).await;
    let a = TestProxy::start(&rig.through(&relay, &etcd)).await;
    let b = TestProxy::start(&rig.body).await;
    let first = start_release(&a, two_phases("0s", "0s", "4s")).await["release"]["id"].clone();
    let validating = eventually(20, || async {
        releases(&a).await["current"]["state"] == "validating"
    })
    .await;
    assert!(validating, "{}", releases(&a).await);
    until_validation_ends_in(&a, Duration::from_secs(1)).await;
    relay.delay_answers_when_sent(
        &history_key_b64("/sy-rel-complete-late/"),
        Duration::from_secs(8),
    );
    let completed = eventually(30, || async {
        releases(&b).await["recent"][0]["id"] == first
    })
    .await;
    assert!(completed, "{}", releases(&b).await);
    assert!(relay.delayed_by_pattern(), "a's completion was not written");
    let seen_complete = tokio::time::Instant::now();
    let second = start_release(&b, two_phases("0s", "0s", "1s")).await["release"]["id"].clone();
    let done = eventually(30, || async {
        let all = releases(&b).await;
        all["current"].is_null() && all["recent"][0]["id"] == second
    })
    .await;
    assert!(done, "{}", releases(&b).await);
    // Long enough for a's own read-back of its write (three etcd timeouts) to give up: a keeps
    // its release, reading the key until etcd answers.
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(seen_complete.elapsed())).await;
    // Meanwhile a start on a is refused, nothing started: the completion it reads back is
    // recorded first.
    let (s, v) = admin_post(
        a.admin,
        "/api/releases",
        Some(TOKEN),
        Some(two_phases("0s", "0s", "0s")),
    )
    .await;
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap_or("").contains("is completing"),
        "{v}"
    );
    relay.set_mode(common::relay::Mode::Pass);
    // a reads its completion back and catches up with the key.
    let caught_up = eventually(40, || async {
        let all = releases(&a).await;
        all["current"].is_null() && all["recent"][0]["id"] == second
    })
    .await;
    assert!(caught_up, "{}", releases(&a).await);
    // Heartbeats of a would come every 200 ms: none takes the key back to the first release.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for p in [&a, &b] {
        let all = releases(p).await;
        assert!(all["current"].is_null(), "{all}");
        assert_eq!(all["recent"][0]["id"], second, "{all}");
        assert_eq!(all["recent"][0]["state"], "complete", "{all}");
        assert_eq!(all["recent"][1]["id"], first, "{all}");
    }
    let complete = events_once_stored(&b, "release_complete").await;
    let of = |id: &Value| {
        let said = format!("({}) complete", id.as_str().unwrap_or("?"));
        complete
            .iter()
            .filter(|e| e["detail"].as_str().unwrap_or("").contains(&said))
            .count()
    };
    assert_eq!(of(&first), 1, "{complete:#?}");
    assert_eq!(of(&second), 1, "{complete:#?}");
    // Nothing holds the next start up.
    let third = start_release(&b, two_phases("0s", "0s", "0s")).await;
    assert!(third["release"]["id"].is_string(), "{third}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promote_on_the_replica_that_does_not_drive_passes_the_manual_gate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let rig = Rig::new(&etcd, "/sy-rel-promote/").await;
    let a = TestProxy::start(&rig.body).await;
    let b = TestProxy::start(&rig.body).await;
    let plan = json!({
        "name": "gated release",
        "validate": "1s",
        "phases": [
            { "name": "backend", "services": ["api"], "bake": "0s", "gate": "manual" },
            { "name": "frontend", "services": ["panel"], "bake": "1s" },
        ]
    });
    let (s, v) = admin_post(a.admin, "/api/releases", Some(TOKEN), Some(plan)).await;
    assert_eq!(s, 200, "{v}");
    let waiting = eventually(20, || async {
        let c = releases(&b).await["current"].clone();
        c["state"] == "waiting" && c["phases"][0]["state"] == "waiting"
    })
    .await;
    assert!(waiting, "b: {}", releases(&b).await);
    // It waits: the second phase does not start by itself.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(releases(&a).await["current"]["phase"], 0);
    assert_eq!(b.get("/panel/x").await.1, "panel-blue\n");
    let (s, v) = admin_post(
        b.admin,
        "/api/releases/current/promote",
        Some(TOKEN),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    for p in [&a, &b] {
        let done = eventually(30, || async {
            let all = releases(p).await;
            all["current"].is_null() && all["recent"][0]["state"] == "complete"
        })
        .await;
        assert!(done, "{}", releases(p).await);
        let green = eventually(10, || async {
            p.get("/api/x").await.1 == "api-green\n" && p.get("/panel/x").await.1 == "panel-green\n"
        })
        .await;
        assert!(green, "{}", p.status().await);
    }
    assert_eq!(events_once_stored(&a, "release_promote").await.len(), 1);
    // A second promote has nothing to pass.
    let (s, _) = admin_post(
        b.admin,
        "/api/releases/current/promote",
        Some(TOKEN),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 409);
    a.stop().await;
    b.stop().await;
}

/// An ended release as every replica must list it: its fields and what they say, but the end
/// times (the replica that ended it keeps its own clock's, the others etcd's, a few ms apart).
fn ended_view(r: &Value) -> Value {
    let mut r = r.clone();
    let mut keys: Vec<String> = r
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    keys.sort();
    assert!(r["ended_at"].is_string(), "{r}");
    r["ended_at"] = Value::Null;
    for p in r["phases"].as_array_mut().into_iter().flatten() {
        p["ended_at"] = Value::Null;
    }
    json!({ "keys": keys, "release": r })
}

/// The ended releases are shared through etcd: a replica started after they ended (or one
/// restarted) lists all of them, newest first, not only the last one the release key holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_releases_are_listed_on_a_replica_started_after_they_ended() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let rig = Rig::new(&etcd, "/sy-rel-history/").await;
    let a = TestProxy::start(&rig.body).await;
    let first = start_release(&a, two_phases("1s", "1s", "1s")).await["release"]["id"].clone();
    let done = eventually(30, || async {
        releases(&a).await["recent"][0]["id"] == first
    })
    .await;
    assert!(done, "{}", releases(&a).await);
    let second = start_release(&a, two_phases("1s", "10m", "10m")).await["release"]["id"].clone();
    wait_phase(&a, 1, "baking").await;
    let (s, v) = admin_post(
        a.admin,
        "/api/releases/current/abort",
        Some(TOKEN),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let ended = eventually(20, || async { releases(&a).await["current"].is_null() }).await;
    let on_a = releases(&a).await["recent"].clone();
    assert!(ended, "{on_a}");
    let ids = |v: &Value| -> Vec<Value> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|r| r["id"].clone())
            .collect()
    };
    assert_eq!(ids(&on_a), vec![second.clone(), first.clone()], "{on_a}");
    assert_eq!(on_a[0]["state"], "aborted", "{on_a}");
    assert_eq!(on_a[1]["state"], "complete", "{on_a}");
    let want: Vec<Value> = on_a
        .as_array()
        .into_iter()
        .flatten()
        .map(ended_view)
        .collect();

    // A replica that was not running when they ended.
    let b = TestProxy::start(&rig.body).await;
    let listed = eventually(20, || async {
        ids(&releases(&b).await["recent"]).len() == 2
    })
    .await;
    let on_b = releases(&b).await;
    assert!(listed, "{on_b}");
    assert!(on_b["current"].is_null(), "{on_b}");
    let got: Vec<Value> = on_b["recent"]
        .as_array()
        .into_iter()
        .flatten()
        .map(ended_view)
        .collect();
    assert_eq!(got, want);

    // The replica that ran them, restarted on its own state directory.
    let state_dir = a.stop().await;
    let a = TestProxy::start_with(&rig.body, Some(TOKEN), Some(state_dir)).await;
    let listed = eventually(20, || async {
        ids(&releases(&a).await["recent"]).len() == 2
    })
    .await;
    let again = releases(&a).await["recent"].clone();
    assert!(listed, "{again}");
    let got: Vec<Value> = again
        .as_array()
        .into_iter()
        .flatten()
        .map(ended_view)
        .collect();
    assert_eq!(got, want);
    a.stop().await;
    b.stop().await;
}

/// Two replicas running: a release ended and the next started on A between two of B's reads
/// of the release key still reaches B's `recent` (from the history in etcd), and a release B
/// ends itself leaves B listing the same releases as A, each once.
#[tokio::test]
async fn replicas_list_the_same_ended_releases_when_ends_and_starts_come_close() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let rig = Rig::new(&etcd, "/sy-rel-history2/").await;
    let a = TestProxy::start(&rig.body).await;
    let b = TestProxy::start(&rig.body).await;
    let ids = |v: &Value| -> Vec<Value> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|r| r["id"].clone())
            .collect()
    };
    let x = start_release(&a, two_phases("10m", "10m", "10m")).await["release"]["id"].clone();
    let seen = eventually(20, || async { releases(&b).await["current"]["id"] == x }).await;
    assert!(seen, "{}", releases(&b).await);
    // X aborted and Y started on A, back to back.
    let (s, v) = admin_post(
        a.admin,
        "/api/releases/current/abort",
        Some(TOKEN),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let y = start_release(&a, two_phases("10m", "10m", "10m")).await["release"]["id"].clone();
    let converged = eventually(20, || async {
        let on_b = releases(&b).await;
        on_b["current"]["id"] == y && ids(&on_b["recent"]) == vec![x.clone()]
    })
    .await;
    assert!(converged, "{}", releases(&b).await);

    // Y aborted on B: both list Y then X, once each.
    let (s, v) = admin_post(
        b.admin,
        "/api/releases/current/abort",
        Some(TOKEN),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    for p in [&a, &b] {
        let both = eventually(20, || async {
            let r = releases(p).await;
            r["current"].is_null() && ids(&r["recent"]) == vec![y.clone(), x.clone()]
        })
        .await;
        assert!(both, "{}", releases(p).await);
    }
    a.stop().await;
    b.stop().await;
}

/// The ended releases are listed in the order etcd stored their ends, not by `ended_at` (each
/// replica's own clock, which can be skewed): two history entries written in one order with
/// `ended_at`s saying the other (as replicas whose clocks disagree store them) are listed newest
/// write first, on a replica that reads them from the history and on one that ends the next
/// release itself; `ended_at` is listed as stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_releases_are_ordered_by_etcd_write_not_by_the_replicas_clocks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let prefix = "/sy-rel-order/";
    let rig = Rig::new(&etcd, prefix).await;
    let a = TestProxy::start(&rig.body).await;
    let ids = |v: &Value| -> Vec<Value> {
        v.as_array()
            .into_iter()
            .flatten()
            .map(|r| r["id"].clone())
            .collect()
    };
    // One real end, for an entry in the stored format.
    let x = start_release(&a, two_phases("10m", "10m", "10m")).await["release"]["id"].clone();
    wait_phase(&a, 0, "baking").await;
    let abort = |p: std::net::SocketAddr| async move {
        let (s, v) = admin_post(
            p,
            "/api/releases/current/abort",
            Some(TOKEN),
            Some(json!({})),
        )
        .await;
        assert_eq!(s, 200, "{v}");
    };
    abort(a.admin).await;
    let hist = format!("{prefix}release_history/");
    let stored = etcd
        .held(&format!("{hist}{}", x.as_str().unwrap_or_default()))
        .await;
    assert_eq!(stored["id"], x, "{stored}");
    // Written first by a replica whose clock runs ahead; then one whose clock is behind.
    for (id, ended_at) in [
        ("r-skew-late-clock", "2099-01-01T00:00:00.000Z"),
        ("r-skew-early-clock", "2001-01-01T00:00:00.000Z"),
    ] {
        let mut v = stored.clone();
        v["id"] = json!(id);
        v["ended_at"] = json!(ended_at);
        etcd.call(
            "/v3/kv/put",
            json!({ "key": b64(&format!("{hist}{id}")), "value": b64(&v.to_string()) }),
        )
        .await;
    }
    let want = vec![
        json!("r-skew-early-clock"),
        json!("r-skew-late-clock"),
        x.clone(),
    ];
    // A replica that reads them from the history.
    let b = TestProxy::start(&rig.body).await;
    let listed = eventually(20, || async {
        ids(&releases(&b).await["recent"]).len() == 3
    })
    .await;
    let on_b = releases(&b).await["recent"].clone();
    assert!(listed, "{on_b}");
    assert_eq!(ids(&on_b), want, "{on_b}");
    assert_eq!(on_b[0]["ended_at"], "2001-01-01T00:00:00.000Z", "{on_b}");
    assert_eq!(on_b[1]["ended_at"], "2099-01-01T00:00:00.000Z", "{on_b}");

    // The next release, ended on B (its clock says before 2099): first on both.
    let z = start_release(&b, two_phases("10m", "10m", "10m")).await["release"]["id"].clone();
    wait_phase(&b, 0, "baking").await;
    abort(b.admin).await;
    let mut want = want;
    want.insert(0, z);
    for p in [&a, &b] {
        let same = eventually(20, || async {
            let r = releases(p).await;
            r["current"].is_null() && ids(&r["recent"]) == want
        })
        .await;
        assert!(same, "{}", releases(p).await);
    }
    a.stop().await;
    b.stop().await;
}

/// A replica whose reads of the release history etcd never answers (only those: the relay
/// black-holes each connection that sends one, its other requests pass) still follows the
/// release key as it changes, and lists the ended release once the history answers again: the
/// history read never holds up the loop that reads the key, beats and takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_read_etcd_does_not_answer_never_delays_following_the_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let rig = Rig::new(&etcd, "/sy-rel-history-stall/").await;
    let a = TestProxy::start(&rig.body).await;
    let abort = |p: std::net::SocketAddr| async move {
        let (s, v) = admin_post(
            p,
            "/api/releases/current/abort",
            Some(TOKEN),
            Some(json!({})),
        )
        .await;
        assert_eq!(s, 200, "{v}");
    };
    // Two ended before B starts: the key holds the second, only the history the first.
    let mut ended = Vec::new();
    for _ in 0..2 {
        let id = start_release(&a, two_phases("10m", "10m", "10m")).await["release"]["id"].clone();
        wait_phase(&a, 0, "baking").await;
        abort(a.admin).await;
        ended.insert(0, id);
    }
    let relay = common::relay::Relay::start(etcd.addr()).await;
    // Only the history's range read sorts by create revision (prune does too, after an end
    // this replica stores; B stores none).
    relay.freeze_when_sent(Some(br#""sort_target":"CREATE""#));
    // A stalled read lasts etcd_timeout: far longer than the waits below.
    let body_b = rig
        .through(&relay, &etcd)
        .replace("etcd_timeout = \"3s\"", "etcd_timeout = \"60s\"");
    assert!(body_b.contains("etcd_timeout = \"60s\""), "{body_b}");
    let b = TestProxy::start(&body_b).await;
    let stalled = eventually(20, || async { relay.frozen_by_pattern() > 0 }).await;
    assert!(stalled, "B never read the history");

    let x = start_release(&a, two_phases("10m", "10m", "10m")).await["release"]["id"].clone();
    let followed = eventually(15, || async { releases(&b).await["current"]["id"] == x }).await;
    assert!(followed, "B never saw the release: {}", releases(&b).await);

    // Ended on A; the history answers again (the stalled connections cut): B lists all three.
    abort(a.admin).await;
    relay.freeze_when_sent(None);
    relay.cut_all();
    ended.insert(0, x);
    let listed = eventually(20, || async {
        let r = releases(&b).await;
        let ids: Vec<Value> = r["recent"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| r["id"].clone())
            .collect();
        r["current"].is_null() && ids == ended
    })
    .await;
    assert!(listed, "{}", releases(&b).await);
    a.stop().await;
    b.stop().await;
}

/// A history read etcd keeps failing is tried again with a growing wait (from the poll
/// interval, doubled each time, up to 30 s), not at every poll: the relay closes every
/// connection that sends one (the other requests pass), and over a 3 s window it sees at most
/// 5 tries (waits of at least 100, 200, 400, 800, 1600 ms between them; a try every 100 ms poll
/// would be some 30). The log says so once: one WARN when the reads start failing, one INFO
/// when one answers again, nothing per try.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_history_read_backs_off_and_logs_once_each_way() {
    // Only the history's range read sorts by create revision (prune does too, after an end
    // this replica stores; it stores none).
    a_failing_read_backs_off_and_logs_once_each_way(
        "/sy-history-backoff/",
        br#""sort_target":"CREATE""#.to_vec(),
        "cannot read the release history from etcd",
        "the release history is read from etcd again",
    )
    .await;
}

/// The same for the read of the release key itself (every half heartbeat while etcd answers):
/// through an outage it is tried again with the same growing wait, not at every poll, and logged
/// once each way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_release_key_read_backs_off_and_logs_once_each_way() {
    use base64::Engine as _;
    let prefix = "/sy-key-backoff/";
    // Only the key's plain read is a range of the key alone (a compare-and-swap names it with
    // a `target`, a read at a past revision with a `revision`); no release runs here.
    let key = base64::engine::general_purpose::STANDARD.encode(format!("{prefix}release"));
    a_failing_read_backs_off_and_logs_once_each_way(
        prefix,
        format!(r#"{{"key":"{key}"}}"#).into_bytes(),
        "cannot read the release from etcd",
        "the release is read from etcd again",
    )
    .await;
}

/// A replica whose etcd connections are closed by a relay when they send `pattern` (one kind of
/// read; the other requests pass): at most 5 such reads in 3 s, then, the relay passing them
/// again, one WARN `failing` and one INFO `again` in its log.
async fn a_failing_read_backs_off_and_logs_once_each_way(
    prefix: &str,
    pattern: Vec<u8>,
    failing: &str,
    again: &str,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let relay = common::relay::Relay::start(etcd.addr()).await;
    relay.cut_when_sent(Some(&pattern));
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let (pp, ap) = (free_port(), free_port());
    let cfg = dir.path().join("switchyard.toml");
    // Heartbeats every 200 ms: the key is read every 100 ms, the first retry after it.
    std::fs::write(
        &cfg,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{pp}\"\nworkers = 1\n[admin]\nlisten = \"127.0.0.1:{ap}\"\n\
             [state]\nbackend = \"etcd\"\npath = \"{}\"\netcd_endpoints = [\"{}\"]\n\
             etcd_prefix = \"{prefix}\"\netcd_timeout = \"3s\"\netcd_progress_interval = \"200ms\"\n{}",
            dir.path().join("state.json").display(),
            relay.endpoint(),
            service("api", &[blue.addr], &[green.addr], "")
        ),
    )
    .expect("write config");
    let log = dir.path().join("switchyard.log");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let read = || String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
    let failing_now = eventually(20, || async { relay.cut_by_pattern() > 0 }).await;
    assert!(failing_now, "never read: {}", read());
    let before = relay.cut_by_pattern();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let tries = relay.cut_by_pattern() - before;
    assert!(tries <= 5, "{tries} reads in 3 s: {}", read());

    // etcd answers again: read on the next try.
    relay.cut_when_sent(None);
    let recovered = eventually(40, || async { read().contains(again) }).await;
    assert!(recovered, "no recovery line: {}", read());
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let text = read();
    let lines = |what: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.contains(what))
            .map(str::to_string)
            .collect()
    };
    let warns = lines(failing);
    assert_eq!(warns.len(), 1, "{text}");
    assert!(warns[0].contains(" WARN "), "{text}");
    let infos = lines(again);
    assert_eq!(infos.len(), 1, "{text}");
    assert!(infos[0].contains(" INFO "), "{text}");
}

/// With etcd the running release and the live colors live together in etcd: `[state] path` is
/// only this replica's cache of the colors, and no release is kept beside it. A replica killed
/// mid-bake whose cache is gone, restarted with `--reset-state`, neither ends the release (as a
/// reset or a missing state file does with the file backend) nor loses its flip: the release is
/// still running, api still on green, no `release_abort` recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_a_restart_without_the_cache_or_with_reset_state_keeps_the_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let (pp, ap) = (free_port(), free_port());
    let cache = dir.path().join("state.json");
    let cfg = dir.path().join("switchyard.toml");
    std::fs::write(
        &cfg,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{pp}\"\nworkers = 1\n[admin]\nlisten = \"127.0.0.1:{ap}\"\n\
             [state]\nbackend = \"etcd\"\npath = \"{}\"\netcd_endpoints = [\"http://127.0.0.1:{}\"]\n\
             etcd_prefix = \"/sy-bin-reset/\"\netcd_timeout = \"3s\"\n{}",
            cache.display(),
            etcd.client,
            service("api", &[blue.addr], &[green.addr], "")
        ),
    )
    .expect("write config");
    let proxy: std::net::SocketAddr = format!("127.0.0.1:{pp}").parse().expect("addr");
    let admin: std::net::SocketAddr = format!("127.0.0.1:{ap}").parse().expect("addr");
    let serve = |reset: bool| {
        let mut args = vec!["serve", "--config", cfg.to_str().expect("utf8")];
        if reset {
            args.push("--reset-state");
        }
        tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(args)
            .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn")
    };
    let mut child = serve(false);
    assert!(serves(proxy, "blue", 20).await, "switchyard did not serve");
    let id = start_baking_release(admin).await;
    assert!(serves(proxy, "green", 20).await);
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    assert!(
        !dir.path().join("state.release.json").exists(),
        "a release file beside the etcd cache"
    );
    let _ = std::fs::remove_file(&cache);

    for reset in [true, false] {
        let mut child = serve(reset);
        assert!(
            serves(proxy, "green", 20).await,
            "reset {reset}: not on green"
        );
        let running = eventually(20, || async {
            let r = admin_get(admin, "/api/releases").await.1;
            r["current"]["id"] == id && r["current"]["phases"][0]["state"] == "baking"
        })
        .await;
        let r = admin_get(admin, "/api/releases").await.1;
        assert!(running, "reset {reset}: {r}");
        let evs = admin_get(admin, "/api/events").await.1;
        assert!(!evs.to_string().contains("release_abort"), "{evs}");
        let _ = child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        let _ = std::fs::remove_file(&cache);
    }
}

async fn event_lines(p: &TestProxy) -> Vec<String> {
    p.events()
        .await
        .iter()
        .map(|e| format!("{} {} {}", e["reason"], e["actor"], e["detail"]))
        .collect()
}

/// Where the first event whose reason is `reason` and whose detail has `part` is, in `events`.
fn position(events: &[Value], reason: &str, part: &str) -> Option<usize> {
    events
        .iter()
        .position(|e| e["reason"] == reason && e["detail"].as_str().unwrap_or("").contains(part))
}

/// A promote sent to the replica that drives the release is stored in etcd before it answers
/// 200: while etcd does not answer, it is 503 (outcome unknown), never a 200 that a takeover
/// would lose. Once stored it passes the gate, and the promote is in the audit log before the
/// phase it passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promote_on_the_driver_is_stored_in_etcd_before_it_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let rig = Rig::with_timeout(&etcd, "/sy-rel-promote-driver/", "1s").await;
    let a = TestProxy::start(&rig.body).await;
    let b = TestProxy::start(&rig.body).await;
    let plan = json!({
        "name": "gated release",
        "validate": "1s",
        "phases": [
            { "name": "backend", "services": ["api"], "bake": "0s", "gate": "manual" },
            { "name": "frontend", "services": ["panel"], "bake": "1s" },
        ]
    });
    start_release(&a, plan).await;
    for p in [&a, &b] {
        let waiting = eventually(20, || async {
            let c = releases(p).await["current"].clone();
            c["state"] == "waiting" && c["phases"][0]["state"] == "waiting"
        })
        .await;
        assert!(waiting, "{}", releases(p).await);
    }
    // etcd stops answering: the driver cannot store the promote, so it does not claim it.
    let pid = etcd.pid();
    signal(pid, "-STOP");
    let (s, v) = admin_post(
        a.admin,
        "/api/releases/current/promote",
        Some(TOKEN),
        Some(json!({})),
    )
    .await;
    signal(pid, "-CONT");
    assert_eq!(s, 503, "a promote etcd did not store is not a 200: {v}");
    assert!(v["error"].as_str().unwrap_or("").contains("unknown"), "{v}");
    // Asked again once etcd answers (unless the first one landed after all and passed).
    let mut last = (0, Value::Null);
    let mut passed = false;
    for _ in 0..60 {
        if releases(&a).await["current"]["phases"][0]["state"] == "passed" {
            passed = true;
            break;
        }
        last = admin_post(
            a.admin,
            "/api/releases/current/promote",
            Some(TOKEN),
            Some(json!({})),
        )
        .await;
        if last.0 == 200 {
            passed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(passed, "{} {}", last.0, last.1);
    for p in [&a, &b] {
        let done = eventually(30, || async {
            let all = releases(p).await;
            all["current"].is_null() && all["recent"][0]["state"] == "complete"
        })
        .await;
        assert!(done, "{}", releases(p).await);
    }
    // The promote that passed the gate comes before "phase 0 passed" (and the start before both).
    // (Each event reaches etcd in its own task after what it records.)
    eventually(10, || async {
        let events = a.events().await;
        position(&events, "release_phase", "phase 0 \"backend\" passed").is_some()
            && position(&events, "release_promote", "promoted at phase 0").is_some()
    })
    .await;
    let events = a.events().await;
    let start = position(&events, "release_start", "started");
    let promoted = position(&events, "release_promote", "promoted at phase 0");
    let passed = position(&events, "release_phase", "phase 0 \"backend\" passed");
    if let (Some(s), Some(pr), Some(pa)) = (start, promoted, passed) {
        assert!(
            (s < pr && pr < pa) || (s > pr && pr > pa),
            "{:#?}",
            events
                .iter()
                .map(|e| format!("{} {}", e["reason"], e["detail"]))
                .collect::<Vec<_>>()
        );
    }
    assert!(passed.is_some(), "{events:#?}");
    a.stop().await;
    b.stop().await;
}

/// etcd stops answering while the driver bakes phase 0: the driver cannot store the phase's
/// end, so nothing moves on where etcd cannot see it (phase 1 never shows `baking` while its
/// service is still on blue); when etcd answers, the driver resumes its own release (or the
/// other replica, reading first, takes it over: never both), and every phase passes and flips
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_cut_off_from_etcd_shows_nothing_it_did_not_store_and_resumes_its_release() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let rig = Rig::with_timeout(&etcd, "/sy-rel-cutoff/", "1s").await;
    let a = TestProxy::start(&rig.body).await;
    let b = TestProxy::start(&rig.body).await;
    // The bake is long enough that etcd stops inside it, after phase 0's flip is recorded and
    // before phase 1's claim (a claim stored just before the stop, its flip not, is shown as
    // stored: phase 1 baking, panel on blue); the sampling below outlasts it.
    start_release(&a, two_phases("6s", "1s", "1s")).await;
    wait_phase(&a, 0, "baking").await;
    // (Events are stored in etcd too: the phase's flip is recorded before etcd stops.)
    let flipped = eventually(20, || async {
        event_lines(&a)
            .await
            .iter()
            .any(|e| e.contains("flipped in one step"))
    })
    .await;
    assert!(flipped, "{:#?}", event_lines(&a).await);
    let all = releases(&a).await;
    let ends = all["current"]["phases"][0]["bake_ends_at"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .unwrap_or_else(|| panic!("{all}"));
    let left = ends
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(
        left >= Duration::from_millis(500),
        "the bake ended before etcd stopped: {all}"
    );
    let pid = etcd.pid();
    signal(pid, "-STOP");
    // Through the outage (longer than the bake, then four etcd timeouts, after which a write's
    // outcome is unknown, and three heartbeats): what
    // the driver shows is what it stored.
    let mut shown = Vec::new();
    for _ in 0..200 {
        let cur = releases(&a).await["current"].clone();
        let panel = a.get("/panel/x").await.1;
        if cur["phases"][1]["state"] == "baking" && panel == "panel-blue\n" {
            shown.push(cur);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    signal(pid, "-CONT");
    assert!(
        shown.is_empty(),
        "phase 1 shown baking, nothing flipped: {shown:#?}"
    );
    for p in [&a, &b] {
        let done = eventually(60, || async {
            let all = releases(p).await;
            all["current"].is_null() && all["recent"][0]["state"] == "complete"
        })
        .await;
        assert!(
            done,
            "{}\na: {:#?}\nb: {:#?}",
            releases(p).await,
            event_lines(&a).await,
            event_lines(&b).await
        );
        // (A replica whose reads of the state are still backing off after the outage serves the
        // stored colors once it reads them.)
        let green = eventually(30, || async {
            p.get("/api/x").await.1 == "api-green\n" && p.get("/panel/x").await.1 == "panel-green\n"
        })
        .await;
        assert!(green, "{}", p.status().await);
    }
    for p in [&a, &b] {
        let phase_events = events_of(p, "release_phase").await;
        let details: Vec<String> = phase_events
            .iter()
            .map(|e| e["detail"].as_str().unwrap_or("").to_string())
            .collect();
        // The driver resumes its release when its reads come back; the other replica may
        // read first and, three heartbeats on, take it over (the driver did stop driving):
        // one or the other, once.
        let handovers = details
            .iter()
            .filter(|d| d.contains("taken over") || d.contains("resumed by the replica"))
            .count();
        assert!(handovers <= 1, "driven by two replicas: {details:#?}");
        for (what, part) in [
            ("phase 0 passed", "phase 0 \"backend\" passed"),
            ("phase 1 passed", "phase 1 \"frontend\" passed"),
            (
                "phase 0 flipped",
                "phase 0 \"backend\": api blue -> green flipped",
            ),
            (
                "phase 1 flipped",
                "phase 1 \"frontend\": panel blue -> green flipped",
            ),
        ] {
            let n = details.iter().filter(|d| d.contains(part)).count();
            assert!(n <= 1, "{what} {n} times: {details:#?}");
        }
    }
    let a_details = || async {
        events_of(&a, "release_phase")
            .await
            .iter()
            .map(|e| e["detail"].as_str().unwrap_or("").to_string())
            .collect::<Vec<String>>()
    };
    let passes = ["phase 0 \"backend\" passed", "phase 1 \"frontend\" passed"];
    // Each event reaches etcd in its own task after what it records: a can show the end first.
    eventually(10, || async {
        let details = a_details().await;
        passes
            .iter()
            .all(|part| details.iter().any(|d| d.contains(part)))
    })
    .await;
    let a_details = a_details().await;
    for part in passes {
        assert_eq!(
            a_details.iter().filter(|d| d.contains(part)).count(),
            1,
            "{part}: {a_details:#?}"
        );
    }
    assert_eq!(events_once_stored(&a, "release_complete").await.len(), 1);
    a.stop().await;
    b.stop().await;
}

/// Two replicas of a rig (bind it: dropping it stops the upstreams): `a` straight to etcd, `b` through a relay that from now on
/// black-holes b's watch, its checks and its full reads of the states (b's copy stays as it is,
/// while the release key, events and single-key writes pass); b checks its watch every 5 s.
async fn replica_behind(
    prefix: &str,
) -> (
    tempfile::TempDir,
    Etcd,
    Rig,
    common::relay::Relay,
    TestProxy,
    TestProxy,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let rig = Rig::new(&etcd, prefix).await;
    let relay = common::relay::Relay::start(etcd.addr()).await;
    let a = TestProxy::start(&rig.body).await;
    let b_body = rig.through(&relay, &etcd).replace(
        "etcd_progress_interval = \"200ms\"",
        "etcd_progress_interval = \"5s\"",
    );
    assert_ne!(b_body, rig.through(&relay, &etcd));
    let b = TestProxy::start(&b_body).await;
    let read = eventually(20, || async {
        b.service_status("api").await["generation"] == 0
    })
    .await;
    assert!(read, "{}", b.status().await);
    // (The pattern first, then every connection of b cut: its pool keeps none that the
    // pattern would not catch, and the watch it opens again is black-holed.)
    relay.freeze_when_sent(Some(b64(&format!("{prefix}services0")).as_bytes()));
    relay.cut_all();
    (dir, etcd, rig, relay, a, b)
}

/// A release started on `a` (phase 0 flips api to green, baking 10 minutes) that `b` follows
/// while its copy of the states stays behind (api on blue); then etcd's states can be read
/// again by b (its watch stays stalled for seconds more): the step under test reads them.
async fn release_b_has_not_seen(relay: &common::relay::Relay, a: &TestProxy, b: &TestProxy) {
    start_release(a, two_phases("10m", "1s", "1s")).await;
    let flipped = eventually(20, || async { a.get("/api/x").await.1 == "api-green\n" }).await;
    assert!(flipped, "{}", a.status().await);
    wait_phase(b, 0, "baking").await;
    assert_eq!(
        b.service_status("api").await["active"],
        "blue",
        "b's copy must be behind for this test: {}",
        b.status().await
    );
    relay.freeze_when_sent(None);
}

/// A release started on a replica whose copy is behind etcd (api flipped to green by hand on
/// another replica; this one still shows blue) starts from etcd's colors: api goes to blue and
/// back to green, not "to green" over a service already there (an abort would then have sent it
/// to blue, a color that was not live when the release began).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_started_on_a_replica_behind_etcd_starts_from_etcds_colors() {
    let (_dir, _etcd, _rig, relay, a, b) = replica_behind("/sy-rel-start-behind/").await;
    assert_eq!(a.flip("api", "green").await.0, 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        b.service_status("api").await["active"],
        "blue",
        "b must be behind"
    );
    relay.freeze_when_sent(None);
    let v = start_release(&b, two_phases("10m", "1s", "1s")).await;
    assert_eq!(v["release"]["pre_release"]["api"], "green", "{v}");
    assert_eq!(v["release"]["phases"][0]["to"], "blue", "{v}");
    for p in [&a, &b] {
        let flipped = eventually(20, || async { p.get("/api/x").await.1 == "api-blue\n" }).await;
        assert!(flipped, "{}", p.status().await);
    }
    a.stop().await;
    b.stop().await;
}

/// A promote on a replica whose copy is behind etcd (it still shows api on blue, which the
/// release flipped to green): passes the gate, checked against etcd, instead of a 409 saying
/// api was moved off its release color "with no record of the change here".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promote_on_a_replica_behind_etcd_is_checked_against_etcd() {
    let (_dir, _etcd, _rig, relay, a, b) = replica_behind("/sy-rel-promote-behind/").await;
    let plan = json!({
        "name": "gated release",
        "validate": "1s",
        "phases": [
            { "name": "backend", "services": ["api"], "bake": "0s", "gate": "manual" },
            { "name": "frontend", "services": ["panel"], "bake": "1s" },
        ]
    });
    start_release(&a, plan).await;
    let waiting = eventually(20, || async {
        releases(&b).await["current"]["phases"][0]["state"] == "waiting"
    })
    .await;
    assert!(waiting, "b: {}", releases(&b).await);
    assert_eq!(
        b.service_status("api").await["active"],
        "blue",
        "b must be behind"
    );
    relay.freeze_when_sent(None);
    let (s, v) = admin_post(
        b.admin,
        "/api/releases/current/promote",
        Some(TOKEN),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let done = eventually(30, || async {
        let all = releases(&a).await;
        all["current"].is_null() && all["recent"][0]["state"] == "complete"
    })
    .await;
    assert!(done, "{}", releases(&a).await);
    a.stop().await;
    b.stop().await;
}

/// A flip of every service on a replica whose copy is behind etcd (it shows api, which the
/// running release flipped to green, still on blue): api is guarded as a service of the release
/// (409 without force), as etcd holds it; from the old copy it escaped the guard and was
/// flipped to blue by the flip, no force asked, the release rolled back for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flip_of_every_service_on_a_replica_behind_etcd_is_guarded() {
    let (_dir, _etcd, _rig, relay, a, b) = replica_behind("/sy-rel-flipall-behind/").await;
    release_b_has_not_seen(&relay, &a, &b).await;
    let (s, v) = admin_post(
        b.admin,
        "/api/flip",
        Some(TOKEN),
        Some(json!({"to": "blue"})),
    )
    .await;
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("part of the running release"),
        "{v}"
    );
    assert_eq!(a.get("/api/x").await.1, "api-green\n");
    assert_eq!(
        releases(&a).await["current"]["phases"][0]["state"],
        "baking"
    );
    a.stop().await;
    b.stop().await;
}

/// An abort on a replica whose copy of the states is behind etcd (its watch stalled: it still
/// shows api on blue, which the release flipped to green): the services go back as etcd holds
/// them. From its old copy api looked back already, was skipped with no write to lose a compare,
/// and stayed on green with the release shown `aborted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_on_a_replica_behind_etcd_returns_what_the_release_flipped() {
    let (_dir, _etcd, _rig, relay, a, b) = replica_behind("/sy-rel-abort-behind/").await;
    release_b_has_not_seen(&relay, &a, &b).await;
    let (s, v) = admin_post(
        b.admin,
        "/api/releases/current/abort",
        Some(TOKEN),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let returned = v["returned"].as_array().cloned().unwrap_or_default();
    assert!(
        returned
            .iter()
            .any(|o| o["service"] == "api" && o["to"] == "blue"),
        "{v}"
    );
    for p in [&a, &b] {
        let back = eventually(20, || async { p.get("/api/x").await.1 == "api-blue\n" }).await;
        assert!(back, "{}", p.status().await);
    }
    a.stop().await;
    b.stop().await;
}

/// A replica whose copy of the states is behind etcd (its watch and its reads of the states
/// black-holed: after an outage they back off longer than the release key's reads) does not
/// take a release over from a stopped driver until it has read the states: from its old copy
/// the phase the driver flipped looked unflipped, it started the phase again, lost the compare
/// and rolled the whole release back for "another replica's change" (a CI run's release ended
/// `rolled_back` so after an etcd outage). Once it reads them, it resumes the bake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_etcd_takes_a_release_over_only_once_it_has_read_the_states() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let prefix = "/sy-rel-behind/";
    let rig = Rig::with_timeout(&etcd, prefix, "1s").await;
    let relay = common::relay::Relay::start(etcd.addr()).await;
    let a = TestProxy::start(&rig.body).await;
    let b = TestProxy::start(&rig.through(&relay, &etcd)).await;
    let both_read = eventually(20, || async {
        b.service_status("api").await["generation"] == 0
            && b.service_status("panel").await["generation"] == 0
    })
    .await;
    assert!(both_read, "{}", b.status().await);
    // Every range over the service keys (the watch, its resyncs, full reads) is black-holed
    // for b; the release key, the events and single-key writes pass.
    let services_end = b64(&format!("{prefix}services0"));
    // (The pattern first, then every connection of b cut: its pool keeps none that the
    // pattern would not catch, and the watch it opens again is black-holed.)
    relay.freeze_when_sent(Some(services_end.as_bytes()));
    relay.cut_all();
    start_release(&a, two_phases("6s", "1s", "1s")).await;
    wait_phase(&b, 0, "baking").await;
    assert_eq!(
        b.service_status("api").await["active"],
        "blue",
        "b's copy must be behind for this test: {}",
        b.status().await
    );
    let id = releases(&b).await["current"]["id"].clone();
    let flipped = eventually(20, || async {
        event_lines(&a)
            .await
            .iter()
            .any(|e| e.contains("flipped in one step"))
    })
    .await;
    assert!(flipped, "{:#?}", event_lines(&a).await);
    // The driver stops mid-bake. Three beats (600 ms) on b would take it over; it does not
    // while it cannot read the states.
    a.stop().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let all = releases(&b).await;
    assert_eq!(all["current"]["id"], id, "{all}");
    assert_eq!(all["current"]["phases"][0]["state"], "baking", "{all}");
    let took = events_of(&b, "release_phase")
        .await
        .iter()
        .filter(|e| e["detail"].as_str().unwrap_or("").contains("taken over"))
        .count();
    assert_eq!(took, 0, "{all}");
    // The states can be read again: b takes the release over where it was and completes it.
    relay.freeze_when_sent(None);
    let ended = eventually(60, || async {
        let all = releases(&b).await;
        all["current"].is_null() && all["recent"][0]["id"] == id
    })
    .await;
    let all = releases(&b).await;
    assert!(ended, "{all}");
    assert_eq!(all["recent"][0]["state"], "complete", "{all}");
    // (Each event reaches etcd in its own task after what it records.)
    let details = || async {
        events_of(&b, "release_phase")
            .await
            .iter()
            .map(|e| e["detail"].as_str().unwrap_or("").to_string())
            .collect::<Vec<String>>()
    };
    let panel_flip = "phase 1 \"frontend\": panel blue -> green flipped";
    eventually(10, || async {
        let d = details().await;
        d.iter().any(|d| d.contains("taken over")) && d.iter().any(|d| d.contains(panel_flip))
    })
    .await;
    let details = details().await;
    let count = |part: &str| details.iter().filter(|d| d.contains(part)).count();
    assert_eq!(count("taken over"), 1, "{details:#?}");
    // Phase 0 flipped once (by a), never started again; phase 1 flipped once.
    assert_eq!(
        count("phase 0 \"backend\": api blue -> green"),
        1,
        "{details:#?}"
    );
    assert_eq!(
        count("phase 0 \"backend\": nothing flipped"),
        0,
        "{details:#?}"
    );
    assert_eq!(count(panel_flip), 1, "{details:#?}");
    let green = eventually(30, || async {
        b.get("/api/x").await.1 == "api-green\n" && b.get("/panel/x").await.1 == "panel-green\n"
    })
    .await;
    assert!(green, "{}", b.status().await);
    b.stop().await;
}
