//! The file's value tree into [`RawConfig`], with every unknown key and every value of the
//! wrong type collected at its key path, so that `check` reports them beside the semantic
//! errors instead of the first wrong type hiding the rest.
//!
//! serde stops at the first value of the wrong type. That value is taken out of the tree (so it
//! counts as absent, as if the key were not written) and the tree is deserialized again, up to
//! [`MAX_TYPE_ERRORS`] times. A removed array element shifts the ones after it; [`Removed`]
//! maps later paths back to the file's indices.

use std::collections::HashMap;
use std::fmt::Write as _;

use serde_json::Value;

use super::raw::{self, RawConfig};
use super::ConfigError;

/// Values of the wrong type one load reports at most: each costs another pass over the tree.
const MAX_TYPE_ERRORS: usize = 64;

/// One step of a key path: a table's key or an array's index.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// The paths taken out of the tree, each as it is in the file.
#[derive(Debug, Default)]
pub(super) struct Removed(Vec<Vec<Seg>>);

impl Removed {
    /// `path` in the tree as it is now, as it is in the file: every index past a removed
    /// element of the same array moves up by one.
    fn in_file(&self, path: &[Seg]) -> Vec<Seg> {
        let mut out = Vec::with_capacity(path.len());
        for seg in path {
            let seg = match seg {
                Seg::Index(i) => {
                    let mut gone: Vec<usize> = self
                        .0
                        .iter()
                        .filter_map(|p| match p.split_last() {
                            Some((Seg::Index(r), parent)) if parent == out.as_slice() => Some(*r),
                            _ => None,
                        })
                        .collect();
                    gone.sort_unstable();
                    let mut i = *i;
                    for r in gone {
                        if r <= i {
                            i += 1;
                        }
                    }
                    Seg::Index(i)
                }
                key => key.clone(),
            };
            out.push(seg);
        }
        out
    }

    /// A semantic error found in the tree without the removed values, keyed as in the file;
    /// None for one at or under a removed value (its type error already names that key, and
    /// "required" there would only repeat it).
    pub(super) fn place(&self, e: ConfigError) -> Option<ConfigError> {
        if self.0.is_empty() {
            return Some(e);
        }
        let now = parse_key(&e.key);
        let file = self.in_file(&now);
        if self.0.iter().any(|p| file.starts_with(p)) {
            return None;
        }
        if file == now {
            Some(e)
        } else {
            Some(ConfigError {
                key: render(&file),
                message: e.message,
            })
        }
    }
}

/// Deserializes the tree: the config (None when a wrong type could not be taken out, or too
/// many were found), every unknown key and wrong type as an error, and what was taken out.
/// `env` are the keys `SWITCHYARD__*` variables set ([`env_keys`]): their values are strings,
/// typed here by what each key takes (see [`env_value`]).
pub(super) fn deserialize(
    mut value: Value,
    env: &[(String, String)],
) -> (Option<RawConfig>, Vec<ConfigError>, Removed) {
    let mut removed = Removed::default();
    let mut wrong: Vec<ConfigError> = Vec::new();
    for (key, _) in env {
        if LIST_KEYS.contains(&key.as_str()) {
            split_list(&mut value, &parse_key(key));
        }
    }
    loop {
        let mut unknown = Vec::new();
        let result = {
            let mut note = |path: serde_ignored::Path<'_>| {
                let mut segs = Vec::new();
                ignored_segments(&path, &mut segs);
                unknown.push(segs);
            };
            let de = serde_ignored::Deserializer::new(&value, &mut note);
            serde_path_to_error::deserialize::<_, RawConfig>(de)
        };
        let mut errors: Vec<ConfigError> = unknown
            .iter()
            .map(|p| unknown_key(&removed.in_file(p)))
            .collect();
        let e = match result {
            Ok(raw) => {
                errors.append(&mut wrong);
                return (Some(raw), errors, removed);
            }
            Err(e) => e,
        };
        let now = error_segments(e.path());
        // A variable's string where the key takes another type: read it as a number or a
        // boolean and try again (once per key: the value is no longer a string after).
        if let Some(now) = &now {
            let key = render(now);
            if env.iter().any(|(k, _)| *k == key) && env_value(&mut value, now) {
                continue;
            }
        }
        let message = plain_type_error(e.into_inner().to_string());
        let at = now.as_deref().map(|p| removed.in_file(p));
        wrong.push(ConfigError {
            key: at.as_deref().map(render).unwrap_or_default(),
            message,
        });
        let full = wrong.len() >= MAX_TYPE_ERRORS;
        match (now, at) {
            (Some(now), Some(at)) if !full && take(&mut value, &now) => removed.0.push(at),
            _ => {
                errors.append(&mut wrong);
                if full {
                    errors.push(ConfigError {
                        key: String::new(),
                        message: format!(
                            "stopped after {MAX_TYPE_ERRORS} values of the wrong type; fix these and check again"
                        ),
                    });
                }
                return (None, errors, removed);
            }
        }
    }
}

