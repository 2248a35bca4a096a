//! The HTTP/1.1 client toward upstreams: per upstream, a lock-free queue of idle keep-alive
//! connections, and the exchange on one connection driven inside the request's own task. It
//! sends any body ([`UploadBody`]) and writes the caller's own head fields ([`ExtraFields`]);
//! [`hyper_client`] builds hyper-util's pooled client for everything else (HTTP/2 upstreams,
//! probes, etcd, webhooks), with one set of socket options.
//!
//! Why not hyper's client: hyper runs each connection as a separate task and hands every
//! request to it over a channel and every response back over a oneshot, and its response body
//! is another channel; on a small proxied request that machinery was about a third of the
//! proxy's instructions. Here the request task writes the head (one `writev`), reads and parses
//! the response head with `httparse` (the parser hyper uses), and the response body reads the
//! socket itself.
//!
//! What this client speaks: HTTP/1.1 requests in origin form, bodies by `Content-Length` or
//! chunked (trailers kept), the request body written while the response is read (an upstream
//! may answer early or stream both ways: then a task of its own finishes the upload); responses framed by RFC 9112 6.3 (HEAD, 1xx, 204 and
//! 304 carry no body; `Transfer-Encoding: chunked`; `Content-Length`; else until close), where
//! `Content-Length` with `Transfer-Encoding`, differing lengths or any coding but a single
//! `chunked` are refused (request smuggling toward the client). `101` hands the connection to a
//! tunnel; other 1xx heads are offered to an HTTP/1.1 client (see [`interim`]), and skipped
//! otherwise. A connection goes back to the pool only when both messages ended cleanly and the
//! upstream did not ask to close.
//!
//! Retries: a pooled connection the upstream closed while idle is noticed before use (a
//! non-blocking read sees the FIN) and skipped. One that fails the exchange with no response
//! byte read is retried on a fresh connection when the upstream cannot have seen the request
//! (nothing was written) or the request is idempotent and had no body; anything else is an error.
//! By the same rule, a request that fails on a fresh connection (or whose connect fails) comes
//! back to the caller in [`Failed::unsent`], for another upstream of the pool.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use crossbeam_queue::{ArrayQueue, SegQueue};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::body::IdleTimer;
use super::codec::{
    self, decode_chunked, BodyFraming, ChunkState, Chunked, FramingError, FramingFields, Sender,
    Span,
};
use super::fields::{BodyFields, Fields};
use super::headers::{
    put_header, trailer_allowed, CONNECTION_BIT, KEEP_ALIVE_BIT, PROXY_CONNECTION_BIT, TE_BIT,
    TRANSFER_ENCODING_BIT, UPGRADE_BIT,
};
use super::interim;
use super::io::{poll_fill, poll_write_queue};
use super::BoxError;

/// TCP keepalive on every outgoing connection (upstreams, etcd, webhooks): a peer that
/// vanished without a FIN (a dead host, a dropped route) is noticed by the kernel within about
/// `TIME + RETRIES * INTERVAL` of silence instead of holding a connection (or a watch) forever.
const KEEPALIVE_TIME: Duration = Duration::from_secs(10);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_RETRIES: u32 = 3;

/// hyper-util's pooled client with Switchyard's socket options (no Nagle, TCP keepalive,
/// `connect_timeout`), for `http://` URLs only. `http2_only` for HTTP/2 upstreams (prior
/// knowledge); the pool keeps idle connections `idle_timeout`, at most `max_idle_per_host`
/// per host (`None`: no limit).
pub fn hyper_client<B>(
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_host: Option<usize>,
    http2_only: bool,
) -> Client<HttpConnector, B>
where
    B: Body + Send + 'static + Unpin,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_keepalive(Some(KEEPALIVE_TIME));
    connector.set_keepalive_interval(Some(KEEPALIVE_INTERVAL));
    connector.set_keepalive_retries(Some(KEEPALIVE_RETRIES));
    connector.enforce_http(true);
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(idle_timeout)
        // As the proxy's own client: a response's `X-A : a` is taken as `X-A: a` (RFC 9112
        // 5.1), so health checks and smoke tests see the upstream the proxy serves.
        .http1_allow_spaces_after_header_name_in_responses(true);
    if let Some(n) = max_idle_per_host {
        builder.pool_max_idle_per_host(n);
    }
    if http2_only {
        builder
            .http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(30));
    }
    builder.build(connector)
}

/// A request body the client can send: any body of bytes, polled inside the request's task
/// (or, when the upstream answers before the upload ends, a task of its own).
pub trait UploadBody: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static {}

impl<B> UploadBody for B where B: Body<Data = Bytes, Error: Into<BoxError>> + Send + Unpin + 'static {}

/// Head fields the caller writes into every request in place of the request's own fields of
/// those names (the proxy's forwarding fields).
pub trait ExtraFields {
    /// Whether the request's own field `name` is left out: [`ExtraFields::write`] writes it.
    fn replaces(&self, name: &HeaderName) -> bool;
    /// Writes the fields into the head; `replaced` tells whether the request had any field
    /// that [`ExtraFields::replaces`] named (the request's `headers` say which).
    fn write(&self, headers: &HeaderMap, replaced: bool, out: &mut BytesMut);
    /// About how many bytes [`ExtraFields::write`] adds.
    fn len_hint(&self) -> usize;
}

/// The deadlines of one request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timeouts {
    /// `body_idle_timeout`: the longest wait for the response body's next bytes.
    pub body_idle: Duration,
    /// `upstream_send_timeout`: the longest a write of the request may make no progress.
    pub send: Duration,
}

/// Most header lines an upstream response may carry.
const MAX_RESPONSE_HEADERS: usize = 128;
/// Largest upstream response head accepted (its trailer section too:
/// [`codec::MAX_UPSTREAM_TRAILERS`]); on an h2 pool,
/// the largest header or trailer section, as HTTP/2 counts it (names, values, 32 a field).
const MAX_RESPONSE_HEAD: usize = 128 * 1024;
/// SETTINGS_MAX_HEADER_LIST_SIZE toward h2 upstreams: above [`MAX_RESPONSE_HEAD`], which is
/// checked here, since h2 refuses a header section over its own limit but silently leaves
/// out the fields of a trailer section past it (a gRPC error whose long `grpc-message` pushed
/// `grpc-status` out would end as a clean 200). Twice ours and one: a section h2 cut short
/// still shows more than ours unless a single field of it is over 128 KiB.
const H2_MAX_HEADER_LIST: u32 = 2 * MAX_RESPONSE_HEAD as u32 + 1;
/// An idle connection older than this is checked with a `MSG_PEEK` before reuse.
const PEEK_AFTER_IDLE: Duration = Duration::from_millis(500);
/// First read size on a connection; it doubles while reads fill it (large bodies), up to
/// `MAX_READ_CHUNK`, and starts over for the next request.
const READ_CHUNK: usize = 8 * 1024;
/// Request body bytes gathered from the client before they are written upstream. Small: it
/// is for frames that come several per read (chunks); a large read is one frame, written at
/// once. What an upload holds is at most this plus one read (256 KiB, the server's `MAX_READ`).
const UPLOAD_BATCH: usize = 128 * 1024;
/// Most pieces (head, body data, chunk framing) written upstream with one `writev`.
const UPLOAD_SLICES: usize = 32;
/// The largest response read: what a download whose client does not keep up holds (with the
/// allocation it shares), so it bounds a slow reader's memory (512 KiB held ~1 MiB per
/// stalled download; 64 KiB ~110 KB, at no cost in 1 MiB downloads, BENCHMARKS.md tuning log row 62).
const MAX_READ_CHUNK: usize = 64 * 1024;

/// Why a request got no (complete) response.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TCP connect failed or timed out (`ErrorKind::TimedOut`).
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    /// The connection failed while the request was sent or the response read.
    #[error("upstream connection: {0}")]
    Io(#[from] io::Error),
    /// The upstream closed the connection before a complete response.
    #[error("upstream closed the connection early")]
    Closed,
    /// The upstream's answer is not valid HTTP/1.1 (or ambiguous).
    #[error("invalid upstream response: {0}")]
    Protocol(&'static str),
    /// The client's request body failed or stalled; not the upstream's fault.
    #[error("request body")]
    Body(#[source] BoxError),
    /// From hyper (HTTP/2 response bodies).
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    /// From hyper-util's pooled client (HTTP/2 pools).
    #[error(transparent)]
    Pooled(#[from] hyper_util::client::legacy::Error),
}

impl ClientError {
    pub fn is_connect(&self) -> bool {
        match self {
            ClientError::Connect(_) => true,
            ClientError::Pooled(e) => e.is_connect(),
            _ => false,
        }
    }

    /// An HTTP/2 upstream did not process the request (RFC 9113 8.7), which may go elsewhere
    /// or, on a new connection, to the same upstream: it reset the stream with REFUSED_STREAM,
    /// or its GOAWAY did not cover the stream ([`ClientError::is_goaway_unprocessed`]).
    pub fn is_refused(&self) -> bool {
        self.h2_error().is_some_and(|e| {
            e.is_remote()
                && (e.is_go_away()
                    || (e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM)))
        })
    }

    /// No answer came because the connection or the stream failed (the upstream closed or reset
    /// it, crashed, stopped reading), not because the answer was malformed or the client's
    /// body failed: what the HTTP/1.1 pool calls failing "before any response byte", after
    /// which an idempotent bodiless request may be sent again (RFC 9110 9.2.2).
    pub fn is_lost(&self) -> bool {
        !matches!(self, ClientError::Protocol(_) | ClientError::Body(_))
    }

    /// The stream was above the last-stream-id of the upstream's GOAWAY, or opened after it
    /// (RFC 9113 6.8: not processed, safe to send again whatever the method). h2 gives a
    /// GOAWAY's error only to such streams: the ones it covers run on, and end with their own
    /// frames or a broken pipe when the connection closes under them (never sent again).
    pub fn is_goaway_unprocessed(&self) -> bool {
        self.h2_error()
            .is_some_and(|e| e.is_remote() && e.is_go_away())
    }

    fn h2_error(&self) -> Option<&h2::Error> {
        let mut at: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = at {
            if let Some(e) = e.downcast_ref::<h2::Error>() {
                return Some(e);
            }
            at = e.source();
        }
        None
    }
}

/// The body of a request to an HTTP/2 upstream: boxed, since one connection carries the
/// requests of every caller.
pub type H2Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

type H2Sender = hyper::client::conn::http2::SendRequest<H2Body>;

/// A PING on an HTTP/2 upstream connection from which nothing was read for this long, busy or
/// idle, so that a dead peer is noticed.
const H2_PING_INTERVAL: Duration = Duration::from_secs(30);
/// No answer to that PING within this: the connection is closed (its streams fail).
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);

/// The receive window of each stream on an HTTP/2 upstream connection: what the upstream may
/// send ahead of the proxy's reading, so at most this much of a response is buffered here for
/// a client that stopped reading (a window update goes out as the proxy passes bytes on).
/// 256 KiB moves 1.3 GB/s per stream at a LAN's 0.2 ms round trip.
const H2_STREAM_WINDOW: u32 = 256 * 1024;

/// The receive window of an HTTP/2 upstream connection, shared by all its streams: far larger
/// than a stream's, so that streams whose clients stopped reading, each holding up to
/// [`H2_STREAM_WINDOW`], do not shut it for every other stream of the upstream (with hyper's
/// 5 MiB, three stalled 2 MiB streams stalled them all), yet bounded: it is what one upstream
/// connection may hold for slow readers in all, 64 MiB (256 stalled streams), not the 1 GiB a
/// window as wide as nginx's would let a few hundred slow clients pin.
const H2_CONN_WINDOW: u32 = 64 * 1024 * 1024;

/// One upstream's HTTP/2 connection: the sender is read without a lock on every request; the
/// mutex is only taken to open a connection.
#[derive(Default)]
struct H2Conn {
    sender: arc_swap::ArcSwapOption<H2Live>,
    connecting: tokio::sync::Mutex<()>,
    /// Connects ended (either way): a caller that waited on `connecting` while one ran takes
    /// that connect's outcome instead of starting one of its own.
    connects: AtomicU64,
    /// How the last connect failed; `None` when it succeeded.
    failure: arc_swap::ArcSwapOption<ConnectFailure>,
}

/// A failed HTTP/2 connect, told to every request that waited for it.
struct ConnectFailure {
    /// The TCP connect failed (else the handshake did).
    connect: bool,
    kind: io::ErrorKind,
    message: String,
}

impl ConnectFailure {
    fn of(e: &ClientError) -> ConnectFailure {
        let (kind, message) = match e {
            ClientError::Connect(e) | ClientError::Io(e) => (e.kind(), e.to_string()),
            _ => (io::ErrorKind::Other, e.to_string()),
        };
        ConnectFailure {
            connect: e.is_connect(),
            kind,
            message,
        }
    }

    fn error(&self) -> ClientError {
        let e = io::Error::new(self.kind, self.message.clone());
        if self.connect {
            ClientError::Connect(e)
        } else {
            ClientError::Io(e)
        }
    }
}

/// An open HTTP/2 upstream connection.
struct H2Live {
    sender: H2Sender,
    /// Reads from its socket that brought bytes (any frame: a response, a PING's answer).
    reads: Arc<AtomicU64>,
    /// No new request goes on it while `reads` is below this: a request waited on it for its
    /// response head and gave up (`request_timeout`, or its client left, after at least
    /// [`SUSPECT_AFTER`]) with nothing read meanwhile, so the
    /// connection may be dead without a FIN (a peer gone, a route dropped). Any byte read
    /// clears it; until then requests open a new connection rather than each waiting out its
    /// `request_timeout` there until the PINGs give it up.
    suspect_below: AtomicU64,
}

impl H2Conn {
    /// The open connection, unless it has closed or is suspect (see [`H2Live::suspect_below`]).
    fn live(&self) -> Option<Arc<H2Live>> {
        self.sender.load_full().filter(|c| {
            !c.sender.is_closed()
                && c.reads.load(Ordering::Relaxed) >= c.suspect_below.load(Ordering::Relaxed)
        })
    }

    /// No new request goes on `conn` (the upstream's GOAWAY): the next opens a new connection.
    /// The streams it still carries run on.
    fn retire(&self, conn: &Arc<H2Live>) {
        let _ = self.sender.compare_and_swap(conn, None);
    }
}

/// How long a request must have waited for its head, with nothing read from the connection
/// meanwhile, before giving up on it makes the connection suspect: a client that leaves at
/// once says nothing of the upstream (any client could otherwise make the pool reconnect per
/// abandoned request), half a second of silence under a waiting request does.
const SUSPECT_AFTER: Duration = Duration::from_millis(500);

/// A request waiting for its response head on an HTTP/2 connection: dropped before it is
/// `done` (the request timed out, or its client left) at least [`SUSPECT_AFTER`] after it
/// was sent, with nothing read from the connection since, it makes the connection suspect.
struct AwaitingHead<'a> {
    conn: &'a H2Live,
    reads: u64,
    sent: tokio::time::Instant,
    done: bool,
}

