//! The request path, top to bottom:
//!
//! 1. validate the request (Host, CONNECT, message framing) and take the host and path;
//! 2. load the routing snapshot once, match the service, pick the color (live, or idle on the
//!    preview listener) and a healthy upstream of that pool (power of two choices);
//! 3. rewrite headers (hop-by-hop out; `X-Forwarded-*` in, written by the HTTP/1.1 client
//!    straight into the head or inserted here for h2; `Host` unchanged);
//! 4. forward with the pooled client, bounded by `request_timeout` until response headers; the
//!    request body streams through [`RequestBody`], which ends it after `body_idle_timeout`
//!    without a frame; the client checks the response's framing and drops its hop-by-hop fields;
//!    a request its upstream could not take goes to another of the pool (`retries`);
//! 5. record the outcome (window stats, counters, critical paths, passive health) once: at once
//!    for the proxy's own answers, when the body ends for the upstream's (see
//!    [`crate::outcome`]), and stream the response back.
//!
//! The color is chosen here, per request: a flip affects the next request on every keep-alive
//! connection, while requests already past step 2 finish on the color they started on.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::io::AsyncWriteExt;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::{Logged, Routed, X_REQUEST_ID};
use crate::app::App;
use crate::client::{ClientError, Failed, PooledBody, Prepared};
use crate::config::Protocol;
use crate::h1_server::{self, OnUpgrade};
use crate::outcome::{Outcome, RecordedBody};
use crate::upstream::{FailureKind, Pool, Upstream};

/// Upstream bodies stream through untouched (recording the request when they end); the proxy's
/// own answers are small and whole.
pub type ProxyBody = Either<RecordedBody, Full<Bytes>>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Requests go to the live color.
    Live,
    /// Requests go to the idle color (smoke tests before a flip).
    Preview,
}

#[derive(Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub tls: bool,
    pub mode: Mode,
    /// The client address as an `X-Forwarded-For` value, formatted once per connection.
    pub client_ip: HeaderValue,
    /// The connection's `max_connections` slot. It goes with the last reference, so a tunnel
    /// upgraded from the connection keeps holding it after hyper lets go of the connection.
    slot: Option<OwnedSemaphorePermit>,
}

