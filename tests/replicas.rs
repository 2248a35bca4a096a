//! Several replicas, one truth: three Switchyards sharing their live colors through a real etcd
//! (Debian's `etcd-server`) on loopback ports.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use common::etcd::{b64, etcd_state, Etcd};
use common::relay::{Mode, Relay};
use common::*;
use serde_json::json;

async fn replicas(
    etcd: &Etcd,
    blue: &TestUpstream,
    green: &TestUpstream,
    n: usize,
) -> Vec<TestProxy> {
    let body = etcd_state(
        &etcd.endpoint(),
        "/sy-test/",
        &service("api", &[blue.addr], &[green.addr], ""),
    );
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(TestProxy::start(&body).await);
    }
    out
}

async fn active_of(p: &TestProxy) -> (String, u64) {
    let s = p.service_status("api").await;
    (
        s["active"].as_str().unwrap_or("").to_string(),
        s["generation"].as_u64().unwrap_or(u64::MAX),
    )
}

async fn older_of(p: &TestProxy) -> (String, u64) {
    let s = p.service_status("older").await;
    (
        s["active"].as_str().unwrap_or("").to_string(),
        s["generation"].as_u64().unwrap_or(u64::MAX),
    )
}

async fn converged(ps: &[TestProxy], color: &str, generation: u64, secs: u64) -> bool {
    eventually(secs, || async {
        for p in ps {
            if active_of(p).await != (color.to_string(), generation) {
                return false;
            }
        }
        true
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flip_on_one_replica_reaches_all_and_concurrent_flips_have_one_winner() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    etcd.wait_ready().await;
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let ps = replicas(&etcd, &blue, &green, 3).await;
    assert!(converged(&ps, "blue", 0, 10).await);

    // A flip through one replica's admin reaches the other two.
    let t0 = Instant::now();
    let (s, v) = ps[0].flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    assert!(
        converged(&ps, "green", 1, 10).await,
        "replicas did not converge on green"
    );
    eprintln!("flip propagated to 3 replicas in {:?}", t0.elapsed());
    for p in &ps {
        assert_eq!(p.get("/x").await, (200, "green\n".to_string()));
    }

    // Three replicas flip back at once from the same generation: exactly one wins.
    let flips = ps.iter().map(|p| {
        admin_post(
            p.admin,
            "/api/services/api/flip",
            Some(TOKEN),
            Some(json!({"to": "blue"})),
        )
    });
    let results = futures_join(flips).await;
    let winners = results
        .iter()
        .filter(|(s, v)| *s == 200 && v["changed"] == true)
        .count();
    assert_eq!(winners, 1, "{results:?}");
    for (s, v) in &results {
        assert!(
            *s == 409 || (*s == 200 && (v["changed"] == true || v["changed"] == false)),
            "unexpected answer {s} {v}"
        );
    }
    assert!(
        converged(&ps, "blue", 2, 10).await,
        "generation must be 2 everywhere"
    );

    // Events of every replica are visible from any replica (each replica writes its events to
    // etcd in the background, so give the last write a moment).
    let seen = eventually(10, || async {
        let evs = ps[2].events().await;
        evs.iter().filter(|e| e["reason"] == "manual").count() >= 2
    })
    .await;
    assert!(seen, "{:?}", ps[2].events().await);
    for p in ps {
        p.stop().await;
    }
}

/// Replicas pausing (or resuming) the same service at once all get what they asked for: one
/// stores it, the others find it already done once they have lost the compare (200 "already
/// paused", as a flip another replica made first is nothing to do), never a 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_pausing_at_once_all_answer_paused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    etcd.wait_ready().await;
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let ps = replicas(&etcd, &blue, &green, 3).await;
    assert!(converged(&ps, "blue", 0, 10).await);
    for round in 0..4 {
        for (action, paused) in [("pause", true), ("resume", false)] {
            let calls = ps.iter().map(|p| {
                let (admin, path) = (p.admin, format!("/api/services/api/{action}"));
                async move { admin_post(admin, &path, Some(TOKEN), None).await }
            });
            let results = futures_join(calls).await;
            assert!(
                results.iter().all(|(s, _)| *s == 200),
                "round {round}, {action}: {results:?}"
            );
            let agreed = eventually(10, || async {
                for p in &ps {
                    if p.service_status("api").await["paused"] != paused {
                        return false;
                    }
                }
                true
            })
            .await;
            assert!(
                agreed,
                "round {round}: not every replica shows paused = {paused}"
            );
        }
    }
    for p in ps {
        p.stop().await;
    }
}

async fn futures_join<F>(fs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("join"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_fails_no_request_blocks_flips_and_replicas_converge_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut etcd = Etcd::start(&dir.path().join("etcd")).await;
    etcd.wait_ready().await;
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let ps = Arc::new(replicas(&etcd, &blue, &green, 3).await);
    assert!(converged(&ps, "blue", 0, 10).await);
    let (s, _) = ps[1].flip("api", "green").await;
    assert_eq!(s, 200);
    assert!(converged(&ps, "green", 1, 10).await);

    // Traffic through every replica while etcd goes away.
    let failed = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut load = Vec::new();
    for i in 0..3 {
        let (ps, failed, sent, stop) = (ps.clone(), failed.clone(), sent.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let (s, b) = get(ps[i].proxy, "/x").await;
                sent.fetch_add(1, Ordering::SeqCst);
                if s != 200 || b != "green\n" {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    etcd.stop();
    // The replicas notice, say so, and refuse flips with 503.
    let degraded = eventually(10, || async {
        let m = get(ps[0].admin, "/metrics").await.1;
        m.contains("switchyard_state_degraded 1")
    })
    .await;
    assert!(degraded, "state_degraded never became 1");
    let st = ps[0].status().await;
    assert_eq!(st["state"]["degraded"], true, "{st}");
    let (s, v) = ps[0].flip("api", "blue").await;
    assert_eq!(s, 503, "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("etcd"), "{v}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // etcd comes back: the replicas reconnect by themselves and flips work again.
    etcd.spawn();
    etcd.wait_ready().await;
    let healed = eventually(20, || async {
        let m = get(ps[2].admin, "/metrics").await.1;
        m.contains("switchyard_state_degraded 0")
    })
    .await;
    assert!(healed, "replica did not resync");
    stop.cancel();
    for l in load {
        l.await.expect("load task");
    }
    assert!(sent.load(Ordering::SeqCst) > 50, "too little traffic");
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "requests failed while etcd was down"
    );

    let ok = eventually(20, || async { ps[2].flip("api", "blue").await.0 == 200 }).await;
    assert!(ok, "flip after etcd came back");
    assert!(converged(&ps, "blue", 2, 10).await);
    // Equal generations everywhere, as the metric shows.
    for p in ps.iter() {
        let m = get(p.admin, "/metrics").await.1;
        assert!(
            m.contains("switchyard_state_generation{service=\"api\"} 2"),
            "{m}"
        );
    }
    drop(etcd);
    if let Ok(ps) = Arc::try_unwrap(ps) {
        for p in ps {
            p.stop().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_rolling_back_the_same_release_produce_one_flip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    etcd.wait_ready().await;
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let body = format!(
        "[state]\nbackend = \"etcd\"\netcd_endpoints = [\"{}\"]\netcd_prefix = \"/sy-rb/\"\n{}",
        etcd.endpoint(),
        service(
            "api",
            &[blue.addr],
            &[green.addr],
            "[services.rollback]\nwatch_for = \"10m\"\nmin_requests = 1\n\
             [[services.rollback.triggers]]\nkind = \"critical_5xx\"\npaths = [\"/pay\"]\nover = \"10s\"\nfor = \"0s\"\n"
        )
    );
    let mut ps = Vec::new();
    for _ in 0..3 {
        ps.push(TestProxy::start(&body).await);
    }
    assert!(converged(&ps, "blue", 0, 10).await);
    assert_eq!(ps[0].flip("api", "green").await.0, 200);
    assert!(converged(&ps, "green", 1, 10).await);

    // Green fails a critical path on every replica at once: every engine wants to roll back.
    green.set_status(500);
    let calls = ps.iter().map(|p| {
        let addr = p.proxy;
        async move { get(addr, "/pay").await }
    });
    for (s, _) in futures_join(calls).await {
        assert_eq!(s, 500);
    }
    assert!(
        converged(&ps, "blue", 2, 10).await,
        "one rollback, seen by all"
    );
    // Give the other engines time to try (they evaluate twice a second), then count.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for p in &ps {
        assert_eq!(
            active_of(p).await,
            ("blue".to_string(), 2),
            "no second flip"
        );
    }
    // The winner's event reaches etcd in its own task after the flip it records.
    events_once_listed(&ps[1], "auto_rollback", 10).await;
    let evs = ps[1].events().await;
    let rollbacks = evs
        .iter()
        .filter(|e| e["reason"] == "auto_rollback")
        .count();
    assert_eq!(rollbacks, 1, "{evs:#?}");
    for p in ps {
        p.stop().await;
    }
}

/// What a write-back test runs on: a real etcd, a blue and a green upstream, and the config
/// body of service `name` on them with the etcd backend under `prefix`.
struct WriteBackRig {
    etcd: Etcd,
    body: String,
    _upstreams: [Arc<TestUpstream>; 2],
    _dir: tempfile::TempDir,
}

async fn write_back_rig(prefix: &str, name: &str) -> WriteBackRig {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let body = etcd_state(
        &etcd.endpoint(),
        prefix,
        &service(name, &[blue.addr], &[green.addr], ""),
    );
    WriteBackRig {
        etcd,
        body,
        _upstreams: [blue, green],
        _dir: dir,
    }
}

/// A service key deleted from etcd (by hand, or etcd restored empty) does not split the fleet:
/// the running replicas write it back from the state they serve (create-if-absent: one wins,
/// the others serve what it wrote), so a replica started afterwards, without any cache, reads
/// the same color as the running one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_service_key_is_written_back_and_replicas_stay_on_one_color() {
    let rig = write_back_rig("/sy-absent/", "api").await;
    let (etcd, body) = (&rig.etcd, &rig.body);
    let a = TestProxy::start(body).await;
    let b = TestProxy::start(body).await;
    let (s, v) = a.flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    let ps = vec![a, b];
    assert!(converged(&ps, "green", 1, 10).await);

    let key = "/sy-absent/services/api";
    let deleted = etcd.delete(key).await;
    assert_eq!(deleted["deleted"], "1", "{deleted}");
    // Written back by the running replicas, with the color they serve.
    let back = eventually(20, || async {
        let v = etcd.held(key).await;
        v["active"] == "green" && v["generation"] == 1
    })
    .await;
    assert!(back, "the deleted key was not written back");
    // A replica restarted without its cache reads it: every replica serves green.
    let mut ps = ps;
    let b = ps.pop().expect("b");
    b.stop().await;
    ps.push(TestProxy::start(body).await);
    assert!(
        converged(&ps, "green", 1, 10).await,
        "replicas split: {:?} {:?}",
        active_of(&ps[0]).await,
        active_of(&ps[1]).await
    );
    for p in &ps {
        assert_eq!(p.get("/x").await, (200, "green\n".to_string()));
    }
    for p in ps {
        p.stop().await;
    }
}

/// A replica that missed a flip (its watch broke) and writes a deleted key back first must not
/// undo the flip: the highest generation wins. Here A serves blue (generation 2); the key is
/// deleted while etcd refuses writes (A's write-back fails and is pending), then an older
/// write-back (green, generation 1, tagged as a write-back) lands first. A replaces it (when its
/// pending write-back sees the key, or at its retry), and etcd and A stay on blue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_write_back_of_a_deleted_key_does_not_undo_a_newer_flip() {
    let rig = write_back_rig("/sy-older/", "older").await;
    let (etcd, body) = (&rig.etcd, &rig.body);
    let logs = captured_logs();
    let refusals = || {
        let l = logs
            .lock()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default();
        l.lines()
            .filter(|l| l.contains("service=older") && l.contains("cannot be written back"))
            .count()
    };
    let a = TestProxy::start(body).await;
    let key = "/sy-older/services/older";
    let (s, v) = a.flip("older", "green").await;
    assert_eq!(s, 200, "{v}");
    // The state a replica that missed the next flip would write back.
    let mut older = etcd.held(key).await;
    assert_eq!(older["generation"], 1, "{older}");
    older["write_id"] = json!("write-back-00000000-0000000000000000");
    let (s, v) = a.flip("older", "blue").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(older_of(&a).await, ("blue".to_string(), 2));

    // Delete the key while etcd refuses writes (its NOSPACE alarm, raised through its API), so
    // A's write-back fails, then write the older state back first, as a create-if-absent (when
    // A's retry was first, again).
    let mut first = false;
    for _ in 0..10 {
        let before = refusals();
        etcd.nospace(true).await;
        etcd.delete(key).await;
        let refused = eventually(20, || async { refusals() > before }).await;
        etcd.nospace(false).await;
        assert!(refused, "A's write-back was not refused by etcd");
        let txn = json!({
            "compare": [{ "key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0" }],
            "success": [{ "request_put": { "key": b64(key), "value": b64(&older.to_string()) } }],
        });
        if etcd.call("/v3/kv/txn", txn).await["succeeded"].as_bool() == Some(true) {
            first = true;
            break;
        }
    }
    assert!(first, "the older write-back never landed first");
    let newest = eventually(15, || async {
        let v = etcd.held(key).await;
        v["active"] == "blue"
            && v["generation"] == 2
            && older_of(&a).await == ("blue".to_string(), 2)
    })
    .await;
    assert!(
        newest,
        "the older write-back undid the flip: etcd holds {}, A serves {:?}",
        etcd.held(key).await,
        older_of(&a).await
    );
    assert_eq!(a.get("/x").await, (200, "blue\n".to_string()));
    a.stop().await;
}

/// A write-back that etcd refuses is tried again without waiting for a full read (which a
/// healthy watch never brings): etcd refuses writes (its NOSPACE alarm, raised through its API)
/// when the key is deleted, the replica's write-back fails, the alarm is cleared, and the key
/// comes back while the watch stays healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_back_etcd_refused_is_tried_again_while_the_watch_is_healthy() {
    let logs = captured_logs();
    let rig = write_back_rig("/sy-retry/", "wbretry").await;
    let (etcd, body) = (&rig.etcd, &rig.body);
    let a = TestProxy::start(body).await;
    let key = "/sy-retry/services/wbretry";
    let (s, v) = a.flip("wbretry", "green").await;
    assert_eq!(s, 200, "{v}");
    etcd.nospace(true).await;
    let deleted = etcd.delete(key).await;
    assert_eq!(deleted["deleted"], "1", "{deleted}");
    let refused = eventually(20, || async {
        let l = logs
            .lock()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default();
        l.lines()
            .any(|l| l.contains("service=wbretry") && l.contains("cannot be written back"))
    })
    .await;
    assert!(refused, "the write-back was not refused by etcd");
    etcd.nospace(false).await;
    let back = eventually(20, || async {
        let v = etcd.held(key).await;
        v["active"] == "green" && v["generation"] == 1
    })
    .await;
    assert!(back, "a refused write-back was never tried again");
    a.stop().await;
}

/// A replica restarted while its service's key is missing from etcd (deleted, or etcd rebuilt
/// empty while the fleet was down) starts from the last state it saw from etcd (its cache),
/// not the config's color, and writes it back, so a replica started after it reads it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_with_its_key_missing_serves_and_writes_back_its_cached_state() {
    let rig = write_back_rig("/sy-absent-start/", "api").await;
    let (etcd, body) = (&rig.etcd, &rig.body);
    let a = TestProxy::start(body).await;
    let (s, v) = a.flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    let a_dir = a.stop().await;
    etcd.delete("/sy-absent-start/services/api").await;
    let a = TestProxy::start_with(body, Some(TOKEN), Some(a_dir)).await;
    let b = TestProxy::start(body).await;
    let ps = vec![a, b];
    assert!(
        converged(&ps, "green", 1, 10).await,
        "{:?} {:?}",
        active_of(&ps[0]).await,
        active_of(&ps[1]).await
    );
    for p in ps {
        p.stop().await;
    }
}

/// `name`'s (active, generation) on `p`.
async fn state_of(p: &TestProxy, name: &str) -> (String, u64) {
    let s = p.service_status(name).await;
    (
        s["active"].as_str().unwrap_or("").to_string(),
        s["generation"].as_u64().unwrap_or(u64::MAX),
    )
}

/// The rig's config body with etcd at `endpoint` (a relay) and `extra` `[state]` keys.
fn rig_body(rig: &WriteBackRig, endpoint: &str, prefix: &str, name: &str, extra: &str) -> String {
    let [blue, green] = &rig._upstreams;
    etcd_state(
        endpoint,
        prefix,
        &format!(
            "{extra}\n{}",
            service(name, &[blue.addr], &[green.addr], "")
        ),
    )
}

/// Flips `name` on `a` to green (generation 1), then blue (generation 2); returns the value
/// etcd held at generation 1 tagged as a write-back, exactly as a replica that missed the
/// second flip would write it back.
async fn green_then_blue(etcd: &Etcd, a: &TestProxy, name: &str, key: &str) -> serde_json::Value {
    let (s, v) = a.flip(name, "green").await;
    assert_eq!(s, 200, "{v}");
    let mut older = etcd.held(key).await;
    assert_eq!(older["generation"], 1, "{older}");
    older["write_id"] = json!("write-back-00000000-0000000000000000");
    let (s, v) = a.flip(name, "blue").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(state_of(a, name).await, ("blue".to_string(), 2));
    older
}

/// Writes `value` to `key` only if absent, as a replica's write-back does; whether it landed.
async fn create(etcd: &Etcd, key: &str, value: &serde_json::Value) -> bool {
    let txn = json!({
        "compare": [{ "key": b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0" }],
        "success": [{ "request_put": { "key": b64(key), "value": b64(&value.to_string()) } }],
    });
    etcd.call("/v3/kv/txn", txn).await["succeeded"].as_bool() == Some(true)
}

/// etcd rebuilt empty while A's watch is broken, and a replica that missed A's flip writes its
/// older state back first: A, reconnecting, reads it through a full read (not as a missing key)
/// and must replace it with its newer state rather than serve it (the flip undone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_write_back_read_after_a_reconnect_is_replaced_not_served() {
    let rig = write_back_rig("/sy-resync/", "resync").await;
    let etcd = &rig.etcd;
    let relay = Relay::start(etcd.addr()).await;
    let body = rig_body(
        &rig,
        &relay.endpoint(),
        "/sy-resync/",
        "resync",
        "etcd_timeout = \"2s\"",
    );
    let a = TestProxy::start(&body).await;
    let key = "/sy-resync/services/resync";
    let older = green_then_blue(etcd, &a, "resync", key).await;

    // A's watch breaks and A cannot reconnect while the key goes and the older state is
    // written back.
    relay.set_mode(Mode::Blackhole);
    relay.cut_all();
    let deleted = etcd.delete(key).await;
    assert_eq!(deleted["deleted"], "1", "{deleted}");
    assert!(
        create(etcd, key, &older).await,
        "the older write-back did not land"
    );
    relay.set_mode(Mode::Pass);

    let newest = eventually(30, || async {
        let v = etcd.held(key).await;
        v["active"] == "blue"
            && v["generation"] == 2
            && state_of(&a, "resync").await == ("blue".to_string(), 2)
    })
    .await;
    assert!(
        newest,
        "the older write-back undid the flip: etcd holds {}, A serves {:?}",
        etcd.held(key).await,
        state_of(&a, "resync").await
    );
    assert_eq!(a.get("/x").await, (200, "blue\n".to_string()));
    a.stop().await;
}

/// A replica restarted with its cache (blue, generation 2) while etcd holds another replica's
/// older write-back (green, generation 1; etcd rebuilt empty while it was down) serves its
/// cached state and replaces the write-back with it, so a replica started later reads blue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_on_an_older_write_back_restores_its_newer_state() {
    let rig = write_back_rig("/sy-restart-wb/", "restart").await;
    let (etcd, body) = (&rig.etcd, &rig.body);
    let a = TestProxy::start(body).await;
    let key = "/sy-restart-wb/services/restart";
    let older = green_then_blue(etcd, &a, "restart", key).await;
    let a_dir = a.stop().await;
    etcd.delete(key).await;
    assert!(
        create(etcd, key, &older).await,
        "the older write-back did not land"
    );

    let a = TestProxy::start_with(body, Some(TOKEN), Some(a_dir)).await;
    let newest = eventually(20, || async {
        let v = etcd.held(key).await;
        v["active"] == "blue"
            && v["generation"] == 2
            && state_of(&a, "restart").await == ("blue".to_string(), 2)
    })
    .await;
    assert!(
        newest,
        "the older write-back undid the flip: etcd holds {}, A serves {:?}",
        etcd.held(key).await,
        state_of(&a, "restart").await
    );
    let b = TestProxy::start(body).await;
    let same = eventually(10, || async {
        state_of(&b, "restart").await == ("blue".to_string(), 2)
    })
    .await;
    assert!(same, "B serves {:?}", state_of(&b, "restart").await);
    a.stop().await;
    b.stop().await;
}

/// A's write-back is pending (etcd refused it) when another replica's older write-back lands,
/// and A's transactions fail (cut on their way to etcd, reads pass): A keeps serving its newer
/// state rather than the older one, and replaces it once its writes go through again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_write_back_fails_keeps_its_newer_state_over_an_older_write_back() {
    let logs = captured_logs();
    let refusals = || {
        let l = logs
            .lock()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default();
        l.lines()
            .filter(|l| l.contains("service=cutwb") && l.contains("cannot be written back"))
            .count()
    };
    let rig = write_back_rig("/sy-cutwb/", "cutwb").await;
    let etcd = &rig.etcd;
    let relay = Relay::start(etcd.addr()).await;
    let body = rig_body(
        &rig,
        &relay.endpoint(),
        "/sy-cutwb/",
        "cutwb",
        "etcd_timeout = \"2s\"",
    );
    let a = TestProxy::start(&body).await;
    let key = "/sy-cutwb/services/cutwb";
    let older = green_then_blue(etcd, &a, "cutwb", key).await;

    // The key goes while etcd refuses writes: A's write-back fails and is pending.
    etcd.nospace(true).await;
    etcd.delete(key).await;
    let refused = eventually(20, || async { refusals() > 0 }).await;
    assert!(refused, "A's write-back was not refused by etcd");
    // A's transactions fail from now on; the older write-back lands (A's watch delivers it).
    relay.cut_when_sent(Some(b"/v3/kv/txn"));
    etcd.nospace(false).await;
    assert!(
        create(etcd, key, &older).await,
        "the older write-back did not land first"
    );
    let cut = relay.cut_by_pattern();
    let tried = eventually(20, || async { relay.cut_by_pattern() > cut }).await;
    assert!(
        tried,
        "A never tried to write while its transactions were cut"
    );
    assert_eq!(
        state_of(&a, "cutwb").await,
        ("blue".to_string(), 2),
        "A served the older write-back"
    );
    relay.cut_when_sent(None);
    let newest = eventually(40, || async {
        let v = etcd.held(key).await;
        v["active"] == "blue"
            && v["generation"] == 2
            && state_of(&a, "cutwb").await == ("blue".to_string(), 2)
    })
    .await;
    assert!(
        newest,
        "the older write-back undid the flip: etcd holds {}, A serves {:?}",
        etcd.held(key).await,
        state_of(&a, "cutwb").await
    );
    a.stop().await;
}

/// A, reconnecting, reads another replica's older write-back through a full read and fails to
/// replace it once (its transactions cut, reads pass); its watch is healthy afterwards, so no
/// full read comes again. A must retry on its own: etcd ends on A's newer state without any
/// further write to the key (the fleet would stay split: A blue, etcd and the rest green).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_replacement_of_an_older_write_back_is_retried_with_a_healthy_watch() {
    let rig = write_back_rig("/sy-retrywb/", "retrywb").await;
    let etcd = &rig.etcd;
    let relay = Relay::start(etcd.addr()).await;
    let body = rig_body(
        &rig,
        &relay.endpoint(),
        "/sy-retrywb/",
        "retrywb",
        "etcd_timeout = \"2s\"",
    );
    let a = TestProxy::start(&body).await;
    let key = "/sy-retrywb/services/retrywb";
    let older = green_then_blue(etcd, &a, "retrywb", key).await;

    relay.set_mode(Mode::Blackhole);
    relay.cut_all();
    let deleted = etcd.delete(key).await;
    assert_eq!(deleted["deleted"], "1", "{deleted}");
    assert!(
        create(etcd, key, &older).await,
        "the older write-back did not land"
    );
    // A reconnects with its transactions cut: the replacement after the full read fails.
    let cut = relay.cut_by_pattern();
    relay.cut_when_sent(Some(b"/v3/kv/txn"));
    relay.set_mode(Mode::Pass);
    let tried = eventually(30, || async { relay.cut_by_pattern() > cut }).await;
    assert!(tried, "A never tried to replace the older write-back");
    relay.cut_when_sent(None);
    assert_eq!(
        state_of(&a, "retrywb").await,
        ("blue".to_string(), 2),
        "A served the older write-back"
    );

    let newest = eventually(20, || async {
        let v = etcd.held(key).await;
        v["active"] == "blue" && v["generation"] == 2
    })
    .await;
    assert!(
        newest,
        "the failed replacement was never tried again: etcd holds {}, A serves {:?}",
        etcd.held(key).await,
        state_of(&a, "retrywb").await
    );
    assert_eq!(state_of(&a, "retrywb").await, ("blue".to_string(), 2));
    a.stop().await;
}

