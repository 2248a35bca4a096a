//! Passive health (outlier ejection, as nginx's `max_fails`/`fail_timeout` and Envoy's
//! consecutive gateway failures): the requests themselves say when an upstream stops answering,
//! long before an active check would, and with no health section at all.
//!
//! An upstream that fails `eject_after` requests in a row (connect failure, reset, timeout, or a
//! 502/503/504 answer) is ejected for `eject_for`: it counts as unhealthy (`/api/status`,
//! `switchyard_upstream_healthy`, the `unhealthy` trigger, flip preflight) and gets no traffic
//! while another upstream of its pool can take it. When the time is up it gets traffic again;
//! any success clears its count. When every upstream of a pool is ejected, the pool is in panic
//! mode: requests go to the ejected ones rather than to nobody, so a burst of failures on a
//! whole pool never turns into an outage of the proxy's own making (Envoy's panic threshold).
//!
//! The request path pays one relaxed load per candidate while nothing fails; the clock is read
//! only for an upstream that was ejected.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

pub use crate::config::PassiveConfig;

/// Whether an answer with this status counts against its upstream: a gateway error means the
/// upstream (or the proxy in front of it) could not serve, unlike a 500 from the application.
pub fn is_gateway_error(status: u16) -> bool {
    matches!(status, 502..=504)
}

/// One upstream's passive health.
#[derive(Debug)]
pub struct PassiveState {
    /// Time 0 of the millisecond fields (tokio's clock, so paused-time tests work).
    base: Instant,
    /// Failures since the last success.
    failures: AtomicU32,
    /// Milliseconds since `base` until which the upstream is ejected; 0 when it is not.
    ejected_until: AtomicU64,
    /// Milliseconds since `base` of the last failure.
    failed_at: AtomicU64,
}

/// How long an upstream whose last request failed loses every balancing draw: long enough
/// that a dead upstream stops costing requests a connect attempt, short enough that one that
/// failed once (and that, with two upstreams, would otherwise never be drawn again to prove
/// itself) is back in the rotation soon.
pub const AVOID_FOR: Duration = Duration::from_secs(1);

impl Default for PassiveState {
    fn default() -> Self {
        PassiveState {
            base: Instant::now(),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            failed_at: AtomicU64::new(0),
        }
    }
}

impl PassiveState {
    /// Milliseconds since `base`, from 1 (0 means "not ejected").
    fn now_ms(&self) -> u64 {
        (Instant::now()
            .saturating_duration_since(self.base)
            .as_millis() as u64)
            .saturating_add(1)
    }

    /// Ejected now.
    pub fn ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if self.now_ms() < until {
            return true;
        }
        // Time is up: later checks skip the clock.
        let _ = self
            .ejected_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed);
        false
    }

    /// Its last request failed less than [`AVOID_FOR`] ago: it is not preferred while another
    /// upstream's did not.
    pub fn failing(&self) -> bool {
        self.failures.load(Ordering::Relaxed) > 0
            && self.now_ms() < self.failed_at.load(Ordering::Relaxed) + AVOID_FOR.as_millis() as u64
    }

    /// A request got an answer: the count starts over. Writes only when there is something to
    /// clear, so successes on a busy upstream do not contend on the cache line.
    pub fn success(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
    }

    /// A request failed; true when this failure ejected the upstream: once per ejection, however
    /// many requests in flight fail together (they would log one ejection each).
    pub fn failure(&self, cfg: &PassiveConfig) -> bool {
        let now = self.now_ms();
        self.failed_at.store(now, Ordering::Relaxed);
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if cfg.eject_after == 0 || n < cfg.eject_after {
            return false;
        }
        // Counted afresh after the ejection: it takes `eject_after` more to eject it again.
        self.failures.store(0, Ordering::Relaxed);
        let until = now.saturating_add(cfg.eject_for.as_millis() as u64).max(1);
        let mut prev = self.ejected_until.load(Ordering::Relaxed);
        loop {
            if prev != 0 && now < prev {
                // Already ejected (failures of requests that were in flight, or of a pool in
                // panic mode): the same ejection, extended as before, not a new one.
                self.ejected_until.fetch_max(until, Ordering::Relaxed);
                return false;
            }
            // Of failures racing here, the one that moves it from "not ejected" ejects it; a
            // lost race against a reader clearing an expired ejection tries again (the
            // ejection is never lost).
            match self.ejected_until.compare_exchange(
                prev,
                until,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now_there) => prev = now_there,
            }
        }
    }

    /// Milliseconds of ejection left (0 when not ejected), for `/api/status`.
    pub fn ejected_for_ms(&self) -> u64 {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until.saturating_sub(self.now_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ejects_after_consecutive_failures_and_returns_after_eject_for() {
        let cfg = PassiveConfig {
            eject_after: 3,
            eject_for: Duration::from_secs(10),
        };
        let s = PassiveState::default();
        assert!(!s.failure(&cfg) && !s.failure(&cfg));
        assert!(s.failing() && !s.ejected());
        tokio::time::advance(AVOID_FOR).await;
        assert!(!s.failing(), "avoided only for a while");
        // A success in between starts the count over.
        s.success();
        assert!(!s.failure(&cfg) && !s.failure(&cfg));
        tokio::time::advance(AVOID_FOR).await;
        assert!(
            s.failure(&cfg),
            "the third failure in a row ejects, however spread out"
        );
        assert!(s.ejected());
        assert!(s.ejected_for_ms() > 9_000);
        tokio::time::advance(Duration::from_millis(9_900)).await;
        assert!(s.ejected());
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(!s.ejected());
        assert_eq!(s.ejected_for_ms(), 0);
        // Off: failures are counted (for balancing) but never eject.
        let off = PassiveConfig {
            eject_after: 0,
            ..cfg
        };
        for _ in 0..10 {
            assert!(!s.failure(&off));
        }
        assert!(!s.ejected() && s.failing());
    }

    /// Requests in flight that fail together eject it once: one `true`, so one "upstream
    /// ejected" line, per ejection.
    #[test]
    fn failures_at_once_eject_once() {
        let cfg = PassiveConfig {
            eject_after: 1,
            eject_for: Duration::from_secs(60),
        };
        let s = std::sync::Arc::new(PassiveState::default());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || s.failure(&cfg))
            })
            .collect();
        let ejections = threads
            .into_iter()
            .map(|t| t.join().unwrap_or(false))
            .filter(|e| *e)
            .count();
        assert_eq!(ejections, 1, "eight failures at once");
        assert!(s.ejected());
    }

    /// Failures while it is ejected (requests that were in flight) are the same ejection; once
    /// it is back, the next ejection is reported again.
    #[tokio::test(start_paused = true)]
    async fn failures_while_ejected_do_not_eject_again() {
        let cfg = PassiveConfig {
            eject_after: 2,
            eject_for: Duration::from_secs(10),
        };
        let s = PassiveState::default();
        assert!(!s.failure(&cfg) && s.failure(&cfg));
        for _ in 0..6 {
            assert!(!s.failure(&cfg));
        }
        assert!(s.ejected());
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!s.ejected());
        assert!(!s.failure(&cfg) && s.failure(&cfg));
        assert!(s.ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn success_clears_the_count() {
        let cfg = PassiveConfig {
            eject_after: 2,
            eject_for: Duration::from_secs(1),
        };
        let s = PassiveState::default();
        for _ in 0..10 {
            assert!(!s.failure(&cfg));
            s.success();
        }
        assert!(!s.ejected());
    }
}
