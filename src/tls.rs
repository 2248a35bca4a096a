//! TLS for the proxy and admin listeners (rustls), with certificates that can be swapped on
//! reload without dropping open connections: new handshakes read the current key pair.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// A PEM error as a person reads it: the marker a section is missing as text
/// (`-----END CERTIFICATE-----`), where the error's own text lists its bytes (a truncated file).
fn pem_text(e: &pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "the file ends inside a section, with no \"-----END {}-----\" line (truncated?)",
            String::from_utf8_lossy(end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => format!(
            "a malformed section start line {:?}",
            String::from_utf8_lossy(line)
        ),
        e => e.to_string(),
    }
}

/// Why a certificate and key could not be loaded; [`TlsError::file`] says which file is at fault,
/// so that the caller can name its config key.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate {}: {}", path.display(), pem_text(source))]
    ReadCert { path: PathBuf, source: pem::Error },
    #[error("invalid certificate PEM {}: {}", path.display(), pem_text(source))]
    CertPem { path: PathBuf, source: pem::Error },
    #[error("no certificate found in {}", path.display())]
    NoCert { path: PathBuf },
    #[error("cannot read private key {}: {}", path.display(), pem_text(source))]
    ReadKey { path: PathBuf, source: pem::Error },
    #[error("private key {} is encrypted (a passphrase-protected key cannot be read here): store it unencrypted, readable by Switchyard alone (`openssl pkey -in KEY -out PLAIN`)", path.display())]
    EncryptedKey { path: PathBuf },
    #[error("unsupported private key {}: {source}", path.display())]
    UnsupportedKey {
        path: PathBuf,
        source: rustls::Error,
    },
    #[error("certificate {} is X.509 v1, which rustls does not serve: reissue it as v3 (with a subjectAltName, as `openssl req -x509` or `openssl x509 -req -extfile` makes it)", path.display())]
    CertVersion { path: PathBuf },
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
            | TlsError::CertVersion { .. }
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

    /// The key pair new handshakes are served.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        self.resolver.key.load_full()
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

/// The private key in `key` (PEM), ready to sign: what [`load_certified_key`] reads from it, and
/// what `check` reads alone when the certificate failed first, so that both files' problems are
/// named at once.
pub fn load_key(key: &Path) -> Result<Arc<dyn rustls::sign::SigningKey>, TlsError> {
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
    Ok(signer)
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
    let signer = load_key(key)?;
    let ck = CertifiedKey::new(certs, signer);
    ck.keys_match().map_err(|source| {
        // webpki cannot read a v1 certificate's key: that is not a mismatch.
        if ck
            .end_entity_cert()
            .ok()
            .and_then(|c| der_version(c.as_ref()))
            == Some(1)
        {
            return TlsError::CertVersion {
                path: cert.to_path_buf(),
            };
        }
        TlsError::Mismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            source,
        }
    })?;
    Ok(ck)
}

/// How long before its end a certificate is warned about: a renewal that failed, or wrote the
/// old file back, is seen while there is time to act (Let's Encrypt renews at 30 days left).
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// The served certificate's validity period (`notBefore`, `notAfter`), read from its DER; `None`
/// when it cannot be read (rustls has accepted the certificate, so that is not an error here).
pub fn validity(ck: &CertifiedKey) -> Option<(SystemTime, SystemTime)> {
    let leaf = ck.end_entity_cert().ok()?;
    der_validity(leaf.as_ref())
}

/// A warning for a certificate outside its validity period at `now`, or within
/// [`EXPIRY_WARNING`] of its end; `None` when it is fine (or its dates cannot be read).
pub fn validity_warning(ck: &CertifiedKey, path: &Path, now: SystemTime) -> Option<String> {
    let (not_before, not_after) = validity(ck)?;
    let at = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
    if now >= not_after {
        return Some(format!(
            "certificate {} expired at {}: clients refuse it",
            path.display(),
            at(not_after)
        ));
    }
    if now < not_before {
        return Some(format!(
            "certificate {} is not valid before {}: clients refuse it until then (is this clock right?)",
            path.display(),
            at(not_before)
        ));
    }
    let left = not_after.duration_since(now).unwrap_or_default();
    (left < EXPIRY_WARNING).then(|| {
        format!(
            "certificate {} expires at {}, in {}: renew it",
            path.display(),
            at(not_after),
            humantime::format_duration(Duration::from_secs(left.as_secs() / 60 * 60))
        )
    })
}

