//! `switchyard ctl release ...`: start a plan, follow it, pass a manual gate, abort, and `wait`
//! (a CI pipeline's gate: exit 0 when the release is `complete`, 1 when `rolled_back` or
//! `aborted`, or when it is still running at `--timeout`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use serde_json::{json, Value};

use crate::ctl_client::{
    call, call_tracked, change_failed_exit, from_admin, CtlArgs, EXIT_UNKNOWN,
};
use crate::{errln, outln};

#[derive(Subcommand, Debug)]
pub enum ReleaseCmd {
    /// Start a release from a TOML plan file, or a plan the config names (--plan NAME).
    Start {
        #[arg(required_unless_present = "plan")]
        file: Option<PathBuf>,
        /// The name of a `[release_plans.NAME]` table of the running config.
        #[arg(long, conflicts_with = "file")]
        plan: Option<String>,
    },
    /// The running release (and the last ones with --json).
    Status {
        /// Print again every 2 seconds until the release ends.
        #[arg(long)]
        watch: bool,
    },
    /// Pass the manual gate the release waits at.
    Promote,
    /// Return every service the release flipped to its pre-release color, in one step.
    Abort,
    /// Block until the running release ends: exit 0 when complete, 1 when rolled back or
    /// aborted (or still running after the global --timeout).
    Wait,
}

const POLL: Duration = Duration::from_secs(1);

