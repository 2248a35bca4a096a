//! `switchyard ctl`: the real binary against an in-process Switchyard. Every subcommand with
//! human output and `--json`, and every error path with its exit code (1 refused or unreachable,
//! 2 usage).

mod common;
use common::*;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Out {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{self}"))
    }
}

/// Runs `switchyard ctl --admin http://ADMIN [--token T] ARGS...` with a clean environment for
/// the ctl variables (plus `env`), bounded to 20 s.
async fn ctl_env(
    admin: SocketAddr,
    token: Option<&str>,
    env: &[(&str, &str)],
    args: &[&str],
) -> Out {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.arg("ctl")
        .arg("--admin")
        .arg(format!("http://{admin}"))
        .args(["--timeout", "5s"]);
    if let Some(t) = token {
        cmd.arg("--token").arg(t);
    }
    cmd.args(args)
        .env_remove("SWITCHYARD_ADMIN_TOKEN")
        .env_remove("SWITCHYARD_ADMIN_URL")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .expect("ctl did not finish within 20 s")
        .expect("run ctl");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn ctl(admin: SocketAddr, token: Option<&str>, args: &[&str]) -> Out {
    ctl_env(admin, token, &[], args).await
}

async fn two_services() -> (TestProxy, Vec<std::sync::Arc<TestUpstream>>) {
    let ups = vec![
        TestUpstream::start("api-blue").await,
        TestUpstream::start("api-green").await,
        TestUpstream::start("web-blue").await,
        TestUpstream::start("web-green").await,
    ];
    let health = "[services.health]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"2s\"\nunhealthy_after = 1\nhealthy_after = 1\n";
    let mut body = service(
        "api",
        &[ups[0].addr],
        &[ups[1].addr],
        "path_prefix = \"/api\"",
    );
    body.push_str(health);
    body.push_str(&service("web", &[ups[2].addr], &[ups[3].addr], ""));
    body.push_str(health);
    (TestProxy::start(&body).await, ups)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_human_and_json() {
    let (p, _ups) = two_services().await;
    assert_eq!(p.get("/api/x").await.0, 200);

    let o = ctl(p.admin, None, &["status"]).await;
    assert_eq!(o.code, 0, "{o}");
    assert!(o.stdout.contains("api  live: BLUE"), "{o}");
    assert!(o.stdout.contains("web  live: BLUE"), "{o}");
    assert!(o.stdout.contains("*blue"), "the live color is marked:\n{o}");
    assert!(o.stdout.contains("healthy=true"), "{o}");

    let o = ctl(p.admin, None, &["status", "--json"]).await;
    assert_eq!(o.code, 0, "{o}");
    let v = o.json();
    let svcs = v["services"].as_array().expect("services");
    assert_eq!(svcs.len(), 2, "{v}");
    assert_eq!(svcs[0]["name"], "api");
    assert_eq!(svcs[0]["active"], "blue");
    assert_eq!(svcs[1]["name"], "web");
    // `--json` before the subcommand works too.
    let o = ctl(p.admin, None, &["--json", "status"]).await;
    assert_eq!(o.code, 0, "{o}");
    assert_eq!(o.json()["services"][0]["name"], "api");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flip_rollback_flip_all_human_and_json() {
    let (p, _ups) = two_services().await;
    // Wait for the first health round so green counts as healthy for the flips.
    assert!(
        eventually(10, || async {
            p.service_status("api").await["colors"]["green"]["healthy"] == true
                && p.service_status("web").await["colors"]["green"]["healthy"] == true
        })
        .await
    );

    // flip, human
    let o = ctl(p.admin, Some(TOKEN), &["flip", "api", "green"]).await;
    assert_eq!(o.code, 0, "{o}");
    assert!(o.stdout.contains("green"), "{o}");
    assert_eq!(p.service_status("api").await["active"], "green");
    assert_eq!(p.get("/api/x").await, (200, "api-green\n".to_string()));

    // flip to the live color: a no-op that still succeeds
    let o = ctl(p.admin, Some(TOKEN), &["flip", "api", "green"]).await;
    assert_eq!(o.code, 0, "{o}");
    assert_eq!(p.service_status("api").await["generation"], 1);

    // flip, JSON (the token may come after the subcommand)
    let o = ctl(
        p.admin,
        None,
        &["flip", "web", "green", "--json", "--token", TOKEN],
    )
    .await;
    assert_eq!(o.code, 0, "{o}");
    let v = o.json();
    assert_eq!(v["changed"], true, "{v}");
    assert_eq!(v["to"], "green", "{v}");
    assert_eq!(p.service_status("web").await["active"], "green");

    // rollback, human then JSON
    let o = ctl(p.admin, Some(TOKEN), &["rollback", "api"]).await;
    assert_eq!(o.code, 0, "{o}");
    assert_eq!(p.service_status("api").await["active"], "blue");
    let o = ctl(p.admin, Some(TOKEN), &["--json", "rollback", "web"]).await;
    assert_eq!(o.code, 0, "{o}");
    assert_eq!(o.json()["to"], "blue", "{o}");
    assert_eq!(p.service_status("web").await["active"], "blue");

    // flip-all, human then JSON
    let o = ctl(p.admin, Some(TOKEN), &["flip-all", "green"]).await;
    assert_eq!(o.code, 0, "{o}");
    assert!(o.stdout.contains("2 service(s)"), "{o}");
    for s in ["api", "web"] {
        assert_eq!(p.service_status(s).await["active"], "green", "{s}");
    }
    let o = ctl(p.admin, Some(TOKEN), &["flip-all", "blue", "--json"]).await;
    assert_eq!(o.code, 0, "{o}");
    let v = o.json();
    assert_eq!(v["changed"], true, "{v}");
    assert_eq!(v["services"].as_array().map(Vec::len), Some(2), "{v}");
    for s in ["api", "web"] {
        assert_eq!(p.service_status(s).await["active"], "blue", "{s}");
    }

    // events, human then JSON with --limit
    let o = ctl(p.admin, None, &["events"]).await;
    assert_eq!(o.code, 0, "{o}");
    assert!(o.stdout.contains("manual"), "{o}");
    assert!(o.stdout.contains("green -> blue"), "{o}");
    let o = ctl(p.admin, None, &["events", "--json", "--limit", "2"]).await;
    assert_eq!(o.code, 0, "{o}");
    let v = o.json();
    let evs = v["events"].as_array().expect("events");
    assert_eq!(evs.len(), 2, "{v}");
    assert_eq!(evs[1]["to"], "blue", "newest last: {v}");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_reload() {
    let (p, _ups) = two_services().await;
    let o = ctl(p.admin, Some(TOKEN), &["pause", "api"]).await;
    assert_eq!(o.code, 0, "{o}");
    assert_eq!(p.service_status("api").await["paused"], true);
    let o = ctl(p.admin, Some(TOKEN), &["--json", "resume", "api"]).await;
    assert_eq!(o.code, 0, "{o}");
    assert_eq!(o.json()["paused"], false, "{o}");
    assert_eq!(p.service_status("api").await["paused"], false);
    let o = ctl(p.admin, Some(TOKEN), &["pause", "web", "--json"]).await;
    assert_eq!(o.code, 0, "{o}");
    assert_eq!(o.json()["paused"], true, "{o}");

    // reload the unchanged file: human, then JSON
    let o = ctl(p.admin, Some(TOKEN), &["reload"]).await;
    assert_eq!(o.code, 0, "{o}");
    assert!(!o.stdout.trim().is_empty(), "{o}");
    let o = ctl(p.admin, Some(TOKEN), &["--json", "reload"]).await;
    assert_eq!(o.code, 0, "{o}");
    assert!(o.json().is_object(), "{o}");

    // an invalid file is refused with its errors, and nothing changes
    let good = std::fs::read_to_string(&p.config_path).expect("read config");
    std::fs::write(
        &p.config_path,
        good.replace("interval = \"100ms\"", "interval = \"x\""),
    )
    .expect("write config");
    let o = ctl(p.admin, Some(TOKEN), &["reload"]).await;
    assert_eq!(o.code, 1, "{o}");
    assert!(o.stderr.contains("400"), "{o}");
    assert!(o.stderr.contains("services[0].health.interval"), "{o}");
    assert_eq!(
        p.status().await["services"].as_array().map(Vec::len),
        Some(2)
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_failed_calls_exit_1() {
    let (p, ups) = two_services().await;

    // wrong token: 401, nothing changes
    let o = ctl(p.admin, Some("wrong-token"), &["flip", "api", "green"]).await;
    assert_eq!(o.code, 1, "{o}");
    assert!(o.stderr.contains("401"), "{o}");
    assert_eq!(p.service_status("api").await["active"], "blue");

    // no token at all for a mutating command: refused before any call
    for args in [
        &["flip", "api", "green"][..],
        &["flip-all", "green"],
        &["rollback", "api"],
        &["pause", "api"],
        &["resume", "api"],
        &["reload"],
    ] {
        let o = ctl(p.admin, None, args).await;
        assert_eq!(o.code, 1, "{args:?}: {o}");
        assert!(o.stderr.contains("SWITCHYARD_ADMIN_TOKEN"), "{args:?}: {o}");
    }
    assert_eq!(p.service_status("api").await["paused"], false);
    assert_eq!(p.service_status("api").await["active"], "blue");

    // unknown service: 404
    let o = ctl(p.admin, Some(TOKEN), &["flip", "nope", "green"]).await;
    assert_eq!(o.code, 1, "{o}");
    assert!(o.stderr.contains("404"), "{o}");
    assert!(o.stderr.contains("nope"), "{o}");
    let o = ctl(p.admin, Some(TOKEN), &["--json", "pause", "nope"]).await;
    assert_eq!(o.code, 1, "{o}");
    assert!(o.json()["error"].is_string(), "{o}");

    // unhealthy target pool: 409, with the API's reason
    ups[1].set_health(500);
    assert!(
        eventually(10, || async {
            p.service_status("api").await["colors"]["green"]["healthy"] == false
        })
        .await
    );
    let o = ctl(p.admin, Some(TOKEN), &["flip", "api", "green"]).await;
    assert_eq!(o.code, 1, "{o}");
    assert!(o.stderr.contains("409"), "{o}");
    assert!(o.stderr.contains("pass \"force\": true"), "{o}");
    assert_eq!(p.service_status("api").await["active"], "blue");
    // --force overrides it
    let o = ctl(p.admin, Some(TOKEN), &["flip", "api", "green", "--force"]).await;
    assert_eq!(o.code, 0, "{o}");
    assert_eq!(p.service_status("api").await["active"], "green");

    // unreachable admin listener: a clear message naming the URL
    let dead = dead_addr().await;
    for args in [&["status"][..], &["flip", "api", "blue"]] {
        let o = ctl(dead, Some(TOKEN), args).await;
        assert_eq!(o.code, 1, "{o}");
        assert!(
            o.stderr.contains(&format!("http://{dead}")),
            "names the URL: {o}"
        );
        assert!(o.stderr.contains("cannot reach"), "{o}");
    }
    p.stop().await;
}

/// A change whose outcome is unknown is never reported as a refusal (exit 1): a POST the admin
/// listener took and never answered exits 3, telling the caller to look before trying again; a
/// read that gets no answer is a plain failure (1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_with_no_answer_exits_3_not_as_refused() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = silent.local_addr().expect("addr");
    // Takes each connection and its request, and never answers.
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            conns.push(c);
        }
    });
    // Each waits out ctl's --timeout (5 s here): all three at once.
    let (flip, abort, status) = tokio::join!(
        ctl(addr, Some(TOKEN), &["flip", "api", "green"]),
        ctl(addr, Some(TOKEN), &["release", "abort"]),
        ctl(addr, Some(TOKEN), &["status"]),
    );
    for o in [flip, abort] {
        assert_eq!(o.code, 3, "{o}");
        assert!(o.stderr.contains("may or may not"), "{o}");
    }
    assert_eq!(status.code, 1, "{status}");
    held.abort();

    // A listener that reads the request and closes the connection without an answer (a crash,
    // a restart): the same for a change, at once.
    let closer = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = closer.local_addr().expect("addr");
    let closing = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        while let Ok((mut c, _)) = closer.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = c.read(&mut buf).await;
            });
        }
    });
    let (flip, status) = tokio::join!(
        ctl(addr, Some(TOKEN), &["flip", "api", "green"]),
        ctl(addr, Some(TOKEN), &["status"]),
    );
    assert_eq!(flip.code, 3, "{flip}");
    assert!(flip.stderr.contains("may or may not"), "{flip}");
    assert_eq!(status.code, 1, "{status}");
    closing.abort();
}

