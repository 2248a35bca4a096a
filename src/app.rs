//! The application state shared by the listeners, and the one serialized writer that changes it.
//!
//! Readers (every request) only `load` the routing snapshot. Flips, rollbacks, pause/resume and
//! reloads take the writer lock, build the complete new snapshot, persist the live state, and
//! publish with a single `store`; on any error nothing is published.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;

use crate::config::{self, Color, Config};
use crate::events::{now_rfc3339, Event, EventLog, Reason};
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::routing::{build_snapshot, Service, Snapshot};
use crate::state::etcd::{WriteBack, WriteOutcome};
use crate::state::{ServiceState, StateError, StateStore};
use crate::stats::Clock;
use crate::upstream::Clients;

/// Trigger states per service for `/api/status`, published by the rollback watcher.
pub type WatchStatus = HashMap<String, WatchReport>;

#[derive(Clone, Debug, Default)]
pub struct WatchReport {
    pub generation: u64,
    pub triggers: Vec<serde_json::Value>,
    pub blocked: bool,
}

/// [`App::set_file_checks`]: the problems in the files `config` (read from the path) names.
pub type FileChecks = fn(&std::path::Path, &Config) -> Vec<config::ConfigError>;

pub struct App {
    /// Published here, read by the proxy (which holds the same `Arc`).
    pub routes: Arc<ArcSwap<Snapshot>>,
    pub clock: Clock,
    pub metrics: Arc<Metrics>,
    pub clients: Clients,
    pub events: EventLog,
    pub watch: ArcSwap<WatchStatus>,
    /// The admin bearer token, read once at startup from the variable `token_env` names.
    pub admin_token: Option<String>,
    pub config_path: Option<PathBuf>,
    /// Lock-free on the request path (see `crate::shutdown`).
    pub shutdown: Arc<crate::shutdown::Shutdown>,
    pub started: Instant,
    /// The access log's queue, when `[log] access` is not "off" (set once at startup).
    pub access_log: std::sync::OnceLock<Arc<crate::access_log::AccessLog>>,
    /// The proxy's TLS certificate, re-read on reload.
    tls: std::sync::OnceLock<crate::tls::TlsSetup>,
    /// What `check` and `serve` find in the files a config names (set by the layer that reads
    /// them): a reload refuses what the next start would.
    file_checks: std::sync::OnceLock<FileChecks>,
    /// The admin listener's certificate, reloaded the same way.
    admin_tls: std::sync::OnceLock<crate::tls::TlsSetup>,
    /// The webhooks: their queues follow a reload's `[notify]`.
    notifier: Notifier,
    /// The config this process started with: what its listeners, runtime, state backend
    /// and log were built from. A reload compares the keys that take a restart with
    /// it, not with the last reloaded config, which holds values never applied.
    started_config: Arc<Config>,
    writer: tokio::sync::Mutex<()>,
    /// Set while the listening sockets go to a new process, and for good once it took them
    /// (upgrade): it reads the live state when it takes over, so a change made here from then
    /// on would never reach it ([`App::freeze_changes`]).
    frozen: AtomicBool,
    pub store: StateStore,
    /// Where the live colors being served came from ([`StateSource`]).
    state_source: AtomicU8,
    /// `serve --upgrade` on the file backend: the state is written once the old process said
    /// "go" ([`App::write_after_takeover`]), not at startup.
    write_on_takeover: AtomicBool,
    /// File backend: the states the state file holds for services the running config does not
    /// have (removed by a reload, or only in the file at startup). Every write keeps them in the
    /// file, and a reload that adds such a service back serves its state, as a start would.
    /// Touched only under the writer lock, never on the request path.
    unlisted: std::sync::Mutex<HashMap<String, ServiceState>>,
    /// `prometheus`/`probe` triggers and verify checks (src/analysis.rs).
    pub analysis: crate::analysis::Analysis,
    /// The running release and the last ones (src/release.rs).
    pub releases: crate::release_record::Releases,
}

/// Where the live colors a replica serves came from, as `/api/status` shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateSource {
    /// The file backend's state file.
    File = 0,
    /// etcd, read and watched.
    Etcd = 1,
    /// etcd was unreachable at start: the last state this replica saw from etcd (`[state] path`).
    Cache = 2,
    /// etcd was unreachable at start and there was no cache: the config's `active` colors.
    Config = 3,
}

impl StateSource {
    pub fn as_str(self) -> &'static str {
        match self {
            StateSource::File => "file",
            StateSource::Etcd => "etcd",
            StateSource::Cache => "cache",
            StateSource::Config => "config",
        }
    }

    fn from_u8(v: u8) -> StateSource {
        match v {
            0 => StateSource::File,
            1 => StateSource::Etcd,
            2 => StateSource::Cache,
            _ => StateSource::Config,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("unknown service {0:?}")]
    UnknownService(String),
    /// A refused flip (409).
    #[error("{0}")]
    Refused(String),
    /// Another replica changed the state first: etcd's compare-and-swap was lost, and this
    /// replica now serves what etcd holds (409).
    #[error("{0}")]
    Conflict(String),
    /// The state backend cannot take writes (503).
    #[error("{0}")]
    Unavailable(String),
    /// etcd did not answer whether the change was committed (503); the watch settles it.
    #[error("{0}")]
    Unknown(String),
    #[error("{0}")]
    Internal(String),
}

/// The live state held still while the listening sockets go to a new process
/// ([`App::freeze_changes`]); dropping it lets changes go on (an aborted upgrade).
pub struct Freeze<'a> {
    app: &'a App,
    handed_over: bool,
}

impl Freeze<'_> {
    /// The new process took over: every change from now on is refused here (503).
    pub fn handed_over(mut self) {
        self.handed_over = true;
    }
}

impl Drop for Freeze<'_> {
    fn drop(&mut self) {
        if !self.handed_over {
            self.app.frozen.store(false, Ordering::Release);
        }
    }
}

impl ChangeError {
    /// The same error, its message led by `what` (the kind, hence the status, is kept).
    fn with_prefix(self, what: &str) -> ChangeError {
        match self {
            ChangeError::Unavailable(m) => ChangeError::Unavailable(format!("{what}: {m}")),
            ChangeError::Internal(m) => ChangeError::Internal(format!("{what}: {m}")),
            other => other,
        }
    }
}

impl From<StateError> for ChangeError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::Unavailable(m) => ChangeError::Unavailable(format!(
                "{m}; flips are refused until the state backend is back (traffic keeps flowing on the last known colors)"
            )),
            StateError::Conflict(m) => ChangeError::Conflict(m),
            other => ChangeError::Internal(other.to_string()),
        }
    }
}

/// How a refused check ends its reason for a manual flip; a release, which has no `force`,
/// drops it from its own reason.
pub(crate) const FORCE_HINT: &str = "; pass \"force\": true to flip anyway";

/// Refused when the pool a flip goes to has no healthy upstream.
fn healthy_target(svc: &Service, to: Color) -> Result<(), ChangeError> {
    if svc.pool(to).healthy_count() == 0 {
        return Err(ChangeError::Refused(format!(
            "{}: the {to} pool has no healthy upstream{FORCE_HINT}",
            svc.name()
        )));
    }
    Ok(())
}

/// Whether a service is still what the checks of a flip to `to` ran on.
fn unchanged(checked: &Service, now: &Service, to: Color) -> bool {
    checked.state == now.state && Arc::ptr_eq(checked.pool(to), now.pool(to))
}

/// Whether `state` is what a flip of `kind` to `to` leaves: `to` live, with the latch such a
/// flip sets (a rollback latches the color it leaves) or clears (a manual flip). A flip that
/// lost its compare-and-swap to such a state has nothing left to do; to another state with
/// `to` live (a manual flip that lost to a rollback, whose latch disarms automatic rollback),
/// it was not applied as asked.
fn as_asked(state: &ServiceState, to: Color, kind: FlipKind) -> bool {
    state.active == to
        && match kind {
            FlipKind::Manual => state.failed.is_none(),
            FlipKind::ManualRollback | FlipKind::AutoRollback => state.failed == Some(to.other()),
        }
}

/// "already on": a flip to the live color, which changes nothing (the latch a rollback left
/// included, which the answer mentions).
fn already_on(svc: &Service, to: Color) -> String {
    match svc.state.failed {
        Some(f) if f != to => format!(
            "{} is already on {to} ({f} stays latched as failed by a rollback: automatic rollback is disarmed until a manual flip to {f})",
            svc.name()
        ),
        _ => format!("{} is already on {to}", svc.name()),
    }
}

/// The answer to a flip of `svc` to `to`, the color it is on: no change.
fn nothing_to_do(svc: &Service, to: Color) -> FlipOutcome {
    FlipOutcome {
        service: svc.name().to_string(),
        from: to,
        to,
        generation: svc.state.generation,
        changed: false,
        message: format!("{}; nothing to do", already_on(svc, to)),
    }
}

fn service_of(snap: &Snapshot, name: &str) -> Result<Arc<Service>, ChangeError> {
    snap.service(name)
        .cloned()
        .ok_or_else(|| ChangeError::UnknownService(name.to_string()))
}

/// The answer to one service's flip.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FlipOutcome {
    pub service: String,
    pub from: Color,
    pub to: Color,
    pub generation: u64,
    pub changed: bool,
    pub message: String,
}

#[derive(Debug, serde::Serialize)]
pub struct ReloadOutcome {
    pub services: usize,
    pub restart_required: Vec<String>,
    /// Services the reload kept whose `active` it changed: their live color stays (it changes
    /// only by a flip), so the new `active` is not applied.
    pub active_not_applied: Vec<String>,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(config::ConfigErrors),
    #[error("reload needs a config file; this instance was started without one")]
    NoFile,
}

/// What kind of change a flip is: decides the event reason, the metric label and the latch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlipKind {
    Manual,
    ManualRollback,
    AutoRollback,
}

impl FlipKind {
    fn reason(self) -> Reason {
        match self {
            FlipKind::Manual => Reason::Manual,
            FlipKind::ManualRollback => Reason::Rollback,
            FlipKind::AutoRollback => Reason::AutoRollback,
        }
    }
}

/// Whether the file backend's state file is absent (not merely unreadable: its load says so).
async fn state_file_missing(store: &StateStore) -> bool {
    let Some(path) = store.local_path() else {
        return false;
    };
    matches!(tokio::fs::symlink_metadata(&path).await, Err(e) if e.kind() == std::io::ErrorKind::NotFound)
}

