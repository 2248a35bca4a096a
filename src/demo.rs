//! `switchyard demo`: the proxy plus built-in blue and green upstreams on loopback, a little
//! steady traffic so the numbers move, and the commands to flip, break green and watch the
//! automatic rollback. Needs no files and nothing installed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http::{Request, Response, StatusCode};
use http_body_util::{Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioIo;

use crate::http::client::hyper_client;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Proxy listener.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Admin listener (dashboard, API, metrics).
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub admin: SocketAddr,
    /// Preview listener (the idle color).
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub preview: SocketAddr,
    /// Admin token (default: a random one).
    #[arg(long, value_parser = demo_token)]
    pub token: Option<String>,
    /// Do not generate background traffic.
    #[arg(long)]
    pub no_traffic: bool,
}

/// A built-in upstream whose behavior can be changed over HTTP: `/_demo/fail?rate=30` (percent
/// of requests answered 500), `/_demo/slow?ms=1500`, `/_demo/health?ok=false`,
/// `/_demo/deps?payments=down&email=down&database=down` (its deep health at `/health/deps` and
/// its `/metrics`), `/_demo/reset`.
pub struct DemoUpstream {
    pub addr: SocketAddr,
    pub name: String,
    fail_percent: AtomicU32,
    slow_ms: AtomicU64,
    healthy: AtomicBool,
    /// Dependencies reported by `/health/deps`: database, payments, email.
    deps: [AtomicBool; 3],
    /// Requests answered, for `/metrics`.
    served: AtomicU64,
}

const DEPS: [&str; 3] = ["database", "payments", "email"];

impl DemoUpstream {
    pub async fn start(name: &str, stop: CancellationToken) -> std::io::Result<Arc<DemoUpstream>> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let up = Arc::new(DemoUpstream {
            addr: listener.local_addr()?,
            name: name.to_string(),
            fail_percent: AtomicU32::new(0),
            slow_ms: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            deps: [
                AtomicBool::new(true),
                AtomicBool::new(true),
                AtomicBool::new(true),
            ],
            served: AtomicU64::new(0),
        });
        let me = up.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = stop.cancelled() => return,
                };
                let me = me.clone();
                let svc = service_fn(move |req| {
                    let me = me.clone();
                    async move { Ok::<_, Infallible>(me.answer(req).await) }
                });
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(up)
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        let query = req.uri().query().unwrap_or("");
        let param = |k: &str| {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.to_string())
        };
        match path {
            "/_demo/fail" => {
                let rate = param("rate").and_then(|v| v.parse().ok()).unwrap_or(100u32);
                self.fail_percent.store(rate.min(100), Ordering::Relaxed);
                return reply(
                    StatusCode::OK,
                    format!("{}: failing {}% of requests\n", self.name, rate.min(100)),
                );
            }
            "/_demo/slow" => {
                let ms = param("ms").and_then(|v| v.parse().ok()).unwrap_or(1500u64);
                self.slow_ms.store(ms, Ordering::Relaxed);
                return reply(
                    StatusCode::OK,
                    format!("{}: answering after {ms} ms\n", self.name),
                );
            }
            "/_demo/health" => {
                let ok = param("ok").map(|v| v != "false").unwrap_or(true);
                self.healthy.store(ok, Ordering::Relaxed);
                return reply(
                    StatusCode::OK,
                    format!(
                        "{}: health endpoint {}\n",
                        self.name,
                        if ok { "passing" } else { "failing" }
                    ),
                );
            }
            "/_demo/deps" => {
                for (i, dep) in DEPS.iter().enumerate() {
                    if let Some(v) = param(dep) {
                        self.deps[i].store(v != "down", Ordering::Relaxed);
                    }
                }
                return reply(
                    StatusCode::OK,
                    format!("{}: {}\n", self.name, self.deps_json()),
                );
            }
            "/health/deps" => {
                let mut r = reply(StatusCode::OK, self.deps_json());
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                return r;
            }
            "/metrics" => return reply(StatusCode::OK, self.metrics_text()),
            "/_demo/reset" => {
                for d in &self.deps {
                    d.store(true, Ordering::Relaxed);
                }
                self.fail_percent.store(0, Ordering::Relaxed);
                self.slow_ms.store(0, Ordering::Relaxed);
                self.healthy.store(true, Ordering::Relaxed);
                return reply(StatusCode::OK, format!("{}: back to normal\n", self.name));
            }
            "/health" => {
                return if self.healthy.load(Ordering::Relaxed) {
                    reply(StatusCode::OK, "ok\n".to_string())
                } else {
                    reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "database unreachable\n".to_string(),
                    )
                };
            }
            _ => {}
        }
        self.served.fetch_add(1, Ordering::Relaxed);
        let slow = self.slow_ms.load(Ordering::Relaxed);
        if slow > 0 {
            tokio::time::sleep(Duration::from_millis(slow)).await;
        }
        let fail = self.fail_percent.load(Ordering::Relaxed);
        if fail > 0 && fastrand::u32(0..100) < fail {
            return reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{} failed\n", self.name),
            );
        }
        let color = self.name.rsplit('-').next().unwrap_or("");
        reply(StatusCode::OK, format!("{color}\n"))
    }
}

