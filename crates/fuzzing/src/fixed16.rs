//! The start of a site's answer: the `fixed16` header, the body bytes read
//! with it, and an unframed error line, under arbitrary chunking.
//!
//! The stream is what a site sends; it is read by the proxy's own reader
//! (`read_response_start`) from a reader that hands it out in the
//! input's chunk sizes, then ends (EOF). Asserted: the outcome (header,
//! or error text) is the same whatever the chunking; the header is the
//! stream's first 16 bytes, decoded, and encodes back to a header that
//! decodes the same; the body bytes read with it are the stream's next
//! bytes, never more than the announced length, the surplus follows them.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use livemux_protocol::response::{MAX_BODY_LEN, could_be_header, is_text};
use livemux_protocol::{FIXED16_LEN, ResponseHeader, unframed_error};
use tokio::io::{AsyncRead, ReadBuf};

use super::{Input, chunks};
use livemux::error::SiteError;
use livemux::site::exchange::read_response_start;

/// Fuzz target `fixed16_response`.
pub fn fixed16_response(data: &[u8]) {
    let input = Input::new(data);
    let prefetch = [8 * 1024, FIXED16_LEN, FIXED16_LEN + 1, 100][usize::from(input.knob & 3)];
    let [whole, chosen, bytewise] = input.chunkings().map(|sizes| read(input.stream, &sizes, prefetch));
    assert_eq!(whole, chosen, "chunking changed the answer's start");
    assert_eq!(whole, bytewise, "byte-at-a-time reading changed the answer's start");

    // The pure functions on the same bytes.
    let _ = is_text(input.stream);
    let (status, message) = unframed_error(input.stream);
    assert!(message.len() <= input.stream.len());
    assert!((100..=999).contains(&status.code()), "unframed status {status}");
    if let Some(raw) = input.stream.first_chunk::<FIXED16_LEN>()
        && let Ok(header) = ResponseHeader::decode(raw)
    {
        assert!(header.length <= MAX_BODY_LEN);
        let again = ResponseHeader::decode(&header.encode());
        assert_eq!(again, Ok(header), "a decoded header does not survive encoding");
        assert!(could_be_header(&header.encode()));
    }
}

/// The reader's outcome: the header, or the error's text (for a bad
/// header only its kind). Which body bytes came with the header depends
/// on the reads, so only their agreement with the stream is checked.
type Outcome = Result<ResponseHeader, String>;

fn read(stream: &[u8], sizes: &[usize], prefetch: usize) -> Outcome {
    let mut reader = Chunked { chunks: chunks(stream, sizes).into_iter().collect(), next: 0 };
    let mut buf = bytes::BytesMut::new();
    let wait = std::time::Duration::from_secs(1);
    let started = runtime().block_on(read_response_start(&mut reader, &mut buf, prefetch, wait));
    let start = started.map_err(|f| {
        // `any_byte` is what decides a retry on a fresh channel.
        assert_eq!(f.any_byte, !stream.is_empty(), "any_byte wrong for {} bytes", stream.len());
        match f.error {
            // It quotes the bytes read so far, which depend on the reads.
            SiteError::BadHeader(_) => "bad header".to_owned(),
            e => e.to_string(),
        }
    })?;
    assert_eq!(&start.raw[..], &stream[..FIXED16_LEN], "the header is not the first 16 bytes");
    assert_eq!(ResponseHeader::decode(&start.raw), Ok(start.header));
    let after = &stream[FIXED16_LEN..];
    assert_eq!(&buf[..FIXED16_LEN], &start.raw[..], "the buffer does not begin with the header");
    let (prefix, surplus) = (&buf[FIXED16_LEN..], &start.surplus[..]);
    assert!(prefix.len() as u64 <= start.header.length, "more body bytes than announced");
    assert!(surplus.is_empty() || prefix.len() as u64 == start.header.length, "surplus before the body's end");
    assert_eq!(prefix, &after[..prefix.len()], "body bytes that are not the stream's");
    assert_eq!(surplus, &after[prefix.len()..prefix.len() + surplus.len()], "surplus that is not the stream's");
    Ok(start.header)
}

/// One runtime per thread (the reader uses tokio's timer for an
/// unframed line; it never waits here, every read is ready at once).
fn runtime() -> &'static tokio::runtime::Runtime {
    thread_local! {
        static RT: &'static tokio::runtime::Runtime = Box::leak(Box::new(
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap_or_else(|e| panic!("no tokio runtime for the fuzz body: {e}")),
        ));
    }
    RT.with(|rt| *rt)
}

/// A site that sends its answer in the given chunks, then closes.
struct Chunked<'a> {
    chunks: Vec<&'a [u8]>,
    next: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(chunk) = this.chunks.get_mut(this.next) {
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            *chunk = &chunk[n..];
            if chunk.is_empty() {
                this.next += 1;
            }
        }
        Poll::Ready(Ok(()))
    }
}
