/* Listening sockets under a uv_poll, and the accept pipeline. A connection
 * goes through it top to bottom:
 *
 *   accept_cb        accept in batches; back off when out of descriptors
 *   serve            wrap the fd in a stream; book it (the server's begin:
 *                    max_connections counts from here)
 *   header step      with proxy_protocol: a layer that reads the PROXY
 *                    header and names the client
 *   attach_tls       with ssl_options: the TLS layer
 *   spawn_handler    handle_stream(stream, address) in a task of its own
 *   handler_end      the server's done(stream, address, failed, ...):
 *                    logs an error, closes, unbooks
 *
 * A connection that leaves before its handler runs is unbooked by done too
 * (header_closed). */
#define _GNU_SOURCE
#include "server.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "netutil.h"
#include "proxy.h"
#include "tls.h"

#define LISTENER_MT "tcpserver.listener"
#define ACCEPT_BATCH 64
#define BACKOFF_MS 100
#define FDS_LOG_MS 60000 /* at most one line a minute while it lasts */

typedef struct ts_counters ts_counters;

typedef struct ts_listener {
  uv_poll_t poll;
  uv_timer_t backoff; /* restarts accepting after EMFILE */
  ts_loop *loop;
  int fd, family;
  int self_ref, sock_ref;
  int ctx_ref;        /* TLS context, or LUA_NOREF */
  int proxy_protocol; /* a PROXY header comes first */
  double handshake_timeout;
  int polling, closed, paused, out_of_fds, pending_closes;
  uint64_t fds_logged; /* when running out of fds was last logged (ms) */
  size_t max_buffer, chunk;
  double timeout;
  ts_counters *counters; /* over the streams it accepted; holds the handler */
} ts_listener;

/* ---- the listener's counters ---- */

/* What a listener counts over the streams it accepted, closed ones too,
 * and its handler, which they keep (a registry ref) while any of them
 * holds the counters. Shared: the listener and each stream hold a
 * reference. */
struct ts_counters {
  ts_tally tally; /* first: the streams' view; layer_failures are TLS's */
  int refs;
  int owner_ref;
};

static void counters_release(lua_State *L, ts_tally *t) {
  ts_counters *c = (ts_counters *)t;

  if (c == NULL || --c->refs > 0)
    return;
  luaL_unref(L, LUA_REGISTRYINDEX, c->owner_ref);
  free(c);
}

static ts_counters *counters_new(void) {
  ts_counters *c = calloc(1, sizeof(*c));

  if (c != NULL) {
    c->tally.release = counters_release;
    c->refs = 1;
    c->owner_ref = LUA_NOREF;
  }
  return c;
}

/* The counters of the listener that accepted s, or NULL. */
static ts_counters *counters_of(ts_stream *s) {
  ts_tally *t = ts__stream_tally(s);
  return t != NULL && t->release == counters_release ? (ts_counters *)t : NULL;
}

/* ---- the handler's task and its end ---- */

/* {host=, port=} with the handler's Address metatable (at index h), which
 * answers family = "inet"; other families are set. Two fields rather than
 * three halve the table's hash part: idle connections are counted in
 * bytes. */
static void push_address(lua_State *L, int h, const char *host, int port, int family) {
  int inet = family == AF_INET;

  h = lua_absindex(L, h);
  lua_createtable(L, 0, inet ? 2 : 3);
  lua_pushstring(L, host);
  lua_setfield(L, -2, "host");
  lua_pushinteger(L, port);
  lua_setfield(L, -2, "port");
  if (!inet) {
    lua_pushstring(L, ts__addr_family(family));
    lua_setfield(L, -2, "family");
  }
  lua_getfield(L, h, "Address");
  lua_setmetatable(L, -2);
}

/* The handler of the listener that accepted s: its counters keep it. */
static void push_handler(lua_State *L, ts_stream *s) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, counters_of(s)->owner_ref);
}

/* The end of a handler task: done(stream, address, failed [, err,
 * traceback]), then the stream may go. On an error, err and traceback are
 * on L's top (see ts__spawn_owned). */