/// A's write-back of a deleted key is pending (its transactions cut) when a value that is not a
/// state is put at the key: once A's transactions pass, the key is found present and the
/// write-back is settled (one WARN, left as it is) rather than tried forever (a transaction and a
/// "cannot be written back" WARN on every retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_write_back_of_a_key_holding_a_non_state_is_settled() {
    let logs = captured_logs();
    let lines = move |what: &'static str| {
        let l = logs
            .lock()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default();
        l.lines()
            .filter(|l| l.contains("service=pendbad") && l.contains(what))
            .count()
    };
    let rig = write_back_rig("/sy-pendbad/", "pendbad").await;
    let etcd = &rig.etcd;
    let relay = Relay::start(etcd.addr()).await;
    let body = rig_body(
        &rig,
        &relay.endpoint(),
        "/sy-pendbad/",
        "pendbad",
        "etcd_timeout = \"2s\"",
    );
    let a = TestProxy::start(&body).await;
    let (s, v) = a.flip("pendbad", "green").await;
    assert_eq!(s, 200, "{v}");
    let key = "/sy-pendbad/services/pendbad";

    relay.cut_when_sent(Some(b"/v3/kv/txn"));
    let deleted = etcd.delete(key).await;
    assert_eq!(deleted["deleted"], "1", "{deleted}");
    let refused = eventually(20, || async { lines("cannot be written back") > 0 }).await;
    assert!(refused, "A's write-back did not fail");
    etcd.call(
        "/v3/kv/put",
        json!({ "key": b64(key), "value": b64("not a state") }),
    )
    .await;
    relay.cut_when_sent(None);

    let settled = eventually(20, || async {
        lines("written meanwhile with a value that is not a state") > 0
    })
    .await;
    assert!(
        settled,
        "the write-back was not settled on the unreadable key ({} refusals)",
        lines("cannot be written back")
    );
    let n = lines("cannot be written back");
    let again = eventually(5, || async { lines("cannot be written back") > n }).await;
    assert!(!again, "the settled write-back was tried again");
    let r = etcd.call("/v3/kv/range", json!({ "key": b64(key) })).await;
    assert_eq!(
        r["kvs"][0]["value"],
        json!(b64("not a state")),
        "the unreadable value was overwritten: {r}"
    );
    assert_eq!(state_of(&a, "pendbad").await, ("green".to_string(), 1));
    a.stop().await;
}

