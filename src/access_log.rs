//! The access log: one line per request answered on the proxy listeners, formatted and written
//! by a thread of its own. That is every request the proxy routed or answered itself (404, 503,
//! 400 from validation), and every request head the HTTP/1 server refused before routing (400,
//! 414, 431, …, see [`crate::http::server`]), as nginx logs its 400s: for those `service`, `color`
//! and `upstream` are null (`-` in combined), `method` and `path` are taken from the request line
//! as it was received (null when there is none) and the combined format shows that line as sent;
//! their Referer, User-Agent and client `X-Request-Id` come from the field lines of the refused
//! head that could be read ([`crate::http::server::Refused::field`]).
//!
//! The request path only fills an [`Entry`] (a few reference-count increments and one
//! allocation) and hands it to a bounded channel with `try_send` (the writer drains it in
//! batches, so the send wakes nobody while traffic flows); when the channel is full the
//! line is dropped and counted in `switchyard_access_log_dropped_total`, so a slow disk or a
//! blocked stderr never holds up a request. Lines lost to a failed write are counted there too,
//! and a line a failed write tore is cut off again or ended before the next ([`Writer::write`]). The line is written once the response body has ended
//! (or was abandoned): `bytes` is the body bytes handed to the client connection, `duration_ms`
//! runs from the request head to that end. A tunnel's `101` is written when the tunnel closes
//! ([`TunnelLine`]), with the bytes it carried to the client. With `[log] access = "off"` there is no log, no
//! entry and no request id: the request path does nothing more than before.
//!
//! `X-Request-Id`: a client's value is kept when it is 1 to 128 visible ASCII characters without
//! quotes or backslashes; otherwise one is generated from a per-process random prefix and a
//! counter (`5f3a9c21-00000000001a`). It is sent upstream and returned to the client.
//!
//! SIGUSR1 reopens a log file (after logrotate has renamed it).

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Version};
use http_body::{Body, Frame, SizeHint};
use prometheus::IntCounter;
use tokio::time::Instant;

use crate::config::{AccessFormat, AccessTarget, Color, LogConfig};
use crate::http::fields::{BodyFields, Fields};
use crate::http::h2_server::Replaced;
use crate::routing::Service;
use crate::upstream::Upstream;

pub const ACCESS_LOG_DROPPED_TOTAL: &str = "switchyard_access_log_dropped_total";
pub use crate::http::headers::X_REQUEST_ID;

/// Flushed to the sink once this much is buffered, and whenever the queue runs empty.
const WRITE_CHUNK: usize = 64 * 1024;
const MAX_CLIENT_ID: usize = 128;

/// A request's target as the log has it: its path and query, or, for an HTTP/1 request in
/// absolute form, the whole target as received (`http://host/path`; a path must begin with
/// `/`, so it is kept as text).
#[derive(Clone, Debug)]
pub enum Target {
    Path(PathAndQuery),
    Whole(String),
}

impl Target {
    pub fn as_str(&self) -> &str {
        match self {
            Target::Path(p) => p.as_str(),
            Target::Whole(s) => s,
        }
    }
}

/// What the request path learned about one request, completed when its response ends.
pub struct Entry {
    pub time: SystemTime,
    start: Instant,
    pub client: IpAddr,
    /// `None` for a request refused before it was parsed (see `line`).
    pub method: Option<Method>,
    pub target: Option<Target>,
    pub version: Version,
    /// The request line as received, for a request the HTTP/1 server refused before it was
    /// parsed: its method and target are logged from it.
    pub line: Option<Bytes>,
    pub status: u16,
    pub bytes: u64,
    pub duration: Duration,
    pub service: Option<Arc<Service>>,
    pub color: Option<Color>,
    pub upstream: Option<Arc<Upstream>>,
    pub request_id: HeaderValue,
    /// `combined` only.
    pub referer: Option<HeaderValue>,
    pub user_agent: Option<HeaderValue>,
    /// A tunnel's `101`: the line goes to the tunnel when the response ends, unless the server
    /// answered something else in its place. Here, not on every response body: only a logged
    /// request carries it.
    pub tunnel: Option<ToTunnel>,
}

/// Where the request path records its routing decisions for the log.
#[derive(Default)]
pub struct Routed {
    pub service: Option<Arc<Service>>,
    pub color: Option<Color>,
    pub upstream: Option<Arc<Upstream>>,
    /// Set when the response is a tunnel's `101`: its line goes to the tunnel, written when it
    /// closes.
    pub tunnel: Option<ToTunnel>,
}

/// A line on its way to the tunnel that will write it.
type Line = (Arc<AccessLog>, Box<Entry>);

