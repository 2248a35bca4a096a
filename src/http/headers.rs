//! Header rules shared by the server, the client and the proxy above them: the hop-by-hop set
//! (RFC 9110 7.6.1) and its removal, what a trailer section may carry, the forwarding header
//! names, header lines and the cached `Date`.

use bytes::{BufMut, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Bits of [`hop_bits`]: which hop-by-hop fields a header map carries.
pub const CONNECTION_BIT: u8 = 1;
pub const KEEP_ALIVE_BIT: u8 = 2;
pub const PROXY_CONNECTION_BIT: u8 = 4;
pub const TE_BIT: u8 = 8;
pub const TRANSFER_ENCODING_BIT: u8 = 16;
pub const UPGRADE_BIT: u8 = 32;

/// Removes hop-by-hop headers (RFC 9110 7.6.1) and every header named on any `Connection` line.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip_known(headers, hop_bits(headers))
}

/// Which hop-by-hop headers are present: one pass over the (few) names instead of a hashed
/// lookup per hop-by-hop name. Most requests carry none, a typical response only `Connection`.
pub fn hop_bits(headers: &HeaderMap) -> u8 {
    headers.keys().fold(0u8, |acc, k| acc | hop_bit(k))
}

/// [`strip_hop_by_hop`] with the [`hop_bits`] already known.
pub fn strip_known(headers: &mut HeaderMap, present: u8) {
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

/// A hop-by-hop field (RFC 9110 7.6.1) by name alone.
#[inline]
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_bit(name) != 0
}

/// The [`hop_bits`] bit of one name (0: not hop-by-hop).
#[inline]
pub fn hop_bit(name: &HeaderName) -> u8 {
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
pub fn remove_named(headers: &mut HeaderMap, line: &HeaderValue) {
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

/// Whether `name` is one of the `X-Forwarded-*` fields a proxy writes itself.
#[inline]
pub fn is_x_forwarded(name: &HeaderName) -> bool {
    name == X_FORWARDED_FOR || name == X_FORWARDED_PROTO || name == X_FORWARDED_HOST
}

/// Whether a `TE` field asks for trailers (the one TE value a proxy may pass on).
pub fn wants_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
}

/// Trailers may not carry framing, routing, forwarding, authentication, request-modifier,
/// response-control or content-format headers (RFC 9110 6.5.1): some recipients merge trailers
/// into the header section, which would bypass the proxy's rewriting (a client's `Forwarded`,
/// `Via` or `X-Request-Id` in a request's trailers would stand beside the ones it wrote) or
/// give a field a meaning it may only have up front. What is left (`grpc-status`,
/// `server-timing`, a digest, an application's own `x-*`) goes on.
pub fn trailer_allowed(name: &HeaderName) -> bool {
    !(is_hop_by_hop(name)
        || name.as_str().starts_with("x-forwarded-")
        || TRAILER_DENIED.contains(&name)
        || is_underscore_lookalike(name))
}

static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// [`trailer_allowed`]'s list beyond the hop-by-hop and `X-Forwarded-*` fields.
static TRAILER_DENIED: [&HeaderName; 31] = [
    // Framing and routing.
    &header::CONTENT_LENGTH,
    &header::HOST,
    &header::TRAILER,
    // Forwarding: what the proxy writes itself.
    &header::FORWARDED,
    &header::VIA,
    &X_REQUEST_ID,
    &X_REAL_IP,
    // Request modifiers and controls.
    &header::EXPECT,
    &header::MAX_FORWARDS,
    &header::RANGE,
    &header::IF_MATCH,
    &header::IF_NONE_MATCH,
    &header::IF_MODIFIED_SINCE,
    &header::IF_UNMODIFIED_SINCE,
    &header::IF_RANGE,
    &header::CACHE_CONTROL,
    &header::PRAGMA,
    // Authentication and state.
    &header::AUTHORIZATION,
    &header::PROXY_AUTHORIZATION,
    &header::WWW_AUTHENTICATE,
    &header::PROXY_AUTHENTICATE,
    &header::COOKIE,
    &header::SET_COOKIE,
    // Response controls and content format.
    &header::LOCATION,
    &header::AGE,
    &header::EXPIRES,
    &header::VARY,
    &header::CONTENT_TYPE,
    &header::CONTENT_ENCODING,
    &header::CONTENT_RANGE,
    &header::CONTENT_LOCATION,
];

/// A field value that begins or ends with SP or HTAB: HTTP/1 parsers trim such whitespace,
/// an HTTP/2 message with it is malformed (RFC 9113 8.2.1).
#[inline]
pub fn edge_whitespace(v: &[u8]) -> bool {
    matches!(v.first(), Some(b' ' | b'\t')) || matches!(v.last(), Some(b' ' | b'\t'))
}

/// A bearer token as an operator stores it, ready to send or compare: one trailing line end
/// (`\n` or `\r\n`) taken off, as a secret made from a file (`kubectl create secret
/// --from-file`, `echo token > file`) keeps it. Err (why) when what is left cannot travel in
/// `Authorization: Bearer <token>`: a control character, a byte outside ASCII (the admin reads
/// the field as visible ASCII), or whitespace at either end (trimmed from a field value).
pub fn bearer_token(raw: &str) -> Result<&str, &'static str> {
    let t = raw
        .strip_suffix("\r\n")
        .or_else(|| raw.strip_suffix('\n'))
        .unwrap_or(raw);
    if t.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
        return Err(
            "it has a control character (a line break inside it, or more than one at its end?)",
        );
    }
    if !t.is_ascii() {
        return Err("it has a character outside ASCII, which an HTTP header cannot carry");
    }
    if edge_whitespace(t.as_bytes()) {
        return Err("it begins or ends with whitespace, which HTTP trims from a header value");
    }
    Ok(t)
}

