//! Deadlines against slow and silent clients (issue 14): a write that makes no progress for
//! `client_send_timeout`, an HTTP/2 connection with no open stream for `h2_idle_timeout`, an
//! HTTP/2 stream whose flow-control window stays shut, and a tunnel with no traffic for
//! `tunnel_idle_timeout`.
//!
//! HTTP/2 (the `h2` crate, and hyper's server on the admin listener) has none of these: a
//! stream whose window is zero is simply never polled again, and a connection that answers
//! PINGs lives forever. So each h2 connection gets a watchdog ([`watch`]) next to the
//! connection's future: the service counts open streams in a [`ConnActivity`], and every
//! response body reports when it was last asked for data. The h2 server
//! (`http::h2_server`) hands each stream to [`StreamExec`], which runs it in a task of its own
//! and can stop it: a stream stalled on its own window is reset alone
//! (RST_STREAM CANCEL); a connection whose connection-level window is shut ([`CountWindow`]
//! follows it), or on which no response ever moved, is closed. The h2 server's keep-alive PING
//! runs on the watchdog's tick too, on the signs of life [`CountWindow`] counts.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{fence, AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use crossbeam_queue::SegQueue;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::http::h2_server::Replaced;

pub use crate::http::io::SendTimeout;

/// Milliseconds since `base`, for timestamps kept in atomics.
fn millis(base: Instant, now: Instant) -> u64 {
    now.saturating_duration_since(base).as_millis() as u64
}

/// "Not waiting on the client" in [`StreamClock`]: the body waits for the upstream, or ended.
const NOT_STALLED: u64 = u64::MAX;

thread_local! {
    /// The stream whose service future the HTTP/2 server has just made on this thread, for
    /// the [`StreamExec::execute`] call that follows: the server calls the service and hands
    /// the stream's future to the executor in one step, with nothing between. Set by
    /// [`ConnActivity::open_stream`].
    static NEXT_STREAM: Cell<Option<Arc<StreamClock>>> = const { Cell::new(None) };
}

/// The HTTP/2 server's executor: each stream is a tokio task, which the connection's watchdog
/// can stop. (Streams run in the connection's own task on a current-thread runtime lost a
/// stream in flight at shutdown when its client had not answered the GOAWAY's PING: BENCHMARKS
/// tuning log row 66.) Stopping drops the stream's
/// future, and with it the response body (the upstream connection is closed, not pooled) and
/// h2's last handle on the stream, so h2 discards what it buffered for the stream and sends
/// RST_STREAM (CANCEL).
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamExec;

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future + Send + Unpin + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        let task = Stoppable {
            fut,
            clock: take_next_stream(),
        };
        // Boxed in place: tokio writes a task's future (and later its output) into the task
        // cell's stage, a copy of the whole stream future each time it is not behind a pointer.
        let task: Pin<Box<Stoppable<F>>> = Box::into_pin(Box::write(Box::new_uninit(), task));
        tokio::spawn(task);
    }
}

/// The stream [`ConnActivity::open_stream`] left for the task being spawned, now stoppable.
fn take_next_stream() -> Option<Arc<StreamClock>> {
    let clock = NEXT_STREAM.take()?;
    clock.stoppable.store(true, Ordering::Relaxed);
    Some(clock)
}

/// A stream's task: ends (dropping the stream) once its clock is stopped. A flag and the
/// task's waker, where a `Notify` took a lock to register and another to deregister.
struct Stoppable<F> {
    fut: F,
    clock: Option<Arc<StreamClock>>,
}

impl<F: Future + Unpin> Future for Stoppable<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if let Some(clock) = &this.clock {
            // A task's waker wakes the same task for its whole life: kept from the first poll.
            if clock.waker.get().is_none() {
                let _ = clock.waker.set(cx.waker().clone());
                // Pairs with the fence in `stop`: either this load sees the flag, or `stop`
                // sees the waker.
                fence(Ordering::SeqCst);
            }
            if clock.stopped.load(Ordering::Relaxed) {
                return Poll::Ready(());
            }
        }
        Pin::new(&mut this.fut).poll(cx).map(|_| ())
    }
}

/// One stream (request): its response body's last moment of progress toward the client, and
/// the stop signal of the task that runs it.
struct StreamClock {
    /// Millis (since the connection's base) of the last frame handed out while the body still
    /// had more; [`NOT_STALLED`] while the body itself waits, before it exists, or once it
    /// ended.
    ready_at: AtomicU64,
    /// The stream runs in a [`StreamExec`] task, which [`StreamClock::stop`] ends.
    stoppable: AtomicBool,
    stopped: AtomicBool,
    /// The stream task's waker, from its first poll.
    waker: OnceLock<Waker>,
}

