//! Webhooks: every event is POSTed as JSON to each configured URL: `http://` through a pooled
//! client, `https://` one TLS connection per delivery (as the analysis checks make theirs),
//! trusting `[notify] ca_file` or the system bundle.
//!
//! Each URL has its own bounded queue and delivery task, so a dead receiver delays nothing but
//! its own deliveries; a full queue drops the event (counted) instead of blocking a flip. A
//! reload that changes `[notify]` starts new queues and tasks; the old tasks deliver what their
//! queues hold, then end.
//!
//! Each event gets an `id`, unique to this process and the same for every URL and every
//! attempt, in the body and as the `Idempotency-Key` header: a receiver that answered too late
//! (the delivery is retried) can tell the copies apart from new events.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::http::client::{fetch_once, hyper_client};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use prometheus::IntCounter;
use tokio::sync::{mpsc, OnceCell};

use crate::config::NotifyConfig;
use crate::events::{Event, EventSink};

/// Each webhook's URL and queue.
type Queues = Vec<(String, mpsc::Sender<Delivery>)>;

#[derive(Clone)]
pub struct Notifier {
    /// Each URL's queue, replaced whole by [`Notifier::reconfigure`].
    queues: Arc<ArcSwap<Queues>>,
    /// What `queues` was built from.
    config: Arc<ArcSwap<NotifyConfig>>,
    failures: IntCounter,
    /// This process's part of every event id (its start, in microseconds, and its pid).
    origin: Arc<str>,
    seq: Arc<AtomicU64>,
}

/// How deliveries reach their URLs; shared by every URL's task.
#[derive(Clone)]
struct Transport {
    /// For `http://`.
    client: Client<HttpConnector, Full<Bytes>>,
    /// For `https://`: `ca_file`, else the system bundle.
    ca_file: Option<PathBuf>,
    tls: Arc<OnceCell<Arc<rustls::ClientConfig>>>,
}

impl Transport {
    /// The rustls client config, built at the first `https://` delivery that can build it
    /// (a CA file that cannot be read fails that attempt and is tried again at the next).
    async fn tls(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let ca = self.ca_file.clone();
        self.tls
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || {
                    crate::tls::client_config(ca.as_deref(), "set [notify] ca_file to a PEM file")
                })
                .await
                .unwrap_or_else(|e| Err(format!("TLS setup task failed: {e}")))
            })
            .await
            .cloned()
    }
}

/// One event for one URL: its id and its JSON body.
#[derive(Clone)]
struct Delivery {
    id: http::HeaderValue,
    body: Bytes,
}

