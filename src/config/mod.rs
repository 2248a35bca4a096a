//! Configuration: the file as serde reads it (`raw.rs`), validated section by section
//! (`validate/`) into the config the proxy runs on (`types.rs`), and the summary `check`
//! prints (`check.rs`).
//!
//! `check`, startup and reload share [`load`]: the file is read through the `config` crate (so
//! `SWITCHYARD__SECTION__KEY` environment variables override it), deserialized with every
//! unknown key collected (`serde_ignored`), then validated as a whole so that every problem is
//! reported at once, each with its key path.

mod check;
pub mod plan;
mod raw;
mod types;
mod validate;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::Path;
use std::time::Duration;

pub use types::{
    AccessFormat, AccessTarget, AdminConfig, AnalysisConfig, Bound, Color, Config, HealthConfig,
    LogConfig, NotifyConfig, OnEmpty, OnError, PassiveConfig, PoolConfig, ProbeCheck,
    ProbeCondition, ProbeTarget, PromCheck, Protocol, ProxyConfig, RollbackConfig, RuntimeFlavor,
    ServiceConfig, StateBackend, StateConfig, TriggerConfig, TriggerKind, UpstreamEntry,
    UpstreamName, VerifyCheck, MAX_WINDOW,
};
pub use validate::host_pattern_matches;
#[cfg(test)]
use validate::{placeholder_errors, QUERY_PLACEHOLDERS};

/// One problem in a config file, with the key it is at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Every problem found in one config file.
#[derive(Clone, Debug, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Reads, overrides from the environment and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            key: String::new(),
            message: format!("cannot read config file {}: {e}", path.display()),
        }])
    })?;
    from_toml_str(&text)
}

/// Parses TOML text (plus `SWITCHYARD__*` environment overrides) into a validated config.
pub fn from_toml_str(text: &str) -> Result<Config, ConfigErrors> {
    from_toml_str_with_env(text, None)
}

/// As [`from_toml_str`], with the environment given explicitly (tests), or the process's.
pub fn from_toml_str_with_env(
    text: &str,
    env: Option<std::collections::HashMap<String, String>>,
) -> Result<Config, ConfigErrors> {
    let one = |message: String| {
        ConfigErrors(vec![ConfigError {
            key: String::new(),
            message,
        }])
    };
    let mut envsrc = config::Environment::with_prefix("SWITCHYARD")
        .separator("__")
        .try_parsing(true)
        .list_separator(",")
        .with_list_parse_key("notify.webhooks")
        .with_list_parse_key("state.etcd_endpoints")
        .with_list_parse_key("admin.allowed_hosts");
    if let Some(env) = env {
        envsrc = envsrc.source(Some(env.into_iter().collect()));
    }
    let built = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(envsrc)
        .build()
        .map_err(|e| one(format!("cannot parse config: {e}")))?;
    let value: serde_json::Value = built
        .try_deserialize()
        .map_err(|e| one(format!("cannot parse config: {e}")))?;
    let (raw, mut errors) = deserialize(&value)?;
    // Validate the known keys too, so that one run of `check` reports every problem, not only
    // the unknown keys.
    match validate::validate(raw) {
        Ok(cfg) if errors.is_empty() => Ok(cfg),
        Ok(_) => Err(ConfigErrors(errors)),
        Err(ConfigErrors(more)) => {
            errors.extend(more);
            Err(ConfigErrors(errors))
        }
    }
}

/// Deserializes the file, collecting every key no struct names as an error at its key path
/// (with the keys that table has). A value of the wrong type stops deserialization: it is
/// reported with its path, after the unknown keys met before it.
fn deserialize(
    value: &serde_json::Value,
) -> Result<(raw::RawConfig, Vec<ConfigError>), ConfigErrors> {
    let mut errors = Vec::new();
    let mut unknown = |path: serde_ignored::Path<'_>| {
        let mut segments = Vec::new();
        key_segments(&path, &mut segments);
        errors.push(unknown_key(&segments));
    };
    let de = serde_ignored::Deserializer::new(value, &mut unknown);
    match serde_path_to_error::deserialize::<_, raw::RawConfig>(de) {
        Ok(raw) => Ok((raw, errors)),
        Err(e) => {
            let path = e.path().to_string();
            let key = if path == "." { String::new() } else { path };
            let message = e.into_inner().to_string();
            errors.push(ConfigError { key, message });
            Err(ConfigErrors(errors))
        }
    }
}

/// The map keys of a path, outermost first, each with the index that follows it when it is a
/// sequence (`services`, 0).
fn key_segments(path: &serde_ignored::Path<'_>, out: &mut Vec<(String, Option<usize>)>) {
    use serde_ignored::Path;
    match path {
        Path::Root => {}
        Path::Seq { parent, index } => {
            key_segments(parent, out);
            if let Some(last) = out.last_mut() {
                last.1 = Some(*index);
            }
        }
        Path::Map { parent, key } => {
            key_segments(parent, out);
            out.push((key.clone(), None));
        }
        Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => key_segments(parent, out),
    }
}

/// `services[0].blue.zz: unknown key "zz" (expected one of `protocol`, `upstreams`)`.
fn unknown_key(segments: &[(String, Option<usize>)]) -> ConfigError {
    let mut key = String::new();
    let mut table: Vec<&str> = Vec::new();
    for (name, index) in segments {
        if !key.is_empty() {
            key.push('.');
        }
        key.push_str(name);
        table.push(name);
        if let Some(i) = index {
            key.push_str(&format!("[{i}]"));
            table.push("[]");
        }
    }
    let field = table.pop().unwrap_or_default();
    let expected = match raw::fields_at(&table) {
        Some([]) | None => String::new(),
        Some([one]) => format!(" (expected `{one}`)"),
        Some([a, b]) => format!(" (expected `{a}` or `{b}`)"),
        Some(all) => {
            let list: Vec<String> = all.iter().map(|f| format!("`{f}`")).collect();
            format!(" (expected one of {})", list.join(", "))
        }
    };
    ConfigError {
        key,
        message: format!("unknown key {field:?}{expected}"),
    }
}

/// Durations need a unit: `"250ms"`, `"2s"`, `"2m"`, `"2h"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() || t.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!(
            "invalid duration {s:?} (needs a unit: \"250ms\", \"2s\", \"2m\", \"2h\")"
        ));
    }
    humantime::parse_duration(t).map_err(|e| {
        format!("invalid duration {s:?}: {e} (use a unit: \"250ms\", \"2s\", \"2m\", \"2h\")")
    })
}