impl<'a> AwaitingHead<'a> {
    fn new(conn: &'a H2Live) -> AwaitingHead<'a> {
        AwaitingHead {
            conn,
            reads: conn.reads.load(Ordering::Relaxed),
            sent: tokio::time::Instant::now(),
            done: false,
        }
    }
}

impl Drop for AwaitingHead<'_> {
    fn drop(&mut self) {
        if !self.done
            && self.conn.reads.load(Ordering::Relaxed) == self.reads
            && self.sent.elapsed() >= SUSPECT_AFTER
        {
            self.conn
                .suspect_below
                .fetch_max(self.reads + 1, Ordering::Relaxed);
        }
    }
}

/// An HTTP/2 upstream socket that counts the reads that brought bytes.
struct CountReads {
    io: TcpStream,
    reads: Arc<AtomicU64>,
}

impl tokio::io::AsyncRead for CountReads {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.reads.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

crate::http::io::write_through!([] CountReads);

/// An upstream connection and what has been read from it but not yet used.
struct Conn {
    io: TcpStream,
    rbuf: BytesMut,
    /// The write queue of the last exchange, kept (empty) for the next one.
    spare_out: VecDeque<Bytes>,
    /// How much the next read asks for.
    read_size: usize,
    /// When it went idle; `None` while fresh from connect.
    since: Option<Instant>,
}

impl Conn {
    /// A non-blocking read: an idle connection must have nothing to say. A FIN (0) or stray
    /// bytes mean it cannot carry another request.
    ///
    /// tokio answers from its cached readiness, which misses a FIN the reactor has not seen yet
    /// (an upstream that closes right after a response without saying so). `ask_kernel`: a
    /// connection idle for a while (where an upstream's keep-alive timeout strikes), or one
    /// for a request that could not be sent again, asks the kernel directly instead, with one
    /// `MSG_PEEK`; a busy connection for a retryable request skips that syscall (a stale one
    /// costs it a retry, not an error).
    fn still_open(&self, ask_kernel: bool) -> bool {
        if ask_kernel {
            let mut probe = [std::mem::MaybeUninit::<u8>::uninit(); 1];
            return matches!(
                socket2::SockRef::from(&self.io).peek(&mut probe),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock
            );
        }
        let mut probe = [0u8; 1];
        matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Reads what the socket has into `rbuf`; `Ok(0)` is end of stream. Through `AsyncRead`,
    /// which clears the socket's readiness on a short read, so the next wait does not start
    /// with a read that can only say EAGAIN.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let want = self.read_size;
        poll_fill(
            &mut self.io,
            &mut self.rbuf,
            want,
            &mut self.read_size,
            MAX_READ_CHUNK,
            cx,
        )
    }
}

/// How long an idle connection beyond `upstream_max_idle` waits unused before a reap closes it.
const EXCESS_IDLE: Duration = Duration::from_secs(1);

/// The idle connections of one upstream.
pub struct ConnPool {
    addr: SocketAddr,
    /// Up to `max_idle`, oldest first.
    idle: ArrayQueue<Conn>,
    /// Beyond `max_idle`: a burst of answers can return more at once while as many requests
    /// are about to need them (h2 clients with hundreds of streams in flight), and closing the
    /// excess only to open as many again cost a connect per 10–30 requests. Taken from when
    /// `idle` is empty; [`ConnPool::reap`] closes what stays unused.
    overflow: SegQueue<Conn>,
    /// The fewest connections `overflow` held after a checkout took one since the last reap
    /// (`usize::MAX`: none was taken): that many were not needed even at the busiest moment,
    /// although a steady load takes each of the others in turn (first in, first out).
    overflow_low: AtomicUsize,
    /// The upstream's one multiplexed HTTP/2 connection, for `protocol = "h2"` pools.
    h2: H2Conn,
    /// `upstream_max_idle`: the idle connections a reap keeps; 0 turns reuse off.
    max_idle: usize,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

impl ConnPool {
    pub fn new(
        addr: SocketAddr,
        max_idle: usize,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Arc<ConnPool> {
        Arc::new(ConnPool {
            addr,
            idle: ArrayQueue::new(max_idle.max(1)),
            overflow: SegQueue::new(),
            overflow_low: AtomicUsize::new(usize::MAX),
            h2: H2Conn::default(),
            max_idle,
            connect_timeout,
            idle_timeout,
        })
    }

    /// Sends a prepared request (see [`Prepared`]) on an idle connection, or a new one, and
    /// returns once the response head has been read; the body streams from the connection as
    /// it is polled. On failure the request comes back in [`Failed::unsent`] when the upstream
    /// cannot have acted on it, so that the caller may send it to another upstream; the same
    /// rule decides the retry on a fresh connection here.
    pub async fn send_prepared<B: UploadBody>(
        self: &Arc<Self>,
        req: Prepared<B>,
    ) -> Result<Response<PooledBody<B>>, Failed<B>> {
        let Prepared {
            head,
            upload,
            idempotent,
            head_request,
            timeouts,
            mut body,
        } = req;
        // 1xx heads passed on to the client, across attempts.
        let mut forwarded = 0u8;
        let give_back = |error, body: Option<B>| Failed {
            error,
            unsent: body.map(|body| Prepared {
                head: head.clone(),
                upload,
                idempotent,
                head_request,
                timeouts,
                body,
            }),
        };
        // A request that cannot be sent again should its pooled connection turn out closed
        // (not idempotent, or with a body) asks the kernel whether it is still open.
        let sure = !idempotent || !body.is_end_stream();
        loop {
            let (conn, reused) = match self.checkout(sure) {
                Some(c) => (c, true),
                // Boxed: the connect future is large and rarely run; inline, it would sit in every
                // connection's request future (the server keeps one per client connection).
                None => match Box::pin(self.connect()).await {
                    Ok(c) => (c, false),
                    // Nothing was sent: the request can go elsewhere.
                    Err(e) => return Err(give_back(e, Some(body))),
                },
            };
            let mut ex = Exchange::new(
                conn,
                head.clone(),
                body,
                upload,
                timeouts.send,
                head_request,
            );
            let err = match std::future::poll_fn(|cx| ex.poll_head(cx, &mut forwarded)).await {
                Ok(resp) => return Ok(self.response(ex, resp, head_request, timeouts.body_idle)),
                Err(e) => e,
            };
            // Safe to send again only if the upstream cannot have acted on it: nothing came
            // back, no body byte was taken, and either nothing was written or it is idempotent.
            let untouched = !ex.read_any
                && !ex.body_polled
                && (!ex.wrote_any || idempotent)
                && matches!(err, ClientError::Io(_) | ClientError::Closed);
            match ex.body.take() {
                // A pooled connection the upstream had closed: try a fresh one.
                Some(b) if untouched && reused => {
                    tracing::debug!(error = %err, "pooled upstream connection was stale; retrying");
                    body = b;
                }
                Some(b) if untouched => return Err(give_back(err, Some(b))),
                _ => return Err(give_back(err, None)),
            }
        }
    }

    /// An idle connection that is still open; `sure`: checked with the kernel, not only with
    /// tokio's cached readiness (see [`Conn::still_open`]).
    fn checkout(&self, sure: bool) -> Option<Conn> {
        while let Some(conn) = self.idle.pop().or_else(|| self.take_overflow()) {
            if self.reusable(&conn, sure) {
                return Some(conn);
            }
        }
        None
    }

    fn take_overflow(&self) -> Option<Conn> {
        let conn = self.overflow.pop()?;
        self.overflow_low
            .fetch_min(self.overflow.len(), Ordering::Relaxed);
        Some(conn)
    }

    /// Sends an HTTP/2 request on the upstream's multiplexed connection (opened on first use,
    /// and again once it has closed). The connection goes to this pool's address whatever the
    /// request's URI says, so the URI carries the client's authority: it becomes `:authority`,
    /// equal to `Host` (RFC 9113 8.3.1), as the HTTP/1.1 client keeps `Host`.
    ///
    /// A request the connection never took (it closed under it: the upstream restarted or sent
    /// GOAWAY before this side noticed) is sent once more on a new connection, as hyper-util's
    /// pooled client does; one it took is never sent twice.
    ///
    /// `send_timeout` (`upstream_send_timeout`): a write to the connection that makes no
    /// progress for this long (the upstream stopped reading) fails the connection and every
    /// request on it.
    ///
    /// The request's trailers lose the fields a trailer may not carry ([`trailer_allowed`]),
    /// as the HTTP/1.1 client's last chunk does.
    pub async fn send_h2<B: UploadBody>(
        &self,
        req: Request<B>,
        send_timeout: Duration,
    ) -> Result<Response<Incoming>, ClientError> {
        let req: Request<H2Body> = req.map(|b| {
            b.map_frame(allowed_trailers)
                .map_err(Into::into)
                .boxed_unsync()
        });
        let conn = match self.h2.live() {
            Some(s) => s,
            None => self.h2_connect(send_timeout).await?,
        };
        let mut sender = conn.sender.clone();
        let mut waiting = AwaitingHead::new(&conn);
        let sent = sender.try_send_request(req).await;
        waiting.done = true;
        let error: ClientError = match sent {
            Ok(resp) => return h2_head_checked(resp),
            Err(mut e) => match e.take_message() {
                Some(req) => {
                    // The sender it refused is closed now, so this opens a new connection.
                    self.h2.retire(&conn);
                    let conn = self.h2_connect(send_timeout).await?;
                    let mut sender = conn.sender.clone();
                    let mut waiting = AwaitingHead::new(&conn);
                    let sent = sender.send_request(req).await;
                    waiting.done = true;
                    return h2_head_checked(sent?);
                }
                None => e.into_error().into(),
            },
        };
        if error.is_goaway_unprocessed() {
            // The upstream is closing this connection: the caller's next try opens another.
            self.h2.retire(&conn);
        }
        Err(error)
    }

    /// Opens the HTTP/2 connection; callers that arrive meanwhile wait for it and share its
    /// outcome: the connection, or its failure (each of them fails as a connect that failed,
    /// at once, rather than starting a connect of its own in turn, each one `connect_timeout`
    /// long, toward an upstream that does not answer).
    async fn h2_connect(&self, send_timeout: Duration) -> Result<Arc<H2Live>, ClientError> {
        let seen = self.h2.connects.load(Ordering::Acquire);
        let _one = self.h2.connecting.lock().await;
        if let Some(s) = self.h2.live() {
            return Ok(s);
        }
        if self.h2.connects.load(Ordering::Acquire) != seen {
            if let Some(failed) = self.h2.failure.load_full() {
                return Err(failed.error());
            }
        }
        let opened = self.h2_open(send_timeout).await;
        match &opened {
            Ok(s) => {
                self.h2.sender.store(Some(s.clone()));
                self.h2.failure.store(None);
            }
            Err(e) => self.h2.failure.store(Some(Arc::new(ConnectFailure::of(e)))),
        }
        self.h2.connects.fetch_add(1, Ordering::Release);
        opened
    }

    async fn h2_open(&self, send_timeout: Duration) -> Result<Arc<H2Live>, ClientError> {
        let reads = Arc::new(AtomicU64::new(0));
        let io = CountReads {
            io: self.connect_tcp().await?,
            reads: reads.clone(),
        };
        let io = crate::http::io::SendTimeout::new(io, send_timeout);
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(H2_PING_INTERVAL)
            .keep_alive_timeout(H2_PING_TIMEOUT)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(H2_STREAM_WINDOW)
            .initial_connection_window_size(H2_CONN_WINDOW)
            .max_header_list_size(H2_MAX_HEADER_LIST)
            .handshake(hyper_util::rt::TokioIo::new(io))
            .await?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %addr, error = %e, "HTTP/2 upstream connection ended");
            }
        });
        Ok(Arc::new(H2Live {
            sender,
            reads,
            suspect_below: AtomicU64::new(0),
        }))
    }

    async fn connect(&self) -> Result<Conn, ClientError> {
        let io = self.connect_tcp().await?;
        Ok(Conn {
            io,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            spare_out: VecDeque::with_capacity(4),
            read_size: READ_CHUNK,
            since: None,
        })
    }

    /// A TCP connection to the upstream: `connect_timeout`, no Nagle, keepalive probes.
    async fn connect_tcp(&self) -> Result<TcpStream, ClientError> {
        let io = tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| {
                ClientError::Connect(io::Error::new(io::ErrorKind::TimedOut, "timed out"))
            })?
            .map_err(ClientError::Connect)?;
        let _ = io.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_TIME)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_RETRIES);
        let _ = socket2::SockRef::from(&io).set_tcp_keepalive(&keepalive);
        Ok(io)
    }

    fn response<B: UploadBody>(
        self: &Arc<Self>,
        ex: Exchange<B>,
        head: ResponseHead,
        head_request: bool,
        idle: Duration,
    ) -> Response<PooledBody<B>> {
        let ResponseHead {
            status,
            fields,
            headers,
            framing,
            keep_alive,
        } = head;
        let decoder = if status == StatusCode::SWITCHING_PROTOCOLS {
            Decoder::Upgrade
        } else if head_request
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Decoder::Length(0)
        } else {
            framing
        };
        // An answer that came before the whole request went out: the upstream may not have read
        // all of it, so the connection is not reused.
        let early = !ex.sent();
        let body = H1Body {
            ex,
            decoder,
            keep_alive: keep_alive && !early,
            pool: self.clone(),
            failed: None,
            idle: IdleTimer::new(idle),
        };
        let kind = if early && body.ex.uploading() && decoder != Decoder::Upgrade {
            Kind::Duplex(Box::new(Duplex::spawn(body)))
        } else {
            Kind::H1(Box::new(body))
        };
        let mut resp = Response::new(PooledBody { kind, fields });
        *resp.status_mut() = status;
        *resp.version_mut() = Version::HTTP_11;
        *resp.headers_mut() = headers;
        resp
    }

    /// Closes idle connections past `upstream_idle_timeout` or closed by the upstream, so an
    /// upstream nobody sends to (the idle color) keeps no sockets open, and those beyond
    /// `upstream_max_idle` that were not needed: as many as the overflow never went below
    /// since the last reap, and any no request took for [`EXCESS_IDLE`]. Run by the stats
    /// ticker (every 4 s).
    pub fn reap(&self) {
        self.reap_with(|| {});
    }

    /// [`ConnPool::reap`], calling `between` after each idle connection it takes out to check
    /// (a test runs a concurrent `put_back` there).
    fn reap_with(&self, mut between: impl FnMut()) {
        // Reusable idle connections whose slot a concurrent `put_back` filled while they were
        // checked: they join the overflow after this reap's pass over it, as the one put back
        // would have had it come a moment later (judged at the next reap, never closed here).
        let mut displaced = Vec::new();
        for _ in 0..self.idle.len() {
            let Some(conn) = self.idle.pop() else {
                break;
            };
            between();
            if self.reusable(&conn, false) {
                if let Err(conn) = self.idle.push(conn) {
                    displaced.push(conn);
                }
            }
        }
        // Those never needed since the last reap go first.
        let mut unneeded = self.overflow_low.swap(usize::MAX, Ordering::Relaxed);
        if unneeded == usize::MAX {
            unneeded = 0;
        }
        for _ in 0..self.overflow.len() {
            let Some(conn) = self.overflow.pop() else {
                break;
            };
            if !self.reusable(&conn, false) {
                unneeded = unneeded.saturating_sub(1);
                continue;
            }
            if unneeded > 0 {
                unneeded -= 1;
                continue;
            }
            if conn.since.is_some_and(|t| t.elapsed() < EXCESS_IDLE) {
                self.overflow.push(conn);
            } else {
                // Kept only where the pool has room under the cap.
                let _ = self.idle.push(conn);
            }
        }
        for conn in displaced {
            self.overflow.push(conn);
        }
    }

    fn reusable(&self, conn: &Conn, sure: bool) -> bool {
        let idle_for = conn.since.map(|t| t.elapsed());
        if idle_for.is_some_and(|d| d > self.idle_timeout) {
            return false;
        }
        conn.still_open(sure || idle_for.is_some_and(|d| d > PEEK_AFTER_IDLE))
    }

    fn put_back(&self, mut conn: Conn) {
        if self.max_idle == 0 {
            return;
        }
        conn.since = Some(Instant::now());
        if conn.read_size > READ_CHUNK || conn.rbuf.capacity() > 2 * READ_CHUNK {
            // After a large body: an idle connection keeps no large buffer.
            conn.read_size = READ_CHUNK;
            conn.rbuf = BytesMut::with_capacity(READ_CHUNK);
        }
        if let Err(conn) = self.idle.push(conn) {
            self.overflow.push(conn);
        }
    }
}

