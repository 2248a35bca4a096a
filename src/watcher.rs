//! The rollback engine's I/O loop: twice a second it measures every service's live color over
//! each trigger's window, asks the pure engine ([`crate::rollback`]) what to do, and does it
//! through the app's one writer. It also publishes trigger states for `/api/status`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::app::{App, ChangeError, WatchReport};
use crate::config::TriggerKind;
use crate::rollback::{Decision, Evaluation, Fire, Measured, ServiceWatch};
use crate::routing::Service;
use crate::stats::Summary;

/// How often triggers are evaluated (the contract asks for at least once a second).
pub const EVALUATION_INTERVAL: Duration = Duration::from_millis(500);

struct Watched {
    generation: u64,
    engine: ServiceWatch,
}

pub async fn run(app: Arc<App>) {
    let mut watched: HashMap<String, Watched> = HashMap::new();
    let mut tick = tokio::time::interval(EVALUATION_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = app.shutdown.cancelled() => return,
        }
        evaluate_all(&app, &mut watched).await;
    }
}

async fn evaluate_all(app: &Arc<App>, watched: &mut HashMap<String, Watched>) {
    let snap = app.snapshot();
    let now = Instant::now();
    let epoch = app.clock.now_epoch();
    let mut reports = HashMap::new();
    for svc in &snap.services {
        let cfg = &svc.config.rollback;
        if !cfg.enabled || cfg.triggers.is_empty() {
            // Nothing is evaluated while rollback is off: a breach from before must not fire
            // the moment a reload turns it back on, so its engine goes with it.
            watched.remove(svc.name());
            continue;
        }
        let gen = svc.state.generation;
        let w = watched
            .entry(svc.name().to_string())
            .or_insert_with(|| Watched {
                generation: gen,
                engine: ServiceWatch::new(cfg),
            });
        if w.generation != gen {
            // The live color changed under us (manual flip, reload of state): start fresh.
            w.engine.reset();
            w.generation = gen;
        }
        // Only traffic of this live period counts: a failure recorded before the flip (the
        // color's previous live period, or preview traffic while it was idle) is not the live
        // color's traffic, and must not roll back a fresh flip. The epoch of the flip itself is
        // included (1 s granularity), so no failure after the flip is ever missed.
        let live_since = svc.flipped_at.map(|t| app.clock.epoch_at(t));
        let mut measured = measure(svc, epoch, live_since);
        app.analysis.fill(svc, &mut measured);
        let target_healthy = svc
            .state
            .previous
            .is_some_and(|p| svc.pool(p).healthy_count() > 0);
        let mut decision = w.engine.evaluate(
            cfg,
            &Evaluation {
                now,
                // A release keeps the triggers of the services it flipped armed until it ends.
                armed: app.releases.armed(svc, now),
                rollback_target_healthy: target_healthy,
                measured: &measured,
                live_secs: live_since.map(|since| epoch.saturating_sub(since) + 1),
            },
        );
        if let Decision::Rollback(f) | Decision::Blocked(f) | Decision::WouldRollback(f) =
            &mut decision
        {
            app.analysis.annotate(svc, f);
        }
        let from = svc.state.active;
        let to = svc.state.previous.unwrap_or(from.other());
        // A service the running release flipped: the whole release goes back in one step
        // (and a service whose pre-release pool is dead is reported, the others still go).
        if let Decision::Rollback(fire) | Decision::Blocked(fire) = &decision {
            if app.releases.owns(svc.name()) {
                let fire = fire.clone();
                let rolled_back = matches!(decision, Decision::Rollback(_));
                decision = Decision::None;
                match crate::release::triggered(
                    app,
                    svc.name(),
                    (svc.state.active, gen),
                    &fire.detail,
                    fire_json(&fire),
                )
                .await
                {
                    // As after a plain automatic rollback: the engine's `fired` state stays on
                    // show for the generation the release's rollback published (the service
                    // is latched, disarmed until a manual flip, which resets it).
                    // Only the generation of that one flip (`gen + 1`): a change that landed
                    // while the release's rollback was being stored (a manual flip, another
                    // replica's) is a new live period, and the engine starts afresh for it.
                    Ok(true) if rolled_back => {
                        let now_gen = app
                            .snapshot()
                            .service(svc.name())
                            .map(|s| s.state.generation);
                        if now_gen == Some(gen + 1) {
                            w.generation = gen + 1;
                        }
                    }
                    Ok(true) => {}
                    Ok(false) => w.engine.reset(),
                    Err(e) => {
                        tracing::error!(service = %svc.name(), error = %e, "release rollback failed; will retry");
                        w.engine.reset();
                    }
                }
            }
        }
        match decision {
            Decision::None => {}
            Decision::Rollback(fire) => {
                match app
                    .auto_rollback(svc.name(), gen, &fire.detail, fire_json(&fire))
                    .await
                {
                    // Keep the engine's `fired` state on show: the service is latched now
                    // and stays disarmed until a manual flip, which resets it.
                    Ok(Some(outcome)) => w.generation = outcome.generation,
                    // Not applied: a pause (or the end of `watch_for`) landed after this
                    // evaluation, or another change did. The engine latched `fired` and would
                    // stay silent for this generation (a pause changes none): start it fresh,
                    // so that after a resume a breach that still holds fires.
                    Ok(None) => w.engine.reset(),
                    Err(ChangeError::Refused(why)) => {
                        // The target went unhealthy since this evaluation read it. The engine
                        // latched `Rollback` and would stay silent until the next flip: start
                        // it fresh so the rollback happens once the condition holds again.
                        w.engine.reset();
                        app.record_decision(
                            svc.name(),
                            crate::events::Reason::RollbackBlocked,
                            (from, to),
                            gen,
                            &format!("{}; not rolled back: {why}", fire.detail),
                            fire_json(&fire),
                        )
                        .await;
                    }
                    Err(e) => {
                        tracing::error!(service = %svc.name(), error = %e, "automatic rollback failed; will retry");
                        w.engine.reset();
                    }
                }
            }
            Decision::Blocked(fire) => {
                app.record_decision(
                    svc.name(),
                    crate::events::Reason::RollbackBlocked,
                    (from, to),
                    gen,
                    &format!(
                        "{}; not rolled back: the {to} pool has no healthy upstream",
                        fire.detail
                    ),
                    fire_json(&fire),
                )
                .await;
            }
            Decision::WouldRollback(fire) => {
                app.record_decision(
                    svc.name(),
                    crate::events::Reason::WouldRollback,
                    (from, to),
                    gen,
                    &format!("dry run: {}", fire.detail),
                    fire_json(&fire),
                )
                .await;
            }
        }
        let triggers = w
            .engine
            .states()
            .iter()
            .zip(&cfg.triggers)
            .enumerate()
            .map(|(i, (s, t))| {
                let mut v = s.to_json(t, crate::stats::wall);
                app.analysis.status_fields(svc, i, t, &mut v);
                v
            })
            .collect();
        reports.insert(
            svc.name().to_string(),
            WatchReport {
                generation: w.generation,
                triggers,
                blocked: w.engine.blocked(),
            },
        );
    }
    watched.retain(|name, _| snap.service(name).is_some());
    app.watch.store(Arc::new(reports));
}

