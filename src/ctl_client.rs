//! The admin API as `switchyard ctl` and `switchyard ctl release` call it: the global flags that
//! say where it is and how long to wait, and one JSON call.

use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use serde_json::{json, Value};

use crate::http::client::hyper_client;

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
}

/// The default of `--timeout` for one call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

impl CtlArgs {
    /// How long one call may take.
    pub fn request_timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_TIMEOUT)
    }
}

/// One call: the status and the JSON answer (a body that is not JSON becomes `{"error": body}`).
pub(crate) async fn call(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Result<(u16, Value), String> {
    let client: Client<_, Full<Bytes>> = hyper_client(
        Duration::from_secs(10),
        Duration::from_secs(90),
        None,
        false,
    );
    let mut req = http::Request::builder()
        .method(method)
        .uri(url)
        .header(http::header::USER_AGENT, "switchyard-ctl");
    if let Some(t) = token {
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
        .map_err(|e| format!("invalid URL {url:?}: {e}"))?;
    let resp = client.request(req).await.map_err(|e| {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg = format!("{msg}: {s}");
            src = s.source();
        }
        msg
    })?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| json!({ "error": String::from_utf8_lossy(&bytes).trim().to_string() }));
    Ok((status, value))
}
