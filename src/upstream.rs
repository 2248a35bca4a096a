//! Upstreams and pools: balancing, per-upstream counters, and the pooled HTTP client.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::uri::Authority;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec};

use crate::config::{Color, Protocol, ProxyConfig, ServiceConfig};
use crate::http::client::{hyper_client, ConnPool};
use crate::metrics::Metrics;
use crate::passive::{PassiveConfig, PassiveState};
use crate::stats::{Window, WindowBin, WindowCounter};

/// Why a request counted as an upstream failure (the `kind` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    Connect,
    Timeout,
    Reset,
    Status5xx,
}

impl FailureKind {
    pub const ALL: [FailureKind; 4] = [
        FailureKind::Connect,
        FailureKind::Timeout,
        FailureKind::Reset,
        FailureKind::Status5xx,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Connect => "connect",
            FailureKind::Timeout => "timeout",
            FailureKind::Reset => "reset",
            FailureKind::Status5xx => "5xx",
        }
    }

    fn index(self) -> usize {
        match self {
            FailureKind::Connect => 0,
            FailureKind::Timeout => 1,
            FailureKind::Reset => 2,
            FailureKind::Status5xx => 3,
        }
    }
}

/// One upstream address of one color of one service. Lives as long as it is configured: reloads
/// and flips carry the same object over, so its stats and health survive them.
pub struct Upstream {
    pub addr: SocketAddr,
    pub addr_label: String,
    pub authority: Authority,
    pub protocol: Protocol,
    healthy: AtomicBool,
    outstanding: AtomicUsize,
    /// Idle keep-alive connections (HTTP/1.1 pools).
    pub conns: Arc<ConnPool>,
    /// Windowed requests, failures and latency (rollback triggers, /api/status).
    pub window: Window,
    /// `switchyard_requests_total` per status code, resolved on first use so the request path
    /// never takes the metric family's lock afterwards.
    by_code: Box<[OnceLock<IntCounter>]>,
    requests_vec: IntCounterVec,
    labels: [String; 3],
    failures: [IntCounter; 4],
    /// The preview listener's series (`switchyard_preview_*`): resolved on this upstream's first
    /// preview request, so an upstream that never gets one has none.
    preview: OnceLock<Box<PreviewSeries>>,
    preview_requests_vec: IntCounterVec,
    preview_failures_vec: IntCounterVec,
    /// Set by [`Upstream::retire_metrics`]: a series a request still in flight resolves after
    /// that is removed again at once, not left in every scrape for good.
    retired: AtomicBool,
    /// Set once the health checker runs for this upstream.
    pub health_task: AtomicBool,
    /// Consecutive failures and ejection (see `crate::passive`).
    pub passive: PassiveState,
    /// Where the window goes when the upstream is dropped, for an upstream a later reload adds.
    bin: Arc<WindowBin>,
}

/// An upstream's `switchyard_preview_requests_total` (per status code, each resolved on first
/// use) and `switchyard_preview_upstream_failures_total` (every kind).
struct PreviewSeries {
    by_code: Box<[OnceLock<IntCounter>]>,
    failures: [IntCounter; 4],
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.bin
            .put(std::mem::replace(&mut self.window, Window::placeholder()));
    }
}

const CODE_MIN: u16 = 100;
const CODE_MAX: u16 = 599;

