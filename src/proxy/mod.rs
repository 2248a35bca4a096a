//! The request path, on one page ([`route_and_forward`]):
//!
//! 1. **validate** the request (CONNECT, the target, the Host) and take the host; a TRACE or
//!    OPTIONS whose `Max-Forwards` is spent is answered here;
//! 2. **route**: load the routing snapshot once, match the service, pick the color (live, or
//!    idle on the preview listener) and a healthy upstream of that pool (power of two choices);
//! 3. **rewrite** headers (hop-by-hop out; `X-Forwarded-*` in, written by the HTTP/1.1 client
//!    straight into the head or inserted here for h2; `Host` unchanged);
//! 4. **forward** with the pooled client, bounded by `request_timeout` until response headers;
//!    the request body streams through [`RequestBody`], which ends it after `body_idle_timeout`
//!    without a frame; the client checks the response's framing and drops its hop-by-hop
//!    fields; a request its upstream could not take goes to another of the pool (`retries`);
//! 5. **finish**: record the outcome (window stats, counters, critical paths, passive health)
//!    once — at once for the proxy's own answers, when the body ends for the upstream's (see
//!    [`outcome`]) — and stream the response back, or hand an upgraded connection to a
//!    [`tunnel`].
//!
//! The color is chosen here, per request: a flip affects the next request on every keep-alive
//! connection, while requests already past step 2 finish on the color they started on.
//!
//! The proxy's own answers (all in [`error::ProxyError::answer`]), plain text, never naming an
//! internal address:
//!
//! | status | when | counts against the upstream |
//! |---|---|---|
//! | 400 | malformed request (target, Host, lengths); the connection closes | no |
//! | 405 | CONNECT; the connection closes | no |
//! | 200 | TRACE or OPTIONS with `Max-Forwards: 0` (the proxy is the final recipient) | no |
//! | 404 | no service matches | no |
//! | 503 | no healthy upstream in the pool | no (a failure of the live color's window, [`outcome::record_unavailable`]) |
//! | 408 / 400 | the client's request body stalled / failed | no |
//! | 504 | no response head within `request_timeout` | `timeout` |
//! | 502 | connect failed / no valid response | `connect` / `reset` |
//! | 502 | a `101` the client did not ask for, or for another protocol | no (recorded as the 502) |
//! | 502 | (the HTTP/1 server's) a `101` before the request body was all read | no (recorded as the 502, [`crate::http::h2_server::Replaced`]) |
//! | 502 | (the h2 server's) a head over the client's SETTINGS_MAX_HEADER_LIST_SIZE | no (recorded as the 502, [`crate::http::h2_server::Replaced`]) |
//!
//! The HTTP/1 server itself answers 400/431/414/501 for heads it refuses (see
//! [`crate::http::server`]); with the access log on, [`ProxyConn`] makes those answers, so that
//! they carry a request id and are logged like every other.

pub mod body;
pub mod error;
pub mod forward;
pub mod forwarded;
pub mod outcome;
pub mod tunnel;
pub mod validate;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::Either;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::access_log::{AccessLog, Logged, RequestIds, Routed, Target, X_REQUEST_ID};
use crate::config::{Color, Protocol};
use crate::http::client::{PooledBody, Timeouts};
use crate::http::h2_server::Replaced;
use crate::http::headers::{hop_bits, strip_known, wants_trailers, CONNECTION_BIT, TE_BIT};
use crate::http::server::{self, BoxWrite, Handler, Limits, OnUpgrade, Reader, Refused, Settings};
use crate::metrics::Metrics;
use crate::routing::{Service, Snapshot};
use crate::shutdown::Shutdown;
use crate::stats::Clock;
use crate::upstream::{Pool, Upstream};

pub use body::{ClientBody, RequestBody};
pub use error::{ProxyBody, ProxyError};
pub use forwarded::{add_forwarded, Forwarded};
pub use tunnel::Tunnels;

use forward::forward;
use outcome::{Outcome, RecordedBody};
use validate::LastHop;

/// An upstream's response body on its way through the proxy.
pub type UpstreamBody = PooledBody<RequestBody>;

/// A response on its way to the client: with `[log] access` on, its end writes the log line.
pub type ServedBody = Logged<ProxyBody>;

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
    /// upgraded from the connection keeps holding it after the connection itself has ended.
    slot: Option<OwnedSemaphorePermit>,
}

