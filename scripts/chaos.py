#!/usr/bin/env python3
"""chaos.py - livemux's chaos soak (issue 18): many kinds of clients against
six sites behind livemux while a fault injector breaks the sites, the network
and the configuration at random, with every answer checked.

  scripts/chaos.py --minutes 10     the documented soak (docs/RELIABILITY.md)
  scripts/chaos.py --minutes 1      CI's version (.ci/run)

Options: --minutes N (the fault phase; a float, default 1), --seed N (the
injector's and the clients' random choices; the schedule still depends on
timing), --clients N (clients of every kind, default 50), --faults K,K (only
these kinds of fault, e.g. `--faults blackhole,restart`), --report FILE (also
write the Markdown report there), --log FILE (keep livemux's log there; by
default it is kept only when an invariant failed). Exit status 0 when every
invariant held, 1 otherwise (or when something the soak needs is missing
while CI is set; when CI is not set a missing tool makes it say why and exit
0 without running).

Needs root (a private network namespace and nftables), nft, ip, unshare,
stunnel4, openssl and icinga2 (scripts/install-test-deps.sh installs them);
it builds the release binaries first (cargo build --release; no-op when they
are up to date).

The whole soak runs in a private network namespace: the script re-executes
itself under `unshare --net` and brings `lo` up, so nftables rules touch
nothing outside. Inside: 2 Icinga 2 sites (scripts/icinga-site.sh, 200 hosts),
3 simulated sites (livemux-simsite, 300 hosts, one process each) and a TLS
site (a simulated site behind stunnel), each with a UNIX socket and a TCP
listener in livemux, which runs with short timeouts (TIMEOUTS below) so that
faults are detected fast.

Clients (N of every kind, each bound to one site, a random query each time):
keep-alive, connect-per-query (half of the queries without fixed16: such a
client has only the end of the connection as end marker), slow readers,
readers that vanish mid-answer, pipelining clients (2-5 queries per write),
`Cache: reload` queries, COMMANDs (each followed by a GET), and keep-alive
clients on the sites' TCP listeners.

Faults, one kind after another from a shuffled deck, one every 1-3 s, at most
one at a time per site: `restart` (SIGKILL the site, restart it 0.5-3 s
later), `sigstop` (0.5-5 s), `blackhole` (nftables drops the site's port,
1-6 s), `close_mid_answer` (the simulated site closes after 500-40000 bytes
of every answer, 1-5 s), `slow_answer` (for 1-5 s it delays every answer by
0.1-1.5 s, or trickles them, or delays the answers on `services` by 2-10 s
while it answers heartbeats at once), `client_drop` (nftables drops the
packets of one TCP-listener client, 2-6 s), `sighup` (livemux reloads a
changed configuration, and 1-4 s later the original one). Each is logged on
stderr.

Invariants, every query: a 200 answer is complete and equal to what the site
holds (a direct query taken at start; sorted lines for Icinga 2, whose row
order varies); every other answer is a clean error, a code and a one-line
reason, in time: measured from the query's sending (for a pipelining client,
from the previous answer's end if that is later), a 503 within 3 x
channel_timeout (a query waits for a channel, perhaps for its turn behind a
pipelined answer, and for a fresh channel for its one retry, each at most
channel_timeout), a 502 or 504 within query_timeout (a query's only
deadline), each plus MARGIN. The 502s later than one attempt's heartbeat
detection bound (heartbeat_interval + max(heartbeat_interval + 2
heartbeat_timeout + connect_timeout + tls_handshake_timeout,
response_idle_timeout)) are counted for information. A fixed16 answer that
announces 200 and ends before its length (a site that failed mid-answer after
livemux began relaying: docs/PROXY.md, "Never a short answer that looks complete") is
counted apart as "cut (visible)"; a truncated answer is one a client could
take for complete. The answers on a connection whose packets a client_drop
fault dropped are judged for content, not for time (they arrive late through
the fault). After the faults stop: within heartbeat_interval +
heartbeat_timeout + connect_retry (+ MARGIN) every site is ready, counted
from the moment the site itself answers a direct query within
heartbeat_timeout again (livemux cannot be ready before its site; how long
each site took is in the report, and one that does not answer within
SITE_BACK_LIMIT fails the invariant); once the
clients are gone, no channel is busy (or in a heartbeat or
verification longer than heartbeat_timeout + MARGIN), no client is counted, livemux's
descriptors are back at the baseline (corrected for the number of open
channels), its RSS is within RSS_SLACK of the baseline taken after the
warm-up, no line of its log says "panicked", and every reload applied.
"""

import argparse
import asyncio
import collections
import datetime
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # no __pycache__ in the source tree for bench.py
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the benchmark suite's process and certificate helpers)

ROOT, LIVEMUX, SIM, ICINGA = bench.ROOT, bench.LIVEMUX, bench.SIM, bench.ICINGA
NETNS_ENV = "LIVEMUX_CHAOS_NETNS"
SIM_HOSTS, IC_HOSTS, IC_SERVICES = 300, 200, 10
# Seconds. Short, so that every fault is detected within a few seconds.
TIMEOUTS = dict(heartbeat_interval=1.0, heartbeat_timeout=0.5, channel_timeout=2.0, query_timeout=8.0,
                connect_retry=1.0, connect_timeout=1.0, tls_handshake_timeout=1.0, response_idle_timeout=3.0,
                send_stall_grace=3.0, channel_idle_timeout=2.0, client_request_timeout=5.0, tcp_user_timeout=4.0,
                keepalive_idle=2.0, keepalive_interval=1.0)
