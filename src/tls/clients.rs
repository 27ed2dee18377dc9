//! Mutual TLS on a listener (`tls_client_ca`, `tls_client_names`): which
//! client certificates are accepted, the log line that says in words why
//! one was refused, and who a verified client is.
//!
//! The chain is verified by rustls' webpki verifier against the CA bundle;
//! the names are checked after it, on the subject's CN and the DNS names
//! of the certificate. A refused certificate is logged by the verifier
//! itself (it is the only place that sees the certificate), inside the
//! client's span; the client gets the TLS alert that fits (unknown CA,
//! certificate expired, access denied for a name outside the list). A
//! client that presents no certificate never reaches the verifier: its
//! handshake error is put into words where the handshake ends
//! ([`client_handshake_failed`]).

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error as TlsError, SignatureScheme};

use super::words::{Whose, describe, reason_of};
use super::{TlsSetupError, file_error, load_certs, provider};

/// The verifier of a listener's client certificates: signed by a CA of
/// `ca` and, unless `names` is empty, carrying one of them.
pub(super) fn verifier(ca: &Path, names: &[String]) -> Result<Arc<dyn ClientCertVerifier>, TlsSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs("tls_client_ca file", ca)? {
        roots.add(c).map_err(|e| file_error("tls_client_ca file", ca, e))?;
    }
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| file_error("tls_client_ca file", ca, e))?;
    Ok(Arc::new(ClientVerifier { inner, names: names.to_vec() }))
}

/// The names of a certificate that `tls_client_names` is matched against.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Names {
    /// The subject's common name (the first, if several).
    pub cn: Option<String>,
    /// The DNS names of its subjectAltName extension.
    pub dns: Vec<String>,
}

