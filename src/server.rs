//! Listeners and lifecycle: binding, accept loops, connection limits, graceful shutdown, and the
//! background tasks (health checks, stats ticker, rollback watcher).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use http::Request;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::config::{Config, ProxyConfig, RuntimeFlavor};
use crate::guard::{ConnActivity, CountWindow, SendTimeout, StreamExec, Watchdog, CLOSE_FLUSH};
use crate::http::h2_server::{self, Settings as H2Settings};
use crate::http::io::Prefixed;
use crate::http::server::{BoxRead, BoxWrite, Reader};
use crate::proxy::{self, ClientBody, ConnInfo, Mode, Proxy};
use crate::state::StateStore;
use crate::tls::TlsSetup;
use crate::upgrade::{Handover, Inherited};

/// A running Switchyard: its bound addresses and the handle to stop it.
pub struct Running {
    pub app: Arc<App>,
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub preview_addr: Option<SocketAddr>,
    pub tls_addr: Option<SocketAddr>,
    /// The old process (this pid) gave up waiting for this one's upgrade and serves on: this
    /// one drains what it accepted meanwhile and exits 1.
    pub upgrade_refused: Option<u32>,
    tasks: JoinSet<()>,
    /// Extra accept threads of `runtime = "per_worker"`.
    threads: Vec<std::thread::JoinHandle<()>>,
    /// Closed once every extra worker has drained its listeners (each drops its sender).
    drained: Option<tokio::sync::mpsc::UnboundedReceiver<()>>,
    /// Lets the extra workers' runtimes go, once every worker has drained.
    release: tokio::sync::watch::Sender<bool>,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish within `shutdown_grace`, and returns.
    pub async fn shutdown(self) {
        self.app.shutdown.cancel();
        self.wait().await;
    }