SITE_BACK_LIMIT = 60.0  # seconds after the faults a site has to answer a direct query in time again
MARGIN = 1.0  # seconds added to every bound (scheduling of this script and the sites on 2 shared cores)
FD_SLACK = 2  # descriptors: a heartbeat's extra connection or a reconnect in flight at the moment of counting
RSS_SLACK = 32 << 20
THINK = (0.2, 1.0)  # a client's pause between queries, seconds
WARMUP = 10.0
FAULTS = ["restart", "sigstop", "blackhole", "close_mid_answer", "slow_answer", "client_drop", "sighup"]
KINDS = ["keepalive", "per_query", "slow_reader", "vanishing", "pipelining", "cache_reload", "command", "tcp_listener"]
COMMAND = "COMMAND [{ts}] ENABLE_HOST_NOTIFICATIONS;host-0001"  # harmless on both cores (already enabled)
QUERIES = {
    "sim": ["GET hosts\nColumns: name alias address state groups",
            "GET services\nColumns: host_name description state check_command",
            "GET hostgroups\nColumns: name alias",
            "GET services\nColumns: host_name description\nFilter: description = cpu"],
    # Columns of the configuration only: check results change while a
    # restarted Icinga 2 runs its first checks.
    "icinga": ["GET hosts\nColumns: name address",
               "GET services\nColumns: host_name description check_command",
               "GET hostgroups\nColumns: name alias",
               "GET services\nColumns: host_name description\nFilter: description = cpu"],
}
CACHED = {"sim": QUERIES["sim"][2:4], "icinga": QUERIES["icinga"][2:4]}
# livemux's own error reasons (the form a client without fixed16 gets them in).
LIVEMUX_REASON = re.compile(r"^(site '[^']+'|no channel to site|query to site|livemux )")


def log(msg):
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bounds():
    """The documented bound of each status of error answer, seconds (without MARGIN), and the heartbeat
    detection bound (the 502s of one attempt)."""
    t = TIMEOUTS
    qt, ct = t["query_timeout"], t["channel_timeout"]
    detect = t["heartbeat_interval"] + max(
        t["heartbeat_interval"] + 2 * t["heartbeat_timeout"] + t["connect_timeout"] + t["tls_handshake_timeout"],
        t["response_idle_timeout"])
    # A 503: a wait for a channel, for its turn behind a pipelined answer (then it goes elsewhere), and for a
    # fresh channel for its one retry, each at most channel_timeout (docs/PROXY.md, "What the proxy does with a query").
    return {503: min(3 * ct, qt), 504: qt, 502: qt}, min(detect, qt)


def status_of_reason(reason):
    """The status livemux gives a reason (for answers without fixed16, which carry none)."""
    if reason.startswith("no channel to site") or "is not connected yet" in reason:
        return 503
    if reason.startswith("query to site") and "not answered within" in reason:
        return 504
    return 502


# === the sites ===

class Site:
    """A site behind livemux: how to reach it directly, break it and restart it."""

    def __init__(self, name, kind, listen_port):
        self.name, self.kind, self.listen_port = name, kind, listen_port  # kind: sim, tls, icinga
        self.port = None          # where livemux connects (the stunnel front for tls)
        self.backend = None       # the simulated site's port (sim, tls): knobs and direct queries
        self.proc = None          # the simulated site's process
        self.dir = None           # the Icinga 2 site's directory
        self.sock = None          # livemux's UNIX socket for it
        self.busy = False         # a fault holds it
        self.expected = {}        # query -> the site's answer (sorted lines for Icinga 2)

    @property
    def qkind(self):
        return "icinga" if self.kind == "icinga" else "sim"

    def same(self, query, body):
        want = self.expected[query]
        return sorted(body.split(b"\n")) == want if self.kind == "icinga" else body == want


def direct_query(port, query, timeout=10):
    """The body of a 200 answer of the site itself (raises otherwise)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"{query}\nResponseHeader: fixed16\n\n".encode())
        data = b""
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            data += chunk
    code, length = int(data[:3]), int(data[4:15])
    if code != 200 or len(data) != 16 + length:
        raise RuntimeError(f"direct query {query!r} on port {port}: {data[:200]!r}")
    return data[16:]


def sim_control(port, **knobs):
    """Turn a simulated site's knobs (its control command), and wait until it has read them."""
    kv = ";".join(f"{k}={v}" for k, v in knobs.items())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.settimeout(10)
        s.sendall(f"COMMAND [0] LIVEMUX_SIM;{kv}\n\nGET status\nColumns: program_version\n"
                  f"ResponseHeader: fixed16\n\n".encode())
        while s.recv(4096):
            pass


def nft(rules):
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True, capture_output=True)


def drop_rules(table, matches):
    lines = "".join(f"    {m} drop\n" for m in matches)
    return (f"table inet {table} {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n"
            f"{lines}  }}\n}}\n")


