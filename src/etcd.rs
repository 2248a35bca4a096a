//! The etcd state backend: the live colors shared by every replica.
//!
//! It speaks etcd's v3 JSON gateway (`/v3/kv/range`, `/v3/kv/txn`, `/v3/watch`, served by every
//! etcd ≥ 3.4 on its client URL) over the hyper client Switchyard already has, so a fresh build
//! needs nothing beyond the crate registry (the gRPC client crates need `protoc` at build time).
//!
//! Keys, under `etcd_prefix`: `services/<name>` holds a service's [`ServiceState`] as JSON;
//! `events/<time>-<random>` holds one event, attached to a 7-day lease so the history is bounded.
//!
//! Every write is a transaction that compares each changed key's stored value with the state
//! this replica's routing snapshot holds (so the compare-and-swap is on the whole state,
//! generation included): a replica with a stale view loses, re-reads, and reports a conflict.
//! A watch on `services/` applies every other replica's change within one round trip; when etcd
//! cannot be reached, traffic keeps flowing on the last known colors, writes answer 503, and the
//! replica reconnects and resyncs by itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

use crate::events::Event;
use crate::routing::ServiceState;
use crate::state::StateError;

const EVENT_TTL_SECS: u64 = 7 * 24 * 3600;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

pub struct EtcdStore {
    endpoints: Vec<String>,
    prefix: String,
    client: Client<HttpConnector, Full<Bytes>>,
    /// The `mod_revision` of each service key as this replica last saw it (0: absent).
    revisions: Mutex<HashMap<String, i64>>,
    next: AtomicUsize,
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

fn unb64(v: &Value) -> Option<Vec<u8>> {
    B64.decode(v.as_str()?).ok()
}

fn num(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// The smallest key after every key with this prefix (etcd's `range_end` for a prefix).
fn prefix_end(prefix: &str) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0xff {
            bytes.push(last + 1);
            return B64.encode(&bytes);
        }
    }
    B64.encode([0u8])
}

impl EtcdStore {
    pub fn new(endpoints: &[String], prefix: &str) -> Arc<EtcdStore> {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        connector.set_nodelay(true);
        Arc::new(EtcdStore {
            endpoints: endpoints
                .iter()
                .map(|e| e.trim_end_matches('/').to_string())
                .collect(),
            prefix: prefix.to_string(),
            client: Client::builder(TokioExecutor::new()).build(connector),
            revisions: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(0),
        })
    }

    fn services_prefix(&self) -> String {
        format!("{}services/", self.prefix)
    }

    fn service_key(&self, name: &str) -> String {
        format!("{}services/{name}", self.prefix)
    }

    fn events_prefix(&self) -> String {
        format!("{}events/", self.prefix)
    }

