//! Unit and property tests for the python3 answer parser.

use super::*;
use proptest::prelude::*;

/// A value as a test writes it and expects it back.
#[derive(Debug, Clone, PartialEq)]
enum V {
    Int(i64),
    Str(String),
    Blob(Vec<u8>),
    Null,
}

/// Collects events into rows of values.
#[derive(Default)]
struct Rows {
    rows: Vec<Vec<V>>,
    blob: Option<Vec<u8>>,
    chunks_empty: bool,
}

impl Sink for Rows {
    type Error = std::convert::Infallible;
    fn event(&mut self, e: Event<'_>) -> Result<(), Self::Error> {
        match e {
            Event::RowStart => self.rows.push(Vec::new()),
            Event::Int(n) => self.rows.last_mut().unwrap().push(V::Int(n)),
            Event::Float(_) => panic!("no floats in these tests"),
            Event::Null => self.rows.last_mut().unwrap().push(V::Null),
            Event::Str(s) => self.rows.last_mut().unwrap().push(V::Str(s.to_owned())),
            Event::BlobStart => self.blob = Some(Vec::new()),
            Event::BlobChunk(c) => {
                self.chunks_empty |= c.is_empty();
                self.blob.as_mut().unwrap().extend_from_slice(c);
            }
            Event::BlobEnd => {
                let b = self.blob.take().unwrap();
                self.rows.last_mut().unwrap().push(V::Blob(b));
            }
            Event::RowEnd => {}
        }
        Ok(())
    }
}

fn render(rows: &[Vec<V>]) -> Vec<u8> {
    let mut out = b"[".to_vec();
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b",\n");
        }
        out.push(b'[');
        for (j, v) in row.iter().enumerate() {
            if j > 0 {
                out.push(b',');
            }
            match v {
                V::Int(n) => out.extend_from_slice(n.to_string().as_bytes()),
                V::Str(s) => render_str(s, &mut out),
                V::Blob(b) => render_blob(b, &mut out),
                V::Null => out.extend_from_slice(b"None"),
            }
        }
        out.push(b']');
    }
    out.extend_from_slice(b"]\n");
    out
}

/// Parse `input` cut into pieces at `cuts` (offsets, any order).
fn parse_cut(input: &[u8], cuts: &[usize]) -> Result<Vec<Vec<V>>, SyntaxError> {
    let mut at: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    at.push(0);
    at.push(input.len());
    at.sort_unstable();
    let mut p = RowParser::new(1024);
    let mut sink = Rows::default();
    for w in at.windows(2) {
        match p.feed(&input[w[0]..w[1]], &mut sink) {
            Ok(()) => {}
            Err(FeedError::Syntax(e)) => return Err(e),
            Err(FeedError::Sink(never)) => match never {},
        }
    }
    p.finish()?;
    assert!(!sink.chunks_empty, "an empty chunk was handed on");
    Ok(sink.rows)
}

fn parse(input: &[u8]) -> Result<Vec<Vec<V>>, SyntaxError> {
    parse_cut(input, &[])
}

#[test]
fn reads_what_checkmk_renders() {
    let input = b"[[\"host-0001\",1712345678,b\"{\\x22a\\x22: 1}\\x0a\",b\"\\x1f\\x8b\\x08\"],\n[\"h\\u00e9\",0,b\"\",b\"\"]]\n";
    assert_eq!(
        parse(input).unwrap(),
        vec![
            vec![
                V::Str("host-0001".into()),
                V::Int(1712345678),
                V::Blob(b"{\"a\": 1}\n".to_vec()),
                V::Blob(vec![0x1f, 0x8b, 8])
            ],
            vec![V::Str("h\u{e9}".into()), V::Int(0), V::Blob(vec![]), V::Blob(vec![])],
        ]
    );
}

