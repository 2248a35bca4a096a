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

fn spawn_serve(
    cfg: &std::path::Path,
    log: &std::path::Path,
    upgrade: bool,
) -> tokio::process::Child {
    spawn_serve_env(cfg, log, upgrade, &[])
}

fn spawn_serve_env(
    cfg: &std::path::Path,
    log: &std::path::Path,
    upgrade: bool,
    env: &[(&str, &str)],
) -> tokio::process::Child {
    let mut args = vec!["serve", "--config", cfg.to_str().expect("utf-8")];
    if upgrade {
        args.push("--upgrade");
    }
    let stderr = std::fs::File::create(log).expect("log file");
    tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn")
}

/// `switchyard.toml` in `dir`: the proxy on a free port with `proxy_keys` (more `[proxy]`
/// lines), the admin on another, the state file `state.json` in `dir`, then `services`. The
/// file, and the proxy's and the admin's addresses.
fn write_config(
    dir: &std::path::Path,
    proxy_keys: &str,
    services: &str,
) -> (std::path::PathBuf, SocketAddr, SocketAddr) {
    let (pp, ap) = (free_port(), free_port());
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:{pp}\"\n{proxy_keys}\
         [admin]\nlisten = \"127.0.0.1:{ap}\"\n[state]\npath = \"{}\"\n{services}",
        dir.join("state.json").display(),
    );
    let cfg = dir.join("switchyard.toml");
    std::fs::write(&cfg, text).expect("write config");
    let proxy: SocketAddr = format!("127.0.0.1:{pp}").parse().expect("addr");
    let admin: SocketAddr = format!("127.0.0.1:{ap}").parse().expect("addr");
    (cfg, proxy, admin)
}

/// Waits (at most 20 s) until a process listens on the upgrade socket of the state in `dir`
/// (`state.json`'s default, `state.upgrade.sock`). One that took over binds it only once it
/// serves and the old one said "go"; a `serve --upgrade` before that finds nobody to take over
/// from and says so. (A connection that sends nothing is logged and dropped by the listener.)
async fn upgrade_socket_listens(dir: &std::path::Path) -> bool {
    let sock = dir.join("state.upgrade.sock");
    eventually(20, || async {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    })
    .await
}

/// The first process on `cfg` (no `--upgrade`), serving: its `/healthz` on `admin` answers
/// within 15 s.
async fn serve_first(
    cfg: &std::path::Path,
    log: &std::path::Path,
    admin: SocketAddr,
) -> tokio::process::Child {
    let child = spawn_serve(cfg, log, false);
    assert!(
        healthz_within(admin, 15).await,
        "the first process did not start"
    );
    child
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
/// Clients on the proxy until stopped: `pairs` keep-alive and `pairs` new-connection loops.
struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// Started, and returned once `min_ok` requests have succeeded.
    async fn start(proxy: SocketAddr, pairs: usize, min_ok: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Tally::default());
        let mut tasks = Vec::new();
        for _ in 0..pairs {
            tasks.push(tokio::spawn(keep_alive_load(
                proxy,
                stop.clone(),
                tally.clone(),
            )));
            tasks.push(tokio::spawn(new_connection_load(
                proxy,
                stop.clone(),
                tally.clone(),
            )));
        }
        assert!(
            eventually(10, || async { tally.ok.load(Ordering::SeqCst) >= min_ok }).await,
            "the load did not get going"
        );
        Load { stop, tally, tasks }
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.expect("load task");
        }
    }
}

async fn keep_alive_load(proxy: SocketAddr, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
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

/// Fewer workers after the upgrade (`per_worker` with three to `shared`; with four to two):
/// the old process's sockets that no new worker takes stay in the kernel's `SO_REUSEPORT`
/// group until the old process exits, and get their share of new connections meanwhile; the
/// new process accepts on them too (dealt over its workers), so none of those connections
/// waits unanswered and is reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrade_under_load_to_fewer_workers() {
    upgrade_under_load_from(
        "workers = 3\nruntime = \"per_worker\"\n",
        "workers = 2\nruntime = \"shared\"\n",
    )
    .await;
    upgrade_under_load_from("workers = 4\n", "workers = 2\n").await;
}

async fn upgrade_under_load(runtime: &str) {
    let keys = format!("workers = 2\nruntime = \"{runtime}\"\n");
    upgrade_under_load_from(&keys, &keys).await;
}