impl ConnInfo {
    pub fn new(remote: SocketAddr, tls: bool, mode: Mode) -> ConnInfo {
        let client_ip = HeaderValue::from_str(&remote.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ConnInfo {
            remote,
            tls,
            mode,
            client_ip,
            slot: None,
        }
    }

    /// The same, holding a `max_connections` slot until the connection and its tunnel end.
    pub fn holding(mut self, slot: OwnedSemaphorePermit) -> ConnInfo {
        self.slot = Some(slot);
        self
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// A response on its way to the client: with `[log] access` on, its end writes the log line.
pub type ServedBody = Logged<ProxyBody>;

/// One request, with its access log line when the log is on (see [`crate::access_log`]).
pub async fn handle(
    app: &Arc<App>,
    mut req: Request<ClientBody>,
    conn: &Arc<ConnInfo>,
    on_upgrade: Option<OnUpgrade>,
) -> Response<ServedBody> {
    let Some(log) = app.access_log.get() else {
        return route_and_forward(app, req, conn, on_upgrade, None)
            .await
            .map(Logged::off);
    };
    let start = Instant::now();
    let id = log.request_id(req.headers().get(&X_REQUEST_ID));
    // One value upstream: `insert` replaces every value the client sent.
    req.headers_mut().insert(X_REQUEST_ID.clone(), id.clone());
    let mut entry = log.entry(
        start,
        conn.remote.ip(),
        req.method().clone(),
        req.uri().path_and_query().cloned(),
        req.version(),
        id.clone(),
        req.headers(),
    );
    let mut routed = Routed::default();
    let mut resp = route_and_forward(app, req, conn, on_upgrade, Some(&mut routed)).await;
    resp.headers_mut().insert(X_REQUEST_ID.clone(), id);
    entry.status = resp.status().as_u16();
    entry.service = routed.service;
    entry.color = routed.color;
    entry.upstream = routed.upstream;
    let log = log.clone();
    resp.map(|body| Logged::new(body, log, entry))
}

async fn route_and_forward(
    app: &Arc<App>,
    mut req: Request<ClientBody>,
    conn: &Arc<ConnInfo>,
    on_upgrade: Option<OnUpgrade>,
    mut routed: Option<&mut Routed>,
) -> Response<ProxyBody> {
    let start = Instant::now();

    // 1. Validate. A refused request closes its connection: what a client pipelined behind it
    // is not run.
    if req.method() == Method::CONNECT {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported\n");
    }
    if let Err(msg) = crate::validate::target(&mut req) {
        return refuse(StatusCode::BAD_REQUEST, msg);
    }
    let hops = hop_bits(req.headers());
    if hops & TRANSFER_ENCODING_BIT != 0 {
        if let Err(msg) = check_framing(req.headers()) {
            return refuse(StatusCode::BAD_REQUEST, msg);
        }
    }
    let (host_value, host_len) = match request_host(&req) {
        Ok(Some((v, len))) => (Some(v), len),
        Ok(None) => (None, 0),
        Err(msg) => return refuse(StatusCode::BAD_REQUEST, msg),
    };
    if req.version() != Version::HTTP_2 && req.uri().authority().is_some() {
        // Absolute form (RFC 9112 3.2.2): the target's authority replaces Host; the upstream
        // gets the origin form.
        if let Some(v) = &host_value {
            req.headers_mut().insert(header::HOST, v.clone());
        }
        crate::validate::to_origin_form(&mut req);
    }
    let host = host_value
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.get(..host_len));

    // 2. Route: one snapshot load for every decision.
    let (svc, request_timeout, body_idle_timeout, send_timeout, retries) = {
        let snap = app.routes.load();
        match snap.route(host, req.uri().path()) {
            Some(s) => (
                s.clone(),
                snap.config.proxy.request_timeout,
                snap.config.proxy.body_idle_timeout,
                snap.config.proxy.upstream_send_timeout,
                snap.config.proxy.retries,
            ),
            None => {
                app.metrics.unmatched_requests_total.inc();
                return text(StatusCode::NOT_FOUND, "no service matches this request\n");
            }
        }
    };
    let color = match conn.mode {
        Mode::Live => svc.state.active,
        Mode::Preview => svc.state.active.other(),
    };
    if let Some(r) = routed.as_deref_mut() {
        r.service = Some(svc.clone());
        r.color = Some(color);
    }
    let pool = svc.pool(color);
    let Some(up) = pool.pick() else {
        pool.unavailable.inc();
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy upstream is available for this service\n",
        );
    };
    let up = up.clone();
    if let Some(r) = routed {
        r.upstream = Some(up.clone());
    }

    // 3. Rewrite.
    let upgrade = if hops & CONNECTION_BIT != 0 {
        requested_upgrade(req.headers())
    } else {
        None
    };
    let te_trailers = hops & TE_BIT != 0 && wants_trailers(req.headers());
    strip_known(req.headers_mut(), hops);
    if req.version() == Version::HTTP_2 && pool.protocol == Protocol::Http1 {
        crate::validate::join_cookies(req.headers_mut());
    }
    if te_trailers {
        // gRPC needs `te: trailers` end to end; it is the one TE value a proxy may pass on.
        req.headers_mut()
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    let fwd = Forwarded::new(conn, host_value.as_ref());
    if pool.protocol == Protocol::H2 {
        add_forwarded(req.headers_mut(), &fwd);
    }
    // HTTP/1.1 requests always carry Host (checked above). HTTP/2 clients send :authority and
    // HTTP/1.0 clients may send nothing; an HTTP/1.1 upstream needs a Host either way.
    if req.version() != Version::HTTP_11 && !req.headers().contains_key(header::HOST) {
        let v = host_value
            .clone()
            .or_else(|| HeaderValue::from_str(up.authority.as_str()).ok());
        if let Some(v) = v {
            req.headers_mut().insert(header::HOST, v);
        }
    }
    // Only an HTTP/1 client connection can be upgraded (its server passes the slot).
    let client_upgrade = match (&upgrade, on_upgrade) {
        (Some(proto), Some(on_upgrade)) => {
            req.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            req.headers_mut().insert(header::UPGRADE, proto.clone());
            Some(on_upgrade)
        }
        _ => None,
    };
    let path_and_query = req.uri().path_and_query().cloned();
    match pool.protocol {
        // The HTTP/1.1 client writes the origin form (path and query) itself.
        Protocol::Http1 => *req.version_mut() = Version::HTTP_11,
        Protocol::H2 => {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(http::uri::Scheme::HTTP);
            parts.authority = Some(up.authority.clone());
            parts.path_and_query = path_and_query
                .clone()
                .or_else(|| Some(http::uri::PathAndQuery::from_static("/")));
            match Uri::from_parts(parts) {
                Ok(uri) => *req.uri_mut() = uri,
                Err(_) => return text(StatusCode::BAD_REQUEST, "invalid request target\n"),
            }
            *req.version_mut() = Version::HTTP_2;
        }
    }

    // 4. Forward, to the upstream picked and, while it cannot take the request, to others of
    //    the same pool (at most `retries` more). `up` ends as the one that answered or failed
    //    last: the request is recorded there, once.
    let req =
        req.map(|body| RequestBody::new(body, body_idle_timeout).with_send_timeout(send_timeout));
    let mut up = up;
    let result = tokio::time::timeout(
        request_timeout,
        forward(app, pool, &mut up, req, &fwd, retries),
    )
    .await;
    let end = Instant::now();
    let elapsed = end - start;
    let outcome = Outcome {
        pool: pool.clone(),
        up,
        path: path_and_query,
        start,
        clock: app.clock,
        live: conn.mode == Mode::Live,
    };

    // 5. Record and answer.
    let mut resp = match result {
        Err(_) => {
            outcome.record(end, elapsed, 504, Some(FailureKind::Timeout));
            return text(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n");
        }
        Ok(Err(e)) => {
            // The client's side of the body failed: not the upstream's fault, not a failure.
            match client_body_error(&e) {
                Some(BodyError::Idle) => {
                    outcome.record(end, elapsed, 408, None);
                    return text(StatusCode::REQUEST_TIMEOUT, "request body timed out\n");
                }
                Some(BodyError::Client(_)) => {
                    outcome.record(end, elapsed, 400, None);
                    return text(StatusCode::BAD_REQUEST, "request body was not received\n");
                }
                None => {}
            }
            let (kind, msg) = if e.is_connect() {
                (FailureKind::Connect, "upstream connection failed\n")
            } else {
                (FailureKind::Reset, "upstream sent no valid response\n")
            };
            tracing::debug!(service = %svc.name(), upstream = %outcome.up.addr, error = %e, "upstream request failed");
            outcome.record(end, elapsed, 502, Some(kind));
            return text(StatusCode::BAD_GATEWAY, msg);
        }
        Ok(Ok(resp)) => resp,
    };
    let status = resp.status();

    if status == StatusCode::SWITCHING_PROTOCOLS {
        outcome.record(end, elapsed, status.as_u16(), None);
        let asked = upgrade
            .as_ref()
            .is_some_and(|u| crate::validate::upgrade_matches(u, resp.headers()));
        return match client_upgrade {
            Some(client_side) if asked => tunnel(app, resp, client_side, conn.clone()),
            Some(_) => {
                // A protocol the client did not ask for (RFC 9110 7.8): never tunnelled.
                resp.body_mut().detach();
                text(
                    StatusCode::BAD_GATEWAY,
                    "upstream switched to a protocol the client did not ask for\n",
                )
            }
            None => {
                // That connection now speaks something else: it must not go back to the pool.
                resp.body_mut().detach();
                text(
                    StatusCode::BAD_GATEWAY,
                    "upstream switched protocols unasked\n",
                )
            }
        };
    }
    // Recorded when the body ends: a body the upstream cuts is a failure.
    resp.map(|body| Either::Left(RecordedBody::new(body, outcome, elapsed, status.as_u16())))
}

/// Sends the request on the pool's protocol: HTTP/1.1 through the upstream's own connection
/// pool, HTTP/2 through the multiplexing client. A request the upstream cannot have acted on
/// (see [`Failed::unsent`]; for HTTP/2, a failed connect of a bodiless request) goes to another
/// healthy upstream of the pool, at most `retries` times; each failed attempt counts against
/// its upstream (failure counter, passive health) but not in the window, where the request is
/// recorded once, on `up`, the upstream of the last attempt.
async fn forward(
    app: &App,
    pool: &Pool,
    up: &mut Arc<Upstream>,
    req: Request<RequestBody>,
    fwd: &Forwarded<'_>,
    retries: u32,
) -> Result<Response<PooledBody>, ClientError> {
    let mut tried: Vec<Arc<Upstream>> = Vec::new();
    match pool.protocol {
        Protocol::Http1 => {
            let mut req = Prepared::new(req, fwd);
            loop {
                let in_flight = up.begin();
                let Failed { error, unsent } = match up.conns.send_prepared(req).await {
                    Ok(resp) => return Ok(resp),
                    Err(failed) => failed,
                };
                drop(in_flight);
                match unsent {
                    Some(unsent) if tried.len() < retries as usize => {
                        if !next_attempt(pool, up, &mut tried, &error) {
                            return Err(error);
                        }
                        req = unsent;
                    }
                    _ => return Err(error),
                }
            }
        }
        Protocol::H2 => {
            // A bodiless request can be rebuilt for another upstream; one with a body cannot.
            // The copy (its headers) is made only where there is another upstream to try.
            let replay = (retries > 0 && pool.upstreams.len() > 1 && req.body().is_end_stream())
                .then(|| {
                    let mut copy = Request::new(());
                    *copy.method_mut() = req.method().clone();
                    *copy.uri_mut() = req.uri().clone();
                    *copy.version_mut() = req.version();
                    *copy.headers_mut() = req.headers().clone();
                    (copy, req.body().idle_timeout())
                });
            let mut req = req;
            loop {
                let in_flight = up.begin();
                let error = match forward_h2(app, req).await {
                    Ok(resp) => return Ok(resp),
                    Err(e) => e,
                };
                drop(in_flight);
                match &replay {
                    Some((copy, idle)) if error.is_connect() && tried.len() < retries as usize => {
                        if !next_attempt(pool, up, &mut tried, &error) {
                            return Err(error);
                        }
                        req = replay_h2(copy, &up.authority, *idle)?;
                    }
                    _ => return Err(error),
                }
            }
        }
    }
}

/// Counts the failed attempt against `up` and moves `up` to another upstream of the pool;
/// false when there is none left to try.
fn next_attempt(
    pool: &Pool,
    up: &mut Arc<Upstream>,
    tried: &mut Vec<Arc<Upstream>>,
    error: &ClientError,
) -> bool {
    tried.push(up.clone());
    let Some(next) = pool.pick_retry(tried) else {
        return false;
    };
    let kind = if error.is_connect() {
        FailureKind::Connect
    } else {
        FailureKind::Reset
    };
    up.count_failure(kind);
    up.passive_failure(&pool.passive);
    tracing::debug!(upstream = %up.addr, next = %next.addr, error = %error, "upstream could not take the request; trying another");
    *up = next.clone();
    true
}

/// A bodiless HTTP/2 request again, for the upstream at `authority`.
fn replay_h2(
    copy: &Request<()>,
    authority: &http::uri::Authority,
    idle: Duration,
) -> Result<Request<RequestBody>, ClientError> {
    let mut parts = copy.uri().clone().into_parts();
    parts.authority = Some(authority.clone());
    let uri =
        Uri::from_parts(parts).map_err(|_| ClientError::Protocol("invalid request target"))?;
    let mut req = Request::new(RequestBody::new(ClientBody::Empty, idle));
    *req.method_mut() = copy.method().clone();
    *req.uri_mut() = uri;
    *req.version_mut() = copy.version();
    *req.headers_mut() = copy.headers().clone();
    Ok(req)
}

/// One HTTP/2 exchange through the multiplexing client.
async fn forward_h2(
    app: &App,
    req: Request<RequestBody>,
) -> Result<Response<PooledBody>, ClientError> {
    let idle = req.body().idle_timeout();
    let mut resp = app.clients.h2.request(req).await?;
    // The HTTP/1.1 client checks framing and drops hop-by-hop fields while it parses;
    // h2 forbids them, and this keeps hyper-util's client to the same rule.
    let hops = hop_bits(resp.headers());
    if hops & TRANSFER_ENCODING_BIT != 0 && check_framing(resp.headers()).is_err() {
        return Err(ClientError::Protocol("ambiguous response framing"));
    }
    strip_known(resp.headers_mut(), hops);
    if resp.status().as_u16() > 599 {
        return Err(ClientError::Protocol("invalid status code"));
    }
    Ok(resp.map(|body| PooledBody::unpooled(body, idle)))
}

/// Message framing a proxy must not guess at (request smuggling): Transfer-Encoding together
/// with Content-Length, or any Transfer-Encoding but one plain `chunked`. hyper itself rejects
/// differing Content-Lengths, a final coding other than chunked, obs-fold, NUL and lone CR; it
/// accepts these, and an upstream might read them differently. HTTP/2 carries neither header.
fn check_framing(headers: &HeaderMap) -> Result<(), &'static str> {
    let mut te = headers.get_all(header::TRANSFER_ENCODING).iter();
    let Some(first) = te.next() else {
        return Ok(());
    };
    if headers.contains_key(header::CONTENT_LENGTH) {
        return Err("both Content-Length and Transfer-Encoding\n");
    }
    let plain_chunked = first
        .to_str()
        .map(|v| v.trim().eq_ignore_ascii_case("chunked"))
        .unwrap_or(false);
    if !plain_chunked || te.next().is_some() {
        return Err("unsupported Transfer-Encoding\n");
    }
    Ok(())
}

/// The request's host value (for `X-Forwarded-Host`) and the length of its name without port.
/// HTTP/1.1 needs exactly one Host; HTTP/2 may carry it as :authority instead. Nothing is
/// allocated: routing compares names case-insensitively.
fn request_host<B>(req: &Request<B>) -> Result<Option<(HeaderValue, usize)>, &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header\n");
    }
    let authority = req.uri().authority();
    if authority.is_some_and(|a| a.as_str().contains('@')) {
        return Err("userinfo in the request target\n");
    }
    let value = match (authority, first) {
        (_, None) if req.version() == Version::HTTP_11 => return Err("missing Host header\n"),
        // HTTP/2 (RFC 9113 8.3.1): a Host that names another authority makes it malformed.
        (Some(a), Some(h)) if req.version() == Version::HTTP_2 => {
            if !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes()) {
                return Err("Host and :authority differ\n");
            }
            Some(h.clone())
        }
        // HTTP/1 absolute form (RFC 9112 3.2.2): the target's authority wins over Host.
        (Some(a), _) => HeaderValue::from_str(a.as_str()).ok(),
        (None, Some(h)) => Some(h.clone()),
        (None, None) => None,
    };
    let Some(value) = value else {
        return Ok(None);
    };
    let s = value.to_str().map_err(|_| "invalid Host header\n")?;
    let len = host_without_port(s).ok_or("invalid Host header\n")?.len();
    Ok(Some((value, len)))
}

