/* Listening sockets under a uv_poll: accept in batches, hand each stream to
 * a Lua function running in a new task, pause at max_connections and back
 * off when the process runs out of descriptors. */
#define _GNU_SOURCE
#include "proxy.h"
#include "stream.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define ACCEPT_BATCH 64
#define BACKOFF_MS 100
#define FDS_LOG_MS 60000 /* at most one line a minute while it lasts */

typedef struct ts_listener ts_listener;

/* What a connection in the PROXY header step points at (s->proxy). */
struct ts_proxy {
  ts_listener *ls;
};

struct ts_listener {
  uv_poll_t poll;
  uv_timer_t backoff;    /* restarts accepting after EMFILE */
  int fd, family;
  int handler_ref, self_ref, sock_ref;
  int ctx_ref;           /* TLS context, or LUA_NOREF */
  int proxy_protocol;    /* a PROXY header comes first */
  double handshake_timeout;
  int polling, closed, paused, out_of_fds, pending_closes;
  uint64_t fds_logged;   /* when running out of fds was last logged (ms) */
  size_t max_buffer, chunk;
  double timeout;
  struct ts_proxy proxy;
  int in_header;         /* connections in the PROXY header step */
  int handles_closed;    /* the poll and timer closed: release when in_header is 0 */
};

static ts_listener *check_listener(lua_State *L) {
  return luaL_checkudata(L, 1, TS_LISTENER_MT);
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
    snprintf(msg, sizeof(msg), "accept: %s; retrying every %d ms",
             strerror(err), BACKOFF_MS);
    ts__report(ls->poll.loop->data, msg);
    ls->fds_logged = now ? now : 1;
  }
  ls->out_of_fds = 1;
  update_polling(ls);
  uv_timer_start(&ls->backoff, backoff_cb, BACKOFF_MS, 0);
}

/* ---- the accept pipeline, in the order a connection goes through it:
 * accept_cb -> serve (books the connection with the server's begin) ->
 * the PROXY header, when enabled (header_*) -> the TLS layer, when
 * configured (attach_tls) -> run_handler (handle_stream in a task) -> the
 * handler's end (ts__stream_task_done calls the server's done). A
 * connection that leaves before its handler runs is unbooked by done too. */

/* Books s with the server: handler.begin(stream) counts it, so that
 * max_connections holds from accept on. */
static void book(lua_State *L, ts_listener *ls, ts_stream *s) {
  lua_rawgeti(L, LUA_REGISTRYINDEX, ls->handler_ref);
  lua_getfield(L, -1, "begin");
  ts__stream_push(L, s);
  ts__pcall_on(L, 1);
  lua_pop(L, 1);
}

/* Runs the server's handle_stream in a task owned by s. The handler table
 * holds the server, begin(stream) (books the connection), done (see
 * ts__stream_task_done) and Address (the metatable of addresses). */
static void run_handler(lua_State *L, ts_listener *ls, ts_stream *s,
                        const char *host, int port, const char *family) {
  int h;

  lua_rawgeti(L, LUA_REGISTRYINDEX, ls->handler_ref);
  h = lua_gettop(L);
  lua_createtable(L, 0, 3);
  lua_pushstring(L, host);
  lua_setfield(L, -2, "host");
  lua_pushinteger(L, port);
  lua_setfield(L, -2, "port");
  lua_pushstring(L, family);
  lua_setfield(L, -2, "family");
  lua_getfield(L, h, "Address");
  lua_setmetatable(L, -2);
  lua_getfield(L, h, "server");
  lua_getfield(L, -1, "handle_stream");
  lua_insert(L, -2);                 /* h, address, fn, server */
  ts__stream_push(L, s);
  lua_pushvalue(L, h + 1);
  lua_pushvalue(L, h + 1);
  s->addr_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, h);
  s->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  s->flags |= F_TASK;
  ts__spawn(L, 3, s);
  lua_pop(L, 2);
}

/* The TLS layer: the peer as accept (or the PROXY header) saw it names the
 * stream in logs, as a reset may leave getpeername nothing. */