/// The old process runs with `old_keys` in `[proxy]`, the new ones with `new_keys`.
async fn upgrade_under_load_from(old_keys: &str, new_keys: &str) {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, proxy, admin) = write_config(
        dir.path(),
        &format!("shutdown_grace = \"10s\"\n{old_keys}"),
        &service("api", &[blue.addr], &[green.addr], ""),
    );

    let old_log = dir.path().join("old.log");
    let mut old = serve_first(&cfg, &old_log, admin).await;
    // A flip before the upgrade: the new process must serve the live state, not the config's.
    let (s, _) = admin_post(
        admin,
        "/api/services/api/flip",
        Some(TOKEN),
        Some(serde_json::json!({"to": "green"})),
    )
    .await;
    assert_eq!(s, 200);

    let load = Load::start(proxy, 4, 200).await;
    let tally = load.tally.clone();

    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, text.replacen(old_keys, new_keys, 1)).expect("write config");
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
    load.stop().await;
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
        tally
            .errors
            .lock()
            .expect("lock")
            .iter()
            .take(10)
            .collect::<Vec<_>>()
    );
    assert!(
        at_exit > before_exit,
        "no request was served during the upgrade"
    );
    assert!(logs.contains("upgrade"), "{logs}");

    // The new process serves the live state it read (green, generation 1) on the same ports.
    assert_eq!(get(proxy, "/").await, (200, "green\n".to_string()));
    let (_, status) = admin_get(admin, "/api/status").await;
    let api = &status["services"][0];
    assert_eq!(api["active"], "green", "{status}");
    assert_eq!(api["generation"], 1, "{status}");

    // And it can be upgraded again, then stopped.
    assert!(
        upgrade_socket_listens(dir.path()).await,
        "the new process never took the upgrade socket"
    );
    let newer_log = dir.path().join("newer.log");
    let mut newer = spawn_serve(&cfg, &newer_log, true);
    let st = tokio::time::timeout(Duration::from_secs(30), new.wait())
        .await
        .expect("second upgrade: the previous process did not exit")
        .expect("wait");
    assert!(st.success());
    // The process that handed over left the newer one's upgrade socket in place.
    assert!(
        upgrade_socket_listens(dir.path()).await,
        "the upgraded-from process removed its successor's upgrade socket"
    );
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
        .args([
            "serve",
            "--config",
            cfg.to_str().expect("utf-8"),
            "--upgrade",
        ])
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
    // A relative path (the shipped config's `state/switchyard.json`) is resolved against the
    // working directory, which the message names: run from elsewhere, it finds nobody.
    let relative = std::fs::read_to_string(&cfg).expect("read config").replace(
        &format!("{}", dir.path().join("state.json").display()),
        "state.json",
    );
    std::fs::write(&cfg, relative).expect("write config");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "serve",
            "--config",
            cfg.to_str().expect("utf-8"),
            "--upgrade",
        ])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "at state.upgrade.sock (relative to the working directory {})",
            dir.path().display()
        )),
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
    let (cfg, proxy, admin) = write_config(
        dir.path(),
        "shutdown_grace = \"5s\"\nworkers = 1\n",
        &service("api", &[blue.addr], &[green.addr], ""),
    );
    // systemd's notify socket: the datagrams say who the main process is and whether it stops.
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let notify_str = notify_path.to_str().expect("utf-8").to_string();
    let old_log = dir.path().join("old.log");
    let mut old = spawn_serve_env(&cfg, &old_log, false, &[("NOTIFY_SOCKET", &notify_str)]);
    assert!(healthz_within(admin, 15).await, "did not start");
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
    let mut messages = Vec::new();
    let mut buf = [0u8; 512];
    while let Ok(n) = notify.recv(&mut buf) {
        messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert_eq!(
        messages.first(),
        Some(&format!("MAINPID={pid}\nREADY=1")),
        "{messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("MAINPID=") && !m.contains(&format!("={pid}"))),
        "the successor did not announce itself: {messages:?}"
    );
    assert!(
        !messages.iter().any(|m| m.contains("STOPPING=1")),
        "an upgrade looked like a stop: {messages:?}"
    );
    // The successor is not this test's child: upgrade it to one that is, then stop that one.
    assert!(
        upgrade_socket_listens(dir.path()).await,
        "the new process never took the upgrade socket"
    );
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

/// A green upstream whose `/smoke` answer waits until the test releases it (so a flip's smoke
/// check is in flight for as long as the test needs); every other request is answered `green`.
/// Returns its address, a flag set when a smoke request arrived, and the release.
async fn held_smoke_upstream() -> (SocketAddr, Arc<AtomicBool>, Arc<tokio::sync::Semaphore>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let arrived = Arc::new(AtomicBool::new(false));
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let (a, r) = (arrived.clone(), release.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (a, r) = (a.clone(), r.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let smoke = buf.starts_with(b"GET /smoke ");
                    buf.drain(..end + 4);
                    if smoke {
                        a.store(true, Ordering::SeqCst);
                        let Ok(p) = r.acquire().await else { return };
                        p.forget();
                    }
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\ngreen\n";
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, arrived, release)
}

/// A flip in flight in the old process while a new one takes over (its smoke check still
/// running) must not be answered "flipped" by the old process: the new one read the live state
/// when it took over and would never serve it. It is refused (503), and both agree on blue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flip_in_flight_during_an_upgrade_is_never_answered_and_lost() {
    let blue = TestUpstream::start("blue").await;
    let (green, arrived, release) = held_smoke_upstream().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, proxy, admin) = write_config(
        dir.path(),
        "shutdown_grace = \"10s\"\nworkers = 1\n",
        &service("api", &[blue.addr], &[green], "smoke_paths = [\"/smoke\"]"),
    );
    let old_log = dir.path().join("old.log");
    let mut old = serve_first(&cfg, &old_log, admin).await;

    // The flip reaches the old process and waits in its smoke check.
    let flip = tokio::spawn(async move {
        let req = Request::post(format!("http://{admin}/api/services/api/flip"))
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(r#"{"to":"green"}"#)))
            .expect("request");
        let resp = tokio::time::timeout(Duration::from_secs(30), client().request(req))
            .await
            .ok()?
            .ok()?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    });
    assert!(
        eventually(10, || async { arrived.load(Ordering::SeqCst) }).await,
        "the flip's smoke check never reached green"
    );

    // A new process takes over meanwhile; then the smoke check passes.
    let new_log = dir.path().join("new.log");
    let _new = spawn_serve(&cfg, &new_log, true);
    assert!(
        eventually(30, || async {
            std::fs::read_to_string(&old_log)
                .unwrap_or_default()
                .contains("the new process serves on the same sockets")
        })
        .await,
        "the upgrade did not happen:\n{}",
        std::fs::read_to_string(&new_log).unwrap_or_default()
    );
    release.add_permits(100);
    let answer = flip.await.expect("flip task");
    tokio::time::timeout(Duration::from_secs(30), old.wait())
        .await
        .expect("the old process did not exit")
        .expect("wait");

    // What the operator was told is what is served.
    let served = get(proxy, "/").await;
    let (_, status) = admin_get(admin, "/api/status").await;
    if let Some((code, body)) = &answer {
        assert_ne!(
            *code, 200,
            "answered {body}, but the new process serves {served:?}: {status}"
        );
        assert_eq!(*code, 503, "{body}");
        assert!(body.contains("upgrade"), "{body}");
    }
    assert_eq!(served, (200, "blue\n".to_string()), "{answer:?}");
    assert_eq!(status["services"][0]["active"], "blue", "{status}");
    // The refused flip works against the new process.
    let (s, v) = admin_post(
        admin,
        "/api/services/api/flip",
        Some(TOKEN),
        Some(serde_json::json!({"to": "green"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(get(proxy, "/").await, (200, "green\n".to_string()));
}

/// Two configs on the same ports and state path (so the same upgrade socket): a plain one, and
/// a slow one whose upstream name is looked up in a FIFO nobody writes (its start takes the 5 s
/// lookup timeout), both with `proxy.upgrade_timeout` as given.
struct SlowUpgrade {
    _blue: Arc<TestUpstream>,
    _green: Arc<TestUpstream>,
    dir: tempfile::TempDir,
    cfg: std::path::PathBuf,
    slow_cfg: std::path::PathBuf,
    proxy: SocketAddr,
    admin: SocketAddr,
}

async fn slow_upgrade(upgrade_timeout: &str) -> SlowUpgrade {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (pp, ap) = (free_port(), free_port());
    let config = |extra: &str, blue_upstream: &str| {
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{pp}\"\nshutdown_grace = \"10s\"\nworkers = 1\n\
             upgrade_timeout = \"{upgrade_timeout}\"\n{extra}\
             [admin]\nlisten = \"127.0.0.1:{ap}\"\n[state]\npath = \"{}\"\n\
             [[services]]\nname = \"api\"\nblue = {{ upstreams = [\"{blue_upstream}\"] }}\n\
             green = {{ upstreams = [\"{}\"] }}\n",
            dir.path().join("state.json").display(),
            green.addr
        )
    };
    let cfg = dir.path().join("switchyard.toml");
    std::fs::write(&cfg, config("", &blue.addr.to_string())).expect("write config");
    // The same state path (so the same upgrade socket), names looked up in a FIFO nobody writes.
    let fifo = dir.path().join("hosts.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let slow_cfg = dir.path().join("slow.toml");
    std::fs::write(
        &slow_cfg,
        config(
            &format!("resolve_hosts_file = \"{}\"\n", fifo.display()),
            &format!("blue.test:{}", blue.addr.port()),
        ),
    )
    .expect("write config");
    let proxy: SocketAddr = format!("127.0.0.1:{pp}").parse().expect("addr");
    let admin: SocketAddr = format!("127.0.0.1:{ap}").parse().expect("addr");
    SlowUpgrade {
        _blue: blue,
        _green: green,
        dir,
        cfg,
        slow_cfg,
        proxy,
        admin,
    }
}

/// A new process slower to start than the old one's `proxy.upgrade_timeout` (here: an upstream
/// name whose lookup hangs on a FIFO for its 5 s lookup timeout, against 500ms): the old process
/// gives up waiting, keeps its listeners and serves on (no failed request under load, changes
/// taken again, its upgrade socket still its own), and the new one, once it gets that far, exits
/// 1 saying why instead of serving beside it. A later upgrade goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_process_past_the_upgrade_timeout_exits_and_the_old_one_serves_on() {
    let u = slow_upgrade("500ms").await;
    let (dir, cfg, slow_cfg, proxy, admin) = (&u.dir, &u.cfg, &u.slow_cfg, u.proxy, u.admin);

    let old_log = dir.path().join("old.log");
    let mut old = serve_first(cfg, &old_log, admin).await;
    let load = Load::start(proxy, 2, 100).await;
    let tally = load.tally.clone();

    // The new config adds a service the state file does not hold: a new process writes such
    // services only once it serves, never before the old one said "go" (the old one, serving
    // on after an abort, answers flips that a write from the states read at startup erased).
    let text = std::fs::read_to_string(slow_cfg).expect("slow config");
    let api = text.find("[[services]]").expect("a service");
    let web = text[api..].replace("name = \"api\"", "name = \"web\"\npath_prefix = \"/web\"");
    let text = format!("{}{web}\n{}", &text[..api], &text[api..]);
    std::fs::write(slow_cfg, text).expect("write slow config");
    let slow_log = dir.path().join("slow.log");
    let mut slow = spawn_serve(slow_cfg, &slow_log, true);
    let slow_status = tokio::time::timeout(Duration::from_secs(60), slow.wait())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the slow new process did not exit:\n{}",
                std::fs::read_to_string(&slow_log).unwrap_or_default()
            )
        })
        .expect("wait");
    let logs = || {
        format!(
            "old:\n{}\nslow new:\n{}",
            std::fs::read_to_string(&old_log).unwrap_or_default(),
            std::fs::read_to_string(&slow_log).unwrap_or_default()
        )
    };
    assert_eq!(slow_status.code(), Some(1), "{}", logs());
    assert!(
        logs().contains("stopped waiting for this one"),
        "{}",
        logs()
    );
    assert!(logs().contains("proxy.upgrade_timeout"), "{}", logs());
    let stored = std::fs::read_to_string(dir.path().join("state.json")).expect("state file");
    assert!(
        !stored.contains("\"web\""),
        "the new process wrote the state file before it served: {stored}\n{}",
        logs()
    );
    // The state file's lock names the old process again, not the new one that exited: the new
    // one wrote its pid there when it took the lock over.
    let lock = dir.path().join("state.lock");
    let old_pid = old.id().expect("pid").to_string();
    assert!(
        eventually(10, || async {
            std::fs::read_to_string(&lock).unwrap_or_default().trim() == old_pid
        })
        .await,
        "the lock names {:?}, not the old process {old_pid}",
        std::fs::read_to_string(&lock).unwrap_or_default()
    );
    // The old one served throughout and serves on.
    let after = tally.ok.load(Ordering::SeqCst) + 100;
    assert!(
        eventually(20, || async { tally.ok.load(Ordering::SeqCst) >= after }).await,
        "the old process does not serve: {}",
        logs()
    );
    load.stop().await;
    let failed = tally.failed.load(Ordering::SeqCst);
    assert_eq!(
        failed,
        0,
        "{failed} failed requests of {}: {:?}\n{}",
        tally.ok.load(Ordering::SeqCst),
        tally
            .errors
            .lock()
            .expect("lock")
            .iter()
            .take(10)
            .collect::<Vec<_>>(),
        logs()
    );
    assert!(
        matches!(old.try_wait(), Ok(None)),
        "the old process exited: {}",
        logs()
    );
    // It takes changes again (not frozen for a hand-over that never came).
    let (s, v) = admin_post(
        admin,
        "/api/services/api/flip",
        Some(TOKEN),
        Some(serde_json::json!({"to": "green"})),
    )
    .await;
    assert_eq!(s, 200, "{v}\n{}", logs());
    assert_eq!(get(proxy, "/").await, (200, "green\n".to_string()));

    // Its upgrade socket is still its own: an upgrade with the plain config goes through, once
    // the old process is told to wait longer as its message says (raise the timeout, reload):
    // a new process in a debug build on a loaded machine can take longer than 500 ms to start.
    let text = std::fs::read_to_string(cfg).expect("config");
    assert!(text.contains("upgrade_timeout = \"500ms\""), "{text}");
    std::fs::write(
        cfg,
        text.replace("upgrade_timeout = \"500ms\"", "upgrade_timeout = \"60s\""),
    )
    .expect("write config");
    let (s, v) = admin_post(admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{v}\n{}", logs());
    let new_log = dir.path().join("new.log");
    let mut new = spawn_serve(cfg, &new_log, true);
    let st = tokio::time::timeout(Duration::from_secs(30), old.wait())
        .await
        .unwrap_or_else(|_| panic!("the old process did not hand over: {}", logs()))
        .expect("wait");
    assert!(st.success(), "{}", logs());
    assert_eq!(get(proxy, "/").await, (200, "green\n".to_string()));
    let _ = new.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(10), new.wait()).await;
}

/// The old process killed (-9) while the new one starts: the new one serves on the inherited
/// sockets (nobody else does), although it can no longer say "ready" to anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_process_serves_when_the_old_one_dies_during_the_upgrade() {
    let u = slow_upgrade("60s").await;
    let (dir, cfg, slow_cfg, proxy, admin) = (&u.dir, &u.cfg, &u.slow_cfg, u.proxy, u.admin);
    let old_log = dir.path().join("old.log");
    let mut old = serve_first(cfg, &old_log, admin).await;
    let new_log = dir.path().join("new.log");
    let mut new = spawn_serve(slow_cfg, &new_log, true);
    let logs = || {
        format!(
            "old:\n{}\nnew:\n{}",
            std::fs::read_to_string(&old_log).unwrap_or_default(),
            std::fs::read_to_string(&new_log).unwrap_or_default()
        )
    };
    // Once the new process holds the sockets (it logs the old one's offer), kill the old one.
    assert!(
        eventually(15, || async {
            std::fs::read_to_string(&old_log)
                .unwrap_or_default()
                .contains("handed to a new process")
        })
        .await,
        "no hand-over began: {}",
        logs()
    );
    old.start_kill().expect("kill -9");
    let _ = old.wait().await;
    // (Its upstream's name never resolved: the proxy answers, 503.)
    let served = eventually(30, || async {
        try_get(admin, "/healthz").await.map(|r| r.0) == Some(200)
            && try_get(proxy, "/").await.is_some()
    })
    .await;
    assert!(
        served,
        "nothing serves after the old process died: {}",
        logs()
    );
    assert!(
        matches!(new.try_wait(), Ok(None)),
        "the new process exited: {}",
        logs()
    );
    let _ = new.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(10), new.wait()).await;
}

