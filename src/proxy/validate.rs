//! Request checks and rewrites, kept apart from the request path in [`crate::proxy`] that calls
//! them: request targets (RFC 9112 3.2), the Host (RFC 9110 7.2), HTTP/2 `cookie` fields toward
//! HTTP/1.1 (RFC 9113 8.2.3), upgrade tokens (RFC 9110 7.8), and `Max-Forwards` on TRACE and
//! OPTIONS (RFC 9110 7.6.2).

use bytes::{BufMut, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};

use crate::http::codec::parse_length;
use crate::http::headers::{edge_whitespace, is_underscore_lookalike};
use crate::http::server::target_bytes_valid;
use http::uri::PathAndQuery;
use http::{Method, Request, Uri, Version};

/// The methods a request target behind the proxy takes (CONNECT is refused): what a 405 and an
/// OPTIONS answered by the proxy list in `Allow`.
pub const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH";

/// What a TRACE or OPTIONS request's `Max-Forwards` asks of the proxy (RFC 9110 7.6.2).
#[derive(Debug, PartialEq, Eq)]
pub enum LastHop {
    /// No (valid) `Max-Forwards`, or another method: the request goes on (an invalid one removed).
    Forward,
    /// Zero: the proxy answers as the final recipient.
    Answer,
}

/// The largest `Max-Forwards` the proxy takes (RFC 9110 7.6.2's "recipient's maximum supported
/// value"): 2^63 - 1, what a signed 64-bit parser downstream still reads.
pub const MAX_FORWARDS_CAP: u64 = i64::MAX as u64;

/// `Max-Forwards` on TRACE and OPTIONS: zero makes the proxy the final recipient; any other
/// value goes on one lower, at most [`MAX_FORWARDS_CAP`] (RFC 9110 7.6.2: the lesser of the
/// value less one and the recipient's maximum), so a value too large to parse is updated too.
/// A field that is not one `1*DIGIT` value (letters, a list, several lines) limits nothing
/// here and is removed: the next hop sees what the proxy acted on, no limit, rather than a
/// value it might read otherwise.
pub fn max_forwards<B>(req: &mut Request<B>) -> LastHop {
    if !matches!(*req.method(), Method::TRACE | Method::OPTIONS) {
        return LastHop::Forward;
    }
    let mut lines = req.headers().get_all(header::MAX_FORWARDS).iter();
    let n = match (lines.next(), lines.next()) {
        (None, _) => return LastHop::Forward,
        (Some(v), None) => {
            let v = v.as_bytes().trim_ascii();
            if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
                None
            } else {
                // All digits: past what parse_length takes it is simply large.
                Some(parse_length(v).unwrap_or(u64::MAX))
            }
        }
        (Some(_), Some(_)) => None,
    };
    let Some(n) = n else {
        req.headers_mut().remove(header::MAX_FORWARDS);
        return LastHop::Forward;
    };
    if n == 0 {
        return LastHop::Answer;
    }
    req.headers_mut().insert(
        header::MAX_FORWARDS,
        HeaderValue::from((n - 1).min(MAX_FORWARDS_CAP)),
    );
    LastHop::Forward
}