    /// Posts to the first endpoint that answers, starting with the last one that did.
    async fn call(&self, path: &str, body: &Value) -> Result<Value, StateError> {
        let n = self.endpoints.len().max(1);
        let start = self.next.load(Ordering::Relaxed);
        let mut last_err = String::from("no etcd endpoints configured");
        for i in 0..n {
            let idx = (start + i) % n;
            let Some(base) = self.endpoints.get(idx) else {
                break;
            };
            match self.post(&format!("{base}{path}"), body).await {
                Ok(v) => {
                    self.next.store(idx, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) => last_err = format!("{base}: {e}"),
            }
        }
        Err(StateError::Unavailable(format!(
            "etcd unreachable ({last_err})"
        )))
    }

    async fn post(&self, url: &str, body: &Value) -> Result<Value, String> {
        let req = http::Request::post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let bytes = tokio::time::timeout(REQUEST_TIMEOUT, resp.into_body().collect())
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?
            .to_bytes();
        if !status.is_success() {
            return Err(format!(
                "answered {status}: {}",
                String::from_utf8_lossy(&bytes).trim()
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("invalid answer: {e}"))
    }

    /// Every stored service state, and the store revision it was read at.
    pub async fn load(&self) -> Result<(HashMap<String, ServiceState>, i64), StateError> {
        let prefix = self.services_prefix();
        let v = self
            .call(
                "/v3/kv/range",
                &json!({ "key": b64(&prefix), "range_end": prefix_end(&prefix) }),
            )
            .await?;
        let revision = num(&v["header"]["revision"]);
        let mut states = HashMap::new();
        let mut revs = HashMap::new();
        for kv in v["kvs"].as_array().into_iter().flatten() {
            if let Some((name, state, rev)) = self.parse_kv(kv) {
                revs.insert(name.clone(), rev);
                states.insert(name, state);
            }
        }
        if let Ok(mut r) = self.revisions.lock() {
            *r = revs;
        }
        Ok((states, revision))
    }

    /// (service name, state, mod_revision) of a `services/<name>` key-value.
    fn parse_kv(&self, kv: &Value) -> Option<(String, ServiceState, i64)> {
        let key = String::from_utf8(unb64(&kv["key"])?).ok()?;
        let name = key.strip_prefix(&self.services_prefix())?.to_string();
        let value = unb64(&kv["value"])?;
        match serde_json::from_slice::<ServiceState>(&value) {
            Ok(state) => Some((name, state, num(&kv["mod_revision"]))),
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "ignoring an unreadable service state in etcd");
                None
            }
        }
    }

    /// Writes the changed services in one transaction that succeeds only if none of them
    /// changed since this replica last saw them.
    ///
    /// The compare is on the value the replica's snapshot was built from (`previous`), not on a
    /// revision the watch may already have advanced: a replica whose snapshot has not caught up
    /// with another replica's write must lose, even if it has seen the revision go by.
    pub async fn save(
        &self,
        states: &HashMap<String, ServiceState>,
        previous: &HashMap<String, ServiceState>,
        changed: &[String],
    ) -> Result<(), StateError> {
        let known = self.revisions.lock().map(|r| r.clone()).unwrap_or_default();
        let mut compare = Vec::new();
        let mut success = Vec::new();
        for name in changed {
            let Some(state) = states.get(name) else {
                continue;
            };
            let key = b64(&self.service_key(name));
            let stored = known.get(name).copied().unwrap_or(0) != 0;
            match previous.get(name).filter(|_| stored) {
                None => compare.push(json!({ "key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0" })),
                Some(prev) => {
                    let prev = serde_json::to_string(prev).unwrap_or_default();
                    compare.push(json!({ "key": key, "target": "VALUE", "result": "EQUAL", "value": b64(&prev) }));
                }
            }
            let value = serde_json::to_string(state).map_err(|e| StateError::Write {
                path: self.service_key(name).into(),
                reason: e.to_string(),
            })?;
            success.push(json!({ "request_put": { "key": key, "value": b64(&value) } }));
        }
        if success.is_empty() {
            return Ok(());
        }
        let v = self
            .call(
                "/v3/kv/txn",
                &json!({ "compare": compare, "success": success, "failure": [] }),
            )
            .await?;
        if v["succeeded"].as_bool() != Some(true) {
            // Another replica wrote first: refresh our view so the next attempt can succeed.
            let _ = self.load().await;
            return Err(StateError::Conflict(format!(
                "the state of {} was changed by another replica; re-read the status and retry",
                changed.join(", ")
            )));
        }
        let rev = num(&v["header"]["revision"]);
        if let Ok(mut r) = self.revisions.lock() {
            for name in changed {
                r.insert(name.clone(), rev);
            }
        }
        Ok(())
    }

    /// Records a key's revision seen through the watch.
    pub fn saw(&self, name: &str, rev: i64) {
        if let Ok(mut r) = self.revisions.lock() {
            let e = r.entry(name.to_string()).or_insert(0);
            if rev > *e {
                *e = rev;
            }
        }
    }

    /// Stores an event under `events/`, attached to a lease so the history expires.
    pub async fn put_event(&self, ev: &Event) -> Result<(), StateError> {
        let lease = self
            .call(
                "/v3/lease/grant",
                &json!({ "TTL": EVENT_TTL_SECS.to_string() }),
            )
            .await?;
        let id = lease["ID"].as_str().unwrap_or("0").to_string();
        let key = format!(
            "{}{}-{:08x}",
            self.events_prefix(),
            ev.time,
            fastrand::u32(..)
        );
        let value = serde_json::to_string(ev).unwrap_or_default();
        self.call(
            "/v3/kv/put",
            &json!({ "key": b64(&key), "value": b64(&value), "lease": id }),
        )
        .await?;
        Ok(())
    }

    /// The newest `limit` events of every replica, newest last.
    pub async fn events(&self, limit: usize) -> Result<Vec<Event>, StateError> {
        let prefix = self.events_prefix();
        let v = self
            .call(
                "/v3/kv/range",
                &json!({
                    "key": b64(&prefix), "range_end": prefix_end(&prefix),
                    "limit": limit.to_string(), "sort_order": "DESCEND", "sort_target": "KEY",
                }),
            )
            .await?;
        let mut out: Vec<Event> = v["kvs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|kv| serde_json::from_slice(&unb64(&kv["value"])?).ok())
            .collect();
        out.reverse();
        Ok(out)
    }

    /// Streams service changes after `revision` into `on_change` until the watch breaks.
    pub async fn watch(
        &self,
        revision: i64,
        mut on_change: impl FnMut(String, Option<ServiceState>, i64),
    ) -> Result<(), StateError> {
        let prefix = self.services_prefix();
        let body = json!({ "create_request": {
            "key": b64(&prefix), "range_end": prefix_end(&prefix),
            "start_revision": (revision + 1).to_string(),
        }});
        let base = self
            .endpoints
            .get(self.next.load(Ordering::Relaxed) % self.endpoints.len().max(1))
            .cloned()
            .ok_or_else(|| StateError::Unavailable("no etcd endpoints".to_string()))?;
        let req = http::Request::post(format!("{base}/v3/watch"))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| StateError::Unavailable(e.to_string()))?;
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| StateError::Unavailable("etcd watch: timed out".to_string()))?
            .map_err(|e| StateError::Unavailable(format!("etcd watch: {e}")))?;
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| StateError::Unavailable(format!("etcd watch: {e}")))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            buf.extend_from_slice(data);
            // The gateway streams one JSON object per message; split on complete objects.
            while let Some((msg, rest)) = split_json(&buf) {
                if let Ok(v) = serde_json::from_slice::<Value>(msg) {
                    if v.get("error").is_some() {
                        return Err(StateError::Unavailable(format!(
                            "etcd watch: {}",
                            v["error"]
                        )));
                    }
                    for ev in v["result"]["events"].as_array().into_iter().flatten() {
                        let kv = &ev["kv"];
                        let deleted = ev["type"].as_str() == Some("DELETE");
                        let Some(key) = unb64(&kv["key"]).and_then(|k| String::from_utf8(k).ok())
                        else {
                            continue;
                        };
                        let Some(name) = key.strip_prefix(&prefix) else {
                            continue;
                        };
                        let rev = num(&kv["mod_revision"]);
                        if deleted {
                            on_change(name.to_string(), None, rev);
                        } else if let Some((name, state, rev)) = self.parse_kv(kv) {
                            self.saw(&name, rev);
                            on_change(name, Some(state), rev);
                        }
                    }
                }
                let consumed = buf.len() - rest;
                buf.drain(..consumed);
            }
        }
        Err(StateError::Unavailable("etcd watch ended".to_string()))
    }
}

