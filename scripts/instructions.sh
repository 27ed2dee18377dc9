#!/usr/bin/env bash
# instructions.sh - user-space instructions per query of livemux builds
# (valgrind --tool=callgrind): each BIN in front of one simulated site, one
# client, 1 s of warm-up, counters zeroed, 3 s of queries, counters dumped.
# Instructions do not move with the machine's load, so two builds compare
# exactly. Modes: ka (keep-alive), cpq (a connection per query).
#
#   scripts/instructions.sh target/release/livemux OLD/livemux
#   MODES=ka scripts/instructions.sh target/release/livemux
#
# Needs valgrind and a release build (cargo build --release --workspace).
set -euo pipefail
REL="$(cd "$(dirname "$0")/.." && pwd)/target/release"
MODES=${MODES:-ka cpq}
W=$(mktemp -d /tmp/instr.XXXX)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$W"' EXIT
"$REL/livemux-simsite" --count 1 > "$W/sim.out" 2>/dev/null &
for _ in $(seq 100); do grep -q listening "$W/sim.out" && break; sleep 0.1; done
ADDR=$(awk '/listening/ {print $2}' "$W/sim.out")
for BIN in "$@"; do
    D=$(mktemp -d "$W/lm.XXXX")
    printf 'socket_dir = "%s/s"\nstate_file = "%s/state.json"\nspool_dir = "%s/spool"\n[defaults]\nheartbeat_interval = "1h"\nquery_timeout = "2h"\n[[site]]\nname = "a"\naddress = "%s"\n' \
        "$D" "$D" "$D" "$ADDR" > "$D/c.toml"
    valgrind --tool=callgrind --callgrind-out-file="$D/cg.%p" "$BIN" run --config "$D/c.toml" > /dev/null 2> "$D/err" &
    P=$!
    for _ in $(seq 300); do grep -q "site is ready" "$D/err" && break; sleep 0.1; done
    line="$(basename "$BIN")"
    for MODE in $MODES; do
        X=""
        [ "$MODE" = cpq ] && X=--connect-per-query
        "$REL/livemux-load" --target "unix:$D/s/a" --duration 1s --warmup 0s $X > /dev/null
        callgrind_control -z $P > /dev/null
        N=$("$REL/livemux-load" --target "unix:$D/s/a" --duration 3s --warmup 0s $X | grep -o '"requests":[0-9]*' | cut -d: -f2)
        rm -f "$D"/cg.*.*
        callgrind_control -d $P > /dev/null
        sleep 0.5
        T=$(callgrind_annotate --auto=no "$(ls "$D"/cg.*.* | head -1)" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
        line="$line  $MODE $((T / N)) instructions/query ($N queries)"
    done
    kill $P; wait $P 2>/dev/null || true
    echo "$line"
done
