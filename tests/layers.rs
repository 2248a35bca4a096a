//! The crate's layering, checked from the source text: each top-level module may name
//! (`crate::x`, in a `use` or inline, outside comments and `#[cfg(test)]` code) only modules of a
//! lower layer, so the import graph has no circles and a reader can learn the crate bottom-up.
//! A new module must be placed in `LAYERS`; moving a module up or down is a design decision,
//! made here on purpose, not by an import that happens to compile.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Layers, lowest first. A module may import modules of earlier rows only (never its own row:
/// modules on one row are independent of each other).
const LAYERS: &[&[&str]] = &[
    // Foundations, no crate imports: HTTP/1 and the client (`http/`), metrics, windows, shutdown,
    // TLS, the CLI's stdout and stderr, background task supervision, the log's writer thread.
    &[
        "http",
        "metrics",
        "stats",
        "shutdown",
        "tls",
        "out",
        "supervise",
        "log_writer",
    ],
    // What the operator wrote, parsed and validated (release plans included).
    &["config"],
    // Pure pieces on the config: passive ejection, the rollback decision, name resolution, the
    // state backends, the admin API client of `ctl`, the image's health check.
    &[
        "passive",
        "rollback",
        "resolve",
        "state",
        "ctl_client",
        "healthcheck",
    ],
    // Upstreams (pools, health flags, counters); the audit log of events.
    &["upstream", "events"],
    // The routing snapshot; webhooks.
    &["routing", "notify"],
    // On the snapshot: the access log, Prometheus analysis, connection guards, the release record.
    &["access_log", "analysis", "guard", "release_record"],
    // The request path and the one writer of state: neither knows the other; `server` wires them.
    &["proxy", "app"],
    // What acts on the app: the release driver, health checks, the binary hand-over.
    &["release", "health", "upgrade"],
    // The rollback watcher, the admin API, config and DNS re-reads.
    &["watcher", "admin", "config_watch", "dns_watch"],
    // The wiring.
    &["server"],
    // The commands built on it.
    &["demo", "release_ctl"],
    &["ctl"],
];

fn rank_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|row| row.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to (`src/http/codec.rs` → `http`); `None` for the crate
/// root files.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel
        .components()
        .next()?
        .as_os_str()
        .to_string_lossy()
        .to_string();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (!matches!(name.as_str(), "lib" | "main")).then_some(name)
}

/// The text without comments, string literals' contents and `#[cfg(test)]` items.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            let end = text[i + 2..].find("*/").map_or(b.len(), |k| i + 2 + k + 2);
            i = end;
        } else if b[i] == b'"' && !b[..i].ends_with(b"'") {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    strip_cfg_test(&out)
}

fn strip_cfg_test(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        // The item ends at the end of its braced block, or at `;` for `mod tests;`.
        let (brace, semi) = (after.find('{'), after.find(';'));
        let end = match (brace, semi) {
            (Some(b), Some(s)) if s < b => s + 1,
            (Some(b), _) => {
                let mut depth = 0usize;
                let mut end = after.len();
                for (k, c) in after[b..].char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                end = b + k + 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                end
            }
            (None, Some(s)) => s + 1,
            (None, None) => after.len(),
        };
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The top-level modules named by `crate::` paths in `code`, including `use crate::{a, b::c}`.
fn named_modules(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let after = rest[at + "crate::".len()..].trim_start();
        if let Some(group) = after.strip_prefix('{') {
            let mut depth = 1usize;
            let mut top = String::new();
            let mut names = Vec::new();
            let mut at_top = true;
            for c in group.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        at_top = false;
                    }
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => {
                        names.push(std::mem::take(&mut top));
                        at_top = true;
                    }
                    ':' => at_top = false,
                    c if depth == 1 && at_top && (c.is_alphanumeric() || c == '_') => top.push(c),
                    _ => {}
                }
            }
            names.push(top);
            found.extend(names.into_iter().filter(|n| !n.is_empty()));
        } else {
            let name: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
        rest = &rest[at + "crate::".len()..];
    }
    found
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let Some(module) = top_module(&src, &f) else {
            continue;
        };
        let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let names = named_modules(&code_only(&text));
        let entry = graph.entry(module.clone()).or_default();
        entry.extend(names.into_iter().filter(|n| *n != module));
    }
    graph
}

#[test]
fn every_module_imports_only_lower_layers() {
    let graph = graph();
    let mut problems = Vec::new();
    for (module, imports) in &graph {
        let Some(rank) = rank_of(module) else {
            problems.push(format!(
                "module `{module}` is in no layer: add it to LAYERS"
            ));
            continue;
        };
        for dep in imports {
            match rank_of(dep) {
                Some(r) if r < rank => {}
                Some(_) => problems.push(format!(
                    "`{module}` (layer {rank}) imports `{dep}`, which is not below it"
                )),
                None if graph.contains_key(dep) => {
                    problems.push(format!("`{module}` imports `{dep}`, which is in no layer"))
                }
                // A name that is not a module (a macro or an item of lib.rs).
                None => {}
            }
        }
    }
    assert!(
        problems.is_empty(),
        "layering broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_http_layer_names_nothing_else_in_the_crate() {
    let graph = graph();
    let http = graph.get("http").expect("src/http exists");
    assert!(
        http.is_empty(),
        "src/http must not import the rest of the crate, but names {http:?}"
    );
}

#[test]
fn the_checker_sees_imports_in_every_form() {
    let code = code_only(
        "use crate::a::B;\nuse crate::{b, c::{D, E}, d::F};\nfn x() { crate::e::f(); }\n\
         // crate::comment\n/* crate::block */\nconst S: &str = \"crate::string\";\n\
         #[cfg(test)]\nmod tests { use crate::tested; }\n",
    );
    let names: Vec<_> = named_modules(&code).into_iter().collect();
    assert_eq!(names, ["a", "b", "c", "d", "e"]);
}
