//! The preview listener (`[proxy] preview_listen`): every request there goes to the idle color,
//! it follows flips and rollbacks, and the live listener is unaffected by it.

mod common;
use common::*;

use std::net::SocketAddr;

const PROXY: &str =
    "[proxy]\nlisten = \"127.0.0.1:0\"\npreview_listen = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n";

fn preview(p: &TestProxy) -> SocketAddr {
    p.preview
        .expect("preview_listen is set, so the proxy exposes a preview listener")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_reaches_the_idle_color_and_follows_flips() {
    let api_blue = TestUpstream::start("api-blue").await;
    let api_green = TestUpstream::start("api-green").await;
    let web_blue = TestUpstream::start("web-blue").await;
    let web_green = TestUpstream::start("web-green").await;
    let mut body = PROXY.to_string();
    body.push_str(&service(
        "api",
        &[api_blue.addr],
        &[api_green.addr],
        "path_prefix = \"/api\"",
    ));
    body.push_str(&service(
        "web",
        &[web_blue.addr],
        &[web_green.addr],
        "active = \"green\"",
    ));
    let p = TestProxy::start(&body).await;
    let pv = preview(&p);
    assert_ne!(pv, p.proxy);

    // Before any flip: live is blue (api) / green (web); preview is the other one, with the same
    // routing rules.
    assert_eq!(p.get("/api/x").await, (200, "api-blue\n".to_string()));
    assert_eq!(get(pv, "/api/x").await, (200, "api-green\n".to_string()));
    assert_eq!(p.get("/page").await, (200, "web-green\n".to_string()));
    assert_eq!(get(pv, "/page").await, (200, "web-blue\n".to_string()));

    // Preview traffic reaches only the idle pool and the live one only live traffic.
    let (lb, lg) = (api_blue.hits(), api_green.hits());
    for _ in 0..5 {
        assert_eq!(get(pv, "/api/y").await.1, "api-green\n");
    }
    assert_eq!(
        api_blue.hits(),
        lb,
        "preview requests must not reach the live pool"
    );
    assert_eq!(api_green.hits(), lg + 5);

    // After a flip, preview follows: it now reaches the new idle color (blue).
    let (s, v) = p.flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(p.get("/api/x").await, (200, "api-green\n".to_string()));
    assert_eq!(get(pv, "/api/x").await, (200, "api-blue\n".to_string()));
    // the other service is untouched
    assert_eq!(p.get("/page").await, (200, "web-green\n".to_string()));
    assert_eq!(get(pv, "/page").await, (200, "web-blue\n".to_string()));

    // A rollback and a flip-all move it too.
    let (s, v) = admin_post(p.admin, "/api/services/api/rollback", Some(TOKEN), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(get(pv, "/api/x").await, (200, "api-green\n".to_string()));
    let (s, v) = admin_post(
        p.admin,
        "/api/flip",
        Some(TOKEN),
        Some(serde_json::json!({ "to": "blue" })),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(p.get("/api/x").await, (200, "api-blue\n".to_string()));
    assert_eq!(get(pv, "/api/x").await, (200, "api-green\n".to_string()));
    assert_eq!(p.get("/page").await, (200, "web-blue\n".to_string()));
    assert_eq!(get(pv, "/page").await, (200, "web-green\n".to_string()));

    // Unmatched requests are a 404 there as well.
    let body = "[proxy]\nlisten = \"127.0.0.1:0\"\npreview_listen = \"127.0.0.1:0\"\n".to_string()
        + &service(
            "only",
            &[api_blue.addr],
            &[api_green.addr],
            "path_prefix = \"/only\"",
        );
    let q = TestProxy::start(&body).await;
    assert_eq!(get(preview(&q), "/elsewhere").await.0, 404);
    q.stop().await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_idle_color_fails_on_preview_only() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let mut body = PROXY.to_string();
    body.push_str(&service(
        "api",
        &[blue.addr],
        &[green.addr],
        "[services.health]\npath = \"/health\"\ninterval = \"100ms\"\ntimeout = \"2s\"\nunhealthy_after = 1\nhealthy_after = 1\n",
    ));
    let p = TestProxy::start(&body).await;
    let pv = preview(&p);

    // Green answers 500: preview shows it, live stays clean.
    green.set_status(500);
    assert_eq!(get(pv, "/x").await.0, 500);
    assert_eq!(p.get("/x").await, (200, "blue\n".to_string()));

    // Green's pool goes unhealthy: preview says so (503), live is untouched.
    green.set_health(500);
    assert!(
        eventually(10, || async {
            p.service_status("api").await["colors"]["green"]["healthy"] == false
        })
        .await
    );
    let (s, body) = get(pv, "/x").await;
    assert_eq!(s, 503, "{body}");
    assert!(
        !body.contains(&green.addr.to_string()),
        "no internal address leaks: {body}"
    );
    assert_eq!(p.get("/x").await, (200, "blue\n".to_string()));
    assert_eq!(p.service_status("api").await["active"], "blue");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_preview_listener_unless_configured() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let p = TestProxy::start(&service("api", &[blue.addr], &[green.addr], "")).await;
    assert!(p.preview.is_none());
    p.stop().await;
}

/// Preview traffic is not live traffic: failures seen while smoke-testing the idle color through
/// the preview listener must not count toward a rollback trigger after the flip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_failures_do_not_trigger_a_rollback_after_the_flip() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let mut body = PROXY.to_string();
    body.push_str(&service(
        "api",
        &[blue.addr],
        &[green.addr],
        "[services.rollback]\nenabled = true\nwatch_for = \"1m\"\nmin_requests = 5\n\
         [[services.rollback.triggers]]\nkind = \"error_rate\"\nabove = 0.2\nover = \"30s\"\nfor = \"0s\"\n",
    ));
    let p = TestProxy::start(&body).await;
    let pv = preview(&p);
    // The smoke test finds green broken...
    green.set_status(500);
    for _ in 0..20 {
        assert_eq!(get(pv, "/x").await.0, 500);
    }
    // ...the operator fixes it, checks again, and flips.
    green.set_status(200);
    assert_eq!(get(pv, "/x").await.0, 200);
    let (s, v) = p.flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    // Healthy live traffic on green from now on.
    for _ in 0..20 {
        assert_eq!(p.get("/x").await, (200, "green\n".to_string()));
    }
    // Give the watcher (evaluating at least once a second) time to judge it.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let st = p.service_status("api").await;
    assert_eq!(
        st["active"],
        "green",
        "pre-flip preview failures rolled green back: {st:#}\nevents: {:#?}",
        p.events().await
    );
    p.stop().await;
}
