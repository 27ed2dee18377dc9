//! Unit and property tests for framing and parsing.

use super::*;
use proptest::prelude::*;

fn frame_all(input: &[u8], limits: &Limits) -> Result<Vec<Vec<u8>>, RequestError> {
    let mut f = Framer::new();
    let mut buf = input.to_vec();
    let mut out = Vec::new();
    while let Some(end) = f.scan(&buf, limits)? {
        out.push(buf[end.start..end.end].to_vec());
        buf.drain(..end.end);
    }
    Ok(out)
}

fn get(text: &str) -> Query {
    match Request::parse(text.as_bytes()).unwrap() {
        Request::Get(q) => q,
        other => panic!("not a GET: {other:?}"),
    }
}

#[test]
fn frames_pipelined_requests_and_skips_stray_blank_lines() {
    let input = b"\nGET hosts\nColumns: name\n\n\r\nGET status\r\n\r\nGET servi";
    let frames = frame_all(input, &Limits::default()).unwrap();
    assert_eq!(frames, vec![b"GET hosts\nColumns: name\n\n".to_vec(), b"GET status\r\n\r\n".to_vec()]);
}

#[test]
fn skipped_empty_lines_can_be_dropped_while_a_request_is_incomplete() {
    let limits = Limits::default();
    let mut f = Framer::new();
    let mut buf = b"\n\r\n\n".to_vec();
    assert_eq!(f.scan(&buf, &limits).unwrap(), None);
    let n = f.take_skipped();
    assert_eq!(n, 4);
    buf.drain(..n);
    // The rest of the stream frames as if the empty lines never were there.
    buf.extend_from_slice(b"\nGET hosts\nColu");
    assert_eq!(f.scan(&buf, &limits).unwrap(), None);
    let n = f.take_skipped();
    assert_eq!(n, 1);
    buf.drain(..n);
    buf.extend_from_slice(b"mns: name\n\n");
    assert_eq!(f.scan(&buf, &limits).unwrap(), Some(FrameEnd { start: 0, end: buf.len() }));
    // Nothing to drop in the middle of a request.
    let mut f = Framer::new();
    assert_eq!(f.scan(b"GET hosts\n", &limits).unwrap(), None);
    assert_eq!(f.take_skipped(), 0);
}

#[test]
fn unterminated_request_is_complete_at_eof() {
    let mut f = Framer::new();
    let buf = b"GET hosts\nColumns: name\n";
    assert_eq!(f.scan(buf, &Limits::default()).unwrap(), None);
    assert_eq!(f.finish(buf), Some(FrameEnd { start: 0, end: buf.len() }));
    assert_eq!(Framer::new().finish(b"\n \n"), None);
}

#[test]
fn limits_are_enforced_before_the_request_is_complete() {
    let limits = Limits { max_request_bytes: 64, max_header_lines: 3, max_line_bytes: 20 };
    let long_line = b"GET hosts\nFilter: name = aaaaaaaaaaaaaaaaaaaaaaaa";
    assert_eq!(
        Framer::new().scan(long_line, &limits),
        Err(RequestError::TooLarge { which: Limit::LineBytes, limit: 20 })
    );
    let many = b"GET hosts\nA: 1\nB: 2\nC: 3\nD: 4\n";
    assert_eq!(Framer::new().scan(many, &limits), Err(RequestError::TooLarge { which: Limit::HeaderLines, limit: 3 }));
    let big = b"GET hosts\nColumns: a b c\nColumns: d e f\nColumns: g h i\nColumns: j";
    assert_eq!(Framer::new().scan(big, &limits), Err(RequestError::TooLarge { which: Limit::RequestBytes, limit: 64 }));
    // Exactly at the limits is fine.
    let ok = b"GET hosts\nA: 1\nB: 2\nC: 3\n\n";
    assert!(Framer::new().scan(ok, &limits).unwrap().is_some());
}

#[test]
fn error_messages_name_the_limit() {
    let e = RequestError::TooLarge { which: Limit::RequestBytes, limit: 10 };
    assert_eq!(e.to_string(), "request too large: more than 10 bytes (max_request_bytes)");
    assert_eq!(e.status(), crate::Status::PayloadTooLarge);
}

#[test]
fn proxy_headers_are_understood_and_removed() {
    let q = get("GET hosts\nColumns: name\nKeepAlive: on\nCache: reload\nAuthUser: alice\n\
                 OutputFormat: json\nResponseHeader: fixed16\nFilter: state = 1\n\n");
    assert_eq!(q.table, "hosts");
    assert_eq!(q.style, ReplyStyle { fixed16: true, keepalive: true });
    assert_eq!(q.cache, Some(CacheDirective::Reload));
    assert_eq!(q.auth_user.as_deref(), Some("alice"));
    assert_eq!(q.output_format.as_deref(), Some("json"));
    let mut out = Vec::new();
    q.encode_for_site(&mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "GET hosts\nResponseHeader: fixed16\nKeepAlive: on\nColumns: name\nAuthUser: alice\n\
         OutputFormat: json\nFilter: state = 1\n\n"
    );
}