/// A replica restarted (cache: green, generation 1) while etcd holds the service's key with a
/// value that is not a state serves its cached state and says the key is left as it is, not
/// that it is "written back" (it never is).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_on_a_non_state_key_says_it_is_left_as_it_is() {
    let logs = captured_logs();
    let lines = move |what: &'static str| {
        let l = logs
            .lock()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default();
        l.lines()
            .filter(|l| l.contains("service=restbad") && l.contains(what))
            .count()
    };
    let rig = write_back_rig("/sy-restbad/", "restbad").await;
    let (etcd, body) = (&rig.etcd, &rig.body);
    let a = TestProxy::start(body).await;
    let (s, v) = a.flip("restbad", "green").await;
    assert_eq!(s, 200, "{v}");
    let a_dir = a.stop().await;
    let key = "/sy-restbad/services/restbad";
    etcd.call(
        "/v3/kv/put",
        json!({ "key": b64(key), "value": b64("not a state") }),
    )
    .await;

    let a = TestProxy::start_with(body, Some(TOKEN), Some(a_dir)).await;
    assert_eq!(state_of(&a, "restbad").await, ("green".to_string(), 1));
    assert!(
        lines("value that is not a state; serving the last state seen from etcd (cache file)") > 0,
        "no WARN that the key holds a value that is not a state"
    );
    assert_eq!(
        lines("written back to etcd"),
        0,
        "a key left as it is was said to be written back"
    );
    let r = etcd.call("/v3/kv/range", json!({ "key": b64(key) })).await;
    assert_eq!(r["kvs"][0]["value"], json!(b64("not a state")), "{r}");
    a.stop().await;
}

