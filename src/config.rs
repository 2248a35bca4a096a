//! Configuration: the raw file (serde) and the validated config the proxy runs on.
//!
//! `check`, startup and reload share [`load`]: the file is read through the `config` crate (so
//! `SWITCHYARD__SECTION__KEY` environment variables override it), deserialized strictly, then
//! validated as a whole so that every problem is reported at once, each with its key path.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The two colors of a service. Everything else about a deployment is configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Blue,
    Green,
}

impl Color {
    pub const ALL: [Color; 2] = [Color::Blue, Color::Green];

    pub fn other(self) -> Color {
        match self {
            Color::Blue => Color::Green,
            Color::Green => Color::Blue,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Color::Blue => "blue",
            Color::Green => "green",
        }
    }

    /// Index into per-color arrays.
    pub fn index(self) -> usize {
        match self {
            Color::Blue => 0,
            Color::Green => 1,
        }
    }
}

impl fmt::Display for Color {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Color {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "blue" => Ok(Color::Blue),
            "green" => Ok(Color::Green),
            other => Err(format!(
                "invalid color {other:?} (expected \"blue\" or \"green\")"
            )),
        }
    }
}

/// One problem in a config file, with the key it is at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Every problem found in one config file.
#[derive(Clone, Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The raw file
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    proxy: RawProxy,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    notify: RawNotify,
    #[serde(default)]
    analysis: RawAnalysis,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    services: Vec<RawService>,
    /// `[release_plans.NAME]`: release plans started by name (validated by crate::release).
    #[serde(default)]
    release_plans: std::collections::BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnalysis {
    prometheus_url: Option<String>,
    prometheus_token_env: Option<String>,
    timeout: Option<String>,
    ca_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    listen: Option<String>,
    tls_listen: Option<String>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    connect_timeout: Option<String>,
    request_timeout: Option<String>,
    shutdown_grace: Option<String>,
    workers: Option<i64>,
    runtime: Option<String>,
    preview_listen: Option<String>,
    // Extensions (README "Configuration reference").
    header_read_timeout: Option<String>,
    body_idle_timeout: Option<String>,
    max_connections: Option<i64>,
    max_headers: Option<i64>,
    max_header_bytes: Option<i64>,
    upstream_idle_timeout: Option<String>,
    upstream_max_idle: Option<i64>,
    h2_max_concurrent_streams: Option<i64>,
    client_send_timeout: Option<String>,
    upstream_send_timeout: Option<String>,
    h2_idle_timeout: Option<String>,
    tunnel_idle_timeout: Option<String>,
    // Retries and passive health (README "Upstream faults").
    retries: Option<i64>,
    eject_after: Option<i64>,
    eject_for: Option<String>,
    resolve_interval: Option<String>,
    resolve_hosts_file: Option<String>,
    upgrade_socket: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    token_env: Option<String>,
    allowed_hosts: Option<Vec<String>>,
    tls_cert: Option<String>,
    tls_key: Option<String>,
    max_connections: Option<i64>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    watch_config: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawState {
    backend: Option<String>,
    path: Option<String>,
    etcd_endpoints: Option<Vec<String>>,
    etcd_prefix: Option<String>,
    etcd_timeout: Option<String>,
    etcd_progress_interval: Option<String>,
    events_max_bytes: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    webhooks: Option<Vec<String>>,
    timeout: Option<String>,
    max_attempts: Option<i64>,
    queue_size: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    access: Option<String>,
    access_format: Option<String>,
    access_buffer: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Option<String>,
    hosts: Option<Vec<String>>,
    path_prefix: Option<String>,
    active: Option<String>,
    blue: Option<RawPool>,
    green: Option<RawPool>,
    smoke_paths: Option<Vec<String>>,
    health: Option<RawHealth>,
    rollback: Option<RawRollback>,
    #[serde(default)]
    verify: Vec<RawVerify>,
}

/// A `[[services.verify]]` check: the keys of a `prometheus` or `probe` trigger that mean
/// something for one attempt before a flip (no `for`, `interval` or error policy).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVerify {
    kind: Option<String>,
    query: Option<String>,
    above: Option<serde_json::Value>,
    below: Option<serde_json::Value>,
    path: Option<String>,
    url: Option<String>,
    json_pointer: Option<String>,
    equals: Option<serde_json::Value>,
    above_fraction: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    upstreams: Option<Vec<String>>,
    protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    path: Option<String>,
    interval: Option<String>,
    timeout: Option<String>,
    unhealthy_after: Option<i64>,
    healthy_after: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollback {
    enabled: Option<bool>,
    watch_for: Option<String>,
    min_requests: Option<i64>,
    dry_run: Option<bool>,
    #[serde(default)]
    triggers: Vec<RawTrigger>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrigger {
    kind: Option<String>,
    /// A ratio, a count or a duration string depending on `kind`.
    above: Option<serde_json::Value>,
    over: Option<String>,
    #[serde(rename = "for")]
    for_: Option<String>,
    paths: Option<Vec<String>>,
    // `prometheus` and `probe` (src/analysis.rs).
    query: Option<String>,
    below: Option<serde_json::Value>,
    interval: Option<String>,
    on_empty: Option<String>,
    on_error: Option<String>,
    max_errors: Option<i64>,
    path: Option<String>,
    url: Option<String>,
    json_pointer: Option<String>,
    equals: Option<serde_json::Value>,
    above_fraction: Option<serde_json::Value>,
}

// ---------------------------------------------------------------------------------------------
// The validated config
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    pub state: StateConfig,
    pub notify: NotifyConfig,
    pub analysis: AnalysisConfig,
    pub log: LogConfig,
    pub services: Vec<ServiceConfig>,
    /// `[release_plans.NAME]`: validated plans (as JSON), started by name.
    pub release_plans: std::collections::BTreeMap<String, serde_json::Value>,
}

/// `[analysis]`: where `prometheus` triggers and verify checks send their queries.
#[derive(Clone, Debug, PartialEq)]
pub struct AnalysisConfig {
    /// The Prometheus HTTP API base URL (`http://` or `https://`); None: no prometheus checks.
    pub prometheus_url: Option<String>,
    /// The environment variable holding a bearer token for Prometheus.
    pub prometheus_token_env: Option<String>,
    /// Limit of one query or one probe request (connect, TLS, answer).
    pub timeout: Duration,
    /// PEM bundle of CAs trusted for `https://` (default: the system bundle).
    pub ca_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    pub tls_listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    /// None: one per CPU.
    pub workers: Option<usize>,
    /// How `workers` threads share the work (extension; BENCHMARKS.md "runtime flavor").
    pub runtime: RuntimeFlavor,
    pub preview_listen: Option<SocketAddr>,
    pub header_read_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub max_connections: usize,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    pub upstream_idle_timeout: Duration,
    pub upstream_max_idle: usize,
    pub h2_max_concurrent_streams: u32,
    /// A write to a client that makes no progress for this long closes the connection
    /// (HTTP/1 socket writes, h2 socket writes and h2 streams stalled on flow control).
    pub client_send_timeout: Duration,
    /// A write of a request to an upstream that makes no progress for this long fails it.
    pub upstream_send_timeout: Duration,
    /// An HTTP/2 client connection with no open stream for this long gets a GOAWAY.
    pub h2_idle_timeout: Duration,
    /// An upgraded tunnel with no byte either way for this long is closed; zero: never.
    pub tunnel_idle_timeout: Duration,
    /// Other upstreams of the same color a request may go to when its upstream could not take
    /// it (connect failure; a reset before any answer, for idempotent bodiless requests).
    pub retries: u32,
    /// Passive ejection (`eject_after`, `eject_for`).
    pub passive: crate::passive::PassiveConfig,
    /// How often upstream names are resolved again (README "Upstreams by name").
    pub resolve_interval: Duration,
    /// Resolve names from this hosts-format file instead of the system resolver (tests, and
    /// setups that keep their own name list).
    pub resolve_hosts_file: Option<PathBuf>,
    /// The Unix socket `serve --upgrade` takes the listeners over (README "Upgrading").
    pub upgrade_socket: PathBuf,
}

/// `[log]`: the access log (README "Access log").
#[derive(Clone, Debug, PartialEq)]
pub struct LogConfig {
    pub access: AccessTarget,
    pub access_format: AccessFormat,
    /// Lines queued for the writer thread; past it lines are dropped and counted.
    pub access_buffer: usize,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AccessTarget {
    Off,
    Stderr,
    Stdout,
    File(PathBuf),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessFormat {
    Json,
    Combined,
}

/// `shared`: one multi-thread runtime with `workers` threads (one worker: a current-thread
/// runtime). `per_worker`: one current-thread runtime per worker, each accepting on its own
/// `SO_REUSEPORT` socket of `proxy.listen`, so a connection stays on one thread for its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeFlavor {
    Shared,
    PerWorker,
}

#[derive(Clone, Debug, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token_env: String,
    /// Host header values accepted besides loopback names (DNS-rebinding defence).
    pub allowed_hosts: Vec<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Admin connections served at once, apart from the proxy's `max_connections`.
    pub max_connections: usize,
    /// How long an admin client may take to send a request head (HTTP/1.1).
    pub header_read_timeout: Duration,
    /// An admin connection (HTTP/1.1 keep-alive or h2c) with no request in flight for this long
    /// is closed.
    pub idle_timeout: Duration,
    /// Reload when the config file's content changes (a Kubernetes ConfigMap update), polled
    /// every second ([`crate::config_watch`]).
    pub watch_config: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateBackend {
    File,
    Etcd,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StateConfig {
    pub backend: StateBackend,
    pub path: PathBuf,
    pub etcd_endpoints: Vec<String>,
    pub etcd_prefix: String,
    /// One etcd request (a read, a transaction) waits this long for its answer.
    pub etcd_timeout: Duration,
    /// How often the watch's progress is checked; it is declared stalled after three intervals.
    pub etcd_progress_interval: Duration,
    /// The audit log is rotated (one `.1` file kept) when it would grow past this size.
    pub events_max_bytes: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct NotifyConfig {
    pub webhooks: Vec<String>,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub queue_size: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    H2,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::H2 => "h2",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PoolConfig {
    /// What the pool balances over: the `IP:port` entries and every address the names resolved
    /// to, in file order ([`crate::resolve`] fills in the names' part).
    pub upstreams: Vec<SocketAddr>,
    pub protocol: Protocol,
    /// The entries as written, names with their last good resolution.
    pub entries: Vec<UpstreamEntry>,
}

/// One `upstreams` entry of a pool.
#[derive(Clone, Debug, PartialEq)]
pub enum UpstreamEntry {
    Addr(SocketAddr),
    Name(UpstreamName),
}

/// A `name:port` upstream (README "Upstreams by name").
#[derive(Clone, Debug, PartialEq)]
pub struct UpstreamName {
    /// Its config key, `services[0].blue.upstreams[1]`.
    pub key: String,
    pub host: String,
    pub port: u16,
    /// The last good answer (sorted); empty until a lookup succeeds.
    pub addrs: Vec<SocketAddr>,
    /// Why the last lookup failed (the addresses above are then kept from before).
    pub error: Option<String>,
}

impl UpstreamName {
    /// `host:port`, as written.
    pub fn label(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

impl PoolConfig {
    /// Recomputes `upstreams` from the entries (the names' last good addresses).
    pub fn refresh(&mut self) {
        let mut all: Vec<SocketAddr> = Vec::new();
        for e in &self.entries {
            let addrs = match e {
                UpstreamEntry::Addr(a) => std::slice::from_ref(a),
                UpstreamEntry::Name(n) => n.addrs.as_slice(),
            };
            for a in addrs {
                if !all.contains(a) {
                    all.push(*a);
                }
            }
        }
        self.upstreams = all;
    }

    pub fn names(&self) -> impl Iterator<Item = &UpstreamName> {
        self.entries.iter().filter_map(|e| match e {
            UpstreamEntry::Name(n) => Some(n),
            UpstreamEntry::Addr(_) => None,
        })
    }

    pub fn names_mut(&mut self) -> impl Iterator<Item = &mut UpstreamName> {
        self.entries.iter_mut().filter_map(|e| match e {
            UpstreamEntry::Name(n) => Some(n),
            UpstreamEntry::Addr(_) => None,
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct HealthConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TriggerKind {
    /// failed / all requests of the live color over `over` is above `above`.
    ErrorRate { above: f64, over: Duration },
    /// p95 latency of the live color over `over` is above `above`.
    P95Latency { above: Duration, over: Duration },
    /// More than `above` failures on these path prefixes over `over`.
    Critical5xx {
        paths: Vec<String>,
        above: u64,
        over: Duration,
    },
    /// The live pool has no healthy upstream.
    Unhealthy,
    /// A PromQL query's value is above or below a bound (src/analysis.rs).
    Prometheus(PromCheck),
    /// More than `above_fraction` of the live color's upstreams fail an HTTP check.
    Probe(ProbeCheck),
}

/// `above` or `below` a number (strict).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Bound {
    Above(f64),
    Below(f64),
}

impl Bound {
    /// The condition holds: `value > above` or `value < below`.
    pub fn breached_by(self, value: f64) -> bool {
        match self {
            Bound::Above(t) => value > t,
            Bound::Below(t) => value < t,
        }
    }

    pub fn threshold(self) -> f64 {
        match self {
            Bound::Above(t) | Bound::Below(t) => t,
        }
    }

    /// `>` or `<`.
    pub fn op(self) -> &'static str {
        match self {
            Bound::Above(_) => ">",
            Bound::Below(_) => "<",
        }
    }

    /// `above` or `below`.
    pub fn key(self) -> &'static str {
        match self {
            Bound::Above(_) => "above",
            Bound::Below(_) => "below",
        }
    }
}

/// What an empty query result means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnEmpty {
    InsufficientData,
    Fail,
}

/// What `max_errors` consecutive errors mean.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    Hold,
    Fail,
}

/// A `prometheus` trigger or verify check.
#[derive(Clone, Debug, PartialEq)]
pub struct PromCheck {
    /// The query template (`{{service}}`, `{{color}}`, `{{upstreams}}`).
    pub query: String,
    pub bound: Bound,
    pub interval: Duration,
    pub on_empty: OnEmpty,
    pub on_error: OnError,
    pub max_errors: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ProbeTarget {
    /// GET on every upstream of the color.
    Path(String),
    /// GET on this URL (`{{service}}` and `{{color}}` placeholders).
    Url(String),
}

/// What a probe answer must satisfy besides a 2xx status.
#[derive(Clone, Debug, PartialEq)]
pub enum ProbeCondition {
    /// Any 2xx passes.
    Status,
    /// The value at `json_pointer` equals this one.
    Equals(serde_json::Value),
    /// The number at `json_pointer` is not past the bound (the bound is the failing side).
    Bound(Bound),
}

/// A `probe` trigger or verify check.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeCheck {
    pub target: ProbeTarget,
    pub json_pointer: Option<String>,
    pub condition: ProbeCondition,
    /// Fires when more than this fraction of the probed upstreams fail.
    pub above_fraction: f64,
    pub interval: Duration,
    pub on_error: OnError,
    pub max_errors: u32,
}

/// A `[[services.verify]]` check: must pass against the target color before a flip.
#[derive(Clone, Debug, PartialEq)]
pub enum VerifyCheck {
    Prometheus(PromCheck),
    Probe(ProbeCheck),
}

impl VerifyCheck {
    pub fn name(&self) -> &'static str {
        match self {
            VerifyCheck::Prometheus(_) => "prometheus",
            VerifyCheck::Probe(_) => "probe",
        }
    }
}

impl TriggerKind {
    pub fn name(&self) -> &'static str {
        match self {
            TriggerKind::ErrorRate { .. } => "error_rate",
            TriggerKind::P95Latency { .. } => "p95_latency",
            TriggerKind::Critical5xx { .. } => "critical_5xx",
            TriggerKind::Unhealthy => "unhealthy",
            TriggerKind::Prometheus(_) => "prometheus",
            TriggerKind::Probe(_) => "probe",
        }
    }

    /// How often the trigger's own task evaluates it (`prometheus` and `probe` only).
    pub fn interval(&self) -> Option<Duration> {
        match self {
            TriggerKind::Prometheus(p) => Some(p.interval),
            TriggerKind::Probe(p) => Some(p.interval),
            _ => None,
        }
    }

    /// The sliding window the trigger reads; zero for `unhealthy`, which reads health state.
    pub fn over(&self) -> Duration {
        match self {
            TriggerKind::ErrorRate { over, .. }
            | TriggerKind::P95Latency { over, .. }
            | TriggerKind::Critical5xx { over, .. } => *over,
            TriggerKind::Unhealthy | TriggerKind::Prometheus(_) | TriggerKind::Probe(_) => {
                Duration::ZERO
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct TriggerConfig {
    pub kind: TriggerKind,
    /// How long the condition must hold without a break before it fires.
    pub for_: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RollbackConfig {
    pub enabled: bool,
    pub watch_for: Duration,
    pub min_requests: u64,
    pub dry_run: bool,
    pub triggers: Vec<TriggerConfig>,
}

impl Default for RollbackConfig {
    fn default() -> Self {
        RollbackConfig {
            enabled: false,
            watch_for: Duration::from_secs(2 * 3600),
            min_requests: 20,
            dry_run: false,
            triggers: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ServiceConfig {
    pub name: String,
    /// Lower-case host names; a leading `*.` matches any subdomain. Empty matches all.
    pub hosts: Vec<String>,
    pub path_prefix: Option<String>,
    pub active: Color,
    pub blue: PoolConfig,
    pub green: PoolConfig,
    pub smoke_paths: Vec<String>,
    /// None: no active checks, every upstream counts as healthy.
    pub health: Option<HealthConfig>,
    pub rollback: RollbackConfig,
    /// Checks on the target color before a flip (src/analysis.rs).
    pub verify: Vec<VerifyCheck>,
}

impl ServiceConfig {
    pub fn pool(&self, color: Color) -> &PoolConfig {
        match color {
            Color::Blue => &self.blue,
            Color::Green => &self.green,
        }
    }

    /// The longest window any trigger of this service reads.
    pub fn longest_window(&self) -> Duration {
        self.rollback
            .triggers
            .iter()
            .map(|t| t.kind.over())
            .max()
            .unwrap_or(Duration::ZERO)
    }
}

/// The longest `over` a trigger may ask for; it bounds the memory of every window ring.
pub const MAX_WINDOW: Duration = Duration::from_secs(3600);
/// The window `/api/status` reports when no trigger asks for a longer one.
pub const DEFAULT_STATUS_WINDOW: Duration = Duration::from_secs(60);

impl Config {
    /// The window `/api/status` and the windowed gauges report: the longest trigger window,
    /// or one minute.
    pub fn status_window(&self) -> Duration {
        self.services
            .iter()
            .map(ServiceConfig::longest_window)
            .max()
            .unwrap_or(Duration::ZERO)
            .max(DEFAULT_STATUS_WINDOW)
    }

    /// Slots in every window ring: the longest window plus margin, at least ten minutes.
    pub fn window_slots(&self) -> usize {
        let secs = self
            .services
            .iter()
            .map(ServiceConfig::longest_window)
            .max()
            .unwrap_or(Duration::ZERO)
            .as_secs();
        (secs as usize + 4).max(600)
    }

    /// A one-screen summary for `switchyard check`.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
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
                continue;
            }
            let _ = writeln!(
                s,
                "    auto-rollback{} for {} after a flip, min {} requests",
                if r.dry_run { " (dry run)" } else { "" },
                humantime::format_duration(r.watch_for),
                r.min_requests
            );
            for t in &r.triggers {
                let what = match &t.kind {
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
                };
                let _ = writeln!(
                    s,
                    "      {:<12} {what} for {}",
                    t.kind.name(),
                    humantime::format_duration(t.for_)
                );
            }
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

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Reads, overrides from the environment and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            key: String::new(),
            message: format!("cannot read config file {}: {e}", path.display()),
        }])
    })?;
    from_toml_str(&text)
}

/// Parses TOML text (plus `SWITCHYARD__*` environment overrides) into a validated config.
pub fn from_toml_str(text: &str) -> Result<Config, ConfigErrors> {
    from_toml_str_with_env(text, None)
}

/// As [`from_toml_str`], with the environment given explicitly (tests), or the process's.
pub fn from_toml_str_with_env(
    text: &str,
    env: Option<std::collections::HashMap<String, String>>,
) -> Result<Config, ConfigErrors> {
    let one = |message: String| {
        ConfigErrors(vec![ConfigError {
            key: String::new(),
            message,
        }])
    };
    let mut envsrc = config::Environment::with_prefix("SWITCHYARD")
        .separator("__")
        .try_parsing(true)
        .list_separator(",")
        .with_list_parse_key("notify.webhooks")
        .with_list_parse_key("state.etcd_endpoints")
        .with_list_parse_key("admin.allowed_hosts");
    if let Some(env) = env {
        envsrc = envsrc.source(Some(env.into_iter().collect()));
    }
    let built = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(envsrc)
        .build()
        .map_err(|e| one(format!("cannot parse config: {e}")))?;
    let mut value: serde_json::Value = built
        .try_deserialize()
        .map_err(|e| one(format!("cannot parse config: {e}")))?;
    let (raw, mut errors) = deserialize_collecting(&mut value)?;
    // Unknown keys were removed from the value: validate the rest too, so one run of `check`
    // reports every problem, not only the unknown keys.
    match validate(raw) {
        Ok(cfg) if errors.is_empty() => Ok(cfg),
        Ok(_) => Err(ConfigErrors(errors)),
        Err(ConfigErrors(more)) => {
            errors.extend(more);
            Err(ConfigErrors(errors))
        }
    }
}

/// Deserializes strictly, but reports every unknown key rather than only the first: each one is
/// recorded and removed, and deserialization runs again. Returns the config without the unknown
/// keys, and an error for each of them.
fn deserialize_collecting(
    value: &mut serde_json::Value,
) -> Result<(RawConfig, Vec<ConfigError>), ConfigErrors> {
    let mut errors = Vec::new();
    for _ in 0..100 {
        match serde_path_to_error::deserialize::<_, RawConfig>(&*value) {
            Ok(raw) => return Ok((raw, errors)),
            Err(e) => {
                let path = e.path().to_string();
                let msg = e.inner().to_string();
                if let Some(field) = unknown_field_name(&msg) {
                    let parent = parent_path(&path, &field);
                    let key = join_key(&parent, &field);
                    let expected = msg
                        .split_once(", expected ")
                        .map(|(_, e)| format!(" (expected {e})"))
                        .unwrap_or_default();
                    errors.push(ConfigError {
                        key,
                        message: format!("unknown key {field:?}{expected}"),
                    });
                    if !remove_key(value, &parent, &field) {
                        return Err(ConfigErrors(errors));
                    }
                } else {
                    let key = if path == "." { String::new() } else { path };
                    errors.push(ConfigError { key, message: msg });
                    return Err(ConfigErrors(errors));
                }
            }
        }
    }
    Err(ConfigErrors(errors))
}

fn unknown_field_name(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("unknown field `")?;
    let end = rest.find('`')?;
    Some(rest[..end].to_string())
}

/// serde_path_to_error reports an unknown field at a path that may or may not end with the
/// field itself; normalize to the parent.
fn parent_path(path: &str, field: &str) -> String {
    if path == "." {
        return String::new();
    }
    if path == field {
        return String::new();
    }
    if let Some(p) = path.strip_suffix(&format!(".{field}")) {
        return p.to_string();
    }
    path.to_string()
}

fn join_key(parent: &str, field: &str) -> String {
    if parent.is_empty() {
        field.to_string()
    } else {
        format!("{parent}.{field}")
    }
}

/// Removes `field` from the object at `path` (`services[0].blue` style).
fn remove_key(value: &mut serde_json::Value, path: &str, field: &str) -> bool {
    let mut cur = value;
    if !path.is_empty() {
        for seg in path.split('.') {
            let (name, idx) = match seg.find('[') {
                Some(i) => (&seg[..i], seg[i + 1..seg.len() - 1].parse::<usize>().ok()),
                None => (seg, None),
            };
            cur = match cur.get_mut(name) {
                Some(v) => v,
                None => return false,
            };
            if let Some(i) = idx {
                cur = match cur.get_mut(i) {
                    Some(v) => v,
                    None => return false,
                };
            }
        }
    }
    match cur.as_object_mut() {
        Some(map) => map.remove(field).is_some(),
        None => false,
    }
}

/// Collects errors with their key paths while validating.
struct Check {
    errors: Vec<ConfigError>,
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
}

/// Durations need a unit: `"250ms"`, `"2s"`, `"2m"`, `"2h"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() || t.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!(
            "invalid duration {s:?} (needs a unit: \"250ms\", \"2s\", \"2m\", \"2h\")"
        ));
    }
    humantime::parse_duration(t).map_err(|e| {
        format!("invalid duration {s:?}: {e} (use a unit: \"250ms\", \"2s\", \"2m\", \"2h\")")
    })
}

fn validate(raw: RawConfig) -> Result<Config, ConfigErrors> {
    let mut c = Check { errors: Vec::new() };

    // [proxy]
    let p = &raw.proxy;
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
    let tls_cert = p.tls_cert.as_ref().map(PathBuf::from);
    let tls_key = p.tls_key.as_ref().map(PathBuf::from);
    if p.tls_listen.is_some() {
        if tls_cert.is_none() {
            c.err("proxy.tls_cert", "required when proxy.tls_listen is set");
        }
        if tls_key.is_none() {
            c.err("proxy.tls_key", "required when proxy.tls_listen is set");
        }
    }
    let preview_listen = p
        .preview_listen
        .as_deref()
        .and_then(|v| c.addr("proxy.preview_listen", v));
    let connect_timeout = c.duration(
        "proxy.connect_timeout",
        p.connect_timeout.as_deref(),
        Duration::from_secs(2),
    );
    let request_timeout = c.duration(
        "proxy.request_timeout",
        p.request_timeout.as_deref(),
        Duration::from_secs(30),
    );
    let shutdown_grace = c.duration(
        "proxy.shutdown_grace",
        p.shutdown_grace.as_deref(),
        Duration::from_secs(30),
    );
    for (k, d) in [
        ("proxy.connect_timeout", connect_timeout),
        ("proxy.request_timeout", request_timeout),
    ] {
        if d.is_zero() {
            c.err(k, "must be greater than zero");
        }
    }
    let workers = p
        .workers
        .map(|_| c.count("proxy.workers", p.workers, 1, 1, 1024) as usize);
    let runtime = match p.runtime.as_deref().unwrap_or("shared") {
        "shared" => RuntimeFlavor::Shared,
        "per_worker" => RuntimeFlavor::PerWorker,
        other => {
            c.err(
                "proxy.runtime",
                format!("invalid runtime {other:?} (expected \"shared\" or \"per_worker\")"),
            );
            RuntimeFlavor::Shared
        }
    };
    let header_read_timeout = c.duration(
        "proxy.header_read_timeout",
        p.header_read_timeout.as_deref(),
        Duration::from_secs(10),
    );
    let body_idle_timeout = c.duration(
        "proxy.body_idle_timeout",
        p.body_idle_timeout.as_deref(),
        Duration::from_secs(60),
    );
    let upstream_idle_timeout = c.duration(
        "proxy.upstream_idle_timeout",
        p.upstream_idle_timeout.as_deref(),
        Duration::from_secs(60),
    );
    let eject_for = c.duration(
        "proxy.eject_for",
        p.eject_for.as_deref(),
        crate::passive::PassiveConfig::default().eject_for,
    );
    if eject_for.is_zero() {
        c.err("proxy.eject_for", "must be greater than zero");
    }
    let passive = crate::passive::PassiveConfig {
        eject_after: c.count(
            "proxy.eject_after",
            p.eject_after,
            crate::passive::PassiveConfig::default().eject_after.into(),
            0,
            1000,
        ) as u32,
        eject_for,
    };
    let resolve_interval = c.duration(
        "proxy.resolve_interval",
        p.resolve_interval.as_deref(),
        Duration::from_secs(5),
    );
    if resolve_interval < Duration::from_millis(100) {
        c.err("proxy.resolve_interval", "must be at least 100ms");
    }
    let mut proxy = ProxyConfig {
        listen,
        tls_listen,
        tls_cert,
        tls_key,
        connect_timeout,
        request_timeout,
        shutdown_grace,
        workers,
        runtime,
        preview_listen,
        header_read_timeout,
        body_idle_timeout,
        max_connections: c.count(
            "proxy.max_connections",
            p.max_connections,
            10_000,
            1,
            10_000_000,
        ) as usize,
        max_headers: c.count("proxy.max_headers", p.max_headers, 100, 1, 10_000) as usize,
        max_header_bytes: c.count(
            "proxy.max_header_bytes",
            p.max_header_bytes,
            64 * 1024,
            1024,
            16 * 1024 * 1024,
        ) as usize,
        upstream_idle_timeout,
        upstream_max_idle: c.count(
            "proxy.upstream_max_idle",
            p.upstream_max_idle,
            256,
            0,
            1_000_000,
        ) as usize,
        h2_max_concurrent_streams: c.count(
            "proxy.h2_max_concurrent_streams",
            p.h2_max_concurrent_streams,
            256,
            1,
            1_000_000,
        ) as u32,
        client_send_timeout: c.duration(
            "proxy.client_send_timeout",
            p.client_send_timeout.as_deref(),
            Duration::from_secs(60),
        ),
        upstream_send_timeout: c.duration(
            "proxy.upstream_send_timeout",
            p.upstream_send_timeout.as_deref(),
            Duration::from_secs(60),
        ),
        h2_idle_timeout: c.duration(
            "proxy.h2_idle_timeout",
            p.h2_idle_timeout.as_deref(),
            Duration::from_secs(60),
        ),
        tunnel_idle_timeout: c.duration(
            "proxy.tunnel_idle_timeout",
            p.tunnel_idle_timeout.as_deref(),
            Duration::from_secs(300),
        ),
        retries: c.count("proxy.retries", p.retries, 2, 0, 10) as u32,
        passive,
        resolve_interval,
        resolve_hosts_file: p.resolve_hosts_file.as_ref().map(PathBuf::from),
        // Set below, next to the state file unless given.
        upgrade_socket: PathBuf::new(),
    };
    for (k, d) in [
        ("proxy.client_send_timeout", proxy.client_send_timeout),
        ("proxy.upstream_send_timeout", proxy.upstream_send_timeout),
        ("proxy.h2_idle_timeout", proxy.h2_idle_timeout),
    ] {
        if d.is_zero() {
            c.err(k, "must be greater than zero");
        }
    }

    // [admin]
    let a = &raw.admin;
    let admin_listen = c
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
    let admin = AdminConfig {
        listen: admin_listen,
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
    for (k, d) in [
        ("admin.header_read_timeout", admin.header_read_timeout),
        ("admin.idle_timeout", admin.idle_timeout),
    ] {
        if d.is_zero() {
            c.err(k, "must be greater than zero");
        }
    }
    let mut listeners = vec![("proxy.listen", Some(proxy.listen))];
    listeners.push(("proxy.tls_listen", proxy.tls_listen));
    listeners.push(("proxy.preview_listen", proxy.preview_listen));
    listeners.push(("admin.listen", Some(admin.listen)));
    let mut seen_listen: Vec<SocketAddr> = Vec::new();
    for (k, addr) in listeners {
        if let Some(addr) = addr {
            if addr.port() != 0 && seen_listen.contains(&addr) {
                c.err(k, format!("{addr} is already used by another listener"));
            }
            seen_listen.push(addr);
        }
    }

    // [state]
    let s = &raw.state;
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

    proxy.upgrade_socket = match &raw.proxy.upgrade_socket {
        Some(p) if p.is_empty() => {
            c.err("proxy.upgrade_socket", "must be a path");
            PathBuf::new()
        }
        Some(p) => PathBuf::from(p),
        None => state.path.with_extension("upgrade.sock"),
    };

    // [log]
    let l = &raw.log;
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
    let log = LogConfig {
        access,
        access_format,
        access_buffer: c.count("log.access_buffer", l.access_buffer, 16_384, 1, 10_000_000)
            as usize,
    };

    // [notify]
    let n = &raw.notify;
    let webhooks = n.webhooks.clone().unwrap_or_default();
    for (i, w) in webhooks.iter().enumerate() {
        let ok = w
            .parse::<http::Uri>()
            .ok()
            .filter(|u| u.scheme_str() == Some("http") && u.authority().is_some());
        if ok.is_none() {
            c.err(
                format!("notify.webhooks[{i}]"),
                format!("invalid URL {w:?} (expected http://host:port/path)"),
            );
        }
    }
    let notify = NotifyConfig {
        webhooks,
        timeout: c.duration(
            "notify.timeout",
            n.timeout.as_deref(),
            Duration::from_secs(5),
        ),
        max_attempts: c.count("notify.max_attempts", n.max_attempts, 5, 1, 100) as u32,
        queue_size: c.count("notify.queue_size", n.queue_size, 1024, 1, 1_000_000) as usize,
    };

    // [analysis]
    let an = &raw.analysis;
    if let Some(u) = &an.prometheus_url {
        let ok = u.parse::<http::Uri>().ok().filter(|x| {
            matches!(x.scheme_str(), Some("http") | Some("https")) && x.authority().is_some()
        });
        if ok.is_none() {
            c.err(
                "analysis.prometheus_url",
                format!("invalid URL {u:?} (expected http://host:port or https://host:port)"),
            );
        }
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
    if analysis.timeout.is_zero() {
        c.err("analysis.timeout", "must be greater than zero");
    }

    // [[services]]
    let mut services = Vec::new();
    let mut names = HashSet::new();
    for (i, rs) in raw.services.into_iter().enumerate() {
        let key = format!("services[{i}]");
        if let Some(svc) = validate_service(&mut c, &key, rs) {
            if !names.insert(svc.name.clone()) {
                c.err(
                    format!("{key}.name"),
                    format!("duplicate service name {:?}", svc.name),
                );
            }
            services.push(svc);
        }
    }
    for (i, svc) in services.iter().enumerate() {
        let uses_prometheus = svc
            .rollback
            .triggers
            .iter()
            .position(|t| matches!(t.kind, TriggerKind::Prometheus(_)))
            .map(|j| format!("services[{i}].rollback.triggers[{j}]"))
            .or_else(|| {
                svc.verify
                    .iter()
                    .position(|v| matches!(v, VerifyCheck::Prometheus(_)))
                    .map(|j| format!("services[{i}].verify[{j}]"))
            });
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
    for j in 0..services.len() {
        for i in 0..j {
            if shadows(&services[i], &services[j]) {
                c.err(
                    format!("services[{j}]"),
                    format!(
                        "service {:?} can never match: the earlier service {:?} matches every request it would",
                        services[j].name, services[i].name
                    ),
                );
                break;
            }
        }
    }

    // Release plans named in the config (crate::release validates them).
    let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
    c.errors
        .extend(crate::release::check_named(&raw.release_plans, &names));

    if c.errors.is_empty() {
        Ok(Config {
            proxy,
            admin,
            state,
            notify,
            analysis,
            log,
            services,
            release_plans: raw.release_plans,
        })
    } else {
        Err(ConfigErrors(c.errors))
    }
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

fn validate_service(c: &mut Check, key: &str, rs: RawService) -> Option<ServiceConfig> {
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
        let lower = h.to_ascii_lowercase();
        let bare = lower.strip_prefix("*.").unwrap_or(&lower);
        if bare.is_empty()
            || bare.contains(['/', ':', ' ', '*'])
            || !bare
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '.' || ch == '-' || ch == '_')
        {
            c.err(
                format!("{key}.hosts[{i}]"),
                format!("invalid host {h:?} (a host name without port, optionally \"*.\" first)"),
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
    let blue = validate_pool(c, &format!("{key}.blue"), rs.blue);
    let green = validate_pool(c, &format!("{key}.green"), rs.green);
    let smoke_paths = rs.smoke_paths.unwrap_or_default();
    for (i, sp) in smoke_paths.iter().enumerate() {
        if !sp.starts_with('/') {
            c.err(
                format!("{key}.smoke_paths[{i}]"),
                format!("invalid path {sp:?} (must start with '/')"),
            );
        }
    }
    let health = rs.health.map(|h| {
        let hk = format!("{key}.health");
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
            healthy_after: c.count(&format!("{hk}.healthy_after"), h.healthy_after, 2, 1, 1000)
                as u32,
        }
    });
    let rollback = match rs.rollback {
        None => RollbackConfig::default(),
        Some(r) => validate_rollback(c, &format!("{key}.rollback"), r),
    };
    let mut verify = Vec::new();
    for (i, v) in rs.verify.into_iter().enumerate() {
        if let Some(v) = validate_verify(c, &format!("{key}.verify[{i}]"), v) {
            verify.push(v);
        }
    }
    Some(ServiceConfig {
        name,
        hosts,
        path_prefix: rs.path_prefix,
        active,
        blue: blue?,
        green: green?,
        smoke_paths,
        health,
        rollback,
        verify,
    })
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-' || ch == '_')
}

/// `name:port` with a DNS name (letters, digits, `-`, `_`, dots) and a port 1..=65535.
fn host_and_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
    let labels_ok = host.split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    let numeric = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    (host.len() <= 253 && labels_ok && !numeric).then_some((host, port))
}

fn validate_pool(c: &mut Check, key: &str, rp: Option<RawPool>) -> Option<PoolConfig> {
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
        let dup = entries.iter().any(|e| match (e, &entry) {
            (UpstreamEntry::Addr(a), UpstreamEntry::Addr(b)) => a == b,
            (UpstreamEntry::Name(a), UpstreamEntry::Name(b)) => {
                a.host == b.host && a.port == b.port
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

fn validate_rollback(c: &mut Check, key: &str, r: RawRollback) -> RollbackConfig {
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
        if let Some(t) = validate_trigger(c, &format!("{key}.triggers[{i}]"), t) {
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

fn validate_trigger(c: &mut Check, key: &str, t: RawTrigger) -> Option<TriggerConfig> {
    let for_ = c.duration(&format!("{key}.for"), t.for_.as_deref(), Duration::ZERO);
    let over_key = format!("{key}.over");
    let over = |c: &mut Check| {
        let o = c.duration(&over_key, t.over.as_deref(), Duration::from_secs(60));
        if o < Duration::from_secs(1) || o > MAX_WINDOW {
            c.err(&over_key, "must be between 1s and 1h");
        }
        o
    };
    let kind_name = match t.kind.as_deref() {
        Some(k) => k,
        None => {
            c.err(
                format!("{key}.kind"),
                "required (error_rate, p95_latency, critical_5xx, unhealthy, prometheus or probe)",
            );
            return None;
        }
    };
    let above_key = format!("{key}.above");
    let kind = match kind_name {
        "error_rate" => {
            let above = match t.above.as_ref().and_then(|v| v.as_f64()) {
                Some(a) if a > 0.0 && a < 1.0 => a,
                Some(a) => {
                    c.err(
                        &above_key,
                        format!("{a} is out of range (a ratio between 0 and 1, e.g. 0.05)"),
                    );
                    0.05
                }
                None => {
                    c.err(&above_key, "required: a ratio between 0 and 1, e.g. 0.05");
                    0.05
                }
            };
            TriggerKind::ErrorRate {
                above,
                over: over(c),
            }
        }
        "p95_latency" => {
            let above = match t.above.as_ref().and_then(|v| v.as_str()) {
                Some(s) => match parse_duration(s) {
                    Ok(d) if !d.is_zero() => d,
                    Ok(_) => {
                        c.err(&above_key, "must be greater than zero");
                        Duration::from_secs(1)
                    }
                    Err(m) => {
                        c.err(&above_key, m);
                        Duration::from_secs(1)
                    }
                },
                None => {
                    c.err(&above_key, "required: a duration such as \"1000ms\"");
                    Duration::from_secs(1)
                }
            };
            TriggerKind::P95Latency {
                above,
                over: over(c),
            }
        }
        "critical_5xx" => {
            let above = match &t.above {
                None => 0,
                Some(v) => match v.as_u64() {
                    Some(n) => n,
                    None => {
                        c.err(&above_key, "must be a whole number of failures (e.g. 0)");
                        0
                    }
                },
            };
            let paths = t.paths.clone().unwrap_or_default();
            if paths.is_empty() {
                c.err(format!("{key}.paths"), "required: at least one path prefix");
            }
            for (i, p) in paths.iter().enumerate() {
                if !p.starts_with('/') {
                    c.err(
                        format!("{key}.paths[{i}]"),
                        format!("invalid path {p:?} (must start with '/')"),
                    );
                }
            }
            TriggerKind::Critical5xx {
                paths,
                above,
                over: over(c),
            }
        }
        "unhealthy" => {
            if t.above.is_some() {
                c.err(&above_key, "not used by kind \"unhealthy\"");
            }
            if t.over.is_some() {
                c.err(&over_key, "not used by kind \"unhealthy\"");
            }
            TriggerKind::Unhealthy
        }
        "prometheus" | "probe" => {
            if t.over.is_some() {
                c.err(
                    &over_key,
                    format!("not used by kind {kind_name:?} (it reads `interval`)"),
                );
            }
            match validate_analysis(c, key, &t, kind_name, false)? {
                VerifyCheck::Prometheus(p) => TriggerKind::Prometheus(p),
                VerifyCheck::Probe(p) => TriggerKind::Probe(p),
            }
        }
        other => {
            c.err(
                format!("{key}.kind"),
                format!(
                    "invalid trigger kind {other:?} (expected error_rate, p95_latency, critical_5xx, unhealthy, prometheus or probe)"
                ),
            );
            return None;
        }
    };
    if !matches!(kind, TriggerKind::Prometheus(_) | TriggerKind::Probe(_)) {
        for (name, set) in analysis_keys(&t) {
            if set {
                c.err(
                    format!("{key}.{name}"),
                    format!("not used by kind {:?}", kind.name()),
                );
            }
        }
    }
    if t.paths.is_some() && !matches!(kind, TriggerKind::Critical5xx { .. }) {
        c.err(
            format!("{key}.paths"),
            format!("not used by kind {:?}", kind.name()),
        );
    }
    Some(TriggerConfig { kind, for_ })
}

/// The keys only `prometheus` and `probe` use, and whether each is set.
fn analysis_keys(t: &RawTrigger) -> [(&'static str, bool); 10] {
    [
        ("query", t.query.is_some()),
        ("below", t.below.is_some()),
        ("interval", t.interval.is_some()),
        ("on_empty", t.on_empty.is_some()),
        ("on_error", t.on_error.is_some()),
        ("max_errors", t.max_errors.is_some()),
        ("path", t.path.is_some()),
        ("url", t.url.is_some()),
        ("json_pointer", t.json_pointer.is_some()),
        ("equals", t.equals.is_some()),
    ]
}

/// The placeholders a query template may use.
pub const QUERY_PLACEHOLDERS: &[&str] = &["service", "color", "upstreams", "upstream_hosts"];
/// The placeholders a probe `url` may use.
pub const URL_PLACEHOLDERS: &[&str] = &["service", "color"];

/// Every `{{name}}` in `template` must be one of `known`; returns one message per problem.
pub fn placeholder_errors(template: &str, known: &[&str]) -> Vec<String> {
    let mut errors = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            errors.push(format!("unclosed placeholder \"{{{{\" in {template:?}"));
            break;
        };
        let name = after[..end].trim();
        if !known.contains(&name) {
            let list: Vec<String> = known.iter().map(|k| format!("{{{{{k}}}}}")).collect();
            errors.push(format!(
                "unknown placeholder {{{{{name}}}}} (known: {})",
                list.join(", ")
            ));
        }
        rest = &after[end + 2..];
    }
    errors
}

/// The keys of a `prometheus` or `probe` trigger (`verify` false) or verify check.
fn validate_analysis(
    c: &mut Check,
    key: &str,
    t: &RawTrigger,
    kind: &str,
    verify: bool,
) -> Option<VerifyCheck> {
    let k = |name: &str| format!("{key}.{name}");
    let number = |c: &mut Check, name: &str, v: &Option<serde_json::Value>| -> Option<f64> {
        let v = v.as_ref()?;
        match v.as_f64() {
            Some(n) if n.is_finite() => Some(n),
            _ => {
                c.err(k(name), format!("must be a number, not {v}"));
                None
            }
        }
    };
    let above = number(c, "above", &t.above);
    let below = number(c, "below", &t.below);
    let bound = match (above, below) {
        (Some(a), None) => Some(Bound::Above(a)),
        (None, Some(b)) => Some(Bound::Below(b)),
        (Some(_), Some(_)) => {
            c.err(k("below"), "set either `above` or `below`, not both");
            None
        }
        (None, None) => None,
    };
    let interval = c.duration(
        &k("interval"),
        t.interval.as_deref(),
        Duration::from_secs(15),
    );
    if interval < Duration::from_millis(100) {
        c.err(k("interval"), "must be at least 100ms");
    }
    let on_error = match t.on_error.as_deref() {
        None | Some("hold") => OnError::Hold,
        Some("fail") => OnError::Fail,
        Some(o) => {
            c.err(
                k("on_error"),
                format!("invalid value {o:?} (expected \"hold\" or \"fail\")"),
            );
            OnError::Hold
        }
    };
    let max_errors = c.count(&k("max_errors"), t.max_errors, 3, 1, 1000) as u32;
    match kind {
        "prometheus" => {
            for (name, set) in [
                ("path", t.path.is_some()),
                ("url", t.url.is_some()),
                ("json_pointer", t.json_pointer.is_some()),
                ("equals", t.equals.is_some()),
                ("above_fraction", t.above_fraction.is_some()),
            ] {
                if set {
                    c.err(k(name), "not used by kind \"prometheus\"");
                }
            }
            let query = match t.query.as_deref().map(str::trim) {
                Some(q) if !q.is_empty() => q.to_string(),
                _ => {
                    c.err(
                        k("query"),
                        "required: a PromQL query, e.g. 'sum(rate(app_db_errors_total{color=\"{{color}}\"}[1m]))'",
                    );
                    String::new()
                }
            };
            for m in placeholder_errors(&query, QUERY_PLACEHOLDERS) {
                c.err(k("query"), m);
            }
            if bound.is_none() && above.is_none() && below.is_none() {
                c.err(k("above"), "required: `above` or `below` (a number)");
            }
            let on_empty = match t.on_empty.as_deref() {
                None | Some("insufficient_data") => OnEmpty::InsufficientData,
                Some("fail") => OnEmpty::Fail,
                Some(o) => {
                    c.err(
                        k("on_empty"),
                        format!("invalid value {o:?} (expected \"insufficient_data\" or \"fail\")"),
                    );
                    OnEmpty::InsufficientData
                }
            };
            Some(VerifyCheck::Prometheus(PromCheck {
                query,
                bound: bound.unwrap_or(Bound::Above(0.0)),
                interval,
                on_empty,
                on_error,
                max_errors,
            }))
        }
        _ => {
            if t.query.is_some() {
                c.err(k("query"), "not used by kind \"probe\"");
            }
            if t.on_empty.is_some() && !verify {
                c.err(k("on_empty"), "not used by kind \"probe\"");
            }
            let target = match (&t.path, &t.url) {
                (Some(p), None) => {
                    if !p.starts_with('/') {
                        c.err(
                            k("path"),
                            format!("invalid path {p:?} (must start with '/')"),
                        );
                    }
                    ProbeTarget::Path(p.clone())
                }
                (None, Some(u)) => {
                    let errs = placeholder_errors(u, URL_PLACEHOLDERS);
                    let bare = u.replace("{{service}}", "s").replace("{{color}}", "blue");
                    let ok = bare.parse::<http::Uri>().ok().filter(|x| {
                        matches!(x.scheme_str(), Some("http") | Some("https"))
                            && x.authority().is_some()
                    });
                    if errs.is_empty() && ok.is_none() {
                        c.err(
                            k("url"),
                            format!(
                                "invalid URL {u:?} (expected http://host:port/path or https://...)"
                            ),
                        );
                    }
                    for m in errs {
                        c.err(k("url"), m);
                    }
                    ProbeTarget::Url(u.clone())
                }
                (Some(_), Some(_)) => {
                    c.err(k("url"), "set either `path` or `url`, not both");
                    return None;
                }
                (None, None) => {
                    c.err(
                        k("path"),
                        "required: `path` (GET on every upstream of the color) or `url`",
                    );
                    return None;
                }
            };
            let condition = match (&t.json_pointer, &t.equals, bound) {
                (None, None, None) => ProbeCondition::Status,
                (None, _, _) => {
                    c.err(
                        k("json_pointer"),
                        "required with `equals`, `above` or `below` (e.g. \"/checks/database\")",
                    );
                    ProbeCondition::Status
                }
                (Some(p), eq, b) => {
                    if !(p.is_empty() || p.starts_with('/')) {
                        c.err(
                            k("json_pointer"),
                            format!("invalid JSON pointer {p:?} (must start with '/', e.g. \"/database\")"),
                        );
                    }
                    match (eq, b) {
                        (Some(v), None) => ProbeCondition::Equals(v.clone()),
                        (None, Some(b)) => ProbeCondition::Bound(b),
                        (Some(_), Some(_)) => {
                            c.err(
                                k("equals"),
                                "set either `equals` or `above`/`below`, not both",
                            );
                            ProbeCondition::Status
                        }
                        (None, None) => {
                            c.err(
                                k("equals"),
                                "required with `json_pointer`: `equals`, `above` or `below`",
                            );
                            ProbeCondition::Status
                        }
                    }
                }
            };
            let above_fraction = match &t.above_fraction {
                None => 0.0,
                Some(v) => {
                    match v.as_f64() {
                        Some(f) if (0.0..1.0).contains(&f) => f,
                        _ => {
                            c.err(
                            k("above_fraction"),
                            format!("{v} is out of range (a fraction from 0 up to, not including, 1)"),
                        );
                            0.0
                        }
                    }
                }
            };
            Some(VerifyCheck::Probe(ProbeCheck {
                target,
                json_pointer: t.json_pointer.clone(),
                condition,
                above_fraction,
                interval,
                on_error,
                max_errors,
            }))
        }
    }
}

/// A `[[services.verify]]` check.
fn validate_verify(c: &mut Check, key: &str, v: RawVerify) -> Option<VerifyCheck> {
    let t = RawTrigger {
        kind: v.kind,
        above: v.above,
        over: None,
        for_: None,
        paths: None,
        query: v.query,
        below: v.below,
        interval: None,
        on_empty: None,
        on_error: None,
        max_errors: None,
        path: v.path,
        url: v.url,
        json_pointer: v.json_pointer,
        equals: v.equals,
        above_fraction: v.above_fraction,
    };
    match t.kind.as_deref() {
        Some(kind @ ("prometheus" | "probe")) => validate_analysis(c, key, &t, kind, true),
        Some(other) => {
            c.err(
                format!("{key}.kind"),
                format!("invalid verify kind {other:?} (expected prometheus or probe)"),
            );
            None
        }
        None => {
            c.err(format!("{key}.kind"), "required (prometheus or probe)");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[proxy]
listen = "127.0.0.1:8080"
[admin]
listen = "127.0.0.1:9090"
[[services]]
name = "api"
path_prefix = "/api"
blue = { upstreams = ["127.0.0.1:3001"] }
green = { upstreams = ["127.0.0.1:3011"] }
[services.rollback]
[[services.rollback.triggers]]
kind = "error_rate"
above = 0.05
over = "1m"
for = "2m"
[[services.rollback.triggers]]
kind = "p95_latency"
above = "1000ms"
[[services.rollback.triggers]]
kind = "critical_5xx"
paths = ["/api/payments"]
above = 0
over = "30s"
[[services.rollback.triggers]]
kind = "unhealthy"
for = "10s"
"#;

    fn env() -> Option<std::collections::HashMap<String, String>> {
        Some(Default::default())
    }

    fn errors(text: &str) -> Vec<String> {
        match from_toml_str_with_env(text, env()) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn good_config_validates() {
        let c = from_toml_str_with_env(GOOD, env()).expect("valid");
        assert_eq!(c.services.len(), 1);
        assert_eq!(c.services[0].rollback.triggers.len(), 4);
        assert_eq!(
            c.services[0].rollback.triggers[0].for_,
            Duration::from_secs(120)
        );
        assert!(c.summary().contains("api"));
    }

    #[test]
    fn every_unknown_key_is_reported() {
        let text = GOOD.replace("[admin]", "[admin]\nbogus = 1\n").replace(
            "kind = \"unhealthy\"",
            "kind = \"unhealthy\"\nwhatever = true",
        );
        let errs = errors(&text);
        assert!(
            errs.iter().any(|e| e.starts_with("admin.bogus")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("services[0].rollback.triggers[3].whatever")),
            "{errs:?}"
        );
    }

    #[test]
    fn semantic_errors_all_named() {
        let text = GOOD
            .replace("127.0.0.1:3011", "x:y")
            .replace("\"2m\"", "\"2 parsecs\"")
            .replace("kind = \"unhealthy\"", "kind = \"sad\"")
            .replace(
                "path_prefix = \"/api\"",
                "path_prefix = \"/api\"\nactive = \"red\"",
            );
        let errs = errors(&text);
        let want = [
            "services[0].green.upstreams[0]: invalid address \"x:y\"",
            "services[0].rollback.triggers[0].for: invalid duration",
            "services[0].rollback.triggers[3].kind: invalid trigger kind",
            "services[0].active: invalid color",
        ];
        for w in want {
            assert!(
                errs.iter().any(|e| e.starts_with(w)),
                "missing {w}: {errs:?}"
            );
        }
    }

    #[test]
    fn shadowed_service_and_duplicates() {
        let text = r#"
[[services]]
name = "all"
blue = { upstreams = ["127.0.0.1:1"] }
green = { upstreams = ["127.0.0.1:2"] }
[[services]]
name = "all"
path_prefix = "/x"
blue = { upstreams = [] }
green = { upstreams = ["127.0.0.1:2"] }
"#;
        let errs = errors(text);
        assert!(
            errs.iter().any(|e| e.contains("duplicate service name")),
            "{errs:?}"
        );
        assert!(
            errs.iter().any(|e| e.contains("can never match")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("services[1].blue.upstreams")),
            "{errs:?}"
        );
    }

    #[test]
    fn env_overrides() {
        let mut env = std::collections::HashMap::new();
        env.insert(
            "SWITCHYARD__PROXY__LISTEN".to_string(),
            "127.0.0.1:7000".to_string(),
        );
        env.insert("SWITCHYARD__PROXY__WORKERS".to_string(), "3".to_string());
        let c = from_toml_str_with_env(GOOD, Some(env)).expect("valid");
        assert_eq!(c.proxy.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(c.proxy.workers, Some(3));
    }

    #[test]
    fn analysis_keys_validate() {
        let base = r#"
[[services]]
name = "api"
blue = { upstreams = ["127.0.0.1:3001"] }
green = { upstreams = ["127.0.0.1:3011"] }
"#;
        let good = format!(
            "[analysis]\nprometheus_url = \"https://prom.example:9090/prefix\"\nprometheus_token_env = \"PROM_TOKEN\"\n{base}{}",
            r#"
[[services.verify]]
kind = "probe"
url = "http://checks.internal/{{service}}/{{color}}"
[[services.verify]]
kind = "prometheus"
query = 'max(x{instance=~"{{ upstreams }}"})'
below = 1
[services.rollback]
[[services.rollback.triggers]]
kind = "prometheus"
query = 'sum(rate(app_db_errors_total{service="{{service}}",color="{{color}}"}[1m]))'
above = 0.5
for = "1m"
on_empty = "fail"
on_error = "fail"
max_errors = 5
[[services.rollback.triggers]]
kind = "probe"
path = "/health/deps"
json_pointer = "/pool"
above = 0.9
above_fraction = 0.25
interval = "5s"
"#
        );
        let c = from_toml_str_with_env(&good, env()).unwrap_or_else(|e| panic!("{e}"));
        let t = &c.services[0].rollback.triggers;
        match &t[0].kind {
            TriggerKind::Prometheus(p) => {
                assert_eq!(p.bound, Bound::Above(0.5));
                assert_eq!(p.interval, Duration::from_secs(15));
                assert_eq!(p.on_empty, OnEmpty::Fail);
                assert_eq!(p.on_error, OnError::Fail);
                assert_eq!(p.max_errors, 5);
            }
            k => panic!("{k:?}"),
        }
        match &t[1].kind {
            TriggerKind::Probe(p) => {
                assert_eq!(p.condition, ProbeCondition::Bound(Bound::Above(0.9)));
                assert_eq!(p.above_fraction, 0.25);
                assert_eq!(p.max_errors, 3);
                assert_eq!(p.on_error, OnError::Hold);
            }
            k => panic!("{k:?}"),
        }
        assert_eq!(c.services[0].verify.len(), 2);
        assert_eq!(c.analysis.timeout, Duration::from_secs(5));
        assert!(c.summary().contains("verify probe"), "{}", c.summary());

        let bad = format!(
            "{base}{}",
            r#"
[[services.verify]]
kind = "prometheus"
query = "up"
above = 1
for = "1m"
[[services.verify]]
kind = "probe"
path = "/x"
equals = "ok"
[services.rollback]
[[services.rollback.triggers]]
kind = "prometheus"
query = "up{x=\"{{upstream}}\"}"
above = 1
below = 2
on_error = "ignore"
on_empty = "pass"
[[services.rollback.triggers]]
kind = "probe"
path = "/x"
url = "http://a/b"
[[services.rollback.triggers]]
kind = "error_rate"
above = 0.1
query = "up"
[[services.rollback.triggers]]
kind = "probe"
url = "ftp://x/{{color}}"
above_fraction = 1
"#
        );
        let errs = errors(&bad);
        for want in [
            "services[0].rollback.triggers[0]: kind \"prometheus\" needs [analysis] prometheus_url",
            "services[0].verify[0].for: unknown key",
            "services[0].verify[1].json_pointer: required with `equals`",
            "services[0].rollback.triggers[0].query: unknown placeholder {{upstream}}",
            "services[0].rollback.triggers[0].below: set either `above` or `below`",
            "services[0].rollback.triggers[0].on_error: invalid value \"ignore\"",
            "services[0].rollback.triggers[0].on_empty: invalid value \"pass\"",
            "services[0].rollback.triggers[1].url: set either `path` or `url`",
            "services[0].rollback.triggers[2].query: not used by kind \"error_rate\"",
            "services[0].rollback.triggers[3].url: invalid URL",
            "services[0].rollback.triggers[3].above_fraction: 1 is out of range",
        ] {
            assert!(
                errs.iter().any(|e| e.starts_with(want)),
                "missing {want}: {errs:#?}"
            );
        }
        assert!(placeholder_errors("a{{b", QUERY_PLACEHOLDERS)[0].starts_with("unclosed"));
    }

    #[test]
    fn host_patterns() {
        assert!(host_pattern_matches("*.example.com", "a.example.com"));
        assert!(!host_pattern_matches("*.example.com", "example.com"));
        assert!(!host_pattern_matches("*.example.com", "aexample.com"));
        assert!(host_pattern_matches("api.x", "api.x"));
    }
}
