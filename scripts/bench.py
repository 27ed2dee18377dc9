#!/usr/bin/env python3
"""bench.py - livemux's benchmark suite: livemux against direct connections
and HAProxy (TCP mode), side by side in one run, so every figure is compared
under the same machine conditions.

  scripts/bench.py            the whole suite (~10 min on 2 cores); rewrites
                              the results section of docs/BENCHMARKS.md
  scripts/bench.py --quick    short runs (< 2 min); prints the tables only
                              (CI runs this; no thresholds are applied)
  scripts/bench.py --only 1,2 --baseline OLD/livemux
                              an A/B: another build measured beside this
                              one, interleaved, in scenarios 1-3

Peers: "direct" (the client talks to the site itself: the physical limit),
"haproxy" (HAProxy from Debian in TCP mode, one UNIX-socket frontend per site
like livemux's), "livemux". Sites: the simulated site (livemux-simsite) and
real Icinga 2 and Naemon sites (scripts/icinga-site.sh, scripts/naemon-site.sh,
with the same objects). Each measurement reports rate,
p50, p99, and the proxy's CPU (percent of one core) and peak RSS (VmHWM,
reset before each measurement). Needs: cargo, haproxy, icinga2, a Naemon
build (all from scripts/install-test-deps.sh), python3.
"""

import argparse
import collections
import datetime
import json
import math
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
LIVEMUX = os.path.join(REL, "livemux")
LOAD = os.path.join(REL, "livemux-load")
SIM = os.path.join(REL, "livemux-simsite")
ICINGA = os.path.join(ROOT, "scripts", "icinga-site.sh")
NAEMON = os.path.join(ROOT, "scripts", "naemon-site.sh")
DOC = os.path.join(ROOT, "docs", "BENCHMARKS.md")
CHART3 = os.path.join(ROOT, "docs", "bench-scenario3.svg")
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"
SMALL = "GET status\\nColumns: program_version"
MIB = 1 << 20
NOFILE = 262144


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def wait_until(what, cond, timeout=120):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Proc:
    """A child process with its output in files, CPU time and memory."""

    def __init__(self, name, args, work):
        self.name = name
        self.out = os.path.join(work, f"{name}.out")
        self.err = os.path.join(work, f"{name}.err")
        with open(self.out, "w") as o, open(self.err, "w") as e:
            self.p = subprocess.Popen(args, stdout=o, stderr=e, stdin=subprocess.DEVNULL)
        self.pid = self.p.pid

    def text(self, which="out"):
        with open(self.out if which == "out" else self.err, errors="replace") as f:
            return f.read()

    def alive(self):
        return self.p.poll() is None

    def cpu(self):
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def status(self, key):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        return 0

    def reset_peak(self):
        with open(f"/proc/{self.pid}/clear_refs", "w") as f:
            f.write("5")

    def stop(self):
        if self.alive():
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


