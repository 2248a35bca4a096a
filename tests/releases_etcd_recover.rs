//! Releases shared through a real etcd by two Switchyard replicas, one of them behind a relay
//! that makes its etcd answers come late (a write commits, its answer comes after
//! `etcd_timeout`): what a replica that takes over, or finds an ended release, must recover.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::etcd::Etcd;
use common::relay::{Mode, Relay};
use common::release::{releases, start_release, two_phases};
use common::*;
use serde_json::json;

/// Two services, `api` and `panel` (each its own blue and green upstream, both on blue), their
/// state in `etcd` under `prefix`; etcd answers within `timeout`, heartbeats every `beat`.
/// `panel_extra`: more keys of `panel`.
struct Rig {
    _ups: [Arc<TestUpstream>; 4],
    body: String,
}

impl Rig {
    async fn new(etcd: &Etcd, prefix: &str, timeout: &str, beat: &str, panel_extra: &str) -> Rig {
        let ups = [
            TestUpstream::start("api-blue").await,
            TestUpstream::start("api-green").await,
            TestUpstream::start("panel-blue").await,
            TestUpstream::start("panel-green").await,
        ];
        let body = format!(
            "[state]\nbackend = \"etcd\"\netcd_endpoints = [\"http://127.0.0.1:{}\"]\netcd_prefix = \"{prefix}\"\netcd_timeout = \"{timeout}\"\netcd_progress_interval = \"{beat}\"\n{}{}",
            etcd.client,
            service("api", &[ups[0].addr], &[ups[1].addr], "path_prefix = \"/api\"\n"),
            service(
                "panel",
                &[ups[2].addr],
                &[ups[3].addr],
                &format!("path_prefix = \"/panel\"\n{panel_extra}")
            ),
        );
        Rig { _ups: ups, body }
    }

    /// The config of a replica whose etcd traffic goes through `relay`.
    fn through(&self, etcd: &Etcd, relay: &Relay) -> String {
        let body = self.body.replace(
            &format!("127.0.0.1:{}", etcd.client),
            &relay.addr.to_string(),
        );
        assert_ne!(body, self.body);
        body
    }
}

