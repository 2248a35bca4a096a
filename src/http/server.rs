//! The client side of HTTP/1.1: one task per connection reads request heads, runs the
//! [`Handler`] for each request inline (generic, so the handler's future is part of the
//! connection's: no box, no channel), and writes the response back with vectored writes.
//!
//! Why not hyper's server (kept for h2 and the admin listener): hyper's HTTP/1 connection was
//! about 10k of the proxy's ~24k instructions per request (dispatcher, body channel, buffered
//! I/O), and it keeps a 16 KiB read buffer and an 8 KiB write buffer for each connection's whole
//! life. Here an idle connection holds no buffer at all: a request is first read into a stack
//! buffer and only then copied into a heap buffer sized for it, which is released once the
//! response has gone out.
//!
//! What it speaks: HTTP/1.1 and 1.0 requests (keep-alive and pipelining), bodies by
//! `Content-Length` or chunked (trailers kept), `Expect: 100-continue` (answered when the body
//! is first read, as nginx does), an upstream's other 1xx heads written ahead of the response
//! (HTTP/1.1 clients), and upgrades (the connection is handed to a tunnel after a `101`). It
//! refuses, with 400 and before anything reaches an upstream: what httparse refuses (obs-fold, a
//! space before the colon, NUL, lone CR, bad tokens), a bare LF line end, a target with a
//! fragment, `Content-Length` with `Transfer-Encoding`, differing or malformed lengths, any
//! `Transfer-Encoding` but a single `chunked`, and `Transfer-Encoding` in HTTP/1.0. A head larger
//! than `max_header_bytes` or with more than `max_headers` fields is 431; a request line alone
//! longer than that, or a target the URI type cannot hold, is 414 (501 when the method alone is). `header_read_timeout` bounds
//! both a head being received and an idle keep-alive connection waiting for its next request.
//!
//! The read and write halves are separate, so a request body can stream to the upstream while
//! the response streams back (an upstream that answers early). The body owns the read half while
//! it is read and hands it back at its end; a connection whose body was not read to its end is
//! closed after the response, lingering briefly so the client sees the response, not a reset.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

use super::codec::{
    self, decode_chunked, BadHeader, BodyFraming, ChunkState, Chunked, FramingError, FramingFields,
    InvalidChunked, Sender, Span,
};
use super::fields::BodyFields;
use super::headers::{is_underscore_lookalike, put_date, put_header};
use super::interim;
use super::{plain, CloseConnection};

/// What the server runs for each request, inline in the connection's task: the handler's
/// future is polled by the connection itself (monomorphised, never boxed per request).
pub trait Handler: Send + Sync + 'static {
    /// The request body as the handler takes it, made from the server's [`RequestBody`] when
    /// the request is built (no second pass over the request).
    type RequestBody: From<RequestBody> + Send;
    /// The response body; its error ends the response early (the connection closes).
    type Body: Body<Data = Bytes, Error: std::fmt::Display> + BodyFields + Send + Unpin + 'static;

    /// Answers one request. `on_upgrade` is there when the request asked to upgrade: it
    /// delivers the client's connection once a `101` answer has been written. While an
    /// HTTP/1.1 request's future is polled, 1xx heads can be offered to the client through
    /// [`interim::offer`].
    fn call(
        &self,
        req: Request<Self::RequestBody>,
        on_upgrade: Option<OnUpgrade>,
    ) -> impl Future<Output = Response<Self::Body>> + Send;

    /// Whether the server is shutting down: the response being written is the connection's
    /// last.
    fn shutting_down(&self) -> bool;

    /// Completes once the server shuts down (an idle connection then closes soon).
    fn until_shutdown(&self) -> impl Future<Output = ()> + Send;

    /// A request head was refused for a framing fault that a lenient parser would let through
    /// (request smuggling); `reason` is `"bare_lf"` or `"cl_te"`.
    fn refused(&self, reason: &'static str) {
        let _ = reason;
    }

    /// The client closed its connection before its response was ready.
    fn client_closed(&self) {}

    /// The server is about to answer a request head it refused (`refused.status`, the plain
    /// `refused.why`); the handler may make that answer itself (the proxy adds its request id and
    /// writes the access log line from the request line and the fields that could be read).
    /// `None`: the server answers with the text as it is.
    fn refusal(&self, refused: &Refused) -> Option<Response<Self::Body>> {
        let _ = refused;
        None
    }

    /// The server could not send the handler's `resp` (a `101` before the request body was all
    /// read) and answered `status` with a `bytes`-byte body instead; `resp` ends here. The proxy
    /// logs what the client got.
    fn replaced(&self, resp: Response<Self::Body>, status: StatusCode, bytes: u64) {
        let _ = (resp, status, bytes);
    }
}

pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
pub type BoxWrite = Box<dyn super::io::WriteHalf>;

/// Header slots on the stack; a request with more (up to `max_headers`) is parsed again with
/// slots on the heap.
const STACK_HEADERS: usize = 64;
/// What an idle connection reads into before it has a buffer (on the stack of the poll).
const FIRST_READ: usize = 4096;
/// Reads while a body streams start here and double while they fill, up to `MAX_READ`.
const READ_CHUNK: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;
/// Most buffers one `writev` toward the client takes.
const WRITE_SLICES: usize = 16;
/// Output queued before it is written even though the body has more ready.
const MAX_QUEUED: usize = 64 * 1024;
/// After an error or an unread body: how long the connection keeps reading (and discarding)
/// after its last response before it closes, so the client reads the response, not a reset.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 256 * 1024;

/// The per-listener settings a connection needs, read once when it is accepted.
#[derive(Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_headers: usize,
    pub max_header_bytes: usize,
}

/// A connection's settings: its limits, and how long a connection that is idle when shutdown
/// begins is kept for a request already on its way.
#[derive(Clone, Copy)]
pub struct Settings {
    pub limits: Limits,
    pub idle_at_shutdown: Duration,
}

/// The read half of a client connection and what has been read but not used yet.
pub struct Reader {
    io: BoxRead,
    buf: BytesMut,
    read_size: usize,
}

impl Reader {
    pub fn new(io: BoxRead, buf: BytesMut) -> Reader {
        Reader {
            io,
            buf,
            read_size: READ_CHUNK,
        }
    }

    /// Reads what the socket has; `Ok(0)` is end of stream. Without a buffer (an idle
    /// connection) the read lands on the stack and a buffer of about its size is made only
    /// when bytes arrive.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() == 0 {
            return self.poll_probe::<FIRST_READ>(cx);
        }
        let want = self.read_size;
        super::io::poll_fill(
            &mut *self.io,
            &mut self.buf,
            want,
            &mut self.read_size,
            MAX_READ,
            cx,
        )
    }

    /// Reads onto the stack and appends what came, for reads that mostly find nothing (an
    /// idle connection, a connection watched while its request is served): no buffer is made
    /// or grown for them.
    fn poll_probe<const N: usize>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut tmp = [MaybeUninit::<u8>::uninit(); N];
        let mut rb = ReadBuf::uninit(&mut tmp);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
        let got = rb.filled();
        if !got.is_empty() {
            if self.buf.capacity() == 0 {
                self.buf = BytesMut::with_capacity(got.len().max(1024));
            }
            self.buf.extend_from_slice(got);
        }
        Poll::Ready(Ok(got.len()))
    }

    /// Reads body bytes when `want` more are expected (what is left of a body's length or of
    /// its current chunk). The read is sized for them, up to `MAX_READ`, so that a body already
    /// in the socket comes in one read. Without this, a body whose every piece empties the
    /// buffer (its capacity then 0) was read 4 KiB at a time onto the stack, one upstream write
    /// each.
    fn poll_fill_body(&mut self, cx: &mut Context<'_>, want: u64) -> Poll<io::Result<usize>> {
        let want = match usize::try_from(want) {
            Ok(0) => self.read_size,
            Ok(n) => n.min(MAX_READ),
            Err(_) => MAX_READ,
        };
        super::io::poll_fill(
            &mut *self.io,
            &mut self.buf,
            want,
            &mut self.read_size,
            MAX_READ,
            cx,
        )
    }

    /// Between requests: nothing buffered means no buffer is kept.
    fn release(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
            self.read_size = READ_CHUNK;
        }
    }
}

/// Why a request head was refused; answered and then the connection closes.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub status: StatusCode,
    pub why: &'static str,
    /// The `reason` label of `switchyard_rejected_requests_total`, for the framing faults that
    /// a lenient parser would let through (request smuggling).
    pub metric: Option<&'static str>,
    /// The request line as received (at most [`MAX_LOGGED_LINE`] bytes), for the access log;
    /// `None` when nothing but line ends arrived.
    pub line: Option<Bytes>,
    /// The refused head as received (at most [`MAX_KEPT_HEAD`] bytes when it had to be copied),
    /// for [`Refused::field`]; empty when there is none.
    pub head: Bytes,
}

impl Refused {
    /// The same, with the request line and the head taken from `head` (the bytes the refused
    /// head starts with, still in the read buffer: copied), unless it has them already.
    fn with_head(mut self, head: &[u8]) -> Refused {
        if self.line.is_none() {
            self.line = request_line(head);
        }
        if self.head.is_empty() {
            self.head = Bytes::copy_from_slice(&head[..head.len().min(MAX_KEPT_HEAD)]);
        }
        self
    }

    /// [`Refused::with_head`] for a head already split off the read buffer: shared, not copied.
    fn with_split_head(mut self, head: &Bytes) -> Refused {
        if self.head.is_empty() {
            self.head = head.clone();
        }
        self.with_head(head)
    }

    /// The value of the first field named `name` among the refused head's field lines that
    /// could be read: those after the request line, each ended by a line end, up to the end of
    /// the head or the first line that is not a valid `name: value` (as nginx knows the fields
    /// before the one it refused, and none after). For the access log of a refused request
    /// (`User-Agent`, `Referer`, `X-Request-Id`), never for routing.
    pub fn field(&self, name: &header::HeaderName) -> Option<header::HeaderValue> {
        let start = self.head.iter().position(|b| *b != b'\r' && *b != b'\n')?;
        let mut lines = self.head[start..].split(|b| *b == b'\n');
        lines.next(); // the request line
        let mut lines = lines.peekable();
        while let Some(line) = lines.next() {
            // The last piece has no line end: it may have been cut short.
            lines.peek()?;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let colon = memchr::memchr(b':', line)?;
            let n = header::HeaderName::from_bytes(&line[..colon]).ok()?;
            let v = header::HeaderValue::from_bytes(line[colon + 1..].trim_ascii()).ok()?;
            if n == *name {
                return Some(v);
            }
        }
        None
    }
}

/// The most of a refused head kept when it has to be copied for [`Refused::field`].
pub const MAX_KEPT_HEAD: usize = 64 * 1024;

