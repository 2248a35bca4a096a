//! Validation: one function per section of the file, each reporting every problem it finds at
//! its key and going on with a default, so that one run reports them all.

mod service;
mod trigger;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use service::valid_name as valid_service_name;
#[cfg(test)]
pub use trigger::{placeholder_errors, QUERY_PLACEHOLDERS};

use super::raw::{
    RawAdmin, RawAnalysis, RawConfig, RawLog, RawNotify, RawProxy, RawService, RawState,
};
use super::{
    parse_duration, AccessFormat, AccessTarget, AdminConfig, AnalysisConfig, Config, ConfigError,
    LogConfig, NotifyConfig, PassiveConfig, ProxyConfig, RuntimeFlavor, ServiceConfig,
    StateBackend, StateConfig,
};

/// Collects errors with their key paths while validating.
struct Check {
    errors: Vec<ConfigError>,
    /// The keys of the `prometheus` triggers and verify checks that passed their own checks, as
    /// the file numbers them (`services[i].rollback.triggers[j]`, `services[i].verify[j]`).
    prometheus_keys: Vec<String>,
}

impl Check {
    fn err(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            key: key.into(),
            message: message.into(),
        });
    }

    fn duration(&mut self, key: &str, v: Option<&str>, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match parse_duration(s) {
                Ok(d) => d,
                Err(m) => {
                    self.err(key, m);
                    default
                }
            },
        }
    }

    fn addr(&mut self, key: &str, v: &str) -> Option<SocketAddr> {
        match v.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    key,
                    format!("invalid address {v:?} (expected IP:port, e.g. \"127.0.0.1:3001\")"),
                );
                None
            }
        }
    }

    fn count(&mut self, key: &str, v: Option<i64>, default: u64, min: u64, max: u64) -> u64 {
        match v {
            None => default,
            Some(n) if n >= min as i64 && (n as u64) <= max => n as u64,
            Some(n) => {
                self.err(key, format!("{n} is out of range ({min}..={max})"));
                default
            }
        }
    }

    /// Reports a zero duration at `key`.
    fn positive(&mut self, key: &str, d: Duration) {
        if d.is_zero() {
            self.err(key, "must be greater than zero");
        }
    }
}

/// Validates the whole file: every section, then what spans sections.
/// The config with every value that passed its checks (a default in place of each that did
/// not), and every problem found.
pub(super) fn validate_all(raw: RawConfig) -> (Config, Vec<ConfigError>) {
    let mut c = Check {
        errors: Vec::new(),
        prometheus_keys: Vec::new(),
    };
    let mut proxy = proxy(&mut c, &raw.proxy);
    let admin = admin(&mut c, &raw.admin);
    distinct_listeners(&mut c, &proxy, &admin);
    let state = state(&mut c, &raw.state);
    proxy.upgrade_socket = upgrade_socket(&mut c, raw.proxy.upgrade_socket.as_deref(), &state);
    let log = log(&mut c, &raw.log);
    let notify = notify(&mut c, &raw.notify);
    let analysis = analysis(&mut c, &raw.analysis);
    let services = services(&mut c, raw.services, &analysis);
    let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
    c.errors
        .extend(super::plan::check_named(&raw.release_plans, &names));
    let config = Config {
        proxy,
        admin,
        state,
        notify,
        analysis,
        log,
        services,
        release_plans: raw.release_plans,
    };
    (config, c.errors)
}

