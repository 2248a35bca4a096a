//! Rollback triggers (`services[i].rollback.triggers[j]`) and verify checks
//! (`services[i].verify[j]`); a `prometheus` or `probe` trigger shares its keys with a check.

use std::time::Duration;

use super::Check;
use crate::config::raw::{RawTrigger, RawVerify};
use crate::config::{
    parse_duration, Bound, OnEmpty, OnError, ProbeCheck, ProbeCondition, ProbeTarget, PromCheck,
    TriggerConfig, TriggerKind, VerifyCheck, MAX_WINDOW,
};

/// The placeholders a query template may use.
pub const QUERY_PLACEHOLDERS: &[&str] = &["service", "color", "upstreams", "upstream_hosts"];
/// The placeholders a probe `url` may use.
pub const URL_PLACEHOLDERS: &[&str] = &["service", "color"];

/// One trigger; None when its kind is missing or unknown (reported).
pub(super) fn trigger(c: &mut Check, key: &str, t: RawTrigger) -> Option<TriggerConfig> {
    let for_ = c.duration(&format!("{key}.for"), t.for_.as_deref(), Duration::ZERO);
    let over_key = format!("{key}.over");
    let over = |c: &mut Check| {
        let o = c.duration(&over_key, t.over.as_deref(), Duration::from_secs(60));
        if o < Duration::from_secs(1) || o > MAX_WINDOW {
            c.err(&over_key, "must be between 1s and 1h");
        } else if o.subsec_nanos() != 0 {
            // The windows count whole seconds: "1500ms" would read as 1s.
            c.err(
                &over_key,
                "must be whole seconds (the windows count seconds): 1s, 2s, 90s",
            );
        }
        o
    };
    let Some(kind_name) = t.kind.as_deref() else {
        c.err(
            format!("{key}.kind"),
            "required (error_rate, p95_latency, critical_5xx, unhealthy, prometheus or probe)",
        );
        return None;
    };
    let above_key = format!("{key}.above");
    let kind = match kind_name {
        "error_rate" => TriggerKind::ErrorRate {
            above: ratio_above(c, &above_key, t.above.as_ref()),
            over: over(c),
        },
        "p95_latency" => TriggerKind::P95Latency {
            above: latency_above(c, &above_key, t.above.as_ref()),
            over: over(c),
        },
        "critical_5xx" => {
            let (paths, above) = critical_5xx(c, key, &t);
            TriggerKind::Critical5xx {
                paths,
                above,
                over: over(c),
            }
        }
        "unhealthy" => {
            if t.above.is_some() {
                c.err(&above_key, "not used by kind \"unhealthy\"");
            }
            if t.over.is_some() {
                c.err(&over_key, "not used by kind \"unhealthy\"");
            }
            TriggerKind::Unhealthy
        }
        "prometheus" | "probe" => {
            if t.over.is_some() {
                c.err(
                    &over_key,
                    format!("not used by kind {kind_name:?} (it reads `interval`)"),
                );
            }
            match analysis(c, key, &t, kind_name)? {
                VerifyCheck::Prometheus(p) => TriggerKind::Prometheus(p),
                VerifyCheck::Probe(p) => TriggerKind::Probe(p),
            }
        }
        other => {
            c.err(
                format!("{key}.kind"),
                format!(
                    "invalid trigger kind {other:?} (expected error_rate, p95_latency, critical_5xx, unhealthy, prometheus or probe)"
                ),
            );
            return None;
        }
    };
    unused_keys(c, key, &t, &kind);
    Some(TriggerConfig { kind, for_ })
}

/// A value of the wrong type, worded as serde words the file's other ones (`invalid type:
/// integer `1000`, expected a string`): `above` takes a different type by kind, so serde reads
/// it as any value and the kind's check says what it expected.
fn wrong_type(v: &serde_json::Value, expected: &str) -> String {
    use serde::de::Unexpected;
    use serde_json::Value;
    let got = match v {
        Value::Null => Unexpected::Unit,
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Unexpected::Signed(i),
            (None, Some(u)) => Unexpected::Unsigned(u),
            (None, None) => Unexpected::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Unexpected::Str(s),
        Value::Array(_) => Unexpected::Seq,
        Value::Object(_) => Unexpected::Map,
    };
    format!("invalid type: {got}, expected {expected}")
}

