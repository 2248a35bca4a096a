//! The shutdown signal: cancelled once, checked on every request, awaited by every idle
//! connection.
//!
//! `tokio_util`'s `CancellationToken` takes its node's mutex in `is_cancelled`, and a task
//! waiting on it registers on one `Notify` (its waiter list is another mutex). The HTTP/1
//! server checks and waits once or twice per request, so with several workers that was one
//! pair of locks shared by every connection. Here the check is one atomic load, and waiters
//! register on a `Notify` of their own worker thread (one per thread, up to [`SHARDS`]): a
//! keep-alive wait takes only its own thread's lock, which no other worker contends.
//!
//! The interface is the token's (`cancel`, `is_cancelled`, `cancelled`), with the same
//! guarantees: once `cancel` returns, `is_cancelled` is true everywhere and every `cancelled`
//! future, already waiting or created later, completes.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Wake-up shards: threads beyond this many share them (round robin), which costs contention,
/// never a missed wake-up.
pub const SHARDS: usize = 32;

pub struct Shutdown {
    cancelled: AtomicBool,
    shards: Box<[Notify]>,
    /// Parent of [`Shutdown::child_token`]s; never touched on the request path.
    tree: CancellationToken,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown::new()
    }
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shutdown")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown {
            cancelled: AtomicBool::new(false),
            shards: (0..SHARDS).map(|_| Notify::new()).collect(),
            tree: CancellationToken::new(),
        }
    }

    /// Starts the shutdown; idempotent.
    pub fn cancel(&self) {
        // The flag first: a waiter that registers after the wake-ups below sees it set.
        if self.cancelled.swap(true, Ordering::SeqCst) {
            return;
        }
        for shard in self.shards.iter() {
            shard.notify_waiters();
        }
        self.tree.cancel();
    }

    /// A token cancelled with this signal that can also be cancelled on its own: for a
    /// long-lived task off the request path (a release's driver) that something else may stop.
    pub fn child_token(&self) -> CancellationToken {
        self.tree.child_token()
    }

    /// One atomic load: no lock.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Completes once `cancel` has been called (at once if it already was). Cancel safe. It
    /// registers for the wake-up only when first polled, on the polling thread's shard.
    pub async fn cancelled(&self) {
        let notify = &self.shards[shard_of_this_thread()];
        // `notify_waiters` completes every `Notified` created before it, polled or not; one
        // created after it finds the flag set (stored before the wake-ups).
        let notified = notify.notified();
        if self.is_cancelled() {
            return;
        }
        notified.await;
    }
}

/// This thread's shard, assigned round robin on first use.
fn shard_of_this_thread() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    SHARD.with(|s| {
        let mut i = s.get();
        if i == usize::MAX {
            i = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
            s.set(i);
        }
        i
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn cancel_wakes_waiters_on_every_thread_and_later_ones_complete_at_once() {
        let s = Arc::new(Shutdown::new());
        assert!(!s.is_cancelled());
        let mut waiting = Vec::new();
        let mut woken = Vec::new();
        // Waiters on several OS threads, so that they sit on different shards.
        for _ in 0..4 {
            let s = s.clone();
            let (registered_tx, registered_rx) = tokio::sync::oneshot::channel();
            let (woken_tx, woken_rx) = tokio::sync::oneshot::channel();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let mut wait = std::pin::pin!(s.cancelled());
                    // Registered and pending before the cancel.
                    assert!(poll_once(wait.as_mut()).await.is_pending());
                    let _ = registered_tx.send(());
                    wait.await;
                    let _ = woken_tx.send(());
                });
            });
            waiting.push(registered_rx);
            woken.push(woken_rx);
        }
        for rx in waiting {
            rx.await.unwrap();
        }
        s.cancel();
        s.cancel(); // idempotent
        assert!(s.is_cancelled());
        for rx in woken {
            tokio::time::timeout(Duration::from_secs(5), rx)
                .await
                .expect("a registered waiter was not woken")
                .unwrap();
        }
        // A future created after the cancel completes at once.
        tokio::time::timeout(Duration::from_secs(5), s.cancelled())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_waiter_created_before_cancel_but_first_polled_after_completes() {
        let s = Shutdown::new();
        let wait = s.cancelled();
        s.cancel();
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .unwrap();
    }

    async fn poll_once<F: Future + Unpin>(mut f: F) -> std::task::Poll<F::Output> {
        std::future::poll_fn(|cx| std::task::Poll::Ready(std::pin::Pin::new(&mut f).poll(cx))).await
    }
}