/// With etcd at startup: a service of the config whose key etcd does not hold (deleted, or etcd
/// restored empty) starts from the last state this replica saw from etcd (the cache file), when
/// that had changed from the config's color (generation above 0), rather than from the config;
/// the first full read of the sync loop writes it back if still absent
/// ([`App::restore_absent`]), or serves what another replica wrote back first. Likewise when
/// etcd holds another replica's write-back of a lower generation than the cache's
/// ([`crate::state::etcd::Held::older_write_back`]): the cache's state is served, and the first
/// full read replaces the write-back with it ([`App::apply_states`]).
async fn absent_from_cache(
    etcd: &crate::state::etcd::EtcdStore,
    config: &Config,
    mut states: HashMap<String, ServiceState>,
) -> HashMap<String, ServiceState> {
    let Some(cached) = etcd.load_cache().await else {
        return states;
    };
    let older: Vec<&str> = config
        .services
        .iter()
        .map(|s| s.name.as_str())
        .filter(|n| {
            states
                .get(*n)
                .zip(cached.get(*n))
                .is_some_and(|(s, c)| s.generation < c.generation)
        })
        .collect();
    if !older.is_empty() {
        // The write ids say which are write-backs (a read again: rare, at startup only).
        match etcd.load().await {
            Err(e) => tracing::warn!(
                error = %e,
                services = %older.join(", "),
                "cannot read etcd again to check whether an older generation than the cache file's is a write-back; serving what etcd holds (the next full read checks it)"
            ),
            Ok(loaded) => {
                for name in older {
                    let (Some(s), Some(c)) = (loaded.states.get(name), cached.get(name)) else {
                        continue;
                    };
                    let held = crate::state::etcd::Held {
                        state: s.clone(),
                        mod_revision: 0,
                        write_id: loaded.write_ids.get(name).cloned(),
                    };
                    if held.older_write_back(c) {
                        tracing::warn!(
                            service = %name,
                            active = %c.active,
                            generation = c.generation,
                            held_generation = s.generation,
                            "etcd holds another replica's write-back of the service's key with an older generation than this replica last saw; serving the last state seen from etcd (cache file), which replaces it"
                        );
                        states.insert(name.to_string(), c.clone());
                    }
                }
            }
        }
    }
    let unreadable = etcd.unreadable_names();
    for svc in &config.services {
        if states.contains_key(&svc.name) {
            continue;
        }
        if let Some(c) = cached.get(&svc.name).filter(|c| c.generation > 0) {
            if unreadable.contains(&svc.name) {
                tracing::warn!(
                    service = %svc.name,
                    active = %c.active,
                    generation = c.generation,
                    "etcd holds the service's key with a value that is not a state; serving the last state seen from etcd (cache file); the key is left as it is, not written back (fix or delete it)"
                );
                states.insert(svc.name.clone(), c.clone());
                continue;
            }
            tracing::warn!(
                service = %svc.name,
                active = %c.active,
                generation = c.generation,
                "the service's key is missing from etcd (deleted, or etcd restored empty); serving the last state seen from etcd (cache file), written back to etcd"
            );
            states.insert(svc.name.clone(), c.clone());
        }
    }
    states
}

/// The next try of the write-backs in `pending` (none when empty): after `wait`, then a wait
/// twice as long, up to 30 s.
fn next_retry(pending: &[String], wait: Duration) -> (Duration, Option<tokio::time::Instant>) {
    if pending.is_empty() {
        return (Duration::from_millis(500), None);
    }
    (
        (wait * 2).min(Duration::from_secs(30)),
        Some(tokio::time::Instant::now() + wait),
    )
}

/// `serve --upgrade` without a state file: the live state the old process handed over (its
/// services that the config still has). Written back to the file only once this process
/// serves ([`App::write_after_takeover`]): an upgrade the old process aborts meanwhile lets
/// it answer flips again, which an earlier write here would have erased from the file.
fn restore_handed(
    store: &StateStore,
    config: &Config,
    mut handed: HashMap<String, ServiceState>,
) -> HashMap<String, ServiceState> {
    handed.retain(|name, _| config.services.iter().any(|s| &s.name == name));
    let path = store.local_path().unwrap_or_default();
    tracing::warn!(path = %path.display(), "the state file is missing: serving the live state the old process handed over (not the config's colors), written back to it once this process serves");
    handed
}

/// File backend at startup: every service of the config the state file does not hold yet is
/// written to it, at the color served (the one the old process handed over in an upgrade, else
/// the config's `active`), so the next start serves the same color ("the file wins") whatever
/// the config's `active` says by then: a live color changes only by a flip. The file is written
/// at every start (the same states when it held them all), through the path every flip takes:
/// a path that will never take it (a file bind-mounted on its own, [`StateError::Unreplaceable`])
/// stops startup, as each flip and automatic rollback would fail; any other failed write (a
/// full disk, a permission) is logged and the colors are served all the same (the next change
/// writes the file). Returns the states to serve and those the file holds for services the
/// config does not have.
async fn persist_unstored(
    store: &StateStore,
    config: &Config,
    mut states: HashMap<String, ServiceState>,
    handed: Option<HashMap<String, ServiceState>>,
) -> Result<(HashMap<String, ServiceState>, HashMap<String, ServiceState>), StateError> {
    let unlisted: HashMap<String, ServiceState> = states
        .iter()
        .filter(|(n, _)| !config.services.iter().any(|s| &s.name == *n))
        .map(|(n, s)| (n.clone(), s.clone()))
        .collect();
    let mut missing = Vec::new();
    for svc in &config.services {
        if states.contains_key(&svc.name) {
            continue;
        }
        let state = handed
            .as_ref()
            .and_then(|h| h.get(&svc.name).cloned())
            .unwrap_or_else(|| ServiceState::initial(svc.active));
        states.insert(svc.name.clone(), state);
        missing.push(svc.name.clone());
    }
    // In an upgrade nothing is written before the old process says "go": one that aborts
    // serves on and answers flips, which this write, made from the states read now, would
    // erase from the file. [`App::write_after_takeover`] writes then.
    if handed.is_none() {
        let path = store.local_path().unwrap_or_default();
        match store.save(&states, &HashMap::new(), &missing).await {
            Ok(()) if missing.is_empty() => {}
            Ok(()) => {
                tracing::info!(path = %path.display(), services = %missing.join(", "), "services the state file did not hold yet are written to it at the color served")
            }
            Err(e @ StateError::Unreplaceable { .. }) => return Err(e),
            Err(e) if missing.is_empty() => {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the state file at startup; serving the colors it holds (the next change writes it, and fails the same way unless this is fixed)")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), services = %missing.join(", "), error = %e, "cannot write the services the state file does not hold yet; serving them at the config's colors (the next change writes the file)")
            }
        }
    }
    Ok((states, unlisted))
}

impl App {
    /// Builds the app from a validated config: the stored state wins over the config's `active`.
    pub async fn new(
        config: Config,
        config_path: Option<PathBuf>,
        store: StateStore,
        admin_token: Option<String>,
    ) -> Result<Arc<App>, StateError> {
        App::new_handed(config, config_path, store, admin_token, None).await
    }

    /// As [`App::new`] in a process taking over from a running one (`serve --upgrade`):
    /// `handed` is the live state the old process served when it handed over. With the file
    /// backend and no state file (deleted, or `[state] path` changed while the old process
    /// ran), this one starts from it rather than from the config's colors, and writes it back.
    pub async fn new_handed(
        config: Config,
        config_path: Option<PathBuf>,
        store: StateStore,
        admin_token: Option<String>,
        handed: Option<HashMap<String, ServiceState>>,
    ) -> Result<Arc<App>, StateError> {
        // A crash between a temp file's write and its rename leaves it behind.
        if let Some(path) = store.local_path() {
            let _ =
                tokio::task::spawn_blocking(move || crate::state::remove_stale_temps(&path)).await;
        }
        let (states, source) = match store.load().await {
            Ok(s) => {
                if let Some(etcd) = store.as_etcd() {
                    let s = absent_from_cache(etcd, &config, s).await;
                    etcd.save_cache(s.clone()).await;
                    (s, StateSource::Etcd)
                } else {
                    match handed.clone() {
                        Some(h) if s.is_empty() && state_file_missing(&store).await => {
                            (restore_handed(&store, &config, h), StateSource::File)
                        }
                        _ => (s, StateSource::File),
                    }
                }
            }
            // A replica that starts while etcd is down serves the last state it saw from etcd
            // (the cache file), else the config's colors, and resyncs as soon as etcd answers;
            // a file store must be readable.
            Err(StateError::Unavailable(e)) if store.as_etcd().is_some() => match store.as_etcd() {
                Some(etcd) => match etcd.load_cache().await {
                    Some(cached) => {
                        tracing::warn!(error = %e, "etcd unreachable at startup: serving the last state seen from etcd (cache file) until it answers");
                        (cached, StateSource::Cache)
                    }
                    None => {
                        tracing::warn!(error = %e, "etcd unreachable at startup and no cache: serving the config's colors until it answers");
                        (HashMap::new(), StateSource::Config)
                    }
                },
                None => (HashMap::new(), StateSource::Config),
            },
            Err(e) => return Err(e),
        };
        let metrics = Arc::new(Metrics::new());
        let analysis = crate::analysis::Analysis::new(
            &metrics.registry,
            metrics
                .task_restarts_total
                .with_label_values(&["analysis_trigger"]),
        );
        let releases = crate::release_record::Releases::new(&metrics.registry);
        let notifier = Notifier::start(&config.notify, metrics.webhook_failures_total.clone());
        let sink = Some(Box::new(notifier.clone()) as Box<dyn crate::events::EventSink>);
        // Reading the audit log's tail is file I/O: keep it off the runtime's threads.
        let audit = store.audit_path();
        let max_bytes = config.state.events_max_bytes;
        let stored = (source == StateSource::File).then(|| states.clone());
        let events = match tokio::task::spawn_blocking(move || {
            EventLog::open(audit, sink, max_bytes, stored.as_ref())
        })
        .await
        {
            Ok(ev) => ev,
            Err(e) => {
                return Err(StateError::Corrupt {
                    path: store.audit_path().unwrap_or_default(),
                    reason: format!("cannot read the audit log: {e}"),
                })
            }
        };
        let handed_file = source == StateSource::File && handed.is_some();
        let (states, unlisted) = match source {
            StateSource::File => persist_unstored(&store, &config, states, handed).await?,
            _ => (states, HashMap::new()),
        };
        let clients = Clients::new(&config.proxy);
        for svc in &config.services {
            metrics.init_service(&svc.name);
        }
        let config = Arc::new(config);
        let started_config = config.clone();
        let snapshot = build_snapshot(config, &states, None, &metrics);
        snapshot.mark_live();
        Ok(Arc::new(App {
            routes: Arc::new(ArcSwap::from_pointee(snapshot)),
            clock: Clock::new(),
            metrics,
            clients,
            events,
            watch: ArcSwap::from_pointee(HashMap::new()),
            admin_token: admin_token.filter(|t| !t.is_empty()),
            config_path,
            shutdown: Arc::new(crate::shutdown::Shutdown::new()),
            started: Instant::now(),
            access_log: std::sync::OnceLock::new(),
            tls: std::sync::OnceLock::new(),
            file_checks: std::sync::OnceLock::new(),
            admin_tls: std::sync::OnceLock::new(),
            notifier,
            started_config,
            writer: tokio::sync::Mutex::new(()),
            frozen: AtomicBool::new(false),
            store,
            state_source: AtomicU8::new(source as u8),
            write_on_takeover: AtomicBool::new(handed_file),
            unlisted: std::sync::Mutex::new(unlisted),
            analysis,
            releases,
        }))
    }

