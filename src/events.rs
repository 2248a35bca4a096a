//! The audit log: every flip, rollback, blocked rollback and reload, kept in a bounded ring for
//! `/api/events`, appended as JSON lines to a file beside the state, and handed to an
//! [`EventSink`] (the webhooks, [`crate::notify`], which sits above this module). The record
//! itself, [`Event`] with its [`Reason`], is defined with the state it is stored with
//! ([`crate::state::event`]).

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::state::ServiceState;

pub use crate::state::event::{now_rfc3339, Event, Reason};

/// Where published events go besides the ring and the log (the webhooks, [`crate::notify`]).
/// Must not wait: it is called by the writer.
pub trait EventSink: Send + Sync {
    fn send(&self, ev: &Event);
}

pub const RING_CAPACITY: usize = 1000;

/// The audit log: a ring for `/api/events`, a JSON-lines file, and the webhooks.
///
/// A change of the live state is recorded in three steps that a kill -9 at any instant cannot
/// make inconsistent: (1) a `pending` line holding the change's events and the states it
/// writes is appended and fsynced, (2) the state is written, (3) a `confirmed` (or `aborted`)
/// line is appended. At startup a pending line without its answer is settled against the
/// stored state: the change took effect exactly when the stored states are the pending ones
/// (the writer is serialized, so only the last change can be unsettled). The file is rotated
/// by size (one `.1` file kept), never between a pending line and its answer; a torn last line
/// (a crash mid-append) is cut off at startup so it cannot swallow the next event.
pub struct EventLog {
    ring: Mutex<VecDeque<Event>>,
    audit: Option<PathBuf>,
    file: tokio::sync::Mutex<AuditFile>,
    sink: Option<Box<dyn EventSink>>,
    max_bytes: u64,
}

#[derive(Default)]
struct AuditFile {
    file: Option<tokio::fs::File>,
    size: u64,
    /// Pending lines without their answer yet: no rotation while any is open.
    open_pending: usize,
}

/// One line of the audit file.
enum Line {
    Event(Box<Event>),
    Pending {
        id: String,
        states: HashMap<String, ServiceState>,
        events: Vec<Event>,
    },
    Confirmed(String),
    Aborted(String),
}

fn parse_line(line: &str) -> Option<Line> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    if let Some(id) = v.get("pending").and_then(|x| x.as_str()) {
        return Some(Line::Pending {
            id: id.to_string(),
            states: serde_json::from_value(v.get("states")?.clone()).ok()?,
            events: serde_json::from_value(v.get("events")?.clone()).ok()?,
        });
    }
    if let Some(id) = v.get("confirmed").and_then(|x| x.as_str()) {
        return Some(Line::Confirmed(id.to_string()));
    }
    if let Some(id) = v.get("aborted").and_then(|x| x.as_str()) {
        return Some(Line::Aborted(id.to_string()));
    }
    serde_json::from_value(v)
        .ok()
        .map(|e| Line::Event(Box::new(e)))
}

/// The rotated file beside `path`.
pub fn rotated_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// The most of each audit file read at startup: its last lines, enough for [`RING_CAPACITY`]
/// events and the changes around them many times over. `state.events_max_bytes` may allow
/// files of many GiB; reading them whole would take that much memory at every start.
const AUDIT_TAIL: u64 = 8 << 20;

/// Cuts a torn last line (no trailing newline) off the file; returns the bytes removed. Reads
/// backwards from the end, a block at a time, to the last newline: never the whole file.
fn cut_torn_tail(path: &Path) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let mut end = len;
    let mut block = vec![0u8; 64 * 1024];
    let keep = loop {
        if end == 0 {
            break 0;
        }
        let start = end.saturating_sub(block.len() as u64);
        let n = (end - start) as usize;
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut block[..n])?;
        if end == len && block[n - 1] == b'\n' {
            return Ok(0);
        }
        if let Some(i) = block[..n].iter().rposition(|b| *b == b'\n') {
            break start + i as u64 + 1;
        }
        end = start;
    };
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.set_len(keep)?;
    f.sync_all()?;
    Ok(len - keep)
}

