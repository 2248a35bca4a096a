//! TLS for the proxy and admin listeners (rustls), with certificates that can be swapped on
//! reload without dropping open connections: new handshakes read the current key pair.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// Why a certificate and key could not be loaded; [`TlsError::file`] says which file is at fault,
/// so that the caller can name its config key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate {}: {source}", path.display())]
    ReadCert { path: PathBuf, source: pem::Error },
    #[error("invalid certificate PEM {}: {source}", path.display())]
    CertPem { path: PathBuf, source: pem::Error },
    #[error("no certificate found in {}", path.display())]
    NoCert { path: PathBuf },
    #[error("cannot read private key {}: {source}", path.display())]
    ReadKey { path: PathBuf, source: pem::Error },
    #[error("private key {} is encrypted (a passphrase-protected key cannot be read here): store it unencrypted, readable by Switchyard alone (`openssl pkey -in KEY -out PLAIN`)", path.display())]
    EncryptedKey { path: PathBuf },
    #[error("unsupported private key {}: {source}", path.display())]
    UnsupportedKey {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("certificate {} and key {} do not match: {source}", cert.display(), key.display())]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
    #[error("TLS setup: {0}")]
    Setup(rustls::Error),
    /// The blocking task that read the files did not finish (it panicked or was cancelled).
    #[error("certificate reload task failed: {0}")]
    Task(String),
}

/// The two files of a TLS setup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFile {
    Cert,
    Key,
}

impl TlsFile {
    /// Its config key within a section: `tls_cert` or `tls_key`.
    pub fn key(self) -> &'static str {
        match self {
            TlsFile::Cert => "tls_cert",
            TlsFile::Key => "tls_key",
        }
    }
}

impl TlsError {
    /// The file the error is about: the key when it cannot be read or used, else the
    /// certificate (a pair that does not match is reported at the certificate).
    pub fn file(&self) -> TlsFile {
        match self {
            TlsError::ReadKey { .. }
            | TlsError::EncryptedKey { .. }
            | TlsError::UnsupportedKey { .. } => TlsFile::Key,
            TlsError::ReadCert { .. }
            | TlsError::CertPem { .. }
            | TlsError::NoCert { .. }
            | TlsError::Mismatch { .. }
            | TlsError::Setup(_)
            | TlsError::Task(_) => TlsFile::Cert,
        }
    }
}

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
}

impl TlsSetup {
    pub fn new(cert: &Path, key: &Path) -> Result<TlsSetup, TlsError> {
        let ck = load_certified_key(cert, key)?;
        let resolver = Arc::new(Resolver {
            key: ArcSwap::from_pointee(ck),
        });
        let provider = provider();
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        // `http/1.0` too (served as HTTP/1, as nginx offers it): a client that offers only that
        // is not refused with `no_application_protocol`.
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
        // Resumption for as many clients as connect: stateless tickets (TLS 1.2 and 1.3, a
        // ticket lives 12 hours, keys rotate every 6) and, for clients that resume by session id, a cache of 20,000
        // sessions (rustls's default keeps 256 and issues no tickets).
        cfg.ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(TlsError::Setup)?;
        cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(20_000);
        Ok(TlsSetup {
            resolver,
            acceptor: TlsAcceptor::from(Arc::new(cfg)),
        })
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Serves `ck` to new handshakes (read with [`load_certified_key`]): a reload reads every
    /// pair first and installs them only when all were read, so a refused reload changes none.
    pub fn install(&self, ck: CertifiedKey) {
        self.resolver.key.store(Arc::new(ck));
    }
}

/// The one crypto provider for every TLS config here: aws-lc-rs (rustls's default), whose
/// X25519, P-256 and SHA-384 cost less per full handshake than *ring*'s on x86-64, and which
/// offers the X25519MLKEM768 hybrid key exchange (post-quantum) to clients that send it.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads a PEM certificate chain and private key.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|source| TlsError::ReadCert {
            path: cert.to_path_buf(),
            source,
        })?
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::CertPem {
            path: cert.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert {
            path: cert.to_path_buf(),
        });
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|source| {
        // An encrypted key has PEM sections rustls skips: "no items found" would say nothing.
        let text = std::fs::read_to_string(key).unwrap_or_default();
        if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----")
            || text.contains("Proc-Type: 4,ENCRYPTED")
        {
            return TlsError::EncryptedKey {
                path: key.to_path_buf(),
            };
        }
        TlsError::ReadKey {
            path: key.to_path_buf(),
            source,
        }
    })?;
    let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der).map_err(|source| {
        TlsError::UnsupportedKey {
            path: key.to_path_buf(),
            source,
        }
    })?;
    let ck = CertifiedKey::new(certs, signer);
    ck.keys_match().map_err(|source| TlsError::Mismatch {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        source,
    })?;
    Ok(ck)
}

