//! Running it as operators do: the config reloaded when its file changes (a Kubernetes ConfigMap
//! update, symlink swap included), logs fit for files and log collectors (no escape codes, colors
//! by name, rollbacks at WARN), `--version` with the commit, and counters that exist at 0.

mod common;
use common::*;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// The value of the sample `name` with exactly these labels, in a text exposition.
async fn metrics_text(admin: SocketAddr) -> String {
    get(admin, "/metrics").await.1
}

fn service_names(status: &Value) -> Vec<String> {
    status["services"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// watch_config
// ---------------------------------------------------------------------------------------------

/// The layout the kubelet gives a mounted ConfigMap: `FILE -> ..data/FILE`,
/// `..data -> ..<timestamp>/`; an update writes a new timestamped directory, swaps `..data` with
/// one rename, and removes the old directory.
struct ConfigMapDir {
    dir: PathBuf,
    file: &'static str,
    generation: u32,
    current: Option<PathBuf>,
}

impl ConfigMapDir {
    /// Turns `dir/file` (a plain file) into the kubelet's layout, content unchanged.
    fn adopt(dir: &Path, file: &'static str) -> ConfigMapDir {
        let text = std::fs::read_to_string(dir.join(file)).expect("read config");
        let mut cm = ConfigMapDir {
            dir: dir.to_path_buf(),
            file,
            generation: 0,
            current: None,
        };
        cm.publish(&text);
        let tmp = dir.join(format!("{file}.tmp"));
        std::os::unix::fs::symlink(Path::new("..data").join(file), &tmp).expect("symlink");
        std::fs::rename(&tmp, dir.join(file)).expect("swap file for symlink");
        cm
    }

    /// What the kubelet does on a ConfigMap update.
    fn publish(&mut self, text: &str) {
        self.generation += 1;
        let name = format!(
            "..2026_12_01_00_00_{:02}.{}",
            self.generation,
            1000 + self.generation
        );
        let data = self.dir.join(&name);
        std::fs::create_dir(&data).expect("mkdir");
        std::fs::write(data.join(self.file), text).expect("write");
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&name, &tmp).expect("symlink");
        std::fs::rename(&tmp, self.dir.join("..data")).expect("swap ..data");
        if let Some(old) = self.current.replace(data) {
            std::fs::remove_dir_all(old).expect("remove the old data dir");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_update_reloads_and_an_invalid_one_changes_nothing() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let admin = "[admin]\nlisten = \"127.0.0.1:0\"\nwatch_config = true\n";
    let api = service(
        "api",
        &[blue.addr],
        &[green.addr],
        "hosts = [\"api.test\"]\n",
    );
    let p = TestProxy::start(&format!("{admin}{api}")).await;
    let dir = p.config_path.parent().expect("dir").to_path_buf();
    let text = std::fs::read_to_string(&p.config_path).expect("config");
    let mut cm = ConfigMapDir::adopt(&dir, "switchyard.toml");
    assert_eq!(service_names(&p.status().await), ["api"]);

    // A valid update: a second service appears, with no signal and no API call.
    let web = service(
        "web",
        &[blue.addr],
        &[green.addr],
        "hosts = [\"web.test\"]\n",
    );
    cm.publish(&format!("{text}{web}"));
    let reloaded = eventually(15, || async {
        service_names(&p.status().await) == ["api", "web"]
    })
    .await;
    assert!(reloaded, "not reloaded: {}", p.status().await);
    // The event is recorded just after the new config is served.
    let recorded = eventually(10, || async {
        p.events().await.iter().any(|e| e["reason"] == "reload")
    })
    .await;
    let events = p.events().await;
    assert!(recorded, "no reload event: {events:?}");
    let reload = events
        .iter()
        .find(|e| e["reason"] == "reload")
        .unwrap_or_else(|| panic!("no reload event: {events:?}"));
    assert_eq!(reload["actor"], "config-watch", "{reload}");
    let m = metrics_text(p.admin).await;
    assert_eq!(
        metric(&m, "switchyard_config_reloads_total", &[("result", "ok")]),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &m,
            "switchyard_config_reloads_total",
            &[("result", "error")]
        ),
        Some(0.0)
    );

    // An invalid update (an unknown key, a bad address): all or nothing, so nothing.
    let bad = format!(
        "{text}{}",
        service("web", &[blue.addr], &[green.addr], "bogus = 1\n")
    )
    .replace(
        "127.0.0.1:0\"\nwatch_config",
        "not-an-address\"\nwatch_config",
    );
    cm.publish(&bad);
    let refused = eventually(15, || async {
        metric(
            &metrics_text(p.admin).await,
            "switchyard_config_reloads_total",
            &[("result", "error")],
        ) == Some(1.0)
    })
    .await;
    assert!(refused, "the invalid file was not seen");
    let m = metrics_text(p.admin).await;
    assert_eq!(
        metric(&m, "switchyard_config_reloads_total", &[("result", "ok")]),
        Some(1.0),
        "an invalid file must not count as a reload"
    );
    assert_eq!(service_names(&p.status().await), ["api", "web"]);
    assert_eq!(
        p.events()
            .await
            .iter()
            .filter(|e| e["reason"] == "reload")
            .count(),
        1
    );
    let (code, body) = request(
        p.proxy,
        "GET",
        "/x",
        &[("host", "web.test")],
        Default::default(),
    )
    .await;
    assert_eq!((code, body.as_str()), (200, "blue\n"));

    // Fixed again: reloaded again (the refused content is not retried, a new one is).
    cm.publish(&text);
    let back = eventually(15, || async { service_names(&p.status().await) == ["api"] }).await;
    assert!(back, "not reloaded after the fix: {}", p.status().await);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rewritten_in_place_reloads() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let admin = "[admin]\nlisten = \"127.0.0.1:0\"\nwatch_config = true\n";
    let api = service("api", &[blue.addr], &[green.addr], "");
    let p = TestProxy::start(&format!("{admin}{api}")).await;
    let text = std::fs::read_to_string(&p.config_path).expect("config");
    // The new content appears with a rename, as editors and config managers write it.
    let green2 = TestUpstream::start("green2").await;
    let moved = text.replace(&green.addr.to_string(), &green2.addr.to_string());
    assert_ne!(moved, text);
    let tmp = p.config_path.with_extension("tmp");
    std::fs::write(&tmp, &moved).expect("write");
    std::fs::rename(&tmp, &p.config_path).expect("rename");
    let reloaded = eventually(15, || async {
        p.service_status("api").await["colors"]["green"]["upstreams"][0]["addr"]
            == Value::String(green2.addr.to_string())
    })
    .await;
    assert!(reloaded, "not reloaded: {}", p.service_status("api").await);
    p.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The binary: logs, --version
// ---------------------------------------------------------------------------------------------

/// `switchyard serve` with stderr to a file, as a service manager or `2>file` runs it.
struct Served {
    child: tokio::process::Child,
    admin: SocketAddr,
    proxy: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Served {
    async fn start(body: &str, extra_args: &[&str]) -> Served {
        let dir = tempfile::tempdir().expect("tempdir");
        let (proxy_port, admin_port) = (free_port(), free_port());
        // `body` may bring its own [state].
        let state = if body.contains("[state]") {
            String::new()
        } else {
            format!(
                "[state]\npath = \"{}\"\n",
                dir.path().join("state.json").display()
            )
        };
        let text = format!(
            "[proxy]\nlisten = \"127.0.0.1:{proxy_port}\"\nshutdown_grace = \"2s\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n{state}{body}"
        );
        let config = dir.path().join("switchyard.toml");
        std::fs::write(&config, text).expect("config");
        let log = dir.path().join("switchyard.log");
        let file = std::fs::File::create(&log).expect("log file");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(extra_args)
            .args(["serve", "--config"])
            .arg(&config)
            .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
            .env("RUST_LOG", "info")
            // Whatever the test runner's environment says: the decision must come from stderr.
            .env_remove("NO_COLOR")
            .env_remove("CLICOLOR_FORCE")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::from(file))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn");
        let s = Served {
            child,
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            proxy: SocketAddr::from(([127, 0, 0, 1], proxy_port)),
            log,
            _dir: dir,
        };
        let up = eventually(20, || async {
            try_get(s.admin, "/healthz")
                .await
                .is_some_and(|(c, _)| c == 200)
        })
        .await;
        assert!(up, "switchyard did not start: {}", s.log_text());
        s
    }

    fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// SIGTERM, then the whole log.
    async fn stop(mut self) -> String {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await;
        let _ = self.child.kill().await;
        self.log_text()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_file_are_plain_and_name_colors() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let body = service("api", &[blue.addr], &[green.addr], "");

    for format in ["text", "json"] {
        let s = Served::start(&body, &["--log-format", format]).await;
        let (code, answer) = admin_post(
            s.admin,
            "/api/services/api/flip",
            Some(TOKEN),
            Some(serde_json::json!({"to": "green"})),
        )
        .await;
        assert_eq!(code, 200, "{answer}");
        assert_eq!(get(s.proxy, "/x").await, (200, "green\n".to_string()));
        let log = s.stop().await;
        assert!(
            !log.contains('\x1b'),
            "{format}: escape codes in a log written to a file:\n{log}"
        );
        assert!(
            !log.contains("Some("),
            "{format}: a debug form leaked:\n{log}"
        );
        assert!(
            !log.contains("Green"),
            "{format}: a debug form leaked:\n{log}"
        );
        let flip = log
            .lines()
            .find(|l| l.contains("flip blue -> green"))
            .unwrap_or_else(|| panic!("{format}: no flip line:\n{log}"));
        match format {
            "text" => {
                assert!(flip.contains(" INFO "), "{flip}");
                assert!(flip.contains("from=blue"), "{flip}");
                assert!(flip.contains("to=green"), "{flip}");
                assert!(flip.contains("generation=1"), "{flip}");
            }
            _ => {
                let v: Value = serde_json::from_str(flip).expect("a JSON log line");
                assert_eq!(v["level"], "INFO", "{v}");
                assert_eq!(v["fields"]["from"], "blue", "{v}");
                assert_eq!(v["fields"]["to"], "green", "{v}");
                assert_eq!(v["fields"]["generation"], 1, "{v}");
                // Every line of the file is JSON.
                for l in log.lines() {
                    assert!(serde_json::from_str::<Value>(l).is_ok(), "not JSON: {l}");
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_and_automatic_rollbacks_are_logged_at_warn() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let extra = "[services.health]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"2s\"\nunhealthy_after = 1\nhealthy_after = 1\n[services.rollback]\nwatch_for = \"10m\"\n[[services.rollback.triggers]]\nkind = \"unhealthy\"\nfor = \"0s\"\n";
    let s = Served::start(&service("api", &[blue.addr], &[green.addr], extra), &[]).await;
    let flipped = eventually(10, || async {
        admin_post(
            s.admin,
            "/api/services/api/flip",
            Some(TOKEN),
            Some(serde_json::json!({"to": "green"})),
        )
        .await
        .0 == 200
    })
    .await;
    assert!(flipped, "flip refused: {}", s.log_text());
    // Blue down first: the rollback is due but blocked...
    blue.set_health(500);
    let blue_down = eventually(20, || async {
        admin_get(s.admin, "/api/status").await.1["services"][0]["colors"]["blue"]["healthy"]
            == false
    })
    .await;
    assert!(blue_down, "blue never went unhealthy: {}", s.log_text());
    green.set_health(500);
    let blocked = eventually(20, || async {
        admin_get(s.admin, "/api/events").await.1["events"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["reason"] == "rollback_blocked"))
    })
    .await;
    assert!(blocked, "no blocked rollback: {}", s.log_text());
    // ...and happens once blue heals.
    blue.set_health(200);
    let rolled_back = eventually(20, || async {
        admin_get(s.admin, "/api/status").await.1["services"][0]["active"] == "blue"
    })
    .await;
    assert!(rolled_back, "no automatic rollback: {}", s.log_text());
    let log = s.stop().await;
    let line = log
        .lines()
        .find(|l| l.contains("reason=auto_rollback"))
        .unwrap_or_else(|| panic!("no rollback line:\n{log}"));
    assert!(line.contains(" WARN "), "{line}");
    assert!(line.contains("from=green to=blue"), "{line}");
    let line = log
        .lines()
        .find(|l| l.contains("reason=rollback_blocked"))
        .unwrap_or_else(|| panic!("no blocked rollback line:\n{log}"));
    assert!(line.contains(" WARN "), "{line}");
    // A manual flip stays at INFO.
    let manual = log
        .lines()
        .find(|l| l.contains("flip blue -> green"))
        .unwrap_or_else(|| panic!("no flip line:\n{log}"));
    assert!(manual.contains(" INFO "), "{manual}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_state_backend_is_logged_at_warn() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let etcd = dead_addr().await;
    let body = format!(
        "[state]\nbackend = \"etcd\"\netcd_endpoints = [\"http://{etcd}\"]\n{}",
        service("api", &[blue.addr], &[green.addr], "")
    );
    let s = Served::start(&body, &[]).await;
    let degraded = eventually(20, || async {
        admin_get(s.admin, "/api/status").await.1["state"]["degraded"] == true
    })
    .await;
    assert!(degraded, "not degraded: {}", s.log_text());
    // Traffic still flows on the config's colors.
    assert_eq!(get(s.proxy, "/x").await, (200, "blue\n".to_string()));
    let log = s.stop().await;
    let line = log
        .lines()
        .find(|l| l.contains("state degraded"))
        .unwrap_or_else(|| panic!("no degraded line:\n{log}"));
    assert!(line.contains(" WARN "), "{line}");
}

#[test]
fn version_names_the_commit() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("--version")
        .output()
        .expect("run --version");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let prefix = format!("switchyard {} (commit ", env!("CARGO_PKG_VERSION"));
    let commit = text
        .strip_prefix(&prefix)
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("unexpected --version: {text:?}"));
    // build.rs gives the package's targets the same value it gave the binary.
    assert_eq!(commit, env!("SWITCHYARD_GIT_COMMIT"), "{text}");
    // In a git checkout (CI's clone included) that is HEAD's short hash.
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if let (Some(head), None) = (head, std::env::var_os("SWITCHYARD_GIT_COMMIT")) {
        assert_eq!(commit, head, "{text}");
    }
}

// ---------------------------------------------------------------------------------------------
// Counters at 0
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_with_known_labels_exist_at_zero_from_the_start() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let api = service(
        "api",
        &[blue.addr],
        &[green.addr],
        "hosts = [\"api.test\"]\n",
    );
    let p = TestProxy::start(&api).await;
    let m = metrics_text(p.admin).await;
    for reason in [
        "manual",
        "rollback",
        "auto_rollback",
        "rollback_blocked",
        "release_phase",
        "release_rollback",
        "release_abort",
    ] {
        assert_eq!(
            metric(
                &m,
                "switchyard_flips_total",
                &[("service", "api"), ("reason", reason)]
            ),
            Some(0.0),
            "flips_total reason={reason}:\n{m}"
        );
    }
    for (color, up) in [("blue", blue.addr), ("green", green.addr)] {
        for kind in ["connect", "timeout", "reset", "5xx"] {
            let up = up.to_string();
            assert_eq!(
                metric(
                    &m,
                    "switchyard_upstream_failures_total",
                    &[
                        ("service", "api"),
                        ("color", color),
                        ("upstream", up.as_str()),
                        ("kind", kind)
                    ]
                ),
                Some(0.0),
                "upstream_failures_total {color} {kind}:\n{m}"
            );
        }
    }
    for result in ["ok", "error"] {
        assert_eq!(
            metric(&m, "switchyard_config_reloads_total", &[("result", result)]),
            Some(0.0),
            "{m}"
        );
    }
    // A service added by a reload gets its counters too.
    let web = service(
        "web",
        &[blue.addr],
        &[green.addr],
        "hosts = [\"web.test\"]\n",
    );
    let text = std::fs::read_to_string(&p.config_path).expect("config");
    std::fs::write(&p.config_path, format!("{text}{web}")).expect("write");
    let (code, answer) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(code, 200, "{answer}");
    let m = metrics_text(p.admin).await;
    assert_eq!(
        metric(
            &m,
            "switchyard_flips_total",
            &[("service", "web"), ("reason", "auto_rollback")]
        ),
        Some(0.0),
        "{m}"
    );
    p.stop().await;
}

/// Settings a listener reads once when it starts (its connection budget, h2 settings, admin
/// deadlines) take a restart: a reload that changes them says so in `restart_required`, as the
/// listen addresses do, instead of answering as if they were applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_names_the_listener_settings_that_take_a_restart() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let head = "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\nmax_connections = 2\n\
                h2_max_concurrent_streams = 10\nupstream_max_idle = 4\n\
                [admin]\nlisten = \"127.0.0.1:0\"\nmax_connections = 2\nidle_timeout = \"30s\"\n";
    let api = service("api", &[blue.addr], &[green.addr], "");
    let p = TestProxy::start(&format!("{head}{api}")).await;
    let text = std::fs::read_to_string(&p.config_path).expect("config");
    let changed = text
        .replace("max_connections = 2", "max_connections = 50")
        .replace(
            "h2_max_concurrent_streams = 10",
            "h2_max_concurrent_streams = 20",
        )
        .replace("upstream_max_idle = 4", "upstream_max_idle = 8")
        .replace("idle_timeout = \"30s\"", "idle_timeout = \"40s\"");
    std::fs::write(&p.config_path, changed).expect("write");
    let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["restart_required"],
        serde_json::json!([
            "proxy.max_connections",
            "proxy.h2_max_concurrent_streams",
            "proxy.upstream_max_idle",
            "admin.max_connections",
            "admin.idle_timeout"
        ]),
        "{v}"
    );
    p.stop().await;
}

/// A reload refuses what the next start would: the files a config names are checked as
/// `check` and `serve` check them (a CA file that cannot be read was accepted by a reload, and
/// every `https://` analysis query or webhook failed after it; a hosts file that is the state
/// file, likewise), naming the key; the running config stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_refuses_what_the_next_start_would() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&service("api", &[blue.addr], &[green.addr], "")).await;
    let text = std::fs::read_to_string(&p.config_path).expect("config");
    let dir = p.config_path.parent().expect("dir").to_path_buf();
    let state = dir.join("state.json");
    for (extra, key) in [
        (
            format!(
                "[analysis]\nca_file = \"{}\"\n",
                dir.join("none.pem").display()
            ),
            "analysis.ca_file",
        ),
        (
            format!(
                "[notify]\nca_file = \"{}\"\n",
                dir.join("none.pem").display()
            ),
            "notify.ca_file",
        ),
    ] {
        std::fs::write(&p.config_path, format!("{text}\n{extra}")).expect("write");
        let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
        assert_eq!(s, 400, "{key}: {v}");
        assert!(v.to_string().contains(key), "{key}: {v}");
    }
    let hosts = text.replacen(
        "[proxy]\n",
        &format!("[proxy]\nresolve_hosts_file = \"{}\"\n", state.display()),
        1,
    );
    assert_ne!(hosts, text, "the config has a [proxy] table");
    std::fs::write(&p.config_path, hosts).expect("write");
    let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(s, 400, "{v}");
    assert!(v.to_string().contains("state.path"), "{v}");
    // The running config stayed; the file as it was reloads.
    std::fs::write(&p.config_path, &text).expect("write");
    let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(p.get("/x").await.0, 200);
    p.stop().await;
}

/// A key that takes a restart stays reported by every reload until the restart: the second
/// reload of the same file compared with the first one's config, which holds values never
/// applied, and answered that nothing needed a restart while the old port was still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reload_names_the_changes_that_wait_for_a_restart() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let head = "[proxy]\nlisten = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\nmax_connections = 2\n";
    let api = service("api", &[blue.addr], &[green.addr], "");
    let p = TestProxy::start(&format!("{head}{api}")).await;
    let original = std::fs::read_to_string(&p.config_path).expect("config");
    let moved = original.replace(
        "listen = \"127.0.0.1:0\"\nshutdown_grace",
        &format!("listen = \"127.0.0.1:{}\"\nshutdown_grace", free_port()),
    );
    assert_ne!(moved, original);
    std::fs::write(&p.config_path, &moved).expect("write");
    for round in 0..3 {
        let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(
            v["restart_required"],
            serde_json::json!(["proxy.listen"]),
            "reload {round}: {v}"
        );
        let m = v["message"].as_str().unwrap_or_default();
        assert!(m.contains("only after a restart: proxy.listen"), "{m}");
    }
    // Another such change is added to it, not put in its place.
    std::fs::write(
        &p.config_path,
        moved.replace("max_connections = 2", "max_connections = 3"),
    )
    .expect("write");
    let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["restart_required"],
        serde_json::json!(["proxy.listen", "proxy.max_connections"]),
        "{v}"
    );
    // The old port is what is served; the file back as it started with needs nothing.
    assert_eq!(p.get("/").await, (200, "blue\n".to_string()));
    std::fs::write(&p.config_path, &original).expect("write");
    let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["restart_required"], serde_json::json!([]), "{v}");
    let details: Vec<String> = p
        .events()
        .await
        .iter()
        .filter(|e| e["reason"] == "reload")
        .filter_map(|e| e["detail"].as_str().map(str::to_string))
        .collect();
    assert_eq!(details.len(), 5, "{details:?}");
    assert!(
        details[..4].iter().all(|d| d.contains("proxy.listen")),
        "{details:?}"
    );
    assert!(!details[4].contains("restart"), "{details:?}");
    p.stop().await;
}