/// An admin address that never takes the connection (its SYNs dropped: a black-holed address,
/// here a listener whose accept queue is full) is "cannot reach" (exit 1) for a change too: the
/// request never left, so nothing was changed, unlike a request sent and never answered (3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_never_connected_exits_1_not_3() {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    socket.bind(&any.into()).expect("bind");
    // Backlog 0, never accepted: once the queue holds a connection, new SYNs are dropped.
    socket.listen(0).expect("listen");
    let addr = socket
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("inet");
    let mut filler = Vec::new();
    loop {
        match tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(c)) => filler.push(c),
            Ok(Err(e)) => panic!("connect: {e}"),
            Err(_) => break,
        }
        assert!(filler.len() < 64, "the accept queue never filled");
    }
    let (flip, abort) = tokio::join!(
        ctl(addr, Some(TOKEN), &["flip", "api", "green"]),
        ctl(addr, Some(TOKEN), &["release", "abort"]),
    );
    for o in [flip, abort] {
        assert_eq!(o.code, 1, "{o}");
        assert!(o.stderr.contains("cannot reach"), "{o}");
        assert!(!o.stderr.contains("may or may not"), "{o}");
    }
    drop(filler);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_2() {
    let (p, _ups) = two_services().await;
    for args in [
        &["bogus"][..],
        &["flip", "api", "purple"],
        &["flip", "api"],
        &["flip"],
        &["flip-all"],
        &["flip-all", "purple"],
        &["rollback"],
        &["pause"],
        &["resume"],
        &["events", "--limit", "many"],
        &["status", "--no-such-flag"],
        &[],
        // SERVICE goes into the URL path: a name no service can have is refused, never sent
        // (`api/pause?` resumed... paused api; `api x` was "cannot reach").
        &["flip", "api x", "green"],
        &["resume", "api/pause?"],
        &["pause", "api/resume?"],
        &["rollback", "api#x"],
        &["flip", "API", "green"],
        &["flip", "", "green"],
    ] {
        let o = ctl(p.admin, Some(TOKEN), args).await;
        assert_eq!(o.code, 2, "{args:?}: {o}");
        assert!(!o.stderr.is_empty(), "{args:?}: says why: {o}");
    }
    let o = ctl(p.admin, Some(TOKEN), &["flip", "api", "purple"]).await;
    assert!(o.stderr.contains("purple"), "{o}");
    let o = ctl(p.admin, Some(TOKEN), &["pause", "api/resume?"]).await;
    assert!(o.stderr.contains("invalid service name"), "{o}");
    // nothing reached the API
    assert_eq!(p.service_status("api").await["generation"], 0);
    assert_eq!(p.service_status("api").await["paused"], false);
    assert!(p.events().await.is_empty());
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_and_url_from_environment() {
    let (p, _ups) = two_services().await;
    assert!(
        eventually(10, || async {
            p.service_status("api").await["colors"]["green"]["healthy"] == true
        })
        .await
    );
    let o = ctl_env(
        p.admin,
        None,
        &[("SWITCHYARD_ADMIN_TOKEN", TOKEN)],
        &["flip", "api", "green"],
    )
    .await;
    assert_eq!(o.code, 0, "{o}");
    assert_eq!(p.service_status("api").await["active"], "green");
    // a wrong token in the environment is refused
    let o = ctl_env(
        p.admin,
        None,
        &[("SWITCHYARD_ADMIN_TOKEN", "nope")],
        &["flip", "api", "blue"],
    )
    .await;
    assert_eq!(o.code, 1, "{o}");
    assert!(o.stderr.contains("401"), "{o}");

    // the admin URL from SWITCHYARD_ADMIN_URL (no --admin)
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.args(["ctl", "--json", "status"])
        .env("SWITCHYARD_ADMIN_URL", format!("http://{}", p.admin))
        .env_remove("SWITCHYARD_ADMIN_TOKEN")
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .expect("ctl timed out")
        .expect("run ctl");
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["services"][0]["active"], "green");
    p.stop().await;
}