/// `[proxy]`; `upgrade_socket` is set by [`upgrade_socket`] once the state path is known.
fn proxy(c: &mut Check, p: &RawProxy) -> ProxyConfig {
    let secs = |c: &mut Check, name: &str, v: &Option<String>, default: u64| {
        let key = format!("proxy.{name}");
        c.duration(&key, v.as_deref(), Duration::from_secs(default))
    };
    let listen = c
        .addr(
            "proxy.listen",
            p.listen.as_deref().unwrap_or("0.0.0.0:8080"),
        )
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080)));
    let tls_listen = p
        .tls_listen
        .as_deref()
        .and_then(|v| c.addr("proxy.tls_listen", v));
    if p.tls_listen.is_some() {
        for (key, v) in [
            ("proxy.tls_cert", &p.tls_cert),
            ("proxy.tls_key", &p.tls_key),
        ] {
            if v.is_none() {
                c.err(key, "required when proxy.tls_listen is set");
            }
        }
    } else {
        // A certificate with no listener to serve it: no HTTPS would start, silently.
        for (key, v) in [
            ("proxy.tls_cert", &p.tls_cert),
            ("proxy.tls_key", &p.tls_key),
        ] {
            if v.is_some() {
                c.err(
                    key,
                    "set, but proxy.tls_listen is not: no HTTPS listener would start (set proxy.tls_listen, or remove this key)",
                );
            }
        }
    }
    let preview_listen = p
        .preview_listen
        .as_deref()
        .and_then(|v| c.addr("proxy.preview_listen", v));
    let connect_timeout = secs(c, "connect_timeout", &p.connect_timeout, 2);
    let request_timeout = secs(c, "request_timeout", &p.request_timeout, 30);
    let shutdown_grace = secs(c, "shutdown_grace", &p.shutdown_grace, 30);
    c.positive("proxy.connect_timeout", connect_timeout);
    c.positive("proxy.request_timeout", request_timeout);
    let workers = p
        .workers
        .map(|_| c.count("proxy.workers", p.workers, 1, 1, 1024) as usize);
    let runtime = runtime(c, p.runtime.as_deref());
    let header_read_timeout = secs(c, "header_read_timeout", &p.header_read_timeout, 10);
    c.positive("proxy.header_read_timeout", header_read_timeout);
    let body_idle_timeout = secs(c, "body_idle_timeout", &p.body_idle_timeout, 60);
    let upstream_idle_timeout = secs(c, "upstream_idle_timeout", &p.upstream_idle_timeout, 60);
    let passive = passive(c, p);
    let resolve_interval = secs(c, "resolve_interval", &p.resolve_interval, 5);
    if resolve_interval < Duration::from_millis(100) {
        c.err("proxy.resolve_interval", "must be at least 100ms");
    }
    let [max_connections, max_headers, max_header_bytes, upstream_max_idle, h2_streams, retries] =
        proxy_limits(c, p);
    let client_send_timeout = secs(c, "client_send_timeout", &p.client_send_timeout, 60);
    let upstream_send_timeout = secs(c, "upstream_send_timeout", &p.upstream_send_timeout, 60);
    let h2_idle_timeout = secs(c, "h2_idle_timeout", &p.h2_idle_timeout, 60);
    let tunnel_idle_timeout = secs(c, "tunnel_idle_timeout", &p.tunnel_idle_timeout, 300);
    c.positive("proxy.client_send_timeout", client_send_timeout);
    c.positive("proxy.upstream_send_timeout", upstream_send_timeout);
    c.positive("proxy.h2_idle_timeout", h2_idle_timeout);
    let upgrade_timeout = secs(c, "upgrade_timeout", &p.upgrade_timeout, 120);
    c.positive("proxy.upgrade_timeout", upgrade_timeout);
    ProxyConfig {
        listen,
        tls_listen,
        tls_cert: p.tls_cert.as_ref().map(PathBuf::from),
        tls_key: p.tls_key.as_ref().map(PathBuf::from),
        connect_timeout,
        request_timeout,
        shutdown_grace,
        workers,
        runtime,
        runtime_set: p.runtime.is_some(),
        preview_listen,
        header_read_timeout,
        body_idle_timeout,
        max_connections: max_connections as usize,
        max_headers: max_headers as usize,
        max_header_bytes: max_header_bytes as usize,
        upstream_idle_timeout,
        upstream_max_idle: upstream_max_idle as usize,
        h2_max_concurrent_streams: h2_streams as u32,
        client_send_timeout,
        upstream_send_timeout,
        h2_idle_timeout,
        tunnel_idle_timeout,
        via: p.via.unwrap_or(true),
        retries: retries as u32,
        passive,
        resolve_interval,
        resolve_hosts_file: p.resolve_hosts_file.as_ref().map(PathBuf::from),
        upgrade_socket: PathBuf::new(),
        upgrade_timeout,
    }
}

