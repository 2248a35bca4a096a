//! Upstreams by name: `name:port` entries are resolved at startup, on reload, and every
//! `[proxy] resolve_interval`; each address is an upstream of its own.
//!
//! The resolver is the system's (`getaddrinfo`, on tokio's blocking pool, one lookup per name
//! at a time), so `/etc/hosts`, nsswitch and the container runtime's DNS (Docker's embedded
//! DNS, Kubernetes' cluster DNS with its search domains) answer exactly as for every other
//! program on the host. `getaddrinfo` reports no TTL: names are re-resolved every
//! `resolve_interval` (a caching resolver on the host applies TTLs below it). A hosts-format file
//! (`[proxy] resolve_hosts_file`) can stand in for it; the tests use that to change answers.
//!
//! Invariants: an answer replaces the name's addresses only when it is non-empty; a failed or
//! empty lookup keeps the last good set and marks the name stale (status, metrics, a WARN line
//! when it starts failing, an INFO line when it recovers); so no pool is emptied by a resolver
//! hiccup. Addresses that disappear leave the next snapshot: requests in flight on them finish
//! (they hold their upstream), their pooled connections close when the last request lets go.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, ProxyConfig};
use crate::metrics::Metrics;

/// One lookup may take this long before it counts as failed.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

type Lookup<'a> = Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>>;

/// A source of answers for `name:port`.
pub trait Resolve: Send + Sync {
    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a>;
}

/// `getaddrinfo` on tokio's blocking pool, at most one lookup per name at a time.
pub struct System;

impl Resolve for System {
    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a> {
        static GETADDRINFO: std::sync::LazyLock<OnePerName> =
            std::sync::LazyLock::new(|| OnePerName::new(getaddrinfo));
        GETADDRINFO.lookup(host, port)
    }
}

fn getaddrinfo(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    use std::net::ToSocketAddrs;
    Ok((host, port).to_socket_addrs()?.collect())
}

/// A blocking lookup's outcome, shared by everyone waiting for it (`io::Error` is not `Clone`).
type Shared = Option<Result<Vec<SocketAddr>, (io::ErrorKind, String)>>;

/// The lookups running, by `(host, port)`: when each started, and how to wait for its outcome.
type Running = HashMap<(String, u16), (tokio::time::Instant, tokio::sync::watch::Receiver<Shared>)>;

/// A lookup running this long is taken as stuck: the next lookup of its name starts another.
const STUCK_AFTER: Duration = Duration::from_secs(60);

/// Blocking lookups, one running per name. A blocking thread cannot be cancelled: a lookup that
/// outlives its caller's `LOOKUP_TIMEOUT` (dead nameservers, a hung NSS module) keeps its thread
/// to the end. A later lookup of the same name waits for that one instead of starting another,
/// so a resolver that hangs holds one thread per name, never one more every `resolve_interval`
/// until tokio's blocking pool is full and state writes, reloads and flips queue behind it.
struct OnePerName {
    blocking: fn(&str, u16) -> io::Result<Vec<SocketAddr>>,
    /// Held only to look up or insert, never across an await.
    running: Arc<std::sync::Mutex<Running>>,
}

impl OnePerName {
    fn new(blocking: fn(&str, u16) -> io::Result<Vec<SocketAddr>>) -> OnePerName {
        OnePerName {
            blocking,
            running: Arc::default(),
        }
    }

    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a> {
        let mut rx = self.running_or_start(host, port);
        Box::pin(async move {
            match rx.wait_for(Option::is_some).await {
                Ok(shared) => match &*shared {
                    Some(Ok(addrs)) => Ok(addrs.clone()),
                    Some(Err((kind, message))) => Err(io::Error::new(*kind, message.clone())),
                    None => Err(io::Error::other("the lookup ended without an answer")),
                },
                Err(_) => Err(io::Error::other("the lookup ended without an answer")),
            }
        })
    }

