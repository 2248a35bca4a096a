//! A TCP relay the test controls, to make network faults for real between Switchyard and a
//! server (etcd): pass traffic, delay it, black-hole it (bytes read and dropped, the connection
//! kept open, as a silent packet drop looks from the ends), freeze only the connections open now,
//! or cut every connection.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward at once.
    Pass,
    /// Forward every chunk this long after it arrived (order kept).
    Delay(Duration),
    /// Forward what the client sends at once, and every answer this long after it arrived: the
    /// server acts in time, the client learns of it late.
    DelayAnswers(Duration),
    /// Read and drop everything; connections stay open.
    Blackhole,
}

struct Conn {
    frozen: AtomicBool,
    cut: CancellationToken,
}

struct Shared {
    mode: Mutex<Mode>,
    conns: Mutex<Vec<Arc<Conn>>>,
    /// A connection whose client sends these bytes is black-holed from then on (that chunk
    /// dropped): one kind of request stalls while the others pass.
    freeze_on: Mutex<Option<Vec<u8>>>,
    /// How many connections `freeze_on` black-holed.
    frozen_by_pattern: std::sync::atomic::AtomicUsize,
    /// A connection whose client sends these bytes is closed at once (that chunk dropped): one
    /// kind of request fails fast while the others pass.
    cut_on: Mutex<Option<Vec<u8>>>,
    /// How many connections `cut_on` closed.
    cut_by_pattern: std::sync::atomic::AtomicUsize,
    /// Once a client sends these bytes, the mode becomes `DelayAnswers` with this delay (for
    /// every connection, that chunk's answer included), and the pattern is spent.
    delay_on: Mutex<Option<(Vec<u8>, Duration)>>,
    /// Whether `delay_on` matched.
    delayed_by_pattern: AtomicBool,
}