/// The counts of `[proxy]`: `max_connections`, `max_headers`, `max_header_bytes`,
/// `upstream_max_idle`, `h2_max_concurrent_streams` and `retries`, in that order.
fn proxy_limits(c: &mut Check, p: &RawProxy) -> [u64; 6] {
    // (key, value, default, min, max)
    let limits = [
        ("max_connections", p.max_connections, 10_000, 1, 10_000_000),
        ("max_headers", p.max_headers, 100, 1, 10_000),
        (
            "max_header_bytes",
            p.max_header_bytes,
            64 * 1024,
            1024,
            16 << 20,
        ),
        ("upstream_max_idle", p.upstream_max_idle, 256, 0, 65_536),
        (
            "h2_max_concurrent_streams",
            p.h2_max_concurrent_streams,
            256,
            1,
            1_000_000,
        ),
        ("retries", p.retries, 2, 0, 10),
    ];
    limits
        .map(|(name, v, default, min, max)| c.count(&format!("proxy.{name}"), v, default, min, max))
}

/// `proxy.runtime`: `per_worker` unless the config says otherwise (BENCHMARKS.md "Scaling run").
fn runtime(c: &mut Check, v: Option<&str>) -> RuntimeFlavor {
    match v.unwrap_or("per_worker") {
        "shared" => RuntimeFlavor::Shared,
        "per_worker" => RuntimeFlavor::PerWorker,
        other => {
            c.err(
                "proxy.runtime",
                format!("invalid runtime {other:?} (expected \"shared\" or \"per_worker\")"),
            );
            RuntimeFlavor::PerWorker
        }
    }
}

/// `proxy.eject_after` and `proxy.eject_for`.
fn passive(c: &mut Check, p: &RawProxy) -> PassiveConfig {
    let default = PassiveConfig::default();
    let eject_for = c.duration("proxy.eject_for", p.eject_for.as_deref(), default.eject_for);
    c.positive("proxy.eject_for", eject_for);
    let eject_after = c.count(
        "proxy.eject_after",
        p.eject_after,
        default.eject_after.into(),
        0,
        1000,
    ) as u32;
    PassiveConfig {
        eject_after,
        eject_for,
    }
}

/// The files kept beside the state file (`state.path`), each with what it holds: the lock
/// (`crate::upgrade::lock_path`), the running release, the audit log.
pub(crate) fn state_files(path: &std::path::Path) -> [(PathBuf, &'static str); 3] {
    [
        (path.with_extension("lock"), "the state file's lock"),
        (path.with_extension("release.json"), "the release file"),
        (path.with_extension("events.jsonl"), "the audit log"),
    ]
}

/// What `p` is when it names the state file (`state`) or a file kept beside it
/// ([`state_files`]), or None. A path another key names (the upgrade socket, the access log)
/// must be none of them: each is rewritten or replaced by its owner.
pub(crate) fn state_file_at(state: &Path, p: &Path) -> Option<&'static str> {
    std::iter::once((state.to_path_buf(), "the state file (state.path)"))
        .chain(state_files(state))
        .find(|(f, _)| same_path(f, p))
        .map(|(_, what)| what)
}

/// Whether `a` and `b` name one file: as written, made absolute (`./s.json`, `s.json`), or, when
/// both exist, the same file (through a symlink, a hard link).
pub(crate) fn same_path(a: &Path, b: &Path) -> bool {
    a == b
        || matches!((std::path::absolute(a), std::path::absolute(b)), (Ok(x), Ok(y)) if x == y)
        || same_file(a, b)
}

/// Whether `a` and `b` both exist and are one file (device and inode, through symlinks).
pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// `proxy.upgrade_socket`: next to the state file unless given; never the state file or a
/// file kept beside it (binding the socket would need that file gone).
fn upgrade_socket(c: &mut Check, v: Option<&str>, state: &StateConfig) -> PathBuf {
    match v {
        Some("") => {
            c.err("proxy.upgrade_socket", "must be a path");
            PathBuf::new()
        }
        Some(p) => {
            let path = PathBuf::from(p);
            if let Some(what) = state_file_at(&state.path, &path) {
                c.err(
                    "proxy.upgrade_socket",
                    format!("{p:?} is {what}; the upgrade socket needs a path of its own"),
                );
            }
            path
        }
        None => state.path.with_extension("upgrade.sock"),
    }
}