/// The first complete top-level JSON object in `buf` and how many bytes are left after it.
fn split_json(buf: &[u8]) -> Option<(&[u8], usize)> {
    let start = buf.iter().position(|b| *b == b'{')?;
    let mut depth = 0i32;
    let mut in_str = false;
    let mut escaped = false;
    for (i, &b) in buf.iter().enumerate().skip(start) {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some((&buf[start..=i], buf.len() - i - 1));
                }
            }
            _ => {}
        }
    }
    None
}

/// Keeps this replica's snapshot in step with etcd: a full read, then a watch from that
/// revision; on any break the state is marked degraded and the loop reconnects and resyncs.
pub async fn sync(app: Arc<crate::app::App>, store: Arc<EtcdStore>) {
    let mut backoff = Duration::from_millis(250);
    loop {
        if app.shutdown.is_cancelled() {
            return;
        }
        match store.load().await {
            Ok((states, revision)) => {
                if app.metrics.state_degraded.get() != 0 {
                    tracing::info!("etcd reachable again; state resynced");
                }
                app.metrics.state_degraded.set(0);
                app.apply_remote(states).await;
                backoff = Duration::from_millis(250);
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let watch = store.watch(revision, |name, state, _rev| {
                    if let Some(state) = state {
                        let _ = tx.send((name, state));
                    }
                });
                let apply = async {
                    while let Some((name, state)) = rx.recv().await {
                        app.apply_remote(HashMap::from([(name, state)])).await;
                    }
                };
                tokio::select! {
                    r = watch => {
                        if let Err(e) = r {
                            tracing::warn!(error = %e, "etcd watch broke; traffic continues on the last known colors");
                        }
                    }
                    _ = apply => {}
                    _ = app.shutdown.cancelled() => return,
                }
            }
            Err(e) => {
                if app.metrics.state_degraded.get() == 0 {
                    tracing::warn!(error = %e, "etcd unreachable: state degraded, flips refused, traffic continues on the last known colors");
                }
            }
        }
        app.metrics.state_degraded.set(1);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = app.shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end("/a/"), B64.encode("/a0"));
    }

    #[test]
    fn splits_streamed_objects() {
        let buf = br#"{"a":"}{"}{"b":1}{"c""#;
        let (first, rest) = split_json(buf).expect("one");
        assert_eq!(first, br#"{"a":"}{"}"#);
        let tail = &buf[buf.len() - rest..];
        let (second, rest2) = split_json(tail).expect("two");
        assert_eq!(second, br#"{"b":1}"#);
        assert!(split_json(&tail[tail.len() - rest2..]).is_none());
    }
}
