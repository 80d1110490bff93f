#!/usr/bin/env python3
"""bench/bench.py -- the benchmark driver behind `make bench` (via bench/run).

Measures, in one run, tcpserver against the plain C libuv echo server (the
ceiling) and peers (Tornado, Node's net, luv, cqueues; Node and luv both as
their docs show and batching one write per read chunk), the kv example
against redis-server, tcpserver's TLS against Node's tls (and nginx's
stream module for handshakes), examples/http.lua against OpenResty under
wrk, and the CPU per stream call against its floor (bench/calls.lua).
Prints its progress and ETA before each run.  Writes bench/results/ (raw lines,
plot data, a text table) and docs/bench/results.md with SVG plots.

    bench/run [SERVER ...]          # default: every server
    bench/run --list                # the servers and workloads

Environment knobs (with the defaults the whole run takes about 10 minutes
on a quiet 2-core machine):
  BENCH_SECONDS    measured seconds per run (1)
  BENCH_WARMUP     warm-up seconds before each run (0.5)
  BENCH_RUNS       runs per server and workload; medians are shown (3)
  BENCH_PORT       first port to try (19000)
  BENCH_MAX_WAIT   disturbed-run threshold (0.02): runs where server or
                   loadgen waited longer than this share for a CPU are
                   repeated (up to twice), keeping the least disturbed
  BENCH_IDLE_CONNS connections for the idle-memory test (10000)
  BENCH_DRIP       drip sizes (256K,1M); BENCH_DRIP_PEERS=1 drips the peers too
  BENCH_KV_N1      requests per redis-benchmark test at -P 1 (20000)
  BENCH_KV_N16     requests per redis-benchmark test at -P 16 (200000)
  BENCH_QUIET      before each run, wait up to this many seconds (20) for
                   the machine to be quiet (under 5% CPU busy elsewhere)
  BENCH_QUIET_BUDGET  total quiet waiting per run, seconds (unbounded;
                   quick: 20)
  BENCH_ONLY       comma list of parts to run: echo,idle,drip,kv,tls,calls,http
                   (all; quick: all but drip)
  BENCH_QUICK      1: only the headline targets (make bench-quick, < 3 min):
                   echo d1, d16 (ceiling, tcpserver, best-practice peers),
                   bulk, kv GET -P 16, TLS handshakes, idle, calls, http;
                   BENCH_QUIET defaults to 3 s; writes docs/bench/results-quick.md
  BENCH_DOCS       write docs/bench/results.md and plots (1; 0 = no)
  BENCH_INSTALL    0: bench/run never calls apt-get (1)
"""
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUILD = os.path.join(HERE, "build")
RESULTS = os.path.join(HERE, "results")
DOCS = os.path.join(ROOT, "docs", "bench")
LOADGEN = os.path.join(BUILD, "loadgen")


def env_float(name, default):
    return float(os.environ.get(name, default))


# BENCH_QUICK=1 (make bench-quick): only the headline targets, against the
# servers they name, in under 3 minutes.
QUICK = os.environ.get("BENCH_QUICK", "0") == "1"
SECS = env_float("BENCH_SECONDS", 1)
WARMUP = env_float("BENCH_WARMUP", 0.5)
RUNS = int(os.environ.get("BENCH_RUNS", 3))
MAX_WAIT = env_float("BENCH_MAX_WAIT", 0.02)
IDLE_CONNS = int(os.environ.get("BENCH_IDLE_CONNS", 10000))
DRIP_SIZES = [s.strip() for s in os.environ.get("BENCH_DRIP", "256K,1M").split(",") if s.strip()]
DRIP_PEERS = os.environ.get("BENCH_DRIP_PEERS", "0") == "1"
KV_N = {1: int(os.environ.get("BENCH_KV_N1", 20000)),
        16: int(os.environ.get("BENCH_KV_N16", 200000))}
ALL_PARTS = "echo,idle,drip,kv,tls,calls,http"
ONLY = set(filter(None, os.environ.get(
    "BENCH_ONLY", "echo,idle,kv,tls,calls,http" if QUICK else ALL_PARTS).split(",")))
WRITE_DOCS = os.environ.get("BENCH_DOCS", "1") != "0"
QUIET_MAX = env_float("BENCH_QUIET", 3 if QUICK else 20)
# all the quiet waits of a run together stop at this many seconds (quick:
# 20, so that it ends within its 3 minutes on a busy machine; the report
# says how long was waited and the wait column shows what was disturbed)
QUIET_BUDGET = env_float("BENCH_QUIET_BUDGET", 20 if QUICK else 1e9)
next_port = int(os.environ.get("BENCH_PORT", 19000))

TWO_CPUS = (os.cpu_count() or 1) >= 2
SERVER_CPU, LOADGEN_CPU = (0, 1) if TWO_CPUS else (None, None)

PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"
NODE = shutil.which("node") or shutil.which("nodejs")
LUA = shutil.which("lua5.4")

# ---- servers -------------------------------------------------------------
# name -> (argv with {port}, {cert}, {key} placeholders, check: returns None
# if it can run here or the reason it cannot)


def have_exec(path):
    return None if path and os.access(path, os.X_OK) else "%s not found" % (path or "program")


def lua_module(mod):
    def check():
        if not LUA:
            return "lua5.4 not installed"
        r = subprocess.run([LUA, "-e", "require '%s'" % mod], capture_output=True)
        return None if r.returncode == 0 else "Lua module %s missing (Debian lua-%s)" % (mod, mod)
    return check


def py_tornado():
    r = subprocess.run([PY, "-c", "import tornado"], capture_output=True)
    return None if r.returncode == 0 else "python3-tornado not installed"


def node_check():
    return None if NODE else "node not installed (Debian nodejs)"


LUAHOST = os.path.join(ROOT, "build", "luahost")

ECHO_SERVERS = [
    ("ceiling", [os.path.join(BUILD, "echo_uv"), "{port}"], lambda: have_exec(os.path.join(BUILD, "echo_uv"))),
    ("tcpserver", [LUAHOST, "examples/echo.lua", "{port}"], lambda: have_exec(LUAHOST)),
    ("tornado", [PY, "bench/peers/tornado_echo.py", "{port}"], py_tornado),
    ("node", [NODE or "node", "bench/peers/node_echo.js", "{port}"], node_check),
    ("node-batch", [NODE or "node", "bench/peers/node_batch_echo.js", "{port}"], node_check),
    ("luv", [LUA or "lua5.4", "bench/peers/luv_echo.lua", "{port}"], lua_module("luv")),
    ("luv-batch", [LUA or "lua5.4", "bench/peers/luv_batch_echo.lua", "{port}"], lua_module("luv")),
    ("cqueues", [LUA or "lua5.4", "bench/peers/cqueues_echo.lua", "{port}"], lua_module("cqueues")),
]
PEERS = ["tornado", "node", "node-batch", "luv", "luv-batch", "cqueues"]
# The best-practice peers, which the targets count against: they send the
# replies to one read chunk with one write call.  node and luv are the
# docs-style versions (one write per line), reported beside them.
BEST_PEERS = ["luv-batch", "node-batch"]
# what make bench-quick starts, and the workloads it runs on each
QUICK_ECHO_SERVERS = ["ceiling", "tcpserver"] + BEST_PEERS

KV_SERVERS = [
    ("redis", ["redis-server", "--port", "{port}", "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no",
               "--logfile", ""],
     lambda: None if shutil.which("redis-server") else "redis-server not installed"),
    ("tcpserver", [LUAHOST, "examples/kv.lua", "{port}"], lambda: have_exec(LUAHOST)),
    # the same server written the straightforward way: a read per header line and argument
    ("kv-plain", [LUAHOST, "bench/kv_plain.lua", "{port}"], lambda: have_exec(LUAHOST)),
]