    /// Waits until the listeners have stopped (after `app.shutdown` is cancelled).
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
        // The workers share the upstream pools, and a pooled connection is driven by the
        // runtime that opened it: a worker's runtime must outlive every other worker's drain,
        // or the requests still in flight there on its connections fail.
        if let Some(mut drained) = self.drained.take() {
            while drained.recv().await.is_some() {}
        }
        let _ = self.release.send(true);
        let threads = std::mem::take(&mut self.threads);
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// Everything `serve` needs besides the config.
pub struct Options {
    pub config_path: Option<PathBuf>,
    pub store: StateStore,
    pub admin_token: Option<String>,
}

/// Binds every listener and starts serving; returns once all are bound.
pub async fn start(config: Config, opts: Options) -> anyhow::Result<Running> {
    start_with(config, opts, Inherited::default()).await
}

/// As [`start`], on the listening sockets a running process handed over (`serve --upgrade`);
/// those it did not hand over are bound. The old process is told to drain once this one serves.
pub async fn start_with(
    config: Config,
    opts: Options,
    mut inherited: Inherited,
) -> anyhow::Result<Running> {
    // One process serves one state: a plain start beside a running one (the same state file or
    // upgrade socket) is refused before it binds or writes anything.
    let state_file = match opts.store.as_etcd() {
        None => opts.store.local_path(),
        Some(_) => None,
    };
    let state_lock = crate::upgrade::claim(
        state_file,
        config.proxy.upgrade_socket.clone(),
        &mut inherited,
    )
    .await?;
    // What SIGUSR2 starts: the path this process was started from, found while the binary
    // there is still this one.
    let _ = tokio::task::spawn_blocking(crate::upgrade::remember_binary).await;
    // Upstream names are resolved before the first request (README "Upstreams by name"). In an
    // upgrade, a name that fails keeps the old process's last good addresses.
    let mut config = config;
    if let Some(names) = inherited.names.take() {
        crate::resolve::carry_over_known(&mut config, &names);
    }
    let config = crate::resolve::resolve(config, None).await;
    let tls = match (
        &config.proxy.tls_listen,
        &config.proxy.tls_cert,
        &config.proxy.tls_key,
    ) {
        (Some(_), Some(cert), Some(key)) => Some(load_tls(cert, key, "proxy").await?),
        _ => None,
    };
    let admin_tls = match (&config.admin.tls_cert, &config.admin.tls_key) {
        (Some(cert), Some(key)) => Some(load_tls(cert, key, "admin").await?),
        _ => None,
    };
    let extra_workers = match config.proxy.runtime {
        RuntimeFlavor::PerWorker => config
            .proxy
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .saturating_sub(1),
        RuntimeFlavor::Shared => 0,
    };
    let inherit = &mut inherited;
    let proxy_listener = match inherit.take("proxy.listen", config.proxy.listen) {
        Some(l) => {
            // A plain socket (runtime "shared") shares its port with no other socket: the
            // other workers' SO_REUSEPORT sockets cannot be bound beside it.
            let shared = socket2::SockRef::from(&l).reuse_port().unwrap_or(true);
            if extra_workers > 0 && !shared {
                anyhow::bail!(
                    "--upgrade: [proxy] runtime = \"per_worker\" needs one SO_REUSEPORT socket per worker on proxy.listen ({}), and the running process (runtime \"shared\") hands over one plain socket that no other can share; change the runtime with a restart (stop the running process, then serve), not --upgrade. The running process keeps serving",
                    config.proxy.listen
                );
            }
            TcpListener::from_std(l)?
        }
        None => bind_with(config.proxy.listen, "proxy.listen", extra_workers > 0).await?,
    };
    let admin_listener = match inherit.take("admin.listen", config.admin.listen) {
        Some(l) => TcpListener::from_std(l)?,
        None => bind(config.admin.listen, "admin.listen").await?,
    };
    let preview_listener = match config.proxy.preview_listen {
        Some(a) => Some(match inherit.take("proxy.preview_listen", a) {
            Some(l) => TcpListener::from_std(l)?,
            None => bind(a, "proxy.preview_listen").await?,
        }),
        None => None,
    };
    // per_worker: TLS is served by every worker too (the handshake is most of its cost).
    let mut tls_workers = extra_workers;
    let tls_listener = match config.proxy.tls_listen {
        Some(a) => Some(match inherit.take("proxy.tls_listen", a) {
            Some(l) => {
                // From a process that served TLS on one thread (runtime "shared", or a
                // version that did so under per_worker): its plain socket cannot be shared.
                let shared = socket2::SockRef::from(&l).reuse_port().unwrap_or(true);
                if tls_workers > 0 && !shared {
                    tracing::warn!(
                        "--upgrade: the running process's proxy.tls_listen socket cannot be shared between workers: TLS is served by worker 0 alone until the next restart"
                    );
                    tls_workers = 0;
                }
                TcpListener::from_std(l)?
            }
            None => bind_with(a, "proxy.tls_listen", tls_workers > 0).await?,
        }),
        None => None,
    };
    // per_worker: the other workers' SO_REUSEPORT sockets, bound here so they can be handed over.
    let bound_proxy = proxy_listener.local_addr()?;
    let bound_tls = match &tls_listener {
        Some(l) if tls.is_some() => Some(l.local_addr()?),
        _ => None,
    };
    let mut worker_listeners = Vec::new();
    for i in 1..=extra_workers {
        let l = match inherit.take(&format!("proxy.listen#{i}"), bound_proxy) {
            Some(l) => l,
            None => bind_std_reuseport(bound_proxy, "proxy.listen")?,
        };
        let t = match bound_tls {
            Some(a) if i <= tls_workers => {
                Some(match inherit.take(&format!("proxy.tls_listen#{i}"), a) {
                    Some(l) => l,
                    None => bind_std_reuseport(a, "proxy.tls_listen")?,
                })
            }
            _ => None,
        };
        worker_listeners.push((l, t));
    }
    // The old process's worker sockets beyond this one's (fewer `workers`, or `shared` after
    // `per_worker`): they stay in the kernel's SO_REUSEPORT group while it drains, so this
    // process accepts on them too, dealt over its workers in turn (else the connections queued
    // there would wait unanswered and be reset when the old process exits). `true`: TLS.
    let mut spares: Vec<(String, std::net::TcpListener, bool)> = inherit
        .take_rest("proxy.listen#", bound_proxy)
        .into_iter()
        .map(|(k, l)| (k, l, false))
        .collect();
    if let Some(a) = bound_tls {
        let tls_spares = inherit.take_rest("proxy.tls_listen#", a);
        spares.extend(tls_spares.into_iter().map(|(k, l)| (k, l, true)));
    }
    // A worker's runtime is built here, so a start that cannot have every worker fails.
    let mut worker_runtimes = Vec::new();
    for i in 1..=extra_workers {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .with_context(|| format!("cannot start the runtime of worker {i}"))?;
        worker_runtimes.push(WorkerRuntime(Some(rt)));
    }
    let upgrade_socket = config.proxy.upgrade_socket.clone();
    let proxy_cfg = config.proxy.clone();
    crate::guard::check_nofile(&config);
    // A release file that cannot be read stops the start, as a corrupt state file does.
    if let Some(state) = opts
        .store
        .local_path()
        .filter(|_| opts.store.as_etcd().is_none())
    {
        tokio::task::spawn_blocking(move || crate::release::check_stored_file(&state))
            .await?
            .map_err(anyhow::Error::msg)?;
    }
    let app = App::new_handed(
        config,
        opts.config_path,
        opts.store,
        opts.admin_token,
        inherited.states.take(),
    )
    .await
    .context("cannot load or write the live state")?;
    app.set_file_checks(config_file_problems);
    let started = app.snapshot();
    if let Some(t) = &tls {
        app.set_tls_reloader(t.clone());
        if let Some(cert) = &started.config.proxy.tls_cert {
            app.note_certificate("proxy", t, cert);
        }
    }
    if let Some(t) = &admin_tls {
        app.set_admin_tls_reloader(t.clone());
        if let Some(cert) = &started.config.admin.tls_cert {
            app.note_certificate("admin", t, cert);
        }
    }
    let log_cfg = app.snapshot().config.log.clone();
    let request_id = log_cfg.request_id;
    let registry = app.metrics.registry.clone();
    let access = tokio::task::spawn_blocking(move || {
        crate::access_log::AccessLog::start(&log_cfg, &registry)
    })
    .await?
    .context("log.access: cannot open the access log")?;
    if let Some(log) = access {
        let _ = app.access_log.set(log);
    }
    let proxy = Arc::new(Proxy::new(
        app.routes.clone(),
        app.metrics.clone(),
        app.clock,
        app.shutdown.clone(),
        app.access_log.get().cloned(),
        request_id,
    ));
    // An old process that stopped waiting for this one (`proxy.upgrade_timeout`: a slow start,
    // e.g. names to resolve or a large config) keeps serving on its sockets: this one must not
    // serve beside it, nor take its upgrade socket.
    if !inherited.old_still_waits() {
        anyhow::bail!(
            "--upgrade: the running process (pid {}) stopped waiting for this one to start (its proxy.upgrade_timeout passed) and keeps serving; this one exits (raise proxy.upgrade_timeout there, reload it, and upgrade again)",
            inherited.old_pid
        );
    }
    // The listening sockets a later upgrade hands over, kept now (the servers take them). The
    // upgrade socket is bound only once this process is the server (after the old one's "go"):
    // until then the running one keeps its own.
    let mut kept: Vec<(String, std::os::fd::OwnedFd)> = Vec::new();
    {
        let mut sockets: Vec<(String, &dyn std::os::fd::AsFd)> = vec![
            ("proxy.listen".to_string(), &proxy_listener),
            ("admin.listen".to_string(), &admin_listener),
        ];
        if let Some(l) = &preview_listener {
            sockets.push(("proxy.preview_listen".to_string(), l));
        }
        if let Some(l) = &tls_listener {
            sockets.push(("proxy.tls_listen".to_string(), l));
        }
        for (i, (l, t)) in worker_listeners.iter().enumerate() {
            sockets.push((format!("proxy.listen#{}", i + 1), l));
            if let Some(t) = t {
                sockets.push((format!("proxy.tls_listen#{}", i + 1), t));
            }
        }
        for (key, l, _) in &spares {
            sockets.push((key.clone(), l));
        }
        for (key, sock) in sockets {
            match crate::upgrade::keep(&sock) {
                Ok(fd) => kept.push((key, fd)),
                Err(e) => {
                    tracing::warn!(error = %e, listener = %key, "cannot keep this socket for an upgrade")
                }
            }
        }
    }

    let proxy_addr = proxy_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let preview_addr = preview_listener.as_ref().and_then(|l| l.local_addr().ok());
    let tls_addr = tls_listener.as_ref().and_then(|l| l.local_addr().ok());

    crate::health::ensure(&app);
    let mut tasks = JoinSet::new();
    // The loops that keep the windows, rollbacks and triggers going are started again should
    // one panic (`switchyard_task_restarts_total`).
    let a = app.clone();
    tasks.spawn(app.supervised("stats_ticker", move || {
        crate::health::stats_ticker(a.clone())
    }));
    let a = app.clone();
    tasks.spawn(app.supervised("rollback_watcher", move || crate::watcher::run(a.clone())));
    // A release that was running when the process stopped goes on where it was.
    crate::release::resume(&app).await;
    let a = app.clone();
    tasks.spawn(app.supervised("analysis", move || {
        crate::analysis::run(a.clone(), a.shutdown.child_token())
    }));
    // Started again after a panic, it knows of nothing applied (an empty baseline): the file
    // as it is then is reloaded once it reads the same twice (at worst a reload that changes
    // nothing), so an edit made meanwhile is not missed.
    let mut baseline = Some(crate::config_watch::baseline(&app).await);
    let a = app.clone();
    tasks.spawn(app.supervised("config_watch", move || {
        let known = baseline.take().unwrap_or(Some(Vec::new()));
        crate::config_watch::run(a.clone(), known)
    }));
    let a = app.clone();
    tasks.spawn(app.supervised("dns_watch", move || crate::dns_watch::run(a.clone())));
    if let Some(etcd) = app.store.as_etcd() {
        // etcd delivers other replicas' changes; the app (the one writer) applies them. The
        // two run as one task, started again together (a new channel, a full read first)
        // should either panic: one without the other would leave this replica deaf to the
        // others for good.
        let (a, etcd) = (app.clone(), etcd.clone());
        tasks.spawn(app.supervised("etcd_sync", move || {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let sync = crate::state::etcd::sync(
                etcd.clone(),
                tx,
                a.metrics.state_degraded.clone(),
                a.shutdown.child_token(),
            );
            let a = a.clone();
            async move {
                tokio::join!(sync, a.follow_remote(rx));
            }
        }));
    }

    let limit = Arc::new(Semaphore::new(proxy_cfg.max_connections));
    let mut builder = h2_builder(&proxy_cfg);
    // An h2 stream the client resets before its answer counts as an HTTP/1 client that closes
    // its connection does.
    let cancelled = app.metrics.client_closed_requests_total.clone();
    builder.on_cancel = Some(crate::http::h2_server::OnCancel(Arc::new(move || {
        cancelled.inc()
    })));
    tasks.spawn(serve_proxy(
        app.clone(),
        proxy.clone(),
        proxy_listener,
        Mode::Live,
        None,
        limit.clone(),
        builder.clone(),
    ));
    if let Some(l) = preview_listener {
        tasks.spawn(serve_proxy(
            app.clone(),
            proxy.clone(),
            l,
            Mode::Preview,
            None,
            limit.clone(),
            builder.clone(),
        ));
    }
    if let (Some(l), Some(t)) = (tls_listener, tls.clone()) {
        tasks.spawn(serve_proxy(
            app.clone(),
            proxy.clone(),
            l,
            Mode::Live,
            Some(t),
            limit.clone(),
            builder.clone(),
        ));
    }
    let mut dealt: Vec<Vec<(std::net::TcpListener, bool)>> =
        (0..=extra_workers).map(|_| Vec::new()).collect();
    for (n, (key, l, is_tls)) in spares.into_iter().enumerate() {
        let worker = n % (extra_workers + 1);
        tracing::info!(
            listener = %key,
            worker,
            "upgrade: a socket of a worker the old process had beyond this one's: accepted on here too"
        );
        dealt[worker].push((l, is_tls));
    }
    let mut dealt = dealt.into_iter();
    for (l, is_tls) in dealt.next().unwrap_or_default() {
        let setup = if is_tls { tls.clone() } else { None };
        tasks.spawn(serve_proxy(
            app.clone(),
            proxy.clone(),
            TcpListener::from_std(l)?,
            Mode::Live,
            setup,
            limit.clone(),
            builder.clone(),
        ));
    }
    tasks.spawn(crate::admin::serve(app.clone(), admin_listener, admin_tls));
    let mut threads = Vec::new();
    let (drained_tx, drained) = tokio::sync::mpsc::unbounded_channel();
    let (release, released) = tokio::sync::watch::channel(false);
    let workers = worker_listeners.into_iter().zip(worker_runtimes).zip(dealt);
    for (i, (((plain, tls_l), rt), spares)) in (1..=extra_workers).zip(workers) {
        let mut listeners = vec![(plain, false)];
        listeners.extend(tls_l.map(|l| (l, true)));
        listeners.extend(spares);
        let worker = Worker {
            rt,
            listeners,
            tls: tls.clone(),
            drained: drained_tx.clone(),
            released: released.clone(),
        };
        let (a, p) = (app.clone(), proxy.clone());
        let (limit, builder) = (limit.clone(), builder.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("switchyard-w{i}"))
            .spawn(move || accept_thread(a, p, worker, limit, builder));
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => {
                // Its sockets would get a share of new connections that nobody accepts.
                app.shutdown.cancel();
                anyhow::bail!("cannot start worker thread {i}: {e}");
            }
        }
    }
    drop(drained_tx);
    tracing::info!(
        proxy = %proxy_addr,
        admin = %admin_addr,
        preview = preview_addr.map(tracing::field::display),
        tls = tls_addr.map(tracing::field::display),
        "switchyard is serving"
    );
    let old_pid = inherited.old_pid;
    let upgrade_refused = !inherited
        .ready(app.snapshot().config.proxy.upgrade_timeout)
        .await;
    if upgrade_refused {
        // It gave up just now, between the check above and here: it keeps serving, this one
        // drains what it accepted meanwhile and exits 1; systemd still follows the old one
        // (told of this one only with "go"), and the upgrade socket stays the old one's.
        app.shutdown.cancel();
    } else {
        if old_pid != 0 {
            tracing::info!(
                old_pid,
                "upgrade: serving on the old process's sockets; it drains now"
            );
        }
        app.write_after_takeover().await;
        match Handover::bind(&upgrade_socket) {
            Ok(mut h) => {
                for (key, fd) in kept {
                    h.add(key, fd);
                }
                if let Some(lock) = state_lock {
                    h.add_lock(lock);
                }
                tasks.spawn(h.run(app.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "serve --upgrade will not work for this process");
                // The state stays this process's until it stops serving.
                if let Some(lock) = state_lock {
                    let a = app.clone();
                    tasks.spawn(async move {
                        a.shutdown.cancelled().await;
                        drop(lock);
                    });
                }
            }
        }
    }
    Ok(Running {
        upgrade_refused: upgrade_refused.then_some(inherited.old_pid),
        app,
        proxy_addr,
        admin_addr,
        preview_addr,
        tls_addr,
        tasks,
        threads,
        drained: Some(drained),
        release,
    })
}

/// [`file_problems`] of the config read from `path`, and the access log refused there too:
/// each answered request would append a line to the config file.
pub fn config_file_problems(
    path: &std::path::Path,
    config: &Config,
) -> Vec<crate::config::ConfigError> {
    let mut problems = file_problems(config);
    if let crate::config::AccessTarget::File(access) = &config.log.access {
        if crate::config::same_path(access, path) {
            problems.push(access_collision(access, "the config file"));
        }
    }
    if let Some(what) = crate::config::state_file_at(&config.state.path, path) {
        problems.push(state_collision(
            &config.state.path,
            path,
            what,
            "the config file (--config)",
        ));
    }
    problems
}

/// `state.path` (or a file kept beside it, `what`) naming `path`, a file the config reads as
/// `read_as`: a flip would write JSON over it.
fn state_collision(
    state: &std::path::Path,
    path: &std::path::Path,
    what: &str,
    read_as: &str,
) -> crate::config::ConfigError {
    crate::config::ConfigError {
        key: "state.path".to_string(),
        message: format!(
            "state.path = {:?} makes {} {what}, but it is {read_as}: the state file is rewritten at every flip and moved aside by --reset-state, with files kept beside it; give it a path of its own",
            state.display().to_string(),
            path.display(),
        ),
    }
}

/// The files the config names for Switchyard to read, by key.
fn read_files(config: &Config) -> Vec<(&'static str, &std::path::Path)> {
    let mut files = Vec::new();
    let named = [
        ("proxy.tls_cert", config.proxy.tls_cert.as_deref()),
        ("proxy.tls_key", config.proxy.tls_key.as_deref()),
        ("admin.tls_cert", config.admin.tls_cert.as_deref()),
        ("admin.tls_key", config.admin.tls_key.as_deref()),
        ("analysis.ca_file", config.analysis.ca_file.as_deref()),
        ("notify.ca_file", config.notify.ca_file.as_deref()),
        (
            "proxy.resolve_hosts_file",
            config.proxy.resolve_hosts_file.as_deref(),
        ),
    ];
    for (key, path) in named {
        if let Some(path) = path {
            files.push((key, path));
        }
    }
    files
}

/// `log.access` naming a file another owner rewrites or reads back (the state file, the audit
/// log, the config file): each answered request would append a JSON line to it.
fn access_collision(path: &std::path::Path, what: &str) -> crate::config::ConfigError {
    crate::config::ConfigError {
        key: "log.access".to_string(),
        message: format!(
            "{:?} is {what}; the access log needs a path of its own",
            path.display().to_string()
        ),
    }
}

/// What `switchyard check` finds in the files the config names, as `serve` would at startup:
/// each TLS certificate and key read and matched (`proxy.tls_cert` / `tls_key` when
/// `proxy.tls_listen` is set, `admin.…`), each CA file read (`analysis.ca_file`,
/// `notify.ca_file`), and the access log's file writable or creatable. Each problem names its
/// key. Blocking.
pub fn file_problems(config: &Config) -> Vec<crate::config::ConfigError> {
    let mut problems = Vec::new();
    for (section, cert, key) in tls_pairs(config) {
        if let Err(e) = TlsSetup::new(cert, key) {
            let file = e.file();
            problems.push(crate::config::ConfigError {
                key: format!("{section}.{}", file.key()),
                message: e.to_string(),
            });
            // The certificate failed before the key was read: the key's own problem too, so
            // that one run names both.
            let key_too = matches!(
                e,
                crate::tls::TlsError::ReadCert { .. }
                    | crate::tls::TlsError::CertPem { .. }
                    | crate::tls::TlsError::NoCert { .. }
            );
            if let Some(e) = key_too.then(|| crate::tls::load_key(key).err()).flatten() {
                problems.push(crate::config::ConfigError {
                    key: format!("{section}.tls_key"),
                    message: e.to_string(),
                });
            }
        }
    }
    // The state file is rewritten, moved aside by `--reset-state` when unreadable, and has
    // files kept beside it: none of them may be a file another key names for reading.
    for (key, path) in read_files(config) {
        if let Some(what) = crate::config::state_file_at(&config.state.path, path) {
            problems.push(state_collision(&config.state.path, path, what, key));
        }
    }
    // A CA file the config names must hold a usable certificate: one that cannot would fail
    // every `https://` check (no rollback rule conclusive) or webhook, long after the start.
    let cas = [
        ("analysis.ca_file", &config.analysis.ca_file),
        ("notify.ca_file", &config.notify.ca_file),
    ];
    for (key, path) in cas {
        if let Some(Err(message)) = path
            .as_deref()
            .map(|p| crate::tls::client_config(Some(p), ""))
        {
            problems.push(crate::config::ConfigError {
                key: key.to_string(),
                message,
            });
        }
    }
    // A bearer token no client could send in a header (a line break inside it, a character
    // outside ASCII) would make every admin call a 401, or every Prometheus rule inconclusive.
    let tokens = [
        ("admin.token_env", Some(&config.admin.token_env)),
        (
            "analysis.prometheus_token_env",
            config.analysis.prometheus_token_env.as_ref(),
        ),
    ];
    for (key, var) in tokens {
        let Some(var) = var else { continue };
        let why = match std::env::var(var) {
            Ok(t) => crate::http::headers::bearer_token(&t).err(),
            Err(std::env::VarError::NotUnicode(_)) => Some("it is not UTF-8"),
            Err(std::env::VarError::NotPresent) => None,
        };
        if let Some(why) = why {
            problems.push(crate::config::ConfigError {
                key: key.to_string(),
                message: format!(
                    "the token in {var} cannot be sent in an Authorization header: {why}"
                ),
            });
        }
    }
    // The upgrade socket replaces only a stale socket: anything else there (the config file,
    // the state file) would stop `serve`, and is never removed.
    let sock = &config.proxy.upgrade_socket;
    if let Ok(m) = std::fs::symlink_metadata(sock) {
        if !std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) {
            problems.push(crate::config::ConfigError {
                key: "proxy.upgrade_socket".to_string(),
                message: crate::upgrade::not_a_socket(sock, &m),
            });
        }
    }
    // The state file is a file: a directory there would refuse every start (and is never
    // moved aside by --reset-state).
    if config.state.path.is_dir() {
        problems.push(crate::config::ConfigError {
            key: "state.path".to_string(),
            message: format!(
                "{} is a directory; name the state file inside it, e.g. {}",
                config.state.path.display(),
                config.state.path.join("switchyard.json").display()
            ),
        });
    }
    // Its directory is created when missing; a file where a directory of it must be is named
    // here, not found later as an unreadable release file or a lock that "exists".
    if let Some(file) = config
        .state
        .path
        .parent()
        .and_then(|d| {
            d.ancestors()
                .find(|a| !a.as_os_str().is_empty() && a.exists())
        })
        .filter(|a| !a.is_dir())
    {
        problems.push(crate::config::ConfigError {
            key: "state.path".to_string(),
            message: format!(
                "{} is not a directory: the state file {} cannot be made under it",
                file.display(),
                config.state.path.display()
            ),
        });
    }
    if let crate::config::AccessTarget::File(path) = &config.log.access {
        if let Some(what) = crate::config::state_file_at(&config.state.path, path) {
            problems.push(access_collision(path, what));
        }
        // An existing file must open for appending; a new one needs its directory (nothing is
        // created here).
        let fault = if path.exists() {
            crate::access_log::opens(path).err().map(|e| e.to_string())
        } else {
            match path.parent().filter(|d| !d.as_os_str().is_empty()) {
                Some(dir) if !dir.is_dir() => Some(format!("no directory {}", dir.display())),
                _ => None,
            }
        };
        if let Some(fault) = fault {
            problems.push(crate::config::ConfigError {
                key: "log.access".to_string(),
                message: format!("cannot open the access log {}: {fault}", path.display()),
            });
        }
    }
    problems
}

