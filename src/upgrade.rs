//! Upgrading Switchyard without refusing a connection: `serve --upgrade` takes the listening
//! sockets over from the running process, as Pingora, HAProxy (`expose-fd listeners`) and
//! Envoy's hot restart do.
//!
//! Every running process listens on a Unix socket (`[proxy] upgrade_socket`). The exchange:
//!
//! 1. the new process connects and writes `switchyard-upgrade 1\n`;
//! 2. the old one stops taking changes (flips answer 503), then answers with one `sendmsg`: a
//!    JSON line naming its listeners and holding the live state it serves
//!    (`{"pid":…,"listeners":["proxy.listen","admin.listen",…],"states":{…},"names":[…]}`:
//!    `names` the upstream names' last good addresses, kept by the new process for a name it
//!    cannot resolve; both optional, absent from an older Switchyard) and, as
//!    `SCM_RIGHTS`, the listening sockets themselves, in the same order;
//! 3. the new process loads the live state (file or etcd; with the file backend and no state
//!    file, the old process's `states`, written back), starts accepting on those sockets,
//!    binds the upgrade socket itself, and writes `ready\n`;
//! 4. the old process stops accepting and drains its connections within `shutdown_grace`, then
//!    exits 0.
//!
//! Both processes hold the same kernel sockets, so a connection that arrives meanwhile waits in
//! the one accept queue until either accepts it: none is refused. If the new process fails before
//! step 3 (a bad config, a crash), the old one keeps serving as if nothing happened.
//!
//! The file descriptors travel through rustix's safe `sendmsg`/`recvmsg` wrappers (`OwnedFd` in,
//! `OwnedFd` out); this crate has no `unsafe`.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use crate::app::App;
use crate::state::ServiceState;

const HELLO: &[u8] = b"switchyard-upgrade 1\n";
/// Why an upgrade in place is refused where the running Switchyard's exit ends its PID
/// namespace (see [`exit_ends_namespace`]).
const PID_1: &str = "once it has handed over and drained, its exit ends the container and the new process with it; upgrade by replacing the container (a rolling update)";
/// What the old process answers a hello with instead of an offer when it refuses.
const REFUSED: &str = "refused: ";

/// Why this process's exit would end its PID namespace, the successor with it: it is PID 1 (a
/// container's `ENTRYPOINT` without an init), or its parent is PID 1 and a container init that
/// exits with its one child (tini, which `docker run --init` runs, dumb-init, catatonit).
/// None elsewhere (systemd, a shell, a supervisor that stays).
pub fn exit_ends_namespace() -> Option<String> {
    if std::process::id() == 1 {
        return Some(format!(
            "the running Switchyard is PID 1 (a container): {PID_1}"
        ));
    }
    if std::os::unix::process::parent_id() == 1 {
        let comm = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
        let init = comm.trim();
        if matches!(init, "tini" | "docker-init" | "dumb-init" | "catatonit") {
            return Some(format!(
                "the running Switchyard's parent is {init}, PID 1 of a container, which exits when it does: {PID_1}"
            ));
        }
    }
    None
}
const READY: &[u8] = b"ready\n";
/// The old process's answer to "ready": it stops accepting and drains; this one serves.
const GO: &[u8] = b"go\n";
/// The least the new process waits for the old one's answer to "ready" ([`Inherited::ready`]).
const MIN_ANSWER_WAIT: Duration = Duration::from_secs(5);

/// What the old process says when it stops waiting (`proxy.upgrade_timeout`) and serves on.
const ABORT: &[u8] = b"abort\n";
/// Descriptors one handover carries: proxy, TLS, preview, admin, the state lock, and each
/// `per_worker` socket (two per worker with TLS). The kernel's limit for one message
/// (`SCM_MAX_FD`): up to ~125 workers with TLS, ~250 without.
pub const MAX_FDS: usize = 253;
/// The state file's lock among the descriptors handed over ([`StateLock`]). An older
/// Switchyard taking over does not know the key and closes it (the old process's copy holds
/// the lock until it exits).
const LOCK_KEY: &str = "state.lock";

#[derive(serde::Serialize, serde::Deserialize)]
struct Offer {
    pid: u32,
    listeners: Vec<String>,
    /// The live state of every service as the old process serves it, read once its changes
    /// stopped. Absent from an older Switchyard (and an older one ignores it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    states: Option<BTreeMap<String, ServiceState>>,
    /// Every upstream name's last good addresses (and failure state) in the old process: the
    /// new one keeps them for a name it cannot resolve. Absent from an older Switchyard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    names: Option<Vec<crate::resolve::KnownName>>,
}

/// Listening sockets received from the old process, by config key (`proxy.listen`,
/// `proxy.listen#1` for the second `per_worker` socket, `admin.listen`, …).
#[derive(Default)]
pub struct Inherited {
    /// The descriptors by key: listening sockets, and the state file's lock ([`LOCK_KEY`]).
    listeners: HashMap<String, OwnedFd>,
    /// The old process: told `ready` once the new one serves.
    old: Option<UnixStream>,
    pub old_pid: u32,
    /// The live state the old process served when it handed over (none from an older one).
    pub states: Option<HashMap<String, ServiceState>>,
    /// The upstream names' last good addresses in the old process (none from an older one).
    pub names: Option<Vec<crate::resolve::KnownName>>,
}

impl Inherited {
    /// The socket for `key` if the old process had one on the address the config names (any
    /// port when the config says port 0). A changed address is bound anew instead.
    pub fn take(&mut self, key: &str, want: SocketAddr) -> Option<std::net::TcpListener> {
        let l = std::net::TcpListener::from(self.listeners.remove(key)?);
        let have = l.local_addr().ok()?;
        let same = have == want || (want.port() == 0 && have.ip() == want.ip());
        if !same {
            tracing::warn!(
                listener = key, old = %have, new = %want,
                "the address changed; the old socket is closed with the old process"
            );
            return None;
        }
        l.set_nonblocking(true).ok()?;
        Some(l)
    }