impl ConnInfo {
    /// An IPv4 client of a dual-stack (`[::]`) listener arrives as `::ffff:a.b.c.d`: it is
    /// taken as `a.b.c.d` in `X-Forwarded-For`, `Forwarded` and the access log, where
    /// allow-lists, rate limits and GeoIP expect it.
    pub fn new(remote: SocketAddr, tls: bool, mode: Mode) -> ConnInfo {
        let remote = SocketAddr::new(remote.ip().to_canonical(), remote.port());
        let client_ip = ip_value(remote.ip());
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

/// `ip` as a header value, as `Display` writes it. IPv4 (most clients) is written octet by
/// octet on the stack: `to_string` goes through the formatter and a `String` on every
/// accepted connection.
fn ip_value(ip: std::net::IpAddr) -> HeaderValue {
    let v = match ip {
        std::net::IpAddr::V4(v4) => {
            let mut buf = [0u8; 15];
            let mut n = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                let mut digits = itoa::Buffer::new();
                let d = digits.format(octet).as_bytes();
                buf[n..n + d.len()].copy_from_slice(d);
                n += d.len();
            }
            HeaderValue::from_bytes(&buf[..n])
        }
        std::net::IpAddr::V6(_) => HeaderValue::from_str(&ip.to_string()),
    };
    v.unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// What the request path needs, shared by every listener: the routing snapshot the app
/// publishes into, the open tunnels, the access log and the metrics.
pub struct Proxy {
    routes: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<Metrics>,
    clock: Clock,
    shutdown: Arc<Shutdown>,
    access_log: Option<Arc<AccessLog>>,
    ids: RequestIds,
    /// `[log] request_id`: `X-Request-Id` handled without the access log too.
    request_id: bool,
    tunnels: Tunnels,
}

impl Proxy {
    pub fn new(
        routes: Arc<ArcSwap<Snapshot>>,
        metrics: Arc<Metrics>,
        clock: Clock,
        shutdown: Arc<Shutdown>,
        access_log: Option<Arc<AccessLog>>,
        request_id: bool,
    ) -> Proxy {
        Proxy {
            routes,
            metrics,
            clock,
            shutdown,
            access_log,
            ids: RequestIds::default(),
            request_id,
            tunnels: Tunnels::default(),
        }
    }

    /// The open upgraded connections, drained at shutdown.
    pub fn tunnels(&self) -> &Tunnels {
        &self.tunnels
    }

    /// Step 2: the service, color and upstream for a request, from one snapshot load.
    fn route(
        &self,
        host: Option<&str>,
        path: &str,
        mode: Mode,
        mut routed: Option<&mut Routed>,
    ) -> Result<Route, ProxyError> {
        let snap = self.routes.load();
        let Some(svc) = snap.route(host, path) else {
            self.metrics.unmatched_requests_total.inc();
            return Err(ProxyError::NoService);
        };
        let color = match mode {
            Mode::Live => svc.state.active,
            Mode::Preview => svc.state.active.other(),
        };
        if let Some(r) = routed.as_deref_mut() {
            r.service = Some(svc.clone());
            r.color = Some(color);
        }
        let pool = svc.pool(color);
        let Some(up) = pool.pick() else {
            pool.count_unavailable(mode == Mode::Live);
            // A failure of the live color; preview traffic stays out of the windows.
            if mode == Mode::Live {
                let generation = svc.state.generation;
                outcome::record_unavailable(pool, generation, self.clock.now_epoch(), path);
            }
            return Err(ProxyError::NoHealthyUpstream);
        };
        if let Some(r) = routed {
            r.upstream = Some(up.clone());
        }
        let p = &snap.config.proxy;
        Ok(Route {
            svc: svc.clone(),
            color,
            up: up.clone(),
            request_timeout: p.request_timeout,
            timeouts: Timeouts {
                body_idle: p.body_idle_timeout,
                send: p.upstream_send_timeout,
            },
            retries: p.retries,
            tunnel_idle: p.tunnel_idle_timeout,
            via: p.via,
        })
    }
}

/// Serves one HTTP/1.x client connection (see [`crate::http::server`]) with the proxy as its
/// handler. `idle_at_shutdown`: how long an idle connection is kept once shutdown begins. Not
/// an `async fn`: the connection's future is the server's own, with no layer around it.
pub fn serve_h1(
    reader: Reader,
    writer: BoxWrite,
    proxy: Arc<Proxy>,
    info: Arc<ConnInfo>,
    first_deadline: Instant,
    idle_at_shutdown: Duration,
) -> impl Future<Output = ()> + Send {
    let limits = {
        let p = &proxy.routes.load().config.proxy;
        Limits {
            header_read_timeout: p.header_read_timeout,
            max_headers: p.max_headers,
            max_header_bytes: p.max_header_bytes,
        }
    };
    let settings = Settings {
        limits,
        idle_at_shutdown,
    };
    let handler = ProxyConn { proxy, info };
    server::serve(reader, writer, handler, settings, first_deadline)
}

/// The proxy as one HTTP/1 connection's handler.
struct ProxyConn {
    proxy: Arc<Proxy>,
    info: Arc<ConnInfo>,
}

impl Handler for ProxyConn {
    type RequestBody = ClientBody;
    type Body = ServedBody;

    fn call(
        &self,
        req: Request<ClientBody>,
        on_upgrade: Option<OnUpgrade>,
    ) -> impl Future<Output = Response<ServedBody>> + Send {
        handle(&self.proxy, req, &self.info, on_upgrade)
    }

    fn shutting_down(&self) -> bool {
        self.proxy.shutdown.is_cancelled()
    }

    fn until_shutdown(&self) -> impl Future<Output = ()> + Send {
        self.proxy.shutdown.cancelled()
    }

    fn refused(&self, reason: &'static str) {
        self.proxy.metrics.count_rejected(reason);
    }

    fn client_closed(&self) {
        self.proxy.metrics.client_closed_requests_total.inc();
    }

    /// A head the server refused is answered here when the access log is on, so that it has
    /// its line, its request id (the client's when usable) and, in combined, the Referer and
    /// User-Agent it carried, like every other answered request.
    fn refusal(&self, refused: &Refused) -> Option<Response<ServedBody>> {
        let Some(log) = self.proxy.access_log.as_ref() else {
            // Without the log, the answer still carries its request id.
            if !self.proxy.request_id {
                return None;
            }
            let id = self.proxy.ids.id(refused.field(&X_REQUEST_ID).as_ref());
            let mut resp = error::text(refused.status, refused.why);
            resp.headers_mut().insert(X_REQUEST_ID.clone(), id);
            return Some(resp.map(Logged::off));
        };
        let id = self.proxy.ids.id(refused.field(&X_REQUEST_ID).as_ref());
        let entry = log.refused_entry(
            self.info.remote.ip(),
            refused.line.clone(),
            refused.status.as_u16(),
            id.clone(),
            |name| refused.field(name),
        );
        let mut resp = error::text(refused.status, refused.why);
        resp.headers_mut().insert(X_REQUEST_ID.clone(), id);
        Some(resp.map(|body| Logged::new(body, log.clone(), entry)))
    }

    fn replaced(&self, resp: Response<ServedBody>, status: StatusCode, bytes: u64) {
        let mut body = resp.into_body();
        // The counters (a tunnel's 101 is recorded as its body ends), then the log line.
        Replaced::replaced(&mut body, status);
        body.answered(status.as_u16(), bytes);
    }
}

/// One request, with its access log line when the log is on (see [`crate::access_log`]).
/// Not an `async fn`: without the log the caller gets [`route_and_forward`]'s own future, one
/// layer fewer to move the request into and the response out of.
pub fn handle<'a>(
    proxy: &'a Proxy,
    mut req: Request<ClientBody>,
    conn: &'a Arc<ConnInfo>,
    on_upgrade: Option<OnUpgrade>,
) -> impl Future<Output = Response<ServedBody>> + Send + 'a {
    use futures_util::future::Either as E;
    match &proxy.access_log {
        None if proxy.request_id => {
            let (id, added) = with_request_id(proxy, &mut req);
            E::Left(E::Right(WithRequestId {
                answer: route_and_forward(proxy, req, conn, on_upgrade, None, added),
                id: Some(id),
            }))
        }
        None => E::Left(E::Left(route_and_forward(
            proxy, req, conn, on_upgrade, None, false,
        ))),
        Some(log) => E::Right(logged(proxy, log, req, conn, on_upgrade)),
    }
}