impl StreamClock {
    /// Ends the stream's task (at its next poll, which this wakes).
    fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if let Some(w) = self.waker.get() {
            w.wake_by_ref();
        }
    }
}

/// The open streams of one HTTP/2 connection (or requests of one admin connection), and the
/// response bodies being sent, for the connection's watchdog. Only atomics on the request path.
pub struct ConnActivity {
    base: Instant,
    open: AtomicUsize,
    /// Millis since `base` when `open` last changed.
    changed_at: AtomicU64,
    /// Whether a response body was ever asked for data (the client's windows let some out).
    moved: AtomicBool,
    /// The connection-level send window the client has granted (RFC 9113 6.9), as
    /// [`CountWindow`] sees the frames go by; stays at the initial 65,535 without it.
    send_window: AtomicI64,
    /// Millis since `base` of the last connection-level WINDOW_UPDATE from the client. A client
    /// whose connection window is the bottleneck sits at zero most of the time while reading
    /// at full speed; it is shut only when no grant came for the whole send timeout.
    granted_at: AtomicU64,
    /// Signs of life from the client so far ([`CountWindow`]): bytes read from it, and DATA
    /// payload bytes its socket took (a download whose client sends nothing for a while, its
    /// windows being large, still moves). Control frames written do not count: a vanished
    /// client's socket buffer would take PINGs for ever.
    heard: AtomicU64,
    /// Response bodies registered for the stall check; the watchdog takes them out.
    new_bodies: SegQueue<Arc<StreamClock>>,
}

impl ConnActivity {
    pub fn new() -> Arc<ConnActivity> {
        Arc::new(ConnActivity {
            base: Instant::now(),
            open: AtomicUsize::new(0),
            changed_at: AtomicU64::new(0),
            moved: AtomicBool::new(false),
            send_window: AtomicI64::new(INITIAL_WINDOW),
            granted_at: AtomicU64::new(0),
            new_bodies: SegQueue::new(),
            heard: AtomicU64::new(0),
        })
    }

    /// A stream (request) opened; it counts as open until the guard drops.
    pub fn open(self: &Arc<Self>) -> StreamGuard {
        // Only the moments the connection becomes busy or idle count for `idle_for`.
        if self.open.fetch_add(1, Ordering::Relaxed) == 0 {
            self.touch();
        }
        StreamGuard {
            conn: self.clone(),
            clock: Arc::new(StreamClock {
                ready_at: AtomicU64::new(NOT_STALLED),
                stoppable: AtomicBool::new(false),
                stopped: AtomicBool::new(false),
                waker: OnceLock::new(),
            }),
        }
    }

    /// [`open`](Self::open) for an HTTP/2 stream, from the service that the server calls right
    /// before it spawns the stream's task through [`StreamExec`]: that task is the one the
    /// watchdog stops when this stream's body stalls alone.
    pub fn open_stream(self: &Arc<Self>) -> StreamGuard {
        let guard = self.open();
        NEXT_STREAM.set(Some(guard.clock.clone()));
        guard
    }

    /// The client's signs of life so far (the keep-alive's: bytes read from it, DATA taken).
    pub fn heard(&self) -> u64 {
        self.heard.load(Ordering::Relaxed)
    }

    /// The client granted connection-level window (a WINDOW_UPDATE on stream 0 arrived).
    fn granted(&self) {
        self.granted_at
            .store(millis(self.base, Instant::now()), Ordering::Relaxed);
    }

    fn touch(&self) {
        self.changed_at
            .store(millis(self.base, Instant::now()), Ordering::Relaxed);
    }

    /// How long the connection has had no open stream (zero while one is open).
    pub fn idle_for(&self, now: Instant) -> Duration {
        if self.open.load(Ordering::Relaxed) > 0 {
            return Duration::ZERO;
        }
        let since = self.changed_at.load(Ordering::Relaxed);
        Duration::from_millis(millis(self.base, now).saturating_sub(since))
    }

    /// Wraps a response body so that the watchdog sees when it stalls; it keeps the stream open
    /// until it is dropped.
    pub fn track<B: Body>(&self, inner: B, guard: StreamGuard) -> Tracked<B> {
        if !inner.is_end_stream() {
            let at = millis(self.base, Instant::now());
            guard.clock.ready_at.store(at, Ordering::Relaxed);
        }
        self.new_bodies.push(guard.clock.clone());
        Tracked {
            inner,
            rest: Bytes::new(),
            base: self.base,
            guard,
        }
    }
}

/// Counts one open stream until dropped.
pub struct StreamGuard {
    conn: Arc<ConnActivity>,
    clock: Arc<StreamClock>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.conn.open.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.conn.touch();
        }
    }
}

