//! HTTP/1.1 framing, in one copy for the [`server`](super::server) and the
//! [`client`](super::client): header spans of a parsed head, lengths, the framing decision,
//! chunked bodies (decoding and encoding) and their trailers. Errors are short reasons that the
//! caller turns into its own error (a 400 toward clients, a 502 toward upstreams).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};

use super::headers::{edge_whitespace, put_header, trailer_allowed};

/// Longest chunk-size line (with extensions).
pub const MAX_CHUNK_LINE: usize = 4096;
/// Largest trailer section after a client's chunked body.
pub const MAX_TRAILERS: usize = 16 * 1024;
/// Largest trailer section after an upstream's chunked body: as large as its head may be
/// (128 KiB), as on an h2 pool (a gRPC error's long `grpc-message` comes in the trailers).
pub const MAX_UPSTREAM_TRAILERS: usize = 128 * 1024;
/// Most fields in one trailer section.
const MAX_TRAILER_FIELDS: usize = 128;

pub fn parse_length(v: &[u8]) -> Result<u64, &'static str> {
    let v = v.trim_ascii();
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return Err("invalid Content-Length");
    }
    // 1*DIGIT (RFC 9110 8.6): leading zeros count for nothing; past 19 digits what is left would
    // overflow the sum below (and is past 2^63 - 1 anyway).
    let start = v.iter().position(|&d| d != b'0').unwrap_or(v.len());
    let v = &v[start..];
    if v.len() > 19 {
        return Err("invalid Content-Length");
    }
    let n = v.iter().fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
    // Past 2^63 - 1 many parsers (signed 64-bit) read another length: refused, not relayed.
    if n > i64::MAX as u64 {
        return Err("invalid Content-Length");
    }
    Ok(n)
}

/// A request body's chunked framing broken (a size line, the CRLF after a chunk's data, the
/// trailer section): what the server's body ends with (inside an `io::Error`), so that the
/// answer can tell the client that its framing, not the transfer, failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidChunked(pub &'static str);

impl std::fmt::Display for InvalidChunked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid chunked framing: {}", self.0)
    }
}

impl std::error::Error for InvalidChunked {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// What one step of chunked decoding produced.
pub enum Chunked {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
    NeedMore,
}

/// Who sent a chunked body: a client's trailer section is held to the grammar, an upstream's
/// may have whitespace between a field name and its colon, which a proxy removes (RFC 9112
/// 5.1) as it does in the response's head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    Client,
    Upstream,
}

/// `*( BWS ";" BWS chunk-ext-name [ BWS "=" BWS chunk-ext-val ] )` (RFC 9112 7.1.1), from the
/// first `;`: each name a token, each value a token or a quoted-string.
fn chunk_ext_valid(mut ext: &[u8]) -> bool {
    fn bws(s: &[u8]) -> &[u8] {
        let n = s.iter().take_while(|b| matches!(b, b' ' | b'\t')).count();
        &s[n..]
    }
    fn token(s: &[u8]) -> Option<&[u8]> {
        let n = s.iter().take_while(|b| is_tchar(**b)).count();
        (n > 0).then(|| &s[n..])
    }
    // qdtext, and what a quoted-pair may escape: HTAB, SP, VCHAR, obs-text.
    let text = |c: u8| c == b'\t' || (c >= 0x20 && c != 0x7f);
    loop {
        ext = bws(ext);
        if ext.is_empty() {
            return true;
        }
        let Some(rest) = ext.strip_prefix(b";") else {
            return false;
        };
        let Some(rest) = token(bws(rest)) else {
            return false;
        };
        ext = bws(rest);
        let Some(value) = ext.strip_prefix(b"=") else {
            continue;
        };
        let value = bws(value);
        ext = if let Some(quoted) = value.strip_prefix(b"\"") {
            let mut i = 0;
            loop {
                match quoted.get(i) {
                    Some(b'"') => break,
                    Some(b'\\') if quoted.get(i + 1).is_some_and(|&c| text(c)) => i += 2,
                    Some(&c) if c != b'\\' && text(c) => i += 1,
                    _ => return false,
                }
            }
            &quoted[i + 1..]
        } else {
            match token(value) {
                Some(rest) => rest,
                None => return false,
            }
        };
    }
}