    /// The sockets left under `prefix` (`proxy.listen#`): the old process's `per_worker`
    /// sockets beyond this one's workers, on the address `want` (where this process listens;
    /// the others are closed with the old process, as a changed address is). They stay in the
    /// kernel's `SO_REUSEPORT` group, which gives each its share of new connections, for as
    /// long as any process holds them: this one must accept on them too.
    pub fn take_rest(
        &mut self,
        prefix: &str,
        want: SocketAddr,
    ) -> Vec<(String, std::net::TcpListener)> {
        let mut keys: Vec<String> = self
            .listeners
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        keys.sort();
        keys.into_iter()
            .filter_map(|k| self.take(&k, want).map(|l| (k, l)))
            .collect()
    }

    /// The runtime to run when the config does not name one: `per_worker` (the default)
    /// needs `SO_REUSEPORT` sockets beside `proxy.listen`, and a process that ran `shared` (the
    /// default before) hands over one plain socket that no other can share. Taking over from
    /// it, this one runs `shared` too until its next restart, rather than refuse the upgrade.
    pub fn settle_runtime(&self, proxy: &mut crate::config::ProxyConfig) {
        let workers = proxy
            .workers
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        // Only a socket this process would take (the same address) and share (several workers).
        let plain = self.listeners.get("proxy.listen").is_some_and(|fd| {
            let sock = socket2::SockRef::from(fd);
            let same = sock
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .is_some_and(|a| {
                    a == proxy.listen || (proxy.listen.port() == 0 && a.ip() == proxy.listen.ip())
                });
            same && sock.reuse_port().ok() == Some(false)
        });
        if plain
            && workers > 1
            && !proxy.runtime_set
            && proxy.runtime == crate::config::RuntimeFlavor::PerWorker
        {
            tracing::warn!(
                "--upgrade: the running process hands over one plain socket on proxy.listen (it ran [proxy] runtime = \"shared\", the default before, or one worker), which no other worker can share: this one runs \"shared\" too; the default \"per_worker\" takes effect at the next restart (set runtime = \"shared\" to keep it)"
            );
            proxy.runtime = crate::config::RuntimeFlavor::Shared;
        }
    }

    /// Whether this process takes over from a running one (`serve --upgrade`).
    pub fn upgrading(&self) -> bool {
        self.old.is_some()
    }

    /// Whether the old process still waits for this one to say it serves: false once it gave
    /// up (past its `proxy.upgrade_timeout` it serves on). True without an old process, and
    /// when it died: then this one must serve, nobody else does. Does not block.
    pub fn old_still_waits(&self) -> bool {
        match &self.old {
            None => true,
            Some(s) => match said(s) {
                Said::Nothing => true,
                Said::Something => false,
                Said::Closed => !alive(self.old_pid),
            },
        }
    }

    /// Tells the old process that this one serves, and takes its answer: true when this one
    /// is the server now, false when the old one gave up first and serves on (this one must
    /// then not). One side decides: the old process reads "ready" within its timeout and says
    /// "go", or says "abort" and reads nothing more. An older Switchyard says neither: it
    /// closes the connection, before "ready" when it gave up (it is still alive), after it
    /// when it drains. A closed connection and a dead old process: this one serves. The
    /// answer is waited for up to `wait` (`proxy.upgrade_timeout`, at least
    /// [`MIN_ANSWER_WAIT`]; this process already serves
    /// meanwhile, as the old one does until it reads "ready"). An "abort" comes at once or not
    /// at all, so an old process still silent then read "ready" and was stopped before its
    /// "go" (SIGSTOP, a frozen cgroup): this one serves, and stops waiting, so that it starts
    /// acting on signals; the connection is kept open, so the old one's "go" still lands when
    /// it runs again, and it drains.
    pub async fn ready(&mut self, wait: Duration) -> bool {
        let Some(s) = self.old.take() else {
            return true;
        };
        let old_pid = self.old_pid;
        match said(&s) {
            Said::Nothing => {}
            Said::Something => return false,
            Said::Closed => return !alive(old_pid),
        }
        let Ok(mut s) = s
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(s))
        else {
            tracing::error!("upgrade: cannot use the connection to the old process; serving");
            return true;
        };
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        if let Err(e) = s.write_all(READY).await {
            // It closed just now: after an "abort" (still there to read), or gone.
            let mut buf = [0u8; 8];
            if let Ok(n) = s.try_read(&mut buf) {
                if buf[..n].starts_with(ABORT) {
                    return false;
                }
            }
            tracing::warn!(error = %e, "upgrade: the old process closed the connection before it was told");
            return !alive(old_pid);
        }
        let answer = async move {
            let mut answer = Vec::with_capacity(8);
            let mut byte = [0u8; 1];
            while answer.len() < 8 && !answer.ends_with(b"\n") {
                match s.read(&mut byte).await {
                    Ok(1) => answer.push(byte[0]),
                    _ => break,
                }
            }
            answer
        };
        let mut answer = Box::pin(answer);
        // Never less than `MIN_ANSWER_WAIT`, whatever a (tiny) upgrade_timeout says: an "abort"
        // sent just as "ready" arrived must be read here, not after this one serves.
        match tokio::time::timeout(wait.max(MIN_ANSWER_WAIT), &mut answer).await {
            // "go"; or nothing and closed: an older Switchyard draining, or one that died.
            Ok(answer) => answer != ABORT,
            Err(_) => {
                tracing::warn!(
                    old_pid,
                    "upgrade: the old process read \"ready\" but has not answered within {} (proxy.upgrade_timeout): is it stopped? This one serves; the old one drains once it runs again",
                    humantime::format_duration(wait)
                );
                tokio::spawn(async move {
                    let said = answer.await;
                    let text = String::from_utf8_lossy(&said);
                    if said == GO {
                        tracing::info!(
                            old_pid,
                            "upgrade: the old process said \"go\" at last; it drains"
                        );
                    } else {
                        // It gave up after all (or went away): it may be serving beside this
                        // one, on the same sockets.
                        tracing::error!(
                            old_pid,
                            answer = %text.trim_end(),
                            "upgrade: the old process answered at last, and not \"go\": it may serve beside this one; stop one of them (kill -TERM {old_pid} to keep this one)"
                        );
                    }
                });
                true
            }
        }
    }
}