/// The state file deleted while the old process serves a flipped color: the new process starts
/// from the live state the old one hands over with its sockets (api on green, generation 1),
/// not from the config's colors (blue), and writes it back to the state file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_without_the_state_file_serves_the_old_process_s_live_colors() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, proxy, admin) = write_config(
        dir.path(),
        "shutdown_grace = \"5s\"\nworkers = 1\n",
        &service("api", &[blue.addr], &[green.addr], ""),
    );
    let state = dir.path().join("state.json");
    let old_log = dir.path().join("old.log");
    let mut old = serve_first(&cfg, &old_log, admin).await;
    let (s, v) = admin_post(
        admin,
        "/api/services/api/flip",
        Some(TOKEN),
        Some(serde_json::json!({"to": "green"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(get(proxy, "/").await, (200, "green\n".to_string()));
    std::fs::remove_file(&state).expect("remove the state file");

    let new_log = dir.path().join("new.log");
    let mut new = spawn_serve(&cfg, &new_log, true);
    let logs = || {
        format!(
            "old:\n{}\nnew:\n{}",
            std::fs::read_to_string(&old_log).unwrap_or_default(),
            std::fs::read_to_string(&new_log).unwrap_or_default()
        )
    };
    let exited = tokio::time::timeout(Duration::from_secs(30), old.wait()).await;
    assert!(
        matches!(exited, Ok(Ok(s)) if s.success()),
        "the old process did not hand over and exit: {exited:?}\n{}",
        logs()
    );
    // Only the new process serves now.
    assert_eq!(
        get(proxy, "/").await,
        (200, "green\n".to_string()),
        "{}",
        logs()
    );
    let (_, status) = admin_get(admin, "/api/status").await;
    assert_eq!(status["services"][0]["active"], "green", "{status}");
    assert_eq!(status["services"][0]["generation"], 1, "{status}");
    // Written once the old process said "go" (after its exit, as likely as before it).
    let written = eventually(10, || async { state.exists() }).await;
    assert!(written, "the state file is not written back\n{}", logs());
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).expect("the state file is written back"))
            .expect("json");
    assert_eq!(stored["services"]["api"]["active"], "green", "{stored}");
    assert_eq!(stored["services"]["api"]["generation"], 1, "{stored}");
    let _ = new.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(10), new.wait()).await;
}

