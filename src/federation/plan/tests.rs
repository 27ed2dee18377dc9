//! Planning and merging federated queries on plain values.

use super::*;
use serde_json::json;

#[test]
fn the_site_column_and_site_selection_are_livemux_s_and_the_rest_goes_to_the_sites() {
    let p = plan("GET hosts\nColumns: site name state\nFilter: site = berlin\nFilter: state = 0\nLimit: 5\nOffset: 2\nOutputFormat: csv\nResponseHeader: fixed16\nKeepAlive: on").unwrap();
    assert_eq!(
        p.query_for("berlin").unwrap(),
        "GET hosts\nColumns: name state\nFilter: state = 0\nLimit: 7\nOutputFormat: json\n"
    );
    assert_eq!(p.query_for("paris"), None, "the filter excludes paris: not asked");
    assert_eq!(p.site_positions, vec![0]);
    assert_eq!((p.offset, p.limit), (2, Some(5)));
    assert_eq!(p.client_row("berlin", vec![json!("h1"), json!(0)]), vec![json!("berlin"), json!("h1"), json!(0)]);
    let p = plan("GET hosts\nColumns: name peer_name\nBackends: a b\nSites: b c").unwrap();
    assert_eq!(p.sites, Some(["b".to_owned()].into()));
    assert_eq!(p.client_row("b", vec![json!("h")]), vec![json!("h"), json!("b")]);
}

#[test]
fn limit_and_offset_at_the_top_of_their_range_do_not_overflow() {
    // Found with the federation_answer fuzz target's seed
    // (fuzz/corpus/federation_answer/regression-limit-offset): `Limit + Offset`
    // overflowed, a panic with overflow checks, else a tiny Limit to the sites.
    let p = plan(&format!("GET hosts\nColumns: name\nLimit: {}\nOffset: 2", usize::MAX)).unwrap();
    assert_eq!(
        p.query_for("x").unwrap(),
        format!("GET hosts\nColumns: name\nLimit: {}\nOutputFormat: json\n", usize::MAX)
    );
}

#[test]
fn stats_merge_exactly_and_avg_is_asked_as_sum_and_count() {
    let p = plan("GET services\nColumns: state\nStats: state >= 0\nStats: sum latency\nStats: min latency\nStats: max latency\nStats: avg latency\nStats: state = 0\nStats: state = 1\nStatsOr: 2").unwrap();
    assert_eq!(
        p.query_for("x").unwrap(),
        "GET services\nColumns: state\nStats: state >= 0\nStats: sum latency\nStats: min latency\nStats: max latency\nStats: sum latency\nStats: description !=\nStats: state = 0\nStats: state = 1\nStatsOr: 2\nOutputFormat: json\n"
    );
    assert_eq!(p.stats, vec![Merge::Add, Merge::Add, Merge::Min, Merge::Max, Merge::Avg, Merge::Add]);
    let mut m = StatsMerge::default();
    // site a: state 0 group: 3 rows, latencies 1,2,3; site b: state 0: 1 row latency 10; state 2 only on b.
    m.add(&p, "a", vec![json!(0), json!(3), json!(6.0), json!(1.0), json!(3.0), json!(6.0), json!(3), json!(3)]);
    m.add(&p, "b", vec![json!(0), json!(1), json!(10.0), json!(10.0), json!(10.0), json!(10.0), json!(1), json!(1)]);
    m.add(&p, "b", vec![json!(2), json!(2), json!(1.0), json!(0.5), json!(0.5), json!(1.0), json!(2), json!(0)]);
    let rows = m.rows(&p);
    assert_eq!(rows[0], vec![json!(0), json!(4), json!(16), json!(1), json!(10), json!(4.0), json!(4)]);
    assert_eq!(rows[1], vec![json!(2), json!(2), json!(1), json!(0.5), json!(0.5), json!(0.5), json!(0)]);
}