/// A service key that etcd holds with a value that is not a state is not taken for missing:
/// no write-back is tried for it (a create fails on every try) and it is not lag that resyncs
/// the watch again and again; the replica keeps serving its state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_service_key_is_not_written_back() {
    let logs = captured_logs();
    let lines = |what: &'static str| {
        let l = logs
            .lock()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default();
        l.lines()
            .filter(|l| l.contains("unread") && l.contains(what))
            .count()
    };
    let rig = write_back_rig("/sy-unread/", "unread").await;
    let etcd = &rig.etcd;
    let body = rig_body(
        &rig,
        &etcd.endpoint(),
        "/sy-unread/",
        "unread",
        "etcd_progress_interval = \"300ms\"",
    );
    let a = TestProxy::start(&body).await;
    let (s, v) = a.flip("unread", "green").await;
    assert_eq!(s, 200, "{v}");
    let key = "/sy-unread/services/unread";
    etcd.call(
        "/v3/kv/put",
        json!({ "key": b64(key), "value": b64("not a state") }),
    )
    .await;
    let seen = eventually(10, || async { lines("unreadable service state") > 0 }).await;
    assert!(seen, "the unreadable value was never read");
    // Ten progress checks and more: a replica taking it for lag resyncs, finds it missing, and
    // tries to write it back.
    let tried = eventually(5, || async { lines("cannot be written back") > 0 }).await;
    assert!(
        !tried,
        "a present key was taken for missing and written back"
    );
    assert_eq!(state_of(&a, "unread").await, ("green".to_string(), 1));
    // A flip of it loses its compare and cannot read the key back: it says so (it said "kept
    // changing while its checks ran" after three tries, each losing the same way).
    let (s, v) = a.flip("unread", "blue").await;
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"].as_str().is_some_and(
            |e| e.contains("could not be read back") && e.contains("fix or delete the key")
        ),
        "{v}"
    );
    a.stop().await;
}