/// The last `max` bytes of the file, from the first line that starts in them.
fn read_tail(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let start = f.metadata()?.len().saturating_sub(max);
    f.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    f.take(max).read_to_end(&mut bytes)?;
    if start > 0 {
        // Mid-line (or at a line's start, when the byte before is a newline: not known here,
        // so that line goes too): the first whole line is after the first newline.
        let first = bytes
            .iter()
            .position(|b| *b == b'\n')
            .map_or(bytes.len(), |i| i + 1);
        bytes.drain(..first);
    }
    Ok(bytes)
}

impl EventLog {
    /// Opens the log; the last events of an existing audit file (and its rotated file) are
    /// loaded so `/api/events` survives restarts. A change left pending by a crash is settled
    /// against `stored` (the state as loaded): confirmed when the stored states are the ones it
    /// wrote, aborted otherwise. Blocking file I/O: call it off the runtime's threads.
    pub fn open(
        audit: Option<PathBuf>,
        sink: Option<Box<dyn EventSink>>,
        max_bytes: u64,
        stored: Option<&HashMap<String, ServiceState>>,
    ) -> EventLog {
        let mut ring = VecDeque::with_capacity(RING_CAPACITY);
        let push = |ring: &mut VecDeque<Event>, ev: Event| {
            if ring.len() == RING_CAPACITY {
                ring.pop_front();
            }
            ring.push_back(ev);
        };
        let mut settle_lines = Vec::new();
        if let Some(path) = &audit {
            match cut_torn_tail(path) {
                Ok(0) => {}
                Ok(n) => {
                    tracing::warn!(path = %path.display(), bytes = n, "cut a torn last line off the audit log (a crash mid-write)")
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot check the audit log's last line")
                }
            }
            let mut pending: Vec<(String, HashMap<String, ServiceState>, Vec<Event>)> = Vec::new();
            for p in [rotated_path(path), path.clone()] {
                let text = match read_tail(&p, AUDIT_TAIL) {
                    Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        tracing::warn!(path = %p.display(), error = %e, "cannot read the audit log: the events it holds are not listed");
                        continue;
                    }
                };
                // Invalid UTF-8 (a damaged block) spoils only the lines it is in.
                let unreadable = text.lines().filter(|l| parse_line(l).is_none()).count();
                if unreadable > 0 {
                    tracing::warn!(path = %p.display(), lines = unreadable, "audit log lines that cannot be read are skipped: the events they held are not listed");
                }
                for line in text.lines() {
                    match parse_line(line) {
                        Some(Line::Event(ev)) => push(&mut ring, *ev),
                        Some(Line::Pending { id, states, events }) => {
                            pending.push((id, states, events))
                        }
                        Some(Line::Confirmed(id)) => {
                            if let Some(i) = pending.iter().position(|p| p.0 == id) {
                                for ev in pending.remove(i).2 {
                                    push(&mut ring, ev);
                                }
                            }
                        }
                        Some(Line::Aborted(id)) => pending.retain(|p| p.0 != id),
                        None => {}
                    }
                }
            }
            // Only the last change can be unsettled; settle every leftover the same way.
            for (id, states, events) in pending {
                let applied = stored.is_some_and(|stored| {
                    states.iter().all(|(name, s)| stored.get(name) == Some(s))
                });
                if applied {
                    tracing::warn!(id = %id, "a change interrupted by a crash had taken effect; its events are recorded");
                    for ev in events {
                        push(&mut ring, ev);
                    }
                    settle_lines.push(serde_json::json!({ "confirmed": id }).to_string());
                } else if stored.is_some() {
                    tracing::info!(id = %id, "a change interrupted by a crash had not taken effect; dropped from the audit log");
                    settle_lines.push(serde_json::json!({ "aborted": id }).to_string());
                }
            }
            if !settle_lines.is_empty() {
                let appended = std::fs::OpenOptions::new()
                    .append(true)
                    .open(path)
                    .and_then(|mut f| {
                        for l in &settle_lines {
                            f.write_all(l.as_bytes())?;
                            f.write_all(b"\n")?;
                        }
                        f.sync_data()
                    });
                if let Err(e) = appended {
                    tracing::warn!(path = %path.display(), error = %e, "cannot settle the audit log's pending change");
                }
            }
        }
        EventLog {
            ring: Mutex::new(ring),
            audit,
            file: tokio::sync::Mutex::new(AuditFile::default()),
            sink,
            max_bytes,
        }
    }

    /// Records an event that is not part of a state change (ring, file, webhooks).
    pub async fn record(&self, ev: Event) {
        if let Some(path) = &self.audit {
            if let Err(e) = self.append(path, &ev, false, 0).await {
                tracing::warn!(path = %path.display(), error = %e, "cannot append to the audit log; the event is kept in memory only");
            }
        }
        self.publish(ev);
    }

    /// Step 1 of a state change: the change's events and the states it writes, durable before
    /// the state is written. An error means nothing may be changed.
    pub async fn begin(
        &self,
        id: &str,
        states: &HashMap<String, ServiceState>,
        events: &[Event],
    ) -> std::io::Result<()> {
        let Some(path) = &self.audit else {
            return Ok(());
        };
        let line = serde_json::json!({ "pending": id, "states": states, "events": events });
        self.append(path, &line, true, 1).await
    }

    /// Step 3: the change took effect; its events are published.
    pub async fn confirm(&self, id: &str, events: Vec<Event>) {
        if let Some(path) = &self.audit {
            let line = serde_json::json!({ "confirmed": id });
            if let Err(e) = self.append(path, &line, false, -1).await {
                tracing::warn!(path = %path.display(), error = %e, "cannot confirm a change in the audit log; it is settled at the next start");
            }
        }
        for ev in events {
            self.publish(ev);
        }
    }

    /// Step 3: the change did not take effect.
    pub async fn abort(&self, id: &str) {
        if let Some(path) = &self.audit {
            let line = serde_json::json!({ "aborted": id });
            if let Err(e) = self.append(path, &line, false, -1).await {
                tracing::warn!(path = %path.display(), error = %e, "cannot mark a change aborted in the audit log; it is settled at the next start");
            }
        }
    }

    /// Ring, log line and webhooks for an event already stored.
    pub fn publish(&self, ev: Event) {
        // Colors by their names (`green`); absent fields are left out rather than `None`.
        let (from, to) = (
            ev.from.map(tracing::field::display),
            ev.to.map(tracing::field::display),
        );
        if ev.reason.is_warning() {
            tracing::warn!(
                service = %ev.service,
                reason = %ev.reason,
                from,
                to,
                actor = %ev.actor,
                generation = ev.generation,
                "{}",
                ev.detail
            );
        } else {
            tracing::info!(
                service = %ev.service,
                reason = %ev.reason,
                from,
                to,
                actor = %ev.actor,
                generation = ev.generation,
                "{}",
                ev.detail
            );
        }
        if let Some(n) = &self.sink {
            n.send(&ev);
        }
        if let Ok(mut ring) = self.ring.lock() {
            if ring.len() == RING_CAPACITY {
                ring.pop_front();
            }
            ring.push_back(ev);
        }
    }

    /// Appends one line; `pending_delta` counts open pending lines (no rotation while any is).
    async fn append(
        &self,
        path: &Path,
        v: &impl Serialize,
        sync: bool,
        pending_delta: i32,
    ) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(v).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut guard = self.file.lock().await;
        let g = &mut *guard;
        if pending_delta < 0 {
            g.open_pending = g.open_pending.saturating_sub(1);
        }
        if g.file.is_some()
            && g.open_pending == 0
            && g.size > 0
            && g.size + line.len() as u64 > self.max_bytes
        {
            g.file = None;
            let rotated = rotated_path(path);
            tokio::fs::rename(path, &rotated).await?;
            tracing::info!(path = %path.display(), rotated = %rotated.display(), "audit log rotated");
        }
        if g.file.is_none() {
            if let Some(dir) = path.parent() {
                if !dir.as_os_str().is_empty() {
                    tokio::fs::create_dir_all(dir).await?;
                }
            }
            let f = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .await?;
            g.size = f.metadata().await.map(|m| m.len()).unwrap_or(0);
            g.file = Some(f);
            // A file larger than the limit already (a lowered limit): rotate before writing.
            if g.open_pending == 0 && g.size > 0 && g.size + line.len() as u64 > self.max_bytes {
                g.file = None;
                tokio::fs::rename(path, rotated_path(path)).await?;
                let f = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .await?;
                g.size = 0;
                g.file = Some(f);
            }
        }
        if let Some(f) = g.file.as_mut() {
            // A `tokio::fs::File` hands the write to a blocking thread: its error (ENOSPC) may
            // come from `write_all`, `flush` or `sync_data`.
            let written = async {
                f.write_all(&line).await?;
                f.flush().await?;
                if sync {
                    f.sync_data().await?;
                }
                Ok::<(), std::io::Error>(())
            }
            .await;
            if let Err(e) = written {
                // Part of the line may have reached the file: cut it back to the last whole
                // line, so the next line is not glued onto a torn one (startup cuts a torn tail
                // too, should this fail as well), and reopen next time.
                let _ = f.set_len(g.size).await;
                g.file = None;
                return Err(e);
            }
            g.size += line.len() as u64;
        }
        if pending_delta > 0 {
            g.open_pending += 1;
        }
        Ok(())
    }

    /// Newest last.
    pub fn list(&self) -> Vec<Event> {
        self.ring
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Color;

    /// The default `[state] events_max_bytes`.
    const DEFAULT_MAX_BYTES: u64 = 16 * 1024 * 1024;

    fn states(g: u64) -> HashMap<String, ServiceState> {
        let mut s = ServiceState::initial(Color::Green);
        s.previous = Some(Color::Blue);
        s.generation = g;
        HashMap::from([("api".to_string(), s)])
    }

    fn ev(g: u64) -> Event {
        Event::new("api", Reason::Manual, "test", "flip")
            .colors(Color::Blue, Color::Green)
            .generation(g)
    }

    fn gens(log: &EventLog) -> Vec<u64> {
        log.list().iter().filter_map(|e| e.generation).collect()
    }

    #[tokio::test]
    async fn a_pending_change_is_settled_against_the_stored_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.events.jsonl");
        let log = EventLog::open(Some(path.clone()), None, DEFAULT_MAX_BYTES, None);
        log.begin("one", &states(1), &[ev(1)]).await.expect("begin");
        log.confirm("one", vec![ev(1)]).await;
        log.begin("two", &states(2), &[ev(2)]).await.expect("begin");
        log.abort("two").await;
        // A crash after step 1: no answer for `three`.
        log.begin("three", &states(2), &[ev(2)])
            .await
            .expect("begin");
        drop(log);

        // The state was not written: the pending change is dropped.
        let log = EventLog::open(
            Some(path.clone()),
            None,
            DEFAULT_MAX_BYTES,
            Some(&states(1)),
        );
        assert_eq!(gens(&log), vec![1]);
        drop(log);
        // Settled once, for good: an `aborted` line was appended.
        let log = EventLog::open(
            Some(path.clone()),
            None,
            DEFAULT_MAX_BYTES,
            Some(&states(2)),
        );
        assert_eq!(gens(&log), vec![1]);
        log.begin("four", &states(2), &[ev(2)])
            .await
            .expect("begin");
        drop(log);
        // The state was written: the pending change is confirmed.
        let log = EventLog::open(
            Some(path.clone()),
            None,
            DEFAULT_MAX_BYTES,
            Some(&states(2)),
        );
        assert_eq!(gens(&log), vec![1, 2]);
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.ends_with("{\"confirmed\":\"four\"}\n"), "{text}");
    }

    #[tokio::test]
    async fn a_torn_last_line_does_not_swallow_the_next_event() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.events.jsonl");
        let log = EventLog::open(Some(path.clone()), None, DEFAULT_MAX_BYTES, None);
        log.record(ev(1)).await;
        drop(log);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes.extend_from_slice(b"{\"time\":\"2026");
        std::fs::write(&path, bytes).expect("write");
        let log = EventLog::open(Some(path.clone()), None, DEFAULT_MAX_BYTES, None);
        log.record(ev(2)).await;
        drop(log);
        let log = EventLog::open(Some(path.clone()), None, DEFAULT_MAX_BYTES, None);
        assert_eq!(gens(&log), vec![1, 2]);
    }

    /// A torn line longer than the block read backwards is cut at the newline before it; a
    /// whole file is left as it is.
    #[test]
    fn a_torn_tail_is_found_reading_backwards() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.events.jsonl");
        let mut bytes = b"{\"a\":1}\n".repeat(20_000);
        let whole = bytes.len() as u64;
        std::fs::write(&path, &bytes).expect("write");
        assert_eq!(cut_torn_tail(&path).expect("cut"), 0);
        bytes.extend(std::iter::repeat_n(b'x', 200_000));
        std::fs::write(&path, &bytes).expect("write");
        assert_eq!(cut_torn_tail(&path).expect("cut"), 200_000);
        assert_eq!(std::fs::metadata(&path).expect("len").len(), whole);
        std::fs::write(&path, b"no newline at all").expect("write");
        assert_eq!(cut_torn_tail(&path).expect("cut"), 17);
        assert_eq!(cut_torn_tail(&dir.path().join("none")).expect("missing"), 0);
    }

    /// At startup only the files' tails are read, from a line's start; a damaged (non-UTF-8)
    /// line costs itself, not its file's other events.
    #[tokio::test]
    async fn startup_reads_only_the_tail_and_survives_a_damaged_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.events.jsonl");
        let log = EventLog::open(Some(path.clone()), None, DEFAULT_MAX_BYTES, None);
        for g in 1..=3 {
            log.record(ev(g)).await;
        }
        drop(log);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes.extend_from_slice(b"{\"damaged\": \"\xff\xfe\"}\n");
        std::fs::write(&path, &bytes).expect("write");
        let log = EventLog::open(Some(path.clone()), None, DEFAULT_MAX_BYTES, None);
        log.record(ev(4)).await;
        drop(log);
        let log = EventLog::open(Some(path.clone()), None, DEFAULT_MAX_BYTES, None);
        assert_eq!(gens(&log), vec![1, 2, 3, 4]);
        // The tail starts at a whole line, whatever byte the cut falls on.
        let text = std::fs::read(&path).expect("read");
        for max in [
            1,
            10,
            100,
            text.len() as u64 - 1,
            text.len() as u64,
            1 << 20,
        ] {
            let tail = read_tail(&path, max).expect("tail");
            assert!(text.ends_with(&tail), "max {max}");
            let at = text.len() - tail.len();
            assert!(at == 0 || text[at - 1] == b'\n', "max {max}: mid-line");
            assert!(tail.len() as u64 <= max);
        }
    }

    #[tokio::test]
    async fn rotates_by_size_and_reads_both_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.events.jsonl");
        let log = EventLog::open(Some(path.clone()), None, 4096, None);
        for g in 1..=40 {
            log.record(ev(g)).await;
        }
        drop(log);
        assert!(std::fs::metadata(&path).expect("current").len() <= 4096);
        assert!(rotated_path(&path).exists());
        let log = EventLog::open(Some(path.clone()), None, 4096, None);
        let g = gens(&log);
        assert_eq!(g.last(), Some(&40));
        assert!(g.windows(2).all(|w| w[1] == w[0] + 1), "{g:?}");
    }
}