/// The most of a refused request's line kept for the access log (nginx's default
/// `large_client_header_buffers` size).
pub const MAX_LOGGED_LINE: usize = 8 * 1024;

/// The first line of `head` without its line end (empty lines before it skipped, as RFC 9112
/// 2.2 lets a server do), cut at [`MAX_LOGGED_LINE`].
fn request_line(head: &[u8]) -> Option<Bytes> {
    let start = head.iter().position(|b| *b != b'\r' && *b != b'\n')?;
    let rest = &head[start..];
    // The line ends at LF (less the CR before it): a lone CR is no line end (RFC 9112 2.2) and
    // stays in the line, for the log's escaping to show, not hide what follows it.
    let end = match memchr::memchr(b'\n', rest) {
        Some(lf) if lf > 0 && rest[lf - 1] == b'\r' => lf - 1,
        Some(lf) => lf,
        None => rest.len(),
    };
    Some(Bytes::copy_from_slice(&rest[..end.min(MAX_LOGGED_LINE)]))
}

fn bad(why: &'static str) -> Refused {
    Refused {
        status: StatusCode::BAD_REQUEST,
        why,
        metric: None,
        line: None,
        head: Bytes::new(),
    }
}

/// A request line whose version is not HTTP/1.0 or 1.1: a later HTTP/1 minor version is read
/// as 1.1 ([`parse_head`], RFC 9110 2.5), a well-formed `HTTP/x.y` of another major version is
/// 505 (RFC 9110 15.6.6), anything else a malformed line (400).
fn version_refusal(buf: &[u8]) -> Refused {
    match request_version(buf).1 {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', minor] if minor.is_ascii_digit() => {
            bad(HIGHER_MINOR)
        }
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            Refused {
                status: StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                ..bad("unsupported HTTP version\n")
            }
        }
        // The line ends in a well-formed version all the same: the third word was not it, so
        // the target holds a space (`GET /a b HTTP/1.1`).
        _ if last_word(buf).is_some_and(well_formed_version) => bad("invalid request target\n"),
        _ => bad("unsupported HTTP version\n"),
    }
}

/// The request line's last word (after its last space), without the line end.
fn last_word(buf: &[u8]) -> Option<&[u8]> {
    let (at, rest) = request_version(buf);
    let end = at + rest.len();
    let start = buf[..end].iter().rposition(|b| *b == b' ')? + 1;
    Some(&buf[start..end])
}

/// `HTTP/x.y` with one digit each side.
fn well_formed_version(v: &[u8]) -> bool {
    matches!(v, [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
        if major.is_ascii_digit() && minor.is_ascii_digit())
}

/// [`version_refusal`] for `HTTP/1.2` to `HTTP/1.9`, which [`parse_head`] reads again as 1.1.
const HIGHER_MINOR: &str = "unsupported HTTP/1 minor version\n";

/// Where the request line's version starts in `buf`, and its bytes (after the empty lines a
/// request may be preceded by, RFC 9112 2.2, which httparse skips).
fn request_version(buf: &[u8]) -> (usize, &[u8]) {
    let mut start = 0;
    loop {
        match &buf[start..] {
            [b'\r', b'\n', ..] => start += 2,
            [b'\n', ..] => start += 1,
            _ => break,
        }
    }
    let end = memchr::memchr(b'\n', &buf[start..]).map_or(buf.len(), |i| start + i);
    let end = if end > start && buf[end - 1] == b'\r' {
        end - 1
    } else {
        end
    };
    // After the method and the target, neither of which holds a space: where httparse reads
    // the version.
    let mut spaces = buf[start..end]
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b' ')
        .map(|(i, _)| start + i + 1);
    let at = spaces.nth(1).unwrap_or(end);
    (at, &buf[at..end])
}

/// Whether the request line has not ended yet and its version so far could still become a
/// well-formed `HTTP/x.y` (httparse refuses `HTTP/2` before the `.0` arrives): then the head is
/// incomplete, not refused, so that its status does not depend on how it was split.
fn version_still_arriving(buf: &[u8]) -> bool {
    let (at, version) = request_version(buf);
    let line_open = memchr::memchr(b'\n', &buf[at..]).is_none();
    line_open
        && version.len() < 8
        && version.iter().zip(b"HTTP/0.0").all(|(&b, &want)| {
            if want == b'0' {
                b.is_ascii_digit()
            } else {
                b == want
            }
        })
}

/// A head over `max`: 414 when its request line alone does not fit (RFC 9112 3: a target
/// longer than the server will parse is 414, whatever the limit it ran into), else 431.
fn oversized(buf: &[u8], max: usize) -> Refused {
    let start = buf
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(buf.len());
    let line = memchr::memchr(b'\n', &buf[start..]).unwrap_or(buf.len() - start);
    if line > max {
        // The method alone over the limit: longer than any method served (RFC 9112 3: 501).
        let method = memchr::memchr(b' ', &buf[start..start + line]).unwrap_or(line);
        if method > max {
            return Refused {
                status: StatusCode::NOT_IMPLEMENTED,
                why: "method too long\n",
                metric: None,
                line: None,
                head: Bytes::new(),
            };
        }
        return uri_too_long();
    }
    too_large("request head too large\n")
}

fn uri_too_long() -> Refused {
    Refused {
        status: StatusCode::URI_TOO_LONG,
        why: "request target too long\n",
        metric: None,
        line: None,
        head: Bytes::new(),
    }
}

fn too_large(why: &'static str) -> Refused {
    Refused {
        status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        why,
        metric: None,
        line: None,
        head: Bytes::new(),
    }
}

/// How a request's body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(u64),
    Chunked(ChunkState),
    Done,
}

/// A parsed request head and what it says about the connection.
pub struct Head {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    framing: Framing,
    keep_alive: bool,
    expect_continue: bool,
    upgrade: bool,
}

/// Parses one request head off the front of `buf`; `None` while incomplete.
pub fn parse_head(buf: &mut BytesMut, limits: &Limits) -> Result<Option<Head>, Refused> {
    let mut parsed = parse_with(buf, limits, false);
    if matches!(&parsed, Err(r) if r.why == HIGHER_MINOR) {
        // HTTP/1.2 and later minor versions are read as 1.1, the highest this server speaks
        // (RFC 9110 2.5); the request goes on, and is answered, as HTTP/1.1.
        let (at, _) = request_version(buf);
        buf[at + 7] = b'1';
        parsed = parse_with(buf, limits, false);
    }
    if matches!(&parsed, Err(r) if r.why == TOO_MANY) && limits.max_headers > STACK_HEADERS {
        parsed = parse_with(buf, limits, true);
    }
    // Refused before the head was split off: it is still at the front of `buf`.
    parsed.map_err(|r| r.with_head(buf))
}

const TOO_MANY: &str = "too many header fields\n";

fn parse_with(buf: &mut BytesMut, limits: &Limits, heap: bool) -> Result<Option<Head>, Refused> {
    // Uninitialized slots: initializing them all cost more than parsing a small head.
    let mut stack = [MaybeUninit::<httparse::Header<'_>>::uninit(); STACK_HEADERS];
    let mut on_heap = Vec::new();
    let slots = if heap {
        on_heap.resize_with(limits.max_headers, MaybeUninit::uninit);
        &mut on_heap[..]
    } else {
        &mut stack[..STACK_HEADERS.min(limits.max_headers)]
    };
    let mut req = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        &buf[..],
        slots,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > limits.max_header_bytes => {
            return Err(oversized(buf, limits.max_header_bytes))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(too_large(TOO_MANY)),
        Err(httparse::Error::Version) if buf.len() > limits.max_header_bytes => {
            return Err(oversized(buf, limits.max_header_bytes))
        }
        Err(httparse::Error::Version) if version_still_arriving(buf) => return Ok(None),
        Err(httparse::Error::Version) => return Err(version_refusal(buf)),
        Err(_) => return Err(bad("malformed request head\n")),
    };
    if len > limits.max_header_bytes {
        return Err(oversized(buf, limits.max_header_bytes));
    }
    // httparse takes a lone LF for a line end; an upstream may not (request smuggling).
    let raw = &buf[..len];
    if memchr::memchr_iter(b'\n', raw).any(|i| i == 0 || raw[i - 1] != b'\r') {
        return Err(Refused {
            metric: Some("bare_lf"),
            ..bad("bare LF in the request head\n")
        });
    }
    let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes())
        .map_err(|_| bad("invalid method\n"))?;
    let version = if req.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let target = req.path.unwrap_or_default();
    let target = (
        target.as_ptr() as usize - buf.as_ptr() as usize,
        target.len(),
    );
    // Offsets of every name and value, so the values can share the head's buffer.
    let count = req.headers.len();
    // Room for a typical head; zeroing room for all 64 cost more than the spans themselves.
    let mut small: [Span; 16] = [(0, 0, 0, 0); 16];
    let mut large = Vec::new();
    let spans = codec::header_spans(buf, req.headers, &mut small, &mut large);
    let head = buf.split_to(len).freeze();
    // Refused from here on: the head has left `buf`, its line is taken from `head`.
    let line_of = |r: Refused| r.with_split_head(&head);
    let uri = request_target(&head, target, &method).map_err(line_of)?;
    let (mut headers, fields, flags) = header_fields(&head, spans, count).map_err(line_of)?;
    if fields.has_transfer_encoding() && version == Version::HTTP_10 {
        return Err(line_of(bad("Transfer-Encoding in an HTTP/1.0 request\n")));
    }
    // RFC 9110 10.1.1: a 100-continue expectation in an HTTP/1.0 request is ignored; passed on
    // inside an HTTP/1.1 request it would become a real one.
    if flags.has_expect && version == Version::HTTP_10 {
        headers.remove(header::EXPECT);
    }
    let framing = match fields.decide() {
        Ok(BodyFraming::Unframed | BodyFraming::Length(0)) => Framing::Done,
        Ok(BodyFraming::Length(n)) => Framing::Length(n),
        Ok(BodyFraming::Chunked) => Framing::Chunked(ChunkState::Size),
        Err(e @ FramingError::LengthAndTransferEncoding) => {
            return Err(line_of(Refused {
                metric: Some("cl_te"),
                ..bad(framing_refusal(e))
            }))
        }
        // RFC 9112 6.1: a coding the server does not implement, in a framing it can read.
        Err(e @ FramingError::UnimplementedCoding) => {
            return Err(line_of(Refused {
                status: StatusCode::NOT_IMPLEMENTED,
                ..bad(framing_refusal(e))
            }))
        }
        Err(e) => return Err(line_of(bad(framing_refusal(e)))),
    };
    let http11 = version == Version::HTTP_11;
    Ok(Some(Head {
        // A CONNECT the proxy refuses may be followed by anything: the connection ends there.
        keep_alive: method != Method::CONNECT && !flags.close && (http11 || flags.keep_alive),
        expect_continue: http11 && flags.expect_continue,
        // RFC 9110 7.8: an Upgrade in an HTTP/1.0 request is ignored.
        upgrade: http11 && flags.upgrade_token && flags.has_upgrade,
        method,
        uri,
        version,
        headers,
        framing,
    }))
}