#[test]
fn reads_older_renderings() {
    // No `b` prefix, `\u00NN` bytes, octal escapes, `u"..."` strings,
    // single quotes, escaped quotes and backslashes, None, True/False.
    let input = b"[[u'x\\'y', \"\\u00ff\\101\\0\\\\\", b'\\12\\0123', None, True, False]]";
    let rows = parse(input).unwrap();
    assert_eq!(
        rows,
        vec![vec![
            V::Str("x'y".into()),
            V::Str("\u{ff}A\u{0}\\".into()),
            V::Blob(vec![b'\n', 0o12, b'3']),
            V::Null,
            V::Int(1),
            V::Int(0),
        ]]
    );
}

#[test]
fn an_empty_answer_and_an_empty_row() {
    assert_eq!(parse(b"[]\n").unwrap(), Vec::<Vec<V>>::new());
    assert_eq!(parse(b"[[]]").unwrap(), vec![Vec::<V>::new()]);
}

#[test]
fn malformed_answers_are_errors_with_a_position() {
    for (input, what) in [
        (&b"[[1,2]"[..], "the answer ends early"),
        (b"[[\"abc", "the answer ends early"),
        (b"[[1,[2]]]", "nested lists are not supported"),
        (b"[[\"\\q\"]]", "an unknown escape"),
        (b"[[b\"\\xzz\"]]", "a malformed hex escape"),
        (b"[[b\"\\u0100\"]]", "a character escape in a byte string"),
        (b"[[1]]x", "data after the end of the answer"),
        (b"x[[1]]", "the answer does not start with '['"),
        (b"[[1 2]]", "unexpected character"),
        (b"[[12abc]]", "a malformed number or word"),
        (b"[[b 1]]", "a string prefix without a quote"),
        (b"[[\"\xff\"]]", "a string that is not UTF-8"),
    ] {
        let e = parse(input).unwrap_err();
        assert_eq!(e.what, what, "{}", String::from_utf8_lossy(input));
    }
    let long = format!("[[\"{}\"]]", "a".repeat(1025));
    assert_eq!(parse(long.as_bytes()).unwrap_err().what, "a string longer than the limit");
    let e = parse(b"[[1,2],\n[3,;]]").unwrap_err();
    assert_eq!(e.offset, 11);
}

#[test]
fn a_sink_error_stops_the_parse() {
    struct Full;
    impl Sink for Full {
        type Error = &'static str;
        fn event(&mut self, e: Event<'_>) -> Result<(), Self::Error> {
            if matches!(e, Event::BlobChunk(_)) { Err("disk full") } else { Ok(()) }
        }
    }
    let mut p = RowParser::new(64);
    assert_eq!(p.feed(b"[[b\"abc\"]]", &mut Full), Err(FeedError::Sink("disk full")));
}

#[test]
fn a_large_blob_arrives_in_bounded_chunks() {
    struct Sizes(Vec<usize>);
    impl Sink for Sizes {
        type Error = ();
        fn event(&mut self, e: Event<'_>) -> Result<(), ()> {
            if let Event::BlobChunk(c) = e {
                self.0.push(c.len());
            }
            Ok(())
        }
    }
    let blob: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let input = render(&[vec![V::Blob(blob.clone())]]);
    let mut p = RowParser::new(64);
    let mut sizes = Sizes(Vec::new());
    p.feed(&input, &mut sizes).unwrap();
    assert!(p.is_done());
    assert_eq!(sizes.0.iter().sum::<usize>(), blob.len());
    assert!(sizes.0.iter().all(|n| *n <= 2 * CHUNK), "{:?}", sizes.0.iter().max());
}

fn value() -> impl Strategy<Value = V> {
    prop_oneof![
        any::<i64>().prop_map(V::Int),
        "\\PC{0,20}".prop_map(V::Str),
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(V::Blob),
        Just(V::Null),
    ]
}

proptest! {
    #[test]
    fn any_rows_cut_anywhere_read_back_equal(
        rows in proptest::collection::vec(proptest::collection::vec(value(), 0..5), 0..6),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
    ) {
        let input = render(&rows);
        prop_assert_eq!(parse_cut(&input, &cuts).unwrap(), rows);
    }

    #[test]
    fn arbitrary_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..200), cuts in proptest::collection::vec(any::<usize>(), 0..4)) {
        let _ = parse_cut(&input, &cuts);
    }
}