/// A TRACE answered by the proxy: the request as it arrived, as `message/http` content (RFC
/// 9110 9.3.8), without the fields likely to carry credentials.
pub fn trace_echo<B>(req: &Request<B>) -> bytes::Bytes {
    let mut out = BytesMut::new();
    out.put_slice(req.method().as_str().as_bytes());
    out.put_u8(b' ');
    let target = match req.uri().path_and_query() {
        Some(p) if !p.as_str().is_empty() => p.as_str(),
        _ => "/",
    };
    out.put_slice(target.as_bytes());
    out.put_slice(match req.version() {
        Version::HTTP_10 => b" HTTP/1.0\r\n",
        Version::HTTP_2 => b" HTTP/2.0\r\n",
        _ => b" HTTP/1.1\r\n",
    });
    // An h2 request's `:authority` is the Host it stands for (RFC 9113 8.3.1), reflected as
    // the `Host` line message/http has for it.
    if !req.headers().contains_key(header::HOST) {
        if let Some(authority) = req.uri().authority() {
            out.put_slice(b"host: ");
            out.put_slice(authority.as_str().as_bytes());
            out.put_slice(b"\r\n");
        }
    }
    for (name, value) in req.headers() {
        if matches!(
            *name,
            header::AUTHORIZATION | header::PROXY_AUTHORIZATION | header::COOKIE
        ) {
            continue;
        }
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
    out.freeze()
}

/// What an HTTP/1 parser checks as it reads a head, checked on an HTTP/2 request's fields:
/// no more than `max_headers` of them (431), and no value that begins or ends with whitespace
/// (RFC 9113 8.2.1: such a request is malformed, and a proxy does not forward it). The fields
/// are counted as the HTTP/1.1 head they stand for: every `cookie` field counts as one, the one
/// `Cookie` line that h2 clients split into a field per cookie (RFC 9113 8.2.3, as browsers
/// do), `:authority` counts as the `Host` line it stands for (when the request has no `host`
/// field of its own), and `id_added` (the proxy added the request's `X-Request-Id` before this
/// check, the client sent none) leaves that field out.
pub fn h2_fields<B>(
    req: &Request<B>,
    max_headers: usize,
    id_added: bool,
) -> Result<(), H2FieldsError> {
    let host = req.uri().authority().is_some() && !req.headers().contains_key(header::HOST);
    let fields = req.headers().len() + usize::from(host);
    // Only a request over the limit is looked at again: most are far below it.
    if fields > max_headers {
        let crumbs = req.headers().get_all(header::COOKIE).iter().count();
        let id = usize::from(id_added);
        if fields - crumbs.saturating_sub(1) - id > max_headers {
            return Err(H2FieldsError::TooMany);
        }
    }
    if req
        .headers()
        .values()
        .any(|v| edge_whitespace(v.as_bytes()))
    {
        return Err(H2FieldsError::Whitespace);
    }
    Ok(())
}

/// An HTTP/2 request's fields lose what the HTTP/1 server drops as it reads a head: a name
/// that is a framing or forwarding field's with `_` for `-` ([`is_underscore_lookalike`]).
/// Most requests have no `_` in any name and are looked at once.
pub fn drop_underscore_lookalikes(headers: &mut HeaderMap) {
    if !headers.keys().any(|k| k.as_str().contains('_')) {
        return;
    }
    let names: Vec<header::HeaderName> = headers
        .keys()
        .filter(|k| is_underscore_lookalike(k))
        .cloned()
        .collect();
    for name in names {
        headers.remove(name);
    }
}

/// Why [`h2_fields`] refused a request.
#[derive(Debug, PartialEq, Eq)]
pub enum H2FieldsError {
    TooMany,
    Whitespace,
}

/// The request target's form (RFC 9112 3.2): origin form (`/path`), absolute form
/// (`http://host/path`, HTTP/1 only), or `*` for OPTIONS. The authority form is CONNECT's only
/// (refused before this); anything else (`x`, `a:80`) is refused.
pub fn target<B>(req: &mut Request<B>) -> Result<(), &'static str> {
    if req.version() == Version::HTTP_2 {
        // HTTP/1 lengths are checked as the head is parsed; an h2 one is only advisory to h2,
        // but it is passed on: the same bound (below 2^63) holds.
        for v in req.headers().get_all(header::CONTENT_LENGTH) {
            parse_length(v.as_bytes()).map_err(|_| "invalid Content-Length\n")?;
        }
        // `:scheme` is the target URI's (RFC 9113 8.3.1): as in an HTTP/1 absolute form, only
        // http and https are served; anything else would go on as if it were http.
        if let Some(scheme) = req.uri().scheme_str() {
            if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
                return Err("unsupported scheme in the request target\n");
            }
        }
        // `:path` goes on as an HTTP/1.1 request target: the bytes an HTTP/1 one is refused
        // for (raw bytes over 0x7F, `"`, `<`, `>`, controls, a `\` before the query), which
        // the URI type takes, are refused here too.
        let pq = req.uri().path_and_query().map_or("", PathAndQuery::as_str);
        if !target_bytes_valid(pq.as_bytes()) {
            return Err("invalid request target\n");
        }
    }
    let uri = req.uri();
    if req.version() != Version::HTTP_2 {
        match (uri.scheme_str(), uri.authority()) {
            (Some(scheme), Some(_)) => {
                if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
                    return Err("unsupported scheme in the request target\n");
                }
                // `http://a?q` has no path; it stands for `/`.
                return Ok(());
            }
            (None, None) => {}
            _ => return Err("invalid request target\n"),
        }
    }
    // The raw path and query: `path()` reads an empty path as "/", and an h2 `:path` of `?x`
    // (neither origin form nor `*`, RFC 9113 8.3.1) would go on as it is.
    let path = uri.path_and_query().map_or("", PathAndQuery::as_str);
    if path == "*" {
        return if req.method() == Method::OPTIONS {
            Ok(())
        } else {
            Err("the asterisk form is for OPTIONS only\n")
        };
    }
    if !path.starts_with('/') {
        return Err("invalid request target\n");
    }
    Ok(())
}

