//! The path a request target means, for matching it against configured prefixes.
//!
//! Upstreams (and nginx's `location`) resolve `%XX`, `.` and `..` segments and repeated
//! slashes before they look at a path: `/x/../admin`, `/%61dmin` and `//admin` all name
//! `/admin` there. A prefix compared with the raw target would route such a request by another
//! path than the one the upstream serves (and let it pass a `critical_5xx` path unseen). The
//! target itself is forwarded as received; only the matching uses this form.

use std::borrow::Cow;

/// `path` with percent-encodings decoded, dot segments removed (RFC 3986 5.2.4; `..` stops at
/// the root) and runs of `/` merged, as nginx normalizes a URI before matching `location`s.
/// A path that needs none of it (the common case: no `%`, `//`, `/.`) is returned as it is.
/// Decoded bytes that are not UTF-8 are replaced (U+FFFD), which no ASCII prefix matches.
pub fn normalized(path: &str) -> Cow<'_, str> {
    let b = path.as_bytes();
    let plain = !b
        .iter()
        .enumerate()
        .any(|(i, &c)| c == b'%' || (c == b'/' && matches!(b.get(i + 1), Some(b'/' | b'.'))));
    if plain || !path.starts_with('/') {
        return Cow::Borrowed(path);
    }
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).and_then(|&c| hex(c)),
                b.get(i + 2).and_then(|&c| hex(c)),
            ) {
                decoded.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        decoded.push(b[i]);
        i += 1;
    }
    let mut segments: Vec<&[u8]> = Vec::new();
    // Whether the result ends with `/`: a path ending in `/`, `/.` or `/..` names a directory.
    let mut trailing = false;
    for seg in decoded.split(|&c| c == b'/').skip(1) {
        trailing = matches!(seg, b"" | b"." | b"..");
        match seg {
            b"" | b"." => {}
            b".." => {
                segments.pop();
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
    Cow::Owned(match String::from_utf8(out) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
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
    use super::normalized;

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
            ("//admin//p", "/admin/p"),
            ("/admin/", "/admin/"),
            ("/%61dmin/p", "/admin/p"),
            ("/%2e%2e/admin", "/admin"),
            ("/x/%2E%2E/admin", "/admin"),
            ("/api%2Fadmin", "/api/admin"),
            ("/a%zzb", "/a%zzb"),
            ("/a%4", "/a%4"),
            ("/caf%C3%A9", "/café"),
            ("*", "*"),
            ("", ""),
        ] {
            assert_eq!(normalized(raw), want, "{raw}");
        }
        assert!(normalized("/%FF/admin").starts_with("/\u{FFFD}"));
        assert!(matches!(
            normalized("/api/users"),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