/// The request's side of a tunnel's line: its `101` is logged when the tunnel closes (with
/// the bytes it carried to the client and its whole duration, as nginx and HAProxy log a
/// WebSocket), not when the head is written.
pub struct ToTunnel(tokio::sync::oneshot::Sender<Line>);

/// The tunnel's side: writes the line it was handed when dropped, whichever way the tunnel
/// ended (either side closed, the idle timeout, the shutdown's cut, an upgrade that failed).
pub struct TunnelLine {
    line: tokio::sync::oneshot::Receiver<Line>,
    /// Bytes written to the client through the tunnel.
    pub to_client: AtomicU64,
}

impl TunnelLine {
    pub fn new() -> (ToTunnel, TunnelLine) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let line = TunnelLine {
            line: rx,
            to_client: AtomicU64::new(0),
        };
        (ToTunnel(tx), line)
    }
}

impl Drop for TunnelLine {
    fn drop(&mut self) {
        // Closed first: a line sent after this comes back to its sender, which writes it.
        self.line.close();
        if let Ok((log, mut entry)) = self.line.try_recv() {
            entry.bytes += self.to_client.load(Ordering::Relaxed);
            entry.duration = Instant::now().saturating_duration_since(entry.start);
            log.send(entry);
        }
    }
}

enum Msg {
    Line(Box<Entry>),
    /// Reopen the file (SIGUSR1); also signalled through `reopen` in case the queue is full.
    Reopen,
    /// Flush and answer (shutdown).
    Flush(std::sync::mpsc::Sender<()>),
}

/// The access log's handle: the queue's sending end.
pub struct AccessLog {
    tx: SyncSender<Msg>,
    reopen: Arc<AtomicBool>,
    dropped: IntCounter,
    format: AccessFormat,
}

/// `X-Request-Id` values: a random per-process prefix and a counter, in hex.
pub struct RequestIds {
    prefix: u32,
    next_id: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        RequestIds {
            prefix: fastrand::u32(..),
            next_id: AtomicU64::new(1),
        }
    }
}

impl RequestIds {
    /// The client's `X-Request-Id` when it is usable, or a fresh one. Marked sensitive: HPACK
    /// sends it as a literal never indexed (RFC 7541 6.2.3), as a value unique to one response
    /// should be, instead of adding it to the dynamic table and evicting what repeats.
    pub fn id(&self, client: Option<&HeaderValue>) -> HeaderValue {
        let mut id = match client.filter(|v| usable_id(v.as_bytes())) {
            Some(v) => v.clone(),
            None => {
                let n = self.next_id.fetch_add(1, Ordering::Relaxed);
                let mut buf = [0u8; 21];
                hex(&mut buf[..8], self.prefix as u64);
                buf[8] = b'-';
                hex(&mut buf[9..], n);
                HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("-"))
            }
        };
        id.set_sensitive(true);
        id
    }
}

impl AccessLog {
    /// Opens the sink and starts the writer thread; None when the log is off.
    pub fn start(
        cfg: &LogConfig,
        registry: &prometheus::Registry,
    ) -> std::io::Result<Option<Arc<AccessLog>>> {
        if cfg.access == AccessTarget::Off {
            return Ok(None);
        }
        let sink = Sink::open(&cfg.access)?;
        let dropped = IntCounter::new(
            ACCESS_LOG_DROPPED_TOTAL,
            "Access log lines dropped because the writer's queue was full, or lost to a failed write.",
        )
        .map_err(std::io::Error::other)?;
        // A registry shared with an earlier log (tests) already has it: this one is not scraped.
        let _ = registry.register(Box::new(dropped.clone()));
        let (tx, rx) = std::sync::mpsc::sync_channel(cfg.access_buffer);
        let reopen = Arc::new(AtomicBool::new(false));
        let (format, flag) = (cfg.access_format, reopen.clone());
        let counter = dropped.clone();
        std::thread::Builder::new()
            .name("switchyard-access-log".to_string())
            .spawn(move || write_loop(rx, sink, format, flag, counter))?;
        Ok(Some(Arc::new(AccessLog {
            tx,
            reopen,
            dropped,
            format: cfg.access_format,
        })))
    }