/// An absolute-form target becomes the origin form for the upstream (`/path?query`).
pub fn to_origin_form<B>(req: &mut Request<B>) {
    let pq = match req.uri().path_and_query().map(PathAndQuery::as_str) {
        None | Some("") => "/".to_string(),
        Some(q) if q.starts_with('?') => format!("/{q}"),
        Some(p) => p.to_string(),
    };
    if let Ok(uri) = pq.parse::<Uri>() {
        *req.uri_mut() = uri;
    }
}

/// Several HTTP/2 `cookie` fields are one `cookie` toward HTTP/1.1, joined with `"; "`
/// (RFC 9113 8.2.3).
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut all = headers.get_all(header::COOKIE).iter();
    if all.next().is_none() || all.next().is_none() {
        return;
    }
    let mut joined = BytesMut::new();
    for v in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.put_slice(b"; ");
        }
        joined.put_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(joined.freeze()) {
        headers.insert(header::COOKIE, v);
    }
}

/// The `Upgrade` tokens a client may be tunnelled to: its list without `h2c`, which the proxy
/// speaks itself by prior knowledge and never tunnels. None when nothing is left.
pub fn without_h2c(proto: &HeaderValue) -> Option<HeaderValue> {
    let text = proto.to_str().ok()?;
    let is_h2c = |t: &str| t.trim().eq_ignore_ascii_case("h2c");
    if !text.split(',').any(is_h2c) {
        return (!text.trim().is_empty()).then(|| proto.clone());
    }
    let kept: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty() && !is_h2c(t))
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
}

/// Whether a `101`'s `Upgrade` names only protocols the client asked for (RFC 9110 7.8). A
/// token the client sent without a version matches any version of that protocol.
pub fn upgrade_matches(asked: &HeaderValue, resp: &HeaderMap) -> bool {
    let Ok(asked) = asked.to_str() else {
        return false;
    };
    let asked: Vec<&str> = asked.split(',').map(str::trim).collect();
    let mut any = false;
    for line in resp.get_all(header::UPGRADE) {
        let Ok(line) = line.to_str() else {
            return false;
        };
        for got in line.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            any = true;
            let got_name = got.split('/').next().unwrap_or(got);
            let ok = asked.iter().any(|a| {
                a.eq_ignore_ascii_case(got)
                    || (!a.contains('/') && a.eq_ignore_ascii_case(got_name))
            });
            if !ok {
                return false;
            }
        }
    }
    any
}

/// The request's host value (for `X-Forwarded-Host`) and the length of its name without port.
/// HTTP/1.1 needs exactly one Host; HTTP/2 may carry it as :authority instead. Nothing is
/// allocated: routing compares names case-insensitively.
pub fn request_host<B>(req: &Request<B>) -> Result<Option<(HeaderValue, usize)>, &'static str> {
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
        // An `http`/`https` URI needs a host (RFC 9110 4.2.1); HTTP/2 carries it in
        // `:authority` or Host (RFC 9113 8.3.1), and has no HTTP/1.0 to excuse its absence.
        (None, None) if req.version() == Version::HTTP_2 => {
            return Err("missing :authority and Host\n")
        }
        // HTTP/2 (RFC 9113 8.3.1): a Host that names another authority makes it malformed,
        // compared after scheme-based normalization (RFC 3986 6.2.3): `a:80` is `a` for http.
        (Some(a), Some(h)) if req.version() == Version::HTTP_2 => {
            let https = req
                .uri()
                .scheme_str()
                .is_some_and(|s| s.eq_ignore_ascii_case("https"));
            let port: &[u8] = if https { b"443" } else { b"80" };
            let (a, h) = (a.as_str().as_bytes(), h.as_bytes());
            if !without_default_port(a, port).eq_ignore_ascii_case(without_default_port(h, port)) {
                return Err("Host and :authority differ\n");
            }
            // The Host an intermediary generates is `:authority`'s value (RFC 9113 8.3.1).
            HeaderValue::from_bytes(a).ok()
        }
        // HTTP/1 absolute form (RFC 9112 3.2.2): the target's authority wins over Host, which
        // must still be valid (RFC 9110 7.2: a Host with an invalid value is 400). An empty one
        // is valid (an empty reg-name, RFC 3986 3.2.2) and, ignored here, harmless.
        (Some(a), h) => {
            let invalid = |h: &HeaderValue| {
                !h.is_empty() && h.to_str().ok().and_then(host_without_port).is_none()
            };
            if h.is_some_and(invalid) {
                return Err("invalid Host header\n");
            }
            HeaderValue::from_str(a.as_str()).ok()
        }
        (None, Some(h)) => Some(h.clone()),
        (None, None) => None,
    };
    let Some(value) = value else {
        return Ok(None);
    };
    let len = host_name_len(value.as_bytes()).ok_or("invalid Host header\n")?;
    Ok(Some((value, len)))
}

