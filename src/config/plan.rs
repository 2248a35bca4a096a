//! Release plans: the format of a plan file, of `POST /api/releases` and of the config's
//! `[release_plans.NAME]` tables, and its validation (every problem with its key, as `check`
//! reports the config's). Running a plan is `crate::release`'s job; this is only what a plan is.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use super::{parse_duration, Color, Config, ConfigError, ConfigErrors};

// ---------------------------------------------------------------------------------------------
// The plan
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Auto,
    Manual,
}

impl Gate {
    pub fn as_str(self) -> &'static str {
        match self {
            Gate::Auto => "auto",
            Gate::Manual => "manual",
        }
    }
}

#[derive(Clone, Debug)]
pub struct PhasePlan {
    pub name: String,
    pub services: Vec<String>,
    /// None: each service's idle color at the release's start.
    pub to: Option<Color>,
    pub bake: Duration,
    pub gate: Gate,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub name: String,
    /// None: the longest `watch_for` of the plan's services whose automatic rollback can act.
    pub validate: Option<Duration>,
    pub phases: Vec<PhasePlan>,
}

impl Plan {
    /// The plan's services that no automatic rollback watches in `cfg` (rollback off, no
    /// trigger, or `dry_run`): a failure of theirs rolls nothing back. In plan order, once each.
    pub fn unwatched(&self, cfg: &super::Config) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for name in self.phases.iter().flat_map(|p| &p.services) {
            let watched = cfg
                .services
                .iter()
                .find(|s| &s.name == name)
                .is_none_or(|s| s.rollback.acts());
            if !watched && !out.contains(name) {
                out.push(name.clone());
            }
        }
        out
    }
}

fn one(message: String) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        key: String::new(),
        message,
    }])
}

/// A TOML plan as the JSON value the API takes.
pub fn value_from_toml(text: &str) -> Result<Value, ConfigErrors> {
    ::config::Config::builder()
        .add_source(::config::File::from_str(text, ::config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize::<Value>())
        .map_err(|e| one(format!("cannot parse the plan: {e}")))
}

/// Reads a TOML plan file and validates it (against `cfg`'s services when given).
pub fn load(path: &std::path::Path, cfg: Option<&Config>) -> Result<Plan, ConfigErrors> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| one(format!("cannot read plan file {}: {e}", path.display())))?;
    parse(&value_from_toml(&text)?, cfg)
}

/// Validates a plan; every problem is reported with its key. With `cfg`, services must exist.
pub fn parse(v: &Value, cfg: Option<&Config>) -> Result<Plan, ConfigErrors> {
    let names: Option<Vec<&str>> =
        cfg.map(|c| c.services.iter().map(|s| s.name.as_str()).collect());
    parse_in(v, names.as_deref())
}

