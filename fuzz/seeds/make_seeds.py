#!/usr/bin/env python3
"""Seed corpora for livemux's fuzz targets, from real traffic.

Requests are the Icinga 2 battery of tests/it/realpeers.rs (and variants a
GUI sends); answers are what a real Icinga 2 site (scripts/icinga-site.sh)
answered to them. Usage:

    scripts/icinga-site.sh start --dir /tmp/site --port 16557 --hosts 4 --services 3
    fuzz/seeds/make_seeds.py --port 16557 --out fuzz/corpus-seeds

Each file is one input; the streamed targets' inputs begin with a knob
byte and a chunk-size count byte (see src/fuzzing/mod.rs): b"\\0\\0" means
default limits, no fuzzer-chosen chunking.
"""
import argparse
import glob
import hashlib
import os
import re
import socket

BATTERY = [
    "GET hosts\nColumns: name state address groups num_services\n",
    "GET hosts\nColumns: name state plugin_output\nFilter: state = 1\nLimit: 10\n",
    "GET hosts\nColumns: name\nFilter: groups >= db\nFilter: state = 0\nAnd: 2\nOutputFormat: json\n",
    "GET services\nColumns: host_name description state plugin_output perf_data\nFilter: state != 0\n",
    "GET services\nColumns: host_name description groups\nOutputFormat: json\n",
    "GET services\nStats: state = 0\nStats: state = 1\nStats: state = 2\nStats: state = 3\n",
    "GET services\nColumns: description\nStats: state != 0\nOutputFormat: json\n",
    "GET services\nStats: sum state\nStats: max state\nStats: min state\n",
    "GET hostgroups\nColumns: name num_hosts members\n",
    "GET servicegroups\nColumns: name num_services\nOutputFormat: json\n",
    "GET contacts\nColumns: name email\n",
    "GET comments\nColumns: host_name comment author\n",
    "GET downtimes\nColumns: host_name comment\nOutputFormat: json\n",
    "GET status\nColumns: program_version livestatus_version num_hosts num_services program_start\n",
    "GET nosuchtable\n",
    "GET hosts\nColumns: nosuchcolumn\n",
    "GET hosts\nColumns: name\nFilter: state = abc\n",
    "GET hosts\nColumns: name\nFilter: name <> host-0001\n",
    "GET hosts\nColumns: name\nFoo: bar\nLimit: 2\n",
    "GET hosts\nColumns: name\nFilter: name\n",
    "GET services\nStats: foo\n",
    "get hosts\nColumns: name\n",
    "GET hosts\nColumns: name\nLimit: abc\n",
    "GET status\nColumns: program_start\nCache: reload\n",
]

# What a GUI or a federated client adds.
CLIENT_ONLY = [
    "GET hosts\nColumns: name state\nKeepAlive: on\nResponseHeader: fixed16\nAuthUser: omdadmin\n",
    "GET services\nColumns: host_name description state\nOutputFormat: python3\nColumnHeaders: on\n",
    "GET hosts\r\nColumns: name\r\nResponseHeader: fixed16\r\n",
    "COMMAND [1700000000] SCHEDULE_FORCED_HOST_CHECK;host-0001;1700000000\n"
    "COMMAND [1700000000] ACKNOWLEDGE_HOST_PROBLEM;host-0002;1;1;1;omdadmin;ack\nResponseHeader: fixed16\n",
    "GET hosts\nColumns: site name state\nSites: alpha beta\nSort: name desc\nLimit: 3\nOffset: 1\nOutputFormat: json\n",
    "GET services\nColumns: site host_name\nStats: avg state\nStats: sum state\nOutputFormat: wrapped_json\nColumnHeaders: on\n",
    "GET hosts\nColumns: name\nFilter: site = beta\nSeparators: 10 59 44 124\n",
    "GET services\nStats: state = 0\nStats: state = 1\nStatsOr: 2\nStatsNegate:\nOutputFormat: python\n",
]


