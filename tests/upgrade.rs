//! `serve --upgrade`: a second process takes the listening sockets over from the running one
//! under constant load (keep-alive and new connections); no connection is refused, no request
//! fails, the old process drains and exits 0, the new one serves with the live state.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};

fn spawn_serve(cfg: &std::path::Path, log: &std::path::Path, upgrade: bool) -> tokio::process::Child {
    let mut args = vec!["serve", "--config", cfg.to_str().expect("utf-8")];
    if upgrade {
        args.push("--upgrade");
    }
    let stderr = std::fs::File::create(log).expect("log file");
    tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn")
}

#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failed: AtomicUsize,
    /// The bodies' first line of the failures, for the assertion message.
    errors: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        self.errors.lock().expect("lock").push(why);
    }
}

/// Requests on one keep-alive client (its own pool), until `stop`.
async fn keep_alive_load(proxy: SocketAddr, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let client = hyper_util::client::legacy::Client::builder(
        hyper_util::rt::TokioExecutor::new(),
    )
    .pool_max_idle_per_host(1)
    .build_http::<Full<Bytes>>();
    while !stop.load(Ordering::SeqCst) {
        let req = Request::get(format!("http://{proxy}/ka"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
            Ok(Ok(resp)) => {
                let status = resp.status().as_u16();
                match resp.into_body().collect().await {
                    Ok(_) if status == 200 => {
                        tally.ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => tally.fail(format!("keep-alive: status {status}")),
                    Err(e) => tally.fail(format!("keep-alive body: {e}")),
                }
            }
            Ok(Err(e)) => tally.fail(format!("keep-alive: {e:?}")),
            Err(_) => tally.fail("keep-alive: timed out".to_string()),
        }
    }
}

/// One new connection per request, until `stop`; a refused connection is a failure.
async fn new_connection_load(proxy: SocketAddr, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    while !stop.load(Ordering::SeqCst) {
        match try_get(proxy, "/new").await {
            Some((200, _)) => {
                tally.ok.fetch_add(1, Ordering::SeqCst);
            }
            Some((s, b)) => tally.fail(format!("new connection: {s} {b}")),
            None => tally.fail("new connection: refused, reset or timed out".to_string()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrade_under_load_refuses_nothing() {
    upgrade_under_load("shared").await;
}

/// `per_worker`: every worker's `SO_REUSEPORT` socket is handed over too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrade_under_load_per_worker_sockets() {
    upgrade_under_load("per_worker").await;
}

async fn upgrade_under_load(runtime: &str) {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (pp, ap) = (free_port(), free_port());
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:{pp}\"\nshutdown_grace = \"10s\"\nworkers = 2\nruntime = \"{runtime}\"\n\
         [admin]\nlisten = \"127.0.0.1:{ap}\"\n[state]\npath = \"{}\"\n{}",
        dir.path().join("state.json").display(),
        service("api", &[blue.addr], &[green.addr], "")
    );
    let cfg = dir.path().join("switchyard.toml");
    std::fs::write(&cfg, text).expect("write config");
    let proxy: SocketAddr = format!("127.0.0.1:{pp}").parse().expect("addr");
    let admin: SocketAddr = format!("127.0.0.1:{ap}").parse().expect("addr");

    let old_log = dir.path().join("old.log");
    let mut old = spawn_serve(&cfg, &old_log, false);
    assert!(
        eventually(15, || async {
            try_get(admin, "/healthz").await.map(|r| r.0) == Some(200)
        })
        .await,
        "the first process did not start"
    );
    // A flip before the upgrade: the new process must serve the live state, not the config's.
    let (s, _) = admin_post(
        admin,
        "/api/services/api/flip",
        Some(TOKEN),
        Some(serde_json::json!({"to": "green"})),
    )
    .await;
    assert_eq!(s, 200);

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut load = Vec::new();
    for _ in 0..4 {
        load.push(tokio::spawn(keep_alive_load(
            proxy,
            stop.clone(),
            tally.clone(),
        )));
        load.push(tokio::spawn(new_connection_load(
            proxy,
            stop.clone(),
            tally.clone(),
        )));
    }
    assert!(
        eventually(10, || async { tally.ok.load(Ordering::SeqCst) >= 200 }).await,
        "the load did not get going"
    );

    let new_log = dir.path().join("new.log");
    let mut new = spawn_serve(&cfg, &new_log, true);
    let before_exit = tally.ok.load(Ordering::SeqCst);
    let old_status = tokio::time::timeout(Duration::from_secs(30), old.wait())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the old process did not exit:\n{}",
                std::fs::read_to_string(&old_log).unwrap_or_default()
            )
        })
        .expect("wait");
    let at_exit = tally.ok.load(Ordering::SeqCst);
    // Keep the load on the new process alone for a while.
    let target = at_exit + 300;
    assert!(
        eventually(20, || async { tally.ok.load(Ordering::SeqCst) >= target }).await,
        "the new process does not serve"
    );
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.expect("load task");
    }
    let logs = format!(
        "old:\n{}\nnew:\n{}",
        std::fs::read_to_string(&old_log).unwrap_or_default(),
        std::fs::read_to_string(&new_log).unwrap_or_default()
    );
    assert!(old_status.success(), "old exit {old_status:?}\n{logs}");
    let failed = tally.failed.load(Ordering::SeqCst);
    assert_eq!(
        failed,
        0,
        "{failed} failed requests of {}: {:?}\n{logs}",
        tally.ok.load(Ordering::SeqCst),
        tally.errors.lock().expect("lock").iter().take(10).collect::<Vec<_>>()
    );
    assert!(at_exit > before_exit, "no request was served during the upgrade");
    assert!(logs.contains("upgrade"), "{logs}");

    // The new process serves the live state it read (green, generation 1) on the same ports.
    assert_eq!(get(proxy, "/").await, (200, "green\n".to_string()));
    let (_, status) = admin_get(admin, "/api/status").await;
    let api = &status["services"][0];
    assert_eq!(api["active"], "green", "{status}");
    assert_eq!(api["generation"], 1, "{status}");

    // And it can be upgraded again, then stopped.
    let newer_log = dir.path().join("newer.log");
    let mut newer = spawn_serve(&cfg, &newer_log, true);
    let st = tokio::time::timeout(Duration::from_secs(30), new.wait())
        .await
        .expect("second upgrade: the previous process did not exit")
        .expect("wait");
    assert!(st.success());
    assert_eq!(get(proxy, "/").await, (200, "green\n".to_string()));
    let pid = newer.id().expect("pid");
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    let st = tokio::time::timeout(Duration::from_secs(20), newer.wait())
        .await
        .expect("exit")
        .expect("wait");
    assert!(st.success());
    // With the last process gone, the port refuses: nothing kept the sockets open.
    assert!(try_get(proxy, "/").await.is_none());
}

