//! docs/configuration.md stays in step with the config parser: every documented key exists, every
//! key the parser accepts is documented, the examples in the page are valid, and the shipped
//! config/switchyard.toml uses only documented keys.
//!
//! The real keys of each table come from the parser itself: a config with an unknown key
//! `zz_unknown` in that table must be refused at exactly that key, and serde's "expected one of
//! `a`, `b`, ..." list is read from the error when the message carries it. Where it does not, the
//! field lists are read from the `Raw*` structs in src/config/raw.rs (the structs serde deserializes
//! the file into), and each documented key is also probed through the parser.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;

const DOC: &str = include_str!("../docs/configuration.md");
const CONFIG_SRC: &str = include_str!("../src/config/raw.rs");

/// Every table of the file, as written in the reference ("" is the top level), with the Raw
/// struct serde reads it into.
const TABLES: &[(&str, &str)] = &[
    ("", "RawConfig"),
    ("proxy", "RawProxy"),
    ("admin", "RawAdmin"),
    ("state", "RawState"),
    ("notify", "RawNotify"),
    ("log", "RawLog"),
    ("services[]", "RawService"),
    ("services[].blue", "RawPool"),
    ("services[].green", "RawPool"),
    ("services[].health", "RawHealth"),
    ("services[].rollback", "RawRollback"),
    ("services[].rollback.triggers[]", "RawTrigger"),
    ("analysis", "RawAnalysis"),
    ("services[].verify[]", "RawVerify"),
];

/// A complete, valid service, for tests that need the rest of the config to pass.
const SERVICE: &str = "[[services]]\nname = \"api\"\nblue = { upstreams = [\"127.0.0.1:3001\"] }\ngreen = { upstreams = [\"127.0.0.1:3011\"] }\n";

fn parse(text: &str) -> Result<switchyard::config::Config, String> {
    switchyard::config::from_toml_str_with_env(text, Some(Default::default()))
        .map_err(|e| e.to_string())
}

fn parse_env(text: &str, env: &[(&str, &str)]) -> Result<switchyard::config::Config, String> {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    switchyard::config::from_toml_str_with_env(text, Some(env)).map_err(|e| e.to_string())
}

/// The documented rows: key -> the other cells (type, default, contract, description).
fn documented() -> BTreeMap<String, Vec<String>> {
    let mut rows = BTreeMap::new();
    for line in DOC.lines() {
        let Some(rest) = line.strip_prefix("| `") else {
            continue;
        };
        let cells: Vec<String> = line
            .trim()
            .trim_matches('|')
            .split(" | ")
            .map(|c| c.trim().to_string())
            .collect();
        let key = rest.split('`').next().unwrap_or_default().to_string();
        assert_eq!(
            cells.len(),
            5,
            "a reference row has 5 cells (key, type, default, contract, what it does): {line}"
        );
        assert!(
            rows.insert(key.clone(), cells[1..].to_vec()).is_none(),
            "{key} is documented twice"
        );
    }
    assert!(
        rows.len() > 40,
        "too few rows parsed from the reference: {rows:?}"
    );
    rows
}

/// Splits `services[].rollback.triggers[].kind` into its table and key.
fn split_key(key: &str) -> (&str, &str) {
    match key.rsplit_once('.') {
        Some((table, leaf)) => (table, leaf),
        None => ("", key),
    }
}

/// A TOML document that sets `leaf = value` inside `table` (written in the reference's form).
fn toml_at(table: &str, leaf: &str, value: &str) -> String {
    let leaf_toml = if leaf.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        leaf.to_string()
    } else {
        format!("\"{leaf}\"")
    };
    let mut inner = format!("{{ {leaf_toml} = {value} }}");
    let parts: Vec<&str> = if table.is_empty() {
        Vec::new()
    } else {
        table.split('.').collect()
    };
    if parts.is_empty() {
        return format!("{leaf_toml} = {value}\n");
    }
    for (i, part) in parts.iter().enumerate().rev() {
        let (name, array) = match part.strip_suffix("[]") {
            Some(n) => (n, true),
            None => (*part, false),
        };
        let v = if array { format!("[{inner}]") } else { inner };
        inner = if i == 0 {
            format!("{name} = {v}\n")
        } else {
            format!("{{ {name} = {v} }}")
        };
    }
    inner
}

