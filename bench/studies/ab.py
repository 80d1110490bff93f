#!/usr/bin/env python3
"""bench/studies/ab.py -- interleaved A/B of two built trees: server CPU per message.

    bench/studies/ab.py A_TREE B_TREE [--rounds N] [--seconds S]

Each tree is a checkout with `make all` done (build/luahost, examples/echo.lua).
For every round and workload, A and B run one after the other (order
alternating per round), each server pinned to CPU 0 and loadgen to CPU 1, so
that a slow spell of the machine hits both alike. Prints, per workload, the
min / median / max of server CPU (us) per message (per handshake for TLS
churn) for A and B and the ratio of medians B/A (below 1: B is cheaper).
"""
import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
LOADGEN = os.path.join(HERE, "..", "build", "loadgen")

WORKLOADS = [
    ("echo 64B d1", [], ["--mode", "echo", "--depth", "1"]),
    ("echo 64B d16", [], ["--mode", "echo", "--depth", "16"]),
    ("bulk 64KiB", [], ["--mode", "bulk"]),
    ("tls echo d16", ["tls"], ["--tls", "--mode", "echo", "--depth", "16"]),
    ("tls handshakes", ["tls"], ["--tls", "--mode", "churn"]),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cert(d):
    cert, key = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=localhost"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cert, key


def wait_listening(port, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("server on %d did not start" % port)


def run_one(tree, extra, lg_args, cert, seconds):
    port = free_port()
    argv = ["taskset", "-c", "0", os.path.join(tree, "build", "luahost"), "examples/echo.lua",
            str(port)] + (list(cert) if extra else [])
    srv = subprocess.Popen(argv, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        out = subprocess.run(["taskset", "-c", "1", LOADGEN, "--port", str(port), "--duration",
                              str(seconds), "--warmup", "0.5", "--server-pid", str(srv.pid)]
                             + lg_args, capture_output=True, text=True, timeout=seconds + 60).stdout
    finally:
        srv.terminate()
        srv.wait()
    kv = dict(re.findall(r"(\w+)=([\d.]+)", out))
    if "handshakes" in kv and float(kv["handshakes"]) > 0:
        return float(kv["srv_cpu_us"]) / float(kv["handshakes"])
    if "srv_cpu_us_per_msg" in kv:
        return float(kv["srv_cpu_us_per_msg"])
    if "bytes" in kv and float(kv["bytes"]) > 0:  # bulk: per 64 KiB
        return float(kv["srv_cpu_us"]) / (float(kv["bytes"]) / 65536)
    raise RuntimeError("no figure in: " + out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2)
    ap.add_argument("--only", default="", help="comma list of workload name prefixes")
    args = ap.parse_args()
    if not shutil.which("taskset") or not os.path.exists(LOADGEN):
        sys.exit("bench/studies/ab.py needs taskset and bench/build/loadgen (make -C bench)")
    tmp = tempfile.mkdtemp()
    cert = make_cert(tmp)
    only = [p for p in args.only.split(",") if p]
    results = {}
    for r in range(args.rounds):
        for name, extra, lg in WORKLOADS:
            if only and not any(name.startswith(p) for p in only):
                continue
            order = [("A", args.a), ("B", args.b)]
            if r % 2:
                order.reverse()
            for label, tree in order:
                v = run_one(tree, extra, lg, cert, args.seconds)
                results.setdefault(name, {}).setdefault(label, []).append(v)
                print("round %d %-15s %s %.3f" % (r + 1, name, label, v), file=sys.stderr)
    print("| workload | A min / median / max | B min / median / max | B/A |")
    print("|---|---|---|---|")
    for name, _, _ in WORKLOADS:
        if name not in results:
            continue
        a, b = results[name]["A"], results[name]["B"]
        fa = "%.3f / %.3f / %.3f" % (min(a), statistics.median(a), max(a))
        fb = "%.3f / %.3f / %.3f" % (min(b), statistics.median(b), max(b))
        print("| %s | %s | %s | %.3f |" % (name, fa, fb, statistics.median(b) / statistics.median(a)))


if __name__ == "__main__":
    main()