pub async fn run(args: &CtlArgs, cmd: &ReleaseCmd) -> i32 {
    let base = match args.admin_base() {
        Ok(b) => b,
        Err(e) => {
            errln!("error: {e}");
            return 2;
        }
    };
    match cmd {
        ReleaseCmd::Start {
            plan: Some(name), ..
        } => {
            post(
                args,
                &base,
                "/api/releases",
                json!({ "plan": name }),
                started,
            )
            .await
        }
        ReleaseCmd::Start {
            file: Some(file), ..
        } => {
            let text = match std::fs::read_to_string(file) {
                Ok(t) => t,
                Err(e) => {
                    errln!("error: cannot read plan file {}: {e}", file.display());
                    return 1;
                }
            };
            let plan = match crate::release::value_from_toml(&text) {
                Ok(v) => v,
                Err(errs) => {
                    errln!("error: {}: {errs}", file.display());
                    return 1;
                }
            };
            post(args, &base, "/api/releases", plan, started).await
        }
        ReleaseCmd::Start { .. } => {
            errln!("error: give a plan file, or --plan NAME for a plan the config names");
            2
        }
        ReleaseCmd::Promote => {
            post(
                args,
                &base,
                "/api/releases/current/promote",
                json!({}),
                |v| outln!("{}", v["message"].as_str().unwrap_or("promoted")),
            )
            .await
        }
        ReleaseCmd::Abort => {
            post(args, &base, "/api/releases/current/abort", json!({}), |v| {
                outln!("{}", v["message"].as_str().unwrap_or("aborted"));
                for o in v["returned"].as_array().into_iter().flatten() {
                    outln!("  {}", o["message"].as_str().unwrap_or_default());
                }
                for s in v["not_returned"].as_array().into_iter().flatten() {
                    outln!("  NOT returned: {}", s.as_str().unwrap_or_default());
                }
            })
            .await
        }
        ReleaseCmd::Status { watch } => loop {
            let v = match get(args, &base).await {
                Ok(v) => v,
                Err(code) => return code,
            };
            if args.json {
                outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else if v["current"].is_null() {
                outln!("no release is running");
                if let Some(last) = v["recent"].get(0) {
                    outln!("last:");
                    print_release(last);
                }
            } else {
                print_release(&v["current"]);
            }
            // A reader that went away (`--watch | head`) ends the watch.
            if !*watch || v["current"].is_null() || crate::out::closed() {
                return 0;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            outln!();
        },
        ReleaseCmd::Wait => wait(args, &base).await,
    }
}

/// A started release, and what no trigger watches in it.
fn started(v: Value) {
    print_release(&v["release"]);
    if let Some(w) = v["warning"].as_str() {
        errln!("warning: {w}");
    }
}

async fn wait(args: &CtlArgs, base: &str) -> i32 {
    let deadline = args.timeout.map(|t| tokio::time::Instant::now() + t);
    let first = match get(args, base).await {
        Ok(v) => v,
        Err(code) => return code,
    };
    let id = match (
        first["current"]["id"].as_str(),
        first["recent"][0]["id"].as_str(),
    ) {
        (Some(id), _) => id.to_string(),
        // Already over (a short release ends before `wait` starts): its result decides.
        (None, Some(id)) => {
            outln!("no release is running; the last one:");
            id.to_string()
        }
        (None, None) => {
            errln!("error: no release is running and none ran yet");
            return 1;
        }
    };
    let mut last_state = String::new();
    loop {
        let v = match get(args, base).await {
            Ok(v) => v,
            // A replica restarting or a network blip: keep waiting until the deadline.
            Err(_) => Value::Null,
        };
        let rel = if v["current"]["id"] == id.as_str() {
            Some(&v["current"])
        } else {
            v["recent"]
                .as_array()
                .and_then(|a| a.iter().find(|r| r["id"] == id.as_str()))
        };
        if let Some(r) = rel {
            let state = r["state"].as_str().unwrap_or_default().to_string();
            if state != last_state {
                outln!(
                    "release {} ({id}): {state}{}",
                    r["name"],
                    match r["phase"].as_u64() {
                        Some(p) if r["ended_at"].is_null() => format!(
                            " (phase {p} {})",
                            r["phases"][p as usize]["name"].as_str().unwrap_or_default()
                        ),
                        _ => String::new(),
                    }
                );
                last_state = state.clone();
            }
            match state.as_str() {
                "complete" => return 0,
                "rolled_back" | "aborted" => {
                    errln!("release {state}: {}", r["reason"].as_str().unwrap_or("-"));
                    return 1;
                }
                _ => {}
            }
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            errln!(
                "error: release {id} still {last_state} after {}",
                humantime::format_duration(args.timeout.unwrap_or_default())
            );
            return 1;
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn get(args: &CtlArgs, base: &str) -> Result<Value, i32> {
    let url = format!("{base}/api/releases");
    match tokio::time::timeout(args.request_timeout(), call(args, "GET", &url, None, None)).await {
        Ok(Ok((200, v))) => match from_admin(base, 200, &v, "current") {
            Ok(()) => Ok(v),
            Err(e) => {
                errln!("error: {e}");
                Err(1)
            }
        },
        Ok(Ok((status, v))) => {
            errln!(
                "error ({status}): {}",
                v["error"].as_str().unwrap_or("request failed")
            );
            Err(1)
        }
        Ok(Err(e)) => {
            errln!("error: cannot reach the admin listener at {base}: {e}");
            Err(1)
        }
        Err(_) => {
            errln!("error: no answer from the admin listener at {base}");
            Err(1)
        }
    }
}

async fn post(
    args: &CtlArgs,
    base: &str,
    path: &str,
    body: Value,
    show: impl FnOnce(Value),
) -> i32 {
    let Some(token) = args.token.as_deref().filter(|t| !t.is_empty()) else {
        errln!(
            "error: this command needs the admin token: pass --token or set SWITCHYARD_ADMIN_TOKEN"
        );
        return 1;
    };
    let url = format!("{base}{path}");
    let handed = std::sync::atomic::AtomicBool::new(false);
    let (status, v, admin_json) = match tokio::time::timeout(
        args.request_timeout(),
        call_tracked(args, "POST", &url, Some(token), Some(body), &handed),
    )
    .await
    {
        // The request never left (no connection within the timeout): nothing was changed.
        Err(_) if !handed.load(std::sync::atomic::Ordering::Relaxed) => {
            errln!(
                "error: cannot reach the admin listener at {base}: no connection within {}",
                humantime::format_duration(args.request_timeout())
            );
            return 1;
        }
        Ok(Ok(x)) => x,
        Ok(Err(e)) if e.maybe_sent => {
            errln!("error: the admin listener at {base} took the request but gave no answer: {e}");
            errln!(
                "the change may or may not have been made: check `switchyard ctl release status`"
            );
            return EXIT_UNKNOWN;
        }
        Ok(Err(e)) => {
            errln!("error: cannot reach the admin listener at {base}: {e}");
            return 1;
        }
        Err(_) => {
            errln!("error: no answer from the admin listener at {base}");
            errln!(
                "the change may or may not have been made: check `switchyard ctl release status`"
            );
            return EXIT_UNKNOWN;
        }
    };
    let key = if v.get("release").is_some() {
        "release"
    } else {
        "message"
    };
    if (200..300).contains(&status) {
        if let Err(e) = from_admin(base, status, &v, key) {
            errln!("error: {e}");
            return 1;
        }
    }
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    if !(200..300).contains(&status) {
        errln!(
            "error ({status}): {}",
            v["error"].as_str().unwrap_or("request failed")
        );
        for e in v["errors"].as_array().into_iter().flatten() {
            errln!("  {}", e.as_str().unwrap_or_default());
        }
        let code = change_failed_exit(status, &v, admin_json);
        if crate::ctl_client::needs_unknown_hint(code, &v) {
            errln!("that answer is not the admin API's (a gateway or proxy in front of it?): the change may or may not have been made");
            errln!("outcome not known: check `switchyard ctl release status`");
        }
        return code;
    }
    // Done, but not whole: an abort that left a service where the release put it (its pool had
    // no healthy upstream). Answered 200 (the release ended), but a script must not go on as
    // if every service were back.
    let partial = v["not_returned"].as_array().is_some_and(|a| !a.is_empty());
    if !args.json {
        show(v);
    }
    if partial {
        errln!("error: the release ended, but not every service it flipped was returned (above): flip those by hand");
        return 1;
    }
    0
}

fn secs(v: &Value) -> String {
    v.as_f64()
        .map(|s| humantime::format_duration(Duration::from_secs(s.ceil() as u64)).to_string())
        .unwrap_or_else(|| "-".to_string())
}

/// What a phase flips, for people: `api -> green`, `api -> green, panel -> blue` (a color per
/// service), `api, panel -> green`, or `no flip` (a verification phase).
fn flips(p: &Value) -> String {
    let services: Vec<&str> = p["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if services.is_empty() {
        return "no flip".to_string();
    }
    match &p["to"] {
        Value::Object(to) => services
            .iter()
            .map(|s| {
                format!(
                    "{s} -> {}",
                    to.get(*s).and_then(Value::as_str).unwrap_or("-")
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
        to => format!("{} -> {}", services.join(", "), to.as_str().unwrap_or("-")),
    }
}

fn print_release(r: &Value) {
    let phase = r["phase"].as_u64().unwrap_or(0);
    outln!(
        "release {} ({}): {}, phase {phase}, started {}",
        r["name"],
        r["id"].as_str().unwrap_or("-"),
        r["state"].as_str().unwrap_or("-"),
        r["started_at"].as_str().unwrap_or("-"),
    );
    for (i, p) in r["phases"].as_array().into_iter().flatten().enumerate() {
        let mut line = format!(
            "  {} {i} {:<12} {:<10} {} (bake {}, gate {})",
            if i as u64 == phase && r["ended_at"].is_null() {
                ">"
            } else {
                " "
            },
            p["name"].as_str().unwrap_or("-"),
            p["state"].as_str().unwrap_or("-"),
            flips(p),
            secs(&p["bake_secs"]),
            p["gate"].as_str().unwrap_or("-"),
        );
        if !p["bake_left_secs"].is_null() {
            line += &format!(", {} left", secs(&p["bake_left_secs"]));
        }
        outln!("{line}");
    }
    if !r["validate_left_secs"].is_null() {
        outln!(
            "  validating: {} left (until {})",
            secs(&r["validate_left_secs"]),
            r["validate_ends_at"].as_str().unwrap_or("-")
        );
    }
    if let Some(p) = r["paused"].as_str() {
        outln!("  {p}; `switchyard ctl release promote` resumes it");
    }
    if let Some(reason) = r["reason"].as_str() {
        outln!(
            "  ended {}: {reason}",
            r["ended_at"].as_str().unwrap_or("-")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_says_what_it_flips_in_words() {
        let cases = [
            (json!({"services": ["api"], "to": "green"}), "api -> green"),
            (
                json!({"services": ["api", "panel"], "to": "green"}),
                "api, panel -> green",
            ),
            (
                json!({"services": ["api", "panel"], "to": {"api": "green", "panel": "blue"}}),
                "api -> green, panel -> blue",
            ),
            (json!({"services": [], "to": {}}), "no flip"),
            (json!({}), "no flip"),
        ];
        for (phase, want) in cases {
            assert_eq!(flips(&phase), want, "{phase}");
        }
    }
}