    /// Upgrade: waits for a change in progress to finish (the writer lock), then refuses every
    /// change (503) until the [`Freeze`] is dropped (the upgrade aborted), or for good once
    /// [`Freeze::handed_over`]: the new process reads the live state while this holds, and a
    /// change answered here after that read would never be served there. Changes are refused
    /// rather than held: the new process may take long to say it serves.
    pub async fn freeze_changes(&self) -> Freeze<'_> {
        let _w = self.writer.lock().await;
        self.frozen.store(true, Ordering::Release);
        Freeze {
            app: self,
            handed_over: false,
        }
    }

    /// Records an event locally (ring, audit file, webhooks) and, with etcd, for every replica.
    pub async fn record(&self, ev: Event) {
        if let Some(etcd) = self.store.as_etcd() {
            let etcd = etcd.clone();
            let shared = ev.clone();
            // Stored in the order recorded (two of one millisecond listed as they happened).
            let ticket = etcd.event_ticket();
            tokio::spawn(async move {
                if let Err(e) = etcd.put_event_in_order(ticket, &shared).await {
                    tracing::warn!(error = %e, "cannot store the event in etcd; it is kept locally");
                }
            });
        }
        self.events.record(ev).await;
    }

    /// Records an event that must be in etcd once, whichever replica records it (a release's
    /// completion, which the replica that completed it and one that took it over may both
    /// record): `once` names it (`EtcdStore::put_event_once_in_order`). True when it is in etcd
    /// now (stored by this call or before it) or there is no etcd; false when etcd did not
    /// answer (kept locally with `keep`, which a caller trying again sets on its first try
    /// only; its mark in etcd stays, for a replica to record it later).
    pub async fn record_once(&self, ev: Event, once: &str, keep: bool) -> bool {
        let Some(etcd) = self.store.as_etcd() else {
            self.events.record(ev).await;
            return true;
        };
        let ticket = etcd.event_ticket();
        match etcd.put_event_once_in_order(ticket, &ev, once).await {
            Ok(true) => {
                self.events.record(ev).await;
                true
            }
            Ok(false) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot store the event in etcd");
                if keep {
                    self.events.record(ev).await;
                }
                false
            }
        }
    }

    /// The audit log, newest last: every replica's with etcd (this replica's if etcd is down).
    pub async fn events_list(&self) -> Vec<Event> {
        if let Some(etcd) = self.store.as_etcd() {
            match etcd.events(crate::events::RING_CAPACITY).await {
                Ok(evs) => return evs,
                Err(e) => {
                    tracing::debug!(error = %e, "etcd events unavailable; answering local ones")
                }
            }
        }
        self.events.list()
    }

    /// Applies what the etcd backend delivers (`crate::state::etcd::sync`), in order, until
    /// the channel closes.
    pub async fn follow_remote(
        &self,
        mut from_etcd: tokio::sync::mpsc::UnboundedReceiver<crate::state::etcd::Remote>,
    ) {
        use crate::state::etcd::Remote;
        // Write-backs etcd refused or did not answer: tried again on a growing wait, since a
        // healthy watch brings no full read that would try them.
        let mut pending: Vec<String> = Vec::new();
        let mut retry = (Duration::from_millis(500), None::<tokio::time::Instant>);
        loop {
            let msg = match retry.1 {
                Some(at) => tokio::select! {
                    m = from_etcd.recv() => m,
                    _ = tokio::time::sleep_until(at) => {
                        let names = std::mem::take(&mut pending);
                        pending = self.restore_absent(names).await;
                        retry = next_retry(&pending, retry.0);
                        continue;
                    }
                },
                None => from_etcd.recv().await,
            };
            let Some(msg) = msg else {
                return;
            };
            match msg {
                Remote::Synced(states, unreadable) => {
                    self.set_state_source(StateSource::Etcd);
                    // A key etcd holds with an unreadable value is not missing: a create would
                    // fail on every try. It is left as it is (the store WARNed), served as before.
                    let absent: Vec<String> = self
                        .snapshot()
                        .services
                        .iter()
                        .map(|s| s.name().to_string())
                        .filter(|n| !states.contains_key(n) && !unreadable.contains(n))
                        .collect();
                    // An older write-back that could not be replaced is tried again on the
                    // retry timer (a create on the present key replaces it): a healthy watch
                    // brings no other full read.
                    let failed = self.apply_remote(states).await;
                    pending = self.restore_absent(absent).await;
                    for n in failed {
                        if !pending.contains(&n) {
                            pending.push(n);
                        }
                    }
                    retry = next_retry(&pending, Duration::from_millis(250));
                }
                Remote::Changed(mut states) => {
                    // A pending key written since (by another replica's write-back, maybe of
                    // an older generation): tried now, so that the highest generation still
                    // wins (the create finds the key and replaces an older write-back) before
                    // the change is applied. One whose write failed again is not applied: this
                    // replica keeps serving its own state until the retry settles it.
                    let now: Vec<String> = pending
                        .iter()
                        .filter(|n| states.contains_key(*n))
                        .cloned()
                        .collect();
                    pending.retain(|n| !states.contains_key(n));
                    if !now.is_empty() {
                        for n in self.restore_absent(now).await {
                            states.remove(&n);
                            pending.push(n);
                        }
                    }
                    for n in self.apply_remote(states).await {
                        if !pending.contains(&n) {
                            pending.push(n);
                        }
                    }
                    if pending.is_empty() {
                        retry = (Duration::from_millis(500), None);
                    } else if retry.1.is_none() {
                        retry = next_retry(&pending, Duration::from_millis(250));
                    }
                }
                Remote::Absent(names) => {
                    let failed = self.restore_absent(names).await;
                    if !failed.is_empty() {
                        for n in failed {
                            if !pending.contains(&n) {
                                pending.push(n);
                            }
                        }
                        if retry.1.is_none() {
                            retry = next_retry(&pending, Duration::from_millis(250));
                        }
                    }
                }
                Remote::Resolved(events) => self.record_resolved(events).await,
            }
        }
    }

    /// Service keys etcd does not hold (deleted by hand, etcd restored or rebuilt empty): each is
    /// written back from the state this replica serves, only if still absent (one create-if-absent
    /// transaction); when another replica wrote it back first, what it wrote is served, unless it
    /// is a write-back of a lower generation, which is replaced with ours. So every
    /// replica converges on one state, and one started later reads it. A state of generation 0
    /// (the config's color, never changed: a service etcd has never held) is written too, so
    /// that the first replica's color is the fleet's: a replica started later with another
    /// `active` in its config (a rolling config change) serves what etcd holds, as the file
    /// backend serves what its file holds. Returns those that could not be written (etcd refused or did not answer):
    /// [`App::follow_remote`] tries them again on a growing wait, and at the next full read.
    async fn restore_absent(&self, names: Vec<String>) -> Vec<String> {
        let mut failed = Vec::new();
        let Some(etcd) = self.store.as_etcd() else {
            return failed;
        };
        if names.is_empty() {
            return failed;
        }
        let _w = self.writer.lock().await;
        let snap = self.snapshot();
        let mut held = HashMap::new();
        for name in names {
            let Some(svc) = snap.service(&name) else {
                continue;
            };
            match etcd.create_if_absent(&name, &svc.state).await {
                Ok(WriteBack::Unreadable) => tracing::warn!(
                    service = %name,
                    "the service's key was written meanwhile with a value that is not a state; left as it is, not written back (fix or delete it); this replica keeps serving its state"
                ),
                Ok(WriteBack::Written) if svc.state.generation == 0 => tracing::info!(
                    service = %name,
                    active = %svc.state.active,
                    "a service etcd did not hold yet is written to it at the color served"
                ),
                Ok(WriteBack::Written) => tracing::warn!(
                    service = %name,
                    active = %svc.state.active,
                    generation = svc.state.generation,
                    "the service's key is missing from etcd (deleted, or etcd restored empty); written back from the state this replica serves"
                ),
                Ok(WriteBack::Held(state)) => {
                    if state == svc.state {
                        // Replicas starting together: the same state, written by another.
                        tracing::info!(service = %name, active = %state.active, generation = state.generation, "the service's key was written to etcd by another replica first, with the state this one serves");
                    } else {
                        tracing::warn!(
                            service = %name,
                            active = %state.active,
                            generation = state.generation,
                            "the service's key was missing from etcd and another replica wrote it first; serving what etcd holds"
                        );
                    }
                    held.insert(name, state);
                }
                Err(e) => {
                    tracing::warn!(
                        service = %name,
                        error = %e,
                        "the service's key is missing from etcd and cannot be written back; tried again shortly"
                    );
                    failed.push(name);
                }
            }
        }
        if !held.is_empty() {
            for n in self.apply_states(held).await {
                if !failed.contains(&n) {
                    failed.push(n);
                }
            }
        }
        failed
    }

    /// Applies live states written by another replica (etcd watch). Newer generations win;
    /// nothing is persisted (they already are). Returns the services whose older write-back
    /// could not be replaced ([`App::apply_states`]), for [`App::follow_remote`] to try again.
    pub async fn apply_remote(&self, remote: HashMap<String, ServiceState>) -> Vec<String> {
        let _w = self.writer.lock().await;
        self.apply_states(remote).await
    }

    /// With etcd, what etcd holds now: read before answering that a change is not needed. A
    /// replica whose watch stalled (or whose etcd is gone) may still show a color the fleet
    /// left, and "already on green" from it would drop the operator's flip while the fleet
    /// stays blue. The caller applies the read and decides again on it; without an answer the
    /// request is refused as any write is. `None` with the file backend.
    async fn read_etcd(&self) -> Result<Option<HashMap<String, ServiceState>>, ChangeError> {
        let Some(etcd) = self.store.as_etcd() else {
            return Ok(None);
        };
        let read = etcd.read_current().await.map_err(|e| {
            ChangeError::from(e).with_prefix("cannot confirm the live state with etcd")
        })?;
        Ok(Some(read))
    }

    /// Brings this replica's copy of the states up to what etcd holds now (a replica whose
    /// watch or reads are behind, after an outage, before it decides from them). Nothing
    /// without etcd.
    pub async fn catch_up_with_etcd(&self) -> Result<(), ChangeError> {
        if let Some(read) = self.read_etcd().await? {
            let _w = self.writer.lock().await;
            self.apply_read(read).await;
        }
        Ok(())
    }

    /// A read from [`App::read_etcd`], applied under the writer lock already held: each state
    /// as the newest the watch has seen, since the read may be older than an event the watch
    /// applied while it was on its way.
    async fn apply_read(&self, read: HashMap<String, ServiceState>) {
        let read = match self.store.as_etcd() {
            Some(etcd) => etcd.newest_seen(read),
            None => read,
        };
        self.apply_states(read).await;
    }

    /// [`App::apply_remote`] under the writer lock already held.
    ///
    /// A state of a lower generation than this replica serves is normally an old one arriving
    /// late (the watch delivering a write this replica has already gone past), and is skipped.
    /// But etcd may really hold a lower generation: restored from a backup, or written by hand.
    /// Skipping it then would serve a color etcd no longer holds, disagree with every replica
    /// started since, and lose every compare-and-swap (409 forever). So a lower generation is
    /// checked with a fresh read under the writer lock (no write of this replica can race it):
    /// what etcd holds now is applied, whatever its generation, except another replica's
    /// write-back of a missing key ([`crate::state::etcd::Held::older_write_back`]): that is
    /// replaced with the state this replica serves (a compare-and-swap on its mod_revision),
    /// however this replica came to read it (watch, full read after a reconnect, startup), so
    /// a replica that missed a flip cannot undo it by writing back first. If etcd refuses the
    /// replacement, this replica keeps its state (WARN) and the names of those services are
    /// returned: [`App::follow_remote`] tries them again on its retry timer (a healthy watch
    /// brings no full read); other callers leave them to the next full read.
    async fn apply_states(&self, remote: HashMap<String, ServiceState>) -> Vec<String> {
        let mut failed = Vec::new();
        let behind: Vec<String> = self
            .snapshot()
            .services
            .iter()
            .filter(|svc| {
                remote
                    .get(svc.name())
                    .is_some_and(|r| r.generation < svc.state.generation)
            })
            .map(|svc| svc.name().to_string())
            .collect();
        let mut remote = remote;
        let mut held = HashMap::new();
        if !behind.is_empty() {
            if let Some(etcd) = self.store.as_etcd() {
                match etcd.read_current_held().await {
                    Ok(read) => {
                        let mut now = HashMap::new();
                        for (name, h) in read {
                            let (state, replaced) =
                                self.replace_older_write_back(etcd, &name, h).await;
                            if !replaced {
                                failed.push(name.clone());
                            }
                            now.insert(name, state);
                        }
                        for name in behind {
                            if let Some(r) = now.get(&name) {
                                held.insert(name, r.clone());
                            }
                        }
                        remote.extend(now);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read etcd to check a state of an older generation; keeping the colors served")
                    }
                }
            }
        }
        let snap = self.snapshot();
        let mut changed = HashMap::new();
        for svc in &snap.services {
            let Some(r) = remote.get(svc.name()) else {
                continue;
            };
            if *r == svc.state {
                continue;
            }
            if r.generation < svc.state.generation {
                if held.get(svc.name()) != Some(r) {
                    continue;
                }
                tracing::warn!(
                    service = %svc.name(),
                    active = %r.active,
                    generation = r.generation,
                    served_generation = svc.state.generation,
                    "etcd holds an older generation than this replica served (restored from a backup, or written by hand?); serving what etcd holds"
                );
            }
            let flipped_at = if r.generation != svc.state.generation {
                tracing::info!(
                    service = %svc.name(),
                    active = %r.active,
                    generation = r.generation,
                    "live color changed by another replica"
                );
                r.flipped_at()
            } else {
                // The same generation with another color: the fleet's first color of a service
                // this replica served at its own config's (generation 0), written to etcd by
                // another replica first. Traffic moves: said, never silent.
                if r.active != svc.state.active {
                    tracing::warn!(
                        service = %svc.name(),
                        active = %r.active,
                        served = %svc.state.active,
                        generation = r.generation,
                        "etcd holds another color at the generation this replica served (another replica's config wrote it first); serving what etcd holds"
                    );
                }
                svc.flipped_at
            };
            changed.insert(
                svc.name().to_string(),
                Arc::new(svc.with_state(r.clone(), flipped_at)),
            );
        }
        if !changed.is_empty() {
            let next = snap.with_services(&changed);
            let states = Self::all_states(&next);
            self.publish(next);
            if let Some(etcd) = self.store.as_etcd() {
                etcd.save_cache(states).await;
            }
        }
        failed
    }

    /// What to apply for `held`, read from etcd under the writer lock: itself, unless it is
    /// another replica's write-back of a lower generation than this replica serves
    /// ([`crate::state::etcd::Held::older_write_back`]). That is replaced with the state served
    /// (returned: nothing changes here); if another write came first, what etcd holds then is
    /// returned; if etcd refuses, the state served is kept (WARN) and `false` comes with it (to
    /// be tried again).
    async fn replace_older_write_back(
        &self,
        etcd: &crate::state::etcd::EtcdStore,
        name: &str,
        held: crate::state::etcd::Held,
    ) -> (ServiceState, bool) {
        let snap = self.snapshot();
        let Some(ours) = snap
            .service(name)
            .map(|s| s.state.clone())
            .filter(|ours| held.older_write_back(ours))
        else {
            return (held.state, true);
        };
        tracing::warn!(
            service = %name,
            held_active = %held.state.active,
            held_generation = held.state.generation,
            generation = ours.generation,
            "etcd holds another replica's write-back of the missing key with an older generation; replacing it with this replica's newer state"
        );
        match etcd
            .replace_write_back(name, &ours, held.mod_revision)
            .await
        {
            Ok(WriteBack::Written | WriteBack::Unreadable) => (ours, true),
            Ok(WriteBack::Held(state)) => (state, true),
            Err(e) => {
                tracing::warn!(
                    service = %name,
                    error = %e,
                    "cannot replace the older write-back in etcd; this replica keeps its newer state and tries again shortly"
                );
                (ours, false)
            }
        }
    }

    /// Records the events of a write whose outcome was unknown and that etcd shows committed
    /// (they are in etcd already, with the write).
    pub async fn record_resolved(&self, events: Vec<Event>) {
        for ev in events {
            tracing::info!(service = %ev.service, generation = ?ev.generation, "a change whose outcome was unknown took effect");
            self.count_flip(&ev);
            self.events.publish(ev);
        }
    }

    /// Counts the live-color changes an applied event stands for in `switchyard_flips_total`.
    /// A release's rollback or abort is ONE event for every service it returned (its
    /// `trigger.returned`, each a change of its own), whatever `service` the event names ("*",
    /// or the one a trigger fired on).
    fn count_flip(&self, ev: &Event) {
        let returned = ev
            .trigger
            .as_ref()
            .and_then(|t| t.get("returned"))
            .and_then(serde_json::Value::as_array);
        if let Some(returned) = returned {
            for service in returned.iter().filter_map(|o| o["service"].as_str()) {
                self.metrics
                    .flips_total
                    .with_label_values(&[service, ev.reason.as_str()])
                    .inc();
            }
            return;
        }
        if ev.service != "*" && ev.from.is_some() && ev.to.is_some() && ev.from != ev.to {
            self.metrics
                .flips_total
                .with_label_values(&[ev.service.as_str(), ev.reason.as_str()])
                .inc();
        }
    }

    pub fn state_source(&self) -> StateSource {
        StateSource::from_u8(self.state_source.load(Ordering::Relaxed))
    }

    pub fn set_state_source(&self, source: StateSource) {
        self.state_source.store(source as u8, Ordering::Relaxed);
    }

    /// The checks of the files a config names, run on every reload as at startup.
    pub fn set_file_checks(&self, checks: FileChecks) {
        let _ = self.file_checks.set(checks);
    }

    pub fn set_tls_reloader(&self, tls: crate::tls::TlsSetup) {
        let _ = self.tls.set(tls);
    }

    pub fn set_admin_tls_reloader(&self, tls: crate::tls::TlsSetup) {
        let _ = self.admin_tls.set(tls);
    }

    /// After `listener`'s certificate (from `path`) was loaded: its expiry in
    /// `switchyard_tls_certificate_expiry_timestamp_seconds`, and a warning when it is expired,
    /// not yet valid or within two weeks of its end.
    pub fn note_certificate(&self, listener: &str, tls: &crate::tls::TlsSetup, path: &Path) {
        let ck = tls.certified_key();
        let gauge = &self.metrics.tls_certificate_expiry;
        match crate::tls::validity(&ck) {
            Some((_, not_after)) => {
                let secs = not_after
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
                gauge.with_label_values(&[listener]).set(secs);
            }
            // Not the last certificate's date for this one.
            None => {
                let _ = gauge.remove_label_values(&[listener]);
            }
        }
        if let Some(w) = crate::tls::validity_warning(&ck, path, std::time::SystemTime::now()) {
            tracing::warn!(listener, "{w}");
        }
    }

    /// `make`'s task, started again if it panics before shutdown ([`crate::supervise`]);
    /// `name` is its `task` label in `switchyard_task_restarts_total`.
    pub fn supervised<F, Fut>(
        &self,
        name: &'static str,
        make: F,
    ) -> impl std::future::Future<Output = ()> + Send + 'static
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        crate::supervise::supervise(
            name,
            self.shutdown.child_token(),
            self.metrics.task_restarts_total.with_label_values(&[name]),
            make,
        )
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.routes.load_full()
    }

    /// `serve --upgrade`, once the old process said "go" (it answers no flip from then on):
    /// the state this process serves is written to the file (the state the old one handed
    /// over where the file was missing, and services the file did not hold yet), under the
    /// writer lock. Not at startup: an upgrade the old process aborts lets it answer flips
    /// again, which an earlier write would have erased. A failed write is logged; the colors
    /// are served all the same (the next change writes the file).
    pub async fn write_after_takeover(&self) {
        if !self.write_on_takeover.swap(false, Ordering::AcqRel) {
            return;
        }
        let _w = self.writer.lock().await;
        let mut states = Self::all_states(&self.snapshot());
        let names: Vec<String> = states.keys().cloned().collect();
        for (n, st) in self.unlisted_states() {
            states.entry(n).or_insert(st);
        }
        let path = self.store.local_path().unwrap_or_default();
        match self.store.save(&states, &HashMap::new(), &names).await {
            Ok(()) => {
                tracing::info!(path = %path.display(), "upgrade: the state served is written to the state file")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "upgrade: cannot write the state served to the state file (the next change writes it)")
            }
        }
    }

    /// File backend: the states the file holds for services the running config lacks.
    fn unlisted_states(&self) -> HashMap<String, ServiceState> {
        self.unlisted.lock().map(|u| u.clone()).unwrap_or_default()
    }

    fn all_states(snap: &Snapshot) -> HashMap<String, ServiceState> {
        snap.services
            .iter()
            .map(|s| (s.name().to_string(), s.state.clone()))
            .collect()
    }

    /// The one path of every change of the live state (flip, flip-all, rollbacks, pause):
    /// persists the change together with its events, then publishes both. A flip is never
    /// visible before it is durable, never lost across a restart once it was answered, and
    /// never applied without its events.
    ///
    /// File backend: the events are written to the audit log as pending (fsynced) before the
    /// state file, and confirmed after it ([`EventLog`]). etcd: the events are written in the
    /// same transaction as the state; a write whose answer does not come in time is
    /// reconciled ([`crate::state::etcd::EtcdStore::write`]), and on a lost compare-and-swap the state
    /// read from etcd is applied.
    async fn commit(
        &self,
        snap: &Snapshot,
        changed: HashMap<String, Arc<Service>>,
        events: Vec<Event>,
    ) -> Result<(), ChangeError> {
        if self.frozen.load(Ordering::Acquire) {
            return Err(ChangeError::Unavailable(
                "this process is handing its sockets to a new one (upgrade); the change was not applied: send it again, the new process answers".to_string(),
            ));
        }
        let next = snap.with_services(&changed);
        let mut names: Vec<String> = changed.keys().cloned().collect();
        names.sort();
        let after = Self::all_states(&next);
        let before = Self::all_states(snap);
        let id = crate::state::etcd::new_write_id();
        match &self.store {
            StateStore::File(_) => {
                let written: HashMap<String, ServiceState> = names
                    .iter()
                    .filter_map(|n| after.get(n).map(|s| (n.clone(), s.clone())))
                    .collect();
                // A failed write (a full disk, a read-only or immutable directory) leaves the
                // backend degraded until a write succeeds: no change, automatic rollbacks
                // included, can be made meanwhile, and the gauge and the status say so.
                let failed = |e: &dyn std::fmt::Display| {
                    self.metrics.state_degraded.set(1);
                    tracing::warn!(services = %names.join(", "), error = %e, "a change could not be written to the state file or its audit log; nothing was changed");
                };
                if let Err(e) = self.events.begin(&id, &written, &events).await {
                    failed(&e);
                    return Err(ChangeError::Internal(format!(
                        "cannot write the audit log ({e}); nothing was changed"
                    )));
                }
                let mut saved = after.clone();
                for (n, s) in self.unlisted_states() {
                    saved.entry(n).or_insert(s);
                }
                if let Err(e) = self.store.save(&saved, &before, &names).await {
                    self.events.abort(&id).await;
                    failed(&e);
                    return Err(e.into());
                }
                self.metrics.state_degraded.set(0);
                self.publish(next);
                for ev in &events {
                    self.count_flip(ev);
                }
                self.events.confirm(&id, events).await;
                Ok(())
            }
            StateStore::Etcd(etcd) => {
                let changes: Vec<(String, ServiceState)> = names
                    .iter()
                    .filter_map(|n| after.get(n).map(|s| (n.clone(), s.clone())))
                    .collect();
                match etcd.write(&changes, &before, &events, &id).await {
                    WriteOutcome::Applied => {
                        self.publish(next);
                        etcd.save_cache(after).await;
                        for ev in events {
                            self.count_flip(&ev);
                            self.events.publish(ev);
                        }
                        Ok(())
                    }
                    WriteOutcome::Overwritten(read) => {
                        // It took effect (its events are in etcd with it); another replica's
                        // write replaced it since, and that is what this replica serves now.
                        for ev in events {
                            self.count_flip(&ev);
                            self.events.publish(ev);
                        }
                        self.apply_states(read).await;
                        Ok(())
                    }
                    WriteOutcome::Conflict(read) => {
                        self.apply_states(read.clone()).await;
                        // Said as it was read (etcd may hold something newer by the time this
                        // is shown or recorded), and what this replica serves after applying it.
                        let now = self.snapshot();
                        let shown = |s: &ServiceState| {
                            format!("{} (generation {})", s.active, s.generation)
                        };
                        let what = names
                            .iter()
                            .map(|n| {
                                let served = now.service(n).map(|s| &s.state);
                                let serves = match served {
                                    Some(s) if read.get(n) == Some(s) => {
                                        "this replica serves that now".to_string()
                                    }
                                    Some(s) => format!("this replica serves {}", shown(s)),
                                    None => "this replica does not serve it".to_string(),
                                };
                                match read.get(n) {
                                    Some(r) if etcd.lost_to_own_write(n) => format!(
                                        "{n} holds an earlier write of this replica whose answer came late (it took effect): etcd held {} when this replica read it, {serves}",
                                        shown(r)
                                    ),
                                    Some(r) if before.get(n) == Some(r) => format!(
                                        "{n} was rewritten unchanged at a newer revision (a fence of a write whose answer came late): etcd held {} when this replica read it, {serves}",
                                        shown(r)
                                    ),
                                    Some(r) => format!(
                                        "{n} was changed by another replica: etcd held {} when this replica read it, {serves}",
                                        shown(r)
                                    ),
                                    None => format!(
                                        "{n}'s key in etcd could not be read back as a state (deleted meanwhile, or it holds a value that is not one: fix or delete the key, a missing one is written back): {serves}"
                                    ),
                                }
                            })
                            .collect::<Vec<_>>()
                            .join("; ");
                        Err(ChangeError::Conflict(format!(
                            "the compare on the state of {} was lost ({what}); re-read the status and retry",
                            names.join(", ")
                        )))
                    }
                    WriteOutcome::NotApplied(m) => Err(ChangeError::Unavailable(format!(
                        "{m} (traffic keeps flowing on the last known colors)"
                    ))),
                    WriteOutcome::Unknown(m) => {
                        etcd.remember_unresolved(&id, events);
                        Err(ChangeError::Unknown(m))
                    }
                }
            }
        }
    }

    /// Flips one service to `to`. Refused (409) when the target pool has no healthy upstream or
    /// a smoke path fails, unless `force`.
    ///
    /// The checks run outside the writer lock (a slow smoke test must not delay another
    /// service's automatic rollback); under the lock the service is re-read, and if it changed
    /// while the checks ran they run again on what it is now.
    /// The answer to a flip of `name` to `to` when `to` is live already (with etcd, as etcd
    /// holds it: a local copy may be behind another replica's change): a no-op, `changed:
    /// false`. None when a flip would change something.
    pub async fn already_live(
        &self,
        name: &str,
        to: Color,
    ) -> Result<Option<FlipOutcome>, ChangeError> {
        if service_of(&self.snapshot(), name)?.state.active != to {
            return Ok(None);
        }
        self.catch_up_with_etcd().await?;
        let checked = service_of(&self.snapshot(), name)?;
        Ok((checked.state.active == to).then(|| nothing_to_do(&checked, to)))
    }

    pub async fn flip(
        &self,
        name: &str,
        to: Color,
        force: bool,
        kind: FlipKind,
        actor: &str,
    ) -> Result<FlipOutcome, ChangeError> {
        if let Some(noop) = self.already_live(name, to).await? {
            return Ok(noop);
        }
        // The last compare lost to a rewrite of the unchanged state (or to a key that could not
        // be read back): what is said if every try ends so.
        let mut lost = None;
        for _ in 0..3 {
            let checked = service_of(&self.snapshot(), name)?;
            if checked.state.active == to {
                return Ok(nothing_to_do(&checked, to));
            }
            if !force {
                self.preflight_as(&checked, to, kind).await?;
            }
            let _w = self.writer.lock().await;
            let snap = self.snapshot();
            let svc = service_of(&snap, name)?;
            if !unchanged(&checked, &svc, to) {
                lost = None;
                continue;
            }
            if !force {
                healthy_target(&svc, to)?;
            }
            let from = svc.state.active;
            let next = self.flipped(&svc, to, kind)?;
            let generation = next.state.generation;
            let detail = format!(
                "{} {from} -> {to}{}",
                match kind {
                    FlipKind::Manual => "flip",
                    FlipKind::ManualRollback => "rollback",
                    FlipKind::AutoRollback => "automatic rollback",
                },
                if force { " (forced)" } else { "" }
            );
            let ev = Event::new(name, kind.reason(), actor, detail)
                .colors(from, to)
                .generation(generation);
            let mut changed = HashMap::new();
            changed.insert(name.to_string(), Arc::new(next));
            match self.commit(&snap, changed, vec![ev]).await {
                Ok(()) => {}
                // Lost the compare: `commit` applied what etcd holds. Decided again on it:
                // what this flip would have left (another replica made the same flip first)
                // has nothing left to do, not a conflict; `to` live by another kind of change
                // (a rollback that latched the color it left, when this is a manual flip) is
                // a conflict that says what happened.
                Err(ChangeError::Conflict(why)) => {
                    let now = self.snapshot();
                    let cur = service_of(&now, name)?;
                    // Lost to a rewrite of the very state this flip was decided on (the fence
                    // of a write whose answer came late): nobody changed anything, so it is no
                    // refusal; decided and sent again, compared at the revision just read.
                    if cur.state == svc.state {
                        tracing::warn!(service = %name, reason = %why, "a flip lost its compare to a rewrite of the unchanged state; sending it again");
                        lost = Some(why);
                        continue;
                    }
                    let svc = cur;
                    if svc.state.active != to {
                        return Err(ChangeError::Conflict(why));
                    }
                    if !as_asked(&svc.state, to, kind) {
                        drop(_w);
                        return Err(self.landed_otherwise(&svc, kind).await);
                    }
                    return Ok(nothing_to_do(&svc, to));
                }
                Err(e) => return Err(e),
            }
            return Ok(FlipOutcome {
                service: name.to_string(),
                from,
                to,
                generation,
                changed: true,
                message: format!("{name} flipped {from} -> {to} (generation {generation})"),
            });
        }
        Err(match lost {
            Some(why) => ChangeError::Conflict(why),
            None => ChangeError::Refused(format!(
                "{name} kept changing while its checks ran; re-read the status and retry"
            )),
        })
    }

    /// Flips every service to `to` in one atomic step: all checks first (outside the writer
    /// lock, re-checked under it as [`App::flip`] does), then one store, with one event per
    /// service through the same path as every other change.
    pub async fn flip_all(
        &self,
        to: Color,
        force: bool,
        actor: &str,
    ) -> Result<Vec<FlipOutcome>, ChangeError> {
        if self
            .snapshot()
            .services
            .iter()
            .any(|s| s.state.active == to)
        {
            self.catch_up_with_etcd().await?;
        }
        'attempt: for _ in 0..3 {
            let checked = self.snapshot();
            if !force {
                // Every refusal is named, not only the first: the operator fixes them all at once.
                let mut refused = Vec::new();
                for svc in checked.services.iter().filter(|s| s.state.active != to) {
                    match self.preflight(svc, to).await {
                        Ok(()) => {}
                        Err(ChangeError::Refused(why)) => refused.push(why),
                        Err(e) => return Err(e),
                    }
                }
                if !refused.is_empty() {
                    let all: Vec<&str> = refused
                        .iter()
                        .map(|w| w.strip_suffix(FORCE_HINT).unwrap_or(w))
                        .collect();
                    return Err(ChangeError::Refused(format!(
                        "{}{FORCE_HINT}",
                        all.join("; ")
                    )));
                }
            }
            let _w = self.writer.lock().await;
            let snap = self.snapshot();
            let mut changed = HashMap::new();
            let mut outcomes = Vec::new();
            let mut events = Vec::new();
            for svc in &snap.services {
                let from = svc.state.active;
                if from == to {
                    outcomes.push(FlipOutcome {
                        service: svc.name().to_string(),
                        from,
                        to,
                        generation: svc.state.generation,
                        changed: false,
                        message: already_on(svc, to),
                    });
                    continue;
                }
                match checked.service(svc.name()) {
                    Some(c) if unchanged(c, svc, to) => {}
                    _ => continue 'attempt,
                }
                if !force {
                    healthy_target(svc, to)?;
                }
                let next = self.flipped(svc, to, FlipKind::Manual)?;
                let generation = next.state.generation;
                outcomes.push(FlipOutcome {
                    service: svc.name().to_string(),
                    from,
                    to,
                    generation,
                    changed: true,
                    message: format!(
                        "{} flipped {from} -> {to} (generation {generation})",
                        svc.name(),
                    ),
                });
                events.push(
                    Event::new(
                        svc.name(),
                        Reason::Manual,
                        actor,
                        format!(
                            "flip-all {from} -> {to}{}",
                            if force { " (forced)" } else { "" }
                        ),
                    )
                    .colors(from, to)
                    .generation(generation),
                );
                changed.insert(svc.name().to_string(), Arc::new(next));
            }
            if !changed.is_empty() {
                let flipping: Vec<String> = changed.keys().cloned().collect();
                if let Err(e) = self.commit(&snap, changed, events).await {
                    // Lost the compare (what etcd holds is applied): every service on `to`
                    // now, each it was flipping as a manual flip leaves it, is nothing left to
                    // do, as above; a rollback to `to` (its latch set) is a conflict that says
                    // so; anything else is the conflict.
                    let ChangeError::Conflict(_) = e else {
                        return Err(e);
                    };
                    let now = self.snapshot();
                    if now.services.iter().any(|s| s.state.active != to) {
                        return Err(e);
                    }
                    let otherwise = now.services.iter().find(|s| {
                        flipping.iter().any(|n| n == s.name())
                            && !as_asked(&s.state, to, FlipKind::Manual)
                    });
                    if let Some(svc) = otherwise {
                        drop(_w);
                        return Err(self.landed_otherwise(svc, FlipKind::Manual).await);
                    }
                    return Ok(now
                        .services
                        .iter()
                        .map(|svc| FlipOutcome {
                            service: svc.name().to_string(),
                            from: to,
                            to,
                            generation: svc.state.generation,
                            changed: false,
                            message: already_on(svc, to),
                        })
                        .collect());
                }
            }
            return Ok(outcomes);
        }
        Err(ChangeError::Refused(
            "services kept changing while the checks ran; re-read the status and retry".to_string(),
        ))
    }

    /// The refusal (409) of a flip of `kind` that lost its compare-and-swap to another change
    /// that left the same color live as `svc` is now, but not as this flip would have
    /// ([`as_asked`]): it names that change (its event, when one of its generation is found)
    /// and what it left. Called without the writer lock (the events may be read from etcd).
    async fn landed_otherwise(&self, svc: &Service, kind: FlipKind) -> ChangeError {
        let (name, to, generation) = (svc.name(), svc.state.active, svc.state.generation);
        let event = self
            .events_list()
            .await
            .into_iter()
            .rev()
            .find(|e| e.service == name && e.generation == Some(generation));
        let what = match &event {
            Some(e) => format!("{} by {}: {}", e.reason.as_str(), e.actor, e.detail),
            None => "another change".to_string(),
        };
        let left = match svc.state.failed {
            Some(f) => format!(
                "{f} is latched as failed, so automatic rollback stays disarmed until a manual flip to {f}"
            ),
            None => format!(
                "no color is latched as failed, so automatic rollback may flip it back to {}",
                to.other()
            ),
        };
        let asked = match kind {
            FlipKind::Manual => "flip",
            FlipKind::ManualRollback => "rollback",
            FlipKind::AutoRollback => "automatic rollback",
        };
        ChangeError::Conflict(format!(
            "{name} was changed first ({what}; generation {generation}): this {asked} was not applied; {to} is live, but {left}"
        ))
    }

    /// Flips one service back to its previous color.
    pub async fn rollback(
        &self,
        name: &str,
        force: bool,
        actor: &str,
    ) -> Result<FlipOutcome, ChangeError> {
        let snap = self.snapshot();
        let svc = service_of(&snap, name)?;
        let Some(prev) = svc.state.previous else {
            return Err(ChangeError::Refused(format!(
                "{name} has no previous color to roll back to"
            )));
        };
        // After an automatic rollback the previous color is the one that just failed.
        if svc.state.failed == Some(prev) && !force {
            return Err(ChangeError::Refused(format!(
                "{name}: the previous color {prev} is latched as failed (a rollback left it); a rollback would send traffic back to it; flip to it deliberately or pass \"force\": true"
            )));
        }
        self.flip(name, prev, force, FlipKind::ManualRollback, actor)
            .await
    }

    /// The rollback engine's flip: only if the service is still at `generation` (a manual
    /// change in between wins), never to a pool without a healthy upstream.
    ///
    /// A compare lost to a rewrite of the very state the rollback was decided on (a fence of an
    /// unresolved write, this replica's or another's, rewrites it unchanged at a newer
    /// revision) is no change by anyone: the rollback is sent again, compared at the revision
    /// just read, every check run again (twice; then an error, retried at the next evaluation).
    /// Only that same state is ever rolled back, so a change by anyone else still wins.
    pub async fn auto_rollback(
        &self,
        name: &str,
        generation: u64,
        detail: &str,
        trigger: serde_json::Value,
    ) -> Result<Option<FlipOutcome>, ChangeError> {
        let mut rewritten = None;
        for _ in 0..3 {
            let done = self
                .auto_rollback_try(name, generation, detail, trigger.clone(), &mut rewritten)
                .await;
            let Some(why) = rewritten.take() else {
                return done;
            };
            tracing::warn!(service = %name, reason = %why, "automatic rollback lost its compare to a rewrite of the state it was decided on (not a change by another replica); sending it again");
        }
        Err(ChangeError::Unavailable(format!(
            "{name}: the automatic rollback lost its compare three times to rewrites of the unchanged state; retried at the next evaluation"
        )))
    }

    /// One attempt of [`App::auto_rollback`]; `rewritten` is set (with the conflict) when the
    /// compare was lost to a rewrite of the unchanged state.
    async fn auto_rollback_try(
        &self,
        name: &str,
        generation: u64,
        detail: &str,
        trigger: serde_json::Value,
        rewritten: &mut Option<String>,
    ) -> Result<Option<FlipOutcome>, ChangeError> {
        let _w = self.writer.lock().await;
        let snap = self.snapshot();
        let svc = service_of(&snap, name)?;
        // Re-checked under the writer lock: a pause, flip or reload that landed after the
        // evaluation wins over it.
        if svc.state.generation != generation || !svc.armed(Instant::now()) {
            return Ok(None);
        }
        let Some(to) = svc.state.previous else {
            return Ok(None);
        };
        if svc.pool(to).healthy_count() == 0 {
            return Err(ChangeError::Refused(format!(
                "previous color {to} has no healthy upstream"
            )));
        }
        let from = svc.state.active;
        let next = self.flipped(&svc, to, FlipKind::AutoRollback)?;
        let gen = next.state.generation;
        let mut ev = Event::new(name, Reason::AutoRollback, "rollback-engine", detail)
            .colors(from, to)
            .generation(gen);
        ev.trigger = Some(trigger);
        let mut changed = HashMap::new();
        changed.insert(name.to_string(), Arc::new(next));
        match self.commit(&snap, changed, vec![ev]).await {
            Ok(()) => {}
            // `commit` applied what etcd holds: the state this rollback was decided on.
            Err(ChangeError::Conflict(why))
                if self
                    .snapshot()
                    .service(name)
                    .is_some_and(|now| now.state == svc.state) =>
            {
                *rewritten = Some(why);
                return Ok(None);
            }
            // An earlier attempt of this same rollback, whose answer came late, took effect: no
            // conflict (its event is recorded when the watch or a full read shows it).
            Err(ChangeError::Conflict(why))
                if self
                    .store
                    .as_etcd()
                    .is_some_and(|e| e.lost_to_own_write(name))
                    && self.snapshot().service(name).is_some_and(|now| {
                        now.state.active == to && now.state.failed == Some(from)
                    }) =>
            {
                tracing::info!(service = %name, reason = %why, "an earlier attempt of this automatic rollback took effect");
                return Ok(None);
            }
            Err(ChangeError::Conflict(why)) => {
                // Another replica changed this service first (most likely the same rollback).
                self.record(
                    Event::new(
                        name,
                        Reason::RollbackConflict,
                        "rollback-engine",
                        format!("{detail}; not applied by this replica: {why}"),
                    )
                    .colors(from, to)
                    .generation(generation),
                )
                .await;
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        Ok(Some(FlipOutcome {
            service: name.to_string(),
            from,
            to,
            generation: gen,
            changed: true,
            message: format!("{name} rolled back {from} -> {to}: {detail}"),
        }))
    }

    /// A release phase's flip: the named services to their colors in one atomic step (one
    /// store, one state write), one `release_phase` event per service. Refused (409) when a
    /// target pool has no healthy upstream; the checks ([`App::preflight`]) ran before.
    pub async fn flip_set(
        &self,
        targets: &[(String, Color)],
        actor: &str,
        detail: &str,
    ) -> Result<Vec<FlipOutcome>, ChangeError> {
        let _w = self.writer.lock().await;
        let snap = self.snapshot();
        let mut changed = HashMap::new();
        let mut outcomes = Vec::new();
        let mut events = Vec::new();
        for (name, to) in targets {
            let svc = service_of(&snap, name)?;
            let (from, to) = (svc.state.active, *to);
            if from == to {
                continue;
            }
            healthy_target(&svc, to)?;
            let next = self.flipped(&svc, to, FlipKind::Manual)?;
            let generation = next.state.generation;
            outcomes.push(FlipOutcome {
                service: name.clone(),
                from,
                to,
                generation,
                changed: true,
                message: format!("{name} flipped {from} -> {to} (generation {generation})"),
            });
            events.push(
                Event::new(
                    name,
                    Reason::ReleasePhase,
                    actor,
                    format!("{detail}: {from} -> {to}"),
                )
                .colors(from, to)
                .generation(generation),
            );
            changed.insert(name.clone(), Arc::new(next));
        }
        if !changed.is_empty() {
            self.commit(&snap, changed, events).await?;
        }
        Ok(outcomes)
    }

    /// A release's rollback: every named service back to its color in one atomic step, with
    /// the ONE event `event` builds from what was returned and what was not (never onto a pool
    /// without a healthy upstream: that service is skipped and reported, the others go back).
    pub async fn return_set(
        &self,
        targets: &[(String, Color)],
        kind: FlipKind,
        event: impl FnOnce(&[FlipOutcome], &[String]) -> Event,
    ) -> Result<(Vec<FlipOutcome>, Vec<String>), ChangeError> {
        let _w = self.writer.lock().await;
        let snap = self.snapshot();
        let mut changed = HashMap::new();
        let mut outcomes = Vec::new();
        let mut skipped = Vec::new();
        for (name, to) in targets {
            let Some(svc) = snap.service(name) else {
                skipped.push(format!("{name}: no longer configured"));
                continue;
            };
            let (from, to) = (svc.state.active, *to);
            if from == to {
                continue;
            }
            if svc.pool(to).healthy_count() == 0 {
                skipped.push(format!(
                    "{name}: not returned to {to}, its pool has no healthy upstream (stays on {from})"
                ));
                continue;
            }
            if svc.state.failed == Some(to) {
                // A rollback after the release began left `to` (its pre-release color) as
                // failed: returning would send traffic back to it. Only a manual flip does.
                skipped.push(format!(
                    "{name}: not returned to {to}, a rollback latched {to} as failed (stays on {from}; flip it by hand to send traffic there)"
                ));
                continue;
            }
            // The others go back all the same: a return is never dropped whole.
            let next = match self.flipped(svc, to, kind) {
                Ok(next) => next,
                Err(e) => {
                    skipped.push(format!(
                        "{name}: not returned to {to} ({e}; stays on {from})"
                    ));
                    continue;
                }
            };
            outcomes.push(FlipOutcome {
                service: name.clone(),
                from,
                to,
                generation: next.state.generation,
                changed: true,
                message: format!("{name} returned {from} -> {to}"),
            });
            changed.insert(name.clone(), Arc::new(next));
        }
        let ev = event(&outcomes, &skipped);
        if changed.is_empty() {
            self.record(ev).await;
        } else {
            self.commit(&snap, changed, vec![ev]).await?;
        }
        Ok((outcomes, skipped))
    }

    /// Pauses or resumes automatic rollback for a service (persisted; generation unchanged).
    pub async fn set_paused(
        &self,
        name: &str,
        paused: bool,
        actor: &str,
    ) -> Result<String, ChangeError> {
        let _w = self.writer.lock().await;
        if service_of(&self.snapshot(), name)?.state.paused == paused {
            if let Some(read) = self.read_etcd().await? {
                self.apply_read(read).await;
            }
        }
        let word = if paused { "paused" } else { "resumed" };
        let already = || format!("automatic rollback of {name} is already {word}");
        let mut lost = None;
        for _ in 0..3 {
            let snap = self.snapshot();
            let svc = service_of(&snap, name)?;
            if svc.state.paused == paused {
                return Ok(already());
            }
            let mut state = svc.state.clone();
            state.paused = paused;
            let mut changed = HashMap::new();
            changed.insert(
                name.to_string(),
                Arc::new(svc.with_state(state, svc.flipped_at)),
            );
            let reason = if paused {
                Reason::Pause
            } else {
                Reason::Resume
            };
            let ev = Event::new(name, reason, actor, format!("automatic rollback {word}"))
                .generation(svc.state.generation);
            match self.commit(&snap, changed, vec![ev]).await {
                Ok(()) => return Ok(format!("automatic rollback of {name} {word}")),
                // Lost the compare: `commit` applied what etcd holds. Another replica that
                // paused (or resumed) first left what was asked: nothing to do, no conflict
                // (as a flip another replica made first). Lost to a rewrite of the very state
                // this was decided on: sent again. Anything else changed: the conflict.
                Err(ChangeError::Conflict(why)) => {
                    let now = self.snapshot();
                    let cur = service_of(&now, name)?;
                    if cur.state.paused == paused {
                        return Ok(already());
                    }
                    if cur.state != svc.state {
                        return Err(ChangeError::Conflict(why));
                    }
                    lost = Some(why);
                }
                Err(e) => return Err(e),
            }
        }
        Err(ChangeError::Conflict(lost.unwrap_or_else(|| {
            format!("{name} kept changing; re-read the status and retry")
        })))
    }

    /// Makes `next` the routing snapshot, its live pools marked live first
    /// ([`Snapshot::mark_live`]).
    fn publish(&self, next: Snapshot) {
        next.mark_live();
        self.routes.store(Arc::new(next));
    }

    /// A copy of `svc` flipped to `to`, generation incremented; refused at the largest
    /// generation a state may hold (only a hand-edited state gets there: a flip past it would
    /// be stored as a state no replica can read back).
    fn flipped(&self, svc: &Service, to: Color, kind: FlipKind) -> Result<Service, ChangeError> {
        let from = svc.state.active;
        if svc.state.generation >= crate::state::MAX_GENERATION {
            return Err(ChangeError::Refused(format!(
                "service {:?} is at generation {}, the largest a state may hold: a flip would store one no replica can read back; lower it where it is stored (the state file, or its etcd key) first",
                svc.name(),
                svc.state.generation
            )));
        }
        let state = ServiceState {
            active: to,
            previous: Some(from),
            generation: svc.state.generation + 1,
            updated_at: Some(now_rfc3339()),
            paused: svc.state.paused,
            // A rollback latches the color it left: auto-rollback stays disarmed (and can never
            // flip forward to it) until an operator flips manually.
            failed: match kind {
                FlipKind::Manual => None,
                FlipKind::ManualRollback | FlipKind::AutoRollback => Some(from),
            },
        };
        Ok(svc.with_state(state, Some(Instant::now())))
    }

    /// Health and smoke checks before a flip to `to`.
    pub async fn preflight(&self, svc: &Service, to: Color) -> Result<(), ChangeError> {
        self.preflight_as(svc, to, FlipKind::Manual).await
    }

    /// [`App::preflight`] for a change of `kind`: a manual rollback is not refused by a verify
    /// check that has no data or errors (see [`crate::analysis::verify`]).
    async fn preflight_as(
        &self,
        svc: &Service,
        to: Color,
        kind: FlipKind,
    ) -> Result<(), ChangeError> {
        healthy_target(svc, to)?;
        let pool = svc.pool(to);
        let analysis_cfg = &self.snapshot().config.analysis;
        let unknown_refuses = kind != FlipKind::ManualRollback;
        if let Err(f) =
            crate::analysis::verify(&self.analysis, analysis_cfg, svc, to, unknown_refuses).await
        {
            return Err(ChangeError::Refused(format!(
                "{}: verify[{}] ({}) failed on {to}: {}; checked {}{FORCE_HINT}",
                svc.name(),
                f.index,
                f.kind,
                f.reason,
                f.evaluated
            )));
        }
        if svc.config.smoke_paths.is_empty() {
            return Ok(());
        }
        let cfg = &self.snapshot().config;
        let timeout = cfg
            .proxy
            .request_timeout
            .min(std::time::Duration::from_secs(10));
        for path in &svc.config.smoke_paths {
            for up in pool.upstreams.iter().filter(|u| u.is_healthy()) {
                match self.clients.probe(up, path, timeout).await {
                    Ok(status) if status.is_success() => {}
                    Ok(status) => {
                        return Err(ChangeError::Refused(format!(
                            "{}: smoke test GET {path} on {to} upstream {} answered {}",
                            svc.name(),
                            up.addr,
                            status.as_u16()
                        )))
                    }
                    Err(e) => {
                        return Err(ChangeError::Refused(format!(
                            "{}: smoke test GET {path} on {to} upstream {} failed: {e}",
                            svc.name(),
                            up.addr
                        )))
                    }
                }
            }
        }
        Ok(())
    }

    /// Re-reads the config file; an invalid file changes nothing.
    pub async fn reload(&self, actor: &str) -> Result<ReloadOutcome, ReloadError> {
        let path = self.config_path.clone().ok_or(ReloadError::NoFile)?;
        let checks = self.file_checks.get().copied();
        let loaded = tokio::task::spawn_blocking(move || {
            config::load_with(&path, |c| checks.map(|f| f(&path, c)).unwrap_or_default())
        })
        .await
        .unwrap_or_else(|e| {
            Err(config::ConfigErrors(vec![config::ConfigError {
                key: String::new(),
                message: format!("reload task failed: {e}"),
            }]))
        });
        let new_cfg = match loaded {
            Ok(c) => c,
            Err(errs) => {
                self.metrics
                    .config_reloads_total
                    .with_label_values(&["error"])
                    .inc();
                tracing::error!(errors = %errs, "config reload refused; the running config is unchanged");
                return Err(ReloadError::Invalid(errs));
            }
        };
        // The certificates are read again (a renewal on disk takes effect without a restart).
        // Where TLS was off at startup there is nothing to reload: turning it on (or off) takes
        // a restart, and `apply_config` reports it. Every pair is read before any is served: a
        // reload refused for one changes neither.
        let mut loaded = Vec::new();
        let mut errs = Vec::new();
        for (tls, cert, key, section) in [
            (
                self.tls.get(),
                new_cfg.proxy.tls_cert.as_deref(),
                new_cfg.proxy.tls_key.as_deref(),
                "proxy",
            ),
            (
                self.admin_tls.get(),
                new_cfg.admin.tls_cert.as_deref(),
                new_cfg.admin.tls_key.as_deref(),
                "admin",
            ),
        ] {
            let (Some(tls), Some(cert), Some(key)) = (tls, cert, key) else {
                continue;
            };
            let (cert, key) = (cert.to_path_buf(), key.to_path_buf());
            let path = cert.clone();
            let read =
                tokio::task::spawn_blocking(move || crate::tls::load_certified_key(&cert, &key))
                    .await
                    .unwrap_or_else(|e| Err(crate::tls::TlsError::Task(e.to_string())));
            match read {
                Ok(ck) => loaded.push((tls.clone(), ck, section, path)),
                Err(e) => errs.push(config::ConfigError {
                    key: format!("{section}.{}", e.file().key()),
                    message: e.to_string(),
                }),
            }
        }
        if !errs.is_empty() {
            self.metrics
                .config_reloads_total
                .with_label_values(&["error"])
                .inc();
            let errs = config::ConfigErrors(errs);
            tracing::error!(errors = %errs, "config reload refused; the running config is unchanged");
            return Err(ReloadError::Invalid(errs));
        }
        for (tls, ck, listener, cert) in loaded {
            tls.install(ck);
            self.note_certificate(listener, &tls, &cert);
        }
        // Upstream names: looked up now; a name that fails keeps its last good addresses.
        let new_cfg = crate::resolve::resolve(new_cfg, Some(&self.snapshot().config)).await;
        Ok(self.apply_config(new_cfg, actor).await)
    }

    /// Publishes a validated config, keeping live colors, generations and unchanged upstreams.
    pub async fn apply_config(&self, new_cfg: Config, actor: &str) -> ReloadOutcome {
        let _w = self.writer.lock().await;
        let snap = self.snapshot();
        // Webhooks follow the file: the reload's own event goes to the new ones.
        self.notifier.reconfigure(&new_cfg.notify);
        // What the process runs with, for these keys: a key a reload changed and reported stays
        // reported by every later reload until a restart applies it (or the file returns to it).
        let old = &*self.started_config;
        let mut restart_required = Vec::new();
        let p = (&old.proxy, &new_cfg.proxy);
        for (key, changed) in [
            ("proxy.listen", p.0.listen != p.1.listen),
            ("proxy.tls_listen", p.0.tls_listen != p.1.tls_listen),
            (
                "proxy.preview_listen",
                p.0.preview_listen != p.1.preview_listen,
            ),
            ("proxy.workers", p.0.workers != p.1.workers),
            ("proxy.runtime", p.0.runtime != p.1.runtime),
            (
                "proxy.connect_timeout",
                p.0.connect_timeout != p.1.connect_timeout,
            ),
            // Read once when the listeners start: the connection budgets, the h2 settings
            // (`max_header_bytes` is h2's header-list limit too) and the admin deadlines.
            (
                "proxy.max_connections",
                p.0.max_connections != p.1.max_connections,
            ),
            (
                "proxy.h2_max_concurrent_streams",
                p.0.h2_max_concurrent_streams != p.1.h2_max_concurrent_streams,
            ),
            (
                "proxy.max_header_bytes",
                p.0.max_header_bytes != p.1.max_header_bytes,
            ),
            // Kept by the connection pool of each upstream a reload keeps.
            (
                "proxy.upstream_max_idle",
                p.0.upstream_max_idle != p.1.upstream_max_idle,
            ),
            (
                "proxy.upstream_idle_timeout",
                p.0.upstream_idle_timeout != p.1.upstream_idle_timeout,
            ),
            ("admin.listen", old.admin.listen != new_cfg.admin.listen),
            // Admin TLS is turned on or off only by a restart (the listener is built with it or
            // without); a new pair of files while it is on is read above, no restart needed.
            (
                "admin.tls_cert",
                old.admin.tls_cert.is_some() != new_cfg.admin.tls_cert.is_some(),
            ),
            (
                "admin.tls_key",
                old.admin.tls_key.is_some() != new_cfg.admin.tls_key.is_some(),
            ),
            (
                "admin.max_connections",
                old.admin.max_connections != new_cfg.admin.max_connections,
            ),
            (
                "admin.header_read_timeout",
                old.admin.header_read_timeout != new_cfg.admin.header_read_timeout,
            ),
            (
                "admin.idle_timeout",
                old.admin.idle_timeout != new_cfg.admin.idle_timeout,
            ),
            (
                "admin.token_env",
                old.admin.token_env != new_cfg.admin.token_env,
            ),
            ("state", old.state != new_cfg.state),
            ("log", old.log != new_cfg.log),
            (
                "proxy.upgrade_socket",
                p.0.upgrade_socket != p.1.upgrade_socket,
            ),
        ] {
            if changed {
                restart_required.push(key.to_string());
            }
        }
        let mut states = Self::all_states(&snap);
        let stored = self.stored_states_of_added(&snap, &new_cfg).await;
        // etcd: the added services it does not hold are written to it once this is published,
        // as at startup ([`App::restore_absent`]): the first replica's color is the fleet's.
        let unheld: Vec<String> = match self.store.as_etcd() {
            Some(_) => new_cfg
                .services
                .iter()
                .filter(|s| snap.service(&s.name).is_none() && !stored.contains_key(&s.name))
                .map(|s| s.name.clone())
                .collect(),
            None => Vec::new(),
        };
        states.extend(stored);
        // A live color changes only by a flip: a new `active` of a service the reload keeps is
        // not applied (the answer says so).
        let active_not_applied: Vec<String> = new_cfg
            .services
            .iter()
            .filter(|s| {
                snap.service(&s.name)
                    .is_some_and(|o| o.config.active != s.active)
            })
            .map(|s| s.name.clone())
            .collect();
        let services = new_cfg.services.len();
        for svc in &new_cfg.services {
            self.metrics.init_service(&svc.name);
        }
        let next = build_snapshot(Arc::new(new_cfg), &states, Some(&snap), &self.metrics);
        self.publish(next);
        self.metrics
            .config_reloads_total
            .with_label_values(&["ok"])
            .inc();
        let mut message = format!("configuration reloaded: {services} services");
        if !restart_required.is_empty() {
            message.push_str(&format!(
                "; these changes take effect only after a restart: {}",
                restart_required.join(", ")
            ));
            tracing::warn!(keys = %restart_required.join(", "), "config changes that need a restart");
        }
        if !active_not_applied.is_empty() {
            message.push_str(&format!(
                "; `active` is not applied to a running service (its live color changes only by a flip): {}",
                active_not_applied.join(", ")
            ));
            tracing::warn!(services = %active_not_applied.join(", "), "a reload changed `active` of running services: their live color stays; flip to change it");
        }
        self.record(Event::new("*", Reason::Reload, actor, message.clone()))
            .await;
        drop(_w);
        // One that cannot be written now is tried again at the next full read.
        let _ = self.restore_absent(unheld).await;
        ReloadOutcome {
            services,
            restart_required,
            active_not_applied,
            message,
        }
    }

    /// The states the store holds for the services `new_cfg` adds to `snap`'s (a service removed
    /// by an earlier reload and now back), served as a start would serve them; a service the
    /// store has never held is absent (it starts from the config's `active`). File backend:
    /// what the file holds ([`App::unlisted`]); the states of the services `new_cfg` removes go
    /// there, kept in the file, and a service the file has never held is written to it at the
    /// config's color. etcd: its key as read now, else as this replica last saw it.
    async fn stored_states_of_added(
        &self,
        snap: &Snapshot,
        new_cfg: &Config,
    ) -> HashMap<String, ServiceState> {
        let added: Vec<&config::ServiceConfig> = new_cfg
            .services
            .iter()
            .filter(|s| snap.service(&s.name).is_none())
            .collect();
        let mut found = HashMap::new();
        match &self.store {
            StateStore::File(_) => {
                let mut fresh = Vec::new();
                let unlisted = {
                    let Ok(mut unlisted) = self.unlisted.lock() else {
                        return found;
                    };
                    for svc in &snap.services {
                        if !new_cfg.services.iter().any(|s| s.name == svc.name()) {
                            unlisted.insert(svc.name().to_string(), svc.state.clone());
                        }
                    }
                    for svc in &added {
                        match unlisted.remove(&svc.name) {
                            Some(s) => {
                                tracing::info!(service = %svc.name, active = %s.active, generation = s.generation, "a service added by the reload is served at the state the state file holds for it");
                                found.insert(svc.name.clone(), s);
                            }
                            None => fresh.push(svc.name.clone()),
                        }
                    }
                    unlisted.clone()
                };
                if !fresh.is_empty() {
                    let mut states = Self::all_states(snap);
                    states.retain(|n, _| new_cfg.services.iter().any(|s| &s.name == n));
                    states.extend(found.clone());
                    for svc in &added {
                        if fresh.contains(&svc.name) {
                            states.insert(svc.name.clone(), ServiceState::initial(svc.active));
                        }
                    }
                    for (n, s) in unlisted {
                        states.entry(n).or_insert(s);
                    }
                    if let Err(e) = self.store.save(&states, &HashMap::new(), &fresh).await {
                        tracing::warn!(services = %fresh.join(", "), error = %e, "cannot write the services the reload added to the state file; served at the config's colors (the next change writes the file)");
                    }
                }
            }
            StateStore::Etcd(etcd) => {
                if added.is_empty() {
                    return found;
                }
                if let Err(e) = etcd.read_current().await {
                    tracing::warn!(error = %e, "cannot read etcd for the services the reload added; serving them at the state this replica last saw etcd hold");
                }
                for svc in &added {
                    if let Some(s) = etcd.seen_state(&svc.name) {
                        tracing::info!(service = %svc.name, active = %s.active, generation = s.generation, "a service added by the reload is served at the state etcd holds for it");
                        found.insert(svc.name.clone(), s);
                    }
                }
            }
        }
        found
    }

    /// Publishes the config `f` builds from the current one (new answers for upstream names),
    /// keeping live states and unchanged upstreams; `f` returning None changes nothing.
    pub async fn update_config(&self, f: impl FnOnce(&Config) -> Option<Config>) -> bool {
        let _w = self.writer.lock().await;
        let snap = self.snapshot();
        let Some(next_cfg) = f(&snap.config) else {
            return false;
        };
        let states = Self::all_states(&snap);
        let next = build_snapshot(Arc::new(next_cfg), &states, Some(&snap), &self.metrics);
        self.publish(next);
        true
    }

    /// Records a blocked or dry-run rollback decision.
    pub async fn record_decision(
        &self,
        name: &str,
        reason: Reason,
        (from, to): (Color, Color),
        generation: u64,
        detail: &str,
        trigger: serde_json::Value,
    ) {
        if reason == Reason::RollbackBlocked {
            self.metrics
                .flips_total
                .with_label_values(&[name, reason.as_str()])
                .inc();
        }
        let mut ev = Event::new(name, reason, "rollback-engine", detail)
            .colors(from, to)
            .generation(generation);
        ev.trigger = Some(trigger);
        self.record(ev).await;
    }
}

impl crate::analysis::Host for App {
    fn snapshot(&self) -> Arc<Snapshot> {
        App::snapshot(self)
    }

    fn analysis(&self) -> &crate::analysis::Analysis {
        &self.analysis
    }
}