class Bench:
    def __init__(self, quick, secs=None, rounds=None, baseline=None):
        self.quick = quick
        self.work = tempfile.mkdtemp(prefix="lmbench", dir="/tmp")
        self.procs = []
        self.site_dirs = []
        self.secs = secs or (1.5 if quick else 5)
        self.rounds = rounds
        # A second livemux binary (say, the parent commit's) measured beside
        # this one as the peer "baseline" in scenarios 1-3: an A/B in one run.
        self.baseline = baseline
        self.charts = {}

    def close(self):
        for p in reversed(self.procs):
            p.stop()
        for script, d in self.site_dirs:
            subprocess.run([script, "stop", "--dir", d, "--fast"], capture_output=True)
        shutil.rmtree(self.work, ignore_errors=True)

    def proc(self, name, args):
        p = Proc(name, args, self.work)
        self.procs.append(p)
        return p

    def drop(self, p):
        p.stop()
        self.procs.remove(p)

    # === peers ===

    def sims(self, count, knobs=(), name="sim", hosts=None):
        args = [SIM, "--count", str(count), "--name", name]
        if hosts:
            args += ["--hosts", str(hosts)]
        for k in knobs:
            args += ["--knob", k]
        p = self.proc(f"{name}{len(self.procs)}", args)
        wait_until("simulated sites", lambda: p.text().count("listening") >= count or not p.alive())
        if not p.alive():
            raise RuntimeError(f"livemux-simsite failed: {p.text('err')}")
        addrs = [line.split()[1][len("tcp://"):] for line in p.text().splitlines() if line.startswith("listening")]
        return p, addrs

    def livemux(self, sites, channels=None, top="", tls_ca=None, defaults="", binary=None):
        """livemux in front of `sites`, with its defaults except `channels` when given (`binary`: another
        build, for an A/B)."""
        d = tempfile.mkdtemp(prefix="lm", dir=self.work)
        cfg = os.path.join(d, "livemux.toml")
        with open(cfg, "w") as f:
            f.write(f'socket_dir = "{d}/s"\nstate_file = "{d}/state.json"\nspool_dir = "{d}/spool"\n{top}\n')
            f.write(f'[defaults]\nquery_timeout = "300s"\nmax_clients = 100000\n{defaults}\n')
            if channels:
                f.write(f'channels = {channels}\n')
            for name, addr in sites:
                scheme = "tls" if tls_ca else "tcp"
                f.write(f'[[site]]\nname = "{name}"\naddress = "{scheme}://{addr}"\n')
                if tls_ca:
                    f.write(f'ca_file = "{tls_ca}"\n')
        p = self.proc(f"livemux{len(self.procs)}", [binary or LIVEMUX, "run", "--config", cfg])
        p.state_file = f"{d}/state.json"
        wait_until("livemux sites ready", lambda: p.text("err").count("site is ready") >= len(sites) or not p.alive(), 300)
        if not p.alive():
            raise RuntimeError(f"livemux failed: {p.text('err')[-2000:]}")
        return p, {name: f"unix:{d}/s/{name}" for name, _ in sites}

    def haproxy(self, sites, tls_ca=None):
        """HAProxy in TCP mode, a UNIX-socket frontend per site; with `tls_ca` it speaks TLS to the sites
        (verifying them, resuming sessions as it does by default)."""
        d = tempfile.mkdtemp(prefix="hap", dir=self.work)
        cfg = os.path.join(d, "haproxy.cfg")
        tls = f" ssl verify required ca-file {tls_ca} sni str(localhost)" if tls_ca else ""
        with open(cfg, "w") as f:
            f.write("global\n  maxconn 9000\ndefaults\n  mode tcp\n  timeout connect 5s\n"
                    "  timeout client 300s\n  timeout server 300s\n")
            for name, addr in sites:
                f.write(f"listen {name}\n  bind unix@{d}/{name} mode 660\n  server s {addr}{tls}\n")
        p = self.proc(f"haproxy{len(self.procs)}", ["haproxy", "-f", cfg, "-db"])
        wait_until("haproxy sockets", lambda: all(os.path.exists(f"{d}/{n}") for n, _ in sites) or not p.alive())
        if not p.alive():
            raise RuntimeError(f"haproxy failed: {p.text('err')}")
        return p, {name: f"unix:{d}/{name}" for name, _ in sites}

    def icinga(self, hosts=1000, services=10):
        return self.real_site(ICINGA, "ic", hosts, services)

    def naemon(self, hosts=1000, services=10):
        return self.real_site(NAEMON, "na", hosts, services)

    def real_site(self, script, prefix, hosts, services):
        d = tempfile.mkdtemp(prefix=prefix, dir=self.work)
        for _ in range(5):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            r = subprocess.run([script, "start", "--dir", d, "--port", str(port), "--hosts", str(hosts),
                                "--services", str(services)], capture_output=True, text=True)
            if r.returncode == 0:
                self.site_dirs.append((script, d))
                return f"127.0.0.1:{port}", f"{d}/live"
            if "could not bind" not in r.stderr:
                raise RuntimeError(f"{os.path.basename(script)} failed: {r.stderr[-2000:]}")
        raise RuntimeError(f"no free port for {os.path.basename(script)}")

    # === measurement ===

    def load_args(self, label, targets, query, clients, secs, extra, warmup):
        tf = tempfile.mktemp(prefix="targets", suffix=".txt", dir=self.work)
        with open(tf, "w") as f:
            f.write("\n".join(targets) + "\n")
        return [LOAD, "--label", label, "--query", query, "--clients", str(clients), "--duration", f"{secs}s",
                "--warmup", f"{warmup}s", "--targets-file", tf, *extra]

    def load(self, label, targets, query=SMALL, clients=1, secs=None, extra=(), proxy=None, warmup=0.3, beside=None):
        """One measurement; `beside` (load arguments) runs another load at the same time, whose result is
        returned in j["beside"]."""
        secs = secs or self.secs
        args = self.load_args(label, targets, query, clients, secs, extra, warmup)
        other = None
        if beside:
            other = subprocess.Popen(self.load_args(secs=secs, warmup=warmup, **beside), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        if proxy:
            proxy.reset_peak()
            cpu0, t0 = proxy.cpu(), time.monotonic()
        r = subprocess.run(args, capture_output=True, text=True, timeout=secs + 600)
        lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
        if not lines:
            raise RuntimeError(f"livemux-load failed: {r.stdout}{r.stderr}")
        j = json.loads(lines[-1])
        if other:
            out, err = other.communicate(timeout=secs + 600)
            olines = [l for l in out.splitlines() if l.startswith("{")]
            if not olines:
                raise RuntimeError(f"livemux-load (beside) failed: {out}{err}")
            j["beside"] = json.loads(olines[-1])
        if proxy:
            wall = time.monotonic() - t0
            j["cpu_pct"] = (proxy.cpu() - cpu0) / wall * 100
            j["peak_mib"] = proxy.status("VmHWM") / MIB
        log(f"{label}: {r.stdout.splitlines()[0].strip()}")
        return j


def fmt_us(us):
    return f"{us / 1000:.2f}" if us >= 1000 else f"{us / 1000:.3f}"


def row_cells(j):
    cpu = f"{j['cpu_pct']:.0f}%" if "cpu_pct" in j else "-"
    peak = f"{j['peak_mib']:.1f}" if "peak_mib" in j else "-"
    err = j.get("errors", 0)
    if j["requests"] == 0:
        never = f"> {j['seconds']:.1f} s"
        return ["0", never, never, cpu, peak, str(err)]
    return [f"{j['rate']:.0f}", fmt_us(j["p50_us"]), fmt_us(j["p99_us"]), cpu, peak, str(err)]


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


STD = ["rate/s", "p50 ms", "p99 ms", "proxy CPU", "proxy peak MiB", "errors"]


def scenario1(b, targets):
    """Small query, one keep-alive client: latency overhead over direct."""
    rows, text = [], []
    rounds = b.rounds or (1 if b.quick else 3)
    _, (addr,) = b.sims(1)
    hp, hs = b.haproxy([("sim", addr)])
    lm, ls = b.livemux([("sim", addr)])
    base = b.livemux([("sim", addr)], binary=b.baseline) if b.baseline else None
    sites = [("simulated site", addr, hs["sim"], ls["sim"], hp, lm, base and (base[1]["sim"], base[0]))]
    if not b.quick:
        for site_name, start in (("Icinga 2", b.icinga), ("Naemon", b.naemon)):
            addr2, _ = start()
            hp2, hs2 = b.haproxy([("rs", addr2)])
            lm2, ls2 = b.livemux([("rs", addr2)], channels=2)
            # No baseline beside a real core: its channels would take the
            # core's last worker threads (Icinga 2 serves 2 per CPU core).
            base2 = None
            sites.append((site_name, addr2, hs2["rs"], ls2["rs"], hp2, lm2, base2 and (base2[1]["rs"], base2[0])))
    for name, addr, hsock, lsock, hproc, lproc, base in sites:
        peers = [("haproxy", hsock, hproc), ("livemux", lsock, lproc)] + ([("baseline", *base)] if base else [])
        res = {"direct": []} | {p: [] for p, _, _ in peers}
        for _ in range(rounds):
            res["direct"].append(b.load(f"s1 {name} direct", [f"tcp:{addr}"], extra=["--quickack"]))
            for peer, sock, proc in peers:
                res[peer].append(b.load(f"s1 {name} {peer}", [sock], proxy=proc))
        if name != "simulated site":
            # What a client that does not re-arm quick ACKs gets from a real
            # core over TCP: the 40 ms delayed-ACK stall.
            j = b.load(f"s1 {name} direct, no quick-ACK", [f"tcp:{addr}"])
            rows.append([name, "direct (TCP, no quick-ACK: delayed-ACK stall)"] + row_cells(j))
        for peer, runs in res.items():
            j = min(runs, key=lambda r: abs(r["p50_us"] - statistics.median(x["p50_us"] for x in runs)))
            label = "direct (TCP, client quick-ACKs)" if peer == "direct" else peer
            rows.append([name, label] + row_cells(j))

        def overhead(peer):
            return statistics.median(l["p50_us"] - d["p50_us"] for l, d in zip(res[peer], res["direct"]))

        def cpu(peer):
            return statistics.median(cpu_per_query(j) for j in res[peer])

        over, hover = overhead("livemux"), overhead("haproxy")
        line = (f"{name}: p50 overhead over direct: livemux {over:.0f} µs, HAProxy {hover:.0f} µs; proxy CPU per "
                f"query: livemux {cpu('livemux'):.1f} µs, HAProxy {cpu('haproxy'):.1f} µs")
        if base:
            line += f"; baseline build: {overhead('baseline'):.0f} µs, {cpu('baseline'):.1f} µs CPU per query"
        text.append(line + f" (medians of {rounds} interleaved rounds)")
        targets.append((f"scenario 1: p50 overhead ≤ 30 µs over direct ({name})", f"{over:.0f} µs", over <= 30))
        targets.append((f"scenario 1: p50 overhead no more than HAProxy's in the same run ({name})",
                        f"{over:.0f} µs vs {hover:.0f} µs", over <= hover))
    return "### 1. Small query, one keep-alive client\n\n" + table(["site", "path"] + STD, rows) + "\n\n" + \
        "\n".join(f"- {t}" for t in text) + "\n"


def cpu_per_query(j):
    """The proxy's CPU time per answered query, µs."""
    return j["cpu_pct"] / 100 / max(j["rate"], 1e-9) * 1e6


def scenario2(b, targets):
    """Many keep-alive clients on one site, livemux with its defaults."""
    rows, res = [], {}
    _, (addr,) = b.sims(1)
    hp, hs = b.haproxy([("sim", addr)])
    lm, ls = b.livemux([("sim", addr)])
    peers = [("direct", f"tcp:{addr}", None), ("haproxy", hs["sim"], hp), ("livemux", ls["sim"], lm)]
    if b.baseline:
        bp, bs = b.livemux([("sim", addr)], binary=b.baseline)
        peers.append(("baseline", bs["sim"], bp))
    for clients in ([1, 64] if b.quick else [1, 16, 64]):
        for peer, target, proc in peers:
            j = b.load(f"s2 {peer} {clients}", [target], clients=clients, proxy=proc)
            res[(clients, peer)] = j
            per = f"{cpu_per_query(j):.1f}" if proc else "-"
            rows.append([str(clients), peer] + row_cells(j) + [per])
    for clients in (16, 64):
        if (clients, "livemux") not in res:
            continue
        lmj, hpj = res[(clients, "livemux")], res[(clients, "haproxy")]
        ratio = lmj["rate"] / max(hpj["rate"], 1e-9)
        targets.append((f"scenario 2, {clients} clients: livemux ≥ 1.0× HAProxy's rate", f"{ratio:.2f}×", ratio >= 1.0))
        lc, hc = cpu_per_query(lmj), cpu_per_query(hpj)
        targets.append((f"scenario 2, {clients} clients: livemux proxy CPU per query ≤ HAProxy's",
                        f"{lc:.1f} µs vs {hc:.1f} µs", lc <= hc))
    return ("### 2. Many keep-alive clients, one simulated site (no connection limit), livemux with its defaults\n\n" +
            table(["clients", "path"] + STD + ["proxy CPU µs/query"], rows) + "\n")


class SiteConnections:
    """While a measurement runs, samples the connections each site holds (established TCP connections on a
    site's port, accepted or still in its accept queue) and keeps the most seen at any one site."""

    def __init__(self, ports):
        self.ports = {int(p) for p in ports}
        self.most = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()

    def run(self):
        while not self.done.wait(0.5):
            out = subprocess.run(["ss", "-Htn", "state", "established"], capture_output=True, text=True).stdout
            counts = collections.Counter()
            for line in out.splitlines():
                f = line.split()
                if len(f) >= 4 and f[2].rsplit(":", 1)[-1].isdigit():
                    port = int(f[2].rsplit(":", 1)[1])
                    if port in self.ports:
                        counts[port] += 1
            if counts:
                self.most = max(self.most, max(counts.values()))


S3_WORKERS = 50
S3_SITE_SERVES = 20
S3_N = [1, 10, 50]
S3_PEERS = ["direct", "haproxy", "livemux"]


def scenario3(b, targets):
    """GUI pages: 50 workers, each page queries N sites at once; each site serves 20 connections at once."""
    if b.quick:
        points = [(1, "tcp", 10)]
    else:
        points = [(rtt, t, n) for rtt in (1, 20) for t in ("tcp", "tls") for n in S3_N]
    certs = make_certs(b.work) if any(t == "tls" for _, t, _ in points) else None
    res, rows = {}, []
    for rtt, transport in sorted({(r, t) for r, t, _ in points}):
        ns = [n for r, t, n in points if (r, t) == (rtt, transport)]
        knobs = [f"rtt_ms={rtt}", f"max_connections={S3_SITE_SERVES}"]
        if transport == "tls":
            knobs.append("tls_handshake_rtts=1")
        sp, addrs = b.sims(max(ns), knobs=knobs, name=f"gui{rtt}{transport}")
        ports = [a.rsplit(":", 1)[1] for a in addrs]
        names = [f"s{i}" for i in range(len(addrs))]
        started, site_procs = [sp], [sp]
        if transport == "tls":
            st, fronts = stunnels(b, addrs, certs)
            started.append(st)
            site_procs.append(st)
            direct = [f"tls:{a}" for a in fronts]
            direct_extra = ["--ca-file", certs["ca"], "--no-resumption"]
            fronts_or_addrs, ca = fronts, certs["ca"]
        else:
            direct = [f"tcp:{a}" for a in addrs]
            direct_extra = []
            fronts_or_addrs, ca = addrs, None
        hp, hs = b.haproxy(list(zip(names, fronts_or_addrs)), tls_ca=ca)
        started.append(hp)

        def start_livemux(binary):
            p, s = b.livemux(list(zip(names, fronts_or_addrs)), tls_ca=ca, binary=binary)
            return ([s[x] for x in names], [], p)

        # With a baseline build, each livemux runs only while it is measured:
        # the idle channels of two proxies would take every connection the
        # sites serve (20), and direct workers would get none.
        lazy = bool(b.baseline)
        lm = None if lazy else start_livemux(LIVEMUX)
        if lm:
            started.append(lm[2])
        peers = {"direct": (direct, direct_extra, None), "haproxy": ([hs[s] for s in names], [], hp), "livemux": lm}
        if lazy:
            peers["baseline"] = None
        for n in ns:
            for peer in peers:
                if peers[peer] is None:
                    tlist, extra, proc = start_livemux(LIVEMUX if peer == "livemux" else b.baseline)
                else:
                    tlist, extra, proc = peers[peer]
                site_cpu0, t0 = sum(p.cpu() for p in site_procs), time.monotonic()
                with SiteConnections(ports[:n]) as held:
                    j = b.load(f"s3 {rtt} ms {transport} N={n} {peer}", tlist[:n], clients=S3_WORKERS,
                               extra=["--fanout", *extra], proxy=proc, warmup=1)
                site_cpu = (sum(p.cpu() for p in site_procs) - site_cpu0) / (time.monotonic() - t0) * 100
                j["held"] = held.most
                # A page is N queries: the proxy's CPU per query.
                j["cpu_us_query"] = cpu_per_query(j) / n if proc else None
                res[(rtt, transport, n, peer)] = j
                per = f"{j['cpu_us_query']:.1f}" if proc else "-"
                rows.append([f"{rtt} ms", transport.upper(), str(n), peer] + row_cells(j) +
                            [per, str(held.most), f"{site_cpu:.0f}%"])
                if peers[peer] is None:
                    b.drop(proc)
        for p in reversed(started):
            b.drop(p)
    b.charts["scenario3"] = (res, sorted({(r, t) for r, t, _ in points}))
    s3_targets(res, targets)
    ratio_rows = []
    for (rtt, transport, n, peer), j in res.items():
        if peer != "livemux":
            continue
        limit = S3_WORKERS * 1000 / rtt
        d, h = res[(rtt, transport, n, "direct")], res[(rtt, transport, n, "haproxy")]
        ratio_rows.append([f"{rtt} ms", transport.upper(), str(n), f"{limit:,.0f}", f"{j['rate'] / limit:.2f}×",
                           f"{j['p50_us'] / 1000 / rtt:.2f}", f"{j['rate'] / max(d['rate'], 1e-9):.2f}×",
                           f"{j['rate'] / max(h['rate'], 1e-9):.2f}×"])
    return ("### 3. GUI pages: 50 workers, each page queries N sites at once\n\n"
            f"Each simulated site answers one round trip (RTT) after a request arrives, charges a new connection "
            f"one more (the TCP handshake; over TLS one more again, TLS 1.3's), and serves at most "
            f"{S3_SITE_SERVES} connections at once, as a real core does (Checkmk's default is 20): further "
            "connections wait in its accept queue. TLS: stunnel in front of each simulated site; a direct worker "
            "makes a full handshake per site per page (a GUI worker keeps no session cache), HAProxy makes one per "
            "client connection (resuming sessions), livemux keeps its TLS channels. livemux runs with its "
            "defaults. A page is one worker's fan-out: connect to N sites (or their proxy sockets), send one "
            "small query to each, read every answer, disconnect. *proxy CPU µs/query* is the proxy's CPU time "
            "(user and kernel) per query, a page being N queries. *held* is the most connections one site held "
            "at once (sampled every 0.5 s), the *physical limit* 50 workers / one round trip per page. *sites' "
            "CPU* is what the simulated sites (and stunnel, for TLS) used of this machine's 2 cores, which they "
            "share with the workers and the proxy; on a real installation that work runs on the sites' own "
            "machines.\n\n" +
            table(["RTT", "transport", "N sites", "path", "pages/s", "p50 ms", "p99 ms", "proxy CPU",
                   "proxy peak MiB", "errors", "proxy CPU µs/query", "site connections held", "sites' CPU"], rows) + "\n\n" +
            table(["RTT", "transport", "N sites", "physical limit pages/s", "livemux / limit", "livemux p50 in RTTs",
                   "livemux / direct", "livemux / HAProxy"], ratio_rows) + "\n\n" +
            "![Scenario 3: pages/s and p50 against N](bench-scenario3.svg)\n")


def s3_targets(res, targets):
    """The issue's targets for scenario 3, from the points measured."""
    def get(rtt, transport, n, peer):
        return res.get((rtt, transport, n, peer))

    for transport in ("tcp", "tls"):
        T = transport.upper()
        lm = [(n, get(20, transport, n, "livemux")) for n in (1, 10) if get(20, transport, n, "livemux")]
        if lm:
            limit = S3_WORKERS * 1000 / 20
            worst = min(j["rate"] / limit for _, j in lm)
            want = 0.85 if transport == "tcp" else 0.8
            targets.append((f"scenario 3, 20 ms, {T}, N = 1 and 10: livemux ≥ {want}× the physical limit",
                            f"{worst:.2f}× at worst", worst >= want))
            rtts = max(j["p50_us"] / 20000 for _, j in lm)
            targets.append((f"scenario 3, 20 ms, {T}, N = 1 and 10: livemux p50 ≤ 1.3 round trips",
                            f"{rtts:.2f} round trips at worst", rtts <= 1.3))
        want_1ms = 1.3 if transport == "tcp" else 1.0
        for rtt, want_d, want_h in ((20, 1.5, 1.5), (1, want_1ms, 1.5)):
            ratios = [(get(rtt, transport, n, "livemux")["rate"] / max(get(rtt, transport, n, "direct")["rate"], 1e-9),
                       get(rtt, transport, n, "livemux")["rate"] / max(get(rtt, transport, n, "haproxy")["rate"], 1e-9))
                      for n in S3_N if get(rtt, transport, n, "livemux")]
            if not ratios:
                continue
            wd, wh = min(r[0] for r in ratios), min(r[1] for r in ratios)
            targets.append((f"scenario 3, {rtt} ms, {T}, every N: livemux ≥ {want_d}× direct", f"{wd:.2f}× at worst",
                            wd >= want_d))
            targets.append((f"scenario 3, {rtt} ms, {T}, every N: livemux ≥ {want_h}× HAProxy", f"{wh:.2f}× at worst",
                            wh >= want_h))
        if transport == "tcp" and get(20, "tcp", 50, "livemux"):
            r = get(20, "tcp", 50, "livemux")["rate"] / max(get(20, "tcp", 50, "direct")["rate"], 1e-9)
            targets.append(("scenario 3, 20 ms, TCP, N = 50: livemux ≥ 2× direct", f"{r:.2f}×", r >= 2))
    cpu = [(j["cpu_us_query"], res[(rtt, t, n, "haproxy")]["cpu_us_query"], f"{rtt} ms {t.upper()} N = {n}")
           for (rtt, t, n, p), j in res.items() if p == "livemux" and (rtt, t, n, "haproxy") in res]
    if cpu:
        worst = max(cpu, key=lambda c: c[0] / max(c[1], 1e-9))
        targets.append(("scenario 3: livemux proxy CPU per query ≤ HAProxy's at every point",
                        f"{worst[0]:.1f} µs vs {worst[1]:.1f} µs at worst ({worst[2]})",
                        all(l <= h for l, h, _ in cpu)))
    held = max(j["held"] for (_, _, _, p), j in res.items() if p == "livemux")
    targets.append(("scenario 3: connections a site holds for livemux ≤ channels_max + 1 (11)", f"{held} at most",
                    held <= 11))


def svg_scenario3(res, combos, path):
    """The scenario 3 chart: per RTT and transport, pages/s and p50 against N for each peer (log scales),
    the physical limit drawn dashed."""
    colours = {"direct": "#7f7f7f", "haproxy": "#e07b00", "livemux": "#1f5fbf"}
    pw, ph, ml, mt, mb = 260, 200, 60, 40, 40
    cols = len(combos)
    width, height = ml + cols * (pw + 30), 2 * (ph + mt + mb) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{ml}" y="18" font-size="14">Scenario 3: 50 GUI workers, each page queries N sites '
           f'(each site serves {S3_SITE_SERVES} connections at once)</text>']
    xs = [math.log10(n) for n in S3_N]
    x0, x1 = min(xs) - 0.1, max(xs) + 0.1
    for row, (key, label, scale) in enumerate((("rate", "pages/s", 1), ("p50_us", "p50 ms", 1e-3))):
        for col, (rtt, transport) in enumerate(combos):
            left = ml + col * (pw + 30)
            top = 30 + row * (ph + mt + mb) + mt
            series = {p: [(n, res[(rtt, transport, n, p)][key] * scale) for n in S3_N
                          if (rtt, transport, n, p) in res and res[(rtt, transport, n, p)]["requests"] > 0]
                      for p in S3_PEERS}
            limit = S3_WORKERS * 1000 / rtt if key == "rate" else rtt
            vals = [v for s in series.values() for _, v in s if v > 0] + [limit]
            lo, hi = math.floor(math.log10(min(vals))), math.ceil(math.log10(max(vals)))
            if hi == lo:
                hi += 1

            def X(n):
                return left + (math.log10(n) - x0) / (x1 - x0) * pw

            def Y(v):
                return top + ph - (math.log10(v) - lo) / (hi - lo) * ph

            out.append(f'<text x="{left}" y="{top - 8}" font-size="12">{label}, RTT {rtt} ms, '
                       f'{transport.upper()}</text>')
            out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
            for d in range(lo, hi + 1):
                y = Y(10 ** d)
                out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
                out.append(f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{10 ** d:g}</text>')
            for n in S3_N:
                out.append(f'<text x="{X(n):.1f}" y="{top + ph + 14}" text-anchor="middle">{n}</text>')
            out.append(f'<text x="{left + pw / 2}" y="{top + ph + 28}" text-anchor="middle">N sites</text>')
            ly = Y(limit)
            what = "physical limit" if key == "rate" else "one round trip"
            out.append(f'<line x1="{left}" x2="{left + pw}" y1="{ly:.1f}" y2="{ly:.1f}" stroke="black" '
                       'stroke-dasharray="5,4"/>')
            out.append(f'<text x="{left + pw - 4}" y="{ly - 4:.1f}" text-anchor="end">{what}</text>')
            for peer, s in series.items():
                if not s:
                    continue
                pts = " ".join(f"{X(n):.1f},{Y(v):.1f}" for n, v in s if v > 0)
                out.append(f'<polyline points="{pts}" fill="none" stroke="{colours[peer]}" stroke-width="2"/>')
                for n, v in s:
                    if v > 0:
                        out.append(f'<circle cx="{X(n):.1f}" cy="{Y(v):.1f}" r="3" fill="{colours[peer]}"/>')
    for i, peer in enumerate(S3_PEERS):
        x = ml + i * 100
        out.append(f'<rect x="{x}" y="{height - 18}" width="12" height="4" fill="{colours[peer]}"/>')
        out.append(f'<text x="{x + 16}" y="{height - 12}">{peer}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def scenario4(b, targets):
    """Large answers to a fast and a slow client: throughput and peak RSS."""
    rows = []
    sizes = [100 * MIB] if b.quick else [100 * MIB, 1024 * MIB]
    stream_top = "spool_memory_per_response = 0\nspool_memory_budget = 0\nspool_disk_budget = 0"
    met = None
    for size in sizes:
        sp, (addr,) = b.sims(1, knobs=[f"bulk_bytes={size}"], name=f"bulk{size >> 20}")
        hp, hs = b.haproxy([("sim", addr)])
        lm, ls = b.livemux([("sim", addr)])
        lm2, ls2 = b.livemux([("sim", addr)], top=stream_top)
        speeds = [("fast", [])] if b.quick else [("fast", []), ("slow (pauses 10 ms per MiB)", ["--pause-every", str(MIB), "--pause", "10ms"])]
        for speed, extra in speeds:
            res = {}
            secs = max(b.secs, 3) if size <= 100 * MIB else (12 if speed == "fast" else 25)
            for peer, target, proc in [("direct", f"tcp:{addr}", None), ("haproxy", hs["sim"], hp),
                                       ("livemux (spool)", ls["sim"], lm), ("livemux (streaming)", ls2["sim"], lm2)]:
                j = b.load(f"s4 {size >> 20}MiB {speed} {peer}", [target], query="GET bulk", secs=secs,
                           extra=extra, proxy=proc, warmup=0)
                res[peer] = j
                cpu = f"{j['cpu_pct']:.0f}%" if "cpu_pct" in j else "-"
                peak = f"{j['peak_mib']:.1f}" if "peak_mib" in j else "-"
                rows.append([f"{size >> 20} MiB", speed, peer, f"{j['mb_per_s']:.0f}", str(j["requests"]), cpu, peak])
            if speed == "fast" and size == sizes[-1]:
                ratio = res["livemux (streaming)"]["mb_per_s"] / max(res["direct"]["mb_per_s"], 1e-9)
                peak = res["livemux (streaming)"]["peak_mib"]
                met = (ratio, peak)
        for p in (lm2, lm, hp, sp):
            b.drop(p)
    ratio, peak = met
    targets.append((f"scenario 4: streaming ≥ 0.8× direct throughput, peak RSS ≤ 64 MiB ({sizes[-1] >> 20} MiB)",
                    f"{ratio:.2f}×, {peak:.1f} MiB", ratio >= 0.8 and peak <= 64))
    return ("### 4. Large answers\n\n" + table(["size", "client", "path", "MB/s", "answers", "proxy CPU", "proxy peak MiB"], rows) + "\n")


def scenario5(b, targets):
    """Dead site: how fast a client learns it, once the site is known down."""
    rows = []
    sp, (addr,) = b.sims(1)
    hp, hs = b.haproxy([("sim", addr)])
    lm, ls = b.livemux([("sim", addr)])
    b.drop(sp)
    wait_until("livemux sees the site down", lambda: "site is down" in lm.text("err"), 30)
    res = {}
    for peer, target, proc, extra in [
        ("direct (connection refused)", f"tcp:{addr}", None, ["--connect-per-query"]),
        ("haproxy (closes the connection)", hs["sim"], hp, ["--connect-per-query"]),
        ("livemux (error answer)", ls["sim"], lm, []),
    ]:
        j = b.load(f"s5 {peer}", [target], extra=["--accept-errors", *extra], proxy=proc)
        res[peer] = j
        rows.append([peer] + row_cells(j)[:5])
    p99 = res["livemux (error answer)"]["p99_us"]
    targets.append(("scenario 5: dead-site error p99 < 1 ms", f"{p99 / 1000:.3f} ms", p99 < 1000))
    for p in (lm, hp):
        b.drop(p)
    return ("### 5. Dead site (stopped; livemux already knows it is down)\n\n" + table(["path"] + STD[:5], rows) +
            "\n\nHAProxy keeps retrying the refused backend before it closes the client's connection. A site "
            "that does not refuse but drops packets (a black hole) costs a direct client its whole connect "
            "timeout per request; livemux answers from what its heartbeat already knows.\n")


def scenario6(b, targets):
    """Scale: many sites × 2 channels and many idle clients: memory and heartbeat CPU."""
    want_sites, want_idle = (200, 400) if b.quick else (10000, 20000)
    idle_secs = 6 if b.quick else 20
    # livemux holds per site its socket and 2 channels, and one descriptor per client.
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    need = 3 * want_sites + want_idle + 256
    nsites, nidle = want_sites, want_idle
    if need > limit:
        nsites = (limit - 256) // 5 // 100 * 100
        nidle = 2 * nsites
    sp, addrs = b.sims(nsites, name="scale")
    sites = [(f"s{i}", a) for i, a in enumerate(addrs)]
    t0 = time.monotonic()
    lm, ls = b.livemux(sites, channels=2)
    ready = time.monotonic() - t0
    # Heartbeats alone (no clients yet): every site's every 5 s.
    cpu0, w0 = lm.cpu(), time.monotonic()
    time.sleep(idle_secs)
    hb_cpu = (lm.cpu() - cpu0) / (time.monotonic() - w0) * 100
    lm.reset_peak()
    base_rss = lm.status("VmRSS") / MIB
    tf = os.path.join(b.work, "idle-targets.txt")
    with open(tf, "w") as f:
        f.write("\n".join(ls[s] for s, _ in sites) + "\n")
    cpu0, w0 = lm.cpu(), time.monotonic()
    r = subprocess.run([LOAD, "--targets-file", tf, "--idle", str(nidle), "--duration", f"{idle_secs}s", "--label", "s6 idle"],
                       capture_output=True, text=True, timeout=idle_secs + 300)
    wall = time.monotonic() - w0
    cpu = (lm.cpu() - cpu0) / wall * 100
    j = json.loads([l for l in r.stdout.splitlines() if l.startswith("{")][-1])
    peak = lm.status("VmHWM") / MIB
    rss = lm.status("VmRSS") / MIB
    log(f"s6: {j['open']} of {nidle} idle clients held; livemux RSS {rss:.1f} MiB, peak {peak:.1f} MiB, "
        f"heartbeat CPU {hb_cpu:.1f}%, with clients {cpu:.1f}%")
    state = json.load(open(lm.state_file))
    channels = sum(len(s.get("channels", [])) for s in state["sites"])
    what = f"{want_sites:,} sites × 2 channels + {want_idle:,} idle clients"
    if nsites == want_sites:
        targets.append((f"scenario 6: {what} within 256 MiB", f"{peak:.1f} MiB", peak <= 256))
        targets.append((f"scenario 6: heartbeats of {want_sites:,} sites ≤ 10% of one core", f"{hb_cpu:.1f}%",
                        hb_cpu <= 10))
    else:
        # Not measurable here: say so, with the measured scale and a linear
        # projection (which over-states, since it scales the fixed part too).
        k = want_sites / nsites
        why = (f"needs ~{need:,} descriptors, this machine's limit is {limit:,}; at {nsites:,} sites × 2 + "
               f"{nidle:,} clients")
        targets.append((f"scenario 6: {what} within 256 MiB",
                        f"not measurable: {why}: {peak:.1f} MiB (× {k:.2f} = {peak * k:.0f} MiB projected)", None))
        targets.append((f"scenario 6: heartbeats of {want_sites:,} sites ≤ 10% of one core",
                        f"not measurable: {why}: {hb_cpu:.1f}% (× {k:.2f} = {hb_cpu * k:.1f}% projected)", None))
    b.drop(lm)
    b.drop(sp)
    rows = [[f"{nsites:,}", f"{channels:,}", f"{j['open']:,} of {nidle:,}", f"{ready:.1f} s", f"{hb_cpu:.2f}%",
             f"{base_rss:.1f}", f"{rss:.1f}", f"{peak:.1f}", f"{cpu:.2f}%"]]
    scale_note = ""
    if nsites < want_sites:
        scale_note = (f"The target scale ({what}) needs ~{need:,} descriptors in livemux; this machine's hard "
                      f"limit is {limit:,} and cannot be raised here (no CAP_SYS_RESOURCE), so the suite runs the "
                      "largest scale that fits, with twice as many idle clients as sites.\n\n")
    return ("### 6. Scale: sites × 2 channels, idle clients, heartbeats every 5 s\n\n" + scale_note +
            table(["sites", "channels open", "idle clients held", "all ready after",
                   f"heartbeat CPU (no clients, {idle_secs} s)", "RSS before clients MiB", "RSS with clients MiB",
                   "peak MiB", f"CPU with clients, {idle_secs} s"], rows) + "\n")


def make_certs(work):
    """A CA and a server certificate for localhost/127.0.0.1 (openssl)."""
    d = tempfile.mkdtemp(prefix="pki", dir=work)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *a: subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True)
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=bench CA")
    run("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    with open(os.path.join(d, "ext"), "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "server.pem", "-days", "2", "-extfile", "ext")
    return {k: os.path.join(d, f) for k, f in [("ca", "ca.pem"), ("cert", "server.pem"), ("key", "server.key")]}


def stunnels(b, backends, certs):
    """One stunnel process with a TLS front for each backend; returns it and the fronts' addresses."""
    d = tempfile.mkdtemp(prefix="st", dir=b.work)
    held = []
    for _ in backends:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        held.append(s)
    ports = [s.getsockname()[1] for s in held]
    for s in held:
        s.close()
    conf = os.path.join(d, "stunnel.conf")
    with open(conf, "w") as f:
        f.write("foreground = yes\npid =\ndebug = warning\n")
        for i, (backend, port) in enumerate(zip(backends, ports)):
            f.write(f"[ls{i}]\naccept = 127.0.0.1:{port}\nconnect = {backend}\ncert = {certs['cert']}\n"
                    f"key = {certs['key']}\nsslVersionMin = TLSv1.2\n")
    p = b.proc(f"stunnel{len(b.procs)}", ["stunnel4", conf])

    def up(port):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return not p.alive()

    wait_until("stunnel", lambda: all(up(port) for port in ports))
    if not p.alive():
        raise RuntimeError(f"stunnel failed: {p.text('err')[-2000:]}")
    return p, [f"127.0.0.1:{port}" for port in ports]


def stunnel(b, backend, certs):
    p, (front,) = stunnels(b, [backend], certs)
    return p, front


def scenario7(b, targets):
    """A TLS site: persistent TLS channels against a TLS handshake per query."""
    certs = make_certs(b.work)
    _, (addr,) = b.sims(1)
    _, tls_addr = stunnel(b, addr, certs)
    lm, ls = b.livemux([("tls", tls_addr)], tls_ca=certs["ca"])
    tls = ["--ca-file", certs["ca"]]
    rows, res = [], {}
    for clients in ([1] if b.quick else [1, 16]):
        for label, target, extra, proc in [
            ("direct TLS, new connection per query, full handshake (a GUI worker)", f"tls:{tls_addr}",
             [*tls, "--connect-per-query", "--no-resumption"], None),
            ("direct TLS, new connection per query, resumed session", f"tls:{tls_addr}", [*tls, "--connect-per-query"], None),
            ("direct TLS, keep-alive", f"tls:{tls_addr}", tls, None),
            ("livemux (persistent TLS channels), new connection per query", ls["tls"], ["--connect-per-query"], lm),
            ("livemux (persistent TLS channels), keep-alive", ls["tls"], [], lm),
        ]:
            j = b.load(f"s7 {clients} {label}", [target], clients=clients, extra=extra, proxy=proc)
            res[(clients, label)] = j
            rows.append([str(clients), label] + row_cells(j))
    n = 1 if b.quick else 16
    gui = res[(n, "direct TLS, new connection per query, full handshake (a GUI worker)")]["rate"]
    via = res[(n, "livemux (persistent TLS channels), new connection per query")]["rate"]
    targets.append((f"scenario 7 (information): livemux vs a TLS handshake per query, {n} clients",
                    f"{via / max(gui, 1e-9):.1f}×", via > gui))
    return ("### 7. A TLS site (stunnel in front of the simulated site)\n\n" +
            table(["clients", "path"] + STD, rows) + "\n")


def scenario8(b, targets):
    """The query cache: a cached hit against the same query sent to the site."""
    q = "GET hostgroups\\nColumns: name alias"
    cached = q + "\\nCache: reload"
    _, (local,) = b.sims(1, name="cachelocal")
    _, (remote,) = b.sims(1, knobs=["rtt_ms=20"], name="cacheremote")
    ic_addr, _ = b.icinga(hosts=1000, services=10)
    na_addr, _ = b.naemon(hosts=1000, services=10)
    sites = [("sim", local), ("sim20ms", remote), ("icinga", ic_addr), ("naemon", na_addr)]
    # Icinga 2 serves 2 × cores connections (4 here) and nothing beyond, so
    # 3 channels leave one for the direct measurements.
    lm, ls = b.livemux(sites, channels=3)
    rows, res = [], {}
    for name, addr in sites:
        for clients in ([1] if b.quick else [1, 16]):
            for label, target, query, proc in [
                ("direct", f"tcp:{addr}", q, None),
                ("livemux, uncached (the cost of a miss)", ls[name], q, lm),
                ("livemux, `Cache: reload` (hits)", ls[name], cached, lm),
            ]:
                j = b.load(f"s8 {name} {clients} {label}", [target], query=query, clients=clients, proxy=proc)
                res[(name, clients, label)] = j
                rows.append([name, str(clients), label] + row_cells(j))
    for name in ("sim", "icinga", "naemon"):
        hit = res[(name, 1, "livemux, `Cache: reload` (hits)")]
        miss = res[(name, 1, "livemux, uncached (the cost of a miss)")]
        targets.append((f"scenario 8 (information): {name}, 1 client, cached hit p50 vs miss p50",
                        f"{fmt_us(hit['p50_us'])} vs {fmt_us(miss['p50_us'])} ms", hit["p50_us"] <= miss["p50_us"]))
    return ("### 8. The query cache (`GET hostgroups`, one site each)\n\n"
            "`sim20ms` is the simulated site with a 20 ms round trip (a remote site); "
            "`icinga` and `naemon` real Icinga 2 and Naemon sites with 1,000 hosts.\n\n" +
            table(["site", "clients", "path"] + STD, rows) + "\n")


def scenario9(b, targets):
    """Channel hygiene: one client's bad queries among other clients' good ones."""
    good = "GET status\\nColumns: num_hosts num_services"
    # A bad filter operator: Naemon answers 400 and keeps the connection (so
    # livemux proves it clean with a heartbeat and keeps it).
    bad = "GET hosts\\nColumns: name\\nFilter: name <> x"
    na_addr, _ = b.naemon(hosts=1000, services=10)
    _, (remote,) = b.sims(1, knobs=["rtt_ms=20", "mk_headers=1"], name="hygiene20ms")
    sites = [("naemon", na_addr), ("sim20ms", remote)]
    lm, ls = b.livemux(sites, channels=2)
    rows = []
    for name, _ in sites:
        alone = b.load(f"s9 {name} good alone", [ls[name]], query=good, clients=8, proxy=lm)
        rows.append([name, "8 clients, good queries alone", "-"] + row_cells(alone))
        bad_load = dict(label=f"s9 {name} bad", targets=[ls[name]], query=bad, clients=1,
                        extra=["--accept-errors"])
        mixed = b.load(f"s9 {name} good beside bad", [ls[name]], query=good, clients=8, proxy=lm, beside=bad_load)
        rows.append([name, "8 clients, good queries, beside 1 client sending only bad ones",
                     f"{mixed['beside']['rate']:.0f}"] + row_cells(mixed))
    return ("### 9. Channel hygiene: a client sending bad queries among good ones (livemux, 2 channels)\n\n"
            "Every error answer costs its channel a heartbeat on it before it is lent again (see docs/PROXY.md, "
            "*One client's bad request never reaches another client*). `bad/s` is the bad client's rate; "
            "the other columns are the good clients'. `sim20ms` is the simulated site with a 20 ms round "
            "trip in mk-livestatus mode (errors keep the connection).\n\n" +
            table(["site", "load", "bad/s"] + STD, rows) + "\n")


def scenario10(b, targets):
    """HW/SW inventory sync: 1,000 and 10,000 hosts × 200 KiB trees, sync time and peak RSS."""
    rows = []
    counts = [200] if b.quick else [1000, 10000]
    tree = 200 * 1024
    worst = 0.0
    for n in counts:
        sp = b.proc(f"inv{n}", [SIM, "--hosts", str(n), "--services", "1", "--inventory-bytes", str(tree),
                                "--name", "inv"])
        wait_until("simulated site", lambda: "listening" in sp.text() or not sp.alive())
        addr = sp.text().split()[1][len("tcp://"):]
        d = tempfile.mkdtemp(prefix="inv", dir=b.work)
        # The state file is read to see when the sync is done: rewrite it often.
        top = f'state_interval = "100ms"\n[inventory]\ndir = "{d}"\ninterval = "1s"'
        t0 = time.monotonic()
        lm, _ = b.livemux([("inv", addr)], top=top)

        def synced():
            try:
                inv = json.load(open(lm.state_file))["sites"][0].get("inventory", {})
            except (OSError, ValueError, IndexError):
                return False
            return inv.get("hosts") == n and inv.get("state") == "idle"

        wait_until("inventory synced", synced, 1800)
        took = time.monotonic() - t0
        peak = lm.status("VmHWM") / MIB
        cpu = lm.cpu() / took * 100
        files, size = 0, 0
        for e in os.scandir(d):
            if e.is_file():
                files += 1
                size += e.stat().st_size
        log(f"s10: {n} hosts synced in {took:.1f} s, {size / MIB:.0f} MiB in {files} files, livemux peak {peak:.1f} MiB")
        rows.append([f"{n:,}", f"{files:,}", f"{size / MIB:,.0f}", f"{took:.1f} s", f"{size / MIB / took:.0f}",
                     f"{cpu:.0f}%", f"{peak:.1f}"])
        worst = max(worst, peak)
        b.drop(lm)
        b.drop(sp)
        shutil.rmtree(d, ignore_errors=True)
    targets.append((f"scenario 10: inventory sync of {counts[-1]:,} hosts × 200 KiB, livemux peak RSS < 64 MiB",
                    f"{worst:.1f} MiB", worst < 64))
    return ("### 10. HW/SW inventory sync\n\n"
            "One simulated site with N hosts, each with a generated inventory tree of about 200 KiB (current "
            "layout: `<host>.json` and its `.json.gz`), synced into an empty directory by livemux with its "
            "defaults and `interval = \"1s\"`. Time from livemux's start until the state file (rewritten every "
            "100 ms) shows every host synced; MB/s counts the files written. The simulated site renders and gzips every tree on the same "
            "2 cores.\n\n" +
            table(["hosts", "files", "MiB written", "sync time", "MB/s", "livemux CPU", "livemux peak MiB"], rows) +
            "\n")


def scenario11(b, targets):
    """Federated sockets: one query over N sites, against a client asking each site's socket (fan-out)."""
    rows = []
    # (what, the federated query, the fan-out's query to each site, target of federated / fan-out pages/s)
    cols = "host_name description state last_check plugin_output"
    pages = [
        ("plain rows (csv)", "GET hosts\\nColumns: name state plugin_output", None, 1.0),
        # A Thruk service list: every problem first, a page of 100 with the union's total_count. The
        # sites cannot sort: the fan-out asks each for its rows, as a GUI without LMD must.
        ("sorted page (wrapped_json, Sort + Limit 100)",
         f"GET services\\nColumns: {cols} peer_key\\nSort: state desc\\nSort: host_name asc\\n"
         "Sort: description asc\\nLimit: 100\\nOutputFormat: wrapped_json\\nColumnHeaders: on",
         f"GET services\\nColumns: {cols}\\nOutputFormat: json", 0.8),
        # Thruk's site list: LMD's sites table, against asking each core's status.
        ("sites table (against GET status)",
         "GET sites\\nColumns: key name status last_error last_online response_time\\nOutputFormat: json",
         "GET status\\nColumns: program_start program_version\\nOutputFormat: json", None),
    ]
    for n in [10] if b.quick else [10, 50]:
        sp, addrs = b.sims(n, name=f"fed{n}")
        sites = [(f"s{i}", a) for i, a in enumerate(addrs)]
        lm, ls = b.livemux(sites, top='[[federation]]\nname = "all"')
        fed_target = ls["s0"].rsplit("/", 1)[0] + "/all"
        for what, query, fanout_query, target in pages:
            got = {}
            for how, tgts, extra, q in [("federated socket, one query", [fed_target], [], query),
                                        ("each site's socket (fan-out)", [ls[s] for s, _ in sites], ["--fanout"],
                                         fanout_query or query)]:
                j = b.load(f"s11 {n} {what} {how}", tgts, query=q, clients=8, extra=extra, proxy=lm)
                got[how] = j["rate"]
                rows.append([str(n), what, how, f"{j['rate']:.0f}", f"{j['p50_us'] / 1000:.2f}",
                             f"{j['p99_us'] / 1000:.2f}", f"{j['cpu_pct']:.0f}%", f"{j['peak_mib']:.1f}",
                             str(j["errors"])])
            ratio = got["federated socket, one query"] / max(got["each site's socket (fan-out)"], 1e-9)
            if target is not None and not b.quick:
                targets.append((f"scenario 11, {n} sites, {what}: federated ≥ {target}× the fan-out's pages/s",
                                f"{ratio:.2f}×", ratio >= target))
        b.drop(lm)
        b.drop(sp)
    # A large union through one client: its size against livemux's peak RSS.
    nsites, hosts = (10, 5000) if b.quick else (50, 200000)
    sp, addrs = b.sims(nsites, name="fedbig", hosts=hosts)
    sites = [(f"s{i}", a) for i, a in enumerate(addrs)]
    # The simulated sites (one process) render such answers whole before
    # sending, 50 at once on 2 cores: so busy that they answer neither the
    # query nor a heartbeat for many seconds. livemux would rightly call
    # them down; here they get time.
    slow = 'response_idle_timeout = "300s"\nheartbeat_interval = "60s"\nheartbeat_timeout = "60s"'
    lm, ls = b.livemux(sites, top='[[federation]]\nname = "all"', defaults=slow)
    path = ls["s0"].rsplit("/", 1)[0][len("unix:"):] + "/all"
    lm.reset_peak()
    t0 = time.monotonic()
    got, lines = 0, 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(path)
        c.sendall(b"GET hosts\nColumns: name alias address plugin_output perf_data groups check_command notes "
                  b"last_check latency num_services state\n"
                  b"ResponseHeader: fixed16\n\n")
        while True:
            chunk = c.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)
            lines += chunk.count(b"\n")
    nrows = lines - 1  # the fixed16 header's line
    if nrows != nsites * hosts:
        raise RuntimeError(f"the federated answer has {nrows} rows, not {nsites * hosts}")
    took = time.monotonic() - t0
    peak = lm.status("VmHWM") / MIB
    log(f"s11: union of {nsites} sites x {hosts} hosts: {got / MIB:.0f} MiB in {took:.1f} s, livemux peak {peak:.1f} MiB")
    b.drop(lm)
    b.drop(sp)
    if not b.quick:
        targets.append((f"scenario 11: a {got / MIB:,.0f} MiB federated answer, livemux peak RSS < 64 MiB",
                        f"{peak:.1f} MiB", peak < 64))
    return ("### 11. Federated sockets\n\n"
            "Simulated sites (100 hosts each) behind livemux with a `[[federation]]` over all of them; 8 clients. "
            "*federated*: one query to the federated socket per page (the union, with merged rows); *fan-out*: "
            "a GUI-like page asking every site's own socket at once (`livemux-load --fanout`), the same query "
            "where the sites can answer it, else what a GUI without a federation would ask each site (the "
            "rows to sort itself; each core's status). Rates are pages/s.\n\n"
            + table(["sites", "page", "how", "pages/s", "p50 ms", "p99 ms", "proxy CPU", "proxy peak MiB", "errors"], rows)
            + f"\n\nA large union: `GET hosts` (twelve columns, csv, fixed16) over {nsites} sites × {hosts:,} hosts, "
              f"{nrows:,} rows (all of them, checked), {got / MIB:,.0f} MiB read by one client in {took:.1f} s; "
              f"livemux's peak RSS {peak:.1f} MiB "
              "(the answer goes through a spooled file: 4 MiB in memory, the rest on disk).\n")