/// RFC 9110 9.2.2: a request that may be sent again when its connection fails before an answer.
pub fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// A request encoded for any upstream of a pool: the head is in origin form and names no
/// upstream, so the same bytes can go to another one when the first cannot be reached.
pub struct Prepared<B> {
    head: Bytes,
    upload: Upload,
    idempotent: bool,
    head_request: bool,
    timeouts: Timeouts,
    body: B,
}

impl<B: UploadBody> Prepared<B> {
    pub fn new(req: Request<B>, extra: &impl ExtraFields, timeouts: Timeouts) -> Prepared<B> {
        let (parts, body) = req.into_parts();
        let (head, upload) = encode_head(&parts, &body, extra);
        Prepared {
            head,
            upload,
            idempotent: is_idempotent(&parts.method),
            head_request: parts.method == Method::HEAD,
            timeouts,
            body,
        }
    }
}

impl<B> Prepared<B> {
    /// The same request with its `Host` value replaced: for a Host the proxy filled in from
    /// the upstream's address (an HTTP/1.0 request without one), when the request goes to
    /// another upstream. Only on a retry, so the head is rebuilt rather than kept in parts.
    pub fn with_host(mut self, host: &[u8]) -> Prepared<B> {
        let mut out = BytesMut::with_capacity(self.head.len() + host.len());
        let mut lines = self.head.split_inclusive(|b| *b == b'\n');
        if let Some(request_line) = lines.next() {
            out.put_slice(request_line);
        }
        let mut done = false;
        for line in lines {
            let is_host = line.len() > 5 && line[..5].eq_ignore_ascii_case(b"host:");
            if !done && (is_host || line == b"\r\n") {
                put_header(&mut out, b"host", host);
                done = true;
                if is_host {
                    continue;
                }
            }
            out.put_slice(line);
        }
        self.head = out.freeze();
        self
    }
}

/// A request that got no response.
pub struct Failed<B> {
    pub error: ClientError,
    /// The request, when the upstream cannot have acted on it: the connect failed, or the
    /// connection failed before any response byte, no body byte was taken, and either nothing
    /// was written or the request is idempotent. Anything else must not be sent again.
    pub unsent: Option<Prepared<B>>,
}

/// How the request body goes on the wire.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Upload {
    /// Nothing, or exactly the declared `Content-Length`.
    Raw,
    Chunked,
}

/// The request head in origin form with the caller's [`ExtraFields`], and how its body is
/// framed: by its exact size when known (the client's `Content-Length`, as the server checked
/// it), otherwise chunked.
fn encode_head<B: Body>(
    parts: &http::request::Parts,
    body: &B,
    extra: &impl ExtraFields,
) -> (Bytes, Upload) {
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .filter(|p| !p.is_empty())
        .unwrap_or("/");
    let mut size = parts.method.as_str().len() + path.len() + 16;
    for (name, value) in &parts.headers {
        size += name.as_str().len() + value.len() + 4;
    }
    size += 80 + extra.len_hint();
    let mut out = BytesMut::with_capacity(size);
    out.put_slice(parts.method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(path.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    let (mut replaced, mut had_length) = (false, false);
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH {
            // Written below from the body the server validated: one value, never a list.
            had_length = true;
            continue;
        }
        if extra.replaces(name) {
            replaced = true;
            continue;
        }
        put_header(&mut out, name.as_str().as_bytes(), value.as_bytes());
    }
    extra.write(&parts.headers, replaced, &mut out);
    let upload = if body.is_end_stream() {
        if had_length || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH) {
            out.put_slice(b"content-length: 0\r\n");
        }
        Upload::Raw
    } else if let Some(n) = body.size_hint().exact() {
        let mut digits = itoa::Buffer::new();
        put_header(&mut out, b"content-length", digits.format(n).as_bytes());
        Upload::Raw
    } else {
        out.put_slice(b"transfer-encoding: chunked\r\n");
        Upload::Chunked
    };
    out.put_slice(b"\r\n");
    (out.freeze(), upload)
}

/// A parsed response head and what it says about the connection.
struct ResponseHead {
    status: StatusCode,
    /// The fields that go on (none for a `101`, whose fields are in `headers`).
    fields: Fields,
    headers: HeaderMap,
    framing: Decoder,
    keep_alive: bool,
}

