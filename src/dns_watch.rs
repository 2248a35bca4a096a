//! The loop that keeps upstream names resolved while running: every `[proxy] resolve_interval`
//! it looks every name up again ([`crate::resolve`]) and publishes a new snapshot through the
//! app's writer when an answer changed. (The resolver itself sits below the app, which also
//! uses it at reload.)
//!
//! Its metrics are the app's ([`crate::metrics::Metrics`]): a published config sets them as the
//! snapshot is built ([`crate::resolve::publish_metrics`]); the loop counts the failed lookups
//! it does not publish. So it keeps no state, and a restarted loop ([`crate::supervise`]) loses
//! nothing.

use std::sync::Arc;

use crate::app::App;

/// Re-resolves every `resolve_interval` and publishes a new snapshot when an answer changes.
pub async fn run(app: Arc<App>) {
    loop {
        let interval = app.snapshot().config.proxy.resolve_interval;
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = app.shutdown.cancelled() => return,
        }
        let config = app.snapshot().config.clone();
        if !crate::resolve::has_names(&config) {
            continue;
        }
        let answers = crate::resolve::lookup_all(&config).await;
        let metrics = &app.metrics;
        // Under the writer: a reload published meanwhile has looked its names up itself (and
        // counted them), so these answers are not applied to it; their failures still count.
        let published = app
            .update_config(|current| {
                if std::ptr::eq(current, Arc::as_ptr(&config)) {
                    let mut next = current.clone();
                    if crate::resolve::apply(&mut next, &answers) {
                        return Some(next);
                    }
                }
                crate::resolve::count_failures(current, &answers, metrics);
                None
            })
            .await;
        if published {
            crate::health::ensure(&app);
        }
    }
}