/// The certificate and key pairs `serve` reads, by section: the proxy's only with a TLS
/// listener.
fn tls_pairs(config: &Config) -> Vec<(&'static str, &std::path::Path, &std::path::Path)> {
    let proxy = (
        config.proxy.tls_listen.as_ref(),
        config.proxy.tls_cert.as_deref(),
        config.proxy.tls_key.as_deref(),
    );
    let mut pairs = Vec::new();
    if let (Some(_), Some(cert), Some(key)) = proxy {
        pairs.push(("proxy", cert, key));
    }
    if let (Some(cert), Some(key)) = (
        config.admin.tls_cert.as_deref(),
        config.admin.tls_key.as_deref(),
    ) {
        pairs.push(("admin", cert, key));
    }
    pairs
}

/// `check`'s `warning:` lines: for the files the config names, a certificate expired, not yet
/// valid, or within two weeks of its end (served all the same, as nginx and HAProxy serve it,
/// but every client refuses it); a config that is valid but cannot do what it says (a trigger
/// that never sees what it reads, an upstream that is this proxy). Blocking.
pub fn file_warnings(config: &Config) -> Vec<String> {
    let now = std::time::SystemTime::now();
    let mut out: Vec<String> = tls_pairs(config)
        .into_iter()
        .filter_map(|(section, cert, key)| {
            let ck = crate::tls::load_certified_key(cert, key).ok()?;
            let w = crate::tls::validity_warning(&ck, cert, now)?;
            Some(format!("warning: {section}.tls_cert: {w}"))
        })
        .collect();
    // `serve` starts all the same, and says so only in its log.
    let sock = &config.proxy.upgrade_socket;
    if std::os::unix::net::SocketAddr::from_pathname(sock).is_err() {
        out.push(format!(
            "warning: proxy.upgrade_socket: {} ({} bytes) is too long for a Unix socket path: `serve --upgrade` and SIGUSR2 will not work; set a shorter proxy.upgrade_socket",
            sock.display(),
            sock.as_os_str().len()
        ));
    }
    let own: Vec<(SocketAddr, &str)> = [
        Some((config.proxy.listen, "proxy.listen")),
        config.proxy.tls_listen.map(|a| (a, "proxy.tls_listen")),
        config
            .proxy
            .preview_listen
            .map(|a| (a, "proxy.preview_listen")),
        Some((config.admin.listen, "admin.listen")),
    ]
    .into_iter()
    .flatten()
    .collect();
    for (i, svc) in config.services.iter().enumerate() {
        for (j, t) in svc.rollback.triggers.iter().enumerate() {
            if t.kind == crate::config::TriggerKind::Unhealthy && svc.health.is_none() {
                out.push(format!(
                    "warning: services[{i}].rollback.triggers[{j}]: kind \"unhealthy\" counts healthy upstreams, and service {:?} has no [services.health]: every upstream counts as healthy unless passive ejection (proxy.eject_after) takes it out; add a health check",
                    svc.name
                ));
            }
        }
        for color in crate::config::Color::ALL {
            for up in &svc.pool(color).upstreams {
                // A wildcard listener takes a loopback or local address too; only the exact
                // address and 127.0.0.1 against 0.0.0.0 are named (others may be another host).
                // `0.0.0.0` takes IPv4 only; `[::]` both (it is bound dual-stack).
                let loops = own.iter().find(|(a, _)| {
                    let wildcard = a.ip().is_unspecified()
                        && up.ip().is_loopback()
                        && (a.is_ipv6() || up.is_ipv4());
                    a.port() == up.port() && (a.ip() == up.ip() || wildcard)
                });
                if let Some((_, key)) = loops {
                    let what = match *key {
                        "admin.listen" => "would reach its admin API",
                        _ => "would come back to it",
                    };
                    out.push(format!(
                        "warning: services[{i}].{color}.upstreams: {up} is this Switchyard's own {key}: requests to service {:?} on {color} {what}",
                        svc.name
                    ));
                }
            }
        }
    }
    out
}