/// Most of a body handed to the h2 server at once. It asks for the next frame only once h2 has
/// send capacity for the stream (the client's window, less what h2 holds for it), so each ask
/// is progress of at most this much: a client must take this much per `client_send_timeout`
/// (273 B/s at the default) not to count as stalled. A client whose windows are open but that
/// stops reading the socket leaves up to h2's send buffer (400 KiB) per stream queued; the
/// connection-level check ([`CountWindow`], the send timeout) closes it.
const TRACKED_FRAME: usize = 16 * 1024;

/// A response body whose progress the connection's watchdog follows. Its data goes out in
/// pieces of at most [`TRACKED_FRAME`].
pub struct Tracked<B> {
    inner: B,
    /// What is left of the last data frame.
    rest: Bytes,
    base: Instant,
    guard: StreamGuard,
}

impl<B> Body for Tracked<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let moved = &this.guard.conn.moved;
        if !moved.load(Ordering::Relaxed) {
            moved.store(true, Ordering::Relaxed);
        }
        let r = if this.rest.is_empty() {
            // The frame is passed on where it lies (rebuilding it moved it twice more).
            let mut r = Pin::new(&mut this.inner).poll_frame(cx);
            if let Poll::Ready(Some(Ok(frame))) = &mut r {
                if let Some(data) = frame.data_mut() {
                    if data.len() > TRACKED_FRAME {
                        this.rest = data.split_off(TRACKED_FRAME);
                    }
                }
            }
            r
        } else {
            let n = this.rest.len().min(TRACKED_FRAME);
            Poll::Ready(Some(Ok(Frame::data(this.rest.split_to(n)))))
        };
        let at = match &r {
            // A frame went out; until the next poll the stream waits for the client's window.
            Poll::Ready(Some(Ok(_))) if !this.is_end_stream() => millis(this.base, Instant::now()),
            _ => NOT_STALLED,
        };
        this.guard.clock.ready_at.store(at, Ordering::Relaxed);
        r
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

impl<B: Replaced> Replaced for Tracked<B> {
    fn replaced(&mut self, status: http::StatusCode) {
        self.inner.replaced(status);
    }
}

/// What the watchdog of one connection decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Keep serving.
    Fine,
    /// No open stream for the idle timeout: send GOAWAY.
    Idle,
    /// A response has waited for the client's flow-control window longer than the send
    /// timeout, and the client reads nothing: the connection-level window is shut, or no
    /// response of the connection ever moved. Close the connection.
    Stalled,
}

/// The watchdog's own state for one connection.
pub struct Watchdog {
    activity: Arc<ConnActivity>,
    bodies: Vec<Arc<StreamClock>>,
    idle_timeout: Duration,
    send_timeout: Option<Duration>,
}

impl Watchdog {
    pub fn new(
        activity: Arc<ConnActivity>,
        idle_timeout: Duration,
        send_timeout: Option<Duration>,
    ) -> Watchdog {
        Watchdog {
            activity,
            bodies: Vec::new(),
            idle_timeout,
            send_timeout,
        }
    }

    /// How often to look: a quarter of the shortest timeout, between 20 ms and 1 s.
    pub fn period(&self) -> Duration {
        let shortest = self
            .send_timeout
            .map_or(self.idle_timeout, |s| s.min(self.idle_timeout));
        (shortest / 4).clamp(Duration::from_millis(20), Duration::from_secs(1))
    }

    pub fn check(&mut self, now: Instant) -> Verdict {
        while let Some(b) = self.activity.new_bodies.pop() {
            self.bodies.push(b);
        }
        // A body only the watchdog still holds has been dropped: its stream is done.
        self.bodies.retain(|b| Arc::strong_count(b) > 1);
        if let Some(limit) = self.send_timeout {
            let now_ms = millis(self.activity.base, now);
            let limit = limit.as_millis() as u64;
            // The whole client stopped reading: nothing can move on any stream (its connection
            // window shut and not opened for the whole limit, or no response ever moved).
            let granted = self.activity.granted_at.load(Ordering::Relaxed);
            let shut = (self.activity.send_window.load(Ordering::Relaxed) <= 0
                && now_ms.saturating_sub(granted) >= limit)
                || !self.activity.moved.load(Ordering::Relaxed);
            let mut whole = false;
            self.bodies.retain(|b| {
                let at = b.ready_at.load(Ordering::Relaxed);
                if at == NOT_STALLED || now_ms.saturating_sub(at) < limit {
                    return true;
                }
                if !shut && b.stoppable.load(Ordering::Relaxed) {
                    // Only this stream's window is shut: it alone is reset, and the watchdog
                    // lets go of it.
                    tracing::debug!("a response stalled on its stream's window; resetting it");
                    b.stop();
                    false
                } else {
                    whole = true;
                    true
                }
            });
            if whole {
                return Verdict::Stalled;
            }
        }
        if self.activity.idle_for(now) >= self.idle_timeout {
            return Verdict::Idle;
        }
        Verdict::Fine
    }
}

