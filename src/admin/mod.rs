//! The admin listener: health, metrics, the dashboard, status, events and the mutating API.
//!
//! Mutating calls need the bearer token (compared in constant time); with no token configured
//! they are all refused, never open. Browser-reachable endpoints accept only IP-literal and
//! `localhost` `Host` values plus `[admin] allowed_hosts`, so a DNS-rebinding page (whose
//! browser sends the attacker's name) cannot drive the API.

// Handlers return a ready error response as their Err: this is the admin path, not the hot path.
#![allow(clippy::result_large_err)]

mod status;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::app::{App, ChangeError, FlipKind, ReloadError};
use crate::config::Color;
use crate::guard::{watch, ConnActivity, EndableInput, SendTimeout, Watchdog, CLOSE_FLUSH};
use crate::http::io::Prefixed;
use crate::tls::TlsSetup;

pub use status::{metrics_text, status_json};

const DASHBOARD: &str = include_str!("dashboard.html");
const MAX_BODY: usize = 64 * 1024;

type AdminResponse = Response<Full<Bytes>>;

pub async fn serve(app: Arc<App>, listener: TcpListener, tls: Option<TlsSetup>) {
    let cfg = app.snapshot().config.admin.clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(32)
        .max_pending_accept_reset_streams(Some(20))
        .max_local_error_reset_streams(Some(64));
    // Over TLS, what ALPN agreed on (h2 is negotiated, never assumed from a preface: RFC 9113
    // 3.3); the plain listener tells h2 by its preface.
    let (h1_only, h2_only) = (builder.clone().http1_only(), builder.clone().http2_only());
    // Its own connection budget: an admin flood never takes the proxy's slots, and is capped
    // before it can take the process's file descriptors.
    let limit = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = app.shutdown.cancelled() => break,
        };
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = app.shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let app2 = app.clone();
        let activity = ConnActivity::new();
        let dog = Watchdog::new(activity.clone(), cfg.idle_timeout, None);
        let svc = service_fn(move |req| {
            let app = app2.clone();
            let open = activity.open();
            let activity = activity.clone();
            async move {
                let head = req.method() == Method::HEAD;
                let resp = handle(&app, req, remote).await;
                let resp = if head { bodiless(resp) } else { resp };
                Ok::<_, Infallible>(resp.map(|b| activity.track(b, open)))
            }
        });
        let (builder, h1_only, h2_only) = (builder.clone(), h1_only.clone(), h2_only.clone());
        let acceptor = tls.as_ref().map(|t| t.acceptor());
        let shutdown = app.clone();
        let metrics = app.metrics.clone();
        // Held for the connection's life: shutdown's drain waits for it (at most shutdown_grace).
        let watcher = graceful.watcher();
        let (hrt, idle) = (cfg.header_read_timeout, cfg.idle_timeout);
        tokio::spawn(async move {
            let _held = (permit, watcher);
            // One deadline from the accept for the TLS handshake and the first bytes: hyper's
            // h1/h2 sniffing reads them with no deadline (its header timeout starts after), so
            // a connection that sends nothing, or a piece of the h2 preface, would hold its slot
            // until `idle_timeout`. They are read here until it is clear which protocol they
            // open, then handed to hyper in front of the stream. At shutdown a connection
            // still in this phase is dropped: no request is on it.
            let deadline = tokio::time::Instant::now() + hrt;
            let stream = SendTimeout::new(stream, idle);
            // With the builder for the protocol: as the first bytes tell on the plain listener,
            // as ALPN agreed over TLS.
            let opened = async {
                match acceptor {
                    None => {
                        let mut stream = stream;
                        let read = first_bytes(&mut stream, deadline).await?;
                        let io = Prefixed { read, io: stream };
                        Some((tokio_util::either::Either::Left(io), builder))
                    }
                    Some(acc) => {
                        let accept = tokio::time::timeout_at(deadline, acc.accept(stream));
                        let (how, stream) = match accept.await {
                            Ok(Ok(s)) => (crate::metrics::Handshake::Ok, Some(s)),
                            Ok(Err(_)) => (crate::metrics::Handshake::Error, None),
                            Err(_) => (crate::metrics::Handshake::Timeout, None),
                        };
                        metrics.count_handshake(true, how);
                        let mut stream = stream?;
                        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                        let Some(read) = first_bytes(&mut stream, deadline).await else {
                            // Closed cleanly (close_notify, FIN), bounded: the client may not read.
                            let _ = tokio::time::timeout(CLOSE_FLUSH, stream.shutdown()).await;
                            return None;
                        };
                        if !h2 && read.starts_with(H2_PREFACE) {
                            refuse_h2_preface(stream).await;
                            return None;
                        }
                        let io = Prefixed { read, io: stream };
                        let builder = if h2 { h2_only } else { h1_only };
                        Some((tokio_util::either::Either::Right(io), builder))
                    }
                }
            };
            let (io, builder) = tokio::select! {
                io = opened => match io {
                    Some(io) => io,
                    None => return,
                },
                () = shutdown.shutdown.cancelled() => return,
            };
            let (io, input) = EndableInput::new(io);
            let conn = builder.serve_connection(TokioIo::new(io), svc);
            let conn = std::pin::pin!(conn);
            watch(
                conn,
                dog,
                &shutdown.shutdown,
                idle,
                |c| c.graceful_shutdown(),
                // hyper has no abrupt close: the client's input ends, and hyper closes as after
                // the client's own end.
                |_| input.end(),
                |_, _| true,
            )
            .await;
        });
    }
    drop(listener);
    // In-flight admin requests get `shutdown_grace` like the proxy's: a flip waiting on etcd
    // (up to 4 × etcd_timeout) is answered, not cut. Idle connections close at once (`watch`).
    let grace = app.snapshot().config.proxy.shutdown_grace;
    drain(graceful, grace, "admin").await;
}

