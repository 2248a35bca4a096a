//! The client side of HTTP/2: the `h2` crate driven directly, each stream handed to an executor
//! as one small future.
//!
//! Why not hyper's h2 server (kept for the admin listener): per stream it builds a request
//! around its own body type, wraps the service's future in a state machine that moves the
//! response through it, removes connection-specific fields from every response (which `h2`
//! checks again), looks `Date` and `Content-Length` up again, and records every frame for a
//! keep-alive timer (`BENCHMARKS.md`, "h2, second pass": 4.6k instructions per request of hyper
//! around `h2`'s own work). Here a stream is [`Stream`]: the handler's future, then the response
//! body piped into `h2` as hyper's pipe does (the next frame asked for only once `h2` has room
//! for the stream, a small body at once), and the keep-alive PING is sent from a timer the caller
//! already runs ([`Connection::keep_alive`]).
//!
//! What stays hyper's behaviour: the same SETTINGS (16 KiB frames, a 400 KiB send buffer per
//! stream; not the receive windows: see [`CONN_WINDOW`]), a `Date` on responses that come without
//! one, `Content-Length` from a body of known length, RST_STREAM (INTERNAL_ERROR) when a response
//! body fails, a stream's work dropped when the client resets it. CONNECT (RFC 9113 8.5) is the
//! handler's to refuse; the extended CONNECT protocol is not offered. A response must not carry
//! connection-specific fields (`Connection`, `Keep-Alive`, `Transfer-Encoding`, `Upgrade`,
//! `Proxy-Connection`, a `TE` other than `trailers`): `h2` refuses it and the stream is reset
//! (INTERNAL_ERROR); every response the proxy makes or relays has them removed already. A response
//! to HEAD, a 204 and a 304 go out without a body, whatever the handler gave them.

use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::server::{Connection as H2Connection, Handshake, SendResponse};
use h2::{Ping, PingPong, Reason, RecvStream, SendStream};
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// What every h2 connection of a listener allows and promises.
#[derive(Clone, Debug)]
pub struct Settings {
    /// SETTINGS_MAX_CONCURRENT_STREAMS.
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE: a larger request head is refused (431 by `h2`).
    pub max_header_list_size: u32,
    /// How often a PING goes out to find a client that vanished (None: never).
    pub keep_alive_interval: Option<Duration>,
    /// How long a PING may wait for its answer before the connection is dropped.
    pub keep_alive_timeout: Duration,
    /// How long the preface, a frame header, or a header block (HEADERS and its CONTINUATION
    /// frames) may take from its first byte to its last (`header_read_timeout`: a client
    /// trickling a request head, as a slowloris does over HTTP/1); past it the connection is
    /// closed. A DATA frame's payload is the body's, not bounded here. None: never.
    pub head_timeout: Option<Duration>,
    /// Called for each stream the client resets (or whose connection it drops) before the
    /// response head went out: the work for it is dropped (nginx's 499).
    pub on_cancel: Option<OnCancel>,
}

/// What [`Settings::on_cancel`] calls.
#[derive(Clone)]
pub struct OnCancel(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for OnCancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnCancel")
    }
}

impl Settings {
    fn builder(&self) -> h2::server::Builder {
        let mut b = h2::server::Builder::new();
        b.initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_frame_size(16 * 1024)
            .max_send_buffer_size(400 * 1024)
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_header_list_size(self.max_header_list_size)
            // A client that resets streams as fast as it opens them (CVE-2023-44487) or makes
            // the server reset them gets a GOAWAY.
            .max_pending_accept_reset_streams(50)
            .max_local_error_reset_streams(Some(256));
        b
    }
}

/// A stream's receive window: how much of an upload the client may send ahead of the
/// upstream's reading, so the most buffered here for a stream whose upstream stopped reading,
/// and `max_concurrent_streams` times this for a connection (64 MiB at the default 256).
/// Window updates go out as the upload is passed on.
const STREAM_WINDOW: u32 = 256 * 1024;

/// The connection's receive window, shared by its streams: the largest there is (as nginx and
/// HAProxy open theirs), so that uploads stalled on their upstreams, each holding at most
/// [`STREAM_WINDOW`], never shut it for the connection's other uploads. Memory stays bounded
/// by the stream windows.
const CONN_WINDOW: u32 = (1 << 31) - 1;

/// One client connection: accepts its streams and hands each to `exec` as a [`Stream`] of the
/// future `service` made for it. Completes when the connection is closed.
pub struct Connection<T, S, E> {
    state: State<PeerSettings<T>>,
    /// The client's SETTINGS_MAX_HEADER_LIST_SIZE (`u32::MAX`: none), from [`PeerSettings`].
    peer_max_header_list: Arc<AtomicU32>,
    service: S,
    exec: E,
    /// A graceful shutdown asked for before the handshake ended.
    close_pending: bool,
    keep_alive: Option<KeepAlive>,
    /// [`Settings::head_timeout`], and [`PeerSettings::head`]'s view of a head in progress.
    head_timeout: Option<(Duration, HeadClock)>,
    /// A head outlasted `head_timeout`: GOAWAY sent, the connection closing.
    head_expired: bool,
    /// What the connection's streams share: the cancel hook and the count of streams the
    /// client reset before their answer.
    cancels: Arc<Cancels>,
    /// Streams accepted on this connection.
    accepted: u32,
}

/// Shared by a connection and its streams.
struct Cancels {
    on_cancel: Option<OnCancel>,
    /// Streams the client reset after they were accepted and before their answer's head.
    early: AtomicU32,
}

/// Past this many streams reset before their answer, and when they are at least half of those
/// accepted, a connection is refused more (GOAWAY ENHANCE_YOUR_CALM): the rapid reset
/// (CVE-2023-44487) of streams already handed on, which `h2`'s own limit (streams reset before
/// they are accepted) does not see, sends each request upstream, unbounded in rate and in
/// number in flight. A client cancelling now and then (a browser, gRPC deadlines) is far from
/// it; Envoy's premature-reset check is of the same kind.
const EARLY_RESETS: u32 = 100;