static int attach_tls(lua_State *L, ts_listener *ls, ts_stream *s,
                      const char *host, int port, int family) {
  const char *peer = lua_pushfstring(L, family == AF_INET6 ? "[%s]:%d" : "%s:%d",
                                     host, port);
  int err;

  lua_rawgeti(L, LUA_REGISTRYINDEX, ls->ctx_ref);
  err = ts__tls_attach(L, s, lua_gettop(L), 1, peer, ls->handshake_timeout);
  lua_pop(L, 2);
  return err;
}

/* ---- the PROXY header step. While it lasts s->proxy points at its
 * listener's header state and a close callback of ours is set: every way
 * out (header, refusal, reset, EOF, timeout, a shutdown closing it) ends in
 * header_closed or header_done, which unbook or serve it. Nothing is
 * allocated per connection. */

static void listener_release(lua_State *L, ts_listener *ls);

/* The close callback set by header_begin: the stream closed in the header
 * step, so the server's done(stream) unbooks it. */
static int header_closed(lua_State *L) {
  ts_stream *s = lua_touserdata(L, lua_upvalueindex(1));
  ts_listener *ls = s->proxy->ls;

  lua_rawgeti(L, LUA_REGISTRYINDEX, ls->handler_ref);
  lua_getfield(L, -1, "done");
  lua_pushvalue(L, lua_upvalueindex(1));
  s->proxy = NULL;
  ls->in_header--;
  listener_release(L, ls);
  lua_call(L, 1, 0);
  return 0;
}

static void header_begin(lua_State *L, ts_listener *ls, ts_stream *s) {
  double ms = ls->handshake_timeout * 1000 + 0.5;

  s->proxy = &ls->proxy;
  ls->in_header++;
  ts__stream_push(L, s);
  lua_pushcclosure(L, header_closed, 1);
  s->close_cb_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  if (ms < (double)UINT32_MAX * 1000) /* beyond: no timeout, not a cast's UB */
    ts__stream_start_timer(s, (uint64_t)ms);
  /* No reader is waiting yet: keep reading until the header can be told
   * complete or not, whatever the read chunk (header_done restores it). */
  if (s->read_high_water < TS_PROXY_MAX_HEADER)
    s->read_high_water = TS_PROXY_MAX_HEADER;
}

static void log_refusal(ts_stream *s, const char *why) {
  struct sockaddr_storage ss;
  int len = sizeof(ss);
  char host[INET6_ADDRSTRLEN] = "?", msg[200];

  if (!(s->flags & F_PIPE) &&
      uv_tcp_getpeername(&s->h.tcp, (struct sockaddr *)&ss, &len) == 0) {
    ts__addr_name((struct sockaddr *)&ss, host, sizeof(host));
  }
  snprintf(msg, sizeof(msg), "PROXY protocol: %s from %s; closing", why, host);
  ts__log(s->h.handle.loop->data, "info", msg);
}

/* Closes s; its close callback (header_closed) unbooks it. */
static void header_refuse(ts_stream *s, const char *why) {
  if (why != NULL)
    log_refusal(s, why);
  ts__stream_unborrow(s);
  ts__stream_close(s, UV_ECONNABORTED);
}

static const char *family_name(int family) {
  return family == AF_UNIX ? "unix" : family == AF_INET6 ? "inet6" : "inet";
}

/* The header is complete: serve the stream as the client it names. With
 * TLS, what came after the header is the first ciphertext. */
