//! Certificate failures in words: which certificate, what is wrong with it,
//! and what to do about it.
//!
//! rustls and webpki name failures for programs (`UnknownIssuer`,
//! `Other(OtherError(UnsupportedCertVersion))`); the operator reading a
//! 495 answer or the log needs a sentence. Every failure rustls can report
//! for a server certificate is phrased here; one it adds later still reads
//! as a sentence, with the library's name for it in parentheses.

use rustls::CertificateError;
use rustls::pki_types::UnixTime;

/// A certificate failure with the certificate it concerns.
#[derive(Debug)]
pub(super) struct Described {
    pub certificate: String,
    pub reason: String,
}

impl std::fmt::Display for Described {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.certificate, self.reason)
    }
}

impl std::error::Error for Described {}

/// Subject, issuer and validity of a DER certificate.
pub(super) fn describe(der: &[u8]) -> String {
    use x509_cert::der::Decode;
    match x509_cert::Certificate::from_der(der) {
        Ok(c) => {
            let t = &c.tbs_certificate;
            format!(
                "certificate '{}' issued by '{}' (valid {} to {})",
                t.subject, t.issuer, t.validity.not_before, t.validity.not_after
            )
        }
        Err(_) => "a certificate that cannot be parsed as X.509".to_owned(),
    }
}

fn when(t: &UnixTime) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.as_secs());
    humantime::format_rfc3339_seconds(at).to_string()
}

/// Whose certificate failed: a site's (livemux the client) or a client's
/// of a listener with `tls_client_ca` (livemux the server). The advice
/// names the holder, the file of trusted CAs and the certificate's purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Whose {
    /// A `tls://` site's server certificate, verified against `ca_file`.
    Site,
    /// A listener's client, verified against `tls_client_ca`.
    Client,
}

impl Whose {
    /// Who holds the certificate.
    fn holder(self) -> &'static str {
        match self {
            Whose::Site => "the site",
            Whose::Client => "the client",
        }
    }

    /// The key naming the trusted CAs.
    fn file(self) -> &'static str {
        match self {
            Whose::Site => "ca_file",
            Whose::Client => "tls_client_ca",
        }
    }

    /// What the certificate is for.
    fn role(self) -> &'static str {
        match self {
            Whose::Site => "server",
            Whose::Client => "client",
        }
    }

    /// Its extended key usage.
    fn eku(self) -> &'static str {
        match self {
            Whose::Site => "serverAuth",
            Whose::Client => "clientAuth",
        }
    }
}

/// What is wrong with a site's certificate, and what to do about it.
pub(super) fn reason(e: &CertificateError) -> String {
    reason_of(e, Whose::Site)
}

/// What is wrong with a certificate, and what to do about it.
pub(super) fn reason_of(e: &CertificateError, whose: Whose) -> String {
    use CertificateError as C;
    let (holder, file, role) = (whose.holder(), whose.file(), whose.role());
    let renew = match whose {
        Whose::Site => "renew the site's certificate".to_owned(),
        Whose::Client => format!("give the client a new certificate signed by a CA of {file}"),
    };
    match e {
        C::Expired => format!("it has expired: {renew} (or correct this machine's clock if it is wrong)"),
        C::ExpiredContext { time, not_after } => format!(
            "it expired at {} (now is {}): {renew} (or correct this machine's clock if it is wrong)",
            when(not_after),
            when(time)
        ),
        C::NotValidYet => {
            "it is not valid yet: check the clocks of this machine and of the machine that issued it".into()
        }
        C::NotValidYetContext { time, not_before } => format!(
            "it is not valid before {} (now is {}): check the clocks of this machine and of the machine that issued it",
            when(not_before),
            when(time)
        ),
        C::UnknownIssuer => match whose {
            Whose::Site => "it was issued by a CA that is not in ca_file: add the certificate of the CA that \
                            signed it (on a Checkmk site, its site CA) to ca_file"
                .into(),
            Whose::Client => "it was issued by a CA that is not in tls_client_ca (the wrong CA, or one this \
                              listener does not trust): give the client a certificate signed by a CA of \
                              tls_client_ca, or add the CA that signed it to tls_client_ca"
                .into(),
        },
        C::BadSignature => format!(
            "its signature does not verify with its issuer's key: {file} may hold another CA of the same name, or \
             the certificate is damaged; compare the CA certificates"
        ),
        C::Revoked => format!("its CA has revoked it: {holder} needs a new certificate"),
        C::BadEncoding => "it is not a well-formed X.509 certificate (bad DER): reissue it".into(),
        #[allow(deprecated)] // still reported by some paths of rustls 0.23
        C::UnsupportedSignatureAlgorithm
        | C::UnsupportedSignatureAlgorithmContext { .. }
        | C::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
            "it is signed with an algorithm livemux does not accept (such as SHA-1 or MD5): reissue it signed with \
             SHA-256 or better"
                .into()
        }
        C::NotValidForName => "it is not valid for server_name: set server_name to a name the certificate \
                               carries, or remove server_name to verify the chain only"
            .into(),
        C::NotValidForNameContext { expected, presented } => format!(
            "it is not valid for server_name '{}' (it names {}): set server_name to a name the certificate \
             carries, or remove server_name to verify the chain only",
            expected.to_str(),
            if presented.is_empty() { "no host at all".to_owned() } else { presented.join(", ") }
        ),
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => format!(
            "it is not meant for a TLS {role} (its extended key usage lacks {eku}): reissue it with \
             extendedKeyUsage = {eku}",
            eku = whose.eku()
        ),
        C::UnhandledCriticalExtension => {
            "it carries a critical extension livemux cannot check: reissue it without that extension".into()
        }
        C::UnknownRevocationStatus | C::ExpiredRevocationList | C::ExpiredRevocationListContext { .. } => {
            "its revocation status cannot be established: check the CA's revocation list".into()
        }
        C::ApplicationVerificationFailure => "livemux's own checks rejected it".into(),
        C::Other(other) => match other.0.downcast_ref::<webpki::Error>() {
            Some(w) => webpki_reason(w, whose),
            None => format!("it failed verification ({other}): reissue it as an X.509 v3 TLS {role} certificate"),
        },
        other => format!(
            "it failed verification ({}): reissue it as an X.509 v3 TLS {role} certificate",
            rustls::Error::InvalidCertificate(other.clone())
        ),
    }
}