/// A token with the line end a secret made from a file keeps is sent without it (`serve` takes
/// it off too); one that cannot travel in a header is a usage error naming the token (exit 2),
/// not "cannot reach the admin listener" from a request that could not be built.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_ending_in_a_line_end_works_and_one_no_header_carries_is_a_usage_error() {
    let (p, _ups) = two_services().await;
    let with_newline = format!("{TOKEN}\n");
    let o = ctl_env(
        p.admin,
        None,
        &[("SWITCHYARD_ADMIN_TOKEN", &with_newline)],
        &["pause", "api"],
    )
    .await;
    assert_eq!(o.code, 0, "{o}");
    let o = ctl(p.admin, Some(&format!("{TOKEN}\r\n")), &["resume", "api"]).await;
    assert_eq!(o.code, 0, "{o}");
    assert_eq!(p.service_status("api").await["paused"], false);
    for bad in [
        format!("{TOKEN}\n\n"),
        format!("{TOKEN}\x01"),
        "x\ny".to_string(),
    ] {
        let o = ctl_env(
            p.admin,
            None,
            &[("SWITCHYARD_ADMIN_TOKEN", &bad)],
            &["pause", "api"],
        )
        .await;
        assert_eq!(o.code, 2, "{bad:?}: {o}");
        assert!(o.stderr.contains("invalid admin token"), "{bad:?}: {o}");
        assert!(!o.stderr.contains("cannot reach"), "{bad:?}: {o}");
        let o = ctl(p.admin, Some(&bad), &["release", "abort"]).await;
        assert_eq!(o.code, 2, "{bad:?}: {o}");
    }
    assert_eq!(p.service_status("api").await["paused"], false);
    p.stop().await;
}