/// One request/response on one connection: the request still being written, and the
/// connection being read.
struct Exchange<B> {
    conn: Option<Conn>,
    /// Bytes waiting to be written, in order (head, chunk framing, body data).
    out: VecDeque<Bytes>,
    /// The request body; kept after its end so that an unsent request can be retried.
    body: Option<B>,
    body_done: bool,
    upload: Upload,
    /// Writing failed: the rest of the request is abandoned and the connection is not reused.
    upload_broken: bool,
    wrote_any: bool,
    read_any: bool,
    body_polled: bool,
    /// Bytes in `out`, which stops gathering body frames at `UPLOAD_BATCH`.
    queued: usize,
    /// `upstream_send_timeout`: an upstream that takes no byte of the request for this long
    /// fails the exchange (its fault, not the client's).
    send_timer: IdleTimer,
    /// The request is a HEAD: its answer has no body.
    head_request: bool,
}

impl<B> Exchange<B> {
    /// The whole request (head and body) is in the socket.
    fn sent(&self) -> bool {
        self.body_done && self.out.is_empty() && !self.upload_broken
    }

    /// Part of the request is still to be written, and can be.
    fn uploading(&self) -> bool {
        self.conn.is_some() && !self.sent() && !self.upload_broken
    }
}

impl<B: UploadBody> Exchange<B> {
    fn new(
        mut conn: Conn,
        head: Bytes,
        body: B,
        upload: Upload,
        send_timeout: Duration,
        head_request: bool,
    ) -> Exchange<B> {
        let mut out = std::mem::take(&mut conn.spare_out);
        out.push_back(head);
        let body_done = body.is_end_stream();
        let send_timer = IdleTimer::new(send_timeout);
        Exchange {
            conn: Some(conn),
            out,
            body: Some(body),
            body_done,
            upload,
            upload_broken: false,
            wrote_any: false,
            read_any: false,
            body_polled: false,
            queued: 0,
            send_timer,
            head_request,
        }
    }

    /// Writes what it can of the request. An I/O error stops the upload but not the exchange:
    /// the upstream may have answered (and closed) before reading everything. Only a failure
    /// of the client's body is an error.
    fn poll_upload(&mut self, cx: &mut Context<'_>) -> Result<(), ClientError> {
        if self.upload_broken {
            return Ok(());
        }
        if self.conn.is_none() {
            return Ok(());
        }
        loop {
            // What the client's body has ready is gathered first and then written with one
            // `writev`: a body that arrives in several pieces (or a chunked body decoded into
            // one frame per chunk) is not written piece by piece. The head alone goes out first
            // (as before): until then no body byte is taken, so a request whose first write
            // fails can still be sent again.
            let mut waiting = self.body_done;
            while self.wrote_any
                && !waiting
                && self.queued < UPLOAD_BATCH
                && self.out.len() + 3 <= UPLOAD_SLICES
            {
                let Some(body) = self.body.as_mut() else {
                    waiting = true;
                    break;
                };
                self.body_polled = true;
                match Pin::new(body).poll_frame(cx) {
                    Poll::Pending => waiting = true,
                    Poll::Ready(None) => {
                        if self.upload == Upload::Chunked {
                            self.push_out(Bytes::from_static(codec::LAST_CHUNK));
                        }
                        self.body_done = true;
                        waiting = true;
                    }
                    Poll::Ready(Some(Err(e))) => {
                        self.body_done = true;
                        self.upload_broken = true;
                        self.out.clear();
                        self.queued = 0;
                        return Err(ClientError::Body(e.into()));
                    }
                    Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                        Ok(data) if data.is_empty() => {}
                        Ok(data) if self.upload == Upload::Chunked => {
                            self.push_out(codec::chunk_size_line(data.len()));
                            self.push_out(data);
                            self.push_out(Bytes::from_static(codec::CHUNK_END));
                        }
                        Ok(data) => self.push_out(data),
                        Err(frame) => {
                            // Trailers travel only in chunked framing; with a length they are
                            // dropped (HTTP/1.1 has nowhere to put them).
                            if let (Ok(trailers), Upload::Chunked) =
                                (frame.into_trailers(), self.upload)
                            {
                                self.push_out(codec::last_chunk_with(&trailers));
                                self.body_done = true;
                                waiting = true;
                            }
                        }
                    },
                }
            }
            let Some(conn) = self.conn.as_mut() else {
                return Ok(());
            };
            while !self.out.is_empty() {
                match poll_write_queue::<UPLOAD_SLICES, _>(&mut conn.io, &mut self.out, cx) {
                    Poll::Pending if self.send_timer.poll_expired(cx) => {
                        self.upload_broken = true;
                        self.out.clear();
                        self.queued = 0;
                        return Err(ClientError::Io(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "upstream_send_timeout: the upstream stopped reading the request",
                        )));
                    }
                    Poll::Pending => return Ok(()),
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        self.upload_broken = true;
                        self.out.clear();
                        self.queued = 0;
                        return Ok(());
                    }
                    Poll::Ready(Ok(written)) => {
                        self.wrote_any = true;
                        self.send_timer.progressed();
                        self.queued = self.queued.saturating_sub(written);
                    }
                }
            }
            // Everything gathered is written. A body that is waiting (its waker is set) or has
            // ended needs no further poll now: polling it again would be one more read that
            // finds nothing. One stopped by the batch limit, or the head just written, goes on.
            if waiting {
                return Ok(());
            }
        }
    }

    fn push_out(&mut self, b: Bytes) {
        self.queued += b.len();
        self.out.push_back(b);
    }

    /// Drives the upload and reads until a final (non-1xx) response head. Interim heads are
    /// offered to the client (see [`interim`]), at most [`interim::MAX_FORWARDED`] of them
    /// (`forwarded` counts them).
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        forwarded: &mut u8,
    ) -> Poll<Result<ResponseHead, ClientError>> {
        self.poll_upload(cx)?;
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(Err(ClientError::Closed));
        };
        loop {
            if !conn.rbuf.is_empty() {
                match parse_head(&mut conn.rbuf, self.head_request)? {
                    Some(head)
                        if head.status.is_informational()
                            && head.status != StatusCode::SWITCHING_PROTOCOLS =>
                    {
                        if *forwarded < interim::MAX_FORWARDED
                            && interim::offer(head.status, head.fields.lines())
                        {
                            *forwarded += 1;
                        }
                        continue;
                    }
                    Some(head) => return Poll::Ready(Ok(head)),
                    None if conn.rbuf.len() > MAX_RESPONSE_HEAD => {
                        return Poll::Ready(Err(ClientError::Protocol("response head too large")));
                    }
                    None => {}
                }
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) => {
                    return Poll::Ready(Err(if self.upload_broken && !self.read_any {
                        ClientError::Io(io::Error::from(io::ErrorKind::BrokenPipe))
                    } else {
                        ClientError::Closed
                    }))
                }
                Ok(_) => self.read_any = true,
                Err(e) => return Poll::Ready(Err(ClientError::Io(e))),
            }
        }
    }
}

/// Parses one response head off the front of `buf`; `None` if incomplete. The fields stay
/// in the head's buffer as lines (see [`Fields`]), compacted in place over the hop-by-hop and
/// framing fields that do not go on; only a `101` gets a map (the proxy reads its `Upgrade`).
/// `head_request`: the answer to a HEAD, which has no body whatever its fields say.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<ResponseHead>, ClientError> {
    // Uninitialized slots: initializing 128 headers cost more than parsing a small head.
    let mut slots = [std::mem::MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_RESPONSE_HEADERS];
    // A later HTTP/1 minor version (`HTTP/1.2`) is read as 1.1, the highest this client
    // speaks (RFC 9110 2.5), as the server reads a request's; httparse takes only 1.0 and 1.1.
    if buf.get(7).is_some_and(|b| (b'2'..=b'9').contains(b)) && buf.starts_with(b"HTTP/1.") {
        buf[7] = b'1';
    }
    let mut resp = httparse::Response::new(&mut []);
    // Whitespace between a field name and its colon: a response's is taken out (RFC 9112 5.1:
    // "A proxy MUST remove any such whitespace from a response message before forwarding"),
    // not refused, so a legacy upstream that writes `X-A : a` is not an upstream failing every
    // request. A request's stays a 400 (the server's parser is strict).
    let len = match httparse::ParserConfig::default()
        .allow_spaces_after_header_name_in_responses(true)
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots)
    {
        // The head limit holds for a head that arrived whole in one read too.
        Ok(httparse::Status::Complete(len)) if len > MAX_RESPONSE_HEAD => {
            return Err(ClientError::Protocol("response head too large"))
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ClientError::Protocol("too many response headers"))
        }
        Err(_) => return Err(ClientError::Protocol("malformed response head")),
    };
    let code = resp.code.unwrap_or(0);
    // RFC 9110 15: status codes are 100..=599; 600-999 (which the http crate accepts) are an
    // invalid response, answered 502 and counted against the upstream.
    if code > 599 {
        return Err(ClientError::Protocol("invalid status code"));
    }
    let status =
        StatusCode::from_u16(code).map_err(|_| ClientError::Protocol("invalid status code"))?;
    let http10 = resp.version == Some(0);
    // Offsets of every name and value: the lines are rewritten in the head's own buffer.
    let mut small: [Span; 16] = [(0, 0, 0, 0); 16];
    let mut large = Vec::new();
    let spans = codec::header_spans(buf, resp.headers, &mut small, &mut large);
    let mut head = buf.split_to(len);

    // First pass: framing, the connection's fate, which fields go on, and the names
    // `Connection` lines take out (they may come after the fields they name). Hop-by-hop
    // fields stop here, except a 101's Upgrade, which the client needs (its `Connection:
    // upgrade` is written anew below). And whether every line ends with at least two bytes
    // (CRLF, or LF after whitespace) before the next one starts: then each line fits where it
    // was, see the second pass. A 1xx has no body (RFC 9110 15.2): its framing fields are not
    // read. Nor has the answer to a HEAD, a 204 or a 304, which ends at its empty line whatever
    // its fields say (RFC 9112 6.3): their Transfer-Encoding is not read, and their length
    // (the size a GET would have had) goes on only when it is one valid value and no
    // Transfer-Encoding makes it doubtful.
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    let informational = status.is_informational();
    let bodiless = informational
        || head_request
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let (mut date, mut roomy, mut doubtful_length, mut saw_te) = (false, true, false, false);
    let mut framing = FramingFields::default();
    let (mut saw_close, mut saw_keep_alive) = (false, false);
    let mut named: Vec<Vec<u8>> = Vec::new();
    // Each field's kind, found once for both passes.
    let mut kinds_small = [0u8; 16];
    let mut kinds_large = Vec::new();
    let kinds = if spans.len() <= kinds_small.len() {
        &mut kinds_small[..spans.len()]
    } else {
        kinds_large.resize(spans.len(), 0u8);
        &mut kinds_large[..]
    };
    for (i, (&(n, nl, v, vl), kind)) in spans.iter().zip(kinds.iter_mut()).enumerate() {
        let name = &head[n as usize..(n + nl) as usize];
        let value = &head[v as usize..(v + vl) as usize];
        let next = spans.get(i + 1).map_or(len, |s| s.0 as usize);
        roomy &= next >= line_end(&head, n, nl, v, vl).1 + 2;
        *kind = response_field(name);
        // Only a Date that goes on spares the server its own (RFC 9110 6.6.1).
        date |= *kind == DATE_FIELD;
        match *kind {
            CONTENT_LENGTH_FIELD if !informational => {
                if let Err(e) = framing.content_length(value) {
                    if !bodiless {
                        return Err(ClientError::Protocol(framing_fault(e)));
                    }
                    doubtful_length = true;
                }
            }
            bits if bits & TRANSFER_ENCODING_BIT != 0 => {
                saw_te = true;
                if bodiless {
                    doubtful_length = true;
                } else {
                    framing.transfer_encoding(value);
                }
            }
            bits if bits & CONNECTION_BIT != 0 => {
                for token in value.split(|b| *b == b',') {
                    let token = token.trim_ascii();
                    if codec::name_is(token, b"close") {
                        saw_close = true;
                    } else if codec::name_is(token, b"keep-alive") {
                        saw_keep_alive = true;
                    } else if HeaderName::from_bytes(token).is_ok()
                        && !token.eq_ignore_ascii_case(b"host")
                    {
                        named.push(token.to_vec());
                    }
                }
            }
            _ => {}
        }
        if *kind == CONTENT_LENGTH_FIELD
            || (*kind & HOP_FIELDS != 0 && !(switching && *kind == UPGRADE_BIT))
        {
            *kind = DROPPED;
        }
    }
    if !named.is_empty() {
        // Fields a `Connection` line names, before or after it.
        date = false;
        for (&(n, nl, _, _), kind) in spans.iter().zip(kinds.iter_mut()) {
            let name = &head[n as usize..(n + nl) as usize];
            if *kind != UPGRADE_BIT && named.iter().any(|t| t.eq_ignore_ascii_case(name)) {
                *kind = DROPPED;
            }
            date |= *kind == DATE_FIELD;
        }
    }
    let decoder = match framing.decide() {
        _ if bodiless => Decoder::Length(0),
        Ok(BodyFraming::Length(n)) => Decoder::Length(n),
        Ok(BodyFraming::Unframed) => Decoder::Eof,
        Ok(BodyFraming::Chunked) => Decoder::Chunked(ChunkState::Size),
        Err(e) => return Err(ClientError::Protocol(framing_fault(e))),
    };

    // Second pass: the lines that go on, each `name:value\r\n`. Where every kept line has room
    // for its CRLF they move toward the front of the head's own buffer over those that do not:
    // a line then never grows, so it is written before the next line starts. A lone LF right
    // after a value (RFC 9112 2.2 lets a recipient accept one) leaves one byte: such a head is
    // copied out instead (rewritten in place, the next name lost its first byte, or the write
    // ran past the head).
    let start = spans.first().map_or(len, |s| s.0 as usize);
    let lines = if roomy {
        let mut w = start;
        for (&(n, nl, v, vl), &kind) in spans.iter().zip(kinds.iter()) {
            if kind == DROPPED {
                continue;
            }
            let (colon, end) = line_end(&head, n, nl, v, vl);
            let (n, nl) = (n as usize, nl as usize);
            if colon == n + nl {
                head.copy_within(n..end, w);
            } else {
                // The name, then from its colon on: whitespace between them is left behind.
                // The line only shrinks, and the name's copy ends before the colon it comes
                // from.
                head.copy_within(n..n + nl, w);
                head.copy_within(colon..end, w + nl);
            }
            codec::lowercase_name(&mut head[w..w + nl]);
            w += nl + end - colon;
            head[w..w + 2].copy_from_slice(b"\r\n");
            w += 2;
        }
        head.truncate(w);
        head.advance(start);
        head.freeze()
    } else {
        let mut out = BytesMut::with_capacity(len - start + spans.len());
        for (&(n, nl, v, vl), &kind) in spans.iter().zip(kinds.iter()) {
            if kind == DROPPED {
                continue;
            }
            let (colon, end) = line_end(&head, n, nl, v, vl);
            let (n, nl) = (n as usize, nl as usize);
            let at = out.len();
            if colon == n + nl {
                out.put_slice(&head[n..end]);
            } else {
                out.put_slice(&head[n..n + nl]);
                out.put_slice(&head[colon..end]);
            }
            codec::lowercase_name(&mut out[at..at + nl]);
            out.put_slice(b"\r\n");
        }
        out.freeze()
    };
    // Never a length on a 204 (RFC 9110 8.6); an h2 client would reset the stream on one.
    let length = framing
        .length()
        .filter(|_| !doubtful_length && status != StatusCode::NO_CONTENT);
    let fields = Fields::new(lines, length, date);
    let (fields, headers) = if switching {
        let mut map = HeaderMap::new();
        fields.into_map(&mut map);
        map.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        (Fields::default(), map)
    } else {
        (fields, HeaderMap::new())
    };
    Ok(Some(ResponseHead {
        status,
        fields,
        headers,
        framing: decoder,
        // HTTP/1.0 keeps a connection only when asked to, and never with Transfer-Encoding
        // (RFC 9112 6.1: its framing is faulty, even on an answer without a body); `close`
        // always wins.
        keep_alive: !saw_close && (!http10 || (saw_keep_alive && !saw_te)),
    }))
}

