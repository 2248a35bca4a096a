//! Per-upstream sliding-window statistics.
//!
//! Recording sits on the proxy's request hot path, so it costs a few relaxed
//! loads and two or three relaxed atomic adds: no lock, no allocation, no map
//! lookup.
//! Readers (the rollback engine, `/api/status`) pay instead: they walk the
//! ring and sum the slots that belong to the window they ask for.
//!
//! # Layout
//!
//! A [`Window`] is a ring of N one-second slots; epoch `e` (whole seconds
//! since the [`Clock`]'s base) lives in slot `e % N`. Every slot carries a
//! `tag` holding the epoch its counters belong to. The tag is what keeps the
//! data honest: a ticker normally clears and tags the next slots ahead of
//! time ([`Window::prepare`]), but if it stalls, a recorder that finds an
//! older tag clears the slot itself, and a reader only sums slots whose tag
//! lies inside the requested window. A stalled ticker therefore costs at most
//! a little speed, never wrong numbers: data from N seconds ago can never be
//! mistaken for data from now.
//!
//! # Window semantics
//!
//! `summary(now, over)` covers epochs in `(now - over, now]`: the current,
//! partial second plus the `over - 1` whole seconds before it. A sample
//! recorded in epoch `e` is therefore counted while `now < e + over` and
//! disappears exactly when `now` reaches `e + over`. In wall-clock terms a
//! sample stays visible for between `over - 1` and `over` seconds.
//!
//! # Clearing protocol
//!
//! Whoever (re)uses a slot swaps its tag from the old value to `CLEARING`
//! with a CAS, zeroes the counters, then publishes the new epoch with a
//! Release store. Only the CAS winner clears; recorders that meet `CLEARING`
//! spin briefly and then drop their sample (counted in `dropped`). Tags only
//! ever grow for a given slot, so the tag re-check that readers do after
//! copying a slot cannot be fooled by ABA.

use std::hint::spin_loop;
use std::sync::atomic::{
    fence, AtomicU32, AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::time::Duration;

use tokio::time::Instant;

/// Tag of a slot that has never held data.
const EMPTY: u64 = u64::MAX;
/// Tag of a slot whose counters are being zeroed by the CAS winner.
const CLEARING: u64 = u64::MAX - 1;
/// Largest usable epoch; anything above would collide with the sentinels.
const MAX_EPOCH: u64 = CLEARING - 1;
/// How long a recorder waits for another thread to finish clearing a slot
/// before it gives up on its sample. Clearing is a few hundred stores, so
/// this only runs out if the clearing thread was descheduled mid-way.
const SPIN_LIMIT: u32 = 1000;
/// Smallest ring we accept: `prepare` tags two slots ahead of the current
/// one, so fewer slots would let it recycle the current second.
const MIN_SLOTS: usize = 4;

/// log2 of the number of sub-buckets per power of two.
const SUB_BITS: u32 = 4;
/// Sub-buckets per power of two (and width of the linear range, in µs).
const SUB: u64 = 1 << SUB_BITS;
/// Highest power of two with its own buckets: `[2^27, 2^28)` µs.
const MAX_EXP: u32 = 27;
/// Number of latency buckets: 16 linear ones for 0..16 µs, then 16 per
/// power of two from 2^4 up to 2^27 µs.
pub const BUCKETS: usize = (MAX_EXP - SUB_BITS + 2) as usize * SUB as usize;
/// Largest latency (µs) with a bucket of its own (~268 s); anything above is
/// counted in the last bucket.
pub const MAX_TRACKED_MICROS: u64 = (1 << (MAX_EXP + 1)) - 1;

// The histogram must reach ~134 s, and bucket indices must fit the u32 range
// bounds kept per slot.
const _: () = assert!(MAX_TRACKED_MICROS >= 1 << 27 && BUCKETS < u32::MAX as usize);

/// Bucket for a latency in microseconds.
///
/// Below 16 µs one bucket per µs; above, 16 buckets per power of two, so a
/// bucket is never wider than 1/16 of its lower bound. Values above
/// [`MAX_TRACKED_MICROS`] land in the last bucket.
/// (The request path takes it from [`bucket_and_sample`]; this form is the reference its test
/// checks it against.)
#[cfg(test)]
fn bucket_index(micros: u64) -> usize {
    if micros < SUB {
        return micros as usize;
    }
    let exp = 63 - micros.leading_zeros(); // >= SUB_BITS
    if exp > MAX_EXP {
        return BUCKETS - 1;
    }
    let sub = (micros >> (exp - SUB_BITS)) & (SUB - 1);
    (exp - SUB_BITS + 1) as usize * SUB as usize + sub as usize
}

/// Representative value (µs) of a bucket: its midpoint, which keeps the
/// relative error of any value in the bucket within 1/32 (3.125%). Indices
/// past the end are treated as the last bucket. (Quantiles answer with the mean of the
/// bucket's samples instead: [`Summary::quantile`].)
#[cfg(test)]
fn bucket_value(idx: usize) -> u64 {
    let idx = idx.min(BUCKETS - 1);
    if idx < SUB as usize {
        return idx as u64;
    }
    let shift = (idx / SUB as usize - 1) as u32;
    let sub = (idx % SUB as usize) as u64;
    let lower = (SUB + sub) << shift;
    lower + ((1u64 << shift) >> 1)
}

/// [`bucket_index`] of `micros`, and its sample packed for that bucket: the count (1) in the
/// low 32 bits, and in the high 32 where `micros` lies inside the bucket, in 1/256ths of the
/// bucket's width (0 in the one-microsecond buckets), so that one atomic add records both (a
/// bucket of one one-second slot never sees 2^32 samples; offsets are < 256). Summed per
/// bucket, the offsets give the mean of its samples, which [`Summary::quantile`] answers with
/// instead of the midpoint: a bucket is up to 1/16 of its lower bound wide, and its midpoint
/// alone put a p95 3% off (a trigger fired on 270.3 ms with every sample under 268 ms, and
/// missed every one over 273). One pass for both: this runs on every request.
#[inline]
fn bucket_and_sample(micros: u64) -> (usize, u64) {
    if micros < SUB {
        return (micros as usize, 1);
    }
    let exp = 63 - micros.leading_zeros(); // >= SUB_BITS
    if exp > MAX_EXP {
        return (BUCKETS - 1, 1);
    }
    let shift = exp - SUB_BITS;
    let sub = (micros >> shift) & (SUB - 1);
    // The bits below the bucket's lower bound, scaled to 8 bits.
    let below = micros & ((1u64 << shift) - 1);
    let offset = if shift >= 8 {
        below >> (shift - 8)
    } else {
        below << (8 - shift)
    };
    (
        (shift + 1) as usize * SUB as usize + sub as usize,
        1 | (offset << 32),
    )
}

/// Saturating conversion of a latency to whole microseconds, without the
/// u128 arithmetic of `Duration::as_micros`.
#[inline]
fn micros_of(latency: Duration) -> u64 {
    latency
        .as_secs()
        .saturating_mul(1_000_000)
        .saturating_add(u64::from(latency.subsec_micros()))
}

/// Maps tokio instants to epochs (whole seconds since the clock was made).
///
/// Uses `tokio::time::Instant` so tests can drive it with a paused runtime.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    base: Instant,
}

