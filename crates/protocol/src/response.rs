//! Responses: the `fixed16` header, status codes and error bodies.
//!
//! The header is 16 bytes: a three-digit status code, a space, the body
//! length right-aligned in 11 characters, and a separator byte. mk-livestatus
//! always ends it with `\n`; Icinga 2 ends it with the dataset separator, so
//! the decoder accepts any final byte.

use std::fmt;

/// Length of the `fixed16` response header.
pub const FIXED16_LEN: usize = 16;

/// Largest body length the 11-digit length field can carry.
pub const MAX_BODY_LEN: u64 = 99_999_999_999;

/// Status codes: Livestatus' own, and the ones the proxy answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// 200: success.
    Ok,
    /// 400: a header has a bad value (mk-livestatus).
    BadRequest,
    /// 403: the request is not allowed on this socket (proxy: a `COMMAND`
    /// where `commands = "deny"`).
    Forbidden,
    /// 404: no such table (mk-livestatus, Icinga 2).
    NotFound,
    /// 413: the request is larger than the proxy's limits (mk-livestatus
    /// uses it for responses that are too large).
    PayloadTooLarge,
    /// 451: incomplete request (mk-livestatus, Icinga 2).
    Incomplete,
    /// 452: invalid request (mk-livestatus, Icinga 2).
    InvalidRequest,
    /// 495: the site's TLS certificate could not be verified (Checkmk's GUI
    /// shows this as a certificate error).
    CertificateError,
    /// 500: an error inside the proxy.
    Internal,
    /// 502: the site is down, or failed while answering (proxy).
    SiteUnavailable,
    /// 503: no channel to the site became free in time, too many clients, or
    /// the proxy is shutting down (proxy).
    Busy,
    /// 504: the query was not answered within its deadline (proxy).
    Timeout,
    /// Any other code a site sent.
    Other(u16),
}

impl Status {
    /// The numeric code.
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::Forbidden => 403,
            Status::NotFound => 404,
            Status::PayloadTooLarge => 413,
            Status::Incomplete => 451,
            Status::InvalidRequest => 452,
            Status::CertificateError => 495,
            Status::Internal => 500,
            Status::SiteUnavailable => 502,
            Status::Busy => 503,
            Status::Timeout => 504,
            Status::Other(c) => c,
        }
    }

    /// The status for a numeric code.
    pub fn from_code(code: u16) -> Status {
        match code {
            200 => Status::Ok,
            400 => Status::BadRequest,
            403 => Status::Forbidden,
            404 => Status::NotFound,
            413 => Status::PayloadTooLarge,
            451 => Status::Incomplete,
            452 => Status::InvalidRequest,
            495 => Status::CertificateError,
            500 => Status::Internal,
            502 => Status::SiteUnavailable,
            503 => Status::Busy,
            504 => Status::Timeout,
            c => Status::Other(c),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code())
    }
}

/// Why 16 bytes are not a valid `fixed16` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The status code is not three ASCII digits.
    #[error("invalid status code in response header {0:?}")]
    BadStatus(String),
    /// The length field is not a right-aligned decimal number.
    #[error("invalid body length in response header {0:?}")]
    BadLength(String),
}

/// A decoded `fixed16` response header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHeader {
    /// Status code.
    pub status: Status,
    /// Body length in bytes.
    pub length: u64,
}

impl ResponseHeader {
    /// A header for a body of `length` bytes.
    pub fn new(status: Status, length: u64) -> Self {
        ResponseHeader { status, length }
    }

    /// Encode as `"%03d %11d\n"`. Lengths above [`MAX_BODY_LEN`] are clamped
    /// (they cannot be represented; no sane response comes near 100 GB).
    pub fn encode(&self) -> [u8; FIXED16_LEN] {
        let code = self.status.code().min(999);
        let mut n = self.length.min(MAX_BODY_LEN);
        let mut out = [b' '; FIXED16_LEN];
        out[0] = b'0' + (code / 100) as u8;
        out[1] = b'0' + (code / 10 % 10) as u8;
        out[2] = b'0' + (code % 10) as u8;
        let mut i = 14;
        loop {
            out[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
            i -= 1;
        }
        out[15] = b'\n';
        out
    }

    /// Decode 16 bytes. The final byte may be any separator.
    pub fn decode(raw: &[u8; FIXED16_LEN]) -> Result<ResponseHeader, HeaderError> {
        let show = || String::from_utf8_lossy(raw).into_owned();
        let code = &raw[..3];
        if !code.iter().all(u8::is_ascii_digit) || raw[3] != b' ' {
            return Err(HeaderError::BadStatus(show()));
        }
        let digits = raw[4..15].trim_ascii_start();
        if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
            return Err(HeaderError::BadLength(show()));
        }
        let parse = |d: &[u8]| d.iter().fold(0u64, |n, b| n * 10 + u64::from(b - b'0'));
        Ok(ResponseHeader { status: Status::from_code(parse(code) as u16), length: parse(digits) })
    }
}

/// True while `bytes` (the start of an answer) can still be the start of a
/// `fixed16` header: three digits, a space, then digits and spaces up to the
/// separator. The first byte that cannot be tells an unframed answer early,
/// even one shorter than a header.
pub fn could_be_header(bytes: &[u8]) -> bool {
    bytes.iter().take(FIXED16_LEN - 1).enumerate().all(|(i, b)| match i {
        0..=2 => b.is_ascii_digit(),
        3 => *b == b' ',
        _ => b.is_ascii_digit() || *b == b' ',
    })
}

