#!/usr/bin/env bash
# bench-icinga-qps.sh - queries/s of ONE client against a real Icinga 2 site:
# direct (TCP and UNIX) and through livemux (UNIX socket in front, pooled TCP
# channels to Icinga 2). Shows whether livemux's TCP channels suffer Icinga's
# 40 ms Nagle/delayed-ACK stall (they must not).
#
#   scripts/bench-icinga-qps.sh [SECONDS]      (default 5 s per row)
#
# Prints a Markdown table on stdout; progress on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
cargo build --release -q -p livemux -p livemux-load
work=$(mktemp -d /tmp/lmbench.XXXXXX)
lm_pid=""
cleanup() {
    [ -n "$lm_pid" ] && kill "$lm_pid" 2>/dev/null && wait "$lm_pid" 2>/dev/null
    scripts/icinga-site.sh stop --dir "$work/ic" || true
    rm -rf "$work"
}
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
scripts/icinga-site.sh start --dir "$work/ic" --port "$port" --hosts 1000 --services 10 >/dev/null
cat >"$work/livemux.toml" <<TOML
socket_dir = "$work/s"
state_file = "$work/state.json"
[[site]]
name = "ic"
address = "tcp://127.0.0.1:$port"
channels = 2
TOML
target/release/livemux run --config "$work/livemux.toml" 2>"$work/livemux.log" &
lm_pid=$!
for _ in $(seq 100); do
    target/release/livemux query --socket "$work/s/ic" 'GET status\nColumns: num_hosts' >/dev/null 2>&1 && break
    sleep 0.1
done
q='GET status\nColumns: program_version'
row() {
    local label=$1; shift
    local json
    json=$(target/release/livemux-load --duration "${secs}s" --query "$q" --label "$label" "$@" | tail -n1)
    python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print("| %s | %.0f | %.2f | %.2f | %d |" % (j["label"], j["rate"], j["p50_us"]/1000, j["p99_us"]/1000, j["errors"]))' "$json"
    echo "done: $label" >&2
}
echo "| path (1 client, \`GET status\` / \`Columns: program_version\`) | queries/s | p50 ms | p99 ms | errors |"
echo "|---|---:|---:|---:|---:|"
row "direct TCP, keep-alive" --target "tcp:127.0.0.1:$port"
row "direct TCP, keep-alive + client QUICKACK" --target "tcp:127.0.0.1:$port" --quickack
row "direct UNIX, keep-alive" --target "unix:$work/ic/live"
row "direct TCP, new connection per query" --target "tcp:127.0.0.1:$port" --connect-per-query
row "livemux (TCP channels), keep-alive" --target "unix:$work/s/ic"
row "livemux (TCP channels), new connection per query" --target "unix:$work/s/ic" --connect-per-query