/// `above` of `error_rate`: a ratio between 0 and 1.
fn ratio_above(c: &mut Check, key: &str, v: Option<&serde_json::Value>) -> f64 {
    const EXPECTED: &str = "a ratio between 0 and 1, e.g. 0.05";
    match v.map(|v| (v, v.as_f64())) {
        Some((_, Some(a))) if a > 0.0 && a < 1.0 => a,
        Some((_, Some(a))) => {
            c.err(key, format!("{a} is out of range ({EXPECTED})"));
            0.05
        }
        Some((v, None)) => {
            c.err(key, wrong_type(v, EXPECTED));
            0.05
        }
        None => {
            c.err(key, format!("required: {EXPECTED}"));
            0.05
        }
    }
}

/// `above` of `p95_latency`: a duration above zero.
fn latency_above(c: &mut Check, key: &str, v: Option<&serde_json::Value>) -> Duration {
    const EXPECTED: &str = "a duration such as \"1000ms\"";
    if let Some(v) = v.filter(|v| !v.is_string()) {
        c.err(key, wrong_type(v, EXPECTED));
        return Duration::from_secs(1);
    }
    match v.and_then(|v| v.as_str()) {
        Some(s) => match parse_duration(s) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                c.err(key, "must be greater than zero");
                Duration::from_secs(1)
            }
            Err(m) => {
                c.err(key, m);
                Duration::from_secs(1)
            }
        },
        None => {
            c.err(key, format!("required: {EXPECTED}"));
            Duration::from_secs(1)
        }
    }
}

/// `paths` and `above` of `critical_5xx`.
fn critical_5xx(c: &mut Check, key: &str, t: &RawTrigger) -> (Vec<String>, u64) {
    let above = match &t.above {
        None => 0,
        Some(v) => match v.as_u64() {
            Some(n) => n,
            None => {
                c.err(
                    format!("{key}.above"),
                    "must be a whole number of failures (e.g. 0)",
                );
                0
            }
        },
    };
    let paths = t.paths.clone().unwrap_or_default();
    if paths.is_empty() {
        c.err(format!("{key}.paths"), "required: at least one path prefix");
    }
    for (i, p) in paths.iter().enumerate() {
        if !p.starts_with('/') {
            c.err(
                format!("{key}.paths[{i}]"),
                format!("invalid path {p:?} (must start with '/')"),
            );
        }
    }
    // In the normalized form requests are matched in (see `path_prefix`).
    let paths = paths
        .iter()
        .map(|p| crate::http::path::normalized_prefix(p))
        .collect();
    (paths, above)
}

/// The keys set on a trigger whose kind does not read them.
fn unused_keys(c: &mut Check, key: &str, t: &RawTrigger, kind: &TriggerKind) {
    if !matches!(kind, TriggerKind::Prometheus(_) | TriggerKind::Probe(_)) {
        for (name, set) in analysis_keys(t) {
            if set {
                c.err(
                    format!("{key}.{name}"),
                    format!("not used by kind {:?}", kind.name()),
                );
            }
        }
    }
    if t.paths.is_some() && !matches!(kind, TriggerKind::Critical5xx { .. }) {
        c.err(
            format!("{key}.paths"),
            format!("not used by kind {:?}", kind.name()),
        );
    }
}

/// The keys only `prometheus` and `probe` use, and whether each is set.
fn analysis_keys(t: &RawTrigger) -> [(&'static str, bool); 10] {
    [
        ("query", t.query.is_some()),
        ("below", t.below.is_some()),
        ("interval", t.interval.is_some()),
        ("on_empty", t.on_empty.is_some()),
        ("on_error", t.on_error.is_some()),
        ("max_errors", t.max_errors.is_some()),
        ("path", t.path.is_some()),
        ("url", t.url.is_some()),
        ("json_pointer", t.json_pointer.is_some()),
        ("equals", t.equals.is_some()),
    ]
}

/// Every `{{name}}` in `template` must be one of `known`; returns one message per problem.
pub fn placeholder_errors(template: &str, known: &[&str]) -> Vec<String> {
    let mut errors = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            errors.push(format!("unclosed placeholder \"{{{{\" in {template:?}"));
            break;
        };
        let name = after[..end].trim();
        if !known.contains(&name) {
            let list: Vec<String> = known.iter().map(|k| format!("{{{{{k}}}}}")).collect();
            errors.push(format!(
                "unknown placeholder {{{{{name}}}}} (known: {})",
                list.join(", ")
            ));
        }
        rest = &after[end + 2..];
    }
    errors
}

/// What `prometheus` and `probe` share: the bound, how often, and the error policy.
struct Common {
    /// `above` and `below` as given (each a valid number or None).
    above: Option<f64>,
    below: Option<f64>,
    /// The one of them that is set; None when neither or both are.
    bound: Option<Bound>,
    interval: Duration,
    on_error: OnError,
    max_errors: u32,
}