/// An authority without its port when that is the scheme's default `port` or empty (RFC 3986
/// 6.2.3: `a:80`, `a:` and `a` are the same http authority); else as it is.
fn without_default_port<'a>(authority: &'a [u8], port: &[u8]) -> &'a [u8] {
    // The port follows the last `:`, unless that is inside an IP literal (`[::1]`).
    match authority.iter().rposition(|&b| b == b':' || b == b']') {
        Some(i) if authority[i] == b':' => {
            let (host, p) = (&authority[..i], &authority[i + 1..]);
            if p.is_empty() || p == port {
                host
            } else {
                authority
            }
        }
        _ => authority,
    }
}

/// `example.com:8080` -> `example.com`, `[::1]:80` -> `[::1]`; None for malformed values
/// (RFC 9110 7.2: `uri-host [ ":" port ]`): a second colon, a port past 65535, an IP literal
/// that is not an IPv6 address.
pub fn host_without_port(s: &str) -> Option<&str> {
    host_name_len(s.as_bytes()).map(|n| &s[..n])
}

/// The bytes a reg-name or IPv4 address may hold here: letters, digits, `.`, `-`, `_`.
const NAME_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || c == b'.' || c == b'-' || c == b'_';
        b += 1;
    }
    t
};

/// [`host_without_port`] on a field value's bytes: the length of its host, found in one pass
/// that also checks every byte (no `to_str` pass first: a name's bytes are visible ASCII).
pub fn host_name_len(b: &[u8]) -> Option<usize> {
    let (name, port) = if let Some(rest) = b.strip_prefix(b"[") {
        let end = rest.iter().position(|&c| c == b']')?;
        std::str::from_utf8(&rest[..end])
            .ok()?
            .parse::<std::net::Ipv6Addr>()
            .ok()?;
        let port = match &rest[end + 1..] {
            [] => None,
            [b':', p @ ..] => Some(p),
            _ => return None,
        };
        (end + 2, port)
    } else {
        // A DNS name has no empty label: `a..b`, `a..` and `.` are refused (as nginx does; a
        // leading dot it accepts, and so does this).
        let mut n = 0;
        let mut dot = false;
        while let Some(&c) = b.get(n) {
            if !NAME_BYTE[c as usize] {
                break;
            }
            if c == b'.' {
                if dot || n == 0 && b.get(1).is_none_or(|&c| c == b':') {
                    return None;
                }
                dot = true;
            } else {
                dot = false;
            }
            n += 1;
        }
        match &b[n..] {
            [] => (n, None),
            [b':', p @ ..] => (n, Some(p)),
            _ => return None,
        }
    };
    if name == 0 {
        return None;
    }
    if let Some(p) = port {
        // Five digits at most; five compare as numbers do, byte by byte.
        if p.len() > 5 || !p.iter().all(u8::is_ascii_digit) || (p.len() == 5 && p > &b"65535"[..]) {
            return None;
        }
    }
    Some(name)
}

