//! Releases end to end: real upstreams, a real Switchyard, the admin API and `ctl release`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::etcd::Etcd;
use common::*;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Two services, `api` (/api) and `panel` (/panel), each with its own blue and green upstream,
/// both on blue; `panel` and `api` roll back on a 50% error rate over a 5 s window.
struct Rig {
    api: [Arc<TestUpstream>; 2],
    panel: [Arc<TestUpstream>; 2],
    p: TestProxy,
    body: String,
}

const TRIGGERS: &str = "[services.rollback]\nwatch_for = \"10m\"\nmin_requests = 10\n[[services.rollback.triggers]]\nkind = \"error_rate\"\nabove = 0.5\nover = \"5s\"\nfor = \"1s\"\n";

impl Rig {
    async fn start() -> Rig {
        Rig::build("", "").await
    }

    /// As [`Rig::start`], with `api_extra` in api's service table and `tail` after the services.
    async fn build(api_extra: &str, tail: &str) -> Rig {
        let api = [
            TestUpstream::start("api-blue").await,
            TestUpstream::start("api-green").await,
        ];
        let panel = [
            TestUpstream::start("panel-blue").await,
            TestUpstream::start("panel-green").await,
        ];
        let body = format!(
            "{}{}",
            service(
                "api",
                &[api[0].addr],
                &[api[1].addr],
                &format!("path_prefix = \"/api\"\n{api_extra}{TRIGGERS}")
            ),
            service(
                "panel",
                &[panel[0].addr],
                &[panel[1].addr],
                &format!("path_prefix = \"/panel\"\n{TRIGGERS}")
            ),
        ) + tail;
        let p = TestProxy::start(&body).await;
        Rig {
            api,
            panel,
            p,
            body,
        }
    }

    /// Stops Switchyard, waits `down`, starts it again on the same state directory.
    async fn restart(self, down: Duration) -> Rig {
        let Rig {
            api,
            panel,
            p,
            body,
        } = self;
        let dir = p.stop().await;
        tokio::time::sleep(down).await;
        let p = TestProxy::start_with(&body, Some(TOKEN), Some(dir)).await;
        Rig {
            api,
            panel,
            p,
            body,
        }
    }

    async fn serving(&self) -> (String, String) {
        (self.p.get("/api/x").await.1, self.p.get("/panel/x").await.1)
    }

    async fn releases(&self) -> Value {
        admin_get(self.p.admin, "/api/releases").await.1
    }

    async fn start_release(&self, plan: Value) -> (u16, Value) {
        admin_post(self.p.admin, "/api/releases", Some(TOKEN), Some(plan)).await
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        admin_post(self.p.admin, path, Some(TOKEN), Some(body)).await
    }

    /// Waits (bounded) until the current release matches `f`; panics with the state otherwise.
    async fn wait_current(&self, secs: u64, what: &str, f: impl Fn(&Value) -> bool) {
        let ok = eventually(secs, || async { f(&self.releases().await["current"]) }).await;
        assert!(ok, "{what}: {}", self.releases().await);
    }

    /// Waits (bounded) for the release to end; answers it.
    async fn wait_end(&self, secs: u64) -> Value {
        let ok = eventually(secs, || async {
            self.releases().await["current"].is_null()
        })
        .await;
        let all = self.releases().await;
        assert!(ok, "the release did not end: {all}");
        all["recent"][0].clone()
    }

    async fn events(&self, reason: &str) -> Vec<Value> {
        self.p
            .events()
            .await
            .into_iter()
            .filter(|e| e["reason"] == reason)
            .collect()
    }

    async fn metrics(&self) -> String {
        get(self.p.admin, "/metrics").await.1
    }
}

fn two_phases(bake1: &str, bake2: &str, gate1: &str, validate: &str) -> Value {
    json!({
        "name": "feature release",
        "validate": validate,
        "phases": [
            { "name": "backend", "services": ["api"], "bake": bake1, "gate": gate1 },
            { "name": "frontend", "services": ["panel"], "bake": bake2 },
        ]
    })
}

/// Requests on `path` until cancelled.
fn drive(addr: std::net::SocketAddr, path: &'static str) -> CancellationToken {
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

/// `switchyard ctl release wait` against the rig; its exit code.
fn ctl_wait(admin: std::net::SocketAddr) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "ctl",
            "--admin",
            &format!("http://{admin}"),
            "--timeout",
            "60s",
            "release",
            "wait",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn ctl")
}

async fn exit_code(mut child: tokio::process::Child) -> i32 {
    tokio::time::timeout(Duration::from_secs(90), child.wait())
        .await
        .expect("ctl release wait did not end")
        .expect("wait")
        .code()
        .unwrap_or(-1)
}

