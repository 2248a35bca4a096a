//! The dashboard in a real browser: Debian's headless Chromium loads `GET /` from a running
//! Switchyard, shows each service's live color, and its flip button (with its confirm dialog and
//! the admin token from the tab's sessionStorage) flips the service, which /api/status confirms.
//!
//! Chromium is driven through the DevTools protocol over a small WebSocket client written here
//! (no extra crates). It needs `/usr/bin/chromium` (Debian package `chromium`); without it the
//! test fails and says so. Set SWITCHYARD_DASHBOARD_SCREENSHOT=/path/file.png to also save a
//! screenshot of the page.

mod common;
use common::*;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CHROMIUM: &str = "/usr/bin/chromium";

/// Kills Chromium (and its process group) when the test ends, passed or failed.
struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    /// The DevTools HTTP endpoint.
    devtools: SocketAddr,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium's helpers (zygote, renderers) are in its process group.
        let pid = self.child.id() as i32;
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn launch_chromium() -> Browser {
    assert!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: the dashboard test needs Debian's headless Chromium \
         (apt-get install chromium)"
    );
    let profile = tempfile::tempdir().expect("profile dir");
    let mut cmd = Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        "--no-first-run",
        "--no-default-browser-check",
        "--mute-audio",
        "--window-size=1400,1100",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg("about:blank")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    let mut child = cmd.spawn().expect("start chromium");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel::<String>();
    // Keep draining stderr for the browser's whole life so it never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let devtools = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "chromium did not report its DevTools endpoint within 20 s; stderr:\n{}",
                    seen.join("\n")
                );
            }
        };
        if let Some(rest) = line.split("DevTools listening on ws://").nth(1) {
            let hostport = rest.split('/').next().unwrap_or_default();
            break hostport.parse::<SocketAddr>().expect("DevTools address");
        }
        seen.push(line);
    };
    Browser {
        child,
        _profile: profile,
        devtools,
    }
}

/// A minimal WebSocket client (RFC 6455): text frames out (masked), text frames in.
struct Ws {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Ws {
    async fn connect(addr: SocketAddr, path: &str) -> Ws {
        let mut stream = TcpStream::connect(addr).await.expect("connect devtools");
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: c3dpdGNoeWFyZC10ZXN0IQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.expect("handshake");
        let mut buf = Vec::new();
        let end = loop {
            buf.reserve(4096);
            let n = stream.read_buf(&mut buf).await.expect("handshake read");
            assert!(n > 0, "devtools closed the WebSocket handshake");
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "WebSocket upgrade refused:\n{head}"
        );
        Ws {
            stream,
            buf: buf[end..].to_vec(),
        }
    }

    async fn send(&mut self, text: &str) {
        let payload = text.as_bytes();
        let mut frame = vec![0x81u8];
        let len = payload.len();
        if len < 126 {
            frame.push(0x80 | len as u8);
        } else if len < 65536 {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let mask = [0x5au8, 0x17, 0xc3, 0x9e];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await.expect("ws send");
    }

    async fn need(&mut self, n: usize) {
        while self.buf.len() < n {
            self.buf.reserve(64 * 1024);
            let got = self.stream.read_buf(&mut self.buf).await.expect("ws read");
            assert!(got > 0, "devtools closed the WebSocket");
        }
    }

    /// The next whole text message (fragments joined; pings answered).
    async fn recv(&mut self) -> String {
        let mut message = Vec::new();
        loop {
            self.need(2).await;
            let (b0, b1) = (self.buf[0], self.buf[1]);
            let (fin, opcode, masked) = (b0 & 0x80 != 0, b0 & 0x0f, b1 & 0x80 != 0);
            let mut len = (b1 & 0x7f) as usize;
            let mut at = 2;
            if len == 126 {
                self.need(4).await;
                len = u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize;
                at = 4;
            } else if len == 127 {
                self.need(10).await;
                let mut b = [0u8; 8];
                b.copy_from_slice(&self.buf[2..10]);
                len = u64::from_be_bytes(b) as usize;
                at = 10;
            }
            let mask_at = at;
            if masked {
                at += 4;
            }
            self.need(at + len).await;
            let mut payload = self.buf[at..at + len].to_vec();
            if masked {
                let m = [
                    self.buf[mask_at],
                    self.buf[mask_at + 1],
                    self.buf[mask_at + 2],
                    self.buf[mask_at + 3],
                ];
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= m[i % 4];
                }
            }
            self.buf.drain(..at + len);
            match opcode {
                0x0..=0x2 => {
                    message.extend_from_slice(&payload);
                    if fin {
                        return String::from_utf8_lossy(&message).into_owned();
                    }
                }
                0x8 => panic!("devtools closed the WebSocket"),
                0x9 => {
                    // ping -> pong with the same payload
                    let mut frame = vec![0x8a, 0x80 | payload.len() as u8, 0, 0, 0, 0];
                    frame.extend_from_slice(&payload);
                    self.stream.write_all(&frame).await.expect("pong");
                }
                _ => {}
            }
        }
    }
}

/// One page of the browser, over the DevTools protocol.
struct Page {
    ws: Ws,
    next_id: u64,
    /// Uncaught exceptions and console errors the page reported.
    errors: Vec<String>,
}

impl Page {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        self.ws
            .send(&json!({ "id": id, "method": method, "params": params }).to_string())
            .await;
        loop {
            let msg: Value = serde_json::from_str(&self.ws.recv().await).expect("CDP JSON");
            if msg["id"] == id {
                assert!(msg.get("error").is_none(), "{method} failed: {msg}");
                return msg["result"].clone();
            }
            match msg["method"].as_str() {
                Some("Runtime.exceptionThrown") => {
                    self.errors
                        .push(msg["params"]["exceptionDetails"].to_string());
                }
                Some("Runtime.consoleAPICalled") if msg["params"]["type"] == "error" => {
                    self.errors.push(msg["params"]["args"].to_string());
                }
                _ => {}
            }
        }
    }