/// A copy of `cfg` as `name` in `dir` on other free ports (the same state file), with
/// `proxy_keys` (more `[proxy]` lines) added: the file, its proxy's and its admin's addresses.
fn beside(
    cfg: &std::path::Path,
    name: &str,
    proxy_keys: &str,
    (proxy, admin): (SocketAddr, SocketAddr),
) -> (std::path::PathBuf, SocketAddr, SocketAddr) {
    let (pp, ap) = (free_port(), free_port());
    let text = std::fs::read_to_string(cfg)
        .expect("config")
        .replace(&proxy.to_string(), &format!("127.0.0.1:{pp}"))
        .replace(&admin.to_string(), &format!("127.0.0.1:{ap}"))
        .replacen("[proxy]\n", &format!("[proxy]\n{proxy_keys}"), 1);
    let path = cfg.with_file_name(name);
    std::fs::write(&path, text).expect("write config");
    let proxy: SocketAddr = format!("127.0.0.1:{pp}").parse().expect("addr");
    let admin: SocketAddr = format!("127.0.0.1:{ap}").parse().expect("addr");
    (path, proxy, admin)
}

/// `child` exits within 20 s: its status, or a panic with `log`.
async fn exits(
    child: &mut tokio::process::Child,
    log: &std::path::Path,
) -> std::process::ExitStatus {
    match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
        Ok(Ok(s)) => s,
        other => panic!(
            "it did not exit ({other:?}):\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        ),
    }
}