/// The protocol a client asks to upgrade to (WebSocket and friends); never h2c, which the
/// proxy speaks itself by prior knowledge and must not tunnel.
pub fn requested_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
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
    without_h2c(proto)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An h2 TRACE reflects its `:authority` as the `Host` line it stands for; an HTTP/1 one
    /// its own Host, once.
    #[test]
    fn a_trace_echo_carries_the_host() {
        let mut h2 = Request::new(());
        *h2.method_mut() = Method::TRACE;
        *h2.version_mut() = Version::HTTP_2;
        *h2.uri_mut() = "https://a.example:8443/t?q=1".parse().expect("uri");
        h2.headers_mut()
            .insert("x-a", header::HeaderValue::from_static("b"));
        let echo = trace_echo(&h2);
        assert_eq!(
            &echo[..],
            &b"TRACE /t?q=1 HTTP/2.0\r\nhost: a.example:8443\r\nx-a: b\r\n\r\n"[..]
        );
        let mut h1 = Request::new(());
        *h1.method_mut() = Method::TRACE;
        *h1.uri_mut() = "/t".parse().expect("uri");
        h1.headers_mut()
            .insert(header::HOST, header::HeaderValue::from_static("a"));
        assert_eq!(
            &trace_echo(&h1)[..],
            &b"TRACE /t HTTP/1.1\r\nhost: a\r\n\r\n"[..]
        );
    }

    fn req(method: Method, target: &str, version: Version) -> Request<()> {
        let mut r = Request::new(());
        *r.method_mut() = method;
        *r.uri_mut() = target.parse().expect("uri");
        *r.version_mut() = version;
        r
    }

    /// h2 `:authority` and `Host` name the same origin when they differ only by the scheme's
    /// default port, an empty port or case (RFC 9113 8.3.1, RFC 3986 6.2.3); `:authority` is
    /// the one that goes on.
    #[test]
    fn h2_host_and_authority_compare_with_default_ports_normalized() {
        for (target, host, same) in [
            ("http://a.example:80/x", "a.example", true),
            ("http://a.example/x", "A.Example:80", true),
            ("http://a.example:/x", "a.example:80", true),
            ("https://a.example:443/x", "a.example", true),
            ("https://a.example/x", "a.example:443", true),
            ("http://[::1]:80/x", "[::1]", true),
            ("http://[::1]/x", "[::1]:", true),
            ("http://a.example:8080/x", "a.example:8080", true),
            ("http://a.example:443/x", "a.example", false),
            ("https://a.example/x", "a.example:80", false),
            ("http://a.example:8080/x", "a.example:80", false),
            ("http://a.example/x", "a.example:8080", false),
            ("http://[::1]/x", "[::2]", false),
            ("http://b.example/x", "a.example", false),
        ] {
            let mut r = req(Method::GET, target, Version::HTTP_2);
            r.headers_mut()
                .insert(header::HOST, HeaderValue::from_static(host));
            let got = request_host(&r);
            if same {
                // The Host that goes on is `:authority`'s (RFC 9113 8.3.1), not the client's.
                let (value, _) = got.ok().flatten().expect("a host");
                let authority = r.uri().authority().map(|a| a.as_str());
                assert_eq!(
                    Some(value.to_str().unwrap_or("")),
                    authority,
                    "{target} {host}"
                );
            } else {
                assert_eq!(got, Err("Host and :authority differ\n"), "{target} {host}");
            }
        }
    }

    /// An h2 request's fields meet what an HTTP/1 parser checks; an h2 request names a host.
    #[test]
    fn h2_fields_and_host() {
        let mut r = req(Method::GET, "/x", Version::HTTP_2);
        assert_eq!(h2_fields(&r, 10, false), Ok(()));
        // No `:authority` and no Host: an http(s) URI without a host (RFC 9110 4.2.1).
        assert!(request_host(&r).is_err());
        // HTTP/1.0 may send neither; HTTP/1.1 must send Host.
        assert_eq!(
            request_host(&req(Method::GET, "/x", Version::HTTP_10)),
            Ok(None)
        );
        assert!(request_host(&req(Method::GET, "/x", Version::HTTP_11)).is_err());
        r.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("a.example"));
        assert!(request_host(&r).is_ok_and(|h| h.is_some()));
        for i in 0..10 {
            r.headers_mut().insert(
                http::header::HeaderName::from_bytes(format!("x-{i}").as_bytes()).expect("name"),
                HeaderValue::from_static("a b"),
            );
        }
        assert_eq!(h2_fields(&r, 10, false), Err(H2FieldsError::TooMany));
        assert_eq!(h2_fields(&r, 11, false), Ok(()));
        // Cookie crumbs count as one field; the proxy's own request id as none.
        for i in 0..5 {
            r.headers_mut().append(
                header::COOKIE,
                HeaderValue::from_str(&format!("c{i}=v")).expect("value"),
            );
        }
        assert_eq!(h2_fields(&r, 12, false), Ok(()));
        assert_eq!(h2_fields(&r, 11, false), Err(H2FieldsError::TooMany));
        r.headers_mut()
            .insert("x-request-id", HeaderValue::from_static("id"));
        assert_eq!(h2_fields(&r, 12, false), Err(H2FieldsError::TooMany));
        assert_eq!(h2_fields(&r, 12, true), Ok(()));
        assert_eq!(h2_fields(&r, 11, true), Err(H2FieldsError::TooMany));
        r.headers_mut().remove(header::COOKIE);
        r.headers_mut().remove("x-request-id");
        for bad in [" a", "a ", "\ta", "a\t"] {
            r.headers_mut()
                .insert("x-0", HeaderValue::from_str(bad).expect("value"));
            assert_eq!(
                h2_fields(&r, 11, false),
                Err(H2FieldsError::Whitespace),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn targets() {
        let v = Version::HTTP_11;
        for ok in ["/", "/a?b", "http://a/b", "HTTPS://a", "http://a?x"] {
            assert!(target(&mut req(Method::GET, ok, v)).is_ok(), "{ok}");
        }
        assert!(target(&mut req(Method::OPTIONS, "*", v)).is_ok());
        for bad in ["x", "a:80", "*", "ftp://a/"] {
            assert!(target(&mut req(Method::GET, bad, v)).is_err(), "{bad}");
        }
        let h2 = Version::HTTP_2;
        assert!(target(&mut req(Method::GET, "https://a/x", h2)).is_ok());
        assert!(target(&mut req(Method::GET, "ftp://a/x", h2)).is_err());
        // An h2 `:path` is held to an HTTP/1 target's bytes; a `\` in its query passes.
        for bad in [
            "https://a/a\\..\\b",
            "https://a/\"x\"",
            "https://a/caf\u{e9}",
        ] {
            assert!(target(&mut req(Method::GET, bad, h2)).is_err(), "{bad}");
        }
        for ok in ["https://a/?q=a\\b", "https://a/s?f[x]={y}|z^w&p=100%"] {
            assert!(target(&mut req(Method::GET, ok, h2)).is_ok(), "{ok}");
        }
        // An h2 `:path` of `?x` (the URI's `path()` reads it as "/").
        let mut r = req(Method::GET, "https://a/", h2);
        let mut parts = r.uri().clone().into_parts();
        parts.path_and_query = Some(PathAndQuery::from_static("?x"));
        *r.uri_mut() = Uri::from_parts(parts).expect("uri");
        assert!(target(&mut r).is_err());
        let mut r = req(Method::GET, "http://a?x", v);
        to_origin_form(&mut r);
        assert_eq!(r.uri().to_string(), "/?x");
    }

    #[test]
    fn upgrades() {
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(without_h2c(&h("h2c")), None);
        assert_eq!(without_h2c(&h("websocket, h2c")), Some(h("websocket")));
        assert_eq!(without_h2c(&h("websocket")), Some(h("websocket")));
        let mut resp = HeaderMap::new();
        resp.insert(header::UPGRADE, h("h2c"));
        assert!(!upgrade_matches(&h("websocket"), &resp));
        resp.insert(header::UPGRADE, h("WebSocket"));
        assert!(upgrade_matches(&h("websocket"), &resp));
        resp.insert(header::UPGRADE, h("foo/2"));
        assert!(upgrade_matches(&h("foo"), &resp));
        assert!(!upgrade_matches(&h("foo/1"), &resp));
        assert!(!upgrade_matches(&h("websocket"), &HeaderMap::new()));
    }

    #[test]
    fn cookies() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        join_cookies(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(
            h.get(header::COOKIE).map(|v| v.as_bytes()),
            Some(&b"a=1; b=2"[..])
        );
    }

    /// An absolute-form target's authority replaces Host, but an invalid Host is still refused.
    #[test]
    fn absolute_form_hosts() {
        let mut r = req(Method::GET, "http://b.example/x", Version::HTTP_11);
        r.headers_mut()
            .insert(header::HOST, HeaderValue::from_static("a.example"));
        let host = request_host(&r).ok().flatten().map(|(v, _)| v);
        assert_eq!(host, Some(HeaderValue::from_static("b.example")));
        // An empty Host is valid (an empty reg-name); the target names the host.
        r.headers_mut()
            .insert(header::HOST, HeaderValue::from_static(""));
        let host = request_host(&r).ok().flatten().map(|(v, _)| v);
        assert_eq!(host, Some(HeaderValue::from_static("b.example")));
        for bad in ["a b", "a:1:2", "a:99999", "[zz::1:]"] {
            r.headers_mut()
                .insert(header::HOST, HeaderValue::from_static(bad));
            assert!(request_host(&r).is_err(), "{bad}");
        }
    }

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
        assert_eq!(host_without_port("a:"), Some("a"));
        assert_eq!(host_without_port(":80"), None);
        assert_eq!(host_without_port("a:99999"), None);
        assert_eq!(host_without_port("a:09999"), Some("a"));
        assert_eq!(host_without_port("a:100000"), None);
        assert_eq!(host_without_port("[::1]:"), Some("[::1]"));
        assert_eq!(host_without_port("[::1"), None);
        assert_eq!(host_without_port("x_y-z.9"), Some("x_y-z.9"));
        assert_eq!(host_without_port("caf\u{e9}.example"), None);
        // No empty label, but one trailing dot (the root) and a leading one (as nginx).
        for bad in ["a..b", "admin.example..", "..", ".", ".:80", "a..:80"] {
            assert_eq!(host_without_port(bad), None, "{bad}");
        }
        for good in ["a.b.", "a.b.:80", ".wild.test", "a"] {
            assert!(host_without_port(good).is_some(), "{good}");
        }
        for bad in [&b"a\xff"[..], b"a\x00:80", b"a/b", b"a@b", b"a%20"] {
            assert_eq!(host_name_len(bad), None, "{bad:?}");
        }
    }

    /// RFC 9110 7.6.2: a value is always updated, to at most 2^63 - 1, a value too large to
    /// parse included (leading zeros count for nothing); one that is not a single `1*DIGIT`
    /// value is removed; other methods are left alone.
    #[test]
    fn max_forwards_is_updated_capped_or_removed() {
        let run = |method: Method, values: &[&'static str]| {
            let mut r = req(method, "/", Version::HTTP_11);
            for v in values {
                r.headers_mut()
                    .append(header::MAX_FORWARDS, HeaderValue::from_static(v));
            }
            let hop = max_forwards(&mut r);
            let left: Vec<String> = r
                .headers()
                .get_all(header::MAX_FORWARDS)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect();
            (hop, left.join(","))
        };
        let cap = MAX_FORWARDS_CAP.to_string();
        assert_eq!(run(Method::OPTIONS, &["7"]), (LastHop::Forward, "6".into()));
        assert_eq!(run(Method::TRACE, &["0"]), (LastHop::Answer, "0".into()));
        assert_eq!(
            run(Method::TRACE, &["0000000000000000000000000"]).0,
            LastHop::Answer
        );
        assert_eq!(
            run(Method::OPTIONS, &["0000000000000000000000005"]),
            (LastHop::Forward, "4".into())
        );
        for big in [
            "99999999999999999999",
            "18446744073709551615",
            "9223372036854775808",
        ] {
            assert_eq!(
                run(Method::OPTIONS, &[big]),
                (LastHop::Forward, cap.clone()),
                "{big}"
            );
        }
        assert_eq!(
            run(Method::OPTIONS, &["9223372036854775807"]),
            (LastHop::Forward, "9223372036854775806".into())
        );
        for bad in [
            &["5x"][..],
            &["-1"],
            &["5, 6"],
            &[""],
            &["3", "3"],
            &["0", "x"],
        ] {
            assert_eq!(
                run(Method::OPTIONS, bad),
                (LastHop::Forward, String::new()),
                "{bad:?}"
            );
        }
        assert_eq!(run(Method::GET, &["5x"]), (LastHop::Forward, "5x".into()));
        assert_eq!(run(Method::GET, &["0"]), (LastHop::Forward, "0".into()));
    }
}