class Sites:
    """Starts, stops and signals the sites, with bench.py's process helpers."""

    def __init__(self, b):
        self.b = b
        self.sites = []
        self.certs = None

    def start_sim(self, site):
        p = self.b.proc(f"{site.name}-{len(self.b.procs)}", [SIM, "--listen", f"tcp://127.0.0.1:{site.backend}",
                                                             "--name", site.name, "--hosts", str(SIM_HOSTS)])
        bench.wait_until(f"{site.name} listening", lambda: "listening" in p.text() or not p.alive(), 30)
        if not p.alive():
            raise RuntimeError(f"livemux-simsite {site.name} failed: {p.text('err')}")
        site.proc = p

    def kill_sim(self, site):
        p = site.proc
        p.p.kill()
        p.p.wait()
        self.b.procs.remove(p)

    def icinga_cmd(self, site, *args):
        r = subprocess.run([ICINGA, *args, "--dir", site.dir], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise RuntimeError(f"icinga-site.sh {args[0]} {site.name}: {r.stderr[-2000:]}")

    def start_all(self):
        port = 7000
        for i in range(3):
            s = Site(f"sim{i}", "sim", 7100 + i)
            s.backend = s.port = port + i
            self.start_sim(s)
            self.sites.append(s)
        tls = Site("tls", "tls", 7103)
        tls.backend = 7010
        self.start_sim(tls)
        self.certs = bench.make_certs(self.b.work)
        _, (front,) = bench.stunnels(self.b, [f"127.0.0.1:{tls.backend}"], self.certs)
        tls.port = int(front.rsplit(":", 1)[1])
        self.sites.append(tls)
        for i in range(2):
            s = Site(f"icinga{i}", "icinga", 7104 + i)
            addr, live = self.b.icinga(hosts=IC_HOSTS, services=IC_SERVICES)
            s.port, s.dir = int(addr.rsplit(":", 1)[1]), os.path.dirname(live)
            self.sites.append(s)
        for s in self.sites:
            direct = s.backend or s.port
            for q in set(QUERIES[s.qkind]):
                body = direct_query(direct, q)
                s.expected[q] = sorted(body.split(b"\n")) if s.kind == "icinga" else body

    def stop(self, site):
        if site.kind == "icinga":
            self.icinga_cmd(site, "stop", "--fast")
        else:
            self.kill_sim(site)

    def start(self, site):
        if site.kind == "icinga":
            self.icinga_cmd(site, "start", "--port", str(site.port), "--hosts", str(IC_HOSTS),
                            "--services", str(IC_SERVICES))
        else:
            self.start_sim(site)

    def signal(self, site, sig):
        if site.kind == "icinga":
            self.icinga_cmd(site, "signal", "--sig", sig)
        else:
            os.kill(site.proc.pid, signal.SIGSTOP if sig == "STOP" else signal.SIGCONT)


# === livemux ===

def dur(seconds):
    return f"{round(seconds * 1000)}ms"


class Livemux:
    def __init__(self, b, sites):
        self.b, self.sites = b, sites
        self.dir = os.path.join(b.work, "livemux")
        os.makedirs(self.dir)
        self.cfg = os.path.join(self.dir, "livemux.toml")
        self.state_file = os.path.join(self.dir, "state.json")
        self.proc = None

    def config(self, variant=None):
        """The configuration; `variant` ("channels", "extra_site", "cache") is a changed one for a reload."""
        d = self.dir
        text = (f'socket_dir = "{d}/s"\nstate_file = "{self.state_file}"\nspool_dir = "{d}/spool"\n'
                f'pid_file = "{d}/livemux.pid"\nstate_interval = "500ms"\nshutdown_grace = "2s"\n\n[defaults]\n'
                'channels = 2\nchannels_max = 4\npipeline_depth = 4\nkeepalive_count = 2\nmax_clients = 2000\n')
        text += "".join(f'{k} = "{dur(v)}"\n' for k, v in TIMEOUTS.items())
        for s in self.sites:
            scheme = "tls" if s.kind == "tls" else "tcp"
            text += f'\n[[site]]\nname = "{s.name}"\naddress = "{scheme}://127.0.0.1:{s.port}"\n'
            text += f'listen = "127.0.0.1:{s.listen_port}"\n'
            if s.kind == "tls":
                text += f'ca_file = "{self.certs["ca"]}"\n'
            if s.kind == "icinga":
                # Icinga 2 serves 2 x cores connections; leave room for an extra heartbeat and a direct client.
                text += "channels = 1\nchannels_max = 2\n"
                if variant == "cache":
                    text += 'cache_max_age = "2s"\n'
            elif variant == "channels":
                text += "channels = 3\npipeline_depth = 8\n"
        if variant == "extra_site":
            text += f'\n[[site]]\nname = "extra"\naddress = "tcp://127.0.0.1:{self.sites[0].port}"\n'
        with open(self.cfg, "w") as f:
            f.write(text)

    def start(self, certs):
        self.certs = certs
        self.config()
        self.proc = self.b.proc("livemux", [LIVEMUX, "run", "--config", self.cfg])
        for s in self.sites:
            s.sock = os.path.join(self.dir, "s", s.name)
        bench.wait_until("every site ready", lambda: self.all_ready() or not self.proc.alive(), 120)
        if not self.proc.alive():
            raise RuntimeError(f"livemux failed: {self.proc.text('err')[-2000:]}")

    def state(self):
        for _ in range(50):
            try:
                with open(self.state_file) as f:
                    return json.load(f)
            except (OSError, ValueError):
                time.sleep(0.05)
        raise RuntimeError("cannot read the state file")

    def fresh_state(self):
        """A state file written after this call."""
        t0 = time.time()
        bench.wait_until("a fresh state file", lambda: os.path.getmtime(self.state_file) > t0, 10)
        return self.state()

    def all_ready(self):
        try:
            return all(s.get("state") == "ready" for s in self.state()["sites"])
        except RuntimeError:
            return False

    def reload(self, variant):
        self.config(variant)
        os.kill(self.proc.pid, signal.SIGHUP)

    def fds(self):
        """livemux's open descriptors by kind (socket, pipe, anon_inode:[eventfd], a file's path)."""
        kinds = collections.Counter()
        d = f"/proc/{self.proc.pid}/fd"
        for fd in os.listdir(d):
            try:
                target = os.readlink(os.path.join(d, fd))
            except OSError:
                continue
            kinds[target.split(":")[0] if target.startswith(("socket:", "pipe:")) else target] += 1
        return kinds

    def rss(self):
        return self.proc.status("VmRSS")


def stuck_channels(state):
    """Channels not idle for longer than a heartbeat takes (busy, heartbeat or verifying), as name#id (state)."""
    at = datetime.datetime.fromisoformat(state["written_at"])
    limit = TIMEOUTS["heartbeat_timeout"] + MARGIN
    stuck = []
    for s in state["sites"]:
        for c in s.get("channels", []):
            age = (at - datetime.datetime.fromisoformat(c["since"])).total_seconds()
            if c.get("state") != "idle" and age > limit:
                stuck.append(f"{s['name']}#{c['id']} ({c['state']} for {age:.0f} s)")
    return stuck


def open_channels(state):
    """Channels open or being opened (each a socket)."""
    return sum(len(s.get("channels", [])) + s.get("channels_connecting", 0) for s in state["sites"])


# === the clients ===

class Answer:
    """What a client read: status (int, or "none", "badheader", "hung"), body, time of the first byte."""

    def __init__(self, status, body=b"", t_head=None, complete=True):
        self.status, self.body, self.t_head, self.complete = status, body, t_head, complete


async def read_body(reader, n, slow):
    """n bytes, slowly (1 KiB per 5-30 ms) for a slow reader; raises IncompleteReadError when short."""
    if not slow:
        return await reader.readexactly(n)
    out = b""
    while len(out) < n:
        chunk = await reader.read(min(1024, n - len(out)))
        if not chunk:
            raise asyncio.IncompleteReadError(out, n)
        out += chunk
        await asyncio.sleep(random.uniform(0.005, 0.03))
    return out


async def read_fixed16(reader, slow=False):
    timeout = TIMEOUTS["query_timeout"] + 10
    try:
        head = await asyncio.wait_for(reader.readexactly(16), timeout)
    except asyncio.IncompleteReadError as e:
        return Answer("none" if not e.partial else "badheader", e.partial, complete=False)
    except asyncio.TimeoutError:
        return Answer("hung", complete=False)
    except OSError as e:
        return Answer("none", str(e).encode(), complete=False)
    t_head = time.monotonic()
    m = re.fullmatch(rb"(\d{3}) +(\d+)\n", head)
    if not m:
        return Answer("badheader", head, t_head, False)
    try:
        body = await asyncio.wait_for(read_body(reader, int(m.group(2)), slow), 120)
    except asyncio.IncompleteReadError as e:
        return Answer(int(m.group(1)), e.partial, t_head, False)
    except (asyncio.TimeoutError, OSError):
        return Answer(int(m.group(1)), b"", t_head, False)
    return Answer(int(m.group(1)), body, t_head, True)


async def read_to_end(reader):
    timeout = TIMEOUTS["query_timeout"] + 10
    t_head = None
    body = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(1 << 16), max(0.01, deadline - time.monotonic()))
            if not chunk:
                break
            t_head = t_head or time.monotonic()
            body += chunk
            deadline = time.monotonic() + 120
    except asyncio.TimeoutError:
        return Answer("hung", body, t_head, False)
    except OSError as e:
        return Answer("none", str(e).encode(), t_head, False)
    return Answer("plain", body, t_head, True)


