//! The routing snapshot: every service, both pools, the live color and its generation.
//!
//! A request loads the snapshot once (one `ArcSwap` load) and makes every decision from it, so a
//! flip (of one service or of all of them) is a single `store` and no request ever sees half of
//! one. Snapshots are immutable; the one writer, [`crate::app`], builds a new one and publishes it.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::time::Instant;

use crate::config::{
    host_pattern_matches, Color, Config, HealthConfig, ProxyConfig, ServiceConfig, TriggerKind,
};
use crate::metrics::Metrics;
pub use crate::state::ServiceState;
use crate::stats::{WindowBin, WindowCounter};
use crate::upstream::{CriticalPaths, Pool, Upstream};

pub struct Service {
    pub config: Arc<ServiceConfig>,
    pub pools: [Arc<Pool>; 2],
    pub state: ServiceState,
    /// Monotonic time of the last change of the live color (arming).
    pub flipped_at: Option<Instant>,
}

impl Service {
    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn pool(&self, color: Color) -> &Arc<Pool> {
        &self.pools[color.index()]
    }

    pub fn live(&self) -> &Arc<Pool> {
        self.pool(self.state.active)
    }

    /// Whether routing (host, path) matches this service. `host` is without port, any case.
    pub fn matches(&self, host: Option<&str>, path: &str) -> bool {
        if let Some(prefix) = &self.config.path_prefix {
            if !path.starts_with(prefix.as_str()) {
                return false;
            }
        }
        if self.config.hosts.is_empty() {
            return true;
        }
        let Some(host) = host else { return false };
        self.config.hosts.iter().any(|pattern| {
            if host.bytes().any(|b| b.is_ascii_uppercase()) {
                host_pattern_matches(pattern, &host.to_ascii_lowercase())
            } else {
                host_pattern_matches(pattern, host)
            }
        })
    }

    /// Armed: a flip happened less than `watch_for` ago, there is a previous color,
    /// auto-rollback is enabled and neither paused nor latched by an earlier rollback.
    pub fn armed(&self, now: Instant) -> bool {
        self.config.rollback.watches()
            && self.state.previous.is_some()
            && !self.state.paused
            && self.state.failed.is_none()
            && self.armed_until().is_some_and(|until| now < until)
    }

    pub fn armed_until(&self) -> Option<Instant> {
        self.flipped_at
            .map(|t| t + self.config.rollback.watch_for)
            .filter(|_| self.state.previous.is_some())
    }

    /// A copy with another live state (pools and stats shared).
    pub fn with_state(&self, state: ServiceState, flipped_at: Option<Instant>) -> Service {
        Service {
            config: self.config.clone(),
            pools: self.pools.clone(),
            state,
            flipped_at,
        }
    }
}

pub struct Snapshot {
    pub config: Arc<Config>,
    pub services: Vec<Arc<Service>>,
    /// Windows of removed upstreams, for the next reload's new ones (carried from snapshot to
    /// snapshot).
    pub windows: Arc<WindowBin>,
}

impl Snapshot {
    /// The first service (in file order) matching `host` and `path`, the path matched as the upstream will
    /// resolve it ([`crate::http::path::normalized`]).
    /// A fully qualified host (`api.example.com.`, as a browser sends what a user typed with
    /// the root's dot) names the same host (RFC 1034 3.1): matched without that dot, as nginx
    /// does.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Arc<Service>> {
        let host = host.map(|h| h.strip_suffix('.').filter(|h| !h.is_empty()).unwrap_or(h));
        let path = crate::http::path::normalized(path);
        self.services.iter().find(|s| s.matches(host, &path))
    }

    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.iter().find(|s| s.name() == name)
    }

    /// Every upstream of every pool, for the health checker and the stats ticker.
    pub fn upstreams(&self) -> impl Iterator<Item = (&Arc<Service>, Color, &Arc<Upstream>)> {
        self.services.iter().flat_map(|s| {
            Color::ALL
                .into_iter()
                .flat_map(move |c| s.pool(c).upstreams.iter().map(move |u| (s, c, u)))
        })
    }

    /// Stores each service's generation in its live pool ([`Pool::set_live`]) and marks its
    /// other pool idle: called on a snapshot just before it is published, so that a request
    /// routed by it counts in the window of its color, and one routed in an earlier live period
    /// of a color no longer counts anywhere.
    pub fn mark_live(&self) {
        for s in &self.services {
            s.live().set_live(s.state.generation);
            s.pool(s.state.active.other()).set_idle();
        }
    }

    /// A copy with some services replaced by name.
    pub fn with_services(&self, changed: &HashMap<String, Arc<Service>>) -> Snapshot {
        Snapshot {
            config: self.config.clone(),
            services: self
                .services
                .iter()
                .map(|s| changed.get(s.name()).cloned().unwrap_or_else(|| s.clone()))
                .collect(),
            windows: self.windows.clone(),
        }
    }
}