/// Reads a certificate and key off the runtime's threads. An error names the one key of
/// `section` (`proxy` or `admin`) whose file is at fault, `tls_cert` or `tls_key`, and why.
async fn load_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
    section: &str,
) -> anyhow::Result<TlsSetup> {
    let (cert, key) = (cert.to_path_buf(), key.to_path_buf());
    tokio::task::spawn_blocking(move || TlsSetup::new(&cert, &key))
        .await?
        .map_err(|e| anyhow::anyhow!("{section}.{}: {e}", e.file().key()))
}

/// A worker's runtime until its thread runs it. Dropped before that (a start that fails
/// later), it is shut down without waiting: a runtime must not be dropped, which blocks, inside
/// another's async context.
struct WorkerRuntime(Option<tokio::runtime::Runtime>);

impl Drop for WorkerRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// One `per_worker` worker beyond worker 0: its runtime, its listening sockets (`true`: TLS),
/// and how it ends: it says it has drained (dropping `drained`), then keeps its runtime
/// running until `released` (every worker has drained; see [`Running::wait`]).
struct Worker {
    rt: WorkerRuntime,
    listeners: Vec<(std::net::TcpListener, bool)>,
    tls: Option<TlsSetup>,
    drained: tokio::sync::mpsc::UnboundedSender<()>,
    released: tokio::sync::watch::Receiver<bool>,
}