/// The state file's view of a service: (active, generation).
fn stored_state(dir: &Path, name: &str) -> Option<(String, u64)> {
    let bytes = std::fs::read(dir.join("state.json")).ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    let s = &v["services"][name];
    Some((s["active"].as_str()?.to_string(), s["generation"].as_u64()?))
}

/// A service removed by a reload and put back by another is served at the state the store holds
/// for it, as a start would serve it: it came back on the config's color (blue, generation 0)
/// while the state file still said green, and an upgrade or restart then switched traffic with
/// no flip and no event. A write while it was out (a flip of another service) keeps it in the
/// file, and a restart serves the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_removed_and_added_back_by_reload_keeps_its_stored_state() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let api = service(
        "api",
        &[blue.addr],
        &[green.addr],
        "path_prefix = \"/api\"\n",
    );
    let web = service("web", &[blue.addr], &[green.addr], "");
    let p = TestProxy::start(&format!("{api}{web}")).await;
    let (s, v) = p.flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    let original = std::fs::read_to_string(&p.config_path).expect("config");
    let renamed = original.replace("name = \"api\"", "name = \"api-renamed\"");
    assert_ne!(renamed, original);
    std::fs::write(&p.config_path, &renamed).expect("write");
    let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{v}");
    // A write while `api` is out of the config: the file keeps it.
    let (s, v) = p.flip("web", "green").await;
    assert_eq!(s, 200, "{v}");
    std::fs::write(&p.config_path, &original).expect("write");
    let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{v}");
    let st = p.service_status("api").await;
    assert_eq!(
        (st["active"].clone(), st["generation"].clone()),
        (Value::from("green"), Value::from(1)),
        "{st}"
    );
    assert_eq!(p.get("/api/x").await, (200, "green\n".to_string()));
    let dir = p.stop().await;
    assert_eq!(
        stored_state(dir.path(), "api"),
        Some(("green".to_string(), 1))
    );
    let p = TestProxy::start_with(&format!("{api}{web}"), Some(TOKEN), Some(dir)).await;
    let st = p.service_status("api").await;
    assert_eq!(
        (st["active"].clone(), st["generation"].clone()),
        (Value::from("green"), Value::from(1)),
        "{st}"
    );
    p.stop().await;
}