/// The request's `X-Request-Id` (the client's when usable, else a new one), set as its one
/// value upstream: `insert` replaces every value the client sent. True when the client sent
/// none: the field is the proxy's, not one of the client's `max_headers`.
fn with_request_id(proxy: &Proxy, req: &mut Request<ClientBody>) -> (HeaderValue, bool) {
    // One lookup: `entry`, not `get` then `insert`.
    match req.headers_mut().entry(&X_REQUEST_ID) {
        header::Entry::Occupied(mut e) => {
            let id = proxy.ids.id(Some(e.get()));
            // Replaces every value the client sent: one id upstream.
            e.insert(id.clone());
            (id, false)
        }
        header::Entry::Vacant(e) => {
            let id = proxy.ids.id(None);
            e.insert(id.clone());
            (id, true)
        }
    }
}

pin_project_lite::pin_project! {
    /// The answer with the request's `X-Request-Id` on it: a struct built in place around the
    /// request's future, not an `async fn` that would move that future once more.
    struct WithRequestId<F> {
        #[pin]
        answer: F,
        id: Option<HeaderValue>,
    }
}

impl<F: Future<Output = Response<ServedBody>>> Future for WithRequestId<F> {
    type Output = Response<ServedBody>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let mut resp = std::task::ready!(this.answer.poll(cx));
        if let Some(id) = this.id.take() {
            resp.headers_mut().insert(X_REQUEST_ID.clone(), id);
        }
        std::task::Poll::Ready(resp)
    }
}

