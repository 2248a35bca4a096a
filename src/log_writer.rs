//! The log's way to stderr: a bounded queue and a thread of its own. A write to stderr blocks
//! once its pipe is full, so a log reader that stops reading (a stalled collector, a container
//! runtime's log driver under pressure, `serve 2>&1 | less` left paused) would stop every
//! thread that logs, and the proxy with them. Here it costs log lines only: a line that finds
//! the queue full is dropped and counted (`switchyard_log_lines_dropped_total`), and a reader
//! that went away (EPIPE) loses the lines written meanwhile.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

// A plain thread and `main`'s exit, outside any runtime: tokio's clock (paused in tests) has
// no say here.
#[allow(clippy::disallowed_types)]
type Instant = std::time::Instant;

/// Lines queued for the writer thread at most.
const QUEUE: usize = 16 * 1024;
/// Bytes queued at most (long lines fill it before the count does).
const QUEUE_BYTES: usize = 8 * 1024 * 1024;
/// How long [`Flush`] waits for the queue to reach stderr at exit.
const FLUSH_WITHIN: Duration = Duration::from_secs(1);

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped so far because the queue was full.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// What the subscriber writes each line through (a `MakeWriter`).
#[derive(Clone)]
pub struct LogWriter {
    tx: SyncSender<Vec<u8>>,
    /// Bytes in the queue now.
    queued: Arc<AtomicUsize>,
}

/// Held by `main` until it returns: dropping it waits (at most a second) until the lines
/// queued before have been written, so that a startup error is said before the exit.
pub struct Flush {
    tx: SyncSender<Vec<u8>>,
    done: Receiver<()>,
}

/// Starts the writer thread toward `sink` (stderr in the binary).
pub fn start<W: Write + Send + 'static>(sink: W) -> io::Result<(LogWriter, Flush)> {
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(QUEUE);
    let (done_tx, done) = mpsc::sync_channel(1);
    let queued = Arc::new(AtomicUsize::new(0));
    let taken = queued.clone();
    std::thread::Builder::new()
        .name("switchyard-log".to_string())
        .spawn(move || {
            let mut sink = sink;
            while let Ok(line) = rx.recv() {
                if line.is_empty() {
                    // A flush mark: everything queued before it is written.
                    let _ = done_tx.try_send(());
                    continue;
                }
                taken.fetch_sub(line.len(), Ordering::Relaxed);
                write_line(&mut sink, &line);
            }
        })?;
    Ok((
        LogWriter {
            tx: tx.clone(),
            queued,
        },
        Flush { tx, done },
    ))
}

/// Writes one line whole. A stderr inherited non-blocking (some runtimes hand it so) is waited
/// on, briefly; a line cut by another error is ended, so that the next one starts on a line of
/// its own (a JSON log stays one object per line). Nowhere to report the error: the rest of the
/// line is lost.
fn write_line(sink: &mut impl Write, line: &[u8]) {
    let written = write_some(sink, line);
    if written > 0 && written < line.len() {
        write_some(sink, b"\n");
    }
    let _ = sink.flush();
}

