#!/usr/bin/env python3
"""bench.py - livemux's benchmark suite: livemux against direct connections
and HAProxy (TCP mode), side by side in one run, so every figure is compared
under the same machine conditions.

  scripts/bench.py            the whole suite (~10 min on 2 cores); rewrites
                              the results section of docs/BENCHMARKS.md
  scripts/bench.py --quick    short runs (< 2 min); prints the tables only
                              (CI runs this; no thresholds are applied)

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
import datetime
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
LIVEMUX = os.path.join(REL, "livemux")
LOAD = os.path.join(REL, "livemux-load")
SIM = os.path.join(REL, "livemux-simsite")
ICINGA = os.path.join(ROOT, "scripts", "icinga-site.sh")
NAEMON = os.path.join(ROOT, "scripts", "naemon-site.sh")
DOC = os.path.join(ROOT, "docs", "BENCHMARKS.md")
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"
SMALL = "GET status\\nColumns: program_version"
MIB = 1 << 20


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
    def __init__(self, quick):
        self.quick = quick
        self.work = tempfile.mkdtemp(prefix="lmbench", dir="/tmp")
        self.procs = []
        self.site_dirs = []
        self.secs = 1.5 if quick else 5

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

    def sims(self, count, knobs=(), name="sim"):
        args = [SIM, "--count", str(count), "--name", name]
        for k in knobs:
            args += ["--knob", k]
        p = self.proc(f"{name}{len(self.procs)}", args)
        wait_until("simulated sites", lambda: p.text().count("listening") >= count or not p.alive())
        if not p.alive():
            raise RuntimeError(f"livemux-simsite failed: {p.text('err')}")
        addrs = [line.split()[1][len("tcp://"):] for line in p.text().splitlines() if line.startswith("listening")]
        return p, addrs

    def livemux(self, sites, channels=5, top="", tls_ca=None):
        d = tempfile.mkdtemp(prefix="lm", dir=self.work)
        cfg = os.path.join(d, "livemux.toml")
        with open(cfg, "w") as f:
            f.write(f'socket_dir = "{d}/s"\nstate_file = "{d}/state.json"\nspool_dir = "{d}/spool"\n{top}\n')
            f.write(f'[defaults]\nchannels = {channels}\nquery_timeout = "300s"\nmax_clients = 100000\n')
            for name, addr in sites:
                scheme = "tls" if tls_ca else "tcp"
                f.write(f'[[site]]\nname = "{name}"\naddress = "{scheme}://{addr}"\n')
                if tls_ca:
                    f.write(f'ca_file = "{tls_ca}"\n')
        p = self.proc(f"livemux{len(self.procs)}", [LIVEMUX, "run", "--config", cfg])
        wait_until("livemux sites ready", lambda: p.text("err").count("site is ready") >= len(sites) or not p.alive(), 300)
        if not p.alive():
            raise RuntimeError(f"livemux failed: {p.text('err')[-2000:]}")
        return p, {name: f"unix:{d}/s/{name}" for name, _ in sites}

    def haproxy(self, sites):
        d = tempfile.mkdtemp(prefix="hap", dir=self.work)
        cfg = os.path.join(d, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write("global\n  maxconn 9000\ndefaults\n  mode tcp\n  timeout connect 5s\n"
                    "  timeout client 300s\n  timeout server 300s\n")
            for name, addr in sites:
                f.write(f"listen {name}\n  bind unix@{d}/{name} mode 660\n  server s {addr}\n")
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
    rounds = 1 if b.quick else 3
    _, (addr,) = b.sims(1)
    hp, hs = b.haproxy([("sim", addr)])
    lm, ls = b.livemux([("sim", addr)])
    sites = [("simulated site", addr, hs["sim"], ls["sim"], hp, lm)]
    if not b.quick:
        for site_name, start in (("Icinga 2", b.icinga), ("Naemon", b.naemon)):
            addr2, _ = start()
            hp2, hs2 = b.haproxy([("rs", addr2)])
            lm2, ls2 = b.livemux([("rs", addr2)], channels=2)
            sites.append((site_name, addr2, hs2["rs"], ls2["rs"], hp2, lm2))
    overheads = []
    for name, addr, hsock, lsock, hproc, lproc in sites:
        res = {"direct": [], "haproxy": [], "livemux": []}
        for _ in range(rounds):
            res["direct"].append(b.load(f"s1 {name} direct", [f"tcp:{addr}"], extra=["--quickack"]))
            res["haproxy"].append(b.load(f"s1 {name} haproxy", [hsock], proxy=hproc))
            res["livemux"].append(b.load(f"s1 {name} livemux", [lsock], proxy=lproc))
        if name != "simulated site":
            # What a client that does not re-arm quick ACKs gets from a real
            # core over TCP: the 40 ms delayed-ACK stall.
            j = b.load(f"s1 {name} direct, no quick-ACK", [f"tcp:{addr}"])
            rows.append([name, "direct (TCP, no quick-ACK: delayed-ACK stall)"] + row_cells(j))
        for peer, runs in res.items():
            j = min(runs, key=lambda r: abs(r["p50_us"] - statistics.median(x["p50_us"] for x in runs)))
            label = "direct (TCP, client quick-ACKs)" if peer == "direct" else peer
            rows.append([name, label] + row_cells(j))
        over = statistics.median(l["p50_us"] - d["p50_us"] for l, d in zip(res["livemux"], res["direct"]))
        if name == "simulated site":
            overheads.append(over)
        text.append(f"{name}: livemux p50 overhead over direct {over:.0f} µs (median of {rounds} interleaved rounds)")
    targets.append(("scenario 1: p50 overhead ≤ 30 µs over direct (simulated site)", f"{overheads[0]:.0f} µs",
                    overheads[0] <= 30))
    return "### 1. Small query, one keep-alive client\n\n" + table(["site", "path"] + STD, rows) + "\n\n" + \
        "\n".join(f"- {t}" for t in text) + "\n"


def scenario2(b, targets):
    """Many keep-alive clients on one site with 5 channels."""
    rows = []
    _, (addr,) = b.sims(1)
    hp, hs = b.haproxy([("sim", addr)])
    lm, ls = b.livemux([("sim", addr)], channels=5)
    for clients in ([1, 64] if b.quick else [1, 16, 64]):
        for peer, target, proc in [("direct", f"tcp:{addr}", None), ("haproxy", hs["sim"], hp), ("livemux", ls["sim"], lm)]:
            j = b.load(f"s2 {peer} {clients}", [target], clients=clients, proxy=proc)
            rows.append([str(clients), peer] + row_cells(j))
    return "### 2. Many keep-alive clients, one simulated site, livemux with 5 channels\n\n" + \
        table(["clients", "path"] + STD, rows) + "\n"


def scenario3(b, targets):
    """GUI workload: 50 clients; each request connects to N sites, queries, disconnects."""
    rows, ratios = [], []
    points = [(10, 1)] if b.quick else [(1, 1), (10, 1), (50, 1), (1, 20), (10, 20), (50, 20)]
    for rtt in sorted({r for _, r in points}):
        sp, addrs = b.sims(50, knobs=[f"rtt_ms={rtt}"], name=f"rtt{rtt}")
        sites = [(f"s{i}", a) for i, a in enumerate(addrs)]
        hp, hs = b.haproxy(sites)
        lm, ls = b.livemux(sites, channels=5)
        for n, r in points:
            if r != rtt:
                continue
            names = [s for s, _ in sites[:n]]
            res = {}
            for peer, tmap, proc in [("direct", {s: f"tcp:{a}" for s, a in sites}, None), ("haproxy", hs, hp), ("livemux", ls, lm)]:
                j = b.load(f"s3 rtt={rtt} n={n} {peer}", [tmap[s] for s in names], clients=50,
                           extra=["--fanout"], proxy=proc, warmup=1)
                res[peer] = j
                rows.append([f"{rtt} ms", str(n), peer] + row_cells(j))
            rd = res["livemux"]["rate"] / max(res["direct"]["rate"], 1e-9)
            rh = res["livemux"]["rate"] / max(res["haproxy"]["rate"], 1e-9)
            ratios.append((rtt, n, rd, rh))
        b.drop(lm)
        b.drop(hp)
        b.drop(sp)
    worst_d = min(r[2] for r in ratios)
    worst_h = min(r[3] for r in ratios)
    targets.append(("scenario 3: ≥ 5× direct's request rate (every point)", f"{worst_d:.2f}× at worst", worst_d >= 5))
    targets.append(("scenario 3: ≥ 1.5× HAProxy's request rate (every point)", f"{worst_h:.2f}× at worst", worst_h >= 1.5))
    ratio_rows = [[f"{r} ms", str(n), f"{rd:.2f}×", f"{rh:.2f}×"] for r, n, rd, rh in ratios]
    return ("### 3. GUI workload: 50 clients, each request connects to N sites, queries all, disconnects\n\n"
            "The simulated sites add a round trip per answer and one more per new connection (the TCP "
            "handshake); livemux keeps 5 channels per site.\n\n" + table(["RTT", "N sites", "path"] + STD, rows) +
            "\n\n" + table(["RTT", "N sites", "livemux / direct", "livemux / HAProxy"], ratio_rows) + "\n")


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
    """Scale: many sites × 5 channels and many idle clients: memory and heartbeat CPU."""
    nsites, nidle = (100, 1000) if b.quick else (1000, 10000)
    idle_secs = 6 if b.quick else 20
    sp, addrs = b.sims(nsites, name="scale")
    sites = [(f"s{i}", a) for i, a in enumerate(addrs)]
    t0 = time.monotonic()
    lm, ls = b.livemux(sites, channels=5)
    ready = time.monotonic() - t0
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
    log(f"s6: {j['open']} of {nidle} idle clients held; livemux RSS {rss:.1f} MiB, peak {peak:.1f} MiB, CPU {cpu:.1f}%")
    state = json.load(open(ls[sites[0][0]][5:].rsplit("/s/", 1)[0] + "/state.json"))
    channels = sum(len(s.get("channels", [])) for s in state["sites"])
    targets.append((f"scenario 6: {nsites} sites × 5 channels + {nidle} idle clients within 256 MiB",
                    f"{peak:.1f} MiB", peak <= 256))
    b.drop(lm)
    b.drop(sp)
    rows = [[str(nsites), str(channels), f"{j['open']} of {nidle}", f"{ready:.1f} s", f"{base_rss:.1f}", f"{rss:.1f}",
             f"{peak:.1f}", f"{cpu:.2f}%"]]
    return ("### 6. Scale: sites × 5 channels, idle clients, heartbeats every 5 s\n\n" +
            table(["sites", "channels open", "idle clients held", "all ready after", "RSS before clients MiB",
                   "RSS with clients MiB", "peak MiB", f"CPU over {idle_secs} s"], rows) + "\n")


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


def stunnel(b, backend, certs):
    d = tempfile.mkdtemp(prefix="st", dir=b.work)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = os.path.join(d, "stunnel.conf")
    with open(conf, "w") as f:
        f.write(f"foreground = yes\npid =\ndebug = warning\n[ls]\naccept = 127.0.0.1:{port}\nconnect = {backend}\n"
                f"cert = {certs['cert']}\nkey = {certs['key']}\nsslVersionMin = TLSv1.2\n")
    p = b.proc(f"stunnel{len(b.procs)}", ["stunnel4", conf])

    def up():
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return not p.alive()

    wait_until("stunnel", up)
    return p, f"127.0.0.1:{port}"


def scenario7(b, targets):
    """A TLS site: persistent TLS channels against a TLS handshake per query."""
    certs = make_certs(b.work)
    _, (addr,) = b.sims(1)
    _, tls_addr = stunnel(b, addr, certs)
    lm, ls = b.livemux([("tls", tls_addr)], channels=5, tls_ca=certs["ca"])
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
            "Every error answer costs its channel a heartbeat on it before it is lent again (see README, "
            "*One client's bad request never reaches another client*). `bad/s` is the bad client's rate; "
            "the other columns are the good clients'. `sim20ms` is the simulated site with a 20 ms round "
            "trip in mk-livestatus mode (errors keep the connection).\n\n" +
            table(["site", "load", "bad/s"] + STD, rows) + "\n")


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
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
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
    scenarios = [scenario1, scenario2, scenario3, scenario4, scenario5, scenario6, scenario7, scenario8, scenario9]
    wanted = {int(x) for x in args.only.split(",")} if args.only else None
    sections, targets = [], []
    b = Bench(args.quick)
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
    trows = [[t, m, "yes" if ok else "**no**"] for t, m, ok in targets]
    report = (head + "\n### Targets\n\n" + table(["target", "measured", "met"], trows) + "\n\n" +
              "\n".join(sections))
    print(report)
    if (not args.quick or args.write) and not wanted:
        with open(DOC) as f:
            doc = f.read()
        if BEGIN in doc and END in doc:
            doc = doc.split(BEGIN)[0] + BEGIN + "\n" + report + "\n" + END + doc.split(END, 1)[1]
        else:
            doc += f"\n## The benchmark suite\n\n{BEGIN}\n{report}\n{END}\n"
        with open(DOC, "w") as f:
            f.write(doc)
        log(f"wrote {DOC}")
    log(f"done: scenarios ran in {took:.0f} s (building the release binaries took {built:.0f} s before)")


if __name__ == "__main__":
    main()