/// [`handle`] with the access log on.
async fn logged(
    proxy: &Proxy,
    log: &Arc<AccessLog>,
    mut req: Request<ClientBody>,
    conn: &Arc<ConnInfo>,
    on_upgrade: Option<OnUpgrade>,
) -> Response<ServedBody> {
    let start = Instant::now();
    let (id, added) = with_request_id(proxy, &mut req);
    let mut entry = log.entry(
        start,
        conn.remote.ip(),
        req.method().clone(),
        logged_target(req.uri(), req.version()),
        req.version(),
        id.clone(),
        req.headers(),
    );
    let mut routed = Routed::default();
    let mut resp = route_and_forward(proxy, req, conn, on_upgrade, Some(&mut routed), added).await;
    resp.headers_mut().insert(X_REQUEST_ID.clone(), id);
    entry.status = resp.status().as_u16();
    entry.service = routed.service;
    entry.color = routed.color;
    entry.upstream = routed.upstream;
    entry.tunnel = routed.tunnel;
    let log = log.clone();
    resp.map(|body| body.with_log(log, entry))
}

/// The request target as received, for the access log: an HTTP/1 absolute-form target whole
/// (`http://host/path`, as nginx's `$request` has it); otherwise the path and query (h2's
/// `:path`).
fn logged_target(uri: &Uri, version: Version) -> Option<Target> {
    if version != Version::HTTP_2 && uri.authority().is_some() {
        return Some(Target::Whole(uri.to_string()));
    }
    uri.path_and_query().cloned().map(Target::Path)
}

/// The request path: validate → route → rewrite → forward → finish.
async fn route_and_forward(
    proxy: &Proxy,
    mut req: Request<ClientBody>,
    conn: &Arc<ConnInfo>,
    on_upgrade: Option<OnUpgrade>,
    mut routed: Option<&mut Routed>,
    id_added: bool,
) -> Response<ServedBody> {
    let start = Instant::now();
    // 1. Validate. A refused request closes its connection: what a client pipelined behind it
    // is not run.
    let host = match check(proxy, &mut req, id_added) {
        Ok(host) => host,
        Err(e) => return served(e.response()),
    };
    // A TRACE or OPTIONS whose Max-Forwards is spent ends here, whatever its host.
    if validate::max_forwards(&mut req) == LastHop::Answer {
        return served(last_hop(&req));
    }
    // 2. Route: one snapshot load for every decision.
    let route = match proxy.route(
        host.name(),
        req.uri().path(),
        conn.mode,
        routed.as_deref_mut(),
    ) {
        Ok(route) => route,
        Err(e) => return served(e.response()),
    };
    // 3. Rewrite.
    let via = route.via.then(|| forwarded::via(req.version()));
    let fwd = Forwarded::new(conn, host.value.as_ref(), via);
    // The id set before routing (`with_request_id`) is the proxy's, not the client's to drop.
    let own_id = proxy.request_id || proxy.access_log.is_some();
    let mut rewritten = match rewrite(&mut req, &route, &host, &fwd, on_upgrade, own_id) {
        Ok(r) => r,
        Err(e) => return served(e.response()),
    };
    // 4. Forward, to the upstream picked and, while it cannot take the request, to others of
    //    the same pool (at most `retries` more). `up` ends as the one that answered or failed
    //    last: the request is recorded there, once.
    let mut req = req.map(|body| RequestBody::new(body, route.timeouts.body_idle));
    // `request_timeout` runs from the end of the upload: a long one at the client's steady
    // pace is not an upstream too slow to answer.
    let upload = req.body_mut().track(start);
    let pool = route.svc.pool(route.color);
    let mut up = route.up;
    let attempt = forward(
        pool,
        &mut up,
        req,
        &fwd,
        route.timeouts,
        route.retries,
        rewritten.host_from_upstream,
        conn.mode == Mode::Live,
    );
    let answered =
        body::within_request_timeout(attempt, start, route.request_timeout, upload.clone());
    let result = match answered.await {
        None => Err(ProxyError::Timeout),
        Some(Err(e)) => Err(ProxyError::from_client(e, upload.as_deref())),
        Some(Ok(resp)) => Ok(resp),
    };
    // The access log names the upstream that answered (or failed last), as the stats do.
    if let Some(r) = routed.as_deref_mut() {
        r.upstream = Some(up.clone());
    }
    // 5. Finish: record and answer.
    let outcome = Outcome {
        pool: pool.clone(),
        up,
        path: rewritten.path.take(),
        start,
        clock: proxy.clock,
        live: conn.mode == Mode::Live,
        generation: route.svc.state.generation,
    };
    finish(proxy, &route.svc, outcome, result, rewritten, conn, routed)
}