pub struct Relay {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Relay {
    /// Listens on an ephemeral loopback port and relays every connection to `target`.
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay addr");
        let shared = Arc::new(Shared {
            mode: Mutex::new(Mode::Pass),
            conns: Mutex::new(Vec::new()),
            freeze_on: Mutex::new(None),
            frozen_by_pattern: std::sync::atomic::AtomicUsize::new(0),
            cut_on: Mutex::new(None),
            cut_by_pattern: std::sync::atomic::AtomicUsize::new(0),
            delay_on: Mutex::new(None),
            delayed_by_pattern: AtomicBool::new(false),
        });
        let stop = CancellationToken::new();
        let (sh, st) = (shared.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = st.cancelled() => return,
                };
                let conn = Arc::new(Conn {
                    frozen: AtomicBool::new(false),
                    cut: st.child_token(),
                });
                if let Ok(mut c) = sh.conns.lock() {
                    c.retain(|c| !c.cut.is_cancelled());
                    c.push(conn.clone());
                }
                let sh = sh.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = pump(cr, sw, sh.clone(), conn.clone(), false);
                    let down = pump(sr, cw, sh, conn.clone(), true);
                    tokio::select! {
                        _ = up => {}
                        _ = down => {}
                        _ = conn.cut.cancelled() => {}
                    }
                    conn.cut.cancel();
                });
            }
        });
        Relay { addr, shared, stop }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The mode of every connection, open now or later (frozen ones stay frozen).
    pub fn set_mode(&self, mode: Mode) {
        if let Ok(mut m) = self.shared.mode.lock() {
            *m = mode;
        }
    }

    /// Black-holes the connections open now; new ones follow the mode.
    pub fn freeze_existing(&self) {
        if let Ok(c) = self.shared.conns.lock() {
            for conn in c.iter() {
                conn.frozen.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Black-holes every connection (open now or later) whose client sends `pattern`, from the
    /// chunk that holds it on; None: no more (the ones black-holed stay so).
    pub fn freeze_when_sent(&self, pattern: Option<&[u8]>) {
        if let Ok(mut p) = self.shared.freeze_on.lock() {
            *p = pattern.map(<[u8]>::to_vec);
        }
    }

    /// How many connections [`Relay::freeze_when_sent`] black-holed so far.
    pub fn frozen_by_pattern(&self) -> usize {
        self.shared.frozen_by_pattern.load(Ordering::SeqCst)
    }

    /// Closes every connection (open now or later) whose client sends `pattern`, at the chunk
    /// that holds it (dropped); None: no more.
    pub fn cut_when_sent(&self, pattern: Option<&[u8]>) {
        if let Ok(mut p) = self.shared.cut_on.lock() {
            *p = pattern.map(<[u8]>::to_vec);
        }
    }

    /// How many connections [`Relay::cut_when_sent`] closed so far.
    pub fn cut_by_pattern(&self) -> usize {
        self.shared.cut_by_pattern.load(Ordering::SeqCst)
    }

    /// From the first request (of any connection) that holds `pattern` on, every answer comes
    /// `delay` late: the server acts on that request in time, its client learns of it late.
    /// Set before the request is sent; one-shot.
    pub fn delay_answers_when_sent(&self, pattern: &[u8], delay: Duration) {
        if let Ok(mut p) = self.shared.delay_on.lock() {
            *p = Some((pattern.to_vec(), delay));
        }
    }

    /// Whether [`Relay::delay_answers_when_sent`]'s pattern was sent.
    pub fn delayed_by_pattern(&self) -> bool {
        self.shared.delayed_by_pattern.load(Ordering::SeqCst)
    }

    /// Closes every connection open now.
    pub fn cut_all(&self) {
        if let Ok(mut c) = self.shared.conns.lock() {
            for conn in c.drain(..) {
                conn.cut.cancel();
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One direction: a reader that timestamps (or drops) chunks and a writer that sends each one
/// when its delay is over.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    answers: bool,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = async move {
        while let Some((at, data)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 16 * 1024];
        // The client's last bytes, for a pattern split across two chunks.
        let mut seen: Vec<u8> = Vec::new();
        let mut cut_seen: Vec<u8> = Vec::new();
        let mut delay_seen: Vec<u8> = Vec::new();
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let cut = if answers {
                None
            } else {
                shared.cut_on.lock().ok().and_then(|p| p.clone())
            };
            if let Some(p) = cut.filter(|p| !p.is_empty()) {
                cut_seen.extend_from_slice(&buf[..n]);
                if cut_seen.windows(p.len()).any(|w| w == p.as_slice()) {
                    shared.cut_by_pattern.fetch_add(1, Ordering::SeqCst);
                    conn.cut.cancel();
                    return;
                }
                let keep = cut_seen.len().min(p.len());
                cut_seen.drain(..cut_seen.len() - keep);
            }
            let pattern = if answers {
                None
            } else {
                shared.freeze_on.lock().ok().and_then(|p| p.clone())
            };
            if let Some(p) = pattern.filter(|p| !p.is_empty()) {
                seen.extend_from_slice(&buf[..n]);
                if seen.windows(p.len()).any(|w| w == p.as_slice())
                    && !conn.frozen.swap(true, Ordering::SeqCst)
                {
                    shared.frozen_by_pattern.fetch_add(1, Ordering::SeqCst);
                }
                let keep = seen.len().min(p.len());
                seen.drain(..seen.len() - keep);
            }
            let delay_on = if answers {
                None
            } else {
                shared.delay_on.lock().ok().and_then(|p| p.clone())
            };
            if let Some((p, d)) = delay_on.filter(|(p, _)| !p.is_empty()) {
                delay_seen.extend_from_slice(&buf[..n]);
                if delay_seen.windows(p.len()).any(|w| w == p.as_slice()) {
                    // Before this chunk goes on: its answer is delayed too.
                    if let (Ok(mut m), Ok(mut on)) = (shared.mode.lock(), shared.delay_on.lock()) {
                        *m = Mode::DelayAnswers(d);
                        *on = None;
                    }
                    shared.delayed_by_pattern.store(true, Ordering::SeqCst);
                }
                let keep = delay_seen.len().min(p.len());
                delay_seen.drain(..delay_seen.len() - keep);
            }
            let mode = shared.mode.lock().map(|m| *m).unwrap_or(Mode::Pass);
            if conn.frozen.load(Ordering::SeqCst) || mode == Mode::Blackhole {
                continue;
            }
            let delay = match mode {
                Mode::Delay(d) => d,
                Mode::DelayAnswers(d) if answers => d,
                _ => Duration::ZERO,
            };
            if tx
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                return;
            }
        }
    };
    // The writer finishes what the reader queued (a half-close keeps its order).
    tokio::join!(reader, writer);
}
