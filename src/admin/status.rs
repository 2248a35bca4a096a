//! `/api/status` and the scrape-time gauges of `/metrics`, both read from the routing snapshot
//! and the window rings.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::app::App;
use crate::config::Color;
use crate::events::now_rfc3339;
use crate::routing::Service;
use crate::stats::wall;
use crate::stats::Summary;

/// Requests-per-second are read over this short window so the dashboard feels live.
const RATE_WINDOW_SECS: u64 = 10;

fn ms(d: Option<Duration>) -> Value {
    d.map(|d| json!((d.as_secs_f64() * 1e6).round() / 1e3))
        .unwrap_or(Value::Null)
}

fn ratio(r: Option<f64>) -> Value {
    r.map(|r| json!((r * 1e6).round() / 1e6))
        .unwrap_or(Value::Null)
}

pub fn status_json(app: &App) -> Value {
    let snap = app.snapshot();
    let window = snap.config.status_window().as_secs();
    let now_epoch = app.clock.now_epoch();
    let now = Instant::now();
    let watch = app.watch.load();
    let services: Vec<Value> = snap
        .services
        .iter()
        .map(|svc| {
            let report = watch
                .get(svc.name())
                .filter(|r| r.generation == svc.state.generation);
            let mut colors = serde_json::Map::new();
            for color in Color::ALL {
                colors.insert(
                    color.as_str().to_string(),
                    color_json(
                        svc,
                        color,
                        now_epoch,
                        color_window(app, svc, color, now_epoch, window),
                    ),
                );
            }
            let r = &svc.config.rollback;
            // Until the engine has evaluated this generation (a flip less than one evaluation
            // ago), the configured triggers are shown, not evaluated yet.
            let triggers = match report {
                Some(report) => report.triggers.clone(),
                None if r.enabled => r
                    .triggers
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        let mut v = crate::rollback::unevaluated_json(t);
                        app.analysis.trigger_fields(svc, i, t, &mut v, false);
                        v
                    })
                    .collect(),
                None => Vec::new(),
            };
            json!({
                "name": svc.name(),
                "active": svc.state.active,
                "previous": svc.state.previous,
                "generation": svc.state.generation,
                "updated_at": svc.state.updated_at,
                // As the watcher decides: a release keeps the services it flipped armed.
                "armed": app.releases.armed(svc, now),
                "armed_by_release": app.releases.arms(svc),
                "armed_until": svc.armed_until().filter(|_| r.enabled).map(wall),
                "paused": svc.state.paused,
                "rollback_enabled": r.enabled,
                "dry_run": r.dry_run,
                "failed_color": svc.state.failed,
                "rollback_blocked": report.map(|r| r.blocked).unwrap_or(false),
                "hosts": svc.config.hosts,
                "path_prefix": svc.config.path_prefix,
                "colors": colors,
                "triggers": triggers,
            })
        })
        .collect();
    json!({
        "window_secs": window,
        "generated_at": now_rfc3339(),
        "uptime_secs": app.started.elapsed().as_secs(),
        "state": {
            "backend": if app.store.as_etcd().is_some() { "etcd" } else { "file" },
            "degraded": app.metrics.state_degraded.get() != 0,
            "source": app.state_source().as_str(),
        },
        "services": services,
    })
}

/// Seconds of the status window read for `color`: the live color's cut at its flip when that
/// is more recent (as the triggers read it), so that a color flipped back to shows only what it
/// served since, not an earlier live period's failures; the idle color's whole.
fn color_window(app: &App, svc: &Service, color: Color, now_epoch: u64, window: u64) -> u64 {
    match svc.flipped_at {
        Some(t) if svc.state.active == color => {
            window.min(now_epoch.saturating_sub(app.clock.epoch_at(t)) + 1)
        }
        _ => window,
    }
}