#[test]
fn what_cannot_be_merged_is_refused_with_a_clear_452() {
    for (q, words) in [
        ("GET hosts\nStats: std latency", "Stats: std cannot be merged"),
        ("GET hosts\nStats: suminv latency", "Stats: suminv"),
        ("GET hosts\nColumns: name\nFilter: site ~ (ber", "invalid regular expression '(ber'"),
        ("GET hosts\nColumns: name\nFilter: site => ber", "'=>' is not an operator"),
        ("GET hosts\nColumns: name\nFilter: site = a\nOr: 2", "Or: 2 combines more than the 1 filters"),
        ("GET hosts\nNegate:", "no filter to negate"),
        ("GET status\nStats: site = a", "Stats on the site column are not supported federated on table 'status'"),
        ("GET hosts\nSort: state asc", "needs explicit Columns"),
        ("GET foo\nStats: avg x", "Stats: avg on table 'foo'"),
        ("GET hosts\nOutputFormat: xml", "not supported"),
    ] {
        let e = plan(q).unwrap_err();
        assert!(e.message.contains(words), "{q}: {}", e.message);
        assert!(e.status == 452 || e.status == 400);
    }
}

#[test]
fn rows_sort_numbers_numerically_and_render_in_every_format() {
    let p = plan("GET hosts\nColumns: name latency site\nSort: latency desc\nSort: name asc\nLimit: 2").unwrap();
    assert_eq!(
        p.query_for("x").unwrap(),
        "GET hosts\nColumns: name latency\nOutputFormat: json\n",
        "no Limit pushed with Sort"
    );
    let mut rows = vec![
        vec![json!("b"), json!(2), json!("x")],
        vec![json!("a"), json!(10), json!("y")],
        vec![json!("c"), json!(2), json!("x")],
    ];
    sort(&p, &mut rows);
    assert_eq!(rows.iter().map(|r| r[0].as_str().unwrap()).collect::<Vec<_>>(), ["a", "b", "c"]);

    let render = |q: &str, failed: &[(String, String)]| {
        let p = plan(q).unwrap();
        let mut out = Vec::new();
        let header = p.headers.then(|| p.header_names(0));
        let mut r = Renderer::start(&p, header.as_deref(), &mut out);
        r.row(&[json!("h\"1"), json!(["a", "b"]), json!(null), json!(1.5)], &mut out);
        r.finish(failed, 1, &mut out);
        String::from_utf8(out).unwrap()
    };
    assert_eq!(render("GET hosts\nColumns: name groups x y", &[]), "h\"1;a,b;;1.5\n");
    assert_eq!(render("GET hosts\nColumns: a b c d\nSeparators: 10 9 124 43", &[]), "h\"1\ta|b\t\t1.5\n");
    assert_eq!(
        render("GET hosts\nColumns: a b c d\nOutputFormat: json", &[]),
        "[[\"h\\\"1\",[\"a\",\"b\"],null,1.5]]\n"
    );
    assert_eq!(
        render("GET hosts\nColumns: a b c d\nOutputFormat: python3", &[]),
        "[[\"h\\u00221\",[\"a\",\"b\"],None,1.5]]\n"
    );
    assert_eq!(
        render("GET hosts\nColumns: a b c d\nOutputFormat: python", &[]),
        "[[u\"h\\u00221\",[u\"a\",u\"b\"],None,1.5]]\n"
    );
    assert_eq!(render("GET hosts\nColumns: a b c d\nColumnHeaders: on", &[]), "a;b;c;d\nh\"1;a,b;;1.5\n");
    let w = render(
        "GET hosts\nColumns: a b c d\nOutputFormat: wrapped_json\nColumnHeaders: on",
        &[("paris".into(), "down".into())],
    );
    let v: serde_json::Value = serde_json::from_str(&w).unwrap();
    assert_eq!(v["columns"], json!(["a", "b", "c", "d"]));
    assert_eq!(v["data"][0][0], "h\"1");
    assert_eq!(v["failed"], json!({"paris": "down"}));
    assert_eq!(v["total_count"], 1);
}

