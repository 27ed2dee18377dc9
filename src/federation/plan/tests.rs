//! Planning and merging federated queries on plain values.

use super::*;
use serde_json::json;

#[test]
fn the_site_column_and_site_selection_are_livemux_s_and_the_rest_goes_to_the_sites() {
    let p = plan("GET hosts\nColumns: site name state\nFilter: site = berlin\nFilter: state = 0\nLimit: 5\nOffset: 2\nOutputFormat: csv\nResponseHeader: fixed16\nKeepAlive: on").unwrap();
    assert_eq!(p.site_query, "GET hosts\nColumns: name state\nFilter: state = 0\nLimit: 7\nOutputFormat: json\n");
    assert_eq!(p.site_positions, vec![0]);
    assert_eq!(p.sites, Some(["berlin".to_owned()].into()));
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
    assert_eq!(p.site_query, format!("GET hosts\nColumns: name\nLimit: {}\nOutputFormat: json\n", usize::MAX));
}

#[test]
fn stats_merge_exactly_and_avg_is_asked_as_sum_and_count() {
    let p = plan("GET services\nColumns: state\nStats: state >= 0\nStats: sum latency\nStats: min latency\nStats: max latency\nStats: avg latency\nStats: state = 0\nStats: state = 1\nStatsOr: 2").unwrap();
    assert_eq!(
        p.site_query,
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
        ("GET hosts\nColumns: name\nFilter: site ~ ber", "must use '='"),
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
    assert_eq!(p.site_query, "GET hosts\nColumns: name latency\nOutputFormat: json\n", "no Limit pushed with Sort");
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
    assert_eq!(p.site_query, "GET hosts\nColumns: name latency\nOutputFormat: json\n");
    assert_eq!((p.visible, p.sort.clone()), (1, vec![(1, true)]));
    assert_eq!(p.header_names(0), vec!["name".to_owned()]);
    let p = plan("GET hosts\nColumns: name\nSort: site asc").unwrap();
    assert_eq!(p.site_query, "GET hosts\nColumns: name\nOutputFormat: json\n");
    assert_eq!(p.client_row("b", vec![json!("h")]), vec![json!("h"), json!("b")]);
}