/// What an h2 client sends first (RFC 9113 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The answer to an h2 preface over TLS whose ALPN did not agree on h2 (prior knowledge is for
/// cleartext, RFC 9113 3.3): 505, as an HTTP/1 request line of another version gets on the
/// proxy's listener, then the connection is closed cleanly. Bounded: the client may not read.
async fn refuse_h2_preface<S: AsyncWrite + Unpin>(mut io: S) {
    const BODY: &str =
        "{\"error\": \"HTTP/2 over TLS needs h2 agreed by ALPN; this connection agreed on HTTP/1.1\"}\n";
    let answer = format!(
        "HTTP/1.1 505 HTTP Version Not Supported\r\ncontent-type: application/json\r\n\
         cache-control: no-store\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tokio::time::timeout(CLOSE_FLUSH, async {
        io.write_all(answer.as_bytes()).await?;
        io.shutdown().await
    })
    .await;
}

/// Reads a connection's first bytes, by `deadline`, until it is clear whether they open HTTP/2
/// (its preface, RFC 9113 3.4) or HTTP/1. `None`: nothing decisive came in time, or the client
/// closed or failed.
async fn first_bytes<S: AsyncRead + Unpin>(
    io: &mut S,
    deadline: tokio::time::Instant,
) -> Option<Bytes> {
    let mut first = BytesMut::with_capacity(256);
    let read = tokio::time::timeout_at(deadline, async {
        loop {
            if io.read_buf(&mut first).await.ok()? == 0 {
                return None;
            }
            if first.len() >= H2_PREFACE.len() || !H2_PREFACE.starts_with(&first) {
                return Some(());
            }
        }
    })
    .await;
    matches!(read, Ok(Some(()))).then(|| first.freeze())
}