#[test]
fn a_sort_column_outside_columns_is_asked_and_not_shown() {
    let p = plan("GET hosts\nColumns: name\nSort: latency desc").unwrap();
    assert_eq!(p.query_for("x").unwrap(), "GET hosts\nColumns: name latency\nOutputFormat: json\n");
    assert_eq!((p.visible, p.sort.clone()), (1, vec![SortKey { col: 1, desc: true, var: None }]));
    assert_eq!(p.header_names(0), vec!["name".to_owned()]);
    let p = plan("GET hosts\nColumns: name\nSort: site asc").unwrap();
    assert_eq!(p.query_for("x").unwrap(), "GET hosts\nColumns: name\nOutputFormat: json\n");
    assert_eq!(p.client_row("b", vec![json!("h")]), vec![json!("h"), json!("b")]);
}

#[test]
fn site_filters_take_every_operator_anywhere_in_the_stack() {
    let q = |filters: &str, site: &str| {
        plan(&format!("GET hosts\nColumns: name\nOutputFormat: json\n{filters}")).unwrap().query_for(site)
    };
    let bare = "GET hosts\nColumns: name\nOutputFormat: json\n";
    // The cases: Or of two sites; And with a site's own column.
    let or = "Filter: site = berlin\nFilter: site = paris\nOr: 2";
    assert_eq!(q(or, "berlin").as_deref(), Some(bare));
    assert_eq!(q(or, "paris").as_deref(), Some(bare));
    assert_eq!(q(or, "rome"), None);
    let and = "Filter: state = 0\nFilter: site = berlin\nAnd: 2";
    assert_eq!(q(and, "berlin").as_deref(), Some("GET hosts\nColumns: name\nFilter: state = 0\nOutputFormat: json\n"));
    assert_eq!(q(and, "paris"), None);
    assert_eq!(q("Filter: site != berlin", "berlin"), None);
    assert_eq!(q("Filter: peer_key != berlin", "paris").as_deref(), Some(bare));
    assert_eq!(q("Filter: site ~ ^ber", "berlin").as_deref(), Some(bare));
    assert_eq!(q("Filter: peer_name ~~ ^BER", "berlin").as_deref(), Some(bare));
    assert_eq!(q("Filter: site =~ BERLIN\nNegate:", "berlin"), None);
    assert_eq!(q("Filter: site < c", "berlin").as_deref(), Some(bare));
    assert_eq!(q("Filter: site >= c", "berlin"), None);
    // A site test under Or with a site's column: the column's test goes to
    // the sites where the site test is false, nothing to where it is true.
    let mixed = "Filter: state = 1\nFilter: site = berlin\nOr: 2\nFilter: name ~ x";
    assert_eq!(
        q(mixed, "paris").as_deref(),
        Some("GET hosts\nColumns: name\nFilter: state = 1\nFilter: name ~ x\nOutputFormat: json\n")
    );
    assert_eq!(q(mixed, "berlin").as_deref(), Some("GET hosts\nColumns: name\nFilter: name ~ x\nOutputFormat: json\n"));
    // In Stats: a count of one site's rows, and of the others'.
    let p = plan("GET hosts\nStats: site = berlin\nStats: state = 0\nStats: site = paris\nStatsAnd: 2").unwrap();
    assert_eq!(p.query_for("berlin").unwrap(), "GET hosts\nStats: name !=\nStats: name =\nOutputFormat: json\n");
    assert_eq!(p.query_for("paris").unwrap(), "GET hosts\nStats: name =\nStats: state = 0\nOutputFormat: json\n");
    assert_eq!(p.stats, vec![Merge::Add, Merge::Add]);
}

/// The property the site filters keep: for random filter stacks (and a
/// random stats expression) over random rows of three sites, asking each
/// site its residual query and taking its rows gives exactly the rows (and
/// counts) the whole filter selects from the merged rows.
mod property {
    use super::super::sitefilter::{Keywords, StrOp, StrTest};
    use super::*;
    use proptest::prelude::*;