/// Seconds of window to read at `epoch` for a trigger window `over`: at most the epochs since
/// `live_since` (inclusive), at least one.
fn window_secs(over: Duration, epoch: u64, live_since: Option<u64>) -> u64 {
    let secs = over.as_secs().max(1);
    match live_since {
        Some(since) => secs.min(epoch.saturating_sub(since) + 1),
        None => secs,
    }
}

/// The live color's numbers for each trigger, over that trigger's own window (cut at
/// `live_since`, the epoch the color went live, when known).
fn measure(svc: &Service, epoch: u64, live_since: Option<u64>) -> Vec<Measured> {
    let pool = svc.live();
    let mut by_window: HashMap<u64, Summary> = HashMap::new();
    let mut summary = |over: Duration| -> Summary {
        let secs = window_secs(over, epoch, live_since);
        by_window
            .entry(secs)
            .or_insert_with(|| {
                let mut s = Summary::default();
                for u in &pool.upstreams {
                    u.window.summary_into(epoch, secs, &mut s);
                }
                s
            })
            .clone()
    };
    svc.config
        .rollback
        .triggers
        .iter()
        .enumerate()
        .map(|(i, t)| match &t.kind {
            TriggerKind::ErrorRate { over, .. } => {
                let s = summary(*over);
                Measured::Rate {
                    requests: s.requests,
                    failures: s.failures,
                }
            }
            TriggerKind::P95Latency { over, .. } => {
                let s = summary(*over);
                Measured::Latency {
                    // The requests with a latency: a 503 for want of a healthy upstream has
                    // none, and `min_requests` is about the samples p95 is taken from.
                    requests: s.samples(),
                    p95: s.p95(),
                }
            }
            TriggerKind::Critical5xx { over, .. } => {
                let secs = window_secs(*over, epoch, live_since);
                let failures = pool
                    .critical
                    .iter()
                    .find(|c| c.trigger_index == i)
                    .map(|c| c.counter.sum(epoch, secs))
                    .unwrap_or(0);
                Measured::Count {
                    requests: summary(*over).requests,
                    failures,
                }
            }
            TriggerKind::Unhealthy => Measured::Health {
                healthy_upstreams: pool.healthy_count(),
                total: pool.upstreams.len(),
            },
            // Read from the trigger's own task by `Analysis::fill`.
            TriggerKind::Prometheus(_) | TriggerKind::Probe(_) => {
                Measured::External(crate::rollback::External::Pending, None)
            }
        })
        .collect()
}

