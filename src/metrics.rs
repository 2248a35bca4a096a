//! Prometheus metrics: names are constants, labels are bounded (service, color, upstream address,
//! status code, failure kind, reason), and the registry belongs to the app, not a global.
//!
//! Counters and the duration histogram are updated on the request path through handles resolved
//! ahead of time; the windowed and state gauges are computed at scrape time from the snapshot.

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub const REQUESTS_TOTAL: &str = "switchyard_requests_total";
pub const UPSTREAM_FAILURES_TOTAL: &str = "switchyard_upstream_failures_total";
pub const REQUEST_DURATION_SECONDS: &str = "switchyard_request_duration_seconds";
pub const ACTIVE_COLOR: &str = "switchyard_active_color";
pub const FLIPS_TOTAL: &str = "switchyard_flips_total";
pub const WINDOW_ERROR_RATIO: &str = "switchyard_window_error_ratio";
pub const WINDOW_LATENCY_P95_SECONDS: &str = "switchyard_window_latency_p95_seconds";
pub const UPSTREAM_HEALTHY: &str = "switchyard_upstream_healthy";
pub const ROLLBACK_ARMED: &str = "switchyard_rollback_armed";
pub const STATE_GENERATION: &str = "switchyard_state_generation";
// Extensions (README "Metrics").
pub const ROLLBACK_BLOCKED: &str = "switchyard_rollback_blocked";
pub const WEBHOOK_FAILURES_TOTAL: &str = "switchyard_webhook_failures_total";
pub const UNMATCHED_REQUESTS_TOTAL: &str = "switchyard_unmatched_requests_total";
pub const WINDOW_REQUESTS: &str = "switchyard_window_requests";
pub const WINDOW_DROPPED_SAMPLES: &str = "switchyard_window_dropped_samples";
pub const STATE_DEGRADED: &str = "switchyard_state_degraded";
pub const CONFIG_RELOADS_TOTAL: &str = "switchyard_config_reloads_total";
pub const REJECTED_REQUESTS_TOTAL: &str = "switchyard_rejected_requests_total";
pub const TASK_RESTARTS_TOTAL: &str = "switchyard_task_restarts_total";
pub const LOG_LINES_DROPPED_TOTAL: &str = "switchyard_log_lines_dropped_total";
pub const RESOLVE_FAILURES_TOTAL: &str = "switchyard_resolve_failures_total";
pub const RESOLUTION_STALE: &str = "switchyard_upstream_resolution_stale";
/// The background tasks [`crate::supervise`] starts again, created at 0.
pub const SUPERVISED_TASKS: &[&str] = &[
    "health_check",
    "stats_ticker",
    "rollback_watcher",
    "analysis",
    "analysis_trigger",
    "config_watch",
    "dns_watch",
    "release_driver",
    "etcd_sync",
];
pub const CLIENT_CLOSED_REQUESTS_TOTAL: &str = "switchyard_client_closed_requests_total";
pub const TLS_HANDSHAKES_TOTAL: &str = "switchyard_tls_handshakes_total";
pub const TLS_CERTIFICATE_EXPIRY: &str = "switchyard_tls_certificate_expiry_timestamp_seconds";

/// How a TLS handshake ended, for `switchyard_tls_handshakes_total{result}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handshake {
    Ok,
    /// Refused by either side (no common version or cipher, a bad record, a closed socket).
    Error,
    /// Not finished within `header_read_timeout` (or before shutdown).
    Timeout,
}
pub const PREVIEW_REQUESTS_TOTAL: &str = "switchyard_preview_requests_total";
pub const PREVIEW_UPSTREAM_FAILURES_TOTAL: &str = "switchyard_preview_upstream_failures_total";
pub const PREVIEW_REQUEST_DURATION_SECONDS: &str = "switchyard_preview_request_duration_seconds";

/// Every `reason` of `switchyard_flips_total`.
/// A release's flips count under its own reasons (a phase, its rollback, its abort).
pub const FLIP_REASONS: [&str; 7] = [
    "manual",
    "rollback",
    "auto_rollback",
    "rollback_blocked",
    "release_phase",
    "release_rollback",
    "release_abort",
];

/// Every `result` of `switchyard_config_reloads_total`.
pub const CONFIG_RELOAD_RESULTS: [&str; 2] = ["ok", "error"];

