//! One `[[services]]` entry: its routing keys, pools, health checks and rollback settings.

use std::net::SocketAddr;
use std::time::Duration;

use super::trigger;
use super::Check;
use crate::config::raw::{RawHealth, RawPool, RawRollback, RawService};
use crate::config::{
    Color, HealthConfig, PoolConfig, Protocol, RollbackConfig, ServiceConfig, TriggerKind,
    UpstreamEntry, UpstreamName, VerifyCheck,
};

/// `services[i]`: None when a pool is missing (reported).
pub(super) fn service(c: &mut Check, key: &str, rs: RawService) -> Option<ServiceConfig> {
    let name = match rs.name {
        Some(n) if valid_name(&n) => n,
        Some(n) => {
            c.err(
                format!("{key}.name"),
                format!("invalid name {n:?} (use 1-64 of a-z, 0-9, '-', '_')"),
            );
            n
        }
        None => {
            c.err(format!("{key}.name"), "required");
            String::new()
        }
    };
    let mut hosts = Vec::new();
    for (i, h) in rs.hosts.unwrap_or_default().into_iter().enumerate() {
        let mut lower = h.to_ascii_lowercase();
        // The root's dot names the same host: requests are routed without it.
        if lower.len() > 1 && lower.ends_with('.') {
            lower.pop();
        }
        let bare = lower.strip_prefix("*.").unwrap_or(&lower);
        // No empty label (`a..b`, `.a`): no request's Host could name it.
        if bare.is_empty()
            || bare.split('.').any(str::is_empty)
            || bare.contains(['/', ':', ' ', '*'])
            || !bare
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '.' || ch == '-' || ch == '_')
        {
            let ipv6 = h.starts_with('[') || h.matches(':').count() > 1;
            let hint = if ipv6 {
                "; an IPv6 literal is not routed on by host: route such requests by path_prefix or with a catch-all service"
            } else {
                ""
            };
            c.err(
                format!("{key}.hosts[{i}]"),
                format!(
                    "invalid host {h:?} (a host name without port, optionally \"*.\" first{hint})"
                ),
            );
        }
        hosts.push(lower);
    }
    if let Some(pp) = &rs.path_prefix {
        if !pp.starts_with('/') {
            c.err(
                format!("{key}.path_prefix"),
                format!("invalid path prefix {pp:?} (must start with '/')"),
            );
        }
    }
    let active = match rs.active.as_deref() {
        None => Color::Blue,
        Some(a) => a.parse::<Color>().unwrap_or_else(|m| {
            c.err(format!("{key}.active"), m);
            Color::Blue
        }),
    };
    let blue = pool(c, &format!("{key}.blue"), rs.blue);
    let green = pool(c, &format!("{key}.green"), rs.green);
    let smoke_paths = rs.smoke_paths.unwrap_or_default();
    for (i, sp) in smoke_paths.iter().enumerate() {
        if !sp.starts_with('/') {
            c.err(
                format!("{key}.smoke_paths[{i}]"),
                format!("invalid path {sp:?} (must start with '/')"),
            );
        }
    }
    let health = rs.health.map(|h| health(c, &format!("{key}.health"), h));
    let rollback = match rs.rollback {
        None => RollbackConfig::default(),
        Some(r) => rollback(c, &format!("{key}.rollback"), r),
    };
    let mut verify = Vec::new();
    for (i, v) in rs.verify.into_iter().enumerate() {
        let key = format!("{key}.verify[{i}]");
        if let Some(v) = trigger::verify(c, &key, v) {
            if matches!(v, VerifyCheck::Prometheus(_)) {
                c.prometheus_keys.push(key);
            }
            verify.push(v);
        }
    }
    Some(ServiceConfig {
        name,
        hosts,
        // Matched against the request's path in its normalized form: the prefix in it too
        // (`/a/./b` is `/a/b`, `%2f` is `%2F`), or it could never match what it names.
        path_prefix: rs
            .path_prefix
            .map(|p| crate::http::path::normalized_prefix(&p)),
        active,
        blue: blue?,
        green: green?,
        smoke_paths,
        health,
        rollback,
        verify,
    })
}

/// `services[i].health`.
fn health(c: &mut Check, hk: &str, h: RawHealth) -> HealthConfig {
    let path = h.path.unwrap_or_else(|| "/health".to_string());
    if !path.starts_with('/') {
        c.err(
            format!("{hk}.path"),
            format!("invalid path {path:?} (must start with '/')"),
        );
    }
    let interval = c.duration(
        &format!("{hk}.interval"),
        h.interval.as_deref(),
        Duration::from_secs(2),
    );
    let timeout = c.duration(
        &format!("{hk}.timeout"),
        h.timeout.as_deref(),
        Duration::from_secs(1),
    );
    if interval < Duration::from_millis(10) {
        c.err(format!("{hk}.interval"), "must be at least 10ms");
    }
    if timeout.is_zero() {
        c.err(format!("{hk}.timeout"), "must be greater than zero");
    }
    HealthConfig {
        path,
        interval,
        timeout,
        unhealthy_after: c.count(
            &format!("{hk}.unhealthy_after"),
            h.unhealthy_after,
            3,
            1,
            1000,
        ) as u32,
        healthy_after: c.count(&format!("{hk}.healthy_after"), h.healthy_after, 2, 1, 1000) as u32,
    }
}