TLS_SERVERS = [
    # no TLS 1.3 session tickets, as nginx stream sends none by default: the
    # same work per handshake (tcpserver's default of 1 costs ~7% more)
    ("tcpserver", [LUAHOST, "examples/echo.lua", "{port}", "{cert}", "{key}",
                   "--session-tickets", "0"], lambda: have_exec(LUAHOST)),
    ("node", [NODE or "node", "bench/peers/tls_echo.js", "{port}", "{cert}", "{key}"], node_check),
    ("nginx", ["nginx", "-c", "{nginx_conf}"], None),  # check set up in tls_phase
]

# ---- workloads -------------------------------------------------------------
# (name, loadgen args, plot series and x value); the default conns are 50.
ECHO_WORKLOADS = [
    ("echo 64B d1", "--mode echo --conns 50 --size 64 --depth 1", [("depth", 1), ("conns", 50), ("size", 64)]),
    ("echo 64B d4", "--mode echo --conns 50 --size 64 --depth 4", [("depth", 4)]),
    ("echo 64B d16", "--mode echo --conns 50 --size 64 --depth 16", [("depth", 16)]),
    ("echo 64B d64", "--mode echo --conns 50 --size 64 --depth 64", [("depth", 64)]),
    ("echo 64B c1", "--mode echo --conns 1 --size 64 --depth 1", [("conns", 1)]),
    ("echo 64B c10", "--mode echo --conns 10 --size 64 --depth 1", [("conns", 10)]),
    ("echo 64B c1000", "--mode echo --conns 1000 --size 64 --depth 1", [("conns", 1000)]),
    ("echo 1KiB d1", "--mode echo --conns 50 --size 1K --depth 1", [("size", 1024)]),
    ("echo 64KiB d1", "--mode echo --conns 50 --size 64K --depth 1", [("size", 65536)]),
    ("bulk 64KiB c1", "--mode bulk --conns 1 --size 64K --depth 4", []),
    ("churn c50", "--mode churn --conns 50 --size 64", []),
]
if QUICK:
    ECHO_WORKLOADS = [
        ("echo 64B d1", "--mode echo --conns 50 --size 64 --depth 1", [("depth", 1)], ["ceiling", "tcpserver"]),
        ("echo 64B d16", "--mode echo --conns 50 --size 64 --depth 16", [("depth", 16)], QUICK_ECHO_SERVERS),
        ("bulk 64KiB c1", "--mode bulk --conns 1 --size 64K --depth 4", [], ["ceiling", "tcpserver"]),
    ]

TLS_WORKLOADS = [
    ("tls handshake c50", "--tls --mode churn --conns 50 --size 64", ["tcpserver", "node", "nginx"]),
    ("tls echo 64B d16", "--tls --mode echo --conns 50 --size 64 --depth 16", ["tcpserver", "node"]),
    ("tls bulk 64KiB c1", "--tls --mode bulk --conns 1 --size 64K --depth 4", ["tcpserver", "node"]),
]
if QUICK:
    TLS_WORKLOADS = TLS_WORKLOADS[:1]
    TLS_WORKLOADS[0] = TLS_WORKLOADS[0][:2] + (["tcpserver", "nginx"],)
KV_TESTS = [(16, "get")] if QUICK else [(P, t) for P in (1, 16) for t in ("set", "get", "ping")]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---- processes -------------------------------------------------------------

