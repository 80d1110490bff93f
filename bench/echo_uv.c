/*
 * echo_uv -- "the ceiling": the fastest plain C libuv echo server we know
 * how to write, used as the reference every other server is compared to.
 *
 *   echo_uv PORT [CPU]
 *
 * Listens on 127.0.0.1:PORT and echoes raw bytes back (no parsing).
 * Optional CPU pins the process to that core so benchmark runs are stable.
 * Exits cleanly (status 0) on SIGINT or SIGTERM.
 *
 * Design choices, all aimed at the minimum work per message:
 *   - one read buffer shared by every connection: libuv calls alloc_cb and
 *     read_cb back to back on one thread and we consume the data inside
 *     read_cb, so the buffer is free again before the next alloc;
 *   - uv_try_write first (the common case: the whole echo fits in the socket
 *     buffer, no request, no allocation, no copy);
 *   - only a partial write copies the remainder to the heap (together with
 *     its uv_write_t, one allocation) and queues it with uv_write; reading
 *     stops until it is flushed, which bounds memory to one remainder per
 *     connection and pushes back on the peer;
 *   - an idle connection costs one uv_tcp_t and nothing else;
 *   - TCP_NODELAY on every accepted socket, so small echoes leave at once.
 */
#define _GNU_SOURCE /* sched_setaffinity, CPU_SET */
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <uv.h>

enum {
  READ_BUF_SIZE = 64 * 1024, /* one read drains most socket buffers */
  BACKLOG = 4096             /* churn benchmarks connect in bursts */
};

typedef struct {
  uv_tcp_t tcp;
} conn_t;

/* The bytes uv_try_write could not send, with the request that sends them.
 * At most one per connection: reads stop while it is pending. */
typedef struct {
  uv_write_t req;
  char data[];
} remainder_t;

static char read_buf[READ_BUF_SIZE];
static uv_tcp_t server;
static uv_signal_t sig_int, sig_term;

static void on_conn_closed(uv_handle_t *handle) {
  free(handle->data);
}

static void conn_close(conn_t *c) {
  if (!uv_is_closing((uv_handle_t *)&c->tcp))
    uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
}

static void on_alloc(uv_handle_t *handle, size_t hint, uv_buf_t *buf) {
  (void)handle;
  (void)hint;
  *buf = uv_buf_init(read_buf, sizeof read_buf);
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf);

static void on_write_done(uv_write_t *req, int status) {
  conn_t *c = req->data;
  free(req); /* the remainder_t it heads */
  if (status == UV_ECANCELED) /* the handle is closing already */
    return;
  if (status < 0 || uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read))
    conn_close(c);
}

/* Queue what uv_try_write left over.  The shared read buffer is reused by
 * the next read, so the rest must be copied; stopping reads until the write
 * completes means one copy per connection at most. */
static void queue_remainder(conn_t *c, const char *data, size_t len) {
  remainder_t *r = malloc(sizeof *r + len);
  if (r == NULL) {
    conn_close(c);
    return;
  }
  memcpy(r->data, data, len);
  uv_buf_t b = uv_buf_init(r->data, (unsigned)len);
  uv_read_stop((uv_stream_t *)&c->tcp);
  r->req.data = c;
  if (uv_write(&r->req, (uv_stream_t *)&c->tcp, &b, 1, on_write_done) < 0) {
    free(r);
    conn_close(c);
  }
}

static void echo(conn_t *c, const char *data, size_t len) {
  uv_buf_t b = uv_buf_init((char *)data, (unsigned)len);
  int n = uv_try_write((uv_stream_t *)&c->tcp, &b, 1);
  if (n == UV_EAGAIN) /* socket buffer full: nothing was written */
    n = 0;
  if (n < 0) {
    conn_close(c);
    return;
  }
  if ((size_t)n < len)
    queue_remainder(c, data + n, len - (size_t)n);
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  conn_t *c = stream->data;
  if (nread > 0)
    echo(c, buf->base, (size_t)nread);
  else if (nread < 0) /* UV_EOF or a socket error: either way we are done */
    conn_close(c);
}

static void on_connection(uv_stream_t *listener, int status) {
  if (status < 0) {
    fprintf(stderr, "echo_uv: accept: %s\n", uv_strerror(status));
    return;
  }
  conn_t *c = calloc(1, sizeof *c);
  if (c == NULL) { /* libuv would stall the listener until uv_accept */
    fprintf(stderr, "echo_uv: out of memory\n");
    abort();
  }
  uv_tcp_init(listener->loop, &c->tcp);
  c->tcp.data = c;
  if (uv_accept(listener, (uv_stream_t *)&c->tcp) < 0) {
    conn_close(c);
    return;
  }
  uv_tcp_nodelay(&c->tcp, 1);
  if (uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) < 0)
    conn_close(c);
}

/* Only connection handles carry data; the listener and signals are static. */
static void close_any(uv_handle_t *handle, void *arg) {
  (void)arg;
  if (uv_is_closing(handle))
    return;
  uv_close(handle, handle->data ? on_conn_closed : NULL);
}

static void on_signal(uv_signal_t *sig, int signum) {
  (void)signum;
  uv_walk(sig->loop, close_any, NULL); /* loop then runs out of handles */
}

/* Idle-connection benchmarks open thousands of sockets. */
static void raise_nofile_limit(void) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
  }
}

static int pin_to_cpu(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  if (sched_setaffinity(0, sizeof set, &set) != 0) {
    fprintf(stderr, "echo_uv: cannot pin to cpu %d: %s\n", cpu,
            strerror(errno));
    return -1;
  }
  return 0;
}

static int parse_int(const char *s, int lo, int hi, int *out) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || end == s || *end || v < lo || v > hi)
    return -1;
  *out = (int)v;
  return 0;
}

static int start_listening(uv_loop_t *loop, int port) {
  struct sockaddr_in addr;
  int r = uv_ip4_addr("127.0.0.1", port, &addr);
  if (r == 0)
    r = uv_tcp_init(loop, &server);
  if (r == 0)
    r = uv_tcp_bind(&server, (const struct sockaddr *)&addr, 0);
  if (r == 0)
    r = uv_listen((uv_stream_t *)&server, BACKLOG, on_connection);
  if (r < 0)
    fprintf(stderr, "echo_uv: listen on 127.0.0.1:%d: %s\n", port,
            uv_strerror(r));
  return r;
}

static void watch_signals(uv_loop_t *loop) {
  uv_signal_init(loop, &sig_int);
  uv_signal_init(loop, &sig_term);
  uv_signal_start(&sig_int, on_signal, SIGINT);
  uv_signal_start(&sig_term, on_signal, SIGTERM);
}

int main(int argc, char **argv) {
  int port, cpu = -1;
  if (argc < 2 || argc > 3 || parse_int(argv[1], 1, 65535, &port) != 0 ||
      (argc == 3 && parse_int(argv[2], 0, CPU_SETSIZE - 1, &cpu) != 0)) {
    fprintf(stderr, "usage: echo_uv PORT [CPU]\n");
    return 2;
  }
  if (cpu >= 0 && pin_to_cpu(cpu) != 0)
    return 1;
  raise_nofile_limit();
  /* A peer that closes while its echo is being written must cost us one
   * EPIPE on that connection, not the whole process. */
  signal(SIGPIPE, SIG_IGN);

  uv_loop_t *loop = uv_default_loop();
  if (start_listening(loop, port) < 0)
    return 1;
  watch_signals(loop);
  uv_run(loop, UV_RUN_DEFAULT);
  return uv_loop_close(loop) == 0 ? 0 : 1;
}