/// Buckets for API latency: 1 ms to 10 s.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub struct Metrics {
    pub registry: Registry,
    pub requests_total: IntCounterVec,
    pub upstream_failures_total: IntCounterVec,
    pub request_duration: HistogramVec,
    pub active_color: IntGaugeVec,
    pub flips_total: IntCounterVec,
    pub window_error_ratio: GaugeVec,
    pub window_latency_p95: GaugeVec,
    pub window_requests: IntGaugeVec,
    pub window_dropped_samples: IntGaugeVec,
    pub upstream_healthy: IntGaugeVec,
    pub rollback_armed: IntGaugeVec,
    pub rollback_blocked: IntGaugeVec,
    pub state_generation: IntGaugeVec,
    pub state_degraded: IntGauge,
    pub webhook_failures_total: IntCounter,
    pub unmatched_requests_total: IntCounter,
    pub config_reloads_total: IntCounterVec,
    /// HTTP/1 requests refused for smuggling-prone framing (`http::server`), by reason.
    pub rejected_requests_total: IntCounterVec,
    /// HTTP/1 requests whose client closed its connection before the response (nginx's 499).
    pub client_closed_requests_total: IntCounter,
    /// The preview listener's share of `requests_total`, `upstream_failures_total` and
    /// `request_duration` (same labels): preview requests count in those too, these tell them
    /// apart. Their series are resolved on a pool's or upstream's first preview request.
    pub preview_requests_total: IntCounterVec,
    pub preview_upstream_failures_total: IntCounterVec,
    pub preview_request_duration: HistogramVec,
    /// `rejected_requests_total`'s series by reason, resolved at startup (see `count_rejected`).
    rejected_by_reason: Vec<(&'static str, IntCounter)>,
    /// `switchyard_tls_handshakes_total`'s series, [proxy, admin] × [ok, error, timeout],
    /// resolved at startup ([`Metrics::count_handshake`]).
    tls_handshakes: [[IntCounter; 3]; 2],
    /// The served certificate's `notAfter` (Unix seconds) by listener, set at startup and at
    /// each reload; no series for a listener without TLS (nothing to alert on).
    pub tls_certificate_expiry: IntGaugeVec,
    /// Background tasks started again after a panic, by task ([`crate::supervise`]).
    pub task_restarts_total: IntCounterVec,
    /// Log lines the stderr queue had no room for: brought up to date at each scrape.
    pub log_lines_dropped_total: IntCounter,
    /// Upstream names (README "Upstreams by name"), by `name` (`host:port`): failed lookups, and
    /// 1 while the last one failed. A name's series exist while the config has it
    /// ([`crate::resolve::publish_metrics`]).
    pub resolve_failures_total: IntCounterVec,
    pub resolution_stale: IntGaugeVec,
    /// Serializes scrapes: gauges are reset and refilled per scrape.
    pub scrape: tokio::sync::Mutex<()>,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let v = IntCounterVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable!("metric {name} definition is static and valid: {e}"));
    register(r, Box::new(v.clone()));
    v
}

fn gauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let v = IntGaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable!("metric {name} definition is static and valid: {e}"));
    register(r, Box::new(v.clone()));
    v
}

fn fgauge_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let v = GaugeVec::new(Opts::new(name, help), labels)
        .unwrap_or_else(|e| unreachable!("metric {name} definition is static and valid: {e}"));
    register(r, Box::new(v.clone()));
    v
}