/// [`parse`] against a list of service names (None: any name).
fn parse_in(v: &Value, known_services: Option<&[&str]>) -> Result<Plan, ConfigErrors> {
    let mut errs: Vec<ConfigError> = Vec::new();
    let mut err = |key: &str, message: String| {
        errs.push(ConfigError {
            key: key.to_string(),
            message,
        })
    };
    let Some(obj) = v.as_object() else {
        return Err(one(
            "a plan is a table (JSON object) with name, validate and phases".to_string(),
        ));
    };
    for k in obj.keys() {
        if !["name", "validate", "phases"].contains(&k.as_str()) {
            err(
                k,
                format!("unknown key {k:?} (expected one of name, validate, phases)"),
            );
        }
    }
    let name = match obj.get("name") {
        Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
        Some(Value::String(_)) => {
            err("name", "must not be empty".to_string());
            String::new()
        }
        None => {
            err("name", "missing: every release has a name".to_string());
            String::new()
        }
        Some(_) => {
            err("name", "must be a string".to_string());
            String::new()
        }
    };
    let validate = match obj.get("validate") {
        None => None,
        Some(Value::String(s)) => match parse_duration(s) {
            Ok(d) => Some(d),
            Err(m) => {
                err("validate", m);
                None
            }
        },
        Some(_) => {
            err(
                "validate",
                "must be a duration string such as \"30m\"".to_string(),
            );
            None
        }
    };
    let mut phases = Vec::new();
    let raw_phases: &[Value] = match obj.get("phases") {
        None => {
            err(
                "phases",
                "missing: a release has at least one [[phases]]".to_string(),
            );
            &[]
        }
        Some(Value::Array(a)) if a.is_empty() => {
            err(
                "phases",
                "empty: a release has at least one [[phases]]".to_string(),
            );
            &[]
        }
        Some(Value::Array(a)) => a,
        Some(_) => {
            err(
                "phases",
                "must be an array of tables ([[phases]])".to_string(),
            );
            &[]
        }
    };
    let mut seen_names: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen_services: BTreeMap<String, usize> = BTreeMap::new();
    for (i, p) in raw_phases.iter().enumerate() {
        let key = format!("phases[{i}]");
        let Some(p) = p.as_object() else {
            err(
                &key,
                "must be a table with name, services, to, bake, gate".to_string(),
            );
            continue;
        };
        for k in p.keys() {
            if !["name", "services", "to", "bake", "gate"].contains(&k.as_str()) {
                err(
                    &format!("{key}.{k}"),
                    format!("unknown key {k:?} (expected one of name, services, to, bake, gate)"),
                );
            }
        }
        let pname = match p.get("name") {
            Some(Value::String(s)) if !s.trim().is_empty() => {
                if let Some(j) = seen_names.insert(s.clone(), i) {
                    err(
                        &format!("{key}.name"),
                        format!("{s:?} is also the name of phases[{j}]; phase names are unique"),
                    );
                }
                s.clone()
            }
            None => {
                err(
                    &format!("{key}.name"),
                    "missing: every phase has a name".to_string(),
                );
                String::new()
            }
            Some(_) => {
                err(
                    &format!("{key}.name"),
                    "must be a non-empty string".to_string(),
                );
                String::new()
            }
        };
        let mut services = Vec::new();
        match p.get("services") {
            // An empty list is a verification phase: nothing is flipped, the bake and the
            // gate still run, and every service flipped so far stays watched.
            Some(Value::Array(a)) => {
                for (j, s) in a.iter().enumerate() {
                    let skey = format!("{key}.services[{j}]");
                    let Some(s) = s.as_str() else {
                        err(&skey, "must be a service name (a string)".to_string());
                        continue;
                    };
                    if let Some(known) = known_services {
                        if !known.contains(&s) {
                            err(
                                &skey,
                                format!(
                                    "unknown service {s:?} (the config has: {})",
                                    known.join(", ")
                                ),
                            );
                            continue;
                        }
                    }
                    if let Some(k) = seen_services.insert(s.to_string(), i) {
                        err(
                            &skey,
                            if k == i {
                                format!("{s:?} is named twice in this phase")
                            } else {
                                format!(
                                    "{s:?} is already flipped by phases[{k}]; a release flips a service once"
                                )
                            },
                        );
                        continue;
                    }
                    services.push(s.to_string());
                }
            }
            None => err(
                &format!("{key}.services"),
                "missing: the services this phase flips".to_string(),
            ),
            Some(_) => err(
                &format!("{key}.services"),
                "must be an array of service names ([] for a verification phase)".to_string(),
            ),
        }
        let to = match p.get("to") {
            None => None,
            Some(Value::String(s)) => match s.parse::<Color>() {
                Ok(c) => Some(c),
                Err(m) => {
                    err(&format!("{key}.to"), m);
                    None
                }
            },
            Some(_) => {
                err(
                    &format!("{key}.to"),
                    "must be \"blue\" or \"green\"".to_string(),
                );
                None
            }
        };
        let bake = match p.get("bake") {
            Some(Value::String(s)) => parse_duration(s).unwrap_or_else(|m| {
                err(&format!("{key}.bake"), m);
                Duration::ZERO
            }),
            None => {
                err(
                    &format!("{key}.bake"),
                    "missing: how long the phase is watched before the next (\"15m\")".to_string(),
                );
                Duration::ZERO
            }
            Some(_) => {
                err(
                    &format!("{key}.bake"),
                    "must be a duration string such as \"15m\"".to_string(),
                );
                Duration::ZERO
            }
        };
        let gate = match p.get("gate").map(|g| g.as_str()) {
            None | Some(Some("auto")) => Gate::Auto,
            Some(Some("manual")) => Gate::Manual,
            Some(_) => {
                err(
                    &format!("{key}.gate"),
                    "must be \"auto\" or \"manual\"".to_string(),
                );
                Gate::Auto
            }
        };
        phases.push(PhasePlan {
            name: pname,
            services,
            to,
            bake,
            gate,
        });
    }
    if errs.is_empty() {
        Ok(Plan {
            name,
            validate,
            phases,
        })
    } else {
        Err(ConfigErrors(errs))
    }
}

impl Plan {
    /// A short description for `check`.
    pub fn summary(&self) -> String {
        let mut s = format!("release {:?}: {} phases\n", self.name, self.phases.len());
        for (i, p) in self.phases.iter().enumerate() {
            if p.services.is_empty() {
                s += &format!(
                    "  phase {i} {:?}: verification (nothing flipped), bake {}, gate {}\n",
                    p.name,
                    humantime::format_duration(p.bake),
                    p.gate.as_str()
                );
                continue;
            }
            s += &format!(
                "  phase {i} {:?}: {} -> {}, bake {}, gate {}\n",
                p.name,
                p.services.join(", "),
                p.to.map(|c| c.to_string())
                    .unwrap_or_else(|| "idle color".to_string()),
                humantime::format_duration(p.bake),
                p.gate.as_str()
            );
        }
        s += &format!(
            "  validate: {}\n",
            self.validate
                .map(|d| humantime::format_duration(d).to_string())
                .unwrap_or_else(|| {
                    "the longest watch_for of its watched services (0s when none is)".to_string()
                })
        );
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Plans named in the config: `[release_plans.NAME]`, started by name
// ---------------------------------------------------------------------------------------------

/// Validates the config's `[release_plans.NAME]` tables as plan files are validated (against
/// the config's services); every error is keyed `release_plans.NAME.<key in the plan>`.
pub fn check_named(plans: &BTreeMap<String, Value>, services: &[&str]) -> Vec<ConfigError> {
    let mut out = Vec::new();
    for (name, v) in plans {
        let base = format!("release_plans.{name}");
        if name.trim().is_empty() {
            out.push(ConfigError {
                key: base.clone(),
                message: "a named plan needs a non-empty name".to_string(),
            });
        }
        if let Err(ConfigErrors(errs)) = parse_in(v, Some(services)) {
            out.extend(errs.into_iter().map(|e| ConfigError {
                key: if e.key.is_empty() {
                    base.clone()
                } else {
                    format!("{base}.{}", e.key)
                },
                message: e.message,
            }));
        }
    }
    out
}
