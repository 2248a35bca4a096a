//! Listeners and lifecycle: binding, accept loops, connection limits, graceful shutdown, and the
//! background tasks (health checks, stats ticker, rollback watcher).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::app::App;
use crate::config::{Config, ProxyConfig, RuntimeFlavor};
use crate::h1_guard::H1Guard;
use crate::proxy::{self, ConnInfo, Mode};
use crate::state::StateStore;
use crate::tls::TlsSetup;

/// A running Switchyard: its bound addresses and the handle to stop it.
pub struct Running {
    pub app: Arc<App>,
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub preview_addr: Option<SocketAddr>,
    pub tls_addr: Option<SocketAddr>,
    tasks: JoinSet<()>,
    /// Extra accept threads of `runtime = "per_worker"`.
    threads: Vec<std::thread::JoinHandle<()>>,
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
    let tls = match (
        &config.proxy.tls_listen,
        &config.proxy.tls_cert,
        &config.proxy.tls_key,
    ) {
        (Some(_), Some(cert), Some(key)) => {
            Some(load_tls(cert, key, "proxy.tls_cert / proxy.tls_key").await?)
        }
        _ => None,
    };
    let admin_tls = match (&config.admin.tls_cert, &config.admin.tls_key) {
        (Some(cert), Some(key)) => {
            Some(load_tls(cert, key, "admin.tls_cert / admin.tls_key").await?)
        }
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
    let proxy_listener = bind_with(config.proxy.listen, "proxy.listen", extra_workers > 0).await?;
    let admin_listener = bind(config.admin.listen, "admin.listen").await?;
    let preview_listener = match config.proxy.preview_listen {
        Some(a) => Some(bind(a, "proxy.preview_listen").await?),
        None => None,
    };
    let tls_listener = match config.proxy.tls_listen {
        Some(a) => Some(bind(a, "proxy.tls_listen").await?),
        None => None,
    };
    let proxy_cfg = config.proxy.clone();
    let app = App::new(config, opts.config_path, opts.store, opts.admin_token)
        .await
        .context("cannot load the live state")?;
    if let Some(t) = &tls {
        app.set_tls_reloader(t.clone());
    }

    let proxy_addr = proxy_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let preview_addr = preview_listener.as_ref().and_then(|l| l.local_addr().ok());
    let tls_addr = tls_listener.as_ref().and_then(|l| l.local_addr().ok());

    crate::health::ensure(&app);
    let mut tasks = JoinSet::new();
    tasks.spawn(crate::health::stats_ticker(app.clone()));
    tasks.spawn(crate::watcher::run(app.clone()));
    if let Some(etcd) = app.store.as_etcd() {
        tasks.spawn(crate::etcd::sync(app.clone(), etcd.clone()));
    }

    let limit = Arc::new(Semaphore::new(proxy_cfg.max_connections));
    let builder = proxy_builder(&proxy_cfg);
    tasks.spawn(serve_proxy(
        app.clone(),
        proxy_listener,
        Mode::Live,
        None,
        limit.clone(),
        builder.clone(),
    ));
    if let Some(l) = preview_listener {
        tasks.spawn(serve_proxy(
            app.clone(),
            l,
            Mode::Preview,
            None,
            limit.clone(),
            builder.clone(),
        ));
    }
    if let (Some(l), Some(t)) = (tls_listener, tls) {
        tasks.spawn(serve_proxy(
            app.clone(),
            l,
            Mode::Live,
            Some(t),
            limit.clone(),
            builder.clone(),
        ));
    }
    tasks.spawn(crate::admin::serve(app.clone(), admin_listener, admin_tls));
    let mut threads = Vec::new();
    for i in 1..=extra_workers {
        let (app, limit, builder) = (app.clone(), limit.clone(), builder.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("switchyard-w{i}"))
            .spawn(move || accept_thread(app, proxy_addr, limit, builder));
        match spawned {
            Ok(t) => threads.push(t),
            Err(e) => tracing::error!(error = %e, "cannot start worker thread {i}"),
        }
    }

    tracing::info!(
        proxy = %proxy_addr,
        admin = %admin_addr,
        preview = ?preview_addr,
        tls = ?tls_addr,
        "switchyard is serving"
    );
    Ok(Running {
        app,
        proxy_addr,
        admin_addr,
        preview_addr,
        tls_addr,
        tasks,
        threads,
    })
}

/// Reads a certificate and key off the runtime's threads.
async fn load_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
    keys: &str,
) -> anyhow::Result<TlsSetup> {
    let (cert, key) = (cert.to_path_buf(), key.to_path_buf());
    tokio::task::spawn_blocking(move || TlsSetup::new(&cert, &key))
        .await?
        .map_err(|e| anyhow::anyhow!("{keys}: {e}"))
}