def port_free(port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def take_port():
    global next_port
    while not port_free(next_port):
        next_port += 1
    next_port += 1
    return next_port - 1


def accepting(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def pin(cpu):
    return ["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset") else []


class Server:
    def __init__(self, name, argv, logname, subst):
        self.name = name
        self.port = take_port()
        subst = dict(subst, port=str(self.port))
        self.argv = [a.format(**subst) for a in argv]
        self.logpath = os.path.join(RESULTS, logname + ".log")
        self.proc = None

    def start(self):
        logf = open(self.logpath, "w")
        # taskset execs the server, so the pid is the server's own
        self.proc = subprocess.Popen(pin(SERVER_CPU) + self.argv, cwd=ROOT, stdout=logf,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logf.close()
        for _ in range(100):
            if self.proc.poll() is not None:
                break
            if accepting(self.port):
                log("started %s: pid %d, port %d: %s" % (self.name, self.proc.pid, self.port,
                                                         " ".join(self.argv)))
                time.sleep(0.1)  # let it finish the probe connection
                return True
            time.sleep(0.05)
        log("skip %s: not accepting on port %d (see %s)" % (self.name, self.port,
                                                            os.path.relpath(self.logpath, ROOT)))
        self.stop()
        return False

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def cpu_us(self):
        return proc_cpu_us(self.pid)

    def rss_kib(self):
        return proc_rss_kib(self.pid)


def proc_cpu_us(pid):
    """utime+stime of a process (all threads), microseconds."""
    with open("/proc/%d/stat" % pid) as f:
        s = f.read()
    fields = s[s.rindex(")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks * 1e6 / os.sysconf("SC_CLK_TCK")


def proc_rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def start_servers(table, only, logprefix, subst=None):
    live = {}
    for name, argv, check in table:
        if only and name not in only:
            continue
        why = check() if check else None
        if why:
            log("skip %s: %s" % (name, why))
            continue
        s = Server(name, argv, logprefix + name, subst or {})
        if s.start():
            live[name] = s
    return live


def stop_servers(live):
    for s in live.values():
        s.stop()


# ---- loadgen ---------------------------------------------------------------

RAW = None  # file of raw result lines


def parse_kv(line):
    out = {}
    for tok in line.split():
        if "=" in tok:
            k, v = tok.split("=", 1)
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v
    return out


# Bulk is one connection: a second of it swings by 30% with the host, so
# its runs are longer.
BULK_SECS_FACTOR = 3


def loadgen(port, args, pid=None, secs=None, warmup=None, timeout=None):
    argv = [LOADGEN, "--port", str(port)] + args.split()
    secs = (secs or SECS) * (BULK_SECS_FACTOR if "--mode bulk" in args else 1)
    if "--mode drip" not in args and "--mode idle" not in args:
        argv += ["--duration", str(secs), "--warmup", str(WARMUP if warmup is None else warmup)]
    if pid:
        argv += ["--server-pid", str(pid)]
    if LOADGEN_CPU is not None:
        argv += ["--cpu", str(LOADGEN_CPU)]
    t = timeout or (secs + WARMUP + 30)
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=t)
    except subprocess.TimeoutExpired:
        return None, "timeout"
    line = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    err = r.stderr.strip().splitlines()
    return (parse_kv(line) if line and r.returncode == 0 else None), (line or (err[-1] if err else "no output"))


def cpu_busy():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


NOISY = {"waited_s": 0.0}


def wait_quiet(window=0.1):
    """Waits (up to BENCH_QUIET s) until other work on the machine uses
    under 5% of its CPUs over `window` s: our servers are idle between runs,
    so anything busy is someone else (a build, a test suite)."""
    deadline = time.time() + max(0.0, min(QUIET_MAX, QUIET_BUDGET - NOISY["waited_s"]))
    t0 = time.time()
    while True:
        b0, a0 = cpu_busy()
        time.sleep(window)
        b1, a1 = cpu_busy()
        if a1 == a0 or (b1 - b0) / (a1 - a0) < 0.05 or time.time() > deadline:
            break
    waited = time.time() - t0 - window
    if waited > 0.5:
        NOISY["waited_s"] += waited
        log("  (waited %.1f s for other work on the machine to finish)" % waited)


def run_wait(res):
    return max(res.get("lg_wait", 0) or 0, res.get("srv_wait", 0) or 0)


def measure(server, wname, args, samples):
    """One run (repeated up to twice if disturbed); appends the result dict."""
    if not server.alive():
        log("  %s has exited (see %s)" % (server.name, os.path.relpath(server.logpath, ROOT)))
        return
    best = None
    # quick: stay within its 3 minutes on a busy machine (once its quiet
    # budget is spent, repeating a disturbed run would only be disturbed too)
    attempts = (1 if NOISY["waited_s"] >= QUIET_BUDGET else 2) if QUICK else 3
    for attempt in range(attempts):
        # after a disturbed attempt, insist on a longer quiet spell
        wait_quiet(0.1 if attempt == 0 else 1.0)
        res, line = loadgen(server.port, args, server.pid)
        RAW.write("%-10s %-20s %s\n" % (server.name, wname, line))
        RAW.flush()
        log("  %-9s %s" % (server.name, line))
        if res is None:
            break
        if best is None or run_wait(res) < run_wait(best):
            best = res
        if run_wait(best) <= MAX_WAIT:
            break
        if attempt < attempts - 1:
            log("  (disturbed: waited %.3f of the run for a CPU; repeating)" % run_wait(res))
    if best is not None:
        samples.setdefault((server.name, wname), []).append(best)


def med(samples, key, name, wname):
    vals = [r[key] for r in samples.get((name, wname), []) if isinstance(r.get(key), float)]
    return statistics.median(vals) if vals else None


def workload_names(rest):
    """The server list of a workload tuple's tail, or None (all servers)."""
    return rest[-1] if rest and isinstance(rest[-1], list) and rest[-1] and isinstance(rest[-1][0], str) else None


def rotated(live, r, names=None):
    """The servers (those in names, if given) in an order that moves on by
    one each run, so that no server always runs right after the same other
    one, or first in a round."""
    items = [(n, s) for n, s in live.items() if names is None or n in names]
    k = r % len(items) if items else 0
    return items[k:] + items[:k]


def interleave(live, workloads, samples, label):
    """Runs are interleaved (a, b, c, b, c, a, c, a, b, ...) so a slow spell
    hits every server alike instead of skewing the ratios."""
    for wname, args, *rest in workloads:
        names = workload_names(rest)
        for r in range(RUNS):
            for name, s in rotated(live, r, names):
                PROGRESS.step(label, "%s: %s, run %d/%d, %s" % (label, wname, r + 1, RUNS, name))
                measure(s, wname, args, samples)
    PROGRESS.finish(label)


class Progress:
    """Counts the runs planned per phase (each with an estimated length)
    and, before each run, prints how far the whole benchmark is and when it
    will end: the estimate is scaled by how long the runs so far actually
    took against their estimate (repeats, quiet waits, a slow machine)."""

    def __init__(self):
        self.t0 = time.time()
        self.phases = {}  # name -> [planned, done, est seconds per run]

    def plan(self, phase, runs, est):
        self.phases[phase] = [runs, 0, est]

    def finish(self, phase):
        """A phase ended (servers that were skipped never ran)."""
        if phase in self.phases:
            self.phases[phase][0] = self.phases[phase][1]

    def step(self, phase, label):
        p = self.phases.setdefault(phase, [1, 0, 2.0])
        p[0] = max(p[0], p[1] + 1)
        done_est = sum(d * e for _, d, e in self.phases.values())
        left_est = sum((n - d) * e for n, d, e in self.phases.values())
        runs = sum(n for n, _, _ in self.phases.values())
        done = sum(d for _, d, _ in self.phases.values())
        now = time.time()
        scale = (now - self.t0) / done_est if done_est > 0 else 1.0
        left = left_est * scale
        log("[%d/%d, %s elapsed, ETA %s UTC (%s left)] %s" % (
            done + 1, runs, hms(now - self.t0), time.strftime("%H:%M:%S", time.gmtime(now + left)),
            hms(left), label))
        p[1] += 1


def hms(secs):
    secs = int(secs)
    return "%d:%02d" % (secs // 60, secs % 60) if secs < 3600 else "%d:%02d:%02d" % (
        secs // 3600, secs // 60 % 60, secs % 60)


PROGRESS = Progress()


# ---- phases ----------------------------------------------------------------

def idle_phase(live, idle):
    """RSS slope per idle connection, on servers that have served nothing
    yet (so freed-but-kept heap from earlier runs does not hide growth)."""
    for name, s in live.items():
        if not s.alive() or (QUICK and name not in ("ceiling", "tcpserver")):
            continue
        PROGRESS.step("idle", "idle: %d connections, %s" % (IDLE_CONNS, name))
        wait_quiet()
        before = s.rss_kib()
        argv = [LOADGEN, "--port", str(s.port), "--mode", "idle", "--conns", str(IDLE_CONNS),
                "--duration", "3"]
        if LOADGEN_CPU is not None:
            argv += ["--cpu", str(LOADGEN_CPU)]
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = p.stdout.readline().strip()  # printed once all are open
        time.sleep(1.0)                       # let the server settle
        after = s.rss_kib() if s.alive() else None
        _, err = p.communicate(timeout=60)
        res = parse_kv(line)
        opened = int(res.get("opened", 0) or 0)
        RAW.write("%-10s %-20s %s rss_before_kib=%s rss_after_kib=%s\n" % (name, "idle", line, before, after))
        if after is None or opened == 0:
            log("  idle %s: failed (%s)" % (name, err.strip().splitlines()[-1:] or line))
            continue
        per = (after - before) * 1024.0 / opened
        idle[name] = dict(opened=opened, before=before, after=after, per=per)
        log("  idle %-9s %d conns: RSS %d -> %d KiB, %.0f B/conn" % (name, opened, before, after, per))
        time.sleep(0.5)  # let the server close them
    PROGRESS.finish("idle")


def drip_phase(live, drip):
    names = [n for n in live if n in ("tcpserver", "ceiling") or DRIP_PEERS]
    for name in names:
        s = live[name]
        for size in DRIP_SIZES:
            if not s.alive():
                continue
            PROGRESS.step("drip", "drip: %s, %s" % (size, name))
            wait_quiet()
            c0 = s.cpu_us()
            res, line = loadgen(s.port, "--mode drip --size %s --duration 60" % size, timeout=90)
            c1 = s.cpu_us() if s.alive() else c0
            RAW.write("%-10s %-20s %s srv_cpu_us=%.0f\n" % (name, "drip " + size, line, c1 - c0))
            log("  drip %-9s %s: %s srv_cpu_ms=%.1f" % (name, size, line, (c1 - c0) / 1e3))
            if res:
                drip[(name, size)] = dict(time_ms=res.get("time_ms"), cpu_ms=(c1 - c0) / 1e3,
                                          bytes=res.get("size"))
    PROGRESS.finish("drip")


def redis_benchmark(port, test, P, n):
    argv = pin(LOADGEN_CPU) + ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", test,
                              "-P", str(P), "-n", str(n), "-c", "50", "--csv", "-q"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    rows = {}
    for line in r.stdout.splitlines():
        f = [x.strip('"') for x in line.split('","')]
        if len(f) >= 8 and f[0] != "test":
            f[0] = f[0].lstrip('"')
            rows[f[0]] = dict(rps=float(f[1]), p50_ms=float(f[4]), p99_ms=float(f[6]),
                              max_ms=float(f[7].rstrip('"')))
    return rows


def kv_phase(live, kv):
    if not shutil.which("redis-benchmark"):
        log("skip kv: redis-benchmark not installed (Debian redis-tools)")
        return
    for P, test in KV_TESTS:
        for r in range(RUNS):
            for name, s in rotated(live, r):
                if not s.alive():
                    continue
                PROGRESS.step("kv", "kv: %s -P %d, run %d/%d, %s" % (test, P, r + 1, RUNS, name))
                wait_quiet()
                c0 = s.cpu_us()
                rows = redis_benchmark(s.port, test, P, KV_N[P])
                c1 = s.cpu_us()
                nreq = KV_N[P] * len(rows)
                RAW.write("%-10s kv %s P%d %s srv_cpu_us=%.0f\n" % (name, test, P, rows, c1 - c0))
                log("  %-9s %s" % (name, " ".join("%s=%.0f/s" % (k, v["rps"]) for k, v in rows.items())))
                for tname, row in rows.items():
                    row["cpu_us_per_req"] = (c1 - c0) / nreq if nreq else None
                    kv.setdefault((name, tname, P), []).append(row)
    PROGRESS.finish("kv")


NGINX_CONF = """daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
{modules}
events {{ worker_connections 4096; }}
stream {{
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        tcp_nodelay on;
        proxy_pass 127.0.0.1:{upstream};
    }}
}}
"""


def make_cert():
    cert, key = os.path.join(BUILD, "cert.pem"), os.path.join(BUILD, "key.pem")
    if not (os.path.exists(cert) and os.path.exists(key)):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "3650", "-subj", "/CN=localhost"], check=True, capture_output=True)
    return cert, key


def tls_phase(tls, upstream_port):
    cert, key = make_cert()
    subst = dict(cert=cert, key=key)
    live = start_servers([t for t in TLS_SERVERS if t[0] != "nginx"], None, "tls-", subst)
    # (stopped in the finally below, also when a signal ends the run)
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    mod = "/usr/lib/nginx/modules/ngx_stream_module.so"
    if not nginx:
        log("skip nginx: not installed (Debian nginx libnginx-mod-stream)")
    elif not upstream_port:
        log("skip nginx: no ceiling echo server to proxy to")
    else:
        conf = os.path.join(BUILD, "nginx.conf")
        s = Server("nginx", [nginx, "-e", os.path.join(BUILD, "nginx-error.log"), "-c", conf],
                   "tls-nginx", subst)
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(dir=BUILD, port=s.port, cert=cert, key=key, upstream=upstream_port,
                                      modules="load_module %s;" % mod if os.path.exists(mod) else ""))
        if s.start():
            live["nginx"] = s
    try:
        interleave(live, TLS_WORKLOADS, tls, "tls")
    finally:
        stop_servers(live)


def calls_phase(calls):
    """bench/calls.lua: CPU per read_until/read_bytes/write call on buffered
    data beside its floor (bench/callfloor.c), pinned like a server."""
    if not os.access(LUAHOST, os.X_OK) or not os.path.exists(os.path.join(BUILD, "callfloor.so")):
        log("skip calls: build/luahost or bench/build/callfloor.so missing")
        return
    PROGRESS.step("calls", "calls: per-call CPU (bench/calls.lua)")
    wait_quiet()
    env = dict(os.environ, CALLS_REPEATS=os.environ.get("CALLS_REPEATS", str(max(RUNS, 5))))
    r = subprocess.run(pin(SERVER_CPU) + [LUAHOST, "bench/calls.lua"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    for line in r.stdout.splitlines():
        RAW.write(line + "\n")
        log("  " + line)
        if line.startswith("calls "):
            d = parse_kv(line)
            calls[d["op"]] = d
    if r.returncode != 0:
        log("  calls.lua failed: %s" % r.stderr.strip())
    PROGRESS.finish("calls")


# OpenResty: nginx with Debian's libnginx-mod-http-lua, one worker, the
# smallest Lua handler; the body is examples/http.lua's "/" answer.
OPENRESTY_CONF = """daemon off;
master_process off;
worker_processes 1;
pid {dir}/openresty.pid;
error_log {dir}/openresty-error.log warn;
load_module {mods}/ndk_http_module.so;
load_module {mods}/ngx_http_lua_module.so;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/ngx-tmp;
    proxy_temp_path {dir}/ngx-tmp;
    fastcgi_temp_path {dir}/ngx-tmp;
    uwsgi_temp_path {dir}/ngx-tmp;
    scgi_temp_path {dir}/ngx-tmp;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            content_by_lua_block {{ ngx.print("Hello, world!\\n") }}
        }}
    }}
}}
"""
NGINX_MODULES = "/usr/lib/nginx/modules"
HTTP_CONNS = 50


def wrk(port, secs):
    """wrk on the load generator's CPU: (requests, requests/s, p50 us, p99 us)."""
    argv = pin(LOADGEN_CPU) + ["wrk", "-t1", "-c%d" % HTTP_CONNS, "-d%gs" % secs, "--latency",
                               "http://127.0.0.1:%d/" % port]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=secs + 30)
    out = r.stdout
    m = re.search(r"(\d+) requests in", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if r.returncode != 0 or not m or not rps or bad:
        return None, out.strip().splitlines()[-1:] or r.stderr.strip()

    def lat(pct):
        x = re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s)\s*$" % pct, out, re.M)
        if not x:
            return None
        return float(x.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[x.group(2)]
    return dict(requests=float(m.group(1)), rate=float(rps.group(1)), p50_us=lat("50"),
                p99_us=lat("99")), None


def http_phase(http):
    """examples/http.lua against OpenResty under wrk (keep-alive, 50
    connections, one thread), both pinned alike, runs interleaved."""
    if not shutil.which("wrk"):
        log("skip http: wrk not installed (Debian wrk)")
        return
    live = start_servers([("tcpserver", [LUAHOST, "examples/http.lua", "--port", "{port}"],
                           lambda: have_exec(LUAHOST))], None, "http-")
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if not nginx or not os.path.exists(os.path.join(NGINX_MODULES, "ngx_http_lua_module.so")):
        log("skip openresty: not installed (Debian nginx libnginx-mod-http-lua)")
    else:
        conf = os.path.join(BUILD, "openresty.conf")
        os.makedirs(os.path.join(BUILD, "ngx-tmp"), exist_ok=True)
        s = Server("openresty", [nginx, "-e", os.path.join(BUILD, "openresty-error.log"), "-c", conf],
                   "http-openresty", {})
        with open(conf, "w") as f:
            f.write(OPENRESTY_CONF.format(dir=BUILD, port=s.port, mods=NGINX_MODULES))
        if s.start():
            live["openresty"] = s
    try:
        for r in range(RUNS):
            for name, s in rotated(live, r):
                if not s.alive():
                    continue
                PROGRESS.step("http", "http: wrk, run %d/%d, %s" % (r + 1, RUNS, name))
                wait_quiet()
                if WARMUP > 0:
                    wrk(s.port, WARMUP)
                c0 = s.cpu_us()
                res, err = wrk(s.port, SECS)
                c1 = s.cpu_us()
                if res is None:
                    log("  %-9s wrk failed: %s" % (name, err))
                    continue
                res["srv_cpu_us_per_msg"] = (c1 - c0) / res["requests"]
                RAW.write("%-10s http %s\n" % (name, res))
                log("  %-9s rate=%.0f srv_us_per_req=%.2f p50_us=%s p99_us=%s" % (
                    name, res["rate"], res["srv_cpu_us_per_msg"], res["p50_us"], res["p99_us"]))
                http.setdefault((name, "http"), []).append(res)
    finally:
        stop_servers(live)
    PROGRESS.finish("http")


# ---- report ----------------------------------------------------------------

def fmt_rate(v):
    if v is None:
        return "-"
    if v >= 1e6:
        return "%.2fM" % (v / 1e6)
    if v >= 1e4:
        return "%.0fk" % (v / 1e3)
    if v >= 1e3:
        return "%.1fk" % (v / 1e3)
    return "%.0f" % v


def fmt(v, spec="%.2f"):
    return "-" if v is None else spec % v


def ratio(a, b):
    return a / b if a is not None and b else None


def rate_key(wname):
    return "gbps" if wname.startswith(("bulk", "tls bulk")) else "rate"


def report(parts, echo_names, meta, elapsed):
    echo, idle, drip, kv, tls = (parts[k] for k in ("echo", "idle", "drip", "kv", "tls"))
    calls, http = parts["calls"], parts["http"]
    L = []
    w = L.append
    w("# tcpserver benchmark results%s" % (" (quick run: headline targets only)" if QUICK else ""))
    w("")
    w("Generated by `%s` (bench/run) on %s. Method and how to reproduce: "
      "[docs/PERFORMANCE.md](../PERFORMANCE.md)." % ("make bench-quick" if QUICK else "make bench", meta["date"]))
    w("")
    w("- **host: %s, %d CPUs, kernel %s**; git %s; load average (1/5/15 min) %s at the start, "
      "%s at the end" % (meta["cpu"], os.cpu_count(), meta["kernel"], meta["git"], meta["load0"],
                         meta["load1"]))
    w("- %d runs x %gs (bulk: %gs; +%gs warm-up) per server and workload, interleaved (the servers' order rotates each run); tables show "
      "medians, the targets min / **median** / max over the runs; "
      "server on CPU %s, loadgen on CPU %s; TCP_NODELAY on both sides everywhere; all on 127.0.0.1"
      % (RUNS, SECS, SECS * BULK_SECS_FACTOR, WARMUP, SERVER_CPU, LOADGEN_CPU))
    w("- whole run: %.0f s (of which %.0f s waiting for other work on the machine to stop). "
      "Servers: %s" % (elapsed, NOISY["waited_s"], ", ".join(echo_names)))
    w("- **srv us/msg** = server CPU (utime+stime from /proc/PID/stat, all threads) per message: "
      "the main efficiency figure. `lg` = loadgen's own CPU share: near 1.00 loadgen was the "
      "bottleneck and the rate is a floor. `wait` = share of the run server or loadgen waited "
      "for a CPU (! above %.2f: disturbed)." % MAX_WAIT)
    w("")

    # targets first: what the issue asks
    t = targets(echo, kv, idle, tls, http, calls)
    if t:
        w("## Targets")
        w("")
        w("| target | bar | rate ratio (or value) | CPU ratio | decided by | |")
        w("|---|---|---:|---:|---|---|")
        for name, bar, val, cpu, by, ok in t:
            w("| %s | %s | %s | %s | %s | %s |" % (
                name, bar, val, cpu, by,
                "met" if ok else ("**not met**" if ok is not None else "")))
        w("")
        w("Ratios are tcpserver against the other server, per run (runs are interleaved, so "
          "run i of each comes from the same minute): min / **median** / max; the median "
          "decides. Rate ratio = tcpserver's rate / the other's; CPU ratio = the other's "
          "server CPU per message (request, handshake, GB) / tcpserver's: above 1, tcpserver "
          "spends less. A target is decided by CPU where the load generator saturated its "
          "core in any of the runs (`lg` >= 0.9: the rates are then the load generator's, not the servers'), for "
          "kv (redis-benchmark is the limit), TLS handshakes and HTTP (both per server CPU); "
          "otherwise by rate. Rows marked (docs-style) are the peers written as their "
          "documentation shows (one write per line): reported, not targets.")
        w("")

    if calls:
        w("## Per-call CPU: stream methods on buffered data against their floor")
        w("")
        w("`build/luahost bench/calls.lua` (pinned to CPU %s): a client writes 2,048 lines of "
          "64 B at once over loopback; the server side waits until all are buffered, then the "
          "timed loop (os.clock, this process's CPU) makes one call per line. ns per call, "
          "min / **median** / max over the repetitions (each %d calls). The floor is "
          "bench/callfloor.c: `u:str(64)`, a C method on a userdata that returns a new 64-byte "
          "string (what a read must at least do); `str(64)` the same as a plain function; "
          "`u:sink(s)` a C method that takes a 64-byte string and copies it into a buffer "
          "(what a buffered write must at least do)." % (SERVER_CPU, int(next(iter(calls.values()))
                                                                          .get("calls", 0))))
        w("")
        w("| call | ns per call | floor | floor ns (median) | ratio to floor | |")
        w("|---|---:|---|---:|---:|---|")
        for op, d in calls.items():
            if op.startswith("floor"):
                continue
            for key, rkey in (("floor", "ratio_med"), ("floor2", "ratio2_med")):
                fl = d.get(key)
                if not fl:
                    continue
                fd = calls.get(fl, {})
                verdict = ("met" if d[rkey] <= 2 else "**not met**") if key == "floor" else ""
                w("| `%s` | %s | %s | %s | %.2fx | %s |" % (
                    op if key == "floor" else op + " (again)", spread3(d, "%.0f"), fl, fmt(fd.get("ns_med"), "%.0f"), d[rkey], verdict))
        for op in ("floor_plain", "floor_method", "floor_sink"):
            if op in calls:
                w("| (%s) | %s | | | | |" % (op, spread3(calls[op], "%.0f")))
        w("")

    if echo:
        w("## Ratios: tcpserver against the ceiling and each peer (same run)")
        w("")
        w("Rate ratio = tcpserver's rate / the other's (above 1: tcpserver faster). "
          "CPU ratio = the other's server CPU per message / tcpserver's (above 1: tcpserver "
          "spends less CPU per message).")
        w("")
        others = [n for n in echo_names if n != "tcpserver"]
        w("| workload | " + " | ".join("rate vs %s" % n for n in others) + " | "
          + " | ".join("CPU vs %s" % n for n in others) + " |")
        w("|---|" + "---:|" * (2 * len(others)))
        for wname, *_ in ECHO_WORKLOADS:
            k = rate_key(wname)
            ts = med(echo, k, "tcpserver", wname)
            tc = med(echo, "srv_cpu_us_per_msg", "tcpserver", wname)
            rr = [fmt(ratio(ts, med(echo, k, n, wname))) for n in others]
            cr = [fmt(ratio(med(echo, "srv_cpu_us_per_msg", n, wname), tc)) for n in others]
            w("| %s | %s | %s |" % (wname, " | ".join(rr), " | ".join(cr)))
        w("")
        w("Bulk has no per-message CPU figure (its CPU column compares server CPU per GB).")
        w("")
        w("## Echo workloads: rates, latency and CPU")
        w("")
        w("50 connections unless the name says cN; dN = messages in flight per connection; "
          "messages are lines ending in \\n. Bulk: one connection streaming 64 KiB chunks, 4 in "
          "flight, GB/s of echoed bytes. Churn: connect, one 64 B line, echo, close (per second).")
        w("")
        w("| workload | server | rate | vs ceiling | srv us/msg | p50 us | p99 us | p99.9 us | lg | wait |")
        w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for wname, _, *rest in ECHO_WORKLOADS:
            k = rate_key(wname)
            ceil = med(echo, k, "ceiling", wname)
            for n in echo_names:
                if (n, wname) not in echo and n in (workload_names(rest) or echo_names):
                    w("| %s | %s | failed | | | | | | | |" % (wname, n))
                    continue
                if (n, wname) not in echo:
                    continue
                r = med(echo, k, n, wname)
                cpu = med(echo, "srv_cpu_us_per_msg", n, wname)
                if k == "gbps":
                    scpu = med(echo, "srv_cpu_us", n, wname)
                    by = med(echo, "bytes", n, wname)
                    cpu = scpu / (by / 1e9) / 1e6 if scpu and by else None  # CPU s per GB
                    rs = "%.3f GB/s" % r
                    cs = "%s s/GB" % fmt(cpu, "%.2f")
                else:
                    rs = fmt_rate(r) + "/s"
                    cs = fmt(cpu, "%.2f")
                wt = med(echo, "__wait", n, wname)
                w("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s%s |" % (
                    wname, n, rs, fmt(ratio(r, ceil)), cs,
                    fmt(med(echo, "p50_us", n, wname), "%.0f"), fmt(med(echo, "p99_us", n, wname), "%.0f"),
                    fmt(med(echo, "p999_us", n, wname), "%.0f"), fmt(med(echo, "lg_cpu", n, wname)),
                    fmt(wt, "%.3f"), "!" if wt and wt > MAX_WAIT else ""))
        w("")
        if not QUICK:
            w("![rate vs depth](rate-vs-depth.svg) ![rate vs connections](rate-vs-conns.svg) "
              "![rate vs size](rate-vs-size.svg)")
            w("")

    if idle:
        w("## Idle connections: memory")
        w("")
        w("VmRSS of the server before and after %d idle connections are open (they send "
          "nothing), on servers that had served no traffic yet. User-space memory only: kernel "
          "socket buffers are not in RSS." % IDLE_CONNS)
        w("")
        w("| server | connections | RSS before KiB | RSS after KiB | bytes per connection | vs ceiling |")
        w("|---|---:|---:|---:|---:|---:|")
        cb = idle.get("ceiling", {}).get("per")
        for n in echo_names:
            if n in idle:
                d = idle[n]
                w("| %s | %d | %d | %d | %.0f | %s |" % (n, d["opened"], d["before"], d["after"], d["per"],
                                                       fmt(ratio(d["per"], cb), "%.1fx")))
        w("")

    if drip:
        w("## Slow drip: one line sent one byte per write")
        w("")
        w("Server CPU must grow linearly with the line's size (a rescanning or re-copying server "
          "grows quadratically: 4x the size would cost ~16x the CPU).")
        w("")
        w("| server | line size | time ms | server CPU ms | CPU per KiB us |")
        w("|---|---:|---:|---:|---:|")
        for (n, size), d in drip.items():
            kib = (d["bytes"] or 0) / 1024
            w("| %s | %s | %s | %.1f | %s |" % (n, size, fmt(d["time_ms"], "%.0f"), d["cpu_ms"],
                                             fmt(d["cpu_ms"] * 1e3 / kib if kib else None, "%.1f")))
        for n in sorted({k[0] for k in drip}):
            sizes = [s for s in DRIP_SIZES if (n, s) in drip]
            if len(sizes) >= 2:
                a, b = drip[(n, sizes[0])], drip[(n, sizes[-1])]
                if a["cpu_ms"] > 0 and a["bytes"]:
                    w("")
                    w("%s: %s/%s size ratio %.1f, CPU ratio **%.2f** (linear: %.1f)." % (
                        n, sizes[-1], sizes[0], b["bytes"] / a["bytes"], b["cpu_ms"] / a["cpu_ms"],
                        b["bytes"] / a["bytes"]))
        w("")

    if kv:
        w("## kv (examples/kv.lua) against redis-server")
        w("")
        w("redis-benchmark, 50 clients, `-t set,get,ping`, no persistence, both servers pinned "
          "alike. Server CPU per request is taken around each redis-benchmark invocation "
          "(connection setup included).")
        w("")
        w("`kv-plain` is bench/kv_plain.lua: the same protocol read the straightforward way "
          "(a read_until per header line, a read_bytes per argument, a write per reply).")
        w("")
        w("| test | -P | redis-server rps | tcpserver kv rps | ratio | redis us/req | kv us/req | "
          "kv-plain us/req | redis p50/p99 ms | kv p50/p99 ms |")
        w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for P in (1, 16):
            for test in ("SET", "GET", "PING_INLINE", "PING_MBULK"):
                def m(name, key):
                    vals = [r[key] for r in kv.get((name, test, P), []) if r.get(key) is not None]
                    return statistics.median(vals) if vals else None
                rr, kr = m("redis", "rps"), m("tcpserver", "rps")
                if rr is None and kr is None:
                    continue
                w("| %s | %d | %s | %s | %s | %s | %s | %s | %s/%s | %s/%s |" % (
                    test, P, fmt_rate(rr), fmt_rate(kr), fmt(ratio(kr, rr)),
                    fmt(m("redis", "cpu_us_per_req")), fmt(m("tcpserver", "cpu_us_per_req")),
                    fmt(m("kv-plain", "cpu_us_per_req")),
                    fmt(m("redis", "p50_ms"), "%.2f"), fmt(m("redis", "p99_ms"), "%.2f"),
                    fmt(m("tcpserver", "p50_ms"), "%.2f"), fmt(m("tcpserver", "p99_ms"), "%.2f")))
        w("")

    if tls:
        w("## TLS")
        w("")
        w("Certificate: EC P-256, self-signed, made at bench time (bench/build/cert.pem). loadgen "
          "--tls: OpenSSL client, TLS 1.3 as negotiated, no session reuse (every connection a "
          "full handshake). tcpserver = examples/echo.lua with a certificate, node = bench/peers/tls_echo.js. "
          "nginx = stream module terminating TLS and proxying to the ceiling echo server: nginx "
          "cannot echo by itself, so it appears in the handshake row only, where the upstream "
          "hop is one small line per connection (its CPU, in echo_uv, is not counted).")
        w("")
        w("| workload | server | rate | vs tcpserver | srv us/op | handshakes per server CPU-s | "
          "p50 us | p99 us | p99.9 us | lg |")
        w("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for wname, _, names in TLS_WORKLOADS:
            k = rate_key(wname)
            base = med(tls, k, "tcpserver", wname)
            for n in names:
                if (n, wname) not in tls:
                    continue
                r = med(tls, k, n, wname)
                cpu = med(tls, "srv_cpu_us_per_msg", n, wname)
                hs = 1e6 / cpu if cpu and wname.startswith("tls handshake") else None
                if k == "gbps":
                    scpu = med(tls, "srv_cpu_us", n, wname)
                    by = med(tls, "bytes", n, wname)
                    cpu = scpu / (by / 1e9) / 1e6 if scpu and by else None
                    rs, cs = "%.3f GB/s" % r, "%s s/GB" % fmt(cpu)
                else:
                    rs, cs = fmt_rate(r) + "/s", fmt(cpu, "%.1f")
                w("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                    wname, n, rs, fmt(ratio(r, base)), cs, fmt(hs, "%.0f"),
                    fmt(med(tls, "p50_us", n, wname), "%.0f"), fmt(med(tls, "p99_us", n, wname), "%.0f"),
                    fmt(med(tls, "p999_us", n, wname), "%.0f"), fmt(med(tls, "lg_cpu", n, wname))))
        w("")
    if http:
        w("## HTTP: examples/http.lua against OpenResty")
        w("")
        w("`wrk -t1 -c%d` (keep-alive, GET /) for %gs after a %gs warm-up, pinned to CPU %s; the "
          "servers on CPU %s. tcpserver = `build/luahost examples/http.lua`; openresty = nginx "
          "1.22 with Debian's libnginx-mod-http-lua, one worker process (`master_process off`), "
          "`content_by_lua_block { ngx.print(\"Hello, world!\\n\") }`, access log off "
          "(the same 14-byte body as the example's `/`; nginx sends it chunked, the example "
          "with Content-Length). Server CPU per request from /proc/PID/stat around the "
          "measured run." % (HTTP_CONNS, SECS, WARMUP, LOADGEN_CPU, SERVER_CPU))
        w("")
        w("| server | requests/s (min / median / max) | srv us/req (min / median / max) | "
          "requests per server CPU-s | p50 us | p99 us |")
        w("|---|---:|---:|---:|---:|---:|")
        for n in ("tcpserver", "openresty"):
            runs = http.get((n, "http"), [])
            if not runs:
                continue
            rs, _ = spread([r["rate"] for r in runs], "%.0f")
            cs, cm = spread([r["srv_cpu_us_per_msg"] for r in runs], "%.2f")
            w("| %s | %s | %s | %s | %s | %s |" % (
                n, rs, cs, fmt(1e6 / cm if cm else None, "%.0f"), fmt(med(http, "p50_us", n, "http"), "%.0f"),
                fmt(med(http, "p99_us", n, "http"), "%.0f")))
        w("")
    return "\n".join(L) + "\n"


def spread3(d, spec):
    return "%s / **%s** / %s" % (spec % d["ns_min"], spec % d["ns_med"], spec % d["ns_max"])


def spread(vals, spec="%.2fx"):
    """min / **median** / max of a list (None entries dropped), and the median."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-", None
    m = statistics.median(vals)
    return "%s / **%s** / %s" % (spec % min(vals), spec % m, spec % max(vals)), m


def per_run(samples, a, b, wname, f):
    """f(a's run i, b's run i) for each run both have (runs are interleaved)."""
    return [f(x, y) for x, y in zip(samples.get((a, wname), []), samples.get((b, wname), []))]


def div(x, y):
    return x / y if x is not None and y else None


def targets(echo, kv, idle, tls, http, calls):
    """(target, bar, rate ratios, CPU ratios, decided by, met?) rows, ratios
    as min / median / max over the runs."""
    out = []

    def row(label, bar, rates, cpus, by, goal):
        rs, rm = spread(rates)
        cs, cm = spread(cpus)
        dec = cm if by == "CPU" else rm
        out.append((label, bar, rs, cs, by, None if dec is None or goal is None else dec >= goal))

    def echo_row(label, bar, wname, other, goal):
        if ("tcpserver", wname) not in echo or (other, wname) not in echo:
            return
        if wname.startswith("bulk"):
            rates = per_run(echo, "tcpserver", other, wname, lambda t, o: div(t.get("gbps"), o.get("gbps")))
            cpus = per_run(echo, "tcpserver", other, wname, lambda t, o: div(
                div(o.get("srv_cpu_us"), o.get("bytes")), div(t.get("srv_cpu_us"), t.get("bytes"))))
        else:
            rates = per_run(echo, "tcpserver", other, wname, lambda t, o: div(t.get("rate"), o.get("rate")))
            cpus = per_run(echo, "tcpserver", other, wname, lambda t, o: div(
                o.get("srv_cpu_us_per_msg"), t.get("srv_cpu_us_per_msg")))
        # any run where loadgen saturated makes its rates loadgen's (runs
        # where another program took loadgen's CPU show a lower lg, not a
        # lower load generator limit)
        lg = max((r.get("lg_cpu") or 0) for n in ("tcpserver", other) for r in echo.get((n, wname), []))
        row(label, bar, rates, cpus, "CPU" if lg >= 0.9 else "rate", goal)

    if echo:
        echo_row("echo 64B d1 vs ceiling", ">= 0.9x", "echo 64B d1", "ceiling", 0.9)
        echo_row("echo 64B d16 vs ceiling", ">= 0.75x", "echo 64B d16", "ceiling", 0.75)
        for p in BEST_PEERS:
            echo_row("echo 64B d16 vs %s (best practice)" % p, ">= 1.5x", "echo 64B d16", p, 1.5)
        for p in ("luv", "node"):
            echo_row("echo 64B d16 vs %s (docs-style)" % p, "(info)", "echo 64B d16", p, None)
        echo_row("bulk GB/s vs ceiling", ">= 0.85x", "bulk 64KiB c1", "ceiling", 0.85)
    if kv:
        pairs = list(zip(kv.get(("tcpserver", "GET", 16), []), kv.get(("redis", "GET", 16), [])))
        row("kv GET -P 16 vs redis-server", ">= 0.6x", [div(t["rps"], r["rps"]) for t, r in pairs],
            [div(r.get("cpu_us_per_req"), t.get("cpu_us_per_req")) for t, r in pairs], "CPU", 0.6)
    hs = "tls handshake c50"
    if ("tcpserver", hs) in tls and ("nginx", hs) in tls:
        row("TLS handshakes per CPU-second vs nginx stream", ">= 1.0x",
            per_run(tls, "tcpserver", "nginx", hs, lambda t, o: div(t.get("rate"), o.get("rate"))),
            per_run(tls, "tcpserver", "nginx", hs, lambda t, o: div(o.get("srv_cpu_us_per_msg"),
                                                                    t.get("srv_cpu_us_per_msg"))),
            "CPU", 1.0)
    if "tcpserver" in idle:
        v = idle["tcpserver"]["per"]
        out.append(("idle connection, user-space memory", "<= 1.75 KiB (1,792 B)", "%.0f B" % v, "",
                    "value (one run of %d connections)" % idle["tcpserver"]["opened"], v <= 1792))
    if ("tcpserver", "http") in http and ("openresty", "http") in http:
        row("examples/http.lua vs OpenResty (wrk)", ">= 1.5x per server CPU",
            per_run(http, "tcpserver", "openresty", "http", lambda t, o: div(t["rate"], o["rate"])),
            per_run(http, "tcpserver", "openresty", "http",
                    lambda t, o: div(o["srv_cpu_us_per_msg"], t["srv_cpu_us_per_msg"])), "CPU", 1.5)
    for op in ("read_until", "read_bytes", "write"):
        if op in calls:
            d = calls[op]
            out.append(("`%s` (64 B, buffered) vs its floor" % op, "<= 2x",
                        "%s ns" % spread3(d, "%.0f"), "", "%.2fx %s" % (d["ratio_med"], d["floor"]),
                        d["ratio_med"] <= 2))
    return out


def text_table(echo, echo_names):
    lines = ["%-16s %-10s %12s %8s %10s %9s %9s %9s %6s %7s" % (
        "workload", "server", "rate", "vs ceil", "us/msg", "p50 us", "p99 us", "p99.9 us", "lg", "wait")]
    for wname, *_ in ECHO_WORKLOADS:
        k = rate_key(wname)
        ceil = med(echo, k, "ceiling", wname)
        for n in echo_names:
            r = med(echo, k, n, wname)
            if r is None:
                lines.append("%-16s %-10s %12s" % (wname, n, "failed"))
                continue
            lines.append("%-16s %-10s %12s %8s %10s %9s %9s %9s %6s %7s" % (
                wname, n, ("%.3fGB/s" % r) if k == "gbps" else "%.0f" % r, fmt(ratio(r, ceil)),
                fmt(med(echo, "srv_cpu_us_per_msg", n, wname), "%.3f"),
                fmt(med(echo, "p50_us", n, wname), "%.0f"), fmt(med(echo, "p99_us", n, wname), "%.0f"),
                fmt(med(echo, "p999_us", n, wname), "%.0f"), fmt(med(echo, "lg_cpu", n, wname)),
                fmt(med(echo, "__wait", n, wname), "%.3f")))
    return "\n".join(lines) + "\n"


PLOTS = [
    ("depth", "rate-vs-depth", "messages in flight per connection (50 connections, 64 B)", "logscale x 2"),
    ("conns", "rate-vs-conns", "connections (depth 1, 64 B)", "logscale x 10"),
    ("size", "rate-vs-size", "message size, bytes (50 connections, depth 1)", "logscale x 2"),
]


def plots(echo, echo_names):
    if not shutil.which("gnuplot"):
        log("skip plots: gnuplot not installed (Debian gnuplot-nox)")
        return
    os.makedirs(DOCS, exist_ok=True)
    for series, stem, xlabel, xscale in PLOTS:
        pts = sorted({x for _, _, ser, *_ in ECHO_WORKLOADS for s, x in ser if s == series})
        dat = os.path.join(RESULTS, stem + ".dat")
        with open(dat, "w") as f:
            f.write("# x " + " ".join(echo_names) + "\n")
            for x in pts:
                wname = next(wn for wn, _, ser, *_ in ECHO_WORKLOADS if (series, x) in ser)
                vals = [med(echo, "rate", n, wname) for n in echo_names]
                f.write("%d %s\n" % (x, " ".join("NaN" if v is None else "%.1f" % v for v in vals)))
        cmds = [
            "set terminal svg size 640,420 dynamic enhanced font 'sans,11' background '#ffffff'",
            "set output '%s'" % os.path.join(DOCS, stem + ".svg"),
            "set title 'echo messages/s vs %s'" % series,
            "set xlabel '%s'" % xlabel, "set ylabel 'messages/s'",
            "set %s" % xscale, "set logscale y 10", "set grid", "set key outside right top",
            "set datafile missing 'NaN'",
            "plot " + ", ".join("'%s' using 1:%d with linespoints lw 2 title '%s'" % (dat, i + 2, n)
                                for i, n in enumerate(echo_names)),
        ]
        r = subprocess.run(["gnuplot"], input="\n".join(cmds), text=True, capture_output=True)
        if r.returncode != 0:
            log("gnuplot failed for %s: %s" % (stem, r.stderr.strip()))


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def meta_info(start=None):
    """Host, kernel, git and the load average (at the start, and at the end
    when `start`, the first call's result, is given)."""
    if start is not None:
        return dict(start, load1=loadavg())
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    git = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    # "+changes": the measured code (not bench/ or docs/) differs from HEAD
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "--",
                            "src", "lua", "include", "examples", "Makefile"], capture_output=True, text=True)
    return dict(cpu=cpu, kernel=os.uname().release, load0=loadavg(), load1=None,
                git=(git.stdout.strip() or "none") + ("+changes" if dirty.stdout.strip() else ""),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


# ---- main ------------------------------------------------------------------

def plan(only):
    """Registers every phase's runs with PROGRESS (servers a check later
    skips are dropped when their phase ends)."""
    def n_echo(names):
        return len([n for n, _, _ in ECHO_SERVERS if (not only or n in only) and (names is None or n in names)])
    run_s = SECS + WARMUP + 0.7
    if ONLY & {"echo", "idle", "drip"} and "idle" in ONLY:
        PROGRESS.plan("idle", n_echo(["ceiling", "tcpserver"] if QUICK else None), 8.0)
    if "echo" in ONLY:
        PROGRESS.plan("echo", 0, 0)
        runs = est = 0
        for wname, args, *rest in ECHO_WORKLOADS:
            k = RUNS * n_echo(workload_names(rest))
            runs += k
            est += k * (run_s + (BULK_SECS_FACTOR - 1) * SECS * ("--mode bulk" in args))
        PROGRESS.plan("echo", runs, est / runs if runs else 0)
    if "drip" in ONLY:
        PROGRESS.plan("drip", 2 * len(DRIP_SIZES), 10.0)
    if "tls" in ONLY:
        runs = sum(RUNS * len(names) for _, _, names in TLS_WORKLOADS)
        PROGRESS.plan("tls", runs, run_s)
    if "kv" in ONLY:
        PROGRESS.plan("kv", len(KV_TESTS) * RUNS * len(KV_SERVERS), 1.5)
    if "calls" in ONLY:
        PROGRESS.plan("calls", 1, 6.0)
    if "http" in ONLY:
        PROGRESS.plan("http", RUNS * 2, SECS + 2 * WARMUP + 0.5)


def main(argv):
    global RAW
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv and argv[0] == "--list":
        print("servers:", " ".join(n for n, _, _ in ECHO_SERVERS))
        for wname, args, *_ in ECHO_WORKLOADS:
            print("  %-16s %s" % (wname, args))
        for wname, args, names in TLS_WORKLOADS:
            print("  %-16s %s  (%s)" % (wname, args, ", ".join(names)))
        print("  %-16s %s" % ("http", "wrk -t1 -c%d: examples/http.lua vs OpenResty" % HTTP_CONNS))
        print("  %-16s %s" % ("calls", "build/luahost bench/calls.lua (per-call CPU vs its floor)"))
        return 0
    only = set(argv)
    if QUICK and not only:
        only = set(QUICK_ECHO_SERVERS)
    t0 = time.time()
    os.makedirs(RESULTS, exist_ok=True)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # 10,000 idle connections; children inherit the limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    RAW = open(os.path.join(RESULTS, "latest-raw.txt"), "w")
    if not TWO_CPUS:
        log("note: fewer than 2 CPUs: server and loadgen are not pinned")
    meta = meta_info()
    log("bench: %s; host %s, %d CPUs, kernel %s; load average %s" % (
        "quick run (headline targets)" if QUICK else "full run", meta["cpu"], os.cpu_count(),
        meta["kernel"], meta["load0"]))
    plan(only)

    echo, idle, drip, kv, tls, calls, http = {}, {}, {}, {}, {}, {}, {}
    echo_names = []
    if "calls" in ONLY:
        calls_phase(calls)
    if ONLY & {"echo", "idle", "drip"}:
        live = start_servers(ECHO_SERVERS, only, "")
        echo_names = list(live)
        try:
            if "idle" in ONLY:
                log("idle: %d connections per server" % IDLE_CONNS)
                idle_phase(live, idle)
                if ONLY & {"echo", "drip"}:
                    # 10,000 connections leave glibc's heap fragmented
                    # (tcpserver: +7% CPU per d16 message afterwards): the
                    # echo workloads start on fresh servers, as idle did.
                    stop_servers(live)
                    live = start_servers(ECHO_SERVERS, only, "")
            if "echo" in ONLY:
                interleave(live, ECHO_WORKLOADS, echo, "echo")
                for v in echo.values():
                    for r in v:
                        r["__wait"] = float(run_wait(r))
            if "drip" in ONLY:
                log("drip: %s" % ", ".join(DRIP_SIZES))
                drip_phase(live, drip)
            ceiling_port = live["ceiling"].port if "ceiling" in live else None
            if "tls" in ONLY and (not only or only & {"tcpserver", "node", "nginx"}):
                tls_phase(tls, ceiling_port)
        finally:
            stop_servers(live)
    elif "tls" in ONLY:
        up = start_servers(ECHO_SERVERS, {"ceiling"}, "")
        try:
            tls_phase(tls, up["ceiling"].port if "ceiling" in up else None)
        finally:
            stop_servers(up)
    if "kv" in ONLY and (not only or QUICK or "tcpserver" in only or "redis" in only):
        live = start_servers(KV_SERVERS, None, "kv-")
        try:
            kv_phase(live, kv)
        finally:
            stop_servers(live)
    if "http" in ONLY and (not only or QUICK or only & {"tcpserver", "openresty"}):
        http_phase(http)
    RAW.close()

    elapsed = time.time() - t0
    meta = meta_info(meta)
    md = report(dict(echo=echo, idle=idle, drip=drip, kv=kv, tls=tls, calls=calls, http=http),
                echo_names, meta, elapsed)
    with open(os.path.join(RESULTS, "latest.md"), "w") as f:
        f.write(md)
    if echo:
        with open(os.path.join(RESULTS, "latest.txt"), "w") as f:
            f.write(text_table(echo, echo_names))
        print(text_table(echo, echo_names))
    print(md)
    if WRITE_DOCS:
        os.makedirs(DOCS, exist_ok=True)
        name = "results-quick.md" if QUICK else "results.md"
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(t0))
        with open(os.path.join(RESULTS, "%s-%s.md" % ("quick" if QUICK else "full", stamp)), "w") as f:
            f.write(md)
        with open(os.path.join(DOCS, name), "w") as f:
            f.write(md)
        if echo and not QUICK:
            plots(echo, echo_names)
        log("wrote docs/bench/%s" % name)
    log("bench: done in %s" % hms(elapsed))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
    sys.exit(main(sys.argv[1:]))
