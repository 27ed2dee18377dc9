#!/usr/bin/env bash
# bench-large.sh - a 1 GiB answer through livemux against the same answer read
# directly from the simulated site, side by side in one run, for both relay
# modes (spool: default budgets; streaming: budgets 0), with the proxy's peak
# RSS (VmHWM) in each mode. One fast client, release build.
#
#   scripts/bench-large.sh [SECONDS]      (default 10 s per row)
#
# Prints a Markdown table on stdout; progress on stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
size=$((1 << 30))
cargo build --release -q -p livemux -p livemux-load -p livemux-simsite
work=$(mktemp -d /tmp/lmlarge.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

target/release/livemux-simsite --knob "bulk_bytes=$size" >"$work/sim.out" &
pids+=($!)
for _ in $(seq 100); do grep -q listening "$work/sim.out" 2>/dev/null && break; sleep 0.05; done
addr=$(sed -n 's/^listening tcp:\/\///p' "$work/sim.out")
[ -n "$addr" ] || { echo "simulated site did not start" >&2; exit 1; }

peak() { awk '/^VmHWM:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
row() {   # label target
    local json
    json=$(target/release/livemux-load --target "$2" --query 'GET bulk' --duration "${secs}s" --warmup 0s --label "$1" | tail -n1)
    python3 -c 'import json,sys; j=json.loads(sys.argv[1]); print("%s|%.0f|%d|%d" % (j["label"], j["mb_per_s"], j["requests"], j["errors"]))' "$json"
    echo "done: $1" >&2
}

declare -A result
direct=$(row "direct from the simulated site" "tcp:$addr")
echo "| path (1 client, 1 GiB answer) | MB/s | answers | ratio to direct | livemux peak RSS (MiB) |"
echo "|---|---:|---:|---:|---:|"
IFS='|' read -r dlabel drate dq derr <<<"$direct"
echo "| $dlabel | $drate | $dq | 1.00 | - |"
for mode in spool streaming; do
    dir="$work/$mode"
    mkdir -p "$dir"
    extra=""
    [ "$mode" = streaming ] && extra=$'spool_memory_per_response = 0\nspool_memory_budget = 0\nspool_disk_budget = 0'
    cat >"$dir/livemux.toml" <<TOML
socket_dir = "$dir/s"
state_file = "$dir/state.json"
spool_dir = "$dir/spool"
$extra
[defaults]
query_timeout = "300s"
[[site]]
name = "sim"
address = "tcp://$addr"
TOML
    target/release/livemux run --config "$dir/livemux.toml" 2>"$dir/livemux.log" &
    lm=$!
    pids+=($lm)
    for _ in $(seq 100); do grep -q "site is ready" "$dir/livemux.log" && break; sleep 0.05; done
    r=$(row "livemux, $mode mode" "unix:$dir/s/sim")
    IFS='|' read -r label rate q err <<<"$r"
    ratio=$(python3 -c "print('%.2f' % ($rate / $drate))")
    echo "| $label | $rate | $q | $ratio | $(peak $lm) |"
    kill "$lm"; wait "$lm" 2>/dev/null || true
done