/// Runs `switchyard ARGS...` with stdout a pipe whose reader is gone before it writes (as in
/// `switchyard ctl events | head -0`): the exit code and stderr, bounded to 20 s.
async fn closed_stdout(args: &[String]) -> (i32, String) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env_remove("SWITCHYARD_ADMIN_TOKEN")
        .env_remove("SWITCHYARD_ADMIN_URL")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn switchyard");
    // The reader goes away at once: every write of the child meets EPIPE.
    drop(child.stdout.take());
    let out = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{args:?} did not end within 20 s with stdout closed"))
        .expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_quietly_with_the_commands_own_exit_code() {
    let (p, _ups) = two_services().await;
    for _ in 0..3 {
        assert_eq!(p.flip("api", "green").await.0, 200);
        assert_eq!(p.flip("api", "blue").await.0, 200);
    }
    let admin = format!("http://{}", p.admin);
    let ctl_args = |args: &[&str]| -> Vec<String> {
        [
            "ctl",
            "--admin",
            &admin,
            "--timeout",
            "5s",
            "--token",
            TOKEN,
        ]
        .iter()
        .chain(args)
        .map(|s| s.to_string())
        .collect()
    };
    let config = p.config_path.display().to_string();
    let quiet = |args: &[String], code: i32, err: &str| {
        assert_eq!(code, 0, "{args:?}: exit {code}, stderr:\n{err}");
        assert!(err.is_empty(), "{args:?}: stderr:\n{err}");
    };
    for args in [
        ctl_args(&["events"]),
        ctl_args(&["--json", "events"]),
        ctl_args(&["status"]),
        ctl_args(&["--json", "status"]),
        ctl_args(&["release", "status"]),
        ctl_args(&["--json", "release", "status"]),
        ctl_args(&["pause", "web"]),
        ctl_args(&["resume", "web"]),
        vec!["check".into(), "--config".into(), config.clone()],
    ] {
        let (code, err) = closed_stdout(&args).await;
        quiet(&args, code, &err);
    }
    // The action happened although its answer was not read.
    assert_eq!(p.service_status("web").await["paused"], false);
    assert_eq!(
        p.events()
            .await
            .iter()
            .filter(|e| e["service"] == "web")
            .count(),
        2
    );

    // A refused action still exits 1 and says why on stderr.
    let args = ctl_args(&["--json", "flip", "nope", "green"]);
    let (code, err) = closed_stdout(&args).await;
    assert_eq!(code, 1, "{args:?}: stderr:\n{err}");
    assert!(err.contains("404"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    // `release status --watch` stops watching once nobody reads it (the release runs 10 min).
    let plan = serde_json::json!({
        "name": "slow",
        "phases": [{ "name": "backend", "services": ["api"], "bake": "10m" }],
    });
    let (s, v) = admin_post(p.admin, "/api/releases", Some(TOKEN), Some(plan)).await;
    assert_eq!(s, 200, "{v}");
    for json in [false, true] {
        let mut args = ctl_args(&["release", "status", "--watch"]);
        if json {
            args.insert(1, "--json".into());
        }
        let started = tokio::time::Instant::now();
        let (code, err) = closed_stdout(&args).await;
        quiet(&args, code, &err);
        assert!(started.elapsed() < Duration::from_secs(10), "{args:?}");
    }
    let (s, v) = admin_post(
        p.admin,
        "/api/releases/current/abort",
        Some(TOKEN),
        Some(serde_json::json!({})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    p.stop().await;
}

/// `--admin` as an operator writes it: `HOST:PORT` as `[admin] listen` says it, a trailing
/// slash, or the full URL all reach the API; a scheme that is not http(s) or a URL with a query,
/// a user or password (sent as the Host field) or a fragment (which swallowed the API path) is a
/// usage error (exit 2) that names the bad value, never "cannot reach ... is it running?".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_url_forms() {
    let (p, _ups) = two_services().await;
    let run = |admin: String, args: &'static [&'static str]| async move {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["ctl", "--timeout", "5s", "--admin", &admin])
            .args(args)
            .env_remove("SWITCHYARD_ADMIN_URL")
            .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(20), out)
            .await
            .expect("ctl did not finish within 20 s")
            .expect("run ctl");
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    };
    for admin in [
        format!("{}", p.admin),
        format!("{}/", p.admin),
        format!("http://{}/", p.admin),
        format!("localhost:{}", p.admin.port()),
    ] {
        let o = run(admin.clone(), &["--json", "status"]).await;
        assert_eq!(o.code, 0, "{admin}: {o}");
        assert_eq!(o.json()["services"][0]["name"], "api", "{admin}: {o}");
    }
    let o = run(p.admin.to_string(), &["pause", "api"]).await;
    assert_eq!(o.code, 0, "{o}");
    for admin in [
        format!("ftp://{}", p.admin),
        format!("http://{}/?x=1", p.admin),
        format!("http://admin:pw@{}", p.admin),
        format!("http://admin@{}/", p.admin),
        format!("http://admin:pw#x@{}", p.admin),
        format!("http://admin:pw/x@{}", p.admin),
        format!("http://admin:pw?x@{}", p.admin),
        format!("http://{}#x", p.admin),
        format!("http://{}/#", p.admin),
        // A port past 65535 went to port 80 with the token.
        "http://127.0.0.1:90900".to_string(),
        "127.0.0.1:65536".to_string(),
        "https://localhost:100000/".to_string(),
    ] {
        let o = run(admin.clone(), &["resume", "api"]).await;
        assert_eq!(o.code, 2, "{admin}: {o}");
        assert!(o.stderr.contains("invalid admin URL"), "{admin}: {o}");
        assert!(!o.stderr.contains("is switchyard running"), "{admin}: {o}");
        // A password is not repeated in the error (CI logs).
        assert!(!o.stderr.contains(":pw"), "{admin}: {o}");
    }
    // An `@` in the path is refused with the way around it: `%40` (RFC 3986 3.3).
    let o = run(format!("http://{}/ops@team/", p.admin), &["resume", "api"]).await;
    assert_eq!(o.code, 2, "{o}");
    assert!(o.stderr.contains("written %40"), "{o}");
    // nothing reached the API: still paused
    assert_eq!(p.service_status("api").await["paused"], true);
    p.stop().await;
}

