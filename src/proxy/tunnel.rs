//! Upgraded connections (WebSocket and friends): the `101` toward the client, then both
//! connections spliced together until either side closes or `tunnel_idle_timeout` passes.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Response, StatusCode};
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ConnInfo, UpstreamBody};
use crate::access_log::{Routed, TunnelLine};
use crate::http::server::OnUpgrade;

/// Answers 101 to the client and splices both upgraded connections together. The tunnel stays
/// on the upstream (and so the color) where it began, whatever flips happen meanwhile. With
/// the access log on (`routed`), the tunnel writes the request's line when it closes.
pub(super) fn tunnel(
    tunnels: &Tunnels,
    idle: Duration,
    mut upstream_resp: Response<UpstreamBody>,
    client_side: OnUpgrade,
    conn: Arc<ConnInfo>,
    routed: Option<&mut Routed>,
) -> Response<UpstreamBody> {
    // The connection now belongs to the tunnel, never to the pool.
    let upstream_side = upstream_resp.body_mut().take_upgraded();
    let line = routed.map(|r| {
        let (to_tunnel, line) = TunnelLine::new();
        r.tunnel = Some(to_tunnel);
        line
    });
    tunnels.spawn(async move {
        // The tunnel is still a client connection: it keeps its `max_connections` slot.
        let _conn = conn;
        let to_client = AtomicU64::new(0);
        let to_client = line.as_ref().map_or(&to_client, |l| &l.to_client);
        let Some((mut upstream, early)) = upstream_side else {
            return;
        };
        let mut client = match client_side.await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        // Bytes the upstream sent right behind its 101 head belong to the tunnel.
        if !early.is_empty() {
            if client.write_all(&early).await.is_err() {
                return;
            }
            to_client.fetch_add(early.len() as u64, Ordering::Relaxed);
        }
        if let Err(e) = crate::guard::splice(&mut client, &mut upstream, idle, to_client).await {
            tracing::debug!(error = %e, "tunnel closed with an error");
        }
    });
    // The body is over (its connection taken): the caller records the exchange as it ends.
    *upstream_resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    upstream_resp
}

/// The open upgraded connections. A tunnel outlives the client connection it came from, so the
/// listeners' graceful shutdown does not see it: shutdown waits for these separately, within
/// the same `shutdown_grace`, and then closes the ones still open.
#[derive(Default)]
pub struct Tunnels {
    tracker: TaskTracker,
    /// Cancelled at the shutdown deadline: every tunnel still open drops both its ends.
    cut: CancellationToken,
}

impl Tunnels {
    fn spawn(&self, tunnel: impl Future<Output = ()> + Send + 'static) {
        let cut = self.cut.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = tunnel => {}
                _ = cut.cancelled() => {}
            }
        });
    }

    /// Waits until every tunnel has closed or `deadline` passes, then closes those left. Safe to
    /// call from every listener at once.
    pub async fn drain(&self, deadline: Instant) {
        self.tracker.close();
        let open = self.tracker.len();
        if open == 0 {
            return;
        }
        tracing::info!(tunnels = open, "waiting for open tunnels to close");
        if tokio::time::timeout_at(deadline, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tunnels = self.tracker.len(),
                "shutdown grace elapsed; closing the remaining tunnels"
            );
            self.cut.cancel();
            self.tracker.wait().await;
        }
    }
}