/// One `name: value` line.
#[inline]
pub fn put_header(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_slice(name);
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// The `Date` field (RFC 9110 6.6.1) for responses that come without one, formatted at most
/// once a second per thread.
pub fn put_date(out: &mut BytesMut) {
    with_date(|d| put_header(out, b"date", d));
}

/// [`put_date`]'s value for a header map (an h2 response).
pub fn date_value() -> Option<HeaderValue> {
    let mut v = None;
    with_date(|d| v = HeaderValue::from_bytes(d).ok());
    v
}

/// Calls `f` with the current IMF-fixdate, unless the clock is outside what it can express.
fn with_date(f: impl FnOnce(&[u8; 29])) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static CACHED: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }
    // httpdate formats 1970 to 9999 only (and panics outside): a clock outside that range
    // has no date worth sending (RFC 9110 6.6.1 asks for none without a reliable clock).
    const YEAR_10000: u64 = 253_402_300_800;
    let now = SystemTime::now();
    let Ok(since) = now.duration_since(UNIX_EPOCH) else {
        return;
    };
    let secs = since.as_secs();
    if secs >= YEAR_10000 {
        return;
    }
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            // IMF-fixdate is 29 bytes for every year httpdate formats.
            let Ok(fixed) = <[u8; 29]>::try_from(httpdate::fmt_http_date(now).as_bytes()) else {
                return;
            };
            *c = (secs, fixed);
        }
        f(&c.1);
    });
}

/// Whether a request field's name is a framing, connection or forwarding field's written with
/// `_` for some `-` (`x_forwarded_for`, `Content_Length`): those of `Content-Length`,
/// `Transfer-Encoding`, `Keep-Alive`, `Proxy-Connection`, `Max-Forwards`, `X-Real-IP`,
/// `X-Request-Id` and every `X-Forwarded-*`. No RFC forbids `_` in a name, but CGI, WSGI, Rack
/// and PHP map `-` and `_` to the same variable (`HTTP_X_FORWARDED_FOR`): such a field would
/// stand beside, or ahead of, the value the proxy (or a proxy in front of it) wrote. nginx drops
/// every field with `_` (`underscores_in_headers off`); only these are dropped here, so an
/// application's own `x_api_key` still goes on. Decided by length and first byte first: the
/// fields every request carries (`host`, `user-agent`, `accept`) cost a compare or two.
pub fn is_underscore_lookalike(name: &HeaderName) -> bool {
    let n = name.as_str().as_bytes();
    let want: &str = match (n.len(), n.first()) {
        (9, Some(b'x')) => "x-real-ip",
        (10, Some(b'k')) => "keep-alive",
        (12, Some(b'm')) => "max-forwards",
        (14, Some(b'c')) => "content-length",
        (16, Some(b'p')) => "proxy-connection",
        (17, Some(b't')) => "transfer-encoding",
        (12.., Some(b'x')) if n.len() != 12 || n[2] == b'f' => {
            let dash = |b: u8| b == b'-' || b == b'_';
            return dash(n[1])
                && &n[2..11] == b"forwarded"
                && dash(n[11])
                && n.len() > 12
                && n.contains(&b'_');
        }
        (12, Some(b'x')) => "x-request-id",
        _ => return false,
    };
    n.contains(&b'_')
        && want
            .bytes()
            .zip(n)
            .all(|(w, &b)| w == b || (w == b'-' && b == b'_'))
}

/// The request id field: the proxy keeps or makes one per request (`access_log::RequestIds`);
/// the server keeps it on an answer that replaces the handler's response.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[cfg(test)]
mod tests {
    #[test]
    fn underscore_lookalikes_of_framing_and_forwarding_fields_are_found() {
        for name in [
            "x_forwarded_for",
            "x-forwarded_host",
            "x_forwarded-proto",
            "content_length",
            "transfer_encoding",
            "x_real_ip",
            "x_request_id",
            "keep_alive",
            "proxy_connection",
            "max_forwards",
            "x_forwarded_port",
            "x-forwarded_prefix",
        ] {
            let n = HeaderName::from_bytes(name.as_bytes()).unwrap();
            assert!(is_underscore_lookalike(&n), "{name}");
        }
        for name in [
            "x-forwarded-for",
            "content-length",
            "x_api_key",
            "x__forwarded_for",
            "content__length",
            "x-forwarded-port",
            "x_forwarded_",
            "x_forwardedfor",
            "x_request_ids",
            "host",
            "user-agent",
            "x",
            "content-type",
        ] {
            let n = HeaderName::from_bytes(name.as_bytes()).unwrap();
            assert!(!is_underscore_lookalike(&n), "{name}");
        }
    }

    #[test]
    fn a_bearer_token_loses_one_line_end_and_must_fit_a_header() {
        assert_eq!(bearer_token("t0k"), Ok("t0k"));
        assert_eq!(bearer_token("t0k\n"), Ok("t0k"));
        assert_eq!(bearer_token("t0k\r\n"), Ok("t0k"));
        assert_eq!(bearer_token("a b"), Ok("a b"));
        for bad in [
            "t0k\n\n", "t\n0k", "t0k\r", "t0k\x01", "t0k\x7f", "tök", " t0k", "t0k \n",
        ] {
            assert!(bearer_token(bad).is_err(), "{bad:?}");
        }
    }

    use super::*;

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