/// What the old process has said on the upgrade connection before this one's "ready".
enum Said {
    Nothing,
    /// "abort" (the only thing it sends before "ready").
    Something,
    Closed,
}

/// Peeks without blocking.
fn said(s: &UnixStream) -> Said {
    let mut byte = [0u8; 1];
    match rustix::net::recv(
        s,
        &mut byte[..],
        rustix::net::RecvFlags::PEEK | rustix::net::RecvFlags::DONTWAIT,
    ) {
        Ok((_, n)) if n > 0 => Said::Something,
        Ok(_) => Said::Closed,
        Err(e) if e == rustix::io::Errno::AGAIN || e == rustix::io::Errno::INTR => Said::Nothing,
        Err(_) => Said::Closed,
    }
}

/// Whether process `pid` is alive (not gone, not a zombie), from `/proc` (Linux). An older old
/// process that gave up closes the connection without a word and lives on; one that died does
/// not.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses: "pid (comm) S ...".
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// An exclusive `flock` on the lock file beside the state file (`state.path` with the extension
/// `.lock`, holding the pid of the process that took it), held while this process serves that
/// state and handed to the new process with the listening sockets on an upgrade (the same open
/// file, so the same lock: it is never free in between). It keeps a second Switchyard from
/// serving the same state file, whatever its upgrade socket.
pub struct StateLock {
    file: std::fs::File,
}

/// The lock file of the state file `state`.
pub fn lock_path(state: &Path) -> PathBuf {
    state.with_extension("lock")
}

/// Another process holds the lock: its pid as it wrote it (empty if unknown).
struct Held(String);

impl StateLock {
    /// Takes the lock for this process. Ok(None) where no lock can be had (a directory this
    /// process cannot write, a file system without locks): logged, and it serves without one.
    fn take(state: &Path) -> Result<Option<StateLock>, Held> {
        let path = lock_path(state);
        let opened = (|| {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
        })();
        let file = match opened {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(lock = %path.display(), error = %e, "cannot open the state file's lock; serving without it");
                return Ok(None);
            }
        };
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => {
                let pid = std::fs::read_to_string(&path).unwrap_or_default();
                return Err(Held(pid.trim().to_string()));
            }
            Err(e) => {
                tracing::warn!(lock = %path.display(), error = %e, "cannot lock the state file's lock; serving without it");
                return Ok(None);
            }
        }
        let lock = StateLock { file };
        lock.mark();
        Ok(Some(lock))
    }

    /// The lock the old process handed over, if it is the lock of `state` (the file there now:
    /// a changed `state.path` has another).
    fn handed(fd: OwnedFd, state: &Path) -> Option<StateLock> {
        use std::os::unix::fs::MetadataExt;
        let file = std::fs::File::from(fd);
        let have = file.metadata().ok()?;
        let want = std::fs::metadata(lock_path(state)).ok()?;
        if have.dev() != want.dev() || have.ino() != want.ino() {
            return None;
        }
        let lock = StateLock { file };
        lock.mark();
        Some(lock)
    }

    /// Writes this process's pid into the lock file: what a refused process names.
    fn mark(&self) {
        use std::os::unix::fs::FileExt;
        let pid = format!("{}\n", std::process::id());
        let _ = self
            .file
            .set_len(0)
            .and_then(|()| self.file.write_all_at(pid.as_bytes(), 0));
    }
}

impl From<StateLock> for OwnedFd {
    fn from(l: StateLock) -> OwnedFd {
        l.file.into()
    }
}

/// The pid (maybe empty) of the process that holds the lock of state file `state`, if one
/// does: `serve --reset-state` checks it before it moves the file aside. Blocking.
pub fn state_held_by(state: &Path) -> Option<String> {
    match StateLock::take(state) {
        Err(Held(pid)) => Some(pid),
        // Taken (and let go at once) or not lockable: nobody is known to serve it.
        Ok(_) => None,
    }
}