static void handler_end(lua_State *L, int status, void *owner) {
  ts_stream *s = ts__stream_of_owner(owner);
  int failed = status != LUA_OK;

  push_handler(L, s);
  lua_getfield(L, -1, "done");
  lua_remove(L, -2);
  ts__stream_push(L, s);
  ts__stream_push_kept(L, s);
  lua_pushboolean(L, failed);
  if (failed)
    lua_rotate(L, -6, 4); /* done, stream, address, failed, err, traceback */
  ts__pcall_on(L, ts__stream_loop(s), failed ? 5 : 3);
  ts__stream_keep_open(s, 0);
  ts__stream_disown(L, s);
}

/* The handler table holds the server, begin(stream), done and Address.
 * The task runs server:handle_stream(stream, address) with no frame of
 * ours under it (a frame costs an idle connection bytes); the stream keeps
 * the address for handler_end, which runs when the task returns or
 * raises. */
static void spawn_handler(lua_State *L, ts_stream *s, const char *host, int port,
                          int family) {
  push_handler(L, s);
  push_address(L, -1, host, port, family);
  lua_pushvalue(L, -1);
  ts__stream_keep(L, s);
  lua_getfield(L, -2, "server");
  lua_getfield(L, -1, "handle_stream");
  lua_insert(L, -2);
  ts__stream_push(L, s);
  lua_pushvalue(L, -4);
  /* The stream stays open at the peer's end while its handler runs: the
   * peer may have shut down only its sending half, a reply written after
   * a pause must still go, and the handler's end closes it (or its next
   * read, which gets the end). */
  ts__stream_keep_open(s, 1);
  ts__spawn_owned(L, 3, ts__stream_own(s), handler_end);
  lua_pop(L, 2);
}

/* Calls handler.<fn>(stream), unprotected errors logged. */
static void call_books(ts_loop *loop, const char *fn, ts_stream *s) {
  lua_State *L = loop->L;

  push_handler(L, s);
  lua_getfield(L, -1, fn);
  lua_remove(L, -2);
  ts__stream_push(L, s);
  ts__pcall(loop, 1);
}

/* ---- the TLS layer ---- */

/* The peer as accept (or the PROXY header) saw it names the stream in
 * logs, as a reset may leave getpeername nothing. */
static int attach_tls(lua_State *L, int ctx_ref, ts_stream *s, const char *host, int port,
                      int family, double timeout) {
  const char *peer =
      lua_pushfstring(L, family == AF_INET6 ? "[%s]:%d" : "%s:%d", host, port);
  int err;

  lua_rawgeti(L, LUA_REGISTRYINDEX, ctx_ref);
  err = ts__tls_attach(L, s, lua_gettop(L), 1, peer, timeout);
  lua_pop(L, 2);
  return err;
}

/* ---- the PROXY header step: a layer that takes the first bytes ---- */

typedef struct header_step {
  uv_timer_t timer; /* handshake_timeout; its close frees the step */
  ts_stream *s;
  ts_loop *loop;
  int ctx_ref; /* its own: the listener may close meanwhile */
  double handshake_timeout;
  uint64_t started; /* loop time (ms) the connection came */
  ts_buf buf;       /* the header so far, and what came after it */
} header_step;

static const ts_layer_ops header_ops;

static void header_free(uv_handle_t *h) {
  header_step *hs = h->data;
  lua_State *L = hs->loop->L;

  ts_buf_free(&hs->buf);
  luaL_unref(L, LUA_REGISTRYINDEX, hs->ctx_ref);
  free(hs);
}

static void log_refusal(header_step *hs, const char *why) {
  struct sockaddr_storage ss;
  int len = sizeof(ss);
  uv_stream_t *h = ts__stream_handle(hs->s);
  char host[INET6_ADDRSTRLEN] = "?", msg[200];

  if (h->type == UV_TCP &&
      uv_tcp_getpeername((uv_tcp_t *)h, (struct sockaddr *)&ss, &len) == 0)
    ts__addr_name((struct sockaddr *)&ss, host, sizeof(host));
  snprintf(msg, sizeof(msg), "PROXY protocol: %s from %s; closing", why, host);
  ts__log(hs->loop, "info", msg);
}

