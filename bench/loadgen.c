/*
 * loadgen -- single-threaded, closed-loop libuv load generator for echo
 * servers.  One line of key=value results goes to stdout; diagnostics go to
 * stderr.  Run `loadgen --help` for the options.
 *
 * Modes:
 *   echo   N connections each keep DEPTH messages of SIZE bytes in flight;
 *          reports messages/s and send-to-full-echo latency percentiles.
 *   churn  N slots loop connect, send one line, read its echo, close;
 *          reports connections/s.
 *   idle   opens N connections, prints a line once they are open, holds
 *          them for DURATION seconds (to measure server memory per conn).
 *   bulk   N connections stream SIZE-byte chunks (DEPTH in flight) and read
 *          the echo back; reports GB/s of echoed bytes.
 *   drip   one connection sends a SIZE-byte line one byte per write, reading
 *          the echo meanwhile; reports the total time (DURATION = timeout).
 *
 * --tls runs echo, churn and bulk over TLS (OpenSSL over memory BIOs,
 * no certificate check, no session reuse: every connection is a full
 * handshake).  Traffic starts once the handshake is done; churn then counts
 * connect-handshake-echo-close cycles, so its srv_cpu_us_per_msg is the
 * server's CPU per TLS handshake (plus one echo).  The result line gains
 * handshakes=N (completed in the measured window).
 *
 * Result keys besides the mode's own: errors (failed connects, reads,
 * writes, bad echoes; the exit status is 1 if nothing completed), lg_cpu
 * (loadgen's CPU use over the window: near 1.00 it is the bottleneck),
 * lg_wait and srv_wait (share of the window spent runnable but waiting for a
 * CPU: above ~0.02 other work disturbed the run), and with --server-pid
 * srv_cpu_us and srv_cpu_us_per_msg (utime+stime from /proc/PID/stat).
 * In churn mode msgs counts completed connect-echo-close cycles.
 *
 * Every message is SIZE bytes: filler without '\n', then one '\n'.  Echoes
 * are checked to have a '\n' exactly at each message end, so a server that
 * loses or adds bytes (which shifts the '\n's) is reported as an error
 * instead of silently producing a good-looking rate.
 */
#define _GNU_SOURCE /* sched_setaffinity, getopt_long */
#include <errno.h>
#include <getopt.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>
#include <uv.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

typedef enum { MODE_ECHO, MODE_CHURN, MODE_IDLE, MODE_BULK, MODE_DRIP } run_mode;

static const char *const mode_names[] = {"echo", "churn", "idle", "bulk",
                                         "drip"};

enum {
  MAX_DEPTH = 1024,            /* = IOV_MAX: a batch of messages is 1 writev */
  MAX_PENDING_CONNECTS = 256,  /* more overflows the accept backlog, and the
                                  dropped SYNs then wait 1 s to retransmit */
  READ_BUF_SIZE = 256 * 1024,  /* drains a loopback socket in one read */
  TLS_OUT_CHUNK = 64 * 1024,   /* ciphertext moved to the socket at a time */
  MAX_ERROR_LOGS = 5,          /* print the first few; count all */
  IDLE_OPEN_TIMEOUT_MS = 30000,
  DRIP_DEFAULT_TIMEOUT_S = 60,
  DRIP_BATCH = 4096,           /* writes per loop turn, so echoes are read
                                  in between and neither side stalls */
  HIST_SUB_BITS = 5,           /* 32 buckets per power of two: ~3% error */
  HIST_SUB = 1 << HIST_SUB_BITS,
  HIST_BUCKETS = (64 - HIST_SUB_BITS + 1) * HIST_SUB
};

#define MAX_SIZE (64u << 20)
#define MAX_IN_FLIGHT_BYTES (1u << 30) /* uv_try_write returns an int */

typedef struct {
  const char *host;
  int port, conns, depth, cpu, server_pid, tls;
  long long size;           /* -1 until defaulted */
  double duration, warmup;  /* seconds; -1 until defaulted */
  run_mode mode;
} options;

typedef struct {
  uv_tcp_t tcp;              /* handle.data points back to this conn */
  uv_connect_t connect_req;
  uint64_t *sent_at;         /* send time of message i at [i % depth] */
  uint64_t tx_msgs;          /* messages written or queued */
  uint64_t tx_bytes;         /* drip: bytes written */
  uint64_t rx_bytes;         /* echoed bytes received */
  uint64_t next_nl;          /* stream offset where the next '\n' must be */
  uint64_t started;          /* when this connection attempt began */
  SSL *ssl;                  /* --tls: NULL until connected */
  int secure;                /* --tls: the handshake has completed */
} conn_t;

