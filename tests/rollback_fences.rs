//! Automatic rollbacks on the etcd backend whose compare is lost to a rewrite of the unchanged
//! state (the fence a replica writes to settle a write whose answer did not come in time):
//! that is no change by another replica, and the rollback still lands. Two replicas share a
//! real etcd; replica A reaches it through a relay that can hold back its watch stream, so A
//! does not learn of the rewrite before its rollback is compared.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::etcd::{b64, Etcd};
use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A TCP relay to etcd that, while held, keeps back what etcd sends on watch connections (those
/// whose client sent `/v3/watch`) and delivers it, in order, once released. Every other
/// connection passes at once, unless every answer is held back too (`hold_all`).
struct WatchHold {
    addr: SocketAddr,
    held: Arc<AtomicBool>,
    all: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl WatchHold {
    async fn start(target: SocketAddr) -> WatchHold {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let held = Arc::new(AtomicBool::new(false));
        let all = Arc::new(AtomicBool::new(false));
        let stop = CancellationToken::new();
        let (h, a, st) = (held.clone(), all.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    r = listener.accept() => match r { Ok((c, _)) => c, Err(_) => continue },
                    _ = st.cancelled() => return,
                };
                let (held, all, st) = (h.clone(), a.clone(), st.clone());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let watch = Arc::new(AtomicBool::new(false));
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let w = watch.clone();
                    let up = async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if buf[..n].windows(9).any(|x| x == b"/v3/watch") {
                                w.store(true, Ordering::SeqCst);
                            }
                            if sw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            while all.load(Ordering::SeqCst)
                                || (held.load(Ordering::SeqCst) && watch.load(Ordering::SeqCst))
                            {
                                tokio::time::sleep(Duration::from_millis(10)).await;
                            }
                            if cw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = st.cancelled() => {}
                    }
                });
            }
        });
        WatchHold {
            addr,
            held,
            all,
            stop,
        }
    }

    fn hold(&self, on: bool) {
        self.held.store(on, Ordering::SeqCst);
    }

    fn hold_all(&self, on: bool) {
        self.all.store(on, Ordering::SeqCst);
    }
}