impl Upstream {
    /// `slots`: the window ring's size; the ring comes from `bin` when a removed upstream left
    /// one of that size.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        addr: SocketAddr,
        protocol: Protocol,
        service: &str,
        color: Color,
        slots: usize,
        metrics: &Metrics,
        proxy: &ProxyConfig,
        bin: &Arc<WindowBin>,
    ) -> Upstream {
        let addr_label = addr.to_string();
        let authority = Authority::try_from(addr_label.as_str())
            .unwrap_or_else(|_| Authority::from_static("invalid.upstream"));
        let failures = FailureKind::ALL.map(|k| {
            metrics.upstream_failures_total.with_label_values(&[
                service,
                color.as_str(),
                &addr_label,
                k.as_str(),
            ])
        });
        Upstream {
            addr,
            authority,
            protocol,
            healthy: AtomicBool::new(true),
            conns: ConnPool::new(
                addr,
                proxy.upstream_max_idle,
                proxy.connect_timeout,
                proxy.upstream_idle_timeout,
            ),
            outstanding: AtomicUsize::new(0),
            window: bin.take_or_new(slots),
            by_code: (CODE_MIN..=CODE_MAX).map(|_| OnceLock::new()).collect(),
            requests_vec: metrics.requests_total.clone(),
            preview: OnceLock::new(),
            preview_requests_vec: metrics.preview_requests_total.clone(),
            preview_failures_vec: metrics.preview_upstream_failures_total.clone(),
            retired: AtomicBool::new(false),
            labels: [
                service.to_string(),
                color.as_str().to_string(),
                addr_label.clone(),
            ],
            failures,
            addr_label,
            health_task: AtomicBool::new(false),
            passive: PassiveState::default(),
            bin: bin.clone(),
        }
    }

    /// Healthy by the active checks and not ejected by passive health.
    pub fn is_healthy(&self) -> bool {
        self.is_active_healthy() && !self.passive.ejected()
    }

    /// Healthy by the active checks alone (always, without a health section).
    pub fn is_active_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Ejected by passive health (see `crate::passive`).
    pub fn is_ejected(&self) -> bool {
        self.passive.ejected()
    }

    /// Counts a failed request toward passive ejection; logs the ejection.
    pub fn passive_failure(&self, cfg: &PassiveConfig) {
        if self.passive.failure(cfg) {
            let [service, color, _] = &self.labels;
            tracing::warn!(
                service = %service, color = %color, upstream = %self.addr,
                "upstream ejected: {} requests in a row failed; it gets no traffic for {}",
                cfg.eject_after,
                humantime::format_duration(cfg.eject_for)
            );
        }
    }

    /// Returns the previous value.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::Relaxed)
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    /// Counts the request as outstanding until the guard drops (least-outstanding balancing).
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// `switchyard_requests_total` for the status the client got.
    pub fn count_status(&self, code: u16) {
        let code = code.clamp(CODE_MIN, CODE_MAX);
        let slot = &self.by_code[(code - CODE_MIN) as usize];
        slot.get_or_init(|| self.resolve(&self.requests_vec, &code.to_string()))
            .inc();
    }

    /// This upstream's series of `vec` with `last` as its fourth label, resolved once. After
    /// [`Self::retire_metrics`] (a request in flight when a reload removed the upstream) it is
    /// removed from `vec` again: the handle still counts, in no scrape. (Checked after the
    /// resolve, as `retire_metrics` sets the flag before it removes: one of the two sees the
    /// other.)
    fn resolve(&self, vec: &IntCounterVec, last: &str) -> IntCounter {
        let [s, c, u] = &self.labels;
        let labels = [s.as_str(), c.as_str(), u.as_str(), last];
        let counter = vec.with_label_values(&labels);
        if self.retired.load(Ordering::SeqCst) {
            let _ = vec.remove_label_values(&labels);
        }
        counter
    }

    pub fn count_failure(&self, kind: FailureKind) {
        self.failures[kind.index()].inc();
    }

    fn preview_series(&self) -> &PreviewSeries {
        self.preview.get_or_init(|| {
            Box::new(PreviewSeries {
                by_code: (CODE_MIN..=CODE_MAX).map(|_| OnceLock::new()).collect(),
                failures: FailureKind::ALL
                    .map(|k| self.resolve(&self.preview_failures_vec, k.as_str())),
            })
        })
    }

    /// `switchyard_preview_requests_total` for a preview request's status (besides
    /// [`Self::count_status`]).
    pub fn count_preview_status(&self, code: u16) {
        let code = code.clamp(CODE_MIN, CODE_MAX);
        let slot = &self.preview_series().by_code[(code - CODE_MIN) as usize];
        slot.get_or_init(|| self.resolve(&self.preview_requests_vec, &code.to_string()))
            .inc();
    }

    /// `switchyard_preview_upstream_failures_total` (besides [`Self::count_failure`]).
    pub fn count_preview_failure(&self, kind: FailureKind) {
        self.preview_series().failures[kind.index()].inc();
    }

    /// [`Self::count_failure`], and for a preview request its preview series too.
    pub fn count_failure_of(&self, kind: FailureKind, live: bool) {
        self.count_failure(kind);
        if !live {
            self.count_preview_failure(kind);
        }
    }

    /// Removes this upstream's series from `switchyard_requests_total` and
    /// `switchyard_upstream_failures_total`, once a reload has removed the upstream: without
    /// it, every address ever configured stays in the registry (and in every scrape) for the
    /// life of the process.
    pub fn retire_metrics(&self, metrics: &Metrics) {
        self.retired.store(true, Ordering::SeqCst);
        let [s, c, u] = &self.labels;
        for kind in FailureKind::ALL {
            let _ = metrics.upstream_failures_total.remove_label_values(&[
                s.as_str(),
                c.as_str(),
                u.as_str(),
                kind.as_str(),
            ]);
        }
        for (code, slot) in (CODE_MIN..=CODE_MAX).zip(self.by_code.iter()) {
            if slot.get().is_some() {
                let _ = metrics.requests_total.remove_label_values(&[
                    s.as_str(),
                    c.as_str(),
                    u.as_str(),
                    &code.to_string(),
                ]);
            }
        }
        let Some(preview) = self.preview.get() else {
            return;
        };
        for kind in FailureKind::ALL {
            let _ = metrics
                .preview_upstream_failures_total
                .remove_label_values(&[s.as_str(), c.as_str(), u.as_str(), kind.as_str()]);
        }
        for (code, slot) in (CODE_MIN..=CODE_MAX).zip(preview.by_code.iter()) {
            if slot.get().is_some() {
                let _ = metrics.preview_requests_total.remove_label_values(&[
                    s.as_str(),
                    c.as_str(),
                    u.as_str(),
                    &code.to_string(),
                ]);
            }
        }
    }

    /// `(service, color, upstream)`: the labels of its series.
    pub fn labels(&self) -> &[String; 3] {
        &self.labels
    }
}

