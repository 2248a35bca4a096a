//! The loop that keeps upstream names resolved while running: every `[proxy] resolve_interval`
//! it looks every name up again ([`crate::resolve`]) and publishes a new snapshot through the
//! app's writer when an answer changed. (The resolver itself sits below the app, which also
//! uses it at reload.)

use std::sync::Arc;

use prometheus::{IntCounterVec, IntGaugeVec, Opts};

use crate::app::App;

/// The loop's series, registered once (the loop may be started again, [`crate::supervise`]).
#[derive(Clone)]
pub struct Series {
    failures: IntCounterVec,
    stale: IntGaugeVec,
}

impl Series {
    pub fn register(app: &App) -> Option<Series> {
        let registry = &app.metrics.registry;
        let failures = IntCounterVec::new(
            Opts::new(
                crate::resolve::RESOLVE_FAILURES_TOTAL,
                "Failed or empty lookups of upstream names (the last good addresses are kept).",
            ),
            &["name"],
        );
        let stale = IntGaugeVec::new(
            Opts::new(
                crate::resolve::RESOLUTION_STALE,
                "1 while an upstream name's last lookup failed and its last good addresses are in use.",
            ),
            &["name"],
        );
        let (Ok(failures), Ok(stale)) = (failures, stale) else {
            return None;
        };
        let _ = registry.register(Box::new(failures.clone()));
        let _ = registry.register(Box::new(stale.clone()));
        Some(Series { failures, stale })
    }
}

/// Re-resolves every `resolve_interval` and publishes a new snapshot when an answer changes.
pub async fn run(app: Arc<App>, series: Series) {
    let Series { failures, stale } = series;
    loop {
        let config = app.snapshot().config.clone();
        // Gauges and counters for every name, at 0 from the start.
        for svc in &config.services {
            for pool in [&svc.blue, &svc.green] {
                for n in pool.names() {
                    let label = n.label();
                    failures.with_label_values(&[label.as_str()]);
                    stale
                        .with_label_values(&[label.as_str()])
                        .set(n.error.is_some() as i64);
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(config.proxy.resolve_interval) => {}
            () = app.shutdown.cancelled() => return,
        }
        let config = app.snapshot().config.clone();
        if !crate::resolve::has_names(&config) {
            continue;
        }
        let answers = crate::resolve::lookup_all(&config).await;
        for ((host, port), a) in &answers {
            if a.is_err() {
                failures
                    .with_label_values(&[format!("{host}:{port}").as_str()])
                    .inc();
            }
        }
        let published = app
            .update_config(|current| {
                let mut next = current.clone();
                crate::resolve::apply(&mut next, &answers).then_some(next)
            })
            .await;
        if published {
            crate::health::ensure(&app);
        }
    }
}
