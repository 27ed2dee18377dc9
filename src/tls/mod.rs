//! TLS toward sites (`tls://` addresses) and on cascading TCP listeners
//! (with client certificates on request: `clients`).
//!
//! rustls with the ring provider, TLS 1.2 and 1.3 only, no OpenSSL.
//!
//! Toward a site the chain is verified against the site's `ca_file`. Like
//! the reference proxy, the certificate's host name is *not* checked unless
//! `server_name` is set (Checkmk sites present certificates for their site
//! name, not for the address the central site uses); with `verify = false`
//! nothing is verified (encryption without authentication). A certificate
//! that cannot be verified is described by subject, issuer and validity, so
//! the reason that marks the site down (and that clients get, with status
//! 495) says which certificate and why.
//!
//! The CA file and the client certificate are checked for changes before
//! every new connection and re-read when they changed; open channels keep
//! the session they have. The check runs on tokio's blocking pool (a file
//! on a slow or hung file system must not stall the runtime's thread), and
//! the lock around the loaded configuration is only ever held to copy or
//! swap a pointer. One `ClientConfig` per site is shared by all its
//! connections, so a reconnect resumes the previous TLS session (one round
//! trip, no certificate exchange) when the site allows it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, Error as TlsError, ServerConfig, SignatureScheme};
use serde::Serialize;

use crate::config::{ListenerTls, TlsSettings};
use crate::error::SiteError;
use words::{Described, describe, reason};

mod clients;
mod words;

pub use clients::{client_handshake_failed, client_subject};

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A file could not be read or parsed.
    #[error("{what} {path}: {detail}")]
    File {
        /// What the file is for.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] TlsError),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_error(what: &'static str, path: &Path, detail: impl ToString) -> TlsSetupError {
    TlsSetupError::File { what, path: path.to_owned(), detail: detail.to_string() }
}

fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(what, path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(what, path, e))?;
    if certs.is_empty() {
        return Err(file_error(what, path, "contains no PEM certificate"));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error("key file", path, e))
}

/// What tells a changed file: modification time, size and inode (a file
/// rewritten within one tick of the file system clock still changes size,
/// and one replaced by a rename changes inode).
type Stamp = Option<(SystemTime, u64, u64)>;

fn stamp(path: &Path) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// What the state file shows of a site's TLS.
#[derive(Debug, Clone, Serialize)]
pub struct TlsSnapshot {
    /// Full handshakes so far.
    pub handshakes_full: u64,
    /// Resumed handshakes so far.
    pub handshakes_resumed: u64,
    /// When the CA file and client certificate were last (re)loaded.
    pub loaded_at: String,
}

/// The TLS client side of one site.
pub struct SiteTls {
    settings: TlsSettings,
    server_name: ServerName<'static>,
    /// Short critical sections only (no await while held).
    loaded: Mutex<Loaded>,
    full: AtomicU64,
    resumed: AtomicU64,
}

struct Loaded {
    config: Arc<ClientConfig>,
    stamps: Vec<(PathBuf, Stamp)>,
    at: SystemTime,
    /// A reload failed for these stamps (logged once).
    failed: Option<Vec<(PathBuf, Stamp)>>,
}