/// SIGTERM to `child`, which exits 0 within 20 s.
async fn stop(child: &mut tokio::process::Child, log: &std::path::Path) {
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().expect("pid").to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    assert!(exits(child, log).await.success());
}

/// A second `serve` (not `--upgrade`) of the same state file and upgrade socket, on other
/// ports, is refused: it exits 1 naming the state file and the socket and saying to use
/// `--upgrade`. It neither takes the upgrade socket over nor writes the state file: the first
/// process keeps the flip it answered, and a later `--upgrade` still reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_of_the_same_state_is_refused_and_upgrade_reaches_the_first() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, proxy, admin) = write_config(
        dir.path(),
        "shutdown_grace = \"5s\"\nworkers = 1\n",
        &service("api", &[blue.addr], &[green.addr], ""),
    );
    let first_log = dir.path().join("first.log");
    let mut first = serve_first(&cfg, &first_log, admin).await;
    let (s, v) = admin_post(
        admin,
        "/api/services/api/flip",
        Some(TOKEN),
        Some(serde_json::json!({"to": "green"})),
    )
    .await;
    assert_eq!(s, 200, "{v}");

    let (cfg_b, _, admin_b) = beside(&cfg, "b.toml", "", (proxy, admin));
    let b_log = dir.path().join("b.log");
    let mut b = spawn_serve(&cfg_b, &b_log, false);
    let st = exits(&mut b, &b_log).await;
    let err = std::fs::read_to_string(&b_log).unwrap_or_default();
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(
        err.contains("--upgrade")
            && err.contains(&dir.path().join("state.json").display().to_string())
            && err.contains("state.upgrade.sock"),
        "{err}"
    );
    assert!(try_get(admin_b, "/healthz").await.is_none());
    assert_eq!(
        try_get(proxy, "/").await,
        Some((200, "green\n".to_string()))
    );
    // Nor does `--reset-state` move the serving process's state file aside.
    let reset_log = dir.path().join("reset.log");
    let reset = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--reset-state", "--config"])
        .arg(&cfg_b)
        .stderr(std::fs::File::create(&reset_log).expect("log"))
        .status()
        .expect("run");
    let err = std::fs::read_to_string(&reset_log).unwrap_or_default();
    assert_eq!(reset.code(), Some(1), "{err}");
    assert!(err.contains("nothing was moved"), "{err}");
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("state.json")).expect("state file"))
            .expect("json");
    assert_eq!(stored["services"]["api"]["active"], "green", "{stored}");

    // The upgrade socket is still the first process's: --upgrade takes over from it.
    let new_log = dir.path().join("new.log");
    let mut new = spawn_serve(&cfg, &new_log, true);
    assert!(exits(&mut first, &first_log).await.success());
    assert_eq!(
        try_get(proxy, "/").await,
        Some((200, "green\n".to_string()))
    );
    stop(&mut new, &new_log).await;
}