static struct {
  options o;
  size_t size;
  uv_loop_t *loop;
  struct sockaddr_storage addr;
  conn_t *conns;
  char *msg;                 /* one message; immutable, so writes share it */
  int stopping;
  int measuring;
  uint64_t t_start, t_end;   /* measured window, uv_hrtime() ns */
  uint64_t msgs, bytes, errors, drops, handshakes;
  SSL_CTX *ssl_ctx;          /* --tls */
  uint64_t hist[HIST_BUCKETS];
  int next_connect, pending_connects, attempts_done, opened, closed;
  int idle_reported, drip_done;
  long long srv_cpu_start, srv_cpu_end; /* microseconds; -1 if unknown */
  long long own_cpu_start, own_cpu_end; /* microseconds */
  long long own_wait_start, own_wait_end; /* run-queue wait, ns; -1 if */
  long long srv_wait_start, srv_wait_end; /* unknown */
  uv_timer_t warm_timer, end_timer;
  uv_idle_t drip_idle;
} g;

static char read_buf[READ_BUF_SIZE];
static char tls_plain[READ_BUF_SIZE];  /* decrypted bytes */
static char tls_out[TLS_OUT_CHUNK];    /* ciphertext on its way out */
static uv_buf_t iov[MAX_DEPTH];

static void start_connect(conn_t *c);
static void end_run(void);
static void tls_write(conn_t *c, const uv_buf_t *bufs, int k);

/* ---- small utilities ---------------------------------------------------- */

static void usage(FILE *out) {
  fprintf(out,
    "usage: loadgen --port P [--host 127.0.0.1] [--mode echo|churn|idle|bulk|drip]\n"
    "               [--conns N] [--size BYTES[K|M]] [--depth D]\n"
    "               [--duration SECONDS] [--warmup SECONDS]\n"
    "               [--cpu K] [--server-pid PID] [--tls]\n"
    "defaults: mode echo, conns 50 (bulk, drip: 1), size 64 (bulk: 64K,\n"
    "  drip: 1M), depth 1 (bulk: 4), duration 3 (drip: timeout 60),\n"
    "  warmup 1.  --server-pid adds the server's CPU time (utime+stime)\n"
    "  over the measured window to the result line.  --tls speaks TLS\n"
    "  (echo, churn, bulk).  Results: one line of key=value on\n"
    "  stdout; see the comment atop loadgen.c for the keys.\n");
}

static void report_error(const char *what, int err) {
  if (++g.errors > MAX_ERROR_LOGS)
    return;
  if (err)
    fprintf(stderr, "loadgen: %s: %s\n", what, uv_strerror(err));
  else
    fprintf(stderr, "loadgen: %s\n", what);
}

static uint64_t ms_of(double seconds) {
  return (uint64_t)(seconds * 1000.0 + 0.5);
}

/* Thousands of sockets would hit the usual 1024 soft limit. */
static void raise_nofile_limit(int conns) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
    return;
  if (rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
      getrlimit(RLIMIT_NOFILE, &rl); /* report what we really have */
  }
  if (rl.rlim_cur != RLIM_INFINITY && (rlim_t)conns + 16 > rl.rlim_cur)
    fprintf(stderr, "loadgen: warning: %d conns but RLIMIT_NOFILE is %llu\n",
            conns, (unsigned long long)rl.rlim_cur);
}

static int pin_to_cpu(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  if (sched_setaffinity(0, sizeof set, &set) == 0)
    return 0;
  fprintf(stderr, "loadgen: cannot pin to cpu %d: %s\n", cpu, strerror(errno));
  return -1;
}

/* Process CPU time (all threads) from /proc/PID/stat, in microseconds.
 * Fields 14 and 15 are utime and stime; the command name (field 2) may hold
 * spaces, so parsing starts after its closing parenthesis. */
static long long read_server_cpu_us(void) {
  if (g.o.server_pid <= 0)
    return -1;
  char path[64], buf[1024];
  snprintf(path, sizeof path, "/proc/%d/stat", g.o.server_pid);
  FILE *f = fopen(path, "r");
  if (f == NULL)
    return -1;
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  const char *p = strrchr(buf, ')');
  unsigned long long utime, stime;
  if (p == NULL || sscanf(p + 1, "%*s %*s %*s %*s %*s %*s %*s %*s %*s %*s "
                          "%*s %llu %llu", &utime, &stime) != 2)
    return -1;
  long hz = sysconf(_SC_CLK_TCK);
  return (long long)((utime + stime) * 1000000ull / (unsigned long long)hz);
}

/* Our own CPU time, to tell when the load generator is the bottleneck. */
static long long own_cpu_us(void) {
  struct rusage ru;
  if (getrusage(RUSAGE_SELF, &ru) != 0)
    return 0;
  return (long long)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000 +
         ru.ru_utime.tv_usec + ru.ru_stime.tv_usec;
}

/* Nanoseconds a task spent runnable but waiting for a CPU (field 2 of
 * /proc/PID/schedstat).  Both processes are pinned to a core of their own,
 * so any wait means something else ran there and the run is disturbed. */
static long long read_run_wait_ns(int pid) {
  char path[64];
  unsigned long long on_cpu, waited;
  if (pid > 0)
    snprintf(path, sizeof path, "/proc/%d/schedstat", pid);
  else
    snprintf(path, sizeof path, "/proc/self/schedstat");
  FILE *f = fopen(path, "r");
  if (f == NULL)
    return -1;
  int n = fscanf(f, "%llu %llu", &on_cpu, &waited);
  fclose(f);
  return n == 2 ? (long long)waited : -1;
}