async fn event_lines(p: &TestProxy) -> Vec<String> {
    p.events()
        .await
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["reason"].as_str().unwrap_or(""),
                e["detail"].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// The driver's claim of phase 1 is stored in etcd, but its answer comes after `etcd_timeout`:
/// the driver flips nothing and stops driving. The replica that takes the release over finds
/// phase 1 `baking` in etcd with `panel` still on blue: the phase starts again (it flips panel),
/// it never bakes and passes a phase that did not flip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_starts_again_a_claimed_phase_that_never_flipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    // panel's check before its flip takes 2 s (a slow probe): the window between phase 0's pass
    // and phase 1's claim, shorter than a heartbeat (3 s), so the claim is the next write.
    let slow = TestUpstream::start("slow-check").await;
    slow.set_delay(2000);
    let check = format!(
        "[[services.verify]]\nkind = \"probe\"\nurl = \"http://{}/check\"\n",
        slow.addr
    );
    // The timeout stays a second below the 2 s delay of A's answers below.
    let rig = Rig::new(&etcd, "/sy-rel-claim-late/", "1s", "3s", &check).await;
    let relay = Relay::start(etcd.addr()).await;
    let a = TestProxy::start(&rig.through(&etcd, &relay)).await;
    let b = TestProxy::start(&rig.body).await;
    let id = start_release(&a, two_phases("1s", "1s", "1s")).await["release"]["id"].clone();
    // Phase 0 passed on A (stored): from now on A's etcd answers come 2 s late.
    let passed = eventually(30, || async {
        releases(&a).await["current"]["phases"][0]["state"] == "passed"
    })
    .await;
    assert!(passed, "{}", releases(&a).await);
    // panel's check has begun (its first request reached the slow upstream): the claim is the
    // next write, 2 s on. (A fixed wait after seeing `passed` came too late on a loaded
    // machine when the poll saw it late.)
    let checking = tokio::time::timeout(Duration::from_secs(30), async {
        while slow.hits() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        checking.is_ok(),
        "panel's check never began: {}",
        releases(&a).await
    );
    relay.set_mode(Mode::DelayAnswers(Duration::from_millis(2000)));
    // B takes the release over (three heartbeats and the timeout after A's last write).
    let taken = eventually(40, || async {
        event_lines(&b)
            .await
            .iter()
            .any(|e| e.contains("taken over"))
    })
    .await;
    assert!(taken, "{:#?}", event_lines(&b).await);
    relay.set_mode(Mode::Pass);
    for p in [&a, &b] {
        let done = eventually(40, || async {
            let all = releases(p).await;
            all["current"].is_null() && all["recent"][0]["id"] == id
        })
        .await;
        assert!(done, "{}", releases(p).await);
    }
    let all = releases(&b).await;
    let lines = event_lines(&b).await;
    assert_eq!(all["recent"][0]["state"], "complete", "{all}\n{lines:#?}");
    // Completed: so phase 1 flipped panel (once), on every replica.
    let flips = lines
        .iter()
        .filter(|e| e.contains("phase 1 \"frontend\": panel blue -> green flipped"))
        .count();
    assert_eq!(flips, 1, "{lines:#?}");
    for p in [&a, &b] {
        let green = eventually(20, || async {
            p.get("/panel/x").await.1 == "panel-green\n" && p.get("/api/x").await.1 == "api-green\n"
        })
        .await;
        assert!(green, "{}\n{lines:#?}", p.status().await);
    }
    a.stop().await;
    b.stop().await;
}

/// The replica that aborts a release stores its end in etcd, but the answer comes late (503,
/// outcome unknown), and it stops before it learns that the end was stored: the services the
/// release flipped are returned by the other replica (once, with one `release_abort` event),
/// and a replica started later finds them returned and records nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_stored_by_a_replica_that_stops_before_returning_is_returned_by_another() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    // The timeout stays a second below the 3 s delay of A's answers below.
    let rig = Rig::new(&etcd, "/sy-rel-end-orphan/", "2s", "200ms", "").await;
    let relay = Relay::start(etcd.addr()).await;
    let a = TestProxy::start(&rig.through(&etcd, &relay)).await;
    let b = TestProxy::start(&rig.body).await;
    let id = start_release(&a, two_phases("10m", "1s", "1s")).await["release"]["id"].clone();
    let green = eventually(20, || async {
        releases(&b).await["current"]["phases"][0]["state"] == "baking"
            && b.get("/api/x").await.1 == "api-green\n"
    })
    .await;
    assert!(green, "{}", releases(&b).await);
    // A's etcd answers come 3 s late (after its 2 s timeout): its abort is stored, unknown.
    relay.set_mode(Mode::DelayAnswers(Duration::from_millis(3000)));
    let (s, v) = admin_post(
        a.admin,
        "/api/releases/current/abort",
        Some(TOKEN),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 503, "{v}");
    // A stops before etcd's answer reaches it.
    relay.set_mode(Mode::Blackhole);
    relay.cut_all();
    let a_dir = a.stop().await;
    let ended = eventually(20, || async {
        let all = releases(&b).await;
        all["current"].is_null() && all["recent"][0]["id"] == id
    })
    .await;
    assert!(ended, "{}", releases(&b).await);
    assert_eq!(releases(&b).await["recent"][0]["state"], "aborted");
    let back = eventually(20, || async { b.get("/api/x").await.1 == "api-blue\n" }).await;
    assert!(back, "{}\n{:#?}", b.status().await, event_lines(&b).await);
    let aborts = |lines: Vec<String>| {
        lines
            .into_iter()
            .filter(|l| l.starts_with("release_abort"))
            .collect::<Vec<_>>()
    };
    let said = aborts(event_lines(&b).await);
    assert_eq!(said.len(), 1, "{said:#?}");
    // A replica started later (A again, straight to etcd) finds it returned.
    let a = TestProxy::start_with(&rig.body, Some(TOKEN), Some(a_dir)).await;
    // (Until its first read of etcd it serves its own cache, which says green.)
    let read = eventually(20, || async { a.get("/api/x").await.1 == "api-blue\n" }).await;
    assert!(read, "{}", a.status().await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    for p in [&a, &b] {
        assert_eq!(p.get("/api/x").await.1, "api-blue\n");
        assert_eq!(p.get("/panel/x").await.1, "panel-blue\n");
        let said = aborts(event_lines(p).await);
        assert_eq!(said.len(), 1, "{said:#?}");
    }
    // And a new release starts.
    start_release(&b, two_phases("10m", "1s", "1s")).await;
    a.stop().await;
    b.stop().await;
}

/// The replica driving a release stops while it waits at a manual gate: the replica that takes
/// it over says once that it waits for promote (its takeover event), not a second time, and the
/// release goes on at promote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_at_a_manual_gate_says_waiting_for_promote_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let rig = Rig::new(&etcd, "/sy-rel-gate-takeover/", "1s", "200ms", "").await;
    let a = TestProxy::start(&rig.body).await;
    let b = TestProxy::start(&rig.body).await;
    let plan = json!({
        "name": "gated",
        "validate": "1s",
        "phases": [
            { "name": "backend", "services": ["api"], "bake": "1s", "gate": "manual" },
            { "name": "frontend", "services": ["panel"], "bake": "1s" },
        ]
    });
    let id = start_release(&a, plan).await["release"]["id"].clone();
    let waiting = eventually(20, || async {
        releases(&b).await["current"]["state"] == "waiting"
    })
    .await;
    assert!(waiting, "{}", releases(&b).await);
    a.stop().await;
    let taken = eventually(20, || async {
        event_lines(&b)
            .await
            .iter()
            .any(|e| e.contains("taken over"))
    })
    .await;
    assert!(taken, "{:#?}", event_lines(&b).await);
    // Time for a second "waiting" event to be recorded, were it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let lines = event_lines(&b).await;
    let waits: Vec<&String> = lines
        .iter()
        .filter(|e| e.contains("waiting for promote"))
        .collect();
    // The driver's, at its gate; the takeover's.
    assert_eq!(waits.len(), 2, "{lines:#?}");
    assert!(waits[1].contains("taken over"), "{lines:#?}");
    let (s, v) = admin_post(
        b.admin,
        "/api/releases/current/promote",
        Some(TOKEN),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let done = eventually(30, || async {
        let all = releases(&b).await;
        all["current"].is_null() && all["recent"][0]["id"] == id
    })
    .await;
    assert!(done, "{}", releases(&b).await);
    assert_eq!(releases(&b).await["recent"][0]["state"], "complete");
    b.stop().await;
}

/// A start whose answer etcd gives too late (503, outcome unknown) was stored: the release runs
/// (the other replica takes it over, its starter never drove it) with its `release_start` event,
/// recorded once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_answered_unknown_that_was_stored_has_its_start_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    // The timeout stays a second below the 2 s delay of A's answers below.
    let rig = Rig::new(&etcd, "/sy-rel-start-unknown/", "1s", "200ms", "").await;
    let relay = Relay::start(etcd.addr()).await;
    let a = TestProxy::start(&rig.through(&etcd, &relay)).await;
    let b = TestProxy::start(&rig.body).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // From the start's own write on (a transaction; the start first reads the states, a range,
    // in time), A's answers come late.
    relay.delay_answers_when_sent(b"POST /v3/kv/txn", Duration::from_millis(2000));
    let (s, v) = admin_post(
        a.admin,
        "/api/releases",
        Some(TOKEN),
        Some(two_phases("1s", "1s", "1s")),
    )
    .await;
    assert_eq!(s, 503, "{v}");
    let running = eventually(20, || async {
        !releases(&b).await["current"]["id"].is_null()
    })
    .await;
    assert!(running, "the start was not stored: {}", releases(&b).await);
    let id = releases(&b).await["current"]["id"].clone();
    let taken = eventually(20, || async {
        event_lines(&b)
            .await
            .iter()
            .any(|e| e.contains("taken over"))
    })
    .await;
    assert!(taken, "{:#?}", event_lines(&b).await);
    relay.set_mode(Mode::Pass);
    let done = eventually(30, || async {
        let all = releases(&b).await;
        all["current"].is_null() && all["recent"][0]["id"] == id
    })
    .await;
    assert!(done, "{}", releases(&b).await);
    for p in [&a, &b] {
        let lines = event_lines(p).await;
        let starts: Vec<&String> = lines
            .iter()
            .filter(|e| e.starts_with("release_start"))
            .collect();
        assert_eq!(starts.len(), 1, "{lines:#?}");
        assert!(
            starts[0].contains("started: backend [api] -> frontend [panel]"),
            "{lines:#?}"
        );
    }
    a.stop().await;
    b.stop().await;
}

