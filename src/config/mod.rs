//! Configuration: the file as serde reads it (`raw.rs`), validated section by section
//! (`validate/`) into the config the proxy runs on (`types.rs`), and the summary `check`
//! prints (`check.rs`).
//!
//! `check`, startup and reload share [`load`]: the file is read through the `config` crate (so
//! `SWITCHYARD__SECTION__KEY` environment variables override it), deserialized with every
//! unknown key and every value of the wrong type collected (`de.rs`), then validated as a whole
//! so that every problem is reported at once, each with its key path.

mod check;
mod de;
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
pub use validate::{host_pattern_matches, valid_service_name};
#[cfg(test)]
use validate::{placeholder_errors, QUERY_PLACEHOLDERS};
pub(crate) use validate::{same_file, same_path, state_file_at};

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
    load_with(path, |_| Vec::new())
}

/// As [`load`], with the problems `files` finds in the files the config names (certificates,
/// the access log) reported beside every other problem, not only once the rest is valid: a
/// caller that reads those files (`check`, `serve`) passes its own check, which this layer
/// does not know. `files` sees the config as validated, a default in place of each value
/// that did not pass.
pub fn load_with(
    path: &Path,
    files: impl FnOnce(&Config) -> Vec<ConfigError>,
) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            key: String::new(),
            message: format!("cannot read config file {}: {e}", path.display()),
        }])
    })?;
    parse(&text, None, files)
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
    parse(text, env, |_| Vec::new())
}

fn parse(
    text: &str,
    env: Option<std::collections::HashMap<String, String>>,
    files: impl FnOnce(&Config) -> Vec<ConfigError>,
) -> Result<Config, ConfigErrors> {
    let one = |message: String| {
        ConfigErrors(vec![ConfigError {
            key: String::new(),
            message,
        }])
    };
    let env_keys = de::env_keys(env.as_ref()).map_err(ConfigErrors)?;
    let quoted = de::quote_unrepresentable(text);
    let (text, out_of_range) = match &quoted {
        Some((t, keys)) => (t.as_str(), keys.as_slice()),
        None => (text, &[][..]),
    };
    // Every variable is read as a string; [`de::deserialize`] turns one into the number or
    // boolean its key takes only where the key asks for one, so that a string key keeps "123"
    // or "true" as written (the `config` crate's `try_parsing` guessed the type from the value
    // alone, and `state.path=123` was refused as an integer).
    let mut envsrc = config::Environment::with_prefix("SWITCHYARD").separator("__");
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
    let (raw, mut errors, removed) = de::deserialize(value, &env_keys);
    // Validate the known keys too, with each wrong-typed value counted as absent, so that one
    // run of `check` reports every problem, not only the unknown keys and the wrong types.
    if let Some(raw) = raw {
        let (cfg, more) = validate::validate_all(raw);
        errors.extend(more.into_iter().filter_map(|e| removed.place(e)));
        errors.extend(files(&cfg));
        if errors.is_empty() {
            return Ok(cfg);
        }
    }
    // A number the pre-pass quoted is refused at its key as a string: say what it is.
    for e in errors.iter_mut() {
        if let Some((_, literal)) = out_of_range.iter().find(|(k, _)| *k == e.key) {
            e.message = format!(
                "{literal} cannot be held: an integer must lie within ±9223372036854775807, a float must be finite"
            );
        }
    }
    de::name_env_vars(&mut errors, &env_keys);
    Err(ConfigErrors(errors))
}

/// The longest duration any key (or `ctl --timeout`) accepts: ten years. Longer ones are typos,
/// and they are not harmless: a deadline of `now + d` past what `Instant` holds panics, and a
/// wall-clock time past year 9999 cannot be written as RFC 3339 (a bake, `watch_for` or
/// `validate` of "500000000000h" used to panic the release driver and `/api/status`).
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Durations need a unit: `"250ms"`, `"2s"`, `"2m"`, `"2h"`; at most ten years.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() || t.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err(format!(
            "invalid duration {s:?} (needs a unit: \"250ms\", \"2s\", \"2m\", \"2h\")"
        ));
    }
    let d = humantime::parse_duration(t).map_err(|e| {
        format!("invalid duration {s:?}: {e} (use a unit: \"250ms\", \"2s\", \"2m\", \"2h\")")
    })?;
    if d > MAX_DURATION {
        return Err(format!(
            "invalid duration {s:?}: longer than the longest allowed, 10 years (\"3650d\")"
        ));
    }
    Ok(d)
}