/* ---- latency histogram (log-linear, like HdrHistogram) ------------------ */

static int hist_bucket(uint64_t v) {
  if (v < HIST_SUB)
    return (int)v;
  int shift = 63 - __builtin_clzll(v) - HIST_SUB_BITS;
  return (shift + 1) * HIST_SUB + (int)((v >> shift) & (HIST_SUB - 1));
}

/* Midpoint of a bucket, the best single estimate of the values in it. */
static uint64_t hist_value(int bucket) {
  if (bucket < HIST_SUB)
    return (uint64_t)bucket;
  int shift = bucket / HIST_SUB - 1;
  uint64_t low = (uint64_t)(HIST_SUB + bucket % HIST_SUB) << shift;
  return low + ((1ull << shift) >> 1);
}

/* Value (ns) at the given quantile, in parts per 100000. */
static uint64_t hist_quantile(uint64_t per100k) {
  uint64_t total = 0, seen = 0;
  for (int i = 0; i < HIST_BUCKETS; i++)
    total += g.hist[i];
  uint64_t target = (total * per100k + 99999) / 100000;
  for (int i = 0; i < HIST_BUCKETS; i++) {
    seen += g.hist[i];
    if (seen >= target && seen > 0)
      return hist_value(i);
  }
  return 0;
}

/* ---- argument parsing --------------------------------------------------- */

static int parse_ll(const char *s, long long lo, long long hi, long long *out) {
  char *end;
  errno = 0;
  long long v = strtoll(s, &end, 10);
  if (*end == 'K' || *end == 'k')
    v *= 1024, end++;
  else if (*end == 'M' || *end == 'm')
    v *= 1024 * 1024, end++;
  if (errno || end == s || *end || v < lo || v > hi)
    return -1;
  *out = v;
  return 0;
}

static int parse_int(const char *s, int lo, int hi, int *out) {
  long long v;
  if (parse_ll(s, lo, hi, &v) != 0)
    return -1;
  *out = (int)v;
  return 0;
}

static int parse_seconds(const char *s, double *out) {
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  if (errno || end == s || *end || !(v >= 0 && v <= 86400))
    return -1;
  *out = v;
  return 0;
}

static int parse_mode(const char *s, run_mode *out) {
  for (int m = MODE_ECHO; m <= MODE_DRIP; m++)
    if (strcmp(s, mode_names[m]) == 0) {
      *out = (run_mode)m;
      return 0;
    }
  return -1;
}

static int parse_option(int opt, const char *arg, options *o) {
  switch (opt) {
  case 'p': return parse_int(arg, 1, 65535, &o->port);
  case 'H': o->host = arg; return 0;
  case 'c': return parse_int(arg, 1, 1000000, &o->conns);
  case 's': return parse_ll(arg, 1, MAX_SIZE, &o->size);
  case 'd': return parse_int(arg, 1, MAX_DEPTH, &o->depth);
  case 't': return parse_seconds(arg, &o->duration);
  case 'w': return parse_seconds(arg, &o->warmup);
  case 'm': return parse_mode(arg, &o->mode);
  case 'C': return parse_int(arg, 0, CPU_SETSIZE - 1, &o->cpu);
  case 'P': return parse_int(arg, 1, 1 << 30, &o->server_pid);
  case 'T': o->tls = 1; return 0;
  default: return -1;
  }
}

/* Defaults depend on the mode, so they are filled in after parsing. */
static void apply_defaults(options *o) {
  int streaming = o->mode == MODE_BULK || o->mode == MODE_DRIP;
  if (o->mode == MODE_DRIP)
    o->conns = 1;
  if (o->conns < 0)
    o->conns = streaming ? 1 : 50;
  if (o->size < 0)
    o->size = o->mode == MODE_BULK ? 64 * 1024
            : o->mode == MODE_DRIP ? 1024 * 1024 : 64;
  if (o->depth < 0)
    o->depth = o->mode == MODE_BULK ? 4 : 1;
  if (o->duration < 0)
    o->duration = o->mode == MODE_DRIP ? DRIP_DEFAULT_TIMEOUT_S : 3;
  if (o->warmup < 0)
    o->warmup = 1;
}

static const char *option_name(const struct option *opts, int val) {
  for (; opts->name != NULL; opts++)
    if (opts->val == val)
      return opts->name;
  return "?";
}