#[test]
fn lines_lose_every_trailing_cr_so_that_forwarding_cannot_split_a_request() {
    // Found by fuzzing (fuzz/corpus/request_framing): a line `\r\r` was
    // forwarded as `\r\n`, which the next reader takes for the end of the
    // request: the lines after it became a second request on the channel.
    let q = get("GET hosts\n\r\r\nColumns: name\r\r\nGET secret\n\n");
    assert_eq!(q.forwarded_headers(), b"Columns: name\nGET secret\n");
    let mut wire = Vec::new();
    q.encode_for_site(&mut wire);
    assert_eq!(frame_all(&wire, &Limits::default()).unwrap().len(), 1, "one request for the site");
    let Ok(Request::Command(c)) = Request::parse(b"COMMAND [1] X\r\r\n\n") else { panic!() };
    assert_eq!(c.commands, vec![Bytes::from_static(b"COMMAND [1] X")]);
}

#[test]
fn unknown_lines_pass_through_untouched() {
    let q = get("GET services\nStats: state = 0\nno colon here\nFoo:bar \nColumns:  a  b\n\n");
    assert_eq!(q.forwarded_headers(), b"Stats: state = 0\nno colon here\nFoo:bar \nColumns:  a  b\n");
    assert_eq!(q.style, ReplyStyle::default());
}

#[test]
fn bad_values_of_interpreted_headers_are_400() {
    let e = Request::parse(b"GET hosts\nKeepAlive: On\n\n").unwrap_err();
    assert_eq!(e.status(), crate::Status::BadRequest);
    assert_eq!(e.to_string(), "invalid value 'On' for header KeepAlive (expected 'on' or 'off')");
    let e = Request::parse(b"GET hosts\nResponseHeader: fixed32\n\n").unwrap_err();
    assert!(matches!(e, RequestError::BadHeader { name: "ResponseHeader", .. }));
    let e = Request::parse(b"GET hosts\nCache: forever\n\n").unwrap_err();
    assert!(matches!(e, RequestError::BadHeader { name: "Cache", .. }));
}

#[test]
fn invalid_requests_are_452() {
    for (input, want) in [
        (&b"get hosts\n\n"[..], RequestError::InvalidMethod("get".into())),
        (b"GEThosts\n\n", RequestError::InvalidMethod("GEThosts".into())),
        (b"GET\n\n", RequestError::MissingTable),
        (b"GET   \n\n", RequestError::MissingTable),
        (b"PUT x\n\n", RequestError::InvalidMethod("PUT".into())),
        (b"GET \xff\n\n", RequestError::NotUtf8("the table name")),
    ] {
        let e = Request::parse(input).unwrap_err();
        assert_eq!(e, want, "{:?}", String::from_utf8_lossy(input));
        assert_eq!(e.status(), crate::Status::InvalidRequest);
    }
}

#[test]
fn commands_are_split_and_each_gets_its_own_blank_line() {
    let r = Request::parse(b"COMMAND [1] A;h\nCOMMAND [2] B;h\nResponseHeader: fixed16\n\n").unwrap();
    let Request::Command(c) = r else { panic!("not a command") };
    assert!(c.style.fixed16 && c.style.keepalive);
    let mut out = Vec::new();
    c.encode_for_site(&mut out);
    assert_eq!(out, b"COMMAND [1] A;h\n\nCOMMAND [2] B;h\n\n");
}

#[test]
fn sniffed_style_of_unparseable_request() {
    let s = ReplyStyle::sniff(b"GET\nResponseHeader: fixed16\nKeepAlive: on\n\n");
    assert_eq!(s, ReplyStyle { fixed16: true, keepalive: true });
}