    fn running_or_start(&self, host: &str, port: u16) -> tokio::sync::watch::Receiver<Shared> {
        let key = (host.to_string(), port);
        let now = tokio::time::Instant::now();
        let mut running = self
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Waited for unless its sender is gone without an answer (the blocking task was never
        // run: no thread could be started, the runtime is shutting down) or it has run past
        // `STUCK_AFTER` (one NSS call stuck for good must not stop the name's lookups forever:
        // one more thread per name per `STUCK_AFTER` at most).
        if let Some((started, rx)) = running.get(&key) {
            if rx.has_changed().is_ok() && now.duration_since(*started) < STUCK_AFTER {
                return rx.clone();
            }
        }
        let (tx, rx) = tokio::sync::watch::channel(None);
        running.insert(key.clone(), (now, rx.clone()));
        drop(running);
        let (blocking, table, ours) = (self.blocking, self.running.clone(), rx.clone());
        tokio::task::spawn_blocking(move || {
            let answer = blocking(&key.0, key.1).map_err(|e| (e.kind(), e.to_string()));
            // Out of the table first (when still this lookup's entry): a lookup that starts
            // after this one ended asks again.
            let mut running = table
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if running
                .get(&key)
                .is_some_and(|(_, rx)| rx.same_channel(&ours))
            {
                running.remove(&key);
            }
            drop(running);
            let _ = tx.send(Some(answer));
        });
        rx
    }
}

/// Answers from a file in `/etc/hosts` format (`ADDRESS NAME...`, `#` comments), read on every
/// lookup; a name it does not list fails as NXDOMAIN would.
pub struct HostsFile(pub PathBuf);

impl Resolve for HostsFile {
    fn lookup<'a>(&'a self, host: &'a str, port: u16) -> Lookup<'a> {
        Box::pin(async move {
            let text = tokio::fs::read_to_string(&self.0)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", self.0.display())))?;
            // A fully qualified name (`name.`) is the same name as the file's `name`.
            let name = host.strip_suffix('.').unwrap_or(host);
            let mut found = false;
            let mut addrs = Vec::new();
            for line in text.lines() {
                let line = line.split('#').next().unwrap_or_default();
                let mut words = line.split_whitespace();
                let Some(ip) = words.next() else { continue };
                if words.any(|w| w.strip_suffix('.').unwrap_or(w).eq_ignore_ascii_case(name)) {
                    found = true;
                    if let Ok(ip) = ip.parse::<IpAddr>() {
                        addrs.push(SocketAddr::new(ip, port));
                    }
                }
            }
            if !found {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("{host} is not in {}", self.0.display()),
                ));
            }
            Ok(addrs)
        })
    }
}

pub fn resolver(proxy: &ProxyConfig) -> Arc<dyn Resolve> {
    match &proxy.resolve_hosts_file {
        Some(p) => Arc::new(HostsFile(p.clone())),
        None => Arc::new(System),
    }
}

/// Answers by `(host, port)`: the addresses, or why there are none.
pub type Answers = HashMap<(String, u16), Result<Vec<SocketAddr>, String>>;

/// Looks every name of `config` up, concurrently, each within `LOOKUP_TIMEOUT`.
pub async fn lookup_all(config: &Config) -> Answers {
    let resolver = resolver(&config.proxy);
    let mut wanted: Vec<(String, u16)> = Vec::new();
    for svc in &config.services {
        for color in crate::config::Color::ALL {
            for n in svc.pool(color).names() {
                let k = (n.host.clone(), n.port);
                if !wanted.contains(&k) {
                    wanted.push(k);
                }
            }
        }
    }
    let mut set = tokio::task::JoinSet::new();
    for (host, port) in wanted {
        let resolver = resolver.clone();
        set.spawn(async move {
            let answer = match tokio::time::timeout(LOOKUP_TIMEOUT, resolver.lookup(&host, port))
                .await
            {
                Ok(Ok(addrs)) if addrs.is_empty() => Err("the answer has no address".to_string()),
                Ok(Ok(mut addrs)) => {
                    addrs.sort();
                    addrs.dedup();
                    Ok(addrs)
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!(
                    "no answer within {}",
                    humantime::format_duration(LOOKUP_TIMEOUT)
                )),
            };
            ((host, port), answer)
        });
    }
    let mut answers = HashMap::new();
    while let Some(r) = set.join_next().await {
        if let Ok((k, a)) = r {
            answers.insert(k, a);
        }
    }
    answers
}