/* Closes the stream; header_closed unbooks it. A probe (why NULL) closes
 * silently. */
static void header_refuse(header_step *hs, const char *why) {
  if (why != NULL)
    log_refusal(hs, why);
  ts__stream_close(hs->s, UV_ECONNABORTED);
}

/* The client as the header names it, or the connection's own peer. */
static int header_client(header_step *hs, const ts_proxy_addr *a, char *host, size_t len,
                         int *port) {
  uv_stream_t *h = ts__stream_handle(hs->s);
  struct sockaddr_storage ss;
  int sslen = sizeof(ss);

  host[0] = '\0';
  *port = 0;
  if (a->family != 0) {
    snprintf(host, len, "%s", a->host);
    *port = a->port;
    return a->family;
  }
  if (h->type != UV_TCP)
    return AF_UNIX;
  if (uv_tcp_getpeername((uv_tcp_t *)h, (struct sockaddr *)&ss, &sslen) != 0)
    return AF_INET;
  *port = ts__addr_name((struct sockaddr *)&ss, host, len);
  return ss.ss_family;
}

/* What handshake_timeout leaves the TLS handshake: the header and the
 * handshake share one deadline, or a peer could stall twice as long. */
static double time_left(header_step *hs) {
  double spent = (double)(uv_now(hs->loop->uv) - hs->started) / 1000;

  if (hs->handshake_timeout <= 0)
    return hs->handshake_timeout;
  return spent < hs->handshake_timeout ? hs->handshake_timeout - spent : 0.001;
}

/* The header is complete: the step ends, and what came after the header
 * goes to the next layer (TLS) or to the stream. */
static void header_done(header_step *hs, const ts_proxy_addr *a, size_t used) {
  lua_State *L = hs->loop->L;
  ts_stream *s = hs->s;
  char host[INET6_ADDRSTRLEN], *rest = ts_buf_head(&hs->buf) + used;
  size_t left = ts_buf_len(&hs->buf) - used;
  int port, family = header_client(hs, a, host, sizeof(host), &port), err = 0;

  ts__stream_attach(s, NULL, NULL);
  uv_close((uv_handle_t *)&hs->timer, header_free); /* frees after this */
  if (hs->ctx_ref != LUA_NOREF)
    err = attach_tls(L, hs->ctx_ref, s, host, port, family, time_left(hs));
  if (err != 0) {
    ts__stream_close(s, err);
  } else if (hs->ctx_ref != LUA_NOREF) {
    if (left > 0)
      ts__tls_feed(s, rest, left);
  } else if (ts__stream_deliver(s, rest, left) == 0) {
    ts__stream_on_data(s);
  }
  spawn_handler(L, s, host, port, family);
}

static void header_on_read(ts_stream *s, void *layer, const char *data, size_t n) {
  header_step *hs = layer;
  ts_proxy_addr a;
  const char *why = NULL;
  long used;

  (void)s;
  if (ts_buf_append(&hs->buf, data, n) != 0) {
    header_refuse(hs, "out of memory");
    return;
  }
  used = ts_proxy_parse(ts_buf_head(&hs->buf), ts_buf_len(&hs->buf), &a, &why);
  if (used < 0)
    header_refuse(hs, why);
  else if (used > 0)
    header_done(hs, &a, (size_t)used);
}

static void header_on_eof(ts_stream *s, void *layer) {
  header_step *hs = layer;

  (void)s;
  header_refuse(hs,
                ts_buf_len(&hs->buf) == 0 ? NULL : "connection closed inside the header");
}

static void header_timeout(uv_timer_t *t) {
  header_refuse(t->data, "header timed out");
}

/* The stream closed within the step (refused, reset, stopped): unbook. */
static void header_closed(ts_stream *s, void *layer) {
  header_step *hs = layer;

  ts__stream_attach(s, NULL, NULL);
  uv_close((uv_handle_t *)&hs->timer, header_free);
  call_books(hs->loop, "done", s);
}

static const ts_layer_ops header_ops = {
    .on_read = header_on_read,
    .on_eof = header_on_eof,
    .closed = header_closed,
};