proptest! {
    /// However the bytes are split into reads, the same requests come out.
    #[test]
    fn framing_does_not_depend_on_chunking(
        reqs in proptest::collection::vec("[A-Za-z:= ]{0,12}(\n[A-Za-z:= ]{1,12}){0,4}", 1..5),
        cuts in proptest::collection::vec(1usize..7, 0..40),
    ) {
        let mut input = Vec::new();
        for r in &reqs {
            input.extend_from_slice(format!("GET t{r}\n\n").as_bytes());
        }
        let limits = Limits::default();
        let whole = frame_all(&input, &limits).unwrap();
        let mut f = Framer::new();
        let mut buf = Vec::new();
        let mut got = Vec::new();
        let mut pos = 0;
        for c in cuts.iter().cycle() {
            if pos >= input.len() { break; }
            let next = (pos + c).min(input.len());
            buf.extend_from_slice(&input[pos..next]);
            pos = next;
            while let Some(end) = f.scan(&buf, &limits).unwrap() {
                got.push(buf[end.start..end.end].to_vec());
                buf.drain(..end.end);
            }
        }
        if pos < input.len() {
            buf.extend_from_slice(&input[pos..]);
            while let Some(end) = f.scan(&buf, &limits).unwrap() {
                got.push(buf[end.start..end.end].to_vec());
                buf.drain(..end.end);
            }
        }
        prop_assert_eq!(got, whole);
    }

    /// Parsing never panics, whatever the bytes.
    #[test]
    fn parse_never_panics(input in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = Request::parse(&input);
        let mut f = Framer::new();
        let _ = f.scan(&input, &Limits { max_request_bytes: 100, max_header_lines: 5, max_line_bytes: 30 });
    }

    /// The one-pass encoding a session uses gives exactly the bytes (and
    /// the errors) of parsing into a [`Query`] and encoding that, whatever
    /// the request: header lines of every kind, values of every shape,
    /// bytes that are not UTF-8, `COMMAND`s and garbage.
    #[test]
    fn the_one_pass_site_copy_is_the_querys(
        first in prop_oneof![
            Just("GET hosts".to_owned()), Just("GET".to_owned()), Just("GET  status ".to_owned()),
            Just("GETX".to_owned()), Just("COMMAND [1] X".to_owned()), Just("HELLO".to_owned()),
            "GET [a-z\\xe9]{0,6}",
        ],
        lines in proptest::collection::vec(prop_oneof![
            "(Columns|Filter|Stats|Limit|Or|Sort|Foo|WaitTimeout): ?[a-z0-9 =~\\xff]{0,12}",
            "(KeepAlive|ResponseHeader|Cache): ?(on|off|fixed16|reload|x)",
            "(OutputFormat|AuthUser): ?[a-z\\xe9\\xff]{0,8}",
            "[a-zA-Z :]{1,12}",
            Just("COMMAND [2] Y".to_owned()),
        ], 0..8),
        crs in any::<bool>(),
    ) {
        let end = if crs { "\r\n" } else { "\n" };
        let mut text = first.clone();
        text.push_str(end);
        for l in &lines { text.push_str(l); text.push_str(end); }
        let bytes: Vec<u8> = text.chars().map(|c| if c == '\u{ff}' { 0xff } else { c as u8 }).collect();
        let mut wire = b"left over".to_vec();
        let fast = Request::parse_for_site(&bytes, &mut wire);
        match (Request::parse(&bytes), fast) {
            (Ok(Request::Get(q)), Ok(ForSite::Get(summary))) => {
                let mut expected = Vec::new();
                q.encode_for_site(&mut expected);
                prop_assert_eq!(&wire, &expected);
                prop_assert_eq!(summary, GetSummary { style: q.style, cache: q.cache, pipelinable: q.pipelinable });
            }
            (Ok(Request::Command(c)), Ok(ForSite::Command(d))) => prop_assert_eq!(c, d),
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            (a, b) => prop_assert!(false, "parse {:?} against parse_for_site {:?}", a, b),
        }
    }

    /// What the proxy sends to a site parses back to the same query.
    #[test]
    fn site_encoding_round_trips(
        table in "[a-z]{1,10}",
        lines in proptest::collection::vec("(Columns|Filter|Stats|Limit): [a-z0-9 =]{1,20}", 0..6),
        keepalive in any::<bool>(), fixed16 in any::<bool>(),
    ) {
        let mut text = format!("GET {table}\n");
        for l in &lines { text.push_str(l); text.push('\n'); }
        if keepalive { text.push_str("KeepAlive: on\n"); }
        if fixed16 { text.push_str("ResponseHeader: fixed16\n"); }
        let q = get(&text);
        let mut wire = Vec::new();
        q.encode_for_site(&mut wire);
        let back = get(std::str::from_utf8(&wire).unwrap());
        prop_assert_eq!(&back.table, &q.table);
        prop_assert_eq!(back.forwarded_headers(), q.forwarded_headers());
        prop_assert_eq!(back.style, ReplyStyle { fixed16: true, keepalive: true });
    }
}

#[test]
fn queries_a_core_might_choke_on_are_not_pipelined() {
    let ok = |t: &str| Query::from_text(t).unwrap().pipelinable;
    assert!(ok("GET hosts\nColumns: name state\nFilter: state = 1\nFilter: name ~ x\nOr: 2\nLimit: 10\n"));
    assert!(ok("GET services\nStats: state = 0\nStatsAnd: 1\nOutputFormat: json\nAuthUser: x\nCache: reload\n"));
    assert!(!ok("GET hosts\nFoo: bar\n"), "a header mk-livestatus does not know");
    assert!(!ok("GET hosts\ncolumns: name\n"), "names are case-sensitive");
    assert!(!ok("GET hosts\nColumns name\n"), "a line without a colon");
    assert!(!ok("GET hosts\nLimit: abc\n"), "Icinga 2 closes the connection");
    assert!(!ok("GET hosts\nFilter: name\n"), "a filter without an operator");
}