/// When the head in progress on a connection began (see [`Settings::head_timeout`]): the
/// milliseconds from `base` to its first byte, plus one; 0 while none is in progress.
#[derive(Clone)]
struct HeadClock {
    base: Instant,
    since: Arc<AtomicU64>,
}

enum State<T> {
    Handshaking(Handshake<T, Bytes>),
    Serving(H2Connection<T, Bytes>),
}

/// The PING that finds a client that stopped answering while its connection looks open.
struct KeepAlive {
    interval: Duration,
    timeout: Duration,
    ping: Option<PingPong>,
    /// The count of bytes read from the client at the last call.
    heard: u64,
    /// When a PING goes out if nothing is heard, when the one sent must have been answered, or
    /// when a connection given up must have closed.
    due: Instant,
    state: KeepAliveState,
}

/// Where the keep-alive stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeepAliveState {
    /// Something was heard within the interval.
    Heard,
    /// A PING is out; nothing heard since.
    Waiting,
    /// Given up: GOAWAY sent, the connection closing.
    Closing,
}

impl<T, S, E, F, B> Connection<T, S, E>
where
    T: AsyncRead + AsyncWrite + Unpin,
    S: FnMut(Request<RequestBody>) -> F + Unpin,
    F: Future<Output = Response<B>> + Send + Unpin + 'static,
    B: Body<Data = Bytes> + Replaced + Send + Unpin + 'static,
    B::Error: Display,
    E: hyper::rt::Executor<Stream<F, B>> + Unpin,
{
    /// `io` positioned at the client's connection preface.
    pub fn new(io: T, settings: &Settings, service: S, exec: E) -> Self {
        let peer_max_header_list = Arc::new(AtomicU32::new(u32::MAX));
        let clock = settings.head_timeout.map(|t| {
            let clock = HeadClock {
                base: Instant::now(),
                since: Arc::new(AtomicU64::new(0)),
            };
            (t, clock)
        });
        let io = PeerSettings {
            io,
            first: Some(Vec::new()),
            max_header_list: peer_max_header_list.clone(),
            head: clock.as_ref().map(|(_, c)| FrameWalk::new(c.clone())),
        };
        Connection {
            state: State::Handshaking(settings.builder().handshake(io)),
            peer_max_header_list,
            service,
            exec,
            close_pending: false,
            head_timeout: clock,
            head_expired: false,
            cancels: Arc::new(Cancels {
                on_cancel: settings.on_cancel.clone(),
                early: AtomicU32::new(0),
            }),
            accepted: 0,
            keep_alive: settings.keep_alive_interval.map(|interval| KeepAlive {
                interval,
                timeout: settings.keep_alive_timeout,
                ping: None,
                heard: 0,
                due: Instant::now() + interval,
                state: KeepAliveState::Heard,
            }),
        }
    }

    /// GOAWAY: no new stream is accepted, the open ones finish, then the connection closes.
    pub fn graceful_shutdown(self: Pin<&mut Self>) {
        let this = self.get_mut();
        match &mut this.state {
            State::Handshaking(_) => this.close_pending = true,
            State::Serving(conn) => conn.graceful_shutdown(),
        }
    }

    /// GOAWAY now, whatever streams are open: the connection then flushes it and ends cleanly
    /// (TLS close_notify and FIN through the transport's shutdown) as it is polled. Before the
    /// handshake has ended, as [`graceful_shutdown`](Self::graceful_shutdown).
    pub fn close(self: Pin<&mut Self>) {
        let this = self.get_mut();
        match &mut this.state {
            State::Handshaking(_) => this.close_pending = true,
            State::Serving(conn) => conn.abrupt_shutdown(Reason::NO_ERROR),
        }
    }

    /// Sends a PING once the client has shown no sign of life for `keep_alive_interval`
    /// (`heard`: a count the caller keeps of bytes read from it and DATA its socket took; any
    /// change, the PING's answer included, shows it alive, so a download still moving is not
    /// given up while its PING's answer waits behind the data); once a PING has then gone
    /// `keep_alive_timeout` with nothing heard, sends GOAWAY and lets the connection close;
    /// false if it has not closed one timeout later (drop it). Called from the caller's own
    /// periodic timer, so that no frame or request pays for a timer of its own.
    ///
    /// Also where [`Settings::head_timeout`] is enforced: a GOAWAY once a head in progress is
    /// older than it, false (drop the connection) at the next call, or at once before the
    /// handshake has ended.
    pub fn keep_alive(self: Pin<&mut Self>, now: Instant, heard: u64) -> bool {
        let this = self.get_mut();
        if let Some((limit, clock)) = &this.head_timeout {
            let since = clock.since.load(Ordering::Relaxed);
            if since != 0 {
                let began = clock.base + Duration::from_millis(since - 1);
                if now.saturating_duration_since(began) > *limit {
                    // A GOAWAY first (RFC 9113 5.4.1), then dropped at the next tick if the
                    // connection has not closed by then (the client may not read either).
                    if let (State::Serving(conn), false) = (&mut this.state, this.head_expired) {
                        tracing::debug!(
                            "an h2 request head took longer than header_read_timeout; sending GOAWAY"
                        );
                        conn.abrupt_shutdown(Reason::NO_ERROR);
                        this.head_expired = true;
                        return true;
                    }
                    tracing::debug!("an h2 request head took longer than header_read_timeout");
                    return false;
                }
            }
        }
        let (Some(k), State::Serving(conn)) = (&mut this.keep_alive, &mut this.state) else {
            return true;
        };
        let Some(ping) = &mut k.ping else {
            return true;
        };
        if heard != k.heard && k.state != KeepAliveState::Closing {
            k.heard = heard;
            k.state = KeepAliveState::Heard;
            k.due = now + k.interval;
            return true;
        }
        if now < k.due {
            return true;
        }
        match k.state {
            KeepAliveState::Heard => {
                // An answered PING is cleared first; one still out serves as well.
                let mut cx = Context::from_waker(std::task::Waker::noop());
                let _ = ping.poll_pong(&mut cx);
                let _ = ping.send_ping(Ping::opaque());
                k.state = KeepAliveState::Waiting;
                k.due = now + k.timeout;
                true
            }
            KeepAliveState::Waiting => {
                tracing::debug!("the client did not answer a PING; sending GOAWAY");
                conn.abrupt_shutdown(Reason::NO_ERROR);
                k.state = KeepAliveState::Closing;
                k.due = now + k.timeout;
                true
            }
            KeepAliveState::Closing => false,
        }
    }
}