static int header_begin(ts_listener *ls, ts_stream *s) {
  lua_State *L = ls->loop->L;
  header_step *hs = calloc(1, sizeof(*hs));
  uint64_t ms = ts__timeout_ms(ls->handshake_timeout);

  if (hs == NULL)
    return UV_ENOMEM;
  hs->s = s;
  hs->loop = ls->loop;
  hs->handshake_timeout = ls->handshake_timeout;
  hs->started = uv_now(ls->loop->uv);
  hs->ctx_ref = LUA_NOREF;
  if (ls->ctx_ref != LUA_NOREF) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, ls->ctx_ref);
    hs->ctx_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  }
  uv_timer_init(ls->loop->uv, &hs->timer);
  hs->timer.data = hs;
  if (ms > 0)
    uv_timer_start(&hs->timer, header_timeout, ms, 0);
  ts__stream_attach(s, &header_ops, hs);
  return 0;
}

/* ---- accepting ---- */

/* Wraps an accepted fd in a stream, books it and starts the pipeline. */
static void serve(ts_listener *ls, int fd, struct sockaddr_storage *ss) {
  lua_State *L = ls->loop->L;
  int is_pipe = ls->family == AF_UNIX, err, port = 0;
  char host[INET6_ADDRSTRLEN] = "";
  ts_stream *s = ts__stream_new(L, is_pipe);
  uv_stream_t *h = ts__stream_handle(s);

  lua_pop(L, 1); /* the stream pins itself */
  err = is_pipe ? uv_pipe_open((uv_pipe_t *)h, fd) : uv_tcp_open((uv_tcp_t *)h, fd);
  if (err != 0) {
    close(fd);
    ts__stream_abort(s);
    return;
  }
  ts__stream_configure(s, ls->max_buffer, ls->chunk, ls->timeout);
  ls->counters->refs++;
  ts__stream_count_into(s, &ls->counters->tally);
  if (!is_pipe) {
    /* Writes are coalesced per wake-up, so Nagle only adds latency. */
    uv_tcp_nodelay((uv_tcp_t *)h, 1);
    port = ts__addr_name((struct sockaddr *)ss, host, sizeof(host));
  }
  if (ls->proxy_protocol)
    err = header_begin(ls, s);
  else if (ls->ctx_ref != LUA_NOREF)
    err = attach_tls(L, ls->ctx_ref, s, host, port, ss->ss_family, ls->handshake_timeout);
  if (err != 0) {
    ts__stream_abort(s);
    return;
  }
  call_books(ls->loop, "begin", s);
  ts__stream_start(s);
  if (!ls->proxy_protocol)
    spawn_handler(L, s, host, port, is_pipe ? AF_UNIX : ss->ss_family);
}

static void accept_cb(uv_poll_t *h, int status, int events);

static void update_polling(ts_listener *ls) {
  int want = !ls->closed && !ls->paused && !ls->out_of_fds;
  if (want && !ls->polling)
    uv_poll_start(&ls->poll, UV_READABLE, accept_cb);
  else if (!want && ls->polling)
    uv_poll_stop(&ls->poll);
  ls->polling = want;
}

static void backoff_cb(uv_timer_t *t) {
  ts_listener *ls = t->data;
  ls->out_of_fds = 0;
  update_polling(ls);
}

/* Waits BACKOFF_MS before accepting again: a full descriptor table would
 * otherwise wake the loop for the same pending connection forever. */
static void out_of_fds(ts_listener *ls, int err) {
  uint64_t now = uv_now(ls->poll.loop);
  char msg[160];

  if (ls->fds_logged == 0 || now - ls->fds_logged >= FDS_LOG_MS) {
    snprintf(msg, sizeof(msg), "accept: %s; retrying every %d ms", strerror(err),
             BACKOFF_MS);
    ts__report(ls->loop, msg);
    ls->fds_logged = now ? now : 1;
  }
  ls->out_of_fds = 1;
  update_polling(ls);
  uv_timer_start(&ls->backoff, backoff_cb, BACKOFF_MS, 0);
}

