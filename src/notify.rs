//! Webhooks: every event is POSTed as JSON to each configured URL.
//!
//! Each URL has its own bounded queue and delivery task, so a dead receiver delays nothing but
//! its own deliveries; a full queue drops the event (counted) instead of blocking a flip.
//!
//! Each event gets an `id`, unique to this process and the same for every URL and every
//! attempt, in the body and as the `Idempotency-Key` header: a receiver that answered too late
//! (the delivery is retried) can tell the copies apart from new events.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::http::client::hyper_client;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use prometheus::IntCounter;
use tokio::sync::mpsc;

use crate::config::NotifyConfig;
use crate::events::{Event, EventSink};

#[derive(Clone)]
pub struct Notifier {
    queues: Arc<Vec<(String, mpsc::Sender<Delivery>)>>,
    failures: IntCounter,
    /// This process's part of every event id (its start, in microseconds, and its pid).
    origin: Arc<str>,
    seq: Arc<AtomicU64>,
}

/// One event for one URL: its id and its JSON body.
#[derive(Clone)]
struct Delivery {
    id: http::HeaderValue,
    body: Bytes,
}

impl Notifier {
    /// Starts one delivery task per webhook; None when there are none.
    pub fn start(cfg: &NotifyConfig, failures: IntCounter) -> Option<Notifier> {
        if cfg.webhooks.is_empty() {
            return None;
        }
        let client: Client<HttpConnector, Full<Bytes>> =
            hyper_client(cfg.timeout, Duration::from_secs(90), None, false);
        let mut queues = Vec::new();
        for url in &cfg.webhooks {
            let (tx, rx) = mpsc::channel(cfg.queue_size);
            tokio::spawn(deliver(
                url.clone(),
                rx,
                client.clone(),
                cfg.timeout,
                cfg.max_attempts,
                failures.clone(),
            ));
            queues.push((url.clone(), tx));
        }
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros());
        Some(Notifier {
            queues: Arc::new(queues),
            failures,
            origin: format!("{micros:x}-{:x}", std::process::id()).into(),
            seq: Arc::new(AtomicU64::new(0)),
        })
    }
}

impl EventSink for Notifier {
    /// Never waits: a full queue drops the event for that URL.
    fn send(&self, ev: &Event) {
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
        for (url, q) in self.queues.iter() {
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
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    max_attempts: u32,
    failures: IntCounter,
) {
    while let Some(delivery) = rx.recv().await {
        let mut backoff = Duration::from_millis(250);
        let mut delivered = false;
        for attempt in 1..=max_attempts {
            match post(&client, &url, &delivery, timeout).await {
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
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    delivery: &Delivery,
    timeout: Duration,
) -> Result<(), String> {
    let req = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, "switchyard-webhook")
        .header("idempotency-key", delivery.id.clone())
        .body(Full::new(delivery.body.clone()))
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => Err("timed out".to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
        Ok(Ok(resp)) => Err(format!("answered {}", resp.status())),
    }
}