/// A live color changes only by a flip. A never-flipped service is written to the state file at
/// startup (the color served), so a reload that changes its `active` keeps the color served and
/// says so (`active_not_applied`), and a restart serves that color too ("the file wins"): a
/// restart used to switch traffic to the new `active` with no flip, no event, the same generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_active_is_not_applied_by_reload_nor_by_restart() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let api = service("api", &[blue.addr], &[green.addr], "active = \"blue\"\n");
    let p = TestProxy::start(&api).await;
    let dir = p.dir.as_ref().expect("dir").path().to_path_buf();
    assert_eq!(stored_state(&dir, "api"), Some(("blue".to_string(), 0)));
    let text = std::fs::read_to_string(&p.config_path).expect("config");
    let changed = text.replace("active = \"blue\"", "active = \"green\"");
    assert_ne!(changed, text);
    std::fs::write(&p.config_path, &changed).expect("write");
    let (s, v) = admin_post(p.admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["active_not_applied"], serde_json::json!(["api"]), "{v}");
    assert_eq!(p.get("/").await, (200, "blue\n".to_string()));
    let dir = p.stop().await;
    let green_api = api.replace("active = \"blue\"", "active = \"green\"");
    assert_ne!(green_api, api);
    let p = TestProxy::start_with(&green_api, Some(TOKEN), Some(dir)).await;
    let st = p.service_status("api").await;
    assert_eq!(
        (st["active"].clone(), st["generation"].clone()),
        (Value::from("blue"), Value::from(0)),
        "{st}"
    );
    assert_eq!(p.get("/").await, (200, "blue\n".to_string()));
    p.stop().await;
}