impl Clock {
    /// A clock whose epoch 0 starts now.
    pub fn new() -> Self {
        Clock {
            base: Instant::now(),
        }
    }

    /// Whole seconds from the base to `t`; instants before the base map to 0.
    pub fn epoch_at(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_secs()
    }

    /// The current epoch.
    pub fn now_epoch(&self) -> u64 {
        self.epoch_at(Instant::now())
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// Maps a monotonic instant onto wall-clock RFC 3339.
pub fn wall(at: Instant) -> String {
    let now = Instant::now();
    let t = if at >= now {
        std::time::SystemTime::now() + (at - now)
    } else {
        std::time::SystemTime::now() - (now - at)
    };
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Makes `tag` hold `epoch`, clearing the slot if it held an older epoch.
/// Returns false when the sample must be dropped (slot already holds a newer
/// epoch, or another thread kept it in `CLEARING` for too long).
#[cold]
#[inline(never)]
fn claim_for_record(tag: &AtomicU64, epoch: u64, clear: impl Fn()) -> bool {
    let mut spins = 0u32;
    loop {
        let cur = tag.load(Acquire);
        if cur == epoch {
            return true;
        }
        if cur == CLEARING {
            if spins >= SPIN_LIMIT {
                return false;
            }
            spins += 1;
            spin_loop();
            continue;
        }
        if cur != EMPTY && cur > epoch {
            // A very late recorder: its second has already been recycled.
            return false;
        }
        if try_clear(tag, cur, epoch, &clear) {
            return true;
        }
        // Lost the CAS to another clearer (or a recorder of our epoch); look again.
    }
}

/// Ticker side: tag the slot for `epoch` unless it already is, is being
/// cleared by someone else, or holds a newer epoch.
fn prepare_slot(tag: &AtomicU64, epoch: u64, clear: impl Fn()) {
    let cur = tag.load(Acquire);
    if cur == epoch || cur == CLEARING || (cur != EMPTY && cur > epoch) {
        return;
    }
    try_clear(tag, cur, epoch, &clear);
}

/// The clearing protocol: CAS `old -> CLEARING`, zero, publish `epoch`.
fn try_clear(tag: &AtomicU64, old: u64, epoch: u64, clear: &impl Fn()) -> bool {
    if tag
        .compare_exchange(old, CLEARING, Acquire, Relaxed)
        .is_err()
    {
        return false;
    }
    // Orders the CLEARING store before the zeroing stores, so a reader that
    // sees any zero (and fences) is guaranteed to see the tag change.
    fence(Release);
    clear();
    // Publishes the zeros to anyone who reads the new tag with Acquire.
    tag.store(epoch, Release);
    true
}

/// First epoch of the window `(now - over, now]`, or None if it is empty.
fn window_start(now: u64, over: u64) -> Option<u64> {
    if over == 0 {
        None
    } else {
        Some(now.saturating_sub(over - 1))
    }
}

/// Windows of upstreams a reload removed, for the upstreams a later reload adds. A window is
/// large (about 1 MiB with the default ten-minute ring) and every byte of it is written when
/// it is made; freed, that memory mostly stays with the process (glibc keeps it, fragmented
/// between smaller allocations), so each reload with new upstream addresses used to grow the
/// RSS by about a window per new upstream. Reused, the windows cost nothing after the first
/// reload. The lock is taken only by reloads and by upstreams being dropped.
#[derive(Default)]
pub struct WindowBin {
    windows: std::sync::Mutex<Vec<Window>>,
    /// Windows handed out again, for tests and the curious.
    reused: AtomicU64,
}

impl WindowBin {
    /// Keeps `window` (of an upstream being dropped) for reuse.
    pub fn put(&self, window: Window) {
        if window.slots.is_empty() {
            return;
        }
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        windows.push(window);
    }

    /// A kept window of exactly `slots` slots (as [`Window::new`] rounds them), emptied.
    pub fn take(&self, slots: usize) -> Option<Window> {
        let want = slots.max(MIN_SLOTS);
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        let at = windows.iter().position(|w| w.slots.len() == want)?;
        let mut window = windows.swap_remove(at);
        drop(windows);
        window.reset();
        self.reused.fetch_add(1, Relaxed);
        Some(window)
    }

    /// A kept window, or a new one.
    pub fn take_or_new(&self, slots: usize) -> Window {
        self.take(slots).unwrap_or_else(|| Window::new(slots))
    }

    /// Frees the windows no new upstream took (a reload that removed more than it added).
    pub fn trim(&self) {
        let mut windows = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        windows.clear();
    }

    /// Windows kept.
    pub fn len(&self) -> usize {
        self.windows.lock().map(|w| w.len()).unwrap_or(0)
    }

    /// Windows handed out again so far.
    pub fn reused(&self) -> u64 {
        self.reused.load(Relaxed)
    }
}

/// One second of data for one upstream.
#[repr(align(64))]
struct Slot {
    tag: AtomicU64,
    requests: AtomicU64,
    failures: AtomicU64,
    /// Lowest bucket used (`BUCKETS` when none) and highest used + 1 (0 when
    /// none). Readers copy only `lo..hi`: latencies cluster, so this skips
    /// most of the histogram. Updated only on a new extreme, so it costs
    /// recorders two plain loads from the slot's (already hot) first line.
    lo: AtomicU32,
    hi: AtomicU32,
    /// Per bucket, the samples of [`bucket_and_sample`] summed: the count and where in the
    /// bucket they fell.
    latency: [AtomicU64; BUCKETS],
}

impl Slot {
    fn new() -> Self {
        Slot {
            tag: AtomicU64::new(EMPTY),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            lo: AtomicU32::new(BUCKETS as u32),
            hi: AtomicU32::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn clear(&self) {
        self.requests.store(0, Relaxed);
        self.failures.store(0, Relaxed);
        self.lo.store(BUCKETS as u32, Relaxed);
        self.hi.store(0, Relaxed);
        for b in &self.latency {
            b.store(0, Relaxed);
        }
    }

    #[inline]
    fn add(&self, bucket: usize, sample: u64, failed: bool) {
        self.requests.fetch_add(1, Relaxed);
        if failed {
            self.failures.fetch_add(1, Relaxed);
        }
        // Widen the range before counting. A reader racing this call may
        // miss the sample (just as it may miss the `requests` add); once
        // recorders are quiescent every counted bucket lies inside lo..hi.
        let idx = bucket as u32; // < BUCKETS, checked at compile time
        if idx < self.lo.load(Relaxed) {
            self.lo.fetch_min(idx, Relaxed);
        }
        if idx >= self.hi.load(Relaxed) {
            self.hi.fetch_max(idx + 1, Relaxed);
        }
        if let Some(b) = self.latency.get(bucket) {
            b.fetch_add(sample, Relaxed);
        }
    }

    /// Copies the used part of the histogram into `scratch`; returns the
    /// copied range.
    fn copy_latency(&self, scratch: &mut [u64; BUCKETS]) -> std::ops::Range<usize> {
        let hi = (self.hi.load(Relaxed) as usize).min(BUCKETS);
        let lo = (self.lo.load(Relaxed) as usize).min(hi);
        let (dst, src) = (&mut scratch[lo..hi], &self.latency[lo..hi]);
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.load(Relaxed);
        }
        lo..hi
    }
}

/// The epochs a ticker prepares ahead of `now_epoch`: the next two seconds (sentinels excluded).
fn epochs_ahead(now_epoch: u64) -> impl Iterator<Item = u64> {
    (1..=2)
        .map(move |ahead| now_epoch.saturating_add(ahead))
        .filter(|epoch| *epoch <= MAX_EPOCH)
}

/// Sliding-window request/failure counts and latency histogram for one
/// upstream, with one-second resolution.
pub struct Window {
    slots: Box<[Slot]>,
    len: u64,
    dropped: AtomicU64,
}

impl Window {
    /// A ring of `slots` one-second slots (at least 4). It can answer for
    /// windows of up to `slots - 1` seconds; since the ticker tags two slots
    /// ahead, size it at least 3 above the longest window you will ask for.
    pub fn new(slots: usize) -> Self {
        let n = slots.max(MIN_SLOTS);
        let slots: Box<[Slot]> = (0..n).map(|_| Slot::new()).collect();
        Window {
            len: slots.len() as u64,
            slots,
            dropped: AtomicU64::new(0),
        }
    }

    /// Number of one-second slots in the ring.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// A ring of no slots, to stand in for a window moved out of an upstream being dropped
    /// (see `WindowBin`). Nothing may record into it or read it.
    pub fn placeholder() -> Self {
        Window {
            slots: Box::new([]),
            len: 0,
            dropped: AtomicU64::new(0),
        }
    }

    /// Forgets every sample: all slots empty, as from [`Window::new`]. A slot's counters are
    /// zeroed when it is claimed for an epoch, so marking it empty is enough.
    fn reset(&mut self) {
        for slot in self.slots.iter_mut() {
            *slot.tag.get_mut() = EMPTY;
        }
        *self.dropped.get_mut() = 0;
    }

    /// Samples that could not be recorded (late recorders, or a slot held in
    /// `CLEARING` past the spin limit).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }

    #[inline]
    fn slot(&self, epoch: u64) -> &Slot {
        // Index is < len, which came from a usize.
        &self.slots[(epoch % self.len) as usize]
    }

    /// Records one request finished in `epoch`. Lock-free; never panics.
    #[inline]
    pub fn record(&self, epoch: u64, latency: Duration, failed: bool) {
        let (bucket, sample) = bucket_and_sample(micros_of(latency));
        if let Some(slot) = self.claimed(epoch) {
            slot.add(bucket, sample, failed);
        }
    }

    /// Records one failed request finished in `epoch` that has no latency to count: it never
    /// went to an upstream (none was healthy). It weighs in the request and failure counts
    /// (the error rate), not in the histogram (the quantiles), which its near-zero time would
    /// pull down. Lock-free; never panics.
    #[inline]
    pub fn record_unsent_failure(&self, epoch: u64) {
        if let Some(slot) = self.claimed(epoch) {
            slot.requests.fetch_add(1, Relaxed);
            slot.failures.fetch_add(1, Relaxed);
        }
    }

    /// The slot of `epoch`, claimed for recording; None (the sample counted as dropped) when
    /// it cannot be.
    #[inline]
    fn claimed(&self, epoch: u64) -> Option<&Slot> {
        let slot = self.slot(epoch);
        // The epoch bound keeps a sentinel-valued epoch from matching a slot
        // that is empty or being cleared.
        if epoch <= MAX_EPOCH
            && (slot.tag.load(Acquire) == epoch
                || claim_for_record(&slot.tag, epoch, || slot.clear()))
        {
            Some(slot)
        } else {
            self.dropped.fetch_add(1, Relaxed);
            None
        }
    }

    /// Ticker hook (call every ~250 ms): clears and tags the slots for the
    /// next two seconds so recorders find them ready and never clear.
    pub fn prepare(&self, now_epoch: u64) {
        for epoch in epochs_ahead(now_epoch) {
            let slot = self.slot(epoch);
            prepare_slot(&slot.tag, epoch, || slot.clear());
        }
    }

    /// Summary of epochs `(now_epoch - over_secs, now_epoch]`; `over_secs`
    /// is clamped to `slots - 1`.
    pub fn summary(&self, now_epoch: u64, over_secs: u64) -> Summary {
        let mut out = Summary::new();
        self.summary_into(now_epoch, over_secs, &mut out);
        out
    }

    /// Like [`Window::summary`] but adds into `out`, e.g. to merge all the
    /// upstreams of one color.
    pub fn summary_into(&self, now_epoch: u64, over_secs: u64, out: &mut Summary) {
        let now = now_epoch.min(MAX_EPOCH);
        let Some(first) = window_start(now, over_secs.min(self.len - 1)) else {
            return;
        };
        let mut scratch = [0u64; BUCKETS];
        for epoch in first..=now {
            let slot = self.slot(epoch);
            if slot.tag.load(Acquire) != epoch {
                continue; // stale, empty, being cleared, or already recycled
            }
            let requests = slot.requests.load(Relaxed);
            let failures = slot.failures.load(Relaxed);
            let used = slot.copy_latency(&mut scratch);
            // Seqlock-style check: if the slot was recycled while we copied
            // it, the copy may mix epochs, so skip it.
            fence(Acquire);
            if slot.tag.load(Relaxed) != epoch {
                continue;
            }
            out.requests = out.requests.saturating_add(requests);
            out.failures = out.failures.saturating_add(failures);
            let dst = out
                .buckets
                .get_mut(used.clone())
                .zip(out.offsets.get_mut(used.clone()));
            if let (Some((counts, offsets)), Some(src)) = (dst, scratch.get(used)) {
                // Wrapping, not saturating, so this vectorizes; u32 counts and offset sums
                // added over at most a few thousand slots cannot overflow.
                for ((c, o), &s) in counts.iter_mut().zip(offsets.iter_mut()).zip(src) {
                    *c = c.wrapping_add(s & u64::from(u32::MAX));
                    *o = o.wrapping_add(s >> 32);
                }
            }
        }
    }
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("slots", &self.len)
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

/// Totals and latency histogram over some window, possibly merged across
/// upstreams.
///
/// `requests` and the histogram are updated by separate atomic adds, so a
/// summary taken while requests are being recorded may see one without the
/// other; quantiles use the histogram's own total ([`Summary::samples`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub requests: u64,
    pub failures: u64,
    buckets: Vec<u64>,
    /// Per bucket, the sum of its samples' offsets in it ([`bucket_and_sample`]).
    offsets: Vec<u64>,
}

impl Default for Summary {
    fn default() -> Self {
        Summary {
            requests: 0,
            failures: 0,
            buckets: vec![0; BUCKETS],
            offsets: vec![0; BUCKETS],
        }
    }
}

impl Summary {
    /// An empty summary.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `other` into `self`.
    pub fn merge(&mut self, other: &Summary) {
        self.requests = self.requests.saturating_add(other.requests);
        self.failures = self.failures.saturating_add(other.failures);
        for (dst, &src) in self.buckets.iter_mut().zip(&other.buckets) {
            *dst = dst.saturating_add(src);
        }
        for (dst, &src) in self.offsets.iter_mut().zip(&other.offsets) {
            *dst = dst.saturating_add(src);
        }
    }

    /// Per-bucket sample counts, indexed like [`bucket_index`].
    #[cfg(test)]
    pub fn buckets(&self) -> &[u64] {
        &self.buckets
    }

    /// Number of latency samples in the histogram.
    pub fn samples(&self) -> u64 {
        self.buckets.iter().fold(0u64, |a, &b| a.saturating_add(b))
    }

    /// `failures / requests`, or None when there were no requests.
    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.failures as f64 / self.requests as f64)
    }

    /// Latency at quantile `q` (clamped to [0, 1]): the mean of the samples in the bucket
    /// holding the sample of rank `ceil(q * samples)` (at least 1), to 1/256 of the bucket's
    /// width: a value between the lowest and the highest latency in that bucket, exact when
    /// its samples are all alike. None when the histogram is empty or `q` is NaN.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let count = self.samples();
        if count == 0 || q.is_nan() {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * count as f64).ceil() as u64).clamp(1, count);
        let mut seen = 0u64;
        for (idx, &n) in self.buckets.iter().enumerate() {
            seen = seen.saturating_add(n);
            if seen >= rank {
                return Some(self.bucket_mean(idx, n));
            }
        }
        None
    }