impl SiteTls {
    /// Load the site's TLS material; `host` is the host of its address.
    pub fn new(settings: &TlsSettings, host: &str) -> Result<SiteTls, TlsSetupError> {
        let name = settings.server_name.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_owned())
            .map_err(|e| TlsSetupError::Rustls(TlsError::General(format!("invalid server name '{name}': {e}"))))?;
        let config = Arc::new(client_config(settings)?);
        let loaded = Loaded { config, stamps: stamps(settings), at: SystemTime::now(), failed: None };
        Ok(SiteTls {
            settings: settings.clone(),
            server_name,
            loaded: Mutex::new(loaded),
            full: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
        })
    }

    /// The configuration for a new connection, re-read if its files
    /// changed; the files are looked at on the blocking pool.
    pub async fn config(self: &Arc<Self>) -> Arc<ClientConfig> {
        let me = self.clone();
        match tokio::task::spawn_blocking(move || me.refresh()).await {
            Ok(c) => c,
            // The runtime is shutting down: what is loaded will do.
            Err(_) => self.lock().config.clone(),
        }
    }

    /// Check the files (blocking I/O) and re-read them if they changed.
    fn refresh(&self) -> Arc<ClientConfig> {
        let now = stamps(&self.settings);
        {
            let l = self.lock();
            if now == l.stamps || l.failed.as_ref() == Some(&now) {
                return l.config.clone();
            }
        }
        let files = || now.iter().map(|(p, _)| p.display().to_string()).collect::<Vec<_>>().join(", ");
        match client_config(&self.settings) {
            Ok(c) => {
                tracing::info!(files = %files(), "TLS files changed; re-read them");
                let config = Arc::new(c);
                *self.lock() = Loaded { config: config.clone(), stamps: now, at: SystemTime::now(), failed: None };
                config
            }
            Err(e) => {
                tracing::warn!(files = %files(), error = %e, "TLS files changed but cannot be used; keeping the previous ones");
                let mut l = self.lock();
                l.failed = Some(now);
                l.config.clone()
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Loaded> {
        self.loaded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The name presented in SNI and (with `server_name`) checked.
    pub fn server_name(&self) -> ServerName<'static> {
        self.server_name.clone()
    }

    /// The handshake timeout.
    pub fn handshake_timeout(&self) -> std::time::Duration {
        self.settings.handshake_timeout
    }

    /// Count a completed handshake.
    pub fn note_handshake(&self, resumed: bool) {
        let c = if resumed { &self.resumed } else { &self.full };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// For the state file.
    pub fn snapshot(&self) -> TlsSnapshot {
        let at = self.lock().at;
        TlsSnapshot {
            handshakes_full: self.full.load(Ordering::Relaxed),
            handshakes_resumed: self.resumed.load(Ordering::Relaxed),
            loaded_at: crate::config::units::timestamp(at),
        }
    }
}

fn stamps(s: &TlsSettings) -> Vec<(PathBuf, Stamp)> {
    let files = s.ca_file.iter().chain(s.client_cert.iter().flat_map(|(c, k)| [c, k]));
    files.map(|p| (p.clone(), stamp(p))).collect()
}

fn client_config(s: &TlsSettings) -> Result<ClientConfig, TlsSetupError> {
    let provider = provider();
    let verifier: Arc<dyn ServerCertVerifier> = if s.verify {
        let Some(ca) = &s.ca_file else {
            return Err(TlsSetupError::Rustls(TlsError::General("verify = true needs a ca_file".into())));
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in load_certs("CA file", ca)? {
            roots.add(c).map_err(|e| file_error("CA file", ca, e))?;
        }
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| file_error("CA file", ca, e))?;
        Arc::new(Verifier { inner, check_name: s.server_name.is_some() })
    } else {
        Arc::new(NoVerification(provider.clone()))
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    Ok(match &s.client_cert {
        Some((cert, key)) => builder.with_client_auth_cert(load_certs("client certificate", cert)?, load_key(key)?)?,
        None => builder.with_no_client_auth(),
    })
}

/// The server side of a TLS listener; with `tls_client_ca`, clients must
/// present a certificate it signed (and, with `tls_client_names`, one of
/// those names).
pub fn server_config(l: &ListenerTls) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let certs = load_certs("certificate file", &l.cert_file)?;
    let key = load_key(&l.key_file)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match &l.client_ca {
        Some(ca) => builder.with_client_cert_verifier(clients::verifier(ca, &l.client_names)?),
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(builder.with_single_cert(certs, key)?))
}

/// Verifies the chain against the CA bundle; the host name only on request.
#[derive(Debug)]
struct Verifier {
    inner: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        match self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Ok(v) => Ok(v),
            // webpki checks the name only after the chain was verified.
            Err(TlsError::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            Err(TlsError::InvalidCertificate(e)) => {
                let described = Described { certificate: describe(end_entity), reason: reason(&e) };
                Err(TlsError::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(described)))))
            }
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `verify = false`: encryption without authentication.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, TlsError> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS failure found inside an I/O error (tokio-rustls wraps rustls
/// errors), as a specific [`SiteError`]; `None` for other I/O errors.
pub fn classify(address: &str, e: &io::Error) -> Option<SiteError> {
    let tls = e.get_ref()?.downcast_ref::<TlsError>()?;
    Some(from_tls_error(address, tls))
}

/// A rustls error as a [`SiteError`] that says what to look at.
pub fn from_tls_error(address: &str, e: &TlsError) -> SiteError {
    use rustls::AlertDescription as A;
    let address = address.to_owned();
    match e {
        TlsError::InvalidCertificate(CertificateError::Other(o)) => {
            SiteError::Certificate { address, detail: o.to_string() }
        }
        TlsError::InvalidCertificate(c) => SiteError::Certificate { address, detail: reason(c) },
        TlsError::AlertReceived(
            a @ (A::BadCertificate
            | A::UnknownCA
            | A::CertificateRequired
            | A::CertificateUnknown
            | A::AccessDenied
            | A::CertificateExpired
            | A::UnsupportedCertificate),
        ) => SiteError::Tls {
            address,
            detail: format!("the site rejected livemux's client certificate (TLS alert {a:?})"),
        },
        TlsError::AlertReceived(a) => {
            SiteError::Tls { address, detail: format!("the site ended the TLS session (TLS alert {a:?})") }
        }
        TlsError::InvalidMessage(_)
        | TlsError::InappropriateMessage { .. }
        | TlsError::InappropriateHandshakeMessage { .. } => {
            SiteError::Tls { address, detail: format!("{e} (does the site speak TLS on this port?)") }
        }
        other => SiteError::Tls { address, detail: other.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem(name: &str) -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().expect("CA key");
        params.self_signed(&key).expect("self-signed CA").pem()
    }

    #[test]
    fn a_ca_file_rewritten_within_one_clock_tick_is_read_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, ca_pem("one")).expect("write CA");
        let settings = TlsSettings { ca_file: Some(ca.clone()), ..TlsSettings::default() };
        let tls = SiteTls::new(&settings, "localhost").expect("TLS settings");
        let first = tls.refresh();
        assert!(Arc::ptr_eq(&first, &tls.refresh()), "unchanged: not read again");
        // A bundle of two, with the modification time of the old file.
        let mtime = std::fs::metadata(&ca).and_then(|m| m.modified()).expect("mtime");
        std::fs::write(&ca, ca_pem("one") + &ca_pem("two")).expect("rewrite CA");
        std::fs::File::options().write(true).open(&ca).and_then(|f| f.set_modified(mtime)).expect("set mtime");
        assert!(!Arc::ptr_eq(&first, &tls.refresh()), "changed size: read again");
    }
}