static void accept_cb(uv_poll_t *h, int status, int events) {
  ts_listener *ls = h->data;
  struct sockaddr_storage ss;
  socklen_t len;
  int i, fd;

  (void)events;
  if (status < 0)
    return;
  for (i = 0; i < ACCEPT_BATCH && ls->polling; i++) {
    len = sizeof(ss);
    fd = accept4(ls->fd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
      serve(ls, fd, &ss);
      continue;
    }
    if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM)
      out_of_fds(ls, errno);
    if (errno != EINTR && errno != ECONNABORTED && errno != EPROTO)
      break;
  }
}

/* ---- the listener object ---- */

static ts_listener *check_listener(lua_State *L) {
  return luaL_checkudata(L, 1, LISTENER_MT);
}

static void listener_closed(uv_handle_t *h) {
  ts_listener *ls = h->data;
  lua_State *L = ls->loop->L;

  if (--ls->pending_closes > 0)
    return;
  luaL_unref(L, LUA_REGISTRYINDEX, ls->sock_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, ls->ctx_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, ls->self_ref);
  counters_release(L, (ts_tally *)ls->counters);
  ls->counters = NULL;
}

/* A listener still open when the state closes: its handles stay with the
 * loop (a host must stop its servers before lua_close); its counts go. */
static int l_listener_gc(lua_State *L) {
  ts_listener *ls = check_listener(L);
  counters_release(L, (ts_tally *)ls->counters);
  ls->counters = NULL;
  return 0;
}

static int l_listener_close(lua_State *L) {
  ts_listener *ls = check_listener(L);
  if (ls->closed)
    return 0;
  ls->closed = 1;
  update_polling(ls);
  ls->pending_closes = 2;
  uv_close((uv_handle_t *)&ls->poll, listener_closed);
  uv_close((uv_handle_t *)&ls->backoff, listener_closed);
  /* The port is free when stop() returns, as in Tornado: uv_close took the
   * fd out of epoll already. */
  lua_rawgeti(L, LUA_REGISTRYINDEX, ls->sock_ref);
  ts__socket_release(L, -1);
  lua_pop(L, 1);
  close(ls->fd);
  return 0;
}

/* stats() -> {bytes_in=, bytes_out=, tls_handshake_failures=} */
static int l_listener_stats(lua_State *L) {
  ts_listener *ls = check_listener(L);
  static const ts_tally none;
  const ts_tally *c = ls->counters ? &ls->counters->tally : &none;

  lua_createtable(L, 0, 3);
  lua_pushinteger(L, (lua_Integer)c->bytes_in);
  lua_setfield(L, -2, "bytes_in");
  lua_pushinteger(L, (lua_Integer)c->bytes_out);
  lua_setfield(L, -2, "bytes_out");
  lua_pushinteger(L, (lua_Integer)c->layer_failures);
  lua_setfield(L, -2, "tls_handshake_failures");
  return 1;
}

static int l_listener_pause(lua_State *L) {
  ts_listener *ls = check_listener(L);
  ls->paused = lua_isnone(L, 2) || lua_toboolean(L, 2);
  update_polling(ls);
  return 0;
}

/* The Lua layer checked the options and filled in the defaults. */
static size_t get_size(lua_State *L, int t, const char *k) {
  lua_Integer v;
  lua_getfield(L, t, k);
  v = luaL_checkinteger(L, -1);
  lua_pop(L, 1);
  return (size_t)v;
}

static double get_seconds(lua_State *L, int t, const char *k) {
  double v;
  lua_getfield(L, t, k);
  v = luaL_optnumber(L, -1, 0);
  lua_pop(L, 1);
  return v;
}

/* core.listener(socket, opts, handler): see spawn_handler for handler. opts:
 * max_buffer_size, read_chunk_size, idle_timeout, handshake_timeout,
 * ssl_context, proxy_protocol. */