/// A replica started while etcd hangs (SIGSTOP: connections open, no answers) serves the last
/// state it saw from etcd (its cache file) and says it is degraded from its first moment. It
/// said `degraded: false` (and `switchyard_state_degraded 0`) until its next read timed out too,
/// one `etcd_timeout` after it started serving (reviewer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_while_etcd_hangs_is_degraded_from_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let body = etcd_state(
        &etcd.endpoint(),
        "/sy-hung/",
        &format!(
            "etcd_timeout = \"5s\"\n{}",
            service("api", &[blue.addr], &[green.addr], "")
        ),
    );
    let a = TestProxy::start(&body).await;
    assert_eq!(a.flip("api", "green").await.0, 200);
    let a_dir = a.stop().await;

    etcd.signal("-STOP");
    let a = TestProxy::start_with(&body, Some(TOKEN), Some(a_dir)).await;
    let st = a.status().await;
    let metrics = get(a.admin, "/metrics").await.1;
    etcd.signal("-CONT");
    assert_eq!(st["state"]["source"], "cache", "{st}");
    assert_eq!(st["state"]["degraded"], true, "{st}");
    assert!(metrics.contains("switchyard_state_degraded 1"), "{metrics}");
    assert_eq!(a.get("/x").await, (200, "green\n".to_string()));
    // etcd answers again: resynced, no longer degraded.
    let back = eventually(30, || async {
        let st = a.status().await;
        st["state"]["source"] == "etcd" && st["state"]["degraded"] == false
    })
    .await;
    assert!(back, "{}", a.status().await);
    assert_eq!(active_of(&a).await, ("green".to_string(), 1));
    a.stop().await;
}