/// `[admin]`.
fn admin(c: &mut Check, a: &RawAdmin) -> AdminConfig {
    let listen = c
        .addr(
            "admin.listen",
            a.listen.as_deref().unwrap_or("127.0.0.1:9090"),
        )
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9090)));
    let token_env = a
        .token_env
        .clone()
        .unwrap_or_else(|| "SWITCHYARD_ADMIN_TOKEN".to_string());
    if token_env.is_empty() {
        c.err("admin.token_env", "must name an environment variable");
    }
    if a.tls_cert.is_some() != a.tls_key.is_some() {
        c.err(
            "admin.tls_cert",
            "admin.tls_cert and admin.tls_key must be set together",
        );
    }
    for (i, h) in a.allowed_hosts.iter().flatten().enumerate() {
        if let Some(why) = allowed_host_problem(h) {
            c.err(
                format!("admin.allowed_hosts[{i}]"),
                format!(
                    "{h:?} {why}; an entry is a bare host name (or IP literal) compared with the Host header's name, its port ignored, e.g. \"admin.example.com\""
                ),
            );
        }
    }
    let admin = AdminConfig {
        listen,
        token_env,
        allowed_hosts: a
            .allowed_hosts
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        tls_cert: a.tls_cert.as_ref().map(PathBuf::from),
        tls_key: a.tls_key.as_ref().map(PathBuf::from),
        max_connections: c.count("admin.max_connections", a.max_connections, 128, 1, 100_000)
            as usize,
        header_read_timeout: c.duration(
            "admin.header_read_timeout",
            a.header_read_timeout.as_deref(),
            Duration::from_secs(10),
        ),
        idle_timeout: c.duration(
            "admin.idle_timeout",
            a.idle_timeout.as_deref(),
            Duration::from_secs(60),
        ),
        watch_config: a.watch_config.unwrap_or(false),
    };
    c.positive("admin.header_read_timeout", admin.header_read_timeout);
    c.positive("admin.idle_timeout", admin.idle_timeout);
    admin
}

/// What keeps `h` from ever matching as an `admin.allowed_hosts` entry, or None: the entry is
/// compared with the Host header's name alone (no port), exactly, case-insensitively.
fn allowed_host_problem(h: &str) -> Option<&'static str> {
    let bare = h
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(h);
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    if h.is_empty() {
        Some("is empty")
    } else if h.contains("://") {
        Some("has a scheme")
    } else if h.contains('*') {
        Some("is a wildcard, which is not matched (list each name)")
    } else if h.contains('/') {
        Some("has a path")
    } else if h.contains(':') {
        Some("has a port")
    } else if !h
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        Some("is not a host name (letters, digits, '.', '-', '_')")
    } else {
        None
    }
}

/// No two listeners that cannot both bind (port 0 excepted: the system picks): one port and
/// one address, or a wildcard address (`0.0.0.0`, `[::]`) that takes the other's. The sockets
/// are bound without `IPV6_V6ONLY`, so `[::]` is dual-stack (Linux's default,
/// `net.ipv6.bindv6only = 0`) and takes the port on every IPv4 address too.
fn distinct_listeners(c: &mut Check, proxy: &ProxyConfig, admin: &AdminConfig) {
    let listeners = [
        ("proxy.listen", Some(proxy.listen)),
        ("proxy.tls_listen", proxy.tls_listen),
        ("proxy.preview_listen", proxy.preview_listen),
        ("admin.listen", Some(admin.listen)),
    ];
    let mut seen: Vec<(&str, SocketAddr)> = Vec::new();
    for (k, addr) in listeners {
        if let Some(addr) = addr {
            if let Some((other, at)) = seen.iter().find(|(_, s)| listeners_overlap(*s, addr)) {
                let why = if at.ip().to_canonical() == addr.ip().to_canonical() {
                    String::new()
                } else {
                    " (a wildcard address takes the port on every address of its family, and [::] on IPv4 too: dual-stack)".to_string()
                };
                c.err(
                    k,
                    format!("{addr} is already used by another listener: {other} = {at}{why}"),
                );
            }
            seen.push((k, addr));
        }
    }
}