/// Waits for open connections to finish their in-flight requests, at most `grace`.
async fn drain(graceful: GracefulShutdown, grace: Duration, what: &str) {
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

async fn handle(
    app: &Arc<App>,
    req: Request<Incoming>,
    remote: std::net::SocketAddr,
) -> AdminResponse {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();

    // RFC 9112 3.2: an HTTP/1.1 request without exactly one Host is 400, whatever it asks for.
    let host = match request_host(&req) {
        Ok(host) => host,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    // Scrapers and load balancers reach these by IP; they change nothing.
    match (method.as_str(), path.as_str()) {
        ("GET" | "HEAD", "/healthz") => {
            return if app.shutdown.is_cancelled() {
                plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
            } else {
                plain(StatusCode::OK, "ok")
            }
        }
        // Readiness (an extension): as `/healthz`, and not while the live colors are only the
        // config's guess (etcd has not answered since the start and there was no cached
        // state), which after a rollback is often the bad release.
        ("GET" | "HEAD", "/readyz") => {
            return if app.shutdown.is_cancelled() {
                plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down")
            } else if app.state_source() == crate::app::StateSource::Config {
                plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: etcd has not answered since the start and there was no cached state; serving the config's colors",
                )
            } else {
                plain(StatusCode::OK, "ready")
            }
        }
        ("GET" | "HEAD", "/metrics") => {
            let body = metrics_text(app).await;
            return with_type(
                StatusCode::OK,
                body.into(),
                "text/plain; version=0.0.4; charset=utf-8",
            );
        }
        (_, "/healthz" | "/readyz" | "/metrics") => return method_not_allowed("GET, HEAD"),
        _ => {}
    }
    // A request with the right token is no rebinding attack (a page cannot know the token):
    // `ctl --admin http://switchyard:9090` works without listing the name.
    if host.is_some_and(|h| !host_allowed(app, h)) && authorize(app, &req).is_err() {
        return error(
            StatusCode::FORBIDDEN,
            "Host not allowed on the admin listener; add it to [admin] allowed_hosts (or send the bearer token)",
        );
    }

    let route = match segs.as_slice() {
        [""] => Route::Dashboard,
        ["api", "status"] => Route::Status,
        ["api", "events"] => Route::Events,
        ["api", "flip"] => Route::FlipAll,
        ["api", "reload"] => Route::Reload,
        ["api", "releases"] if method == Method::GET || method == Method::HEAD => Route::Releases,
        ["api", "releases"] => Route::ReleaseStart,
        ["api", "releases", "current", "promote"] => Route::ReleasePromote,
        ["api", "releases", "current", "abort"] => Route::ReleaseAbort,
        ["api", "services", name, action] => match *action {
            "flip" => Route::Flip(name.to_string()),
            "rollback" => Route::Rollback(name.to_string()),
            "pause" => Route::Pause(name.to_string(), true),
            "resume" => Route::Pause(name.to_string(), false),
            _ => return error(StatusCode::NOT_FOUND, "not found"),
        },
        _ => return error(StatusCode::NOT_FOUND, "not found"),
    };
    let read_only = matches!(
        route,
        Route::Dashboard | Route::Status | Route::Events | Route::Releases
    );
    if read_only {
        if method != Method::GET && method != Method::HEAD {
            return method_not_allowed("GET, HEAD");
        }
        return match route {
            Route::Dashboard => {
                let mut r = with_type(StatusCode::OK, DASHBOARD.into(), "text/html; charset=utf-8");
                r.headers_mut().insert(
                    header::CONTENT_SECURITY_POLICY,
                    HeaderValue::from_static(
                        "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
                    ),
                );
                // `frame-ancestors` for browsers that predate it.
                r.headers_mut()
                    .insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
                r
            }
            Route::Status => json_response(StatusCode::OK, &status_json(app)),
            Route::Releases => json_response(StatusCode::OK, &app.releases.to_json()),
            _ => json_response(
                StatusCode::OK,
                &json!({ "events": app.events_list().await }),
            ),
        };
    }
    if method != Method::POST {
        // `/api/releases` serves GET and HEAD too (RFC 9110 15.5.6: Allow lists them all).
        return method_not_allowed(if matches!(route, Route::ReleaseStart) {
            "GET, HEAD, POST"
        } else {
            "POST"
        });
    }
    if let Err(resp) = authorize(app, &req) {
        return resp;
    }
    let actor = format!("admin-api {}", remote.ip());
    let body = match read_json_body(req, app.snapshot().config.admin.header_read_timeout).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    match route {
        Route::Flip(name) => {
            let (to, force) = match flip_target(&body) {
                Ok(t) => t,
                Err(r) => return r,
            };
            // A forced flip of a service of the release pauses it if it changed anything.
            let app = app.clone();
            change(
                to_end(async move {
                    // To the color already live: a no-op answered 200, release or not.
                    if let Some(noop) = app.already_live(&name, to).await? {
                        return Ok(noop);
                    }
                    crate::release::guarded(
                        &app,
                        &[name.as_str()],
                        force,
                        "flip",
                        &actor,
                        || app.flip(&name, to, force, FlipKind::Manual, &actor),
                        |o: &crate::app::FlipOutcome| changed_names(std::slice::from_ref(o)),
                    )
                    .await
                })
                .await,
            )
        }
        Route::FlipAll => {
            let (to, force) = match flip_target(&body) {
                Ok(t) => t,
                Err(r) => return r,
            };
            let app = app.clone();
            match to_end(async move {
                // The services the flip would change, as etcd holds them (the flip reads etcd
                // when one looks on `to` already): one this replica's copy shows on `to`
                // while etcd does not would escape the release's guard.
                if app.snapshot().services.iter().any(|s| s.state.active == to) {
                    app.catch_up_with_etcd().await?;
                }
                let names: Vec<String> = app
                    .snapshot()
                    .services
                    .iter()
                    .filter(|s| s.state.active != to)
                    .map(|s| s.name().to_string())
                    .collect();
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                crate::release::guarded(
                    &app,
                    &names,
                    force,
                    "flip",
                    &actor,
                    || app.flip_all(to, force, &actor),
                    |o: &Vec<crate::app::FlipOutcome>| changed_names(o),
                )
                .await
            })
            .await
            {
                Ok(outcomes) => {
                    let changed = outcomes.iter().filter(|o| o.changed).count();
                    let message = if changed == 0 {
                        format!("every service is already on {to}; nothing to do")
                    } else {
                        format!("{changed} service(s) flipped to {to} in one step")
                    };
                    json_response(
                        StatusCode::OK,
                        &json!({ "changed": changed > 0, "message": message, "services": outcomes }),
                    )
                }
                Err(e) => change_error(e),
            }
        }
        Route::Rollback(name) => {
            let args: ForceArgs = match parse_args(&body) {
                Ok(a) => a,
                Err(r) => return r,
            };
            let app = app.clone();
            change(
                to_end(async move {
                    crate::release::guarded(
                        &app,
                        &[name.as_str()],
                        args.force,
                        "roll back",
                        &actor,
                        || app.rollback(&name, args.force, &actor),
                        |o: &crate::app::FlipOutcome| changed_names(std::slice::from_ref(o)),
                    )
                    .await
                })
                .await,
            )
        }
        Route::Pause(name, paused) => match pause_args(paused, &body) {
            Err(r) => r,
            Ok(force) => match to_end({
                let (app, name) = (app.clone(), name.clone());
                async move {
                    if !paused {
                        // A resume: a release never blocks it.
                        return app.set_paused(&name, false, &actor).await;
                    }
                    let before = app.snapshot().service(&name).map(|s| s.state.paused);
                    crate::release::guarded(
                        &app,
                        &[name.as_str()],
                        force,
                        "pause",
                        &actor,
                        || app.set_paused(&name, true, &actor),
                        |_: &String| {
                            // Changed only if it was not paused already.
                            if before == Some(false) {
                                vec![name.clone()]
                            } else {
                                Vec::new()
                            }
                        },
                    )
                    .await
                }
            })
            .await
            {
                Ok(message) => json_response(
                    StatusCode::OK,
                    &json!({ "service": name, "paused": paused, "message": message }),
                ),
                Err(e) => change_error(e),
            },
        },
        Route::ReleaseStart => {
            let Some(b) = body.as_ref() else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "body needs the release plan as JSON (name, validate, phases)",
                );
            };
            let plan = match json_object(b) {
                Ok(v) => v,
                Err(r) => return r,
            };
            // Run to its end as a change does ([`to_end`]): dropped half way, a release could be
            // current with no driver, and every later start would answer 409.
            let app = app.clone();
            let started =
                tokio::spawn(async move { crate::release::start(&app, &plan, &actor).await }).await;
            match started {
                // The task panicked: the release may have been stored first (see `to_end`).
                Err(_) => unknown_outcome(
                    "the release start failed before it answered; whether the release was stored is not known: check GET /api/releases",
                ),
                Ok(Ok(answer)) => json_response(StatusCode::OK, &answer),
                Ok(Err(crate::release::StartError::Conflict(m))) => error(StatusCode::CONFLICT, &m),
                // etcd did not answer whether the release was stored: never a refusal.
                Ok(Err(crate::release::StartError::Unknown(m))) => unknown_outcome(&m),
                Ok(Err(crate::release::StartError::Unavailable(m))) => {
                    error(StatusCode::SERVICE_UNAVAILABLE, &m)
                }
                Ok(Err(crate::release::StartError::Invalid(errs))) => json_response(
                    StatusCode::BAD_REQUEST,
                    &json!({
                        "error": "invalid release plan; nothing was started",
                        "errors": errs.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                    }),
                ),
            }
        }
        Route::ReleasePromote => {
            if let Err(r) = parse_args::<NoArgs>(&body) {
                return r;
            }
            match to_end({
                let app = app.clone();
                async move { crate::release::promote(&app, &actor).await }
            })
            .await
            {
                Ok(v) => json_response(StatusCode::OK, &v),
                Err(e) => change_error(e),
            }
        }
        Route::ReleaseAbort => {
            if let Err(r) = parse_args::<NoArgs>(&body) {
                return r;
            }
            match to_end({
                let app = app.clone();
                async move { crate::release::abort(&app, &actor).await }
            })
            .await
            {
                Ok(v) => json_response(StatusCode::OK, &v),
                Err(e) => change_error(e),
            }
        }
        Route::Reload => match parse_args::<NoArgs>(&body) {
            Err(r) => r,
            Ok(NoArgs {}) => reloaded(reload_to_end(app, actor).await),
        },
        Route::Dashboard | Route::Status | Route::Events | Route::Releases => {
            error(StatusCode::NOT_FOUND, "not found")
        }
    }
}