impl<T, S, E, F, B> Future for Connection<T, S, E>
where
    T: AsyncRead + AsyncWrite + Unpin,
    S: FnMut(Request<RequestBody>) -> F + Unpin,
    F: Future<Output = Response<B>> + Send + Unpin + 'static,
    B: Body<Data = Bytes> + Replaced + Send + Unpin + 'static,
    B::Error: Display,
    E: hyper::rt::Executor<Stream<F, B>> + Unpin,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            let conn = match &mut this.state {
                State::Handshaking(hs) => match ready!(Pin::new(hs).poll(cx)) {
                    Ok(mut conn) => {
                        if this.close_pending {
                            conn.graceful_shutdown();
                        }
                        if let Some(k) = &mut this.keep_alive {
                            k.ping = conn.ping_pong();
                        }
                        this.state = State::Serving(conn);
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "h2 handshake failed");
                        return Poll::Ready(());
                    }
                },
                State::Serving(conn) => conn,
            };
            return match ready!(conn.poll_accept(cx)) {
                Some(Ok((req, reply))) => {
                    this.accepted = this.accepted.saturating_add(1);
                    let early = this.cancels.early.load(Ordering::Relaxed);
                    if early >= EARLY_RESETS && early.saturating_mul(2) >= this.accepted {
                        tracing::debug!(
                            reset = early,
                            accepted = this.accepted,
                            "an h2 client resets most of its streams before their answer; sending GOAWAY"
                        );
                        // This stream and any after it are not served; once the GOAWAY is out
                        // the connection ends.
                        conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                        drop((req, reply));
                        continue;
                    }
                    let mut req = req.map(RequestBody::new);
                    declare_length(&mut req);
                    let head = req.method() == http::Method::HEAD;
                    let handled = (this.service)(req);
                    // Known by now: the client's SETTINGS come before its first stream.
                    let max_header_list = this.peer_max_header_list.load(Ordering::Relaxed);
                    this.exec.execute(Stream {
                        reply,
                        head,
                        max_header_list,
                        cancels: this.cancels.clone(),
                        state: StreamState::Waiting(handled),
                    });
                    continue;
                }
                // h2 has sent its GOAWAY (a protocol error) or the transport failed.
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "h2 connection ended");
                    Poll::Ready(())
                }
                None => Poll::Ready(()),
            };
        }
    }
}

/// One stream: the handler's future, then its response body piped into `h2`.
pub struct Stream<F, B> {
    reply: SendResponse<Bytes>,
    /// The request is HEAD: whatever body the handler's response has (one the proxy made
    /// itself: a 404, a 503) is dropped, never sent (RFC 9110 9.3.2).
    head: bool,
    /// The client's SETTINGS_MAX_HEADER_LIST_SIZE (`u32::MAX`: none).
    max_header_list: u32,
    cancels: Arc<Cancels>,
    state: StreamState<F, B>,
}

enum StreamState<F, B> {
    Waiting(F),
    /// The body, its stream, whether the body is small enough to be handed to `h2` whole
    /// ([`SMALL_BODY`]), and what of the Content-Length its head announced is still to come.
    Sending(B, SendStream<Bytes>, bool, Option<u64>),
}

/// A body of at most this many bytes, for which the client's windows have room when its head
/// goes out, is handed to `h2` without asking for send capacity frame by frame: a small
/// response skips three locks of `h2`'s stream store per frame. (Without the room, it takes the
/// paced path, where a stream the client never opens a window for is reset at
/// `client_send_timeout`.)
const SMALL_BODY: u64 = 16 * 1024;