/// Another upgrade socket does not make a second process on the same state file welcome: the
/// state file's lock refuses it, naming the holder. The lock goes to the new process with the
/// sockets on an upgrade (still refused after the old one exited), and is free once the
/// holder stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_file_s_lock_refuses_a_second_serve_and_follows_an_upgrade() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, proxy, admin) = write_config(
        dir.path(),
        "shutdown_grace = \"5s\"\nworkers = 1\n",
        &service("api", &[blue.addr], &[green.addr], ""),
    );
    let first_log = dir.path().join("first.log");
    let mut first = serve_first(&cfg, &first_log, admin).await;
    let other_socket = format!(
        "upgrade_socket = \"{}\"\n",
        dir.path().join("other.sock").display()
    );
    let (cfg_b, _, admin_b) = beside(&cfg, "b.toml", &other_socket, (proxy, admin));
    let refused = |pid: u32| {
        let cfg_b = cfg_b.clone();
        let log = dir.path().join(format!("b-{pid}.log"));
        let state = dir.path().join("state.json").display().to_string();
        async move {
            let mut b = spawn_serve(&cfg_b, &log, false);
            let st = exits(&mut b, &log).await;
            let err = std::fs::read_to_string(&log).unwrap_or_default();
            assert_eq!(st.code(), Some(1), "{err}");
            assert!(
                err.contains(&state)
                    && err.contains(&format!("pid {pid}"))
                    && err.contains("--upgrade"),
                "{err}"
            );
        }
    };
    refused(first.id().expect("pid")).await;

    let new_log = dir.path().join("new.log");
    let mut new = spawn_serve(&cfg, &new_log, true);
    assert!(exits(&mut first, &first_log).await.success());
    refused(new.id().expect("pid")).await;

    stop(&mut new, &new_log).await;
    let b_log = dir.path().join("b.log");
    let mut b = spawn_serve(&cfg_b, &b_log, false);
    assert!(
        healthz_within(admin_b, 15).await,
        "{}",
        std::fs::read_to_string(&b_log).unwrap_or_default()
    );
    stop(&mut b, &b_log).await;
}

/// A stale upgrade socket (its process killed, nothing listens) does not keep a plain `serve`
/// from starting: the file is replaced, and `--upgrade` reaches the new process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_upgrade_socket_is_replaced_by_a_plain_serve() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, proxy, admin) = write_config(
        dir.path(),
        "shutdown_grace = \"5s\"\nworkers = 1\n",
        &service("api", &[blue.addr], &[green.addr], ""),
    );
    let first_log = dir.path().join("first.log");
    let mut first = serve_first(&cfg, &first_log, admin).await;
    first.start_kill().expect("kill -9");
    let _ = first.wait().await;
    assert!(dir.path().join("state.upgrade.sock").exists());
    let second_log = dir.path().join("second.log");
    let mut second = serve_first(&cfg, &second_log, admin).await;
    let new_log = dir.path().join("new.log");
    let mut new = spawn_serve(&cfg, &new_log, true);
    assert!(exits(&mut second, &second_log).await.success());
    assert_eq!(try_get(proxy, "/").await, Some((200, "blue\n".to_string())));
    stop(&mut new, &new_log).await;
    // A plain stop removes its upgrade socket: a later `--upgrade` fails at once.
    assert!(
        !dir.path().join("state.upgrade.sock").exists(),
        "a stopped process left its upgrade socket"
    );
}

/// Kills, when dropped, the Switchyard that the state lock in this directory names, if it
/// still runs with a config from this directory.
struct KillLockHolder(std::path::PathBuf);

impl Drop for KillLockHolder {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(self.0.join("state.lock")).unwrap_or_default();
        let pid = pid.trim();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let ours = String::from_utf8_lossy(&cmdline).contains(&*self.0.to_string_lossy());
        if !pid.is_empty() && ours {
            let _ = std::process::Command::new("kill")
                .args(["-9", pid])
                .status();
        }
    }
}

/// README "Upgrading Switchyard" with a process started through PATH (`switchyard serve …`, as
/// a shell or `ENTRYPOINT ["switchyard", …]` start it: argv[0] is the bare name): the new binary
/// installed over the old file (a new file renamed over it), SIGUSR2 starts it from the path
/// the process was started from, not from `/proc/self/exe` (the replaced file, "(deleted)").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_starts_the_binary_installed_where_path_found_the_old_one() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, proxy, admin) = write_config(
        dir.path(),
        "shutdown_grace = \"5s\"\nworkers = 1\n",
        &service("api", &[blue.addr], &[green.addr], ""),
    );
    // The successor SIGUSR2 starts is not this test's child: should an assertion fail, it is
    // killed when the test ends, by the pid the state lock names (only a process of this
    // test's directory).
    let _successor = KillLockHolder(dir.path().to_path_buf());
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).expect("mkdir");
    let from = env!("CARGO_BIN_EXE_switchyard");
    if std::fs::hard_link(from, bin.join("switchyard")).is_err() {
        std::fs::copy(from, bin.join("switchyard")).expect("copy the binary");
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let old_log = dir.path().join("old.log");
    let mut old = tokio::process::Command::new("switchyard")
        .args(["serve", "--config", cfg.to_str().expect("utf-8")])
        .env("PATH", &path)
        .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&old_log).expect("log"))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn through PATH");
    assert!(
        healthz_within(admin, 15).await,
        "did not start: {}",
        std::fs::read_to_string(&old_log).unwrap_or_default()
    );
    // install -m 0755 switchyard.new bin/switchyard: a new file (a copy: a rename of another
    // link to the same file would change nothing).
    std::fs::copy(from, bin.join("switchyard.new")).expect("copy the binary");
    std::fs::rename(bin.join("switchyard.new"), bin.join("switchyard")).expect("rename");
    let sent = std::process::Command::new("kill")
        .args(["-USR2", &old.id().expect("pid").to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    assert!(exits(&mut old, &old_log).await.success());
    let log = std::fs::read_to_string(&old_log).unwrap_or_default();
    assert!(
        log.contains(&bin.join("switchyard").display().to_string()) && !log.contains("(deleted)"),
        "{log}"
    );
    assert_eq!(try_get(proxy, "/").await, Some((200, "blue\n".to_string())));
    // The successor is not this test's child: upgrade it to one that is, then stop that one.
    assert!(
        upgrade_socket_listens(dir.path()).await,
        "the new process never took the upgrade socket"
    );
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
    stop(&mut last, &last_log).await;
    assert!(
        eventually(10, || async { try_get(proxy, "/").await.is_none() }).await,
        "something still accepts on the port"
    );
}

/// `--upgrade` to a config that changes `[proxy] runtime` from `shared` to `per_worker`: the
/// new process needs one SO_REUSEPORT socket per worker, the old one hands over one plain
/// socket. It exits 1 saying so (change the runtime with a restart), not "Address already in
/// use"; the old process serves on, and a later upgrade reaches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_from_shared_to_per_worker_says_to_restart() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, proxy, admin) = write_config(
        dir.path(),
        "shutdown_grace = \"5s\"\nworkers = 1\n",
        &service("api", &[blue.addr], &[green.addr], ""),
    );
    let old_log = dir.path().join("old.log");
    let mut old = serve_first(&cfg, &old_log, admin).await;
    let shared = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(
        &cfg,
        shared.replacen(
            "workers = 1\n",
            "workers = 2\nruntime = \"per_worker\"\n",
            1,
        ),
    )
    .expect("write config");
    let new_log = dir.path().join("new.log");
    let mut new = spawn_serve(&cfg, &new_log, true);
    let st = exits(&mut new, &new_log).await;
    let err = std::fs::read_to_string(&new_log).unwrap_or_default();
    assert_eq!(st.code(), Some(1), "{err}");
    assert!(
        err.contains("per_worker") && err.contains("restart") && !err.contains("already in use"),
        "{err}"
    );
    assert!(matches!(old.try_wait(), Ok(None)), "the old process exited");
    assert_eq!(try_get(proxy, "/").await, Some((200, "blue\n".to_string())));
    // Its upgrade socket is still its own: an upgrade with the same runtime goes through.
    std::fs::write(&cfg, shared).expect("write config");
    let last_log = dir.path().join("last.log");
    let mut last = spawn_serve(&cfg, &last_log, true);
    assert!(exits(&mut old, &old_log).await.success());
    stop(&mut last, &last_log).await;
}