/// The answer to a reload.
fn reloaded(r: Result<crate::app::ReloadOutcome, Option<ReloadError>>) -> AdminResponse {
    match r {
        Ok(outcome) => json_response(
            StatusCode::OK,
            &serde_json::to_value(&outcome).unwrap_or_default(),
        ),
        // The task panicked: the new routes may have been published first (see `to_end`).
        Err(None) => unknown_outcome(
            "the reload failed before it answered; whether the new config was applied is not known: check GET /api/status",
        ),
        Err(Some(ReloadError::Invalid(errs))) => json_response(
            StatusCode::BAD_REQUEST,
            &json!({
                "error": "invalid configuration; nothing was changed",
                "errors": errs.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            }),
        ),
        Err(Some(e @ ReloadError::NoFile)) => error(StatusCode::CONFLICT, &e.to_string()),
    }
}

enum Route {
    Dashboard,
    Status,
    Events,
    FlipAll,
    Reload,
    Flip(String),
    Rollback(String),
    Pause(String, bool),
    Releases,
    ReleaseStart,
    ReleasePromote,
    ReleaseAbort,
}

/// The body of a pause or a resume: a pause takes `force` (a pause of a service inside a
/// running release needs it); a resume takes no field (a release never blocks it). A bad body
/// is a 400 for a resume too, never taken as an empty one.
fn pause_args(paused: bool, body: &Option<Bytes>) -> Result<bool, AdminResponse> {
    if !paused {
        parse_args::<NoArgs>(body)?;
        return Ok(false);
    }
    let args: ForceArgs = parse_args(body)?;
    Ok(args.force)
}