impl<F, B> Future for Stream<F, B>
where
    F: Future<Output = Response<B>> + Unpin,
    B: Body<Data = Bytes> + Replaced + Unpin,
    B::Error: Display,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        let (body, tx, small, left) = match &mut this.state {
            StreamState::Waiting(handled) => {
                // 1xx the upstream sent go out ahead of the response (RFC 9110 15.2).
                let open = super::interim::Open::new();
                let polled = Pin::new(handled).poll(cx);
                let reply = &mut this.reply;
                open.close_fields(|status, lines| {
                    // Never on a stream the client has reset (RFC 9113 5.1).
                    if reply.poll_reset(cx).is_pending() {
                        send_interim(reply, status, &lines);
                    }
                });
                let Poll::Ready(resp) = polled else {
                    // A client that resets the stream drops the work done for it.
                    if this.reply.poll_reset(cx).is_ready() {
                        tracing::debug!("the client reset its stream before the response");
                        this.cancels.early.fetch_add(1, Ordering::Relaxed);
                        if let Some(OnCancel(f)) = &this.cancels.on_cancel {
                            f();
                        }
                        return Poll::Ready(());
                    }
                    return Poll::Pending;
                };
                let (parts, mut body) = resp.into_parts();
                let mut head = Response::from_parts(parts, ());
                if let header::Entry::Vacant(v) = head.headers_mut().entry(header::DATE) {
                    if let Some(date) = super::headers::date_value() {
                        v.insert(date);
                    }
                }
                // No body follows a 204 or a 304 (RFC 9110 6.4.1), whatever an upstream sent
                // after one, as on HTTP/1.1: a 204 has no Content-Length (8.6), a 304 keeps
                // the upstream's own (the length a 200 would have had) and gets none from the
                // body.
                let status = head.status();
                let no_content = status == StatusCode::NO_CONTENT;
                let not_modified = status == StatusCode::NOT_MODIFIED;
                if no_content {
                    head.headers_mut().remove(header::CONTENT_LENGTH);
                }
                // To HEAD, the length a GET would have had, and no body.
                if !body.is_end_stream() && !no_content && (this.head || !not_modified) {
                    if let Some(n) = body.size_hint().exact() {
                        head.headers_mut()
                            .entry(header::CONTENT_LENGTH)
                            .or_insert_with(|| HeaderValue::from(n));
                    }
                }
                let mut end = this.head || no_content || not_modified || body.is_end_stream();
                // The body is held to the length announced (`h2` does not check what it sends):
                // its exact size, which the Content-Length relayed with it says (a map lookup
                // and a parse per response cost more than this).
                let length = body.size_hint().exact();
                if over_limit(&head, this.max_header_list) {
                    // A head the client said it would not take (RFC 9113 6.5.2; a client such
                    // as python-h2 drops the whole connection over one): a 502 in its place.
                    tracing::debug!(
                        limit = this.max_header_list,
                        "response head over the client's SETTINGS_MAX_HEADER_LIST_SIZE: 502"
                    );
                    head = too_large_head();
                    end = true;
                    // Told before it is dropped: what the handler records says 502.
                    body.replaced(StatusCode::BAD_GATEWAY);
                }
                match this.reply.send_response(head, end) {
                    Ok(_) if end => return Poll::Ready(()),
                    Ok(mut tx) => {
                        // Small, and the client's windows have room for all of it now: the
                        // stream's watchdog clock (the body's last ask) has nothing to follow.
                        let small = match body.size_hint().upper() {
                            Some(n) if n <= SMALL_BODY => {
                                let n = n as usize;
                                tx.reserve_capacity(n);
                                tx.capacity() >= n
                            }
                            _ => false,
                        };
                        this.state = StreamState::Sending(body, tx, small, length);
                        match &mut this.state {
                            StreamState::Sending(body, tx, small, left) => (body, tx, *small, left),
                            StreamState::Waiting(_) => return Poll::Ready(()),
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "h2 response refused");
                        this.reply.send_reset(Reason::INTERNAL_ERROR);
                        return Poll::Ready(());
                    }
                }
            }
            StreamState::Sending(body, tx, small, left) => (body, tx, *small, left),
        };
        pipe(body, tx, small, left, cx)
    }
}

/// A response body told that its head did not go out: the server sent `status` in its place,
/// with no body (a head over the client's SETTINGS_MAX_HEADER_LIST_SIZE), and drops the body
/// next, unread. What the handler records when the body ends (an access log line, a status
/// counter) can then say what the client got. As [`super::server::Handler::replaced`] is for
/// HTTP/1.
pub trait Replaced {
    fn replaced(&mut self, status: StatusCode) {
        let _ = status;
    }
}

impl Replaced for http_body_util::Full<Bytes> {}

impl<L: Replaced, R: Replaced> Replaced for http_body_util::Either<L, R> {
    fn replaced(&mut self, status: StatusCode) {
        match self {
            http_body_util::Either::Left(b) => b.replaced(status),
            http_body_util::Either::Right(b) => b.replaced(status),
        }
    }
}

/// The smallest SETTINGS_MAX_HEADER_LIST_SIZE followed: under it not even the 502 that
/// replaces a head over the limit would fit, so every answer would be one.
const MIN_HEADER_LIST: usize = 1024;

/// Whether `head` is over the client's SETTINGS_MAX_HEADER_LIST_SIZE (`u32::MAX`: none
/// announced), a limit under [`MIN_HEADER_LIST`] taken as that.
fn over_limit(head: &Response<()>, limit: u32) -> bool {
    limit != u32::MAX && header_list_size(head) > (limit as usize).max(MIN_HEADER_LIST)
}

/// A head's size as SETTINGS_MAX_HEADER_LIST_SIZE counts it (RFC 9113 6.5.2): each field's
/// name and value and 32 bytes, `:status` included.
fn header_list_size(head: &Response<()>) -> usize {
    let fields: usize = head
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum();
    fields + ":status".len() + 3 + 32
}

/// The 502 sent for a response whose head the client would not take: no body.
fn too_large_head() -> Response<()> {
    let mut head = Response::new(());
    *head.status_mut() = StatusCode::BAD_GATEWAY;
    let headers = head.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    if let Some(date) = super::headers::date_value() {
        headers.insert(header::DATE, date);
    }
    head
}

/// The connection's socket, reading the client's first SETTINGS frame off the bytes as they
/// pass for its SETTINGS_MAX_HEADER_LIST_SIZE, which `h2` neither honours nor tells (RFC 9113
/// 3.4: that frame follows the preface). Later SETTINGS are not followed: the setting is
/// advisory (6.5.2) and clients send it first; once the first frame is read nothing more is
/// looked at.
struct PeerSettings<T> {
    io: T,
    /// The preface and the first frame as they come in; None once read.
    first: Option<Vec<u8>>,
    max_header_list: Arc<AtomicU32>,
    /// Where the bytes read stand in the frame sequence (None: not followed).
    head: Option<FrameWalk>,
}

/// Follows the frame boundaries of the bytes a client sends, for [`Settings::head_timeout`]:
/// a head is in progress from the first byte of the preface, of a frame header, or of a
/// header block until its end; a DATA frame's payload, and the time between frames, are not.
struct FrameWalk {
    clock: HeadClock,
    /// Bytes of the preface still to come.
    preface_left: usize,
    /// The current frame's header as far as it came.
    header: [u8; 9],
    header_len: usize,
    /// Payload bytes of the current frame still to come, and whether they are a DATA frame's.
    payload_left: usize,
    data: bool,
    /// A HEADERS or PUSH_PROMISE frame without END_HEADERS came: CONTINUATION frames follow.
    open_block: bool,
}

impl FrameWalk {
    fn new(clock: HeadClock) -> Self {
        FrameWalk {
            clock,
            preface_left: PREFACE_LEN,
            header: [0; 9],
            header_len: 0,
            payload_left: 0,
            data: false,
            open_block: false,
        }
    }