impl DemoUpstream {
    fn color(&self) -> &str {
        self.name.rsplit('-').next().unwrap_or("")
    }

    fn dep_ok(&self, i: usize) -> bool {
        self.deps[i].load(Ordering::Relaxed)
    }

    /// The deep health answer: each dependency "ok" or "down", and the pool utilization.
    fn deps_json(&self) -> String {
        let mut v = serde_json::Map::new();
        for (i, dep) in DEPS.iter().enumerate() {
            v.insert(
                dep.to_string(),
                serde_json::json!(if self.dep_ok(i) { "ok" } else { "down" }),
            );
        }
        v.insert(
            "db_pool_utilization".to_string(),
            serde_json::json!(if self.dep_ok(0) { 0.42 } else { 1.0 }),
        );
        serde_json::Value::Object(v).to_string()
    }

    /// Prometheus text exposition of what an application would export about itself.
    fn metrics_text(&self) -> String {
        let color = self.color();
        let service = self.name.split('-').next().unwrap_or("");
        let labels = format!("service=\"{service}\",color=\"{color}\"");
        let mut s = format!(
            "# TYPE app_requests_total counter\napp_requests_total{{{labels}}} {}\n",
            self.served.load(Ordering::Relaxed)
        );
        s.push_str(&format!(
            "# TYPE app_db_pool_utilization gauge\napp_db_pool_utilization{{{labels}}} {}\n",
            if self.dep_ok(0) { 0.42 } else { 1.0 }
        ));
        s.push_str("# TYPE app_dependency_up gauge\n");
        for (i, dep) in DEPS.iter().enumerate() {
            s.push_str(&format!(
                "app_dependency_up{{{labels},dependency=\"{dep}\"}} {}\n",
                self.dep_ok(i) as u8
            ));
        }
        s
    }
}