def scenario12(b, targets):
    """Fair share: an interactive client beside a greedy one that keeps every channel busy."""
    slow = "GET hosts\\nColumns: name\\nLimit: 1"
    rtt, service, greedy_clients = 20, 200, 64
    _, (addr,) = b.sims(1, knobs=[f"rtt_ms={rtt}", f"delay_ms={service}", "fault_table=hosts"], name="fair")
    secs = b.secs if b.quick else max(b.secs, 30)
    pool = 'channels = 4\nchannels_max = 4\nchannel_timeout = "60s"\n'
    rows, res = [], {}
    for label, defaults in (("livemux, fair share", "fair_share = true"), ("livemux, FIFO", "fair_share = false"),
                            ("direct", None)):
        if defaults is None:
            proc, target = None, f"tcp:{addr}"
        else:
            proc, socks = b.livemux([("site", addr)], defaults=pool + defaults)
        target = target if defaults is None else socks["site"]
        # The interactive client: one small query a second, beside the
        # greedy process's 64 connections asking slow queries back to back.
        interactive = dict(label=f"s12 {label} interactive", targets=[target], query=SMALL, clients=1,
                           extra=["--every", "1s"])
        j = b.load(f"s12 {label} greedy", [target], query=slow, clients=greedy_clients, secs=secs, proxy=proc,
                   beside=interactive)
        res[label] = j
        i = j["beside"]
        rows.append([label, f"{j['rate']:.1f}", f"{i['requests']}", fmt_us(i["p50_us"]), fmt_us(i["p99_us"]),
                     fmt_us(i["max_us"]), str(j.get("errors", 0) + i.get("errors", 0))])
        if proc:
            b.drop(proc)
    fair, fifo = res["livemux, fair share"], res["livemux, FIFO"]
    bound = 2 * (service + rtt)
    targets.append((f"scenario 12: interactive p99 with fair share ≤ 2 × (slow query + round trip) = {bound} ms",
                    f"{fmt_us(fair['beside']['p99_us'])} ms (FIFO {fmt_us(fifo['beside']['p99_us'])} ms)",
                    fair["beside"]["p99_us"] <= bound * 1000))
    targets.append(("scenario 12: greedy throughput with fair share within 10% of FIFO's",
                    f"{fair['rate']:.1f} vs {fifo['rate']:.1f}/s ({fair['rate'] / max(fifo['rate'], 1e-9):.2f}×)",
                    fair["rate"] >= 0.9 * fifo["rate"]))
    return (f"### 12. Fair share: an interactive client beside a greedy one\n\n"
            f"One simulated site with a {rtt} ms round trip whose `GET hosts` takes {service} ms; livemux with "
            f"`channels_max = 4` (and `pipeline_depth` 8). One greedy process with {greedy_clients} keep-alive "
            f"connections asks `GET hosts` back to back; beside it one interactive client asks `GET status` once a "
            f"second. With fair share its query goes behind at most one greedy query (the channel with the fewest "
            f"is kept for clients with none there); in arrival order it waits behind the greedy backlog. Direct: "
            f"each connection its own (the site serves them all at once).\n\n" +
            table(["path", "greedy rate/s", "interactive queries", "interactive p50 ms", "interactive p99 ms",
                   "interactive max ms", "errors"], rows) + "\n")