/// The connection-level flow-control window every HTTP/2 connection starts with (RFC 9113
/// 6.9.2); SETTINGS do not change it, only WINDOW_UPDATE on stream 0.
const INITIAL_WINDOW: i64 = 65_535;

/// Frame boundaries in one direction of an HTTP/2 connection, read off the bytes as they pass.
#[derive(Default)]
struct FrameScan {
    /// Bytes to pass over before the next frame header: the client preface, or a payload.
    skip: usize,
    head: [u8; 9],
    have: usize,
    /// A connection-level WINDOW_UPDATE's increment being read, and how much of it is here.
    incr: Option<([u8; 4], usize)>,
    /// DATA payload bytes whose frames went out since the caller last took them.
    data_out: u64,
}

impl FrameScan {
    /// Follows `buf`: DATA frames going out (`inbound` false) take from `window`, connection
    /// WINDOW_UPDATEs coming in add to it. True when such a WINDOW_UPDATE was read.
    fn feed(&mut self, mut buf: &[u8], inbound: bool, window: &AtomicI64) -> bool {
        let mut granted = false;
        while !buf.is_empty() {
            if let Some((b, n)) = &mut self.incr {
                let take = (4 - *n).min(buf.len());
                b[*n..*n + take].copy_from_slice(&buf[..take]);
                *n += take;
                buf = &buf[take..];
                if *n == 4 {
                    let inc = u32::from_be_bytes(*b) & 0x7fff_ffff;
                    window.fetch_add(i64::from(inc), Ordering::Relaxed);
                    self.incr = None;
                    granted = true;
                }
                continue;
            }
            if self.skip > 0 {
                let take = self.skip.min(buf.len());
                self.skip -= take;
                buf = &buf[take..];
                continue;
            }
            let take = (9 - self.have).min(buf.len());
            self.head[self.have..self.have + take].copy_from_slice(&buf[..take]);
            self.have += take;
            buf = &buf[take..];
            if self.have < 9 {
                continue;
            }
            self.have = 0;
            let h = self.head;
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
            let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
            match h[3] {
                // WINDOW_UPDATE on the connection.
                0x8 if inbound && stream == 0 && len == 4 => self.incr = Some(([0; 4], 0)),
                // DATA: its whole payload (padding included) counts against the window.
                0x0 if !inbound => {
                    window.fetch_sub(len as i64, Ordering::Relaxed);
                    self.data_out += len as u64;
                    self.skip = len;
                }
                _ => self.skip = len,
            }
        }
        granted
    }
}

/// An HTTP/2 server connection's socket that follows the connection-level send window for the
/// watchdog (hyper and h2 do not tell it): what the client grants with WINDOW_UPDATE on stream
/// 0, less the DATA sent. A scan of the frame headers; payloads are skipped.
pub struct CountWindow<S> {
    io: S,
    activity: Arc<ConnActivity>,
    inbound: FrameScan,
    outbound: FrameScan,
}

impl<S> CountWindow<S> {
    /// `io` from its first byte: the client's preface comes first.
    pub fn new(io: S, activity: Arc<ConnActivity>) -> CountWindow<S> {
        CountWindow {
            io,
            activity,
            inbound: FrameScan {
                skip: H2_CLIENT_PREFACE_LEN,
                ..FrameScan::default()
            },
            outbound: FrameScan::default(),
        }
    }

    /// DATA frames written count as the client's signs of life.
    fn took_data(&mut self) {
        let data = std::mem::take(&mut self.outbound.data_out);
        if data > 0 {
            self.activity.heard.fetch_add(data, Ordering::Relaxed);
        }
    }
}

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const H2_CLIENT_PREFACE_LEN: usize = 24;