impl Names {
    /// The names of a DER certificate (none when it cannot be parsed).
    pub(super) fn of(der: &[u8]) -> Names {
        use x509_cert::der::Decode;
        use x509_cert::der::asn1::{Ia5StringRef, PrintableStringRef, TeletexStringRef, Utf8StringRef};
        use x509_cert::der::oid::ObjectIdentifier;
        use x509_cert::ext::pkix::SubjectAltName;
        use x509_cert::ext::pkix::name::GeneralName;
        const CN: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");
        let Ok(c) = x509_cert::Certificate::from_der(der) else { return Names::default() };
        let t = &c.tbs_certificate;
        let cn = t.subject.0.iter().flat_map(|rdn| rdn.0.iter()).filter(|a| a.oid == CN).find_map(|a| {
            let v = &a.value;
            Utf8StringRef::try_from(v)
                .map(|s| s.as_str().to_owned())
                .or_else(|_| PrintableStringRef::try_from(v).map(|s| s.as_str().to_owned()))
                .or_else(|_| Ia5StringRef::try_from(v).map(|s| s.as_str().to_owned()))
                .or_else(|_| TeletexStringRef::try_from(v).map(|s| s.as_str().to_owned()))
                .ok()
        });
        let dns = match t.get::<SubjectAltName>() {
            Ok(Some((_, san))) => san
                .0
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DnsName(d) => Some(d.as_str().to_owned()),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        Names { cn, dns }
    }

    /// Whether any of them is one of `allowed` (ASCII case ignored).
    pub(super) fn any_in(&self, allowed: &[String]) -> bool {
        self.cn.iter().chain(&self.dns).any(|n| allowed.iter().any(|a| a.eq_ignore_ascii_case(n)))
    }

    /// The subject a log line names: the CN, else the first DNS name.
    pub(super) fn subject(&self) -> Option<&str> {
        self.cn.as_deref().or(self.dns.first().map(String::as_str))
    }

    /// As a log line lists them: `CN 'a', DNS 'b', 'c'`.
    fn listed(&self) -> String {
        let mut parts = Vec::new();
        if let Some(cn) = &self.cn {
            parts.push(format!("CN '{cn}'"));
        }
        if !self.dns.is_empty() {
            let dns: Vec<String> = self.dns.iter().map(|d| format!("'{d}'")).collect();
            parts.push(format!("DNS {}", dns.join(", ")));
        }
        if parts.is_empty() { "no CN and no DNS name".to_owned() } else { parts.join(", ") }
    }
}

/// The subject of a TLS client verified by its certificate (its CN, else
/// its first DNS name); `None` for a client without one (no
/// `tls_client_ca`) or a certificate that names neither.
pub fn client_subject(conn: &rustls::ServerConnection) -> Option<String> {
    let cert = conn.peer_certificates()?.first()?;
    Names::of(cert).subject().map(str::to_owned)
}

/// A client's certificate that was refused: which one and why, in words.
fn refused(certificate: &CertificateDer<'_>, why: &str) {
    tracing::info!("TLS client refused: its {}: {why}", describe(certificate));
}

/// Why a client's names are not accepted, and what to do.
pub(super) fn names_refusal(names: &Names, allowed: &[String]) -> String {
    let allowed: Vec<String> = allowed.iter().map(|a| format!("'{a}'")).collect();
    format!(
        "its name is not allowed here: it names {}, and tls_client_names allows {}: give the client a \
         certificate for one of those names, or add its name to tls_client_names",
        names.listed(),
        allowed.join(", ")
    )
}

/// webpki's verification of the chain, then the names; every refusal
/// logged in words.
#[derive(Debug)]
struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    names: Vec<String>,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        match self.inner.verify_client_cert(end_entity, intermediates, now) {
            Ok(v) if self.names.is_empty() => Ok(v),
            Ok(v) => {
                let names = Names::of(end_entity);
                if names.any_in(&self.names) {
                    return Ok(v);
                }
                refused(end_entity, &names_refusal(&names, &self.names));
                // The client reads "access denied".
                Err(TlsError::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
            }
            Err(TlsError::InvalidCertificate(e)) => {
                refused(end_entity, &reason_of(&e, Whose::Client));
                // Unchanged, so the client gets the alert that fits.
                Err(TlsError::InvalidCertificate(e))
            }
            Err(e) => {
                refused(end_entity, &e.to_string());
                Err(e)
            }
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

/// Log a TLS listener's failed handshake with client `peer` in words. A
/// refused certificate was logged by the verifier already (with the
/// certificate): this line is then for debugging only.
pub fn client_handshake_failed(peer: std::net::SocketAddr, e: &io::Error) {
    match e.get_ref().and_then(|i| i.downcast_ref::<TlsError>()) {
        Some(TlsError::InvalidCertificate(_)) => {
            tracing::debug!(error = %e, "TLS handshake with client {peer} failed: its certificate was refused")
        }
        Some(TlsError::NoCertificatesPresented) => tracing::info!(
            "TLS client refused: it presented no certificate, and this listener requires one signed by a CA of \
             its tls_client_ca (configure the client with its certificate and key)"
        ),
        _ => tracing::info!(error = %e, "TLS handshake with client {peer} failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: Option<&str>, dns: &[&str]) -> Vec<u8> {
        let mut params =
            rcgen::CertificateParams::new(dns.iter().map(|d| (*d).to_owned()).collect::<Vec<_>>()).expect("params");
        // No name but the one asked for (rcgen has a CN of its own).
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        }
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("certificate").der().to_vec()
    }

    #[test]
    fn names_are_the_cn_and_the_dns_names() {
        let n = Names::of(&cert(Some("thruk"), &["gui.example", "nagvis.example"]));
        assert_eq!(n, Names { cn: Some("thruk".into()), dns: vec!["gui.example".into(), "nagvis.example".into()] });
        assert_eq!(n.subject(), Some("thruk"));
        assert!(n.any_in(&["NAGVIS.example".into()]), "DNS names match, case ignored");
        assert!(n.any_in(&["thruk".into()]));
        assert!(!n.any_in(&["thruk.example".into(), "gui".into()]));
        let dns_only = Names::of(&cert(None, &["gui.example"]));
        assert_eq!(dns_only.subject(), Some("gui.example"), "no CN: the first DNS name");
        assert_eq!(Names::of(b"not a certificate"), Names::default());
    }

    #[test]
    fn a_name_outside_the_list_is_refused_in_words() {
        let n = Names::of(&cert(Some("intruder"), &["intruder.example"]));
        let why = names_refusal(&n, &["thruk".into(), "nagvis".into()]);
        assert_eq!(
            why,
            "its name is not allowed here: it names CN 'intruder', DNS 'intruder.example', and tls_client_names \
             allows 'thruk', 'nagvis': give the client a certificate for one of those names, or add its name to \
             tls_client_names"
        );
    }

    #[test]
    fn client_certificate_failures_name_the_client_side() {
        let unknown = reason_of(&CertificateError::UnknownIssuer, Whose::Client);
        assert!(unknown.starts_with("it was issued by a CA that is not in tls_client_ca"), "{unknown}");
        let expired = reason_of(&CertificateError::Expired, Whose::Client);
        assert!(expired.starts_with("it has expired: give the client a new certificate"), "{expired}");
        let purpose = reason_of(&CertificateError::InvalidPurpose, Whose::Client);
        assert!(purpose.contains("not meant for a TLS client") && purpose.contains("clientAuth"), "{purpose}");
        for r in [unknown, expired, purpose] {
            assert!(!r.contains("ca_file") && !r.contains("site"), "client words only: {r}");
        }
    }
}