/// One `per_worker` thread: its own current-thread runtime accepting on its own
/// `SO_REUSEPORT` socket; the kernel spreads new connections over the sockets.
fn accept_thread(
    app: Arc<App>,
    addr: SocketAddr,
    limit: Arc<Semaphore>,
    builder: auto::Builder<TokioExecutor>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start a worker runtime");
            return;
        }
    };
    rt.block_on(async move {
        match bind_with(addr, "proxy.listen", true).await {
            Ok(l) => serve_proxy(app, l, Mode::Live, None, limit, builder).await,
            Err(e) => tracing::error!(error = %e, "worker cannot listen"),
        }
    });
}

async fn bind(addr: SocketAddr, key: &str) -> anyhow::Result<TcpListener> {
    bind_with(addr, key, false).await
}

async fn bind_with(addr: SocketAddr, key: &str, reuseport: bool) -> anyhow::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .with_context(|| format!("{key}: cannot create a socket"))?;
    socket.set_reuseaddr(true)?;
    if reuseport {
        socket.set_reuseport(true)?;
    }
    socket
        .bind(addr)
        .with_context(|| format!("{key}: cannot listen on {addr}"))?;
    socket
        .listen(4096)
        .with_context(|| format!("{key}: cannot listen on {addr}"))
}

fn proxy_builder(cfg: &ProxyConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_headers(cfg.max_headers)
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.h2_max_concurrent_streams)
        .max_header_list_size(cfg.max_header_bytes as u32)
        .max_pending_accept_reset_streams(Some(50))
        .max_local_error_reset_streams(Some(256))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

async fn serve_proxy(
    app: Arc<App>,
    listener: TcpListener,
    mode: Mode,
    tls: Option<TlsSetup>,
    limit: Arc<Semaphore>,
    builder: auto::Builder<TokioExecutor>,
) {
    let graceful = GracefulShutdown::new();
    let grace = app.snapshot().config.proxy.shutdown_grace;
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = app.shutdown.cancelled() => break,
        };
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
        let _ = stream.set_nodelay(true);
        let info = Arc::new(ConnInfo::new(remote, tls.is_some(), mode).holding(permit));
        let app2 = app.clone();
        let svc = service_fn(move |req| {
            let app = app2.clone();
            let info = info.clone();
            async move { Ok::<_, Infallible>(proxy::handle(&app, req, &info).await) }
        });
        let watcher = graceful.watcher();
        let builder = builder.clone();
        match &tls {
            None => {
                let io = TokioIo::new(H1Guard::new(stream).counted(app.metrics.clone()));
                let conn = builder.serve_connection_with_upgrades(io, svc);
                let fut = watcher.watch(conn.into_owned());
                tokio::spawn(fut);
            }
            Some(t) => {
                let acceptor = t.acceptor();
                let metrics = app.metrics.clone();
                let handshake_timeout = app.snapshot().config.proxy.header_read_timeout;
                tokio::spawn(async move {
                    let stream = match tokio::time::timeout(
                        handshake_timeout,
                        acceptor.accept(stream),
                    )
                    .await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let io = TokioIo::new(H1Guard::new(stream).counted(metrics));
                    let conn = builder.serve_connection_with_upgrades(io, svc);
                    let _ = watcher.watch(conn.into_owned()).await;
                });
            }
        }
    }
    drop(listener);
    let deadline = tokio::time::Instant::now() + grace;
    drain(graceful, grace, "proxy").await;
    // Tunnels left their connections when they upgraded: they get what is left of the grace.
    app.tunnels.drain(deadline).await;
}

/// Waits for open connections to finish their in-flight requests, at most `grace`.
pub async fn drain(graceful: GracefulShutdown, grace: Duration, what: &str) {
    let open = graceful.count();
    if open > 0 {
        tracing::info!(connections = open, listener = what, "draining connections");
    }
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            listener = what,
            grace = %humantime::format_duration(grace),
            "shutdown grace elapsed; closing the remaining connections"
        );
    }
}
