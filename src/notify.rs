//! Webhooks: every event is POSTed as JSON to each configured URL.
//!
//! Each URL has its own bounded queue and delivery task, so a dead receiver delays nothing but
//! its own deliveries; a full queue drops the event (counted) instead of blocking a flip.

use std::sync::Arc;
use std::time::Duration;

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
    queues: Arc<Vec<(String, mpsc::Sender<Bytes>)>>,
    failures: IntCounter,
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
        Some(Notifier {
            queues: Arc::new(queues),
            failures,
        })
    }
}

impl EventSink for Notifier {
    /// Never waits: a full queue drops the event for that URL.
    fn send(&self, ev: &Event) {
        let body = match serde_json::to_vec(ev) {
            Ok(b) => Bytes::from(b),
            Err(_) => return,
        };
        for (url, q) in self.queues.iter() {
            if q.try_send(body.clone()).is_err() {
                self.failures.inc();
                tracing::warn!(webhook = %url, "webhook queue full; event dropped");
            }
        }
    }
}

async fn deliver(
    url: String,
    mut rx: mpsc::Receiver<Bytes>,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    max_attempts: u32,
    failures: IntCounter,
) {
    while let Some(body) = rx.recv().await {
        let mut backoff = Duration::from_millis(250);
        let mut delivered = false;
        for attempt in 1..=max_attempts {
            match post(&client, &url, body.clone(), timeout).await {
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
    body: Bytes,
    timeout: Duration,
) -> Result<(), String> {
    let req = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, "switchyard-webhook")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => Err("timed out".to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
        Ok(Ok(resp)) => Err(format!("answered {}", resp.status())),
    }
}