/// The default runtime became `per_worker` (BENCHMARKS.md "Scaling run"); a process of an
/// earlier version ran `shared` and hands over one plain socket on `proxy.listen`. A config
/// that names no runtime upgrades from it all the same: the new process runs `shared` too,
/// says so, serves, and the old one drains and exits 0. (A config that asks for `per_worker`
/// by name is refused, as above.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_from_a_shared_process_keeps_shared_when_the_config_names_no_runtime() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, proxy, admin) = write_config(
        dir.path(),
        "shutdown_grace = \"5s\"\nworkers = 2\nruntime = \"shared\"\n",
        &service("api", &[blue.addr], &[green.addr], ""),
    );
    let old_log = dir.path().join("old.log");
    let mut old = serve_first(&cfg, &old_log, admin).await;
    assert_eq!(listening_sockets(proxy), 1);
    let text = std::fs::read_to_string(&cfg).expect("config");
    std::fs::write(&cfg, text.replacen("runtime = \"shared\"\n", "", 1)).expect("write config");
    let new_log = dir.path().join("new.log");
    let mut new = spawn_serve(&cfg, &new_log, true);
    let st = exits(&mut old, &old_log).await;
    let said = std::fs::read_to_string(&new_log).unwrap_or_default();
    assert!(
        st.success(),
        "the old process: {st:?}; the new one said: {said}"
    );
    assert!(
        matches!(new.try_wait(), Ok(None)),
        "the new process exited: {said}"
    );
    assert!(
        said.contains("no other worker can share") && said.contains("next restart"),
        "{said}"
    );
    assert_eq!(try_get(proxy, "/").await, Some((200, "blue\n".to_string())));
    assert_eq!(listening_sockets(proxy), 1);
    stop(&mut new, &new_log).await;
}

/// An upgrade during a resolver outage: the name the old process still served (its last good
/// addresses) keeps them in the new process, marked stale, rather than emptying the pool (503
/// "no healthy upstream" for every request): the old process hands its names' last good
/// addresses over with its sockets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_during_a_resolver_outage_keeps_the_old_process_s_addresses() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 bluename\n").expect("write hosts");
    let (cfg, proxy, admin) = write_config(
        dir.path(),
        &format!(
            "shutdown_grace = \"5s\"\nworkers = 1\nresolve_hosts_file = \"{}\"\n",
            hosts.display()
        ),
        &format!(
            "\n[[services]]\nname = \"api\"\nblue = {{ upstreams = [\"bluename:{}\"] }}\n\
             green = {{ upstreams = [\"{}\"] }}\n",
            blue.addr.port(),
            green.addr
        ),
    );
    let old_log = dir.path().join("old.log");
    let mut old = serve_first(&cfg, &old_log, admin).await;
    assert_eq!(get(proxy, "/").await, (200, "blue\n".to_string()));
    // The resolver stops answering the name.
    std::fs::write(&hosts, "# outage\n").expect("write hosts");
    let new_log = dir.path().join("new.log");
    let mut new = spawn_serve(&cfg, &new_log, true);
    let logs = || {
        format!(
            "old:\n{}\nnew:\n{}",
            std::fs::read_to_string(&old_log).unwrap_or_default(),
            std::fs::read_to_string(&new_log).unwrap_or_default()
        )
    };
    let exited = tokio::time::timeout(Duration::from_secs(30), old.wait()).await;
    assert!(
        matches!(exited, Ok(Ok(s)) if s.success()),
        "the old process did not hand over and exit: {exited:?}\n{}",
        logs()
    );
    assert_eq!(
        get(proxy, "/").await,
        (200, "blue\n".to_string()),
        "{}",
        logs()
    );
    let _ = new.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(10), new.wait()).await;
}