impl Notifier {
    /// Starts one delivery task per webhook (none yet is fine: a reload may add some).
    pub fn start(cfg: &NotifyConfig, failures: IntCounter) -> Notifier {
        let queues = queues(cfg, &failures);
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        Notifier {
            queues: Arc::new(ArcSwap::from_pointee(queues)),
            config: Arc::new(ArcSwap::from_pointee(cfg.clone())),
            failures,
            origin: format!("{micros:x}-{:x}", std::process::id()).into(),
            seq: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A reload's `[notify]`: when it changed, events go to new queues and tasks from now on;
    /// the old tasks deliver what their queues hold (with the old settings), then end. Event
    /// ids go on from where they were.
    pub fn reconfigure(&self, cfg: &NotifyConfig) {
        if **self.config.load() == *cfg {
            return;
        }
        self.queues.store(Arc::new(queues(cfg, &self.failures)));
        self.config.store(Arc::new(cfg.clone()));
    }
}

/// One queue and delivery task per webhook of `cfg`.
fn queues(cfg: &NotifyConfig, failures: &IntCounter) -> Queues {
    if cfg.webhooks.is_empty() {
        return Vec::new();
    }
    let transport = Transport {
        client: hyper_client(cfg.timeout, Duration::from_secs(90), None, false),
        ca_file: cfg.ca_file.clone(),
        tls: Arc::new(OnceCell::new()),
    };
    cfg.webhooks
        .iter()
        .map(|url| {
            let (tx, rx) = mpsc::channel(cfg.queue_size);
            tokio::spawn(deliver(
                url.clone(),
                rx,
                transport.clone(),
                cfg.timeout,
                cfg.max_attempts,
                failures.clone(),
            ));
            (url.clone(), tx)
        })
        .collect()
}

impl EventSink for Notifier {
    /// Never waits: a full queue drops the event for that URL.
    fn send(&self, ev: &Event) {
        let queues = self.queues.load();
        if queues.is_empty() {
            return;
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let id = format!("{}-{seq}", self.origin);
        let mut json = match serde_json::to_value(ev) {
            Ok(v) => v,
            Err(_) => return,
        };
        if let Some(obj) = json.as_object_mut() {
            obj.insert("id".into(), serde_json::Value::String(id.clone()));
        }
        let (Ok(body), Ok(id)) = (serde_json::to_vec(&json), http::HeaderValue::from_str(&id))
        else {
            return;
        };
        let delivery = Delivery {
            id,
            body: Bytes::from(body),
        };
        for (url, q) in queues.iter() {
            if q.try_send(delivery.clone()).is_err() {
                self.failures.inc();
                tracing::warn!(webhook = %url, "webhook queue full; event dropped");
            }
        }
    }
}

async fn deliver(
    url: String,
    mut rx: mpsc::Receiver<Delivery>,
    transport: Transport,
    timeout: Duration,
    max_attempts: u32,
    failures: IntCounter,
) {
    while let Some(delivery) = rx.recv().await {
        let mut backoff = Duration::from_millis(250);
        let mut delivered = false;
        for attempt in 1..=max_attempts {
            match post(&transport, &url, &delivery, timeout).await {
                Ok(()) => {
                    delivered = true;
                    break;
                }
                Err(e) => {
                    tracing::debug!(webhook = %url, attempt, error = %e, "webhook delivery failed");
                    if attempt < max_attempts {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    } else {
                        tracing::warn!(webhook = %url, attempts = max_attempts, error = %e, "webhook delivery failed; giving up on this event");
                    }
                }
            }
        }
        if !delivered {
            failures.inc();
        }
    }
}

async fn post(
    transport: &Transport,
    url: &str,
    delivery: &Delivery,
    timeout: Duration,
) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("invalid URL: {e}"))?;
    let attempt = async {
        if uri.scheme_str() == Some("https") {
            return post_tls(transport, &uri, delivery).await;
        }
        let resp = transport
            .client
            .request(request(uri.clone(), None, delivery)?)
            .await
            .map_err(|e| e.to_string())?;
        Ok(resp.status())
    };
    match tokio::time::timeout(timeout, attempt).await {
        Err(_) => Err("timed out".to_string()),
        Ok(Err(e)) => Err(e),
        Ok(Ok(status)) if status.is_success() => Ok(()),
        Ok(Ok(status)) => Err(format!("answered {status}")),
    }
}

/// One delivery over its own TLS connection: the status of the answer.
async fn post_tls(
    transport: &Transport,
    uri: &http::Uri,
    delivery: &Delivery,
) -> Result<http::StatusCode, String> {
    let tls = transport.tls().await?;
    let auth = uri
        .authority()
        .ok_or_else(|| format!("URL {uri} has no host"))?
        .clone();
    // Host is host[:port], never the userinfo an authority may carry.
    let host = match auth.port() {
        Some(p) => format!("{}:{p}", auth.host()),
        None => auth.host().to_string(),
    };
    let target = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = request(
        target.parse().map_err(|e| format!("{e}"))?,
        Some(&host),
        delivery,
    )?;
    // The status alone decides, as for `http://`: the answer's body is not read (a long or
    // slow one failed the delivery, and it was sent again).
    let (status, _) = fetch_once(&auth, Some(tls), req, 0)
        .await
        .map_err(|e| e.message)?;
    Ok(status)
}

/// The POST of `delivery` to `uri` (absolute for the pooled client, a path with `host` for a
/// connection of its own).
fn request(
    uri: http::Uri,
    host: Option<&str>,
    delivery: &Delivery,
) -> Result<http::Request<Full<Bytes>>, String> {
    let mut req = http::Request::post(uri)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, "switchyard-webhook")
        .header("idempotency-key", delivery.id.clone());
    if let Some(host) = host {
        req = req.header(http::header::HOST, host);
    }
    req.body(Full::new(delivery.body.clone()))
        .map_err(|e| e.to_string())
}
