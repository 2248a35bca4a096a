//! Background tasks that outlive a panic. A bug that panics inside the rollback watcher, the
//! health checks or the analysis loop would otherwise leave the process serving without them,
//! silently (tokio catches the panic and ends the task): the task is started again after a
//! pause, said at ERROR and counted (`switchyard_task_restarts_total{task}`), as nginx's master
//! starts a worker that died.

use std::future::Future;
use std::time::Duration;

use prometheus::IntCounter;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

/// The first pause before a restart; doubled after each panic in a row, up to [`MAX_PAUSE`],
/// so that a task that panics at once on every start does not spin.
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const MAX_PAUSE: Duration = Duration::from_secs(30);
/// A run this long resets the pause: its panic was not a crash loop.
const STEADY: Duration = Duration::from_secs(60);

/// Runs `make()` as a task of its own until it returns; when it panics before `shutdown`, starts
/// it again. Dropping the returned future (its own task aborted) aborts the running one too.
pub async fn supervise<F, Fut>(
    name: &'static str,
    shutdown: CancellationToken,
    restarts: IntCounter,
    mut make: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut pause = FIRST_PAUSE;
    loop {
        let began = tokio::time::Instant::now();
        let ended = AbortOnDropHandle::new(tokio::spawn(make())).await;
        let Err(e) = ended else { return };
        if !e.is_panic() || shutdown.is_cancelled() {
            return;
        }
        if began.elapsed() >= STEADY {
            pause = FIRST_PAUSE;
        }
        restarts.inc();
        tracing::error!(
            task = name,
            panic = panic_text(e.into_panic().as_ref()),
            "a background task panicked; starting it again in {pause:?}"
        );
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = shutdown.cancelled() => return,
        }
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// A panic's message, when it is text.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not text)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn counter() -> IntCounter {
        IntCounter::new("t", "t").unwrap_or_else(|e| unreachable!("{e}"))
    }

    /// A task that panics is started again (after the pause) and counted; one that returns
    /// is not.
    #[tokio::test(start_paused = true)]
    async fn a_panicked_task_is_started_again_and_counted() {
        let runs = Arc::new(AtomicUsize::new(0));
        let restarts = counter();
        let r = runs.clone();
        supervise("t", CancellationToken::new(), restarts.clone(), move || {
            let n = r.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    panic!("run {n} fails");
                }
            }
        })
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(restarts.get(), 2);
    }

    /// After shutdown a panic ends the supervision: nothing is started again.
    #[tokio::test(start_paused = true)]
    async fn no_restart_after_shutdown() {
        let runs = Arc::new(AtomicUsize::new(0));
        let restarts = counter();
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let r = runs.clone();
        supervise("t", shutdown, restarts.clone(), move || {
            r.fetch_add(1, Ordering::SeqCst);
            async { panic!("at shutdown") }
        })
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(restarts.get(), 0);
    }

    /// A shutdown during the pause ends it without another start.
    #[tokio::test(start_paused = true)]
    async fn a_shutdown_during_the_pause_ends_it() {
        let runs = Arc::new(AtomicUsize::new(0));
        let shutdown = CancellationToken::new();
        let r = runs.clone();
        let s = shutdown.clone();
        let sup = tokio::spawn(supervise("t", shutdown.clone(), counter(), move || {
            r.fetch_add(1, Ordering::SeqCst);
            async { panic!("always") }
        }));
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.cancel();
        tokio::time::timeout(Duration::from_secs(1), sup)
            .await
            .unwrap_or_else(|_| panic!("the supervisor did not end"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    /// Aborting the supervisor aborts the task it runs.
    #[tokio::test(start_paused = true)]
    async fn aborting_the_supervisor_aborts_its_task() {
        let ended = CancellationToken::new();
        let e = ended.clone();
        let sup = tokio::spawn(supervise(
            "t",
            CancellationToken::new(),
            counter(),
            move || {
                let guard = e.clone().drop_guard();
                async move {
                    let _guard = guard;
                    std::future::pending::<()>().await;
                }
            },
        ));
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!ended.is_cancelled());
        sup.abort();
        let _ = sup.await;
        tokio::time::timeout(Duration::from_secs(1), ended.cancelled())
            .await
            .unwrap_or_else(|_| panic!("the running task was not aborted"));
    }
}