/// `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber,
/// signature, issuer, validity SEQUENCE { notBefore, notAfter }, ... }, ... }` (RFC 5280 4.1).
fn der_validity(der: &[u8]) -> Option<(SystemTime, SystemTime)> {
    let (_, mut tbs) = der_tbs(der)?;
    for _ in 0..3 {
        tbs = der_element(tbs)?.2; // serialNumber, signature, issuer
    }
    let (tag, validity, _) = der_element(tbs)?;
    if tag != 0x30 {
        return None;
    }
    let (t1, v1, rest) = der_element(validity)?;
    let (t2, v2, _) = der_element(rest)?;
    Some((der_time(t1, v1)?, der_time(t2, v2)?))
}

/// The certificate's X.509 version (1, 2 or 3): `[0] EXPLICIT INTEGER` (0-based), absent for v1.
fn der_version(der: &[u8]) -> Option<u8> {
    der_tbs(der).map(|(v, _)| v)
}

/// The version and the fields of `tbsCertificate` after the version.
fn der_tbs(der: &[u8]) -> Option<(u8, &[u8])> {
    let (_, cert, _) = der_element(der)?;
    let (_, tbs, _) = der_element(cert)?;
    let (tag, explicit, rest) = der_element(tbs)?;
    if tag != 0xa0 {
        return Some((1, tbs));
    }
    match der_element(explicit)? {
        (0x02, [v], _) if *v < 3 => Some((v + 1, rest)),
        _ => None,
    }
}

/// One DER element at the start of `b`: its tag, its contents, what follows it.
fn der_element(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, b) = b.split_first()?;
    let (len, b) = if first < 0x80 {
        (usize::from(first), b)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n]
            .iter()
            .fold(0usize, |acc, &x| (acc << 8) | usize::from(x));
        (len, &b[n..])
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