/// The request's host (for routing and `X-Forwarded-Host`): the value, and the length of its
/// name without the port.
struct Host {
    value: Option<HeaderValue>,
    len: usize,
}

impl Host {
    fn name(&self) -> Option<&str> {
        self.value
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.get(..self.len))
    }
}

/// Where a request goes, decided once from one snapshot.
struct Route {
    svc: Arc<Service>,
    color: Color,
    up: Arc<Upstream>,
    request_timeout: Duration,
    timeouts: Timeouts,
    retries: u32,
    tunnel_idle: Duration,
    /// Requests carry `Via` (`proxy.via`).
    via: bool,
}

impl Route {
    fn pool(&self) -> &Arc<Pool> {
        self.svc.pool(self.color)
    }
}

/// What the rewrite leaves for the end of the request.
struct Rewritten {
    /// The protocol the client asked to upgrade to.
    upgrade: Option<HeaderValue>,
    /// The client's connection once upgraded, when it may be (an HTTP/1 connection).
    client_upgrade: Option<OnUpgrade>,
    /// The route's `tunnel_idle_timeout`, for that tunnel.
    tunnel_idle: Duration,
    /// For the critical-path counters (none when the pool has no critical paths) and h2.
    path: Option<PathAndQuery>,
    /// The client sent no Host (HTTP/1.0): the one upstream gets is its own address, so a
    /// retry on another upstream carries that one's.
    host_from_upstream: bool,
    /// The client speaks HTTP/2: its server takes the response's fields as a map.
    fields_to_map: bool,
}

/// Step 1: CONNECT, an h2 request's fields (what the HTTP/1 parser checks as it reads a head),
/// the request target and the Host; an absolute-form target becomes origin form, its
/// authority the Host.
fn check(proxy: &Proxy, req: &mut Request<ClientBody>, id_added: bool) -> Result<Host, ProxyError> {
    if req.method() == Method::CONNECT {
        return Err(ProxyError::ConnectMethod);
    }
    if req.version() == Version::HTTP_2 {
        let max_headers = proxy.routes.load().config.proxy.max_headers;
        // The request's `X-Request-Id` may be the proxy's own, added before this check.
        validate::h2_fields(req, max_headers, id_added).map_err(|e| match e {
            validate::H2FieldsError::TooMany => ProxyError::TooManyHeaders,
            validate::H2FieldsError::Whitespace => {
                ProxyError::Malformed("a field value begins or ends with whitespace\n")
            }
        })?;
        validate::drop_underscore_lookalikes(req.headers_mut());
    }
    validate::target(req).map_err(ProxyError::Malformed)?;
    let host = match validate::request_host(req).map_err(ProxyError::Malformed)? {
        Some((value, len)) => Host {
            value: Some(value),
            len,
        },
        None => Host {
            value: None,
            len: 0,
        },
    };
    if req.version() != Version::HTTP_2 && req.uri().authority().is_some() {
        // Absolute form (RFC 9112 3.2.2): the target's authority replaces Host; the upstream
        // gets the origin form.
        if let Some(v) = &host.value {
            req.headers_mut().insert(header::HOST, v.clone());
        }
        validate::to_origin_form(req);
    } else if req.version() == Version::HTTP_2 && req.headers().contains_key(header::HOST) {
        // `:authority` and a Host naming the same authority (checked): the Host that goes on
        // is `:authority`'s value (RFC 9113 8.3.1), `a` rather than the client's `a:80`.
        if let Some(v) = &host.value {
            req.headers_mut().insert(header::HOST, v.clone());
        }
    }
    Ok(host)
}