/// An admin listener with `[admin] tls_cert` is reached by `https://`: its CA from `--ca-file`
/// (or SWITCHYARD_ADMIN_CA_FILE); a certificate the client does not trust is refused (exit 1,
/// the handshake named).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_admin_with_ca_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
    let cert = dir.path().join("admin.crt");
    let key = dir.path().join("admin.key");
    std::fs::write(&cert, ck.cert.pem()).expect("write");
    std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write");
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
    let other_ca = dir.path().join("other.crt");
    std::fs::write(&other_ca, other.cert.pem()).expect("write");
    let up = TestUpstream::start("api-blue").await;
    let body = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n{}",
        cert.display(),
        key.display(),
        service("api", &[up.addr], &[up.addr], "")
    );
    let p = TestProxy::start(&body).await;
    let run = |ca: std::path::PathBuf, args: &'static [&'static str]| {
        let admin = format!("https://localhost:{}", p.admin.port());
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
                .args(["ctl", "--timeout", "5s", "--admin", &admin])
                .args(args)
                .env_remove("SWITCHYARD_ADMIN_URL")
                .env("SWITCHYARD_ADMIN_CA_FILE", ca)
                .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
                .env("RUST_LOG", "warn")
                .kill_on_drop(true)
                .output();
            let out = tokio::time::timeout(Duration::from_secs(20), out)
                .await
                .expect("ctl did not finish within 20 s")
                .expect("run ctl");
            Out {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        }
    };
    let o = run(cert.clone(), &["--json", "status"]).await;
    assert_eq!(o.code, 0, "{o}");
    assert_eq!(o.json()["services"][0]["active"], "blue", "{o}");
    let o = run(cert.clone(), &["pause", "api"]).await;
    assert_eq!(o.code, 0, "{o}");
    let o = run(other_ca, &["resume", "api"]).await;
    assert_eq!(o.code, 1, "{o}");
    assert!(o.stderr.contains("TLS handshake"), "{o}");
    let o = run(cert, &["--json", "status"]).await;
    assert_eq!(o.json()["services"][0]["paused"], true, "{o}");
    p.stop().await;
}