/// [`response_field`]: `Content-Length` and `Date` (alone), or hop-by-hop bits.
const CONTENT_LENGTH_FIELD: u8 = 128;
const DATE_FIELD: u8 = 64;
const HOP_FIELDS: u8 = 63;
/// A field that does not go on (set between the passes; `response_field` never returns it).
const DROPPED: u8 = 255;

/// Where a field line's colon is and where its `name:value` ends (its value less trailing
/// whitespace; just past the colon for an empty value). The colon follows the name at once
/// unless the parser let whitespace in between (a response's, see [`parse_head`]).
#[inline]
fn line_end(head: &[u8], n: u32, nl: u32, v: u32, vl: u32) -> (usize, usize) {
    let mut colon = (n + nl) as usize;
    while matches!(head.get(colon), Some(b' ' | b'\t')) {
        colon += 1;
    }
    let end = if vl == 0 {
        colon + 1
    } else {
        (v + vl) as usize
    };
    (colon, end)
}

/// What a response field's name is to the client, by its bytes (any case): one of the two
/// markers above, [`hop_bit`]'s bit, or 0.
#[inline]
fn response_field(name: &[u8]) -> u8 {
    let is = |known: &[u8]| codec::name_is(name, known);
    match name.len() {
        2 if is(b"te") => TE_BIT,
        4 if is(b"date") => DATE_FIELD,
        7 if is(b"upgrade") => UPGRADE_BIT,
        10 if is(b"connection") => CONNECTION_BIT,
        10 if is(b"keep-alive") => KEEP_ALIVE_BIT,
        14 if is(b"content-length") => CONTENT_LENGTH_FIELD,
        16 if is(b"proxy-connection") => PROXY_CONNECTION_BIT,
        17 if is(b"transfer-encoding") => TRANSFER_ENCODING_BIT,
        _ => 0,
    }
}

/// The reason a response's framing is refused (a 502 toward the client).
fn framing_fault(e: FramingError) -> &'static str {
    match e {
        FramingError::InvalidLength => "invalid Content-Length",
        FramingError::ConflictingLength => "conflicting Content-Length",
        FramingError::LengthAndTransferEncoding => "Content-Length with Transfer-Encoding",
        FramingError::UnsupportedTransferEncoding | FramingError::UnimplementedCoding => {
            "unsupported Transfer-Encoding"
        }
    }
}

/// How the rest of the response body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decoder {
    Length(u64),
    Chunked(ChunkState),
    /// Until the upstream closes (HTTP/1.0 style); never reusable.
    Eof,
    /// `101`: the connection belongs to a tunnel.
    Upgrade,
    Done,
}

/// A response body read straight off the upstream connection.
struct H1Body<B> {
    ex: Exchange<B>,
    decoder: Decoder,
    keep_alive: bool,
    pool: Arc<ConnPool>,
    /// A failure held back for one poll, so that what was already passed on gets flushed to
    /// the client first (hyper's h2 server drops unflushed output when a body fails).
    failed: Option<ClientError>,
    /// `body_idle_timeout` between two reads of the body: a stalled upstream does not hold the
    /// client (and both connections) forever.
    idle: IdleTimer,
}

impl<B> H1Body<B> {
    /// Hands the connection back when both messages ended cleanly.
    fn finish(&mut self) {
        self.decoder = Decoder::Done;
        if self.ex.uploading() {
            // The response ended first; the rest of the request still needs the connection
            // (which is then never pooled: see `ConnPool::response`).
            return;
        }
        let sent = self.ex.sent();
        let Some(conn) = self.ex.conn.take() else {
            return;
        };
        if self.keep_alive && sent && conn.rbuf.is_empty() {
            let mut conn = conn;
            // Empty once the request is sent: its capacity serves the next exchange.
            conn.spare_out = std::mem::take(&mut self.ex.out);
            self.pool.put_back(conn);
        }
    }
}

