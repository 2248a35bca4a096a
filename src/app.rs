//! The application state shared by the listeners, and the one serialized writer that changes it.
//!
//! Readers (every request) only `load` the routing snapshot. Flips, rollbacks, pause/resume and
//! reloads take the writer lock, build the complete new snapshot, persist the live state, and
//! publish with a single `store`; on any error nothing is published.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Color, Config};
use crate::events::{now_rfc3339, Event, EventLog};
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::routing::{build_snapshot, Service, ServiceState, Snapshot};
use crate::state::{StateError, StateStore};
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

pub struct App {
    pub routes: ArcSwap<Snapshot>,
    pub clock: Clock,
    pub metrics: Arc<Metrics>,
    pub clients: Clients,
    pub events: EventLog,
    pub watch: ArcSwap<WatchStatus>,
    /// The admin bearer token, read once at startup from the variable `token_env` names.
    pub admin_token: Option<String>,
    pub config_path: Option<PathBuf>,
    pub shutdown: CancellationToken,
    /// Open WebSocket tunnels, drained at shutdown like requests.
    pub tunnels: crate::proxy::Tunnels,
    pub started: Instant,
    /// The access log's queue, when `[log] access` is not "off" (set once at startup).
    pub access_log: std::sync::OnceLock<Arc<crate::access_log::AccessLog>>,
    /// The proxy's TLS certificate, re-read on reload.
    tls: std::sync::OnceLock<crate::tls::TlsSetup>,
    writer: tokio::sync::Mutex<()>,
    pub store: StateStore,
}

#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("unknown service {0:?}")]
    UnknownService(String),
    /// A refused flip (409).
    #[error("{0}")]
    Refused(String),
    /// The state backend cannot take writes (503).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Internal(String),
}

impl From<StateError> for ChangeError {
    fn from(e: StateError) -> Self {
        match e {
            StateError::Unavailable(m) => ChangeError::Unavailable(format!(
                "{m}; flips are refused until the state backend is back (traffic keeps flowing on the last known colors)"
            )),
            StateError::Conflict(m) => ChangeError::Refused(m),
            other => ChangeError::Internal(other.to_string()),
        }
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
    fn reason(self) -> &'static str {
        match self {
            FlipKind::Manual => "manual",
            FlipKind::ManualRollback => "rollback",
            FlipKind::AutoRollback => "auto_rollback",
        }
    }
}

impl App {
    /// Builds the app from a validated config: the stored state wins over the config's `active`.
    pub async fn new(
        config: Config,
        config_path: Option<PathBuf>,
        store: StateStore,
        admin_token: Option<String>,
    ) -> Result<Arc<App>, StateError> {
        let states = match store.load().await {
            Ok(s) => s,
            // A replica that starts while etcd is down serves the config's colors and
            // resyncs as soon as etcd answers; a file store must be readable.
            Err(StateError::Unavailable(e)) if store.as_etcd().is_some() => {
                tracing::warn!(error = %e, "etcd unreachable at startup: serving the config's colors until it answers");
                HashMap::new()
            }
            Err(e) => return Err(e),
        };
        let metrics = Arc::new(Metrics::new());
        let notifier = Notifier::start(&config.notify, metrics.webhook_failures_total.clone());
        // Reading the audit log's tail is file I/O: keep it off the runtime's threads.
        let audit = store.audit_path();
        let events = match tokio::task::spawn_blocking(move || EventLog::new(audit, notifier)).await
        {
            Ok(ev) => ev,
            Err(e) => {
                return Err(StateError::Corrupt {
                    path: store.audit_path().unwrap_or_default(),
                    reason: format!("cannot read the audit log: {e}"),
                })
            }
        };
        let clients = Clients::new(&config.proxy);
        let config = Arc::new(config);
        let snapshot = build_snapshot(config, &states, None, &metrics);
        Ok(Arc::new(App {
            routes: ArcSwap::from_pointee(snapshot),
            clock: Clock::new(),
            metrics,
            clients,
            events,
            watch: ArcSwap::from_pointee(HashMap::new()),
            admin_token: admin_token.filter(|t| !t.is_empty()),
            config_path,
            shutdown: CancellationToken::new(),
            tunnels: crate::proxy::Tunnels::default(),
            started: Instant::now(),
            access_log: std::sync::OnceLock::new(),
            tls: std::sync::OnceLock::new(),
            writer: tokio::sync::Mutex::new(()),
            store,
        }))
    }