/// A token character (RFC 9110 5.6.2).
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Decodes chunked framing off the front of `buf`.
pub fn decode_chunked(
    buf: &mut BytesMut,
    st: &mut ChunkState,
    from: Sender,
) -> Result<Chunked, &'static str> {
    loop {
        match *st {
            ChunkState::Size => {
                let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                    return Ok(Chunked::NeedMore);
                };
                let digits = line
                    .iter()
                    .position(|b| !b.is_ascii_hexdigit())
                    .unwrap_or(line.len());
                // chunk-size [BWS ";" extensions]: nothing else may follow the size, and
                // whitespace only before a `;` (RFC 9112 7.1).
                let after = &line[digits..];
                let bws = after
                    .iter()
                    .take_while(|b| matches!(b, b' ' | b'\t'))
                    .count();
                let rest = &after[bws..];
                let significant = line[..digits].iter().skip_while(|d| **d == b'0').count();
                let tail_ok = match rest.first() {
                    Some(b';') => true,
                    Some(_) => false,
                    None => bws == 0,
                };
                if digits == 0 || significant > 15 || !tail_ok || rest.contains(&b'\r') {
                    return Err("invalid chunk size");
                }
                // A client's extensions are held to their grammar; an upstream's are read
                // leniently (dropped either way: the proxy writes its own chunk lines).
                if from == Sender::Client && !rest.is_empty() && !chunk_ext_valid(rest) {
                    return Err("invalid chunk extension");
                }
                let size = line[..digits].iter().fold(0u64, |acc, d| {
                    acc * 16 + u64::from((*d as char).to_digit(16).unwrap_or(0))
                });
                *st = if size == 0 {
                    ChunkState::Trailers
                } else {
                    ChunkState::Data(size)
                };
            }
            ChunkState::Data(left) => {
                if buf.is_empty() {
                    return Ok(Chunked::NeedMore);
                }
                let take = (buf.len() as u64).min(left) as usize;
                let data = buf.split_to(take).freeze();
                *st = if left == take as u64 {
                    ChunkState::DataEnd
                } else {
                    ChunkState::Data(left - take as u64)
                };
                return Ok(Chunked::Data(data));
            }
            ChunkState::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Chunked::NeedMore);
                }
                if &buf[..2] != b"\r\n" {
                    return Err("chunk not followed by CRLF");
                }
                buf.advance(2);
                *st = ChunkState::Size;
            }
            ChunkState::Trailers => return take_trailers(buf, from),
        }
    }
}

/// The trailer section after the last chunk, taken only once it is complete (up to its empty
/// line), so that nothing is consumed from a section still arriving; the fields a trailer may
/// not carry are left out.
pub fn take_trailers(buf: &mut BytesMut, from: Sender) -> Result<Chunked, &'static str> {
    if buf.first() == Some(&b'\n') {
        return Err("trailer line not ended by CRLF");
    }
    if buf.len() < 2 {
        return Ok(Chunked::NeedMore);
    }
    if &buf[..2] == b"\r\n" {
        buf.advance(2);
        return Ok(Chunked::End);
    }
    let max = match from {
        Sender::Client => MAX_TRAILERS,
        Sender::Upstream => MAX_UPSTREAM_TRAILERS,
    };
    let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
        if buf.len() > max {
            return Err("trailers too large");
        }
        // A lone LF cannot be part of a section that ends in CRLF CRLF: refused now, not after
        // waiting for an end that never comes.
        if memchr::memchr_iter(b'\n', buf).any(|i| i == 0 || buf[i - 1] != b'\r') {
            return Err("trailer line not ended by CRLF");
        }
        return Ok(Chunked::NeedMore);
    };
    if end + 4 > max {
        return Err("trailers too large");
    }
    let section = buf.split_to(end + 4).freeze();
    let mut trailers = HeaderMap::new();
    for raw in section[..end + 2].split_inclusive(|b| *b == b'\n') {
        let line = raw
            .strip_suffix(b"\r\n")
            .filter(|l| !l.contains(&b'\r'))
            .ok_or("trailer line not ended by CRLF")?;
        let colon = line
            .iter()
            .position(|b| *b == b':')
            .ok_or("invalid trailer")?;
        let mut name = &line[..colon];
        if from == Sender::Upstream {
            // SP and HTAB only (RFC 9112 5.1), as in the head.
            while let [rest @ .., b' ' | b'\t'] = name {
                name = rest;
            }
        }
        let name = HeaderName::from_bytes(name).map_err(|_| "invalid trailer name")?;
        let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii())
            .map_err(|_| "invalid trailer value")?;
        if trailers.len() >= MAX_TRAILER_FIELDS {
            return Err("too many trailers");
        }
        // Framing, hop-by-hop and routing fields do not belong in trailers (RFC 9110 6.5.1):
        // dropped here for every client, as HTTP/2 ones reset the stream on a connection-
        // specific field (RFC 9113 8.2.2), losing the whole response.
        if trailer_allowed(&name) {
            trailers.append(name, value);
        }
    }
    if trailers.is_empty() {
        // Nothing left: the body simply ends (no empty trailer section for h2 clients).
        return Ok(Chunked::End);
    }
    Ok(Chunked::Trailers(trailers))
}