/// The keys whose variable is a comma-separated list (README "Configuration").
const LIST_KEYS: [&str; 3] = [
    "notify.webhooks",
    "state.etcd_endpoints",
    "admin.allowed_hosts",
];

/// A list key's variable, a string, as the list it means: split at commas, each item trimmed,
/// empty items left out (so an empty variable is an empty list).
fn split_list(value: &mut Value, path: &[Seg]) {
    if let Some(v) = get_mut(value, path) {
        if let Value::String(s) = v {
            let items = s
                .split(',')
                .map(str::trim)
                .filter(|i| !i.is_empty())
                .map(|i| Value::String(i.to_string()))
                .collect();
            *v = Value::Array(items);
        }
    }
}

/// A variable's string at `path`, refused by the type its key takes, as the boolean (any case)
/// or number it spells; false when it is not a string or spells neither (the type error
/// stands).
fn env_value(value: &mut Value, path: &[Seg]) -> bool {
    let Some(v) = get_mut(value, path) else {
        return false;
    };
    let Value::String(s) = v else {
        return false;
    };
    let typed = if let Ok(b) = s.to_ascii_lowercase().parse::<bool>() {
        Value::Bool(b)
    } else if let Ok(i) = s.parse::<i64>() {
        Value::from(i)
    } else if let Some(n) = s.parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
        Value::Number(n)
    } else {
        return false;
    };
    *v = typed;
    true
}

/// The value at `path` (in the tree as it is now).
fn get_mut<'a>(value: &'a mut Value, path: &[Seg]) -> Option<&'a mut Value> {
    let mut v = value;
    for seg in path {
        v = match (seg, v) {
            (Seg::Key(k), Value::Object(m)) => m.get_mut(k)?,
            (Seg::Index(i), Value::Array(a)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(v)
}

/// Removes the value at `path` (in the tree as it is now); false when there is none.
fn take(value: &mut Value, path: &[Seg]) -> bool {
    let Some((last, parent)) = path.split_last() else {
        return false;
    };
    let Some(v) = get_mut(value, parent) else {
        return false;
    };
    match (last, v) {
        (Seg::Key(k), Value::Object(m)) => m.remove(k).is_some(),
        (Seg::Index(i), Value::Array(a)) if *i < a.len() => {
            a.remove(*i);
            true
        }
        _ => false,
    }
}

/// serde's words for Rust types (`i64`, `struct RawPool`) in the ones a config's author knows.
fn plain_type_error(message: String) -> String {
    if !message.starts_with("invalid type: ") {
        return message;
    }
    if let Some(head) = message.strip_suffix(", expected i64") {
        return format!("{head}, expected an integer");
    }
    match message.rfind(", expected struct Raw") {
        Some(i) => format!("{}, expected a table", &message[..i]),
        None => message,
    }
}

/// The path of a type error; None for a step that is not a key or an index.
fn error_segments(path: &serde_path_to_error::Path) -> Option<Vec<Seg>> {
    use serde_path_to_error::Segment;
    path.iter()
        .map(|s| match s {
            Segment::Map { key } => Some(Seg::Key(key.clone())),
            Segment::Seq { index } => Some(Seg::Index(*index)),
            Segment::Enum { .. } | Segment::Unknown => None,
        })
        .collect()
}

/// The path of an unknown key, outermost first.
fn ignored_segments(path: &serde_ignored::Path<'_>, out: &mut Vec<Seg>) {
    use serde_ignored::Path;
    match path {
        Path::Root => {}
        Path::Seq { parent, index } => {
            ignored_segments(parent, out);
            out.push(Seg::Index(*index));
        }
        Path::Map { parent, key } => {
            ignored_segments(parent, out);
            out.push(Seg::Key(key.clone()));
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => ignored_segments(parent, out),
    }
}

/// `services[0].blue.zz: unknown key "zz" (expected one of `protocol`, `upstreams`)`.
fn unknown_key(path: &[Seg]) -> ConfigError {
    let table: Vec<&str> = path
        .iter()
        .map(|s| match s {
            Seg::Key(k) => k.as_str(),
            Seg::Index(_) => "[]",
        })
        .collect();
    let (field, table) = table.split_last().map_or(("", &[][..]), |(f, t)| (*f, t));
    let expected = match raw::fields_at(table) {
        Some([]) | None => String::new(),
        Some([one]) => format!(" (expected `{one}`)"),
        Some([a, b]) => format!(" (expected `{a}` or `{b}`)"),
        Some(all) => {
            let list: Vec<String> = all.iter().map(|f| format!("`{f}`")).collect();
            format!(" (expected one of {})", list.join(", "))
        }
    };
    ConfigError {
        key: render(path),
        message: format!("unknown key {field:?}{expected}"),
    }
}

/// `services[0].blue.upstreams[1]`.
fn render(path: &[Seg]) -> String {
    let mut key = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(k);
            }
            Seg::Index(i) => {
                let _ = write!(key, "[{i}]");
            }
        }
    }
    key
}