    /// Asks the writer to reopen its file (SIGUSR1). Never blocks.
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
        let _ = self.tx.try_send(Msg::Reopen);
    }

    /// Waits (at most `timeout`, off the runtime) until every queued line is written. A sink
    /// that takes nothing (a pipe nobody reads, a hung mount) keeps the queue full: the wait
    /// for room in it is bounded too, so a stopping process still stops.
    pub fn flush(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        let (tx, rx) = std::sync::mpsc::channel();
        let mut msg = Msg::Flush(tx);
        loop {
            match self.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return,
                Err(TrySendError::Full(m)) => {
                    if tokio::time::Instant::now() >= deadline {
                        return;
                    }
                    msg = m;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        let _ = rx.recv_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
    }

    /// The entry for a request that has just arrived.
    #[allow(clippy::too_many_arguments)]
    pub fn entry(
        &self,
        start: Instant,
        client: IpAddr,
        method: Method,
        target: Option<Target>,
        version: Version,
        request_id: HeaderValue,
        headers: &http::HeaderMap,
    ) -> Box<Entry> {
        let (referer, user_agent) = match self.format {
            AccessFormat::Combined => (
                headers.get(http::header::REFERER).cloned(),
                headers.get(http::header::USER_AGENT).cloned(),
            ),
            AccessFormat::Json => (None, None),
        };
        Box::new(Entry {
            time: SystemTime::now(),
            start,
            client,
            method: Some(method),
            target,
            version,
            line: None,
            status: 0,
            bytes: 0,
            duration: Duration::ZERO,
            service: None,
            color: None,
            upstream: None,
            request_id,
            referer,
            user_agent,
            tunnel: None,
        })
    }

    /// The entry for a request head the HTTP/1 server refused (`line`: its request line as
    /// received, when there is one), answered with `status`; `field` reads the fields of the
    /// refused head that could be parsed (Referer and User-Agent, for combined).
    pub fn refused_entry(
        &self,
        client: IpAddr,
        line: Option<Bytes>,
        status: u16,
        request_id: HeaderValue,
        field: impl Fn(&HeaderName) -> Option<HeaderValue>,
    ) -> Box<Entry> {
        let (referer, user_agent) = match self.format {
            AccessFormat::Combined => (
                field(&http::header::REFERER),
                field(&http::header::USER_AGENT),
            ),
            AccessFormat::Json => (None, None),
        };
        Box::new(Entry {
            time: SystemTime::now(),
            start: Instant::now(),
            client,
            method: None,
            target: None,
            version: Version::HTTP_11,
            line,
            status,
            bytes: 0,
            duration: Duration::ZERO,
            service: None,
            color: None,
            upstream: None,
            request_id,
            referer,
            user_agent,
            tunnel: None,
        })
    }

    fn send(&self, entry: Box<Entry>) {
        match self.tx.try_send(Msg::Line(entry)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

fn usable_id(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= MAX_CLIENT_ID
        && v.iter()
            .all(|b| b.is_ascii_graphic() && *b != b'"' && *b != b'\\')
}

fn hex(out: &mut [u8], mut n: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n & 0xf) as usize];
        n >>= 4;
    }
}

/// A response body that counts the bytes it hands out and logs its request when it is dropped
/// (the end of the response, whether complete, failed or abandoned by the client).
pub struct Logged<B> {
    inner: B,
    tap: Option<Line>,
}

impl<B> Logged<B> {
    /// No access log: the body as it is.
    pub fn off(inner: B) -> Logged<B> {
        Logged { inner, tap: None }
    }

    pub fn new(inner: B, log: Arc<AccessLog>, entry: Box<Entry>) -> Logged<B> {
        Logged {
            inner,
            tap: Some((log, entry)),
        }
    }

    /// The same body, logged with `entry` when it ends (or, for a tunnel's `101`, when the
    /// tunnel closes: [`Entry::tunnel`]).
    pub fn with_log(mut self, log: Arc<AccessLog>, entry: Box<Entry>) -> Logged<B> {
        self.tap = Some((log, entry));
        self
    }
}

impl<B> Logged<B> {
    /// The client got another answer than this body's response (`status`, `bytes` of body):
    /// the line says so, and is written now.
    pub fn answered(mut self, status: u16, bytes: u64) {
        if let Some((_, entry)) = self.tap.as_mut() {
            entry.status = status;
            entry.bytes = bytes;
        }
    }
}

impl<B: BodyFields> BodyFields for Logged<B> {
    fn fields(&self) -> Option<&Fields> {
        self.inner.fields()
    }
}

/// The h2 server sent `status` in place of the response's head: the line says so (no body
/// bytes), and the body below records it too.
impl<B: Replaced> Replaced for Logged<B> {
    fn replaced(&mut self, status: http::StatusCode) {
        if let Some((_, entry)) = self.tap.as_mut() {
            entry.status = status.as_u16();
            entry.bytes = 0;
        }
        self.inner.replaced(status);
    }
}

impl<B> Drop for Logged<B> {
    fn drop(&mut self) {
        if let Some((log, mut entry)) = self.tap.take() {
            // A 101 (not replaced by another answer): the tunnel writes the line when it closes,
            // or hands it back, already closed. A client gone before the 101 reached it is
            // logged as 101 with no bytes, as before the tunnel wrote the lines.
            let (log, mut entry) = match entry.tunnel.take() {
                Some(ToTunnel(tx)) if entry.status == 101 => match tx.send((log, entry)) {
                    Ok(()) => return,
                    Err(line) => line,
                },
                _ => (log, entry),
            };
            entry.duration = Instant::now().saturating_duration_since(entry.start);
            log.send(entry);
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Logged<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some((_, entry))) = (&polled, this.tap.as_mut()) {
            if let Some(data) = frame.data_ref() {
                entry.bytes += data.len() as u64;
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Where lines go. Every variant writes straight to its file descriptor (no buffer of std's in
/// between), so the writer knows which bytes reached it when a write fails.
enum Sink {
    Stderr,
    /// A duplicate of fd 1; None when stdout is closed (lines go nowhere, as with std's stdout).
    Stdout(Option<std::fs::File>),
    File(PathBuf, std::fs::File),
    #[cfg(test)]
    Test(Box<dyn Write + Send>),
}

impl Sink {
    fn open(target: &AccessTarget) -> std::io::Result<Sink> {
        Ok(match target {
            AccessTarget::Off | AccessTarget::Stderr => Sink::Stderr,
            AccessTarget::Stdout => {
                use std::os::fd::AsFd;
                let fd = std::io::stdout().as_fd().try_clone_to_owned();
                Sink::Stdout(fd.ok().map(std::fs::File::from))
            }
            AccessTarget::File(p) => Sink::File(p.clone(), open_append(p)?),
        })
    }

    /// One `write(2)`: how many bytes of `buf` the sink took.
    fn write_some(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Stderr => std::io::stderr().lock().write(buf),
            Sink::Stdout(Some(f)) | Sink::File(_, f) => f.write(buf),
            Sink::Stdout(None) => Ok(buf.len()),
            #[cfg(test)]
            Sink::Test(w) => w.write(buf),
        }
    }

    /// Writes `buf` whole, or says how much of it was written before the error.
    fn write_all(&mut self, buf: &[u8]) -> Result<(), (usize, std::io::Error)> {
        let mut done = 0;
        while done < buf.len() {
            match self.write_some(&buf[done..]) {
                Ok(0) => return Err((done, std::io::ErrorKind::WriteZero.into())),
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err((done, e)),
            }
        }
        Ok(())
    }

    /// A failed write left `tail` (the start of a line) at the end of the file: cut it off, when
    /// the file still ends with it (after copytruncate it does not, and the file is left alone).
    /// True when the file ends with a complete line again.
    fn cut(&mut self, tail: &[u8]) -> bool {
        let Sink::File(_, f) = self else {
            return false;
        };
        let Ok(len) = f.metadata().map(|m| m.len()) else {
            return false;
        };
        let Some(at) = len.checked_sub(tail.len() as u64) else {
            return false;
        };
        let mut end = vec![0u8; tail.len()];
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut end, at).is_ok() && end == tail && f.set_len(at).is_ok()
    }

    /// Whether a line torn by a failed write may still be at the end of what was written: not
    /// when the file is empty (copytruncate emptied it since).
    fn may_be_torn(&self) -> bool {
        match self {
            Sink::File(_, f) => f.metadata().map_or(true, |m| m.len() > 0),
            _ => true,
        }
    }

    /// After logrotate's rename: the next lines go to a new file at the configured path.
    fn reopen(&mut self) {
        if let Sink::File(path, f) = self {
            match open_append(path) {
                Ok(new) => {
                    *f = new;
                    tracing::info!(path = %path.display(), "access log reopened");
                }
                Err(e) => tracing::error!(
                    path = %path.display(), error = %e,
                    "cannot reopen the access log; still writing to the old file"
                ),
            }
        }
    }
}

/// Opened for reading too when it may be (to check the end of the file before cutting a torn
/// line off it, [`Sink::cut`]); only for appending when not.
fn open_append(p: &std::path::Path) -> std::io::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.create(true).append(true);
    match opts.clone().read(true).open(p) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => opts.open(p),
        r => r,
    }
    .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))
}