/// Whether sockets bound to `a` and `b` (without `IPV6_V6ONLY`) would clash.
pub(super) fn listeners_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() != b.port() || a.port() == 0 {
        return false;
    }
    let (x, y) = (a.ip().to_canonical(), b.ip().to_canonical());
    let v6_any = |ip: std::net::IpAddr| ip.is_ipv6() && ip.is_unspecified();
    x == y
        || (x.is_ipv4() == y.is_ipv4() && (x.is_unspecified() || y.is_unspecified()))
        || v6_any(x)
        || v6_any(y)
}

/// `[state]`.
fn state(c: &mut Check, s: &RawState) -> StateConfig {
    let backend = match s.backend.as_deref().unwrap_or("file") {
        "file" => StateBackend::File,
        "etcd" => StateBackend::Etcd,
        other => {
            c.err(
                "state.backend",
                format!("invalid backend {other:?} (expected \"file\" or \"etcd\")"),
            );
            StateBackend::File
        }
    };
    let etcd_endpoints = s.etcd_endpoints.clone().unwrap_or_default();
    if backend == StateBackend::Etcd && etcd_endpoints.is_empty() {
        c.err(
            "state.etcd_endpoints",
            "at least one endpoint is required with backend = \"etcd\"",
        );
    }
    for (i, e) in etcd_endpoints.iter().enumerate() {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            c.err(
                format!("state.etcd_endpoints[{i}]"),
                format!("invalid endpoint {e:?} (expected http://host:port)"),
            );
        } else if let Some(m) = base_url_problem(e, "/v3/kv/...") {
            c.err(format!("state.etcd_endpoints[{i}]"), m);
        }
    }
    // An empty path passed `check` and `serve`, and then every flip failed to write it (500).
    // The etcd backend keeps its cache there, and the upgrade socket's default is beside it.
    if s.path.as_deref() == Some("") {
        c.err(
            "state.path",
            match backend {
                StateBackend::File => "must be a path: the file the live colors are kept in",
                StateBackend::Etcd => {
                    "must be a path: the file the last state seen from etcd is cached in"
                }
            },
        );
    }
    // The lock and the other files beside the state file are named after it: a state path
    // with their extension would make one of them the state file itself.
    if let Some(p) = s.path.as_deref().filter(|p| !p.is_empty()) {
        let path = PathBuf::from(p);
        if let Some((_, what)) = state_files(&path).into_iter().find(|(f, _)| *f == path) {
            c.err(
                "state.path",
                format!(
                    "{p:?} would be {what} as well as the state file (it is named after the state file); name the state file with another extension, e.g. \".json\""
                ),
            );
        }
    }
    let state = StateConfig {
        backend,
        path: PathBuf::from(
            s.path
                .clone()
                .unwrap_or_else(|| "state/switchyard.json".to_string()),
        ),
        etcd_endpoints,
        etcd_prefix: s
            .etcd_prefix
            .clone()
            .unwrap_or_else(|| "/switchyard/".to_string()),
        etcd_timeout: c.duration(
            "state.etcd_timeout",
            s.etcd_timeout.as_deref(),
            Duration::from_secs(2),
        ),
        etcd_progress_interval: c.duration(
            "state.etcd_progress_interval",
            s.etcd_progress_interval.as_deref(),
            Duration::from_secs(2),
        ),
        events_max_bytes: c.count(
            "state.events_max_bytes",
            s.events_max_bytes,
            16 * 1024 * 1024,
            4096,
            1 << 40,
        ),
    };
    for (key, d) in [
        ("state.etcd_timeout", state.etcd_timeout),
        ("state.etcd_progress_interval", state.etcd_progress_interval),
    ] {
        if d < Duration::from_millis(100) || d > Duration::from_secs(60) {
            c.err(key, format!("{d:?} is out of range (100ms..=60s)"));
        }
    }
    state
}