def ask(port, request):
    """The site's raw answer (fixed16 header and body) to a request."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        lines = request.rstrip("\n").split("\n")
        lines.insert(1, "ResponseHeader: fixed16")
        s.sendall(("\n".join(lines) + "\n\n").encode())
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            b = s.recv(65536)
            if not b:
                return out
            out += b


def save(out, target, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def python3_answers():
    """python3 answers as Checkmk's renderer writes them (Icinga 2 has no
    python3 output): an inventory batch (name, mtime, tree, gz blob)."""
    gz = bytes.fromhex("1f8b0800000000000003abae050043bfa6a302000000")

    def blob(b):
        return 'b"' + "".join(chr(c) if 32 <= c <= 127 and c not in b'"\\' else "\\x%02x" % c for c in b) + '"'

    tree = b"{'hardware': {'cpu': {'model': 'Xeon \xe2\x84\xa2', 'cores': 8}}}"
    return [
        '[["host-0001",1700000000,%s,%s],\n["host-0002",0,b"",b""]]\n' % (blob(tree), blob(gz)),
        '[[1700000000]]\n',
        '[["host-0001",1700000000],\n["host-0002",1700000123],\n["h\\u00e9",-1]]\n',
        "[[None,1.5,-2,True,False,u'x\\'y',b'\\101\\x00\\u00ff',\"\\U0001f600\"]]\n",
        "[]\n",
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--repo", default=os.path.join(os.path.dirname(__file__), "..", ".."))
    a = ap.parse_args()
    pre = b"\0\0"
    answers = {}
    for q in BATTERY:
        answers[q] = ask(a.port, q)
        save(a.out, "request_framing", pre + (q + "\n").encode())
        save(a.out, "fixed16_response", pre + answers[q])
    for q in CLIENT_ONLY:
        save(a.out, "request_framing", pre + (q + "\n").encode())
    # Several requests on one connection, and one ended by EOF.
    save(a.out, "request_framing", pre + ("\n" + "KeepAlive: on\n\n".join(BATTERY[:3]) + "\n" + BATTERY[3]).encode())
    # Small limits (knob 0x15: 64-byte requests, 8-byte lines, no header lines).
    save(a.out, "request_framing", b"\x15\x02\x03\x10" + (BATTERY[1] + "\n").encode())
    # Cores' unframed errors.
    for e in [b"400: Unknown command 'FOO'\n", b"Invalid request method\n", b"\x16\x03\x01\x02\x00\x01\x00"]:
        save(a.out, "fixed16_response", pre + e)
    # Federated: the client's request, then each site's JSON answer.
    for q in [q for q in BATTERY + CLIENT_ONLY if "json" in q or "Stats" in q]:
        site_q = q.replace("OutputFormat: json\n", "") + "OutputFormat: json\n"
        body = ask(a.port, site_q)[16:]
        save(a.out, "federation_answer", pre + q.encode() + b"\0" + body + b"\0" + body)
    for fed in CLIENT_ONLY[4:]:
        body = ask(a.port, "GET hosts\nColumns: name state\nOutputFormat: json\n")[16:]
        save(a.out, "federation_answer", pre + fed.encode() + b"\0" + body + b"\0" + b'[["x",1]' + b"\0" + body)
    for p in python3_answers():
        save(a.out, "python3_rows", pre + p.encode())
    for f in glob.glob(os.path.join(a.repo, "tests/fixtures/liveproxyd/*.mk")):
        text = open(f, "rb").read()
        save(a.out, "liveproxyd_literal", text)
        save(a.out, "liveproxyd_import", text)
        g = os.path.join(a.repo, "tests/fixtures/liveproxyd/global.mk")
        save(a.out, "liveproxyd_import", text + b"\0" + open(g, "rb").read())
    for f in glob.glob(os.path.join(a.repo, "tests/fixtures/liveproxyd/*.toml")):
        save(a.out, "config_toml", open(f, "rb").read())
    # The configuration reference's and the README's examples, and the configuration the unit tests start from.
    readme = open(os.path.join(a.repo, "docs/CONFIGURATION.md")).read() + open(os.path.join(a.repo, "README.md")).read()
    for block in re.findall(r"```toml\n(.*?)```", readme, re.S):
        save(a.out, "config_toml", block.encode())
    tests = open(os.path.join(a.repo, "src/config/tests.rs")).read()
    good = re.search(r'const GOOD: &str = r#"(.*?)"#;', tests, re.S).group(1)
    save(a.out, "config_toml", good.encode())
    extra = '[[federation]]\nname = "all"\non_site_error = "fail"\n[inventory]\ndir = "/x"\ninterval = "1m"\n' \
        '[spool]\nmemory_budget = "64MiB"\n'
    save(a.out, "config_toml", (good + extra).encode())


if __name__ == "__main__":
    main()