/// The error key path the parser uses for `leaf` in `table` (`services[0].blue.zz_unknown`).
fn error_path(table: &str, leaf: &str) -> String {
    let t = table.replace("[]", "[0]");
    if t.is_empty() {
        leaf.to_string()
    } else {
        format!("{t}.{leaf}")
    }
}

/// serde's "expected one of `a`, `b`" (or "there are no fields") from an error message, if any.
fn expected_list(msg: &str) -> Option<BTreeSet<String>> {
    let rest = &msg[msg.find("expected one of ")? + "expected one of ".len()..];
    let line = rest.lines().next().unwrap_or_default();
    Some(
        line.split(", ")
            .filter_map(|x| {
                let x = x.trim().trim_end_matches([')', '.']);
                x.strip_prefix('`')
                    .and_then(|x| x.strip_suffix('`'))
                    .map(str::to_string)
            })
            .collect(),
    )
}

/// The fields of `struct NAME { ... }` in src/config/raw.rs, with serde renames applied.
fn struct_fields(name: &str) -> BTreeSet<String> {
    let start = CONFIG_SRC
        .find(&format!("struct {name} {{"))
        .unwrap_or_else(|| panic!("struct {name} not found in src/config/raw.rs"));
    let body = &CONFIG_SRC[start..];
    let body = &body[body.find('{').map(|i| i + 1).unwrap_or(0)..body.find("\n}").unwrap_or(0)];
    let mut fields = BTreeSet::new();
    let mut rename: Option<String> = None;
    for line in body.lines() {
        let l = line.trim();
        if let Some(r) = l.split("rename = \"").nth(1) {
            rename = r.split('"').next().map(str::to_string);
            continue;
        }
        if l.starts_with("//") || l.starts_with('#') || l.is_empty() {
            continue;
        }
        if let Some((ident, _)) = l.split_once(':') {
            let ident = ident.trim().trim_start_matches("pub ").trim();
            if !ident.is_empty() && ident.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                fields.insert(rename.take().unwrap_or_else(|| ident.to_string()));
            }
        }
    }
    assert!(!fields.is_empty(), "no fields parsed for struct {name}");
    fields
}

/// The keys the parser accepts in `table`, and whether they came from its own error message.
fn real_keys(table: &str, raw_struct: &str) -> (BTreeSet<String>, bool) {
    let text = toml_at(table, "zz_unknown", "\"x\"");
    let err = parse(&text).expect_err(&format!("an unknown key must be refused:\n{text}"));
    let want = format!(
        "{}: unknown key \"zz_unknown\"",
        error_path(table, "zz_unknown")
    );
    assert!(
        err.contains(&want),
        "the error names the unknown key at its place ({want}):\n{err}\n--- config\n{text}"
    );
    let from_source = struct_fields(raw_struct);
    match expected_list(&err) {
        Some(list) => {
            assert_eq!(
                list, from_source,
                "table {table:?}: the parser's list and {raw_struct}'s fields differ"
            );
            (list, true)
        }
        None => (from_source, false),
    }
}