/// `example.com:8080` -> `example.com`, `[::1]:80` -> `[::1]`; None for malformed values
/// (RFC 9110 7.2: `uri-host [ ":" port ]`): a second colon, a port past 65535, an IP literal
/// that is not an IPv6 address.
fn host_without_port(s: &str) -> Option<&str> {
    let (name, port) = if let Some(rest) = s.strip_prefix('[') {
        let end = rest.find(']')?;
        rest[..end].parse::<std::net::Ipv6Addr>().ok()?;
        let port = match &rest[end + 1..] {
            "" => None,
            after => Some(after.strip_prefix(':')?),
        };
        (&s[..end + 2], port)
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    if let Some(p) = port {
        let digits = p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit());
        if !digits || p.parse::<u32>().is_ok_and(|n| n > 65535) {
            return None;
        }
    }
    let ok = !name.is_empty()
        && (name.starts_with('[')
            || name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')));
    ok.then_some(name)
}

/// The protocol a client asks to upgrade to (WebSocket and friends); never h2c, which the
/// proxy speaks itself by prior knowledge and must not tunnel.
fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let wants = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !wants {
        return None;
    }
    let proto = headers.get(header::UPGRADE)?;
    crate::validate::without_h2c(proto)
}

fn wants_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
}

/// Removes hop-by-hop headers (RFC 9110 7.6.1) and every header named on any `Connection` line.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip_known(headers, hop_bits(headers))
}