    const SITES: [&str; 3] = ["berlin", "paris", "rome"];
    const NAMES: [&str; 4] = ["a", "b", "ab", "Ber"];
    const SITE_ARGS: [&str; 7] = ["berlin", "paris", "^ber", "R", ".*i.*", "m", "PARIS"];
    const STR_OPS: [&str; 12] = ["=", "!=", "~", "!~", "=~", "!=~", "~~", "!~~", "<", "<=", ">", ">="];
    const INT_OPS: [&str; 6] = ["=", "!=", "<", "<=", ">", ">="];

    #[derive(Debug, Clone)]
    struct Row {
        site: usize,
        state: i64,
        name: &'static str,
    }

    #[derive(Debug, Clone)]
    enum Op {
        Site(usize, usize, usize),
        State(usize, i64),
        Name(usize, usize),
        And(usize),
        Or(usize),
        Negate,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..3usize, 0..STR_OPS.len(), 0..SITE_ARGS.len()).prop_map(|(c, o, a)| Op::Site(c, o, a)),
            (0..INT_OPS.len(), 0..4i64).prop_map(|(o, n)| Op::State(o, n)),
            (0..STR_OPS.len(), 0..NAMES.len()).prop_map(|(o, a)| Op::Name(o, a)),
            (0..4usize).prop_map(Op::And),
            (0..4usize).prop_map(Op::Or),
            Just(Op::Negate),
        ]
    }

    fn row() -> impl Strategy<Value = Row> {
        (0..3usize, 0..4i64, 0..NAMES.len()).prop_map(|(site, state, n)| Row { site, state, name: NAMES[n] })
    }

    /// The condition of a line a site evaluates (`state op n`, `name op s`).
    fn line_holds(line: &str, r: &Row) -> bool {
        let mut w = line.splitn(3, ' ');
        let (col, op, arg) = (w.next().unwrap(), w.next().unwrap(), w.next().unwrap_or(""));
        assert!(!["site", "peer_name", "peer_key"].contains(&col), "a site got a site test: {line}");
        match col {
            "state" => {
                let n: i64 = arg.parse().unwrap();
                match op {
                    "=" => r.state == n,
                    "!=" => r.state != n,
                    "<" => r.state < n,
                    "<=" => r.state <= n,
                    ">" => r.state > n,
                    ">=" => r.state >= n,
                    _ => panic!("{line}"),
                }
            }
            "name" => StrTest::new(StrOp::parse(op).unwrap(), arg).unwrap().matches(r.name),
            _ => panic!("unknown column in {line}"),
        }
    }

    /// Evaluate a site's request's stack of `kw` lines on one of its rows
    /// (as a core does): the filter (all entries) or each stats column.
    fn site_stack(query: &str, kw: &str, r: &Row) -> Vec<bool> {
        let mut stack: Vec<bool> = Vec::new();
        for l in query.lines() {
            let Some((name, value)) = l.split_once(':') else { continue };
            let value = value.trim();
            match name.strip_prefix(if kw == "Stats" { "Stats" } else { "" }).unwrap_or("-") {
                n if n == kw || (kw == "Stats" && n.is_empty()) => stack.push(line_holds(value, r)),
                "And" | "Or" => {
                    let n: usize = value.parse().unwrap();
                    let parts = stack.split_off(stack.len() - n);
                    stack.push(if name.ends_with("And") { parts.iter().all(|b| *b) } else { parts.iter().any(|b| *b) });
                }
                "Negate" => {
                    let b = stack.pop().unwrap();
                    stack.push(!b);
                }
                _ => {}
            }
        }
        stack
    }

    /// The stack lines for `ops` (kept valid) and the reference evaluator.
    fn build(ops: &[Op], kw: Keywords) -> (String, Vec<Expr>) {
        let mut text = String::new();
        let mut stack: Vec<Expr> = Vec::new();
        for o in ops {
            match o {
                Op::Site(c, op, a) => {
                    let col = ["site", "peer_name", "peer_key"][*c];
                    text.push_str(&format!("{}: {col} {} {}\n", kw.atom, STR_OPS[*op], SITE_ARGS[*a]));
                    let t = StrTest::new(StrOp::parse(STR_OPS[*op]).unwrap(), SITE_ARGS[*a]).unwrap();
                    stack.push(Expr::Site(Box::new(t)));
                }
                Op::State(op, n) => {
                    let l = format!("state {} {n}", INT_OPS[*op]);
                    text.push_str(&format!("{}: {l}\n", kw.atom));
                    stack.push(Expr::Line(l));
                }
                Op::Name(op, a) => {
                    let l = format!("name {} {}", STR_OPS[*op], NAMES[*a]);
                    text.push_str(&format!("{}: {l}\n", kw.atom));
                    stack.push(Expr::Line(l));
                }
                Op::And(n) | Op::Or(n) => {
                    let n = (*n).min(stack.len());
                    let all = matches!(o, Op::And(_));
                    // `And: 0` / `Or: 0` only in the filter stack (Stats needs one).
                    if n == 0 && kw.atom == "Stats" {
                        continue;
                    }
                    text.push_str(&format!("{}: {n}\n", if all { kw.and } else { kw.or }));
                    let parts = stack.split_off(stack.len() - n);
                    stack.push(if all { Expr::And(parts) } else { Expr::Or(parts) });
                }
                Op::Negate if !stack.is_empty() => {
                    text.push_str(&format!("{}:\n", kw.negate));
                    let top = stack.pop().unwrap();
                    stack.push(Expr::Not(Box::new(top)));
                }
                Op::Negate => {}
            }
        }
        (text, stack)
    }

    fn holds(e: &Expr, r: &Row) -> bool {
        e.eval(SITES[r.site], &mut |l| line_holds(l, r))
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn asking_each_site_its_residual_equals_filtering_the_merged_rows(
            filter in proptest::collection::vec(op(), 0..12),
            stats in proptest::collection::vec(op(), 1..8),
            rows in proptest::collection::vec(row(), 0..40),
        ) {
            let (ftext, fref) = build(&filter, sitefilter::FILTER);
            let (stext, sref) = build(&stats, sitefilter::STATS);
            // The reference: the whole filter on the merged rows.
            let want: Vec<usize> =
                (0..rows.len()).filter(|&i| fref.iter().all(|e| holds(e, &rows[i]))).collect();
            let p = plan(&format!("GET hosts\nColumns: name state\n{ftext}")).unwrap();
            let mut got = Vec::new();
            for (s, site) in SITES.iter().enumerate() {
                let Some(q) = p.query_for(site) else { continue };
                for (i, r) in rows.iter().enumerate().filter(|(_, r)| r.site == s) {
                    if site_stack(&q, "Filter", r).iter().all(|b| *b) {
                        got.push(i);
                    }
                }
            }
            got.sort_unstable();
            prop_assert_eq!(&got, &want, "filter:\n{}", ftext);

            // Each stats column counts the rows its expression passes, per
            // site, under the filter; the sums equal the merged counts.
            if sref.is_empty() {
                return Ok(());
            }
            let p = plan(&format!("GET hosts\n{ftext}{stext}")).unwrap();
            let want: Vec<usize> = sref
                .iter()
                .map(|e| rows.iter().filter(|r| fref.iter().all(|f| holds(f, r)) && holds(e, r)).count())
                .collect();
            let mut got = vec![0usize; sref.len()];
            for (s, site) in SITES.iter().enumerate() {
                let Some(q) = p.query_for(site) else { continue };
                for r in rows.iter().filter(|r| r.site == s) {
                    if !site_stack(&q, "Filter", r).iter().all(|b| *b) {
                        continue;
                    }
                    let cols = site_stack(&q, "Stats", r);
                    prop_assert_eq!(cols.len(), sref.len(), "stats columns of {}", q);
                    for (n, b) in got.iter_mut().zip(cols) {
                        *n += usize::from(b);
                    }
                }
            }
            prop_assert_eq!(got, want, "filter:\n{}stats:\n{}", ftext, stext);
        }
    }
}