/// Before a process binds anything, makes sure it is the only one serving its state. A plain
/// start (`serve` without `--upgrade`) is refused while another Switchyard serves the same state
/// file (its [`StateLock`] is held) or listens on the same upgrade socket (a connect succeeds; a
/// stale socket file, nobody listening, is replaced as before). An upgrade keeps the lock the
/// old process handed over, or takes it. `state`: the state file (None with etcd, which replicas
/// share by design). Returns the lock this process holds, if any.
pub async fn claim(
    state: Option<PathBuf>,
    socket: PathBuf,
    inherited: &mut Inherited,
) -> anyhow::Result<Option<StateLock>> {
    let handed = inherited.listeners.remove(LOCK_KEY);
    let upgrading = inherited.upgrading();
    tokio::task::spawn_blocking(move || {
        let lock = match &state {
            None => None,
            Some(state) => match handed.and_then(|fd| StateLock::handed(fd, state)) {
                Some(l) => Some(l),
                None => match StateLock::take(state) {
                    Ok(l) => l,
                    Err(Held(pid)) => {
                        let who = if pid.is_empty() {
                            "another Switchyard".to_string()
                        } else {
                            format!("another Switchyard (pid {pid})")
                        };
                        if upgrading {
                            anyhow::bail!(
                                "--upgrade: the state file {} is in use by {who}, which holds its lock {}, not the process that answered on proxy.upgrade_socket {}; stop that one first",
                                state.display(),
                                lock_path(state).display(),
                                socket.display()
                            );
                        }
                        anyhow::bail!(
                            "the state file {} is in use by {who}, which holds its lock {}: two processes must not write one state file. To replace the running one, start this one with --upgrade (the running one answers on its proxy.upgrade_socket; this config names {}); or stop it first",
                            state.display(),
                            lock_path(state).display(),
                            socket.display()
                        );
                    }
                },
            },
        };
        if !upgrading && UnixStream::connect(&socket).is_ok() {
            anyhow::bail!(
                "proxy.upgrade_socket {}: another Switchyard answers there (it serves this state{}). To replace it, start this one with --upgrade; or stop it first",
                socket.display(),
                state
                    .as_ref()
                    .map(|s| format!(", state file {}", s.display()))
                    .unwrap_or_default()
            );
        }
        Ok(lock)
    })
    .await?
}

/// How long `--upgrade` tries a socket nobody listens on: a process that has just taken over
/// binds the upgrade socket only once it serves and the one before it said "go", so an upgrade
/// right after another one can find the old process's socket file, closed.
const TAKEOVER_BIND_WAIT: Duration = Duration::from_secs(10);

/// Connects to the socket at `path`, trying again while it exists but refuses (for `wait`);
/// no file there is an error at once. Blocking: runs before the runtime starts.
fn connect_patiently(path: &Path, wait: Duration) -> std::io::Result<UnixStream> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match UnixStream::connect(path) {
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && tokio::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

/// The new process's side: asks the process behind `path` for its listening sockets.
/// Blocking: runs before the runtime starts.
pub fn request(path: &Path) -> anyhow::Result<Inherited> {
    let mut s = connect_patiently(path, TAKEOVER_BIND_WAIT).with_context(|| {
        let relative = match std::env::current_dir() {
            Ok(cwd) if path.is_relative() => {
                format!(" (relative to the working directory {})", cwd.display())
            }
            _ => String::new(),
        };
        format!(
            "proxy.upgrade_socket: no running Switchyard answers at {}{relative} (start without --upgrade)",
            path.display()
        )
    })?;
    if rustix::net::sockopt::socket_peercred(&s).is_ok_and(|c| c.pid.is_init()) {
        anyhow::bail!("the running Switchyard is PID 1 (a container): {PID_1}");
    }
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    s.set_write_timeout(Some(Duration::from_secs(30)))?;
    s.write_all(HELLO)?;

    let mut data = vec![0u8; 16 * 1024];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = rustix::net::recvmsg(
        &s,
        &mut [IoSliceMut::new(&mut data)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| {
        // The running process serves one upgrade at a time and drops any other connection.
        let busy = if e == rustix::io::Errno::CONNRESET {
            " (another serve --upgrade is probably taking the sockets over right now)"
        } else {
            ""
        };
        anyhow::anyhow!("receiving the listening sockets: {e}{busy}")
    })?;
    if got.flags.contains(ReturnFlags::CTRUNC) {
        anyhow::bail!(
            "the running process sent more sockets than one handover carries ({MAX_FDS}): lower [proxy] workers (each per_worker worker hands over one socket, two with TLS)"
        );
    }
    let mut fds: Vec<OwnedFd> = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    data.truncate(got.bytes);
    // The JSON line may come in more than one read; the descriptors came with its first byte.
    while !data.contains(&b'\n') {
        let mut more = [0u8; 4096];
        let n = s.read(&mut more)?;
        if n == 0 {
            anyhow::bail!("the running process closed the upgrade connection");
        }
        data.extend_from_slice(&more[..n]);
    }
    let line = data.split(|b| *b == b'\n').next().unwrap_or_default();
    if let Some(why) = line.strip_prefix(REFUSED.as_bytes()) {
        anyhow::bail!(
            "the running process refused the upgrade: {}",
            String::from_utf8_lossy(why)
        );
    }
    let offer: Offer =
        serde_json::from_slice(line).context("the running process sent an unreadable offer")?;
    if offer.listeners.len() != fds.len() {
        anyhow::bail!(
            "the running process named {} listeners but sent {} sockets",
            offer.listeners.len(),
            fds.len()
        );
    }
    let listeners = offer.listeners.into_iter().zip(fds).collect();
    s.set_read_timeout(None)?;
    Ok(Inherited {
        listeners,
        old: Some(s),
        old_pid: offer.pid,
        states: offer.states.map(|m| m.into_iter().collect()),
        names: offer.names,
    })
}

/// What is wrong with `path` as the upgrade socket when something other than a socket is there
/// (`m` is its `symlink_metadata`): it is never removed to make room.
pub fn not_a_socket(path: &Path, m: &std::fs::Metadata) -> String {
    let t = m.file_type();
    let kind = if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_file() {
        "a regular file"
    } else {
        "not a socket"
    };
    format!(
        "{} exists and is {kind}; only a stale socket there is replaced, so nothing was removed: name a path of its own for the upgrade socket",
        path.display()
    )
}

/// The old process's side: listens on `path` and hands `listeners` over to a new process, then
/// shuts this one down. The sockets (duplicates) are dropped as soon as shutdown begins, so a
/// plain SIGTERM still closes the listening sockets at once.
pub struct Handover {
    listener: tokio::net::UnixListener,
    path: PathBuf,
    /// The socket file this process bound (device, inode): removed when it stops serving
    /// without an upgrade, never once a new process has bound its own at the same path.
    bound: Option<(u64, u64)>,
    fds: Vec<(String, OwnedFd)>,
}

/// Removes the upgrade socket at `path` if it is still the file `bound` (a plain stop: a later
/// `serve --upgrade` then fails at once, "no running Switchyard", rather than after its retries
/// against a socket nobody listens on). A new process's socket there is left alone.
fn remove_if_ours(path: &Path, bound: Option<(u64, u64)>) {
    let ours = std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()));
    if ours.is_some() && ours == bound {
        let _ = std::fs::remove_file(path);
    }
}