/// Takes one CRLF-terminated line (without the CRLF) off `buf`; `None` if incomplete.
pub fn take_line(buf: &mut BytesMut, max: usize) -> Result<Option<Bytes>, &'static str> {
    match memchr::memchr(b'\n', buf) {
        // The same limit however the bytes arrived (one read or many).
        Some(i) if i > max => Err("line too long"),
        Some(i) => {
            if i == 0 || buf[i - 1] != b'\r' {
                return Err("line not ended by CRLF");
            }
            let line = buf.split_to(i + 1).freeze();
            Ok(Some(line.slice(..i - 1)))
        }
        None if buf.len() > max => Err("line too long"),
        None => Ok(None),
    }
}

/// Where one header's name and value lie in the head's buffer: name offset, name length,
/// value offset, value length.
pub type Span = (u32, u32, u32, u32);

/// The [`Span`]s of httparse's headers in `buf` (which they borrow), in `small` when they fit,
/// else in `large`: the values can then share the head's buffer once it is frozen.
#[inline]
pub fn header_spans<'s>(
    buf: &[u8],
    parsed: &[httparse::Header<'_>],
    small: &'s mut [Span],
    large: &'s mut Vec<Span>,
) -> &'s [Span] {
    let base = buf.as_ptr() as usize;
    let spans = if parsed.len() <= small.len() {
        &mut small[..parsed.len()]
    } else {
        large.resize(parsed.len(), (0, 0, 0, 0));
        &mut large[..]
    };
    for (span, h) in spans.iter_mut().zip(parsed.iter()) {
        let n = h.name.as_ptr() as usize - base;
        let v = h.value.as_ptr() as usize - base;
        *span = (
            n as u32,
            h.name.len() as u32,
            v as u32,
            h.value.len() as u32,
        );
    }
    spans
}

/// Which part of a header line is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadHeader {
    Name,
    Value,
}

/// The header at `span` of the frozen `head`; the value shares its buffer.
#[inline]
pub fn header_at(head: &Bytes, span: Span) -> Result<(HeaderName, HeaderValue), BadHeader> {
    let (n, nl, v, vl) = span;
    let name = HeaderName::from_bytes(&head[n as usize..(n + nl) as usize])
        .map_err(|_| BadHeader::Name)?;
    let value = HeaderValue::from_maybe_shared(head.slice(v as usize..(v + vl) as usize))
        .map_err(|_| BadHeader::Value)?;
    Ok((name, value))
}

/// What a head's `Content-Length` and `Transfer-Encoding` fields say, gathered while its
/// headers are read.
#[derive(Default)]
pub struct FramingFields {
    length: Option<u64>,
    te_lines: u32,
    chunked: bool,
    /// Across every `Transfer-Encoding` line: the codings named, how many are `chunked`, and
    /// whether the last one is.
    codings: u32,
    chunked_codings: u32,
    last_chunked: bool,
}

/// Framing a message may not be relayed with (request smuggling).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FramingError {
    InvalidLength,
    ConflictingLength,
    LengthAndTransferEncoding,
    UnsupportedTransferEncoding,
    /// `chunked` last, once, after a coding this side does not implement (`gzip, chunked`):
    /// the framing is clear, the coding is not supported (a request: 501, RFC 9112 6.1).
    UnimplementedCoding,
}

/// How a message's body is framed, by its fields alone (RFC 9112 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// Neither field: no body for a request, until close for a response.
    Unframed,
    Length(u64),
    Chunked,
}

impl FramingFields {
    /// One `Content-Length` line. A list of one value repeated (`2, 2`) is that value, as the
    /// same value on two lines is (RFC 9110 5.3: the two are one field value; 8.6 lets a
    /// recipient take it as the value); different values conflict. The length goes on as one
    /// value either way.
    #[inline]
    pub fn content_length(&mut self, value: &[u8]) -> Result<(), FramingError> {
        if !value.contains(&b',') {
            return self.one_length(value);
        }
        value
            .split(|b| *b == b',')
            .try_for_each(|element| self.one_length(element))
    }