/// Whether an existing access log opens as the writer will open it ([`open_append`]), for
/// `check` and the start of `serve`: never blocking, where a FIFO with no reader opened for
/// writing alone would block the caller until one comes.
pub fn opens(p: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    // A FIFO is not opened at all: a reader already waiting on it would read the end of the
    // stream as this probe closes it, and stop before the writer comes. Write permission is
    // what the writer needs.
    if std::fs::metadata(p).is_ok_and(|m| m.file_type().is_fifo()) {
        return rustix::fs::access(p, rustix::fs::Access::WRITE_OK).map_err(std::io::Error::from);
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.append(true);
    match opts.clone().read(true).open(p) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => opts
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(p),
        r => r,
    }
    .map(drop)
}

/// The writer thread. Under load it never blocks on the queue: it drains what is there, writes
/// it in one go, and sleeps [`BATCH_INTERVAL`], so a request's `try_send` never has to wake it
/// (no futex wake, no context switch per line). After [`IDLE_POLLS`] empty rounds it blocks on
/// the queue instead, so an idle proxy has an idle writer. Ends when every sender is gone.
fn write_loop(
    rx: Receiver<Msg>,
    mut sink: Sink,
    format: AccessFormat,
    reopen: Arc<AtomicBool>,
    dropped: IntCounter,
) {
    let mut w = Writer::new(dropped);
    let mut idle = 0u32;
    loop {
        let mut got = 0usize;
        let disconnected = loop {
            match rx.try_recv() {
                Ok(msg) => {
                    got += 1;
                    w.handle(&mut sink, msg, format);
                }
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        w.write(&mut sink);
        if reopen.swap(false, Ordering::AcqRel) {
            sink.reopen();
        }
        if disconnected {
            return;
        }
        if got > 0 {
            idle = 0;
        } else {
            idle += 1;
        }
        if idle < IDLE_POLLS {
            std::thread::sleep(BATCH_INTERVAL);
            continue;
        }
        match rx.recv() {
            Ok(msg) => {
                idle = 0;
                w.handle(&mut sink, msg, format);
            }
            Err(_) => return,
        }
    }
}

/// How long the writer sleeps between drains while lines keep coming.
const BATCH_INTERVAL: Duration = Duration::from_millis(10);
/// Empty drains (of [`BATCH_INTERVAL`]) before the writer blocks on the queue instead.
const IDLE_POLLS: u32 = 100;

struct Writer {
    buf: Vec<u8>,
    failing: bool,
    /// A failed write left part of a line in the sink that could not be cut off: the next write
    /// begins with a newline, so that no line is glued onto it.
    torn: bool,
    /// Lines lost to a failed write are counted here too.
    dropped: IntCounter,
    /// The date of the current second, formatted once: combined `01/Dec/2026:13:47:05 +0000`,
    /// JSON `2026-12-01T13:47:05` (the milliseconds are added per line).
    date: (u64, String),
}

impl Writer {
    fn new(dropped: IntCounter) -> Writer {
        Writer {
            buf: Vec::with_capacity(WRITE_CHUNK + 4096),
            failing: false,
            torn: false,
            dropped,
            date: (u64::MAX, String::new()),
        }
    }

    fn handle(&mut self, sink: &mut Sink, msg: Msg, format: AccessFormat) {
        match msg {
            Msg::Line(e) => {
                self.format(&e, format);
                if self.buf.len() >= WRITE_CHUNK {
                    self.write(sink);
                }
            }
            // The flag is checked after each drain.
            Msg::Reopen => {}
            Msg::Flush(done) => {
                self.write(sink);
                let _ = done.send(());
            }
        }
    }

    /// Writes the buffered lines. When the write fails, every line not written whole is counted
    /// in the dropped counter; a line written in part is cut off the file again when it can be
    /// ([`Sink::cut`]), otherwise the next write begins with a newline, so that no later line
    /// is glued onto the torn one.
    fn write(&mut self, sink: &mut Sink) {
        if self.buf.is_empty() {
            return;
        }
        // Every line in the buffer ends with its newline (and has no other).
        let written = match self.torn && sink.may_be_torn() {
            true => sink.write_all(b"\n").map_err(|(_, e)| (0, e)),
            false => Ok(()),
        }
        .and_then(|()| {
            self.torn = false;
            sink.write_all(&self.buf)
        });
        match written {
            Ok(()) => self.failing = false,
            Err((done, e)) => {
                let lost = self.buf[done..].iter().filter(|b| **b == b'\n').count();
                self.dropped.inc_by(lost as u64);
                let begun = self.buf[..done]
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |i| i + 1);
                if begun < done && !sink.cut(&self.buf[begun..done]) {
                    self.torn = true;
                }
                if !self.failing {
                    self.failing = true;
                    tracing::error!(error = %e, "cannot write the access log; lines are lost (and counted) until it works again");
                }
            }
        }
        self.buf.clear();
    }

    fn format(&mut self, e: &Entry, format: AccessFormat) {
        let secs = e
            .time
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if self.date.0 != secs {
            let date = match format {
                AccessFormat::Combined => combined_date(e.time),
                AccessFormat::Json => {
                    let mut d = humantime::format_rfc3339_seconds(e.time).to_string();
                    d.pop(); // the `Z`
                    d
                }
            };
            self.date = (secs, date);
        }
        format_line(&mut self.buf, e, format, &self.date.1);
    }
}

/// `01/Dec/2026:13:47:05 +0000` (from `Tue, 01 Dec 2026 13:47:05 GMT`).
fn combined_date(t: SystemTime) -> String {
    let d = httpdate::fmt_http_date(t);
    match (d.get(5..7), d.get(8..11), d.get(12..16), d.get(17..25)) {
        (Some(day), Some(mon), Some(year), Some(time)) => {
            format!("{day}/{mon}/{year}:{time} +0000")
        }
        _ => d,
    }
}

/// One line in `format`, newline included; `date` is the line's second, formatted for it
/// (`2026-12-01T13:47:05` for JSON, `01/Dec/2026:13:47:05 +0000` for combined).
pub fn format_line(out: &mut Vec<u8>, e: &Entry, format: AccessFormat, date: &str) {
    // A refused request: method and target as the request line has them (its first two words).
    let (raw_method, raw_target) = match &e.line {
        Some(line) => {
            let mut words = line
                .split(|b| *b == b' ' || *b == b'\t')
                .filter(|w| !w.is_empty());
            (words.next(), words.next())
        }
        None => (None, None),
    };
    let target = e.target.as_ref().map_or("/", Target::as_str);
    let service = e.service.as_ref().map(|s| s.name());
    let color = e.color.map(Color::as_str);
    let upstream = e.upstream.as_ref().map(|u| u.addr_label.as_str());
    let request_id = e.request_id.to_str().unwrap_or("-");
    let micros = e.duration.as_micros() as u64;
    let duration_ms = (micros as f64) / 1000.0;
    let mut num = itoa::Buffer::new();
    match format {
        AccessFormat::Json => {
            // Written by hand, without the formatting machinery where it is easy: this runs
            // once per request (BENCHMARKS.md, "access log").
            out.extend_from_slice(b"{\"time\":\"");
            out.extend_from_slice(date.as_bytes());
            let millis = e
                .time
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_millis());
            out.push(b'.');
            out.extend_from_slice(&three_digits(millis as u64));
            out.extend_from_slice(b"Z\",\"client\":\"");
            let _ = write!(out, "{}", e.client);
            out.extend_from_slice(b"\",\"method\":");
            match (&e.method, e.line.is_some()) {
                (Some(m), _) => json_str(out, Some(m.as_str())),
                (None, true) => json_bytes(out, raw_method),
                (None, false) => json_str(out, None),
            }
            out.extend_from_slice(b",\"path\":");
            match e.line.is_some() {
                false => json_str(out, Some(target)),
                true => json_bytes(out, raw_target),
            }
            out.extend_from_slice(b",\"status\":");
            out.extend_from_slice(num.format(e.status).as_bytes());
            out.extend_from_slice(b",\"bytes\":");
            out.extend_from_slice(num.format(e.bytes).as_bytes());
            out.extend_from_slice(b",\"duration_ms\":");
            out.extend_from_slice(num.format(micros / 1000).as_bytes());
            out.push(b'.');
            out.extend_from_slice(&three_digits(micros % 1000));
            out.extend_from_slice(b",\"service\":");
            json_str(out, service);
            out.extend_from_slice(b",\"color\":");
            json_str(out, color);
            out.extend_from_slice(b",\"upstream\":");
            json_str(out, upstream);
            out.extend_from_slice(b",\"request_id\":");
            json_str(out, Some(request_id));
            out.extend_from_slice(b"}\n");
        }
        AccessFormat::Combined => {
            let _ = write!(out, "{} - - [{date}] \"", e.client);
            match (&e.method, &e.line) {
                (Some(m), _) => {
                    let _ = write!(out, "{} ", m.as_str());
                    escaped(out, target.as_bytes());
                    let _ = write!(out, " {:?}", e.version);
                }
                // As nginx logs `$request` for a request it refused: the line as sent.
                (None, Some(line)) if !line.is_empty() => escaped(out, line),
                (None, _) => out.push(b'-'),
            }
            let _ = write!(out, "\" {} {} \"", e.status, e.bytes);
            quoted_or_dash(out, e.referer.as_ref());
            out.extend_from_slice(b"\" \"");
            quoted_or_dash(out, e.user_agent.as_ref());
            let _ = writeln!(
                out,
                "\" rt={duration_ms:.3} service={} color={} upstream={} request_id={request_id}",
                service.unwrap_or("-"),
                color.unwrap_or("-"),
                upstream.unwrap_or("-"),
            );
        }
    }
}

