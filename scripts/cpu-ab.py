#!/usr/bin/env python3
"""cpu-ab.py - livemux builds (and HAProxy) side by side in front of one
simulated site: alternating runs of livemux-load, medians of the proxy's
user and kernel CPU time per query (from /proc), p50 and rate. An A/B of two
builds, or of one build with different worker_threads, on a machine whose
speed moves: every peer sees the same minutes.

  scripts/cpu-ab.py target/release/livemux OLD/livemux
  scripts/cpu-ab.py target/release/livemux@1 target/release/livemux@2 --haproxy
  scripts/cpu-ab.py target/release/livemux --haproxy --hap-threads 1 --pin

BIN@N runs BIN with worker_threads = N. --pin puts the proxies on CPU 0 and
the site and the load generator on CPU 1. Modes: N keep-alive clients, or
cpqN (N clients, a new connection per query). Needs a release build
(cargo build --release --workspace) and, for --haproxy, haproxy.
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bins", nargs="+", help="livemux binaries, BIN or BIN@worker_threads")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secs", type=float, default=2)
    ap.add_argument("--modes", default="1,16,64,cpq16")
    ap.add_argument("--haproxy", action="store_true", help="HAProxy (TCP mode) beside them")
    ap.add_argument("--hap-threads", type=int, default=0, help="HAProxy's nbthread (default: its own)")
    ap.add_argument("--pin", action="store_true", help="proxies on CPU 0, site and load on CPU 1")
    ap.add_argument("--defaults", default="", help="TOML lines for livemux's [defaults]")
    a = ap.parse_args()
    p0 = ["taskset", "-c", "0"] if a.pin else []
    p1 = ["taskset", "-c", "1"] if a.pin else []
    work = tempfile.mkdtemp(prefix="cpuab", dir="/tmp")
    procs = []

    def wait(cond, t=60):
        end = time.time() + t
        while not cond():
            if time.time() > end:
                raise SystemExit("timed out starting the peers")
            time.sleep(0.05)

    try:
        sim = subprocess.Popen(p1 + [f"{REL}/livemux-simsite", "--count", "1"], stdout=open(f"{work}/sim.out", "w"),
                               stderr=subprocess.DEVNULL)
        procs.append(sim)
        wait(lambda: "listening" in open(f"{work}/sim.out").read())
        addr = open(f"{work}/sim.out").read().split("listening")[1].split()[0]
        peers = []
        for i, spec in enumerate(a.bins):
            path, threads = (spec.rsplit("@", 1) + ["1"])[:2] if "@" in spec else (spec, "1")
            d = f"{work}/lm{i}"
            os.makedirs(d)
            with open(f"{d}/c.toml", "w") as f:
                f.write(f'socket_dir = "{d}/s"\nstate_file = "{d}/state.json"\nspool_dir = "{d}/spool"\n'
                        f'worker_threads = {threads}\n[defaults]\nquery_timeout = "300s"\nmax_clients = 100000\n'
                        f'{a.defaults}\n[[site]]\nname = "a"\naddress = "{addr}"\n')
            p = subprocess.Popen(p0 + [os.path.abspath(path), "run", "--config", f"{d}/c.toml"],
                                 stdout=subprocess.DEVNULL, stderr=open(f"{d}/err", "w"))
            procs.append(p)
            wait(lambda: "site is ready" in open(f"{d}/err").read())
            peers.append((f"{spec}", p, f"unix:{d}/s/a"))
        if a.haproxy:
            d = f"{work}/hap"
            os.makedirs(d)
            nb = f"  nbthread {a.hap_threads}\n" if a.hap_threads else ""
            with open(f"{d}/h.cfg", "w") as f:
                f.write(f"global\n  maxconn 9000\n{nb}defaults\n  mode tcp\n  timeout connect 5s\n"
                        f"  timeout client 300s\n  timeout server 300s\nlisten a\n  bind unix@{d}/a mode 660\n"
                        f"  server s {addr.replace('tcp://', '')}\n")
            p = subprocess.Popen(p0 + ["haproxy", "-f", f"{d}/h.cfg", "-db"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            procs.append(p)
            wait(lambda: os.path.exists(f"{d}/a"))
            peers.append(("haproxy", p, f"unix:{d}/a"))

        def cpu(pid):
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            return int(f[11]), int(f[12])

        res = {}
        tick = os.sysconf("SC_CLK_TCK")
        for r in range(a.rounds):
            for mode in a.modes.split(","):
                for name, p, target in (peers if r % 2 == 0 else peers[::-1]):
                    cpq = mode.startswith("cpq")
                    clients = int(mode[3:] if cpq else mode)
                    u0, s0 = cpu(p.pid)
                    out = subprocess.run(p1 + [f"{REL}/livemux-load", "--target", target, "--clients", str(clients),
                                               "--duration", f"{a.secs}s", "--warmup", "0s"] +
                                         (["--connect-per-query"] if cpq else []), capture_output=True, text=True).stdout
                    u1, s1 = cpu(p.pid)
                    j = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
                    n = max(j["requests"], 1)
                    res.setdefault((mode, name), []).append(
                        ((u1 - u0) / tick * 1e6 / n, (s1 - s0) / tick * 1e6 / n, j["p50_us"], j["rate"]))
        for mode in a.modes.split(","):
            for name, _, _ in peers:
                v = res[(mode, name)]

                def med(k):
                    return statistics.median(x[k] for x in v)

                print(f"{mode:>6}  {name:<36} user {med(0):6.1f}  kernel {med(1):6.1f}  total {med(0) + med(1):6.1f} µs"
                      f"/query  p50 {med(2):6.0f} µs  {med(3):8.0f}/s", flush=True)
    finally:
        for p in procs:
            p.terminate()


if __name__ == "__main__":
    main()
