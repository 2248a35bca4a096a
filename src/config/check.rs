//! The one-screen summary `switchyard check` prints for a valid file.

use std::fmt::Write;

use super::{
    Color, Config, ProbeCheck, ProbeCondition, ProbeTarget, ServiceConfig, StateBackend,
    TriggerKind, UpstreamEntry, VerifyCheck,
};

impl Config {
    /// A one-screen summary for `switchyard check`.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "proxy: listen {}", self.proxy.listen);
        if let Some(t) = self.proxy.tls_listen {
            let _ = writeln!(s, "       tls_listen {t}");
        }
        if let Some(p) = self.proxy.preview_listen {
            let _ = writeln!(s, "       preview_listen {p}");
        }
        let _ = writeln!(
            s,
            "admin: listen {} (token from ${})",
            self.admin.listen, self.admin.token_env
        );
        if self.admin.watch_config {
            let _ = writeln!(s, "       watch_config: reload when the file changes");
        }
        match self.state.backend {
            StateBackend::File => {
                let _ = writeln!(s, "state: file {}", self.state.path.display());
            }
            StateBackend::Etcd => {
                let _ = writeln!(
                    s,
                    "state: etcd {} prefix {}",
                    self.state.etcd_endpoints.join(","),
                    self.state.etcd_prefix
                );
            }
        }
        let _ = writeln!(s, "services: {}", self.services.len());
        for svc in &self.services {
            service_summary(&mut s, svc);
        }
        for svc in &self.services {
            for v in &svc.verify {
                let what = match v {
                    VerifyCheck::Prometheus(p) => {
                        format!("{} {} {}", p.query, p.bound.op(), p.bound.threshold())
                    }
                    VerifyCheck::Probe(p) => probe_summary(p),
                };
                let _ = writeln!(s, "  {} verify {:<10} {what}", svc.name, v.name());
            }
        }
        if let Some(url) = &self.analysis.prometheus_url {
            let _ = writeln!(
                s,
                "analysis: prometheus {url} (timeout {})",
                humantime::format_duration(self.analysis.timeout)
            );
        }
        s
    }
}

/// A service's lines: routing, pools, health and rollback.
fn service_summary(s: &mut String, svc: &ServiceConfig) {
    let hosts = if svc.hosts.is_empty() {
        "*".to_string()
    } else {
        svc.hosts.join(",")
    };
    let _ = writeln!(
        s,
        "  {} (hosts {}, path {}) active {}",
        svc.name,
        hosts,
        svc.path_prefix.as_deref().unwrap_or("/"),
        svc.active
    );
    for c in Color::ALL {
        let p = svc.pool(c);
        let ups: Vec<String> = p
            .entries
            .iter()
            .map(|e| match e {
                UpstreamEntry::Addr(a) => a.to_string(),
                UpstreamEntry::Name(n) if n.addrs.is_empty() => {
                    format!("{} (unresolved)", n.label())
                }
                UpstreamEntry::Name(n) => {
                    let a: Vec<String> = n.addrs.iter().map(|a| a.to_string()).collect();
                    format!("{} -> {}", n.label(), a.join(" "))
                }
            })
            .collect();
        let _ = writeln!(s, "    {c:<5} {} [{}]", p.protocol.as_str(), ups.join(", "));
    }
    match &svc.health {
        Some(h) => {
            let _ = writeln!(
                s,
                "    health GET {} every {} (timeout {}, down after {}, up after {})",
                h.path,
                humantime::format_duration(h.interval),
                humantime::format_duration(h.timeout),
                h.unhealthy_after,
                h.healthy_after
            );
        }
        None => {
            let _ = writeln!(s, "    health off (every upstream counts as healthy)");
        }
    }
    let r = &svc.rollback;
    if !r.enabled {
        let _ = writeln!(s, "    auto-rollback off");
        return;
    }
    let _ = writeln!(
        s,
        "    auto-rollback{} for {} after a flip, min {} requests",
        if r.dry_run { " (dry run)" } else { "" },
        humantime::format_duration(r.watch_for),
        r.min_requests
    );
    for t in &r.triggers {
        let what = trigger_summary(&t.kind);
        let _ = writeln!(
            s,
            "      {:<12} {what} for {}",
            t.kind.name(),
            humantime::format_duration(t.for_)
        );
    }
}

/// What a trigger watches, for its line.
fn trigger_summary(kind: &TriggerKind) -> String {
    match kind {
        TriggerKind::ErrorRate { above, over } => {
            format!(
                "error rate > {above} over {}",
                humantime::format_duration(*over)
            )
        }
        TriggerKind::P95Latency { above, over } => format!(
            "p95 > {} over {}",
            humantime::format_duration(*above),
            humantime::format_duration(*over)
        ),
        TriggerKind::Critical5xx { paths, above, over } => format!(
            "failures on {} > {above} over {}",
            paths.join(","),
            humantime::format_duration(*over)
        ),
        TriggerKind::Unhealthy => "live pool has no healthy upstream".to_string(),
        TriggerKind::Prometheus(p) => format!(
            "{} {} {} every {}",
            p.query,
            p.bound.op(),
            p.bound.threshold(),
            humantime::format_duration(p.interval)
        ),
        TriggerKind::Probe(p) => format!(
            "{} every {}",
            probe_summary(p),
            humantime::format_duration(p.interval)
        ),
    }
}

/// `GET /health/deps on each upstream: /database == "ok"` for the summary.
fn probe_summary(p: &ProbeCheck) -> String {
    let target = match &p.target {
        ProbeTarget::Path(path) => format!("GET {path} on each upstream"),
        ProbeTarget::Url(url) => format!("GET {url}"),
    };
    let ptr = p.json_pointer.as_deref().unwrap_or("");
    let cond = match &p.condition {
        ProbeCondition::Status => "2xx".to_string(),
        ProbeCondition::Equals(v) => format!("2xx and {ptr} == {v}"),
        ProbeCondition::Bound(b) => format!("2xx and not {ptr} {} {}", b.op(), b.threshold()),
    };
    format!("{target}: {cond}")
}