    /// Evaluates a JS expression in the page and returns its value.
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expr, "returnByValue": true, "awaitPromise": true }),
            )
            .await;
        assert!(
            r.get("exceptionDetails").is_none(),
            "JS error in {expr}: {r}"
        );
        r["result"]["value"].clone()
    }

    /// Polls `expr` until it returns `want` (at most `secs`), returning the last value.
    async fn wait_for(&mut self, expr: &str, want: &Value, secs: u64) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.eval(expr).await;
            if &v == want || tokio::time::Instant::now() >= deadline {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn open_page(browser: &Browser) -> Page {
    let (s, body) = get(browser.devtools, "/json/list").await;
    assert_eq!(s, 200, "{body}");
    let targets: Value = serde_json::from_str(&body).expect("targets JSON");
    let ws_url = targets
        .as_array()
        .and_then(|a| a.iter().find(|t| t["type"] == "page"))
        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
        .unwrap_or_else(|| panic!("no page target: {targets}"))
        .to_string();
    let path = format!(
        "/{}",
        ws_url
            .split_once("://")
            .and_then(|(_, r)| r.split_once('/'))
            .map(|(_, p)| p)
            .expect("ws path")
    );
    let mut page = Page {
        ws: Ws::connect(browser.devtools, &path).await,
        next_id: 0,
        errors: Vec::new(),
    };
    page.call("Runtime.enable", json!({})).await;
    page.call("Page.enable", json!({})).await;
    page
}

const ACTIVE: &str = r#"(function(){var c=document.querySelector('[data-service="api"] [data-role="active-color"]');return c?c.textContent.trim():null})()"#;

async fn dashboard_flow() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let health = "[services.health]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"2s\"\nunhealthy_after = 1\nhealthy_after = 1\n";
    let p = TestProxy::start(&service("api", &[blue.addr], &[green.addr], health)).await;
    for _ in 0..10 {
        assert_eq!(p.get("/x").await.0, 200);
    }
    let browser = launch_chromium();
    let mut page = open_page(&browser).await;
    let url = format!("http://{}/", p.admin);
    page.call("Page.navigate", json!({ "url": url })).await;

    // The page loads and shows the live color.
    let v = page.wait_for(ACTIVE, &json!("blue"), 10).await;
    assert_eq!(v, json!("blue"), "the dashboard's live color");
    let conn = page
        .wait_for(
            "document.getElementById('conn').textContent",
            &json!("connected"),
            5,
        )
        .await;
    assert_eq!(conn, json!("connected"));
    let text = page.eval("document.body.innerText").await;
    let text = text.as_str().unwrap_or_default().to_string();
    for want in [
        "api",
        "LIVE",
        "Flip to GREEN",
        &blue.addr.to_string(),
        &green.addr.to_string(),
    ] {
        assert!(text.contains(want), "the page shows {want:?}:\n{text}");
    }

    // No trigger watches api: no button to pause what does not run.
    let hidden = page
        .eval(r#"document.querySelector('[data-service="api"] [data-action="pause"]').hidden"#)
        .await;
    assert_eq!(hidden, json!(true), "a pause button without a trigger");

    // Without a token the button does nothing but ask for one.
    page.eval("sessionStorage.clear(); true").await;
    page.eval(r#"document.querySelector('[data-service="api"] [data-action="flip"][data-to="green"]').click(); true"#)
        .await;
    let need = page
        .wait_for(
            "document.getElementById('tok-wrap').classList.contains('need')",
            &json!(true),
            5,
        )
        .await;
    assert_eq!(need, json!(true), "the token field is highlighted");
    assert_eq!(p.service_status("api").await["active"], "blue");

    // With the token (as the Save button stores it) the button asks for confirmation, then flips.
    page.eval(&format!(
        "document.getElementById('token').value = {}; document.getElementById('token-save').click(); \
         sessionStorage.getItem('switchyard_token')",
        json!(TOKEN)
    ))
    .await;
    page.eval(r#"document.querySelector('[data-service="api"] [data-action="flip"][data-to="green"]').click(); true"#)
        .await;
    let shown = page
        .wait_for(
            "!document.getElementById('confirm').hidden",
            &json!(true),
            5,
        )
        .await;
    assert_eq!(shown, json!(true), "a confirm dialog");
    let msg = page
        .eval("document.getElementById('confirm-msg').textContent")
        .await;
    assert!(
        msg.as_str().unwrap_or_default().contains("GREEN"),
        "the dialog says what it will do: {msg}"
    );
    assert_eq!(
        p.service_status("api").await["active"],
        "blue",
        "nothing happens before the confirmation"
    );
    page.eval("document.getElementById('confirm-ok').click(); true")
        .await;
    let v = page.wait_for(ACTIVE, &json!("green"), 10).await;
    assert_eq!(v, json!("green"), "the page shows the new live color");
    let st = p.service_status("api").await;
    assert_eq!(st["active"], "green", "{st}");
    assert_eq!(st["generation"], 1, "{st}");
    // The page polls the status: it can show the flip a moment before its event is listed.
    eventually(10, || async { !p.events().await.is_empty() }).await;
    let evs = p.events().await;
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert_eq!(evs[0]["reason"], "manual");
    assert_eq!(p.get("/x").await, (200, "green\n".to_string()));

    // With confirmations turned off for the tab, the (re-labelled) button flips straight back.
    page.eval("sessionStorage.setItem('switchyard_noconfirm', '1'); true")
        .await;
    let label = page
        .eval(r#"document.querySelector('[data-service="api"] [data-action="flip"]').textContent"#)
        .await;
    assert_eq!(label, json!("Flip to BLUE"));
    page.eval(r#"document.querySelector('[data-service="api"] [data-action="flip"][data-to="blue"]').click(); true"#)
        .await;
    let v = page.wait_for(ACTIVE, &json!("blue"), 10).await;
    assert_eq!(v, json!("blue"));
    assert_eq!(p.service_status("api").await["active"], "blue");

    // A refused flip (green unhealthy) is reported on the page, and changes nothing.
    green.set_health(500);
    assert!(
        eventually(10, || async {
            p.service_status("api").await["colors"]["green"]["healthy"] == false
        })
        .await
    );
    page.eval(r#"document.querySelector('[data-service="api"] [data-action="flip"][data-to="green"]').click(); true"#)
        .await;
    let toast = page
        .wait_for(
            "(function(){var t=document.getElementById('toast');return !t.hidden && t.textContent.indexOf('409')>=0})()",
            &json!(true),
            5,
        )
        .await;
    assert_eq!(toast, json!(true), "the 409 is shown");
    // It offers a forced flip; decline it.
    let offered = page
        .wait_for(
            "!document.getElementById('confirm').hidden",
            &json!(true),
            5,
        )
        .await;
    assert_eq!(offered, json!(true));
    page.eval("document.getElementById('confirm-cancel').click(); true")
        .await;
    assert_eq!(p.service_status("api").await["active"], "blue");

    if let Ok(path) = std::env::var("SWITCHYARD_DASHBOARD_SCREENSHOT") {
        let shot = page
            .call("Page.captureScreenshot", json!({ "format": "png" }))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap_or_default())
            .expect("png");
        std::fs::write(&path, png).expect("write screenshot");
    }
    assert!(
        page.errors.is_empty(),
        "the page reported errors: {:#?}",
        page.errors
    );
    drop(page);
    drop(browser);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_the_live_color_and_its_button_flips() {
    tokio::time::timeout(Duration::from_secs(90), Box::pin(dashboard_flow()))
        .await
        .expect("the dashboard test took longer than 90 s");
}

const RELEASE_STATE: &str = r#"(function(){var c=document.querySelector('#release [data-role="release-state"]');return c?c.textContent.trim():null})()"#;

/// The release timeline: the state, the promote button at a manual gate; and no one-click
/// rollback onto a color latched as failed.
async fn release_flow() {
    let ups = [
        TestUpstream::start("api-blue").await,
        TestUpstream::start("api-green").await,
        TestUpstream::start("panel-blue").await,
        TestUpstream::start("panel-green").await,
    ];
    let body = format!(
        "{}{}",
        service(
            "api",
            &[ups[0].addr],
            &[ups[1].addr],
            "path_prefix = \"/api\""
        ),
        service(
            "panel",
            &[ups[2].addr],
            &[ups[3].addr],
            "path_prefix = \"/panel\""
        )
    );
    // `panel` was rolled back automatically before: blue live, green latched as failed.
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("state.json"),
        json!({"version": 1, "services": {"panel": {"active": "blue", "previous": "green", "generation": 2, "failed": "green"}}}).to_string(),
    )
    .expect("state");
    let p = TestProxy::start_with(&body, Some(TOKEN), Some(dir)).await;
    let browser = launch_chromium();
    let mut page = open_page(&browser).await;
    page.call(
        "Page.navigate",
        json!({ "url": format!("http://{}/", p.admin) }),
    )
    .await;
    let rb = r#"(function(){var b=document.querySelector('[data-service="panel"] [data-action="rollback"]');return b?[b.disabled,b.textContent]:null})()"#;
    let v = page
        .wait_for(rb, &json!([true, "No rollback: GREEN failed"]), 10)
        .await;
    assert_eq!(
        v,
        json!([true, "No rollback: GREEN failed"]),
        "no one-click rollback onto a latched color"
    );

    let (s, v) = admin_post(
        p.admin,
        "/api/releases",
        Some(TOKEN),
        Some(json!({
            "name": "dash release",
            "validate": "0s",
            "phases": [
                { "name": "backend", "services": ["api"], "bake": "0s", "gate": "manual" },
                { "name": "frontend", "services": ["panel"], "bake": "0s" },
            ]
        })),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let st = page.wait_for(RELEASE_STATE, &json!("waiting"), 10).await;
    assert_eq!(st, json!("waiting"), "the release and its state are shown");
    let text = page
        .eval("document.getElementById('release').innerText")
        .await;
    let text = text.as_str().unwrap_or_default().to_string();
    for want in ["dash release", "backend", "frontend", "Promote", "Abort"] {
        assert!(text.contains(want), "the timeline shows {want:?}:\n{text}");
    }
    page.eval(&format!(
        "sessionStorage.setItem('switchyard_token', {}); sessionStorage.setItem('switchyard_noconfirm', '1'); true",
        json!(TOKEN)
    ))
    .await;
    page.eval(
        r#"document.querySelector('#release [data-action="release-promote"]').click(); true"#,
    )
    .await;
    let done = eventually(10, || async {
        admin_get(p.admin, "/api/releases").await.1["recent"][0]["state"] == "complete"
    })
    .await;
    assert!(done, "{}", admin_get(p.admin, "/api/releases").await.1);
    let last = page
        .wait_for(
            r#"(function(){var c=document.querySelector('#release [data-role="release-last"]');return c?c.textContent.indexOf('complete')>=0:false})()"#,
            &json!(true),
            10,
        )
        .await;
    assert_eq!(last, json!(true), "the page shows the release ended");
    assert!(
        page.errors.is_empty(),
        "the page reported errors: {:#?}",
        page.errors
    );
    drop(page);
    drop(browser);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_the_release_and_promotes_it() {
    tokio::time::timeout(Duration::from_secs(90), Box::pin(release_flow()))
        .await
        .expect("the dashboard release test took longer than 90 s");
}

const STATE_BANNER: &str = r#"(function(){var b=document.getElementById('state-banner');return b&&!b.hidden?b.textContent:null})()"#;

/// etcd unreachable: the page says so (it showed "connected" and nothing else while every flip
/// was answered 503).
async fn degraded_flow() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let etcd = dead_addr().await;
    let p = TestProxy::start(&format!(
        "[state]\nbackend = \"etcd\"\netcd_endpoints = [\"http://{etcd}\"]\netcd_timeout = \"500ms\"\n{}",
        service("api", &[blue.addr], &[green.addr], "")
    ))
    .await;
    let degraded = eventually(20, || async {
        p.status().await["state"]["degraded"] == json!(true)
    })
    .await;
    assert!(degraded, "{}", p.status().await);
    let browser = launch_chromium();
    let mut page = open_page(&browser).await;
    let url = format!("http://{}/", p.admin);
    page.call("Page.navigate", json!({ "url": url })).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let v = page.eval(STATE_BANNER).await;
        if let Some(t) = v.as_str() {
            break t.to_string();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no state banner: {v}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(text.contains("State backend (etcd) unreachable"), "{text}");
    assert!(text.contains("refused (503)"), "{text}");
    assert!(page.errors.is_empty(), "{:?}", page.errors);
    drop(page);
    drop(browser);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_says_when_the_state_backend_is_unreachable() {
    tokio::time::timeout(Duration::from_secs(90), Box::pin(degraded_flow()))
        .await
        .expect("the dashboard test took longer than 90 s");
}