fn reply(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The demo's config, validated by the same code as any file.
pub fn demo_config(
    args: &DemoArgs,
    ups: &[Arc<DemoUpstream>; 4],
    state_dir: &std::path::Path,
) -> String {
    let [api_blue, api_green, panel_blue, panel_green] = ups;
    format!(
        r#"
[proxy]
listen = "{listen}"
preview_listen = "{preview}"
request_timeout = "5s"
shutdown_grace = "5s"

[admin]
listen = "{admin}"

[state]
path = "{state}"

[[services]]
name = "api"
path_prefix = "/api"
active = "blue"
blue  = {{ upstreams = ["{ab}"] }}
green = {{ upstreams = ["{ag}"] }}
smoke_paths = ["/health"]

[services.health]
path = "/health"
interval = "1s"
timeout = "500ms"
unhealthy_after = 2
healthy_after = 1

[services.rollback]
enabled = true
watch_for = "30m"
min_requests = 10

[[services.rollback.triggers]]
kind = "error_rate"
above = 0.05
over = "10s"
for = "5s"

[[services.rollback.triggers]]
kind = "p95_latency"
above = "1000ms"
over = "10s"
for = "5s"

[[services.rollback.triggers]]
kind = "critical_5xx"
paths = ["/api/payments"]
above = 0
over = "10s"
for = "0s"

[[services.rollback.triggers]]
kind = "unhealthy"
for = "3s"

# The application's own deep health: any live upstream reporting payments down, for 4s.
[[services.rollback.triggers]]
kind = "probe"
path = "/health/deps"
json_pointer = "/payments"
equals = "ok"
interval = "1s"
for = "4s"

# Before a flip: the target color's database must be reachable.
[[services.verify]]
kind = "probe"
path = "/health/deps"
json_pointer = "/database"
equals = "ok"

[[services]]
name = "panel"
active = "blue"
blue  = {{ upstreams = ["{pb}"] }}
green = {{ upstreams = ["{pg}"] }}

[services.health]
path = "/health"
interval = "1s"
timeout = "500ms"
"#,
        listen = args.listen,
        preview = args.preview,
        admin = args.admin,
        state = state_dir.join("switchyard.json").display(),
        ab = api_blue.addr,
        ag = api_green.addr,
        pb = panel_blue.addr,
        pg = panel_green.addr,
    )
}

/// The release `switchyard demo` suggests (written beside its state file).
const DEMO_PLAN: &str = r#"name = "demo release"
validate = "5m"
[[phases]]
name = "backend"
services = ["api"]
bake = "30s"
[[phases]]
name = "frontend"
services = ["panel"]
bake = "2m"
"#;

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let mut ups = Vec::new();
    for name in ["api-blue", "api-green", "panel-blue", "panel-green"] {
        ups.push(DemoUpstream::start(name, stop.clone()).await?);
    }
    let ups: [Arc<DemoUpstream>; 4] = ups
        .try_into()
        .map_err(|_| anyhow::anyhow!("demo upstreams did not start"))?;
    let state_dir = std::env::temp_dir().join(format!("switchyard-demo-{}", std::process::id()));
    let text = demo_config(&args, &ups, &state_dir);
    let config =
        crate::config::from_toml_str(&text).map_err(|e| anyhow::anyhow!("demo config: {e}"))?;
    // `--token` is read as `serve` reads its token: one line end off, refused when no header
    // could carry it.
    let token = match args.token.as_deref() {
        Some(raw) => demo_token(raw).map_err(|why| anyhow::anyhow!("invalid --token: {why}"))?,
        None => (0..32)
            .map(|_| fastrand::alphanumeric())
            .collect::<String>(),
    };
    let running = crate::server::start(
        config,
        crate::server::Options {
            config_path: None,
            store: crate::state::StateStore::file(state_dir.join("switchyard.json")),
            admin_token: Some(token.clone()),
        },
    )
    .await?;
    let proxy = running.proxy_addr;
    let admin = running.admin_addr;
    let preview = running.preview_addr.unwrap_or(args.preview);
    if !args.no_traffic {
        tokio::spawn(traffic(proxy, stop.clone()));
    }
    let green = ups[1].addr;
    // A two-phase release of the demo's services, short enough to watch.
    let plan = state_dir.join("release.toml");
    let _ = std::fs::create_dir_all(&state_dir);
    if let Err(e) = std::fs::write(&plan, DEMO_PLAN) {
        crate::errln!("cannot write the demo release plan {}: {e}", plan.display());
    }
    crate::outln!(
        r#"
Switchyard demo is running (Ctrl-C to stop).

  proxy      http://{proxy}        /api -> service "api", everything else -> service "panel"
  preview    http://{preview}        the idle color of each service (smoke-test green before the flip)
  dashboard  http://{admin}/
  metrics    http://{admin}/metrics
  token      {token}
  upstreams  api: blue {ab}, green {ag}   panel: blue {pb}, green {pg}
  state      {state}  (removed when the demo stops)
{traffic}
Try it (in another terminal):

  export SWITCHYARD_ADMIN_TOKEN={quoted} SWITCHYARD_ADMIN_URL=http://{admin}
  curl http://{proxy}/api/hello                # blue
  curl http://{preview}/api/hello                # green, through the preview listener
  switchyard ctl status                               # or: cargo run --release -- ctl status
  switchyard ctl flip api green                       # flip (health and smoke checks first)
  curl -X POST -H "Authorization: Bearer $SWITCHYARD_ADMIN_TOKEN" -H 'Content-Type: application/json' \
       -d '{{"to":"green"}}' http://{admin}/api/services/api/flip    # the same with curl
  curl http://{proxy}/api/hello                # green

Break green and watch the automatic rollback (error rate > 5% over 10s, held for 5s):

  curl 'http://{green}/_demo/fail?rate=30'       # green's api now fails 30% of requests
  switchyard ctl events                               # within ~15s: auto_rollback green -> blue
  curl 'http://{green}/_demo/reset'              # green healthy again; only a manual flip sends traffic back

Other ways to break it: /_demo/slow?ms=1500 (p95 trigger), /_demo/health?ok=false (unhealthy trigger),
or `curl http://{proxy}/api/payments` while green fails (critical_5xx fires at once).

The application's own signals (each upstream has a deep health endpoint and /metrics):

  curl http://{green}/health/deps                # {{"database":"ok","payments":"ok",...}}
  switchyard ctl flip api green                       # (after a rollback: flip forward again)
  curl 'http://{green}/_demo/deps?payments=down'  # the probe trigger fires in ~5s: auto_rollback green -> blue
  curl 'http://{green}/_demo/deps?database=down'  # now a flip to green is refused (409): verify /database
  curl 'http://{green}/_demo/reset'

Ship a release (from blue: api first, then panel; one rollback for both):

  curl 'http://{green}/_demo/reset'; switchyard ctl flip api blue   # if you tried the steps above
  switchyard ctl release start {plan}
  switchyard ctl release status --watch               # phase 0 bakes 30s, then phase 1 flips panel
  curl 'http://{green}/_demo/fail?rate=30'       # during phase 1: break api's green
  switchyard ctl release wait                         # exits 1: rolled_back, api AND panel back on blue in one step
"#,
        plan = plan.display(),
        quoted = shell_quote(&token),
        ab = ups[0].addr,
        ag = ups[1].addr,
        pb = ups[2].addr,
        pg = ups[3].addr,
        state = state_dir.display(),
        traffic = if args.no_traffic {
            ""
        } else {
            "  traffic    about 20 requests/s to /api/items and / in the background (--no-traffic to stop it)\n"
        },
    );
    wait_for_signal().await;
    crate::errln!("stopping the demo");
    stop.cancel();
    running.shutdown().await;
    // The state, audit log and plan were the demo's alone: leave no directory per run in /tmp.
    let dir = state_dir.clone();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await {
        crate::errln!("cannot remove {}: {e}", state_dir.display());
    }
    Ok(())
}

