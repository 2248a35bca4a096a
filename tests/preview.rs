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

/// The value of the `/metrics` line of `name` whose labels include every `labels` pair, if any.
async fn metric(p: &TestProxy, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let text = get(p.admin, "/metrics").await.1;
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Preview requests count in the request metrics like any other (`switchyard_requests_total`,
/// failures, duration: unchanged), and in their own `switchyard_preview_*` share, so a
/// dashboard tells them from live traffic on the same color: green's smoke tests before the
/// flip, green's live traffic after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preview_requests_have_their_own_series_besides_the_request_metrics() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let mut body = PROXY.to_string();
    body.push_str(&service("api", &[blue.addr], &[green.addr], ""));
    let p = TestProxy::start(&body).await;
    let pv = preview(&p);
    let g = green.addr.to_string();
    let green_ok = [
        ("service", "api"),
        ("color", "green"),
        ("upstream", g.as_str()),
        ("code", "200"),
    ];
    // Smoke tests of green: four answers, then one 500.
    for _ in 0..4 {
        assert_eq!(get(pv, "/x").await, (200, "green\n".to_string()));
    }
    green.set_status(500);
    assert_eq!(get(pv, "/x").await.0, 500);
    green.set_status(200);
    assert_eq!(p.get("/x").await, (200, "blue\n".to_string()));
    // Green live: two requests.
    let (s, v) = p.flip("api", "green").await;
    assert_eq!(s, 200, "{v}");
    for _ in 0..2 {
        assert_eq!(p.get("/x").await, (200, "green\n".to_string()));
    }

    let requests = "switchyard_requests_total";
    let preview_requests = "switchyard_preview_requests_total";
    // Each is recorded as its body ends: the last one's maybe just after the client had it.
    let all = eventually(10, || async {
        metric(&p, requests, &green_ok).await == Some(6.0)
    })
    .await;
    assert!(all, "{:?}", metric(&p, requests, &green_ok).await);
    assert_eq!(metric(&p, preview_requests, &green_ok).await, Some(4.0));
    let green_500 = [("color", "green"), ("code", "500")];
    assert_eq!(metric(&p, requests, &green_500).await, Some(1.0));
    assert_eq!(metric(&p, preview_requests, &green_500).await, Some(1.0));
    let green_5xx = [("color", "green"), ("kind", "5xx")];
    assert_eq!(
        metric(&p, "switchyard_upstream_failures_total", &green_5xx).await,
        Some(1.0)
    );
    assert_eq!(
        metric(&p, "switchyard_preview_upstream_failures_total", &green_5xx).await,
        Some(1.0)
    );
    let green = [("service", "api"), ("color", "green")];
    assert_eq!(
        metric(&p, "switchyard_request_duration_seconds_count", &green).await,
        Some(7.0)
    );
    assert_eq!(
        metric(
            &p,
            "switchyard_preview_request_duration_seconds_count",
            &green
        )
        .await,
        Some(5.0)
    );
    // Blue got live traffic only: no preview series.
    let blue_ok = [("color", "blue"), ("code", "200")];
    assert_eq!(metric(&p, requests, &blue_ok).await, Some(1.0));
    assert_eq!(
        metric(&p, preview_requests, &[("color", "blue")]).await,
        None
    );
    // A reload that removes green's upstream removes its preview series with its others.
    let green2 = TestUpstream::start("green2").await;
    let mut next = PROXY.to_string();
    next.push_str(&service("api", &[blue.addr], &[green2.addr], ""));
    let next = full_config(&next, p.dir.as_ref().expect("dir").path());
    std::fs::write(&p.config_path, next).expect("write config");
    p.app().reload("test").await.expect("reload");
    let text = get(p.admin, "/metrics").await.1;
    assert!(
        !text.contains(&g),
        "series of the removed upstream {g} remain:\n{text}"
    );
    p.stop().await;
}

/// A preview request's attempt on an idle upstream that refuses connections, retried on
/// another one, counts in the preview failure series too (as in the failure counter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preview_request_retried_past_a_dead_upstream_counts_its_failure_as_preview() {
    let blue = TestUpstream::start("blue").await;
    let green = TestUpstream::start("green").await;
    let dead = dead_addr().await;
    let mut body = PROXY.to_string();
    body.push_str(&service("api", &[blue.addr], &[dead, green.addr], ""));
    let p = TestProxy::start(&body).await;
    let pv = preview(&p);
    let d = dead.to_string();
    let refused = [
        ("color", "green"),
        ("upstream", d.as_str()),
        ("kind", "connect"),
    ];
    let mut seen = false;
    for _ in 0..40 {
        assert_eq!(get(pv, "/x").await, (200, "green\n".to_string()));
        if metric(&p, "switchyard_upstream_failures_total", &refused)
            .await
            .unwrap_or(0.0)
            > 0.0
        {
            seen = true;
            break;
        }
    }
    assert!(seen, "the dead upstream was never tried");
    assert_eq!(
        metric(&p, "switchyard_upstream_failures_total", &refused).await,
        metric(&p, "switchyard_preview_upstream_failures_total", &refused).await,
    );
    p.stop().await;
}
