//! TLS for the proxy and admin listeners (rustls), with certificates that can be swapped on
//! reload without dropping open connections: new handshakes read the current key pair.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

#[derive(Debug)]
struct Resolver {
    key: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key.load_full())
    }
}

/// A TLS acceptor (HTTP/1.1 and h2 by ALPN) whose certificate can be reloaded.
#[derive(Clone)]
pub struct TlsSetup {
    resolver: Arc<Resolver>,
    acceptor: TlsAcceptor,
    cert: PathBuf,
    key: PathBuf,
}

impl TlsSetup {
    pub fn new(cert: &Path, key: &Path) -> Result<TlsSetup, String> {
        let ck = load_certified_key(cert, key)?;
        let resolver = Arc::new(Resolver {
            key: ArcSwap::from_pointee(ck),
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsSetup {
            resolver,
            acceptor: TlsAcceptor::from(Arc::new(cfg)),
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
        })
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Re-reads the certificate and key from their paths (or new ones); on error keeps the
    /// current pair. Open connections are not touched.
    pub fn reload(&self, cert: Option<&Path>, key: Option<&Path>) -> Result<(), String> {
        let cert = cert.unwrap_or(&self.cert);
        let key = key.unwrap_or(&self.key);
        let ck = load_certified_key(cert, key)?;
        self.resolver.key.store(Arc::new(ck));
        Ok(())
    }
}

/// Reads a PEM certificate chain and private key.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read certificate {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("invalid certificate PEM {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate found in {}", cert.display()));
    }
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read private key {}: {e}", key.display()))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|e| format!("unsupported private key {}: {e}", key.display()))?;
    let ck = CertifiedKey::new(certs, signer);
    ck.keys_match().map_err(|e| {
        format!(
            "certificate {} and key {} do not match: {e}",
            cert.display(),
            key.display()
        )
    })?;
    Ok(ck)
}