/// `--token`: read as `serve` reads its token (one line end off; refused when no header could
/// carry it), and never empty: every mutating call would then be refused (a usage error, exit 2).
fn demo_token(raw: &str) -> Result<String, String> {
    let t = crate::http::headers::bearer_token(raw).map_err(str::to_string)?;
    if t.is_empty() {
        return Err(
            "the admin token must not be empty (leave --token out for a random one)".into(),
        );
    }
    Ok(t.to_string())
}

/// `s` as one POSIX shell word: as it is when it has nothing the shell reads, else in single
/// quotes (a `'` inside written `'\''`).
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'_' | b'-' | b'.' | b'/' | b':' | b'@' | b'%' | b'+' | b'=' | b','
                )
        });
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Steady background traffic: about 20 requests a second.
async fn traffic(proxy: SocketAddr, stop: CancellationToken) {
    let client: Client<_, Empty<Bytes>> =
        hyper_client(Duration::from_secs(2), Duration::from_secs(90), None, false);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        n += 1;
        let path = if n.is_multiple_of(4) {
            "/"
        } else {
            "/api/items"
        };
        let Ok(req) = Request::get(format!("http://{proxy}{path}")).body(Empty::new()) else {
            continue;
        };
        let client = client.clone();
        tokio::spawn(async move {
            if let Ok(Ok(resp)) =
                tokio::time::timeout(Duration::from_secs(10), client.request(req)).await
            {
                let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            }
        });
    }
}
