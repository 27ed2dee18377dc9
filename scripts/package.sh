#!/usr/bin/env bash
# package.sh - build livemux's Debian package: the daemon (release profile,
# without the demo feature), its man pages and shell completions made by
# that binary (`livemux man`, `livemux completions`), then cargo-deb with
# the [package.metadata.deb] of Cargo.toml. Prints the .deb's path as its
# last line. Needs cargo-deb (`cargo install --locked cargo-deb`;
# scripts/install-test-deps.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf 'package: %s\n' "$*" >&2; }

command -v cargo-deb >/dev/null 2>&1 ||
    { say "cargo-deb is missing: cargo install --locked cargo-deb (or scripts/install-test-deps.sh)"; exit 1; }
target=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')

say "building target/release/livemux without default features"
cargo build --release --locked --no-default-features -p livemux --bin livemux >&2
bin="$target/release/livemux"
# cargo-deb's asset paths `target/release/package/...` (Cargo.toml) mean this.
gen="$target/release/package"
rm -rf "$gen"
mkdir -p "$gen/man" "$gen/completions"
"$bin" man --dir "$gen/man"
# Compressed as Debian policy asks (cargo-deb leaves built assets alone).
gzip -9n "$gen"/man/*.1
"$bin" completions bash >"$gen/completions/livemux.bash"
"$bin" completions zsh >"$gen/completions/_livemux"
"$bin" completions fish >"$gen/completions/livemux.fish"

say "$("$bin" --version)"
mkdir -p "$target/debian"
cargo deb --no-build --locked --strip -p livemux --output "$target/debian/" >&2
version=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"] == "livemux"))')
deb="$target/debian/livemux_${version}-1_$(dpkg --print-architecture).deb"
[ -f "$deb" ] || { say "cargo-deb did not write $deb"; exit 1; }
echo "$deb"