/// Builds a snapshot from a validated config, keeping the live state in `states` and reusing the
/// upstream objects (stats, health, counters) of `previous` where service, color and address are
/// unchanged, so stats outlive reloads.
pub fn build_snapshot(
    config: Arc<Config>,
    states: &HashMap<String, ServiceState>,
    previous: Option<&Snapshot>,
    metrics: &Metrics,
) -> Snapshot {
    let slots = config.window_slots();
    let windows = previous.map(|p| p.windows.clone()).unwrap_or_default();
    let mut services = Vec::with_capacity(config.services.len());
    for svc_cfg in &config.services {
        let old = previous.and_then(|p| p.service(&svc_cfg.name));
        let pools = Color::ALL.map(|color| {
            let old_pool = old.map(|o| o.pool(color));
            Arc::new(build_pool(
                svc_cfg,
                color,
                old_pool,
                slots,
                metrics,
                &config.proxy,
                &windows,
            ))
        });
        let state = states
            .get(&svc_cfg.name)
            .cloned()
            .unwrap_or_else(|| ServiceState::initial(svc_cfg.active));
        let flipped_at = match old {
            Some(o) if o.state.generation == state.generation => o.flipped_at,
            _ => state.flipped_at(),
        };
        services.push(Arc::new(Service {
            config: Arc::new(svc_cfg.clone()),
            pools,
            state,
            flipped_at,
        }));
    }
    // Windows this reload did not reuse are freed; those of the upstreams it removes come in
    // as the old snapshot is dropped, for the next reload.
    windows.trim();
    // Upstream names' series: failed lookups counted, stale set, those of removed names gone.
    crate::resolve::publish_metrics(previous.map(|p| &*p.config), &config, metrics);
    let next = Snapshot {
        config,
        services,
        windows,
    };
    if let Some(prev) = previous {
        retire_removed(prev, &next, metrics);
    }
    next
}

/// Removes the metric series of upstreams (and services) the new snapshot no longer has. An
/// upstream whose object was replaced but whose labels live on (same service, color and
/// address) keeps its series: the new object resolves the same ones.
fn retire_removed(prev: &Snapshot, next: &Snapshot, metrics: &Metrics) {
    for (_, _, up) in prev.upstreams() {
        let still = next
            .upstreams()
            .any(|(_, _, n)| Arc::ptr_eq(n, up) || n.labels() == up.labels());
        if !still {
            up.retire_metrics(metrics);
        }
    }
    for svc in &prev.services {
        if next.service(svc.name()).is_none() {
            for reason in crate::metrics::FLIP_REASONS {
                let _ = metrics
                    .flips_total
                    .remove_label_values(&[svc.name(), reason]);
            }
            for color in Color::ALL {
                let labels = [svc.name(), color.as_str()];
                let _ = metrics.request_duration.remove_label_values(&labels);
                let _ = metrics.requests_total.remove_label_values(&[
                    svc.name(),
                    color.as_str(),
                    "none",
                    "503",
                ]);
                let _ = metrics
                    .preview_request_duration
                    .remove_label_values(&labels);
                let _ = metrics.preview_requests_total.remove_label_values(&[
                    svc.name(),
                    color.as_str(),
                    "none",
                    "503",
                ]);
            }
        }
    }
}

