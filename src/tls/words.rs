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

/// What is wrong with a certificate, and what to do about it.
pub(super) fn reason(e: &CertificateError) -> String {
    use CertificateError as C;
    match e {
        C::Expired => {
            "it has expired: renew the site's certificate (or correct this machine's clock if it is wrong)".into()
        }
        C::ExpiredContext { time, not_after } => format!(
            "it expired at {} (now is {}): renew the site's certificate (or correct this machine's clock if it is wrong)",
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
        C::UnknownIssuer => "it was issued by a CA that is not in ca_file: add the certificate of the CA that \
                             signed it (on a Checkmk site, its site CA) to ca_file"
            .into(),
        C::BadSignature => "its signature does not verify with its issuer's key: ca_file may hold another CA of the \
                            same name, or the certificate is damaged; compare the CA certificates"
            .into(),
        C::Revoked => "its CA has revoked it: the site needs a new certificate".into(),
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
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
            "it is not meant for a TLS server (its extended key usage lacks serverAuth): reissue it with \
             extendedKeyUsage = serverAuth"
                .into()
        }
        C::UnhandledCriticalExtension => {
            "it carries a critical extension livemux cannot check: reissue it without that extension".into()
        }
        C::UnknownRevocationStatus | C::ExpiredRevocationList | C::ExpiredRevocationListContext { .. } => {
            "its revocation status cannot be established: check the CA's revocation list".into()
        }
        C::ApplicationVerificationFailure => "livemux's own checks rejected it".into(),
        C::Other(other) => match other.0.downcast_ref::<webpki::Error>() {
            Some(w) => webpki_reason(w),
            None => format!("it failed verification ({other}): reissue it as an X.509 v3 TLS server certificate"),
        },
        other => format!(
            "it failed verification ({}): reissue it as an X.509 v3 TLS server certificate",
            rustls::Error::InvalidCertificate(other.clone())
        ),
    }
}

/// Failures webpki reports that rustls passes on as `Other`.
fn webpki_reason(e: &webpki::Error) -> String {
    use webpki::Error as W;
    match e {
        W::UnsupportedCertVersion => "it is an X.509 version 1 certificate (no extensions), and livemux needs \
                                      version 3: reissue it with extensions, e.g. `openssl x509 -req ... -extfile \
                                      ext.cnf` where ext.cnf holds `basicConstraints=CA:FALSE` and \
                                      `subjectAltName=DNS:<site>` (OpenSSL-based clients accept version 1; rustls \
                                      does not)"
            .into(),
        W::CaUsedAsEndEntity => "it is a CA certificate, not a server certificate: the site must present a \
                                 certificate issued by its CA"
            .into(),
        W::EndEntityUsedAsCa => "the chain uses a server certificate as a CA: ca_file or the site's chain holds \
                                 the wrong certificate"
            .into(),
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
            "the chain from it to a CA in ca_file is too long or too tangled to verify: put the issuing CA itself \
             into ca_file"
                .into()
        }
        W::InvalidSerialNumber => "its serial number is invalid: reissue it".into(),
        W::CertDistrusted => "its CA is distrusted: have it issued by another CA".into(),
        W::SignatureAlgorithmMismatch => "its signature algorithm fields disagree with each other: reissue it".into(),
        other => format!("it failed verification ({other:?}): reissue it as an X.509 v3 TLS server certificate"),
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