impl Drop for WatchHold {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn active_of(p: &TestProxy) -> (String, u64) {
    let s = p.service_status("api").await;
    (
        s["active"].as_str().unwrap_or("").to_string(),
        s["generation"].as_u64().unwrap_or(u64::MAX),
    )
}

async fn converged(ps: &[&TestProxy], color: &str, generation: u64, secs: u64) -> bool {
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

/// The config of a replica on `endpoint`: rollback on any 5xx of `/pay`, and the watch's lag
/// check far off (a held watch must not be noticed and resynced during the test).
fn body(endpoint: &str, blue: SocketAddr, green: SocketAddr) -> String {
    body_timeout(endpoint, blue, green, "2s")
}

fn body_timeout(endpoint: &str, blue: SocketAddr, green: SocketAddr, timeout: &str) -> String {
    format!(
        "[state]\nbackend = \"etcd\"\netcd_endpoints = [\"{endpoint}\"]\netcd_prefix = \"/sy-fence/\"\n\
         etcd_timeout = \"{timeout}\"\netcd_progress_interval = \"60s\"\n{}",
        service(
            "api",
            &[blue],
            &[green],
            "[services.rollback]\nwatch_for = \"10m\"\nmin_requests = 1\n\
             [[services.rollback.triggers]]\nkind = \"critical_5xx\"\npaths = [\"/pay\"]\nover = \"30s\"\nfor = \"0s\"\n"
        )
    )
}

const KEY: &str = "/sy-fence/services/api";

/// Writes `value` to the service key (no compare), as another replica's fence would.
async fn put(etcd: &Etcd, value: &Value) {
    let put = json!({ "key": b64(KEY), "value": b64(&value.to_string()) });
    etcd.call("/v3/kv/put", put).await;
}

/// Reviewer's case (HIGH): green fails after a flip; etcd's copy of the state was rewritten,
/// unchanged, by a fence (`fence-<write id>`) that A has not seen yet, so A's rollback loses
/// its compare. Before, A recorded `rollback_conflict` ("changed by another replica"), kept its
/// engine latched, and nobody ever rolled back: green stayed live while failing. Now the
/// rollback is sent again on the revision read and lands: one flip, no conflict event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_that_loses_to_a_rewrite_of_the_same_state_still_lands() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let relay = WatchHold::start(etcd.addr()).await;
    let a = TestProxy::start(&body(
        &format!("http://{}", relay.addr),
        blue.addr,
        green.addr,
    ))
    .await;
    let b = TestProxy::start(&body(&etcd.endpoint(), blue.addr, green.addr)).await;
    assert!(converged(&[&a, &b], "blue", 0, 10).await);
    let (s, v) = a.flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    assert!(converged(&[&a, &b], "green", 1, 10).await);

    // A's watch is held back; the state is rewritten unchanged with a fence's write id.
    relay.hold(true);
    let mut fence = etcd.held(KEY).await;
    assert_eq!(fence["active"], "green", "{fence}");
    fence["write_id"] = json!("fence-00000000-00000000000000ff");
    put(&etcd, &fence).await;
    assert_eq!(etcd.held(KEY).await, fence);

    // Green fails a critical path on A: its engine rolls back.
    green.set_status(500);
    assert_eq!(a.get("/pay").await.0, 500);
    let landed = eventually(15, || async {
        let held = etcd.held(KEY).await;
        held["active"] == "blue"
            && held["generation"] == 2
            && active_of(&a).await == ("blue".to_string(), 2)
    })
    .await;
    assert!(
        landed,
        "the rollback was lost: etcd holds {}, A serves {:?}, A's events {:#?}",
        etcd.held(KEY).await,
        active_of(&a).await,
        a.events().await
    );
    relay.hold(false);
    assert!(converged(&[&a, &b], "blue", 2, 10).await);
    assert_eq!(b.get("/x").await, (200, "blue\n".to_string()));
    // A's event reaches etcd in its own task after the flip it records.
    events_once_listed(&b, "auto_rollback", 10).await;
    let evs = b.events().await;
    let count = |r: &str| evs.iter().filter(|e| e["reason"] == r).count();
    assert_eq!(count("auto_rollback"), 1, "{evs:#?}");
    assert_eq!(count("rollback_conflict"), 0, "{evs:#?}");
    // Counted once A knows the write as its own: on a loaded machine its first try may time
    // out (outcome unknown) and be known only when the released watch delivers it.
    let counted = || async {
        let m = get(a.admin, "/metrics").await.1;
        metric(
            &m,
            "switchyard_flips_total",
            &[("reason", "auto_rollback"), ("service", "api")],
        )
    };
    eventually(10, || async { counted().await == Some(1.0) }).await;
    assert_eq!(counted().await, Some(1.0));
    a.stop().await;
    b.stop().await;
}

/// The other side of it: a rollback that loses to a real change (B rolled back first, A's watch
/// held back so A still serves green) is not sent again. A records one `rollback_conflict`
/// whose text names what etcd held when A read it (blue, generation 2), and there is one flip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_that_loses_to_another_replica_s_rollback_is_not_sent_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let relay = WatchHold::start(etcd.addr()).await;
    let a = TestProxy::start(&body(
        &format!("http://{}", relay.addr),
        blue.addr,
        green.addr,
    ))
    .await;
    let b = TestProxy::start(&body(&etcd.endpoint(), blue.addr, green.addr)).await;
    assert!(converged(&[&a, &b], "blue", 0, 10).await);
    assert_eq!(a.flip("api", "green").await.0, 200);
    assert!(converged(&[&a, &b], "green", 1, 10).await);

