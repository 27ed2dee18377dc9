//! Who may command, and what the logs say about whom (issue 26): the
//! command audit and the slow-query log name the client's uid and pid
//! (`SO_PEERCRED`); `commands_from_uids`/`commands_from_groups` let the
//! named local users through and no other; a refused command never reaches
//! the site.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::support::process::ProxyProcess;
use livemux_simsite::{SimConfig, SimSite};

/// Send `request` and read the whole answer (the connection closes after it).
fn exchange(socket: &std::path::Path, request: &str) -> String {
    let mut c = UnixStream::connect(socket).expect("connect");
    c.write_all(request.as_bytes()).expect("write");
    c.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut answer = String::new();
    c.read_to_string(&mut answer).expect("read");
    answer
}

fn me() -> (u32, u32, String) {
    let uid = nix::unistd::getuid();
    let user = nix::unistd::User::from_uid(uid).ok().flatten().expect("the test's user is in the user database");
    (uid.as_raw(), nix::unistd::getgid().as_raw(), user.name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_and_slow_query_lines_name_the_clients_uid_and_pid() {
    let site = SimSite::start(SimConfig::tcp("s1")).await.expect("simulated site");
    let dir = tempfile::tempdir().unwrap();
    let mut p = tokio::task::block_in_place(|| {
        ProxyProcess::start_with_sites(
            dir.path(),
            "",
            "slow_query_threshold = \"50ms\"",
            &[("full", site.address(), ""), ("terse", site.address(), "audit_command_arguments = false")],
        )
    });
    let (uid, gid, _) = me();
    let client = format!("uid={uid} gid={gid} pid={}", std::process::id());

    // The audit: every command, its name, the client, the outcome;
    // arguments only where audit_command_arguments is on.
    let two = "COMMAND [1700000000] ADD_HOST_COMMENT;host-0001;1;ops;secret note\n\
               COMMAND [1700000000] DISABLE_HOST_CHECK;host-0002\n\n";
    let answer = tokio::task::block_in_place(|| exchange(&p.socket("full"), two));
    assert_eq!(answer, "", "a forwarded COMMAND without fixed16 has no answer");
    let line = tokio::task::block_in_place(|| p.log.wait_for("COMMAND ADD_HOST_COMMENT from"));
    assert!(line.contains(&client), "{line}");
    assert!(line.contains("to full: forwarded; [1700000000] ADD_HOST_COMMENT;host-0001;1;ops;secret note"), "{line}");
    let line = tokio::task::block_in_place(|| p.log.wait_for("COMMAND DISABLE_HOST_CHECK from"));
    assert!(line.contains(&client) && line.contains("DISABLE_HOST_CHECK;host-0002"), "{line}");
    tokio::task::block_in_place(|| exchange(&p.socket("terse"), two));
    let line = tokio::task::block_in_place(|| p.log.wait_for("to terse: forwarded"));
    assert!(line.contains("COMMAND ADD_HOST_COMMENT from") && line.contains(&client), "{line}");
    assert!(!line.contains("secret note") && !line.contains("host-0001"), "arguments logged: {line}");
    let got = site.commands();
    assert_eq!(got.len(), 4, "{got:?}");

    // The slow-query log: site, time, bytes, client, first line, header names
    // (no values: the AuthUser and the filter stay out).
    site.set_knobs(|k| k.delay = Duration::from_millis(120));
    let q = "GET hosts\nColumns: name\nFilter: name = host-0003\nAuthUser: alice\n\n";
    let answer = tokio::task::block_in_place(|| exchange(&p.socket("full"), q));
    assert_eq!(answer, "host-0003\n");
    let line = tokio::task::block_in_place(|| p.log.wait_for("slow query: GET hosts took"));
    assert!(line.contains("10 bytes") && line.contains(&client), "{line}");
    assert!(line.contains("(Columns, Filter, AuthUser)"), "{line}");
    assert!(!line.contains("alice") && !line.contains("host-0003"), "values logged: {line}");
    site.set_knobs(|k| k.delay = Duration::ZERO);
    let fast = "GET hosts\nColumns: name\nFilter: name = host-0004\n\n";
    assert_eq!(tokio::task::block_in_place(|| exchange(&p.socket("full"), fast)), "host-0004\n");
    let log = tokio::task::block_in_place(|| p.stop());
    let slow: Vec<&String> = log.iter().filter(|l| l.contains("slow query")).collect();
    assert_eq!(slow.len(), 1, "only the slow query is logged as slow: {slow:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_from_uids_and_groups_let_the_named_users_through_and_no_other() {
    let site = SimSite::start(SimConfig::tcp("s1")).await.expect("simulated site");
    let dir = tempfile::tempdir().unwrap();
    let (uid, gid, user) = me();
    // A uid that is not this process's (it need not exist).
    let other = uid.wrapping_add(4321);
    let sites = [
        ("byname", site.address(), format!("commands_from_uids = [\"{user}\"]")),
        ("bygroup", site.address(), format!("commands_from_groups = [{gid}]")),
        ("others", site.address(), format!("commands_from_uids = [{other}]")),
    ];
    let sites: Vec<(&str, String, &str)> = sites.iter().map(|(n, a, m)| (*n, a.clone(), m.as_str())).collect();
    let mut p = tokio::task::block_in_place(|| ProxyProcess::start_with_sites(dir.path(), "", "", &sites));
    let cmd = |marker: &str| {
        format!("COMMAND [1700000000] ADD_HOST_COMMENT;host-0001;1;ops;{marker}\nResponseHeader: fixed16\n\n")
    };
    for (socket, marker) in [("byname", "by-name"), ("bygroup", "by-group")] {
        let answer = tokio::task::block_in_place(|| exchange(&p.socket(socket), &cmd(marker)));
        assert_eq!(answer, "200           0\n", "{socket}");
    }
    let answer = tokio::task::block_in_place(|| exchange(&p.socket("others"), &cmd("refused")));
    let want = format!("COMMAND refused: uid {uid} (gid {gid}) is not in commands_from_uids or commands_from_groups\n");
    assert_eq!(answer, format!("403 {:>11}\n{want}", want.len()));
    let line = tokio::task::block_in_place(|| p.log.wait_for("to others: refused"));
    assert!(line.contains(&format!("uid={uid}")), "{line}");
    let got = site.commands();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.iter().all(|c| !c.contains("refused")), "a refused command reached the site: {got:?}");
    tokio::task::block_in_place(|| p.stop());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_federated_query_is_logged_with_its_client_and_bytes() {
    let site = SimSite::start(SimConfig::tcp("s1")).await.expect("simulated site");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let text = format!(
        "socket_dir = \"{d}/s\"\nstate_file = \"{d}/state.json\"\nspool_dir = \"{d}/spool\"\n\
         [defaults]\nslow_query_threshold = \"50ms\"\n\
         [[site]]\nname = \"a\"\naddress = \"{addr}\"\n[[site]]\nname = \"b\"\naddress = \"{addr}\"\n\
         [[federation]]\nname = \"all\"\n",
        addr = site.address()
    );
    let mut p = tokio::task::block_in_place(|| ProxyProcess::start_text(dir.path(), &text, 2));
    site.set_knobs(|k| {
        k.delay = Duration::from_millis(120);
        k.fault_table = Some("hosts".into());
    });
    let q = "GET hosts\nColumns: name\nFilter: name = host-0003\nAuthUser: alice\n\n";
    let answer = tokio::task::block_in_place(|| exchange(&p.socket("all"), q));
    assert_eq!(answer, "host-0003\nhost-0003\n");
    let line = tokio::task::block_in_place(|| p.log.wait_for("slow query: GET hosts took"));
    let (uid, gid, _) = me();
    assert!(line.contains("federation all"), "{line}");
    assert!(line.contains(&format!("uid={uid} gid={gid} pid={}", std::process::id())), "{line}");
    assert!(line.contains(", 20 bytes, ") && line.contains("(Columns, Filter, AuthUser)"), "{line}");
    assert!(!line.contains("alice"), "{line}");
    tokio::task::block_in_place(|| p.stop());
}