/// Where the system's CA bundle usually is (Debian/Ubuntu, Fedora/RHEL, Alpine/macOS-like).
const SYSTEM_CA_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
];

/// A rustls client config (HTTP/1.1 by ALPN) trusting `ca_file`, else the system bundle;
/// `hint` says how to name a CA file when there is no system bundle. Reads files: call it
/// from the blocking pool.
pub fn client_config(
    ca_file: Option<&Path>,
    hint: &str,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let path = match ca_file {
        Some(p) => p.to_path_buf(),
        None => SYSTEM_CA_FILES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or_else(|| format!("no system CA bundle found; {hint}"))?,
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&path)
        .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
    for c in certs {
        let c = c.map_err(|e| format!("bad PEM in {}: {e}", path.display()))?;
        // A bundle may hold certificates rustls cannot use; skip those, keep the rest.
        let _ = roots.add(c);
    }
    if roots.is_empty() {
        return Err(format!("no usable CA certificate in {}", path.display()));
    }
    let provider = provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A rustls client config that trusts exactly the first certificate of the PEM file `cert`,
/// whatever names it carries (the handshake signature is still verified, expiry is not): for
/// probing one's own listener by IP, where no name check can pass and the config says which
/// certificate that listener serves. Reads the file: call it outside async code.
pub fn pinned_client_config(cert: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let pinned = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read certificate {}: {e}", cert.display()))?
        .next()
        .ok_or_else(|| format!("no certificate found in {}", cert.display()))?
        .map_err(|e| format!("invalid certificate PEM {}: {e}", cert.display()))?;
    let provider = provider();
    let verifier = Arc::new(Pinned {
        cert: pinned,
        algs: provider.signature_verification_algorithms,
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The verifier of [`pinned_client_config`].
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the server's certificate is not the configured one (replaced on disk and not \
                 reloaded yet?)"
                    .into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_their_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.pem");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        let e = load_certified_key(&missing, &missing).expect_err("no cert file");
        assert_eq!(e.file(), TlsFile::Cert, "{e}");
        assert!(e.to_string().starts_with("cannot read certificate"), "{e}");
        let e = load_certified_key(&empty, &empty).expect_err("empty cert file");
        assert_eq!(e.file(), TlsFile::Cert, "{e}");
        assert!(e.to_string().starts_with("no certificate found in"), "{e}");

        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("rcgen");
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, ck.cert.pem()).expect("write");
        let e = load_certified_key(&cert, &missing).expect_err("no key file");
        assert_eq!(e.file(), TlsFile::Key, "{e}");
        assert!(e.to_string().starts_with("cannot read private key"), "{e}");
        let e = load_certified_key(&cert, &empty).expect_err("empty key file");
        assert_eq!(e.file(), TlsFile::Key, "{e}");

        let other = rcgen::generate_simple_self_signed(vec!["other".to_string()]).expect("rcgen");
        let key = dir.path().join("other-key.pem");
        std::fs::write(&key, other.key_pair.serialize_pem()).expect("write");
        let e = load_certified_key(&cert, &key).expect_err("mismatched pair");
        assert!(matches!(e, TlsError::Mismatch { .. }), "{e}");
        assert_eq!(e.file(), TlsFile::Cert, "{e}");

        let own = dir.path().join("key.pem");
        std::fs::write(&own, ck.key_pair.serialize_pem()).expect("write");
        load_certified_key(&cert, &own).expect("a matching pair loads");

        // An encrypted key says so, at the key (PKCS#8 and the traditional OpenSSL header).
        let pkcs8 = dir.path().join("enc8.pem");
        std::fs::write(
            &pkcs8,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .expect("write");
        let legacy = dir.path().join("enc1.pem");
        std::fs::write(
            &legacy,
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n",
        )
        .expect("write");
        for k in [&pkcs8, &legacy] {
            let e = load_certified_key(&cert, k).expect_err("encrypted key");
            assert_eq!(e.file(), TlsFile::Key, "{e}");
            assert!(e.to_string().contains("is encrypted"), "{e}");
        }
    }
}