fn metric_line(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_phase_release_completes_and_ctl_wait_exits_0() {
    let r = Rig::start().await;
    let m = r.metrics().await;
    assert_eq!(metric_line(&m, "switchyard_release_phase "), Some(-1.0));
    for result in ["complete", "rolled_back", "aborted"] {
        assert_eq!(
            metric_line(
                &m,
                &format!("switchyard_releases_total{{result=\"{result}\"}}")
            ),
            Some(0.0),
            "{m}"
        );
    }
    assert_eq!(
        r.serving().await,
        ("api-blue\n".into(), "panel-blue\n".into())
    );
    let (s, v) = r.start_release(two_phases("1s", "1s", "auto", "1s")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["release"]["state"], "running");
    let wait = ctl_wait(r.p.admin);
    let end = r.wait_end(30).await;
    assert_eq!(end["state"], "complete", "{end}");
    assert_eq!(end["phases"][0]["state"], "passed");
    assert_eq!(end["phases"][1]["state"], "passed");
    assert_eq!(end["phases"][1]["to"], "green");
    assert!(end["phases"][1]["bake_ends_at"].is_string());
    assert_eq!(exit_code(wait).await, 0);
    assert_eq!(
        r.serving().await,
        ("api-green\n".into(), "panel-green\n".into())
    );
    assert_eq!(r.events("release_start").await.len(), 1);
    assert_eq!(r.events("release_complete").await.len(), 1);
    // One flip event per service, through the app's one commit path.
    let flips: Vec<Value> = r
        .events("release_phase")
        .await
        .into_iter()
        .filter(|e| e["to"] == "green")
        .collect();
    assert_eq!(flips.len(), 2, "{flips:?}");
    let m = r.metrics().await;
    assert_eq!(
        metric_line(&m, "switchyard_releases_total{result=\"complete\"}"),
        Some(1.0)
    );
    assert_eq!(metric_line(&m, "switchyard_release_phase "), Some(-1.0));
    r.p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_in_phase_2_returns_both_services_in_one_step_and_ctl_wait_exits_1() {
    let r = Rig::start().await;
    let (s, v) = r
        .start_release(two_phases("1s", "10m", "auto", "10m"))
        .await;
    assert_eq!(s, 200, "{v}");
    r.wait_current(20, "phase 2 baking", |c| {
        c["phase"] == 1 && c["phases"][1]["state"] == "baking"
    })
    .await;
    assert_eq!(
        metric_line(&r.metrics().await, "switchyard_release_phase "),
        Some(1.0)
    );
    // A second release is refused while this one runs, naming it.
    let (s, v) = r.start_release(two_phases("1s", "1s", "auto", "1s")).await;
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("feature release"),
        "{v}"
    );
    let wait = ctl_wait(r.p.admin);
    r.panel[1].set_status(500);
    let traffic = drive(r.p.proxy, "/panel/x");
    let end = r.wait_end(30).await;
    traffic.cancel();
    assert_eq!(end["state"], "rolled_back", "{end}");
    assert_eq!(
        r.serving().await,
        ("api-blue\n".into(), "panel-blue\n".into())
    );
    let evs = r.events("release_rollback").await;
    assert_eq!(evs.len(), 1, "{evs:?}");
    let ev = &evs[0];
    assert_eq!(ev["service"], "panel", "{ev}");
    assert_eq!(ev["trigger"]["service"], "panel", "{ev}");
    assert_eq!(ev["trigger"]["kind"], "error_rate", "{ev}");
    assert_eq!(ev["trigger"]["threshold"], 0.5, "{ev}");
    assert!(ev["trigger"]["value"].as_f64().unwrap_or(0.0) > 0.5, "{ev}");
    let returned = ev["trigger"]["returned"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(returned.len(), 2, "{ev}");
    // The per-service engine did not roll back on its own as well.
    assert!(r.events("auto_rollback").await.is_empty());
    // The trigger that fired shows so, as after a plain automatic rollback, and stays so.
    let panel_trigger = || async { r.p.service_status("panel").await["triggers"][0].clone() };
    assert!(
        eventually(10, || async { panel_trigger().await["state"] == "fired" }).await,
        "{}",
        panel_trigger().await
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(panel_trigger().await["state"], "fired");
    assert_eq!(exit_code(wait).await, 1);
    let m = r.metrics().await;
    assert_eq!(
        metric_line(&m, "switchyard_releases_total{result=\"rolled_back\"}"),
        Some(1.0)
    );
    // Each service's return is a change of its live color, counted under its own name.
    for svc in ["api", "panel"] {
        assert_eq!(
            metric_line(
                &m,
                &format!("switchyard_flips_total{{reason=\"release_rollback\",service=\"{svc}\"}}")
            ),
            Some(1.0),
            "{svc}"
        );
    }
    r.p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_gate_waits_for_promote() {
    let r = Rig::start().await;
    let (s, v) = r
        .start_release(two_phases("0s", "0s", "manual", "0s"))
        .await;
    assert_eq!(s, 200, "{v}");
    r.wait_current(20, "waiting at the gate", |c| {
        c["state"] == "waiting" && c["phases"][0]["state"] == "waiting"
    })
    .await;
    // It holds: the panel is not flipped while nobody promotes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(r.releases().await["current"]["state"], "waiting");
    assert_eq!(
        r.serving().await,
        ("api-green\n".into(), "panel-blue\n".into())
    );
    let (s, v) = r.post("/api/releases/current/promote", json!({})).await;
    assert_eq!(s, 200, "{v}");
    let end = r.wait_end(20).await;
    assert_eq!(end["state"], "complete", "{end}");
    assert_eq!(
        r.serving().await,
        ("api-green\n".into(), "panel-green\n".into())
    );
    assert_eq!(r.events("release_promote").await.len(), 1);
    // Nothing to promote any more.
    let (s, _) = r.post("/api/releases/current/promote", json!({})).await;
    assert_eq!(s, 409);
    r.p.stop().await;
}

/// A service whose rollback rule could not have fired (its `prometheus` trigger blind: every
/// query failed, `on_error = "hold"`) does not let the release end `complete` unnoticed: the
/// release pauses at the end of the validate window naming the service and the trigger, `ctl
/// release wait` keeps waiting, and a promote accepts it (it used to end `complete`, every
/// phase `passed`, with nothing said).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_whose_analysis_is_blind_pauses_before_it_completes() {
    // A port nothing listens on: every query is refused.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let tail = format!(
        "[[services.rollback.triggers]]\nkind = \"prometheus\"\nquery = \"up\"\nabove = 0.5\n\
         interval = \"100ms\"\nmax_errors = 2\n\
         [analysis]\nprometheus_url = \"http://{dead}\"\ntimeout = \"500ms\"\n"
    );
    let r = Rig::build("", &tail).await;
    let (s, v) = r.start_release(two_phases("0s", "0s", "auto", "2s")).await;
    assert_eq!(s, 200, "{v}");
    let wait = ctl_wait(r.p.admin);
    r.wait_current(30, "paused for blind analysis", |c| {
        c["paused"]
            .as_str()
            .is_some_and(|p| p.contains("analysis is blind for panel trigger[1] (prometheus)"))
    })
    .await;
    // It holds: not complete while nobody promotes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(r.releases().await["current"].is_object());
    let (s, v) = r.post("/api/releases/current/promote", json!({})).await;
    assert_eq!(s, 200, "{v}");
    let end = r.wait_end(20).await;
    assert_eq!(end["state"], "complete", "{end}");
    assert_eq!(exit_code(wait).await, 0);
    let paused: Vec<Value> = r
        .events("release_phase")
        .await
        .into_iter()
        .filter(|e| {
            e["detail"]
                .as_str()
                .is_some_and(|d| d.contains("analysis is blind"))
        })
        .collect();
    assert_eq!(paused.len(), 1, "{paused:?}");
    r.p.stop().await;
}

/// A service whose own `watch_for` has ended while the release's bake still runs is armed by the
/// release (its triggers roll the release back, as the watcher decides): `/api/status`,
/// `switchyard_rollback_armed` and `ctl status` say armed too, not `armed=false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_armed_only_by_the_release_shows_armed_everywhere() {
    let api = [
        TestUpstream::start("api-blue").await,
        TestUpstream::start("api-green").await,
    ];
    let short = TRIGGERS.replace("watch_for = \"10m\"", "watch_for = \"1s\"");
    let body = service(
        "api",
        &[api[0].addr],
        &[api[1].addr],
        &format!("path_prefix = \"/api\"\n{short}"),
    );
    let p = TestProxy::start(&body).await;
    let plan = json!({
        "name": "r", "validate": "10m",
        "phases": [{ "name": "backend", "services": ["api"], "bake": "10m" }],
    });
    let (s, v) = admin_post(p.admin, "/api/releases", Some(TOKEN), Some(plan)).await;
    assert_eq!(s, 200, "{v}");
    // watch_for (1 s) ends; the release keeps api armed for its bake.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let svc = p.service_status("api").await;
    assert_eq!(svc["active"], "green", "{svc}");
    assert_eq!(svc["armed"], true, "{svc}");
    assert_eq!(svc["armed_by_release"], true, "{svc}");
    let text = get(p.admin, "/metrics").await.1;
    assert_eq!(
        metric(&text, "switchyard_rollback_armed", &[("service", "api")]),
        Some(1.0),
        "{text}"
    );
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["ctl", "--admin", &format!("http://{}", p.admin), "status"])
        .output()
        .await
        .expect("ctl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("armed by the running release"), "{stdout}");
    p.stop().await;
}

/// Phase 0's pre-flip checks fail at start (api's green pool is dead): the start is refused
/// with 409 and the check's reason; no release is started, none ends `rolled_back` having
/// flipped nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_whose_first_phase_cannot_flip_is_refused() {
    let r = Rig::build(HEALTH, "").await;
    r.api[1].set_health(500);
    let dead = eventually(10, || async {
        let api = r.p.service_status("api").await;
        api["colors"]["blue"]["healthy"] == true && api["colors"]["green"]["healthy"] == false
    })
    .await;
    assert!(dead, "{}", r.p.status().await);
    let plan = json!({
        "name": "onto a dead pool",
        "phases": [{ "name": "backend", "services": ["api"], "bake": "1s" }],
    });
    let (s, v) = r.start_release(plan).await;
    assert_eq!(s, 409, "{v}");
    let why = v["error"].as_str().unwrap_or_default();
    assert!(why.contains("phase 0 \"backend\" cannot flip"), "{v}");
    assert!(why.contains("no healthy upstream"), "{v}");
    assert!(!why.contains("force"), "{v}");
    let all = r.releases().await;
    assert!(all["current"].is_null(), "{all}");
    assert_eq!(all["recent"].as_array().map(Vec::len), Some(0), "{all}");
    assert!(r.events("release_start").await.is_empty());
    assert_eq!(r.serving().await.0, "api-blue\n");
    r.p.stop().await;
}