static void parse_args(int argc, char **argv, options *o) {
  static const struct option longopts[] = {
    {"port", required_argument, 0, 'p'},   {"host", required_argument, 0, 'H'},
    {"conns", required_argument, 0, 'c'},  {"size", required_argument, 0, 's'},
    {"depth", required_argument, 0, 'd'},  {"duration", required_argument, 0, 't'},
    {"warmup", required_argument, 0, 'w'}, {"mode", required_argument, 0, 'm'},
    {"cpu", required_argument, 0, 'C'},    {"server-pid", required_argument, 0, 'P'},
    {"tls", no_argument, 0, 'T'},          {"help", no_argument, 0, 'h'},
    {0, 0, 0, 0}};
  *o = (options){.host = "127.0.0.1", .conns = -1, .depth = -1, .cpu = -1,
                 .size = -1, .duration = -1, .warmup = -1, .mode = MODE_ECHO};
  int opt;
  while ((opt = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
    if (opt == 'h') {
      usage(stdout);
      exit(0);
    }
    if (opt == '?' || parse_option(opt, optarg, o) != 0) {
      if (opt != '?')
        fprintf(stderr, "loadgen: bad value for --%s: %s\n",
                option_name(longopts, opt), optarg);
      usage(stderr);
      exit(2);
    }
  }
  apply_defaults(o);
  if (o->port == 0 || optind != argc ||
      (uint64_t)o->size * (uint64_t)o->depth > MAX_IN_FLIGHT_BYTES ||
      (o->duration <= 0 && o->mode != MODE_IDLE) ||
      (o->tls && (o->mode == MODE_DRIP || o->mode == MODE_IDLE))) {
    usage(stderr);
    exit(2);
  }
}

/* ---- connections -------------------------------------------------------- */

static void on_closed(uv_handle_t *handle) {
  conn_t *c = handle->data;
  if (c->ssl != NULL) {
    SSL_free(c->ssl);
    c->ssl = NULL;
  }
  c->secure = 0;
  if (g.o.mode == MODE_CHURN) {
    if (!g.stopping)
      start_connect(c); /* the slot goes straight round again */
  } else if (++g.closed == g.o.conns) {
    end_run(); /* every connection failed: waiting longer measures nothing */
  }
}

static void conn_close(conn_t *c) {
  if (!uv_is_closing((uv_handle_t *)&c->tcp))
    uv_close((uv_handle_t *)&c->tcp, on_closed);
}

static void conn_fail(conn_t *c, const char *what, int err) {
  if (!g.stopping)
    report_error(what, err);
  if (g.o.mode == MODE_IDLE && g.idle_reported)
    g.drops++;
  conn_close(c);
}

static void on_write_done(uv_write_t *req, int status) {
  conn_t *c = req->data;
  free(req);
  if (status < 0 && status != UV_ECANCELED)
    conn_fail(c, "write", status);
}

/* Queue bufs that uv_try_write could not send.  They point into g.msg,
 * which never changes, so nothing needs copying. */
static void queue_write(conn_t *c, const uv_buf_t *bufs, unsigned n,
                        uv_write_cb cb) {
  uv_write_t *req = malloc(sizeof *req);
  if (req == NULL) {
    conn_fail(c, "out of memory", 0);
    return;
  }
  req->data = c;
  int r = uv_write(req, (uv_stream_t *)&c->tcp, bufs, n, cb);
  if (r < 0) {
    free(req);
    conn_fail(c, "write", r);
  }
}

/* Write k whole messages as one writev; queue whatever does not fit. */
static void write_msgs(conn_t *c, int k) {
  for (int i = 0; i < k; i++)
    iov[i] = uv_buf_init(g.msg, (unsigned)g.size);
  if (c->ssl != NULL) {
    tls_write(c, iov, k);
    return;
  }
  int n = uv_try_write((uv_stream_t *)&c->tcp, iov, (unsigned)k);
  if (n == UV_EAGAIN) /* socket buffer full, or earlier writes queued */
    n = 0;
  if (n < 0) {
    conn_fail(c, "write", n);
    return;
  }
  size_t skip = (size_t)n / g.size, off = (size_t)n % g.size;
  if (skip == (size_t)k)
    return;
  iov[skip].base += off;
  iov[skip].len -= off;
  queue_write(c, iov + skip, (unsigned)(k - (int)skip), on_write_done);
}

/* Stamp and send k new messages; the ring slots reused here belong to
 * messages already completed, since at most depth are ever in flight. */
static void send_msgs(conn_t *c, int k) {
  uint64_t now = uv_hrtime();
  for (int i = 0; i < k; i++)
    c->sent_at[(c->tx_msgs + (uint64_t)i) % (uint64_t)g.o.depth] = now;
  c->tx_msgs += (uint64_t)k;
  write_msgs(c, k);
}

/* Every '\n' must sit at a message end and every message end must be a
 * '\n'.  Call before adding len to rx_bytes. */
static int check_lines(conn_t *c, const char *data, size_t len) {
  const char *p = data, *end = data + len;
  while ((p = memchr(p, '\n', (size_t)(end - p))) != NULL) {
    if (c->rx_bytes + (uint64_t)(p - data) != c->next_nl)
      return -1;
    c->next_nl += g.size;
    p++;
  }
  return c->rx_bytes + len > c->next_nl ? -1 : 0;
}

static void on_alloc(uv_handle_t *handle, size_t hint, uv_buf_t *buf) {
  (void)handle;
  (void)hint;
  *buf = uv_buf_init(read_buf, sizeof read_buf); /* consumed in on_read */
}

/* ---- echo and bulk: keep depth messages in flight ----------------------- */

static void record_completions(conn_t *c, uint64_t first, uint64_t n,
                               uint64_t now) {
  if (!g.measuring)
    return;
  for (uint64_t i = first; i < first + n; i++)
    g.hist[hist_bucket(now - c->sent_at[i % (uint64_t)g.o.depth])]++;
  g.msgs += n;
}

static void stream_read(conn_t *c, const char *data, size_t len) {
  uint64_t done_before = c->rx_bytes / g.size;
  if (check_lines(c, data, len) != 0) {
    conn_fail(c, "echo does not match what was sent", 0);
    return;
  }
  c->rx_bytes += len;
  if (c->rx_bytes > c->tx_msgs * g.size) {
    conn_fail(c, "more bytes echoed than sent", 0);
    return;
  }
  if (g.measuring)
    g.bytes += len;
  uint64_t done = c->rx_bytes / g.size - done_before;
  if (done == 0)
    return;
  record_completions(c, done_before, done, uv_hrtime());
  send_msgs(c, (int)done);
}

/* ---- churn: connect, one line, echo, close, repeat ---------------------- */

/* Churn and drip wait for one line of g.size bytes: returns 1 once all of
 * it is back, 0 before, -1 (the connection failed) on a wrong echo. */
static int one_line_read(conn_t *c, const char *data, size_t len) {
  if (check_lines(c, data, len) != 0 || c->rx_bytes + len > g.size) {
    conn_fail(c, "echo does not match what was sent", 0);
    return -1;
  }
  c->rx_bytes += len;
  return c->rx_bytes == g.size;
}

static void churn_read(conn_t *c, const char *data, size_t len) {
  if (one_line_read(c, data, len) != 1)
    return;
  if (g.measuring) {
    g.hist[hist_bucket(uv_hrtime() - c->started)]++;
    g.msgs++;
  }
  conn_close(c); /* on_closed reconnects */
}

/* ---- idle: open everything, hold, exit ---------------------------------- */

static void on_idle_hold_done(uv_timer_t *t) {
  (void)t;
  end_run();
}

static void idle_report_open(void) {
  if (g.idle_reported)
    return;
  g.idle_reported = 1;
  printf("mode=idle conns=%d opened=%d errors=%llu\n", g.o.conns, g.opened,
         (unsigned long long)g.errors);
  fflush(stdout); /* the caller samples server memory when this appears */
  uv_timer_start(&g.end_timer, on_idle_hold_done, ms_of(g.o.duration), 0);
}

static void on_idle_open_timeout(uv_timer_t *t) {
  (void)t;
  report_error("idle: gave up waiting for connections to open", 0);
  idle_report_open();
}

/* ---- drip: one byte per write ------------------------------------------- */

static void drip_step(uv_idle_t *h);

static void on_drip_write_done(uv_write_t *req, int status) {
  conn_t *c = req->data;
  free(req);
  if (status == UV_ECANCELED)
    return;
  if (status < 0) {
    conn_fail(c, "write", status);
    return;
  }
  c->tx_bytes++;
  uv_idle_start(&g.drip_idle, drip_step);
}

/* Runs once per loop turn, writing a batch of single bytes; the loop polls
 * (without blocking, as an idle handle is active) and reads in between. */
static void drip_step(uv_idle_t *h) {
  conn_t *c = &g.conns[0];
  for (int i = 0; i < DRIP_BATCH && c->tx_bytes < g.size; i++) {
    uv_buf_t b = uv_buf_init(g.msg + c->tx_bytes, 1);
    int n = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    if (n == 1) {
      c->tx_bytes++;
      continue;
    }
    uv_idle_stop(h); /* resumed by on_drip_write_done */
    if (n == UV_EAGAIN)
      queue_write(c, &b, 1, on_drip_write_done);
    else
      conn_fail(c, "write", n);
    return;
  }
  if (c->tx_bytes == g.size)
    uv_idle_stop(h);
}

static void drip_read(conn_t *c, const char *data, size_t len) {
  if (one_line_read(c, data, len) != 1)
    return;
  g.t_end = uv_hrtime();
  g.drip_done = 1;
  end_run();
}

static void on_drip_timeout(uv_timer_t *t) {
  (void)t;
  report_error("drip: timed out before the whole echo came back", 0);
  end_run();
}

/* ---- TLS: OpenSSL over memory BIOs under the libuv stream --------------- */

static void report_tls_error(conn_t *c, const char *what) {
  char msg[256];
  unsigned long e = ERR_get_error();
  if (e != 0) {
    char reason[200];
    ERR_error_string_n(e, reason, sizeof reason);
    snprintf(msg, sizeof msg, "%s: %s", what, reason);
  } else {
    snprintf(msg, sizeof msg, "%s failed", what);
  }
  ERR_clear_error();
  conn_fail(c, msg, 0);
}

/* Moves the ciphertext OpenSSL produced to the socket: uv_try_write while
 * nothing is queued, a heap copy with its request for the rest (libuv keeps
 * queued writes in order, and try_write refuses while any are queued). */
static void tls_flush(conn_t *c) {
  BIO *wbio = SSL_get_wbio(c->ssl);
  int n;
  while ((n = BIO_read(wbio, tls_out, sizeof tls_out)) > 0) {
    uv_buf_t b = uv_buf_init(tls_out, (unsigned)n);
    int sent = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
    if (sent == UV_EAGAIN)
      sent = 0;
    if (sent < 0) {
      conn_fail(c, "write", sent);
      return;
    }
    if (sent == n)
      continue;
    uv_write_t *req = malloc(sizeof *req + (size_t)(n - sent));
    if (req == NULL) {
      conn_fail(c, "out of memory", 0);
      return;
    }
    char *copy = (char *)(req + 1);
    memcpy(copy, tls_out + sent, (size_t)(n - sent));
    req->data = c;
    b = uv_buf_init(copy, (unsigned)(n - sent));
    int r = uv_write(req, (uv_stream_t *)&c->tcp, &b, 1, on_write_done);
    if (r < 0) {
      free(req);
      conn_fail(c, "write", r);
      return;
    }
  }
}

/* A memory BIO takes everything, so SSL_write never comes back short. */
static void tls_write(conn_t *c, const uv_buf_t *bufs, int k) {
  for (int i = 0; i < k; i++)
    if (SSL_write(c->ssl, bufs[i].base, (int)bufs[i].len) <= 0) {
      report_tls_error(c, "SSL_write");
      return;
    }
  tls_flush(c);
}

static void start_traffic(conn_t *c);

static void tls_handshake(conn_t *c) {
  int r = SSL_do_handshake(c->ssl);
  if (r == 1) {
    c->secure = 1;
    if (g.measuring)
      g.handshakes++;
    tls_flush(c); /* the client Finished */
    if (!uv_is_closing((uv_handle_t *)&c->tcp))
      start_traffic(c);
    return;
  }
  if (SSL_get_error(c->ssl, r) == SSL_ERROR_WANT_READ)
    tls_flush(c);
  else
    report_tls_error(c, "TLS handshake");
}

static int tls_begin(conn_t *c) {
  BIO *rbio = BIO_new(BIO_s_mem()), *wbio = BIO_new(BIO_s_mem());
  c->ssl = SSL_new(g.ssl_ctx);
  if (c->ssl == NULL || rbio == NULL || wbio == NULL) {
    BIO_free(rbio);
    BIO_free(wbio);
    report_tls_error(c, "SSL_new");
    return -1;
  }
  SSL_set_bio(c->ssl, rbio, wbio);
  SSL_set_connect_state(c->ssl);
  tls_handshake(c);
  return 0;
}

static void dispatch_read(conn_t *c, const char *data, size_t len);

/* Ciphertext in; plaintext out to the mode's reader. */
static void tls_read(conn_t *c, const char *data, size_t len) {
  if (BIO_write(SSL_get_rbio(c->ssl), data, (int)len) != (int)len) {
    report_tls_error(c, "BIO_write");
    return;
  }
  if (!c->secure) {
    tls_handshake(c);
    if (!c->secure)
      return;
  }
  for (;;) {
    if (uv_is_closing((uv_handle_t *)&c->tcp))
      return;
    int n = SSL_read(c->ssl, tls_plain, sizeof tls_plain);
    if (n > 0) {
      dispatch_read(c, tls_plain, (size_t)n);
      continue;
    }
    int e = SSL_get_error(c->ssl, n);
    if (e == SSL_ERROR_WANT_READ)
      break;
    if (e == SSL_ERROR_ZERO_RETURN)
      conn_fail(c, "server closed the connection", 0);
    else
      report_tls_error(c, "SSL_read");
    return;
  }
  tls_flush(c); /* post-handshake messages, if any */
}

static int tls_setup(void) {
  g.ssl_ctx = SSL_CTX_new(TLS_client_method());
  if (g.ssl_ctx == NULL)
    return -1;
  SSL_CTX_set_verify(g.ssl_ctx, SSL_VERIFY_NONE, NULL);
  /* Every connection a full handshake: no client-side session cache. */
  SSL_CTX_set_session_cache_mode(g.ssl_ctx, SSL_SESS_CACHE_OFF);
  return 0;
}

/* ---- connection setup, shared by all modes ------------------------------ */

static void dispatch_read(conn_t *c, const char *data, size_t len) {
  switch (g.o.mode) {
  case MODE_ECHO:
  case MODE_BULK: stream_read(c, data, len); break;
  case MODE_CHURN: churn_read(c, data, len); break;
  case MODE_DRIP: drip_read(c, data, len); break;
  case MODE_IDLE: conn_fail(c, "idle: unexpected data", 0); break;
  }
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  conn_t *c = stream->data;
  if (nread == 0)
    return;
  if (nread < 0) {
    conn_fail(c, nread == UV_EOF ? "server closed the connection" : "read",
              nread == UV_EOF ? 0 : (int)nread);
    return;
  }
  if (c->ssl != NULL)
    tls_read(c, buf->base, (size_t)nread);
  else
    dispatch_read(c, buf->base, (size_t)nread);
}

static void start_traffic(conn_t *c) {
  switch (g.o.mode) {
  case MODE_ECHO:
  case MODE_BULK: send_msgs(c, g.o.depth); break;
  case MODE_CHURN: c->tx_msgs = 1; write_msgs(c, 1); break;
  case MODE_DRIP: uv_idle_start(&g.drip_idle, drip_step); break;
  case MODE_IDLE: break; /* reading only, to notice drops */
  }
}

/* Keep at most MAX_PENDING_CONNECTS handshakes outstanding. */
static void pump_connects(void) {
  while (!g.stopping && g.next_connect < g.o.conns &&
         g.pending_connects < MAX_PENDING_CONNECTS)
    start_connect(&g.conns[g.next_connect++]);
}

static void connect_attempt_done(void) {
  g.attempts_done++;
  pump_connects();
  if (g.o.mode == MODE_IDLE && g.attempts_done == g.o.conns)
    idle_report_open();
}

static void on_connect(uv_connect_t *req, int status) {
  conn_t *c = req->handle->data;
  g.pending_connects--;
  if (status == UV_ECANCELED) /* closed while connecting: we are stopping */
    return;
  if (status < 0) {
    conn_fail(c, "connect", status);
  } else {
    g.opened++;
    uv_tcp_nodelay(&c->tcp, 1);
    int r = uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
    if (r < 0)
      conn_fail(c, "read start", r);
    else if (g.o.tls)
      tls_begin(c);
    else
      start_traffic(c);
  }
  connect_attempt_done();
}

static void start_connect(conn_t *c) {
  c->tx_msgs = c->tx_bytes = c->rx_bytes = 0;
  c->next_nl = g.size - 1;
  c->started = uv_hrtime();
  uv_tcp_init(g.loop, &c->tcp);
  c->tcp.data = c;
  g.pending_connects++;
  int r = uv_tcp_connect(&c->connect_req, &c->tcp,
                         (const struct sockaddr *)&g.addr, on_connect);
  if (r < 0) {
    g.pending_connects--;
    conn_fail(c, "connect", r);
    connect_attempt_done();
  }
}

/* ---- run phases --------------------------------------------------------- */

static void begin_measure(void) {
  g.measuring = 1;
  g.t_start = uv_hrtime();
  g.srv_cpu_start = read_server_cpu_us();
  g.own_cpu_start = own_cpu_us();
  g.own_wait_start = read_run_wait_ns(0);
  g.srv_wait_start = g.o.server_pid > 0 ? read_run_wait_ns(g.o.server_pid) : -1;
}

static void end_measure(void) {
  if (!g.measuring)
    return;
  g.t_end = uv_hrtime();
  g.srv_cpu_end = read_server_cpu_us();
  g.own_cpu_end = own_cpu_us();
  g.own_wait_end = read_run_wait_ns(0);
  g.srv_wait_end = g.o.server_pid > 0 ? read_run_wait_ns(g.o.server_pid) : -1;
  g.measuring = 0;
}

static void close_any(uv_handle_t *handle, void *arg) {
  (void)arg;
  if (!uv_is_closing(handle))
    uv_close(handle, handle->data ? on_closed : NULL);
}

/* Closing every handle cancels pending connects and writes; uv_run then
 * returns once their callbacks have run. */
static void end_run(void) {
  if (g.stopping)
    return;
  g.stopping = 1;
  end_measure();
  uv_walk(g.loop, close_any, NULL);
}

static void on_warm(uv_timer_t *t) {
  (void)t;
  begin_measure();
}

static void on_end(uv_timer_t *t) {
  (void)t;
  end_run();
}

static void arm_timers(void) {
  uv_timer_init(g.loop, &g.warm_timer);
  uv_timer_init(g.loop, &g.end_timer);
  uv_idle_init(g.loop, &g.drip_idle);
  switch (g.o.mode) {
  case MODE_IDLE:
    uv_timer_start(&g.end_timer, on_idle_open_timeout, IDLE_OPEN_TIMEOUT_MS, 0);
    break;
  case MODE_DRIP:
    g.t_start = uv_hrtime();
    uv_timer_start(&g.end_timer, on_drip_timeout, ms_of(g.o.duration), 0);
    break;
  default:
    if (g.o.warmup > 0)
      uv_timer_start(&g.warm_timer, on_warm, ms_of(g.o.warmup), 0);
    else
      begin_measure();
    uv_timer_start(&g.end_timer, on_end, ms_of(g.o.warmup + g.o.duration), 0);
  }
}

/* ---- results ------------------------------------------------------------ */

/* Fraction of the window a task waited for its CPU: a disturbed run. */
static void print_wait(const char *key, long long start, long long end,
                       double secs) {
  if (start >= 0 && end >= 0 && secs > 0)
    printf(" %s=%.3f", key, (double)(end - start) / 1e9 / secs);
}

/* lg_cpu near 1.0 means loadgen saturated its core: the rate is then a
 * floor for the server, not its limit. */
static void print_cpu(uint64_t per, double secs) {
  if (secs > 0)
    printf(" lg_cpu=%.2f",
           (double)(g.own_cpu_end - g.own_cpu_start) / 1e6 / secs);
  print_wait("lg_wait", g.own_wait_start, g.own_wait_end, secs);
  print_wait("srv_wait", g.srv_wait_start, g.srv_wait_end, secs);
  if (g.srv_cpu_start < 0 || g.srv_cpu_end < 0)
    return;
  long long used = g.srv_cpu_end - g.srv_cpu_start;
  printf(" srv_cpu_us=%lld", used);
  if (per > 0)
    printf(" srv_cpu_us_per_msg=%.3f", (double)used / (double)per);
}

static void print_latency(void) {
  printf(" p50_us=%.1f p99_us=%.1f p999_us=%.1f",
         (double)hist_quantile(50000) / 1e3, (double)hist_quantile(99000) / 1e3,
         (double)hist_quantile(99900) / 1e3);
}

/* Prints the one result line; returns the exit status. */
static int print_result(void) {
  double secs = (double)(g.t_end - g.t_start) / 1e9;
  unsigned long long errors = g.errors, msgs = g.msgs;
  switch (g.o.mode) {
  case MODE_ECHO:
  case MODE_CHURN:
    printf("mode=%s conns=%d size=%zu", mode_names[g.o.mode], g.o.conns, g.size);
    if (g.o.mode == MODE_ECHO)
      printf(" depth=%d", g.o.depth);
    printf(" msgs=%llu rate=%.1f", msgs, secs > 0 ? (double)msgs / secs : 0);
    print_latency();
    printf(" errors=%llu", errors);
    if (g.o.tls)
      printf(" handshakes=%llu", (unsigned long long)g.handshakes);
    print_cpu(msgs, secs);
    printf("\n");
    return msgs > 0 ? 0 : 1;
  case MODE_BULK:
    printf("mode=bulk conns=%d size=%zu depth=%d bytes=%llu gbps=%.3f errors=%llu",
           g.o.conns, g.size, g.o.depth, (unsigned long long)g.bytes,
           secs > 0 ? (double)g.bytes / secs / 1e9 : 0, errors);
    if (g.o.tls)
      printf(" handshakes=%llu", (unsigned long long)g.handshakes);
    print_cpu(0, secs);
    printf("\n");
    return g.bytes > 0 ? 0 : 1;
  case MODE_DRIP:
    printf("mode=drip size=%zu writes=%llu time_ms=%.1f errors=%llu\n", g.size,
           (unsigned long long)g.conns[0].tx_bytes,
           g.drip_done ? secs * 1e3 : -1.0, errors);
    return g.drip_done ? 0 : 1;
  case MODE_IDLE:
    fprintf(stderr, "loadgen: idle: held %d of %d connections, %llu dropped\n",
            g.opened, g.o.conns, (unsigned long long)g.drops);
    return g.opened > 0 ? 0 : 1;
  }
  return 1;
}

/* ---- main --------------------------------------------------------------- */

static int resolve(const char *host, int port) {
  if (uv_ip4_addr(host, port, (struct sockaddr_in *)&g.addr) == 0 ||
      uv_ip6_addr(host, port, (struct sockaddr_in6 *)&g.addr) == 0)
    return 0;
  fprintf(stderr, "loadgen: --host must be a numeric address: %s\n", host);
  return -1;
}

/* Filler cycles through letters so a shifted echo is visible when
 * debugging; the only '\n' is the last byte. */
static int build_message(void) {
  g.msg = malloc(g.size);
  if (g.msg == NULL)
    return -1;
  for (size_t i = 0; i + 1 < g.size; i++)
    g.msg[i] = (char)('a' + i % 26);
  g.msg[g.size - 1] = '\n';
  return 0;
}

static int setup(void) {
  g.size = (size_t)g.o.size;
  signal(SIGPIPE, SIG_IGN); /* a server closing on us is an error, not death */
  g.srv_cpu_start = g.srv_cpu_end = -1;
  if (g.o.cpu >= 0 && pin_to_cpu(g.o.cpu) != 0)
    return -1;
  raise_nofile_limit(g.o.conns);
  if (resolve(g.o.host, g.o.port) != 0 || build_message() != 0)
    return -1;
  if (g.o.tls && tls_setup() != 0) {
    fprintf(stderr, "loadgen: cannot create a TLS context\n");
    return -1;
  }
  g.conns = calloc((size_t)g.o.conns, sizeof *g.conns);
  uint64_t *rings = calloc((size_t)g.o.conns * (size_t)g.o.depth,
                           sizeof *rings);
  if (g.conns == NULL || rings == NULL)
    return -1;
  for (int i = 0; i < g.o.conns; i++)
    g.conns[i].sent_at = rings + (size_t)i * (size_t)g.o.depth;
  g.loop = uv_default_loop();
  return 0;
}

int main(int argc, char **argv) {
  parse_args(argc, argv, &g.o);
  if (setup() != 0)
    return 1;
  arm_timers();
  pump_connects();
  uv_run(g.loop, UV_RUN_DEFAULT);
  uv_loop_close(g.loop);
  int status = print_result();
  free(g.conns ? g.conns[0].sent_at : NULL);
  free(g.conns);
  free(g.msg);
  return status;
}
