#!/usr/bin/env bash
# package-test.sh - build livemux's Debian package (scripts/package.sh) and
# use it as an operator would, on this machine: its contents and control
# data (dpkg-deb), `dpkg -i`, the installed default configuration through
# `livemux check-config` and a start as the user livemux, the installed unit
# through `systemd-analyze verify`, the man pages through `man -l`, the
# completions in bash, zsh and fish, the installed binary in the
# foreground in front of a simulated site, answering a query; then an
# upgrade over a modified configuration, `apt-get remove` (configuration,
# state and user stay), `apt-get purge` (nothing of the package is left:
# the file tree is compared with the one before the install).
#
# Needs root (dpkg) and Debian; installs and purges the package `livemux`,
# and refuses to run when it is installed already. Where it cannot run it
# fails when CI is set and says SKIPPED otherwise. .ci/run calls it after
# the test suite; the last line is `package-test: N passed, N failed`.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

passed=0
say() { printf 'package-test: %s\n' "$*" >&2; }
ok() { passed=$((passed + 1)); printf 'ok %d - %s\n' "$passed" "$*"; }
fail() {
    say "FAILED: $*"
    echo "package-test: $passed passed, 1 failed"
    exit 1
}
cannot_run() {
    [ -z "${CI:-}" ] || fail "cannot run here, and CI is set: $*"
    echo "SKIPPED package-test: $*"
    exit 0
}

[ "$(id -u)" -eq 0 ] || cannot_run "needs root to install the package (sudo scripts/package-test.sh)"
command -v dpkg-deb >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 || cannot_run "needs dpkg and apt (Debian)"
command -v cargo-deb >/dev/null 2>&1 || cannot_run "cargo-deb is missing (scripts/install-test-deps.sh installs it)"
if dpkg-query -W -f='${db:Status-Abbrev}' livemux 2>/dev/null | grep -q '^.[^n]'; then
    cannot_run "the package livemux is installed already; this test would replace and purge it"
fi

# The package's directories, present without it: a daemon run by hand (or
# by a test) made them. The purge would remove them, so here they are in
# the way: elsewhere the test does not run; in CI (a machine for this run)
# they are moved aside for the test and put back after it.
leftovers=()
for d in /etc/livemux /var/lib/livemux /run/livemux; do
    [ ! -e $d ] || leftovers+=("$d")
done
[ ${#leftovers[@]} -eq 0 ] || [ -n "${CI:-}" ] ||
    cannot_run "present without the package: ${leftovers[*]} (made by a livemux run by hand or a test?); the purge would remove it"

work=$(mktemp -d /tmp/livemux-package-test.XXXXXX)
chmod 755 "$work"
pids=()
installed=0
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ $installed -eq 1 ]; then
        dpkg --purge livemux >/dev/null 2>&1 || say "cleanup: dpkg --purge livemux failed"
    fi
    local kept=0
    for d in "${leftovers[@]}"; do
        [ ! -e "$work/aside$d" ] || mv "$work/aside$d" "$d" || { say "cleanup: $d is left in $work/aside$d"; kept=1; }
    done
    [ $kept -eq 1 ] || rm -rf "$work"
}
trap cleanup EXIT
for d in "${leftovers[@]}"; do
    say "$d exists without the package: moved aside for the test ($(find "$d" | head -n 5 | tr '\n' ' '))"
    mkdir -p "$work/aside$(dirname "$d")"
    mv "$d" "$work/aside$d"
done

# Wait (at most $3 seconds) until file $1 has a line matching $2.
wait_for_line() {
    local deadline=$((SECONDS + $3))
    until grep -q -- "$2" "$1" 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || fail "no line '$2' in $1 within $3 s: $(cat "$1")"
        sleep 0.1
    done
}

# The names under the trees a package touches, less what changes on its
# own (dpkg's and apt's bookkeeping, caches, logs, backups of passwd files).
tree() {
    find /etc /usr /var /run -xdev 2>/dev/null |
        grep -Ev '^/var/(lib/dpkg|lib/apt|cache|log|backups|tmp)(/|$)|^/etc/(passwd|group|shadow|gshadow)-$|^/etc/\.pwd\.lock$|^/run/(lock|user|utmp)' |
        sort
}

# === the package ===
deb=$(scripts/package.sh | tail -n 1)
[ -f "$deb" ] || fail "scripts/package.sh printed no package"
ok "scripts/package.sh built $(basename "$deb") ($(du -k "$deb" | cut -f1) KiB)"