/// The request target (at `target`, offset and length, in `head`) as a URI sharing the head's
/// buffer.
fn request_target(head: &Bytes, target: (usize, usize), method: &Method) -> Result<Uri, Refused> {
    // The http crate's URI holds at most 65,534 bytes.
    if target.1 >= usize::from(u16::MAX) {
        return Err(uri_too_long());
    }
    let raw_target = head.slice(target.0..target.0 + target.1);
    // Only RFC 3986's bytes. No form of the request target has a fragment (RFC 9112 3.2),
    // and `#` is not one of them: the URI type would drop it, and the upstream would get
    // another target than the one the client sent.
    if !target_bytes_valid(&raw_target) {
        return Err(bad("invalid request target\n"));
    }
    let mut uri =
        Uri::from_maybe_shared(raw_target.clone()).map_err(|_| bad("invalid request target\n"))?;
    // RFC 9112 3.2.4: OPTIONS in absolute form with an empty path and no query is for the
    // server as a whole: the last proxy sends it as `*`. The URI reads the same as with `/`,
    // so the raw target decides.
    if method == Method::OPTIONS && uri.authority().is_some() {
        let after = raw_target
            .windows(3)
            .position(|w| w == b"://")
            .and_then(|i| raw_target.get(i + 3..));
        if after.is_some_and(|a| !a.iter().any(|b| matches!(b, b'/' | b'?' | b'#'))) {
            let mut parts = uri.clone().into_parts();
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("*"));
            if let Ok(u) = Uri::from_parts(parts) {
                uri = u;
            }
        }
    }
    Ok(uri)
}

/// The bytes a request target may hold: visible ASCII but `"`, `<`, `>` and `#` (a fragment is
/// never part of one, RFC 9112 3.2). Stricter than that, RFC 3986 would also refuse `[`, `]`,
/// `{`, `}`, `|`, `^`, `\`, `` ` `` and a `%` without two hex digits, which browsers send as
/// they are in queries (WHATWG URL: `?filter[status]=open`, `?q={..}`, `?q=100%`) and the
/// `http` crate takes: a proxy must pass them on.
const TARGET_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0x21;
    while b < 0x7f {
        t[b] = !matches!(b as u8, b'"' | b'<' | b'>' | b'#');
        b += 1;
    }
    t
};

/// Whether every byte of an HTTP/1 request target is one [`TARGET_BYTES`] allows: no raw
/// byte over 0x7F (RFC 9112 3: an invalid request line; clients percent-encode them), space,
/// control or DEL; and no `\` before the query (browsers turn it into `/` in an http(s) path,
/// and an upstream that does the same would see another path than the one routed). An HTTP/2
/// `:path` is held to the same (it goes on as an HTTP/1.1 request target).
pub fn target_bytes_valid(t: &[u8]) -> bool {
    let path_end = memchr::memchr(b'?', t).unwrap_or(t.len());
    t.iter().all(|&b| TARGET_BYTES[usize::from(b)])
        && memchr::memchr(b'\\', &t[..path_end]).is_none()
}

/// What a request's fields say about its connection.
#[derive(Default)]
struct Flags {
    close: bool,
    keep_alive: bool,
    upgrade_token: bool,
    expect_continue: bool,
    has_expect: bool,
    has_upgrade: bool,
}

/// The header map (values sharing `head`'s buffer), the framing fields and the connection
/// flags of a request head.
fn header_fields(
    head: &Bytes,
    spans: &[Span],
    count: usize,
) -> Result<(HeaderMap, FramingFields, Flags), Refused> {
    // One slot spare: the access log adds `x-request-id` without growing the map.
    let mut headers = HeaderMap::with_capacity(count + 1);
    let mut fields = FramingFields::default();
    let mut flags = Flags::default();
    for &span in spans.iter() {
        let (name, value) = codec::header_at(head, span).map_err(|e| {
            bad(match e {
                BadHeader::Name => "invalid header name\n",
                BadHeader::Value => "invalid header value\n",
            })
        })?;
        if name == header::CONTENT_LENGTH {
            fields
                .content_length(value.as_bytes())
                .map_err(|e| bad(framing_refusal(e)))?;
            // Relayed as the one value it is, in digits alone (a list of one value repeated,
            // one value on two lines, RFC 9110 8.6; leading zeros): an HTTP/2 upstream takes
            // nothing else.
            if headers.contains_key(header::CONTENT_LENGTH) {
                continue;
            }
            let v = value.as_bytes();
            let canonical = !v.contains(&b',') && (v.len() == 1 || v.first() != Some(&b'0'));
            if let Some(n) = fields.length().filter(|_| !canonical) {
                headers.append(name, http::HeaderValue::from(n));
                continue;
            }
        } else if name == header::TRANSFER_ENCODING {
            fields.transfer_encoding(value.as_bytes());
        } else if name == header::CONNECTION {
            for token in value.as_bytes().split(|b| *b == b',') {
                let token = token.trim_ascii();
                flags.close |= token.eq_ignore_ascii_case(b"close");
                flags.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
                flags.upgrade_token |= token.eq_ignore_ascii_case(b"upgrade");
            }
        } else if name == header::EXPECT {
            // `Expect = #expectation` (RFC 9110 10.1.1): `100-continue` may share its line.
            flags.has_expect = true;
            flags.expect_continue |= value
                .as_bytes()
                .split(|b| *b == b',')
                .any(|e| e.trim_ascii().eq_ignore_ascii_case(b"100-continue"));
        } else if name == header::UPGRADE {
            flags.has_upgrade = true;
        } else if is_underscore_lookalike(&name) {
            // `X_Forwarded_For`, `Content_Length`: the same variable as the real field to a
            // CGI-style application; dropped, never passed on.
            continue;
        }
        headers.append(name, value);
    }
    Ok((headers, fields, flags))
}

/// The 400 answer's text for a framing fault.
fn framing_refusal(e: FramingError) -> &'static str {
    match e {
        FramingError::InvalidLength => "invalid Content-Length\n",
        FramingError::ConflictingLength => "conflicting Content-Length\n",
        FramingError::LengthAndTransferEncoding => "both Content-Length and Transfer-Encoding\n",
        FramingError::UnsupportedTransferEncoding | FramingError::UnimplementedCoding => {
            "unsupported Transfer-Encoding\n"
        }
    }
}

/// A request's body as the server delivers it to the [`Handler`].
pub enum RequestBody {
    /// No body (most requests).
    Empty,
    /// A body that arrived whole with its head.
    Full(Option<Bytes>),
    /// Read off the connection as it is polled. Boxed: every request's body is moved several
    /// times on its way to the upstream, and most have none; inline, this variant sized them all.
    Streaming(Box<Streaming>),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Full(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            RequestBody::Streaming(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Full(data) => data.is_none(),
            RequestBody::Streaming(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Full(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            RequestBody::Streaming(b) => b.size_hint(),
        }
    }
}

/// A request body read off the client connection by whoever polls it (the upstream client).
/// It owns the connection's read half while it is read and hands it back at its end.
pub struct Streaming {
    reader: Option<Reader>,
    framing: Framing,
    back: Option<oneshot::Sender<Returned>>,
    /// `Expect: 100-continue`: told when the body is first read, so that the `100` goes out
    /// once the request is on its way, never ahead of an answer made without the body (RFC 9110
    /// 10.1.1: a final status known from the head is sent at once, with no `100`).
    go_on: Option<oneshot::Sender<()>>,
}

/// The connection's read half as an exchange ends: here, or still with the request body the
/// response holds (handed back on the receiver once the response is written), or gone.
enum Back {
    Reader(Reader),
    Later(Option<oneshot::Receiver<Returned>>),
}

/// The read half coming back from a body, and whether the body was read to its end.
struct Returned {
    reader: Reader,
    complete: bool,
}

impl Streaming {
    fn hand_back(&mut self) {
        if let (Some(reader), Some(back)) = (self.reader.take(), self.back.take()) {
            let _ = back.send(Returned {
                reader,
                complete: self.framing == Framing::Done,
            });
        }
    }

    fn fail<E>(&mut self, why: E) -> Poll<Option<Result<Frame<Bytes>, io::Error>>>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // The connection is unusable: nothing goes back.
        self.framing = Framing::Done;
        self.reader = None;
        self.back = None;
        Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::InvalidData, why))))
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        self.hand_back();
    }
}

impl Body for Streaming {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if let Some(go_on) = this.go_on.take() {
            // Only a client still waiting for it: one that sent body bytes has gone on without.
            if this.reader.as_ref().is_some_and(|r| r.buf.is_empty()) {
                let _ = go_on.send(());
            }
        }
        loop {
            let Some(reader) = this.reader.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.framing {
                Framing::Done => {
                    this.hand_back();
                    return Poll::Ready(None);
                }
                Framing::Length(left) if !reader.buf.is_empty() => {
                    let take = (reader.buf.len() as u64).min(*left) as usize;
                    *left -= take as u64;
                    let data = reader.buf.split_to(take).freeze();
                    if *left == 0 {
                        this.framing = Framing::Done;
                        this.hand_back();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Length(_) => {}
                Framing::Chunked(st) => match decode_chunked(&mut reader.buf, st, Sender::Client) {
                    Err(why) => return this.fail(InvalidChunked(why)),
                    Ok(Chunked::Data(d)) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                    Ok(Chunked::Trailers(t)) => {
                        this.framing = Framing::Done;
                        this.hand_back();
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                    Ok(Chunked::End) => {
                        this.framing = Framing::Done;
                        this.hand_back();
                        return Poll::Ready(None);
                    }
                    Ok(Chunked::NeedMore) => {}
                },
            }
            // What is known to be still on its way: the rest of the length, or of the chunk
            // (with its CRLF and the next size line); else the growing read size.
            let want = match this.framing {
                Framing::Length(left) => left,
                Framing::Chunked(ChunkState::Data(left)) => left.saturating_add(16),
                _ => 0,
            };
            match ready!(reader.poll_fill_body(cx, want)) {
                Ok(0) => return this.fail("the client closed the connection mid-body"),
                Ok(_) => {}
                Err(e) => {
                    this.reader = None;
                    this.back = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            Framing::Chunked(_) => SizeHint::default(),
        }
    }
}

/// The request's body: nothing, already here whole, or read from the socket as it is polled
/// (the read half comes back through the first receiver at the body's end; with `Expect:
/// 100-continue` the second says when the body is first read).
#[allow(clippy::type_complexity)]
fn request_body(
    r: &mut Option<Reader>,
    framing: Framing,
    expect_continue: bool,
) -> (
    RequestBody,
    Option<oneshot::Receiver<Returned>>,
    Option<oneshot::Receiver<()>>,
) {
    match (framing, r.as_mut()) {
        (Framing::Done, _) => (RequestBody::Empty, None, None),
        (Framing::Length(n), Some(rd)) if rd.buf.len() as u64 >= n => {
            let body = RequestBody::Full(Some(rd.buf.split_to(n as usize).freeze()));
            (body, None, None)
        }
        _ => {
            let (go_on, go_on_rx) = if expect_continue {
                let (tx, rx) = oneshot::channel();
                (Some(tx), Some(rx))
            } else {
                (None, None)
            };
            let (tx, rx) = oneshot::channel();
            let body = RequestBody::Streaming(Box::new(Streaming {
                reader: r.take(),
                framing,
                back: Some(tx),
                go_on,
            }));
            (body, Some(rx), go_on_rx)
        }
    }
}

/// The client's side of an upgraded connection, delivered once the `101` has been written.
pub type OnUpgrade = oneshot::Receiver<Upgraded>;

/// An upgraded client connection: what was read past the request head, then the socket.
pub struct Upgraded {
    reader: Reader,
    writer: BoxWrite,
}

impl AsyncRead for Upgraded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = &mut self.reader;
        if !r.buf.is_empty() {
            let n = r.buf.len().min(out.remaining());
            out.put_slice(&r.buf[..n]);
            r.buf.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut r.io).poll_read(cx, out)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.writer).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.writer).poll_shutdown(cx)
    }
}