/// Applies `answers` to `config` (names missing from them keep what they have); true when any
/// pool's addresses or any name's failure state changed. Logs names that start or stop failing.
pub fn apply(config: &mut Config, answers: &Answers) -> bool {
    let mut changed = false;
    for svc in &mut config.services {
        for pool in [&mut svc.blue, &mut svc.green] {
            let before = pool.upstreams.clone();
            for n in pool.names_mut() {
                let Some(answer) = answers.get(&(n.host.clone(), n.port)) else {
                    continue;
                };
                match answer {
                    Ok(addrs) => {
                        if n.error.is_some() {
                            tracing::info!(upstream = %n.label(), key = %n.key, addrs = ?addrs, "upstream name resolves again");
                            changed = true;
                        }
                        n.error = None;
                        if n.addrs != *addrs {
                            tracing::info!(upstream = %n.label(), key = %n.key, from = ?n.addrs, to = ?addrs, "upstream name resolves to other addresses");
                            n.addrs = addrs.clone();
                        }
                    }
                    Err(e) => {
                        if n.error.is_none() {
                            tracing::warn!(
                                upstream = %n.label(), key = %n.key, error = %e, kept = ?n.addrs,
                                "cannot resolve an upstream name; keeping its last good addresses"
                            );
                            changed = true;
                        }
                        n.error = Some(e.clone());
                    }
                }
            }
            pool.refresh();
            changed |= pool.upstreams != before;
        }
    }
    changed
}

/// An upstream name's last good addresses, and why its last lookup failed (None: it answered):
/// what `serve --upgrade` gets from the old process, so a name that fails in the new one keeps
/// what the old one served rather than emptying its pool.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KnownName {
    pub host: String,
    pub port: u16,
    pub addrs: Vec<SocketAddr>,
    #[serde(default)]
    pub error: Option<String>,
}

/// Every name of `config` with its last good addresses and failure state.
pub fn known_names(config: &Config) -> Vec<KnownName> {
    let mut known: Vec<KnownName> = Vec::new();
    for svc in &config.services {
        for pool in [&svc.blue, &svc.green] {
            for n in pool.names() {
                if known.iter().any(|k| k.host == n.host && k.port == n.port) {
                    continue;
                }
                known.push(KnownName {
                    host: n.host.clone(),
                    port: n.port,
                    addrs: n.addrs.clone(),
                    error: n.error.clone(),
                });
            }
        }
    }
    known
}

/// Copies `known` (last good addresses and failure state) into the names of `new`, before they
/// are looked up: a name that fails then keeps them (stale).
pub fn carry_over_known(new: &mut Config, known: &[KnownName]) {
    let known: HashMap<(&str, u16), &KnownName> = known
        .iter()
        .map(|k| ((k.host.as_str(), k.port), k))
        .collect();
    for svc in &mut new.services {
        for pool in [&mut svc.blue, &mut svc.green] {
            for n in pool.names_mut() {
                if let Some(k) = known.get(&(n.host.as_str(), n.port)) {
                    n.addrs = k.addrs.clone();
                    n.error = k.error.clone();
                }
            }
            pool.refresh();
        }
    }
}

/// Copies the names' last good addresses (and failure state) of `old` into `new` (a reloaded
/// config), so a name that fails on reload keeps what it had.
pub fn carry_over(new: &mut Config, old: &Config) {
    carry_over_known(new, &known_names(old));
}