fn three_digits(n: u64) -> [u8; 3] {
    [
        b'0' + (n / 100 % 10) as u8,
        b'0' + (n / 10 % 10) as u8,
        b'0' + (n % 10) as u8,
    ]
}

/// A JSON string (or null): plain printable ASCII is copied, anything else escaped by serde_json.
fn json_str(out: &mut Vec<u8>, v: Option<&str>) {
    match v {
        Some(s)
            if s.bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\') =>
        {
            out.push(b'"');
            out.extend_from_slice(s.as_bytes());
            out.push(b'"');
        }
        Some(s) => {
            let _ = serde_json::to_writer(&mut *out, s);
        }
        None => out.extend_from_slice(b"null"),
    }
}

/// Bytes from a request line as a JSON string, or null. A byte that is not UTF-8 is written
/// `%HH`, as a request target would carry it, so the line keeps what was sent (U+FFFD would
/// not say which bytes; the combined format writes them `\xHH`).
fn json_bytes(out: &mut Vec<u8>, v: Option<&[u8]>) {
    let Some(b) = v else {
        return json_str(out, None);
    };
    let mut text = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        text.push_str(chunk.valid());
        for byte in chunk.invalid() {
            let _ = std::fmt::Write::write_fmt(&mut text, format_args!("%{byte:02X}"));
        }
    }
    json_str(out, Some(&text));
}