/// True if `bytes` read as a line of text (no control bytes but tab, CR
/// and LF): what an unframed error answer from a core looks like, as
/// opposed to another protocol's binary data.
pub fn is_text(bytes: &[u8]) -> bool {
    bytes.iter().all(|b| !b.is_ascii_control() || matches!(b, b'\t' | b'\r' | b'\n'))
}

/// The status and message of an error a core sent without the `fixed16`
/// header it was asked for (mk-livestatus does this when it rejects a
/// request before reading its headers, and for a rejected `COMMAND`: `400:
/// Unknown command`). A leading three-digit code followed by `:` or a space
/// is the status and is cut from the message; otherwise the status is 452,
/// mk-livestatus's code for a request it could not take.
pub fn unframed_error(text: &[u8]) -> (Status, &[u8]) {
    let text = text.trim_ascii();
    if let [a, b, c, sep, rest @ ..] = text
        && [a, b, c].iter().all(|d| d.is_ascii_digit())
        && matches!(sep, b':' | b' ')
        && *a != b'0'
    {
        let code = u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0');
        return (Status::from_code(code), rest.trim_ascii());
    }
    (Status::InvalidRequest, text)
}

/// The body of an error answer: the message on one line, ending in `\n`.
/// Line breaks inside the message are replaced by spaces so that a client
/// reading one line gets all of it.
pub fn error_body(message: &str) -> Vec<u8> {
    let mut body: Vec<u8> =
        message.trim_end().bytes().map(|b| if b == b'\n' || b == b'\r' { b' ' } else { b }).collect();
    body.push(b'\n');
    body
}

/// A complete error answer in the form the client asked for: with fixed16 the
/// header and the body; without it the message alone.
pub fn error_response(status: Status, message: &str, fixed16: bool) -> Vec<u8> {
    let body = error_body(message);
    if !fixed16 {
        return body;
    }
    let mut out = ResponseHeader::new(status, body.len() as u64).encode().to_vec();
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn encodes_like_mk_livestatus() {
        let h = ResponseHeader::new(Status::Ok, 18);
        assert_eq!(&h.encode(), b"200          18\n");
        let h = ResponseHeader::new(Status::NotFound, 35);
        assert_eq!(&h.encode(), b"404          35\n");
    }

    #[test]
    fn decodes_icinga_headers_with_other_separators() {
        let h = ResponseHeader::decode(b"200          20\x00").unwrap();
        assert_eq!(h, ResponseHeader::new(Status::Ok, 20));
        let h = ResponseHeader::decode(b"200    20675234\n").unwrap();
        assert_eq!(h.length, 20_675_234);
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(ResponseHeader::decode(b"HTTP/1.1 200 OK\n"), Err(HeaderError::BadStatus(_))));
        assert!(matches!(ResponseHeader::decode(b"200            \n"), Err(HeaderError::BadLength(_))));
        assert!(matches!(ResponseHeader::decode(b"200   12a456789\n"), Err(HeaderError::BadLength(_))));
        assert!(matches!(ResponseHeader::decode(b"200 1 2        \n"), Err(HeaderError::BadLength(_))));
    }

    #[test]
    fn error_response_shapes() {
        assert_eq!(
            error_response(Status::Busy, "no channel\nfree", true),
            b"503          16\nno channel free\n".to_vec()
        );
        assert_eq!(error_response(Status::Busy, "x", false), b"x\n".to_vec());
    }

    #[test]
    fn unframed_answers_are_told_early() {
        assert!(could_be_header(b"200          18\n"));
        assert!(could_be_header(b"40"));
        assert!(could_be_header(b""));
        assert!(!could_be_header(b"400: Unknown"), "a colon after the code");
        assert!(!could_be_header(b"Invalid request method\n"));
        assert!(!could_be_header(b"200 OK\n"));
        assert!(is_text(b"Invalid request method\n"));
        assert!(!is_text(&[0x16, 0x03, 0x01, 0x00]), "a TLS record");
    }

    #[test]
    fn unframed_errors_keep_the_cores_code_and_text() {
        assert_eq!(
            unframed_error(b"400: Unknown command 'FOO'\n"),
            (Status::BadRequest, &b"Unknown command 'FOO'"[..])
        );
        assert_eq!(
            unframed_error(b"Invalid request method\n"),
            (Status::InvalidRequest, &b"Invalid request method"[..])
        );
        assert_eq!(unframed_error(b"451 timeout"), (Status::Incomplete, &b"timeout"[..]));
        assert_eq!(unframed_error(b"12: x"), (Status::InvalidRequest, &b"12: x"[..]));
        assert_eq!(unframed_error(b"099: x"), (Status::InvalidRequest, &b"099: x"[..]));
    }

    proptest! {
        #[test]
        fn a_valid_header_is_never_taken_for_unframed(code in 100u16..1000, length in 0u64..=MAX_BODY_LEN) {
            let raw = ResponseHeader::new(Status::from_code(code), length).encode();
            for n in 0..=FIXED16_LEN {
                prop_assert!(could_be_header(&raw[..n]));
            }
        }

        #[test]
        fn header_round_trip(code in 100u16..1000, length in 0u64..=MAX_BODY_LEN) {
            let h = ResponseHeader::new(Status::from_code(code), length);
            prop_assert_eq!(ResponseHeader::decode(&h.encode()).unwrap(), h);
        }

        #[test]
        fn decode_never_panics(raw in proptest::array::uniform16(any::<u8>())) {
            let _ = ResponseHeader::decode(&raw);
        }
    }
}