/// Which hop-by-hop headers are present: one pass over the (few) names instead of a hashed
/// lookup per hop-by-hop name. Most requests carry none, a typical response only `Connection`.
fn hop_bits(headers: &HeaderMap) -> u8 {
    headers.keys().fold(0u8, |acc, k| acc | hop_bit(k))
}

/// [`strip_hop_by_hop`] with the [`hop_bits`] already known.
fn strip_known(headers: &mut HeaderMap, present: u8) {
    if present == 0 {
        return;
    }
    if present & CONNECTION_BIT != 0 {
        let mut lines = headers.get_all(header::CONNECTION).iter();
        match (lines.next().is_some(), lines.next().is_some()) {
            (true, false) => {
                // The usual case: one line, taken out whole; nothing is allocated.
                if let Some(line) = headers.remove(header::CONNECTION) {
                    remove_named(headers, &line);
                }
            }
            _ => {
                let lines: Vec<HeaderValue> = headers
                    .get_all(header::CONNECTION)
                    .iter()
                    .cloned()
                    .collect();
                headers.remove(header::CONNECTION);
                for line in &lines {
                    remove_named(headers, line);
                }
            }
        }
    }
    for (bit, name) in [
        (KEEP_ALIVE_BIT, &KEEP_ALIVE),
        (PROXY_CONNECTION_BIT, &PROXY_CONNECTION),
        (TE_BIT, &header::TE),
        (TRANSFER_ENCODING_BIT, &header::TRANSFER_ENCODING),
        (UPGRADE_BIT, &header::UPGRADE),
    ] {
        if present & bit != 0 {
            headers.remove(name);
        }
    }
}