/// The write half and the output waiting for it, written with `writev`.
struct Writer {
    io: BoxWrite,
    out: VecDeque<Bytes>,
    queued: usize,
    closed: bool,
    /// The response was cut (the upstream failed mid-body): the connection ends at once,
    /// without lingering, so the client sees the cut now.
    cut: bool,
    /// A close-delimited body is being written and has not ended: a connection dropped now
    /// (the client stopped reading, the shutdown grace ran out) ends with a reset, not the FIN
    /// that would be that body's end (RFC 9112 6.3).
    unended: bool,
}

impl Drop for Writer {
    fn drop(&mut self) {
        if self.unended {
            self.io.abort();
        }
    }
}

impl Writer {
    fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.queued += b.len();
            self.out.push_back(b);
        }
    }

    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.out.is_empty() {
            match ready!(super::io::poll_write_queue::<WRITE_SLICES, _>(
                &mut *self.io,
                &mut self.out,
                cx
            ))? {
                0 => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                written => self.queued -= written,
            }
        }
        // TLS buffers what it encrypts; TCP's flush does nothing.
        Pin::new(&mut self.io).poll_flush(cx)
    }

    async fn write_out(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_write_out(cx)).await
    }

    /// Shuts the write side down once, so the client sees a clean end (a FIN; over TLS a
    /// close_notify first, without which a close-delimited body cannot be told from a cut one).
    async fn close(&mut self) {
        if !self.closed {
            self.closed = true;
            let _ = tokio::time::timeout(LINGER, self.io.shutdown()).await;
        }
    }
}

/// Ready when the client has closed its connection (or it failed) while its request is
/// served. The read half is watched once it is back from the request body.
fn watch_client(
    r: &mut Option<Reader>,
    back: &mut Option<oneshot::Receiver<Returned>>,
    complete: &mut bool,
    cx: &mut Context<'_>,
) -> Poll<()> {
    if let Some(rx) = back.as_mut() {
        match Pin::new(rx).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(ret)) => {
                *complete = ret.complete;
                *r = Some(ret.reader);
                *back = None;
            }
            // The body failed and kept the connection: its error ends the exchange.
            Poll::Ready(Err(_)) => {
                *complete = false;
                *back = None;
            }
        }
    }
    match r.as_mut() {
        // Bytes of an unread body would be taken for a request: not watched.
        Some(r) if *complete => watch_reader(r, cx),
        _ => Poll::Pending,
    }
}

/// Ready on end of stream or a read error. Reading here costs no syscall while the socket
/// has nothing: tokio keeps the readiness that the last short read cleared. Once a pipelined
/// request has arrived, watching stops (as hyper's does): a client that sends requests and
/// then half-closes still gets its answers.
fn watch_reader(r: &mut Reader, cx: &mut Context<'_>) -> Poll<()> {
    if !r.buf.is_empty() {
        return Poll::Pending;
    }
    match ready!(r.poll_probe::<1024>(cx)) {
        Ok(0) | Err(_) => Poll::Ready(()),
        // Kept in the buffer for the next head; the exchange's own wakers carry on.
        Ok(_) => Poll::Pending,
    }
}

/// A response body's frame, counted against `left`, what its announced Content-Length still
/// allows; a data frame past it is an error.
fn within_length(left: &mut Option<u64>, frame: Frame<Bytes>) -> Result<Frame<Bytes>, String> {
    if let (Some(n), Some(data)) = (left.as_mut(), frame.data_ref()) {
        let len = data.len() as u64;
        if len > *n {
            return Err(format!("body went past its length by {} bytes", len - *n));
        }
        *n -= len;
    }
    Ok(frame)
}

/// How a response goes on the wire.
struct ResponseFraming {
    /// No body follows the head (HEAD, 1xx, 204, 304).
    bodiless: bool,
    chunked: bool,
    /// The Content-Length the head announced for the body that follows.
    length: Option<u64>,
    /// The connection stays open after it.
    keep_alive: bool,
}

/// The status line and header section of a response, and how its body is framed: by its exact
/// size when known, chunked otherwise (HTTP/1.1), or until close (HTTP/1.0).
fn response_head<B: Body + BodyFields>(
    parts: &http::response::Parts,
    method: &Method,
    version: Version,
    keep_alive: bool,
    body: &B,
) -> (Bytes, ResponseFraming) {
    let mut keep_alive = keep_alive;
    let status = parts.status;
    let http10 = version == Version::HTTP_10;
    let bodiless = *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let hint = body.size_hint().exact();
    let chunked = !bodiless && hint.is_none() && !http10;
    if !bodiless && hint.is_none() && http10 {
        // HTTP/1.0 has no chunked framing: the body ends with the connection.
        keep_alive = false;
    }

    let fields = body.fields();
    let mut size = 64 + fields.map_or(0, |f| f.lines().len());
    for (name, value) in &parts.headers {
        size += name.as_str().len() + value.len() + 4;
    }
    let mut head = BytesMut::with_capacity(size);
    head.put_slice(b"HTTP/1.1 ");
    head.put_slice(status.as_str().as_bytes());
    head.put_u8(b' ');
    head.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    head.put_slice(b"\r\n");
    let upgrade = status == StatusCode::SWITCHING_PROTOCOLS;
    let mut had_length = false;
    let mut had_date = false;
    if let Some(f) = fields {
        // The upstream's lines, less those the map replaces; its length as the map's would be.
        f.write_to(&mut head, &parts.headers);
        had_date = f.has_date();
        if let (Some(n), true) = (f.length(), bodiless && !status.is_informational()) {
            if status != StatusCode::NO_CONTENT
                && !parts.headers.contains_key(header::CONTENT_LENGTH)
            {
                had_length = true;
                let mut digits = itoa::Buffer::new();
                put_header(&mut head, b"content-length", digits.format(n).as_bytes());
            }
        }
    }
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH {
            // Kept as it is where no body follows (HEAD, 304); otherwise written below.
            // Never on 1xx or 204 (RFC 9110 8.6).
            if bodiless && !status.is_informational() && status != StatusCode::NO_CONTENT {
                had_length = true;
                put_header(&mut head, name.as_str().as_bytes(), value.as_bytes());
            }
            continue;
        }
        if !upgrade && (name == header::TRANSFER_ENCODING || name == header::CONNECTION) {
            continue;
        }
        had_date |= name == header::DATE;
        put_header(&mut head, name.as_str().as_bytes(), value.as_bytes());
    }
    if !had_date {
        // An upstream's own Date is passed on; the handler's own answers and Date-less
        // upstreams get ours.
        put_date(&mut head);
    }
    match hint {
        _ if status.is_informational() || status == StatusCode::NO_CONTENT => {}
        Some(n) if !bodiless || (*method == Method::HEAD && !had_length && n > 0) => {
            let mut digits = itoa::Buffer::new();
            put_header(&mut head, b"content-length", digits.format(n).as_bytes());
        }
        _ if chunked => head.put_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if !upgrade {
        if !keep_alive && !http10 {
            head.put_slice(b"connection: close\r\n");
        } else if keep_alive && http10 {
            head.put_slice(b"connection: keep-alive\r\n");
        }
    }
    head.put_slice(b"\r\n");
    (
        head.freeze(),
        ResponseFraming {
            bodiless,
            chunked,
            length: hint.filter(|_| !bodiless),
            keep_alive,
        },
    )
}

/// Serves one HTTP/1.x connection until it closes, fails, idles past `header_read_timeout`,
/// upgrades, or the server shuts down between two requests.
pub async fn serve<H: Handler>(
    reader: Reader,
    writer: BoxWrite,
    handler: H,
    settings: Settings,
    first_deadline: Instant,
) {
    let mut conn = Conn {
        handler,
        settings,
        writer: Writer {
            io: writer,
            out: VecDeque::new(),
            queued: 0,
            closed: false,
            cut: false,
            unended: false,
        },
        timer: None,
        first_deadline: Some(first_deadline),
    };
    conn.run(reader).await;
}

struct Conn<H> {
    handler: H,
    settings: Settings,
    writer: Writer,
    /// `header_read_timeout`, made the first time a head has to be waited for.
    timer: Option<Pin<Box<Sleep>>>,
    /// The first head's deadline, counted from the accept.
    first_deadline: Option<Instant>,
}

/// What waiting for a request head came to.
// Returned once per request and moved straight on: boxing would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum Next {
    Head(Head),
    Refused(Refused),
    /// Closed, failed, timed out, or shut down while idle.
    Close,
}

impl<H: Handler> Conn<H> {
    /// The request loop. What it keeps between requests is small; each exchange runs in a
    /// future of its own on the heap (the proxy's request future alone is over 2 KB), so an
    /// idle connection costs a few hundred bytes, not the largest request it ever served.
    async fn run(&mut self, reader: Reader) {
        let mut reader = Some(reader);
        while let Some(mut r) = reader.take() {
            // Bound first: a `match` on the awaited value would keep it (a whole head) in this
            // future across the exchange's await.
            let next = self.next_head(&mut r).await;
            reader = match next {
                // Allocated first and written in place: `Box::pin(fut)` built the >2 KB future
                // on the stack and copied it (~500 instructions per request, callgrind).
                Next::Head(head) => {
                    Box::into_pin(Box::write(Box::new_uninit(), self.exchange(r, head))).await
                }
                Next::Close => None,
                Next::Refused(refused) => {
                    Box::pin(self.refuse(r, refused)).await;
                    None
                }
            };
        }
        self.writer.close().await;
    }