fn fire_json(f: &Fire) -> serde_json::Value {
    let mut v = json!({
        "kind": f.kind,
        "threshold": f.threshold,
        "threshold_text": f.threshold_text,
        "value": f.value,
        "value_text": f.value_text,
        "over_secs": f.over.as_secs(),
        "for_secs": f.for_.as_secs(),
        "requests": f.requests,
    });
    if let (Some(obj), Some(serde_json::Value::Object(extra))) = (v.as_object_mut(), &f.extra) {
        for (k, x) in extra {
            obj.insert(k.clone(), x.clone());
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// From a flip until the engine's next evaluation, `/api/status` shows the service's
    /// configured triggers as not evaluated yet (`insufficient_data`, no value, no request
    /// count), never an empty list; the evaluation's states replace them.
    #[tokio::test]
    async fn triggers_are_shown_between_a_flip_and_their_evaluation() {
        const CONFIG: &str = r#"
[[services]]
name = "api"
blue = { upstreams = ["127.0.0.1:9"] }
green = { upstreams = ["127.0.0.1:9"] }
[services.rollback]
[[services.rollback.triggers]]
kind = "error_rate"
above = 0.05
over = "1m"
for = "10s"
[[services.rollback.triggers]]
kind = "unhealthy"
"#;
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let cfg = crate::config::from_toml_str_with_env(CONFIG, Some(Default::default()))
            .unwrap_or_else(|e| panic!("{e}"));
        let store = crate::state::StateStore::file(dir.path().join("state.json"));
        let app = App::new(cfg, None, store, None)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let triggers =
            |app: &App| crate::admin::status_json(app)["services"][0]["triggers"].clone();
        let mut watched = HashMap::new();
        evaluate_all(&app, &mut watched).await;
        let before = triggers(&app);
        assert_eq!(before.as_array().map(Vec::len), Some(2), "{before}");

        app.flip(
            "api",
            crate::config::Color::Green,
            true,
            crate::app::FlipKind::Manual,
            "test",
        )
        .await
        .unwrap_or_else(|e| panic!("{e:?}"));
        let pending = triggers(&app);
        let kinds: Vec<(&str, &str)> = pending
            .as_array()
            .unwrap_or_else(|| panic!("{pending}"))
            .iter()
            .map(|t| {
                assert_eq!((&t["value"], &t["requests"]), (&json!(null), &json!(null)));
                (
                    t["kind"].as_str().unwrap_or(""),
                    t["state"].as_str().unwrap_or(""),
                )
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ("error_rate", "insufficient_data"),
                ("unhealthy", "insufficient_data")
            ]
        );
        assert_eq!(pending[0]["threshold"], before[0]["threshold"]);
        assert_eq!(pending[0]["for_secs"], json!(10));

        evaluate_all(&app, &mut watched).await;
        let evaluated = triggers(&app);
        assert_eq!(evaluated[0]["requests"], json!(0), "{evaluated}");
        assert_eq!(evaluated.as_array().map(Vec::len), Some(2), "{evaluated}");
    }

    #[test]
    fn window_is_cut_at_the_flip() {
        let m = Duration::from_secs(60);
        assert_eq!(window_secs(m, 100, None), 60);
        assert_eq!(window_secs(Duration::ZERO, 100, None), 1);
        // Flipped in epoch 95: epochs 95..=100.
        assert_eq!(window_secs(m, 100, Some(95)), 6);
        assert_eq!(window_secs(m, 100, Some(100)), 1);
        assert_eq!(window_secs(m, 100, Some(10)), 60);
        // A flip "after" now (clock skew between reads) still reads the current epoch.
        assert_eq!(window_secs(m, 100, Some(101)), 1);
    }
}