/// Failures webpki reports that rustls passes on as `Other`.
fn webpki_reason(e: &webpki::Error, whose: Whose) -> String {
    use webpki::Error as W;
    let (holder, file, role) = (whose.holder(), whose.file(), whose.role());
    match e {
        W::UnsupportedCertVersion => format!(
            "it is an X.509 version 1 certificate (no extensions), and livemux needs version 3: reissue it with \
             extensions, e.g. `openssl x509 -req ... -extfile ext.cnf` where ext.cnf holds \
             `basicConstraints=CA:FALSE` and {} (OpenSSL-based {}s accept version 1; rustls does not)",
            match whose {
                Whose::Site => "`subjectAltName=DNS:<site>`",
                Whose::Client => "`extendedKeyUsage=clientAuth`",
            },
            match whose {
                Whose::Site => "client",
                Whose::Client => "server",
            }
        ),
        W::CaUsedAsEndEntity => format!(
            "it is a CA certificate, not a {role} certificate: {holder} must present a certificate issued by its CA"
        ),
        W::EndEntityUsedAsCa => {
            format!(
                "the chain uses a {role} certificate as a CA: {file} or {holder}'s chain holds the wrong certificate"
            )
        }
        W::MalformedExtensions | W::ExtensionValueInvalid | W::EmptyEkuExtension => {
            "its extensions are malformed: reissue it".into()
        }
        W::UnsupportedCriticalExtension => {
            "it carries a critical extension livemux cannot check: reissue it without that extension".into()
        }
        W::PathLenConstraintViolated | W::NameConstraintViolation => {
            "its issuing CA is not allowed to issue it (a path length or name constraint of the CA): have it \
             issued by a CA that may"
                .into()
        }
        W::MaximumPathDepthExceeded | W::MaximumPathBuildCallsExceeded | W::MaximumSignatureChecksExceeded => {
            format!(
                "the chain from it to a CA in {file} is too long or too tangled to verify: put the issuing CA \
                 itself into {file}"
            )
        }
        W::InvalidSerialNumber => "its serial number is invalid: reissue it".into(),
        W::CertDistrusted => "its CA is distrusted: have it issued by another CA".into(),
        W::SignatureAlgorithmMismatch => "its signature algorithm fields disagree with each other: reissue it".into(),
        other => format!("it failed verification ({other:?}): reissue it as an X.509 v3 TLS {role} certificate"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn every_failure_reads_as_advice() {
        let cases = [
            CertificateError::Expired,
            CertificateError::NotValidYet,
            CertificateError::UnknownIssuer,
            CertificateError::BadSignature,
            CertificateError::Revoked,
            CertificateError::BadEncoding,
            CertificateError::NotValidForName,
            CertificateError::InvalidPurpose,
            CertificateError::UnhandledCriticalExtension,
            CertificateError::Other(rustls::OtherError(Arc::new(webpki::Error::UnsupportedCertVersion))),
            CertificateError::Other(rustls::OtherError(Arc::new(webpki::Error::CaUsedAsEndEntity))),
        ];
        for c in cases {
            let r = reason(&c);
            assert!(r.starts_with("it") || r.starts_with("its") || r.starts_with("the "), "{r}");
            assert!(r.contains(':'), "says what to do: {r}");
            assert!(!r.contains("Other(") && !r.contains("OtherError"), "no library names: {r}");
        }
        let v1 = reason(&CertificateError::Other(rustls::OtherError(Arc::new(webpki::Error::UnsupportedCertVersion))));
        assert!(v1.contains("X.509 version 1") && v1.contains("version 3"), "{v1}");
    }
}
