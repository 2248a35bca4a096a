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
//! A watch on `services/` delivers every other replica's change within one round trip, as a
//! [`Remote`] message on the channel the app drains ([`sync`] never calls the app); when etcd
//! cannot be reached, traffic keeps flowing on the last known colors, writes answer 503, and the
//! replica reconnects and resyncs by itself.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::http::client::hyper_client;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::state::event::Event;
use crate::state::{Backend, ServiceState, StateError};

const EVENT_TTL_SECS: u64 = 7 * 24 * 3600;
/// A granted event lease is reused this long (it lives `EVENT_TTL_SECS`).
const LEASE_REUSE: Duration = Duration::from_secs(3600);
/// Write ids of unknown outcomes remembered until the watch shows them.
const MAX_UNRESOLVED: usize = 64;

/// How the store talks to etcd: `[state] etcd_timeout`, `etcd_progress_interval`, and the
/// last-known-state cache file (`[state] path`).
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    pub timeout: Duration,
    pub progress_interval: Duration,
    pub cache: Option<PathBuf>,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            timeout: Duration::from_secs(2),
            progress_interval: Duration::from_secs(2),
            cache: None,
        }
    }
}

/// A service key as this replica last saw it in etcd.
#[derive(Clone, Debug)]
struct Seen {
    state: ServiceState,
    mod_revision: i64,
}

/// What became of a write.
#[derive(Debug)]
pub enum WriteOutcome {
    /// etcd committed it.
    Applied,
    /// etcd committed it, and another replica's write has replaced it since (found while
    /// settling a write whose answer did not come in time): the states read now. The change
    /// took effect (its events are stored with it); the live state is what was read.
    Overwritten(HashMap<String, ServiceState>),
    /// Another replica changed one of the keys first; these are the states read after losing
    /// (possibly fewer than the changed services when the read failed).
    Conflict(HashMap<String, ServiceState>),
    /// etcd did not commit it, and never will.
    NotApplied(String),
    /// etcd did not answer in time, and no later read could tell: the change may still be
    /// committed. The watch records its events if it ever shows up.
    Unknown(String),
}

/// A call that failed; `maybe_sent` when etcd may have received (and may commit) it.
#[derive(Debug)]
struct CallError {
    message: String,
    maybe_sent: bool,
    /// etcd answered an error about the lease (expired or revoked): grant a new one.
    lease_gone: bool,
}

/// What [`EtcdStore::settle_unresolved`] found of one write.
enum Settled {
    Committed,
    Never,
    /// etcd can never tell (why).
    Undecidable(String),
    /// Not yet (etcd did not answer, or the key is unchanged).
    NotYet,
}

/// What [`EtcdStore::reconcile`] needs to settle a write: its compares, the key its history is
/// read on, its events and its id.
struct Settle<'a> {
    compare: &'a [Value],
    probe: Option<(String, i64)>,
    events: &'a [Event],
    write_id: &'a str,
    /// An attempt of this write may have reached etcd (one timed out): only then can a lost
    /// compare or another replica's value hide our write, so only then is the history read.
    maybe_sent: bool,
}

impl From<CallError> for StateError {
    fn from(e: CallError) -> Self {
        StateError::Unavailable(e.message)
    }
}

/// Every stored service state as of one read.
pub struct Loaded {
    pub states: HashMap<String, ServiceState>,
    pub revision: i64,
    /// The write id stored with each service's value, when it has one.
    pub write_ids: HashMap<String, String>,
    /// Services whose key etcd holds with a value that is not a readable state: present, so
    /// not written back (a create would fail on every try); WARNed once per full read.
    pub unreadable: Vec<String>,
}

/// The outcome of [`EtcdStore::create_if_absent`] / [`EtcdStore::replace_write_back`].
#[derive(Debug)]
pub enum WriteBack {
    /// This replica's state was written.
    Written,
    /// etcd holds another state (another replica's, read in the same transaction): serve it.
    Held(ServiceState),
    /// etcd holds the key with a value that is not a state: present, so settled (not written
    /// back, left as it is: fix or delete it).
    Unreadable,
}

/// A service's value as etcd holds it: the state, its mod_revision and write id.
#[derive(Clone, Debug)]
pub struct Held {
    pub state: ServiceState,
    pub mod_revision: i64,
    pub write_id: Option<String>,
}

impl Held {
    /// Whether this is a missing key's write-back ([`WRITE_BACK`]) of a lower generation than
    /// `ours`: replaced with ours ([`EtcdStore::replace_write_back`]), never served, so a
    /// replica that missed a flip cannot undo it by writing back first.
    pub fn older_write_back(&self, ours: &ServiceState) -> bool {
        self.state.generation < ours.generation
            && self
                .write_id
                .as_deref()
                .is_some_and(|id| id.starts_with(WRITE_BACK))
    }
}

/// One message of the watch stream.
pub enum WatchMsg {
    /// A service key changed (None: deleted).
    Change {
        name: String,
        state: Option<ServiceState>,
        write_id: Option<String>,
    },
}

/// Why a watch ended without a transport error: etcd asked for a resync.
#[derive(Debug)]
pub enum WatchEnd {
    /// `canceled`, or the start revision was compacted away.
    Resync(String),
}

pub struct EtcdStore {
    endpoints: Vec<String>,
    prefix: String,
    client: Client<HttpConnector, Full<Bytes>>,
    options: EtcdOptions,
    seen: Mutex<HashMap<String, Seen>>,
    /// Service keys whose value is not a readable state, at the mod_revision seen: not lag
    /// ([`EtcdStore::lagging`]), and not missing either (never written back).
    unreadable: Mutex<HashMap<String, i64>>,
    next: AtomicUsize,
    lease: Mutex<Option<(String, Instant)>>,
    /// Write id -> the events of a write whose outcome is unknown.
    unresolved: Mutex<HashMap<String, Vec<Event>>>,
    /// Write id -> the key and revision its history is read on (see [`EtcdStore::committed`]),
    /// for writes whose outcome is unknown.
    probes: Mutex<HashMap<String, (String, i64)>>,
    /// The last full read ([`EtcdStore::load`]) got an answer: false until one does, so a
    /// replica that started from its cache (etcd did not answer at startup) is degraded from
    /// its first moment ([`sync`]), not only once its next read has timed out too.
    loaded: AtomicBool,
    /// Services whose key, read back by the last write that lost its compare, held an earlier
    /// write of this replica whose outcome was unknown (it took effect): see
    /// [`EtcdStore::lost_to_own_write`].
    lost_to_own: Mutex<Vec<String>>,
    /// The last [`MAX_UNRESOLVED`] writes of this replica whose unknown outcome a read or the
    /// watch resolved as committed: a later write that loses its compare to one of them lost
    /// to this replica's own earlier write, not to another replica's, even when the watch
    /// resolved it first.
    resolved_own: Mutex<std::collections::VecDeque<String>>,
    /// Events of resolved writes whose sending to the app failed (the receiving task was gone,
    /// being started again after a panic): sent first by the next [`sync`] run, not lost.
    unsent: Mutex<Vec<Event>>,
    /// Events are stored one after another in the order they were recorded (tickets taken by
    /// [`EtcdStore::event_ticket`], served by [`EtcdStore::put_event_in_order`]): two of the
    /// same millisecond are then listed as they happened (by create revision), not as their
    /// writes raced.
    event_tickets: AtomicU64,
    event_turn: tokio::sync::watch::Sender<u64>,
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

/// A fresh id that names one write (and its events) unambiguously.
pub fn new_write_id() -> String {
    format!("{:08x}-{:016x}", std::process::id(), fastrand::u64(..))
}

/// The prefix of the write id of a missing key's write-back ([`EtcdStore::create_if_absent`]):
/// one of a lower generation than a replica's own is replaced, not served.
pub const WRITE_BACK: &str = "write-back-";

/// A service state as stored in etcd: its JSON with the id of the write that stored it.
fn stored_value(state: &ServiceState, write_id: &str) -> String {
    let mut v = serde_json::to_value(state).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.insert("write_id".to_string(), Value::String(write_id.to_string()));
    }
    v.to_string()
}

impl EtcdStore {
    #[cfg(test)]
    pub fn new(endpoints: &[String], prefix: &str) -> Arc<EtcdStore> {
        Self::with_options(endpoints, prefix, EtcdOptions::default())
    }

    pub fn with_options(
        endpoints: &[String],
        prefix: &str,
        options: EtcdOptions,
    ) -> Arc<EtcdStore> {
        let connect_timeout = options.timeout.min(Duration::from_secs(1));
        Arc::new(EtcdStore {
            endpoints: endpoints
                .iter()
                .map(|e| e.trim_end_matches('/').to_string())
                .collect(),
            prefix: prefix.to_string(),
            client: hyper_client(connect_timeout, Duration::from_secs(30), None, false),
            options,
            seen: Mutex::new(HashMap::new()),
            unreadable: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(0),
            lease: Mutex::new(None),
            unresolved: Mutex::new(HashMap::new()),
            probes: Mutex::new(HashMap::new()),
            loaded: AtomicBool::new(false),
            lost_to_own: Mutex::new(Vec::new()),
            resolved_own: Mutex::new(std::collections::VecDeque::new()),
            unsent: Mutex::new(Vec::new()),
            event_tickets: AtomicU64::new(0),
            event_turn: tokio::sync::watch::Sender::new(0),
        })
    }