/// Where Switchyard is PID 1 (a container without an init: the image's `ENTRYPOINT`), an
/// upgrade in place would end the service: the old process drains and exits, and the kernel
/// ends its PID namespace with it, the new process included. So it is refused, saying why, and
/// the running process serves on: on SIGUSR2, to a `serve --upgrade` from outside the
/// namespace (the old process refuses), and to one inside it (`docker exec`: the new process
/// sees that it would take over from PID 1 and refuses first). (Under tini, `docker run
/// --init`, it is the same: tini exits with its child.) The namespace is the test's own
/// (`unshare --user --map-root-user --pid --fork`), ended with its PID 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_of_a_switchyard_that_is_pid_1_is_refused() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, proxy, admin) = write_config(
        dir.path(),
        "workers = 1\n",
        &service("api", &[blue.addr], &[green.addr], ""),
    );
    let log = dir.path().join("pid1.log");
    let mut ns = tokio::process::Command::new("unshare")
        .args(["--user", "--map-root-user", "--pid", "--fork"])
        .arg(env!("CARGO_BIN_EXE_switchyard"))
        .args(["serve", "--config", cfg.to_str().expect("utf-8")])
        .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("unshare (util-linux) runs");
    assert!(
        healthz_within(admin, 15).await,
        "did not start: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // Its PID outside the namespace: the child unshare forked.
    let unshare_pid = ns.id().expect("pid");
    let children =
        std::fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children"))
            .expect("children");
    let pid = children
        .split_whitespace()
        .next()
        .expect("a child")
        .to_string();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    let sent = std::process::Command::new("kill")
        .args(["-USR2", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    assert!(
        eventually(10, || async {
            log_text().contains("upgrade on SIGUSR2 refused: the running Switchyard is PID 1")
        })
        .await,
        "{}",
        log_text()
    );

    let out = refused_upgrade(&[], &cfg).await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the running process refused the upgrade: the running Switchyard is PID 1"),
        "{err}"
    );
    assert!(
        eventually(10, || async {
            log_text().contains("upgrade refused: the running Switchyard is PID 1")
        })
        .await,
        "{}",
        log_text()
    );

    // `docker exec`: in the namespace, through nsenter (util-linux).
    let out = refused_upgrade(
        &[
            "nsenter",
            "--target",
            &pid,
            "--user",
            "--pid",
            "--preserve-credentials",
            "--",
        ],
        &cfg,
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the running Switchyard is PID 1")
            && err.contains("upgrade by replacing the container"),
        "{err}"
    );

    // It serves on, untouched.
    assert_eq!(try_get(proxy, "/").await, Some((200, "blue\n".to_string())));
    assert!(ns.try_wait().expect("wait").is_none(), "{}", log_text());
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let st = tokio::time::timeout(Duration::from_secs(20), ns.wait())
        .await
        .expect("exit")
        .expect("wait");
    assert!(st.success(), "{}", log_text());
}

/// Under a container init that exits with its one child (tini, which `docker run --init` runs):
/// the old process's exit ends tini, PID 1, and the namespace with the new process in it. So
/// SIGUSR2 is refused there too, saying why. (tini here is a shell under that name, PID 1 of
/// the test's own namespace; `/proc` is mounted for it, so `/proc/1/comm` says `tini`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_under_tini_is_refused() {
    let blue = TestUpstream::start("blue").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (cfg, proxy, admin) = write_config(
        dir.path(),
        "workers = 1\n",
        &service("api", &[blue.addr], &[dead_addr().await], ""),
    );
    let tini = dir.path().join("tini");
    std::fs::copy("/bin/sh", &tini).expect("copy sh");
    let log = dir.path().join("tini.log");
    let mut ns = tokio::process::Command::new("unshare")
        .args([
            "--user",
            "--map-root-user",
            "--pid",
            "--fork",
            "--mount",
            "--mount-proc",
        ])
        .arg(&tini)
        // `; wait`: a shell that ran its last command in its own place would not stay PID 1.
        .args([
            "-c",
            r#""$0" serve --config "$1" & pid=$!; trap 'kill -TERM $pid' TERM; wait $pid"#,
        ])
        .arg(env!("CARGO_BIN_EXE_switchyard"))
        .arg(&cfg)
        .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("unshare (util-linux) runs");
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        healthz_within(admin, 15).await,
        "did not start: {}",
        log_text()
    );
    // Switchyard's PID outside: the child of the shell that unshare forked.
    let children = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .collect::<Vec<_>>()
    };
    let shell = children(ns.id().expect("pid"))[0];
    let pid = children(shell)[0];
    let sent = std::process::Command::new("kill")
        .args(["-USR2", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    assert!(
        eventually(10, || async {
            log_text()
                .contains("upgrade on SIGUSR2 refused: the running Switchyard's parent is tini")
        })
        .await,
        "{}",
        log_text()
    );
    assert_eq!(try_get(proxy, "/").await, Some((200, "blue\n".to_string())));
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(20), ns.wait()).await;
}

/// `serve --config cfg --upgrade`, behind `wrapper` (a program and its arguments) when one is
/// given: its output once it has exited (within 60 s).
async fn refused_upgrade(wrapper: &[&str], cfg: &std::path::Path) -> std::process::Output {
    let bin = env!("CARGO_BIN_EXE_switchyard");
    let (program, pre) = match wrapper.split_first() {
        Some((p, rest)) => (*p, [rest, &[bin]].concat()),
        None => (bin, Vec::new()),
    };
    let run = tokio::process::Command::new(program)
        .args(pre)
        .args([
            "serve",
            "--config",
            cfg.to_str().expect("utf-8"),
            "--upgrade",
        ])
        .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
        .stdin(Stdio::null())
        .output();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the refused process did not exit")
        .unwrap_or_else(|e| panic!("{program} runs: {e}"))
}
