//! Body helpers: the idle timer a body (or a write) runs between two pieces of progress.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// The longest wait for the next piece of progress (a body's next frame, a write's next
/// byte). The timer is allocated only once the first wait begins, and restarts with each wait.
pub struct IdleTimer {
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether the timer runs for the current wait.
    waiting: bool,
}

impl IdleTimer {
    /// `idle` zero turns the timeout off.
    pub fn new(idle: Duration) -> IdleTimer {
        IdleTimer {
            idle,
            timer: None,
            waiting: false,
        }
    }

    pub fn duration(&self) -> Duration {
        self.idle
    }

    /// Progress: the next wait starts a fresh timer.
    pub fn progressed(&mut self) {
        self.waiting = false;
    }

    /// Waiting: true once it has waited `idle` since its last progress.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.idle.is_zero() {
            return false;
        }
        let deadline = Instant::now() + self.idle;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.waiting {
            timer.as_mut().reset(deadline);
            self.waiting = true;
        }
        timer.as_mut().poll(cx).is_ready()
    }
}