    #[inline]
    fn one_length(&mut self, value: &[u8]) -> Result<(), FramingError> {
        let n = parse_length(value).map_err(|_| FramingError::InvalidLength)?;
        if self.length.is_some_and(|l| l != n) {
            return Err(FramingError::ConflictingLength);
        }
        self.length = Some(n);
        Ok(())
    }

    #[inline]
    pub fn transfer_encoding(&mut self, value: &[u8]) {
        self.te_lines += 1;
        // Empty list elements (`chunked,`) are ignored (RFC 9110 5.6.1): the line is chunked
        // when its one coding is.
        let (mut codings, mut chunked_codings) = (0u32, 0u32);
        for coding in value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
            if coding.is_empty() {
                continue;
            }
            let chunked = coding.eq_ignore_ascii_case(b"chunked");
            codings += 1;
            chunked_codings += u32::from(chunked);
            self.last_chunked = chunked;
        }
        self.chunked = codings == 1 && chunked_codings == 1;
        self.codings += codings;
        self.chunked_codings += chunked_codings;
    }

    /// The `Content-Length` seen, if any.
    #[inline]
    pub fn length(&self) -> Option<u64> {
        self.length
    }

    #[inline]
    pub fn has_transfer_encoding(&self) -> bool {
        self.te_lines > 0
    }

    /// The decision: a length, a single plain `chunked`, or neither; `Content-Length` with
    /// `Transfer-Encoding`, or any coding but one `chunked`, is refused.
    #[inline]
    pub fn decide(&self) -> Result<BodyFraming, FramingError> {
        match (self.te_lines, self.length) {
            (0, Some(n)) => Ok(BodyFraming::Length(n)),
            (0, None) => Ok(BodyFraming::Unframed),
            (_, Some(_)) => Err(FramingError::LengthAndTransferEncoding),
            (1, None) if self.chunked => Ok(BodyFraming::Chunked),
            _ if self.last_chunked && self.chunked_codings == 1 && self.codings > 1 => {
                Err(FramingError::UnimplementedCoding)
            }
            _ => Err(FramingError::UnsupportedTransferEncoding),
        }
    }
}