static void header_done(lua_State *L, ts_stream *s, const ts_proxy_addr *a) {
  ts_listener *ls = s->proxy->ls;
  struct sockaddr_storage ss;
  int len = sizeof(ss), err = 0, port = 0, family = AF_INET;
  char host[INET6_ADDRSTRLEN] = "", *early = NULL;
  size_t n;

  ts__stream_unborrow(s);
  ts__stream_configure(s, ls->max_buffer, ls->chunk, ls->timeout);
  if (s->timer != NULL)
    uv_timer_stop(s->timer);
  if (a->family != 0) {
    snprintf(host, sizeof(host), "%s", a->host);
    port = a->port;
    family = a->family;
  } else if (s->flags & F_PIPE) {
    family = AF_UNIX;
  } else if (uv_tcp_getpeername(&s->h.tcp, (struct sockaddr *)&ss, &len) == 0) {
    port = ts__addr_name((struct sockaddr *)&ss, host, sizeof(host));
    family = ss.ss_family;
  }
  n = ts_buf_len(&s->rbuf);
  if (ls->ctx_ref != LUA_NOREF) {
    err = attach_tls(L, ls, s, host, port, family);
    if (err == 0 && n > 0 && (early = malloc(n)) == NULL)
      err = UV_ENOMEM;
  }
  if (err != 0) { /* still in the header step: header_closed unbooks it */
    ts__stream_close(s, err);
    return;
  }
  /* Out of the header step before the early bytes reach the stream. */
  luaL_unref(L, LUA_REGISTRYINDEX, s->close_cb_ref);
  s->close_cb_ref = LUA_NOREF;
  s->proxy = NULL;
  ls->in_header--;
  if (early != NULL) {
    memcpy(early, ts_buf_head(&s->rbuf), n);
    ts_buf_consume(&s->rbuf, n);
    ts__tls_on_read(s, early, n);
    free(early);
  }
  run_handler(L, ls, s, host, port, family_name(family));
  listener_release(L, ls);
}

/* stream.c's hooks while s->proxy is set. */
void ts__proxy_on_data(ts_stream *s) {
  ts_proxy_addr a;
  const char *why = NULL;
  long n = ts_proxy_parse(ts_buf_head(&s->rbuf), ts_buf_len(&s->rbuf), &a, &why);

  if (n < 0) {
    header_refuse(s, why);
  } else if (n == 0) {
    ts__stream_unborrow(s); /* keep the partial header */
  } else {
    ts_buf_consume(&s->rbuf, (size_t)n);
    header_done(((ts_loop *)s->h.handle.loop->data)->L, s, &a);
  }
}

void ts__proxy_on_eof(ts_stream *s) {
  /* An empty connection is a port probe: it closes silently. */
  header_refuse(s, ts_buf_len(&s->rbuf) == 0 ? NULL
                                             : "connection closed inside the header");
}

void ts__proxy_timeout(ts_stream *s) {
  header_refuse(s, "header timed out");
}