def criterion(b, targets):
    subprocess.run(["cargo", "bench", "-q", "-p", "livemux-protocol", "--bench", "protocol"], cwd=ROOT,
                   capture_output=True, text=True, timeout=900)
    rows = []
    base = os.path.join(ROOT, "target", "criterion")
    for group in ("request", "fixed16"):
        gdir = os.path.join(base, group)
        if not os.path.isdir(gdir):
            continue
        for name in sorted(os.listdir(gdir)):
            est = os.path.join(gdir, name, "new", "estimates.json")
            if os.path.exists(est):
                ns = json.load(open(est))["mean"]["point_estimate"]
                rows.append([f"{group}/{name}", f"{ns:.0f}"])
    return ("### Micro-benchmarks (criterion, `cargo bench -p livemux-protocol`)\n\n" +
            table(["benchmark", "mean ns"], rows) + "\n")


def machine():
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return f"{os.cpu_count()} CPUs ({model}), {mem:.0f} GiB, Linux {platform.release()}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs; print only")
    ap.add_argument("--write", action="store_true", help="rewrite docs/BENCHMARKS.md even with --quick")
    ap.add_argument("--only", help="comma-separated scenario numbers, e.g. 1,5")
    ap.add_argument("--baseline", help="another livemux binary (say, the parent commit's build), measured beside "
                    "this one as the peer 'baseline' in scenarios 1-3; prints only")
    ap.add_argument("--secs", type=float, help="seconds per measured point (default 5, quick 1.5)")
    ap.add_argument("--livemux", help="measure this livemux binary instead of this tree's build; prints only")
    ap.add_argument("--rounds", type=int, help="interleaved rounds in scenario 1 (default 3, quick 1)")
    args = ap.parse_args()
    # Scenario 6 holds ~60,000 descriptors in livemux and as many in the
    # load tool: raise the limit as a deployment would (root may raise the
    # hard limit too; otherwise the soft one goes up to it).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, NOFILE), max(hard, NOFILE)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = time.monotonic()
    log("building release binaries")
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "livemux", "-p", "livemux-load", "-p", "livemux-simsite"],
                   cwd=ROOT, check=True)
    for tool in ("haproxy", "icinga2", "stunnel4", "openssl"):
        if shutil.which(tool) is None:
            subprocess.run([os.path.join(ROOT, "scripts", "install-test-deps.sh")], check=True)
    built = time.monotonic() - started
    started = time.monotonic()
    scenarios = [scenario1, scenario2, scenario3, scenario4, scenario5, scenario6, scenario7, scenario8, scenario9,
                 scenario10, scenario11, scenario12]
    wanted = {int(x) for x in args.only.split(",")} if args.only else None
    sections, targets = [], []
    if args.livemux:
        global LIVEMUX
        LIVEMUX = os.path.abspath(args.livemux)
    b = Bench(args.quick, secs=args.secs, rounds=args.rounds,
              baseline=args.baseline and os.path.abspath(args.baseline))
    try:
        for i, s in enumerate(scenarios, 1):
            if wanted and i not in wanted:
                continue
            log(f"scenario {i}: {s.__doc__.strip()}")
            sections.append(s(b, targets))
        if not args.quick and not wanted:
            log("criterion micro-benchmarks")
            sections.append(criterion(b, targets))
    finally:
        b.close()
    took = time.monotonic() - started
    cmd = "scripts/bench.py" + (" --quick" if args.quick else "") + (f" --only {args.only}" if args.only else "")
    head = (f"Measured {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} on {machine()} with `{cmd}` "
            f"({took / 60:.1f} min; {'quick mode: short runs' if args.quick else f'{b.secs:.0f} s per point'}).\n")
    trows = [[t, m, "not measured" if ok is None else "yes" if ok else "**no**"] for t, m, ok in targets]
    report = (head + "\n### Targets\n\n" + table(["target", "measured", "met"], trows) + "\n\n" +
              "\n".join(sections))
    print(report)
    if (not args.quick or args.write) and not wanted and not args.baseline and not args.livemux:
        with open(DOC) as f:
            doc = f.read()
        if BEGIN in doc and END in doc:
            doc = doc.split(BEGIN)[0] + BEGIN + "\n" + report + "\n" + END + doc.split(END, 1)[1]
        else:
            doc += f"\n## The benchmark suite\n\n{BEGIN}\n{report}\n{END}\n"
        with open(DOC, "w") as f:
            f.write(doc)
        log(f"wrote {DOC}")
        if "scenario3" in b.charts:
            svg_scenario3(*b.charts["scenario3"], CHART3)
            log(f"wrote {CHART3}")
    log(f"done: scenarios ran in {took:.0f} s (building the release binaries took {built:.0f} s before)")


if __name__ == "__main__":
    main()