    /// Records an event locally (ring, audit file, webhooks) and, with etcd, for every replica.
    pub async fn record(&self, ev: Event) {
        if let Some(etcd) = self.store.as_etcd() {
            let etcd = etcd.clone();
            let shared = ev.clone();
            tokio::spawn(async move {
                if let Err(e) = etcd.put_event(&shared).await {
                    tracing::warn!(error = %e, "cannot store the event in etcd; it is kept locally");
                }
            });
        }
        self.events.record(ev).await;
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

    /// Applies live states written by another replica (etcd watch). Newer generations win;
    /// nothing is persisted (they already are).
    pub async fn apply_remote(&self, remote: HashMap<String, ServiceState>) {
        let _w = self.writer.lock().await;
        let snap = self.snapshot();
        let mut changed = HashMap::new();
        for svc in &snap.services {
            let Some(r) = remote.get(svc.name()) else {
                continue;
            };
            if *r == svc.state || r.generation < svc.state.generation {
                continue;
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
                svc.flipped_at
            };
            changed.insert(
                svc.name().to_string(),
                Arc::new(svc.with_state(r.clone(), flipped_at)),
            );
        }
        if !changed.is_empty() {
            self.routes.store(Arc::new(snap.with_services(&changed)));
        }
    }

    pub fn set_tls_reloader(&self, tls: crate::tls::TlsSetup) {
        let _ = self.tls.set(tls);
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.routes.load_full()
    }

    fn all_states(snap: &Snapshot) -> HashMap<String, ServiceState> {
        snap.services
            .iter()
            .map(|s| (s.name().to_string(), s.state.clone()))
            .collect()
    }

    /// Persists, then publishes: a flip is never visible before it is durable, and never lost
    /// across a restart once it was answered.
    async fn commit(
        &self,
        snap: &Snapshot,
        changed: HashMap<String, Arc<Service>>,
    ) -> Result<(), ChangeError> {
        let next = snap.with_services(&changed);
        let names: Vec<String> = changed.keys().cloned().collect();
        self.store
            .save(&Self::all_states(&next), &Self::all_states(snap), &names)
            .await?;
        self.routes.store(Arc::new(next));
        Ok(())
    }

    /// Flips one service to `to`. Refused (409) when the target pool has no healthy upstream or
    /// a smoke path fails, unless `force`.
    pub async fn flip(
        &self,
        name: &str,
        to: Color,
        force: bool,
        kind: FlipKind,
        actor: &str,
    ) -> Result<FlipOutcome, ChangeError> {
        let _w = self.writer.lock().await;
        let snap = self.snapshot();
        let svc = service_of(&snap, name)?;
        let from = svc.state.active;
        if from == to {
            return Ok(FlipOutcome {
                service: name.to_string(),
                from,
                to,
                generation: svc.state.generation,
                changed: false,
                message: format!("{name} is already on {to}; nothing to do"),
            });
        }
        if !force {
            self.preflight(&svc, to).await?;
        }
        let next = self.flipped(&svc, to, kind);
        let generation = next.state.generation;
        let mut changed = HashMap::new();
        changed.insert(name.to_string(), Arc::new(next));
        self.commit(&snap, changed).await?;
        self.metrics
            .flips_total
            .with_label_values(&[name, kind.reason()])
            .inc();
        let detail = format!(
            "{} {from} -> {to}{}",
            match kind {
                FlipKind::Manual => "flip",
                FlipKind::ManualRollback => "rollback",
                FlipKind::AutoRollback => "automatic rollback",
            },
            if force { " (forced)" } else { "" }
        );
        self.record(
            Event::new(name, kind.reason(), actor, detail)
                .colors(from, to)
                .generation(generation),
        )
        .await;
        Ok(FlipOutcome {
            service: name.to_string(),
            from,
            to,
            generation,
            changed: true,
            message: format!("{name} flipped {from} -> {to} (generation {generation})"),
        })
    }

    /// Flips every service to `to` in one atomic step: all checks first, then one store.
    pub async fn flip_all(
        &self,
        to: Color,
        force: bool,
        actor: &str,
    ) -> Result<Vec<FlipOutcome>, ChangeError> {
        let _w = self.writer.lock().await;
        let snap = self.snapshot();
        let mut changed = HashMap::new();
        let mut outcomes = Vec::new();
        for svc in &snap.services {
            let from = svc.state.active;
            if from == to {
                outcomes.push(FlipOutcome {
                    service: svc.name().to_string(),
                    from,
                    to,
                    generation: svc.state.generation,
                    changed: false,
                    message: format!("{} is already on {to}", svc.name()),
                });
                continue;
            }
            if !force {
                self.preflight(svc, to).await?;
            }
            let next = self.flipped(svc, to, FlipKind::Manual);
            outcomes.push(FlipOutcome {
                service: svc.name().to_string(),
                from,
                to,
                generation: next.state.generation,
                changed: true,
                message: format!(
                    "{} flipped {from} -> {to} (generation {})",
                    svc.name(),
                    next.state.generation
                ),
            });
            changed.insert(svc.name().to_string(), Arc::new(next));
        }
        if changed.is_empty() {
            return Ok(outcomes);
        }
        self.commit(&snap, changed).await?;
        for o in outcomes.iter().filter(|o| o.changed) {
            self.metrics
                .flips_total
                .with_label_values(&[o.service.as_str(), "manual"])
                .inc();
            self.events
                .record(
                    Event::new(
                        &o.service,
                        "manual",
                        actor,
                        format!(
                            "flip-all {} -> {}{}",
                            o.from,
                            o.to,
                            if force { " (forced)" } else { "" }
                        ),
                    )
                    .colors(o.from, o.to)
                    .generation(o.generation),
                )
                .await;
        }
        Ok(outcomes)
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
        self.flip(name, prev, force, FlipKind::ManualRollback, actor)
            .await
    }

    /// The rollback engine's flip: only if the service is still at `generation` (a manual
    /// change in between wins), never to a pool without a healthy upstream.
    pub async fn auto_rollback(
        &self,
        name: &str,
        generation: u64,
        detail: &str,
        trigger: serde_json::Value,
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
        let next = self.flipped(&svc, to, FlipKind::AutoRollback);
        let gen = next.state.generation;
        let mut changed = HashMap::new();
        changed.insert(name.to_string(), Arc::new(next));
        match self.commit(&snap, changed).await {
            Ok(()) => {}
            Err(ChangeError::Refused(why)) => {
                // Another replica changed this service first (most likely the same rollback).
                self.record(
                    Event::new(
                        name,
                        "rollback_conflict",
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
        self.metrics
            .flips_total
            .with_label_values(&[name, "auto_rollback"])
            .inc();
        let mut ev = Event::new(name, "auto_rollback", "rollback-engine", detail)
            .colors(from, to)
            .generation(gen);
        ev.trigger = Some(trigger);
        self.record(ev).await;
        Ok(Some(FlipOutcome {
            service: name.to_string(),
            from,
            to,
            generation: gen,
            changed: true,
            message: format!("{name} rolled back {from} -> {to}: {detail}"),
        }))
    }

    /// Pauses or resumes automatic rollback for a service (persisted; generation unchanged).
    pub async fn set_paused(
        &self,
        name: &str,
        paused: bool,
        actor: &str,
    ) -> Result<String, ChangeError> {
        let _w = self.writer.lock().await;
        let snap = self.snapshot();
        let svc = service_of(&snap, name)?;
        let word = if paused { "paused" } else { "resumed" };
        if svc.state.paused == paused {
            return Ok(format!("automatic rollback of {name} is already {word}"));
        }
        let mut state = svc.state.clone();
        state.paused = paused;
        let mut changed = HashMap::new();
        changed.insert(
            name.to_string(),
            Arc::new(svc.with_state(state, svc.flipped_at)),
        );
        self.commit(&snap, changed).await?;
        let reason = if paused { "pause" } else { "resume" };
        self.record(
            Event::new(name, reason, actor, format!("automatic rollback {word}"))
                .generation(svc.state.generation),
        )
        .await;
        Ok(format!("automatic rollback of {name} {word}"))
    }

    /// A copy of `svc` flipped to `to`, generation incremented.
    fn flipped(&self, svc: &Service, to: Color, kind: FlipKind) -> Service {
        let from = svc.state.active;
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
        svc.with_state(state, Some(Instant::now()))
    }

    /// Health and smoke checks before a flip to `to`.
    async fn preflight(&self, svc: &Service, to: Color) -> Result<(), ChangeError> {
        let pool = svc.pool(to);
        if pool.healthy_count() == 0 {
            return Err(ChangeError::Refused(format!(
                "{}: the {to} pool has no healthy upstream; pass \"force\": true to flip anyway",
                svc.name()
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
        let loaded = tokio::task::spawn_blocking(move || config::load(&path))
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
        if let (Some(tls), Some(cert), Some(key)) = (
            self.tls.get(),
            new_cfg.proxy.tls_cert.as_deref(),
            new_cfg.proxy.tls_key.as_deref(),
        ) {
            let (tls, cert, key) = (tls.clone(), cert.to_path_buf(), key.to_path_buf());
            let reloaded = tokio::task::spawn_blocking(move || tls.reload(Some(&cert), Some(&key)))
                .await
                .unwrap_or_else(|e| Err(format!("certificate reload task failed: {e}")));
            if let Err(e) = reloaded {
                self.metrics
                    .config_reloads_total
                    .with_label_values(&["error"])
                    .inc();
                return Err(ReloadError::Invalid(config::ConfigErrors(vec![
                    config::ConfigError {
                        key: if e.contains("private key") {
                            "proxy.tls_key".to_string()
                        } else {
                            "proxy.tls_cert".to_string()
                        },
                        message: e,
                    },
                ])));
            }
        }
        // Upstream names: looked up now; a name that fails keeps its last good addresses.
        let new_cfg = crate::resolve::resolve(new_cfg, Some(&self.snapshot().config)).await;
        Ok(self.apply_config(new_cfg, actor).await)
    }

    /// Publishes a validated config, keeping live colors, generations and unchanged upstreams.
    pub async fn apply_config(&self, new_cfg: Config, actor: &str) -> ReloadOutcome {
        let _w = self.writer.lock().await;
        let snap = self.snapshot();
        let old = &snap.config;
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
            ("admin.listen", old.admin.listen != new_cfg.admin.listen),
            (
                "admin.token_env",
                old.admin.token_env != new_cfg.admin.token_env,
            ),
            ("state", old.state != new_cfg.state),
            ("notify", old.notify != new_cfg.notify),
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
        let states = Self::all_states(&snap);
        let services = new_cfg.services.len();
        let next = build_snapshot(Arc::new(new_cfg), &states, Some(&snap), &self.metrics);
        self.routes.store(Arc::new(next));
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
            tracing::warn!(keys = ?restart_required, "config changes that need a restart");
        }
        self.record(Event::new("*", "reload", actor, message.clone()))
            .await;
        ReloadOutcome {
            services,
            restart_required,
            message,
        }
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
        self.routes.store(Arc::new(next));
        true
    }

    /// Records a blocked or dry-run rollback decision.
    pub async fn record_decision(
        &self,
        name: &str,
        reason: &str,
        (from, to): (Color, Color),
        generation: u64,
        detail: &str,
        trigger: serde_json::Value,
    ) {
        if reason == "rollback_blocked" {
            self.metrics
                .flips_total
                .with_label_values(&[name, "rollback_blocked"])
                .inc();
        }
        let mut ev = Event::new(name, reason, "rollback-engine", detail)
            .colors(from, to)
            .generation(generation);
        ev.trigger = Some(trigger);
        self.record(ev).await;
    }
}