/// A duplicate of a listening socket's descriptor, kept for a later upgrade.
pub fn keep(socket: &impl AsFd) -> std::io::Result<OwnedFd> {
    socket.as_fd().try_clone_to_owned()
}

impl Handover {
    /// Binds the upgrade socket, replacing a stale file (or the old process's socket after an
    /// upgrade: it has handed over and is draining).
    pub fn bind(path: &Path) -> anyhow::Result<Handover> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| {
                format!("proxy.upgrade_socket: cannot create {}", dir.display())
            })?;
        }
        // Only a socket is replaced: a path naming anything else (the config file, the state
        // file) is an error, and nothing is removed.
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("proxy.upgrade_socket: cannot replace {}", path.display())
                    })
                }
            },
            Ok(m) => anyhow::bail!("proxy.upgrade_socket: {}", not_a_socket(path, &m)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("proxy.upgrade_socket: cannot inspect {}", path.display())
                })
            }
        }
        let listener = tokio::net::UnixListener::bind(path).with_context(|| {
            format!("proxy.upgrade_socket: cannot listen on {}", path.display())
        })?;
        let bound = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Ok(Handover {
            listener,
            path: path.to_path_buf(),
            bound,
            fds: Vec::new(),
        })
    }

    /// Adds a listening socket to hand over (a duplicate of its descriptor: [`keep`]).
    pub fn add(&mut self, key: String, fd: OwnedFd) {
        self.fds.push((key, fd));
    }

    /// Adds the state file's lock: handed over with the sockets, and let go of (with the upgrade
    /// socket) once this process stops serving.
    pub fn add_lock(&mut self, lock: StateLock) {
        self.fds.push((LOCK_KEY.to_string(), lock.into()));
    }

    /// Answers upgrade requests until one succeeds (then shuts this process down) or shutdown
    /// begins.
    pub async fn run(self, app: Arc<App>) {
        let Handover {
            listener,
            path,
            bound,
            fds,
        } = self;
        // A stop of this process while no handover is under way.
        let stopped = || remove_if_ours(&path, bound);
        let fds = Arc::new(fds);
        loop {
            let stream = tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "upgrade socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = app.shutdown.cancelled() => return stopped(),
            };
            let Ok(std) = stream.into_std().and_then(|s| {
                s.set_nonblocking(false)?;
                Ok(s)
            }) else {
                continue;
            };
            let greeting = tokio::task::spawn_blocking(move || greeted(std));
            let greeted = tokio::select! {
                r = greeting => r,
                () = app.shutdown.cancelled() => return stopped(),
            };
            let greeted = match greeted {
                Ok(Ok(Some(g))) => g,
                Ok(Ok(None)) => {
                    tracing::info!(
                        socket = %path.display(),
                        "upgrade socket: a starting process found this one serving (a second serve of this state is refused; --upgrade takes over)"
                    );
                    continue;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %format!("{e:#}"), "upgrade aborted; this process keeps serving");
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "upgrade task failed; this process keeps serving");
                    continue;
                }
            };
            // Where this process's exit would take the new one with it, the new one is told why
            // (it refuses on its own where it sees that the running one is PID 1).
            if let Some(why) = exit_ends_namespace() {
                tracing::error!("upgrade refused: {why}");
                let (mut s, _) = greeted;
                let _ = tokio::task::spawn_blocking(move || {
                    s.write_all(format!("{REFUSED}{why}\n").as_bytes())
                })
                .await;
                continue;
            }
            // No flip may land between the new process reading the live state and this one
            // stopping: it would be answered here and never served there.
            let freeze = app.freeze_changes().await;
            let fds2 = fds.clone();
            let snapshot = app.snapshot();
            // Read at each upgrade: a reload can lengthen it for a slow successor.
            let wait = snapshot.config.proxy.upgrade_timeout;
            // What this process serves, no change possible any more: the new one starts from it
            // when it has no state file.
            let states = snapshot
                .services
                .iter()
                .map(|s| (s.name().to_string(), s.state.clone()))
                .collect();
            // The names' last good addresses: the new one keeps them for a name it cannot
            // resolve (a resolver outage must not empty a pool this one serves).
            let names = crate::resolve::known_names(&snapshot.config);
            drop(snapshot);
            let exchange = tokio::task::spawn_blocking(move || {
                hand_over(greeted, &fds2, wait, (states, names))
            });
            // Stopped mid-exchange: the socket stays, since the handover (still running) may
            // yet tell the new process to serve, and it binds its own socket at this path.
            let outcome = tokio::select! {
                r = exchange => r,
                () = app.shutdown.cancelled() => return,
            };
            match outcome {
                Ok(Ok(pid)) => {
                    freeze.handed_over();
                    tracing::info!(
                        new_pid = pid,
                        socket = %path.display(),
                        "upgrade: the new process serves on the same sockets; this one stops accepting and drains"
                    );
                    app.shutdown.cancel();
                    return;
                }
                Ok(Err(e)) => {
                    mark_lock_again(&fds).await;
                    tracing::warn!(
                        error = %format!("{e:#}"),
                        "upgrade aborted; this process keeps serving"
                    )
                }
                Err(e) => {
                    mark_lock_again(&fds).await;
                    tracing::error!(error = %e, "upgrade task failed; this process keeps serving")
                }
            }
        }
    }
}