contents=$(dpkg-deb -c "$deb" | awk '{print $6}')
for f in ./usr/bin/livemux ./etc/livemux/livemux.toml ./usr/lib/systemd/system/livemux.service \
    ./usr/lib/sysusers.d/livemux.conf ./usr/share/man/man1/livemux.1.gz ./usr/share/man/man1/livemux-run.1.gz \
    ./usr/share/man/man1/livemux-check-config.1.gz ./usr/share/bash-completion/completions/livemux \
    ./usr/share/zsh/vendor-completions/_livemux ./usr/share/fish/vendor_completions.d/livemux.fish \
    ./usr/share/livemux/grafana-dashboard.json ./usr/share/livemux/prometheus-alerts.yml \
    ./usr/share/doc/livemux/copyright ./usr/share/doc/livemux/CONFIGURATION.md; do
    grep -qxF "$f" <<<"$contents" || fail "$f is not in the package: $contents"
done
ok "dpkg-deb -c: binary, unit, default configuration, sysusers.d, man pages, completions, dashboard, alerts, docs"

dpkg-deb -e "$deb" "$work/control"
[ "$(cat "$work/control/conffiles")" = /etc/livemux/livemux.toml ] ||
    fail "conffiles is not exactly /etc/livemux/livemux.toml: $(cat "$work/control/conffiles")"
ok "dpkg-deb: /etc/livemux/livemux.toml is the conffile"

info=$(dpkg-deb -I "$deb")
depends=$(dpkg-deb -f "$deb" Depends)
grep -q '^ Package: livemux$' <<<"$info" || fail "Package: $info"
grep -q "^ Architecture: $(dpkg --print-architecture)$" <<<"$info" || fail "Architecture: $info"
# libc6 from the binary's symbols, and never newer than Debian 12's (2.36).
libc=$(grep -o 'libc6 (>= [^)]*)' <<<"$depends" | sed 's/libc6 (>= \(.*\))/\1/') || fail "no libc6 in Depends: $depends"
dpkg --compare-versions "$libc" le 2.36 || fail "needs libc6 $libc, newer than Debian 12's 2.36: $depends"
grep -qF 'systemd | systemd-standalone-sysusers | systemd-sysusers' <<<"$depends" ||
    fail "Depends lacks systemd-sysusers: $depends"
ok "dpkg-deb -I: Depends: $depends"

# The maintainer scripts: the user before the unit starts; an upgrade
# restarts the daemon once, after the new files are in place (postinst), and
# does not stop it before (prerm); remove stops it; purge removes the rest.
postinst=$work/control/postinst prerm=$work/control/prerm postrm=$work/control/postrm
grep -q 'systemd-sysusers.*livemux.conf' "$postinst" || fail "postinst runs no systemd-sysusers"
[ "$(grep -n 'systemd-sysusers' "$postinst" | head -1 | cut -d: -f1)" -lt "$(grep -n 'deb-systemd-invoke' "$postinst" | head -1 | cut -d: -f1)" ] ||
    fail "postinst starts the unit before it creates the user"
[ "$(grep -c 'deb-systemd-invoke' "$postinst")" -eq 1 ] && grep -q '_dh_action=restart' "$postinst" ||
    fail "postinst does not restart exactly once on upgrade: $(cat "$postinst")"
grep -q '"$1" = remove' "$prerm" && [ "$(grep -c 'deb-systemd-invoke stop' "$prerm")" -eq 1 ] ||
    fail "prerm stops the daemon on upgrade too: $(cat "$prerm")"
grep -q 'rm -rf /etc/livemux /var/lib/livemux /run/livemux' "$postrm" && grep -q 'userdel livemux' "$postrm" ||
    fail "postrm does not purge: $(cat "$postrm")"
ok "maintainer scripts: user first; upgrade restarts once (postinst), remove stops, purge removes the rest"

# === install ===
# The simulated site for the foreground run (built before the snapshot).
cargo build --locked -q -p livemux-simsite --bin livemux-simsite
sim=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/debug/livemux-simsite
tree >"$work/tree.before"
! getent passwd livemux >/dev/null || fail "a user livemux exists before the install"

installed=1
dpkg -i "$deb" >"$work/dpkg-i.log" 2>&1 || fail "dpkg -i: $(cat "$work/dpkg-i.log")"
dpkg-query -W -f='${db:Status-Abbrev}' livemux | grep -q '^ii' || fail "not installed after dpkg -i"
ok "dpkg -i $(basename "$deb")"

getent passwd livemux | grep -q ':/var/lib/livemux:/usr/sbin/nologin$' ||
    fail "no system user livemux: $(getent passwd livemux)"