/// A forced action that is refused (a rollback of a service with no previous color) or changes
/// nothing (a flip to the live color, a pause of a paused service) leaves the release running,
/// unpaused, with no `release_phase` event claiming it was paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_action_that_changes_nothing_does_not_pause_the_release() {
    let r = Rig::start().await;
    let (s, v) = r
        .start_release(two_phases("10m", "10m", "auto", "10m"))
        .await;
    assert_eq!(s, 200, "{v}");
    r.wait_current(20, "phase 1 baking", |c| {
        c["phases"][0]["state"] == "baking"
    })
    .await;
    let (s, v) = r
        .post("/api/services/panel/rollback", json!({ "force": true }))
        .await;
    assert_eq!(s, 409, "{v}");
    let (s, v) = r
        .post(
            "/api/services/api/flip",
            json!({ "to": "green", "force": true }),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["changed"], false, "{v}");
    let cur = r.releases().await["current"].clone();
    assert!(cur["paused"].is_null(), "{cur}");
    assert_eq!(cur["state"], "running", "{cur}");
    let paused_events: Vec<Value> = r
        .events("release_phase")
        .await
        .into_iter()
        .filter(|e| e["detail"].as_str().unwrap_or("").contains("forced"))
        .collect();
    assert!(paused_events.is_empty(), "{paused_events:?}");
    // A forced change that does change something still pauses it.
    let (s, v) = r
        .post("/api/services/panel/pause", json!({ "force": true }))
        .await;
    assert_eq!(s, 200, "{v}");
    let cur = r.releases().await["current"].clone();
    assert!(
        cur["paused"]
            .as_str()
            .unwrap_or("")
            .contains("forced pause of panel"),
        "{cur}"
    );
    r.p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_returns_everything_and_manual_changes_inside_are_guarded() {
    let r = Rig::start().await;
    let (s, v) = r
        .start_release(two_phases("1s", "10m", "auto", "10m"))
        .await;
    assert_eq!(s, 200, "{v}");
    r.wait_current(20, "phase 2 baking", |c| {
        c["phases"][1]["state"] == "baking"
    })
    .await;
    // A manual flip, rollback or pause of a service inside the release: 409 unless forced.
    let (s, v) = r.p.flip("api", "blue").await;
    assert_eq!(s, 409, "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("release"), "{v}");
    // A flip to the color already live is a no-op, answered 200 as always (it was refused);
    // the release runs on, unpaused.
    let (s, v) = r.p.flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["changed"], false, "{v}");
    let cur = r.releases().await["current"].clone();
    assert!(cur["paused"].is_null(), "{cur}");
    let (s, _) = r.post("/api/services/panel/rollback", json!({})).await;
    assert_eq!(s, 409);
    let (s, _) = r.post("/api/services/panel/pause", json!({})).await;
    assert_eq!(s, 409);
    // A forced one goes through and pauses the release, which says so.
    let (s, v) = r
        .post("/api/services/panel/pause", json!({ "force": true }))
        .await;
    assert_eq!(s, 200, "{v}");
    let cur = r.releases().await["current"].clone();
    assert!(
        cur["paused"]
            .as_str()
            .unwrap_or("")
            .contains("forced pause"),
        "{cur}"
    );
    let (s, _) = r.post("/api/services/panel/resume", json!({})).await;
    assert_eq!(s, 200);
    // Reload keeps the release.
    let (s, v) = r.post("/api/reload", json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(r.releases().await["current"]["id"], cur["id"]);

    // A bad body is a 400 and changes nothing: it is never taken for an empty one.
    let auth = format!("Bearer {TOKEN}");
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    for (path, body) in [
        ("/api/releases/current/abort", "nope"),
        ("/api/releases/current/abort", "{\"now\": true}"),
        ("/api/releases/current/promote", "[1]"),
        ("/api/services/panel/resume", "nope"),
        ("/api/reload", "{\"file\": \"x\"}"),
    ] {
        let (s, text) = request(r.p.admin, "POST", path, &headers, body.into()).await;
        assert_eq!(s, 400, "{path} {body}: {text}");
        assert!(text.contains("\"error\""), "{text}");
    }
    assert_eq!(r.releases().await["current"]["id"], cur["id"]);
    assert_eq!(
        r.serving().await,
        ("api-green\n".into(), "panel-green\n".into())
    );
    let (s, v) = r.post("/api/releases/current/abort", json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["returned"].as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(
        r.serving().await,
        ("api-blue\n".into(), "panel-blue\n".into())
    );
    let end = r.releases().await["recent"][0].clone();
    assert_eq!(end["state"], "aborted", "{end}");
    assert_eq!(r.events("release_abort").await.len(), 1);
    let m = r.metrics().await;
    assert_eq!(
        metric_line(&m, "switchyard_releases_total{result=\"aborted\"}"),
        Some(1.0)
    );
    // The abort's one event counts each service it returned, and no series names "*".
    for svc in ["api", "panel"] {
        assert_eq!(
            metric_line(
                &m,
                &format!("switchyard_flips_total{{reason=\"release_abort\",service=\"{svc}\"}}")
            ),
            Some(1.0),
            "{svc}"
        );
    }
    assert!(!m.contains("service=\"*\""), "{m}");
    let (s, _) = r.post("/api/releases/current/abort", json!({})).await;
    assert_eq!(s, 409);
    r.p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_with_errors_is_refused_with_every_error_and_its_key() {
    let r = Rig::start().await;
    let (s, v) = r
        .start_release(json!({
            "validate": "soon",
            "phases": [
                { "name": "a", "services": ["api", "ghost"], "bake": "1m", "gate": "maybe" },
                { "name": "a", "services": ["api"], "to": "red" },
            ]
        }))
        .await;
    assert_eq!(s, 400, "{v}");
    let errs: Vec<String> = v["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e.as_str().map(str::to_string))
        .collect();
    for key in [
        "name: ",
        "validate: ",
        "phases[0].services[1]: ",
        "phases[0].gate: ",
        "phases[1].name: ",
        "phases[1].services[0]: ",
        "phases[1].to: ",
        "phases[1].bake: ",
    ] {
        assert!(errs.iter().any(|e| e.starts_with(key)), "{key} in {errs:?}");
    }
    assert!(r.releases().await["current"].is_null());
    // Unauthenticated: refused.
    let (s, _) = admin_post(
        r.p.admin,
        "/api/releases",
        None,
        Some(two_phases("1s", "1s", "auto", "1s")),
    )
    .await;
    assert_eq!(s, 401);
    // The same checks offline, from the TOML file.
    let out = check_release(
        &r.p,
        "name = \"x\"\n[[phases]]\nname = \"a\"\nservices = [\"ghost\"]\nbake = \"1m\"\ngate = \"maybe\"\n",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("phases[0].services[0]: unknown service \"ghost\""),
        "{err}"
    );
    assert!(err.contains("phases[0].gate: "), "{err}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "--release", "config/releases/example.toml"])
        .output()
        .expect("check");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    r.p.stop().await;
}

/// A bake or validate window too long to be a deadline is a plan error at its key, not a panic
/// of the driver after the phase flipped (which left the flip out of the release: an abort
/// returned nothing and the release never ended).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurdly_long_bake_or_validate_is_refused_with_its_key() {
    let r = Rig::start().await;
    let (s, v) = r
        .start_release(two_phases(
            "500000000000h",
            "1s",
            "auto",
            "18446744073709551615s",
        ))
        .await;
    assert_eq!(s, 400, "{v}");
    let errors = v["errors"].to_string();
    assert!(errors.contains("phases[0].bake: invalid duration"), "{v}");
    assert!(errors.contains("validate: invalid duration"), "{v}");
    assert!(r.releases().await["current"].is_null());
    assert_eq!(
        r.serving().await,
        ("api-blue\n".into(), "panel-blue\n".into())
    );
    // The longest allowed bake is a release like any other: it flips, bakes, and aborts whole.
    let (s, v) = r
        .start_release(two_phases("3650d", "1s", "auto", "1s"))
        .await;
    assert_eq!(s, 200, "{v}");
    r.wait_current(20, "phase 1 baking", |c| {
        c["phases"][0]["state"] == "baking"
    })
    .await;
    let (s, v) = r.post("/api/releases/current/abort", json!({})).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["returned"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(
        r.serving().await,
        ("api-blue\n".into(), "panel-blue\n".into())
    );
    r.p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_to_a_latched_color_is_refused_without_force() {
    let r = Rig::start().await;
    let (s, v) = r.p.flip("panel", "green").await;
    assert_eq!(s, 200, "{v}");
    r.panel[1].set_status(500);
    let traffic = drive(r.p.proxy, "/panel/x");
    let ok = eventually(20, || async { !r.events("auto_rollback").await.is_empty() }).await;
    traffic.cancel();
    assert!(ok, "no auto_rollback: {:?}", r.p.events().await);
    let svc = r.p.service_status("panel").await;
    assert_eq!(svc["active"], "blue", "{svc}");
    // "Roll back" now would go to green, the color that just failed.
    let (s, v) = r.post("/api/services/panel/rollback", json!({})).await;
    assert_eq!(s, 409, "{v}");
    assert!(v["error"].as_str().unwrap_or("").contains("latched"), "{v}");
    assert_eq!(r.p.get("/panel/x").await.1, "panel-blue\n");
    r.panel[1].set_status(200);
    let (s, v) = r
        .post("/api/services/panel/rollback", json!({ "force": true }))
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(r.p.get("/panel/x").await.1, "panel-green\n");
    let _ = &r.api;
    r.p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_bake_resumes_with_the_time_already_spent() {
    let r = Rig::start().await;
    let (s, v) = r.start_release(two_phases("1s", "8s", "auto", "1s")).await;
    assert_eq!(s, 200, "{v}");
    r.wait_current(20, "phase 2 baking", |c| {
        c["phases"][1]["state"] == "baking"
    })
    .await;
    let id = r.releases().await["current"]["id"].clone();
    let r = r.restart(Duration::from_secs(3)).await;
    let cur = r.releases().await["current"].clone();
    assert_eq!(cur["id"], id, "{cur}");
    assert_eq!(cur["phase"], 1, "{cur}");
    assert_eq!(cur["phases"][0]["state"], "passed", "{cur}");
    assert_eq!(cur["phases"][1]["state"], "baking", "{cur}");
    // The 3 s the process was down count: less than 8 - 3 s of the bake is left.
    let left = cur["phases"][1]["bake_left_secs"]
        .as_f64()
        .expect("bake_left_secs");
    assert!(left <= 5.0, "{cur}");
    assert_eq!(
        r.serving().await,
        ("api-green\n".into(), "panel-green\n".into())
    );
    assert!(
        r.events("release_phase").await.iter().any(|e| e["detail"]
            .as_str()
            .unwrap_or("")
            .contains("resumed after a restart")),
        "{:?}",
        r.p.events().await
    );
    let end = r.wait_end(30).await;
    assert_eq!(end["state"], "complete", "{end}");
    assert_eq!(end["id"], id);
    // Nothing is left to resume after the end.
    let r = r.restart(Duration::ZERO).await;
    assert!(r.releases().await["current"].is_null());
    r.p.stop().await;
}

/// The ended releases survive a restart: `recent` lists them again, newest first, with the
/// same fields; a release ended after the restart keeps them; a file from before `recent` was
/// kept (only `current`) still loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_releases_are_listed_again_after_a_restart() {
    let r = Rig::start().await;
    let (s, v) = r.start_release(two_phases("1s", "1s", "auto", "1s")).await;
    assert_eq!(s, 200, "{v}");
    let first = r.wait_end(30).await;
    assert_eq!(first["state"], "complete", "{first}");
    let (s, v) = r
        .start_release(two_phases("1s", "10m", "auto", "10m"))
        .await;
    assert_eq!(s, 200, "{v}");
    r.wait_current(20, "phase 2 baking", |c| {
        c["phases"][1]["state"] == "baking"
    })
    .await;
    let (s, v) = r.post("/api/releases/current/abort", json!({})).await;
    assert_eq!(s, 200, "{v}");
    let second = r.wait_end(20).await;
    assert_eq!(second["state"], "aborted", "{second}");
    let before = r.releases().await["recent"].clone();
    assert_eq!(before.as_array().map(Vec::len), Some(2), "{before}");
    assert_eq!(before[1], first);

    let r = r.restart(Duration::ZERO).await;
    let after = r.releases().await;
    assert!(after["current"].is_null(), "{after}");
    assert_eq!(
        after["recent"], before,
        "the same releases, fields and order"
    );

    // A release that ends after the restart is added in front of them, and all are kept.
    let (s, v) = r.start_release(two_phases("1s", "1s", "auto", "1s")).await;
    assert_eq!(s, 200, "{v}");
    let third = r.wait_end(30).await;
    assert_eq!(third["state"], "complete", "{third}");
    let r = r.restart(Duration::ZERO).await;
    let recent = r.releases().await["recent"].clone();
    assert_eq!(recent.as_array().map(Vec::len), Some(3), "{recent}");
    assert_eq!(recent[0]["id"], third["id"], "{recent}");
    assert_eq!(recent[1], before[0]);
    assert_eq!(recent[2], before[1]);

    // `ctl release status` shows the last one after a restart too.
    let (code, out, err) = ctl(r.p.admin, &["release", "status"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(third["id"].as_str().unwrap_or("?")), "{out}");

    // The file as versions without `recent` wrote it: it loads, with no ended release.
    let Rig {
        api,
        panel,
        p,
        body,
    } = r;
    let dir = p.stop().await;
    std::fs::write(
        dir.path().join("state.release.json"),
        "{\n  \"current\": null\n}",
    )
    .expect("write the old form");
    let r = Rig {
        api,
        panel,
        p: TestProxy::start_with(&body, Some(TOKEN), Some(dir)).await,
        body,
    };
    assert_eq!(r.releases().await["recent"], json!([]));
    r.p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_removes_a_service_aborts_the_release() {
    let r = Rig::start().await;
    let (s, v) = r
        .start_release(two_phases("1s", "10m", "auto", "10m"))
        .await;
    assert_eq!(s, 200, "{v}");
    r.wait_current(20, "phase 2 baking", |c| {
        c["phases"][1]["state"] == "baking"
    })
    .await;
    // The same config without `panel`.
    let dir = r.p.dir.as_ref().expect("dir").path().to_path_buf();
    let api_only = service(
        "api",
        &[r.api[0].addr],
        &[r.api[1].addr],
        &format!("path_prefix = \"/api\"\n{TRIGGERS}"),
    );
    std::fs::write(&r.p.config_path, full_config(&api_only, &dir)).expect("write config");
    let (s, v) = r.post("/api/reload", json!({})).await;
    assert_eq!(s, 200, "{v}");
    let end = r.wait_end(20).await;
    assert_eq!(end["state"], "aborted", "{end}");
    assert!(
        end["reason"]
            .as_str()
            .unwrap_or("")
            .contains("panel removed"),
        "{end}"
    );
    assert_eq!(r.p.get("/api/x").await.1, "api-blue\n");
    let evs = r.events("release_abort").await;
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0]["actor"], "reload");
    r.p.stop().await;
}

/// A release resumed at startup whose service the config no longer has is aborted as after a
/// reload, but said as what happened: actor `startup`, "not in the config Switchyard started
/// with" (it used to name a reload that never ran).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_resumed_without_one_of_its_services_is_aborted_by_startup() {
    let r = Rig::start().await;
    let (s, v) = r
        .start_release(two_phases("1s", "10m", "auto", "10m"))
        .await;
    assert_eq!(s, 200, "{v}");
    r.wait_current(20, "phase 2 baking", |c| {
        c["phases"][1]["state"] == "baking"
    })
    .await;
    let Rig { api, p, .. } = r;
    let dir = p.stop().await;
    let api_only = service(
        "api",
        &[api[0].addr],
        &[api[1].addr],
        &format!("path_prefix = \"/api\"\n{TRIGGERS}"),
    );
    let p = TestProxy::start_with(&api_only, Some(TOKEN), Some(dir)).await;
    let ended = eventually(20, || async {
        common::release::releases(&p).await["recent"][0]["state"] == "aborted"
    })
    .await;
    let all = common::release::releases(&p).await;
    assert!(ended, "{all}");
    let reason = all["recent"][0]["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("panel not in the config Switchyard started with"),
        "{all}"
    );
    let evs = common::events_once_listed(&p, "release_abort", 10).await;
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0]["actor"], "startup", "{evs:?}");
    assert_eq!(p.get("/api/x").await.1, "api-blue\n");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_a_rollback_on_another_replica_rolls_the_whole_release_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(&dir.path().join("etcd")).await;
    let ups = [
        TestUpstream::start("api-blue").await,
        TestUpstream::start("api-green").await,
        TestUpstream::start("panel-blue").await,
        TestUpstream::start("panel-green").await,
    ];
    let critical = "[services.rollback]\nwatch_for = \"10m\"\nmin_requests = 1\n[[services.rollback.triggers]]\nkind = \"critical_5xx\"\npaths = [\"/api/pay\"]\nover = \"10s\"\nfor = \"0s\"\n";
    let body = format!(
        "[state]\nbackend = \"etcd\"\netcd_endpoints = [\"http://127.0.0.1:{}\"]\netcd_prefix = \"/sy-release/\"\n{}{}",
        etcd.client,
        service(
            "api",
            &[ups[0].addr],
            &[ups[1].addr],
            &format!("path_prefix = \"/api\"\n{critical}")
        ),
        service("panel", &[ups[2].addr], &[ups[3].addr], "path_prefix = \"/panel\"")
    );
    let a = TestProxy::start(&body).await;
    let b = TestProxy::start(&body).await;
    let (s, v) = admin_post(
        a.admin,
        "/api/releases",
        Some(TOKEN),
        Some(two_phases("1s", "10m", "auto", "10m")),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let both_green = eventually(20, || async {
        b.service_status("api").await["active"] == "green"
            && b.service_status("panel").await["active"] == "green"
    })
    .await;
    assert!(both_green, "replica b follows the release's flips");
    // The trigger fires on replica b (only b sees the failing request).
    ups[1].set_status(500);
    assert_eq!(get(b.proxy, "/api/pay").await.0, 500);
    let ended = eventually(20, || async {
        admin_get(a.admin, "/api/releases").await.1["current"].is_null()
    })
    .await;
    let all = admin_get(a.admin, "/api/releases").await.1;
    assert!(ended, "{all}");
    assert_eq!(all["recent"][0]["state"], "rolled_back", "{all}");
    // b shares the release through etcd: its trigger rolls the whole release back, in one
    // step with one event (no automatic rollback of api on its own). The event reaches etcd
    // in its own task after the end it records: a can show the end first.
    events_once_listed(&a, "release_rollback", 10).await;
    let evs = a.events().await;
    let rb: Vec<&Value> = evs
        .iter()
        .filter(|e| e["reason"] == "release_rollback")
        .collect();
    assert_eq!(rb.len(), 1, "{evs:#?}");
    assert_eq!(rb[0]["trigger"]["kind"], "critical_5xx", "{evs:#?}");
    assert_eq!(rb[0]["service"], "api", "{evs:#?}");
    assert!(
        !evs.iter().any(|e| e["reason"] == "auto_rollback"),
        "{evs:#?}"
    );
    for p in [&a, &b] {
        let back = eventually(10, || async {
            p.service_status("api").await["active"] == "blue"
                && p.service_status("panel").await["active"] == "blue"
        })
        .await;
        assert!(back, "both services back on blue: {}", p.status().await);
    }
    // Still one after both replicas are back on blue.
    let rb = events_once_listed(&a, "release_rollback", 10).await;
    assert_eq!(rb.len(), 1, "{rb:#?}");
    a.stop().await;
    b.stop().await;
}

/// `switchyard ctl ARGS` against the rig with the token; (exit code, stdout, stderr).
async fn ctl(admin: std::net::SocketAddr, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "ctl",
            "--admin",
            &format!("http://{admin}"),
            "--token",
            TOKEN,
        ])
        .args(args)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("ctl timed out")
        .expect("ctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_release_start_status_promote_abort_from_a_toml_plan() {
    let r = Rig::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let plan = dir.path().join("plan.toml");
    std::fs::write(
        &plan,
        "name = \"ctl release\"\nvalidate = \"10m\"\n[[phases]]\nname = \"backend\"\nservices = [\"api\"]\nbake = \"0s\"\ngate = \"manual\"\n[[phases]]\nname = \"frontend\"\nservices = [\"panel\"]\nto = \"green\"\nbake = \"10m\"\n",
    )
    .expect("write plan");
    let plan = plan.to_string_lossy().into_owned();
    let (code, out, err) = ctl(r.p.admin, &["release", "start", &plan]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ctl release"), "{out}");
    r.wait_current(20, "waiting at the gate", |c| c["state"] == "waiting")
        .await;
    let (code, out, _) = ctl(r.p.admin, &["release", "status"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("waiting") && out.contains("frontend"), "{out}");
    // A second start: refused, naming the running one.
    let (code, _, err) = ctl(r.p.admin, &["release", "start", &plan]).await;
    assert_eq!(code, 1);
    assert!(err.contains("409") && err.contains("ctl release"), "{err}");
    let (code, out, err) = ctl(r.p.admin, &["release", "promote"]).await;
    assert_eq!(code, 0, "{out}{err}");
    r.wait_current(20, "phase 2 baking", |c| {
        c["phases"][1]["state"] == "baking"
    })
    .await;
    // Pausing a service of the release: refused, and `--force` (which the refusal asks for)
    // goes through from ctl too and pauses the release.
    let (code, _, err) = ctl(r.p.admin, &["pause", "panel"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("409") && err.contains("force"), "{err}");
    let (code, out, err) = ctl(r.p.admin, &["pause", "panel", "--force"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(r.p.service_status("panel").await["paused"], true);
    let paused = r.releases().await["current"]["paused"].clone();
    assert!(paused.as_str().unwrap_or("").contains("pause"), "{paused}");
    let (code, out, err) = ctl(r.p.admin, &["resume", "panel"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = ctl(r.p.admin, &["release", "abort"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 service(s) returned"), "{out}");
    assert_eq!(
        r.serving().await,
        ("api-blue\n".into(), "panel-blue\n".into())
    );
    let (code, _, _) = ctl(r.p.admin, &["release", "wait"]).await;
    assert_eq!(code, 1, "the last release was aborted");
    // A plan with errors: every error with its key, from the server.
    std::fs::write(
        dir.path().join("bad.toml"),
        "name = \"x\"\n[[phases]]\nname = \"a\"\nservices = [\"ghost\"]\nbake = \"soon\"\n",
    )
    .expect("write");
    let bad = dir.path().join("bad.toml").to_string_lossy().into_owned();
    let (code, _, err) = ctl(r.p.admin, &["release", "start", &bad]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("phases[0].services[0]") && err.contains("phases[0].bake"),
        "{err}"
    );
    r.p.stop().await;
}

const NAMED: &str = "[release_plans.weekly]\nname = \"weekly release\"\nvalidate = \"1s\"\n[[release_plans.weekly.phases]]\nname = \"backend\"\nservices = [\"api\"]\nbake = \"1s\"\n[[release_plans.weekly.phases]]\nname = \"frontend\"\nservices = [\"panel\"]\nbake = \"1s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_named_in_the_config_starts_by_name_and_an_unknown_name_is_refused() {
    let r = Rig::build("", NAMED).await;
    // An unknown name: 400, naming it and the plans the config has; nothing starts.
    let (s, v) = r.start_release(json!({ "plan": "nope" })).await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].is_string(), "{v}");
    let errs = v["errors"].to_string();
    assert!(
        errs.contains("plan") && errs.contains("\\\"nope\\\""),
        "{v}"
    );
    assert!(errs.contains("weekly"), "{v}");
    assert!(r.releases().await["current"].is_null());
    let (code, _, err) = ctl(r.p.admin, &["release", "start", "--plan", "nope"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("nope"), "{err}");
    // By name, from ctl.
    let (code, out, err) = ctl(r.p.admin, &["release", "start", "--plan", "weekly"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let cur = r.releases().await["current"].clone();
    assert_eq!(cur["name"], "weekly release", "{cur}");
    assert_eq!(cur["phases"][1]["name"], "frontend", "{cur}");
    let end = r.wait_end(30).await;
    assert_eq!(end["state"], "complete", "{end}");
    assert_eq!(
        r.serving().await,
        ("api-green\n".into(), "panel-green\n".into())
    );
    r.p.stop().await;

    // `switchyard check` reports every error of a named plan with its key.
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("switchyard.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}[release_plans.bad]\nname = \"bad\"\n[[release_plans.bad.phases]]\nname = \"x\"\nservices = [\"nosuch\"]\ngate = \"later\"\n",
            full_config(&r.body, dir.path())
        ),
    )
    .expect("write config");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .expect("run check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    for key in [
        "release_plans.bad.phases[0].services[0]",
        "release_plans.bad.phases[0].bake",
        "release_plans.bad.phases[0].gate",
    ] {
        assert!(text.contains(key), "{key} missing:\n{text}");
    }
    assert!(!text.contains("release_plans.weekly"), "{text}");
}

const HEALTH: &str = "[services.health]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"2s\"\nunhealthy_after = 1\nhealthy_after = 1\n";

/// A two-phase release baking its second phase, every pool healthy until api's pre-release
/// pool (blue) dies.
async fn baking_phase_two_with_apis_old_pool_dead() -> Rig {
    let r = Rig::build(HEALTH, "").await;
    let healthy = eventually(10, || async {
        let api = r.p.service_status("api").await;
        api["colors"]["blue"]["healthy"] == true && api["colors"]["green"]["healthy"] == true
    })
    .await;
    assert!(healthy, "{}", r.p.status().await);
    let (s, v) = r
        .start_release(two_phases("1s", "10m", "auto", "10m"))
        .await;
    assert_eq!(s, 200, "{v}");
    r.wait_current(20, "phase 2 baking", |c| {
        c["phase"] == 1 && c["phases"][1]["state"] == "baking"
    })
    .await;
    r.api[0].set_health(500);
    let dead = eventually(10, || async {
        r.p.service_status("api").await["colors"]["blue"]["healthy"] == false
    })
    .await;
    assert!(dead, "api blue never went unhealthy");
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_pre_release_pool_is_reported_and_the_other_services_still_roll_back() {
    // api's pre-release pool (blue) dies; then panel's trigger fires.
    let r = baking_phase_two_with_apis_old_pool_dead().await;
    r.panel[1].set_status(500);
    let traffic = drive(r.p.proxy, "/panel/x");
    let end = r.wait_end(30).await;
    traffic.cancel();
    assert_eq!(end["state"], "rolled_back", "{end}");
    // panel went back; api stayed on green (never onto a dead pool), and the event says so.
    assert_eq!(
        r.serving().await,
        ("api-green\n".into(), "panel-blue\n".into())
    );
    let evs = r.events("release_rollback").await;
    assert_eq!(evs.len(), 1, "{evs:?}");
    let ev = &evs[0];
    let returned: Vec<&str> = ev["trigger"]["returned"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| o["service"].as_str())
        .collect();
    assert_eq!(returned, ["panel"], "{ev}");
    let not_returned = ev["trigger"]["not_returned"].to_string();
    assert!(
        not_returned.contains("api") && not_returned.contains("no healthy upstream"),
        "{ev}"
    );
    assert!(
        ev["detail"].as_str().unwrap_or("").contains("NOT returned"),
        "{ev}"
    );
    r.p.stop().await;
}

/// A trigger that fires on a service whose own pre-release pool is dead: the others go back, it
/// stays, and the one event names it without claiming a change it did not make (no `from`/`to`
/// of another service), while the flip counter counts only what went back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trigger_on_a_service_that_cannot_go_back_names_it_without_a_change() {
    // api's pre-release pool (blue) dies; then api's own trigger fires.
    let r = baking_phase_two_with_apis_old_pool_dead().await;
    r.api[1].set_status(500);
    let traffic = drive(r.p.proxy, "/api/x");
    let end = r.wait_end(30).await;
    traffic.cancel();
    assert_eq!(end["state"], "rolled_back", "{end}");
    assert_eq!(
        r.serving().await,
        ("api-green\n".into(), "panel-blue\n".into())
    );
    let evs = r.events("release_rollback").await;
    assert_eq!(evs.len(), 1, "{evs:?}");
    let ev = &evs[0];
    assert_eq!(ev["service"], "api", "{ev}");
    assert!(ev["from"].is_null() && ev["to"].is_null(), "{ev}");
    assert!(ev.get("generation").is_none(), "{ev}");
    let m = r.metrics().await;
    for (svc, n) in [("api", 0.0), ("panel", 1.0)] {
        assert_eq!(
            metric_line(
                &m,
                &format!("switchyard_flips_total{{reason=\"release_rollback\",service=\"{svc}\"}}")
            ),
            Some(n),
            "{svc}"
        );
    }
    r.p.stop().await;
}

/// A service of a later phase that the per-service engine rolls back before its phase runs has
/// its pre-release color latched as failed. The release's rollback must not send it back there
/// (issue 17: a rollback never targets a latched color unless forced): it stays, and the one
/// event says why; the others still go back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_rollback_never_returns_a_service_to_a_color_latched_as_failed() {
    let r = Rig::start().await;
    // panel is on green before the release (armed by this manual flip); api on blue.
    let (s, v) = r.p.flip("panel", "green").await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = r
        .start_release(two_phases("0s", "10m", "manual", "10m"))
        .await;
    assert_eq!(s, 200, "{v}");
    r.wait_current(20, "waiting at the gate", |c| c["state"] == "waiting")
        .await;
    // Green panel fails while its phase has not run: its own engine rolls it back to blue
    // and latches green.
    r.panel[1].set_status(500);
    let traffic = drive(r.p.proxy, "/panel/x");
    let rolled = eventually(30, || async {
        r.p.service_status("panel").await["failed_color"] == "green"
    })
    .await;
    traffic.cancel();
    assert!(rolled, "{}", r.p.status().await);
    r.panel[1].set_status(200);
    // Phase 2 (panel to blue, where it already is), then api's green fails.
    let (s, v) = r.post("/api/releases/current/promote", json!({})).await;
    assert_eq!(s, 200, "{v}");
    r.wait_current(20, "phase 2 baking", |c| {
        c["phases"][1]["state"] == "baking"
    })
    .await;
    r.api[1].set_status(500);
    let traffic = drive(r.p.proxy, "/api/x");
    let end = r.wait_end(30).await;
    traffic.cancel();
    assert_eq!(end["state"], "rolled_back", "{end}");
    assert_eq!(
        r.serving().await,
        ("api-blue\n".into(), "panel-blue\n".into())
    );
    let ev = r.events("release_rollback").await.pop().unwrap_or_default();
    let not_returned = ev["trigger"]["not_returned"].to_string();
    assert!(
        not_returned.contains("panel") && not_returned.contains("latched"),
        "{ev}"
    );
    assert_eq!(r.p.service_status("panel").await["failed_color"], "green");
    r.p.stop().await;
}

/// A promote that resumes a release paused during a bake resumes it then; it does not also
/// pass the manual gate at the end of that bake, which still waits for its own promote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promote_that_resumes_a_paused_bake_does_not_pass_the_manual_gate_after_it() {
    let r = Rig::start().await;
    let (s, v) = r
        .start_release(two_phases("8s", "10m", "manual", "10m"))
        .await;
    assert_eq!(s, 200, "{v}");
    r.wait_current(20, "phase 1 baking", |c| {
        c["phases"][0]["state"] == "baking"
    })
    .await;
    let (s, v) = r
        .post("/api/services/api/pause", json!({ "force": true }))
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = r.post("/api/services/api/resume", json!({})).await;
    assert_eq!(s, 200);
    let (s, v) = r.post("/api/releases/current/promote", json!({})).await;
    assert_eq!(s, 200, "{v}");
    r.wait_current(10, "resumed", |c| c["paused"].is_null())
        .await;
    // The bake ends; the gate holds.
    r.wait_current(20, "waiting at the gate", |c| c["state"] == "waiting")
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let c = r.releases().await["current"].clone();
    assert_eq!(c["state"], "waiting", "{c}");
    assert_eq!(c["phase"], 0, "{c}");
    assert_eq!(
        r.serving().await,
        ("api-green\n".into(), "panel-blue\n".into())
    );
    let (s, v) = r.post("/api/releases/current/promote", json!({})).await;
    assert_eq!(s, 200, "{v}");
    r.wait_current(20, "phase 2 baking", |c| {
        c["phases"][1]["state"] == "baking"
    })
    .await;
    r.p.stop().await;
}

/// A phase whose target pool has no healthy upstream does not flip, and the release's reason
/// says why without offering a `force` that releases do not have.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phase_onto_a_dead_pool_ends_the_release_saying_why_without_offering_force() {
    let r = Rig::build(HEALTH, "").await;
    r.api[1].set_health(500);
    let dead = eventually(10, || async {
        let api = r.p.service_status("api").await;
        api["colors"]["blue"]["healthy"] == true && api["colors"]["green"]["healthy"] == false
    })
    .await;
    assert!(dead, "{}", r.p.status().await);
    let plan = json!({
        "name": "onto a dead pool",
        "phases": [{ "name": "backend", "services": ["api"], "bake": "1s" }],
    });
    let (s, v) = r.start_release(plan).await;
    let why = if s == 200 {
        r.wait_end(30).await.to_string()
    } else {
        v.to_string()
    };
    assert!(why.contains("no healthy upstream"), "{s} {why}");
    assert!(!why.contains("force"), "{s} {why}");
    assert_eq!(r.serving().await.0, "api-blue\n");
    r.p.stop().await;
}

/// A service the release cannot return (at the largest generation a state may hold: only an
/// edited state gets there) is named in the abort's answer and event; the others go back all
/// the same (the whole return used to be refused: the abort answered 409 and returned nothing).
#[tokio::test]
async fn an_abort_returns_the_others_when_one_service_cannot_be_returned() {
    let Rig {
        api,
        panel,
        p,
        body,
    } = Rig::start().await;
    let dir = p.stop().await;
    std::fs::write(
        dir.path().join("state.json"),
        json!({"version": 1, "services": {"api": {"active": "blue", "generation": 9007199254740990_u64}}})
            .to_string(),
    )
    .expect("state");
    let p = TestProxy::start_with(&body, Some(TOKEN), Some(dir)).await;
    let r = Rig {
        api,
        panel,
        p,
        body,
    };
    let (s, v) = r
        .start_release(two_phases("0s", "10m", "auto", "10m"))
        .await;
    assert_eq!(s, 200, "{v}");
    r.wait_current(20, "phase 2 baking", |c| {
        c["phases"][1]["state"] == "baking"
    })
    .await;
    assert_eq!(
        r.serving().await,
        ("api-green\n".into(), "panel-green\n".into())
    );
    // Through `ctl`: the release ends (200), but a script must not read "all back": exit 1.
    let (code, out, err) = ctl(r.p.admin, &["--json", "release", "abort"]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("not every service it flipped was returned"),
        "{err}"
    );
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let not = v["not_returned"].to_string();
    assert!(
        not.contains("api: not returned to blue") && not.contains("largest a state may hold"),
        "{v}"
    );
    assert_eq!(
        r.serving().await,
        ("api-green\n".into(), "panel-blue\n".into())
    );
    let ev = r.events("release_abort").await;
    assert_eq!(ev.len(), 1, "{ev:#?}");
    assert!(
        ev[0]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("api: not returned to blue"),
        "{ev:#?}"
    );
    assert!(r.releases().await["current"].is_null());
    r.p.stop().await;
}

/// A service with no automatic rollback (no `[services.rollback]`) can be released, but the
/// answer, `ctl` and the start event say that nothing watches it, and it sets no validate window
/// of its own: a release of it alone ends `complete` after its phases (it used to validate for
/// the default `watch_for`, 2 h, with nothing armed, holding every other flip of it). With a
/// watched service beside it, the window is that service's `watch_for`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_no_rollback_watches_is_released_with_a_warning_and_no_window_of_its_own() {
    let api = [
        TestUpstream::start("api-blue").await,
        TestUpstream::start("api-green").await,
    ];
    let panel = [
        TestUpstream::start("panel-blue").await,
        TestUpstream::start("panel-green").await,
    ];
    let body = service(
        "api",
        &[api[0].addr],
        &[api[1].addr],
        &format!("path_prefix = \"/api\"\n{TRIGGERS}"),
    ) + &service(
        "panel",
        &[panel[0].addr],
        &[panel[1].addr],
        "path_prefix = \"/panel\"\n",
    ) + &service(
        "dry",
        &[api[0].addr],
        &[api[1].addr],
        &format!(
            "path_prefix = \"/dry\"\n{}",
            TRIGGERS.replace(
                "[services.rollback]\n",
                "[services.rollback]\ndry_run = true\n"
            )
        ),
    );
    let p = TestProxy::start(&body).await;
    let plan = json!({ "name": "panel only", "phases": [ { "name": "ui", "services": ["panel"], "bake": "0s" } ] });
    let v = common::release::start_release(&p, plan).await;
    assert_eq!(v["unwatched"], json!(["panel"]), "{v}");
    let warning = v["warning"].as_str().unwrap_or("");
    assert!(
        warning.contains("no automatic rollback watches panel"),
        "{v}"
    );
    assert_eq!(v["release"]["validate_secs"], 0.0, "{v}");
    let done = eventually(20, || async {
        let all = common::release::releases(&p).await;
        all["current"].is_null() && all["recent"][0]["state"] == "complete"
    })
    .await;
    assert!(done, "{}", common::release::releases(&p).await);
    assert_eq!(p.get("/panel/x").await.1, "panel-green\n");
    let started = common::events_once_listed(&p, "release_start", 10).await;
    assert!(
        started[0]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("no automatic rollback watches panel"),
        "{started:#?}"
    );
    // Beside a watched service: that one's `watch_for` (10m) is the window; panel is named.
    let plan = json!({ "name": "both", "phases": [ { "name": "all", "services": ["api", "panel"], "bake": "0s" } ] });
    let v = common::release::start_release(&p, plan).await;
    assert_eq!(v["unwatched"], json!(["panel"]), "{v}");
    assert_eq!(v["release"]["validate_secs"], 600.0, "{v}");
    let (s, v) = admin_post(
        p.admin,
        "/api/releases/current/abort",
        Some(TOKEN),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    // A dry run's triggers only say what they would do: nothing rolls the release back
    // there either, so it is named and sets no window (its `watch_for` is 10m too).
    let plan = json!({ "name": "dry", "phases": [ { "name": "all", "services": ["dry", "panel"], "bake": "0s" } ] });
    let v = common::release::start_release(&p, plan).await;
    assert_eq!(v["unwatched"], json!(["dry", "panel"]), "{v}");
    assert!(
        v["warning"].as_str().unwrap_or("").contains("dry run"),
        "{v}"
    );
    assert_eq!(v["release"]["validate_secs"], 0.0, "{v}");
    let done = eventually(20, || async {
        common::release::releases(&p).await["current"].is_null()
    })
    .await;
    assert!(done, "{}", common::release::releases(&p).await);
    // Offline, against the config: the same warning (exit 0: the plan is valid).
    let out = check_release(
        &p,
        "name = \"x\"\n[[phases]]\nname = \"a\"\nservices = [\"api\", \"panel\"]\nbake = \"1m\"\n",
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("warning: no automatic rollback watches panel (rollback off"),
        "{said}"
    );
    p.stop().await;
}

/// `switchyard check --release PLAN --config CONFIG` for the plan file `plan` (TOML, written in
/// `p`'s directory) against `p`'s config: the process's output.
fn check_release(p: &TestProxy, plan: &str) -> std::process::Output {
    let path = p.dir.as_ref().expect("dir").path().join("plan.toml");
    std::fs::write(&path, plan).expect("write plan");
    std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "--release"])
        .arg(&path)
        .arg("--config")
        .arg(&p.config_path)
        .output()
        .expect("check")
}