/// With etcd, a service removed by a reload and put back by another is served at the state etcd
/// holds for it (green, generation 1), as a start would serve it, not at the config's color: this
/// replica served blue while etcd (and every other replica) held green.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_added_back_by_reload_serves_what_etcd_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(dir.path()).await;
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let ps = replicas(&etcd, &blue, &green, 1).await;
    let p = &ps[0];
    let (s, v) = p.flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    let original = std::fs::read_to_string(&p.config_path).expect("config");
    let renamed = original.replace("name = \"api\"", "name = \"api-renamed\"");
    assert_ne!(renamed, original);
    std::fs::write(&p.config_path, &renamed).expect("write");
    let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{v}");
    std::fs::write(&p.config_path, &original).expect("write");
    let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(active_of(p).await, ("green".to_string(), 1));
    assert_eq!(p.get("/").await, (200, "green\n".to_string()));
    for p in ps {
        p.stop().await;
    }
}

/// An event that must be in etcd once (a release's completion, which the replica that completed
/// it and one that found it unrecorded may both record) is stored once when two replicas
/// record it at the same moment: the winner stores it, the other is told it is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_two_replicas_record_once_at_the_same_moment_is_stored_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    etcd.wait_ready().await;
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let ps = replicas(&etcd, &blue, &green, 2).await;
    let ev = |round: usize, by: &str| {
        switchyard::Event::new(
            "*",
            switchyard::EventReason::ReleaseComplete,
            "release",
            format!("release \"t\" (r-{round}) complete; by {by}"),
        )
    };
    for round in 0..10 {
        let once = format!("test-{round}");
        let (a, b) = tokio::join!(
            ps[0].app().record_once(ev(round, "a"), &once, true),
            ps[1].app().record_once(ev(round, "b"), &once, true),
        );
        assert!(a && b, "round {round}: both are told it is in etcd");
    }
    let listed = ps[0].app().events_list().await;
    for round in 0..10 {
        let said = format!("(r-{round}) complete");
        let n = listed.iter().filter(|e| e.detail.contains(&said)).count();
        assert_eq!(n, 1, "round {round}: {listed:#?}");
    }
    for p in ps {
        p.stop().await;
    }
}