getent group livemux >/dev/null || fail "no group livemux"
[ "$(id -u livemux)" -lt 1000 ] || fail "livemux is not a system user: uid $(id -u livemux)"
[ -L /etc/systemd/system/multi-user.target.wants/livemux.service ] || fail "the unit is not enabled"
ok "user and group livemux (uid $(id -u livemux)); the unit is enabled"

version=$(/usr/bin/livemux --version)
grep -qE '^livemux [0-9.]+ .*features: none\)$' <<<"$version" || fail "livemux --version: $version"
ok "livemux --version: $version"

out=$(livemux check-config --config /etc/livemux/livemux.toml 2>&1) || fail "check-config: $out"
[ "$out" = "/etc/livemux/livemux.toml: OK (no [[site]]: the daemon starts and serves nothing)" ] ||
    fail "check-config: $out"
ok "livemux check-config on the installed default configuration: $out"

out=$(systemd-analyze verify /usr/lib/systemd/system/livemux.service 2>&1) || fail "systemd-analyze verify: $out"
! grep -q 'livemux' <<<"$out" || fail "systemd-analyze verify: $out"
ok "systemd-analyze verify /usr/lib/systemd/system/livemux.service"

# The installed default configuration, as the unit runs it: user livemux,
# with the directories systemd makes (RuntimeDirectory=, StateDirectory=).
install -d -o livemux -g livemux -m 0750 /run/livemux /var/lib/livemux
setpriv --reuid=livemux --regid=livemux --init-groups /usr/bin/livemux run --config /etc/livemux/livemux.toml 2>"$work/default.log" &
pids+=($!)
wait_for_line "$work/default.log" 'nothing to serve' 30
grep -q 'add a \[\[site\]\] table' "$work/default.log" || fail "the log does not say what to add: $(cat "$work/default.log")"
kill -TERM "${pids[-1]}"
wait "${pids[-1]}" || fail "livemux run (default configuration) did not exit 0 on SIGTERM: $(cat "$work/default.log")"
unset 'pids[-1]'
ok "the default configuration starts as user livemux and says: $(grep -o 'no \[\[site\]\].*' "$work/default.log")"

# === man pages and completions ===
for page in /usr/share/man/man1/livemux*.1.gz; do
    text=$(MANWIDTH=80 man --warnings -l "$page" 2>"$work/man.err") || fail "man -l $page: $(cat "$work/man.err")"
    [ ! -s "$work/man.err" ] || fail "man -l $page warns: $(cat "$work/man.err")"
    grep -q 'livemux' <<<"$text" || fail "man -l $page: $text"
done
[ "$(man -w livemux)" = /usr/share/man/man1/livemux.1.gz ] || fail "man -w livemux: $(man -w livemux)"
text=$(MANWIDTH=80 man livemux 2>&1)
for word in check-config completions status; do grep -q "$word" <<<"$text" || fail "man livemux lacks $word"; done
ok "man -l renders $(ls /usr/share/man/man1/livemux*.1.gz | wc -l) pages without warnings; man livemux finds its page"

