//! The validated config the proxy runs on: every value parsed, defaulted and checked.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
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
    /// How `workers` threads share the work (extension; BENCHMARKS.md "Scaling run").
    pub runtime: RuntimeFlavor,
    /// Whether the config names `runtime`: an upgrade from a process that ran `shared` keeps
    /// `shared` when it does not (the default changed to `per_worker`; its one plain socket
    /// cannot be shared with the other workers' `SO_REUSEPORT` sockets).
    pub runtime_set: bool,
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
    /// Requests carry `Via` to their upstream (RFC 9110 7.6.3).
    pub via: bool,
    /// Other upstreams of the same color a request may go to when its upstream could not take
    /// it (connect failure; a reset before any answer, for idempotent bodiless requests).
    pub retries: u32,
    /// Passive ejection (`eject_after`, `eject_for`).
    pub passive: PassiveConfig,
    /// How often upstream names are resolved again (README "Upstreams by name").
    pub resolve_interval: Duration,
    /// Resolve names from this hosts-format file instead of the system resolver (tests, and
    /// setups that keep their own name list).
    pub resolve_hosts_file: Option<PathBuf>,
    /// The Unix socket `serve --upgrade` takes the listeners over (README "Upgrading").
    pub upgrade_socket: PathBuf,
    /// How long a running process waits, after handing its sockets to `serve --upgrade`, for
    /// the new one to say it serves; it keeps serving (and the new one exits) past it.
    pub upgrade_timeout: Duration,
}

/// `proxy.eject_after` and `proxy.eject_for`: passive ejection (`crate::passive`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassiveConfig {
    /// Consecutive failures that eject an upstream; 0 turns passive ejection off.
    pub eject_after: u32,
    pub eject_for: Duration,
}

impl Default for PassiveConfig {
    fn default() -> Self {
        PassiveConfig {
            eject_after: 5,
            eject_for: Duration::from_secs(10),
        }
    }
}

/// `[log]`: the access log (README "Access log").
#[derive(Clone, Debug, PartialEq)]
pub struct LogConfig {
    pub access: AccessTarget,
    pub access_format: AccessFormat,
    /// Lines queued for the writer thread; past it lines are dropped and counted.
    pub access_buffer: usize,
    /// `X-Request-Id` kept or generated, sent upstream and returned (the access log's lines
    /// carry it whatever this says).
    pub request_id: bool,
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

/// `per_worker` (the default): one current-thread runtime per worker, each accepting on its
/// own `SO_REUSEPORT` sockets of `proxy.listen` and `proxy.tls_listen`, so a connection stays
/// on one thread for its life (12–36% more requests per second than `shared` from 2 to 8
/// workers, BENCHMARKS.md "Scaling run"). `shared`: one multi-thread runtime with `workers`
/// threads, whose work-stealing evens out uneven connections. One worker: a current-thread
/// runtime either way.
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
    /// every second (`crate::config_watch`).
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
    /// `http://` or `https://` URLs.
    pub webhooks: Vec<String>,
    pub timeout: Duration,
    pub max_attempts: u32,
    pub queue_size: usize,
    /// PEM CAs trusted for `https://` webhooks; None: the system bundle.
    pub ca_file: Option<PathBuf>,
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
    /// to, in file order (`crate::resolve` fills in the names' part).
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

impl RollbackConfig {
    /// Whether a trigger can roll the service back at all (on, with a trigger; `dry_run`
    /// counts: its triggers are evaluated and said).
    pub fn watches(&self) -> bool {
        self.enabled && !self.triggers.is_empty()
    }

    /// Whether a trigger can roll the service back, and so a release with it (`dry_run` only
    /// says what it would do).
    pub fn acts(&self) -> bool {
        self.watches() && !self.dry_run
    }
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
}