/// The services a flip or rollback changed (a forced one pauses the release only if any).
fn changed_names(outcomes: &[crate::app::FlipOutcome]) -> Vec<String> {
    outcomes
        .iter()
        .filter(|o| o.changed)
        .map(|o| o.service.clone())
        .collect()
}

/// The body of a call that takes no field (promote, abort, reload): none, or `{}`. Anything
/// else is a bad body (400), never run as if it were empty: an abort sent malformed JSON
/// used to abort the release.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NoArgs {}

/// The body of a rollback or a pause: `{"force": BOOL}` or none. A `to` (a flip's field) is a
/// bad body: a rollback goes to the previous color, never one the body names.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ForceArgs {
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FlipArgs {
    to: Option<String>,
    #[serde(default)]
    force: bool,
}

/// A call's fields from its body: none, or a JSON object of them. Anything else is 400: serde's
/// derive also takes a JSON array as the fields in order, so `["green", true]` would have been a
/// forced flip.
fn parse_args<T: for<'de> Deserialize<'de> + Default>(
    body: &Option<Bytes>,
) -> Result<T, AdminResponse> {
    let Some(b) = body else {
        return Ok(T::default());
    };
    let v = json_object(b)?;
    T::deserialize(v)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}")))
}

/// A body that must be a JSON object (400 otherwise, naming what it is instead).
fn json_object(b: &Bytes) -> Result<serde_json::Value, AdminResponse> {
    let v: serde_json::Value = serde_json::from_slice(b)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}")))?;
    if v.is_object() {
        // serde_json keeps the last of a key written twice: `{"to":"blue","to":"green"}`
        // would flip to green. Read the keys again, refusing a repeated one.
        serde_json::from_slice::<UniqueKeys>(b)
            .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}")))?;
        return Ok(v);
    }
    let what = match v {
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::Bool(_) => "a boolean",
        _ => "null",
    };
    Err(error(
        StatusCode::BAD_REQUEST,
        &format!("invalid JSON body: {what}; the body must be a JSON object of the call's fields"),
    ))
}

