//! Active health checks of every upstream of both colors, and the ticker that keeps the window
//! rings ready.
//!
//! Upstreams start healthy and the first check runs at once and decides alone, so a dead pool is
//! known within one round trip of startup; after that, `unhealthy_after` consecutive failures
//! mark an upstream down and `healthy_after` consecutive successes bring it back.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::app::App;
use crate::config::Color;
use crate::routing::health_of;
use crate::upstream::Upstream;

/// Starts a check task for every upstream with health checks configured that has none yet.
/// Called at startup and after each reload.
pub fn ensure(app: &Arc<App>) {
    let snap = app.snapshot();
    for (svc, color, up) in snap.upstreams() {
        if svc.config.health.is_some() && !up.health_task.swap(true, Ordering::AcqRel) {
            let (a, service, up) = (app.clone(), svc.name().to_string(), Arc::downgrade(up));
            // Started again after a panic, it goes on counting: only the very first check
            // decides alone.
            let mut first = true;
            tokio::spawn(app.supervised("health_check", move || {
                let run = check_loop(a.clone(), service.clone(), color, up.clone(), first);
                first = false;
                run
            }));
        }
    }
}

async fn check_loop(
    app: Arc<App>,
    service: String,
    color: Color,
    up: Weak<Upstream>,
    mut first: bool,
) {
    let mut successes = 0u32;
    let mut failures = 0u32;
    loop {
        // The upstream is gone once no snapshot references it: stop.
        let Some(up) = up.upgrade() else { return };
        let Some(cfg) = health_of(&app.snapshot(), &service).cloned() else {
            // Health checks were removed by a reload: the upstream counts as healthy again.
            up.set_healthy(true);
            up.health_task.store(false, Ordering::Release);
            return;
        };
        let result = app.clients.probe(&up, &cfg.path, cfg.timeout).await;
        let (ok, why) = match &result {
            Ok(s) if s.is_success() => (true, String::new()),
            Ok(s) => (false, format!("answered {}", s.as_u16())),
            Err(e) => (false, e.clone()),
        };
        if ok {
            successes = successes.saturating_add(1);
            failures = 0;
        } else {
            failures = failures.saturating_add(1);
            successes = 0;
        }
        let healthy = up.is_active_healthy();
        let next = if first {
            ok
        } else if healthy && failures >= cfg.unhealthy_after {
            false
        } else if !healthy && successes >= cfg.healthy_after {
            true
        } else {
            healthy
        };
        first = false;
        if next != healthy {
            up.set_healthy(next);
            if next {
                tracing::info!(service = %service, color = %color, upstream = %up.addr, "upstream is healthy again");
            } else {
                tracing::warn!(
                    service = %service, color = %color, upstream = %up.addr,
                    "upstream marked unhealthy: GET {} {why}; it gets no traffic until it passes {} checks",
                    cfg.path, cfg.healthy_after
                );
            }
        }
        drop(up);
        tokio::select! {
            _ = tokio::time::sleep(cfg.interval) => {}
            _ = app.shutdown.cancelled() => return,
        }
    }
}

/// Clears the window slots about to be reused, about four times a second, and every 4 s closes
/// idle upstream connections past their idle timeout. Recorders and
/// readers stay correct without it (the slot tags see to that); it only keeps clearing off the
/// request path.
pub async fn stats_ticker(app: Arc<App>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = app.shutdown.cancelled() => return,
        }
        ticks += 1;
        // Every 4 s: close idle upstream connections that expired or that the upstream closed.
        let reap = ticks.is_multiple_of(16);
        let now = app.clock.now_epoch();
        let snap = app.snapshot();
        for svc in &snap.services {
            for color in Color::ALL {
                let pool = svc.pool(color);
                for up in &pool.upstreams {
                    up.window.prepare(now);
                    if reap {
                        up.conns.reap();
                    }
                }
                for c in &pool.critical {
                    c.counter.prepare(now);
                }
            }
        }
    }
}