const CONNECTION_BIT: u8 = 1;
const KEEP_ALIVE_BIT: u8 = 2;
const PROXY_CONNECTION_BIT: u8 = 4;
const TE_BIT: u8 = 8;
const TRANSFER_ENCODING_BIT: u8 = 16;
const UPGRADE_BIT: u8 = 32;

/// A hop-by-hop field (RFC 9110 7.6.1) by name alone.
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_bit(name) != 0
}

fn hop_bit(name: &HeaderName) -> u8 {
    if name == header::CONNECTION {
        CONNECTION_BIT
    } else if name == header::TE {
        TE_BIT
    } else if name == header::TRANSFER_ENCODING {
        TRANSFER_ENCODING_BIT
    } else if name == header::UPGRADE {
        UPGRADE_BIT
    } else if name == KEEP_ALIVE {
        KEEP_ALIVE_BIT
    } else if name == PROXY_CONNECTION {
        PROXY_CONNECTION_BIT
    } else {
        0
    }
}

/// Removes the headers a `Connection` line names (comma-separated, any case).
fn remove_named(headers: &mut HeaderMap, line: &HeaderValue) {
    for token in line.as_bytes().split(|b| *b == b',') {
        if let Ok(name) = std::str::from_utf8(token.trim_ascii()) {
            // The one field a request cannot do without is no hop-by-hop candidate
            // (RFC 9110 7.6.1, RFC 9112 3.2): `Connection: Host` leaves it in place.
            if !name.is_empty() && !name.eq_ignore_ascii_case("host") {
                headers.remove(name);
            }
        }
    }
}