    async fn refuse(&mut self, r: Reader, refused: Refused) {
        if let Some(reason) = refused.metric {
            self.handler.refused(reason);
        }
        // The handler's answer when it makes one (the proxy's carries its request id and is
        // logged as every answered request is), else the plain text.
        let (status, why) = (refused.status, refused.why);
        // The answer to a HEAD has no content (RFC 9110 9.3.2), refused or not: its method is
        // the first word of a request line that could be read.
        let method = if refused
            .line
            .as_ref()
            .is_some_and(|l| l.starts_with(b"HEAD "))
        {
            Method::HEAD
        } else {
            Method::GET
        };
        let _ = match self.handler.refusal(&refused) {
            Some(resp) => {
                self.respond(resp, &method, Version::HTTP_11, false, None)
                    .await
            }
            None => {
                self.respond(plain(status, why), &method, Version::HTTP_11, false, None)
                    .await
            }
        };
        self.linger(Some(r)).await;
    }

    /// One request and its response; the read half comes back when the connection can carry
    /// another request.
    async fn exchange(&mut self, r: Reader, head: Head) -> Option<Reader> {
        let Head {
            method,
            uri,
            version,
            headers,
            framing,
            keep_alive,
            expect_continue,
            upgrade,
        } = head;

        let mut r = Some(r);
        let (body, mut back, mut go_on) = request_body(&mut r, framing, expect_continue);
        let mut req = Request::new(H::RequestBody::from(body));
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = version;
        *req.headers_mut() = headers;
        let (on_upgrade, upgrade_rx) = if upgrade {
            let (tx, rx) = oneshot::channel::<Upgraded>();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };

        // While the upstream works, the client's socket is watched: a client that goes away
        // cancels its request (the upstream connection is closed, nothing is recorded), as
        // hyper's server and nginx do.
        //
        // 1xx heads the upstream sent go out as they come, ahead of the response, to HTTP/1.1
        // clients only (RFC 9110 15.2: never to an HTTP/1.0 one). The client's `Expect:
        // 100-continue` is answered here once its body is first read (the request is on its way;
        // the field went on to the upstream too): the upstream's own 100 would be a second one.
        let interim = version == Version::HTTP_11;
        let mut complete = true;
        let resp = {
            let writer = &mut self.writer;
            let mut handle = std::pin::pin!(self.handler.call(req, upgrade_rx));
            std::future::poll_fn(|cx| {
                let open = interim.then(interim::Open::new);
                let polled = handle.as_mut().poll(cx);
                if let Some(rx) = go_on.as_mut() {
                    if let Poll::Ready(read) = Pin::new(rx).poll(cx) {
                        go_on = None;
                        if read.is_ok() {
                            writer.push(Bytes::from_static(b"HTTP/1.1 100 Continue\r\n\r\n"));
                        }
                    }
                }
                if let Some(open) = open {
                    open.close(|head| {
                        if !(expect_continue && head.starts_with(b"HTTP/1.1 100 ")) {
                            writer.push(head);
                        }
                    });
                }
                if let Poll::Ready(resp) = polled {
                    return Poll::Ready(Some(resp));
                }
                if !writer.out.is_empty() {
                    // Written as far as the client takes them; the rest goes with the response.
                    let _ = writer.poll_write_out(cx);
                }
                ready!(watch_client(&mut r, &mut back, &mut complete, cx));
                Poll::Ready(None)
            })
            .await
        };
        let Some(resp) = resp else {
            tracing::debug!("the client closed its connection before the response");
            self.handler.client_closed();
            return None;
        };

        // The read half: still here, back from a finished body, or still with the body (an
        // answer that came before the upload's end: the body is in the response, and hands the
        // reader back once the response is written, for the linger).
        let (reader_back, with_body) = match back {
            None => (r, None),
            Some(mut rx) => match rx.try_recv() {
                Ok(ret) => {
                    complete = ret.complete;
                    (Some(ret.reader), None)
                }
                Err(oneshot::error::TryRecvError::Empty) => {
                    complete = false;
                    (None, Some(rx))
                }
                Err(oneshot::error::TryRecvError::Closed) => {
                    complete = false;
                    (None, None)
                }
            },
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            // Boxed: rare, and inline it would grow every request's exchange future.
            Box::pin(self.switch(resp, &method, version, on_upgrade, reader_back, complete)).await;
            return None;
        }
        let back = match reader_back {
            Some(r) => Back::Reader(r),
            None => Back::Later(with_body),
        };
        self.finish(resp, &method, version, keep_alive, complete, back)
            .await
    }

    /// A `101`: written, and the connection handed over, when the client asked to upgrade and
    /// its request was read whole; otherwise a 502 and the connection closes.
    async fn switch(
        &mut self,
        resp: Response<H::Body>,
        method: &Method,
        version: Version,
        on_upgrade: Option<oneshot::Sender<Upgraded>>,
        reader_back: Option<Reader>,
        complete: bool,
    ) {
        match (on_upgrade, reader_back) {
            (Some(tx), Some(r)) if complete => {
                if self
                    .respond(resp, method, version, true, None)
                    .await
                    .is_ok()
                {
                    let writer =
                        std::mem::replace(&mut self.writer.io, Box::new(tokio::io::sink()));
                    let _ = tx.send(Upgraded { reader: r, writer });
                }
            }
            (_, r) => {
                // The upstream switched protocols before the request body was all sent
                // (or without being asked to): there is no clean way to tunnel that.
                tracing::debug!("101 before the request body was sent; answering 502");
                const TEXT: &str = "bad gateway\n";
                let mut answer = plain(StatusCode::BAD_GATEWAY, TEXT);
                // The handler's request id (if it set one) stays with the answer that replaces
                // its response.
                if let Some(id) = resp.headers().get(&super::headers::X_REQUEST_ID) {
                    answer
                        .headers_mut()
                        .insert(super::headers::X_REQUEST_ID.clone(), id.clone());
                }
                let sent = self.respond(answer, method, version, false, None).await;
                let bytes = if sent.is_ok() { TEXT.len() as u64 } else { 0 };
                self.handler.replaced(resp, StatusCode::BAD_GATEWAY, bytes);
                self.linger(r).await;
            }
        }
    }

