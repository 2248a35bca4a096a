//! The access log: one line per proxied request, formatted and written by a thread of its own.
//!
//! The request path only fills an [`Entry`] (a few reference-count increments and one
//! allocation) and hands it to a bounded channel with `try_send`; when the channel is full the
//! line is dropped and counted in `switchyard_access_log_dropped_total`, so a slow disk or a
//! blocked stderr never holds up a request. The line is written once the response body has ended
//! (or was abandoned): `bytes` is the body bytes handed to the client connection, `duration_ms`
//! runs from the request head to that end. With `[log] access = "off"` there is no log, no
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
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
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
use crate::routing::Service;
use crate::upstream::Upstream;

pub const ACCESS_LOG_DROPPED_TOTAL: &str = "switchyard_access_log_dropped_total";
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Flushed to the sink once this much is buffered, and whenever the queue runs empty.
const WRITE_CHUNK: usize = 64 * 1024;
const MAX_CLIENT_ID: usize = 128;

/// What the request path learned about one request, completed when its response ends.
pub struct Entry {
    pub time: SystemTime,
    start: Instant,
    pub client: IpAddr,
    pub method: Method,
    pub target: Option<PathAndQuery>,
    pub version: Version,
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
}

/// Where the request path records its routing decisions for the log.
#[derive(Default)]
pub struct Routed {
    pub service: Option<Arc<Service>>,
    pub color: Option<Color>,
    pub upstream: Option<Arc<Upstream>>,
}

enum Msg {
    Line(Box<Entry>),
    /// Reopen the file (SIGUSR1); also signalled through `reopen` in case the queue is full.
    Reopen,
    /// Flush and answer (shutdown).
    Flush(std::sync::mpsc::Sender<()>),
}

/// The access log's handle: the queue's sending end and the request id generator.
pub struct AccessLog {
    tx: SyncSender<Msg>,
    reopen: Arc<AtomicBool>,
    dropped: IntCounter,
    format: AccessFormat,
    prefix: u32,
    next_id: AtomicU64,
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
            "Access log lines dropped because the writer's queue was full.",
        )
        .map_err(std::io::Error::other)?;
        // A registry shared with an earlier log (tests) already has it: this one is not scraped.
        let _ = registry.register(Box::new(dropped.clone()));
        let (tx, rx) = std::sync::mpsc::sync_channel(cfg.access_buffer);
        let reopen = Arc::new(AtomicBool::new(false));
        let (format, flag) = (cfg.access_format, reopen.clone());
        std::thread::Builder::new()
            .name("switchyard-access-log".to_string())
            .spawn(move || write_loop(rx, sink, format, flag))?;
        Ok(Some(Arc::new(AccessLog {
            tx,
            reopen,
            dropped,
            format: cfg.access_format,
            prefix: fastrand::u32(..),
            next_id: AtomicU64::new(1),
        })))
    }

    /// Asks the writer to reopen its file (SIGUSR1). Never blocks.
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
        let _ = self.tx.try_send(Msg::Reopen);
    }

    /// Waits (at most `timeout`, off the runtime) until every queued line is written.
    pub fn flush(&self, timeout: Duration) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(timeout);
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// The client's `X-Request-Id` when it is usable, or a fresh one.
    pub fn request_id(&self, client: Option<&HeaderValue>) -> HeaderValue {
        if let Some(v) = client.filter(|v| usable_id(v.as_bytes())) {
            return v.clone();
        }
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 21];
        hex(&mut buf[..8], self.prefix as u64);
        buf[8] = b'-';
        hex(&mut buf[9..], n);
        HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("-"))
    }

    /// The entry for a request that has just arrived.
    #[allow(clippy::too_many_arguments)]
    pub fn entry(
        &self,
        start: Instant,
        client: IpAddr,
        method: Method,
        target: Option<PathAndQuery>,
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
            method,
            target,
            version,
            status: 0,
            bytes: 0,
            duration: Duration::ZERO,
            service: None,
            color: None,
            upstream: None,
            request_id,
            referer,
            user_agent,
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
        && v
            .iter()
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
    tap: Option<(Arc<AccessLog>, Box<Entry>)>,
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
}

