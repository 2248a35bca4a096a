//! The admin API as `switchyard ctl` and `switchyard ctl release` call it: the global flags that
//! say where it is and how long to wait, and one JSON call.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http_body_util::Full;

use crate::http::client::{fetch_once_tracked, FetchError};
use serde_json::{json, Value};

/// The flags every `ctl` command takes.
#[derive(Args, Debug)]
pub struct CtlArgs {
    /// Admin listener URL.
    #[arg(
        long,
        global = true,
        env = "SWITCHYARD_ADMIN_URL",
        default_value = "http://127.0.0.1:9090"
    )]
    pub admin: String,
    /// Bearer token for mutating calls.
    #[arg(
        long,
        global = true,
        env = "SWITCHYARD_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// Print the API's JSON instead of a summary.
    #[arg(long, global = true)]
    pub json: bool,
    /// Give up after this long (default 10s; for `release wait`: how long to wait, default
    /// until the release ends).
    #[arg(long, global = true, value_parser = crate::config::parse_duration)]
    pub timeout: Option<Duration>,
    /// PEM CA certificates to trust for an `https://` admin URL (default: the system bundle).
    #[arg(long, global = true, env = "SWITCHYARD_ADMIN_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
}

/// The exit code of a change whose outcome is not known: no answer to the POST, or the admin
/// API's 503 `"outcome": "unknown"` (etcd did not say whether it stored it). Never 1, which
/// says the change was refused or not made: check `switchyard ctl status`.
pub const EXIT_UNKNOWN: i32 = 3;

/// The exit code of a failed call's answer: [`EXIT_UNKNOWN`] when the API says the outcome is
/// unknown, 1 otherwise.
pub fn failed_exit(value: &Value) -> i32 {
    if value.get("outcome").and_then(Value::as_str) == Some("unknown") {
        EXIT_UNKNOWN
    } else {
        1
    }
}

/// The exit code of a failed answer to a change (a POST): as [`failed_exit`], except that a 5xx
/// that is not the admin API's own JSON refusal (`{"error": ...}`), such as the HTML page of a
/// gateway in front of it that gave up waiting (502, 503, 504), says nothing of the change: its
/// outcome is not known ([`EXIT_UNKNOWN`]), never a refusal. `admin_json`: the body was JSON.
/// A 502 or 504 is never the admin API's own answer (it sends neither): a gateway's, whatever
/// its body, even JSON with an `error` of its own.
pub fn change_failed_exit(status: u16, value: &Value, admin_json: bool) -> i32 {
    let refusal = admin_json
        && value.get("error").is_some_and(Value::is_string)
        && !matches!(status, 502 | 504);
    if status >= 500 && !refusal {
        EXIT_UNKNOWN
    } else {
        failed_exit(value)
    }
}

/// A body that is not JSON, said in one short line: an HTML page's `<title>` (a gateway's error
/// page), else its first non-empty line, cut at 200 characters.
/// Whether a failed change's answer needs the "outcome not known" hint: exit 3 from an answer
/// that is not the admin API's own `"outcome": "unknown"` (which says so itself).
pub fn needs_unknown_hint(code: i32, value: &Value) -> bool {
    code == EXIT_UNKNOWN && value.get("outcome").and_then(Value::as_str) != Some("unknown")
}

fn short_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lower = text.to_ascii_lowercase();
    let title = lower.find("<title>").and_then(|at| {
        let from = at + "<title>".len();
        lower[from..]
            .find("</title>")
            .map(|len| text[from..from + len].trim().to_string())
    });
    let line = title.filter(|t| !t.is_empty()).unwrap_or_else(|| {
        text.lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or_default()
            .to_string()
    });
    match line.char_indices().nth(200) {
        Some((cut, _)) => format!("{}...", &line[..cut]),
        None => line,
    }
}

fn unsent(message: String) -> FetchError {
    FetchError {
        message,
        maybe_sent: false,
    }
}