/// Events stored in etcd in the same millisecond (a release's steps often are) are listed in the
/// order they were written, on every replica: not by their keys' random suffixes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_of_the_same_millisecond_are_listed_in_the_order_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let prefix = "/sy-rel-event-order/";
    let rig = Rig::new(&etcd, prefix, "3s", "200ms", "").await;
    let a = TestProxy::start(&rig.body).await;
    // Written as a replica writes them (`<time>-<random>`), the random parts falling in the
    // reverse order of the writes.
    let time = "2026-12-03T07:00:00.123Z";
    for i in 0..12u32 {
        let ev = json!({
            "time": time, "service": "*", "from": null, "to": null,
            "reason": "release_phase", "actor": "release", "detail": format!("step {i}"),
        });
        let key = format!("{prefix}events/{time}-{:08x}", 0xffff_ffff - i);
        etcd.call(
            "/v3/kv/put",
            json!({ "key": common::etcd::b64(&key), "value": common::etcd::b64(&ev.to_string()) }),
        )
        .await;
    }
    let listed: Vec<String> = a
        .events()
        .await
        .iter()
        .filter(|e| e["time"] == time)
        .map(|e| e["detail"].as_str().unwrap_or("").to_string())
        .collect();
    let written: Vec<String> = (0..12).map(|i| format!("step {i}")).collect();
    assert_eq!(listed, written);
    a.stop().await;
}