/// One `per_worker` thread: its own current-thread runtime accepting on its own
/// `SO_REUSEPORT` sockets (plain, and TLS when configured); the kernel spreads new connections
/// over the workers' sockets.
fn accept_thread(
    app: Arc<App>,
    proxy: Arc<Proxy>,
    worker: Worker,
    limit: Arc<Semaphore>,
    h2: H2Settings,
) {
    let Worker {
        mut rt,
        listeners,
        tls,
        drained,
        mut released,
    } = worker;
    // Taken out: dropped at the end of this thread, outside any runtime, it may wait.
    let Some(rt) = rt.0.take() else { return };
    rt.block_on(async move {
        let mut serving = Vec::new();
        for (l, is_tls) in listeners {
            let setup = if is_tls { tls.clone() } else { None };
            match TcpListener::from_std(l) {
                Ok(l) => serving.push(serve_proxy(
                    app.clone(),
                    proxy.clone(),
                    l,
                    Mode::Live,
                    setup,
                    limit.clone(),
                    h2.clone(),
                )),
                Err(e) => tracing::error!(error = %e, "a worker cannot listen"),
            }
        }
        futures_util::future::join_all(serving).await;
        drop(drained);
        // Upstream connections opened here may still carry other workers' requests.
        let _ = released.wait_for(|r| *r).await;
    });
}