/// A JSON value in which every object, at any depth (a release plan's phases too), has each
/// key written once ("duplicate field" otherwise); the values are skipped, [`json_object`] has
/// them.
struct UniqueKeys;

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UniqueKeys, A::Error> {
                let mut seen = std::collections::HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    map.next_value::<UniqueKeys>()?;
                    if !seen.insert(key.clone()) {
                        return Err(serde::de::Error::custom(format!("duplicate field `{key}`")));
                    }
                }
                Ok(UniqueKeys)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<UniqueKeys, A::Error> {
                while seq.next_element::<UniqueKeys>()?.is_some() {}
                Ok(UniqueKeys)
            }
            fn visit_bool<E>(self, _: bool) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
            fn visit_i64<E>(self, _: i64) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
            fn visit_u64<E>(self, _: u64) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
            fn visit_f64<E>(self, _: f64) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
            fn visit_str<E>(self, _: &str) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
            fn visit_unit<E>(self) -> Result<UniqueKeys, E> {
                Ok(UniqueKeys)
            }
        }
        d.deserialize_any(Keys)
    }
}

/// The `{"to": COLOR, "force": BOOL}` body of a flip.
fn flip_target(body: &Option<Bytes>) -> Result<(Color, bool), AdminResponse> {
    let args: FlipArgs = parse_args(body)?;
    let Some(to) = args.to.as_deref() else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "body needs \"to\": \"blue\" or \"green\"",
        ));
    };
    let to: Color = to
        .parse()
        .map_err(|m: String| error(StatusCode::BAD_REQUEST, &m))?;
    Ok((to, args.force))
}

fn change(r: Result<crate::app::FlipOutcome, ChangeError>) -> AdminResponse {
    match r {
        Ok(o) => json_response(
            StatusCode::OK,
            &serde_json::to_value(&o).unwrap_or_default(),
        ),
        Err(e) => change_error(e),
    }
}

/// Runs a change of the live state to its end in a task of its own. hyper drops a handler
/// whose client went away (a closed HTTP/1 connection, an h2 RST_STREAM); dropped between the
/// state write and its events, a flip would go live (or, with etcd, come back through the
/// watch) with no event, webhook or counter on this replica.
async fn to_end<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T, ChangeError>> + Send + 'static,
) -> Result<T, ChangeError> {
    // A task that panicked may have stored the change before it did: its outcome is not
    // known, which is never answered as a refusal.
    tokio::spawn(f).await.unwrap_or_else(|e| {
        Err(ChangeError::Unknown(format!(
            "the change stopped before it was answered ({e}); whether it was applied is unknown: see GET /api/status"
        )))
    })
}

/// A reload, and the health checks of the upstreams it adds, run to their end as
/// [`to_end`] runs a change: dropped after the new routes are stored, the reload would have no
/// event and its new upstreams no health checks. `Err(None)`: the task failed.
async fn reload_to_end(
    app: &Arc<App>,
    actor: String,
) -> Result<crate::app::ReloadOutcome, Option<ReloadError>> {
    let app = app.clone();
    tokio::spawn(async move {
        let outcome = app.reload(&actor).await?;
        crate::health::ensure(&app);
        Ok(outcome)
    })
    .await
    .map_err(|_| None)?
    .map_err(Some)
}

fn change_error(e: ChangeError) -> AdminResponse {
    let status = match &e {
        ChangeError::UnknownService(_) => StatusCode::NOT_FOUND,
        ChangeError::Refused(_) | ChangeError::Conflict(_) => StatusCode::CONFLICT,
        ChangeError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        ChangeError::Unknown(_) => return unknown_outcome(&e.to_string()),
        ChangeError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, &e.to_string())
}

/// 503 for a change etcd may or may not have stored: `"outcome": "unknown"` tells a client
/// (`switchyard ctl` exits 3) that it was neither refused nor done, where `503` alone can also
/// mean "not applied".
fn unknown_outcome(msg: &str) -> AdminResponse {
    json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        &json!({ "error": msg, "outcome": "unknown" }),
    )
}