    /// The mean of the `n` (> 0) samples in bucket `idx`, from their offsets in it.
    fn bucket_mean(&self, idx: usize, n: u64) -> Duration {
        if idx < SUB as usize {
            return Duration::from_micros(idx as u64);
        }
        let shift = (idx / SUB as usize - 1) as u32;
        let lower = (SUB + (idx % SUB as usize) as u64) << shift;
        let sum = self.offsets.get(idx).copied().unwrap_or(0);
        // In a bucket wider than 256 µs an offset is a floor: half a unit more is the mean's
        // unbiased middle. Narrower, it is exact.
        let half = if shift >= 8 { 0.5 } else { 0.0 };
        let units = (sum as f64 / n.max(1) as f64).min(255.0) + half;
        let micros = lower as f64 + units * (1u64 << shift) as f64 / 256.0;
        Duration::from_nanos((micros * 1000.0) as u64)
    }

    /// 95th-percentile latency.
    pub fn p95(&self) -> Option<Duration> {
        self.quantile(0.95)
    }
}

/// One tagged counter per second, for counting failures per critical path
/// prefix. Same ring, tag and clearing protocol as [`Window`].
pub struct WindowCounter {
    slots: Box<[CounterSlot]>,
    len: u64,
    dropped: AtomicU64,
}