/// `--admin` pointed at the proxy listener (8080 for 9090): the application behind it answers
/// 200 to anything. ctl must not report a flip that never happened as done (exit 0): every
/// command checks that the answer is the admin API's and exits 1 naming the likely mix-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_is_not_the_admin_apis_is_not_success() {
    let (p, ups) = two_services().await;
    for args in [
        &["flip", "api", "green"][..],
        &["flip-all", "green"],
        &["pause", "web"],
        &["status"],
        &["events"],
        &["release", "status"],
        &["release", "promote"],
    ] {
        let o = ctl(p.proxy, Some(TOKEN), args).await;
        assert_eq!(o.code, 1, "{args:?}: {o}");
        assert!(o.stderr.contains("admin listener"), "{args:?}: {o}");
    }
    // the application did get the requests; Switchyard's state did not change
    assert!(ups.iter().map(|u| u.hits()).sum::<usize>() > 0);
    assert_eq!(p.service_status("api").await["generation"], 0);
    assert_eq!(p.service_status("web").await["paused"], false);
    p.stop().await;
}

/// `ctl status` shows each upstream name of a pool: how many addresses it gives, whether it is
/// stale, and the lookup's error; a name that never resolved is the only line of its color.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_upstream_names_and_why_they_fail() {
    let green = TestUpstream::start("green").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let hosts = dir.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 app.green.test\n").expect("hosts");
    let port = green.addr.port();
    let body = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nresolve_interval = \"1h\"\n\
         resolve_hosts_file = \"{}\"\n\n[[services]]\nname = \"api\"\n\
         blue = {{ upstreams = [\"app.blue.test:{port}\"] }}\n\
         green = {{ upstreams = [\"app.green.test:{port}\"] }}\n",
        hosts.display()
    );
    let p = TestProxy::start_with(&body, Some(TOKEN), Some(dir)).await;
    let o = ctl(p.admin, None, &["status"]).await;
    assert_eq!(o.code, 0, "{o}");
    let line = |name: &str| {
        o.stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("name {name}:{port} ")))
            .unwrap_or_else(|| panic!("no line for {name}:\n{o}"))
            .to_string()
    };
    let blue = line("app.blue.test");
    assert!(blue.contains("addresses=0"), "{blue}");
    assert!(blue.contains("stale=true"), "{blue}");
    assert!(
        blue.contains("error: app.blue.test is not in"),
        "the lookup's error: {blue}"
    );
    let green_line = line("app.green.test");
    assert!(green_line.contains("addresses=1"), "{green_line}");
    assert!(green_line.contains("stale=false"), "{green_line}");
    assert!(!green_line.contains("error"), "{green_line}");
    p.stop().await;
}

