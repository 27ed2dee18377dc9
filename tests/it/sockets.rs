//! The UNIX sockets' mode and group (`socket_mode`, `socket_group`): set
//! when a site's or a federation's socket is bound, changed in place by a
//! reload. Giving a file another group takes root (or membership of the
//! group): elsewhere these tests say why they skip, and fail where `CI`
//! is set.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use livemux::config::Config;
use livemux::site::SiteState;

use crate::support::*;

/// Mode bits and group of a file.
fn mode_and_group(path: &Path) -> (u32, u32) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.mode() & 0o7777, m.gid())
}

/// The configuration file's text: site `s1` at `address` with `site`
/// lines, a federation `all` with `fed` lines.
fn text(dir: &Path, address: &str, site: &str, fed: &str) -> String {
    format!(
        "socket_dir = \"{d}/s\"\nstate_file = \"{d}/state.json\"\nspool_dir = \"{d}/spool\"\n\
         [[site]]\nname = \"s1\"\naddress = \"{address}\"\n{site}\n[[federation]]\nname = \"all\"\n{fed}\n",
        d = dir.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_get_their_mode_and_group_at_bind_and_a_reload_changes_them_in_place() {
    const TEST: &str = "sockets::sockets_get_their_mode_and_group_at_bind_and_a_reload_changes_them_in_place";
    if !nix::unistd::geteuid().is_root() {
        skip(TEST, "needs root to give the socket files a group livemux's user is not in");
        return;
    }
    // A group every Linux distribution has, by name; and a number no group
    // need have (used as it is, as chown does).
    let daemon = nix::unistd::Group::from_name("daemon").unwrap().expect("group daemon").gid.as_raw();
    let s = sim("s1").await;
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").unwrap();
    let config = |site: &str, fed: &str| {
        Config::from_toml(&text(dir.path(), &s.address(), site, fed)).unwrap_or_else(|e| panic!("{e}"))
    };
    let first = config("socket_group = \"daemon\"\nsocket_mode = \"0640\"", "socket_group = 4242\nsocket_mode = 0o600");
    let second = config("socket_mode = \"0666\"\nallow_world_writable = true", "socket_group = \"daemon\"");
    let (site, fed) = (first.socket_path("s1"), first.socket_path("all"));
    let mut p = Proxy::start_config(dir, first).await;
    assert_eq!(mode_and_group(&site), (0o640, daemon));
    assert_eq!(mode_and_group(&fed), (0o600, 4242));
    p.wait_state("s1", SiteState::Ready).await;
    assert_eq!(query(&p, "s1", "GET status\nColumns: num_hosts").await, (200, "100\n".to_owned()));

    // A reload: the site's socket world-writable (allowed) in livemux's own
    // group again, the federation's for group daemon; the same files.
    let inode = |path: &Path| std::fs::metadata(path).unwrap().ino();
    let before = (inode(&site), inode(&fed));
    let report = p.app.as_mut().unwrap().reload(second.clone()).await;
    assert_eq!(report.changed, ["s1"], "{report}");
    assert_eq!(report.federations_changed, ["all"], "{report}");
    assert!(report.failed.is_empty() && report.needs_restart.is_empty(), "{report}");
    p.config = second;
    assert_eq!(mode_and_group(&site), (0o666, nix::unistd::getegid().as_raw()));
    assert_eq!(mode_and_group(&fed), (0o660, daemon));
    assert_eq!((inode(&site), inode(&fed)), before, "changed in place, not bound anew");
    assert_eq!(query(&p, "s1", "GET status\nColumns: num_hosts").await, (200, "100\n".to_owned()));

    // The files changed (their ctime with them) are still known as
    // livemux's own: they go at exit.
    p.shutdown().await;
    assert!(!site.exists() && !fed.exists(), "sockets removed at exit");
}

#[test]
fn check_config_names_an_unknown_group_and_a_world_writable_mode_with_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("livemux.toml");
    let site = "socket_group = \"no-such-group-lmx\"\nsocket_mode = \"0666\"";
    std::fs::write(&config, text(dir.path(), "tcp://127.0.0.1:1", site, "socket_mode = \"0642\"")).unwrap();
    let out = std::process::Command::new(crate::support::process::BIN)
        .args(["check-config", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let file = config.display();
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert_eq!(
        lines[0],
        format!(
            "livemux: {file}: line 7: site[1].socket_group: there is no group 'no-such-group-lmx' on this machine \
             (`getent group no-such-group-lmx` finds none)"
        )
    );
    assert!(
        lines[1].starts_with(&format!(
            "livemux: {file}: line 8: site[1].socket_mode: \"0666\" lets every local user connect to the socket"
        )),
        "{err}"
    );
    assert!(lines[2].starts_with(&format!("livemux: {file}: line 11: federation[1].socket_mode: \"0642\"")), "{err}");
}

#[test]
fn a_group_livemux_may_not_give_is_a_clear_start_error_and_leaves_no_socket_behind() {
    const TEST: &str = "sockets::a_group_livemux_may_not_give_is_a_clear_start_error_and_leaves_no_socket_behind";
    if !nix::unistd::geteuid().is_root() {
        skip(TEST, "needs root to start livemux as user nobody");
        return;
    }
    use std::os::unix::process::CommandExt;
    // livemux as nobody (not a member of group daemon: std drops root's
    // supplementary groups), in a directory of its own.
    let nobody = nix::unistd::User::from_name("nobody").unwrap().expect("user nobody");
    let daemon = nix::unistd::Group::from_name("daemon").unwrap().expect("group daemon").gid.as_raw();
    let dir = tempfile::Builder::new().prefix("lmx").tempdir_in("/tmp").unwrap();
    std::os::unix::fs::chown(dir.path(), Some(nobody.uid.as_raw()), Some(nobody.gid.as_raw())).unwrap();
    let config = dir.path().join("livemux.toml");
    std::fs::write(&config, text(dir.path(), "tcp://127.0.0.1:1", "socket_group = \"daemon\"", "")).unwrap();
    let out = std::process::Command::new(crate::support::process::BIN)
        .args(["run", "--config", config.to_str().unwrap()])
        .uid(nobody.uid.as_raw())
        .gid(nobody.gid.as_raw())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let socket = dir.path().join("s/s1");
    assert!(
        err.contains(&format!(
            "cannot give {} mode 0660 and group {daemon}: Operation not permitted (os error 1) (to give a socket a \
             group, livemux must run as root or be a member of that group)",
            socket.display()
        )),
        "{err}"
    );
    assert!(!socket.exists(), "no socket file left behind");
}