/// The keys of a `prometheus` or `probe` trigger or verify check.
fn analysis(c: &mut Check, key: &str, t: &RawTrigger, kind: &str) -> Option<VerifyCheck> {
    let common = common(c, key, t);
    match kind {
        "prometheus" => Some(VerifyCheck::Prometheus(prometheus(c, key, t, common))),
        _ => probe(c, key, t, common).map(VerifyCheck::Probe),
    }
}

fn common(c: &mut Check, key: &str, t: &RawTrigger) -> Common {
    let k = |name: &str| format!("{key}.{name}");
    let number = |c: &mut Check, name: &str, v: &Option<serde_json::Value>| -> Option<f64> {
        let v = v.as_ref()?;
        match v.as_f64() {
            Some(n) if n.is_finite() => Some(n),
            _ => {
                c.err(k(name), format!("must be a number, not {v}"));
                None
            }
        }
    };
    let above = number(c, "above", &t.above);
    let below = number(c, "below", &t.below);
    let bound = match (above, below) {
        (Some(a), None) => Some(Bound::Above(a)),
        (None, Some(b)) => Some(Bound::Below(b)),
        (Some(_), Some(_)) => {
            c.err(k("below"), "set either `above` or `below`, not both");
            None
        }
        (None, None) => None,
    };
    let interval = c.duration(
        &k("interval"),
        t.interval.as_deref(),
        Duration::from_secs(15),
    );
    if interval < Duration::from_millis(100) {
        c.err(k("interval"), "must be at least 100ms");
    }
    let on_error = match t.on_error.as_deref() {
        None | Some("hold") => OnError::Hold,
        Some("fail") => OnError::Fail,
        Some(o) => {
            c.err(
                k("on_error"),
                format!("invalid value {o:?} (expected \"hold\" or \"fail\")"),
            );
            OnError::Hold
        }
    };
    let max_errors = c.count(&k("max_errors"), t.max_errors, 3, 1, 1000) as u32;
    Common {
        above,
        below,
        bound,
        interval,
        on_error,
        max_errors,
    }
}

fn prometheus(c: &mut Check, key: &str, t: &RawTrigger, common: Common) -> PromCheck {
    let k = |name: &str| format!("{key}.{name}");
    for (name, set) in [
        ("path", t.path.is_some()),
        ("url", t.url.is_some()),
        ("json_pointer", t.json_pointer.is_some()),
        ("equals", t.equals.is_some()),
        ("above_fraction", t.above_fraction.is_some()),
    ] {
        if set {
            c.err(k(name), "not used by kind \"prometheus\"");
        }
    }
    let query = match t.query.as_deref().map(str::trim) {
        Some(q) if !q.is_empty() => q.to_string(),
        _ => {
            c.err(
                k("query"),
                "required: a PromQL query, e.g. 'sum(rate(app_db_errors_total{color=\"{{color}}\"}[1m]))'",
            );
            String::new()
        }
    };
    for m in placeholder_errors(&query, QUERY_PLACEHOLDERS) {
        c.err(k("query"), m);
    }
    if common.above.is_none() && common.below.is_none() {
        c.err(k("above"), "required: `above` or `below` (a number)");
    }
    let on_empty = match t.on_empty.as_deref() {
        None | Some("insufficient_data") => OnEmpty::InsufficientData,
        Some("fail") => OnEmpty::Fail,
        Some(o) => {
            c.err(
                k("on_empty"),
                format!("invalid value {o:?} (expected \"insufficient_data\" or \"fail\")"),
            );
            OnEmpty::InsufficientData
        }
    };
    PromCheck {
        query,
        bound: common.bound.unwrap_or(Bound::Above(0.0)),
        interval: common.interval,
        on_empty,
        on_error: common.on_error,
        max_errors: common.max_errors,
    }
}

/// None when the target (`path` or `url`) is missing or given twice (reported).
fn probe(c: &mut Check, key: &str, t: &RawTrigger, common: Common) -> Option<ProbeCheck> {
    let k = |name: &str| format!("{key}.{name}");
    if t.query.is_some() {
        c.err(k("query"), "not used by kind \"probe\"");
    }
    if t.on_empty.is_some() {
        c.err(k("on_empty"), "not used by kind \"probe\"");
    }
    // Every key is checked before a bad target drops the check: `check` reports every problem.
    let target = probe_target(c, key, t);
    let condition = probe_condition(c, key, t, common.bound);
    let above_fraction = match &t.above_fraction {
        None => 0.0,
        Some(v) => match v.as_f64() {
            Some(f) if (0.0..1.0).contains(&f) => f,
            _ => {
                c.err(
                    k("above_fraction"),
                    format!("{v} is out of range (a fraction from 0 up to, not including, 1)"),
                );
                0.0
            }
        },
    };
    Some(ProbeCheck {
        target: target?,
        json_pointer: t.json_pointer.clone(),
        condition,
        above_fraction,
        interval: common.interval,
        on_error: common.on_error,
        max_errors: common.max_errors,
    })
}