pub struct InFlight(Arc<Upstream>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One color of one service.
pub struct Pool {
    pub protocol: Protocol,
    pub upstreams: Vec<Arc<Upstream>>,
    pub critical: Vec<CriticalPaths>,
    /// `switchyard_request_duration_seconds{service,color}`, resolved once.
    pub duration: Histogram,
    /// `switchyard_requests_total{upstream="none",code="503"}`: no healthy upstream.
    pub unavailable: IntCounter,
    /// The same two for preview requests (`switchyard_preview_*`), resolved on the pool's first
    /// preview request.
    preview: OnceLock<(Histogram, IntCounter)>,
    preview_vecs: (HistogramVec, IntCounterVec),
    labels: [String; 2],
    /// `[proxy] eject_after` / `eject_for`.
    pub passive: PassiveConfig,
    /// The service generation under which this color is live, or was last live ([`NOT_LIVE`]
    /// before it first is in this process): stored before each snapshot is published
    /// ([`crate::routing::Snapshot::mark_live`]). A live request counts in the window and the
    /// critical-path counters only if it was routed under this generation, so a request begun
    /// in an earlier live period of the color never counts in a later one. One cell for every
    /// pool object of this service's color (a reload's new pool takes over its predecessor's),
    /// as requests in flight across a reload hold the old one.
    live_generation: Arc<AtomicU64>,
}

/// [`Pool::live_generation`] of a color not live yet: no request's generation.
const NOT_LIVE: u64 = u64::MAX;

impl Pool {
    pub fn new(
        svc: &ServiceConfig,
        color: Color,
        upstreams: Vec<Arc<Upstream>>,
        critical: Vec<CriticalPaths>,
        metrics: &Metrics,
    ) -> Pool {
        Pool {
            protocol: svc.pool(color).protocol,
            upstreams,
            critical,
            duration: metrics
                .request_duration
                .with_label_values(&[svc.name.as_str(), color.as_str()]),
            unavailable: metrics.requests_total.with_label_values(&[
                svc.name.as_str(),
                color.as_str(),
                "none",
                "503",
            ]),
            preview: OnceLock::new(),
            preview_vecs: (
                metrics.preview_request_duration.clone(),
                metrics.preview_requests_total.clone(),
            ),
            labels: [svc.name.clone(), color.as_str().to_string()],
            passive: PassiveConfig::default(),
            live_generation: Arc::new(AtomicU64::new(NOT_LIVE)),
        }
    }

    /// The same pool sharing `old`'s live generation (the pool of the same service and color
    /// it replaces).
    pub fn succeeding(mut self, old: Option<&Pool>) -> Pool {
        if let Some(old) = old {
            self.live_generation = old.live_generation.clone();
        }
        self
    }

    /// This color is live under `generation` from now on (before the snapshot that says so is
    /// published).
    pub fn set_live(&self, generation: u64) {
        self.live_generation.store(generation, Ordering::Release);
    }

    /// This color is idle from now on: no request routed while it was live counts in its
    /// window any more (one that ends in the second its color goes live again would land in
    /// that live period's window, which includes the flip's whole second).
    pub fn set_idle(&self) {
        self.live_generation.store(NOT_LIVE, Ordering::Release);
    }

    /// Whether a live request routed under `generation` counts in this color's window: the
    /// color is still in the live period the request was routed in. One relaxed load.
    #[inline]
    pub fn live_at(&self, generation: u64) -> bool {
        self.live_generation.load(Ordering::Relaxed) == generation
    }

    /// `switchyard_preview_request_duration_seconds{service,color}` and
    /// `switchyard_preview_requests_total{upstream="none",code="503"}`.
    fn preview(&self) -> &(Histogram, IntCounter) {
        self.preview.get_or_init(|| {
            let [s, c] = &self.labels;
            (
                self.preview_vecs
                    .0
                    .with_label_values(&[s.as_str(), c.as_str()]),
                self.preview_vecs
                    .1
                    .with_label_values(&[s.as_str(), c.as_str(), "none", "503"]),
            )
        })
    }

    /// A request's latency in the duration histogram; a preview request's in the preview one
    /// too.
    pub fn observe(&self, elapsed: Duration, live: bool) {
        let secs = elapsed.as_secs_f64();
        self.duration.observe(secs);
        if !live {
            self.preview().0.observe(secs);
        }
    }

    /// A 503 for want of a healthy upstream; a preview request's in the preview series too.
    pub fn count_unavailable(&self, live: bool) {
        self.unavailable.inc();
        if !live {
            self.preview().1.inc();
        }
    }

    /// The same pool with these passive health settings.
    pub fn with_passive(mut self, passive: PassiveConfig) -> Pool {
        self.passive = passive;
        self
    }

    pub fn healthy_count(&self) -> usize {
        self.upstreams.iter().filter(|u| u.is_healthy()).count()
    }

    /// Least outstanding requests between two random healthy upstreams (power of two choices):
    /// near-optimal balance without a shared counter every request would contend on. An
    /// upstream whose last request failed within [`crate::passive::AVOID_FOR`] loses to one
    /// whose did not, whatever their outstanding counts (a dead upstream has none: it would
    /// otherwise win every draw). With
    /// every healthy upstream ejected by passive health, the ejected ones are used (panic mode,
    /// see [`crate::passive`]).
    pub fn pick(&self) -> Option<&Arc<Upstream>> {
        let ups = &self.upstreams;
        let n = ups.len();
        match n {
            0 => None,
            // Alone, an ejected upstream is still the only one there is (panic mode).
            1 => ups.first().filter(|u| u.is_active_healthy()),
            _ => {
                let a = fastrand::usize(..n);
                let mut b = fastrand::usize(..n - 1);
                if b >= a {
                    b += 1;
                }
                let (ua, ub) = (&ups[a], &ups[b]);
                match (ua.is_healthy(), ub.is_healthy()) {
                    (true, true) => Some(if rank(ub) < rank(ua) { ub } else { ua }),
                    (true, false) => Some(ua),
                    (false, true) => Some(ub),
                    (false, false) => (1..n)
                        .map(|i| &ups[(a + i) % n])
                        .find(|u| u.is_healthy())
                        .or_else(|| {
                            (0..n)
                                .map(|i| &ups[(a + i) % n])
                                .find(|u| u.is_active_healthy())
                        }),
                }
            }
        }
    }

    /// Another upstream for a request that `tried` could not take: a healthy one not tried
    /// yet, those whose last request succeeded first, ejected ones only as a last resort.
    pub fn pick_retry(&self, tried: &[Arc<Upstream>]) -> Option<&Arc<Upstream>> {
        let n = self.upstreams.len();
        let start = fastrand::usize(..n.max(1));
        (0..n)
            .map(|i| &self.upstreams[(start + i) % n])
            .filter(|u| u.is_active_healthy() && !tried.iter().any(|t| Arc::ptr_eq(t, u)))
            .min_by_key(|u| (u.is_ejected(), rank(u)))
    }
}

/// Balancing order: upstreams without a failure in the last [`crate::passive::AVOID_FOR`]
/// first, then fewest outstanding.
fn rank(u: &Upstream) -> (bool, usize) {
    (u.passive.failing(), u.outstanding())
}

/// hyper-util's pooled clients for health and smoke probes, apart from the traffic's own
/// connections ([`ConnPool`]): one per pool protocol, so that a probe speaks what the pool
/// speaks (an h2c-only upstream, such as a gRPC server, refuses HTTP/1.1).
#[derive(Clone)]
pub struct Clients {
    /// Health checks and smoke tests of HTTP/1.1 pools.
    pub probe: Client<HttpConnector, Empty<Bytes>>,
    /// The same for `protocol = "h2"` pools: h2c with prior knowledge.
    pub probe_h2: Client<HttpConnector, Empty<Bytes>>,
}

/// The most of a health check's or smoke test's response body read before its connection is
/// dropped.
const MAX_PROBE_BODY: usize = 64 * 1024;

impl Clients {
    pub fn new(cfg: &ProxyConfig) -> Clients {
        // An upstream a reload removes is probed no more: its kept-alive probe connection closes
        // within `upstream_idle_timeout`, as the traffic's own do (30 s at most).
        let idle = cfg.upstream_idle_timeout.min(Duration::from_secs(30));
        let probe = hyper_client(cfg.connect_timeout, idle, Some(4), false);
        let probe_h2 = hyper_client(cfg.connect_timeout, idle, Some(4), true);
        Clients { probe, probe_h2 }
    }

    /// GET `path` on `up` within `timeout`, in the protocol of its pool; Ok(status) or
    /// Err(reason).
    pub async fn probe(
        &self,
        up: &Upstream,
        path: &str,
        timeout: Duration,
    ) -> Result<http::StatusCode, String> {
        let uri = http::Uri::builder()
            .scheme("http")
            .authority(up.authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| format!("bad probe URI: {e}"))?;
        let req = http::Request::builder()
            .method(http::Method::GET)
            .uri(uri)
            .header(http::header::USER_AGENT, "switchyard-probe")
            .body(Empty::new())
            .map_err(|e| format!("bad probe request: {e}"))?;
        let client = match up.protocol {
            Protocol::Http1 => &self.probe,
            Protocol::H2 => &self.probe_h2,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        match tokio::time::timeout_at(deadline, client.request(req)).await {
            Err(_) => Err(format!(
                "timed out after {}",
                humantime::format_duration(timeout)
            )),
            Ok(Err(e)) if e.is_connect() => Err("connection failed".to_string()),
            Ok(Err(e)) => Err(format!("request failed: {e}")),
            Ok(Ok(resp)) => {
                let status = resp.status();
                // The status decides. The body is read and dropped as it comes, so that the
                // connection can be reused: at most `MAX_PROBE_BODY` within what is left of
                // `timeout`; a longer or slower one (an endless stream on the health path)
                // costs its connection, never memory.
                let mut body = resp.into_body();
                let _ = tokio::time::timeout_at(deadline, async {
                    let mut read = 0;
                    while let Some(Ok(frame)) = body.frame().await {
                        read += frame.data_ref().map_or(0, Bytes::len);
                        if read > MAX_PROBE_BODY {
                            return;
                        }
                    }
                })
                .await;
                Ok(status)
            }
        }
    }
}

/// Failures on the path prefixes of one `critical_5xx` trigger, counted per color.
pub struct CriticalPaths {
    pub trigger_index: usize,
    pub paths: Vec<String>,
    pub counter: Arc<WindowCounter>,
}

impl CriticalPaths {
    /// `path` normalized as [`crate::http::path::normalized`] makes it (`/api/./payments` is
    /// `/api/payments`), as the paths are.
    pub fn matches(&self, path: &str) -> bool {
        self.paths.iter().any(|p| path.starts_with(p.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::passive::AVOID_FOR;
    use crate::routing::build_snapshot;

    fn pool(n: usize) -> Arc<Pool> {
        let ups: Vec<String> = (0..n)
            .map(|i| format!("\"127.0.0.1:{}\"", 3000 + i))
            .collect();
        let text = format!(
            "[[services]]\nname = \"api\"\nblue = {{ upstreams = [{}] }}\ngreen = {{ upstreams = [\"127.0.0.1:4000\"] }}\n[proxy]\neject_after = 3\n",
            ups.join(", ")
        );
        let cfg = crate::config::from_toml_str_with_env(&text, Some(HashMap::new()))
            .unwrap_or_else(|e| panic!("{e}"));
        let snap = build_snapshot(Arc::new(cfg), &HashMap::new(), None, &Metrics::new());
        snap.services[0].pool(Color::Blue).clone()
    }

    #[tokio::test(start_paused = true)]
    async fn balancing_never_prefers_an_upstream_that_just_failed() {
        let p = pool(2);
        let (dead, alive) = (&p.upstreams[0], &p.upstreams[1]);
        // The live one is busy, the dead one idle: without its failure the dead one would win.
        let _busy: Vec<InFlight> = (0..5).map(|_| alive.begin()).collect();
        dead.passive_failure(&p.passive);
        for _ in 0..200 {
            let picked = p.pick().map(|u| u.addr);
            assert_eq!(picked, Some(alive.addr));
        }
        // A second later it is drawn again (and may prove itself).
        tokio::time::advance(AVOID_FOR).await;
        assert!((0..200).any(|_| p.pick().map(|u| u.addr) == Some(dead.addr)));
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_upstreams_get_traffic_only_when_none_else_is_left() {
        let p = pool(3);
        for _ in 0..3 {
            p.upstreams[0].passive_failure(&p.passive);
        }
        assert!(p.upstreams[0].is_ejected() && !p.upstreams[0].is_healthy());
        assert_eq!(p.healthy_count(), 2);
        for _ in 0..200 {
            assert_ne!(p.pick().map(|u| u.addr), Some(p.upstreams[0].addr));
        }
        // Retries: never an upstream already tried, ejected ones last.
        let tried = vec![p.upstreams[1].clone()];
        for _ in 0..50 {
            assert_eq!(
                p.pick_retry(&tried).map(|u| u.addr),
                Some(p.upstreams[2].addr)
            );
        }
        let tried = vec![p.upstreams[1].clone(), p.upstreams[2].clone()];
        assert_eq!(
            p.pick_retry(&tried).map(|u| u.addr),
            Some(p.upstreams[0].addr)
        );
        // All ejected: panic mode, every upstream is drawn.
        for u in &p.upstreams[1..] {
            for _ in 0..3 {
                u.passive_failure(&p.passive);
            }
        }
        assert_eq!(p.healthy_count(), 0);
        assert!(p.pick().is_some());
        // Active checks still rule: an actively unhealthy upstream is never drawn.
        for u in &p.upstreams {
            u.set_healthy(false);
        }
        assert!(p.pick().is_none());
    }

    /// A request that ends after a reload retired its upstream's series (with a status that
    /// upstream had not answered before) leaves no series behind: it was re-created for good.
    #[test]
    fn a_status_counted_after_the_series_were_retired_leaves_none_behind() {
        let metrics = Metrics::new();
        let text = "[[services]]\nname = \"api\"\nblue = { upstreams = [\"127.0.0.1:3000\"] }\ngreen = { upstreams = [\"127.0.0.1:4000\"] }\n";
        let cfg = crate::config::from_toml_str_with_env(text, Some(HashMap::new()))
            .unwrap_or_else(|e| panic!("{e}"));
        let snap = build_snapshot(Arc::new(cfg), &HashMap::new(), None, &metrics);
        let up = snap.services[0].pool(Color::Blue).upstreams[0].clone();
        up.count_status(200);
        up.count_preview_status(200);
        assert!(metrics.encode().contains("upstream=\"127.0.0.1:3000\""));
        up.retire_metrics(&metrics);
        up.count_status(429);
        up.count_status(200);
        up.count_preview_status(503);
        up.count_failure_of(FailureKind::ALL[0], false);
        let text = metrics.encode();
        assert!(!text.contains("127.0.0.1:3000"), "{text}");
    }
}