/// After an aborted upgrade: the state file's lock names this process again. The new process
/// wrote its pid there when it took the lock over, before it was told to serve, and a process
/// refused later would name that one, gone.
async fn mark_lock_again(fds: &Arc<Vec<(String, OwnedFd)>>) {
    let fds = fds.clone();
    let _ = tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let Some((_, fd)) = fds.iter().find(|(k, _)| k == LOCK_KEY) else {
            return;
        };
        let Ok(fd) = fd.try_clone() else {
            return;
        };
        let file = std::fs::File::from(fd);
        let pid = format!("{}\n", std::process::id());
        let _ = file
            .set_len(0)
            .and_then(|()| file.write_all_at(pid.as_bytes(), 0));
    })
    .await;
}

/// The first step of an exchange on a blocking socket: the new process's hello. None when the
/// peer closed without a word: a starting `serve` checking whether this process serves.
fn greeted(s: UnixStream) -> anyhow::Result<Option<(UnixStream, BufReader<UnixStream>)>> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(s.try_clone()?);
    let mut hello = String::new();
    reader.read_line(&mut hello)?;
    if hello.is_empty() {
        return Ok(None);
    }
    if hello.as_bytes() != HELLO {
        anyhow::bail!("not an upgrade request: {:?}", hello.trim_end());
    }
    Ok(Some((s, reader)))
}

/// The rest of it, after the hello: the offer with the descriptors, then wait for ready.
fn hand_over(
    (mut s, mut reader): (UnixStream, BufReader<UnixStream>),
    fds: &[(String, OwnedFd)],
    wait: Duration,
    (states, names): (
        BTreeMap<String, ServiceState>,
        Vec<crate::resolve::KnownName>,
    ),
) -> anyhow::Result<u32> {
    let offer = Offer {
        pid: std::process::id(),
        listeners: fds.iter().map(|(k, _)| k.clone()).collect(),
        states: Some(states),
        names: Some(names),
    };
    let mut line = serde_json::to_vec(&offer)?;
    line.push(b'\n');
    let borrowed: Vec<_> = fds.iter().map(|(_, fd)| fd.as_fd()).collect();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(borrowed.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if borrowed.len() > MAX_FDS || !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        anyhow::bail!(
            "{} listening sockets to hand over, more than one handover carries ({MAX_FDS}): lower [proxy] workers and restart",
            borrowed.len()
        );
    }
    let sent = rustix::net::sendmsg(&s, &[IoSlice::new(&line)], &mut control, SendFlags::empty())
        .context("sending the listening sockets")?;
    if sent < line.len() {
        s.write_all(&line[sent..])?;
    }
    tracing::info!(
        listeners = ?offer.listeners,
        "upgrade: listening sockets handed to a new process; waiting for it to serve"
    );
    // The new process loads its state and starts its listeners before it says ready. Past
    // `wait` this one gives up: it says "abort" (the new process then exits instead of serving
    // beside it) and keeps serving, its listeners never having stopped. Whatever it says later
    // is not read: this side decided.
    s.set_read_timeout(Some(wait))?;
    let mut answer = String::new();
    reader.get_mut().set_read_timeout(Some(wait))?;
    match reader.read_line(&mut answer) {
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            let _ = s.write_all(ABORT);
            anyhow::bail!(
                "the new process did not say it serves within {} (proxy.upgrade_timeout); it is told to exit",
                humantime::format_duration(wait)
            );
        }
        Err(e) => return Err(e.into()),
    }
    if answer.as_bytes() != READY {
        anyhow::bail!("the new process went away before it served (it logs why)");
    }
    // It serves; this one drains. systemd follows it from now (before "go", so that this
    // process's exit never finds systemd still following it).
    let pid = peer_pid(&s);
    if pid != 0 {
        sd_notify(&format!("MAINPID={pid}"));
    }
    if let Err(e) = s.write_all(GO) {
        // It is gone: this one serves on.
        sd_notify(&format!("MAINPID={}", std::process::id()));
        return Err(e).context("the new process went away before it was told to serve");
    }
    Ok(pid)
}

/// The new process's pid, from the socket's peer credentials where available.
fn peer_pid(s: &UnixStream) -> u32 {
    rustix::net::sockopt::socket_peercred(s)
        .map(|c| c.pid.as_raw_nonzero().get() as u32)
        .unwrap_or(0)
}

/// The path this process was started from, found at startup ([`remember_binary`]).
static STARTED_FROM: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();

/// Finds the path this process was started from, once, while the binary there is still the
/// running one (before a package update replaces it): what SIGUSR2 starts. Blocking (a few
/// `stat`s): call it off the runtime's threads.
pub fn remember_binary() {
    STARTED_FROM.get_or_init(started_from);
}

/// `argv[0]` as the shell or supervisor resolved it, if it names the running binary (the same
/// file as `/proc/self/exe`); else the running binary's own path.
fn started_from() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok();
    let named = std::env::args_os().next().and_then(|a| {
        resolve_argv0(
            Path::new(&a),
            std::env::var_os("PATH").as_deref(),
            std::env::current_dir().ok().as_deref(),
        )
    });
    match (named, exe) {
        (Some(p), Some(e)) if crate::config::same_file(&p, &e) => Some(p),
        (Some(p), None) => Some(p),
        (_, e) => e,
    }
}