#[test]
fn every_key_is_documented_and_every_documented_key_exists() {
    let doc = documented();
    let mut doc_tables: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for key in doc.keys() {
        let (table, leaf) = split_key(key);
        doc_tables
            .entry(table)
            .or_default()
            .insert(leaf.to_string());
    }
    // Sections are documented by their tables, not rows: the top level's keys are the sections
    // and services.
    let top: BTreeSet<String> = doc
        .keys()
        .map(|k| k.split(['.', '[']).next().unwrap_or_default().to_string())
        .collect();
    doc_tables.insert("", top);

    let mut from_parser = Vec::new();
    let mut problems = Vec::new();
    for (table, raw) in TABLES {
        let (real, parser_list) = real_keys(table, raw);
        if parser_list {
            from_parser.push(*table);
        }
        let documented = doc_tables.remove(table).unwrap_or_default();
        for k in real.difference(&documented) {
            problems.push(format!(
                "`{}` is accepted by the parser but not documented in docs/configuration.md",
                error_path(table, k).replace("[0]", "[]")
            ));
        }
        for k in documented.difference(&real) {
            problems.push(format!(
                "`{}` is documented but the parser does not know it",
                if table.is_empty() {
                    k.to_string()
                } else {
                    format!("{table}.{k}")
                }
            ));
        }
    }
    for (table, keys) in &doc_tables {
        problems.push(format!(
            "documented keys {keys:?} are in a table {table:?} the parser does not have"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    eprintln!(
        "tables whose key list came from the parser's own error: {from_parser:?}; the rest from the Raw structs in src/config/raw.rs"
    );

    // And each documented key, set on its own, is taken by the parser as a known key (a wrong
    // value type or a validation error is fine; "unknown key" is not).
    for key in doc.keys() {
        let (table, leaf) = split_key(key);
        let text = toml_at(table, leaf, "\"x\"");
        if let Err(e) = parse(&text) {
            let unknown = format!("{}: unknown key", error_path(table, leaf));
            assert!(
                !e.contains(&unknown),
                "documented key `{key}` is unknown to the parser:\n{e}\n--- config\n{text}"
            );
        }
    }
}

#[test]
fn rows_say_type_default_and_contract_and_durations_have_units() {
    for (key, cells) in documented() {
        let (ty, default, contract, what) = (&cells[0], &cells[1], &cells[2], &cells[3]);
        assert!(!ty.is_empty(), "{key}: no type");
        assert!(!default.is_empty(), "{key}: no default");
        assert!(
            contract == "contract" || contract == "extension",
            "{key}: the contract column says {contract:?} (contract or extension)"
        );
        assert!(what.len() > 20, "{key}: says too little: {what:?}");
        if ty.starts_with("duration") {
            // A documented default duration is a quoted string with a unit, and parses.
            if let Some(d) = default
                .strip_prefix("`\"")
                .and_then(|d| d.split("\"`").next())
            {
                switchyard::config::parse_duration(d)
                    .unwrap_or_else(|e| panic!("{key}: default {default}: {e}"));
            } else {
                assert!(
                    default.starts_with('—') || default.starts_with("see"),
                    "{key}: a duration default must be written as `\"2s\"`: {default}"
                );
            }
        }
    }
    // The keys the contract names are marked as such.
    let doc = documented();
    for key in [
        "proxy.listen",
        "proxy.preview_listen",
        "admin.token_env",
        "state.backend",
        "notify.webhooks",
        "services[].smoke_paths",
        "services[].health.unhealthy_after",
        "services[].rollback.watch_for",
        "services[].rollback.triggers[].for",
    ] {
        assert_eq!(doc[key][2], "contract", "{key}");
    }
    for key in [
        "proxy.max_connections",
        "admin.allowed_hosts",
        "notify.timeout",
    ] {
        assert_eq!(doc[key][2], "extension", "{key}");
    }
}

/// Every key path in a TOML document, in the reference's form.
fn key_paths(text: &str) -> BTreeSet<String> {
    let v: Value = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .build()
        .expect("TOML parses")
        .try_deserialize()
        .expect("to JSON");
    fn walk(v: &Value, prefix: &str, out: &mut BTreeSet<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    let is_table_array = v
                        .as_array()
                        .is_some_and(|a| !a.is_empty() && a.iter().all(Value::is_object));
                    if v.is_object() {
                        if !prefix.is_empty() {
                            out.insert(p.clone());
                        }
                        walk(v, &p, out);
                    } else if is_table_array {
                        if !prefix.is_empty() {
                            out.insert(p.clone());
                        }
                        for item in v.as_array().into_iter().flatten() {
                            walk(item, &format!("{p}[]"), out);
                        }
                    } else {
                        out.insert(p);
                    }
                }
            }
            _ => panic!("not a table at {prefix}"),
        }
    }
    let mut out = BTreeSet::new();
    walk(&v, "", &mut out);
    out
}