def request(query, fixed16=True, keepalive=True):
    lines = [query] + (["ResponseHeader: fixed16"] if fixed16 else []) + (["KeepAlive: on"] if keepalive else [])
    return ("\n".join(lines) + "\n\n").encode()


class Client:
    """One client of one kind, bound to one site, querying until the soak stops."""

    def __init__(self, chaos, kind, idx, site):
        self.chaos, self.kind, self.idx, self.site = chaos, kind, idx, site
        self.rng = random.Random(f"{chaos.seed}-{kind}-{idx}")
        self.conn = None
        self.conn_id = 0
        self.dropped_conn = None  # the connection whose packets a client_drop fault dropped ...
        self.dropped = (0, 0)     # ... from when to when (monotonic; the end is 0 while it lasts)
        self.local_port = None

    async def connect(self):
        if self.kind == "tcp_listener":
            r, w = await asyncio.open_connection("127.0.0.1", self.site.listen_port)
            self.local_port = w.get_extra_info("sockname")[1]
        else:
            limit = 2048 if self.kind == "slow_reader" else 1 << 16
            r, w = await asyncio.open_unix_connection(self.site.sock, limit=limit)
            if self.kind == "slow_reader":
                w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.conn_id += 1
        self.conn = (r, w)
        return self.conn

    def close(self, abort=False):
        if self.conn:
            w = self.conn[1]
            if abort:
                w.transport.abort()
            else:
                w.close()
            self.conn = None
            self.local_port = None

    async def run(self):
        await asyncio.sleep(self.rng.uniform(0, THINK[1]))
        while not self.chaos.stopping:
            try:
                await self.step()
            except OSError as e:
                # connect refused or reset while writing: livemux is not reachable
                self.close()
                self.chaos.record(self, None, "unclean", detail=f"{type(e).__name__}: {e}")
            await asyncio.sleep(self.rng.uniform(*THINK))
        self.close()

    def query(self, cached=False):
        return self.rng.choice(CACHED[self.site.qkind] if cached else QUERIES[self.site.qkind])

    async def step(self):
        k = self.kind
        if k == "per_query":
            await self.one_shot(fixed16=self.rng.random() < 0.5)
        elif k == "vanishing":
            await self.vanish()
        elif k == "pipelining":
            await self.pipeline()
        elif k == "command":
            await self.command()
        else:
            q = self.query(cached=k == "cache_reload")
            sent = q + "\nCache: reload" if k == "cache_reload" else q
            await self.keepalive([sent], [q])

    async def keepalive(self, sent, queries):
        """Send the queries in one write on the kept connection, read the answers in order."""
        r, w = self.conn or await self.connect()
        conn = self.conn_id
        w.write(b"".join(request(s) for s in sent))
        await w.drain()
        ref = time.monotonic()
        for q in queries:
            a = await read_fixed16(r, slow=self.kind == "slow_reader")
            self.chaos.judge(self, q, a, ref, conn)
            if not a.complete:
                self.close()
                return
            ref = max(ref, time.monotonic())

    async def pipeline(self):
        qs = [self.query() for _ in range(self.rng.randint(2, 5))]
        await self.keepalive(qs, qs)

    async def one_shot(self, fixed16):
        q = self.query()
        r, w = await asyncio.open_unix_connection(self.site.sock)
        try:
            w.write(request(q, fixed16, keepalive=False))
            await w.drain()
            ref = time.monotonic()
            a = await (read_fixed16(r) if fixed16 else read_to_end(r))
            self.chaos.judge(self, q, a, ref, None)
        finally:
            w.close()

    async def vanish(self):
        r, w = await asyncio.open_unix_connection(self.site.sock)
        try:
            w.write(request(self.query(), keepalive=False))
            await w.drain()
            want = self.rng.randint(0, 4000)
            got = 0
            while got < want:
                chunk = await asyncio.wait_for(r.read(want - got), TIMEOUTS["query_timeout"] + 10)
                if not chunk:
                    break
                got += len(chunk)
        except asyncio.TimeoutError:
            pass
        finally:
            w.transport.abort()
        self.chaos.record(self, None, "vanished")

    async def command(self):
        r, w = self.conn or await self.connect()
        conn = self.conn_id
        w.write(request(COMMAND.format(ts=int(time.time()))))
        await w.drain()
        ref = time.monotonic()
        a = await read_fixed16(r)
        self.chaos.judge(self, None, a, ref, conn)
        if not a.complete:
            self.close()
            return
        q = self.query()
        await self.keepalive([q], [q])