/// Step 3: hop-by-hop fields out, `TE: trailers` and the upgrade kept, forwarding fields in
/// (h2; the HTTP/1.1 client writes its own), a Host for HTTP/1.1 upstreams, and the target in
/// the form the pool's protocol wants.
fn rewrite(
    req: &mut Request<ClientBody>,
    route: &Route,
    host: &Host,
    fwd: &Forwarded<'_>,
    on_upgrade: Option<OnUpgrade>,
    own_id: bool,
) -> Result<Rewritten, ProxyError> {
    let protocol = route.pool().protocol;
    let fields_to_map = req.version() == Version::HTTP_2;
    let hops = hop_bits(req.headers());
    let upgrade = if hops & CONNECTION_BIT != 0 {
        validate::requested_upgrade(req.headers())
    } else {
        None
    };
    let te_trailers = hops & TE_BIT != 0 && wants_trailers(req.headers());
    // The proxy's `X-Request-Id` goes upstream whatever a `Connection` line names: it is the
    // proxy's field, set for this hop, not one the client's hop-by-hop list may remove. (The
    // forwarding fields are written after this, so a `Connection` line removes only the
    // client's own values of them.)
    let id = (own_id && hops & CONNECTION_BIT != 0)
        .then(|| req.headers_mut().remove(&X_REQUEST_ID))
        .flatten();
    strip_known(req.headers_mut(), hops);
    if let Some(id) = id {
        req.headers_mut().insert(X_REQUEST_ID.clone(), id);
    }
    if req.version() == Version::HTTP_2 && protocol == Protocol::Http1 {
        validate::join_cookies(req.headers_mut());
    }
    if te_trailers {
        // gRPC needs `te: trailers` end to end; it is the one TE value a proxy may pass on.
        req.headers_mut()
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if protocol == Protocol::H2 {
        add_forwarded(req.headers_mut(), fwd);
    }
    // HTTP/1.1 requests always carry Host (checked above). HTTP/2 clients send :authority and
    // HTTP/1.0 clients may send nothing; an HTTP/1.1 upstream needs a Host either way.
    let mut host_from_upstream = false;
    if req.version() != Version::HTTP_11 && !req.headers().contains_key(header::HOST) {
        let v = match host.value.clone() {
            Some(v) => Some(v),
            None => {
                host_from_upstream = true;
                HeaderValue::from_str(route.up.authority.as_str()).ok()
            }
        };
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
    // A sender of TE names it in Connection (RFC 9110 10.1.4); HTTP/2 has no Connection field.
    if te_trailers && protocol == Protocol::Http1 {
        req.headers_mut()
            .append(header::CONNECTION, HeaderValue::from_static("te"));
    }
    // Kept for the critical-path counters (only a pool that has some needs it) and the h2 URI.
    let path = (protocol == Protocol::H2 || !route.pool().critical.is_empty())
        .then(|| req.uri().path_and_query().cloned())
        .flatten();
    match protocol {
        // The HTTP/1.1 client writes the origin form (path and query) itself.
        Protocol::Http1 => *req.version_mut() = Version::HTTP_11,
        Protocol::H2 => {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(http::uri::Scheme::HTTP);
            // The client's authority (RFC 9113 8.3.1: `:authority` and `Host` agree); the
            // connection, not the URI, goes to the upstream.
            parts.authority = req
                .headers()
                .get(header::HOST)
                .and_then(|v| http::uri::Authority::try_from(v.as_bytes()).ok())
                .or_else(|| Some(route.up.authority.clone()));
            parts.path_and_query = path
                .clone()
                .or_else(|| Some(PathAndQuery::from_static("/")));
            *req.uri_mut() = Uri::from_parts(parts).map_err(|_| ProxyError::InvalidTarget)?;
            *req.version_mut() = Version::HTTP_2;
        }
    }
    Ok(Rewritten {
        upgrade,
        client_upgrade,
        tunnel_idle: route.tunnel_idle,
        path,
        host_from_upstream,
        fields_to_map,
    })
}

/// Step 5: the outcome recorded once and the answer: the proxy's own for an error, a tunnel
/// for a `101` the client asked for, else the upstream's response, recorded when its body ends
/// (a body the upstream cuts is a failure).
fn finish(
    proxy: &Proxy,
    svc: &Service,
    outcome: Outcome,
    result: Result<Response<UpstreamBody>, ProxyError>,
    rewritten: Rewritten,
    conn: &Arc<ConnInfo>,
    routed: Option<&mut Routed>,
) -> Response<ServedBody> {
    let end = Instant::now();
    let elapsed = end - outcome.start;
    let mut resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            let answer = e.answer();
            match &e {
                ProxyError::Upstream(err) => {
                    tracing::debug!(service = %svc.name(), upstream = %outcome.up.addr, error = %err, "upstream request failed");
                }
                // Request-smuggling framing, as the server's refusals of a head are counted.
                ProxyError::BodyMalformed => proxy.metrics.count_rejected("chunked"),
                _ => {}
            }
            outcome.record(end, elapsed, answer.status.as_u16(), answer.failure);
            return served(e.response());
        }
    };
    let status = resp.status();
    if status != StatusCode::SWITCHING_PROTOCOLS {
        if rewritten.fields_to_map {
            let fields = resp.body_mut().take_fields();
            fields.into_map(resp.headers_mut());
        }
        return recorded(resp, outcome, elapsed);
    }
    let asked = rewritten
        .upgrade
        .as_ref()
        .is_some_and(|u| validate::upgrade_matches(u, resp.headers()));
    let error = match rewritten.client_upgrade {
        Some(client_side) if asked => {
            let resp = tunnel::tunnel(
                &proxy.tunnels,
                rewritten.tunnel_idle,
                resp,
                client_side,
                conn.clone(),
                routed,
            );
            // Recorded when the server is done with it: as the 101, or as the 502 the server
            // answers in its place when the request body was not all read ([`Replaced`]).
            return recorded(resp, outcome, elapsed);
        }
        Some(_) => ProxyError::OtherProtocol,
        // That connection now speaks something else: it must not go back to the pool.
        None => ProxyError::UnaskedUpgrade,
    };
    // Counted as what the client gets.
    let answer = error.answer();
    outcome.record(end, elapsed, answer.status.as_u16(), answer.failure);
    resp.body_mut().detach();
    served(error.response())
}