bash -n /usr/share/bash-completion/completions/livemux || fail "bash -n"
words=$(bash -c 'source /usr/share/bash-completion/completions/livemux
    COMP_WORDS=(livemux che); COMP_CWORD=1; COMP_LINE="livemux che"; COMP_POINT=${#COMP_LINE}
    _livemux livemux che livemux; printf "%s\n" "${COMPREPLY[@]}"')
[ "$words" = check-config ] || fail "bash completes 'livemux che' to: $words"
ok "bash: the completion loads (bash -n) and completes 'livemux che' to check-config"

command -v zsh >/dev/null 2>&1 || cannot_run "zsh is missing (scripts/install-test-deps.sh installs it)"
zsh -n /usr/share/zsh/vendor-completions/_livemux || fail "zsh -n"
out=$(zsh -fc 'autoload -Uz compinit && compinit -u -d /dev/null && print -r -- $_comps[livemux]' 2>&1)
[ "$out" = _livemux ] || fail "zsh: compinit does not find _livemux for livemux: $out"
ok "zsh: the completion loads (zsh -n) and compinit picks it up from its fpath"

command -v fish >/dev/null 2>&1 || cannot_run "fish is missing (scripts/install-test-deps.sh installs it)"
fish -n /usr/share/fish/vendor_completions.d/livemux.fish || fail "fish -n"
out=$(fish -c 'complete -C "livemux che"' 2>&1 | cut -f1)
[ "$out" = check-config ] || fail "fish completes 'livemux che' to: $out"
ok "fish: the completion loads (fish -n) and completes 'livemux che' to check-config"

# === the installed binary in the foreground, in front of a simulated site ===
"$sim" --name sim --listen tcp://127.0.0.1:0 >"$work/sim.out" 2>&1 &
pids+=($!)
wait_for_line "$work/sim.out" '^listening tcp://' 30
address=$(sed -n 's/^listening //p' "$work/sim.out")
mkdir -m 0750 "$work/run" && chown livemux:livemux "$work/run"
cat >"$work/livemux.toml" <<EOF
socket_dir = "$work/run/s"
state_file = "$work/run/state.json"
state_interval = "200ms"
[[site]]
name = "sim"
address = "$address"
EOF
out=$(livemux check-config --config "$work/livemux.toml") || fail "check-config: $out"
setpriv --reuid=livemux --regid=livemux --init-groups /usr/bin/livemux run --config "$work/livemux.toml" 2>"$work/run.log" &
pids+=($!)
wait_for_line "$work/run.log" 'site is ready' 30
out=$(livemux query --socket "$work/run/s/sim" 'GET hosts\nColumns: name\nLimit: 2' 2>&1) || fail "query: $out"
[ "$out" = $'host-0000\nhost-0001' ] || fail "query answered: $out"
# The state file says ready from its next write on (state_interval).
deadline=$((SECONDS + 30))
until out=$(livemux status --config "$work/livemux.toml"); do
    [ $SECONDS -lt $deadline ] || fail "livemux status does not say ready within 30 s: $out"
    sleep 0.1
done
grep -q '^sim  *ready' <<<"$out" || fail "status: $out"
kill -TERM "${pids[-1]}"
wait "${pids[-1]}" || fail "livemux run did not exit 0 on SIGTERM: $(cat "$work/run.log")"
unset 'pids[-1]'
[ ! -e "$work/run/s/sim" ] || fail "the socket is left after the daemon stopped"
ok "/usr/bin/livemux run (user livemux) in front of the simulated site answers 'GET hosts' and livemux status says ready"

# === upgrade, remove, purge ===
echo '# changed by the operator' >>/etc/livemux/livemux.toml
cargo deb --no-build --locked --strip -p livemux --deb-revision 2 --output "$work/" >"$work/deb2.log" 2>&1 ||
    fail "cargo deb (revision 2): $(cat "$work/deb2.log")"
dpkg -i "$work"/livemux_*-2_*.deb >"$work/dpkg-up.log" 2>&1 || fail "upgrade: $(cat "$work/dpkg-up.log")"
dpkg-query -W -f='${Version}' livemux | grep -q -- '-2$' || fail "the upgrade did not install revision 2"
tail -n 1 /etc/livemux/livemux.toml | grep -q 'changed by the operator' || fail "the upgrade replaced the changed configuration"
livemux check-config --config /etc/livemux/livemux.toml >/dev/null || fail "check-config after the upgrade"
ok "upgrade to revision 2 keeps the operator's configuration"

echo '{}' >/var/lib/livemux/state.json
files=$(dpkg -L livemux)
apt-get remove -y -q livemux >"$work/remove.log" 2>&1 || fail "apt-get remove: $(cat "$work/remove.log")"
[ ! -e /usr/bin/livemux ] || fail "/usr/bin/livemux is left after remove"
[ -f /etc/livemux/livemux.toml ] && [ -f /var/lib/livemux/state.json ] ||
    fail "remove took the configuration or the state"
getent passwd livemux >/dev/null || fail "remove took the user"
ok "apt-get remove: the binary goes; /etc/livemux, /var/lib/livemux and the user stay"

apt-get purge -y -q livemux >"$work/purge.log" 2>&1 || fail "apt-get purge: $(cat "$work/purge.log")"
installed=0
! dpkg-query -W -f='${db:Status-Abbrev}' livemux 2>/dev/null | grep -q '^.[^n]' || fail "still known to dpkg after purge"
left=$(while read -r f; do [ ! -e "$f" ] || [ -d "$f" ] || echo "$f"; done <<<"$files")
[ -z "$left" ] || fail "files of the package left after purge: $left"
! getent passwd livemux >/dev/null && ! getent group livemux >/dev/null || fail "the user or group livemux is left"
tree >"$work/tree.after"
diff "$work/tree.before" "$work/tree.after" >"$work/tree.diff" || fail "left behind or removed by the package: $(cat "$work/tree.diff")"
ok "apt-get purge: no file of the package, no user or group, and the file tree as before the install"

echo "package-test: $passed passed, 0 failed"