#[test]
fn lmd_s_computed_columns_and_custom_variable_sorts() {
    let p = plan("GET services\nColumns: host_name state_order has_long_plugin_output last_state_change_order site\nSort: state_order desc\nSort: site asc").unwrap();
    assert_eq!(
        p.query_for("x").unwrap(),
        "GET services\nColumns: host_name state long_plugin_output last_state_change\nOutputFormat: json\n",
        "asked as the columns they are made of"
    );
    let row = |state: i64, long: &str, lsc: i64| vec![json!("h"), json!(state), json!(long), json!(lsc)];
    assert_eq!(
        p.client_row_of(RowSite { name: "s1", addr: "", program_start: Some(1700) }, row(2, "", 0)),
        vec![json!("h"), json!(4), json!(0), json!(1700), json!("s1")]
    );
    assert_eq!(
        p.client_row_of(RowSite { name: "s1", addr: "", program_start: Some(1700) }, row(3, "more", 99)),
        vec![json!("h"), json!(3), json!(1), json!(99), json!("s1")]
    );
    let mut rows = vec![
        p.client_row("b", row(3, "", 1)),
        p.client_row("a", row(2, "", 1)),
        p.client_row("a", row(3, "", 1)),
        p.client_row("c", row(0, "", 1)),
    ];
    sort(&p, &mut rows);
    let order: Vec<(i64, &str)> = rows.iter().map(|r| (r[1].as_i64().unwrap(), r[4].as_str().unwrap())).collect();
    assert_eq!(order, vec![(4, "a"), (3, "a"), (3, "b"), (0, "c")], "CRITICAL above UNKNOWN, then by site");

    // Custom variables, as objects (Naemon) or pairs (Icinga 2); empty ones last ascending.
    let p = plan("GET hosts\nColumns: name\nSort: custom_variables prio asc").unwrap();
    assert_eq!(p.query_for("x").unwrap(), "GET hosts\nColumns: name custom_variables\nOutputFormat: json\n");
    assert_eq!(p.sort, vec![SortKey { col: 1, desc: false, var: Some("PRIO".into()) }]);
    let mut rows = vec![
        vec![json!("none"), json!({})],
        vec![json!("b"), json!({"PRIO": "2"})],
        vec![json!("a"), json!([["PRIO", "1"]])],
        vec![json!("empty"), json!({"PRIO": ""})],
    ];
    sort(&p, &mut rows);
    let names: Vec<&str> = rows.iter().map(|r| r[0].as_str().unwrap()).collect();
    assert_eq!(names, ["a", "b", "none", "empty"]);
    let p = plan("GET hosts\nColumns: name\nSort: custom_variables PRIO desc").unwrap();
    sort(&p, &mut rows);
    let names: Vec<&str> = rows.iter().map(|r| r[0].as_str().unwrap()).collect();
    assert_eq!(names, ["none", "empty", "b", "a"], "empty ones first descending (stable among themselves)");
}

#[test]
fn lmd_only_columns_are_answered_by_livemux_and_not_asked_of_the_sites() {
    let p = plan("GET status\nColumns: program_start peer_key peer_addr thruk configtool lmd_last_cache_update peer_section\nOutputFormat: wrapped_json").unwrap();
    assert_eq!(p.query_for("x").unwrap(), "GET status\nColumns: program_start\nOutputFormat: json\n");
    let row =
        p.client_row_of(RowSite { name: "berlin", addr: "tcp://10.0.0.1:6557", program_start: None }, vec![json!(17)]);
    assert_eq!(&row[..5], &[json!(17), json!("berlin"), json!("tcp://10.0.0.1:6557"), json!({}), json!({})]);
    assert!(row[5].as_u64().is_some_and(|t| t > 1_700_000_000), "now: {row:?}");
    assert_eq!(row[6], json!(""));
    assert!(plan("GET hosts\nColumns: peer_addr\nStats: state = 0").is_err(), "refused in a stats group");
}
