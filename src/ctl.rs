//! `switchyard ctl`: the admin API from a terminal. Human-readable output by default, `--json`
//! for scripts; exit 0 on success, 1 when the API refuses or cannot be reached, 2 on usage errors,
//! 3 when a change's outcome is unknown (no answer to it, 503 `"outcome": "unknown"`, or a 5xx
//! that is not the admin API's JSON, e.g. a gateway's 504 page).

use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::config::Color;
use crate::ctl_client::{
    call_tracked, change_failed_exit, failed_exit, from_admin, CtlArgs, EXIT_UNKNOWN,
};
use crate::{errln, outln};

/// `switchyard ctl`: the global flags and one command.
#[derive(Args, Debug)]
pub struct Ctl {
    #[command(flatten)]
    pub args: CtlArgs,
    #[command(subcommand)]
    pub cmd: CtlCmd,
}

#[derive(Subcommand, Debug)]
pub enum CtlCmd {
    /// Every service: live color, previous, generation, health, traffic, triggers.
    Status,
    /// Flip one service to a color.
    Flip {
        service: String,
        #[arg(value_parser = parse_color)]
        color: Color,
        /// Flip even if the target pool has no healthy upstream or a smoke path fails.
        #[arg(long)]
        force: bool,
    },
    /// Flip every service to a color in one atomic step.
    FlipAll {
        #[arg(value_parser = parse_color)]
        color: Color,
        #[arg(long)]
        force: bool,
    },
    /// Flip one service back to its previous color.
    Rollback {
        service: String,
        #[arg(long)]
        force: bool,
    },
    /// Pause automatic rollback for a service.
    Pause {
        service: String,
        /// Pause even a service of the running release (the release then pauses too).
        #[arg(long)]
        force: bool,
    },
    /// Resume automatic rollback for a service.
    Resume { service: String },
    /// The audit log, newest last.
    Events {
        /// Show only the last N events.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Re-read the config file (as SIGHUP does).
    Reload,
    /// Releases: start a plan, follow it, pass a manual gate, abort, wait for its end.
    #[command(subcommand)]
    Release(crate::release_ctl::ReleaseCmd),
}

fn parse_color(s: &str) -> Result<Color, String> {
    s.parse()
}

/// Runs one ctl command; returns the process exit code.
pub async fn run(ctl: Ctl) -> i32 {
    let Ctl { mut args, cmd } = ctl;
    let base = match args.admin_base() {
        Ok(b) => b,
        Err(e) => {
            errln!("error: {e}");
            return 2;
        }
    };
    if let Err(e) = args.normalize_token() {
        errln!("error: {e}");
        return 2;
    }
    // SERVICE goes into the URL path: a name no service can have (`api x`, `api/pause?`) would
    // be "cannot reach", or another call, so it is refused as the config refuses it.
    let service = match &cmd {
        CtlCmd::Flip { service, .. }
        | CtlCmd::Rollback { service, .. }
        | CtlCmd::Pause { service, .. }
        | CtlCmd::Resume { service } => Some(service),
        _ => None,
    };
    if let Some(name) = service.filter(|n| !crate::config::valid_service_name(n)) {
        errln!(
            "error: invalid service name {name:?}: a service name is 1-64 of a-z, 0-9, '-', '_' (`switchyard ctl status` lists them)"
        );
        return 2;
    }
    let (method, path, body) = match &cmd {
        CtlCmd::Status => ("GET", "/api/status".to_string(), None),
        CtlCmd::Events { .. } => ("GET", "/api/events".to_string(), None),
        CtlCmd::Flip {
            service,
            color,
            force,
        } => (
            "POST",
            format!("/api/services/{service}/flip"),
            Some(json!({ "to": color, "force": force })),
        ),
        CtlCmd::FlipAll { color, force } => (
            "POST",
            "/api/flip".to_string(),
            Some(json!({ "to": color, "force": force })),
        ),
        CtlCmd::Rollback { service, force } => (
            "POST",
            format!("/api/services/{service}/rollback"),
            Some(json!({ "force": force })),
        ),
        CtlCmd::Pause { service, force } => (
            "POST",
            format!("/api/services/{service}/pause"),
            Some(json!({ "force": force })),
        ),
        CtlCmd::Resume { service } => (
            "POST",
            format!("/api/services/{service}/resume"),
            Some(json!({})),
        ),
        CtlCmd::Reload => ("POST", "/api/reload".to_string(), Some(json!({}))),
        CtlCmd::Release(release) => return crate::release_ctl::run(&args, release).await,
    };
    if method == "POST" && args.token.as_deref().unwrap_or("").is_empty() {
        errln!(
            "error: this command needs the admin token: pass --token or set SWITCHYARD_ADMIN_TOKEN"
        );
        return 1;
    }
    let url = format!("{base}{path}");
    let handed = AtomicBool::new(false);
    let result = tokio::time::timeout(
        args.request_timeout(),
        call_tracked(&args, method, &url, args.token.as_deref(), body, &handed),
    )
    .await;
    let (status, value, admin_json) = match result {
        // Still connecting (a black-holed address: no answer to the SYN) or in the TLS
        // handshake: the request never left, nothing was changed.
        Err(_) if !handed.load(Ordering::Relaxed) => {
            errln!(
                "error: cannot reach the admin listener at {base}: no connection within {}\n(is switchyard running? set --admin or SWITCHYARD_ADMIN_URL)",
                humantime::format_duration(args.request_timeout())
            );
            return 1;
        }
        Err(_) => {
            errln!(
                "error: no answer from the admin listener at {base} within {}",
                humantime::format_duration(args.request_timeout())
            );
            if method == "POST" {
                errln!("the change may or may not have been made: check `switchyard ctl status`");
                return EXIT_UNKNOWN;
            }
            return 1;
        }
        Ok(Err(e)) if method == "POST" && e.maybe_sent => {
            errln!("error: the admin listener at {base} took the request but gave no answer: {e}");
            errln!("the change may or may not have been made: check `switchyard ctl status`");
            return EXIT_UNKNOWN;
        }
        Ok(Err(e)) => {
            errln!("error: cannot reach the admin listener at {base}: {e}\n(is switchyard running? set --admin or SWITCHYARD_ADMIN_URL)");
            return 1;
        }
        Ok(Ok(x)) => x,
    };
    if !(200..300).contains(&status) {
        let msg = value
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("request failed");
        if args.json {
            outln!(
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
        }
        errln!("error ({status}): {msg}");
        if let Some(errs) = value.get("errors").and_then(Value::as_array) {
            for e in errs {
                errln!("  {}", e.as_str().unwrap_or_default());
            }
        }
        if method != "POST" {
            return failed_exit(&value);
        }
        let code = change_failed_exit(status, &value, admin_json);
        if crate::ctl_client::needs_unknown_hint(code, &value) {
            errln!("that answer is not the admin API's (a gateway or proxy in front of it?): the change may or may not have been made");
            errln!("outcome not known: check `switchyard ctl status`");
        }
        return code;
    }
    let key = match &cmd {
        CtlCmd::Status => "services",
        CtlCmd::Events { .. } => "events",
        _ => "message",
    };
    if let Err(e) = from_admin(&base, status, &value, key) {
        errln!("error: {e}");
        return 1;
    }
    if args.json {
        let out = match (&cmd, value.get("events").and_then(Value::as_array)) {
            (CtlCmd::Events { limit }, Some(evs)) => {
                json!({ "events": evs[evs.len().saturating_sub(*limit)..] })
            }
            _ => value,
        };
        outln!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        return 0;
    }
    print_answer(&cmd, &value);
    0
}

/// The human-readable form of a successful answer.
fn print_answer(cmd: &CtlCmd, value: &Value) {
    match cmd {
        CtlCmd::Status => print_status(value),
        CtlCmd::Events { limit } => print_events(value, *limit),
        CtlCmd::FlipAll { .. } => {
            outln!(
                "{}",
                value
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("done")
            );
            for s in value
                .get("services")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                outln!(
                    "  {}",
                    s.get("message").and_then(Value::as_str).unwrap_or_default()
                );
            }
        }
        _ => outln!(
            "{}",
            value
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("done")
        ),
    }
}

/// A field as one line of text (see [`crate::out::one_line`]).
fn s(v: &Value, k: &str) -> String {
    match v.get(k) {
        Some(Value::String(x)) => crate::out::one_line(x),
        Some(Value::Null) | None => "-".to_string(),
        Some(x) => x.to_string(),
    }
}

/// A ratio as a percentage; `-` when there is no traffic to measure.
fn pct(v: Option<&Value>) -> String {
    match v.and_then(Value::as_f64) {
        Some(r) => format!("{:.2}%", r * 100.0),
        None => "-".to_string(),
    }
}

/// Milliseconds with a unit; `-` when there is nothing to measure.
fn millis(v: Option<&Value>) -> String {
    match v.and_then(Value::as_f64) {
        Some(ms) if ms >= 100.0 => format!("{ms:.0}ms"),
        Some(ms) => format!("{ms:.1}ms"),
        None => "-".to_string(),
    }
}

/// Health and window numbers of a color or an upstream, one line.
fn traffic(v: &Value) -> String {
    format!(
        "healthy={:<5} requests={:<7} errors={:<8} p95={}",
        s(v, "healthy"),
        s(v, "requests"),
        pct(v.get("error_rate")),
        millis(v.get("p95_ms"))
    )
}

fn print_status(v: &Value) {
    outln!("window: {}s", s(v, "window_secs"));
    // The state backend, when something is wrong with it or the colors are not its own: a
    // 503 "outcome unknown" sends the operator here.
    if let Some(st) = v.get("state") {
        let backend = s(st, "backend");
        let source = s(st, "source");
        if st.get("degraded").and_then(Value::as_bool) == Some(true) {
            if backend == "file" {
                outln!("STATE DEGRADED: the state file cannot be written; changes fail until a write succeeds (see the log)");
            } else {
                outln!("STATE DEGRADED: {backend} cannot be reached; serving the last colors known (from {source}); changes are refused until it answers");
            }
        } else if backend == "etcd" && source != "etcd" {
            outln!("state: serving colors from {source}, not yet confirmed by etcd");
        }
    }
    for svc in v
        .get("services")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let mut flags = Vec::new();
        if svc.get("armed").and_then(Value::as_bool) == Some(true) {
            if svc.get("armed_by_release").and_then(Value::as_bool) == Some(true) {
                flags.push("armed by the running release".to_string());
            } else {
                flags.push(format!("armed until {}", s(svc, "armed_until")));
            }
        }
        if svc.get("paused").and_then(Value::as_bool) == Some(true) {
            flags.push("PAUSED".to_string());
        }
        if svc.get("dry_run").and_then(Value::as_bool) == Some(true) {
            flags.push("dry run".to_string());
        }
        if let Some(f) = svc.get("failed_color").and_then(Value::as_str) {
            flags.push(format!("{f} latched after rollback"));
        }
        if svc.get("rollback_blocked").and_then(Value::as_bool) == Some(true) {
            flags.push("ROLLBACK BLOCKED".to_string());
        }
        outln!(
            "\n{}  live: {}  previous: {}  generation: {}{}",
            s(svc, "name"),
            s(svc, "active").to_uppercase(),
            s(svc, "previous"),
            s(svc, "generation"),
            if flags.is_empty() {
                String::new()
            } else {
                format!("  [{}]", flags.join(", "))
            }
        );
        for color in ["blue", "green"] {
            let Some(c) = svc.get("colors").and_then(|c| c.get(color)) else {
                continue;
            };
            let live = svc.get("active").and_then(Value::as_str) == Some(color);
            let mark = if live { "*" } else { " " };
            outln!("  {mark}{color:<5} {}", traffic(c));
            for u in c
                .get("upstreams")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                outln!("      {:<22} {}", s(u, "addr"), traffic(u));
            }
            // Upstream names: how many addresses each gives now, and why a lookup fails (a
            // name that never resolved gives the color no upstream at all).
            for n in c
                .get("names")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let addrs = n.get("addrs").and_then(Value::as_array).map_or(0, Vec::len);
                let error = match n.get("error").and_then(Value::as_str) {
                    Some(e) => format!(" error: {e}"),
                    None => String::new(),
                };
                outln!(
                    "      name {:<17} addresses={addrs:<3} stale={}{error}",
                    s(n, "name"),
                    s(n, "stale")
                );
            }
        }
        for t in svc
            .get("triggers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let kind = s(t, "kind");
            let fmt = |v: Option<&Value>| match kind.as_str() {
                "error_rate" => pct(v),
                "p95_latency" => millis(v),
                _ => match v {
                    Some(Value::Null) | None => "-".to_string(),
                    Some(x) => x.to_string(),
                },
            };
            outln!(
                "  trigger {:<12} {:<17} value={} threshold={}",
                kind,
                s(t, "state"),
                fmt(t.get("value")),
                fmt(t.get("threshold"))
            );
            print_analysis(t);
        }
    }
}