impl<B: UploadBody> H1Body<B> {
    /// Ends the body with an error, after one more turn of the writer; the connection is
    /// closed.
    fn fail(
        &mut self,
        e: ClientError,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        // Not `Done` yet: the server must not take the body for complete meanwhile.
        self.ex.conn = None;
        self.failed = Some(e);
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        if let Some(e) = self.failed.take() {
            self.decoder = Decoder::Done;
            return Poll::Ready(Some(Err(e)));
        }
        // The request may still be going out (an upstream streaming both ways).
        if let Err(e) = self.ex.poll_upload(cx) {
            return self.fail(e, cx);
        }
        loop {
            let Some(conn) = self.ex.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let frame = match &mut self.decoder {
                Decoder::Done | Decoder::Upgrade => return Poll::Ready(None),
                Decoder::Length(0) => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Decoder::Length(left) if !conn.rbuf.is_empty() => {
                    let take = (conn.rbuf.len() as u64).min(*left) as usize;
                    *left -= take as u64;
                    Some(Frame::data(conn.rbuf.split_to(take).freeze()))
                }
                Decoder::Eof if !conn.rbuf.is_empty() => {
                    Some(Frame::data(conn.rbuf.split().freeze()))
                }
                Decoder::Length(_) | Decoder::Eof => None,
                Decoder::Chunked(st) => {
                    match decode_chunked(&mut conn.rbuf, st, Sender::Upstream)
                        .map_err(ClientError::Protocol)
                    {
                        Err(e) => return self.fail(e, cx),
                        Ok(Chunked::Data(d)) => Some(Frame::data(d)),
                        Ok(Chunked::Trailers(t)) => {
                            self.finish();
                            return Poll::Ready(Some(Ok(Frame::trailers(t))));
                        }
                        Ok(Chunked::End) => {
                            self.finish();
                            return Poll::Ready(None);
                        }
                        Ok(Chunked::NeedMore) => None,
                    }
                }
            };
            if let Some(frame) = frame {
                if self.decoder == Decoder::Length(0) {
                    // The last byte: free the connection now, not on the next poll.
                    self.finish();
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            let filled = conn.poll_fill(cx);
            let filled = match filled {
                Poll::Ready(r) => {
                    self.idle.progressed();
                    r
                }
                Poll::Pending if self.idle.poll_expired(cx) => {
                    let stalled = io::Error::new(io::ErrorKind::TimedOut, "upstream body stalled");
                    return self.fail(ClientError::Io(stalled), cx);
                }
                Poll::Pending => return Poll::Pending,
            };
            match filled {
                Ok(0) if self.decoder == Decoder::Eof => {
                    self.decoder = Decoder::Done;
                    self.ex.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => return self.fail(ClientError::Closed, cx),
                Ok(_) => {}
                Err(e) => return self.fail(ClientError::Io(e), cx),
            }
        }
    }
}

/// An upstream response body: read off a pooled HTTP/1.1 connection (which goes back to the
/// pool at the body's end), or an HTTP/2 stream.
pub struct PooledBody<B> {
    kind: Kind<B>,
    /// An HTTP/1.x response's header fields, as the upstream wrote them (see [`Fields`]).
    fields: Fields,
}

enum Kind<B> {
    /// Boxed: the response travels up through the proxy and the server by value, and each of
    /// its ~20 moves copied the whole exchange with it (700 bytes; `memcpy` was 14% of a
    /// request's instructions). One allocation, in glibc's per-thread cache, costs less.
    H1(Box<H1Body<B>>),
    /// An HTTP/1.1 response that began before its request was fully sent: a task of its own
    /// keeps writing the request whether or not the client reads the response. Boxed, as the
    /// HTTP/2 variant: the enum stays a pointer wide, and with it every response's moves (a
    /// response with this body at most 256 bytes, below which `memcpy` takes its short path).
    Duplex(Box<Duplex>),
    /// An HTTP/2 stream, with `body_idle_timeout` between its frames and what its
    /// Content-Length says is still to come (None: no length, or no body was to follow).
    H2(Box<(Incoming, IdleTimer, Option<u64>)>),
}

/// The receiving end of a response body driven by its own task (see [`Duplex::spawn`]).
struct Duplex {
    rx: tokio::sync::mpsc::Receiver<Result<Frame<Bytes>, ClientError>>,
    hint: SizeHint,
}

impl Duplex {
    /// Moves the exchange into a task that writes the rest of the request while reading the
    /// response into a small channel. Driving the upload from the response body alone would tie
    /// it to the client's reading: a client that uploads everything before it reads would stall
    /// both ways, and a response ending first would cut the upload short.
    fn spawn<B: UploadBody>(mut body: H1Body<B>) -> Duplex {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let hint = match body.decoder {
            Decoder::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        };
        tokio::spawn(async move {
            let mut tx = tokio_util::sync::PollSender::new(tx);
            // Whether the response has ended (or nobody reads it any more).
            let mut response_done = false;
            std::future::poll_fn(|cx| loop {
                if response_done {
                    // Only the upload is left; the connection closes when it is done.
                    if !body.ex.uploading() || body.ex.poll_upload(cx).is_err() {
                        return Poll::Ready(());
                    }
                    return if body.ex.uploading() {
                        Poll::Pending
                    } else {
                        Poll::Ready(())
                    };
                }
                match tx.poll_reserve(cx) {
                    Poll::Pending => {
                        // The client is not reading: keep uploading meanwhile.
                        if body.ex.poll_upload(cx).is_err() {
                            response_done = true;
                            continue;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(Err(_)) => response_done = true,
                    Poll::Ready(Ok(())) => match body.poll_frame(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Some(item)) => {
                            response_done = item.is_err();
                            let _ = tx.send_item(item);
                            if response_done {
                                tx.close();
                            }
                        }
                        Poll::Ready(None) => {
                            response_done = true;
                            // The slot reserved above holds a sender: while it is kept, the
                            // receiver sees no end until the upload is done (a chunked answer
                            // would lack its last chunk until then).
                            tx.abort_send();
                            tx.close();
                        }
                    },
                }
            })
            .await;
        });
        Duplex { rx, hint }
    }
}

impl<B: UploadBody> PooledBody<B> {
    /// A body whose connection is not pooled here (HTTP/2), ended with an error when no frame
    /// comes for `idle`, or when it ends before the END_STREAM flag or short of (or past)
    /// `length`, the response's Content-Length (None where no body follows: HEAD, 204, 304).
    pub fn unpooled(inner: Incoming, idle: Duration, length: Option<u64>) -> PooledBody<B> {
        PooledBody {
            kind: Kind::H2(Box::new((inner, IdleTimer::new(idle), length))),
            fields: Fields::default(),
        }
    }

    /// The response's fields, for a response that goes on with a map of its own (to an
    /// HTTP/2 client): the body keeps none.
    pub fn take_fields(&mut self) -> Fields {
        std::mem::take(&mut self.fields)
    }

    /// Takes the connection out of the pool's hands: it goes nowhere when the body is dropped
    /// (an unasked `101`).
    pub fn detach(&mut self) {
        if let Kind::H1(b) = &mut self.kind {
            b.ex.conn = None;
            b.decoder = Decoder::Done;
        }
    }

    /// After a `101`: the upstream connection and any bytes already read past the head.
    pub fn take_upgraded(&mut self) -> Option<(TcpStream, Bytes)> {
        match &mut self.kind {
            Kind::H1(b) if b.decoder == Decoder::Upgrade => {
                b.decoder = Decoder::Done;
                b.ex.conn.take().map(|c| (c.io, c.rbuf.freeze()))
            }
            _ => None,
        }
    }
}

/// An h2 upstream's trailers lose the fields a trailer may not carry, as an HTTP/1.1
/// upstream's do in [`codec::take_trailers`]; data frames pass untouched.
fn allowed_trailers(frame: Frame<Bytes>) -> Frame<Bytes> {
    if !frame.is_trailers() {
        return frame;
    }
    match frame.into_trailers() {
        Ok(trailers) => {
            let mut kept = HeaderMap::with_capacity(trailers.len());
            for (name, value) in &trailers {
                if trailer_allowed(name) {
                    kept.append(name.clone(), value.clone());
                }
            }
            Frame::trailers(kept)
        }
        Err(frame) => frame,
    }
}

/// An h2 upstream's response head over [`MAX_RESPONSE_HEAD`] is refused, as an HTTP/1.1
/// upstream's (h2 takes up to [`H2_MAX_HEADER_LIST`]).
fn h2_head_checked(resp: Response<Incoming>) -> Result<Response<Incoming>, ClientError> {
    if field_list_size(resp.headers()) > MAX_RESPONSE_HEAD {
        return Err(ClientError::Protocol("response head over 128 KiB"));
    }
    Ok(resp)
}

/// The size of a field section as HTTP/2 counts it (RFC 9113 6.5.2: each field's name and
/// value and 32).
fn field_list_size(fields: &HeaderMap) -> usize {
    fields
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 32)
        .sum()
}

/// An h2 upstream's body frame, checked: a body is complete only with the stream's END_STREAM
/// (RFC 9113 8.1) and, where it has one, all of its Content-Length. hyper ends the body
/// cleanly when the upstream resets the stream with NO_ERROR, read as "stop reading, the
/// response is complete" (8.1's early response), even mid-body; h2's `is_end_stream` (what
/// hyper's `Incoming::is_end_stream` asks) is true only once END_STREAM came, so such an end
/// is told from a real one here and becomes an error: a cut body, a `reset` failure, passed on
/// to the client as an aborted response.
fn checked_h2_frame(
    frame: Option<Result<Frame<Bytes>, hyper::Error>>,
    inner: &Incoming,
    left: &mut Option<u64>,
) -> Option<Result<Frame<Bytes>, ClientError>> {
    let cut = |why: &str| {
        let e = io::Error::new(io::ErrorKind::UnexpectedEof, format!("upstream body {why}"));
        Some(Err(ClientError::Io(e)))
    };
    match frame {
        Some(Ok(frame)) => {
            match (left.as_mut(), frame.data_ref()) {
                (Some(n), Some(data)) => match n.checked_sub(data.len() as u64) {
                    Some(rest) => *n = rest,
                    None => return cut("longer than its content-length"),
                },
                (Some(n), None) if *n > 0 && frame.is_trailers() => {
                    return cut("shorter than its content-length");
                }
                _ => {}
            }
            if frame
                .trailers_ref()
                .is_some_and(|t| field_list_size(t) > MAX_RESPONSE_HEAD)
            {
                return cut("trailers over 128 KiB");
            }
            Some(Ok(allowed_trailers(frame)))
        }
        Some(Err(e)) => Some(Err(ClientError::Hyper(e))),
        None if left.is_some_and(|n| n > 0) => cut("shorter than its content-length"),
        None if !inner.is_end_stream() => cut("reset before its end (no END_STREAM)"),
        None => None,
    }
}

impl<B: UploadBody> Body for PooledBody<B> {
    type Data = Bytes;
    type Error = ClientError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ClientError>>> {
        match &mut self.kind {
            Kind::H1(b) => b.poll_frame(cx),
            Kind::Duplex(d) => d.rx.poll_recv(cx),
            Kind::H2(h2) => match Pin::new(&mut h2.0).poll_frame(cx) {
                Poll::Ready(f) => {
                    let (inner, idle, left) = &mut **h2;
                    idle.progressed();
                    Poll::Ready(checked_h2_frame(f, inner, left))
                }
                Poll::Pending if h2.1.poll_expired(cx) => {
                    let stalled = io::Error::new(io::ErrorKind::TimedOut, "upstream body stalled");
                    Poll::Ready(Some(Err(ClientError::Io(stalled))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::H1(b) => matches!(
                b.decoder,
                Decoder::Length(0) | Decoder::Done | Decoder::Upgrade
            ),
            Kind::Duplex(_) => false,
            Kind::H2(h2) => h2.0.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::H1(b) => match b.decoder {
                Decoder::Length(n) => SizeHint::with_exact(n),
                Decoder::Done | Decoder::Upgrade => SizeHint::with_exact(0),
                _ => SizeHint::default(),
            },
            Kind::Duplex(d) => d.hint,
            Kind::H2(h2) => h2.0.size_hint(),
        }
    }
}

impl<B> BodyFields for PooledBody<B> {
    fn fields(&self) -> Option<&Fields> {
        (!self.fields.is_empty()).then_some(&self.fields)
    }
}

impl<B> Drop for PooledBody<B> {
    fn drop(&mut self) {
        // A body known to be complete (empty, or its last byte read) frees the connection even
        // if nobody polled it to the end; anything else closes it.
        if let Kind::H1(b) = &mut self.kind {
            if b.decoder == Decoder::Length(0) {
                b.finish();
            }
        }
    }
}

/// Why [`fetch_once`] has no answer, and whether the request may have reached the server
/// (a change it asked for may have been made: `ctl` cannot call that a refusal).
#[derive(Debug)]
pub struct FetchError {
    pub message: String,
    /// False only when it failed before the request was handed to the connection (connect,
    /// TLS, HTTP handshake).
    pub maybe_sent: bool,
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<FetchError> for String {
    fn from(e: FetchError) -> String {
        e.message
    }
}

fn unsent(message: String) -> FetchError {
    FetchError {
        message,
        maybe_sent: false,
    }
}

/// One HTTP/1.1 exchange over a fresh connection to `auth` (TLS with `tls`, for `https`),
/// closed after it, for the proxy's own calls (`ctl`, analysis probes and queries): the status
/// and the body, read up to `limit` bytes.
pub async fn fetch_once<B>(
    auth: &http::uri::Authority,
    tls: Option<Arc<rustls::ClientConfig>>,
    req: Request<B>,
    limit: usize,
) -> Result<(StatusCode, Bytes), FetchError>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    fetch_once_tracked(auth, tls, req, limit, &AtomicBool::new(false)).await
}

/// The port `auth` names, or `default` (the scheme's) when it names none (`host` or `host:`).
/// A port that is not a number from 1 to 65535 (`host:90900`, a typo) is an error, never the
/// default: the request (and its bearer token) would go to another port.
pub fn authority_port(auth: &http::uri::Authority, default: u16) -> Result<u16, String> {
    let s = auth.as_str();
    // After any user@ and any [IPv6] literal: the colon there, if any, starts the port.
    let host_at = s.rfind('@').map_or(0, |i| i + 1);
    let host_at = s[host_at..].rfind(']').map_or(host_at, |i| host_at + i + 1);
    let Some(colon) = s[host_at..].rfind(':') else {
        return Ok(default);
    };
    let port = &s[host_at + colon + 1..];
    if port.is_empty() {
        return Ok(default);
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(format!(
            "invalid port {port:?} in {s:?} (expected a number from 1 to 65535)"
        )),
    }
}

/// [`fetch_once`], setting `handed` once the connection (TCP, TLS, HTTP handshake) is up and
/// the request is handed to it: a caller whose own deadline cut the call short can tell "never
/// reached the server" (false) from "may have been sent" (true).
pub async fn fetch_once_tracked<B>(
    auth: &http::uri::Authority,
    tls: Option<Arc<rustls::ClientConfig>>,
    req: Request<B>,
    limit: usize,
    handed: &AtomicBool,
) -> Result<(StatusCode, Bytes), FetchError>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let host = auth.host().trim_start_matches('[').trim_end_matches(']');
    let port = authority_port(auth, if tls.is_some() { 443 } else { 80 }).map_err(unsent)?;
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| unsent(format!("cannot connect to {auth}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else {
        return exchange_once(hyper_util::rt::TokioIo::new(tcp), req, limit, handed).await;
    };
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| unsent(format!("invalid TLS server name {host:?}: {e}")))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| unsent(format!("TLS handshake with {auth} failed: {e}")))?;
    exchange_once(hyper_util::rt::TokioIo::new(stream), req, limit, handed).await
}

/// One HTTP/1.1 exchange on `io`: the status and the body, read up to `limit` bytes (none
/// with a limit of 0: the status alone, the connection closed on it).
async fn exchange_once<T, B>(
    io: hyper_util::rt::TokioIo<T>,
    req: Request<B>,
    limit: usize,
    handed: &AtomicBool,
) -> Result<(StatusCode, Bytes), FetchError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    use http_body_util::BodyExt;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| unsent(format!("HTTP handshake failed: {e}")))?;
    let conn = tokio::spawn(conn);
    handed.store(true, Ordering::Relaxed);
    let result = async {
        let resp = sender.send_request(req).await.map_err(|e| FetchError {
            message: format!("request failed: {e}"),
            maybe_sent: true,
        })?;
        let status = resp.status();
        if limit == 0 {
            return Ok((status, Bytes::new()));
        }
        let body = http_body_util::Limited::new(resp.into_body(), limit)
            .collect()
            .await
            .map_err(|e| FetchError {
                message: format!("reading the answer failed: {e}"),
                maybe_sent: true,
            })?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    conn.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::headers::trailer_allowed;

    /// A FIN that arrives while the worker is busy is not in tokio's cached readiness until the
    /// reactor looks again: a checkout for a request that cannot be sent again (`sure`) asks
    /// the kernel, and never hands out that closed connection.
    #[tokio::test]
    async fn a_sure_checkout_sees_a_fin_the_reactor_has_not() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let pool = ConnPool::new(addr, 2, Duration::from_secs(5), Duration::from_secs(60));
        let conn = pool.connect().await.expect("connect");
        let (mut upstream, _) = listener.accept().await.expect("accept");
        // A response read whole, the read after it finding nothing: readiness cleared.
        tokio::io::AsyncWriteExt::write_all(&mut upstream, b"x")
            .await
            .expect("write");
        conn.io.readable().await.expect("readable");
        let mut buf = [0u8; 8];
        assert_eq!(conn.io.try_read(&mut buf).expect("read"), 1);
        assert!(conn.io.try_read(&mut buf).is_err());
        pool.put_back(conn);
        // The upstream closes; nothing below yields to the reactor (one thread).
        drop(upstream);
        assert!(
            pool.checkout(true).is_none(),
            "a closed connection was handed out"
        );
    }

    /// A reap takes each idle connection out to check it and puts it back; a `put_back` that
    /// fills its slot meanwhile (the pool at `upstream_max_idle`) must not get it closed: it
    /// joins the overflow, judged at the next reap like any connection beyond the cap.
    #[tokio::test]
    async fn a_put_back_during_a_reap_never_closes_a_reusable_idle_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (keep_tx, mut keep_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                // Held open: every connection stays reusable.
                if keep_tx.send(s).is_err() {
                    return;
                }
            }
        });
        let pool = ConnPool::new(addr, 2, Duration::from_secs(5), Duration::from_secs(60));
        let mut conns = Vec::new();
        for _ in 0..3 {
            conns.push(pool.connect().await.expect("connect"));
        }
        let mut accepted = Vec::new();
        for _ in 0..3 {
            accepted.push(keep_rx.recv().await.expect("accepted"));
        }
        let late = conns.pop().expect("third");
        for c in conns {
            pool.put_back(c);
        }
        assert_eq!((pool.idle.len(), pool.overflow.len()), (2, 0));
        // The third comes back while the reap has the first idle one out.
        let mut late = Some(late);
        pool.reap_with(|| {
            if let Some(c) = late.take() {
                pool.put_back(c);
            }
        });
        assert!(late.is_none());
        assert_eq!(
            (pool.idle.len(), pool.overflow.len()),
            (2, 1),
            "a reusable connection was closed"
        );
        drop(accepted);
    }