fn register(r: &Registry, c: Box<dyn prometheus::core::Collector>) {
    // Names are unique constants and the registry is fresh: registration cannot collide.
    let _ = r.register(c);
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                REQUEST_DURATION_SECONDS,
                "Time from receiving a request to the upstream's response headers (or the failure).",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["service", "color"],
        )
        .unwrap_or_else(|e| unreachable!("static histogram definition: {e}"));
        register(&r, Box::new(request_duration.clone()));
        let preview_request_duration = HistogramVec::new(
            HistogramOpts::new(
                PREVIEW_REQUEST_DURATION_SECONDS,
                "The preview listener's share of switchyard_request_duration_seconds.",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["service", "color"],
        )
        .unwrap_or_else(|e| unreachable!("static histogram definition: {e}"));
        register(&r, Box::new(preview_request_duration.clone()));
        let webhook_failures_total = IntCounter::new(
            WEBHOOK_FAILURES_TOTAL,
            "Webhook deliveries that failed after every retry, or were dropped because the queue was full.",
        )
        .unwrap_or_else(|e| unreachable!("static counter definition: {e}"));
        register(&r, Box::new(webhook_failures_total.clone()));
        let log_lines_dropped_total = IntCounter::new(
            LOG_LINES_DROPPED_TOTAL,
            "Log lines dropped because stderr's reader was not keeping up (its queue was full).",
        )
        .unwrap_or_else(|e| unreachable!("static counter definition: {e}"));
        register(&r, Box::new(log_lines_dropped_total.clone()));
        let unmatched_requests_total = IntCounter::new(
            UNMATCHED_REQUESTS_TOTAL,
            "Requests that matched no service (answered 404).",
        )
        .unwrap_or_else(|e| unreachable!("static counter definition: {e}"));
        register(&r, Box::new(unmatched_requests_total.clone()));
        let state_degraded = IntGauge::new(
            STATE_DEGRADED,
            "1 while the state backend cannot be reached or written (traffic continues on the last known colors).",
        )
        .unwrap_or_else(|e| unreachable!("static gauge definition: {e}"));
        register(&r, Box::new(state_degraded.clone()));
        let rejected_requests_total = counter_vec(
            &r,
            REJECTED_REQUESTS_TOTAL,
            "HTTP/1 requests answered 400 for request-smuggling framing: a bare-LF line end (bare_lf), both Content-Length and Transfer-Encoding (cl_te), or a request body's broken chunked framing (chunked).",
            &["reason"],
        );
        let client_closed_requests_total = IntCounter::new(
            CLIENT_CLOSED_REQUESTS_TOTAL,
            "Requests cancelled by the client before the response: an HTTP/1 client that closed its connection, an h2 stream the client reset or whose connection it dropped (nginx logs these as 499); not recorded as upstream traffic.",
        )
        .unwrap_or_else(|e| unreachable!("static counter definition: {e}"));
        register(&r, Box::new(client_closed_requests_total.clone()));
        // Every series exists from the start, at 0; their handles are resolved once, here.
        let rejected_by_reason = ["bare_lf", "cl_te", "chunked"]
            .map(|reason| (reason, rejected_requests_total.with_label_values(&[reason])))
            .to_vec();
        let tls_handshakes_total = counter_vec(
            &r,
            TLS_HANDSHAKES_TOTAL,
            "TLS handshakes on a listener, by how they ended: ok, error (refused by either side), timeout (not finished within header_read_timeout).",
            &["listener", "result"],
        );
        let tls_handshakes = ["proxy", "admin"].map(|listener| {
            ["ok", "error", "timeout"]
                .map(|result| tls_handshakes_total.with_label_values(&[listener, result]))
        });
        let m = Metrics {
            tls_handshakes,
            tls_certificate_expiry: gauge_vec(
                &r,
                TLS_CERTIFICATE_EXPIRY,
                "When the certificate a TLS listener serves expires (its notAfter, Unix seconds): alert well before it, as a renewal that failed leaves the old one served.",
                &["listener"],
            ),
            requests_total: counter_vec(
                &r,
                REQUESTS_TOTAL,
                "Requests proxied, by the status code the client got.",
                &["service", "color", "upstream", "code"],
            ),
            upstream_failures_total: counter_vec(
                &r,
                UPSTREAM_FAILURES_TOTAL,
                "Requests that failed at the upstream: connect failure, timeout, reset or 5xx.",
                &["service", "color", "upstream", "kind"],
            ),
            request_duration,
            preview_requests_total: counter_vec(
                &r,
                PREVIEW_REQUESTS_TOTAL,
                "The preview listener's share of switchyard_requests_total (requests to the idle color).",
                &["service", "color", "upstream", "code"],
            ),
            preview_upstream_failures_total: counter_vec(
                &r,
                PREVIEW_UPSTREAM_FAILURES_TOTAL,
                "The preview listener's share of switchyard_upstream_failures_total.",
                &["service", "color", "upstream", "kind"],
            ),
            preview_request_duration,
            active_color: gauge_vec(
                &r,
                ACTIVE_COLOR,
                "1 for the live color of a service, 0 for the other.",
                &["service", "color"],
            ),
            flips_total: counter_vec(
                &r,
                FLIPS_TOTAL,
                "Changes of a service's live color, by reason (and blocked rollbacks).",
                &["service", "reason"],
            ),
            window_error_ratio: fgauge_vec(
                &r,
                WINDOW_ERROR_RATIO,
                "Failed / all requests over the status window (0 without traffic: see switchyard_window_requests).",
                &["service", "color"],
            ),
            window_latency_p95: fgauge_vec(
                &r,
                WINDOW_LATENCY_P95_SECONDS,
                "p95 latency over the status window (0 without traffic: see switchyard_window_requests).",
                &["service", "color"],
            ),
            window_requests: gauge_vec(
                &r,
                WINDOW_REQUESTS,
                "Requests over the status window.",
                &["service", "color"],
            ),
            window_dropped_samples: gauge_vec(
                &r,
                WINDOW_DROPPED_SAMPLES,
                "Samples the pool's statistics windows (per upstream, and critical_5xx paths) could not record: a recorder that lost the race with a slot being cleared. Counted since each window was made; normally 0.",
                &["service", "color"],
            ),
            upstream_healthy: gauge_vec(
                &r,
                UPSTREAM_HEALTHY,
                "1 while the upstream passes its health checks and is not ejected after failed requests (passive health).",
                &["service", "color", "upstream"],
            ),
            rollback_armed: gauge_vec(
                &r,
                ROLLBACK_ARMED,
                "1 while automatic rollback is armed for the service.",
                &["service"],
            ),
            rollback_blocked: gauge_vec(
                &r,
                ROLLBACK_BLOCKED,
                "1 while a due rollback is blocked because the previous pool has no healthy upstream.",
                &["service"],
            ),
            state_generation: gauge_vec(
                &r,
                STATE_GENERATION,
                "Generation of the service's live color: incremented by every change.",
                &["service"],
            ),
            task_restarts_total: counter_vec(
                &r,
                TASK_RESTARTS_TOTAL,
                "Background tasks started again after a panic (each also logged at ERROR).",
                &["task"],
            ),
            resolve_failures_total: counter_vec(
                &r,
                RESOLVE_FAILURES_TOTAL,
                "Failed or empty lookups of upstream names (the last good addresses are kept).",
                &["name"],
            ),
            resolution_stale: gauge_vec(
                &r,
                RESOLUTION_STALE,
                "1 while an upstream name's last lookup failed and its last good addresses are in use.",
                &["name"],
            ),
            config_reloads_total: counter_vec(
                &r,
                CONFIG_RELOADS_TOTAL,
                "Config reloads by result (ok, error).",
                &["result"],
            ),
            rejected_requests_total,
            rejected_by_reason,
            client_closed_requests_total,
            state_degraded,
            webhook_failures_total,
            log_lines_dropped_total,
            unmatched_requests_total,
            registry: r,
            scrape: tokio::sync::Mutex::new(()),
        };
        for result in CONFIG_RELOAD_RESULTS {
            m.config_reloads_total.with_label_values(&[result]);
        }
        for task in SUPERVISED_TASKS {
            m.task_restarts_total.with_label_values(&[task]);
        }
        m
    }

    /// Creates a service's counters whose label values are known in advance at 0, so the first
    /// event is an increase that `increase()` and `rate()` see (Prometheus's instrumentation
    /// guide: "avoid missing metrics"). The per-upstream failure kinds are created with each
    /// upstream (`Upstream::new`).
    pub fn init_service(&self, service: &str) {
        for reason in FLIP_REASONS {
            self.flips_total.with_label_values(&[service, reason]);
        }
    }

    /// One refused request in `switchyard_rejected_requests_total`: a reason known at startup
    /// increments its stored handle (no label hashing, no lock on the vec); any other reason
    /// goes through `with_label_values`.
    pub fn count_rejected(&self, reason: &str) {
        match self.rejected_by_reason.iter().find(|(r, _)| *r == reason) {
            Some((_, counter)) => counter.inc(),
            None => self
                .rejected_requests_total
                .with_label_values(&[reason])
                .inc(),
        }
    }

    /// One TLS handshake ended, on the proxy's listener or the admin's.
    pub fn count_handshake(&self, admin: bool, how: Handshake) {
        self.tls_handshakes[usize::from(admin)][how as usize].inc();
    }

    /// Text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        let families = self.registry.gather();
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod rejected_tests {
    use super::*;

    #[test]
    fn count_rejected_uses_the_stored_handles_and_still_takes_other_reasons() {
        let m = Metrics::new();
        m.count_rejected("cl_te");
        m.count_rejected("cl_te");
        m.count_rejected("bare_lf");
        m.count_rejected("something_else");
        let text = m.encode();
        assert!(
            text.contains("switchyard_rejected_requests_total{reason=\"cl_te\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("switchyard_rejected_requests_total{reason=\"bare_lf\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("switchyard_rejected_requests_total{reason=\"something_else\"} 1"),
            "{text}"
        );
    }
}