    fn walk(&mut self, mut read: &[u8]) {
        if read.is_empty() {
            return;
        }
        let skip = self.preface_left.min(read.len());
        self.preface_left -= skip;
        read = &read[skip..];
        while !read.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(read.len());
                self.payload_left -= n;
                read = &read[n..];
                continue;
            }
            let n = (9 - self.header_len).min(read.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&read[..n]);
            self.header_len += n;
            read = &read[n..];
            if self.header_len == 9 {
                let h = self.header;
                self.header_len = 0;
                self.payload_left = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                // DATA 0x0; HEADERS 0x1 and PUSH_PROMISE 0x5 open a block, CONTINUATION 0x9
                // goes on with it; END_HEADERS (0x4) ends it.
                self.data = h[3] == 0x0;
                if matches!(h[3], 0x1 | 0x5 | 0x9) {
                    self.open_block = h[4] & 0x4 == 0;
                }
            }
        }
        let pending = self.preface_left > 0
            || self.header_len > 0
            || self.open_block
            || (self.payload_left > 0 && !self.data);
        let since = &self.clock.since;
        if !pending {
            if since.load(Ordering::Relaxed) != 0 {
                since.store(0, Ordering::Relaxed);
            }
        } else if since.load(Ordering::Relaxed) == 0 {
            let ms = Instant::now()
                .saturating_duration_since(self.clock.base)
                .as_millis();
            since.store(
                u64::try_from(ms).unwrap_or(u64::MAX - 1) + 1,
                Ordering::Relaxed,
            );
        }
    }
}

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const PREFACE_LEN: usize = 24;

/// The largest first frame followed: a SETTINGS frame of 42 settings (RFC 9113 defines 6).
const FIRST_FRAME_MAX: usize = 9 + 6 * 42;

impl<T> PeerSettings<T> {
    fn follow(&mut self, read: &[u8]) {
        let Some(seen) = &mut self.first else {
            return;
        };
        let room = PREFACE_LEN + FIRST_FRAME_MAX - seen.len();
        seen.extend_from_slice(&read[..read.len().min(room)]);
        let Some(h) = seen.get(PREFACE_LEN..PREFACE_LEN + 9) else {
            return;
        };
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        // SETTINGS (type 4), not an ACK, on stream 0; anything else is `h2`'s to refuse.
        if h[3] != 0x4 || h[4] & 0x1 != 0 || stream != 0 || 9 + len > FIRST_FRAME_MAX {
            self.first = None;
            return;
        }
        let Some(payload) = seen.get(PREFACE_LEN + 9..PREFACE_LEN + 9 + len) else {
            return;
        };
        for setting in payload.chunks_exact(6) {
            // SETTINGS_MAX_HEADER_LIST_SIZE.
            if setting[..2] == [0, 6] {
                let v = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
                self.max_header_list.store(v, Ordering::Relaxed);
            }
        }
        self.first = None;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for PeerSettings<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if self.first.is_some() {
            self.follow(&buf.filled()[before..]);
        }
        let this = &mut *self;
        if let Some(walk) = &mut this.head {
            walk.walk(&buf.filled()[before..]);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for PeerSettings<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// An interim response whose fields are `name:value\r\n` lines (names lowercase). One `h2`
/// refuses (a connection-specific field) is skipped.
fn send_interim(reply: &mut SendResponse<Bytes>, status: StatusCode, lines: &[u8]) {
    let mut head = Response::new(());
    *head.status_mut() = status;
    for line in lines.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            head.headers_mut().append(name, value);
        }
    }
    if let Err(e) = reply.send_informational(head) {
        tracing::debug!(error = %e, status = status.as_u16(), "interim response not sent");
    }
}

/// A response body into `h2`, as hyper's pipe: the next frame is asked for only once `h2` has
/// room for more of the stream (so a client that stops reading holds at most one frame here),
/// unless the whole body is `small`; a stream the client reset stops at once.
fn pipe<B>(
    body: &mut B,
    tx: &mut SendStream<Bytes>,
    small: bool,
    left: &mut Option<u64>,
    cx: &mut Context<'_>,
) -> Poll<()>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Display,
{
    loop {
        if small {
            let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(cx) else {
                // Waiting on the upstream: a reset from the client still ends the stream.
                if tx.poll_reset(cx).is_ready() {
                    return Poll::Ready(());
                }
                return Poll::Pending;
            };
            match send_frame(body, tx, left, frame) {
                Some(()) => continue,
                None => return Poll::Ready(()),
            }
        }
        tx.reserve_capacity(1);
        if tx.capacity() == 0 {
            loop {
                match ready!(tx.poll_capacity(cx)) {
                    Some(Ok(0)) => {}
                    Some(Ok(_)) => break,
                    // Reset by the client, or the connection is gone.
                    Some(Err(_)) | None => return Poll::Ready(()),
                }
            }
        } else if tx.poll_reset(cx).is_ready() {
            return Poll::Ready(());
        }
        let frame = ready!(Pin::new(&mut *body).poll_frame(cx));
        if send_frame(body, tx, left, frame).is_none() {
            return Poll::Ready(());
        }
    }
}

/// Hands one polled frame to `h2`; None once the stream is done (ended, failed or reset).
/// `left`: what the announced Content-Length still allows. A body that ends short of it, or
/// would go past it, is reset as a failed one is, never ended cleanly (RFC 9113 8.1.1: such a
/// response is malformed).
fn send_frame<B>(
    body: &B,
    tx: &mut SendStream<Bytes>,
    left: &mut Option<u64>,
    frame: Option<Result<Frame<Bytes>, B::Error>>,
) -> Option<()>
where
    B: Body<Data = Bytes>,
    B::Error: Display,
{
    let short = |left: &Option<u64>| left.is_some_and(|n| n > 0);
    match frame {
        Some(Ok(frame)) => match frame.into_data() {
            Ok(data) => {
                if let Some(n) = left.as_mut() {
                    let len = data.len() as u64;
                    if len > *n {
                        return cut(tx, "past its content-length");
                    }
                    *n -= len;
                }
                let end = body.is_end_stream();
                if end && short(left) {
                    let _ = tx.send_data(data, false);
                    return cut(tx, "short of its content-length");
                }
                if tx.send_data(data, end).is_err() || end {
                    return None;
                }
                Some(())
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    if short(left) {
                        return cut(tx, "short of its content-length");
                    }
                    tx.reserve_capacity(0);
                    let _ = tx.send_trailers(trailers);
                    return None;
                }
                Some(())
            }
        },
        Some(Err(e)) => {
            tracing::debug!(error = %e, "response body failed; resetting the stream");
            tx.send_reset(Reason::INTERNAL_ERROR);
            None
        }
        None if short(left) => cut(tx, "short of its content-length"),
        None => {
            let _ = tx.send_data(Bytes::new(), true);
            None
        }
    }
}

