//! `switchyard healthcheck`: is the Switchyard that runs with this config serving? Reads the
//! config file as `serve` does (the same path and `SWITCHYARD__*` overrides) and probes its admin
//! listener's `/healthz` at the address, scheme and certificate the config gives it, so that a
//! container health check follows the config instead of assuming `http://127.0.0.1:9090`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http_body_util::Empty;

use crate::config::AdminConfig;
use crate::http::client::fetch_once;

/// `switchyard healthcheck`'s flags.
#[derive(Args, Debug)]
pub struct HealthcheckArgs {
    /// The config file the server runs with.
    #[arg(
        long,
        env = "SWITCHYARD_CONFIG",
        default_value = "config/switchyard.toml"
    )]
    pub config: PathBuf,
    /// Give up (exit 1) after this long.
    #[arg(long, default_value = "3s", value_parser = crate::config::parse_duration)]
    pub timeout: Duration,
}

/// Where and how to probe: the admin listener's address (a wildcard listen address is probed on
/// the loopback of its family) and, for `[admin] tls_cert`, a TLS client that trusts exactly
/// that certificate.
pub struct Target {
    pub url: String,
    addr: SocketAddr,
    /// For a `[::]` listen: 127.0.0.1, where IPv6 is off but the dual-stack socket takes IPv4.
    fallback: Option<SocketAddr>,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Target {
    /// Reads the admin TLS certificate, if any: call it before entering the runtime.
    pub fn from_config(admin: &AdminConfig) -> Result<Target, String> {
        let mut addr = admin.listen;
        if addr.port() == 0 {
            return Err("admin.listen has port 0 (chosen at start): nothing to probe".into());
        }
        let mut fallback = None;
        if addr.ip().is_unspecified() {
            if addr.is_ipv6() {
                fallback = Some(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::LOCALHOST),
                    addr.port(),
                ));
            }
            addr.set_ip(match addr.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        let tls = match &admin.tls_cert {
            Some(cert) => Some(
                crate::tls::pinned_client_config(cert)
                    .map_err(|e| format!("admin.tls_cert: {e}"))?,
            ),
            None => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        Ok(Target {
            url: format!("{scheme}://{addr}/healthz"),
            addr,
            fallback,
            tls,
        })
    }

    /// GET /healthz: Ok on the admin listener's `200 ok`, else why not. A `[::]` listener that
    /// cannot be reached on `::1` (IPv6 off in the container) is tried on 127.0.0.1.
    pub async fn probe(&self) -> Result<(), String> {
        match (self.probe_at(self.addr).await, self.fallback) {
            (Err(e), Some(v4)) if e.starts_with("cannot connect") => {
                self.probe_at(v4).await.map_err(|e4| format!("{e}; {e4}"))
            }
            (r, _) => r,
        }
    }

    async fn probe_at(&self, addr: SocketAddr) -> Result<(), String> {
        let auth: http::uri::Authority = addr
            .to_string()
            .parse()
            .map_err(|e| format!("invalid admin address {addr}: {e}"))?;
        let req = http::Request::get("/healthz")
            .header(http::header::HOST, auth.as_str())
            .header(http::header::USER_AGENT, "switchyard-healthcheck")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("invalid request: {e}"))?;
        let (status, body) = fetch_once(&auth, self.tls.clone(), req, 4096).await?;
        let body = String::from_utf8_lossy(&body);
        if status == http::StatusCode::OK && body.trim() == "ok" {
            Ok(())
        } else {
            Err(format!("{} answered {status}: {}", self.url, body.trim()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A `[::]` admin listen whose `::1` cannot be reached (IPv6 off, or here: nothing listens
    /// on it) is probed on 127.0.0.1, where a dual-stack listener takes IPv4.
    #[tokio::test]
    async fn a_wildcard_v6_listen_falls_back_to_ipv4_loopback() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n",
                    )
                    .await;
            }
        });
        let t = Target {
            url: format!("http://[::1]:{port}/healthz"),
            addr: SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
            fallback: Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)),
            tls: None,
        };
        assert_eq!(t.probe().await, Ok(()));
        // Without the fallback, the same probe fails.
        let t = Target {
            fallback: None,
            ..t
        };
        assert!(t.probe().await.is_err());
    }
}