    fn chunks(input: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>, bool), ClientError> {
        let mut buf = BytesMut::from(input);
        let mut st = ChunkState::Size;
        let mut data = Vec::new();
        loop {
            match decode_chunked(&mut buf, &mut st, Sender::Upstream)
                .map_err(ClientError::Protocol)?
            {
                Chunked::Data(d) => data.extend_from_slice(&d),
                Chunked::Trailers(t) => return Ok((data, Some(t), true)),
                Chunked::End => return Ok((data, None, true)),
                Chunked::NeedMore => return Ok((data, None, false)),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let (d, t, done) = chunks(b"5;ext=1\r\nhello\r\n1\r\n!\r\n0\r\n\r\n").expect("ok");
        assert_eq!(
            (d.as_slice(), t.is_none(), done),
            (&b"hello!"[..], true, true)
        );
        let (d, t, done) =
            chunks(b"3\r\nabc\r\n0\r\ngrpc-status: 0\r\nx-b: 2\r\n\r\n").expect("ok");
        let t = t.expect("trailers");
        assert_eq!((d.as_slice(), done), (&b"abc"[..], true));
        assert_eq!(t.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]));
        assert_eq!(t.len(), 2);
        let (d, _, done) = chunks(b"a\r\n01234").expect("partial");
        assert_eq!((d.as_slice(), done), (&b"01234"[..], false));
        assert!(chunks(b"zz\r\n").is_err());
        // Only whitespace before `;` may follow the size; leading zeros are fine.
        assert!(chunks(b"5 garbage\r\nhello\r\n0\r\n\r\n").is_err());
        assert!(chunks(b"5\r;x\r\nhello\r\n0\r\n\r\n").is_err());
        let (d, _, done) = chunks(b"5 ;x=1\r\nhello\r\n00000000000000000000\r\n\r\n").expect("ok");
        assert_eq!((d.as_slice(), done), (&b"hello"[..], true));
        // A size line without end is refused once it is longer than any sane one.
        assert!(chunks(&[b'1'; codec::MAX_CHUNK_LINE + 1]).is_err());
        assert!(chunks(b"3\r\nabcX\r\n").is_err());
        assert!(chunks(b"3\nabc\r\n").is_err());
    }

    /// Whitespace between a response field's name and its colon is taken out (RFC 9112 5.1),
    /// in place and when the lines are copied out (a lone LF), an empty value's too.
    #[test]
    fn response_space_before_the_colon_is_taken_out() {
        for head in [
            &b"HTTP/1.1 200 OK\r\nX-A : a\r\nX-Empty \t:\r\nX-B:  b\r\nContent-Length : 2\r\n\r\nok"[..],
            b"HTTP/1.1 200 OK\nX-A : a\nX-Empty \t:\nX-B:  b\nContent-Length : 2\n\nok",
        ] {
            let mut b = BytesMut::from(head);
            let h = parse_head(&mut b, false).expect("ok").expect("complete");
            assert_eq!(&b[..], b"ok");
            assert_eq!(
                String::from_utf8_lossy(h.fields.lines()),
                "x-a: a\r\nx-empty:\r\nx-b:  b\r\n"
            );
            assert_eq!(h.fields.length(), Some(2));
        }
    }

    /// A later HTTP/1 minor version is read as 1.1 (RFC 9110 2.5): kept alive, its body framed
    /// as 1.1's; another major version, or a version that is not `1*DIGIT "." 1*DIGIT`, is not.
    #[test]
    fn a_later_http1_minor_version_is_read_as_1_1() {
        for v in ["HTTP/1.2", "HTTP/1.9"] {
            let mut b =
                BytesMut::from(format!("{v} 200 OK\r\nContent-Length: 2\r\n\r\nok").as_bytes());
            let h = parse_head(&mut b, false).expect("ok").expect("complete");
            assert_eq!(h.status, StatusCode::OK);
            assert!(h.keep_alive, "{v}");
            assert_eq!(h.fields.length(), Some(2));
            assert_eq!(&b[..], b"ok");
        }
        // Partial: more bytes may come.
        let mut b = BytesMut::from(&b"HTTP/1.2"[..]);
        assert!(parse_head(&mut b, false).expect("ok").is_none());
        for bad in ["HTTP/2.0 200 OK", "HTTP/1.10 200 OK", "HTTP/1.x 200 OK"] {
            let mut b = BytesMut::from(format!("{bad}\r\nContent-Length: 0\r\n\r\n").as_bytes());
            assert!(parse_head(&mut b, false).is_err(), "{bad}");
        }
    }

    /// The fields that go on are rewritten in the head's buffer: names lowercased, values as
    /// sent less trailing whitespace, hop-by-hop and framing fields out, and those a
    /// `Connection` line names, before or after it.
    #[test]
    fn response_fields_are_compacted_in_place() {
        let mut b = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nX-Early: 1\r\nServer:nginx \r\nConnection: keep-alive, X-Early, x-late\r\n\
               Content-Length: 2\r\nKeep-Alive: timeout=5\r\nDate: Tue, 01 Dec 2026 21:00:00 GMT\r\n\
               X-Empty:\r\nX-Late: 2\r\nSet-Cookie: a=1\r\nTE: trailers\r\n\
               Set-Cookie:   b=2\t \r\nProxy-Connection: close\r\nUpgrade: h2c\r\n\r\nok"[..],
        );
        let h = parse_head(&mut b, false).expect("ok").expect("complete");
        assert_eq!(&b[..], b"ok");
        assert_eq!(
            String::from_utf8_lossy(h.fields.lines()),
            "server:nginx\r\ndate: Tue, 01 Dec 2026 21:00:00 GMT\r\nx-empty:\r\n\
             set-cookie: a=1\r\nset-cookie:   b=2\r\n"
        );
        assert_eq!(h.fields.length(), Some(2));
        assert!(h.fields.has_date());
        assert!(h.keep_alive);
        let mut map = HeaderMap::new();
        h.fields.clone().into_map(&mut map);
        assert_eq!(map.get_all("set-cookie").iter().count(), 2);
        assert_eq!(map["x-empty"], "");
        assert_eq!(map["content-length"], "2");
        assert!(map.get("x-late").is_none() && map.get("connection").is_none());