/// A listener that answers every request with `status` and `body` (`ctype`) and closes: a
/// gateway in front of the admin API, or the API's own refusal.
async fn answering(
    status: &str,
    ctype: &str,
    body: &str,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let answer = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let task = tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                // The head, then the body its content-length announces.
                while let Ok(n) = c.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if got.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                let _ = c.write_all(answer.as_bytes()).await;
                let _ = c.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// A gateway in front of the admin API (nginx with `proxy_read_timeout`) that gives up while a
/// flip's smoke checks run answers 504 with its HTML page, and the flip may still land: ctl
/// said it was refused (exit 1). A 5xx to a change that is not the admin API's JSON refusal now
/// exits 3, saying the outcome is not known and showing the page's title, not the page; a read
/// (`status`) that gets it is a plain failure (1), and the API's own JSON 500 refusal stays 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateways_5xx_page_to_a_change_is_an_unknown_outcome_not_a_refusal() {
    for code in [
        "502 Bad Gateway",
        "503 Service Temporarily Unavailable",
        "504 Gateway Time-out",
    ] {
        let page = format!(
            "<html>\r\n<head><title>{code}</title></head>\r\n<body>\r\n<center><h1>{code}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
        );
        let (addr, task) = answering(code, "text/html", &page).await;
        let (flip, abort, status) = tokio::join!(
            ctl(addr, Some(TOKEN), &["flip", "api", "green"]),
            ctl(addr, Some(TOKEN), &["release", "abort"]),
            ctl(addr, Some(TOKEN), &["status"]),
        );
        for o in [flip, abort] {
            assert_eq!(o.code, 3, "{code}: {o}");
            assert!(o.stderr.contains("outcome not known"), "{code}: {o}");
            assert!(o.stderr.contains(code), "{code}: {o}");
            assert!(
                !o.stderr.contains("<html>"),
                "{code}: the page is not printed: {o}"
            );
        }
        assert_eq!(status.code, 1, "{code}: {status}");
        task.abort();
    }
    let (addr, task) = answering(
        "500 Internal Server Error",
        "application/json",
        "{\"error\":\"cannot write the state file\"}",
    )
    .await;
    let o = ctl(addr, Some(TOKEN), &["flip", "api", "green"]).await;
    assert_eq!(o.code, 1, "{o}");
    assert!(o.stderr.contains("cannot write the state file"), "{o}");
    assert!(!o.stderr.contains("outcome not known"), "{o}");
    task.abort();
    // A gateway's 502/504 with a JSON body of its own (API gateways answer so), with an
    // `error` field or without: the admin API never sends either, so the outcome is not known.
    for body in [
        "{\"message\":\"Endpoint request timed out\"}",
        "{\"error\":\"upstream request timeout\"}",
    ] {
        let (addr, task) = answering("504 Gateway Timeout", "application/json", body).await;
        let o = ctl(addr, Some(TOKEN), &["flip", "api", "green"]).await;
        assert_eq!(o.code, 3, "{body}: {o}");
        assert!(o.stderr.contains("outcome not known"), "{body}: {o}");
        task.abort();
    }
}