/// Resets a stream whose body does not match its announced length.
fn cut(tx: &mut SendStream<Bytes>, why: &str) -> Option<()> {
    tracing::debug!("response body ended {why}; resetting the stream");
    tx.send_reset(Reason::INTERNAL_ERROR);
    None
}

/// A request's body as the client sends it on its stream. Read data is handed back to the
/// client's windows at once (the upstream's pace is the backpressure).
pub struct RequestBody {
    recv: RecvStream,
    /// What `Content-Length` says is still to come.
    remaining: Option<u64>,
    /// The last declared bytes, come before the stream's END_STREAM: held until it comes, so
    /// that a client that resets the stream instead leaves the upstream an incomplete request
    /// (RFC 9113 8.1), not one complete by its length.
    held: Option<Bytes>,
    data_done: bool,
    /// The request came without a body (END_STREAM on its HEADERS): asking `h2` again takes
    /// its stream store's lock, and the proxy asks a few times per request.
    empty: bool,
}

impl RequestBody {
    fn new(recv: RecvStream) -> RequestBody {
        RequestBody {
            empty: recv.is_end_stream(),
            recv,
            remaining: None,
            held: None,
            data_done: false,
        }
    }
}

/// Reads the declared length of a request whose stream is still open (`h2` has checked that it
/// parses and will reset the stream if the data does not match it).
fn declare_length(req: &mut Request<RequestBody>) {
    if req.body().empty {
        return;
    }
    let n = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    req.body_mut().remaining = n;
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if this.empty {
            return Poll::Ready(None);
        }
        while !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    if let Some(n) = &mut this.remaining {
                        *n = n.saturating_sub(data.len() as u64);
                    }
                    let data = match this.held.take() {
                        None => data,
                        Some(held) if data.is_empty() => held,
                        Some(held) => {
                            this.held = Some(data);
                            return Poll::Ready(Some(Ok(Frame::data(held))));
                        }
                    };
                    if this.remaining == Some(0) && !this.recv.is_end_stream() {
                        this.held = Some(data);
                        continue;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                // A stream reset before its END_STREAM, whatever the code (CANCEL, or NO_ERROR
                // from a client), leaves the request incomplete: an error, so that the upstream
                // sees an aborted body rather than a complete request (RFC 9112 7.1).
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                // `h2` checks the declared length at END_STREAM; this is the belt to its braces.
                None if this.remaining.is_some_and(|n| n > 0) => {
                    return Poll::Ready(Some(Err(h2::Error::from(Reason::PROTOCOL_ERROR))));
                }
                None => {
                    this.data_done = true;
                    if let Some(held) = this.held.take() {
                        return Poll::Ready(Some(Ok(Frame::data(held))));
                    }
                }
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(t) => Poll::Ready(t.map(|t| Ok(Frame::trailers(t)))),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.empty || (self.held.is_none() && self.recv.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.empty {
            return SizeHint::with_exact(0);
        }
        let held = self.held.as_ref().map_or(0, |b| b.len() as u64);
        if self.recv.is_end_stream() {
            return SizeHint::with_exact(held);
        }
        match self.remaining {
            Some(n) => SizeHint::with_exact(n + held),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Runs each stream as a tokio task.
    #[derive(Clone, Copy)]
    struct Spawn;

    impl<F: Future<Output = ()> + Send + 'static> hyper::rt::Executor<F> for Spawn {
        fn execute(&self, fut: F) {
            tokio::spawn(fut);
        }
    }

    fn settings(interval: Duration, timeout: Duration) -> Settings {
        Settings {
            max_concurrent_streams: 100,
            max_header_list_size: 16 * 1024,
            keep_alive_interval: Some(interval),
            keep_alive_timeout: timeout,
            head_timeout: None,
            on_cancel: None,
        }
    }

    type Handled = Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>;

    fn answer(calls: Arc<AtomicUsize>) -> impl FnMut(Request<RequestBody>) -> Handled + Unpin {
        move |req: Request<RequestBody>| {
            calls.fetch_add(1, Ordering::Relaxed);
            Box::pin(async move {
                let n = req.body().size_hint().exact();
                let mut body = req.into_body();
                let mut got = 0;
                while let Some(Ok(f)) =
                    std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
                {
                    got += f.data_ref().map_or(0, |d| d.len());
                }
                Response::new(Full::new(Bytes::from(format!("{n:?} {got}"))))
            }) as Handled
        }
    }

    /// Counts the bytes read from the client, as the server's caller does.
    struct Counted<T> {
        io: T,
        heard: Arc<AtomicU64>,
    }

    impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let before = buf.filled().len();
            let r = Pin::new(&mut self.io).poll_read(cx, buf);
            let n = (buf.filled().len() - before) as u64;
            self.heard.fetch_add(n, Ordering::Relaxed);
            r
        }
    }

    impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Pin::new(&mut self.io).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    const CLIENT_PING: &[u8] =
        b"\x00\x00\x08\x06\x00\x00\x00\x00\x00\x01\x02\x03\x04\x05\x06\x07\x08";

    /// The frame types in `bytes` (whole frames only).
    fn frame_types(bytes: &[u8]) -> Vec<u8> {
        let mut at = 0;
        let mut kinds = Vec::new();
        while at + 9 <= bytes.len() {
            let len = usize::from(bytes[at]) << 16
                | usize::from(bytes[at + 1]) << 8
                | usize::from(bytes[at + 2]);
            kinds.push(bytes[at + 3]);
            at += 9 + len;
        }
        kinds
    }

    /// A client that answers PINGs keeps its connection through many intervals, and so does one
    /// that never answers but keeps sending (its answer could be waiting behind our data); one
    /// that has gone silent (its preface sent, then nothing) is sent a PING, then a GOAWAY once
    /// the PING has waited `keep_alive_timeout`, and is dropped one timeout later.
    #[tokio::test]
    async fn a_client_that_stops_answering_pings_is_given_up() {
        let (interval, timeout) = (Duration::from_millis(50), Duration::from_millis(600));
        let calls = Arc::new(AtomicUsize::new(0));
        let serve = |io: tokio::io::DuplexStream, heard: &Arc<AtomicU64>| {
            let io = Counted {
                io,
                heard: heard.clone(),
            };
            Box::pin(Connection::new(
                io,
                &settings(interval, timeout),
                answer(calls.clone()),
                Spawn,
            ))
        };

        // A live client: its connection task answers PINGs.
        let heard = Arc::new(AtomicU64::new(0));
        let (server_io, client_io) = tokio::io::duplex(64 * 1024);
        let mut conn = serve(server_io, &heard);
        let (client, client_conn) = tokio::select! {
            () = conn.as_mut() => panic!("the connection ended"),
            r = h2::client::handshake(client_io) => r.expect("handshake"),
        };
        tokio::spawn(client_conn);
        let mut client = client;
        let started = Instant::now();
        let mut served = false;
        while started.elapsed() < Duration::from_millis(2500) {
            tokio::select! {
                () = conn.as_mut() => panic!("the connection ended"),
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
            let now = Instant::now();
            assert!(
                conn.as_mut().keep_alive(now, heard.load(Ordering::Relaxed)),
                "a client that answers was given up"
            );
            if !served {
                let req = Request::post("http://a/").body(()).expect("request");
                let (resp, mut tx) = client.send_request(req, false).expect("send");
                tx.send_data(Bytes::from_static(b"12345"), true)
                    .expect("data");
                let resp = tokio::select! {
                    () = conn.as_mut() => panic!("the connection ended"),
                    r = resp => r.expect("response"),
                };
                let mut body = resp.into_body();
                let got = tokio::select! {
                    () = conn.as_mut() => panic!("the connection ended"),
                    d = body.data() => d.expect("data").expect("data"),
                };
                // No Content-Length was sent: the body's length is unknown, all of it arrives.
                assert_eq!(&got[..], b"None 5");
                served = true;
            }
        }
        assert_eq!(calls.load(Ordering::Relaxed), 1);

        // A client that sends (its own PINGs) but never reads: never given up.
        let heard = Arc::new(AtomicU64::new(0));
        let (server_io, mut client_io) = tokio::io::duplex(1024 * 1024);
        client_io.write_all(PREFACE).await.expect("preface");
        let mut conn = serve(server_io, &heard);
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(2500) {
            tokio::select! {
                () = conn.as_mut() => panic!("the connection ended"),
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            client_io.write_all(CLIENT_PING).await.expect("ping");
            assert!(
                conn.as_mut()
                    .keep_alive(Instant::now(), heard.load(Ordering::Relaxed)),
                "a client that keeps sending was given up"
            );
        }

        // A silent client: the preface and an empty SETTINGS, then nothing.
        let heard = Arc::new(AtomicU64::new(0));
        let (server_io, mut client_io) = tokio::io::duplex(64 * 1024);
        client_io.write_all(PREFACE).await.expect("preface");
        let mut conn = serve(server_io, &heard);
        let started = Instant::now();
        let given_up = loop {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "a silent client was never given up"
            );
            tokio::select! {
                // It closes itself after its GOAWAY, or is dropped below.
                () = conn.as_mut() => break started.elapsed(),
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
            if !conn
                .as_mut()
                .keep_alive(Instant::now(), heard.load(Ordering::Relaxed))
            {
                break started.elapsed();
            }
        };
        // Not before one interval and one timeout.
        assert!(given_up >= interval + timeout, "{given_up:?}");
        // It was sent a PING, then a GOAWAY.
        let mut seen = Vec::new();
        let mut chunk = vec![0u8; 4096];
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), client_io.read(&mut chunk)).await
        {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&chunk[..n]);
        }
        let kinds = frame_types(&seen);
        let ping = kinds.iter().position(|k| *k == 6);
        let goaway = kinds.iter().position(|k| *k == 7);
        assert!(
            ping.is_some() && goaway.is_some() && ping < goaway,
            "no PING then GOAWAY in {kinds:?}"
        );
    }

    /// A head over the client's limit, a limit under 1 KiB taken as 1 KiB (not even the 502
    /// would fit under it), no limit announced: nothing is over.
    #[test]
    fn a_head_is_over_the_limit_the_client_announced_never_under_1_kib() {
        let mut head = Response::new(());
        head.headers_mut().insert(
            "x-big",
            HeaderValue::from_str(&"v".repeat(2000)).expect("value"),
        );
        assert!(over_limit(&head, 1500));
        assert!(!over_limit(&head, 4096));
        assert!(!over_limit(&head, u32::MAX));
        let small = too_large_head();
        assert!(!over_limit(&small, 0));
        assert!(!over_limit(&small, 100));
    }

    /// The client's first SETTINGS frame is read however its bytes are split, its
    /// SETTINGS_MAX_HEADER_LIST_SIZE kept; a first frame of another type is passed over.
    #[test]
    fn the_first_settings_give_the_clients_header_list_size() {
        let follow = |bytes: &[u8]| {
            let max = Arc::new(AtomicU32::new(u32::MAX));
            let mut ps = PeerSettings {
                io: (),
                first: Some(Vec::new()),
                max_header_list: max.clone(),
                head: None,
            };
            for b in bytes {
                ps.follow(std::slice::from_ref(b));
            }
            (max.load(Ordering::Relaxed), ps.first.is_none())
        };
        let mut settings =
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x0c\x04\x00\x00\x00\x00\x00".to_vec();
        settings.extend_from_slice(b"\x00\x04\x00\x01\x00\x00\x00\x06\x00\x00\x40\x00");
        assert_eq!(follow(&settings), (16384, true));
        settings.extend_from_slice(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x06\x00\x00\x00\x01");
        assert_eq!(
            follow(&settings),
            (16384, true),
            "a later SETTINGS is not followed"
        );
        let ping = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x08\x06\x00\x00\x00\x00\x00\x00\x00\x00\x06\x00\x00\x40\x00";
        assert_eq!(follow(ping), (u32::MAX, true));
    }

    /// A head is in progress from the preface's first byte, a frame header's, or a header
    /// block's until its END_HEADERS; not between frames nor in a DATA frame's payload.
    #[tokio::test]
    async fn the_frame_walk_knows_when_a_head_is_in_progress() {
        let clock = HeadClock {
            base: Instant::now(),
            since: Arc::new(AtomicU64::new(0)),
        };
        let mut w = FrameWalk::new(clock.clone());
        let pending = |w: &mut FrameWalk, bytes: &[u8]| {
            w.walk(bytes);
            clock.since.load(Ordering::Relaxed) != 0
        };
        assert!(pending(&mut w, b"PRI * HTTP/2.0\r\n"));
        assert!(!pending(&mut w, b"\r\nSM\r\n\r\n"));
        // SETTINGS, empty, its header in two pieces.
        assert!(pending(&mut w, &[0, 0, 0, 4]));
        assert!(!pending(&mut w, &[0, 0, 0, 0, 0]));
        // HEADERS without END_HEADERS: in progress through its CONTINUATION's END_HEADERS.
        assert!(pending(&mut w, &[0, 0, 2, 1, 0, 0, 0, 0, 1]));
        assert!(pending(&mut w, &[0x82, 0x84]));
        assert!(pending(&mut w, &[0, 0, 1, 9, 4, 0, 0, 0, 1]));
        assert!(!pending(&mut w, &[0x86]));
        // DATA: only its header counts.
        assert!(pending(&mut w, &[0, 0, 5, 0, 0, 0, 0]));
        assert!(!pending(&mut w, &[0, 1, b'a']));
        assert!(!pending(&mut w, b"bcde"));
        // A whole HEADERS frame with END_HEADERS in one read.
        assert!(!pending(&mut w, &[0, 0, 1, 1, 5, 0, 0, 0, 3, 0x82]));
    }

    /// A body that announces `announced` bytes (its exact size hint) and gives `data`, then
    /// ends.
    struct Liar {
        announced: u64,
        data: Option<Bytes>,
    }

    impl Body for Liar {
        type Data = Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
            Poll::Ready(self.data.take().map(|d| Ok(Frame::data(d))))
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.announced)
        }
    }

    impl Replaced for Liar {}

    /// A response body that ends short of the Content-Length its head announced, or would go
    /// past it, is never ended cleanly: the stream is reset, as for a body that failed.
    #[tokio::test]
    async fn a_body_that_breaks_its_announced_length_resets_the_stream() {
        type Lie = Pin<Box<dyn Future<Output = Response<Liar>> + Send>>;
        let service = |req: Request<RequestBody>| {
            let (announced, data) = match req.uri().path() {
                "/short" => (10, "12345"),
                "/long" => (3, "12345"),
                _ => (2, "ok"),
            };
            Box::pin(async move {
                Response::new(Liar {
                    announced,
                    data: Some(Bytes::from_static(data.as_bytes())),
                })
            }) as Lie
        };
        // A raw client: `h2`'s own checks the length it receives (it would fail the stream
        // itself); a client that does not is told by the reset alone.
        let (server_io, mut client_io) = tokio::io::duplex(64 * 1024);
        let settings = settings(Duration::from_secs(10), Duration::from_secs(10));
        let server = tokio::spawn(Connection::new(server_io, &settings, service, Spawn));
        let mut out = PREFACE.to_vec();
        for (id, path) in [(1u8, "/short"), (3, "/long"), (5, "/ok")] {
            // HEADERS, END_STREAM | END_HEADERS: GET, http, the path, authority `a` (HPACK).
            let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
            block.extend_from_slice(path.as_bytes());
            block.extend_from_slice(&[0x01, 0x01, b'a']);
            out.extend_from_slice(&[0, 0, block.len() as u8, 0x01, 0x05, 0, 0, 0, id]);
            out.extend_from_slice(&block);
        }
        client_io.write_all(&out).await.expect("write");
        // Each stream's end: 3 for RST_STREAM, 0 for DATA or 1 for HEADERS with END_STREAM.
        let mut ends = std::collections::BTreeMap::new();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while ends.len() < 3 {
            let n = tokio::time::timeout(Duration::from_secs(5), client_io.read(&mut buf))
                .await
                .expect("the streams neither ended nor were reset in 5 s")
                .expect("read");
            assert!(n > 0, "the connection closed: {ends:?}");
            got.extend_from_slice(&buf[..n]);
            while got.len() >= 9 {
                let len =
                    usize::from(got[0]) << 16 | usize::from(got[1]) << 8 | usize::from(got[2]);
                if got.len() < 9 + len {
                    break;
                }
                let (kind, flags, id) = (got[3], got[4], got[8]);
                if id != 0 && (kind == 3 || (kind <= 1 && flags & 1 == 1)) {
                    ends.entry(id).or_insert(kind);
                }
                got.drain(..9 + len);
            }
        }
        assert_eq!(ends.get(&1), Some(&3), "/short: {ends:?}");
        assert_eq!(ends.get(&3), Some(&3), "/long: {ends:?}");
        assert_eq!(ends.get(&5), Some(&0), "/ok: {ends:?}");
        server.abort();
    }
}