/// The `X-Forwarded-*` values a request carries upstream. The HTTP/1.1 client writes them
/// straight into the request head; HTTP/2 gets them through [`add_forwarded`].
pub struct Forwarded<'a> {
    pub client_ip: &'a HeaderValue,
    pub proto: &'static str,
    pub host: Option<&'a HeaderValue>,
}

impl<'a> Forwarded<'a> {
    pub fn new(conn: &'a ConnInfo, host: Option<&'a HeaderValue>) -> Forwarded<'a> {
        Forwarded {
            client_ip: &conn.client_ip,
            proto: if conn.tls { "https" } else { "http" },
            host,
        }
    }

    /// Whether `name` is one of the headers this replaces.
    pub fn replaces(name: &HeaderName) -> bool {
        name == X_FORWARDED_FOR || name == X_FORWARDED_PROTO || name == X_FORWARDED_HOST
    }

    /// `X-Forwarded-For`: the values the request came with, then the client.
    pub fn forwarded_for(&self, headers: &HeaderMap) -> HeaderValue {
        let mut prior = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .peekable();
        if prior.peek().is_none() {
            // The usual case: the address formatted once per connection.
            return self.client_ip.clone();
        }
        let mut s = prior.collect::<Vec<_>>().join(", ");
        s.push_str(", ");
        s.push_str(self.client_ip.to_str().unwrap_or_default());
        HeaderValue::from_str(&s).unwrap_or_else(|_| self.client_ip.clone())
    }
}

impl Forwarded<'_> {
    /// `Forwarded` (RFC 7239), under the same policy as `X-Forwarded-For`: a client's values
    /// are kept and the proxy's element goes last (`for`, `host`, `proto`), so the last element
    /// is always the proxy's. None when the request carries no `Forwarded` (the proxy adds none
    /// of its own then; `X-Forwarded-*` say the same).
    pub fn forwarded(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let mut prior = headers
            .get_all(header::FORWARDED)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .peekable();
        prior.peek()?;
        let mut s = prior.collect::<Vec<_>>().join(", ");
        let ip = self.client_ip.to_str().unwrap_or("unknown");
        if ip.contains(':') {
            s.push_str(&format!(", for=\"[{ip}]\""));
        } else {
            s.push_str(&format!(", for={ip}"));
        }
        if let Some(h) = self.host.and_then(|h| h.to_str().ok()) {
            s.push_str(&format!(";host=\"{h}\""));
        }
        s.push_str(";proto=");
        s.push_str(self.proto);
        HeaderValue::from_str(&s).ok()
    }
}