/// A service etcd has never held is written to it (generation 0, the config's color) by the
/// first replica that reads etcd: a replica started later whose config says another `active`
/// (a rolling config change, or a restart after one) serves what the fleet serves, not its
/// own config's color at a generation 0 no alert can tell apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_never_flipped_is_served_at_one_color_whatever_each_config_says() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    etcd.wait_ready().await;
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let body = |active: &str| {
        etcd_state(
            &etcd.endpoint(),
            "/sy-gen0/",
            &service(
                "api",
                &[blue.addr],
                &[green.addr],
                &format!("active = \"{active}\"\npath_prefix = \"/x\""),
            ),
        )
    };
    let a = TestProxy::start(&body("blue")).await;
    assert_eq!(active_of(&a).await, ("blue".to_string(), 0));
    // The first full read writes it.
    let key = "/sy-gen0/services/api";
    let written = eventually(10, || async {
        let v = etcd.call("/v3/kv/range", json!({ "key": b64(key) })).await;
        v["kvs"].as_array().is_some_and(|k| !k.is_empty())
    })
    .await;
    assert!(written, "the generation-0 state was not written to etcd");
    let b = TestProxy::start(&body("green")).await;
    let agreed = eventually(10, || async {
        active_of(&b).await == ("blue".to_string(), 0)
    })
    .await;
    assert!(agreed, "{:?}", active_of(&b).await);
    assert_eq!(b.get("/x").await, (200, "blue\n".to_string()));

    // The same for a service a reload adds: written by the first replica that adds it.
    let late = |active: &str| {
        service(
            "late",
            &[blue.addr],
            &[green.addr],
            &format!("active = \"{active}\"\npath_prefix = \"/late\""),
        )
    };
    for (p, active) in [(&a, "green"), (&b, "blue")] {
        let text = std::fs::read_to_string(&p.config_path).expect("read config");
        std::fs::write(&p.config_path, format!("{text}{}", late(active))).expect("write config");
        let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
        assert_eq!(s, 200, "{v}");
    }
    for p in [&a, &b] {
        let st = p.service_status("late").await;
        assert_eq!(st["active"], "green", "{st}");
        assert_eq!(p.get("/late/x").await, (200, "green\n".to_string()));
    }
    a.stop().await;
    b.stop().await;
}