/// The upstream's response, its exchange recorded as its body ends; wrapped once, in the type
/// the server takes (each `map` moves the whole response).
#[inline]
fn recorded(
    resp: Response<UpstreamBody>,
    outcome: Outcome,
    elapsed: Duration,
) -> Response<ServedBody> {
    let status = resp.status().as_u16();
    resp.map(|body| {
        Logged::off(Either::Left(RecordedBody::new(
            body, outcome, elapsed, status,
        )))
    })
}

/// A TRACE or OPTIONS the proxy answers as the final recipient (RFC 9110 7.6.2): OPTIONS with
/// the methods behind it, TRACE with the request it received.
fn last_hop(req: &Request<ClientBody>) -> Response<ProxyBody> {
    let mut resp = if req.method() == Method::TRACE {
        let mut resp = Response::new(Either::Right(http_body_util::Full::new(
            validate::trace_echo(req),
        )));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("message/http"),
        );
        resp
    } else {
        Response::new(Either::Right(
            http_body_util::Full::new(bytes::Bytes::new()),
        ))
    };
    resp.headers_mut().insert(
        header::ALLOW,
        HeaderValue::from_static(validate::ALLOWED_METHODS),
    );
    resp
}

/// The proxy's own answer (or a tunnel's 101) as the server takes it, not logged yet.
fn served(resp: Response<ProxyBody>) -> Response<ServedBody> {
    resp.map(Logged::off)
}

#[cfg(test)]
mod tests {
    use super::ip_value;
    use std::net::IpAddr;

    #[test]
    fn client_ip_values_read_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "1.22.133.4",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:192.0.2.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_value(ip).to_str().unwrap(), ip.to_string());
        }
    }
}