/// A `per_worker` socket beside `proxy.listen` or `proxy.tls_listen`, bound off the runtime
/// (its thread adopts it).
fn bind_std_reuseport(addr: SocketAddr, key: &str) -> anyhow::Result<std::net::TcpListener> {
    bind_socket(addr, key, true)
}

async fn bind(addr: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    bind_with(addr, key, false).await
}

async fn bind_with(addr: SocketAddr, key: &str, reuseport: bool) -> anyhow::Result<TcpListener> {
    if reuseport && addr.port() != 0 {
        // SO_REUSEPORT would let this socket join another process's group on the address (a
        // second Switchyard, any listener that set it) and share its connections: a socket
        // without it cannot be bound beside a listening one, so "address in use" still says so.
        probe_free(addr).with_context(|| format!("{key}: cannot listen on {addr}"))?;
    }
    TcpListener::from_std(bind_socket(addr, key, reuseport)?)
        .with_context(|| format!("{key}: cannot listen on {addr}"))
}

/// Binds `addr` without listening (no connection can land there) and lets it go: an error if
/// something listens on it.
fn probe_free(addr: SocketAddr) -> std::io::Result<()> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())
}

/// A listening socket, non-blocking. An IPv6 one is dual-stack whatever the host's
/// `net.ipv6.bindv6only` says (`IPV6_V6ONLY` off): `[::]:P` takes IPv4 too, as `check` assumes
/// when it refuses `[::]:P` beside an IPv4 listener on the same port.
fn bind_socket(
    addr: SocketAddr,
    key: &str,
    reuseport: bool,
) -> anyhow::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)
        .with_context(|| format!("{key}: cannot create a socket"))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_reuse_address(true)?;
    if reuseport {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("{key}: cannot listen on {addr}"))?;
    socket
        .listen(4096)
        .with_context(|| format!("{key}: cannot listen on {addr}"))?;
    Ok(socket.into())
}