fn build_pool(
    svc: &ServiceConfig,
    color: Color,
    old: Option<&Arc<Pool>>,
    slots: usize,
    metrics: &Metrics,
    proxy: &ProxyConfig,
    windows: &Arc<WindowBin>,
) -> Pool {
    let pc = svc.pool(color);
    let upstreams = pc
        .upstreams
        .iter()
        .map(|addr| {
            old.and_then(|p| {
                p.upstreams
                    .iter()
                    .find(|u| u.addr == *addr && u.protocol == pc.protocol)
            })
            .filter(|u| u.window.slots() >= slots)
            .cloned()
            .unwrap_or_else(|| {
                Arc::new(Upstream::new(
                    *addr,
                    pc.protocol,
                    &svc.name,
                    color,
                    slots,
                    metrics,
                    proxy,
                    windows,
                ))
            })
        })
        .collect();
    // A trigger keeps the counter of the old trigger with its paths (the same index first):
    // each old counter is handed out once, since every failure is added to each trigger's
    // counter (two triggers with the same paths sharing one would count each failure twice).
    let olds: &[CriticalPaths] = old.map_or(&[], |p| &p.critical);
    let mut taken = vec![false; olds.len()];
    let critical = svc
        .rollback
        .triggers
        .iter()
        .enumerate()
        .filter_map(|(i, t)| match &t.kind {
            TriggerKind::Critical5xx { paths, .. } => {
                let fits = |j: usize, c: &CriticalPaths| {
                    !taken[j] && &c.paths == paths && c.counter.slots() >= slots
                };
                let found = olds
                    .iter()
                    .enumerate()
                    .position(|(j, c)| fits(j, c) && c.trigger_index == i)
                    .or_else(|| olds.iter().enumerate().position(|(j, c)| fits(j, c)));
                let counter = match found {
                    Some(j) => {
                        taken[j] = true;
                        olds[j].counter.clone()
                    }
                    None => Arc::new(WindowCounter::new(slots)),
                };
                Some(CriticalPaths {
                    trigger_index: i,
                    paths: paths.clone(),
                    counter,
                })
            }
            _ => None,
        })
        .collect();
    Pool::new(svc, color, upstreams, critical, metrics)
        .with_passive(proxy.passive)
        .succeeding(old.map(|p| &**p))
}

