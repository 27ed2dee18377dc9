//! Private network namespaces and nftables for fault-injection tests.
//!
//! [`in_netns`] runs a test body on a thread of its own that first moves
//! into a new network namespace (only its loopback, nothing can leave it)
//! and then builds the runtime, so every thread, socket and process the body
//! creates is inside. The namespace dies with its threads.
//!
//! These tests need root. Elsewhere they say why they skip (see
//! `super::skip`; where `CI` is set they fail instead); as
//! root, a missing `nft` or a refused namespace is a failure (CI installs
//! nftables and runs as root).

use std::future::Future;
use std::io::Write;
use std::process::{Command, Stdio};

/// Run `body` inside a fresh network namespace, or skip with a reason.
pub fn in_netns<F, Fut>(name: &str, body: F)
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    if !nix::unistd::geteuid().is_root() {
        super::skip(name, "needs root for a private network namespace and nftables");
        return;
    }
    let handle = std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET) as root");
        run("ip", &["link", "set", "lo", "up"]);
        let nft = Command::new("nft").arg("--version").output();
        assert!(
            nft.is_ok_and(|o| o.status.success()),
            "nft is missing: install nftables (scripts/install-test-deps.sh does)"
        );
        // Threads created from here on (runtime workers, blocking pool,
        // child processes) inherit this thread's namespace.
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        rt.block_on(body());
    });
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

/// Run a command in the current (namespaced) thread; panic on failure.
pub fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Load nftables rules.
pub fn nft(rules: &str) {
    let mut child =
        Command::new("nft").args(["-f", "-"]).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("nft");
    child.stdin.take().expect("stdin").write_all(rules.as_bytes()).expect("write rules");
    let out = child.wait_with_output().expect("nft");
    assert!(out.status.success(), "nft rejected:\n{rules}\n{}", String::from_utf8_lossy(&out.stderr));
}

/// Drop every packet to or from local TCP port `port` at the input hook:
/// the peer on that port vanishes without a FIN or RST.
pub fn drop_port(table: &str, port: u16) {
    nft(&format!(
        "table inet {table} {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    \
         tcp sport {port} drop\n    tcp dport {port} drop\n  }}\n}}\n"
    ));
}

/// Remove a table added by [`drop_port`] or [`nft`].
pub fn lift(table: &str) {
    run("nft", &["delete", "table", "inet", table]);
}