    pub fn options(&self) -> &EtcdOptions {
        &self.options
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
    async fn call(&self, path: &str, body: &Value) -> Result<Value, CallError> {
        Ok(self.call_noting(path, body).await?.0)
    }

    /// [`Self::call`], and whether an endpoint tried before the one that answered may have
    /// received the request (it did not answer in time).
    async fn call_noting(&self, path: &str, body: &Value) -> Result<(Value, bool), CallError> {
        let n = self.endpoints.len().max(1);
        let start = self.next.load(Ordering::Relaxed);
        let mut last_err = String::from("no etcd endpoints configured");
        let mut maybe_sent = false;
        let mut lease_gone = false;
        for i in 0..n {
            let idx = (start + i) % n;
            let Some(base) = self.endpoints.get(idx) else {
                break;
            };
            match self.post(&format!("{base}{path}"), body).await {
                Ok(v) => {
                    self.next.store(idx, Ordering::Relaxed);
                    return Ok((v, maybe_sent));
                }
                Err(e) => {
                    maybe_sent |= e.maybe_sent;
                    lease_gone = e.lease_gone;
                    last_err = format!("{base}: {}", e.message);
                }
            }
        }
        Err(CallError {
            message: format!("etcd unreachable ({last_err})"),
            maybe_sent,
            lease_gone,
        })
    }

    async fn post(&self, url: &str, body: &Value) -> Result<Value, CallError> {
        let sent = |message: String| CallError {
            message,
            maybe_sent: true,
            lease_gone: false,
        };
        let req = http::Request::post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| CallError {
                message: e.to_string(),
                maybe_sent: false,
                lease_gone: false,
            })?;
        let timeout = self.options.timeout;
        let resp = match tokio::time::timeout(timeout, self.client.request(req)).await {
            Err(_) => return Err(sent(format!("no answer within {timeout:?}"))),
            Ok(Err(e)) => {
                return Err(CallError {
                    message: e.to_string(),
                    // A refused or failed connect never carried the request.
                    maybe_sent: !e.is_connect(),
                    lease_gone: false,
                });
            }
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        let bytes = tokio::time::timeout(timeout, resp.into_body().collect())
            .await
            .map_err(|_| sent(format!("no answer within {timeout:?}")))?
            .map_err(|e| sent(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let answer = String::from_utf8_lossy(&bytes);
            return Err(CallError {
                // etcd's "requested lease not found".
                lease_gone: answer.contains("lease"),
                ..sent(format!("answered {status}: {}", answer.trim()))
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| sent(format!("invalid answer: {e}")))
    }

    /// Every stored service state, and the store revision it was read at.
    pub async fn load(&self) -> Result<Loaded, StateError> {
        let prefix = self.services_prefix();
        let v = self
            .call(
                "/v3/kv/range",
                &json!({ "key": b64(&prefix), "range_end": prefix_end(&prefix) }),
            )
            .await;
        self.loaded.store(v.is_ok(), Ordering::Relaxed);
        let v = v?;
        let revision = num(&v["header"]["revision"]);
        let mut states = HashMap::new();
        let mut write_ids = HashMap::new();
        let mut seen = HashMap::new();
        let mut unreadable = HashMap::new();
        for kv in v["kvs"].as_array().into_iter().flatten() {
            let Some((name, parsed)) = self.parse_kv_named(kv) else {
                continue;
            };
            let Some((state, rev, id)) = parsed else {
                unreadable.insert(name, num(&kv["mod_revision"]));
                continue;
            };
            {
                seen.insert(
                    name.clone(),
                    Seen {
                        state: state.clone(),
                        mod_revision: rev,
                    },
                );
                if let Some(id) = id {
                    write_ids.insert(name.clone(), id);
                }
                states.insert(name, state);
            }
        }
        if let Ok(mut s) = self.seen.lock() {
            *s = seen;
        }
        let mut names: Vec<String> = unreadable.keys().cloned().collect();
        names.sort();
        if let Ok(mut u) = self.unreadable.lock() {
            *u = unreadable;
        }
        Ok(Loaded {
            states,
            revision,
            write_ids,
            unreadable: names,
        })
    }

    /// Every stored service state, read now (linearizable), for a replica that must not answer
    /// from a view its watch may not have brought up to date. Unlike [`EtcdStore::load`] it
    /// runs beside the watch, so what it read is merged into the revisions seen (newer wins)
    /// rather than replacing them: a watch event that came in meanwhile is not undone.
    /// A read that gets no answer is tried again (up to three in all): the pooled connection
    /// it went out on may be the silent one, and the next goes out on a fresh connection.
    pub async fn read_current(&self) -> Result<HashMap<String, ServiceState>, StateError> {
        Ok(self
            .read_current_held()
            .await?
            .into_iter()
            .map(|(name, h)| (name, h.state))
            .collect())
    }

    /// [`EtcdStore::read_current`] with each value's mod_revision and write id.
    pub async fn read_current_held(&self) -> Result<HashMap<String, Held>, StateError> {
        let prefix = self.services_prefix();
        let body = json!({ "key": b64(&prefix), "range_end": prefix_end(&prefix) });
        let mut tries = 0;
        let v = loop {
            tries += 1;
            match self.call("/v3/kv/range", &body).await {
                Ok(v) => break v,
                Err(e) if e.maybe_sent && tries < 3 => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let mut states = HashMap::new();
        for kv in v["kvs"].as_array().into_iter().flatten() {
            match self.parse_kv_named(kv) {
                Some((name, Some((state, rev, write_id)))) => {
                    self.saw(&name, &state, rev);
                    states.insert(
                        name,
                        Held {
                            state,
                            mod_revision: rev,
                            write_id,
                        },
                    );
                }
                Some((name, None)) => self.saw_unreadable(&name, num(&kv["mod_revision"])),
                None => {}
            }
        }
        Ok(states)
    }

    /// `read` (from [`EtcdStore::read_current`]), each state replaced by the newest one seen for
    /// its service. Called under the writer lock, just before applying: a watch event that came
    /// in after etcd served the read (a pause elsewhere, which keeps the generation) is newer,
    /// and applying the read after it would undo it here, and this replica's next write would
    /// carry the undone state back to etcd.
    pub fn newest_seen(
        &self,
        mut read: HashMap<String, ServiceState>,
    ) -> HashMap<String, ServiceState> {
        if let Ok(seen) = self.seen.lock() {
            for (name, state) in read.iter_mut() {
                if let Some(e) = seen.get(name) {
                    *state = e.state.clone();
                }
            }
        }
        read
    }

    /// Writes `state` to the service's key only if etcd holds no such key (create revision 0,
    /// one transaction): `None` when this wrote it, else the state etcd holds (another
    /// replica's, read in the same transaction). The highest generation wins: when what etcd
    /// holds is another replica's write-back (its write id starts with [`WRITE_BACK`]) of a
    /// lower generation, it is replaced with `state` by a compare-and-swap on its mod_revision
    /// (a few tries), so a replica that missed a flip cannot undo it by writing back first. A
    /// lower generation written otherwise (by hand) is served, as before.
    pub async fn create_if_absent(
        &self,
        name: &str,
        state: &ServiceState,
    ) -> Result<WriteBack, StateError> {
        let key = b64(&self.service_key(name));
        let compare =
            json!({ "key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0" });
        self.write_back(name, state, compare).await
    }

    /// Replaces another replica's write-back of a lower generation ([`Held::older_write_back`],
    /// found by a full read rather than by a create) with `state`, by a compare-and-swap on its
    /// `mod_revision`; answered as [`EtcdStore::create_if_absent`] is.
    pub async fn replace_write_back(
        &self,
        name: &str,
        state: &ServiceState,
        mod_revision: i64,
    ) -> Result<WriteBack, StateError> {
        let key = b64(&self.service_key(name));
        let compare = json!({ "key": key, "target": "MOD", "result": "EQUAL", "mod_revision": mod_revision.to_string() });
        self.write_back(name, state, compare).await
    }

    /// The write of [`EtcdStore::create_if_absent`] and [`EtcdStore::replace_write_back`],
    /// starting with `compare`.
    async fn write_back(
        &self,
        name: &str,
        state: &ServiceState,
        mut compare: Value,
    ) -> Result<WriteBack, StateError> {
        let key = b64(&self.service_key(name));
        let value = b64(&stored_value(
            state,
            &format!("{WRITE_BACK}{}", new_write_id()),
        ));
        for _ in 0..4 {
            let txn = json!({
                "compare": [compare],
                "success": [{ "request_put": { "key": key, "value": value } }],
                "failure": [{ "request_range": { "key": key } }],
            });
            let v = self.call("/v3/kv/txn", &txn).await?;
            if v["succeeded"].as_bool() == Some(true) {
                self.saw(name, state, num(&v["header"]["revision"]));
                return Ok(WriteBack::Written);
            }
            let kv = &v["responses"][0]["response_range"]["kvs"][0];
            if kv.is_null() {
                // Deleted again since: create it again.
                compare = json!({ "key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0" });
                continue;
            }
            let Some((_, held, rev, write_id)) = self.parse_kv(kv) else {
                // Present: a create would fail on every try. Settled, left as it is.
                self.saw_unreadable(name, num(&kv["mod_revision"]));
                return Ok(WriteBack::Unreadable);
            };
            let older_write_back = Held {
                state: held.clone(),
                mod_revision: rev,
                write_id,
            }
            .older_write_back(state);
            self.saw(name, &held, rev);
            if !older_write_back {
                return Ok(WriteBack::Held(held));
            }
            tracing::warn!(
                service = %name,
                held_active = %held.active,
                held_generation = held.generation,
                generation = state.generation,
                "another replica wrote the missing key back with an older generation; replacing it with this replica's newer state"
            );
            compare = json!({ "key": key, "target": "MOD", "result": "EQUAL", "mod_revision": rev.to_string() });
        }
        Err(StateError::Unavailable(
            "the key kept changing while being written back".to_string(),
        ))
    }

    /// (service name, state, mod_revision, write id) of a `services/<name>` key-value.
    fn parse_kv(&self, kv: &Value) -> Option<(String, ServiceState, i64, Option<String>)> {
        let (name, parsed) = self.parse_kv_named(kv)?;
        let (state, rev, write_id) = parsed?;
        Some((name, state, rev, write_id))
    }

    /// [`EtcdStore::parse_kv`], naming the service also when its value is not a readable
    /// state (`Some((name, None))`, WARNed); `None` for a key outside `services/`.
    #[allow(clippy::type_complexity)]
    fn parse_kv_named(
        &self,
        kv: &Value,
    ) -> Option<(String, Option<(ServiceState, i64, Option<String>)>)> {
        let key = String::from_utf8(unb64(&kv["key"])?).ok()?;
        let name = key.strip_prefix(&self.services_prefix())?.to_string();
        let value = unb64(&kv["value"]).unwrap_or_default();
        let write_id = serde_json::from_slice::<Value>(&value)
            .ok()
            .and_then(|v| v["write_id"].as_str().map(str::to_string));
        match serde_json::from_slice::<ServiceState>(&value) {
            Ok(state) => Some((name, Some((state, num(&kv["mod_revision"]), write_id)))),
            Err(e) => {
                tracing::warn!(key = %key, error = %e, "ignoring an unreadable service state in etcd (the key is kept as it is, not written back; fix or delete it)");
                Some((name, None))
            }
        }
    }

    /// The services whose key etcd held with a value that is not a state at the last full read
    /// (or since, through the watch or a write-back).
    pub fn unreadable_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .unreadable
            .lock()
            .map(|u| u.keys().cloned().collect())
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Records a key whose value is not a readable state, at `rev` (newer revisions win).
    /// The state this replica last saw etcd hold for `name` (a read, a write, the watch), of a
    /// service the running config has or not.
    pub fn seen_state(&self, name: &str) -> Option<ServiceState> {
        self.seen
            .lock()
            .ok()
            .and_then(|s| s.get(name).map(|e| e.state.clone()))
    }

    fn saw_unreadable(&self, name: &str, rev: i64) {
        if let Ok(mut u) = self.unreadable.lock() {
            let e = u.entry(name.to_string()).or_insert(rev);
            *e = (*e).max(rev);
        }
    }

    /// Records a key seen through the watch or a write (newer revisions win).
    fn saw(&self, name: &str, state: &ServiceState, rev: i64) {
        if let Ok(mut s) = self.seen.lock() {
            let newer = s.get(name).map(|e| rev > e.mod_revision).unwrap_or(true);
            if newer {
                s.insert(
                    name.to_string(),
                    Seen {
                        state: state.clone(),
                        mod_revision: rev,
                    },
                );
            }
        }
    }

    /// The id of the lease events are attached to (granted at most once an hour).
    async fn event_lease(&self) -> Result<String, CallError> {
        if let Ok(l) = self.lease.lock() {
            if let Some((id, at)) = l.as_ref() {
                if at.elapsed() < LEASE_REUSE {
                    return Ok(id.clone());
                }
            }
        }
        let lease = self
            .call(
                "/v3/lease/grant",
                &json!({ "TTL": EVENT_TTL_SECS.to_string() }),
            )
            .await?;
        let id = lease["ID"].as_str().unwrap_or("0").to_string();
        if let Ok(mut l) = self.lease.lock() {
            *l = Some((id.clone(), Instant::now()));
        }
        Ok(id)
    }

    fn forget_lease(&self) {
        if let Ok(mut l) = self.lease.lock() {
            *l = None;
        }
    }

    /// Writes the changed services and their events in one transaction that succeeds only if
    /// none of the services changed since this replica's snapshot was built from etcd.
    ///
    /// The compare is on each key's `mod_revision` as this replica last saw it, and only when
    /// that is also the state the snapshot holds (`previous`): a replica whose snapshot has not
    /// caught up with another replica's write loses, even if it has seen the revision go by.
    ///
    /// The values carry `write_id`, so a write whose answer does not come in time is
    /// reconciled: a fence transaction with the same compares either wins (the write can
    /// never commit any more: not applied) or loses, and then the keys it reads back say
    /// whether this write or another replica's committed.
    pub async fn write(
        &self,
        changes: &[(String, ServiceState)],
        previous: &HashMap<String, ServiceState>,
        events: &[Event],
        write_id: &str,
    ) -> WriteOutcome {
        if changes.is_empty() {
            return WriteOutcome::Applied;
        }
        if let Ok(mut o) = self.lost_to_own.lock() {
            o.clear();
        }
        let seen = self.seen.lock().map(|s| s.clone()).unwrap_or_default();
        let mut compare = Vec::new();
        let mut stale = HashMap::new();
        // The first changed key and the revision it is compared at (0: must not exist): the
        // first write of that key after it is this one exactly when this write committed.
        let mut probe = None;
        for (name, _) in changes {
            let key = b64(&self.service_key(name));
            match seen.get(name) {
                Some(s) if s.mod_revision > 0 => {
                    if previous.get(name) != Some(&s.state) {
                        stale.insert(name.clone(), s.state.clone());
                    }
                    probe.get_or_insert((self.service_key(name), s.mod_revision));
                    compare.push(json!({ "key": key, "target": "MOD", "result": "EQUAL", "mod_revision": s.mod_revision.to_string() }));
                }
                _ => {
                    probe.get_or_insert((self.service_key(name), 0));
                    compare.push(json!({ "key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0" }))
                }
            }
        }
        let mut settle = Settle {
            compare: &compare,
            probe,
            events,
            write_id,
            maybe_sent: false,
        };
        if !stale.is_empty() {
            // The watch already delivered a newer state that the snapshot has not applied yet.
            return WriteOutcome::Conflict(stale);
        }
        let txn = |lease: Option<&str>| {
            let mut success: Vec<Value> = changes
                .iter()
                .map(|(name, state)| {
                    json!({ "request_put": {
                        "key": b64(&self.service_key(name)),
                        "value": b64(&stored_value(state, write_id)),
                    }})
                })
                .collect();
            for (i, ev) in events.iter().enumerate() {
                let key = format!("{}{}-{write_id}-{i}", self.events_prefix(), ev.time);
                let value = serde_json::to_string(ev).unwrap_or_default();
                success.push(json!({ "request_put": { "key": b64(&key), "value": b64(&value), "lease": lease }}));
            }
            json!({ "compare": compare, "success": success, "failure": [] })
        };
        let lease = if events.is_empty() {
            None
        } else {
            match self.event_lease().await {
                Ok(l) => Some(l),
                Err(e) => {
                    return WriteOutcome::NotApplied(format!(
                        "cannot get an event lease ({}); the change was not applied",
                        e.message
                    ))
                }
            }
        };
        let mut answer = self.call_noting("/v3/kv/txn", &txn(lease.as_deref())).await;
        if matches!(&answer, Err(e) if e.lease_gone) && lease.is_some() {
            // The event lease this replica kept is gone (revoked, or etcd restored from a
            // backup older than it): etcd refused the whole transaction, so it is sent again
            // once with a new lease, same compares and write id (an earlier attempt that did
            // commit makes this one lose the compare, and the read-back finds it).
            self.forget_lease();
            if let Ok(l) = self.event_lease().await {
                answer = self.call_noting("/v3/kv/txn", &txn(Some(&l))).await;
            }
        }
        let outcome = match answer {
            Ok((v, _)) if v["succeeded"].as_bool() == Some(true) => {
                let rev = num(&v["header"]["revision"]);
                for (name, state) in changes {
                    self.saw(name, state, rev);
                }
                WriteOutcome::Applied
            }
            // Lost the compare. An earlier attempt on another endpoint may have been ours.
            Ok((_, earlier)) => {
                settle.maybe_sent = earlier;
                self.reconcile(changes, previous, &settle).await
            }
            Err(e) if !e.maybe_sent => {
                WriteOutcome::NotApplied(format!("{}; the change was not applied", e.message))
            }
            Err(e) => {
                if e.lease_gone {
                    self.forget_lease();
                }
                tracing::warn!(error = %e.message, write_id, "etcd did not answer a write in time; reading back what happened");
                settle.maybe_sent = true;
                self.reconcile(changes, previous, &settle).await
            }
        };
        if let (WriteOutcome::Unknown(_), Some(probe)) = (&outcome, settle.probe) {
            if let Ok(mut p) = self.probes.lock() {
                if p.len() >= MAX_UNRESOLVED {
                    p.clear();
                }
                p.insert(write_id.to_string(), probe);
            }
        }
        outcome
    }

    /// Finds out what became of write `write_id`: a fence transaction with the same compares
    /// that rewrites the previous states. If it wins, the write can never commit; if it loses,
    /// the keys it reads back tell whose write committed, and when they hold another replica's
    /// write, etcd's history of the key says whether that write replaced ours (applied, then
    /// overwritten) or beat it (never committed). Retried for 3 timeouts.
    async fn reconcile(
        &self,
        changes: &[(String, ServiceState)],
        previous: &HashMap<String, ServiceState>,
        settle: &Settle<'_>,
    ) -> WriteOutcome {
        let (compare, write_id) = (settle.compare, settle.write_id);
        let fence_id = format!("fence-{write_id}");
        let success: Vec<Value> = changes
            .iter()
            .filter_map(|(name, _)| {
                let prev = previous.get(name)?;
                Some(json!({ "request_put": {
                    "key": b64(&self.service_key(name)),
                    "value": b64(&stored_value(prev, &fence_id)),
                }}))
            })
            .collect();
        let failure: Vec<Value> = changes
            .iter()
            .map(|(name, _)| json!({ "request_range": { "key": b64(&self.service_key(name)) } }))
            .collect();
        let txn = json!({ "compare": compare, "success": success, "failure": failure });
        let deadline = Instant::now() + self.options.timeout * 3;
        let mut last;
        loop {
            match self.call("/v3/kv/txn", &txn).await {
                Ok(v) if v["succeeded"].as_bool() == Some(true) => {
                    let rev = num(&v["header"]["revision"]);
                    for (name, _) in changes {
                        if let Some(prev) = previous.get(name) {
                            self.saw(name, prev, rev);
                        }
                    }
                    return WriteOutcome::NotApplied(
                        "etcd did not answer in time; the state was re-read and the change was not applied".to_string(),
                    );
                }
                Ok(v) => {
                    let mut read = HashMap::new();
                    let mut ours = false;
                    let mut fenced = false;
                    let mut own = Vec::new();
                    for r in v["responses"].as_array().into_iter().flatten() {
                        for kv in r["response_range"]["kvs"].as_array().into_iter().flatten() {
                            if let Some((name, state, rev, id)) = self.parse_kv(kv) {
                                ours |= id.as_deref() == Some(write_id);
                                fenced |= id.as_deref() == Some(fence_id.as_str());
                                if id.as_deref().is_some_and(|id| self.is_own_unknown(id)) {
                                    own.push(name.clone());
                                }
                                self.saw(&name, &state, rev);
                                read.insert(name, state);
                            }
                        }
                    }
                    if ours {
                        return WriteOutcome::Applied;
                    }
                    if fenced {
                        return WriteOutcome::NotApplied(
                            "etcd did not answer in time; the state was re-read and the change was not applied".to_string(),
                        );
                    }
                    // Another replica's write is there now: it either beat ours (ours can
                    // never commit: its compare no longer holds) or replaced it.
                    match self.committed(settle, deadline).await {
                        Ok(true) => {
                            tracing::info!(write_id, "a write whose answer was late took effect and was overwritten since by another replica's");
                            return WriteOutcome::Overwritten(read);
                        }
                        Ok(false) => {
                            if let Ok(mut o) = self.lost_to_own.lock() {
                                *o = own;
                            }
                            return WriteOutcome::Conflict(read);
                        }
                        Err(e) => last = e.message,
                    }
                }
                Err(e) => last = e.message,
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        WriteOutcome::Unknown(format!(
            "outcome unknown: etcd did not answer the write or the read-back within {:?} ({last}); \
             the state will be re-read when etcd answers, and the event recorded if the change took effect",
            self.options.timeout * 4
        ))
    }

    /// Remembers the events of a write whose outcome is unknown, so the watch can record them
    /// if the write shows up.
    pub fn remember_unresolved(&self, write_id: &str, events: Vec<Event>) {
        if let Ok(mut u) = self.unresolved.lock() {
            if u.len() >= MAX_UNRESOLVED {
                u.clear();
            }
            u.insert(write_id.to_string(), events);
        }
    }

    /// Whether `write_id` is a write of this replica whose outcome is unknown, or was until a
    /// read or the watch showed it committed (recently: [`MAX_UNRESOLVED`] of them).
    fn is_own_unknown(&self, write_id: &str) -> bool {
        self.unresolved
            .lock()
            .is_ok_and(|u| u.contains_key(write_id))
            || self
                .resolved_own
                .lock()
                .is_ok_and(|r| r.iter().any(|id| id == write_id))
    }

    /// Whether the last write that lost its compare ([`WriteOutcome::Conflict`]) lost, for
    /// service `name`, to an earlier write of this replica whose outcome was unknown (it took
    /// effect; its events are recorded when the watch or a full read shows it), not to
    /// another replica's.
    pub fn lost_to_own_write(&self, name: &str) -> bool {
        self.lost_to_own
            .lock()
            .is_ok_and(|o| o.iter().any(|n| n == name))
    }

    /// The events of an unknown-outcome write that a read or the watch just showed committed.
    pub fn take_unresolved(&self, write_id: &str) -> Option<Vec<Event>> {
        if let Ok(mut p) = self.probes.lock() {
            p.remove(write_id);
        }
        // Known as resolved before it stops being unresolved: a compare lost meanwhile sees
        // it as this replica's either way.
        let mut unresolved = self.unresolved.lock().ok()?;
        if !unresolved.contains_key(write_id) {
            return None;
        }
        if let Ok(mut r) = self.resolved_own.lock() {
            if r.len() >= MAX_UNRESOLVED {
                r.pop_front();
            }
            r.push_back(write_id.to_string());
        }
        unresolved.remove(write_id)
    }

    /// Sends the events of resolved writes to the app; kept for the next [`sync`] run when
    /// the app's side is gone (they were taken from [`EtcdStore::take_unresolved`] already).
    fn send_resolved(&self, to_app: &tokio::sync::mpsc::UnboundedSender<Remote>, evs: Vec<Event>) {
        if let Err(tokio::sync::mpsc::error::SendError(Remote::Resolved(evs))) =
            to_app.send(Remote::Resolved(evs))
        {
            if let Ok(mut u) = self.unsent.lock() {
                u.extend(evs);
            }
        }
    }

    /// Settles the unknown-outcome writes a full read did not show (another replica's write may
    /// have replaced one since, while this replica's watch was down): etcd's history says
    /// whether each committed (its events are returned, to be recorded) or never can (it is
    /// forgotten). Those etcd cannot decide yet stay for the next read or the watch; those it
    /// never can (the history was compacted and the write left no event, or the key was deleted
    /// since) are dropped with a warning. Bounded by `budget` as a whole: the rest waits for the
    /// next resync.
    pub async fn settle_unresolved(&self, budget: Duration) -> Vec<Event> {
        let pending: Vec<(String, (String, i64))> = {
            let (Ok(u), Ok(p)) = (self.unresolved.lock(), self.probes.lock()) else {
                return Vec::new();
            };
            u.keys()
                .filter_map(|id| p.get(id).map(|probe| (id.clone(), probe.clone())))
                .collect()
        };
        let deadline = Instant::now() + budget;
        let mut settled = Vec::new();
        for (id, (key, after)) in pending {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let Ok(found) =
                tokio::time::timeout(left, self.settle_one(&id, &key, after, deadline)).await
            else {
                break;
            };
            match found {
                Settled::Committed => {
                    let events = self.take_unresolved(&id).unwrap_or_default();
                    tracing::info!(write_id = %id, "a write whose outcome was unknown took effect (replaced since by another write)");
                    settled.extend(events);
                }
                Settled::Never => {
                    self.take_unresolved(&id);
                    tracing::info!(write_id = %id, "a write whose outcome was unknown never took effect");
                }
                Settled::Undecidable(why) => {
                    self.take_unresolved(&id);
                    tracing::warn!(write_id = %id, key = %key, "whether a write whose outcome was unknown took effect can no longer be told ({why}); forgotten: check the service's state");
                }
                Settled::NotYet => {}
            }
        }
        settled
    }

    /// What etcd says of one unknown-outcome write (see [`EtcdStore::settle_unresolved`]).
    async fn settle_one(&self, id: &str, key: &str, after: i64, deadline: Instant) -> Settled {
        match self.first_write_after(key, after, deadline).await {
            Ok(Some((first, _))) if first == id => Settled::Committed,
            Ok(Some(_)) => Settled::Never,
            Ok(None) => match self.kv_at(key, None).await {
                // Deleted since the compared revision: the compare can never pass again, and
                // the history of a deleted key is not searched.
                Ok(None) if after > 0 => {
                    Settled::Undecidable("the key was deleted since".to_string())
                }
                _ => Settled::NotYet,
            },
            Err(e) if e.message.contains("compacted") => {
                // The write's first event key is stored in the same transaction.
                let event = self.unresolved.lock().ok().and_then(|u| {
                    u.get(id).and_then(|evs| {
                        evs.first()
                            .map(|ev| format!("{}{}-{}-0", self.events_prefix(), ev.time, id))
                    })
                });
                let Some(event) = event else {
                    return Settled::Undecidable(e.message);
                };
                match self.kv_at(&event, None).await {
                    Ok(Some(_)) => Settled::Committed,
                    Ok(None) => Settled::Never,
                    Err(_) => Settled::NotYet,
                }
            }
            Err(_) => Settled::NotYet,
        }
    }

    /// Whether write `settle.write_id` committed, when the keys it changed now hold another
    /// write: the first write of the probed key after the revision the transaction compared is
    /// ours exactly when it committed. When etcd's history no longer reaches back (compacted),
    /// the write's first event key says it (stored in the same transaction, kept for 7 days).
    async fn committed(&self, settle: &Settle<'_>, deadline: Instant) -> Result<bool, CallError> {
        let Some((key, after)) = settle.probe.as_ref().filter(|_| settle.maybe_sent) else {
            // Never sent before this attempt, whose compare failed: not ours.
            return Ok(false);
        };
        match self.first_write_after(key, *after, deadline).await {
            Ok(first) => Ok(first.is_some_and(|(id, _)| id == settle.write_id)),
            Err(e) => {
                let Some(ev) = settle.events.first() else {
                    return Err(e);
                };
                tracing::debug!(error = %e.message, "etcd history unavailable; looking for the write's event");
                let key = format!("{}{}-{}-0", self.events_prefix(), ev.time, settle.write_id);
                Ok(self.kv_at(&key, None).await?.is_some())
            }
        }
    }

    /// The key-value of `key` as of `revision` (None: now); None when it did not exist then.
    async fn kv_at(&self, key: &str, revision: Option<i64>) -> Result<Option<Value>, CallError> {
        let mut body = json!({ "key": b64(key) });
        if let Some(r) = revision {
            body["revision"] = json!(r.to_string());
        }
        let v = self.call("/v3/kv/range", &body).await?;
        Ok(v["kvs"].as_array().and_then(|a| a.first()).cloned())
    }

    /// The first write of `key` after revision `after` (the key's mod_revision when a
    /// transaction compared it; 0: compared as absent), from etcd's history: the write id stored
    /// with it ("" for a value without one, or a delete) and its revision. None when the key has
    /// not been written since. A binary search over revisions: a range read at revision r gives
    /// the last write at or before r. Gives up (an error) at `deadline`.
    async fn first_write_after(
        &self,
        key: &str,
        after: i64,
        deadline: Instant,
    ) -> Result<Option<(String, i64)>, CallError> {
        fn id_of(kv: &Value) -> String {
            unb64(&kv["value"])
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .and_then(|v| v["write_id"].as_str().map(str::to_string))
                .unwrap_or_default()
        }
        let Some(now) = self.kv_at(key, None).await? else {
            // Deleted since (or never written): not by a write of ours.
            return Ok(None);
        };
        let now_rev = num(&now["mod_revision"]);
        if now_rev <= after {
            return Ok(None);
        }
        if after == 0 {
            // Compared as absent: the first write is the one that created the key.
            let created = num(&now["create_revision"]);
            if created == now_rev {
                return Ok(Some((id_of(&now), now_rev)));
            }
            let first = self.kv_at(key, Some(created)).await?;
            return Ok(Some((
                first.as_ref().map(id_of).unwrap_or_default(),
                created,
            )));
        }
        // The first write after `after` is in [lo, hi]; `known` is the key as of `hi`.
        let (mut lo, mut hi, mut known) = (after + 1, now_rev, Some(now));
        while lo < hi {
            if Instant::now() >= deadline {
                return Err(CallError {
                    message: "etcd's history was not read in time".to_string(),
                    maybe_sent: false,
                    lease_gone: false,
                });
            }
            let mid = lo + (hi - lo) / 2;
            match self.kv_at(key, Some(mid)).await? {
                Some(kv) if num(&kv["mod_revision"]) > after => {
                    hi = num(&kv["mod_revision"]);
                    known = Some(kv);
                }
                Some(_) => lo = mid + 1,
                // Deleted in (after, mid]: the first change is at or before mid.
                None => {
                    hi = mid;
                    known = None;
                }
            }
        }
        let first = match known {
            Some(kv) => Some(kv),
            None => self.kv_at(key, Some(hi)).await?,
        };
        Ok(Some((
            first
                .filter(|kv| num(&kv["mod_revision"]) == hi)
                .as_ref()
                .map(id_of)
                .unwrap_or_default(),
            hi,
        )))
    }

    /// Whether etcd's service keys are newer than what this replica has seen: Ok(true) when the
    /// watch lags behind etcd.
    pub async fn lagging(&self) -> Result<bool, StateError> {
        let prefix = self.services_prefix();
        let v = self
            .call(
                "/v3/kv/range",
                &json!({ "key": b64(&prefix), "range_end": prefix_end(&prefix), "keys_only": true }),
            )
            .await?;
        let seen = self.seen.lock().map(|s| s.clone()).unwrap_or_default();
        let unreadable = self
            .unreadable
            .lock()
            .map(|u| u.clone())
            .unwrap_or_default();
        for kv in v["kvs"].as_array().into_iter().flatten() {
            let Some(key) = unb64(&kv["key"]).and_then(|k| String::from_utf8(k).ok()) else {
                continue;
            };
            let Some(name) = key.strip_prefix(&prefix) else {
                continue;
            };
            let rev = num(&kv["mod_revision"]);
            let had = seen.get(name).map(|s| s.mod_revision).unwrap_or(0);
            if had.max(unreadable.get(name).copied().unwrap_or(0)) < rev {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The place of an event about to be stored, in the order of recording: taken where it is
    /// recorded, before the write is handed to a task of its own.
    pub fn event_ticket(&self) -> u64 {
        self.event_tickets.fetch_add(1, Ordering::Relaxed)
    }

    /// [`EtcdStore::put_event`] once every event with an earlier ticket was stored (or failed):
    /// the next one's turn comes when this one ends, dropped or panicking included.
    pub async fn put_event_in_order(&self, ticket: u64, ev: &Event) -> Result<(), StateError> {
        self.put_event_in_turn(ticket, ev, None).await.map(|_| ())
    }

    /// [`EtcdStore::put_event_in_order`] of an event recorded once whichever replica records
    /// it: stored only if no event with that `once` was (`<prefix>event_once/<once>`, created in
    /// the same transaction). True when this call stored it, false when one was.
    pub async fn put_event_once_in_order(
        &self,
        ticket: u64,
        ev: &Event,
        once: &str,
    ) -> Result<bool, StateError> {
        self.put_event_in_turn(ticket, ev, Some(once)).await
    }

    async fn put_event_in_turn(
        &self,
        ticket: u64,
        ev: &Event,
        once: Option<&str>,
    ) -> Result<bool, StateError> {
        struct Turn<'a>(&'a tokio::sync::watch::Sender<u64>, u64);
        impl Drop for Turn<'_> {
            fn drop(&mut self) {
                let next = self.1 + 1;
                self.0.send_modify(|t| *t = (*t).max(next));
            }
        }
        let mut turn = self.event_turn.subscribe();
        let _ = turn.wait_for(|t| *t >= ticket).await;
        let _done = Turn(&self.event_turn, ticket);
        self.put_event_once(ev, once).await
    }

    /// Stores an event under `events/`, attached to a lease so the history expires.
    pub async fn put_event(&self, ev: &Event) -> Result<(), StateError> {
        self.put_event_once(ev, None).await.map(|_| ())
    }

    async fn put_event_once(&self, ev: &Event, once: Option<&str>) -> Result<bool, StateError> {
        let id = self.event_lease().await?;
        let key = format!(
            "{}{}-{:08x}",
            self.events_prefix(),
            ev.time,
            fastrand::u32(..)
        );
        let value = serde_json::to_string(ev).unwrap_or_default();
        let put = json!({ "key": b64(&key), "value": b64(&value), "lease": id });
        let answer = match once {
            None => self.call("/v3/kv/put", &put).await.map(|_| true),
            Some(once) => {
                // A retry of a transaction that did land finds the key: "stored already".
                let mark = b64(&format!("{}event_once/{once}", self.prefix));
                let txn = json!({
                    "compare": [{ "key": mark, "target": "CREATE", "result": "EQUAL", "create_revision": "0" }],
                    "success": [
                        { "request_put": { "key": mark, "value": b64(&ev.time), "lease": id } },
                        { "request_put": put },
                    ],
                    "failure": [],
                });
                self.call("/v3/kv/txn", &txn)
                    .await
                    .map(|v| v["succeeded"].as_bool() == Some(true))
            }
        };
        answer.map_err(|e| {
            if e.lease_gone {
                self.forget_lease();
            }
            e.into()
        })
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
        // The newest `limit` by key (its time first), listed in the order they were written:
        // by time, then by etcd's create revision (events of the same millisecond; a key's
        // random suffix says nothing of their order), then by their index in one transaction
        // (`-{i}`, the same revision).
        let mut out: Vec<(String, i64, u64, Event)> = v["kvs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|kv| {
                let ev: Event = serde_json::from_slice(&unb64(&kv["value"])?).ok()?;
                let key = String::from_utf8(unb64(&kv["key"])?).unwrap_or_default();
                let index = key
                    .rsplit('-')
                    .next()
                    .and_then(|i| i.parse().ok())
                    .unwrap_or(0);
                Some((ev.time.clone(), num(&kv["create_revision"]), index, ev))
            })
            .collect();
        out.sort_by(|a, b| (&a.0, a.1, a.2).cmp(&(&b.0, b.1, b.2)));
        Ok(out.into_iter().map(|(.., ev)| ev).collect())
    }

    /// Streams service changes after `revision` into `on_msg` until the watch breaks (Err) or
    /// etcd asks for a resync (Ok). `on_progress` is called for every message etcd sends,
    /// progress notifications included.
    pub async fn watch(
        &self,
        revision: i64,
        mut on_msg: impl FnMut(WatchMsg),
        on_progress: impl Fn(),
    ) -> Result<WatchEnd, StateError> {
        let prefix = self.services_prefix();
        let body = json!({ "create_request": {
            "key": b64(&prefix), "range_end": prefix_end(&prefix),
            "start_revision": (revision + 1).to_string(),
            "progress_notify": true,
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
        let resp = tokio::time::timeout(self.options.timeout, self.client.request(req))
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
                    on_progress();
                    let r = &v["result"];
                    if num(&r["compact_revision"]) > 0 {
                        return Ok(WatchEnd::Resync(format!(
                            "revision {} was compacted",
                            revision + 1
                        )));
                    }
                    if r["canceled"].as_bool() == Some(true) {
                        return Ok(WatchEnd::Resync(format!(
                            "etcd canceled the watch ({})",
                            r["cancel_reason"].as_str().unwrap_or("no reason given")
                        )));
                    }
                    for ev in r["events"].as_array().into_iter().flatten() {
                        let kv = &ev["kv"];
                        let deleted = ev["type"].as_str() == Some("DELETE");
                        let Some(key) = unb64(&kv["key"]).and_then(|k| String::from_utf8(k).ok())
                        else {
                            continue;
                        };
                        let Some(name) = key.strip_prefix(&prefix) else {
                            continue;
                        };
                        if deleted {
                            if let Ok(mut s) = self.seen.lock() {
                                s.remove(name);
                            }
                            if let Ok(mut u) = self.unreadable.lock() {
                                u.remove(name);
                            }
                            on_msg(WatchMsg::Change {
                                name: name.to_string(),
                                state: None,
                                write_id: None,
                            });
                        } else {
                            match self.parse_kv_named(kv) {
                                Some((name, Some((state, rev, write_id)))) => {
                                    self.saw(&name, &state, rev);
                                    on_msg(WatchMsg::Change {
                                        name,
                                        state: Some(state),
                                        write_id,
                                    });
                                }
                                Some((name, None)) => {
                                    self.saw_unreadable(&name, num(&kv["mod_revision"]))
                                }
                                None => {}
                            }
                        }
                    }
                }
                let consumed = buf.len() - rest;
                buf.drain(..consumed);
            }
        }
        Err(StateError::Unavailable("etcd watch ended".to_string()))
    }

    /// Writes the last state seen from etcd to the cache file (temp file, fsync, rename).
    pub async fn save_cache(&self, states: HashMap<String, ServiceState>) {
        let Some(path) = self.options.cache.clone() else {
            return;
        };
        let file = CacheFile {
            version: 1,
            etcd_prefix: self.prefix.clone(),
            services: states.into_iter().collect(),
        };
        let Ok(bytes) = serde_json::to_vec_pretty(&file) else {
            return;
        };
        let p = path.clone();
        let res = tokio::task::spawn_blocking(move || crate::state::write_atomic(&p, &bytes)).await;
        if let Ok(Err(e)) = res {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the etcd state cache");
        }
    }

    /// The last state this replica saw from etcd (the cache file), if it is for this prefix.
    pub async fn load_cache(&self) -> Option<HashMap<String, ServiceState>> {
        let path = self.options.cache.clone()?;
        let bytes = tokio::task::spawn_blocking(move || std::fs::read(path))
            .await
            .ok()?
            .ok()?;
        let file: CacheFile = match serde_json::from_slice(&bytes) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an unreadable etcd state cache");
                return None;
            }
        };
        if file.etcd_prefix != self.prefix {
            tracing::warn!(cached = %file.etcd_prefix, prefix = %self.prefix, "ignoring the etcd state cache of another prefix");
            return None;
        }
        Some(file.services.into_iter().collect())
    }
}

/// The etcd backend's last known state on disk (`[state] path`).
#[derive(serde::Serialize, serde::Deserialize)]
struct CacheFile {
    version: u32,
    etcd_prefix: String,
    services: std::collections::BTreeMap<String, ServiceState>,
}

impl Backend for EtcdStore {
    async fn load(&self) -> Result<HashMap<String, ServiceState>, StateError> {
        EtcdStore::load(self).await.map(|l| l.states)
    }

    /// Writes the changed services without events (see [`EtcdStore::write`]).
    async fn save(
        &self,
        states: &HashMap<String, ServiceState>,
        previous: &HashMap<String, ServiceState>,
        changed: &[String],
    ) -> Result<(), StateError> {
        let changes: Vec<(String, ServiceState)> = changed
            .iter()
            .filter_map(|n| states.get(n).map(|s| (n.clone(), s.clone())))
            .collect();
        match self.write(&changes, previous, &[], &new_write_id()).await {
            WriteOutcome::Applied | WriteOutcome::Overwritten(_) => Ok(()),
            WriteOutcome::Conflict(_) => Err(StateError::Conflict(format!(
                "the state of {} was changed by another replica; re-read the status and retry",
                changed.join(", ")
            ))),
            WriteOutcome::NotApplied(m) | WriteOutcome::Unknown(m) => {
                Err(StateError::Unavailable(m))
            }
        }
    }
}

/// What the sync loop delivers to the app, in the order etcd showed it.
#[derive(Debug)]
pub enum Remote {
    /// A full read: every stored state. The live colors come from etcd (again).
    /// The names are those of keys etcd holds with an unreadable value ([`Loaded::unreadable`]):
    /// present, not written back.
    Synced(HashMap<String, ServiceState>, Vec<String>),
    /// A service's state changed (the watch).
    Changed(HashMap<String, ServiceState>),
    /// A service's key was deleted (the watch): the app writes it back ([`EtcdStore::create_if_absent`]).
    Absent(Vec<String>),
    /// The events of a write whose outcome was unknown and that etcd shows committed (they are
    /// stored in etcd already, with the write).
    Resolved(Vec<Event>),
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
///
/// A watch cannot hang: every `etcd_progress_interval` a read of the service keys' revisions
/// checks that etcd answers and that the watch has delivered everything it holds. Without an
/// answer (or a watch message) for three intervals the replica is marked degraded, drops the
/// connection and resyncs with a full read; a watch that lags behind etcd for two checks is
/// resynced too. (etcd's own progress notifications are requested as well, but their server
/// interval is 10 minutes by default, and the JSON gateway cannot carry progress requests.)
///
/// Every change goes to `to_app` ([`Remote`]); `degraded` is the `switchyard_state_degraded`
/// gauge. Ends when `shutdown` is cancelled or the app stops listening.
pub async fn sync(
    store: Arc<EtcdStore>,
    to_app: tokio::sync::mpsc::UnboundedSender<Remote>,
    degraded: prometheus::IntGauge,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut backoff = Duration::from_millis(250);
    if !store.loaded.load(Ordering::Relaxed) {
        // Started without etcd's answer (serving the cache file or the config's colors).
        tracing::warn!("etcd did not answer at startup: state degraded, flips refused, traffic continues on the last known colors");
        degraded.set(1);
    }
    let interval = store.options.progress_interval;
    let deadline = interval * 3;
    let mut settling: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        match store.load().await {
            Ok(loaded) => {
                if degraded.get() != 0 {
                    tracing::info!("etcd reachable again; state resynced");
                }
                degraded.set(0);
                let revision = loaded.revision;
                if to_app
                    .send(Remote::Synced(loaded.states, loaded.unreadable))
                    .is_err()
                {
                    return;
                }
                let unsent = store
                    .unsent
                    .lock()
                    .map(|mut u| std::mem::take(&mut *u))
                    .unwrap_or_default();
                if !unsent.is_empty() {
                    store.send_resolved(&to_app, unsent);
                }
                for id in loaded.write_ids.values() {
                    if let Some(evs) = store.take_unresolved(id) {
                        store.send_resolved(&to_app, evs);
                    }
                }
                // Settled beside the watch (each history read may wait for etcd), one at a time.
                if settling.as_ref().is_none_or(|t| t.is_finished()) {
                    let (store, to_app) = (store.clone(), to_app.clone());
                    let budget = store.options.timeout * 8;
                    settling = Some(tokio::spawn(async move {
                        let settled = store.settle_unresolved(budget).await;
                        if !settled.is_empty() {
                            store.send_resolved(&to_app, settled);
                        }
                    }));
                }
                backoff = Duration::from_millis(250);
                // The first write needs an event lease: grant it now, not on the flip's clock.
                let _ = store.event_lease().await;
                let base = Instant::now();
                let last_progress = AtomicU64::new(0);
                let touch = || {
                    last_progress.store(base.elapsed().as_millis() as u64, Ordering::Relaxed);
                };
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
                let watch = store.watch(
                    revision,
                    |msg| {
                        let _ = tx.send(msg);
                    },
                    touch,
                );
                let apply = async {
                    while let Some(WatchMsg::Change {
                        name,
                        state,
                        write_id,
                    }) = rx.recv().await
                    {
                        let msg = match state {
                            Some(state) => Remote::Changed(HashMap::from([(name, state)])),
                            None => Remote::Absent(vec![name]),
                        };
                        let _ = to_app.send(msg);
                        if let Some(evs) = write_id.and_then(|id| store.take_unresolved(&id)) {
                            store.send_resolved(&to_app, evs);
                        }
                    }
                };
                let check = async {
                    let mut lagging = 0;
                    loop {
                        tokio::time::sleep(interval).await;
                        match tokio::time::timeout(
                            interval.max(store.options.timeout),
                            store.lagging(),
                        )
                        .await
                        {
                            Ok(Ok(false)) => {
                                touch();
                                lagging = 0;
                            }
                            Ok(Ok(true)) => {
                                touch();
                                lagging += 1;
                                if lagging >= 2 {
                                    return "the watch lags behind etcd";
                                }
                            }
                            _ => {}
                        }
                        let silent = base.elapsed().saturating_sub(Duration::from_millis(
                            last_progress.load(Ordering::Relaxed),
                        ));
                        if silent > deadline {
                            return "stalled";
                        }
                    }
                };
                let resync = tokio::select! {
                    r = watch => match r {
                        Ok(WatchEnd::Resync(why)) => Some(why),
                        Err(e) => {
                            tracing::warn!(error = %e, "etcd watch broke; traffic continues on the last known colors");
                            None
                        }
                    },
                    _ = apply => None,
                    why = check => {
                        if why == "stalled" {
                            tracing::warn!(
                                deadline_ms = deadline.as_millis() as u64,
                                "etcd watch stalled: no progress within the deadline; state degraded, reconnecting (traffic continues on the last known colors)"
                            );
                            None
                        } else {
                            Some(why.to_string())
                        }
                    }
                    _ = shutdown.cancelled() => return,
                    _ = to_app.closed() => return,
                };
                if let Some(why) = resync {
                    // Not a fault of etcd's: resync at once with a full read, not degraded.
                    tracing::info!(reason = %why, "resyncing with etcd (full read)");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    continue;
                }
            }
            Err(e) => {
                if degraded.get() == 0 {
                    tracing::warn!(error = %e, "etcd unreachable: state degraded, flips refused, traffic continues on the last known colors");
                }
            }
        }
        degraded.set(1);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-shot etcd gateway that answers the watch with `messages`, then holds the stream.
    async fn fake_watch(messages: &'static str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
            let chunk = format!("{:x}\r\n{messages}\r\n", messages.len());
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(chunk.as_bytes()).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_compacted_or_canceled_watch_asks_for_a_resync() {
        for (msgs, word) in [
            (
                r#"{"result":{"header":{"revision":"9"},"created":true}}{"result":{"header":{"revision":"9"},"compact_revision":"7","canceled":true}}"#,
                "compacted",
            ),
            (
                r#"{"result":{"header":{"revision":"9"},"canceled":true,"cancel_reason":"rpc error"}}"#,
                "canceled",
            ),
        ] {
            let store = EtcdStore::new(&[fake_watch(msgs).await], "/t/");
            let progressed = std::sync::atomic::AtomicUsize::new(0);
            let end = tokio::time::timeout(
                Duration::from_secs(5),
                store.watch(
                    3,
                    |_| {},
                    || {
                        progressed.fetch_add(1, Ordering::Relaxed);
                    },
                ),
            )
            .await
            .expect("the watch ended");
            match end {
                Ok(WatchEnd::Resync(why)) => assert!(why.contains(word), "{why}"),
                Err(e) => panic!("expected a resync, got {e}"),
            }
            assert!(progressed.load(Ordering::Relaxed) >= 1);
        }
    }

    /// What a fake etcd does with transactions.
    #[derive(Clone, Copy, PartialEq)]
    enum Fake {
        /// Commits the write but never answers it; answers the read-back.
        CommitSilently,
        /// Loses the write (never answers, never commits); answers the read-back.
        LoseIt,
        /// Answers nothing at all.
        Hang,
    }

    /// A fake etcd gateway holding one key, for the write/reconcile logic.
    async fn fake_etcd(mode: Fake) -> String {
        use http_body_util::BodyExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let stored: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let stored = stored.clone();
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| {
                        let stored = stored.clone();
                        async move {
                            let path = req.uri().path().to_string();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            let fence = v["failure"].as_array().is_some_and(|f| !f.is_empty());
                            let answer = match (path.as_str(), fence) {
                                ("/v3/lease/grant", _) => Some(json!({ "ID": "7" })),
                                ("/v3/kv/txn", false) => {
                                    if mode == Fake::CommitSilently {
                                        let put = &v["success"][0]["request_put"];
                                        *stored.lock().expect("lock") =
                                            put["value"].as_str().map(str::to_string);
                                    }
                                    None
                                }
                                ("/v3/kv/txn", true) if mode != Fake::Hang => {
                                    let held = stored.lock().expect("lock").clone();
                                    Some(match held {
                                        None => {
                                            json!({ "header": { "revision": "20" }, "succeeded": true })
                                        }
                                        Some(value) => json!({
                                            "header": { "revision": "20" }, "succeeded": false,
                                            "responses": [{ "response_range": { "kvs": [{
                                                "key": b64("/t/services/api"), "value": value, "mod_revision": "19",
                                            }]}}],
                                        }),
                                    })
                                }
                                _ => None,
                            };
                            match answer {
                                Some(a) => Ok::<_, std::convert::Infallible>(http::Response::new(
                                    Full::new(Bytes::from(a.to_string())),
                                )),
                                None => {
                                    // Never answers (the client gives up first).
                                    tokio::time::sleep(Duration::from_secs(3600)).await;
                                    Ok(http::Response::new(Full::new(Bytes::new())))
                                }
                            }
                        }
                    },
                );
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        format!("http://{addr}")
    }

    async fn write_with(mode: Fake) -> WriteOutcome {
        let store = EtcdStore::with_options(
            &[fake_etcd(mode).await],
            "/t/",
            EtcdOptions {
                timeout: Duration::from_millis(200),
                ..EtcdOptions::default()
            },
        );
        let before = ServiceState::initial(crate::config::Color::Blue);
        let mut after = before.clone();
        after.active = crate::config::Color::Green;
        after.generation = 1;
        let ev =
            Event::new("api", crate::state::event::Reason::Manual, "test", "flip").generation(1);
        store
            .write(
                &[("api".to_string(), after)],
                &HashMap::from([("api".to_string(), before)]),
                &[ev],
                "w-42",
            )
            .await
    }

    #[tokio::test]
    async fn a_write_without_an_answer_is_settled_by_reading_back() {
        // etcd committed it: the read-back finds the write id.
        assert!(matches!(
            write_with(Fake::CommitSilently).await,
            WriteOutcome::Applied
        ));
        // etcd never got it: the fence wins, and the write can never commit any more.
        match write_with(Fake::LoseIt).await {
            WriteOutcome::NotApplied(m) => assert!(m.contains("not applied"), "{m}"),
            other => panic!("expected not applied, got {other:?}"),
        }
        // etcd answers nothing: unknown, never "refused".
        match write_with(Fake::Hang).await {
            WriteOutcome::Unknown(m) => assert!(m.contains("outcome unknown"), "{m}"),
            other => panic!("expected unknown, got {other:?}"),
        }
    }

    /// Events are stored in the order their tickets were taken: a later one waits for the
    /// earlier one's write to end (here each fails at once: nothing listens).
    #[tokio::test]
    async fn events_are_stored_in_the_order_recorded() {
        let store = EtcdStore::with_options(
            &["http://127.0.0.1:1".to_string()],
            "/t/",
            EtcdOptions::default(),
        );
        let ev = Event::new("api", crate::state::event::Reason::Manual, "test", "flip");
        let (first, second) = (store.event_ticket(), store.event_ticket());
        let order = Arc::new(Mutex::new(Vec::new()));
        let later = {
            let (store, ev, order) = (store.clone(), ev.clone(), order.clone());
            tokio::spawn(async move {
                let _ = store.put_event_in_order(second, &ev).await;
                order.lock().map(|mut o| o.push(second)).ok();
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!later.is_finished(), "the later event was written first");
        let _ = store.put_event_in_order(first, &ev).await;
        order.lock().map(|mut o| o.push(first)).ok();
        let _ = tokio::time::timeout(Duration::from_secs(10), later).await;
        assert_eq!(
            order.lock().map(|o| o.clone()).ok(),
            Some(vec![first, second])
        );
    }

    /// The events of a resolved write whose receiver is gone (the app's side being started
    /// again after a panic) are kept for the next sync run, not dropped.
    #[test]
    fn resolved_events_that_cannot_be_sent_are_kept_for_the_next_run() {
        let store = EtcdStore::with_options(&[], "/t/", EtcdOptions::default());
        let ev = || Event::new("api", crate::state::event::Reason::Manual, "test", "flip");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        drop(rx);
        store.send_resolved(&tx, vec![ev()]);
        assert_eq!(store.unsent.lock().map(|u| u.len()).ok(), Some(1));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        store.send_resolved(&tx, vec![ev()]);
        assert!(matches!(rx.try_recv(), Ok(Remote::Resolved(e)) if e.len() == 1));
        assert_eq!(store.unsent.lock().map(|u| u.len()).ok(), Some(1));
    }

    /// A write of unknown outcome stays known as this replica's own once the watch or a read
    /// resolves it (a later write that loses to it lost to its own, not to another replica's),
    /// for the last [`MAX_UNRESOLVED`] of them; others' ids never are.
    #[test]
    fn a_resolved_unknown_write_is_still_known_as_this_replica_s() {
        let store = EtcdStore::with_options(&[], "/t/", EtcdOptions::default());
        store.remember_unresolved("w-1", Vec::new());
        assert!(store.is_own_unknown("w-1"));
        assert!(store.take_unresolved("w-1").is_some());
        assert!(store.is_own_unknown("w-1"), "forgotten once resolved");
        assert!(!store.is_own_unknown("w-other"));
        for i in 0..MAX_UNRESOLVED {
            let id = format!("w-later-{i}");
            store.remember_unresolved(&id, Vec::new());
            assert!(store.take_unresolved(&id).is_some());
        }
        assert!(!store.is_own_unknown("w-1"), "kept past its bound");
        assert!(store.is_own_unknown(&format!("w-later-{}", MAX_UNRESOLVED - 1)));
    }

    #[test]
    fn stored_values_carry_the_write_id_and_parse_as_states() {
        let store = EtcdStore::new(&["http://127.0.0.1:1".to_string()], "/t/");
        let state = ServiceState::initial(crate::config::Color::Green);
        let value = stored_value(&state, "w-1");
        let kv =
            json!({ "key": b64("/t/services/api"), "value": b64(&value), "mod_revision": "12" });
        let (name, parsed, rev, id) = store.parse_kv(&kv).expect("parsed");
        assert_eq!(
            (name.as_str(), rev, id.as_deref()),
            ("api", 12, Some("w-1"))
        );
        assert_eq!(parsed, state);
    }

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

// ---------------------------------------------------------------------------------------------
// The running release (crate::release_store): one key, `<prefix>release`, written only by a
// compare-and-swap on its mod_revision; the ended ones under `<prefix>release_history/`.
// Appended here (not mixed into the state code above) so that it moves with this file unchanged.
// ---------------------------------------------------------------------------------------------

/// The release key as read: its JSON value and mod_revision (0: the key does not exist).
#[derive(Clone, Debug)]
pub struct ReleaseRead {
    pub value: Option<Value>,
    pub mod_revision: i64,
}

/// What became of a compare-and-swap of the release key.
#[derive(Debug)]
pub enum ReleaseCas {
    /// Written; the key's new mod_revision.
    Applied(i64),
    /// Written at `rev` (etcd's history shows it), but a newer write replaced it since (another
    /// replica's): `now` is what the key holds, newer than this write.
    Replaced { rev: i64, now: ReleaseRead },
    /// The key changed since `expected` (another replica wrote it): what it holds now.
    Lost(ReleaseRead),
    /// etcd did not answer and no read-back could tell: the write may still be committed.
    Unknown(String),
}

impl EtcdStore {
    fn release_key(&self) -> String {
        format!("{}release", self.prefix)
    }

    fn history_prefix(&self) -> String {
        format!("{}release_history/", self.prefix)
    }

    /// The newest `limit` ended releases of the history, newest end first (the order their ends
    /// were stored in), as stored, each with the revision etcd created its key at (the order to
    /// list them in: the `ended_at` inside is the ending replica's clock); unreadable values
    /// are skipped.
    pub async fn release_history(&self, limit: usize) -> Result<Vec<(i64, Value)>, StateError> {
        let prefix = self.history_prefix();
        let v = self
            .call(
                "/v3/kv/range",
                &json!({
                    "key": b64(&prefix), "range_end": prefix_end(&prefix),
                    "limit": limit.to_string(), "sort_order": "DESCEND", "sort_target": "CREATE",
                }),
            )
            .await?;
        Ok(v["kvs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|kv| {
                let v = serde_json::from_slice(&unb64(&kv["value"])?).ok()?;
                Some((num(&kv["create_revision"]), v))
            })
            .collect())
    }

    /// Deletes all but the newest `keep` entries of the release history (in one transaction).
    pub async fn prune_release_history(&self, keep: usize) -> Result<(), StateError> {
        let prefix = self.history_prefix();
        let v = self
            .call(
                "/v3/kv/range",
                &json!({
                    "key": b64(&prefix), "range_end": prefix_end(&prefix), "keys_only": true,
                    "sort_order": "DESCEND", "sort_target": "CREATE",
                }),
            )
            .await?;
        let deletes: Vec<Value> = v["kvs"]
            .as_array()
            .into_iter()
            .flatten()
            .skip(keep)
            .filter_map(|kv| kv["key"].as_str())
            .map(|k| json!({ "request_delete_range": { "key": k } }))
            .collect();
        if !deletes.is_empty() {
            self.call("/v3/kv/txn", &json!({ "success": deletes }))
                .await?;
        }
        Ok(())
    }

    fn release_read_of(kvs: &Value) -> ReleaseRead {
        match kvs.as_array().and_then(|a| a.first()) {
            Some(kv) => ReleaseRead {
                value: unb64(&kv["value"]).and_then(|b| serde_json::from_slice(&b).ok()),
                mod_revision: num(&kv["mod_revision"]),
            },
            None => ReleaseRead {
                value: None,
                mod_revision: 0,
            },
        }
    }

    /// Reads the release key.
    pub async fn read_release(&self) -> Result<ReleaseRead, StateError> {
        let v = self
            .call("/v3/kv/range", &json!({ "key": b64(&self.release_key()) }))
            .await?;
        Ok(Self::release_read_of(&v["kvs"]))
    }

    /// Writes `value` (which carries `"write_id": write_id`) to the release key if its
    /// mod_revision is still `expected` (0: the key must not exist). Without an answer in time
    /// the key is read back: our write id there means applied; a newer revision with another
    /// value means lost (our transaction's compare can no longer pass); an unchanged revision is
    /// fenced by rewriting the same value under the same compare, so our write can never land
    /// later. Unknown only when etcd answers none of that.
    pub async fn cas_release(&self, expected: i64, value: &Value, write_id: &str) -> ReleaseCas {
        self.cas_release_ending(expected, value, write_id, None)
            .await
    }

    /// [`Self::cas_release`] that, when `ended` is `(id, record)`, also stores `record` in the
    /// release history (`<prefix>release_history/<id>`) in the same transaction: the history
    /// holds an ended release exactly when the end of it was stored. A fence never touches it.
    pub async fn cas_release_ending(
        &self,
        expected: i64,
        value: &Value,
        write_id: &str,
        ended: Option<(&str, &Value)>,
    ) -> ReleaseCas {
        let key = b64(&self.release_key());
        let compare = json!([{ "key": key, "target": "MOD", "result": "EQUAL", "mod_revision": expected.to_string() }]);
        let mut success =
            vec![json!({ "request_put": { "key": key, "value": b64(&value.to_string()) } })];
        if let Some((id, record)) = ended {
            success.push(json!({ "request_put": {
                "key": b64(&format!("{}{id}", self.history_prefix())),
                "value": b64(&record.to_string()),
            } }));
        }
        let txn = json!({
            "compare": compare,
            "success": success,
            "failure": [{ "request_range": { "key": key } }],
        });
        let lost = |v: &Value| {
            let kvs = v["responses"]
                .as_array()
                .and_then(|a| a.first())
                .map(|r| r["response_range"]["kvs"].clone())
                .unwrap_or(Value::Null);
            ReleaseCas::Lost(Self::release_read_of(&kvs))
        };
        let first = match self.call_noting("/v3/kv/txn", &txn).await {
            Ok((v, _)) if v["succeeded"].as_bool() == Some(true) => {
                return ReleaseCas::Applied(num(&v["header"]["revision"]))
            }
            Ok((v, earlier)) => {
                let ReleaseCas::Lost(read) = lost(&v) else {
                    return lost(&v);
                };
                if !earlier {
                    return ReleaseCas::Lost(read);
                }
                // An earlier attempt on another endpoint that did not answer in time may have
                // been committed: then the key holds our write, or etcd's history shows it.
                if read.value.as_ref().and_then(|v| v["write_id"].as_str()) == Some(write_id) {
                    return ReleaseCas::Applied(read.mod_revision);
                }
                let deadline = Instant::now() + self.options.timeout * 3;
                return match self.landed_by(expected, write_id, deadline).await {
                    Ok(Some(rev)) => ReleaseCas::Replaced { rev, now: read },
                    Ok(None) | Err(_) => ReleaseCas::Lost(read),
                };
            }
            Err(e) if !e.maybe_sent => {
                // Never sent: as good as a lost compare with nothing known; re-read.
                return match self.read_release().await {
                    Ok(r) if r.mod_revision != expected => ReleaseCas::Lost(r),
                    Ok(_) | Err(_) => {
                        ReleaseCas::Unknown(format!("{}; the release was not changed", e.message))
                    }
                };
            }
            Err(e) => e.message,
        };
        tracing::warn!(error = %first, write_id, "etcd did not answer a release write in time; reading back what happened");
        let deadline = Instant::now() + self.options.timeout * 3;
        let mut last;
        loop {
            match self.read_release().await {
                Ok(r) => {
                    let ours =
                        r.value.as_ref().and_then(|v| v["write_id"].as_str()) == Some(write_id);
                    if ours {
                        return ReleaseCas::Applied(r.mod_revision);
                    }
                    if r.mod_revision != expected {
                        // Moved on: our write either landed first and was replaced since, or
                        // lost to another one; the key's history says which.
                        match self.landed_by(expected, write_id, deadline).await {
                            Ok(Some(rev)) => return ReleaseCas::Replaced { rev, now: r },
                            Ok(None) => return ReleaseCas::Lost(r),
                            Err(e) => {
                                last = e.message;
                                if Instant::now() >= deadline {
                                    break;
                                }
                                tokio::time::sleep(Duration::from_millis(200)).await;
                                continue;
                            }
                        }
                    }
                    // Unchanged: fence it, so the pending write can never commit.
                    let mut fence = r.value.clone().unwrap_or(Value::Null);
                    if let Some(o) = fence.as_object_mut() {
                        o.insert("write_id".to_string(), json!(format!("fence-{write_id}")));
                    }
                    let body = if r.value.is_some() {
                        json!({
                            "compare": compare,
                            "success": [{ "request_put": { "key": key, "value": b64(&fence.to_string()) } }],
                            "failure": [{ "request_range": { "key": key } }],
                        })
                    } else {
                        // An absent key is fenced by creating it empty (no release).
                        json!({
                            "compare": compare,
                            "success": [{ "request_put": { "key": key, "value": b64("{\"release\":null}") } }],
                            "failure": [{ "request_range": { "key": key } }],
                        })
                    };
                    match self.call("/v3/kv/txn", &body).await {
                        Ok(v) if v["succeeded"].as_bool() == Some(true) => {
                            let rev = num(&v["header"]["revision"]);
                            return ReleaseCas::Lost(ReleaseRead {
                                value: if r.value.is_some() {
                                    Some(fence)
                                } else {
                                    Some(json!({"release": null}))
                                },
                                mod_revision: rev,
                            });
                        }
                        Ok(v) => {
                            let ReleaseCas::Lost(now) = lost(&v) else {
                                continue;
                            };
                            let ours = now.value.as_ref().and_then(|v| v["write_id"].as_str())
                                == Some(write_id);
                            if ours {
                                return ReleaseCas::Applied(now.mod_revision);
                            }
                            match self.landed_by(expected, write_id, deadline).await {
                                Ok(Some(rev)) => return ReleaseCas::Replaced { rev, now },
                                Ok(None) => return ReleaseCas::Lost(now),
                                Err(e) => last = e.message,
                            }
                        }
                        Err(e) => last = e.message,
                    }
                }
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        ReleaseCas::Unknown(format!(
            "outcome unknown: etcd did not answer the release write or its read-back within {:?} ({last})",
            self.options.timeout * 4
        ))
    }

    /// Whether write `write_id` of the release key, compared at mod_revision `expected`, is the
    /// first write after it in etcd's history (it committed, even if another replica's write
    /// replaced it since): its revision, or None when another write came first.
    pub async fn release_landed(
        &self,
        expected: i64,
        write_id: &str,
    ) -> Result<Option<i64>, StateError> {
        let deadline = Instant::now() + self.options.timeout * 3;
        Ok(self.landed_by(expected, write_id, deadline).await?)
    }

    /// [`Self::release_landed`], giving up at `deadline`.
    async fn landed_by(
        &self,
        expected: i64,
        write_id: &str,
        deadline: Instant,
    ) -> Result<Option<i64>, CallError> {
        Ok(self
            .first_write_after(&self.release_key(), expected, deadline)
            .await?
            .filter(|(id, _)| id == write_id)
            .map(|(_, rev)| rev))
    }
}