        // A 101 comes as a map: the proxy reads its Upgrade; its Connection is written anew.
        let mut b = BytesMut::from(
            &b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"[..],
        );
        let h = parse_head(&mut b, false).expect("ok").expect("complete");
        assert!(h.fields.is_empty());
        assert_eq!(h.headers["upgrade"], "websocket");
        assert_eq!(h.headers["connection"], "upgrade");
    }

    /// A 101 keeps its Upgrade, and `Connection: upgrade` alone: the other hop-by-hop fields,
    /// and those its Connection line names, stop at the proxy (RFC 9110 7.6.1); its framing
    /// fields mean nothing (no body follows a 1xx), so an odd one is no reason for a 502.
    #[test]
    fn a_101_passes_on_upgrade_and_no_other_hop_by_hop_field() {
        let mut b = BytesMut::from(
            &b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade, X-Hop\r\nUpgrade: websocket\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\nTransfer-Encoding: gzip\r\nContent-Length: 7\r\nX-Hop: secret\r\nX-Kept: 1\r\n\r\nws-bytes"[..],
        );
        let h = parse_head(&mut b, false)
            .expect("a 101's framing fields are not read")
            .expect("complete");
        let mut names: Vec<&str> = h.headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["connection", "upgrade", "x-kept"]);
        assert_eq!(h.headers["connection"], "upgrade");
        assert_eq!(h.headers["upgrade"], "websocket");
        // What follows the head is the tunnel's, untouched.
        assert_eq!(&b[..], b"ws-bytes");

        // Other 1xx answers are skipped by the exchange; an odd framing field on one is no
        // error either.
        let mut b = BytesMut::from(
            &b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nTransfer-Encoding: gzip\r\nContent-Length: x\r\n\r\n"[..],
        );
        let h = parse_head(&mut b, false).expect("ok").expect("complete");
        assert_eq!(h.framing, Decoder::Length(0));
        assert_eq!(h.fields.lines(), b"link: </a.css>; rel=preload\r\n");
    }

    /// A field line ended by a lone LF (RFC 9112 2.2: a recipient may accept it) comes out
    /// whole with CRLF, and no line after it is touched (rewritten in place, such a line grew
    /// by a byte: the next name lost its first byte, or the write ran past the head).
    #[test]
    fn response_fields_ended_by_a_lone_lf_come_out_whole() {
        for (head, lines) in [
            (
                &b"HTTP/1.1 200 OK\r\nX-A: 1\nX-B: 2\r\nContent-Length: 0\r\n\r\n"[..],
                "x-a: 1\r\nx-b: 2\r\n",
            ),
            (
                b"HTTP/1.1 200 OK\r\nX-E:\nX-F: 3\r\nContent-Length: 0\r\n\r\n",
                "x-e:\r\nx-f: 3\r\n",
            ),
            (b"HTTP/1.1 200 OK\nA: 1\nB: 2\n\n", "a: 1\r\nb: 2\r\n"),
            (
                b"HTTP/1.1 200 OK\nConnection: x-gone\nX-Kept: 1\nX-Gone: 2\n\n",
                "x-kept: 1\r\n",
            ),
        ] {
            let mut b = BytesMut::from(head);
            let h = parse_head(&mut b, false).expect("ok").expect("complete");
            assert_eq!(String::from_utf8_lossy(h.fields.lines()), lines);
            assert!(b.is_empty());
        }
    }

    /// A Date that a `Connection` line takes out does not count: the server writes its own.
    #[test]
    fn a_date_named_by_connection_is_not_kept() {
        let mut b = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nDate: Tue, 01 Dec 2026 21:00:00 GMT\r\nConnection: date\r\nContent-Length: 0\r\n\r\n"[..],
        );
        let h = parse_head(&mut b, false).expect("ok").expect("complete");
        assert!(!h.fields.has_date());
        assert!(h.fields.lines().is_empty());
    }

    /// The answer to a HEAD, a 204 and a 304 end at their empty line whatever their framing
    /// fields say (RFC 9112 6.3): no 502 for what the GET would have carried. Their length
    /// goes on only when it is one valid value and no Transfer-Encoding makes it doubtful.
    #[test]
    fn bodiless_answers_are_not_refused_for_their_framing_fields() {
        for (head, head_request, length) in [
            (&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"[..], true, None),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n", true, Some(7)),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nTransfer-Encoding: chunked\r\n\r\n", true, None),
            (b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: gzip\r\n\r\n", false, None),
            (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", false, None),
            (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5, 6\r\n\r\n", false, None),
            (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", false, Some(5)),
            (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", false, None),
        ] {
            let mut b = BytesMut::from(head);
            let h = parse_head(&mut b, head_request)
                .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(head)))
                .expect("complete");
            assert_eq!(h.framing, Decoder::Length(0));
            assert_eq!(h.fields.length(), length, "{:?}", String::from_utf8_lossy(head));
            assert!(h.keep_alive);
        }
        // An HTTP/1.0 answer with Transfer-Encoding closes its connection, body or not.
        for (head, head_request) in [
            (&b"HTTP/1.0 304 Not Modified\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"[..], false),
            (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n", true),
        ] {
            let h = parse_head(&mut BytesMut::from(head), head_request)
                .expect("ok")
                .expect("complete");
            assert!(!h.keep_alive, "{:?}", String::from_utf8_lossy(head));
        }
        // The same fields on an answer with a body are still refused.
        for head in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert!(parse_head(&mut BytesMut::from(head), false).is_err());
        }
    }

    #[test]
    fn response_heads_decide_framing() {
        let mut b =
            BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: b\r\n\r\nok\n"[..]);
        let h = parse_head(&mut b, false).expect("ok").expect("complete");
        assert_eq!(h.framing, Decoder::Length(3));
        assert!(h.keep_alive);
        assert_eq!(&b[..], b"ok\n");
        assert_eq!(h.fields.lines(), b"x-a: b\r\n");
        assert_eq!(h.fields.length(), Some(3));
        assert!(h.headers.is_empty());

        let mut b = BytesMut::from(&b"HTTP/1.0 200 OK\r\n\r\nabc"[..]);
        let h = parse_head(&mut b, false).expect("ok").expect("complete");
        assert_eq!((h.framing, h.keep_alive), (Decoder::Eof, false));
        // HTTP/1.0: kept only when asked, `close` wins in any order, never with chunked.
        for (head, kept) in [
            (
                &b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"[..],
                true,
            ),
            (
                b"HTTP/1.0 200 OK\r\nConnection: close, keep-alive\r\nContent-Length: 0\r\n\r\n",
                false,
            ),
            (
                b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n",
                false,
            ),
            (
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n",
                false,
            ),
        ] {
            let h = parse_head(&mut BytesMut::from(head), false)
                .expect("ok")
                .expect("complete");
            assert_eq!(h.keep_alive, kept, "{:?}", String::from_utf8_lossy(head));
        }

        let mut b = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"[..],
        );
        let h = parse_head(&mut b, false).expect("ok").expect("complete");
        assert_eq!(
            (h.framing, h.keep_alive),
            (Decoder::Chunked(ChunkState::Size), false)
        );

        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let mut b = BytesMut::from(bad);
            assert!(
                parse_head(&mut b, false).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Hop-by-hop headers, and those a Connection line names, stop at the proxy; a 101
        // keeps its Upgrade, and Connection: upgrade, for the client.
        let mut b = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\nX-Secret: 1\r\nX-Kept: 2\r\nContent-Length: 0\r\n\r\n"[..],
        );
        let h = parse_head(&mut b, false).expect("ok").expect("complete");
        let mut map = HeaderMap::new();
        h.fields.into_map(&mut map);
        let mut names: Vec<&str> = map.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "x-kept"]);
        let mut b = BytesMut::from(
            &b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"[..],
        );
        let h = parse_head(&mut b, false).expect("ok").expect("complete");
        assert!(h.headers.contains_key("upgrade") && h.headers.contains_key("connection"));

        // More headers than the inline offset table holds; more than the parser accepts.
        let many = |n: usize| {
            let mut v = b"HTTP/1.1 200 OK\r\n".to_vec();
            for i in 0..n {
                v.extend_from_slice(format!("x-h{i}: {i}\r\n").as_bytes());
            }
            v.extend_from_slice(b"content-length: 0\r\n\r\n");
            BytesMut::from(&v[..])
        };
        let h = parse_head(&mut many(60), false)
            .expect("ok")
            .expect("complete");
        let mut map = HeaderMap::new();
        h.fields.into_map(&mut map);
        assert_eq!(map.len(), 61);
        assert_eq!(map.get("x-h59").map(|v| v.as_bytes()), Some(&b"59"[..]));
        assert!(parse_head(&mut many(MAX_RESPONSE_HEADERS), false).is_err());

        let mut b = BytesMut::from(&b"HTTP/1.1 200 OK\r\nContent-Le"[..]);
        assert!(parse_head(&mut b, false).expect("partial").is_none());
    }

    /// Decodes a whole chunked body fed in pieces of the given sizes; `None` on a framing error.
    fn chunked_in_pieces(input: &[u8], sizes: &[usize]) -> Option<(Vec<u8>, usize, bool)> {
        let mut buf = BytesMut::new();
        let mut st = ChunkState::Size;
        let (mut data, mut trailers, mut fed) = (Vec::new(), 0, 0);
        let mut sizes = sizes.iter().cycle();
        loop {
            match decode_chunked(&mut buf, &mut st, Sender::Upstream).ok()? {
                Chunked::Data(d) => data.extend_from_slice(&d),
                Chunked::Trailers(t) => {
                    trailers += t.len();
                    return Some((data, trailers, true));
                }
                Chunked::End => return Some((data, trailers, true)),
                Chunked::NeedMore if fed == input.len() => return Some((data, trailers, false)),
                Chunked::NeedMore => {
                    let n = (*sizes.next().unwrap_or(&1)).clamp(1, input.len() - fed);
                    buf.extend_from_slice(&input[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn request_trailers_carry_no_framing_or_forwarding_headers() {
        for name in [
            "content-length",
            "host",
            "transfer-encoding",
            "x-forwarded-for",
            "te",
            "forwarded",
            "via",
            "x-request-id",
            "x-real-ip",
            "x-forwarded-host",
            "x-forwarded-proto",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "max-forwards",
            "authorization",
            "cookie",
            "content-type",
        ] {
            assert!(!trailer_allowed(&HeaderName::from_static(name)), "{name}");
        }
        for name in ["grpc-status", "grpc-message", "server-timing", "x-checksum"] {
            assert!(trailer_allowed(&HeaderName::from_static(name)), "{name}");
        }
    }

    /// Upstream bytes are untrusted: mutated responses never panic the parser, and a chunked
    /// body decodes to the same bytes (or the same error) however the reads split it.
    #[test]
    fn mutated_upstream_responses_never_panic_and_decode_the_same_in_any_split() {
        let corpus: [&[u8]; 4] = [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nx-t: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, x-a\r\nx-a: 1\r\n\r\nhello",
            b"HTTP/1.0 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
        ];
        let alphabet = b"\r\n:; 0123456789abcdefABCDEF\t,\x00\x7f\xff";
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        for i in 0..100_000 {
            let mut input = corpus[i % corpus.len()].to_vec();
            for _ in 0..rng.usize(1..4) {
                let at = rng.usize(..input.len());
                match rng.u8(..4) {
                    0 => input[at] = alphabet[rng.usize(..alphabet.len())],
                    1 => input.insert(at, alphabet[rng.usize(..alphabet.len())]),
                    2 => {
                        input.remove(at);
                    }
                    _ => input.truncate(at.max(1)),
                }
                if input.is_empty() {
                    input.push(b'H');
                }
            }
            let mut buf = BytesMut::from(&input[..]);
            let Ok(Some(head)) = parse_head(&mut buf, false) else {
                continue;
            };
            if head.framing == Decoder::Chunked(ChunkState::Size) {
                let rest = buf.to_vec();
                let whole = chunked_in_pieces(&rest, &[rest.len().max(1)]);
                let sizes: Vec<usize> = (0..4).map(|_| rng.usize(1..8)).collect();
                assert_eq!(
                    whole,
                    chunked_in_pieces(&rest, &sizes),
                    "input {:?} split {sizes:?}",
                    String::from_utf8_lossy(&input)
                );
            }
        }
    }

    /// A port past 65535 (or 0, or not a number) in a URL is an error, never the scheme's
    /// default: `fetch_once` to `127.0.0.1:90900` used to go to port 80 with the request and
    /// its bearer token. No port, or an empty one, is the default.
    #[tokio::test]
    async fn a_port_that_does_not_fit_is_an_error_not_the_default() {
        let port = |a: &str| authority_port(&a.parse().expect("authority"), 80);
        assert_eq!(port("127.0.0.1"), Ok(80));
        assert_eq!(port("127.0.0.1:"), Ok(80));
        assert_eq!(port("example.com:8443"), Ok(8443));
        assert_eq!(port("[::1]"), Ok(80));
        assert_eq!(port("[::1]:9090"), Ok(9090));
        assert_eq!(port("u:p@example.com"), Ok(80));
        for bad in ["127.0.0.1:90900", "127.0.0.1:65536", "[::1]:70000", "h:0"] {
            let e = port(bad).expect_err(bad);
            assert!(e.contains("invalid port"), "{bad}: {e}");
        }
        let req = Request::get("/")
            .body(http_body_util::Empty::<Bytes>::new())
            .expect("request");
        let auth: http::uri::Authority = "127.0.0.1:90900".parse().expect("authority");
        let e = fetch_once(&auth, None, req, 0).await.expect_err("refused");
        assert!(
            e.message.contains("invalid port \"90900\""),
            "{}",
            e.message
        );
        assert!(!e.maybe_sent);
    }
}