/// Where `argv0` was started from: with a `/`, that path (made absolute against `cwd`); a bare
/// name, the first executable file of that name in `path` (`$PATH`), as `execvp` and the shell
/// look it up (an empty entry is the current directory).
fn resolve_argv0(
    argv0: &Path,
    path: Option<&std::ffi::OsStr>,
    cwd: Option<&Path>,
) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let absolute = |p: PathBuf| -> Option<PathBuf> {
        if p.is_absolute() {
            Some(p)
        } else {
            cwd.map(|c| c.join(p))
        }
    };
    if argv0.as_os_str().is_empty() {
        return None;
    }
    if argv0.as_os_str().as_bytes().contains(&b'/') {
        return absolute(argv0.to_path_buf());
    }
    std::env::split_paths(path?)
        .map(|dir| {
            if dir.as_os_str().is_empty() {
                PathBuf::from(".").join(argv0)
            } else {
                dir.join(argv0)
            }
        })
        .find(|c| is_executable(c))
        .and_then(absolute)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// SIGUSR2: starts the binary at the path this process was started from ([`remember_binary`]:
/// `argv[0]` made absolute against the start directory, or a bare name looked up in `PATH` as
/// the shell did; after a package update, the new binary there) with `serve --config FILE
/// --upgrade`, in this process's cgroup, so a supervisor such as systemd keeps the service (see
/// `deploy/systemd/switchyard.service`). The child takes the sockets over as `serve --upgrade`
/// does; if it fails, this process keeps serving and logs its exit status.
pub fn spawn_successor(config: &Path, log_format_json: bool) {
    if let Some(why) = exit_ends_namespace() {
        tracing::error!("upgrade on SIGUSR2 refused: {why}");
        return;
    }
    // One successor at a time: a second SIGUSR2 while one starts (or serves, this process
    // draining) would start a process that can only fail.
    static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if STARTED.swap(true, std::sync::atomic::Ordering::AcqRel) {
        tracing::warn!("upgrade on SIGUSR2 ignored: the new process started by an earlier one is still running");
        return;
    }
    let exe = STARTED_FROM.get_or_init(started_from).clone();
    let Some(exe) = exe else {
        STARTED.store(false, std::sync::atomic::Ordering::Release);
        tracing::error!("upgrade on SIGUSR2: cannot tell which binary to start");
        return;
    };
    let mut cmd = tokio::process::Command::new(&exe);
    if log_format_json {
        cmd.args(["--log-format", "json"]);
    }
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .arg("--upgrade")
        .stdin(std::process::Stdio::null());
    match cmd.spawn() {
        Ok(mut child) => {
            tracing::info!(binary = %exe.display(), pid = child.id(), "upgrade on SIGUSR2: started the new process");
            tokio::spawn(async move {
                match child.wait().await {
                    Ok(s) if s.success() => {}
                    Ok(s) => {
                        tracing::error!(status = %s, "upgrade on SIGUSR2: the new process failed; this one keeps serving")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "upgrade on SIGUSR2: cannot wait for the new process")
                    }
                }
                STARTED.store(false, std::sync::atomic::Ordering::Release);
            });
        }
        Err(e) => {
            STARTED.store(false, std::sync::atomic::Ordering::Release);
            tracing::error!(binary = %exe.display(), error = %e, "upgrade on SIGUSR2: cannot start the new process")
        }
    }
}