/* accept: wraps the fd in a stream, books it, and starts the pipeline. */
static void serve(ts_listener *ls, int fd, struct sockaddr_storage *ss) {
  ts_loop *loop = ls->poll.loop->data;
  lua_State *L = loop->L;
  int is_pipe = ls->family == AF_UNIX, err;
  char host[INET6_ADDRSTRLEN] = "";
  int port = 0;
  ts_stream *s = ts__stream_new(L, is_pipe);

  lua_pop(L, 1); /* the stream pins itself */
  err = is_pipe ? uv_pipe_open((uv_pipe_t *)ts__stream_handle(s), fd)
                : uv_tcp_open((uv_tcp_t *)ts__stream_handle(s), fd);
  if (err != 0) {
    close(fd);
    ts__stream_abort(s);
    return;
  }
  ts__stream_configure(s, ls->max_buffer, ls->chunk, ls->timeout);
  if (!is_pipe) {
    /* Writes are coalesced per wake-up, so Nagle only adds latency. */
    uv_tcp_nodelay((uv_tcp_t *)ts__stream_handle(s), 1);
    port = ts__addr_name((struct sockaddr *)ss, host, sizeof(host));
  }
  if (ls->proxy_protocol) {
    book(L, ls, s);
    header_begin(L, ls, s);
    ts__stream_start(s);
    return;
  }
  if (ls->ctx_ref != LUA_NOREF &&
      attach_tls(L, ls, s, host, port, ss->ss_family) != 0) {
    ts__stream_abort(s);
    return;
  }
  book(L, ls, s);
  ts__stream_start(s);
  run_handler(L, ls, s, host, port, family_name(is_pipe ? AF_UNIX : ss->ss_family));
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

/* Drops the listener's refs once its handles are closed and no connection
 * in the header step points at it. */
static void listener_release(lua_State *L, ts_listener *ls) {
  if (!ls->handles_closed || ls->in_header > 0)
    return;
  luaL_unref(L, LUA_REGISTRYINDEX, ls->handler_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, ls->ctx_ref);
  luaL_unref(L, LUA_REGISTRYINDEX, ls->self_ref);
  ls->handler_ref = ls->ctx_ref = ls->self_ref = LUA_NOREF;
}

static void listener_closed(uv_handle_t *h) {
  ts_listener *ls = h->data;
  lua_State *L = ((ts_loop *)h->loop->data)->L;

  if (--ls->pending_closes > 0)
    return;
  lua_rawgeti(L, LUA_REGISTRYINDEX, ls->sock_ref);
  ts__socket_release(L, -1);
  lua_pop(L, 1);
  close(ls->fd);
  luaL_unref(L, LUA_REGISTRYINDEX, ls->sock_ref);
  ls->handles_closed = 1;
  listener_release(L, ls);
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
  return 0;
}

static int l_listener_pause(lua_State *L) {
  ts_listener *ls = check_listener(L);
  ls->paused = lua_isnone(L, 2) || lua_toboolean(L, 2);
  update_polling(ls);
  return 0;
}

static size_t opt_size(lua_State *L, int t, const char *k, size_t def) {
  lua_Integer v;
  lua_getfield(L, t, k);
  v = luaL_optinteger(L, -1, (lua_Integer)def);
  lua_pop(L, 1);
  if (v <= 0)
    luaL_error(L, "%s must be positive", k);
  return (size_t)v;
}

/* core.listener(socket, opts, handler): see ts__serve for handler. opts:
 * max_buffer_size, read_chunk_size, idle_timeout, handshake_timeout,
 * ssl_context, proxy_protocol. */
static int l_listener(lua_State *L) {
  ts_loop *loop = ts__loop(L);
  ts_listener *ls;
  int fd, family;

  luaL_checktype(L, 2, LUA_TTABLE);
  luaL_checktype(L, 3, LUA_TTABLE);
  ls = lua_newuserdatauv(L, sizeof(*ls), 0);
  memset(ls, 0, sizeof(*ls));
  ls->max_buffer = opt_size(L, 2, "max_buffer_size", 100 * 1024 * 1024);
  ls->chunk = opt_size(L, 2, "read_chunk_size", 64 * 1024);
  lua_getfield(L, 2, "idle_timeout");
  ls->timeout = luaL_optnumber(L, -1, 0);
  lua_getfield(L, 2, "proxy_protocol");
  ls->proxy_protocol = lua_toboolean(L, -1);
  lua_pop(L, 1);
  lua_getfield(L, 2, "handshake_timeout");
  ls->handshake_timeout = luaL_optnumber(L, -1, 10);
  if (lua_getfield(L, 2, "ssl_context") != LUA_TNIL)
    luaL_checkudata(L, -1, "tcpserver.ssl_context");
  ls->ctx_ref = lua_isnil(L, -1) ? LUA_NOREF : luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pop(L, ls->ctx_ref == LUA_NOREF ? 3 : 2);
  fd = ts__socket_take(L, 1, &family);
  luaL_setmetatable(L, TS_LISTENER_MT);
  ls->fd = fd;
  ls->family = family;
  uv_poll_init_socket(loop->uv, &ls->poll, fd);
  uv_timer_init(loop->uv, &ls->backoff);
  ls->poll.data = ls->backoff.data = ls;
  ls->proxy.ls = ls;
  lua_pushvalue(L, 3);
  ls->handler_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, 1);
  ls->sock_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  lua_pushvalue(L, -1);
  ls->self_ref = luaL_ref(L, LUA_REGISTRYINDEX);
  update_polling(ls);
  return 1;
}

int ts__open_server(lua_State *L) {
  static const luaL_Reg methods[] = {
    {"close", l_listener_close}, {"pause", l_listener_pause}, {NULL, NULL}};
  static const luaL_Reg funcs[] = {{"listener", l_listener}, {NULL, NULL}};

  luaL_newmetatable(L, TS_LISTENER_MT);
  luaL_newlib(L, methods);
  lua_setfield(L, -2, "__index");
  lua_pop(L, 1);
  luaL_setfuncs(L, funcs, 0);
  return 0;
}