/// The inverse of [`render`]; a part it cannot read (a key with `[` in it) stays one key.
fn parse_key(key: &str) -> Vec<Seg> {
    let mut out = Vec::new();
    if key.is_empty() {
        return out;
    }
    for part in key.split('.') {
        let (name, mut rest) = part.split_at(part.find('[').unwrap_or(part.len()));
        let mut segs = vec![Seg::Key(name.to_string())];
        while let Some((n, tail)) = rest.strip_prefix('[').and_then(|r| r.split_once(']')) {
            let Ok(i) = n.parse() else { break };
            segs.push(Seg::Index(i));
            rest = tail;
        }
        if rest.is_empty() {
            out.extend(segs);
        } else {
            out.push(Seg::Key(part.to_string()));
        }
    }
    out
}

/// The keys `SWITCHYARD__*` variables set, each with its variable, read as the `config` crate
/// reads them (any case, `__` between the parts), sorted by key.
///
/// Refused, each pair naming both variables: two variables setting the same key (they may
/// differ only in case) or one a key inside the other's (`SWITCHYARD__PROXY` and
/// `SWITCHYARD__PROXY__WORKERS`). The `config` crate applies variables in hash-map order, so
/// such a pair gave a different config from run to run (an error, or the file's whole table
/// replaced). And a variable with no key (`SWITCHYARD__`).
pub(super) fn env_keys(
    env: Option<&HashMap<String, String>>,
) -> Result<Vec<(String, String)>, Vec<ConfigError>> {
    const PREFIX: &str = "switchyard__";
    let names: Vec<String> = match env {
        Some(env) => env.keys().cloned().collect(),
        None => std::env::vars_os()
            .filter_map(|(k, _)| k.into_string().ok())
            .collect(),
    };
    let mut keys: Vec<(String, String)> = names
        .into_iter()
        .filter_map(|var| {
            let lower = var.to_lowercase();
            let key = lower.strip_prefix(PREFIX)?.replace("__", ".");
            Some((key, var))
        })
        .collect();
    keys.sort();
    let mut errors = Vec::new();
    for (i, (key, var)) in keys.iter().enumerate() {
        if key.is_empty() {
            errors.push(ConfigError {
                key: String::new(),
                message: format!(
                    "environment variable {var} names no key (use SWITCHYARD__SECTION__KEY, e.g. SWITCHYARD__PROXY__WORKERS)"
                ),
            });
            continue;
        }
        // `SWITCHYARD__SERVICES__0__…`: the `config` crate makes a table of it that replaces
        // the file's whole array ("invalid type: map, expected a sequence"); say what to do.
        // A plan's name (`release_plans.2026`) is a table's key, not an index.
        let parts: Vec<&str> = key.split('.').collect();
        let index = parts.iter().enumerate().any(|(i, p)| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && !(i == 1 && parts[0] == "release_plans")
        });
        if index {
            errors.push(ConfigError {
                key: key.clone(),
                message: format!(
                    "environment variable {var} names an entry of a list ([[services]], triggers, checks): entries cannot be set from the environment; set them in the file"
                ),
            });
            continue;
        }
        for (other, other_var) in &keys[i + 1..] {
            let message = if other == key {
                format!("set by both environment variables {var} and {other_var} (which would win is not defined); set only one")
            } else if within(other, key) {
                format!(
                    "set by environment variable {var} while {other_var} sets {other}, inside it (which would win is not defined); set only one"
                )
            } else {
                continue;
            };
            errors.push(ConfigError {
                key: key.clone(),
                message,
            });
        }
    }
    if errors.is_empty() {
        Ok(keys)
    } else {
        Err(errors)
    }
}