/// Resolves a freshly loaded config (startup, reload), keeping `previous`'s answers for names
/// that fail now.
pub async fn resolve(mut config: Config, previous: Option<&Config>) -> Config {
    if let Some(old) = previous {
        carry_over(&mut config, old);
    }
    if has_names(&config) {
        let answers = lookup_all(&config).await;
        apply(&mut config, &answers);
    }
    config
}

/// The names' series for a config about to be published (the routing snapshot is built from
/// it): every name of `next` at 0 from the start, `stale` at 1 while its last lookup failed, and
/// one failed lookup counted per failing name, since every config published has just been looked
/// up (at startup, on reload, and by the DNS watch when an answer changed; the watch counts the
/// failures it does not publish itself). Names `previous` had and `next` has not lose both
/// series, so a name taken out of the config is no longer exported (its counter too).
pub fn publish_metrics(previous: Option<&Config>, next: &Config, metrics: &Metrics) {
    let labels = |c: &Config| -> HashMap<String, bool> {
        let mut out: HashMap<String, bool> = HashMap::new();
        for svc in &c.services {
            for pool in [&svc.blue, &svc.green] {
                for n in pool.names() {
                    *out.entry(n.label()).or_default() |= n.error.is_some();
                }
            }
        }
        out
    };
    let now = labels(next);
    for (label, failed) in &now {
        let failures = metrics
            .resolve_failures_total
            .with_label_values(&[label.as_str()]);
        if *failed {
            failures.inc();
        }
        metrics
            .resolution_stale
            .with_label_values(&[label.as_str()])
            .set(i64::from(*failed));
    }
    for label in previous.map(labels).unwrap_or_default().keys() {
        if !now.contains_key(label) {
            let _ = metrics
                .resolve_failures_total
                .remove_label_values(&[label.as_str()]);
            let _ = metrics
                .resolution_stale
                .remove_label_values(&[label.as_str()]);
        }
    }
}

/// Counts the failed lookups among `answers` of names `config` has (the DNS watch's answers
/// that it does not publish: nothing changed, or a reload replaced the config meanwhile).
pub fn count_failures(config: &Config, answers: &Answers, metrics: &Metrics) {
    let mut counted: Vec<(&str, u16)> = Vec::new();
    for svc in &config.services {
        for pool in [&svc.blue, &svc.green] {
            for n in pool.names() {
                let k = (n.host.as_str(), n.port);
                if counted.contains(&k) {
                    continue;
                }
                counted.push(k);
                if let Some(Err(_)) = answers.get(&(n.host.clone(), n.port)) {
                    metrics
                        .resolve_failures_total
                        .with_label_values(&[n.label().as_str()])
                        .inc();
                }
            }
        }
    }
}

pub fn has_names(config: &Config) -> bool {
    config
        .services
        .iter()
        .any(|s| s.blue.names().next().is_some() || s.green.names().next().is_some())
}

