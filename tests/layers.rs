//! The crate's layering, read from `src/**` as text: a module may name only the layers below
//! it. `http/` (the wire) knows nothing of the rest of the crate; `upstream` (addresses, health
//! flags, pools) sits below `routing` (the snapshot), which sits below `proxy` (the request
//! path); the proxy does not reach up into the app, its server or its admin API.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The top-level modules a file names through `crate::` in its code (comments and its unit
/// tests left out: a test may build what it needs from above), including `use crate::{a, b::c}`
/// groups.
fn named_modules(text: &str) -> BTreeSet<String> {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    let code: String = text
        .lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut names = BTreeSet::new();
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                let ident: String = item
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !ident.is_empty() && ident != "self" {
                    names.insert(ident);
                }
            }
        } else {
            let ident: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !ident.is_empty() {
                names.insert(ident);
            }
        }
    }
    names
}

/// Files under `src/<under>` (a directory or one file) naming any module of `forbidden`.
fn violations(under: &str, forbidden: &dyn Fn(&str) -> bool) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let dir = root.join(under);
    let files = if dir.is_dir() {
        sources(&dir)
    } else {
        vec![root.join(format!("{under}.rs"))]
    };
    assert!(!files.is_empty(), "no sources under src/{under}");
    let mut found = Vec::new();
    for file in files {
        let text = fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        for name in named_modules(&text) {
            if forbidden(&name) {
                found.push(format!("{} names crate::{name}", file.display()));
            }
        }
    }
    found
}

#[test]
fn the_http_layer_names_nothing_else_in_the_crate() {
    let found = violations("http", &|m| m != "http");
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn upstream_sits_below_routing_and_the_proxy() {
    let above = ["routing", "proxy", "app", "server", "admin", "state"];
    let found = violations("upstream", &|m| above.contains(&m));
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn routing_sits_below_the_proxy() {
    let above = ["proxy", "app", "server", "admin"];
    let found = violations("routing", &|m| above.contains(&m));
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn the_proxy_does_not_reach_up_into_the_app() {
    let above = [
        "app", "server", "admin", "watcher", "release", "state", "etcd",
    ];
    let found = violations("proxy", &|m| above.contains(&m));
    assert!(found.is_empty(), "{found:#?}");
}

#[test]
fn the_reader_sees_grouped_and_nested_imports() {
    let names = named_modules(
        "use crate::{app::App, config};\n// crate::admin in a comment\nlet x = crate::server::X;\n\
         #[cfg(test)]\nmod tests {\n    use crate::release;\n}",
    );
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(names, ["app", "config", "server"]);
}