/// The health settings of a service, looked up by the health checker on each round so reloads
/// take effect without restarting checks.
pub fn health_of<'a>(snap: &'a Snapshot, service: &str) -> Option<&'a HealthConfig> {
    snap.service(service).and_then(|s| s.config.health.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host with the root's dot (`a.`) is the host without it, in a request and in the
    /// config alike; only that one dot.
    #[test]
    fn a_fully_qualified_host_routes_as_the_host() {
        let text = "[[services]]\nname = \"a\"\nhosts = [\"a\", \"*.w.test\", \"b.\"]\n\
                    blue = { upstreams = [\"127.0.0.1:1\"] }\ngreen = { upstreams = [\"127.0.0.1:2\"] }\n\
                    [[services]]\nname = \"rest\"\n\
                    blue = { upstreams = [\"127.0.0.1:3\"] }\ngreen = { upstreams = [\"127.0.0.1:4\"] }\n";
        let cfg = Arc::new(crate::config::from_toml_str(text).unwrap_or_else(|e| panic!("{e:?}")));
        let snap = build_snapshot(cfg, &HashMap::new(), None, &Metrics::new());
        let routed = |host| snap.route(Some(host), "/").map(|s| s.name().to_string());
        for host in ["a", "a.", "x.w.test", "x.w.test.", "b", "b."] {
            assert_eq!(routed(host).as_deref(), Some("a"), "{host}");
        }
        for host in ["a..", ".", "c", "w.test."] {
            assert_eq!(routed(host).as_deref(), Some("rest"), "{host}");
        }
    }

    /// A live request counts only while its color is live under the generation it was routed
    /// under; the pool objects a reload replaces (which requests in flight still hold) agree
    /// with their successors.
    #[test]
    fn live_generations_follow_flips_across_reloads() {
        let text = "[[services]]\nname = \"api\"\nblue = { upstreams = [\"127.0.0.1:1\"] }\n\
                    green = { upstreams = [\"127.0.0.1:2\"] }\n";
        let cfg =
            || Arc::new(crate::config::from_toml_str(text).unwrap_or_else(|e| panic!("{e:?}")));
        let metrics = Metrics::new();
        let first = build_snapshot(cfg(), &HashMap::new(), None, &metrics);
        first.mark_live();
        let (blue0, green0) = {
            let s = &first.services[0];
            (s.pool(Color::Blue).clone(), s.pool(Color::Green).clone())
        };
        // At start blue is live at generation 0; green never was.
        assert!(blue0.live_at(0));
        assert!(!green0.live_at(0));
        let state = |active, generation| ServiceState {
            generation,
            ..ServiceState::initial(active)
        };
        // A reload: new pool objects, the same live generations.
        let states = HashMap::from([("api".to_string(), state(Color::Blue, 0))]);
        let reloaded = build_snapshot(cfg(), &states, Some(&first), &metrics);
        reloaded.mark_live();
        let green1 = reloaded.services[0].pool(Color::Green).clone();
        assert!(!Arc::ptr_eq(&green0, &green1));
        // Flipped to green (1), to blue (2), to green again (3).
        let mut snap = reloaded;
        for (active, generation) in [(Color::Green, 1), (Color::Blue, 2), (Color::Green, 3)] {
            let svc = snap.services[0].with_state(state(active, generation), None);
            let changed = HashMap::from([("api".to_string(), Arc::new(svc))]);
            snap = snap.with_services(&changed);
            snap.mark_live();
            if generation == 1 {
                assert!(green0.live_at(1) && green1.live_at(1));
                assert!(!blue0.live_at(0), "an idle color counts no request");
            }
            if generation == 2 {
                // Green idle: a request of its live period ending now (in the second of a
                // flip back, say) counts nowhere.
                assert!(!green0.live_at(1) && !green1.live_at(1));
            }
        }
        // A request routed to green at generation 1 no longer counts, by either pool object.
        assert!(!green0.live_at(1) && !green1.live_at(1));
        assert!(green0.live_at(3) && green1.live_at(3));
        assert!(!blue0.live_at(2) && !blue0.live_at(3));
    }

    /// Two `critical_5xx` triggers on the same paths keep a counter each across a reload (the
    /// same index's first): they shared the first one's, and each failure then counted twice.
    #[test]
    fn critical_path_counters_are_handed_out_once_across_reloads() {
        let text = "[[services]]\nname = \"api\"\nblue = { upstreams = [\"127.0.0.1:1\"] }\n\
                    green = { upstreams = [\"127.0.0.1:2\"] }\n\
                    [services.rollback]\n\
                    [[services.rollback.triggers]]\nkind = \"critical_5xx\"\npaths = [\"/pay\"]\nabove = 2\n\
                    [[services.rollback.triggers]]\nkind = \"critical_5xx\"\npaths = [\"/pay\"]\nabove = 5\nover = \"5m\"\n";
        let cfg =
            || Arc::new(crate::config::from_toml_str(text).unwrap_or_else(|e| panic!("{e:?}")));
        let metrics = Metrics::new();
        let first = build_snapshot(cfg(), &HashMap::new(), None, &metrics);
        let reloaded = build_snapshot(cfg(), &HashMap::new(), Some(&first), &metrics);
        let (old, new) = (
            &first.services[0].pool(Color::Green).critical,
            &reloaded.services[0].pool(Color::Green).critical,
        );
        assert_eq!(new.len(), 2);
        assert!(!Arc::ptr_eq(&new[0].counter, &new[1].counter));
        for i in 0..2 {
            assert_eq!(new[i].trigger_index, i);
            assert!(Arc::ptr_eq(&new[i].counter, &old[i].counter), "trigger {i}");
        }
    }
}