fn quoted_or_dash(out: &mut Vec<u8>, v: Option<&HeaderValue>) {
    match v {
        Some(v) if !v.is_empty() => escaped(out, v.as_bytes()),
        _ => out.push(b'-'),
    }
}

/// As nginx escapes variables in its logs: `"`, `\` and bytes outside printable ASCII as `\xHH`.
fn escaped(out: &mut Vec<u8>, v: &[u8]) {
    for &b in v {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            let _ = write!(out, "\\x{b:02X}");
        } else {
            out.push(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kept or generated, an id is sensitive: HPACK never indexes a value unique to one
    /// response (it would evict what repeats from the dynamic table).
    #[test]
    fn request_ids_are_kept_or_made_and_never_indexed() {
        let ids = RequestIds::default();
        let made = ids.id(None);
        let next = ids.id(None);
        assert!(made.is_sensitive() && next.is_sensitive());
        assert_ne!(made, next);
        assert_eq!(made.len(), 21);
        let kept = ids.id(Some(&HeaderValue::from_static("abc-1")));
        assert_eq!(
            (kept.to_str().ok(), kept.is_sensitive()),
            (Some("abc-1"), true)
        );
        let replaced = ids.id(Some(&HeaderValue::from_static("a\"b")));
        assert_eq!(replaced.len(), 21);
    }

    #[test]
    fn ids_are_checked_and_generated() {
        assert!(usable_id(b"abc-123"));
        assert!(!usable_id(b""));
        assert!(!usable_id(b"a b"));
        assert!(!usable_id(b"a\"b"));
        assert!(!usable_id(&[b'a'; 129]));
        let mut buf = [0u8; 4];
        hex(&mut buf, 0x1a);
        assert_eq!(&buf, b"001a");
    }

    #[test]
    fn json_line_parses() {
        let e = Entry {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_596_825_007),
            start: Instant::now(),
            client: "10.0.0.7".parse().expect("ip"),
            method: Some(Method::from_bytes(b"PURGE").expect("method")),
            target: Some(Target::Path(PathAndQuery::from_static("/a/%22b?c=d"))),
            version: Version::HTTP_11,
            line: None,
            status: 503,
            bytes: 42,
            duration: Duration::from_micros(1_234_567),
            service: None,
            color: Some(Color::Green),
            upstream: None,
            request_id: HeaderValue::from_static("id-1"),
            referer: None,
            user_agent: None,
            tunnel: None,
        };
        let mut w = Writer::new(IntCounter::new("d", "d").expect("counter"));
        w.format(&e, AccessFormat::Json);
        let v: serde_json::Value = serde_json::from_slice(&w.buf).expect("json");
        assert_eq!(v["time"], "2025-12-01T13:47:05.007Z");
        assert_eq!(v["duration_ms"], 1234.567);
        assert_eq!(v["method"], "PURGE");
        assert_eq!(v["path"], "/a/%22b?c=d");
        assert_eq!(v["status"], 503);
        assert_eq!(v["service"], serde_json::Value::Null);
        assert_eq!(v["color"], "green");
        let mut out = Vec::new();
        json_str(&mut out, Some("é\"\n"));
        assert_eq!(
            serde_json::from_slice::<String>(&out).expect("json"),
            "é\"\n"
        );
    }

    /// A sink that takes `room` bytes, then fails (ENOSPC) until `room` is raised again.
    #[derive(Clone, Default)]
    struct Disk {
        data: Arc<std::sync::Mutex<Vec<u8>>>,
        room: Arc<AtomicU64>,
    }

    impl Write for Disk {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let room = self.room.load(Ordering::SeqCst) as usize;
            let n = buf.len().min(room);
            if n == 0 {
                return Err(std::io::Error::from_raw_os_error(28));
            }
            self.room.fetch_sub(n as u64, Ordering::SeqCst);
            self.data.lock().expect("lock").extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Three lines of `tag`, 39 bytes each, newline included.
    fn three(w: &mut Writer, tag: char) {
        for _ in 0..3 {
            let line = format!("{{\"n\":\"{}\"}}\n", tag.to_string().repeat(30));
            assert_eq!(line.len(), 39);
            w.buf.extend_from_slice(line.as_bytes());
        }
    }

    /// A write that fails part way (a full disk): every line not written whole is counted as
    /// dropped, and the next line written is not glued onto the one torn in the middle.
    #[test]
    fn a_failed_write_counts_its_lines_and_glues_nothing() {
        let disk = Disk::default();
        let dropped = IntCounter::new("d", "d").expect("counter");
        let mut w = Writer::new(dropped.clone());
        let mut sink = Sink::Test(Box::new(disk.clone()));
        // Room for one line and a half: the second is torn, the third never written.
        disk.room.store(39 + 20, Ordering::SeqCst);
        three(&mut w, 'a');
        w.write(&mut sink);
        assert_eq!(dropped.get(), 2);
        // Still full: all three lost.
        three(&mut w, 'b');
        w.write(&mut sink);
        assert_eq!(dropped.get(), 5);
        // Room again: the torn line is ended before the next line.
        disk.room.store(1 << 20, Ordering::SeqCst);
        three(&mut w, 'c');
        w.write(&mut sink);
        assert_eq!(dropped.get(), 5);
        let data = String::from_utf8(disk.data.lock().expect("lock").clone()).expect("utf-8");
        let lines: Vec<&str> = data.lines().collect();
        assert_eq!(lines.len(), 5, "{data:?}");
        assert!(lines[0].contains("aaa") && lines[1].len() == 20, "{data:?}");
        for l in [lines[0], lines[2], lines[3], lines[4]] {
            serde_json::from_str::<serde_json::Value>(l).expect("a whole line");
        }
        assert!(data.ends_with('\n'));
    }

    /// In a file, the torn part of a line is cut off when the file still ends with it, and the
    /// file is left alone when it does not (copytruncate emptied it since).
    #[test]
    fn a_torn_line_is_cut_off_a_file_that_still_ends_with_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("access.log");
        std::fs::write(&path, "{\"a\":1}\n{\"b\"").expect("write");
        let mut sink = Sink::File(path.clone(), open_append(&path).expect("open"));
        assert!(!sink.cut(b"{\"c\""));
        assert!(sink.cut(b"{\"b\""));
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "{\"a\":1}\n");
        assert!(sink.may_be_torn());
        std::fs::write(&path, "").expect("truncate");
        assert!(!sink.cut(b"{\"b\""));
        assert!(!sink.may_be_torn());
    }

    /// A refused request line's bytes that are not UTF-8 are kept as `%HH` in a JSON line
    /// (they were replaced by U+FFFD, which says nothing of what was sent).
    #[test]
    fn json_keeps_bytes_that_are_not_utf8_as_percent_escapes() {
        let mut out = Vec::new();
        json_bytes(&mut out, Some(b"/ok\xff\xfe/\xc3\xa9\"q"));
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "\"/ok%FF%FE/\u{e9}\\\"q\""
        );
        let mut out = Vec::new();
        json_bytes(&mut out, None);
        assert_eq!(out, b"null");
    }

    #[test]
    fn combined_escapes() {
        let mut out = Vec::new();
        escaped(&mut out, b"a\"b\\c\x01");
        assert_eq!(out, b"a\\x22b\\x5Cc\\x01");
    }
}