/// A UTCTime (`YYMMDDHHMMSSZ`, years 1950–2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`), the
/// only forms RFC 5280 4.1.2.5 allows in a certificate.
fn der_time(tag: u8, v: &[u8]) -> Option<SystemTime> {
    let s = std::str::from_utf8(v).ok()?;
    let full = match (tag, s.len()) {
        (0x17, 13) => {
            let yy: u32 = s.get(..2)?.parse().ok()?;
            format!("{}{s}", if yy >= 50 { "19" } else { "20" })
        }
        (0x18, 15) => s.to_string(),
        _ => return None,
    };
    if !full.ends_with('Z') || !full[..14].bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    // Before the Unix epoch (a notBefore of 1950): the epoch serves as well for a warning.
    if &full[..4] < "1970" {
        return Some(SystemTime::UNIX_EPOCH);
    }
    let rfc3339 = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &full[..4],
        &full[4..6],
        &full[6..8],
        &full[8..10],
        &full[10..12],
        &full[12..14]
    );
    humantime::parse_rfc3339(&rfc3339).ok()
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
        .map_err(|e| {
            format!(
                "invalid certificate PEM {}: {}",
                cert.display(),
                pem_text(&e)
            )
        })?;
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

        // A truncated certificate says which end line is missing, as text.
        let pem = ck.cert.pem();
        let truncated = dir.path().join("truncated.pem");
        std::fs::write(&truncated, &pem[..pem.len() / 2]).expect("write");
        let e = load_certified_key(&truncated, &own).expect_err("truncated cert");
        assert_eq!(e.file(), TlsFile::Cert, "{e}");
        assert!(
            e.to_string().contains("\"-----END CERTIFICATE-----\""),
            "{e}"
        );

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

    /// A self-signed certificate and its key, valid from `from` to `until`, written to `dir`.
    fn dated(
        dir: &Path,
        from: (i32, u8, u8),
        until: (i32, u8, u8),
    ) -> (PathBuf, PathBuf, CertifiedKey) {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params.not_before = rcgen::date_time_ymd(from.0, from.1, from.2);
        params.not_after = rcgen::date_time_ymd(until.0, until.1, until.2);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        let (c, k) = (
            dir.join(format!("{until:?}.pem")),
            dir.join(format!("{until:?}.key")),
        );
        std::fs::write(&c, cert.pem()).expect("write");
        std::fs::write(&k, key.serialize_pem()).expect("write");
        let ck = load_certified_key(&c, &k).expect("loads");
        (c, k, ck)
    }

    fn at(s: &str) -> SystemTime {
        humantime::parse_rfc3339(s).expect("time")
    }

    #[test]
    fn validity_is_read_from_utc_and_generalized_times() {
        let dir = tempfile::tempdir().expect("tempdir");
        // rcgen writes UTCTime before 2050 and GeneralizedTime from 2050 (RFC 5280 4.1.2.5).
        let (_, _, ck) = dated(dir.path(), (1999, 12, 31), (2061, 3, 4));
        assert_eq!(
            validity(&ck),
            Some((at("1999-12-31T00:00:00Z"), at("2061-03-04T00:00:00Z")))
        );
        let (_, _, ck) = dated(dir.path(), (1950, 1, 1), (2030, 1, 1));
        assert_eq!(
            validity(&ck),
            Some((SystemTime::UNIX_EPOCH, at("2030-01-01T00:00:00Z"))),
            "a notBefore before 1970 reads as the epoch"
        );
        let (_, _, ck) = dated(dir.path(), (2020, 1, 1), (2049, 12, 31));
        assert_eq!(
            validity(&ck),
            Some((at("2020-01-01T00:00:00Z"), at("2049-12-31T00:00:00Z")))
        );
        assert_eq!(
            der_version(ck.end_entity_cert().expect("leaf").as_ref()),
            Some(3)
        );
        // Truncated or garbage DER reads as unknown, never a panic.
        let der = ck.end_entity_cert().expect("leaf").as_ref().to_vec();
        for n in 0..200.min(der.len()) {
            let _ = der_validity(&der[..n]);
        }
        assert_eq!(der_validity(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(der_validity(b"not a certificate"), None);
    }

    #[test]
    fn a_certificate_expired_expiring_or_not_yet_valid_is_warned_about() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _, ck) = dated(dir.path(), (2026, 1, 1), (2027, 1, 1));
        let warn = |now: &str| validity_warning(&ck, &path, at(now));
        assert_eq!(warn("2026-06-01T00:00:00Z"), None);
        assert_eq!(warn("2026-12-17T23:59:59Z"), None, "15 days left");
        let soon = warn("2026-12-29T00:00:00Z").expect("3 days left");
        assert!(
            soon.contains("expires at 2027-01-01T00:00:00Z, in 3days: renew it"),
            "{soon}"
        );
        let expired = warn("2027-01-01T00:00:00Z").expect("expired");
        assert!(
            expired.contains("expired at 2027-01-01T00:00:00Z"),
            "{expired}"
        );
        let early = warn("2025-12-31T23:00:00Z").expect("not yet valid");
        assert!(
            early.contains("is not valid before 2026-01-01T00:00:00Z"),
            "{early}"
        );
        assert!(soon.contains(&path.display().to_string()), "{soon}");
    }

    /// DER `tag` around `contents`.
    fn der(tag: u8, contents: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = contents.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes: Vec<u8> = len
                .to_be_bytes()
                .into_iter()
                .skip_while(|b| *b == 0)
                .collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend(bytes);
        }
        out.extend(contents);
        out
    }

    #[test]
    fn an_x509_v1_certificate_is_named_as_such_not_as_a_mismatch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_, key, ck) = dated(dir.path(), (2026, 1, 1), (2036, 1, 1));
        // The same certificate without its version field (v1; its signature no longer
        // verifies, which loading does not check).
        let leaf = ck.end_entity_cert().expect("leaf").as_ref().to_vec();
        let (_, cert, _) = der_element(&leaf).expect("certificate");
        let (_, tbs, rest) = der_element(cert).expect("tbs");
        let (tag, _, fields) = der_element(tbs).expect("version");
        assert_eq!(tag, 0xa0);
        let v1 = der(0x30, &[der(0x30, fields), rest.to_vec()].concat());
        assert_eq!(der_version(&v1), Some(1));
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &v1)
        );
        let path = dir.path().join("v1.pem");
        std::fs::write(&path, pem).expect("write");
        let e = load_certified_key(&path, &key).expect_err("v1");
        assert!(matches!(e, TlsError::CertVersion { .. }), "{e}");
        assert_eq!(e.file(), TlsFile::Cert);
        assert!(e.to_string().contains("is X.509 v1"), "{e}");
    }
}