#[test]
fn examples_in_the_reference_are_valid_and_documented() {
    let doc = documented();
    // The complete example.
    let block = DOC
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a ```toml example in the reference");
    let cfg = parse(block).unwrap_or_else(|e| panic!("the reference's example is invalid:\n{e}"));
    assert_eq!(cfg.services.len(), 1);
    assert_eq!(cfg.services[0].rollback.triggers.len(), 3);
    let keys = key_paths(block);
    assert!(
        keys.contains("services[].rollback.triggers[].kind"),
        "{keys:?}"
    );
    for k in &keys {
        assert!(
            doc.contains_key(k),
            "the example uses undocumented key `{k}`"
        );
    }

    // The environment override examples apply, each to its documented key.
    let block = DOC
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a ```sh example of environment overrides");
    let mut n = 0;
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let (var, value) = line.split_once('=').expect("VAR=value");
        let parts: Vec<String> = var
            .strip_prefix("SWITCHYARD__")
            .expect("SWITCHYARD__ prefix")
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        let key = parts.join(".");
        assert!(doc.contains_key(&key), "{var} overrides undocumented {key}");
        let cfg = parse_env(SERVICE, &[(var, value)])
            .unwrap_or_else(|e| panic!("{var}={value} is refused:\n{e}"));
        let got = match key.as_str() {
            "proxy.listen" => cfg.proxy.listen.to_string(),
            "proxy.request_timeout" => format!("{:?}", cfg.proxy.request_timeout),
            "proxy.workers" => format!("{:?}", cfg.proxy.workers),
            "notify.webhooks" => cfg.notify.webhooks.join(","),
            other => panic!("add a check for the example {other}"),
        };
        let want = match key.as_str() {
            "proxy.request_timeout" => format!(
                "{:?}",
                switchyard::config::parse_duration(value).expect("duration")
            ),
            "proxy.workers" => format!("Some({value})"),
            _ => value.to_string(),
        };
        assert_eq!(got, want, "{var}={value}");
        n += 1;
    }
    assert!(n >= 3, "too few override examples");
}

#[test]
fn every_section_key_can_be_overridden_from_the_environment() {
    // The reference says any key of [proxy], [admin], [state] and [notify] can be overridden by
    // SWITCHYARD__SECTION__KEY: each one reaches the parser as a known key.
    let doc = documented();
    let mut n = 0;
    // (Top-level tables of their own, `release_plans`, are not section keys.)
    for key in doc
        .keys()
        .filter(|k| !k.starts_with("services") && k.contains('.'))
    {
        let (section, leaf) = split_key(key);
        let var = format!(
            "SWITCHYARD__{}__{}",
            section.to_ascii_uppercase(),
            leaf.to_ascii_uppercase()
        );
        if let Err(e) = parse_env(SERVICE, &[(&var, "x")]) {
            assert!(
                !e.contains("unknown key"),
                "{var} does not reach `{key}`:\n{e}"
            );
            n += 1;
        }
    }
    // "x" is not a valid value for most keys: the overrides really were read.
    assert!(n > 10, "only {n} overrides had an effect");
    // And an override of an unknown key is refused like one in the file.
    let e = parse_env(SERVICE, &[("SWITCHYARD__PROXY__ZZ_UNKNOWN", "1")]).expect_err("unknown");
    assert!(e.contains("proxy.zz_unknown: unknown key"), "{e}");
}

