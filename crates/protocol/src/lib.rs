//! The Livestatus wire format, without any I/O.
//!
//! Livestatus is a line protocol. A client sends a request: a first line
//! (`GET <table>` or `COMMAND [<time>] <command>`), optional header lines of
//! the form `Name: value`, and an empty line that ends the request. The server
//! answers a `GET` with a body, optionally preceded by the 16-byte `fixed16`
//! header (`"%03d %11d\n"`: status code, body length). A `COMMAND` gets no
//! answer. With `KeepAlive: on` the connection stays open for the next request.
//!
//! This crate is shared by the proxy, the simulated site and the load tool. It
//! never touches a socket: callers hand it bytes and get back parsed values or
//! "not complete yet".
//!
//! # Layout
//! - [`request`]: framing a request out of a byte stream under named
//!   [`Limits`](request::Limits), parsing it into a [`Request`](request::Request),
//!   and re-encoding it for a site.
//! - [`response`]: the `fixed16` [`ResponseHeader`](response::ResponseHeader),
//!   status codes (Livestatus' own and the proxy's), error bodies.
//! - [`python`]: reading an `OutputFormat: python3` answer (blobs included)
//!   as it streams in, in constant memory.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod python;
pub mod request;
pub mod response;

pub use request::{
    CacheDirective, CommandRequest, ForSite, FrameEnd, Framer, GetSummary, Limit, Limits, Query, ReplyStyle, Request,
    RequestError,
};
pub use response::{FIXED16_LEN, HeaderError, ResponseHeader, Status, error_response, unframed_error};