/// The body as JSON bytes, or None when empty. A body must say it is JSON (415 otherwise).
/// The body of a POST, whole, within `timeout` (`[admin] header_read_timeout`: a body that
/// stalls would hold its connection, and one of `max_connections`, for as long as the client
/// likes, with a request in flight that no idle rule ends).
async fn read_json_body(
    req: Request<Incoming>,
    timeout: Duration,
) -> Result<Option<Bytes>, AdminResponse> {
    let is_json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
        });
    let http1 = req.version() < Version::HTTP_2;
    // A body declared too large is refused before any of it is read: polling the body is what
    // makes hyper send `100 Continue`, which would invite the client to upload it all first.
    // The unread body must not be parsed as the next request, hence `Connection: close`.
    if declared_len(&req).is_some_and(|n| n > MAX_BODY as u64) {
        return Err(closing(too_large(), http1));
    }
    let read = tokio::time::timeout(timeout, Limited::new(req.into_body(), MAX_BODY).collect());
    let bytes = match read.await {
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(closing(too_large(), http1))
        }
        Ok(Err(_)) => {
            return Err(closing(
                error(
                    StatusCode::BAD_REQUEST,
                    "request body was not received whole",
                ),
                http1,
            ))
        }
        Err(_) => {
            return Err(closing(
                error(
                    StatusCode::REQUEST_TIMEOUT,
                    &format!(
                        "request body not received within {} (admin.header_read_timeout)",
                        humantime::format_duration(timeout)
                    ),
                ),
                http1,
            ))
        }
    };
    match is_json {
        Some(true) => {}
        Some(false) => {
            return Err(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "POST bodies must be application/json",
            ))
        }
        None if bytes.is_empty() => return Ok(None),
        None => {
            return Err(error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "POST bodies must be application/json (set Content-Type)",
            ))
        }
    }
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Ok(None);
    }
    Ok(Some(bytes))
}

/// The body length the request declares before any of it is read: its `Content-Length`, or
/// the lower bound hyper knows from the framing. A `Content-Length` that is not a number is
/// hyper's to refuse; here it declares nothing.
fn declared_len(req: &Request<Incoming>) -> Option<u64> {
    let header = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let hint = req.body().size_hint().lower();
    Some(header.unwrap_or(0).max(hint)).filter(|&n| n > 0)
}

fn too_large() -> AdminResponse {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request body too large (64 KiB at most)",
    )
}

/// A 401 with the challenge RFC 9110 11.6.1 requires: the Bearer scheme (RFC 6750 3), with
/// `error="invalid_token"` when a token was sent and is not the one.
fn unauthorized(message: &str, invalid_token: bool) -> AdminResponse {
    let mut r = error(StatusCode::UNAUTHORIZED, message);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static(if invalid_token {
            "Bearer realm=\"switchyard\", error=\"invalid_token\""
        } else {
            "Bearer realm=\"switchyard\""
        }),
    );
    r
}

fn authorize(app: &App, req: &Request<Incoming>) -> Result<(), AdminResponse> {
    let Some(token) = app.admin_token.as_deref() else {
        return Err(unauthorized(
            &format!(
                "no admin token is configured: set the environment variable {} before starting switchyard",
                app.snapshot().config.admin.token_env
            ),
            false,
        ));
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_credentials);
    match given {
        None => Err(unauthorized(
            "missing bearer token (Authorization: Bearer <token>)",
            false,
        )),
        Some(t) if constant_time_eq(t.as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(unauthorized("wrong token", true)),
    }
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is case-insensitive
/// (RFC 9110 11.1): `Bearer`, `bearer` and `BEARER` are the same.
fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(credentials.trim())
}

/// Compares without an early exit, so response time does not reveal how much of a guess matched.
/// (`subtle`; a length difference is answered at once, which reveals only the length.)
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

/// The host a request is for: the target's authority when it has one (an h2 `:authority`, an
/// HTTP/1 absolute form: RFC 9112 3.2.2, it wins over Host), else the Host field; `None` for an
/// HTTP/1.0 request with neither. More than one Host, or none in HTTP/1.1, is an error (RFC
/// 9112 3.2), as is a Host that is not text.
fn request_host(req: &Request<Incoming>) -> Result<Option<&str>, &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header");
    }
    if first.is_none() && req.version() == http::Version::HTTP_11 {
        return Err("missing Host header");
    }
    // Userinfo (`user@host`) has no place in either (RFC 9110 4.2.4: treat it as an error).
    if let Some(authority) = req.uri().authority() {
        if authority.as_str().contains('@') {
            return Err("userinfo in the request target");
        }
        return Ok(Some(authority.as_str()));
    }
    match first {
        Some(v) => match v.to_str() {
            Ok(v) if !v.contains('@') => Ok(Some(v)),
            _ => Err("invalid Host header"),
        },
        None => Ok(None),
    }
}