#[repr(align(16))]
struct CounterSlot {
    tag: AtomicU64,
    count: AtomicU64,
}

impl WindowCounter {
    /// A ring of `slots` one-second slots (at least 4).
    pub fn new(slots: usize) -> Self {
        let n = slots.max(MIN_SLOTS);
        let slots: Box<[CounterSlot]> = (0..n)
            .map(|_| CounterSlot {
                tag: AtomicU64::new(EMPTY),
                count: AtomicU64::new(0),
            })
            .collect();
        WindowCounter {
            len: slots.len() as u64,
            slots,
            dropped: AtomicU64::new(0),
        }
    }

    #[inline]
    fn slot(&self, epoch: u64) -> &CounterSlot {
        &self.slots[(epoch % self.len) as usize]
    }

    /// Adds `n` in `epoch`. Lock-free; never panics.
    #[inline]
    pub fn add(&self, epoch: u64, n: u64) {
        let slot = self.slot(epoch);
        let clear = || slot.count.store(0, Relaxed);
        if epoch <= MAX_EPOCH
            && (slot.tag.load(Acquire) == epoch || claim_for_record(&slot.tag, epoch, clear))
        {
            slot.count.fetch_add(n, Relaxed);
        } else {
            self.dropped.fetch_add(1, Relaxed);
        }
    }