/// The default of `--timeout` for one call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl CtlArgs {
    /// How long one call may take.
    pub fn request_timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT)
    }

    /// The admin base URL from `--admin`, without a trailing slash. `HOST:PORT` alone (what
    /// `[admin] listen` says) means `http://HOST:PORT`; any scheme but http and https, a URL
    /// without a host or with a query, a user or password, or a fragment is a usage error.
    pub fn admin_base(&self) -> Result<String, String> {
        let raw = self.admin.trim();
        let full = if raw.contains("://") {
            raw.to_string()
        } else {
            format!("http://{raw}")
        };
        // Said without a user:password@ it may carry (error output ends up in CI logs): all
        // from the scheme to the last `@`, since a password may hold `/`, `?` or `#`.
        let after_scheme = raw.find("://").map_or(0, |i| i + 3);
        let shown = match raw[after_scheme..].rfind('@') {
            Some(at) => format!("{}***{}", &raw[..after_scheme], &raw[after_scheme + at..]),
            None => raw.to_string(),
        };
        let bad = |why: &str| {
            format!("invalid admin URL {shown:?} (--admin or SWITCHYARD_ADMIN_URL): {why}")
        };
        // Refused before parsing: http::Uri keeps a user:password@ in the authority (it went
        // out as the Host field, a 400), and `user:pa/ss@host` parses as the host `user:pa`.
        // An `@` after the host (a pchar, RFC 3986 3.3) cannot be told apart from a password
        // holding `/`: it is refused too, with the way around it (`%40`, the same path).
        if raw[after_scheme..].contains('@') {
            return Err(bad(
                "a base URL takes no user or password (the admin API reads --token); an '@' in its path is written %40",
            ));
        }
        let uri: http::Uri = full.parse().map_err(|e| bad(&format!("{e}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(bad("the scheme must be http:// or https://"));
        }
        if uri.authority().is_none_or(|a| a.host().is_empty()) {
            return Err(bad("no host"));
        }
        if let Some(auth) = uri.authority() {
            crate::http::client::authority_port(auth, 80).map_err(|e| bad(&e))?;
        }
        if uri.query().is_some() {
            return Err(bad("a base URL takes no query"));
        }
        // http::Uri drops a #fragment (which then swallowed the API path appended to it).
        if full.contains('#') {
            return Err(bad("a base URL takes no fragment (#...)"));
        }
        Ok(full.trim_end_matches('/').to_string())
    }

    /// `--token` (or SWITCHYARD_ADMIN_TOKEN) as it is sent: one trailing line end off, as
    /// `serve` reads it (see [`crate::http::headers::bearer_token`]). A token that cannot travel
    /// in a header is a usage error, never a call that fails as "cannot reach".
    pub fn normalize_token(&mut self) -> Result<(), String> {
        let Some(raw) = self.token.as_deref() else {
            return Ok(());
        };
        let token = crate::http::headers::bearer_token(raw).map_err(|why| {
            format!(
                "invalid admin token (--token or SWITCHYARD_ADMIN_TOKEN): it cannot be sent in an Authorization header: {why}"
            )
        })?;
        self.token = Some(token.to_string());
        Ok(())
    }
}

/// Whether a 2xx answer is the admin API's: a JSON object with `key`. Anything else (a proxied
/// application's page when `--admin` names the proxy listener) must not pass for success.
pub(crate) fn from_admin(base: &str, status: u16, value: &Value, key: &str) -> Result<(), String> {
    if value.get(key).is_some() {
        return Ok(());
    }
    Err(format!(
        "{base} answered {status} without the admin API's \"{key}\": is --admin (or \
         SWITCHYARD_ADMIN_URL) the admin listener ([admin] listen), not the proxy?"
    ))
}

/// One call: the status and the JSON answer (a body that is not JSON becomes `{"error": line}`,
/// its first line or HTML title, short).
/// One connection per call (a ctl run makes one call, `release wait` one a second): plain TCP for
/// `http://`, rustls for `https://` (the admin listener with `[admin] tls_cert`).
pub(crate) async fn call(
    args: &CtlArgs,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Result<(u16, Value), FetchError> {
    call_tracked(args, method, url, token, body, &AtomicBool::new(false))
        .await
        .map(|(status, value, _)| (status, value))
}

/// [`call`], setting `handed` once the request is handed to an open connection (see
/// [`fetch_once_tracked`]): a `--timeout` that ran out before that never reached the server.
/// The third value says whether the body was JSON (see [`change_failed_exit`]).
pub(crate) async fn call_tracked(
    args: &CtlArgs,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
    handed: &AtomicBool,
) -> Result<(u16, Value, bool), FetchError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| unsent(format!("invalid URL {url:?}: {e}")))?;
    let https = uri.scheme_str() == Some("https");
    let auth = uri
        .authority()
        .ok_or_else(|| unsent(format!("URL {url:?} has no host")))?
        .clone();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, auth.as_str())
        .header(http::header::USER_AGENT, "switchyard-ctl");
    // An empty token (`--token ""`) is none: never `Bearer ` with nothing after it.
    if let Some(t) = token.filter(|t| !t.is_empty()) {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let body = match body {
        Some(b) => {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
            Bytes::from(b.to_string())
        }
        None => Bytes::new(),
    };
    let req = req
        .body(Full::new(body))
        .map_err(|e| unsent(format!("invalid URL {url:?}: {e}")))?;
    let tls = if https {
        let ca = args.ca_file.clone();
        let tls = tokio::task::spawn_blocking(move || {
            crate::tls::client_config(ca.as_deref(), "pass --ca-file")
        })
        .await
        .map_err(|e| unsent(format!("TLS setup task failed: {e}")))?
        .map_err(unsent)?;
        Some(tls)
    } else {
        None
    };
    let (status, bytes) = fetch_once_tracked(&auth, tls, req, usize::MAX, handed).await?;
    let (value, admin_json) = match serde_json::from_slice(&bytes) {
        Ok(v) => (v, true),
        Err(_) => (json!({ "error": short_text(&bytes) }), false),
    };
    Ok((status.as_u16(), value, admin_json))
}