/// h2 (prior knowledge on plain listeners, ALPN on TLS) is served by `http::h2_server`; the
/// PING finds clients that vanished with a stream open.
fn h2_builder(cfg: &ProxyConfig) -> H2Settings {
    H2Settings {
        max_concurrent_streams: cfg.h2_max_concurrent_streams,
        max_header_list_size: cfg.max_header_bytes as u32,
        keep_alive_interval: Some(Duration::from_secs(30)),
        keep_alive_timeout: Duration::from_secs(20),
        head_timeout: Some(cfg.header_read_timeout),
        on_cancel: None,
    }
}

async fn serve_proxy(
    app: Arc<App>,
    proxy: Arc<Proxy>,
    listener: TcpListener,
    mode: Mode,
    tls: Option<TlsSetup>,
    limit: Arc<Semaphore>,
    h2: H2Settings,
) {
    // h2 connections get a GOAWAY at shutdown; HTTP/1 connections close once idle.
    let graceful = GracefulShutdown::new();
    let conns = TaskTracker::new();
    loop {
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = app.shutdown.cancelled() => break,
        };
        // The slot after the accept: a loop waiting for a client with a slot in hand kept it
        // from every other listener (each idle listener one slot fewer; with a limit of 1, one
        // listener never served). Over the limit, this connection waits here for a slot, the
        // next ones in the listen backlog.
        let permit = match limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => tokio::select! {
                p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = app.shutdown.cancelled() => break,
            },
        };
        let _ = stream.set_nodelay(true);
        let info = Arc::new(ConnInfo::new(remote, tls.is_some(), mode).holding(permit));
        let snap = app.snapshot();
        // One deadline from the accept for the TLS handshake and the first request head.
        let deadline = tokio::time::Instant::now() + snap.config.proxy.header_read_timeout;
        let conn = Connection {
            app: app.clone(),
            proxy: proxy.clone(),
            info,
            h2: h2.clone(),
            watcher: graceful.watcher(),
            deadline,
            limits: ConnLimits::from(&snap.config.proxy),
        };
        drop(snap);
        // Each connection's future (the HTTP/1 server and, for h2, hyper's connection, a few
        // KB) is boxed and built in place: the task tracker and tokio's task cell then move a
        // pointer instead of copying it on every spawn.
        match &tls {
            None => {
                let serve = conn.serve(stream, split_tcp, Speaks::Either);
                conns.spawn(Box::into_pin(Box::write(Box::new_uninit(), serve)));
            }
            Some(t) => {
                let acceptor = t.acceptor();
                let serve = async move {
                    // A connection that has sent nothing shortly after shutdown begins is
                    // dropped (no request is on its way). One whose ClientHello has come
                    // finishes its handshake within `header_read_timeout` from the accept, so
                    // that a client far away (a round trip of more than the 250 ms) is served
                    // through an upgrade: its first request is answered with `connection: close`.
                    let mut byte = [0u8; 1];
                    let first = tokio::time::timeout_at(deadline, stream.peek(&mut byte));
                    let count = |how| conn.app.metrics.count_handshake(false, how);
                    tokio::select! {
                        biased;
                        r = first => match r {
                            Ok(Ok(n)) if n > 0 => {}
                            // Closed before a byte.
                            Ok(Ok(_)) => return,
                            Ok(Err(_)) => return count(crate::metrics::Handshake::Error),
                            Err(_) => return count(crate::metrics::Handshake::Timeout),
                        },
                        () = shutdown_then(&conn.app, IDLE_AT_SHUTDOWN) => return,
                    }
                    let stream =
                        match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => {
                                count(crate::metrics::Handshake::Ok);
                                s
                            }
                            Ok(Err(e)) => {
                                count(crate::metrics::Handshake::Error);
                                tracing::debug!(error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return count(crate::metrics::Handshake::Timeout),
                        };
                    // What ALPN agreed on: h2 over TLS is negotiated, never assumed from a
                    // preface (RFC 9113 3.4).
                    let speaks = if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                        Speaks::H2
                    } else {
                        Speaks::H1
                    };
                    conn.serve(stream, tokio::io::split, speaks).await;
                };
                conns.spawn(Box::into_pin(Box::write(Box::new_uninit(), serve)));
            }
        }
    }
    drop(listener);
    // Read now: a reload may have changed it since the listener started.
    let grace = app.snapshot().config.proxy.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    conns.close();
    let open = conns.len();
    if open > 0 {
        tracing::info!(
            connections = open,
            listener = "proxy",
            "draining connections"
        );
    }
    let drained = tokio::time::timeout_at(deadline, async {
        tokio::join!(graceful.shutdown(), conns.wait());
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            listener = "proxy",
            grace = %humantime::format_duration(grace),
            "shutdown grace elapsed; closing the remaining connections"
        );
    }
    // Tunnels left their connections when they upgraded: they get what is left of the grace.
    proxy.tunnels().drain(deadline).await;
}

/// How long a client connection that is idle when shutdown begins (or that was accepted and has
/// sent nothing yet) is kept for a request already on its way. Closing it at once would race a
/// keep-alive client's next request; nginx and HAProxy have the same window.
pub const IDLE_AT_SHUTDOWN: Duration = Duration::from_millis(250);

/// A plain client connection's halves; the write half can end it with a reset (a cut
/// close-delimited response).
fn split_tcp(stream: TcpStream) -> (tokio::net::tcp::OwnedReadHalf, crate::http::io::TcpWrite) {
    let (r, w) = stream.into_split();
    (r, crate::http::io::TcpWrite::new(w))
}

/// Completes `linger` after shutdown begins.
async fn shutdown_then(app: &App, linger: Duration) {
    app.shutdown.cancelled().await;
    tokio::time::sleep(linger).await;
}