impl<B> Drop for Logged<B> {
    fn drop(&mut self) {
        if let Some((log, mut entry)) = self.tap.take() {
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

/// Where lines go.
enum Sink {
    Stderr,
    Stdout,
    File(PathBuf, std::fs::File),
}

impl Sink {
    fn open(target: &AccessTarget) -> std::io::Result<Sink> {
        Ok(match target {
            AccessTarget::Off | AccessTarget::Stderr => Sink::Stderr,
            AccessTarget::Stdout => Sink::Stdout,
            AccessTarget::File(p) => Sink::File(p.clone(), open_append(p)?),
        })
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stderr => std::io::stderr().lock().write_all(buf),
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(buf)?;
                out.flush()
            }
            Sink::File(_, f) => f.write_all(buf),
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

fn open_append(p: &std::path::Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))
}

/// The writer thread: formats what is queued, writes whole lines in chunks, flushes whenever
/// the queue runs empty. Ends when every sender is gone.
fn write_loop(rx: Receiver<Msg>, mut sink: Sink, format: AccessFormat, reopen: Arc<AtomicBool>) {
    let mut buf = Vec::with_capacity(WRITE_CHUNK + 4096);
    let mut failing = false;
    let mut write = |sink: &mut Sink, buf: &mut Vec<u8>| {
        if buf.is_empty() {
            return;
        }
        match sink.write_all(buf) {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::error!(error = %e, "cannot write the access log; lines are lost until it works again");
            }
            Err(_) => {}
        }
        buf.clear();
    };
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Line(e) => {
                    format_line(&mut buf, &e, format);
                    if buf.len() >= WRITE_CHUNK {
                        write(&mut sink, &mut buf);
                    }
                }
                Msg::Reopen => {}
                Msg::Flush(done) => {
                    write(&mut sink, &mut buf);
                    let _ = done.send(());
                }
            }
            next = rx.try_recv().ok();
        }
        write(&mut sink, &mut buf);
        if reopen.swap(false, Ordering::AcqRel) {
            sink.reopen();
        }
    }
    write(&mut sink, &mut buf);
}

/// One line in `format`, newline included.
pub fn format_line(out: &mut Vec<u8>, e: &Entry, format: AccessFormat) {
    let target = e.target.as_ref().map_or("/", |t| t.as_str());
    let service = e.service.as_ref().map(|s| s.name());
    let color = e.color.map(Color::as_str);
    let upstream = e.upstream.as_ref().map(|u| u.addr_label.as_str());
    let request_id = e.request_id.to_str().unwrap_or("-");
    let duration_ms = (e.duration.as_micros() as f64) / 1000.0;
    match format {
        AccessFormat::Json => {
            let line = serde_json::json!({
                "time": humantime::format_rfc3339_millis(e.time).to_string(),
                "client": e.client.to_string(),
                "method": e.method.as_str(),
                "path": target,
                "status": e.status,
                "bytes": e.bytes,
                "duration_ms": duration_ms,
                "service": service,
                "color": color,
                "upstream": upstream,
                "request_id": request_id,
            });
            let _ = serde_json::to_writer(&mut *out, &line);
            out.push(b'\n');
        }
        AccessFormat::Combined => {
            // `Tue, 01 Dec 2026 13:47:05 GMT` -> `01/Dec/2026:13:47:05 +0000`
            let date = httpdate::fmt_http_date(e.time);
            let p: Vec<&str> = date.split(' ').collect();
            let when = match p.as_slice() {
                [_, d, m, y, t, _] => format!("{d}/{m}/{y}:{t} +0000"),
                _ => date.clone(),
            };
            let _ = write!(
                out,
                "{} - - [{when}] \"{} ",
                e.client,
                e.method.as_str()
            );
            escaped(out, target.as_bytes());
            let _ = write!(out, " {:?}\" {} {} \"", e.version, e.status, e.bytes);
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
    fn combined_escapes() {
        let mut out = Vec::new();
        escaped(&mut out, b"a\"b\\c\x01");
        assert_eq!(out, b"a\\x22b\\x5Cc\\x01");
    }
}