/// `path` (every upstream of the color) or `url`, exactly one.
fn probe_target(c: &mut Check, key: &str, t: &RawTrigger) -> Option<ProbeTarget> {
    let k = |name: &str| format!("{key}.{name}");
    match (&t.path, &t.url) {
        (Some(p), None) => {
            if !p.starts_with('/') {
                c.err(
                    k("path"),
                    format!("invalid path {p:?} (must start with '/')"),
                );
            }
            Some(ProbeTarget::Path(p.clone()))
        }
        (None, Some(u)) => {
            let errs = placeholder_errors(u, URL_PLACEHOLDERS);
            let bare = u.replace("{{service}}", "s").replace("{{color}}", "blue");
            if let Some(m) = errs
                .is_empty()
                .then(|| super::url_problem(u, &bare, "http://host:port/path or https://..."))
                .flatten()
            {
                c.err(k("url"), m);
            }
            for m in errs {
                c.err(k("url"), m);
            }
            Some(ProbeTarget::Url(u.clone()))
        }
        (Some(_), Some(_)) => {
            c.err(k("url"), "set either `path` or `url`, not both");
            None
        }
        (None, None) => {
            c.err(
                k("path"),
                "required: `path` (GET on every upstream of the color) or `url`",
            );
            None
        }
    }
}

/// What the answer must satisfy besides a 2xx: `json_pointer` with `equals` or a bound.
fn probe_condition(
    c: &mut Check,
    key: &str,
    t: &RawTrigger,
    bound: Option<Bound>,
) -> ProbeCondition {
    let k = |name: &str| format!("{key}.{name}");
    let Some(p) = &t.json_pointer else {
        if t.equals.is_some() || bound.is_some() {
            c.err(
                k("json_pointer"),
                "required with `equals`, `above` or `below` (e.g. \"/checks/database\")",
            );
        }
        return ProbeCondition::Status;
    };
    if !(p.is_empty() || p.starts_with('/')) {
        c.err(
            k("json_pointer"),
            format!("invalid JSON pointer {p:?} (must start with '/', e.g. \"/database\")"),
        );
    }
    match (&t.equals, bound) {
        (Some(v), None) => ProbeCondition::Equals(v.clone()),
        (None, Some(b)) => ProbeCondition::Bound(b),
        (Some(_), Some(_)) => {
            c.err(
                k("equals"),
                "set either `equals` or `above`/`below`, not both",
            );
            ProbeCondition::Status
        }
        (None, None) => {
            c.err(
                k("equals"),
                "required with `json_pointer`: `equals`, `above` or `below`",
            );
            ProbeCondition::Status
        }
    }
}

/// A `[[services.verify]]` check: a trigger's keys but `for` (and `over`, `paths`).
/// `interval`, `on_empty`, `on_error` and `max_errors` are checked as a trigger's, so that a
/// trigger's table can be reused as it is, but change nothing: a check runs once, and no value
/// (an empty result, an error) refuses the flip (not a manual rollback: `analysis::verify`).
pub(super) fn verify(c: &mut Check, key: &str, v: RawVerify) -> Option<VerifyCheck> {
    let t = RawTrigger {
        kind: v.kind,
        above: v.above,
        over: None,
        for_: None,
        paths: None,
        query: v.query,
        below: v.below,
        interval: v.interval,
        on_empty: v.on_empty,
        on_error: v.on_error,
        max_errors: v.max_errors,
        path: v.path,
        url: v.url,
        json_pointer: v.json_pointer,
        equals: v.equals,
        above_fraction: v.above_fraction,
    };
    match t.kind.as_deref() {
        Some(kind @ ("prometheus" | "probe")) => analysis(c, key, &t, kind),
        Some(other) => {
            c.err(
                format!("{key}.kind"),
                format!("invalid verify kind {other:?} (expected prometheus or probe)"),
            );
            None
        }
        None => {
            c.err(format!("{key}.kind"), "required (prometheus or probe)");
            None
        }
    }
}