/// One accepted client connection, before it is known to speak HTTP/1 or h2.
struct Connection {
    app: Arc<App>,
    proxy: Arc<Proxy>,
    info: Arc<ConnInfo>,
    h2: H2Settings,
    watcher: Watcher,
    /// When the first request head must have arrived (`header_read_timeout` from the accept).
    deadline: tokio::time::Instant,
    limits: ConnLimits,
}

/// The deadlines against slow and silent clients, read once per connection.
#[derive(Clone, Copy)]
struct ConnLimits {
    send_timeout: Duration,
    h2_idle_timeout: Duration,
}

impl From<&ProxyConfig> for ConnLimits {
    fn from(p: &ProxyConfig) -> ConnLimits {
        ConnLimits {
            send_timeout: p.client_send_timeout,
            h2_idle_timeout: p.h2_idle_timeout,
        }
    }
}

/// What an h2 client sends first (RFC 9113 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a client connection may speak, as its transport decided.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Speaks {
    /// Plain TCP: h2 with prior knowledge (its preface) or HTTP/1.
    Either,
    /// TLS whose ALPN agreed on h2.
    H2,
    /// TLS without h2 agreed: HTTP/1 only (prior knowledge is for cleartext, RFC 9113 3.4).
    H1,
}

impl Connection {
    /// Reads the first bytes within the connection's first deadline (the TLS handshake's
    /// too): the h2 preface goes to hyper, anything else to our HTTP/1 server, as `speaks`
    /// allows. An h2 connection over TLS is held to the same deadline for its preface.
    async fn serve<S, R, W>(self, mut io: S, split: impl FnOnce(S) -> (R, W), speaks: Speaks)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
        R: AsyncRead + Send + Unpin + 'static,
        W: crate::http::io::WriteHalf + 'static,
    {
        let deadline = self.deadline;
        let mut first = BytesMut::new();
        let first_read = tokio::time::timeout_at(deadline, async {
            loop {
                let before = first.len();
                let n = std::future::poll_fn(|cx| {
                    let mut tmp = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
                    let mut rb = tokio::io::ReadBuf::uninit(&mut tmp);
                    std::task::ready!(Pin::new(&mut io).poll_read(cx, &mut rb))?;
                    first.extend_from_slice(rb.filled());
                    std::task::Poll::Ready(Ok::<_, std::io::Error>(rb.filled().len()))
                })
                .await?;
                let undecided = speaks != Speaks::H1
                    && first.len() < H2_PREFACE.len()
                    && H2_PREFACE.starts_with(&first);
                if n == 0 || !undecided {
                    return Ok::<_, std::io::Error>(first.len() > before || before > 0);
                }
            }
        });
        // A connection that has sent nothing yet (a browser's preconnect) holds up no shutdown
        // for longer than IDLE_AT_SHUTDOWN: a client that has just connected gets its request
        // (answered with `connection: close`) rather than a closed connection.
        let read = tokio::select! {
            // Bytes already there are read first: a request that arrived is not dropped.
            biased;
            read = first_read => read.ok(),
            () = shutdown_then(&self.app, IDLE_AT_SHUTDOWN) => None,
        };
        match read {
            Some(Ok(true)) => {}
            // Nothing in time (or before shutdown), or the client's end: closed cleanly (TLS
            // close_notify, FIN), bounded, since the client may not read.
            None | Some(Ok(false)) => {
                let _ = tokio::time::timeout(CLOSE_FLUSH, io.shutdown()).await;
                return;
            }
            Some(Err(_)) => return,
        }
        let h2 = match speaks {
            Speaks::Either => first.starts_with(H2_PREFACE),
            // Whatever came: hyper answers a wrong preface with a GOAWAY.
            Speaks::H2 => true,
            Speaks::H1 => false,
        };
        if h2 {
            // Boxed: hyper's h2 connection is large, and most connections never need it.
            Box::pin(self.serve_h2(io, first.freeze())).await;
            return;
        }
        let (r, w) = split(io);
        // Each half boxed once (the write half with its send timeout inside the same box).
        let w: BoxWrite = Box::new(SendTimeout::new(w, self.limits.send_timeout));
        let r = Reader::new(Box::new(r) as BoxRead, first);
        proxy::serve_h1(r, w, self.proxy, self.info, deadline, IDLE_AT_SHUTDOWN).await;
    }

    async fn serve_h2<S>(self, io: S, read: Bytes)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let Connection {
            app,
            proxy,
            info,
            h2,
            watcher,
            limits,
            ..
        } = self;
        // Shutdown reaches this connection through the watchdog, not the listener's watcher.
        drop(watcher);
        let shutdown = app.clone();
        let activity = ConnActivity::new();
        let window = activity.clone();
        let heard = activity.clone();
        let dog = Watchdog::new(
            activity.clone(),
            limits.h2_idle_timeout,
            Some(limits.send_timeout),
        );
        let svc = move |req: Request<h2_server::RequestBody>| {
            // The stream's task, which the connection spawns next, can be stopped by the
            // watchdog.
            let stream = activity.open_stream();
            let activity = activity.clone();
            let proxy = proxy.clone();
            let info = info.clone();
            // Boxed once and built in place: the stream's future moves into the executor's
            // task, which copied the >2 KB request future each time it was not behind a pointer.
            Box::into_pin(Box::write(Box::new_uninit(), async move {
                let req = req.map(ClientBody::H2);
                let resp = proxy::handle(&proxy, req, &info, None).await;
                resp.map(|b| activity.track(b, stream))
            }))
        };
        let io = SendTimeout::new(io, limits.send_timeout);
        let io = CountWindow::new(Prefixed { read, io }, window);
        let conn = std::pin::pin!(h2_server::Connection::new(io, &h2, svc, StreamExec));
        crate::guard::watch(
            conn,
            dog,
            &shutdown.shutdown,
            limits.send_timeout,
            |c| c.graceful_shutdown(),
            |c| c.close(),
            |c, now| c.keep_alive(now, heard.heard()),
        )
        .await;
    }
}