/// A service name: 1-64 of `a-z`, `0-9`, `-`, `_` (what `ctl` accepts as SERVICE too).
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-' || ch == '_')
}

/// `name:port` with a DNS name (letters, digits, `-`, `_`, dots; a fully qualified name may end
/// with a dot, `api.ns.svc.cluster.local.`, as Kubernetes writes them) and a port 0..=65535
/// (port 0 is refused by the caller, with its own message). The name is kept as written, its
/// trailing dot included: the resolver takes it as absolute (no search domains).
fn host_and_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let labels = host.strip_suffix('.').unwrap_or(host);
    let labels_ok = labels.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    let numeric = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    (labels.len() <= 253 && labels_ok && !numeric).then_some((host, port))
}

/// A name as the DNS compares it: without its root dot, case folded.
fn same_name(a: &str, b: &str) -> bool {
    a.strip_suffix('.')
        .unwrap_or(a)
        .eq_ignore_ascii_case(b.strip_suffix('.').unwrap_or(b))
}

/// `services[i].blue` or `.green`.
fn pool(c: &mut Check, key: &str, rp: Option<RawPool>) -> Option<PoolConfig> {
    let Some(rp) = rp else {
        c.err(key, "required (a pool: { upstreams = [\"IP:port\", ...] })");
        return None;
    };
    let protocol = match rp.protocol.as_deref().unwrap_or("http1") {
        "http1" => Protocol::Http1,
        "h2" => Protocol::H2,
        other => {
            c.err(
                format!("{key}.protocol"),
                format!("invalid protocol {other:?} (expected \"http1\" or \"h2\")"),
            );
            Protocol::Http1
        }
    };
    let raw = rp.upstreams.unwrap_or_default();
    if raw.is_empty() {
        c.err(
            format!("{key}.upstreams"),
            "a pool needs at least one upstream",
        );
    }
    let mut entries: Vec<UpstreamEntry> = Vec::new();
    for (i, u) in raw.iter().enumerate() {
        let k = format!("{key}.upstreams[{i}]");
        let entry = if let Ok(a) = u.parse::<SocketAddr>() {
            UpstreamEntry::Addr(a)
        } else if let Some((host, port)) = host_and_port(u) {
            UpstreamEntry::Name(UpstreamName {
                key: k.clone(),
                host: host.to_ascii_lowercase(),
                port,
                addrs: Vec::new(),
                error: None,
            })
        } else {
            c.err(
                &k,
                format!(
                    "invalid address {u:?} (expected IP:port or name:port, e.g. \"127.0.0.1:3001\" or \"api-blue:3000\")"
                ),
            );
            continue;
        };
        // Nothing can be connected to on port 0 (the system would pick a port to listen on).
        let port = match &entry {
            UpstreamEntry::Addr(a) => a.port(),
            UpstreamEntry::Name(n) => n.port,
        };
        if port == 0 {
            c.err(
                &k,
                format!("invalid address {u:?}: port 0 (an upstream needs a port 1..=65535)"),
            );
            continue;
        }
        let dup = entries.iter().any(|e| match (e, &entry) {
            (UpstreamEntry::Addr(a), UpstreamEntry::Addr(b)) => a == b,
            (UpstreamEntry::Name(a), UpstreamEntry::Name(b)) => {
                same_name(&a.host, &b.host) && a.port == b.port
            }
            _ => false,
        });
        if dup {
            c.err(k, format!("duplicate upstream {u:?}"));
        } else {
            entries.push(entry);
        }
    }
    let mut pool = PoolConfig {
        upstreams: Vec::new(),
        protocol,
        entries,
    };
    pool.refresh();
    Some(pool)
}

/// `services[i].rollback`.
fn rollback(c: &mut Check, key: &str, r: RawRollback) -> RollbackConfig {
    let d = RollbackConfig::default();
    let watch_for = c.duration(
        &format!("{key}.watch_for"),
        r.watch_for.as_deref(),
        d.watch_for,
    );
    let min_requests = c.count(
        &format!("{key}.min_requests"),
        r.min_requests,
        d.min_requests,
        0,
        u64::MAX >> 1,
    );
    let mut triggers = Vec::new();
    for (i, t) in r.triggers.into_iter().enumerate() {
        let key = format!("{key}.triggers[{i}]");
        if let Some(t) = trigger::trigger(c, &key, t) {
            if matches!(t.kind, TriggerKind::Prometheus(_)) {
                c.prometheus_keys.push(key);
            }
            triggers.push(t);
        }
    }
    RollbackConfig {
        enabled: r.enabled.unwrap_or(true),
        watch_for,
        min_requests,
        dry_run: r.dry_run.unwrap_or(false),
        triggers,
    }
}