static int l_listener(lua_State *L) {
  ts_loop *loop = ts__loop(L);
  ts_listener *ls;
  int fd, family;

  luaL_checktype(L, 2, LUA_TTABLE);
  luaL_checktype(L, 3, LUA_TTABLE);
  if (lua_getfield(L, 2, "ssl_context") != LUA_TNIL) /* 4 */
    luaL_checkudata(L, 4, "tcpserver.ssl_context");
  ls = lua_newuserdatauv(L, sizeof(*ls), 0); /* 5 */
  memset(ls, 0, sizeof(*ls));
  ls->loop = loop;
  ls->max_buffer = get_size(L, 2, "max_buffer_size");
  ls->chunk = get_size(L, 2, "read_chunk_size");
  ls->timeout = get_seconds(L, 2, "idle_timeout");
  ls->handshake_timeout = get_seconds(L, 2, "handshake_timeout");
  lua_getfield(L, 2, "proxy_protocol");
  ls->proxy_protocol = lua_toboolean(L, -1);
  lua_pop(L, 1);
  luaL_setmetatable(L, LISTENER_MT); /* its __gc frees the counters */
  ls->counters = counters_new();
  if (ls->counters == NULL)
    return luaL_error(L, "listener: out of memory");
  /* Nothing raises past this point: the socket stays taken. */
  fd = ts__socket_take(L, 1, &family);
  ls->fd = fd;
  ls->family = family;
  lua_pushvalue(L, 4);
  ls->ctx_ref =
      lua_isnil(L, -1) ? (lua_pop(L, 1), LUA_NOREF) : luaL_ref(L, LUA_REGISTRYINDEX);
  uv_poll_init_socket(loop->uv, &ls->poll, fd);
  uv_timer_init(loop->uv, &ls->backoff);
  ls->poll.data = ls->backoff.data = ls;
  lua_pushvalue(L, 3);
  ls->counters->owner_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, 1);
  ls->sock_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, 5);
  ls->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  update_polling(ls);
  return 1;
}

typedef struct stream_list {
  ts_stream **s; /* NULL: count only */
  size_t n, cap;
} stream_list;

/* Counts or gathers the streams of the walk. Nothing here may raise: a Lua
 * error would jump out of uv_walk, which links the loop's handles to its
 * own stack frame meanwhile. */
static void gather_stream(ts_stream *s, void *arg) {
  stream_list *l = arg;

  if (counters_of(s) == NULL)
    return;
  if (l->s != NULL && l->n < l->cap)
    l->s[l->n] = s;
  l->n++;
}

/* core.streams_of(handler) -> the open streams its listeners accepted,
 * stopped listeners' too: the loop knows them all, so that a server need
 * not keep a set of them (an idle connection would pay for its entry). */
static int l_streams_of(lua_State *L) {
  stream_list l = {NULL, 0, 0};
  size_t i;
  lua_Integer n = 0;

  luaL_checktype(L, 1, LUA_TTABLE);
  ts__stream_each(ts__loop(L), gather_stream, &l);
  l.cap = l.n;
  l.s = lua_newuserdatauv(L, (l.cap ? l.cap : 1) * sizeof(*l.s), 0); /* 2 */
  l.n = 0;
  ts__stream_each(ts__loop(L), gather_stream, &l); /* no Lua ran between */
  lua_createtable(L, (int)l.cap, 0);               /* 3 */
  for (i = 0; i < l.n && i < l.cap; i++) {
    lua_rawgeti(L, LUA_REGISTRYINDEX, counters_of(l.s[i])->owner_ref);
    if (lua_rawequal(L, -1, 1)) {
      ts__stream_push(L, l.s[i]);
      lua_rawseti(L, 3, ++n);
    }
    lua_pop(L, 1);
  }
  return 1;
}

int ts__open_server(lua_State *L) {
  static const luaL_Reg methods[] = {{"close", l_listener_close},
                                     {"pause", l_listener_pause},
                                     {"stats", l_listener_stats},
                                     {NULL, NULL}};
  static const luaL_Reg funcs[] = {
      {"listener", l_listener}, {"streams_of", l_streams_of}, {NULL, NULL}};

  luaL_newmetatable(L, LISTENER_MT);
  lua_pushcfunction(L, l_listener_gc);
  lua_setfield(L, -2, "__gc");
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