impl<S: AsyncRead + Unpin> AsyncRead for CountWindow<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let this = &mut *self;
        let read = &buf.filled()[before..];
        if !read.is_empty() {
            this.activity
                .heard
                .fetch_add(read.len() as u64, Ordering::Relaxed);
        }
        if this.inbound.feed(read, true, &this.activity.send_window) {
            this.activity.granted();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CountWindow<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            let this = &mut *self;
            this.outbound
                .feed(&buf[..n], false, &this.activity.send_window);
            this.took_data();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(mut n)) = r {
            let this = &mut *self;
            for b in bufs {
                let take = n.min(b.len());
                this.outbound
                    .feed(&b[..take], false, &this.activity.send_window);
                n -= take;
                if n == 0 {
                    break;
                }
            }
            this.took_data();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// After an idle GOAWAY, how long the connection gets to send it (and to notice a stream the
/// client opened meanwhile) before it is closed. h2 would otherwise wait for the client to
/// answer a PING first, which a hostile client never does.
const GOAWAY_FLUSH: Duration = Duration::from_millis(100);

/// How long a connection the proxy closes itself (after its GOAWAY, at shutdown, at its first
/// deadline) gets to say so cleanly (GOAWAY, TLS close_notify, FIN) before it is dropped: a
/// client that does not read must not hold the connection's task.
pub const CLOSE_FLUSH: Duration = Duration::from_millis(500);

/// Runs a connection future under a watchdog: an idle connection gets `graceful` (GOAWAY) and
/// is closed at the first tick [`GOAWAY_FLUSH`] or more later (within the tick, at most a
/// second) if still without an open stream, or `linger` later at the latest; a stalled one is
/// closed at once. Shutdown starts `graceful` too, and the connection is closed the same way
/// once it has no open stream (the listener's drain bounds the streams in flight). Closing is
/// `close` (an abrupt GOAWAY, or the end of the client's input), then the connection's own
/// clean end, TLS close_notify and FIN, for at most [`CLOSE_FLUSH`].
pub async fn watch<C>(
    mut conn: Pin<&mut C>,
    mut dog: Watchdog,
    shutdown: &crate::shutdown::Shutdown,
    linger: Duration,
    graceful: impl Fn(Pin<&mut C>),
    close: impl Fn(Pin<&mut C>),
    mut keep_alive: impl FnMut(Pin<&mut C>, Instant) -> bool,
) where
    C: Future,
{
    let mut tick = tokio::time::interval(dog.period());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When the idle GOAWAY went out, and when the shutdown's (if it was the first).
    let mut goaway: Option<Instant> = None;
    let mut shutdown_goaway: Option<Instant> = None;
    let mut shutting_down = false;
    loop {
        tokio::select! {
            biased;
            _ = conn.as_mut() => return,
            () = shutdown.cancelled(), if !shutting_down => {
                shutting_down = true;
                if goaway.is_none() {
                    graceful(conn.as_mut());
                    shutdown_goaway = Some(Instant::now());
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                if !keep_alive(conn.as_mut(), now) {
                    tracing::debug!("the client did not answer a PING; closing");
                    return;
                }
                match dog.check(now) {
                    Verdict::Stalled => {
                        // Closed as below: a client that still reads frames but opened no
                        // window is told why (GOAWAY, RFC 9113 6.8); one that reads nothing
                        // holds the task for CLOSE_FLUSH at most.
                        tracing::debug!("the client stopped reading every response; closing");
                        break;
                    }
                    Verdict::Idle if goaway.is_none() && !shutting_down => {
                        tracing::debug!("idle connection; sending GOAWAY");
                        graceful(conn.as_mut());
                        goaway = Some(now);
                    }
                    _ => {}
                }
                let quiet = dog.activity.open.load(Ordering::Relaxed) == 0;
                let lingered = goaway.is_some_and(|t| now - t >= linger);
                // The streams in flight at shutdown get the grace (the listener's drain bounds
                // them), not `linger`.
                let flushed = goaway
                    .or(shutdown_goaway)
                    .is_some_and(|t| now - t >= GOAWAY_FLUSH);
                if lingered || (quiet && flushed) {
                    break;
                }
            }
        }
    }
    close(conn.as_mut());
    let _ = tokio::time::timeout(CLOSE_FLUSH, conn).await;
}

/// A connection's socket whose input can be ended from outside ([`InputEnd::end`]): reads then
/// see the end of the stream, so a server that has no abrupt close of its own (hyper's, on the
/// admin listener) ends the connection as it ends one the client closed: cleanly, through the
/// socket's shutdown (TLS close_notify, FIN). Writes pass through.
pub struct EndableInput<S> {
    io: S,
    end: InputEnd,
}

/// Ends the input of an [`EndableInput`].
#[derive(Clone, Default)]
pub struct InputEnd(Arc<AtomicBool>);

impl InputEnd {
    /// The next read (the connection's future is polled right after, as [`watch`] does) sees the
    /// end of the stream.
    pub fn end(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

impl<S> EndableInput<S> {
    pub fn new(io: S) -> (EndableInput<S>, InputEnd) {
        let end = InputEnd::default();
        (
            EndableInput {
                io,
                end: end.clone(),
            },
            end,
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for EndableInput<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.end.0.load(Ordering::Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

crate::http::io::write_through!([S: AsyncWrite + Unpin] EndableInput<S>);

/// Splices an upgraded client connection and its upstream together until either side closes,
/// an error, or `idle` (when not zero) passes without a byte either way. `to_a` counts the
/// bytes written to `a` as they go, so a tunnel cut at shutdown still knows what it carried.
pub async fn splice<A, B>(a: &mut A, b: &mut B, idle: Duration, to_a: &AtomicU64) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = AtomicU64::new(0);
    let to_b = AtomicU64::new(0);
    let base = Instant::now();
    let mut a = Counted {
        io: a,
        last: &activity,
        wrote: to_a,
        base,
    };
    let mut b = Counted {
        io: b,
        last: &activity,
        wrote: &to_b,
        base,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    if idle.is_zero() {
        return copy.await.map(|_| ());
    }
    tokio::pin!(copy);
    let period = (idle / 4).clamp(Duration::from_millis(20), Duration::from_secs(5));
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            r = copy.as_mut() => return r.map(|_| ()),
            _ = tick.tick() => {
                let last = activity.load(Ordering::Relaxed);
                if millis(base, Instant::now()).saturating_sub(last) >= idle.as_millis() as u64 {
                    tracing::debug!("tunnel idle; closing");
                    return Ok(());
                }
            }
        }
    }
}

/// One side of a tunnel, noting when bytes last moved and counting the bytes written to it.
struct Counted<'a, S> {
    io: &'a mut S,
    last: &'a AtomicU64,
    wrote: &'a AtomicU64,
    base: Instant,
}

impl<S> Counted<'_, S> {
    fn moved(&self) {
        self.last
            .store(millis(self.base, Instant::now()), Ordering::Relaxed);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.moved();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut *self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                self.wrote.fetch_add(n as u64, Ordering::Relaxed);
                self.moved();
            }
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

/// The soft `RLIMIT_NOFILE` of this process, from `/proc/self/limits` (Linux); None elsewhere
/// or when unlimited.
pub fn nofile_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// File descriptors the configured limits can use at once: each proxied connection may hold
/// its client socket and an upstream socket, idle pooled upstream connections per upstream, the
/// admin connections, and a margin for listeners, etcd, health checks and logs.
pub fn fds_needed(cfg: &crate::config::Config) -> u64 {
    let upstreams: usize = cfg
        .services
        .iter()
        .map(|s| s.blue.upstreams.len() + s.green.upstreams.len())
        .sum();
    2 * cfg.proxy.max_connections as u64
        + (cfg.proxy.upstream_max_idle * upstreams) as u64
        + cfg.admin.max_connections as u64
        + 64
}

/// Warns at startup when `RLIMIT_NOFILE` is below what the configured limits can use.
pub fn check_nofile(cfg: &crate::config::Config) {
    let needed = fds_needed(cfg);
    if let Some(limit) = nofile_limit() {
        if limit < needed {
            tracing::warn!(
                rlimit_nofile = limit,
                needed,
                max_connections = cfg.proxy.max_connections,
                admin_max_connections = cfg.admin.max_connections,
                "RLIMIT_NOFILE is below what proxy.max_connections needs (2 per connection: client \
                 and upstream, plus idle upstream connections and admin.max_connections); raise \
                 the limit (ulimit -n, LimitNOFILE=) or lower proxy.max_connections"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nofile_is_read() {
        if std::path::Path::new("/proc/self/limits").exists() {
            assert!(nofile_limit().is_some_and(|n| n > 0));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn watchdog_sees_idle_and_stalls() {
        let act = ConnActivity::new();
        let mut dog = Watchdog::new(
            act.clone(),
            Duration::from_secs(10),
            Some(Duration::from_secs(5)),
        );
        assert_eq!(dog.check(Instant::now()), Verdict::Fine);
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(dog.check(Instant::now()), Verdict::Idle);
        let g = act.open();
        assert_eq!(dog.check(Instant::now()), Verdict::Fine);
        let body = act.track(http_body_util::Full::new(Bytes::from_static(b"x")), g);
        tokio::time::advance(Duration::from_secs(6)).await;
        // Made and never polled: waiting for the window since it was made.
        assert_eq!(dog.check(Instant::now()), Verdict::Stalled);
        drop(body);
        assert_eq!(dog.check(Instant::now()), Verdict::Fine);
    }

    /// A stream as hyper's server opens it: its service takes it with `open_stream`, then
    /// `StreamExec::execute` takes it for the stream's task: the stream's guard, and the clock
    /// its task holds.
    fn stream_task(act: &Arc<ConnActivity>) -> (StreamGuard, Arc<StreamClock>) {
        let guard = act.open_stream();
        let clock = take_next_stream().expect("open_stream left the stream for its task");
        (guard, clock)
    }

    /// Whether the watchdog stopped the stream task of `clock`.
    fn stopped(clock: &StreamClock) -> bool {
        clock.stopped.load(Ordering::Relaxed)
    }

    /// A body with always one more byte.
    struct Endless;

    impl Body for Endless {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_stalled_alone_is_stopped_and_a_stalled_connection_closed() {
        use http_body_util::BodyExt;
        let act = ConnActivity::new();
        let mut dog = Watchdog::new(
            act.clone(),
            Duration::from_secs(60),
            Some(Duration::from_secs(5)),
        );
        let endless = || Endless;
        // Two bodies sent by stream tasks (with a stop handle each).
        let (guard_a, stop_a) = stream_task(&act);
        let (guard_b, stop_b) = stream_task(&act);
        let mut a = act.track(endless(), guard_a);
        let mut b = act.track(endless(), guard_b);
        // A hands out a frame and is never asked again; B goes on being read.
        a.frame().await;
        for _ in 0..6 {
            tokio::time::advance(Duration::from_secs(1)).await;
            b.frame().await;
        }
        assert_eq!(dog.check(Instant::now()), Verdict::Fine);
        assert!(stopped(&stop_a), "the stalled stream was not stopped");
        assert!(!stopped(&stop_b), "the moving stream was stopped");
        drop(a);
        // Then B stalls too, on a shut connection window: the whole client is stuck.
        act.send_window.store(0, Ordering::Relaxed);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(dog.check(Instant::now()), Verdict::Stalled);
        // B's task ends, and its body with it.
        drop((b, stop_b));
        assert_eq!(dog.check(Instant::now()), Verdict::Fine);
        // A connection on which no response ever moved (every stream window zero) is closed.
        let act = ConnActivity::new();
        let mut dog = Watchdog::new(
            act.clone(),
            Duration::from_secs(60),
            Some(Duration::from_secs(5)),
        );
        let (guard_c, _stop_c) = stream_task(&act);
        let c = act.track(endless(), guard_c);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(dog.check(Instant::now()), Verdict::Stalled);
        drop(c);
    }

    /// A client whose connection window is the bottleneck reads at full speed with the window
    /// at zero most of the time: one stream stalled on its own window is reset alone, not the
    /// whole connection, as long as the client keeps granting connection window.
    #[tokio::test(start_paused = true)]
    async fn a_connection_window_at_zero_but_still_granted_is_not_shut() {
        use http_body_util::BodyExt;
        let act = ConnActivity::new();
        let mut dog = Watchdog::new(
            act.clone(),
            Duration::from_secs(60),
            Some(Duration::from_secs(5)),
        );
        let (guard_a, stop_a) = stream_task(&act);
        let (guard_b, stop_b) = stream_task(&act);
        let mut a = act.track(Endless, guard_a);
        let mut b = act.track(Endless, guard_b);
        a.frame().await;
        for _ in 0..6 {
            tokio::time::advance(Duration::from_secs(1)).await;
            b.frame().await;
            // B's data used the whole window and the client granted it again a moment ago.
            act.granted();
            act.send_window.store(0, Ordering::Relaxed);
        }
        assert_eq!(dog.check(Instant::now()), Verdict::Fine);
        assert!(stopped(&stop_a), "the stalled stream was not reset");
        assert!(!stopped(&stop_b), "the moving stream was stopped");
        drop(a);
        // No grant for the whole limit with the window shut: the client stopped reading.
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(dog.check(Instant::now()), Verdict::Stalled);
        drop(b);
    }

    /// A stream task that never finishes by itself, spawned through `StreamExec` for the
    /// stream `open_stream` opened; `alive` closes when the task's future is dropped.
    fn spawn_stream(
        act: &Arc<ConnActivity>,
    ) -> (Arc<StreamClock>, tokio::sync::oneshot::Receiver<()>) {
        let guard = act.open_stream();
        let clock = guard.clock.clone();
        let (tx, alive) = tokio::sync::oneshot::channel::<()>();
        let fut = Box::pin(async move {
            let _held = (tx, guard);
            std::future::pending::<()>().await
        });
        hyper::rt::Executor::execute(&StreamExec, fut);
        (clock, alive)
    }

    #[tokio::test]
    async fn a_stopped_stream_task_ends_whether_it_was_polled_or_not() {
        let act = ConnActivity::new();
        // Stopped after its first poll: the stop wakes it.
        let (clock, alive) = spawn_stream(&act);
        assert!(clock.stoppable.load(Ordering::Relaxed));
        tokio::task::yield_now().await;
        assert!(clock.waker.get().is_some(), "the task was not polled");
        clock.stop();
        let ended = tokio::time::timeout(Duration::from_secs(5), alive).await;
        assert!(matches!(ended, Ok(Err(_))), "the stopped task still runs");
        // Stopped before it ever ran.
        let (clock, alive) = spawn_stream(&act);
        clock.stop();
        let ended = tokio::time::timeout(Duration::from_secs(5), alive).await;
        assert!(matches!(ended, Ok(Err(_))), "the stopped task still runs");
        // One not stopped goes on; a task spawned without open_stream has no stream to stop.
        let (clock, mut alive) = spawn_stream(&act);
        tokio::task::yield_now().await;
        assert!(alive
            .try_recv()
            .is_err_and(|e| e == tokio::sync::oneshot::error::TryRecvError::Empty));
        drop(clock);
        assert!(take_next_stream().is_none());
        assert_eq!(act.open.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_connection_window_follows_the_frames() {
        let w = AtomicI64::new(INITIAL_WINDOW);
        let mut inbound = FrameScan {
            skip: H2_CLIENT_PREFACE_LEN,
            ..FrameScan::default()
        };
        let mut outbound = FrameScan::default();
        let frame = |kind: u8, stream: u32, payload: &[u8]| {
            let len = payload.len() as u32;
            let mut f = len.to_be_bytes()[1..].to_vec();
            f.extend_from_slice(&[kind, 0]);
            f.extend_from_slice(&stream.to_be_bytes());
            f.extend_from_slice(payload);
            f
        };
        // The preface, SETTINGS, a stream's WINDOW_UPDATE (ignored), the connection's, fed a
        // byte at a time.
        let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        input.extend(frame(0x4, 0, &[0, 4, 0, 0, 0, 0]));
        input.extend(frame(0x8, 1, &1000u32.to_be_bytes()));
        input.extend(frame(0x8, 0, &100_000u32.to_be_bytes()));
        for b in &input {
            inbound.feed(std::slice::from_ref(b), true, &w);
        }
        assert_eq!(w.load(Ordering::Relaxed), INITIAL_WINDOW + 100_000);
        // Going out: SETTINGS, HEADERS, DATA of 16 KiB and 5 bytes, in odd pieces.
        let mut output = frame(0x4, 0, &[]);
        output.extend(frame(0x1, 1, b"head"));
        output.extend(frame(0x0, 1, &[7; 16384]));
        output.extend(frame(0x0, 1, b"hello"));
        for piece in output.chunks(1000) {
            outbound.feed(piece, false, &w);
        }
        assert_eq!(
            w.load(Ordering::Relaxed),
            INITIAL_WINDOW + 100_000 - 16384 - 5
        );
    }

    #[tokio::test]
    async fn tracked_bodies_come_in_small_pieces_and_whole() {
        use http_body_util::BodyExt;
        let act = ConnActivity::new();
        let data = Bytes::from(vec![7u8; 40 * 1024]);
        let mut body = act.track(http_body_util::Full::new(data.clone()), act.open());
        assert_eq!(body.size_hint().exact(), Some(40 * 1024));
        let mut got = Vec::new();
        while let Some(f) = body.frame().await {
            let d = f.ok().and_then(|f| f.into_data().ok()).expect("data");
            assert!(d.len() <= TRACKED_FRAME);
            got.extend_from_slice(&d);
        }
        assert!(body.is_end_stream());
        assert_eq!(got, data);
    }
    /// The keep-alive's signs of life: bytes read from the client, and DATA payload the socket
    /// took; a PING (or any control frame) written is none (a vanished client's socket buffer
    /// would take them for ever).
    #[tokio::test]
    async fn bytes_read_and_data_written_are_signs_of_life_control_frames_are_not() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let act = ConnActivity::new();
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let mut io = CountWindow::new(ours, act.clone());
        // The client's preface and a PING: read.
        theirs
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 64];
        let n = io.read(&mut buf).await.expect("read");
        assert_eq!(act.heard(), n as u64);
        let before = act.heard();
        // A PING written: no sign of life.
        io.write_all(b"\x00\x00\x08\x06\x00\x00\x00\x00\x00AAAAAAAA")
            .await
            .expect("write");
        assert_eq!(act.heard(), before);
        // A DATA frame of 5 bytes on stream 1 written: 5.
        io.write_all(b"\x00\x00\x05\x00\x00\x00\x00\x00\x01hello")
            .await
            .expect("write");
        assert_eq!(act.heard(), before + 5);
        let mut sink = vec![0u8; 64];
        let _ = theirs.read(&mut sink).await.expect("read");
    }
}