/// The size line in front of one chunk of `len` bytes (`len` > 0).
pub fn chunk_size_line(len: usize) -> Bytes {
    let mut line = [0u8; 18];
    let mut at = 16;
    let mut n = len;
    loop {
        at -= 1;
        line[at] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    line[16] = b'\r';
    line[17] = b'\n';
    Bytes::copy_from_slice(&line[at..])
}

/// What ends a chunk's data.
pub const CHUNK_END: &[u8] = b"\r\n";
/// The last chunk without trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// The last chunk with a trailer section: the fields a trailer may carry
/// ([`trailer_allowed`]), the others dropped, as is a value that begins or ends with
/// whitespace (an HTTP/2 client's: RFC 9113 8.2.1 makes it malformed; HTTP/1 parsers trim it).
pub fn last_chunk_with(trailers: &HeaderMap) -> Bytes {
    let mut t = BytesMut::from(&b"0\r\n"[..]);
    for (name, value) in trailers {
        if trailer_allowed(name) && !edge_whitespace(value.as_bytes()) {
            put_header(&mut t, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    t.put_slice(b"\r\n");
    t.freeze()
}

/// Whether `name` is `lower` (a lowercase name of letters, digits and `-`) in any case, for
/// bytes a parser accepted in a field name or value (no CR, LF or other control but HTAB).
/// Eight bytes at a time: among those bytes, setting the 0x20 bit maps only the uppercase
/// letters onto `lower`'s bytes (CR would map onto `-`); the byte-wise `eq_ignore_ascii_case`
/// cost ~10 instructions a byte.
#[inline]
pub fn name_is(name: &[u8], lower: &[u8]) -> bool {
    const CASE: u64 = 0x2020_2020_2020_2020;
    if name.len() != lower.len() {
        return false;
    }
    let mut a = name.chunks_exact(8);
    let mut b = lower.chunks_exact(8);
    for (x, y) in a.by_ref().zip(b.by_ref()) {
        if word(x) | CASE != word(y) | CASE {
            return false;
        }
    }
    a.remainder()
        .iter()
        .zip(b.remainder())
        .all(|(x, y)| x | 0x20 == y | 0x20)
}

/// Lowercases a field name (token characters only, all ASCII) in place, eight bytes at a time.
#[inline]
pub fn lowercase_name(name: &mut [u8]) {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let mut chunks = name.chunks_exact_mut(8);
    for chunk in chunks.by_ref() {
        let w = word(chunk);
        // Bytes are below 0x80, so these sums stay within each byte: the high bit says
        // "at least `A`" and "past `Z`".
        let at_least_a = w + ONES * (0x80 - u64::from(b'A'));
        let past_z = w + ONES * (0x80 - u64::from(b'Z') - 1);
        let upper = at_least_a & !past_z & (ONES * 0x80);
        chunk.copy_from_slice(&(w | (upper >> 2)).to_le_bytes());
    }
    chunks.into_remainder().make_ascii_lowercase();
}

#[inline]
fn word(bytes: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(w)
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunk_extensions_are_held_to_their_grammar() {
        for ok in [
            &b";a"[..],
            b";a=b",
            b" ; a = b ; c",
            b";a=\"b c\\\"d\"",
            b";a=\"\"",
            b";a=\"\xc3\xa9\"",
            b";a\t=\tb",
        ] {
            assert!(
                super::chunk_ext_valid(ok),
                "{:?}",
                String::from_utf8_lossy(ok)
            );
        }
        for bad in [
            &b";"[..],
            b";a=",
            b";a=\"b",
            b";a=\"b\\\"",
            b";a=b c",
            b";a b",
            b";a=\"b\"c",
            b";a=\"b\x7f\"",
            b";(a)",
            b";a=b;",
        ] {
            assert!(
                !super::chunk_ext_valid(bad),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    use super::*;

    /// `1*DIGIT`: any number of leading zeros is the same length; too large, empty or not
    /// digits is refused.
    #[test]
    fn lengths_take_leading_zeros_of_any_count() {
        for (v, n) in [
            (&b"5"[..], 5),
            (b"0", 0),
            (b"000", 0),
            (b" 000000000000000000005 ", 5),
            (
                b"0000000000000000000000000000009223372036854775807",
                i64::MAX as u64,
            ),
        ] {
            assert_eq!(parse_length(v), Ok(n), "{:?}", String::from_utf8_lossy(v));
        }
        for bad in [
            &b""[..],
            b"  ",
            b"-5",
            b"+5",
            b"5a",
            b"0x5",
            b"9223372036854775808",
            b"00000000009223372036854775808",
            b"18446744073709551616",
            b"99999999999999999999",
            b"000000000099999999999999999999",
        ] {
            assert!(
                parse_length(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// `Content-Length: 2, 2` is the value 2, as two lines of 2 are; a list of different values
    /// conflicts and an empty element is invalid, on one line or across lines.
    #[test]
    fn a_list_of_one_length_repeated_is_that_length() {
        let framed = |lines: &[&[u8]]| {
            let mut f = FramingFields::default();
            lines
                .iter()
                .try_for_each(|l| f.content_length(l))
                .map(|()| f.length())
        };
        assert_eq!(framed(&[b"2, 2"]), Ok(Some(2)));
        assert_eq!(framed(&[b"2,2,02"]), Ok(Some(2)));
        assert_eq!(framed(&[b"2", b"2"]), Ok(Some(2)));
        assert_eq!(framed(&[b"2, 2", b"2"]), Ok(Some(2)));
        assert_eq!(framed(&[b"2, 3"]), Err(FramingError::ConflictingLength));
        assert_eq!(
            framed(&[b"2", b"3, 3"]),
            Err(FramingError::ConflictingLength)
        );
        assert_eq!(framed(&[b"2,"]), Err(FramingError::InvalidLength));
        assert_eq!(framed(&[b", 2"]), Err(FramingError::InvalidLength));
    }

    /// A trailer section with a lone LF is refused at once, not left waiting for CRLF CRLF.
    #[test]
    fn trailers_with_a_lone_lf_are_refused_at_once() {
        for bad in [&b"\n"[..], b"\n\r\n", b"X-T: 1\n\r\n", b"X-T: 1\r\n\n"] {
            let mut b = BytesMut::from(bad);
            assert!(
                take_trailers(&mut b, Sender::Client).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut b = BytesMut::from(&b"X-T: 1\r\n"[..]);
        assert!(matches!(
            take_trailers(&mut b, Sender::Client),
            Ok(Chunked::NeedMore)
        ));
        b.extend_from_slice(b"\r\n");
        assert!(matches!(
            take_trailers(&mut b, Sender::Client),
            Ok(Chunked::Trailers(_))
        ));
    }

    /// A trailer section over 16 KiB is refused from a client and taken from an upstream up
    /// to 128 KiB, as large as its head may be.
    #[test]
    fn an_upstreams_trailers_may_be_as_large_as_its_head() {
        let section = |n: usize| {
            let mut t = b"grpc-status: 13\r\ngrpc-message: ".to_vec();
            t.extend(std::iter::repeat_n(b'm', n));
            t.extend_from_slice(b"\r\n\r\n");
            t
        };
        let mut b = BytesMut::from(&section(20_000)[..]);
        assert!(take_trailers(&mut b, Sender::Client).is_err());
        let mut b = BytesMut::from(&section(20_000)[..]);
        match take_trailers(&mut b, Sender::Upstream) {
            Ok(Chunked::Trailers(t)) => assert_eq!(t["grpc-message"].len(), 20_000),
            _ => panic!("trailers expected"),
        }
        let mut b = BytesMut::from(&section(MAX_UPSTREAM_TRAILERS)[..]);
        assert!(take_trailers(&mut b, Sender::Upstream).is_err());
        let mut b = BytesMut::from(&section(MAX_UPSTREAM_TRAILERS)[..100_000]);
        assert!(matches!(
            take_trailers(&mut b, Sender::Upstream),
            Ok(Chunked::NeedMore)
        ));
    }

    /// A chunk-size line over 4 KiB is refused whether it arrives in pieces or in one read
    /// with its CRLF (a 4,200-byte extension used to pass when it came whole).
    #[test]
    fn a_long_chunk_line_is_refused_however_it_arrives() {
        let mut line = b"5;".to_vec();
        line.extend_from_slice(&[b'x'; 4200]);
        line.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
        let mut st = ChunkState::Size;
        let mut whole = BytesMut::from(&line[..]);
        assert!(decode_chunked(&mut whole, &mut st, Sender::Client).is_err());
        let mut st = ChunkState::Size;
        let mut piece = BytesMut::from(&line[..4100]);
        assert!(decode_chunked(&mut piece, &mut st, Sender::Client).is_err());
        // At the limit it is taken.
        let mut ok = b"5;".to_vec();
        ok.extend_from_slice(&[b'x'; MAX_CHUNK_LINE - 3]);
        ok.extend_from_slice(b"\r\nhello\r\n");
        let mut st = ChunkState::Size;
        let mut b = BytesMut::from(&ok[..]);
        assert!(matches!(
            decode_chunked(&mut b, &mut st, Sender::Client),
            Ok(Chunked::Data(_))
        ));
    }

    /// Whitespace between a trailer's name and its colon: refused from a client, taken out of
    /// an upstream's (RFC 9112 5.1), as in the heads.
    #[test]
    fn whitespace_before_a_trailer_colon_is_an_upstream_s_only() {
        let mut b = BytesMut::from(&b"X-T : 1\r\n\r\n"[..]);
        assert!(take_trailers(&mut b, Sender::Client).is_err());
        let mut b = BytesMut::from(&b"X-T \t: 1\r\n\r\n"[..]);
        match take_trailers(&mut b, Sender::Upstream) {
            Ok(Chunked::Trailers(t)) => assert_eq!(t["x-t"], "1"),
            _ => panic!("trailers expected"),
        }
        let mut b = BytesMut::from(&b" : 1\r\n\r\n"[..]);
        assert!(take_trailers(&mut b, Sender::Upstream).is_err());
        let mut b = BytesMut::from(&b"X-T\x0c: 1\r\n\r\n"[..]);
        assert!(take_trailers(&mut b, Sender::Upstream).is_err());
    }

    /// A trailer section loses the fields a trailer may not carry; with none left the body
    /// simply ends, and what follows the section stays in the buffer.
    #[test]
    fn trailer_sections_keep_only_what_a_trailer_may_carry() {
        let mut b = BytesMut::from(
            &b"Connection: close\r\nHost: evil\r\nGrpc-Status: 0\r\nContent-Length: 9\r\n\r\nnext"
                [..],
        );
        match take_trailers(&mut b, Sender::Client) {
            Ok(Chunked::Trailers(t)) => {
                assert_eq!(t.len(), 1);
                assert_eq!(t["grpc-status"], "0");
            }
            _ => panic!("trailers expected"),
        }
        assert_eq!(&b[..], b"next");
        let mut b = BytesMut::from(&b"Connection: close\r\nKeep-Alive: 5\r\n\r\nnext"[..]);
        assert!(matches!(
            take_trailers(&mut b, Sender::Client),
            Ok(Chunked::End)
        ));
        assert_eq!(&b[..], b"next");
    }

    /// Trailers keep what a trailer may carry; a value that begins or ends with whitespace (an
    /// HTTP/2 client's, malformed by RFC 9113 8.2.1) stays behind with the framing fields.
    #[test]
    fn last_chunk_keeps_allowed_clean_trailers() {
        let mut t = HeaderMap::new();
        t.insert("x-good", http::HeaderValue::from_static("ok"));
        t.insert("x-lead", http::HeaderValue::from_static(" a"));
        t.insert("x-trail", http::HeaderValue::from_static("b\t"));
        t.insert("content-length", http::HeaderValue::from_static("5"));
        assert_eq!(&last_chunk_with(&t)[..], b"0\r\nx-good: ok\r\n\r\n");
    }

    #[test]
    fn chunk_size_lines_take_whitespace_only_before_an_extension() {
        let decode = |body: &[u8]| {
            let mut buf = BytesMut::from(body);
            let mut st = ChunkState::Size;
            let mut data = Vec::new();
            loop {
                match decode_chunked(&mut buf, &mut st, Sender::Client)? {
                    Chunked::Data(d) => data.extend_from_slice(&d),
                    Chunked::End | Chunked::Trailers(_) => return Ok(data),
                    Chunked::NeedMore => return Err("incomplete"),
                }
            }
        };
        for ok in [
            &b"5\r\nhello\r\n0\r\n\r\n"[..],
            b"5;ext\r\nhello\r\n0\r\n\r\n",
            b"5 ;ext\r\nhello\r\n0\r\n\r\n",
            b"5\t;ext=\"v\"\r\nhello\r\n0 ;x\r\n\r\n",
        ] {
            assert_eq!(decode(ok).as_deref(), Ok(&b"hello"[..]), "{ok:?}");
        }
        for bad in [
            &b"5 \r\nhello\r\n0\r\n\r\n"[..],
            b"5\t\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\r\n0 \r\n\r\n",
            b"5 x\r\nhello\r\n0\r\n\r\n",
        ] {
            assert!(decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn chunk_size_lines_are_hex() {
        assert_eq!(&chunk_size_line(1)[..], b"1\r\n");
        assert_eq!(&chunk_size_line(255)[..], b"ff\r\n");
        assert_eq!(&chunk_size_line(4096)[..], b"1000\r\n");
        assert_eq!(
            &chunk_size_line(usize::MAX)[..],
            format!("{:x}\r\n", usize::MAX).as_bytes()
        );
    }

    #[test]
    fn names_compare_and_lowercase_like_the_byte_wise_versions() {
        let names: &[&[u8]] = &[
            b"Content-Length",
            b"content-length",
            b"CONTENT-LENGTH",
            b"Content-Lengtx",
            b"Date",
            b"date",
            b"DatE",
            b"Connection",
            b"keep-alive",
            b"Keep-Alive",
            b"X-Custom_Field.1",
            b"Transfer-Encoding",
            b"te",
            b"TE",
            b"Upgrade",
            b"proxy-connection",
            b"A",
            b"",
            b"!#$%&'*+-.^_`|~09AZaz",
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZ[]@",
        ];
        let known: &[&[u8]] = &[
            b"content-length",
            b"date",
            b"connection",
            b"keep-alive",
            b"transfer-encoding",
            b"te",
            b"upgrade",
            b"proxy-connection",
            b"a",
        ];
        for name in names {
            for k in known {
                assert_eq!(
                    name_is(name, k),
                    name.eq_ignore_ascii_case(k),
                    "{:?} vs {:?}",
                    String::from_utf8_lossy(name),
                    String::from_utf8_lossy(k)
                );
            }
            let mut mine = name.to_vec();
            lowercase_name(&mut mine);
            assert_eq!(
                mine,
                name.to_ascii_lowercase(),
                "{:?}",
                String::from_utf8_lossy(name)
            );
        }
    }
}