/// `switchyard check`: one warning per name that does not resolve, with its key.
pub async fn check_warnings(config: &Config) -> Vec<String> {
    let answers = lookup_all(config).await;
    let mut out = Vec::new();
    for svc in &config.services {
        for pool in [&svc.blue, &svc.green] {
            for n in pool.names() {
                match answers.get(&(n.host.clone(), n.port)) {
                    Some(Ok(addrs)) => {
                        let a: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
                        out.push(format!(
                            "info: {}: {} resolves to {}",
                            n.key,
                            n.label(),
                            a.join(", ")
                        ));
                    }
                    Some(Err(e)) => out.push(format!(
                        "warning: {}: cannot resolve {:?} now: {e} (it is resolved again every resolve_interval once running)",
                        n.key,
                        n.label()
                    )),
                    None => {}
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::{Condvar, Mutex};

    type Gate = (Mutex<bool>, Condvar);

    /// Opens its gate when dropped: a failed assertion ends the test instead of leaving its
    /// blocking threads hung (the runtime waits for them when it is dropped).
    struct Opens(&'static Gate);

    impl Drop for Opens {
        fn drop(&mut self) {
            *self.0 .0.lock().unwrap_or_else(|e| e.into_inner()) = true;
            self.0 .1.notify_all();
        }
    }

    fn wait_at(gate: &Gate) {
        let mut open = gate.0.lock().unwrap();
        while !*open {
            open = gate.1.wait(open).unwrap();
        }
    }

    /// Whether `calls` reaches `n` within 10 s (a blocking thread starts when the OS runs it).
    fn reaches(calls: &AtomicUsize, n: usize) -> bool {
        for _ in 0..10_000 {
            if calls.load(SeqCst) >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[tokio::test]
    async fn a_hung_lookup_holds_one_thread_however_often_its_name_is_asked_again() {
        static CALLS: AtomicUsize = AtomicUsize::new(0);
        static GATE: Gate = (Mutex::new(false), Condvar::new());
        fn hangs(_: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
            CALLS.fetch_add(1, SeqCst);
            wait_at(&GATE);
            Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))])
        }
        let opens = Opens(&GATE);
        let resolver = OnePerName::new(hangs);
        let ask = |host| tokio::time::timeout(Duration::from_millis(5), resolver.lookup(host, 80));
        assert!(ask("api.internal").await.is_err(), "a hung lookup answered");
        assert!(reaches(&CALLS, 1));
        for _ in 0..20 {
            assert!(ask("api.internal").await.is_err(), "a hung lookup answered");
        }
        assert_eq!(
            CALLS.load(SeqCst),
            1,
            "one thread for the name, however often it is asked"
        );
        let _ = ask("other.internal").await;
        assert!(reaches(&CALLS, 2), "another name has its own");
        // Asked while it hangs, answered when it ends, by the same lookup.
        let waiting = resolver.lookup("api.internal", 80);
        drop(opens);
        let addrs = waiting.await.unwrap();
        assert_eq!(addrs, vec![SocketAddr::from(([127, 0, 0, 1], 80))]);
        assert_eq!(CALLS.load(SeqCst), 2);
        // Once it has ended, the name is asked again.
        resolver.lookup("api.internal", 80).await.unwrap();
        assert_eq!(CALLS.load(SeqCst), 3);
    }

    /// A lookup whose task ended without an answer (it panicked; or no thread could be
    /// started) does not leave its name failing for good: the next lookup asks again.
    #[tokio::test]
    async fn a_lookup_that_ended_without_an_answer_is_asked_again() {
        static CALLS: AtomicUsize = AtomicUsize::new(0);
        fn first_panics(_: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
            if CALLS.fetch_add(1, SeqCst) == 0 {
                panic!("the resolver library failed");
            }
            Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))])
        }
        let resolver = OnePerName::new(first_panics);
        let first = resolver.lookup("api.internal", 80).await;
        assert!(first.is_err(), "{first:?}");
        let again = resolver.lookup("api.internal", 80).await;
        assert_eq!(
            again.ok(),
            Some(vec![SocketAddr::from(([127, 0, 0, 1], 80))])
        );
        assert_eq!(CALLS.load(SeqCst), 2);
    }

    /// One lookup stuck for good (an NSS call that never returns) stops its name's lookups
    /// only for `STUCK_AFTER`: then one more is started.
    #[tokio::test(start_paused = true)]
    async fn a_lookup_stuck_past_its_limit_is_started_again() {
        static CALLS: AtomicUsize = AtomicUsize::new(0);
        static GATE: Gate = (Mutex::new(false), Condvar::new());
        fn hangs(_: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
            CALLS.fetch_add(1, SeqCst);
            wait_at(&GATE);
            Ok(vec![SocketAddr::from(([127, 0, 0, 1], port))])
        }
        let _opens = Opens(&GATE);
        let resolver = OnePerName::new(hangs);
        drop(resolver.lookup("api.internal", 80));
        assert!(reaches(&CALLS, 1));
        tokio::time::advance(STUCK_AFTER - Duration::from_secs(1)).await;
        drop(resolver.lookup("api.internal", 80));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(CALLS.load(SeqCst), 1, "started again before STUCK_AFTER");
        tokio::time::advance(Duration::from_secs(2)).await;
        drop(resolver.lookup("api.internal", 80));
        assert!(reaches(&CALLS, 2), "never started again");
        drop(resolver.lookup("api.internal", 80));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(CALLS.load(SeqCst), 2, "the new one is waited for in turn");
    }

    fn config() -> Config {
        crate::config::from_toml_str_with_env(
            "[[services]]\nname = \"api\"\n\
             blue = { upstreams = [\"127.0.0.1:1\", \"app.test:80\"] }\n\
             green = { upstreams = [\"app.test:80\"] }\n",
            Some(Default::default()),
        )
        .expect("valid")
    }

    fn answer(r: Result<Vec<&str>, &str>) -> Answers {
        let mut a = Answers::new();
        a.insert(
            ("app.test".to_string(), 80),
            r.map(|v| v.iter().map(|s| s.parse().expect("addr")).collect())
                .map_err(str::to_string),
        );
        a
    }

    fn blue(c: &Config) -> Vec<String> {
        c.services[0]
            .blue
            .upstreams
            .iter()
            .map(|a| a.to_string())
            .collect()
    }

    #[test]
    fn answers_replace_and_failures_keep() {
        let mut c = config();
        assert_eq!(blue(&c), ["127.0.0.1:1"], "unresolved: the IP entry only");
        assert!(apply(
            &mut c,
            &answer(Ok(vec!["10.0.0.1:80", "10.0.0.2:80"]))
        ));
        assert_eq!(blue(&c), ["127.0.0.1:1", "10.0.0.1:80", "10.0.0.2:80"]);
        assert_eq!(c.services[0].green.upstreams.len(), 2);
        // Failure: the set is kept, the name is marked, and that is a change to publish once.
        assert!(apply(&mut c, &answer(Err("nxdomain"))));
        assert_eq!(blue(&c), ["127.0.0.1:1", "10.0.0.1:80", "10.0.0.2:80"]);
        assert!(c.services[0].blue.names().all(|n| n.error.is_some()));
        assert!(!apply(&mut c, &answer(Err("nxdomain"))));
        // Recovery with another answer.
        assert!(apply(&mut c, &answer(Ok(vec!["10.0.0.3:80"]))));
        assert_eq!(blue(&c), ["127.0.0.1:1", "10.0.0.3:80"]);
        assert!(!apply(&mut c, &answer(Ok(vec!["10.0.0.3:80"]))));
        // A reloaded config starts from the last good set.
        let mut fresh = config();
        carry_over(&mut fresh, &c);
        assert_eq!(blue(&fresh), ["127.0.0.1:1", "10.0.0.3:80"]);
    }

    #[tokio::test]
    async fn hosts_file_answers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("hosts");
        std::fs::write(&p, "# c\n10.0.0.1 a.test b.test\n::1 a.test\n").expect("write");
        let r = HostsFile(p);
        let got = r.lookup("A.test", 8).await.expect("found");
        assert_eq!(got.len(), 2);
        // Written fully qualified, the same name.
        let got = r.lookup("a.test.", 8).await.expect("found");
        assert_eq!(got.len(), 2);
        assert!(r.lookup("c.test", 8).await.is_err());
        // A file that is not there is named in the error.
        let gone = HostsFile(dir.path().join("gone"));
        let e = gone.lookup("a.test", 8).await.expect_err("no file");
        assert!(e.to_string().contains("gone"), "{e}");
    }
}