    /// Ticker hook: clears and tags the slots for the next two seconds.
    pub fn prepare(&self, now_epoch: u64) {
        for epoch in epochs_ahead(now_epoch) {
            let slot = self.slot(epoch);
            prepare_slot(&slot.tag, epoch, || slot.count.store(0, Relaxed));
        }
    }

    /// Sum over epochs `(now_epoch - over_secs, now_epoch]`; `over_secs` is
    /// clamped to `slots - 1`.
    pub fn sum(&self, now_epoch: u64, over_secs: u64) -> u64 {
        let now = now_epoch.min(MAX_EPOCH);
        let Some(first) = window_start(now, over_secs.min(self.len - 1)) else {
            return 0;
        };
        let mut total = 0u64;
        for epoch in first..=now {
            let slot = self.slot(epoch);
            if slot.tag.load(Acquire) != epoch {
                continue;
            }
            let count = slot.count.load(Relaxed);
            fence(Acquire);
            if slot.tag.load(Relaxed) == epoch {
                total = total.saturating_add(count);
            }
        }
        total
    }

    /// Calls to `add` that were dropped.
    /// Ring length in seconds.
    pub fn slots(&self) -> usize {
        self.len as usize
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }
}

impl std::fmt::Debug for WindowCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WindowCounter")
            .field("slots", &self.len)
            .field("dropped", &self.dropped())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tiny deterministic generator (Knuth's MMIX LCG), high bits only.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
    }

    fn rel_err(got: u64, want: u64) -> f64 {
        (got as f64 - want as f64).abs() / want as f64
    }

    /// Reviewer's cases: every latency between 263 and 267.5 ms, or every one at 274 ms and
    /// over, all inside the bucket 262.1..278.5 ms. Its midpoint (270.3 ms) fired a 270 ms
    /// trigger on the first and missed a 272 ms one on the second; the mean of the bucket's
    /// samples lies between its lowest and highest sample.
    #[test]
    fn a_quantile_lies_among_the_samples_of_its_bucket() {
        for (lo, hi) in [(263_000u64, 267_500u64), (274_000, 278_000)] {
            let w = Window::new(8);
            let mut rng = Lcg(7);
            for _ in 0..24 {
                let us = lo + rng.next() % (hi - lo + 1);
                w.record(3, Duration::from_micros(us), false);
            }
            let p95 = w.summary(3, 4).p95().expect("p95");
            assert!(
                p95 >= Duration::from_micros(lo) && p95 <= Duration::from_micros(hi),
                "{lo}..{hi} µs: p95 {p95:?}"
            );
        }
        // One value repeated is answered exactly, whatever the bucket's width.
        for us in [5u64, 17, 300, 4_321, 270_001, 9_876_543] {
            let w = Window::new(8);
            for _ in 0..10 {
                w.record(3, Duration::from_micros(us), false);
            }
            let got = w.summary(3, 4).p95().expect("p95").as_secs_f64() * 1e6;
            let width = (us / 16).max(1) as f64;
            assert!((got - us as f64).abs() <= width / 256.0, "{us} µs: {got}");
        }
    }

    /// The request path's one pass gives the bucket [`bucket_index`] gives, and an offset
    /// inside it.
    #[test]
    fn bucket_and_sample_agrees_with_bucket_index() {
        let mut rng = Lcg(3);
        let mut values: Vec<u64> = (0..5_000)
            .map(|_| rng.next() >> (rng.next() % 31))
            .collect();
        values.extend([
            0,
            1,
            15,
            16,
            17,
            31,
            32,
            255,
            256,
            4095,
            4096,
            MAX_TRACKED_MICROS,
        ]);
        values.extend([MAX_TRACKED_MICROS + 1, u64::MAX]);
        for v in values {
            let (bucket, sample) = bucket_and_sample(v);
            assert_eq!(bucket, bucket_index(v), "{v}");
            assert_eq!(sample & u64::from(u32::MAX), 1, "{v}");
            assert!(sample >> 32 < 256, "{v}");
        }
    }

    #[test]
    fn quantiles_match_exact_within_error_bound() {
        let w = Window::new(600);
        let mut rng = Lcg(42);
        let mut exact = Vec::new();
        for _ in 0..10_000 {
            // Log-uniform over 50 µs .. 5 s.
            let f = rng.next() as f64 / (1u64 << 31) as f64;
            let us = (50.0 * (1e5f64).powf(f)) as u64;
            exact.push(us);
            w.record(7, Duration::from_micros(us), false);
        }
        exact.sort_unstable();
        let s = w.summary(7, 60);
        assert_eq!(s.requests, 10_000);
        assert_eq!(s.samples(), 10_000);
        for q in [0.5, 0.95, 0.99, 0.0, 1.0] {
            let rank = ((q * exact.len() as f64).ceil() as usize).max(1);
            let want = exact[rank - 1];
            let got = s.quantile(q).map(|d| d.as_micros() as u64);
            let got = got.unwrap_or_default();
            assert!(rel_err(got, want) <= 0.035, "q={q} got {got} want {want}");
        }
        assert_eq!(s.p95(), s.quantile(0.95));
        assert_eq!(Summary::new().p95(), None);
        assert_eq!(Summary::new().error_rate(), None);
        assert_eq!(s.quantile(f64::NAN), None);
    }

    #[tokio::test(start_paused = true)]
    async fn samples_leave_window_exactly_at_its_end() {
        let clock = Clock::new();
        let w = Window::new(600);
        // Mid-second, to show the boundary follows epochs, not the sample time.
        tokio::time::advance(Duration::from_millis(500)).await;
        let e = clock.now_epoch();
        assert_eq!(e, 0);
        w.record(e, Duration::from_millis(3), true);
        w.record(e, Duration::from_millis(3), false);

        tokio::time::advance(Duration::from_secs(59)).await; // t = 59.5 s
        let now = clock.now_epoch();
        assert_eq!(now, e + 59);
        let s = w.summary(now, 60);
        assert_eq!((s.requests, s.failures), (2, 1));
        assert_eq!(s.error_rate(), Some(0.5));
        assert_eq!(w.summary(now, 59).requests, 0, "59 s window ends before e");

        tokio::time::advance(Duration::from_millis(499)).await; // t = 59.999 s
        assert_eq!(w.summary(clock.now_epoch(), 60).requests, 2);

        tokio::time::advance(Duration::from_millis(1)).await; // t = 60.0 s
        assert_eq!(clock.now_epoch(), 60);
        tokio::time::advance(Duration::from_millis(500)).await; // 60 s after
        let now = clock.now_epoch();
        assert_eq!(now, e + 60);
        let s = w.summary(now, 60);
        assert_eq!(s, Summary::new());
        assert_eq!(w.summary(now, 61).requests, 2);
        assert_eq!(w.summary(now, 0).requests, 0);
    }

    #[test]
    fn clock_saturates_before_base() {
        let clock = Clock::new();
        let earlier = clock.base.checked_sub(Duration::from_secs(5));
        if let Some(t) = earlier {
            assert_eq!(clock.epoch_at(t), 0);
        }
        assert_eq!(clock.epoch_at(clock.base + Duration::from_millis(2999)), 2);
    }

    #[test]
    fn stalled_ticker_never_mixes_epochs() {
        let n = 600u64;
        let w = Window::new(n as usize);
        let e = 1234;
        for _ in 0..5 {
            w.record(e, Duration::from_millis(900), true);
        }
        // Same slot index, no prepare in between.
        let e2 = e + n;
        assert_eq!(e % n, e2 % n);
        // Before anything is recorded in e2, the stale slot must not count.
        assert_eq!(w.summary(e2, n).requests, 0);
        w.record(e2, Duration::from_micros(20), false);
        w.record(e2, Duration::from_micros(20), false);
        let s = w.summary(e2, 60);
        assert_eq!((s.requests, s.failures, s.samples()), (2, 0, 2));
        assert_eq!(s.p95(), Some(Duration::from_micros(20)));
        assert_eq!(w.summary(e2, u64::MAX).requests, 2);
        // The old epoch cannot be asked for any more either.
        assert_eq!(w.summary(e, 1).requests, 0);
        // Long after the last record, nothing.
        assert_eq!(w.summary(e2 + 5000, 600).requests, 0);
        assert_eq!(w.summary(e2 + 60, 60).requests, 0);
        // A very late recorder for e (slot now holds e2) is dropped.
        w.record(e, Duration::from_micros(20), false);
        assert_eq!(w.dropped(), 1);
        assert_eq!(w.summary(e2, 60).requests, 2);
        // Absurd epochs are dropped, not panicked on.
        w.record(u64::MAX, Duration::MAX, true);
        w.record(CLEARING, Duration::ZERO, true);
        assert_eq!(w.dropped(), 3);
        assert_eq!(w.summary(u64::MAX, u64::MAX).requests, 0);
        w.prepare(u64::MAX);
    }

    #[test]
    fn prepare_tags_ahead_and_clears_stale() {
        let w = Window::new(600);
        w.record(5, Duration::from_micros(100), false);
        w.record(6, Duration::from_micros(100), false);
        // Prepare for now = 604: slots of 605 and 606 are those of 5 and 6.
        w.prepare(604);
        assert_eq!(w.slot(605).tag.load(Relaxed), 605);
        assert_eq!(w.slot(606).tag.load(Relaxed), 606);
        assert_eq!(w.slot(605).requests.load(Relaxed), 0);
        // Idempotent: a second prepare must not wipe fresh data.
        w.record(605, Duration::from_micros(100), false);
        w.prepare(604);
        assert_eq!(w.summary(605, 10).requests, 1);
        // Prepared-but-future slots are not counted.
        assert_eq!(w.summary(604, 10).requests, 0);
        // Prepare never moves a slot backwards.
        w.prepare(3);
        assert_eq!(w.slot(605).tag.load(Relaxed), 605);
        assert_eq!(w.dropped(), 0);
    }

    #[test]
    fn concurrent_records_lose_nothing() {
        const THREADS: u64 = 4;
        const PER: u64 = 100_000;
        let w = Window::new(600);
        w.prepare(99);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let w = &w;
                s.spawn(move || {
                    for i in 0..PER {
                        let us = 50 + (i * 7919 + t * 13) % 200_000;
                        w.record(100, Duration::from_micros(us), i % 10 == 0);
                    }
                });
            }
        });
        let s = w.summary(100, 60);
        assert_eq!(s.requests, THREADS * PER);
        assert_eq!(s.failures, THREADS * PER / 10);
        assert_eq!(s.samples(), THREADS * PER);
        assert_eq!(w.dropped(), 0);
    }

    #[test]
    fn concurrent_claim_of_stale_slot_is_consistent() {
        // Several recorders race to clear the same stale slot themselves.
        const THREADS: u64 = 4;
        const PER: u64 = 20_000;
        let w = Window::new(600);
        for _ in 0..1000 {
            w.record(10, Duration::from_micros(10), true);
        }
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                let w = &w;
                s.spawn(move || {
                    for _ in 0..PER {
                        w.record(610, Duration::from_micros(500), false);
                    }
                });
            }
        });
        let s = w.summary(610, 60);
        // Samples may only be dropped (clearer descheduled), never mixed.
        assert_eq!(s.requests + w.dropped(), THREADS * PER);
        assert_eq!(s.samples(), s.requests);
        assert_eq!(s.failures, 0);
        assert_eq!(s.buckets()[bucket_index(10)], 0);
    }

    #[test]
    fn merge_adds_everything() {
        let a = Window::new(600);
        let b = Window::new(600);
        // Below 32 µs buckets are exact, which keeps the assertions simple.
        a.record(3, Duration::from_micros(20), true);
        b.record(3, Duration::from_micros(25), false);
        b.record(3, Duration::from_micros(30), false);
        let mut merged = a.summary(3, 10);
        merged.merge(&b.summary(3, 10));
        let mut into = Summary::new();
        a.summary_into(3, 10, &mut into);
        b.summary_into(3, 10, &mut into);
        assert_eq!(merged, into);
        assert_eq!((into.requests, into.failures, into.samples()), (3, 1, 3));
        assert_eq!(into.quantile(0.0), Some(Duration::from_micros(20)));
        assert_eq!(into.quantile(0.5), Some(Duration::from_micros(25)));
        assert_eq!(into.quantile(1.0), Some(Duration::from_micros(30)));
    }

    /// A failure that was never sent counts in the error rate, not in the quantiles.
    #[test]
    fn unsent_failures_count_without_latency() {
        let w = Window::new(600);
        w.record(3, Duration::from_micros(20), false);
        w.record_unsent_failure(3);
        w.record_unsent_failure(3);
        let s = w.summary(3, 10);
        assert_eq!((s.requests, s.failures, s.samples()), (3, 2, 1));
        assert_eq!(s.p95(), Some(Duration::from_micros(20)));
        let only = Window::new(600);
        only.record_unsent_failure(5);
        let s = only.summary(5, 10);
        assert_eq!((s.error_rate(), s.p95()), (Some(1.0), None));
    }

    #[test]
    fn window_counter_semantics() {
        let c = WindowCounter::new(600);
        assert_eq!(c.sum(0, 60), 0);
        c.add(10, 3);
        c.add(10, 2);
        c.add(40, 1);
        assert_eq!(c.sum(10, 60), 5);
        assert_eq!(c.sum(10, 1), 5);
        assert_eq!(c.sum(11, 1), 0);
        assert_eq!(c.sum(69, 60), 1 + 5); // (9, 69]
        assert_eq!(c.sum(70, 60), 1); // (10, 70]: 10 has left
        assert_eq!(c.sum(99, 60), 1);
        assert_eq!(c.sum(100, 60), 0);
        assert_eq!(c.sum(40, 0), 0);
        // Stale slot reused without a ticker: 10's count never shows up.
        assert_eq!(c.sum(610, 599), 1); // (11, 610] holds only 40
        c.add(610, 7);
        assert_eq!(c.sum(610, u64::MAX), 7 + 1); // 40 is still inside (11, 610]
        c.add(10, 1); // late: dropped
        assert_eq!(c.dropped(), 1);
        // Prepare clears ahead without touching the current second.
        c.prepare(639);
        // The slot of 640 (which held 40) was recycled, so 40 is gone even
        // for a reader whose `now` still lets 40 into its window.
        assert_eq!(c.sum(610, 599), 7);
        assert_eq!(c.sum(640, 599), 7);
        c.add(u64::MAX, 1);
        assert_eq!(c.sum(u64::MAX, u64::MAX), 0);
        let threads = 4u64;
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| (0..10_000).for_each(|_| c.add(700, 1)));
            }
        });
        assert_eq!(c.sum(700, 60) + c.dropped() - 2, threads * 10_000);
    }

    #[test]
    fn bucket_index_and_value_are_monotonic_and_accurate() {
        assert_eq!(bucket_index(0), 0);
        assert_eq!(bucket_value(0), 0);
        assert_eq!(bucket_index(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_index(MAX_TRACKED_MICROS + 1), BUCKETS - 1);
        assert_eq!(bucket_index(MAX_TRACKED_MICROS), BUCKETS - 1);
        assert_eq!(bucket_value(usize::MAX), bucket_value(BUCKETS - 1));
        for v in 0..16 {
            assert_eq!(bucket_value(bucket_index(v)), v, "linear range is exact");
        }
        // Every value up to 2^20, then a geometric sweep to u64::MAX.
        let mut values: Vec<u64> = (0..1 << 20).collect();
        let mut v = 1u64 << 20;
        while v < u64::MAX / 2 {
            values.extend([v - 1, v, v + 1, v + v / 3]);
            v = v + v / 7 + 1;
        }
        values.push(u64::MAX);
        values.sort_unstable();
        let mut prev = 0;
        for &v in &values {
            let idx = bucket_index(v);
            assert!(idx < BUCKETS);
            assert!(idx >= prev, "bucket_index not monotonic at {v}");
            prev = idx;
            if (1..=MAX_TRACKED_MICROS).contains(&v) {
                let err = rel_err(bucket_value(idx), v);
                assert!(err <= 1.0 / 32.0, "v={v} idx={idx} err={err}");
            }
        }
        for idx in 1..BUCKETS {
            assert!(bucket_value(idx) > bucket_value(idx - 1));
            // Each bucket's midpoint maps back to the bucket.
            assert_eq!(bucket_index(bucket_value(idx)), idx);
        }
    }
}