#[tokio::test]
async fn upgrade_without_a_running_process_fails_and_says_where() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:{}\"\n[admin]\nlisten = \"127.0.0.1:{}\"\n\
         [state]\npath = \"{}\"\n{}",
        free_port(),
        free_port(),
        dir.path().join("state.json").display(),
        service(
            "api",
            &["127.0.0.1:1".parse().expect("addr")],
            &["127.0.0.1:2".parse().expect("addr")],
            ""
        )
    );
    let cfg = dir.path().join("switchyard.toml");
    std::fs::write(&cfg, text).expect("write config");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--config", cfg.to_str().expect("utf-8"), "--upgrade"])
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("proxy.upgrade_socket") && err.contains("state.upgrade.sock"),
        "{err}"
    );
}

/// SIGUSR2 to the running process starts the binary again with `--upgrade` (in the same
/// cgroup, for systemd): the old process drains and exits 0, the new one serves.
#[tokio::test]
async fn sigusr2_upgrades_in_place() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (pp, ap) = (free_port(), free_port());
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:{pp}\"\nshutdown_grace = \"5s\"\nworkers = 1\n\
         [admin]\nlisten = \"127.0.0.1:{ap}\"\n[state]\npath = \"{}\"\n{}",
        dir.path().join("state.json").display(),
        service("api", &[blue.addr], &[green.addr], "")
    );
    let cfg = dir.path().join("switchyard.toml");
    std::fs::write(&cfg, text).expect("write config");
    let proxy: SocketAddr = format!("127.0.0.1:{pp}").parse().expect("addr");
    let admin: SocketAddr = format!("127.0.0.1:{ap}").parse().expect("addr");
    let old_log = dir.path().join("old.log");
    let mut old = spawn_serve(&cfg, &old_log, false);
    assert!(
        eventually(15, || async {
            try_get(admin, "/healthz").await.map(|r| r.0) == Some(200)
        })
        .await,
        "did not start"
    );
    let pid = old.id().expect("pid");
    let sent = std::process::Command::new("kill")
        .args(["-USR2", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let st = tokio::time::timeout(Duration::from_secs(30), old.wait())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the old process did not exit:\n{}",
                std::fs::read_to_string(&old_log).unwrap_or_default()
            )
        })
        .expect("wait");
    assert!(st.success());
    assert_eq!(try_get(proxy, "/").await, Some((200, "blue\n".to_string())));
    // The successor is not this test's child: upgrade it to one that is, then stop that one.
    let last_log = dir.path().join("last.log");
    let mut last = spawn_serve(&cfg, &last_log, true);
    assert!(
        eventually(15, || async {
            std::fs::read_to_string(&last_log)
                .unwrap_or_default()
                .contains("switchyard is serving")
        })
        .await,
        "the last process did not take over"
    );
    assert_eq!(try_get(proxy, "/").await, Some((200, "blue\n".to_string())));
    let term = std::process::Command::new("kill")
        .args(["-TERM", &last.id().expect("pid").to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    let st = tokio::time::timeout(Duration::from_secs(20), last.wait())
        .await
        .expect("exit")
        .expect("wait");
    assert!(st.success());
    assert!(
        eventually(10, || async { try_get(proxy, "/").await.is_none() }).await,
        "something still accepts on the port"
    );
}