    /// Writes the handler's response and decides what becomes of the connection: the read
    /// half back for the next request, or closed (at once, or after lingering).
    async fn finish<B>(
        &mut self,
        resp: Response<B>,
        method: &Method,
        version: Version,
        keep_alive: bool,
        complete: bool,
        back: Back,
    ) -> Option<Reader>
    where
        B: Body<Data = Bytes> + BodyFields + Unpin,
        B::Error: std::fmt::Display,
    {
        let (mut reader_back, later) = match back {
            Back::Reader(r) => (Some(r), None),
            Back::Later(rx) => (None, rx),
        };
        // A request the handler refused closes the connection: nothing pipelined behind it runs.
        let refused = resp.extensions().get::<CloseConnection>().is_some();
        let keep = keep_alive && complete && reader_back.is_some() && !refused;
        let watch = if complete { reader_back.as_mut() } else { None };
        match self.respond(resp, method, version, keep, watch).await {
            Ok(true) => {}
            // The client asked to close and left nothing unread: the write side is shut down
            // (a TLS close_notify, a TCP FIN) when the connection ends. Where the proxy closes
            // on its own account (shutdown, a close-delimited body) a pipelining client may
            // have sent more already: linger, so that closing does not reset the response.
            Ok(false)
                if complete
                    && !keep_alive
                    && reader_back.as_ref().is_none_or(|r| r.buf.is_empty()) =>
            {
                return None
            }
            // A cut response: the connection closes now (no last chunk, no linger), so the
            // client sees the cut at once rather than after the linger.
            Ok(false) if self.writer.cut => return None,
            // The client stopped reading (`client_send_timeout`): nothing more can reach it,
            // so no lingering and no orderly close either; the slot goes at once.
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                self.writer.closed = true;
                return None;
            }
            // A read half still with the request body lingers once it is back (RFC 9112 9.6:
            // the client reads the answer, not a reset).
            Ok(false) | Err(_) => {
                match reader_back {
                    Some(r) => self.linger(Some(r)).await,
                    None => self.linger_later(later).await,
                }
                return None;
            }
        }
        let mut r = reader_back?;
        r.release();
        Some(r)
    }

    /// Waits for the next request head, at most `header_read_timeout`; an idle connection also
    /// ends when the server shuts down.
    async fn next_head(&mut self, r: &mut Reader) -> Next {
        let Settings {
            limits,
            idle_at_shutdown,
        } = self.settings;
        let mut deadline = self
            .first_deadline
            .take()
            .unwrap_or_else(|| Instant::now() + limits.header_read_timeout);
        let mut armed = false;
        let mut closing = false;
        let mut shutdown = std::pin::pin!(self.handler.until_shutdown());
        let timer = &mut self.timer;
        std::future::poll_fn(|cx| loop {
            if !r.buf.is_empty() {
                match parse_head(&mut r.buf, &limits) {
                    Ok(Some(h)) => return Poll::Ready(Next::Head(h)),
                    Ok(None) => {}
                    Err(refused) => return Poll::Ready(Next::Refused(refused)),
                }
            }
            match r.poll_fill(cx) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Next::Close),
                Poll::Ready(Ok(_)) => continue,
                Poll::Pending => {}
            }
            // Shutting down (or handing the listeners to a new process): an idle connection gets
            // a moment for a request already on its way, answered with `connection: close`. A
            // client that sends its next request right after a response (any busy keep-alive
            // connection) then learns of the close from that answer instead of racing it.
            if r.buf.is_empty() && !closing && shutdown.as_mut().poll(cx).is_ready() {
                closing = true;
                let soon = Instant::now() + idle_at_shutdown;
                if soon < deadline {
                    deadline = soon;
                    armed = false;
                }
            }
            let t = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if !armed {
                // Only an earlier deadline moves the timer (shutdown); a later one, which every
                // new request brings, is taken up when the timer fires: re-arming the timer
                // wheel per request cost ~250 instructions.
                if t.deadline() > deadline {
                    t.as_mut().reset(deadline);
                }
                armed = true;
            }
            while t.as_mut().poll(cx).is_ready() {
                if t.deadline() >= deadline {
                    return Poll::Ready(Next::Close);
                }
                t.as_mut().reset(deadline);
            }
            return Poll::Pending;
        })
        .await
    }

    /// Writes `resp`; `Ok(true)` when the connection stays open for another request. With
    /// `watch`, a client that closes while the body is awaited ends the response at once (a
    /// quiet stream would otherwise notice only at its next write).
    async fn respond<B>(
        &mut self,
        resp: Response<B>,
        method: &Method,
        version: Version,
        keep_alive: bool,
        watch: Option<&mut Reader>,
    ) -> io::Result<bool>
    where
        B: Body<Data = Bytes> + BodyFields + Unpin,
        B::Error: std::fmt::Display,
    {
        let (parts, body) = resp.into_parts();
        // Shutting down: this is the connection's last response.
        let keep_alive = keep_alive && !self.handler.shutting_down();
        let (head, framing) = response_head(&parts, method, version, keep_alive, &body);
        self.writer.push(head);
        if framing.bodiless {
            drop(body);
            self.writer.write_out().await?;
            return Ok(framing.keep_alive);
        }
        let mut body = body;
        let complete = self
            .write_body(&mut body, framing.chunked, framing.length, watch)
            .await?;
        Ok(complete && framing.keep_alive)
    }

    /// Streams a response body: whatever is ready goes out with the head in one write; then
    /// frame by frame. `Ok(false)`: the body failed and the response was cut. A body that
    /// ends short of `length`, the Content-Length its head announced, or would go past it, is
    /// cut too: finished cleanly, it would leave the client waiting for the rest, and take the
    /// next response on the connection for it.
    async fn write_body<B>(
        &mut self,
        body: &mut B,
        chunked: bool,
        length: Option<u64>,
        mut watch: Option<&mut Reader>,
    ) -> io::Result<bool>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let mut left = length;
        self.writer.unended = !chunked && length.is_none();
        loop {
            let frame = std::future::poll_fn(|cx| match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Ready(f) => Poll::Ready(Some(f)),
                Poll::Pending => Poll::Ready(None),
            })
            .await;
            let frame = match frame {
                Some(f) => f,
                None if self.writer.out.is_empty() => {
                    let frame = std::future::poll_fn(|cx| {
                        if let Poll::Ready(f) = Pin::new(&mut *body).poll_frame(cx) {
                            return Poll::Ready(Some(f));
                        }
                        match watch.as_deref_mut() {
                            Some(r) => {
                                ready!(watch_reader(r, cx));
                                Poll::Ready(None)
                            }
                            None => Poll::Pending,
                        }
                    })
                    .await;
                    match frame {
                        Some(f) => f,
                        None => return Err(io::ErrorKind::ConnectionAborted.into()),
                    }
                }
                None => {
                    self.writer.write_out().await?;
                    continue;
                }
            };
            let frame = match frame {
                Some(Ok(frame)) => within_length(&mut left, frame).map(Some),
                Some(Err(e)) => Err(e.to_string()),
                None => match left {
                    Some(n) if n > 0 => Err(format!("body ended {n} bytes short of its length")),
                    _ => Ok(None),
                },
            };
            match frame {
                Ok(None) => {
                    if chunked {
                        self.writer.push(Bytes::from_static(codec::LAST_CHUNK));
                    }
                    self.writer.unended = false;
                    break;
                }
                Err(e) => {
                    // The upstream failed mid-body: what arrived goes out, then the connection
                    // closes without a last chunk, so the client sees a truncated response.
                    tracing::debug!(error = %e, "upstream body failed; aborting the response");
                    let _ = self.writer.write_out().await;
                    // No close_notify: over TLS the client then sees an unclean end, so a
                    // close-delimited body cut here is not taken for a whole one; over TCP
                    // such a body ends with a reset, not the FIN that would be its end.
                    // (A close-delimited body: `unended` resets the connection as it drops.)
                    self.writer.closed = true;
                    self.writer.cut = true;
                    return Ok(false);
                }
                Ok(Some(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) if chunked => {
                        self.writer.push(codec::chunk_size_line(data.len()));
                        self.writer.push(data);
                        self.writer.push(Bytes::from_static(codec::CHUNK_END));
                    }
                    Ok(data) => self.writer.push(data),
                    Err(frame) => {
                        if let (Ok(trailers), true) = (frame.into_trailers(), chunked) {
                            self.writer.push(codec::last_chunk_with(&trailers));
                            break;
                        }
                    }
                },
            }
            if self.writer.queued >= MAX_QUEUED {
                self.writer.write_out().await?;
            }
        }
        self.writer.write_out().await?;
        Ok(true)
    }

    /// Closes after an error or an unread body: the write side first, then whatever the client
    /// still sends is read and dropped for a moment, so that closing with unread bytes does not
    /// turn into a reset that destroys the response in flight.
    async fn linger(&mut self, reader: Option<Reader>) {
        self.writer.close().await;
        let Some(r) = reader else {
            return;
        };
        discard(r, tokio::time::Instant::now() + LINGER).await;
    }

    /// [`linger`](Self::linger) for a read half still with the request body (an answer that
    /// came before the upload's end): it comes back once the body is dropped (the upload
    /// failed or ended), and lingers within the same [`LINGER`] from the close.
    async fn linger_later(&mut self, later: Option<oneshot::Receiver<Returned>>) {
        self.writer.close().await;
        let Some(rx) = later else {
            return;
        };
        let deadline = tokio::time::Instant::now() + LINGER;
        if let Ok(Ok(ret)) = tokio::time::timeout_at(deadline, rx).await {
            discard(ret.reader, deadline).await;
        }
    }
}