/// Appends the client to `X-Forwarded-For` and `Forwarded` and sets `X-Forwarded-Proto` /
/// `X-Forwarded-Host`.
pub fn add_forwarded(headers: &mut HeaderMap, fwd: &Forwarded<'_>) {
    if let Some(v) = fwd.forwarded(headers) {
        headers.insert(header::FORWARDED, v);
    }
    let xff = fwd.forwarded_for(headers);
    headers.insert(X_FORWARDED_FOR.clone(), xff);
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(fwd.proto),
    );
    match fwd.host {
        Some(h) => {
            headers.insert(X_FORWARDED_HOST.clone(), h.clone());
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
}

/// Answers 101 to the client and splices both upgraded connections together. The tunnel stays
/// on the upstream (and so the color) where it began, whatever flips happen meanwhile.
fn tunnel(
    app: &App,
    mut upstream_resp: Response<PooledBody>,
    client_side: OnUpgrade,
    conn: Arc<ConnInfo>,
) -> Response<ProxyBody> {
    // The connection now belongs to the tunnel, never to the pool.
    let upstream_side = upstream_resp.body_mut().take_upgraded();
    let idle = app.snapshot().config.proxy.tunnel_idle_timeout;
    app.tunnels.spawn(async move {
        // The tunnel is still a client connection: it keeps its `max_connections` slot.
        let _conn = conn;
        let Some((mut upstream, early)) = upstream_side else {
            return;
        };
        let client = match client_side.await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let mut client = client;
        // Bytes the upstream sent right behind its 101 head belong to the tunnel.
        if !early.is_empty() && client.write_all(&early).await.is_err() {
            return;
        }
        if let Err(e) = crate::guard::splice(&mut client, &mut upstream, idle).await {
            tracing::debug!(error = %e, "tunnel closed with an error");
        }
    });
    let (parts, _) = upstream_resp.into_parts();
    let mut resp = Response::from_parts(parts, Either::Right(Full::new(Bytes::new())));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    resp
}

/// The open upgraded connections (WebSocket tunnels). A tunnel outlives the hyper connection it
/// came from, so the listeners' graceful shutdown does not see it: shutdown waits for these
/// separately, within the same `shutdown_grace`, and then closes the ones still open.
#[derive(Default)]
pub struct Tunnels {
    tracker: TaskTracker,
    /// Cancelled at the shutdown deadline: every tunnel still open drops both its ends.
    cut: CancellationToken,
}

impl Tunnels {
    fn spawn(&self, tunnel: impl Future<Output = ()> + Send + 'static) {
        let cut = self.cut.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = tunnel => {}
                _ = cut.cancelled() => {}
            }
        });
    }

    /// Waits until every tunnel has closed or `deadline` passes, then closes those left. Safe to
    /// call from every listener at once.
    pub async fn drain(&self, deadline: Instant) {
        self.tracker.close();
        let open = self.tracker.len();
        if open == 0 {
            return;
        }
        tracing::info!(tunnels = open, "waiting for open tunnels to close");
        if tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tunnels = self.tracker.len(),
                "shutdown grace elapsed; closing the remaining tunnels"
            );
            self.cut.cancel();
            self.tracker.wait().await;
        }
    }
}

/// The client's request body as its server delivered it.
pub enum ClientBody {
    /// No body (most requests).
    Empty,
    /// A body that arrived whole with its head.
    Full(Option<Bytes>),
    /// Read off the HTTP/1.1 client connection as it is polled.
    H1(h1_server::RequestBody),
    /// An h2 stream's body.
    H2(Incoming),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ClientBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ClientBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::Full(data) => data.is_none(),
            ClientBody::H1(b) => b.is_end_stream(),
            ClientBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ClientBody::H1(b) => b.size_hint(),
            ClientBody::H2(b) => b.size_hint(),
        }
    }
}

/// The request body on its way upstream: the client's body, ended with an error when no frame
/// arrives for `idle` (a slow or stalled upload), so the upstream sees an aborted body instead
/// of holding the request open. The timer is allocated only once the body first waits.
pub struct RequestBody {
    inner: ClientBody,
    idle: IdleTimer,
    /// `upstream_send_timeout`: the longest a write of this request to the upstream may make
    /// no progress (zero: none).
    send_timeout: Duration,
}