/// `[log]`.
fn log(c: &mut Check, l: &RawLog) -> LogConfig {
    let access = match l.access.as_deref().unwrap_or("off") {
        "off" => AccessTarget::Off,
        "stderr" => AccessTarget::Stderr,
        "stdout" => AccessTarget::Stdout,
        "" => {
            c.err(
                "log.access",
                "must be \"off\", \"stderr\", \"stdout\" or a file path",
            );
            AccessTarget::Off
        }
        path => AccessTarget::File(PathBuf::from(path)),
    };
    let access_format = match l.access_format.as_deref().unwrap_or("json") {
        "json" => AccessFormat::Json,
        "combined" => AccessFormat::Combined,
        other => {
            c.err(
                "log.access_format",
                format!("invalid format {other:?} (expected \"json\" or \"combined\")"),
            );
            AccessFormat::Json
        }
    };
    LogConfig {
        access,
        access_format,
        access_buffer: c.count("log.access_buffer", l.access_buffer, 16_384, 1, 10_000_000)
            as usize,
        request_id: l.request_id.unwrap_or(true),
    }
}

/// What is wrong with `u` as a URL Switchyard calls (`http://` or `https://`, a host, no
/// `user:password@`), or None; `parse_as` is `u` with any placeholders filled in, `expected`
/// shows the right form. A user or password is refused:
/// it would never be sent (no client here sends Basic credentials) and the URL is shown as
/// written in `/api/status`, which needs no token. The URL is repeated without it.
pub(super) fn url_problem(u: &str, parse_as: &str, expected: &str) -> Option<String> {
    // From the scheme to the last `@`, as `ctl` masks its admin URL: a password may hold `/`.
    let after_scheme = u.find("://").map_or(0, |i| i + 3);
    let shown = match u[after_scheme..].rfind('@') {
        Some(at) => format!("{}***{}", &u[..after_scheme], &u[after_scheme + at..]),
        None => u.to_string(),
    };
    // Any `@`, as `ctl` refuses one: `user:pa/ss@host` parses as the host `user`.
    if u[after_scheme..].contains('@') {
        return Some(format!(
            "URL {shown:?} carries a user or password, which is never sent and would be shown as written (in /api/status, the logs, errors); leave it out (a Prometheus token goes in the variable analysis.prometheus_token_env names; an '@' in a path is written %40)"
        ));
    }
    let parsed = parse_as.parse::<http::Uri>().ok();
    let authority = parsed.as_ref().and_then(|x| x.authority());
    let ok = matches!(
        parsed.as_ref().and_then(|x| x.scheme_str()),
        Some("http" | "https")
    ) && authority.is_some();
    if !ok {
        return Some(format!("invalid URL {shown:?} (expected {expected})"));
    }
    // A port past 65535 parses, and the client would have gone to the scheme's port instead.
    authority
        .and_then(|a| crate::http::client::authority_port(a, 80).err())
        .map(|e| format!("invalid URL {shown:?}: {e}"))
}

/// What is wrong with `u` as a base URL Switchyard appends a path to (`appended`), or None: a
/// query string or a `#fragment` would swallow that path (`/prom?x=1/api/v1/query?...`). Neither
/// is repeated: a query may hold a secret.
pub(super) fn base_url_problem(u: &str, appended: &str) -> Option<String> {
    let part = if u.contains('#') {
        "a #fragment"
    } else if u.contains('?') {
        "a query string ('?...')"
    } else {
        return None;
    };
    Some(format!(
        "a base URL takes no query or fragment, and this one has {part}: Switchyard appends {appended} to it, which would land inside it; leave it out"
    ))
}

/// `[notify]`.
fn notify(c: &mut Check, n: &RawNotify) -> NotifyConfig {
    let webhooks = n.webhooks.clone().unwrap_or_default();
    for (i, w) in webhooks.iter().enumerate() {
        if let Some(m) = url_problem(w, w, "http://host:port/path or https://...") {
            c.err(format!("notify.webhooks[{i}]"), m);
        }
    }
    let timeout = c.duration(
        "notify.timeout",
        n.timeout.as_deref(),
        Duration::from_secs(5),
    );
    // Zero: every delivery timed out at once, and no webhook was ever delivered.
    c.positive("notify.timeout", timeout);
    NotifyConfig {
        webhooks,
        timeout,
        max_attempts: c.count("notify.max_attempts", n.max_attempts, 5, 1, 100) as u32,
        queue_size: c.count("notify.queue_size", n.queue_size, 1024, 1, 1_000_000) as usize,
        ca_file: n.ca_file.as_ref().map(PathBuf::from),
    }
}