fn color_json(svc: &Service, color: Color, now_epoch: u64, window: u64) -> Value {
    let pool = svc.pool(color);
    let pool_cfg = svc.config.pool(color);
    let name_of = |addr: &std::net::SocketAddr| {
        pool_cfg
            .names()
            .find(|n| n.addrs.contains(addr))
            .map(|n| n.label())
    };
    let names: Vec<Value> = pool_cfg
        .names()
        .map(|n| {
            json!({
                "name": n.label(),
                "key": n.key,
                "addrs": n.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "stale": n.error.is_some(),
                "error": n.error,
            })
        })
        .collect();
    let mut total = Summary::default();
    let mut recent_total = 0u64;
    let upstreams: Vec<Value> = pool
        .upstreams
        .iter()
        .map(|u| {
            let s = u.window.summary(now_epoch, window);
            let recent = u.window.summary(now_epoch, RATE_WINDOW_SECS).requests;
            recent_total += recent;
            total.merge(&s);
            json!({
                "addr": u.addr_label,
                "name": name_of(&u.addr),
                "healthy": u.is_healthy(),
                // Passive health: ejected after failed requests, for this many ms more.
                "ejected": u.is_ejected(),
                "ejected_for_ms": u.passive.ejected_for_ms(),
                "requests": s.requests,
                "failures": s.failures,
                "rps": recent as f64 / RATE_WINDOW_SECS as f64,
                "error_rate": ratio(s.error_rate()),
                "p95_ms": ms(s.p95()),
                "outstanding": u.outstanding(),
            })
        })
        .collect();
    let healthy_upstreams = pool.healthy_count();
    json!({
        "live": svc.state.active == color,
        "healthy": healthy_upstreams > 0,
        "healthy_upstreams": healthy_upstreams,
        "protocol": pool.protocol.as_str(),
        "requests": total.requests,
        "failures": total.failures,
        "rps": recent_total as f64 / RATE_WINDOW_SECS as f64,
        "error_rate": ratio(total.error_rate()),
        "p95_ms": ms(total.p95()),
        "upstreams": upstreams,
        "names": names,
    })
}

/// Refreshes the gauges from the snapshot and renders every metric.
pub async fn metrics_text(app: &App) -> String {
    let m = &app.metrics;
    let _scrape = m.scrape.lock().await;
    let (dropped, counted) = (
        crate::log_writer::dropped(),
        m.log_lines_dropped_total.get(),
    );
    if dropped > counted {
        m.log_lines_dropped_total.inc_by(dropped - counted);
    }
    let snap = app.snapshot();
    let window = snap.config.status_window().as_secs();
    let now_epoch = app.clock.now_epoch();
    let now = Instant::now();
    let watch = app.watch.load();
    for g in [
        &m.active_color,
        &m.upstream_healthy,
        &m.rollback_armed,
        &m.rollback_blocked,
        &m.state_generation,
        &m.window_requests,
        &m.window_dropped_samples,
    ] {
        g.reset();
    }
    m.window_error_ratio.reset();
    m.window_latency_p95.reset();
    for svc in &snap.services {
        let name = svc.name();
        m.state_generation
            .with_label_values(&[name])
            .set(svc.state.generation as i64);
        m.rollback_armed
            .with_label_values(&[name])
            .set(app.releases.armed(svc, now) as i64);
        let blocked = watch
            .get(name)
            .filter(|r| r.generation == svc.state.generation)
            .is_some_and(|r| r.blocked);
        m.rollback_blocked
            .with_label_values(&[name])
            .set(blocked as i64);
        for color in Color::ALL {
            let c = color.as_str();
            m.active_color
                .with_label_values(&[name, c])
                .set((svc.state.active == color) as i64);
            let pool = svc.pool(color);
            let live_window = color_window(app, svc, color, now_epoch, window);
            let mut total = Summary::default();
            let mut dropped = 0;
            for u in &pool.upstreams {
                m.upstream_healthy
                    .with_label_values(&[name, c, &u.addr_label])
                    .set(u.is_healthy() as i64);
                u.window.summary_into(now_epoch, live_window, &mut total);
                dropped += u.window.dropped();
            }
            dropped += pool
                .critical
                .iter()
                .map(|p| p.counter.dropped())
                .sum::<u64>();
            m.window_requests
                .with_label_values(&[name, c])
                .set(total.requests as i64);
            m.window_dropped_samples
                .with_label_values(&[name, c])
                .set(dropped as i64);
            // Without traffic there is no ratio: leave the series at 0 rather than NaN, which
            // alert expressions handle badly; window_requests says whether it means anything.
            m.window_error_ratio
                .with_label_values(&[name, c])
                .set(total.error_rate().unwrap_or(0.0));
            m.window_latency_p95
                .with_label_values(&[name, c])
                .set(total.p95().map(|d| d.as_secs_f64()).unwrap_or(0.0));
        }
    }
    m.encode()
}
