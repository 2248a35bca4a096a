//! The log's way to stderr: a bounded queue and a thread of its own. A write to stderr blocks
//! once its pipe is full, so a log reader that stops reading (a stalled collector, a container
//! runtime's log driver under pressure, `serve 2>&1 | less` left paused) would stop every
//! thread that logs, and the proxy with them. Here it costs log lines only: a line that finds
//! the queue full is dropped and counted (`switchyard_log_lines_dropped_total`), and a reader
//! that went away (EPIPE) loses the lines written meanwhile.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::time::Duration;

use tokio::time::Instant;

/// Lines queued for the writer thread at most.
const QUEUE: usize = 16 * 1024;
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
                // Nowhere to report a failed write: the line is lost, the next one tried.
                let _ = sink.write_all(&line).and_then(|()| sink.flush());
            }
        })?;
    Ok((LogWriter { tx: tx.clone() }, Flush { tx, done }))
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
    tx: &'a SyncSender<Vec<u8>>,
    buf: Vec<u8>,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line {
            tx: &self.tx,
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
        if self.buf.is_empty() {
            return;
        }
        if let Err(TrySendError::Full(_)) = self.tx.try_send(std::mem::take(&mut self.buf)) {
            DROPPED.fetch_add(1, Ordering::Relaxed);
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

    fn line(w: &LogWriter, text: &str) {
        let mut l = w.make_writer();
        let _ = l.write_all(text.as_bytes());
    }

    /// A sink that blocks never blocks the writer of a line: past the queue, lines are
    /// dropped and counted; once the sink moves again, the queued ones reach it, in order, and
    /// the flush at exit waits for them.
    #[test]
    fn a_blocked_sink_costs_lines_not_the_caller() {
        let sink = Gated {
            out: Arc::default(),
            gate: Arc::default(),
        };
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