/// `[analysis]`.
fn analysis(c: &mut Check, an: &RawAnalysis) -> AnalysisConfig {
    if let Some(m) = an.prometheus_url.as_deref().and_then(|u| {
        url_problem(u, u, "http://host:port or https://host:port")
            .or_else(|| base_url_problem(u, "/api/v1/query?query=..."))
    }) {
        c.err("analysis.prometheus_url", m);
    }
    if an.prometheus_token_env.as_deref() == Some("") {
        c.err(
            "analysis.prometheus_token_env",
            "must name an environment variable",
        );
    }
    let analysis = AnalysisConfig {
        prometheus_url: an.prometheus_url.clone(),
        prometheus_token_env: an.prometheus_token_env.clone(),
        timeout: c.duration(
            "analysis.timeout",
            an.timeout.as_deref(),
            Duration::from_secs(5),
        ),
        ca_file: an.ca_file.as_ref().map(PathBuf::from),
    };
    c.positive("analysis.timeout", analysis.timeout);
    analysis
}

/// `[[services]]`: each service, then what spans them (unique names, a Prometheus URL for the
/// `prometheus` checks, no service hidden behind an earlier one).
fn services(c: &mut Check, raw: Vec<RawService>, analysis: &AnalysisConfig) -> Vec<ServiceConfig> {
    // Each service with its index in the file: a service that failed its own checks is left
    // out, and the keys of the checks below still name the entries as the file numbers them.
    let mut services: Vec<(usize, ServiceConfig)> = Vec::new();
    let mut names = HashSet::new();
    for (i, rs) in raw.into_iter().enumerate() {
        let key = format!("services[{i}]");
        if let Some(svc) = service::service(c, &key, rs) {
            if !names.insert(svc.name.clone()) {
                c.err(
                    format!("{key}.name"),
                    format!("duplicate service name {:?}", svc.name),
                );
            }
            services.push((i, svc));
        }
    }
    for (i, _) in &services {
        // Named as the file numbers it: an earlier trigger dropped for its own error does not
        // shift the index.
        let first = |prefix: String| {
            c.prometheus_keys
                .iter()
                .find(|k| k.starts_with(&prefix))
                .cloned()
        };
        let uses_prometheus = first(format!("services[{i}].rollback.triggers["))
            .or_else(|| first(format!("services[{i}].verify[")));
        if let (Some(key), None) = (uses_prometheus, &analysis.prometheus_url) {
            c.err(
                key,
                "kind \"prometheus\" needs [analysis] prometheus_url (the Prometheus HTTP API base URL)",
            );
        }
    }
    if services.is_empty() && c.errors.is_empty() {
        c.err("services", "at least one [[services]] entry is required");
    }
    for (j, (later_at, later)) in services.iter().enumerate() {
        if let Some((_, earlier)) = services[..j].iter().find(|(_, e)| shadows(e, later)) {
            c.err(
                format!("services[{later_at}]"),
                format!(
                    "service {:?} can never match: the earlier service {:?} matches every request it would",
                    later.name, earlier.name
                ),
            );
        }
    }
    services.into_iter().map(|(_, svc)| svc).collect()
}

/// True when every request `later` could match is matched by `earlier` first.
fn shadows(earlier: &ServiceConfig, later: &ServiceConfig) -> bool {
    let hosts_covered = earlier.hosts.is_empty()
        || (!later.hosts.is_empty()
            && later
                .hosts
                .iter()
                .all(|h| earlier.hosts.iter().any(|e| host_pattern_matches(e, h))));
    let path_covered = match (&earlier.path_prefix, &later.path_prefix) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(e), Some(l)) => l.starts_with(e.as_str()),
    };
    hosts_covered && path_covered
}

/// `pattern` is a configured host (`api.example.com` or `*.example.com`); `host` is lower-case.
pub fn host_pattern_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.len() > suffix.len() + 1
                && host.ends_with(suffix)
                && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
        }
        None => pattern == host,
    }
}