/// The extra lines of a `prometheus` or `probe` trigger: what it evaluates, when, and the
/// last error or detail.
fn print_analysis(t: &Value) {
    let what = match (t.get("query"), t.get("probe")) {
        (Some(Value::String(q)), _) => format!("query {q}"),
        (_, Some(Value::String(p))) => format!("probe {p}"),
        _ => return,
    };
    let mut notes = vec![format!("evaluated {}", s(t, "evaluated_at"))];
    if t.get("blind").and_then(Value::as_bool) == Some(true) {
        notes.push(format!(
            "BLIND after {} errors (on_error={})",
            s(t, "consecutive_errors"),
            s(t, "on_error")
        ));
    }
    outln!("      {what}  [{}]", notes.join(", "));
    if let Some(e) = t.get("error").and_then(Value::as_str) {
        outln!("      error: {}", crate::out::one_line(e));
    } else if let Some(d) = t.get("detail").and_then(Value::as_str) {
        outln!("      {}", crate::out::one_line(d));
    }
}

fn print_events(v: &Value, limit: usize) {
    let evs = v
        .get("events")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if evs.is_empty() {
        outln!("no events yet");
    }
    for e in &evs[evs.len().saturating_sub(limit)..] {
        outln!(
            "{}  {:<10} {:<16} {} -> {}  by {}: {}",
            s(e, "time"),
            s(e, "service"),
            s(e, "reason"),
            s(e, "from"),
            s(e, "to"),
            s(e, "actor"),
            s(e, "detail")
        );
    }
}