/// Reads and drops what the client still sends, until it closes, `deadline`, or
/// [`LINGER_BYTES`].
async fn discard(mut r: Reader, deadline: tokio::time::Instant) {
    let mut dropped = 0;
    let _ = tokio::time::timeout_at(
        deadline,
        std::future::poll_fn(|cx| loop {
            r.buf.clear();
            match ready!(r.poll_fill(cx)) {
                Ok(0) | Err(_) => return Poll::Ready(()),
                Ok(n) => {
                    dropped += n;
                    if dropped > LINGER_BYTES {
                        return Poll::Ready(());
                    }
                }
            }
        }),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a request line httparse refused at its version is answered: the version's fault,
    /// or, where the line ends in a well-formed version, the target's (a space in it).
    #[test]
    fn a_version_refusal_names_what_is_wrong() {
        for (line, status, why) in [
            (
                &b"GET /a b HTTP/1.1\r\n"[..],
                400,
                "invalid request target\n",
            ),
            (
                b"GET http://b.exa mple/ HTTP/1.1\r\n",
                400,
                "invalid request target\n",
            ),
            (
                b"\r\nGET /a b HTTP/1.0\r\n",
                400,
                "invalid request target\n",
            ),
            (b"GET / HTTP/3.0\r\n", 505, "unsupported HTTP version\n"),
            (b"GET / FOO/1.1\r\n", 400, "unsupported HTTP version\n"),
            (b"GET / HTTP/1.1x\r\n", 400, "unsupported HTTP version\n"),
            (b"GET /\r\n", 400, "unsupported HTTP version\n"),
            (b"GET", 400, "unsupported HTTP version\n"),
        ] {
            let r = version_refusal(line);
            assert_eq!(
                (r.status.as_u16(), r.why),
                (status, why),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn request_targets_hold_only_visible_ascii_but_quotes_angles_and_fragments() {
        for ok in [
            &b"/"[..],
            b"*",
            b"/a%20b/!$&'()*+,;=:@-._~?x=%C3%a9&y=/?:@",
            b"http://b.example",
            b"http://b.example?q",
            b"https://[::1]:8080/p?q",
            b"b.example:443",
            b"[::1]:443",
            // What browsers send as it is (WHATWG URL).
            b"/search?filter[status]=open&ids[]=1",
            b"/?q={x}|a^b`c\\d",
            b"/?q=100%",
            b"/a%zz",
        ] {
            assert!(target_bytes_valid(ok), "{ok:?}");
        }
        for bad in [
            &b"/caf\xc3\xa9"[..],
            b"/?q=\x80",
            b"/a\x7f",
            b"/a\x01",
            b"/a b",
            b"/a\tb",
            b"/\"x\"",
            b"/<a>",
            b"/a#b",
            b"/a\\..\\b",
            b"http://b.example\xff/",
        ] {
            assert!(!target_bytes_valid(bad), "{bad:?}");
        }
    }

    fn limits() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(1),
            max_headers: 100,
            max_header_bytes: 64 * 1024,
        }
    }

    fn parse(input: &[u8]) -> Result<Option<Head>, Refused> {
        parse_head(&mut BytesMut::from(input), &limits())
    }

    #[test]
    fn heads_and_their_framing() {
        let h = parse(b"GET /a?b HTTP/1.1\r\nHost: x\r\n\r\n")
            .ok()
            .flatten();
        let h = h.expect("complete");
        assert_eq!(h.method, Method::GET);
        assert_eq!(h.uri.path(), "/a");
        assert_eq!(h.framing, Framing::Done);
        assert!(h.keep_alive && !h.upgrade && !h.expect_continue);

        let h = parse(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        );
        let h = h.ok().flatten().expect("complete");
        assert_eq!(h.framing, Framing::Length(5));
        assert!(h.expect_continue);

        let h = parse(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n");
        let h = h.ok().flatten().expect("complete");
        assert_eq!(h.framing, Framing::Chunked(ChunkState::Size));
        assert!(!h.keep_alive);

        let h = parse(b"GET / HTTP/1.0\r\n\r\n")
            .ok()
            .flatten()
            .expect("complete");
        assert!(!h.keep_alive);
        let h = parse(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(h.ok().flatten().expect("complete").keep_alive);

        let h = parse(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        );
        assert!(h.ok().flatten().expect("complete").upgrade);

        assert!(matches!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None)));
    }

    /// `input` is refused, with `status`.
    fn assert_refused_with(input: &[u8], status: StatusCode) {
        let text = String::from_utf8_lossy(input);
        match parse(input) {
            Err(r) => assert_eq!(r.status, status, "{text:?}"),
            Ok(_) => panic!("accepted {text:?}"),
        }
    }

    #[test]
    fn transfer_codings_other_than_chunked_are_501_where_chunked_frames_the_body() {
        for (input, status) in [
            (&b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"[..], StatusCode::NOT_IMPLEMENTED),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n", StatusCode::NOT_IMPLEMENTED),
            // chunked not last, twice, or absent: the body's length cannot be known (RFC 9112 6.3).
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", StatusCode::BAD_REQUEST),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n", StatusCode::BAD_REQUEST),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked, chunked\r\n\r\n", StatusCode::BAD_REQUEST),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", StatusCode::BAD_REQUEST),
            (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", StatusCode::BAD_REQUEST),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", StatusCode::BAD_REQUEST),
        ] {
            assert_refused_with(input, status);
        }
        // Empty list elements are no codings (RFC 9110 5.6.1): still one chunked.
        for input in [
            &b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked,\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: , chunked ,,\r\n\r\n",
        ] {
            let h = parse(input).ok().flatten().expect("accepted");
            assert!(matches!(h.framing, Framing::Chunked(_)), "{input:?}");
        }
    }

    #[test]
    fn other_http_versions_are_505_and_garbled_ones_400() {
        // A later HTTP/1 minor version is read as HTTP/1.1 (RFC 9110 2.5), whole or in parts.
        for input in [
            &b"GET /a HTTP/1.2\r\nHost: a\r\n\r\n"[..],
            b"\r\nGET /a HTTP/1.9\r\nHost: a\r\n\r\n",
        ] {
            let h = parse(input).ok().flatten().expect("read as HTTP/1.1");
            assert_eq!((h.version, h.uri.path()), (Version::HTTP_11, "/a"));
            assert!(h.keep_alive);
        }
        // The status does not depend on how the line arrives.
        let mut b = BytesMut::from(&b"GET / HTTP/2"[..]);
        assert!(matches!(parse_head(&mut b, &limits()), Ok(None)));
        b.extend_from_slice(b".0\r\nHost: a\r\n\r\n");
        assert!(parse_head(&mut b, &limits())
            .is_err_and(|r| r.status == StatusCode::HTTP_VERSION_NOT_SUPPORTED));
        // The version is the third token: a line with a stray word is malformed, and its
        // buffer is left as it came.
        let mut b = BytesMut::from(&b"GET / X HTTP/1.2\r\nHost: a\r\n\r\n"[..]);
        assert!(parse_head(&mut b, &limits()).is_err_and(|r| r.status == StatusCode::BAD_REQUEST));
        assert!(b.starts_with(b"GET / X HTTP/1.2\r\n"));
        let mut b = BytesMut::from(&b"GET /a HTTP/1.2"[..]);
        assert!(matches!(parse_head(&mut b, &limits()), Ok(None)));
        b.extend_from_slice(b"\r\nHost: a\r\n\r\n");
        let h = parse_head(&mut b, &limits())
            .ok()
            .flatten()
            .expect("complete");
        assert_eq!(h.version, Version::HTTP_11);

        for (input, status) in [
            (
                &b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"[..],
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            ),
            (
                b"GET / HTTP/3.0\r\nHost: a\r\n\r\n",
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            ),
            (
                b"GET / HTTP/0.9\r\nHost: a\r\n\r\n",
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            ),
            (
                b"GET / HTTP/1.x\r\nHost: a\r\n\r\n",
                StatusCode::BAD_REQUEST,
            ),
            (
                b"GET / HTTP/22.0\r\nHost: a\r\n\r\n",
                StatusCode::BAD_REQUEST,
            ),
            (b"GET / FTP/2.0\r\nHost: a\r\n\r\n", StatusCode::BAD_REQUEST),
            (
                b"\r\nGET / HTTP/2.0\r\nHost: a\r\n\r\n",
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            ),
            (
                b"GET / HTTP/1.23\r\nHost: a\r\n\r\n",
                StatusCode::BAD_REQUEST,
            ),
        ] {
            assert_refused_with(input, status);
        }
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        let cases: &[(&[u8], Option<&str>)] = &[
            (b"GET / HTTP/1.1\nHost: x\r\n\r\n", Some("bare_lf")),
            (b"GET / HTTP/1.1\r\nHost: x\n\r\n", Some("bare_lf")),
            (b"GET / HTTP/1.1\r\nHost: x\r\n\n", Some("bare_lf")),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                Some("cl_te"),
            ),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                Some("cl_te"),
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", None),
            (b"POST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n", None),
            (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", None),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", None),
            (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", None),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", None),
            (b"GET / HTTP/1.1\r\nX-A: b\r\n c\r\n\r\n", None),
            (b"GET / HTTP/1.1\r\nX-A : b\r\n\r\n", None),
            (b"GET / HTTP/1.1\r\nX-A: b\0c\r\n\r\n", None),
            (b"GET / HTTP/1.1\r\nX-A: b\rc\r\n\r\n", None),
            (b"GET / HTTP/1.x\r\n\r\n", None),
        ];
        for (input, metric) in cases {
            let got = parse(input);
            let text = String::from_utf8_lossy(input);
            match got {
                Err(r) => {
                    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{text:?}");
                    assert_eq!(r.metric, *metric, "{text:?}");
                }
                Ok(_) => panic!("accepted {text:?}"),
            }
        }
    }

    #[test]
    fn limits_are_431() {
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..101 {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let r = parse(&many).err().expect("refused");
        assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        // Past the stack slots but within max_headers: parsed.
        let mut ok = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..90 {
            ok.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        ok.extend_from_slice(b"\r\n");
        assert_eq!(parse(&ok).ok().flatten().map(|h| h.headers.len()), Some(90));
        let mut partial = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        partial.extend(std::iter::repeat_n(b'a', 70_000));
        let r = parse(&partial).err().expect("refused");
        assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }

    /// A request line that alone is longer than `max_header_bytes` is 414 (RFC 9112 3), whether
    /// it is still arriving or came whole; a head that is too large for its fields is 431.
    #[test]
    fn a_request_line_over_the_head_limit_is_414() {
        let mut open = b"\r\nGET /".to_vec();
        open.extend(std::iter::repeat_n(b'a', 70_000));
        let r = parse(&open).err().expect("refused");
        assert_eq!(r.status, StatusCode::URI_TOO_LONG);
        let mut whole = open.clone();
        whole.extend_from_slice(b" HTTP/1.1\r\nHost: a\r\n\r\n");
        let r = parse(&whole).err().expect("refused");
        assert_eq!(r.status, StatusCode::URI_TOO_LONG);
        // A long line that fits, with a field that makes the head too large: 431.
        let mut fields = b"GET /".to_vec();
        fields.extend(std::iter::repeat_n(b'a', 40_000));
        fields.extend_from_slice(b" HTTP/1.1\r\nX-Big: ");
        fields.extend(std::iter::repeat_n(b'b', 40_000));
        fields.extend_from_slice(b"\r\n\r\n");
        let r = parse(&fields).err().expect("refused");
        assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        // The method alone over the limit: 501 (RFC 9112 3), arriving or whole.
        let mut method = vec![b'G'; 70_000];
        let r = parse(&method).err().expect("refused");
        assert_eq!(r.status, StatusCode::NOT_IMPLEMENTED);
        method.extend_from_slice(b" / HTTP/1.1\r\nHost: a\r\n\r\n");
        let r = parse(&method).err().expect("refused");
        assert_eq!(r.status, StatusCode::NOT_IMPLEMENTED);
    }

    /// A refused head's fields, for the access log: those on complete lines after the request
    /// line, up to the first line that is not a field (nothing after it), names in any case,
    /// values without their surrounding whitespace; a line cut short by the head limit is not
    /// read.
    #[test]
    fn a_refused_heads_fields_are_read_up_to_the_first_bad_line() {
        let ua = header::USER_AGENT;
        let referer = header::REFERER;
        // Parsed, then refused for its framing (the head was split off the buffer).
        let r = parse(
            b"\r\nGET / HTTP/1.1\r\nuser-AGENT:  curl/8 \t\r\nReferer: http://r/\r\n\
              Content-Length: 1\r\nContent-Length: 2\r\n\r\n",
        )
        .err()
        .expect("refused");
        assert_eq!(
            r.field(&ua).as_ref().map(|v| v.as_bytes()),
            Some(&b"curl/8"[..])
        );
        assert_eq!(
            r.field(&referer).as_ref().map(|v| v.as_bytes()),
            Some(&b"http://r/"[..])
        );
        assert_eq!(r.field(&header::ACCEPT), None);
        // Refused by httparse at a bad line (still in the buffer): the fields before it only.
        let r = parse(b"GET / HTTP/1.1\r\nUser-Agent: a\r\nBad Field: x\r\nReferer: b\r\n\r\n")
            .err()
            .expect("refused");
        assert_eq!(r.field(&ua).as_ref().map(|v| v.as_bytes()), Some(&b"a"[..]));
        assert_eq!(r.field(&referer), None);
        // Over the head limit: the complete lines are read, the last, cut short, is not.
        let mut big = b"GET / HTTP/1.1\r\nUser-Agent: big\r\nX-Big: ".to_vec();
        big.extend(std::iter::repeat_n(b'b', 70_000));
        let r = parse(&big).err().expect("refused");
        assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        assert_eq!(
            r.field(&ua).as_ref().map(|v| v.as_bytes()),
            Some(&b"big"[..])
        );
        assert_eq!(r.field(&header::HeaderName::from_static("x-big")), None);
        // No fields at all.
        let r = parse(b"hello\r\n\r\n").err().expect("refused");
        assert_eq!(r.field(&ua), None);
    }

    /// Every prefix of a valid head is incomplete, never refused; the whole is the same head.
    #[test]
    fn heads_in_any_split() {
        let input = b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nX-A: 1\r\n\r\nhi";
        let head_len = input.len() - 2;
        for cut in 0..head_len {
            assert!(matches!(parse(&input[..cut]), Ok(None)), "cut at {cut}");
        }
        let mut buf = BytesMut::from(&input[..]);
        let h = parse_head(&mut buf, &limits())
            .ok()
            .flatten()
            .expect("complete");
        assert_eq!(h.framing, Framing::Length(2));
        assert_eq!(&buf[..], b"hi");
    }

    /// Hands out `data` in random pieces of 1 to 64 bytes, like a socket under load.
    struct Pieces {
        data: Vec<u8>,
        at: usize,
        rng: fastrand::Rng,
    }

    impl AsyncRead for Pieces {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let left = self.data.len() - self.at;
            let n = self.rng.usize(1..=64).min(left).min(out.remaining());
            let at = self.at;
            out.put_slice(&self.data[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }

    /// What the server reads off a stream: each request's method and body, until the end or
    /// a refusal (with its metric reason and the index of the refused request).
    async fn serve_stream(
        data: Vec<u8>,
        rng: &mut fastrand::Rng,
    ) -> (Vec<(Method, Vec<u8>)>, Option<Option<&'static str>>) {
        use http_body_util::BodyExt;
        let pieces = Pieces {
            data,
            at: 0,
            rng: fastrand::Rng::with_seed(rng.u64(..)),
        };
        let mut r = Reader::new(Box::new(pieces), BytesMut::new());
        let mut seen = Vec::new();
        loop {
            let head = loop {
                match parse_head(&mut r.buf, &limits()) {
                    Ok(Some(h)) => break h,
                    Ok(None) => {}
                    Err(refused) => return (seen, Some(refused.metric)),
                }
                let n = std::future::poll_fn(|cx| r.poll_fill(cx))
                    .await
                    .expect("read");
                if n == 0 {
                    assert!(r.buf.is_empty(), "a partial request was left");
                    return (seen, None);
                }
            };
            if head.framing == Framing::Done {
                seen.push((head.method, Vec::new()));
                continue;
            }
            let (tx, rx) = oneshot::channel();
            let body = Streaming {
                reader: Some(r),
                framing: head.framing,
                back: Some(tx),
                go_on: None,
            };
            let collected = body.collect().await.expect("body");
            let back = rx.await.expect("the read half came back");
            assert!(back.complete);
            r = back.reader;
            seen.push((head.method, collected.to_bytes().to_vec()));
        }
    }

    /// A random valid request and the body it carries: GET, or POST with a length body or a
    /// chunked one (extensions, trailers), bodies full of CR and LF, and header names that only
    /// look like framing ones.
    fn random_request(rng: &mut fastrand::Rng) -> (Vec<u8>, Vec<u8>) {
        let mut r = Vec::new();
        let decoys = [
            "Content-Lengthy: 3",
            "Transfer-Encodings: gzip",
            "Upgrade-Insecure-Requests: 1",
            "X-Content-Length: 9",
            "Accept: */*",
            "Cookie: a=b; c=d",
        ];
        let method = rng.u8(..3);
        r.extend_from_slice(if method == 0 {
            b"GET /a?b=c HTTP/1.1\r\n"
        } else {
            b"POST /u HTTP/1.1\r\n"
        });
        r.extend_from_slice(b"Host: example.com\r\n");
        for _ in 0..rng.usize(..4) {
            r.extend_from_slice(decoys[rng.usize(..decoys.len())].as_bytes());
            r.extend_from_slice(b"\r\n");
        }
        let noise = |rng: &mut fastrand::Rng, n: usize| -> Vec<u8> {
            (0..n)
                .map(|_| b"\r\nab0;:\x00\xff"[rng.usize(..9)])
                .collect()
        };
        let mut body = Vec::new();
        match method {
            0 => r.extend_from_slice(b"\r\n"),
            1 => {
                let n = rng.usize(1..300);
                body = noise(rng, n);
                r.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
                r.extend_from_slice(&body);
            }
            _ => {
                r.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                for _ in 0..rng.usize(..4) {
                    let n = rng.usize(1..100);
                    let data = noise(rng, n);
                    r.extend_from_slice(format!("{:x}", data.len()).as_bytes());
                    if rng.bool() {
                        r.extend_from_slice(b";ext=\"v\"");
                    }
                    r.extend_from_slice(b"\r\n");
                    r.extend_from_slice(&data);
                    r.extend_from_slice(b"\r\n");
                    body.extend_from_slice(&data);
                }
                r.extend_from_slice(b"0\r\n");
                if rng.bool() {
                    r.extend_from_slice(b"X-Checksum: 1\r\n");
                }
                r.extend_from_slice(b"\r\n");
            }
        }
        (r, body)
    }

    /// Random keep-alive streams of valid requests, read in random pieces, come out as the
    /// same requests with the same bodies; a bare LF or CL+TE planted in one request's head is
    /// refused at that request, with its reason, and nothing after it is read.
    #[tokio::test]
    async fn random_request_streams_and_planted_faults() {
        let mut rng = fastrand::Rng::with_seed(0x9a4d);
        for _ in 0..5_000 {
            let reqs: Vec<(Vec<u8>, Vec<u8>)> = (0..rng.usize(1..6))
                .map(|_| random_request(&mut rng))
                .collect();
            let stream: Vec<u8> = reqs.iter().flat_map(|(r, _)| r.clone()).collect();
            let text = String::from_utf8_lossy(&stream).to_string();
            let (seen, refused) = serve_stream(stream, &mut rng).await;
            assert_eq!(refused, None, "{text:?}");
            assert_eq!(seen.len(), reqs.len(), "{text:?}");
            for ((_, body), (_, want)) in seen.iter().zip(&reqs) {
                assert_eq!(body, want, "{text:?}");
            }

            let victim = rng.usize(..reqs.len());
            let mut bad: Vec<Vec<u8>> = reqs.iter().map(|(r, _)| r.clone()).collect();
            let head_end = bad[victim]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .unwrap_or(0);
            let kind = if rng.bool() {
                // A bare LF: drop the CR of one line end in the head.
                let crs: Vec<usize> = (0..=head_end)
                    .filter(|&i| bad[victim][i] == b'\r')
                    .collect();
                bad[victim].remove(crs[rng.usize(..crs.len())]);
                "bare_lf"
            } else {
                let has = |req: &[u8], name: &[u8]| {
                    req[..head_end].split(|b| *b == b'\n').any(|l| {
                        l.iter()
                            .position(|b| *b == b':')
                            .is_some_and(|c| l[..c].eq_ignore_ascii_case(name))
                    })
                };
                let plant: &[u8] = match (
                    has(&bad[victim], b"content-length"),
                    has(&bad[victim], b"transfer-encoding"),
                ) {
                    (true, _) => b"Transfer-Encoding: chunked\r\n",
                    (_, true) => b"Content-Length: 1\r\n",
                    _ => b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n",
                };
                let host_end = bad[victim]
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .unwrap_or(0)
                    + 2;
                bad[victim].splice(host_end..host_end, plant.iter().copied());
                "cl_te"
            };
            let stream = bad.concat();
            let text = String::from_utf8_lossy(&stream).to_string();
            let (seen, refused) = serve_stream(stream, &mut rng).await;
            assert_eq!(refused, Some(Some(kind)), "{text:?}");
            assert_eq!(seen.len(), victim, "refused at the wrong request: {text:?}");
        }
    }

    /// A handler that answers each request with its method, path and body length.
    struct Echo;

    impl Handler for Echo {
        type RequestBody = RequestBody;
        type Body = http_body_util::Full<Bytes>;

        async fn call(
            &self,
            req: Request<RequestBody>,
            _on_upgrade: Option<OnUpgrade>,
        ) -> Response<Self::Body> {
            use http_body_util::BodyExt;
            let line = format!("{} {} ", req.method(), req.uri().path());
            let len = match req.into_body().collect().await {
                Ok(b) => b.to_bytes().len().to_string(),
                Err(e) => e.to_string(),
            };
            Response::new(http_body_util::Full::new(Bytes::from(line + &len)))
        }

        fn shutting_down(&self) -> bool {
            false
        }

        fn until_shutdown(&self) -> impl Future<Output = ()> + Send {
            std::future::pending()
        }
    }

    /// The whole connection loop around a handler: pipelined requests, a chunked body, and
    /// `Connection: close` ending the connection after its answer.
    #[tokio::test]
    async fn a_handler_serves_pipelined_requests_on_one_connection() {
        use tokio::io::AsyncReadExt;
        let (mut client, server_side) = tokio::io::duplex(64 * 1024);
        let (r, w) = tokio::io::split(server_side);
        let settings = Settings {
            limits: limits(),
            idle_at_shutdown: Duration::from_millis(10),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let reader = Reader::new(Box::new(r), BytesMut::new());
        let server = tokio::spawn(serve(reader, Box::new(w), Echo, settings, deadline));
        client
            .write_all(
                b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
                  POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
                  3\r\nabc\r\n0\r\n\r\n\
                  PUT /c HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
            )
            .await
            .expect("write");
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut out))
            .await
            .expect("the server closes after `Connection: close`")
            .expect("read");
        let out = String::from_utf8(out).expect("utf-8");
        assert_eq!(out.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{out}");
        let (a, b, c) = (
            out.find("GET /a 0").expect("first answer"),
            out.find("POST /b 3").expect("second answer"),
            out.find("PUT /c 2").expect("third answer"),
        );
        assert!(a < b && b < c, "{out}");
        assert_eq!(out.matches("connection: close\r\n").count(), 1, "{out}");
        server.await.expect("the connection task ends");
    }

    /// A body that announces `announced` bytes (its exact size hint, which the head's
    /// Content-Length says) and gives `data`, then ends.
    struct Liar {
        announced: u64,
        data: Option<Bytes>,
    }

    impl Body for Liar {
        type Data = Bytes;
        type Error = io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
            Poll::Ready(self.data.take().map(|d| Ok(Frame::data(d))))
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.announced)
        }
    }

    impl BodyFields for Liar {}

    /// Answers `/short` with 5 of 10 announced bytes, `/long` with 5 of 3, anything else with
    /// 2 of 2.
    struct Lying;

    impl Handler for Lying {
        type RequestBody = RequestBody;
        type Body = Liar;

        async fn call(&self, req: Request<RequestBody>, _: Option<OnUpgrade>) -> Response<Liar> {
            let (announced, data) = match req.uri().path() {
                "/short" => (10, "12345"),
                "/long" => (3, "12345"),
                _ => (2, "ok"),
            };
            Response::new(Liar {
                announced,
                data: Some(Bytes::from_static(data.as_bytes())),
            })
        }

        fn shutting_down(&self) -> bool {
            false
        }

        fn until_shutdown(&self) -> impl Future<Output = ()> + Send {
            std::future::pending()
        }
    }

    /// A response body that ends short of the Content-Length its head announced, or would go
    /// past it, is never finished cleanly: the connection closes after what fits (the client
    /// sees a cut response), and the request pipelined behind it is not answered into the
    /// missing bytes.
    #[tokio::test]
    async fn a_body_that_breaks_its_announced_length_closes_the_connection() {
        use tokio::io::AsyncReadExt;
        for (path, want) in [("/short", "12345"), ("/long", "")] {
            let (mut client, server_side) = tokio::io::duplex(64 * 1024);
            let (r, w) = tokio::io::split(server_side);
            let settings = Settings {
                limits: limits(),
                idle_at_shutdown: Duration::from_millis(10),
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            let reader = Reader::new(Box::new(r), BytesMut::new());
            let server = tokio::spawn(serve(reader, Box::new(w), Lying, settings, deadline));
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\n\r\nGET /ok HTTP/1.1\r\nHost: x\r\n\r\n"
            );
            client.write_all(req.as_bytes()).await.expect("write");
            let mut out = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut out))
                .await
                .expect("the connection stayed open after a body that broke its length")
                .expect("read");
            let out = String::from_utf8(out).expect("utf-8");
            assert_eq!(
                out.matches("HTTP/1.1 200 OK\r\n").count(),
                1,
                "{path}: {out:?}"
            );
            let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            assert_eq!(body, want, "{path}: {out:?}");
            server.await.expect("the connection task ends");
        }
    }
}