/// systemd's readiness protocol (`Type=notify`, `NotifyAccess=all`): `READY=1` once serving,
/// with `MAINPID=` after an upgrade so systemd follows the new process, `STOPPING=1` when
/// draining. Nothing happens without `$NOTIFY_SOCKET`.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
        }
        #[cfg(not(target_os = "linux"))]
        Some(_) => Err(std::io::ErrorKind::Unsupported.into()),
        None => sock.send_to(state.as_bytes(), &path),
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--upgrade` finding a socket file nobody listens on yet (a process that just took over
    /// binds it a moment after it serves) tries again until one does; no file is an error at
    /// once, and a socket nobody ever binds again is one after the wait.
    #[test]
    fn an_upgrade_waits_for_a_socket_that_is_about_to_listen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("s.sock");
        let missing = connect_patiently(&dir.path().join("none.sock"), Duration::from_secs(5));
        assert_eq!(
            missing.err().map(|e| e.kind()),
            Some(std::io::ErrorKind::NotFound)
        );
        drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind"));
        let t = tokio::time::Instant::now();
        let refused = connect_patiently(&sock, Duration::from_millis(300));
        assert_eq!(
            refused.err().map(|e| e.kind()),
            Some(std::io::ErrorKind::ConnectionRefused)
        );
        assert!(t.elapsed() >= Duration::from_millis(300));
        let path = sock.clone();
        let later = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            std::fs::remove_file(&path).expect("unlink the stale socket");
            let l = std::os::unix::net::UnixListener::bind(&path).expect("bind again");
            l.accept().map(|_| ())
        });
        assert!(connect_patiently(&sock, Duration::from_secs(30)).is_ok());
        assert!(later.join().expect("thread").is_ok());
    }

    /// The new process's side of the hand-over: "go" or a closed connection and it serves,
    /// "abort" and it does not; an old process that read "ready" and then says nothing (it
    /// was stopped between the two) does not keep it waiting past `wait`, and its late "go"
    /// still lands.
    #[tokio::test]
    async fn the_new_process_waits_for_the_old_ones_answer_at_most_its_upgrade_timeout() {
        use std::io::{Read, Write};
        let inherited = |old: UnixStream| Inherited {
            listeners: HashMap::new(),
            old: Some(old),
            old_pid: std::process::id(),
            states: None,
            names: None,
        };
        let bound = Duration::from_secs(20);
        for (answer, serves) in [(Some(GO), true), (Some(ABORT), false), (None, true)] {
            let (new, mut old) = UnixStream::pair().expect("socketpair");
            let mut new = inherited(new);
            let old = std::thread::spawn(move || {
                let mut ready = [0u8; 6];
                old.read_exact(&mut ready).expect("read ready");
                assert_eq!(&ready, READY);
                match answer {
                    Some(a) => old.write_all(a).expect("answer"),
                    None => drop(old),
                }
            });
            let got = tokio::time::timeout(bound, new.ready(Duration::from_secs(10))).await;
            assert_eq!(got, Ok(serves), "answer {answer:?}");
            old.join().expect("old side");
        }
        // Read "ready", then silent, the connection open: the wait ends.
        let (new, mut old) = UnixStream::pair().expect("socketpair");
        let mut new = inherited(new);
        let got = tokio::time::timeout(bound, new.ready(Duration::from_millis(200))).await;
        // (Waited `MIN_ANSWER_WAIT`, not the 200 ms asked.)
        assert_eq!(
            got,
            Ok(true),
            "a silent old process kept the new one waiting"
        );
        let mut ready = [0u8; 6];
        old.read_exact(&mut ready).expect("read ready");
        // Its "go", when it runs again, is still read (the connection was kept, not closed).
        old.write_all(GO).expect("a late go lands");
    }

    /// A stop removes the upgrade socket it bound (compared by device and inode), never one a
    /// successor bound at the same path.
    #[tokio::test]
    async fn a_stop_removes_only_the_socket_it_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("s.sock");
        let h = Handover::bind(&sock).expect("bind");
        // Ours: removed.
        remove_if_ours(&sock, h.bound);
        assert!(!sock.exists());
        // Another process's at the same path (a successor bound its own): left alone.
        let h = Handover::bind(&sock).expect("bind");
        std::fs::remove_file(&sock).expect("unlink");
        let _theirs = std::os::unix::net::UnixListener::bind(&sock).expect("bind theirs");
        remove_if_ours(&sock, h.bound);
        assert!(sock.exists(), "a successor's socket was removed");
    }

    /// The upgrade socket replaces a stale socket, and nothing else: a regular file (the config
    /// or state file named by mistake) or a directory there is an error naming
    /// `proxy.upgrade_socket`, and is left as it was.
    #[tokio::test]
    async fn bind_replaces_only_a_stale_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("c.toml");
        std::fs::write(&file, b"keep me").expect("write");
        let err = Handover::bind(&file)
            .err()
            .expect("a regular file is refused");
        let msg = format!("{err:#}");
        assert!(msg.starts_with("proxy.upgrade_socket:"), "{msg}");
        assert!(msg.contains("a regular file"), "{msg}");
        assert_eq!(std::fs::read(&file).expect("still there"), b"keep me");
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).expect("mkdir");
        std::fs::write(sub.join("x"), b"x").expect("write");
        let err = Handover::bind(&sub).err().expect("a directory is refused");
        assert!(format!("{err:#}").contains("a directory"), "{err:#}");
        assert!(sub.join("x").exists());
        // A stale socket (a listener that is gone) is replaced.
        let sock = dir.path().join("u.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind"));
        assert!(sock.exists());
        let h = Handover::bind(&sock).expect("a stale socket is replaced");
        drop(h);
    }

    /// An old process that closed the upgrade connection without a word gave up if it is
    /// alive, died if not: a zombie counts as dead.
    #[test]
    fn a_process_is_alive_until_it_exits() {
        assert!(alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        let mut waited = 0;
        while alive(pid) {
            assert!(waited < 1000, "still alive: {pid}");
            std::thread::sleep(Duration::from_millis(10));
            waited += 1;
        }
        let _ = child.wait();
        assert!(!alive(pid));
    }

    /// argv[0] with a `/` is made absolute against the start directory; a bare name is looked
    /// up in PATH (the first executable file of that name); nothing found, none.
    #[test]
    fn argv0_is_resolved_as_the_shell_did() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).expect("mkdir");
        std::fs::create_dir_all(&b).expect("mkdir");
        // In a: not executable; in b: executable.
        std::fs::write(a.join("sy"), b"").expect("write");
        std::fs::write(b.join("sy"), b"").expect("write");
        std::fs::set_permissions(b.join("sy"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let path = std::env::join_paths([&a, &b]).expect("join");
        let cwd = Path::new("/start");
        assert_eq!(
            resolve_argv0(Path::new("sy"), Some(&path), Some(cwd)),
            Some(b.join("sy"))
        );
        assert_eq!(
            resolve_argv0(Path::new("bin/sy"), Some(&path), Some(cwd)),
            Some(PathBuf::from("/start/bin/sy"))
        );
        assert_eq!(
            resolve_argv0(Path::new("/usr/bin/sy"), None, None),
            Some(PathBuf::from("/usr/bin/sy"))
        );
        assert_eq!(
            resolve_argv0(Path::new("nosuch"), Some(&path), Some(cwd)),
            None
        );
        assert_eq!(resolve_argv0(Path::new("sy"), None, Some(cwd)), None);
    }

    /// An older Switchyard's offer has no `states`: read all the same, with none.
    #[test]
    fn an_offer_without_states_is_read() {
        let offer: Offer =
            serde_json::from_str(r#"{"pid":7,"listeners":["proxy.listen"]}"#).expect("offer");
        assert!(offer.states.is_none());
        assert!(offer.names.is_none());
        assert_eq!(offer.listeners, ["proxy.listen"]);
    }

    /// What the peer said before "ready", without blocking: nothing yet, "abort", or closed.
    #[test]
    fn what_the_old_process_said_is_read_without_blocking() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        assert!(matches!(said(&a), Said::Nothing));
        b.write_all(ABORT).expect("write");
        assert!(matches!(said(&a), Said::Something));
        let (a, b) = UnixStream::pair().expect("pair");
        drop(b);
        assert!(matches!(said(&a), Said::Closed));
    }
}