/// `shutdown_grace` changed by a reload is the one the next SIGTERM gives in-flight requests
/// (it was read once, when the listener started: a longer grace set for long requests cut
/// them at the old one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reloaded_shutdown_grace_is_the_one_sigterm_uses() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let s = Served::start(&service("api", &[blue.addr], &[green.addr], ""), &[]).await;
    let config = s._dir.path().join("switchyard.toml");
    let text = std::fs::read_to_string(&config).expect("read config");
    assert!(text.contains("shutdown_grace = \"2s\""), "{text}");
    std::fs::write(
        &config,
        text.replace("shutdown_grace = \"2s\"", "shutdown_grace = \"30s\""),
    )
    .expect("write config");
    let (code, v) = admin_post(s.admin, "/api/reload", Some(TOKEN), None).await;
    assert_eq!(code, 200, "{v}");
    // Longer than the old grace, well inside the new one.
    blue.set_delay(4000);
    let proxy = s.proxy;
    let slow = tokio::spawn(async move { try_get(proxy, "/slow").await });
    assert!(eventually(5, || async { blue.hits() > 0 }).await);
    let log = s.stop().await;
    let answer = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("the slow request was left hanging")
        .expect("join");
    assert_eq!(answer, Some((200, "blue\n".to_string())), "{log}");
}