/// Two variables where one's key is the other's or inside it are refused, naming both, every
/// time: the `config` crate applied them in hash-map order, so `SWITCHYARD__PROXY=1` with
/// `SWITCHYARD__PROXY__WORKERS=4` was an error in some runs and in others silently dropped
/// the file's whole `[proxy]` table. A variable with no key is refused, naming it.
#[test]
fn overlapping_or_empty_environment_keys_are_refused_naming_the_variables() {
    let file = format!("[proxy]\nlisten = \"127.0.0.1:8088\"\n{SERVICE}");
    let mut problems = Vec::new();
    type Vars<'a> = &'a [(&'a str, &'a str)];
    let cases: &[(Vars, &[&str])] = &[
        (
            &[
                ("SWITCHYARD__PROXY", "1"),
                ("SWITCHYARD__PROXY__WORKERS", "4"),
            ],
            &[
                "proxy: ",
                "SWITCHYARD__PROXY ",
                "SWITCHYARD__PROXY__WORKERS ",
                "proxy.workers",
            ],
        ),
        (
            &[
                ("SWITCHYARD__STATE__PATH", "a.json"),
                ("SWITCHYARD__state__path", "b.json"),
            ],
            &[
                "state.path: ",
                "SWITCHYARD__STATE__PATH ",
                "SWITCHYARD__state__path ",
            ],
        ),
        (
            &[("SWITCHYARD__", "1")],
            &["environment variable SWITCHYARD__ names no key"],
        ),
    ];
    for (env, want) in cases {
        // Hash-map order changes from map to map: ask often enough to meet both orders.
        for _ in 0..20 {
            match parse_env(&file, env) {
                Ok(cfg) => {
                    problems.push(format!("{env:?}: accepted (listen {})", cfg.proxy.listen));
                    break;
                }
                Err(e) if want.iter().all(|w| e.contains(w)) && e.lines().count() == 1 => {}
                Err(e) => {
                    problems.push(format!("{env:?}: {e}"));
                    break;
                }
            }
        }
    }
    // Keys that only share a beginning are not inside one another.
    if let Err(e) = parse_env(
        &file,
        &[
            ("SWITCHYARD__LOG__ACCESS", "stderr"),
            ("SWITCHYARD__LOG__ACCESS_FORMAT", "combined"),
        ],
    ) {
        problems.push(format!("log.access with log.access_format: {e}"));
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// An override is typed by its key, not by what its value looks like: a string key keeps "123"
/// or "true" as written (the `config` crate's `try_parsing` made them an integer and a boolean,
/// and `state.path` refused them), while an integer key still reads "7", a boolean key "true"
/// or "FALSE", and a list key "123" as one item.
#[test]
fn environment_overrides_are_typed_by_their_key_not_by_their_value() {
    let doc = documented();
    let mut problems = Vec::new();
    let mut n = 0;
    for (key, cells) in doc
        .iter()
        .filter(|(k, _)| !k.starts_with("services") && k.contains('.'))
    {
        let (section, leaf) = split_key(key);
        let var = format!(
            "SWITCHYARD__{}__{}",
            section.to_ascii_uppercase(),
            leaf.to_ascii_uppercase()
        );
        let ty = cells[0].as_str();
        let values: &[&str] = if ty.starts_with("integer") {
            &["7"]
        } else if ty.starts_with("bool") {
            &["true", "FALSE"]
        } else {
            // Strings, addresses, paths, durations, URLs and lists of them.
            &["123", "true", "1.5"]
        };
        for value in values {
            n += 1;
            if let Err(e) = parse_env(SERVICE, &[(&var, value)]) {
                if e.contains("invalid type") {
                    problems.push(format!("{var}={value} ({ty}): {e}"));
                }
            }
        }
    }
    assert!(n > 60, "only {n} overrides tried");
    assert!(problems.is_empty(), "{problems:#?}");

    let cfg = parse_env(
        SERVICE,
        &[
            ("SWITCHYARD__STATE__PATH", "123"),
            ("SWITCHYARD__STATE__ETCD_PREFIX", "true"),
            ("SWITCHYARD__ADMIN__TOKEN_ENV", "1"),
            ("SWITCHYARD__ANALYSIS__PROMETHEUS_TOKEN_ENV", "2.5"),
            ("SWITCHYARD__ADMIN__ALLOWED_HOSTS", "123"),
            ("SWITCHYARD__PROXY__WORKERS", "4"),
            ("SWITCHYARD__PROXY__VIA", "FALSE"),
            ("SWITCHYARD__ADMIN__WATCH_CONFIG", "true"),
            ("SWITCHYARD__NOTIFY__MAX_ATTEMPTS", "9"),
        ],
    )
    .unwrap_or_else(|e| panic!("refused:\n{e}"));
    assert_eq!(cfg.state.path, std::path::PathBuf::from("123"));
    assert_eq!(cfg.state.etcd_prefix, "true");
    assert_eq!(cfg.admin.token_env, "1");
    assert_eq!(cfg.analysis.prometheus_token_env.as_deref(), Some("2.5"));
    assert_eq!(cfg.admin.allowed_hosts, ["123"]);
    assert_eq!(cfg.proxy.workers, Some(4));
    assert!(!cfg.proxy.via);
    assert!(cfg.admin.watch_config);
    assert_eq!(cfg.notify.max_attempts, 9);

    // An integer or boolean key still refuses what is neither, naming key and variable.
    for (var, value, want) in [
        (
            "SWITCHYARD__PROXY__WORKERS",
            "four",
            "proxy.workers: invalid type: string \"four\", expected an integer \
             (from environment variable SWITCHYARD__PROXY__WORKERS)",
        ),
        (
            "SWITCHYARD__PROXY__WORKERS",
            "1.5",
            "proxy.workers: invalid type: floating point `1.5`, expected an integer \
             (from environment variable SWITCHYARD__PROXY__WORKERS)",
        ),
        (
            "SWITCHYARD__PROXY__VIA",
            "1",
            "proxy.via: invalid type: integer `1`, expected a boolean \
             (from environment variable SWITCHYARD__PROXY__VIA)",
        ),
    ] {
        let e = parse_env(SERVICE, &[(var, value)]).expect_err(value);
        assert!(e.contains(want), "{var}={value}: {e}");
    }
}

/// A list key's variable: comma-separated, each item trimmed, empty items left out, so an empty
/// variable is an empty list (it was one empty item: `notify.webhooks[0]: invalid URL ""`).
#[test]
fn list_overrides_trim_their_items_and_an_empty_one_is_an_empty_list() {
    let file = format!(
        "[notify]\nwebhooks = [\"http://hooks.internal:8080/a\"]\n\
         [state]\netcd_endpoints = [\"http://127.0.0.1:2379\"]\n\
         [admin]\nallowed_hosts = [\"switchyard\"]\n{SERVICE}"
    );
    for value in ["", "  ", ",", " , ,"] {
        let cfg = parse_env(
            &file,
            &[
                ("SWITCHYARD__NOTIFY__WEBHOOKS", value),
                ("SWITCHYARD__STATE__ETCD_ENDPOINTS", value),
                ("SWITCHYARD__ADMIN__ALLOWED_HOSTS", value),
            ],
        )
        .unwrap_or_else(|e| panic!("{value:?} refused:\n{e}"));
        assert!(
            cfg.notify.webhooks.is_empty(),
            "{value:?}: {:?}",
            cfg.notify.webhooks
        );
        assert!(
            cfg.state.etcd_endpoints.is_empty(),
            "{value:?}: {:?}",
            cfg.state.etcd_endpoints
        );
        assert!(
            cfg.admin.allowed_hosts.is_empty(),
            "{value:?}: {:?}",
            cfg.admin.allowed_hosts
        );
    }
    let cfg = parse_env(
        SERVICE,
        &[
            (
                "SWITCHYARD__NOTIFY__WEBHOOKS",
                " http://hooks.internal:8080/a ,, http://hooks.internal:8080/b,",
            ),
            (
                "SWITCHYARD__STATE__ETCD_ENDPOINTS",
                "http://10.0.0.1:2379 , http://10.0.0.2:2379",
            ),
            (
                "SWITCHYARD__ADMIN__ALLOWED_HOSTS",
                " switchyard , Admin.Example ",
            ),
        ],
    )
    .unwrap_or_else(|e| panic!("refused:\n{e}"));
    assert_eq!(
        cfg.notify.webhooks,
        [
            "http://hooks.internal:8080/a",
            "http://hooks.internal:8080/b"
        ]
    );
    assert_eq!(
        cfg.state.etcd_endpoints,
        ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
    );
    assert_eq!(cfg.admin.allowed_hosts, ["switchyard", "admin.example"]);
}

#[test]
fn shipped_config_uses_only_documented_keys() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/switchyard.toml");
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("config/switchyard.toml must exist ({e})"));
    let doc = documented();
    let keys = key_paths(&text);
    assert!(keys.contains("proxy.listen"), "{keys:?}");
    let undocumented: Vec<&String> = keys.iter().filter(|k| !doc.contains_key(*k)).collect();
    assert!(
        undocumented.is_empty(),
        "config/switchyard.toml uses keys not in docs/configuration.md: {undocumented:?}"
    );
    parse(&text).unwrap_or_else(|e| panic!("config/switchyard.toml is invalid:\n{e}"));
}

#[test]
fn helpers_build_what_the_parser_reads() {
    // The probes above are only as good as these documents; check their shape once.
    assert_eq!(
        toml_at("services[].rollback.triggers[]", "kind", "\"x\""),
        "services = [{ rollback = { triggers = [{ kind = \"x\" }] } }]\n"
    );
    assert_eq!(
        toml_at("proxy", "listen", "\"x\""),
        "proxy = { listen = \"x\" }\n"
    );
    assert_eq!(
        error_path("services[].blue", "zz_unknown"),
        "services[0].blue.zz_unknown"
    );
    assert_eq!(
        expected_list("unknown field `zz`, expected one of `a`, `b`, `for`"),
        Some(["a", "b", "for"].iter().map(|s| s.to_string()).collect())
    );
    assert!(struct_fields("RawTrigger").contains("for"));
    assert!(!struct_fields("RawTrigger").contains("for_"));
}
