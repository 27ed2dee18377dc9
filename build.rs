//! `livemux --version`: the version, the git commit it was built from and
//! the features compiled in, as `LIVEMUX_VERSION` for `src/main.rs`.
//!
//! The commit comes from `LIVEMUX_GIT_COMMIT` when set (a packager building
//! from a tarball), else from `git rev-parse` in a checkout; without either
//! the version names none. Nothing here fails the build: no git, no
//! checkout or a broken one only leave the commit out.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LIVEMUX_GIT_COMMIT");
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".to_owned());
    let commit = match std::env::var("LIVEMUX_GIT_COMMIT") {
        Ok(c) if !c.trim().is_empty() => Some(c.trim().to_owned()),
        _ => git_commit(Path::new(&dir)),
    };
    // Cargo sets CARGO_FEATURE_<NAME> for each feature enabled.
    let mut features: Vec<String> = std::env::vars()
        .filter_map(|(k, _)| k.strip_prefix("CARGO_FEATURE_").map(|f| f.to_ascii_lowercase().replace('_', "-")))
        .filter(|f| f != "default")
        .collect();
    features.sort();
    let features = if features.is_empty() { "none".to_owned() } else { features.join(", ") };
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let text = match commit {
        Some(c) => format!("{version} (commit {c}; features: {features})"),
        None => format!("{version} (features: {features})"),
    };
    println!("cargo:rustc-env=LIVEMUX_VERSION={text}");
}

/// The short commit of HEAD in the checkout at `dir`, and the files whose
/// change means a new commit (HEAD, the branch's ref, packed refs) for
/// cargo to watch; `None` outside a checkout or without git.
fn git_commit(dir: &Path) -> Option<String> {
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").args(args).current_dir(dir).output().ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        (out.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    // In a worktree HEAD is per worktree and refs are shared: ask git
    // where each file is rather than assuming .git/.
    let mut watch = vec!["HEAD".to_owned(), "packed-refs".to_owned()];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch.push(branch);
    }
    for name in watch {
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", &name]) {
            // A path that does not exist would make cargo rerun this every build.
            if Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    Some(commit)
}