# === the soak ===

class Chaos:
    def __init__(self, args):
        self.args = args
        self.seed = args.seed
        self.rng = random.Random(args.seed)
        self.stopping = False
        self.faults = collections.Counter()
        self.fault_secs = collections.Counter()
        self.outcomes = collections.defaultdict(collections.Counter)  # client kind -> outcome -> count
        self.beyond = collections.Counter()  # status -> errors later than one attempt's bound
        self.worst = collections.Counter()  # status -> the slowest error answer of that status, seconds
        self.slowest = {}  # status -> which query that was
        self.examples = collections.defaultdict(list)  # failure -> examples
        self.reasons = collections.Counter()
        self.victims = collections.Counter()  # what the client_drop faults' victims saw
        self.clients = []
        self.fault_tasks = set()
        self.bounds, self.detect = bounds()
        self.reloads = 0
        self.phase = "warm-up"
        self.kinds = args.faults
        self.site_back = {}  # site -> seconds after the faults until it answered a direct query in time

    # --- judging answers ---

    def record(self, client, query, outcome, detail=""):
        self.outcomes[client.kind][outcome] += 1
        if outcome == "victim":
            self.victims[detail] += 1
        if outcome in FAILURES and len(self.examples[outcome]) < 5:
            self.examples[outcome].append(f"{client.kind} #{client.idx} on {client.site.name} "
                                          f"({self.phase}, {time.strftime('%H:%M:%S')}): {query!r}: {detail}")

    def judge(self, client, query, a, ref, conn):
        """Classify one answer; `query` None is a COMMAND (its answer is an empty 200)."""
        site = client.site
        start, end = client.dropped
        victim = conn is not None and conn == client.dropped_conn and ref < (end or time.monotonic())
        if a.status == "plain":  # no fixed16: the body alone, ended by the end of the connection
            if site.same(query, a.body):
                return self.record(client, query, "ok")
            text = a.body.decode(errors="replace")
            if LIVEMUX_REASON.match(text) and text.count("\n") <= 1:
                return self.error(client, query, status_of_reason(text), text.strip(), a, ref, False)
            prefix = site.expected[query]
            short = (site.kind != "icinga" and prefix.startswith(a.body)) or (
                site.kind == "icinga" and len(a.body) < sum(len(x) + 1 for x in prefix))
            return self.record(client, query, "truncated" if short else "wrong",
                               f"{len(a.body)} bytes: {a.body[:120]!r}")
        if not isinstance(a.status, int):
            if victim:
                return self.record(client, query, "victim", "no answer" if a.status == "hung" else "closed")
            return self.record(client, query, "hung" if a.status == "hung" else "unclean",
                               f"{a.status}: {a.body[:120]!r}")
        if a.status == 200:
            if not a.complete:
                return self.record(client, query, "victim" if victim else "cut", "200, cut")
            if query is None:
                return self.record(client, query, "ok" if a.body == b"" else "wrong", repr(a.body[:120]))
            if site.same(query, a.body):
                return self.record(client, query, "ok")
            return self.record(client, query, "wrong", f"{len(a.body)} bytes: {a.body[:120]!r}")
        text = a.body.decode(errors="replace").strip()
        if not a.complete or not text or "\n" in text:
            if victim:
                return self.record(client, query, "victim", f"{a.status}, cut")
            return self.record(client, query, "unclean", f"{a.status}: {a.body[:200]!r}")
        self.error(client, query, a.status, text, a, ref, victim)

    def error(self, client, query, status, text, a, ref, victim):
        """A clean error answer: its status and its time. A client whose packets were dropped while it waited
        got its answer late through no fault of livemux's: that counts as a victim's outcome, not as late."""
        if status not in self.bounds:
            return self.record(client, query, "unexpected code", f"{status}: {text[:200]}")
        took = (a.t_head or time.monotonic()) - ref
        late = took > self.bounds[status] + MARGIN
        if late and victim:
            return self.record(client, query, "victim", f"{status}, late")
        self.record(client, query, f"e{status}")
        self.reasons[re.sub(r"\d+", "N", re.sub(r"'[^']*'", "'X'", text))[:110]] += 1
        if took > self.worst[status]:
            self.worst[status] = took
            self.slowest[status] = (f"{client.kind} #{client.idx} on {client.site.name} "
                                    f"({time.strftime('%H:%M:%S')}): {query!r}: {took:.2f} s: {text[:200]}")
        if late:
            self.record(client, query, "late", f"{status} after {took:.2f} s (bound {self.bounds[status]:g} s "
                                               f"+ {MARGIN:g} s): {text[:200]}")
        elif status == 502 and took > self.detect + MARGIN:
            self.beyond[status] += 1

    # --- faults ---

    def free_sites(self, pred=lambda s: True):
        return [s for s in self.sites.sites if not s.busy and pred(s)]

    async def inject(self, kind):
        """Start one fault of `kind`; False when nothing can take it now."""
        rng = self.rng
        if kind == "client_drop":
            victims = [c for c in self.clients if c.kind == "tcp_listener" and c.local_port
                       and c.dropped_conn != c.conn_id]
            if not victims:
                return False
            target = rng.choice(victims)
            coro = self.client_drop(target, rng.uniform(2, 6))
        elif kind == "sighup":
            if self.reloading:
                return False
            coro = self.sighup(rng.choice(["channels", "extra_site", "cache"]), rng.uniform(1, 4))
        else:
            knob_fault = kind in ("close_mid_answer", "slow_answer")
            sites = self.free_sites(lambda s: s.kind != "icinga" or not knob_fault)
            if not sites:
                return False
            site = rng.choice(sites)
            site.busy = True
            coro = getattr(self, kind)(site, rng)
        self.faults[kind] += 1
        if kind not in ("client_drop", "sighup"):
            log(f"fault {kind}: {site.name}")
        task = asyncio.create_task(self.timed(kind, coro))
        self.fault_tasks.add(task)
        task.add_done_callback(self.fault_tasks.discard)
        return True

    async def timed(self, kind, coro):
        t0 = time.monotonic()
        try:
            await coro
        except Exception as e:  # a fault that cannot be injected or lifted is the script's failure
            self.fault_errors.append(f"{kind}: {type(e).__name__}: {e}")
            log(f"fault {kind} failed: {e}")
        self.fault_secs[kind] += time.monotonic() - t0

    async def restart(self, site, rng):
        try:
            await asyncio.to_thread(self.sites.stop, site)
            await asyncio.sleep(rng.uniform(0.5, 3))
            await asyncio.to_thread(self.sites.start, site)
        finally:
            site.busy = False

    async def sigstop(self, site, rng):
        try:
            await asyncio.to_thread(self.sites.signal, site, "STOP")
            await asyncio.sleep(rng.uniform(0.5, 5))
            await asyncio.to_thread(self.sites.signal, site, "CONT")
        finally:
            site.busy = False

    async def blackhole(self, site, rng):
        table = f"chaos_bh_{site.name}"
        try:
            await asyncio.to_thread(nft, drop_rules(table, [f"tcp sport {site.port}", f"tcp dport {site.port}"]))
            await asyncio.sleep(rng.uniform(1, 6))
            await asyncio.to_thread(subprocess.run, ["nft", "delete", "table", "inet", table], check=True)
        finally:
            site.busy = False

    async def knobs(self, site, rng, on, off):
        log(f"  knobs of {site.name}: {on}")
        try:
            await asyncio.to_thread(sim_control, site.backend, **on)
            await asyncio.sleep(rng.uniform(1, 5))
            await asyncio.to_thread(sim_control, site.backend, **off)
        finally:
            site.busy = False

    async def close_mid_answer(self, site, rng):
        await self.knobs(site, rng, {"close_after_bytes": rng.randint(500, 40000)}, {"close_after_bytes": "none"})

    async def slow_answer(self, site, rng):
        how = rng.randrange(3)
        if how == 0:  # every answer late, heartbeats too
            on = {"delay_ms": rng.randint(100, 1500)}
        elif how == 1:  # answers trickle
            on = {"write_chunk": rng.randint(2048, 8192), "write_pause_ms": rng.randint(10, 60)}
        else:  # one table's answers late, up to past query_timeout; heartbeats (status) are answered
            on = {"fault_table": "services", "delay_ms": rng.randint(2000, 10000)}
        await self.knobs(site, rng, on, {"delay_ms": 0, "write_chunk": 0, "write_pause_ms": 0, "fault_table": "none"})

    async def client_drop(self, client, secs):
        client.dropped_conn = client.conn_id
        client.dropped = (time.monotonic(), 0)
        log(f"fault client_drop: {client.kind} #{client.idx} (port {client.local_port}) for {secs:.1f} s")
        port, lport = client.local_port, client.site.listen_port
        table = f"chaos_cd_{client.idx}"
        await asyncio.to_thread(nft, drop_rules(table, [f"tcp sport {port} tcp dport {lport}",
                                                        f"tcp sport {lport} tcp dport {port}"]))
        await asyncio.sleep(secs)
        await asyncio.to_thread(subprocess.run, ["nft", "delete", "table", "inet", table], check=True)
        client.dropped = (client.dropped[0], time.monotonic())

    async def sighup(self, variant, secs):
        log(f"fault sighup: {variant} for {secs:.1f} s")
        self.reloading = True
        try:
            self.lm.reload(variant)
            self.reloads += 1
            await asyncio.sleep(secs)
            self.lm.reload(None)
            self.reloads += 1
        finally:
            self.reloading = False

    async def injector(self, until):
        deck = []
        while time.monotonic() < until:
            if not deck:
                deck = self.kinds[:]
                self.rng.shuffle(deck)
            kind = deck.pop()
            if not await self.inject(kind):
                deck.insert(0, kind)  # try it again later
                await asyncio.sleep(0.2)
                continue
            await asyncio.sleep(self.rng.uniform(1, 3))

    async def loop_lag(self):
        """The worst delay of this script's event loop (it inflates the measured times)."""
        while not self.stopping:
            t0 = time.monotonic()
            await asyncio.sleep(0.1)
            self.max_lag = max(self.max_lag, time.monotonic() - t0 - 0.1)

    # --- the run ---

    async def soak(self):
        self.reloading = False
        self.fault_errors = []
        self.max_lag = 0.0
        per_kind = self.args.clients
        for kind in KINDS:
            for i in range(per_kind):
                site = self.sites.sites[i % len(self.sites.sites)]
                self.clients.append(Client(self, kind, i, site))
        tasks = [asyncio.create_task(c.run()) for c in self.clients]
        lag = asyncio.create_task(self.loop_lag())
        log(f"warm-up: {len(self.clients)} clients, {WARMUP:.0f} s without faults")
        await asyncio.sleep(WARMUP)
        self.rss_base = self.lm.rss()
        self.phase = "faults"
        secs = self.args.minutes * 60
        log(f"faults for {secs:.0f} s")
        await self.injector(time.monotonic() + secs)
        log("faults stop; waiting for the ones in progress to be lifted")
        while self.fault_tasks:
            await asyncio.wait(list(self.fault_tasks))
        self.phase = "recovery"
        t = TIMEOUTS
        recover = t["heartbeat_interval"] + t["heartbeat_timeout"] + t["connect_retry"] + MARGIN
        lifted = time.monotonic()
        # livemux cannot be ready before the site is: a core may itself take a while to answer again (Icinga 2's
        # few Livestatus threads stay held by connections a black hole cut until their FIN gets through).
        await asyncio.gather(*(self.answers_directly(s, lifted) for s in self.sites.sites))
        slow = {k: v for k, v in self.site_back.items() if v > 0.5}
        if slow:
            log("sites slow to answer directly after the faults: "
                + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(slow.items())))
        back = max([v for v in self.site_back.values() if v is not None], default=0.0)
        await asyncio.sleep(max(0.0, lifted + back + recover - time.monotonic()))
        state = await asyncio.to_thread(self.lm.fresh_state)
        self.not_ready = [f"{s['name']} ({s.get('state')}: {s.get('last_error')})" for s in state["sites"]
                          if s.get("state") != "ready"]
        self.not_ready += [f"{k} (the site itself did not answer within {SITE_BACK_LIMIT:g} s)"
                           for k, v in self.site_back.items() if v is None]
        log(f"{recover:.1f} s after the faults (and the sites): not ready: {self.not_ready or 'none'}; "
            "stopping the clients")
        self.stopping = True
        await asyncio.gather(*tasks)
        lag.cancel()

    async def answers_directly(self, site, since):
        """Wait until the site itself answers a direct query within heartbeat_timeout (what livemux's heartbeat
        asks of it); record how long after `since` that was (None: not within SITE_BACK_LIMIT)."""
        port = site.backend or site.port
        limit = TIMEOUTS["heartbeat_timeout"]
        while time.monotonic() - since < SITE_BACK_LIMIT:
            try:
                await asyncio.to_thread(direct_query, port, "GET status\nColumns: program_start", limit)
                self.site_back[site.name] = time.monotonic() - since
                return
            except (OSError, RuntimeError, ValueError):
                await asyncio.sleep(0.1)
        self.site_back[site.name] = None

    def settle(self):
        """After the clients are gone: channels, clients, descriptors, memory, log."""
        t = TIMEOUTS
        time.sleep(t["channel_idle_timeout"] + t["heartbeat_interval"] + MARGIN)
        deadline = time.monotonic() + 10
        while True:
            state = self.lm.fresh_state()
            busy = stuck_channels(state)
            clients = sum(s.get("clients_connected", 0) + s.get("clients_waiting", 0) for s in state["sites"])
            fds = self.lm.fds()
            fd_leak = sum(fds.values()) - (sum(self.fd_base.values()) - self.channels_base + open_channels(state))
            if (not busy and clients == 0 and fd_leak <= 0) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        err = self.lm.proc.text("err")
        return dict(state=state, busy=busy, clients=clients, fds=fds, fd_leak=fd_leak, rss=self.lm.rss(),
                    channels=open_channels(state),
                    panics=err.count("panicked"), alive=self.lm.proc.alive(), reloads=state.get("reloads", {}))

    def run(self):
        b = bench.Bench(quick=True)
        self.sites = Sites(b)
        try:
            log("starting the sites")
            self.sites.start_all()
            self.lm = Livemux(b, self.sites.sites)
            self.lm.start(self.sites.certs)
            want = sum(1 if s.kind == "icinga" else 2 for s in self.sites.sites)
            bench.wait_until("the channels open", lambda: open_channels(self.lm.fresh_state()) >= want, 30)
            # The baseline: the fewest descriptors besides channels in a few samples (not a transient one).
            samples = []
            for _ in range(5):
                state, fds = self.lm.fresh_state(), self.lm.fds()
                samples.append((sum(fds.values()) - open_channels(state), open_channels(state), fds))
            _, self.channels_base, self.fd_base = min(samples, key=lambda x: x[0])
            started = time.monotonic()
            asyncio.run(self.soak())
            end = self.settle()
            end["took"] = time.monotonic() - started
            ok, text = self.report(end)
            if self.args.log:
                shutil.copy(self.lm.proc.err, self.args.log)
            elif not ok:
                kept = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"chaos-{self.seed}-livemux.log")
                shutil.copy(self.lm.proc.err, kept)
                text += f"\nlivemux's log: {kept}\n"
            return ok, text
        finally:
            for s in self.sites.sites:
                if s.proc and s.proc.alive():
                    os.kill(s.proc.pid, signal.SIGCONT)
            b.close()

    # --- the report ---

    def report(self, end):
        ok = True
        lines = []
        lines.append(table(["fault", "injected", "total s"],
                           [[k, str(self.faults[k]), f"{self.fault_secs[k]:.0f}"] for k in FAULTS]))
        cols = ["ok", "e502", "e503", "e504", "cut", "vanished", "victim"] + FAILURES
        names = {"ok": "200 equal", "e502": "502", "e503": "503", "e504": "504", "cut": "cut (visible)",
                 "vanished": "vanished (by design)", "victim": "client-drop victim", "late": "late errors"}
        rows = []
        total = collections.Counter()
        for kind in KINDS:
            c = self.outcomes[kind]
            n = sum(v for k, v in c.items() if k != "late")
            total.update(c)
            rows.append([kind, str(n)] + [str(c[k]) for k in cols])
        rows.append(["**all**", str(sum(v for k, v in total.items() if k != "late"))] + [str(total[k]) for k in cols])
        lines.append(table(["client kind", "queries"] + [names.get(k, k) for k in cols], rows))
        t = TIMEOUTS
        rss_ok = end["rss"] <= self.rss_base + RSS_SLACK
        reloads = end["reloads"]
        checks = [
            ("truncated answers", str(total["truncated"]), total["truncated"] == 0),
            ("wrong answers", str(total["wrong"]), total["wrong"] == 0),
            ("unclean answers (no code or reason, closed without an answer)", str(total["unclean"]),
             total["unclean"] == 0),
            ("error codes other than 502/503/504", str(total["unexpected code"]), total["unexpected code"] == 0),
            ("queries without an answer within query_timeout + 10 s", str(total["hung"]), total["hung"] == 0),
            ("errors later than their bound + " f"{MARGIN:g} s ("
             + ", ".join(f"{k}: {v:g} s" for k, v in sorted(self.bounds.items())) + "); the slowest of each status",
             f"{total['late']} (" + ", ".join(f"{k}: {self.worst[k]:.2f} s" for k in sorted(self.bounds)) + ")",
             total["late"] == 0),
            (f"(information) 502s later than one attempt's heartbeat detection bound, {self.detect:g} s + "
             f"{MARGIN:g} s (a query retried once on a fresh channel may take longer, within query_timeout)",
             str(self.beyond[502]), True),
            (f"sites not ready {t['heartbeat_interval'] + t['heartbeat_timeout'] + t['connect_retry'] + MARGIN:.1f} s "
             "after the faults, or after the site itself answered again (" + site_back(self.site_back) + ")",
             ", ".join(self.not_ready) or "0", not self.not_ready),
            (f"channels not idle (busy, heartbeat, verifying) for over heartbeat_timeout + {MARGIN:g} s after the "
             "clients left", ", ".join(end["busy"]) or "0", not end["busy"]),
            ("clients still counted by livemux", str(end["clients"]), end["clients"] == 0),
            (f"leaked descriptors (end − baseline, corrected for open channels; at most {FD_SLACK} in flight)",
             f"{end['fd_leak']} ({sum(self.fd_base.values())} → {sum(end['fds'].values())}; channels "
             f"{self.channels_base} → {end['channels']}{fd_change(self.fd_base, end['fds'])})",
             end["fd_leak"] <= FD_SLACK),
            ("RSS after warm-up → end", f"{self.rss_base / bench.MIB:.1f} → {end['rss'] / bench.MIB:.1f} MiB",
             rss_ok),
            ("panics in the log", str(end["panics"]), end["panics"] == 0 and end["alive"]),
            ("reloads applied / failed", f"{reloads.get('ok', 0)} of {self.reloads} / {reloads.get('failed', 0)}",
             reloads.get("ok", 0) == self.reloads and reloads.get("failed", 0) == 0),
            ("faults that could not be injected or lifted", str(len(self.fault_errors)), not self.fault_errors),
        ]
        if self.args.minutes >= 10:
            few = [k for k in self.kinds if self.faults[k] < 20]
            checks.append(("fault kinds injected fewer than 20 times", ", ".join(few) or "0", not few))
        for _, _, good in checks:
            ok = ok and good
        lines.append(table(["invariant", "measured", "held"],
                           [[n, m, "yes" if g else "**no**"] for n, m, g in checks]))
        lines.append(table(["error reason (names and numbers replaced)", "count"],
                           [[f"`{r}`", str(n)] for r, n in self.reasons.most_common(12)]))
        head = (f"`scripts/chaos.py --minutes {self.args.minutes:g} --seed {self.seed}` on "
                f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, {bench.machine()}; "
                f"{len(self.clients)} clients ({self.args.clients} of each kind), {len(self.sites.sites)} sites; "
                f"took {end['took'] / 60:.1f} min; this script's worst event-loop delay {self.max_lag * 1000:.0f} ms.")
        text = head + "\n\n" + "\n\n".join(lines) + "\n"
        problems = [f"- {k}: {e}" for k, ex in self.examples.items() for e in ex] + \
            [f"- fault: {e}" for e in self.fault_errors]
        if problems:
            text += "\nExamples:\n\n" + "\n".join(problems) + "\n"
        text += "\nThe slowest error answer of each status:\n\n" + "\n".join(
            f"- {status}: {what}" for status, what in sorted(self.slowest.items())) + "\n"
        cache = collections.Counter()
        for site in end["state"]["sites"]:
            cache.update({k: v for k, v in (site.get("cache") or {}).items() if isinstance(v, int)})
        text += (f"\nlivemux's query cache over the run: {cache['hits']} hits, {cache['misses']} misses, "
                 f"{cache['coalesced']} coalesced, {cache['invalidations']} invalidations.\n")
        if self.victims:
            text += ("\nThe client_drop faults' victims (their connection's packets were dropped for a while): "
                     + ", ".join(f"{how}: {n}" for how, n in self.victims.most_common()) + ".\n")
        text += f"\nResult: {'every invariant held' if ok else '**an invariant failed**'}.\n"
        return ok, text