    relay.hold(true);
    green.set_status(500);
    // B rolls back first; A has not seen it when its own engine fires.
    assert_eq!(b.get("/pay").await.0, 500);
    assert!(converged(&[&b], "blue", 2, 10).await);
    assert_eq!(active_of(&a).await, ("green".to_string(), 1));
    assert_eq!(a.get("/pay").await.0, 500);
    let lost = eventually(10, || async {
        active_of(&a).await == ("blue".to_string(), 2)
            && a.events()
                .await
                .iter()
                .any(|e| e["reason"] == "rollback_conflict")
    })
    .await;
    relay.hold(false);
    let evs = a.events().await;
    assert!(lost, "{:?} {evs:#?}", active_of(&a).await);
    // Nothing more happens: one flip, etcd and both replicas on blue generation 2.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(converged(&[&a, &b], "blue", 2, 10).await);
    let held = etcd.held(KEY).await;
    assert_eq!(
        (&held["active"], &held["generation"]),
        (&json!("blue"), &json!(2))
    );
    // Each event reaches etcd in its own task after what it records.
    events_once_listed(&b, "auto_rollback", 10).await;
    events_once_listed(&b, "rollback_conflict", 10).await;
    let evs = b.events().await;
    let count = |r: &str| evs.iter().filter(|e| e["reason"] == r).count();
    assert_eq!(count("auto_rollback"), 1, "{evs:#?}");
    assert_eq!(count("rollback_conflict"), 1, "{evs:#?}");
    let conflict = evs
        .iter()
        .find(|e| e["reason"] == "rollback_conflict")
        .and_then(|e| e["detail"].as_str())
        .unwrap_or("")
        .to_string();
    assert!(
        conflict.contains("changed by another replica: etcd held blue (generation 2) when this replica read it, this replica serves that now")
            && !conflict.contains("green (generation 1)"),
        "{conflict}"
    );
    a.stop().await;
    b.stop().await;
}

/// A manual flip that loses its compare to a rewrite of the unchanged state (etcd held the same
/// state, nobody changed it) is no refusal: it is sent again, compared at the revision read,
/// and lands (it answered 409, first "changed by another replica").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flip_lost_to_a_rewrite_of_the_same_state_is_sent_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let relay = WatchHold::start(etcd.addr()).await;
    let a = TestProxy::start(&body(
        &format!("http://{}", relay.addr),
        blue.addr,
        green.addr,
    ))
    .await;
    assert!(converged(&[&a], "blue", 0, 10).await);
    assert_eq!(a.flip("api", "green").await.0, 200);
    relay.hold(true);
    let mut fence = etcd.held(KEY).await;
    fence["write_id"] = json!("fence-00000000-00000000000000fe");
    put(&etcd, &fence).await;
    // Nobody changed anything: not a refusal; the flip is sent again at the revision read.
    let (s, v) = a.flip("api", "blue").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["generation"], 2, "{v}");
    relay.hold(false);
    assert!(converged(&[&a], "blue", 2, 10).await);
    a.stop().await;
}

/// A's first rollback is committed by etcd at once, but no answer reaches A (the relay holds
/// them all back), so its outcome is unknown and the engine tries again. That next attempt loses
/// its compare to A's own first one: the rollback is done, and it is no `rollback_conflict`
/// (before: "changed by another replica", although there is no other replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_that_loses_to_its_own_earlier_attempt_records_no_conflict() {
    let logs = captured_logs();
    let unknown = || {
        let l = logs
            .lock()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default();
        l.lines()
            .filter(|l| {
                l.contains("automatic rollback failed; will retry") && l.contains("outcome unknown")
            })
            .count()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let relay = WatchHold::start(etcd.addr()).await;
    let a = TestProxy::start(&body(
        &format!("http://{}", relay.addr),
        blue.addr,
        green.addr,
    ))
    .await;
    assert!(converged(&[&a], "blue", 0, 10).await);
    assert_eq!(a.flip("api", "green").await.0, 200);
    assert!(converged(&[&a], "green", 1, 10).await);

    relay.hold(true);
    relay.hold_all(true);
    let before = unknown();
    green.set_status(500);
    assert_eq!(a.get("/pay").await.0, 500);
    let unresolved = eventually(30, || async { unknown() > before }).await;
    assert!(unresolved, "the first rollback's outcome was never unknown");
    let held = etcd.held(KEY).await;
    assert_eq!(
        (&held["active"], &held["generation"]),
        (&json!("blue"), &json!(2)),
        "{held}"
    );
    relay.hold_all(false);
    // The next attempt loses to it and applies what etcd holds (the watch is still held).
    assert!(converged(&[&a], "blue", 2, 15).await);
    relay.hold(false);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // The event is recorded when the released watch delivers the write, and reaches etcd in
    // its own task after that.
    events_once_listed(&a, "auto_rollback", 10).await;
    let evs = a.events().await;
    let count = |r: &str| evs.iter().filter(|e| e["reason"] == r).count();
    assert_eq!(count("auto_rollback"), 1, "{evs:#?}");
    assert_eq!(count("rollback_conflict"), 0, "{evs:#?}");
    assert_eq!(etcd.held(KEY).await["generation"], 2);
    a.stop().await;
}