/// Whether key `a` is `b` or inside it (`proxy.workers` in `proxy`, `services[0]` in
/// `services`).
fn within(a: &str, b: &str) -> bool {
    a == b
        || (!b.is_empty()
            && a.strip_prefix(b)
                .is_some_and(|r| r.starts_with('.') || r.starts_with('[')))
}

/// Names the variable behind each error at, under or above a key the environment set: the
/// file may be right and the environment wrong.
pub(super) fn name_env_vars(errors: &mut [ConfigError], keys: &[(String, String)]) {
    if keys.is_empty() {
        return;
    }
    for e in errors {
        let vars: Vec<&str> = keys
            .iter()
            .filter(|(k, _)| within(&e.key, k) || within(k, &e.key))
            .map(|(_, v)| v.as_str())
            .collect();
        match vars.as_slice() {
            [] => {}
            [one] => e.message += &format!(" (from environment variable {one})"),
            all => e.message += &format!(" (from environment variables {})", all.join(", ")),
        }
    }
}

/// Numbers the `config` crate cannot hold: an integer past `i64`, a float past `f64` (or `nan`
/// and `inf`, which JSON cannot carry). The crate refuses the whole file over one of them,
/// naming no key, and every other problem went unreported. Each is quoted here, so that the
/// type check reports it at its key beside the rest; returns the text so changed and each
/// key with the literal as written (None when there is none, or the text is no valid TOML:
/// the crate's own error says where).
pub(super) fn quote_unrepresentable(text: &str) -> Option<(String, Vec<(String, String)>)> {
    let table = toml::de::DeTable::parse(text).ok()?;
    let mut found = Vec::new();
    let mut path = Vec::new();
    for (k, v) in table.get_ref() {
        path.push(Seg::Key(k.get_ref().to_string()));
        unrepresentable(v, &mut path, &mut found);
        path.pop();
    }
    if found.is_empty() {
        return None;
    }
    found.sort_by_key(|(_, span)| std::cmp::Reverse(span.start));
    let mut out = text.to_string();
    let mut keys = Vec::new();
    for (key, span) in found {
        let literal = text.get(span.clone())?.to_string();
        out.replace_range(span, &format!("{literal:?}"));
        keys.push((key, literal));
    }
    keys.reverse();
    Some((out, keys))
}

fn unrepresentable(
    v: &toml::Spanned<toml::de::DeValue<'_>>,
    path: &mut Vec<Seg>,
    found: &mut Vec<(String, std::ops::Range<usize>)>,
) {
    use toml::de::DeValue;
    let bad = match v.get_ref() {
        DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix()).is_err(),
        DeValue::Float(f) => !f.as_str().parse::<f64>().is_ok_and(f64::is_finite),
        DeValue::Table(t) => {
            for (k, v) in t {
                path.push(Seg::Key(k.get_ref().to_string()));
                unrepresentable(v, path, found);
                path.pop();
            }
            false
        }
        DeValue::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                path.push(Seg::Index(i));
                unrepresentable(v, path, found);
                path.pop();
            }
            false
        }
        _ => false,
    };
    if bad {
        found.push((render(path), v.span()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_and_render_back() {
        for key in [
            "",
            "proxy.workers",
            "services[0].blue.upstreams[12]",
            "release_plans.a[b.phases[0].name",
        ] {
            assert_eq!(render(&parse_key(key)), key);
        }
    }

    #[test]
    fn indices_past_a_removed_element_are_the_files() {
        let k = |s: &str| Seg::Key(s.to_string());
        let removed = Removed(vec![
            vec![k("services"), Seg::Index(0)],
            vec![k("services"), Seg::Index(2), k("hosts"), Seg::Index(1)],
        ]);
        // Now services[1] is the file's services[2], whose hosts[1] is gone.
        let now = parse_key("services[1].hosts[1]");
        assert_eq!(render(&removed.in_file(&now)), "services[2].hosts[2]");
        assert_eq!(
            render(&removed.in_file(&parse_key("services[0].hosts[1]"))),
            "services[1].hosts[1]"
        );
    }
}