/// `body_idle_timeout` for one body: the longest wait for its next frame. The timer is
/// allocated only once the body first waits, and restarts with each wait.
pub struct IdleTimer {
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the timer runs for the current wait.
    waiting: bool,
}

impl IdleTimer {
    /// `idle` zero turns the timeout off.
    pub fn new(idle: Duration) -> IdleTimer {
        IdleTimer {
            idle,
            timer: None,
            waiting: false,
        }
    }

    pub fn duration(&self) -> Duration {
        self.idle
    }

    /// The body made progress: the next wait starts a fresh timer.
    pub fn progressed(&mut self) {
        self.waiting = false;
    }

    /// The body is waiting: true once it has waited `idle` since its last progress.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.idle.is_zero() {
            return false;
        }
        let deadline = Instant::now() + self.idle;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.waiting {
            timer.as_mut().reset(deadline);
            self.waiting = true;
        }
        timer.as_mut().poll(cx).is_ready()
    }
}

/// Why a request body ended early.
#[derive(Debug)]
pub enum BodyError {
    /// No frame for `body_idle_timeout`.
    Idle,
    /// The client's stream failed (reset, closed, malformed chunk).
    Client(BoxError),
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Idle => f.write_str("request body idle timeout"),
            BodyError::Client(e) => write!(f, "request body failed: {e}"),
        }
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BodyError::Idle => None,
            BodyError::Client(e) => Some(e.as_ref()),
        }
    }
}

impl RequestBody {
    /// `idle` zero turns the timeout off.
    pub fn new(inner: ClientBody, idle: Duration) -> RequestBody {
        RequestBody {
            inner,
            idle: IdleTimer::new(idle),
            send_timeout: Duration::ZERO,
        }
    }

    /// With `upstream_send_timeout` (zero: none).
    pub fn with_send_timeout(mut self, send_timeout: Duration) -> RequestBody {
        self.send_timeout = send_timeout;
        self
    }

    pub fn send_timeout(&self) -> Duration {
        self.send_timeout
    }

    /// The `body_idle_timeout` this body runs with (the response gets the same).
    pub fn idle_timeout(&self) -> Duration {
        self.idle.duration()
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.idle.progressed();
            return Poll::Ready(frame.map(|r| r.map_err(BodyError::Client)));
        }
        if this.idle.poll_expired(cx) {
            return Poll::Ready(Some(Err(BodyError::Idle)));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The [`BodyError`] behind a client error, when the request failed on the client's side.
fn client_body_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyError> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(b) = err.downcast_ref::<BodyError>() {
            return Some(b);
        }
        cur = err.source();
    }
    None
}

/// Marks a response after which the HTTP/1 connection closes (a refused request: whatever the
/// client sent behind it is not run).
#[derive(Clone, Copy, Debug)]
pub struct CloseConnection;

/// A refusal of a malformed request: [`text`], and the connection closes after it.
pub fn refuse(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut resp = text(status, body);
    resp.extensions_mut().insert(CloseConnection);
    resp
}

/// The proxy's own short plain-text answers. They never name internal addresses.
pub fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports() {
        assert_eq!(host_without_port("a.b:80"), Some("a.b"));
        assert_eq!(host_without_port("a.b"), Some("a.b"));
        assert_eq!(host_without_port("[::1]:80"), Some("[::1]"));
        assert_eq!(host_without_port("a b"), None);
        assert_eq!(host_without_port("a.b:x"), None);
        assert_eq!(host_without_port(""), None);
        assert_eq!(host_without_port("a:1:2"), None);
        assert_eq!(host_without_port("a:99999999999"), None);
        assert_eq!(host_without_port("a:65536"), None);
        assert_eq!(host_without_port("a:65535"), Some("a"));
        assert_eq!(host_without_port("[zz::1:]"), None);
        assert_eq!(host_without_port("[::1]x"), None);
        assert_eq!(host_without_port("::1"), None);
    }

    #[test]
    fn hop_by_hop_from_every_connection_line() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("x-one, keep-alive"),
        );
        h.append(header::CONNECTION, HeaderValue::from_static("X-Two"));
        h.insert("x-one", HeaderValue::from_static("1"));
        h.insert("x-two", HeaderValue::from_static("2"));
        h.insert("x-three", HeaderValue::from_static("3"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        assert!(h.get("x-one").is_none() && h.get("x-two").is_none());
        assert!(h.get("keep-alive").is_none() && h.get("te").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h.get("x-three").map(|v| v.as_bytes()), Some(&b"3"[..]));
    }
}