/// Writes as much of `bytes` as the sink takes, waiting out `WouldBlock` for up to a second;
/// how much was written.
fn write_some(sink: &mut impl Write, bytes: &[u8]) -> usize {
    let mut rest = bytes;
    let mut waits = 0;
    while !rest.is_empty() {
        match sink.write(rest) {
            Ok(0) => break,
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && waits < 200 => {
                waits += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(_) => break,
        }
    }
    bytes.len() - rest.len()
}

impl Drop for Flush {
    fn drop(&mut self) {
        let deadline = Instant::now() + FLUSH_WITHIN;
        // An empty line is the mark; a full queue is retried until the deadline.
        loop {
            match self.tx.try_send(Vec::new()) {
                Ok(()) => break,
                Err(TrySendError::Full(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = self
            .done
            .recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

/// One log line, sent to the queue whole when the subscriber is done with it.
pub struct Line<'a> {
    to: &'a LogWriter,
    buf: Vec<u8>,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            to: self,
            buf: Vec::new(),
        }
    }
}

impl Write for Line<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for Line<'_> {
    fn drop(&mut self) {
        let len = self.buf.len();
        if len == 0 {
            return;
        }
        let queued = &self.to.queued;
        if queued.fetch_add(len, Ordering::Relaxed) + len > QUEUE_BYTES {
            queued.fetch_sub(len, Ordering::Relaxed);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Err(e) = self.to.tx.try_send(std::mem::take(&mut self.buf)) {
            queued.fetch_sub(len, Ordering::Relaxed);
            if let TrySendError::Full(_) = e {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing_subscriber::fmt::MakeWriter;

    /// A sink that records what reached it, blocking while `gate` is held.
    #[derive(Clone)]
    struct Gated {
        out: Arc<Mutex<Vec<u8>>>,
        gate: Arc<Mutex<()>>,
    }

    impl Write for Gated {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let _open = self.gate.lock().unwrap_or_else(|e| e.into_inner());
            self.out
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// The tests that read the process-wide drop count, one at a time.
    static DROPS: Mutex<()> = Mutex::new(());

    fn gated() -> Gated {
        Gated {
            out: Arc::default(),
            gate: Arc::default(),
        }
    }

    fn line(w: &LogWriter, text: &str) {
        let mut l = w.make_writer();
        let _ = l.write_all(text.as_bytes());
    }

    /// A sink that blocks never blocks the writer of a line: past the queue, lines are
    /// dropped and counted; once the sink moves again, the queued ones reach it, in order, and
    /// the flush at exit waits for them.
    #[test]
    fn a_blocked_sink_costs_lines_not_the_caller() {
        let _one = DROPS.lock().unwrap_or_else(|e| e.into_inner());
        let sink = gated();
        let held = sink.gate.lock().unwrap_or_else(|e| e.into_inner());
        let (w, flush) = start(sink.clone()).unwrap_or_else(|e| panic!("{e}"));
        let before = dropped();
        let began = Instant::now();
        for i in 0..QUEUE + 100 {
            line(&w, &format!("{i}\n"));
        }
        // Every call returned although the sink wrote nothing.
        assert!(began.elapsed() < Duration::from_secs(30));
        // One line may be in the thread's hands, the rest queued: the others were dropped.
        let lost = dropped() - before;
        assert!((99..=100).contains(&lost), "{lost}");
        drop(held);
        drop(flush);
        let out = sink.out.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("0\n1\n2\n"), "{}", &text[..20]);
        assert_eq!(text.lines().count() as u64, (QUEUE + 100) as u64 - lost);
    }

    /// A sink that takes a few bytes at a time and sometimes would block gets every line whole;
    /// one that fails midway gets the line ended, so the next starts on a line of its own.
    #[test]
    fn lines_are_written_whole_or_ended() {
        struct Stingy {
            out: Vec<u8>,
            calls: usize,
            fail_at: Option<usize>,
        }
        impl Write for Stingy {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.calls += 1;
                if self.fail_at.is_some_and(|at| self.out.len() >= at) && b != b"\n" {
                    return Err(io::ErrorKind::BrokenPipe.into());
                }
                if self.calls.is_multiple_of(3) {
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                let n = b.len().min(4);
                self.out.extend_from_slice(&b[..n]);
                Ok(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut s = Stingy {
            out: Vec::new(),
            calls: 0,
            fail_at: None,
        };
        write_line(&mut s, b"{\"a\":1}\n");
        write_line(&mut s, b"{\"b\":2}\n");
        assert_eq!(s.out, b"{\"a\":1}\n{\"b\":2}\n");
        let mut s = Stingy {
            out: Vec::new(),
            calls: 0,
            fail_at: Some(4),
        };
        write_line(&mut s, b"{\"a\":1}\n");
        assert_eq!(s.out, b"{\"a\"\n");
    }

    /// Long lines are held to a byte budget before the line count fills.
    #[test]
    fn long_lines_are_held_to_a_byte_budget() {
        let _one = DROPS.lock().unwrap_or_else(|e| e.into_inner());
        let sink = gated();
        let held = sink.gate.lock().unwrap_or_else(|e| e.into_inner());
        let (w, flush) = start(sink.clone()).unwrap_or_else(|e| panic!("{e}"));
        let long = "x".repeat(1024 * 1024) + "\n";
        let before = dropped();
        for _ in 0..20 {
            line(&w, &long);
        }
        // At most 8 queued (and one in the thread's hands): the rest dropped.
        assert!(dropped() - before >= 11, "{}", dropped() - before);
        drop(held);
        drop(flush);
    }

    /// A sink that fails (a closed pipe) loses lines and nothing else.
    #[test]
    fn a_failing_sink_loses_lines_only() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (w, flush) = start(Broken).unwrap_or_else(|e| panic!("{e}"));
        for _ in 0..10 {
            line(&w, "x\n");
        }
        drop(flush);
    }
}