def site_back(back):
    """The sites that answered a direct query in time only later than 0.5 s after the faults."""
    slow = [f"{k}: {'never' if v is None else f'{v:.1f} s'}" for k, v in sorted(back.items()) if v is None or v > 0.5]
    return "the sites' own: " + (", ".join(slow) if slow else "all within 0.5 s")


def fd_change(before, after):
    """What changed between two descriptor counts by kind, e.g. '; +1 socket'."""
    diff = [f"{after[k] - before[k]:+d} {k}" for k in sorted(set(before) | set(after)) if after[k] != before[k]]
    return "; " + ", ".join(diff) if diff else ""


FAILURES = ["truncated", "wrong", "unclean", "unexpected code", "hung", "late"]


table = bench.table


# === set-up ===

def missing_tools():
    need = ["unshare", "ip", "nft", "stunnel4", "openssl", "icinga2", "cargo"]
    miss = [t for t in need if shutil.which(t) is None]
    if os.geteuid() != 0:
        miss.append("root (a private network namespace and nftables)")
    return miss


def fault_kinds(text):
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in FAULTS]
    if bad or not kinds:
        raise argparse.ArgumentTypeError(f"unknown fault kind(s) {', '.join(bad) or '(none given)'}; "
                                         f"known: {', '.join(FAULTS)}")
    return kinds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=1.0, help="length of the fault phase (default 1)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    ap.add_argument("--clients", type=int, default=50, help="clients of every kind (default 50)")
    ap.add_argument("--report", help="also write the Markdown report to this file")
    ap.add_argument("--faults", type=fault_kinds, default=FAULTS,
                    help=f"the kinds of fault to inject, comma-separated (default all: {','.join(FAULTS)})")
    ap.add_argument("--log", help="keep livemux's log in this file (by default only when an invariant failed)")
    args = ap.parse_args()
    if os.environ.get(NETNS_ENV) != "1":
        miss = missing_tools()
        if miss:
            msg = f"chaos.py: missing: {', '.join(miss)} (scripts/install-test-deps.sh installs the tools)"
            if os.environ.get("CI"):
                sys.exit(msg)
            print(msg + "; not running", file=sys.stderr)
            sys.exit(0)
        log("building the release binaries")
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "livemux", "-p", "livemux-simsite"],
                       cwd=ROOT, check=True)
        argv = sys.argv[1:]
        if args.seed is None:
            argv += ["--seed", str(random.randrange(1 << 31))]
        env = dict(os.environ, **{NETNS_ENV: "1"})
        os.execvpe("unshare", ["unshare", "--net", "--", sys.executable, os.path.abspath(__file__), *argv], env)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    log(f"in a private network namespace; seed {args.seed}")
    random.seed(args.seed)
    ok, text = Chaos(args).run()
    print(text)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
