//! The path a request target means, for matching it against configured prefixes.
//!
//! An upstream resolves `.` and `..` segments and percent-encoded unreserved characters before
//! it looks at a path: `/x/../admin` and `/%61dmin` both name `/admin` there. A prefix compared
//! with the raw target would route such a request by another path than the one the upstream
//! serves (and let it pass a `critical_5xx` path unseen). The form used is RFC 3986's
//! syntax-based normalization (6.2.2), which every URL library applies alike; what libraries do
//! differently (`%2F` as a separator, repeated `/` merged) is left as it is, so that neither
//! reading routes a request by a path the other would not. The target itself is forwarded as
//! received; only the matching uses this form.

use std::borrow::Cow;

/// `path` normalized as RFC 3986 6.2.2 says: percent-encoded unreserved characters (`A-Z a-z
/// 0-9 - . _ ~`) decoded, the hex digits of the other encodings in upper case (`%2f` is
/// `%2F`), and dot segments removed as 5.2.4 does (`..` stops at the root; `/a//../b` is
/// `/a/b`). `%2F` stays an encoded byte, not a separator, and `//` an empty segment. A path that
/// needs none of it (no `%`, no `/.`) is returned as it is.
pub fn normalized(path: &str) -> Cow<'_, str> {
    let b = path.as_bytes();
    let plain = !b
        .iter()
        .enumerate()
        .any(|(i, &c)| c == b'%' || (c == b'.' && (i == 0 || b[i - 1] == b'/')));
    if plain || !path.starts_with('/') {
        return Cow::Borrowed(path);
    }
    // 6.2.2.1 and 6.2.2.2: unreserved characters decoded, other encodings in upper case.
    let mut decoded = Vec::with_capacity(b.len());
    decode_unreserved(b, &mut decoded);
    // 5.2.4 on the segments after the leading `/`: `.` dropped, `..` drops the one before it;
    // a path ending in `.` or `..` keeps its trailing `/`.
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut trailing = false;
    for seg in decoded[1..].split(|&c| c == b'/') {
        trailing = false;
        match seg {
            b"." => trailing = true,
            b".." => {
                segments.pop();
                trailing = true;
            }
            s => segments.push(s),
        }
    }
    let mut out = Vec::with_capacity(decoded.len());
    for s in &segments {
        out.push(b'/');
        out.extend_from_slice(s);
    }
    if trailing || segments.is_empty() {
        out.push(b'/');
    }
    Cow::Owned(into_string(out))
}

/// A configured prefix (`path_prefix`, a `critical_5xx` path) in the form [`normalized`]
/// paths are compared in. Bytes a path cannot hold as they are (a space, non-ASCII: RFC 3986
/// `pchar`) are percent-encoded first, as a request must send them; the prefix's last segment
/// is unfinished (a prefix matches what continues it: `/.` matches `/.env`), so it gets only
/// its `%XX` decoded, never read as a dot segment.
pub fn normalized_prefix(prefix: &str) -> String {
    let mut encoded = Vec::with_capacity(prefix.len());
    for &c in prefix.as_bytes() {
        if c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/%".contains(&c) {
            encoded.push(c);
        } else {
            encoded.extend_from_slice(&[b'%', HEX[usize::from(c >> 4)], HEX[usize::from(c & 15)]]);
        }
    }
    let Some(last) = encoded.iter().rposition(|&c| c == b'/') else {
        return into_string(encoded);
    };
    let (dirs, tail) = encoded.split_at(last + 1);
    let mut out = normalized(&String::from_utf8_lossy(dirs))
        .into_owned()
        .into_bytes();
    decode_unreserved(tail, &mut out);
    into_string(out)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// `b` onto `out` with percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) decoded
/// and the hex digits of the other encodings in upper case (RFC 3986 6.2.2.1, 6.2.2.2).
fn decode_unreserved(b: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|&c| hex(c)),
                b.get(i + 2).and_then(|&c| hex(c)),
            ) {
                let c = h << 4 | l;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(c);
                } else {
                    out.extend_from_slice(&[
                        b'%',
                        b[i + 1].to_ascii_uppercase(),
                        b[i + 2].to_ascii_uppercase(),
                    ]);
                }
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
}

/// Only ASCII goes in (a `&str` target, or a prefix percent-encoded) and only ASCII is decoded.
fn into_string(out: Vec<u8>) -> String {
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{normalized, normalized_prefix};

    #[test]
    fn paths_are_matched_as_the_upstream_resolves_them() {
        for (raw, want) in [
            ("/", "/"),
            ("/api/users", "/api/users"),
            ("/api/v1.2/x", "/api/v1.2/x"),
            ("/api/.well-known", "/api/.well-known"),
            ("/x/../admin/p", "/admin/p"),
            ("/admin/../x", "/x"),
            ("/admin/./p", "/admin/p"),
            ("/admin/.", "/admin/"),
            ("/admin/..", "/"),
            ("/..", "/"),
            ("/../../admin", "/admin"),
            ("/admin/", "/admin/"),
            ("/%61dmin/p", "/admin/p"),
            ("/%2e%2e/admin", "/admin"),
            ("/x/%2E%2E/admin", "/admin"),
            // RFC 3986 5.2.4: an empty segment is a segment (`..` removes it).
            ("//admin//p", "//admin//p"),
            ("/admin//../x", "/admin/x"),
            ("/admin/x//../../y", "/admin/y"),
            // `%2F` is a byte of a segment, not a separator; other encodings in upper case.
            ("/api%2Fadmin", "/api%2Fadmin"),
            ("/api%2fadmin", "/api%2Fadmin"),
            ("/admin/x/..%2F..%2Fy", "/admin/x/..%2F..%2Fy"),
            ("/admin%2F..%2Fx", "/admin%2F..%2Fx"),
            ("/files%20x", "/files%20x"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/a%zzb", "/a%zzb"),
            ("/a%4", "/a%4"),
            ("/a%", "/a%"),
            ("*", "*"),
            ("", ""),
        ] {
            assert_eq!(normalized(raw), want, "{raw}");
        }
        assert!(matches!(
            normalized("/api/users"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert!(matches!(
            normalized("/api//users"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    /// A prefix's last segment is unfinished: `/.` stays the prefix of `/.env`, not `/`; what
    /// a request must percent-encode is encoded in the prefix too.
    #[test]
    fn prefixes_keep_their_unfinished_last_segment() {
        for (prefix, want) in [
            ("/api", "/api"),
            ("/api/", "/api/"),
            ("/.", "/."),
            ("/..", "/.."),
            ("/%2e", "/."),
            ("/static/.", "/static/."),
            ("/x/../a", "/a"),
            ("/v1/./caf%c3%a9", "/v1/caf%C3%A9"),
            ("/caf\u{e9}", "/caf%C3%A9"),
            ("/my files", "/my%20files"),
            ("/a%2fb", "/a%2Fb"),
            ("/pay%6dents", "/payments"),
            ("/x/%2E%2E/y", "/y"),
        ] {
            assert_eq!(normalized_prefix(prefix), want, "{prefix}");
            // What the prefix names, as a request sends it, starts with it once normalized.
            let request = format!("{want}more");
            assert!(
                normalized(&request).starts_with(want),
                "{prefix}: {request}"
            );
        }
    }
}