fn host_allowed(app: &App, value: &str) -> bool {
    // An IP literal cannot be a DNS-rebinding attack: a page on the attacker's domain makes the
    // browser send that domain's name, never the address it resolved to.
    let host = match split_host(value) {
        None => return false,
        Some(Host::V6) => return true,
        Some(Host::Other(h)) => h.to_ascii_lowercase(),
    };
    if host == "localhost" || host.ends_with(".localhost") {
        return true;
    }
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return true;
    }
    app.snapshot()
        .config
        .admin
        .allowed_hosts
        .iter()
        .any(|h| h == &host)
}

enum Host<'a> {
    /// A bracketed IPv6 literal.
    V6,
    /// A name or an IPv4 address.
    Other(&'a str),
}

/// The host of a Host value or authority without its port: `[IPv6]` or a name/IPv4, then
/// nothing or `:` and digits (RFC 3986 3.2.2, 3.2.3). `None` when malformed: text after `]`
/// other than a port (`[::1]evil.com`), brackets around something that is not IPv6, a port
/// that is not digits.
fn split_host(value: &str) -> Option<Host<'_>> {
    let (host, port) = match value.strip_prefix('[') {
        Some(rest) => {
            let (ip, after) = rest.split_once(']')?;
            ip.parse::<std::net::Ipv6Addr>().ok()?;
            let port = match after {
                "" => None,
                a => Some(a.strip_prefix(':')?),
            };
            (Host::V6, port)
        }
        None => match value.rsplit_once(':') {
            Some((h, p)) => (Host::Other(h), Some(p)),
            None => (Host::Other(value), None),
        },
    };
    port.is_none_or(|p| p.bytes().all(|b| b.is_ascii_digit()))
        .then_some(host)
}

/// A HEAD answer: the GET answer's fields, its Content-Length included, and no body (RFC 9110
/// 9.3.2). hyper's HTTP/1 server leaves a HEAD body out itself; its h2 server would send it as
/// DATA.
fn bodiless(resp: AdminResponse) -> AdminResponse {
    let (mut parts, body) = resp.into_parts();
    if let Some(len) = body.size_hint().exact() {
        parts
            .headers
            .entry(header::CONTENT_LENGTH)
            .or_insert_with(|| HeaderValue::from(len));
    }
    Response::from_parts(parts, Full::new(Bytes::new()))
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> AdminResponse {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    with_type(status, body.into(), "application/json")
}

/// `resp` with `Connection: close` on HTTP/1 (HTTP/2 has no such field): the rest of a body
/// the answer did not wait for must not be read as the next request.
fn closing(mut resp: AdminResponse, http1: bool) -> AdminResponse {
    if http1 {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

fn error(status: StatusCode, msg: &str) -> AdminResponse {
    json_response(status, &json!({ "error": msg }))
}

fn method_not_allowed(allow: &'static str) -> AdminResponse {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("method not allowed; use {allow}"),
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

fn plain(status: StatusCode, body: &'static str) -> AdminResponse {
    with_type(
        status,
        Bytes::from_static(body.as_bytes()),
        "text/plain; charset=utf-8",
    )
}

fn with_type(status: StatusCode, body: Bytes, ctype: &'static str) -> AdminResponse {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // A JSON or text answer is never read as HTML or script, whatever it holds.
    r.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq_works() {
        assert!(super::constant_time_eq(b"abc", b"abc"));
        assert!(!super::constant_time_eq(b"abc", b"abd"));
        assert!(!super::constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for v in ["Bearer tok", "bearer tok", "BEARER tok", "bEaReR  tok "] {
            assert_eq!(super::bearer_credentials(v), Some("tok"), "{v:?}");
        }
        for v in [
            "Basic tok",
            "Bearertok",
            "Bearer",
            "tok",
            "",
            "Bearer-x tok",
        ] {
            assert_eq!(super::bearer_credentials(v), None, "{v:?}");
        }
    }
}
